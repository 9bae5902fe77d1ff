//! Members' messages in the ledger (issue 21). Every write transaction ends in
//! [`enqueue_messages`] (through `finish_write`): what the transaction added to the journal,
//! the tier history, the expiry warnings and the vouchers becomes outbox rows — one per
//! message and channel, keyed by the event — in that same transaction, so a message is never
//! lost nor made twice. Cursors in `checkpoints` move with the rows they covered, and a path
//! that writes an event without calling `finish_write` is caught by the next one that does.
//!
//! At send time the channels ask here who the member is (consent, unsubscribes, address, what
//! they were sent lately) and record what went out before the outbox row is marked.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::ingest::IngestContext;
use super::{Ledger, Result, from_ts, ts};
use crate::core::notify::{Channel, Event, EventKind, Message, Recipient};

const JOURNAL: &str = "notify:journal";
const TIER: &str = "notify:tier";
const EXPIRY: &str = "notify:expiry";
const VOUCHER: &str = "notify:voucher";
/// A time, not an id: points that became available after it were announced.
const AVAILABLE: &str = "notify:available";

pub(super) fn cursor(conn: &Connection, key: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT cursor FROM checkpoints WHERE source = ?1")?
        .query_row([key], |r| r.get::<_, String>(0))
        .optional()?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

pub(super) fn set_cursor(conn: &Connection, key: &str, value: i64, now: DateTime<Utc>) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO checkpoints (source, cursor, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
    )?
    .execute(params![key, value.to_string(), ts(now)])?;
    Ok(())
}

fn max_of(conn: &Connection, sql: &str) -> Result<i64> {
    Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?)
}

