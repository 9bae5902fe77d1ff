//! The loyalty ledger: an SQLite file holding documents, an append-only double-entry journal,
//! points lots, checkpoints, quarantine and the outbox.
//!
//! Everything that changes the ledger goes through one of a few entry points, each one SQLite
//! transaction: [`Ledger::ingest`] (documents + their checkpoint + outbox rows),
//! [`Ledger::adjust`], [`Ledger::expire_due`] and the outbox operations. Reads never write.
//! [`LedgerStore`] is the narrow interface the rest of the program uses, so that another
//! backend (PostgreSQL for chains that outgrow one machine) can stand in later.

mod accounting;
mod amocrm_state;
pub mod backup;
mod catalog;
pub mod counters;
mod delivery;
mod holds;
mod ingest;
mod jobs;
mod notify;
mod offers;
mod opening;
mod outbox;
mod people;
mod query;
mod reconcile;
mod report;
pub(crate) mod schema;
mod state;
mod telegram;
mod totals;
mod verify;
mod wal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use rusqlite::{Connection, OpenFlags, params};

use crate::core::document::{DocKind, HASH_VERSION, Line, hash_version};
use crate::core::journal::{Account, Explanation, LineFacts, LineOwn, TxKind};
use crate::core::money::Money;

pub use accounting::{Books, HistoryPosting, Posting, PostingKind, PostingRecord, movement_of};
pub use amocrm_state::{
    CardFigures, CustomerKeys, EVENTS_CHECKPOINT, NOTES_DESTINATION, NoteFacts, OpenVoucher, StoredTokens,
    Unmatched,
};
pub use catalog::{CatalogItem, CatalogReport, CostPolicy};
pub use delivery::{DeliveryError, DeliveryPolicy, DeliveryReport, SharedLedger, Sink, deliver_due};
pub use holds::{
    API_SOURCE, CommitAnswer, CommitRequest, HoldError, HoldMatching, HoldRequest, HoldResult, HoldSettings,
    HoldView, QuoteAnswer, QuoteLineAnswer, SpendableView,
};
pub(crate) use ingest::line_product;
pub use ingest::{
    AdjustOutcome, AdjustRequest, Batch, Destinations, IngestContext, IngestReport, Item, Outcome,
};
pub use jobs::{NightlyReport, TierEvent, TillVoucher};
pub use notify::{Address, ChannelStatus, Reach};
pub use offers::{CustomerOffers, OffersRefresh};
pub use opening::{OpeningReport, OpeningRow, opening_source_from_register};
pub use outbox::{OutboxFilter, OutboxRow, OutboxState};
pub use people::{
    AttributeChange, Attributes, AttributesReport, CustomersReport, Forgotten, Precedence, Unreadable,
};
pub use query::{
    BalanceView, CustomerView, DateRange, HistoryEntry, LastDocument, LedgerIssued, PartnerTotals,
    ProgramsReport, QuarantineEntry, Summary, VoucherView,
};
pub use reconcile::{DayRow, DiffKind, Difference, Reconciliation, SourceDoc};
pub use report::{LossLine, LossList, ProgramReport};
pub use telegram::{
    BotSettings, ChatMessage, REPLIES as TELEGRAM_REPLIES, Reply as TelegramReply,
    UPDATES as TELEGRAM_UPDATES,
};
pub use verify::Violation;
pub use wal::{WAL_LIMIT_PAGES, WalCheckpoints};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open ledger {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "ledger schema version {found} is newer than this kopilka understands ({known}); upgrade kopilka"
    )]
    TooNew { found: i64, known: i64 },
    #[error("ledger migration {0} failed: {1}")]
    Migration(i64, rusqlite::Error),
    #[error("ledger database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("no customer matches {0:?}")]
    UnknownCustomer(String),
    #[error("{0:?} matches several customers: {1}")]
    AmbiguousCustomer(String, String),
    #[error("no outbox row {0}")]
    UnknownOutboxRow(i64),
    #[error("outbox row {id} is {state}; {action} needs a {needed} row")]
    OutboxState {
        id: i64,
        state: String,
        action: &'static str,
        needed: &'static str,
    },
    #[error("adjustment key {key:?} was already used for a different adjustment (tx {tx})")]
    KeyReused { key: String, tx: i64 },
    #[error("{0}")]
    Refused(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// Connection settings with units in their names.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub busy_timeout: Duration,
    /// `synchronous=NORMAL` in WAL mode: a power cut may lose the last transactions, never
    /// corrupt the file or split a transaction; the checkpoint is in the same transaction as
    /// its documents, so lost work is simply read again. `FULL` trades speed for that window.
    pub synchronous_full: bool,
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            busy_timeout: Duration::from_secs(5),
            synchronous_full: false,
            read_only: false,
        }
    }
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

