//! Matching ledger customers to AmoCRM contacts, and creating the contacts that are missing.
//!
//! Order of trust: the stored link → the card-number field → phone → e-mail. AmoCRM's
//! `query` search is fuzzy, so every candidate is re-checked here: phones normalised to
//! E.164 on both sides (searched by their last ten digits), e-mails compared without case,
//! card numbers normalised. Several candidates at one step → nothing is written and the
//! customer is listed by `kopilka amocrm unmatched` (a wrong match once overwrote the wrong
//! contact's balance in the field). None at all → the contact is created when
//! `create_missing` is on, carrying the customer's phone, e-mail and card.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Value, json};

use super::AmoError;
use super::attributes::attributes_of;
use super::client::Send;
use super::connector::Connector;
use super::fields::{CardValue, Resolved};
use super::wire::{Contact, Page};
use crate::core::identity::{Email, Phone, normalize_card};
use crate::ledger::{Attributes, CustomerKeys};

/// Above this many customers to match in one run, all contacts are read once (250 a page)
/// instead of searching three times per customer.
pub const SEARCH_AT_MOST_CUSTOMERS: usize = 60;
/// Customers matched per run at most, so a huge first run yields to other jobs.
pub const MATCH_PER_RUN_CUSTOMERS: usize = 20_000;
/// An unmatched customer is tried again after this long (the CRM may have been cleaned up).
pub const RETRY_UNMATCHED_HOURS: i64 = 24;

/// What a contact says about who it is, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactKeys {
    pub id: i64,
    pub cards: Vec<String>,
    pub phones: Vec<String>,
    pub emails: Vec<String>,
}

impl ContactKeys {
    pub fn of(c: &Contact, card_field: Option<i64>) -> ContactKeys {
        let card_code = CardValue::Card.default_code();
        ContactKeys {
            id: c.id,
            cards: c
                .values_of(card_code, card_field)
                .iter()
                .filter_map(|v| normalize_card(v))
                .collect(),
            phones: c
                .values_of("PHONE", None)
                .iter()
                .filter_map(|v| Phone::parse(v))
                .map(|p| p.as_str().to_string())
                .collect(),
            emails: c
                .values_of("EMAIL", None)
                .iter()
                .filter_map(|v| Email::parse(v))
                .map(|e| e.as_str().to_string())
                .collect(),
        }
    }
}

/// The outcome of matching one customer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Link { contact: i64, by: &'static str },
    Ambiguous { by: &'static str, candidates: Vec<i64> },
    Create,
    Nothing,
}

/// A matching step: its name and whether a contact matches the customer at it.
type Step<'a> = (&'static str, Box<dyn Fn(&ContactKeys) -> bool + 'a>);

/// Which step matched how many contacts: the pure heart of matching, so it can be tested
/// on tables without a network. `contacts` are the candidates the searches returned.
pub fn decide(customer: &CustomerKeys, contacts: &[ContactKeys], create_missing: bool) -> Decision {
    let steps: [Step<'_>; 3] = [
        (
            "card",
            Box::new(|c: &ContactKeys| {
                customer
                    .cards
                    .iter()
                    .filter_map(|v| normalize_card(v))
                    .any(|k| c.cards.contains(&k))
            }),
        ),
        (
            "phone",
            Box::new(|c: &ContactKeys| {
                customer
                    .phones
                    .iter()
                    .filter_map(|v| Phone::parse(v))
                    .any(|p| c.phones.iter().any(|x| x == p.as_str()))
            }),
        ),
        (
            "email",
            Box::new(|c: &ContactKeys| {
                customer
                    .emails
                    .iter()
                    .filter_map(|v| Email::parse(v))
                    .any(|e| c.emails.iter().any(|x| x == e.as_str()))
            }),
        ),
    ];
    for (by, matches) in &steps {
        let ids: BTreeSet<i64> = contacts.iter().filter(|c| matches(c)).map(|c| c.id).collect();
        match ids.len() {
            0 => continue,
            1 => {
                if let Some(contact) = ids.into_iter().next() {
                    return Decision::Link { contact, by };
                }
            }
            _ => {
                return Decision::Ambiguous {
                    by,
                    candidates: ids.into_iter().collect(),
                };
            }
        }
    }
    if create_missing {
        Decision::Create
    } else {
        Decision::Nothing
    }
}

/// What a matching run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatchReport {
    pub linked: usize,
    pub created: usize,
    pub ambiguous: usize,
    pub not_found: usize,
    pub conflicts: usize,
    /// Customers whose attributes the linked contacts' `[sources]` fields changed.
    pub attributes_changed: usize,
    /// Values refused (each in its customer's history).
    pub attributes_refused: usize,
    /// Values another source set, kept (the conflict in the customer's history).
    pub attributes_kept: usize,
}

