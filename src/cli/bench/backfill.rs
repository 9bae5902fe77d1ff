//! Item 1, backfill: a CommerceML documents file of N sales × 5 lines, and three ways
//! through it on the same machine in the same run —
//! (a) the parse limit: a bare quick-xml pull parse that only counts elements;
//! (b) the storage limit: a bare rusqlite insert of the same sales, their lines and two
//!     journal rows per sale, in batched transactions with WAL;
//! (c) `kopilka import` of the file end to end (parse → normalise → catalog → rules →
//!     ledger → outbox) into a fresh ledger with a production-like configuration, in a
//!     child process of its own (so `memory` gets its peak RSS from the same run).
//! The figure that matters is (c) / min(a, b); target ≥ 0.5.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rusqlite::params;

use super::data::{self, History};
use super::{Check, Ctx, Outcome, thousands};
use crate::clock::{Clock, SystemClock};
use crate::ledger::Ledger;

/// Sales per transaction of the bare insert: kopilka's own default
/// (`[ledger] max_documents_per_transaction`).
const BARE_BATCH_SALES: usize = 500;

/// What one `kopilka import` in a child process measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChildImport {
    pub sales: usize,
    pub file_bytes: u64,
    pub seconds: f64,
    pub peak_rss_kib: u64,
    pub applied: u64,
    pub quarantined: u64,
    pub ledger_bytes: u64,
    /// Bytes per table after the import (`dbstat`, the WAL checkpointed): (table, table
    /// bytes, its indexes' bytes), largest first — what issue 19's "store less" is measured by.
    pub tables: Vec<(String, u64, u64)>,
}

impl ChildImport {
    pub fn sales_per_second(&self) -> f64 {
        self.sales as f64 / self.seconds
    }
}

pub fn default_sales(ctx: &Ctx) -> usize {
    ctx.sales.unwrap_or(if ctx.quick { 50_000 } else { 1_000_000 })
}

/// The documents file of `n` sales, generated once per workspace.
pub fn documents_file(ctx: &Ctx, n: usize) -> anyhow::Result<(PathBuf, u64)> {
    let h = History::new(n);
    let mut bytes = 0;
    let started = Instant::now();
    let (path, built) = ctx.work.cached(&format!("documents-{n}.xml"), |p| {
        bytes = data::write_documents_file(&h, p)?;
        Ok(())
    })?;
    let bytes = if built {
        ctx.say(format!(
            "  generated {} ({} sales × {} lines, {:.0} MiB) in {}",
            path.display(),
            thousands(n as u64),
            data::LINES_PER_SALE,
            bytes as f64 / 1_048_576.0,
            data::secs(started.elapsed())
        ));
        bytes
    } else {
        std::fs::metadata(&path)?.len()
    };
    Ok((path, bytes))
}

