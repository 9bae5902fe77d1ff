//! The outbox: everything that must reach 1C or AmoCRM, written in the same transaction as
//! the entries that cause it and delivered at least once with its idempotency key.
//!
//! Rows are kept: a delivered row stays `delivered`, a coalesced one `superseded` (pointing at
//! the row that replaced it, with the body and error of its attempts), a hopeless one `dead`
//! with its last error, one a person gave up on `dropped` with their reason. The one row that
//! goes is a state that was never attempted when a newer state of the same coalescing key
//! arrives: no one has had it, its body would never be sent, and a backfill queues one per
//! customer per batch — kept, they were ≈ 100 bytes a sale holding nothing (issue 19). A
//! pusher that read it just before marks a row that is gone (a no-op) and sends the newer
//! one on its next turn.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Ledger, LedgerError, Result, from_ts, ts};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    Pending,
    Delivered,
    Dead,
    Superseded,
    Dropped,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Delivered => "delivered",
            OutboxState::Dead => "dead",
            OutboxState::Superseded => "superseded",
            OutboxState::Dropped => "dropped",
        }
    }

    /// How the outbox stores the state (migration 32): the code each writer's `state_code`
    /// literal names in a comment, spelled out by the generated column `state` (a test holds
    /// the two to one mapping; the writers' SQL is fixed text).
    #[cfg(test)]
    pub(crate) fn code(self) -> i64 {
        match self {
            OutboxState::Pending => 0,
            OutboxState::Delivered => 1,
            OutboxState::Dead => 2,
            OutboxState::Superseded => 3,
            OutboxState::Dropped => 4,
        }
    }

    pub fn parse(s: &str) -> Option<OutboxState> {
        [
            OutboxState::Pending,
            OutboxState::Delivered,
            OutboxState::Dead,
            OutboxState::Superseded,
            OutboxState::Dropped,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub destination: String,
    pub idem_key: String,
    pub coalesce_key: Option<String>,
    pub payload: String,
    pub state: OutboxState,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub superseded_by: Option<i64>,
    pub note: Option<String>,
}

const COLS: &str = "id, destination, idem_key, coalesce_key, payload, state, attempts, next_attempt_at, \
     last_error, created_at, updated_at, delivered_at, superseded_by, note";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    let state: String = r.get(5)?;
    Ok(OutboxRow {
        id: r.get(0)?,
        destination: r.get(1)?,
        idem_key: r.get(2)?,
        coalesce_key: r.get(3)?,
        payload: r.get(4)?,
        state: OutboxState::parse(&state).unwrap_or(OutboxState::Dead),
        attempts: r.get(6)?,
        next_attempt_at: from_ts(r.get(7)?),
        last_error: r.get(8)?,
        created_at: from_ts(r.get(9)?),
        updated_at: from_ts(r.get(10)?),
        delivered_at: r.get::<_, Option<i64>>(11)?.map(from_ts),
        superseded_by: r.get(12)?,
        note: r.get(13)?,
    })
}

/// How a bonus document's key is stored since migration 26: `b:` and its journal
/// transaction. The key 1C and every reader see — `onec:bonus:<ledger id>:tx<id>`, in 1C's
/// comment marker and the document id made from it — is spelled out when the row is read
/// ([`bonus_key_read`]): the ledger id is the same on every row, and storing it on each (and
/// in the unique index over keys) cost ≈ 70 bytes per sale, one such row being queued per
/// movement (issue 19). Rows queued before keep the key they were stored with.
pub(crate) const BONUS_KEY_STORED: &str = "b:";

pub(crate) fn bonus_key_stored(tx: i64) -> String {
    format!("{BONUS_KEY_STORED}{tx}")
}

/// The transaction a bonus document's short key names, `None` for a key stored whole.
fn bonus_key_tx(stored: &str) -> Option<i64> {
    stored.strip_prefix(BONUS_KEY_STORED)?.parse().ok()
}

/// The key a bonus document's row is read by, spelled out from the transaction its short
/// key names and this ledger's id.
pub(crate) fn bonus_key_read(uid: &str, tx: i64) -> String {
    format!("onec:bonus:{uid}:tx{tx}")
}

