//! Checkpoints on the second core while a file is imported.
//!
//! In WAL mode a commit that leaves the log past 1,000 pages copies the log back into the
//! database file (a checkpoint) and syncs it, on the committing thread. On a large ledger,
//! where each sale dirties pages all over the file, every batch fills the log past that
//! mark: at 1M sales the copy and its fsync were ≈ 11 % of the importing thread's time
//! (`perf`, issue 19), while the second core, parsing the XML, stood mostly idle. SQLite
//! lets another connection checkpoint while the writer goes on, so an import turns the
//! automatic checkpoint off and a thread of its own does it after each commit.
//!
//! The log stays bounded: when it has grown past a limit, the importer waits after its
//! commit until the checkpoint that covers it is done, so its next transaction starts the
//! log from the beginning again. When the import ends, one last checkpoint copies all of
//! it back (the file alone then holds every batch, as after an automatic checkpoint) and
//! the automatic checkpoint is turned on again, also when the import failed.
//!
//! Nothing here changes what is durable: a checkpoint only moves committed pages from the
//! log into the file, and a crash at any point leaves SQLite's recovery as it was.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::{Ledger, LedgerError};

/// SQLite's own default for `wal_autocheckpoint`, restored when the import ends.
const AUTOCHECKPOINT_PAGES: i64 = 1_000;
/// The log's pages (16,384 × 4 KiB = 64 MiB of disk, never of memory) past which the
/// importer waits for the checkpoint, so a checkpoint that cannot keep up does not let
/// the log grow without bound.
pub const WAL_LIMIT_PAGES: i64 = 16_384;

#[derive(Default)]
struct State {
    /// A commit happened since the last checkpoint began.
    pending: bool,
    running: bool,
    stop: bool,
    /// The log's size in pages, as the last checkpoint found it.
    log_pages: i64,
    /// The thread no longer checkpoints: stopped, failed or panicked.
    gone: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self) {
        let mut st = self.lock();
        // one last checkpoint, so the file alone holds everything committed
        st.pending = true;
        st.stop = true;
        self.changed.notify_all();
    }
}

/// The importer's side: told after each commit. Without a log to checkpoint (a ledger in
/// memory, or not in WAL mode) it does nothing.
pub struct WalCheckpoints<'a> {
    shared: Option<&'a Shared>,
    limit_pages: i64,
}

impl WalCheckpoints<'_> {
    fn none() -> WalCheckpoints<'static> {
        WalCheckpoints {
            shared: None,
            limit_pages: 0,
        }
    }

    /// Asks for a checkpoint of what was just committed; waits for it only when the log
    /// has grown past the limit. Should the checkpointing thread have failed, the ledger's
    /// own automatic checkpoint is turned back on, so the log is still copied back.
    pub fn after_commit(&self, ledger: &Ledger) -> Result<(), LedgerError> {
        let Some(shared) = self.shared else {
            return Ok(());
        };
        let mut st = shared.lock();
        if st.gone {
            drop(st);
            // set again at each later commit: the same PRAGMA twice changes nothing
            return ledger.set_autocheckpoint(AUTOCHECKPOINT_PAGES);
        }
        st.pending = true;
        shared.changed.notify_all();
        if st.log_pages > self.limit_pages {
            while (st.pending || st.running) && !st.gone {
                st = shared.wait(st);
            }
        }
        Ok(())
    }
}

/// Signals the thread to stop even when the import unwinds, so the scope can join it.
struct StopOnDrop<'a>(&'a Shared);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Marks the thread gone however it ends, a panic included, so the importer never waits
/// for a checkpoint that will not come.
struct GoneOnExit<'a>(&'a Shared);

impl Drop for GoneOnExit<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.gone = true;
        st.running = false;
        self.0.changed.notify_all();
    }
}

fn checkpoint_loop(conn: &Connection, shared: &Shared) {
    let _gone = GoneOnExit(shared);
    loop {
        {
            let mut st = shared.lock();
            while !st.pending && !st.stop {
                st = shared.wait(st);
            }
            if !st.pending {
                return;
            }
            st.pending = false;
            st.running = true;
        }
        // PASSIVE never waits for readers or the writer: what it cannot copy now, the
        // next one will (a busy result is not a failure)
        let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
        let mut st = shared.lock();
        st.running = false;
        match r {
            Ok(log) => st.log_pages = log,
            Err(e) => {
                drop(st);
                tracing::warn!(error = %e, "background checkpoint failed; the import checkpoints itself");
                return;
            }
        }
        shared.changed.notify_all();
        if st.stop && !st.pending {
            return;
        }
    }
}

