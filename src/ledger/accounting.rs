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
use rusqlite::{Connection, params};
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

/// One posting as made (or to be made).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Posting {
    pub entity: String,
    pub day: NaiveDate,
    /// 1 for the day's posting, 2… for adjusting ones.
    pub seq: i64,
    /// Movement → points (signed; a negative adjusting amount is a reversal, красное сторно).
    pub points: BTreeMap<String, i64>,
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
}

impl Books<'_> {
    fn entity(&self, source: Option<&str>) -> String {
        source
            .and_then(|s| self.entities.get(s))
            .cloned()
            .unwrap_or_else(|| self.default_entity.to_string())
    }

    fn day_bounds(&self, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = |d: NaiveDate| {
            self.tz
                .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default()
        };
        (start(day), start(day.succ_opt().unwrap_or(day)))
    }
}

/// Movements per entity for one business day, from the journal.
pub(crate) fn day_movements(
    conn: &Connection,
    books: &Books<'_>,
    day: NaiveDate,
) -> Result<BTreeMap<String, BTreeMap<String, i64>>> {
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
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for row in rows {
        let (source, kind, sum) = row?;
        if let Some((movement, sign)) = movement_of(&kind) {
            *out.entry(books.entity(source.as_deref()))
                .or_default()
                .entry(movement.to_string())
                .or_default() += sign * sum;
        }
    }
    Ok(out)
}

