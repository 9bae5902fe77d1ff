//! Holds: points reserved for one basket until the till or the site commits, cancels, or
//! the hold expires (ARCHITECTURE.md, "Holds").
//!
//! Every operation is one `BEGIN IMMEDIATE` transaction, so holds are serialised by SQLite's
//! write lock — also against a second process on the same file — and two holds can never
//! reserve the same points. A refused request writes nothing.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::WrittenLines;
use super::ingest::{IngestContext, NewTx, Run, finish_write, post, write_document};
use super::query::{find_customer, holdings};
use super::{CostPolicy, Ledger, LedgerError, from_ts, ts};
use crate::core::document::{DocKind, Document, Line, SourceRef};
use crate::core::effects::Committed;
use crate::core::journal::{Account, Explanation, TxKind};
use crate::core::lots;
use crate::core::money::{Money, Points};
use crate::core::program::{CustomerState, Rules};
use crate::core::rules::{QuoteRequest, RuleSet, quote};

/// The `documents.source` of commits.
pub const API_SOURCE: &str = "api";

/// Why a hold request was refused; each maps to one 4xx answer a till developer can act on.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("no customer matches {0:?}")]
    UnknownCustomer(String),
    #[error("{0:?} matches several customers: {1}")]
    AmbiguousCustomer(String, String),
    #[error("no hold {0}")]
    UnknownHold(i64),
    #[error("idempotency key {key:?} was already used with another request (hold {hold_id})")]
    KeyReused { key: String, hold_id: i64 },
    #[error("no points can be held: {reason} (available {available}, held by other holds {held})")]
    NothingToHold {
        reason: String,
        available: i64,
        held: i64,
    },
    #[error("{wanted} points asked for, at most {max} can be held: limited by {reason}")]
    NotEnough { wanted: i64, max: i64, reason: String },
    #[error("hold {hold_id} expired at {expired_at}; create a new hold")]
    Expired { hold_id: i64, expired_at: DateTime<Utc> },
    #[error("hold {hold_id} is {state}; {action} needs a live hold")]
    Closed {
        hold_id: i64,
        state: String,
        action: &'static str,
    },
    #[error("hold {hold_id} was already committed with another request")]
    CommittedDifferently { hold_id: i64 },
    #[error("{points} points is over the hold's {held}")]
    OverHold { points: i64, held: i64 },
    #[error("the final basket takes at most {max} points: limited by {reason}")]
    BasketTooSmall { max: i64, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<rusqlite::Error> for HoldError {
    fn from(e: rusqlite::Error) -> Self {
        HoldError::Ledger(LedgerError::Sql(e))
    }
}

pub type HoldResult<T> = std::result::Result<T, HoldError>;

/// One line of a quote answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteLineAnswer {
    pub line: u32,
    pub product_id: String,
    pub max_redeem_kopecks: i64,
    pub reason: String,
}

/// What `/v1/quote` answers, and the quote part of a hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuoteAnswer {
    pub customer_id: i64,
    /// Points the customer may use now: net of every live hold (and of this one, in a hold's
    /// answer the moment it was made).
    pub available: i64,
    pub held: i64,
    pub tier: Option<String>,
    pub max_redeemable_points: i64,
    pub max_redeemable_kopecks: i64,
    pub limited_by: String,
    pub allocation_kopecks: Vec<i64>,
    pub lines: Vec<QuoteLineAnswer>,
    pub accrual_preview: serde_json::Value,
}

/// A hold as the API answers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldView {
    pub hold_id: String,
    /// `held`, `committed`, `cancelled` or `expired`.
    pub state: String,
    pub points: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(flatten)]
    pub quote: QuoteAnswer,
    /// Once committed: what the commit took and where it is in the ledger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitAnswer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitAnswer {
    pub points: i64,
    pub kopecks: i64,
    /// How the redeemed value spreads over the final basket's lines (kopecks, line order).
    pub allocation_kopecks: Vec<i64>,
    /// The ledger document of the redemption (`api:hold:N`).
    pub document: String,
    pub committed_at: DateTime<Utc>,
}

/// A customer as a till sees them: who, the points free to spend now and those live holds
/// reserve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendableView {
    pub customer: super::query::CustomerView,
    pub free: i64,
    pub held: i64,
    pub tier: Option<String>,
}

