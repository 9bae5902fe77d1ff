//! Big ledgers made fast: the rows `Ledger::ingest` would leave for a history of sales,
//! written with direct SQL into a database the real migrations created. Used by `start`
//! (10M journal entries) and `poll` (1M sales matching the OData simulator's).
//!
//! Per sale: the document (active, applied, epoch 1) with its lines, its version, its
//! source log row; for a customer's sale an accrual (a lot, a customer posting into it and
//! the expense counter-posting) and, when the sale was paid partly with points, a
//! redemption taken from the customer's previous lot. The result passes `ledger verify`
//! (a test below checks it). Not written: the rules' projections (stamp counters, budget
//! totals, offer baskets), outbox history and accounting postings — the bulk ledger is a
//! ledger whose outbox was delivered long ago.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::params;

use crate::core::document::Document;
use crate::core::journal::{Account, Explanation, TxKind};
use crate::ledger::{Ledger, OpenOptions};

/// Sales per transaction while building.
const BUILD_BATCH_SALES: usize = 20_000;
/// Points earned per 100 kopecks paid, in hundredths (3%).
const ACCRUAL_PERCENT: i64 = 3;
/// Days points stay pending, and how long they live after.
const RETURN_WINDOW_DAYS: i64 = 14;
const LIFETIME_DAYS: i64 = 365;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Built {
    pub sales: u64,
    pub lines: u64,
    pub customers: u64,
    pub entries: u64,
    pub postings: u64,
    pub lots: u64,
    pub bytes: u64,
}

/// Writes `sales` into a new ledger at `path`. A sale's redemption is kept only when the
/// customer's previous lot can pay it (otherwise it is dropped, as if paid in money).
pub fn build(path: &Path, sales: impl Iterator<Item = Document>) -> anyhow::Result<Built> {
    drop(Ledger::open(path, &OpenOptions::default())?);
    let mut conn = rusqlite::Connection::open(path)?;
    // Building is not ingest: no journal, no fsync; the file is only used once complete.
    conn.execute_batch(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA locking_mode=EXCLUSIVE; \
         PRAGMA cache_size=-1048576; PRAGMA temp_store=MEMORY; PRAGMA foreign_keys=OFF;",
    )?;
    let mut b = Builder {
        customers: HashMap::new(),
        last_lot: HashMap::new(),
        built: Built::default(),
    };
    let mut sales = sales.peekable();
    while sales.peek().is_some() {
        let tx = conn.transaction()?;
        for d in sales.by_ref().take(BUILD_BATCH_SALES) {
            b.sale(&tx, &d)?;
        }
        tx.commit()?;
    }
    conn.execute_batch("PRAGMA journal_mode=DELETE;")?;
    drop(conn);
    // back to what kopilka runs with (WAL), and the file checkpointed
    let l = Ledger::open(path, &OpenOptions::default())?;
    drop(l);
    b.built.customers = b.customers.len() as u64;
    b.built.bytes = std::fs::metadata(path)?.len();
    Ok(b.built)
}

struct Builder {
    /// card → customer id
    customers: HashMap<String, i64>,
    /// customer id → (lot id, remaining) of their latest lot
    last_lot: HashMap<i64, (i64, i64)>,
    built: Built,
}

impl Builder {
    fn customer(
        &mut self,
        conn: &rusqlite::Connection,
        d: &Document,
        at: i64,
    ) -> anyhow::Result<Option<i64>> {
        let Some(card) = d.customer.card.clone() else {
            return Ok(None);
        };
        if let Some(id) = self.customers.get(&card) {
            return Ok(Some(*id));
        }
        conn.prepare_cached("INSERT INTO customers (created_at, name) VALUES (?1, ?2)")?
            .execute(params![at, d.customer.name])?;
        let id = conn.last_insert_rowid();
        let mut key = conn.prepare_cached(
            "INSERT OR IGNORE INTO customer_keys (kind, value, customer_id) VALUES (?1, ?2, ?3)",
        )?;
        for k in d.customer.keys() {
            key.execute(params![k.kind(), k.value(), id])?;
        }
        self.customers.insert(card, id);
        Ok(Some(id))
    }