/// Percent-encodes a query parameter value.
pub fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Attributes read from the contacts seen while matching, by contact id: a contact read
/// to match is not read again to learn the customer's birthday.
type SeenAttributes = HashMap<i64, Attributes>;

/// Keeps what these contacts' source fields say, when `[sources]` names any.
fn note_attributes(conn: &Connector, fields: &Resolved, list: &[Contact], seen: &mut SeenAttributes) {
    if fields.sources.is_empty() {
        return;
    }
    for c in list {
        if let Some(a) = attributes_of(c, &fields.sources, conn.cfg.timezone) {
            seen.insert(c.id, a);
        }
    }
}

async fn search(
    conn: &Connector,
    query: &str,
    fields: &Resolved,
    seen: &mut SeenAttributes,
) -> Result<Vec<ContactKeys>, AmoError> {
    let list: Vec<Contact> = conn
        .client
        .get_all(
            &format!("/api/v4/contacts?query={}&limit=250", enc(query)),
            "contacts",
        )
        .await?;
    note_attributes(conn, fields, &list, seen);
    let card_field = fields.id(CardValue::Card);
    Ok(list.iter().map(|c| ContactKeys::of(c, card_field)).collect())
}

/// The candidates the searches for one customer return: by card, by the last ten digits of
/// each phone, by each e-mail. Later searches are skipped once an earlier step decides.
async fn candidates_by_search(
    conn: &Connector,
    customer: &CustomerKeys,
    fields: &Resolved,
    seen: &mut SeenAttributes,
) -> Result<Vec<ContactKeys>, AmoError> {
    let mut found: HashMap<i64, ContactKeys> = HashMap::new();
    let probe = |found: &HashMap<i64, ContactKeys>| {
        let list: Vec<ContactKeys> = found.values().cloned().collect();
        !matches!(decide(customer, &list, false), Decision::Nothing)
    };
    for card in &customer.cards {
        for c in search(conn, card, fields, seen).await? {
            found.insert(c.id, c);
        }
    }
    if probe(&found) {
        return Ok(found.into_values().collect());
    }
    for phone in customer.phones.iter().filter_map(|p| Phone::parse(p)) {
        for c in search(conn, phone.last_ten(), fields, seen).await? {
            found.insert(c.id, c);
        }
    }
    if probe(&found) {
        return Ok(found.into_values().collect());
    }
    for email in &customer.emails {
        for c in search(conn, email, fields, seen).await? {
            found.insert(c.id, c);
        }
    }
    Ok(found.into_values().collect())
}

/// Candidates from one read of every contact, indexed by card, phone and e-mail.
struct Index {
    contacts: Vec<ContactKeys>,
    by_key: HashMap<String, Vec<usize>>,
}

impl Index {
    async fn read(conn: &Connector, fields: &Resolved, seen: &mut SeenAttributes) -> Result<Index, AmoError> {
        let list: Vec<Contact> = conn
            .client
            .get_all("/api/v4/contacts?limit=250", "contacts")
            .await?;
        note_attributes(conn, fields, &list, seen);
        let card_field = fields.id(CardValue::Card);
        let contacts: Vec<ContactKeys> = list.iter().map(|c| ContactKeys::of(c, card_field)).collect();
        let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in contacts.iter().enumerate() {
            for k in c.cards.iter().map(|v| format!("card:{v}")) {
                by_key.entry(k).or_default().push(i);
            }
            for k in c.phones.iter().map(|v| format!("phone:{v}")) {
                by_key.entry(k).or_default().push(i);
            }
            for k in c.emails.iter().map(|v| format!("email:{v}")) {
                by_key.entry(k).or_default().push(i);
            }
        }
        Ok(Index { contacts, by_key })
    }

    fn candidates(&self, customer: &CustomerKeys) -> Vec<ContactKeys> {
        let keys = customer
            .cards
            .iter()
            .filter_map(|v| normalize_card(v))
            .map(|v| format!("card:{v}"))
            .chain(
                customer
                    .phones
                    .iter()
                    .filter_map(|v| Phone::parse(v))
                    .map(|p| format!("phone:{p}")),
            )
            .chain(
                customer
                    .emails
                    .iter()
                    .filter_map(|v| Email::parse(v))
                    .map(|e| format!("email:{e}")),
            );
        let mut seen = BTreeSet::new();
        keys.flat_map(|k| self.by_key.get(&k).cloned().unwrap_or_default())
            .filter(|i| seen.insert(*i))
            .filter_map(|i| self.contacts.get(i).cloned())
            .collect()
    }
}

