//! The product catalog: groups (categories), products and prices by date. Cost reaches
//! kopilka as one more price type ("Закупочная"), so the cost of a line is the price of the
//! configured price type valid on the sale's date.

use chrono::{DateTime, Utc};
use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Ledger, Result, ts};
use crate::core::document::{Document, Line};
use crate::core::money::Money;

/// A catalog change from a connector.
#[derive(Clone, Debug, PartialEq)]
pub enum CatalogItem {
    Group {
        id: String,
        name: String,
        parent: Option<String>,
    },
    Product {
        id: String,
        name: String,
        article: Option<String>,
        group: Option<String>,
        service: bool,
        deleted: bool,
    },
    PriceType {
        id: String,
        name: String,
        currency: Option<String>,
    },
    /// A unit price of a product for a price type, valid from `valid_from`.
    Price {
        product_id: String,
        price_type: String,
        valid_from: DateTime<Utc>,
        unit_price: Money,
    },
}

/// Which price is the cost, and what to do for sales older than every price list.
#[derive(Clone, Debug)]
pub struct CostPolicy {
    /// Price type id or name.
    pub price_type: String,
    /// Take the earliest known price for sales dated before it (backfills of old sales
    /// against a catalog loaded today); otherwise such a line's cost stays unknown.
    pub backfill: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogReport {
    pub groups: usize,
    pub products: usize,
    pub price_types: usize,
    pub prices: usize,
}

impl Ledger {
    /// Stores catalog items in one transaction.
    pub fn upsert_catalog(&mut self, items: &[CatalogItem], now: DateTime<Utc>) -> Result<CatalogReport> {
        let tx = self.conn.transaction()?;
        let mut r = CatalogReport::default();
        for item in items {
            match item {
                CatalogItem::Group { id, name, parent } => {
                    tx.prepare_cached(
                        "INSERT INTO catalog_groups (id, name, parent, updated_at) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (id) DO UPDATE SET name = excluded.name, parent = excluded.parent, \
                         updated_at = excluded.updated_at",
                    )?
                    .execute(params![id, name, parent, ts(now)])?;
                    r.groups += 1;
                }
                CatalogItem::Product {
                    id,
                    name,
                    article,
                    group,
                    service,
                    deleted,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO catalog_products (id, name, article, group_id, service, deleted, updated_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                         article = excluded.article, group_id = COALESCE(excluded.group_id, group_id), \
                         service = excluded.service, deleted = excluded.deleted, updated_at = excluded.updated_at",
                    )?
                    .execute(params![id, name, article, group, service, deleted, ts(now)])?;
                    r.products += 1;
                }
                CatalogItem::PriceType { id, name, currency } => {
                    tx.prepare_cached(
                        "INSERT INTO catalog_price_types (id, name, currency) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (id) DO UPDATE SET name = excluded.name, currency = excluded.currency",
                    )?
                    .execute(params![id, name, currency])?;
                    r.price_types += 1;
                }
                CatalogItem::Price {
                    product_id,
                    price_type,
                    valid_from,
                    unit_price,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO catalog_prices (product_id, price_type, valid_from, unit_price) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (product_id, price_type, valid_from) \
                         DO UPDATE SET unit_price = excluded.unit_price",
                    )?
                    .execute(params![
                        product_id,
                        price_type,
                        ts(*valid_from),
                        unit_price.0
                    ])?;
                    r.prices += 1;
                }
            }
        }
        tx.commit()?;
        Ok(r)
    }

    /// The cost of one unit of a product on a date, if the catalog knows it.
    pub fn cost_at(&self, product: &str, policy: &CostPolicy, at: DateTime<Utc>) -> Result<Option<Money>> {
        let Some(pt) = price_type_id(&self.conn, &policy.price_type)? else {
            return Ok(None);
        };
        cost_of(
            &self.conn,
            product,
            &pt,
            policy.backfill,
            at,
            &mut Seen::default(),
        )
    }