pub(crate) fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// A journal row's explanation as any version stored it: packed (a blob) since issue 19's
/// last schema, text before.
pub(crate) fn explanation_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Explanation> {
    Ok(explanation_of(r.get_ref(i)?))
}

pub(crate) fn explanation_of(v: rusqlite::types::ValueRef<'_>) -> Explanation {
    explanation_with(v, |_| None)
}

/// The column in any stored form, items left to their line filled by `fill`.
fn explanation_with(
    v: rusqlite::types::ValueRef<'_>,
    fill: impl FnMut(u32) -> Option<LineFacts>,
) -> Explanation {
    match v {
        rusqlite::types::ValueRef::Blob(b) => Explanation::from_packed_with(b, fill),
        rusqlite::types::ValueRef::Text(t) => {
            Explanation::from_stored_with(&String::from_utf8_lossy(t), fill)
        }
        _ => Explanation::default(),
    }
}

/// Line `n` of a document's lines, numbered from 1 as explanations name them.
fn nth_line<T>(lines: &[T], n: u32) -> Option<&T> {
    lines.get(usize::try_from(n).ok()?.checked_sub(1)?)
}

/// How `posting_rows` stores an account (migration 29): a code fixed forever, which the view
/// `postings` — what every query reads — spells out as `Account::as_str`.
pub(crate) fn account_code(a: Account) -> i64 {
    match a {
        Account::Customer => 0,
        Account::Expense => 1,
        Account::Redemption => 2,
        Account::Breakage => 3,
        Account::Adjustment => 4,
        Account::Opening => 5,
    }
}

