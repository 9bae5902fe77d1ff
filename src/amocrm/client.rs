//! The one HTTP client of an AmoCRM account: every request (the token endpoint included)
//! passes one pacer ([`super::limiter`]), carries the bearer token, and is retried, refreshed
//! or halted according to [`super::classify`].
//!
//! One client per process means one pacer per process: the daemon's jobs share it through
//! one `Connector`, and retries, refreshes and repeats after a 401 wait for it like first
//! sends. Whatever the pacer waits for, the request is built before its turn so that nothing
//! but the wire stands between the turn and the send.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::auth::{self, Auth, OAuth, Pair, REAUTH_COMMAND};
use super::limiter::{JITTER_MARGIN_MS, Pacer, Ticket, WINDOW};
use super::wire::{Page, Problem, TokenReply};
use super::{AmoError, Class, ItemError};
use crate::clock::Clock;
use crate::config::{AmocrmAuth, AmocrmConfig, Secret};
use crate::core::backoff::retry_delay;
use crate::ledger::{SharedLedger, StoredTokens};

/// Characters of a response body kept in logs and errors.
pub const LOG_BODY_CHARS: usize = 300;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub requests_per_second: u32,
    /// Jitter on the wire the pacer leaves room for (see [`super::limiter`]).
    pub jitter_margin: Duration,
    pub timeout: Duration,
    /// Attempts per request on retriable failures before the caller gets the error.
    pub max_attempts: u32,
    /// Attempts per request answered 429 (each after the shared cool-down): a storm of
    /// other integrations' traffic is waited out rather than failed.
    pub max_attempts_on_429: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A 403 within this long after a 429 is taken for an account block.
    pub block_suspect_window: Duration,
    /// Larger bodies are cut off (and fail to parse, which is retriable).
    pub max_body_bytes: usize,
    /// Most pages one listing reads.
    pub max_pages: usize,
}

impl ClientOptions {
    pub fn from_config(cfg: &AmocrmConfig) -> ClientOptions {
        ClientOptions {
            requests_per_second: cfg.requests_per_second,
            jitter_margin: Duration::from_millis(JITTER_MARGIN_MS),
            timeout: cfg.timeout,
            max_attempts: 6,
            max_attempts_on_429: 20,
            backoff_initial: cfg.backoff_initial,
            backoff_max: cfg.backoff_max.max(cfg.backoff_initial),
            block_suspect_window: Duration::from_secs(120),
            max_body_bytes: 32 << 20,
            max_pages: 1000,
        }
    }
}

/// Counters for health pages, benchmarks and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub status_429: AtomicU64,
    pub status_5xx: AtomicU64,
    pub timeouts: AtomicU64,
    pub unauthorized: AtomicU64,
    pub refreshes: AtomicU64,
    first_sent: Mutex<Option<Instant>>,
    last_sent: Mutex<Option<Instant>>,
}