/// The index holding `destination`'s pending rows (migration 33) and the condition that lets a
/// query use it: a bonus document's rows wait in `outbox_due_bonus`, every other
/// destination's in `outbox_due`. Both indexes are partial, so SQLite may use one only when
/// the query's own terms imply its condition (a bound destination, `?1`, does not; the
/// condition does), and a query names its index (`INDEXED BY`): left to choose, SQLite
/// scans the whole outbox in `id` order for `ORDER BY id LIMIT n`, which after a backfill's
/// rows are delivered reads every one of them to find the few still owed.
pub(crate) fn pending_of(destination: &str) -> (&'static str, &'static str) {
    if destination == crate::config::ONEC_BONUS {
        ("outbox_due_bonus", "destination = 'onec:bonus'")
    } else {
        ("outbox_due", "destination != 'onec:bonus'")
    }
}

/// Rows of (destination, state, count), as both outbox counts return them.
fn counts(st: &mut rusqlite::Statement<'_>) -> Result<Vec<(String, OutboxState, i64)>> {
    Ok(st
        .query_map([], |r| {
            let s: String = r.get(1)?;
            Ok((
                r.get(0)?,
                OutboxState::parse(&s).unwrap_or(OutboxState::Dead),
                r.get(2)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Adds a row unless its idempotency key exists already (returns `None` then). With a
/// coalescing key, older pending rows of the same destination and key are superseded.
pub(crate) fn enqueue(
    conn: &Connection,
    destination: &str,
    idem_key: &str,
    coalesce_key: Option<&str>,
    payload: &str,
    now: DateTime<Utc>,
) -> Result<Option<i64>> {
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO outbox (destination, idem_key, coalesce_key, payload, state_code, next_attempt_at, \
             created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 0 /* pending */, ?5, ?5, ?5)",
        )?
        .execute(params![destination, idem_key, coalesce_key, payload, ts(now)])?;
    if inserted == 0 {
        return Ok(None);
    }
    let id = conn.last_insert_rowid();
    if let Some(key) = coalesce_key {
        let unsent: Vec<i64> = conn
            .prepare_cached(
                "SELECT id FROM outbox INDEXED BY outbox_coalesce \
                 WHERE destination = ?1 AND coalesce_key = ?2 AND state = 'pending' AND attempts = 0 AND id != ?3",
            )?
            .query_map(params![destination, key, id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for old in unsent {
            // an attempted row superseded by it before now points at its successor
            conn.prepare_cached(
                "UPDATE outbox INDEXED BY outbox_successor SET superseded_by = ?2 WHERE superseded_by = ?1",
            )?
            .execute(params![old, id])?;
            conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                .execute([old])?;
        }
        conn.prepare_cached(
            "UPDATE outbox INDEXED BY outbox_coalesce SET state_code = 3 /* superseded */, superseded_by = ?1, updated_at = ?2 \
             WHERE destination = ?3 AND coalesce_key = ?4 AND state = 'pending' AND id != ?1",
        )?
        .execute(params![id, ts(now), destination, key])?;
    }
    Ok(Some(id))
}

#[derive(Clone, Debug, Default)]
pub struct OutboxFilter {
    pub state: Option<OutboxState>,
    pub destination: Option<String>,
    pub limit: Option<usize>,
}

impl Ledger {
    /// Queues a row from outside an ingest (e.g. a connector's own bookkeeping).
    pub fn outbox_enqueue(
        &mut self,
        destination: &str,
        idem_key: &str,
        coalesce_key: Option<&str>,
        payload: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>> {
        enqueue(&self.conn, destination, idem_key, coalesce_key, payload, now)
    }

    /// Pending rows of a destination whose time has come, oldest first. A row in back-off
    /// does not hold up the rows behind it: one bad contact must not stall a shop.
    pub fn outbox_due(&self, destination: &str, limit: usize, now: DateTime<Utc>) -> Result<Vec<OutboxRow>> {
        let (index, of) = pending_of(destination);
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {COLS} FROM outbox INDEXED BY {index} WHERE destination = ?1 AND {of} AND state = 'pending' \
             AND next_attempt_at <= ?2 ORDER BY id LIMIT ?3"
        ))?;
        let rows = st
            .query_map(params![destination, ts(now), limit as i64], row)?
            .collect::<rusqlite::Result<_>>()?;
        self.rendered(rows)
    }

    pub fn outbox_mark_delivered(&mut self, ids: &[i64], now: DateTime<Utc>) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE outbox SET state_code = 1 /* delivered */, delivered_at = ?2, updated_at = ?2, attempts = attempts + 1 \
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            for id in ids {
                st.execute(params![id, ts(now)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a failed attempt: back to pending with `retry_at`, or dead when `retry_at`
    /// is `None` (a permanent error, or the attempt limit reached).
    pub fn outbox_mark_failed(
        &mut self,
        id: i64,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let error: String = error.chars().take(2000).collect();
        match retry_at {
            Some(at) => self.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, updated_at = ?4 \
                 WHERE id = ?1 AND state = 'pending'",
                params![id, error, ts(at), ts(now)],
            )?,
            None => self.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, state_code = 2 /* dead */, updated_at = ?3 \
                 WHERE id = ?1 AND state = 'pending'",
                params![id, error, ts(now)],
            )?,
        };
        Ok(())
    }

    pub fn outbox_list(&self, filter: &OutboxFilter) -> Result<Vec<OutboxRow>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLS} FROM outbox WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR destination = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = st
            .query_map(
                params![
                    filter.state.map(OutboxState::as_str),
                    filter.destination,
                    filter.limit.map_or(-1, |l| l as i64)
                ],
                row,
            )?
            .collect::<rusqlite::Result<_>>()?;
        self.rendered(rows)
    }

    pub fn outbox_show(&self, id: i64) -> Result<OutboxRow> {
        let r = self
            .conn
            .query_row(&format!("SELECT {COLS} FROM outbox WHERE id = ?1"), [id], row)
            .optional()?
            .ok_or(LedgerError::UnknownOutboxRow(id))?;
        Ok(self.rendered(vec![r])?.remove(0))
    }

    /// Rows as their consumers read them: a bonus document's compact reference to its journal
    /// transaction becomes the document's full payload (see
    /// [`super::accounting::render_bonus_payload`]) and its short key the full one
    /// ([`bonus_key_read`]); every other row is as stored.
    fn rendered(&self, mut rows: Vec<OutboxRow>) -> Result<Vec<OutboxRow>> {
        let mut uid = None;
        for r in &mut rows {
            if r.destination != crate::config::ONEC_BONUS {
                continue;
            }
            let key_tx = bonus_key_tx(&r.idem_key);
            if let Some(full) = super::accounting::render_bonus_payload(&self.conn, &r.payload, key_tx)? {
                r.payload = full;
            }
            if let Some(tx) = key_tx {
                let uid = match &uid {
                    Some(u) => u,
                    None => uid.insert(super::ledger_uid(&self.conn)?),
                };
                r.idem_key = bonus_key_read(uid, tx);
            }
        }
        Ok(rows)
    }

    /// Pending and dead rows per destination: what the watchdog's status line and `/healthz`
    /// ask for every few seconds. Counted through the two partial indexes that hold exactly
    /// those rows, so a count costs the rows still owed, not the outbox's history: after a
    /// 1M-sale backfill (1.5M rows) [`Self::outbox_counts`] took 1.6 s and 117 MiB (it
    /// groups every row in memory), this 0.28 s and 21 MiB with every row still pending, and
    /// next to nothing once they are delivered.
    pub fn outbox_open_counts(&self) -> Result<Vec<(String, OutboxState, i64)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT destination, 'pending', COUNT(*) FROM outbox INDEXED BY outbox_due \
             WHERE state = 'pending' AND destination != 'onec:bonus' GROUP BY destination \
             UNION ALL SELECT 'onec:bonus', 'pending', COUNT(*) FROM outbox INDEXED BY outbox_due_bonus \
             WHERE state = 'pending' AND destination = 'onec:bonus' HAVING COUNT(*) > 0 \
             UNION ALL SELECT destination, 'dead', COUNT(*) FROM outbox INDEXED BY outbox_dead WHERE state = 'dead' \
             GROUP BY destination ORDER BY 1, 2",
        )?;
        counts(&mut st)
    }

    /// Counts per destination and state (every state), for `/status`, `/metrics` and
    /// `kopilka outbox list`: pending rows through the index that holds only them, the rest
    /// from the kept totals (a count of every row took 1.6 s and 117 MiB on 1.5M rows).
    pub fn outbox_counts(&self) -> Result<Vec<(String, OutboxState, i64)>> {
        let mut out: Vec<(String, OutboxState, i64)> = super::totals::kept(&self.conn, "outbox:")?
            .into_iter()
            .filter_map(|(rest, n, _)| {
                let (state, destination) = rest.split_once(':')?;
                Some((
                    destination.to_string(),
                    OutboxState::parse(state).unwrap_or(OutboxState::Dead),
                    n,
                ))
            })
            .collect();
        out.extend(
            self.outbox_open_counts()?
                .into_iter()
                .filter(|(_, state, _)| *state == OutboxState::Pending),
        );
        out.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        Ok(out)
    }

    /// Puts a dead row back in the queue, due now, keeping its attempt history.
    pub fn outbox_retry(&mut self, id: i64, now: DateTime<Utc>) -> Result<()> {
        let r = self.outbox_show(id)?;
        if r.state != OutboxState::Dead {
            return Err(LedgerError::OutboxState {
                id,
                state: r.state.as_str().into(),
                action: "retry",
                needed: "dead",
            });
        }
        self.conn.execute(
            "UPDATE outbox SET state_code = 0 /* pending */, next_attempt_at = ?2, updated_at = ?2, \
             note = COALESCE(note || '; ', '') || 'retried by hand after ' || attempts || ' attempts' WHERE id = ?1",
            params![id, ts(now)],
        )?;
        Ok(())
    }

    pub fn outbox_retry_all_dead(&mut self, now: DateTime<Utc>) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE outbox SET state_code = 0 /* pending */, next_attempt_at = ?1, updated_at = ?1, \
             note = COALESCE(note || '; ', '') || 'retried by hand after ' || attempts || ' attempts' WHERE state = 'dead'",
            params![ts(now)],
        )?)
    }

    /// Gives up on a pending or dead row, recording who decided and why.
    pub fn outbox_drop(&mut self, id: i64, reason: &str, now: DateTime<Utc>) -> Result<()> {
        let r = self.outbox_show(id)?;
        if !matches!(r.state, OutboxState::Dead | OutboxState::Pending) {
            return Err(LedgerError::OutboxState {
                id,
                state: r.state.as_str().into(),
                action: "drop",
                needed: "pending or dead",
            });
        }
        self.conn.execute(
            "UPDATE outbox SET state_code = 4 /* dropped */, updated_at = ?2, note = COALESCE(note || '; ', '') || 'dropped: ' || ?3 \
             WHERE id = ?1",
            params![id, ts(now), reason],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod due_tests {
    use super::*;

    /// Each destination's pending rows are found through the partial index that holds them
    /// (migration 33): a query whose terms did not imply the index's condition would read the
    /// whole outbox — 1.5M rows after a 1M-sale backfill — instead.
    #[test]
    fn every_destinations_due_rows_are_read_through_the_index_that_holds_them() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::ledger::schema::migrate(&mut conn).expect("migrate");
        for (destination, index) in [
            (crate::config::ONEC_BONUS, "outbox_due_bonus"),
            (crate::config::ONEC_ACCOUNTING, "outbox_due "),
            ("amocrm", "outbox_due "),
            ("notify:email", "outbox_due "),
        ] {
            let (named, of) = pending_of(destination);
            assert_eq!(named.trim(), index.trim());
            // the query as `outbox_due` writes it, but that SQLite chooses the index itself:
            // the condition must let it (an index named but not usable fails to prepare)
            let due = crate::ledger::query_plan(
                &conn,
                &format!(
                    "SELECT id FROM outbox WHERE destination = ?1 AND {of} AND state = 'pending' \
                     AND next_attempt_at <= ?2 ORDER BY next_attempt_at LIMIT ?3"
                ),
                params!["x", 0, 0],
            )
            .join("\n");
            assert!(
                due.contains(&format!("USING INDEX {index}")),
                "{destination}: {due}"
            );
        }
    }
}
