//! The server side of 1C's built-in «Обмен с сайтом»: kopilka answers 1C the way a site
//! does, so a shop connects it from 1C's own settings with no 1C programming.
//!
//! 1C calls one URL with `?type=catalog|sale&mode=…` (see the spec, section B):
//! `checkauth` (Basic auth → a session cookie), `init` (`zip=`, `file_limit=`), `file`
//! (uploads appended per file name, possibly in several chunks), `import` (process a
//! file; `progress` makes 1C call again while work goes on), and for `type=sale` also
//! `query` (documents kopilka sends back) and `success` (1C took them). Replies are plain
//! text whose first line is `success`, `progress` or `failure`.
//!
//! Uploaded files land in a folder per session under the exchange folder and go through
//! the same importer as `kopilka import`. Nothing is written outside that folder: a file
//! name keeps only a sanitised base name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::import::{ImportSettings, import_path};
use crate::clock::Clock;
use crate::config::{Config, SiteExchangeConfig};
use crate::ledger::SharedLedger;

pub const COOKIE_NAME: &str = "kopilka_exchange";
/// A session idle this long is forgotten (and its files with it).
const SESSION_IDLE: chrono::Duration = chrono::Duration::hours(2);
/// How long one `import` call waits for the work before answering `progress`.
const IMPORT_WAIT: Duration = Duration::from_secs(20);
/// Longest file name kept.
const MAX_FILE_NAME_CHARS: usize = 200;

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    #[serde(rename = "type")]
    kind: Option<String>,
    mode: Option<String>,
    filename: Option<String>,
    sessid: Option<String>,
}

#[derive(Clone, Debug)]
enum ImportState {
    Running,
    Done(Result<String, String>),
}

struct Session {
    sessid: String,
    /// Once 1C sent a sessid, every later call must carry it (reference servers do so).
    sessid_required: bool,
    dir: PathBuf,
    last_seen: DateTime<Utc>,
    uploaded_bytes: u64,
    imports: HashMap<String, ImportState>,
    /// Outbox rows the last `query` sent, delivered on `success`.
    sent: Vec<i64>,
}

/// The exchange endpoint's state.
pub struct SiteExchange {
    cfg: Arc<Config>,
    se: SiteExchangeConfig,
    ledger: SharedLedger,
    clock: Arc<dyn Clock>,
    root: PathBuf,
    sessions: Mutex<HashMap<String, Session>>,
    /// Woken whenever an import finishes, for the calls waiting on one.
    finished: tokio::sync::Notify,
}

fn text(body: impl Into<String>) -> Response {
    let mut r = body.into().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn failure(reason: &str) -> Response {
    text(format!("failure\n{reason}\n"))
}

/// Keeps only a safe base name: 1C may send `C:\…\import.xml` or `/tmp/x/offers.xml`, and
/// nothing may ever be written outside the session's folder.
pub fn sanitize_file_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("").trim();
    if base.is_empty()
        || base == "."
        || base == ".."
        || base.starts_with('.')
        || base.chars().any(|c| c.is_control() || c == ':')
        || base.chars().count() > MAX_FILE_NAME_CHARS
    {
        return None;
    }
    Some(base.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.to_string())
}

impl SiteExchange {
    /// `root` is the folder sessions upload into (under the exchange folder).
    pub fn new(
        cfg: Arc<Config>,
        ledger: SharedLedger,
        clock: Arc<dyn Clock>,
        root: PathBuf,
    ) -> Option<Arc<Self>> {
        let se = cfg.onec.as_ref()?.site_exchange.clone()?;
        Some(Arc::new(SiteExchange {
            cfg,
            se,
            ledger,
            clock,
            root,
            sessions: Mutex::new(HashMap::new()),
            finished: tokio::sync::Notify::new(),
        }))
    }

    /// The routes 1C is pointed at: `/1c_exchange.php` (what 1C suggests for sites) and
    /// `/exchange`.
    pub fn router(self: &Arc<Self>) -> Router {
        let limit = usize::try_from(self.se.file_limit_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10);
        Router::new()
            .route("/1c_exchange.php", any(handle))
            .route("/exchange", any(handle))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self.clone())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_basic(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(encoded) = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let expected = format!("{}:{}", self.se.user, self.se.password.expose());
        constant_time_eq(&decoded, expected.as_bytes())
    }

