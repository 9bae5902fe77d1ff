//! `kopilka demo`: the product on synthetic data, on a fresh machine, with nothing else.
//!
//! Until the 1C and AmoCRM simulators land (issues 6, 7, 9), the demo feeds a seeded
//! synthetic shop's documents straight into the real ledger in a temporary directory and
//! shows the result; it says so when it runs.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::ledger::{Batch, DateRange, Destinations, Item, Ledger};
use crate::sim::sales::{Shop, history};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 2000)]
    pub sales: usize,
    #[arg(long, default_value_t = 200)]
    pub customers: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep the demo ledger in this directory instead of a temporary one.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

pub fn run(a: &DemoArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("kopilka-demo-").tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = Config {
        ledger_path: dir.join("kopilka.db"),
        ..Config::default()
    };
    let _ = std::fs::remove_file(&cfg.ledger_path);
    println!(
        "kopilka demo: a synthetic shop with {} customers and {} sales (seed {})",
        a.customers, a.sales, a.seed
    );
    println!("  note: the 1C and AmoCRM simulators arrive with the connector issues; this demo");
    println!(
        "  feeds the shop's documents straight into the real ledger at {}",
        cfg.ledger_path.display()
    );
    let shop = Shop::generate(a.seed, 400, a.customers.max(1));
    let (items, truth) = history(&shop, a.seed, a.sales, 3);
    let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)?;
    let clock = SystemClock;
    let dest = Destinations {
        contact_state: Some("amocrm".into()),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut flags = Vec::new();
    let mut quarantined = 0;
    let total = items.len();
    for (i, chunk) in items.chunks(cfg.max_documents_per_transaction).enumerate() {
        let batch = Batch {
            source: "demo".into(),
            items: chunk.iter().cloned().map(Item::Incoming).collect(),
            checkpoint: Some(format!("{}", (i + 1) * cfg.max_documents_per_transaction)),
            ..Default::default()
        };
        let r = ledger.ingest(batch, &cfg.ingest_context(clock.now(), &dest))?;
        quarantined += r.quarantined;
        flags.extend(r.flags);
    }
    println!(
        "  ingested {total} documents in {:.2?} ({} quarantined as malformed)",
        started.elapsed(),
        quarantined
    );
    let s = ledger.summary(&DateRange::default(), clock.now())?;
    println!();
    super::output::summary(&s, false)?;
    println!();
    println!(
        "expected from the generator: {} sales, {} returns, net {} RUB, {} malformed",
        truth.sales,
        truth.returns,
        crate::core::money::Money(truth.net_total),
        truth.malformed
    );
    let counts = ledger.outbox_counts()?;
    for (d, st, n) in counts {
        println!("outbox: {n} {} rows for {d}", st.as_str());
    }
    if !flags.is_empty() {
        println!("flags raised ({}):", flags.len());
        super::print_flags(&flags, 5);
    }
    let v = ledger.verify()?;
    let matches = s.sales_count == truth.sales
        && s.returns_count == truth.returns
        && s.sales_total_kopecks == truth.net_total
        && s.quarantined == truth.malformed;
    println!(
        "ledger verify: {}",
        if v.is_empty() {
            "every invariant holds".to_string()
        } else {
            format!("{} violations", v.len())
        }
    );
    println!(
        "totals match the generator: {}",
        if matches { "yes" } else { "NO" }
    );
    Ok(if v.is_empty() && matches {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