/// Turns the events written since the cursors into outbox rows; returns the rows added.
pub(super) fn enqueue_messages(conn: &Connection, ctx: &IngestContext<'_>) -> Result<usize> {
    let Some(plan) = ctx.destinations.notify.as_deref() else {
        return Ok(0);
    };
    if plan.channels.is_empty() || plan.policy.routes.is_empty() {
        return Ok(0);
    }
    let now = ctx.now;
    let oldest = ts(now - plan.policy.max_age);
    let mut events: Vec<Event> = Vec::new();

    let (j0, jmax) = (
        cursor(conn, JOURNAL)?,
        max_of(conn, "SELECT COALESCE(MAX(id), 0) FROM journal")?,
    );
    if jmax > j0 {
        // one event per customer, document and kind: a sale's accrual rows are one message
        let mut grouped: BTreeMap<(i64, i64, EventKind), Event> = BTreeMap::new();
        let mut st = conn.prepare_cached(
            "SELECT j.id, j.kind, n.name, j.customer_id, j.amount, j.effective_at, j.document_id, d.number, \
                    d.doc_id, d.kind \
             FROM journal j LEFT JOIN documents d ON d.id = j.document_id LEFT JOIN rule_names n ON n.id = j.rule_id \
             WHERE j.id > ?1 AND j.id <= ?2 AND j.role = 'effect' \
               AND j.kind IN ('accrual', 'redemption', 'reversal', 'bonus') AND j.effective_at >= ?3 \
             ORDER BY j.id",
        )?;
        let rows = st.query_map(params![j0, jmax, oldest], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<String>>(9)?,
            ))
        })?;
        for row in rows {
            let (id, kind, rule, customer, amount, at, document, number, doc_id, doc_kind) = row?;
            let event = match (kind.as_str(), rule.as_deref()) {
                ("accrual", _) if amount > 0 => EventKind::Accrual,
                ("redemption", _) if amount < 0 => EventKind::Redemption,
                ("reversal", _) if amount < 0 && doc_kind.as_deref() == Some("return") => EventKind::Return,
                ("bonus", Some("birthday")) if amount > 0 => EventKind::Birthday,
                ("bonus", Some(r)) if amount > 0 && r.starts_with("welcome:enrolment") => EventKind::Welcome,
                ("bonus", _) if amount > 0 => EventKind::Bonus,
                _ => continue,
            };
            let e = grouped
                .entry((customer, document.unwrap_or(-id), event))
                .or_insert_with(|| Event {
                    kind: Some(event),
                    customer_id: customer,
                    key: format!("journal:{id}"),
                    at: from_ts(at),
                    document: number.or(doc_id),
                    ..Event::default()
                });
            e.points += amount.abs();
            if event == EventKind::Accrual {
                // the day the points can be spent: after the return window
                let available: Option<i64> = conn
                    .prepare_cached("SELECT MAX(l.available_at) FROM postings p JOIN lots l ON l.id = p.lot_id WHERE p.tx_id = ?1 AND l.origin_tx = ?1")?
                    .query_row([id], |r| r.get(0))?;
                if let Some(a) = available {
                    let day = from_ts(a).with_timezone(&plan.timezone).date_naive();
                    e.date = Some(e.date.map_or(day, |d| d.max(day)));
                }
            }
        }
        events.extend(grouped.into_values());
    }

    let (t0, tmax) = (
        cursor(conn, TIER)?,
        max_of(conn, "SELECT COALESCE(MAX(id), 0) FROM tier_events")?,
    );
    if tmax > t0 {
        let mut st = conn.prepare_cached(
            "SELECT id, customer_id, from_tier, to_tier, at FROM tier_events \
             WHERE id > ?1 AND id <= ?2 AND at >= ?3 ORDER BY id",
        )?;
        let rows = st.query_map(params![t0, tmax, oldest], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (id, customer, from, to, at) = row?;
            let up = plan.is_up(from.as_deref(), to.as_deref());
            events.push(Event {
                kind: Some(if up {
                    EventKind::TierUp
                } else {
                    EventKind::TierDown
                }),
                customer_id: customer,
                key: format!("tier:{id}"),
                at: from_ts(at),
                tier: to.as_deref().map(|t| plan.tier_name(t)),
                ..Event::default()
            });
        }
    }

    let (w0, wmax) = (
        cursor(conn, EXPIRY)?,
        max_of(conn, "SELECT COALESCE(MAX(warned_at), 0) FROM expiry_warnings")?,
    );
    if wmax > w0 {
        let mut st = conn.prepare_cached(
            "SELECT customer_id, SUM(points), MIN(expires_at), warned_at FROM expiry_warnings \
             WHERE warned_at > ?1 AND warned_at <= ?2 AND warned_at >= ?3 \
             GROUP BY customer_id, warned_at ORDER BY warned_at, customer_id",
        )?;
        let rows = st.query_map(params![w0, wmax, oldest], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (customer, points, expires, warned) = row?;
            events.push(Event {
                kind: Some(EventKind::Expiry),
                customer_id: customer,
                key: format!("expiry:{customer}:{warned}"),
                at: from_ts(warned),
                points,
                date: Some(from_ts(expires).with_timezone(&plan.timezone).date_naive()),
                ..Event::default()
            });
        }
    }

    let (v0, vmax) = (
        cursor(conn, VOUCHER)?,
        max_of(conn, "SELECT COALESCE(MAX(id), 0) FROM vouchers")?,
    );
    if vmax > v0 {
        let mut st = conn.prepare_cached(
            "SELECT v.id, v.customer_id, v.code, COALESCE(p.name, v.product), v.expires_at, v.issued_at \
             FROM vouchers v LEFT JOIN catalog_products p ON p.id = v.product \
             WHERE v.id > ?1 AND v.id <= ?2 AND v.issued_at >= ?3 AND v.state = 'issued' ORDER BY v.id",
        )?;
        let rows = st.query_map(params![v0, vmax, oldest], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        for row in rows {
            let (id, customer, code, item, expires, issued) = row?;
            events.push(Event {
                kind: Some(EventKind::Voucher),
                customer_id: customer,
                key: format!("voucher:{id}"),
                at: from_ts(issued),
                code,
                item: Some(item),
                date: expires.map(|e| from_ts(e).with_timezone(&plan.timezone).date_naive()),
                ..Event::default()
            });
        }
    }

    // points that passed the return window since the last look (a lot that was usable at
    // once is announced by its accrual)
    let a0 = match cursor(conn, AVAILABLE)? {
        0 => ts(now),
        t => t,
    };
    let a_now = ts(now);
    if a_now > a0 {
        let mut st = conn.prepare_cached(
            "SELECT customer_id, SUM(amount), MAX(available_at) FROM lots \
             WHERE available_at > ?1 AND available_at <= ?2 AND available_at > earned_at AND available_at >= ?3 \
             GROUP BY customer_id ORDER BY customer_id",
        )?;
        let rows = st.query_map(params![a0, a_now, oldest], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })?;
        for row in rows {
            let (customer, points, at) = row?;
            events.push(Event {
                kind: Some(EventKind::Available),
                customer_id: customer,
                key: format!("available:{customer}:{at}"),
                at: from_ts(at),
                points,
                ..Event::default()
            });
        }
    }

    // a purchase that brought the member close to the next tier: once a month per tier
    if plan.policy.routes.contains_key(&EventKind::NearTier) && !plan.tiers.is_empty() {
        let near: Vec<Event> = events
            .iter()
            .filter(|e| e.kind == Some(EventKind::Accrual))
            .map(|e| -> Result<Option<Event>> {
                let tier: Option<String> = conn
                    .prepare_cached("SELECT tier FROM customers WHERE id = ?1")?
                    .query_row([e.customer_id], |r| r.get(0))
                    .optional()?
                    .flatten();
                let spend =
                    super::state::spend_between(conn, e.customer_id, e.at - plan.tier_window, e.at, -1)?;
                Ok(plan
                    .near_tier(tier.as_deref(), spend.0, plan.policy.near_tier_percent)
                    .map(|(name, missing)| Event {
                        kind: Some(EventKind::NearTier),
                        customer_id: e.customer_id,
                        key: format!(
                            "near_tier:{}:{name}:{}",
                            e.customer_id,
                            e.at.with_timezone(&plan.timezone).format("%Y-%m")
                        ),
                        at: e.at,
                        tier: Some(name),
                        amount: Some(missing),
                        ..Event::default()
                    }))
            })
            .filter_map(|r| r.transpose())
            .collect::<Result<_>>()?;
        events.extend(near);
    }

    let mut added = 0;
    let key = super::code_key(conn)?;
    for mut e in events {
        let Some(kind) = e.kind else { continue };
        if !plan.policy.routes.contains_key(&kind) {
            continue;
        }
        let h = super::query::holdings(conn, e.customer_id)?;
        e.balance = crate::core::lots::figures(&h, now, ctx.warn_before).available;
        e.name = conn
            .prepare_cached("SELECT name FROM customers WHERE id = ?1")?
            .query_row([e.customer_id], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten();
        e.friend_code = crate::core::identity::referral_code(e.customer_id, key);
        for m in plan.policy.messages(&e, &plan.channels, now) {
            let dest = m.channel.destination();
            let payload = serde_json::to_string(&m)
                .map_err(|err| super::LedgerError::Corrupt(format!("message not serialisable: {err}")))?;
            let key = format!("{dest}:{}", e.key);
            added += usize::from(super::outbox::enqueue(conn, dest, &key, None, &payload, now)?.is_some());
        }
    }
    for (key, value) in [
        (JOURNAL, jmax),
        (TIER, tmax),
        (EXPIRY, wmax),
        (VOUCHER, vmax),
        (AVAILABLE, a_now.max(a0)),
    ] {
        set_cursor(conn, key, value, now)?;
    }
    Ok(added)
}