    fn checkauth(&self, headers: &HeaderMap) -> Response {
        if !self.check_basic(headers) {
            tracing::warn!("1C site exchange: wrong login or password");
            let mut r = failure("неверный логин или пароль (wrong login or password)");
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kopilka\""),
            );
            return r;
        }
        let now = self.clock.now();
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.last_seen + SESSION_IDLE > now);
        if sessions.len() >= self.se.max_sessions {
            return failure("слишком много открытых сессий обмена (too many exchange sessions)");
        }
        let value = uuid::Uuid::new_v4().simple().to_string();
        let sessid = uuid::Uuid::new_v4().simple().to_string();
        let dir = self.root.join(&value);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(error = %e, dir = %dir.display(), "Cannot create the exchange session folder");
            return failure("не удалось создать папку обмена (cannot create the exchange folder)");
        }
        sessions.insert(
            value.clone(),
            Session {
                sessid: sessid.clone(),
                sessid_required: false,
                dir,
                last_seen: now,
                uploaded_bytes: 0,
                imports: HashMap::new(),
                sent: Vec::new(),
            },
        );
        text(format!("success\n{COOKIE_NAME}\n{value}\nsessid={sessid}\n"))
    }

    /// The session of a call, checked; `Err` is the reason for the `failure` reply.
    fn session(&self, headers: &HeaderMap, params: &Params) -> Result<String, &'static str> {
        let Some(c) = cookie(headers) else {
            return Err("нет сессии: сначала mode=checkauth (no session: call mode=checkauth first)");
        };
        let now = self.clock.now();
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(&c) else {
            return Err("сессия неизвестна или истекла: mode=checkauth (unknown or expired session)");
        };
        match &params.sessid {
            Some(given) if *given != s.sessid => {
                return Err("неверный sessid (wrong sessid)");
            }
            Some(_) => s.sessid_required = true,
            None if s.sessid_required => return Err("нужен sessid (sessid required)"),
            None => {}
        }
        s.last_seen = now;
        Ok(c)
    }

    fn init(&self) -> Response {
        text(format!(
            "zip={}\nfile_limit={}\n",
            if self.se.zip { "yes" } else { "no" },
            self.se.file_limit_bytes
        ))
    }

    fn file(&self, session: &str, params: &Params, body: &Bytes) -> Response {
        let Some(name) = params.filename.as_deref().and_then(sanitize_file_name) else {
            return failure("недопустимое имя файла (bad file name)");
        };
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(session) else {
            return failure("сессия истекла (session expired)");
        };
        let total = s.uploaded_bytes.saturating_add(body.len() as u64);
        if total > self.se.max_upload_bytes {
            return failure("превышен объём загрузки (upload limit exceeded)");
        }
        let path = s.dir.join(&name);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, body));
        if let Err(e) = written {
            tracing::error!(error = %e, file = %path.display(), "Cannot store an uploaded exchange file");
            return failure("не удалось сохранить файл (cannot store the file)");
        }
        s.uploaded_bytes = total;
        s.imports.remove(&name);
        text("success\n")
    }

    /// Unpacks every uploaded archive of the session (entry names sanitised) once.
    fn unpack_archives(dir: &Path) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip")) {
                continue;
            }
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", path.display()))?;
            for i in 0..archive.len() {
                let mut e = archive.by_index(i).map_err(|e| e.to_string())?;
                if !e.is_file() {
                    continue;
                }
                let Some(name) = sanitize_file_name(e.name()) else {
                    continue;
                };
                let mut out = std::fs::File::create(dir.join(name)).map_err(|e| e.to_string())?;
                std::io::copy(&mut e, &mut out).map_err(|e| e.to_string())?;
            }
            let done = path.with_extension("zip.unpacked");
            std::fs::rename(&path, done).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn import(self: &Arc<Self>, session: &str, params: &Params) -> Response {
        let Some(name) = params.filename.as_deref().and_then(sanitize_file_name) else {
            return failure("недопустимое имя файла (bad file name)");
        };
        let (dir, state) = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(session) else {
                return failure("сессия истекла (session expired)");
            };
            let state = s.imports.get(&name).cloned();
            if state.is_none() {
                s.imports.insert(name.clone(), ImportState::Running);
            }
            (s.dir.clone(), state)
        };
        match state {
            Some(ImportState::Done(r)) => return self.import_reply(session, &name, r),
            Some(ImportState::Running) => {}
            None => {
                let me = self.clone();
                let session_key = session.to_string();
                let file = name.clone();
                tokio::spawn(async move {
                    let result = me.run_import(&dir, &file).await;
                    if let Some(s) = me.sessions().get_mut(&session_key) {
                        s.imports.insert(file, ImportState::Done(result));
                    }
                    me.finished.notify_waiters();
                });
            }
        }
        // wait a while for the work; 1C repeats the call on `progress`
        let deadline = tokio::time::Instant::now() + IMPORT_WAIT;
        loop {
            // registered before the state is read, so a completion in between is not missed
            let finished = self.finished.notified();
            let state = self
                .sessions()
                .get(session)
                .and_then(|s| s.imports.get(&name).cloned());
            match state {
                Some(ImportState::Done(r)) => return self.import_reply(session, &name, r),
                Some(ImportState::Running) => {
                    if tokio::time::timeout_at(deadline, finished).await.is_err() {
                        return text("progress\nимпорт продолжается (import in progress)\n");
                    }
                }
                None => return failure("сессия истекла (session expired)"),
            }
        }
    }

    fn import_reply(&self, session: &str, name: &str, r: Result<String, String>) -> Response {
        if let Some(s) = self.sessions().get_mut(session) {
            s.imports.remove(name);
        }
        match r {
            Ok(summary) => text(format!("success\n{summary}\n")),
            Err(reason) => failure(&reason),
        }
    }

    async fn run_import(&self, dir: &Path, name: &str) -> Result<String, String> {
        Self::unpack_archives(dir)?;
        let path = dir.join(name);
        if !path.exists() {
            return Err(format!("файл {name} не загружен (file {name} was not uploaded)"));
        }
        let cfg = self.cfg.clone();
        let now = self.clock.now();
        let result = self
            .ledger
            .run(move |l| {
                let settings = ImportSettings::from_config(&cfg);
                import_path(l, &path, &settings, &cfg, now)
            })
            .await;
        match result {
            Ok(r) if r.truncated.is_none() => Ok(format!(
                "{}: {} документов, {} применено, {} в карантине",
                r.file,
                r.documents,
                r.applied + r.new_versions + r.voided,
                r.quarantined
            )),
            Ok(r) => Err(format!(
                "файл {} неполон: {}",
                r.file,
                r.truncated.unwrap_or_default()
            )),
            Err(e) => {
                tracing::error!(file = %name, error = %e, "1C site exchange import failed");
                Err(e.to_string())
            }
        }
    }

    /// `type=sale&mode=query`: the bonus documents and accounting postings waiting for 1C
    /// (when `[accounting] postback = "commerceml"`). The rows sent are remembered for the
    /// session and marked delivered when 1C confirms with `mode=success`; without the
    /// confirmation they are sent again next time, with the same `Ид`.
    async fn query(self: &Arc<Self>, session: &str) -> Response {
        let now = self.clock.now();
        let rows = if self.cfg.accounting.postback == crate::config::Postback::CommerceMl {
            let far = now + chrono::Duration::days(36_500);
            self.ledger
                .run(move |l| -> crate::ledger::Result<Vec<crate::ledger::OutboxRow>> {
                    let mut rows = l.outbox_due(crate::config::ONEC_ACCOUNTING, QUERY_ROWS, far)?;
                    let room = QUERY_ROWS.saturating_sub(rows.len());
                    rows.extend(l.outbox_due(crate::config::ONEC_BONUS, room, far)?);
                    Ok(rows)
                })
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "Cannot read the outbox for 1C");
                    Vec::new()
                })
        } else {
            Vec::new()
        };
        if let Some(s) = self.sessions().get_mut(session) {
            s.sent = rows.iter().map(|r| r.id).collect();
        }
        let body = super::postback::documents_file(&rows, &self.cfg, now, self.se.reply_windows_1251);
        let content_type = if self.se.reply_windows_1251 {
            "application/xml; charset=windows-1251"
        } else {
            "application/xml; charset=utf-8"
        };
        let mut r = body.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    }

    /// `type=sale&mode=success`: 1C took what the last `query` sent.
    async fn success(self: &Arc<Self>, session: &str) -> Response {
        let sent = self
            .sessions()
            .get_mut(session)
            .map(|s| std::mem::take(&mut s.sent))
            .unwrap_or_default();
        if sent.is_empty() {
            return text("success\n");
        }
        let now = self.clock.now();
        let n = sent.len();
        match self
            .ledger
            .run(move |l| l.outbox_mark_delivered(&sent, now))
            .await
        {
            Ok(()) => {
                tracing::info!(documents = n, "1C confirmed the documents sent");
                text("success\n")
            }
            Err(e) => failure(&format!("не удалось отметить доставку: {e}")),
        }
    }
}

