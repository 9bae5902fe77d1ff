//! What the benchmark items share: the working directory, the machine, the synthetic year of
//! sales (the same for the file, the bare insert and the ledgers), the realistic
//! configuration and the catalog with costs.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::core::document::{Document, content_version};
use crate::core::money::Money;
use crate::ledger::CatalogItem;
use crate::sim::commerceml::{DocumentsWriter, WriterOptions};
use crate::sim::sales::Shop;

/// Goods lines of every benchmark sale (issue 10: N sales × 5 lines).
pub const LINES_PER_SALE: usize = 5;
/// Products in the synthetic catalog.
pub const PRODUCTS: usize = 2_000;
/// Seed of the shop and of its sales.
pub const SEED: u64 = 7;
/// The name of the cost price type, as 1C's catalogs name it.
pub const COST_PRICE_TYPE: &str = "Закупочная";
/// A year of history, however many sales it holds.
const HISTORY_SECONDS: i64 = 365 * 86_400;

/// Where the run keeps its files. A directory given with `--dir` is kept, and what a
/// previous run finished there (marked `NAME.done`) is reused.
pub struct Workspace {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Workspace {
    pub fn new(dir: Option<&Path>) -> anyhow::Result<Workspace> {
        match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                Ok(Workspace {
                    dir: d.to_path_buf(),
                    _temp: None,
                })
            }
            None => {
                let t = tempfile::Builder::new().prefix("kopilka-bench-").tempdir()?;
                Ok(Workspace {
                    dir: t.path().to_path_buf(),
                    _temp: Some(t),
                })
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `name` built by `build` unless a finished one is there; returns whether it was built.
    pub fn cached(
        &self,
        name: &str,
        build: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<(PathBuf, bool)> {
        let path = self.path(name);
        let done = self.path(&format!("{name}.done"));
        if done.exists() && path.exists() {
            return Ok((path, false));
        }
        let _ = std::fs::remove_file(&done);
        remove_db(&path);
        build(&path)?;
        std::fs::write(&done, b"")?;
        Ok((path, true))
    }

    /// A path for a fresh file: whatever was there (with SQLite's companions) is removed.
    pub fn fresh(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        remove_db(&p);
        p
    }
}

/// Removes a file and, for a database, its `-wal` and `-shm` files.
pub fn remove_db(path: &Path) {
    let _ = std::fs::remove_file(path);
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// The machine the figures come from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_mib: u64,
    pub cpu: String,
    pub load_average: String,
}

impl Machine {
    pub fn summary(&self) -> String {
        format!(
            "{} cores ({}), {} MiB memory, load average {}",
            self.nproc, self.cpu, self.memory_mib, self.load_average
        )
    }
}

pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024);
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, usize::from),
        memory_mib,
        cpu,
        load_average,
    }
}

/// The synthetic shop of `sales` sales: a customer for every 20 sales (1,000 to 50,000),
/// and a year of history ending on 1 November 2026, whatever the number of sales.
pub struct History {
    pub shop: Shop,
    pub sales: usize,
    spacing_seconds: i64,
}

impl History {
    /// Customers of a history of `sales` sales.
    pub fn customers_for(sales: usize) -> usize {
        (sales / 20).clamp(1_000, 50_000)
    }

    pub fn new(sales: usize) -> History {
        let customers = History::customers_for(sales);
        let mut shop = Shop::generate(SEED, PRODUCTS, customers);
        shop.start = history_start();
        History {
            shop,
            sales,
            spacing_seconds: (HISTORY_SECONDS / sales.max(1) as i64).max(1),
        }
    }

    /// The sales in order; the same sequence every time.
    pub fn iter(&self) -> Sales<'_> {
        Sales {
            h: self,
            rng: fastrand::Rng::with_seed(SEED),
            n: 0,
        }
    }

    /// When the last sale happened.
    pub fn end(&self) -> DateTime<Utc> {
        self.shop.start + Duration::seconds(self.spacing_seconds * self.sales as i64)
    }
}

/// 1 November 2025, 07:00 UTC.
pub fn history_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 11, 1, 7, 0, 0)
        .single()
        .unwrap_or_default()
}

pub struct Sales<'a> {
    h: &'a History,
    rng: fastrand::Rng,
    n: usize,
}

