//! The AmoCRM connector's bookkeeping in the ledger: customer ↔ contact links, customers
//! that could not be matched, what was last written to each contact, the sealed OAuth token
//! pair, events already applied, the notes queue, and the figures a contact card shows.
//!
//! Only plain data crosses this boundary (ids, strings, numbers): the ledger knows no
//! AmoCRM wire format. Tables come from migration 5 (`amocrm_*`); the customer ↔ contact
//! link is a `customer_keys` row of kind `amocrm`, so documents naming a contact (won deals)
//! find the same customer.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::ingest::{Batch, IngestContext, IngestReport, enqueue_contact_states};
use super::query::holdings;
use super::{Ledger, Result, from_ts, ts};
use crate::core::lots;

/// The outbox destination of contact-card notes (the contact state goes to `amocrm`).
pub const NOTES_DESTINATION: &str = "amocrm:notes";
/// Events older than this when first seen make no note (history, not news).
pub const NOTE_MAX_AGE: chrono::Duration = chrono::Duration::days(3);
/// The checkpoint of the events poll; moved only together with the sales it yields.
pub const EVENTS_CHECKPOINT: &str = "amocrm:events";

/// What a customer is known by, for matching them to a contact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerKeys {
    pub customer_id: i64,
    pub name: Option<String>,
    pub cards: Vec<String>,
    /// E.164, as stored.
    pub phones: Vec<String>,
    /// Lower-case, as stored.
    pub emails: Vec<String>,
}

/// A customer listed by `kopilka amocrm unmatched`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Unmatched {
    pub customer_id: i64,
    pub name: Option<String>,
    pub reason: String,
    /// Contact ids that matched equally well (empty when none matched).
    pub candidates: Vec<i64>,
    pub seen_at: DateTime<Utc>,
}

/// Everything a contact card shows about one customer, read at delivery time so the card
/// always equals the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CardFigures {
    pub customer_id: i64,
    pub name: Option<String>,
    pub available: i64,
    pub pending: i64,
    pub expiring_soon: i64,
    pub next_expiry: Option<DateTime<Utc>>,
    pub next_expiry_points: i64,
    pub tier: Option<String>,
    pub segment: Option<String>,
    /// The next offer's product name (its id when the catalog does not know it).
    pub offer: Option<String>,
    pub card: Option<String>,
    /// Lifetime value: sales in force minus returns in force, in kopecks.
    pub ltv_kopecks: i64,
    pub last_purchase: Option<DateTime<Utc>>,
    /// Gift vouchers the member can still use, oldest first.
    pub vouchers: Vec<OpenVoucher>,
    /// The member's friend code in this program.
    pub friend_code: Option<String>,
}

