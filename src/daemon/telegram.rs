//! The `notify:telegram` job: each run answers the members' messages waiting in the bot (one
//! short `getUpdates`, so `kopilka once` ends), sends the answers, then the members' messages
//! that are due. The client is built once per process and shared by every run, so a 429's
//! pause holds across them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::ledger::{BotSettings, deliver_due};
use crate::notify::NotifySink;
use crate::notify::telegram::{Api, ApiError, ReplySink, Telegram, answer_updates};

/// How long one run waits for a member's message when none is waiting: short, because the
/// scheduler runs the job again soon (`default_schedule`; `[daemon.schedule]` overrides it).
const POLL_PER_RUN: Duration = Duration::from_secs(1);

pub struct TelegramJob {
    api: tokio::sync::OnceCell<Arc<Api>>,
    poll: Duration,
}

impl Default for TelegramJob {
    fn default() -> Self {
        TelegramJob::with_poll(POLL_PER_RUN)
    }
}

impl TelegramJob {
    /// With another wait for updates per run (tests: none).
    pub fn with_poll(poll: Duration) -> TelegramJob {
        TelegramJob {
            api: tokio::sync::OnceCell::new(),
            poll,
        }
    }
}

impl Job for TelegramJob {
    fn name(&self) -> &str {
        "notify:telegram"
    }

    fn stage(&self) -> Stage {
        Stage::Deliver
    }

    /// Every 3 seconds: with the second each run waits for updates, a member is answered
    /// within about 4 seconds.
    fn default_schedule(&self) -> Option<&'static str> {
        Some("*/3 * * * * *")
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let Some(cfg) = ctx.cfg.notify.telegram.as_ref() else {
                return Ok(JobOutcome::done("[notify.telegram] is not configured"));
            };
            let api = self
                .api
                .get_or_try_init(|| async { Api::new(cfg, ctx.clock.clone()).map(Arc::new) })
                .await?
                .clone();
            let settings = BotSettings {
                timezone: ctx.cfg.timezone,
                warn_before: ctx.cfg.warn_before,
                shop: ctx.cfg.program.notify.shop.clone(),
            };
            let answered = match answer_updates(&api, &ctx.ledger, &settings, self.poll).await {
                Ok(a) => a,
                Err(e) => match e.downcast_ref::<ApiError>() {
                    Some(ApiError::Wait(_) | ApiError::Transient(_)) => {
                        tracing::warn!(error = %e, "reading the Telegram bot's updates failed; next run tries again");
                        Default::default()
                    }
                    _ => return Err(e.context("reading the Telegram bot's updates")),
                },
            };
            let policy = &ctx.cfg.delivery;
            let replies = deliver_due(
                &ctx.ledger,
                &ReplySink {
                    api: api.clone(),
                    ledger: ctx.ledger.clone(),
                },
                policy,
                ctx.clock.as_ref(),
            )
            .await
            .context("sending the bot's answers")?;
            let messages = match ctx.cfg.notify_plan() {
                Some(plan) if replies.halted.is_none() => {
                    let sink = NotifySink {
                        ledger: ctx.ledger.clone(),
                        plan,
                        clock: ctx.clock.clone(),
                        transport: Telegram {
                            api: api.clone(),
                            ledger: ctx.ledger.clone(),
                        },
                    };
                    deliver_due(&ctx.ledger, &sink, policy, ctx.clock.as_ref())
                        .await
                        .context("sending members' messages")?
                }
                _ => Default::default(),
            };
            let summary = format!(
                "{} updates, {} answers queued; answers: {} sent, {} retried, {} refused; messages: {} sent, {} held, \
                 {} refused, {} retried, {} dead",
                answered.updates,
                answered.replies,
                replies.delivered,
                replies.retried,
                replies.refused,
                messages.delivered,
                messages.held,
                messages.refused,
                messages.retried,
                messages.dead
            );
            if let Some(h) = replies.halted.or(messages.halted) {
                anyhow::bail!("telegram is halted: {h} ({summary})");
            }
            Ok(JobOutcome {
                summary,
                pending: replies.retried + messages.retried > 0,
            })
        })
    }
}

/// The job when `[notify.telegram]` is configured.
pub fn jobs(cfg: &crate::config::Config) -> Vec<Arc<dyn Job>> {
    if cfg.notify.telegram.is_none() {
        return Vec::new();
    }
    vec![Arc::new(TelegramJob::default())]
}
