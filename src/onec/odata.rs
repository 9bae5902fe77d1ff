//! 1C's standard OData interface (`/odata/standard.odata/`), read as a client.
//!
//! kopilka polls a 1C base over OData for its till receipts, returns and invoices, the product
//! catalog with cost prices, loyalty cards and customers, and (once) 1C's own bonus balances.
//! Facts about the protocol follow `shared/specs/onec.md` section C; the names of a
//! configuration's objects come from a [`mapping`](crate::onec::mapping), never from code.
//!
//! This file is the HTTP client: requests, Basic auth, URL encoding, error classes and retries.
//! The rest sits beside it: [`json`] (reading JSON with its number literals exact), [`poll`]
//! (documents → ledger), [`catalog`] (products, prices, customers, bonus balances), [`probe`]
//! (`$metadata` against the mapping) and [`job`] (the daemon job and `import-balances`).
//!
//! Decisions:
//! - **Numbers.** 1C writes fractions as JSON number literals (`Edm.Double` in `$metadata`).
//!   serde_json without its `arbitrary_precision` feature turns a literal into an `f64` before
//!   any visitor sees it, so a custom deserializer cannot recover the text, and `RawValue`
//!   needs a feature the crate does not enable. [`json::parse`] therefore rewrites every
//!   number literal outside strings into a string holding the same characters (one linear
//!   pass that tracks string and escape state) and then parses; amounts are read from that
//!   text with `core::money::parse_decimal`, so `231.74` is 23174 kopecks and `0.1` is 10,
//!   exactly. 1C already sends `Int64` values as strings, so nothing else changes.
//! - **One request at a time**, each with the configured timeout; no `$inlinecount` (1C then
//!   ignores `$skip` and `$top`); `$format=json` on every call.
//! - **Errors** are classed by [`classify`] alone: network failures, timeouts, a body cut off,
//!   429, 500 without code `-1` and 502/503/504 are retried; 4xx, 500 with code `-1` (an
//!   exception in configuration code), an HTML page in place of JSON and malformed JSON are
//!   permanent. A refused login is its own error naming the user and the URL.

pub mod attributes;
pub mod catalog;
pub mod job;
pub mod json;
pub mod poll;
pub mod probe;
pub mod write;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

pub use catalog::CatalogSync;
pub use job::{OdataJob, import_balances_from_1c, import_balances_from_1c_at};
pub use poll::{OdataPoller, PollOptions, PollReport};
pub use probe::{Missing, ProbeReport, probe, probe_blocking};

use crate::config::{OdataConfig, Secret};
use crate::core::backoff::retry_delay;
use crate::ledger::LedgerError;
use crate::onec::mapping::MappingError;

/// Longest piece of an unexpected answer quoted in an error.
const MAX_EXCERPT_CHARS: usize = 200;
/// Largest answer read: a page of documents is far smaller; more means a request without
/// `$top` or a server sending something else.
const MAX_BODY_BYTES: usize = 256 << 20;

/// An answer as [`OdataClient::receive`] read it.
pub(crate) enum Received {
    Whole {
        status: u16,
        content_type: String,
        body: String,
    },
    /// The body passed [`MAX_BODY_BYTES`]; reading stopped there.
    TooLarge,
}

/// A non-2xx answer: 1C's `odata.error` code and message, or an excerpt of whatever came.
pub(crate) fn status_failure(status: u16, body: &str) -> Failure {
    let (code, message) = odata_error(body);
    let message = message
        .map(|m| crate::scrub::upstream_excerpt(&m, MAX_EXCERPT_CHARS))
        .or_else(|| (!body.trim().is_empty()).then(|| excerpt(body)));
    Failure::Status {
        status,
        code,
        message,
    }
}