/// A voucher as the card shows it: what the member says at the till, what it gives, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenVoucher {
    pub code: String,
    /// The product's name (its id when the catalog does not know it).
    pub item: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The sealed token pair of an account as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTokens {
    pub sealed: Vec<u8>,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One note to write on a contact, as the ledger knows it; the connector words it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NoteFacts {
    pub customer_id: i64,
    /// `accrual`, `redemption`, `tier`, `expiry`.
    pub kind: String,
    #[serde(default)]
    pub points: i64,
    #[serde(default)]
    pub document: Option<String>,
    #[serde(default)]
    pub explanation: Option<String>,
    #[serde(default)]
    pub from_tier: Option<String>,
    #[serde(default)]
    pub to_tier: Option<String>,
    #[serde(default)]
    pub at: Option<i64>,
}

fn link_in(
    tx: &rusqlite::Connection,
    customer: i64,
    contact: i64,
    replace: bool,
    ctx: &IngestContext<'_>,
) -> Result<bool> {
    let owner: Option<i64> = tx
        .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = 'amocrm' AND value = ?1")?
        .query_row([contact.to_string()], |r| r.get(0))
        .optional()?;
    if owner.is_some_and(|o| o != customer) {
        return Ok(false);
    }
    if replace {
        tx.prepare_cached(
            "DELETE FROM customer_keys WHERE kind = 'amocrm' AND customer_id = ?1 AND value != ?2",
        )?
        .execute(params![customer, contact.to_string()])?;
    }
    tx.prepare_cached(
        "INSERT OR IGNORE INTO customer_keys (kind, value, customer_id) VALUES ('amocrm', ?1, ?2)",
    )?
    .execute(params![contact.to_string(), customer])?;
    tx.prepare_cached("DELETE FROM amocrm_unmatched WHERE customer_id = ?1")?
        .execute([customer])?;
    // a new contact has none of the values: whatever was pushed before was elsewhere
    tx.prepare_cached("DELETE FROM amocrm_pushed WHERE customer_id = ?1 AND contact_id != ?2")?
        .execute(params![customer, contact])?;
    queue_card(tx, customer, "link", ctx)?;
    Ok(true)
}
/// Queues a customer's card for delivery: the usual contact-state row, or, when that exact
/// state was queued before (and may have died while the customer had no contact), a row
/// of its own. The sink reads the card's figures from the ledger, so the payload only needs
/// the customer.
fn queue_card(
    conn: &rusqlite::Connection,
    customer: i64,
    why: &str,
    ctx: &IngestContext<'_>,
) -> Result<bool> {
    let Some(dest) = &ctx.destinations.contact_state else {
        return Ok(false);
    };
    if enqueue_contact_states(conn, &BTreeSet::from([customer]), ctx, &Default::default())? > 0 {
        return Ok(true);
    }
    let payload = serde_json::json!({"customer_id": customer, "reason": why}).to_string();
    let key = format!("{dest}:contact:{customer}:{why}:{}", ts(ctx.now));
    Ok(super::outbox::enqueue(
        conn,
        dest,
        &key,
        Some(&format!("contact:{customer}")),
        &payload,
        ctx.now,
    )?
    .is_some())
}

fn split_keys(rows: Vec<(String, String)>, k: &mut CustomerKeys) {
    for (kind, value) in rows {
        match kind.as_str() {
            "card" => k.cards.push(value),
            "phone" => k.phones.push(value),
            "email" => k.emails.push(value),
            _ => {}
        }
    }
}

impl Ledger {
    /// The contact each customer is linked to (the newest link when a customer has several).
    pub fn amocrm_links(&self, customers: &[i64]) -> Result<HashMap<i64, i64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT value FROM customer_keys WHERE kind = 'amocrm' AND customer_id = ?1")?;
        let mut out = HashMap::new();
        for c in customers {
            let ids: Vec<String> = st
                .query_map([c], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if let Some(id) = ids.iter().filter_map(|v| v.parse::<i64>().ok()).max() {
                out.insert(*c, id);
            }
        }
        Ok(out)
    }

    /// The customer a contact is linked to.
    pub fn amocrm_customer_of(&self, contact_id: i64) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = 'amocrm' AND value = ?1")?
            .query_row([contact_id.to_string()], |r| r.get(0))
            .optional()?)
    }

    /// Customers holding a key (`card`, `phone`, `email`) with this value.
    pub fn customers_by_key(&self, kind: &str, value: &str) -> Result<Vec<i64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = ?1 AND value = ?2")?
            .query_map(params![kind, value], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    }

    pub fn customer_keys_of(&self, customer_id: i64) -> Result<CustomerKeys> {
        let name: Option<String> = self
            .conn
            .query_row("SELECT name FROM customers WHERE id = ?1", [customer_id], |r| {
                r.get(0)
            })
            .optional()?
            .flatten();
        let mut k = CustomerKeys {
            customer_id,
            name,
            ..Default::default()
        };
        let rows: Vec<(String, String)> = self
            .conn
            .prepare_cached(
                "SELECT kind, value FROM customer_keys WHERE customer_id = ?1 ORDER BY kind, value",
            )?
            .query_map([customer_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        split_keys(rows, &mut k);
        Ok(k)
    }

    /// Customers with no contact yet that should be matched now: never tried, or last tried
    /// before `retry_before` (an ambiguous phone may have been cleaned up in the CRM since).
    pub fn amocrm_customers_to_match(
        &self,
        retry_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<CustomerKeys>> {
        let ids: Vec<i64> = self
            .conn
            .prepare(
                "SELECT c.id FROM customers c \
                 WHERE NOT EXISTS (SELECT 1 FROM customer_keys k WHERE k.customer_id = c.id AND k.kind = 'amocrm') \
                   AND NOT EXISTS (SELECT 1 FROM amocrm_unmatched u WHERE u.customer_id = c.id AND u.seen_at >= ?1) \
                 ORDER BY c.id LIMIT ?2",
            )?
            .query_map(params![ts(retry_before), limit as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.into_iter().map(|id| self.customer_keys_of(id)).collect()
    }

    /// [`Ledger::amocrm_link`] for many pairs `(customer, contact)` in one transaction;
    /// returns, for each, whether it was linked.
    pub fn amocrm_link_many(&mut self, pairs: &[(i64, i64)], ctx: &IngestContext<'_>) -> Result<Vec<bool>> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(pairs.len());
        for (customer, contact) in pairs {
            out.push(link_in(&tx, *customer, *contact, false, ctx)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Links a customer to a contact and queues the customer's state for it, in one
    /// transaction. With `replace`, the customer's other contact links are dropped (a
    /// manager typed the card number into another contact). A contact already linked to
    /// another customer is left alone: returns `false`.
    pub fn amocrm_link(
        &mut self,
        customer_id: i64,
        contact_id: i64,
        replace: bool,
        ctx: &IngestContext<'_>,
    ) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let linked = link_in(&tx, customer_id, contact_id, replace, ctx)?;
        tx.commit()?;
        Ok(linked)
    }

    /// Records why a customer has no contact (ambiguous, none found), with the candidates.
    pub fn amocrm_record_unmatched(
        &mut self,
        customer_id: i64,
        reason: &str,
        candidates: &[i64],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let list = candidates
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.conn
            .prepare_cached(
                "INSERT INTO amocrm_unmatched (customer_id, reason, candidates, seen_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (customer_id) DO UPDATE SET reason = excluded.reason, candidates = excluded.candidates, \
                 seen_at = excluded.seen_at",
            )?
            .execute(params![customer_id, reason, (!list.is_empty()).then_some(list), ts(now)])?;
        Ok(())
    }

    pub fn amocrm_unmatched(&self) -> Result<Vec<Unmatched>> {
        let mut st = self.conn.prepare(
            "SELECT u.customer_id, c.name, u.reason, u.candidates, u.seen_at FROM amocrm_unmatched u \
             JOIN customers c ON c.id = u.customer_id ORDER BY u.customer_id",
        )?;
        Ok(st
            .query_map([], |r| {
                let cands: Option<String> = r.get(3)?;
                Ok(Unmatched {
                    customer_id: r.get(0)?,
                    name: r.get(1)?,
                    reason: r.get(2)?,
                    candidates: cands
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|s| s.parse().ok())
                        .collect(),
                    seen_at: from_ts(r.get(4)?),
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Queues the state of linked customers whose card may be out of date without a new
    /// journal entry: never pushed (linked before AmoCRM was configured), or points that
    /// became usable since the last push (pending → available needs no transaction).
    /// At most `limit` customers per call.
    pub fn amocrm_enqueue_stale(&mut self, ctx: &IngestContext<'_>, limit: usize) -> Result<usize> {
        let Some(dest) = ctx.destinations.contact_state.clone() else {
            return Ok(0);
        };
        let tx = self.conn.transaction()?;
        let ids: BTreeSet<i64> = tx
            .prepare(
                "SELECT DISTINCT k.customer_id FROM customer_keys k \
                 LEFT JOIN amocrm_pushed p ON p.customer_id = k.customer_id \
                 WHERE k.kind = 'amocrm' \
                   AND (p.customer_id IS NULL OR EXISTS (SELECT 1 FROM lots l WHERE l.customer_id = k.customer_id \
                        AND l.remaining > 0 AND l.available_at > p.pushed_at AND l.available_at <= ?1)) \
                   AND NOT EXISTS (SELECT 1 FROM outbox o INDEXED BY outbox_coalesce WHERE o.destination = ?2 \
                        AND o.state = 'pending' AND o.coalesce_key = 'contact:' || k.customer_id) \
                   AND NOT EXISTS (SELECT 1 FROM outbox o INDEXED BY outbox_dead_coalesce WHERE o.state = 'dead' \
                        AND o.destination = ?2 AND o.coalesce_key = 'contact:' || k.customer_id \
                        AND o.updated_at > ?1 - 86400) \
                 ORDER BY k.customer_id LIMIT ?3",
            )?
            .query_map(params![ts(ctx.now), dest, limit as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut n = 0;
        for c in &ids {
            n += usize::from(queue_card(&tx, *c, "stale", ctx)?);
        }
        tx.commit()?;
        Ok(n)
    }

    /// The contact and values hash last written for each customer.
    pub fn amocrm_pushed(&self, customers: &[i64]) -> Result<HashMap<i64, (i64, String)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT contact_id, values_hash FROM amocrm_pushed WHERE customer_id = ?1")?;
        let mut out = HashMap::new();
        for c in customers {
            if let Some(v) = st
                .query_row([c], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .optional()?
            {
                out.insert(*c, v);
            }
        }
        Ok(out)
    }

    /// Remembers what each customer's contact now shows: `(customer, contact, hash)`.
    pub fn amocrm_record_pushed(&mut self, pushed: &[(i64, i64, String)], now: DateTime<Utc>) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO amocrm_pushed (customer_id, contact_id, values_hash, pushed_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (customer_id) DO UPDATE SET contact_id = excluded.contact_id, \
                 values_hash = excluded.values_hash, pushed_at = excluded.pushed_at",
            )?;
            for (c, contact, hash) in pushed {
                st.execute(params![c, contact, hash, ts(now)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Lifetime value (sales in force minus returns in force, kopecks) and the last
    /// purchase of a customer.
    pub fn ltv_of(&self, customer_id: i64) -> Result<(i64, Option<DateTime<Utc>>)> {
        let (ltv, last): (i64, Option<i64>) = self.conn.prepare_cached(
            "SELECT COALESCE(SUM(CASE WHEN kind = 'sale' THEN total WHEN kind = 'return' THEN -total END), 0), \
               MAX(CASE WHEN kind = 'sale' THEN occurred_at END) \
             FROM documents WHERE customer_id = ?1 AND state = 'active' AND applied = 1",
        )?
        .query_row([customer_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((ltv, last.map(from_ts)))
    }

    /// What the contact card of each customer shows now.
    pub fn amocrm_card_figures(
        &self,
        customers: &[i64],
        now: DateTime<Utc>,
        warn_before: chrono::Duration,
    ) -> Result<Vec<CardFigures>> {
        let mut out = Vec::with_capacity(customers.len());
        let key = super::code_key(&self.conn)?;
        for &c in customers {
            let h = holdings(&self.conn, c)?;
            let f = lots::figures(&h, now, warn_before);
            let (name, tier, segment, offer): (Option<String>, Option<String>, Option<String>, Option<String>) =
                self.conn
                    .prepare_cached(
                        "SELECT c.name, c.tier, c.segment, \
                           CASE WHEN c.offer IS NULL THEN NULL ELSE \
                             COALESCE((SELECT p.name FROM catalog_products p WHERE p.id = c.offer), c.offer) END \
                         FROM customers c WHERE c.id = ?1",
                    )?
                    .query_row([c], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            let card: Option<String> = self
                .conn
                .prepare_cached(
                    "SELECT value FROM customer_keys WHERE customer_id = ?1 AND kind = 'card' ORDER BY value LIMIT 1",
                )?
                .query_row([c], |r| r.get(0))
                .optional()?;
            let (ltv, last) = self.ltv_of(c)?;
            let vouchers = self
                .conn
                .prepare_cached(
                    "SELECT v.code, COALESCE(p.name, v.product), v.expires_at FROM vouchers v \
                     LEFT JOIN catalog_products p ON p.id = v.product \
                     WHERE v.customer_id = ?1 AND v.state = 'issued' AND v.code IS NOT NULL \
                       AND (v.expires_at IS NULL OR v.expires_at > ?2) ORDER BY v.issued_at, v.id",
                )?
                .query_map(params![c, ts(now)], |r| {
                    Ok(OpenVoucher {
                        code: r.get(0)?,
                        item: r.get(1)?,
                        expires_at: r.get::<_, Option<i64>>(2)?.map(from_ts),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            out.push(CardFigures {
                customer_id: c,
                name,
                available: f.available,
                pending: f.pending,
                expiring_soon: f.expiring_soon,
                next_expiry: f.next_expiry.map(|e| e.0),
                next_expiry_points: f.next_expiry.map_or(0, |e| e.1),
                tier,
                segment,
                offer,
                card,
                ltv_kopecks: ltv,
                last_purchase: last,
                vouchers,
                friend_code: crate::core::identity::referral_code(c, key),
            });
        }
        Ok(out)
    }

    pub fn amocrm_tokens_load(&self, account: &str) -> Result<Option<StoredTokens>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT sealed, access_expires_at, refresh_expires_at, updated_at FROM amocrm_tokens WHERE account = ?1",
            )?
            .query_row([account], |r| {
                Ok(StoredTokens {
                    sealed: r.get(0)?,
                    access_expires_at: from_ts(r.get(1)?),
                    refresh_expires_at: from_ts(r.get(2)?),
                    updated_at: from_ts(r.get(3)?),
                })
            })
            .optional()?)
    }

    /// Stores a new sealed pair; committed (synchronously with the WAL) before it returns,
    /// so the pair survives a crash right after a refresh.
    pub fn amocrm_tokens_store(&mut self, account: &str, t: &StoredTokens) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO amocrm_tokens (account, sealed, access_expires_at, refresh_expires_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (account) DO UPDATE SET sealed = excluded.sealed, \
                 access_expires_at = excluded.access_expires_at, refresh_expires_at = excluded.refresh_expires_at, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![
                account,
                t.sealed,
                ts(t.access_expires_at),
                ts(t.refresh_expires_at),
                ts(t.updated_at)
            ])?;
        Ok(())
    }

    /// Which of these event ids were applied already.
    pub fn amocrm_seen_events(&self, ids: &[String]) -> Result<HashSet<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM amocrm_seen_events WHERE event_id = ?1")?;
        let mut out = HashSet::new();
        for id in ids {
            if st.query_row([id], |_| Ok(())).optional()?.is_some() {
                out.insert(id.clone());
            }
        }
        Ok(out)
    }

    /// Which of these document ids of `source` are sales in force.
    pub fn active_sales(&self, source: &str, doc_ids: &[String]) -> Result<HashSet<String>> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM documents WHERE source = ?1 AND doc_id = ?2 AND state = 'active' AND kind = 'sale'",
        )?;
        let mut out = HashSet::new();
        for id in doc_ids {
            if st
                .query_row(params![source, id], |_| Ok(()))
                .optional()?
                .is_some()
            {
                out.insert(id.clone());
            }
        }
        Ok(out)
    }

    /// Applies the sales a batch of AmoCRM events yields and records those events as seen,
    /// in one transaction with the events checkpoint (`batch.checkpoint`). Events older than
    /// `forget_before` are pruned afterwards (the overlap window never reaches them again).
    pub fn amocrm_ingest_events(
        &mut self,
        mut batch: Batch,
        events: &[(String, i64)],
        forget_before: DateTime<Utc>,
        ctx: &IngestContext<'_>,
    ) -> Result<IngestReport> {
        batch.source = EVENTS_CHECKPOINT.to_string();
        if batch.checkpoint.is_none() {
            batch.checkpoint = self.checkpoint(EVENTS_CHECKPOINT)?.or(Some("0".into()));
        }
        batch.consumed_events = events.to_vec();
        let report = self.ingest(batch, ctx)?;
        self.conn.execute(
            "DELETE FROM amocrm_seen_events WHERE created_at < ?1",
            [ts(forget_before)],
        )?;
        Ok(report)
    }

    /// Queues contact notes for what happened since the last call: accruals of at least
    /// `accrual_min_points`, redemptions, tier changes and expiry warnings (each only when
    /// its kind is in `kinds`). Cursors live in `checkpoints` and move in the same
    /// transaction as the rows they cover. Only events of the last [`NOTE_MAX_AGE`] make
    /// notes: a ledger that gains an AmoCRM connection, or imports years of receipts, does
    /// not flood every contact with its history — and what happened just before the first
    /// run (expiry warnings made before the contacts were linked) is not lost.
    pub fn amocrm_queue_notes(
        &mut self,
        kinds: &[String],
        accrual_min_points: i64,
        now: DateTime<Utc>,
    ) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let cursor = |key: &str| -> Result<Option<i64>> {
            Ok(tx
                .prepare_cached("SELECT cursor FROM checkpoints WHERE source = ?1")?
                .query_row([key], |r| r.get::<_, String>(0))
                .optional()?
                .and_then(|c| c.parse().ok()))
        };
        let journal_max: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM journal", [], |r| r.get(0))?;
        let tier_max: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM tier_events", [], |r| r.get(0))?;
        let warn_max: i64 = tx.query_row(
            "SELECT COALESCE(MAX(warned_at), 0) FROM expiry_warnings",
            [],
            |r| r.get(0),
        )?;
        let voucher_max: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM vouchers", [], |r| r.get(0))?;
        let (j0, t0, w0) = (
            cursor("amocrm:notes:journal")?.or(Some(0)),
            cursor("amocrm:notes:tier")?.or(Some(0)),
            cursor("amocrm:notes:expiry")?.or(Some(0)),
        );
        let v0 = cursor("amocrm:notes:voucher")?.unwrap_or(0);
        let oldest = ts(now - NOTE_MAX_AGE);
        let mut notes: Vec<(String, NoteFacts)> = Vec::new();
        let want = |k: &str| kinds.iter().any(|x| x == k);
        if let Some(j0) = j0 {
            let mut st = tx.prepare(
                "SELECT j.id, j.kind, j.customer_id, j.amount, j.explanation, d.number, d.source, d.doc_id \
                 FROM journal j LEFT JOIN documents d ON d.id = j.document_id \
                 WHERE j.id > ?1 AND j.id <= ?2 AND j.role = 'effect' AND j.kind IN ('accrual', 'redemption') \
                   AND j.effective_at >= ?3 \
                 ORDER BY j.id",
            )?;
            let rows = st.query_map(params![j0, journal_max, oldest], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, rusqlite::types::Value>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })?;
            for row in rows {
                let (id, kind, customer, amount, explanation, number, source, doc_id) = row?;
                let points = amount.abs();
                let keep = match kind.as_str() {
                    "accrual" => want("accrual") && points >= accrual_min_points,
                    _ => want("redemption"),
                };
                if !keep {
                    continue;
                }
                let summary = super::explanation_of((&explanation).into()).summary;
                let document = match (number, source, doc_id) {
                    (Some(n), _, _) => Some(n),
                    (None, Some(s), Some(d)) => Some(format!("{s}:{d}")),
                    _ => None,
                };
                notes.push((
                    format!("{NOTES_DESTINATION}:journal:{id}"),
                    NoteFacts {
                        customer_id: customer,
                        kind,
                        points,
                        document,
                        explanation: Some(summary),
                        from_tier: None,
                        to_tier: None,
                        at: None,
                    },
                ));
            }
        }
        if let Some(t0) = t0.filter(|_| want("tier")) {
            let mut st = tx.prepare(
                "SELECT id, customer_id, from_tier, to_tier, at, reason FROM tier_events WHERE id > ?1 AND id <= ?2 \
                 AND at >= ?3 ORDER BY id",
            )?;
            let rows = st.query_map(params![t0, tier_max, oldest], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    NoteFacts {
                        customer_id: r.get(1)?,
                        kind: "tier".into(),
                        points: 0,
                        document: None,
                        explanation: r.get(5)?,
                        from_tier: r.get(2)?,
                        to_tier: r.get(3)?,
                        at: r.get(4)?,
                    },
                ))
            })?;
            for row in rows {
                let (id, facts) = row?;
                notes.push((format!("{NOTES_DESTINATION}:tier:{id}"), facts));
            }
        }
        if let Some(w0) = w0.filter(|_| want("expiry")) {
            let mut st = tx.prepare(
                "SELECT customer_id, SUM(points), MIN(expires_at), warned_at FROM expiry_warnings \
                 WHERE warned_at > ?1 AND warned_at <= ?2 AND warned_at >= ?3 \
                 GROUP BY customer_id, warned_at ORDER BY warned_at, customer_id",
            )?;
            let rows = st.query_map(params![w0, warn_max, oldest], |r| {
                Ok((
                    r.get::<_, i64>(3)?,
                    NoteFacts {
                        customer_id: r.get(0)?,
                        kind: "expiry".into(),
                        points: r.get(1)?,
                        document: None,
                        explanation: None,
                        from_tier: None,
                        to_tier: None,
                        at: r.get(2)?,
                    },
                ))
            })?;
            for row in rows {
                let (warned, facts) = row?;
                notes.push((
                    format!("{NOTES_DESTINATION}:expiry:{}:{warned}", facts.customer_id),
                    facts,
                ));
            }
        }
        if want("voucher") && voucher_max > v0 {
            // a voucher's note names its code, item and last day (`document`, `explanation`, `at`)
            let mut st = tx.prepare(
                "SELECT v.id, v.customer_id, v.code, COALESCE(p.name, v.product), v.expires_at FROM vouchers v \
                 LEFT JOIN catalog_products p ON p.id = v.product \
                 WHERE v.id > ?1 AND v.id <= ?2 AND v.issued_at >= ?3 AND v.state = 'issued' ORDER BY v.id",
            )?;
            let rows = st.query_map(params![v0, voucher_max, oldest], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    NoteFacts {
                        customer_id: r.get(1)?,
                        kind: "voucher".into(),
                        points: 0,
                        document: r.get(2)?,
                        explanation: r.get(3)?,
                        from_tier: None,
                        to_tier: None,
                        at: r.get(4)?,
                    },
                ))
            })?;
            for row in rows {
                let (id, facts) = row?;
                notes.push((format!("{NOTES_DESTINATION}:voucher:{id}"), facts));
            }
        }
        let mut n = 0;
        for (key, facts) in &notes {
            let payload = serde_json::to_string(facts)
                .map_err(|e| super::LedgerError::Corrupt(format!("note not serialisable: {e}")))?;
            n += usize::from(
                super::outbox::enqueue(&tx, NOTES_DESTINATION, key, None, &payload, now)?.is_some(),
            );
        }
        for (key, value) in [
            ("amocrm:notes:journal", journal_max),
            ("amocrm:notes:tier", tier_max),
            ("amocrm:notes:expiry", warn_max),
            ("amocrm:notes:voucher", voucher_max),
        ] {
            tx.prepare_cached(
                "INSERT INTO checkpoints (source, cursor, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
            )?
            .execute(params![key, value.to_string(), ts(now)])?;
        }
        tx.commit()?;
        Ok(n)
    }
}