    fn sale(&mut self, conn: &rusqlite::Connection, d: &Document) -> anyhow::Result<()> {
        let at = d.occurred_at.timestamp();
        let recorded = at + 60;
        let customer = self.customer(conn, d, at)?;
        let accrual = match customer {
            Some(_) => d.total.0 * ACCRUAL_PERCENT / 10_000,
            None => 0,
        };
        let redeem = match customer.and_then(|c| self.last_lot.get(&c)) {
            Some((_, remaining)) => d.points_redeemed.0.min(*remaining).max(0),
            None => 0,
        };
        conn.prepare_cached(
            "INSERT INTO documents (source, doc_id, version, kind_code, state_code, epoch, applied, number, occurred_at, \
             customer_id, currency, total, points_redeemed, store, first_seen_at, updated_at, margin, reward_value, loss) \
             VALUES (?1, ?2, ?3, 0 /* sale */, 0 /* active */, 1, 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12, ?13, 0)",
        )?
        .execute(params![
            d.source.system,
            d.source.doc_id,
            crate::ledger::version_column(&d.source.version),
            d.number,
            at,
            customer,
            d.currency,
            d.total.0,
            redeem,
            d.store,
            recorded,
            d.total.0 / 4,
            accrual * 100,
        ])?;
        let doc = conn.last_insert_rowid();
        let mut line = conn.prepare_cached(
            "INSERT INTO document_line_rows (document_id, line_no, product, quantity, unit_price, \
             discount, net, unit_cost, service, points) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for (i, l) in d.lines.iter().enumerate() {
            let points = if i == 0 { accrual } else { 0 };
            let product = crate::ledger::line_product(conn, &l.product_id, &l.name, l.category.as_deref())?;
            line.execute(params![
                doc,
                i as i64 + 1,
                product,
                l.quantity.normalize().to_string(),
                l.unit_price.0,
                l.discount.0,
                l.net.0,
                l.unit_cost.map(|c| c.0),
                l.service,
                points
            ])?;
            self.built.lines += 1;
        }
        self.built.sales += 1;
        let Some(c) = customer else { return Ok(()) };
        if redeem > 0
            && let Some((lot, remaining)) = self.last_lot.get(&c).copied()
        {
            let why = Explanation::text(format!(
                "{redeem} points paid at the till on sale {}",
                d.source.doc_id
            ));
            let tx = self.journal(conn, TxKind::Redemption, c, doc, -redeem, at, recorded, &why)?;
            self.posting(conn, tx, Account::Customer, Some(c), Some(lot), -redeem)?;
            self.posting(conn, tx, Account::Redemption, None, None, redeem)?;
            conn.prepare_cached("UPDATE lots SET remaining = remaining - ?1 WHERE id = ?2")?
                .execute(params![redeem, lot])?;
            self.last_lot.insert(c, (lot, remaining - redeem));
        }
        if accrual > 0 {
            let why = Explanation::text(format!(
                "{accrual} points: {ACCRUAL_PERCENT}% of {} kopecks paid",
                d.total.0
            ));
            let tx = self.journal(conn, TxKind::Accrual, c, doc, accrual, at, recorded, &why)?;
            let available = at + RETURN_WINDOW_DAYS * 86_400;
            conn.prepare_cached(
                "INSERT INTO lots (customer_id, origin_tx, earned_at, available_at, expires_at, amount, remaining) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            )?
            .execute(params![
                c,
                tx,
                at,
                available,
                available + LIFETIME_DAYS * 86_400,
                accrual
            ])?;
            let lot = conn.last_insert_rowid();
            self.built.lots += 1;
            self.posting(conn, tx, Account::Customer, Some(c), Some(lot), accrual)?;
            self.posting(conn, tx, Account::Expense, None, None, -accrual)?;
            self.last_lot.insert(c, (lot, accrual));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn journal(
        &mut self,
        conn: &rusqlite::Connection,
        kind: TxKind,
        customer: i64,
        doc: i64,
        amount: i64,
        at: i64,
        recorded: i64,
        why: &Explanation,
    ) -> anyhow::Result<i64> {
        conn.prepare_cached(
            "INSERT INTO journal (kind_code, role_code, customer_id, document_id, epoch, amount, effective_at, recorded_at, \
             explanation) VALUES (?1, 0 /* effect */, ?2, ?3, 1, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            crate::ledger::kind_code(kind),
            customer,
            doc,
            amount,
            at,
            recorded,
            serde_json::to_string(why)?
        ])?;
        self.built.entries += 1;
        Ok(conn.last_insert_rowid())
    }

    fn posting(
        &mut self,
        conn: &rusqlite::Connection,
        tx: i64,
        account: Account,
        customer: Option<i64>,
        lot: Option<i64>,
        amount: i64,
    ) -> anyhow::Result<()> {
        conn.prepare_cached(
            "INSERT INTO posting_rows (tx_id, leg, account, customer_id, lot_id, amount) \
             VALUES (?1, (SELECT COUNT(*) + 1 FROM posting_rows WHERE tx_id = ?1), ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            tx,
            crate::ledger::account_code(account),
            customer,
            lot,
            amount
        ])?;
        self.built.postings += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::data::History;

    #[test]
    fn a_bulk_ledger_passes_verify_and_reads_like_an_ingested_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulk.db");
        let h = History::new(3_000);
        let built = build(&path, h.iter()).unwrap();
        assert_eq!(built.sales, 3_000);
        assert!(built.entries > built.sales / 2, "{built:?}");
        let ledger = Ledger::open(&path, &OpenOptions::default()).unwrap();
        let v = ledger.verify().unwrap();
        assert!(v.is_empty(), "{v:#?}");
        let s = ledger
            .summary(&crate::ledger::DateRange::default(), h.end())
            .unwrap();
        assert_eq!(s.sales_count, 3_000);
        assert!(s.points_accrued > 0 && s.points_redeemed > 0, "{s:?}");
    }
}
