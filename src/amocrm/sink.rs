//! The outbox sink of destination `amocrm`: contact cards.
//!
//! The outbox coalesces per customer, so a row means "this customer's card may have
//! changed". The sink reads the card's figures from the ledger at delivery time (so the
//! card equals the ledger, even for points that became usable without a new entry), skips
//! contacts whose visible values did not change since the last push (`amocrm_pushed`), and
//! PATCHes the rest in one request per batch (≤ 50), each item with a `request_id`. A
//! validation error on one item dead-letters that item with the API's reason; the others
//! are sent again without it. A 504 halves the batch.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::client::Send;
use super::connector::Connector;
use super::fields::{CardValue, Resolved};
use super::{AmoError, Class};
use crate::core::offers::Segment;
use crate::core::rules::RuleSet;
use crate::ledger::{CardFigures, DeliveryError, OutboxRow, Sink};

/// Contacts per PATCH at most (the vendor recommends ≤ 50).
pub const PATCH_MAX_CONTACTS: usize = 50;
/// How many times a batch is re-sent without its invalid items.
const RESEND_WITHOUT_INVALID_TIMES: usize = 3;

pub const DESTINATION: &str = "amocrm";

/// Tag names: one per tier and per RFM segment, so managers can filter on them.
pub fn tier_tag(name: &str) -> String {
    format!("Уровень: {name}")
}

pub fn segment_tag(s: Segment) -> String {
    format!("Сегмент: {}", s.label_ru())
}

fn date_value(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    match t {
        Some(t) => json!([{"value": t.timestamp()}]),
        None => Value::Null,
    }
}

fn text_value(t: Option<String>) -> Value {
    match t {
        Some(t) if !t.is_empty() => json!([{"value": t}]),
        _ => Value::Null,
    }
}

fn number_value(n: impl std::fmt::Display) -> Value {
    json!([{"value": n.to_string()}])
}

/// Whole rubles and kopecks as a decimal string (`1234.50`).
fn rubles(kopecks: i64) -> String {
    let sign = if kopecks < 0 { "-" } else { "" };
    let k = kopecks.unsigned_abs();
    format!("{sign}{}.{:02}", k / 100, k % 100)
}