/// How a document's version is stored (migration 31, issue 19): a content hash — `sha256:`
/// and 32 lowercase hex digits, 39 bytes of text (`core::document::hash_version`) — as its 16
/// bytes; any other version (1C's `DataVersion`, a deletion mark) as given. Every table that
/// keeps a document's version (`documents`, `document_versions`, `source_log`) stores it this
/// way, so a version written now equals the same version written before, whichever table it
/// is compared in.
pub(crate) fn version_column(v: &str) -> rusqlite::types::Value {
    let hex = v
        .strip_prefix(HASH_VERSION)
        .filter(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    let bytes = hex.and_then(|h| {
        (0..16)
            .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
    });
    match bytes {
        Some(b) => rusqlite::types::Value::Blob(b),
        None => rusqlite::types::Value::Text(v.to_string()),
    }
}

/// A stored version as every reader and message spells it ([`version_column`] undone).
pub(crate) fn version_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<String> {
    match r.get_ref(i)? {
        rusqlite::types::ValueRef::Blob(b) => Ok(hash_version(b)),
        _ => r.get(i),
    }
}

/// How the journal stores an entry's kind (migration 32): a code fixed forever, which the
/// generated column `kind` — what every query reads — spells out as `TxKind::as_str`. The two
/// commonest (an accrual, a bonus) take no byte in a record.
pub(crate) fn kind_code(k: TxKind) -> i64 {
    match k {
        TxKind::Accrual => 0,
        TxKind::Bonus => 1,
        TxKind::Redemption => 2,
        TxKind::Reversal => 3,
        TxKind::Expiry => 4,
        TxKind::Adjustment => 5,
        TxKind::Opening => 6,
        TxKind::WriteOff => 7,
    }
}

/// How the journal stores an entry's role (migration 32; the column `role` spells it out):
/// `None` for a word that is no role, which the column refuses.
pub(crate) fn role_code(role: &str) -> Option<i64> {
    match role {
        "effect" => Some(0),
        "cancel" => Some(1),
        _ => None,
    }
}

/// How `documents` stores a document's kind (migration 32; the column `kind` spells it out).
/// Its state is stored the same way, written where it is set: 0 `active`, 1 `void`.
pub(crate) fn doc_kind_code(k: DocKind) -> i64 {
    match k {
        DocKind::Sale => 0,
        DocKind::Return => 1,
    }
}

/// A journal row's explanation with the items stored against their line filled from the
/// document's lines (`LineFacts`), read only if the row has such an item. What shows an
/// explanation item by item (`history`, forgetting a person) reads through this; a reader of
/// the summary alone needs no lines ([`explanation_of`]).
pub(crate) fn explanation_read(
    conn: &Connection,
    v: rusqlite::types::ValueRef<'_>,
    document: Option<i64>,
) -> rusqlite::Result<Explanation> {
    let mut lines: Option<rusqlite::Result<Vec<LineFacts>>> = None;
    let e = explanation_with(v, |n| {
        let doc = document?;
        let read = lines.get_or_insert_with(|| line_facts(conn, doc));
        nth_line(read.as_ref().ok()?, n).cloned()
    });
    match lines {
        Some(Err(e)) => Err(e),
        _ => Ok(e),
    }
}

/// A document's lines as explanations name them, by line number from 1 (numbers are written
/// 1, 2, … without gaps).
fn line_facts(conn: &Connection, document: i64) -> rusqlite::Result<Vec<LineFacts>> {
    conn.prepare_cached(
        "SELECT product_id, net, points, quantity, unit_cost, redeemed FROM document_lines \
         WHERE document_id = ?1 ORDER BY line_no",
    )?
    .query_map([document], |r| {
        let net: i64 = r.get(1)?;
        let quantity = r.get::<_, String>(3)?.parse().ok();
        let unit_cost: Option<i64> = r.get(4)?;
        let paid: Option<i64> = r.get(5)?;
        Ok(LineFacts {
            product: r.get(0)?,
            net,
            points: r.get(2)?,
            margin: quantity
                .and_then(|q| crate::core::rules::margin_of(Money(net), q, unit_cost.map(Money)))
                .map(|m| m - paid.unwrap_or(0)),
        })
    })?
    .collect()
}

/// What SQLite plans for `sql` with `params` bound, one step a line: for tests that pin a
/// query to the index it must read.
#[cfg(test)]
pub(crate) fn query_plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Vec<String> {
    let mut st = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .expect("a query");
    st.query_map(params, |r| r.get(3))
        .expect("a plan")
        .collect::<rusqlite::Result<_>>()
        .expect("a plan")
}

/// What the journal's `explanation` column is given: the packed form, or the compact text if
/// packing failed (both read through [`explanation_at`]).
pub(crate) fn explanation_column(e: &Explanation) -> rusqlite::types::Value {
    explanation_column_against(e, WrittenLines::NONE)
}

/// The lines of a document being written with an entry, as `insert_lines` writes them: each
/// with the points it earned and the points paid on it (a line beyond either has none).
#[derive(Clone, Copy)]
pub(crate) struct WrittenLines<'a> {
    pub(crate) lines: &'a [Line],
    pub(crate) points: &'a [i64],
    pub(crate) paid: &'a [i64],
}

impl WrittenLines<'_> {
    /// No lines: an entry of any other kind, whose explanation leaves nothing to them.
    pub(crate) const NONE: WrittenLines<'static> = WrittenLines {
        lines: &[],
        points: &[],
        paid: &[],
    };
}

