//! Ledger behaviour that people rely on, one scenario per test.

mod common;

use chrono::Duration;
use common::{Env, dec, returned, reversion, sale};
use kopilka::core::document::{Incoming, Rejected, SourceRef, VoidReason};
use kopilka::core::money::Points;
use kopilka::ledger::{AdjustOutcome, AdjustRequest, DateRange, Item, LedgerError, Outcome};

#[test]
fn malformed_documents_are_quarantined_and_the_rest_of_the_batch_applies() {
    let mut env = Env::new();
    let good1 = sale("G1", Some("C1"), &[("P1", 1, 1000)]);
    let mut negative = sale("B1", Some("C1"), &[("P1", 1, 1000)]);
    negative.lines[0].quantity = dec("-2");
    let mut dollars = sale("B2", Some("C1"), &[("P1", 1, 1000)]);
    dollars.currency = "USD".into();
    let mut no_id = sale("", Some("C1"), &[("P1", 1, 1000)]);
    no_id.source.doc_id = "  ".into();
    let good2 = sale("G2", Some("C2"), &[("P2", 2, 500)]);
    let unreadable = Rejected {
        system: "onec".into(),
        doc_ref: "file.xml@1234".into(),
        reason: "Количество is not a number: \"abc\"".into(),
        location: Some("exchange/file.xml byte 1234".into()),
        excerpt: Some("<Количество>abc</Количество>".into()),
        ..Default::default()
    };
    let report = env.ingest(vec![
        Item::Incoming(Incoming::Document(good1)),
        Item::Incoming(Incoming::Document(negative.clone())),
        Item::Incoming(Incoming::Document(dollars)),
        Item::Incoming(Incoming::Document(no_id)),
        Item::Rejected(unreadable),
        Item::Incoming(Incoming::Document(good2)),
    ]);
    assert_eq!((report.applied, report.quarantined), (2, 4));
    let q = env.ledger.quarantine_list(false).unwrap();
    let reasons: Vec<&str> = q.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("quantity -2 is not positive")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown currency \"USD\"")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("missing document id")),
        "{reasons:?}"
    );
    assert!(
        q.iter()
            .any(|e| e.location.as_deref() == Some("exchange/file.xml byte 1234"))
    );
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!((s.sales_count, s.quarantined), (2, 4));
    assert_eq!(s.sales_total_kopecks, 100_000 + 100_000);

    // the same bad document again is one entry, seen twice
    env.docs(vec![negative.clone()]);
    let q = env.ledger.quarantine_list(false).unwrap();
    assert_eq!(q.len(), 4);
    assert_eq!(q.iter().find(|e| e.doc_ref == "B1").unwrap().seen_count, 2);

    // fixed in 1C: the corrected version applies and leaves quarantine
    let mut fixed = negative;
    fixed.lines[0].quantity = dec("1");
    let report = env.docs(vec![reversion(fixed)]);
    assert_eq!(report.applied, 1);
    assert_eq!(
        env.ledger
            .summary(&DateRange::default(), env.now)
            .unwrap()
            .quarantined,
        3
    );
    env.assert_verified();
}

#[test]
fn a_sale_seen_twice_counts_once_and_a_new_version_replaces_it() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 500)]);
    env.docs(vec![s1.clone()]);
    assert_eq!(env.available("C1"), 125); // 5% of 2500 rubles
    let again = env.docs(vec![s1.clone()]);
    assert_eq!(again.outcomes[0].1, Outcome::Unchanged);
    assert_eq!(env.available("C1"), 125);

    let mut edited = s1.clone();
    edited.lines.pop();
    edited.total = edited.lines.iter().map(|l| l.net).sum();
    let r = env.docs(vec![reversion(edited)]);
    assert_eq!(r.outcomes[0].1, Outcome::NewVersion);
    assert_eq!(env.available("C1"), 100);
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!((s.sales_count, s.sales_total_kopecks), (1, 200_000));
    assert_eq!((s.points_accrued, s.points_reversed), (225, 125));

    // the old version replayed is recognised as stale
    let r = env.docs(vec![s1]);
    assert_eq!(r.outcomes[0].1, Outcome::Stale);
    assert_eq!(env.available("C1"), 100);

    // unposted in 1C: the effect is reversed, the history keeps both
    let void = Incoming::Void {
        source: SourceRef {
            system: "onec".into(),
            doc_id: "S1".into(),
            version: "unposted-1".into(),
            stamp: None,
        },
        reason: VoidReason::Unposted,
    };
    let r = env.ingest(vec![Item::Incoming(void)]);
    assert_eq!(r.voided, 1);
    assert_eq!(env.available("C1"), 0);
    let (_, history) = env.ledger.history("C1").unwrap();
    assert_eq!(history.len(), 4);
    assert!(
        history
            .iter()
            .filter(|h| h.kind == "reversal")
            .all(|h| h.reverses.is_some())
    );
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!(
        (s.sales_count, s.sales_total_kopecks, s.voided_documents),
        (0, 0, 1)
    );
    env.assert_verified();
}

