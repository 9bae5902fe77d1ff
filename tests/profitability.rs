//! Issue 16 ("Profitable by construction, for real"), tried the way the issue's shop owner
//! tried it: a rules file with event bonuses, sales and returns through the ledger. Each test
//! is written from the issue's numbered example.

mod common;

use chrono::Duration;
use common::{Env, returned, reversion, sale};
use kopilka::core::document::{Incoming, SourceRef, VoidReason};
use kopilka::core::money::Points;
use kopilka::ledger::Item;

/// The issue's program: per-check `visit` points, a 150-point stamp reward, a 200-point
/// threshold bonus and a 100-point first-purchase bonus, on top of 5 %.
const EVENTS: &str = r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[[rules]]
id = "visit"
kind = "fixed_per_check"
points = 10
[[stamp_cards]]
id = "coffee"
every = 3
include_products = ["K"]
reward_points = 150
[[thresholds]]
id = "5k"
spend_kopecks = 500000
window_days = 30
bonus_points = 200
[welcome]
first_purchase_points = 100
"#;

/// Point 2: buy, collect every event bonus, return everything — nothing is left.
#[test]
fn a_full_return_takes_back_every_reward_the_sale_caused() {
    let mut env = Env::with_rules(EVENTS);
    let mut s1 = sale("S1", Some("C1"), &[("K", 3, 1000), ("A", 1, 3000)]);
    s1.occurred_at -= Duration::days(3);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    // 5 % of 6 000 ₽ = 300, visit 10, stamp reward 150, threshold 200, first purchase 100
    assert_eq!(env.available("C1"), 300 + 10 + 150 + 200 + 100);

    let r1 = returned("R1", &s1, &[("K", 3), ("A", 1)]);
    env.docs(vec![r1]);
    assert_eq!(env.available("C1"), 0, "no event bonus survives a full return");

    let (_, history) = env.ledger.history("C1").unwrap();
    let reasons: Vec<String> = history
        .iter()
        .filter(|e| e.kind == "reversal")
        .map(|e| e.explanation.summary.clone())
        .collect();
    for words in [
        "per-check points: the whole check was returned",
        "stamp card coffee: 0 of the sale's stamps are left on a card it found at 0",
        "below the threshold",
        "first-purchase bonus: the first purchase was returned in full",
    ] {
        assert!(
            reasons
                .iter()
                .any(|r| r.contains(words) && r.contains("N-R1") && r.contains("N-S1")),
            "{words:?} not among {reasons:#?}"
        );
    }
    env.assert_verified();

    // buying again does not pay the first-purchase bonus a second time
    let mut s2 = sale("S2", Some("C1"), &[("A", 1, 1000)]);
    s2.occurred_at -= Duration::days(1);
    env.docs(vec![reversion(s2)]);
    assert_eq!(env.available("C1"), 50 + 10);
    env.assert_verified();
}

/// Point 2, proportionally: a partial return keeps what still holds — the visit, the
/// first purchase — and takes the stamp and threshold rewards whose condition fell.
#[test]
fn a_partial_return_takes_back_only_the_rewards_whose_condition_fell() {
    let mut env = Env::with_rules(EVENTS);
    let mut s1 = sale("S1", Some("C1"), &[("K", 3, 1000), ("A", 1, 3000)]);
    s1.occurred_at -= Duration::days(3);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    assert_eq!(env.available("C1"), 760);

    // one coffee back: 2 stamps of 3 (reward gone), spend 5 000 ₽ (threshold holds)
    env.docs(vec![returned("R1", &s1, &[("K", 1)])]);
    assert_eq!(env.available("C1"), 760 - 50 - 150);
    // the article back: spend 2 000 ₽ < 5 000 ₽, the threshold bonus goes too
    env.docs(vec![returned("R2", &s1, &[("A", 1)])]);
    assert_eq!(env.available("C1"), 560 - 150 - 200);
    // visit and first purchase stay while two coffees remain sold
    assert_eq!(env.available("C1"), 100 + 10 + 100);
    env.assert_verified();

    // a new coffee fills the card again: the reward is earned again, once
    let mut s2 = sale("S2", Some("C1"), &[("K", 1, 1000)]);
    s2.occurred_at -= Duration::days(1);
    env.docs(vec![reversion(s2)]);
    assert_eq!(env.available("C1"), 210 + 50 + 10 + 150);
    env.assert_verified();
}

