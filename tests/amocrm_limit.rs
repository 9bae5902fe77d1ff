//! Never a 429 from AmoCRM (issue 21): a full sync against the strictest reading of the
//! vendor's limit — the simulator counts every arrival, token endpoint included, in a
//! sliding 1-second window at 7 and blocks the account after a few 429s — while the wire
//! jitters each request on its way in and out. Nothing here asserts timing: only what the
//! server counted and what the cards show.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use kopilka::amocrm::ClientOptions;
use kopilka::clock::{Clock, FakeClock};
use kopilka::config;
use kopilka::core::document::{DocKind, Document, Incoming, Line, SourceRef, content_version};
use kopilka::core::identity::{CustomerIdentity, Phone};
use kopilka::core::money::{Money, Points};
use kopilka::daemon::amocrm::{Deliver, Events, Shared};
use kopilka::daemon::{Job, JobContext};
use kopilka::ledger::{Batch, IngestContext, Item, Ledger, SharedLedger};
use kopilka::sim::amocrm::AmoSim;
use rust_decimal::Decimal;

const CUSTOMERS: usize = 1_000;
/// Contacts per PATCH: smaller than the default 50 so that the sync makes enough requests
/// for the limit to be tested on more than a handful of windows.
const BATCH_CONTACTS: usize = 20;
const LIMIT_PER_SECOND: usize = 7;
/// Larger than the 5 % the old even spacing left (50 ms over seven gaps), smaller than the
/// pacer's margin.
const JITTER_MAX: StdDuration = StdDuration::from_millis(60);
const JITTER_SEED: u64 = 21;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

