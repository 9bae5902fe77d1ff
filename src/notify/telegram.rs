//! The Telegram channel (issue 21): a Bot API client (reqwest), the self-service bot's loop
//! and the two ways messages leave — answers to members ([`ReplySink`], destination
//! `telegram:reply`) and messages kopilka starts ([`Telegram`], a [`Transport`] behind
//! [`super::NotifySink`], destination `notify:telegram`).
//!
//! Updates are read by long polling (`getUpdates`); the offset lives in the ledger and moves
//! in the transaction that answers the update (`Ledger::telegram_answer`), so a restart
//! neither loses nor repeats one. The token is part of every URL: no URL is ever logged or
//! put into an error (reqwest's errors are stripped of it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Outgoing, Transport};
use crate::config::TelegramConfig;
use crate::core::clock::Clock;
use crate::core::notify::Channel;
use crate::ledger::{
    Address, BotSettings, ChatMessage, DeliveryError, OutboxRow, SharedLedger, Sink, TELEGRAM_REPLIES,
    TelegramReply,
};

/// Updates one `getUpdates` returns at most (the API's own maximum).
const UPDATES_PER_CALL: i64 = 100;
/// A call other than a long poll waits this long for Telegram's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A long poll is given this much beyond its own timeout before the request counts as lost.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// Upstream text kept in an error.
const EXCERPT_CHARS: usize = 200;

/// What went wrong talking to Telegram, by what the caller must do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401 (or 404 for the bot's URL): the token is wrong or revoked; a person must act.
    #[error("telegram refused the bot token ({0}): check [notify.telegram] token_file")]
    Unauthorized(u16),
    /// 403 on a chat: the member blocked the bot (or deleted their account).
    #[error("the member blocked the bot")]
    Blocked,
    /// 429: flood control; nothing may be sent before the seconds pass.
    #[error("telegram asks to wait {0} s (429)")]
    Wait(u64),
    /// 409: a webhook is set or another program polls this bot.
    #[error("telegram: {0} (a webhook is set or another program reads this bot's updates)")]
    Conflict(String),
    /// Other 4xx: this request can never succeed as it is.
    #[error("telegram refused the request ({code}): {description}")]
    Refused { code: u16, description: String },
    /// Network, timeouts, 5xx, an unreadable answer: try again later.
    #[error("telegram unreachable: {0}")]
    Transient(String),
}