/// Point 2: the policy is named in the rules file; `goods_only` keeps the old behaviour.
#[test]
fn the_clawback_policy_is_named_in_the_rules_file() {
    let mut env = Env::with_rules(&format!("{EVENTS}\n[returns]\nclawback = \"goods_only\"\n"));
    let mut s1 = sale("S1", Some("C1"), &[("K", 3, 1000), ("A", 1, 3000)]);
    s1.occurred_at -= Duration::days(3);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    env.docs(vec![returned("R1", &s1, &[("K", 3), ("A", 1)])]);
    assert_eq!(env.available("C1"), 10 + 150 + 200 + 100);
    env.assert_verified();
}

/// Point 2: a voided sale takes its bonuses with it, and un-voiding the return gives back
/// exactly what it took (the return's effects are one value, reversed as one).
#[test]
fn voids_take_everything_back_and_a_voided_return_restores_it() {
    let mut env = Env::with_rules(EVENTS);
    let mut s1 = sale("S1", Some("C1"), &[("K", 3, 1000), ("A", 1, 3000)]);
    s1.occurred_at -= Duration::days(3);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    env.docs(vec![returned("R1", &s1, &[("K", 3), ("A", 1)])]);
    assert_eq!(env.available("C1"), 0);
    let void = |id: &str| {
        Item::Incoming(Incoming::Void {
            source: SourceRef {
                system: "onec".into(),
                doc_id: id.into(),
                version: "void".into(),
                stamp: None,
            },
            reason: VoidReason::Unposted,
        })
    };
    env.ingest(vec![void("R1")]);
    assert_eq!(
        env.available("C1"),
        760,
        "the return unposted: everything it took is back"
    );
    env.ingest(vec![void("S1")]);
    assert_eq!(
        env.available("C1"),
        0,
        "the sale unposted: nothing it caused is left"
    );
    env.assert_verified();
}

/// Point 3: a sale that pays exactly what the quote offered is never a loss-maker, and the
/// ledger puts the points on the lines where the quote put them.
#[test]
fn a_sale_that_follows_its_quote_is_never_a_loss_maker() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "0.5"
min_markup = "0.05"
max_redeem_share_of_check = "0.9"
[[rules]]
id = "base"
percent = "5"
"#,
    );
    // enough points to pay with
    let mut s0 = sale("S0", Some("C1"), &[("A", 10, 2000)]);
    s0.occurred_at -= Duration::days(40);
    env.docs(vec![reversion(s0)]);
    let have = env.available("C1");
    assert!(have > 477, "{have}");
    // a thin line (net 1 000, cost 950) and a fat one (net 1 000, cost 500)
    let mut s1 = sale("S1", Some("C1"), &[("THIN", 1, 1000), ("FAT", 1, 1000)]);
    s1.lines[0].unit_cost = Some(kopilka::core::money::Money(95_000));
    let rules = env.rules.clone();
    let customer = kopilka::core::program::CustomerState {
        customer_id: Some(1),
        available: have,
        ..Default::default()
    };
    let q = kopilka::core::rules::quote(
        &rules,
        &kopilka::core::rules::QuoteRequest {
            lines: s1.lines.clone(),
            points_wanted: Some(477),
        },
        &customer,
    );
    assert_eq!(q.max_redeemable_points, 477);
    // the thin line can take 1 000 − 950 × 1.05 = 2.50 ₽: the quote keeps it at its floor
    assert_eq!(q.allocation.iter().sum::<i64>(), 47_700);
    assert!(q.allocation[0] <= 250, "{:?}", q.allocation);
    s1.points_redeemed = Points(477);
    s1.occurred_at -= Duration::days(1);
    let s1 = reversion(s1);
    let report = env.docs(vec![s1]);
    assert!(
        !report.flags.iter().any(|(_, f)| f.code == "loss_maker"),
        "{:?}",
        report.flags
    );
    let losers = env.ledger.loss_makers(10).unwrap();
    assert!(losers.is_empty(), "{losers:?}");
    env.assert_verified();
}

// ---- property: after every sale is returned or voided, only what no sale caused is left ----