fn phone(i: usize) -> String {
    format!("+7901{i:07}")
}

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
        number: Some(format!("N-{id}")),
        occurred_at: at,
        customer: CustomerIdentity {
            phone: Phone::parse(&phone(i)),
            ..Default::default()
        },
        currency: "RUB".into(),
        lines: vec![Line {
            product_id: "P1".into(),
            name: "Кофе".into(),
            category: None,
            category_parents: Vec::new(),
            quantity: Decimal::ONE,
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

fn ingest(ctx: &JobContext, docs: Vec<Document>) {
    let dest = ctx.cfg.destinations();
    let ictx = IngestContext {
        rules: &ctx.cfg.program,
        limits: &ctx.cfg.limits,
        destinations: &dest,
        now: ctx.clock.now(),
        warn_before: ctx.cfg.warn_before,
    };
    let items = docs
        .into_iter()
        .map(|d| Item::Incoming(Incoming::Document(d)))
        .collect();
    ctx.ledger
        .lock()
        .ingest(
            Batch {
                source: "test".into(),
                items,
                ..Default::default()
            },
            &ictx,
        )
        .unwrap();
}

/// Every customer's card shows the ledger's balance.
fn assert_cards_current(ctx: &JobContext, sim: &AmoSim) {
    let l = ctx.ledger.lock();
    let ids = l.customer_ids().unwrap();
    assert_eq!(ids.len(), CUSTOMERS);
    let links: HashMap<i64, i64> = l.amocrm_links(&ids).unwrap();
    assert_eq!(links.len(), CUSTOMERS, "every customer is linked");
    for (customer, contact) in links {
        let available = l
            .balance_of(customer, ctx.clock.now(), ctx.cfg.warn_before)
            .unwrap()
            .available;
        assert_eq!(
            sim.field_value(contact, "KOPILKA_POINTS"),
            Some(available.to_string()),
            "card of contact {contact} (customer id:{customer})"
        );
    }
}

/// Event polls run beside each push: a second task competing for the same turns.
const EVENT_POLLS: usize = 10;

/// Both AmoCRM jobs at once, as the daemon may run them: they share one client.
async fn sync(ctx: &JobContext, shared: &Arc<Shared>) {
    let (deliver, events) = (Deliver(shared.clone()), Events(shared.clone()));
    let polls = async {
        for _ in 0..EVENT_POLLS {
            events.run(ctx).await.unwrap();
        }
    };
    let (d, ()) = tokio::join!(deliver.run(ctx), polls);
    let d = d.unwrap();
    assert!(!d.pending, "{}", d.summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_with_a_refresh_midway_never_gets_a_429_from_a_strict_jittery_account() {
    let clock = Arc::new(FakeClock::new(t0()));
    let sim = AmoSim::builder()
        .requests_per_second(LIMIT_PER_SECOND)
        .block_after_violations(3)
        .network_jitter(JITTER_MAX, JITTER_SEED)
        .clock(clock.clone())
        .oauth_client("kopilka-test", "client-secret-1", "https://shop.example/oauth")
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client_secret"), "client-secret-1\n").unwrap();
    let text = format!(
        "[ledger]\npath = \"{}\"\n[program]\nreturn_window_days = 0\n[outbox]\nmax_rows_per_run = 100000\n\
         [amocrm]\nbase_url = \"{}\"\nclient_id = \"kopilka-test\"\nclient_secret_file = \"{}\"\n\
         redirect_uri = \"https://shop.example/oauth\"\nrequests_per_second = {LIMIT_PER_SECOND}\n\
         batch_size = {BATCH_CONTACTS}\n",
        dir.path().join("ledger.db").display(),
        sim.base_url,
        dir.path().join("client_secret").display(),
    );
    let path = dir.path().join("kopilka.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|r| panic!("{r}")));
    let mut opts = ClientOptions::from_config(cfg.amocrm.as_ref().unwrap());
    opts.backoff_initial = StdDuration::from_millis(20);
    opts.backoff_max = StdDuration::from_millis(200);
    let shared = Arc::new(Shared::with_options(opts));
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).unwrap()),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let conn = shared.get(&ctx).await.unwrap();
    conn.client.exchange_code(&sim.issue_code()).await.unwrap();

    let day_ago = clock.now() - Duration::days(1);
    ingest(
        &ctx,
        (0..CUSTOMERS)
            .map(|i| sale(format!("A{i}"), i, 100 + (i as i64 % 900), day_ago))
            .collect(),
    );
    for i in 0..CUSTOMERS {
        let p = phone(i);
        let typed = format!("8 ({}) {}-{}-{}", &p[2..5], &p[5..8], &p[8..10], &p[10..12]);
        sim.add_contact(&format!("Покупатель {i}"), &[&typed], &[]);
    }
    // the contacts were added before the first poll's window: the polls find nothing to read
    clock.advance(Duration::hours(1));
    // an admin revokes the access token while the first push runs
    sim.expire_access_tokens_at_request(sim.requests().len() + 20);
    sync(&ctx, &shared).await;
    let after_first = sim.requests().len();
    assert!(
        after_first > 20,
        "the revocation fell inside the run ({after_first} requests)"
    );

    // every balance changes; the next access token is revoked midway too
    clock.advance(Duration::hours(1));
    ingest(
        &ctx,
        (0..CUSTOMERS)
            .map(|i| sale(format!("B{i}"), i, 300, clock.now()))
            .collect(),
    );
    sim.expire_access_tokens_at_request(after_first + 20);
    sync(&ctx, &shared).await;

    let reqs = sim.requests();
    let refused: Vec<(usize, &str, u16)> = reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == 429 || r.status == 403)
        .map(|(i, r)| (i, r.path.as_str(), r.status))
        .collect();
    let unauthorized = reqs.iter().filter(|r| r.status == 401).count();
    let token_calls = reqs.iter().filter(|r| r.path == "/oauth2/access_token").count();
    println!(
        "strict limit {LIMIT_PER_SECOND}/s, jitter 0–{} ms in and out: {} requests ({} PATCH, {token_calls} to the \
         token endpoint, {unauthorized} × 401), {} × 429, max {} in any 1 s at the server, {:.2} requests/s sent",
        JITTER_MAX.as_millis(),
        reqs.len(),
        reqs.iter().filter(|r| r.method == "PATCH").count(),
        sim.rate_limited(),
        sim.max_requests_in_any_second(),
        conn.client.stats.achieved_rate_per_second()
    );
    assert_eq!(sim.rate_limited(), 0, "0 × 429: {refused:?}");
    assert!(!sim.is_blocked());
    assert!(sim.max_requests_in_any_second() <= LIMIT_PER_SECOND);
    // the refreshes went through the same pacer as everything else
    // both jobs may hold the revoked token at once: each gets its 401, one refresh serves both
    assert!(unauthorized >= 2, "a 401 after each revocation");
    assert_eq!(sim.refresh_calls(), 2);
    assert_eq!(token_calls, 3, "the code exchange and two refreshes");
    assert!(
        reqs.iter().filter(|r| r.method == "PATCH").count() >= 2 * CUSTOMERS / BATCH_CONTACTS,
        "both pushes sent every card"
    );
    assert_cards_current(&ctx, &sim);
    assert!(conn.client.halted().is_none());
}

/// The acceptance run of issue 21: a full sync of 1 000 members with a Salesbot message and a
/// note each, against the same strict, jittery account. Every call — cards, notes, the
/// message field and the bot runs — shares the one pacer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_with_salesbot_messages_and_notes_never_gets_a_429() {
    const BOT: i64 = 4_242;
    let clock = Arc::new(FakeClock::new(t0()));
    let sim = AmoSim::builder()
        .requests_per_second(LIMIT_PER_SECOND)
        .block_after_violations(3)
        .network_jitter(JITTER_MAX, JITTER_SEED + 1)
        .clock(clock.clone())
        .long_lived_token("long-lived-1", t0() + Duration::days(365))
        .start()
        .await
        .unwrap();
    sim.add_bot(BOT);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "long-lived-1\n").unwrap();
    std::fs::write(
        dir.path().join("rules.toml"),
        "[program]\nreturn_window_days = 0\n[guard]\nmax_reward_share_of_margin = \"1\"\n[[rules]]\nid = \"base\"\n\
         percent = \"5\"\n[notifications]\nquiet_hours = \"none\"\n[notifications.events]\naccrual = [\"salesbot\"]\n",
    )
    .unwrap();
    let text = format!(
        "[ledger]\npath = \"{}\"\n[rules]\npath = \"{}\"\n[outbox]\nmax_rows_per_run = 100000\n\
         [amocrm]\nbase_url = \"{}\"\ntoken_file = \"{}\"\nrequests_per_second = {LIMIT_PER_SECOND}\n\
         batch_size = {BATCH_CONTACTS}\nnotes = [\"accrual\"]\nnote_accrual_min_points = 1\n\
         [notify.salesbot]\nbot_id = {BOT}\nbatch = {BATCH_CONTACTS}\n",
        dir.path().join("ledger.db").display(),
        dir.path().join("rules.toml").display(),
        sim.base_url,
        dir.path().join("token").display(),
    );
    let path = dir.path().join("kopilka.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|r| panic!("{r}")));
    let mut opts = ClientOptions::from_config(cfg.amocrm.as_ref().unwrap());
    opts.backoff_initial = StdDuration::from_millis(20);
    opts.backoff_max = StdDuration::from_millis(200);
    let shared = Arc::new(Shared::with_options(opts));
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).unwrap()),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    // the members agreed to messages in the shop's own list
    let csv: String = std::iter::once("Телефон;Согласие\n".to_string())
        .chain((0..CUSTOMERS).map(|i| format!("{};да\n", phone(i))))
        .collect();
    let rows = kopilka::migrate::read_customers_csv(csv.as_bytes()).unwrap();
    ctx.ledger
        .lock()
        .import_customers("csv:members.csv", rows, &cfg.program, clock.now())
        .unwrap();
    for i in 0..CUSTOMERS {
        sim.add_contact(&format!("Покупатель {i}"), &[&phone(i)], &[]);
    }
    clock.advance(Duration::minutes(5));
    ingest(
        &ctx,
        (0..CUSTOMERS)
            .map(|i| sale(format!("M{i}"), i, 100 + (i as i64 % 900), clock.now()))
            .collect(),
    );
    // the first run links the contacts; messages wait for the link, then go
    sync(&ctx, &shared).await;
    clock.advance(Duration::minutes(20));
    sync(&ctx, &shared).await;

    let reqs = sim.requests();
    let runs = sim.bot_runs();
    println!(
        "strict limit {LIMIT_PER_SECOND}/s with Salesbot: {} requests ({} salesbot/run, {} notes), {} × 429, \
         max {} in any 1 s, {} bot runs",
        reqs.len(),
        reqs.iter().filter(|r| r.path == "/api/v2/salesbot/run").count(),
        reqs.iter().filter(|r| r.path == "/api/v4/contacts/notes").count(),
        sim.rate_limited(),
        sim.max_requests_in_any_second(),
        runs.len()
    );
    assert_eq!(sim.rate_limited(), 0, "0 × 429");
    assert!(!sim.is_blocked());
    assert!(sim.max_requests_in_any_second() <= LIMIT_PER_SECOND);
    assert_eq!(runs.len(), CUSTOMERS, "one bot run per member");
    let contacts: std::collections::BTreeSet<i64> = runs.iter().map(|r| r.entity_id).collect();
    assert_eq!(contacts.len(), CUSTOMERS, "each member once");
    for r in &runs {
        assert_eq!((r.bot_id, r.entity_type), (BOT, 1));
        let m = r.message.as_deref().unwrap_or_default();
        assert!(
            m.contains("начислено"),
            "the bot read the message written before it ran: {m:?}"
        );
    }
    assert_eq!(
        sim.notes().len(),
        CUSTOMERS,
        "a note per accrual for the managers"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.path == "/api/v2/salesbot/run")
            .all(|r| r.items() <= BATCH_CONTACTS),
        "at most the configured batch per run request"
    );
    let status = ctx.ledger.lock().notify_status(clock.now()).unwrap();
    assert_eq!(status[0].sent, CUSTOMERS as i64, "{status:?}");
}
