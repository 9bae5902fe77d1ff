//! Issue 19, "store less": the compact forms the ledger now writes (explanations under short
//! keys, a bonus document's outbox row as a reference to its journal transaction, only the
//! versions a document left in `document_versions`), and a ledger written in the previous
//! forms migrated in place with nothing a person sees changed and `ledger verify` clean.

mod common;

use common::*;
use kopilka::core::journal::{Explanation, ExplanationItem, LineFacts};
use kopilka::core::money::Money;
use kopilka::core::rules::margin_of;
use kopilka::ledger::{Ledger, OpenOptions, OutboxFilter, Outcome};

/// What a person can see of the ledger: every customer's history and balance, and every
/// outbox row with the payload its consumer reads.
fn visible(l: &Ledger, env_now: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
    let mut out = Vec::new();
    for c in ["C1", "C2"] {
        let (_, entries) = l.history(c).unwrap();
        let b = l.balance(c, env_now, chrono::Duration::days(14)).unwrap();
        out.push(serde_json::json!({"history": entries, "available": b.available, "pending": b.pending}));
    }
    let rows = l.outbox_list(&OutboxFilter::default()).unwrap();
    let rows: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!([r.id, r.destination, r.idem_key, r.state, r.payload]))
        .collect();
    out.push(serde_json::json!(rows));
    // reconcile against what the sources said at ingest (files cannot be asked again)
    let entities = std::collections::BTreeMap::new();
    let books = kopilka::ledger::Books {
        default_entity: "ООО Копилка",
        entities: &entities,
        tz: chrono_tz::Europe::Moscow,
        point_value_kopecks: 100,
        destination: Some("onec:accounting"),
        history: kopilka::ledger::HistoryPosting::Opening,
    };
    let day = t0().date_naive();
    let r = l.reconcile(day, day, &books, day, None).unwrap();
    assert_eq!(r.truth, "recorded at ingest");
    out.push(serde_json::json!([r.days, r.differences]));
    serde_json::json!(out)
}

/// Every posting in its transaction's order: (transaction, account, customer, lot, amount).
type Posting = (i64, String, Option<i64>, Option<i64>, i64);