impl Ledger {
    fn set_autocheckpoint(&self, pages: i64) -> Result<(), LedgerError> {
        self.conn
            .execute_batch(&format!("PRAGMA wal_autocheckpoint = {pages}"))?;
        Ok(())
    }

    /// Runs `work` (an import) with the log's checkpoints on a thread of their own
    /// (module docs); `work` calls [`WalCheckpoints::after_commit`] after each commit.
    pub fn with_wal_checkpointer<T, E>(
        &mut self,
        limit_pages: i64,
        work: impl FnOnce(&mut Ledger, &WalCheckpoints<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<LedgerError>,
    {
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(LedgerError::from)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return work(self, &WalCheckpoints::none());
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match Connection::open_with_flags(&self.path, flags) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no connection for background checkpoints; the import checkpoints itself");
                return work(self, &WalCheckpoints::none());
            }
        };
        self.checkpointing_with(conn, limit_pages, work)
    }

    /// [`Ledger::with_wal_checkpointer`] once it has the thread's connection.
    fn checkpointing_with<T, E>(
        &mut self,
        conn: Connection,
        limit_pages: i64,
        work: impl FnOnce(&mut Ledger, &WalCheckpoints<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<LedgerError>,
    {
        self.set_autocheckpoint(0)?;
        let shared = Shared::default();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::thread::scope(|s| {
                let stop = StopOnDrop(&shared);
                let shared_ref = &shared;
                let worker = s.spawn(move || checkpoint_loop(&conn, shared_ref));
                let ck = WalCheckpoints {
                    shared: Some(&shared),
                    limit_pages,
                };
                let out = work(self, &ck);
                drop(stop);
                if worker.join().is_err() {
                    tracing::warn!("the background checkpoint thread panicked");
                }
                out
            })
        }));
        // back on whatever happened, also after a panic, before it goes on up
        let restored = self.set_autocheckpoint(AUTOCHECKPOINT_PAGES);
        let out = out.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        restored?;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::OpenOptions;

    fn autocheckpoint(ledger: &Ledger) -> i64 {
        ledger
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap()
    }

    /// The importer's automatic checkpoint is off only while the import runs, and back on
    /// when it fails or panics; an import that panics does not leave the thread waiting (the
    /// scope would never end).
    #[test]
    fn the_automatic_checkpoint_comes_back_after_a_failure_and_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(&dir.path().join("k.db"), &OpenOptions::default()).unwrap();
        assert_eq!(autocheckpoint(&ledger), AUTOCHECKPOINT_PAGES);
        let failed: Result<(), LedgerError> = ledger.with_wal_checkpointer(WAL_LIMIT_PAGES, |l, wal| {
            assert_eq!(autocheckpoint(l), 0);
            for i in 0..3 {
                l.conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, 'x')",
                    [format!("k{i}")],
                )?;
                wal.after_commit(l)?;
            }
            Err(LedgerError::Refused("the import failed".into()))
        });
        assert!(matches!(failed, Err(LedgerError::Refused(_))), "{failed:?}");
        assert_eq!(autocheckpoint(&ledger), AUTOCHECKPOINT_PAGES);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Result<(), LedgerError> =
                ledger.with_wal_checkpointer(WAL_LIMIT_PAGES, |_, _| panic!("the import panicked"));
        }));
        assert!(panicked.is_err());
        assert_eq!(autocheckpoint(&ledger), AUTOCHECKPOINT_PAGES);
        let n: i64 = ledger
            .conn
            .query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }

    /// A thread whose checkpoint fails (here its connection is read-only, which SQLite
    /// refuses a checkpoint) never leaves the importer waiting, and the importer's own
    /// automatic checkpoint comes back on at its next commit.
    #[test]
    fn a_failing_checkpoint_hands_the_log_back_to_the_importer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let mut ledger = Ledger::open(&path, &OpenOptions::default()).unwrap();
        let read_only = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let done: Result<(), LedgerError> = ledger.checkpointing_with(read_only, -1, |l, wal| {
            l.conn
                .execute("INSERT INTO meta (key, value) VALUES ('k1', 'x')", [])?;
            // the log is past the limit (-1): this waits for the checkpoint, which fails
            wal.after_commit(l)?;
            assert_eq!(autocheckpoint(l), 0);
            l.conn
                .execute("INSERT INTO meta (key, value) VALUES ('k2', 'x')", [])?;
            wal.after_commit(l)?;
            assert_eq!(autocheckpoint(l), AUTOCHECKPOINT_PAGES);
            Ok(())
        });
        done.unwrap();
        assert_eq!(autocheckpoint(&ledger), AUTOCHECKPOINT_PAGES);
    }
}
