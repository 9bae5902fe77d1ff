//! The rules engine, one table per program type and per cap, through one `check` helper;
//! then a property test of the cost guard over random baskets and rule sets.

use std::collections::HashMap;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use kopilka::core::document::{DocKind, Document, Line, SourceRef};
use kopilka::core::identity::CustomerIdentity;
use kopilka::core::money::{Money, Points};
use kopilka::core::program::{BudgetState, CustomerState, Decision, Rules};
use kopilka::core::rules::{
    self, QuoteRequest, RuleSet, line_margin, quote, tier_after_sale, tier_at_reevaluation,
};
use kopilka::rules_file;
use proptest::prelude::*;
use rust_decimal::Decimal;

/// Monday 2026-03-02 10:30 in Moscow.
fn monday_morning() -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .with_ymd_and_hms(2026, 3, 2, 10, 30, 0)
        .unwrap()
        .with_timezone(&Utc)
}

fn rules(extra: &str) -> RuleSet {
    rules_file::parse(extra, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// (product, category, quantity, net rubles, cost per unit rubles or None)
type L<'a> = (&'a str, &'a str, i64, &'a str, Option<&'a str>);

fn doc(lines: &[L<'_>]) -> Document {
    let lines: Vec<Line> = lines
        .iter()
        .map(|&(p, c, q, net, cost)| Line {
            product_id: p.into(),
            name: p.into(),
            category: Some(c.into()),
            category_parents: Vec::new(),
            quantity: Decimal::from(q),
            unit_price: Money::parse_rubles(net).unwrap(),
            discount: Money(0),
            net: Money::parse_rubles(net).unwrap(),
            unit_cost: cost.map(|c| Money::parse_rubles(c).unwrap()),
            service: p == "ORDER_DELIVERY",
        })
        .collect();
    Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: "D".into(),
            version: "v".into(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: Some("1".into()),
        occurred_at: monday_morning(),
        customer: CustomerIdentity {
            card: Some("C".into()),
            ..Default::default()
        },
        currency: "RUB".into(),
        total: lines.iter().map(|l| l.net).sum(),
        lines,
        points_redeemed: Points(0),
        original: None,
        store: Some("Тверская".into()),
        partner: None,
    }
}

fn member() -> CustomerState {
    CustomerState {
        customer_id: Some(1),
        prior_sales: 3,
        ..Default::default()
    }
}

struct Expect<'a> {
    lines: &'a [i64],
    flags: &'a [&'a str],
    bonuses: &'a [(&'a str, i64)],
}

fn check(rules: &RuleSet, d: &Document, state: &CustomerState, expect: Expect<'_>) -> Decision {
    let decision = rules.evaluate(d, state, d.occurred_at);
    assert_eq!(
        decision.line_points, expect.lines,
        "points per line: {:#?}",
        decision.explanation
    );
    let explained: i64 = decision.explanation.items.iter().map(|i| i.points).sum();
    assert_eq!(
        explained, decision.accrual,
        "explanation items sum to the accrual"
    );
    let mut flags: Vec<&str> = decision.flags.iter().map(|f| f.code.as_str()).collect();
    flags.sort_unstable();
    let mut want = expect.flags.to_vec();
    want.sort_unstable();
    assert_eq!(flags, want, "flags: {:#?}", decision.flags);
    let bonuses: Vec<(&str, i64)> = decision
        .bonuses
        .iter()
        .map(|b| (b.rule.as_str(), b.points))
        .collect();
    assert_eq!(bonuses, expect.bonuses);
    decision
}

const BASE: &str = "[[rules]]\nid = \"base\"\npercent = \"5\"\n";