use kopilka::core::money::Money;
use kopilka::ledger::AdjustRequest;
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Program {
    percent: u32,
    share_pct: u32,
    visit: i64,
    stamps: Option<(u32, i64)>,
    threshold: Option<(i64, i64)>,
    first_purchase: i64,
}

impl Program {
    fn text(&self) -> String {
        let mut t = format!(
            "[guard]\nmax_reward_share_of_margin = \"{}\"\nmin_markup = \"0.05\"\n\
             [[rules]]\nid = \"base\"\npercent = \"{}\"\n",
            rust_decimal::Decimal::new(i64::from(self.share_pct), 2),
            self.percent
        );
        if self.visit > 0 {
            t += &format!(
                "[[rules]]\nid = \"visit\"\nkind = \"fixed_per_check\"\npoints = {}\n",
                self.visit
            );
        }
        if let Some((every, points)) = self.stamps {
            t += &format!(
                "[[stamp_cards]]\nid = \"k\"\nevery = {every}\ninclude_products = [\"K\"]\nreward_points = {points}\n"
            );
        }
        if let Some((spend, bonus)) = self.threshold {
            t += &format!(
                "[[thresholds]]\nid = \"t\"\nspend_kopecks = {}\nwindow_days = 60\nbonus_points = {bonus}\n",
                spend * 100
            );
        }
        t += &format!("[welcome]\nfirst_purchase_points = {}\n", self.first_purchase);
        t
    }
}

fn arb_program() -> impl Strategy<Value = Program> {
    (
        1u32..20,
        30u32..=100,
        0i64..30,
        prop::option::of((2u32..5, 10i64..200)),
        prop::option::of((1000i64..20_000, 10i64..300)),
        0i64..150,
    )
        .prop_map(
            |(percent, share_pct, visit, stamps, threshold, first_purchase)| Program {
                percent,
                share_pct,
                visit,
                stamps,
                threshold,
                first_purchase,
            },
        )
}

/// (product, quantity, price in rubles, cost as a percent of price)
type ArbLine = (usize, i64, i64, i64);

#[derive(Clone, Copy, Debug)]
enum Undo {
    Return,
    ReturnInTwo,
    Void,
}

