//! Writing back to 1C over OData: the bonus documents (`onec:bonus`) and the daily accounting
//! postings (`onec:accounting`) of the outbox, created and posted when
//! `[accounting] postback = "odata"`.
//!
//! Each outbox row becomes one document of the mapped set (`[bonus_document]`,
//! `[accounting_document]`). The document carries kopilka's own `Ref_Key` — UUIDv5 of the
//! row's idempotency key, [`document_id`], the same id the CommerceML postback uses — and
//! `kopilka:<idempotency key>` at the start of its comment. Delivering a row:
//!
//! 1. When the row was attempted before (`attempts > 0`: the last answer was lost, refused
//!    or came too late), look the document up first: GET by key, and when 1C does not know
//!    the key, scan that day's documents for the comment (a configuration that assigns its
//!    own keys). Found → step 3.
//! 2. POST it with full tabular sections, every row with `LineNumber`. A POST is never
//!    repeated blindly: an answer lost on the way is a retriable failure, and the next
//!    attempt starts at step 1. 1C's code 15 («Сущность с таким ключом уже существует»,
//!    a crash between send and mark-delivered) means it exists: look it up, go on.
//! 3. Unless it is posted already, `POST …(guid'…')/Post?PostingModeOperational=false`.
//!    A refused posting (500, code `-1`, the configuration's reason) is permanent: the row
//!    goes to dead letters and the document stays unposted in 1C; `outbox retry` after the
//!    cause is fixed finds it in step 1 and posts it.
//!
//! Decisions:
//! - **Movements and rows.** A positive movement of a customer's points (an accrual, a
//!   bonus, a reversed redemption, an opening balance) goes to the accrual rows with the
//!   date given and the date the points burn (the empty date when never); a negative one (a
//!   redemption, expiry, a reversed accrual, a write-off) to the write-off rows, the points
//!   as a positive number, and for expiry the same number as the correction of points
//!   scheduled to burn. One document per journal transaction, one row in it.
//! - **Holders.** With `holder_is = "card"` the row names the card: found in the card
//!   catalog by its number (each mapped number field, `eq`), else among the customer's cards
//!   (`[cards] owner` = the customer's 1C key) by the normalised number. A card that cannot
//!   be found is a permanent failure naming it. With `"people"` the row names the customer's
//!   1C key, or the found card's owner. Lookups are cached for one run.
//! - **Postings.** One row per movement: debit and credit accounts from `[accounting]
//!   accounts` (references looked up by `Code` in the chart of accounts when the mapped field
//!   is a `…_Key`), the amount = points × point value, exact in kopecks, negative for a
//!   reversing adjustment; the header carries the legal entity (looked up by `Description`)
//!   and the signed total.
//! - **Error classes** come from [`classify`]. What concerns every row rather than this one
//!   — refused credentials, a web-server page in place of JSON, an unpublished set, a mapping
//!   or configuration that lacks a name, an unknown program, legal entity or account — halts
//!   the run (`DeliveryError::Halt`) and leaves the rows pending, so nothing is dead-lettered
//!   by a broken publication; a person fixes it and the next run goes on.
//! - **Amounts** are written as JSON number literals from integers (kopecks → `12.34`),
//!   never through a float; answers are read with [`json::parse`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;

use super::json::{self, Obj, flag, reference, text};
use super::poll::to_local;
use super::probe::{Missing, check_writing, parse_metadata};
use super::{
    ErrorClass, Failure, MAX_BODY_BYTES, OdataClient, OdataError, Received, RetryPolicy, by_key, classify,
    datetime_literal, not_json, status_failure,
};
use crate::config::{Config, ONEC_ACCOUNTING, ONEC_BONUS, ONEC_TIER, OdataConfig, Postback};
use crate::core::identity::normalize_card;
use crate::core::money::Money;
use crate::daemon::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::ledger::{DeliveryError, DeliveryReport, OutboxRow, Sink, deliver_due};
use crate::onec::mapping::{
    self, AccountingDocumentMap, BonusDocumentMap, BonusHolder, Mapping, is_reference,
};
use crate::onec::postback::document_id;

/// The empty date 1C writes for "no date" (points that never burn).
const EMPTY_DATE: &str = "0001-01-01T00:00:00";
/// Longest comment written; 1C's `Комментарий` is unlimited, a human reads the start.
const MAX_COMMENT_CHARS: usize = 1000;
/// Pages read at most when scanning a day's documents for a comment.
const MAX_SCAN_PAGES: usize = 10_000;
/// Candidates read per lookup by a field value (a card number, an owner, a code).
const MAX_LOOKUP_ROWS: usize = 20;
/// Bonus programs read at most when `bonus_program` is looked up by description.
const MAX_PROGRAM_ROWS: usize = 1000;

/// A JSON value as kopilka writes it to 1C: numbers are the literal text of integers and
/// exact decimals, never floats.
#[derive(Clone, Debug)]
enum W {
    Str(String),
    Num(String),
    Rows(Vec<Vec<(String, W)>>),
}

fn write_json(out: &mut String, fields: &[(String, W)]) {
    out.push('{');
    for (i, (name, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, name);
        out.push(':');
        match v {
            W::Str(s) => write_str(out, s),
            W::Num(n) => out.push_str(n),
            W::Rows(rows) => {
                out.push('[');
                for (j, r) in rows.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    write_json(out, r);
                }
                out.push(']');
            }
        }
    }
    out.push('}');
}

fn write_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

