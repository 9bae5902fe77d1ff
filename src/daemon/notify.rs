//! The members' message jobs, one per channel (`notify:email`, `notify:salesbot`; the
//! Telegram bot's job answers members too): each delivers its channel's due outbox rows
//! through [`NotifySink`], which applies consent, quiet hours and caps at send time.

use anyhow::Context;

use super::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::core::notify::{Channel, unsubscribe_token};
use crate::ledger::{DeliveryReport, deliver_due};
use crate::notify::NotifySink;
use crate::notify::email::Email;

fn outcome(what: &str, r: &DeliveryReport) -> JobOutcome {
    let mut s = format!(
        "{} {what} sent, {} held, {} not sent, {} to retry, {} failed",
        r.delivered, r.held, r.refused, r.retried, r.dead
    );
    if let Some(h) = &r.halted {
        s.push_str(&format!("; halted: {h}"));
    }
    JobOutcome::done(s)
}

/// The member's unsubscribe link for a channel, when the shop published the endpoint.
pub fn unsubscribe_link(
    base: Option<&str>,
    secret: &[u8],
    customer: i64,
    channel: Channel,
) -> Option<String> {
    base.map(|u| {
        format!(
            "{u}{}m={customer}&c={}&t={}",
            if u.contains('?') { '&' } else { '?' },
            channel.as_str(),
            unsubscribe_token(secret, customer, channel)
        )
    })
}

pub struct EmailJob;

impl Job for EmailJob {
    fn name(&self) -> &str {
        "notify:email"
    }

    fn stage(&self) -> Stage {
        Stage::Deliver
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let Some(cfg) = ctx.cfg.notify.email.clone() else {
                return Ok(JobOutcome::done("no [notify.email]"));
            };
            let Some(plan) = ctx.cfg.notify_plan() else {
                return Ok(JobOutcome::done(
                    "no event of [notifications] goes to a configured channel",
                ));
            };
            let secret = ctx.ledger.run(|l| l.notify_secret()).await?;
            let base = cfg.unsubscribe_url.clone();
            let link = Box::new(move |c: i64| unsubscribe_link(base.as_deref(), &secret, c, Channel::Email));
            let sink = NotifySink {
                ledger: ctx.ledger.clone(),
                plan,
                clock: ctx.clock.clone(),
                transport: Email::new(&cfg, link).context("setting up the SMTP connection")?,
            };
            let r = deliver_due(&ctx.ledger, &sink, &ctx.cfg.delivery, ctx.clock.as_ref()).await?;
            Ok(outcome("e-mails", &r))
        })
    }
}