/// The column for an entry of the document whose lines are being written with it: items that
/// repeat their line's product, net, points and margin leave them to the line (`LineFacts`).
pub(crate) fn explanation_column_against(
    e: &Explanation,
    written: WrittenLines<'_>,
) -> rusqlite::types::Value {
    let line = |n: u32| {
        let l = nth_line(written.lines, n)?;
        let paid = nth_line(written.paid, n).copied().unwrap_or(0);
        Some(LineOwn {
            product: l.product_id.as_str(),
            net: l.net.0,
            points: nth_line(written.points, n).copied().unwrap_or(0),
            margin: crate::core::rules::line_margin(l).map(|m| m - paid),
        })
    };
    match e.pack_against(line) {
        Some(packed) => rusqlite::types::Value::Blob(packed),
        None => rusqlite::types::Value::Text(e.to_stored_against(line)),
    }
}

/// Writes the line facts back into the explanations of `document`'s entries that left them
/// to its lines, before a new version of the document replaces the lines: an entry keeps
/// saying what it was made against. Reads the document's entries through `journal_document`;
/// only a document that changes pays it.
pub(crate) fn explanations_off_lines(conn: &Connection, document: i64) -> Result<()> {
    let rows: Vec<(i64, rusqlite::types::Value)> = conn
        .prepare_cached("SELECT id, explanation FROM journal WHERE document_id = ?1")?
        .query_map([document], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let facts = line_facts(conn, document)?;
    for (id, value) in rows {
        let mut left = false;
        let e = explanation_with((&value).into(), |n| {
            left = true;
            nth_line(&facts, n).cloned()
        });
        if left {
            conn.prepare_cached("UPDATE journal SET explanation = ?2 WHERE id = ?1")?
                .execute(params![id, explanation_column(&e)])?;
        }
    }
    Ok(())
}

pub(crate) fn from_ts(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl Ledger {
    /// Opens (creating if needed) the ledger and migrates it to the current schema.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Ledger> {
        let open_err = |source| LedgerError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !opts.read_only
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| LedgerError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidPath(PathBuf::from(format!("{}: {e}", dir.display()))),
            })?;
        }
        let flags = if opts.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
        counters::register(&conn).map_err(open_err)?;
        // one sale touches ~80 distinct statements (ingest, lots, outbox, catalog, state);
        // a cache smaller than that re-prepares them on every sale (12% of import time)
        conn.set_prepared_statement_cache_capacity(256);
        let sync = if opts.synchronous_full { "FULL" } else { "NORMAL" };
        if !opts.read_only {
            conn.execute_batch(&format!(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA cache_size=-16384;"
            ))
            .map_err(open_err)?;
            // a migration that rebuilds a table sorts every row of it: its sorts spill to
            // temporary files, so a large ledger migrates in bounded memory (in memory they
            // held 135 MiB for 1M sales); the daily work's small sorts stay in memory
            schema::migrate(&mut conn)?;
            conn.execute_batch("PRAGMA temp_store=MEMORY;")
                .map_err(open_err)?;
        } else {
            conn.execute_batch("PRAGMA foreign_keys=ON;").map_err(open_err)?;
        }
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// This ledger's random id (made once by migration 9).
    pub fn ledger_uid(&self) -> Result<String> {
        ledger_uid(&self.conn)
    }

    /// A member's friend code in this program (`None` for an id beyond the code space).
    pub fn referral_code(&self, customer_id: i64) -> Result<Option<String>> {
        Ok(crate::core::identity::referral_code(
            customer_id,
            code_key(&self.conn)?,
        ))
    }

    /// A value of the ledger's `meta` table (job bookkeeping, watermarks).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Every source's checkpoint with the time it last moved (sync lag per source).
    pub fn checkpoints(&self) -> Result<Vec<(String, String, DateTime<Utc>)>> {
        let mut st = self
            .conn
            .prepare("SELECT source, cursor, updated_at FROM checkpoints ORDER BY source")?;
        Ok(st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, from_ts(r.get(2)?))))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// The stored cursor of a source, as written by the last batch that read from it.
    pub fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row(
                "SELECT cursor FROM checkpoints WHERE source = ?1",
                [source],
                |r| r.get(0),
            )
            .optional()?)
    }
}

