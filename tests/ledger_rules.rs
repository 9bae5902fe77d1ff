//! The rules engine inside the ledger: state that spans sales (tiers, stamp cards, spend
//! thresholds, budgets, memberships) and the nightly jobs.

mod common;

use chrono::{Duration, NaiveDate};
use common::{Env, reversion, sale};
use kopilka::core::document::{Incoming, SourceRef, VoidReason};
use kopilka::core::money::Points;
use kopilka::ledger::{CatalogItem, DateRange, Item};

const TIERS: &str = r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[tier_policy]
window_days = 365
downgrade_grace_days = 30
[[tiers]]
id = "base"
min_spend_kopecks = 0
[[tiers]]
id = "silver"
min_spend_kopecks = 500000
earn_multiplier = "2"
discount_pct = "3"
"#;

#[test]
fn a_tier_is_reached_by_spend_and_multiplies_later_sales() {
    let mut env = Env::with_rules(TIERS);
    let mut s1 = sale("S1", Some("C1"), &[("P1", 1, 3000)]);
    s1.occurred_at -= Duration::days(3);
    env.docs(vec![reversion(s1)]);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!((b.available, b.tier.as_deref()), (150, Some("base")));
    let mut s2 = sale("S2", Some("C1"), &[("P2", 1, 3000)]);
    s2.occurred_at -= Duration::days(2);
    env.docs(vec![reversion(s2)]);
    // S2 earned at the base rate, and lifted spend to 6 000 ₽: silver from now on
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!((b.available, b.tier.as_deref()), (300, Some("silver")));
    let mut s3 = sale("S3", Some("C1"), &[("P3", 1, 1000)]);
    s3.occurred_at -= Duration::days(1);
    env.docs(vec![reversion(s3)]);
    assert_eq!(env.available("C1"), 400, "silver doubles: 100 on 1 000 ₽");
    let c = env.ledger.customer_ids().unwrap()[0];
    let (tier, events) = env.ledger.tier_of(c).unwrap();
    assert_eq!(tier.as_deref(), Some("silver"));
    assert_eq!(events.len(), 2);
    assert!(events[1].reason.contains("reached"), "{:?}", events[1]);

    // a year later the spend is below the threshold: the grace starts that night, and
    // once it has passed with the spend still below, back to base
    env.now += Duration::days(400);
    assert_eq!(env.run(|l, r, c| l.reevaluate_tiers(r, c)).unwrap(), 0);
    env.now += Duration::days(30);
    assert_eq!(env.run(|l, r, c| l.reevaluate_tiers(r, c)).unwrap(), 1);
    assert_eq!(
        env.run(|l, r, c| l.reevaluate_tiers(r, c)).unwrap(),
        0,
        "idempotent"
    );
    let (tier, _) = env.ledger.tier_of(c).unwrap();
    assert_eq!(tier.as_deref(), Some("base"));
    env.assert_verified();
}

/// Issue 16, point 6: "Grace is measured from when the tier was reached, so a gold tier
/// held for a year drops the first night spend dips. Grace starts when the customer first
/// falls below the threshold."
#[test]
fn tier_grace_counts_from_the_first_night_below_the_threshold() {
    let mut env = Env::with_rules(TIERS);
    let t0 = env.now;
    let mut s1 = sale("S1", Some("C1"), &[("P1", 1, 6000)]);
    s1.occurred_at = t0 - Duration::days(3);
    env.docs(vec![reversion(s1)]);
    let c = env.ledger.customer_ids().unwrap()[0];
    let nightly = |env: &mut Env| env.run(|l, r, c| l.reevaluate_tiers(r, c)).unwrap();
    let tier = |env: &Env| env.ledger.tier_of(c).unwrap().0;
    assert_eq!(tier(&env), Some("silver".into()));

    // silver held for a year; tonight S1 has left the window and the spend dips
    let first_dip = t0 + Duration::days(370);
    env.now = first_dip;
    assert_eq!(nightly(&mut env), 0, "kept: the grace starts tonight");
    env.now = first_dip + Duration::days(5);

    // the customer comes back: 6 000 ₽ again, and the next night finds the spend recovered
    let mut s2 = sale("S2", Some("C1"), &[("P2", 1, 6000)]);
    s2.occurred_at = env.now - Duration::hours(1);
    env.docs(vec![reversion(s2)]);
    assert_eq!(nightly(&mut env), 0);
    assert_eq!(tier(&env), Some("silver".into()));

    // S2 leaves the window: a second dip, 370 days after the first one. Had the first
    // dip's clock kept running, this night would downgrade.
    let second_dip = first_dip + Duration::days(370);
    env.now = second_dip;
    assert_eq!(
        nightly(&mut env),
        0,
        "kept: the grace restarts from the second dip"
    );
    env.now = second_dip + Duration::days(29);
    assert_eq!(nightly(&mut env), 0, "a day of grace left");
    assert_eq!(tier(&env), Some("silver".into()));

    env.now = second_dip + Duration::days(30);
    assert_eq!(nightly(&mut env), 1, "still below after the grace: downgraded");
    assert_eq!(nightly(&mut env), 0, "idempotent");
    let (now_tier, events) = env.ledger.tier_of(c).unwrap();
    assert_eq!(now_tier.as_deref(), Some("base"));
    let last = events.last().unwrap();
    assert_eq!(
        (last.from.as_deref(), last.to.as_deref()),
        (Some("silver"), Some("base"))
    );
    assert!(
        last.reason.contains("below the tier threshold since"),
        "{}",
        last.reason
    );
    env.assert_verified();
}