/// Records an unsubscribe and refuses the member's pending messages on the channel, inside the
/// caller's transaction (the bot's `/stop` answers in the same one).
pub(super) fn unsubscribe(
    conn: &Connection,
    customer: i64,
    channel: Channel,
    via: &str,
    now: DateTime<Utc>,
) -> Result<usize> {
    conn.execute(
        "INSERT INTO unsubscribes (customer_id, channel, at, via) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (customer_id, channel) DO NOTHING",
        params![customer, channel.as_str(), ts(now), via],
    )?;
    let (index, of) = super::outbox::pending_of(channel.destination());
    Ok(conn.execute(
        &format!(
            "UPDATE outbox INDEXED BY {index} SET state_code = 4 /* dropped */, note = ?3, updated_at = ?4 \
             WHERE destination = ?1 AND {of} AND state = 'pending' AND json_extract(payload, '$.customer_id') = ?2"
        ),
        params![
            channel.destination(),
            customer,
            format!("{REFUSED}unsubscribed from {channel}"),
            ts(now)
        ],
    )?)
}

/// Where a channel reaches a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Email(String),
    Telegram(i64),
    /// The AmoCRM contact id.
    Contact(i64),
}

/// The member as a channel sees them at send time.
#[derive(Clone, Debug)]
pub struct Reach {
    pub recipient: Recipient,
    pub address: Option<Address>,
    pub name: Option<String>,
}