/// The interface the rest of kopilka uses. SQLite ([`Ledger`]) is the embedded default.
pub trait LedgerStore {
    fn ingest(&mut self, batch: Batch, ctx: &IngestContext<'_>) -> Result<IngestReport>;
    fn adjust(&mut self, req: &AdjustRequest, ctx: &IngestContext<'_>) -> Result<AdjustOutcome>;
    fn expire_due(&mut self, ctx: &IngestContext<'_>) -> Result<i64>;
    fn balance(&self, customer: &str, now: DateTime<Utc>, warn: chrono::Duration) -> Result<BalanceView>;
    fn history(&self, customer: &str) -> Result<(CustomerView, Vec<HistoryEntry>)>;
    fn summary(&self, range: &DateRange, now: DateTime<Utc>) -> Result<Summary>;
    fn verify(&self) -> Result<Vec<Violation>>;
    fn checkpoint(&self, source: &str) -> Result<Option<String>>;
}

impl LedgerStore for Ledger {
    fn ingest(&mut self, batch: Batch, ctx: &IngestContext<'_>) -> Result<IngestReport> {
        Ledger::ingest(self, batch, ctx)
    }
    fn adjust(&mut self, req: &AdjustRequest, ctx: &IngestContext<'_>) -> Result<AdjustOutcome> {
        Ledger::adjust(self, req, ctx)
    }
    fn expire_due(&mut self, ctx: &IngestContext<'_>) -> Result<i64> {
        Ledger::expire_due(self, ctx)
    }
    fn balance(&self, customer: &str, now: DateTime<Utc>, warn: chrono::Duration) -> Result<BalanceView> {
        Ledger::balance(self, customer, now, warn)
    }
    fn history(&self, customer: &str) -> Result<(CustomerView, Vec<HistoryEntry>)> {
        Ledger::history(self, customer)
    }
    fn summary(&self, range: &DateRange, now: DateTime<Utc>) -> Result<Summary> {
        Ledger::summary(self, range, now)
    }
    fn verify(&self) -> Result<Vec<Violation>> {
        Ledger::verify(self)
    }
    fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        Ledger::checkpoint(self, source)
    }
}

/// This program's friend-code key ([`crate::core::identity::CodeKey`]), drawn by migration
/// 21; a ledger whose row was lost or spoiled keeps working with the shipped key.
pub(crate) fn code_key(conn: &rusqlite::Connection) -> Result<crate::core::identity::CodeKey> {
    use rusqlite::OptionalExtension;
    let text: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'friend_code_key'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(text
        .as_deref()
        .and_then(crate::core::identity::CodeKey::parse)
        .unwrap_or(crate::core::identity::CodeKey::SHIPPED))
}

/// This ledger's random id, part of the keys of what kopilka writes to 1C: two ledgers (a
/// rebuilt one, a second instance, a test copy) never name different movements alike there.
pub(crate) fn ledger_uid(conn: &rusqlite::Connection) -> Result<String> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'ledger_uid'")?
        .query_row([], |r| r.get(0))?)
}

#[cfg(test)]
mod account_code_tests {
    use super::*;

