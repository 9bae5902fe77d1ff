//! What accountants need from the ledger: bonus documents for 1C (one per journal
//! transaction that moves a customer's points) and daily postings per legal entity.
//!
//! Points are a liability. Each business day's movements — accrued, redeemed, expired,
//! reversed, written off, adjusted, opening — become one posting per legal entity, in
//! rubles at the point value, with the debit and credit accounts from the configuration.
//! A correction of a past day (an edited or returned sale) produces an adjusting posting
//! with the difference; a posting already made is never changed.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::ingest::IngestContext;
use super::{Ledger, Result, from_ts, ts};

/// The accounting movement a journal kind belongs to, and its sign (so that every
/// movement is a positive number when the liability moves the usual way).
pub fn movement_of(kind: &str) -> Option<(&'static str, i64)> {
    Some(match kind {
        "accrual" | "bonus" => ("accrued", 1),
        "redemption" => ("redeemed", -1),
        "expiry" => ("expired", -1),
        "reversal" => ("reversed", -1),
        "writeoff" => ("written_off", 1),
        "adjustment" => ("adjusted", 1),
        "opening" => ("opening", 1),
        _ => return None,
    })
}

/// What a posting covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PostingKind {
    /// One business day's movements (or an adjusting posting of that day).
    Day,
    /// Every movement before the posting window not yet in the books, in one posting dated
    /// the day before the window: the opening posting the first time, a correction of
    /// earlier days afterwards.
    History,
    /// A coalition partner's position for a period (`kopilka partners --post`): the points
    /// its sales issued and those its customers spent with it, at the point value.
    Settlement,
}

impl PostingKind {
    fn as_str(self) -> &'static str {
        match self {
            PostingKind::Day => "day",
            PostingKind::History => "history",
            PostingKind::Settlement => "settlement",
        }
    }

    fn parse(s: &str) -> PostingKind {
        match s {
            "history" => PostingKind::History,
            "settlement" => PostingKind::Settlement,
            _ => PostingKind::Day,
        }
    }
}

/// How the days older than the posting window (`lookback_days`) reach the books.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HistoryPosting {
    /// One posting per legal entity with every movement before the window (the liability
    /// as of the first posted day), dated the day before it; later changes to those days
    /// are posted the same way, as the difference.
    #[default]
    Opening,
    /// A posting for every business day of the history that has none yet; later changes to
    /// days older than the window are posted as in `Opening`.
    Daily,
}

/// One posting as made (or to be made).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Posting {
    pub entity: String,
    /// The document date in 1C.
    pub day: NaiveDate,
    /// 1 for the first posting of an entity and date, 2… for later ones (adjusting).
    pub seq: i64,
    pub kind: PostingKind,
    /// The business days whose movements it carries (`day` itself for a day's posting).
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    /// Movement → points (signed; a negative adjusting amount is a reversal, красное сторно).
    pub points: BTreeMap<String, i64>,
    /// The coalition partner of a settlement posting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
}

impl Posting {
    /// A later posting for the same day, or a history posting after the opening one.
    pub fn adjusting(&self) -> bool {
        self.seq > 1
    }
}

/// A posting as stored: when it was made and the outbox row that carries it to 1C.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PostingRecord {
    pub posting: Posting,
    pub outbox_id: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// Where a source's documents belong and what a point is worth.
pub struct Books<'a> {
    pub default_entity: &'a str,
    pub entities: &'a BTreeMap<String, String>,
    pub tz: chrono_tz::Tz,
    pub point_value_kopecks: i64,
    /// Destination for postings in the outbox, when they go to 1C.
    pub destination: Option<&'a str>,
    pub history: HistoryPosting,
}

impl Books<'_> {
    pub(crate) fn entity(&self, source: Option<&str>) -> String {
        source
            .and_then(|s| self.entities.get(s))
            .cloned()
            .unwrap_or_else(|| self.default_entity.to_string())
    }

    pub(crate) fn day_start(&self, day: NaiveDate) -> DateTime<Utc> {
        self.tz
            .from_local_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn day_bounds(&self, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.day_start(day), self.day_start(day.succ_opt().unwrap_or(day)))
    }

    fn day_of(&self, t: i64) -> NaiveDate {
        from_ts(t).with_timezone(&self.tz).date_naive()
    }
}

type Movements = BTreeMap<String, i64>;
type PerEntity = BTreeMap<String, Movements>;