#[test]
fn bonus_points_percent_category_rates_multipliers_fixed_and_minimum() {
    let r = rules(&format!(
        "{BASE}
[[rules]]
id = \"coffee\"
percent = \"7\"
include_categories = [\"coffee\"]
[[rules]]
id = \"happy\"
kind = \"multiplier\"
factor = \"2\"
weekdays = [\"mon\"]
hours = \"10-12\"
[[rules]]
id = \"visit\"
kind = \"fixed_per_check\"
points = 10
min_check_kopecks = 150000
"
    ));
    // 1000 ₽ tea (cost 500): 5% × 2 = 100; 1000 ₽ coffee (cost 400): 7% × 2 = 140; visit 10
    let d = doc(&[
        ("T", "tea", 1, "1000", Some("500")),
        ("K", "coffee", 1, "1000", Some("400")),
    ]);
    let dec1 = check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[100, 140],
            flags: &[],
            bonuses: &[],
        },
    );
    assert_eq!(dec1.accrual, 250, "lines plus the visit bonus");
    // outside happy hours, and below the visit minimum
    let mut later = doc(&[("T", "tea", 1, "1000", Some("500"))]);
    later.occurred_at += Duration::hours(4);
    let d2 = check(
        &r,
        &later,
        &member(),
        Expect {
            lines: &[50],
            flags: &[],
            bonuses: &[],
        },
    );
    assert_eq!(d2.accrual, 50);
}

/// Issue 16, point 1, from its example: 2 × P-THIN, net 2 000 ₽, cost 1 900 ₽, with 300 points
/// (1 ₽ each) paid at the till has a base of 1 700 ₽ — 200 ₽ below cost — and earned 30 points
/// before; a line that keeps a margin after the points earns within a share of what it keeps.
#[test]
fn the_margin_cap_is_taken_after_the_points_paid() {
    let r = rules(
        "[[rules]]\nid = \"base\"\npercent = \"10\"\n[guard]\nmax_reward_share_of_margin = \"0.3\"\n\
         max_redeem_share_of_check = \"1\"\nmin_markup = \"0\"\n",
    );
    let mut d = doc(&[("P-THIN", "x", 2, "2000", Some("950"))]);
    d.points_redeemed = Points(300);
    let decision = check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[0],
            flags: &["loss_maker", "no_margin"],
            bonuses: &[],
        },
    );
    assert_eq!(decision.explanation.items[0].margin_kopecks, Some(-20_000));
    // 2 000 ₽ net, 1 000 ₽ cost, 300 points paid: 700 ₽ kept, 30 % of it = 210 ₽ ≥ 10 % of
    // the 1 700 ₽ base = 170 points: uncapped; with 900 points paid, 100 ₽ kept → 30 points
    let mut d = doc(&[("A", "x", 2, "2000", Some("500"))]);
    d.points_redeemed = Points(300);
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[170],
            flags: &[],
            bonuses: &[],
        },
    );
    d.points_redeemed = Points(900);
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[30],
            flags: &[],
            bonuses: &[],
        },
    );
}

#[test]
fn the_margin_guard_caps_every_line() {
    let r =
        rules("[[rules]]\nid = \"rich\"\npercent = \"20\"\n[guard]\nmax_reward_share_of_margin = \"0.3\"\n");
    // margin 100 ₽: 20% of 1000 = 200 > 30% of 100 = 30
    let d = check(
        &r,
        &doc(&[("A", "x", 1, "1000", Some("900"))]),
        &member(),
        Expect {
            lines: &[30],
            flags: &[],
            bonuses: &[],
        },
    );
    let item = &d.explanation.items[0];
    assert_eq!(item.capped_by, Some(170));
    assert!(
        item.cap
            .as_deref()
            .unwrap()
            .contains("max_reward_share_of_margin")
    );
    // no margin at all: nothing, flagged
    check(
        &r,
        &doc(&[
            ("A", "x", 1, "1000", Some("1000")),
            ("B", "x", 2, "300", Some("100")),
        ]),
        &member(),
        Expect {
            lines: &[0, 30],
            flags: &["no_margin"],
            bonuses: &[],
        },
    );
}