/// The contact fields of a new contact for a customer.
fn new_contact(customer: &CustomerKeys, fields: &Resolved, request_id: usize) -> Value {
    let mut cf = Vec::new();
    let phones: Vec<Value> = customer
        .phones
        .iter()
        .map(|p| json!({"value": p, "enum_code": "MOB"}))
        .collect();
    if !phones.is_empty() {
        cf.push(json!({"field_code": "PHONE", "values": phones}));
    }
    let emails: Vec<Value> = customer
        .emails
        .iter()
        .map(|e| json!({"value": e, "enum_code": "WORK"}))
        .collect();
    if !emails.is_empty() {
        cf.push(json!({"field_code": "EMAIL", "values": emails}));
    }
    if let (Some(card), Some(id)) = (customer.cards.first(), fields.id(CardValue::Card)) {
        cf.push(json!({"field_id": id, "values": [{"value": card}]}));
    }
    let name = customer.name.clone().unwrap_or_else(|| {
        let key = customer
            .cards
            .first()
            .or(customer.phones.first())
            .or(customer.emails.first())
            .cloned()
            .unwrap_or_else(|| format!("id:{}", customer.customer_id));
        format!("Покупатель {key}")
    });
    json!({"name": name, "request_id": request_id.to_string(), "custom_fields_values": cf})
}

