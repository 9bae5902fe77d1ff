//! A synthetic shop: a catalog with costs, customers, and a seeded stream of sales,
//! returns, edits and unpostings. Deterministic for a seed, so a failing test can be
//! replayed exactly.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::core::document::{DocKind, Document, Incoming, Line, SourceRef, VoidReason, content_version};
use crate::core::identity::{CustomerIdentity, Email, Phone};
use crate::core::money::{Money, Points};

#[derive(Clone, Debug)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: String,
    pub price: Money,
    pub cost: Money,
    pub service: bool,
}

#[derive(Clone, Debug)]
pub struct Shop {
    pub products: Vec<Product>,
    pub customers: Vec<CustomerIdentity>,
    pub start: DateTime<Utc>,
    pub system: String,
}

const CATEGORIES: &[(&str, &[&str])] = &[
    ("coffee", &["Кофе в зёрнах", "Кофе молотый", "Капсулы"]),
    ("tea", &["Чай чёрный", "Чай зелёный", "Травяной сбор"]),
    ("sweets", &["Мёд", "Шоколад", "Печенье"]),
    ("dishes", &["Чашка", "Турка", "Френч-пресс"]),
];

impl Shop {
    pub fn generate(seed: u64, products: usize, customers: usize) -> Shop {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut catalog = Vec::with_capacity(products + 1);
        for i in 0..products {
            let (cat, names) = CATEGORIES[i % CATEGORIES.len()];
            let name = names[(i / CATEGORIES.len()) % names.len()];
            let price = Money(rng.i64(50..5000) * 100 + [0, 50, 90][rng.usize(0..3)]);
            // margins from a loss-leader (cost above price) to 60%
            let cost = Money(price.0 * rng.i64(40..105) / 100);
            catalog.push(Product {
                id: format!("P{i:05}"),
                name: format!("{name} №{i}"),
                category: cat.to_string(),
                price,
                cost,
                service: false,
            });
        }
        catalog.push(Product {
            id: "ORDER_DELIVERY".into(),
            name: "Доставка заказа".into(),
            category: "service".into(),
            price: Money(34000),
            cost: Money(30000),
            service: true,
        });
        let people = (0..customers)
            .map(|i| CustomerIdentity {
                card: Some(format!("2000{i:08}")),
                phone: Phone::parse(&format!(
                    "8 9{:02} {:03}-{:02}-{:02}",
                    10 + i % 89,
                    i % 1000,
                    (i / 7) % 100,
                    i % 97
                )),
                email: (i % 3 == 0)
                    .then(|| Email::parse(&format!("client{i}@example.ru")))
                    .flatten(),
                onec_id: None,
                amocrm_id: None,
                name: Some(format!("Покупатель {i}")),
                birthday: chrono::NaiveDate::from_ymd_opt(
                    1970 + (i % 40) as i32,
                    1 + (i % 12) as u32,
                    1 + (i % 28) as u32,
                ),
                referred_by: None,
                invite_code: None,
                unreadable: Vec::new(),
            })
            .collect();
        Shop {
            products: catalog,
            customers: people,
            start: Utc
                .with_ymd_and_hms(2026, 1, 10, 7, 0, 0)
                .single()
                .unwrap_or_default(),
            system: "onec".into(),
        }
    }

    /// One sale with `lines` goods lines; `customer = None` is an anonymous sale.
    pub fn sale(
        &self,
        rng: &mut fastrand::Rng,
        n: usize,
        lines: usize,
        customer: Option<usize>,
        redeem: i64,
    ) -> Document {
        // the generated goods come first; the delivery service and anything a test added
        // after it (a membership fee) are never picked at random
        let goods = self
            .products
            .iter()
            .position(|p| p.service)
            .unwrap_or(self.products.len());
        let mut out = Vec::with_capacity(lines);
        for _ in 0..lines {
            let p = &self.products[rng.usize(0..goods)];
            let qty = rng.i64(1..4);
            let gross = p.price.0 * qty;
            let discount = if rng.u8(0..10) == 0 { gross / 10 } else { 0 };
            out.push(Line {
                product_id: p.id.clone(),
                name: p.name.clone(),
                category: Some(p.category.clone()),
                category_parents: Vec::new(),
                quantity: Decimal::from(qty),
                unit_price: p.price,
                discount: Money(discount),
                net: Money(gross - discount),
                unit_cost: Some(p.cost),
                service: false,
            });
        }
        let total: Money = out.iter().map(|l| l.net).sum();
        let mut d = Document {
            source: SourceRef {
                system: self.system.clone(),
                doc_id: format!("S{n:08}"),
                version: String::new(),
                stamp: None,
            },
            kind: DocKind::Sale,
            number: Some(format!("ЧК-{n:08}")),
            occurred_at: self.start + Duration::minutes(n as i64 * 7),
            customer: customer.map(|c| self.customers[c].clone()).unwrap_or_default(),
            currency: "RUB".into(),
            lines: out,
            total,
            points_redeemed: Points(redeem),
            original: None,
            store: Some("Магазин на Тверской".into()),
            partner: None,
        };
        d.source.version = content_version(&d);
        d
    }

