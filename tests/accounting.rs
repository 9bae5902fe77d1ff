//! Accounting postings: each business day's posting equals that day's journal entries to
//! the kopeck; a late correction of a past day makes an adjusting posting, never an edit.

mod common;

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use common::{Env, returned, reversion, sale};
use kopilka::ledger::{Books, DiffKind, HistoryPosting, PostingKind, movement_of};

fn books<'a>(entities: &'a BTreeMap<String, String>) -> Books<'a> {
    Books {
        default_entity: "ООО Копилка",
        entities,
        tz: chrono_tz::Europe::Moscow,
        point_value_kopecks: 100,
        destination: Some("onec:accounting"),
        history: HistoryPosting::Opening,
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

/// A year of sales (and returns of some) imported at once, the way a backfill arrives.
fn a_year(env: &mut Env) -> Vec<kopilka::core::document::Document> {
    let tz = chrono_tz::Europe::Moscow;
    let first = NaiveDate::from_ymd_opt(2025, 11, 1).unwrap();
    let mut docs = Vec::new();
    for i in 0..365i64 {
        let d = first + chrono::Duration::days(i);
        if d.weekday() == chrono::Weekday::Sun {
            continue; // the shop is closed: a day without movements
        }
        let mut s = sale(
            &format!("Y{i}"),
            Some(&format!("C{}", i % 7)),
            &[("P1", 1 + i % 3, 400 + i), ("P2", 1, 90)],
        );
        s.occurred_at = tz
            .from_local_datetime(&d.and_hms_opt(11 + (i % 9) as u32, 0, 0).unwrap())
            .unwrap()
            .with_timezone(&Utc);
        let s = reversion(s);
        if i % 11 == 0 {
            docs.push(reversion(returned(&format!("YR{i}"), &s, &[("P2", 1)])));
        }
        docs.push(s);
    }
    // the backfill arrives the day after the year: no document lies in kopilka's future
    env.now = tz
        .from_local_datetime(
            &NaiveDate::from_ymd_opt(2026, 11, 2)
                .unwrap()
                .and_hms_opt(2, 0, 0)
                .unwrap(),
        )
        .unwrap()
        .with_timezone(&Utc);
    env.docs(docs.clone());
    docs
}

/// Every business day with movements is carried by a posting: its own, or the history
/// posting of the days before the window; and the books hold the journal's total.
fn assert_books_hold_everything(env: &Env, books: &Books<'_>, today: NaiveDate) {
    let first = NaiveDate::from_ymd_opt(2025, 11, 1).unwrap();
    let yesterday = today.pred_opt().unwrap();
    let postings = env
        .ledger
        .postings(first - chrono::Duration::days(1), today)
        .unwrap();
    let mut total_posted: BTreeMap<String, i64> = BTreeMap::new();
    for p in &postings {
        for (m, v) in &p.posting.points {
            *total_posted.entry(m.clone()).or_default() += v;
        }
    }
    let mut total_journal: BTreeMap<String, i64> = BTreeMap::new();
    let mut day = first;
    let mut moving_days = 0;
    while day <= yesterday {
        let moved = env.ledger.day_movements(books, day).unwrap();
        let moved: BTreeMap<String, i64> = moved.into_values().flatten().filter(|(_, v)| *v != 0).collect();
        if !moved.is_empty() {
            moving_days += 1;
            assert!(
                postings
                    .iter()
                    .any(|p| p.posting.first_day <= day && day <= p.posting.last_day),
                "{day} moved {moved:?} and no posting carries it"
            );
        }
        for (m, v) in moved {
            *total_journal.entry(m).or_default() += v;
        }
        day = day.succ_opt().unwrap();
    }
    assert!(moving_days > 300, "{moving_days}");
    total_posted.retain(|_, v| *v != 0);
    total_journal.retain(|_, v| *v != 0);
    assert_eq!(
        total_posted, total_journal,
        "the books hold the journal to the point"
    );
}

#[test]
fn a_year_imported_at_once_reaches_the_books_and_reconciles_clean() {
    for history in [HistoryPosting::Opening, HistoryPosting::Daily] {
        let mut env = Env::new();
        let entities = BTreeMap::new();
        let books = Books {
            history,
            ..books(&entities)
        };
        let docs = a_year(&mut env);
        let today = NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
        env.now = chrono_tz::Europe::Moscow
            .from_local_datetime(&today.and_hms_opt(3, 0, 0).unwrap())
            .unwrap()
            .with_timezone(&Utc);
        let year = (
            NaiveDate::from_ymd_opt(2025, 11, 1).unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
        );
        // before any posting: every day with movements is a difference, and says so
        let r = env.ledger.reconcile(year.0, year.1, &books, today, None).unwrap();
        let unposted = r
            .differences
            .iter()
            .filter(|d| d.kind == DiffKind::NotPosted)
            .count();
        assert!(unposted > 300, "{history:?}: {unposted} days reported unposted");
        assert_eq!(unposted, r.differences.len(), "{:#?}", &r.differences[..3]);

        let made = env.run(|l, _, c| l.post_accounting(&books, 35, c)).unwrap();
        match history {
            HistoryPosting::Opening => {
                let opening: Vec<_> = made.iter().filter(|p| p.kind == PostingKind::History).collect();
                assert_eq!(opening.len(), 1, "one opening posting per entity: {made:#?}");
                assert_eq!(opening[0].first_day, year.0);
                assert_eq!(opening[0].last_day, today - chrono::Duration::days(36));
                assert_eq!(
                    opening[0].day, opening[0].last_day,
                    "dated the day before the window"
                );
                assert!(made.len() <= 36, "{}", made.len());
            }
            HistoryPosting::Daily => {
                assert!(made.iter().all(|p| p.kind == PostingKind::Day));
                assert!(made.len() > 300, "a posting per business day: {}", made.len());
            }
        }
        assert_books_hold_everything(&env, &books, today);
        let r = env.ledger.reconcile(year.0, year.1, &books, today, None).unwrap();
        assert!(r.clean(), "{history:?}: {:#?}", r.differences);
        let books_of = |d: NaiveDate| r.days.iter().find(|x| x.day == d).unwrap().books.clone();
        assert_eq!(books_of(year.1), "", "a Sunday: nothing moved");
        let saturday = year.1.pred_opt().unwrap();
        assert_eq!(
            books_of(saturday),
            "posted",
            "a day in the window has its own posting"
        );
        let old = NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
        let expected = match history {
            HistoryPosting::Opening => "history",
            HistoryPosting::Daily => "posted",
        };
        assert_eq!(books_of(old), expected);

        // a return of a January sale arrives late: the old day changes, and the books follow
        // with a history posting of the difference; the January posting is never edited
        let january = docs
            .iter()
            .find(|d| d.source.doc_id == "Y70")
            .expect("a January sale");
        let mut late = returned("LATE", january, &[("P1", 1)]);
        late.occurred_at = january.occurred_at + chrono::Duration::hours(2);
        env.docs(vec![reversion(late)]);
        let r = env.ledger.reconcile(year.0, year.1, &books, today, None).unwrap();
        let not_posted: Vec<_> = r
            .differences
            .iter()
            .filter(|d| d.kind == DiffKind::NotPosted)
            .collect();
        assert_eq!(not_posted.len(), 1, "{history:?}: {:#?}", r.differences);
        assert_eq!(r.differences.len(), 1, "{:#?}", r.differences);
        let made = env.run(|l, _, c| l.post_accounting(&books, 35, c)).unwrap();
        assert_eq!(made.len(), 1, "{made:#?}");
        assert_eq!(made[0].kind, PostingKind::History);
        assert!(made[0].adjusting() || history == HistoryPosting::Daily);
        assert!(made[0].points["reversed"] > 0, "{made:#?}");
        assert_books_hold_everything(&env, &books, today);
        assert!(
            env.run(|l, _, c| l.post_accounting(&books, 35, c))
                .unwrap()
                .is_empty(),
            "nothing new: nothing posted"
        );
    }
}

#[test]
fn the_summary_identity_holds_with_debt_for_any_period() {
    let mut env = Env::new();
    let at = |d: u32| {
        chrono_tz::Europe::Moscow
            .with_ymd_and_hms(2026, 3, d, 12, 0, 0)
            .unwrap()
            .with_timezone(&Utc)
    };
    let mut s1 = sale("D1", Some("C1"), &[("P1", 2, 1000)]);
    s1.occurred_at = at(1);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    // the points are spent, then the sale that earned them is returned: a debt
    let mut s2 = sale("D2", Some("C1"), &[("P1", 1, 1000)]);
    s2.occurred_at = at(20);
    s2.points_redeemed = kopilka::core::money::Points(100);
    env.docs(vec![reversion(s2)]);
    let mut r1 = returned("DR1", &s1, &[("P1", 2)]);
    r1.occurred_at = at(22);
    env.docs(vec![reversion(r1)]);
    let all = env
        .ledger
        .summary(&kopilka::ledger::DateRange::default(), env.now)
        .unwrap();
    assert!(all.points_debt > 0, "{all:?}");
    assert_eq!(
        all.identity_left(),
        all.points_pending + all.points_available,
        "{all:?}"
    );
    for (from, to) in [(2, 21), (21, 31), (1, 2)] {
        let range = kopilka::ledger::DateRange {
            from: Some(at(from)),
            to: Some(at(to)),
        };
        let s = env.ledger.summary(&range, env.now).unwrap();
        assert_eq!(
            s.identity_left(),
            s.points_pending + s.points_available,
            "{from}..{to}: {s:?}"
        );
    }
}