fn postings(conn: &rusqlite::Connection) -> Vec<Posting> {
    conn.prepare("SELECT tx_id, account, customer_id, lot_id, amount FROM postings ORDER BY tx_id, leg")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The first column of every row a query gives.
fn column<T: rusqlite::types::FromSql>(conn: &rusqlite::Connection, sql: &str) -> Vec<T> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Every version kept as text, in every table that keeps one (a content hash is kept as its
/// bytes since migration 31).
const TEXT_VERSIONS: &str = "SELECT version FROM documents WHERE typeof(version) != 'blob' UNION ALL \
     SELECT version FROM document_versions WHERE typeof(version) != 'blob' UNION ALL \
     SELECT version FROM source_log WHERE typeof(version) != 'blob'";

/// 1C unposts `d`: a void under a version of the source's own (text, not a content hash).
fn unpost(env: &mut Env, d: &kopilka::core::document::Document) {
    use kopilka::core::document::{Incoming, VoidReason};
    let mut unposted = d.source.clone();
    unposted.version = "unposted-1".into();
    env.ingest(vec![kopilka::ledger::Item::Incoming(Incoming::Void {
        source: unposted,
        reason: VoidReason::Unposted,
    })]);
}

/// Every line as `document_lines` shows it, each column as text.
fn lines(conn: &rusqlite::Connection) -> Vec<String> {
    column(
        conn,
        "SELECT concat_ws('|', document_id, line_no, product_id, name, category, quantity, unit_price, \
         discount, net, unit_cost, service, points, redeemed) FROM document_lines ORDER BY document_id, line_no",
    )
}

/// Every journal entry that names a rule, with the rule's name.
fn bonus_rules(conn: &rusqlite::Connection) -> Vec<(i64, String)> {
    conn.prepare("SELECT j.id, n.name FROM journal j JOIN rule_names n ON n.id = j.rule_id ORDER BY j.id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn with_bonus_documents() -> Env {
    let mut env = Env::new();
    env.dest.onec_bonus = Some("onec:bonus".into());
    env
}

#[test]
fn a_bonus_document_row_stores_a_reference_and_reads_whole() {
    let mut env = with_bonus_documents();
    env.docs(vec![sale("S1", Some("C1"), &[("P1", 2, 1000)])]);
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let stored: String = conn
        .query_row(
            "SELECT payload FROM outbox WHERE destination = 'onec:bonus'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(stored.len() < 80, "{stored}");
    let rows = env
        .ledger
        .outbox_list(&OutboxFilter {
            destination: Some("onec:bonus".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 1);
    let p: serde_json::Value = serde_json::from_str(&rows[0].payload).unwrap();
    assert_eq!(p["kind"], "accrual");
    assert_eq!(p["points"], 100);
    assert_eq!(
        p["amount_kopecks"], 10_000,
        "1 point = 1 ruble under the test rules"
    );
    assert_eq!(p["card"], "C1");
    assert_eq!(p["document"]["doc_id"], "S1");
    assert_eq!(p["document"]["number"], "N-S1");
    assert!(p["expires_at"].is_string(), "{p}");
    assert!(!p["comment"].as_str().unwrap().is_empty(), "{p}");
    // the row as the delivery reads it, and the row by id
    assert_eq!(
        env.ledger.outbox_show(rows[0].id).unwrap().payload,
        rows[0].payload
    );
    let due = env.ledger.outbox_due("onec:bonus", 10, env.now).unwrap();
    assert_eq!(due[0].payload, rows[0].payload);
    // the reference under the long names a version before wrote reads the same
    let short: serde_json::Value = serde_json::from_str(&stored).unwrap();
    // a one-ruble point is not written (`v` 100 when it is)
    assert!(short.get("v").is_none(), "{stored}");
    let long = serde_json::json!({"tx_id": short["t"], "point_value": 100, "register": short["r"]});
    assert!(stored.len() < long.to_string().len(), "{stored}");
    conn.execute(
        "UPDATE outbox SET payload = ?1 WHERE destination = 'onec:bonus'",
        [long.to_string()],
    )
    .unwrap();
    assert_eq!(
        env.ledger.outbox_show(rows[0].id).unwrap().payload,
        rows[0].payload
    );
}

#[test]
fn only_the_versions_a_document_left_are_kept() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 500)]);
    env.docs(vec![s1.clone(), sale("S2", Some("C2"), &[("P1", 1, 1000)])]);
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let count = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("SELECT COUNT(*) FROM document_versions", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        count(&conn),
        0,
        "a document's one version is in `documents` alone"
    );
    let logged: i64 = conn
        .query_row("SELECT COUNT(*) FROM source_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        logged, 0,
        "what the source said of an applied document is the document"
    );
    let mut edited = s1.clone();
    edited.lines.pop();
    edited.total = edited.lines.iter().map(|l| l.net).sum();
    let edited = reversion(edited);
    assert_eq!(env.docs(vec![edited.clone()]).outcomes[0].1, Outcome::NewVersion);
    let kept: (String, String) = conn
        .query_row(
            // a content hash is kept as its bytes (migration 31)
            "SELECT CASE typeof(version) WHEN 'blob' THEN 'sha256:' || lower(hex(version)) ELSE version END, \
             action FROM document_versions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(kept, (s1.source.version.clone(), "applied".into()));
    // both versions are recognised: the current one unchanged, the left one stale
    assert_eq!(env.docs(vec![edited]).outcomes[0].1, Outcome::Unchanged);
    assert_eq!(env.docs(vec![s1]).outcomes[0].1, Outcome::Stale);
    assert_eq!(env.available("C1"), 100);
    env.assert_verified();
}

/// A ledger as the previous schema (22) wrote it: every version of a document in
/// `document_versions`, explanations under their long keys, bonus documents' payloads whole.
/// Built by writing with today's code and turning each compact form back into the old one
/// (the facts are the same; only their form differs), then opened by today's kopilka.
#[test]
fn a_ledger_in_the_previous_forms_migrates_in_place() {
    // the shipped rules: a welcome bonus, so the journal names a rule
    let mut env = Env::with_rules(include_str!("../config/rules.toml"));
    env.dest.onec_bonus = Some("onec:bonus".into());
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 500)]);
    env.docs(vec![s1.clone(), sale("S2", Some("C2"), &[("P1", 3, 700)])]);
    let mut edited = s1.clone();
    edited.lines.pop();
    edited.total = edited.lines.iter().map(|l| l.net).sum();
    env.docs(vec![reversion(edited)]);
    // a document the ledger could not take: what its source said stays in `source_log`
    let mut bad = sale("BAD", Some("C2"), &[("P1", 1, 100)]);
    bad.currency = "USD".into();
    assert!(matches!(
        env.docs(vec![reversion(bad)]).outcomes[0].1,
        Outcome::Quarantined(_)
    ));
    // a sale unposted in 1C: void, its version the source's own word, not a content hash
    let s3 = reversion(sale("S3", Some("C1"), &[("P1", 1, 300)]));
    env.docs(vec![s3.clone()]);
    unpost(&mut env, &s3);
    // one bonus document delivered, the others pending
    let due = env.ledger.outbox_due("onec:bonus", 1, env.now).unwrap();
    env.ledger.outbox_mark_delivered(&[due[0].id], env.now).unwrap();
    env.assert_verified();
    let now = env.now;
    let before = visible(&env.ledger, now);
    let rendered: Vec<(i64, String)> = env
        .ledger
        .outbox_list(&OutboxFilter {
            destination: Some("onec:bonus".into()),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.payload))
        .collect();
    assert!(
        rendered.len() >= 3,
        "accruals, and the reversal of the edited sale"
    );
    let path = env.path.clone();
    let Env {
        dir: _dir, ledger, ..
    } = env;
    drop(ledger);

    let conn = rusqlite::Connection::open(&path).unwrap();
    // schema 35 kept a document's counter shares in a table of their own, keyed by document
    kopilka::ledger::counters::register(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE counter_rows_35 (
             document_id INTEGER NOT NULL REFERENCES documents(id),
             counter INTEGER NOT NULL REFERENCES counter_names(id), amount INTEGER NOT NULL, prior INTEGER,
             PRIMARY KEY (document_id, counter)) WITHOUT ROWID;
         INSERT INTO counter_rows_35 SELECT c.document_id, n.id, c.amount, c.prior
             FROM document_counters c JOIN counter_names n ON n.name = c.counter;
         DROP VIEW document_counters;
         DROP INDEX documents_customer;
         ALTER TABLE documents DROP COLUMN counters;
         ALTER TABLE documents DROP COLUMN counter_priors;
         CREATE INDEX documents_customer ON documents(customer_id, occurred_at, kind_code, applied, total);
         ALTER TABLE counter_rows_35 RENAME TO document_counter_rows;
         CREATE VIEW document_counters AS
             SELECT c.document_id, n.name AS counter, c.amount, c.prior
             FROM document_counter_rows c JOIN counter_names n ON n.id = c.counter;",
    )
    .unwrap();
    let lines_before = lines(&conn);
    conn.execute(
        "INSERT OR IGNORE INTO document_versions (document_id, version, seen_at, action) \
         SELECT id, version, first_seen_at, 'applied' FROM documents",
        [],
    )
    .unwrap();
    let explanations: Vec<(i64, Vec<u8>, Option<i64>)> = conn
        .prepare("SELECT id, explanation, document_id FROM journal")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (id, packed, document) in explanations {
        // the old form spelled out what the explanation now leaves to the document's lines
        let line = |n: u32| {
            conn.query_row(
                "SELECT product_id, net, points, quantity, unit_cost, redeemed FROM document_lines \
                 WHERE document_id = ?1 AND line_no = ?2",
                rusqlite::params![document, n],
                |r| {
                    let net: i64 = r.get(1)?;
                    let quantity: String = r.get(3)?;
                    let unit_cost: Option<i64> = r.get(4)?;
                    let paid: Option<i64> = r.get(5)?;
                    Ok(LineFacts {
                        product: r.get(0)?,
                        net,
                        points: r.get(2)?,
                        margin: margin_of(Money(net), quantity.parse().unwrap(), unit_cost.map(Money))
                            .map(|m| m - paid.unwrap_or(0)),
                    })
                },
            )
            .ok()
        };
        let long = serde_json::to_string(&Explanation::from_packed_with(&packed, line)).unwrap();
        assert!(long.contains("\"summary\""));
        conn.execute(
            "UPDATE journal SET explanation = ?2 WHERE id = ?1",
            rusqlite::params![id, long],
        )
        .unwrap();
    }
    for (id, payload) in &rendered {
        conn.execute(
            "UPDATE outbox SET payload = ?2 WHERE id = ?1",
            rusqlite::params![id, payload],
        )
        .unwrap();
    }
    conn.execute(
        "INSERT OR IGNORE INTO source_log (source, doc_id, version, kind, occurred_at, total, in_force, seen_at) \
         SELECT source, doc_id, version, kind, occurred_at, total, state = 'active', updated_at FROM documents",
        [],
    )
    .unwrap();
    // schema 27's journal named a bonus's rule by its text (rebuilt: a column under a foreign
    // key cannot be dropped, so foreign keys are off while it is; the journal's kept-totals
    // triggers go with the old table, as the ones below do anyway)
    // schema 29's lines stored every net
    conn.execute_batch(
        "CREATE TABLE line_rows_29 (
             document_id INTEGER NOT NULL REFERENCES documents(id), line_no INTEGER NOT NULL,
             product INTEGER NOT NULL REFERENCES line_products(id), quantity TEXT NOT NULL,
             unit_price INTEGER NOT NULL, discount INTEGER NOT NULL, net INTEGER NOT NULL,
             unit_cost INTEGER, service INTEGER NOT NULL, points INTEGER NOT NULL DEFAULT 0,
             redeemed INTEGER, PRIMARY KEY (document_id, line_no)) WITHOUT ROWID;
         INSERT INTO line_rows_29 SELECT l.document_id, l.line_no, l.product, l.quantity, l.unit_price,
             l.discount, v.net, l.unit_cost, l.service, l.points, l.redeemed
             FROM document_line_rows l JOIN document_lines v USING (document_id, line_no);
         DROP VIEW document_lines;
         DROP TABLE document_line_rows;
         ALTER TABLE line_rows_29 RENAME TO document_line_rows;
         CREATE VIEW document_lines AS
             SELECT l.document_id, l.line_no, p.product_id, p.name, p.category, l.quantity, l.unit_price,
                    l.discount, l.net, l.unit_cost, l.service, l.points, l.redeemed
             FROM document_line_rows l JOIN line_products p ON p.id = l.product;",
    )
    .unwrap();
    // schema 28's postings named their account by its word
    conn.execute_batch(
        "CREATE TABLE postings_28 (
             tx_id INTEGER NOT NULL REFERENCES journal(id), leg INTEGER NOT NULL,
             account TEXT NOT NULL, customer_id INTEGER REFERENCES customers(id),
             lot_id INTEGER REFERENCES lots(id), amount INTEGER NOT NULL,
             PRIMARY KEY (tx_id, leg)) WITHOUT ROWID;
         INSERT INTO postings_28 SELECT tx_id, leg, account, customer_id, lot_id, amount FROM postings;
         DROP VIEW postings;
         DROP TABLE posting_rows;
         ALTER TABLE postings_28 RENAME TO postings;
         CREATE INDEX postings_lot ON postings(lot_id) WHERE lot_id IS NOT NULL;",
    )
    .unwrap();
    let rules_before = bonus_rules(&conn);
    assert!(!rules_before.is_empty(), "a bonus was given");
    // schemas before 32 stored an entry's kind and role, and a document's kind and state, as
    // words (both tables rebuilt below, in those forms)
    let journal_27 = "CREATE TABLE journal_27 (
        id           INTEGER PRIMARY KEY,
        kind         TEXT NOT NULL CHECK (kind IN
                       ('accrual','redemption','reversal','expiry','adjustment','opening','bonus','writeoff')),
        role         TEXT NOT NULL CHECK (role IN ('effect','cancel')),
        customer_id  INTEGER NOT NULL REFERENCES customers(id),
        document_id  INTEGER REFERENCES documents(id),
        epoch        INTEGER,
        reverses     INTEGER REFERENCES journal(id),
        amount       INTEGER NOT NULL,
        effective_at INTEGER NOT NULL,
        recorded_at  INTEGER NOT NULL,
        explanation  TEXT NOT NULL,
        actor        TEXT,
        idem_key     TEXT UNIQUE,
        partner      TEXT,
        rule         TEXT)";
    let kinds_before: Vec<String> = column(&conn, "SELECT kind || ':' || role FROM journal ORDER BY id");
    let states_before: Vec<String> = column(
        &conn,
        "SELECT COALESCE(kind, '-') || ':' || state FROM documents ORDER BY id",
    );
    assert!(
        states_before.iter().any(|s| s.ends_with(":void")),
        "{states_before:?}"
    );
    assert!(
        kinds_before.iter().any(|s| s.ends_with(":cancel")),
        "{kinds_before:?}"
    );
    let outbox_before: Vec<String> = column(&conn, "SELECT state FROM outbox ORDER BY id");
    assert!(
        outbox_before.iter().any(|s| s == "delivered"),
        "{outbox_before:?}"
    );
    assert!(outbox_before.iter().any(|s| s == "pending"), "{outbox_before:?}");
    conn.execute_batch(
        "DROP TRIGGER totals_outbox_insert;
         DROP TRIGGER totals_outbox_update;
         DROP TRIGGER totals_outbox_delete;
         DROP INDEX outbox_due;
         DROP INDEX outbox_due_bonus;
         DROP INDEX outbox_coalesce;
         DROP INDEX outbox_dead_coalesce;
         DROP INDEX outbox_dead;
         DROP INDEX outbox_notify_open;
         ALTER TABLE outbox ADD COLUMN state_31 TEXT NOT NULL DEFAULT 'pending';
         UPDATE outbox SET state_31 = state;
         ALTER TABLE outbox DROP COLUMN state;
         ALTER TABLE outbox DROP COLUMN state_code;
         ALTER TABLE outbox RENAME COLUMN state_31 TO state;
         CREATE INDEX outbox_due ON outbox(destination, next_attempt_at) WHERE state = 'pending';
         CREATE INDEX outbox_coalesce ON outbox(destination, coalesce_key)
             WHERE state = 'pending' AND coalesce_key IS NOT NULL;
         CREATE INDEX outbox_dead_coalesce ON outbox(destination, coalesce_key, updated_at)
             WHERE state = 'dead' AND coalesce_key IS NOT NULL;
         CREATE INDEX outbox_dead ON outbox(id) WHERE state = 'dead';
         CREATE INDEX outbox_notify_open ON outbox(destination, state)
             WHERE destination LIKE 'notify:%' AND state != 'delivered';",
    )
    .unwrap();
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF;
         CREATE TABLE documents_31 (
             id INTEGER PRIMARY KEY, source TEXT NOT NULL, doc_id TEXT NOT NULL, version TEXT NOT NULL,
             stamp INTEGER, kind TEXT CHECK (kind IN ('sale','return')),
             state TEXT NOT NULL CHECK (state IN ('active','void')), void_reason TEXT,
             epoch INTEGER NOT NULL DEFAULT 0, applied INTEGER NOT NULL DEFAULT 0, number TEXT,
             occurred_at INTEGER, customer_id INTEGER REFERENCES customers(id), currency TEXT,
             total INTEGER NOT NULL DEFAULT 0, points_redeemed INTEGER NOT NULL DEFAULT 0,
             original_ref TEXT, original_id INTEGER REFERENCES documents(id), store TEXT, partner TEXT,
             first_seen_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, margin INTEGER,
             reward_value INTEGER, budget_period TEXT, loss INTEGER NOT NULL DEFAULT 0, flags TEXT,
             UNIQUE (source, doc_id));
         INSERT INTO documents_31 SELECT id, source, doc_id, version, stamp, kind, state, void_reason,
             epoch, applied, number, occurred_at, customer_id, currency, total, points_redeemed,
             original_ref, original_id, store, partner, first_seen_at, updated_at, margin,
             reward_value, budget_period, loss, flags FROM documents;
         DROP TABLE documents;
         ALTER TABLE documents_31 RENAME TO documents;
         CREATE INDEX documents_number ON documents(source, number) WHERE number IS NOT NULL;
         CREATE INDEX documents_original ON documents(original_id) WHERE original_id IS NOT NULL;
         CREATE INDEX documents_unlinked ON documents(source, original_ref)
             WHERE kind = 'return' AND original_id IS NULL AND original_ref IS NOT NULL;
         CREATE INDEX documents_occurred ON documents(occurred_at);
         CREATE INDEX documents_loss ON documents(occurred_at) WHERE loss > 0;
         CREATE INDEX documents_updated ON documents(updated_at);
         CREATE INDEX documents_customer ON documents(customer_id, occurred_at);
         DROP INDEX lots_open;
         CREATE INDEX lots_open ON lots(customer_id) WHERE remaining > 0;
         CREATE INDEX lots_expiring ON lots(expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;
         PRAGMA foreign_keys = ON;",
    )
    .unwrap();
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = OFF;
         {journal_27};
         INSERT INTO journal_27 (id, kind, role, customer_id, document_id, epoch, reverses, amount, effective_at,
             recorded_at, explanation, actor, idem_key, partner, rule)
             SELECT j.id, j.kind, j.role, j.customer_id, j.document_id, j.epoch, j.reverses, j.amount,
                 j.effective_at, j.recorded_at, j.explanation, j.actor, j.idem_key, j.partner, n.name
             FROM journal j LEFT JOIN rule_names n ON n.id = j.rule_id;
         DROP TABLE journal;
         ALTER TABLE journal_27 RENAME TO journal;
         DROP TABLE rule_names;
         CREATE INDEX journal_document ON journal(document_id, epoch) WHERE document_id IS NOT NULL;
         CREATE INDEX journal_reverses ON journal(reverses) WHERE reverses IS NOT NULL;
         CREATE INDEX journal_effective ON journal(effective_at);
         CREATE INDEX journal_customer ON journal(customer_id, rule);
         DROP INDEX outbox_due;
         CREATE INDEX outbox_due ON outbox(destination, next_attempt_at, id) WHERE state = 'pending';
         PRAGMA foreign_keys = ON;"
    ))
    .unwrap();
    // lines named their product by its text on every line; the outbox's indexes as they were
    conn.execute_batch(
        "CREATE TABLE lines_22 (
             document_id INTEGER NOT NULL REFERENCES documents(id),
             line_no INTEGER NOT NULL, product_id TEXT NOT NULL, name TEXT, category TEXT,
             quantity TEXT NOT NULL, unit_price INTEGER NOT NULL, discount INTEGER NOT NULL,
             net INTEGER NOT NULL, unit_cost INTEGER, service INTEGER NOT NULL,
             points INTEGER NOT NULL DEFAULT 0, redeemed INTEGER,
             PRIMARY KEY (document_id, line_no)) WITHOUT ROWID;
         INSERT INTO lines_22 SELECT * FROM document_lines;
         DROP VIEW document_lines;
         DROP TABLE document_line_rows;
         DROP TABLE line_products;
         ALTER TABLE lines_22 RENAME TO document_lines;
         DROP INDEX outbox_successor;
         DROP INDEX outbox_dead;
         CREATE INDEX outbox_state ON outbox(state, id);",
    )
    .unwrap();
    // schema 25's forms: postings by their own id, counters naming themselves on every row,
    // bonus documents' keys whole, and the indexes migration 26 replaced
    let postings_before = postings(&conn);
    assert!(postings_before.len() >= 6, "two legs per movement");
    conn.execute_batch(
        "CREATE TABLE postings_25 (
             id INTEGER PRIMARY KEY, tx_id INTEGER NOT NULL REFERENCES journal(id),
             account TEXT NOT NULL, customer_id INTEGER REFERENCES customers(id),
             lot_id INTEGER REFERENCES lots(id), amount INTEGER NOT NULL);
         INSERT INTO postings_25 (tx_id, account, customer_id, lot_id, amount)
             SELECT tx_id, account, customer_id, lot_id, amount FROM postings ORDER BY tx_id, leg;
         DROP TABLE postings;
         ALTER TABLE postings_25 RENAME TO postings;
         CREATE INDEX postings_tx ON postings(tx_id);
         CREATE INDEX postings_lot ON postings(lot_id) WHERE lot_id IS NOT NULL;
         CREATE INDEX lots_origin ON lots(origin_tx);
         CREATE TABLE counters_25 (
             document_id INTEGER NOT NULL REFERENCES documents(id), counter TEXT NOT NULL,
             amount INTEGER NOT NULL, prior INTEGER,
             PRIMARY KEY (document_id, counter)) WITHOUT ROWID;
         INSERT INTO counters_25 SELECT document_id, counter, amount, prior FROM document_counters;
         DROP VIEW document_counters;
         DROP TABLE document_counter_rows;
         DROP TABLE counter_names;
         ALTER TABLE counters_25 RENAME TO document_counters;
         INSERT INTO document_counters (document_id, counter, amount, prior) VALUES (1, 'stamp:coffee', 3, 2);
         UPDATE outbox SET idem_key = 'onec:bonus:' || (SELECT value FROM meta WHERE key = 'ledger_uid')
             || ':tx' || substr(idem_key, 3) WHERE idem_key LIKE 'b:%';
         DROP INDEX outbox_onec_created;
         CREATE INDEX outbox_onec_created ON outbox(created_at) WHERE destination LIKE 'onec:%';
         DROP INDEX documents_customer;
         CREATE INDEX documents_customer ON documents(customer_id);
         CREATE INDEX documents_customer_time ON documents(customer_id, occurred_at) WHERE kind = 'sale';
         DROP INDEX journal_customer;
         CREATE INDEX journal_customer ON journal(customer_id);
         CREATE INDEX journal_bonus ON journal(customer_id, rule) WHERE rule IS NOT NULL;",
    )
    .unwrap();
    // schema 27's kept totals, made again from the rows by the migration
    let triggers: Vec<String> = column(
        &conn,
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'totals_%'",
    );
    assert_eq!(
        triggers.len(),
        7,
        "the journal's, the documents' and the outbox's three went with their rebuilds: {triggers:?}"
    );
    for t in triggers {
        conn.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    conn.execute_batch("DROP TABLE totals; DROP INDEX customers_debt; DROP INDEX outbox_notify_open;")
        .unwrap();
    // schema 30 kept a content hash version as its text, in every table that keeps one
    let hashed: Vec<(String, i64)> = conn
        .prepare(
            "SELECT 'documents', typeof(version) = 'blob' FROM documents UNION ALL \
             SELECT 'document_versions', typeof(version) = 'blob' FROM document_versions UNION ALL \
             SELECT 'source_log', typeof(version) = 'blob' FROM source_log",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let text: Vec<String> = column(&conn, TEXT_VERSIONS);
    assert_eq!(
        text, ["unposted-1"; 3],
        "every content hash written today is kept as its bytes (S3's void version: in all three)"
    );
    assert!(
        hashed.iter().filter(|(_, blob)| *blob == 1).count() >= 5,
        "{hashed:?}"
    );
    conn.execute_batch(
        "UPDATE documents SET version = 'sha256:' || lower(hex(version)) WHERE typeof(version) = 'blob';
         UPDATE document_versions SET version = 'sha256:' || lower(hex(version)) WHERE typeof(version) = 'blob';
         UPDATE source_log SET version = 'sha256:' || lower(hex(version)) WHERE typeof(version) = 'blob';",
    )
    .unwrap();
    conn.execute_batch("PRAGMA user_version = 22").unwrap();
    let versions: i64 = conn
        .query_row("SELECT COUNT(*) FROM document_versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 5, "three current versions and the ones S1 and S3 left");
    drop(conn);

    let ledger = Ledger::open(&path, &OpenOptions::default()).unwrap();
    assert!(
        ledger.verify().unwrap().is_empty(),
        "{:#?}",
        ledger.verify().unwrap()
    );
    assert_eq!(visible(&ledger, now), before, "what a person sees is unchanged");
    drop(ledger);
    let conn = rusqlite::Connection::open(&path).unwrap();
    // the view of counters reads the packed shares through the ledger's functions (migration 36)
    kopilka::ledger::counters::register(&conn).unwrap();
    let (version, left): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version), COUNT(*) FROM document_versions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, left), (36, 2), "only the versions S1 and S3 left stay");
    // schemas before 33 kept every pending row in one index by destination, and a document's
    // number with its source; before 34 a customer's documents by time alone; before 35 the
    // open lots by customer alone and again by expiry; before 36 a document's counter shares
    // in a table of their own
    let keyed: Vec<String> = column(
        &conn,
        "SELECT m.name || '(' || (SELECT group_concat(i.name) FROM pragma_index_info(m.name) i) || ')' \
         FROM sqlite_master m WHERE m.name IN ('outbox_due', 'outbox_due_bonus', 'documents_number', \
         'documents_changed', 'documents_updated', 'documents_customer', 'lots_open', 'lots_expiring') ORDER BY 1",
    );
    assert_eq!(
        keyed,
        [
            "documents_changed(updated_at)",
            "documents_customer(customer_id,occurred_at,kind_code,applied,total,counters)",
            "documents_number(number)",
            "lots_open(customer_id,available_at,expires_at,remaining)",
            "outbox_due(destination,next_attempt_at)",
            "outbox_due_bonus(next_attempt_at)"
        ]
    );
    let text: Vec<String> = column(&conn, TEXT_VERSIONS);
    assert_eq!(
        text,
        ["unposted-1"],
        "content hashes are kept as bytes, other versions as text"
    );
    let worked_out: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM document_line_rows WHERE net IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        worked_out > 0,
        "the migration leaves whole-quantity nets to the view"
    );
    let rules_after = bonus_rules(&conn);
    assert_eq!(rules_after, rules_before, "every bonus names its rule by key");
    let kinds_after: Vec<String> = column(&conn, "SELECT kind || ':' || role FROM journal ORDER BY id");
    assert_eq!(
        kinds_after, kinds_before,
        "every entry reads its kind and role as before"
    );
    let states_after: Vec<String> = column(
        &conn,
        "SELECT COALESCE(kind, '-') || ':' || state FROM documents ORDER BY id",
    );
    assert_eq!(
        states_after, states_before,
        "every document reads its kind and state as before"
    );
    let words: Vec<i64> = column(
        &conn,
        "SELECT COUNT(*) FROM pragma_table_xinfo('journal') WHERE name IN ('kind', 'role') AND hidden = 2 \
         UNION ALL SELECT COUNT(*) FROM pragma_table_xinfo('documents') WHERE name IN ('kind', 'state') AND hidden = 2",
    );
    assert_eq!(
        words,
        vec![2, 2],
        "the words are generated from the codes, stored nowhere"
    );
    let outbox_after: Vec<String> = column(&conn, "SELECT state FROM outbox ORDER BY id");
    assert_eq!(
        outbox_after, outbox_before,
        "every outbox row reads its state as before"
    );
    let stored: Vec<i64> = column(
        &conn,
        "SELECT COUNT(*) FROM pragma_table_xinfo('outbox') WHERE name = 'state' AND hidden = 2",
    );
    assert_eq!(stored, [1], "an outbox row's state is generated from its code");
    // the journal's key is unique where given, by a partial index: no entry for the others
    let indexes: Vec<String> = column(
        &conn,
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'journal' ORDER BY name",
    );
    assert_eq!(
        indexes,
        [
            "journal_customer",
            "journal_document",
            "journal_effective",
            "journal_idem",
            "journal_reverses"
        ]
    );
    let twice = "INSERT INTO journal (customer_id, amount, effective_at, recorded_at, explanation, idem_key) \
                 VALUES (1, 0, 0, 0, '', 'k')";
    conn.execute(twice, []).unwrap();
    assert!(conn.execute(twice, []).is_err(), "a key is used once");
    assert_eq!(lines(&conn), lines_before, "every line reads as it did");
    let (lines, products): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM document_line_rows), (SELECT COUNT(*) FROM line_products)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (lines, products),
        (3, 1),
        "S1's line left after the edit, S2's and the void S3's: all name P1, stored once"
    );
    let logged: Vec<String> = column(&conn, "SELECT doc_id FROM source_log");
    assert_eq!(logged, ["BAD"], "only what the ledger could not take");
    let postings_after = postings(&conn);
    assert_eq!(postings_after, postings_before, "every posting, in its order");
    let counter: (i64, String, i64, Option<i64>) = conn
        .query_row(
            "SELECT document_id, counter, amount, prior FROM document_counters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(counter, (1, "stamp:coffee".into(), 3, Some(2)));
    let (table, packed): (i64, Option<Vec<u8>>) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM sqlite_master WHERE name = 'document_counter_rows'), \
             (SELECT counters FROM documents WHERE id = 1)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        table, 0,
        "the shares live in the document row, not a table of their own"
    );
    assert!(packed.is_some(), "S1's share is packed in its row");
}

