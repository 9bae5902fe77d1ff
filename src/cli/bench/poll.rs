//! Item 5, incremental poll: one OData poll cycle of the real poller against the 1C OData
//! simulator holding N sales (1M in the full run), with a ledger that already holds those
//! N sales at the simulator's versions (written with direct SQL from the simulator's own
//! documents, then checkpointed as after a long-running daemon). Measured: a poll with 0
//! new documents, one with 1,000 new, and 0 again — time and requests. It must be
//! O(new documents): requests do not depend on N, and kopilka's own time (the poll minus
//! the time the simulator needs to answer the same requests, replayed with a plain HTTP
//! client) stays small.
//!
//! The simulator answers a `$filter` by scanning every document of the set (it has no
//! index on `Date`; 1C has one), so its answer time grows with N; that is the simulator's
//! cost, reported beside kopilka's as the floor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

use super::data;
use super::{Check, Ctx, Outcome, bulk, thousands};
use crate::core::document::{DocKind, Document, Line, SourceRef};
use crate::core::money::{Money, Points};
use crate::ledger::{Batch, Ledger, SharedLedger};
use crate::onec::odata::{OdataPoller, PollReport};
use crate::sim::onec_odata::{Entity, OdataSim, OdataSimBuilder, RECEIPTS, Val, guid};

const SIM_SEED: u64 = 17;
const SIM_LINES: usize = 3;
/// Polls with nothing new, measured; the median is reported.
const IDLE_POLLS: usize = 5;

fn local(t: NaiveDateTime) -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .from_local_datetime(&t)
        .earliest()
        .map_or_else(|| t.and_utc(), |x| x.with_timezone(&Utc))
}

fn text(e: &[(String, Val)], name: &str) -> Option<String> {
    e.iter().find(|(n, _)| n == name).and_then(|(_, v)| match v {
        Val::Str(s) | Val::Num(s) => Some(s.clone()),
        _ => None,
    })
}

fn money(e: &[(String, Val)], name: &str) -> Money {
    text(e, name)
        .and_then(|t| t.parse::<Decimal>().ok())
        .and_then(|d| Money::from_rubles(d).ok())
        .unwrap_or(Money::ZERO)
}

/// A simulator receipt as the poller would make it a document (the customer as its card
/// and partner say).
fn document(e: &Entity, cards: &HashMap<String, usize>, shop: &crate::sim::sales::Shop) -> Option<Document> {
    let f = &e.fields;
    let date = NaiveDateTime::parse_from_str(&text(f, "Date")?, "%Y-%m-%dT%H:%M:%S").ok()?;
    let rows = match f.iter().find(|(n, _)| n == "Товары") {
        Some((_, Val::Rows(rows))) => rows.clone(),
        _ => Vec::new(),
    };
    let mut redeemed = 0;
    let lines: Vec<Line> = rows
        .iter()
        .map(|r| {
            let net = money(r, "Сумма");
            redeemed += money(r, "СуммаСкидкиОплатыБонусом").0;
            Line {
                product_id: text(r, "Номенклатура_Key").unwrap_or_default(),
                name: String::new(),
                category: None,
                category_parents: Vec::new(),
                quantity: text(r, "Количество")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(Decimal::ONE),
                unit_price: money(r, "Цена"),
                discount: money(r, "СуммаРучнойСкидки"),
                net,
                unit_cost: None,
                service: false,
            }
        })
        .collect();
    let customer = text(f, "ДисконтнаяКарта_Key")
        .and_then(|k| cards.get(&k).copied())
        .map(|i| {
            let mut c = shop.customers[i].clone();
            c.onec_id = Some(guid("partner", &i.to_string()));
            c
        })
        .unwrap_or_default();
    Some(Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: e.key.clone(),
            version: text(f, "DataVersion")?,
            stamp: None,
        },
        kind: DocKind::Sale,
        number: text(f, "Number"),
        occurred_at: local(date),
        customer,
        currency: "RUB".into(),
        total: lines.iter().map(|l| l.net).sum(),
        lines,
        points_redeemed: Points(redeemed / 100),
        original: None,
        store: None,
        partner: None,
    })
}

/// One measured poll.
#[derive(Clone, Debug, serde::Serialize)]
struct Measured {
    seconds: f64,
    requests: u64,
    listed: usize,
    fetched: usize,
    applied: usize,
    /// The simulator answering the same requests to a plain HTTP client.
    sim_floor_seconds: f64,
    /// `seconds − sim_floor_seconds`: what kopilka itself spent.
    kopilka_seconds: f64,
}

