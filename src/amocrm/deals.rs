//! Won deals as sales, and contact changes, through AmoCRM's events API.
//!
//! Each poll reads the events since the stored cursor minus an overlap window (events may
//! become visible late), skips the ids already applied, re-reads the leads and contacts
//! they name (the event says *that* something changed; the entity says *what* it is now),
//! and hands the ledger the sales and voids they yield together with the seen event ids
//! and the new cursor, in one transaction. Replaying events is harmless twice over: seen
//! ids are skipped, and a lead read again yields the same document version.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::AmoError;
use super::attributes::attributes_of;
use super::connector::Connector;
use super::contacts::{ContactKeys, relink_changed};
use super::fields::CardValue;
use super::wire::{Contact, Event, Lead};
use crate::core::document::{DocKind, Document, Incoming, Line, SourceRef, VoidReason, content_version};
use crate::core::identity::{CustomerIdentity, Email, Phone, normalize_card};
use crate::core::money::{Money, Points};
use crate::ledger::{Batch, EVENTS_CHECKPOINT, Item};

/// The ledger's source system for won deals.
pub const SOURCE: &str = "amocrm";
/// Leads re-read per poll at most; the rest wait for the next poll (the cursor stays).
pub const LEADS_PER_POLL: usize = 2_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    pub events: usize,
    pub new_events: usize,
    pub sales: usize,
    pub voids: usize,
    pub relinked: usize,
    pub applied: usize,
    pub unchanged: usize,
    /// Customers whose attributes their contact's `[sources]` fields changed.
    pub attributes_changed: usize,
    /// Attribute values refused (each in its customer's history).
    pub attributes_refused: usize,
    /// Attribute values another source set, kept (the conflict in the customer's history).
    pub attributes_kept: usize,
}

/// Event types polled: status changes and price edits of leads, contacts added, and edits
/// of the contact fields that identify a customer or hold their attributes
/// (`custom_field_<id>_value_changed`; `fields` are the ids: phone, e-mail, card, then the
/// `[sources]` fields). Lead events only when deals are read (`pipelines` configured).
pub fn event_types(deals: bool, fields: &[i64]) -> Vec<String> {
    let mut t = Vec::new();
    if deals {
        t.push("lead_status_changed".to_string());
        t.push("sale_field_changed".to_string());
    }
    t.push("contact_added".to_string());
    let mut seen = BTreeSet::new();
    for id in fields.iter().filter(|id| seen.insert(**id)) {
        t.push(format!("custom_field_{id}_value_changed"));
    }
    t
}