#[test]
fn a_state_never_attempted_is_replaced_and_one_attempted_is_kept_with_its_body() {
    let mut env = Env::new();
    let now = env.now;
    let l = &mut env.ledger;
    let first = l
        .outbox_enqueue(
            "amocrm",
            "card-1-v1",
            Some("contact:1"),
            r#"{"available":1}"#,
            now,
        )
        .unwrap()
        .unwrap();
    let tried = l
        .outbox_enqueue(
            "amocrm",
            "card-2-v1",
            Some("contact:2"),
            r#"{"available":2}"#,
            now,
        )
        .unwrap()
        .unwrap();
    l.outbox_mark_failed(tried, "503", Some(now), now).unwrap();
    let second = l
        .outbox_enqueue(
            "amocrm",
            "card-1-v2",
            Some("contact:1"),
            r#"{"available":3}"#,
            now,
        )
        .unwrap()
        .unwrap();
    l.outbox_enqueue(
        "amocrm",
        "card-2-v2",
        Some("contact:2"),
        r#"{"available":4}"#,
        now,
    )
    .unwrap()
    .unwrap();
    assert!(
        l.outbox_show(first).is_err(),
        "never attempted: no one has it, and nothing can send it now"
    );
    let row = l.outbox_show(tried).unwrap();
    assert_eq!(row.state, kopilka::ledger::OutboxState::Superseded);
    assert_eq!(
        (row.payload.as_str(), row.last_error.as_deref()),
        (r#"{"available":2}"#, Some("503")),
        "what was attempted stays with its error"
    );
    assert_eq!(l.outbox_show(second).unwrap().payload, r#"{"available":3}"#);
    env.assert_verified();
}

/// The outbox counted from its rows, as `outbox_counts` reported it before the totals were
/// kept: (destination, state, rows).
fn outbox_counted(conn: &rusqlite::Connection) -> Vec<(String, String, i64)> {
    conn.prepare("SELECT destination, state, COUNT(*) FROM outbox GROUP BY 1, 2 ORDER BY 1, 2")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The all-time summary and the outbox counts a monitor reads come from totals kept as rows
/// are written (schema 27); they must read exactly as the rows count them, through every
/// change that moves a total: sales, a return that leaves its customer in debt, a void, a
/// lot waiting out the rules' delay and one earned ahead of the clock under rules without
/// one, deliveries and a dead row. A total tampered with shows in `ledger verify` and in the summary, which is how the
/// test knows the summary reads the kept totals at all.
#[test]
fn the_kept_totals_read_as_the_rows_count_them() {
    use kopilka::core::money::Points;
    use kopilka::ledger::DateRange;
    let mut env = with_bonus_documents();
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 500)]);
    let s2 = sale("S2", Some("C2"), &[("P1", 4, 1000)]);
    let s4 = sale("S4", Some("C2"), &[("P2", 1, 500)]);
    env.docs(vec![s1.clone(), s2.clone(), s4.clone()]);
    // C2 spends every point S2 earned, then returns S2: the points taken back are owed
    let held = env.available("C2");
    assert!(held > 0);
    let mut spend = sale("S5", Some("C2"), &[("P2", 1, 500)]);
    spend.occurred_at = t0() + chrono::Duration::days(20);
    spend.points_redeemed = Points(held);
    let spend = reversion(spend);
    // a recent sale's lot waits out the rules' delay (found through `lots_available`)
    let mut recent = sale("S6", Some("C1"), &[("P2", 2, 500)]);
    recent.occurred_at = env.now - chrono::Duration::days(1);
    env.docs(vec![
        spend,
        returned("R1", &s1, &[("P2", 1)]),
        returned("R2", &s2, &[("P1", 4)]),
        reversion(recent),
    ]);
    // under rules without a delay, a sale dated ahead of the clock: its lot waits until
    // then although it was available when earned
    env.rules = kopilka::core::rules::RuleSet::flat(
        rust_decimal::Decimal::from(5),
        Money(100),
        chrono::Duration::zero(),
        None,
    );
    let mut ahead = sale("S3", Some("C1"), &[("P1", 1, 1000)]);
    ahead.occurred_at = env.now + chrono::Duration::days(2);
    env.docs(vec![reversion(ahead)]);
    unpost(&mut env, &s4);
    let due = env.ledger.outbox_due("onec:bonus", 100, env.now).unwrap();
    assert!(due.len() >= 3, "{due:?}");
    let ids: Vec<i64> = due[1..].iter().map(|r| r.id).collect();
    env.ledger.outbox_mark_delivered(&ids, env.now).unwrap();
    env.ledger
        .outbox_mark_failed(due[0].id, "1C refused it", None, env.now)
        .unwrap();
    env.assert_verified();

    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let all = DateRange::default();
    let mut pending = Vec::new();
    for days in [0, 3, 30] {
        let now = env.now + chrono::Duration::days(days);
        let kept = env.ledger.summary(&all, now).unwrap();
        assert_eq!(kept, env.ledger.summary_counted(&all, now).unwrap(), "at {now}");
        pending.push(kept.points_pending);
    }
    // both lots wait now, S6's alone in three days (S3's came), neither in a month
    assert!(
        pending[0] > pending[1] && pending[1] > 0 && pending[2] == 0,
        "{pending:?}"
    );
    let s = env.ledger.summary(&all, env.now).unwrap();
    assert_eq!(
        (s.sales_count, s.returns_count, s.voided_documents),
        (5, 2, 1),
        "{s:?}"
    );
    assert!(s.points_debt > 0, "the return leaves C2 owing: {s:?}");
    let counts: Vec<(String, String, i64)> = env
        .ledger
        .outbox_counts()
        .unwrap()
        .into_iter()
        .map(|(d, st, n)| (d, st.as_str().to_string(), n))
        .collect();
    assert_eq!(counts, outbox_counted(&conn));
    assert!(counts.iter().any(|(_, st, _)| st == "dead"), "{counts:?}");
    assert!(counts.iter().any(|(_, st, _)| st == "delivered"), "{counts:?}");

    // a kept total that disagrees with the rows: verify names it, and the summary shows it
    conn.execute(
        "UPDATE totals SET n = n + 1 WHERE name = 'documents:active:sale'",
        [],
    )
    .unwrap();
    let v = env.ledger.verify().unwrap();
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].check, "kept totals equal the rows they count");
    assert!(v[0].detail.contains("documents:active:sale"), "{v:#?}");
    assert_eq!(env.ledger.summary(&all, env.now).unwrap().sales_count, 6);
    assert_eq!(env.ledger.summary_counted(&all, env.now).unwrap().sales_count, 5);
}

