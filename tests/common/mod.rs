//! Shared helpers for integration tests: a ledger in a temporary directory and documents
//! built with a few words.
#![allow(dead_code)]

use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kopilka::core::document::{
    DocKind, Document, DocumentLimits, Incoming, Line, SourceRef, content_version,
};
use kopilka::core::identity::CustomerIdentity;
use kopilka::core::money::{Money, Points};
use kopilka::core::rules::RuleSet;
use kopilka::ledger::{Batch, Destinations, IngestContext, IngestReport, Item, Ledger, OpenOptions};
use rust_decimal::Decimal;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub ledger: Ledger,
    pub rules: RuleSet,
    pub limits: DocumentLimits,
    pub dest: Destinations,
    pub now: DateTime<Utc>,
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

impl Env {
    pub fn with_rules(text: &str) -> Env {
        let mut env = Env::new();
        env.rules = kopilka::rules_file::parse(text, "test-rules.toml").unwrap_or_else(|e| panic!("{e}"));
        env
    }

    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let ledger = Ledger::open(&path, &OpenOptions::default()).unwrap();
        Env {
            dir,
            path,
            ledger,
            rules: RuleSet::flat(
                Decimal::from(5),
                Money(100),
                Duration::days(14),
                Some(Duration::days(365)),
            ),
            limits: DocumentLimits::default(),
            dest: Destinations {
                contact_state: Some("amocrm".into()),
                ..Default::default()
            },
            now: t0() + Duration::days(30),
        }
    }

    pub fn ctx(&self) -> IngestContext<'_> {
        IngestContext {
            rules: &self.rules,
            limits: &self.limits,
            destinations: &self.dest,
            now: self.now,
            warn_before: Duration::days(14),
        }
    }

    /// Runs `f` on the ledger with this environment's context (for the nightly jobs).
    pub fn run<R>(&mut self, f: impl FnOnce(&mut Ledger, &RuleSet, &IngestContext<'_>) -> R) -> R {
        let ctx = IngestContext {
            rules: &self.rules,
            limits: &self.limits,
            destinations: &self.dest,
            now: self.now,
            warn_before: Duration::days(14),
        };
        f(&mut self.ledger, &self.rules, &ctx)
    }

    pub fn expire(&mut self) -> i64 {
        let ctx = IngestContext {
            rules: &self.rules,
            limits: &self.limits,
            destinations: &self.dest,
            now: self.now,
            warn_before: Duration::days(14),
        };
        self.ledger.expire_due(&ctx).unwrap()
    }

    pub fn adjust(
        &mut self,
        req: &kopilka::ledger::AdjustRequest,
    ) -> Result<kopilka::ledger::AdjustOutcome, kopilka::ledger::LedgerError> {
        let ctx = IngestContext {
            rules: &self.rules,
            limits: &self.limits,
            destinations: &self.dest,
            now: self.now,
            warn_before: Duration::days(14),
        };
        self.ledger.adjust(req, &ctx)
    }

    pub fn ingest(&mut self, items: Vec<Item>) -> IngestReport {
        self.ingest_batch(Batch {
            source: "test".into(),
            items,
            checkpoint: None,
            ..Default::default()
        })
    }

    pub fn ingest_batch(&mut self, batch: Batch) -> IngestReport {
        let ctx = IngestContext {
            rules: &self.rules,
            limits: &self.limits,
            destinations: &self.dest,
            now: self.now,
            warn_before: Duration::days(14),
        };
        self.ledger.ingest(batch, &ctx).unwrap()
    }

    pub fn docs(&mut self, docs: Vec<Document>) -> IngestReport {
        self.ingest(
            docs.into_iter()
                .map(|d| Item::Incoming(Incoming::Document(d)))
                .collect(),
        )
    }

    pub fn available(&self, customer: &str) -> i64 {
        self.ledger
            .balance(customer, self.now, Duration::days(14))
            .unwrap()
            .available
    }

    pub fn assert_verified(&self) {
        let v = self.ledger.verify().unwrap();
        assert!(v.is_empty(), "ledger verify: {v:#?}");
    }
}

/// A sale of `lines` (product, quantity, unit price in rubles) to card `card`.
pub fn sale(id: &str, card: Option<&str>, lines: &[(&str, i64, i64)]) -> Document {
    let lines: Vec<Line> = lines
        .iter()
        .map(|&(p, q, rub)| Line {
            product_id: p.into(),
            name: p.into(),
            category: None,
            category_parents: Vec::new(),
            quantity: Decimal::from(q),
            unit_price: Money(rub * 100),
            discount: Money(0),
            net: Money(rub * 100 * q),
            unit_cost: Some(Money(rub * 50)),
            service: false,
        })
        .collect();
    let mut d = Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: id.into(),
            version: String::new(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: Some(format!("N-{id}")),
        occurred_at: t0(),
        customer: CustomerIdentity {
            card: card.map(str::to_string),
            ..Default::default()
        },
        currency: "RUB".into(),
        total: lines.iter().map(|l| l.net).sum(),
        lines,
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    };
    d.source.version = content_version(&d);
    d
}

pub fn returned(id: &str, of: &Document, lines: &[(&str, i64)]) -> Document {
    let mut d = of.clone();
    d.source.doc_id = id.into();
    d.kind = DocKind::Return;
    d.number = Some(format!("N-{id}"));
    d.original = Some(of.source.doc_id.clone());
    d.points_redeemed = Points(0);
    d.occurred_at = of.occurred_at + Duration::days(1);
    d.lines = lines
        .iter()
        .map(|&(p, q)| {
            let l = of
                .lines
                .iter()
                .find(|l| l.product_id == p)
                .expect("product on the sale");
            Line {
                quantity: Decimal::from(q),
                net: Money(l.unit_price.0 * q),
                ..l.clone()
            }
        })
        .collect();
    d.total = d.lines.iter().map(|l| l.net).sum();
    d.source.version = content_version(&d);
    d
}

pub fn reversion(mut d: Document) -> Document {
    d.source.version = content_version(&d);
    d
}

pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}
