//! The rules file (`config/rules.toml`): raw TOML → validated [`RuleSet`].
//!
//! Like the main configuration, every problem is collected and reported at once with its
//! key path (`rules[2].percent`) and the file. Money is written as **integer kopecks** in
//! keys ending `_kopecks`; rates and shares are decimals written as strings (`"2.5"`) or
//! integers, never floats.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;

use chrono::{Duration, NaiveDate, Weekday};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::{DecimalText, Issue, Report};
use crate::core::money::Money;
use crate::core::rules::{
    Birthday, Budget, BudgetPeriod, ClosedProgram, EarnKind, EarnRule, Filter, Guard, NegativeBalance,
    Referral, ReturnClawback, RuleSet, StampCard, StampCount, StampReward, Threshold, Tier, TierPolicy,
    UnknownCost, Welcome,
};

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawProgram {
    point_value_kopecks: Option<i64>,
    return_window_days: Option<i64>,
    expire_after_days: Option<i64>,
    warn_before_days: Option<i64>,
    earn_on_redeemed: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawGuard {
    max_reward_share_of_margin: Option<DecimalText>,
    min_markup: Option<DecimalText>,
    max_redeem_share_of_check: Option<DecimalText>,
    unknown_cost: Option<String>,
    assume_margin_pct: Option<DecimalText>,
    fixed_rate_pct: Option<DecimalText>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawBudget {
    period: Option<String>,
    share_of_gross_margin: Option<DecimalText>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawExclusions {
    products: Vec<String>,
    /// Like a rule's categories: a group and everything below it.
    categories: Vec<String>,
    services: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawNegative {
    policy: Option<String>,
    cap_points: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawReturns {
    clawback: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawVelocity {
    max_sales_per_day: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawTierPolicy {
    window_days: Option<i64>,
    /// Counted from the first re-evaluation that finds the spend below the tier's
    /// threshold, not from when the tier was reached (see `TierPolicy::downgrade_grace`).
    downgrade_grace_days: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawTier {
    id: Option<String>,
    name: Option<String>,
    min_spend_kopecks: Option<i64>,
    earn_multiplier: Option<DecimalText>,
    discount_pct: Option<DecimalText>,
    max_redeem_share: Option<DecimalText>,
}

/// The conditions every rule may carry, written flat in the rule's table.
#[derive(Default, Deserialize)]
#[serde(default)]
struct RawFilter {
    from: Option<String>,
    to: Option<String>,
    weekdays: Vec<String>,
    hours: Option<String>,
    stores: Vec<String>,
    channels: Vec<String>,
    tiers: Vec<String>,
    programs: Vec<String>,
    include_products: Vec<String>,
    exclude_products: Vec<String>,
    /// Group names of 1C's catalog; each one covers the groups below it too, so a shop
    /// writes the department once rather than every leaf group.
    include_categories: Vec<String>,
    exclude_categories: Vec<String>,
}

const FILTER_KEYS: &[&str] = &[
    "from",
    "to",
    "weekdays",
    "hours",
    "stores",
    "channels",
    "tiers",
    "programs",
    "include_products",
    "exclude_products",
    "include_categories",
    "exclude_categories",
];

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawEarn {
    id: Option<String>,
    kind: Option<String>,
    percent: Option<DecimalText>,
    factor: Option<DecimalText>,
    points: Option<i64>,
    min_check_kopecks: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawStamp {
    id: Option<String>,
    every: Option<u32>,
    count: Option<String>,
    reward_points: Option<i64>,
    reward_product: Option<String>,
    reward_valid_days: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawThreshold {
    id: Option<String>,
    spend_kopecks: Option<i64>,
    window_days: Option<i64>,
    bonus_points: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawWelcome {
    enrolment_points: Option<i64>,
    first_purchase_points: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawBirthday {
    points: Option<i64>,
    days_before: Option<i64>,
    days_after: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawReferral {
    referrer_points: Option<i64>,
    referee_points: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawClosed {
    id: Option<String>,
    invite_codes: Vec<String>,
    membership_products: Vec<String>,
    term_days: Option<i64>,
    invite_limit: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawPartner {
    id: Option<String>,
    sources: Vec<String>,
}

/// Collects problems with their key paths for one file.
struct Issues<'a> {
    origin: &'a str,
    list: Vec<Issue>,
}

impl Issues<'_> {
    fn bad(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Issue {
            key: key.into(),
            origin: self.origin.to_string(),
            message: message.into(),
        });
    }

    /// Reads a table key by key so that every bad key is reported; `only` limits the keys
    /// this struct takes (the rest are left for another reader).
    fn read<T: DeserializeOwned + Default>(
        &mut self,
        path: &str,
        value: &toml::Value,
        only: Option<&[&str]>,
        except: &[&str],
    ) -> T {
        let Some(table) = value.as_table() else {
            self.bad(path, "must be a table");
            return T::default();
        };
        let mut good = toml::Table::new();
        for (k, v) in table {
            if only.is_some_and(|o| !o.contains(&k.as_str())) || except.contains(&k.as_str()) {
                continue;
            }
            let key = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            let mut single = toml::Table::new();
            single.insert(k.clone(), v.clone());
            let mut unknown = Vec::new();
            let r: Result<T, _> =
                serde_ignored::deserialize(toml::Value::Table(single), |p| unknown.push(p.to_string()));
            for u in &unknown {
                self.bad(
                    if path.is_empty() {
                        u.clone()
                    } else {
                        format!("{path}.{u}")
                    },
                    "unknown key",
                );
            }
            match r {
                Ok(_) if unknown.is_empty() => {
                    good.insert(k.clone(), v.clone());
                }
                Ok(_) => {}
                Err(e) => self.bad(
                    key,
                    e.to_string()
                        .lines()
                        .next()
                        .unwrap_or("invalid value")
                        .to_string(),
                ),
            }
        }
        T::deserialize(toml::Value::Table(good)).unwrap_or_default()
    }

    fn decimal(
        &mut self,
        key: &str,
        v: Option<DecimalText>,
        default: Decimal,
        min: Decimal,
        max: Decimal,
    ) -> Decimal {
        let d = v.map_or(default, |d| d.0);
        if d < min || d > max {
            self.bad(key, format!("{d} is outside {min}..={max}"));
        }
        d
    }

    fn days(&mut self, key: &str, v: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let d = v.unwrap_or(default);
        if d < min || d > max {
            self.bad(key, format!("{d} is outside {min}..={max} days"));
        }
        d
    }

    fn id(&mut self, key: &str, v: Option<String>, seen: &mut BTreeSet<String>) -> String {
        match v {
            Some(id) if !id.trim().is_empty() => {
                if !seen.insert(id.clone()) {
                    self.bad(key, format!("id {id:?} is used twice"));
                }
                id
            }
            _ => {
                self.bad(key, "every entry needs an id");
                String::new()
            }
        }
    }
}

fn weekday(s: &str) -> Option<Weekday> {
    match s.trim().to_lowercase().as_str() {
        "mon" | "monday" | "пн" => Some(Weekday::Mon),
        "tue" | "tuesday" | "вт" => Some(Weekday::Tue),
        "wed" | "wednesday" | "ср" => Some(Weekday::Wed),
        "thu" | "thursday" | "чт" => Some(Weekday::Thu),
        "fri" | "friday" | "пт" => Some(Weekday::Fri),
        "sat" | "saturday" | "сб" => Some(Weekday::Sat),
        "sun" | "sunday" | "вс" => Some(Weekday::Sun),
        _ => None,
    }
}

fn filter(issues: &mut Issues<'_>, path: &str, value: &toml::Value) -> Filter {
    let raw: RawFilter = issues.read(path, value, Some(FILTER_KEYS), &[]);
    let date = |issues: &mut Issues<'_>, key: &str, v: &Option<String>| {
        v.as_ref().and_then(|s| {
            NaiveDate::from_str(s)
                .map_err(|_| {
                    issues.bad(
                        format!("{path}.{key}"),
                        format!("{s:?} is not a date (YYYY-MM-DD)"),
                    )
                })
                .ok()
        })
    };
    let from = date(issues, "from", &raw.from);
    let to = date(issues, "to", &raw.to);
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        issues.bad(format!("{path}.to"), format!("{t} is before from ({f})"));
    }
    let mut weekdays = Vec::new();
    for w in &raw.weekdays {
        match weekday(w) {
            Some(d) => weekdays.push(d),
            None => issues.bad(
                format!("{path}.weekdays"),
                format!("{w:?} is not a weekday (mon..sun)"),
            ),
        }
    }
    let hours = raw.hours.as_ref().and_then(|h| {
        let parsed = h
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?)))
            .filter(|(a, b)| *a < 24 && *b <= 24 && a != b);
        if parsed.is_none() {
            issues.bad(
                format!("{path}.hours"),
                format!("{h:?} is not an hour range like \"10-14\""),
            );
        }
        parsed
    });
    Filter {
        from,
        to,
        weekdays,
        hours,
        stores: raw.stores,
        channels: raw.channels,
        tiers: raw.tiers,
        programs: raw.programs,
        include_products: raw.include_products,
        exclude_products: raw.exclude_products,
        include_categories: raw.include_categories,
        exclude_categories: raw.exclude_categories,
    }
}

fn array<'v>(issues: &mut Issues<'_>, root: &'v toml::Table, key: &str) -> Vec<(String, &'v toml::Value)> {
    match root.get(key) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{key}[{i}]"), v))
            .collect(),
        Some(_) => {
            issues.bad(key, format!("must be an array of tables ([[{key}]])"));
            Vec::new()
        }
    }
}

const SECTIONS: &[&str] = &[
    "program",
    "guard",
    "budget",
    "exclusions",
    "negative_balance",
    "returns",
    "velocity",
    "tier_policy",
    "tiers",
    "rules",
    "stamp_cards",
    "thresholds",
    "welcome",
    "birthday",
    "referral",
    "closed_programs",
    "partners",
    "notifications",
];

/// Parses and validates rules text; `origin` names the file in messages.
pub fn parse(text: &str, origin: &str) -> Result<RuleSet, Report> {
    let mut issues = Issues {
        origin,
        list: Vec::new(),
    };
    let root: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            issues.bad("(file)", e.to_string().replace('\n', " "));
            return Err(Report(issues.list));
        }
    };
    for k in root.keys() {
        if !SECTIONS.contains(&k.as_str()) {
            issues.bad(
                k.clone(),
                format!("unknown section; known sections: {}", SECTIONS.join(", ")),
            );
        }
    }
    let empty = toml::Value::Table(toml::Table::new());
    let section = |k: &str| root.get(k).unwrap_or(&empty);

    let p: RawProgram = issues.read("program", section("program"), None, &[]);
    // The shop's time zone is `[general] timezone` of the main configuration.
    let timezone = chrono_tz::Europe::Moscow;
    let point_value = p.point_value_kopecks.unwrap_or(100);
    if point_value <= 0 {
        issues.bad("program.point_value_kopecks", "must be positive");
    }
    let return_window = issues.days("program.return_window_days", p.return_window_days, 14, 0, 365);
    let expire = issues.days("program.expire_after_days", p.expire_after_days, 365, 0, 36_500);
    let warn = issues.days("program.warn_before_days", p.warn_before_days, 14, 0, 365);

    let g: RawGuard = issues.read("guard", section("guard"), None, &[]);
    let one = Decimal::ONE;
    let hundred = Decimal::ONE_HUNDRED;
    let share = issues.decimal(
        "guard.max_reward_share_of_margin",
        g.max_reward_share_of_margin,
        Decimal::new(3, 1),
        Decimal::ZERO,
        one,
    );
    let min_markup = issues.decimal(
        "guard.min_markup",
        g.min_markup,
        Decimal::ZERO,
        Decimal::ZERO,
        Decimal::from(10),
    );
    let redeem_share = issues.decimal(
        "guard.max_redeem_share_of_check",
        g.max_redeem_share_of_check,
        Decimal::new(5, 1),
        Decimal::ZERO,
        one,
    );
    let unknown_cost = match g.unknown_cost.as_deref().unwrap_or("assume_margin_pct") {
        "skip" => UnknownCost::Skip,
        "assume_margin_pct" => UnknownCost::AssumeMarginPct(issues.decimal(
            "guard.assume_margin_pct",
            g.assume_margin_pct,
            Decimal::from(25),
            Decimal::ZERO,
            hundred,
        )),
        "fixed_rate" => UnknownCost::FixedRate(issues.decimal(
            "guard.fixed_rate_pct",
            g.fixed_rate_pct,
            Decimal::ONE,
            Decimal::ZERO,
            hundred,
        )),
        other => {
            issues.bad(
                "guard.unknown_cost",
                format!("{other:?} is not one of skip, assume_margin_pct, fixed_rate"),
            );
            UnknownCost::Skip
        }
    };

    let budget = root.get("budget").map(|v| {
        let b: RawBudget = issues.read("budget", v, None, &[]);
        let period = match b.period.as_deref().unwrap_or("month") {
            "day" => BudgetPeriod::Day,
            "month" => BudgetPeriod::Month,
            other => {
                issues.bad("budget.period", format!("{other:?} is not day or month"));
                BudgetPeriod::Month
            }
        };
        Budget {
            period,
            share_of_gross_margin: issues.decimal(
                "budget.share_of_gross_margin",
                b.share_of_gross_margin,
                Decimal::new(2, 1),
                Decimal::ZERO,
                one,
            ),
        }
    });

    let ex: RawExclusions = issues.read("exclusions", section("exclusions"), None, &[]);
    let nb: RawNegative = issues.read("negative_balance", section("negative_balance"), None, &[]);
    let negative_balance = match nb.policy.as_deref().unwrap_or("allow") {
        "allow" => NegativeBalance::Allow,
        "cap" => match nb.cap_points {
            Some(c) if c >= 0 => NegativeBalance::Cap(c),
            _ => {
                issues.bad("negative_balance.cap_points", "policy cap needs cap_points ≥ 0");
                NegativeBalance::Allow
            }
        },
        "write_off" => NegativeBalance::WriteOff,
        other => {
            issues.bad(
                "negative_balance.policy",
                format!("{other:?} is not one of allow, cap, write_off"),
            );
            NegativeBalance::Allow
        }
    };
    let rt: RawReturns = issues.read("returns", section("returns"), None, &[]);
    let returns = match rt.clawback.as_deref().unwrap_or("everything") {
        "everything" => ReturnClawback::Everything,
        "goods_only" => ReturnClawback::GoodsOnly,
        other => {
            issues.bad(
                "returns.clawback",
                format!("{other:?} is not one of everything, goods_only"),
            );
            ReturnClawback::Everything
        }
    };
    let vel: RawVelocity = issues.read("velocity", section("velocity"), None, &[]);
    let tp: RawTierPolicy = issues.read("tier_policy", section("tier_policy"), None, &[]);
    let tier_policy = TierPolicy {
        window: Duration::days(issues.days("tier_policy.window_days", tp.window_days, 365, 1, 3650)),
        downgrade_grace: Duration::days(issues.days(
            "tier_policy.downgrade_grace_days",
            tp.downgrade_grace_days,
            30,
            0,
            3650,
        )),
    };

    let mut seen = BTreeSet::new();
    let mut tiers = Vec::new();
    for (path, v) in array(&mut issues, &root, "tiers") {
        let t: RawTier = issues.read(&path, v, None, &[]);
        let id = issues.id(&format!("{path}.id"), t.id, &mut seen);
        let min = t.min_spend_kopecks.unwrap_or(0);
        if min < 0 {
            issues.bad(format!("{path}.min_spend_kopecks"), "must not be negative");
        }
        tiers.push(Tier {
            name: t.name.unwrap_or_else(|| id.clone()),
            id,
            min_spend: Money(min),
            earn_multiplier: issues.decimal(
                &format!("{path}.earn_multiplier"),
                t.earn_multiplier,
                one,
                Decimal::ZERO,
                Decimal::from(10),
            ),
            discount_pct: issues.decimal(
                &format!("{path}.discount_pct"),
                t.discount_pct,
                Decimal::ZERO,
                Decimal::ZERO,
                hundred,
            ),
            max_redeem_share: t.max_redeem_share.map(|s| {
                issues.decimal(
                    &format!("{path}.max_redeem_share"),
                    Some(s),
                    one,
                    Decimal::ZERO,
                    one,
                )
            }),
        });
    }
    let mut spends: Vec<Money> = tiers.iter().map(|t| t.min_spend).collect();
    spends.sort();
    spends.dedup();
    if spends.len() != tiers.len() {
        issues.bad("tiers", "two tiers have the same min_spend_kopecks");
    }
    let tier_ids: BTreeSet<String> = tiers.iter().map(|t| t.id.clone()).collect();

    let mut closed_programs = Vec::new();
    let mut seen_programs = BTreeSet::new();
    for (path, v) in array(&mut issues, &root, "closed_programs") {
        let c: RawClosed = issues.read(&path, v, None, &[]);
        let id = issues.id(&format!("{path}.id"), c.id, &mut seen_programs);
        if c.invite_codes.is_empty() && c.membership_products.is_empty() {
            issues.bad(
                &path,
                "a closed program needs invite_codes or membership_products to join it",
            );
        }
        let term = c
            .term_days
            .map(|_| Duration::days(issues.days(&format!("{path}.term_days"), c.term_days, 365, 1, 3660)));
        let invite_limit = match c.invite_limit {
            Some(n) if !(1..=10_000_000).contains(&n) => {
                issues.bad(
                    format!("{path}.invite_limit"),
                    format!("{n} is outside 1..=10000000 customers"),
                );
                None
            }
            n => n.map(|n| n as u32),
        };
        if invite_limit.is_some() && c.invite_codes.is_empty() {
            issues.bad(
                format!("{path}.invite_limit"),
                "invite_limit counts uses of invite_codes, and the program has none",
            );
        }
        closed_programs.push(ClosedProgram {
            id,
            invite_codes: c.invite_codes,
            membership_products: c.membership_products,
            term,
            invite_limit,
        });
    }

    let check_refs = |issues: &mut Issues<'_>, path: &str, f: &Filter| {
        for t in &f.tiers {
            if !tier_ids.contains(t) {
                issues.bad(format!("{path}.tiers"), format!("no tier {t:?} in [[tiers]]"));
            }
        }
        for p in &f.programs {
            if !seen_programs.contains(p) {
                issues.bad(
                    format!("{path}.programs"),
                    format!("no program {p:?} in [[closed_programs]]"),
                );
            }
        }
    };

    let mut earn = Vec::new();
    let mut seen_rules = BTreeSet::new();
    for (path, v) in array(&mut issues, &root, "rules") {
        let r: RawEarn = issues.read(&path, v, None, FILTER_KEYS);
        let f = filter(&mut issues, &path, v);
        check_refs(&mut issues, &path, &f);
        let id = issues.id(&format!("{path}.id"), r.id, &mut seen_rules);
        let kind = match r.kind.as_deref().unwrap_or("percent") {
            "percent" => match r.percent {
                Some(p) => EarnKind::Percent(issues.decimal(
                    &format!("{path}.percent"),
                    Some(p),
                    one,
                    Decimal::ZERO,
                    hundred,
                )),
                None => {
                    issues.bad(format!("{path}.percent"), "a percent rule needs percent");
                    EarnKind::Percent(Decimal::ZERO)
                }
            },
            "multiplier" => match r.factor {
                Some(m) => EarnKind::Multiplier(issues.decimal(
                    &format!("{path}.factor"),
                    Some(m),
                    one,
                    Decimal::ZERO,
                    Decimal::from(100),
                )),
                None => {
                    issues.bad(format!("{path}.factor"), "a multiplier rule needs factor");
                    EarnKind::Multiplier(one)
                }
            },
            "fixed_per_check" => match r.points {
                Some(p) if p > 0 => EarnKind::FixedPerCheck(p),
                _ => {
                    issues.bad(
                        format!("{path}.points"),
                        "a fixed_per_check rule needs points > 0",
                    );
                    EarnKind::FixedPerCheck(0)
                }
            },
            other => {
                issues.bad(
                    format!("{path}.kind"),
                    format!("{other:?} is not one of percent, multiplier, fixed_per_check"),
                );
                EarnKind::Percent(Decimal::ZERO)
            }
        };
        earn.push(EarnRule {
            id,
            kind,
            filter: f,
            min_check: Money(r.min_check_kopecks.unwrap_or(0).max(0)),
        });
    }

    let mut stamps = Vec::new();
    for (path, v) in array(&mut issues, &root, "stamp_cards") {
        let r: RawStamp = issues.read(&path, v, None, FILTER_KEYS);
        let f = filter(&mut issues, &path, v);
        check_refs(&mut issues, &path, &f);
        let id = issues.id(&format!("{path}.id"), r.id, &mut seen_rules);
        let every = r.every.unwrap_or(0);
        if every < 2 {
            issues.bad(
                format!("{path}.every"),
                "every must be at least 2 (every Nth item or visit)",
            );
        }
        let count = match r.count.as_deref().unwrap_or("items") {
            "items" => StampCount::Items,
            "visits" => StampCount::Visits,
            other => {
                issues.bad(
                    format!("{path}.count"),
                    format!("{other:?} is not items or visits"),
                );
                StampCount::Items
            }
        };
        let reward = match (r.reward_points, r.reward_product) {
            (Some(p), None) if p > 0 => StampReward::Points(p),
            (None, Some(product)) if !product.is_empty() => StampReward::Product(product),
            _ => {
                issues.bad(&path, "give exactly one of reward_points (> 0) or reward_product");
                StampReward::Points(0)
            }
        };
        let voucher_valid = Duration::days(issues.days(
            &format!("{path}.reward_valid_days"),
            r.reward_valid_days,
            90,
            1,
            3660,
        ));
        stamps.push(StampCard {
            key: format!("stamp:{id}"),
            id,
            every: every.max(1),
            count,
            filter: f,
            reward,
            voucher_valid,
        });
    }

    let mut thresholds = Vec::new();
    for (path, v) in array(&mut issues, &root, "thresholds") {
        let r: RawThreshold = issues.read(&path, v, None, FILTER_KEYS);
        let f = filter(&mut issues, &path, v);
        check_refs(&mut issues, &path, &f);
        let id = issues.id(&format!("{path}.id"), r.id, &mut seen_rules);
        let spend = r.spend_kopecks.unwrap_or(0);
        if spend <= 0 {
            issues.bad(format!("{path}.spend_kopecks"), "must be positive");
        }
        let bonus = r.bonus_points.unwrap_or(0);
        if bonus <= 0 {
            issues.bad(format!("{path}.bonus_points"), "must be positive");
        }
        thresholds.push(Threshold {
            key: format!("threshold:{id}"),
            id,
            spend: Money(spend),
            window: Duration::days(issues.days(&format!("{path}.window_days"), r.window_days, 30, 1, 3650)),
            bonus_points: bonus,
            filter: f,
        });
    }

    let w: RawWelcome = issues.read("welcome", section("welcome"), None, &[]);
    let welcome = Welcome {
        enrolment_points: w.enrolment_points.unwrap_or(0),
        first_purchase_points: w.first_purchase_points.unwrap_or(0),
    };
    if welcome.enrolment_points < 0 || welcome.first_purchase_points < 0 {
        issues.bad("welcome", "bonus points must not be negative");
    }
    let birthday = root.get("birthday").map(|v| {
        let b: RawBirthday = issues.read("birthday", v, None, &[]);
        Birthday {
            points: b.points.unwrap_or(0).max(0),
            days_before: issues.days("birthday.days_before", b.days_before, 0, 0, 31),
            days_after: issues.days("birthday.days_after", b.days_after, 7, 0, 31),
        }
    });
    let referral = root.get("referral").map(|v| {
        let r: RawReferral = issues.read("referral", v, None, &[]);
        Referral {
            referrer_points: r.referrer_points.unwrap_or(0).max(0),
            referee_points: r.referee_points.unwrap_or(0).max(0),
        }
    });
    let mut partners = BTreeMap::new();
    let mut seen_partners = BTreeSet::new();
    for (path, v) in array(&mut issues, &root, "partners") {
        let p: RawPartner = issues.read(&path, v, None, &[]);
        let id = issues.id(&format!("{path}.id"), p.id, &mut seen_partners);
        if p.sources.is_empty() {
            issues.bad(
                format!("{path}.sources"),
                "name the source systems whose sales are this partner's",
            );
        }
        for s in p.sources {
            if partners.insert(s.clone(), id.clone()).is_some() {
                issues.bad(
                    format!("{path}.sources"),
                    format!("source {s:?} belongs to two partners"),
                );
            }
        }
    }
    let notify = root
        .get("notifications")
        .map(|v| notifications(&mut issues, v))
        .unwrap_or_default();
    if earn.is_empty() && stamps.is_empty() && thresholds.is_empty() {
        issues.bad(
            "rules",
            "the program earns nothing: add at least one [[rules]] entry",
        );
    }
    if !issues.list.is_empty() {
        issues.list.sort_by(|a, b| a.key.cmp(&b.key));
        return Err(Report(issues.list));
    }
    Ok(RuleSet {
        timezone,
        point_value: Money(point_value),
        return_window: Duration::days(return_window),
        expire_after: (expire > 0).then(|| Duration::days(expire)),
        warn_before: Duration::days(warn),
        earn_on_redeemed: p.earn_on_redeemed.unwrap_or(false),
        guard: Guard {
            max_reward_share_of_margin: share,
            min_markup,
            max_redeem_share_of_check: redeem_share,
            unknown_cost,
        },
        budget,
        exclusions: Filter {
            exclude_products: ex.products,
            exclude_categories: ex.categories,
            ..Filter::default()
        },
        exclude_services: ex.services.unwrap_or(true),
        negative_balance,
        returns,
        max_sales_per_day: vel.max_sales_per_day,
        earn,
        tiers,
        tier_policy,
        stamps,
        thresholds,
        welcome,
        birthday,
        referral,
        closed_programs,
        partners,
        notify,
    })
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawNotifications {
    shop: Option<String>,
    quiet_hours: Option<String>,
    per_day: Option<u32>,
    per_week: Option<u32>,
    max_age_days: Option<i64>,
    wait_for_address_days: Option<i64>,
    accrual_min_points: Option<i64>,
    near_tier_percent: Option<i64>,
    advertising: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawTemplate {
    subject: Option<String>,
    text: Option<String>,
}

/// `[notifications]`: events → channels, templates, the quiet window, caps.
fn notifications(issues: &mut Issues<'_>, v: &toml::Value) -> crate::core::notify::Policy {
    use crate::core::notify::{Channel, EventKind, Policy, Template, default_template, unknown_placeholders};
    let r: RawNotifications = issues.read("notifications", v, None, &["events", "templates"]);
    let mut p = Policy::default();
    let kinds = || {
        EventKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kind = |issues: &mut Issues<'_>, key: &str, name: &str| {
        let k = EventKind::parse(name);
        if k.is_none() {
            issues.bad(key, format!("{name:?} is not an event; events: {}", kinds()));
        }
        k
    };
    if let Some(shop) = r.shop {
        p.shop = shop;
    }
    match r.quiet_hours.as_deref().map(str::trim) {
        None => {}
        Some("" | "none") => p.quiet = None,
        Some(text) => {
            let parsed = text.split_once('-').and_then(|(a, b)| {
                Some((
                    chrono::NaiveTime::parse_from_str(a.trim(), "%H:%M").ok()?,
                    chrono::NaiveTime::parse_from_str(b.trim(), "%H:%M").ok()?,
                ))
            });
            match parsed {
                Some(q) => p.quiet = Some(q),
                None => issues.bad(
                    "notifications.quiet_hours",
                    format!("{text:?} is not a window like \"21:00-09:00\" (local time), or \"none\""),
                ),
            }
        }
    }
    if let Some(n) = r.per_day {
        p.per_day = n;
    }
    if let Some(n) = r.per_week {
        p.per_week = n;
    }
    p.max_age = Duration::days(issues.days("notifications.max_age_days", r.max_age_days, 3, 0, 365));
    p.wait_for_address = Duration::days(issues.days(
        "notifications.wait_for_address_days",
        r.wait_for_address_days,
        7,
        0,
        365,
    ));
    p.accrual_min_points = r.accrual_min_points.unwrap_or(1).max(0);
    p.near_tier_percent = r.near_tier_percent.unwrap_or(20);
    if !(1..=100).contains(&p.near_tier_percent) {
        issues.bad(
            "notifications.near_tier_percent",
            format!(
                "{} is outside 1..=100 (percent of the next tier's threshold)",
                p.near_tier_percent
            ),
        );
    }
    for (i, name) in r.advertising.iter().enumerate() {
        if let Some(k) = kind(issues, &format!("notifications.advertising[{i}]"), name) {
            p.advertising.insert(k);
        }
    }
    if let Some(events) = v.get("events") {
        match events.as_table() {
            None => issues.bad(
                "notifications.events",
                "must be a table: event = [\"email\", \"telegram\"]",
            ),
            Some(t) => {
                for (name, channels) in t {
                    let key = format!("notifications.events.{name}");
                    let Some(k) = kind(issues, &key, name) else {
                        continue;
                    };
                    let Some(list) = channels.as_array() else {
                        issues.bad(&key, "must be a list of channels: email, telegram, salesbot");
                        continue;
                    };
                    let mut chosen = Vec::new();
                    for c in list {
                        match c.as_str().and_then(Channel::parse) {
                            Some(ch) if !chosen.contains(&ch) => chosen.push(ch),
                            Some(_) => {}
                            None => issues.bad(
                                &key,
                                format!("{c} is not a channel; channels: email, telegram, salesbot"),
                            ),
                        }
                    }
                    if !chosen.is_empty() {
                        p.routes.insert(k, chosen);
                    }
                }
            }
        }
    }
    if let Some(templates) = v.get("templates") {
        match templates.as_table() {
            None => issues.bad(
                "notifications.templates",
                "must be a table of [notifications.templates.EVENT]",
            ),
            Some(t) => {
                for (name, tv) in t {
                    let key = format!("notifications.templates.{name}");
                    let Some(k) = kind(issues, &key, name) else {
                        continue;
                    };
                    let raw: RawTemplate = match tv.clone().try_into() {
                        Ok(r) => r,
                        Err(e) => {
                            issues.bad(&key, e.to_string().replace('\n', " "));
                            continue;
                        }
                    };
                    let d = default_template(k);
                    let t = Template {
                        subject: raw.subject.unwrap_or(d.subject),
                        text: raw.text.unwrap_or(d.text),
                    };
                    for (part, text) in [("subject", &t.subject), ("text", &t.text)] {
                        let unknown = unknown_placeholders(text);
                        if !unknown.is_empty() {
                            issues.bad(
                                format!("{key}.{part}"),
                                format!(
                                    "unknown placeholder {}; known: {}",
                                    unknown
                                        .iter()
                                        .map(|u| format!("{{{u}}}"))
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    crate::core::notify::PLACEHOLDERS
                                        .iter()
                                        .map(|u| format!("{{{u}}}"))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                ),
                            );
                        }
                    }
                    p.templates.insert(k, t);
                }
            }
        }
    }
    p
}

/// Reads and validates a rules file.
pub fn load(path: &Path) -> Result<RuleSet, Report> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Report(vec![Issue {
            key: "(file)".into(),
            origin: origin.clone(),
            message: format!("cannot read the rules file: {e}"),
        }])
    })?;
    parse(&text, &origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<String> {
        parse(text, "rules.toml")
            .err()
            .map(|r| r.0.into_iter().map(|i| i.key).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/rules.toml");
        let r = parse(text, "config/rules.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.earn.is_empty() && !r.tiers.is_empty() && !r.stamps.is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let k = keys(
            r#"
[guard]
max_reward_share_of_margin = 0.3
nonsense = 1
[[rules]]
id = "a"
percent = "150"
weekdays = ["mon", "funday"]
hours = "25-3"
[[rules]]
id = "a"
kind = "bogus"
tiers = ["gold"]
[[stamp_cards]]
id = "s"
every = 1
[oops]
"#,
        );
        for expected in [
            "guard.max_reward_share_of_margin",
            "guard.nonsense",
            "rules[0].percent",
            "rules[0].weekdays",
            "rules[0].hours",
            "rules[1].id",
            "rules[1].kind",
            "rules[1].tiers",
            "stamp_cards[0].every",
            "stamp_cards[0]",
            "oops",
        ] {
            assert!(k.contains(&expected.to_string()), "{expected} missing from {k:?}");
        }
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let r = parse("[[rules]]\nid = \"base\"\npercent = \"3\"\n", "r").unwrap();
        assert_eq!(r.point_value, Money(100));
        assert_eq!(r.guard.max_reward_share_of_margin, Decimal::new(3, 1));
        assert_eq!(
            r.guard.unknown_cost,
            UnknownCost::AssumeMarginPct(Decimal::from(25))
        );
        assert_eq!(r.return_window, Duration::days(14));
    }
}