fn add_movement(out: &mut PerEntity, entity: String, kind: &str, sum: i64) {
    if let Some((movement, sign)) = movement_of(kind) {
        *out.entry(entity)
            .or_default()
            .entry(movement.to_string())
            .or_default() += sign * sum;
    }
}

/// Movements per entity for one business day, from the journal.
pub(crate) fn day_movements(conn: &Connection, books: &Books<'_>, day: NaiveDate) -> Result<PerEntity> {
    let (from, to) = books.day_bounds(day);
    let mut st = conn.prepare_cached(
        "SELECT d.source, j.kind, SUM(j.amount) FROM journal j LEFT JOIN documents d ON d.id = j.document_id \
         WHERE j.effective_at >= ?1 AND j.effective_at < ?2 GROUP BY d.source, j.kind",
    )?;
    let rows = st.query_map(params![ts(from), ts(to)], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = PerEntity::new();
    for row in rows {
        let (source, kind, sum) = row?;
        add_movement(&mut out, books.entity(source.as_deref()), &kind, sum);
    }
    Ok(out)
}

/// Movements per entity and local day in `[from, to]`, in one pass over the journal
/// (hours are bucketed into days: an hour never straddles two days with whole-hour offsets).
pub(crate) fn movements_by_day(
    conn: &Connection,
    books: &Books<'_>,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<BTreeMap<NaiveDate, PerEntity>> {
    let (start, end) = (
        books.day_start(from),
        books.day_start(to.succ_opt().unwrap_or(to)),
    );
    let mut st = conn.prepare_cached(
        "SELECT (j.effective_at / 3600) * 3600, d.source, j.kind, SUM(j.amount) FROM journal j \
         LEFT JOIN documents d ON d.id = j.document_id \
         WHERE j.effective_at >= ?1 AND j.effective_at < ?2 GROUP BY 1, 2, 3",
    )?;
    let rows = st.query_map(params![ts(start), ts(end)], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out: BTreeMap<NaiveDate, PerEntity> = BTreeMap::new();
    for row in rows {
        let (hour, source, kind, sum) = row?;
        add_movement(
            out.entry(books.day_of(hour)).or_default(),
            books.entity(source.as_deref()),
            &kind,
            sum,
        );
    }
    for per in out.values_mut() {
        for m in per.values_mut() {
            m.retain(|_, v| *v != 0);
        }
        per.retain(|_, m| !m.is_empty());
    }
    out.retain(|_, per| !per.is_empty());
    Ok(out)
}

/// Movements per entity before `day` (local), with each entity's first day.
pub(crate) fn movements_before(
    conn: &Connection,
    books: &Books<'_>,
    day: NaiveDate,
) -> Result<(PerEntity, BTreeMap<String, NaiveDate>)> {
    let mut st = conn.prepare_cached(
        "SELECT d.source, j.kind, SUM(j.amount), MIN(j.effective_at) FROM journal j \
         LEFT JOIN documents d ON d.id = j.document_id WHERE j.effective_at < ?1 GROUP BY d.source, j.kind",
    )?;
    let rows = st.query_map([ts(books.day_start(day))], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = PerEntity::new();
    let mut first: BTreeMap<String, NaiveDate> = BTreeMap::new();
    for row in rows {
        let (source, kind, sum, at) = row?;
        let entity = books.entity(source.as_deref());
        let d = books.day_of(at);
        first
            .entry(entity.clone())
            .and_modify(|f| *f = (*f).min(d))
            .or_insert(d);
        add_movement(&mut out, entity, &kind, sum);
    }
    Ok((out, first))
}

fn parse_movements(text: &str) -> Movements {
    serde_json::from_str(text).unwrap_or_default()
}

fn add_into(into: &mut Movements, from: &Movements) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn difference(now: &Movements, before: &Movements) -> Movements {
    let mut diff = Movements::new();
    for k in now.keys().chain(before.keys()) {
        let d = now.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
        if d != 0 {
            diff.insert(k.clone(), d);
        }
    }
    diff
}

fn parse_day(s: &str) -> NaiveDate {
    s.parse().unwrap_or_default()
}

/// Writes one posting and its outbox row.
fn make_posting(conn: &Connection, books: &Books<'_>, p: &Posting, now: DateTime<Utc>) -> Result<()> {
    let movements = serde_json::to_string(&p.points).unwrap_or_default();
    let outbox_id = match books.destination {
        Some(dest) => {
            let payload = serde_json::json!({
                "entity": p.entity,
                "day": p.day.to_string(),
                "seq": p.seq,
                "kind": p.kind.as_str(),
                "first_day": p.first_day.to_string(),
                "last_day": p.last_day.to_string(),
                "adjusting": p.adjusting(),
                "point_value_kopecks": books.point_value_kopecks,
                "points": p.points,
                "partner": p.partner,
            });
            super::outbox::enqueue(
                conn,
                dest,
                &format!(
                    "accounting:{}:{}:{}:{}",
                    super::ledger_uid(conn)?,
                    p.entity,
                    p.day,
                    p.seq
                ),
                None,
                &payload.to_string(),
                now,
            )?
        }
        None => None,
    };
    conn.prepare_cached(
        "INSERT INTO accounting_postings (entity, day, seq, movements, outbox_id, created_at, kind, first_day, last_day, partner) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        p.entity,
        p.day.to_string(),
        p.seq,
        movements,
        outbox_id,
        ts(now),
        p.kind.as_str(),
        p.first_day.to_string(),
        p.last_day.to_string(),
        p.partner
    ])?;
    Ok(())
}

fn next_seq(conn: &Connection, entity: &str, day: NaiveDate) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM accounting_postings WHERE entity = ?1 AND day = ?2",
        )?
        .query_row(params![entity, day.to_string()], |r| r.get(0))?)
}

