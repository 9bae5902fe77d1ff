//! `kopilka bench`: kopilka measured against the limits of its own machine, on the same data
//! in the same run, so that the ratios mean something on a shared machine where absolute
//! times are noise. Timings are printed, never asserted; a run fails only when a step
//! cannot complete (or a completion check — every sale applied, nothing quarantined — fails).
//!
//! `kopilka bench` (= `bench all`) runs every item of issue 10: `backfill` (bare parse, bare
//! insert, `kopilka import`, and the ratio), `memory` (peak RSS of the import at two sizes,
//! each in its own child process), `amocrm` (changed balances against the simulator at 7
//! requests/s), `start` (process start to READY on a big ledger, and idle RSS) and `poll`
//! (one OData poll on a big ledger with 0 and 1,000 new documents). `--quick` shrinks every
//! size so the whole suite fits in CI. `ingest` and `evaluate` measure the ledger API and
//! the rules engine alone.

mod amocrm;
mod backfill;
mod bulk;
mod data;
mod holds;
mod memory;
mod poll;
mod site;
mod start;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::core::document::Incoming;
use crate::ledger::{Batch, Destinations, Item, Ledger};
use crate::sim::sales::Shop;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Sales for the sized items (backfill, memory, poll's ledger, ingest); each item has
    /// its own default (1,000,000 for backfill; 50,000 with --quick).
    #[arg(long, global = true)]
    pub sales: Option<usize>,
    /// One JSON object on stdout instead of the human report.
    #[arg(long, global = true)]
    pub json: bool,
    /// CI size: every item small, finishing in about a minute; checks completion only.
    #[arg(long, global = true)]
    pub quick: bool,
    /// Keep generated files and ledgers here and reuse them on the next run (a temporary
    /// directory, removed at the end, when not given).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Every item below (the default).
    All,
    /// CommerceML backfill: (a) bare quick-xml parse, (b) bare rusqlite insert, (c)
    /// `kopilka import`, in sales/s, and (c) / min(a, b).
    Backfill,
    /// Peak RSS of `kopilka import` at N/10 and N sales, each in its own process.
    Memory,
    /// Changed balances pushed to the AmoCRM simulator at 7 requests/s.
    Amocrm {
        /// Contacts whose balance changes (20,000; 500 with --quick).
        #[arg(long)]
        contacts: Option<usize>,
    },
    /// Process start to READY of `kopilka run` on a ledger of this many journal entries
    /// (10,000,000; 100,000 with --quick), and its idle RSS.
    Start {
        #[arg(long)]
        entries: Option<usize>,
    },
    /// One OData poll cycle on a ledger of N sales (1,000,000; 50,000 with --quick) with
    /// 0 and with 1,000 new documents in the simulator.
    Poll {
        /// New documents in the second poll.
        #[arg(long)]
        new: Option<usize>,
    },
    /// 1C uploading one documents file of this many MB (60; 4 with --quick) through the site
    /// exchange at 1 MiB and 8 MiB chunks: the two times should be within 20 %.
    Site {
        #[arg(long)]
        mb: Option<usize>,
    },
    /// Tills holding points through `/v1/holds` on loopback, 16 concurrent clients, each hold
    /// followed by its commit or cancel (40,000 holds; 2,000 with --quick), beside quotes.
    Holds {
        #[arg(long)]
        holds: Option<usize>,
    },
    /// Run the rules engine (the shipped example rules) on realistic baskets, one core.
    Evaluate {
        #[arg(long, default_value_t = 1_000_000)]
        evaluations: usize,
        #[arg(long, default_value_t = 5)]
        lines: usize,
    },
    /// Ingest N synthetic sales × L lines through the ledger API into a fresh database.
    Ingest {
        #[arg(long, default_value_t = 5)]
        lines: usize,
        #[arg(long, default_value_t = 10_000)]
        customers: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// (internal) `kopilka import` of one file into a fresh ledger, reporting its own time
    /// and peak RSS as JSON: run by `backfill` and `memory` in a child process.
    #[command(hide = true)]
    ImportChild {
        #[arg(long)]
        config: PathBuf,
        file: PathBuf,
    },
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("self", "VmHWM:")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// One figure compared with its target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub item: &'static str,
    pub what: String,
    pub value: String,
    pub target: String,
    pub met: bool,
}

/// What one item measured: its figures as JSON, and the figures that have a target.
pub struct Outcome {
    pub item: &'static str,
    pub figures: serde_json::Value,
    pub checks: Vec<Check>,
}

/// The state shared by the items of one run.
pub struct Ctx {
    pub quick: bool,
    pub json: bool,
    pub sales: Option<usize>,
    pub work: data::Workspace,
    /// `kopilka import` results by number of sales, so `memory` reuses what `backfill` ran.
    pub imports: std::collections::BTreeMap<usize, backfill::ChildImport>,
}

impl Ctx {
    /// A progress or result line for people (stderr, so `--json` output stays clean).
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.json {
            println!("{}", line.as_ref());
        } else {
            eprintln!("{}", line.as_ref());
        }
    }
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let what = a.what.as_ref().unwrap_or(&BenchWhat::All);
    match what {
        BenchWhat::Evaluate { evaluations, lines } => return evaluate(*evaluations, *lines, a.json),
        BenchWhat::Ingest {
            lines,
            customers,
            batch,
        } => {
            let sales = a.sales.unwrap_or(if a.quick { 5_000 } else { 100_000 });
            return ingest(sales, *lines, *customers, *batch, a.json);
        }
        BenchWhat::ImportChild { config, file } => return backfill::import_child(config, file),
        _ => {}
    }
    let mut ctx = Ctx {
        quick: a.quick,
        json: a.json,
        sales: a.sales,
        work: data::Workspace::new(a.dir.as_deref())?,
        imports: Default::default(),
    };
    ctx.say(format!(
        "kopilka bench{}: {}",
        if a.quick { " --quick" } else { "" },
        data::machine().summary()
    ));
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let all = matches!(what, BenchWhat::All);
    if all || matches!(what, BenchWhat::Backfill) {
        outcomes.push(backfill::run(&mut ctx)?);
    }
    if all || matches!(what, BenchWhat::Memory) {
        outcomes.push(memory::run(&mut ctx)?);
    }
    if all || matches!(what, BenchWhat::Amocrm { .. }) {
        let contacts = match what {
            BenchWhat::Amocrm { contacts } => *contacts,
            _ => None,
        };
        outcomes.push(amocrm::run(&ctx, contacts)?);
    }
    if all || matches!(what, BenchWhat::Start { .. }) {
        let entries = match what {
            BenchWhat::Start { entries } => *entries,
            _ => None,
        };
        outcomes.push(start::run(&ctx, entries)?);
    }
    if all || matches!(what, BenchWhat::Poll { .. }) {
        let new = match what {
            BenchWhat::Poll { new } => *new,
            _ => None,
        };
        outcomes.push(poll::run(&ctx, new)?);
    }
    if all || matches!(what, BenchWhat::Site { .. }) {
        let mb = match what {
            BenchWhat::Site { mb } => *mb,
            _ => None,
        };
        outcomes.push(site::run(&ctx, mb)?);
    }
    if all || matches!(what, BenchWhat::Holds { .. }) {
        let holds = match what {
            BenchWhat::Holds { holds } => *holds,
            _ => None,
        };
        outcomes.push(holds::run(&ctx, holds)?);
    }
    let checks: Vec<&Check> = outcomes.iter().flat_map(|o| &o.checks).collect();
    if a.json {
        let mut items = serde_json::Map::new();
        for o in &outcomes {
            items.insert(o.item.to_string(), o.figures.clone());
        }
        println!(
            "{}",
            serde_json::json!({
                "quick": a.quick,
                "machine": data::machine(),
                "seconds": started.elapsed().as_secs_f64(),
                "items": items,
                "targets": checks,
            })
        );
    } else {
        println!();
        println!(
            "{:<10} {:<52} {:>16}  {:<14} met",
            "item", "figure", "value", "target"
        );
        for c in &checks {
            println!(
                "{:<10} {:<52} {:>16}  {:<14} {}",
                c.item,
                c.what,
                c.value,
                c.target,
                if c.met { "yes" } else { "MISSED" }
            );
        }
        println!(
            "bench done in {:.0} s{}",
            started.elapsed().as_secs_f64(),
            if a.quick {
                " (quick: sizes too small for the targets to mean anything; only completion is checked)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn evaluate(evaluations: usize, lines: usize, json: bool) -> anyhow::Result<ExitCode> {
    use crate::core::program::{CustomerState, Rules};
    let rules = crate::rules_file::parse(include_str!("../../config/rules.toml"), "config/rules.toml")?;
    let shop = Shop::generate(11, 2000, 1000);
    let mut rng = fastrand::Rng::with_seed(11);
    let docs: Vec<_> = (0..4096)
        .map(|i| shop.sale(&mut rng, i, lines, Some(i % 1000), 0))
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
    for i in 0..evaluations {
        let d = &docs[i % docs.len()];
        let decision = rules.evaluate(d, &states[i % states.len()], d.occurred_at);
        points += decision.accrual;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = evaluations as f64 / secs;
    if json {
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

fn ingest(
    sales: usize,
    lines: usize,
    customers: usize,
    batch: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let cfg = Config {
        ledger_path: dir.path().join("bench.db"),
        ..Config::default()
    };
    let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)?;
    let shop = Shop::generate(7, 2000, customers.max(1));
    let mut rng = fastrand::Rng::with_seed(7);
    let dest = Destinations {
        contact_state: Some("amocrm".into()),
        ..Default::default()
    };
    let now = shop.start + chrono::Duration::days(400);
    let start = Instant::now();
    let mut generating = std::time::Duration::ZERO;
    let mut n = 0;
    while n < sales {
        let g = Instant::now();
        let size = batch.max(1).min(sales - n);
        let items: Vec<Item> = (n..n + size)
            .map(|i| {
                let c = (i % 10 != 0).then(|| rng.usize(0..shop.customers.len()));
                Item::Incoming(Incoming::Document(shop.sale(&mut rng, i, lines, c, 0)))
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
    let rate = sales as f64 / ingest.as_secs_f64();
    let rss = peak_rss_kib().unwrap_or(0);
    let db_size = std::fs::metadata(&cfg.ledger_path).map(|m| m.len()).unwrap_or(0);
    if json {
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
            rate * lines as f64
        );
        println!("  generating    {generating:.2?} (excluded)");
        println!("  peak RSS      {:.1} MiB", rss as f64 / 1024.0);
        println!("  database      {:.1} MiB", db_size as f64 / 1_048_576.0);
    }
    Ok(ExitCode::SUCCESS)
}

/// `x` with a thousands separator, for people.
pub fn thousands(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Megabytes (MiB) from KiB, one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