/// Outbox rows one `query` reply carries at most.
const QUERY_ROWS: usize = 1_000;

async fn handle(
    State(ex): State<Arc<SiteExchange>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mode = params.mode.as_deref().unwrap_or("");
    let kind = params.kind.as_deref().unwrap_or("");
    if !matches!(kind, "catalog" | "sale") {
        return failure("type должен быть catalog или sale (type must be catalog or sale)");
    }
    if mode == "checkauth" {
        return ex.checkauth(&headers);
    }
    let session = match ex.session(&headers, &params) {
        Ok(s) => s,
        Err(reason) => return failure(reason),
    };
    match mode {
        "init" => ex.init(),
        "file" => {
            let r = ex.file(&session, &params, &body);
            if kind == "sale" && r.status().is_success() {
                // older 1C sends sale documents with `file` only and expects them processed
                let _ = ex.import(&session, &params).await;
            }
            r
        }
        "import" => ex.import(&session, &params).await,
        "query" if kind == "sale" => ex.query(&session).await,
        "success" if kind == "sale" => ex.success(&session).await,
        "complete" | "deactivate" => text("success\n"),
        other => failure(&format!("неизвестный режим {other:?} (unknown mode)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_keep_only_a_safe_base_name() {
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(sanitize_file_name(input).as_deref(), expected, "{input:?}");
        };
        check("import.xml", Some("import.xml"));
        check(
            "C:\\Users\\1c\\AppData\\Temp\\offers0_1.xml",
            Some("offers0_1.xml"),
        );
        check("/tmp/exchange/orders.zip", Some("orders.zip"));
        check("../../etc/passwd", Some("passwd"));
        check("..", None);
        check("a/..", None);
        check(".hidden", None);
        check("", None);
        check("x\u{0}y", None);
        check("C:", None);
    }
}
