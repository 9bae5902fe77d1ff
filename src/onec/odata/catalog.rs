//! What documents refer to: products, groups and cost prices (into the ledger's catalog),
//! loyalty cards and customers (into a document's customer identity), and 1C's own bonus
//! balances (into opening balances).
//!
//! The catalog has no change feed either. Products and groups are listed whole (a few
//! fields each) and only those whose `DataVersion` changed since the last sync go to the
//! ledger; prices are read incrementally by `Period` from the checkpoint
//! `<system>:odata:prices`, keeping only the cost price type. Cards and customers are read
//! by key when a document names them, once per poll each; `bonus_balances` reads whole
//! catalogs instead when it needs many of them.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

use super::json::{Obj, decimal, flag, local_time, reference, text};
use super::poll::{OdataPoller, Reference, Run, State, page_query, reference_of, to_utc};
use super::{OdataClient, OdataError, by_key, datetime_literal};
use crate::core::identity::{CustomerIdentity, Email, Phone};
use crate::core::money::Money;
use crate::ledger::{Batch, CatalogItem, IngestContext, LedgerError, OpeningRow, SharedLedger};
use crate::onec::mapping::{self, AttributesMap, BonusHolder, CardMap, Mapping, MappingError, PeopleMap};

/// More holders than this in the bonus register and whole catalogs are read instead of one
/// request per holder.
const BULK_LOOKUP_THRESHOLD: usize = 50;
/// Pages read per catalog listing.
const MAX_CATALOG_PAGES: usize = 100_000;

/// What a catalog sync stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogSync {
    pub groups: usize,
    pub products: usize,
    pub price_types: usize,
    pub prices: usize,
    /// Products and groups listed but unchanged since the last sync.
    pub unchanged: usize,
}

#[derive(Clone, Debug)]
struct Card {
    number: Option<String>,
    owner: Option<Reference>,
}

#[derive(Clone, Debug)]
struct Person {
    name: Option<String>,
    phone: Option<Phone>,
    email: Option<Email>,
    birthday: Option<chrono::NaiveDate>,
    /// Its additional attribute rows, when the mapping reads any.
    attributes: Vec<super::attributes::Row>,
}

/// Cards and customers read during one poll. A lookup that found nothing is remembered too,
/// as the reason a document naming it is rejected. People are keyed by (catalog, key): a
/// composite owner may point into any of `[people]`'s catalogs.
#[derive(Default)]
pub(crate) struct Customers {
    cards: HashMap<String, Result<Card, String>>,
    people: HashMap<(String, String), Result<Person, String>>,
    /// The attribute rows of the customers documents named since the last
    /// [`Customers::take_attributes`], by 1C key.
    attributes: HashMap<String, Vec<super::attributes::Row>>,
}

fn card_select(m: &CardMap) -> String {
    let mut f = vec!["Ref_Key".to_string()];
    f.extend(m.number.iter().cloned());
    if let Some(o) = &m.owner {
        f.push(o.clone());
        if mapping::is_composite(o) {
            f.push(mapping::type_field(o));
        }
    }
    f.join(",")
}

/// The catalog of `[people]` a reference points into: its `_Type` names it, a single-type
/// reference is the main catalog. `None`: a type that is no customer (Розница 2's
/// `Пользователи`, a card given to an employee).
fn people_set<'a>(m: &'a PeopleMap, r: &Reference) -> Option<&'a str> {
    match &r.1 {
        None => Some(m.set.as_str()),
        Some(t) => {
            let wanted = mapping::type_set(t);
            m.sets().find(|s| s.eq_ignore_ascii_case(wanted))
        }
    }
}

fn card_from(m: &CardMap, o: &Obj) -> Card {
    Card {
        number: m
            .number
            .iter()
            .filter_map(|f| text(o, f).map(str::trim))
            .find(|s| !s.is_empty())
            .map(str::to_string),
        owner: m.owner.as_ref().and_then(|f| reference_of(o, f)),
    }
}

fn person_select(m: &PeopleMap, set: &str, attrs: Option<&AttributesMap>) -> String {
    let mut f = vec!["Ref_Key".to_string(), m.name.clone()];
    if let Some(a) = attrs.filter(|a| a.reads()) {
        f.extend(super::attributes::select(a));
    }
    if let Some(b) = m.birth_date_of(set) {
        f.push(b.to_string());
    }
    if let Some(c) = &m.contacts {
        f.push(format!("{c}/{}", m.contact_kind));
        f.push(format!("{c}/{}", m.contact_value));
    }
    f.join(",")
}

