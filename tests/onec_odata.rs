//! The OData connector against the 1C OData simulator, over real HTTP on loopback: history
//! at scale, edits and deletions, request counts, faults, credentials, the `$metadata`
//! probe, bonus balances and exact decimals. No sleeps: every step waits for its poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use kopilka::config::{self, Config};
use kopilka::ledger::{DateRange, Ledger, SharedLedger};
use kopilka::onec::odata::{
    ErrorClass, Failure, OdataError, OdataPoller, PollOptions, PollReport, RetryPolicy,
    import_balances_from_1c_at, probe,
};
use kopilka::sim::onec_odata::{
    Entity, Fault, FaultKind, OdataSim, OdataSimBuilder, RECEIPTS, RETURNS, Val, guid,
};
use tokio_util::sync::CancellationToken;

struct Rig {
    sim: OdataSim,
    _dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ledger: SharedLedger,
    poller: OdataPoller,
    now: DateTime<Utc>,
}

struct Setup {
    page_size: u32,
    per_tx: usize,
    timeout_seconds: u64,
    password: Option<String>,
    attempts: u32,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            page_size: 500,
            per_tx: 500,
            timeout_seconds: 10,
            password: None,
            attempts: 3,
        }
    }
}

fn local(t: NaiveDateTime) -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .from_local_datetime(&t)
        .earliest()
        .expect("a Moscow time")
        .with_timezone(&Utc)
}

async fn rig(sim: OdataSim, s: Setup) -> Rig {
    let dir = tempfile::tempdir().expect("temp dir");
    let pass = dir.path().join("odata.pass");
    std::fs::write(&pass, s.password.as_deref().unwrap_or(sim.password())).expect("password file");
    let toml = format!(
        r#"
[general]
timezone = "Europe/Moscow"
[ledger]
path = "{ledger}"
max_documents_per_transaction = {per_tx}
[onec]
system = "onec"
cost_price_type = "Закупочная"
[onec.odata]
url = "{url}"
user = "{user}"
password_file = "{pass}"
mapping = "{mapping}"
page_size = {page}
overlap_minutes = 60
timeout_seconds = {timeout}
rescan_days = 35
rescan_every_hours = 24
"#,
        ledger = dir.path().join("kopilka.db").display(),
        per_tx = s.per_tx,
        url = sim.base_url(),
        user = sim.user(),
        pass = pass.display(),
        mapping = sim.names().mapping,
        page = s.page_size,
        timeout = s.timeout_seconds,
    );
    let file = dir.path().join("kopilka.toml");
    std::fs::write(&file, toml).expect("config file");
    let cfg = Arc::new(config::load(Some(&file), &[]).unwrap_or_else(|r| panic!("{r}")));
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).expect("ledger"));
    let opts = PollOptions {
        retry: RetryPolicy {
            max_attempts_per_request: s.attempts,
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
        },
        ..PollOptions::default()
    };
    let poller = OdataPoller::with_options(cfg.clone(), opts).expect("poller");
    let now = local(sim.last_date() + chrono::Duration::hours(1));
    Rig {
        sim,
        _dir: dir,
        cfg,
        ledger,
        poller,
        now,
    }
}

impl Rig {
    async fn poll(&self) -> Result<PollReport, OdataError> {
        self.poller
            .poll(&self.ledger, self.now, &CancellationToken::new())
            .await
    }

    async fn poll_ok(&self) -> PollReport {
        self.poll().await.unwrap_or_else(|e| panic!("poll failed: {e}"))
    }

    /// The ledger's sales, returns and net total equal the base's.
    fn assert_matches(&self, when: &str) {
        let s = self
            .ledger
            .lock()
            .summary(&DateRange::default(), self.now)
            .expect("summary");
        let t = self.sim.truth();
        assert_eq!(
            (s.sales_count, s.returns_count, s.sales_total_kopecks),
            (t.sales, t.returns, t.net_total_kopecks),
            "{when}: ledger {s:?} vs base {t:?}"
        );
    }

    fn assert_verified(&self) {
        let v = self.ledger.lock().verify().expect("verify");
        assert!(v.is_empty(), "ledger verify: {v:#?}");
    }

    fn checkpoint(&self, set: &str) -> Option<String> {
        self.ledger
            .lock()
            .checkpoint(&self.poller.checkpoint_key(set))
            .expect("checkpoint")
    }
}