pub fn run(ctx: &Ctx, new: Option<usize>) -> anyhow::Result<Outcome> {
    let n = ctx.sales.unwrap_or(if ctx.quick { 50_000 } else { 1_000_000 });
    let new = new.unwrap_or(1_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(poll(ctx, n, new))
}

async fn poll(ctx: &Ctx, n: usize, new: usize) -> anyhow::Result<Outcome> {
    let customers = (n / 20).clamp(1_000, 50_000);
    ctx.say(format!(
        "poll: one OData poll on a ledger of {} sales (the simulator holds the same), 0 and {new} new",
        thousands(n as u64)
    ));
    let started = Instant::now();
    let sim = OdataSimBuilder::new(SIM_SEED)
        .sales(n)
        .customers(customers)
        .lines(SIM_LINES)
        .returns_percent(0)
        .start()
        .await?;
    ctx.say(format!(
        "  simulator with {} sales × {SIM_LINES} lines and {} customers up in {} (its RSS: {})",
        thousands(n as u64),
        thousands(customers as u64),
        data::secs(started.elapsed()),
        super::mib(super::proc_status_kib("self", "VmRSS:").unwrap_or(0))
    ));

    // the ledger: the simulator's sales at their versions, built once per workspace
    let started = Instant::now();
    let (cached, built) = ctx.work.cached(&format!("poll-{n}.db"), |p| {
        let shop = sim.shop();
        let cards: HashMap<String, usize> = (0..shop.customers.len())
            .map(|i| (guid("card", &i.to_string()), i))
            .collect();
        let keys = sim.keys(RECEIPTS);
        let docs = keys
            .iter()
            .filter_map(|k| sim.entity(RECEIPTS, k).and_then(|e| document(&e, &cards, &shop)));
        bulk::build(p, docs).map(|_| ())
    })?;
    if built {
        ctx.say(format!(
            "  built the ledger with direct SQL in {}",
            data::secs(started.elapsed())
        ));
    }
    let ledger_path = ctx.work.fresh("poll-work.db");
    std::fs::copy(&cached, &ledger_path)?;

    let pass = ctx.work.path("odata.pass");
    std::fs::write(&pass, sim.password())?;
    let config = data::write_config(
        &ctx.work.dir,
        "poll.toml",
        &ledger_path,
        &format!(
            "{}[onec.odata]\nurl = \"{}\"\nuser = \"{}\"\npassword_file = {:?}\nmapping = \"roznica\"\n\
             page_size = 500\noverlap_minutes = 60\nrescan_days = 35\nrescan_every_hours = 24\n",
            data::onec_section(),
            sim.base_url(),
            sim.user(),
            pass.display().to_string()
        ),
    )?;
    let cfg = Arc::new(data::load_config(&config)?);
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger)?);
    let poller = OdataPoller::new(cfg.clone())?;
    let cancel = CancellationToken::new();

    // as a daemon that has been polling leaves it: each type's watermark at its last
    // document, the re-scan just done
    let mut now = local(sim.last_date() + chrono::Duration::hours(1));
    let last = sim.last_date().format("%Y-%m-%dT%H:%M:%S").to_string();
    let set_checkpoint = |source: String, cursor: String, now: DateTime<Utc>| -> anyhow::Result<()> {
        let dest = cfg.destinations();
        ledger.lock().ingest(
            Batch {
                source,
                items: Vec::new(),
                checkpoint: Some(cursor),
                ..Default::default()
            },
            &cfg.ingest_context(now, &dest),
        )?;
        Ok(())
    };
    for d in &poller.mapping().documents {
        set_checkpoint(poller.checkpoint_key(&d.set), last.clone(), now)?;
    }
    set_checkpoint(poller.rescan_key(), now.to_rfc3339(), now)?;

    let warm = timed(&poller, &ledger, now, &cancel).await?;
    ctx.say(format!(
        "  warm-up poll (catalog sync, memory of versions seeded): {} and {} requests: {}",
        data::secs(warm.0),
        warm.1.requests,
        warm.1.summary()
    ));

    let mut idle = Vec::new();
    for _ in 0..IDLE_POLLS {
        sim.clear_log();
        let (t, r) = timed(&poller, &ledger, now, &cancel).await?;
        let floor = replay(&sim).await?;
        idle.push(measured(t, &r, floor));
    }
    idle.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let idle0 = idle[idle.len() / 2].clone();
    anyhow::ensure!(
        idle0.applied == 0 && idle0.fetched == 0,
        "an idle poll read documents: {idle0:?}"
    );
    say_poll(ctx, "0 new", &idle0);

    // new sales; the catalog and the re-scan are not due (as within a day)
    let added = sim.add_sales(new, None);
    now = local(sim.last_date() + chrono::Duration::minutes(5));
    set_checkpoint(poller.rescan_key(), now.to_rfc3339(), now)?;
    set_checkpoint(poller.catalog_key(), now.to_rfc3339(), now)?;
    sim.clear_log();
    let (t, r) = timed(&poller, &ledger, now, &cancel).await?;
    let floor = replay(&sim).await?;
    let fresh = measured(t, &r, floor);
    anyhow::ensure!(
        fresh.applied == added.len(),
        "the poll applied {} of {} new sales: {}",
        fresh.applied,
        added.len(),
        r.summary()
    );
    say_poll(ctx, &format!("{new} new"), &fresh);

    sim.clear_log();
    let (t, r) = timed(&poller, &ledger, now, &cancel).await?;
    let floor = replay(&sim).await?;
    let after = measured(t, &r, floor);
    say_poll(ctx, "0 new again", &after);

    // the daily re-scan, for scale: one header walk of its window
    let rescan_at = now + chrono::Duration::hours(25);
    sim.clear_log();
    let (t, r) = timed(&poller, &ledger, rescan_at, &cancel).await?;
    let floor = replay(&sim).await?;
    let rescan = measured(t, &r, floor);
    say_poll(ctx, "re-scan (daily)", &rescan);
    drop(poller);
    drop(ledger);
    data::remove_db(&ledger_path);

    let per_new_ms = (fresh.kopilka_seconds - idle0.kopilka_seconds).max(0.0) * 1000.0 / new.max(1) as f64;
    let figures = serde_json::json!({
        "sales": n,
        "customers": customers,
        "idle": idle0,
        "idle_all_seconds": idle.iter().map(|m| m.seconds).collect::<Vec<_>>(),
        "new": new,
        "with_new": fresh,
        "idle_after": after,
        "rescan": rescan,
        "kopilka_ms_per_new_document": per_new_ms,
    });
    Ok(Outcome {
        item: "poll",
        figures,
        checks: vec![
            Check {
                item: "poll",
                what: format!("requests of a poll with 0 new, {} sales", thousands(n as u64)),
                value: idle0.requests.to_string(),
                target: "2 (1 per type)".into(),
                met: idle0.requests <= 2,
            },
            Check {
                item: "poll",
                what: "kopilka's time in a poll with 0 new (poll − sim)".into(),
                value: format!("{:.1} ms", idle0.kopilka_seconds * 1000.0),
                target: "O(new): ≈ 0".into(),
                met: idle0.kopilka_seconds < 0.1,
            },
            Check {
                item: "poll",
                what: format!("kopilka's time per new document ({new} new)"),
                value: format!("{per_new_ms:.2} ms"),
                target: "O(new)".into(),
                met: true,
            },
        ],
    })
}

