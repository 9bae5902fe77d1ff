//! The OData postback against the 1C OData simulator, over real HTTP on loopback: bonus
//! documents and accounting postings created with kopilka's own `Ref_Key` and posted; a
//! delivery that fails twice then succeeds, a refused posting in dead letters and retried by
//! hand, a crash between send and mark-delivered — each leaves exactly one document per
//! outbox row. Postings arrive equal to the journal to the kopeck. No sleeps: every step
//! waits for its delivery run (the one timeout is the client's own).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use kopilka::clock::{Clock, FakeClock};
use kopilka::config::{self, Config, ONEC_ACCOUNTING, ONEC_BONUS};
use kopilka::core::money::Money;
use kopilka::daemon::{JobContext, run_once};
use kopilka::ledger::{
    DeliveryPolicy, DeliveryReport, Ledger, OutboxFilter, OutboxRow, OutboxState, SharedLedger, Sink,
    deliver_due,
};
use kopilka::onec::odata::write::OdataWriter;
use kopilka::onec::odata::{OdataPoller, PollOptions, RetryPolicy, probe};
use kopilka::onec::postback::document_id;
use kopilka::sim::onec_odata::{
    ACCOUNTING_DOCUMENTS, Configuration, Entity, Fault, FaultKind, ORGANIZATION, OdataSim, OdataSimBuilder,
    Val, guid,
};

// The writing tests run against an УНФ base: its bonus document has per-row dates and a burn
// correction, the richest of the three (Розница 2 and УТ 11 are covered in onec_odata.rs).
const BONUS_DOCUMENTS: &str = "Document_НачислениеСписаниеБонусныхБаллов";
const CARDS: &str = "Catalog_ДисконтныеКарты";
use tokio_util::sync::CancellationToken;

struct Rig {
    sim: OdataSim,
    dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ledger: SharedLedger,
    clock: Arc<FakeClock>,
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts_per_request: 2,
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
    }
}

fn local(t: NaiveDateTime) -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .from_local_datetime(&t)
        .earliest()
        .expect("a Moscow time")
        .with_timezone(&Utc)
}

fn write_config(dir: &std::path::Path, sim: &OdataSim, postback: &str) -> Arc<Config> {
    let pass = dir.join("odata.pass");
    std::fs::write(&pass, sim.password()).expect("password file");
    let toml = format!(
        r#"
[general]
timezone = "Europe/Moscow"
[ledger]
path = "{ledger}"
[outbox]
max_attempts = 6
backoff_initial_ms = 10000
backoff_max_ms = 600000
[accounting]
postback = "{postback}"
entity = "{org}"
[onec]
system = "onec"
cost_price_type = "Закупочная"
[onec.odata]
url = "{url}"
user = "{user}"
password_file = "{pass}"
mapping = "unf"
page_size = 200
timeout_seconds = 1
"#,
        ledger = dir.join("kopilka.db").display(),
        org = ORGANIZATION,
        url = sim.base_url(),
        user = sim.user(),
        pass = pass.display(),
    );
    let file = dir.join("kopilka.toml");
    std::fs::write(&file, toml).expect("config file");
    Arc::new(config::load(Some(&file), &[]).unwrap_or_else(|r| panic!("{r}")))
}

/// An УНФ base with some history polled into a fresh ledger (which queued a bonus
/// document per journal transaction).
async fn rig(seed: u64, sales: usize) -> Rig {
    assert_eq!(Configuration::Unf.names().bonus_documents, BONUS_DOCUMENTS);
    assert_eq!(Configuration::Unf.names().cards, CARDS);
    let sim = OdataSimBuilder::new(seed)
        .configuration(Configuration::Unf)
        .sales(sales)
        .customers(12)
        .products(30)
        .returns_percent(25)
        .start()
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(dir.path(), &sim, "odata");
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).expect("ledger"));
    let clock = Arc::new(FakeClock::new(local(
        sim.last_date() + chrono::Duration::hours(1),
    )));
    let poller = OdataPoller::with_options(
        cfg.clone(),
        PollOptions {
            retry: fast_retry(),
            ..PollOptions::default()
        },
    )
    .expect("poller");
    poller
        .poll(&ledger, clock.now(), &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("poll: {e}"));
    Rig {
        sim,
        dir,
        cfg,
        ledger,
        clock,
    }
}

