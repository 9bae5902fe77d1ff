//! Backups of the ledger while the daemon runs, and putting one back.
//!
//! A backup is SQLite's `VACUUM INTO`: one read transaction, so the copy is consistent at a
//! moment even while the daemon writes (WAL readers do not block writers), compact, and
//! written under a temporary name first, so a half-written file never looks like a backup.
//! A restore is refused while a daemon holds the ledger (`<ledger>.lock`, held by `kopilka
//! run` for its whole life), checks the copy before it touches anything, and keeps the ledger
//! it replaces beside it. After a restore the sources are read again from the copy's
//! checkpoints, and the outbox's idempotency keys make re-delivery harmless.

use std::fs::File;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::{Ledger, LedgerError, OpenOptions, Result};

fn io(what: &str, path: &Path, e: std::io::Error) -> LedgerError {
    LedgerError::Refused(format!("{what} {}: {e}", path.display()))
}

/// The lock file of a ledger: `kopilka run` holds it exclusively; restore needs it free.
pub fn lock_path(ledger: &Path) -> PathBuf {
    let mut p = ledger.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the ledger's lock without waiting; `Ok(None)` when another process holds it. The
/// lock lasts as long as the returned file is open (the OS drops it when the process dies,
/// so a crash never leaves a stale lock).
pub fn try_lock(ledger: &Path) -> Result<Option<File>> {
    let path = lock_path(ledger);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("cannot open the lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io("cannot lock", &path, e)),
    }
}

impl Ledger {
    /// A consistent, compact copy of the ledger at `to` (which must not exist yet).
    pub fn backup_to(&self, to: &Path) -> Result<()> {
        if to.exists() {
            return Err(LedgerError::Refused(format!(
                "{} exists already; a backup never overwrites a file",
                to.display()
            )));
        }
        let mut partial = to.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let _ = std::fs::remove_file(&partial);
        self.conn.execute("VACUUM INTO ?1", [partial.to_string_lossy()])?;
        std::fs::rename(&partial, to).map_err(|e| io("cannot name the backup", to, e))?;
        Ok(())
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// Where the replaced ledger was kept, when there was one.
    pub previous: Option<PathBuf>,
    pub schema_version: i64,
}

/// Puts the backup `from` in place of the ledger at `ledger`. Refused while a daemon holds
/// the ledger, and when the copy is not a sound ledger (integrity check and `ledger verify`).
pub fn restore(from: &Path, ledger: &Path, opts: &OpenOptions, now: DateTime<Utc>) -> Result<Restored> {
    let Some(_lock) = try_lock(ledger)? else {
        return Err(LedgerError::Refused(format!(
            "a kopilka daemon holds {} (its lock file {} is taken): stop it first (systemctl stop kopilka), then restore",
            ledger.display(),
            lock_path(ledger).display()
        )));
    };
    if !from.is_file() {
        return Err(LedgerError::Refused(format!("no backup at {}", from.display())));
    }
    // the copy is opened, migrated if older, and checked before anything is touched
    let staged = {
        let mut p = ledger.as_os_str().to_owned();
        p.push(".restoring");
        PathBuf::from(p)
    };
    let _ = std::fs::remove_file(&staged);
    std::fs::copy(from, &staged).map_err(|e| io("cannot copy", from, e))?;
    let schema_version = {
        let copy = Ledger::open(&staged, opts)?;
        let ok: String = copy.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if ok != "ok" {
            let _ = std::fs::remove_file(&staged);
            return Err(LedgerError::Refused(format!(
                "{} fails SQLite's integrity check: {ok}",
                from.display()
            )));
        }
        let violations = copy.verify()?;
        if !violations.is_empty() {
            let _ = std::fs::remove_file(&staged);
            return Err(LedgerError::Refused(format!(
                "{} breaks {} ledger invariants (kopilka ledger verify on it lists them)",
                from.display(),
                violations.len()
            )));
        }
        copy.schema_version()?
    };
    let previous = if ledger.exists() {
        let mut p = ledger.as_os_str().to_owned();
        p.push(format!(".before-restore-{}", now.format("%Y%m%dT%H%M%S")));
        let p = PathBuf::from(p);
        std::fs::rename(ledger, &p).map_err(|e| io("cannot set aside", ledger, e))?;
        Some(p)
    } else {
        None
    };
    for ext in ["-wal", "-shm"] {
        let mut side = ledger.as_os_str().to_owned();
        side.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(side));
        let mut staged_side = staged.as_os_str().to_owned();
        staged_side.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(staged_side));
    }
    std::fs::rename(&staged, ledger).map_err(|e| io("cannot put the backup at", ledger, e))?;
    Ok(Restored {
        previous,
        schema_version,
    })
}

/// The scheduled backup: `kopilka-<moment>.db` in `dir`, keeping the newest `keep`.
pub fn scheduled(ledger: &Ledger, dir: &Path, keep: usize, now: DateTime<Utc>) -> Result<(PathBuf, usize)> {
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let to = dir.join(format!("kopilka-{}.db", now.format("%Y%m%dT%H%M%S")));
    ledger.backup_to(&to)?;
    let mut backups: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io("cannot list", dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kopilka-") && n.ends_with(".db"))
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(keep.max(1));
    let mut removed = 0;
    for old in backups.into_iter().take(excess) {
        if std::fs::remove_file(&old).is_ok() {
            removed += 1;
        }
    }
    Ok((to, removed))
}