#[test]
fn a_return_takes_back_exactly_the_returned_lines_accrual() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 3, 1000), ("P2", 1, 777)]);
    env.docs(vec![s1.clone()]);
    // 5% of 3000 = 150, of 777 = 38.85 → 38
    assert_eq!(env.available("C1"), 188);
    env.docs(vec![returned("R1", &s1, &[("P1", 1)])]);
    assert_eq!(env.available("C1"), 138);
    env.docs(vec![returned("R2", &s1, &[("P1", 2), ("P2", 1)])]);
    assert_eq!(env.available("C1"), 0);
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!(s.returns_count, 2);
    assert_eq!(s.sales_total_kopecks, 0);
    env.assert_verified();
}

#[test]
fn a_return_after_the_points_were_spent_leaves_a_debt_the_next_accrual_repays() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 1, 2000)]);
    env.docs(vec![s1.clone()]);
    assert_eq!(env.available("C1"), 100);
    let mut s2 = sale("S2", Some("C1"), &[("P2", 1, 300)]);
    s2.points_redeemed = Points(100);
    s2.occurred_at += Duration::days(20);
    env.docs(vec![reversion(s2)]);
    assert_eq!(env.available("C1"), 0);
    // S2 earned 5% of the 200 rubles paid in money: 10 points, still pending
    env.docs(vec![returned("R1", &s1, &[("P1", 1)])]);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    // the 100 taken back: the pending 10, and 90 the customer now owes
    assert_eq!((b.available, b.pending, b.debt), (-90, 0, 90));
    let mut s3 = sale("S3", Some("C1"), &[("P3", 1, 3000)]);
    s3.occurred_at += Duration::days(21);
    env.docs(vec![reversion(s3)]);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    // S3's 150 repay the 90 first; 60 remain, pending
    assert_eq!((b.available, b.pending, b.debt), (0, 60, 0));
    env.assert_verified();
}

#[test]
fn a_return_of_a_sale_paid_with_points_gives_them_back_in_proportion() {
    let mut env = Env::new();
    env.docs(vec![sale("S0", Some("C1"), &[("P0", 1, 4000)])]);
    let mut s1 = sale("S1", Some("C1"), &[("P1", 2, 500)]);
    s1.points_redeemed = Points(100);
    s1.occurred_at += Duration::days(15);
    let s1 = reversion(s1);
    env.docs(vec![s1.clone()]);
    // 200 earned on S0, 100 spent on S1, S1 earns 5% of (1000 − 100) = 45
    assert_eq!(env.available("C1"), 145);
    env.docs(vec![returned("R1", &s1, &[("P1", 1)])]);
    // half returned: 50 points given back, 22 (of 45) taken back
    assert_eq!(env.available("C1"), 145 + 50 - 22);
    env.assert_verified();
}

#[test]
fn a_return_that_arrives_before_its_sale_is_applied_when_the_sale_comes() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000)]);
    let r = env.docs(vec![returned("R1", &s1, &[("P1", 1)])]);
    assert!(r.flags.iter().any(|(_, f)| f.code == "unlinked_return"));
    env.docs(vec![s1]);
    assert_eq!(env.available("C1"), 50);
    env.assert_verified();
}

#[test]
fn points_are_pending_through_the_return_window_then_expire() {
    let mut env = Env::new();
    env.now = common::t0() + Duration::days(1);
    env.docs(vec![sale("S1", Some("C1"), &[("P1", 1, 1000)])]);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!((b.available, b.pending), (0, 50));
    env.now = common::t0() + Duration::days(15);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!((b.available, b.pending), (50, 0));
    // burns 365 days after it became usable; warned 14 days ahead
    env.now = common::t0() + Duration::days(14 + 365 - 10);
    let b = env.ledger.balance("C1", env.now, Duration::days(14)).unwrap();
    assert_eq!(b.expiring.points, 50);
    assert_eq!(
        env.run(|l, _, c| l.expiry_warnings(c)).unwrap(),
        1,
        "warned ahead of expiry"
    );
    assert_eq!(
        env.run(|l, _, c| l.expiry_warnings(c)).unwrap(),
        0,
        "once per lot"
    );
    assert_eq!(env.expire(), 0);
    env.now = common::t0() + Duration::days(14 + 365);
    assert_eq!(env.expire(), 50);
    assert_eq!(env.expire(), 0);
    assert_eq!(env.available("C1"), 0);
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!((s.points_expired, s.points_available), (50, 0));
    env.assert_verified();
}

