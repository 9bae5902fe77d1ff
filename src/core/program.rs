//! What a sale earns, and what a return takes back.
//!
//! [`Rules`] is the seam between the ledger and the rules engine: the ledger asks it for a
//! [`Decision`] per sale and never computes rewards itself. [`FlatPercent`] is the simplest
//! program (a fixed percentage); the cost-aware engine implements the same trait.
//!
//! Rounding: a line's reward is computed in kopecks of value and converted to points
//! **rounded down** per line, so the per-line explanation items sum exactly to the posted
//! accrual. Proportional reversals use `floor(a × cumulative / total)` differences, so a
//! return of everything takes back exactly what was given, and partial returns never take
//! back more.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::document::Document;
use super::journal::{Explanation, ExplanationItem, Flag};
use super::money::{Money, prorate_floor};
use super::rules::{NegativeBalance, TierChange};

/// What the rules need to know about the customer beyond the sale itself. The ledger
/// fills it from stored rows; everything is "before this sale".
#[derive(Clone, Debug, Default)]
pub struct CustomerState {
    /// Ledger id; `None` for an anonymous sale (no card, phone or counterparty).
    pub customer_id: Option<i64>,
    /// Points usable right now (may be negative while a debt is outstanding).
    pub available: i64,
    pub tier: Option<String>,
    /// Spend over the tier window before this sale.
    pub spend_in_window: Money,
    /// Stamp counts and threshold spend (see `rules::counter_needs`).
    pub counters: HashMap<String, Decimal>,
    /// Threshold rules already rewarded within their window.
    pub recent_awards: Vec<String>,
    /// Sales of this customer in force before this one (0 = first purchase).
    pub prior_sales: u32,
    /// Sales of this customer on the same local day before this one.
    pub sales_today: u32,
    /// Closed programs the customer belongs to.
    pub memberships: Vec<String>,
    /// Gross margin and points value issued so far in this sale's budget period.
    pub budget: Option<BudgetState>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetState {
    pub margin: Money,
    pub issued_value: Money,
}

/// Points granted by an event rather than by a sale's lines (stamp card, spend threshold,
/// welcome), posted as their own transaction so reports can tell them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bonus {
    pub rule: String,
    pub points: i64,
    pub explanation: Explanation,
}

/// The rules' answer for one sale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Points earned per document line, in line order.
    pub line_points: Vec<i64>,
    pub accrual: i64,
    pub explanation: Explanation,
    pub available_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub flags: Vec<Flag>,
    pub bonuses: Vec<Bonus>,
    /// This sale's contribution to stamp counters.
    pub counters: Vec<(String, Decimal)>,
    /// Vouchers earned: (stamp card, product).
    pub vouchers: Vec<(String, String)>,
    /// Closed programs this sale enrols the customer in (or renews): (program, the
    /// membership product bought).
    pub memberships: Vec<(String, String)>,
    /// Gross margin of the sale's lines with known cost.
    pub margin: Money,
    /// Kopecks of the points paid at the till spread to each line, in line order (empty when
    /// none were paid), by [`crate::core::rules::allocate_redemption`].
    pub line_redeemed: Vec<i64>,
    /// Amount below cost caused by points paid at the till — only the part the points caused,
    /// not what a line lost by its price alone.
    pub loss: Money,
    /// Partner whose program the sale belongs to.
    pub partner: Option<String>,
}

pub trait Rules: Send + Sync {
    fn evaluate(&self, doc: &Document, customer: &CustomerState, now: DateTime<Utc>) -> Decision;

    /// When points earned at `earned_at` become usable and when they burn; used for
    /// accruals, re-credits and manual adjustments alike.
    fn lot_times(&self, earned_at: DateTime<Utc>) -> (DateTime<Utc>, Option<DateTime<Utc>>);

    /// What one point is worth in kopecks (redemptions are payments of this value).
    fn point_value(&self) -> Money;

    /// Counters (stamp cards, spend thresholds) the ledger must fill in, with the
    /// look-back window of each spend counter.
    fn counter_needs(&self) -> Vec<(String, Option<Duration>)> {
        Vec::new()
    }

    /// What a sale adds to each counter, stored with the sale so counters follow edits.
    fn counter_contributions(&self, _doc: &Document, _decision: &Decision) -> Vec<(String, i64)> {
        Vec::new()
    }

    /// The spend window tiers are measured over, when the program has tiers.
    /// The id of the tier `text` names (its id or its name, any case), if the program has it.
    fn tier_named(&self, _text: &str) -> Option<String> {
        None
    }

    fn tier_window(&self) -> Option<Duration> {
        None
    }

    fn tier_after_sale(&self, _current: Option<&str>, _spend_with_sale: Money) -> Option<TierChange> {
        None
    }

    /// The budget period a sale falls in, when the program has a budget.
    fn budget_period_key(&self, _at: DateTime<Utc>) -> Option<String> {
        None
    }

    fn negative_balance(&self) -> NegativeBalance {
        NegativeBalance::Allow
    }

    fn membership_for_invite(&self, _code: &str) -> Option<String> {
        None
    }

