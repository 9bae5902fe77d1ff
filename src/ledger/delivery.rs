//! Delivering the outbox: take due rows in order, hand them to a [`Sink`], mark each row
//! only after the sink has confirmed it. A crash between the two re-sends the row with the
//! same idempotency key, which the destination recognises: at-least-once delivery with an
//! exactly-once effect.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Ledger, OutboxRow, Result};
use crate::core::backoff::retry_delay;
use crate::core::clock::Clock;

/// How a delivery failed, as the connector classifies it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Timeout, 5xx, 429, connection reset: try again later.
    #[error("retriable: {0}")]
    Retriable(String),
    /// Validation, schema mismatch, 4xx: trying again cannot help; a person must look.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The destination must not be called again until a person acts (an AmoCRM account
    /// block, a revoked token). The row stays pending; the run stops at once.
    #[error("halted: {0}")]
    Halt(String),
    /// Not now, on purpose (a member's quiet hours, a cap, an address still to come): the row
    /// waits until then and the wait is not an attempt.
    #[error("held until {until}: {reason}")]
    Hold {
        until: chrono::DateTime<chrono::Utc>,
        reason: String,
    },
    /// Never, on purpose (no consent, unsubscribed): the row is dropped with the reason.
    #[error("refused: {0}")]
    Refused(String),
}

/// A destination's delivery adapter. Connectors implement it; the loop is shared.
pub trait Sink: Send + Sync {
    /// The outbox destination this sink serves.
    fn destination(&self) -> &str;
    /// Most rows one `deliver` call may take (AmoCRM: 50 contacts per PATCH).
    fn max_batch(&self) -> usize {
        1
    }
    /// Delivers the rows; one result per row, in order.
    fn deliver(&self, rows: &[OutboxRow]) -> impl Future<Output = Vec<Result<(), DeliveryError>>> + Send;
}

#[derive(Clone, Debug)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Rows one run delivers at most, so a huge backlog yields to other jobs.
    pub max_rows_per_run: usize,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_attempts: 12,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            max_rows_per_run: 10_000,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
    /// Rows that wait on purpose (quiet hours, caps, an address to come).
    pub held: usize,
    /// Rows dropped on purpose (no consent, unsubscribed).
    pub refused: usize,
    pub halted: Option<String>,
}

/// The ledger shared between async tasks. SQLite calls are blocking, so each runs on the
/// blocking pool; the connection never crosses an `.await`.
#[derive(Clone)]
pub struct SharedLedger(Arc<Mutex<Ledger>>);

impl SharedLedger {
    pub fn new(ledger: Ledger) -> SharedLedger {
        SharedLedger(Arc::new(Mutex::new(ledger)))
    }

    /// Locks for synchronous use (tests, start-up). A panic while locked does not poison
    /// the ledger: SQLite rolled the transaction back, the data is consistent.
    pub fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn run<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&mut Ledger) -> R + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        });
        match task.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// Delivers what is due for the sink's destination until nothing is due, the per-run limit
/// is reached, or the sink halts.
pub async fn deliver_due<S: Sink>(
    ledger: &SharedLedger,
    sink: &S,
    policy: &DeliveryPolicy,
    clock: &dyn Clock,
) -> Result<DeliveryReport> {
    let mut report = DeliveryReport::default();
    let dest = sink.destination().to_string();
    let batch = sink.max_batch().max(1);
    let mut done = 0;
    while done < policy.max_rows_per_run {
        let now = clock.now();
        let d = dest.clone();
        let limit = batch.min(policy.max_rows_per_run - done);
        let rows = ledger.run(move |l| l.outbox_due(&d, limit, now)).await?;
        if rows.is_empty() {
            break;
        }
        done += rows.len();
        let results = sink.deliver(&rows).await;
        let now = clock.now();
        let mut delivered = Vec::new();
        let mut failed = Vec::new();
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => delivered.push(row.id),
                Some(Err(DeliveryError::Hold { until, reason })) => {
                    held.push((row.id, *until, reason.clone()))
                }
                Some(Err(DeliveryError::Refused(why))) => refused.push((row.id, why.clone())),
                Some(Err(DeliveryError::Halt(why))) => {
                    report.halted = Some(why.clone());
                }
                Some(Err(DeliveryError::Permanent(why))) => failed.push((row.id, why.clone(), None)),
                Some(Err(DeliveryError::Retriable(why))) => {
                    let attempt = row.attempts as u32 + 1;
                    let retry_at = (attempt < policy.max_attempts).then(|| {
                        let delay = retry_delay(
                            attempt,
                            policy.backoff_initial,
                            policy.backoff_max,
                            fastrand::u64(..),
                        );
                        now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
                    });
                    let why = if retry_at.is_none() {
                        format!("{why} (gave up after {attempt} attempts)")
                    } else {
                        why.clone()
                    };
                    failed.push((row.id, why, retry_at));
                }
                None => failed.push((
                    row.id,
                    "the sink returned no result for this row".to_string(),
                    Some(now),
                )),
            }
        }
        report.delivered += delivered.len();
        report.held += held.len();
        report.refused += refused.len();
        for f in &failed {
            if f.2.is_some() {
                report.retried += 1;
            } else {
                report.dead += 1;
            }
        }
        let halted = report.halted.is_some();
        ledger
            .run(move |l| -> Result<()> {
                l.outbox_mark_delivered(&delivered, now)?;
                for (id, why, retry_at) in failed {
                    l.outbox_mark_failed(id, &why, retry_at, now)?;
                }
                for (id, until, why) in held {
                    l.notify_hold(id, until, &why, now)?;
                }
                for (id, why) in refused {
                    l.notify_refuse(id, &why, now)?;
                }
                Ok(())
            })
            .await?;
        if halted {
            break;
        }
    }
    Ok(report)
}