fn local_text(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Money as a JSON number literal in rubles (`-12.30`).
fn rubles(m: Money) -> String {
    m.to_string()
}

/// `'text'` for `$filter`, the inner quote doubled.
fn string_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A GUID as 1C compares it: lower-case, and only hex digits and dashes (a value from
/// the ledger goes into a `$filter`).
fn guid_text(s: &str) -> Option<String> {
    let t = s.trim().to_ascii_lowercase();
    (t.len() == 36 && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(t)
}

/// Whether a comment is the one kopilka wrote for `marker` (`kopilka:onec:bonus:tx1` must
/// not match `kopilka:onec:bonus:tx12`).
fn has_marker(comment: &str, marker: &str) -> bool {
    comment
        .trim_start()
        .strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// What a document of a row is, before anything is sent.
#[derive(Clone, Debug)]
struct Plan {
    set: String,
    /// Our `Ref_Key`.
    key: String,
    /// `kopilka:<idempotency key>`.
    marker: String,
    comment_field: String,
    /// The document's local day, where the comment scan looks.
    day: NaiveDate,
    /// For messages: `bonus document kopilka:onec:bonus:tx7`.
    what: String,
}

/// A document 1C has.
#[derive(Clone, Debug)]
struct Found {
    key: String,
    number: Option<String>,
    posted: bool,
    deletion_mark: bool,
}

impl Found {
    fn from(o: &Obj, fallback_key: &str) -> Found {
        Found {
            key: reference(o, "Ref_Key").unwrap_or(fallback_key).to_string(),
            number: text(o, "Number").map(str::to_string),
            posted: flag(o, "Posted").unwrap_or(false),
            deletion_mark: flag(o, "DeletionMark").unwrap_or(false),
        }
    }

    fn label(&self) -> String {
        match &self.number {
            Some(n) if !n.trim().is_empty() => format!("№{} ({})", n.trim(), self.key),
            _ => self.key.clone(),
        }
    }
}

/// A card found in 1C.
#[derive(Clone, Debug)]
struct CardRef {
    key: String,
    owner: Option<String>,
}

/// Lookups made during one run.
#[derive(Default)]
struct Cache {
    /// (card number, customer's 1C key) → the card, or why there is none.
    cards: HashMap<(Option<String>, Option<String>), Result<CardRef, String>>,
    /// The program key (`None`: the mapping names no program field).
    program: Option<Option<String>>,
    organizations: HashMap<String, String>,
    accounts: HashMap<String, String>,
    /// The keys of the tier's property, found in the chart by its title.
    tier_properties: Option<Vec<String>>,
}

/// What the writer did, for the job's summary and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Documents created by a POST.
    pub created: usize,
    /// Documents found already in 1C (a retry after a lost answer, a crash).
    pub found: usize,
    /// Documents posted by the `Post` action.
    pub posted: usize,
    /// Customers whose tier attribute was written by a PATCH.
    pub tiers_written: usize,
}

/// Creates and posts kopilka's documents in one 1C base. Build one per run: card, program,
/// entity and account lookups are cached for its lifetime.
pub struct OdataWriter {
    client: OdataClient,
    mapping: Mapping,
    odata: OdataConfig,
    cfg: Arc<Config>,
    cache: Mutex<Cache>,
    created: AtomicUsize,
    found: AtomicUsize,
    posted: AtomicUsize,
    tiers_written: AtomicUsize,
}

impl std::fmt::Debug for OdataWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdataWriter")
            .field("client", &self.client)
            .field("mapping", &self.mapping.origin)
            .finish_non_exhaustive()
    }
}

/// Sorts an OData error into a delivery class: the client's class for this row, a halt
/// for what concerns every row.
fn from_odata(e: OdataError, what: &str) -> DeliveryError {
    let text = format!("{what}: {e}");
    match &e {
        OdataError::Unauthorized { .. }
        | OdataError::Mapping(_)
        | OdataError::NotConfigured
        | OdataError::Client(_) => DeliveryError::Halt(text),
        // a web-server page, or a set 1C does not publish: every row would fail the same way
        OdataError::Request {
            failure: Failure::NotJson { .. } | Failure::Status { status: 404, .. },
            ..
        } => DeliveryError::Halt(text),
        OdataError::Ledger(_) => DeliveryError::Retriable(text),
        OdataError::Request { class, .. } => match class {
            ErrorClass::Retriable => DeliveryError::Retriable(text),
            ErrorClass::Permanent => DeliveryError::Permanent(text),
        },
    }
}

/// The same for a failed POST.
fn from_failure(f: &Failure, what: &str, url: &str) -> DeliveryError {
    let text = format!("{what}: {f} at {url}");
    match f {
        Failure::Status {
            status: 401 | 403, ..
        }
        | Failure::NotJson { .. } => DeliveryError::Halt(text),
        _ => match classify(f) {
            ErrorClass::Retriable => DeliveryError::Retriable(text),
            ErrorClass::Permanent => DeliveryError::Permanent(text),
        },
    }
}

impl OdataClient {
    /// POSTs once (JSON body or none) and returns the status and body of a 2xx answer.
    /// Never retried here: a POST whose answer was lost may have created the entity.
    pub(crate) async fn post_once(
        &self,
        resource: &str,
        query: &[(&str, String)],
        body: Option<&str>,
    ) -> Result<(u16, String), Failure> {
        self.send_once(reqwest::Method::POST, resource, query, body).await
    }

    /// PATCHes an object once with a JSON body (the properties and whole tabular sections to
    /// replace).
    pub(crate) async fn patch_once(&self, resource: &str, body: &str) -> Result<(u16, String), Failure> {
        self.send_once(reqwest::Method::PATCH, resource, &[], Some(body))
            .await
    }

    async fn send_once(
        &self,
        method: reqwest::Method,
        resource: &str,
        query: &[(&str, String)],
        body: Option<&str>,
    ) -> Result<(u16, String), Failure> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = self.wire_url(resource, query, true);
        let mut req = self
            .http
            .request(method, &url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .header(reqwest::header::ACCEPT, "application/json");
        req = match body {
            Some(b) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json;charset=utf-8")
                .body(b.to_string()),
            None => req.header(reqwest::header::CONTENT_LENGTH, "0"),
        };
        let (status, content_type, text) = match self.receive(req.send().await).await? {
            Received::Whole {
                status,
                content_type,
                body,
            } => (status, content_type, body),
            Received::TooLarge => {
                return Err(Failure::BadJson(format!(
                    "the answer is larger than {} MiB",
                    MAX_BODY_BYTES >> 20
                )));
            }
        };
        if !(200..300).contains(&status) {
            return Err(status_failure(status, &text));
        }
        if !text.trim().is_empty() && !content_type.contains("json") {
            return Err(not_json(status, content_type, &text));
        }
        Ok((status, text))
    }
}

impl OdataWriter {
    /// A writer for the configuration's `[onec.odata]` base and mapping.
    pub fn new(cfg: Arc<Config>) -> Result<OdataWriter, OdataError> {
        OdataWriter::with_retry(cfg, RetryPolicy::default())
    }

    /// With a retry policy of its own for the GETs (lookups); POSTs are never retried
    /// within a delivery.
    pub fn with_retry(cfg: Arc<Config>, retry: RetryPolicy) -> Result<OdataWriter, OdataError> {
        let odata = cfg
            .onec
            .as_ref()
            .and_then(|o| o.odata.clone())
            .ok_or(OdataError::NotConfigured)?;
        let base = cfg.file.as_deref().and_then(std::path::Path::parent);
        let mapping = mapping::load(&odata.mapping, base)?;
        let client = OdataClient::new(&odata, retry)?;
        Ok(OdataWriter {
            client,
            mapping,
            odata,
            cfg,
            cache: Mutex::new(Cache::default()),
            created: AtomicUsize::new(0),
            found: AtomicUsize::new(0),
            posted: AtomicUsize::new(0),
            tiers_written: AtomicUsize::new(0),
        })
    }

    pub fn client(&self) -> &OdataClient {
        &self.client
    }

    pub fn stats(&self) -> WriteStats {
        WriteStats {
            created: self.created.load(Ordering::Relaxed),
            found: self.found.load(Ordering::Relaxed),
            posted: self.posted.load(Ordering::Relaxed),
            tiers_written: self.tiers_written.load(Ordering::Relaxed),
        }
    }

    /// The sink of bonus documents (`onec:bonus`).
    pub fn bonus_sink(&self) -> OdataSink<'_> {
        OdataSink {
            writer: self,
            destination: ONEC_BONUS,
        }
    }

    /// The sink of customers' tiers (`onec:tier`).
    pub fn tier_sink(&self) -> OdataSink<'_> {
        OdataSink {
            writer: self,
            destination: ONEC_TIER,
        }
    }

    /// The sink of accounting postings (`onec:accounting`).
    pub fn accounting_sink(&self) -> OdataSink<'_> {
        OdataSink {
            writer: self,
            destination: ONEC_ACCOUNTING,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names the writing part of the mapping needs that the base's `$metadata` lacks.
    /// `Ok(None)` when `$metadata` could not be read (1C fails it on some big bases):
    /// writing goes on, the probe is advice.
    pub async fn missing_names(&self) -> Result<Option<Vec<Missing>>, OdataError> {
        let xml = match self.client.metadata().await {
            Ok(x) => x,
            Err(e @ OdataError::Unauthorized { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read $metadata to check the bonus document names; writing anyway");
                return Ok(None);
            }
        };
        match parse_metadata(&xml) {
            Ok(schema) => Ok(Some(check_writing(&self.mapping, &schema).1)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read $metadata to check the bonus document names; writing anyway");
                Ok(None)
            }
        }
    }

    /// Delivers one outbox row of `onec:bonus` or `onec:accounting`: its document exists in 1C
    /// and is posted when this returns `Ok`.
    pub async fn deliver_row(&self, row: &OutboxRow) -> Result<(), DeliveryError> {
        let payload: Value = serde_json::from_str(&row.payload).map_err(|e| {
            DeliveryError::Permanent(format!(
                "outbox row {} ({}): the payload is not JSON: {e}",
                row.id, row.idem_key
            ))
        })?;
        if row.destination == ONEC_TIER {
            return self.deliver_tier(row, &payload).await;
        }
        let plan = self.plan(row, &payload)?;
        let mut found = None;
        if row.attempts > 0 {
            found = self.find(&plan).await?;
            if found.is_some() {
                self.found.fetch_add(1, Ordering::Relaxed);
            }
        }
        let found = match found {
            Some(f) => f,
            None => {
                let Some(body) = self.body(row, &payload, &plan).await? else {
                    tracing::info!(row = row.id, key = %row.idem_key, "nothing to write: the movement is zero");
                    return Ok(());
                };
                match self.create(&plan, &body).await? {
                    Some(f) => {
                        self.created.fetch_add(1, Ordering::Relaxed);
                        f
                    }
                    None => {
                        let f = self.find(&plan).await?.ok_or_else(|| {
                            DeliveryError::Retriable(format!(
                                "{}: 1C says a document with key {} exists, but neither a GET by key nor the \
                                 comment finds it",
                                plan.what, plan.key
                            ))
                        })?;
                        self.found.fetch_add(1, Ordering::Relaxed);
                        f
                    }
                }
            }
        };
        self.ensure_posted(&plan, &found).await
    }

    fn plan(&self, row: &OutboxRow, p: &Value) -> Result<Plan, DeliveryError> {
        let tz = self.cfg.timezone;
        let (set, comment_field, what, day) = if row.destination == ONEC_BONUS {
            let m = self.bonus_map()?;
            let at = p["at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map_or(row.created_at, |t| t.with_timezone(&Utc));
            (
                m.set.clone(),
                m.comment.clone(),
                "bonus document",
                to_local(at, tz).date(),
            )
        } else if row.destination == ONEC_ACCOUNTING {
            let m = self.accounting_map()?;
            let day = p["day"]
                .as_str()
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                .ok_or_else(|| {
                    DeliveryError::Permanent(format!(
                        "outbox row {} ({}): the posting names no day",
                        row.id, row.idem_key
                    ))
                })?;
            (m.set.clone(), m.comment.clone(), "accounting document", day)
        } else {
            return Err(DeliveryError::Halt(format!(
                "the OData writer does not deliver {:?} (outbox row {})",
                row.destination, row.id
            )));
        };
        let marker = format!("kopilka:{}", row.idem_key);
        Ok(Plan {
            what: format!("{what} {marker} ({set})"),
            set,
            key: document_id(row).to_string(),
            marker,
            comment_field,
            day,
        })
    }

    fn bonus_map(&self) -> Result<&BonusDocumentMap, DeliveryError> {
        self.mapping.bonus_document.as_ref().ok_or_else(|| {
            DeliveryError::Halt(format!(
                "mapping {} has no [bonus_document]: name the bonus document to write bonus movements to 1C",
                self.mapping.origin
            ))
        })
    }

    fn accounting_map(&self) -> Result<&AccountingDocumentMap, DeliveryError> {
        self.mapping.accounting_document.as_ref().ok_or_else(|| {
            DeliveryError::Halt(format!(
                "mapping {} has no [accounting_document]: name the document to write accounting postings to 1C",
                self.mapping.origin
            ))
        })
    }

    /// The document in 1C: by key, else by the comment among the day's documents.
    async fn find(&self, plan: &Plan) -> Result<Option<Found>, DeliveryError> {
        let select = [("$select", "Ref_Key,Number,Posted,DeletionMark".to_string())];
        let got = self
            .client
            .object(&plan.set, &by_key(&plan.set, &plan.key), &select)
            .await
            .map_err(|e| from_odata(e, &format!("{}: looking it up by key", plan.what)))?;
        if let Some(o) = got {
            return Ok(Some(Found::from(&o, &plan.key)));
        }
        let from = plan.day.and_time(chrono::NaiveTime::MIN);
        let to = plan
            .day
            .succ_opt()
            .unwrap_or(plan.day)
            .and_time(chrono::NaiveTime::MIN);
        let filter = format!(
            "Date ge {} and Date lt {}",
            datetime_literal(from),
            datetime_literal(to)
        );
        let select = format!("Ref_Key,Number,Posted,DeletionMark,{}", plan.comment_field);
        let page = self.odata.page_size.max(1) as usize;
        for n in 0..MAX_SCAN_PAGES {
            let mut q = vec![
                ("$select", select.clone()),
                ("$filter", filter.clone()),
                ("$orderby", "Ref_Key".to_string()),
            ];
            if n > 0 {
                q.push(("$skip", (n * page).to_string()));
            }
            q.push(("$top", page.to_string()));
            let items = self.client.list(&plan.set, &plan.set, &q).await.map_err(|e| {
                from_odata(
                    e,
                    &format!("{}: scanning {} for its comment", plan.what, plan.day),
                )
            })?;
            if let Some(o) = items
                .iter()
                .find(|o| text(o, &plan.comment_field).is_some_and(|c| has_marker(c, &plan.marker)))
            {
                let f = Found::from(o, &plan.key);
                tracing::warn!(document = %plan.what, key = %f.key, "found by its comment, not by kopilka's key: \
                    this configuration assigns its own keys");
                return Ok(Some(f));
            }
            if items.len() < page {
                break;
            }
        }
        Ok(None)
    }

    /// POSTs the document. `Ok(None)`: 1C says it exists already (code 15).
    async fn create(&self, plan: &Plan, body: &str) -> Result<Option<Found>, DeliveryError> {
        let url = self.client.readable_url(&plan.set, &[]);
        match self.client.post_once(&plan.set, &[], Some(body)).await {
            Ok((_, answer)) => {
                let entity = json::parse(&answer)
                    .ok()
                    .and_then(|v| if let Value::Object(o) = v { Some(o) } else { None })
                    .unwrap_or_default();
                let found = Found::from(&entity, &plan.key);
                if found.key != plan.key {
                    tracing::warn!(document = %plan.what, ours = %plan.key, theirs = %found.key,
                        "1C gave the document a key of its own; retries find it by its comment");
                }
                tracing::info!(document = %plan.what, number = ?found.number, "created in 1C");
                Ok(Some(Found {
                    posted: false,
                    deletion_mark: false,
                    ..found
                }))
            }
            Err(Failure::Status {
                status: 400..=499,
                code: Some(code),
                ..
            }) if code.trim() == "15" => Ok(None),
            Err(
                f @ Failure::Status {
                    status: 404 | 405, ..
                },
            ) => Err(DeliveryError::Halt(format!(
                "{}: {f} at {url}; is {} published with write rights (УстановитьСоставСтандартногоИнтерфейсаOData)?",
                plan.what, plan.set
            ))),
            Err(f) => Err(from_failure(&f, &format!("{}: creating it", plan.what), &url)),
        }
    }

    async fn ensure_posted(&self, plan: &Plan, found: &Found) -> Result<(), DeliveryError> {
        if found.deletion_mark {
            return Err(DeliveryError::Permanent(format!(
                "{}: document {} is marked for deletion in 1C; clear the mark there and retry the row, or drop it",
                plan.what,
                found.label()
            )));
        }
        if found.posted {
            return Ok(());
        }
        let resource = format!("{}/Post", by_key(&plan.set, &found.key));
        let query = [("PostingModeOperational", "false".to_string())];
        let url = self.client.readable_url(&resource, &query);
        match self.client.post_once(&resource, &query, None).await {
            Ok(_) => {
                self.posted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(document = %plan.what, number = ?found.number, "posted in 1C");
                Ok(())
            }
            Err(
                f @ Failure::Status {
                    status: 500,
                    code: Some(_),
                    ..
                },
            ) if classify(&f) == ErrorClass::Permanent => Err(DeliveryError::Permanent(format!(
                "{}: 1C refused to post document {} ({f}); it stays unposted there — fix the cause and retry the row",
                plan.what,
                found.label()
            ))),
            Err(f) => Err(from_failure(
                &f,
                &format!("{}: posting document {}", plan.what, found.label()),
                &url,
            )),
        }
    }

    /// The JSON body of the row's document; `None` when it would move nothing.
    async fn body(&self, row: &OutboxRow, p: &Value, plan: &Plan) -> Result<Option<String>, DeliveryError> {
        let fields = if row.destination == ONEC_BONUS {
            self.bonus_body(row, p, plan).await?
        } else {
            self.accounting_body(p, plan).await?
        };
        Ok(fields.map(|f| {
            let mut out = String::with_capacity(512);
            write_json(&mut out, &f);
            out
        }))
    }

    fn comment(plan: &Plan, rest: &str) -> String {
        let c = format!("{} {}", plan.marker, rest.trim());
        c.trim_end().chars().take(MAX_COMMENT_CHARS).collect()
    }

    async fn bonus_body(
        &self,
        row: &OutboxRow,
        p: &Value,
        plan: &Plan,
    ) -> Result<Option<Vec<(String, W)>>, DeliveryError> {
        let m = self.bonus_map()?.clone();
        let tz = self.cfg.timezone;
        let points = p["points"].as_i64().ok_or_else(|| {
            DeliveryError::Permanent(format!("{}: the payload has no whole points", plan.what))
        })?;
        if points == 0 {
            return Ok(None);
        }
        let kind = p["kind"].as_str().unwrap_or("");
        let at = p["at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(row.created_at, |t| t.with_timezone(&Utc));
        let expires = p["expires_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| local_text(to_local(t.with_timezone(&Utc), tz)));
        let card = p["card"].as_str().map(str::to_string);
        let onec = p["onec_id"].as_str().and_then(guid_text);
        let customer = p["customer_id"].as_i64();
        let holder = self.holder(&m, card, onec, customer, plan).await?;
        let program = self.program(&m).await?;
        let date = local_text(to_local(at, tz));
        let doc = &p["document"];
        let mut about = format!("{kind} {points}");
        if let (Some(source), Some(id)) = (doc["source"].as_str(), doc["doc_id"].as_str()) {
            let _ = write!(about, "; {source}:{id}");
            if let Some(n) = doc["number"].as_str() {
                let _ = write!(about, " №{n}");
            }
        }
        if let Some(c) = p["comment"].as_str().filter(|c| !c.trim().is_empty()) {
            let _ = write!(about, "; {}", c.trim());
        }
        let mut row_fields = vec![
            ("LineNumber".to_string(), W::Str("1".into())),
            (String::new(), W::Str(holder)),
            (String::new(), W::Num(points.unsigned_abs().to_string())),
        ];
        let (section, empty) = if points > 0 {
            let r = &m.accruals;
            row_fields[1].0 = r.holder.clone();
            row_fields[2].0 = r.points.clone();
            if let Some(f) = &r.accrued_on {
                row_fields.push((f.clone(), W::Str(date.clone())));
            }
            if let Some(f) = &r.expires_on {
                row_fields.push((f.clone(), W::Str(expires.unwrap_or_else(|| EMPTY_DATE.into()))));
            }
            (r.rows.clone(), m.writeoffs.rows.clone())
        } else {
            let r = &m.writeoffs;
            row_fields[1].0 = r.holder.clone();
            row_fields[2].0 = r.points.clone();
            if let Some(f) = &r.burn_correction {
                // the points 1C has scheduled to burn among those taken: lots with a burn
                // date that 1C knows of (opening balances read from 1C; kopilka's accruals
                // when their burn date is written back), so 1C's own burn cannot take them
                // again and its КСписанию stays what the ledger still has to burn
                let burn = match (p["from_burning"].as_i64(), p["from_burning_1c"].as_i64()) {
                    (Some(all), Some(from_1c)) if m.accruals.expires_on.is_some() => all.max(from_1c),
                    (Some(_), Some(from_1c)) => from_1c,
                    // queued by an older kopilka
                    _ if kind == "expiry" => points.abs(),
                    _ => 0,
                };
                let burn = burn.clamp(0, points.abs());
                row_fields.push((f.clone(), W::Num(burn.to_string())));
            }
            (r.rows.clone(), m.accruals.rows.clone())
        };
        let mut fields = vec![
            ("Ref_Key".to_string(), W::Str(plan.key.clone())),
            ("Date".to_string(), W::Str(date)),
            (m.comment.clone(), W::Str(Self::comment(plan, &about))),
        ];
        if let (Some(f), Some(k)) = (&m.program, program) {
            fields.push((f.clone(), W::Str(k)));
        }
        fields.push((section, W::Rows(vec![row_fields])));
        fields.push((empty, W::Rows(Vec::new())));
        Ok(Some(fields))
    }

    /// The row's holder reference: the card, or the customer.
    async fn holder(
        &self,
        m: &BonusDocumentMap,
        card: Option<String>,
        onec: Option<String>,
        customer: Option<i64>,
        plan: &Plan,
    ) -> Result<String, DeliveryError> {
        let who = customer.map_or_else(|| "the customer".to_string(), |c| format!("customer {c}"));
        match m.holder_is {
            BonusHolder::People => {
                if let Some(k) = onec {
                    return Ok(k);
                }
                if card.is_none() {
                    return Err(DeliveryError::Permanent(format!(
                        "{}: {who} has neither a 1C key nor a card; 1C's bonus document needs one",
                        plan.what
                    )));
                }
                let c = self.card(card, None, plan).await?;
                c.owner.ok_or_else(|| {
                    DeliveryError::Permanent(format!(
                        "{}: {who}'s card {} has no owner in 1C",
                        plan.what, c.key
                    ))
                })
            }
            BonusHolder::Card => {
                if card.is_none() && onec.is_none() {
                    return Err(DeliveryError::Permanent(format!(
                        "{}: {who} has no loyalty card; 1C's bonus document names one",
                        plan.what
                    )));
                }
                Ok(self.card(card, onec, plan).await?.key)
            }
        }
    }

    /// Finds a card by number (each mapped number field), else among the customer's cards.
    async fn card(
        &self,
        number: Option<String>,
        owner: Option<String>,
        plan: &Plan,
    ) -> Result<CardRef, DeliveryError> {
        let cache_key = (number.clone(), owner.clone());
        if let Some(c) = self.cache().cards.get(&cache_key) {
            return c.clone().map_err(DeliveryError::Permanent);
        }
        let m = self.mapping.cards.as_ref().ok_or_else(|| {
            DeliveryError::Halt(format!(
                "mapping {} has no [cards]: a bonus document's rows name a card",
                self.mapping.origin
            ))
        })?;
        let mut select = vec!["Ref_Key".to_string(), "DeletionMark".to_string()];
        select.extend(m.number.iter().cloned());
        select.extend(m.owner.iter().cloned());
        let select = select.join(",");
        let what = |how: &str| format!("{}: looking up the card {how}", plan.what);
        let to_ref = |o: &Obj| CardRef {
            key: reference(o, "Ref_Key").unwrap_or("").to_string(),
            owner: m.owner.as_ref().and_then(|f| reference(o, f)).map(str::to_string),
        };
        let live = |o: &&Obj| flag(o, "DeletionMark") != Some(true) && reference(o, "Ref_Key").is_some();
        let mut result = None;
        if let Some(n) = &number {
            for field in &m.number {
                let q = [
                    ("$select", select.clone()),
                    ("$filter", format!("{field} eq {}", string_literal(n))),
                    ("$top", MAX_LOOKUP_ROWS.to_string()),
                ];
                let items = self
                    .client
                    .list(&m.set, &m.set, &q)
                    .await
                    .map_err(|e| from_odata(e, &what(&format!("by {field}"))))?;
                if let Some(o) = items.iter().find(live) {
                    result = Some(to_ref(o));
                    break;
                }
            }
        }
        // a composite owner (Розница 2's ВладелецКарты) would need a typed filter
        // (`cast(guid'…', 'Catalog_…')`); such a card is found by its number only
        if result.is_none()
            && let (Some(o), Some(owner_field)) = (&owner, &m.owner)
            && is_reference(owner_field)
        {
            let q = [
                ("$select", select.clone()),
                ("$filter", format!("{owner_field} eq guid'{o}'")),
                ("$top", MAX_LOOKUP_ROWS.to_string()),
            ];
            let items = self
                .client
                .list(&m.set, &m.set, &q)
                .await
                .map_err(|e| from_odata(e, &what("by its owner")))?;
            let live: Vec<&Obj> = items.iter().filter(live).collect();
            let wanted = number.as_deref().and_then(normalize_card);
            let pick = match &wanted {
                // the same number written another way (spaces, dashes, case)
                Some(w) => live.iter().find(|c| {
                    m.number
                        .iter()
                        .filter_map(|f| text(c, f))
                        .any(|t| normalize_card(t).as_deref() == Some(w.as_str()))
                }),
                // no number in the ledger: the customer's only card
                None if live.len() == 1 => live.first(),
                None => None,
            };
            result = pick.map(|o| to_ref(o));
        }
        let r = result.ok_or_else(|| match (&number, &owner) {
            (Some(n), _) => format!(
                "{}: card {n} is not in {} (looked up by {}{})",
                plan.what,
                m.set,
                m.number.join(", "),
                if owner.is_some() {
                    " and among the customer's cards"
                } else {
                    ""
                }
            ),
            (None, Some(o)) => format!(
                "{}: the customer {o} has no single card in {} and the ledger knows no card number",
                plan.what, m.set
            ),
            (None, None) => format!("{}: no card", plan.what),
        });
        self.cache().cards.insert(cache_key, r.clone());
        r.map_err(DeliveryError::Permanent)
    }

    /// The bonus program's key: `[onec.odata] bonus_program` (a key, or a description in
    /// the program catalog), or the catalog's only program.
    async fn program(&self, m: &BonusDocumentMap) -> Result<Option<String>, DeliveryError> {
        if m.program.is_none() {
            return Ok(None);
        }
        if let Some(p) = &self.cache().program {
            return Ok(p.clone());
        }
        let wanted = self.odata.bonus_program.as_deref().map(str::trim);
        if let Some(k) = wanted.and_then(guid_text) {
            self.cache().program = Some(Some(k.clone()));
            return Ok(Some(k));
        }
        let Some(set) = &m.programs else {
            return Err(DeliveryError::Halt(format!(
                "mapping {} names no program catalog (bonus_document.programs); set [onec.odata] bonus_program \
                 to the program's key",
                self.mapping.origin
            )));
        };
        let q = [
            ("$select", "Ref_Key,Description,DeletionMark".to_string()),
            ("$top", MAX_PROGRAM_ROWS.to_string()),
        ];
        let all = self
            .client
            .list(set, set, &q)
            .await
            .map_err(|e| from_odata(e, "looking up the bonus program"))?;
        let live: Vec<&Obj> = all
            .iter()
            .filter(|o| flag(o, "DeletionMark") != Some(true))
            .collect();
        let names: Vec<&str> = live.iter().filter_map(|o| text(o, "Description")).collect();
        let found = match wanted {
            Some(w) => live.iter().find(|o| {
                text(o, "Description").is_some_and(|d| d.trim().to_lowercase() == w.to_lowercase())
            }),
            None if live.len() == 1 => live.first(),
            None => None,
        };
        let key = found
            .and_then(|o| reference(o, "Ref_Key"))
            .map(str::to_string)
            .ok_or_else(|| {
                DeliveryError::Halt(match wanted {
                    Some(w) => format!(
                        "[onec.odata] bonus_program {w:?} is not in {set} (there: {})",
                        names.join(", ")
                    ),
                    None => format!(
                        "{set} holds {} programs ({}); name one in [onec.odata] bonus_program",
                        live.len(),
                        names.join(", ")
                    ),
                })
            })?;
        self.cache().program = Some(Some(key.clone()));
        Ok(Some(key))
    }

    async fn accounting_body(
        &self,
        p: &Value,
        plan: &Plan,
    ) -> Result<Option<Vec<(String, W)>>, DeliveryError> {
        let m = self.accounting_map()?.clone();
        let bad = |why: String| DeliveryError::Permanent(format!("{}: {why}", plan.what));
        let pv = p["point_value_kopecks"]
            .as_i64()
            .filter(|v| *v > 0)
            .ok_or_else(|| bad("the posting has no point value".into()))?;
        let entity = p["entity"]
            .as_str()
            .unwrap_or(&self.cfg.accounting.entity)
            .to_string();
        let seq = p["seq"].as_i64().unwrap_or(1);
        let points = p["points"]
            .as_object()
            .ok_or_else(|| bad("the posting has no movements".into()))?;
        let mut rows = Vec::new();
        let mut total: i64 = 0;
        for (movement, v) in points {
            let pts = v
                .as_i64()
                .ok_or_else(|| bad(format!("movement {movement}: {v} is not whole points")))?;
            if pts == 0 {
                continue;
            }
            let kopecks = pts
                .checked_mul(pv)
                .ok_or_else(|| bad(format!("movement {movement}: {pts} points overflow")))?;
            total = total
                .checked_add(kopecks)
                .ok_or_else(|| bad("the total overflows".into()))?;
            let (dt, kt) = self
                .cfg
                .accounting
                .accounts
                .get(movement)
                .cloned()
                .ok_or_else(|| {
                    bad(format!(
                        "movement {movement} has no accounts in [accounting] accounts"
                    ))
                })?;
            let debit = self.account(&m, &m.row.debit, &dt).await?;
            let credit = self.account(&m, &m.row.credit, &kt).await?;
            let mut r = vec![
                ("LineNumber".to_string(), W::Str((rows.len() + 1).to_string())),
                (m.row.debit.clone(), W::Str(debit)),
                (m.row.credit.clone(), W::Str(credit)),
                (m.row.amount.clone(), W::Num(rubles(Money(kopecks)))),
            ];
            if let Some(f) = &m.row.content {
                r.push((f.clone(), W::Str(format!("{} ({pts})", movement_text(movement)))));
            }
            rows.push(r);
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let day = plan.day;
        let date = day
            .and_hms_opt(23, 59, 59)
            .map_or_else(|| format!("{day}T23:59:59"), local_text);
        let content = if seq > 1 {
            format!(
                "Бонусные баллы: корректировка за {} (№{seq})",
                day.format("%d.%m.%Y")
            )
        } else {
            format!("Бонусные баллы за {}", day.format("%d.%m.%Y"))
        };
        let mut fields = vec![
            ("Ref_Key".to_string(), W::Str(plan.key.clone())),
            ("Date".to_string(), W::Str(date)),
            (
                m.comment.clone(),
                W::Str(Self::comment(plan, &format!("{entity}: {content}"))),
            ),
        ];
        if let Some(f) = &m.organization {
            fields.push((f.clone(), W::Str(self.organization(&m, f, &entity).await?)));
        }
        if let Some(f) = &m.amount {
            fields.push((f.clone(), W::Num(rubles(Money(total)))));
        }
        if let Some(f) = &m.content {
            fields.push((f.clone(), W::Str(content)));
        }
        fields.push((m.rows.clone(), W::Rows(rows)));
        Ok(Some(fields))
    }

    /// The legal entity as the header field takes it: a reference found by `Description`,
    /// or the name.
    async fn organization(
        &self,
        m: &AccountingDocumentMap,
        field: &str,
        entity: &str,
    ) -> Result<String, DeliveryError> {
        if !is_reference(field) {
            return Ok(entity.to_string());
        }
        if let Some(k) = self.cache().organizations.get(entity) {
            return Ok(k.clone());
        }
        let Some(set) = &m.organizations else {
            return Err(DeliveryError::Halt(format!(
                "mapping {}: accounting_document.organization is a reference but no catalog is named",
                self.mapping.origin
            )));
        };
        let key = self.lookup(set, "Description", entity).await?.ok_or_else(|| {
            DeliveryError::Halt(format!(
                "legal entity {entity:?} ([accounting] entity or entities) is not in {set}; \
                     write it as 1C's Description names it"
            ))
        })?;
        self.cache().organizations.insert(entity.to_string(), key.clone());
        Ok(key)
    }

    /// An account as the row field takes it: a reference found by `Code`, or the code.
    async fn account(
        &self,
        m: &AccountingDocumentMap,
        field: &str,
        code: &str,
    ) -> Result<String, DeliveryError> {
        if !is_reference(field) {
            return Ok(code.to_string());
        }
        if let Some(k) = self.cache().accounts.get(code) {
            return Ok(k.clone());
        }
        let Some(set) = &m.accounts else {
            return Err(DeliveryError::Halt(format!(
                "mapping {}: account fields are references but no chart of accounts is named",
                self.mapping.origin
            )));
        };
        let key = self.lookup(set, "Code", code).await?.ok_or_else(|| {
            DeliveryError::Halt(format!(
                "account {code:?} ([accounting] accounts) is not in {set}; write the code as 1C shows it"
            ))
        })?;
        self.cache().accounts.insert(code.to_string(), key.clone());
        Ok(key)
    }

    /// The key of the live entity of `set` whose `field` equals `value` (trimmed).
    /// Writes a customer's tier name to the additional attribute `[attributes] tier` of their
    /// 1C object. A PATCH replaces a tabular section whole, so the section is read first and
    /// written back with only the tier's row set (added, changed, or removed when the customer
    /// has no tier): the shop's other attributes stay. A row already saying the tier is
    /// success without a write, so a repeated delivery changes nothing. Between the read and
    /// the write a person could edit the same customer in 1C; 1C ignores `If-Match`
    /// (`shared/specs/onec.md`), so that edit of the section would be lost — the window is
    /// one GET and one PATCH.
    async fn deliver_tier(&self, row: &OutboxRow, p: &Value) -> Result<(), DeliveryError> {
        let what = format!("tier row {} ({})", row.id, row.idem_key);
        let (Some(am), Some(people)) = (
            self.mapping.attributes.as_ref().filter(|a| a.tier.is_some()),
            self.mapping.people.as_ref(),
        ) else {
            return Err(DeliveryError::Halt(format!(
                "{what}: mapping {} names no [attributes] tier (and [people]) to write it to",
                self.mapping.origin
            )));
        };
        let title = am.tier.clone().unwrap_or_default();
        let Some(onec_id) = p.get("onec_id").and_then(Value::as_str).and_then(guid_text) else {
            return Err(DeliveryError::Permanent(format!(
                "{what}: the payload names no 1C key"
            )));
        };
        let tier = p.get("tier").and_then(Value::as_str);
        let name = tier.map(|id| {
            self.cfg
                .program
                .tiers
                .iter()
                .find(|t| t.id == id)
                .map_or_else(|| id.to_string(), |t| t.name.clone())
        });
        let candidates = self.tier_properties(am).await?;
        if candidates.is_empty() {
            return Err(DeliveryError::Halt(format!(
                "{what}: additional attribute {title:?} (attributes.tier) is not in {}: create it in 1C \
                 (a string property of the customers' set) or correct the mapping",
                am.properties
            )));
        }
        let select = [("$select", format!("Ref_Key,{}", am.section))];
        let mut found = None;
        for set in people.sets() {
            let got = self
                .client
                .object(set, &by_key(set, &onec_id), &select)
                .await
                .map_err(|e| from_odata(e, &what))?;
            if let Some(o) = got {
                found = Some((set, o));
                break;
            }
        }
        let Some((set, person)) = found else {
            return Err(DeliveryError::Permanent(format!(
                "{what}: customer {onec_id} is in none of {}",
                people.sets().collect::<Vec<_>>().join(", ")
            )));
        };
        let mut rows: Vec<json::Obj> = person
            .get(&am.section)
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(|x| x.as_object().cloned()).collect())
            .unwrap_or_default();
        let holds =
            |r: &json::Obj, k: &str| reference(r, &am.property).is_some_and(|x| x.eq_ignore_ascii_case(k));
        // two properties may share the title (one per catalog's set): the one this customer
        // already has, else the only one
        let property = match candidates.as_slice() {
            [one] => one.clone(),
            many => match many.iter().find(|k| rows.iter().any(|r| holds(r, k))) {
                Some(k) => k.clone(),
                None => {
                    return Err(DeliveryError::Halt(format!(
                        "{what}: {} properties are titled {title:?} ({}); give the customers' one a title of its own",
                        many.len(),
                        many.join(", ")
                    )));
                }
            },
        };
        let value_type = am.value_type();
        let current = rows.iter().position(|r| holds(r, &property));
        match (&name, current) {
            (Some(n), Some(i))
                if text(&rows[i], &am.value).map(str::trim) == Some(n.as_str())
                    && text(&rows[i], &value_type).is_none_or(|t| t == "Edm.String") =>
            {
                return Ok(());
            }
            (None, None) => return Ok(()),
            (Some(n), Some(i)) => {
                rows[i].insert(am.value.clone(), Value::String(n.clone()));
                rows[i].insert(value_type.clone(), Value::String("Edm.String".into()));
            }
            (Some(n), None) => {
                let line = rows
                    .iter()
                    .filter_map(|r| text(r, "LineNumber").and_then(|t| t.trim().parse::<i64>().ok()))
                    .max()
                    .unwrap_or(0)
                    + 1;
                let mut r = json::Obj::new();
                r.insert("LineNumber".into(), Value::String(line.to_string()));
                r.insert(am.property.clone(), Value::String(property.clone()));
                r.insert(am.value.clone(), Value::String(n.clone()));
                r.insert(value_type.clone(), Value::String("Edm.String".into()));
                rows.push(r);
            }
            (None, Some(i)) => {
                rows.remove(i);
            }
        }
        let mut body = json::Obj::new();
        body.insert(
            am.section.clone(),
            Value::Array(rows.into_iter().map(Value::Object).collect()),
        );
        let body = Value::Object(body).to_string();
        let resource = by_key(set, &onec_id);
        let url = self.client.readable_url(&resource, &[]);
        self.client
            .patch_once(&resource, &body)
            .await
            .map_err(|f| from_failure(&f, &what, &url))?;
        self.tiers_written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The keys of the tier's property, read from the chart once per writer.
    async fn tier_properties(&self, am: &mapping::AttributesMap) -> Result<Vec<String>, DeliveryError> {
        if let Some(k) = self.cache().tier_properties.clone() {
            return Ok(k);
        }
        let page = self.odata.page_size.max(1) as usize;
        let r = super::attributes::resolve(&self.client, am, page)
            .await
            .map_err(|e| from_odata(e, &format!("reading {}", am.properties)))?;
        self.cache().tier_properties = Some(r.tier.clone());
        Ok(r.tier)
    }

    async fn lookup(&self, set: &str, field: &str, value: &str) -> Result<Option<String>, DeliveryError> {
        let q = [
            ("$select", format!("Ref_Key,DeletionMark,{field}")),
            ("$filter", format!("{field} eq {}", string_literal(value.trim()))),
            ("$top", MAX_LOOKUP_ROWS.to_string()),
        ];
        let items = self
            .client
            .list(set, set, &q)
            .await
            .map_err(|e| from_odata(e, &format!("looking up {value:?} in {set}")))?;
        Ok(items
            .iter()
            .filter(|o| flag(o, "DeletionMark") != Some(true))
            .find_map(|o| reference(o, "Ref_Key"))
            .map(str::to_string))
    }
}

/// What a movement is, in the accountant's words.
fn movement_text(movement: &str) -> &'static str {
    match movement {
        "accrued" => "Начислены бонусные баллы",
        "redeemed" => "Списаны бонусные баллы в оплату покупок",
        "expired" => "Сгорели бонусные баллы",
        "reversed" => "Сторно начисления бонусных баллов",
        "written_off" => "Списан долг по бонусным баллам",
        "adjusted" => "Корректировка бонусных баллов",
        "opening" => "Начальные остатки бонусных баллов",
        _ => "Бонусные баллы",
    }
}

/// One destination's sink over a writer.
pub struct OdataSink<'a> {
    writer: &'a OdataWriter,
    destination: &'static str,
}

impl Sink for OdataSink<'_> {
    fn destination(&self) -> &str {
        self.destination
    }

    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let r = self.writer.deliver_row(row).await;
            if let Err(e) = &r {
                tracing::warn!(row = row.id, key = %row.idem_key, error = %e, "1C OData delivery failed");
            }
            if let Err(DeliveryError::Halt(why)) = &r {
                // the rest stay pending, untouched
                let why = why.clone();
                out.push(r);
                out.extend(
                    rows[i + 1..]
                        .iter()
                        .map(|_| Err(DeliveryError::Halt(why.clone()))),
                );
                break;
            }
            out.push(r);
        }
        out
    }
}