#[test]
fn stamp_cards_count_across_sales_and_follow_unposting() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "1"
[[stamp_cards]]
id = "coffee"
every = 6
include_products = ["K"]
reward_points = 150
"#,
    );
    let mut s1 = sale("S1", Some("C1"), &[("K", 5, 100)]);
    s1.occurred_at -= Duration::days(3);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    assert_eq!(env.available("C1"), 5);
    let mut s2 = sale("S2", Some("C1"), &[("K", 1, 100)]);
    s2.occurred_at -= Duration::days(2);
    let r = env.docs(vec![reversion(s2)]);
    assert_eq!(r.applied, 1);
    assert_eq!(env.available("C1"), 5 + 1 + 150, "the sixth coffee is rewarded");
    // S1 unposted: the counter no longer holds its five coffees, a new coffee starts over
    let void = Incoming::Void {
        source: SourceRef {
            system: "onec".into(),
            doc_id: "S1".into(),
            version: "void".into(),
            stamp: None,
        },
        reason: VoidReason::Unposted,
    };
    env.ingest(vec![Item::Incoming(void)]);
    let mut s3 = sale("S3", Some("C1"), &[("K", 1, 100)]);
    s3.occurred_at -= Duration::days(1);
    env.docs(vec![reversion(s3)]);
    assert_eq!(env.available("C1"), 1 + 150 + 1);
    env.assert_verified();
}

#[test]
fn thresholds_welcome_and_enrolment_bonuses() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "1"
[[thresholds]]
id = "10k"
spend_kopecks = 1000000
window_days = 30
bonus_points = 200
[welcome]
enrolment_points = 50
first_purchase_points = 100
"#,
    );
    let mut s1 = sale("S1", Some("C1"), &[("A", 1, 6000)]);
    s1.occurred_at -= Duration::days(3);
    env.docs(vec![reversion(s1)]);
    // 60 earned + 100 first purchase (pending) + 50 for joining (usable at once)
    assert_eq!(env.available("C1"), 60 + 100 + 50);
    let mut s2 = sale("S2", Some("C1"), &[("A", 1, 5000)]);
    s2.occurred_at -= Duration::days(2);
    env.docs(vec![reversion(s2)]);
    assert_eq!(
        env.available("C1"),
        210 + 50 + 200,
        "crossing 10 000 ₽ in 30 days"
    );
    let mut s3 = sale("S3", Some("C1"), &[("A", 1, 5000)]);
    s3.occurred_at -= Duration::days(1);
    env.docs(vec![reversion(s3)]);
    assert_eq!(env.available("C1"), 460 + 50, "one-off within the window");
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!(s.points_bonus, 50 + 100 + 200);
    env.assert_verified();
}

