//! The ledger against a plain in-memory model: random sequences of sales, new versions,
//! unpostings, returns, replays, adjustments and database reopenings. After every step the
//! two must agree on every total and every customer's balance, and `ledger verify` must find
//! nothing; replaying the whole input at the end must change nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kopilka::core::document::{
    DocKind, Document, DocumentLimits, Incoming, Line, SourceRef, VoidReason, content_version,
};
use kopilka::core::identity::CustomerIdentity;
use kopilka::core::money::{Money, Points};
use kopilka::core::program::{CustomerState, FlatPercent, Rules, SoldLine, return_clawback, return_recredit};
use kopilka::ledger::{
    AdjustOutcome, AdjustRequest, Batch, DateRange, Destinations, IngestContext, Item, Ledger, LedgerError,
    OpenOptions, Outcome,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

#[derive(Clone, Debug)]
enum Op {
    Sale {
        id: u8,
        customer: Option<u8>,
        lines: Vec<(u8, u8)>,
        redeem: u8,
    },
    Return {
        rid: u8,
        of: u8,
        lines: Vec<(u8, u8)>,
    },
    Void {
        sale: bool,
        id: u8,
        tag: u8,
    },
    Replay {
        pick: u16,
    },
    Adjust {
        customer: u8,
        points: i16,
        key: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let lines = prop::collection::vec((0u8..5, 1u8..4), 1..4);
    prop_oneof![
        6 => (0u8..8, prop::option::weighted(0.85, 0u8..4), lines.clone(), prop_oneof![3 => Just(0u8), 1 => 1u8..60])
            .prop_map(|(id, customer, lines, redeem)| Op::Sale { id, customer, lines, redeem }),
        3 => (0u8..5, 0u8..8, prop::collection::vec((0u8..5, 1u8..3), 1..3))
            .prop_map(|(rid, of, lines)| Op::Return { rid, of, lines }),
        2 => (any::<bool>(), 0u8..8, 0u8..3).prop_map(|(sale, id, tag)| Op::Void { sale, id, tag }),
        2 => any::<u16>().prop_map(|pick| Op::Replay { pick }),
        1 => (0u8..4, -80i16..120, 0u8..6).prop_map(|(customer, points, key)| Op::Adjust { customer, points, key }),
        1 => Just(Op::Reopen),
    ]
}

fn price(product: u8) -> i64 {
    (product as i64 + 1) * 10_000 + 37
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 1, 9, 0, 0).unwrap()
}

fn card(c: u8) -> String {
    format!("C{c}")
}

fn doc(
    kind: DocKind,
    id: String,
    customer: Option<u8>,
    lines: &[(u8, u8)],
    redeem: u8,
    original: Option<String>,
    n: usize,
) -> Document {
    let lines: Vec<Line> = lines
        .iter()
        .map(|&(p, q)| Line {
            product_id: format!("P{p}"),
            name: format!("product {p}"),
            category: Some("c".into()),
            category_parents: Vec::new(),
            quantity: Decimal::from(q),
            unit_price: Money(price(p)),
            discount: Money(0),
            net: Money(price(p) * q as i64),
            unit_cost: Some(Money(price(p) / 2)),
            service: false,
        })
        .collect();
    let mut d = Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: id,
            version: String::new(),
            stamp: None,
        },
        kind,
        number: None,
        occurred_at: t0() + Duration::hours(n as i64),
        customer: CustomerIdentity {
            card: customer.map(card),
            ..Default::default()
        },
        currency: "RUB".into(),
        total: lines.iter().map(|l| l.net).sum(),
        lines,
        points_redeemed: Points(redeem as i64),
        original,
        store: None,
        partner: None,
    };
    d.source.version = content_version(&d);
    d
}

#[derive(Clone, Debug)]
struct MDoc {
    version: String,
    stamp: Option<i64>,
    seen: HashSet<String>,
    content: Option<Document>,
    active: bool,
}

#[derive(Default)]
struct Model {
    docs: BTreeMap<String, MDoc>,
    order: Vec<String>,
    accrued: i64,
    redeemed: i64,
    customers: HashSet<String>,
    adjustments: HashMap<u8, (u8, i64)>,
    adjusted: HashMap<String, i64>,
}

fn rules() -> FlatPercent {
    FlatPercent {
        percent: Decimal::from_str("7.5").unwrap(),
        ..Default::default()
    }
}

fn decision_points(d: &Document) -> Vec<i64> {
    let state = CustomerState {
        customer_id: d.customer.card.as_ref().map(|_| 1),
        ..Default::default()
    };
    rules().evaluate(d, &state, d.occurred_at).line_points
}

