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
                    let ictx = crate::ledger::IngestContext {
                        rules: &cfg.program,
                        limits: &cfg.limits,
                        destinations: &dest,
                        now,
                        warn_before: cfg.warn_before,
                    };
                    l.nightly(&cfg.program, &ictx)
                })
                .await?;
            Ok(JobOutcome::done(format!(
                "expired {} points, {} tier changes, {} birthday and {} referral bonuses, {} expiry warnings",
                r.expired_points, r.tier_changes, r.birthday_bonuses, r.referral_bonuses, r.expiry_warnings
            )))
        })
    }
}

/// Every job the configuration enables.
pub fn jobs(cfg: &Config) -> Vec<Arc<dyn Job>> {
    let mut jobs: Vec<Arc<dyn Job>> = vec![Arc::new(Nightly)];
    jobs.extend(super::amocrm::jobs(cfg));
    jobs.sort_by_key(|j| j.stage());
    jobs
}