#[test]
fn unknown_cost_follows_the_named_policy_and_is_flagged() {
    let line = [("A", "x", 1, "1000", None)];
    check(
        &rules(&format!("{BASE}[guard]\nunknown_cost = \"skip\"\n")),
        &doc(&line),
        &member(),
        Expect {
            lines: &[0],
            flags: &["unknown_cost"],
            bonuses: &[],
        },
    );
    // assumed 25% margin: 30% of 250 = 75 ≥ 50, so 5% passes
    check(
        &rules(&format!(
            "{BASE}[guard]\nunknown_cost = \"assume_margin_pct\"\nassume_margin_pct = \"25\"\n"
        )),
        &doc(&line),
        &member(),
        Expect {
            lines: &[50],
            flags: &["unknown_cost"],
            bonuses: &[],
        },
    );
    // assumed 10% margin: capped to 30 points
    check(
        &rules(&format!(
            "{BASE}[guard]\nunknown_cost = \"assume_margin_pct\"\nassume_margin_pct = \"10\"\n"
        )),
        &doc(&line),
        &member(),
        Expect {
            lines: &[30],
            flags: &["unknown_cost"],
            bonuses: &[],
        },
    );
    check(
        &rules(&format!(
            "{BASE}[guard]\nunknown_cost = \"fixed_rate\"\nfixed_rate_pct = \"1\"\n"
        )),
        &doc(&line),
        &member(),
        Expect {
            lines: &[10],
            flags: &["unknown_cost"],
            bonuses: &[],
        },
    );
}

#[test]
fn exclusions_and_services_earn_nothing_and_take_no_points() {
    let r = rules(&format!(
        "{BASE}[exclusions]\nproducts = [\"GIFT\"]\ncategories = [\"tobacco\"]\n"
    ));
    let d = doc(&[
        ("GIFT", "cards", 1, "1000", Some("900")),
        ("CIG", "tobacco", 1, "1000", Some("800")),
        ("ORDER_DELIVERY", "service", 1, "340", Some("300")),
        ("A", "x", 1, "1000", Some("500")),
    ]);
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[0, 0, 0, 50],
            flags: &[],
            bonuses: &[],
        },
    );
    let q = quote(
        &r,
        &QuoteRequest {
            lines: d.lines.clone(),
            points_wanted: None,
        },
        &CustomerState {
            available: 10_000,
            ..member()
        },
    );
    assert_eq!(q.allocation[..3], [0, 0, 0]);
}

#[test]
fn rounding_is_down_per_line_at_the_kopeck_boundary() {
    let r = rules(BASE);
    check(
        &r,
        &doc(&[("A", "x", 1, "19.99", Some("1"))]),
        &member(),
        Expect {
            lines: &[0],
            flags: &[],
            bonuses: &[],
        },
    );
    check(
        &r,
        &doc(&[("A", "x", 1, "20.00", Some("1"))]),
        &member(),
        Expect {
            lines: &[1],
            flags: &[],
            bonuses: &[],
        },
    );
    check(
        &r,
        &doc(&[("A", "x", 1, "39.99", Some("1"))]),
        &member(),
        Expect {
            lines: &[1],
            flags: &[],
            bonuses: &[],
        },
    );
}

#[test]
fn points_paid_with_points_earn_nothing_and_a_loss_is_flagged() {
    let r = rules(&format!(
        "{BASE}[guard]\nmin_markup = \"0.1\"\nmax_redeem_share_of_check = \"0.5\"\n"
    ));
    let mut d = doc(&[("A", "x", 1, "1000", Some("800"))]);
    d.points_redeemed = Points(100);
    // base 900 ₽ → 45 points, within 30 % of the 100 ₽ the line keeps after the points (30)
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[30],
            flags: &[],
            bonuses: &[],
        },
    );
    d.points_redeemed = Points(200);
    // 800 paid in money = cost: no margin left after the points, so nothing is earned
    // (issue 16); below cost + 10 % by 80 ₽, lost 0
    let out = check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[0],
            flags: &["loss_maker", "no_margin"],
            bonuses: &[],
        },
    );
    assert_eq!(out.loss, Money(0));
    d.points_redeemed = Points(300);
    let out = check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[0],
            flags: &["loss_maker", "no_margin"],
            bonuses: &[],
        },
    );
    assert_eq!(out.loss, Money(10_000));
    d.points_redeemed = Points(600);
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[0],
            flags: &["loss_maker", "no_margin", "redemption_over_share"],
            bonuses: &[],
        },
    );
}