impl Iterator for Sales<'_> {
    type Item = Document;

    /// A till receipt of 5 lines; 1 in 10 anonymous, 1 in 6 of the others paid partly with
    /// points; customers known by card, 1C id, phone and (a third) e-mail, as 1C sends them.
    fn next(&mut self) -> Option<Document> {
        if self.n >= self.h.sales {
            return None;
        }
        let n = self.n;
        self.n += 1;
        let shop = &self.h.shop;
        let customer = (self.rng.u8(0..10) != 0).then(|| self.rng.usize(0..shop.customers.len()));
        let redeem = if customer.is_some() && self.rng.u8(0..6) == 0 {
            self.rng.i64(1..50)
        } else {
            0
        };
        let mut d = shop.sale(&mut self.rng, n, LINES_PER_SALE, customer, redeem);
        if let Some(c) = customer {
            d.customer.onec_id = Some(format!("CP-{c:05}"));
        }
        d.occurred_at = shop.start + Duration::seconds(self.h.spacing_seconds * n as i64);
        d.source.version = content_version(&d);
        Some(d)
    }
}

/// Writes the CommerceML documents file of a history, as 1C's exchange writes it.
/// Returns its size in bytes.
pub fn write_documents_file(h: &History, path: &Path) -> anyhow::Result<u64> {
    let out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let opts = WriterOptions {
        generated_at: h.end(),
        ..WriterOptions::default()
    };
    let mut w = DocumentsWriter::new(out, opts)?;
    for d in h.iter() {
        w.document(&d)?;
    }
    let mut out = w.finish()?;
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// The catalog 1C would have sent before the documents: a group per category, every
/// product, the retail and cost price types, and both prices from before the history.
pub fn catalog(shop: &Shop) -> Vec<CatalogItem> {
    let valid_from = history_start() - Duration::days(30);
    let mut items = vec![
        CatalogItem::PriceType {
            id: "PT-RETAIL".into(),
            name: "Розничная".into(),
            currency: Some("RUB".into()),
        },
        CatalogItem::PriceType {
            id: "PT-COST".into(),
            name: COST_PRICE_TYPE.into(),
            currency: Some("RUB".into()),
        },
    ];
    let mut groups = std::collections::BTreeSet::new();
    for p in &shop.products {
        if groups.insert(p.category.clone()) {
            items.push(CatalogItem::Group {
                id: format!("G-{}", p.category),
                name: p.category.clone(),
                parent: None,
            });
        }
    }
    for p in &shop.products {
        items.push(CatalogItem::Product {
            id: p.id.clone(),
            name: p.name.clone(),
            article: Some(p.id.clone()),
            group: Some(format!("G-{}", p.category)),
            service: p.service,
            deleted: false,
        });
        for (pt, price) in [("PT-RETAIL", p.price), ("PT-COST", p.cost)] {
            items.push(CatalogItem::Price {
                product_id: p.id.clone(),
                price_type: pt.into(),
                valid_from,
                unit_price: Money(price.0),
            });
        }
    }
    items
}

/// A production-like configuration in `dir`: the shipped rules file, the cost price type,
/// AmoCRM and 1C as outbox destinations (contact cards, bonus documents), and whatever
/// `extra` adds (more sections as TOML). Returns the file's path.
pub fn write_config(dir: &Path, name: &str, ledger: &Path, extra: &str) -> anyhow::Result<PathBuf> {
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, include_str!("../../../config/rules.toml"))?;
    let token = dir.join("amocrm-token");
    std::fs::write(
        &token,
        "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJl\n",
    )?;
    let text = format!(
        "[general]\ntimezone = \"Europe/Moscow\"\n\
         [ledger]\npath = {ledger:?}\n\
         [rules]\npath = {rules:?}\n\
         [accounting]\nentity = \"ООО «Бенчмарк»\"\npostback = \"commerceml\"\n\
         {extra}",
        ledger = ledger.display().to_string(),
        rules = rules.display().to_string(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The `[onec]` section of a production config (cost from the catalog's cost price type).
pub fn onec_section() -> String {
    format!("[onec]\nsystem = \"onec\"\ncost_price_type = \"{COST_PRICE_TYPE}\"\ncost_backfill = true\n")
}

/// An `[amocrm]` section pointing at `base_url` with the token file `write_config` writes.
pub fn amocrm_section(dir: &Path, base_url: &str, rps: u32) -> String {
    format!(
        "[amocrm]\nbase_url = \"{base_url}\"\ntoken_file = {:?}\nrequests_per_second = {rps}\n",
        dir.join("amocrm-token").display().to_string()
    )
}

/// Loads a configuration written by [`write_config`].
pub fn load_config(path: &Path) -> anyhow::Result<crate::config::Config> {
    crate::config::load(Some(path), &[]).map_err(|r| anyhow::anyhow!("bench configuration: {r}"))
}

/// Seconds, as people read them.
pub fn secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}
