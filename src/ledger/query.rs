//! Reading the ledger: balances, history, summaries. Nothing here writes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Ledger, LedgerError, Result, catalog, from_ts, ts};
use crate::core::document::{DocKind, Document, Line, SourceRef};
use crate::core::identity::{CustomerQuery, parse_customer_query};
use crate::core::journal::Explanation;
use crate::core::lots::{self, Holdings, Lot};
use crate::core::money::{Money, Points};
use crate::core::simulate::SimSale;

/// Finds the one customer a person means by `text` (see [`parse_customer_query`]).
pub(crate) fn find_customer(conn: &Connection, text: &str) -> Result<i64> {
    let mut hits: Vec<i64> = Vec::new();
    for q in parse_customer_query(text) {
        let found: Option<i64> = match &q {
            CustomerQuery::Id(id) => conn
                .query_row("SELECT id FROM customers WHERE id = ?1", [id], |r| r.get(0))
                .optional()?,
            CustomerQuery::Key(k) => conn
                .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = ?1 AND value = ?2")?
                .query_row(params![k.kind(), k.value()], |r| r.get(0))
                .optional()?,
        };
        if let Some(c) = found
            && !hits.contains(&c)
        {
            hits.push(c);
        }
    }
    match hits.as_slice() {
        [] => Err(LedgerError::UnknownCustomer(text.to_string())),
        [one] => Ok(*one),
        many => Err(LedgerError::AmbiguousCustomer(
            text.to_string(),
            many.iter()
                .map(|c| format!("id:{c}"))
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// A customer's latest document ([`Ledger::last_document`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastDocument {
    pub occurred_at: DateTime<Utc>,
    pub kind: DocKind,
    pub total_kopecks: i64,
    /// Σ of its lines' quantities.
    pub quantity: rust_decimal::Decimal,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CustomerView {
    pub id: i64,
    pub name: Option<String>,
    pub card: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub onec_id: Option<String>,
    pub amocrm_id: Option<String>,
    /// `YYYY-MM-DD`, for the birthday bonus.
    pub birthday: Option<String>,
}

pub(crate) fn customer_view(conn: &Connection, id: i64) -> Result<CustomerView> {
    let (name, birthday): (Option<String>, Option<String>) =
        conn.query_row("SELECT name, birthday FROM customers WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let mut v = CustomerView {
        id,
        name,
        birthday,
        card: None,
        phone: None,
        email: None,
        onec_id: None,
        amocrm_id: None,
    };
    let mut st = conn.prepare_cached(
        "SELECT kind, value FROM customer_keys WHERE customer_id = ?1 ORDER BY kind, value",
    )?;
    let keys = st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for k in keys {
        let (kind, value) = k?;
        let slot = match kind.as_str() {
            "card" => &mut v.card,
            "phone" => &mut v.phone,
            "email" => &mut v.email,
            "onec" => &mut v.onec_id,
            "amocrm" => &mut v.amocrm_id,
            _ => continue,
        };
        slot.get_or_insert(value);
    }
    Ok(v)
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Expiring {
    /// Points that burn within the warning window.
    pub points: i64,
    /// Local date (the ledger's time zone is applied by the caller) of the next expiry.
    pub date: Option<DateTime<Utc>>,
    /// Points that burn on that date.
    pub date_points: i64,
    pub within_days: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BalanceView {
    pub customer: CustomerView,
    /// Usable now: net of the points live holds reserve.
    pub available: i64,
    /// Reserved by live holds of tills and the site (not in `available`).
    pub held: i64,
    pub pending: i64,
    pub expiring: Expiring,
    /// Points owed by the customer (a return after the points were spent).
    pub debt: i64,
    /// Tier id; `None` when the program has no tiers.
    pub tier: Option<String>,
    /// The code a friend gives at the till or on the site to be referred by this customer
    /// (`core::identity::referral_code`).
    pub referral_code: Option<String>,
    /// Closed programs the customer is a member of now, with the end of each bought
    /// membership (`None`: for good).
    pub memberships: Vec<(String, Option<DateTime<Utc>>)>,
    /// Free-item vouchers, newest first (cancelled ones left out).
    pub vouchers: Vec<VoucherView>,
}

/// A free-item voucher as the customer and the till see it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VoucherView {
    pub code: Option<String>,
    pub product: String,
    /// `issued`; `sent` once a note on the AmoCRM card or a message to the member about it
    /// was delivered; `used`; or `expired` (issued or sent, and past its end).
    pub state: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub used_at: Option<DateTime<Utc>>,
    /// The product's name as the catalog knows it (its id when it does not).
    pub item: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    pub tx_id: i64,
    pub kind: String,
    pub role: String,
    pub points: i64,
    pub effective_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub source: Option<String>,
    pub doc_id: Option<String>,
    pub number: Option<String>,
    pub reverses: Option<i64>,
    pub actor: Option<String>,
    pub explanation: Explanation,
}

/// A period of business dates, `[from, to)` in UTC (the caller turns local dates into it).
#[derive(Clone, Copy, Debug, Default)]
pub struct DateRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl DateRange {
    fn bounds(&self) -> (i64, i64) {
        (self.from.map_or(i64::MIN, ts), self.to.map_or(i64::MAX, ts))
    }
}

/// What the ledger issued in a period, beside which `simulate` sets its replay.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LedgerIssued {
    /// Accrual and bonuses in force on the period's sales, per sale (row id).
    #[serde(skip)]
    pub by_sale: HashMap<i64, i64>,
    pub on_sales: i64,
    /// Bonuses no sale caused (joining, birthdays, referrals): a replay of sales has none.
    pub bonuses_without_sale: i64,
    pub adjustments: i64,
    /// Taken back by returns (negative): a replay of sales does not see returns.
    pub taken_back_by_returns: i64,
    /// Sales with a sale of the same customer recorded out of date order around them.
    #[serde(skip)]
    pub out_of_order: std::collections::HashSet<i64>,
    /// Sales applied again after an edit or an unposting in 1C.
    #[serde(skip)]
    pub reapplied: std::collections::HashSet<i64>,
    /// Sales of customers who had returned goods before.
    #[serde(skip)]
    pub after_return: std::collections::HashSet<i64>,
}

/// `kopilka summary --json`: the keys are a stable contract (see README).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub sales_count: i64,
    pub sales_total_kopecks: i64,
    pub returns_count: i64,
    pub returns_total_kopecks: i64,
    pub customers: i64,
    /// Points customers held when the period began (pending + available, net of debt).
    pub points_at_start: i64,
    pub points_accrued: i64,
    pub points_redeemed: i64,
    pub points_expired: i64,
    pub points_reversed: i64,
    pub points_adjusted: i64,
    pub points_opening: i64,
    pub points_bonus: i64,
    pub points_written_off: i64,
    pub points_pending: i64,
    pub points_available: i64,
    pub points_debt: i64,
    pub quarantined: i64,
    pub voided_documents: i64,
}

pub(super) fn unresolved_quarantine(c: &Connection) -> Result<i64> {
    Ok(c.query_row(
        "SELECT COUNT(*) FROM quarantine WHERE resolved_at IS NULL",
        [],
        |r| r.get(0),
    )?)
}

impl Summary {
    /// Adds the sum of one kind of journal entry to the flow it is (a redemption, expiry
    /// or reversal is stored negative and reported as the points it took).
    pub(super) fn add_flow(&mut self, kind: &str, sum: i64) -> Result<()> {
        match kind {
            "accrual" => self.points_accrued = sum,
            "redemption" => self.points_redeemed = -sum,
            "expiry" => self.points_expired = -sum,
            "reversal" => self.points_reversed = -sum,
            "adjustment" => self.points_adjusted = sum,
            "opening" => self.points_opening = sum,
            "bonus" => self.points_bonus = sum,
            "writeoff" => self.points_written_off = sum,
            other => return Err(LedgerError::Corrupt(format!("unknown journal kind {other}"))),
        }
        Ok(())
    }

    /// The left side of the identity (README): what customers held at the start plus every
    /// flow of the period; equal to `points_pending + points_available`.
    pub fn identity_left(&self) -> i64 {
        self.points_at_start + self.points_accrued + self.points_bonus
            - self.points_redeemed
            - self.points_expired
            - self.points_reversed
            + self.points_adjusted
            + self.points_opening
            + self.points_written_off
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LossMaker {
    pub source: String,
    pub doc_id: String,
    pub number: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub loss_kopecks: i64,
    pub customer_id: Option<i64>,
}

impl LossMaker {
    /// «Продажа ЧК-000777 от 15.11.2026 (onec:…)», the date in `tz`.
    pub fn title(&self, tz: chrono_tz::Tz) -> String {
        crate::core::document::document_title(
            Some(crate::core::document::DocKind::Sale.label()),
            self.number.as_deref(),
            Some(self.occurred_at.with_timezone(&tz).date_naive()),
            &self.source,
            &self.doc_id,
        )
    }
}

/// A partner's position in a coalition program for a period, in points and in money at the
/// point value: the points its sales issued are a liability the program took on for it, the
/// points its customers spent with it a discount it gave for the program.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PartnerTotals {
    pub partner: String,
    pub points_issued: i64,
    pub points_redeemed: i64,
    pub documents: i64,
    pub issued_kopecks: i64,
    pub redeemed_kopecks: i64,
    /// `issued − redeemed`: above zero the partner owes the program that much, below zero
    /// the program owes the partner.
    pub net_kopecks: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuarantineEntry {
    pub id: i64,
    pub source: String,
    pub doc_ref: String,
    pub version: Option<String>,
    pub reason: String,
    pub location: Option<String>,
    pub excerpt: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub seen_count: i64,
    /// The document's kind, number and date as far as they could be read (issue 17): how a
    /// person finds it in 1C.
    pub kind: Option<String>,
    pub number: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl QuarantineEntry {
    /// «ЧекККМ ЧК-000777 от 15.11.2026 (onec:…)», the date in `tz`.
    pub fn title(&self, tz: chrono_tz::Tz) -> String {
        crate::core::document::document_title(
            self.kind.as_deref(),
            self.number.as_deref(),
            self.occurred_at.map(|t| t.with_timezone(&tz).date_naive()),
            &self.source,
            &self.doc_ref,
        )
    }
}

/// Named so a test can pin it to `lots_open` alone (migration 35).
const HOLDINGS_SQL: &str = "SELECT id, available_at, expires_at, remaining FROM lots INDEXED BY lots_open \
     WHERE customer_id = ?1 AND remaining > 0";

pub(crate) fn holdings(conn: &Connection, customer: i64) -> Result<Holdings> {
    let mut st = conn.prepare_cached(HOLDINGS_SQL)?;
    let lots = st
        .query_map([customer], |r| {
            Ok(Lot {
                id: r.get(0)?,
                available_at: from_ts(r.get(1)?),
                expires_at: r.get::<_, Option<i64>>(2)?.map(from_ts),
                remaining: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let debt: i64 = conn
        .prepare_cached("SELECT debt FROM customers WHERE id = ?1")?
        .query_row([customer], |r| r.get(0))?;
    Ok(Holdings { lots, debt })
}

impl Ledger {
    /// A customer's turnover in force: Σ sales − Σ returns (kopecks, and quantity) dated in
    /// `[from, to]` (either end open when `None`), leaving out the document with id
    /// `exclude` in any source. `Ok(None)`: nobody matches `customer`.
    pub fn turnover(
        &self,
        customer: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        exclude: Option<&str>,
    ) -> Result<Option<(i64, rust_decimal::Decimal)>> {
        let id = match find_customer(&self.conn, customer) {
            Ok(id) => id,
            Err(LedgerError::UnknownCustomer(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut st = self.conn.prepare_cached(
            "SELECT d.kind, d.total, (SELECT group_concat(l.quantity, ' ') FROM document_lines l \
               WHERE l.document_id = d.id) \
             FROM documents d WHERE d.customer_id = ?1 AND d.state = 'active' \
               AND d.occurred_at >= ?2 AND d.occurred_at <= ?3 AND d.doc_id != ?4",
        )?;
        let rows = st.query_map(
            params![
                id,
                from.map_or(i64::MIN, ts),
                to.map_or(i64::MAX, ts),
                exclude.unwrap_or("")
            ],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            },
        )?;
        let (mut kopecks, mut quantity) = (0i64, rust_decimal::Decimal::ZERO);
        for row in rows {
            let (kind, total, quantities) = row?;
            let sign = if kind.as_deref() == Some("return") { -1 } else { 1 };
            kopecks = kopecks.saturating_add(sign * total);
            let q: rust_decimal::Decimal = quantities
                .unwrap_or_default()
                .split(' ')
                .filter_map(|t| t.parse::<rust_decimal::Decimal>().ok())
                .sum();
            quantity += if sign < 0 { -q } else { q };
        }
        Ok(Some((kopecks, quantity)))
    }

    /// A customer's latest document in force dated at or before `at` (not `exclude`, by its id
    /// in any source): (date, kind, total in kopecks, quantity). `Ok(None)`: nobody matches
    /// `customer`, or they have no such document.
    pub fn last_document(
        &self,
        customer: &str,
        at: DateTime<Utc>,
        exclude: Option<&str>,
    ) -> Result<Option<LastDocument>> {
        let id = match find_customer(&self.conn, customer) {
            Ok(id) => id,
            Err(LedgerError::UnknownCustomer(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let found = self
            .conn
            .prepare_cached(
                "SELECT d.occurred_at, d.kind, d.total, (SELECT group_concat(l.quantity, ' ') \
                   FROM document_lines l WHERE l.document_id = d.id) \
                 FROM documents d WHERE d.customer_id = ?1 AND d.state = 'active' \
                   AND d.occurred_at <= ?2 AND d.doc_id != ?3 ORDER BY d.occurred_at DESC, d.id DESC LIMIT 1",
            )?
            .query_row(params![id, ts(at), exclude.unwrap_or("")], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .optional()?;
        Ok(found.map(|(at, kind, total, quantities)| {
            let kind = if kind.as_deref() == Some("return") {
                DocKind::Return
            } else {
                DocKind::Sale
            };
            let q = quantities
                .unwrap_or_default()
                .split(' ')
                .filter_map(|t| t.parse::<rust_decimal::Decimal>().ok())
                .sum();
            LastDocument {
                occurred_at: from_ts(at),
                kind,
                total_kopecks: total,
                quantity: q,
            }
        }))
    }

    pub fn balance(&self, customer: &str, now: DateTime<Utc>, warn: chrono::Duration) -> Result<BalanceView> {
        let id = find_customer(&self.conn, customer)?;
        self.balance_of(id, now, warn)
    }

    pub fn balance_of(&self, id: i64, now: DateTime<Utc>, warn: chrono::Duration) -> Result<BalanceView> {
        let h = holdings(&self.conn, id)?;
        let f = lots::figures(&h, now, warn);
        let tier: Option<String> =
            self.conn
                .query_row("SELECT tier FROM customers WHERE id = ?1", [id], |r| r.get(0))?;
        let held = super::holds::held_points(&self.conn, id, now)?;
        Ok(BalanceView {
            customer: customer_view(&self.conn, id)?,
            available: f.available - held,
            held,
            pending: f.pending,
            expiring: Expiring {
                points: f.expiring_soon,
                date: f.next_expiry.map(|e| e.0),
                date_points: f.next_expiry.map_or(0, |e| e.1),
                within_days: warn.num_days(),
            },
            debt: h.debt,
            tier,
            referral_code: self.referral_code(id)?,
            memberships: super::state::memberships_in_force(&self.conn, id, now)?,
            vouchers: self.vouchers_of(id, now)?,
        })
    }

    fn vouchers_of(&self, id: i64, now: DateTime<Utc>) -> Result<Vec<VoucherView>> {
        let mut st = self.conn.prepare_cached(
            "SELECT code, product, CASE WHEN state = 'issued' AND expires_at <= ?2 THEN 'expired' \
                      WHEN state = 'issued' AND EXISTS (SELECT 1 FROM outbox o WHERE o.state = 'delivered' \
                        AND o.idem_key IN ('amocrm:notes:voucher:' || v.id, 'notify:email:voucher:' || v.id, \
                          'notify:telegram:voucher:' || v.id, 'notify:salesbot:voucher:' || v.id)) THEN 'sent' \
                      ELSE state END, \
                    issued_at, expires_at, used_at, \
                    COALESCE((SELECT p.name FROM catalog_products p WHERE p.id = v.product), v.product) \
             FROM vouchers v WHERE customer_id = ?1 AND state != 'cancelled' ORDER BY issued_at DESC, id DESC",
        )?;
        let rows = st
            .query_map(params![id, ts(now)], |r| {
                Ok(VoucherView {
                    code: r.get(0)?,
                    product: r.get(1)?,
                    state: r.get(2)?,
                    issued_at: from_ts(r.get(3)?),
                    expires_at: r.get::<_, Option<i64>>(4)?.map(from_ts),
                    used_at: r.get::<_, Option<i64>>(5)?.map(from_ts),
                    item: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn customer_ids(&self) -> Result<Vec<i64>> {
        let mut st = self.conn.prepare("SELECT id FROM customers ORDER BY id")?;
        Ok(st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?)
    }

    pub fn history(&self, customer: &str) -> Result<(CustomerView, Vec<HistoryEntry>)> {
        let id = find_customer(&self.conn, customer)?;
        let mut st = self.conn.prepare(
            "SELECT j.id, j.kind, j.role, j.amount, j.effective_at, j.recorded_at, d.source, d.doc_id, d.number, \
             j.reverses, j.actor, j.explanation, j.document_id FROM journal j LEFT JOIN documents d ON d.id = j.document_id \
             WHERE j.customer_id = ?1 ORDER BY j.id",
        )?;
        let entries = st
            .query_map([id], |r| {
                Ok(HistoryEntry {
                    tx_id: r.get(0)?,
                    kind: r.get(1)?,
                    role: r.get(2)?,
                    points: r.get(3)?,
                    effective_at: from_ts(r.get(4)?),
                    recorded_at: from_ts(r.get(5)?),
                    source: r.get(6)?,
                    doc_id: r.get(7)?,
                    number: r.get(8)?,
                    reverses: r.get(9)?,
                    actor: r.get(10)?,
                    explanation: super::explanation_read(&self.conn, r.get_ref(11)?, r.get(12)?)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((customer_view(&self.conn, id)?, entries))
    }

    /// Totals for a period of business dates. Flows (sales, points accrued, …) count what
    /// happened in the period; `points_pending`/`points_available` are balances at the end
    /// of the period (`now` when it is open-ended).
    /// All time (no bounds) is read from the totals the ledger keeps (`totals.rs`), so a
    /// monitor can ask for it often; [`Ledger::summary_counted`] gives the same figures
    /// counted from the rows.
    pub fn summary(&self, range: &DateRange, now: DateTime<Utc>) -> Result<Summary> {
        if range.from.is_none() && range.to.is_none() {
            return self.summary_kept(now);
        }
        self.summary_counted(range, now)
    }

    /// The summary counted from the rows themselves, whatever the period.
    pub fn summary_counted(&self, range: &DateRange, now: DateTime<Utc>) -> Result<Summary> {
        let (from, to) = range.bounds();
        let c = &self.conn;
        let mut s = Summary::default();
        c.query_row(
            "SELECT \
               COALESCE(SUM(kind = 'sale' AND state = 'active'), 0), \
               COALESCE(SUM(CASE WHEN kind = 'sale' AND state = 'active' THEN total END), 0), \
               COALESCE(SUM(kind = 'return' AND state = 'active'), 0), \
               COALESCE(SUM(CASE WHEN kind = 'return' AND state = 'active' THEN total END), 0), \
               COALESCE(SUM(state = 'void'), 0) \
             FROM documents WHERE COALESCE(occurred_at, 0) >= ?1 AND COALESCE(occurred_at, 0) < ?2",
            params![from, to],
            |r| {
                s.sales_count = r.get(0)?;
                let sales: i64 = r.get(1)?;
                s.returns_count = r.get(2)?;
                s.returns_total_kopecks = r.get(3)?;
                s.sales_total_kopecks = sales - s.returns_total_kopecks;
                s.voided_documents = r.get(4)?;
                Ok(())
            },
        )?;
        let mut st = c.prepare(
            "SELECT kind, COALESCE(SUM(amount), 0) FROM journal WHERE effective_at >= ?1 AND effective_at < ?2 GROUP BY kind",
        )?;
        let rows = st.query_map(params![from, to], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (kind, sum) = row?;
            s.add_flow(&kind, sum)?;
        }
        // a customer exists from their first document (a backfill creates them all at once,
        // yet they bought long before); one with no document from when kopilka learnt of them
        s.customers = c.query_row(
            "SELECT COUNT(*) FROM customers c WHERE COALESCE( \
               (SELECT MIN(d.occurred_at) FROM documents d WHERE d.customer_id = c.id), c.created_at) < ?1",
            [to],
            |r| r.get(0),
        )?;
        s.points_at_start = c.query_row(
            "SELECT COALESCE(SUM(p.amount), 0) FROM postings p JOIN journal j ON j.id = p.tx_id \
             WHERE p.account = 'customer' AND j.effective_at < ?1",
            [from],
            |r| r.get(0),
        )?;
        // Balances at the end of the period: the customer postings up to then, split by
        // whether their lot was usable by then; postings without a lot are debt.
        let at = range.to.unwrap_or(now);
        c.query_row(
            "SELECT \
               COALESCE(SUM(CASE WHEN p.lot_id IS NOT NULL AND l.available_at <= ?2 THEN p.amount END), 0), \
               COALESCE(SUM(CASE WHEN p.lot_id IS NOT NULL AND l.available_at > ?2 THEN p.amount END), 0), \
               COALESCE(SUM(CASE WHEN p.lot_id IS NULL THEN p.amount END), 0) \
             FROM postings p JOIN journal j ON j.id = p.tx_id LEFT JOIN lots l ON l.id = p.lot_id \
             WHERE p.account = 'customer' AND j.effective_at < ?1",
            params![to, ts(at)],
            |r| {
                let available: i64 = r.get(0)?;
                s.points_pending = r.get(1)?;
                let debt: i64 = r.get(2)?;
                s.points_debt = -debt;
                s.points_available = available + debt;
                Ok(())
            },
        )?;
        s.quarantined = unresolved_quarantine(c)?;
        Ok(s)
    }

    /// Points issued and redeemed per partner in a period, for settlement between the
    /// shops of a coalition program.
    pub fn partner_totals(&self, range: &DateRange, point_value: Money) -> Result<Vec<PartnerTotals>> {
        let (from, to) = range.bounds();
        let mut st = self.conn.prepare(
            "SELECT partner, \
               COALESCE(SUM(CASE WHEN kind IN ('accrual','bonus') OR (kind = 'reversal' AND amount < 0) \
                 THEN amount END), 0), \
               COALESCE(-SUM(CASE WHEN kind = 'redemption' OR (kind = 'reversal' AND amount > 0) THEN amount END), 0), \
               COUNT(DISTINCT document_id) \
             FROM journal WHERE partner IS NOT NULL AND effective_at >= ?1 AND effective_at < ?2 \
             GROUP BY partner ORDER BY partner",
        )?;
        Ok(st
            .query_map(params![from, to], |r| {
                let (issued, redeemed): (i64, i64) = (r.get(1)?, r.get(2)?);
                let pv = point_value.0;
                Ok(PartnerTotals {
                    partner: r.get(0)?,
                    points_issued: issued,
                    points_redeemed: redeemed,
                    documents: r.get(3)?,
                    issued_kopecks: issued * pv,
                    redeemed_kopecks: redeemed * pv,
                    net_kopecks: (issued - redeemed) * pv,
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Streams the sales in force in a period, in date order, as the rules saw them (lines
    /// with their stored cost), for `kopilka simulate` and other replays. The groups above a
    /// line's category are not stored with it: they come from the catalog as it stands, so
    /// a rule for a parent group is simulated on the products below it.
    /// What the ledger itself issued in a period, for `simulate`'s baseline: per sale of the
    /// period (accrual and bonuses in force), what was issued without a sale, and what may
    /// make a replay of the same rules differ on a sale (issue 16, point 7).
    pub fn issued_figures(&self, range: &DateRange) -> Result<LedgerIssued> {
        let (from, to) = range.bounds();
        let mut out = LedgerIssued::default();
        let mut st = self.conn.prepare(
            "SELECT d.id, COALESCE(SUM(j.amount), 0) FROM documents d \
               LEFT JOIN journal j ON j.document_id = d.id AND j.epoch = d.epoch AND j.role = 'effect' \
                 AND j.kind IN ('accrual', 'bonus') \
             WHERE d.kind = 'sale' AND d.state = 'active' AND d.occurred_at >= ?1 AND d.occurred_at < ?2 \
             GROUP BY d.id",
        )?;
        let rows = st.query_map(params![from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (id, points) = row?;
            out.on_sales += points;
            out.by_sale.insert(id, points);
        }
        let (without_sale, adjustments, taken_back): (i64, i64, i64) = self.conn.query_row(
            "SELECT COALESCE(SUM(CASE WHEN j.kind = 'bonus' AND j.document_id IS NULL THEN j.amount END), 0), \
                    COALESCE(SUM(CASE WHEN j.kind = 'adjustment' THEN j.amount END), 0), \
                    COALESCE(SUM(CASE WHEN j.kind = 'reversal' AND j.role = 'effect' AND d.kind = 'return' \
                                       AND j.reverses IN (SELECT id FROM journal WHERE kind IN ('accrual', 'bonus')) \
                                      THEN j.amount END), 0) \
             FROM journal j LEFT JOIN documents d ON d.id = j.document_id \
             WHERE j.effective_at >= ?1 AND j.effective_at < ?2",
            params![from, to],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        out.bonuses_without_sale = without_sale;
        out.adjustments = adjustments;
        out.taken_back_by_returns = taken_back;
        // a sale of the same customer recorded on the other side of this one than its date
        // says: the ledger evaluated one of them on a state the date-ordered replay does not
        // have (the late sale saw the later one; the later one did not see the late one)
        let mut st = self.conn.prepare(
            "SELECT d.id FROM documents d WHERE d.kind = 'sale' AND d.state = 'active' \
               AND d.customer_id IS NOT NULL AND d.occurred_at >= ?1 AND d.occurred_at < ?2 \
               AND EXISTS (SELECT 1 FROM documents o WHERE o.customer_id = d.customer_id \
                 AND o.kind = 'sale' AND o.state = 'active' \
                 AND ((o.occurred_at < d.occurred_at AND o.id > d.id) \
                   OR (o.occurred_at > d.occurred_at AND o.id < d.id)))",
        )?;
        out.out_of_order = st
            .query_map(params![from, to], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        // applied again after an edit or an unposting: evaluated on the customer's state of
        // that moment (tier, later sales), not of the sale's date
        let mut st = self.conn.prepare(
            "SELECT id FROM documents WHERE kind = 'sale' AND state = 'active' AND epoch > 1 \
               AND occurred_at >= ?1 AND occurred_at < ?2",
        )?;
        out.reapplied = st
            .query_map(params![from, to], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        // a return of the customer dated before the sale: the ledger's counters had it, the
        // replay (sales only) does not
        let mut st = self.conn.prepare(
            "SELECT d.id FROM documents d WHERE d.kind = 'sale' AND d.state = 'active' \
               AND d.occurred_at >= ?1 AND d.occurred_at < ?2 AND EXISTS (SELECT 1 FROM documents r \
                 WHERE r.kind = 'return' AND r.applied = 1 AND r.customer_id = d.customer_id \
                   AND r.occurred_at < d.occurred_at)",
        )?;
        out.after_return = st
            .query_map(params![from, to], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(out)
    }

    pub fn for_each_sale(&self, range: &DateRange, mut f: impl FnMut(SimSale)) -> Result<usize> {
        let (from, to) = range.bounds();
        let mut st = self.conn.prepare(
            "SELECT d.id, d.source, d.doc_id, d.version, d.number, d.occurred_at, d.customer_id, d.currency, \
               d.total, d.points_redeemed, d.store, d.partner, \
               l.product_id, l.name, l.category, l.quantity, l.unit_price, l.discount, l.net, l.unit_cost, l.service \
             FROM documents d JOIN document_lines l ON l.document_id = d.id \
             WHERE d.kind = 'sale' AND d.state = 'active' AND d.occurred_at >= ?1 AND d.occurred_at < ?2 \
             ORDER BY d.occurred_at, d.id, l.line_no",
        )?;
        let mut rows = st.query(params![from, to])?;
        let mut current: Option<(i64, SimSale)> = None;
        let mut n = 0;
        let mut products: HashMap<String, catalog::ProductRow> = HashMap::new();
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            if current.as_ref().is_none_or(|(cur, _)| *cur != id) {
                if let Some((_, sale)) = current.take() {
                    f(sale);
                    n += 1;
                }
                let doc = Document {
                    source: SourceRef {
                        system: r.get(1)?,
                        doc_id: r.get(2)?,
                        version: super::version_at(r, 3)?,
                        stamp: None,
                    },
                    kind: DocKind::Sale,
                    number: r.get(4)?,
                    occurred_at: from_ts(r.get::<_, Option<i64>>(5)?.unwrap_or(0)),
                    customer: Default::default(),
                    currency: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                    lines: Vec::new(),
                    total: Money(r.get(8)?),
                    points_redeemed: Points(r.get(9)?),
                    original: None,
                    store: r.get(10)?,
                    partner: r.get(11)?,
                };
                current = Some((
                    id,
                    SimSale {
                        id,
                        customer: r.get(6)?,
                        doc,
                    },
                ));
            }
            if let Some((_, sale)) = current.as_mut() {
                let mut line = Line {
                    product_id: r.get(12)?,
                    name: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
                    category: r.get(14)?,
                    category_parents: Vec::new(),
                    quantity: r.get::<_, String>(15)?.parse().unwrap_or_default(),
                    unit_price: Money(r.get(16)?),
                    discount: Money(r.get(17)?),
                    net: Money(r.get(18)?),
                    unit_cost: r.get::<_, Option<i64>>(19)?.map(Money),
                    service: r.get(20)?,
                };
                let base = line
                    .product_id
                    .split('#')
                    .next()
                    .unwrap_or(&line.product_id)
                    .to_string();
                if !products.contains_key(&base) {
                    let row = catalog::product_row(&self.conn, &base)?;
                    products.insert(base.clone(), row);
                }
                if let Some(Some((path, _))) = products.get(&base) {
                    line.category_parents = catalog::parents_of(&line, path);
                }
                sale.doc.lines.push(line);
            }
        }
        if let Some((_, sale)) = current.take() {
            f(sale);
            n += 1;
        }
        Ok(n)
    }

    /// Points moved per hour and kind in `[from, to)`; the caller buckets hours into local
    /// days (an hour never straddles two days in any zone with whole-hour offsets).
    pub fn points_by_hour(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(DateTime<Utc>, String, i64)>> {
        let mut st = self.conn.prepare(
            "SELECT (effective_at / 3600) * 3600 AS h, kind, SUM(amount) FROM journal \
             WHERE effective_at >= ?1 AND effective_at < ?2 GROUP BY h, kind ORDER BY h",
        )?;
        Ok(st
            .query_map(params![ts(from), ts(to)], |r| {
                Ok((from_ts(r.get(0)?), r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Sales in force where points paid at the till took lines below cost, newest first.
    pub fn loss_makers(&self, limit: usize) -> Result<Vec<LossMaker>> {
        let mut st = self.conn.prepare(
            "SELECT source, doc_id, number, occurred_at, loss, customer_id FROM documents \
             WHERE loss > 0 AND state = 'active' ORDER BY occurred_at DESC LIMIT ?1",
        )?;
        Ok(st
            .query_map([limit as i64], |r| {
                Ok(LossMaker {
                    source: r.get(0)?,
                    doc_id: r.get(1)?,
                    number: r.get(2)?,
                    occurred_at: from_ts(r.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                    loss_kopecks: r.get(4)?,
                    customer_id: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    pub fn quarantine_list(&self, include_resolved: bool) -> Result<Vec<QuarantineEntry>> {
        let mut st = self.conn.prepare(
            "SELECT id, source, doc_ref, version, reason, location, excerpt, first_seen_at, last_seen_at, seen_count, \
             doc_kind, number, occurred_at FROM quarantine WHERE ?1 OR resolved_at IS NULL ORDER BY id",
        )?;
        Ok(st
            .query_map([include_resolved], |r| {
                Ok(QuarantineEntry {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    doc_ref: r.get(2)?,
                    version: r.get(3)?,
                    reason: r.get(4)?,
                    location: r.get(5)?,
                    excerpt: r.get(6)?,
                    first_seen_at: from_ts(r.get(7)?),
                    last_seen_at: from_ts(r.get(8)?),
                    seen_count: r.get(9)?,
                    kind: r.get(10)?,
                    number: r.get(11)?,
                    occurred_at: r.get::<_, Option<i64>>(12)?.map(from_ts),
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }
}

/// What the event programs did, for the demo and `kopilka summary`: how many referral
/// pairs and birthday bonuses were paid, the vouchers by state and the memberships.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProgramsReport {
    pub referral_pairs: i64,
    pub referral_points: i64,
    pub birthday_bonuses: i64,
    pub birthday_points: i64,
    pub vouchers_issued: i64,
    /// Of the issued ones: announced by a delivered note or message, not used, not expired.
    pub vouchers_sent: i64,
    pub vouchers_used: i64,
    pub vouchers_expired: i64,
    pub memberships_in_force: i64,
    /// Bought memberships whose term ended and were not renewed.
    pub memberships_lapsed: i64,
    /// Bought memberships whose fee was returned (or its sale unposted).
    pub memberships_ended: i64,
}

impl Ledger {
    pub fn programs_report(&self, now: DateTime<Utc>) -> Result<ProgramsReport> {
        let mut r = ProgramsReport::default();
        let (n, p): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM journal \
             WHERE role = 'effect' AND rule_id = (SELECT id FROM rule_names WHERE name = 'referral:referee') \
             AND reverses IS NULL",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let referrer: i64 = self.conn.query_row(
            "SELECT COALESCE(SUM(amount), 0) FROM journal \
             WHERE role = 'effect' AND rule_id = (SELECT id FROM rule_names WHERE name = 'referral:referrer') \
             AND reverses IS NULL",
            [],
            |row| row.get(0),
        )?;
        (r.referral_pairs, r.referral_points) = (n, p + referrer);
        (r.birthday_bonuses, r.birthday_points) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM journal \
             WHERE role = 'effect' AND rule_id = (SELECT id FROM rule_names WHERE name = 'birthday') \
             AND reverses IS NULL",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        (r.vouchers_issued, r.vouchers_used, r.vouchers_expired) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(state = 'used'), 0), \
                    COALESCE(SUM(state = 'issued' AND expires_at <= ?1), 0) \
             FROM vouchers WHERE state != 'cancelled'",
            [ts(now)],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        r.vouchers_sent = self.conn.query_row(
            "SELECT COUNT(*) FROM vouchers v WHERE v.state = 'issued' AND (v.expires_at IS NULL OR v.expires_at > ?1) \
               AND EXISTS (SELECT 1 FROM outbox o WHERE o.state = 'delivered' \
                 AND o.idem_key IN ('amocrm:notes:voucher:' || v.id, 'notify:email:voucher:' || v.id, \
                   'notify:telegram:voucher:' || v.id, 'notify:salesbot:voucher:' || v.id))",
            [ts(now)],
            |row| row.get(0),
        )?;
        let customers: Vec<i64> = self
            .conn
            .prepare("SELECT DISTINCT customer_id FROM memberships")?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for c in customers {
            let in_force = super::state::memberships_in_force(&self.conn, c, now)?;
            let bought: Vec<(String, Option<i64>)> = self
                .conn
                .prepare_cached("SELECT program, until FROM memberships WHERE customer_id = ?1")?
                .query_map([c], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (program, until) in bought {
                if in_force.iter().any(|(p, _)| *p == program) {
                    r.memberships_in_force += 1;
                } else if until.is_some_and(|u| u <= ts(now))
                    && super::state::memberships_in_force(&self.conn, c, from_ts(until.unwrap_or(0) - 1))?
                        .iter()
                        .any(|(p, _)| *p == program)
                {
                    // in force just before its end: the term ran out
                    r.memberships_lapsed += 1;
                } else {
                    r.memberships_ended += 1;
                }
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// A customer's open lots are read from `lots_open` alone (migration 35): at a million
    /// sales each lot's row was a page read of its own. The nightly expiry's two reads by
    /// date scan the same index, never the table.
    #[test]
    fn open_lots_are_read_from_their_index_alone() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::ledger::schema::migrate(&mut conn).expect("migrate");
        let steps = crate::ledger::query_plan(&conn, HOLDINGS_SQL, [1]);
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert!(steps[0].contains("USING COVERING INDEX lots_open"), "{steps:?}");
        for (sql, n) in [
            (crate::ledger::ingest::EXPIRING_CUSTOMERS_SQL, 1),
            (crate::ledger::jobs::WARN_SQL, 2),
        ] {
            let steps = crate::ledger::query_plan(&conn, sql, rusqlite::params_from_iter(0..n));
            assert!(
                steps.iter().any(|s| s.contains("USING COVERING INDEX lots_open")),
                "{sql}: {steps:?}"
            );
        }
    }
}
