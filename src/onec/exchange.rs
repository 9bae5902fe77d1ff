//! The exchange folder: 1C (or a person) drops CommerceML files into `[onec] exchange_dir`;
//! each is imported, then moved to `processed/` when all its documents were applied, or to
//! `rejected/` with a `.reason` file beside it when it could not be read at all. A file
//! that ended early (still being written, or cut) stays where it is and is read again
//! next time — re-reading applied documents changes nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use super::import::{FileReport, ImportError, ImportSettings, import_path};
use crate::config::Config;
use crate::daemon::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::ledger::Ledger;

/// A file modified more recently than this may still be being written.
const SETTLE: Duration = Duration::from_secs(5);
/// Files one run takes at most (the rest wait for the next run).
const MAX_FILES_PER_RUN: usize = 200;

#[derive(Clone, Debug, Default)]
pub struct FolderReport {
    pub files: Vec<FileReport>,
    pub rejected: Vec<(String, String)>,
    pub waiting: usize,
}

fn candidates(dir: &Path, now: SystemTime) -> std::io::Result<(Vec<PathBuf>, usize)> {
    let mut files = Vec::new();
    let mut waiting = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if !(name.ends_with(".xml") || name.ends_with(".zip")) {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if now.duration_since(modified).unwrap_or_default() < SETTLE {
            waiting += 1;
            continue;
        }
        files.push((modified, path));
    }
    files.sort();
    Ok((files.into_iter().map(|(_, p)| p).collect(), waiting))
}

/// Moves `file` into `dir`, never over an existing file.
fn move_into(file: &Path, dir: &Path, stamp: DateTime<Utc>) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut target = dir.join(&name);
    if target.exists() {
        target = dir.join(format!("{}-{name}", stamp.format("%Y%m%dT%H%M%S")));
    }
    std::fs::rename(file, &target)?;
    Ok(target)
}

/// Imports every settled file of the folder.
pub fn process_folder(
    ledger: &mut Ledger,
    dir: &Path,
    cfg: &Config,
    now: DateTime<Utc>,
) -> anyhow::Result<FolderReport> {
    let settings = ImportSettings::from_config(cfg);
    let (files, waiting) = candidates(dir, now.into())
        .map_err(|e| anyhow::anyhow!("cannot list the exchange folder {}: {e}", dir.display()))?;
    let mut report = FolderReport {
        waiting,
        ..Default::default()
    };
    for path in files.into_iter().take(MAX_FILES_PER_RUN) {
        match import_path(ledger, &path, &settings, cfg, now) {
            Ok(r) => {
                if r.truncated.is_none() {
                    move_into(&path, &dir.join("processed"), now)
                        .map_err(|e| anyhow::anyhow!("cannot move {} to processed/: {e}", path.display()))?;
                } else {
                    tracing::warn!(file = %path.display(), reason = ?r.truncated, "File ended early; it stays and is read again");
                }
                report.files.push(r);
            }
            Err(ImportError::Unreadable(reason)) => {
                let moved = move_into(&path, &dir.join("rejected"), now)
                    .map_err(|e| anyhow::anyhow!("cannot move {} to rejected/: {e}", path.display()))?;
                let mut reason_file = moved.clone().into_os_string();
                reason_file.push(".reason");
                std::fs::write(&reason_file, format!("{reason}\n")).map_err(|e| {
                    anyhow::anyhow!("cannot write {}: {e}", PathBuf::from(&reason_file).display())
                })?;
                tracing::error!(file = %path.display(), reason = %reason, "File rejected: it could not be read");
                report.rejected.push((path.display().to_string(), reason));
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }
    Ok(report)
}

/// `onec:files`: the exchange folder, polled.
pub struct FolderJob;

impl Job for FolderJob {
    fn name(&self) -> &str {
        "onec:files"
    }

    fn stage(&self) -> Stage {
        Stage::Poll
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let cfg = ctx.cfg.clone();
            let Some(dir) = cfg.onec.as_ref().and_then(|o| o.exchange_dir.clone()) else {
                return Ok(JobOutcome::done("no exchange folder configured"));
            };
            let now = ctx.clock.now();
            let keep = cfg.onec.as_ref().map(|o| o.keep.clone()).unwrap_or_default();
            let kept = dir.clone();
            let r = ctx
                .ledger
                .run(move |l| process_folder(l, &dir, &cfg, now))
                .await?;
            // what is kept for people stays bounded
            for sub in ["processed", "rejected"] {
                super::retention::prune(&kept.join(sub), &keep, now);
            }
            let applied: usize = r
                .files
                .iter()
                .map(|f| f.applied + f.new_versions + f.voided)
                .sum();
            let quarantined: usize = r.files.iter().map(|f| f.quarantined).sum();
            Ok(JobOutcome {
                summary: format!(
                    "{} files read ({applied} documents applied, {quarantined} quarantined), {} rejected, {} still being written",
                    r.files.len(),
                    r.rejected.len(),
                    r.waiting
                ),
                pending: r.waiting > 0,
            })
        })
    }
}
