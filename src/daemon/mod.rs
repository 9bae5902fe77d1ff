//! The runtime shell: jobs, `kopilka once`, and (with the daemon issue) the scheduler,
//! shutdown, systemd notify and the HTTP endpoint.
//!
//! A job is one unit of scheduled work (poll a source, deliver a destination's outbox,
//! run the nightly jobs). Connectors contribute jobs through [`registry::jobs`]; `once`
//! runs each enabled job one time, the daemon on its schedule.

pub mod amocrm;
pub mod discount_server;
pub mod holds;
pub mod http;
pub mod loyalty_server;
pub mod notify;
pub mod registry;
pub mod report_html;
pub mod runtime;
pub mod serve;
pub mod telegram;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::SharedLedger;

/// What every job gets.
#[derive(Clone)]
pub struct JobContext {
    pub cfg: Arc<Config>,
    pub ledger: SharedLedger,
    pub clock: Arc<dyn Clock>,
    /// Fires on shutdown: a job finishes its current transaction and returns.
    pub cancel: tokio_util::sync::CancellationToken,
}

pub type JobFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<JobOutcome>> + Send + 'a>>;

/// What a job run did, for logs, `once` and the status page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobOutcome {
    pub summary: String,
    /// Work remains (a backlog that the run's limit cut, rows waiting for a retry).
    pub pending: bool,
}

impl JobOutcome {
    pub fn done(summary: impl Into<String>) -> JobOutcome {
        JobOutcome {
            summary: summary.into(),
            pending: false,
        }
    }
}

pub trait Job: Send + Sync {
    /// Stable name (`onec:files`, `amocrm:deliver`, `nightly`), used by `--job` and logs.
    fn name(&self) -> &str;
    /// Polls run before deliveries in `once`, so what a poll queues is delivered the
    /// same run.
    fn stage(&self) -> Stage;
    /// The schedule when `[daemon.schedule]` names none, if the stage's is wrong for the job
    /// (a bot that answers people must run more often than once a minute).
    fn default_schedule(&self) -> Option<&'static str> {
        None
    }
    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Poll,
    Nightly,
    Deliver,
}

/// One run of every job (or only the named one), in stage order.
pub async fn run_once(ctx: &JobContext, only: Option<&str>) -> Vec<(String, anyhow::Result<JobOutcome>)> {
    let mut jobs = registry::jobs(&ctx.cfg);
    jobs.sort_by_key(|j| j.stage());
    let mut out = Vec::new();
    for job in jobs {
        if only.is_some_and(|o| o != job.name()) {
            continue;
        }
        let name = job.name().to_string();
        tracing::info!(job = %name, "job starts");
        let result = job.run(ctx).await;
        match &result {
            Ok(o) => tracing::info!(job = %name, summary = %o.summary, "job done"),
            Err(e) => tracing::error!(job = %name, error = %format!("{e:#}"), "job failed"),
        }
        out.push((name, result));
    }
    out
}