/// A 2xx answer of the wrong kind (a web server's page instead of 1C's JSON).
pub(crate) fn not_json(status: u16, content_type: String, body: &str) -> Failure {
    Failure::NotJson {
        status,
        content_type: if content_type.is_empty() {
            "no content type".into()
        } else {
            content_type
        },
        excerpt: excerpt(body),
    }
}
/// The connect phase gets at most this long, even with a long request timeout: a base that
/// does not accept connections will not start to.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The network, a timeout, an overloaded or restarting server: the next attempt or the
    /// next poll may succeed.
    Retriable,
    /// The request or the configuration is wrong, or 1C's own code refused: a person must act.
    Permanent,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Retriable => "retriable",
            ErrorClass::Permanent => "permanent",
        })
    }
}

/// What went wrong with one HTTP exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, reset, DNS).
    Connect(String),
    /// No complete answer within the timeout.
    Timeout(Duration),
    /// The connection broke while the body was read.
    Body(String),
    /// A non-2xx status, with 1C's `odata.error` code and message when the body had them.
    Status {
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    /// A 2xx answer that is not JSON: the web server's own page (broken publication or
    /// authentication), or Atom XML from a base that ignored `$format=json`.
    NotJson {
        status: u16,
        content_type: String,
        excerpt: String,
    },
    /// JSON that ends early: the answer was cut off on the way.
    Truncated(String),
    /// JSON that is malformed, or not the shape OData answers with.
    BadJson(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Timeout(t) => write!(f, "no complete answer within {} s", t.as_secs_f64()),
            Failure::Body(e) => write!(f, "the connection broke while reading the answer: {e}"),
            Failure::Status {
                status,
                code,
                message,
            } => {
                write!(f, "HTTP {status}")?;
                if let Some(c) = code {
                    write!(f, ", 1C error {c}")?;
                }
                if let Some(m) = message {
                    write!(f, ": «{m}»")?;
                }
                Ok(())
            }
            Failure::NotJson {
                status,
                content_type,
                excerpt,
            } => write!(
                f,
                "the server answered {content_type:?} instead of OData JSON (HTTP {status}): «{excerpt}»; \
                 check the web publication, that OData is enabled for it, and the credentials"
            ),
            Failure::Truncated(e) => write!(f, "the answer was cut off: {e}"),
            Failure::BadJson(e) => write!(f, "the answer is not OData JSON: {e}"),
        }
    }
}

/// The one place that decides whether a failed exchange is worth repeating.
pub fn classify(failure: &Failure) -> ErrorClass {
    match failure {
        Failure::Connect(_) | Failure::Timeout(_) | Failure::Body(_) | Failure::Truncated(_) => {
            ErrorClass::Retriable
        }
        Failure::Status { status, code, .. } => match status {
            408 | 429 => ErrorClass::Retriable,
            // An exception in the configuration's own code repeats on every attempt.
            500 if code.as_deref().map(str::trim) == Some("-1") => ErrorClass::Permanent,
            501 | 505 => ErrorClass::Permanent,
            500..=599 => ErrorClass::Retriable,
            _ => ErrorClass::Permanent,
        },
        Failure::NotJson { .. } | Failure::BadJson(_) => ErrorClass::Permanent,
    }
}

/// Errors of the OData connector.
#[derive(Debug, thiserror::Error)]
pub enum OdataError {
    /// 401/403: the user, its password or its rights.
    #[error(
        "1C refused user {user:?} at {url} ({failure}); check [onec.odata] user and password_file, \
         and that this user may read over OData"
    )]
    Unauthorized {
        user: String,
        url: String,
        failure: Failure,
    },
    /// One request failed (after retries, if its class allowed them).
    #[error("{entity}: {failure} ({class}, {attempts} attempt(s)) at {url}")]
    Request {
        entity: String,
        url: String,
        failure: Failure,
        class: ErrorClass,
        attempts: u32,
    },
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("[onec.odata] is not configured")]
    NotConfigured,
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    /// The HTTP client could not be built (a TLS backend problem).
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

