//! Files kopilka keeps for people to look at — `processed/` and `rejected/` of the exchange
//! folder, `rejected/` of the site exchange — are bounded by age and total size, so a daemon
//! that runs for years beside a 1C calling every few minutes never fills the disk.
//!
//! A file the site exchange keeps is named from the moment it was put there
//! (`20261206T101500-orders.xml`), in the daemon's clock; other files (the exchange folder's
//! `processed/`, which keeps 1C's names) are aged by their modification time.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::config::Keep;

const STAMP: &str = "%Y%m%dT%H%M%S";

/// The name a file gets in a kept folder: the moment, then its own name.
pub fn stamped_name(name: &str, at: DateTime<Utc>) -> String {
    format!("{}-{name}", at.format(STAMP))
}

fn stamp_of(name: &str) -> Option<DateTime<Utc>> {
    let head = name.get(..15)?;
    NaiveDateTime::parse_from_str(head, STAMP)
        .ok()
        .map(|t| t.and_utc())
}

/// Moves `file` into `dir` under a stamped name and writes its reason beside it
/// (`<name>.reason`).
pub fn reject(file: &Path, dir: &Path, reason: &str, at: DateTime<Utc>) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut target = dir.join(stamped_name(&name, at));
    let mut n = 1;
    while target.exists() {
        target = dir.join(stamped_name(&format!("{n}-{name}"), at));
        n += 1;
    }
    std::fs::rename(file, &target)?;
    let mut reason_file = target.clone().into_os_string();
    reason_file.push(".reason");
    std::fs::write(reason_file, format!("{reason}\n"))?;
    Ok(target)
}

/// Removes the oldest files of `dir` until none is older than `keep.max_age` and the folder
/// holds at most `keep.max_bytes`. Returns the files removed; a folder that does not exist
/// holds nothing.
pub fn prune(dir: &Path, keep: &Keep, now: DateTime<Utc>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(Option<DateTime<Utc>>, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| {
                let name = e.file_name().to_string_lossy().into_owned();
                let modified = meta.modified().ok().map(DateTime::<Utc>::from);
                (stamp_of(&name).or(modified), meta.len(), e.path())
            })
        })
        .collect();
    // oldest first; a `.reason` sorts right after its file (same stamp, longer name)
    files.sort();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    let cutoff = now - keep.max_age;
    let mut removed = 0;
    for (stamp, len, path) in files {
        let too_old = stamp.is_none_or(|s| s < cutoff);
        if !too_old && total <= keep.max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "Old kept exchange files removed");
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_past_either_bound() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for day in 0..10 {
            let at = t0 + chrono::Duration::days(day);
            std::fs::write(dir.path().join(stamped_name("f.xml", at)), vec![b'x'; 100]).unwrap();
        }
        let keep = Keep {
            max_age: chrono::Duration::days(5),
            max_bytes: 10_000,
        };
        // on day 9 the files of days 0..=3 are older than 5 days
        let removed = prune(dir.path(), &keep, t0 + chrono::Duration::days(9));
        assert_eq!(removed, 4);
        // a file named by 1C is aged by its modification time: written just now, it stays
        std::fs::write(dir.path().join("import.xml"), b"x").unwrap();
        let now = chrono::Utc::now();
        assert_eq!(prune(dir.path(), &keep, now + chrono::Duration::days(1)), 6);
        assert!(dir.path().join("import.xml").exists());
        for day in 4..10 {
            let at = t0 + chrono::Duration::days(day);
            let _ = std::fs::write(dir.path().join(stamped_name("f.xml", at)), vec![b'x'; 100]);
        }
        std::fs::remove_file(dir.path().join("import.xml")).unwrap();
        // a size bound of 250 bytes keeps the two newest
        let keep = Keep {
            max_age: chrono::Duration::days(365),
            max_bytes: 250,
        };
        assert_eq!(prune(dir.path(), &keep, t0 + chrono::Duration::days(9)), 4);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["20260109T000000-f.xml", "20260110T000000-f.xml"]);
    }

    #[test]
    fn a_rejected_file_keeps_its_reason_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("orders.xml");
        std::fs::write(&f, b"<x").unwrap();
        let at = chrono::Utc::now();
        let moved = reject(&f, &dir.path().join("rejected"), "ended early", at).unwrap();
        assert!(!f.exists());
        let mut reason = moved.into_os_string();
        reason.push(".reason");
        assert_eq!(std::fs::read_to_string(reason).unwrap(), "ended early\n");
    }
}
