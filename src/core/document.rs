//! The one shape every sale and return takes once it has crossed a connector's boundary.
//!
//! Connectors (1C CommerceML, OData, AmoCRM deals) convert their wire types into these; the
//! rules and the ledger never see XML or JSON. Validation lives here so that every source
//! refuses the same bad data for the same reason.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::identity::CustomerIdentity;
use super::money::{Money, Points, Quantity};

/// Where a document came from: enough to find it again in its source system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceRef {
    /// Source system, e.g. `onec`, `onec:partner-shop`, `amocrm`, `csv`.
    pub system: String,
    /// The document's id in that system (1C `Ref_Key`/`Ид`, AmoCRM lead id).
    pub doc_id: String,
    /// The source's version (1C `DataVersion`) or, where the source has none, a content hash.
    pub version: String,
    /// When the source says this version was made (CommerceML `ДатаФормирования`, AmoCRM
    /// `updated_at`), as Unix seconds, if it says so. It orders versions: an older one
    /// arriving after a newer one is a replay and is ignored. Without it, a version seen
    /// before is taken for a replay.
    pub stamp: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DocKind {
    Sale,
    Return,
}

impl DocKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Sale => "sale",
            DocKind::Return => "return",
        }
    }

    /// The kind in words a 1C user reads, when the source gave no kind of its own.
    pub fn label(self) -> &'static str {
        match self {
            DocKind::Sale => "Продажа",
            DocKind::Return => "Возврат",
        }
    }

    /// [`DocKind::label`] of a stored `as_str` value.
    pub fn label_of(stored: &str) -> Option<&'static str> {
        match stored {
            "sale" => Some(DocKind::Sale.label()),
            "return" => Some(DocKind::Return.label()),
            _ => None,
        }
    }
}

/// How a document is named for a person: its kind, number and date as 1C shows them
/// («ЧекККМ ЧК-000777 от 15.11.2026»), then the id kopilka knows it by — so it can be found
/// in 1C by its journal, and in the ledger by its id. Whatever is unknown is left out.
pub fn document_title(
    kind: Option<&str>,
    number: Option<&str>,
    date: Option<chrono::NaiveDate>,
    source: &str,
    id: &str,
) -> String {
    let mut out = String::new();
    let mut push = |part: &str| {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(part);
    };
    if let Some(k) = kind.map(str::trim).filter(|k| !k.is_empty()) {
        push(k);
    }
    match number.map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => push(n),
        None if date.is_some() => push("б/н"),
        None => {}
    }
    if let Some(d) = date {
        push(&format!("от {}", d.format("%d.%m.%Y")));
    }
    if out.is_empty() {
        format!("{source}:{id}")
    } else {
        format!("{out} ({source}:{id})")
    }
}

/// A sale or a return, normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub source: SourceRef,
    pub kind: DocKind,
    /// The number people see (`УТ-00001004`); not unique, for display and return links.
    pub number: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub customer: CustomerIdentity,
    /// ISO 4217 code after the connector mapped `руб`/`RUB`/`РУБ`; anything but the ledger's
    /// currency is refused by [`validate`].
    pub currency: String,
    pub lines: Vec<Line>,
    /// The document total as the source states it; checked against the lines.
    pub total: Money,
    /// Points the customer paid with at the till (a fact, not a request).
    pub points_redeemed: Points,
    /// For a return: the original sale's id (or number) in the same source, when known.
    pub original: Option<String>,
    pub store: Option<String>,
    /// Partner program: the partner whose sale this is (a second 1C base, another shop).
    pub partner: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub product_id: String,
    pub name: String,
    /// The product's own group (1C's catalog) or the category the source states.
    pub category: Option<String>,
    /// The groups above `category` in 1C's catalog tree, nearest first: a rule for "coffee"
    /// must reach a product filed under "coffee / beans". Filled from the catalog, never
    /// stored with the line (the tree can change) and empty for sources that state only one
    /// category.
    pub category_parents: Vec<String>,
    pub quantity: Quantity,
    pub unit_price: Money,
    /// Discount on the line, already subtracted from `net`.
    pub discount: Money,
    /// What the customer paid for the line, after discounts.
    pub net: Money,
    /// Cost per unit on the sale's date, when the source knows it.
    pub unit_cost: Option<Money>,
    /// A service line (delivery, gift card) rather than goods.
    pub service: bool,
}

impl Line {
    /// The line's category and the groups above it, most specific first.
    pub fn category_path(&self) -> impl Iterator<Item = &str> {
        self.category
            .iter()
            .chain(&self.category_parents)
            .map(String::as_str)
    }
}

