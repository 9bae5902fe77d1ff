//! What a return takes back besides the points its goods earned: the rewards a sale caused
//! by happening at all (issue 16, point 2).
//!
//! Without this, buy → collect the per-check points, the stamp reward, the threshold bonus
//! and the first-purchase bonus → return everything → repeat is a way to be paid for
//! nothing sold. The ledger gives these functions the sale's rewards still in force and the
//! customer's position after the return; they say what to take back and why. Policy:
//! `[returns] clawback` in the rules file ([`ReturnClawback`]).

use std::collections::HashMap;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::document::Line;
use super::rules::{ReturnClawback, RuleSet, StampCount};

/// The rule name the per-check part of an accrual (fixed points per check) is taken back
/// under, so what earlier returns took of it can be told from what the goods gave back.
pub const PER_CHECK: &str = "per_check";
/// The rule of the first-purchase bonus.
pub const FIRST_PURCHASE: &str = "welcome:first_purchase";

/// A reward a sale caused, with what of it is still in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaleReward {
    /// The journal transaction that issued it.
    pub tx: i64,
    /// The bonus's rule, or [`PER_CHECK`] for the per-check points inside the accrual.
    pub rule: String,
    /// Points issued less what earlier returns took back.
    pub remaining: i64,
}

/// The customer's position once the return counts, as far as event rewards depend on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AfterReturn {
    /// Nothing of the sale's goods is left with the customer.
    pub sale_fully_returned: bool,
    /// Per stamp card and threshold key: the counter as the sale found it (stamps on the
    /// card, spend in the window before the sale), and what of the sale's own share is left
    /// after its returns.
    pub counters: HashMap<String, (i64, i64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Takeback {
    pub tx: i64,
    pub rule: String,
    pub points: i64,
    /// Why, in words `history` shows.
    pub reason: String,
}

/// What to take back of a sale's event rewards after a return.
pub fn event_takebacks(rules: &RuleSet, rewards: &[SaleReward], after: &AfterReturn) -> Vec<Takeback> {
    if rules.returns == ReturnClawback::GoodsOnly {
        return Vec::new();
    }
    let mut out = Vec::new();
    // a stamp reward stays while the stamps the sale still holds, on top of the card it
    // found, reach it: the card's rewards the sale keeps, per card
    let mut keep: HashMap<&str, i64> = HashMap::new();
    for card in &rules.stamps {
        if let Some((before, left)) = after.counters.get(&card.key) {
            let every = i64::from(card.every.max(1));
            let before = (*before).max(0);
            keep.insert(
                card.key.as_str(),
                (before + left.max(&0)) / every - before / every,
            );
        }
    }
    let in_force = |key: &str| {
        rewards
            .iter()
            .filter(|r| r.rule == key && r.remaining > 0)
            .count() as i64
    };
    let mut to_take: HashMap<&str, i64> = keep
        .iter()
        .map(|(k, kept)| (*k, (in_force(k) - kept).max(0)))
        .collect();
    // the sale's last rewards first
    for r in rewards.iter().rev() {
        if r.remaining <= 0 {
            continue;
        }
        let take = |reason: String| Takeback {
            tx: r.tx,
            rule: r.rule.clone(),
            points: r.remaining,
            reason,
        };
        if let Some(card) = rules.stamps.iter().find(|c| c.key == r.rule) {
            if let Some(n) = to_take.get_mut(card.key.as_str())
                && *n > 0
            {
                *n -= 1;
                let (before, left) = after.counters.get(&card.key).copied().unwrap_or_default();
                out.push(take(format!(
                    "stamp card {}: {left} of the sale's stamps are left on a card it found at {before}, \
                     short of the {} the reward needs",
                    card.id, card.every
                )));
            }
            continue;
        }
        if let Some(t) = rules.thresholds.iter().find(|t| t.key == r.rule) {
            let (before, left) = after.counters.get(&t.key).copied().unwrap_or_default();
            let spend = before + left;
            if spend < t.spend.0 {
                out.push(take(format!(
                    "spend within {} days is {} with what is left of the sale, below the threshold {}",
                    t.window.num_days(),
                    super::money::Money(spend),
                    t.spend
                )));
            }
            continue;
        }
        if after.sale_fully_returned {
            let reason = match r.rule.as_str() {
                PER_CHECK => "per-check points: the whole check was returned".to_string(),
                FIRST_PURCHASE => "first-purchase bonus: the first purchase was returned in full".to_string(),
                other => format!("{other}: the sale that earned it was returned in full"),
            };
            out.push(take(reason));
        }
    }
    out
}

/// Stamps the lines would add to a card (whole units of qualifying goods).
fn qualifying_stamps(rules: &RuleSet, card_filter: &super::rules::Filter, lines: &[&Line]) -> Decimal {
    lines
        .iter()
        .filter(|l| card_filter.line_matches(l) && !(rules.exclude_services && l.service))
        .map(|l| l.quantity.trunc())
        .sum()
}

/// What a return takes off the counters its sale added (`sale_counters`: the sale's own
/// contribution per key): the stamps of the returned items — a visit when the last
/// qualifying item goes back — and the returned spend of each threshold, never more than
/// the sale added less what earlier returns (`returned_before`) took.
pub fn return_counters(
    rules: &RuleSet,
    sale_lines: &[Line],
    sale_counters: &HashMap<String, i64>,
    returned_before: &[Line],
    returning: &[Line],
) -> Vec<(String, i64)> {
    let before: Vec<&Line> = returned_before.iter().collect();
    let now: Vec<&Line> = returning.iter().collect();
    let mut out = Vec::new();
    for card in &rules.stamps {
        let Some(&added) = sale_counters.get(&card.key) else {
            continue;
        };
        let take = match card.count {
            StampCount::Items => {
                let gone_before = qualifying_stamps(rules, &card.filter, &before)
                    .to_i64()
                    .unwrap_or(0);
                let gone = qualifying_stamps(rules, &card.filter, &now).to_i64().unwrap_or(0);
                gone.min(added - gone_before)
            }
            StampCount::Visits => {
                let sold: Vec<&Line> = sale_lines.iter().collect();
                let sold_q = qualifying_stamps(rules, &card.filter, &sold);
                let b = qualifying_stamps(rules, &card.filter, &before);
                let a = b + qualifying_stamps(rules, &card.filter, &now);
                i64::from(b < sold_q && a >= sold_q).min(added)
            }
        };
        if take > 0 {
            out.push((card.key.clone(), -take));
        }
    }
    for t in &rules.thresholds {
        let Some(&added) = sale_counters.get(&t.key) else {
            continue;
        };
        let spend = |lines: &[&Line]| -> i64 {
            lines
                .iter()
                .filter(|l| !rules.excluded(l) && t.filter.line_matches(l))
                .map(|l| l.net.0)
                .sum()
        };
        let take = spend(&now).min(added - spend(&before));
        if take > 0 {
            out.push((t.key.clone(), -take));
        }
    }
    out
}

/// Whether the returns (earlier ones and this one) take back every unit the sale sold.
pub fn fully_returned(sale_lines: &[Line], returned_before: &[Line], returning: &[Line]) -> bool {
    let mut left: HashMap<&str, Decimal> = HashMap::new();
    for l in sale_lines {
        *left.entry(l.product_id.as_str()).or_default() += l.quantity;
    }
    for l in returned_before.iter().chain(returning) {
        if let Some(q) = left.get_mut(l.product_id.as_str()) {
            *q -= l.quantity;
        }
    }
    !left.is_empty() && left.values().all(|q| *q <= Decimal::ZERO)
}