/// One channel's messages by outcome, for `kopilka notify` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChannelStatus {
    pub channel: String,
    /// Due now or waiting only for a retry after an error.
    pub queued: i64,
    /// Waiting on purpose, by reason (quiet hours, a cap, no address yet).
    pub held: BTreeMap<String, i64>,
    pub sent: i64,
    /// Never to be sent, by reason (no consent, unsubscribed, no address in time).
    pub not_sent: BTreeMap<String, i64>,
    /// Gave up after errors (`kopilka outbox` shows them).
    pub failed: i64,
}

const HELD: &str = "held: ";
const REFUSED: &str = "not sent: ";

impl Ledger {
    /// Consent, unsubscribe, address and recent sends of a member for a channel.
    pub fn notify_reach(&self, customer: i64, channel: Channel, now: DateTime<Utc>) -> Result<Reach> {
        let (name, consent_service, consent_ads): (Option<String>, Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT name, consent_service, consent_ads FROM customers WHERE id = ?1")?
            .query_row([customer], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
            .unwrap_or((None, None, None));
        let unsubscribed_at: Option<i64> = self
            .conn
            .prepare_cached("SELECT at FROM unsubscribes WHERE customer_id = ?1 AND channel = ?2")?
            .query_row(params![customer, channel.as_str()], |r| r.get(0))
            .optional()?;
        let address = match channel {
            Channel::Email => self
                .conn
                .prepare_cached(
                    "SELECT value FROM customer_keys WHERE kind = 'email' AND customer_id = ?1 ORDER BY value LIMIT 1",
                )?
                .query_row([customer], |r| r.get::<_, String>(0))
                .optional()?
                .map(Address::Email),
            Channel::Telegram => self
                .conn
                .prepare_cached(
                    "SELECT chat_id FROM telegram_chats WHERE customer_id = ?1 AND stopped_at IS NULL \
                     ORDER BY linked_at DESC LIMIT 1",
                )?
                .query_row([customer], |r| r.get::<_, i64>(0))
                .optional()?
                .map(Address::Telegram),
            Channel::Salesbot => self.amocrm_links(&[customer])?.get(&customer).copied().map(Address::Contact),
        };
        let sent: Vec<DateTime<Utc>> = self
            .conn
            .prepare_cached("SELECT sent_at FROM notify_sent WHERE customer_id = ?1 AND sent_at > ?2")?
            .query_map(params![customer, ts(now - Duration::days(7))], |r| {
                r.get::<_, i64>(0)
            })?
            .map(|r| r.map(from_ts))
            .collect::<rusqlite::Result<_>>()?;
        Ok(Reach {
            recipient: Recipient {
                consent_service: consent_service.map(|v| v != 0),
                consent_ads: consent_ads.map(|v| v != 0),
                // linking the bot is the member asking for messages there
                opted_in_channel: channel == Channel::Telegram && address.is_some(),
                unsubscribed_at: unsubscribed_at.map(from_ts),
                has_address: address.is_some(),
                sent,
            },
            address,
            name,
        })
    }

    /// Whether a channel already confirmed this outbox row (a crash came before the mark).
    pub fn notify_was_sent(&self, outbox_id: i64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM notify_sent WHERE outbox_id = ?1")?
            .query_row([outbox_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records a message the channel confirmed, before the outbox row is marked delivered.
    pub fn notify_record_sent(&mut self, outbox_id: i64, m: &Message, now: DateTime<Utc>) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO notify_sent (outbox_id, customer_id, channel, kind, sent_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                outbox_id,
                m.customer_id,
                m.channel.as_str(),
                m.kind.as_str(),
                ts(now)
            ])?;
        Ok(())
    }

    /// A message waits on purpose until `until`: the attempt is not counted as a failure.
    pub fn notify_hold(
        &mut self,
        outbox_id: i64,
        until: DateTime<Utc>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET next_attempt_at = ?2, note = ?3, updated_at = ?4 WHERE id = ?1 AND state = 'pending'",
            params![outbox_id, ts(until), format!("{HELD}{reason}"), ts(now)],
        )?;
        Ok(())
    }

    /// A message that must never go out (no consent, unsubscribed, unreachable), with why.
    pub fn notify_refuse(&mut self, outbox_id: i64, reason: &str, now: DateTime<Utc>) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET state_code = 4 /* dropped */, note = ?2, updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
            params![outbox_id, format!("{REFUSED}{reason}"), ts(now)],
        )?;
        Ok(())
    }