pub fn run(ctx: &mut Ctx) -> anyhow::Result<Outcome> {
    let n = default_sales(ctx);
    ctx.say(format!(
        "backfill: {} sales × {} lines",
        thousands(n as u64),
        data::LINES_PER_SALE
    ));
    let (file, bytes) = documents_file(ctx, n)?;

    let (a_time, elements, documents) = bare_parse(&file)?;
    anyhow::ensure!(
        documents == n as u64,
        "the bare parse found {documents} documents, not {n}"
    );
    let a = n as f64 / a_time.as_secs_f64();
    ctx.say(format!(
        "  (a) bare quick-xml parse     {:>10}  {:>9.0} sales/s  ({} elements, {:.0} MiB/s)",
        data::secs(a_time),
        a,
        thousands(elements),
        bytes as f64 / 1_048_576.0 / a_time.as_secs_f64()
    ));

    let bare_db = ctx.work.fresh("bare.db");
    let b_time = bare_insert(&History::new(n), &bare_db)?;
    let rows_per_sale = 1 + data::LINES_PER_SALE + 2;
    let b = n as f64 / b_time.as_secs_f64();
    ctx.say(format!(
        "  (b) bare rusqlite insert     {:>10}  {:>9.0} sales/s  ({} rows per sale, batches of {BARE_BATCH_SALES}, WAL)",
        data::secs(b_time),
        b,
        rows_per_sale
    ));
    data::remove_db(&bare_db);

    let c = import_in_child(ctx, n, &file, bytes)?;
    let c_rate = c.sales_per_second();
    ctx.say(format!(
        "  (c) kopilka import           {:>10}  {:>9.0} sales/s  (peak RSS {}, ledger {:.0} MiB)",
        data::secs(Duration::from_secs_f64(c.seconds)),
        c_rate,
        super::mib(c.peak_rss_kib),
        c.ledger_bytes as f64 / 1_048_576.0
    ));
    let per_sale = c.ledger_bytes as f64 / n as f64;
    ctx.say(format!(
        "  ledger: {per_sale:.0} bytes per sale ({} lines each); per table (table + indexes, bytes per sale):",
        data::LINES_PER_SALE
    ));
    for (table, t, i) in c.tables.iter().filter(|(_, t, i)| t + i >= n as u64) {
        ctx.say(format!(
            "    {table:<28} {:>7.0} + {:>6.0}",
            *t as f64 / n as f64,
            *i as f64 / n as f64
        ));
    }
    let limit = a.min(b);
    let ratio = c_rate / limit;
    ctx.say(format!(
        "  (c) / min(a, b) = {c_rate:.0} / {limit:.0} = {ratio:.3}   (c) / (a) = {:.3}   (c) / (b) = {:.3}",
        c_rate / a,
        c_rate / b
    ));
    let figures = serde_json::json!({
        "sales": n,
        "lines_per_sale": data::LINES_PER_SALE,
        "file_bytes": bytes,
        "a_parse": {"seconds": a_time.as_secs_f64(), "sales_per_second": a, "elements": elements},
        "b_insert": {"seconds": b_time.as_secs_f64(), "sales_per_second": b, "rows_per_sale": rows_per_sale,
                      "batch_sales": BARE_BATCH_SALES},
        "c_import": c,
        "c_sales_per_second": c_rate,
        "ratio_c_to_min_ab": ratio,
        "ratio_c_to_a": c_rate / a,
        "ratio_c_to_b": c_rate / b,
        "ledger_bytes_per_sale": per_sale,
    });
    ctx.imports.insert(n, c);
    Ok(Outcome {
        item: "backfill",
        figures,
        checks: vec![
            Check {
                item: "backfill",
                what: format!("(c) / min(a, b) at {} sales", thousands(n as u64)),
                value: format!("{ratio:.3}"),
                target: "≥ 0.5".into(),
                met: ratio >= 0.5,
            },
            Check {
                item: "backfill",
                what: format!(
                    "ledger bytes per {}-line sale at {} sales",
                    data::LINES_PER_SALE,
                    thousands(n as u64)
                ),
                value: format!("{per_sale:.0}"),
                target: "≤ 1024".into(),
                met: per_sale <= 1024.0,
            },
        ],
    })
}

/// (a): every event pulled, elements counted, nothing decoded or kept.
fn bare_parse(file: &Path) -> anyhow::Result<(Duration, u64, u64)> {
    use quick_xml::events::Event;
    let started = Instant::now();
    let mut reader =
        quick_xml::Reader::from_reader(BufReader::with_capacity(64 << 10, std::fs::File::open(file)?));
    let mut buf = Vec::with_capacity(16 << 10);
    let mut elements = 0u64;
    let mut documents = 0u64;
    let doc = "Документ".as_bytes();
    loop {
        match reader.read_event_into(&mut buf)? {
            Event::Start(e) => {
                elements += 1;
                if e.local_name().as_ref() == doc {
                    documents += 1;
                }
            }
            Event::Empty(_) => elements += 1,
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok((started.elapsed(), elements, documents))
}

/// (b): the same sales, lines and two journal rows per sale (accrual and its expense
/// counter-entry) into plain tables with the keys kopilka's have, 500 sales per transaction,
/// WAL and `synchronous=NORMAL`, cached statements. Making the sales is not timed.
fn bare_insert(h: &History, path: &Path) -> anyhow::Result<Duration> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384;
         CREATE TABLE sales (id INTEGER PRIMARY KEY, source TEXT NOT NULL, doc_id TEXT NOT NULL,
             version TEXT NOT NULL, occurred_at INTEGER NOT NULL, customer TEXT, total INTEGER NOT NULL,
             points_redeemed INTEGER NOT NULL, UNIQUE (source, doc_id));
         CREATE TABLE sale_lines (sale_id INTEGER NOT NULL, line_no INTEGER NOT NULL, product_id TEXT NOT NULL,
             name TEXT, quantity TEXT NOT NULL, unit_price INTEGER NOT NULL, discount INTEGER NOT NULL,
             net INTEGER NOT NULL, PRIMARY KEY (sale_id, line_no)) WITHOUT ROWID;
         CREATE TABLE journal (id INTEGER PRIMARY KEY, sale_id INTEGER NOT NULL, account TEXT NOT NULL,
             customer TEXT, amount INTEGER NOT NULL, effective_at INTEGER NOT NULL);",
    )?;
    let mut sales = h.iter();
    let mut timed = Duration::ZERO;
    loop {
        let batch: Vec<_> = sales.by_ref().take(BARE_BATCH_SALES).collect();
        if batch.is_empty() {
            break;
        }
        let started = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut sale = tx.prepare_cached(
                "INSERT INTO sales (source, doc_id, version, occurred_at, customer, total, points_redeemed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut line = tx.prepare_cached(
                "INSERT INTO sale_lines (sale_id, line_no, product_id, name, quantity, unit_price, discount, net) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut journal = tx.prepare_cached(
                "INSERT INTO journal (sale_id, account, customer, amount, effective_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for d in &batch {
                let customer = d.customer.card.as_deref();
                sale.execute(params![
                    d.source.system,
                    d.source.doc_id,
                    d.source.version,
                    d.occurred_at.timestamp(),
                    customer,
                    d.total.0,
                    d.points_redeemed.0
                ])?;
                let id = tx.last_insert_rowid();
                for (i, l) in d.lines.iter().enumerate() {
                    line.execute(params![
                        id,
                        i as i64 + 1,
                        l.product_id,
                        l.name,
                        l.quantity.to_string(),
                        l.unit_price.0,
                        l.discount.0,
                        l.net.0
                    ])?;
                }
                let points = d.total.0 / 2_000;
                journal.execute(params![
                    id,
                    "customer",
                    customer,
                    points,
                    d.occurred_at.timestamp()
                ])?;
                journal.execute(params![
                    id,
                    "expense",
                    None::<String>,
                    -points,
                    d.occurred_at.timestamp()
                ])?;
            }
        }
        tx.commit()?;
        timed += started.elapsed();
    }
    Ok(timed)
}