impl ApiError {
    /// The outbox's reading of an error (the one place that classes them).
    pub fn delivery(&self, now: DateTime<Utc>) -> DeliveryError {
        match self {
            ApiError::Unauthorized(_) | ApiError::Conflict(_) => DeliveryError::Halt(self.to_string()),
            ApiError::Blocked => DeliveryError::Refused("the member blocked the bot".into()),
            // flood control is Telegram's "not now", not a failure: the row waits exactly as
            // long as asked and the wait is not counted against its attempts
            ApiError::Wait(s) => DeliveryError::Hold {
                until: now + chrono::Duration::seconds(i64::try_from(*s).unwrap_or(i64::MAX).min(86_400)),
                reason: format!("telegram asked to wait {s} s (429)"),
            },
            ApiError::Refused { .. } => DeliveryError::Permanent(self.to_string()),
            ApiError::Transient(_) => DeliveryError::Retriable(self.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    result: Value,
    error_code: Option<u16>,
    description: Option<String>,
    parameters: Option<ResponseParameters>,
}

#[derive(Deserialize)]
struct ResponseParameters {
    retry_after: Option<u64>,
}

#[derive(Deserialize)]
struct Update {
    update_id: i64,
    message: Option<WireMessage>,
}

#[derive(Deserialize)]
struct WireMessage {
    chat: Chat,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Chat {
    id: i64,
    #[serde(rename = "type")]
    kind: String,
}

/// The Bot API client. One per process: it remembers a 429's pause for every caller.
pub struct Api {
    http: reqwest::Client,
    /// `{api_url}/bot{token}`: never logged.
    base: String,
    poll_timeout: Duration,
    clock: Arc<dyn Clock>,
    paused_until: Mutex<Option<DateTime<Utc>>>,
}

impl Api {
    pub fn new(cfg: &TelegramConfig, clock: Arc<dyn Clock>) -> Result<Api, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("kopilka/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transient(format!("cannot build the http client: {}", e.without_url())))?;
        Ok(Api {
            http,
            base: format!("{}/bot{}", cfg.api_url.trim_end_matches('/'), cfg.token.expose()),
            poll_timeout: cfg.poll_timeout,
            clock,
            paused_until: Mutex::new(None),
        })
    }

    /// The configured long-poll timeout (`[notify.telegram] poll_timeout_seconds`).
    pub fn poll_timeout(&self) -> Duration {
        self.poll_timeout
    }

    fn paused(&self) -> Option<u64> {
        let now = self.clock.now();
        let until = (*self.paused_until.lock().unwrap_or_else(|e| e.into_inner()))?;
        (until > now).then(|| u64::try_from((until - now).num_seconds().max(1)).unwrap_or(1))
    }

    async fn call(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, ApiError> {
        if let Some(s) = self.paused() {
            return Err(ApiError::Wait(s));
        }
        let answer = self
            .http
            .post(format!("{}/{method}", self.base))
            .json(&params)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| ApiError::Transient(e.without_url().to_string()))?;
        let status = answer.status().as_u16();
        let body = answer
            .text()
            .await
            .map_err(|e| ApiError::Transient(e.without_url().to_string()))?;
        let envelope: Envelope = match serde_json::from_str(&body) {
            Ok(e) => e,
            Err(_) if status >= 500 || status == 429 => {
                return Err(ApiError::Transient(format!(
                    "{status}: {}",
                    crate::scrub::upstream_excerpt(&body, EXCERPT_CHARS)
                )));
            }
            Err(_) if status == 401 || status == 404 => return Err(ApiError::Unauthorized(status)),
            Err(e) => {
                return Err(ApiError::Transient(format!(
                    "{status}, unreadable answer ({e}): {}",
                    crate::scrub::upstream_excerpt(&body, EXCERPT_CHARS)
                )));
            }
        };
        if envelope.ok {
            return Ok(envelope.result);
        }
        let code = envelope.error_code.unwrap_or(status);
        let description =
            crate::scrub::upstream_excerpt(envelope.description.as_deref().unwrap_or(""), EXCERPT_CHARS);
        Err(match code {
            401 | 404 => ApiError::Unauthorized(code),
            403 => ApiError::Blocked,
            409 => ApiError::Conflict(description),
            429 => {
                let after = envelope.parameters.and_then(|p| p.retry_after).unwrap_or(5);
                let until = self.clock.now() + chrono::Duration::seconds(i64::try_from(after).unwrap_or(60));
                *self.paused_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
                ApiError::Wait(after)
            }
            c if c >= 500 => ApiError::Transient(format!("{c}: {description}")),
            c => ApiError::Refused { code: c, description },
        })
    }

    /// The bot's `@username`: `kopilka check` and the first run prove the token with it.
    pub async fn get_me(&self) -> Result<String, ApiError> {
        let me = self.call("getMe", json!({}), REQUEST_TIMEOUT).await?;
        Ok(me["username"].as_str().unwrap_or_default().to_string())
    }

    /// Updates from `offset` on; an offset past an update confirms it to Telegram.
    pub async fn get_updates(&self, offset: i64, timeout: Duration) -> Result<Vec<ChatMessage>, ApiError> {
        let mut params = json!({
            "timeout": timeout.as_secs(),
            "limit": UPDATES_PER_CALL,
            "allowed_updates": ["message"],
        });
        if offset > 0 {
            params["offset"] = json!(offset);
        }
        let result = self.call("getUpdates", params, timeout + POLL_GRACE).await?;
        let updates: Vec<Update> = serde_json::from_value(result)
            .map_err(|e| ApiError::Transient(format!("unreadable updates: {e}")))?;
        Ok(updates
            .into_iter()
            .map(|u| ChatMessage {
                update_id: u.update_id,
                chat_id: u.message.as_ref().map_or(0, |m| m.chat.id),
                private: u.message.as_ref().is_some_and(|m| m.chat.kind == "private"),
                text: u.message.and_then(|m| m.text),
            })
            .collect())
    }

    /// Plain text: no parse mode, so nothing in a member's data can be read as markup.
    pub async fn send_message(&self, chat_id: i64, text: &str) -> Result<(), ApiError> {
        self.call(
            "sendMessage",
            json!({"chat_id": chat_id, "text": text}),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|_| ())
    }
}

/// Sends one message and turns the answer into the outbox's terms; a block also stops the
/// chat in the ledger, so it is no address until the member writes again.
async fn deliver_one(api: &Api, ledger: &SharedLedger, chat: i64, text: &str) -> Result<(), DeliveryError> {
    match api.send_message(chat, text).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let now = api.clock.now();
            if e == ApiError::Blocked {
                let marked = ledger.run(move |l| l.telegram_chat_blocked(chat, now)).await;
                if let Err(err) = marked {
                    tracing::warn!(error = %err, "could not mark a blocked Telegram chat as stopped");
                }
            }
            Err(e.delivery(now))
        }
    }
}

/// Members' messages (`notify:telegram`) on Telegram.
pub struct Telegram {
    pub api: Arc<Api>,
    pub ledger: SharedLedger,
}

impl Transport for Telegram {
    fn channel(&self) -> Channel {
        Channel::Telegram
    }

    async fn send(&self, batch: &[Outgoing]) -> Vec<Result<(), DeliveryError>> {
        let mut out = Vec::with_capacity(batch.len());
        for o in batch {
            out.push(match o.address {
                Address::Telegram(chat) => deliver_one(&self.api, &self.ledger, chat, &o.message.text).await,
                _ => Err(DeliveryError::Permanent("not a Telegram chat".into())),
            });
        }
        out
    }
}

/// The bot's answers (`telegram:reply`), sent as they are: a member who asked is answered
/// at night too, and answers count against no cap.
pub struct ReplySink {
    pub api: Arc<Api>,
    pub ledger: SharedLedger,
}

impl Sink for ReplySink {
    fn destination(&self) -> &str {
        TELEGRAM_REPLIES
    }

    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(match serde_json::from_str::<TelegramReply>(&row.payload) {
                Err(e) => Err(DeliveryError::Permanent(format!("unreadable reply: {e}"))),
                Ok(r) if r.chat_id == 0 => Err(DeliveryError::Refused("the member was forgotten".into())),
                Ok(r) => deliver_one(&self.api, &self.ledger, r.chat_id, &r.text).await,
            });
        }
        out
    }
}