#[test]
fn tiers_multiply_upgrade_at_once_and_downgrade_after_grace() {
    let r = rules(&format!(
        "{BASE}
[tier_policy]
window_days = 365
downgrade_grace_days = 30
[[tiers]]
id = \"base\"
min_spend_kopecks = 0
[[tiers]]
id = \"silver\"
name = \"Серебряный\"
min_spend_kopecks = 3000000
earn_multiplier = \"1.25\"
discount_pct = \"3\"
"
    ));
    let silver = CustomerState {
        tier: Some("silver".into()),
        ..member()
    };
    check(
        &r,
        &doc(&[("A", "x", 1, "1000", Some("500"))]),
        &silver,
        Expect {
            lines: &[62],
            flags: &[],
            bonuses: &[],
        },
    );
    let up = tier_after_sale(&r, Some("base"), Money(3_000_000)).unwrap();
    assert_eq!(up.to.as_deref(), Some("silver"));
    assert_eq!(tier_after_sale(&r, Some("silver"), Money(3_100_000)), None);
    assert_eq!(
        tier_after_sale(&r, Some("silver"), Money(100)),
        None,
        "never downgraded by a sale"
    );
    let now = monday_morning();
    let below_since = Some(now - Duration::days(10));
    assert_eq!(
        tier_at_reevaluation(&r, Some("silver"), below_since, Money(100), now).change,
        None,
        "within grace"
    );
    let down = tier_at_reevaluation(
        &r,
        Some("silver"),
        Some(now - Duration::days(31)),
        Money(100),
        now,
    )
    .change
    .unwrap();
    assert_eq!(down.to.as_deref(), Some("base"));
}

#[test]
fn stamp_cards_reward_every_nth_item_or_visit() {
    let r = rules(&format!(
        "{BASE}
[[stamp_cards]]
id = \"coffee-card\"
every = 6
include_categories = [\"coffee\"]
reward_points = 150
[[stamp_cards]]
id = \"visits\"
every = 3
count = \"visits\"
reward_product = \"CUP\"
"
    ));
    let mut s = member();
    s.counters.insert("stamp:coffee-card".into(), Decimal::from(5));
    s.counters.insert("stamp:visits".into(), Decimal::from(2));
    let d = doc(&[
        ("K", "coffee", 2, "600", Some("150")),
        ("T", "tea", 1, "100", Some("50")),
    ]);
    let out = check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[30, 5],
            flags: &[],
            bonuses: &[("stamp:coffee-card", 150)],
        },
    );
    assert_eq!(out.vouchers, vec![("visits".to_string(), "CUP".to_string())]);
    assert!(
        out.counters
            .contains(&("stamp:coffee-card".into(), Decimal::from(2)))
    );
    s.counters.insert("stamp:coffee-card".into(), Decimal::from(0));
    check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[30, 5],
            flags: &[],
            bonuses: &[],
        },
    );
}

#[test]
fn accumulated_receipts_give_a_one_off_bonus_when_crossing() {
    let r = rules(&format!(
        "{BASE}
[[thresholds]]
id = \"10k\"
spend_kopecks = 1000000
window_days = 30
bonus_points = 200
"
    ));
    let d = doc(&[("A", "x", 1, "3000", Some("1500"))]);
    let mut s = member();
    s.counters.insert("threshold:10k".into(), Decimal::from(800_000));
    check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[150],
            flags: &[],
            bonuses: &[("threshold:10k", 200)],
        },
    );
    s.recent_awards.push("threshold:10k".into());
    check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[150],
            flags: &[],
            bonuses: &[],
        },
    );
    s.recent_awards.clear();
    s.counters
        .insert("threshold:10k".into(), Decimal::from(1_200_000));
    check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[150],
            flags: &[],
            bonuses: &[],
        },
    );
}

