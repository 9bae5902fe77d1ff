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
/// A file that ends early and has not changed for this long is not being written: it is
/// moved to `rejected/` with what was read, so it is not re-read on every run.
const GIVE_UP_ON_PARTIAL: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Debug, Default)]
pub struct FolderReport {
    pub files: Vec<FileReport>,
    pub rejected: Vec<(String, String)>,
    /// Files read only in part: name, and how many documents were read, where and why
    /// reading stopped.
    pub partial: Vec<(String, String)>,
    pub waiting: usize,
}

/// What a person needs about a file read only in part.
pub fn partial_reason(r: &FileReport) -> String {
    format!(
        "read only in part: {} document(s) read before the stop were applied or quarantined; stopped: {}",
        r.documents,
        r.truncated.as_deref().unwrap_or("unknown reason")
    )
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
                    let reason = partial_reason(&r);
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| SystemTime::from(now).duration_since(m).ok())
                        .unwrap_or_default();
                    if age >= GIVE_UP_ON_PARTIAL {
                        let moved = move_into(&path, &dir.join("rejected"), now).map_err(|e| {
                            anyhow::anyhow!("cannot move {} to rejected/: {e}", path.display())
                        })?;
                        let mut reason_file = moved.into_os_string();
                        reason_file.push(".reason");
                        std::fs::write(&reason_file, format!("{}: {reason}\n", r.file)).map_err(|e| {
                            anyhow::anyhow!("cannot write {}: {e}", PathBuf::from(&reason_file).display())
                        })?;
                        tracing::error!(file = %path.display(), reason = %reason, "File read only in part; moved to rejected/");
                    } else {
                        tracing::error!(file = %path.display(), reason = %reason, "File read only in part; it stays and is read again");
                    }
                    report.partial.push((path.display().to_string(), reason));
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
            if !r.partial.is_empty() {
                // the run did its work, but a person must look: `once` fails, /healthz says why
                let list: Vec<String> = r.partial.iter().map(|(f, why)| format!("{f}: {why}")).collect();
                anyhow::bail!(
                    "{} file(s) read only in part ({applied} documents applied, {quarantined} quarantined in all): {}",
                    r.partial.len(),
                    list.join("; ")
                );
            }
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