/// An accrual's item for a line as `history` shows it: (line, product, base).
type LineItem = (Option<u32>, Option<String>, Option<i64>);

/// What `item` says of every accrual's items for lines, in the journal's order.
fn accrual_items<T>(env: &Env, customer: &str, item: impl Fn(&ExplanationItem) -> T) -> Vec<Vec<T>> {
    let (_, entries) = env.ledger.history(customer).unwrap();
    entries
        .iter()
        .filter(|e| e.kind == "accrual")
        .map(|e| {
            e.explanation
                .items
                .iter()
                .filter(|i| i.line.is_some())
                .map(&item)
                .collect()
        })
        .collect()
}

/// Every accrual's items for lines as (line, product, base).
fn accrual_lines(env: &Env, customer: &str) -> Vec<Vec<LineItem>> {
    accrual_items(env, customer, |i| (i.line, i.product.clone(), i.base_kopecks))
}

/// The points of every accrual's items for lines.
fn accrual_points(env: &Env, customer: &str) -> Vec<Vec<i64>> {
    accrual_items(env, customer, |i| i.points)
}

/// Issue 19, "no fact copied into three tables": an accrual's items leave their line's
/// product, net and points (and their line numbers) to the document's stored line, and
/// `history` shows them as before; a new version of the document (new lines) leaves the
/// earlier accrual saying what it was made against.
#[test]
fn an_accrual_leaves_its_lines_facts_to_the_lines_and_keeps_them_when_they_change() {
    let mut env = Env::new();
    let s1 = sale("S1", Some("C1"), &[("P1", 2, 1000), ("P2", 1, 500)]);
    env.docs(vec![s1.clone()]);
    let first = vec![
        (Some(1), Some("P1".to_string()), Some(200_000)),
        (Some(2), Some("P2".to_string()), Some(50_000)),
    ];
    assert_eq!(accrual_lines(&env, "C1"), vec![first.clone()]);
    // each item earned what its stored line holds
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let line_points: Vec<i64> = column(
        &conn,
        "SELECT points FROM document_lines WHERE document_id = (SELECT id FROM documents WHERE doc_id = 'S1') \
         ORDER BY line_no",
    );
    assert!(line_points.iter().all(|p| *p > 0), "{line_points:?}");
    assert_eq!(accrual_points(&env, "C1"), vec![line_points.clone()]);
    // the stored row does not repeat them: read without the lines, the values are missing
    let packed = |conn: &rusqlite::Connection, id: i64| -> Vec<u8> {
        conn.query_row("SELECT explanation FROM journal WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let accrual: i64 = conn
        .query_row("SELECT id FROM journal WHERE kind = 'accrual'", [], |r| r.get(0))
        .unwrap();
    let bare = Explanation::from_packed(&packed(&conn, accrual));
    let line_items: Vec<_> = bare.items.iter().filter(|i| i.line.is_some()).collect();
    assert_eq!(line_items.len(), 2);
    assert!(
        line_items
            .iter()
            .all(|i| i.product.is_none() && i.base_kopecks.is_none() && i.points == 0)
    );
    // the line numbers are implied, not stored, and still read
    assert_eq!(
        line_items.iter().map(|i| i.line).collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );

    // a new version with other lines: the first accrual is cancelled and still names the
    // lines it was made against, the new one names the new lines
    let mut edited = s1.clone();
    edited.lines[1] = sale("x", None, &[("P3", 3, 300)]).lines[0].clone();
    edited.total = edited.lines.iter().map(|l| l.net).sum();
    assert_eq!(
        env.docs(vec![reversion(edited)]).outcomes[0].1,
        Outcome::NewVersion
    );
    let second = vec![
        (Some(1), Some("P1".to_string()), Some(200_000)),
        (Some(2), Some("P3".to_string()), Some(90_000)),
    ];
    assert_eq!(accrual_lines(&env, "C1"), vec![first, second]);
    assert_eq!(
        accrual_points(&env, "C1")[0],
        line_points,
        "what the first accrual earned"
    );
    // the first one now holds its facts itself (the lines it was made against are gone)
    let whole = Explanation::from_packed(&packed(&conn, accrual));
    assert!(
        whole
            .items
            .iter()
            .filter(|i| i.line.is_some())
            .all(|i| i.product.is_some() && i.base_kopecks.is_some())
    );
    assert_eq!(
        whole
            .items
            .iter()
            .filter(|i| i.line.is_some())
            .map(|i| i.points)
            .collect::<Vec<_>>(),
        line_points
    );
    env.assert_verified();
}

/// Issue 19: a line's net is stored only where the view cannot work it out exactly — a
/// quantity that is not a whole number, or a net that is not quantity × price − discount (a
/// source rounding its own way); `document_lines` reads every net as the document said it.
#[test]
fn a_lines_net_is_stored_only_where_it_is_not_worked_out() {
    let mut env = Env::new();
    let mut s = sale(
        "S1",
        Some("C1"),
        &[("P1", 2, 1000), ("P2", 1, 500), ("P3", 3, 333)],
    );
    s.lines[0].discount = Money(5_000);
    s.lines[0].net = Money(195_000);
    s.lines[1].quantity = "1.5".parse().unwrap();
    s.lines[1].net = Money(75_000);
    // 3 × 333.00 = 999.00, the source says 998.99
    s.lines[2].net = Money(99_899);
    s.total = s.lines.iter().map(|l| l.net).sum();
    env.docs(vec![reversion(s.clone())]);
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    let stored: Vec<Option<i64>> = column(&conn, "SELECT net FROM document_line_rows ORDER BY line_no");
    assert_eq!(stored, [None, Some(75_000), Some(99_899)]);
    let read: Vec<i64> = column(&conn, "SELECT net FROM document_lines ORDER BY line_no");
    let said: Vec<i64> = s.lines.iter().map(|l| l.net.0).collect();
    assert_eq!(read, said);
    // and the accrual's items, which leave their base to these lines, read it back
    let items = accrual_lines(&env, "C1");
    let bases: Vec<Option<i64>> = items[0].iter().map(|i| i.2).collect();
    assert_eq!(bases, said.iter().map(|n| Some(*n)).collect::<Vec<_>>());
    env.assert_verified();
}

/// Issue 19: an item capped by its line's margin leaves that margin to the line — whole or
/// fractional quantity — and `history` shows the margin the line works out to: its net less
/// its cost less the points paid on it. An item whose base is not its line's net (points paid
/// on the line) keeps its own values, the margin with them.
#[test]
fn a_capped_item_leaves_its_margin_to_its_line_and_reads_it_back() {
    let mut env = Env::new();
    env.docs(vec![sale("S0", Some("C1"), &[("P0", 10, 1000)])]);
    env.now += chrono::Duration::days(20);
    for (id, paid) in [("S1", 0), ("S2", 10)] {
        let mut s = sale(id, Some("C1"), &[("P1", 2, 1000), ("P2", 1, 700), ("P3", 1, 100)]);
        // P1 and P2 sold near cost: their reward is capped by their margin
        s.lines[0].unit_cost = Some(Money(98_000));
        s.lines[1].quantity = dec("1.5");
        s.lines[1].net = Money(105_000);
        s.lines[1].unit_cost = Some(Money(69_000));
        s.total = s.lines.iter().map(|l| l.net).sum();
        s.occurred_at = env.now;
        s.points_redeemed = kopilka::core::money::Points(paid);
        let report = env.docs(vec![reversion(s)]);
        assert_eq!(report.outcomes[0].1, Outcome::Applied, "{report:?}");

        let conn = rusqlite::Connection::open(&env.path).unwrap();
        // what each line works out to, from the line as stored
        type Stored = (i64, i64, String, Option<i64>, Option<i64>);
        let stored: Vec<Stored> = conn
            .prepare(
                "SELECT line_no, net, quantity, unit_cost, redeemed FROM document_lines \
                 WHERE document_id = (SELECT id FROM documents WHERE doc_id = ?1) ORDER BY line_no",
            )
            .unwrap()
            .query_map([id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            stored.iter().any(|l| l.4.is_some()),
            paid > 0,
            "{id}: points paid on its lines: {stored:?}"
        );
        let (_, entries) = env.ledger.history("C1").unwrap();
        let accrual = entries
            .iter()
            .find(|e| e.kind == "accrual" && e.doc_id.as_deref() == Some(id))
            .expect("the sale's accrual");
        let capped: Vec<(u32, i64)> = accrual
            .explanation
            .items
            .iter()
            .filter_map(|i| Some((i.line?, i.margin_kopecks?)))
            .collect();
        assert_eq!(
            capped.len(),
            2,
            "{id}: P1 and P2 were capped: {:#?}",
            accrual.explanation
        );
        for (line, margin) in &capped {
            let (_, net, quantity, cost, paid) = &stored[*line as usize - 1];
            let cost = rust_decimal::Decimal::from(cost.unwrap()) * dec(quantity);
            assert_eq!(
                rust_decimal::Decimal::from(*margin),
                rust_decimal::Decimal::from(*net) - cost - rust_decimal::Decimal::from(paid.unwrap_or(0)),
                "{id}, line {line}"
            );
        }
        // the stored row leaves a margin to its line only where the item is the line's own
        let packed: Vec<u8> = conn
            .query_row(
                "SELECT explanation FROM journal WHERE kind = 'accrual' \
                 AND document_id = (SELECT id FROM documents WHERE doc_id = ?1)",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        let bare = Explanation::from_packed(&packed);
        for item in bare.items.iter().filter(|i| i.cap.is_some()) {
            let paid_on_line = stored[item.line.unwrap() as usize - 1].4.is_some();
            assert_eq!(item.margin_kopecks.is_some(), paid_on_line, "{id}: {item:#?}");
        }
    }
    env.assert_verified();
}

/// A document's counter shares live in its own row (migration 36), read as rows through the
/// view `document_counters`; `ledger verify` reads every document's back and names one whose
/// shares are damaged — a sale's counters would otherwise fail on it.
#[test]
fn a_documents_counter_shares_are_in_its_row_and_verify_reads_them_back() {
    let mut env = Env::with_rules(include_str!("../config/rules.toml"));
    // 6,000 ₽ twice: the second sale takes the spend past 10,000 ₽ in 30 days
    env.docs(vec![sale("S1", Some("C1"), &[("P1", 2, 3000)])]);
    env.docs(vec![sale("S2", Some("C1"), &[("P1", 2, 3000)])]);
    env.assert_verified();
    let conn = rusqlite::Connection::open(&env.path).unwrap();
    kopilka::ledger::counters::register(&conn).unwrap();
    let shares: Vec<(i64, String, i64, Option<i64>)> = conn
        .prepare(
            "SELECT document_id, counter, amount, prior FROM document_counters ORDER BY document_id, counter",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        shares,
        [
            (1, "threshold:spend-10k-month".to_string(), 600_000, Some(0)),
            (2, "threshold:spend-10k-month".to_string(), 600_000, Some(600_000))
        ],
        "each sale's share, and what the counter held before it"
    );
    let bonus: Vec<i64> = column(
        &conn,
        "SELECT j.document_id FROM journal j JOIN rule_names n ON n.id = j.rule_id \
         WHERE j.kind = 'bonus' AND n.name = 'threshold:spend-10k-month'",
    );
    assert_eq!(
        bonus,
        [2],
        "the second sale's share took the spend past the threshold"
    );
    let Env {
        dir: _dir,
        ledger,
        path,
        ..
    } = env;
    drop(ledger);
    let damaged = conn
        .execute("UPDATE documents SET counters = x'80' WHERE id = 2", [])
        .unwrap();
    assert_eq!(damaged, 1);
    drop(conn);
    let v = Ledger::open(&path, &OpenOptions::default())
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].check, "a document's counter shares read back");
    assert!(v[0].detail.contains("S2"), "{v:?}");
}