impl Ledger {
    /// Makes the postings that are due: for every day from `lookback` days ago to
    /// yesterday (local), the difference between the journal and what was already
    /// posted, per entity. Returns the postings made.
    pub fn post_accounting(
        &mut self,
        books: &Books<'_>,
        lookback_days: i64,
        ctx: &IngestContext<'_>,
    ) -> Result<Vec<Posting>> {
        let now = ctx.now;
        let today = now.with_timezone(&books.tz).date_naive();
        let tx = self.conn.transaction()?;
        let uid = super::ledger_uid(&tx)?;
        let mut made = Vec::new();
        for back in (1..=lookback_days).rev() {
            let day = today - chrono::Duration::days(back);
            let current = day_movements(&tx, books, day)?;
            let mut posted: BTreeMap<String, (i64, BTreeMap<String, i64>)> = BTreeMap::new();
            {
                let mut st = tx.prepare_cached(
                    "SELECT entity, seq, movements FROM accounting_postings WHERE day = ?1",
                )?;
                let rows = st.query_map([day.to_string()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                for row in rows {
                    let (entity, seq, movements) = row?;
                    let m: BTreeMap<String, i64> = serde_json::from_str(&movements).unwrap_or_default();
                    let e = posted.entry(entity).or_default();
                    e.0 = e.0.max(seq);
                    for (k, v) in m {
                        *e.1.entry(k).or_default() += v;
                    }
                }
            }
            let entities: std::collections::BTreeSet<&String> = current.keys().chain(posted.keys()).collect();
            for entity in entities {
                let now_totals = current.get(entity).cloned().unwrap_or_default();
                let before = posted.get(entity).cloned().unwrap_or_default();
                let mut diff: BTreeMap<String, i64> = BTreeMap::new();
                for k in now_totals.keys().chain(before.1.keys()) {
                    let d = now_totals.get(k).copied().unwrap_or(0) - before.1.get(k).copied().unwrap_or(0);
                    if d != 0 {
                        diff.insert(k.clone(), d);
                    }
                }
                if diff.is_empty() {
                    continue;
                }
                let seq = before.0 + 1;
                let movements = serde_json::to_string(&diff).unwrap_or_default();
                let outbox_id = match books.destination {
                    Some(dest) => {
                        let payload = serde_json::json!({
                            "entity": entity,
                            "day": day.to_string(),
                            "seq": seq,
                            "adjusting": seq > 1,
                            "point_value_kopecks": books.point_value_kopecks,
                            "points": diff,
                        });
                        super::outbox::enqueue(
                            &tx,
                            dest,
                            &format!("accounting:{uid}:{entity}:{day}:{seq}"),
                            None,
                            &payload.to_string(),
                            now,
                        )?
                    }
                    None => None,
                };
                tx.prepare_cached(
                    "INSERT INTO accounting_postings (entity, day, seq, movements, outbox_id, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    entity,
                    day.to_string(),
                    seq,
                    movements,
                    outbox_id,
                    ts(now)
                ])?;
                made.push(Posting {
                    entity: entity.clone(),
                    day,
                    seq,
                    points: diff,
                });
            }
        }
        tx.commit()?;
        Ok(made)
    }

    /// Postings made for days in `[from, to]`, in order.
    pub fn postings(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<PostingRecord>> {
        let mut st = self.conn.prepare(
            "SELECT entity, day, seq, movements, outbox_id, created_at FROM accounting_postings \
             WHERE day >= ?1 AND day <= ?2 ORDER BY day, entity, seq",
        )?;
        let rows = st.query_map([from.to_string(), to.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (entity, day, seq, movements, outbox, created) = row?;
            out.push(PostingRecord {
                posting: Posting {
                    entity,
                    day: day.parse().unwrap_or_default(),
                    seq,
                    points: serde_json::from_str(&movements).unwrap_or_default(),
                },
                outbox_id: outbox,
                created_at: from_ts(created),
            });
        }
        Ok(out)
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
        "SELECT j.id, j.kind, j.amount, j.effective_at, j.customer_id, j.reverses, j.explanation, \
           d.source, d.doc_id, d.number, (SELECT MAX(expires_at) FROM lots WHERE origin_tx = j.id), \
           (SELECT value FROM customer_keys WHERE customer_id = j.customer_id AND kind = 'card' LIMIT 1), \
           (SELECT value FROM customer_keys WHERE customer_id = j.customer_id AND kind = 'onec' LIMIT 1), \
           (SELECT r.kind FROM journal r WHERE r.id = j.reverses), \
           (SELECT COALESCE(-SUM(p.amount), 0) FROM postings p JOIN lots l ON l.id = p.lot_id \
              WHERE p.tx_id = j.id AND p.amount < 0 AND l.expires_at IS NOT NULL), \
           (SELECT COALESCE(-SUM(p.amount), 0) FROM postings p JOIN lots l ON l.id = p.lot_id \
              JOIN journal o ON o.id = l.origin_tx \
              WHERE p.tx_id = j.id AND p.amount < 0 AND l.expires_at IS NOT NULL \
                AND o.kind = 'opening' AND o.actor = ?2) \
         FROM journal j LEFT JOIN documents d ON d.id = j.document_id WHERE j.id > ?1 AND j.amount != 0 ORDER BY j.id",
    )?;
    let onec = ctx.destinations.onec_system.as_deref();
    let register_source = onec.map(crate::ledger::opening_source_from_register);
    type Row = (
        i64,
        String,
        i64,
        i64,
        i64,
        Option<i64>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
        i64,
    );
    let rows: Vec<Row> = st
        .query_map(params![since, register_source], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
                r.get(12)?,
                r.get(13)?,
                r.get(14)?,
                r.get(15)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let pv = ctx.rules.point_value().0;
    let uid = super::ledger_uid(conn)?;
    let mut n = 0;
    for (
        id,
        kind,
        amount,
        at,
        customer,
        reverses,
        explanation,
        source,
        doc_id,
        number,
        expires,
        card,
        onec_id,
        reversed_kind,
        from_burning,
        from_burning_1c,
    ) in rows
    {
        let paid_in_1c = kind == "redemption" || reversed_kind.as_deref() == Some("redemption");
        if paid_in_1c && onec.is_some() && source.as_deref() == onec {
            continue;
        }
        let summary = serde_json::from_str::<crate::core::journal::Explanation>(&explanation)
            .map(|e| e.summary)
            .unwrap_or(explanation);
        let payload = serde_json::json!({
            "tx_id": id,
            "kind": kind,
            "points": amount,
            "amount_kopecks": amount.saturating_mul(pv),
            "at": from_ts(at).to_rfc3339(),
            "expires_at": expires.map(|e| from_ts(e).to_rfc3339()),
            "customer_id": customer,
            "card": card,
            "onec_id": onec_id,
            "reverses": reverses,
            "from_burning": from_burning,
            "from_burning_1c": from_burning_1c,
            "document": {"source": source, "doc_id": doc_id, "number": number},
            "comment": summary,
        });
        if super::outbox::enqueue(
            conn,
            dest,
            &format!("onec:bonus:{uid}:tx{id}"),
            None,
            &payload.to_string(),
            ctx.now,
        )?
        .is_some()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// The newest journal id, to find what a write added.
pub(crate) fn journal_head(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM journal")?
        .query_row([], |r| r.get(0))?)
}
