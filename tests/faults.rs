//! Fault test: the same shop run twice through the real jobs — once clean, once with the
//! simulators failing in every way they know (1C: 500s, an exception, 503 pages, answers
//! past the timeout, truncated JSON, an HTML page with 200; AmoCRM: 429 storms, 5xx, HTML
//! errors, truncated bodies, answers past the timeout, expired access tokens, a 429 with
//! `Retry-After`, events arriving while the client pages through them so that pages repeat
//! what it has read). The faulty run must converge to exactly the clean run's final state.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kopilka::clock::SystemClock;
use kopilka::config;
use kopilka::daemon::{JobContext, run_once};
use kopilka::ledger::{DateRange, Ledger, OpenOptions, SharedLedger};
use kopilka::sim::amocrm::{AmoSim, Fault as AmoFault};
use kopilka::sim::onec_odata::{Fault, FaultKind, OdataSim, OdataSimBuilder};

const SEED: u64 = 77;

/// What the two runs are compared on.
#[derive(Debug, PartialEq, Eq)]
struct FinalState {
    sales: i64,
    returns: i64,
    total: i64,
    available: i64,
    /// card → (ledger balance, AmoCRM field)
    cards: BTreeMap<String, (i64, Option<String>)>,
}

async fn setup(dir: &Path) -> (OdataSim, AmoSim, JobContext) {
    let onec = OdataSimBuilder::new(SEED)
        .sales(800)
        .customers(60)
        .products(50)
        .lines(3)
        .start()
        .await
        .unwrap();
    let amo = AmoSim::builder()
        .requests_per_second(50)
        .oauth_client("kopilka-client", "client-secret", "https://shop.example/oauth")
        .start()
        .await
        .unwrap();
    std::fs::write(dir.join("odata-password"), onec.password()).unwrap();
    std::fs::write(dir.join("client-secret"), "client-secret").unwrap();
    let path = dir.join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            r#"[ledger]
path = "{ledger}"
max_documents_per_transaction = 100
[onec]
cost_price_type = "Закупочная"
[onec.odata]
url = "{odata}"
user = "{user}"
password_file = "odata-password"
page_size = 100
overlap_minutes = 44640
timeout_seconds = 1
[amocrm]
base_url = "{amo}"
client_id = "kopilka-client"
client_secret_file = "client-secret"
redirect_uri = "https://shop.example/oauth"
requests_per_second = 50
timeout_seconds = 1
events_page_size = 5
backoff_initial_ms = 10
backoff_max_ms = 200
[outbox]
backoff_initial_ms = 1
backoff_max_ms = 5
"#,
            ledger = dir.join("k.db").display(),
            odata = onec.base_url(),
            user = onec.user(),
            amo = amo.base_url,
        ),
    )
    .unwrap();
    // a person authorises the integration once
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
        .arg("--config")
        .arg(&path)
        .args(["amocrm", "auth", "--code", &amo.issue_code()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap());
    let ctx = JobContext {
        cfg,
        ledger,
        clock: Arc::new(SystemClock),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    (onec, amo, ctx)
}

/// Runs every job until a run has no failure and nothing is left pending (or gives up).
async fn converge(ctx: &JobContext, onec: &OdataSim, amo: &AmoSim, faulty: bool) -> usize {
    let mut failed_runs = 0;
    for round in 0..25 {
        if faulty && round == 3 {
            amo.expire_access_tokens();
        }
        if round == 1 {
            // the base changes after the first load, in both runs
            let keys = onec.sale_keys();
            onec.add_sales(20, None);
            onec.edit(&keys[3]);
            onec.add_return(&keys[5]);
        }
        let started = std::time::Instant::now();
        let results = run_once(ctx, None).await;
        let failures = results.iter().filter(|(_, r)| r.is_err()).count();
        eprintln!(
            "round {round}: {:?}, failed: {:?}",
            started.elapsed(),
            results
                .iter()
                .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
                .collect::<Vec<_>>()
        );
        if failures > 0 {
            failed_runs += 1;
            continue;
        }
        let pending = ctx
            .ledger
            .run(|l| l.outbox_counts())
            .await
            .unwrap()
            .iter()
            .filter(|(_, s, _)| *s == kopilka::ledger::OutboxState::Pending)
            .map(|(_, _, n)| n)
            .sum::<i64>();
        if pending == 0 && round >= 2 {
            return failed_runs;
        }
    }
    panic!("did not converge in 25 runs");
}

async fn final_state(ctx: &JobContext, amo: &AmoSim) -> FinalState {
    let now = chrono::Utc::now();
    let s = ctx
        .ledger
        .run(move |l| l.summary(&DateRange::default(), now))
        .await
        .unwrap();
    let v = ctx.ledger.run(|l| l.verify()).await.unwrap();
    assert!(v.is_empty(), "{v:#?}");
    let ids = ctx.ledger.run(|l| l.customer_ids()).await.unwrap();
    let mut cards = BTreeMap::new();
    for id in ids {
        let b = ctx
            .ledger
            .run(move |l| l.balance_of(id, now, chrono::Duration::days(14)))
            .await
            .unwrap();
        let contact = b
            .customer
            .amocrm_id
            .as_deref()
            .and_then(|c| c.parse::<i64>().ok());
        let shown = contact.and_then(|c| amo.field_value(c, "KOPILKA_POINTS"));
        cards.insert(
            b.customer.card.clone().unwrap_or_else(|| format!("id:{id}")),
            (b.available, shown),
        );
    }
    FinalState {
        sales: s.sales_count,
        returns: s.returns_count,
        total: s.sales_total_kopecks,
        available: s.points_available,
        cards,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_run_converges_to_the_clean_runs_state() {
    let clean_dir = tempfile::tempdir().unwrap();
    let (onec, amo, ctx) = setup(clean_dir.path()).await;
    assert_eq!(
        converge(&ctx, &onec, &amo, false).await,
        0,
        "the clean run has no failure"
    );
    let clean = final_state(&ctx, &amo).await;
    let t = onec.truth();
    assert_eq!(
        (clean.sales, clean.returns, clean.total),
        (t.sales, t.returns, t.net_total_kopecks)
    );

    let faulty_dir = tempfile::tempdir().unwrap();
    let (onec, amo, ctx) = setup(faulty_dir.path()).await;
    let odata =
        |k: FaultKind, on: &str, after: usize, times: usize| Fault::new(k).on(on).after(after).times(times);
    onec.inject(odata(FaultKind::InternalError, "Document_ЧекККМ", 0, 2));
    onec.inject(odata(FaultKind::Unavailable, "Document_ЧекККМ", 3, 1));
    onec.inject(odata(
        FaultKind::Delay(Duration::from_millis(2500)),
        "Document_ЧекККМ",
        5,
        1,
    ));
    onec.inject(odata(FaultKind::Truncated, "Document_ЧекККМ", 7, 1));
    onec.inject(odata(FaultKind::Html200, "Catalog_", 2, 1));
    onec.inject(odata(FaultKind::Exception, "Document_ЧекККМ", 9, 1));
    amo.inject(AmoFault::Status(429), 8);
    amo.inject(AmoFault::Html(429), 2);
    amo.inject(AmoFault::Status(503), 3);
    amo.inject(AmoFault::Html(502), 1);
    amo.inject(AmoFault::Truncated, 2);
    amo.inject(AmoFault::Delay(Duration::from_millis(2500)), 1);
    amo.inject(AmoFault::RetryAfter(1), 1);
    amo.events_arrive_while_paging(7);
    let failed_runs = converge(&ctx, &onec, &amo, true).await;
    let faulty = final_state(&ctx, &amo).await;
    assert!(failed_runs > 0 || amo.rate_limited() > 0, "the faults fired");
    assert!(!amo.is_blocked(), "backing off never got the account blocked");
    assert_eq!(
        amo.retry_after_ignored(),
        0,
        "no request went out before Retry-After passed"
    );
    assert_eq!(
        amo.events_burst_pending(),
        0,
        "events arrived while the client paged (it read a second page)"
    );
    assert_eq!(
        faulty, clean,
        "the faulty run's final state differs from the clean run's"
    );
}