#[test]
fn welcome_birthday_and_velocity() {
    let r = rules(&format!(
        "{BASE}
[welcome]
first_purchase_points = 100
[birthday]
points = 300
days_before = 3
days_after = 7
[velocity]
max_sales_per_day = 2
"
    ));
    let d = doc(&[("A", "x", 1, "1000", Some("500"))]);
    let first = CustomerState {
        prior_sales: 0,
        ..member()
    };
    check(
        &r,
        &d,
        &first,
        Expect {
            lines: &[50],
            flags: &[],
            bonuses: &[("welcome:first_purchase", 100)],
        },
    );
    let busy = CustomerState {
        sales_today: 2,
        ..member()
    };
    check(
        &r,
        &d,
        &busy,
        Expect {
            lines: &[50],
            flags: &["velocity"],
            bonuses: &[],
        },
    );
    let bd = NaiveDate::from_ymd_opt(1990, 3, 5).unwrap();
    let day = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
    assert_eq!(rules::birthday_due(&r, bd, day(3, 2)), Some(2026));
    assert_eq!(rules::birthday_due(&r, bd, day(3, 12)), Some(2026));
    assert_eq!(rules::birthday_due(&r, bd, day(3, 13)), None);
    assert_eq!(rules::birthday_due(&r, bd, day(1, 1)), None);
}

#[test]
fn the_budget_caps_what_a_period_issues() {
    let r = rules(&format!(
        "{BASE}[budget]\nperiod = \"month\"\nshare_of_gross_margin = \"0.1\"\n"
    ));
    let d = doc(&[
        ("A", "x", 1, "1000", Some("500")),
        ("B", "x", 1, "1000", Some("500")),
    ]);
    // period margin so far 0 + this sale 1000 ₽ → 100 ₽ allowed; 20 ₽ issued already → 80
    let s = CustomerState {
        budget: Some(BudgetState {
            margin: Money(0),
            issued_value: Money(2000),
        }),
        ..member()
    };
    let out = check(
        &r,
        &d,
        &s,
        Expect {
            lines: &[50, 30],
            flags: &["budget_capped"],
            bonuses: &[],
        },
    );
    assert_eq!(out.accrual, 80);
    assert_eq!(r.budget_period_key(d.occurred_at).as_deref(), Some("2026-03"));
}