fn quantity(v: Option<&serde_json::Value>) -> Decimal {
    let q = match v {
        Some(serde_json::Value::Number(n)) => n.to_string().parse().ok(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    q.filter(|q: &Decimal| *q > Decimal::ZERO).unwrap_or(Decimal::ONE)
}

/// The sale a won lead is: the price as the amount, the main contact as the customer, one
/// line per catalog item (the price shared in proportion to quantities, since the lead
/// carries no per-item price) or else one line of the configured category.
pub fn lead_document(
    lead: &Lead,
    contact: Option<&Contact>,
    card_field: Option<i64>,
    category: &str,
    currency: &str,
    fallback_time: DateTime<Utc>,
) -> Result<Document, String> {
    let price = lead.price.unwrap_or(0);
    let total = price
        .checked_mul(100)
        .filter(|t| *t >= 0)
        .ok_or_else(|| format!("lead {}: price {price} is out of range", lead.id))?;
    let occurred = lead
        .closed_at
        .or(lead.updated_at)
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .unwrap_or(fallback_time);
    let elements = lead
        .embedded
        .as_ref()
        .and_then(|e| e.catalog_elements.clone())
        .unwrap_or_default();
    let mut lines = Vec::new();
    if elements.is_empty() {
        lines.push(Line {
            product_id: format!("amocrm:{category}"),
            name: lead.name.clone().unwrap_or_else(|| format!("Сделка {}", lead.id)),
            category: Some(category.to_string()),
            category_parents: Vec::new(),
            quantity: Decimal::ONE,
            unit_price: Money(total),
            discount: Money(0),
            net: Money(total),
            unit_cost: None,
            service: false,
        });
    } else {
        let qty: Vec<Decimal> = elements
            .iter()
            .map(|e| quantity(e.metadata.as_ref().and_then(|m| m.quantity.as_ref())))
            .collect();
        let all: Decimal = qty.iter().sum();
        let mut left = total;
        for (i, (e, q)) in elements.iter().zip(&qty).enumerate() {
            let net = if i + 1 == elements.len() {
                left
            } else {
                (Decimal::from(total) * q / all)
                    .floor()
                    .try_into()
                    .unwrap_or(0i64)
                    .min(left)
            };
            left -= net;
            let catalog = e.metadata.as_ref().and_then(|m| m.catalog_id).unwrap_or(0);
            let unit: i64 = (Decimal::from(net) / q).round().try_into().unwrap_or(net);
            lines.push(Line {
                product_id: format!("amocrm:catalog:{catalog}:{}", e.id),
                name: e.name.clone().unwrap_or_else(|| format!("Товар {}", e.id)),
                category: Some(category.to_string()),
                category_parents: Vec::new(),
                quantity: *q,
                unit_price: Money(unit),
                discount: Money(0),
                net: Money(net),
                unit_cost: None,
                service: false,
            });
        }
    }
    let mut customer = CustomerIdentity {
        amocrm_id: lead.main_contact(),
        ..Default::default()
    };
    if let Some(c) = contact {
        let keys = ContactKeys::of(c, card_field);
        customer.card = keys.cards.first().cloned();
        customer.phone = keys.phones.first().and_then(|p| Phone::parse(p));
        customer.email = keys.emails.first().and_then(|e| Email::parse(e));
        customer.name = c.name.clone();
    }
    let mut doc = Document {
        source: SourceRef {
            system: SOURCE.into(),
            doc_id: lead.id.to_string(),
            version: String::new(),
            stamp: lead.updated_at,
        },
        kind: DocKind::Sale,
        number: Some(lead.id.to_string()),
        occurred_at: occurred,
        customer,
        currency: currency.to_string(),
        lines,
        total: Money(total),
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    };
    doc.source.version = content_version(&doc);
    Ok(doc)
}

/// One poll of the events API. See the module docs.
pub async fn poll(conn: &Connector) -> Result<PollReport, AmoError> {
    let amo = conn.amo();
    let now = conn.client.now();
    let stored = conn.ledger().run(|l| l.checkpoint(EVENTS_CHECKPOINT)).await?;
    let cursor: i64 = stored
        .as_deref()
        .and_then(|c| c.parse().ok())
        // first poll: from now on (the history of won deals is not imported)
        .unwrap_or_else(|| now.timestamp());
    let from = cursor - amo.overlap.num_seconds();
    let fields = conn.fields().await?;
    let watched: Vec<i64> = [fields.phone, fields.email, fields.id(CardValue::Card)]
        .into_iter()
        .flatten()
        .chain(fields.sources.iter().map(|f| f.id))
        .collect();
    let types = event_types(!amo.pipelines.is_empty(), &watched);
    let path = format!(
        "/api/v4/events?filter[type]={}&filter[created_at][from]={from}&limit={}",
        types.join(","),
        amo.events_page_size
    );
    let events: Vec<Event> = conn.client.get_all(&path, "events").await?;
    let mut report = PollReport {
        events: events.len(),
        ..Default::default()
    };
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let seen = conn.ledger().run(move |l| l.amocrm_seen_events(&ids)).await?;
    let mut fresh: Vec<&Event> = events.iter().filter(|e| !seen.contains(&e.id)).collect();
    fresh.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let mut uniq = BTreeSet::new();
    fresh.retain(|e| uniq.insert(e.id.clone()));
    report.new_events = fresh.len();
    let mut leads: BTreeMap<i64, i64> = BTreeMap::new();
    let mut contact_events: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
    for e in &fresh {
        let Some(entity) = e.entity_id else { continue };
        let kind = e.kind.as_deref().unwrap_or("");
        let on = e.entity_type.as_deref().unwrap_or("");
        if on == "lead" && (kind == "lead_status_changed" || kind == "sale_field_changed") {
            leads.insert(entity, e.created_at.unwrap_or(cursor));
        } else if on == "contact" {
            contact_events.entry(entity).or_default().push(e);
        }
    }
    let card_event = fields
        .id(CardValue::Card)
        .map(|id| format!("custom_field_{id}_value_changed"));
    let source_events: BTreeSet<String> = fields
        .sources
        .iter()
        .map(|f| format!("custom_field_{}_value_changed", f.id))
        .collect();
    let contacts = contacts_to_read(conn, contact_events, card_event, source_events).await?;
    let tz = conn.cfg.timezone;
    let mut attributes = Vec::new();
    // contacts first: a card typed into a contact decides whose sale a won deal is
    for id in &contacts {
        if let Some(v) = conn.client.get(&format!("/api/v4/contacts/{id}")).await?
            && let Ok(c) = serde_json::from_value::<Contact>(v)
        {
            if relink_changed(conn, &c).await? {
                report.relinked += 1;
            }
            if let Some(a) = attributes_of(&c, &fields.sources, tz) {
                attributes.push((c.id, a));
            }
        }
    }
    let mut items = Vec::new();
    let mut cache: HashMap<i64, Option<Contact>> = HashMap::new();
    let deals_on = !amo.pipelines.is_empty();
    let lead_ids: Vec<(i64, i64)> = leads.into_iter().take(LEADS_PER_POLL).collect();
    let known: Vec<String> = lead_ids.iter().map(|(id, _)| id.to_string()).collect();
    let active = conn.ledger().run(move |l| l.active_sales(SOURCE, &known)).await?;
    for (id, at) in lead_ids.iter().copied().filter(|_| deals_on) {
        let lead = conn
            .client
            .get(&format!("/api/v4/leads/{id}?with=contacts,catalog_elements"))
            .await?
            .and_then(|v| serde_json::from_value::<Lead>(v).ok());
        let fallback = DateTime::from_timestamp(at, 0).unwrap_or(now);
        let Some(lead) = lead else {
            if active.contains(&id.to_string()) {
                items.push(void(id, at, VoidReason::Deleted));
                report.voids += 1;
            }
            continue;
        };
        let won = lead.status_id == Some(amo.won_status)
            && lead.pipeline_id.is_some_and(|p| amo.pipelines.contains(&p));
        if won {
            let contact = match lead.main_contact() {
                Some(cid) => match cache.get(&cid) {
                    Some(c) => c.clone(),
                    None => {
                        let c = conn
                            .client
                            .get(&format!("/api/v4/contacts/{cid}"))
                            .await?
                            .and_then(|v| serde_json::from_value::<Contact>(v).ok());
                        cache.insert(cid, c.clone());
                        c
                    }
                },
                None => None,
            };
            match lead_document(
                &lead,
                contact.as_ref(),
                fields.id(CardValue::Card),
                &amo.deal_category,
                &conn.cfg.limits.currency,
                fallback,
            ) {
                Ok(doc) => {
                    items.push(Item::Incoming(Incoming::Document(doc)));
                    report.sales += 1;
                }
                Err(reason) => items.push(Item::Rejected(crate::core::document::Rejected {
                    system: SOURCE.into(),
                    doc_ref: id.to_string(),
                    reason,
                    location: Some(format!("{}/leads/detail/{id}", conn.client.base_url())),
                    excerpt: None,
                    kind: Some("Сделка".into()),
                    number: Some(id.to_string()),
                    ..Default::default()
                })),
            }
        } else if active.contains(&id.to_string()) {
            items.push(void(id, lead.updated_at.unwrap_or(at), VoidReason::Cancelled));
            report.voids += 1;
        }
    }
    let newest = fresh.iter().filter_map(|e| e.created_at).max().unwrap_or(cursor);
    let next_cursor = newest.max(cursor);
    let seen_now: Vec<(String, i64)> = fresh
        .iter()
        .map(|e| (e.id.clone(), e.created_at.unwrap_or(cursor)))
        .collect();
    let forget_before =
        DateTime::from_timestamp(from - amo.overlap.num_seconds(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let batch = Batch {
        source: EVENTS_CHECKPOINT.into(),
        items,
        checkpoint: Some(next_cursor.to_string()),
        ..Default::default()
    };
    let r = conn
        .with_ledger(move |l, ctx| l.amocrm_ingest_events(batch, &seen_now, forget_before, ctx))
        .await?;
    report.applied = r.applied + r.new_versions + r.voided;
    report.unchanged = r.unchanged + r.stale;
    // a won deal's contact, read for the sale, is linked to its customer now: what its
    // card says of them applies too
    let read: BTreeSet<i64> = attributes.iter().map(|(id, _)| *id).collect();
    for c in cache.values().flatten() {
        if !read.contains(&c.id)
            && let Some(a) = attributes_of(c, &fields.sources, tz)
        {
            attributes.push((c.id, a));
        }
    }
    let applied = super::attributes::apply(conn, attributes).await?;
    report.attributes_changed = applied.changed;
    report.attributes_refused = applied.refused.len();
    report.attributes_kept = applied.kept;
    Ok(report)
}

/// The contacts whose events may change a link or a customer's attributes. A contact
/// already linked is skipped (kopilka's own writes come back as events too) unless a card
/// number was typed into it that belongs to another customer, or a `[sources]` field of it
/// changed (kopilka never writes those): reading every contact behind every event would
/// crawl the account, which AmoCRM penalises.
async fn contacts_to_read(
    conn: &Connector,
    events: BTreeMap<i64, Vec<&Event>>,
    card_event: Option<String>,
    source_events: BTreeSet<String>,
) -> Result<BTreeSet<i64>, AmoError> {
    let mut plan: Vec<(i64, Vec<String>)> = Vec::new();
    let mut attributes_changed = BTreeSet::new();
    for (contact, list) in events {
        if list
            .iter()
            .any(|e| e.kind.as_ref().is_some_and(|k| source_events.contains(k)))
        {
            attributes_changed.insert(contact);
        }
        let cards: Vec<String> = list
            .iter()
            .filter(|e| card_event.is_some() && e.kind == card_event)
            .flat_map(|e| {
                let mut out = Vec::new();
                strings_in(e.value_after.as_ref(), &mut out);
                out
            })
            .filter_map(|v| normalize_card(&v))
            .collect();
        plan.push((contact, cards));
    }
    let out = conn
        .ledger()
        .run(move |l| -> crate::ledger::Result<BTreeSet<i64>> {
            let mut read = BTreeSet::new();
            for (contact, cards) in plan {
                let Some(owner) = l.amocrm_customer_of(contact)? else {
                    read.insert(contact);
                    continue;
                };
                if attributes_changed.contains(&contact) {
                    read.insert(contact);
                    continue;
                }
                let mine = l.customer_keys_of(owner)?.cards;
                if cards.iter().any(|c| !mine.contains(c)) {
                    read.insert(contact);
                }
            }
            Ok(read)
        })
        .await?;
    Ok(out)
}

/// Every string inside a JSON value (event values carry the typed text somewhere inside).
fn strings_in(v: Option<&serde_json::Value>, out: &mut Vec<String>) {
    match v {
        Some(serde_json::Value::String(s)) => out.push(s.clone()),
        Some(serde_json::Value::Array(a)) => a.iter().for_each(|x| strings_in(Some(x), out)),
        Some(serde_json::Value::Object(o)) => o.values().for_each(|x| strings_in(Some(x), out)),
        _ => {}
    }
}

fn void(lead: i64, stamp: i64, reason: VoidReason) -> Item {
    Item::Incoming(Incoming::Void {
        source: SourceRef {
            system: SOURCE.into(),
            doc_id: lead.to_string(),
            version: format!("{}:{stamp}", reason.as_str()),
            stamp: Some(stamp),
        },
        reason,
    })
}
