//! Polling a 1C base's documents over OData into the ledger.
//!
//! 1C offers no change feed on entity sets and no "modified at" field, so change detection
//! follows what connectors do (spec C, "Detecting changes"):
//!
//! - **Incremental poll**, per document type: headers only (`Ref_Key`, `DataVersion`, `Date`,
//!   `Posted`, `DeletionMark`) of documents with `Date ge <watermark − overlap>`, paged with
//!   `$skip`/`$top` under `$orderby=Date,Ref_Key` until a short page. A document whose
//!   `DataVersion` is the one already applied is skipped without reading its lines; an
//!   unposted or deletion-marked one becomes a void from its header alone; the rest are read
//!   whole — one by one when a page holds few of them, else by re-reading the page with its
//!   tabular section. A poll with nothing new therefore costs one page of headers per type.
//! - **The watermark** is the latest `Date` read (never beyond the poll's own time, so a
//!   document dated next year cannot blind the poll), kept as 1C's naive local time in the
//!   checkpoint `<system>:odata:<set>`. It is written in the same ledger transaction as the
//!   documents it covers, batch by batch (`[ledger] max_documents_per_transaction`), so a
//!   failure part-way leaves it before every unapplied document.
//! - **Re-scan.** A date window misses documents entered back-dated, and edits, unpostings,
//!   deletion marks and deletions of documents older than the overlap. Every `rescan_every`
//!   the same header walk covers `rescan_window`; a document the ledger holds in that window
//!   but 1C no longer lists is read by key, and a 404 makes it a `Deleted` void. Its time is
//!   the checkpoint `<system>:odata:rescan`. The trade-off: a wider overlap catches more at
//!   once but costs requests on every poll; the re-scan costs one header walk of the window
//!   per period and bounds how long a back-dated change can stay unseen.
//! - **Which versions are applied** is remembered in memory per poller (the daemon keeps it
//!   between polls) and seeded from the ledger's sales in force (`Ledger::for_each_sale`).
//!   The ledger ignores a version it has seen anyway; the memory only saves requests.
//!
//! A document that cannot be converted (no product on a line, an amount that is no number,
//! a card that does not exist) becomes a `Rejected` item with the reason and its URL, and the
//! rest of the poll goes on. A retriable failure (network, timeout, 5xx) ends the poll at once;
//! a permanent one (an unpublished set, a misnamed field) ends only its document type's part
//! and the poll reports it after reading the others. What was committed stays either way.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::catalog::{CatalogSync, Customers};
use super::json::{Obj, decimal, flag, local_time, reference, text};
use super::{ErrorClass, OdataClient, OdataError, RetryPolicy, by_key, datetime_literal};
use crate::config::{Config, OdataConfig};
use crate::core::document::{DocKind, Document, Incoming, Line, Rejected, SourceRef, VoidReason};
use crate::core::money::{Money, Points};
use crate::ledger::{
    Batch, CostPolicy, DateRange, IngestContext, IngestReport, Item, LedgerError, SharedLedger,
};
use crate::onec::mapping::{self, DocumentMap, Mapping};

/// Largest amount accepted on a line or a document, in kopecks (10¹² rubles): far above any
/// receipt, and low enough that sums over the line limit cannot overflow.
const MAX_AMOUNT_KOPECKS: i64 = 100_000_000_000_000;
/// Largest quantity on a line.
const MAX_QUANTITY: i64 = 1_000_000_000;
/// How far before the re-scan window the memory of applied versions is kept.
const KNOWN_SLACK_DAYS: i64 = 2;

/// Limits and pacing of a poll, with their units in their names.
#[derive(Clone, Debug)]
pub struct PollOptions {
    /// Pages of headers one document type may read per poll; more leaves the rest for the
    /// next poll (the report says `pending`).
    pub max_pages_per_run: usize,
    /// Changed documents on one page read one by one; more and the page is re-read whole.
    pub max_single_fetches_per_page: usize,
    /// Documents re-read by key per re-scan to confirm they are gone.
    pub max_rereads_per_rescan: usize,
    /// How often the product catalog and prices are read again.
    pub catalog_every: chrono::Duration,
    pub retry: RetryPolicy,
}

impl Default for PollOptions {
    fn default() -> Self {
        PollOptions {
            max_pages_per_run: 10_000,
            max_single_fetches_per_page: 8,
            max_rereads_per_rescan: 10_000,
            catalog_every: chrono::Duration::hours(1),
            retry: RetryPolicy::default(),
        }
    }
}

/// What one poll did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Document headers read.
    pub listed: usize,
    /// Documents read whole (with their lines).
    pub fetched: usize,
    /// Headers whose `DataVersion` was already applied.
    pub skipped_unchanged: usize,
    pub applied: usize,
    pub new_versions: usize,
    pub voided: usize,
    /// Documents the ledger already had at that version.
    pub unchanged: usize,
    /// Converted, but refused by the ledger's validation (parked in quarantine).
    pub quarantined: usize,
    /// Not convertible (parked in quarantine with the reason and URL).
    pub rejected: usize,
    /// Found gone by a re-scan (404 on re-read).
    pub deleted: usize,
    pub pages: usize,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    pub rescanned: bool,
    pub catalog: Option<CatalogSync>,
    /// A limit or a shutdown cut the poll short: the next one continues.
    pub pending: bool,
    pub warnings: Vec<String>,
    /// Customers whose additional attributes in 1C changed something in the ledger.
    pub attributes_changed: usize,
    /// Values of additional attributes refused (each in its customer's history).
    pub attributes_refused: usize,
}

