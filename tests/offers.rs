//! Personal offers on a generated history with a planted pair: coffee buyers also take
//! honey. The pair is found and offered to coffee buyers who never bought honey; a pair
//! that would sell at a loss is never offered.

mod common;

use chrono::Duration;
use common::{Env, reversion, sale};
use kopilka::core::money::Money;
use kopilka::core::offers::Segment;

#[test]
fn the_planted_pair_is_found_and_offered_and_a_loss_maker_is_not() {
    let mut env = Env::new();
    let mut docs = Vec::new();
    let mut n = 0;
    let mut basket = |card: String, items: &[(&str, i64, Option<i64>)], days_ago: i64| {
        n += 1;
        let lines: Vec<(&str, i64, i64)> = items.iter().map(|(p, rub, _)| (*p, 1, *rub)).collect();
        let mut d = sale(&format!("S{n}"), Some(&card), &lines);
        for (l, (_, _, cost)) in d.lines.iter_mut().zip(items) {
            l.unit_cost = cost.map(|c| Money(c * 100));
        }
        d.occurred_at = common::t0() - Duration::days(days_ago);
        docs.push(reversion(d));
    };
    for i in 0..40 {
        // coffee with honey (profitable) and with "cheap-jam" (sold below cost)
        basket(
            format!("A{i}"),
            &[
                ("coffee", 800, Some(500)),
                ("honey", 600, Some(300)),
                ("cheap-jam", 100, Some(150)),
            ],
            100 + i,
        );
    }
    for i in 0..60 {
        basket(format!("B{i}"), &[("coffee", 800, Some(500))], 100 + i);
    }
    for i in 0..30 {
        basket(
            format!("C{i}"),
            &[("tea", 300, Some(100)), ("cup", 400, Some(200))],
            100 + i,
        );
    }
    // the customers we ask about
    basket("ONLY-COFFEE".into(), &[("coffee", 800, Some(500))], 5);
    basket(
        "HAS-HONEY".into(),
        &[("coffee", 800, Some(500)), ("honey", 600, Some(300))],
        5,
    );
    env.docs(docs);
    env.now = common::t0();
    let r = env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    assert_eq!(r.baskets, 132);

    let o = env.ledger.offers_for("ONLY-COFFEE", env.now).unwrap();
    assert_eq!(
        o.offers.first().map(|f| f.item.as_str()),
        Some("honey"),
        "{:#?}",
        o.offers
    );
    let honey = &o.offers[0];
    assert_eq!((honey.because.as_str(), honey.together), ("coffee", 41));
    assert!(honey.lift > rust_decimal::Decimal::ONE, "{honey:?}");
    assert!(
        o.offers.iter().all(|f| f.item != "cheap-jam"),
        "a loss-maker is never offered"
    );
    assert_eq!(o.segment, Some(Segment::New));

    let o = env.ledger.offers_for("HAS-HONEY", env.now).unwrap();
    assert!(
        o.offers.iter().all(|f| f.item != "honey"),
        "already bought recently"
    );

    // incremental: nothing new, nothing re-counted beyond the boundary second
    env.now += Duration::days(1);
    let again = env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    assert_eq!(again.baskets, 132);
    let o = env.ledger.offers_for("ONLY-COFFEE", env.now).unwrap();
    assert_eq!(o.offers[0].together, 41, "counts unchanged by a second refresh");

    // a refresh reads only the documents written or changed since the last one: new ones by
    // their id, changed ones by their time (migration 33); the documents above were written
    // at `Env`'s start, a month after t0
    env.now = common::t0() + Duration::days(31);
    env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    // a ledger from before migration 33 has no head yet: its first refresh reads by time and
    // sets the head, so the next one reads nothing
    rusqlite::Connection::open(&env.path)
        .unwrap()
        .execute("DELETE FROM meta WHERE key = 'offers_documents_head'", [])
        .unwrap();
    env.now += Duration::days(1);
    let headless = env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    assert_eq!(headless.baskets, 132);
    env.now += Duration::days(1);
    let idle = env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    assert_eq!((idle.documents, idle.baskets), (0, 132));
    env.now += Duration::days(1);
    let mut changed = sale("S1", Some("A0"), &[("coffee", 1, 800), ("honey", 1, 600)]);
    changed.lines[0].unit_cost = Some(Money(50_000));
    changed.lines[1].unit_cost = Some(Money(30_000));
    changed.occurred_at = common::t0() - Duration::days(100);
    let mut new = sale("S-NEW", Some("NEW"), &[("tea", 1, 300)]);
    new.lines[0].unit_cost = Some(Money(10_000));
    new.occurred_at = env.now - Duration::days(1);
    env.docs(vec![reversion(changed), reversion(new)]);
    env.now += Duration::days(1);
    let r = env.run(|l, _, c| l.refresh_offers(c)).unwrap();
    assert_eq!((r.documents, r.baskets), (2, 133), "S1 changed, S-NEW new");
    let o = env.ledger.offers_for("ONLY-COFFEE", env.now).unwrap();
    assert_eq!(o.offers[0].together, 41, "S1 still has coffee and honey");
    env.assert_verified();
}
