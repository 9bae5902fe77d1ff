//! Importing CommerceML files into the ledger: `kopilka import FILE…`, the exchange folder
//! and the site exchange all end here.
//!
//! A file is streamed: documents go to the ledger in batches of
//! `max_documents_per_transaction`, each batch one SQLite transaction; catalog entries
//! update the catalog (prices valid from the file's `ДатаФормирования`). Documents get
//! their category and cost from the catalog before they are applied, a batch at a time.
//! Memory does not grow with the file: one batch is held at a time (and the price entries of an offers file,
//! which are bounded by the catalog, not by history).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use super::commerceml::{self, FileInfo, Item, OrderPolicy};
use crate::config::{Config, Orders};
use crate::core::document::Incoming;
use crate::ledger::{Batch, CatalogItem, CostPolicy, Ledger, LedgerError, WalCheckpoints};

/// Entries of one archive, at most (a 1C exchange archive holds a handful).
const MAX_ZIP_ENTRIES: usize = 1_000;
/// Uncompressed bytes of one archive, at most (refuses zip bombs).
const MAX_ZIP_UNCOMPRESSED_BYTES: u64 = 16 << 30;
/// Uncompressed ÷ compressed size of one entry, at most: exchange XML packs 10–30 : 1, a
/// zip bomb thousands : 1.
const MAX_ZIP_RATIO: u64 = 500;
/// Catalog entries stored per transaction.
const CATALOG_BATCH: usize = 5_000;
/// Items parsed ahead of the ledger: enough to keep both cores busy, a few megabytes at most.
const PIPELINE_ITEMS: usize = 512;

/// How far an import has come, for a person watching a long backfill (`kopilka import` on a
/// terminal draws it): bytes of XML read (of `total` known so far) and documents applied.
/// Counters only, so the importer knows nothing of terminals.
#[derive(Debug, Default)]
pub struct ImportProgress {
    pub bytes: AtomicU64,
    pub total: AtomicU64,
    pub documents: AtomicU64,
}

/// A reader that counts the bytes it hands out into an [`ImportProgress`].
struct Counting<'a, R> {
    inner: R,
    progress: Option<&'a ImportProgress>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = self.progress {
            p.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<'_, R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if let Some(p) = self.progress {
            p.bytes.fetch_add(amt as u64, Ordering::Relaxed);
        }
        self.inner.consume(amt);
    }
}

/// What the importer needs from the configuration.
#[derive(Clone, Debug)]
pub struct ImportSettings {
    pub parse: commerceml::Options,
    pub cost: Option<CostPolicy>,
    pub batch_documents: usize,
    /// Checkpoint source the batches carry.
    pub checkpoint_source: String,
    /// Where to count progress, when someone watches.
    pub progress: Option<Arc<ImportProgress>>,
    /// The log's pages past which the import waits for its checkpoint
    /// ([`crate::ledger::WAL_LIMIT_PAGES`]; a test makes it small).
    pub wal_limit_pages: i64,
}

impl ImportSettings {
    pub fn from_config(cfg: &Config) -> ImportSettings {
        let mut parse = commerceml::Options::new("onec", cfg.timezone);
        parse.limits.max_lines_per_document = cfg.limits.max_lines;
        let mut cost = None;
        if let Some(o) = &cfg.onec {
            parse.system = o.system.clone();
            parse.orders = match o.orders {
                Orders::Ignore => OrderPolicy::Ignore,
                Orders::WhenPaid => OrderPolicy::WhenPaid,
                Orders::WhenShipped => OrderPolicy::WhenShipped,
                Orders::Always => OrderPolicy::Always,
            };
            parse.card_requisite = o.card_requisite.clone();
            parse.return_link_requisite = o.return_link_requisite.clone();
            parse.points_requisite = o.points_requisite.clone();
            parse.referral_requisite = o.referral_requisite.clone();
            parse.invite_requisite = o.invite_requisite.clone();
            parse.birthday_requisite = o.birthday_requisite.clone();
            cost = o.cost_price_type.clone().map(|price_type| CostPolicy {
                price_type,
                backfill: o.cost_backfill,
            });
        }
        ImportSettings {
            checkpoint_source: format!("{}:files", parse.system),
            parse,
            cost,
            batch_documents: cfg.max_documents_per_transaction,
            progress: None,
            wal_limit_pages: crate::ledger::WAL_LIMIT_PAGES,
        }
    }
}

