//! A Telegram Bot API stand-in on loopback, written from the official documentation,
//! <https://core.telegram.org/bots/api> ("Making requests", "getUpdates", "sendMessage",
//! "Update", "Message", "ResponseParameters"), not from kopilka's client.
//!
//! It serves `getMe`, `getUpdates` and `sendMessage` at `/bot<token>/METHOD`, by GET or
//! POST, with parameters in the query string, `application/x-www-form-urlencoded` or
//! `application/json`, as the documentation allows. Every answer is the documented envelope:
//! `{"ok":true,"result":…}` or `{"ok":false,"error_code":…,"description":…}` with
//! `parameters.retry_after` on a 429.
//!
//! Updates follow the documentation's rules: identifiers increase by one; `getUpdates`
//! returns those from `offset` on (all unconfirmed ones without it), at most `limit` (1–100);
//! "an update is considered confirmed as soon as getUpdates is called with an offset higher
//! than its update_id" — confirmed updates are forgotten; `timeout` holds the call until an
//! update arrives or the seconds pass (long polling). Where the documentation is silent the
//! stand-in is stricter than Telegram is known to be: a bot may only write to a chat that
//! wrote to it first ("Bad Request: chat not found"), `text` must be 1–4096 characters, and
//! `parse_mode` must be one of the three documented modes.
//!
//! Test hooks: [`TelegramSim::user_says`] puts a member's text message in the queue,
//! [`TelegramSim::sent_to`] reads what the bot sent to a chat, [`TelegramSim::block`] makes a
//! chat refuse the bot as a user who blocked it does (403), [`TelegramSim::throttle_next`]
//! answers the next call with 429 and a `retry_after`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::core::clock::Clock;

/// Longest long poll the stand-in holds a call for (Telegram's own limit is not documented;
/// clients use up to 50 s).
const MAX_POLL_SECONDS: u64 = 50;
/// `sendMessage`'s documented limit on `text`.
const MAX_TEXT_CHARS: usize = 4096;

/// A message the bot sent, as the stand-in received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub message_id: i64,
    pub text: String,
    pub parse_mode: Option<String>,
}

struct State {
    token: String,
    clock: Arc<dyn Clock>,
    /// Unconfirmed updates, oldest first.
    queue: Vec<Value>,
    next_update: i64,
    next_message: i64,
    /// Chats that wrote to the bot (a bot cannot start a conversation).
    known: HashSet<i64>,
    blocked: HashSet<i64>,
    sent: BTreeMap<i64, Vec<Sent>>,
    /// `retry_after` seconds for the next call, once.
    throttle: Option<u64>,
    calls: HashMap<String, u64>,
}

