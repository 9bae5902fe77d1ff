//! The rules engine's view of a customer, read from the ledger, and the bookkeeping a
//! sale leaves behind for later sales (counters, tiers, memberships, the program budget).
//!
//! Everything here is a projection of documents in force: counters are summed over applied
//! sales, the budget adds a sale when it is applied and subtracts it when it is cancelled.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::counters::Share;
use super::{Result, ts};
use crate::core::document::Document;
use crate::core::effects::SaleEffects;
use crate::core::journal::TxKind;
use crate::core::lots::{self, Holdings};
use crate::core::money::Money;
use crate::core::program::{BudgetState, CustomerState, Rules};

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

/// The three reads of a customer's history a sale makes. Each is answered from
/// `documents_customer` alone (migrations 34 and 36: the counters' shares are packed in the
/// index, `ledger::counters`): a read that fetched each earlier document's row cost a page
/// read per document in a ledger larger than the page cache.
const SPEND_SQL: &str = "SELECT COALESCE(SUM(total), 0) FROM documents INDEXED BY documents_customer \
     WHERE customer_id = ?1 AND kind_code = 0 /* sale */ AND applied = 1 AND occurred_at >= ?2 \
     AND occurred_at <= ?3 AND id != ?4";
const PRIOR_SQL: &str = "SELECT COUNT(*), COALESCE(SUM(occurred_at >= ?2 AND occurred_at < ?3), 0) \
     FROM documents INDEXED BY documents_customer \
     WHERE customer_id = ?1 AND kind_code = 0 /* sale */ AND applied = 1 AND id != ?4";
const COUNTER_SQL: &str = "SELECT COALESCE(SUM(counter_amount(counters, (SELECT id FROM counter_names WHERE name = ?2))), 0) \
     FROM documents INDEXED BY documents_customer \
     WHERE customer_id = ?1 AND applied = 1 AND counters IS NOT NULL \
     AND id != ?3 AND occurred_at >= ?4 AND occurred_at <= ?5";