fn person_from(m: &PeopleMap, set: &str, attrs: Option<&AttributesMap>, o: &Obj) -> Person {
    let mut p = Person {
        attributes: attrs
            .filter(|a| a.reads())
            .map(|a| super::attributes::rows_of(a, o))
            .unwrap_or_default(),
        name: text(o, &m.name)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        phone: None,
        email: None,
        // 1C writes an empty date as 0001-01-01T00:00:00
        birthday: m
            .birth_date_of(set)
            .and_then(|f| text(o, f))
            .and_then(|t| chrono::NaiveDate::parse_from_str(t.get(..10).unwrap_or(t), "%Y-%m-%d").ok())
            .filter(|d| chrono::Datelike::year(d) > 1),
    };
    let rows = m
        .contacts
        .as_ref()
        .and_then(|c| o.get(c))
        .and_then(Value::as_array);
    for row in rows.into_iter().flatten().filter_map(Value::as_object) {
        let kind = text(row, &m.contact_kind).unwrap_or("").trim();
        let value = text(row, &m.contact_value).unwrap_or("");
        let is = |kinds: &[String]| kinds.iter().any(|k| k.eq_ignore_ascii_case(kind));
        if p.phone.is_none() && is(&m.phone_kinds) {
            p.phone = Phone::parse(value);
        } else if p.email.is_none() && is(&m.email_kinds) {
            p.email = Email::parse(value);
        }
    }
    p
}

fn no_table(mapping: &Mapping, table: &str, why: &str) -> OdataError {
    OdataError::Mapping(MappingError {
        origin: mapping.origin.clone(),
        problems: vec![format!("{table}: {why}")],
    })
}

impl Customers {
    async fn card(
        &mut self,
        client: &OdataClient,
        m: &CardMap,
        key: &str,
    ) -> Result<Result<Card, String>, OdataError> {
        if let Some(c) = self.cards.get(key) {
            return Ok(c.clone());
        }
        let q = [("$select", card_select(m))];
        let found = client.object(&m.set, &by_key(&m.set, key), &q).await?;
        let c = match found {
            Some(o) => Ok(card_from(m, &o)),
            None => Err(format!("card {key} is not in {}", m.set)),
        };
        self.cards.insert(key.to_string(), c.clone());
        Ok(c)
    }

    async fn person(
        &mut self,
        client: &OdataClient,
        m: &PeopleMap,
        attrs: Option<&AttributesMap>,
        (set, key): (&str, &str),
    ) -> Result<Result<Person, String>, OdataError> {
        let cache_key = (set.to_string(), key.to_string());
        if let Some(p) = self.people.get(&cache_key) {
            return Ok(p.clone());
        }
        let q = [("$select", person_select(m, set, attrs))];
        let found = client.object(set, &by_key(set, key), &q).await?;
        let p = match found {
            Some(o) => Ok(person_from(m, set, attrs, &o)),
            None => Err(format!("customer {key} is not in {set}")),
        };
        self.people.insert(cache_key, p.clone());
        Ok(p)
    }

