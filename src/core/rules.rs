//! The cost-aware rules engine: what a sale earns, what a basket may be paid with, and why.
//!
//! Everything here is a pure function of the sale, the customer's state, the rule set and
//! the time. The guarantees this product exists for are enforced here, in one place:
//!
//! - a line earns at most `max_reward_share_of_margin × margin`, and nothing at all when its
//!   margin (net − points paid on it − cost × quantity) is zero or negative;
//! - a line whose cost is unknown follows a named policy and is always flagged, so reports
//!   show what was granted blind;
//! - a quote never lets a redemption take any line below `cost × (1 + min_markup)`; a sale
//!   that arrives having done so anyway (the till is the authority) is flagged `loss_maker`
//!   with the amount lost;
//! - points issued in a budget period never exceed the configured share of that period's
//!   gross margin: the excess is capped and flagged, never silently issued.
//!
//! Rounding: rates apply to kopecks exactly (decimals); each explanation item's value is
//! converted to points **rounded down**, so the items of a decision sum exactly to what is
//! posted, and a cap always reduces whole items from the last one back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Duration, NaiveDate, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::document::{Document, Line};
use super::journal::{Explanation, ExplanationItem, Flag};
use super::money::Money;
use super::program::{Bonus, CustomerState, Decision, Rules};

/// A sale's local date, weekday and hour, computed once per evaluation.
struct LocalTime {
    date: NaiveDate,
    weekday: Weekday,
    hour: u32,
}

impl LocalTime {
    fn of(at: DateTime<Utc>, tz: Tz) -> LocalTime {
        let local = at.with_timezone(&tz);
        LocalTime {
            date: local.date_naive(),
            weekday: local.weekday(),
            hour: local.hour(),
        }
    }
}

/// Conditions a rule applies under. Empty lists mean "any".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Local business dates, inclusive.
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub weekdays: Vec<Weekday>,
    /// Local hours `[start, end)`; `start > end` wraps past midnight.
    pub hours: Option<(u32, u32)>,
    pub stores: Vec<String>,
    /// Source systems (`onec`, `amocrm`, a partner's source).
    pub channels: Vec<String>,
    pub tiers: Vec<String>,
    /// Closed programs the customer must be a member of.
    pub programs: Vec<String>,
    pub include_products: Vec<String>,
    pub exclude_products: Vec<String>,
    pub include_categories: Vec<String>,
    pub exclude_categories: Vec<String>,
}

impl Filter {
    fn document_matches(&self, doc: &Document, customer: &CustomerState, local: &LocalTime) -> bool {
        let date = local.date;
        if self.from.is_some_and(|f| date < f) || self.to.is_some_and(|t| date > t) {
            return false;
        }
        if !self.weekdays.is_empty() && !self.weekdays.contains(&local.weekday) {
            return false;
        }
        if let Some((start, end)) = self.hours {
            let h = local.hour;
            let inside = if start <= end {
                h >= start && h < end
            } else {
                h >= start || h < end
            };
            if !inside {
                return false;
            }
        }
        if !self.stores.is_empty() && !doc.store.as_ref().is_some_and(|s| self.stores.contains(s)) {
            return false;
        }
        if !self.channels.is_empty() && !self.channels.contains(&doc.source.system) {
            return false;
        }
        if !self.tiers.is_empty() && !customer.tier.as_ref().is_some_and(|t| self.tiers.contains(t)) {
            return false;
        }
        if !self.programs.is_empty() && !self.programs.iter().any(|p| customer.memberships.contains(p)) {
            return false;
        }
        true
    }

    /// A category listed here stands for its whole subtree in 1C's catalog: the line
    /// matches when any group on its path (own group or one above it) is listed.
    pub(crate) fn line_matches(&self, line: &Line) -> bool {
        if self.exclude_products.contains(&line.product_id)
            || line
                .category_path()
                .any(|g| self.exclude_categories.iter().any(|c| c == g))
        {
            return false;
        }
        self.specificity(line).is_some()
    }

    /// How closely the filter's product/category inclusions name a line (`None`: they do
    /// not name it). Exclusions are [`Filter::line_matches`]'s business.
    fn specificity(&self, line: &Line) -> Option<Specificity> {
        if self.include_products.is_empty() && self.include_categories.is_empty() {
            return Some(Specificity::Any);
        }
        if self.include_products.contains(&line.product_id) {
            return Some(Specificity::Product);
        }
        line.category_path()
            .position(|g| self.include_categories.iter().any(|c| c == g))
            .map(|depth| Specificity::Category(Reverse(depth)))
    }
}

