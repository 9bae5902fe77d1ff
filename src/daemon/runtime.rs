//! `kopilka run`: every enabled job on its schedule, the HTTP endpoint, systemd
//! notifications, and an orderly shutdown.
//!
//! Each job runs in its own task, one run at a time (a run that outlasts its interval
//! delays the next tick rather than overlapping it). A failed run is logged and retried at
//! the next tick; the other jobs are not affected. A tick missed while kopilka was down
//! runs once at start (the time of each job's last run is kept in the ledger). On
//! shutdown no new run starts; a run in progress finishes its current transaction, and the
//! process exits within the configured deadline.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Job, JobContext, Stage, registry};
use crate::clock::Clock;
use crate::config::Config;
use crate::ledger::{Ledger, SharedLedger};

/// A run longer than this counts as stuck: the watchdog stops being fed and systemd
/// restarts the service.
const STUCK_AFTER: chrono::Duration = chrono::Duration::minutes(30);
/// How often the scheduler wakes even with nothing due, so the watchdog sees it alive.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// What people and monitoring see of a job.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JobStatus {
    pub runs: u64,
    pub failures: u64,
    pub running_since: Option<DateTime<Utc>>,
    pub last_finished: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_summary: Option<String>,
    pub last_error: Option<String>,
    pub last_duration_ms: u64,
    pub total_duration_ms: u64,
    pub next_run: Option<DateTime<Utc>>,
    pub pending: bool,
}

/// Shared state of a running daemon.
pub struct Runtime {
    pub started_at: DateTime<Utc>,
    pub jobs: Mutex<BTreeMap<String, JobStatus>>,
    /// Woken after every job run (tests and the status page wait on it).
    pub ran: tokio::sync::Notify,
    pub heartbeat: Mutex<DateTime<Utc>>,
    pub ready: std::sync::atomic::AtomicBool,
    /// Where the HTTP endpoint listens (the port is the system's when 0 was configured).
    pub http_addr: Mutex<Option<std::net::SocketAddr>>,
}

impl Runtime {
    pub fn new(now: DateTime<Utc>) -> Runtime {
        Runtime {
            started_at: now,
            jobs: Mutex::new(BTreeMap::new()),
            ran: tokio::sync::Notify::new(),
            heartbeat: Mutex::new(now),
            ready: std::sync::atomic::AtomicBool::new(false),
            http_addr: Mutex::new(None),
        }
    }

    pub fn jobs(&self) -> BTreeMap<String, JobStatus> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut JobStatus)) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        f(jobs.entry(name.to_string()).or_default());
    }

    fn beat(&self, now: DateTime<Utc>) {
        *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Whether jobs make progress: the scheduler woke recently and no run is stuck.
    pub fn healthy(&self, now: DateTime<Utc>) -> Result<(), String> {
        let beat = *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner());
        if now - beat > chrono::Duration::from_std(HEARTBEAT * 6).unwrap_or_default() {
            return Err(format!("the scheduler has not woken since {beat}"));
        }
        for (name, j) in self.jobs() {
            if let Some(since) = j.running_since
                && now - since > STUCK_AFTER
            {
                return Err(format!("job {name} has been running since {since}"));
            }
        }
        Ok(())
    }
}

/// The schedule of a job: the configured one, or its stage's default.
pub fn schedule_for(cfg: &Config, job: &dyn Job) -> cron::Schedule {
    if let Some(s) = cfg.daemon.schedule.get(job.name()) {
        return s.clone();
    }
    if let Some(own) = job.default_schedule()
        && let Ok(s) = cron::Schedule::from_str(own)
    {
        return s;
    }
    let default = match job.stage() {
        Stage::Poll => "0 * * * * *",
        Stage::Deliver => "30 * * * * *",
        Stage::Nightly => "0 0 3 * * *",
    };
    cron::Schedule::from_str(default).unwrap_or_else(|e| panic!("built-in schedule {default:?}: {e}"))
}

fn next_after(s: &cron::Schedule, after: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
    s.after(&after.with_timezone(&tz))
        .next()
        .map(|t| t.with_timezone(&Utc))
}