#[test]
fn the_budget_follows_sales_in_and_out() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "10"
[budget]
period = "month"
share_of_gross_margin = "0.1"
"#,
    );
    // margin 500 ₽ per sale (cost is half): 50 ₽ of points allowed each, 100 wanted
    let s1 = sale("S1", Some("C1"), &[("A", 1, 1000)]);
    let r = env.docs(vec![s1.clone()]);
    assert!(r.flags.iter().any(|(_, f)| f.code == "budget_capped"));
    assert_eq!(env.available("C1"), 50);
    let void = Incoming::Void {
        source: SourceRef {
            system: "onec".into(),
            doc_id: "S1".into(),
            version: "void".into(),
            stamp: None,
        },
        reason: VoidReason::Unposted,
    };
    env.ingest(vec![Item::Incoming(void)]);
    // the cancelled sale's share is out of the budget again: the next sale gets the same
    env.docs(vec![sale("S2", Some("C1"), &[("B", 1, 1000)])]);
    assert_eq!(env.available("C1"), 50);
    env.assert_verified();
}

#[test]
fn negative_balance_write_off_policy_forgives_what_is_owed() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "10"
[negative_balance]
policy = "write_off"
"#,
    );
    let s1 = sale("S1", Some("C1"), &[("A", 1, 1000)]);
    env.docs(vec![s1.clone()]);
    let mut s2 = sale("S2", Some("C1"), &[("B", 1, 300)]);
    s2.points_redeemed = Points(100);
    s2.occurred_at += Duration::days(20);
    env.docs(vec![reversion(s2)]);
    env.docs(vec![common::returned("R1", &s1, &[("A", 1)])]);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!(b.debt, 0);
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert!(s.points_written_off > 0);
    assert_eq!(
        s.points_accrued - s.points_redeemed - s.points_reversed + s.points_written_off,
        s.points_available + s.points_pending
    );
    env.assert_verified();
}

#[test]
fn birthday_and_referral_bonuses_are_given_once() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "1"
[birthday]
points = 300
days_before = 3
days_after = 7
[referral]
referrer_points = 300
referee_points = 200
"#,
    );
    let mut friend = sale("S1", Some("FRIEND"), &[("A", 1, 1000)]);
    friend.occurred_at -= Duration::days(20);
    let mut referee = sale("S2", Some("NEW"), &[("A", 1, 1000)]);
    referee.customer.referred_by = Some("FRIEND".into());
    referee.customer.birthday = NaiveDate::from_ymd_opt(1990, 3, 31);
    env.docs(vec![reversion(friend), reversion(referee)]);
    // t0 = 2026-03-02; now = t0 + 30 days = 2026-04-01: birthday window (31.03 + 7 days)
    assert_eq!(env.run(|l, r, c| l.birthday_bonuses(r, c)).unwrap(), 1);
    assert_eq!(
        env.run(|l, r, c| l.birthday_bonuses(r, c)).unwrap(),
        0,
        "once a year"
    );
    // the referee's first purchase (t0) is past the 14-day window
    assert_eq!(env.run(|l, r, c| l.referral_bonuses(r, c)).unwrap(), 1);
    assert_eq!(env.run(|l, r, c| l.referral_bonuses(r, c)).unwrap(), 0, "once");
    assert_eq!(env.available("NEW"), 10 + 300 + 200);
    assert_eq!(env.available("FRIEND"), 10 + 300);
    env.assert_verified();
}

