//! Accounting postings: each business day's posting equals that day's journal entries to
//! the kopeck; a late correction of a past day makes an adjusting posting, never an edit.

mod common;

use std::collections::BTreeMap;

use chrono::{NaiveDate, TimeZone, Utc};
use common::{Env, returned, reversion, sale};
use kopilka::ledger::{Books, movement_of};

fn books<'a>(entities: &'a BTreeMap<String, String>) -> Books<'a> {
    Books {
        default_entity: "ООО Копилка",
        entities,
        tz: chrono_tz::Europe::Moscow,
        point_value_kopecks: 100,
        destination: Some("onec:accounting"),
    }
}

/// The journal's signed movements of one local day, summed straight from history.
fn journal_day(env: &Env, day: NaiveDate) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let tz = chrono_tz::Europe::Moscow;
    for c in ["C1", "C2"] {
        let Ok((_, entries)) = env.ledger.history(c) else {
            continue;
        };
        for e in entries {
            if e.effective_at.with_timezone(&tz).date_naive() == day
                && let Some((m, sign)) = movement_of(&e.kind)
            {
                *out.entry(m.to_string()).or_insert(0) += sign * e.points;
            }
        }
    }
    out.retain(|_, v| *v != 0);
    out
}

fn posted(env: &Env, day: NaiveDate) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for r in env.ledger.postings(day, day).unwrap() {
        for (m, v) in r.posting.points {
            *out.entry(m).or_insert(0) += v;
        }
    }
    out.retain(|_, v| *v != 0);
    out
}

#[test]
fn the_daily_posting_equals_the_journal_and_late_corrections_adjust() {
    let mut env = Env::new();
    let entities = BTreeMap::new();
    let day = |d: u32| NaiveDate::from_ymd_opt(2026, 3, d).unwrap();
    let at = |d: u32, h: u32| {
        chrono_tz::Europe::Moscow
            .with_ymd_and_hms(2026, 3, d, h, 0, 0)
            .unwrap()
            .with_timezone(&Utc)
    };
    let mut s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 333)]);
    s1.occurred_at = at(2, 10);
    let s1 = reversion(s1);
    let mut s2 = sale("S2", Some("C2"), &[("P1", 1, 2000)]);
    s2.occurred_at = at(3, 23);
    let s2 = reversion(s2);
    let mut r1 = returned("R1", &s1, &[("P1", 1)]);
    r1.occurred_at = at(4, 9);
    let r1 = reversion(r1);
    env.docs(vec![s1.clone(), s2, r1]);
    env.now = at(6, 12);
    let made = env
        .run(|l, _, c| l.post_accounting(&books(&entities), 10, c))
        .unwrap();
    assert_eq!(made.len(), 3, "{made:#?}");
    for d in [2, 3, 4, 5] {
        assert_eq!(posted(&env, day(d)), journal_day(&env, day(d)), "day {d}");
    }
    assert_eq!(posted(&env, day(2))["accrued"], 116, "5% of 2 333 ₽ line by line");
    // nothing new: nothing posted
    assert!(
        env.run(|l, _, c| l.post_accounting(&books(&entities), 10, c))
            .unwrap()
            .is_empty()
    );

    // a late correction of day 2 (the sale loses a line)
    let mut edited = s1.clone();
    edited.lines.pop();
    edited.total = kopilka::core::money::Money(edited.total.0 - 33_300);
    env.now = at(7, 12);
    env.docs(vec![reversion(edited)]);
    let made = env
        .run(|l, _, c| l.post_accounting(&books(&entities), 10, c))
        .unwrap();
    assert!(made.iter().any(|p| p.day == day(2) && p.seq == 2), "{made:#?}");
    for d in [2, 3, 4, 5, 6, 7] {
        assert_eq!(
            posted(&env, day(d)),
            journal_day(&env, day(d)),
            "day {d} after the correction"
        );
    }
    let first = &env.ledger.postings(day(2), day(2)).unwrap()[0].posting;
    assert_eq!(
        (first.seq, first.points["accrued"]),
        (1, 116),
        "the first posting is never edited"
    );
    // every posting went to the outbox for 1C, one row each, keyed by entity, day and seq
    let rows = env
        .ledger
        .outbox_list(&kopilka::ledger::OutboxFilter {
            destination: Some("onec:accounting".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), env.ledger.postings(day(1), day(30)).unwrap().len());
}