/// What importing one file did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    pub file: String,
    pub documents: usize,
    pub applied: usize,
    pub new_versions: usize,
    pub voided: usize,
    pub unchanged: usize,
    pub stale: usize,
    pub quarantined: usize,
    pub skipped: usize,
    pub catalog_items: usize,
    pub flags: usize,
    /// Set when the file (or an archive entry) ended early: whole documents before the
    /// cut were applied, and the file must not be treated as done.
    pub truncated: Option<String>,
}

impl FileReport {
    fn add(&mut self, r: &crate::ledger::IngestReport) {
        self.applied += r.applied;
        self.new_versions += r.new_versions;
        self.voided += r.voided;
        self.unchanged += r.unchanged;
        self.stale += r.stale;
        self.quarantined += r.quarantined;
        self.flags += r.flags.len();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be read at all (not XML, a DTD, not an archive): it belongs in
    /// `rejected/` with this reason.
    #[error("{0}")]
    Unreadable(String),
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Imports one file or `.zip` archive.
pub fn import_path(
    ledger: &mut Ledger,
    path: &Path,
    settings: &ImportSettings,
    cfg: &Config,
    now: DateTime<Utc>,
) -> Result<FileReport, ImportError> {
    let label = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut file = File::open(path).map_err(|source| ImportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_zip = file
        .read(&mut magic)
        .map(|n| n == 4 && magic == *b"PK\x03\x04")
        .unwrap_or(false);
    file.rewind().map_err(|source| ImportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(p) = &settings.progress
        && !is_zip
    {
        p.total
            .fetch_add(file.metadata().map_or(0, |m| m.len()), Ordering::Relaxed);
    }
    if is_zip {
        import_zip(ledger, file, &label, settings, cfg, now)
    } else {
        import_reader(
            ledger,
            BufReader::with_capacity(64 << 10, file),
            &label,
            settings,
            cfg,
            now,
        )
    }
}

/// Catalog entries first (`import*.xml`, then `offers*.xml`), documents last, so a
/// document finds the costs that came with it.
fn entry_rank(name: &str) -> u8 {
    let n = name.rsplit('/').next().unwrap_or(name).to_lowercase();
    if n.starts_with("import") {
        0
    } else if n.starts_with("offers") || n.starts_with("prices") {
        1
    } else {
        2
    }
}

fn import_zip(
    ledger: &mut Ledger,
    file: File,
    label: &str,
    settings: &ImportSettings,
    cfg: &Config,
    now: DateTime<Utc>,
) -> Result<FileReport, ImportError> {
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| ImportError::Unreadable(format!("{label}: not a readable zip archive: {e}")))?;
    if archive.len() > MAX_ZIP_ENTRIES {
        return Err(ImportError::Unreadable(format!(
            "{label}: {} entries, more than the {MAX_ZIP_ENTRIES} an exchange archive holds",
            archive.len()
        )));
    }
    let mut entries: Vec<(u8, String, u64, usize)> = Vec::new();
    let mut total = 0u64;
    for i in 0..archive.len() {
        let e = archive
            .by_index_raw(i)
            .map_err(|e| ImportError::Unreadable(format!("{label}: archive entry {i}: {e}")))?;
        total = total.saturating_add(e.size());
        if e.size() > 1 << 20 && e.size() / e.compressed_size().max(1) > MAX_ZIP_RATIO {
            return Err(ImportError::Unreadable(format!(
                "{label}: entry {} unpacks {} times its packed size, more than the {MAX_ZIP_RATIO} \
                 of exchange XML (a zip bomb?)",
                e.name(),
                e.size() / e.compressed_size().max(1)
            )));
        }
        if e.is_file() && e.name().to_lowercase().ends_with(".xml") {
            entries.push((entry_rank(e.name()), e.name().to_string(), e.size(), i));
        }
    }
    if total > MAX_ZIP_UNCOMPRESSED_BYTES {
        return Err(ImportError::Unreadable(format!(
            "{label}: unpacks to {total} bytes, more than {MAX_ZIP_UNCOMPRESSED_BYTES}"
        )));
    }
    if entries.is_empty() {
        return Err(ImportError::Unreadable(format!(
            "{label}: the archive holds no .xml file"
        )));
    }
    entries.sort();
    if let Some(p) = &settings.progress {
        p.total
            .fetch_add(entries.iter().map(|e| e.2).sum::<u64>(), Ordering::Relaxed);
    }
    let mut report = FileReport {
        file: label.to_string(),
        ..Default::default()
    };
    for (_, name, declared, index) in entries {
        let entry = archive
            .by_index(index)
            .map_err(|e| ImportError::Unreadable(format!("{label}: archive entry {name}: {e}")))?;
        let inner = format!("{label}!{name}");
        // never more than the directory declared, which the limits above were checked on
        let entry = std::io::Read::take(entry, declared);
        let r = import_reader(
            ledger,
            BufReader::with_capacity(64 << 10, entry),
            &inner,
            settings,
            cfg,
            now,
        )?;
        report.documents += r.documents;
        report.applied += r.applied;
        report.new_versions += r.new_versions;
        report.voided += r.voided;
        report.unchanged += r.unchanged;
        report.stale += r.stale;
        report.quarantined += r.quarantined;
        report.skipped += r.skipped;
        report.catalog_items += r.catalog_items;
        report.flags += r.flags;
        if r.truncated.is_some() && report.truncated.is_none() {
            report.truncated = r.truncated;
        }
    }
    Ok(report)
}

/// Imports one CommerceML stream, the log's checkpoints on a thread of their own
/// ([`Ledger::with_wal_checkpointer`]).
pub fn import_reader<R: std::io::BufRead + Send>(
    ledger: &mut Ledger,
    reader: R,
    label: &str,
    settings: &ImportSettings,
    cfg: &Config,
    now: DateTime<Utc>,
) -> Result<FileReport, ImportError> {
    ledger.with_wal_checkpointer(settings.wal_limit_pages, |ledger, wal| {
        import_stream(ledger, reader, label, settings, cfg, now, wal)
    })
}

fn import_stream<R: std::io::BufRead + Send>(
    ledger: &mut Ledger,
    reader: R,
    label: &str,
    settings: &ImportSettings,
    cfg: &Config,
    now: DateTime<Utc>,
    wal: &WalCheckpoints<'_>,
) -> Result<FileReport, ImportError> {
    let mut report = FileReport {
        file: label.to_string(),
        ..Default::default()
    };
    let mut batch: Vec<crate::ledger::Item> = Vec::with_capacity(settings.batch_documents);
    let mut catalog: Vec<CatalogItem> = Vec::new();
    // Offer prices wait for the end of the file: they are valid from its ДатаФормирования.
    let mut offers: Vec<commerceml::Offer> = Vec::new();
    let mut failure: Option<LedgerError> = None;
    let dest = cfg.destinations();
    let mut seen = 0usize;
    let flush =
        |ledger: &mut Ledger, batch: &mut Vec<crate::ledger::Item>, seen: usize, report: &mut FileReport| {
            if batch.is_empty() {
                return Ok(());
            }
            // documents get their category and cost from the catalog as it stands when
            // their batch is applied, in one read transaction for the batch
            let docs = batch.iter_mut().filter_map(|item| match item {
                crate::ledger::Item::Incoming(Incoming::Document(d)) => Some(d),
                _ => None,
            });
            ledger.complete_batch_from_catalog(docs, settings.cost.as_ref())?;
            let ctx = cfg.ingest_context(now, &dest);
            let documents = batch.len() as u64;
            let r = ledger.ingest(
                Batch {
                    source: settings.checkpoint_source.clone(),
                    items: std::mem::take(batch),
                    checkpoint: Some(format!("{label}#{seen}")),
                    ..Default::default()
                },
                &ctx,
            )?;
            report.add(&r);
            wal.after_commit(ledger)?;
            if let Some(p) = &settings.progress {
                p.documents.fetch_add(documents, Ordering::Relaxed);
            }
            Ok::<(), LedgerError>(())
        };
    let mut take = |item: Item| -> Result<(), LedgerError> {
        match item {
            Item::Document(inc) => {
                seen += 1;
                batch.push(crate::ledger::Item::Incoming(inc));
            }
            Item::Rejected(r) => {
                seen += 1;
                batch.push(crate::ledger::Item::Rejected(r));
            }
            Item::Group(g) => catalog.push(CatalogItem::Group {
                id: g.id,
                name: g.name,
                parent: g.parent,
            }),
            Item::Product(p) => catalog.push(CatalogItem::Product {
                id: p.id,
                name: p.name,
                article: p.article,
                group: p.groups.into_iter().next(),
                service: p.service,
                deleted: p.deleted,
            }),
            Item::PriceType(t) => catalog.push(CatalogItem::PriceType {
                id: t.id,
                name: t.name,
                currency: t.currency,
            }),
            Item::Offer(o) => offers.push(o),
        }
        if batch.len() >= settings.batch_documents {
            flush(ledger, &mut batch, seen, &mut report)?;
        }
        if catalog.len() >= CATALOG_BATCH {
            report.catalog_items += catalog.len();
            ledger.upsert_catalog(&std::mem::take(&mut catalog), now)?;
            wal.after_commit(ledger)?;
        }
        Ok(())
    };
    let reader = Counting {
        inner: reader,
        progress: settings.progress.as_deref(),
    };
    // The parse runs on a thread of its own, a bounded channel ahead of the ledger: the
    // second core reads the XML while this one writes, and the channel bounds what waits in
    // memory. When the ledger fails, dropping the receiver stops the parse at its next item.
    let (to_ledger, items) = std::sync::mpsc::sync_channel::<Item>(PIPELINE_ITEMS);
    let parsed = std::thread::scope(|s| {
        let parser = s.spawn(move || {
            let mut send = |item: Item| {
                to_ledger
                    .send(item)
                    .map_err(|_| "the ledger stopped taking documents".to_string())
            };
            commerceml::parse(reader, label, &settings.parse, &mut send)
        });
        for item in items {
            if let Err(e) = take(item) {
                failure = Some(e);
                break;
            }
        }
        parser.join()
    });
    let parsed = parsed.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    // the ledger's failure first: the parse error that follows it only says it was stopped
    if let Some(f) = failure {
        return Err(ImportError::Ledger(f));
    }
    let info: FileInfo = parsed.map_err(|e| ImportError::Unreadable(e.to_string()))?;
    flush(ledger, &mut batch, seen, &mut report)?;
    let valid_from = info.generated_at.unwrap_or(now);
    for o in offers {
        for p in o.prices {
            catalog.push(CatalogItem::Price {
                product_id: o.id.clone(),
                price_type: p.price_type_id,
                valid_from,
                unit_price: p.unit_price,
            });
        }
    }
    report.catalog_items += catalog.len();
    ledger.upsert_catalog(&catalog, now)?;
    report.documents = info.documents + info.rejected;
    report.skipped = info.skipped;
    report.truncated = info.truncated;
    Ok(report)
}