/// Sum of sale totals in force for a customer in `[from, to]`, not counting `except`.
pub(crate) fn spend_between(
    conn: &Connection,
    customer: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    except: i64,
) -> Result<Money> {
    let v: i64 = conn
        .prepare_cached(SPEND_SQL)?
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
        .prepare_cached(PRIOR_SQL)?
        .query_row(params![c, ts(day_start), ts(day_end), doc_row], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    state.prior_sales = prior as u32;
    state.sales_today = today as u32;
    for (key, window) in rules.counter_needs() {
        let from = window.map_or(i64::MIN, |w| ts(at - w));
        let v: i64 = conn
            .prepare_cached(COUNTER_SQL)?
            .query_row(params![c, key, doc_row, from, ts(at)], |r| r.get(0))?;
        state.counters.insert(key.clone(), Decimal::from(v));
        if let Some(w) = window {
            let awarded: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM journal j WHERE j.customer_id = ?1 \
                     AND j.rule_id = (SELECT n.id FROM rule_names n WHERE n.name = ?2) \
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
    state.memberships = memberships_in_force(conn, c, at)?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    Ok(state)
}

/// A counter's key in `counter_names`, added on first use.
pub(crate) fn counter_id(conn: &Connection, name: &str) -> Result<i64> {
    name_key(conn, "counter_names", name)
}

/// A rule's key in `rule_names` (the rule behind a bonus), added on first use.
pub(crate) fn rule_id(conn: &Connection, name: &str) -> Result<i64> {
    name_key(conn, "rule_names", name)
}

/// A name's key in one of the tables that store a name once (`id`, `name`), added on first
/// use. Not cached in memory: a document that fails rolls back the name it added.
fn name_key(conn: &Connection, table: &'static str, name: &str) -> Result<i64> {
    let found: Option<i64> = conn
        .prepare_cached(&format!("SELECT id FROM {table} WHERE name = ?1"))?
        .query_row([name], |r| r.get(0))
        .optional()?;
    if let Some(id) = found {
        return Ok(id);
    }
    conn.prepare_cached(&format!("INSERT INTO {table} (name) VALUES (?1)"))?
        .execute([name])?;
    Ok(conn.last_insert_rowid())
}

/// Writes the bookkeeping a sale's effects leave for later sales: its counter shares, its
/// place in the budget, the document row's figures, vouchers used and earned, memberships
/// bought, the tier reached — and marks the sale applied, in the same update of its row
/// (each update of a column the customer's index holds rewrites the index entry).
pub(crate) fn record_sale(
    conn: &Connection,
    doc_row: i64,
    epoch: i64,
    customer: Option<i64>,
    doc: &Document,
    fx: &SaleEffects,
) -> Result<()> {
    let decision = &fx.decision;
    let mut shares = Vec::with_capacity(fx.counters.len());
    for c in &fx.counters {
        shares.push(Share {
            counter: counter_id(conn, &c.key)?,
            amount: c.amount,
            prior: c.prior,
        });
    }
    let (counters, priors) = super::counters::pack(&shares);
    let reward_value = fx.reward_value.0;
    let period = &fx.budget_period;
    if let Some(p) = period {
        conn.prepare_cached(
            "INSERT INTO period_totals (period, margin, issued_value) VALUES (?1, ?2, ?3) \
             ON CONFLICT (period) DO UPDATE SET margin = margin + excluded.margin, \
             issued_value = issued_value + excluded.issued_value",
        )?
        .execute(params![p, decision.margin.0, reward_value])?;
    }
    // the flags travel in the accrual's explanation; the document row keeps them only when
    // no accrual carries them — a sale that earned nothing says why here, once (issue 19)
    let carried = customer.is_some() && fx.txs.iter().any(|t| t.kind == TxKind::Accrual);
    let flags = if decision.flags.is_empty() || carried {
        None
    } else {
        serde_json::to_string(&decision.flags).ok()
    };
    conn.prepare_cached(
        "UPDATE documents SET margin = ?2, reward_value = ?3, budget_period = ?4, loss = ?5, flags = ?6, \
         counters = ?7, counter_priors = ?8, applied = 1 WHERE id = ?1",
    )?
    .execute(params![
        doc_row,
        decision.margin.0,
        reward_value,
        period,
        decision.loss.0,
        flags,
        counters,
        priors
    ])?;
    let Some(c) = customer else { return Ok(()) };
    use_vouchers(conn, c, doc_row, doc)?;
    for v in &fx.vouchers {
        conn.prepare_cached(
            "INSERT INTO vouchers (customer_id, document_id, epoch, card, product, issued_at, state, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'issued', ?7)",
        )?
        .execute(params![
            c,
            doc_row,
            epoch,
            v.card,
            v.product,
            ts(doc.occurred_at),
            ts(doc.occurred_at + v.valid)
        ])?;
        let id = conn.last_insert_rowid();
        conn.prepare_cached("UPDATE vouchers SET code = ?2 WHERE id = ?1")?
            .execute(params![id, voucher_code(id)])?;
    }
    for m in &fx.memberships {
        buy_membership(conn, c, &m.program, &m.product, m.term, doc.occurred_at, doc_row)?;
    }
    if let Some(change) = &fx.tier {
        record_tier(conn, c, change, doc.occurred_at, Some(doc_row))?;
    }
    Ok(())
}

/// A voucher's code: `V-` and seven symbols a person cannot misread (the voucher's id,
/// spread, with a check symbol — never taken for a friend code, which has no prefix).
pub(crate) fn voucher_code(id: i64) -> String {
    format!(
        "V-{}",
        crate::core::identity::referral_code(id, crate::core::identity::CodeKey::SHIPPED)
            .unwrap_or_else(|| id.to_string())
    )
}

/// A sale that gives a voucher's item free (a line of the product at no charge) uses the
/// customer's oldest open voucher for it, one per unit, once: vouchers issued before the
/// sale and not past their end.
fn use_vouchers(conn: &Connection, c: i64, doc_row: i64, doc: &Document) -> Result<()> {
    // vouchers the till used by code on this very receipt count first, once each (an
    // unposted version unlinked them, so a receipt with any links them again here)
    let linked = conn
        .prepare_cached(
            "UPDATE vouchers SET used_document = ?2 WHERE used_by = ?1 AND used_document IS NULL AND state = 'used'",
        )?
        .execute(params![doc.source.doc_id.to_lowercase(), doc_row])?;
    let mut by_till: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    if linked > 0 {
        let mut st = conn.prepare_cached(
            "SELECT product, COUNT(*) FROM vouchers WHERE used_document = ?1 AND used_by IS NOT NULL GROUP BY product",
        )?;
        for r in st.query_map([doc_row], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (p, n) = r?;
            by_till.insert(p, n);
        }
    }
    for line in doc.lines.iter().filter(|l| l.net.0 == 0) {
        let mut units = line.quantity.trunc().to_i64().unwrap_or(0).max(0);
        if let Some(n) = by_till.get_mut(&line.product_id) {
            let taken = (*n).min(units);
            *n -= taken;
            units -= taken;
        }
        for _ in 0..units {
            let used = conn
                .prepare_cached(
                    "UPDATE vouchers SET state = 'used', used_document = ?3, used_at = ?4 WHERE id = \
                     (SELECT id FROM vouchers WHERE customer_id = ?1 AND product = ?2 AND state = 'issued' \
                       AND issued_at <= ?4 AND (expires_at IS NULL OR expires_at > ?4) AND document_id != ?3 \
                      ORDER BY issued_at, id LIMIT 1)",
                )?
                .execute(params![c, line.product_id, doc_row, ts(doc.occurred_at)])?;
            if used == 0 {
                break;
            }
        }
    }
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
    // the sale that gave a voucher's item is gone: the voucher can be used again — unless the
    // till said it used the voucher's code on that receipt: that stands, and the receipt's next
    // version links it again
    conn.prepare_cached(
        "UPDATE vouchers SET state = 'issued', used_document = NULL, used_at = NULL \
         WHERE used_document = ?1 AND state = 'used' AND used_by IS NULL",
    )?
    .execute([doc_row])?;
    conn.prepare_cached(
        "UPDATE vouchers SET used_document = NULL WHERE used_document = ?1 AND used_by IS NOT NULL",
    )?
    .execute([doc_row])?;
    conn.prepare_cached(
        "UPDATE documents SET margin = NULL, reward_value = NULL, budget_period = NULL, loss = 0 WHERE id = ?1",
    )?
    .execute([doc_row])?;
    Ok(())
}

/// The closed programs a customer is a member of at `at`, with the end of each (`None`: for
/// good): a bought membership counts until its term ends, and only while the sale that bought
/// it is in force and its membership product was not returned.
pub(crate) fn memberships_in_force(
    conn: &Connection,
    customer: i64,
    at: DateTime<Utc>,
) -> Result<Vec<(String, Option<DateTime<Utc>>)>> {
    let rows = conn
        .prepare_cached(
            "SELECT m.program, m.until FROM memberships m WHERE m.customer_id = ?1 \
               AND (m.until IS NULL OR m.until > ?2) \
               AND (m.document_id IS NULL OR (\
                 EXISTS (SELECT 1 FROM documents d WHERE d.id = m.document_id AND d.applied = 1) \
                 AND NOT EXISTS (SELECT 1 FROM documents r JOIN document_lines l ON l.document_id = r.id \
                   WHERE r.original_id = m.document_id AND r.kind = 'return' AND r.applied = 1 \
                     AND l.product_id = m.product))) \
             ORDER BY m.program",
        )?
        .query_map(params![customer, ts(at)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .map(|(p, u)| (p, u.map(super::from_ts)))
        .collect())
}

/// A membership bought (or renewed) by a sale: with a term, it runs from the sale, or from
/// the end of the membership in force when renewed early.
fn buy_membership(
    conn: &Connection,
    c: i64,
    program: &str,
    product: &str,
    term: Option<Duration>,
    at: DateTime<Utc>,
    doc_row: i64,
) -> Result<()> {
    let current: Option<(Option<i64>, Option<i64>)> = conn
        .prepare_cached("SELECT until, document_id FROM memberships WHERE customer_id = ?1 AND program = ?2")?
        .query_row(params![c, program], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let start = match current {
        // joined by invitation: for good, whatever is bought later
        Some((None, None)) => return Ok(()),
        // the same sale again (a new version): from the sale, not from its own end
        Some((_, Some(d))) if d == doc_row => at,
        Some((Some(until), _)) if until > ts(at) => super::from_ts(until),
        _ => at,
    };
    let until = term.map(|t| ts(start + t));
    conn.prepare_cached(
        "INSERT INTO memberships (customer_id, program, since, how, until, document_id, product) \
         VALUES (?1, ?2, ?3, 'membership product bought', ?4, ?5, ?6) \
         ON CONFLICT (customer_id, program) DO UPDATE SET until = excluded.until, \
           document_id = excluded.document_id, product = excluded.product, how = excluded.how",
    )?
    .execute(params![c, program, ts(at), until, doc_row, product])?;
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

/// Joins a customer to the closed program an invite code opens: `Ok(true)` joined now,
/// `Ok(false)` a member already, `Err(reason)` refused — a code that opens nothing, or one that
/// has brought in its `invite_limit` of members already (an invitation passed around). The
/// reason is the same each time, so a document read again records no second refusal.
pub(crate) fn join_by_invite(
    conn: &Connection,
    c: i64,
    rules: &dyn crate::core::program::Rules,
    code: &str,
    at: DateTime<Utc>,
) -> Result<std::result::Result<bool, String>> {
    let Some(program) = rules.membership_for_invite(code) else {
        return Ok(Err(format!("invite code {code:?} opens no program")));
    };
    let member: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM memberships WHERE customer_id = ?1 AND program = ?2)")?
        .query_row(params![c, program], |r| r.get(0))?;
    if member {
        return Ok(Ok(false));
    }
    let how = format!("invite code {code}");
    if let Some(limit) = rules.invite_limit(&program) {
        // memberships is small (one row per member of a closed program): a scan is fine
        let used: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM memberships WHERE program = ?1 AND how = ?2")?
            .query_row(params![program, how], |r| r.get(0))?;
        if used >= i64::from(limit) {
            return Ok(Err(format!(
                "invite code {code:?} has brought in its {limit} members of {program:?} (invite_limit): not joined"
            )));
        }
    }
    join_program(conn, c, &program, &how, at)?;
    Ok(Ok(true))
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

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// A sale's reads of its customer's history never fetch a document's row (migration 34):
    /// at a million sales each such fetch was a page read. The counters' read never looks up
    /// a row of shares either (migration 36): it reads nothing but the customer's index and
    /// the counter's key.
    #[test]
    fn a_sales_history_reads_stay_in_the_customer_index() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::ledger::schema::migrate(&mut conn).expect("migrate");
        for (sql, n) in [(SPEND_SQL, 4), (PRIOR_SQL, 4), (COUNTER_SQL, 5)] {
            let steps = crate::ledger::query_plan(&conn, sql, rusqlite::params_from_iter(0..n));
            let documents: Vec<&String> = steps.iter().filter(|s| s.contains("documents")).collect();
            assert_eq!(documents.len(), 1, "{sql}: {steps:?}");
            assert!(
                documents[0].contains("USING COVERING INDEX documents_customer"),
                "{sql}: {steps:?}"
            );
            let others: Vec<&String> = steps
                .iter()
                .filter(|s| s.contains("SCAN") || s.contains("SEARCH"))
                .filter(|s| !s.contains("documents") && !s.contains("counter_names"))
                .collect();
            assert!(others.is_empty(), "{sql}: {steps:?}");
        }
    }
}