    /// How many customers one invite code of the program may bring in (`None`: no limit).
    fn invite_limit(&self, _program: &str) -> Option<u32> {
        None
    }

    /// Points for joining the program (given once per customer).
    fn enrolment_points(&self) -> i64 {
        0
    }

    /// The shop's time zone, for "today" and budget periods.
    fn timezone(&self) -> chrono_tz::Tz {
        chrono_tz::UTC
    }

    /// The rules file behind this program, when there is one: what a return takes back
    /// besides the goods' points (stamps, thresholds, per-check and first-purchase points)
    /// is decided from it (`core::clawback`). Programs without event rewards have none.
    fn rule_set(&self) -> Option<&crate::core::rules::RuleSet> {
        None
    }
}

/// A fixed percentage of what the customer paid in money, on goods (not services).
#[derive(Clone, Debug)]
pub struct FlatPercent {
    pub percent: Decimal,
    pub point_value: Money,
    pub return_window: Duration,
    pub expire_after: Option<Duration>,
}

impl Default for FlatPercent {
    fn default() -> Self {
        FlatPercent {
            percent: Decimal::from(5),
            point_value: Money(100),
            return_window: Duration::days(14),
            expire_after: Some(Duration::days(365)),
        }
    }
}

impl Rules for FlatPercent {
    fn evaluate(&self, doc: &Document, customer: &CustomerState, _now: DateTime<Utc>) -> Decision {
        let (available_at, expires_at) = self.lot_times(doc.occurred_at);
        let mut d = Decision {
            line_points: vec![0; doc.lines.len()],
            available_at: Some(available_at),
            expires_at,
            ..Default::default()
        };
        if customer.customer_id.is_none() {
            if doc.points_redeemed.0 > 0 {
                d.flags.push(Flag::new(
                    "redemption_without_customer",
                    format!(
                        "{} points paid without a customer to take them from",
                        doc.points_redeemed
                    ),
                ));
            }
            d.explanation = Explanation::text("no customer on the document: nothing earned");
            return d;
        }
        let goods_net: i64 = doc.lines.iter().filter(|l| !l.service).map(|l| l.net.0).sum();
        // Points paid with points earn nothing: the redeemed value is taken off the base,
        // spread over the goods lines in proportion to their net (rounded up per line, so
        // the base is never overstated).
        let redeemed_value = doc.points_redeemed.0.saturating_mul(self.point_value.0);
        let rate = self.percent / Decimal::ONE_HUNDRED;
        for (i, line) in doc.lines.iter().enumerate() {
            if line.service {
                continue;
            }
            let share = if goods_net > 0 {
                (Decimal::from(redeemed_value) * Decimal::from(line.net.0) / Decimal::from(goods_net))
                    .ceil()
                    .to_i64()
                    .unwrap_or(i64::MAX)
            } else {
                0
            };
            let base = (line.net.0 - share).max(0);
            let value = Decimal::from(base) * rate;
            let points = if self.point_value.0 > 0 {
                (value / Decimal::from(self.point_value.0))
                    .floor()
                    .to_i64()
                    .unwrap_or(0)
            } else {
                0
            };
            d.line_points[i] = points;
            if points > 0 {
                d.explanation.items.push(ExplanationItem {
                    rule: "flat_percent".into(),
                    line: Some(i as u32 + 1),
                    product: Some(line.product_id.clone()),
                    base_kopecks: Some(base),
                    rate: Some(format!("{}%", self.percent.normalize())),
                    points,
                    ..Default::default()
                });
            }
        }
        d.accrual = d.line_points.iter().sum();
        d.explanation.summary = format!(
            "{}% of {} paid in money, 1 point = {}",
            self.percent.normalize(),
            Money(goods_net - redeemed_value.min(goods_net)),
            self.point_value
        );
        d
    }

    fn lot_times(&self, earned_at: DateTime<Utc>) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
        let available = earned_at + self.return_window;
        (available, self.expire_after.map(|e| available + e))
    }

    fn point_value(&self) -> Money {
        self.point_value
    }
}

/// A line of the original sale as the ledger recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct SoldLine {
    pub product_id: String,
    pub quantity: Decimal,
    pub points: i64,
}

