//! The rules engine's view of a customer, read from the ledger, and the bookkeeping a
//! sale leaves behind for later sales (counters, tiers, memberships, the program budget).
//!
//! Everything here is a projection of documents in force: counters are summed over applied
//! sales, the budget adds a sale when it is applied and subtracts it when it is cancelled.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::{Result, ts};
use crate::core::document::Document;
use crate::core::lots::{self, Holdings};
use crate::core::money::Money;
use crate::core::program::{BudgetState, CustomerState, Decision, Rules};

/// Bounds of the local day `at` falls in.
fn local_day(rules: &dyn Rules, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let tz = rules.timezone();
    let date = at.with_timezone(&tz).date_naive();
    let start = |d: chrono::NaiveDate| {
        tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .map_or(at, |t| t.with_timezone(&Utc))
    };
    (start(date), start(date.succ_opt().unwrap_or(date)))
}

/// Sum of sale totals in force for a customer in `[from, to]`, not counting `except`.
pub(crate) fn spend_between(
    conn: &Connection,
    customer: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    except: i64,
) -> Result<Money> {
    let v: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(total), 0) FROM documents WHERE customer_id = ?1 AND kind = 'sale' \
             AND applied = 1 AND occurred_at >= ?2 AND occurred_at <= ?3 AND id != ?4",
        )?
        .query_row(params![customer, ts(from), ts(to), except], |r| r.get(0))?;
    Ok(Money(v))
}

pub(crate) fn customer_state(
    conn: &Connection,
    rules: &dyn Rules,
    customer: Option<i64>,
    doc: &Document,
    doc_row: i64,
    h: &Holdings,
) -> Result<CustomerState> {
    let mut state = CustomerState {
        customer_id: customer,
        ..Default::default()
    };
    if let Some(key) = rules.budget_period_key(doc.occurred_at) {
        let b: Option<(i64, i64)> = conn
            .prepare_cached("SELECT margin, issued_value FROM period_totals WHERE period = ?1")?
            .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (margin, issued) = b.unwrap_or((0, 0));
        state.budget = Some(BudgetState {
            margin: Money(margin),
            issued_value: Money(issued),
        });
    }
    let Some(c) = customer else { return Ok(state) };
    let at = doc.occurred_at;
    state.available = lots::figures(h, at, Duration::zero()).available;
    let (tier, since): (Option<String>, Option<i64>) = conn
        .prepare_cached("SELECT tier, tier_since FROM customers WHERE id = ?1")?
        .query_row([c], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let _ = since;
    state.tier = tier;
    if let Some(window) = rules.tier_window() {
        state.spend_in_window = spend_between(conn, c, at - window, at, doc_row)?;
    }
    let (day_start, day_end) = local_day(rules, at);
    let (prior, today): (i64, i64) = conn
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(occurred_at >= ?2 AND occurred_at < ?3), 0) FROM documents \
             WHERE customer_id = ?1 AND kind = 'sale' AND applied = 1 AND id != ?4",
        )?
        .query_row(params![c, ts(day_start), ts(day_end), doc_row], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    state.prior_sales = prior as u32;
    state.sales_today = today as u32;
    for (key, window) in rules.counter_needs() {
        let from = window.map_or(i64::MIN, |w| ts(at - w));
        let v: i64 = conn
            .prepare_cached(
                "SELECT COALESCE(SUM(c.amount), 0) FROM document_counters c JOIN documents d ON d.id = c.document_id \
                 WHERE d.customer_id = ?1 AND d.applied = 1 AND c.counter = ?2 AND d.id != ?3 \
                 AND d.occurred_at >= ?4 AND d.occurred_at <= ?5",
            )?
            .query_row(params![c, key, doc_row, from, ts(at)], |r| r.get(0))?;
        state.counters.insert(key.clone(), Decimal::from(v));
        if let Some(w) = window {
            let awarded: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM journal j WHERE j.customer_id = ?1 AND j.rule = ?2 \
                     AND j.role = 'effect' AND j.kind = 'bonus' AND j.effective_at >= ?3 \
                     AND NOT EXISTS (SELECT 1 FROM journal x WHERE x.reverses = j.id AND (x.role = 'cancel' \
                       OR EXISTS (SELECT 1 FROM documents xd WHERE xd.id = x.document_id AND xd.applied = 1 \
                                  AND xd.epoch = x.epoch))))",
                )?
                .query_row(params![c, key, ts(at - w)], |r| r.get(0))?;
            if awarded {
                state.recent_awards.push(key);
            }
        }
    }
    let mut st = conn.prepare_cached("SELECT program FROM memberships WHERE customer_id = ?1")?;
    state.memberships = st
        .query_map([c], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(state)
}

