//! Channel 1: the shop's own Salesbot in AmoCRM, which writes through whatever messengers the
//! shop connected there. kopilka writes the message into the contact's message field (the
//! field map's `message`, `KOPILKA_MESSAGE`) and then starts the configured bot on the
//! contact (`POST /api/v2/salesbot/run`, tasks `{bot_id, entity_id, entity_type: 1}`), so the
//! bot's text is `{{contact.cf.KOPILKA_MESSAGE}}` plus whatever the shop adds. Both calls go
//! through the connector's client: the one pacer every AmoCRM call of the process shares.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Outgoing, Transport};
use crate::amocrm::client::Send;
use crate::amocrm::fields::CardValue;
use crate::amocrm::{AmoError, Connector};
use crate::core::notify::Channel;
use crate::ledger::{Address, DeliveryError};

pub struct Salesbot {
    pub conn: Arc<Connector>,
    pub bot_id: i64,
    pub batch: usize,
}

fn all(n: usize, e: DeliveryError) -> Vec<Result<(), DeliveryError>> {
    vec![Err(e); n]
}

impl Transport for Salesbot {
    fn channel(&self) -> Channel {
        Channel::Salesbot
    }

    fn max_batch(&self) -> usize {
        self.batch
    }

    async fn send(&self, batch: &[Outgoing]) -> Vec<Result<(), DeliveryError>> {
        let fields = match self.conn.fields().await {
            Ok(f) => f,
            Err(e) => return all(batch.len(), e.to_delivery()),
        };
        let Some(field) = fields.id(CardValue::Message) else {
            return all(
                batch.len(),
                DeliveryError::Halt(
                    "the contact field for members' messages (mapping key `message`, KOPILKA_MESSAGE) is \
                     missing in AmoCRM and could not be created"
                        .into(),
                ),
            );
        };
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); batch.len()];
        let mut contacts = Vec::new();
        let mut patch = Vec::new();
        for (i, o) in batch.iter().enumerate() {
            let Address::Contact(id) = o.address else {
                results[i] = Err(DeliveryError::Permanent("not an AmoCRM contact".into()));
                continue;
            };
            patch.push(json!({
                "id": id,
                "custom_fields_values": [{"field_id": field, "values": [{"value": o.message.text}]}],
                "request_id": i.to_string(),
            }));
            contacts.push((i, id));
        }
        if contacts.is_empty() {
            return results;
        }
        let body = Value::Array(patch);
        let sent = self
            .conn
            .client
            .send(
                Method::PATCH,
                "/api/v4/contacts",
                Send {
                    body: Some(&body),
                    halve_on_504: false,
                },
            )
            .await;
        if let Err(e) = sent {
            let d = e.to_delivery();
            for (i, _) in &contacts {
                results[*i] = Err(d.clone());
            }
            return results;
        }
        let tasks = Value::Array(
            contacts
                .iter()
                .map(|(_, id)| json!({"bot_id": self.bot_id, "entity_id": id, "entity_type": 1}))
                .collect(),
        );
        let run = self
            .conn
            .client
            .send(
                Method::POST,
                "/api/v2/salesbot/run",
                Send {
                    body: Some(&tasks),
                    halve_on_504: false,
                },
            )
            .await;
        let failure = match run {
            Ok(_) => None,
            // AmoCRM answers an unknown bot with the text «Бот не найден», not JSON
            Err(AmoError::Body { body, .. }) if body.contains("не найден") => {
                Some(DeliveryError::Halt(format!(
                    "AmoCRM has no Salesbot {} (it answered «{}»): set [notify.salesbot] bot_id to a bot of the \
                 account (AmoCRM → Salesbot)",
                    self.bot_id,
                    body.trim()
                )))
            }
            Err(e) => Some(e.to_delivery()),
        };
        if let Some(d) = failure {
            for (i, _) in &contacts {
                results[*i] = Err(d.clone());
            }
        }
        results
    }
}
