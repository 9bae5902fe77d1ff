//! The daemon in-process: jobs on their schedules, the HTTP endpoint (health, metrics,
//! status page, the till API), a missed tick run at start, and a clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use kopilka::clock::SystemClock;
use kopilka::config;
use kopilka::daemon::runtime::{Runtime, run};
use kopilka::ledger::{Batch, Item, Ledger, OpenOptions};
use kopilka::sim::sales::Shop;

struct Daemon {
    _dir: tempfile::TempDir,
    base: String,
    rt: Arc<Runtime>,
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn prepare(dir: &std::path::Path, extra: &str) -> config::Config {
    std::fs::write(dir.join("api-token"), "till-token\n").unwrap();
    let path = dir.join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n[daemon]\nhttp_listen = \"127.0.0.1:0\"\napi_token_file = \"api-token\"\n\
             shutdown_deadline_seconds = 5\n{extra}",
            dir.join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
    // a few sales so balances and quotes have something to show
    let mut ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    // three weeks old: past the return window (so usable at the till) and on the status chart
    let mut shop = Shop::generate(1, 50, 5);
    shop.start = chrono::Utc::now() - chrono::Duration::days(21);
    let mut rng = fastrand::Rng::with_seed(1);
    let items = (0..20)
        .map(|i| {
            Item::Incoming(kopilka::core::document::Incoming::Document(shop.sale(
                &mut rng,
                i,
                3,
                Some(i % 5),
                0,
            )))
        })
        .collect();
    let dest = cfg.destinations();
    let now = chrono::Utc::now();
    ledger
        .ingest(
            Batch {
                source: "test".into(),
                items,
                checkpoint: Some("20".into()),
                ..Default::default()
            },
            &cfg.ingest_context(now, &dest),
        )
        .unwrap();
    cfg
}

async fn start(dir: tempfile::TempDir, cfg: config::Config) -> Daemon {
    let rt = Arc::new(Runtime::new(chrono::Utc::now()));
    let stop = tokio_util::sync::CancellationToken::new();
    let ready = rt.ran.notified();
    let handle = tokio::spawn(run(
        Arc::new(cfg),
        Arc::new(SystemClock),
        stop.clone(),
        rt.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the daemon becomes ready");
    let addr = rt.http_addr.lock().unwrap().expect("listening");
    Daemon {
        _dir: dir,
        base: format!("http://{addr}"),
        rt,
        stop,
        handle,
    }
}

async fn wait_for_runs(d: &Daemon, job: &str, runs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ran = d.rt.ran.notified();
        if d.rt.jobs().get(job).is_some_and(|j| j.runs >= runs) {
            return;
        }
        tokio::time::timeout_at(deadline, ran)
            .await
            .unwrap_or_else(|_| panic!("job {job} did not run {runs} times: {:?}", d.rt.jobs()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_schedule_and_the_endpoint_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = prepare(dir.path(), "[daemon.schedule]\nnightly = \"* * * * * *\"\n");
    let d = start(dir, cfg).await;
    wait_for_runs(&d, "nightly", 2).await;
    let http = reqwest::Client::new();

    let health: serde_json::Value = http
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    let metrics = http
        .get(format!("{}/metrics", d.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kopilka_job_runs_total{job=\"nightly\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kopilka_points_liability_points{state=\"available\"}"));
    assert!(metrics.contains("kopilka_sync_lag_seconds{source=\"test\"}"));

    let page = http
        .get(format!("{}/status", d.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<svg")
            && page.contains("Синхронизация")
            && page.contains("nightly")
            && page.contains("Сверка за вчера и сегодня"),
        "{page}"
    );

    // the accountants' report: a period in days or all time; anything else is refused
    for q in ["", "?days=90", "?days=all"] {
        let r = http.get(format!("{}/report{q}", d.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "/report{q}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("Программа лояльности") && body.contains("/report?days=all"),
            "/report{q}: {body}"
        );
    }
    let bad = http
        .get(format!("{}/report?days=-3", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let problem = bad.text().await.unwrap();
    assert!(problem.contains("days"), "{problem}");

    // the till API needs the bearer token
    let card = "200000000000";
    let url = format!("{}/v1/customers/{card}/balance", d.base);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url).bearer_auth("wrong").send().await.unwrap().status(),
        401
    );
    let b: serde_json::Value = http
        .get(&url)
        .bearer_auth("till-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(b["available"].as_i64().unwrap() > 0, "{b}");
    let unknown = http
        .get(format!("{}/v1/customers/nobody/balance", d.base))
        .bearer_auth("till-token")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let q: serde_json::Value = http
        .post(format!("{}/v1/quote", d.base))
        .bearer_auth("till-token")
        .json(&serde_json::json!({
            "customer": card,
            "lines": [
                {"product_id": "P1", "quantity": "2", "net_kopecks": 200000, "unit_cost_kopecks": 60000},
                {"product_id": "P2", "quantity": 1, "net_kopecks": 50000, "unit_cost_kopecks": 49000}
            ]
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let max = q["max_redeemable_points"].as_i64().unwrap();
    assert!(max > 0 && max <= b["available"].as_i64().unwrap(), "{q}");
    let alloc: Vec<i64> = q["allocation_kopecks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(
        alloc[0] <= 200000 - 120000 && alloc[1] <= 1000,
        "never below cost: {q}"
    );
    assert!(q["accrual_preview"]["points"].is_i64());
    let bad = http
        .post(format!("{}/v1/quote", d.base))
        .bearer_auth("till-token")
        .json(&serde_json::json!({"customer": card, "lines": [{"product_id": "P", "quantity": -1, "net_kopecks": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    d.stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), d.handle).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the daemon stops within the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_missed_while_down_runs_once_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = prepare(dir.path(), "[daemon.schedule]\nnightly = \"0 0 3 * * *\"\n");
    {
        let mut l = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
        let two_days_ago = (chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339();
        l.meta_set("job_last_run:nightly", &two_days_ago).unwrap();
    }
    let d = start(dir, cfg).await;
    wait_for_runs(&d, "nightly", 1).await;
    let status = &d.rt.jobs()["nightly"];
    assert!(
        status.next_run.unwrap() > chrono::Utc::now(),
        "back on its schedule: {status:?}"
    );
    d.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), d.handle).await;
}
