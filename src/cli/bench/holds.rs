//! `bench holds`: tills holding and committing points through `/v1/holds` on loopback, beside
//! quotes of the same baskets. Concurrent clients (as several tills and the site would be)
//! each loop hold → commit (three in four) or hold → cancel on random customers of a ledger
//! with balances; every hold is a `BEGIN IMMEDIATE` transaction, so this measures the write
//! path tills wait on. Targets (issue 23): ≥ 2 000 holds/s and p99 ≤ 20 ms on this machine.

use std::sync::Arc;
use std::time::Instant;

use super::{Check, Ctx, Outcome};
use crate::clock::SystemClock;
use crate::config;
use crate::daemon::JobContext;
use crate::daemon::runtime::Runtime;
use crate::ledger::{Ledger, OpeningRow, SharedLedger};

const TOKEN: &str = "bench-token";
const CLIENTS: usize = 16;

pub fn run(ctx: &Ctx, holds: Option<usize>) -> anyhow::Result<Outcome> {
    let holds = holds.unwrap_or(if ctx.quick { 2_000 } else { 40_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(measure(ctx, holds))
}

/// Latencies in seconds → (p50, p99) in milliseconds.
fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
            * 1e3
    };
    (at(0.5), at(0.99))
}

/// `holds` holds by `CLIENTS` concurrent clients on random customers; with `finish`, each is
/// followed by its commit (three in four) or cancel. The hold calls' latencies and the
/// phase's wall time.
async fn hold_phase(
    base: &str,
    holds: usize,
    customers: usize,
    finish: bool,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let base = base.to_string();
        let n = holds / CLIENTS + usize::from(c < holds % CLIENTS);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut rng = fastrand::Rng::with_seed(c as u64 + if finish { 1000 } else { 0 });
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let card = format!("29{:011}", rng.usize(0..customers));
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/v1/holds"))
                    .bearer_auth(TOKEN)
                    .json(
                        &serde_json::json!({"customer": card, "lines": basket(), "points_wanted": 100,
                        "idempotency_key": format!("bench-{finish}-{c}-{i}")}),
                    )
                    .send()
                    .await?;
                lat.push(t.elapsed().as_secs_f64());
                anyhow::ensure!(r.status().is_success(), "a hold was refused: {}", r.text().await?);
                if !finish {
                    continue;
                }
                let v: serde_json::Value = r.json().await?;
                let id = v["hold_id"].as_str().unwrap_or_default().to_string();
                let (action, body) = if i % 4 == 3 {
                    ("cancel", serde_json::json!({}))
                } else {
                    ("commit", serde_json::json!({"lines": basket()}))
                };
                http.post(format!("{base}/v1/holds/{id}/{action}"))
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok((lat, started.elapsed().as_secs_f64()))
}

fn basket() -> serde_json::Value {
    serde_json::json!([
        {"product_id": "P1", "quantity": "2", "net_kopecks": 600000, "unit_cost_kopecks": 100000},
        {"product_id": "P2", "quantity": 1, "net_kopecks": 400000, "unit_cost_kopecks": 100000}
    ])
}

async fn measure(ctx: &Ctx, holds: usize) -> anyhow::Result<Outcome> {
    let dir = ctx.work.path("holds");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("api-token"), TOKEN)?;
    let cfg_path = dir.join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[daemon]\napi_token_file = \"api-token\"\n",
            dir.join("k.db").display()
        ),
    )?;
    let cfg = Arc::new(config::load(Some(&cfg_path), &[])?);
    let customers = 1_000usize;
    let now = chrono::Utc::now();
    let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)?;
    let rows = (0..customers)
        .map(|i| {
            Ok(OpeningRow {
                line: i + 1,
                identity: crate::core::identity::CustomerIdentity {
                    card: Some(format!("29{i:011}")),
                    ..Default::default()
                },
                points: 1_000_000,
                expires_at: None,
                tier: None,
                lots: None,
            })
        })
        .collect();
    let dest = cfg.destinations();
    ledger.import_opening_balances("bench", "bench", rows, &cfg.ingest_context(now, &dest))?;
    let ledger = SharedLedger::new(ledger);
    let job = JobContext {
        cfg: cfg.clone(),
        ledger,
        clock: Arc::new(SystemClock),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let app = crate::daemon::http::router(job, Arc::new(Runtime::new(now)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    ctx.say(format!(
        "holds: {} holds by {CLIENTS} concurrent clients on loopback, alone, then each with its commit (3 in 4) or cancel, then as many quotes",
        super::thousands(holds as u64)
    ));

    // holds alone (they expire on their own), then holds each followed by its commit or cancel
    let (hold_lat, hold_secs) = hold_phase(&base, holds, customers, false).await?;
    let (pair_lat, pair_secs) = hold_phase(&base, holds, customers, true).await?;

    // quotes of the same baskets, for comparison
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let base = base.clone();
        let n = holds / CLIENTS + usize::from(c < holds % CLIENTS);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut rng = fastrand::Rng::with_seed(100 + c as u64);
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let card = format!("29{:011}", rng.usize(0..customers));
                let t = Instant::now();
                http.post(format!("{base}/v1/quote"))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({"customer": card, "lines": basket()}))
                    .send()
                    .await?
                    .error_for_status()?;
                lat.push(t.elapsed().as_secs_f64());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut quote_lat = Vec::new();
    for t in tasks {
        quote_lat.extend(t.await??);
    }
    let quote_secs = started.elapsed().as_secs_f64();
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);

    let hold_rate = holds as f64 / hold_secs;
    let (h50, h99) = percentiles(hold_lat);
    let pair_rate = holds as f64 / pair_secs;
    let (p50, p99) = percentiles(pair_lat);
    let quote_rate = holds as f64 / quote_secs;
    let (q50, q99) = percentiles(quote_lat);
    ctx.say(format!(
        "  holds alone: {hold_rate:.0}/s, p50 {h50:.2} ms, p99 {h99:.2} ms"
    ));
    ctx.say(format!(
        "  hold + commit or cancel: {pair_rate:.0} pairs/s, hold p50 {p50:.2} ms, p99 {p99:.2} ms"
    ));
    ctx.say(format!(
        "  quotes: {quote_rate:.0}/s, p50 {q50:.2} ms, p99 {q99:.2} ms"
    ));
    Ok(Outcome {
        item: "holds",
        figures: serde_json::json!({
            "holds": holds,
            "clients": CLIENTS,
            "holds_per_second": hold_rate,
            "pairs_per_second": pair_rate,
            "pair_hold_p50_ms": p50,
            "pair_hold_p99_ms": p99,
            "hold_p50_ms": h50,
            "hold_p99_ms": h99,
            "quotes_per_second": quote_rate,
            "quote_p50_ms": q50,
            "quote_p99_ms": q99,
        }),
        checks: vec![
            Check {
                item: "holds",
                what: format!("holds/s by {CLIENTS} concurrent clients"),
                value: format!("{hold_rate:.0}"),
                target: "≥ 2000".into(),
                met: hold_rate >= 2_000.0,
            },
            Check {
                item: "holds",
                what: "hold latency p99 (ms)".into(),
                value: format!("{h99:.2}"),
                target: "≤ 20".into(),
                met: h99 <= 20.0,
            },
            Check {
                item: "holds",
                what: "hold latency p99, commits and cancels between (ms)".into(),
                value: format!("{p99:.2}"),
                target: "≤ 20".into(),
                met: p99 <= 20.0,
            },
        ],
    })
}