/// A running stand-in; stops when dropped.
pub struct TelegramSim {
    /// `http://127.0.0.1:PORT`: the `api_url` of `[notify.telegram]`.
    pub base_url: String,
    state: Arc<Mutex<State>>,
    arrived: Arc<tokio::sync::Notify>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TelegramSim {
    pub async fn start(token: &str, clock: Arc<dyn Clock>) -> std::io::Result<TelegramSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            clock,
            queue: Vec::new(),
            // the documentation: identifiers "start from a certain positive number"
            next_update: 817_000_001,
            next_message: 1,
            known: HashSet::new(),
            blocked: HashSet::new(),
            sent: BTreeMap::new(),
            throttle: None,
            calls: HashMap::new(),
        }));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let app = Router::new().fallback({
            let state = state.clone();
            let arrived = arrived.clone();
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                let arrived = arrived.clone();
                async move { handle(state, arrived, uri, headers, body).await }
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(TelegramSim {
            base_url,
            state,
            arrived,
            _stop: tx,
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member writes `text` in their private chat with the bot (the user's id is the chat's,
    /// as in every private chat). Returns the update's id.
    pub fn user_says(&self, chat_id: i64, text: &str) -> i64 {
        let id = {
            let mut st = self.st();
            let id = st.next_update;
            st.next_update += 1;
            let message_id = st.next_message;
            st.next_message += 1;
            let date = st.clock.now().timestamp();
            let mut message = json!({
                "message_id": message_id,
                "from": {"id": chat_id, "is_bot": false, "first_name": "Участник", "language_code": "ru"},
                "chat": {"id": chat_id, "type": "private", "first_name": "Участник"},
                "date": date,
                "text": text,
            });
            if text.starts_with('/') {
                let length = text
                    .split_whitespace()
                    .next()
                    .map_or(0, |c| c.encode_utf16().count());
                message["entities"] = json!([{"type": "bot_command", "offset": 0, "length": length}]);
            }
            st.queue.push(json!({"update_id": id, "message": message}));
            st.known.insert(chat_id);
            id
        };
        self.arrived.notify_waiters();
        id
    }

    /// What the bot sent to the chat, oldest first.
    pub fn sent_to(&self, chat_id: i64) -> Vec<Sent> {
        self.st().sent.get(&chat_id).cloned().unwrap_or_default()
    }

    /// The texts the bot sent to the chat, oldest first.
    pub fn texts_to(&self, chat_id: i64) -> Vec<String> {
        self.sent_to(chat_id).into_iter().map(|s| s.text).collect()
    }

    /// The member blocks the bot: every `sendMessage` to the chat answers 403.
    pub fn block(&self, chat_id: i64) {
        self.st().blocked.insert(chat_id);
    }

    /// The next call (any method) answers 429 with this `retry_after`.
    pub fn throttle_next(&self, retry_after_seconds: u64) {
        self.st().throttle = Some(retry_after_seconds);
    }

    /// Calls received per method (refused ones included).
    pub fn calls(&self, method: &str) -> u64 {
        self.st().calls.get(method).copied().unwrap_or(0)
    }

    /// Updates not yet confirmed by an offset past them.
    pub fn unconfirmed(&self) -> usize {
        self.st().queue.len()
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn ok(result: Value) -> Response {
    reply(StatusCode::OK, json!({"ok": true, "result": result}))
}

fn error(code: u16, description: &str) -> Response {
    reply(
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        json!({"ok": false, "error_code": code, "description": description}),
    )
}

/// Parameters from the query string and the body, as the documentation's "Making requests"
/// lists the ways of passing them.
fn params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, Value>, String> {
    let mut out: HashMap<String, Value> = HashMap::new();
    let form = |text: &str, out: &mut HashMap<String, Value>| {
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            out.insert(decode(k), Value::String(decode(v)));
        }
    };
    if let Some(q) = uri.query() {
        form(q, &mut out);
    }
    if body.is_empty() {
        return Ok(out);
    }
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if kind.starts_with("application/json") {
        let v: Value =
            serde_json::from_slice(body).map_err(|_| "Bad Request: can't parse JSON object".to_string())?;
        let Value::Object(map) = v else {
            return Err("Bad Request: parameters must be a JSON object".into());
        };
        out.extend(map);
    } else if kind.starts_with("application/x-www-form-urlencoded") {
        form(&String::from_utf8_lossy(body), &mut out);
    } else {
        return Err("Bad Request: unsupported content type".into());
    }
    Ok(out)
}

/// An integer parameter given as a JSON number or as text (form and query values are text).
fn int(p: &HashMap<String, Value>, key: &str) -> Result<Option<i64>, String> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("Bad Request: field \"{key}\" must be an integer")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("Bad Request: field \"{key}\" must be an integer")),
        Some(_) => Err(format!("Bad Request: field \"{key}\" must be an integer")),
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    arrived: Arc<tokio::sync::Notify>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_start_matches('/');
    let Some((bot, method)) = path.split_once('/') else {
        return error(404, "Not Found");
    };
    let Some(token) = bot.strip_prefix("bot") else {
        return error(404, "Not Found");
    };
    {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        *st.calls.entry(method.to_string()).or_default() += 1;
        if token != st.token {
            return error(401, "Unauthorized");
        }
        if let Some(after) = st.throttle.take() {
            return reply(
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "ok": false,
                    "error_code": 429,
                    "description": format!("Too Many Requests: retry after {after}"),
                    "parameters": {"retry_after": after},
                }),
            );
        }
    }
    let p = match params(&uri, &headers, &body) {
        Ok(p) => p,
        Err(e) => return error(400, &e),
    };
    match method {
        "getMe" => ok(json!({
            "id": 7_000_000_001_i64,
            "is_bot": true,
            "first_name": "Бонусы",
            "username": "kopilka_test_bot",
            "can_join_groups": false,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
        })),
        "getUpdates" => get_updates(state, arrived, &p).await,
        "sendMessage" => send_message(&state, &p),
        _ => error(404, "Not Found"),
    }
}

async fn get_updates(
    state: Arc<Mutex<State>>,
    arrived: Arc<tokio::sync::Notify>,
    p: &HashMap<String, Value>,
) -> Response {
    let (offset, limit, timeout) = match (int(p, "offset"), int(p, "limit"), int(p, "timeout")) {
        (Ok(o), Ok(l), Ok(t)) => (o, l.unwrap_or(100), t.unwrap_or(0)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return error(400, &e),
    };
    // "Values between 1-100 are accepted"
    let limit = limit.clamp(1, 100) as usize;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(timeout.clamp(0, MAX_POLL_SECONDS as i64) as u64);
    loop {
        // register before looking, so an update arriving in between wakes this call
        let notified = arrived.notified();
        let found: Vec<Value> = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            match offset {
                Some(o) if o < 0 => {
                    // "-offset update from the end of the queue. All previous updates will be forgotten."
                    let keep = (-o) as usize;
                    let n = st.queue.len();
                    st.queue.drain(..n.saturating_sub(keep));
                }
                Some(o) => st.queue.retain(|u| u["update_id"].as_i64().unwrap_or(0) >= o),
                None => {}
            }
            st.queue.iter().take(limit).cloned().collect()
        };
        if !found.is_empty() {
            return ok(Value::Array(found));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return ok(json!([]));
        }
    }
}

fn send_message(state: &Mutex<State>, p: &HashMap<String, Value>) -> Response {
    let chat_id = match int(p, "chat_id") {
        Ok(Some(c)) => c,
        Ok(None) => return error(400, "Bad Request: chat_id is empty"),
        Err(_) => return error(400, "Bad Request: chat not found"),
    };
    let text = match p.get("text") {
        Some(Value::String(t)) => t.clone(),
        _ => return error(400, "Bad Request: message text is empty"),
    };
    if text.trim().is_empty() {
        return error(400, "Bad Request: message text is empty");
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return error(400, "Bad Request: message is too long");
    }
    let parse_mode = match p.get("parse_mode") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if ["HTML", "Markdown", "MarkdownV2"].contains(&m.as_str()) => Some(m.clone()),
        Some(m) => return error(400, &format!("Bad Request: unsupported parse_mode {m}")),
    };
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    if st.blocked.contains(&chat_id) {
        return error(403, "Forbidden: bot was blocked by the user");
    }
    if !st.known.contains(&chat_id) {
        return error(400, "Bad Request: chat not found");
    }
    let message_id = st.next_message;
    st.next_message += 1;
    let date = st.clock.now().timestamp();
    st.sent.entry(chat_id).or_default().push(Sent {
        message_id,
        text: text.clone(),
        parse_mode,
    });
    ok(json!({
        "message_id": message_id,
        "from": {"id": 7_000_000_001_i64, "is_bot": true, "first_name": "Бонусы", "username": "kopilka_test_bot"},
        "chat": {"id": chat_id, "type": "private", "first_name": "Участник"},
        "date": date,
        "text": text,
    }))
}