/// (c) in a child process: `kopilka bench import-child` runs exactly what `kopilka import`
/// runs, on a fresh ledger whose catalog (with costs) is already loaded.
pub fn import_in_child(ctx: &Ctx, n: usize, file: &Path, file_bytes: u64) -> anyhow::Result<ChildImport> {
    let ledger = ctx.work.fresh(&format!("import-{n}.db"));
    let config = data::write_config(
        &ctx.work.dir,
        &format!("import-{n}.toml"),
        &ledger,
        &format!(
            "{}{}",
            data::onec_section(),
            data::amocrm_section(&ctx.work.dir, "http://127.0.0.1:9", 7)
        ),
    )?;
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["bench", "import-child", "--config"])
        .arg(&config)
        .arg(file)
        .env_remove("KOPILKA_CONFIG")
        .env_remove("KOPILKA_LEDGER")
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kopilka import of {} failed ({})",
        file.display(),
        out.status
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    let c = ChildImport {
        sales: n,
        file_bytes,
        seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        peak_rss_kib: num("peak_rss_kib"),
        applied: v["report"]["applied"].as_u64().unwrap_or(0),
        quarantined: v["report"]["quarantined"].as_u64().unwrap_or(0),
        ledger_bytes: num("ledger_bytes"),
        tables: v["tables"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|r| {
                        (
                            r[0].as_str().unwrap_or_default().to_string(),
                            r[1].as_u64().unwrap_or(0),
                            r[2].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    anyhow::ensure!(
        c.applied == n as u64 && c.quarantined == 0,
        "kopilka import applied {} of {n} sales ({} quarantined): {}",
        c.applied,
        c.quarantined,
        v["report"]
    );
    data::remove_db(&ledger);
    Ok(c)
}

/// Bytes per table and per table's indexes (`dbstat`), after folding the WAL into the file.
fn table_bytes(path: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let mut st = conn.prepare(
        "SELECT COALESCE(m.tbl_name, s.name), \
                SUM(CASE WHEN m.type = 'index' THEN 0 ELSE s.pgsize END), \
                SUM(CASE WHEN m.type = 'index' THEN s.pgsize ELSE 0 END) \
         FROM dbstat s LEFT JOIN sqlite_schema m ON m.name = s.name \
         GROUP BY 1 ORDER BY SUM(s.pgsize) DESC",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The child's side: load the config, open a fresh ledger, load the catalog (not timed),
/// then time `import_path` exactly as `kopilka import` calls it, and print one JSON line.
pub fn import_child(config: &Path, file: &Path) -> anyhow::Result<ExitCode> {
    let cfg = data::load_config(config)?;
    let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)?;
    let shop = crate::sim::sales::Shop::generate(data::SEED, data::PRODUCTS, 1);
    ledger.upsert_catalog(&data::catalog(&shop), SystemClock.now())?;
    let settings = crate::onec::import::ImportSettings::from_config(&cfg);
    let started = Instant::now();
    let report = crate::onec::import::import_path(&mut ledger, file, &settings, &cfg, SystemClock.now())?;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = super::peak_rss_kib().unwrap_or(0);
    drop(ledger);
    let tables = table_bytes(&cfg.ledger_path)?;
    let ledger_bytes = std::fs::metadata(&cfg.ledger_path).map_or(0, |m| m.len());
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "peak_rss_kib": peak_rss_kib,
            "ledger_bytes": ledger_bytes,
            "tables": tables,
            "report": report,
        })
    );
    Ok(ExitCode::SUCCESS)
}
