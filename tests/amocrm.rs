//! The AmoCRM connector against the simulator (`kopilka::sim::amocrm`): authentication,
//! limits and blocks, matching, pushing cards, notes, and won deals as sales. Production
//! code runs unchanged; only the base URL and the back-off pauses differ.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kopilka::amocrm::auth::base64url_encode;
use kopilka::amocrm::{ClientOptions, Connector};
use kopilka::clock::{Clock, FakeClock};
use kopilka::config::{self, Config};
use kopilka::core::document::{DocKind, Document, Incoming, Line, SourceRef, content_version};
use kopilka::core::identity::{CustomerIdentity, Email, Phone};
use kopilka::core::money::{Money, Points};
use kopilka::daemon::amocrm::{Deliver, Events, Shared};
use kopilka::daemon::{Job, JobContext};
use kopilka::ledger::{Batch, IngestContext, IngestReport, Item, Ledger, SharedLedger};
use kopilka::sim::amocrm::{AmoSim, Fault};
use rust_decimal::Decimal;

const PIPELINE: i64 = 777;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

fn jwt(exp: DateTime<Utc>) -> String {
    let payload = base64url_encode(format!(r#"{{"aud":"kopilka","exp":{}}}"#, exp.timestamp()).as_bytes());
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl")
}

#[derive(Clone)]
struct Setup {
    oauth: bool,
    sim_rps: usize,
    client_rps: u32,
    block_after: u32,
    extra_amocrm: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            oauth: false,
            sim_rps: 50,
            client_rps: 50,
            block_after: 3,
            extra_amocrm: String::new(),
        }
    }
}

struct World {
    sim: AmoSim,
    clock: Arc<FakeClock>,
    dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ctx: JobContext,
    shared: Arc<Shared>,
    setup: Setup,
}

fn options(cfg: &Config) -> ClientOptions {
    let mut o = ClientOptions::from_config(cfg.amocrm.as_ref().unwrap());
    o.backoff_initial = StdDuration::from_millis(20);
    o.backoff_max = StdDuration::from_millis(200);
    o
}

async fn world(setup: Setup) -> World {
    let clock = Arc::new(FakeClock::new(t0()));
    let token = jwt(t0() + Duration::days(365));
    let sim = AmoSim::builder()
        .requests_per_second(setup.sim_rps)
        .block_after_violations(setup.block_after)
        .clock(clock.clone())
        .long_lived_token(&token, t0() + Duration::days(365))
        .oauth_client("kopilka-test", "client-secret-1", "https://shop.example/oauth")
        .start()
        .await
        .unwrap();
    sim.add_pipeline(PIPELINE, &[10, 20]);
    let dir = tempfile::tempdir().unwrap();
    let auth = if setup.oauth {
        std::fs::write(dir.path().join("client_secret"), "client-secret-1\n").unwrap();
        format!(
            "client_id = \"kopilka-test\"\nclient_secret_file = \"{}\"\nredirect_uri = \"https://shop.example/oauth\"\n",
            dir.path().join("client_secret").display()
        )
    } else {
        std::fs::write(dir.path().join("token"), &token).unwrap();
        format!("token_file = \"{}\"\n", dir.path().join("token").display())
    };
    let text = format!(
        "[ledger]\npath = \"{}\"\n[program]\nreturn_window_days = 0\n[outbox]\nmax_rows_per_run = 100000\n\
         [amocrm]\nbase_url = \"{}\"\n{auth}requests_per_second = {}\npipelines = [{PIPELINE}]\n\
         note_accrual_min_points = 10\n{}",
        dir.path().join("ledger.db").display(),
        sim.base_url,
        setup.client_rps,
        setup.extra_amocrm
    );
    let path = dir.path().join("kopilka.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|r| panic!("{r}")));
    let ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger).unwrap();
    let shared = Arc::new(Shared::with_options(options(&cfg)));
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: SharedLedger::new(ledger),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    World {
        sim,
        clock,
        dir,
        cfg,
        ctx,
        shared,
        setup,
    }
}