#[test]
fn closed_programs_and_partners() {
    let r = rules(&format!(
        "{BASE}
[[closed_programs]]
id = \"club\"
invite_codes = [\"CLUB2026\"]
membership_products = [\"CLUB-FEE\"]
[[rules]]
id = \"club-x2\"
kind = \"multiplier\"
factor = \"2\"
programs = [\"club\"]
[[partners]]
id = \"coffee-house\"
sources = [\"onec:partner\"]
"
    ));
    let d = doc(&[("A", "x", 1, "1000", Some("500"))]);
    check(
        &r,
        &d,
        &member(),
        Expect {
            lines: &[50],
            flags: &[],
            bonuses: &[],
        },
    );
    let club = CustomerState {
        memberships: vec!["club".into()],
        ..member()
    };
    check(
        &r,
        &d,
        &club,
        Expect {
            lines: &[100],
            flags: &[],
            bonuses: &[],
        },
    );
    let fee = doc(&[("CLUB-FEE", "services", 1, "500", Some("0"))]);
    let out = r.evaluate(&fee, &member(), fee.occurred_at);
    assert_eq!(out.memberships[0].0, "club");
    assert_eq!(
        rules::membership_for_invite(&r, "CLUB2026").as_deref(),
        Some("club")
    );
    let mut partner = d.clone();
    partner.source.system = "onec:partner".into();
    assert_eq!(
        r.evaluate(&partner, &member(), d.occurred_at).partner.as_deref(),
        Some("coffee-house")
    );
}

#[test]
fn quotes_stop_at_cost_plus_markup_the_check_share_and_the_balance() {
    let r = rules(&format!(
        "{BASE}[guard]\nmin_markup = \"0.1\"\nmax_redeem_share_of_check = \"0.5\"\n"
    ));
    let lines = doc(&[
        ("A", "x", 1, "1000", Some("800")),
        ("B", "x", 1, "1000", Some("200")),
    ])
    .lines;
    let rich = CustomerState {
        available: 100_000,
        ..member()
    };
    let q = quote(
        &r,
        &QuoteRequest {
            lines: lines.clone(),
            points_wanted: None,
        },
        &rich,
    );
    // A: 1000 − 880 = 120 ₽; B: 1000 − 220 = 780 ₽ → 900; half of 2000 = 1000
    assert_eq!(q.max_redeemable_points, 900);
    assert_eq!(q.allocation, vec![12_000, 78_000]);
    let poor = CustomerState {
        available: 40,
        ..member()
    };
    let q = quote(
        &r,
        &QuoteRequest {
            lines: lines.clone(),
            points_wanted: None,
        },
        &poor,
    );
    assert_eq!(
        (q.max_redeemable_points, q.limited_by.as_str()),
        (40, "the customer's available points")
    );
    let q = quote(
        &r,
        &QuoteRequest {
            lines,
            points_wanted: Some(10),
        },
        &rich,
    );
    assert_eq!(q.max_redeemable_points, 10);
}

// ---- property: the cost guard holds for any basket and any rule set ----

fn arb_rules() -> impl Strategy<Value = RuleSet> {
    (1u32..40, 0u32..=100, 0u32..50, 10u32..=100, 1u32..30, prop::option::of(1u32..5), 1i64..300)
        .prop_map(|(pct, share, markup, redeem, coffee, mult, pv)| {
            let text = format!(
                "[program]\npoint_value_kopecks = {pv}\n[guard]\nmax_reward_share_of_margin = \"{}\"\nmin_markup = \"{}\"\n\
                 max_redeem_share_of_check = \"{}\"\nunknown_cost = \"skip\"\n\
                 [[rules]]\nid = \"b\"\npercent = \"{pct}\"\n[[rules]]\nid = \"c\"\npercent = \"{coffee}\"\ninclude_categories = [\"coffee\"]\n{}",
                Decimal::new(share as i64, 2),
                Decimal::new(markup as i64, 2),
                Decimal::new(redeem as i64, 2),
                mult.map(|m| format!("[[rules]]\nid = \"m\"\nkind = \"multiplier\"\nfactor = \"{m}\"\n")).unwrap_or_default()
            );
            rules_file::parse(&text, "prop").unwrap()
        })
}

fn arb_line() -> impl Strategy<Value = Line> {
    (
        1i64..5,
        1i64..500_000,
        0i64..600_000,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(q, net, cost_total, coffee, known)| Line {
            product_id: if coffee { "K".into() } else { "T".into() },
            name: "x".into(),
            category: Some(if coffee { "coffee".into() } else { "tea".into() }),
            category_parents: Vec::new(),
            quantity: Decimal::from(q),
            // a discount of about a tenth taken at the till: net below the price
            unit_price: Money(net / q + net / q / 10),
            discount: Money((net / q / 10) * q),
            net: Money(net),
            unit_cost: known.then_some(Money(cost_total / q)),
            service: false,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_reward_or_quoted_redemption_breaks_the_cost_guard(
        r in arb_rules(),
        lines in prop::collection::vec(arb_line(), 1..8),
        redeemed in 0i64..2000,
        available in 0i64..100_000,
    ) {
        let mut d = doc(&[]);
        d.total = lines.iter().map(|l| l.net).sum();
        d.lines = lines;
        d.points_redeemed = Points(redeemed);
        let decision = r.evaluate(&d, &member(), d.occurred_at);
        let explained: i64 = decision.explanation.items.iter().map(|i| i.points).sum();
        prop_assert_eq!(explained, decision.accrual);
        prop_assert_eq!(decision.line_points.iter().sum::<i64>(), decision.accrual);
        // issue 16: the margin is what a line keeps after the points paid on it
        let paid_on = |i: usize| decision.line_redeemed.get(i).copied().unwrap_or(0);
        prop_assert!(decision.line_redeemed.iter().sum::<i64>() <= redeemed * r.point_value.0);
        for (i, (l, p)) in d.lines.iter().zip(&decision.line_points).enumerate() {
            prop_assert!(*p >= 0);
            let value = Decimal::from(*p * r.point_value.0);
            match line_margin(l).map(|m| m - paid_on(i)) {
                Some(m) if m > 0 => prop_assert!(value <= Decimal::from(m) * r.guard.max_reward_share_of_margin,
                    "line earns {} on margin after points {}", value, m),
                _ => prop_assert_eq!(*p, 0, "a line without known positive margin after points earns nothing"),
            }
        }
        let state = CustomerState { available, ..member() };
        let q = quote(&r, &QuoteRequest { lines: d.lines.clone(), points_wanted: None }, &state);
        prop_assert!(q.max_redeemable_points <= available);
        prop_assert_eq!(q.allocation.iter().sum::<i64>(), q.max_redeemable_points * r.point_value.0);
        for (l, a) in d.lines.iter().zip(&q.allocation) {
            prop_assert!(*a >= 0);
            match l.unit_cost {
                Some(c) => {
                    let cost = Decimal::from(c.mul_decimal(l.quantity).unwrap().0);
                    let floor = cost * (Decimal::ONE + r.guard.min_markup);
                    if Decimal::from(l.net.0) >= floor {
                        prop_assert!(Decimal::from(l.net.0 - a) >= floor,
                            "line {:?} with allocation {} goes below cost {}", l, a, cost);
                    } else {
                        prop_assert_eq!(*a, 0, "a line already below its floor takes no points");
                    }
                }
                None => prop_assert_eq!(*a, 0),
            }
        }
        let goods: i64 = d.lines.iter().map(|l| l.net.0).sum();
        prop_assert!(Decimal::from(q.max_redeemable_points * r.point_value.0) <= Decimal::from(goods) * r.guard.max_redeem_share_of_check);
        // a sale that pays what the quote offered: the ledger spreads it as the quote did,
        // and it is no loss-maker
        let mut followed = d.clone();
        followed.points_redeemed = Points(q.max_redeemable_points);
        let fd = r.evaluate(&followed, &state, followed.occurred_at);
        prop_assert!(!fd.flags.iter().any(|f| f.code == "loss_maker"), "{:?}", fd.flags);
        prop_assert_eq!(fd.loss.0, 0);
        if q.max_redeemable_points > 0 {
            prop_assert_eq!(&fd.line_redeemed, &q.allocation);
        }
    }
}

#[test]
fn counters_follow_what_the_sale_contributes() {
    let r = rules(&format!(
        "{BASE}
[[stamp_cards]]
id = \"c\"
every = 2
reward_points = 1
[[thresholds]]
id = \"t\"
spend_kopecks = 100
bonus_points = 1
"
    ));
    let d = doc(&[("A", "x", 3, "1000", Some("500"))]);
    let decision = r.evaluate(&d, &member(), d.occurred_at);
    let contributions: HashMap<String, i64> = r.counter_contributions(&d, &decision).into_iter().collect();
    assert_eq!(contributions["stamp:c"], 3);
    assert_eq!(contributions["threshold:t"], 100_000);
}
