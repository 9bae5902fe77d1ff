//! Writing to the ledger: documents in, journal transactions, lots and outbox rows out.
//!
//! One [`Batch`] is one SQLite transaction: every document in it, its quarantine entries,
//! the source checkpoint and the outbox rows they cause commit together or not at all.
//! Each document runs inside a savepoint, so one that fails to apply is quarantined and the
//! rest of the batch still commits.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::WrittenLines;
use super::counters::{self, Share};
use super::query::holdings;
use super::state;
use super::{Ledger, LedgerError, Result, from_ts, ts};
use crate::core::clawback;
use crate::core::document::Line;
use crate::core::document::{
    DocKind, Document, DocumentLimits, Incoming, Rejected, SourceRef, VoidReason, content_version, validate,
};
use crate::core::effects::{self, Committed, SaleEffects};
use crate::core::identity::CustomerIdentity;
use crate::core::journal::{Account, Explanation, Flag, TxKind};
use crate::core::lots::{self, Holdings, Lot, Move, Target};
use crate::core::money::Money;
use crate::core::program::{Rules, SoldLine, return_clawback, return_recredit};
use crate::core::rules::ReturnClawback;

/// One unit of work from one source.
#[derive(Debug, Default)]
pub struct Batch {
    /// The checkpoint key (`onec:odata:Document_ЧекККМ`, `cml:/srv/exchange`, …).
    pub source: String,
    pub items: Vec<Item>,
    /// The source's cursor after these items; stored in the same transaction.
    pub checkpoint: Option<String>,
    /// Event ids (with their creation time) the source consumed to produce these items —
    /// AmoCRM's events are polled with an overlap and de-duplicated by id — stored in the
    /// same transaction as the checkpoint.
    pub consumed_events: Vec<(String, i64)>,
}

// Rejections are rare; see `Incoming`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Item {
    Incoming(Incoming),
    Rejected(Rejected),
}

/// Which outbox destinations want rows. A destination that is not configured gets none.
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    /// Destination name for "this customer's visible state changed" rows (AmoCRM contacts).
    pub contact_state: Option<String>,
    /// Destination of bonus documents for 1C (accruals and redemptions of a sale).
    pub onec_bonus: Option<String>,
    /// The 1C base's source system (`onec`): what its own documents moved in its register
    /// (points paid with at its till, given back on its returns) and opening balances read
    /// from its register are not posted back to it.
    pub onec_system: Option<String>,
    /// Members' messages: the policy and the channels set up (issue 21); `None` makes none.
    pub notify: Option<std::sync::Arc<crate::core::notify::Plan>>,
    /// Destination of customers' tiers for 1C (an additional attribute of the customer), when
    /// the OData mapping names where they go.
    pub onec_tier: Option<String>,
}

pub struct IngestContext<'a> {
    pub rules: &'a dyn Rules,
    pub limits: &'a DocumentLimits,
    pub destinations: &'a Destinations,
    pub now: DateTime<Utc>,
    /// How far ahead "expiring soon" looks, for the state pushed to the outbox.
    pub warn_before: chrono::Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First time this document was seen.
    Applied,
    /// A new version replaced the previous effect (reversed, then re-posted).
    NewVersion,
    /// Unposted, deletion-marked, deleted or cancelled: its effect was reversed.
    Voided,
    /// This exact version was applied before: nothing changed.
    Unchanged,
    /// An older version seen again after a newer one: ignored.
    Stale,
    Quarantined(String),
}

#[derive(Clone, Debug, Default)]
pub struct IngestReport {
    pub applied: usize,
    pub new_versions: usize,
    pub voided: usize,
    pub unchanged: usize,
    pub stale: usize,
    pub quarantined: usize,
    /// (source:doc_id, outcome) for every item, in order.
    pub outcomes: Vec<(String, Outcome)>,
    /// Things people should look at (unlinked returns, loss-makers, …).
    pub flags: Vec<(String, Flag)>,
    pub outbox_rows: usize,
}

impl IngestReport {
    fn count(&mut self, doc_ref: String, outcome: Outcome) {
        match &outcome {
            Outcome::Applied => self.applied += 1,
            Outcome::NewVersion => self.new_versions += 1,
            Outcome::Voided => self.voided += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Stale => self.stale += 1,
            Outcome::Quarantined(_) => self.quarantined += 1,
        }
        self.outcomes.push((doc_ref, outcome));
    }
}

/// A manual correction, as `kopilka adjust` asks for it.
#[derive(Clone, Debug)]
pub struct AdjustRequest {
    pub customer: String,
    pub points: i64,
    pub reason: String,
    pub key: Option<String>,
    pub by: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdjustOutcome {
    Applied { tx_id: i64, customer_id: i64 },
    AlreadyApplied { tx_id: i64, customer_id: i64 },
}

/// A document row as the ingest logic needs it.
#[derive(Clone, Debug)]
struct DocRow {
    id: i64,
    source: String,
    doc_id: String,
    version: String,
    stamp: Option<i64>,
    kind: Option<String>,
    state: String,
    applied: bool,
    epoch: i64,
    number: Option<String>,
    occurred_at: Option<i64>,
    customer_id: Option<i64>,
    total: i64,
    points_redeemed: i64,
    original_ref: Option<String>,
    original_id: Option<i64>,
}

/// The lots a transaction opened. They are found through the transaction's postings (stored
/// by transaction, each naming its lot), not through an index of every lot by its origin
/// (migration 26).
pub(crate) const LOTS_OF_TX: &str = "SELECT l.id FROM postings p JOIN lots l ON l.id = p.lot_id \
     WHERE p.tx_id = ?1 AND l.origin_tx = ?1 ORDER BY p.leg";

const DOC_COLS: &str = "id, source, doc_id, version, stamp, kind, state, applied, epoch, number, occurred_at, \
     customer_id, total, points_redeemed, original_ref, original_id";

fn doc_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DocRow> {
    Ok(DocRow {
        id: r.get(0)?,
        source: r.get(1)?,
        doc_id: r.get(2)?,
        version: super::version_at(r, 3)?,
        stamp: r.get(4)?,
        kind: r.get(5)?,
        state: r.get(6)?,
        applied: r.get(7)?,
        epoch: r.get(8)?,
        number: r.get(9)?,
        occurred_at: r.get(10)?,
        customer_id: r.get(11)?,
        total: r.get(12)?,
        points_redeemed: r.get(13)?,
        original_ref: r.get(14)?,
        original_id: r.get(15)?,
    })
}

fn find_doc(conn: &Connection, source: &str, doc_id: &str) -> Result<Option<DocRow>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {DOC_COLS} FROM documents WHERE source = ?1 AND doc_id = ?2"
    ))?;
    Ok(st.query_row(params![source, doc_id], doc_from_row).optional()?)
}

fn doc_by_id(conn: &Connection, id: i64) -> Result<DocRow> {
    let mut st = conn.prepare_cached(&format!("SELECT {DOC_COLS} FROM documents WHERE id = ?1"))?;
    Ok(st.query_row([id], doc_from_row)?)
}

/// A new transaction to write.
pub(super) struct NewTx<'a> {
    pub(super) kind: TxKind,
    pub(super) role: &'static str,
    pub(super) customer_id: i64,
    pub(super) document_id: Option<i64>,
    pub(super) epoch: Option<i64>,
    pub(super) reverses: Option<i64>,
    pub(super) effective_at: DateTime<Utc>,
    pub(super) explanation: &'a Explanation,
    /// The lines of the document being written with the entry, which its explanation's items
    /// may leave their product, base, points and margin to (`LineFacts`); none for any other.
    pub(super) lines: WrittenLines<'a>,
    pub(super) actor: Option<&'a str>,
    pub(super) idem_key: Option<&'a str>,
    pub(super) partner: Option<&'a str>,
    /// The rule behind a bonus.
    pub(super) rule: Option<&'a str>,
    pub(super) counter: Account,
    pub(super) moves: Vec<Move>,
    /// Dates of the lot a `Target::NewLot` move fills.
    pub(super) new_lot: Option<LotDates>,
}

pub(super) use crate::core::effects::LotDates;