async fn timed(
    poller: &OdataPoller,
    ledger: &SharedLedger,
    now: DateTime<Utc>,
    cancel: &CancellationToken,
) -> anyhow::Result<(Duration, PollReport)> {
    let t = Instant::now();
    let r = poller.poll(ledger, now, cancel).await?;
    Ok((t.elapsed(), r))
}

fn measured(t: Duration, r: &PollReport, floor: Duration) -> Measured {
    Measured {
        seconds: t.as_secs_f64(),
        requests: r.requests,
        listed: r.listed,
        fetched: r.fetched,
        applied: r.applied,
        sim_floor_seconds: floor.as_secs_f64(),
        kopilka_seconds: (t.as_secs_f64() - floor.as_secs_f64()).max(0.0),
    }
}

fn say_poll(ctx: &Ctx, label: &str, m: &Measured) {
    ctx.say(format!(
        "  poll, {label:<16} {:>10}, {:>5} requests, {} listed, {} read whole, {} applied; simulator alone {}, \
         kopilka {}",
        data::secs(Duration::from_secs_f64(m.seconds)),
        m.requests,
        m.listed,
        m.fetched,
        m.applied,
        data::secs(Duration::from_secs_f64(m.sim_floor_seconds)),
        data::secs(Duration::from_secs_f64(m.kopilka_seconds)),
    ));
}

/// The requests the simulator logged since its log was cleared, sent again by a plain
/// client that only reads the bodies: the time the simulator needs to answer them.
async fn replay(sim: &OdataSim) -> anyhow::Result<Duration> {
    let reqs = sim.requests();
    let client = reqwest::Client::new();
    let base = sim.base_url();
    let started = Instant::now();
    for r in reqs.iter().filter(|r| r.method == "GET") {
        let mut url = reqwest::Url::parse(&format!("{base}/{}", r.resource))?;
        if !r.query.is_empty() {
            let pairs: Vec<(String, String)> = r
                .query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.to_string(), String::new()),
                })
                .collect();
            url.query_pairs_mut().extend_pairs(pairs);
        }
        let resp = client
            .get(url)
            .basic_auth(sim.user(), Some(sim.password()))
            .header("Accept", "application/json")
            .send()
            .await?;
        let _ = resp.bytes().await?;
    }
    let took = started.elapsed();
    sim.clear_log();
    Ok(took)
}
