//! Keeping the "bought together" statistics and RFM segments current, and answering
//! `kopilka offers`.
//!
//! The statistics are refreshed incrementally: each run takes only the documents written
//! since the last one (by `updated_at`, with the boundary second re-read — taking a basket
//! out and putting it back is idempotent), removes the basket each had contributed and adds
//! its current one if the sale is in force. The cost is proportional to what changed, not
//! to the history.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::ingest::{IngestContext, finish_write};
use super::{Ledger, Result, from_ts, ts};
use crate::core::money::Money;
use crate::core::offers::{ItemStat, Offer, OfferParams, PairStat, Rfm, Segment, recommend, segment};

/// Distinct products of one basket counted into pairs, at most (a basket of 200 lines would
/// otherwise add 40 000 pairs).
const MAX_ITEMS_PER_BASKET: usize = 30;
/// An item bought within this many days is not offered again.
const RECENT_DAYS: i64 = 90;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OffersRefresh {
    pub documents: usize,
    pub baskets: i64,
    pub segments_changed: usize,
    pub offers_changed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CustomerOffers {
    pub customer_id: i64,
    pub segment: Option<Segment>,
    pub segment_ru: Option<&'static str>,
    pub days_since_last: Option<i64>,
    pub purchases_365: i64,
    pub spend_365_kopecks: i64,
    pub offers: Vec<Offer>,
}

/// (item, units with known cost, margin) of a basket, stored as JSON.
type Basket = Vec<(String, i64, i64)>;

fn adjust_basket(conn: &Connection, basket: &Basket, sign: i64) -> Result<()> {
    let mut item = conn.prepare_cached(
        "INSERT INTO offer_items (item, baskets, margin_units, margin) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (item) DO UPDATE SET baskets = baskets + excluded.baskets, \
         margin_units = margin_units + excluded.margin_units, margin = margin + excluded.margin",
    )?;
    for (i, units, margin) in basket {
        item.execute(params![i, sign, sign * units, sign * margin])?;
    }
    let mut pair = conn.prepare_cached(
        "INSERT INTO offer_pairs (a, b, together) VALUES (?1, ?2, ?3) \
         ON CONFLICT (a, b) DO UPDATE SET together = together + excluded.together",
    )?;
    for (x, _, _) in basket.iter().take(MAX_ITEMS_PER_BASKET) {
        for (y, _, _) in basket.iter().take(MAX_ITEMS_PER_BASKET) {
            if x != y {
                pair.execute(params![x, y, sign])?;
            }
        }
    }
    Ok(())
}

impl Ledger {
    /// Brings the offer statistics up to date with the documents written since the last
    /// refresh, then recomputes every customer's segment and offer.
    pub fn refresh_offers(&mut self, ctx: &IngestContext<'_>) -> Result<OffersRefresh> {
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let watermark: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'offers_watermark'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(i64::MIN);
        let head: Option<i64> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'offers_documents_head'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok());
        // (document, customer, occurred_at, a sale in force, updated_at, first_seen_at)
        type Changed = (i64, Option<i64>, Option<i64>, bool, i64, i64);
        const COLS: &str = "id, customer_id, occurred_at, COALESCE(kind = 'sale' AND state = 'active', 0), \
                            updated_at, first_seen_at";
        // Since migration 33 only a document changed after it was first seen is indexed by
        // its time (`documents_changed`): documents written since are found by their id, past
        // the newest one the last refresh took (`offers_documents_head`). A ledger from before
        // has no head yet: its first refresh finds what changed by time in one pass over the
        // table, as every refresh did before.
        let changed = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Changed> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        };
        let docs: Vec<Changed> = match head {
            Some(head) => tx
                .prepare(&format!(
                    "SELECT {COLS} FROM documents WHERE id > ?2 \
                     UNION SELECT {COLS} FROM documents INDEXED BY documents_changed \
                     WHERE updated_at > first_seen_at AND updated_at >= ?1"
                ))?
                .query_map(params![watermark, head], changed)?
                .collect::<rusqlite::Result<_>>()?,
            None => tx
                .prepare(&format!("SELECT {COLS} FROM documents WHERE updated_at >= ?1"))?
                .query_map([watermark], changed)?
                .collect::<rusqlite::Result<_>>()?,
        };
        let mut report = OffersRefresh {
            documents: docs.len(),
            ..Default::default()
        };
        let mut newest = watermark;
        // a document first seen in this very second may still be written after this refresh
        // within the same second, unseen by `documents_changed` (its time is its first time):
        // it stays past the head, to be read again next time
        let mut new_head = match head {
            Some(h) => h,
            // what a refresh before the head took: every document first seen before now
            None => tx.query_row(
                "SELECT COALESCE(MAX(id), 0) FROM documents WHERE first_seen_at < ?1",
                [ts(now)],
                |r| r.get(0),
            )?,
        };
        for (id, customer, occurred, in_force, updated, first_seen) in docs {
            newest = newest.max(updated);
            if first_seen < ts(now) {
                new_head = new_head.max(id);
            }
            let old: Option<String> = tx
                .prepare_cached("SELECT items FROM offer_baskets WHERE document_id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            if let Some(old) = old {
                let basket: Basket = serde_json::from_str(&old).unwrap_or_default();
                adjust_basket(&tx, &basket, -1)?;
                tx.prepare_cached("DELETE FROM offer_baskets WHERE document_id = ?1")?
                    .execute([id])?;
            }
            if !in_force {
                continue;
            }
            let mut per_item: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            let mut st = tx.prepare_cached(
                "SELECT product_id, quantity, net, unit_cost, service FROM document_lines WHERE document_id = ?1",
            )?;
            let rows = st.query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })?;
            for row in rows {
                let (product, qty, net, cost, service) = row?;
                if service {
                    continue;
                }
                let units = qty.parse::<rust_decimal::Decimal>().unwrap_or_default().trunc();
                let units = rust_decimal::prelude::ToPrimitive::to_i64(&units)
                    .unwrap_or(0)
                    .max(1);
                let e = per_item.entry(product).or_insert((0, 0));
                if let Some(c) = cost {
                    e.0 += units;
                    e.1 += net - c * units;
                }
            }
            let basket: Basket = per_item.into_iter().map(|(k, (u, m))| (k, u, m)).collect();
            adjust_basket(&tx, &basket, 1)?;
            tx.prepare_cached(
                "INSERT INTO offer_baskets (document_id, customer_id, occurred_at, items) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, customer, occurred.unwrap_or(0), serde_json::to_string(&basket).unwrap_or_default()])?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('offers_watermark', ?1), ('offers_documents_head', ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [newest.to_string(), new_head.to_string()],
        )?;
        tx.execute("DELETE FROM offer_pairs WHERE together <= 0", [])?;
        tx.execute("DELETE FROM offer_items WHERE baskets <= 0", [])?;
        report.baskets = tx.query_row("SELECT COUNT(*) FROM offer_baskets", [], |r| r.get(0))?;

        // Segments and offers of every customer who has bought something.
        let customers: Vec<(i64, Option<String>, Option<String>)> = tx
            .prepare(
                "SELECT c.id, c.segment, c.offer FROM customers c \
                 WHERE EXISTS (SELECT 1 FROM offer_baskets b WHERE b.customer_id = c.id) OR c.segment IS NOT NULL",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut touched = BTreeSet::new();
        for (c, old_segment, old_offer) in customers {
            let view = customer_offers(&tx, c, report.baskets, now)?;
            let seg = view.segment.map(|s| s.code().to_string());
            let offer = view.offers.first().map(|o| o.item.clone());
            if seg != old_segment {
                report.segments_changed += 1;
            }
            if offer != old_offer {
                report.offers_changed += 1;
            }
            if seg != old_segment || offer != old_offer {
                tx.prepare_cached("UPDATE customers SET segment = ?2, offer = ?3 WHERE id = ?1")?
                    .execute(params![c, seg, offer])?;
                touched.insert(c);
            }
        }
        finish_write(&tx, since, &touched, ctx)?;
        tx.commit()?;
        Ok(report)
    }

    /// A customer's segment and ranked offers with their evidence.
    pub fn offers_for(&self, customer: &str, now: DateTime<Utc>) -> Result<CustomerOffers> {
        let id = super::query::find_customer(&self.conn, customer)?;
        let baskets: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM offer_baskets", [], |r| r.get(0))?;
        customer_offers(&self.conn, id, baskets, now)
    }
}

