//! Notes on contacts: a visible trail for managers. The ledger queues the facts
//! (`amocrm_queue_notes`: accruals above the threshold, redemptions, tier changes, expiry
//! warnings, as `cfg.notes` asks); this sink words them and posts them as
//! `service_message` notes, 50 a request.

use std::collections::HashMap;

use chrono_tz::Tz;
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Send;
use super::connector::Connector;
use crate::core::rules::RuleSet;
use crate::core::words;
use crate::ledger::{DeliveryError, NOTES_DESTINATION, NoteFacts, OutboxRow, Sink};

/// Notes per request at most.
pub const NOTES_MAX_PER_REQUEST: usize = 50;

fn tier_name(rules: &RuleSet, id: Option<&str>) -> String {
    match id {
        Some(t) => rules.tier(t).map_or_else(|| t.to_string(), |t| t.name.clone()),
        None => "без уровня".to_string(),
    }
}

/// The note's text, in Russian for the managers who read it.
pub fn note_text(f: &NoteFacts, rules: &RuleSet, tz: Tz) -> String {
    let doc = f
        .document
        .as_deref()
        .map(|d| format!(" (документ {d})"))
        .unwrap_or_default();
    match f.kind.as_str() {
        "accrual" => format!(
            "Начислено {}{doc}. {}",
            words::points(f.points),
            f.explanation.as_deref().unwrap_or("")
        )
        .trim_end()
        .to_string(),
        "redemption" => format!("Списано {} в оплату покупки{doc}.", words::points(f.points)),
        "tier" => format!(
            "Уровень изменён: {} → {}. {}",
            tier_name(rules, f.from_tier.as_deref()),
            tier_name(rules, f.to_tier.as_deref()),
            f.explanation.as_deref().unwrap_or("")
        )
        .trim_end()
        .to_string(),
        "expiry" => {
            let date =
                f.at.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                    .map(|d| words::date(d.with_timezone(&tz).date_naive()))
                    .unwrap_or_else(|| "скоро".into());
            let (verb, them) = match words::plural(f.points, "one", "few", "many") {
                "one" => ("сгорит", "его"),
                _ => ("сгорят", "их"),
            };
            format!(
                "{} {verb} {date}, если {them} не потратить.",
                words::points(f.points)
            )
        }
        "voucher" => {
            let until =
                f.at.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                    .map(|d| {
                        format!(
                            ", действует до {}",
                            words::date(d.with_timezone(&tz).date_naive())
                        )
                    })
                    .unwrap_or_default();
            format!(
                "Выдан купон на подарок: {}, код {}{until}. Клиент называет код на кассе.",
                f.explanation.as_deref().unwrap_or("товар"),
                f.document.as_deref().unwrap_or("—")
            )
        }
        other => format!("kopilka: {other}"),
    }
}

pub struct NotesSink<'a> {
    pub conn: &'a Connector,
}

impl Sink for NotesSink<'_> {
    fn destination(&self) -> &str {
        NOTES_DESTINATION
    }

    fn max_batch(&self) -> usize {
        NOTES_MAX_PER_REQUEST
    }

    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); rows.len()];
        let mut facts = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            match serde_json::from_str::<NoteFacts>(&r.payload) {
                Ok(f) => facts.push((i, f)),
                Err(e) => results[i] = Err(DeliveryError::Permanent(format!("unreadable note payload: {e}"))),
            }
        }
        let ids: Vec<i64> = facts.iter().map(|(_, f)| f.customer_id).collect();
        let links: HashMap<i64, i64> = match self.conn.ledger().run(move |l| l.amocrm_links(&ids)).await {
            Ok(l) => l,
            Err(e) => {
                return vec![Err(DeliveryError::Retriable(format!("reading the ledger: {e}"))); rows.len()];
            }
        };
        let mut body = Vec::new();
        let mut sent = Vec::new();
        for (i, f) in &facts {
            let Some(contact) = links.get(&f.customer_id) else {
                // the note waits for the link without spending attempts, for a week
                let now = self.conn.client.now();
                results[*i] = Err(if now - rows[*i].created_at > chrono::Duration::days(7) {
                    DeliveryError::Refused(format!(
                        "customer id:{} got no AmoCRM contact within 7 days",
                        f.customer_id
                    ))
                } else {
                    DeliveryError::Hold {
                        until: now + crate::core::notify::ADDRESS_RECHECK,
                        reason: format!("customer id:{} has no AmoCRM contact yet", f.customer_id),
                    }
                });
                continue;
            };
            body.push(json!({
                "entity_id": contact,
                "note_type": "service_message",
                "params": {"service": "kopilka", "text": note_text(f, &self.conn.cfg.program, self.conn.cfg.timezone)},
            }));
            sent.push(*i);
        }
        if body.is_empty() {
            return results;
        }
        let body = Value::Array(body);
        if let Err(e) = self
            .conn
            .client
            .send(
                Method::POST,
                "/api/v4/contacts/notes",
                Send {
                    body: Some(&body),
                    halve_on_504: false,
                },
            )
            .await
        {
            let d = e.to_delivery();
            for i in sent {
                results[i] = Err(d.clone());
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kind: &str, points: i64) -> NoteFacts {
        NoteFacts {
            customer_id: 1,
            kind: kind.into(),
            points,
            document: None,
            explanation: None,
            from_tier: None,
            to_tier: None,
            at: Some(
                chrono::TimeZone::with_ymd_and_hms(&chrono_tz::Europe::Moscow, 2026, 12, 24, 0, 0, 0)
                    .unwrap()
                    .timestamp(),
            ),
        }
    }

    #[test]
    fn notes_say_points_the_way_a_customer_reads_them() {
        let rules = RuleSet::flat(
            rust_decimal::Decimal::from(5),
            crate::core::money::Money(100),
            chrono::Duration::days(14),
            None,
        );
        let tz = chrono_tz::Europe::Moscow;
        let text = |kind: &str, n: i64| note_text(&facts(kind, n), &rules, tz).replace('\u{a0}', " ");
        assert_eq!(text("accrual", 1), "Начислено 1 балл.");
        assert_eq!(text("accrual", 1_480), "Начислено 1 480 баллов.");
        assert_eq!(text("redemption", 22), "Списано 22 балла в оплату покупки.");
        assert_eq!(
            text("expiry", 21),
            "21 балл сгорит 24.12.2026, если его не потратить."
        );
        assert_eq!(
            text("expiry", 480),
            "480 баллов сгорят 24.12.2026, если их не потратить."
        );
    }
}
