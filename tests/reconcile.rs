//! Reconciliation on a generated period: clean when the ledger holds what the source holds;
//! with planted faults (a missing document, a changed one, a quarantined one, a dead
//! letter) each is listed with the document causing it.

mod common;

use chrono::{NaiveDate, TimeZone, Utc};
use common::{Env, reversion, sale};
use kopilka::ledger::{Books, DiffKind, HistoryPosting, SourceDoc};

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, d).unwrap()
}

fn at(d: u32, h: u32) -> chrono::DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .with_ymd_and_hms(2026, 3, d, h, 0, 0)
        .unwrap()
        .with_timezone(&Utc)
}

/// The books of these tests; the source's side is under test, not the postings, so the
/// period is reconciled as of its first day (no day due for posting yet) unless a test posts.
fn books(entities: &std::collections::BTreeMap<String, String>) -> Books<'_> {
    Books {
        default_entity: "ООО Копилка",
        entities,
        tz: chrono_tz::Europe::Moscow,
        point_value_kopecks: 100,
        destination: Some("onec:accounting"),
        history: HistoryPosting::Opening,
    }
}

fn period(env: &mut Env) -> Vec<kopilka::core::document::Document> {
    let mut docs = Vec::new();
    for i in 0..30u32 {
        let mut s = sale(
            &format!("S{i}"),
            Some(&format!("C{}", i % 4)),
            &[("P1", 1 + i as i64 % 3, 500), ("P2", 1, 120)],
        );
        s.occurred_at = at(2 + i % 5, 10 + i % 8);
        docs.push(reversion(s));
    }
    env.docs(docs.clone());
    docs
}

fn truth_of(docs: &[kopilka::core::document::Document]) -> Vec<SourceDoc> {
    docs.iter()
        .map(|d| SourceDoc {
            source: d.source.system.clone(),
            doc_id: d.source.doc_id.clone(),
            version: d.source.version.clone(),
            kind: Some(d.kind.as_str().to_string()),
            occurred_at: Some(d.occurred_at),
            total: d.total.0,
            in_force: true,
            number: d.number.clone(),
            source_kind: None,
        })
        .collect()
}

#[test]
fn a_clean_period_reconciles_with_equal_sums() {
    let mut env = Env::new();
    let docs = period(&mut env);
    let entities = std::collections::BTreeMap::new();
    for truth in [None, Some(truth_of(&docs))] {
        let r = env
            .ledger
            .reconcile(day(1), day(8), &books(&entities), day(1), truth.as_deref())
            .unwrap();
        assert!(r.clean(), "{:#?}", r.differences);
        for d in &r.days {
            assert_eq!(d.source_total_kopecks, d.ledger_total_kopecks, "{d:?}");
            assert_eq!(d.source_documents, d.ledger_sales + d.ledger_returns, "{d:?}");
        }
        assert_eq!(r.days.iter().map(|d| d.ledger_sales).sum::<i64>(), 30);
    }
}

#[test]
fn planted_faults_are_each_listed_with_their_document() {
    let mut env = Env::new();
    let docs = period(&mut env);
    let entities = std::collections::BTreeMap::new();
    let mut truth = truth_of(&docs);
    // 1. a sale 1C has that never reached the ledger (entered back-dated, say)
    let mut missing = sale("LATE", Some("C1"), &[("P1", 1, 999)]);
    missing.occurred_at = at(4, 12);
    truth.extend(truth_of(&[reversion(missing)]));
    // 2. a sale edited in 1C after it was posted
    truth[3].version = "edited-in-1c".into();
    // 3. a sale that arrived malformed
    let mut bad = sale("BAD", Some("C2"), &[("P1", 1, 100)]);
    bad.occurred_at = at(5, 9);
    bad.currency = "USD".into();
    let bad = reversion(bad);
    env.docs(vec![bad.clone()]);
    truth.extend(truth_of(&[bad]));
    // 4. a bonus document 1C refused for good: the movement of the period's first sale (this
    // ledger queues none itself; a key of the form rows had before migration 9)
    let tx: i64 = rusqlite::Connection::open(&env.path)
        .unwrap()
        .query_row("SELECT MIN(id) FROM journal", [], |r| r.get(0))
        .unwrap();
    let key = format!("onec:bonus:tx{tx}");
    let id = env
        .ledger
        .outbox_enqueue("onec:bonus", &key, None, "{}", at(3, 12))
        .unwrap()
        .unwrap();
    env.ledger
        .outbox_mark_failed(id, "500 -1 Не удалось провести документ", None, at(3, 12))
        .unwrap();
    let r = env
        .ledger
        .reconcile(day(1), day(8), &books(&entities), day(1), Some(&truth))
        .unwrap();
    let found: Vec<(DiffKind, &str)> = r
        .differences
        .iter()
        .map(|d| (d.kind, d.document.as_str()))
        .collect();
    assert!(found.contains(&(DiffKind::MissingInLedger, "LATE")), "{found:?}");
    assert!(
        found.contains(&(DiffKind::ChangedAfterPosting, docs[3].source.doc_id.as_str())),
        "{found:?}"
    );
    assert!(found.contains(&(DiffKind::Quarantined, "BAD")), "{found:?}");
    assert!(
        found.contains(&(DiffKind::DeadLettered, key.as_str())),
        "{found:?}"
    );
    assert_eq!(r.differences.len(), 4, "{:#?}", r.differences);
    assert!(!r.clean());
    // a sale deleted in 1C but still in force in the ledger
    let gone: Vec<SourceDoc> = truth_of(&docs).into_iter().skip(1).collect();
    let r = env
        .ledger
        .reconcile(day(1), day(8), &books(&entities), day(1), Some(&gone))
        .unwrap();
    assert!(
        r.differences
            .iter()
            .any(|d| d.kind == DiffKind::NotInSource && d.document == docs[0].source.doc_id)
    );
    // a bonus document that names no movement can only come from a damaged ledger: the
    // reconciliation lists 1C's documents by their movement's day, `ledger verify` names it —
    // in the key form of every era (before migration 9, before 26, since)
    let uid = env.ledger.ledger_uid().unwrap();
    let orphans = [
        "onec:bonus:tx999999".to_string(),
        format!("onec:bonus:{uid}:tx999998"),
        "b:999997".to_string(),
    ];
    for key in &orphans {
        env.ledger
            .outbox_enqueue("onec:bonus", key, None, "{}", at(3, 12))
            .unwrap()
            .unwrap();
    }
    let v = env.ledger.verify().unwrap();
    for key in &orphans {
        assert!(
            v.iter()
                .any(|v| v.check == "every bonus document names a journal transaction"
                    && v.detail.contains(&format!("({key})"))),
            "{key}: {v:?}"
        );
    }
    assert_eq!(v.len(), orphans.len(), "{v:?}");
}