/// What one pass of the bot did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answered {
    pub updates: usize,
    pub replies: usize,
}

/// Reads the updates waiting (holding up to `timeout` for the first) and answers each in the
/// ledger; the answers go out with [`ReplySink`].
pub async fn answer_updates(
    api: &Api,
    ledger: &SharedLedger,
    settings: &BotSettings,
    timeout: Duration,
) -> anyhow::Result<Answered> {
    let offset = ledger.run(|l| l.telegram_offset()).await?;
    let updates = api.get_updates(offset, timeout).await?;
    let mut done = Answered::default();
    for u in updates {
        let s = settings.clone();
        let now = api.clock.now();
        let reply = ledger.run(move |l| l.telegram_answer(&u, &s, now)).await?;
        done.updates += 1;
        done.replies += usize::from(reply.is_some());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_answer_has_one_meaning_for_the_outbox() {
        let now = DateTime::from_timestamp(1_765_000_000, 0).unwrap_or_default();
        let check = |e: ApiError, expected: &str| {
            let got = match e.delivery(now) {
                DeliveryError::Halt(_) => "halt".to_string(),
                DeliveryError::Refused(r) => format!("refused: {r}"),
                DeliveryError::Hold { until, .. } => format!("hold {}", (until - now).num_seconds()),
                DeliveryError::Permanent(_) => "permanent".into(),
                DeliveryError::Retriable(_) => "retriable".into(),
            };
            assert_eq!(got, expected, "{e:?}");
        };
        check(ApiError::Unauthorized(401), "halt");
        check(ApiError::Conflict("Conflict".into()), "halt");
        check(ApiError::Blocked, "refused: the member blocked the bot");
        check(ApiError::Wait(7), "hold 7");
        check(
            ApiError::Refused {
                code: 400,
                description: "Bad Request: chat not found".into(),
            },
            "permanent",
        );
        check(ApiError::Transient("502".into()), "retriable");
    }
}
