//! The AmoCRM jobs: `amocrm:events` (poll won deals and contact edits) and
//! `amocrm:deliver` (match customers to contacts, then push cards and notes). Both share one
//! [`Connector`], hence one rate limiter, one token and one halt state per process.

use std::sync::Arc;

use anyhow::Context;

use super::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::amocrm::contacts::match_unlinked;
use crate::amocrm::deals::poll;
use crate::amocrm::notes::NotesSink;
use crate::amocrm::sink::ContactSink;
use crate::amocrm::{ClientOptions, Connector};
use crate::ledger::deliver_due;

/// Customers whose card is re-queued per run at most (never pushed, points became usable).
const REQUEUE_PER_RUN_CUSTOMERS: usize = 50_000;

/// The connector, built on first use from the job context and shared by both jobs.
#[derive(Default)]
pub struct Shared {
    cell: tokio::sync::OnceCell<Arc<Connector>>,
    opts: Option<ClientOptions>,
}

impl Shared {
    /// With client options other than the configuration's (tests: short back-offs).
    pub fn with_options(opts: ClientOptions) -> Shared {
        Shared {
            cell: tokio::sync::OnceCell::new(),
            opts: Some(opts),
        }
    }

    pub async fn get(&self, ctx: &JobContext) -> anyhow::Result<Arc<Connector>> {
        let c = self
            .cell
            .get_or_try_init(|| async {
                Connector::new(
                    ctx.cfg.clone(),
                    ctx.ledger.clone(),
                    ctx.clock.clone(),
                    self.opts.clone(),
                )
                .map(Arc::new)
            })
            .await?;
        Ok(c.clone())
    }
}

pub struct Events(pub Arc<Shared>);
pub struct Deliver(pub Arc<Shared>);

fn halted(conn: &Connector) -> anyhow::Result<()> {
    match conn.client.halted() {
        Some(h) => anyhow::bail!("amocrm sync is halted: {h}"),
        None => Ok(()),
    }
}

impl Job for Events {
    fn name(&self) -> &str {
        "amocrm:events"
    }

    fn stage(&self) -> Stage {
        Stage::Poll
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let conn = self.0.get(ctx).await?;
            halted(&conn)?;
            for a in conn.client.alerts() {
                tracing::warn!(alert = %a, "AmoCRM needs attention");
            }
            // a refresh when due, even on a quiet account (the refresh token lapses after 3 months)
            conn.client.bearer().await.context("amocrm token")?;
            let r = poll(&conn).await.context("polling amocrm events")?;
            Ok(JobOutcome::done(format!(
                "{} events ({} new): {} won deals, {} reversed, {} applied, {} contacts relinked, \
                 {} customers' attributes changed, {} refused, {} kept",
                r.events,
                r.new_events,
                r.sales,
                r.voids,
                r.applied,
                r.relinked,
                r.attributes_changed,
                r.attributes_refused,
                r.attributes_kept
            )))
        })
    }
}

impl Job for Deliver {
    fn name(&self) -> &str {
        "amocrm:deliver"
    }

    fn stage(&self) -> Stage {
        Stage::Deliver
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let conn = self.0.get(ctx).await?;
            halted(&conn)?;
            let m = match_unlinked(&conn)
                .await
                .context("matching customers to amocrm contacts")?;
            let requeued = conn
                .with_ledger(|l, ictx| l.amocrm_enqueue_stale(ictx, REQUEUE_PER_RUN_CUSTOMERS))
                .await?;
            let notes = conn.amo().notes.clone();
            let min = conn.amo().note_accrual_min_points;
            let now = ctx.clock.now();
            let queued_notes = ctx
                .ledger
                .run(move |l| l.amocrm_queue_notes(&notes, min, now))
                .await?;
            let policy = &ctx.cfg.delivery;
            let cards = deliver_due(
                &ctx.ledger,
                &ContactSink { conn: &conn },
                policy,
                ctx.clock.as_ref(),
            )
            .await?;
            let noted = if cards.halted.is_none() {
                deliver_due(
                    &ctx.ledger,
                    &NotesSink { conn: &conn },
                    policy,
                    ctx.clock.as_ref(),
                )
                .await?
            } else {
                Default::default()
            };
            // members' messages through the shop's Salesbot, after the cards the bot may quote
            let plan = ctx.cfg.notify_plan();
            let bots = match (&ctx.cfg.notify.salesbot, plan) {
                (Some(sb), Some(plan)) if cards.halted.is_none() && noted.halted.is_none() => {
                    let sink = crate::notify::NotifySink {
                        ledger: ctx.ledger.clone(),
                        plan,
                        clock: ctx.clock.clone(),
                        transport: crate::notify::salesbot::Salesbot {
                            conn: conn.clone(),
                            bot_id: sb.bot_id,
                            batch: sb.batch,
                        },
                    };
                    deliver_due(&ctx.ledger, &sink, policy, ctx.clock.as_ref()).await?
                }
                _ => Default::default(),
            };
            let summary = format!(
                "{} linked ({} created), {} ambiguous, {} without contact; attributes: {} customers changed, \
                 {} refused, {} kept; {} cards re-queued; cards: {} delivered, \
                 {} retried, {} dead; notes: {} queued, {} delivered, {} retried, {} dead",
                m.linked + m.created,
                m.created,
                m.ambiguous,
                m.not_found,
                m.attributes_changed,
                m.attributes_refused,
                m.attributes_kept,
                requeued,
                cards.delivered,
                cards.retried,
                cards.dead,
                queued_notes,
                noted.delivered,
                noted.retried,
                noted.dead
            );
            let summary = if ctx.cfg.notify.salesbot.is_some() {
                format!(
                    "{summary}; salesbot: {} started, {} held, {} not sent, {} retried, {} dead",
                    bots.delivered, bots.held, bots.refused, bots.retried, bots.dead
                )
            } else {
                summary
            };
            if let Some(h) = cards.halted.or(noted.halted).or(bots.halted) {
                anyhow::bail!("amocrm sync is halted: {h} ({summary})");
            }
            Ok(JobOutcome {
                summary,
                pending: cards.retried + noted.retried + bots.retried > 0,
            })
        })
    }
}

/// The AmoCRM jobs of a configuration (none without `[amocrm]`).
pub fn jobs(cfg: &crate::config::Config) -> Vec<Arc<dyn Job>> {
    if cfg.amocrm.is_none() {
        return Vec::new();
    }
    let shared = Arc::new(Shared::default());
    vec![Arc::new(Events(shared.clone())), Arc::new(Deliver(shared))]
}
