//! Crash test for holds: the real daemon (`kopilka run`, a child process) serving
//! `/v1/holds`, killed with SIGKILL while tills hold and commit concurrently, restarted each
//! time, every request then replayed with its idempotency key as a till retries after a
//! lost answer. At the end: one hold per key, each committed once, the balance exactly the
//! opening points minus the commits, `ledger verify` clean — nothing lost, nothing doubled.
//!
//! The seed is printed on failure; set KOPILKA_CRASH_SEED to replay one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kopilka::config;
use kopilka::ledger::{DateRange, Ledger, OpenOptions, OpeningRow};
use serde_json::{Value, json};

const ROUNDS: usize = 6;
const PER_ROUND: usize = 8;
const CARD: &str = "2000000000024";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill(mut child: Child) {
    let _ = child.kill(); // SIGKILL: no shutdown, mid-transaction
    let _ = child.wait();
}

/// Starts the daemon and waits until its HTTP endpoint answers.
async fn start(config: &Path, base: &str, http: &reqwest::Client) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_kopilka"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("KOPILKA_LOG", "warn")
        .spawn()
        .expect("kopilka runs");
    for _ in 0..400 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    kill(child);
    panic!("the daemon did not start listening on {base}");
}

fn basket(i: usize) -> Value {
    json!([{"product_id": format!("P{i}"), "quantity": 1, "net_kopecks": 100000, "unit_cost_kopecks": 10000}])
}

/// Holds and commits one basket; `None` when the daemon went away mid-way.
async fn hold_and_commit(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    i: usize,
    points: i64,
) -> Option<(String, i64)> {
    let r = http
        .post(format!("{base}/v1/holds"))
        .bearer_auth("till-token")
        .json(&json!({"customer": CARD, "lines": basket(i), "points_wanted": points, "idempotency_key": key}))
        .send()
        .await
        .ok()?;
    assert_eq!(r.status(), 200, "hold {key}");
    let h: Value = r.json().await.ok()?;
    let id = h["hold_id"].as_str().unwrap().to_string();
    let r = http
        .post(format!("{base}/v1/holds/{id}/commit"))
        .bearer_auth("till-token")
        .json(&json!({"lines": basket(i)}))
        .send()
        .await
        .ok()?;
    assert_eq!(r.status(), 200, "commit {key} (hold {id})");
    let c: Value = r.json().await.ok()?;
    Some((id, c["commit"]["points"].as_i64().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_hold_and_commit_the_daemon_loses_and_doubles_nothing() {
    let seed: u64 = std::env::var("KOPILKA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261206);
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-token"), "till-token").unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[daemon]\nhttp_listen = \"127.0.0.1:{port}\"\napi_token_file = \"api-token\"\n\
             shutdown_deadline_seconds = 5\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = config::load(Some(&cfg_path), &[]).unwrap();
    const OPENING: i64 = 10_000;
    {
        let mut ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
        let dest = cfg.destinations();
        ledger
            .import_opening_balances(
                "test",
                "test",
                vec![Ok(OpeningRow {
                    line: 1,
                    identity: kopilka::core::identity::CustomerIdentity {
                        card: Some(CARD.into()),
                        ..Default::default()
                    },
                    points: OPENING,
                    expires_at: None,
                    tier: None,
                    lots: None,
                })],
                &cfg.ingest_context(chrono::Utc::now(), &dest),
            )
            .unwrap();
    }
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut requests: Vec<(String, usize, i64)> = Vec::new();
    for round in 0..ROUNDS {
        let child = start(&cfg_path, &base, &http).await;
        let batch: Vec<(String, usize, i64)> = (0..PER_ROUND)
            .map(|i| (format!("r{round}-{i}"), round * PER_ROUND + i, rng.i64(1..=100)))
            .collect();
        requests.extend(batch.iter().cloned());
        let tasks: Vec<_> = batch
            .into_iter()
            .map(|(key, i, points)| {
                let http = http.clone();
                let base = base.clone();
                tokio::spawn(async move { hold_and_commit(&http, &base, &key, i, points).await })
            })
            .collect();
        // SIGKILL while the holds and commits are in flight
        tokio::time::sleep(Duration::from_millis(rng.u64(0..40))).await;
        kill(child);
        for t in tasks {
            let _ = t.await;
        }
    }
    // the tills retry everything with the same keys and bodies
    let child = start(&cfg_path, &base, &http).await;
    let mut committed = std::collections::BTreeMap::new();
    for (key, i, points) in &requests {
        let (id, got) = hold_and_commit(&http, &base, key, *i, *points)
            .await
            .unwrap_or_else(|| panic!("seed {seed}: {key} failed with the daemon up"));
        assert_eq!(got, *points, "seed {seed}: {key}");
        assert!(
            committed.insert(id.clone(), *points).is_none(),
            "seed {seed}: hold {id} answered two keys"
        );
    }
    kill(child);

    let ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    let v = ledger.verify().unwrap();
    assert!(v.is_empty(), "seed {seed}: ledger verify after the kills: {v:#?}");
    let total: i64 = committed.values().sum();
    let now = chrono::Utc::now();
    let s = ledger.summary(&DateRange::default(), now).unwrap();
    assert_eq!(s.points_redeemed, total, "seed {seed}: each commit counted once");
    let b = ledger.balance(CARD, now, chrono::Duration::days(14)).unwrap();
    assert_eq!((b.available, b.held), (OPENING - total, 0), "seed {seed}");
    let db = rusqlite::Connection::open(&cfg.ledger_path).unwrap();
    let (holds, docs): (i64, i64) = db
        .query_row(
            "SELECT (SELECT COUNT(*) FROM holds), (SELECT COUNT(*) FROM documents WHERE source = 'api')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (holds, docs),
        (requests.len() as i64, requests.len() as i64),
        "seed {seed}: one hold and one redemption document per key"
    );
}
