//! The Telegram bot's memory (issue 21): one-time link codes, which chat is which member's,
//! and the offset of the updates already answered.
//!
//! Each member message is answered in one transaction: its effect (a link, a `/stop`), the
//! reply as an outbox row (`telegram:reply`, keyed by the update) and the new offset commit
//! together. A crash before the commit sees the update again and answers it once; after the
//! commit the reply is delivered from the outbox like any other row, retried if Telegram is
//! away. Replies go through their own destination because the members' message policy
//! (quiet hours, caps, consent) is for messages kopilka starts, not for answers a member
//! asked for a second ago.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::notify::{cursor, set_cursor, unsubscribe};
use super::{Ledger, LedgerError, Result, from_ts, ts};
use crate::core::bot::{self, Command, Figures, Movement};
use crate::core::notify::Channel;

/// The checkpoint holding the next `getUpdates` offset.
pub const UPDATES: &str = "telegram:updates";
/// The outbox destination of the bot's answers.
pub const REPLIES: &str = "telegram:reply";
/// What `unsubscribes.via` says for the bot's `/stop`.
pub const STOP_VIA: &str = "telegram /stop";

/// An answer waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub chat_id: i64,
    pub text: String,
    /// The answer to a wrong link code: the guesses of a chat are counted from these rows,
    /// so the limit survives a restart without a table of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed_link: bool,
}

/// A member's message as the bot needs it (the channel's wire is read before this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub update_id: i64,
    pub chat_id: i64,
    /// Only private chats are answered: a group would read one member's points.
    pub private: bool,
    /// `None` for a sticker, a photo, an edit: nothing to answer.
    pub text: Option<String>,
}

/// What the answers need from the configuration.
#[derive(Clone, Debug)]
pub struct BotSettings {
    pub timezone: Tz,
    pub warn_before: chrono::Duration,
    /// The shop's name in the greeting.
    pub shop: String,
}

/// What answering a message changes besides queuing the reply.
enum Effect {
    None,
    Link { code: String, customer: i64 },
    Stop(i64),
    Restart(i64),
}

fn reply_key(chat: i64, update: i64) -> String {
    format!("{REPLIES}:{chat}:{update}")
}

