//! Totals kept as rows are written (the `totals` table, kept by triggers: schema 27), so the
//! figures a monitor asks for every few seconds — `/metrics`, `/status`, the all-time
//! `kopilka summary` — cost a few rows, not a read of every document, entry and outbox row
//! under the ledger's one lock (a 1M-sale ledger: 2 s and 99 MiB per scrape, holding every
//! till's hold for as long). What changes with the clock alone (a lot becoming available, a
//! hold expiring) is not kept, nor are pending outbox rows (a sale queues and replaces
//! several; keeping them cost the import more than reading them does the monitor): those
//! are read through indexes that hold only the rows still waiting. `ledger verify` recounts
//! every kept total from the rows.
//!
//! The cost, measured: importing 20,000 sales takes 5–10 % longer (the triggers on
//! documents and journal rows); a `/metrics` scrape of a 1M-sale ledger 0.09 s (its 1.55M
//! pending rows counted through `outbox_due`), not 2.7 s, and a till's request behind it
//! waits 1 ms, not 2.5 s (BENCHMARKS.md).

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::query::Summary;
use super::{Ledger, Result, ts};

/// The kept totals whose name starts with `prefix`, as (the rest of the name, count,
/// amount); rows that fell back to nothing are left out, as a count of rows would have them.
pub(super) fn kept(conn: &Connection, prefix: &str) -> Result<Vec<(String, i64, i64)>> {
    let mut st =
        conn.prepare_cached("SELECT name, n, amount FROM totals WHERE n != 0 OR amount != 0 ORDER BY name")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, n, amount) = row?;
        if let Some(rest) = name.strip_prefix(prefix) {
            out.push((rest.to_string(), n, amount));
        }
    }
    Ok(out)
}

impl Ledger {
    /// The all-time summary from the kept totals: the same figures `summary` counts from the
    /// rows for a period, since an all-time flow is a whole-table sum and every balance is
    /// the sum of every entry. What is read besides: the split of balances into pending and
    /// available (through the index of lots that became available later than they were
    /// earned), the debt (through the customers who owe) and the open quarantine.
    pub(super) fn summary_kept(&self, now: DateTime<Utc>) -> Result<Summary> {
        let c = &self.conn;
        let mut s = Summary::default();
        let (mut sales, mut balance, mut undelayed_earned) = (0, 0, i64::MIN);
        for (name, n, amount) in kept(c, "")? {
            let (group, rest) = name.split_once(':').unwrap_or((name.as_str(), ""));
            match (group, rest.split_once(':')) {
                ("journal", _) => {
                    s.add_flow(rest, amount)?;
                    balance += amount;
                }
                ("documents", Some(("active", "sale"))) => {
                    s.sales_count = n;
                    sales = amount;
                }
                ("documents", Some(("active", "return"))) => {
                    s.returns_count = n;
                    s.returns_total_kopecks = amount;
                }
                ("documents", Some(("void", _))) => s.voided_documents += n,
                ("customers", _) => s.customers = n,
                ("lots", _) if rest == "undelayed_earned" => undelayed_earned = amount,
                _ => {}
            }
        }
        s.sales_total_kopecks = sales - s.returns_total_kopecks;
        let now = ts(now);
        let mut pending: i64 = c
            .prepare_cached(
                "SELECT COALESCE(SUM(remaining), 0) FROM lots INDEXED BY lots_available \
                 WHERE available_at > earned_at AND available_at > ?1",
            )?
            .query_row([now], |r| r.get(0))?;
        // a lot earned later than now (a document dated ahead of this clock) is pending even
        // without a delay; no index finds those, so this reads every lot — only until the
        // clock passes the latest such date
        if undelayed_earned > now {
            pending += c
                .prepare_cached(
                    "SELECT COALESCE(SUM(remaining), 0) FROM lots WHERE available_at <= earned_at AND available_at > ?1",
                )?
                .query_row([now], |r| r.get::<_, i64>(0))?;
        }
        s.points_debt = c
            .prepare_cached(
                "SELECT COALESCE(SUM(debt), 0) FROM customers INDEXED BY customers_debt WHERE debt > 0",
            )?
            .query_row([], |r| r.get(0))?;
        s.points_pending = pending;
        // every balance is lots (pending or available) less debt; what is not pending is
        // available, net of debt, as the counted summary reports it
        s.points_available = balance - pending;
        s.quarantined = super::query::unresolved_quarantine(c)?;
        Ok(s)
    }
}