/// How 1C's later receipt is recognised as the one that used a commit (`[holds] match`).
#[derive(Clone, Copy, Debug)]
pub struct HoldMatching {
    /// Only by reference: the receipt's number is the hold's idempotency key.
    pub reference_only: bool,
    /// Otherwise also the same customer and points within this long of the commit.
    pub window: Duration,
}

/// What a hold needs from the configuration.
pub struct HoldSettings<'a> {
    pub program: &'a RuleSet,
    pub cost: Option<&'a CostPolicy>,
    pub ttl: Duration,
    pub matching: HoldMatching,
    pub ingest: &'a IngestContext<'a>,
}

pub struct HoldRequest {
    pub idempotency_key: String,
    /// The request without its key, canonical JSON: a repeat must be the same request.
    pub request: String,
    pub customer: String,
    pub lines: Vec<Line>,
    pub points_wanted: Option<i64>,
}

pub struct CommitRequest {
    /// Canonical JSON of the commit body: the same commit again answers the same.
    pub request: String,
    pub lines: Vec<Line>,
    /// Defaults to the hold's points.
    pub points: Option<i64>,
}

fn basket(lines: Vec<Line>, currency: &str, now: DateTime<Utc>) -> Document {
    Document {
        source: SourceRef {
            system: "quote".into(),
            doc_id: "quote".into(),
            version: String::new(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: None,
        occurred_at: now,
        customer: Default::default(),
        currency: currency.to_string(),
        total: Money(lines.iter().map(|l| l.net.0).sum()),
        lines,
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    }
}

/// Points reserved by live holds of a customer.
pub(crate) fn held_points(conn: &Connection, customer: i64, now: DateTime<Utc>) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "SELECT COALESCE(SUM(points), 0) FROM holds WHERE customer_id = ?1 AND state = 'held' AND expires_at > ?2",
    )?
    .query_row(params![customer, ts(now)], |r| r.get(0))
}

fn customer_by_text(conn: &Connection, text: &str) -> HoldResult<i64> {
    find_customer(conn, text).map_err(|e| match e {
        LedgerError::UnknownCustomer(c) => HoldError::UnknownCustomer(c),
        LedgerError::AmbiguousCustomer(c, m) => HoldError::AmbiguousCustomer(c, m),
        other => HoldError::Ledger(other),
    })
}

/// What a customer may spend now, and what live holds reserve beside it.
#[derive(Clone, Copy)]
struct Spendable {
    available: i64,
    held: i64,
}

/// The quote of a basket for a customer who may spend `spendable.available` points.
fn quote_for(
    conn: &Connection,
    program: &RuleSet,
    customer: i64,
    doc: &mut Document,
    spendable: Spendable,
    points_wanted: Option<i64>,
    now: DateTime<Utc>,
) -> HoldResult<QuoteAnswer> {
    let tier: Option<String> = conn
        .prepare_cached("SELECT tier FROM customers WHERE id = ?1")?
        .query_row([customer], |r| r.get(0))?;
    let Spendable { available, held } = spendable;
    let state = CustomerState {
        customer_id: Some(customer),
        available,
        tier: tier.clone(),
        prior_sales: 1,
        ..Default::default()
    };
    let q = quote(
        program,
        &QuoteRequest {
            lines: doc.lines.clone(),
            points_wanted,
        },
        &state,
    );
    doc.points_redeemed = Points(q.max_redeemable_points);
    let preview = program.evaluate(doc, &state, now);
    let pv = program.point_value.0;
    Ok(QuoteAnswer {
        customer_id: customer,
        available,
        held,
        tier,
        max_redeemable_points: q.max_redeemable_points,
        max_redeemable_kopecks: q.max_redeemable_points * pv,
        limited_by: q.limited_by,
        allocation_kopecks: q.allocation,
        lines: q
            .lines
            .into_iter()
            .map(|l| QuoteLineAnswer {
                line: l.line,
                product_id: l.product,
                max_redeem_kopecks: l.max_redeem_kopecks,
                reason: l.reason,
            })
            .collect(),
        accrual_preview: serde_json::json!({
            "points": preview.accrual,
            "explanation": preview.explanation,
            "flags": preview.flags,
        }),
    })
}

