//! `kopilka bench`: throughput on synthetic data, reported with peak memory. Timings are
//! printed, never asserted.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::core::document::Incoming;
use crate::ledger::{Batch, Destinations, Item, Ledger};
use crate::sim::sales::Shop;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Run the rules engine (the shipped example rules) on realistic baskets, one core.
    Evaluate {
        #[arg(long, default_value_t = 1_000_000)]
        evaluations: usize,
        #[arg(long, default_value_t = 5)]
        lines: usize,
        #[arg(long)]
        json: bool,
    },
    /// Ingest N synthetic sales × L lines through the ledger API into a fresh database.
    Ingest {
        #[arg(long, default_value_t = 100_000)]
        sales: usize,
        #[arg(long, default_value_t = 5)]
        lines: usize,
        #[arg(long, default_value_t = 10_000)]
        customers: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    match &a.what {
        BenchWhat::Evaluate {
            evaluations,
            lines,
            json,
        } => {
            use crate::core::program::{CustomerState, Rules};
            let rules =
                crate::rules_file::parse(include_str!("../../config/rules.toml"), "config/rules.toml")?;
            let shop = Shop::generate(11, 2000, 1000);
            let mut rng = fastrand::Rng::with_seed(11);
            let docs: Vec<_> = (0..4096)
                .map(|i| shop.sale(&mut rng, i, *lines, Some(i % 1000), 0))
                .collect();
            let states: Vec<CustomerState> = (0..64)
                .map(|i| CustomerState {
                    customer_id: Some(i),
                    prior_sales: (i % 5) as u32,
                    tier: Some(["base", "silver", "gold"][i as usize % 3].to_string()),
                    ..Default::default()
                })
                .collect();
            let start = Instant::now();
            let mut points = 0i64;
            for i in 0..*evaluations {
                let d = &docs[i % docs.len()];
                let decision = rules.evaluate(d, &states[i % states.len()], d.occurred_at);
                points += decision.accrual;
            }
            let secs = start.elapsed().as_secs_f64();
            let rate = *evaluations as f64 / secs;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"evaluations": evaluations, "lines_per_sale": lines, "seconds": secs,
                        "evaluations_per_second": rate, "points_checksum": points})
                );
            } else {
                println!("evaluate: {evaluations} sales × {lines} lines with config/rules.toml on one core");
                println!("  {secs:.2} s, {rate:.0} evaluations/s (checksum {points} points)");
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Ingest {
            sales,
            lines,
            customers,
            batch,
            json,
        } => {
            let dir = tempfile::tempdir()?;
            let cfg = Config {
                ledger_path: dir.path().join("bench.db"),
                ..Config::default()
            };
            let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)?;
            let shop = Shop::generate(7, 2000, (*customers).max(1));
            let mut rng = fastrand::Rng::with_seed(7);
            let dest = Destinations {
                contact_state: Some("amocrm".into()),
                ..Default::default()
            };
            let now = shop.start + chrono::Duration::days(400);
            let start = Instant::now();
            let mut generating = std::time::Duration::ZERO;
            let mut n = 0;
            while n < *sales {
                let g = Instant::now();
                let size = (*batch).min(sales - n);
                let items: Vec<Item> = (n..n + size)
                    .map(|i| {
                        let c = (i % 10 != 0).then(|| rng.usize(0..shop.customers.len()));
                        Item::Incoming(Incoming::Document(shop.sale(&mut rng, i, *lines, c, 0)))
                    })
                    .collect();
                generating += g.elapsed();
                ledger.ingest(
                    Batch {
                        source: "bench".into(),
                        items,
                        checkpoint: Some(n.to_string()),
                        ..Default::default()
                    },
                    &cfg.ingest_context(now, &dest),
                )?;
                n += size;
            }
            let total = start.elapsed();
            let ingest = total - generating;
            let rate = *sales as f64 / ingest.as_secs_f64();
            let rss = peak_rss_kib().unwrap_or(0);
            let db_size = std::fs::metadata(&cfg.ledger_path).map(|m| m.len()).unwrap_or(0);
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "sales": sales, "lines_per_sale": lines, "batch": batch,
                        "ingest_seconds": ingest.as_secs_f64(), "sales_per_second": rate,
                        "generate_seconds": generating.as_secs_f64(),
                        "peak_rss_kib": rss, "db_bytes": db_size,
                    })
                );
            } else {
                println!("ingest: {sales} sales × {lines} lines in batches of {batch}");
                println!(
                    "  ledger time   {:.2?} ({:.0} sales/s, {:.0} lines/s)",
                    ingest,
                    rate,
                    rate * *lines as f64
                );
                println!("  generating    {generating:.2?} (excluded)");
                println!("  peak RSS      {:.1} MiB", rss as f64 / 1024.0);
                println!("  database      {:.1} MiB", db_size as f64 / 1_048_576.0);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