impl ClientStats {
    /// Requests per second between the first and the last request sent.
    pub fn achieved_rate_per_second(&self) -> f64 {
        let n = self.requests.load(Ordering::Relaxed);
        let first = *self.first_sent.lock().unwrap_or_else(|e| e.into_inner());
        let last = *self.last_sent.lock().unwrap_or_else(|e| e.into_inner());
        match (first, last) {
            (Some(a), Some(b)) if n > 1 && b > a => (n - 1) as f64 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn sent(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.first_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(now);
        *self.last_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }
}

#[derive(Debug, Default)]
struct Throttle {
    /// Why all traffic stopped; `Some` until a person acts (a new process, `auth --code`).
    halted: Option<String>,
    /// No request leaves before this (set by 429s, shared by every caller).
    cooldown_until: Option<Instant>,
    last_429: Option<Instant>,
    consecutive_429: u32,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    limiter: Pacer,
    opts: ClientOptions,
    pub(crate) auth: Auth,
    throttle: Mutex<Throttle>,
    pub stats: ClientStats,
    ledger: SharedLedger,
    clock: Arc<dyn Clock>,
}

/// A request body and how to treat a 504.
#[derive(Clone, Copy, Debug, Default)]
pub struct Send<'a> {
    pub body: Option<&'a Value>,
    /// Hand a 504 back at once so the caller can halve its batch (instead of retrying the
    /// same size).
    pub halve_on_504: bool,
}

impl Client {
    pub fn new(
        cfg: &AmocrmConfig,
        opts: ClientOptions,
        ledger: SharedLedger,
        clock: Arc<dyn Clock>,
    ) -> Result<Client, AmoError> {
        let auth = match &cfg.auth {
            AmocrmAuth::LongLived(token) => Auth::LongLived {
                expires_at: auth::jwt_expiry(token.expose()),
                token: token.clone(),
            },
            AmocrmAuth::OAuth {
                client_id,
                client_secret,
                redirect_uri,
            } => Auth::OAuth(Box::new(OAuth::new(
                client_id.clone(),
                client_secret.clone(),
                redirect_uri.clone(),
                cfg.base_url.clone(),
            ))),
        };
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout)
            .user_agent(concat!("kopilka/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AmoError::Setup(format!("cannot build the http client: {e}")))?;
        Ok(Client {
            http,
            base: cfg.base_url.trim_end_matches('/').to_string(),
            limiter: Pacer::new(opts.requests_per_second, WINDOW, opts.jitter_margin),
            opts,
            auth,
            throttle: Mutex::new(Throttle::default()),
            stats: ClientStats::default(),
            ledger,
            clock,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn ledger(&self) -> &SharedLedger {
        &self.ledger
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why AmoCRM traffic is stopped, if it is.
    pub fn halted(&self) -> Option<String> {
        self.throttle().halted.clone()
    }

    /// Stops all traffic of this account and raises the alert (an ERROR log line: an
    /// operator must act). Later calls fail at once without touching the network.
    pub fn halt(&self, why: String) -> AmoError {
        let mut t = self.throttle();
        if t.halted.is_none() {
            tracing::error!(alert = "amocrm_halted", reason = %why, "AmoCRM sync stopped; other work goes on");
            t.halted = Some(why.clone());
        }
        AmoError::Halted(t.halted.clone().unwrap_or(why))
    }

    /// Things an operator should know now: a halt, a token about to expire.
    pub fn alerts(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(h) = self.halted() {
            out.push(format!("amocrm sync halted: {h}"));
        }
        if let Auth::LongLived {
            expires_at: Some(exp),
            ..
        } = &self.auth
        {
            let left = *exp - self.clock.now();
            if left <= chrono::Duration::days(auth::WARN_AHEAD_DAYS) {
                out.push(format!(
                    "the amocrm long-lived token expires at {exp} ({} days left): create a new one in the \
                     integration's settings and replace the token file",
                    left.num_days().max(0)
                ));
            }
        }
        out
    }

    /// Refresh calls made to the token endpoint by this process.
    pub fn refresh_count(&self) -> u64 {
        match &self.auth {
            Auth::OAuth(o) => o.refreshes.load(Ordering::Relaxed),
            Auth::LongLived { .. } => 0,
        }
    }

    async fn wait_turn(&self) -> Result<Ticket, AmoError> {
        loop {
            let (halted, until) = {
                let t = self.throttle();
                (t.halted.clone(), t.cooldown_until)
            };
            if let Some(h) = halted {
                return Err(AmoError::Halted(h));
            }
            match until {
                Some(u) if u > Instant::now() => tokio::time::sleep_until(u.into()).await,
                _ => break,
            }
        }
        let ticket = self.limiter.acquire().await;
        // a halt raised while this request waited for its turn stops it too (the unused
        // turn only makes the next ones wait a little longer)
        if let Some(h) = self.halted() {
            return Err(AmoError::Halted(h));
        }
        Ok(ticket)
    }

    /// One HTTP exchange: waits for its turn, sends, reads and classifies the answer.
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        bearer: Option<&Secret>,
    ) -> Result<Option<Value>, AmoError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b.expose());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let m = method.to_string();
        // built (and its body serialised) before the turn: the time from the turn to the
        // wire must not vary with the body
        let req = req.build().map_err(|e| AmoError::Transport {
            method: m.clone(),
            path: path.into(),
            detail: e.to_string(),
        })?;
        let ticket = self.wait_turn().await?;
        self.stats.sent();
        let resp = match self.http.execute(req).await {
            Ok(r) => {
                self.limiter.answered(ticket, Instant::now());
                r
            }
            Err(e) if e.is_timeout() => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(AmoError::Timeout {
                    method: m,
                    path: path.into(),
                    timeout_ms: self.opts.timeout.as_millis(),
                });
            }
            Err(e) => {
                return Err(AmoError::Transport {
                    method: m,
                    path: path.into(),
                    detail: e.to_string(),
                });
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "-".to_string(), |v| crate::scrub::upstream_excerpt(v, 80));
        let bytes = match self.read_body(resp).await {
            Ok(b) => b,
            Err(detail) => {
                if detail.contains("timed out") {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                return Err(AmoError::Transport {
                    method: m,
                    path: path.into(),
                    detail,
                });
            }
        };
        let parsed: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let text = String::from_utf8_lossy(&bytes);
        if (200..300).contains(&status) {
            {
                let mut t = self.throttle();
                t.consecutive_429 = 0;
            }
            if status == 204 || bytes.is_empty() {
                return Ok(None);
            }
            return match parsed {
                Some(v) => Ok(Some(v)),
                None => {
                    tracing::warn!(status, request_id = %request_id, body = %crate::scrub::upstream_excerpt(&text, LOG_BODY_CHARS),
                        "AmoCRM answered with a body that is not JSON");
                    Err(AmoError::Body {
                        method: m,
                        path: path.into(),
                        detail: "not valid JSON (cut off?)".into(),
                        body: crate::scrub::upstream_excerpt(&text, LOG_BODY_CHARS),
                    })
                }
            };
        }
        let after_429 = {
            let mut t = self.throttle();
            let recent = t
                .last_429
                .is_some_and(|at| at.elapsed() <= self.opts.block_suspect_window);
            if status == 429 {
                self.stats.status_429.fetch_add(1, Ordering::Relaxed);
                t.consecutive_429 += 1;
                t.last_429 = Some(Instant::now());
                let delay = retry_delay(
                    t.consecutive_429,
                    self.opts.backoff_initial,
                    self.opts.backoff_max,
                    fastrand::u64(..),
                );
                // the server's own word wins when it asks for longer than our back-off
                let delay = delay.max(retry_after.unwrap_or_default());
                t.cooldown_until = Some(Instant::now() + delay);
            } else if status == 503
                && let Some(wait) = retry_after
            {
                t.cooldown_until = Some(Instant::now() + wait);
            }
            recent
        };
        if status >= 500 {
            self.stats.status_5xx.fetch_add(1, Ordering::Relaxed);
        }
        if status == 401 {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        }
        let problem: Option<Problem> = parsed
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        let items = problem
            .as_ref()
            .and_then(|p| p.validation_errors.as_ref())
            .map(|list| {
                list.iter()
                    .map(|e| ItemError {
                        request_id: crate::scrub::upstream_excerpt(
                            e.request_id.as_deref().unwrap_or_default(),
                            LOG_BODY_CHARS,
                        ),
                        detail: crate::scrub::upstream_excerpt(
                            &e.errors
                                .iter()
                                .flatten()
                                .map(|i| {
                                    format!(
                                        "{} at {}: {}",
                                        i.code.as_deref().unwrap_or("error"),
                                        i.path.as_deref().unwrap_or("?"),
                                        i.detail.as_deref().unwrap_or("")
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; "),
                            LOG_BODY_CHARS,
                        ),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shown = match &problem {
            Some(p) if p.title.is_some() || p.hint.is_some() || p.detail.is_some() => {
                let joined = [p.title.as_deref(), p.detail.as_deref(), p.hint.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                crate::scrub::upstream_excerpt(&joined, LOG_BODY_CHARS)
            }
            _ => crate::scrub::upstream_excerpt(&text, LOG_BODY_CHARS),
        };
        tracing::warn!(status, request_id = %request_id, method = %m, path, body = %crate::scrub::upstream_excerpt(&text, LOG_BODY_CHARS),
            "AmoCRM refused a request");
        Err(AmoError::Status {
            method: m,
            path: path.into(),
            status,
            request_id,
            body: shown,
            json: parsed.is_some(),
            after_429,
            items,
        })
    }

    async fn read_body(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if out.len() + c.len() > self.opts.max_body_bytes {
                        return Err(format!(
                            "the body is larger than {} bytes",
                            self.opts.max_body_bytes
                        ));
                    }
                    out.extend_from_slice(&c);
                }
                Ok(None) => return Ok(out),
                Err(e) if e.is_timeout() => return Err(format!("reading the body timed out: {e}")),
                Err(e) => return Err(format!("the body was cut off: {e}")),
            }
        }
    }

    /// Sends an API request with retries: back-off with jitter on retriable failures, one
    /// refresh and one repeat on 401, a halt on a block. `None` is a 204 (nothing found).
    pub async fn send(&self, method: Method, path: &str, s: Send<'_>) -> Result<Option<Value>, AmoError> {
        let mut attempt = 0;
        let mut limited = 0;
        let mut refreshed = false;
        loop {
            let token = self.bearer().await?;
            match self.exchange(&method, path, s.body, Some(&token)).await {
                Ok(v) => return Ok(v),
                Err(e) => match e.class() {
                    Class::Halt => {
                        let why = match &e {
                            AmoError::Halted(h) => h.clone(),
                            other => format!(
                                "{other}; this looks like an account block (or an unpaid account): stop, ask \
                                 AmoCRM support, then restart kopilka"
                            ),
                        };
                        return Err(self.halt(why));
                    }
                    Class::Unauthorized if !refreshed => {
                        refreshed = true;
                        match &self.auth {
                            Auth::OAuth(_) => {
                                self.refresh(Some(&token)).await?;
                            }
                            Auth::LongLived { .. } => {
                                return Err(self.halt(format!(
                                    "{e}; the long-lived token was refused (expired or revoked): create a new one \
                                     in the integration's settings and put it in the token file"
                                )));
                            }
                        }
                    }
                    Class::Unauthorized => {
                        return Err(self.halt(format!(
                            "{e} even after a token refresh; re-authorise: {REAUTH_COMMAND}"
                        )));
                    }
                    Class::Permanent => return Err(e),
                    Class::Retriable => {
                        let limit = if e.status() == Some(429) {
                            limited += 1;
                            limited >= self.opts.max_attempts_on_429
                        } else {
                            attempt += 1;
                            attempt >= self.opts.max_attempts
                        };
                        if (s.halve_on_504 && e.status() == Some(504)) || limit {
                            return Err(e);
                        }
                        if e.status() != Some(429) {
                            let delay = retry_delay(
                                attempt,
                                self.opts.backoff_initial,
                                self.opts.backoff_max,
                                fastrand::u64(..),
                            );
                            tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %e,
                                "AmoCRM request failed; trying again after a pause");
                            tokio::time::sleep(delay).await;
                        }
                        // a 429 set the shared cool-down that every request now waits for
                    }
                },
            }
        }
    }

    pub async fn get(&self, path: &str) -> Result<Option<Value>, AmoError> {
        self.send(Method::GET, path, Send::default()).await
    }

    /// Reads every page of a list, following `_links.next` until it is absent or leads to
    /// a 204. Returns the items under `_embedded.<key>` that parse.
    pub async fn get_all<T: for<'de> serde::Deserialize<'de>>(
        &self,
        first: &str,
        key: &str,
    ) -> Result<Vec<T>, AmoError> {
        let mut out = Vec::new();
        let mut path = first.to_string();
        for _ in 0..self.opts.max_pages {
            let Some(v) = self.get(&path).await? else {
                return Ok(out);
            };
            let page: Page = serde_json::from_value(v).map_err(|e| AmoError::Body {
                method: "GET".into(),
                path: path.clone(),
                detail: format!("not a list page: {e}"),
                body: String::new(),
            })?;
            let (items, bad) = page.items::<T>(key);
            if bad > 0 {
                tracing::warn!(path = %path, skipped = bad, "AmoCRM list items that could not be read were skipped");
            }
            out.extend(items);
            match page.next().and_then(|n| self.local_path(n)) {
                Some(next) if next != path => path = next,
                _ => return Ok(out),
            }
        }
        tracing::warn!(path = %first, max_pages = self.opts.max_pages, "AmoCRM list cut at the page limit");
        Ok(out)
    }

    /// The path and query of a `next` link (absolute on the account's host, or relative).
    fn local_path(&self, href: &str) -> Option<String> {
        if href.starts_with('/') {
            return Some(href.to_string());
        }
        let u = reqwest::Url::parse(href).ok()?;
        Some(match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        })
    }

    /// The token to send now, refreshing first when the pair is due.
    pub async fn bearer(&self) -> Result<Secret, AmoError> {
        let now = self.clock.now();
        match &self.auth {
            Auth::LongLived { token, expires_at } => {
                if let Some(exp) = expires_at {
                    if *exp <= now {
                        return Err(self.halt(format!(
                            "the long-lived token expired at {exp}: create a new one in the integration's settings \
                             and put it in the token file"
                        )));
                    }
                    if *exp - now <= chrono::Duration::days(auth::WARN_AHEAD_DAYS) {
                        tracing::warn!(expires_at = %exp, "the AmoCRM long-lived token expires soon; replace it");
                    }
                }
                Ok(token.clone())
            }
            Auth::OAuth(o) => {
                let pair = match o.cached() {
                    Some(p) => p,
                    None => match self.load_pair(o).await? {
                        Some(p) => {
                            o.set_cached(Some(p.clone()));
                            p
                        }
                        None => {
                            return Err(self.halt(format!(
                                "no OAuth token is stored for {}: authorise the integration and run {REAUTH_COMMAND}",
                                o.account
                            )));
                        }
                    },
                };
                if pair.due(now) {
                    self.refresh(Some(&pair.access)).await
                } else {
                    Ok(pair.access)
                }
            }
        }
    }

    async fn load_pair(&self, o: &OAuth) -> Result<Option<Pair>, AmoError> {
        let account = o.account.clone();
        let stored = self.ledger.run(move |l| l.amocrm_tokens_load(&account)).await?;
        let Some(s) = stored else { return Ok(None) };
        let (access, refresh) = auth::unseal(&o.key, &o.account, &s.sealed).map_err(|e| self.halt(e))?;
        Ok(Some(Pair {
            access,
            refresh,
            access_expires_at: s.access_expires_at,
            refresh_expires_at: s.refresh_expires_at,
            updated_at: s.updated_at,
        }))
    }

    /// Refreshes the pair, one refresh in flight per account. `stale` is the access token
    /// the caller found wanting: if the stored pair already differs (another task or
    /// process refreshed meanwhile) and is not due, that pair is used and no call is made.
    /// The new pair is committed to the ledger before anyone uses it.
    pub async fn refresh(&self, stale: Option<&Secret>) -> Result<Secret, AmoError> {
        let Auth::OAuth(o) = &self.auth else {
            return Err(AmoError::Setup("a long-lived token cannot be refreshed".into()));
        };
        let _one = o.refresh_lock.lock().await;
        let now = self.clock.now();
        let Some(stored) = self.load_pair(o).await? else {
            return Err(self.halt(format!(
                "no OAuth token is stored for {}: authorise the integration and run {REAUTH_COMMAND}",
                o.account
            )));
        };
        let someone_else = stale.is_none_or(|s| s.expose() != stored.access.expose());
        if someone_else && !stored.due(now) {
            o.set_cached(Some(stored.clone()));
            return Ok(stored.access);
        }
        let body = json!({
            "client_id": o.client_id,
            "client_secret": o.client_secret.expose(),
            "grant_type": "refresh_token",
            "refresh_token": stored.refresh.expose(),
            "redirect_uri": o.redirect_uri,
        });
        o.refreshes.fetch_add(1, Ordering::Relaxed);
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let reply = self.token_call(&body).await.map_err(|e| match e.class() {
            Class::Retriable => e,
            _ => self.halt(format!(
                "amocrm refused to refresh the OAuth token ({e}); the integration must be re-authorised: open its \
                 authorisation link, then run {REAUTH_COMMAND}"
            )),
        })?;
        self.store_reply(o, reply).await
    }

    /// Exchanges an authorisation code for the first pair (`kopilka amocrm auth --code`).
    pub async fn exchange_code(&self, code: &str) -> Result<(), AmoError> {
        let Auth::OAuth(o) = &self.auth else {
            return Err(AmoError::Setup(
                "the configuration uses a long-lived token (token_file); OAuth needs client_id, \
                 client_secret_file and redirect_uri"
                    .into(),
            ));
        };
        let _one = o.refresh_lock.lock().await;
        // a person is re-authorising: the halt a refused refresh raised is theirs to lift
        self.throttle().halted = None;
        let body = json!({
            "client_id": o.client_id,
            "client_secret": o.client_secret.expose(),
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": o.redirect_uri,
        });
        let reply = self.token_call(&body).await?;
        self.store_reply(o, reply).await?;
        Ok(())
    }

    async fn store_reply(&self, o: &OAuth, reply: TokenReply) -> Result<Secret, AmoError> {
        let (Some(access), Some(refresh)) = (reply.access_token, reply.refresh_token) else {
            return Err(AmoError::Body {
                method: "POST".into(),
                path: "/oauth2/access_token".into(),
                detail: "the token reply lacks access_token or refresh_token".into(),
                body: String::new(),
            });
        };
        let now = self.clock.now();
        let pair = Pair {
            access: Secret::new(access),
            refresh: Secret::new(refresh),
            access_expires_at: now
                + chrono::Duration::seconds(reply.expires_in.unwrap_or(86_400).clamp(60, 86_400 * 366)),
            refresh_expires_at: now + chrono::Duration::days(auth::REFRESH_TOKEN_LIFETIME_DAYS),
            updated_at: now,
        };
        let sealed = auth::seal(&o.key, &o.account, &pair.access, &pair.refresh).map_err(AmoError::Setup)?;
        let stored = StoredTokens {
            sealed,
            access_expires_at: pair.access_expires_at,
            refresh_expires_at: pair.refresh_expires_at,
            updated_at: now,
        };
        let account = o.account.clone();
        let saved = self
            .ledger
            .run(move |l| l.amocrm_tokens_store(&account, &stored))
            .await;
        if let Err(e) = saved {
            // the old refresh token is spent: keep the new pair in memory so this process
            // still works, and say loudly that a restart will need re-authorisation
            tracing::error!(alert = "amocrm_token_not_saved", error = %e,
                "the refreshed AmoCRM token pair could not be saved; a restart will need {}", REAUTH_COMMAND);
            o.set_cached(Some(pair));
            return Err(AmoError::Ledger(e));
        }
        o.set_cached(Some(pair.clone()));
        Ok(pair.access)
    }

    /// A call to the token endpoint: limited like every request, retried on retriable
    /// failures, never refreshed on 401 (that is the refresh).
    async fn token_call(&self, body: &Value) -> Result<TokenReply, AmoError> {
        let mut attempt = 0;
        loop {
            match self
                .exchange(&Method::POST, "/oauth2/access_token", Some(body), None)
                .await
            {
                Ok(Some(v)) => {
                    return serde_json::from_value(v).map_err(|e| AmoError::Body {
                        method: "POST".into(),
                        path: "/oauth2/access_token".into(),
                        detail: format!("not a token reply: {e}"),
                        body: String::new(),
                    });
                }
                Ok(None) => {
                    return Err(AmoError::Body {
                        method: "POST".into(),
                        path: "/oauth2/access_token".into(),
                        detail: "an empty token reply".into(),
                        body: String::new(),
                    });
                }
                Err(e) if e.class() == Class::Retriable => {
                    attempt += 1;
                    if attempt >= self.opts.max_attempts {
                        return Err(e);
                    }
                    if e.status() != Some(429) {
                        let delay = retry_delay(
                            attempt,
                            self.opts.backoff_initial,
                            self.opts.backoff_max,
                            fastrand::u64(..),
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The longest `Retry-After` honoured: a larger value (or a date far ahead) is more likely a
/// misconfigured proxy than a real request to stop all traffic for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// `Retry-After` as RFC 9110 gives it: delay-seconds, or an HTTP date; `None` when it is
/// neither. Capped at [`MAX_RETRY_AFTER`].
pub(crate) fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    let wait = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default()
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date_and_is_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // a date already past means "now"
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 09:59:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