/// Writes one journal transaction with its postings, and moves lots and debt accordingly.
/// The customer side is `moves`; the counter-account takes the opposite of their sum, so
/// the transaction sums to zero by construction.
pub(super) fn post(conn: &Connection, t: NewTx<'_>, h: &mut Holdings, now: DateTime<Utc>) -> Result<i64> {
    let amount: i64 = t.moves.iter().map(|m| m.amount).sum();
    let explanation = super::explanation_column_against(t.explanation, t.lines);
    conn.prepare_cached(
        "INSERT INTO journal (kind_code, role_code, customer_id, document_id, epoch, reverses, amount, \
         effective_at, recorded_at, explanation, actor, idem_key, partner, rule_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        super::kind_code(t.kind),
        super::role_code(t.role),
        t.customer_id,
        t.document_id,
        t.epoch,
        t.reverses,
        amount,
        ts(t.effective_at),
        ts(now),
        explanation,
        t.actor,
        t.idem_key,
        t.partner,
        t.rule.map(|r| super::state::rule_id(conn, r)).transpose()?,
    ])?;
    let tx_id = conn.last_insert_rowid();
    let mut new_lot = None;
    let mut insert_posting = conn.prepare_cached(
        "INSERT INTO posting_rows (tx_id, leg, account, customer_id, lot_id, amount) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut leg = 0_i64;
    for m in &t.moves {
        let lot_id = match m.target {
            Target::Lot(id) => {
                conn.prepare_cached("UPDATE lots SET remaining = remaining + ?1 WHERE id = ?2")?
                    .execute(params![m.amount, id])?;
                Some(id)
            }
            Target::NewLot => {
                let LotDates {
                    earned,
                    available,
                    expires,
                } = t
                    .new_lot
                    .ok_or_else(|| LedgerError::Corrupt("a new lot was planned without its dates".into()))?;
                conn.prepare_cached(
                    "INSERT INTO lots (customer_id, origin_tx, earned_at, available_at, expires_at, amount, remaining) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                )?
                .execute(params![
                    t.customer_id,
                    tx_id,
                    ts(earned),
                    ts(available),
                    expires.map(ts),
                    m.amount
                ])?;
                let id = conn.last_insert_rowid();
                // the dates as stored (whole seconds), so holdings kept in memory plan
                // exactly as holdings read back would
                new_lot = Some(Lot {
                    id,
                    available_at: from_ts(ts(available)),
                    expires_at: expires.map(|e| from_ts(ts(e))),
                    remaining: 0,
                });
                Some(id)
            }
            Target::Debt => {
                conn.prepare_cached("UPDATE customers SET debt = debt - ?1 WHERE id = ?2")?
                    .execute(params![m.amount, t.customer_id])?;
                None
            }
        };
        leg += 1;
        insert_posting.execute(params![
            tx_id,
            leg,
            super::account_code(Account::Customer),
            t.customer_id,
            lot_id,
            m.amount
        ])?;
    }
    insert_posting.execute(params![
        tx_id,
        leg + 1,
        super::account_code(t.counter),
        Option::<i64>::None,
        Option::<i64>::None,
        -amount
    ])?;
    h.apply(&t.moves, new_lot);
    Ok(tx_id)
}

/// Finds the customer a document names, creating one on first sight. Keys are tried in
/// trust order (card, 1C id, AmoCRM id, phone, e-mail); the first that is known decides,
/// and keys not yet known are attached to that customer. A key that already belongs to
/// someone else is left where it is (never silently moved).
pub(super) fn resolve_customer(
    conn: &Connection,
    identity: &CustomerIdentity,
    now: DateTime<Utc>,
) -> Result<Option<(i64, bool)>> {
    let keys = identity.keys();
    if keys.is_empty() {
        return Ok(None);
    }
    let mut lookup =
        conn.prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = ?1 AND value = ?2")?;
    let mut found = Vec::with_capacity(keys.len());
    for k in &keys {
        let c: Option<i64> = lookup
            .query_row(params![k.kind(), k.value()], |r| r.get(0))
            .optional()?;
        found.push(c);
    }
    let (customer, created) = match found.iter().flatten().next() {
        Some(c) => (*c, false),
        None => {
            conn.prepare_cached("INSERT INTO customers (created_at, name) VALUES (?1, ?2)")?
                .execute(params![ts(now), identity.name])?;
            (conn.last_insert_rowid(), true)
        }
    };
    let mut attach = conn.prepare_cached(
        "INSERT OR IGNORE INTO customer_keys (kind, value, customer_id) VALUES (?1, ?2, ?3)",
    )?;
    for (k, f) in keys.iter().zip(&found) {
        if f.is_none() {
            attach.execute(params![k.kind(), k.value(), customer])?;
        }
    }
    if identity.name.is_some() || identity.birthday.is_some() || identity.referred_by.is_some() {
        conn.prepare_cached(
            "UPDATE customers SET name = COALESCE(name, ?2), birthday = COALESCE(birthday, ?3), \
             referred_by = COALESCE(referred_by, ?4) WHERE id = ?1",
        )?
        .execute(params![
            customer,
            identity.name,
            identity.birthday.map(|b| b.to_string()),
            identity.referred_by
        ])?;
    }
    Ok(Some((customer, created)))
}

/// A document parked in quarantine, with what a person needs to find and fix it.
struct Parked<'a> {
    source: &'a str,
    doc_ref: &'a str,
    version: Option<&'a str>,
    reason: &'a str,
    location: Option<&'a str>,
    excerpt: Option<&'a str>,
    kind: Option<&'a str>,
    number: Option<&'a str>,
    occurred_at: Option<DateTime<Utc>>,
}

fn quarantine_put(conn: &Connection, q: &Parked<'_>, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO quarantine (source, doc_ref, version, reason, location, excerpt, first_seen_at, last_seen_at, \
           doc_kind, number, occurred_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10) \
         ON CONFLICT (source, doc_ref) DO UPDATE SET version = excluded.version, reason = excluded.reason, \
           location = excluded.location, excerpt = excluded.excerpt, last_seen_at = excluded.last_seen_at, \
           doc_kind = COALESCE(excluded.doc_kind, doc_kind), number = COALESCE(excluded.number, number), \
           occurred_at = COALESCE(excluded.occurred_at, occurred_at), \
           seen_count = seen_count + 1, resolved_at = NULL",
    )?
    .execute(params![
        q.source,
        q.doc_ref,
        q.version,
        q.reason,
        q.location,
        q.excerpt,
        ts(now),
        q.kind,
        q.number,
        q.occurred_at.map(ts)
    ])?;
    Ok(())
}

fn quarantine_resolve(conn: &Connection, source: &str, doc_ref: &str, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached(
        "UPDATE quarantine SET resolved_at = ?3 WHERE source = ?1 AND doc_ref = ?2 AND resolved_at IS NULL",
    )?
    .execute(params![source, doc_ref, ts(now)])?;
    Ok(())
}

/// Keeps the version a document is about to leave, with what it did and when the document
/// last changed on it. The current version lives in `documents` alone: a backfill's sales
/// have one version each, and a row per sale repeating `documents.version` cost 69 bytes
/// and an insert per sale (issue 19). Called before the document row takes the new version.
fn record_left_version(conn: &Connection, doc: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO document_versions (document_id, version, seen_at, action) \
         SELECT id, version, updated_at, CASE state WHEN 'void' THEN COALESCE(void_reason, 'void') ELSE 'applied' END \
         FROM documents WHERE id = ?1",
    )?
    .execute([doc])?;
    Ok(())
}