fn arb_undo() -> impl Strategy<Value = Undo> {
    prop_oneof![Just(Undo::Return), Just(Undo::ReturnInTwo), Just(Undo::Void)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_reward_survives_the_return_or_void_of_every_sale(
        program in arb_program(),
        sales in prop::collection::vec(
            (prop::collection::vec((0usize..3, 1i64..4, 50i64..3000, 20i64..120), 1..4), 0u32..=100, any::<bool>(), arb_undo()),
            1..5,
        ),
        opening in 1i64..500,
        order in Just((0..4usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let mut env = Env::with_rules(&program.text());
        let products = ["K", "A", "B"];
        let mut docs = Vec::new();
        for (n, (lines, redeem_pct, follow_quote, undo)) in sales.iter().enumerate() {
            // one line per product, as 1C's returns are matched by product
            let mut seen = std::collections::HashSet::new();
            let lines: Vec<ArbLine> = lines.iter().copied().filter(|l| seen.insert(l.0)).collect();
            let spec: Vec<(&str, i64, i64)> = lines.iter().map(|&(p, q, rub, _)| (products[p], q, rub)).collect();
            let mut s = sale(&format!("S{n}"), Some("C1"), &spec);
            for (l, &(_, q, rub, cost_pct)) in s.lines.iter_mut().zip(&lines) {
                l.unit_cost = Some(Money(rub * cost_pct));
                // a discount taken at the till: net below the price
                l.discount = Money(l.unit_price.0 * q / 20);
                l.net = Money(l.unit_price.0 * q - l.discount.0);
            }
            s.total = s.lines.iter().map(|l| l.net).sum();
            s.occurred_at -= Duration::days(50 - n as i64 * 5);
            let have = if n == 0 { 0 } else { env.available("C1").max(0) };
            let wanted = have * i64::from(*redeem_pct) / 100;
            let paid = if *follow_quote {
                let q = kopilka::core::rules::quote(
                    &env.rules,
                    &kopilka::core::rules::QuoteRequest { lines: s.lines.clone(), points_wanted: Some(wanted) },
                    &kopilka::core::program::CustomerState { customer_id: Some(1), available: have, ..Default::default() },
                );
                q.max_redeemable_points
            } else {
                wanted
            };
            s.points_redeemed = Points(paid);
            let s = reversion(s);
            let report = env.docs(vec![s.clone()]);
            prop_assert_eq!(report.applied, 1, "{:?}", report);
            if *follow_quote {
                prop_assert!(
                    !report.flags.iter().any(|(_, f)| f.code == "loss_maker"),
                    "a quote-following sale is a loss-maker: {:?}", report.flags
                );
            }
            docs.push((s, *undo));
        }
        env.adjust(&AdjustRequest {
            customer: "C1".into(),
            points: opening,
            reason: "opening balance".into(),
            key: Some("opening".into()),
            by: "test".into(),
        })
        .unwrap();
        // undone in any order: an earlier sale's return changes what a later one's rewards rest on
        for n in order.into_iter().filter(|n| *n < docs.len()) {
            let (s, undo) = &docs[n];
            let all: Vec<(&str, i64)> = s
                .lines
                .iter()
                .map(|l| (l.product_id.as_str(), rust_decimal::prelude::ToPrimitive::to_i64(&l.quantity).unwrap()))
                .collect();
            match undo {
                Undo::Return => {
                    env.docs(vec![returned(&format!("R{n}"), s, &all)]);
                }
                Undo::ReturnInTwo => {
                    let (first, rest) = all.split_at(all.len() / 2);
                    let mut r1 = returned(&format!("R{n}a"), s, first);
                    r1.occurred_at += Duration::hours(1);
                    if !first.is_empty() {
                        env.docs(vec![reversion(r1)]);
                    }
                    env.docs(vec![returned(&format!("R{n}b"), s, rest)]);
                }
                Undo::Void => {
                    env.ingest(vec![Item::Incoming(Incoming::Void {
                        source: SourceRef {
                            system: "onec".into(),
                            doc_id: s.source.doc_id.clone(),
                            version: "void".into(),
                            stamp: None,
                        },
                        reason: VoidReason::Unposted,
                    })]);
                }
            }
        }
        let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
        prop_assert_eq!(
            // `available` is net of any debt (Σ lots − debt)
            b.available + b.pending + b.held,
            opening,
            "left after undoing every sale: {:?}", b
        );
        env.assert_verified();
    }
}

/// Point 7: `simulate`'s "current rules" replay is the ledger's own figure for the period,
/// sale by sale, when the ledger took the sales in date order; where it cannot be (a sale
/// recorded after a later one), the difference is named with its cause.
#[test]
fn the_replay_of_the_rules_in_force_is_what_the_ledger_issued() {
    let rules = format!(
        "{EVENTS}\n[tier_policy]\nwindow_days = 365\n[[tiers]]\nid = \"base\"\nmin_spend_kopecks = 0\n\
         [[tiers]]\nid = \"gold\"\nmin_spend_kopecks = 1000000\nearn_multiplier = \"2\"\n"
    );
    let mut env = Env::with_rules(&rules);
    let mut n = 0;
    let mut next = |card: &str, lines: &[(&str, i64, i64)], days_ago: i64| {
        n += 1;
        let mut s = sale(&format!("S{n}"), Some(card), lines);
        s.occurred_at -= Duration::days(days_ago);
        reversion(s)
    };
    let in_order = vec![
        next("C1", &[("K", 2, 500), ("A", 1, 2000)], 90),
        next("C2", &[("K", 1, 500)], 80),
        next("C1", &[("K", 2, 500)], 70),
        next("C1", &[("A", 3, 2500)], 60),
        next("C2", &[("A", 1, 6000)], 50),
        next("C1", &[("K", 1, 500), ("A", 1, 900)], 40),
    ];
    for s in &in_order {
        env.docs(vec![s.clone()]);
    }
    let replay = |env: &Env, from: Option<chrono::DateTime<chrono::Utc>>| {
        let mut sales = Vec::new();
        env.ledger
            .for_each_sale(&kopilka::ledger::DateRange::default(), |s| sales.push(s))
            .unwrap();
        kopilka::core::simulate::simulate(&env.rules, sales, from)
    };
    let all = kopilka::ledger::DateRange::default();
    let ledger = env.ledger.issued_figures(&all).unwrap();
    let current = replay(&env, None);
    assert!(ledger.on_sales > 0);
    assert_eq!(current.points_issued, ledger.on_sales);
    for (id, points) in &current.issued_by_sale {
        assert_eq!(ledger.by_sale[id], *points, "sale row {id}");
    }
    // a period of the last 65 days: the sales before it build the state (C1's first
    // purchase, stamps, gold tier) and are not counted
    let from = common::t0() - Duration::days(65);
    let period = kopilka::ledger::DateRange {
        from: Some(from),
        to: None,
    };
    let ledger = env.ledger.issued_figures(&period).unwrap();
    let current = replay(&env, Some(from));
    assert_eq!(current.sales, 3);
    assert_eq!(current.points_issued, ledger.on_sales);

    // a sale 1C sends late, dated before C1's last one: the ledger evaluated it on a state
    // the replay in date order does not have, and says so
    let late = next("C1", &[("K", 1, 500)], 45);
    env.docs(vec![late]);
    let ledger = env.ledger.issued_figures(&period).unwrap();
    assert!(!ledger.out_of_order.is_empty());
    let current = replay(&env, Some(from));
    let differing: Vec<i64> = current
        .issued_by_sale
        .iter()
        .filter(|(id, p)| ledger.by_sale[id] != *p)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        !differing.is_empty(),
        "the late sale changes what the replay gives"
    );
    assert!(
        differing.iter().all(|id| ledger.out_of_order.contains(id)),
        "{differing:?} vs {:?}",
        ledger.out_of_order
    );
}

/// Point 4, from the issue's example: a line already 66.08 ₽ below cost by its price, with
/// a few points paid on it, books to the program only what the points took; the pricing
/// loss is listed apart; both lists add up to their headlines and name the line.
#[test]
fn the_program_books_only_the_loss_its_points_caused() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "0.5"
min_markup = "0.05"
[[rules]]
id = "base"
percent = "5"
"#,
    );
    let mut s0 = sale("S0", Some("C1"), &[("X", 10, 2000)]);
    s0.occurred_at -= Duration::days(40);
    env.docs(vec![reversion(s0)]);
    // A: net 400.00, cost 466.08 (66.08 below cost by price); B: net 900.00, cost 880.00
    let mut s1 = sale("S1", Some("C1"), &[("A", 1, 400), ("B", 1, 900)]);
    s1.lines[0].unit_cost = Some(Money(46_608));
    s1.lines[1].unit_cost = Some(Money(88_000));
    s1.lines[0].name = "Шоколад №174".into();
    s1.points_redeemed = Points(13);
    s1.occurred_at -= Duration::days(1);
    let report = env.docs(vec![reversion(s1)]);
    // no line can take points down to its floor: the till took them anyway, spread by net
    assert!(
        report.flags.iter().any(|(_, f)| f.code == "loss_maker"),
        "{:?}",
        report.flags
    );
    let r = env
        .ledger
        .program_report(&kopilka::ledger::DateRange::default(), env.now, 100)
        .unwrap();
    // 13 ₽ over 400 : 900 → 4.00 ₽ on A, all of it below cost; B stays above cost
    assert_eq!((r.loss_maker_sales, r.loss_maker_kopecks), (1, 400));
    assert_eq!(r.loss_lines.total_kopecks, r.loss_maker_kopecks);
    assert_eq!(r.loss_lines.lines.len(), 1);
    let line = &r.loss_lines.lines[0];
    assert_eq!((line.loss_kopecks, line.points_paid_kopecks), (400, 400));
    assert_eq!(line.name.as_deref(), Some("Шоколад №174"));
    assert!(
        line.title(chrono_tz::Europe::Moscow)
            .starts_with("Продажа N-S1 от "),
        "{}",
        line.title(chrono_tz::Europe::Moscow)
    );
    // the pricing loss: A's 66.08 ₽, not the program's
    assert_eq!(r.pricing_loss.total_kopecks, 6_608);
    assert_eq!(r.pricing_loss.lines[0].loss_kopecks, 6_608);
    env.assert_verified();
}