/// Links every customer without a contact that is due for matching: finds, decides, and
/// creates the missing contacts in batches with `request_id` correlation.
pub async fn match_unlinked(conn: &Connector) -> Result<MatchReport, AmoError> {
    let now = conn.client.now();
    let retry_before = now - chrono::Duration::hours(RETRY_UNMATCHED_HOURS);
    let todo = conn
        .ledger()
        .run(move |l| l.amocrm_customers_to_match(retry_before, MATCH_PER_RUN_CUSTOMERS))
        .await?;
    let mut report = MatchReport::default();
    if todo.is_empty() {
        return Ok(report);
    }
    let fields = conn.fields().await?;
    let mut seen = SeenAttributes::new();
    let index = if todo.len() > SEARCH_AT_MOST_CUSTOMERS {
        Some(Index::read(conn, &fields, &mut seen).await?)
    } else {
        None
    };
    let create = conn.amo().create_missing;
    let mut to_create = Vec::new();
    let mut links: Vec<(CustomerKeys, i64, &'static str)> = Vec::new();
    for customer in todo {
        let candidates = match &index {
            Some(ix) => ix.candidates(&customer),
            None => candidates_by_search(conn, &customer, &fields, &mut seen).await?,
        };
        match decide(&customer, &candidates, create) {
            Decision::Link { contact, by } => links.push((customer, contact, by)),
            Decision::Ambiguous { by, candidates } => {
                report.ambiguous += 1;
                tracing::warn!(customer = customer.customer_id, by, candidates = ?candidates,
                    "several AmoCRM contacts match a customer; nothing is written until a person resolves it");
                let reason = format!("ambiguous {by}: {} contacts match", candidates.len());
                let id = customer.customer_id;
                conn.ledger()
                    .run(move |l| l.amocrm_record_unmatched(id, &reason, &candidates, now))
                    .await?;
            }
            Decision::Create => to_create.push(customer),
            Decision::Nothing => {
                report.not_found += 1;
                let id = customer.customer_id;
                conn.ledger()
                    .run(move |l| {
                        l.amocrm_record_unmatched(id, "no matching contact (create_missing is off)", &[], now)
                    })
                    .await?;
            }
        }
    }
    let batch = conn.amo().batch_size.clamp(1, 50);
    for chunk in to_create.chunks(batch) {
        let body = Value::Array(
            chunk
                .iter()
                .enumerate()
                .map(|(i, c)| new_contact(c, &fields, i))
                .collect(),
        );
        let reply = conn
            .client
            .send(
                reqwest::Method::POST,
                "/api/v4/contacts",
                Send {
                    body: Some(&body),
                    halve_on_504: false,
                },
            )
            .await?;
        let page: Page = reply
            .map(|v| serde_json::from_value(v).unwrap_or_default())
            .unwrap_or_default();
        let (made, _) = page.items::<Value>("contacts");
        for (pos, item) in made.iter().enumerate() {
            let id = item.get("id").and_then(Value::as_i64);
            // the reply echoes request_id; fall back to the position when it does not
            let rid = item
                .get("request_id")
                .and_then(|r| {
                    r.as_str()
                        .map(str::to_string)
                        .or_else(|| r.as_i64().map(|n| n.to_string()))
                })
                .and_then(|r| r.parse::<usize>().ok())
                .unwrap_or(pos);
            if let (Some(id), Some(customer)) = (id, chunk.get(rid)) {
                links.push((customer.clone(), id, "created"));
            }
        }
    }
    let linked = apply_links(conn, links, &mut report).await?;
    // the contacts just linked: what their cards say of the customer (a contact kopilka
    // created carries nothing a manager typed)
    let read: Vec<(i64, Attributes)> = linked
        .into_iter()
        .filter_map(|contact| seen.remove(&contact).map(|a| (contact, a)))
        .collect();
    let applied = super::attributes::apply(conn, read).await?;
    report.attributes_changed = applied.changed;
    report.attributes_refused = applied.refused.len();
    report.attributes_kept = applied.kept;
    Ok(report)
}

/// Links per ledger transaction.
const LINKS_PER_TRANSACTION: usize = 1000;

/// Links the matches; returns the contacts linked.
async fn apply_links(
    conn: &Connector,
    links: Vec<(CustomerKeys, i64, &'static str)>,
    report: &mut MatchReport,
) -> Result<Vec<i64>, AmoError> {
    let mut linked_contacts = Vec::new();
    for chunk in links.chunks(LINKS_PER_TRANSACTION) {
        let pairs: Vec<(i64, i64)> = chunk
            .iter()
            .map(|(c, contact, _)| (c.customer_id, *contact))
            .collect();
        let done = conn
            .with_ledger(move |l, ctx| l.amocrm_link_many(&pairs, ctx))
            .await?;
        for ((customer, contact, by), linked) in chunk.iter().zip(done) {
            if linked {
                linked_contacts.push(*contact);
                if *by == "created" {
                    report.created += 1;
                } else {
                    report.linked += 1;
                }
                tracing::debug!(
                    customer = customer.customer_id,
                    contact,
                    by,
                    "customer linked to an AmoCRM contact"
                );
            } else {
                conflict(conn, customer.customer_id, *contact, by).await?;
                report.conflicts += 1;
            }
        }
    }
    Ok(linked_contacts)
}

async fn conflict(conn: &Connector, customer: i64, contact: i64, by: &str) -> Result<(), AmoError> {
    let now = conn.client.now();
    let owner = conn.ledger().run(move |l| l.amocrm_customer_of(contact)).await?;
    let reason = format!(
        "the matching contact {contact} (by {by}) is linked to customer id:{}",
        owner.unwrap_or_default()
    );
    conn.ledger()
        .run(move |l| l.amocrm_record_unmatched(customer, &reason, &[contact], now))
        .await?;
    Ok(())
}

/// A contact changed in AmoCRM (a manager typed a card number, a phone or an e-mail):
/// link it to the customer those keys name. A card number is the strongest key and moves
/// the customer's link to this contact; a phone or e-mail only links a customer that has
/// no contact yet. Returns whether a link was made.
pub async fn relink_changed(conn: &Connector, contact: &Contact) -> Result<bool, AmoError> {
    let fields = conn.fields().await?;
    let keys = ContactKeys::of(contact, fields.id(CardValue::Card));
    let id = contact.id;
    let plan = conn
        .ledger()
        .run(
            move |l| -> Result<Option<(i64, bool)>, crate::ledger::LedgerError> {
                let one =
                    |kind: &str, values: &[String]| -> Result<Option<i64>, crate::ledger::LedgerError> {
                        let mut found = BTreeSet::new();
                        for v in values {
                            found.extend(l.customers_by_key(kind, v)?);
                        }
                        Ok((found.len() == 1).then(|| found.into_iter().next()).flatten())
                    };
                if let Some(c) = one("card", &keys.cards)? {
                    return Ok(Some((c, true)));
                }
                for (kind, values) in [("phone", &keys.phones), ("email", &keys.emails)] {
                    if let Some(c) = one(kind, values)? {
                        let linked = l.amocrm_links(&[c])?;
                        return Ok((!linked.contains_key(&c)).then_some((c, false)));
                    }
                }
                Ok(None)
            },
        )
        .await?;
    let Some((customer, replace)) = plan else {
        return Ok(false);
    };
    let linked = conn
        .with_ledger(move |l, ctx| l.amocrm_link(customer, id, replace, ctx))
        .await?;
    if linked {
        tracing::info!(
            customer,
            contact = id,
            "a contact edited in AmoCRM is now linked to its customer"
        );
    }
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(enc("a+b@x.ru"), "a%2Bb%40x.ru");
        assert_eq!(enc("9123456789"), "9123456789");
    }
}