/// The answer for a hold with no basket yet: a till that reserves the card's points when the
/// card is scanned («Сервер лояльности», `BlockBonuses=1`), before any line is known. The
/// whole free balance (or `points_wanted` of it) is held; the guard acts at the till through
/// the share of a receipt it is told points may pay (`PaymentPercent`).
fn whole_balance(
    conn: &Connection,
    program: &RuleSet,
    customer: i64,
    spendable: Spendable,
    points_wanted: Option<i64>,
) -> HoldResult<QuoteAnswer> {
    let tier: Option<String> = conn
        .prepare_cached("SELECT tier FROM customers WHERE id = ?1")?
        .query_row([customer], |r| r.get(0))?;
    let Spendable { available, held } = spendable;
    let points = points_wanted.map_or(available, |w| w.min(available)).max(0);
    let pv = program.point_value.0;
    Ok(QuoteAnswer {
        customer_id: customer,
        available,
        held,
        tier,
        max_redeemable_points: points,
        max_redeemable_kopecks: points * pv,
        limited_by: "the balance: no basket yet (a till holds at card scan)".into(),
        allocation_kopecks: Vec::new(),
        lines: Vec::new(),
        accrual_preview: serde_json::Value::Null,
    })
}

/// Usable points now: the lots' available figure minus live holds.
fn free_points(
    conn: &Connection,
    customer: i64,
    now: DateTime<Utc>,
    warn: Duration,
) -> HoldResult<(i64, i64)> {
    let h = holdings(conn, customer)?;
    let f = lots::figures(&h, now, warn);
    let held = held_points(conn, customer, now)?;
    Ok(((f.available - held).max(0), held))
}

struct HoldRow {
    id: i64,
    idem_key: String,
    request: String,
    customer_id: i64,
    points: i64,
    quote: String,
    created_at: i64,
    expires_at: i64,
    state: String,
    commit_request: Option<String>,
    commit_answer: Option<String>,
}

const HOLD_COLS: &str = "id, idem_key, request, customer_id, points, quote, created_at, expires_at, state, \
     commit_request, commit_answer";

fn hold_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HoldRow> {
    Ok(HoldRow {
        id: r.get(0)?,
        idem_key: r.get(1)?,
        request: r.get(2)?,
        customer_id: r.get(3)?,
        points: r.get(4)?,
        quote: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        state: r.get(8)?,
        commit_request: r.get(9)?,
        commit_answer: r.get(10)?,
    })
}

fn load_hold(conn: &Connection, id: i64) -> HoldResult<HoldRow> {
    conn.prepare_cached(&format!("SELECT {HOLD_COLS} FROM holds WHERE id = ?1"))?
        .query_row([id], hold_from_row)
        .optional()?
        .ok_or(HoldError::UnknownHold(id))
}

fn corrupt(what: &str, e: serde_json::Error) -> HoldError {
    HoldError::Ledger(LedgerError::Corrupt(format!("{what}: {e}")))
}

impl HoldRow {
    /// The state as of `now`: a live hold past its expiry is expired, written or not.
    fn state_at(&self, now: DateTime<Utc>) -> &str {
        if self.state == "held" && self.expires_at <= ts(now) {
            "expired"
        } else {
            &self.state
        }
    }

    fn view(&self, now: DateTime<Utc>) -> HoldResult<HoldView> {
        let quote: QuoteAnswer = serde_json::from_str(&self.quote).map_err(|e| corrupt("hold quote", e))?;
        let commit = match &self.commit_answer {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| corrupt("hold commit", e))?),
            None => None,
        };
        Ok(HoldView {
            hold_id: self.id.to_string(),
            state: self.state_at(now).to_string(),
            points: self.points,
            created_at: from_ts(self.created_at),
            expires_at: from_ts(self.expires_at),
            quote,
            commit,
        })
    }
}

fn doc_ref(hold: i64) -> String {
    format!("hold:{hold}")
}

impl Ledger {
    /// Points reserved by live holds of a customer.
    pub fn held_points(&self, customer: i64, now: DateTime<Utc>) -> super::Result<i64> {
        Ok(held_points(&self.conn, customer, now)?)
    }