impl Ledger {
    /// Makes the postings that are due, so that the books hold every movement of the
    /// journal up to yesterday (local):
    /// - every day from `lookback_days` ago to yesterday: the difference between the
    ///   journal and that day's postings, per entity (the first posting, then adjusting ones);
    /// - with [`HistoryPosting::Daily`], every older day that no posting covers yet;
    /// - then whatever the days before the window still miss (the history on the first run,
    ///   a late change to an old day afterwards) as one history posting per entity.
    ///
    /// Returns the postings made.
    /// Posts each coalition partner's position for the business days `first..=last`: the
    /// points its sales issued (`partner_issued`) and those spent with it
    /// (`partner_redeemed`), one settlement posting per partner dated `last`, for the
    /// default legal entity. Running it again for the same period posts only what changed
    /// since (an adjusting posting), so a late return is settled and nothing twice.
    pub fn post_partner_settlement(
        &mut self,
        books: &Books<'_>,
        first: NaiveDate,
        last: NaiveDate,
        now: DateTime<Utc>,
    ) -> Result<Vec<Posting>> {
        let range = super::DateRange {
            from: Some(books.day_start(first)),
            to: Some(books.day_start(last.succ_opt().unwrap_or(last))),
        };
        let totals = self.partner_totals(&range, crate::core::money::Money(books.point_value_kopecks))?;
        let tx = self.conn.transaction()?;
        let mut made = Vec::new();
        for t in totals {
            let mut posted: BTreeMap<String, i64> = BTreeMap::new();
            {
                let mut st = tx.prepare_cached(
                    "SELECT movements FROM accounting_postings WHERE kind = 'settlement' AND partner = ?1 \
                     AND first_day = ?2 AND last_day = ?3",
                )?;
                let rows = st.query_map(params![t.partner, first.to_string(), last.to_string()], |r| {
                    r.get::<_, String>(0)
                })?;
                for row in rows {
                    add_into(&mut posted, &parse_movements(&row?));
                }
            }
            let want: BTreeMap<String, i64> = [
                ("partner_issued".to_string(), t.points_issued),
                ("partner_redeemed".to_string(), t.points_redeemed),
            ]
            .into_iter()
            .collect();
            let diff = difference(&want, &posted);
            if diff.is_empty() {
                continue;
            }
            let entity = books.default_entity.to_string();
            let p = Posting {
                seq: next_seq(&tx, &entity, last)?,
                entity,
                day: last,
                kind: PostingKind::Settlement,
                first_day: first,
                last_day: last,
                points: diff,
                partner: Some(t.partner.clone()),
            };
            make_posting(&tx, books, &p, now)?;
            made.push(p);
        }
        tx.commit()?;
        Ok(made)
    }