#[test]
fn a_quarantined_sale_is_a_difference_of_its_own_month_named_as_1c_shows_it() {
    let mut env = Env::new();
    let entities = std::collections::BTreeMap::new();
    let books = books(&entities);
    period(&mut env);
    let today = env.now.with_timezone(&chrono_tz::Europe::Moscow).date_naive();
    env.run(|l, _, c| l.post_accounting(&books, 35, c)).unwrap();
    let march = (day(1), day(31));
    let r = env
        .ledger
        .reconcile(march.0, march.1, &books, today, None)
        .unwrap();
    assert!(r.clean(), "{:#?}", r.differences);

    // a sale of 5 March that 1C sent unreadable arrives on 1 April
    let unreadable = kopilka::core::document::Rejected {
        system: "onec".into(),
        doc_ref: "7d3f0c52-0000-4000-8000-000000000777".into(),
        reason: "line 2: Количество \"два\" is not a number".into(),
        location: Some("documents.xml@1234".into()),
        excerpt: None,
        kind: Some("ЧекККМ".into()),
        number: Some("ЧК-000777".into()),
        occurred_at: Some(at(5, 15)),
    };
    env.ingest(vec![kopilka::ledger::Item::Rejected(unreadable)]);
    let r = env
        .ledger
        .reconcile(march.0, march.1, &books, today, None)
        .unwrap();
    assert!(!r.clean(), "the month misses a sale");
    assert_eq!(r.differences.len(), 1, "{:#?}", r.differences);
    let d = &r.differences[0];
    assert_eq!((d.kind, d.day), (DiffKind::Quarantined, Some(day(5))));
    assert_eq!(
        d.title,
        "ЧекККМ ЧК-000777 от 05.03.2026 (onec:7d3f0c52-0000-4000-8000-000000000777)"
    );
    assert!(d.detail.contains("Количество"), "{d:?}");
    // the day it arrived is not where it belongs
    let april = env
        .ledger
        .reconcile(day(31), day(31) + chrono::Duration::days(1), &books, today, None)
        .unwrap();
    assert!(april.clean(), "{:#?}", april.differences);

    // fixed in 1C and read again: the month is clean once the day is posted again
    let mut fixed = sale(
        "7d3f0c52-0000-4000-8000-000000000777",
        Some("C1"),
        &[("P1", 2, 700)],
    );
    fixed.number = Some("ЧК-000777".into());
    fixed.occurred_at = at(5, 15);
    env.docs(vec![reversion(fixed)]);
    let r = env
        .ledger
        .reconcile(march.0, march.1, &books, today, None)
        .unwrap();
    assert!(
        r.differences.iter().all(|d| d.kind == DiffKind::NotPosted),
        "only the books lag: {:#?}",
        r.differences
    );
    assert_eq!(r.differences.len(), 1, "{:#?}", r.differences);
    env.run(|l, _, c| l.post_accounting(&books, 35, c)).unwrap();
    let r = env
        .ledger
        .reconcile(march.0, march.1, &books, today, None)
        .unwrap();
    assert!(r.clean(), "{:#?}", r.differences);
}
