//! The server side of 1C's built-in «Обмен с сайтом»: kopilka answers 1C the way a site
//! does, so a shop connects it from 1C's own settings with no 1C programming.
//!
//! What a stock 1C really does on this channel (`../shared/specs/onec-stock-channels.md`, read
//! from the site-exchange code of УТ 11.5, Розница 2.2 and УНФ 3.0):
//! - it uploads (`type=sale`, `mode=file`) only the orders that came from a site and their
//!   status — never till receipts; those reach kopilka over OData (or Розница's «Дисконтный
//!   сервер»). A paid or shipped order becomes a sale per `[onec] orders`.
//! - from a `mode=query` reply it imports only «Заказ товара»; any other document aborts its
//!   whole load and `success` never comes. So `query` answers an empty
//!   `КоммерческаяИнформация` unless the shop explicitly set `[accounting] postback =
//!   "commerceml"` (which needs a 1C extension, see the README).
//! - every run starts with a test `checkauth` (`type=catalog`), then `checkauth → query →
//!   success` (no `init`), then `checkauth → init → file… → import…`: about three sessions per
//!   run, every few minutes, for years, and nobody ever logs out. So a session is "in
//!   progress" only while it has work (an upload not yet imported, an import running, a
//!   `query` waiting for `success`); `max_sessions` bounds those, finished and idle sessions
//!   never block a `checkauth`, and a session silent longer than 1C's own HTTP timeout cannot
//!   have a live client.
//!
//! Uploaded files land in a folder per session and go through the same importer as `kopilka
//! import` (archives are read in place, never unpacked to disk). A file is imported once,
//! when it is complete (its closing tag or its zip directory arrived — УНФ sends `file` with
//! no `import`) or when 1C calls `import`, whichever comes first. An imported file is deleted;
//! one that fails moves to `rejected/` with a `.reason` file, bounded by age and size. A
//! session's folder goes when its work ends; a crash leaves none behind after the next start.

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
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::import::{ImportError, ImportSettings, import_path};
use super::retention;
use crate::clock::Clock;
use crate::config::{Config, SiteExchangeConfig};
use crate::ledger::SharedLedger;

pub const COOKIE_NAME: &str = "kopilka_exchange";
/// 1C's own HTTP timeout for the exchange connection (UT `OS:5943-5950`, RT `OS:5819-5826`):
/// a session silent longer than this while it holds work has no client waiting on it.
const ONEC_HTTP_TIMEOUT: chrono::Duration = chrono::Duration::seconds(180);
/// How long one `import` call waits for the work before answering `progress`.
const IMPORT_WAIT: Duration = Duration::from_secs(20);
/// Longest file name kept.
const MAX_FILE_NAME_CHARS: usize = 200;
/// Sessions remembered at most, finished ones included (each is a few hundred bytes); the
/// least recently seen finished session is forgotten first.
const MAX_SESSIONS_REMEMBERED: usize = 256;
/// Bytes read from a file's end to tell whether it is complete.
const TAIL_BYTES: u64 = 512;

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    #[serde(rename = "type")]
    kind: Option<String>,
    mode: Option<String>,
    filename: Option<String>,
    sessid: Option<String>,
}

#[derive(Clone, Debug)]
enum FileState {
    /// Bytes are arriving in the session's folder.
    Uploading,
    /// A chunk was refused (over a limit): the rest of the file is refused too.
    Refused(String),
    Importing,
    Done(Result<String, String>),
}

struct Session {
    sessid: String,
    /// Once 1C sent a non-empty sessid, every later call must carry it.
    sessid_required: bool,
    dir: PathBuf,
    last_seen: DateTime<Utc>,
    uploaded_bytes: u64,
    files: HashMap<String, FileState>,
    /// Outbox rows the last `query` sent, delivered on `success`.
    sent: Vec<i64>,
}

impl Session {
    /// Work in progress: what `max_sessions` bounds.
    fn busy(&self) -> bool {
        !self.sent.is_empty()
            || self
                .files
                .values()
                .any(|f| matches!(f, FileState::Uploading | FileState::Importing))
    }
}

