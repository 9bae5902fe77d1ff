//! Item 3, AmoCRM push: 20,000 changed balances through the real connector (the
//! `amocrm:deliver` job, run back to back until the outbox is drained) against the AmoCRM
//! simulator enforcing 7 requests/s in any 1-second window. The ceiling is 7 requests/s ×
//! 50 contacts per PATCH = 350 contacts/s; targets: ≥ 90% of it, 0 × 429, no unchanged
//! contact sent.
//!
//! Setup, measured too but not against the target: every customer (the changed ones and
//! 25% more that will not change) buys once and is matched by phone to a contact the CRM
//! already has, and every card is pushed. Then the changed customers buy again, and the
//! unchanged ones are queued again anyway (a retried row, a re-queue): the second push must
//! send exactly the changed contacts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use super::data;
use super::{Check, Ctx, Outcome, thousands};
use crate::clock::{Clock, SystemClock};
use crate::core::document::{DocKind, Document, Incoming, Line, SourceRef, content_version};
use crate::core::identity::{CustomerIdentity, Phone};
use crate::core::money::{Money, Points};
use crate::daemon::amocrm::{Deliver, Shared};
use crate::daemon::{Job, JobContext};
use crate::ledger::{Batch, Item, Ledger, OutboxState, SharedLedger};
use crate::sim::amocrm::{AmoSim, Recorded};

const RPS: u32 = 7;
const CONTACTS_PER_PATCH: usize = crate::amocrm::sink::PATCH_MAX_CONTACTS;
/// Deliver runs one push may take at most (each handles `[outbox] max_rows_per_run`).
const MAX_RUNS: usize = 50;
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJl";

fn phone(i: usize) -> String {
    format!("+7901{i:07}")
}

/// A till sale of `rub` rubles to the customer with phone `i`.
fn sale(id: String, i: usize, rub: i64, at: DateTime<Utc>) -> Document {
    let net = Money(rub * 100);
    let mut d = Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: id.clone(),
            version: String::new(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: Some(format!("ЧК-{id}")),
        occurred_at: at,
        customer: CustomerIdentity {
            phone: Phone::parse(&phone(i)),
            ..Default::default()
        },
        currency: "RUB".into(),
        lines: vec![Line {
            product_id: "P00001".into(),
            name: "Кофе в зёрнах".into(),
            category: Some("coffee".into()),
            category_parents: Vec::new(),
            quantity: Decimal::ONE,
            unit_price: net,
            discount: Money::ZERO,
            net,
            unit_cost: Some(Money(rub * 55)),
            service: false,
        }],
        total: net,
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    };
    d.source.version = content_version(&d);
    d
}

/// What one push (deliver runs until the outbox is drained) did, from the simulator's log.
#[derive(Clone, Debug, serde::Serialize)]
struct Push {
    runs: usize,
    wall_seconds: f64,
    requests: usize,
    patches: usize,
    contacts_patched: usize,
    contacts_per_patch: f64,
    contacts_per_second: f64,
    /// Requests per second between the first and the last request.
    request_rate: f64,
    max_requests_in_any_second: usize,
    rate_limited_429: u64,
}

fn patches(reqs: &[Recorded]) -> Vec<&Recorded> {
    reqs.iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v4/contacts" && r.status == 200)
        .collect()
}

fn patched_ids(reqs: &[Recorded]) -> Vec<i64> {
    patches(reqs)
        .iter()
        .flat_map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i["id"].as_i64())
        })
        .collect()
}

pub fn run(ctx: &Ctx, contacts: Option<usize>) -> anyhow::Result<Outcome> {
    let changed = contacts.unwrap_or(if ctx.quick { 500 } else { 20_000 });
    let unchanged = changed / 4;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(push(ctx, changed, unchanged))
}