#[test]
fn adjustments_are_audited_and_idempotent_by_key() {
    let mut env = Env::new();
    env.docs(vec![sale("S1", Some("C1"), &[("P1", 1, 1000)])]);
    let req = AdjustRequest {
        customer: "C1".into(),
        points: 30,
        reason: "goodwill, ticket 77".into(),
        key: Some("T77".into()),
        by: "accountant".into(),
    };
    let first = env.adjust(&req).unwrap();
    assert!(matches!(first, AdjustOutcome::Applied { .. }));
    let second = env.adjust(&req).unwrap();
    assert!(matches!(second, AdjustOutcome::AlreadyApplied { .. }));
    assert_eq!(env.available("C1"), 80);
    let other = AdjustRequest {
        points: 31,
        ..req.clone()
    };
    assert!(matches!(env.adjust(&other), Err(LedgerError::KeyReused { .. })));
    let (_, h) = env.ledger.history("C1").unwrap();
    let adj = h.iter().find(|e| e.kind == "adjustment").unwrap();
    assert_eq!(adj.actor.as_deref(), Some("accountant"));
    assert!(adj.explanation.summary.contains("goodwill, ticket 77"));
    let s = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!(s.points_adjusted, 30);
    assert!(matches!(
        env.ledger.balance("C9", env.now, Duration::days(1)),
        Err(LedgerError::UnknownCustomer(_))
    ));
    env.assert_verified();
}

#[test]
fn customers_are_found_by_any_spelling_of_their_phone() {
    let mut env = Env::new();
    let mut s1 = sale("S1", None, &[("P1", 1, 1000)]);
    s1.customer.phone = kopilka::core::identity::Phone::parse("+7 (912) 345-67-89");
    env.docs(vec![reversion(s1)]);
    for spelling in ["89123456789", "8 912 345 67 89", "+79123456789", "9123456789"] {
        assert_eq!(env.available(spelling), 50, "{spelling}");
    }
}

#[test]
fn the_checkpoint_commits_with_its_documents() {
    let mut env = Env::new();
    let batch = kopilka::ledger::Batch {
        source: "onec:odata".into(),
        items: vec![Item::Incoming(Incoming::Document(sale(
            "S1",
            Some("C1"),
            &[("P1", 1, 100)],
        )))],
        checkpoint: Some("2026-03-02T10:00:00".into()),
        ..Default::default()
    };
    env.ingest_batch(batch);
    assert_eq!(
        env.ledger.checkpoint("onec:odata").unwrap().as_deref(),
        Some("2026-03-02T10:00:00")
    );
    drop(env.ledger);
    let reopened = kopilka::ledger::Ledger::open(&env.path, &Default::default()).unwrap();
    assert_eq!(
        reopened.checkpoint("onec:odata").unwrap().as_deref(),
        Some("2026-03-02T10:00:00")
    );
    assert_eq!(
        reopened
            .summary(&DateRange::default(), env.now)
            .unwrap()
            .sales_count,
        1
    );
}

/// A trigger standing in for a bug: inserting a row of `table` for which `when` holds breaks
/// a constraint. Returns a connection of its own to the ledger.
fn fail_inserts(env: &Env, table: &str, when: &str) -> rusqlite::Connection {
    let raw = rusqlite::Connection::open(&env.path).unwrap();
    raw.execute_batch(&format!(
        "CREATE TRIGGER boom BEFORE INSERT ON {table} WHEN {when} \
         BEGIN SELECT RAISE(ABORT, 'simulated constraint failure'); END;"
    ))
    .unwrap();
    raw
}

#[test]
fn a_document_that_fails_inside_the_database_is_quarantined_and_the_batch_commits() {
    let mut env = Env::new();
    // A trigger stands in for a bug: inserting this one document breaks a constraint.
    fail_inserts(&env, "documents", "NEW.doc_id = 'BOOM'");
    let r = env.docs(vec![
        sale("A", Some("C1"), &[("P1", 1, 1000)]),
        sale("BOOM", Some("C1"), &[("P1", 1, 1000)]),
        sale("B", Some("C1"), &[("P1", 1, 1000)]),
    ]);
    assert_eq!((r.applied, r.quarantined), (2, 1));
    let q = env.ledger.quarantine_list(false).unwrap();
    assert!(
        q[0].reason.contains("simulated constraint failure"),
        "{:?}",
        q[0].reason
    );
    assert_eq!(env.available("C1"), 100);
    env.assert_verified();
}

/// A batch looks up each product as lines name it once (`LineProducts`); a document that
/// fails after adding a product's key takes the key with it, so the next document naming
/// the product adds it again instead of pointing at a row that was rolled back.
#[test]
fn a_product_key_added_by_a_document_that_failed_is_not_used_by_the_next() {
    let mut env = Env::new();
    let raw = fail_inserts(&env, "document_line_rows", "NEW.quantity = '13'");
    let r = env.docs(vec![
        sale("A", Some("C1"), &[("P1", 1, 1000)]),
        sale("BOOM", Some("C1"), &[("NEW", 13, 1000)]),
        sale("B", Some("C1"), &[("NEW", 1, 1000), ("P1", 1, 1000)]),
    ]);
    assert_eq!((r.applied, r.quarantined), (2, 1));
    let named: Vec<String> = raw
        .prepare(
            "SELECT p.product_id FROM document_line_rows r JOIN documents d ON d.id = r.document_id \
             JOIN line_products p ON p.id = r.product WHERE d.doc_id = 'B' ORDER BY r.line_no",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(named, ["NEW", "P1"]);
    let keys: i64 = raw
        .query_row(
            "SELECT COUNT(*) FROM line_products WHERE product_id = 'NEW'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(keys, 1);
    env.assert_verified();
}