/// `onec:deliver`: bonus documents and accounting postings to 1C over OData.
#[derive(Default)]
pub struct OdataDeliverJob {
    retry: Option<RetryPolicy>,
    /// The mapping's writing names were checked against `$metadata` in this process.
    checked: tokio::sync::OnceCell<()>,
}

impl OdataDeliverJob {
    /// With a retry policy for lookups other than the default (tests: short back-offs).
    pub fn with_retry(retry: RetryPolicy) -> OdataDeliverJob {
        OdataDeliverJob {
            retry: Some(retry),
            checked: tokio::sync::OnceCell::new(),
        }
    }

    /// The job, when `[onec.odata]` is configured and `[accounting] postback = "odata"` or the
    /// mapping publishes the tier (`[attributes] tier`).
    pub fn enabled_by(cfg: &Config) -> Option<Arc<dyn Job>> {
        let odata = cfg.onec.as_ref().and_then(|o| o.odata.as_ref());
        let tiers = odata.is_some_and(|o| o.publishes_tier);
        (odata.is_some() && (cfg.accounting.postback == Postback::Odata || tiers))
            .then(|| Arc::new(OdataDeliverJob::default()) as Arc<dyn Job>)
    }

    async fn check_names(&self, writer: &OdataWriter) -> anyhow::Result<()> {
        self.checked
            .get_or_try_init(|| async {
                match writer.missing_names().await? {
                    Some(missing) if !missing.is_empty() => {
                        let list: Vec<String> = missing
                            .iter()
                            .map(|m| format!("{} (needed by {})", m.what, m.needed_by))
                            .collect();
                        anyhow::bail!(
                            "1C does not publish {} name(s) the bonus or accounting document needs: {}; \
                             1C would silently ignore them, so nothing is written (see kopilka check --probe)",
                            missing.len(),
                            list.join("; ")
                        )
                    }
                    _ => Ok(()),
                }
            })
            .await
            .map(|_| ())
    }
}