/// Records what an applied sale leaves for later ones. `reward_points` is everything the
/// sale issued (accrual and bonuses).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_sale(
    conn: &Connection,
    rules: &dyn Rules,
    doc_row: i64,
    epoch: i64,
    customer: Option<i64>,
    doc: &Document,
    decision: &Decision,
    state: &CustomerState,
    reward_points: i64,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM document_counters WHERE document_id = ?1")?
        .execute([doc_row])?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO document_counters (document_id, counter, amount, prior) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (document_id, counter) DO UPDATE SET amount = amount + excluded.amount",
    )?;
    for (key, amount) in rules.counter_contributions(doc, decision) {
        if amount != 0 {
            let prior = state.counters.get(&key).and_then(|v| v.trunc().to_i64());
            ins.execute(params![doc_row, key, amount, prior])?;
        }
    }
    let reward_value = reward_points.saturating_mul(rules.point_value().0);
    let period = rules.budget_period_key(doc.occurred_at);
    if let Some(p) = &period {
        conn.prepare_cached(
            "INSERT INTO period_totals (period, margin, issued_value) VALUES (?1, ?2, ?3) \
             ON CONFLICT (period) DO UPDATE SET margin = margin + excluded.margin, \
             issued_value = issued_value + excluded.issued_value",
        )?
        .execute(params![p, decision.margin.0, reward_value])?;
    }
    let flags = if decision.flags.is_empty() {
        None
    } else {
        serde_json::to_string(&decision.flags).ok()
    };
    conn.prepare_cached(
        "UPDATE documents SET margin = ?2, reward_value = ?3, budget_period = ?4, loss = ?5, flags = ?6 WHERE id = ?1",
    )?
    .execute(params![doc_row, decision.margin.0, reward_value, period, decision.loss.0, flags])?;
    let Some(c) = customer else { return Ok(()) };
    for (card, product) in &decision.vouchers {
        conn.prepare_cached(
            "INSERT INTO vouchers (customer_id, document_id, epoch, card, product, issued_at, state) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'issued')",
        )?
        .execute(params![c, doc_row, epoch, card, product, ts(doc.occurred_at)])?;
    }
    for (program, how) in &decision.memberships {
        join_program(conn, c, program, how, doc.occurred_at)?;
    }
    if let Some(change) = rules.tier_after_sale(state.tier.as_deref(), state.spend_in_window + doc.total) {
        record_tier(conn, c, &change, doc.occurred_at, Some(doc_row))?;
    }
    let _ = now;
    Ok(())
}

/// Takes a cancelled sale's share out of the budget and withdraws its vouchers.
pub(crate) fn unrecord_sale(conn: &Connection, doc_row: i64, epoch: i64) -> Result<()> {
    let row: Option<(Option<String>, Option<i64>, Option<i64>)> = conn
        .prepare_cached("SELECT budget_period, margin, reward_value FROM documents WHERE id = ?1")?
        .query_row([doc_row], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((Some(period), margin, reward)) = row {
        conn.prepare_cached(
            "UPDATE period_totals SET margin = margin - ?2, issued_value = issued_value - ?3 WHERE period = ?1",
        )?
        .execute(params![period, margin.unwrap_or(0), reward.unwrap_or(0)])?;
    }
    conn.prepare_cached(
        "UPDATE vouchers SET state = 'cancelled' WHERE document_id = ?1 AND epoch = ?2 AND state = 'issued'",
    )?
    .execute(params![doc_row, epoch])?;
    conn.prepare_cached(
        "UPDATE documents SET margin = NULL, reward_value = NULL, budget_period = NULL, loss = 0 WHERE id = ?1",
    )?
    .execute([doc_row])?;
    Ok(())
}

pub(crate) fn join_program(
    conn: &Connection,
    c: i64,
    program: &str,
    how: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO memberships (customer_id, program, since, how) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![c, program, ts(at), how])?;
    Ok(())
}

pub(crate) fn record_tier(
    conn: &Connection,
    c: i64,
    change: &crate::core::rules::TierChange,
    at: DateTime<Utc>,
    document: Option<i64>,
) -> Result<()> {
    // a new tier starts with no dip: its grace has nothing to do with the last one's
    conn.prepare_cached(
        "UPDATE customers SET tier = ?2, tier_since = ?3, tier_below_since = NULL WHERE id = ?1",
    )?
    .execute(params![c, change.to, ts(at)])?;
    conn.prepare_cached(
        "INSERT INTO tier_events (customer_id, from_tier, to_tier, at, reason, document_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![c, change.from, change.to, ts(at), change.reason, document])?;
    Ok(())
}