#[test]
fn invite_codes_and_partners() {
    let mut env = Env::with_rules(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[[closed_programs]]
id = "club"
invite_codes = ["CLUB2026"]
[[rules]]
id = "club-x2"
kind = "multiplier"
factor = "2"
programs = ["club"]
[[partners]]
id = "coffee-house"
sources = ["onec:partner"]
"#,
    );
    let mut s1 = sale("S1", Some("C1"), &[("A", 1, 1000)]);
    s1.customer.invite_code = Some("CLUB2026".into());
    env.docs(vec![reversion(s1)]);
    assert_eq!(env.available("C1"), 100);
    let mut p = sale("P1", Some("C2"), &[("A", 1, 1000)]);
    p.source.system = "onec:partner".into();
    env.docs(vec![reversion(p)]);
    let totals = env
        .ledger
        .partner_totals(&DateRange::default(), kopilka::core::money::Money(100))
        .unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(
        (totals[0].partner.as_str(), totals[0].points_issued),
        ("coffee-house", 50)
    );
    // settled in money at the point value: the partner owes the program the points it issued
    assert_eq!(
        (
            totals[0].issued_kopecks,
            totals[0].redeemed_kopecks,
            totals[0].net_kopecks
        ),
        (5_000, 0, 5_000)
    );

    // the settlement posting for the period: once, then only what changed
    let entities = std::collections::BTreeMap::new();
    let books = kopilka::ledger::Books {
        default_entity: "Организация",
        entities: &entities,
        tz: chrono_tz::Europe::Moscow,
        point_value_kopecks: 100,
        destination: Some("onec:accounting"),
        history: kopilka::ledger::HistoryPosting::Opening,
    };
    let (first, last) = (
        NaiveDate::from_ymd_opt(2000, 1, 1).unwrap(),
        NaiveDate::from_ymd_opt(2030, 12, 31).unwrap(),
    );
    let now = env.now;
    let made = env
        .ledger
        .post_partner_settlement(&books, first, last, now)
        .unwrap();
    assert_eq!(made.len(), 1, "{made:#?}");
    assert_eq!(made[0].partner.as_deref(), Some("coffee-house"));
    assert_eq!(made[0].kind, kopilka::ledger::PostingKind::Settlement);
    assert_eq!(made[0].points.get("partner_issued"), Some(&50), "{made:#?}");
    assert!(
        env.ledger
            .post_partner_settlement(&books, first, last, now)
            .unwrap()
            .is_empty(),
        "the same period again posts nothing"
    );
    let mut p2 = sale("P2", Some("C3"), &[("A", 1, 2000)]);
    p2.source.system = "onec:partner".into();
    env.docs(vec![reversion(p2)]);
    let made = env
        .ledger
        .post_partner_settlement(&books, first, last, now)
        .unwrap();
    assert_eq!(made.len(), 1, "{made:#?}");
    assert_eq!(
        (made[0].seq, made[0].points.get("partner_issued")),
        (2, Some(&100))
    );
    let rows = env
        .ledger
        .outbox_list(&kopilka::ledger::OutboxFilter {
            destination: Some("onec:accounting".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 2, "each settlement posting goes to 1C");
    // the daily books still mirror the journal alone: no partner movement in them
    let daily = env
        .ledger
        .postings(first, last)
        .unwrap()
        .into_iter()
        .filter(|p| p.posting.kind != kopilka::ledger::PostingKind::Settlement)
        .count();
    assert_eq!(daily, 0);
    env.assert_verified();
}

/// A broken catalog (1C exchanges can arrive half-written, a group moved under its own
/// child) must not hang a sale: the path stops at a loop and at 64 groups.
#[test]
fn a_loop_or_an_endless_chain_of_parent_groups_ends_the_path() {
    let mut env = Env::with_rules(TIERS);
    let group = |id: String, name: String, parent: String| CatalogItem::Group {
        id,
        name,
        parent: Some(parent),
    };
    let product = |id: &str, group: &str| CatalogItem::Product {
        id: id.into(),
        name: id.into(),
        article: None,
        group: Some(group.into()),
        service: false,
        deleted: false,
    };
    let mut items = vec![
        group("g-beans".into(), "beans".into(), "g-coffee".into()),
        group("g-coffee".into(), "coffee".into(), "g-beans".into()),
        product("P-LOOP", "g-beans"),
    ];
    for i in 0..100 {
        items.push(group(
            format!("g{i}"),
            format!("level {i}"),
            format!("g{}", i + 1),
        ));
    }
    items.push(product("P-DEEP", "g0"));
    env.ledger.upsert_catalog(&items, env.now).unwrap();

    let mut doc = sale("S1", Some("C1"), &[("P-LOOP", 1, 100), ("P-DEEP", 1, 100)]);
    env.ledger.complete_from_catalog(&mut doc, None).unwrap();
    let (looped, deep) = (&doc.lines[0], &doc.lines[1]);
    assert_eq!(looped.category.as_deref(), Some("beans"));
    assert_eq!(looped.category_parents, ["coffee"]);
    assert_eq!(deep.category.as_deref(), Some("level 0"));
    assert_eq!(deep.category_parents.len(), 63, "64 groups in all");
    assert_eq!(deep.category_parents.last().map(String::as_str), Some("level 63"));
}
