//! Issue 19: the per-document path and the batch path give the same ledger. The same seeded
//! history (sales of returning customers, some paid partly with points, returns, a cashier's
//! edits, unpostings, malformed documents — `sim::sales::history`) under the shipped rules
//! file (`config/rules.toml`: tiers, thresholds, welcome bonus, budget, caps) goes into one
//! ledger a document per transaction and into another in batches, and the two are compared
//! table by table, row by row.
//!
//! What may differ, and why: the ledger's own random ids (`meta`: `ledger_uid` and the friend
//! code key; the uid is part of 1C keys, so it is masked in them), and how often a customer's
//! AmoCRM card state was queued — coalesced per transaction by design, so the per-document
//! ledger supersedes more rows. The rows still to be delivered must be the same.

mod common;

use std::collections::BTreeMap;

use common::Env;
use kopilka::core::document::Incoming;
use kopilka::ledger::Item;

const RULES: &str = include_str!("../config/rules.toml");

fn env() -> Env {
    let mut env = Env::with_rules(RULES);
    env.dest.onec_bonus = Some("onec:bonus".into());
    // the history runs from 2026-01-10 for about three days (`sim::sales::Shop`)
    env.now = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 3, 1, 12, 0, 0).unwrap();
    env
}

fn history() -> Vec<Incoming> {
    let shop = kopilka::sim::sales::Shop::generate(11, 120, 40);
    let (items, truth) = kopilka::sim::sales::history(&shop, 11, 600, 4);
    assert!(truth.returns > 5 && truth.malformed > 2, "{truth:?}");
    items
}

type Rows = Vec<Vec<String>>;

fn value(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef::*;
    match v {
        Null => "NULL".into(),
        Integer(i) => i.to_string(),
        Real(f) => f.to_string(),
        Text(t) => String::from_utf8_lossy(t).into_owned(),
        Blob(b) => format!("{b:?}"),
    }
}

/// Every table but `meta` and the outbox, every row in primary-key order, the ledger's uid
/// masked; and the outbox's rows still to be delivered, by key.
fn dump(env: &Env) -> (BTreeMap<String, Rows>, BTreeMap<String, String>) {
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let uid: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'ledger_uid'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mask = |s: String| s.replace(&uid, "UID");
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = BTreeMap::new();
    for t in tables
        .iter()
        .filter(|t| !["meta", "outbox"].contains(&t.as_str()))
    {
        let mut st = conn.prepare(&format!("SELECT * FROM {t}")).unwrap();
        let n = st.column_count();
        let mut rows: Rows = st
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| mask(value(r.get_ref(i).unwrap())))
                    .collect::<Vec<_>>())
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.sort();
        out.insert(t.clone(), rows);
    }
    let pending = env
        .ledger
        .outbox_list(&kopilka::ledger::OutboxFilter {
            state: Some(kopilka::ledger::OutboxState::Pending),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (mask(r.idem_key), mask(r.payload)))
        .collect();
    (out, pending)
}

#[test]
fn a_history_applied_document_by_document_and_in_batches_gives_the_same_ledger() {
    let items = history();
    let mut single = env();
    for inc in &items {
        single.ingest(vec![Item::Incoming(inc.clone())]);
    }
    let mut batched = env();
    batched.now = single.now;
    for chunk in items.chunks(97) {
        batched.ingest(chunk.iter().cloned().map(Item::Incoming).collect());
    }
    single.assert_verified();
    batched.assert_verified();
    let (a, a_out) = dump(&single);
    let (b, b_out) = dump(&batched);
    for (table, rows) in &a {
        let other = &b[table];
        assert_eq!(rows.len(), other.len(), "{table}: row counts differ");
        for (x, y) in rows.iter().zip(other) {
            assert_eq!(x, y, "{table}: first differing row");
        }
    }
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a["journal"].len() > 600,
        "the history moved points: {}",
        a["journal"].len()
    );
    assert!(!a["quarantine"].is_empty() && !a["document_versions"].is_empty());
    assert_eq!(a_out, b_out, "what is still to be delivered");
    assert!(a_out.keys().any(|k| k.starts_with("onec:bonus:UID:tx")));
    assert!(a_out.keys().any(|k| k.starts_with("amocrm:contact:")));
}