/// Wrong codes a chat sent within the window, from the answers it got.
fn failed_codes(conn: &Connection, chat: i64, now: DateTime<Utc>) -> Result<usize> {
    // the unique index on idem_key serves the range of this chat's keys
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM outbox WHERE idem_key >= ?1 AND idem_key < ?2 AND created_at > ?3 \
             AND json_extract(payload, '$.failed_link') = 1",
        )?
        .query_row(
            params![
                format!("{REPLIES}:{chat}:"),
                format!("{REPLIES}:{chat};"),
                ts(now - bot::FAILED_CODES_WINDOW)
            ],
            |r| r.get(0),
        )?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl Ledger {
    /// The next update to ask Telegram for (0: from the first one it holds).
    pub fn telegram_offset(&self) -> Result<i64> {
        cursor(&self.conn, UPDATES)
    }

    /// The member's unused link code, or a new one. Codes do not lapse: the one `balance`
    /// showed last week still links; once used it is gone and the next call makes another.
    pub fn telegram_link_code(&mut self, customer: i64, now: DateTime<Utc>) -> Result<String> {
        let exists: Option<i64> = self
            .conn
            .query_row("SELECT id FROM customers WHERE id = ?1", [customer], |r| r.get(0))
            .optional()?;
        if exists.is_none() {
            return Err(LedgerError::UnknownCustomer(format!("id:{customer}")));
        }
        let open: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT code FROM link_codes WHERE customer_id = ?1 AND used_at IS NULL \
                 ORDER BY issued_at DESC, code LIMIT 1",
            )?
            .query_row([customer], |r| r.get(0))
            .optional()?;
        if let Some(code) = open {
            return Ok(code);
        }
        // uuid v4 draws its bytes from the operating system's generator: a code is a secret
        for _ in 0..16 {
            let Some(code) = bot::link_code_from(uuid::Uuid::new_v4().as_bytes()) else {
                continue;
            };
            let inserted = self.conn.execute(
                "INSERT OR IGNORE INTO link_codes (code, customer_id, issued_at) VALUES (?1, ?2, ?3)",
                params![code, customer, ts(now)],
            )?;
            if inserted == 1 {
                return Ok(code);
            }
        }
        Err(LedgerError::Refused("no free link code found; try again".into()))
    }

    /// The member a chat is linked to, and whether the chat is stopped.
    pub fn telegram_chat(&self, chat: i64) -> Result<Option<(i64, bool)>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT customer_id, stopped_at IS NOT NULL FROM telegram_chats WHERE chat_id = ?1",
            )?
            .query_row([chat], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    /// The member blocked the bot: the chat is no address until they write again.
    pub fn telegram_chat_blocked(&mut self, chat: i64, now: DateTime<Utc>) -> Result<()> {
        self.conn.execute(
            "UPDATE telegram_chats SET stopped_at = ?2 WHERE chat_id = ?1 AND stopped_at IS NULL",
            params![chat, ts(now)],
        )?;
        Ok(())
    }

    /// Answers one message: its effect, the reply row and the offset past it, in one
    /// transaction. Returns the reply's outbox id; `None` when the update was answered before
    /// or needs no answer.
    pub fn telegram_answer(
        &mut self,
        m: &ChatMessage,
        s: &BotSettings,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>> {
        if m.update_id < self.telegram_offset()? {
            return Ok(None);
        }
        let chat = self.telegram_chat(m.chat_id)?;
        let command = m.text.as_deref().filter(|_| m.private).map(bot::parse);
        let mut failed_link = false;
        let (text, effect) = match (command, chat) {
            (None, _) => (None, Effect::None),
            (Some(Command::Start), None) => (Some(bot::greeting(&s.shop)), Effect::None),
            (Some(Command::Start), Some((customer, stopped))) => {
                if stopped || self.telegram_unsubscribed(customer)? {
                    (Some(bot::restarted()), Effect::Restart(customer))
                } else {
                    (Some(bot::already_linked()), Effect::None)
                }
            }
            (Some(Command::Link(code)), _) => {
                let failures = failed_codes(&self.conn, m.chat_id, now)?;
                if failures >= bot::MAX_FAILED_CODES {
                    (Some(bot::too_many_codes()), Effect::None)
                } else {
                    let found: Option<(i64, Option<i64>, Option<i64>)> = self
                        .conn
                        .prepare_cached(
                            "SELECT customer_id, used_at, chat_id FROM link_codes WHERE code = ?1",
                        )?
                        .query_row([&code], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()?;
                    match found {
                        None => {
                            failed_link = true;
                            let left = bot::MAX_FAILED_CODES - failures - 1;
                            (Some(bot::code_unknown(left)), Effect::None)
                        }
                        Some((customer, Some(_), used_by))
                            if used_by == Some(m.chat_id) && chat.map(|c| c.0) == Some(customer) =>
                        {
                            (Some(bot::already_linked()), Effect::None)
                        }
                        Some((_, Some(_), _)) => (Some(bot::code_used()), Effect::None),
                        Some((customer, None, _)) => {
                            let available = self.balance_of(customer, now, s.warn_before)?.available;
                            (Some(bot::linked(available)), Effect::Link { code, customer })
                        }
                    }
                }
            }
            (Some(Command::BadCode), _) => (Some(bot::bad_code()), Effect::None),
            (Some(Command::Help), chat) => (Some(bot::help(chat.is_some())), Effect::None),
            (Some(_), None) => (Some(bot::link_first()), Effect::None),
            (Some(Command::Stop), Some((customer, _))) => (Some(bot::stopped()), Effect::Stop(customer)),
            (Some(Command::Balance), Some((customer, _))) => (
                Some(bot::balance(&self.telegram_figures(customer, s, now)?)),
                Effect::None,
            ),
            (Some(Command::Expiring), Some((customer, _))) => (
                Some(bot::expiring(&self.telegram_figures(customer, s, now)?)),
                Effect::None,
            ),
            (Some(Command::History), Some((customer, _))) => (
                Some(bot::history(&self.telegram_movements(customer, s)?)),
                Effect::None,
            ),
            (Some(Command::Friend), Some((customer, _))) => (
                Some(bot::friend(self.referral_code(customer)?.as_deref())),
                Effect::None,
            ),
        };

        let tx = self.conn.transaction()?;
        if m.update_id < cursor(&tx, UPDATES)? {
            return Ok(None);
        }
        match effect {
            Effect::None => {}
            Effect::Link { code, customer } => {
                let taken = tx.execute(
                    "UPDATE link_codes SET used_at = ?2, chat_id = ?3 WHERE code = ?1 AND used_at IS NULL",
                    params![code, ts(now), m.chat_id],
                )?;
                if taken != 1 {
                    return Err(LedgerError::Refused(format!(
                        "link code {code} was used meanwhile"
                    )));
                }
                // a chat belongs to the member whose code it sent last
                tx.execute(
                    "INSERT INTO telegram_chats (chat_id, customer_id, linked_at, stopped_at) VALUES (?1, ?2, ?3, NULL) \
                     ON CONFLICT (chat_id) DO UPDATE SET customer_id = excluded.customer_id, \
                     linked_at = excluded.linked_at, stopped_at = NULL",
                    params![m.chat_id, customer, ts(now)],
                )?;
                resubscribe(&tx, customer)?;
                // messages that waited for the link go now rather than at the next look
                let destination = Channel::Telegram.destination();
                let (index, of) = super::outbox::pending_of(destination);
                tx.execute(
                    &format!(
                        "UPDATE outbox INDEXED BY {index} SET next_attempt_at = ?3 WHERE destination = ?1 AND {of} \
                         AND state = 'pending' AND json_extract(payload, '$.customer_id') = ?2 AND next_attempt_at > ?3"
                    ),
                    params![destination, customer, ts(now)],
                )?;
            }
            Effect::Stop(customer) => {
                tx.execute(
                    "UPDATE telegram_chats SET stopped_at = ?2 WHERE customer_id = ?1 AND stopped_at IS NULL",
                    params![customer, ts(now)],
                )?;
                unsubscribe(&tx, customer, Channel::Telegram, STOP_VIA, now)?;
            }
            Effect::Restart(customer) => {
                tx.execute(
                    "UPDATE telegram_chats SET stopped_at = NULL WHERE chat_id = ?1",
                    [m.chat_id],
                )?;
                resubscribe(&tx, customer)?;
            }
        }
        let id = match text {
            None => None,
            Some(text) => {
                let payload = serde_json::to_string(&Reply {
                    chat_id: m.chat_id,
                    text,
                    failed_link,
                })
                .map_err(|e| LedgerError::Corrupt(format!("reply not serialisable: {e}")))?;
                super::outbox::enqueue(
                    &tx,
                    REPLIES,
                    &reply_key(m.chat_id, m.update_id),
                    None,
                    &payload,
                    now,
                )?
            }
        };
        set_cursor(&tx, UPDATES, m.update_id + 1, now)?;
        tx.commit()?;
        Ok(id)
    }

    fn telegram_unsubscribed(&self, customer: i64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM unsubscribes WHERE customer_id = ?1 AND channel = ?2")?
            .query_row(params![customer, Channel::Telegram.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn telegram_figures(&self, customer: i64, s: &BotSettings, now: DateTime<Utc>) -> Result<Figures> {
        let b = self.balance_of(customer, now, s.warn_before)?;
        Ok(Figures {
            available: b.available,
            pending: b.pending,
            expiring: b.expiring.points,
            within_days: b.expiring.within_days,
            next_burn: b
                .expiring
                .date
                .map(|d| (d.with_timezone(&s.timezone).date_naive(), b.expiring.date_points)),
        })
    }

    fn telegram_movements(&self, customer: i64, s: &BotSettings) -> Result<Vec<Movement>> {
        let mut st = self.conn.prepare_cached(
            "SELECT j.effective_at, j.amount, j.kind, COALESCE(d.number, d.doc_id) \
             FROM journal j LEFT JOIN documents d ON d.id = j.document_id \
             WHERE j.customer_id = ?1 AND j.amount != 0 ORDER BY j.id DESC LIMIT ?2",
        )?;
        let rows = st
            .query_map(params![customer, bot::HISTORY_MOVEMENTS as i64], |r| {
                Ok(Movement {
                    day: from_ts(r.get(0)?).with_timezone(&s.timezone).date_naive(),
                    points: r.get(1)?,
                    kind: r.get(2)?,
                    document: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

fn resubscribe(conn: &Connection, customer: i64) -> Result<()> {
    conn.execute(
        "DELETE FROM unsubscribes WHERE customer_id = ?1 AND channel = ?2",
        params![customer, Channel::Telegram.as_str()],
    )?;
    Ok(())
}

/// Removes a member's Telegram links for `customer forget`: the chat ids are personal data.
/// Returns the chats unlinked; their answers still waiting in the outbox are dropped and the
/// texts of all their answers blanked.
pub(super) fn forget(conn: &Connection, customer: i64, now: DateTime<Utc>) -> Result<usize> {
    let chats: Vec<i64> = conn
        .prepare(
            "SELECT chat_id FROM telegram_chats WHERE customer_id = ?1 \
             UNION SELECT chat_id FROM link_codes WHERE customer_id = ?1 AND chat_id IS NOT NULL",
        )?
        .query_map([customer], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for chat in &chats {
        let (from, to) = (format!("{REPLIES}:{chat}:"), format!("{REPLIES}:{chat};"));
        conn.execute(
            "UPDATE outbox SET state_code = 4 /* dropped */, note = 'the member was forgotten', updated_at = ?3 \
             WHERE idem_key >= ?1 AND idem_key < ?2 AND state = 'pending'",
            params![from, to, ts(now)],
        )?;
        // the key names the chat too
        conn.execute(
            "UPDATE outbox SET payload = json_object('chat_id', 0, 'text', '[forgotten]'), \
             idem_key = ?3 || id WHERE idem_key >= ?1 AND idem_key < ?2",
            params![from, to, format!("{REPLIES}:forgotten:")],
        )?;
    }
    let removed = conn.execute("DELETE FROM telegram_chats WHERE customer_id = ?1", [customer])?;
    conn.execute("DELETE FROM link_codes WHERE customer_id = ?1", [customer])?;
    Ok(removed.max(chats.len()))
}
