//! `kopilka reconcile`: does the ledger hold exactly what the source holds, day by day?
//!
//! The source's truth is either re-read from it (the 1C OData connector lists the period's
//! documents) or, where the source cannot be asked again (files), what the source said at
//! ingest (`source_log`). Every difference names the document causing it: missing in the
//! ledger, changed after posting, quarantined, dead-lettered on the way back to 1C.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rusqlite::params;
use serde::Serialize;

use super::{Ledger, Result, from_ts, ts};

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
    pub document: String,
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
    pub points_accrued: i64,
    pub points_redeemed: i64,
    pub points_expired: i64,
    pub points_reversed: i64,
    pub postings_delivered: i64,
    pub postings_pending: i64,
    pub postings_dead: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
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

impl Ledger {
    /// Reconciles the business days `from..=to`. `source_truth` is the source's own list
    /// for the period (documents of the systems it names); `None` uses what was recorded at
    /// ingest.
    pub fn reconcile(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        tz: Tz,
        source_truth: Option<&[SourceDoc]>,
    ) -> Result<Reconciliation> {
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
        let mut out = Reconciliation::default();

        // the source's side
        let recorded: Vec<SourceDoc>;
        let truth: &[SourceDoc] = match source_truth {
            Some(t) => {
                out.truth = "re-read from the source".into();
                t
            }
            None => {
                out.truth = "recorded at ingest".into();
                let mut st = self.conn.prepare(
                    "SELECT source, doc_id, version, kind, occurred_at, total, in_force FROM source_log \
                     WHERE occurred_at >= ?1 AND occurred_at < ?2",
                )?;
                recorded = st
                    .query_map(params![ts(start), ts(end)], |r| {
                        Ok(SourceDoc {
                            source: r.get(0)?,
                            doc_id: r.get(1)?,
                            version: r.get(2)?,
                            kind: r.get(3)?,
                            occurred_at: r.get::<_, Option<i64>>(4)?.map(from_ts),
                            total: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                            in_force: r.get(6)?,
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
        }
        let mut ledger: HashMap<(String, String), LedgerDoc> = HashMap::new();
        {
            let mut st = self.conn.prepare(
                "SELECT source, doc_id, version, kind, state, occurred_at, total FROM documents \
                 WHERE occurred_at >= ?1 AND occurred_at < ?2",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    LedgerDoc {
                        version: r.get(2)?,
                        kind: r.get(3)?,
                        active: r.get::<_, String>(4)? == "active",
                        occurred_at: r.get::<_, Option<i64>>(5)?.map(from_ts),
                        total: r.get(6)?,
                    },
                ))
            })?;
            for row in rows {
                let (k, v) = row?;
                ledger.insert(k, v);
            }
        }
        let quarantined = |source: &str, doc_id: &str| -> Result<Option<String>> {
            use rusqlite::OptionalExtension;
            Ok(self
                .conn
                .prepare_cached(
                    "SELECT reason FROM quarantine WHERE source = ?1 AND doc_ref = ?2 AND resolved_at IS NULL",
                )?
                .query_row(params![source, doc_id], |r| r.get(0))
                .optional()?)
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
            let diff = |kind, detail: String| Difference {
                day,
                kind,
                source: s.source.clone(),
                document: s.doc_id.clone(),
                detail,
            };
            if let Some(reason) = quarantined(&s.source, &s.doc_id)? {
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
                    out.differences.push(Difference {
                        day: l.occurred_at.map(day_of),
                        kind: DiffKind::NotInSource,
                        source: source.clone(),
                        document: doc_id.clone(),
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

        // points per day
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
                        "accrual" | "bonus" => r.points_accrued += sum,
                        "redemption" => r.points_redeemed -= sum,
                        "expiry" => r.points_expired -= sum,
                        "reversal" => r.points_reversed -= sum,
                        _ => {}
                    }
                }
            }
        }
        // what went (or must go) back to 1C
        {
            let mut st = self.conn.prepare(
                "SELECT created_at, state, destination, idem_key, last_error FROM outbox \
                 WHERE destination LIKE 'onec:%' AND created_at >= ?1 AND created_at < ?2",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((
                    from_ts(r.get(0)?),
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            for row in rows {
                let (at, state, dest, key, error) = row?;
                let day = day_of(at);
                if let Some(r) = days.get_mut(&day) {
                    match state.as_str() {
                        "delivered" => r.postings_delivered += 1,
                        "pending" => r.postings_pending += 1,
                        "dead" => r.postings_dead += 1,
                        _ => {}
                    }
                }
                if state == "dead" {
                    out.differences.push(Difference {
                        day: Some(day),
                        kind: DiffKind::DeadLettered,
                        source: dest,
                        document: key,
                        detail: error.unwrap_or_default(),
                    });
                }
            }
        }
        // documents refused before they could be read (no date known): reported when first seen
        {
            let mut st = self.conn.prepare(
                "SELECT q.source, q.doc_ref, q.reason, q.first_seen_at FROM quarantine q \
                 WHERE q.resolved_at IS NULL AND q.first_seen_at >= ?1 AND q.first_seen_at < ?2 \
                 AND NOT EXISTS (SELECT 1 FROM source_log s WHERE s.source = q.source AND s.doc_id = q.doc_ref)",
            )?;
            let rows = st.query_map(params![ts(start), ts(end)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    from_ts(r.get(3)?),
                ))
            })?;
            for row in rows {
                let (source, doc_ref, reason, seen) = row?;
                if truth.iter().any(|d| d.source == source && d.doc_id == doc_ref) {
                    continue;
                }
                out.differences.push(Difference {
                    day: Some(day_of(seen)),
                    kind: DiffKind::Quarantined,
                    source,
                    document: doc_ref,
                    detail: reason,
                });
            }
        }
        // receipts matched to a committed hold whose points differ from the commit
        {
            let mut st = self.conn.prepare(
                "SELECT d.source, d.doc_id, d.occurred_at, h.id, h.committed_points, d.points_redeemed \
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
                ))
            })?;
            for row in rows {
                let (source, doc_id, at, hold, committed, receipt) = row?;
                out.differences.push(Difference {
                    day: Some(day_of(at)),
                    kind: DiffKind::HoldDiffers,
                    source,
                    document: doc_id,
                    detail: format!(
                        "hold {hold} committed {committed} points, the receipt says {receipt}; the ledger kept {}",
                        committed.max(receipt)
                    ),
                });
            }
        }
        for row in days.values() {
            let explained = out
                .differences
                .iter()
                .any(|x| x.day == Some(row.day) && x.kind != DiffKind::DeadLettered);
            if row.source_total_kopecks != row.ledger_total_kopecks && !explained {
                out.differences.push(Difference {
                    day: Some(row.day),
                    kind: DiffKind::Unexplained,
                    source: "(all)".into(),
                    document: String::new(),
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
}