/// A till sale of `rub` rubles to a customer known by these keys.
fn sale(
    id: &str,
    card: Option<&str>,
    phone: Option<&str>,
    email: Option<&str>,
    rub: i64,
    at: DateTime<Utc>,
) -> Document {
    let net = Money(rub * 100);
    let mut d = Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: id.into(),
            version: String::new(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: Some(format!("N-{id}")),
        occurred_at: at,
        customer: CustomerIdentity {
            card: card.map(str::to_string),
            phone: phone.and_then(Phone::parse),
            email: email.and_then(Email::parse),
            ..Default::default()
        },
        currency: "RUB".into(),
        lines: vec![Line {
            product_id: "P1".into(),
            name: "Кофе".into(),
            category: None,
            category_parents: Vec::new(),
            quantity: Decimal::from_str("1").unwrap(),
            unit_price: net,
            discount: Money(0),
            net,
            unit_cost: Some(Money(rub * 50)),
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

impl World {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn ingest(&self, docs: Vec<Document>) -> IngestReport {
        let dest = self.cfg.destinations();
        let ctx = IngestContext {
            rules: &self.cfg.program,
            limits: &self.cfg.limits,
            destinations: &dest,
            now: self.now(),
            warn_before: self.cfg.warn_before,
        };
        let items = docs
            .into_iter()
            .map(|d| Item::Incoming(Incoming::Document(d)))
            .collect();
        self.ctx
            .ledger
            .lock()
            .ingest(
                Batch {
                    source: "test".into(),
                    items,
                    checkpoint: None,
                    ..Default::default()
                },
                &ctx,
            )
            .unwrap()
    }

    async fn deliver(&self) -> anyhow::Result<kopilka::daemon::JobOutcome> {
        Deliver(self.shared.clone()).run(&self.ctx).await
    }

    async fn events(&self) -> anyhow::Result<kopilka::daemon::JobOutcome> {
        Events(self.shared.clone()).run(&self.ctx).await
    }

    async fn conn(&self) -> Arc<Connector> {
        self.shared.get(&self.ctx).await.unwrap()
    }

    fn customers(&self) -> Vec<i64> {
        self.ctx.ledger.lock().customer_ids().unwrap()
    }

    fn available(&self, customer: i64) -> i64 {
        self.ctx
            .ledger
            .lock()
            .balance_of(customer, self.now(), self.cfg.warn_before)
            .unwrap()
            .available
    }

    fn links(&self) -> HashMap<i64, i64> {
        let ids = self.customers();
        self.ctx.ledger.lock().amocrm_links(&ids).unwrap()
    }

    /// Every linked customer's card shows the ledger's balance.
    fn assert_cards_equal_ledger(&self) {
        let links = self.links();
        assert_eq!(links.len(), self.customers().len(), "every customer is linked");
        for (customer, contact) in links {
            assert_eq!(
                self.sim.field_value(contact, "KOPILKA_POINTS"),
                Some(self.available(customer).to_string()),
                "card of contact {contact} (customer id:{customer})"
            );
        }
    }
}

fn patches(sim: &AmoSim) -> Vec<kopilka::sim::amocrm::Recorded> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v4/contacts")
        .collect()
}

/// Contact ids named in the PATCH bodies.
fn patched_ids(sim: &AmoSim) -> Vec<i64> {
    patches(sim)
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_i64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn print_figures(label: &str, w: &World, conn: &Connector, contacts: usize) {
    let reqs = w.sim.requests();
    let p = patches(&w.sim);
    let per = if p.is_empty() {
        0.0
    } else {
        p.iter().map(|r| r.items()).sum::<usize>() as f64 / p.len() as f64
    };
    let patch_rate = match (p.first(), p.last()) {
        (Some(a), Some(b)) if p.len() > 1 && b.at > a.at => {
            (p.len() - 1) as f64 / (b.at - a.at).as_secs_f64()
        }
        _ => 0.0,
    };
    println!(
        "benchmark {label}: {} requests, {:.2} requests/s overall and {patch_rate:.2} requests/s while pushing, \
         vs limit {} (max {} in any 1 s window), {contacts} contacts in {} PATCHes = {per:.1} contacts per request, \
         {} × 429",
        reqs.len(),
        conn.client.stats.achieved_rate_per_second(),
        w.setup.client_rps,
        w.sim.max_requests_in_any_second(),
        p.len(),
        w.sim.rate_limited()
    );
}

// ---------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tasks_needing_a_refresh_make_one_call_and_the_pair_survives_a_restart() {
    let w = world(Setup {
        oauth: true,
        ..Setup::default()
    })
    .await;
    let conn = w.conn().await;
    conn.client.exchange_code(&w.sim.issue_code()).await.unwrap();
    assert_eq!(w.sim.code_calls(), 1);
    // the access token is now past its 24 hours
    w.clock.advance(Duration::hours(25));
    let (a, b) = tokio::join!(
        conn.client.get("/api/v4/account"),
        conn.client.get("/api/v4/account")
    );
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(w.sim.refresh_calls(), 1, "exactly one refresh for two tasks");
    // the database never holds tokens in clear text
    let stored = w
        .ctx
        .ledger
        .lock()
        .amocrm_tokens_load(&w.sim.base_url)
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&stored.sealed).contains("access-"));
    assert!(!String::from_utf8_lossy(&stored.sealed).contains("refresh-"));
    // a restart: a new process reads the new pair from the ledger and needs no refresh
    drop(conn);
    let ledger = Ledger::open(&w.cfg.ledger_path, &w.cfg.ledger).unwrap();
    let restarted = Connector::new(
        w.cfg.clone(),
        SharedLedger::new(ledger),
        w.clock.clone(),
        Some(options(&w.cfg)),
    )
    .unwrap();
    restarted.client.get("/api/v4/account").await.unwrap();
    assert_eq!(w.sim.refresh_calls(), 1, "the stored pair works after a restart");
    // and its refresh token is the live one: a proactive refresh a month later succeeds
    w.clock.advance(Duration::days(31));
    restarted.client.get("/api/v4/account").await.unwrap();
    assert_eq!(w.sim.refresh_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_refresh_halts_amocrm_with_an_alert_while_ingest_goes_on() {
    let w = world(Setup {
        oauth: true,
        ..Setup::default()
    })
    .await;
    let conn = w.conn().await;
    conn.client.exchange_code(&w.sim.issue_code()).await.unwrap();
    w.sim.revoke_refresh_tokens();
    w.clock.advance(Duration::hours(25));
    let err = w.events().await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("kopilka amocrm auth --code CODE"), "{text}");
    assert!(conn.client.halted().is_some());
    assert!(conn.client.alerts().iter().any(|a| a.contains("halted")));
    assert_eq!(w.sim.refresh_calls(), 1, "a refused refresh is not retried");
    let before = w.sim.requests().len();
    // 1C ingest continues; AmoCRM traffic does not
    let r = w.ingest(vec![sale("S1", Some("C1"), None, None, 1000, w.now())]);
    assert_eq!(r.applied, 1);
    assert!(w.deliver().await.is_err());
    assert!(w.events().await.is_err());
    assert_eq!(w.sim.requests().len(), before, "no request after the halt");
    // re-authorising with a fresh code brings it back
    conn.client.exchange_code(&w.sim.issue_code()).await.unwrap();
    assert!(conn.client.halted().is_none());
    w.deliver().await.unwrap();
    w.assert_cards_equal_ledger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_mid_run_refreshes_once_and_succeeds() {
    let w = world(Setup {
        oauth: true,
        ..Setup::default()
    })
    .await;
    w.conn()
        .await
        .client
        .exchange_code(&w.sim.issue_code())
        .await
        .unwrap();
    w.ingest(
        (0..120)
            .map(|i| {
                sale(
                    &format!("S{i}"),
                    Some(&format!("C{i}")),
                    None,
                    None,
                    100 + i,
                    w.now(),
                )
            })
            .collect(),
    );
    w.deliver().await.unwrap();
    // an admin revoked the access token: the client still believes it valid
    w.sim.expire_access_tokens();
    w.ingest(
        (0..120)
            .map(|i| sale(&format!("T{i}"), Some(&format!("C{i}")), None, None, 50, w.now()))
            .collect(),
    );
    let before = w.sim.refresh_calls();
    w.deliver().await.unwrap();
    assert_eq!(w.sim.refresh_calls(), before + 1);
    let unauthorized = w.sim.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(unauthorized, 1, "one 401, one refresh, one repeat");
    w.assert_cards_equal_ledger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_token_warns_ahead_and_halts_once_expired() {
    let w = world(Setup::default()).await;
    let conn = w.conn().await;
    assert!(conn.client.alerts().is_empty());
    w.clock.advance(Duration::days(365 - 10));
    assert!(
        conn.client.alerts().iter().any(|a| a.contains("expires")),
        "{:?}",
        conn.client.alerts()
    );
    w.clock.advance(Duration::days(11));
    let before = w.sim.requests().len();
    assert!(w.events().await.is_err());
    assert!(conn.client.halted().unwrap().contains("expired"));
    assert_eq!(
        w.sim.requests().len(),
        before,
        "an expired token is not even sent"
    );
}

// ---------------------------------------------------------------------------------------
// Limits, faults, blocks
// ---------------------------------------------------------------------------------------

async fn push_many(sim_rps: usize, client_rps: u32, customers: usize, changed: usize) {
    let w = world(Setup {
        sim_rps,
        client_rps,
        block_after: 1,
        ..Setup::default()
    })
    .await;
    let at = w.now() - Duration::days(1);
    let phone = |i: usize| format!("+7901{i:07}");
    w.ingest(
        (0..customers)
            .map(|i| {
                sale(
                    &format!("S{i}"),
                    None,
                    Some(&phone(i)),
                    None,
                    100 + (i as i64 % 900),
                    at,
                )
            })
            .collect(),
    );
    // the CRM already knows every customer, phones typed the way managers type them
    for i in 0..customers {
        let p = phone(i);
        let typed = format!("8 ({}) {}-{}-{}", &p[2..5], &p[5..8], &p[8..10], &p[10..12]);
        w.sim.add_contact(&format!("Покупатель {i}"), &[&typed], &[]);
    }
    let conn = w.conn().await;
    let started = std::time::Instant::now();
    let out = w.deliver().await.unwrap();
    println!(
        "first delivery run: {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        out.summary
    );
    assert!(!out.pending, "{}", out.summary);
    w.assert_cards_equal_ledger();
    let first = patches(&w.sim);
    assert!(first.iter().all(|r| r.items() <= 50), "≤ 50 contacts per PATCH");
    assert_eq!(patched_ids(&w.sim).len(), customers, "each contact once");
    print_figures(
        &format!("{customers} contacts at {client_rps}/s"),
        &w,
        &conn,
        customers,
    );
    // a second wave: only the changed balances are sent; an unchanged state queued again
    // (a retried row, a re-queue) is not
    w.sim.clear_requests();
    w.ingest(
        (0..changed)
            .map(|i| sale(&format!("U{i}"), None, Some(&phone(i)), None, 300, w.now()))
            .collect(),
    );
    {
        let last: Vec<i64> = w.customers().into_iter().rev().take(100).collect();
        let mut l = w.ctx.ledger.lock();
        for c in last {
            let payload = format!(r#"{{"customer_id":{c}}}"#);
            l.outbox_enqueue(
                "amocrm",
                &format!("test-requeue:{c}"),
                Some(&format!("contact:{c}")),
                &payload,
                w.now(),
            )
            .unwrap();
        }
    }
    let started = std::time::Instant::now();
    let out = w.deliver().await.unwrap();
    println!(
        "second delivery run: {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        out.summary
    );
    let links = w.links();
    let expected: BTreeSet<i64> = (0..changed)
        .map(|i| {
            let ids = w.ctx.ledger.lock().customers_by_key("phone", &phone(i)).unwrap();
            links[&ids[0]]
        })
        .collect();
    let sent = patched_ids(&w.sim);
    assert_eq!(sent.len(), changed, "no unchanged contact is sent");
    assert_eq!(sent.into_iter().collect::<BTreeSet<_>>(), expected);
    w.assert_cards_equal_ledger();
    assert_eq!(w.sim.rate_limited(), 0, "0 × 429");
    assert!(!w.sim.is_blocked());
    assert!(w.sim.max_requests_in_any_second() <= sim_rps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_20000_changed_balances_at_7_per_second_never_hits_the_limit() {
    push_many(7, 7, 20_000, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_20000_changed_balances_at_a_raised_limit() {
    push_many(50, 50, 20_000, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_backs_off_and_converges() {
    let w = world(Setup {
        block_after: 100,
        ..Setup::default()
    })
    .await;
    w.ingest(
        (0..150)
            .map(|i| sale(&format!("S{i}"), Some(&format!("C{i}")), None, None, 200, w.now()))
            .collect(),
    );
    w.sim.inject(Fault::Status(429), 4);
    w.sim.inject(Fault::Html(429), 3);
    w.deliver().await.unwrap();
    w.assert_cards_equal_ledger();
    let conn = w.conn().await;
    assert_eq!(
        conn.client
            .stats
            .status_429
            .load(std::sync::atomic::Ordering::Relaxed),
        7
    );
    assert!(conn.client.halted().is_none());
    assert!(!w.sim.is_blocked());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_5xx_timeouts_and_truncated_bodies_are_retried() {
    let w = world(Setup {
        extra_amocrm: "timeout_seconds = 1\n".into(),
        ..Setup::default()
    })
    .await;
    w.ingest(
        (0..60)
            .map(|i| sale(&format!("S{i}"), Some(&format!("C{i}")), None, None, 200, w.now()))
            .collect(),
    );
    w.sim.inject(Fault::Status(500), 1);
    w.sim.inject(Fault::Truncated, 1);
    w.sim.inject(Fault::Html(502), 1);
    w.sim.inject(Fault::Delay(StdDuration::from_millis(2500)), 1);
    w.sim.inject(Fault::Status(503), 1);
    w.deliver().await.unwrap();
    w.assert_cards_equal_ledger();
    let conn = w.conn().await;
    assert_eq!(
        conn.client
            .stats
            .timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_halves_the_batch() {
    let w = world(Setup::default()).await;
    w.ingest(
        (0..50)
            .map(|i| sale(&format!("S{i}"), Some(&format!("C{i}")), None, None, 200, w.now()))
            .collect(),
    );
    w.deliver().await.unwrap();
    w.sim.clear_requests();
    w.ingest(
        (0..50)
            .map(|i| sale(&format!("T{i}"), Some(&format!("C{i}")), None, None, 100, w.now()))
            .collect(),
    );
    w.sim.inject(Fault::Status(504), 1);
    w.deliver().await.unwrap();
    let sizes: Vec<(u16, usize)> = patches(&w.sim).iter().map(|r| (r.status, r.items())).collect();
    assert_eq!(sizes, vec![(504, 50), (200, 25), (200, 25)]);
    w.assert_cards_equal_ledger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_stops_all_traffic_within_one_request() {
    let w = world(Setup::default()).await;
    w.ingest(
        (0..10)
            .map(|i| sale(&format!("S{i}"), Some(&format!("C{i}")), None, None, 200, w.now()))
            .collect(),
    );
    w.deliver().await.unwrap();
    w.ingest(
        (0..10)
            .map(|i| sale(&format!("T{i}"), Some(&format!("C{i}")), None, None, 100, w.now()))
            .collect(),
    );
    w.sim.inject(Fault::Block, 1);
    let before = w.sim.requests().len();
    let err = w.deliver().await.unwrap_err();
    assert!(format!("{err:#}").contains("block"), "{err:#}");
    assert_eq!(w.sim.requests().len(), before + 1, "the 403 was the last request");
    assert!(w.events().await.is_err());
    assert!(w.deliver().await.is_err());
    assert_eq!(w.sim.requests().len(), before + 1, "nothing after the block");
    // the rows wait, pending, for a person
    let pending = w
        .ctx
        .ledger
        .lock()
        .outbox_counts()
        .unwrap()
        .into_iter()
        .filter(|(d, s, _)| d == "amocrm" && *s == kopilka::ledger::OutboxState::Pending)
        .map(|(_, _, n)| n)
        .sum::<i64>();
    assert_eq!(pending, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_limit_gets_429s_then_a_block_403() {
    // the simulator's own limiter: a client that ignores the limit is blocked
    let sim = AmoSim::builder()
        .requests_per_second(3)
        .block_after_violations(2)
        .long_lived_token("tok", t0() + Duration::days(1))
        .clock(Arc::new(FakeClock::new(t0())))
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = http
            .get(format!("{}/api/v4/account", sim.base_url))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert!(statuses[3..].contains(&429));
    assert_eq!(*statuses.last().unwrap(), 403);
    assert!(sim.is_blocked());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validation_error_dead_letters_one_contact_and_delivers_the_rest() {
    let w = world(Setup::default()).await;
    w.ingest(
        (0..5)
            .map(|i| sale(&format!("S{i}"), Some(&format!("C{i}")), None, None, 200, w.now()))
            .collect(),
    );
    w.deliver().await.unwrap();
    let links = w.links();
    let victim = *links.values().min().unwrap();
    w.sim.delete_contact(victim);
    w.ingest(
        (0..5)
            .map(|i| sale(&format!("T{i}"), Some(&format!("C{i}")), None, None, 100, w.now()))
            .collect(),
    );
    let out = w.deliver().await.unwrap();
    assert!(
        out.summary.contains("4 delivered, 0 retried, 1 dead"),
        "{}",
        out.summary
    );
    let dead = w
        .ctx
        .ledger
        .lock()
        .outbox_list(&kopilka::ledger::OutboxFilter {
            state: Some(kopilka::ledger::OutboxState::Dead),
            destination: Some("amocrm".into()),
            limit: None,
        })
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("NotFound"),
        "{:?}",
        dead[0].last_error
    );
    for (customer, contact) in links.into_iter().filter(|(_, c)| *c != victim) {
        assert_eq!(
            w.sim.field_value(contact, "KOPILKA_POINTS"),
            Some(w.available(customer).to_string())
        );
    }
}

// ---------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_and_emails_match_however_they_were_typed() {
    let w = world(Setup::default()).await;
    // (how the manager typed it in AmoCRM, what the till recorded, should they match)
    let table: &[(&str, Option<&str>, Option<&str>, bool)] = &[
        ("+7 (912) 345-67-81", Some("89123456781"), None, true),
        ("89123456782", Some("+7 912 345 67 82"), None, true),
        ("8 912 345 67 83", Some("+79123456783"), None, true),
        ("+79123456784", Some("8 (912) 345-67-84"), None, true),
        ("+375 29 123-45-67", Some("+375291234567"), None, true),
        ("+49 30 1234567", Some("0049301234567"), None, true),
        // same last ten digits, another country: the fuzzy search finds it, the check refuses
        ("+1 912 345 6785", Some("+79123456785"), None, false),
        // one digit more: not the same number
        ("+7 912 345 67 861", Some("+79123456786"), None, false),
    ];
    let mut expect = Vec::new();
    for (i, (typed, till_phone, _, should)) in table.iter().enumerate() {
        let contact = w.sim.add_contact(&format!("Row {i}"), &[typed], &[]);
        w.ingest(vec![sale(
            &format!("S{i}"),
            None,
            *till_phone,
            None,
            100,
            w.now(),
        )]);
        expect.push((till_phone.unwrap(), contact, *should));
    }
    let emails = [
        ("Ivan.Petrov@Example.RU", "ivan.petrov@example.ru", true),
        ("anna@example.ru", "anna@example.com", false),
    ];
    for (i, (typed, till, should)) in emails.iter().enumerate() {
        let contact = w.sim.add_contact(&format!("Mail {i}"), &[], &[typed]);
        w.ingest(vec![sale(&format!("E{i}"), None, None, Some(till), 100, w.now())]);
        expect.push((*till, contact, *should));
    }
    w.deliver().await.unwrap();
    let links = w.links();
    for (key, contact, should) in expect {
        let customer = {
            let l = w.ctx.ledger.lock();
            let by_phone = Phone::parse(key).map(|p| l.customers_by_key("phone", p.as_str()).unwrap());
            let by_mail = Email::parse(key).map(|e| l.customers_by_key("email", e.as_str()).unwrap());
            by_phone.or(by_mail).unwrap()[0]
        };
        let linked = links[&customer];
        assert_eq!(
            linked == contact,
            should,
            "{key}: linked to {linked}, typed contact {contact}"
        );
        if !should {
            // a new contact was created with the customer's phone or e-mail
            let phones = w.sim.phones(linked);
            assert!(
                phones
                    .iter()
                    .any(|p| Phone::parse(p).map(|p| p.to_string())
                        == Phone::parse(key).map(|p| p.to_string()))
                    || Email::parse(key).is_some()
            );
        }
    }
    w.assert_cards_equal_ledger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_phone_writes_nothing_and_is_listed() {
    let w = world(Setup::default()).await;
    let a = w.sim.add_contact("Иван", &["+7 (912) 000-11-22"], &[]);
    let b = w.sim.add_contact("Иван П.", &["89120001122"], &[]);
    w.ingest(vec![sale("S1", None, Some("+79120001122"), None, 500, w.now())]);
    w.deliver().await.unwrap();
    assert!(w.links().is_empty());
    assert!(patched_ids(&w.sim).is_empty(), "nothing written");
    assert!(
        !w.sim
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/api/v4/contacts")
    );
    assert_eq!(w.sim.field_value(a, "KOPILKA_POINTS"), None);
    assert_eq!(w.sim.field_value(b, "KOPILKA_POINTS"), None);
    let list = w.ctx.ledger.lock().amocrm_unmatched().unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].reason.contains("ambiguous phone"));
    assert_eq!(list[0].candidates, vec![a, b]);
    // and on the command line
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
        .args(["--config"])
        .arg(w.dir.path().join("kopilka.toml"))
        .args(["amocrm", "unmatched", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["candidates"], serde_json::json!([a, b]));
    assert!(v[0]["reason"].as_str().unwrap().contains("ambiguous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_typed_by_a_manager_links_through_the_events() {
    let w = world(Setup {
        extra_amocrm: "create_missing = false\n".into(),
        ..Setup::default()
    })
    .await;
    w.events().await.unwrap();
    w.ingest(vec![sale("S1", Some("CARD-77"), None, None, 500, w.now())]);
    w.deliver().await.unwrap();
    assert!(w.links().is_empty(), "no contact yet and creating is off");
    let contact = w.sim.add_contact("Мария", &["+7 999 000 00 01"], &[]);
    assert!(w.sim.set_contact_field(contact, "KOPILKA_CARD", "card 77"));
    w.clock.advance(Duration::seconds(5));
    let before = w
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v4/contacts")
        .count();
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("1 contacts relinked"), "{}", out.summary);
    let after = w
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v4/contacts")
        .count();
    assert_eq!(
        before, after,
        "links come from the events, not from re-reading all contacts"
    );
    w.deliver().await.unwrap();
    w.assert_cards_equal_ledger();
}

// ---------------------------------------------------------------------------------------
// Won deals
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_deal_earns_points_a_reopened_one_is_reversed_and_replays_change_nothing() {
    let w = world(Setup::default()).await;
    w.events().await.unwrap();
    // the first delivery run starts the notes cursor: history is not replayed as notes
    w.deliver().await.unwrap();
    let contact = w
        .sim
        .add_contact("Ольга", &["+7 (916) 111-22-33"], &["olga@example.ru"]);
    let lead = w.sim.add_lead("Ремонт", 1000, PIPELINE, 10, Some(contact));
    w.clock.advance(Duration::seconds(10));
    w.sim.set_lead_status(lead, 142);
    w.clock.advance(Duration::seconds(10));
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("1 won deals"), "{}", out.summary);
    let customer = w
        .ctx
        .ledger
        .lock()
        .amocrm_customer_of(contact)
        .unwrap()
        .expect("the main contact is the customer");
    assert_eq!(w.available(customer), 50, "5% of 1000 rubles");
    w.deliver().await.unwrap();
    assert_eq!(w.sim.field_value(contact, "KOPILKA_POINTS"), Some("50".into()));
    assert_eq!(w.sim.field_value(contact, "KOPILKA_LTV"), Some("1000.00".into()));
    // issue 20: the member's friend code is on the card, the one `balance` shows
    assert_eq!(
        w.sim.field_value(contact, "KOPILKA_FRIEND_CODE"),
        w.ctx.ledger.lock().referral_code(customer).unwrap()
    );
    assert!(
        w.sim.notes().iter().any(|n| n.entity_id == contact
            && n.note_type == "service_message"
            && n.text.contains("Начислено 50")),
        "{:?}",
        w.sim.notes()
    );
    // a price edit is a new version
    w.sim.set_lead_price(lead, 2000);
    w.clock.advance(Duration::seconds(10));
    w.events().await.unwrap();
    assert_eq!(w.available(customer), 100);
    // reopened: the sale is reversed and the card shows it
    w.sim.set_lead_status(lead, 20);
    w.clock.advance(Duration::seconds(10));
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("1 reversed"), "{}", out.summary);
    assert_eq!(w.available(customer), 0);
    w.deliver().await.unwrap();
    assert_eq!(w.sim.field_value(contact, "KOPILKA_POINTS"), Some("0".into()));
    // replays: the overlap window re-reads the same events; they are skipped by id
    let journal = w
        .ctx
        .ledger
        .lock()
        .history(&format!("id:{customer}"))
        .unwrap()
        .1
        .len();
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("(0 new)"), "{}", out.summary);
    // even with the seen ids lost, re-reading the leads yields the same versions
    rusqlite::Connection::open(&w.cfg.ledger_path)
        .unwrap()
        .execute("DELETE FROM amocrm_seen_events", [])
        .unwrap();
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("0 applied"), "{}", out.summary);
    assert_eq!(
        w.ctx
            .ledger
            .lock()
            .history(&format!("id:{customer}"))
            .unwrap()
            .1
            .len(),
        journal
    );
    assert_eq!(w.available(customer), 0);
    assert!(w.ctx.ledger.lock().verify().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_items_become_lines_and_other_pipelines_are_ignored() {
    let w = world(Setup::default()).await;
    w.events().await.unwrap();
    let contact = w.sim.add_contact("Пётр", &["+7 916 555 00 00"], &[]);
    let lead = w.sim.add_lead("Комплект", 3000, PIPELINE, 10, Some(contact));
    w.sim.add_lead_item(lead, 9, 2, "Фильтр");
    w.sim.add_lead_item(lead, 9, 1, "Насос");
    let elsewhere = w.sim.add_lead("Другая воронка", 5000, 888, 10, Some(contact));
    w.clock.advance(Duration::seconds(10));
    w.sim.set_lead_status(lead, 142);
    w.sim.set_lead_status(elsewhere, 142);
    w.clock.advance(Duration::seconds(10));
    let out = w.events().await.unwrap();
    assert!(out.summary.contains("1 won deals"), "{}", out.summary);
    let customer = w.ctx.ledger.lock().amocrm_customer_of(contact).unwrap().unwrap();
    assert_eq!(w.available(customer), 150);
    let history = w.ctx.ledger.lock().history(&format!("id:{customer}")).unwrap().1;
    assert!(
        history
            .iter()
            .all(|h| h.doc_id.as_deref() == Some(lead.to_string().as_str()))
    );
}

// ---------------------------------------------------------------------------------------
// `kopilka once` with the smallest configuration
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_with_only_base_url_and_token_file_matches_creates_and_pushes() {
    let w = world(Setup {
        sim_rps: 7,
        ..Setup::default()
    })
    .await;
    let known = w.sim.add_contact("Known", &[], &["known@example.ru"]);
    w.ingest(vec![
        sale("S1", Some("A1"), None, Some("Known@Example.ru"), 400, w.now()),
        sale(
            "S2",
            Some("A2"),
            Some("+7 903 123 45 67"),
            Some("new@example.ru"),
            600,
            w.now(),
        ),
        sale("S3", Some("A3"), None, None, 800, w.now()),
    ]);
    let minimal = w.dir.path().join("minimal.toml");
    std::fs::write(
        &minimal,
        format!(
            "[amocrm]\nbase_url = \"{}\"\ntoken_file = \"{}\"\n",
            w.sim.base_url,
            w.dir.path().join("token").display()
        ),
    )
    .unwrap();
    let ledger_path: PathBuf = w.cfg.ledger_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
            .arg("--ledger")
            .arg(&ledger_path)
            .arg("--config")
            .arg(&minimal)
            .arg("once")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("amocrm:deliver: ok"), "{stdout}");
    let links = w.links();
    assert_eq!(links.len(), 3, "{stdout}");
    let customer_of_known = w.ctx.ledger.lock().amocrm_customer_of(known).unwrap();
    assert!(customer_of_known.is_some(), "matched by e-mail");
    for (customer, contact) in &links {
        assert_eq!(
            w.sim.field_value(*contact, "KOPILKA_POINTS"),
            Some(w.available(*customer).to_string())
        );
        assert!(w.sim.field_value(*contact, "KOPILKA_CARD").is_some());
    }
    let created = links
        .values()
        .find(|c| w.sim.phones(**c).iter().any(|p| p.contains("9031234567")))
        .copied();
    let created = created.expect("the created contact carries the phone");
    assert_eq!(w.sim.field_value(created, "EMAIL"), Some("new@example.ru".into()));
    assert!(
        w.sim.field_codes().iter().any(|c| c == "KOPILKA_BURN_DATE"),
        "fields were created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amocrm_commands_authorise_and_create_the_fields() {
    let w = world(Setup {
        oauth: true,
        ..Setup::default()
    })
    .await;
    let kopilka = |args: Vec<String>| {
        let config = w.dir.path().join("kopilka.toml");
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
                    .arg("--config")
                    .arg(config)
                    .args(args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let code = w.sim.issue_code();
    let out = kopilka(vec!["amocrm".into(), "auth".into(), "--code".into(), code]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("authorised"));
    assert!(
        w.ctx
            .ledger
            .lock()
            .amocrm_tokens_load(&w.sim.base_url)
            .unwrap()
            .is_some()
    );
    // the system clock of the command is not the test's: the stored pair is used as is
    let out = kopilka(vec!["amocrm".into(), "fields".into()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("missing (kopilka amocrm fields --create)"),
        "{text}"
    );
    let out = kopilka(vec!["amocrm".into(), "fields".into(), "--create".into()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("created 12 fields"), "{text}");
    assert!(!text.contains("missing"), "{text}");
    for code in [
        "KOPILKA_POINTS",
        "KOPILKA_OFFER",
        "KOPILKA_CARD",
        "KOPILKA_FRIEND_CODE",
        "KOPILKA_VOUCHERS",
    ] {
        assert!(w.sim.field_codes().iter().any(|c| c == code));
    }
    // a used code is refused with the vendor's hint
    let out = kopilka(vec![
        "amocrm".into(),
        "auth".into(),
        "--code".into(),
        "nonsense".into(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Authorization code is invalid"));
}

// ---------------------------------------------------------------------------------------
// Pure parts: the decision table, the shipped field map, the webhook receiver
// ---------------------------------------------------------------------------------------

#[test]
fn matching_decides_by_card_then_phone_then_email() {
    use kopilka::amocrm::contacts::{ContactKeys, Decision, decide};
    use kopilka::ledger::CustomerKeys;
    let customer = CustomerKeys {
        customer_id: 1,
        name: None,
        cards: vec!["C-1".into()],
        phones: vec!["+79123456789".into()],
        emails: vec!["a@b.ru".into()],
    };
    let contact = |id: i64, card: &str, phone: &str, email: &str| ContactKeys {
        id,
        cards: [card]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect(),
        phones: [phone]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect(),
        emails: [email]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect(),
    };
    let check = |contacts: Vec<ContactKeys>, create: bool, expected: Decision| {
        assert_eq!(decide(&customer, &contacts, create), expected, "{contacts:?}");
    };
    // the card wins over two phone matches
    check(
        vec![
            contact(10, "C1", "", ""),
            contact(11, "", "+79123456789", ""),
            contact(12, "", "+79123456789", ""),
        ],
        true,
        Decision::Link {
            contact: 10,
            by: "card",
        },
    );
    check(
        vec![
            contact(11, "", "+79123456789", ""),
            contact(12, "", "+79123456789", ""),
        ],
        true,
        Decision::Ambiguous {
            by: "phone",
            candidates: vec![11, 12],
        },
    );
    check(
        vec![contact(13, "", "", "a@b.ru")],
        true,
        Decision::Link {
            contact: 13,
            by: "email",
        },
    );
    check(
        vec![contact(14, "", "+19123456789", "x@b.ru")],
        true,
        Decision::Create,
    );
    check(vec![], false, Decision::Nothing);
}

#[test]
fn the_shipped_field_map_is_the_default() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mappings/amocrm.toml");
    let map = kopilka::amocrm::fields::FieldMap::load(Some(&path)).unwrap();
    assert_eq!(map, kopilka::amocrm::fields::FieldMap::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answers_at_once_and_wakes_the_poller() {
    let wake = Arc::new(tokio::sync::Notify::new());
    let app = kopilka::amocrm::webhook::webhook_router(wake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let woken = wake.notified();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/amocrm/webhook"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("leads%5Bstatus%5D%5B0%5D%5Bid%5D=1&account%5Bsubdomain%5D=shop")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    woken.await;
}
