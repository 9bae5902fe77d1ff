//! Everything that knows AmoCRM's API v4: authentication (`auth`), the HTTP client, its
//! pacer and its error classes (`client`, `limiter`, [`classify`]), the wire shapes
//! (`wire`), custom fields (`fields`), matching customers to contacts (`contacts`), the
//! outbox sinks for contact cards and notes (`sink`, `notes`), won deals as sales
//! (`deals`), and customer attributes read from contact fields (`attributes`).
//!
//! Nothing outside this folder sees AmoCRM JSON: deals become core `Document`s, contacts
//! become links in the ledger. See `../shared/specs/amocrm.md` for the API's behaviour this
//! code follows, and ARCHITECTURE.md for where it sits.

pub mod attributes;
pub mod auth;
pub mod client;
pub mod connector;
pub mod contacts;
pub mod deals;
pub mod fields;
pub mod limiter;
pub mod notes;
pub mod sink;
pub mod webhook;
pub mod wire;

pub use client::{Client, ClientOptions, ClientStats};
pub use connector::Connector;

use crate::ledger::{DeliveryError, LedgerError};

/// How a failed call must be treated. One function, [`classify`], decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Timeout, connection reset, 429, 5xx, a truncated body: try again later.
    Retriable,
    /// Validation, unknown field, 4xx: trying again cannot help; a person must look.
    Permanent,
    /// 401: the token was refused. Refresh once and repeat once; after that it is a halt.
    Unauthorized,
    /// An account block (403 that is not a rights problem), 402 account not paid, a
    /// refused token refresh: every AmoCRM call stops until a person acts.
    Halt,
}

/// Classifies an answer (or its absence). `status` is `None` when no answer came (timeout,
/// connection error); `json_body` says whether the body parsed as JSON; `after_429` whether
/// this account was answered 429 recently (a 403 right after 429s is the block, whatever
/// the body says).
pub fn classify(status: Option<u16>, json_body: bool, after_429: bool) -> Class {
    match status {
        None => Class::Retriable,
        Some(s) if (200..300).contains(&s) => {
            if json_body {
                Class::Permanent
            } else {
                // a 2xx whose body does not parse was cut off on the way
                Class::Retriable
            }
        }
        Some(401) => Class::Unauthorized,
        Some(402) => Class::Halt,
        Some(403) if !json_body || after_429 => Class::Halt,
        Some(403) => Class::Permanent,
        Some(408) | Some(425) | Some(429) => Class::Retriable,
        Some(s) if s >= 500 => Class::Retriable,
        Some(_) => Class::Permanent,
    }
}

/// One item of a validation-error answer, as a person reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemError {
    pub request_id: String,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AmoError {
    #[error("amocrm answered {status} to {method} {path} (x-request-id {request_id}): {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        request_id: String,
        /// The start of the body, for logs.
        body: String,
        json: bool,
        after_429: bool,
        /// Per-item validation errors, mapped back by `request_id`.
        items: Vec<ItemError>,
    },
    #[error("amocrm did not answer {method} {path} within {timeout_ms} ms")]
    Timeout {
        method: String,
        path: String,
        timeout_ms: u128,
    },
    #[error("cannot reach amocrm for {method} {path}: {detail}")]
    Transport {
        method: String,
        path: String,
        detail: String,
    },
    #[error("amocrm answered {method} {path} with a body that is not the expected JSON ({detail}): {body}")]
    Body {
        method: String,
        path: String,
        detail: String,
        body: String,
    },
    #[error("amocrm sync is halted: {0}")]
    Halted(String),
    #[error("amocrm: {0}")]
    Ledger(#[from] LedgerError),
    #[error("amocrm: {0}")]
    Setup(String),
}

impl AmoError {
    pub fn class(&self) -> Class {
        match self {
            AmoError::Status {
                status,
                json,
                after_429,
                ..
            } => classify(Some(*status), *json, *after_429),
            AmoError::Timeout { .. } | AmoError::Transport { .. } => classify(None, false, false),
            AmoError::Body { .. } => classify(Some(200), false, false),
            AmoError::Halted(_) => Class::Halt,
            AmoError::Ledger(_) => Class::Retriable,
            AmoError::Setup(_) => Class::Permanent,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            AmoError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The outbox's view of this error.
    pub fn to_delivery(&self) -> DeliveryError {
        let text = self.to_string();
        match self.class() {
            Class::Retriable => DeliveryError::Retriable(text),
            Class::Permanent => DeliveryError::Permanent(text),
            Class::Unauthorized | Class::Halt => DeliveryError::Halt(text),
        }
    }
}

/// The start of a body for a log line: at most `max_chars`, on a character boundary.
pub fn truncate(text: &str, max_chars: usize) -> String {
    let mut out: String = text.chars().take(max_chars).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Option<u16>, json: bool, after_429: bool, expected: Class) {
        assert_eq!(
            classify(status, json, after_429),
            expected,
            "status {status:?}, json {json}, after 429 {after_429}"
        );
    }

    #[test]
    fn every_answer_has_one_class() {
        check(None, false, false, Class::Retriable);
        check(Some(200), false, false, Class::Retriable);
        check(Some(429), false, false, Class::Retriable);
        check(Some(429), true, false, Class::Retriable);
        check(Some(500), true, false, Class::Retriable);
        check(Some(502), false, false, Class::Retriable);
        check(Some(504), false, false, Class::Retriable);
        check(Some(401), true, false, Class::Unauthorized);
        check(Some(402), true, false, Class::Halt);
        check(Some(403), false, false, Class::Halt);
        check(Some(403), true, true, Class::Halt);
        check(Some(403), true, false, Class::Permanent);
        check(Some(400), true, false, Class::Permanent);
        check(Some(404), false, false, Class::Permanent);
        check(Some(422), true, false, Class::Permanent);
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("привет", 3), "при…");
        assert_eq!(truncate("ok", 3), "ok");
    }
}