impl Model {
    /// Mirrors the ledger's version rules; returns whether the item took effect.
    fn ingest(&mut self, inc: &Incoming) -> bool {
        let src = inc.source();
        if let Some(ex) = self.docs.get(&src.doc_id) {
            if ex.version == src.version {
                return false;
            }
            let stale = match (src.stamp, ex.stamp) {
                (Some(a), Some(b)) if a != b => a < b,
                _ => ex.seen.contains(&src.version),
            };
            if stale {
                return false;
            }
        }
        if !self.docs.contains_key(&src.doc_id) {
            self.order.push(src.doc_id.clone());
        }
        let entry = self.docs.entry(src.doc_id.clone()).or_insert(MDoc {
            version: String::new(),
            stamp: None,
            seen: HashSet::new(),
            content: None,
            active: false,
        });
        entry.version = src.version.clone();
        entry.stamp = src.stamp;
        entry.seen.insert(src.version.clone());
        match inc {
            Incoming::Void { .. } => entry.active = false,
            Incoming::Document(d) => {
                entry.active = true;
                entry.content = Some(d.clone());
                if let Some(c) = &d.customer.card {
                    self.customers.insert(c.clone());
                    if d.kind == DocKind::Sale {
                        self.accrued += decision_points(d).iter().sum::<i64>();
                        self.redeemed += d.points_redeemed.0;
                    }
                }
            }
        }
        true
    }

    fn active(&self, kind: DocKind) -> impl Iterator<Item = &Document> {
        self.order
            .iter()
            .filter_map(|id| self.docs.get(id))
            .filter(|d| d.active)
            .filter_map(|d| d.content.as_ref())
            .filter(move |d| d.kind == kind)
    }

    fn balances(&self) -> HashMap<String, i64> {
        let mut b: HashMap<String, i64> = self.customers.iter().map(|c| (c.clone(), 0)).collect();
        for s in self.active(DocKind::Sale) {
            let Some(c) = &s.customer.card else { continue };
            let points = decision_points(s);
            let returns: Vec<&Document> = self
                .active(DocKind::Return)
                .filter(|r| r.original.as_deref() == Some(s.source.doc_id.as_str()))
                .collect();
            let sold: Vec<SoldLine> = s
                .lines
                .iter()
                .zip(&points)
                .map(|(l, p)| SoldLine {
                    product_id: l.product_id.clone(),
                    quantity: l.quantity,
                    points: *p,
                })
                .collect();
            let returning: Vec<(String, Decimal)> = returns
                .iter()
                .flat_map(|r| r.lines.iter().map(|l| (l.product_id.clone(), l.quantity)))
                .collect();
            let claw: i64 = return_clawback(&sold, &[], &returning).0.iter().sum();
            let returned_money: i64 = returns.iter().map(|r| r.total.0).sum();
            let give = return_recredit(s.points_redeemed.0, s.total, Money(0), Money(returned_money));
            *b.entry(c.clone()).or_default() +=
                points.iter().sum::<i64>() - s.points_redeemed.0 - claw + give;
        }
        for (c, v) in &self.adjusted {
            *b.entry(c.clone()).or_default() += v;
        }
        b
    }
}

fn open(path: &Path) -> Ledger {
    Ledger::open(path, &OpenOptions::default()).expect("ledger opens")
}

fn check_agree(ledger: &Ledger, model: &Model, now: DateTime<Utc>, step: usize) {
    let violations = ledger.verify().unwrap();
    assert!(violations.is_empty(), "step {step}: verify found {violations:#?}");
    let s = ledger.summary(&DateRange::default(), now).unwrap();
    let sales: Vec<&Document> = model.active(DocKind::Sale).collect();
    let returns: Vec<&Document> = model.active(DocKind::Return).collect();
    assert_eq!(s.sales_count, sales.len() as i64, "step {step}: sales_count");
    assert_eq!(
        s.returns_count,
        returns.len() as i64,
        "step {step}: returns_count"
    );
    let net: i64 =
        sales.iter().map(|d| d.total.0).sum::<i64>() - returns.iter().map(|d| d.total.0).sum::<i64>();
    assert_eq!(s.sales_total_kopecks, net, "step {step}: sales_total_kopecks");
    assert_eq!(s.points_accrued, model.accrued, "step {step}: points_accrued");
    assert_eq!(s.points_redeemed, model.redeemed, "step {step}: points_redeemed");
    assert_eq!(
        s.points_accrued - s.points_redeemed - s.points_expired - s.points_reversed + s.points_adjusted,
        s.points_pending + s.points_available,
        "step {step}: flows must add up to balances: {s:?}"
    );
    let balances = model.balances();
    let mut total = 0;
    for (c, expected) in &balances {
        let b = ledger.balance(c, now, Duration::days(14)).unwrap();
        assert_eq!(b.available + b.pending, *expected, "step {step}: balance of {c}");
        total += expected;
    }
    assert_eq!(
        total,
        s.points_pending + s.points_available,
        "step {step}: total balance"
    );
}