/// Why a known document stops having an effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoidReason {
    /// 1C `Проведен=false` / OData `Posted=false`.
    Unposted,
    /// 1C `ПометкаУдаления=true` / OData `DeletionMark=true`.
    DeletionMarked,
    /// Gone from the source (404 on re-read).
    Deleted,
    /// A won deal left the won status, an order was cancelled.
    Cancelled,
}

impl VoidReason {
    pub fn as_str(self) -> &'static str {
        match self {
            VoidReason::Unposted => "unposted",
            VoidReason::DeletionMarked => "deletion_marked",
            VoidReason::Deleted => "deleted",
            VoidReason::Cancelled => "cancelled",
        }
    }
}

/// What a connector hands the ledger for one document version.
// Voids are rare; boxing every document to shrink them would cost an allocation per sale.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Document(Document),
    Void { source: SourceRef, reason: VoidReason },
}

impl Incoming {
    pub fn source(&self) -> &SourceRef {
        match self {
            Incoming::Document(d) => &d.source,
            Incoming::Void { source, .. } => source,
        }
    }
}

/// A document a connector could not even turn into a [`Document`]: it goes to quarantine
/// with everything a person needs to find it in the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejected {
    pub system: String,
    /// The document id if it could be read; otherwise a stable reference (file + offset).
    pub doc_ref: String,
    pub reason: String,
    /// Where: a file name and byte offset, a URL.
    pub location: Option<String>,
    /// A short piece of the raw input, for the person fixing it.
    pub excerpt: Option<String>,
    /// The document's kind as its source names it (`ЧекККМ`, `Отпуск товара`), number and
    /// date, as far as they could be read: how a person finds it in 1C, and the business
    /// day its absence from the ledger belongs to.
    pub kind: Option<String>,
    pub number: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Limits every document is held to, whatever its source.
#[derive(Clone, Debug)]
pub struct DocumentLimits {
    pub currency: String,
    pub max_lines: usize,
    /// Allowed difference between the stated total and the sum of lines.
    pub total_tolerance: Money,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        DocumentLimits {
            currency: "RUB".to_string(),
            max_lines: 10_000,
            total_tolerance: Money(1),
        }
    }
}

/// Business data that cannot be applied; the reason is shown to people as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Earliest plausible document date: before it a date is a typo or a default (`0001-01-01`).
pub const EARLIEST_PLAUSIBLE_YEAR: i32 = 2000;
/// How far past `now` a document may be dated: time zones and a till's clock running
/// ahead, not a sale from the future (`9999-12-31` would stay pending for ever).
pub const MAX_FUTURE_DAYS: i64 = 2;
/// Characters of a text field (a name, a number, an id) kept at most; longer is not a
/// real document and would bloat the ledger and every listing.
pub const MAX_TEXT_CHARS: usize = 1_000;