    /// Reserves points for a basket. The same key with the same request answers the stored
    /// hold; with another request it is refused.
    pub fn hold(&mut self, req: HoldRequest, s: &HoldSettings<'_>) -> HoldResult<HoldView> {
        let now = s.ingest.now;
        if req.idempotency_key.trim().is_empty() {
            return Err(HoldError::Invalid("idempotency_key must not be empty".into()));
        }
        if let Some(w) = req.points_wanted
            && w <= 0
        {
            return Err(HoldError::Invalid(format!(
                "points_wanted must be positive, got {w}"
            )));
        }
        // the catalog fills unknown costs before the write lock is taken: a read
        let mut doc = basket(req.lines, &s.ingest.limits.currency, now);
        self.complete_from_catalog(&mut doc, s.cost)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let prior = tx
            .prepare_cached(&format!("SELECT {HOLD_COLS} FROM holds WHERE idem_key = ?1"))?
            .query_row([&req.idempotency_key], hold_from_row)
            .optional()?;
        if let Some(h) = prior {
            if h.request != req.request {
                return Err(HoldError::KeyReused {
                    key: h.idem_key,
                    hold_id: h.id,
                });
            }
            return h.view(now);
        }
        let customer = customer_by_text(&tx, &req.customer)?;
        let (available, held) = free_points(&tx, customer, now, s.ingest.warn_before)?;
        let spendable = Spendable { available, held };
        let mut answer = if doc.lines.is_empty() {
            whole_balance(&tx, s.program, customer, spendable, req.points_wanted)?
        } else {
            quote_for(
                &tx,
                s.program,
                customer,
                &mut doc,
                spendable,
                req.points_wanted,
                now,
            )?
        };
        let points = answer.max_redeemable_points;
        if let Some(w) = req.points_wanted
            && points < w
        {
            return Err(HoldError::NotEnough {
                wanted: w,
                max: points,
                reason: answer.limited_by,
            });
        }
        if points <= 0 {
            return Err(HoldError::NothingToHold {
                reason: answer.limited_by,
                available,
                held,
            });
        }
        // the answer shows the customer's state with this hold in place
        answer.available = available - points;
        answer.held = held + points;
        let quote_text = serde_json::to_string(&answer).map_err(|e| corrupt("hold quote", e))?;
        // holds of this customer that ran out are marked so; readers already ignore them
        tx.prepare_cached(
            "UPDATE holds SET state = 'expired', closed_at = expires_at \
             WHERE customer_id = ?1 AND state = 'held' AND expires_at <= ?2",
        )?
        .execute(params![customer, ts(now)])?;
        let expires = now + s.ttl;
        let id: i64 = tx
            .prepare_cached(
                "INSERT INTO holds (idem_key, request, customer_id, points, quote, created_at, expires_at, state) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'held') RETURNING id",
            )?
            .query_row(
                params![
                    req.idempotency_key,
                    req.request,
                    customer,
                    points,
                    quote_text,
                    ts(now),
                    ts(expires)
                ],
                |r| r.get(0),
            )?;
        let row = load_hold(&tx, id)?;
        tx.commit()?;
        row.view(now)
    }

    /// The hold as it stands now.
    pub fn hold_view(&self, id: i64, now: DateTime<Utc>) -> HoldResult<HoldView> {
        load_hold(&self.conn, id)?.view(now)
    }

