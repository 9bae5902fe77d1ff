//! `kopilka reconcile`: does the ledger hold exactly what the source holds, and the books
//! what the ledger holds, day by day?
//!
//! The source's truth is either re-read from it (the 1C OData connector lists the period's
//! documents) or, where the source cannot be asked again (files), what the source said at
//! ingest (the documents as the ledger holds them, overlaid by `source_log`: what a source
//! said of a document the ledger could not take). Every difference names the document
//! causing it as 1C shows it (kind, number, date, then the id): missing in the ledger,
//! changed after posting, quarantined (on the document's own date), dead-lettered on the way
//! back to 1C. A business day whose movements no posting carries is a difference too, so is
//! a day whose posting no longer equals its movements.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rusqlite::params;
use serde::Serialize;

use super::accounting::{
    Books, PostingKind, movements_before, movements_by_day, posted_through, postings_covering,
};
use super::{Ledger, Result, from_ts, ts};
use crate::core::document::{DocKind, document_title};

/// A document as its source holds it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceDoc {
    pub source: String,
    pub doc_id: String,
    pub version: String,
    /// `sale` or `return`.
    pub kind: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub total: i64,
    /// Posted and not deletion-marked.
    pub in_force: bool,
    /// The number and kind as 1C shows them (`ЧК-000777`, `ЧекККМ`), when the source says.
    pub number: Option<String>,
    pub source_kind: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// The source has it in force; the ledger does not.
    MissingInLedger,
    /// The source's version (or posting state) differs from what the ledger applied.
    ChangedAfterPosting,
    /// It could not be applied; the reason is in quarantine.
    Quarantined,
    /// A bonus document or posting for 1C failed for good.
    DeadLettered,
    /// The ledger has it in force; the source no longer does.
    NotInSource,
    /// A business day's movements that no posting carries, or a day's posting that no
    /// longer equals its movements.
    NotPosted,
    /// A day's totals differ and no document explains it.
    Unexplained,
    /// The receipt that used a committed hold says other points than the commit took (the
    /// commit stands: it is what the till was told).
    HoldDiffers,
}