impl OdataError {
    /// Whether the poll that failed with this error may succeed next time without a person.
    pub fn class(&self) -> ErrorClass {
        match self {
            OdataError::Request { class, .. } => *class,
            OdataError::Ledger(_) => ErrorClass::Retriable,
            _ => ErrorClass::Permanent,
        }
    }
}

/// How a request is retried within one poll.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included; retriable failures only.
    pub max_attempts_per_request: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts_per_request: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A client of one publication's OData interface.
#[derive(Clone)]
pub struct OdataClient {
    http: reqwest::Client,
    /// `http(s)://host/<publication>/odata/standard.odata`, no trailing slash.
    base: String,
    user: String,
    password: Secret,
    timeout: Duration,
    retry: RetryPolicy,
    requests: Arc<AtomicU64>,
}

impl fmt::Debug for OdataClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OdataClient")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes `text` as UTF-8, keeping unreserved characters and `keep`. 1C wants
/// Cyrillic, spaces, quotes and `:` encoded.
fn encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Characters left as they are in a resource path (`Set(guid'…')/Balance(Period=…)`).
const PATH_KEEP: &[u8] = b"()=,/*$";
/// … and in a query option's value (`Товары/Цена,Ref_Key`).
const QUERY_KEEP: &[u8] = b"(),/*$";

/// What of an upstream body goes into an error message: bounded and scrubbed of
/// credentials by the one shared [`crate::scrub::upstream_excerpt`] (a proxy's error page
/// may echo the request's `Authorization`).
pub(crate) fn excerpt(text: &str) -> String {
    let t = text.trim();
    // an HTML page says most in its title
    let t = match (t.find("<title>"), t.find("</title>")) {
        (Some(a), Some(b)) if b > a + 7 => &t[a + 7..b],
        _ => t,
    };
    crate::scrub::upstream_excerpt(t, MAX_EXCERPT_CHARS)
}