async fn last_run(ledger: &SharedLedger, job: &str) -> Option<DateTime<Utc>> {
    let key = format!("job_last_run:{job}");
    ledger
        .run(move |l| l.meta_get(&key))
        .await
        .ok()
        .flatten()
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map(|t| t.with_timezone(&Utc))
}

async fn job_loop(job: Arc<dyn Job>, ctx: JobContext, rt: Arc<Runtime>) {
    let name = job.name().to_string();
    let schedule = schedule_for(&ctx.cfg, job.as_ref());
    let tz = ctx.cfg.timezone;
    let now = ctx.clock.now();
    // a tick missed while kopilka was down runs once now
    let mut due = match last_run(&ctx.ledger, &name).await {
        Some(last) if next_after(&schedule, last, tz).is_some_and(|t| t <= now) => Some(now),
        _ => next_after(&schedule, now, tz),
    };
    loop {
        let Some(at) = due else {
            tracing::warn!(job = %name, "Schedule has no next time; the job stops");
            return;
        };
        rt.update(&name, |s| s.next_run = Some(at));
        // wait for the tick, waking now and then for the watchdog
        loop {
            let now = ctx.clock.now();
            rt.beat(now);
            if now >= at {
                break;
            }
            let wait = (at - now).to_std().unwrap_or_default().min(HEARTBEAT);
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if ctx.cancel.is_cancelled() {
            return;
        }
        let started = ctx.clock.now();
        rt.update(&name, |s| s.running_since = Some(started));
        let span = tracing::info_span!("job", job = %name);
        let result = {
            let _enter = span.enter();
            tracing::info!("Job starts");
            job.run(&ctx).await
        };
        let finished = ctx.clock.now();
        let ms = u64::try_from((finished - started).num_milliseconds()).unwrap_or(0);
        due = next_after(&schedule, finished, tz);
        match &result {
            Ok(o) => tracing::info!(job = %name, summary = %o.summary, duration_ms = ms, "Job done"),
            Err(e) => {
                tracing::error!(job = %name, error = %format!("{e:#}"), "Job failed; it runs again at the next tick")
            }
        }
        rt.update(&name, |s| {
            s.runs += 1;
            s.running_since = None;
            s.next_run = due;
            s.last_finished = Some(finished);
            s.last_duration_ms = ms;
            s.total_duration_ms += ms;
            match &result {
                Ok(o) => {
                    s.last_success = Some(finished);
                    s.last_summary = Some(o.summary.clone());
                    s.last_error = None;
                    s.pending = o.pending;
                }
                Err(e) => {
                    s.failures += 1;
                    s.last_error = Some(format!("{e:#}"));
                }
            }
        });
        let key = format!("job_last_run:{name}");
        let value = started.to_rfc3339();
        if let Err(e) = ctx.ledger.run(move |l| l.meta_set(&key, &value)).await {
            tracing::warn!(job = %name, error = %e, "Could not record the job's last run");
        }
        rt.ran.notify_waiters();
    }
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // a no-op without NOTIFY_SOCKET (not under systemd)
    let _ = sd_notify::notify(false, state);
}

/// Runs the daemon until `shutdown` fires. Returns once every task has stopped (or the
/// deadline passed). `rt` is shared with the caller so tests can watch the jobs.
pub async fn run(
    cfg: Arc<Config>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    rt: Arc<Runtime>,
) -> anyhow::Result<()> {
    // one daemon per ledger; `kopilka ledger restore` waits for this lock to be free
    let _lock = crate::ledger::backup::try_lock(&cfg.ledger_path)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "another kopilka daemon holds the ledger {} ({})",
                cfg.ledger_path.display(),
                crate::ledger::backup::lock_path(&cfg.ledger_path).display()
            )
        })?;
    // the exchange folder is created here, not left to fail every minute until 1C first calls
    if let Some(dir) = cfg.onec.as_ref().and_then(|o| o.exchange_dir.as_ref()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the exchange folder {} (onec.exchange_dir): {e}",
                dir.display()
            )
        })?;
    }
    let ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ledger = SharedLedger::new(ledger);
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        clock: clock.clone(),
        cancel: shutdown.clone(),
    };
    let tracker = TaskTracker::new();

    let listener = tokio::net::TcpListener::bind(cfg.daemon.http_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (daemon.http_listen): {e}",
                cfg.daemon.http_listen
            )
        })?;
    *rt.http_addr.lock().unwrap_or_else(|e| e.into_inner()) = listener.local_addr().ok();
    let app = super::http::router(ctx.clone(), rt.clone());
    let stop = shutdown.clone();
    let limits = cfg.daemon.http_limits;
    tracker.spawn(async move {
        if let Err(e) = super::serve::serve(listener, app, limits, stop).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    if let Some(exchange) = crate::onec::site_exchange::SiteExchange::new(
        cfg.clone(),
        ledger.clone(),
        clock.clone(),
        cfg.onec
            .as_ref()
            .and_then(|o| o.exchange_dir.clone())
            .unwrap_or_else(|| cfg.ledger_path.with_extension("exchange"))
            .join("site"),
    ) {
        let addr = cfg
            .onec
            .as_ref()
            .and_then(|o| o.site_exchange.as_ref())
            .map(|s| s.listen);
        if let Some(addr) = addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (onec.site_exchange.listen): {e}"))?;
            let app = exchange.router();
            let stop = shutdown.clone();
            let limits = cfg.daemon.http_limits;
            tracker.spawn(async move {
                if let Err(e) = super::serve::serve(listener, app, limits, stop).await {
                    tracing::error!(error = %e, "1C site exchange endpoint stopped");
                }
            });
            tracing::info!(listen = %addr, "1C site exchange listening");
        }
    }

    let jobs = registry::jobs(&cfg);
    for job in jobs {
        tracing::info!(job = %job.name(), schedule = %schedule_for(&cfg, job.as_ref()).source(), "Job scheduled");
        tracker.spawn(job_loop(job, ctx.clone(), rt.clone()));
    }
    rt.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.ran.notify_waiters();
    notify(&[sd_notify::NotifyState::Ready]);
    for w in &cfg.warnings {
        tracing::warn!(warning = %w, "Configuration warning");
    }
    tracing::info!(listen = %cfg.daemon.http_listen, ledger = %cfg.ledger_path.display(), "kopilka is running");

    // systemd watchdog and status line
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let rt2 = rt.clone();
    let clock2 = clock.clone();
    let ledger2 = ledger.clone();
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let period = if watchdog {
            Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(500))
        } else {
            Duration::from_secs(30)
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let now = clock2.now();
            let pending = ledger2
                .run(|l| l.outbox_open_counts())
                .await
                .map(|c| {
                    c.iter()
                        .filter(|(_, s, _)| *s == crate::ledger::OutboxState::Pending)
                        .map(|(_, _, n)| n)
                        .sum::<i64>()
                })
                .unwrap_or(0);
            let last = rt2.jobs().values().filter_map(|j| j.last_success).max();
            let status = format!(
                "last sync {}; {pending} deliveries pending",
                last.map_or("never".to_string(), |t| t.format("%H:%M:%S").to_string())
            );
            match rt2.healthy(now) {
                Ok(()) if watchdog => notify(&[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&status),
                ]),
                Ok(()) => notify(&[sd_notify::NotifyState::Status(&status)]),
                Err(why) => {
                    tracing::error!(reason = %why, "Jobs make no progress; the watchdog is not fed");
                    notify(&[sd_notify::NotifyState::Status(&format!("stuck: {why}"))]);
                }
            }
        }
    });
    tracker.close();

    shutdown.cancelled().await;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("Shutting down: no new job starts, running ones finish their transaction");
    if tokio::time::timeout(cfg.daemon.shutdown_deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline_s = cfg.daemon.shutdown_deadline.as_secs(),
            "Jobs did not stop within the shutdown deadline; exiting anyway (the ledger rolls back what was not committed)"
        );
    }
    Ok(())
}