impl DiffKind {
    pub fn label(self) -> &'static str {
        match self {
            DiffKind::MissingInLedger => "missing in ledger",
            DiffKind::ChangedAfterPosting => "changed after posting",
            DiffKind::Quarantined => "quarantined",
            DiffKind::DeadLettered => "dead-lettered",
            DiffKind::NotInSource => "not in the source",
            DiffKind::NotPosted => "not posted",
            DiffKind::Unexplained => "unexplained",
            DiffKind::HoldDiffers => "hold differs from receipt",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub day: Option<NaiveDate>,
    pub kind: DiffKind,
    pub source: String,
    /// The id kopilka knows it by (a 1C `Ref_Key`, an outbox key, a legal entity).
    pub document: String,
    /// How a person finds it: «ЧекККМ ЧК-000777 от 15.11.2026 (onec:…)».
    pub title: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DayRow {
    pub day: NaiveDate,
    pub source_documents: i64,
    /// Sales minus returns, as the source has them.
    pub source_total_kopecks: i64,
    pub ledger_sales: i64,
    pub ledger_returns: i64,
    /// Sales minus returns in force in the ledger.
    pub ledger_total_kopecks: i64,
    /// The day's points, by the names and signs of `kopilka summary`.
    pub points_accrued: i64,
    pub points_bonus: i64,
    pub points_redeemed: i64,
    pub points_expired: i64,
    pub points_reversed: i64,
    pub points_adjusted: i64,
    pub points_opening: i64,
    pub points_written_off: i64,
    /// What went to 1C *for* this day, by delivery state: the bonus documents of its
    /// movements and its postings, whenever they were made.
    pub postings_delivered: i64,
    pub postings_pending: i64,
    pub postings_dead: i64,
    /// Whether the books hold the day: `posted` (its posting equals its movements),
    /// `history` (in a posting of the days before the posting window), `not posted`,
    /// `differs`, `not due` (today or later), or empty when nothing moved.
    pub books: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    /// The period, both days inclusive.
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// Where the source's side came from: `re-read from the source` or `recorded at ingest`.
    pub truth: String,
    pub days: Vec<DayRow>,
    pub differences: Vec<Difference>,
}

impl Reconciliation {
    pub fn clean(&self) -> bool {
        self.differences.is_empty()
    }
}

fn day_start(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

fn signed(kind: Option<&str>, total: i64) -> i64 {
    if kind == Some("return") { -total } else { total }
}

/// What names a document for a person, gathered from wherever kopilka saw it.
#[derive(Default)]
struct Known {
    kind: Option<String>,
    number: Option<String>,
    occurred_at: Option<DateTime<Utc>>,
}

impl Ledger {
    /// Reconciles the business days `from..=to`. `source_truth` is the source's own list
    /// for the period (documents of the systems it names); `None` uses what was recorded at
    /// ingest. Days from `today` on are not due for posting yet.
    pub fn reconcile(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        books: &Books<'_>,
        today: NaiveDate,
        source_truth: Option<&[SourceDoc]>,
    ) -> Result<Reconciliation> {
        let tz: Tz = books.tz;
        let (start, end) = (day_start(tz, from), day_start(tz, to.succ_opt().unwrap_or(to)));
        let day_of = |t: DateTime<Utc>| t.with_timezone(&tz).date_naive();
        let mut days: BTreeMap<NaiveDate, DayRow> = BTreeMap::new();
        let mut d = from;
        while d <= to {
            days.insert(
                d,
                DayRow {
                    day: d,
                    ..Default::default()
                },
            );
            d = match d.succ_opt() {
                Some(n) => n,
                None => break,
            };
        }
        let mut out = Reconciliation {
            from,
            to,
            ..Default::default()
        };

        // the source's side
        let recorded: Vec<SourceDoc>;
        let truth: &[SourceDoc] = match source_truth {
            Some(t) => {
                out.truth = "re-read from the source".into();
                t
            }
            None => {
                out.truth = "recorded at ingest".into();
                // what the ledger holds as each source sent it, overlaid by what a source said
                // of a document the ledger could not take (`source_log`, quarantined ones)
                let mut st = self.conn.prepare(
                    "SELECT source, doc_id, version, kind, occurred_at, total, in_force FROM source_log \
                     WHERE occurred_at >= ?1 AND occurred_at < ?2 \
                     UNION ALL \
                     SELECT d.source, d.doc_id, d.version, d.kind, d.occurred_at, d.total, d.state = 'active' \
                     FROM documents d WHERE d.occurred_at >= ?1 AND d.occurred_at < ?2 AND d.source != ?3 \
                     AND NOT EXISTS (SELECT 1 FROM source_log s WHERE s.source = d.source AND s.doc_id = d.doc_id)",
                )?;
                recorded = st
                    .query_map(params![ts(start), ts(end), super::API_SOURCE], |r| {
                        Ok(SourceDoc {
                            source: r.get(0)?,
                            doc_id: r.get(1)?,
                            version: super::version_at(r, 2)?,
                            kind: r.get(3)?,
                            occurred_at: r.get::<_, Option<i64>>(4)?.map(from_ts),
                            total: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                            in_force: r.get(6)?,
                            number: None,
                            source_kind: None,
                        })
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                &recorded
            }
        };
        let systems: std::collections::BTreeSet<&str> = truth.iter().map(|d| d.source.as_str()).collect();

        // the ledger's side
        struct LedgerDoc {
            version: String,
            kind: Option<String>,
            active: bool,
            occurred_at: Option<DateTime<Utc>>,
            total: i64,
            number: Option<String>,
        }
        let mut ledger: HashMap<(String, String), LedgerDoc> = HashMap::new();
        {
            let mut st = self.conn.prepare(
                // a till's or the site's redemption through a hold (`api`) is no sale and has
                // no counterpart in a source: 1C's receipt that used it is the sale
                "SELECT source, doc_id, version, kind, state, occurred_at, total, number FROM documents \
                 WHERE occurred_at >= ?1 AND occurred_at < ?2 AND source != ?3",
            )?;
            let rows = st.query_map(params![ts(start), ts(end), super::API_SOURCE], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    LedgerDoc {
                        version: super::version_at(r, 2)?,
                        kind: r.get(3)?,
                        active: r.get::<_, String>(4)? == "active",
                        occurred_at: r.get::<_, Option<i64>>(5)?.map(from_ts),
                        total: r.get(6)?,
                        number: r.get(7)?,
                    },
                ))
            })?;
            for row in rows {
                let (k, v) = row?;
                ledger.insert(k, v);
            }
        }
        let quarantined = |source: &str, doc_id: &str| -> Result<Option<(String, Known)>> {
            use rusqlite::OptionalExtension;
            Ok(self
                .conn
                .prepare_cached(
                    "SELECT reason, doc_kind, number, occurred_at FROM quarantine \
                     WHERE source = ?1 AND doc_ref = ?2 AND resolved_at IS NULL",
                )?
                .query_row(params![source, doc_id], |r| {
                    Ok((
                        r.get(0)?,
                        Known {
                            kind: r.get(1)?,
                            number: r.get(2)?,
                            occurred_at: r.get::<_, Option<i64>>(3)?.map(from_ts),
                        },
                    ))
                })
                .optional()?)
        };
        let title = |source: &str, id: &str, k: &Known| {
            document_title(
                k.kind.as_deref(),
                k.number.as_deref(),
                k.occurred_at.map(day_of),
                source,
                id,
            )
        };

        for s in truth {
            let day = s.occurred_at.map(day_of);
            if let Some(row) = day.and_then(|d| days.get_mut(&d))
                && s.in_force
            {
                row.source_documents += 1;
                row.source_total_kopecks += signed(s.kind.as_deref(), s.total);
            }
            let key = (s.source.clone(), s.doc_id.clone());
            let l = ledger.get(&key);
            let mut known = Known {
                kind: s
                    .source_kind
                    .clone()
                    .or_else(|| s.kind.as_deref().and_then(DocKind::label_of).map(str::to_string)),
                number: s.number.clone().or_else(|| l.and_then(|l| l.number.clone())),
                occurred_at: s.occurred_at,
            };
            let q = quarantined(&s.source, &s.doc_id)?;
            if let Some((_, qk)) = &q {
                known.kind = qk.kind.clone().or(known.kind);
                known.number = known.number.or_else(|| qk.number.clone());
            }
            let diff = |kind, detail: String| Difference {
                day,
                kind,
                source: s.source.clone(),
                document: s.doc_id.clone(),
                title: title(&s.source, &s.doc_id, &known),
                detail,
            };
            if let Some((reason, _)) = q {
                out.differences.push(diff(DiffKind::Quarantined, reason));
                continue;
            }
            match (s.in_force, l) {
                (true, None) => out.differences.push(diff(
                    DiffKind::MissingInLedger,
                    "in force at the source, never applied".into(),
                )),
                (true, Some(l)) if !l.active => out.differences.push(diff(
                    DiffKind::ChangedAfterPosting,
                    "in force at the source, void in the ledger".into(),
                )),
                (true, Some(l)) if l.version != s.version => out.differences.push(diff(
                    DiffKind::ChangedAfterPosting,
                    format!(
                        "the source has version {}, the ledger applied {}",
                        s.version, l.version
                    ),
                )),
                (false, Some(l)) if l.active => out.differences.push(diff(
                    DiffKind::ChangedAfterPosting,
                    "unposted or deleted at the source, still in force in the ledger".into(),
                )),
                _ => {}
            }
        }
        if source_truth.is_some() {
            let known: std::collections::HashSet<(&str, &str)> = truth
                .iter()
                .map(|d| (d.source.as_str(), d.doc_id.as_str()))
                .collect();
            for ((source, doc_id), l) in &ledger {
                if l.active
                    && systems.contains(source.as_str())
                    && !known.contains(&(source.as_str(), doc_id.as_str()))
                {
                    let k = Known {
                        kind: l.kind.as_deref().and_then(DocKind::label_of).map(str::to_string),
                        number: l.number.clone(),
                        occurred_at: l.occurred_at,
                    };
                    out.differences.push(Difference {
                        day: l.occurred_at.map(day_of),
                        kind: DiffKind::NotInSource,
                        source: source.clone(),
                        document: doc_id.clone(),
                        title: title(source, doc_id, &k),
                        detail: "in force in the ledger, gone from the source (deleted?)".into(),
                    });
                }
            }
        }
        for l in ledger.values() {
            if let Some(row) = l.occurred_at.map(day_of).and_then(|d| days.get_mut(&d))
                && l.active
            {
                match l.kind.as_deref() {
                    Some("sale") => row.ledger_sales += 1,
                    Some("return") => row.ledger_returns += 1,
                    _ => {}
                }
                row.ledger_total_kopecks += signed(l.kind.as_deref(), l.total);
            }
        }

        // points per day, by summary's names
        {
            let mut st = self.conn.prepare(
                "SELECT (effective_at / 3600) * 3600, kind, SUM(amount) FROM journal \
                 WHERE effective_at >= ?1 AND effective_at < ?2 GROUP BY 1, 2",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((from_ts(r.get(0)?), r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            for row in rows {
                let (hour, kind, sum) = row?;
                if let Some(r) = days.get_mut(&day_of(hour)) {
                    match kind.as_str() {
                        "accrual" => r.points_accrued += sum,
                        "bonus" => r.points_bonus += sum,
                        "redemption" => r.points_redeemed -= sum,
                        "expiry" => r.points_expired -= sum,
                        "reversal" => r.points_reversed -= sum,
                        "adjustment" => r.points_adjusted += sum,
                        "opening" => r.points_opening += sum,
                        "writeoff" => r.points_written_off += sum,
                        _ => {}
                    }
                }
            }
        }
        // what went (or must go) back to 1C, counted for the day it is for: a bonus
        // document for the day of its movement, a posting for its date
        {
            let mut count =
                |day: NaiveDate, state: &str, dest: String, key: String, error: Option<String>| {
                    if let Some(r) = days.get_mut(&day) {
                        match state {
                            "delivered" => r.postings_delivered += 1,
                            "pending" => r.postings_pending += 1,
                            "dead" => r.postings_dead += 1,
                            _ => {}
                        }
                    }
                    if state == "dead" && days.contains_key(&day) {
                        out.differences.push(Difference {
                            day: Some(day),
                            kind: DiffKind::DeadLettered,
                            source: dest,
                            title: key.clone(),
                            document: key,
                            detail: error.unwrap_or_default(),
                        });
                    }
                };
            type Row = (i64, String, String, String, Option<String>);
            let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            };
            // bonus documents, by their journal transaction's day; their key carries this
            // ledger's id since migration 9 ('onec:bonus:tx<id>' before it) and is stored
            // short since migration 26 ('b:<id>', read as the full one)
            let uid = super::ledger_uid(&self.conn)?;
            let mut st = self.conn.prepare(
                "SELECT j.effective_at, o.state, o.destination, \
                   CASE WHEN o.idem_key = 'b:' || j.id THEN 'onec:bonus:' || ?3 || ':tx' || j.id ELSE o.idem_key END, \
                   o.last_error FROM journal j \
                 JOIN outbox o ON o.idem_key IN ('b:' || j.id, 'onec:bonus:' || ?3 || ':tx' || j.id, 'onec:bonus:tx' || j.id) \
                 WHERE j.effective_at >= ?1 AND j.effective_at < ?2",
            )?;
            for row in st.query_map(params![ts(start), ts(end), uid], read)? {
                let (at, state, dest, key, error) = row?;
                count(day_of(from_ts(at)), &state, dest, key, error);
            }
            // postings, by their date
            let mut st = self.conn.prepare(
                "SELECT p.day, o.state, o.destination, o.idem_key, o.last_error FROM accounting_postings p \
                 JOIN outbox o ON o.id = p.outbox_id WHERE p.day >= ?1 AND p.day <= ?2",
            )?;
            let rows = st.query_map([from.to_string(), to.to_string()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            for row in rows {
                let (day, state, dest, key, error) = row?;
                if let Ok(day) = day.parse::<NaiveDate>() {
                    count(day, &state, dest, key, error);
                }
            }
            // anything else for 1C (no journal transaction or posting behind it): its day made.
            // Every bonus document names a journal transaction (`ledger verify` checks it), so
            // none is here — and the index this reads by holds none (migration 26).
            let mut st = self.conn.prepare(
                "SELECT o.created_at, o.state, o.destination, o.idem_key, o.last_error FROM outbox o \
                 WHERE o.destination LIKE 'onec:%' AND o.destination != 'onec:bonus' \
                 AND o.created_at >= ?1 AND o.created_at < ?2 \
                 AND NOT EXISTS (SELECT 1 FROM accounting_postings p WHERE p.outbox_id = o.id)",
            )?;
            for row in st.query_map(params![ts(start), ts(end)], read)? {
                let (at, state, dest, key, error) = row?;
                count(day_of(from_ts(at)), &state, dest, key, error);
            }
        }
        // quarantined documents the source's side did not list: on their own date when it
        // could be read, on the day they arrived otherwise
        {
            let mut st = self.conn.prepare(
                "SELECT q.source, q.doc_ref, q.reason, q.doc_kind, q.number, \
                   COALESCE(q.occurred_at, s.occurred_at), q.first_seen_at FROM quarantine q \
                 LEFT JOIN source_log s ON s.source = q.source AND s.doc_id = q.doc_ref \
                 WHERE q.resolved_at IS NULL \
                 AND COALESCE(q.occurred_at, s.occurred_at, q.first_seen_at) >= ?1 \
                 AND COALESCE(q.occurred_at, s.occurred_at, q.first_seen_at) < ?2",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    Known {
                        kind: r.get(3)?,
                        number: r.get(4)?,
                        occurred_at: r.get::<_, Option<i64>>(5)?.map(from_ts),
                    },
                    from_ts(r.get(6)?),
                ))
            })?;
            for row in rows {
                let (source, doc_ref, reason, known, seen) = row?;
                if truth.iter().any(|d| d.source == source && d.doc_id == doc_ref) {
                    continue;
                }
                let (day, detail) = match known.occurred_at {
                    Some(at) => (day_of(at), reason),
                    None => (
                        day_of(seen),
                        format!("{reason} (its date could not be read: listed on the day it arrived)"),
                    ),
                };
                out.differences.push(Difference {
                    day: Some(day),
                    kind: DiffKind::Quarantined,
                    title: title(&source, &doc_ref, &known),
                    source,
                    document: doc_ref,
                    detail,
                });
            }
        }
        // receipts matched to a committed hold whose points differ from the commit
        {
            let mut st = self.conn.prepare(
                "SELECT d.source, d.doc_id, d.occurred_at, h.id, h.committed_points, d.points_redeemed, d.number \
                 FROM holds h JOIN documents d ON d.id = h.matched_document \
                 WHERE d.occurred_at >= ?1 AND d.occurred_at < ?2 AND d.state = 'active' \
                 AND d.points_redeemed != h.committed_points",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    from_ts(r.get(2)?),
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })?;
            for row in rows {
                let (source, doc_id, at, hold, committed, receipt, number) = row?;
                let known = Known {
                    kind: None,
                    number,
                    occurred_at: Some(at),
                };
                out.differences.push(Difference {
                    day: Some(day_of(at)),
                    kind: DiffKind::HoldDiffers,
                    title: title(&source, &doc_id, &known),
                    source,
                    document: doc_id,
                    detail: format!(
                        "hold {hold} committed {committed} points, the receipt says {receipt}; the ledger kept {}",
                        committed.max(receipt)
                    ),
                });
            }
        }
        self.reconcile_books(books, today, &mut days, &mut out)?;
        for row in days.values() {
            let explained = out.differences.iter().any(|x| {
                x.day == Some(row.day) && !matches!(x.kind, DiffKind::DeadLettered | DiffKind::NotPosted)
            });
            if row.source_total_kopecks != row.ledger_total_kopecks && !explained {
                out.differences.push(Difference {
                    day: Some(row.day),
                    kind: DiffKind::Unexplained,
                    source: "(all)".into(),
                    document: String::new(),
                    title: String::new(),
                    detail: format!(
                        "the source totals {} kopecks, the ledger {}",
                        row.source_total_kopecks, row.ledger_total_kopecks
                    ),
                });
            }
        }
        out.days = days.into_values().collect();
        out.differences
            .sort_by(|a, b| (a.day, &a.source, &a.document).cmp(&(b.day, &b.source, &b.document)));
        Ok(out)
    }

    /// Do the books hold every day's movements? A day before `today` with movements is
    /// `posted` when its day postings equal them, `history` when a history posting covers it
    /// (that posting carries the total of the days before the window), `differs` or `not
    /// posted` otherwise — the last two are differences.
    fn reconcile_books(
        &self,
        books: &Books<'_>,
        today: NaiveDate,
        days: &mut BTreeMap<NaiveDate, DayRow>,
        out: &mut Reconciliation,
    ) -> Result<()> {
        let (Some(&from), Some(&to)) = (days.keys().next(), days.keys().next_back()) else {
            return Ok(());
        };
        // The books are compared over all legal entities together: a ledger-only run
        // (`--ledger`, no configuration) does not know which source belongs to which
        // entity, and the sum over entities is what must equal the journal either way.
        const ALL: &str = "all legal entities";
        let merge = |per: &BTreeMap<String, BTreeMap<String, i64>>| {
            let mut all: BTreeMap<String, i64> = BTreeMap::new();
            for m in per.values() {
                for (k, v) in m {
                    *all.entry(k.clone()).or_default() += v;
                }
            }
            all.retain(|_, v| *v != 0);
            let mut out = BTreeMap::new();
            if !all.is_empty() {
                out.insert(ALL.to_string(), all);
            }
            out
        };
        let moved: BTreeMap<NaiveDate, BTreeMap<String, BTreeMap<String, i64>>> =
            movements_by_day(&self.conn, books, from, to)?
                .iter()
                .map(|(d, per)| (*d, merge(per)))
                .collect();
        let mut by_entity: BTreeMap<String, Vec<super::PostingRecord>> = BTreeMap::new();
        for p in postings_covering(&self.conn, from, to)? {
            by_entity.entry(ALL.to_string()).or_default().push(p);
        }
        for (day, row) in days.iter_mut() {
            let Some(entities) = moved.get(day) else {
                continue;
            };
            if *day >= today {
                row.books = "not due".into();
                continue;
            }
            let mut status = "posted";
            for (entity, movements) in entities {
                let postings = by_entity.get(entity).map(Vec::as_slice).unwrap_or_default();
                let history = postings.iter().any(|p| {
                    p.posting.kind == PostingKind::History
                        && p.posting.first_day <= *day
                        && *day <= p.posting.last_day
                });
                if history {
                    if status == "posted" {
                        status = "history";
                    }
                    continue;
                }
                let mut posted: BTreeMap<String, i64> = BTreeMap::new();
                let mut any = false;
                for p in postings
                    .iter()
                    .filter(|p| p.posting.kind == PostingKind::Day && p.posting.day == *day)
                {
                    any = true;
                    for (m, v) in &p.posting.points {
                        *posted.entry(m.clone()).or_default() += v;
                    }
                }
                posted.retain(|_, v| *v != 0);
                if posted == *movements {
                    continue;
                }
                let points = |m: &BTreeMap<String, i64>| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let detail = if any {
                    status = "differs";
                    format!(
                        "the day's movements are {}; its postings carry {} (`kopilka postings --post` adjusts \
                         days within accounting.lookback_days)",
                        points(movements),
                        points(&posted)
                    )
                } else {
                    status = "not posted";
                    format!("the day's movements ({}) are in no posting", points(movements))
                };
                out.differences.push(Difference {
                    day: Some(*day),
                    kind: DiffKind::NotPosted,
                    source: "books".into(),
                    document: entity.clone(),
                    title: format!("{entity}, {}", day.format("%d.%m.%Y")),
                    detail,
                });
            }
            row.books = status.into();
        }
        // a history posting carries the total of every day up to its last one: those days are
        // in the books only while that total still equals the journal's
        let points = |m: &BTreeMap<String, i64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (entity, postings) in &by_entity {
            let Some(last) = postings
                .iter()
                .filter(|p| p.posting.kind == PostingKind::History)
                .map(|p| p.posting.last_day)
                .max()
            else {
                continue;
            };
            let (journal, _) = movements_before(&self.conn, books, last.succ_opt().unwrap_or(last))?;
            let journal = merge(&journal).remove(entity).unwrap_or_default();
            let posted = merge(&posted_through(&self.conn, last)?)
                .remove(entity)
                .unwrap_or_default();
            if journal != posted {
                let day = last.min(to);
                if let Some(row) = days.get_mut(&day) {
                    row.books = "differs".into();
                }
                out.differences.push(Difference {
                    day: Some(day),
                    kind: DiffKind::NotPosted,
                    source: "books".into(),
                    document: entity.clone(),
                    title: format!("{entity}, days up to {}", last.format("%d.%m.%Y")),
                    detail: format!(
                        "the days up to {last} moved {}; the postings for them carry {} \
                         (`kopilka postings --post` posts the difference)",
                        points(&journal),
                        points(&posted)
                    ),
                });
            }
        }
        Ok(())
    }
}