/// Whether `version` is one the document has left (the current one is compared first).
fn version_seen(conn: &Connection, doc: i64, version: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM document_versions WHERE document_id = ?1 AND version = ?2")?
        .query_row(params![doc, super::version_column(version)], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Writes a document and its lines, the points on them to be set later (a return's, when
/// it is applied) or never (a till's redemption).
pub(super) fn write_document(
    conn: &Connection,
    existing: Option<i64>,
    d: &Document,
    customer: Option<i64>,
    now: DateTime<Utc>,
) -> Result<i64> {
    let id = write_document_row(conn, existing, d, customer, now)?;
    insert_lines(conn, id, d, &[], &[], &mut LineProducts::default())?;
    Ok(id)
}

/// Writes a document without its lines (an earlier version's lines go): a sale's lines are
/// written once its effects are known, each with the points it earned and paid, rather
/// than written and then updated line by line.
fn write_document_row(
    conn: &Connection,
    existing: Option<i64>,
    d: &Document,
    customer: Option<i64>,
    now: DateTime<Utc>,
) -> Result<i64> {
    let id = match existing {
        Some(id) => {
            conn.prepare_cached(
                "UPDATE documents SET version = ?2, kind_code = ?3, state_code = 0 /* active */, void_reason = NULL, number = ?4, \
                 occurred_at = ?5, customer_id = ?6, currency = ?7, total = ?8, points_redeemed = ?9, \
                 original_ref = ?10, original_id = NULL, store = ?11, partner = ?12, updated_at = ?13, \
                 stamp = ?14 WHERE id = ?1",
            )?
            .execute(params![
                id,
                super::version_column(&d.source.version),
                super::doc_kind_code(d.kind),
                d.number,
                ts(d.occurred_at),
                customer,
                d.currency,
                d.total.0,
                d.points_redeemed.0,
                d.original,
                d.store,
                d.partner,
                ts(now),
                d.source.stamp
            ])?;
            super::explanations_off_lines(conn, id)?;
            conn.prepare_cached("DELETE FROM document_line_rows WHERE document_id = ?1")?
                .execute([id])?;
            id
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO documents (source, doc_id, version, kind_code, state_code, number, occurred_at, customer_id, \
                 currency, total, points_redeemed, original_ref, store, partner, first_seen_at, updated_at, stamp) \
                 VALUES (?1, ?2, ?3, ?4, 0 /* active */, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15)",
            )?
            .execute(params![
                d.source.system,
                d.source.doc_id,
                super::version_column(&d.source.version),
                super::doc_kind_code(d.kind),
                d.number,
                ts(d.occurred_at),
                customer,
                d.currency,
                d.total.0,
                d.points_redeemed.0,
                d.original,
                d.store,
                d.partner,
                ts(now),
                d.source.stamp
            ])?;
            conn.last_insert_rowid()
        }
    };
    Ok(id)
}

/// A document's lines with the points each earned (or, on a return, took back) and paid;
/// a line beyond `points` has none, one beyond `redeemed` paid none.
fn insert_lines(
    conn: &Connection,
    id: i64,
    d: &Document,
    points: &[i64],
    redeemed: &[i64],
    known: &mut LineProducts,
) -> Result<()> {
    let mut ins = conn.prepare_cached(
        "INSERT INTO document_line_rows (document_id, line_no, product, quantity, unit_price, \
         discount, net, unit_cost, service, points, redeemed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for (i, l) in d.lines.iter().enumerate() {
        let product = known.key(conn, &l.product_id, &l.name, l.category.as_deref())?;
        let quantity = l.quantity.normalize().to_string();
        ins.execute(params![
            id,
            i as i64 + 1,
            product,
            quantity,
            l.unit_price.0,
            l.discount.0,
            stored_net(&quantity, l.unit_price.0, l.discount.0, l.net.0),
            l.unit_cost.map(|c| c.0),
            l.service,
            points.get(i).copied().unwrap_or(0),
            redeemed.get(i).copied().filter(|r| *r != 0),
        ])?;
    }
    Ok(())
}

/// What `document_line_rows.net` holds (migration 30): nothing where the net is the
/// quantity — digits only, as stored — times the unit price less the discount, which
/// `document_lines` works out the same way (checked arithmetic here, so SQLite's integer
/// sum never overflows into a float); the net itself otherwise.
fn stored_net(quantity: &str, unit_price: i64, discount: i64, net: i64) -> Option<i64> {
    let whole = !quantity.is_empty() && quantity.len() <= 15 && quantity.bytes().all(|b| b.is_ascii_digit());
    let worked_out = whole
        .then(|| quantity.parse::<i64>().ok())
        .flatten()
        .and_then(|q| q.checked_mul(unit_price))
        .and_then(|v| v.checked_sub(discount));
    (worked_out != Some(net)).then_some(net)
}

/// The key of a product as a line named it (id, name, group), stored once in
/// `line_products` however many lines name it. Read from the ledger unless a
/// [`LineProducts`] of the same transaction holds it.
pub(crate) fn line_product(
    conn: &Connection,
    product_id: &str,
    name: &str,
    category: Option<&str>,
) -> Result<i64> {
    let found: Option<i64> = conn
        .prepare_cached(
            "SELECT id FROM line_products INDEXED BY line_products_said \
             WHERE product_id = ?1 AND name IS ?2 AND category IS ?3",
        )?
        .query_row(params![product_id, name, category], |r| r.get(0))
        .optional()?;
    if let Some(id) = found {
        return Ok(id);
    }
    conn.prepare_cached("INSERT INTO line_products (product_id, name, category) VALUES (?1, ?2, ?3)")?
        .execute(params![product_id, name, category])?;
    Ok(conn.last_insert_rowid())
}

/// The `line_products` keys a batch has read or added, so each product as lines name it
/// is looked up once a batch rather than once a line. Only ever
/// used inside one transaction and dropped with a document that fails: a key added by a
/// document whose writes are rolled back must not be used by the next.
#[derive(Default)]
pub(super) struct LineProducts {
    keys: HashMap<String, i64>,
    probe: String,
}

impl LineProducts {
    fn key(
        &mut self,
        conn: &Connection,
        product_id: &str,
        name: &str,
        category: Option<&str>,
    ) -> Result<i64> {
        // the three parts as one string, so a lookup allocates nothing; the lengths keep
        // any two different triples apart whatever characters they hold
        use std::fmt::Write as _;
        self.probe.clear();
        let _ = write!(self.probe, "{}:{}:", product_id.len(), name.len());
        self.probe.push_str(product_id);
        self.probe.push_str(name);
        match category {
            Some(c) => {
                self.probe.push('+');
                self.probe.push_str(c);
            }
            None => self.probe.push('-'),
        }
        if let Some(id) = self.keys.get(&self.probe) {
            return Ok(*id);
        }
        let id = line_product(conn, product_id, name, category)?;
        self.keys.insert(self.probe.clone(), id);
        Ok(id)
    }
}

fn set_line_points(conn: &Connection, doc: i64, points: &[i64]) -> Result<()> {
    let mut st = conn.prepare_cached(
        "UPDATE document_line_rows SET points = ?3 WHERE document_id = ?1 AND line_no = ?2",
    )?;
    for (i, p) in points.iter().enumerate() {
        st.execute(params![doc, i as i64 + 1, p])?;
    }
    Ok(())
}

fn set_applied(conn: &Connection, doc: i64, applied: bool) -> Result<()> {
    conn.prepare_cached("UPDATE documents SET applied = ?2 WHERE id = ?1")?
        .execute(params![doc, applied])?;
    Ok(())
}

fn bump_epoch(conn: &Connection, doc: i64) -> Result<i64> {
    Ok(conn
        .prepare_cached("UPDATE documents SET epoch = epoch + 1 WHERE id = ?1 RETURNING epoch")?
        .query_row([doc], |r| r.get(0))?)
}

/// The state of one `ingest` call while it runs.
pub(super) struct Run<'a, 'b> {
    pub(super) ctx: &'a IngestContext<'b>,
    pub(super) touched: BTreeSet<i64>,
    pub(super) flags: Vec<Flag>,
    /// Holdings of customers exactly as the sales of this batch left them, so the next sale
    /// of the same customer in the batch, and the card states queued at its end, need not
    /// read them again. Only a sale puts a customer here; every other path that moves points
    /// takes the customer out first, and a document that fails empties it.
    pub(super) held: HashMap<i64, Holdings>,
    /// The `line_products` keys this batch has read or added ([`LineProducts`]); goes on to
    /// the next document only from one that was applied, like `held`.
    pub(super) line_products: LineProducts,
}

impl Run<'_, '_> {
    fn new_lot_now(&self, at: DateTime<Utc>) -> LotDates {
        let (avail, exp) = self.ctx.rules.lot_times(at);
        // points given back are usable at once; they keep the program's lifetime
        let life = exp.map(|e| e - avail);
        LotDates {
            earned: at,
            available: at,
            expires: life.map(|l| at + l),
        }
    }

    /// Undoes every effect of the document's current epoch, newest first. Each cancellation
    /// names the transaction it reverses and keeps its business date, so per-day figures
    /// show the corrected day.
    fn cancel_effects(&mut self, conn: &Connection, doc: &DocRow, why: &str) -> Result<()> {
        if !doc.applied {
            return Ok(());
        }
        type Effect = (i64, String, i64, i64, i64, Option<String>);
        let txs: Vec<Effect> = conn
            .prepare_cached(
                "SELECT id, kind, amount, customer_id, effective_at, partner FROM journal \
                 WHERE document_id = ?1 AND epoch = ?2 AND role = 'effect' ORDER BY id DESC",
            )?
            .query_map(params![doc.id, doc.epoch], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let now = self.ctx.now;
        for (tx_id, kind, amount, customer, effective, partner) in txs {
            if amount == 0 {
                continue;
            }
            let counter: String = conn
                .prepare_cached(
                    "SELECT account FROM postings WHERE tx_id = ?1 AND account != 'customer' LIMIT 1",
                )?
                .query_row([tx_id], |r| r.get(0))?;
            let counter = Account::parse(&counter)
                .ok_or_else(|| LedgerError::Corrupt(format!("tx {tx_id}: unknown account {counter}")))?;
            let mut h = self.holdings_to_move(conn, customer)?;
            let moves = if amount > 0 {
                let prefer: Vec<i64> = conn
                    .prepare_cached(
                        "SELECT lot_id FROM postings WHERE tx_id = ?1 AND lot_id IS NOT NULL AND amount > 0 ORDER BY leg",
                    )?
                    .query_map([tx_id], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                lots::plan_debit(&h, amount, &prefer, now)
            } else {
                let restore = restorable(conn, tx_id)?;
                lots::plan_credit(&h, -amount, &restore)
            };
            let label = TxKind::parse(&kind).map_or(kind.clone(), |k| k.label_ru().to_string());
            let explanation = Explanation::text(format!(
                "{label} (tx {tx_id}) cancelled: {} {why}",
                doc_label(doc)
            ));
            post(
                conn,
                NewTx {
                    kind: TxKind::Reversal,
                    role: "cancel",
                    customer_id: customer,
                    document_id: Some(doc.id),
                    epoch: Some(doc.epoch),
                    reverses: Some(tx_id),
                    effective_at: from_ts(effective),
                    explanation: &explanation,
                    lines: WrittenLines::NONE,
                    actor: None,
                    idem_key: None,
                    partner: partner.as_deref(),
                    rule: None,
                    counter,
                    moves,
                    new_lot: Some(self.new_lot_now(now)),
                },
                &mut h,
                now,
            )?;
            if amount > 0 {
                self.settle_debt(conn, customer, &mut h, None, now)?;
            }
            self.touched.insert(customer);
        }
        if doc.kind.as_deref() == Some("sale") {
            state::unrecord_sale(conn, doc.id, doc.epoch)?;
        }
        set_applied(conn, doc.id, false)?;
        Ok(())
    }

    /// Loads what the core needs to know of the customer, asks it what the sale causes
    /// ([`effects::sale_effects`]) and writes that value: nothing is read in between.
    fn apply_sale(
        &mut self,
        conn: &Connection,
        doc_id: i64,
        d: &Document,
        customer: Option<i64>,
    ) -> Result<()> {
        let epoch = bump_epoch(conn, doc_id)?;
        let rules = self.ctx.rules;
        let mut h = match customer {
            Some(c) => match self.held.remove(&c) {
                Some(h) => h,
                None => holdings(conn, c)?,
            },
            None => Holdings::default(),
        };
        let state = state::customer_state(conn, rules, customer, d, doc_id, &h)?;
        let committed = match customer {
            // points a till already spent through a committed hold count once
            Some(c) => super::holds::covered_by_commits(conn, c, doc_id, d)?,
            None => Committed::default(),
        };
        let fx = effects::sale_effects(rules, d, &state, &h, &committed, self.ctx.now);
        self.write_sale(conn, doc_id, epoch, customer, d, &fx, &mut h)?;
        if let Some(c) = customer {
            self.held.insert(c, h);
        }
        Ok(())
    }

    /// A customer's holdings for a path other than a sale, which will move points: read
    /// from the ledger, and the batch's copy dropped, as it will no longer be exact.
    fn holdings_to_move(&mut self, conn: &Connection, customer: i64) -> Result<Holdings> {
        self.held.remove(&customer);
        holdings(conn, customer)
    }

    /// Writes what [`effects::sale_effects`] decided for a sale.
    #[allow(clippy::too_many_arguments)]
    fn write_sale(
        &mut self,
        conn: &Connection,
        doc_id: i64,
        epoch: i64,
        customer: Option<i64>,
        d: &Document,
        fx: &SaleEffects,
        h: &mut Holdings,
    ) -> Result<()> {
        let decision = &fx.decision;
        insert_lines(
            conn,
            doc_id,
            d,
            &decision.line_points,
            &decision.line_redeemed,
            &mut self.line_products,
        )?;
        self.flags.extend(decision.flags.iter().cloned());
        if let Some(c) = customer {
            for tx in &fx.txs {
                post(
                    conn,
                    NewTx {
                        kind: tx.kind,
                        role: "effect",
                        customer_id: c,
                        document_id: Some(doc_id),
                        epoch: Some(epoch),
                        reverses: None,
                        effective_at: d.occurred_at,
                        explanation: &tx.explanation,
                        lines: WrittenLines {
                            lines: &d.lines,
                            points: &decision.line_points,
                            paid: &decision.line_redeemed,
                        },
                        actor: tx.actor,
                        idem_key: None,
                        partner: if tx.partner { fx.partner.as_deref() } else { None },
                        rule: tx.rule.as_deref(),
                        counter: tx.counter,
                        moves: tx.moves.clone(),
                        new_lot: tx.new_lot,
                    },
                    h,
                    self.ctx.now,
                )?;
            }
            self.touched.insert(c);
        }
        // marks the sale applied too
        state::record_sale(conn, doc_id, epoch, customer, d, fx)?;
        Ok(())
    }

    /// Applies the negative-balance policy after points were taken from a customer.
    pub(super) fn settle_debt(
        &mut self,
        conn: &Connection,
        customer: i64,
        h: &mut Holdings,
        doc: Option<(i64, i64)>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let Some(w) = effects::debt_write_off(self.ctx.rules.negative_balance(), h) else {
            return Ok(());
        };
        self.held.remove(&customer);
        post(
            conn,
            NewTx {
                kind: w.kind,
                role: "effect",
                customer_id: customer,
                document_id: doc.map(|d| d.0),
                epoch: doc.map(|d| d.1),
                reverses: None,
                effective_at: at,
                explanation: &w.explanation,
                lines: WrittenLines::NONE,
                actor: w.actor,
                idem_key: None,
                partner: None,
                rule: None,
                counter: w.counter,
                moves: w.moves,
                new_lot: None,
            },
            h,
            self.ctx.now,
        )?;
        Ok(())
    }

    /// Applies a stored return against its original sale: takes back the points its lines
    /// earned (in proportion to what is returned) and gives back points paid with (what the
    /// return states it gave back, else in proportion to the money returned). A return whose sale is unknown is kept, flagged,
    /// and applied when the sale arrives.
    fn apply_return(&mut self, conn: &Connection, ret_id: i64) -> Result<()> {
        let epoch = bump_epoch(conn, ret_id)?;
        let ret = doc_by_id(conn, ret_id)?;
        let original = match ret.original_id {
            Some(id) => Some(doc_by_id(conn, id)?),
            None => match &ret.original_ref {
                Some(r) => find_original(conn, &ret.source, r)?,
                None => None,
            },
        };
        let original = original.filter(|o| o.state == "active" && o.kind.as_deref() == Some("sale"));
        let Some(orig) = original else {
            conn.prepare_cached("UPDATE documents SET original_id = NULL WHERE id = ?1")?
                .execute([ret_id])?;
            set_line_points(conn, ret_id, &vec![0; line_count(conn, ret_id)?])?;
            self.flags.push(Flag::new(
                "unlinked_return",
                format!(
                    "return {} refers to {} which is not a known posted sale; nothing taken back yet",
                    doc_label(&ret),
                    ret.original_ref.as_deref().unwrap_or("no sale")
                ),
            ));
            set_applied(conn, ret_id, true)?;
            return Ok(());
        };
        conn.prepare_cached("UPDATE documents SET original_id = ?2 WHERE id = ?1")?
            .execute(params![ret_id, orig.id])?;
        let sold: Vec<SoldLine> = conn
            .prepare_cached("SELECT product_id, quantity, points FROM document_lines WHERE document_id = ?1")?
            .query_map([orig.id], |r| {
                Ok(SoldLine {
                    product_id: r.get(0)?,
                    quantity: parse_qty(&r.get::<_, String>(1)?),
                    points: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let before: Vec<(String, rust_decimal::Decimal)> = conn
            .prepare_cached(
                "SELECT l.product_id, l.quantity FROM document_lines l JOIN documents d ON d.id = l.document_id \
                 WHERE d.original_id = ?1 AND d.applied = 1 AND d.kind = 'return' AND d.id != ?2",
            )?
            .query_map(params![orig.id, ret_id], |r| {
                Ok((r.get(0)?, parse_qty(&r.get::<_, String>(1)?)))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let returning: Vec<(String, rust_decimal::Decimal, i64)> = conn
            .prepare_cached(
                "SELECT product_id, quantity, net FROM document_lines WHERE document_id = ?1 ORDER BY line_no",
            )?
            .query_map([ret_id], |r| {
                Ok((r.get(0)?, parse_qty(&r.get::<_, String>(1)?), r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let pairs: Vec<(String, rust_decimal::Decimal)> =
            returning.iter().map(|(p, q, _)| (p.clone(), *q)).collect();
        let (claws, flags) = return_clawback(&sold, &before, &pairs);
        self.flags.extend(flags);
        set_line_points(conn, ret_id, &claws)?;
        let Some(customer) = orig.customer_id else {
            set_applied(conn, ret_id, true)?;
            return Ok(());
        };
        let now = self.ctx.now;
        let at = ret.occurred_at.map(from_ts).unwrap_or(now);
        let mut h = self.holdings_to_move(conn, customer)?;
        let effect_tx = |kind: &str| -> Result<Option<i64>> {
            Ok(conn
                .prepare_cached(
                    "SELECT id FROM journal WHERE document_id = ?1 AND epoch = ?2 AND role = 'effect' AND kind = ?3 \
                     ORDER BY id LIMIT 1",
                )?
                .query_row(params![orig.id, orig.epoch, kind], |r| r.get(0))
                .optional()?)
        };
        let claw: i64 = claws.iter().sum();
        if claw > 0
            && let Some(accrual) = effect_tx("accrual")?
        {
            let prefer: Vec<i64> = conn
                .prepare_cached(LOTS_OF_TX)?
                .query_map([accrual], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let moves = lots::plan_debit(&h, claw, &prefer, at);
            let explanation = Explanation::text(format!(
                "{claw} points taken back for goods returned by {} (sale {})",
                doc_label(&ret),
                doc_label(&orig)
            ));
            post(
                conn,
                NewTx {
                    kind: TxKind::Reversal,
                    role: "effect",
                    customer_id: customer,
                    document_id: Some(ret_id),
                    epoch: Some(epoch),
                    reverses: Some(accrual),
                    effective_at: at,
                    explanation: &explanation,
                    lines: WrittenLines::NONE,
                    actor: None,
                    idem_key: None,
                    partner: None,
                    rule: None,
                    counter: Account::Expense,
                    moves,
                    new_lot: None,
                },
                &mut h,
                now,
            )?;
            self.settle_debt(conn, customer, &mut h, Some((ret_id, epoch)), at)?;
        }
        if orig.points_redeemed > 0
            && let Some(redemption) = effect_tx("redemption")?
        {
            let before_total: i64 = conn
                .prepare_cached(
                    "SELECT COALESCE(SUM(total), 0) FROM documents WHERE original_id = ?1 AND applied = 1 \
                     AND kind = 'return' AND id != ?2",
                )?
                .query_row(params![orig.id, ret_id], |r| r.get(0))?;
            let give = if ret.points_redeemed > 0 {
                // the source states the points it gave back with the goods (1C's return
                // lines carry them): the register 1C keeps moved by exactly that much
                let given_before: i64 = conn
                    .prepare_cached(
                        "SELECT COALESCE(SUM(points_redeemed), 0) FROM documents WHERE original_id = ?1 \
                         AND applied = 1 AND kind = 'return' AND id != ?2",
                    )?
                    .query_row(params![orig.id, ret_id], |r| r.get(0))?;
                ret.points_redeemed
                    .min(orig.points_redeemed.saturating_sub(given_before))
                    .max(0)
            } else {
                return_recredit(
                    orig.points_redeemed,
                    Money(orig.total),
                    Money(before_total),
                    Money(ret.total),
                )
            };
            if give > 0 {
                let restore = restorable(conn, redemption)?;
                let moves = lots::plan_credit(&h, give, &restore);
                let explanation = Explanation::text(format!(
                    "{give} points paid with on sale {} given back for the return {}",
                    doc_label(&orig),
                    doc_label(&ret)
                ));
                post(
                    conn,
                    NewTx {
                        kind: TxKind::Reversal,
                        role: "effect",
                        customer_id: customer,
                        document_id: Some(ret_id),
                        epoch: Some(epoch),
                        reverses: Some(redemption),
                        effective_at: at,
                        explanation: &explanation,
                        lines: WrittenLines::NONE,
                        actor: None,
                        idem_key: None,
                        partner: None,
                        rule: None,
                        counter: Account::Redemption,
                        moves,
                        new_lot: Some(self.new_lot_now(at)),
                    },
                    &mut h,
                    now,
                )?;
            }
        }
        self.take_back_events(conn, &orig, &ret, epoch, customer, &mut h, at)?;
        self.touched.insert(customer);
        set_applied(conn, ret_id, true)?;
        Ok(())
    }

    /// The rest of what a sale caused, after its goods' points: the return's own share of
    /// the sale's counters (stamps, threshold spend) is stored with the return, and the
    /// sale's event rewards whose condition no longer holds are taken back, each with its
    /// reason (`core::clawback`).
    #[allow(clippy::too_many_arguments)]
    fn take_back_events(
        &mut self,
        conn: &Connection,
        orig: &DocRow,
        ret: &DocRow,
        epoch: i64,
        customer: i64,
        h: &mut Holdings,
        at: DateTime<Utc>,
    ) -> Result<()> {
        // a return without a card of its own belongs to the sale's customer: its counters
        // and its money count against that customer
        conn.prepare_cached("UPDATE documents SET customer_id = ?2 WHERE id = ?1 AND customer_id IS NULL")?
            .execute(params![ret.id, customer])?;
        let sale_lines = stored_lines(conn, orig.id)?;
        let returning = stored_lines(conn, ret.id)?;
        let before_ids: Vec<i64> = conn
            .prepare_cached(
                "SELECT id FROM documents WHERE original_id = ?1 AND applied = 1 AND kind = 'return' AND id != ?2",
            )?
            .query_map(params![orig.id, ret.id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut returned_before = Vec::new();
        for id in &before_ids {
            returned_before.extend(stored_lines(conn, *id)?);
        }
        let sale_counters: HashMap<String, i64> = conn
            .prepare_cached("SELECT counter, amount FROM document_counters WHERE document_id = ?1")?
            .query_map([orig.id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let rules = self.ctx.rules.rule_set();
        let mut shares = Vec::new();
        if let Some(rules) = rules {
            for (key, amount) in
                clawback::return_counters(rules, &sale_lines, &sale_counters, &returned_before, &returning)
            {
                shares.push(Share {
                    counter: state::counter_id(conn, &key)?,
                    amount,
                    prior: None,
                });
            }
        }
        let (counters, priors) = counters::pack(&shares);
        conn.prepare_cached("UPDATE documents SET counters = ?2, counter_priors = ?3 WHERE id = ?1")?
            .execute(params![ret.id, counters, priors])?;
        let Some(rules) = rules else {
            return Ok(());
        };
        if rules.returns == ReturnClawback::GoodsOnly {
            return Ok(());
        }
        // what earlier returns in force already took back of a transaction (by rule; a rule
        // no entry has named yet has no key, and must match nothing rather than the rule-less)
        let taken = |tx: i64, rule: Option<&str>| -> Result<i64> {
            Ok(conn
                .prepare_cached(
                    "SELECT COALESCE(-SUM(j.amount), 0) FROM journal j JOIN documents d ON d.id = j.document_id \
                     WHERE j.reverses = ?1 AND j.role = 'effect' \
                     AND CASE WHEN ?2 IS NULL THEN j.rule_id IS NULL \
                         ELSE j.rule_id = (SELECT n.id FROM rule_names n WHERE n.name = ?2) END \
                     AND d.applied = 1 \
                     AND d.epoch = j.epoch AND d.id != ?3",
                )?
                .query_row(params![tx, rule, ret.id], |r| r.get(0))?)
        };
        let mut rewards = Vec::new();
        let effects: Vec<(i64, String, i64, Option<String>)> = conn
            .prepare_cached(
                "SELECT j.id, j.kind, j.amount, n.name FROM journal j LEFT JOIN rule_names n ON n.id = j.rule_id \
                 WHERE j.document_id = ?1 AND j.epoch = ?2 \
                 AND j.role = 'effect' AND j.kind IN ('accrual', 'bonus') ORDER BY j.id",
            )?
            .query_map(params![orig.id, orig.epoch], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (tx, kind, amount, rule) in effects {
            if kind == "accrual" {
                let line_points: i64 = conn
                    .prepare_cached(
                        "SELECT COALESCE(SUM(points), 0) FROM document_lines WHERE document_id = ?1",
                    )?
                    .query_row([orig.id], |r| r.get(0))?;
                let fixed = amount - line_points;
                if fixed > 0 {
                    rewards.push(clawback::SaleReward {
                        tx,
                        rule: clawback::PER_CHECK.into(),
                        remaining: fixed - taken(tx, Some(clawback::PER_CHECK))?,
                    });
                }
            } else if let Some(rule) = rule {
                let remaining = amount - taken(tx, Some(&rule))?;
                rewards.push(clawback::SaleReward { tx, rule, remaining });
            }
        }
        if rewards.iter().all(|r| r.remaining <= 0) {
            return Ok(());
        }
        let mut after = clawback::AfterReturn {
            sale_fully_returned: clawback::fully_returned(&sale_lines, &returned_before, &returning),
            ..Default::default()
        };
        let keys = rules
            .stamps
            .iter()
            .map(|c| &c.key)
            .chain(rules.thresholds.iter().map(|t| &t.key));
        for key in keys {
            if !rewards.iter().any(|r| &r.rule == key) {
                continue;
            }
            // the counter as the sale found it, and what of the sale's share is left
            let (added, prior): (i64, Option<i64>) = conn
                .prepare_cached(
                    "SELECT amount, prior FROM document_counters WHERE document_id = ?1 AND counter = ?2",
                )?
                .query_row(params![orig.id, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .unwrap_or((0, None));
            let returned: i64 = conn
                .prepare_cached(
                    "SELECT COALESCE(SUM(c.amount), 0) FROM document_counters c JOIN documents d ON d.id = c.document_id \
                     WHERE d.original_id = ?1 AND d.applied = 1 AND d.kind = 'return' AND d.id != ?2 AND c.counter = ?3",
                )?
                .query_row(params![orig.id, ret.id, key], |r| r.get::<_, i64>(0))?
                + returning_counter(conn, ret.id, key)?;
            after
                .counters
                .insert(key.clone(), (prior.unwrap_or(0), added + returned));
        }
        for tb in clawback::event_takebacks(rules, &rewards, &after) {
            let prefer: Vec<i64> = conn
                .prepare_cached(LOTS_OF_TX)?
                .query_map([tb.tx], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let moves = lots::plan_debit(h, tb.points, &prefer, at);
            let explanation = Explanation::text(format!(
                "{} points taken back by the return {} (sale {}): {}",
                tb.points,
                doc_label(ret),
                doc_label(orig),
                tb.reason
            ));
            post(
                conn,
                NewTx {
                    kind: TxKind::Reversal,
                    role: "effect",
                    customer_id: customer,
                    document_id: Some(ret.id),
                    epoch: Some(epoch),
                    reverses: Some(tb.tx),
                    effective_at: at,
                    explanation: &explanation,
                    lines: WrittenLines::NONE,
                    actor: None,
                    idem_key: None,
                    partner: None,
                    rule: Some(&tb.rule),
                    counter: Account::Expense,
                    moves,
                    new_lot: None,
                },
                h,
                self.ctx.now,
            )?;
            self.settle_debt(conn, customer, h, Some((ret.id, epoch)), at)?;
        }
        Ok(())
    }

    /// Cancels the effects of every applied return of `sale`, so they can be re-applied
    /// against the sale's new state. Returns their ids in application order.
    fn suspend_returns(&mut self, conn: &Connection, sale: &DocRow) -> Result<Vec<i64>> {
        let ids: Vec<i64> = conn
            .prepare_cached(
                "SELECT id FROM documents WHERE original_id = ?1 AND kind = 'return' AND state = 'active' ORDER BY id",
            )?
            .query_map([sale.id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for id in ids.iter().rev() {
            let r = doc_by_id(conn, *id)?;
            self.cancel_effects(
                conn,
                &r,
                &format!(
                    "to be re-applied: sale {} or one of its returns changed",
                    doc_label(sale)
                ),
            )?;
        }
        Ok(ids)
    }

    /// Before a document changes: the returns whose effect depends on it are cancelled, to
    /// be re-applied afterwards. For a sale, its returns; for a return, the other returns of
    /// the same sale (how much a return takes back depends on what the others returned).
    fn suspend_related(&mut self, conn: &Connection, doc: &DocRow) -> Result<Vec<i64>> {
        let mut ids = match (doc.kind.as_deref(), doc.original_id) {
            (Some("sale"), _) => self.suspend_returns(conn, doc)?,
            (Some("return"), Some(orig)) => self.suspend_returns(conn, &doc_by_id(conn, orig)?)?,
            _ => Vec::new(),
        };
        ids.retain(|id| *id != doc.id);
        Ok(ids)
    }

    /// The document's customer, enrolled on first sight (with the welcome bonus, when the
    /// program gives one) and joined to a closed program when they bring its invite code.
    fn customer_for(&mut self, conn: &Connection, d: &Document) -> Result<Option<i64>> {
        let now = self.ctx.now;
        // a friend code a document names is checked (own, nobody's) and kept in history like
        // any source's, not written as it came
        let stripped;
        let identity = if d.customer.referred_by.is_some() {
            stripped = CustomerIdentity {
                referred_by: None,
                ..d.customer.clone()
            };
            &stripped
        } else {
            &d.customer
        };
        let Some((c, created)) = resolve_customer(conn, identity, now)? else {
            return Ok(None);
        };
        if let Some(code) = &d.customer.referred_by {
            super::people::apply_from_document(
                conn,
                c,
                &d.source.system,
                &super::people::Attributes {
                    referral_code: Some(code.clone()),
                    ..Default::default()
                },
                self.ctx.rules,
                now,
            )?;
        }
        for (field, text, reason) in &d.customer.unreadable {
            super::people::refuse_from_source(conn, c, &d.source.system, field, text, reason, now)?;
        }
        if let Some(code) = &d.customer.invite_code
            && let Err(reason) = state::join_by_invite(conn, c, self.ctx.rules, code, d.occurred_at)?
        {
            super::people::refuse_from_source(conn, c, &d.source.system, "invite_code", code, &reason, now)?;
        }
        let points = self.ctx.rules.enrolment_points();
        if created && points > 0 {
            let mut h = self.holdings_to_move(conn, c)?;
            let explanation = Explanation::text(format!("welcome bonus for joining: {points} points"));
            let key = format!("welcome:{c}");
            let (_, expires) = self.ctx.rules.lot_times(d.occurred_at);
            let moves = lots::plan_credit(&h, points, &[]);
            post(
                conn,
                NewTx {
                    kind: TxKind::Bonus,
                    role: "effect",
                    customer_id: c,
                    document_id: None,
                    epoch: None,
                    reverses: None,
                    effective_at: d.occurred_at,
                    explanation: &explanation,
                    lines: WrittenLines::NONE,
                    actor: None,
                    idem_key: Some(&key),
                    partner: None,
                    rule: Some("welcome:enrolment"),
                    counter: Account::Expense,
                    moves,
                    new_lot: Some(LotDates {
                        earned: d.occurred_at,
                        available: d.occurred_at,
                        expires,
                    }),
                },
                &mut h,
                now,
            )?;
            self.touched.insert(c);
        }
        Ok(Some(c))
    }

    fn apply_incoming(&mut self, conn: &Connection, inc: &Incoming) -> Result<Outcome> {
        let src = inc.source();
        let now = self.ctx.now;
        let existing = find_doc(conn, &src.system, &src.doc_id)?;
        if let Some(ex) = &existing {
            if ex.version == src.version {
                return Ok(Outcome::Unchanged);
            }
            let stale = match (src.stamp, ex.stamp) {
                (Some(new), Some(cur)) if new != cur => new < cur,
                _ => version_seen(conn, ex.id, &src.version)?,
            };
            if stale {
                return Ok(Outcome::Stale);
            }
        }
        match inc {
            Incoming::Void { source, reason } => self.apply_void(conn, source, *reason, existing),
            Incoming::Document(d) => {
                let customer = self.customer_for(conn, d)?;
                let mut dependents = Vec::new();
                if let Some(ex) = &existing {
                    record_left_version(conn, ex.id)?;
                    if ex.state == "active" {
                        dependents = self.suspend_related(conn, ex)?;
                        self.cancel_effects(conn, &doc_by_id(conn, ex.id)?, "replaced by a new version")?;
                    }
                }
                let existing = existing.as_ref().map(|e| e.id);
                let id = match d.kind {
                    // the sale's lines are written with its effects (`write_sale`)
                    DocKind::Sale => write_document_row(conn, existing, d, customer, now)?,
                    DocKind::Return => write_document(conn, existing, d, customer, now)?,
                };
                match d.kind {
                    DocKind::Sale => {
                        self.apply_sale(conn, id, d, customer)?;
                        // returns that arrived before their sale, waiting for it
                        let waiting: Vec<i64> = conn
                            .prepare_cached(
                                "SELECT id FROM documents WHERE source = ?1 AND kind = 'return' AND state = 'active' \
                                 AND original_id IS NULL AND original_ref IN (?2, ?3) ORDER BY id",
                            )?
                            .query_map(
                                params![d.source.system, d.source.doc_id, d.number.as_deref().unwrap_or(&d.source.doc_id)],
                                |r| r.get(0),
                            )?
                            .collect::<rusqlite::Result<_>>()?;
                        for w in &waiting {
                            let r = doc_by_id(conn, *w)?;
                            self.cancel_effects(conn, &r, "linked to its sale")?;
                            conn.prepare_cached("UPDATE documents SET original_id = ?2 WHERE id = ?1")?
                                .execute(params![w, id])?;
                        }
                        dependents.extend(waiting);
                        dependents.sort_unstable();
                    }
                    DocKind::Return => self.apply_return(conn, id)?,
                }
                for dep in dependents {
                    self.apply_return(conn, dep)?;
                }
                Ok(if existing.is_some() {
                    Outcome::NewVersion
                } else {
                    Outcome::Applied
                })
            }
        }
    }

    fn apply_void(
        &mut self,
        conn: &Connection,
        source: &SourceRef,
        reason: VoidReason,
        existing: Option<DocRow>,
    ) -> Result<Outcome> {
        let now = self.ctx.now;
        match existing {
            None => {
                conn.prepare_cached(
                    "INSERT INTO documents (source, doc_id, version, state_code, void_reason, first_seen_at, updated_at, stamp) \
                     VALUES (?1, ?2, ?3, 1 /* void */, ?4, ?5, ?5, ?6)",
                )?
                .execute(params![
                    source.system,
                    source.doc_id,
                    super::version_column(&source.version),
                    reason.as_str(),
                    ts(now),
                    source.stamp
                ])?;
            }
            Some(ex) => {
                record_left_version(conn, ex.id)?;
                let mut dependents = Vec::new();
                if ex.state == "active" {
                    dependents = self.suspend_related(conn, &ex)?;
                    self.cancel_effects(conn, &doc_by_id(conn, ex.id)?, reason.as_str())?;
                }
                conn.prepare_cached(
                    "UPDATE documents SET version = ?2, state_code = 1 /* void */, void_reason = ?3, applied = 0, updated_at = ?4, \
                     stamp = ?5 WHERE id = ?1",
                )?
                .execute(params![
                    ex.id,
                    super::version_column(&source.version),
                    reason.as_str(),
                    ts(now),
                    source.stamp
                ])?;
                for dep in dependents {
                    self.apply_return(conn, dep)?;
                }
            }
        }
        Ok(Outcome::Voided)
    }
}

fn find_original(conn: &Connection, source: &str, reference: &str) -> Result<Option<DocRow>> {
    if let Some(d) = find_doc(conn, source, reference)? {
        return Ok(Some(d));
    }
    let mut st = conn.prepare_cached(&format!(
        "SELECT {DOC_COLS} FROM documents WHERE source = ?1 AND number = ?2 AND kind = 'sale' ORDER BY id DESC LIMIT 1"
    ))?;
    Ok(st
        .query_row(params![source, reference], doc_from_row)
        .optional()?)
}

/// The return being applied is not `applied` yet: its own counter rows, added by hand.
fn returning_counter(conn: &Connection, ret: i64, key: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(c.amount), 0) FROM document_counters c JOIN documents d ON d.id = c.document_id \
             WHERE c.document_id = ?1 AND c.counter = ?2 AND d.applied = 0",
        )?
        .query_row(params![ret, key], |r| r.get(0))?)
}

/// A stored document's lines as the rules see them (what counters and clawbacks need), with
/// the groups above each line's category from the catalog, as the sale was evaluated.
fn stored_lines(conn: &Connection, doc: i64) -> Result<Vec<Line>> {
    let mut lines: Vec<Line> = conn
        .prepare_cached(
            "SELECT product_id, name, category, quantity, unit_price, discount, net, unit_cost, service \
             FROM document_lines WHERE document_id = ?1 ORDER BY line_no",
        )?
        .query_map([doc], |r| {
            Ok(Line {
                product_id: r.get(0)?,
                name: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                category: r.get(2)?,
                category_parents: Vec::new(),
                quantity: parse_qty(&r.get::<_, String>(3)?),
                unit_price: Money(r.get(4)?),
                discount: Money(r.get(5)?),
                net: Money(r.get(6)?),
                unit_cost: r.get::<_, Option<i64>>(7)?.map(Money),
                service: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for line in &mut lines {
        if line.category.is_some()
            && let Some((path, _)) = super::catalog::product_row(conn, &line.product_id)?
        {
            line.category_parents = super::catalog::parents_of(line, &path);
        }
    }
    Ok(lines)
}

fn line_count(conn: &Connection, doc: i64) -> Result<usize> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM document_lines WHERE document_id = ?1")?
        .query_row([doc], |r| r.get(0))?;
    Ok(n as usize)
}

/// The lots a debiting transaction took from, with how much each can take back now
/// (never more than was taken, never above the lot's original size).
fn restorable(conn: &Connection, tx_id: i64) -> Result<Vec<(i64, i64)>> {
    Ok(conn
        .prepare_cached(
            "SELECT p.lot_id, MIN(-SUM(p.amount), l.amount - l.remaining) FROM postings p JOIN lots l ON l.id = p.lot_id \
             WHERE p.tx_id = ?1 AND p.lot_id IS NOT NULL AND p.amount < 0 GROUP BY p.lot_id ORDER BY MAX(p.leg) DESC",
        )?
        .query_map([tx_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?)
}

fn parse_qty(s: &str) -> rust_decimal::Decimal {
    s.parse().unwrap_or_default()
}

fn doc_label(d: &DocRow) -> String {
    match &d.number {
        Some(n) => format!("№{n} ({}:{})", d.source, d.doc_id),
        None => format!("{}:{}", d.source, d.doc_id),
    }
}

/// A database error caused by one document's data (a constraint it broke) rather than by
/// the database itself: that document is quarantined, the batch goes on.
fn is_document_error(e: &LedgerError) -> bool {
    match e {
        LedgerError::Sql(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code == rusqlite::ErrorCode::ConstraintViolation
        }
        LedgerError::Corrupt(_) => true,
        _ => false,
    }
}

impl Ledger {
    /// Applies a batch from one source in one transaction. See the module docs.
    pub fn ingest(&mut self, batch: Batch, ctx: &IngestContext<'_>) -> Result<IngestReport> {
        // Fast path: the whole batch in one transaction without per-document savepoints.
        // Should a document fail to apply (a bug, not bad data: validation catches that),
        // the transaction is rolled back and the batch redone with a savepoint around each
        // document, so that one is quarantined and the rest still commit.
        match self.ingest_pass(&batch, ctx, false) {
            Err(e) if is_document_error(&e) => self.ingest_pass(&batch, ctx, true),
            other => other,
        }
    }

    fn ingest_pass(&mut self, batch: &Batch, ctx: &IngestContext<'_>, careful: bool) -> Result<IngestReport> {
        let now = ctx.now;
        let mut tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let mut report = IngestReport::default();
        let mut touched = BTreeSet::new();
        let mut held = HashMap::new();
        let mut line_products = LineProducts::default();
        for item in &batch.items {
            match item {
                Item::Rejected(r) => {
                    let parked = Parked {
                        source: &r.system,
                        doc_ref: &r.doc_ref,
                        version: None,
                        reason: &r.reason,
                        location: r.location.as_deref(),
                        excerpt: r.excerpt.as_deref(),
                        kind: r.kind.as_deref(),
                        number: r.number.as_deref(),
                        occurred_at: r.occurred_at,
                    };
                    quarantine_put(&tx, &parked, now)?;
                    report.count(
                        format!("{}:{}", r.system, r.doc_ref),
                        Outcome::Quarantined(r.reason.clone()),
                    );
                }
                Item::Incoming(inc) => {
                    let src = inc.source();
                    let doc_ref = if src.doc_id.trim().is_empty() {
                        match inc {
                            Incoming::Document(d) => format!("no-id:{}", content_version(d)),
                            Incoming::Void { .. } => format!("no-id:void:{}", src.version),
                        }
                    } else {
                        src.doc_id.clone()
                    };
                    let label = format!("{}:{}", src.system, doc_ref);
                    let (kind, number, occurred_at) = match inc {
                        Incoming::Document(d) => {
                            (Some(d.kind.label()), d.number.as_deref(), Some(d.occurred_at))
                        }
                        Incoming::Void { .. } => (None, None, None),
                    };
                    let mut parked = Parked {
                        source: &src.system,
                        doc_ref: &doc_ref,
                        version: Some(&src.version),
                        reason: "",
                        location: None,
                        excerpt: None,
                        kind,
                        number,
                        occurred_at,
                    };
                    if let Incoming::Document(d) = inc
                        && let Err(invalid) = validate(d, ctx.limits, ctx.now)
                    {
                        if !src.doc_id.trim().is_empty() {
                            log_source(&tx, inc, now)?;
                        }
                        parked.reason = &invalid.0;
                        quarantine_put(&tx, &parked, now)?;
                        report.count(label, Outcome::Quarantined(invalid.0));
                        continue;
                    }
                    let mut run = Run {
                        ctx,
                        touched: BTreeSet::new(),
                        flags: Vec::new(),
                        held: std::mem::take(&mut held),
                        line_products: std::mem::take(&mut line_products),
                    };
                    let applied = if careful {
                        let sp = tx.savepoint()?;
                        match run.apply_incoming(&sp, inc) {
                            Ok(outcome) => {
                                sp.commit()?;
                                Ok(outcome)
                            }
                            Err(e) => Err(e),
                        }
                    } else {
                        run.apply_incoming(&tx, inc)
                    };
                    match applied {
                        Ok(outcome) => {
                            // the copy of holdings goes on to the next document only from
                            // one that was applied; after a failure (its savepoint rolled
                            // back) `held` stays empty
                            held = std::mem::take(&mut run.held);
                            line_products = std::mem::take(&mut run.line_products);
                            if outcome != Outcome::Stale {
                                quarantine_resolve(&tx, &src.system, &doc_ref, now)?;
                                log_source_applied(&tx, inc)?;
                            }
                            touched.extend(run.touched);
                            report
                                .flags
                                .extend(run.flags.into_iter().map(|f| (label.clone(), f)));
                            report.count(label, outcome);
                        }
                        Err(e) if careful && is_document_error(&e) => {
                            let reason = format!("could not apply: {e}");
                            parked.reason = &reason;
                            quarantine_put(&tx, &parked, now)?;
                            report.count(label, Outcome::Quarantined(reason));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if !batch.consumed_events.is_empty() {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO amocrm_seen_events (event_id, created_at) VALUES (?1, ?2)",
            )?;
            for (id, at) in &batch.consumed_events {
                st.execute(params![id, at])?;
            }
        }
        if let Some(cursor) = &batch.checkpoint {
            tx.prepare_cached(
                "INSERT INTO checkpoints (source, cursor, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
            )?
            .execute(params![batch.source, cursor, ts(now)])?;
        }
        report.outbox_rows = finish_write_held(&tx, since, &touched, ctx, &held)?;
        tx.commit()?;
        Ok(report)
    }

    /// A person's correction of a balance; idempotent by key.
    pub fn adjust(&mut self, req: &AdjustRequest, ctx: &IngestContext<'_>) -> Result<AdjustOutcome> {
        let now = ctx.now;
        if req.points == 0 {
            return Err(LedgerError::Refused(
                "an adjustment of 0 points changes nothing".into(),
            ));
        }
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let customer = super::query::find_customer(&tx, &req.customer)?;
        let idem = req.key.as_ref().map(|k| format!("adjust:{k}"));
        if let Some(key) = &idem {
            let prior: Option<(i64, i64, i64)> = tx
                .query_row(
                    "SELECT id, customer_id, amount FROM journal WHERE idem_key = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((tx_id, c, amount)) = prior {
                if c != customer || (amount != req.points) {
                    return Err(LedgerError::KeyReused {
                        key: req.key.clone().unwrap_or_default(),
                        tx: tx_id,
                    });
                }
                return Ok(AdjustOutcome::AlreadyApplied {
                    tx_id,
                    customer_id: c,
                });
            }
        }
        let mut h = holdings(&tx, customer)?;
        let moves = if req.points >= 0 {
            lots::plan_credit(&h, req.points, &[])
        } else {
            lots::plan_debit(&h, -req.points, &[], now)
        };
        let explanation = Explanation::text(format!(
            "{} by {}: {}",
            TxKind::Adjustment.label_ru(),
            req.by,
            req.reason
        ));
        let run = Run {
            ctx,
            touched: BTreeSet::new(),
            flags: Vec::new(),
            held: HashMap::new(),
            line_products: LineProducts::default(),
        };
        let tx_id = post(
            &tx,
            NewTx {
                kind: TxKind::Adjustment,
                role: "effect",
                customer_id: customer,
                document_id: None,
                epoch: None,
                reverses: None,
                effective_at: now,
                explanation: &explanation,
                lines: WrittenLines::NONE,
                actor: Some(&req.by),
                idem_key: idem.as_deref(),
                partner: None,
                rule: None,
                counter: Account::Adjustment,
                moves,
                new_lot: Some(run.new_lot_now(now)),
            },
            &mut h,
            now,
        )?;
        finish_write(&tx, since, &BTreeSet::from([customer]), ctx)?;
        tx.commit()?;
        Ok(AdjustOutcome::Applied {
            tx_id,
            customer_id: customer,
        })
    }

    /// Burns every lot whose expiry has come: one expiry transaction per customer.
    /// Returns the points expired.
    pub fn expire_due(&mut self, ctx: &IngestContext<'_>) -> Result<i64> {
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let customers: Vec<i64> = tx
            .prepare(EXPIRING_CUSTOMERS_SQL)?
            .query_map([ts(now)], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut total = 0;
        for c in &customers {
            let mut h = holdings(&tx, *c)?;
            let due = lots::plan_expiry(&h, now);
            let points: i64 = due.iter().map(|d| d.1).sum();
            if points == 0 {
                continue;
            }
            let moves = due
                .iter()
                .map(|(lot, n)| Move {
                    target: Target::Lot(*lot),
                    amount: -n,
                })
                .collect();
            let explanation = Explanation::text(format!("{points} points reached their expiry date"));
            post(
                &tx,
                NewTx {
                    kind: TxKind::Expiry,
                    role: "effect",
                    customer_id: *c,
                    document_id: None,
                    epoch: None,
                    reverses: None,
                    effective_at: now,
                    explanation: &explanation,
                    lines: WrittenLines::NONE,
                    actor: None,
                    idem_key: None,
                    partner: None,
                    rule: None,
                    counter: Account::Breakage,
                    moves,
                    new_lot: None,
                },
                &mut h,
                now,
            )?;
            total += points;
        }
        finish_write(&tx, since, &customers.into_iter().collect(), ctx)?;
        tx.commit()?;
        Ok(total)
    }
}

/// What a source said about a document the ledger could not take as it came (quarantined):
/// `reconcile` reads the source's side from `documents` and overlays these rows. A document
/// the ledger holds as the source sent it needs no row here — the row repeated `documents`
/// (issue 19: 118 bytes and an upsert per sale) — so applying it removes any overlay.
fn log_source(conn: &Connection, inc: &Incoming, now: DateTime<Utc>) -> Result<()> {
    let src = inc.source();
    match inc {
        Incoming::Document(d) => {
            conn.prepare_cached(
                "INSERT INTO source_log (source, doc_id, version, kind, occurred_at, total, in_force, seen_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7) ON CONFLICT (source, doc_id) DO UPDATE SET \
                 version = excluded.version, kind = excluded.kind, occurred_at = excluded.occurred_at, \
                 total = excluded.total, in_force = 1, seen_at = excluded.seen_at",
            )?
            .execute(params![
                src.system,
                src.doc_id,
                super::version_column(&src.version),
                d.kind.as_str(),
                ts(d.occurred_at),
                d.total.0,
                ts(now)
            ])?;
        }
        Incoming::Void { .. } => {
            conn.prepare_cached(
                "INSERT INTO source_log (source, doc_id, version, in_force, seen_at) VALUES (?1, ?2, ?3, 0, ?4) \
                 ON CONFLICT (source, doc_id) DO UPDATE SET version = excluded.version, in_force = 0, \
                 seen_at = excluded.seen_at",
            )?
            .execute(params![src.system, src.doc_id, super::version_column(&src.version), ts(now)])?;
        }
    }
    Ok(())
}

/// The document is in `documents` as its source sent it: no overlay (see [`log_source`]).
fn log_source_applied(conn: &Connection, inc: &Incoming) -> Result<()> {
    let src = inc.source();
    conn.prepare_cached("DELETE FROM source_log WHERE source = ?1 AND doc_id = ?2")?
        .execute(params![src.system, src.doc_id])?;
    Ok(())
}

/// What every write does before it commits: a bonus document for 1C per new journal
/// transaction (after `since`), and the visible state of each touched customer for AmoCRM —
/// each only when its destination is configured. Returns the contact rows queued.
pub(super) fn finish_write(
    conn: &Connection,
    since: i64,
    touched: &BTreeSet<i64>,
    ctx: &IngestContext<'_>,
) -> Result<usize> {
    finish_write_held(conn, since, touched, ctx, &HashMap::new())
}

/// [`finish_write`] with the holdings a batch's sales left (`Run::held`), exact as written.
fn finish_write_held(
    conn: &Connection,
    since: i64,
    touched: &BTreeSet<i64>,
    ctx: &IngestContext<'_>,
    held: &HashMap<i64, Holdings>,
) -> Result<usize> {
    super::accounting::enqueue_bonus_documents(conn, since, ctx)?;
    super::notify::enqueue_messages(conn, ctx)?;
    enqueue_onec_tiers(conn, ctx)?;
    enqueue_contact_states(conn, touched, ctx, held)
}

/// The customers with a lot that burns by ?1; named so a test can check it reads
/// `lots_open` alone (migration 35).
pub(super) const EXPIRING_CUSTOMERS_SQL: &str = "SELECT DISTINCT customer_id FROM lots WHERE remaining > 0 AND expires_at IS NOT NULL AND expires_at <= ?1";

/// The checkpoint of the tier changes already queued for 1C (a `tier_events` id).
const ONEC_TIER_CURSOR: &str = "onec:tier";

/// Queues each tier change since the cursor for 1C: one row per customer and change, keyed
/// by the change, coalesced per customer so only the newest tier is written. A customer 1C
/// does not know (no 1C key yet) gets none: there is no object to hold it. Changes made
/// before the destination was configured are queued the first time (coalesced, the newest
/// per customer), so a base that starts publishing gets every current tier.
fn enqueue_onec_tiers(conn: &Connection, ctx: &IngestContext<'_>) -> Result<usize> {
    let Some(dest) = &ctx.destinations.onec_tier else {
        return Ok(0);
    };
    let from = super::notify::cursor(conn, ONEC_TIER_CURSOR)?;
    let rows: Vec<(i64, i64, Option<String>)> = conn
        .prepare_cached("SELECT id, customer_id, to_tier FROM tier_events WHERE id > ?1 ORDER BY id")?
        .query_map([from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let Some(last) = rows.last().map(|r| r.0) else {
        return Ok(0);
    };
    let mut n = 0;
    for (event, c, tier) in rows {
        let key: Option<String> = conn
            .prepare_cached(
                "SELECT value FROM customer_keys WHERE customer_id = ?1 AND kind = 'onec' ORDER BY value LIMIT 1",
            )?
            .query_row([c], |r| r.get(0))
            .optional()?;
        let Some(onec_id) = key else {
            continue;
        };
        let payload = serde_json::json!({
            "customer_id": c,
            "onec_id": onec_id,
            "tier": tier,
            "tier_event": event,
        });
        let inserted = super::outbox::enqueue(
            conn,
            dest,
            &format!("{dest}:{c}:{event}"),
            Some(&format!("tier:{c}")),
            &payload.to_string(),
            ctx.now,
        )?;
        n += usize::from(inserted.is_some());
    }
    super::notify::set_cursor(conn, ONEC_TIER_CURSOR, last, ctx.now)?;
    Ok(n)
}

/// Queues the visible state of each touched customer for the contact destination, if one
/// is configured. Rows coalesce per customer: only the newest state is delivered.
pub(super) fn enqueue_contact_states(
    conn: &Connection,
    touched: &BTreeSet<i64>,
    ctx: &IngestContext<'_>,
    held: &HashMap<i64, Holdings>,
) -> Result<usize> {
    let Some(dest) = &ctx.destinations.contact_state else {
        return Ok(0);
    };
    let mut n = 0;
    for c in touched {
        let read;
        let h = match held.get(c) {
            Some(h) => h,
            None => {
                read = holdings(conn, *c)?;
                &read
            }
        };
        let f = lots::figures(h, ctx.now, ctx.warn_before);
        let last_tx: i64 = conn
            .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM journal WHERE customer_id = ?1")?
            .query_row([c], |r| r.get(0))?;
        let (tier, segment, offer): (Option<String>, Option<String>, Option<String>) = conn
            .prepare_cached("SELECT tier, segment, offer FROM customers WHERE id = ?1")?
            .query_row([c], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        // the card lists open vouchers: a free line that used one changes it without a journal entry
        let vouchers: Vec<i64> = conn
            .prepare_cached(
                "SELECT id FROM vouchers WHERE customer_id = ?1 AND state = 'issued' \
                   AND (expires_at IS NULL OR expires_at > ?2) ORDER BY id",
            )?
            .query_map(params![c, ts(ctx.now)], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let payload = serde_json::json!({
            "customer_id": c,
            "available": f.available,
            "pending": f.pending,
            "expiring_soon": f.expiring_soon,
            "next_expiry": f.next_expiry.map(|(d, _)| d.to_rfc3339()),
            "next_expiry_points": f.next_expiry.map(|(_, p)| p),
            "tier": tier,
            "segment": segment,
            "offer": offer,
            "vouchers": vouchers,
            "as_of_tx": last_tx,
        });
        let inserted = super::outbox::enqueue(
            conn,
            dest,
            &format!(
                "{dest}:contact:{c}:{last_tx}:{}",
                short_hash(&payload.to_string())
            ),
            Some(&format!("contact:{c}")),
            &payload.to_string(),
            ctx.now,
        )?;
        n += usize::from(inserted.is_some());
    }
    Ok(n)
}

/// A short stable digest, so a state that changed without a new journal entry (a tier or
/// an offer) still gets its own idempotency key.
fn short_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(text.as_bytes());
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}