async fn push(ctx: &Ctx, changed: usize, unchanged: usize) -> anyhow::Result<Outcome> {
    let total = changed + unchanged;
    ctx.say(format!(
        "amocrm: {} changed balances (and {} unchanged re-queued) to the simulator at {RPS} requests/s",
        thousands(changed as u64),
        thousands(unchanged as u64)
    ));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sim = AmoSim::builder()
        .requests_per_second(RPS as usize)
        .block_after_violations(3)
        .clock(clock.clone())
        .long_lived_token(
            TOKEN,
            Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
        )
        .start()
        .await?;
    let ledger_path = ctx.work.fresh("amocrm.db");
    let config = data::write_config(
        &ctx.work.dir,
        "amocrm.toml",
        &ledger_path,
        &data::amocrm_section(&ctx.work.dir, &sim.base_url, RPS),
    )?;
    let cfg = Arc::new(data::load_config(&config)?);
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger)?);
    let jctx = JobContext {
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let ingest = |docs: Vec<Document>| -> anyhow::Result<()> {
        let dest = cfg.destinations();
        let now = clock.now();
        for chunk in docs.chunks(cfg.max_documents_per_transaction.max(1)) {
            let items = chunk
                .iter()
                .map(|d| Item::Incoming(Incoming::Document(d.clone())))
                .collect();
            ledger.lock().ingest(
                Batch {
                    source: "bench".into(),
                    items,
                    ..Default::default()
                },
                &cfg.ingest_context(now, &dest),
            )?;
        }
        Ok(())
    };
    let day_ago = clock.now() - chrono::Duration::days(1);
    ingest(
        (0..total)
            .map(|i| sale(format!("A{i}"), i, 100 + (i as i64 % 900), day_ago))
            .collect(),
    )?;
    for i in 0..total {
        let p = phone(i);
        let typed = format!("8 ({}) {}-{}-{}", &p[2..5], &p[5..8], &p[8..10], &p[10..12]);
        sim.add_contact(&format!("Покупатель {i}"), &[&typed], &[]);
    }
    let shared = Arc::new(Shared::default());
    let deliver = Deliver(shared.clone());
    let drain = |label: &'static str| {
        let deliver = &deliver;
        let jctx = &jctx;
        let sim = &sim;
        let ledger = &ledger;
        async move {
            sim.clear_requests();
            let started = Instant::now();
            let mut runs = 0;
            loop {
                runs += 1;
                let out = deliver.run(jctx).await?;
                let pending: i64 = ledger
                    .lock()
                    .outbox_counts()?
                    .iter()
                    .filter(|(d, s, _)| d == "amocrm" && *s == OutboxState::Pending)
                    .map(|(_, _, n)| n)
                    .sum();
                if pending == 0 {
                    break;
                }
                anyhow::ensure!(
                    runs < MAX_RUNS,
                    "{label}: {pending} rows still pending after {runs} runs: {}",
                    out.summary
                );
            }
            let wall = started.elapsed();
            let reqs = sim.requests();
            let p = patches(&reqs);
            // where the time went: the limiter's spacing, or gaps between requests
            let mut gaps: Vec<f64> = reqs
                .windows(2)
                .map(|w| w[1].at.saturating_sub(w[0].at).as_secs_f64() * 1000.0)
                .collect();
            gaps.sort_by(f64::total_cmp);
            let q = |f: f64| {
                gaps.get(((gaps.len().max(1) - 1) as f64 * f) as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            ctx.say(format!(
                "  {label}: gaps between requests p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                q(0.5),
                q(0.99),
                q(1.0)
            ));
            let contacts: usize = p.iter().map(|r| r.items()).sum();
            let span = match (reqs.first(), reqs.last()) {
                (Some(a), Some(b)) if b.at > a.at => (b.at - a.at).as_secs_f64(),
                _ => 0.0,
            };
            let push = Push {
                runs,
                wall_seconds: wall.as_secs_f64(),
                requests: reqs.len(),
                patches: p.len(),
                contacts_patched: contacts,
                contacts_per_patch: contacts as f64 / p.len().max(1) as f64,
                contacts_per_second: contacts as f64 / wall.as_secs_f64(),
                request_rate: if span > 0.0 {
                    (reqs.len() - 1) as f64 / span
                } else {
                    0.0
                },
                max_requests_in_any_second: sim.max_requests_in_any_second(),
                rate_limited_429: sim.rate_limited(),
            };
            Ok::<(Push, Vec<Recorded>), anyhow::Error>((push, reqs))
        }
    };

    let (first, _) = drain("first push").await?;
    ctx.say(format!(
        "  setup: {} customers matched by phone and pushed: {} requests ({} PATCH × {:.1} contacts) in {:.1} s, \
         {:.0} contacts/s, {} × 429",
        thousands(total as u64),
        first.requests,
        first.patches,
        first.contacts_per_patch,
        first.wall_seconds,
        first.contacts_per_second,
        first.rate_limited_429
    ));
    let links = {
        let l = ledger.lock();
        let ids = l.customer_ids()?;
        l.amocrm_links(&ids)?
    };
    anyhow::ensure!(
        links.len() == total,
        "{} of {total} customers linked to a contact",
        links.len()
    );

    // the changed balances, and the unchanged cards queued again
    let now = clock.now();
    ingest((0..changed).map(|i| sale(format!("B{i}"), i, 300, now)).collect())?;
    let mut expected = BTreeSet::new();
    {
        let mut l = ledger.lock();
        for i in 0..total {
            let ids = l.customers_by_key("phone", &phone(i))?;
            let c = *ids
                .first()
                .ok_or_else(|| anyhow::anyhow!("customer {i} not in the ledger"))?;
            if i < changed {
                expected.insert(links[&c]);
            } else {
                l.outbox_enqueue(
                    "amocrm",
                    &format!("bench-requeue:{c}"),
                    Some(&format!("contact:{c}")),
                    &format!(r#"{{"customer_id":{c}}}"#),
                    now,
                )?;
            }
        }
    }
    let (second, reqs) = drain("changed push").await?;
    let sent = patched_ids(&reqs);
    let sent_set: BTreeSet<i64> = sent.iter().copied().collect();
    let unchanged_sent = sent_set.difference(&expected).count();
    let missing = expected.difference(&sent_set).count();
    anyhow::ensure!(
        missing == 0,
        "{missing} changed contacts were not pushed ({} sent)",
        sent.len()
    );
    let ceiling = f64::from(RPS) * CONTACTS_PER_PATCH as f64;
    let share = second.contacts_per_second / ceiling;
    ctx.say(format!(
        "  push:  {} changed: {} requests ({} PATCH × {:.1} contacts) in {:.1} s = {:.0} contacts/s \
         = {:.1}% of the ceiling {ceiling:.0}/s ({RPS} × {CONTACTS_PER_PATCH}); {:.2} requests/s, max {} in any 1 s; \
         {} × 429; {} unchanged sent, {} sent twice",
        thousands(changed as u64),
        second.requests,
        second.patches,
        second.contacts_per_patch,
        second.wall_seconds,
        second.contacts_per_second,
        share * 100.0,
        second.request_rate,
        second.max_requests_in_any_second,
        second.rate_limited_429,
        unchanged_sent,
        sent.len() - sent_set.len()
    ));
    let figures = serde_json::json!({
        "changed": changed,
        "unchanged_requeued": unchanged,
        "requests_per_second_limit": RPS,
        "ceiling_contacts_per_second": ceiling,
        "setup_push": first,
        "changed_push": second,
        "share_of_ceiling": share,
        "unchanged_sent": unchanged_sent,
        "sent_twice": sent.len() - sent_set.len(),
    });
    let wall = Duration::from_secs_f64(second.wall_seconds);
    Ok(Outcome {
        item: "amocrm",
        figures,
        checks: vec![
            Check {
                item: "amocrm",
                what: format!(
                    "{} changed in {}: share of 350 contacts/s",
                    thousands(changed as u64),
                    data::secs(wall)
                ),
                value: format!("{:.1}%", share * 100.0),
                target: "≥ 90%".into(),
                met: share >= 0.9,
            },
            Check {
                item: "amocrm",
                what: "429 answers (setup and push)".into(),
                value: (first.rate_limited_429 + second.rate_limited_429).to_string(),
                target: "0".into(),
                met: first.rate_limited_429 + second.rate_limited_429 == 0,
            },
            Check {
                item: "amocrm",
                what: "unchanged contacts sent".into(),
                value: unchanged_sent.to_string(),
                target: "0".into(),
                met: unchanged_sent == 0,
            },
        ],
    })
}