/// What the endpoint has seen, for `/status` and the soak test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    pub checkauth_accepted: u64,
    pub checkauth_refused: u64,
    pub files_imported: u64,
    pub files_rejected: u64,
    /// The most sessions remembered at once, and the most in progress at once.
    pub max_sessions_seen: usize,
    pub max_busy_seen: usize,
}

/// The exchange endpoint's state.
pub struct SiteExchange {
    cfg: Arc<Config>,
    se: SiteExchangeConfig,
    ledger: SharedLedger,
    clock: Arc<dyn Clock>,
    root: PathBuf,
    sessions: Mutex<HashMap<String, Session>>,
    stats: Mutex<ExchangeStats>,
    /// Woken whenever an import finishes, for the calls waiting on one.
    finished: tokio::sync::Notify,
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

/// Whether an uploaded file is whole: an XML whose root element has closed (in UTF-8 or
/// windows-1251, the encodings 1C writes), or a zip whose central directory is readable.
/// Reads only the file's end, so checking after every chunk stays O(chunk).
pub fn looks_complete(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 2];
    if f.read_exact(&mut magic).is_ok() && magic == *b"PK" {
        let Ok(f) = std::fs::File::open(path) else {
            return false;
        };
        return zip::ZipArchive::new(std::io::BufReader::new(f)).is_ok();
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut tail = Vec::with_capacity(TAIL_BYTES as usize);
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut tail).is_err() {
        return false;
    }
    while tail.last().is_some_and(|b| b.is_ascii_whitespace() || *b == 0) {
        tail.pop();
    }
    const ROOT: &str = "КоммерческаяИнформация>";
    let utf8 = ROOT.as_bytes();
    let cp1251 = encoding_rs::WINDOWS_1251.encode(ROOT).0;
    [utf8, &cp1251[..]].iter().any(|root| {
        tail.ends_with(root) && {
            let before = &tail[..tail.len() - root.len()];
            before.ends_with(b"</") || before.ends_with(b":")
        }
    })
}

/// CommerceML files and archives; anything else 1C uploads (pictures) is not kopilka's.
fn importable(name: &str) -> bool {
    let lower = name.to_lowercase();
    lower.ends_with(".xml") || lower.ends_with(".zip")
}

/// The `.xml` entries of an archive, for 1C's `import` that names the XML inside a zip it
/// uploaded under another name (UT `OS:6083`, `6198`).
fn zip_xml_names(path: &Path) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(archive) = zip::ZipArchive::new(std::io::BufReader::new(f)) else {
        return Vec::new();
    };
    archive
        .file_names()
        .filter(|n| n.to_lowercase().ends_with(".xml"))
        .filter_map(sanitize_file_name)
        .collect()
}