impl Rig {
    fn writer(&self) -> OdataWriter {
        OdataWriter::with_retry(self.cfg.clone(), fast_retry()).expect("writer")
    }

    fn policy(&self) -> DeliveryPolicy {
        self.cfg.delivery.clone()
    }

    fn rows(&self, destination: &str) -> Vec<OutboxRow> {
        let mut rows = self
            .ledger
            .lock()
            .outbox_list(&OutboxFilter {
                destination: Some(destination.into()),
                ..Default::default()
            })
            .expect("outbox");
        rows.reverse();
        rows
    }

    fn pending(&self, destination: &str) -> Vec<OutboxRow> {
        self.rows(destination)
            .into_iter()
            .filter(|r| r.state == OutboxState::Pending)
            .collect()
    }

    /// One delivery run of a destination with a fresh writer, then the clock moves past
    /// every back-off.
    async fn deliver(&self, destination: &str) -> DeliveryReport {
        let writer = self.writer();
        let sink = if destination == ONEC_BONUS {
            writer.bonus_sink()
        } else {
            writer.accounting_sink()
        };
        let report = deliver_due(&self.ledger, &sink, &self.policy(), self.clock.as_ref())
            .await
            .expect("delivery");
        self.clock.advance(chrono::Duration::hours(2));
        report
    }

    /// Drops every pending row of the destination but the first, so a test follows one.
    fn keep_only_first(&self, destination: &str) -> OutboxRow {
        let rows = self.pending(destination);
        assert!(rows.len() > 1, "the history queued {} rows", rows.len());
        let mut l = self.ledger.lock();
        for r in &rows[1..] {
            l.outbox_drop(r.id, "another test's row", self.clock.now())
                .expect("drop");
        }
        rows[0].clone()
    }

    /// POSTs that create (not actions), and how they were answered.
    fn creates(&self, set: &str) -> Vec<u16> {
        self.sim
            .requests()
            .iter()
            .filter(|q| q.method == "POST" && q.resource == set)
            .map(|q| q.status)
            .collect()
    }
}

fn field<'a>(e: &'a Entity, name: &str) -> &'a str {
    match e.get(name) {
        Some(Val::Str(s) | Val::Num(s)) => s,
        _ => "",
    }
}

fn rows_of<'a>(e: &'a Entity, section: &str) -> &'a [Vec<(String, Val)>] {
    match e.get(section) {
        Some(Val::Rows(r)) => r,
        _ => &[],
    }
}

fn row_field<'a>(row: &'a [(String, Val)], name: &str) -> &'a str {
    row.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| match v {
            Val::Str(s) | Val::Num(s) => s.as_str(),
            _ => "",
        })
        .unwrap_or("")
}

fn posted(e: &Entity) -> bool {
    e.get("Posted") == Some(&Val::Bool(true))
}

/// The simulator's document of an outbox row, by kopilka's key.
fn document_of(sim: &OdataSim, set: &str, row: &OutboxRow) -> Entity {
    sim.entity(set, &document_id(row).to_string())
        .unwrap_or_else(|| panic!("no document for row {} ({})", row.id, row.idem_key))
}