    /// Fills what a document's lines do not say from the catalog: the category (the
    /// product's group name) and the groups above it, whether it is a service, and the cost
    /// on the sale's date.
    /// What the source stated is never overwritten.
    pub fn complete_from_catalog(&self, doc: &mut Document, policy: Option<&CostPolicy>) -> Result<()> {
        let pt = match policy {
            Some(p) => price_type_id(&self.conn, &p.price_type)?,
            None => None,
        };
        complete(&self.conn, doc, policy, pt.as_deref(), &mut Seen::default())
    }

    /// [`Ledger::complete_from_catalog`] for a batch of documents, as connectors apply them:
    /// one read transaction for the whole batch (not one per query), the cost price type
    /// resolved once, and each product's row read once.
    pub fn complete_batch_from_catalog<'a>(
        &mut self,
        docs: impl IntoIterator<Item = &'a mut Document>,
        policy: Option<&CostPolicy>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let pt = match policy {
            Some(p) => price_type_id(&tx, &p.price_type)?,
            None => None,
        };
        let mut seen = Seen::default();
        for doc in docs {
            complete(&tx, doc, policy, pt.as_deref(), &mut seen)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// A product's group path (own group first, then the groups above it) and service flag,
/// when the catalog has the product.
pub(super) type ProductRow = Option<(Vec<String>, bool)>;

/// How many groups up a product's path is followed. 1C's trees are a handful of levels
/// deep; the bound keeps a broken or hostile catalog (a loop of parents, a chain of
/// thousands) from turning every sale into thousands of queries.
const MAX_GROUP_DEPTH: usize = 64;

/// The names of a group and the groups above it, nearest first, stopping at the root, at
/// a parent the catalog does not have, at a loop, or at [`MAX_GROUP_DEPTH`].
fn group_path(conn: &Connection, group: Option<String>) -> Result<Vec<String>> {
    let mut path = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut next = group;
    while let Some(id) = next.take() {
        if seen.len() >= MAX_GROUP_DEPTH || seen.contains(&id) {
            break;
        }
        let row: Option<(String, Option<String>)> = conn
            .prepare_cached("SELECT name, parent FROM catalog_groups WHERE id = ?1")?
            .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((name, parent)) = row else { break };
        seen.push(id);
        path.push(name);
        next = parent;
    }
    Ok(path)
}

/// A product's row from the catalog (by its base id, before `#`).
pub(super) fn product_row(conn: &Connection, product: &str) -> Result<ProductRow> {
    let base = product.split('#').next().unwrap_or(product);
    let row: Option<(Option<String>, bool)> = conn
        .prepare_cached("SELECT group_id, service FROM catalog_products WHERE id = ?1")?
        .query_row([base], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        Some((group, service)) => Ok(Some((group_path(conn, group)?, service))),
        None => Ok(None),
    }
}

/// The groups above a line's category when that category is the product's own group in
/// the catalog (a category the source stated otherwise has no known parents).
pub(super) fn parents_of(line: &Line, path: &[String]) -> Vec<String> {
    match path.split_first() {
        Some((own, parents)) if line.category.as_ref() == Some(own) => parents.to_vec(),
        _ => Vec::new(),
    }
}

/// The price type id a policy names (by id or by name).
fn price_type_id(conn: &Connection, name_or_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT id FROM catalog_price_types WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1",
        )?
        .query_row([name_or_id], |r| r.get(0))
        .optional()?)
}

/// What a batch has read from the catalog, each product's row and price history once: a
/// batch's sales name the same products again and again, and a price read per line was a
/// query a line.
#[derive(Default)]
struct Seen {
    products: HashMap<String, ProductRow>,
    /// a product's prices of the batch's one price type, `(valid_from, unit_price)`, oldest first
    prices: HashMap<String, Vec<(i64, i64)>>,
}