    /// Spends a live hold on the final basket: the redemption becomes an `api` document with
    /// its journal transaction, lots FIFO and outbox rows, in one transaction.
    pub fn commit_hold(&mut self, id: i64, req: CommitRequest, s: &HoldSettings<'_>) -> HoldResult<HoldView> {
        let now = s.ingest.now;
        let mut doc = basket(req.lines, &s.ingest.limits.currency, now);
        self.complete_from_catalog(&mut doc, s.cost)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let hold = load_hold(&tx, id)?;
        match hold.state_at(now) {
            "held" => {}
            "committed" => {
                if hold.commit_request.as_deref() == Some(req.request.as_str()) {
                    return hold.view(now);
                }
                return Err(HoldError::CommittedDifferently { hold_id: id });
            }
            "expired" => {
                return Err(HoldError::Expired {
                    hold_id: id,
                    expired_at: from_ts(hold.expires_at),
                });
            }
            other => {
                return Err(HoldError::Closed {
                    hold_id: id,
                    state: other.to_string(),
                    action: "commit",
                });
            }
        }
        let points = req.points.unwrap_or(hold.points);
        if points <= 0 {
            return Err(HoldError::Invalid(format!(
                "points must be positive, got {points}"
            )));
        }
        if points > hold.points {
            return Err(HoldError::OverHold {
                points,
                held: hold.points,
            });
        }
        // the final basket under the guard, with exactly the hold's points to spend; a till
        // that names no basket (the «Сервер лояльности» write-off) was bounded by the share
        // of the receipt it was told it may pay with points
        let allocation_kopecks = if doc.lines.is_empty() {
            Vec::new()
        } else {
            let q = quote_for(
                &tx,
                s.program,
                hold.customer_id,
                &mut doc,
                Spendable {
                    available: hold.points,
                    held: 0,
                },
                Some(points),
                now,
            )?;
            if q.max_redeemable_points < points {
                return Err(HoldError::BasketTooSmall {
                    max: q.max_redeemable_points,
                    reason: q.limited_by,
                });
            }
            q.allocation_kopecks
        };
        let since = super::accounting::journal_head(&tx)?;
        let document = Document {
            source: SourceRef {
                system: API_SOURCE.into(),
                doc_id: doc_ref(id),
                version: "1".into(),
                stamp: None,
            },
            number: Some(format!("hold {id}")),
            points_redeemed: Points(points),
            ..doc
        };
        let doc_id = write_document(&tx, None, &document, Some(hold.customer_id), now)?;
        // a redemption, not a sale: the sale and its accrual arrive with 1C's receipt
        tx.prepare_cached("UPDATE documents SET kind_code = NULL, applied = 1, epoch = 1 WHERE id = ?1")?
            .execute([doc_id])?;
        let mut h = holdings(&tx, hold.customer_id)?;
        let moves = lots::plan_debit(&h, points, &[], now);
        let explanation = Explanation::text(format!("{points} points paid through hold {id}"));
        let key = doc_ref(id);
        post(
            &tx,
            NewTx {
                kind: TxKind::Redemption,
                role: "effect",
                customer_id: hold.customer_id,
                document_id: Some(doc_id),
                epoch: Some(1),
                reverses: None,
                effective_at: now,
                explanation: &explanation,
                lines: WrittenLines::NONE,
                actor: None,
                idem_key: Some(&key),
                partner: None,
                rule: None,
                counter: Account::Redemption,
                moves,
                new_lot: None,
            },
            &mut h,
            now,
        )?;
        let mut run = Run {
            ctx: s.ingest,
            touched: BTreeSet::from([hold.customer_id]),
            flags: Vec::new(),
            held: Default::default(),
            line_products: Default::default(),
        };
        run.settle_debt(&tx, hold.customer_id, &mut h, Some((doc_id, 1)), now)?;
        finish_write(&tx, since, &run.touched, s.ingest)?;
        let answer = CommitAnswer {
            points,
            kopecks: points * s.program.point_value.0,
            allocation_kopecks,
            document: format!("{API_SOURCE}:{key}"),
            committed_at: now,
        };
        let answer_text = serde_json::to_string(&answer).map_err(|e| corrupt("hold commit", e))?;
        tx.prepare_cached(
            "UPDATE holds SET state = 'committed', closed_at = ?2, commit_request = ?3, committed_points = ?4, \
             commit_answer = ?5, document_id = ?6, match_by = ?7, match_from = ?8, match_until = ?9 WHERE id = ?1",
        )?
        .execute(params![
            id,
            ts(now),
            req.request,
            points,
            answer_text,
            doc_id,
            if s.matching.reference_only {
                "reference"
            } else {
                "card_points_time"
            },
            ts(now - s.matching.window),
            ts(now + s.matching.window)
        ])?;
        let row = load_hold(&tx, id)?;
        tx.commit()?;
        row.view(now)
    }