/// Which of several percent rules matching a line applies: the one that names the line most
/// closely, so a shop can give a whole department one rate and one group or product
/// another. Ordered from least to most specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    /// No product or category inclusion.
    Any,
    /// A group on the line's path, by its distance from the product's own group.
    Category(Reverse<usize>),
    /// The product itself.
    Product,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EarnKind {
    /// Percent of the line's net paid in money. Where several percent rules match a line,
    /// the most specific applies (product, then the deepest group, then rules naming
    /// neither), the highest among equally specific ones; rates do not stack.
    Percent(Decimal),
    /// Multiplies the line's rate; several multipliers multiply.
    Multiplier(Decimal),
    /// Points per check meeting the rule (e.g. a visit bonus).
    FixedPerCheck(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct EarnRule {
    pub id: String,
    pub kind: EarnKind,
    pub filter: Filter,
    /// The check's eligible lines must sum to at least this.
    pub min_check: Money,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    pub id: String,
    pub name: String,
    /// Spend over the tier window needed to reach the tier.
    pub min_spend: Money,
    pub earn_multiplier: Decimal,
    /// Discount the till should give (дисконтная программа); published, not applied here.
    pub discount_pct: Decimal,
    /// This tier's cap on the share of a check payable with points.
    pub max_redeem_share: Option<Decimal>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TierPolicy {
    pub window: Duration,
    /// A customer keeps their tier this long after their spend first falls below its
    /// threshold: a loyal customer is not demoted by one slow month, however long ago the
    /// tier was reached.
    pub downgrade_grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampCount {
    /// Every qualifying item (by quantity, whole units).
    Items,
    /// Every check with at least one qualifying item.
    Visits,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StampReward {
    Points(i64),
    /// A voucher for a named product (issued, not paid in points).
    Product(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct StampCard {
    pub id: String,
    /// `stamp:<id>`: the counter and bonus rule name.
    pub key: String,
    pub every: u32,
    pub count: StampCount,
    pub filter: Filter,
    pub reward: StampReward,
    /// How long a free-item voucher of this card can be used (`reward_valid_days`, 90).
    pub voucher_valid: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    pub id: String,
    /// `threshold:<id>`: the counter and bonus rule name.
    pub key: String,
    pub spend: Money,
    pub window: Duration,
    pub bonus_points: i64,
    pub filter: Filter,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnknownCost {
    /// No reward on a line whose cost is unknown.
    Skip,
    /// Treat the line as having this margin (percent of net).
    AssumeMarginPct(Decimal),
    /// Ignore the rules for such a line and give this percent of net, uncapped by margin.
    FixedRate(Decimal),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guard {
    pub max_reward_share_of_margin: Decimal,
    pub min_markup: Decimal,
    pub max_redeem_share_of_check: Decimal,
    pub unknown_cost: UnknownCost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub period: BudgetPeriod,
    pub share_of_gross_margin: Decimal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegativeBalance {
    /// A customer may owe points; the next accruals repay them.
    Allow,
    /// Owed points above this many are written off.
    Cap(i64),
    /// Owed points are written off at once.
    WriteOff,
}

/// What a return takes back besides the points its goods earned (`[returns] clawback`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReturnClawback {
    /// Every reward the sale caused: the per-check points and first-purchase bonus when the
    /// whole sale is returned, a stamp reward when the card no longer holds the stamps it
    /// paid for, a threshold bonus when the spend no longer reaches the threshold.
    #[default]
    Everything,
    /// Only the points the returned goods earned (kopilka before issue 16): buy, collect the
    /// event bonuses, return everything, repeat — named so a shop that wants it chooses it.
    GoodsOnly,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Welcome {
    pub enrolment_points: i64,
    pub first_purchase_points: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Birthday {
    pub points: i64,
    pub days_before: i64,
    pub days_after: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Referral {
    pub referrer_points: i64,
    pub referee_points: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClosedProgram {
    pub id: String,
    pub invite_codes: Vec<String>,
    pub membership_products: Vec<String>,
    /// How long a bought membership lasts (`term_days`); buying again renews it from its end.
    /// `None`: for good. Memberships by invite code do not lapse.
    pub term: Option<Duration>,
    /// How many customers one invite code may bring in (`invite_limit`): an invitation passed
    /// around past it is refused on the customer who brought it, with the reason. `None`: no
    /// limit.
    pub invite_limit: Option<u32>,
}

/// A validated rules file.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSet {
    pub timezone: Tz,
    pub point_value: Money,
    pub return_window: Duration,
    pub expire_after: Option<Duration>,
    pub warn_before: Duration,
    pub earn_on_redeemed: bool,
    pub guard: Guard,
    pub budget: Option<Budget>,
    pub exclusions: Filter,
    pub exclude_services: bool,
    pub negative_balance: NegativeBalance,
    pub returns: ReturnClawback,
    pub max_sales_per_day: Option<u32>,
    pub earn: Vec<EarnRule>,
    pub tiers: Vec<Tier>,
    pub tier_policy: TierPolicy,
    pub stamps: Vec<StampCard>,
    pub thresholds: Vec<Threshold>,
    pub welcome: Welcome,
    pub birthday: Option<Birthday>,
    pub referral: Option<Referral>,
    pub closed_programs: Vec<ClosedProgram>,
    /// Source system → partner id, for the partner (coalition) program.
    pub partners: BTreeMap<String, String>,
    /// Members' messages: which event goes to which channel in which words (issue 21).
    pub notify: crate::core::notify::Policy,
}

impl RuleSet {
    /// The program a shop gets with no rules file: a flat percentage with every guard on.
    pub fn flat(
        percent: Decimal,
        point_value: Money,
        return_window: Duration,
        expire_after: Option<Duration>,
    ) -> RuleSet {
        RuleSet {
            timezone: chrono_tz::Europe::Moscow,
            point_value,
            return_window,
            expire_after,
            warn_before: Duration::days(14),
            earn_on_redeemed: false,
            guard: Guard {
                max_reward_share_of_margin: Decimal::new(3, 1),
                min_markup: Decimal::ZERO,
                max_redeem_share_of_check: Decimal::new(5, 1),
                unknown_cost: UnknownCost::AssumeMarginPct(Decimal::from(25)),
            },
            budget: None,
            exclusions: Filter::default(),
            exclude_services: true,
            negative_balance: NegativeBalance::Allow,
            returns: ReturnClawback::Everything,
            max_sales_per_day: None,
            earn: vec![EarnRule {
                id: "base".into(),
                kind: EarnKind::Percent(percent),
                filter: Filter::default(),
                min_check: Money::ZERO,
            }],
            tiers: Vec::new(),
            tier_policy: TierPolicy {
                window: Duration::days(365),
                downgrade_grace: Duration::days(30),
            },
            stamps: Vec::new(),
            thresholds: Vec::new(),
            welcome: Welcome::default(),
            birthday: None,
            referral: None,
            closed_programs: Vec::new(),
            partners: BTreeMap::new(),
            notify: crate::core::notify::Policy::default(),
        }
    }

    pub fn tier(&self, id: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.id == id)
    }

    /// Whether a line can neither earn nor be paid with points.
    pub fn excluded(&self, line: &Line) -> bool {
        (self.exclude_services && line.service)
            || self.exclusions.exclude_products.contains(&line.product_id)
            || line
                .category_path()
                .any(|g| self.exclusions.exclude_categories.iter().any(|c| c == g))
    }

    /// The budget period a moment falls in, as a stable key (`2026-03-02`, `2026-03`).
    pub fn budget_period_key(&self, at: DateTime<Utc>) -> Option<String> {
        let b = self.budget?;
        let local = at.with_timezone(&self.timezone).date_naive();
        Some(match b.period {
            BudgetPeriod::Day => local.format("%Y-%m-%d").to_string(),
            BudgetPeriod::Month => local.format("%Y-%m").to_string(),
        })
    }
}

/// Margin of a line in kopecks when its cost is known.
pub fn line_margin(line: &Line) -> Option<i64> {
    margin_of(line.net, line.quantity, line.unit_cost)
}

/// The margin of `quantity` units costing `unit_cost` each, sold for `net`: [`line_margin`]
/// from the values a stored line keeps, which is how the ledger works out the margin an
/// explanation leaves to its line (`LineFacts`).
pub fn margin_of(net: Money, quantity: Decimal, unit_cost: Option<Money>) -> Option<i64> {
    let unit = unit_cost?;
    // whole quantities (most lines) need no decimal rounding
    let cost = if quantity.fract().is_zero() {
        unit.0.checked_mul(quantity.to_i64()?)?
    } else {
        unit.mul_decimal(quantity).ok()?.0
    };
    Some(net.0 - cost)
}

fn dec(v: i64) -> Decimal {
    Decimal::from(v)
}

fn floor_i64(d: Decimal) -> i64 {
    d.floor()
        .to_i64()
        .unwrap_or(if d.is_sign_negative() { i64::MIN } else { i64::MAX })
}

/// Spreads `total` kopecks over `weights` in proportion, rounding up per share (so no line's
/// base is overstated) but never beyond `total` in sum.
fn spread_up(total: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i64 = weights.iter().filter(|w| **w > 0).sum();
    let mut out = vec![0; weights.len()];
    if total <= 0 || sum <= 0 {
        return out;
    }
    let mut left = total;
    for (i, w) in weights.iter().enumerate() {
        if *w <= 0 {
            continue;
        }
        let share = (dec(total) * dec(*w) / dec(sum))
            .ceil()
            .to_i64()
            .unwrap_or(0)
            .min(left)
            .min(*w);
        out[i] = share;
        left -= share;
    }
    out
}

/// What one line may earn, before check-level caps.
struct LineEarn {
    item: ExplanationItem,
    /// Reward value in kopecks (exact decimal) before conversion to points.
    value: Decimal,
}

impl Rules for RuleSet {
    fn tier_named(&self, text: &str) -> Option<String> {
        let t = text.trim().to_lowercase();
        self.tiers
            .iter()
            .find(|x| x.id.to_lowercase() == t || x.name.to_lowercase() == t)
            .map(|x| x.id.clone())
    }

    fn evaluate(&self, doc: &Document, customer: &CustomerState, _now: DateTime<Utc>) -> Decision {
        let (available_at, expires_at) = self.lot_times(doc.occurred_at);
        let mut d = Decision {
            line_points: vec![0; doc.lines.len()],
            available_at: Some(available_at),
            expires_at,
            ..Default::default()
        };
        let point_value = self.point_value.0.max(1);
        let local = LocalTime::of(doc.occurred_at, self.timezone);
        let eligible: Vec<bool> = doc.lines.iter().map(|l| !self.excluded(l)).collect();
        let margins: Vec<Option<i64>> = doc.lines.iter().map(line_margin).collect();
        d.margin = Money(margins.iter().flatten().sum());

        // Redemption at the till is a fact; check it against the guard and flag a loss.
        let redeemed_value = doc.points_redeemed.0.saturating_mul(point_value);
        let weights: Vec<i64> = doc
            .lines
            .iter()
            .zip(&eligible)
            .map(|(l, e)| if *e { l.net.0 } else { 0 })
            .collect();
        let redeemed_share = if redeemed_value > 0 {
            let caps: Vec<i64> = redeem_caps(self, &doc.lines)
                .iter()
                .map(|l| l.max_redeem_kopecks)
                .collect();
            let share = allocate_redemption(&caps, &weights, redeemed_value);
            d.line_redeemed = share.clone();
            share
        } else {
            vec![0; doc.lines.len()]
        };
        if redeemed_value > 0 {
            // only the part of a line's loss the points caused is the program's: a line sold
            // below cost before any point was paid is a pricing loss, reported apart
            let mut below_floor = 0i64;
            let mut lost = 0i64;
            for (l, share) in doc.lines.iter().zip(&redeemed_share) {
                let Some(cost) = l.unit_cost.and_then(|c| c.mul_decimal(l.quantity).ok()) else {
                    continue;
                };
                let paid = l.net.0 - share;
                let floor = cost_floor(self, cost.0);
                below_floor += (floor - paid).max(0) - (floor - l.net.0).max(0);
                lost += program_loss(cost.0, l.net.0, *share);
            }
            if below_floor > 0 {
                d.flags.push(Flag::new(
                    "loss_maker",
                    format!(
                        "points paid at the till took lines {} below cost + markup ({} below cost)",
                        Money(below_floor),
                        Money(lost)
                    ),
                ));
            }
            d.loss = Money(lost);
            let goods: i64 = weights.iter().sum();
            let max_share = (dec(goods) * self.guard.max_redeem_share_of_check).floor();
            if dec(redeemed_value) > max_share {
                d.flags.push(Flag::new(
                    "redemption_over_share",
                    format!(
                        "{} paid with points is more than {}% of the check",
                        Money(redeemed_value),
                        (self.guard.max_redeem_share_of_check * Decimal::ONE_HUNDRED).normalize()
                    ),
                ));
            }
        }
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
        if let Some(max) = self.max_sales_per_day
            && customer.sales_today + 1 > max
        {
            d.flags.push(Flag::new(
                "velocity",
                format!(
                    "{} sales by this customer today (limit {max})",
                    customer.sales_today + 1
                ),
            ));
        }

        let tier = customer.tier.as_deref().and_then(|t| self.tier(t));
        let tier_multiplier = tier.map_or(Decimal::ONE, |t| t.earn_multiplier);
        let doc_rules: Vec<&EarnRule> = self
            .earn
            .iter()
            .filter(|r| r.filter.document_matches(doc, customer, &local))
            .collect();
        let check_total = |r: &EarnRule| -> i64 {
            doc.lines
                .iter()
                .zip(&eligible)
                .filter(|(l, e)| **e && r.filter.line_matches(l))
                .map(|(l, _)| l.net.0)
                .sum()
        };
        let active: Vec<&EarnRule> = doc_rules
            .into_iter()
            .filter(|r| check_total(r) >= r.min_check.0)
            .collect();

        // Per-line accruals.
        let mut labels: Vec<(Decimal, Decimal, String)> = Vec::new();
        let mut earns: Vec<Option<LineEarn>> = Vec::with_capacity(doc.lines.len());
        for (i, line) in doc.lines.iter().enumerate() {
            if !eligible[i] {
                earns.push(None);
                continue;
            }
            let base = if self.earn_on_redeemed {
                line.net.0
            } else {
                line.net.0 - redeemed_share[i]
            }
            .max(0);
            let matching: Vec<&&EarnRule> = active.iter().filter(|r| r.filter.line_matches(line)).collect();
            let best = matching
                .iter()
                .filter_map(|r| match r.kind {
                    EarnKind::Percent(p) => Some((r.filter.specificity(line)?, p, r.id.as_str())),
                    _ => None,
                })
                .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
                .map(|(_, p, id)| (p, id));
            let mut multiplier = tier_multiplier;
            let mut mult_ids = Vec::new();
            for r in &matching {
                if let EarnKind::Multiplier(m) = r.kind {
                    multiplier *= m;
                    mult_ids.push(r.id.clone());
                }
            }
            let mut item = ExplanationItem {
                line: Some(i as u32 + 1),
                product: Some(line.product_id.clone()),
                base_kopecks: Some(base),
                ..Default::default()
            };
            // the margin the line keeps after the points paid on it: a line the redemption
            // took to (or below) cost earns nothing, and the cap is a share of what is left
            let margin = margins[i].map(|m| m - redeemed_share[i]);
            let (rule_id, mut value, rate_text) = match (margin, self.guard.unknown_cost) {
                (None, UnknownCost::FixedRate(pct)) => (
                    "unknown_cost:fixed_rate".to_string(),
                    dec(base) * pct / Decimal::ONE_HUNDRED,
                    format!("{}% (cost unknown)", pct.normalize()),
                ),
                _ => match best {
                    Some((pct, id)) => {
                        let mut rule = id.to_string();
                        for m in &mult_ids {
                            rule.push('+');
                            rule.push_str(m);
                        }
                        // lines of a check mostly share a rate: format each one once
                        let text = match labels.iter().find(|(p, m, _)| *p == pct && *m == multiplier) {
                            Some((_, _, t)) => t.clone(),
                            None => {
                                let t = if multiplier == Decimal::ONE {
                                    format!("{}%", pct.normalize())
                                } else {
                                    format!("{}% × {}", pct.normalize(), multiplier.normalize())
                                };
                                labels.push((pct, multiplier, t.clone()));
                                t
                            }
                        };
                        (rule, dec(base) * pct / Decimal::ONE_HUNDRED * multiplier, text)
                    }
                    None => {
                        earns.push(None);
                        continue;
                    }
                },
            };
            item.rule = rule_id;
            item.rate = Some(rate_text);
            // The margin guard.
            let cap_margin = match (margin, self.guard.unknown_cost) {
                (Some(m), _) => Some(m),
                (None, UnknownCost::Skip) => Some(0),
                (None, UnknownCost::AssumeMarginPct(pct)) => {
                    Some(floor_i64(dec(line.net.0) * pct / Decimal::ONE_HUNDRED))
                }
                (None, UnknownCost::FixedRate(_)) => None,
            };
            if margin.is_none() {
                item.note = Some(match self.guard.unknown_cost {
                    UnknownCost::Skip => "cost unknown: no reward (policy skip)".into(),
                    UnknownCost::AssumeMarginPct(p) => {
                        format!("cost unknown: margin assumed {}%", p.normalize())
                    }
                    UnknownCost::FixedRate(p) => format!("cost unknown: fixed {}% of net", p.normalize()),
                });
            }
            if let Some(m) = cap_margin {
                let limit = if m <= 0 {
                    Decimal::ZERO
                } else {
                    dec(m) * self.guard.max_reward_share_of_margin
                };
                if value > limit {
                    let before = floor_i64(value / dec(point_value));
                    value = limit;
                    let after = floor_i64(value / dec(point_value));
                    item.cap = Some(if margin.is_none() {
                        "unknown_cost_skip".into()
                    } else if m <= 0 {
                        "margin_not_positive".into()
                    } else {
                        "max_reward_share_of_margin".into()
                    });
                    item.margin_kopecks = Some(m);
                    item.capped_by = Some(before - after);
                }
            }
            earns.push(Some(LineEarn { item, value }));
        }

        let mut items: Vec<(Option<usize>, ExplanationItem)> = Vec::new();
        let mut blind = 0i64;
        let unknown_lines = doc
            .lines
            .iter()
            .zip(&eligible)
            .filter(|(l, e)| **e && l.unit_cost.is_none())
            .count();
        for (i, e) in earns.into_iter().enumerate() {
            let Some(e) = e else { continue };
            let points = floor_i64(e.value / dec(point_value)).max(0);
            let mut item = e.item;
            item.points = points;
            if doc.lines[i].unit_cost.is_none() {
                blind += points;
            }
            if points > 0 || item.capped_by.is_some_and(|c| c > 0) {
                items.push((Some(i), item));
            }
        }
        // Fixed points per check, within the check's remaining margin allowance.
        let earned_value: i64 = items.iter().map(|(_, it)| it.points * point_value).sum();
        let check_margin: i64 = margins
            .iter()
            .zip(&eligible)
            .zip(&redeemed_share)
            .filter(|((_, e), _)| **e)
            .filter_map(|((m, _), paid)| m.map(|m| m - paid))
            .sum();
        let mut allowance =
            floor_i64(dec(check_margin.max(0)) * self.guard.max_reward_share_of_margin) - earned_value;
        for r in &active {
            if let EarnKind::FixedPerCheck(points) = r.kind {
                let fits = (allowance / point_value).clamp(0, points);
                let mut item = ExplanationItem {
                    rule: r.id.clone(),
                    rate: Some(format!("{points} per check")),
                    points: fits,
                    ..Default::default()
                };
                if fits < points {
                    item.cap = Some("max_reward_share_of_margin of the check".into());
                    item.capped_by = Some(points - fits);
                }
                allowance -= fits * point_value;
                items.push((None, item));
            }
        }
        if unknown_lines > 0 {
            d.flags.push(Flag::new(
                "unknown_cost",
                format!("{blind} points granted blind on {unknown_lines} line(s) whose cost is unknown"),
            ));
        }
        if items
            .iter()
            .any(|(_, it)| it.cap.as_deref() == Some("margin_not_positive"))
        {
            d.flags
                .push(Flag::new("no_margin", "a line with no margin earned nothing"));
        }

        // Event bonuses tied to this sale: first purchase, stamps, thresholds.
        let mut bonuses = Vec::new();
        if customer.prior_sales == 0 && self.welcome.first_purchase_points > 0 {
            bonuses.push(Bonus {
                rule: "welcome:first_purchase".into(),
                points: self.welcome.first_purchase_points,
                explanation: Explanation::text(format!(
                    "welcome bonus for the first purchase: {} points",
                    self.welcome.first_purchase_points
                )),
            });
        }
        for card in &self.stamps {
            if !card.filter.document_matches(doc, customer, &local) {
                continue;
            }
            let qualifying: Decimal = doc
                .lines
                .iter()
                .filter(|l| card.filter.line_matches(l) && !(self.exclude_services && l.service))
                .map(|l| l.quantity.trunc())
                .sum();
            let add = match card.count {
                StampCount::Items => qualifying,
                StampCount::Visits => {
                    if qualifying > Decimal::ZERO {
                        Decimal::ONE
                    } else {
                        Decimal::ZERO
                    }
                }
            };
            if add <= Decimal::ZERO {
                continue;
            }
            let before = customer.counters.get(&card.key).copied().unwrap_or_default();
            d.counters.push((card.key.clone(), add));
            let every = dec(card.every.max(1) as i64);
            let rewards = floor_i64((before + add) / every) - floor_i64(before / every);
            for _ in 0..rewards.max(0) {
                match &card.reward {
                    StampReward::Points(p) => bonuses.push(Bonus {
                        rule: card.key.clone(),
                        points: *p,
                        explanation: Explanation::text(format!(
                            "stamp card {}: every {} → {p} points",
                            card.id, card.every
                        )),
                    }),
                    StampReward::Product(product) => d.vouchers.push((card.id.clone(), product.clone())),
                }
            }
        }
        for t in &self.thresholds {
            if !t.filter.document_matches(doc, customer, &local) {
                continue;
            }
            let spend: i64 = doc
                .lines
                .iter()
                .zip(&eligible)
                .filter(|(l, e)| **e && t.filter.line_matches(l))
                .map(|(l, _)| l.net.0)
                .sum();
            let key = &t.key;
            let before = customer.counters.get(key).copied().unwrap_or_default();
            let awarded = customer.recent_awards.contains(key);
            if !awarded && before < dec(t.spend.0) && before + dec(spend) >= dec(t.spend.0) {
                bonuses.push(Bonus {
                    rule: key.clone(),
                    points: t.bonus_points,
                    explanation: Explanation::text(format!(
                        "spend of {} reached within {} days: {} points",
                        t.spend,
                        t.window.num_days(),
                        t.bonus_points
                    )),
                });
            }
        }

        // The program budget caps everything this sale would issue.
        if let (Some(b), Some(state)) = (self.budget, customer.budget) {
            let allowed = floor_i64(dec((state.margin + d.margin).0.max(0)) * b.share_of_gross_margin);
            let room = ((allowed - state.issued_value.0) / point_value).max(0);
            let wanted: i64 = items.iter().map(|(_, it)| it.points).sum::<i64>()
                + bonuses.iter().map(|b| b.points).sum::<i64>();
            if wanted > room {
                let mut cut = wanted - room;
                for b in bonuses.iter_mut().rev() {
                    let c = cut.min(b.points);
                    b.points -= c;
                    cut -= c;
                }
                for (_, it) in items.iter_mut().rev() {
                    let c = cut.min(it.points);
                    if c > 0 {
                        it.points -= c;
                        it.capped_by = Some(it.capped_by.unwrap_or(0) + c);
                        it.cap = Some(match &it.cap {
                            Some(prev) => format!("{prev}; program budget"),
                            None => "program budget".into(),
                        });
                    }
                    cut -= c;
                }
                d.flags.push(Flag::new(
                    "budget_capped",
                    format!(
                        "{} points not issued: the program budget for the period is spent",
                        wanted - room
                    ),
                ));
            }
        }
        bonuses.retain(|b| b.points > 0);
        d.bonuses = bonuses;

        for (line, item) in &items {
            if let Some(i) = line {
                d.line_points[*i] += item.points;
            }
        }
        d.accrual = items.iter().map(|(_, it)| it.points).sum();
        d.explanation.items = items.into_iter().map(|(_, it)| it).collect();
        d.explanation.summary = match tier {
            Some(t) if t.earn_multiplier != Decimal::ONE => format!(
                "{} points on {} (tier {} × {}), 1 point = {}",
                d.accrual,
                doc.total,
                t.name,
                t.earn_multiplier.normalize(),
                self.point_value
            ),
            _ => format!(
                "{} points on {}, 1 point = {}",
                d.accrual, doc.total, self.point_value
            ),
        };
        d.partner = self.partners.get(&doc.source.system).cloned();
        for p in &self.closed_programs {
            // a membership with a term is renewed by buying again; one for good is not
            if customer.memberships.contains(&p.id) && p.term.is_none() {
                continue;
            }
            if let Some(l) = doc
                .lines
                .iter()
                .find(|l| p.membership_products.contains(&l.product_id))
            {
                d.memberships.push((p.id.clone(), l.product_id.clone()));
            }
        }
        d
    }

    fn lot_times(&self, earned_at: DateTime<Utc>) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
        let available = earned_at + self.return_window;
        (available, self.expire_after.map(|e| available + e))
    }

    fn point_value(&self) -> Money {
        self.point_value
    }

    fn counter_needs(&self) -> Vec<(String, Option<Duration>)> {
        counter_needs(self)
    }

    fn counter_contributions(&self, doc: &Document, decision: &Decision) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = decision
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), v.trunc().to_i64().unwrap_or(0)))
            .collect();
        out.extend(threshold_spend(self, doc));
        out
    }

    fn tier_window(&self) -> Option<Duration> {
        (!self.tiers.is_empty()).then_some(self.tier_policy.window)
    }

    fn tier_after_sale(&self, current: Option<&str>, spend_with_sale: Money) -> Option<TierChange> {
        tier_after_sale(self, current, spend_with_sale)
    }

    fn budget_period_key(&self, at: DateTime<Utc>) -> Option<String> {
        RuleSet::budget_period_key(self, at)
    }

    fn negative_balance(&self) -> NegativeBalance {
        self.negative_balance
    }

    fn membership_for_invite(&self, code: &str) -> Option<String> {
        membership_for_invite(self, code)
    }

    fn invite_limit(&self, program: &str) -> Option<u32> {
        self.closed_programs
            .iter()
            .find(|p| p.id == program)
            .and_then(|p| p.invite_limit)
    }

    fn enrolment_points(&self) -> i64 {
        self.welcome.enrolment_points
    }

    fn timezone(&self) -> Tz {
        self.timezone
    }

    fn rule_set(&self) -> Option<&RuleSet> {
        Some(self)
    }
}

/// A basket a till or the site asks about before taking points.
#[derive(Clone, Debug, Default)]
pub struct QuoteRequest {
    pub lines: Vec<Line>,
    pub points_wanted: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteLine {
    pub line: u32,
    pub product: String,
    /// The most this line can take in points without going below cost × (1 + min_markup).
    pub max_redeem_kopecks: i64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Points the customer may pay with on this basket (never more than they have).
    pub max_redeemable_points: i64,
    pub limited_by: String,
    pub lines: Vec<QuoteLine>,
    /// How the till should spread the redeemed value over the lines (kopecks per line, in
    /// line order) so that no line goes below its floor.
    pub allocation: Vec<i64>,
}

/// What each line of a basket can take in points (kopecks) before it goes below
/// cost × (1 + min_markup), and why: the quote offers exactly this, and the ledger spreads a
/// redemption by it, so a sale that follows a quote is never a loss-maker.
pub fn redeem_caps(rules: &RuleSet, lines: &[Line]) -> Vec<QuoteLine> {
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let n = i as u32 + 1;
        if rules.excluded(l) {
            out.push(QuoteLine {
                line: n,
                product: l.product_id.clone(),
                max_redeem_kopecks: 0,
                reason: "excluded from the program".into(),
            });
            continue;
        }
        let (max, reason) = match l.unit_cost.and_then(|c| c.mul_decimal(l.quantity).ok()) {
            Some(cost) => (
                (l.net.0 - cost_floor(rules, cost.0)).max(0),
                format!("down to cost {} + markup", cost),
            ),
            None => match rules.guard.unknown_cost {
                UnknownCost::AssumeMarginPct(p) => (
                    floor_i64(dec(l.net.0) * p / Decimal::ONE_HUNDRED),
                    format!("cost unknown: margin assumed {}%", p.normalize()),
                ),
                _ => (0, "cost unknown: no points on this line".into()),
            },
        };
        out.push(QuoteLine {
            line: n,
            product: l.product_id.clone(),
            max_redeem_kopecks: max,
            reason,
        });
    }
    out
}

/// The part of a line's loss below cost that `redeemed` kopecks of points caused: what the
/// line loses after the points less what it lost before them (the pricing loss).
pub fn program_loss(cost: i64, net: i64, redeemed: i64) -> i64 {
    (cost - (net - redeemed)).max(0) - (cost - net).max(0)
}

/// The lowest a line may be paid down to: cost × (1 + min_markup), rounded up.
fn cost_floor(rules: &RuleSet, cost: i64) -> i64 {
    floor_i64((dec(cost) * (Decimal::ONE + rules.guard.min_markup)).ceil())
}

/// How a redemption of `value` kopecks is spread over a basket's lines — one function for the
/// quote and the ledger. Within what the lines can take (`caps`): in proportion to each
/// line's cap, then topped up from the first line with room, so every kopeck lands within a
/// line's limit. Beyond the caps (the till is the authority and may take more): the rest over
/// what each line still has of its net (`nets`; 0 for excluded lines), in proportion, never
/// beyond a line's net.
pub fn allocate_redemption(caps: &[i64], nets: &[i64], value: i64) -> Vec<i64> {
    let by_lines: i64 = caps.iter().map(|c| (*c).max(0)).sum();
    let within = value.clamp(0, by_lines);
    let mut allocation: Vec<i64> = caps
        .iter()
        .map(|c| {
            if by_lines > 0 {
                floor_i64(dec(within) * dec((*c).max(0)) / dec(by_lines))
            } else {
                0
            }
        })
        .collect();
    let mut left = within - allocation.iter().sum::<i64>();
    for (a, c) in allocation.iter_mut().zip(caps) {
        let add = (c - *a).min(left).max(0);
        *a += add;
        left -= add;
    }
    let beyond = value.max(0) - within;
    if beyond > 0 && !nets.is_empty() {
        let room: Vec<i64> = nets
            .iter()
            .zip(&allocation)
            .map(|(n, a)| (n - a).max(0))
            .collect();
        for (a, extra) in allocation.iter_mut().zip(spread_up(beyond, &room)) {
            *a += extra;
        }
    }
    allocation
}

/// The most a customer may pay with points on a basket: per line down to cost × (1 +
/// min_markup), in total at most the check share (the tier's, if lower), and no more than
/// they hold. Lines with unknown cost take points only under `assume_margin_pct`.
pub fn quote(rules: &RuleSet, req: &QuoteRequest, customer: &CustomerState) -> Quote {
    let lines = redeem_caps(rules, &req.lines);
    let by_lines: i64 = lines.iter().map(|l| l.max_redeem_kopecks).sum();
    let goods: i64 = req
        .lines
        .iter()
        .filter(|l| !rules.excluded(l))
        .map(|l| l.net.0)
        .sum();
    let share = customer
        .tier
        .as_deref()
        .and_then(|t| rules.tier(t))
        .and_then(|t| t.max_redeem_share)
        .map_or(rules.guard.max_redeem_share_of_check, |s| {
            s.min(rules.guard.max_redeem_share_of_check)
        });
    let by_share = floor_i64(dec(goods) * share);
    let pv = rules.point_value.0.max(1);
    let mut limits = vec![
        (by_lines / pv, "cost + markup of the lines".to_string()),
        (
            by_share / pv,
            format!("{}% of the check", (share * Decimal::ONE_HUNDRED).normalize()),
        ),
        (
            customer.available.max(0),
            "the customer's available points".to_string(),
        ),
    ];
    if let Some(w) = req.points_wanted {
        limits.push((w.max(0), "the points asked for".to_string()));
    }
    let (max, why) = limits
        .into_iter()
        .min_by_key(|l| l.0)
        .unwrap_or((0, String::new()));
    let caps: Vec<i64> = lines.iter().map(|l| l.max_redeem_kopecks).collect();
    let allocation = allocate_redemption(&caps, &[], max * pv);
    Quote {
        max_redeemable_points: max,
        limited_by: why,
        lines,
        allocation,
    }
}

/// Which tier a spend reaches (the highest whose threshold it meets).
pub fn tier_for_spend(rules: &RuleSet, spend: Money) -> Option<&Tier> {
    rules
        .tiers
        .iter()
        .filter(|t| spend >= t.min_spend)
        .max_by_key(|t| t.min_spend)
}

/// A tier decision: upgrades happen at once, downgrades only at re-evaluation and only once
/// the grace period since the spend first fell below the tier's threshold has passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierChange {
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
}

pub fn tier_after_sale(rules: &RuleSet, current: Option<&str>, spend_with_sale: Money) -> Option<TierChange> {
    let reached = tier_for_spend(rules, spend_with_sale)?;
    let current_min = current.and_then(|c| rules.tier(c)).map(|t| t.min_spend);
    if current_min.is_none_or(|m| reached.min_spend > m) && current != Some(reached.id.as_str()) {
        return Some(TierChange {
            from: current.map(str::to_string),
            to: Some(reached.id.clone()),
            reason: format!(
                "spend {} over {} days reached {} ({})",
                spend_with_sale,
                rules.tier_policy.window.num_days(),
                reached.name,
                reached.min_spend
            ),
        });
    }
    None
}

/// What the nightly re-evaluation decides for one customer: the change to record, and the
/// dip to remember, so the ledger only loads, calls and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierReevaluation {
    pub change: Option<TierChange>,
    /// When the spend first fell below the kept tier's threshold, while it still is and the
    /// grace runs; `None` when the spend meets the threshold or the tier changes. The ledger
    /// stores it as given: this is what restarts the clock after a recovery.
    pub below_since: Option<DateTime<Utc>>,
}

/// Re-evaluates a tier against the spend over the window. `below_since` is the dip start
/// the previous run stored: grace counts from it, not from when the tier was reached,
/// because a tier held for a year says nothing about how long the spend has been low.
pub fn tier_at_reevaluation(
    rules: &RuleSet,
    current: Option<&str>,
    below_since: Option<DateTime<Utc>>,
    spend: Money,
    now: DateTime<Utc>,
) -> TierReevaluation {
    let due = tier_for_spend(rules, spend).map(|t| t.id.clone());
    if due.as_deref() == current {
        return TierReevaluation {
            change: None,
            below_since: None,
        };
    }
    let current_min = current.and_then(|c| rules.tier(c)).map(|t| t.min_spend);
    let due_min = due.as_deref().and_then(|d| rules.tier(d)).map(|t| t.min_spend);
    let upgrade = match (current_min, due_min) {
        (None, Some(_)) => true,
        (Some(c), Some(d)) => d > c,
        _ => false,
    };
    if !upgrade {
        let dip = below_since.unwrap_or(now);
        if now < dip + rules.tier_policy.downgrade_grace {
            return TierReevaluation {
                change: None,
                below_since: Some(dip),
            };
        }
    }
    let reason = format!(
        "re-evaluation: spend {} over {} days{}",
        spend,
        rules.tier_policy.window.num_days(),
        match below_since {
            _ if upgrade => String::new(),
            Some(dip) => format!(
                " has been below the tier threshold since {} ({} days of grace)",
                dip.with_timezone(&rules.timezone).format("%Y-%m-%d"),
                rules.tier_policy.downgrade_grace.num_days()
            ),
            None => " is below the tier threshold (no grace)".to_string(),
        }
    );
    TierReevaluation {
        change: Some(TierChange {
            from: current.map(str::to_string),
            to: due,
            reason,
        }),
        below_since: None,
    }
}

/// Whether a customer's birthday falls within the bonus window around `today` (local date),
/// and for which year the bonus counts (so it is given once per year).
pub fn birthday_due(rules: &RuleSet, birthday: NaiveDate, today: NaiveDate) -> Option<i32> {
    let b = rules.birthday.as_ref()?;
    for year in [today.year() - 1, today.year(), today.year() + 1] {
        let this_year = NaiveDate::from_ymd_opt(year, birthday.month(), birthday.day())
            .or_else(|| NaiveDate::from_ymd_opt(year, 3, 1))?;
        if today >= this_year - Duration::days(b.days_before)
            && today <= this_year + Duration::days(b.days_after)
        {
            return Some(year);
        }
    }
    None
}

/// Counters the ledger must supply in [`CustomerState::counters`] for this rule set, with
/// the look-back window for spend counters.
pub fn counter_needs(rules: &RuleSet) -> Vec<(String, Option<Duration>)> {
    let mut out: Vec<(String, Option<Duration>)> =
        rules.stamps.iter().map(|s| (s.key.clone(), None)).collect();
    out.extend(rules.thresholds.iter().map(|t| (t.key.clone(), Some(t.window))));
    out
}

/// Membership a customer's invite code grants.
pub fn membership_for_invite(rules: &RuleSet, code: &str) -> Option<String> {
    rules
        .closed_programs
        .iter()
        .find(|p| p.invite_codes.iter().any(|c| c == code))
        .map(|p| p.id.clone())
}

/// Spend per counter key for a sale, as the ledger stores it for later sales' thresholds.
pub fn threshold_spend(rules: &RuleSet, doc: &Document) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for t in &rules.thresholds {
        let spend: i64 = doc
            .lines
            .iter()
            .filter(|l| !rules.excluded(l) && t.filter.line_matches(l))
            .map(|l| l.net.0)
            .sum();
        if spend > 0 {
            out.insert(t.key.clone(), spend);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::document::{DocKind, SourceRef};
    use crate::core::identity::CustomerIdentity;
    use crate::core::money::Points;
    use chrono::TimeZone;

    fn percent(id: &str, pct: i64, products: &[&str], categories: &[&str]) -> EarnRule {
        EarnRule {
            id: id.into(),
            kind: EarnKind::Percent(Decimal::from(pct)),
            filter: Filter {
                include_products: products.iter().map(|p| p.to_string()).collect(),
                include_categories: categories.iter().map(|c| c.to_string()).collect(),
                ..Filter::default()
            },
            min_check: Money::ZERO,
        }
    }

    /// A 1 000 ₽ line of "beans", a group under "coffee", with a wide margin so no cap bites.
    fn beans_sale() -> Document {
        let line = Line {
            product_id: "P-BEANS".into(),
            name: "Кофе в зёрнах".into(),
            category: Some("beans".into()),
            category_parents: vec!["coffee".into()],
            quantity: Decimal::ONE,
            unit_price: Money(100_000),
            discount: Money::ZERO,
            net: Money(100_000),
            unit_cost: Some(Money(10_000)),
            service: false,
        };
        Document {
            source: SourceRef {
                system: "onec".into(),
                doc_id: "D1".into(),
                version: "v1".into(),
                stamp: None,
            },
            kind: DocKind::Sale,
            number: Some("1".into()),
            occurred_at: Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap(),
            customer: CustomerIdentity {
                card: Some("C1".into()),
                ..Default::default()
            },
            currency: "RUB".into(),
            lines: vec![line],
            total: Money(100_000),
            points_redeemed: Points(0),
            original: None,
            store: None,
            partner: None,
        }
    }

    fn earned(earn: Vec<EarnRule>, exclude_categories: &[&str]) -> (i64, String) {
        let mut rules = RuleSet::flat(Decimal::ZERO, Money(100), Duration::days(14), None);
        rules.earn = earn;
        rules.exclusions.exclude_categories = exclude_categories.iter().map(|c| c.to_string()).collect();
        let customer = CustomerState {
            customer_id: Some(1),
            ..Default::default()
        };
        let doc = beans_sale();
        let d = rules.evaluate(&doc, &customer, doc.occurred_at);
        let rule = d
            .explanation
            .items
            .first()
            .map(|i| i.rule.clone())
            .unwrap_or_default();
        (d.accrual, rule)
    }

    /// Issue 16, point 5: a product in group "beans" under "coffee" earned 5 %, not the
    /// coffee rule's 10 %. 1 000 ₽ at 1 ₽ a point: 10 % is 100 points.
    #[test]
    fn category_rules_reach_the_groups_below_and_the_most_specific_wins() {
        let all = || percent("all-5", 5, &[], &[]);
        let coffee = || percent("coffee-10", 10, &[], &["coffee"]);
        let beans = || percent("beans-3", 3, &[], &["beans"]);
        let product = || percent("product-2", 2, &["P-BEANS"], &[]);
        struct Case {
            what: &'static str,
            earn: Vec<EarnRule>,
            excluded: &'static [&'static str],
            points: i64,
            rule: &'static str,
        }
        let case = |what, earn, excluded, points, rule| Case {
            what,
            earn,
            excluded,
            points,
            rule,
        };
        let cases = [
            case(
                "the parent group's rule reaches beans",
                vec![all(), coffee()],
                &[],
                100,
                "coffee-10",
            ),
            case(
                "order of the rules does not matter",
                vec![coffee(), all()],
                &[],
                100,
                "coffee-10",
            ),
            case(
                "the own group is more specific than its parent",
                vec![all(), coffee(), beans()],
                &[],
                30,
                "beans-3",
            ),
            case(
                "the product is more specific than any group",
                vec![coffee(), beans(), product()],
                &[],
                20,
                "product-2",
            ),
            case(
                "a lower rule for every product does not undercut the group",
                vec![percent("all-1", 1, &[], &[]), coffee()],
                &[],
                100,
                "coffee-10",
            ),
            case(
                "the highest among equally specific rules",
                vec![coffee(), percent("coffee-12", 12, &[], &["coffee"])],
                &[],
                120,
                "coffee-12",
            ),
            case(
                "excluding coffee excludes beans",
                vec![all(), coffee()],
                &["coffee"],
                0,
                "",
            ),
        ];
        for c in cases {
            let (points, rule) = earned(c.earn, c.excluded);
            assert_eq!((points, rule.as_str()), (c.points, c.rule), "{}", c.what);
        }
    }

    #[test]
    fn a_rule_excluding_the_parent_group_skips_the_groups_below() {
        let mut not_coffee = percent("not-coffee-5", 5, &[], &[]);
        not_coffee.filter.exclude_categories = vec!["coffee".into()];
        assert_eq!(earned(vec![not_coffee], &[]), (0, String::new()));
    }

    fn gold_program() -> RuleSet {
        let mut rules = RuleSet::flat(Decimal::from(5), Money(100), Duration::days(14), None);
        let tier = |id: &str, min_spend: i64| Tier {
            id: id.into(),
            name: id.into(),
            min_spend: Money(min_spend),
            earn_multiplier: Decimal::ONE,
            discount_pct: Decimal::ZERO,
            max_redeem_share: None,
        };
        rules.tiers = vec![tier("base", 0), tier("gold", 10_000_000)];
        rules.tier_policy.downgrade_grace = Duration::days(30);
        rules
    }

    /// Issue 16, point 6: a gold tier reached a year ago is not dropped the first night the
    /// spend dips; grace starts that night and the tier goes once it has run out.
    #[test]
    fn tier_grace_starts_when_the_spend_first_falls_below_the_threshold() {
        let rules = gold_program();
        let dip_night = Utc.with_ymd_and_hms(2026, 3, 1, 21, 0, 0).unwrap();
        let low = Money(9_000_000);

        // a year in gold, tonight the spend dips: gold is kept and the dip recorded
        let first = tier_at_reevaluation(&rules, Some("gold"), None, low, dip_night);
        assert_eq!(
            first,
            TierReevaluation {
                change: None,
                below_since: Some(dip_night),
            }
        );

        // a night before the grace runs out: still gold, the clock still from the dip
        let day_29 = dip_night + Duration::days(29);
        let kept = tier_at_reevaluation(&rules, Some("gold"), Some(dip_night), low, day_29);
        assert_eq!((kept.change, kept.below_since), (None, Some(dip_night)));

        // still below after the grace: downgraded, the dip forgotten
        let day_30 = dip_night + Duration::days(30);
        let down = tier_at_reevaluation(&rules, Some("gold"), Some(dip_night), low, day_30);
        assert_eq!(down.change.as_ref().and_then(|c| c.to.as_deref()), Some("base"));
        assert_eq!(down.below_since, None);
    }

    #[test]
    fn a_recovery_resets_the_grace_and_a_second_dip_starts_it_again() {
        let rules = gold_program();
        let first_dip = Utc.with_ymd_and_hms(2026, 3, 1, 21, 0, 0).unwrap();
        let (low, high) = (Money(9_000_000), Money(10_500_000));

        let recovered = tier_at_reevaluation(
            &rules,
            Some("gold"),
            Some(first_dip),
            high,
            first_dip + Duration::days(20),
        );
        assert_eq!(
            recovered,
            TierReevaluation {
                change: None,
                below_since: None,
            },
            "back at the threshold: the clock is cleared"
        );

        let second_dip = first_dip + Duration::days(25);
        let again = tier_at_reevaluation(&rules, Some("gold"), None, low, second_dip);
        assert_eq!(
            (again.change.clone(), again.below_since),
            (None, Some(second_dip))
        );

        // 35 days after the first dip but 10 after the second: gold is kept
        let later = first_dip + Duration::days(35);
        let kept = tier_at_reevaluation(&rules, Some("gold"), Some(second_dip), low, later);
        assert_eq!((kept.change, kept.below_since), (None, Some(second_dip)));

        let down = tier_at_reevaluation(
            &rules,
            Some("gold"),
            Some(second_dip),
            low,
            second_dip + Duration::days(30),
        );
        assert_eq!(down.change.and_then(|c| c.to), Some("base".to_string()));
    }

    #[test]
    fn upgrades_at_reevaluation_do_not_wait_for_any_grace() {
        let rules = gold_program();
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 21, 0, 0).unwrap();
        let up = tier_at_reevaluation(&rules, Some("base"), None, Money(10_000_000), now);
        assert_eq!(up.change.and_then(|c| c.to), Some("gold".to_string()));
        assert_eq!(up.below_since, None);
    }
}