/// Every delivered bonus row has exactly one posted document with its key, comment and
/// movement; nothing else was written.
fn assert_bonus_documents(r: &Rig) {
    let rows: Vec<OutboxRow> = r
        .rows(ONEC_BONUS)
        .into_iter()
        .filter(|x| x.state == OutboxState::Delivered)
        .collect();
    let docs = r.sim.entities(BONUS_DOCUMENTS);
    assert_eq!(docs.len(), rows.len(), "one document per delivered row");
    let card_keys: HashMap<String, String> = r
        .sim
        .entities(CARDS)
        .into_iter()
        .map(|c| (field(&c, "КодКартыШтрихкод").to_string(), c.key.clone()))
        .collect();
    for row in &rows {
        let doc = document_of(&r.sim, BONUS_DOCUMENTS, row);
        assert!(posted(&doc), "row {} is posted in 1C", row.idem_key);
        assert!(
            field(&doc, "Комментарий").starts_with(&format!("kopilka:{} ", row.idem_key)),
            "{:?}",
            field(&doc, "Комментарий")
        );
        let p: serde_json::Value = serde_json::from_str(&row.payload).expect("payload");
        let points = p["points"].as_i64().expect("points");
        let (section, other) = if points > 0 {
            ("НачисленияБонусов", "СписанияБонусов")
        } else {
            ("СписанияБонусов", "НачисленияБонусов")
        };
        let lines = rows_of(&doc, section);
        assert_eq!((lines.len(), rows_of(&doc, other).len()), (1, 0), "{doc:?}");
        assert_eq!(row_field(&lines[0], "LineNumber"), "1");
        assert_eq!(row_field(&lines[0], "Количество"), points.abs().to_string());
        let card = p["card"].as_str().expect("a card");
        assert_eq!(
            Some(row_field(&lines[0], "БонуснаяКарта_Key")),
            card_keys.get(card).map(String::as_str),
            "the row names the customer's card {card}"
        );
        assert_eq!(field(&doc, "БонуснаяПрограмма_Key"), guid("program", "Бонусы"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_movement_becomes_one_posted_document() {
    let r = rig(81, 60).await;
    let due = r.pending(ONEC_BONUS);
    assert!(due.len() > 20, "{} rows", due.len());
    let report = r.deliver(ONEC_BONUS).await;
    assert_eq!(
        (report.delivered, report.retried, report.dead),
        (due.len(), 0, 0),
        "{report:?}"
    );
    assert_bonus_documents(&r);
    let docs = r.sim.entities(BONUS_DOCUMENTS);
    let with = |section: &str| docs.iter().filter(|d| !rows_of(d, section).is_empty()).count();
    assert!(
        with("НачисленияБонусов") > 0 && with("СписанияБонусов") > 0,
        "accruals and write-offs"
    );
    // an expiry-free accrual says when its points burn; a write-off corrects no burn
    let accrual = docs
        .iter()
        .find(|d| !rows_of(d, "НачисленияБонусов").is_empty())
        .expect("an accrual");
    assert_ne!(
        row_field(&rows_of(accrual, "НачисленияБонусов")[0], "ДатаСгорания"),
        "0001-01-01T00:00:00",
        "the default program's points expire"
    );
    // first attempts: one create and one Post per document, no lookups by key
    let creates = r.creates(BONUS_DOCUMENTS);
    assert_eq!(creates.len(), due.len());
    assert!(creates.iter().all(|s| *s == 201), "{creates:?}");
    // nothing is due any more: a second run sends nothing
    r.sim.clear_log();
    let again = r.deliver(ONEC_BONUS).await;
    assert_eq!(again.delivered, 0);
    assert_eq!(r.sim.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_fails_twice_then_succeeds_creates_exactly_one_document() {
    let r = rig(82, 12).await;
    let row = r.keep_only_first(ONEC_BONUS);
    // the first POST meets a 503; the second is created but answered after the client's
    // 1 s timeout (the outcome unknown to kopilka)
    r.sim.inject(
        Fault::new(FaultKind::Unavailable)
            .on(BONUS_DOCUMENTS)
            .method("POST"),
    );
    r.sim.inject(
        Fault::new(FaultKind::Delay(Duration::from_millis(2500)))
            .on(BONUS_DOCUMENTS)
            .method("POST"),
    );
    let first = r.deliver(ONEC_BONUS).await;
    assert_eq!((first.delivered, first.retried), (0, 1), "{first:?}");
    assert!(r.sim.entities(BONUS_DOCUMENTS).is_empty());
    let second = r.deliver(ONEC_BONUS).await;
    assert_eq!((second.delivered, second.retried), (0, 1), "{second:?}");
    let after_timeout = r.sim.entities(BONUS_DOCUMENTS);
    assert_eq!(after_timeout.len(), 1, "the late answer's POST did create it");
    assert!(!posted(&after_timeout[0]));
    let third = r.deliver(ONEC_BONUS).await;
    assert_eq!(
        (third.delivered, third.retried, third.dead),
        (1, 0, 0),
        "{third:?}"
    );

    let docs = r.sim.entities(BONUS_DOCUMENTS);
    assert_eq!(docs.len(), 1, "exactly one document");
    assert_eq!(docs[0].key, document_id(&row).to_string());
    assert!(posted(&docs[0]));
    assert_eq!(
        r.creates(BONUS_DOCUMENTS),
        [503, 201],
        "the third attempt looked the document up instead of POSTing again"
    );
    let stored = r.ledger.lock().outbox_show(row.id).expect("row");
    assert_eq!((stored.state, stored.attempts), (OutboxState::Delivered, 3));
    assert_bonus_documents(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_posting_is_dead_lettered_and_retried_by_hand_without_a_duplicate() {
    let r = rig(83, 30).await;
    let due = r.pending(ONEC_BONUS);
    r.sim
        .refuse_posting(Some("Бонусная программа «Бонусы» закрыта для начислений"));
    let report = r.deliver(ONEC_BONUS).await;
    assert_eq!(
        (report.delivered, report.retried, report.dead),
        (0, 0, due.len()),
        "{report:?}"
    );
    for row in r.rows(ONEC_BONUS) {
        assert_eq!(row.state, OutboxState::Dead);
        let e = row.last_error.clone().unwrap_or_default();
        assert!(
            e.contains("1C refused to post") && e.contains("закрыта для начислений") && e.contains("-1"),
            "{e}"
        );
        assert!(
            !posted(&document_of(&r.sim, BONUS_DOCUMENTS, &row)),
            "left unposted"
        );
    }
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), due.len());

    // the accountant reopens the program; `kopilka outbox retry` puts the rows back
    r.sim.refuse_posting(None);
    {
        let mut l = r.ledger.lock();
        for row in &due {
            l.outbox_retry(row.id, r.clock.now()).expect("retry");
        }
    }
    r.sim.clear_log();
    let report = r.deliver(ONEC_BONUS).await;
    assert_eq!((report.delivered, report.dead), (due.len(), 0), "{report:?}");
    assert!(
        r.creates(BONUS_DOCUMENTS).is_empty(),
        "found by key, not POSTed again"
    );
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), due.len(), "still one each");
    assert_bonus_documents(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_send_and_mark_delivered_creates_no_duplicate() {
    let r = rig(84, 30).await;
    let due = r.pending(ONEC_BONUS);
    // one document's Post action is lost too: the crash left it created but unposted
    r.sim.inject(
        Fault::new(FaultKind::Unavailable)
            .on("/Post")
            .method("POST")
            .after(3),
    );
    {
        let writer = r.writer();
        let results = writer.bonus_sink().deliver(&due).await;
        assert_eq!(results.iter().filter(|x| x.is_ok()).count(), due.len() - 1);
        // the process dies here: nothing is marked, the ledger is dropped
    }
    let Rig {
        sim,
        dir,
        cfg,
        ledger,
        clock,
    } = r;
    drop(ledger);
    let reopened = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).expect("reopen"));
    let r = Rig {
        sim,
        dir,
        cfg,
        ledger: reopened,
        clock,
    };
    assert_eq!(r.pending(ONEC_BONUS).len(), due.len(), "every row still pending");
    assert!(r.pending(ONEC_BONUS).iter().all(|x| x.attempts == 0));
    r.sim.clear_log();
    let report = r.deliver(ONEC_BONUS).await;
    assert_eq!((report.delivered, report.dead), (due.len(), 0), "{report:?}");
    let creates = r.creates(BONUS_DOCUMENTS);
    assert_eq!(creates.len(), due.len());
    assert!(
        creates.iter().all(|s| *s == 400),
        "every repeat POST met code 15: {creates:?}"
    );
    let posts = r
        .sim
        .requests()
        .iter()
        .filter(|q| q.resource.ends_with("/Post"))
        .count();
    assert_eq!(posts, 1, "only the unposted one is posted again");
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), due.len(), "no duplicate");
    assert_bonus_documents(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_that_assigns_its_own_keys_is_searched_by_comment() {
    let r = rig(85, 12).await;
    let row = r.keep_only_first(ONEC_BONUS);
    // a configuration that does not keep the client's Ref_Key; the POST is carried out but
    // its answer comes after the client's timeout
    r.sim.assign_own_keys(true);
    r.sim.inject(
        Fault::new(FaultKind::Delay(Duration::from_millis(2500)))
            .on(BONUS_DOCUMENTS)
            .method("POST"),
    );
    let first = r.deliver(ONEC_BONUS).await;
    assert_eq!((first.delivered, first.retried), (0, 1), "{first:?}");
    let docs = r.sim.entities(BONUS_DOCUMENTS);
    assert_eq!(docs.len(), 1);
    assert_ne!(docs[0].key, document_id(&row).to_string(), "1C chose the key");
    let second = r.deliver(ONEC_BONUS).await;
    assert_eq!((second.delivered, second.dead), (1, 0), "{second:?}");
    assert_eq!(r.creates(BONUS_DOCUMENTS).len(), 1, "no second POST");
    let docs = r.sim.entities(BONUS_DOCUMENTS);
    assert_eq!(docs.len(), 1, "exactly one document");
    assert!(posted(&docs[0]), "the document found by its comment is posted");
    assert!(
        r.sim
            .requests()
            .iter()
            .any(|q| q.method == "GET" && q.resource == BONUS_DOCUMENTS && q.query.contains("Date ge")),
        "the day's documents were scanned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_1c_does_not_know_is_a_permanent_failure_naming_it() {
    let r = rig(86, 12).await;
    let row = r.keep_only_first(ONEC_BONUS);
    let mut p: serde_json::Value = serde_json::from_str(&row.payload).expect("payload");
    p["card"] = "77770000".into();
    p["onec_id"] = serde_json::Value::Null;
    let id = r
        .ledger
        .lock()
        .outbox_enqueue(
            ONEC_BONUS,
            "onec:bonus:test-unknown-card",
            None,
            &p.to_string(),
            r.clock.now(),
        )
        .expect("enqueue")
        .expect("new row");
    let report = r.deliver(ONEC_BONUS).await;
    assert_eq!((report.delivered, report.dead), (1, 1), "{report:?}");
    let dead = r.ledger.lock().outbox_show(id).expect("row");
    let e = dead.last_error.unwrap_or_default();
    assert!(
        dead.state == OutboxState::Dead && e.contains("card 77770000 is not in Catalog_ДисконтныеКарты"),
        "{e}"
    );
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), 1, "nothing written for it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounting_postings_arrive_equal_to_the_journal_to_the_kopeck() {
    let r = rig(87, 80).await;
    // two days later the nightly job posts every past day
    r.clock.advance(chrono::Duration::days(2));
    let cfg = r.cfg.clone();
    let now = r.clock.now();
    let made = r
        .ledger
        .run(move |l| {
            let dest = cfg.destinations();
            l.post_accounting(
                &cfg.books(),
                cfg.accounting.lookback_days,
                &cfg.ingest_context(now, &dest),
            )
        })
        .await
        .expect("postings");
    assert!(!made.is_empty());
    let report = r.deliver(ONEC_ACCOUNTING).await;
    assert_eq!(
        (report.delivered, report.dead, report.retried),
        (made.len(), 0, 0),
        "{report:?}"
    );
    let pv = r.cfg.program.point_value.0;
    let account = |code: &str| guid("account", code);
    let rows = r.rows(ONEC_ACCOUNTING);
    assert_eq!(rows.len(), made.len());
    let mut per_day: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for row in &rows {
        let doc = document_of(&r.sim, ACCOUNTING_DOCUMENTS, row);
        assert!(posted(&doc));
        assert_eq!(field(&doc, "Организация_Key"), guid("organization", ORGANIZATION));
        let p: serde_json::Value = serde_json::from_str(&row.payload).expect("payload");
        let movements = p["points"].as_object().expect("movements");
        let lines = rows_of(&doc, "Проводки");
        assert_eq!(
            lines.len(),
            movements.values().filter(|v| v.as_i64() != Some(0)).count()
        );
        let mut total = 0i64;
        for line in lines {
            let amount = Money::parse_rubles(row_field(line, "Сумма"))
                .expect("an amount")
                .0;
            total += amount;
            // which movement: the one whose accounts and amount the line carries
            let (movement, points) = movements
                .iter()
                .find(|(m, v)| {
                    let (dt, kt) = &r.cfg.accounting.accounts[m.as_str()];
                    row_field(line, "СчетДт_Key") == account(dt)
                        && row_field(line, "СчетКт_Key") == account(kt)
                        && v.as_i64().map(|v| v * pv) == Some(amount)
                })
                .unwrap_or_else(|| panic!("no movement for line {line:?} of {movements:?}"));
            *per_day
                .entry(p["day"].as_str().expect("day").to_string())
                .or_default()
                .entry(movement.clone())
                .or_default() += points.as_i64().expect("points") * pv;
        }
        assert_eq!(
            Money::parse_rubles(field(&doc, "СуммаОперации"))
                .expect("total")
                .0,
            total,
            "the header total is the rows' sum"
        );
    }
    // and the documents of each day equal that day's journal, in kopecks
    let books_cfg = r.cfg.clone();
    for (day, kopecks) in &per_day {
        let d = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").expect("date");
        let journal = r
            .ledger
            .lock()
            .day_movements(&books_cfg.books(), d)
            .expect("journal");
        let mut want: BTreeMap<String, i64> = BTreeMap::new();
        for movements in journal.values() {
            for (m, pts) in movements {
                if *pts != 0 {
                    *want.entry(m.clone()).or_default() += pts * pv;
                }
            }
        }
        let got: BTreeMap<String, i64> = kopecks
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_eq!(got, want, "day {day}");
    }
    assert!(!per_day.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deliver_job_is_registered_checks_names_and_halts_on_missing_ones() {
    let r = rig(88, 20).await;
    let ctx = JobContext {
        cfg: r.cfg.clone(),
        ledger: r.ledger.clone(),
        clock: r.clock.clone(),
        cancel: CancellationToken::new(),
    };
    let due = r.pending(ONEC_BONUS).len();
    let results = run_once(&ctx, Some("onec:deliver")).await;
    assert_eq!(results.len(), 1, "the job is registered with postback = odata");
    let outcome = results[0].1.as_ref().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        outcome
            .summary
            .contains(&format!("bonus documents: {due} delivered")),
        "{outcome:?}"
    );
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), due);

    // the probe checks the written names too
    let clean = probe(&r.cfg).await.expect("probe");
    assert!(clean.ok(), "{clean}");
    r.sim
        .hide_property(&format!("{BONUS_DOCUMENTS}.НачисленияБонусов"), "Количество");
    let report = probe(&r.cfg).await.expect("probe");
    let missing: Vec<(String, String)> = report
        .missing
        .iter()
        .map(|m| (m.what.clone(), m.needed_by.clone()))
        .collect();
    assert_eq!(
        missing,
        [(
            format!("field {BONUS_DOCUMENTS}.НачисленияБонусов.Количество"),
            "bonus_document.accruals.points".to_string()
        )],
        "{report}"
    );
    // a new process's job refuses to write what 1C would silently ignore
    let cfg = r.cfg.clone();
    let now = r.clock.now();
    let extra = r
        .ledger
        .run(move |l| {
            let dest = cfg.destinations();
            l.post_accounting(&cfg.books(), 5, &cfg.ingest_context(now, &dest))
        })
        .await
        .expect("postings");
    let fresh = JobContext {
        cfg: r.cfg.clone(),
        ledger: r.ledger.clone(),
        clock: r.clock.clone(),
        cancel: CancellationToken::new(),
    };
    let results = run_once(&fresh, Some("onec:deliver")).await;
    let err = results[0].1.as_ref().expect_err("halted on a missing name");
    assert!(
        format!("{err:#}").contains("НачисленияБонусов.Количество"),
        "{err:#}"
    );
    assert_eq!(r.pending(ONEC_ACCOUNTING).len(), extra.len(), "nothing written");

    // postback = none: no job
    let none_dir = tempfile::tempdir().expect("dir");
    let none = write_config(none_dir.path(), &r.sim, "none");
    assert!(
        !kopilka::daemon::registry::jobs(&none)
            .iter()
            .any(|j| j.name() == "onec:deliver")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_documents_per_second_to_the_simulator() {
    let r = rig(89, 400).await;
    let due = r.pending(ONEC_BONUS).len();
    let started = Instant::now();
    let report = r.deliver(ONEC_BONUS).await;
    let took = started.elapsed();
    assert_eq!(report.delivered, due);
    let rate = due as f64 / took.as_secs_f64().max(1e-9);
    eprintln!(
        "onec_postback: {due} bonus documents created and posted in {:.2} s: {rate:.0} documents/s, {} requests",
        took.as_secs_f64(),
        r.sim.request_count()
    );
    assert_eq!(r.sim.entities(BONUS_DOCUMENTS).len(), due);
}