fn days(n: i64) -> chrono::Duration {
    chrono::Duration::days(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_documents_then_every_kind_of_change_converge() {
    let sim = OdataSimBuilder::new(7)
        .sales(10_000)
        .customers(300)
        .start()
        .await
        .expect("sim");
    let mut r = rig(sim, Setup::default()).await;
    let started = Instant::now();
    let first = r.poll_ok().await;
    let took = started.elapsed();
    let docs = first.applied + first.quarantined;
    eprintln!(
        "initial load: {} documents in {:.2} s ({:.0}/s), {} requests: {}",
        docs,
        took.as_secs_f64(),
        docs as f64 / took.as_secs_f64(),
        first.requests,
        first.summary()
    );
    assert!(first.applied > 10_000, "{first:?}");
    assert_eq!(first.rejected, 0, "{first:?}");
    assert_eq!(first.quarantined, 0, "{first:?}");
    r.assert_matches("after the initial load");
    r.assert_verified();

    // nothing new: one page of headers per document type
    r.sim.clear_log();
    let idle = r.poll_ok().await;
    assert_eq!(idle.requests, 2, "{idle:?} {:#?}", r.sim.requests());
    assert_eq!(r.sim.request_count(), 2);
    assert_eq!(idle.fetched, 0);

    // recent changes, inside the overlap window: the incremental poll sees them
    let sales = r.sim.sale_keys();
    let recent = &sales[sales.len() - 6..];
    assert!(r.sim.edit(&recent[0]));
    assert!(r.sim.set_posted(&recent[1], false));
    assert!(r.sim.set_deletion_mark(&recent[2], true));
    let fresh = r.sim.add_sales(25, None);
    assert!(r.sim.add_return(&recent[3]).is_some());
    r.now = local(r.sim.last_date() + chrono::Duration::minutes(5));
    let p = r.poll_ok().await;
    assert!(
        p.applied == fresh.len() + 1 && p.voided == 2 && p.new_versions == 1,
        "{p:?}"
    );
    r.assert_matches("after recent edits, unpostings, deletion marks and new documents");

    // unposted, then posted again: gone, then back
    assert!(r.sim.set_posted(&fresh[20], false));
    let p = r.poll_ok().await;
    assert_eq!((p.voided, p.fetched), (1, 0), "a void needs no lines: {p:?}");
    r.assert_matches("after unposting a new document");
    assert!(r.sim.set_posted(&fresh[20], true));
    let p = r.poll_ok().await;
    assert_eq!((p.new_versions, p.fetched), (1, 1), "{p:?}");
    r.assert_matches("after posting it again");

    // old changes, beyond the overlap but inside the re-scan window: only the re-scan sees them
    let old = &sales[sales.len() - 2_000..sales.len() - 1_990];
    assert!(r.sim.edit(&old[0]));
    assert!(r.sim.set_posted(&old[1], false));
    assert!(r.sim.set_deletion_mark(&old[2], true));
    assert!(r.sim.delete(&old[3]));
    assert!(r.sim.delete(&old[4]));
    let back_dated = r.sim.add_sales(3, Some(r.sim.last_date() - days(10)));
    let quiet = r.poll_ok().await;
    assert!(
        !quiet.rescanned && quiet.applied == 0 && quiet.deleted == 0,
        "{quiet:?}"
    );
    r.now += chrono::Duration::hours(25);
    let rescan = r.poll_ok().await;
    assert!(rescan.rescanned, "{rescan:?}");
    assert_eq!(rescan.deleted, 2, "{rescan:?}");
    assert_eq!(rescan.applied, back_dated.len(), "{rescan:?}");
    assert_eq!(rescan.new_versions, 1, "{rescan:?}");
    r.assert_matches("after the re-scan caught old edits, deletions and back-dated sales");
    r.assert_verified();

    // and the next poll is idle again
    r.sim.clear_log();
    let idle = r.poll_ok().await;
    assert_eq!(idle.requests, 2, "{idle:?}");
}

async fn idle_requests(sales: usize) -> (u64, usize) {
    let sim = OdataSimBuilder::new(11).sales(sales).start().await.expect("sim");
    let r = rig(sim, Setup::default()).await;
    r.poll_ok().await;
    r.sim.clear_log();
    let idle = r.poll_ok().await;
    r.assert_matches("idle poll");
    (idle.requests, r.sim.request_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_with_nothing_new_costs_the_same_at_1k_and_10k_documents() {
    let small = idle_requests(1_000).await;
    let large = idle_requests(10_000).await;
    eprintln!("requests per idle poll: 1k documents {small:?}, 10k documents {large:?}");
    assert_eq!(small, large);
    assert_eq!(small, (2, 2), "one page of headers per document type");
}

fn small_sim(seed: u64) -> OdataSimBuilder {
    OdataSimBuilder::new(seed)
        .sales(300)
        .customers(40)
        .products(60)
        .returns_percent(0)
}

fn paged() -> Setup {
    Setup {
        page_size: 50,
        per_tx: 40,
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_twice_then_200_is_retried_within_the_poll() {
    let sim = small_sim(21).start().await.expect("sim");
    sim.inject(
        Fault::new(FaultKind::InternalError)
            .on(RECEIPTS)
            .query("$skip=100")
            .times(2),
    );
    let r = rig(sim, paged()).await;
    r.poll_ok().await;
    r.assert_matches("after two 500s");
    let statuses: Vec<u16> = r
        .sim
        .requests()
        .iter()
        .filter(|q| q.resource == RECEIPTS && q.query.contains("$skip=100&"))
        .map(|q| q.status)
        .collect();
    assert_eq!(statuses[..3], [500, 500, 200], "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_503_fails_the_poll_without_moving_the_checkpoint_past_unapplied_documents() {
    let sim = small_sim(22).start().await.expect("sim");
    sim.inject(
        Fault::new(FaultKind::Unavailable)
            .on(RECEIPTS)
            .query("$skip=150")
            .times(1_000),
    );
    let r = rig(sim, paged()).await;
    let err = r.poll().await.expect_err("the poll fails");
    assert_eq!(err.class(), ErrorClass::Retriable, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(RECEIPTS) && msg.contains("HTTP 503") && msg.contains("$skip=150"),
        "{msg}"
    );
    assert!(msg.contains(&r.sim.base_url()), "{msg}");
    let cp = r
        .checkpoint(RECEIPTS)
        .expect("the pages before the failure were committed");
    let w = NaiveDateTime::parse_from_str(&cp, "%Y-%m-%dT%H:%M:%S").expect("a naive time");
    let before = DateRange {
        from: None,
        to: Some(local(w)),
    };
    let s = r.ledger.lock().summary(&before, r.now).expect("summary");
    let t = r.sim.truth_before(w);
    assert!(t.sales > 0 && t.sales < r.sim.truth().sales, "{t:?}");
    assert_eq!(
        (s.sales_count, s.sales_total_kopecks),
        (t.sales, t.net_total_kopecks)
    );
    let all = r
        .ledger
        .lock()
        .summary(&DateRange::default(), r.now)
        .expect("summary");
    assert!(all.sales_count < r.sim.truth().sales);

    r.sim.clear_faults();
    r.poll_ok().await;
    r.assert_matches("after the 503s stopped");
    r.assert_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_times_out_and_is_retried_and_a_lasting_one_fails_retriable() {
    let sim = small_sim(23).start().await.expect("sim");
    sim.inject(
        Fault::new(FaultKind::Delay(Duration::from_secs(3)))
            .on(RECEIPTS)
            .times(1),
    );
    let setup = Setup {
        timeout_seconds: 1,
        attempts: 2,
        ..paged()
    };
    let r = rig(sim, setup).await;
    r.poll_ok().await;
    r.assert_matches("after one slow answer");

    r.sim.add_sales(5, None);
    r.sim.inject(
        Fault::new(FaultKind::Delay(Duration::from_secs(3)))
            .on(RECEIPTS)
            .times(2),
    );
    let err = r.poll().await.expect_err("both attempts time out");
    assert_eq!(err.class(), ErrorClass::Retriable);
    assert!(
        matches!(
            &err,
            OdataError::Request {
                failure: Failure::Timeout(_),
                attempts: 2,
                ..
            }
        ),
        "{err}"
    );
    r.poll_ok().await;
    r.assert_matches("after the slowness passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_is_retried() {
    let sim = small_sim(24).start().await.expect("sim");
    sim.inject(
        Fault::new(FaultKind::Truncated)
            .on(RECEIPTS)
            .query("$skip=50")
            .times(1),
    );
    let r = rig(sim, paged()).await;
    let p = r.poll_ok().await;
    r.assert_matches("after a truncated answer");
    assert!(
        r.sim.requests().iter().any(|q| q.query.contains("$skip=50&")),
        "{p:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_page_or_an_exception_fails_permanently_naming_the_entity_and_url() {
    let sim = small_sim(25).returns_percent(5).start().await.expect("sim");
    sim.inject(Fault::new(FaultKind::Html200).on(RECEIPTS).times(1));
    let r = rig(sim, paged()).await;
    let err = r.poll().await.expect_err("HTML is no OData");
    assert_eq!(err.class(), ErrorClass::Permanent);
    let msg = err.to_string();
    assert!(
        msg.contains("text/html") && msg.contains(RECEIPTS) && msg.contains("1 attempt"),
        "{msg}"
    );
    let receipts_requests = r.sim.requests().iter().filter(|q| q.resource == RECEIPTS).count();
    assert_eq!(receipts_requests, 1, "a permanent failure is not retried");
    assert!(
        r.checkpoint(RETURNS).is_some(),
        "one broken document type does not stop the others"
    );

    // an exception in 1C's code on the returns set
    r.sim
        .inject(Fault::new(FaultKind::Exception).on(RETURNS).times(1));
    let err = r.poll().await.expect_err("code -1");
    assert_eq!(err.class(), ErrorClass::Permanent);
    let msg = err.to_string();
    assert!(
        msg.contains(RETURNS) && msg.contains("1C error -1") && msg.contains("деление на 0"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}/{RETURNS}?", r.sim.base_url())), "{msg}");
    let failed = r
        .sim
        .requests()
        .iter()
        .filter(|q| q.resource == RETURNS && q.status == 500)
        .count();
    assert_eq!(failed, 1, "a permanent failure is not retried");
    assert!(
        r.checkpoint(RECEIPTS).is_some(),
        "receipts were committed before the returns failed"
    );

    r.poll_ok().await;
    r.assert_matches("after the faults cleared");
    r.assert_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error_naming_the_user_and_url() {
    let sim = small_sim(26).start().await.expect("sim");
    let setup = Setup {
        password: Some("не-тот-пароль".into()),
        ..paged()
    };
    let r = rig(sim, setup).await;
    let err = r.poll().await.expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, OdataError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains("\"kopilka\"") && msg.contains(&r.sim.base_url()) && msg.contains("HTTP 401"),
        "{msg}"
    );
    assert!(
        !msg.contains("не-тот-пароль") && !msg.contains(r.sim.password()),
        "{msg}"
    );
    assert_eq!(
        r.sim.requests().iter().filter(|q| q.status == 401).count(),
        1,
        "no retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_names_a_missing_set_and_missing_fields() {
    let sim = small_sim(27).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    let clean = probe(&r.cfg).await.expect("probe");
    assert!(clean.ok(), "{clean}");
    assert!(clean.sets_published >= 9 && clean.checked > 40, "{clean}");

    r.sim.hide_set(RETURNS);
    r.sim.hide_property(RECEIPTS, "ДисконтнаяКарта_Key");
    r.sim
        .hide_property("Document_ЧекККМ.Товары", "СуммаСкидкиОплатыБонусом");
    let report = probe(&r.cfg).await.expect("probe");
    assert!(!report.ok());
    let text = report.to_string();
    let missing: Vec<(String, String)> = report
        .missing
        .iter()
        .map(|m| (m.what.clone(), m.needed_by.clone()))
        .collect();
    assert!(
        missing.contains(&(
            "entity set Document_ВозвратТоваровОтПокупателя".into(),
            "documents[1].set".into()
        )),
        "{text}"
    );
    assert!(
        missing.contains(&(
            "field Document_ЧекККМ.ДисконтнаяКарта_Key".into(),
            "documents[0].card".into()
        )),
        "{text}"
    );
    assert!(
        missing.contains(&(
            "field Document_ЧекККМ.Товары.СуммаСкидкиОплатыБонусом".into(),
            "documents[0].row.points_paid".into()
        )),
        "{text}"
    );
    assert_eq!(report.missing.len(), 3, "{text}");
    // and the poll itself fails loudly on the unpublished set
    let err = r.poll().await.expect_err("unpublished");
    assert!(
        err.to_string().contains("HTTP 400") || err.to_string().contains("HTTP 404"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bonus_balances_become_opening_balances_once() {
    let sim = small_sim(28).customers(120).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    let truth = r.sim.register_balances(r.now);
    assert_eq!(truth.len(), 120);
    let rows = r.poller.bonus_balances(r.now).await.expect("balances");
    assert_eq!(rows.len(), truth.len());
    assert!(rows.iter().all(Result::is_ok), "{rows:?}");

    let first = import_balances_from_1c_at(&r.cfg, &r.ledger, r.now)
        .await
        .expect("import");
    assert!(first.problems.is_empty(), "{first:?}");
    assert_eq!(first.points_imported, truth.iter().map(|t| t.points).sum::<i64>());
    let warn = chrono::Duration::days(14);
    for t in &truth {
        let by_key = r
            .ledger
            .lock()
            .balance(&format!("onec:{}", t.person_key), r.now, warn)
            .expect("customer by 1C id");
        assert_eq!(by_key.available, t.points, "{t:?}");
    }
    let second = import_balances_from_1c_at(&r.cfg, &r.ledger, r.now)
        .await
        .expect("import again");
    assert_eq!(second.points_imported, 0, "{second:?}");
    assert!(second.problems.is_empty(), "{second:?}");
    assert_eq!(second.unchanged, truth.iter().filter(|t| t.points != 0).count());
    for t in truth.iter().take(10) {
        let b = r
            .ledger
            .lock()
            .balance(&format!("onec:{}", t.person_key), r.now, warn)
            .expect("balance");
        assert_eq!(b.available, t.points);
    }
    r.assert_verified();
}

fn row(n: usize, product: &str, qty: &str, price: &str, sum: &str, bonus: &str) -> Vec<(String, Val)> {
    vec![
        ("LineNumber".into(), Val::str(n.to_string())),
        ("Номенклатура_Key".into(), Val::str(product)),
        (
            "Характеристика_Key".into(),
            Val::str("00000000-0000-0000-0000-000000000000"),
        ),
        ("Количество".into(), Val::Num(qty.into())),
        ("Цена".into(), Val::Num(price.into())),
        ("Сумма".into(), Val::Num(sum.into())),
        ("СуммаРучнойСкидки".into(), Val::Num("0".into())),
        ("СуммаАвтоматическойСкидки".into(), Val::Num("0".into())),
        ("СуммаСкидкиОплатыБонусом".into(), Val::Num(bonus.into())),
        (
            "Продавец_Key".into(),
            Val::str("00000000-0000-0000-0000-000000000000"),
        ),
    ]
}

fn receipt(
    sim: &OdataSim,
    key: &str,
    date: NaiveDateTime,
    total: Val,
    rows: Vec<Vec<(String, Val)>>,
) -> Entity {
    Entity::new(key)
        .with("Ref_Key", Val::str(key))
        .with("DataVersion", sim.next_data_version())
        .with("DeletionMark", Val::Bool(false))
        .with("Number", Val::str(format!("ЧК-{}", &key[..8])))
        .with("Date", Val::str(date.format("%Y-%m-%dT%H:%M:%S").to_string()))
        .with("Posted", Val::Bool(true))
        .with("ВидОперации", Val::str("Продажа"))
        .with("Магазин_Key", Val::str("00000000-0000-0000-0000-000000000000"))
        .with(
            "ДисконтнаяКарта_Key",
            Val::str("00000000-0000-0000-0000-000000000000"),
        )
        .with("СуммаДокумента", total)
        .with("Товары", Val::Rows(rows))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimals_arrive_exact_and_a_malformed_document_is_quarantined_with_its_url() {
    let sim = small_sim(29).sales(20).start().await.expect("sim");
    let shop = sim.shop();
    let p = |i: usize| guid("product", &shop.products[i].id);
    let at = sim.last_date() + chrono::Duration::minutes(3);
    let exact = guid("doc", "exact");
    sim.insert(
        RECEIPTS,
        receipt(
            &sim,
            &exact,
            at,
            Val::Num("231.94".into()),
            vec![
                row(1, &p(0), "3", "0.1", "0.3", "0"),
                row(2, &p(1), "1.2345", "0.2", "0.25", "0"),
                row(3, &p(2), "1", "232.74", "231.39", "1"),
            ],
        ),
    );
    let bad = guid("doc", "bad");
    sim.insert(
        RECEIPTS,
        receipt(
            &sim,
            &bad,
            at,
            Val::Num("10".into()),
            vec![row(1, &p(0), "\"abc\"", "10", "10", "0")],
        ),
    );
    let r = rig(sim, paged()).await;
    let report = r.poll_ok().await;
    assert_eq!(report.rejected, 1, "{report:?}");

    let mut found = None;
    r.ledger
        .lock()
        .for_each_sale(&DateRange::default(), |s| {
            if s.doc.source.doc_id == exact {
                found = Some(s.doc.clone());
            }
        })
        .expect("sales");
    let doc = found.expect("the exact receipt is in the ledger");
    let nets: Vec<i64> = doc.lines.iter().map(|l| l.net.0).collect();
    // the last line's 1-ruble payment with points counts in its value
    assert_eq!(nets, [30, 25, 23239]);
    assert_eq!(doc.lines[1].quantity.to_string(), "1.2345");
    assert_eq!(doc.lines[2].unit_price.0, 23274);
    assert_eq!(doc.total.0, 23294);
    assert_eq!(doc.points_redeemed.0, 1);
    assert!(doc.lines[0].unit_cost.is_some(), "cost from the price register");
    assert!(
        doc.lines[0].category.is_some(),
        "category from the product's group"
    );

    let q = r.ledger.lock().quarantine_list(false).expect("quarantine");
    let entry = q
        .iter()
        .find(|e| e.doc_ref == bad)
        .expect("the bad receipt is quarantined");
    assert!(entry.reason.contains("Количество"), "{entry:?}");
    let location = entry.location.clone().unwrap_or_default();
    assert!(
        location.contains(&format!("{RECEIPTS}(guid'{bad}')")),
        "{location}"
    );
    r.assert_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_is_registered_and_runs_once() {
    let sim = small_sim(30).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    let names: Vec<String> = kopilka::daemon::registry::jobs(&r.cfg)
        .iter()
        .map(|j| j.name().to_string())
        .collect();
    assert!(names.contains(&"onec:odata".to_string()), "{names:?}");
    let ctx = kopilka::daemon::JobContext {
        cfg: r.cfg.clone(),
        ledger: r.ledger.clone(),
        clock: Arc::new(kopilka::clock::FakeClock::new(r.now)),
        cancel: CancellationToken::new(),
    };
    let results = kopilka::daemon::run_once(&ctx, Some("onec:odata")).await;
    assert_eq!(results.len(), 1);
    let (name, outcome) = &results[0];
    let outcome = outcome.as_ref().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(outcome.summary.contains("applied"), "{outcome:?}");
    r.assert_matches("after kopilka once");
}

#[test]
fn the_probe_reads_1c_shaped_metadata() {
    let xml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/onec_odata/metadata-roznica-partial.xml"),
    )
    .expect("fixture");
    let schema = kopilka::onec::odata::probe::parse_metadata(&xml).expect("parses");
    assert_eq!(schema.sets.len(), 6);
    assert_eq!(
        schema.types["Document_ЧекККМ"]["Товары"],
        "Collection(StandardODATA.Document_ЧекККМ_Товары_RowType)"
    );
    // the fixture is a base published with the names kopilka once guessed for Розница
    // (КартыЛояльности, Партнеры): Розница 2's mapping names each real name it lacks
    let mapping = kopilka::onec::mapping::load("roznica", None).expect("built in");
    let (checked, missing) = kopilka::onec::odata::probe::check(&mapping, &schema);
    let got: Vec<(&str, &str)> = missing
        .iter()
        .map(|m| (m.what.as_str(), m.needed_by.as_str()))
        .collect();
    for want in [
        ("field Document_ЧекККМ.ДисконтнаяКарта_Key", "documents[0].card"),
        (
            "field Document_ЧекККМ.ЧекККМПродажа_Key",
            "documents[0].return_link",
        ),
        (
            "field Document_ЧекККМ.Товары.СуммаСкидкиОплатыБонусом",
            "documents[0].row.points_paid",
        ),
        (
            "entity set Document_ВозвратТоваровОтПокупателя",
            "documents[1].set",
        ),
        ("entity set Catalog_ИнформационныеКарты", "cards.set"),
        ("entity set Catalog_ФизическиеЛица", "people.set"),
        ("entity set AccumulationRegister_БонусныеБаллы", "bonus.set"),
    ] {
        assert!(got.contains(&want), "{want:?} not in {got:?}");
    }
    // what the fixture has is not reported
    assert!(
        !got.iter().any(|(w, _)| w.contains("Товары.Количество")),
        "{got:?}"
    );
    assert!(kopilka::onec::odata::probe::looks_like(&schema, false).is_empty());
    assert!(checked > 30, "{checked}");
    assert!(kopilka::onec::odata::probe::parse_metadata("<html><body>IIS</body></html>").is_err());
    assert!(kopilka::onec::odata::probe::parse_metadata("<edmx:Edmx><broken").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kopilka_check_probe_exits_1_naming_what_is_missing() {
    let sim = small_sim(31).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    let file = r.cfg.file.clone().expect("a config file");
    let run = |file: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
                .args(["check", "--probe", "--config"])
                .arg(file)
                .output()
                .expect("kopilka runs")
        })
    };
    let ok = run(file.clone()).await.expect("joined");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("every mapped set and field is published"), "{out}");

    r.sim.hide_property(RECEIPTS, "ДисконтнаяКарта_Key");
    let bad = run(file).await.expect("joined");
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(
        out.contains("missing field Document_ЧекККМ.ДисконтнаяКарта_Key (needed by documents[0].card)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_sync_stores_only_what_changed_and_new_prices_by_period() {
    let sim = small_sim(32).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    let first = r.poller.sync_catalog(&r.ledger, r.now).await.expect("sync");
    assert_eq!(
        (first.products, first.groups, first.price_types),
        (61, 5, 2),
        "{first:?}"
    );
    assert_eq!(first.prices, 61, "only the cost price type: {first:?}");
    let again = r.poller.sync_catalog(&r.ledger, r.now).await.expect("sync");
    assert_eq!(
        (again.products, again.groups, again.unchanged),
        (0, 0, 66),
        "{again:?}"
    );

    // a new purchase price from today
    let shop = r.sim.shop();
    let product = guid("product", &shop.products[0].id);
    let today = r.sim.last_date();
    r.sim.insert(
        kopilka::sim::onec_odata::PRICES,
        Entity::new("price:new")
            .with("Period", Val::str(today.format("%Y-%m-%dT%H:%M:%S").to_string()))
            .with("Номенклатура_Key", Val::str(&product))
            .with(
                "Характеристика_Key",
                Val::str("00000000-0000-0000-0000-000000000000"),
            )
            .with("ВидЦены_Key", Val::str(guid("price-type", "Закупочная")))
            .with("Цена", Val::Num("12.34".into())),
    );
    r.sim.clear_log();
    let third = r.poller.sync_catalog(&r.ledger, r.now).await.expect("sync");
    // the last period read before comes again (the overlap), then the new one
    assert_eq!(third.prices, 62, "{third:?}");
    let fourth = r.poller.sync_catalog(&r.ledger, r.now).await.expect("sync");
    assert_eq!(
        fourth.prices, 1,
        "only prices from the latest period on: {fourth:?}"
    );
    let prices_query = r
        .sim
        .requests()
        .into_iter()
        .find(|q| q.resource == kopilka::sim::onec_odata::PRICES)
        .expect("prices read");
    assert!(
        prices_query.query.contains("$filter=Period ge datetime'"),
        "{prices_query:?}"
    );
    let policy = kopilka::ledger::CostPolicy {
        price_type: "Закупочная".into(),
        backfill: false,
    };
    let cost = r.ledger.lock().cost_at(&product, &policy, r.now).expect("cost");
    assert_eq!(cost.map(|m| m.0), Some(1234));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_answers_as_1c_does() {
    let sim = small_sim(33).sales(30).start().await.expect("sim");
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let get = |url: String, auth: bool| {
        let req = http.get(url);
        let req = if auth {
            req.basic_auth(sim.user(), Some(sim.password()))
        } else {
            req
        };
        async move {
            let resp = req.send().await.expect("answer");
            let status = resp.status().as_u16();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (status, ctype, resp.text().await.expect("body"))
        }
    };
    let receipts = format!("{base}/Document_%D0%A7%D0%B5%D0%BA%D0%9A%D0%9A%D0%9C");
    let (status, _, _) = get(format!("{receipts}?$format=json"), false).await;
    assert_eq!(status, 401, "no credentials");
    let (status, ctype, _) = get(receipts.clone(), true).await;
    assert_eq!(status, 200);
    assert!(ctype.contains("atom"), "Atom without $format=json: {ctype}");
    let (status, _, body) = get(format!("{base}/Document_Nothing?$format=json"), true).await;
    assert_eq!(status, 404);
    assert!(body.contains("\"code\":\"9\""), "{body}");
    let (status, _, body) = get(format!("{receipts}?$format=json&$select=Ref_Key,Нет"), true).await;
    assert_eq!(status, 400, "{body}");
    // $inlinecount makes 1C ignore $top and $skip
    let (_, _, body) = get(
        format!("{receipts}?$format=json&$top=2&$inlinecount=allpages&$select=Ref_Key"),
        true,
    )
    .await;
    assert!(body.contains("\"odata.count\":\"30\""), "{body}");
    assert_eq!(body.matches("Ref_Key").count(), 30, "{body}");
    // numbers are literals, Int64 is a string, dates are naive
    let (_, _, body) = get(format!("{receipts}?$format=json&$top=1&$orderby=Date"), true).await;
    assert!(body.contains("\"LineNumber\":\"1\""), "{body}");
    assert!(body.contains("\"Date\":\"2026-01-10T10:"), "{body}");
    assert!(body.contains("\"DataVersion\":\"AAAA"), "{body}");
    let (status, ctype, body) = get(format!("{base}/$metadata"), true).await;
    assert_eq!(status, 200);
    assert!(
        ctype.contains("xml") && body.contains("<EntitySet Name=\"Document_ЧекККМ\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_against_a_re_read_of_1c_finds_what_the_ingest_record_cannot() {
    use kopilka::ledger::DiffKind;
    let sim = small_sim(41).start().await.expect("sim");
    let r = rig(sim, paged()).await;
    r.poll_ok().await;
    let tz = r.cfg.timezone;
    let first = r.sim.last_date().date() - chrono::Duration::days(3);
    let last = r.sim.last_date().date() + chrono::Duration::days(1);
    let window = (
        first.and_hms_opt(0, 0, 0).expect("midnight"),
        (last + chrono::Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight"),
    );
    let entities = std::collections::BTreeMap::new();
    let books = kopilka::ledger::Books {
        default_entity: "Организация",
        entities: &entities,
        tz,
        point_value_kopecks: 100,
        destination: None,
        history: kopilka::ledger::HistoryPosting::Opening,
    };
    // the source's side is under test here, not the books: no day is due for posting yet
    let reconcile = |truth: Option<&[kopilka::ledger::SourceDoc]>| {
        r.ledger
            .lock()
            .reconcile(first, last, &books, first, truth)
            .expect("reconcile")
    };

    let truth = r.poller.source_docs(window.0, window.1).await.expect("re-read");
    assert_eq!(truth.len(), 300, "every document of the period");
    let clean = reconcile(Some(&truth));
    assert_eq!(clean.truth, "re-read from the source");
    assert!(clean.clean(), "{:#?}", clean.differences);
    assert_eq!(clean.days.iter().map(|d| d.source_documents).sum::<i64>(), 300);
    for d in &clean.days {
        assert_eq!(d.source_total_kopecks, d.ledger_total_kopecks, "{d:?}");
    }

    // 1C changes while kopilka is not polling: an edit, an unposting, a new sale
    let mut keys = r.sim.sale_keys();
    let date_of = |k: &String| match r.sim.entity(RECEIPTS, k).and_then(|e| e.get("Date").cloned()) {
        Some(Val::Str(d)) => d,
        _ => String::new(),
    };
    keys.sort_by_key(|k| std::cmp::Reverse(date_of(k)));
    assert!(r.sim.edit(&keys[1]));
    assert!(r.sim.set_posted(&keys[2], false));
    let added = r.sim.add_sales(1, None);
    assert!(
        reconcile(None).clean(),
        "what kopilka recorded at ingest cannot know"
    );
    let truth = r.poller.source_docs(window.0, window.1).await.expect("re-read");
    let found: std::collections::BTreeMap<String, DiffKind> = reconcile(Some(&truth))
        .differences
        .iter()
        .map(|d| (d.document.clone(), d.kind))
        .collect();
    let expected: std::collections::BTreeMap<String, DiffKind> = [
        (keys[1].clone(), DiffKind::ChangedAfterPosting),
        (keys[2].clone(), DiffKind::ChangedAfterPosting),
        (added[0].clone(), DiffKind::MissingInLedger),
    ]
    .into_iter()
    .collect();
    assert_eq!(found, expected);

    // the command exits 1 while they differ, naming the documents
    let file = r.cfg.file.clone().expect("a config file");
    let (from_arg, to_arg) = (first.to_string(), last.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
            .arg("--config")
            .arg(file)
            .args(["reconcile", "--source", "odata", "--format", "json"])
            .args(["--from", &from_arg, "--to", &to_arg])
            .output()
            .expect("kopilka runs")
    })
    .await
    .expect("joined");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&added[0]) && text.contains(&keys[1]), "{text}");

    // after a poll the ledger and 1C agree again
    r.poll_ok().await;
    let truth = r.poller.source_docs(window.0, window.1).await.expect("re-read");
    let again = reconcile(Some(&truth));
    assert!(again.clean(), "{:#?}", again.differences);
}