/// Checks a document before it may touch the ledger. Returns the first problem found,
/// phrased for the person who will fix the document in 1C.
///
/// Plausibility, besides the arithmetic: the date lies between
/// [`EARLIEST_PLAUSIBLE_YEAR`] and [`MAX_FUTURE_DAYS`] after `now`; no text holds a
/// control character (a NUL in a name is corruption, not a name); and no line's net
/// exceeds quantity × unit price by more than the rounding tolerance — half a kopeck per
/// started unit, at least one kopeck (a price may be stated rounded from sum ÷ quantity).
/// A net *below* quantity × price is a discount and is believed: 1C includes automatic
/// discounts in `Сумма` without always listing them.
pub fn validate(doc: &Document, limits: &DocumentLimits, now: DateTime<Utc>) -> Result<(), Invalid> {
    let bad = |s: String| Err(Invalid(s));
    let earliest = DateTime::<Utc>::from_naive_utc_and_offset(
        chrono::NaiveDate::from_ymd_opt(EARLIEST_PLAUSIBLE_YEAR, 1, 1)
            .unwrap_or_default()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default(),
        Utc,
    );
    if doc.occurred_at < earliest {
        return bad(format!(
            "dated {}, before {EARLIEST_PLAUSIBLE_YEAR}: not a plausible date",
            doc.occurred_at.format("%Y-%m-%d")
        ));
    }
    if doc.occurred_at > now + chrono::Duration::days(MAX_FUTURE_DAYS) {
        return bad(format!(
            "dated {}, more than {MAX_FUTURE_DAYS} days after now ({}): not a plausible date",
            doc.occurred_at.format("%Y-%m-%d %H:%M UTC"),
            now.format("%Y-%m-%d %H:%M UTC")
        ));
    }
    let c = &doc.customer;
    let texts = [
        ("document id", Some(doc.source.doc_id.as_str())),
        ("number", doc.number.as_deref()),
        ("return base", doc.original.as_deref()),
        ("store", doc.store.as_deref()),
        ("partner", doc.partner.as_deref()),
        ("card", c.card.as_deref()),
        ("customer 1C id", c.onec_id.as_deref()),
        ("customer name", c.name.as_deref()),
    ];
    for (what, text) in texts {
        if let Some(problem) = text.and_then(text_problem) {
            return bad(format!("{what}: {problem}"));
        }
    }
    for (i, l) in doc.lines.iter().enumerate() {
        for (what, text) in [("product id", &l.product_id), ("name", &l.name)] {
            if let Some(problem) = text_problem(text) {
                return bad(format!("line {}: {what}: {problem}", i + 1));
            }
        }
    }
    if doc.source.doc_id.trim().is_empty() {
        return bad("missing document id".into());
    }
    if doc.source.doc_id.len() > 200 {
        return bad(format!(
            "document id longer than 200 characters ({})",
            doc.source.doc_id.len()
        ));
    }
    if doc.currency != limits.currency {
        return bad(format!(
            "unknown currency {:?}: the ledger keeps {}",
            doc.currency, limits.currency
        ));
    }
    if doc.lines.is_empty() {
        return bad("document has no lines".into());
    }
    if doc.lines.len() > limits.max_lines {
        return bad(format!(
            "{} lines, more than the limit of {}",
            doc.lines.len(),
            limits.max_lines
        ));
    }
    if doc.points_redeemed.0 < 0 {
        return bad(format!("negative points redeemed: {}", doc.points_redeemed));
    }
    for (i, l) in doc.lines.iter().enumerate() {
        let n = i + 1;
        if l.product_id.trim().is_empty() {
            return bad(format!("line {n}: missing product id"));
        }
        if l.quantity <= Decimal::ZERO {
            return bad(format!(
                "line {n} ({}): quantity {} is not positive",
                l.product_id, l.quantity
            ));
        }
        if l.net.is_negative() || l.unit_price.is_negative() {
            return bad(format!(
                "line {n} ({}): negative amount (net {}, price {})",
                l.product_id, l.net, l.unit_price
            ));
        }
        if l.unit_cost.is_some_and(Money::is_negative) {
            return bad(format!("line {n} ({}): negative cost", l.product_id));
        }
        if l.unit_price.0 != 0 {
            // in kopecks: quantity × price, and half a kopeck per started unit
            let gross = l.quantity.checked_mul(Decimal::from(l.unit_price.0));
            let units = l.quantity.ceil().max(Decimal::ONE);
            let tolerance = (units / Decimal::TWO).max(Decimal::ONE);
            if let Some(gross) = gross
                && Decimal::from(l.net.0) > gross + tolerance
            {
                return bad(format!(
                    "line {n} ({}): net {} is more than quantity {} × price {} = {}",
                    l.product_id,
                    l.net,
                    l.quantity.normalize(),
                    l.unit_price,
                    Money(
                        gross
                            .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
                            .try_into()
                            .unwrap_or(i64::MAX)
                    )
                ));
            }
        }
    }
    let sum: Money = doc.lines.iter().map(|l| l.net).sum();
    let tolerance = limits.total_tolerance.0 * (doc.lines.len() as i64).max(1);
    if (sum.0 - doc.total.0).abs() > tolerance {
        return bad(format!(
            "lines sum to {sum} but the document total is {}",
            doc.total
        ));
    }
    Ok(())
}

/// Why a text field cannot be stored, if it cannot: a control character or an absurd length.
fn text_problem(text: &str) -> Option<String> {
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Some(format!("holds the control character U+{:04X}", u32::from(c)));
    }
    let n = text.chars().count();
    (n > MAX_TEXT_CHARS).then(|| format!("{n} characters, more than {MAX_TEXT_CHARS}"))
}

/// A stable hash of everything that affects the ledger, for sources that carry no version
/// (CommerceML files): the same content is the same version, any edit is a new one.
pub fn content_version(doc: &Document) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(doc.kind.as_str());
    field(doc.number.as_deref().unwrap_or(""));
    field(&doc.occurred_at.timestamp().to_string());
    let c = &doc.customer;
    field(c.card.as_deref().unwrap_or(""));
    field(c.phone.as_ref().map(|p| p.as_str()).unwrap_or(""));
    field(c.email.as_ref().map(|e| e.as_str()).unwrap_or(""));
    field(c.onec_id.as_deref().unwrap_or(""));
    field(&c.amocrm_id.map(|v| v.to_string()).unwrap_or_default());
    field(&doc.currency);
    field(&doc.total.0.to_string());
    field(&doc.points_redeemed.0.to_string());
    field(doc.original.as_deref().unwrap_or(""));
    field(doc.store.as_deref().unwrap_or(""));
    field(doc.partner.as_deref().unwrap_or(""));
    for l in &doc.lines {
        field(&l.product_id);
        field(l.category.as_deref().unwrap_or(""));
        field(&l.quantity.normalize().to_string());
        field(&l.unit_price.0.to_string());
        field(&l.discount.0.to_string());
        field(&l.net.0.to_string());
        field(&l.unit_cost.map(|m| m.0.to_string()).unwrap_or_default());
        field(if l.service { "s" } else { "g" });
    }
    hash_version(&h.finalize()[..16])
}