    /// Releases a live hold. Cancelling a hold that is already cancelled or expired answers
    /// its state (its points are free either way); a committed hold cannot be cancelled.
    pub fn cancel_hold(&mut self, id: i64, now: DateTime<Utc>) -> HoldResult<HoldView> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let hold = load_hold(&tx, id)?;
        match hold.state_at(now) {
            "held" => {
                tx.prepare_cached("UPDATE holds SET state = 'cancelled', closed_at = ?2 WHERE id = ?1")?
                    .execute(params![id, ts(now)])?;
            }
            "committed" => {
                return Err(HoldError::Closed {
                    hold_id: id,
                    state: "committed".into(),
                    action: "cancel",
                });
            }
            _ => {}
        }
        let row = load_hold(&tx, id)?;
        tx.commit()?;
        row.view(now)
    }

    /// A customer found by card, phone, e-mail or key, with the points free now (available
    /// less live holds) and the points live holds reserve.
    pub fn spendable(&self, customer: &str, now: DateTime<Utc>) -> HoldResult<SpendableView> {
        let id = customer_by_text(&self.conn, customer)?;
        let (free, held) = free_points(&self.conn, id, now, Duration::zero())?;
        let tier: Option<String> = self
            .conn
            .prepare_cached("SELECT tier FROM customers WHERE id = ?1")?
            .query_row([id], |r| r.get(0))?;
        Ok(SpendableView {
            customer: super::query::customer_view(&self.conn, id)?,
            free,
            held,
            tier,
        })
    }

    /// Live holds of a customer whose idempotency key starts with `key_prefix` (one till
    /// protocol's own holds), oldest first: (hold id, points).
    pub fn live_holds(
        &self,
        customer: i64,
        key_prefix: &str,
        now: DateTime<Utc>,
    ) -> super::Result<Vec<(i64, i64)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, points FROM holds WHERE customer_id = ?1 AND state = 'held' AND expires_at > ?2 \
             AND substr(idem_key, 1, length(?3)) = ?3 ORDER BY id",
        )?;
        Ok(st
            .query_map(params![customer, ts(now), key_prefix], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Holds by outcome (`held`, `committed`, `cancelled`, `expired`) as of `now`.
    /// From the kept totals; a hold still `held` past its expiry (the job closes it within
    /// minutes) is counted as expired, read through the index of live holds.
    pub fn hold_counts(&self, now: DateTime<Utc>) -> super::Result<Vec<(String, i64)>> {
        let mut counts: std::collections::BTreeMap<String, i64> = super::totals::kept(&self.conn, "holds:")?
            .into_iter()
            .map(|(state, n, _)| (state, n))
            .collect();
        let lapsed: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM holds INDEXED BY holds_live WHERE state = 'held' AND expires_at <= ?1",
            )?
            .query_row([ts(now)], |r| r.get(0))?;
        if lapsed > 0 {
            *counts.entry("held".into()).or_default() -= lapsed;
            *counts.entry("expired".into()).or_default() += lapsed;
        }
        Ok(counts.into_iter().filter(|(_, n)| *n != 0).collect())
    }
}

/// Points of committed holds that a receipt from 1C (or any non-`api` source) already spent:
/// the receipt's redemption posts only what exceeds them, so a till's redemption counts once.
/// A receipt matches the holds matched to it before (an earlier version), else one unmatched
/// commit of its customer — by reference (the receipt's number is the hold's key), else,
/// when the commit's policy allows, by equal points within the commit's window. The match is
/// stored in the same transaction as the receipt.
pub(crate) fn covered_by_commits(
    conn: &Connection,
    customer: i64,
    doc_row: i64,
    d: &Document,
) -> super::Result<Committed> {
    let points = d.points_redeemed.0;
    if points <= 0 || d.source.system == API_SOURCE {
        return Ok(Committed::default());
    }
    let matched: Vec<(i64, i64)> = conn
        .prepare_cached("SELECT id, committed_points FROM holds WHERE matched_document = ?1 ORDER BY id")?
        .query_map([doc_row], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if !matched.is_empty() {
        return Ok(Committed {
            points: matched.iter().map(|m| m.1).sum(),
            holds: matched.iter().map(|m| m.0).collect(),
        });
    }
    let by_reference: Option<(i64, i64)> = match &d.number {
        Some(number) => conn
            .prepare_cached(
                "SELECT id, committed_points FROM holds WHERE idem_key = ?1 AND customer_id = ?2 \
                 AND state = 'committed' AND matched_document IS NULL",
            )?
            .query_row(params![number, customer], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
        None => None,
    };
    let at = ts(d.occurred_at);
    let found = match by_reference {
        Some(m) => Some(m),
        None => conn
            .prepare_cached(
                "SELECT id, committed_points FROM holds WHERE customer_id = ?1 AND state = 'committed' \
                 AND matched_document IS NULL AND committed_points = ?2 AND match_by = 'card_points_time' \
                 AND ?3 BETWEEN match_from AND match_until ORDER BY ABS(closed_at - ?3), id LIMIT 1",
            )?
            .query_row(params![customer, points, at], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
    };
    let Some((hold, committed)) = found else {
        return Ok(Committed::default());
    };
    conn.prepare_cached("UPDATE holds SET matched_document = ?2 WHERE id = ?1")?
        .execute(params![hold, doc_row])?;
    Ok(Committed {
        points: committed,
        holds: vec![hold],
    })
}