impl PollReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} headers, {} read whole, {} applied, {} new versions, {} voided, {} deleted, {} quarantined, \
             {} rejected, {} requests",
            self.listed,
            self.fetched,
            self.applied,
            self.new_versions,
            self.voided,
            self.deleted,
            self.quarantined,
            self.rejected,
            self.requests
        );
        if self.rescanned {
            s.push_str("; re-scanned");
        }
        if let Some(c) = &self.catalog {
            s.push_str(&format!(
                "; catalog: {} products, {} groups, {} prices",
                c.products, c.groups, c.prices
            ));
        }
        if self.attributes_changed + self.attributes_refused > 0 {
            s.push_str(&format!(
                "; attributes: {} customers changed, {} values refused",
                self.attributes_changed, self.attributes_refused
            ));
        }
        if self.pending {
            s.push_str("; more to read");
        }
        for w in &self.warnings {
            s.push_str("; ");
            s.push_str(w);
        }
        s
    }

    fn add(&mut self, r: &IngestReport) {
        self.applied += r.applied;
        self.new_versions += r.new_versions;
        self.voided += r.voided;
        self.unchanged += r.unchanged;
        self.quarantined += r.quarantined;
    }
}

/// A document version handed to the ledger.
#[derive(Clone, Debug)]
pub(crate) struct Known {
    version: String,
    date: NaiveDateTime,
    /// Index into the mapping's documents; `None` when seeded from the ledger (a sale).
    set: Option<usize>,
    /// Whether it is in force (a document, not a void).
    active: bool,
}

/// What the poller remembers between polls.
#[derive(Default)]
pub(crate) struct State {
    known: HashMap<String, Known>,
    /// The earliest local date the memory was seeded from the ledger.
    seeded_from: Option<NaiveDateTime>,
    /// Products read by the catalog sync: `Ref_Key` → (`DataVersion`, name).
    pub(crate) products: HashMap<String, (String, String)>,
    /// The additional attributes the mapping reads, found in 1C's chart of properties once
    /// per poller (a property added in 1C later needs a restart, as a changed mapping does).
    properties: Option<super::attributes::Resolved>,
    /// Names of the list values (`Catalog_ЗначенияСвойствОбъектов` items) read so far.
    value_names: HashMap<(String, String), String>,
}

enum KnownUpdate {
    Set(String, Known),
    Remove(String),
}

struct Pending {
    item: Item,
    update: Option<KnownUpdate>,
}

/// The state of one poll while it runs.
pub(crate) struct Run<'a> {
    pub(crate) ledger: &'a SharedLedger,
    pub(crate) now: DateTime<Utc>,
    now_local: NaiveDateTime,
    cancel: &'a CancellationToken,
    pub(crate) customers: Customers,
    report: PollReport,
    /// `Ref_Key`s listed during a re-scan.
    listed: HashSet<String>,
}

impl Run<'_> {
    pub(crate) fn now_local(&self) -> NaiveDateTime {
        self.now_local
    }

    pub(crate) fn warn(&mut self, warning: String) {
        tracing::warn!(%warning, "1C OData poll");
        self.report.warnings.push(warning);
    }
}

enum Mode {
    /// Moves the type's watermark; `cursor` is where it stood.
    Incremental {
        key: String,
        cursor: Option<NaiveDateTime>,
    },
    Rescan,
}

/// A reference as a document names it: the GUID, and for a composite reference the type
/// 1C gave (`StandardODATA.Catalog_ФизическиеЛица`).
pub(crate) type Reference = (String, Option<String>);

/// A reference field's value: `X_Key`, or a composite `X` with its `X_Type`.
pub(crate) fn reference_of(o: &Obj, field: &str) -> Option<Reference> {
    let key = reference(o, field)?.to_string();
    let ty = mapping::is_composite(field)
        .then(|| text(o, &mapping::type_field(field)))
        .flatten()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    Some((key, ty))
}

/// A document read whole, converted but for its customer.
struct Draft {
    doc: Document,
    card: Option<String>,
    customer: Option<Reference>,
    date: NaiveDateTime,
    /// Its operation kind says it is neither a sale nor a return (a transfer, a return to a
    /// supplier): it has no effect.
    not_a_sale: bool,
}

/// Polls one 1C base. Keep one per process: it remembers applied versions between polls.
pub struct OdataPoller {
    pub(crate) client: OdataClient,
    pub(crate) mapping: Arc<Mapping>,
    pub(crate) cfg: Arc<Config>,
    pub(crate) odata: OdataConfig,
    pub(crate) system: String,
    pub(crate) cost: Option<CostPolicy>,
    pub(crate) opts: PollOptions,
    pub(crate) state: tokio::sync::Mutex<State>,
}

/// Naive 1C wall-clock time → an instant, in the configured zone. A time that does not exist
/// (a DST gap) is read one hour later; an ambiguous one as the earlier instant.
pub(crate) fn to_utc(t: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    tz.from_local_datetime(&t)
        .earliest()
        .or_else(|| {
            t.checked_add_signed(chrono::Duration::hours(1))
                .and_then(|later| tz.from_local_datetime(&later).earliest())
        })
        .map_or_else(|| t.and_utc(), |x| x.with_timezone(&Utc))
}

pub(crate) fn to_local(t: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    t.with_timezone(&tz).naive_local()
}

fn parse_cursor(text: &str) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").ok()
}