fn customer_offers(conn: &Connection, c: i64, total: i64, now: DateTime<Utc>) -> Result<CustomerOffers> {
    let year_ago = ts(now - Duration::days(365));
    let (last, first, n365, spend): (Option<i64>, Option<i64>, i64, i64) = conn
        .prepare_cached(
            "SELECT MAX(occurred_at), MIN(occurred_at), COALESCE(SUM(occurred_at >= ?2), 0), \
             COALESCE(SUM(CASE WHEN occurred_at >= ?2 THEN total END), 0) \
             FROM documents WHERE customer_id = ?1 AND kind = 'sale' AND state = 'active'",
        )?
        .query_row(params![c, year_ago], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let days = |t: i64| (now - from_ts(t)).num_days().max(0);
    let seg = match (last, first) {
        (Some(l), Some(f)) => Some(segment(Rfm {
            days_since_last: days(l),
            days_since_first: days(f),
            purchases_365: n365,
            spend_365: Money(spend),
        })),
        _ => None,
    };
    let mut bought: BTreeSet<String> = BTreeSet::new();
    let mut recent: HashSet<String> = HashSet::new();
    let recent_from = ts(now - Duration::days(RECENT_DAYS));
    let mut st = conn.prepare_cached(
        "SELECT items, occurred_at FROM offer_baskets WHERE customer_id = ?1 ORDER BY occurred_at DESC LIMIT 200",
    )?;
    let rows = st.query_map([c], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (items, at) = row?;
        let basket: Basket = serde_json::from_str(&items).unwrap_or_default();
        for (item, _, _) in basket {
            if at >= recent_from {
                recent.insert(item.clone());
            }
            bought.insert(item);
        }
    }
    let bought: Vec<String> = bought.into_iter().collect();
    let mut pairs = Vec::new();
    let mut names: BTreeSet<String> = bought.iter().cloned().collect();
    {
        let mut st = conn.prepare_cached(
            "SELECT a, b, together FROM offer_pairs WHERE a = ?1 ORDER BY together DESC LIMIT 50",
        )?;
        for a in &bought {
            let rows = st.query_map([a], |r| {
                Ok(PairStat {
                    a: r.get(0)?,
                    b: r.get(1)?,
                    together: r.get(2)?,
                })
            })?;
            for p in rows {
                let p = p?;
                names.insert(p.b.clone());
                pairs.push(p);
            }
        }
    }
    let mut stats = BTreeMap::new();
    let mut st =
        conn.prepare_cached("SELECT baskets, margin_units, margin FROM offer_items WHERE item = ?1")?;
    for item in names {
        if let Some((baskets, units, margin)) = st
            .query_row([&item], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
        {
            stats.insert(
                item.clone(),
                ItemStat {
                    item,
                    baskets,
                    margin_units: units,
                    margin,
                },
            );
        }
    }
    let mut offers = recommend(total, &bought, &recent, &pairs, &stats, OfferParams::default());
    offers.truncate(5);
    Ok(CustomerOffers {
        customer_id: c,
        segment: seg,
        segment_ru: seg.map(Segment::label_ru),
        days_since_last: last.map(days),
        purchases_365: n365,
        spend_365_kopecks: spend,
        offers,
    })
}