    /// A return of the first `lines` lines of `sale` (quantity `qty` each).
    pub fn return_of(&self, sale: &Document, n: usize, lines: usize, qty: i64) -> Document {
        let out: Vec<Line> = sale
            .lines
            .iter()
            .take(lines.max(1))
            .map(|l| {
                let sold = i64::try_from(l.quantity).unwrap_or(1).max(1);
                let q = qty.clamp(1, sold);
                Line {
                    quantity: Decimal::from(q),
                    net: Money(l.net.0 / sold * q),
                    ..l.clone()
                }
            })
            .collect();
        let total = out.iter().map(|l| l.net).sum();
        let mut d = Document {
            source: SourceRef {
                system: sale.source.system.clone(),
                doc_id: format!("R{n:08}"),
                version: String::new(),
                stamp: None,
            },
            kind: DocKind::Return,
            number: Some(format!("ВК-{n:08}")),
            occurred_at: sale.occurred_at + Duration::days(2),
            lines: out,
            total,
            points_redeemed: Points(0),
            original: Some(sale.source.doc_id.clone()),
            ..sale.clone()
        };
        d.source.version = content_version(&d);
        d
    }
}

/// What a generated history holds, for checking a ledger against it.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    pub sales: i64,
    pub returns: i64,
    pub net_total: i64,
    pub malformed: i64,
}

/// A seeded history: sales (some anonymous, some paid partly with points), a few returns,
/// edits, unpostings and malformed documents, in the order a source would deliver them.
pub fn history(shop: &Shop, seed: u64, sales: usize, lines: usize) -> (Vec<Incoming>, Truth) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut items = Vec::with_capacity(sales + sales / 10);
    let mut truth = Truth::default();
    let mut live: Vec<Document> = Vec::new();
    for n in 0..sales {
        let customer = (rng.u8(0..10) != 0).then(|| rng.usize(0..shop.customers.len()));
        let redeem = if customer.is_some() && rng.u8(0..8) == 0 {
            rng.i64(1..30)
        } else {
            0
        };
        let d = shop.sale(&mut rng, n, lines, customer, redeem);
        truth.sales += 1;
        truth.net_total += d.total.0;
        items.push(Incoming::Document(d.clone()));
        live.push(d);
        match rng.u8(0..100) {
            0..=2 if live.len() > 3 => {
                let i = rng.usize(0..live.len() - 1);
                if live[i].source.doc_id.starts_with('S') {
                    let r = shop.return_of(&live[i], n, 1, 1);
                    truth.returns += 1;
                    truth.net_total -= r.total.0;
                    items.push(Incoming::Document(r));
                }
            }
            3 => {
                // the cashier corrects a sale: one line fewer
                let mut e = live[live.len() - 1].clone();
                if e.lines.len() > 1 {
                    let gone = e.lines.pop().map_or(0, |l| l.net.0);
                    e.total = Money(e.total.0 - gone);
                    e.source.version = content_version(&e);
                    truth.net_total -= gone;
                    let last = live.len() - 1;
                    live[last] = e.clone();
                    items.push(Incoming::Document(e));
                }
            }
            4 => {
                // unposted in 1C: no longer a sale
                let Some(e) = live.pop() else { continue };
                truth.sales -= 1;
                truth.net_total -= e.total.0;
                items.push(Incoming::Void {
                    source: SourceRef {
                        version: format!("{}:unposted", e.source.version),
                        ..e.source.clone()
                    },
                    reason: VoidReason::Unposted,
                });
            }
            5 => {
                let mut bad = shop.sale(&mut rng, n, 1, None, 0);
                bad.source.doc_id = format!("X{n:08}");
                bad.lines[0].quantity = Decimal::from(-1);
                bad.source.version = content_version(&bad);
                truth.malformed += 1;
                items.push(Incoming::Document(bad));
            }
            _ => {}
        }
    }
    (items, truth)
}