/// 1C's `{"odata.error":{"code":"9","message":{"lang":"ru","value":"…"}}}`, if the body is one.
fn odata_error(body: &str) -> (Option<String>, Option<String>) {
    let Ok(v) = json::parse(body) else {
        return (None, None);
    };
    let Some(e) = v.get("odata.error") else {
        return (None, None);
    };
    let code = match e.get("code") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let message = match e.get("message") {
        Some(Value::Object(m)) => m.get("value").and_then(Value::as_str).map(str::to_string),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    (code, message)
}

/// What one exchange produced, before retries.
enum Answer {
    Ok(String),
    Failed(Failure),
}

impl OdataClient {
    pub fn new(cfg: &OdataConfig, retry: RetryPolicy) -> Result<OdataClient, OdataError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(MAX_CONNECT_TIMEOUT))
            .user_agent(concat!("kopilka/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OdataError::Client(e.to_string()))?;
        Ok(OdataClient {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            timeout: cfg.timeout,
            retry,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// HTTP requests sent so far (retries included).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The URL as people read it (not percent-encoded), for messages and quarantine.
    pub fn readable_url(&self, resource: &str, query: &[(&str, String)]) -> String {
        let mut url = format!("{}/{resource}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("{k}={v}"));
        }
        url
    }

    fn wire_url(&self, resource: &str, query: &[(&str, String)], json: bool) -> String {
        let mut url = format!("{}/{}", self.base, encode(resource, PATH_KEEP));
        let format = json.then(|| ("$format", "json".to_string()));
        for (i, (k, v)) in format.iter().chain(query.iter()).enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode(k, b"$"));
            url.push('=');
            url.push_str(&encode(v, QUERY_KEEP));
        }
        url
    }

    async fn exchange(&self, url: &str, json: bool) -> Result<Answer, Failure> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let accept = if json {
            "application/json"
        } else {
            "application/xml"
        };
        let sent = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await;
        let (status, content_type, body) = match self.receive(sent).await? {
            Received::Whole {
                status,
                content_type,
                body,
            } => (status, content_type, body),
            Received::TooLarge => {
                return Ok(Answer::Failed(Failure::BadJson(format!(
                    "the answer is larger than {} MiB; lower [onec.odata] page_size",
                    MAX_BODY_BYTES >> 20
                ))));
            }
        };
        if !(200..300).contains(&status) {
            return Ok(Answer::Failed(status_failure(status, &body)));
        }
        let wanted = if json { "json" } else { "xml" };
        if !content_type.contains(wanted) {
            return Ok(Answer::Failed(not_json(status, content_type, &body)));
        }
        Ok(Answer::Ok(body))
    }

    /// Reads an answer's status, content type and body (at most [`MAX_BODY_BYTES`]); the one
    /// reader of GETs and POSTs, so both fail the same way on a dropped or endless body.
    pub(crate) async fn receive(
        &self,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Result<Received, Failure> {
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(Failure::Timeout(self.timeout)),
            Err(e) => return Err(Failure::Connect(error_chain(&e))),
        };
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                        return Ok(Received::TooLarge);
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(Failure::Timeout(self.timeout)),
                Err(e) => return Err(Failure::Body(error_chain(&e))),
            }
        }
        Ok(Received::Whole {
            status,
            content_type,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// GETs a resource, retrying retriable failures, and reads the body with `read` (whose
    /// failures are classed and retried like any other).
    async fn get_with<T>(
        &self,
        entity: &str,
        resource: &str,
        query: &[(&str, String)],
        json: bool,
        read: impl Fn(String) -> Result<T, Failure>,
    ) -> Result<T, OdataError> {
        let url = self.wire_url(resource, query, json);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.exchange(&url, json).await {
                Ok(Answer::Ok(body)) => match read(body) {
                    Ok(v) => return Ok(v),
                    Err(f) => f,
                },
                Ok(Answer::Failed(f)) | Err(f) => f,
            };
            let readable = self.readable_url(resource, query);
            if let Failure::Status {
                status: 401 | 403, ..
            } = failure
            {
                return Err(OdataError::Unauthorized {
                    user: self.user.clone(),
                    url: readable,
                    failure,
                });
            }
            let class = classify(&failure);
            if class == ErrorClass::Permanent || attempt >= self.retry.max_attempts_per_request.max(1) {
                return Err(OdataError::Request {
                    entity: entity.to_string(),
                    url: readable,
                    failure,
                    class,
                    attempts: attempt,
                });
            }
            let delay = retry_delay(
                attempt,
                self.retry.backoff_initial,
                self.retry.backoff_max,
                fastrand::u64(..),
            );
            tracing::warn!(entity, url = %readable, error = %failure, attempt, "1C OData request failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// GETs a collection (`{"value":[…]}`) and returns its objects.
    pub async fn list(
        &self,
        entity: &str,
        resource: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<json::Obj>, OdataError> {
        self.get_with(entity, resource, query, true, |body| {
            let value = json::parse(&body).map_err(|e| json::failure(&e))?;
            let Value::Object(mut top) = value else {
                return Err(Failure::BadJson("the answer is not a JSON object".into()));
            };
            match top.remove("value") {
                Some(Value::Array(items)) => Ok(items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::Object(m) => Some(m),
                        _ => None,
                    })
                    .collect()),
                _ => Err(Failure::BadJson("no \"value\" array in the answer".into())),
            }
        })
        .await
    }

    /// GETs one entity (`Set(guid'…')`); `None` when 1C answers 404 (gone, or never there).
    pub async fn object(
        &self,
        entity: &str,
        resource: &str,
        query: &[(&str, String)],
    ) -> Result<Option<json::Obj>, OdataError> {
        let got = self
            .get_with(entity, resource, query, true, |body| {
                match json::parse(&body).map_err(|e| json::failure(&e))? {
                    Value::Object(m) => Ok(m),
                    _ => Err(Failure::BadJson("the answer is not a JSON object".into())),
                }
            })
            .await;
        match got {
            Ok(m) => Ok(Some(m)),
            Err(OdataError::Request {
                failure: Failure::Status { status: 404, .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GETs `$metadata` (XML only).
    pub async fn metadata(&self) -> Result<String, OdataError> {
        self.get_with("$metadata", "$metadata", &[], false, Ok).await
    }
}

/// An error with its causes, as reqwest nests them ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `Set(guid'…')`: one entity's resource path.
pub(crate) fn by_key(set: &str, key: &str) -> String {
    format!("{set}(guid'{key}')")
}

/// A `datetime'…'` literal of a naive local time, as `$filter` takes it.
pub(crate) fn datetime_literal(t: chrono::NaiveDateTime) -> String {
    format!("datetime'{}'", t.format("%Y-%m-%dT%H:%M:%S"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, code: Option<&str>) -> Failure {
        Failure::Status {
            status,
            code: code.map(str::to_string),
            message: None,
        }
    }

    fn check(f: Failure, expected: ErrorClass) {
        assert_eq!(classify(&f), expected, "{f:?}");
    }

    #[test]
    fn classifies_every_failure_once() {
        use ErrorClass::{Permanent, Retriable};
        check(Failure::Connect("refused".into()), Retriable);
        check(Failure::Timeout(Duration::from_secs(5)), Retriable);
        check(Failure::Body("reset".into()), Retriable);
        check(Failure::Truncated("eof".into()), Retriable);
        check(status(502, None), Retriable);
        check(status(503, None), Retriable);
        check(status(504, None), Retriable);
        check(status(429, None), Retriable);
        check(status(500, None), Retriable);
        check(status(500, Some("0")), Retriable);
        check(status(500, Some("-1")), Permanent);
        check(status(500, Some(" -1 ")), Permanent);
        check(status(400, Some("14")), Permanent);
        check(status(404, Some("9")), Permanent);
        check(status(401, Some("20")), Permanent);
        check(status(501, None), Permanent);
        check(
            Failure::NotJson {
                status: 200,
                content_type: "text/html".into(),
                excerpt: "IIS".into(),
            },
            Permanent,
        );
        check(Failure::BadJson("x".into()), Permanent);
    }

    #[test]
    fn encodes_cyrillic_quotes_and_colons_but_not_the_syntax() {
        assert_eq!(
            encode("Document_ЧекККМ(guid'1')", PATH_KEEP),
            "Document_%D0%A7%D0%B5%D0%BA%D0%9A%D0%9A%D0%9C(guid%271%27)"
        );
        assert_eq!(
            encode("Date ge datetime'2026-01-01T00:00:00'", QUERY_KEEP),
            "Date%20ge%20datetime%272026-01-01T00%3A00%3A00%27"
        );
        assert_eq!(
            encode("Ref_Key,Товары/Цена", QUERY_KEEP),
            "Ref_Key,%D0%A2%D0%BE%D0%B2%D0%B0%D1%80%D1%8B/%D0%A6%D0%B5%D0%BD%D0%B0"
        );
        assert_eq!(encode("a&b=c+d", QUERY_KEEP), "a%26b%3Dc%2Bd");
    }

    #[test]
    fn reads_1c_error_bodies_and_html_titles() {
        let body = r#"{"odata.error":{"code":"-1","message":{"lang":"ru","value":"Не удалось провести"}}}"#;
        assert_eq!(
            odata_error(body),
            (Some("-1".into()), Some("Не удалось провести".into()))
        );
        assert_eq!(odata_error("<html/>"), (None, None));
        assert_eq!(
            excerpt("<html><head><title>Ошибка 404</title></head><body>…</body></html>"),
            "Ошибка 404"
        );
        let long = "я".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), MAX_EXCERPT_CHARS + 1);
    }
}