impl SiteExchange {
    /// `root` is the folder sessions upload into (under the exchange folder). Session
    /// folders a previous process left (a crash, a kill) are removed here: their uploads were
    /// never confirmed to 1C, which sends them again.
    pub fn new(
        cfg: Arc<Config>,
        ledger: SharedLedger,
        clock: Arc<dyn Clock>,
        root: PathBuf,
    ) -> Option<Arc<Self>> {
        let se = cfg.onec.as_ref()?.site_exchange.clone()?;
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name() != "rejected" && e.path().is_dir() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Some(Arc::new(SiteExchange {
            cfg,
            se,
            ledger,
            clock,
            root,
            sessions: Mutex::new(HashMap::new()),
            stats: Mutex::new(ExchangeStats::default()),
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

    pub fn stats(&self) -> ExchangeStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions remembered and sessions in progress now.
    pub fn session_counts(&self) -> (usize, usize) {
        let s = self.sessions();
        (s.len(), s.values().filter(|s| s.busy()).count())
    }

    /// Where failed files go, with their reasons.
    pub fn rejected_dir(&self) -> PathBuf {
        self.root.join("rejected")
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stat(&self, f: impl FnOnce(&mut ExchangeStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A text reply in the configured encoding, its charset said in `Content-Type` (1C
    /// decodes by that charset, UT `OS:6494`).
    fn text(&self, body: impl Into<String>) -> Response {
        let body: String = body.into();
        let (bytes, content_type) = if self.se.reply_windows_1251 {
            (
                encoding_rs::WINDOWS_1251.encode(&body).0.into_owned(),
                "text/plain; charset=windows-1251",
            )
        } else {
            (body.into_bytes(), "text/plain; charset=utf-8")
        };
        let mut r = bytes.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    }

    fn failure(&self, reason: &str) -> Response {
        self.text(format!("failure\n{reason}\n"))
    }

    fn check_basic(&self, headers: &HeaderMap) -> bool {
        let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.se.password.matches_basic(&self.se.user, header)
    }

    /// Forgets sessions idle past the timeout, then (when `busy_room` is asked for) sessions
    /// in progress that have been silent longer than 1C's HTTP timeout, oldest first, and
    /// finished sessions past the memory bound. What a forgotten session still held is
    /// finished off in the background.
    fn sweep(self: &Arc<Self>, now: DateTime<Utc>, busy_room: bool) {
        let mut gone = Vec::new();
        {
            let mut sessions = self.sessions();
            let idle = self.se.session_idle;
            let expired: Vec<String> = sessions
                .iter()
                .filter(|(_, s)| s.last_seen + idle <= now)
                .map(|(k, _)| k.clone())
                .collect();
            gone.extend(expired.into_iter().filter_map(|k| sessions.remove(&k)));
            if busy_room {
                let mut stale: Vec<(DateTime<Utc>, String)> = sessions
                    .iter()
                    .filter(|(_, s)| s.busy() && s.last_seen + ONEC_HTTP_TIMEOUT <= now)
                    .map(|(k, s)| (s.last_seen, k.clone()))
                    .collect();
                stale.sort();
                let busy = sessions.values().filter(|s| s.busy()).count();
                let over = (busy + 1).saturating_sub(self.se.max_sessions);
                gone.extend(
                    stale
                        .into_iter()
                        .take(over)
                        .filter_map(|(_, k)| sessions.remove(&k)),
                );
            }
            if sessions.len() >= MAX_SESSIONS_REMEMBERED {
                let mut idle: Vec<(DateTime<Utc>, String)> = sessions
                    .iter()
                    .filter(|(_, s)| !s.busy())
                    .map(|(k, s)| (s.last_seen, k.clone()))
                    .collect();
                idle.sort();
                let over = sessions.len() + 1 - MAX_SESSIONS_REMEMBERED;
                gone.extend(
                    idle.into_iter()
                        .take(over)
                        .filter_map(|(_, k)| sessions.remove(&k)),
                );
            }
        }
        for s in gone {
            let uploads: Vec<String> = s
                .files
                .iter()
                .filter(|(_, f)| matches!(f, FileState::Uploading))
                .map(|(n, _)| n.clone())
                .collect();
            if uploads.is_empty() {
                let _ = std::fs::remove_dir_all(&s.dir);
                continue;
            }
            // a run 1C abandoned: whole documents it did send are kept (re-reading them later
            // changes nothing), the rest is rejected with its reason
            tracing::warn!(files = ?uploads, "1C abandoned an exchange session; importing what it sent");
            let me = self.clone();
            tokio::spawn(async move {
                for name in uploads {
                    let _ = me.import_file(&s.dir, &name).await;
                }
                let _ = std::fs::remove_dir_all(&s.dir);
            });
        }
    }

    fn checkauth(self: &Arc<Self>, headers: &HeaderMap) -> Response {
        if !self.check_basic(headers) {
            tracing::warn!("1C site exchange: wrong login or password");
            let mut r = self.failure("неверный логин или пароль (wrong login or password)");
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kopilka\""),
            );
            return r;
        }
        let now = self.clock.now();
        self.sweep(now, true);
        let mut sessions = self.sessions();
        let busy = sessions.values().filter(|s| s.busy()).count();
        if busy >= self.se.max_sessions {
            drop(sessions);
            self.stat(|s| s.checkauth_refused += 1);
            tracing::warn!(
                busy,
                "1C site exchange: every session slot holds work in progress"
            );
            return self.failure(
                "все сессии обмена заняты, повторите позже (every exchange session is busy, try later)",
            );
        }
        let value = uuid::Uuid::new_v4().simple().to_string();
        let sessid = uuid::Uuid::new_v4().simple().to_string();
        sessions.insert(
            value.clone(),
            Session {
                sessid: sessid.clone(),
                sessid_required: false,
                dir: self.root.join(&value),
                last_seen: now,
                uploaded_bytes: 0,
                files: HashMap::new(),
                sent: Vec::new(),
            },
        );
        let total = sessions.len();
        drop(sessions);
        self.stat(|s| {
            s.checkauth_accepted += 1;
            s.max_sessions_seen = s.max_sessions_seen.max(total);
        });
        self.text(format!("success\n{COOKIE_NAME}\n{value}\nsessid={sessid}\n"))
    }

    /// The session of a call, checked; `Err` is the reason for the `failure` reply. УТ sends
    /// `sessid` on every call (empty after a three-line `checkauth`), Розница 2.2 never does.
    fn session(&self, headers: &HeaderMap, params: &Params) -> Result<String, &'static str> {
        let Some(c) = cookie(headers) else {
            return Err("нет сессии: сначала mode=checkauth (no session: call mode=checkauth first)");
        };
        let now = self.clock.now();
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(&c) else {
            return Err("сессия неизвестна или истекла: mode=checkauth (unknown or expired session)");
        };
        match params.sessid.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            Some(given) if given != s.sessid => return Err("неверный sessid (wrong sessid)"),
            Some(_) => s.sessid_required = true,
            None if s.sessid_required => return Err("нужен sessid (sessid required)"),
            None => {}
        }
        s.last_seen = now;
        Ok(c)
    }

    /// Exactly two lines: УТ and Розница refuse any other count (UT `OS:6053-6081`).
    fn init(&self) -> Response {
        self.text(format!(
            "zip={}\nfile_limit={}\n",
            if self.se.zip { "yes" } else { "no" },
            self.se.file_limit_bytes
        ))
    }

    fn file(self: &Arc<Self>, session: &str, params: &Params, body: &Bytes) -> Response {
        let Some(name) = params.filename.as_deref().and_then(sanitize_file_name) else {
            return self.failure("недопустимое имя файла (bad file name)");
        };
        if !importable(&name) {
            // a catalog upload carries product pictures too: accepted, never stored
            return self.text("success\n");
        }
        let (path, dir) = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(session) else {
                return self.failure("сессия истекла (session expired)");
            };
            let path = s.dir.join(&name);
            match s.files.get(&name) {
                Some(FileState::Refused(reason)) => {
                    let reason = reason.clone();
                    drop(sessions);
                    return self.failure(&reason);
                }
                Some(FileState::Importing) => {
                    drop(sessions);
                    return self.failure("файл ещё загружается в учёт (the file is being imported)");
                }
                // the same name again after its import: a new file
                Some(FileState::Done(_)) | None => {
                    let _ = std::fs::remove_file(&path);
                }
                Some(FileState::Uploading) => {}
            }
            let total = s.uploaded_bytes.saturating_add(body.len() as u64);
            if total > self.se.max_upload_bytes {
                let reason = format!(
                    "превышен объём загрузки {} байт (upload limit exceeded): файл {name} отклонён",
                    self.se.max_upload_bytes
                );
                s.files.insert(name.clone(), FileState::Refused(reason.clone()));
                let _ = std::fs::remove_file(&path);
                drop(sessions);
                tracing::warn!(file = %name, "1C site exchange: upload over the limit refused");
                return self.failure(&reason);
            }
            let written = std::fs::create_dir_all(&s.dir).and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, body))
            });
            if let Err(e) = written {
                drop(sessions);
                tracing::error!(error = %e, file = %path.display(), "Cannot store an uploaded exchange file");
                return self.failure("не удалось сохранить файл (cannot store the file)");
            }
            s.uploaded_bytes = total;
            s.files.insert(name.clone(), FileState::Uploading);
            (path, s.dir.clone())
        };
        if looks_complete(&path) {
            self.start_import(session, &dir, &name);
        }
        self.text("success\n")
    }

    /// Marks a file (and, for an archive, the XML files inside it) as importing and imports
    /// it in the background; the `import` calls wait for it.
    fn start_import(self: &Arc<Self>, session: &str, dir: &Path, name: &str) {
        let inner = zip_xml_names(&dir.join(name));
        {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(session) else {
                return;
            };
            if !matches!(s.files.get(name), Some(FileState::Uploading)) {
                return;
            }
            s.files.insert(name.to_string(), FileState::Importing);
            for n in &inner {
                s.files.insert(n.clone(), FileState::Importing);
            }
        }
        let me = self.clone();
        let session = session.to_string();
        let dir = dir.to_path_buf();
        let name = name.to_string();
        tokio::spawn(async move {
            let result = me.import_file(&dir, &name).await;
            let finished = {
                let mut sessions = me.sessions();
                match sessions.get_mut(&session) {
                    Some(s) => {
                        s.files.insert(name.clone(), FileState::Done(result.clone()));
                        for n in &inner {
                            s.files.insert(n.clone(), FileState::Done(result.clone()));
                        }
                        !s.busy()
                    }
                    None => true,
                }
            };
            if finished {
                // the session's work is done: nothing of it stays on disk
                let _ = std::fs::remove_dir_all(&dir);
            }
            me.finished.notify_waiters();
        });
    }

    /// Imports one uploaded file; deletes it when done, moves it to `rejected/` with its
    /// reason when it cannot be read or ended early.
    async fn import_file(&self, dir: &Path, name: &str) -> Result<String, String> {
        let path = dir.join(name);
        let cfg = self.cfg.clone();
        let now = self.clock.now();
        let p = path.clone();
        let result = self
            .ledger
            .run(move |l| {
                let settings = ImportSettings::from_config(&cfg);
                import_path(l, &p, &settings, &cfg, now)
            })
            .await;
        let outcome = match result {
            Ok(r) if r.truncated.is_none() => Ok(format!(
                "{}: {} документов, {} применено, {} в карантине",
                r.file,
                r.documents,
                r.applied + r.new_versions + r.voided,
                r.quarantined
            )),
            Ok(r) => Err(format!(
                "файл {} неполон (file ended early), прочитано документов: {}: {}",
                r.file,
                r.documents,
                r.truncated.unwrap_or_default()
            )),
            Err(ImportError::Unreadable(reason)) => Err(reason),
            Err(e) => {
                tracing::error!(file = %name, error = %e, "1C site exchange import failed");
                Err(e.to_string())
            }
        };
        match &outcome {
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                self.stat(|s| s.files_imported += 1);
            }
            Err(reason) => {
                tracing::error!(file = %name, reason = %reason, "1C site exchange: file rejected");
                self.stat(|s| s.files_rejected += 1);
                let rejected = self.rejected_dir();
                if let Err(e) = retention::reject(&path, &rejected, reason, now) {
                    tracing::error!(error = %e, file = %path.display(), "Cannot move a failed exchange file to rejected/");
                    let _ = std::fs::remove_file(&path);
                }
                let keep = self.cfg.onec.as_ref().map(|o| o.keep.clone()).unwrap_or_default();
                retention::prune(&rejected, &keep, now);
            }
        }
        outcome
    }

    async fn import(self: &Arc<Self>, session: &str, params: &Params) -> Response {
        let Some(name) = params.filename.as_deref().and_then(sanitize_file_name) else {
            return self.failure("недопустимое имя файла (bad file name)");
        };
        // 1C calls `import` only after its uploads: a file still "uploading" is complete
        // now, and the XML it names may be inside an archive uploaded under another name
        let (dir, to_start) = {
            let sessions = self.sessions();
            let Some(s) = sessions.get(session) else {
                drop(sessions);
                return self.failure("сессия истекла (session expired)");
            };
            let uploading: Vec<String> = s
                .files
                .iter()
                .filter(|(n, f)| {
                    matches!(f, FileState::Uploading) && (**n == name || !s.files.contains_key(&name))
                })
                .map(|(n, _)| n.clone())
                .collect();
            (s.dir.clone(), uploading)
        };
        for n in &to_start {
            self.start_import(session, &dir, n);
        }
        let deadline = tokio::time::Instant::now() + IMPORT_WAIT;
        loop {
            // registered before the state is read, so a completion in between is not missed
            let finished = self.finished.notified();
            let state = self.sessions().get(session).map(|s| s.files.get(&name).cloned());
            match state {
                None => return self.failure("сессия истекла (session expired)"),
                Some(None) => {
                    return self.failure(&format!("файл {name} не загружен (file {name} was not uploaded)"));
                }
                Some(Some(FileState::Done(Ok(summary)))) => {
                    return self.text(format!("success\n{summary}\n"));
                }
                Some(Some(FileState::Done(Err(reason)) | FileState::Refused(reason))) => {
                    return self.failure(&reason);
                }
                Some(Some(FileState::Importing | FileState::Uploading)) => {
                    if tokio::time::timeout_at(deadline, finished).await.is_err() {
                        return self.text("progress\nимпорт продолжается (import in progress)\n");
                    }
                }
            }
        }
    }

    /// `type=sale&mode=query`: by default an empty `КоммерческаяИнформация` — a stock 1C
    /// imports only «Заказ товара» from it and aborts on anything else (UT `OS:4205-4217`).
    /// With `[accounting] postback = "commerceml"` (a 1C extension takes them) the bonus
    /// documents and postings waiting for 1C, remembered for the session and marked delivered
    /// when 1C confirms with `mode=success`; without the confirmation they are sent again
    /// next time, with the same `Ид`.
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

    /// `type=sale&mode=success`: 1C took what the last `query` sent; the session's work ends.
    async fn success(self: &Arc<Self>, session: &str) -> Response {
        let (sent, dir) = {
            let mut sessions = self.sessions();
            match sessions.get_mut(session) {
                Some(s) => (std::mem::take(&mut s.sent), (!s.busy()).then(|| s.dir.clone())),
                None => (Vec::new(), None),
            }
        };
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if sent.is_empty() {
            return self.text("success\n");
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
                self.text("success\n")
            }
            Err(e) => self.failure(&format!("не удалось отметить доставку: {e}")),
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
        return ex.failure("type должен быть catalog или sale (type must be catalog or sale)");
    }
    if mode == "checkauth" {
        return ex.checkauth(&headers);
    }
    let session = match ex.session(&headers, &params) {
        Ok(s) => s,
        Err(reason) => return ex.failure(reason),
    };
    match mode {
        "init" => ex.init(),
        "file" => ex.file(&session, &params, &body),
        "import" => ex.import(&session, &params).await,
        "query" if kind == "sale" => ex.query(&session).await,
        "success" if kind == "sale" => ex.success(&session).await,
        "complete" | "deactivate" => ex.text("success\n"),
        other => ex.failure(&format!("неизвестный режим {other:?} (unknown mode)")),
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

    #[test]
    fn a_file_is_complete_when_its_root_closes_in_either_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let check = |bytes: &[u8], expected: bool| {
            let p = dir.path().join("f.xml");
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(
                looks_complete(&p),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        };
        check(
            "<?xml version=\"1.0\"?><КоммерческаяИнформация><Документ/>".as_bytes(),
            false,
        );
        check(
            "<?xml version=\"1.0\"?><КоммерческаяИнформация></КоммерческаяИнформация>\r\n".as_bytes(),
            true,
        );
        check(
            "<a:КоммерческаяИнформация></a:КоммерческаяИнформация>".as_bytes(),
            true,
        );
        check(
            &encoding_rs::WINDOWS_1251
                .encode("<?xml version=\"1.0\" encoding=\"windows-1251\"?><КоммерческаяИнформация></КоммерческаяИнформация>\n")
                .0,
            true,
        );
        check(b"", false);
        // a zip is complete once its central directory arrived
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            z.start_file("orders.xml", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut z, b"<x/>").unwrap();
            z.finish().unwrap();
        }
        let whole = buf.into_inner();
        check(&whole, true);
        check(&whole[..whole.len() - 10], false);
    }
}
