//! The `onec:odata` poll job, and the one-off import of 1C's bonus balances.
//!
//! The job implements the daemon's `Job` trait here, beside the poller it drives, so that
//! the registry needs one line; it keeps one poller for the life of the process, so the
//! memory of applied versions carries from poll to poll.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::poll::OdataPoller;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::daemon::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::ledger::{IngestContext, OpeningReport, SharedLedger};

/// Polls `[onec.odata]`: catalog when due, documents, re-scan when due.
#[derive(Default)]
pub struct OdataJob {
    poller: Mutex<Option<Arc<OdataPoller>>>,
}

impl OdataJob {
    /// The job, when the configuration has `[onec.odata]`.
    pub fn enabled_by(cfg: &Config) -> Option<Arc<dyn Job>> {
        cfg.onec
            .as_ref()
            .and_then(|o| o.odata.as_ref())
            .map(|_| Arc::new(OdataJob::default()) as Arc<dyn Job>)
    }

    fn poller(&self, cfg: &Arc<Config>) -> anyhow::Result<Arc<OdataPoller>> {
        let mut slot = self.poller.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let p = Arc::new(OdataPoller::new(cfg.clone())?);
        *slot = Some(p.clone());
        Ok(p)
    }
}

impl Job for OdataJob {
    fn name(&self) -> &str {
        "onec:odata"
    }

    fn stage(&self) -> Stage {
        Stage::Poll
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let poller = self.poller(&ctx.cfg)?;
            let report = poller.poll(&ctx.ledger, ctx.clock.now(), &ctx.cancel).await?;
            Ok(JobOutcome {
                summary: report.summary(),
                pending: report.pending,
            })
        })
    }
}

/// `kopilka import-balances --from-1c`: reads the bonus register's balance per customer
/// (`[bonus]` in the mapping) and imports it as opening balances, idempotent per customer
/// under the source `<system>:odata:bonus`.
pub async fn import_balances_from_1c(cfg: &Config, ledger: &SharedLedger) -> anyhow::Result<OpeningReport> {
    import_balances_from_1c_at(cfg, ledger, SystemClock.now()).await
}

/// [`import_balances_from_1c`] at a given time (tests, a fake clock).
pub async fn import_balances_from_1c_at(
    cfg: &Config,
    ledger: &SharedLedger,
    now: DateTime<Utc>,
) -> anyhow::Result<OpeningReport> {
    let cfg = Arc::new(cfg.clone());
    let poller = OdataPoller::new(cfg.clone())?;
    let rows = poller.bonus_balances(now).await?;
    let source = crate::ledger::opening_source_from_register(&poller.system);
    let report = ledger
        .run(move |l| {
            let mut dest = cfg.destinations();
            // these points are 1C's own: posting them back as accruals would count them twice
            // in 1C's register (their later expiry or use is kopilka's and goes back as usual)
            dest.onec_bonus = None;
            let ctx = IngestContext {
                rules: &cfg.program,
                limits: &cfg.limits,
                destinations: &dest,
                now,
                warn_before: cfg.warn_before,
            };
            l.import_opening_balances(&source, &source, rows, &ctx)
        })
        .await?;
    Ok(report)
}