/// Points to take back for each line of a return, given what earlier returns of the same
/// sale already took. Lines are matched by product; returning more than was sold, or a
/// product the sale did not have, takes back nothing for the excess and is flagged.
pub fn return_clawback(
    sold: &[SoldLine],
    returned_before: &[(String, Decimal)],
    returning: &[(String, Decimal)],
) -> (Vec<i64>, Vec<Flag>) {
    let mut by_product: HashMap<&str, (Decimal, i64)> = HashMap::new();
    for l in sold {
        let e = by_product
            .entry(l.product_id.as_str())
            .or_insert((Decimal::ZERO, 0));
        e.0 += l.quantity;
        e.1 += l.points;
    }
    let mut cum: HashMap<&str, Decimal> = HashMap::new();
    for (p, q) in returned_before {
        *cum.entry(p.as_str()).or_insert(Decimal::ZERO) += *q;
    }
    let mut out = Vec::with_capacity(returning.len());
    let mut flags = Vec::new();
    for (p, q) in returning {
        let Some(&(sold_qty, points)) = by_product.get(p.as_str()) else {
            flags.push(Flag::new(
                "return_of_unsold_product",
                format!("product {p} is not on the original sale"),
            ));
            out.push(0);
            continue;
        };
        let before = cum.get(p.as_str()).copied().unwrap_or(Decimal::ZERO);
        let after = before + *q;
        if after > sold_qty {
            flags.push(Flag::new(
                "over_return",
                format!("product {p}: {after} returned of {sold_qty} sold"),
            ));
        }
        let take = prorate_floor(points, after.min(sold_qty), sold_qty)
            - prorate_floor(points, before.min(sold_qty), sold_qty);
        cum.insert(p.as_str(), after);
        out.push(take);
    }
    (out, flags)
}

/// Points to give back for a return when the sale was partly paid with points: the
/// redeemed points in proportion to the money returned.
pub fn return_recredit(redeemed: i64, sale_total: Money, before: Money, now: Money) -> i64 {
    if redeemed <= 0 || sale_total.0 <= 0 {
        return 0;
    }
    let total = Decimal::from(sale_total.0);
    let b = Decimal::from(before.0.max(0));
    let a = Decimal::from((before.0 + now.0).max(0));
    prorate_floor(redeemed, a.min(total), total) - prorate_floor(redeemed, b.min(total), total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::document::tests::sample;
    use crate::core::money::Points;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn known() -> CustomerState {
        CustomerState {
            customer_id: Some(1),
            ..Default::default()
        }
    }

    fn check(edit: impl Fn(&mut crate::core::document::Document), pct: &str, expected: &[i64]) {
        let mut doc = sample();
        edit(&mut doc);
        let p = FlatPercent {
            percent: dec(pct),
            ..Default::default()
        };
        let d = p.evaluate(&doc, &known(), doc.occurred_at);

        assert_eq!(d.line_points, expected);
        assert_eq!(d.accrual, expected.iter().sum::<i64>());
        let explained: i64 = d.explanation.items.iter().map(|i| i.points).sum();
        assert_eq!(explained, d.accrual, "explanations sum to the accrual");
    }

    #[test]
    fn flat_percent_rounds_down_per_line_at_the_kopeck_boundary() {
        // 1000.00 × 5% = 50.00 → 50 points of 1 ruble
        check(|_| {}, "5", &[50]);
        // 19.99 × 5% = 0.9995 → 0 points
        check(
            |d| {
                d.lines[0].net = Money(1999);
                d.total = Money(1999);
            },
            "5",
            &[0],
        );
        // 20.00 × 5% = 1.00 → exactly 1 point
        check(
            |d| {
                d.lines[0].net = Money(2000);
                d.total = Money(2000);
            },
            "5",
            &[1],
        );
        // services earn nothing
        check(|d| d.lines[0].service = true, "5", &[0]);
        // 200 points paid (200.00) off a 1000.00 check: base 800.00 → 40
        check(|d| d.points_redeemed = Points(200), "5", &[40]);
    }

    #[test]
    fn anonymous_sales_earn_nothing_and_flag_redemptions() {
        let mut doc = sample();
        doc.points_redeemed = Points(5);
        let d = FlatPercent::default().evaluate(&doc, &CustomerState::default(), doc.occurred_at);
        assert_eq!(d.accrual, 0);
        assert_eq!(d.flags[0].code, "redemption_without_customer");
    }

    #[test]
    fn clawback_is_exact_for_full_returns_and_never_more() {
        let sold = vec![
            SoldLine {
                product_id: "A".into(),
                quantity: dec("3"),
                points: 10,
            },
            SoldLine {
                product_id: "B".into(),
                quantity: dec("1"),
                points: 4,
            },
        ];
        let (t, f) = return_clawback(&sold, &[], &[("A".into(), dec("1"))]);
        assert_eq!((t, f.len()), (vec![3], 0));
        let (t, _) = return_clawback(&sold, &[("A".into(), dec("1"))], &[("A".into(), dec("2"))]);
        assert_eq!(t, vec![7]);
        let (t, f) = return_clawback(&sold, &[], &[("A".into(), dec("5")), ("C".into(), dec("1"))]);
        assert_eq!(t, vec![10, 0]);
        assert_eq!(
            f.iter().map(|f| f.code.as_str()).collect::<Vec<_>>(),
            ["over_return", "return_of_unsold_product"]
        );
    }

    #[test]
    fn recredit_is_proportional_to_money_returned() {
        assert_eq!(return_recredit(100, Money(1000), Money(0), Money(500)), 50);
        assert_eq!(return_recredit(100, Money(1000), Money(500), Money(500)), 50);
        assert_eq!(return_recredit(7, Money(300), Money(0), Money(100)), 2);
        assert_eq!(return_recredit(7, Money(300), Money(100), Money(200)), 5);
        assert_eq!(return_recredit(0, Money(300), Money(0), Money(300)), 0);
    }
}