impl Job for OdataDeliverJob {
    fn name(&self) -> &str {
        "onec:deliver"
    }

    fn stage(&self) -> Stage {
        Stage::Deliver
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let writer = OdataWriter::with_retry(ctx.cfg.clone(), self.retry.clone().unwrap_or_default())?;
            let policy = &ctx.cfg.delivery;
            let clock = ctx.clock.as_ref();
            let (mut bonus, mut postings, mut tiers) = (
                DeliveryReport::default(),
                DeliveryReport::default(),
                DeliveryReport::default(),
            );
            if ctx.cfg.accounting.postback == Postback::Odata {
                self.check_names(&writer).await?;
                bonus = deliver_due(&ctx.ledger, &writer.bonus_sink(), policy, clock).await?;
                postings = deliver_due(&ctx.ledger, &writer.accounting_sink(), policy, clock).await?;
            }
            if writer.odata.publishes_tier {
                tiers = deliver_due(&ctx.ledger, &writer.tier_sink(), policy, clock).await?;
            }
            let s = writer.stats();
            let part = |r: &DeliveryReport| {
                format!(
                    "{} delivered, {} retried, {} dead",
                    r.delivered, r.retried, r.dead
                )
            };
            let summary = format!(
                "bonus documents: {}; postings: {}; tiers: {}; {} created, {} found already, {} posted, {} tiers written; {} requests",
                part(&bonus),
                part(&postings),
                part(&tiers),
                s.created,
                s.found,
                s.posted,
                s.tiers_written,
                writer.client().requests_sent()
            );
            if let Some(h) = [&bonus, &postings, &tiers].iter().find_map(|r| r.halted.as_ref()) {
                anyhow::bail!("1C OData delivery is halted: {h} ({summary})");
            }
            let limit = policy.max_rows_per_run;
            let busy = |r: &DeliveryReport| r.retried > 0 || r.delivered + r.retried + r.dead >= limit;
            Ok(JobOutcome {
                pending: busy(&bonus) || busy(&postings) || busy(&tiers),
                summary,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bodies_are_json_with_exact_numbers() {
        let mut out = String::new();
        write_json(
            &mut out,
            &[
                ("Ref_Key".into(), W::Str("a\"b".into())),
                ("Сумма".into(), W::Num(rubles(Money(-1230)))),
                (
                    "Строки".into(),
                    W::Rows(vec![vec![("LineNumber".into(), W::Str("1".into()))]]),
                ),
            ],
        );
        assert_eq!(
            out,
            r#"{"Ref_Key":"a\"b","Сумма":-12.30,"Строки":[{"LineNumber":"1"}]}"#
        );
        let v = json::parse(&out).expect("valid JSON");
        assert_eq!(v["Сумма"], "-12.30");
    }

    #[test]
    fn markers_match_whole_keys_only() {
        assert!(has_marker("kopilka:onec:bonus:tx1", "kopilka:onec:bonus:tx1"));
        assert!(has_marker(
            "  kopilka:onec:bonus:tx1 accrual 5",
            "kopilka:onec:bonus:tx1"
        ));
        assert!(!has_marker(
            "kopilka:onec:bonus:tx12 accrual",
            "kopilka:onec:bonus:tx1"
        ));
        assert!(!has_marker(
            "вручную kopilka:onec:bonus:tx1",
            "kopilka:onec:bonus:tx1"
        ));
    }

    #[test]
    fn filter_values_are_quoted_and_guids_checked() {
        assert_eq!(string_literal("O'Brien"), "'O''Brien'");
        assert_eq!(
            guid_text(" 6B6F7069-6C6B-6140-B0A5-1C0D0C0E0001 ").as_deref(),
            Some("6b6f7069-6c6b-6140-b0a5-1c0d0c0e0001")
        );
        assert_eq!(guid_text("x' or true or '"), None);
    }

    #[test]
    fn failures_are_classed_for_delivery() {
        let st = |status: u16, code: Option<&str>| Failure::Status {
            status,
            code: code.map(str::to_string),
            message: None,
        };
        let class = |f: Failure| match from_failure(&f, "doc", "url") {
            DeliveryError::Retriable(_) => "retriable",
            DeliveryError::Permanent(_) => "permanent",
            DeliveryError::Halt(_) => "halt",
            DeliveryError::Hold { .. } | DeliveryError::Refused(_) => "on purpose",
        };
        assert_eq!(class(st(503, None)), "retriable");
        assert_eq!(class(Failure::Timeout(Duration::from_secs(1))), "retriable");
        assert_eq!(class(st(500, Some("-1"))), "permanent");
        assert_eq!(class(st(400, Some("10"))), "permanent");
        assert_eq!(class(st(401, None)), "halt");
        assert_eq!(
            class(Failure::NotJson {
                status: 200,
                content_type: "text/html".into(),
                excerpt: String::new()
            }),
            "halt"
        );
    }
}