/// How a content-hash version starts: `sha256:` and the first 16 bytes of the digest in
/// lower-case hex ([`hash_version`]).
pub const HASH_VERSION: &str = "sha256:";

/// The version text of a content hash's `bytes` — the one spelling every source's hash and
/// the ledger's stored form (bytes, read back through this) share.
pub fn hash_version(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(HASH_VERSION.len() + 2 * bytes.len());
    out.push_str(HASH_VERSION);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    pub fn sample() -> Document {
        Document {
            source: SourceRef {
                system: "onec".into(),
                doc_id: "D1".into(),
                version: "v1".into(),
                stamp: None,
            },
            kind: DocKind::Sale,
            number: Some("0001".into()),
            occurred_at: Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap(),
            customer: CustomerIdentity {
                card: Some("C1".into()),
                ..Default::default()
            },
            currency: "RUB".into(),
            lines: vec![Line {
                product_id: "P1".into(),
                name: "Кофе".into(),
                category: Some("coffee".into()),
                category_parents: Vec::new(),
                quantity: Decimal::from_str("2").unwrap(),
                unit_price: Money(50000),
                discount: Money(0),
                net: Money(100000),
                unit_cost: Some(Money(30000)),
                service: false,
            }],
            total: Money(100000),
            points_redeemed: Points(0),
            original: None,
            store: None,
            partner: None,
        }
    }

    fn check(edit: impl Fn(&mut Document), expected: Result<(), &str>) {
        let mut d = sample();
        edit(&mut d);
        let now = sample().occurred_at + chrono::Duration::days(1);
        let got = validate(&d, &DocumentLimits::default(), now);
        match expected {
            Ok(()) => assert_eq!(got, Ok(())),
            Err(fragment) => {
                let err = got.expect_err("expected the document to be refused").0;
                assert!(err.contains(fragment), "{err:?} should mention {fragment:?}");
            }
        }
    }

    #[test]
    fn refuses_bad_business_data_with_a_reason() {
        check(|_| {}, Ok(()));
        check(|d| d.source.doc_id = " ".into(), Err("missing document id"));
        check(|d| d.currency = "USD".into(), Err("unknown currency \"USD\""));
        check(
            |d| d.lines[0].quantity = Decimal::from_str("-1").unwrap(),
            Err("quantity -1 is not positive"),
        );
        check(|d| d.total = Money(100500), Err("lines sum to 1000.00"));
        check(|d| d.total = Money(100001), Ok(()));
        check(|d| d.lines.clear(), Err("no lines"));
        check(|d| d.points_redeemed = Points(-1), Err("negative points"));
        check(|d| d.lines[0].product_id.clear(), Err("missing product id"));
    }

    #[test]
    fn refuses_implausible_documents() {
        // 2 × 100.00 claiming 99 999.00
        check(
            |d| {
                d.lines[0].quantity = Decimal::TWO;
                d.lines[0].unit_price = Money(10000);
                d.lines[0].net = Money(9999900);
                d.total = Money(9999900);
            },
            Err("net 99999.00 is more than quantity 2 × price 100.00 = 200.00"),
        );
        // a discount the source did not list is believed; rounding of a weighed line too
        check(
            |d| {
                d.lines[0].net = Money(90000);
                d.total = Money(90000);
            },
            Ok(()),
        );
        check(
            |d| {
                d.lines[0].quantity = Decimal::from_str("0.357").unwrap();
                d.lines[0].unit_price = Money(19990);
                d.lines[0].net = Money(7137);
                d.total = Money(7137);
            },
            Ok(()),
        );
        check(
            |d| d.occurred_at = "9999-12-31T00:00:00Z".parse().unwrap(),
            Err("not a plausible date"),
        );
        check(
            |d| d.occurred_at = "1900-01-01T00:00:00Z".parse().unwrap(),
            Err("before 2000"),
        );
        check(
            |d| d.lines[0].name = "Хлеб\0".into(),
            Err("line 1: name: holds the control character U+0000"),
        );
        check(|d| d.number = Some("x".repeat(1001)), Err("more than 1000"));
    }

    #[test]
    fn content_version_changes_with_content_only() {
        let a = sample();
        let mut b = sample();
        assert_eq!(content_version(&a), content_version(&b));
        b.source.version = "other".into();
        assert_eq!(content_version(&a), content_version(&b));
        b.lines[0].net = Money(99999);
        assert_ne!(content_version(&a), content_version(&b));
    }
}