/// One line per open voucher («V-7KQ3MZP — Капучино, до 12.03.2027»); `None` clears the
/// field once the last one is used or expires.
fn vouchers_text(f: &CardFigures, rules: &RuleSet) -> Option<String> {
    let lines: Vec<String> = f
        .vouchers
        .iter()
        .map(|v| match v.expires_at {
            Some(e) => format!(
                "{} — {}, до {}",
                v.code,
                v.item,
                crate::core::words::date(e.with_timezone(&rules.timezone).date_naive())
            ),
            None => format!("{} — {}", v.code, v.item),
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The PATCH item for one contact (without `id` and `request_id`), and its tags.
pub fn card_item(f: &CardFigures, fields: &Resolved, rules: &RuleSet, tags: bool) -> Value {
    let tier = f.tier.as_deref().and_then(|t| rules.tier(t));
    let tier_name = tier.map(|t| t.name.clone()).or_else(|| f.tier.clone());
    let burning = f.expiring_soon > 0;
    let mut cf = Vec::new();
    for (value, id) in &fields.ids {
        let values = match value {
            CardValue::Points => number_value(f.available),
            CardValue::Pending => number_value(f.pending),
            CardValue::Tier => text_value(tier_name.clone()),
            CardValue::Discount => match tier {
                Some(t) => number_value(t.discount_pct.normalize()),
                None => Value::Null,
            },
            CardValue::BurnPoints => number_value(f.expiring_soon),
            CardValue::BurnDate => date_value(f.next_expiry.filter(|_| burning)),
            CardValue::Ltv => number_value(rubles(f.ltv_kopecks)),
            CardValue::LastPurchase => date_value(f.last_purchase),
            CardValue::Card => match &f.card {
                // never clear a card number a manager typed
                Some(c) => text_value(Some(c.clone())),
                None => continue,
            },
            CardValue::Offer => text_value(f.offer.clone()),
            CardValue::ReferralCode => text_value(f.friend_code.clone()),
            CardValue::Vouchers => text_value(vouchers_text(f, rules)),
            // written by the Salesbot channel just before it starts the bot
            CardValue::Message => continue,
        };
        cf.push(json!({"field_id": id, "values": values}));
    }
    let mut item = json!({"custom_fields_values": cf});
    if tags {
        let mut add = Vec::new();
        let mut delete = Vec::new();
        for t in &rules.tiers {
            if tier_name.as_deref() == Some(t.name.as_str()) {
                add.push(json!({"name": tier_tag(&t.name)}));
            } else {
                delete.push(json!({"name": tier_tag(&t.name)}));
            }
        }
        for s in Segment::ALL {
            if f.segment.as_deref() == Some(s.code()) {
                add.push(json!({"name": segment_tag(s)}));
            } else {
                delete.push(json!({"name": segment_tag(s)}));
            }
        }
        if !add.is_empty() {
            item["tags_to_add"] = Value::Array(add);
        }
        if !delete.is_empty() {
            item["tags_to_delete"] = Value::Array(delete);
        }
    }
    item
}

/// A stable digest of what a contact shows, so an unchanged contact is not sent again.
pub fn values_hash(contact: i64, item: &Value) -> String {
    let d = Sha256::digest(format!("{contact}:{item}").as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub struct ContactSink<'a> {
    pub conn: &'a Connector,
}

/// One contact to write.
struct Pending {
    row: usize,
    customer: i64,
    contact: i64,
    hash: String,
    item: Value,
}

impl ContactSink<'_> {
    /// PATCHes `items`; returns the class and reason for each item that failed.
    async fn patch(&self, items: &[Pending]) -> HashMap<usize, DeliveryError> {
        let mut failed = HashMap::new();
        let mut todo: Vec<&Pending> = items.iter().collect();
        let mut stack: Vec<Vec<&Pending>> = Vec::new();
        let mut resends = 0;
        loop {
            if todo.is_empty() {
                match stack.pop() {
                    Some(next) => todo = next,
                    None => return failed,
                }
                continue;
            }
            let body = Value::Array(
                todo.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let mut v = p.item.clone();
                        v["id"] = json!(p.contact);
                        v["request_id"] = json!(i.to_string());
                        v
                    })
                    .collect(),
            );
            let sent = self
                .conn
                .client
                .send(
                    Method::PATCH,
                    "/api/v4/contacts",
                    Send {
                        body: Some(&body),
                        halve_on_504: true,
                    },
                )
                .await;
            let e = match sent {
                Ok(_) => {
                    todo.clear();
                    continue;
                }
                Err(e) => e,
            };
            if e.status() == Some(504) && todo.len() > 1 {
                let second = todo.split_off(todo.len() / 2);
                tracing::warn!(
                    contacts = todo.len() + second.len(),
                    "AmoCRM timed out on a batch (504); halving it"
                );
                stack.push(second);
                continue;
            }
            if let AmoError::Status { items: errs, .. } = &e
                && !errs.is_empty()
                && e.class() == Class::Permanent
                && resends < RESEND_WITHOUT_INVALID_TIMES
            {
                if errs.iter().any(|x| x.detail.contains("custom_fields_values")) {
                    // a field may have been deleted in the account: resolve the map again
                    // on the next run (and re-create kopilka's own fields)
                    self.conn.forget_fields().await;
                }
                let mut bad = HashMap::new();
                for err in errs {
                    if let Some(p) = err.request_id.parse::<usize>().ok().and_then(|i| todo.get(i)) {
                        bad.insert(p.row, err.detail.clone());
                    }
                }
                if !bad.is_empty() {
                    resends += 1;
                    for (row, detail) in &bad {
                        failed.insert(
                            *row,
                            DeliveryError::Permanent(format!(
                                "amocrm refused this contact's values: {detail}"
                            )),
                        );
                    }
                    todo.retain(|p| !bad.contains_key(&p.row));
                    continue;
                }
            }
            let d = e.to_delivery();
            for p in todo.drain(..) {
                failed.insert(p.row, d.clone());
            }
            if matches!(d, DeliveryError::Halt(_)) {
                for rest in stack.drain(..) {
                    for p in rest {
                        failed.insert(p.row, d.clone());
                    }
                }
            }
        }
    }
}

impl Sink for ContactSink<'_> {
    fn destination(&self) -> &str {
        DESTINATION
    }

    fn max_batch(&self) -> usize {
        self.conn.amo().batch_size.clamp(1, PATCH_MAX_CONTACTS)
    }

    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); rows.len()];
        if let Some(h) = self.conn.client.halted() {
            return vec![Err(DeliveryError::Halt(h)); rows.len()];
        }
        let fields = match self.conn.fields().await {
            Ok(f) => f,
            Err(e) => return vec![Err(e.to_delivery()); rows.len()],
        };
        let mut customers = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            match serde_json::from_str::<Value>(&r.payload)
                .ok()
                .and_then(|v| v.get("customer_id").and_then(Value::as_i64))
            {
                Some(c) => customers.push((i, c)),
                None => {
                    results[i] = Err(DeliveryError::Permanent(
                        "the outbox payload has no customer_id; it was not written by kopilka's ledger"
                            .into(),
                    ))
                }
            }
        }
        let ids: Vec<i64> = customers.iter().map(|(_, c)| *c).collect();
        let now = self.conn.client.now();
        let warn = self.conn.cfg.warn_before;
        let read = self
            .conn
            .ledger()
            .run(move |l| -> crate::ledger::Result<_> {
                Ok((
                    l.amocrm_card_figures(&ids, now, warn)?,
                    l.amocrm_links(&ids)?,
                    l.amocrm_pushed(&ids)?,
                ))
            })
            .await;
        let (figures, links, pushed) = match read {
            Ok(x) => x,
            Err(e) => {
                return vec![Err(DeliveryError::Retriable(format!("reading the ledger: {e}"))); rows.len()];
            }
        };
        let figures: HashMap<i64, CardFigures> = figures.into_iter().map(|f| (f.customer_id, f)).collect();
        let mut pending = Vec::new();
        for (row, c) in customers {
            let (Some(f), Some(contact)) = (figures.get(&c), links.get(&c)) else {
                results[row] = Err(DeliveryError::Permanent(format!(
                    "customer id:{c} has no AmoCRM contact yet (see `kopilka amocrm unmatched`); its next change is \
                     sent once it is linked"
                )));
                continue;
            };
            let item = card_item(f, &fields, &self.conn.cfg.program, self.conn.amo().tags);
            let hash = values_hash(*contact, &item);
            if pushed
                .get(&c)
                .is_some_and(|(pc, ph)| pc == contact && *ph == hash)
            {
                continue;
            }
            pending.push(Pending {
                row,
                customer: c,
                contact: *contact,
                hash,
                item,
            });
        }
        if pending.is_empty() {
            return results;
        }
        let failed = self.patch(&pending).await;
        let mut done = Vec::new();
        for p in &pending {
            match failed.get(&p.row) {
                Some(e) => results[p.row] = Err(e.clone()),
                None => done.push((p.customer, p.contact, p.hash.clone())),
            }
        }
        if !done.is_empty() {
            let now = self.conn.client.now();
            if let Err(e) = self
                .conn
                .ledger()
                .run(move |l| l.amocrm_record_pushed(&done, now))
                .await
            {
                // the contacts were written; a lost record only means one more push later
                tracing::warn!(error = %e, "could not record what was pushed to AmoCRM");
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rubles_keep_kopecks() {
        assert_eq!(rubles(123450), "1234.50");
        assert_eq!(rubles(-5), "-0.05");
    }
}