    /// The member's "no more messages on this channel"; pending messages there are refused at
    /// once rather than at their turn.
    pub fn notify_unsubscribe(
        &mut self,
        customer: i64,
        channel: Channel,
        via: &str,
        now: DateTime<Utc>,
    ) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let refused = unsubscribe(&tx, customer, channel, via, now)?;
        tx.commit()?;
        Ok(refused)
    }

    /// Undoes an unsubscribe (the member asked again, e.g. /start in the bot).
    pub fn notify_resubscribe(&mut self, customer: i64, channel: Channel) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM unsubscribes WHERE customer_id = ?1 AND channel = ?2",
            params![customer, channel.as_str()],
        )? > 0)
    }

    /// The installation's secret for members' unsubscribe links, made on first use.
    pub fn notify_secret(&mut self) -> Result<Vec<u8>> {
        if let Some(s) = self.meta_get("notify_secret")? {
            return Ok(s.into_bytes());
        }
        let fresh: String = self
            .conn
            .query_row("SELECT lower(hex(randomblob(32)))", [], |r| r.get(0))?;
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('notify_secret', ?1)",
            [&fresh],
        )?;
        Ok(self.meta_get("notify_secret")?.unwrap_or(fresh).into_bytes())
    }

    /// A member's id from a card, phone, e-mail or `id:N`, as every command reads it.
    pub fn customer_id_of(&self, text: &str) -> Result<i64> {
        super::query::find_customer(&self.conn, text)
    }

    /// Messages per channel by outcome.
    pub fn notify_status(&self, now: DateTime<Utc>) -> Result<Vec<ChannelStatus>> {
        let mut out: BTreeMap<Channel, ChannelStatus> = BTreeMap::new();
        // sent messages are counted in the kept totals; the rest (waiting, failed, not
        // sent, each with its reason) through the index that holds only them
        let mut st = self.conn.prepare_cached(
            "SELECT destination, state, note, next_attempt_at > ?1, COUNT(*) FROM outbox INDEXED BY outbox_notify_open \
             WHERE destination LIKE 'notify:%' AND state != 'delivered' GROUP BY 1, 2, 3, 4",
        )?;
        let mut rows = st
            .query_map([ts(now)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // every destination's sent rows; those not a channel's are skipped below
        for (destination, n, _) in super::totals::kept(&self.conn, "outbox:delivered:")? {
            rows.push((destination, "delivered".into(), None, false, n));
        }
        for (dest, state, note, later, n) in rows {
            let Some(channel) = Channel::from_destination(&dest) else {
                continue;
            };
            let s = out.entry(channel).or_insert_with(|| ChannelStatus {
                channel: channel.as_str().into(),
                ..ChannelStatus::default()
            });
            match (state.as_str(), note.as_deref()) {
                ("pending", Some(n0)) if later && n0.starts_with(HELD) => {
                    *s.held.entry(n0[HELD.len()..].to_string()).or_default() += n;
                }
                ("pending", _) => s.queued += n,
                ("delivered", _) => s.sent += n,
                ("dropped", Some(n0)) if n0.starts_with(REFUSED) => {
                    *s.not_sent.entry(n0[REFUSED.len()..].to_string()).or_default() += n;
                }
                ("dropped", n0) => {
                    *s.not_sent
                        .entry(n0.unwrap_or("dropped by a person").to_string())
                        .or_default() += n;
                }
                ("dead", _) => s.failed += n,
                _ => {}
            }
        }
        Ok(out.into_values().collect())
    }
}