/// The unit price of `product` (or its base product, before `#`) of price type `pt` on a
/// date; with `backfill`, the earliest known one for a date before every price.
fn cost_of(
    conn: &Connection,
    product: &str,
    pt: &str,
    backfill: bool,
    at: DateTime<Utc>,
    seen: &mut Seen,
) -> Result<Option<Money>> {
    let base = product.split('#').next().unwrap_or(product);
    let at = ts(at);
    for id in [product, base] {
        if !seen.prices.contains_key(id) {
            let history = conn
                .prepare_cached(
                    "SELECT valid_from, unit_price FROM catalog_prices WHERE product_id = ?1 AND price_type = ?2 \
                     ORDER BY valid_from",
                )?
                .query_map(params![id, pt], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<(i64, i64)>>>()?;
            seen.prices.insert(id.to_string(), history);
        }
        let history = seen.prices.get(id).map_or(&[][..], Vec::as_slice);
        // the newest price in force on the date (`valid_from` is the key: no two alike)
        let in_force = history.partition_point(|(from, _)| *from <= at);
        if let Some((_, v)) = in_force.checked_sub(1).and_then(|i| history.get(i)) {
            return Ok(Some(Money(*v)));
        }
        if backfill && let Some((_, v)) = history.first() {
            return Ok(Some(Money(*v)));
        }
    }
    Ok(None)
}

/// Completes one document; `pt` is the policy's price type id (`None`: the catalog has no
/// such price type, so no cost), `seen` remembers what the batch read already.
fn complete(
    conn: &Connection,
    doc: &mut Document,
    policy: Option<&CostPolicy>,
    pt: Option<&str>,
    seen: &mut Seen,
) -> Result<()> {
    for line in &mut doc.lines {
        let base = line.product_id.split('#').next().unwrap_or(&line.product_id);
        if !seen.products.contains_key(base) {
            let row = product_row(conn, base)?;
            seen.products.insert(base.to_string(), row);
        }
        if let Some(Some((path, service))) = seen.products.get(base) {
            if line.category.is_none() {
                line.category = path.first().cloned();
            }
            if line.category_parents.is_empty() {
                line.category_parents = parents_of(line, path);
            }
            line.service |= *service;
        }
        if line.unit_cost.is_none()
            && let (Some(p), Some(pt)) = (policy, pt)
        {
            line.unit_cost = cost_of(conn, &line.product_id, pt, p.backfill, doc.occurred_at, seen)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A batch reads each product's price history once and answers every date from it as
    /// the query per line did: the newest price in force, a variant's own prices before its
    /// base product's, the earliest for a date before every price only with `backfill`.
    #[test]
    fn a_cost_is_the_price_in_force_read_once_per_batch() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::ledger::schema::migrate(&mut conn).expect("migrate");
        conn.execute_batch(
            "INSERT INTO catalog_prices VALUES ('P', 'cost', 100, 1000), ('P', 'cost', 200, 2000), \
             ('P#2', 'cost', 120, 1500), ('P', 'retail', 50, 9999);",
        )
        .expect("prices");
        let at = |t: i64| Utc.timestamp_opt(t, 0).single().expect("a time");
        let cases: [(&str, bool, i64, Option<i64>); 12] = [
            ("P", false, 50, None),
            ("P", true, 50, Some(1000)),
            ("P", false, 100, Some(1000)),
            ("P", false, 199, Some(1000)),
            ("P", false, 200, Some(2000)),
            ("P", true, 300, Some(2000)),
            ("P#1", false, 150, Some(1000)),
            ("P#1", true, 50, Some(1000)),
            ("P#2", false, 150, Some(1500)),
            ("P#2", false, 110, Some(1000)),
            ("P#2", true, 110, Some(1500)),
            ("Q", true, 150, None),
        ];
        let mut seen = Seen::default();
        for _ in 0..2 {
            for (product, backfill, t, want) in cases {
                let fresh =
                    cost_of(&conn, product, "cost", backfill, at(t), &mut Seen::default()).expect("a cost");
                let batch = cost_of(&conn, product, "cost", backfill, at(t), &mut seen).expect("a cost");
                assert_eq!(fresh, want.map(Money), "{product} at {t}, backfill {backfill}");
                assert_eq!(batch, fresh, "{product} at {t}, backfill {backfill}");
            }
        }
        assert_eq!(seen.prices.len(), 4, "P, P#1, P#2 and Q, each read once");
    }
}
