//! `kopilka simulate`: replaying stored sales under a rules file, in memory, to see what a
//! program would cost before it runs. Customer state (first purchase, tiers, stamp cards,
//! thresholds, budgets) evolves the way the ledger's does, sale by sale in date order.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::document::Document;
use super::money::Money;
use super::program::{BudgetState, CustomerState, Rules};
use super::rules::{RuleSet, line_margin, tier_after_sale};

/// A stored sale as the simulation sees it.
#[derive(Clone, Debug)]
pub struct SimSale {
    /// The ledger's row id of the sale (0 outside a ledger): how the replay's figure of each
    /// sale is set beside what the ledger issued on it.
    pub id: i64,
    pub customer: Option<i64>,
    pub doc: Document,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    pub rule: String,
    pub points: i64,
    pub cost_kopecks: i64,
    pub lines_capped: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SimReport {
    pub sales: i64,
    pub lines: i64,
    pub points_issued: i64,
    /// What the points issued cost at the program's point value.
    pub points_cost_kopecks: i64,
    pub gross_margin_kopecks: i64,
    pub margin_after_program_kopecks: i64,
    /// Lines whose reward the margin guard reduced.
    pub lines_capped_by_margin: i64,
    /// Lines sold below cost (negative margin) — they earn nothing under any rules.
    pub loss_making_lines: i64,
    /// Sales whose rewards the program budget cut.
    pub budget_capped_sales: i64,
    /// Points granted on lines whose cost is unknown.
    pub blind_points: i64,
    pub by_rule: Vec<RuleStats>,
    /// Points issued per counted sale (ledger row id, points), for the comparison with the
    /// ledger's own figures.
    #[serde(skip)]
    pub issued_by_sale: Vec<(i64, i64)>,
}

#[derive(Default)]
struct SimCustomer {
    prior_sales: u32,
    tier: Option<String>,
    spend: VecDeque<(DateTime<Utc>, i64)>,
    counters: HashMap<String, i64>,
    windowed: HashMap<String, VecDeque<(DateTime<Utc>, i64)>>,
    awards: HashMap<String, DateTime<Utc>>,
    day: Option<(NaiveDate, u32)>,
    memberships: Vec<String>,
}

fn window_sum(q: &mut VecDeque<(DateTime<Utc>, i64)>, from: DateTime<Utc>) -> i64 {
    while q.front().is_some_and(|(t, _)| *t < from) {
        q.pop_front();
    }
    q.iter().map(|(_, v)| v).sum()
}

/// Replays `sales` (in date order) under `rules`. Sales before `count_from` are replayed
/// only to build the customers' state (first purchase, tiers, stamp cards, thresholds,
/// budgets) the counted ones find, as the ledger's customers had it: without them the
/// replay of a period starts every customer from nothing and differs from what was issued.
pub fn simulate(
    rules: &RuleSet,
    sales: impl IntoIterator<Item = SimSale>,
    count_from: Option<DateTime<Utc>>,
) -> SimReport {
    let mut report = SimReport::default();
    let mut customers: HashMap<i64, SimCustomer> = HashMap::new();
    let mut budgets: HashMap<String, BudgetState> = HashMap::new();
    let mut by_rule: BTreeMap<String, RuleStats> = BTreeMap::new();
    let pv = rules.point_value.0;
    let needs = super::rules::counter_needs(rules);
    for sale in sales {
        let d = &sale.doc;
        let at = d.occurred_at;
        let local_day = at.with_timezone(&rules.timezone).date_naive();
        let mut state = CustomerState {
            customer_id: sale.customer,
            ..Default::default()
        };
        let period = rules.budget_period_key(at);
        if let Some(p) = &period {
            state.budget = Some(budgets.get(p).copied().unwrap_or_default());
        }
        if let Some(c) = sale.customer {
            let cs = customers.entry(c).or_default();
            state.prior_sales = cs.prior_sales;
            state.tier = cs.tier.clone();
            state.spend_in_window = Money(window_sum(&mut cs.spend, at - rules.tier_policy.window));
            state.sales_today = match cs.day {
                Some((day, n)) if day == local_day => n,
                _ => 0,
            };
            for (key, window) in &needs {
                let v = match window {
                    Some(w) => window_sum(cs.windowed.entry(key.clone()).or_default(), at - *w),
                    None => cs.counters.get(key).copied().unwrap_or(0),
                };
                state.counters.insert(key.clone(), Decimal::from(v));
                if let (Some(w), Some(t)) = (window, cs.awards.get(key))
                    && *t >= at - *w
                {
                    state.recent_awards.push(key.clone());
                }
            }
            state.memberships = cs.memberships.clone();
        }
        let decision = rules.evaluate(d, &state, at);
        let counted = count_from.is_none_or(|f| at >= f);
        let bonus_points: i64 = decision.bonuses.iter().map(|b| b.points).sum();
        let issued = decision.accrual + bonus_points;
        if counted {
            count(&mut report, &mut by_rule, d, &decision, issued);
            report.issued_by_sale.push((sale.id, issued));
        }
        if let Some(p) = period {
            let e = budgets.entry(p).or_default();
            e.margin += decision.margin;
            e.issued_value += Money(issued * pv);
        }
        if let Some(c) = sale.customer {
            let contributions = rules.counter_contributions(d, &decision);
            let cs = customers.entry(c).or_default();
            cs.prior_sales += 1;
            cs.day = match cs.day {
                Some((day, n)) if day == local_day => Some((day, n + 1)),
                _ => Some((local_day, 1)),
            };
            if let Some(change) = tier_after_sale(rules, cs.tier.as_deref(), state.spend_in_window + d.total)
            {
                cs.tier = change.to;
            }
            cs.spend.push_back((at, d.total.0));
            for (key, amount) in contributions {
                match needs.iter().find(|(k, _)| *k == key).and_then(|(_, w)| *w) {
                    Some(_) => cs.windowed.entry(key).or_default().push_back((at, amount)),
                    None => *cs.counters.entry(key).or_default() += amount,
                }
            }
            for b in &decision.bonuses {
                cs.awards.insert(b.rule.clone(), at);
            }
            for (program, _) in &decision.memberships {
                if !cs.memberships.contains(program) {
                    cs.memberships.push(program.clone());
                }
            }
        }
    }
    report.points_cost_kopecks = report.points_issued * pv;
    report.margin_after_program_kopecks = report.gross_margin_kopecks - report.points_cost_kopecks;
    report.by_rule = by_rule
        .into_values()
        .map(|mut s| {
            s.cost_kopecks = s.points * pv;
            s
        })
        .collect();
    report
}

/// Adds one counted sale's figures to the report.
fn count(
    report: &mut SimReport,
    by_rule: &mut BTreeMap<String, RuleStats>,
    d: &Document,
    decision: &super::program::Decision,
    issued: i64,
) {
    report.sales += 1;
    report.lines += d.lines.len() as i64;
    report.points_issued += issued;
    report.gross_margin_kopecks += decision.margin.0;
    report.loss_making_lines += d
        .lines
        .iter()
        .filter(|l| line_margin(l).is_some_and(|m| m < 0))
        .count() as i64;
    if decision.flags.iter().any(|f| f.code == "budget_capped") {
        report.budget_capped_sales += 1;
    }
    for item in &decision.explanation.items {
        let s = by_rule.entry(item.rule.clone()).or_insert_with(|| RuleStats {
            rule: item.rule.clone(),
            ..Default::default()
        });
        s.points += item.points;
        if item
            .cap
            .as_deref()
            .is_some_and(|c| c.starts_with("max_reward_share_of_margin"))
        {
            s.lines_capped += 1;
            report.lines_capped_by_margin += 1;
        }
        if let Some(l) = item.line
            && d.lines
                .get(l as usize - 1)
                .is_some_and(|line| line.unit_cost.is_none())
        {
            report.blind_points += item.points;
        }
    }
    for b in &decision.bonuses {
        let s = by_rule.entry(b.rule.clone()).or_insert_with(|| RuleStats {
            rule: b.rule.clone(),
            ..Default::default()
        });
        s.points += b.points;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::document::tests::sample;
    use crate::core::money::Money;

    #[test]
    fn a_richer_rule_costs_more_and_the_guard_still_caps_it() {
        let mut cheap = RuleSet::flat(Decimal::from(2), Money(100), chrono::Duration::days(14), None);
        cheap.guard.max_reward_share_of_margin = Decimal::ONE;
        let mut rich = cheap.clone();
        rich.earn[0].kind = crate::core::rules::EarnKind::Percent(Decimal::from(50));
        let sales: Vec<SimSale> = (0..10)
            .map(|i| {
                let mut d = sample();
                d.source.doc_id = format!("D{i}");
                SimSale {
                    id: i,
                    customer: Some(i % 3),
                    doc: d,
                }
            })
            .collect();
        let a = simulate(&cheap, sales.clone(), None);
        let b = simulate(&rich, sales, None);
        assert_eq!(a.sales, 10);
        assert_eq!(a.points_issued, 10 * 20);
        // 50% of 1000 ₽ = 500 ₽ but the margin is 400 ₽: capped on every line
        assert_eq!(b.points_issued, 10 * 400);
        assert_eq!(b.lines_capped_by_margin, 10);
        assert_eq!(b.margin_after_program_kopecks, 0);
        assert_eq!(a.gross_margin_kopecks, b.gross_margin_kopecks);
    }
}