fn cursor_text(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Query options of one page: `$select`, `$filter`, `$orderby`, `$skip`, `$top`.
pub(crate) fn page_query(
    select: &str,
    filter: Option<&str>,
    orderby: &str,
    skip: usize,
    top: usize,
) -> Vec<(&'static str, String)> {
    let mut q = vec![("$select", select.to_string())];
    if let Some(f) = filter {
        q.push(("$filter", f.to_string()));
    }
    q.push(("$orderby", orderby.to_string()));
    if skip > 0 {
        q.push(("$skip", skip.to_string()));
    }
    q.push(("$top", top.to_string()));
    q
}

fn money(value: Decimal, what: &str) -> Result<Money, String> {
    let m = Money::from_rubles(value).map_err(|e| format!("{what}: {e}"))?;
    if m.0.abs() > MAX_AMOUNT_KOPECKS {
        return Err(format!("{what}: {value} is beyond any real amount"));
    }
    Ok(m)
}

impl OdataPoller {
    /// A poller for `cfg.onec.odata` with default limits.
    pub fn new(cfg: Arc<Config>) -> Result<OdataPoller, OdataError> {
        OdataPoller::with_options(cfg, PollOptions::default())
    }

    pub fn with_options(cfg: Arc<Config>, opts: PollOptions) -> Result<OdataPoller, OdataError> {
        let onec = cfg.onec.as_ref().ok_or(OdataError::NotConfigured)?;
        let odata = onec.odata.clone().ok_or(OdataError::NotConfigured)?;
        let base = cfg.file.as_deref().and_then(std::path::Path::parent);
        let mapping = mapping::load(&odata.mapping, base)?;
        let client = OdataClient::new(&odata, opts.retry.clone())?;
        let cost = onec.cost_price_type.as_ref().map(|pt| CostPolicy {
            price_type: pt.clone(),
            backfill: onec.cost_backfill,
        });
        Ok(OdataPoller {
            client,
            mapping: Arc::new(mapping),
            system: onec.system.clone(),
            cfg,
            odata,
            cost,
            opts,
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    pub fn client(&self) -> &OdataClient {
        &self.client
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    fn tz(&self) -> Tz {
        self.cfg.timezone
    }

    /// The checkpoint key of a document type's watermark.
    pub fn checkpoint_key(&self, set: &str) -> String {
        format!("{}:odata:{set}", self.system)
    }

    pub fn rescan_key(&self) -> String {
        format!("{}:odata:rescan", self.system)
    }

    pub(crate) fn new_run<'a>(
        &self,
        ledger: &'a SharedLedger,
        now: DateTime<Utc>,
        cancel: &'a CancellationToken,
    ) -> Run<'a> {
        Run {
            ledger,
            now,
            now_local: to_local(now, self.tz()),
            cancel,
            customers: Customers::default(),
            report: PollReport::default(),
            listed: HashSet::new(),
        }
    }

    async fn checkpoint(&self, ledger: &SharedLedger, key: &str) -> Result<Option<String>, OdataError> {
        let key = key.to_string();
        Ok(ledger.run(move |l| l.checkpoint(&key)).await?)
    }

    /// One poll: the catalog when due, every document type's new and changed documents, and
    /// the re-scan when due.
    pub async fn poll(
        &self,
        ledger: &SharedLedger,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<PollReport, OdataError> {
        let mut st = self.state.lock().await;
        let sent_before = self.client.requests_sent();
        let mut run = self.new_run(ledger, now, cancel);
        if self.catalog_due(ledger, now).await? {
            match self.sync_catalog_locked(&mut st, &mut run).await {
                Ok(c) => run.report.catalog = Some(c),
                Err(e @ OdataError::Unauthorized { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "1C catalog not synchronised; documents are read without it");
                    run.report.warnings.push(format!("catalog not synchronised: {e}"));
                }
            }
        }
        let mut cursors = Vec::with_capacity(self.mapping.documents.len());
        for d in &self.mapping.documents {
            let key = self.checkpoint_key(&d.set);
            let cursor = self
                .checkpoint(ledger, &key)
                .await?
                .as_deref()
                .and_then(parse_cursor);
            cursors.push((key, cursor));
        }
        let full_load = cursors.iter().all(|(_, c)| c.is_none());
        if cursors.iter().any(|(_, c)| c.is_none()) {
            // a whole history is about to be read: cards and customers page by page, not one
            // request each
            let page = self.odata.page_size.max(1) as usize;
            run.customers.preload(&self.client, &self.mapping, page).await?;
        }
        let mut broken = None;
        for (doc, (key, cursor)) in cursors.into_iter().enumerate() {
            if cancel.is_cancelled() {
                run.report.pending = true;
                break;
            }
            let from = cursor.map(|c| c - self.odata.overlap);
            if let Some(f) = from {
                self.seed(&mut st, ledger, f).await?;
            }
            match self
                .scan(&mut st, &mut run, doc, from, Mode::Incremental { key, cursor })
                .await
            {
                Ok(()) => {}
                // one broken document type (unpublished, misnamed) must not stop the others;
                // a retriable failure would only repeat on them, so it ends the poll
                Err(e) if e.class() == ErrorClass::Permanent => {
                    tracing::error!(set = %self.mapping.documents[doc].set, error = %e, "1C document type cannot be read");
                    broken.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = broken {
            tracing::warn!(report = %run.report.summary(), "1C OData poll done in part");
            return Err(e);
        }
        if !run.report.pending {
            let last = self
                .checkpoint(ledger, &self.rescan_key())
                .await?
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc));
            if full_load && last.is_none() {
                // everything was just read: that was the first re-scan
                self.flush(
                    &mut st,
                    &mut run,
                    self.rescan_key(),
                    Vec::new(),
                    Some(now.to_rfc3339()),
                )
                .await?;
            } else if last.is_none_or(|l| now - l >= self.odata.rescan_every) {
                self.rescan_locked(&mut st, &mut run).await?;
            }
        }
        run.report.requests = self.client.requests_sent() - sent_before;
        Ok(run.report)
    }

    /// The re-scan now, whether due or not.
    pub async fn rescan(
        &self,
        ledger: &SharedLedger,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<PollReport, OdataError> {
        let mut st = self.state.lock().await;
        let sent_before = self.client.requests_sent();
        let mut run = self.new_run(ledger, now, cancel);
        self.rescan_locked(&mut st, &mut run).await?;
        run.report.requests = self.client.requests_sent() - sent_before;
        Ok(run.report)
    }

    async fn rescan_locked(&self, st: &mut State, run: &mut Run<'_>) -> Result<(), OdataError> {
        let from = run.now_local - self.odata.rescan_window;
        tracing::info!(from = %from, "re-scanning 1C documents");
        self.seed(st, run.ledger, from).await?;
        run.listed.clear();
        for doc in 0..self.mapping.documents.len() {
            self.scan(st, run, doc, Some(from), Mode::Rescan).await?;
            if run.report.pending {
                // cut short: what was not listed is not known to be gone
                return Ok(());
            }
        }
        let mut gone: Vec<(String, Known)> = st
            .known
            .iter()
            .filter(|(k, v)| v.active && v.date >= from && !run.listed.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        gone.sort_by(|a, b| a.1.date.cmp(&b.1.date).then_with(|| a.0.cmp(&b.0)));
        if gone.len() > self.opts.max_rereads_per_rescan {
            run.report.pending = true;
            gone.truncate(self.opts.max_rereads_per_rescan);
        }
        let mut pending = Vec::new();
        for (key, known) in gone {
            if run.cancel.is_cancelled() {
                run.report.pending = true;
                break;
            }
            let sets: Vec<usize> = match known.set {
                Some(s) => vec![s],
                None => (0..self.mapping.documents.len())
                    .filter(|i| self.mapping.documents[*i].kind == DocKind::Sale)
                    .collect(),
            };
            let mut found = None;
            for s in sets {
                let set = &self.mapping.documents[s].set;
                let q = [("$select", self.full_select(s))];
                if let Some(obj) = self.client.object(set, &by_key(set, &key), &q).await? {
                    found = Some((s, obj));
                    break;
                }
            }
            run.report.fetched += 1;
            match found {
                None => {
                    run.report.deleted += 1;
                    let set = known
                        .set
                        .map_or("a document", |s| self.mapping.documents[s].set.as_str());
                    tracing::info!(doc_id = %key, set, "1C document is gone; voiding it");
                    pending.push(Pending {
                        item: Item::Incoming(Incoming::Void {
                            source: SourceRef {
                                system: self.system.clone(),
                                doc_id: key.clone(),
                                version: format!("{}:deleted", known.version),
                                stamp: None,
                            },
                            reason: VoidReason::Deleted,
                        }),
                        update: Some(KnownUpdate::Remove(key)),
                    });
                }
                Some((s, obj)) => {
                    if let Some(p) = self.take_whole(st, run, s, &key, Some(obj)).await? {
                        pending.push(p.0);
                    }
                }
            }
        }
        let horizon = from - chrono::Duration::days(KNOWN_SLACK_DAYS);
        st.known.retain(|_, k| k.date >= horizon);
        let per_tx = self.cfg.max_documents_per_transaction.max(1);
        while pending.len() > per_tx {
            let rest = pending.split_off(per_tx);
            let batch = std::mem::replace(&mut pending, rest);
            self.flush(st, run, self.rescan_key(), batch, None).await?;
        }
        let checkpoint = (!run.report.pending).then(|| run.now.to_rfc3339());
        self.flush(st, run, self.rescan_key(), pending, checkpoint)
            .await?;
        run.report.rescanned = true;
        Ok(())
    }

    /// Remembers the sales the ledger holds from `from` on, at their applied versions.
    async fn seed(
        &self,
        st: &mut State,
        ledger: &SharedLedger,
        from: NaiveDateTime,
    ) -> Result<(), OdataError> {
        if st.seeded_from.is_some_and(|s| s <= from) {
            return Ok(());
        }
        let tz = self.tz();
        let system = self.system.clone();
        let range = DateRange {
            from: Some(to_utc(from, tz)),
            to: None,
        };
        let sales = ledger
            .run(
                move |l| -> Result<Vec<(String, String, DateTime<Utc>)>, LedgerError> {
                    let mut out = Vec::new();
                    l.for_each_sale(&range, |s| {
                        if s.doc.source.system == system {
                            out.push((s.doc.source.doc_id, s.doc.source.version, s.doc.occurred_at));
                        }
                    })?;
                    Ok(out)
                },
            )
            .await?;
        for (doc_id, version, at) in sales {
            st.known.entry(doc_id).or_insert(Known {
                version,
                date: to_local(at, tz),
                set: None,
                active: true,
            });
        }
        st.seeded_from = Some(from);
        Ok(())
    }

    /// `$select` of a whole document: the standard header, the mapped header fields and the
    /// mapped row fields of its tabular section.
    pub(crate) fn full_select(&self, doc: usize) -> String {
        let map = &self.mapping.documents[doc];
        let mut fields: Vec<String> = [
            "Ref_Key",
            "DataVersion",
            "Number",
            "Date",
            "Posted",
            "DeletionMark",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        fields.extend(map.header_fields().iter().map(|s| s.to_string()));
        fields.extend(map.type_fields());
        fields.extend(map.row.fields().iter().map(|f| format!("{}/{f}", map.rows)));
        if let Some(f) = map.row.return_link.as_ref().filter(|f| mapping::is_composite(f)) {
            fields.push(format!("{}/{}", map.rows, mapping::type_field(f)));
        }
        fields.join(",")
    }

    /// Walks one document type's headers from `from` on, and hands the ledger what changed.
    async fn scan(
        &self,
        st: &mut State,
        run: &mut Run<'_>,
        doc: usize,
        from: Option<NaiveDateTime>,
        mode: Mode,
    ) -> Result<(), OdataError> {
        let map = &self.mapping.documents[doc];
        let set = map.set.as_str();
        let filter = from.map(|f| format!("Date ge {}", datetime_literal(f)));
        let page = self.odata.page_size.max(1) as usize;
        let per_tx = self.cfg.max_documents_per_transaction.max(1);
        let (source, cursor) = match &mode {
            Mode::Incremental { key, cursor } => (key.clone(), *cursor),
            Mode::Rescan => (self.rescan_key(), None),
        };
        let mut watermark = cursor;
        let mut pending: Vec<Pending> = Vec::new();
        let mut skip = 0usize;
        let mut pages = 0usize;
        loop {
            if pages >= self.opts.max_pages_per_run {
                tracing::warn!(
                    set,
                    pages,
                    "page limit of one poll reached; the next poll goes on"
                );
                run.report.pending = true;
                break;
            }
            if run.cancel.is_cancelled() {
                run.report.pending = true;
                break;
            }
            let q = page_query(
                "Ref_Key,DataVersion,Date,Posted,DeletionMark",
                filter.as_deref(),
                "Date,Ref_Key",
                skip,
                page,
            );
            let headers = self.client.list(set, set, &q).await?;
            pages += 1;
            run.report.pages += 1;
            run.report.listed += headers.len();
            let short = headers.len() < page;

            // what each header needs, in page order
            enum Slot {
                Done(Option<Box<Pending>>),
                Fetch(String),
            }
            let mut slots: Vec<(Slot, Option<NaiveDateTime>)> = Vec::with_capacity(headers.len());
            for (i, h) in headers.iter().enumerate() {
                let date = text(h, "Date").and_then(|t| local_time(t).ok().flatten());
                let Some(key) = reference(h, "Ref_Key") else {
                    let doc_ref = format!("{set}?$skip={skip}#{}", i + 1);
                    let item = self.rejected(
                        &doc_ref,
                        "a document without Ref_Key",
                        self.client.readable_url(set, &q),
                    );
                    slots.push((Slot::Done(Some(Box::new(item))), date));
                    continue;
                };
                if matches!(mode, Mode::Rescan) {
                    run.listed.insert(key.to_string());
                }
                let version = text(h, "DataVersion").unwrap_or("").trim();
                if !version.is_empty() && st.known.get(key).is_some_and(|k| k.version == version) {
                    run.report.skipped_unchanged += 1;
                    slots.push((Slot::Done(None), date));
                    continue;
                }
                let deletion = flag(h, "DeletionMark") == Some(true);
                let unposted = flag(h, "Posted") == Some(false);
                if (deletion || unposted) && !version.is_empty() {
                    let reason = if deletion {
                        VoidReason::DeletionMarked
                    } else {
                        VoidReason::Unposted
                    };
                    let item = self.void(key, version, reason, date, doc);
                    slots.push((Slot::Done(Some(Box::new(item))), date));
                } else {
                    slots.push((Slot::Fetch(key.to_string()), date));
                }
            }

            // read the changed documents whole
            let wanted: Vec<&String> = slots
                .iter()
                .filter_map(|(s, _)| match s {
                    Slot::Fetch(k) => Some(k),
                    Slot::Done(_) => None,
                })
                .collect();
            let mut whole: HashMap<String, Obj> = HashMap::new();
            if wanted.len() > self.opts.max_single_fetches_per_page {
                let full = self.full_select(doc);
                let q_full = page_query(&full, filter.as_deref(), "Date,Ref_Key", skip, page);
                for obj in self.client.list(set, set, &q_full).await? {
                    if let Some(k) = reference(&obj, "Ref_Key") {
                        let k = k.to_string();
                        whole.insert(k, obj);
                    }
                }
            }
            for (slot, date) in slots {
                let p = match slot {
                    Slot::Done(p) => p.map(|b| *b),
                    Slot::Fetch(key) => {
                        let obj = match whole.remove(&key) {
                            Some(o) => Some(o),
                            None => {
                                let q1 = [("$select", self.full_select(doc))];
                                self.client.object(set, &by_key(set, &key), &q1).await?
                            }
                        };
                        run.report.fetched += 1;
                        self.take_whole(st, run, doc, &key, obj).await?.map(|(p, _)| p)
                    }
                };
                if let Some(p) = p {
                    pending.push(p);
                }
                if let (Some(d), Mode::Incremental { .. }) = (date, &mode) {
                    let capped = d.min(run.now_local);
                    watermark = Some(watermark.map_or(capped, |w| w.max(capped)));
                }
                if pending.len() >= per_tx {
                    let cp = match mode {
                        Mode::Incremental { .. } => watermark.map(cursor_text),
                        Mode::Rescan => None,
                    };
                    self.flush(st, run, source.clone(), std::mem::take(&mut pending), cp)
                        .await?;
                }
            }
            if short {
                break;
            }
            skip += page;
        }
        let moved = matches!(mode, Mode::Incremental { .. }) && watermark != cursor;
        if !pending.is_empty() || moved {
            let cp = match mode {
                Mode::Incremental { .. } => watermark.map(cursor_text),
                Mode::Rescan => None,
            };
            self.flush(st, run, source, pending, cp).await?;
        }
        Ok(())
    }

    fn void(
        &self,
        key: &str,
        version: &str,
        reason: VoidReason,
        date: Option<NaiveDateTime>,
        doc: usize,
    ) -> Pending {
        Pending {
            item: Item::Incoming(Incoming::Void {
                source: SourceRef {
                    system: self.system.clone(),
                    doc_id: key.to_string(),
                    version: version.to_string(),
                    stamp: None,
                },
                reason,
            }),
            update: date.map(|d| {
                KnownUpdate::Set(
                    key.to_string(),
                    Known {
                        version: version.to_string(),
                        date: d,
                        set: Some(doc),
                        active: false,
                    },
                )
            }),
        }
    }

    fn rejected(&self, doc_ref: &str, reason: &str, url: String) -> Pending {
        Pending {
            item: Item::Rejected(Rejected {
                system: self.system.clone(),
                doc_ref: doc_ref.to_string(),
                reason: reason.to_string(),
                location: Some(url),
                excerpt: None,
                ..Default::default()
            }),
            update: None,
        }
    }

    /// A rejection named as 1C shows the document: its kind (the set's metadata name,
    /// `ЧекККМ`), `Number` and `Date`, as far as 1C sent them.
    fn rejected_doc(
        &self,
        doc: usize,
        obj: &Obj,
        date: Option<NaiveDateTime>,
        (key, reason, url): (&str, &str, String),
    ) -> Pending {
        let mut p = self.rejected(key, reason, url);
        if let Item::Rejected(r) = &mut p.item {
            let set = &self.mapping.documents[doc].set;
            r.kind = Some(set.strip_prefix("Document_").unwrap_or(set).to_string());
            r.number = text(obj, "Number")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            r.occurred_at = date.map(|d| to_utc(d, self.tz()));
        }
        p
    }

    /// Turns a document read whole (or found gone: `None`) into what the ledger gets.
    /// Returns the item and the document's date.
    async fn take_whole(
        &self,
        st: &State,
        run: &mut Run<'_>,
        doc: usize,
        key: &str,
        obj: Option<Obj>,
    ) -> Result<Option<(Pending, Option<NaiveDateTime>)>, OdataError> {
        let map = &self.mapping.documents[doc];
        let url = self.client.readable_url(&by_key(&map.set, key), &[]);
        let Some(obj) = obj else {
            // listed a moment ago, gone now: deleted in between
            let version = st.known.get(key).map_or("listed", |k| k.version.as_str());
            run.report.deleted += 1;
            return Ok(Some((
                Pending {
                    item: Item::Incoming(Incoming::Void {
                        source: SourceRef {
                            system: self.system.clone(),
                            doc_id: key.to_string(),
                            version: format!("{version}:deleted"),
                            stamp: None,
                        },
                        reason: VoidReason::Deleted,
                    }),
                    update: Some(KnownUpdate::Remove(key.to_string())),
                },
                None,
            )));
        };
        let version = text(&obj, "DataVersion").unwrap_or("").trim().to_string();
        let date = text(&obj, "Date").and_then(|t| local_time(t).ok().flatten());
        if version.is_empty() {
            return Ok(Some((
                self.rejected_doc(doc, &obj, date, (key, "the document has no DataVersion", url)),
                date,
            )));
        }
        if st.known.get(key).is_some_and(|k| k.version == version) {
            run.report.skipped_unchanged += 1;
            return Ok(None);
        }
        let deletion = flag(&obj, "DeletionMark") == Some(true);
        if deletion || flag(&obj, "Posted") == Some(false) {
            let reason = if deletion {
                VoidReason::DeletionMarked
            } else {
                VoidReason::Unposted
            };
            return Ok(Some((self.void(key, &version, reason, date, doc), date)));
        }
        let draft = match self.convert(st, map, key, &version, &obj) {
            Ok(d) => d,
            Err(reason) => {
                tracing::warn!(doc_id = key, %url, %reason, "1C document cannot be read; quarantined");
                return Ok(Some((
                    self.rejected_doc(doc, &obj, date, (key, &reason, url)),
                    date,
                )));
            }
        };
        if draft.not_a_sale {
            // e.g. УНФ's РасходнаяНакладная returning goods to a supplier: had it been read
            // as a sale before (its operation changed), that sale is cancelled
            let v = self.void(key, &version, VoidReason::Cancelled, Some(draft.date), doc);
            return Ok(Some((v, Some(draft.date))));
        }
        let Draft {
            doc: mut document,
            card,
            customer,
            date,
            ..
        } = draft;
        match run
            .customers
            .identity(&self.client, &self.mapping, card.as_deref(), customer)
            .await?
        {
            Ok(identity) => document.customer = identity,
            Err(reason) => {
                return Ok(Some((
                    self.rejected_doc(doc, &obj, Some(date), (key, &reason, url)),
                    Some(date),
                )));
            }
        }
        let known = Known {
            version,
            date,
            set: Some(doc),
            active: true,
        };
        Ok(Some((
            Pending {
                item: Item::Incoming(Incoming::Document(document)),
                update: Some(KnownUpdate::Set(key.to_string(), known)),
            },
            Some(date),
        )))
    }

    /// Converts one document's JSON into a core document (without its customer).
    fn convert(
        &self,
        st: &State,
        map: &DocumentMap,
        key: &str,
        version: &str,
        obj: &Obj,
    ) -> Result<Draft, String> {
        let date_text = text(obj, "Date").ok_or("no Date")?;
        let date = local_time(date_text)?.ok_or("the document date is empty")?;
        let mut kind = map.kind;
        let mut not_a_sale = false;
        if let Some(op) = &map.operation {
            let value = text(obj, op).unwrap_or("").trim();
            let is = |values: &[String]| values.iter().any(|r| r.trim().eq_ignore_ascii_case(value));
            if is(&map.return_operations) {
                kind = DocKind::Return;
            } else if !map.sale_operations.is_empty() && !is(&map.sale_operations) {
                not_a_sale = true;
            }
        }
        let rows = match obj.get(&map.rows) {
            Some(Value::Array(rows)) => rows,
            _ => return Err(format!("no tabular section {} in the answer", map.rows)),
        };
        if rows.len() > self.cfg.limits.max_lines {
            return Err(format!(
                "{} lines in {}, more than the limit of {}",
                rows.len(),
                map.rows,
                self.cfg.limits.max_lines
            ));
        }
        let rm = &map.row;
        let mut lines = Vec::with_capacity(rows.len());
        let mut points_kopecks = 0i64;
        let mut row_links: Vec<String> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let row = row.as_object();
            let n = row
                .and_then(|r| text(r, "LineNumber"))
                .map(str::to_string)
                .unwrap_or_else(|| (i + 1).to_string());
            let row = row.ok_or_else(|| format!("line {n}: not an object"))?;
            let at = |e: String| format!("line {n}: {e}");
            if let Some((link, _)) = rm.return_link.as_ref().and_then(|f| reference_of(row, f))
                && !row_links.contains(&link)
            {
                row_links.push(link);
            }
            let product = reference(row, &rm.product).ok_or_else(|| at(format!("no {}", rm.product)))?;
            let product_id = match rm.variant.as_ref().and_then(|v| reference(row, v)) {
                Some(v) => format!("{product}#{v}"),
                None => product.to_string(),
            };
            let quantity = decimal(row, &rm.quantity)
                .map_err(at)?
                .ok_or_else(|| at(format!("no {}", rm.quantity)))?;
            if quantity.abs() > Decimal::from(MAX_QUANTITY) {
                return Err(at(format!("quantity {quantity} is beyond any real quantity")));
            }
            let price = decimal(row, &rm.price)
                .map_err(at)?
                .ok_or_else(|| at(format!("no {}", rm.price)))?;
            let net = decimal(row, &rm.net)
                .map_err(at)?
                .ok_or_else(|| at(format!("no {}", rm.net)))?;
            let mut discount = Decimal::ZERO;
            for d in &rm.discounts {
                let v = decimal(row, d).map_err(at)?.unwrap_or_default();
                discount = discount
                    .checked_add(v)
                    .ok_or_else(|| at(format!("{d}: {v} is beyond any real amount")))?;
            }
            let paid = match &rm.points_paid {
                Some(f) => money(decimal(row, f).map_err(at)?.unwrap_or_default(), f).map_err(at)?,
                None => Money::ZERO,
            };
            let mut net = money(net, &rm.net).map_err(at)?;
            if rm.net_excludes_points_paid {
                net += paid;
            }
            points_kopecks += paid.0;
            lines.push(Line {
                name: st.products.get(product).map(|p| p.1.clone()).unwrap_or_default(),
                product_id,
                category: None,
                category_parents: Vec::new(),
                quantity,
                unit_price: money(price, &rm.price).map_err(at)?,
                discount: money(discount, "discounts").map_err(at)?,
                net,
                unit_cost: None,
                service: false,
            });
        }
        let points_money = if rm.net_excludes_points_paid {
            Money(points_kopecks)
        } else {
            Money::ZERO
        };
        let total = match &map.total {
            Some(f) => {
                let stated = decimal(obj, f)?.ok_or_else(|| format!("no {f}"))?;
                money(stated, f)? + points_money
            }
            None => lines.iter().map(|l| l.net).sum(),
        };
        let point_value = self.cfg.program.point_value.0.max(1);
        // on a sale the points paid with; on a return the points 1C gave back with the goods
        let points_redeemed = Points(points_kopecks.max(0) / point_value);
        if row_links.len() > 1 {
            return Err(format!(
                "the return names {} sales in its lines ({}); kopilka links a return to one sale: \
                 make one return per sale in 1C",
                row_links.len(),
                row_links.join(", ")
            ));
        }
        let header_link = map
            .return_link
            .as_ref()
            .and_then(|f| reference_of(obj, f))
            .map(|(k, _)| k);
        let number = text(obj, "Number").map(str::trim).filter(|s| !s.is_empty());
        let doc = Document {
            source: SourceRef {
                system: self.system.clone(),
                doc_id: key.to_string(),
                version: version.to_string(),
                stamp: None,
            },
            kind,
            number: number.map(str::to_string),
            occurred_at: to_utc(date, self.tz()),
            customer: Default::default(),
            currency: self.cfg.limits.currency.clone(),
            lines,
            total,
            points_redeemed,
            original: match kind {
                DocKind::Return => header_link.or_else(|| row_links.pop()),
                DocKind::Sale => None,
            },
            store: map
                .store
                .as_ref()
                .and_then(|f| reference(obj, f))
                .map(str::to_string),
            partner: None,
        };
        Ok(Draft {
            doc,
            card: map
                .card
                .as_ref()
                .and_then(|f| reference(obj, f))
                .map(str::to_string),
            customer: map.customer.as_ref().and_then(|f| reference_of(obj, f)),
            date,
            not_a_sale,
        })
    }

    /// Completes documents from the catalog and ingests them in one ledger transaction with
    /// the checkpoint; then remembers what was applied.
    async fn flush(
        &self,
        st: &mut State,
        run: &mut Run<'_>,
        source: String,
        pending: Vec<Pending>,
        checkpoint: Option<String>,
    ) -> Result<(), OdataError> {
        let mut items = Vec::with_capacity(pending.len());
        let mut updates = Vec::with_capacity(pending.len());
        let mut rejected = 0;
        for p in pending {
            if matches!(p.item, Item::Rejected(_)) {
                rejected += 1;
            }
            items.push(p.item);
            updates.extend(p.update);
        }
        let cfg = self.cfg.clone();
        let cost = self.cost.clone();
        let now = run.now;
        let report = run
            .ledger
            .run(move |l| -> Result<IngestReport, LedgerError> {
                let docs = items.iter_mut().filter_map(|item| match item {
                    Item::Incoming(Incoming::Document(d)) => Some(d),
                    _ => None,
                });
                l.complete_batch_from_catalog(docs, cost.as_ref())?;
                let dest = cfg.destinations();
                let ctx = IngestContext {
                    rules: &cfg.program,
                    limits: &cfg.limits,
                    destinations: &dest,
                    now,
                    warn_before: cfg.warn_before,
                };
                l.ingest(
                    Batch {
                        source,
                        items,
                        checkpoint,
                        ..Default::default()
                    },
                    &ctx,
                )
            })
            .await?;
        run.report.rejected += rejected;
        run.report.add(&report);
        // after the documents: a customer seen for the first time exists now
        self.apply_attributes(st, run).await?;
        // the ledger counts a rejection as quarantined; the report keeps them apart
        run.report.quarantined = run.report.quarantined.saturating_sub(rejected);
        for u in updates {
            match u {
                KnownUpdate::Set(k, v) => {
                    st.known.insert(k, v);
                }
                KnownUpdate::Remove(k) => {
                    st.known.remove(&k);
                }
            }
        }
        Ok(())
    }

    /// Applies what the additional attributes of the customers read since the last batch
    /// say, with the precedence of a filling source. A chart of properties that cannot be
    /// read, or a title it lacks, is a warning: the documents flow either way.
    async fn apply_attributes(&self, st: &mut State, run: &mut Run<'_>) -> Result<(), OdataError> {
        let Some(am) = self.mapping.attributes.as_ref().filter(|a| a.reads()) else {
            return Ok(());
        };
        let read = run.customers.take_attributes();
        if read.is_empty() {
            return Ok(());
        }
        if st.properties.is_none() {
            let page = self.odata.page_size.max(1) as usize;
            match super::attributes::resolve(&self.client, am, page).await {
                Ok(r) => {
                    for (key, title) in &r.missing {
                        run.warn(format!(
                            "additional attribute {title:?} ({key}) is not in {}: not read",
                            am.properties
                        ));
                    }
                    st.properties = Some(r);
                }
                Err(e @ (OdataError::Unauthorized { .. } | OdataError::Ledger(_))) => return Err(e),
                Err(e) if e.class() == ErrorClass::Retriable => return Err(e),
                Err(e) => {
                    run.warn(format!("additional attributes not read: {e}"));
                    st.properties = Some(Default::default());
                }
            }
        }
        let resolved = st.properties.clone().unwrap_or_default();
        let mut items = Vec::new();
        for (key, rows) in read {
            super::attributes::value_names(&self.client, &resolved, &rows, &mut st.value_names).await?;
            if let Some(a) = super::attributes::attributes_of(&resolved, &rows, &st.value_names) {
                items.push((key, a));
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let cfg = self.cfg.clone();
        let source = self.system.clone();
        let now = run.now;
        let report = run
            .ledger
            .run(move |l| {
                let mut linked = Vec::with_capacity(items.len());
                for (key, a) in items {
                    if let Some(c) = l.customer_of_key("onec", &key)? {
                        linked.push((c, a));
                    }
                }
                l.apply_attributes(
                    &source,
                    crate::ledger::Precedence::FillsEmptyOrOwn,
                    linked,
                    &cfg.program,
                    now,
                )
            })
            .await?;
        run.report.attributes_changed += report.changed;
        run.report.attributes_refused += report.refused.len();
        if report.changed > 0 || !report.refused.is_empty() {
            tracing::info!(
                changed = report.changed,
                refused = report.refused.len(),
                kept = report.kept,
                "Customer attributes read from 1C's additional attributes."
            );
        }
        Ok(())
    }

    async fn catalog_due(&self, ledger: &SharedLedger, now: DateTime<Utc>) -> Result<bool, OdataError> {
        let last = self
            .checkpoint(ledger, &self.catalog_key())
            .await?
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(last.is_none_or(|l| now - l >= self.opts.catalog_every || now < l))
    }

    /// Every mapped document dated in `[from, to)` (1C local time) as 1C has it now, for
    /// `kopilka reconcile --source odata`: what the base says, not what kopilka recorded when
    /// it read it, so a document never polled or changed since shows up. A document that
    /// cannot be read counts as in force with no total: reconcile then names its quarantine
    /// entry, or lists it as missing.
    pub async fn source_docs(
        &self,
        from: NaiveDateTime,
        to: NaiveDateTime,
    ) -> Result<Vec<crate::ledger::SourceDoc>, OdataError> {
        let st = State::default();
        let tz = self.tz();
        let filter = format!(
            "Date ge {} and Date lt {}",
            datetime_literal(from),
            datetime_literal(to)
        );
        let page = self.odata.page_size.max(1) as usize;
        let mut out = Vec::new();
        for (i, map) in self.mapping.documents.iter().enumerate() {
            let set = map.set.as_str();
            let select = self.full_select(i);
            let mut skip = 0usize;
            loop {
                let q = page_query(&select, Some(&filter), "Date,Ref_Key", skip, page);
                let items = self.client.list(set, set, &q).await?;
                for obj in &items {
                    let Some(key) = reference(obj, "Ref_Key") else {
                        continue;
                    };
                    let version = text(obj, "DataVersion").unwrap_or("").trim().to_string();
                    let in_force =
                        flag(obj, "Posted") != Some(false) && flag(obj, "DeletionMark") != Some(true);
                    let date = text(obj, "Date").and_then(|t| local_time(t).ok().flatten());
                    let (kind, total) = match self.convert(&st, map, key, &version, obj) {
                        Ok(d) => (Some(d.doc.kind.as_str().to_string()), d.doc.total.0),
                        Err(_) => (None, 0),
                    };
                    out.push(crate::ledger::SourceDoc {
                        source: self.system.clone(),
                        doc_id: key.to_string(),
                        version,
                        kind,
                        occurred_at: date.map(|d| to_utc(d, tz)),
                        total,
                        in_force,
                        number: text(obj, "Number")
                            .map(str::trim)
                            .filter(|n| !n.is_empty())
                            .map(str::to_string),
                        source_kind: Some(set.strip_prefix("Document_").unwrap_or(set).to_string()),
                    });
                }
                if items.len() < page {
                    break;
                }
                skip += page;
            }
        }
        Ok(out)
    }

    pub fn catalog_key(&self) -> String {
        format!("{}:odata:catalog", self.system)
    }

    /// Number of document versions remembered (for tests and the status page).
    pub async fn remembered(&self) -> usize {
        self.state.lock().await.known.len()
    }

    /// Converts decimal points to whole points, down (a fraction of a point is never given).
    pub(crate) fn whole_points(value: Decimal) -> Option<i64> {
        value.floor().to_i64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_times_convert_in_the_configured_zone() {
        let t = NaiveDateTime::parse_from_str("2026-01-10T10:00:00", "%Y-%m-%dT%H:%M:%S").expect("time");
        assert_eq!(
            to_utc(t, chrono_tz::Europe::Moscow).to_rfc3339(),
            "2026-01-10T07:00:00+00:00"
        );
        assert_eq!(
            to_local(to_utc(t, chrono_tz::Europe::Moscow), chrono_tz::Europe::Moscow),
            t
        );
        // a time skipped by a DST change is read an hour later, not dropped
        let gap = NaiveDateTime::parse_from_str("2026-03-29T02:30:00", "%Y-%m-%dT%H:%M:%S").expect("time");
        assert_eq!(
            to_utc(gap, chrono_tz::Europe::Berlin).to_rfc3339(),
            "2026-03-29T01:30:00+00:00"
        );
    }

    #[test]
    fn pages_skip_before_top_and_omit_a_zero_skip() {
        let q = page_query(
            "Ref_Key",
            Some("Date ge datetime'2026-01-01T00:00:00'"),
            "Date,Ref_Key",
            0,
            50,
        );
        let keys: Vec<&str> = q.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["$select", "$filter", "$orderby", "$top"]);
        let q = page_query("Ref_Key", None, "Date,Ref_Key", 100, 50);
        assert_eq!(q[2], ("$skip", "100".to_string()));
        assert!(!q.iter().any(|(k, _)| k.contains("inlinecount")));
    }
}