    pub fn post_accounting(
        &mut self,
        books: &Books<'_>,
        lookback_days: i64,
        ctx: &IngestContext<'_>,
    ) -> Result<Vec<Posting>> {
        let now = ctx.now;
        let today = now.with_timezone(&books.tz).date_naive();
        let window = today - chrono::Duration::days(lookback_days.max(1));
        let tx = self.conn.transaction()?;
        let first_day: Option<NaiveDate> = tx
            .prepare_cached("SELECT MIN(effective_at) FROM journal")?
            .query_row([], |r| r.get::<_, Option<i64>>(0))?
            .map(|t| books.day_of(t));
        let Some(first_day) = first_day else {
            return Ok(Vec::new());
        };
        let mut made = Vec::new();
        let from = match books.history {
            HistoryPosting::Opening => window,
            HistoryPosting::Daily => first_day.min(window),
        };
        let mut day = from.max(first_day);
        while day < today {
            let current = day_movements(&tx, books, day)?;
            let mut posted: PerEntity = PerEntity::new();
            {
                let mut st = tx.prepare_cached(
                    "SELECT entity, movements FROM accounting_postings WHERE day = ?1 AND kind = 'day'",
                )?;
                let rows = st.query_map([day.to_string()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (entity, movements) = row?;
                    add_into(posted.entry(entity).or_default(), &parse_movements(&movements));
                }
            }
            let entities: std::collections::BTreeSet<&String> = current.keys().chain(posted.keys()).collect();
            for entity in entities {
                if day < window {
                    // an old day (daily history): posted once, when nothing covers it yet;
                    // later changes go into the history posting
                    let covered: bool = tx
                        .prepare_cached(
                            "SELECT EXISTS (SELECT 1 FROM accounting_postings WHERE entity = ?1 \
                             AND first_day <= ?2 AND last_day >= ?2 AND kind != 'settlement')",
                        )?
                        .query_row(params![entity, day.to_string()], |r| r.get(0))?;
                    if covered {
                        continue;
                    }
                }
                let diff = difference(
                    &current.get(entity).cloned().unwrap_or_default(),
                    &posted.get(entity).cloned().unwrap_or_default(),
                );
                if diff.is_empty() {
                    continue;
                }
                let p = Posting {
                    entity: entity.clone(),
                    day,
                    seq: next_seq(&tx, entity, day)?,
                    kind: PostingKind::Day,
                    first_day: day,
                    last_day: day,
                    points: diff,
                    partner: None,
                };
                make_posting(&tx, books, &p, now)?;
                made.push(p);
            }
            day = match day.succ_opt() {
                Some(d) => d,
                None => break,
            };
        }
        // the days before the window: the books must hold all of their movements
        if first_day < window {
            let (journal, first) = movements_before(&tx, books, window)?;
            let mut posted = PerEntity::new();
            {
                let mut st = tx.prepare_cached(
                    "SELECT entity, movements FROM accounting_postings WHERE last_day < ?1 AND kind != 'settlement'",
                )?;
                let rows = st.query_map([window.to_string()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (entity, movements) = row?;
                    add_into(posted.entry(entity).or_default(), &parse_movements(&movements));
                }
            }
            let entities: std::collections::BTreeSet<&String> = journal.keys().chain(posted.keys()).collect();
            let last = window.pred_opt().unwrap_or(window);
            for entity in entities {
                let diff = difference(
                    &journal.get(entity).cloned().unwrap_or_default(),
                    &posted.get(entity).cloned().unwrap_or_default(),
                );
                if diff.is_empty() {
                    continue;
                }
                let p = Posting {
                    entity: entity.clone(),
                    day: last,
                    seq: next_seq(&tx, entity, last)?,
                    kind: PostingKind::History,
                    first_day: first.get(entity).copied().unwrap_or(first_day).min(last),
                    last_day: last,
                    points: diff,
                    partner: None,
                };
                make_posting(&tx, books, &p, now)?;
                made.push(p);
            }
        }
        tx.commit()?;
        made.sort_by(|a, b| (a.day, &a.entity, a.seq).cmp(&(b.day, &b.entity, b.seq)));
        Ok(made)
    }

    /// Postings made for days in `[from, to]`, in order.
    pub fn postings(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<PostingRecord>> {
        postings_where(
            &self.conn,
            "day >= ?1 AND day <= ?2",
            &from.to_string(),
            &to.to_string(),
        )
    }

    /// The journal's movements of one day per entity (what the postings must add up to).
    pub fn day_movements(
        &self,
        books: &Books<'_>,
        day: NaiveDate,
    ) -> Result<BTreeMap<String, BTreeMap<String, i64>>> {
        day_movements(&self.conn, books, day)
    }
}

/// Postings matching `filter` (over `?1`, `?2`), in order of day, entity and seq.
fn postings_where(conn: &Connection, filter: &str, a: &str, b: &str) -> Result<Vec<PostingRecord>> {
    let mut st = conn.prepare(&format!(
        "SELECT entity, day, seq, movements, outbox_id, created_at, kind, first_day, last_day, partner \
         FROM accounting_postings WHERE {filter} ORDER BY day, entity, seq"
    ))?;
    let rows = st.query_map([a, b], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, Option<String>>(7)?,
            r.get::<_, Option<String>>(8)?,
            r.get::<_, Option<String>>(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (entity, day, seq, movements, outbox, created, kind, first, last, partner) = row?;
        let day = parse_day(&day);
        out.push(PostingRecord {
            posting: Posting {
                entity,
                day,
                seq,
                kind: PostingKind::parse(&kind),
                first_day: first.as_deref().map_or(day, parse_day),
                last_day: last.as_deref().map_or(day, parse_day),
                points: parse_movements(&movements),
                partner,
            },
            outbox_id: outbox,
            created_at: from_ts(created),
        });
    }
    Ok(out)
}

/// What the postings carry per entity for every day up to `last` (inclusive).
pub(crate) fn posted_through(conn: &Connection, last: NaiveDate) -> Result<PerEntity> {
    let mut st = conn.prepare_cached(
        // settlement postings carry partners' positions, not the journal's movements
        "SELECT entity, movements FROM accounting_postings WHERE COALESCE(last_day, day) <= ?1 \
         AND kind != 'settlement'",
    )?;
    let rows = st.query_map([last.to_string()], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = PerEntity::new();
    for row in rows {
        let (entity, movements) = row?;
        add_into(out.entry(entity).or_default(), &parse_movements(&movements));
    }
    for m in out.values_mut() {
        m.retain(|_, v| *v != 0);
    }
    Ok(out)
}

/// Postings whose days overlap `[from, to]` (a history posting covers many days).
pub(crate) fn postings_covering(
    conn: &Connection,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<PostingRecord>> {
    postings_where(
        conn,
        "COALESCE(last_day, day) >= ?1 AND COALESCE(first_day, day) <= ?2",
        &from.to_string(),
        &to.to_string(),
    )
}

/// Queues a bonus document for 1C for every journal transaction after `since` that moved
/// a customer's points (accrual, reversal, expiry, …), in the transaction that wrote them —
/// except what 1C moved itself: the points paid with on a 1C document (and their give-back
/// or cancellation), which 1C's receipt already wrote to its register.
///
/// A write-off says how many of its points came out of lots with a burn date
/// (`from_burning`), and how many of those 1C itself had scheduled to burn (`from_burning_1c`:
/// opening balances read from 1C's register), so the bonus document can lower 1C's own
/// schedule by exactly that much.
pub(crate) fn enqueue_bonus_documents(
    conn: &Connection,
    since: i64,
    ctx: &IngestContext<'_>,
) -> Result<usize> {
    let Some(dest) = &ctx.destinations.onec_bonus else {
        return Ok(0);
    };
    let mut st = conn.prepare_cached(
        "SELECT j.id, j.kind, d.source, (SELECT r.kind FROM journal r WHERE r.id = j.reverses) \
         FROM journal j LEFT JOIN documents d ON d.id = j.document_id WHERE j.id > ?1 AND j.amount != 0 ORDER BY j.id",
    )?;
    let rows: Vec<(i64, String, Option<String>, Option<String>)> = st
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let onec = ctx.destinations.onec_system.as_deref();
    let pv = ctx.rules.point_value().0;
    let mut n = 0;
    for (id, kind, source, reversed_kind) in rows {
        let paid_in_1c = kind == "redemption" || reversed_kind.as_deref() == Some("redemption");
        if paid_in_1c && onec.is_some() && source.as_deref() == onec {
            continue;
        }
        let payload = BonusRef {
            tx_id: None,
            point_value: pv,
            register: None,
            system: onec.map(str::to_string),
        };
        if super::outbox::enqueue(
            conn,
            dest,
            &super::outbox::bonus_key_stored(id),
            None,
            &payload.stored(),
            ctx.now,
        )?
        .is_some()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// What a bonus document's outbox row stores: the journal transaction and the two values of
/// the moment it was queued (the point's value under the rules of the day, and which opening
/// balances came from 1C's register). Everything else the document says is in the journal,
/// its postings and lots, which never change, so it is rendered when the row is read
/// ([`render_bonus_payload`]) instead of being copied into every row: the full payload was
/// ≈ 400 bytes per transaction, the outbox's largest part (issue 19). Its keys are one
/// letter (one such row is queued per movement); rows written under the long names read too.
/// Since migration 26 the transaction is in the row's key (`b:<id>`) and not repeated here,
/// and the register is named by its 1C system (`s`), not spelled out (`r`); a point worth one
/// ruble (`v` 100, nearly every program) is not written at all, and the commonest reference
/// not at all ([`BonusRef::stored`]). Unknown fields are refused, so a payload stored whole
/// (which has `kind`, `points`, …) is never taken for a reference.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BonusRef {
    #[serde(
        rename = "t",
        alias = "tx_id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    tx_id: Option<i64>,
    #[serde(
        rename = "v",
        alias = "point_value",
        default = "ruble_point",
        skip_serializing_if = "is_ruble_point"
    )]
    point_value: i64,
    #[serde(
        rename = "r",
        alias = "register",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    register: Option<String>,
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    system: Option<String>,
}

impl BonusRef {
    /// The reference nearly every row has — the default 1C base's register, a one-ruble
    /// point — which is stored as nothing: `{"s":"onec"}` on ≈ 1.5 rows a sale was ≈ 19 bytes
    /// a sale (issue 19). No other reference serialises empty (`{}` at the least), so an empty
    /// payload means exactly this one.
    fn commonest() -> BonusRef {
        BonusRef {
            tx_id: None,
            point_value: ruble_point(),
            register: None,
            system: Some(crate::config::DEFAULT_ONEC_SYSTEM.to_string()),
        }
    }

    fn is_commonest(&self) -> bool {
        self.tx_id.is_none()
            && self.register.is_none()
            && is_ruble_point(&self.point_value)
            && self.system.as_deref() == Some(crate::config::DEFAULT_ONEC_SYSTEM)
    }

    /// What the outbox row's payload holds.
    fn stored(&self) -> String {
        if self.is_commonest() {
            return String::new();
        }
        // a struct of strings and integers always serialises
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored payload read back; `None` for one that is no reference (a payload stored whole).
    fn read(stored: &str) -> Option<BonusRef> {
        if stored.is_empty() {
            return Some(BonusRef::commonest());
        }
        serde_json::from_str(stored).ok()
    }
}

/// The value of a point worth one ruble, in kopecks: what a reference without `v` means.
fn ruble_point() -> i64 {
    100
}

fn is_ruble_point(v: &i64) -> bool {
    *v == ruble_point()
}

/// The bonus document's payload for a stored row: the compact reference rendered from the
/// ledger, or `None` — keep the row as stored — when it was written whole (before the
/// compact form) or names no journal transaction (journal rows are never deleted, so only a
/// damaged ledger has one; it must not keep the destination's other due rows from loading).
/// `key_tx` is the transaction the row's key names when it is stored short.
pub(crate) fn render_bonus_payload(
    conn: &Connection,
    stored: &str,
    key_tx: Option<i64>,
) -> Result<Option<String>> {
    let Some(r) = BonusRef::read(stored) else {
        return Ok(None);
    };
    let Some(tx_id) = r.tx_id.or(key_tx) else {
        return Ok(None);
    };
    let register = r.register.or_else(|| {
        r.system
            .as_deref()
            .map(crate::ledger::opening_source_from_register)
    });
    let mut st = conn.prepare_cached(
        "SELECT j.kind, j.amount, j.effective_at, j.customer_id, j.reverses, j.explanation, \
           d.source, d.doc_id, d.number, (SELECT MAX(l.expires_at) FROM postings p JOIN lots l ON l.id = p.lot_id WHERE p.tx_id = j.id AND l.origin_tx = j.id), \
           (SELECT value FROM customer_keys WHERE customer_id = j.customer_id AND kind = 'card' LIMIT 1), \
           (SELECT value FROM customer_keys WHERE customer_id = j.customer_id AND kind = 'onec' LIMIT 1), \
           (SELECT COALESCE(-SUM(p.amount), 0) FROM postings p JOIN lots l ON l.id = p.lot_id \
              WHERE p.tx_id = j.id AND p.amount < 0 AND l.expires_at IS NOT NULL), \
           (SELECT COALESCE(-SUM(p.amount), 0) FROM postings p JOIN lots l ON l.id = p.lot_id \
              JOIN journal o ON o.id = l.origin_tx \
              WHERE p.tx_id = j.id AND p.amount < 0 AND l.expires_at IS NOT NULL \
                AND o.kind = 'opening' AND o.actor = ?2) \
         FROM journal j LEFT JOIN documents d ON d.id = j.document_id WHERE j.id = ?1",
    )?;
    let payload = st.query_row(params![tx_id, register], |row| {
        let kind: String = row.get(0)?;
        let amount: i64 = row.get(1)?;
        let at: i64 = row.get(2)?;
        let customer: i64 = row.get(3)?;
        let reverses: Option<i64> = row.get(4)?;
        let comment = super::explanation_at(row, 5)?.summary;
        let source: Option<String> = row.get(6)?;
        let doc_id: Option<String> = row.get(7)?;
        let number: Option<String> = row.get(8)?;
        let expires: Option<i64> = row.get(9)?;
        let card: Option<String> = row.get(10)?;
        let onec_id: Option<String> = row.get(11)?;
        let from_burning: i64 = row.get(12)?;
        let from_burning_1c: i64 = row.get(13)?;
        Ok(serde_json::json!({
            "tx_id": tx_id,
            "kind": kind,
            "points": amount,
            "amount_kopecks": amount.saturating_mul(r.point_value),
            "at": from_ts(at).to_rfc3339(),
            "expires_at": expires.map(|e| from_ts(e).to_rfc3339()),
            "customer_id": customer,
            "card": card,
            "onec_id": onec_id,
            "reverses": reverses,
            "from_burning": from_burning,
            "from_burning_1c": from_burning_1c,
            "document": {"source": source, "doc_id": doc_id, "number": number},
            "comment": comment,
        }))
    });
    Ok(payload.optional()?.map(|p| p.to_string()))
}

/// The newest journal id, to find what a write added.
pub(crate) fn journal_head(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM journal")?
        .query_row([], |r| r.get(0))?)
}

#[cfg(test)]
mod bonus_ref_tests {
    use super::BonusRef;

    /// A reference leaves out a one-ruble point and keeps any other value; every form written
    /// before reads, and a payload stored whole is never taken for a reference.
    #[test]
    fn a_reference_leaves_out_only_the_one_ruble_point() {
        let write = |v: i64| {
            serde_json::to_string(&BonusRef {
                tx_id: None,
                point_value: v,
                register: None,
                system: Some("onec".into()),
            })
            .unwrap()
        };
        assert_eq!(write(100), r#"{"s":"onec"}"#);
        assert_eq!(write(150), r#"{"v":150,"s":"onec"}"#);
        for (stored, v) in [
            (r#"{"s":"onec"}"#, 100),
            (r#"{"v":150,"s":"onec"}"#, 150),
            (r#"{"v":100,"s":"onec"}"#, 100),
            (
                r#"{"tx_id":7,"point_value":50,"register":"onec:odata:bonus"}"#,
                50,
            ),
        ] {
            let r: BonusRef = serde_json::from_str(stored).unwrap();
            assert_eq!(r.point_value, v, "{stored}");
        }
        let whole = r#"{"tx_id":7,"kind":"accrual","points":10,"amount_kopecks":1000}"#;
        assert!(serde_json::from_str::<BonusRef>(whole).is_err());
        assert!(BonusRef::read(whole).is_none());
    }

    /// The reference of the default 1C base at a one-ruble point is stored as nothing and
    /// reads back as itself; any other reference keeps its JSON, which is never empty.
    #[test]
    fn the_commonest_reference_is_stored_as_nothing() {
        let r = |v: i64, system: Option<&str>| BonusRef {
            tx_id: None,
            point_value: v,
            register: None,
            system: system.map(str::to_string),
        };
        assert_eq!(r(100, Some("onec")).stored(), "");
        let back = BonusRef::read("").unwrap();
        assert_eq!(
            (
                back.point_value,
                back.system.as_deref(),
                back.tx_id,
                back.register
            ),
            (100, Some("onec"), None, None)
        );
        for other in [r(150, Some("onec")), r(100, Some("onec:partner")), r(100, None)] {
            let stored = other.stored();
            assert!(!stored.is_empty(), "{stored}");
            let back = BonusRef::read(&stored).unwrap();
            assert_eq!((back.point_value, back.system), (other.point_value, other.system));
        }
        assert_eq!(r(100, None).stored(), "{}");
    }
}