    /// The codes `posting_rows` stores and the words the view `postings` gives back are one
    /// mapping: every account reads back as itself.
    #[test]
    fn every_account_reads_back_through_the_view_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.db"), &OpenOptions::default()).unwrap();
        let conn = &ledger.conn;
        conn.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
        for (leg, a) in Account::ALL.into_iter().enumerate() {
            conn.execute(
                "INSERT INTO posting_rows (tx_id, leg, account, amount) VALUES (1, ?1, ?2, 0)",
                params![leg as i64, account_code(a)],
            )
            .unwrap();
        }
        let read: Vec<String> = conn
            .prepare("SELECT account FROM postings WHERE tx_id = 1 ORDER BY leg")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let words: Vec<&str> = Account::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(read, words);
    }

    /// The codes the journal, `documents` and the outbox store and the words their generated
    /// columns give back are one mapping (migration 32): every kind, role and state reads back
    /// as itself.
    #[test]
    fn every_kind_role_and_state_code_reads_back_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.db"), &OpenOptions::default()).unwrap();
        let conn = &ledger.conn;
        conn.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
        for k in TxKind::ALL {
            for role in ["effect", "cancel"] {
                let (kind, read): (String, String) = conn
                    .query_row(
                        "INSERT INTO journal (kind_code, role_code, customer_id, amount, effective_at, recorded_at, \
                         explanation) VALUES (?1, ?2, 1, 0, 0, 0, '') RETURNING kind, role",
                        params![kind_code(k), role_code(role)],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                assert_eq!((kind.as_str(), read.as_str()), (k.as_str(), role));
            }
        }
        assert!(
            conn.execute(
                "INSERT INTO journal (kind_code, role_code, customer_id, amount, effective_at, recorded_at, \
                 explanation) VALUES (0, ?1, 1, 0, 0, 0, '')",
                [role_code("reversal")],
            )
            .is_err(),
            "a word that is no role is refused"
        );
        for state in [
            outbox::OutboxState::Pending,
            outbox::OutboxState::Delivered,
            outbox::OutboxState::Dead,
            outbox::OutboxState::Superseded,
            outbox::OutboxState::Dropped,
        ] {
            let read: String = conn
                .query_row(
                    "INSERT INTO outbox (destination, idem_key, payload, state_code, next_attempt_at, created_at, \
                     updated_at) VALUES ('d', ?1, '', ?2, 0, 0, 0) RETURNING state",
                    params![state.as_str(), state.code()],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(read, state.as_str());
        }
        for (n, k) in [DocKind::Sale, DocKind::Return].into_iter().enumerate() {
            for (state, code) in [("active", 0), ("void", 1)] {
                let (kind, read): (String, String) = conn
                    .query_row(
                        "INSERT INTO documents (source, doc_id, version, kind_code, state_code, first_seen_at, \
                         updated_at) VALUES ('t', ?1, 'v', ?2, ?3, 0, 0) RETURNING kind, state",
                        params![format!("{n}{state}"), doc_kind_code(k), code],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                assert_eq!((kind.as_str(), read.as_str()), (k.as_str(), state));
            }
        }
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    /// A version reads back exactly as it was given, whatever form it is stored in: a content
    /// hash as its bytes, anything that only looks like one (upper case, short, not hex) and
    /// every other source's version as text.
    #[test]
    fn every_version_reads_back_as_given_and_only_a_content_hash_is_kept_as_bytes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE v (version TEXT NOT NULL)")
            .unwrap();
        let cases = [
            // a content hash as `core::document::content_version` writes one
            ("sha256:023aee9d69f05fb58e4d44927bc97f97", "blob"),
            ("sha256:00000000000000000000000000000000", "blob"),
            ("sha256:0123456789abcdef0123456789ABCDEF", "text"),
            ("sha256:0123456789abcdef0123456789abcde", "text"),
            ("sha256:0123456789abcdef0123456789abcdeg", "text"),
            ("sha256:0123456789abcdef0123456789abcdef00", "text"),
            ("AAAAAgAAAAA=", "text"),
            ("AAAAAgAAAAA=:deleted", "text"),
            ("", "text"),
            ("sha256:ёё23456789abcdef0123456789abcd", "text"),
        ];
        for (v, stored) in cases {
            conn.execute("DELETE FROM v", []).unwrap();
            conn.execute("INSERT INTO v VALUES (?1)", [version_column(v)])
                .unwrap();
            let (read, kind): (String, String) = conn
                .query_row("SELECT version, typeof(version) FROM v", [], |r| {
                    Ok((version_at(r, 0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!((read.as_str(), kind.as_str()), (v, stored));
        }
    }
}