fn run(ops: Vec<Op>, stamped: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.db");
    let mut ledger = open(&path);
    let mut model = Model::default();
    let rules = rules();
    let limits = DocumentLimits::default();
    let dest = Destinations {
        contact_state: Some("amocrm".into()),
        ..Default::default()
    };
    let now = t0() + Duration::days(3);
    let ctx = IngestContext {
        rules: &rules,
        limits: &limits,
        destinations: &dest,
        now,
        warn_before: Duration::days(14),
    };
    let mut ingested: Vec<Incoming> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let stamp = stamped.then_some(n as i64);
        let incoming = match op {
            Op::Sale {
                id,
                customer,
                lines,
                redeem,
            } => {
                let mut d = doc(
                    DocKind::Sale,
                    format!("S{id}"),
                    *customer,
                    lines,
                    *redeem,
                    None,
                    n,
                );
                d.source.stamp = stamp;
                Some(Incoming::Document(d))
            }
            Op::Return { rid, of, lines } => {
                let customer = model
                    .docs
                    .get(&format!("S{of}"))
                    .and_then(|d| d.content.as_ref())
                    .and_then(|d| d.customer.card.as_ref())
                    .and_then(|c| c[1..].parse().ok());
                let mut d = doc(
                    DocKind::Return,
                    format!("R{rid}"),
                    customer,
                    lines,
                    0,
                    Some(format!("S{of}")),
                    n,
                );
                d.source.stamp = stamp;
                Some(Incoming::Document(d))
            }
            Op::Void { sale, id, tag } => Some(Incoming::Void {
                source: SourceRef {
                    system: "onec".into(),
                    doc_id: format!("{}{id}", if *sale { "S" } else { "R" }),
                    version: format!("void-{tag}"),
                    stamp,
                },
                reason: VoidReason::Unposted,
            }),
            Op::Replay { pick } => {
                if ingested.is_empty() {
                    None
                } else {
                    Some(ingested[*pick as usize % ingested.len()].clone())
                }
            }
            Op::Adjust {
                customer,
                points,
                key,
            } => {
                let c = card(*customer);
                let req = AdjustRequest {
                    customer: c.clone(),
                    points: *points as i64,
                    reason: "model test".into(),
                    key: Some(format!("k{key}")),
                    by: "proptest".into(),
                };
                let got = ledger.adjust(&req, &ctx);
                match (model.customers.contains(&c), model.adjustments.get(key)) {
                    _ if *points == 0 => assert!(matches!(got, Err(LedgerError::Refused(_))), "{got:?}"),
                    (false, _) => assert!(matches!(got, Err(LedgerError::UnknownCustomer(_))), "{got:?}"),
                    (true, None) => {
                        assert!(matches!(got, Ok(AdjustOutcome::Applied { .. })), "{got:?}");
                        model.adjustments.insert(*key, (*customer, *points as i64));
                        *model.adjusted.entry(c).or_default() += *points as i64;
                    }
                    (true, Some(prior)) if *prior == (*customer, *points as i64) => {
                        assert!(matches!(got, Ok(AdjustOutcome::AlreadyApplied { .. })), "{got:?}")
                    }
                    (true, Some(_)) => assert!(matches!(got, Err(LedgerError::KeyReused { .. })), "{got:?}"),
                }
                None
            }
            Op::Reopen => {
                drop(ledger);
                ledger = open(&path);
                None
            }
        };
        if let Some(inc) = incoming {
            let took_effect = model.ingest(&inc);
            let report = ledger
                .ingest(
                    Batch {
                        source: "model".into(),
                        items: vec![Item::Incoming(inc.clone())],
                        checkpoint: Some(n.to_string()),
                        ..Default::default()
                    },
                    &ctx,
                )
                .unwrap();
            let outcome = &report.outcomes[0].1;
            assert_eq!(
                took_effect,
                !matches!(outcome, Outcome::Unchanged | Outcome::Stale),
                "step {n}: model and ledger disagree on whether {op:?} took effect ({outcome:?})"
            );
            assert_eq!(ledger.checkpoint("model").unwrap(), Some(n.to_string()));
            ingested.push(inc);
        }
        check_agree(&ledger, &model, now, n);
    }
    // Replaying everything changes nothing.
    let before = ledger.summary(&DateRange::default(), now).unwrap();
    let history_len: usize = model
        .customers
        .iter()
        .map(|c| ledger.history(c).map(|h| h.1.len()).unwrap_or(0))
        .sum();
    let report = ledger
        .ingest(
            Batch {
                source: "model".into(),
                items: ingested.iter().cloned().map(Item::Incoming).collect(),
                checkpoint: None,
                ..Default::default()
            },
            &ctx,
        )
        .unwrap();
    assert_eq!(
        report.applied + report.new_versions + report.voided,
        0,
        "replay applied something: {report:?}"
    );
    assert_eq!(ledger.summary(&DateRange::default(), now).unwrap(), before);
    let history_after: usize = model
        .customers
        .iter()
        .map(|c| ledger.history(c).map(|h| h.1.len()).unwrap_or(0))
        .sum();
    assert_eq!(history_len, history_after, "replay wrote journal entries");
    check_agree(&ledger, &model, now, usize::MAX);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn ledger_agrees_with_model_without_stamps(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, false);
    }

    #[test]
    fn ledger_agrees_with_model_with_stamps(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, true);
    }
}
