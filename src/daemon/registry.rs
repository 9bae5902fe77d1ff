//! Which jobs a configuration enables. Each connector adds its jobs here.

use std::sync::Arc;

use super::{Job, JobContext, JobFuture, JobOutcome, Stage};
use crate::config::Config;

/// The ledger's own nightly work: expiry, tiers, birthday and referral bonuses, expiry
/// warnings, offers and segments.
struct Nightly;

impl Job for Nightly {
    fn name(&self) -> &str {
        "nightly"
    }

    fn stage(&self) -> Stage {
        Stage::Nightly
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let cfg = ctx.cfg.clone();
            let now = ctx.clock.now();
            let r = ctx
                .ledger
                .run(move |l| {
                    let dest = cfg.destinations();
                    l.nightly(&cfg.program, &cfg.ingest_context(now, &dest))
                })
                .await?;
            Ok(JobOutcome::done(format!(
                "expired {} points, {} tier changes, {} birthday and {} referral bonuses, {} expiry warnings, {} vouchers expired",
                r.expired_points,
                r.tier_changes,
                r.birthday_bonuses,
                r.referral_bonuses,
                r.expiry_warnings,
                r.vouchers_expired
            )))
        })
    }
}

/// Daily accounting postings per legal entity, with adjusting postings for late
/// corrections.
struct Accounting;

impl Job for Accounting {
    fn name(&self) -> &str {
        "accounting"
    }

    fn stage(&self) -> Stage {
        Stage::Nightly
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let cfg = ctx.cfg.clone();
            let now = ctx.clock.now();
            let made = ctx
                .ledger
                .run(move |l| {
                    let dest = cfg.destinations();
                    l.post_accounting(
                        &cfg.books(),
                        cfg.accounting.lookback_days,
                        &cfg.ingest_context(now, &dest),
                    )
                })
                .await?;
            let adjusting = made.iter().filter(|p| p.seq > 1).count();
            Ok(JobOutcome::done(format!(
                "{} postings made ({adjusting} adjusting earlier days)",
                made.len()
            )))
        })
    }
}

/// Scheduled copies of the ledger (`[ledger] backup_dir`), taken while everything runs.
struct Backup;

impl Job for Backup {
    fn name(&self) -> &str {
        "ledger:backup"
    }

    fn stage(&self) -> Stage {
        Stage::Nightly
    }

    fn run<'a>(&'a self, ctx: &'a JobContext) -> JobFuture<'a> {
        Box::pin(async move {
            let Some(dir) = ctx.cfg.backup_dir.clone() else {
                return Ok(JobOutcome::done("no backup folder configured"));
            };
            let keep = ctx.cfg.backup_keep;
            let now = ctx.clock.now();
            let (path, removed) = ctx
                .ledger
                .run(move |l| crate::ledger::backup::scheduled(l, &dir, keep, now))
                .await?;
            Ok(JobOutcome::done(format!(
                "ledger copied to {} ({removed} old backups removed, {keep} kept)",
                path.display()
            )))
        })
    }
}

/// Every job the configuration enables.
pub fn jobs(cfg: &Config) -> Vec<Arc<dyn Job>> {
    let mut jobs: Vec<Arc<dyn Job>> = vec![Arc::new(Nightly), Arc::new(Accounting)];
    if cfg.backup_dir.is_some() {
        jobs.push(Arc::new(Backup));
    }
    if cfg.onec.as_ref().is_some_and(|o| o.exchange_dir.is_some()) {
        jobs.push(Arc::new(crate::onec::exchange::FolderJob));
    }
    jobs.extend(crate::onec::odata::OdataJob::enabled_by(cfg));
    jobs.extend(crate::onec::odata::write::OdataDeliverJob::enabled_by(cfg));
    jobs.extend(super::amocrm::jobs(cfg));
    if cfg.notify.email.is_some() {
        jobs.push(Arc::new(super::notify::EmailJob));
    }
    jobs.extend(super::telegram::jobs(cfg));
    jobs.sort_by_key(|j| j.stage());
    jobs
}