    /// Reads a whole catalog of cards or customers into the cache, page by page.
    pub(crate) async fn preload(
        &mut self,
        client: &OdataClient,
        mapping: &Mapping,
        page: usize,
    ) -> Result<(), OdataError> {
        if let Some(m) = &mapping.cards {
            let select = card_select(m);
            for o in list_all(client, &m.set, &select, None, "Ref_Key", page).await? {
                if let Some(k) = reference(&o, "Ref_Key") {
                    self.cards.insert(k.to_string(), Ok(card_from(m, &o)));
                }
            }
        }
        if let Some(m) = &mapping.people {
            let attrs = mapping.attributes.as_ref();
            for set in m.sets() {
                let select = person_select(m, set, attrs);
                for o in list_all(client, set, &select, None, "Ref_Key", page).await? {
                    if let Some(k) = reference(&o, "Ref_Key") {
                        self.people.insert(
                            (set.to_string(), k.to_string()),
                            Ok(person_from(m, set, attrs, &o)),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The attribute rows of the customers read since the last call, by 1C key.
    pub(crate) fn take_attributes(&mut self) -> Vec<(String, Vec<super::attributes::Row>)> {
        self.attributes.drain().collect()
    }

    /// The customer a document names by its card and/or customer reference. `Ok(Err(_))` is
    /// a reference that leads nowhere: the document is rejected with that reason.
    pub(crate) async fn identity(
        &mut self,
        client: &OdataClient,
        mapping: &Mapping,
        card: Option<&str>,
        customer: Option<Reference>,
    ) -> Result<Result<CustomerIdentity, String>, OdataError> {
        let mut id = CustomerIdentity::default();
        let mut owner: Option<Reference> = None;
        if let (Some(key), Some(m)) = (card, &mapping.cards) {
            match self.card(client, m, key).await? {
                Ok(c) => {
                    id.card = c.number;
                    owner = c.owner;
                }
                Err(reason) => return Ok(Err(reason)),
            }
        }
        // the card's holder presented it; the document's counterparty was chosen by the cashier
        let person = owner.or(customer);
        let target = match (&person, &mapping.people) {
            (Some(r), Some(m)) => people_set(m, r).map(|set| (m, set, r.0.as_str())),
            _ => None,
        };
        if let Some((m, set, key)) = target {
            match self
                .person(client, m, mapping.attributes.as_ref(), (set, key))
                .await?
            {
                Ok(p) => {
                    if !p.attributes.is_empty() {
                        self.attributes.insert(key.to_string(), p.attributes.clone());
                    }
                    id.onec_id = Some(key.to_string());
                    id.name = p.name;
                    id.phone = p.phone;
                    id.email = p.email;
                    id.birthday = p.birthday;
                }
                Err(reason) => return Ok(Err(reason)),
            }
        }
        Ok(Ok(id))
    }
}

/// Lists a whole set page by page under a fixed order, stopping on a short page.
async fn list_all(
    client: &OdataClient,
    set: &str,
    select: &str,
    filter: Option<&str>,
    orderby: &str,
    page: usize,
) -> Result<Vec<Obj>, OdataError> {
    let page = page.max(1);
    let mut out = Vec::new();
    for n in 0..MAX_CATALOG_PAGES {
        let q = page_query(select, filter, orderby, n * page, page);
        let items = client.list(set, set, &q).await?;
        let short = items.len() < page;
        out.extend(items);
        if short {
            break;
        }
    }
    Ok(out)
}

impl OdataPoller {
    /// The customer a card reference names, built exactly as the poll builds a receipt's
    /// customer from its card (the card's number, its owner's 1C key, name, phone and
    /// e-mail), for callers that are handed 1C's card ref GUID (Розница's «Дисконтный
    /// сервер»). `Ok(Err(reason))`: 1C has no such card.
    pub async fn card_customer(
        &self,
        card_key: &str,
    ) -> Result<Result<CustomerIdentity, String>, OdataError> {
        if self.mapping.cards.is_none() {
            return Ok(Err(format!(
                "mapping {} has no [cards]: a card reference cannot be read",
                self.mapping.origin
            )));
        }
        let mut customers = Customers::default();
        customers
            .identity(&self.client, &self.mapping, Some(card_key), None)
            .await
    }

    /// Reads products, groups, price types and cost prices into the ledger's catalog.
    pub async fn sync_catalog(
        &self,
        ledger: &SharedLedger,
        now: DateTime<Utc>,
    ) -> Result<CatalogSync, OdataError> {
        let mut st = self.state.lock().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut run = self.new_run(ledger, now, &cancel);
        self.sync_catalog_locked(&mut st, &mut run).await
    }

    pub(crate) async fn sync_catalog_locked(
        &self,
        st: &mut State,
        run: &mut Run<'_>,
    ) -> Result<CatalogSync, OdataError> {
        let page = self.odata.page_size.max(1) as usize;
        let mut sync = CatalogSync::default();
        let mut items = Vec::new();
        let mut seen = Vec::new();

        let pm = &self.mapping.products;
        let mut select = vec![
            "Ref_Key",
            "DataVersion",
            "DeletionMark",
            "Description",
            "Parent_Key",
            "IsFolder",
        ];
        select.extend(pm.article.as_deref());
        select.extend(pm.service.as_deref());
        let mut groups = Vec::new();
        let mut products = Vec::new();
        for o in list_all(&self.client, &pm.set, &select.join(","), None, "Ref_Key", page).await? {
            let Some(key) = reference(&o, "Ref_Key") else {
                continue;
            };
            let version = text(&o, "DataVersion").unwrap_or("").to_string();
            let name = text(&o, "Description").unwrap_or("").trim().to_string();
            if st
                .products
                .get(key)
                .is_some_and(|(v, _)| *v == version && !version.is_empty())
            {
                sync.unchanged += 1;
                continue;
            }
            let parent = reference(&o, "Parent_Key").map(str::to_string);
            if flag(&o, "IsFolder") == Some(true) {
                groups.push(CatalogItem::Group {
                    id: key.to_string(),
                    name: name.clone(),
                    parent,
                });
                sync.groups += 1;
            } else {
                let service = pm.service.as_ref().is_some_and(|f| {
                    let v = text(&o, f).unwrap_or("").trim();
                    pm.service_values.iter().any(|s| s.eq_ignore_ascii_case(v))
                });
                products.push(CatalogItem::Product {
                    id: key.to_string(),
                    name: name.clone(),
                    article: pm
                        .article
                        .as_ref()
                        .and_then(|f| text(&o, f))
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    group: parent,
                    service,
                    deleted: flag(&o, "DeletionMark") == Some(true),
                });
                sync.products += 1;
            }
            seen.push((key.to_string(), version, name));
        }
        items.extend(groups);
        items.extend(products);

        let mut prices_cursor = None;
        if let (Some(prm), Some(cost)) = (&self.mapping.prices, &self.cost) {
            let types = list_all(
                &self.client,
                &prm.price_types,
                "Ref_Key,Description",
                None,
                "Ref_Key",
                page,
            )
            .await?;
            let wanted = cost.price_type.trim();
            let mut cost_keys = Vec::new();
            for t in &types {
                let Some(key) = reference(t, "Ref_Key") else {
                    continue;
                };
                let name = text(t, "Description").unwrap_or("").trim();
                items.push(CatalogItem::PriceType {
                    id: key.to_string(),
                    name: name.to_string(),
                    currency: None,
                });
                sync.price_types += 1;
                if key.eq_ignore_ascii_case(wanted) || name.to_lowercase() == wanted.to_lowercase() {
                    cost_keys.push(key.to_string());
                }
            }
            if cost_keys.is_empty() {
                let known: Vec<&str> = types.iter().filter_map(|t| text(t, "Description")).collect();
                run.warn(format!(
                    "cost price type {wanted:?} is not in {} (there: {}); costs stay unknown",
                    prm.price_types,
                    known.join(", ")
                ));
            } else {
                let key = self.prices_key();
                let ledger = run.ledger;
                let cursor = ledger
                    .run(move |l| l.checkpoint(&key))
                    .await?
                    .and_then(|c| NaiveDateTime::parse_from_str(&c, "%Y-%m-%dT%H:%M:%S").ok());
                let filter =
                    cursor.map(|c| format!("Period ge {}", datetime_literal(c - self.odata.overlap)));
                let mut select = vec![
                    "Period",
                    prm.product.as_str(),
                    prm.price_type.as_str(),
                    prm.price.as_str(),
                ];
                select.extend(prm.variant.as_deref());
                let order = format!("Period,{}", prm.product);
                let records = list_all(
                    &self.client,
                    &prm.set,
                    &select.join(","),
                    filter.as_deref(),
                    &order,
                    page,
                )
                .await?;
                let mut latest = cursor;
                for r in &records {
                    let period = text(r, "Period").and_then(|t| local_time(t).ok().flatten());
                    if let Some(p) = period {
                        latest = Some(latest.map_or(p, |l| l.max(p)));
                    }
                    let ty = reference(r, &prm.price_type).unwrap_or("");
                    if !cost_keys.iter().any(|k| k == ty) {
                        continue;
                    }
                    let (Some(product), Some(period)) = (reference(r, &prm.product), period) else {
                        continue;
                    };
                    let Ok(Some(price)) = decimal(r, &prm.price) else {
                        continue;
                    };
                    let Ok(unit_price) = Money::from_rubles(price) else {
                        continue;
                    };
                    let product_id = match prm.variant.as_ref().and_then(|v| reference(r, v)) {
                        Some(v) => format!("{product}#{v}"),
                        None => product.to_string(),
                    };
                    items.push(CatalogItem::Price {
                        product_id,
                        price_type: ty.to_string(),
                        valid_from: to_utc(period, self.cfg.timezone),
                        unit_price,
                    });
                    sync.prices += 1;
                }
                prices_cursor =
                    latest.map(|l| l.min(run.now_local()).format("%Y-%m-%dT%H:%M:%S").to_string());
            }
        }

        let now = run.now;
        let catalog_key = self.catalog_key();
        let prices_key = self.prices_key();
        let cfg = self.cfg.clone();
        run.ledger
            .run(move |l| -> Result<(), LedgerError> {
                l.upsert_catalog(&items, now)?;
                let dest = cfg.destinations();
                let ctx = IngestContext {
                    rules: &cfg.program,
                    limits: &cfg.limits,
                    destinations: &dest,
                    now,
                    warn_before: cfg.warn_before,
                };
                // the catalog is idempotent: its cursors may follow it in their own transaction
                if let Some(c) = prices_cursor {
                    l.ingest(
                        Batch {
                            source: prices_key,
                            items: Vec::new(),
                            checkpoint: Some(c),
                            ..Default::default()
                        },
                        &ctx,
                    )?;
                }
                l.ingest(
                    Batch {
                        source: catalog_key,
                        items: Vec::new(),
                        checkpoint: Some(now.to_rfc3339()),
                        ..Default::default()
                    },
                    &ctx,
                )?;
                Ok(())
            })
            .await?;
        for (key, version, name) in seen {
            st.products.insert(key, (version, name));
        }
        Ok(sync)
    }

    pub fn prices_key(&self) -> String {
        format!("{}:odata:prices", self.system)
    }

    /// 1C's own bonus balances at `at`, one opening row per holder (customer or card), for
    /// `import_opening_balances`: 1C's spendable balance, `Σ add − max(Σ subtract, 0)` of the
    /// register's `/Balance(Period=…)` (so accruals not yet active and points past their
    /// burn date are not imported), split by the burn dates 1C has scheduled after `at` (the
    /// future receipts of `bonus.burn`), none when 1C has none. A holder that cannot be
    /// turned into a customer is an `Err((line, reason))` row; fractions of a point are
    /// dropped.
    pub async fn bonus_balances(
        &self,
        at: DateTime<Utc>,
    ) -> Result<Vec<Result<OpeningRow, (usize, String)>>, OdataError> {
        let bm = self
            .mapping
            .bonus
            .as_ref()
            .ok_or_else(|| no_table(&self.mapping, "bonus", "the mapping names no bonus register"))?;
        let page = self.odata.page_size.max(1) as usize;
        let tz = self.cfg.timezone;
        let at_local = super::poll::to_local(at, tz);
        let program = match (&self.odata.bonus_program, &bm.program) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(no_table(
                    &self.mapping,
                    "bonus.program",
                    "[onec.odata] bonus_program is set but the mapping names no program dimension",
                ));
            }
            (Some(wanted), Some(_)) => Some(self.program_key(wanted, page).await?),
        };
        let resource = format!("{}/Balance(Period={})", bm.set, datetime_literal(at_local));
        let rows = {
            let mut out = Vec::new();
            for n in 0..MAX_CATALOG_PAGES {
                let mut q = vec![("$orderby", bm.holder.clone())];
                if n > 0 {
                    q.push(("$skip", (n * page).to_string()));
                }
                q.push(("$top", page.to_string()));
                let items = self.client.list(&bm.set, &resource, &q).await?;
                let short = items.len() < page;
                out.extend(items);
                if short {
                    break;
                }
            }
            out
        };
        let wanted_row = |r: &Obj| match (&program, &bm.program) {
            (Some(p), Some(dim)) => reference(r, dim) == Some(p.as_str()),
            _ => true,
        };
        let sum = |r: &Obj, fields: &[String]| -> Result<Decimal, String> {
            let mut v = Decimal::ZERO;
            for f in fields {
                let field = format!("{f}Balance");
                let x = decimal(r, &field)?.unwrap_or_default();
                v = v
                    .checked_add(x)
                    .ok_or_else(|| format!("{field} is out of range"))?;
            }
            Ok(v)
        };
        let mut order: Vec<String> = Vec::new();
        let mut totals: HashMap<String, Result<Decimal, String>> = HashMap::new();
        for r in rows.iter().filter(|r| wanted_row(r)) {
            let Some(holder) = reference(r, &bm.holder) else {
                continue;
            };
            // per register row (holder × program): what is scheduled to burn and has burnt
            // by the date is not spendable; a negative КСписанию takes nothing off
            let value = sum(r, &bm.add).and_then(|a| {
                let s = sum(r, &bm.subtract)?;
                Ok(a - s.max(Decimal::ZERO))
            });
            if !totals.contains_key(holder) {
                order.push(holder.to_string());
            }
            let entry = totals.entry(holder.to_string()).or_insert(Ok(Decimal::ZERO));
            *entry = match (entry.clone(), value) {
                (Ok(a), Ok(b)) => a
                    .checked_add(b)
                    .ok_or_else(|| "the balance is out of range".to_string()),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        let burns = match &bm.burn {
            Some(burn) => self.burn_schedule(bm, burn, at_local, page, &wanted_row).await?,
            None => HashMap::new(),
        };
        let mut customers = Customers::default();
        if order.len() > BULK_LOOKUP_THRESHOLD {
            customers.preload(&self.client, &self.mapping, page).await?;
        }
        let mut out = Vec::with_capacity(order.len());
        for (i, holder) in order.iter().enumerate() {
            let line = i + 1;
            let points = match totals.remove(holder) {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    out.push(Err((line, format!("{} {holder}: {e}", bm.holder))));
                    continue;
                }
                None => continue,
            };
            let Some(points) = OdataPoller::whole_points(points.max(Decimal::ZERO)) else {
                out.push(Err((
                    line,
                    format!("{} {holder}: {points} points is out of range", bm.holder),
                )));
                continue;
            };
            let lots = bm.burn.as_ref().map(|_| {
                split_by_burns(points, burns.get(holder).map_or(&[][..], Vec::as_slice))
                    .into_iter()
                    .map(|(p, d)| (p, d.map(|d| to_utc(d, tz))))
                    .collect()
            });
            let identity = match bm.holder_is {
                BonusHolder::People => {
                    customers
                        .identity(&self.client, &self.mapping, None, Some((holder.clone(), None)))
                        .await?
                }
                BonusHolder::Card => {
                    customers
                        .identity(&self.client, &self.mapping, Some(holder), None)
                        .await?
                }
            };
            match identity {
                Ok(identity) => out.push(Ok(OpeningRow {
                    line,
                    identity,
                    points,
                    expires_at: None,
                    tier: None,
                    lots,
                })),
                Err(reason) => out.push(Err((line, format!("{} {holder}: {reason}", bm.holder)))),
            }
        }
        Ok(out)
    }

    /// The points 1C has scheduled to burn after `after`, per holder: the register's records
    /// of `burn` (receipts add, expenses take off) by date, in date order.
    async fn burn_schedule(
        &self,
        bm: &crate::onec::mapping::BonusMap,
        burn: &str,
        after: NaiveDateTime,
        page: usize,
        wanted_row: &dyn Fn(&Obj) -> bool,
    ) -> Result<HashMap<String, Vec<(NaiveDateTime, Decimal)>>, OdataError> {
        let set = format!("{}_RecordType", bm.set);
        let mut select = vec!["Period", "RecordType", "Active", bm.holder.as_str(), burn];
        select.extend(bm.program.as_deref());
        let filter = format!("Period gt {}", datetime_literal(after));
        let records = list_all(
            &self.client,
            &set,
            &select.join(","),
            Some(&filter),
            "Period",
            page,
        )
        .await?;
        let mut by_holder: HashMap<String, std::collections::BTreeMap<NaiveDateTime, Decimal>> =
            HashMap::new();
        for r in records.iter().filter(|r| wanted_row(r)) {
            if flag(r, "Active") == Some(false) {
                continue;
            }
            let (Some(holder), Some(period)) = (
                reference(r, &bm.holder),
                text(r, "Period").and_then(|t| local_time(t).ok().flatten()),
            ) else {
                continue;
            };
            let Ok(Some(amount)) = decimal(r, burn) else {
                continue;
            };
            let sign = if text(r, "RecordType").is_some_and(|t| t.eq_ignore_ascii_case("Expense")) {
                -Decimal::ONE
            } else {
                Decimal::ONE
            };
            *by_holder
                .entry(holder.to_string())
                .or_default()
                .entry(period)
                .or_default() += sign * amount;
        }
        Ok(by_holder
            .into_iter()
            .map(|(h, m)| (h, m.into_iter().collect()))
            .collect())
    }

    /// The key of the bonus program named by description or key.
    async fn program_key(&self, wanted: &str, page: usize) -> Result<String, OdataError> {
        let wanted = wanted.trim();
        let Some(set) = self.mapping.bonus.as_ref().and_then(|b| b.programs.as_ref()) else {
            return Ok(wanted.to_string());
        };
        let all = list_all(&self.client, set, "Ref_Key,Description", None, "Ref_Key", page).await?;
        for p in &all {
            let key = reference(p, "Ref_Key").unwrap_or("");
            let name = text(p, "Description").unwrap_or("").trim();
            if key.eq_ignore_ascii_case(wanted) || name.to_lowercase() == wanted.to_lowercase() {
                return Ok(key.to_string());
            }
        }
        let names: Vec<&str> = all.iter().filter_map(|p| text(p, "Description")).collect();
        Err(no_table(
            &self.mapping,
            "bonus.programs",
            &format!(
                "[onec.odata] bonus_program {wanted:?} is not in {set} (there: {})",
                names.join(", ")
            ),
        ))
    }
}

/// Splits a spendable balance into lots by the burns 1C has scheduled (date, net change of
/// the points to burn), earliest first: each date burns what its change adds to the schedule,
/// never more than is left; what no burn claims never burns (`None`).
pub(crate) fn split_by_burns(
    points: i64,
    burns: &[(NaiveDateTime, Decimal)],
) -> Vec<(i64, Option<NaiveDateTime>)> {
    let mut out = Vec::new();
    let mut left = points.max(0);
    let mut scheduled = Decimal::ZERO;
    let mut claimed = Decimal::ZERO;
    for (date, change) in burns {
        scheduled += *change;
        let due = (scheduled - claimed).floor();
        if due <= Decimal::ZERO || left == 0 {
            continue;
        }
        let take = OdataPoller::whole_points(due).unwrap_or(i64::MAX).min(left);
        out.push((take, Some(*date)));
        left -= take;
        claimed += Decimal::from(take);
    }
    if left > 0 {
        out.push((left, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::json;
    use super::*;
    use crate::onec::mapping;

    fn people() -> PeopleMap {
        mapping::load("roznica2", None)
            .expect("built in")
            .people
            .expect("people")
    }

    #[test]
    fn a_balance_splits_by_the_burns_1c_scheduled() {
        let d = |day: u32| {
            chrono::NaiveDate::from_ymd_opt(2027, 1, day)
                .and_then(|x| x.and_hms_opt(0, 0, 0))
                .expect("date")
        };
        let dec = |n: i64| Decimal::from(n);
        // nothing scheduled: one lot that never burns
        assert_eq!(split_by_burns(100, &[]), vec![(100, None)]);
        // 30 on the 5th, 50 on the 9th, 20 never
        assert_eq!(
            split_by_burns(100, &[(d(5), dec(30)), (d(9), dec(50))]),
            vec![(30, Some(d(5))), (50, Some(d(9))), (20, None)]
        );
        // a redemption lowered the schedule (an expense) before the next burn
        assert_eq!(
            split_by_burns(60, &[(d(5), dec(40)), (d(6), dec(-10)), (d(9), dec(50))]),
            vec![(40, Some(d(5))), (20, Some(d(9)))]
        );
        // more scheduled than spendable: never more than the balance
        assert_eq!(split_by_burns(10, &[(d(5), dec(40))]), vec![(10, Some(d(5)))]);
    }

    #[test]
    fn contact_rows_give_the_first_phone_and_e_mail() {
        let o: Obj = json::parse(
            r#"{"Ref_Key":"k","Description":" Иван ","КонтактнаяИнформация":[
                {"LineNumber":"1","Тип":"Адрес","Представление":"Москва"},
                {"LineNumber":"2","Тип":"Телефон","Представление":"not a phone"},
                {"LineNumber":"3","Тип":"Телефон","Представление":"8 (912) 345-67-89"},
                {"LineNumber":"4","Тип":"АдресЭлектроннойПочты","Представление":"Ivan@Example.RU"}]}"#,
        )
        .expect("json")
        .as_object()
        .cloned()
        .expect("object");
        let p = person_from(&people(), "Catalog_ФизическиеЛица", None, &o);
        assert_eq!(p.name.as_deref(), Some("Иван"));
        assert_eq!(p.phone.as_ref().map(Phone::as_str), Some("+79123456789"));
        assert_eq!(p.email.as_ref().map(Email::as_str), Some("ivan@example.ru"));
    }
}
