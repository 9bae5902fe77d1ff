//! Issue 21, channel 3: the Telegram bot. A real ledger in a temporary folder, the Bot API
//! stand-in on loopback, and the daemon's own `notify:telegram` job: members link their chat
//! with a one-time code, ask for their points, and receive the messages the rules route to
//! Telegram — once, only when linked, never after /stop.

mod common;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use common::{reversion, sale, t0};
use kopilka::clock::FakeClock;
use kopilka::config::{Config, Secret, TelegramConfig};
use kopilka::core::document::Incoming;
use kopilka::daemon::telegram::TelegramJob;
use kopilka::daemon::{Job, JobContext, JobOutcome};
use kopilka::ledger::{
    Batch, DeliveryPolicy, Item, Ledger, OpenOptions, OutboxFilter, OutboxRow, OutboxState, SharedLedger,
    Sink, deliver_due,
};
use kopilka::notify::NotifySink;
use kopilka::notify::telegram::{Api, Telegram};
use kopilka::sim::telegram::TelegramSim;

const TOKEN: &str = "123456:test-token";

const RULES: &str = r#"
[program]
return_window_days = 14
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[notifications]
shop = "Чайный дом"
per_day = 10
per_week = 50
[notifications.events]
accrual = ["telegram"]
"#;

struct Harness {
    _dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ledger: SharedLedger,
    clock: Arc<FakeClock>,
    sim: TelegramSim,
    job: TelegramJob,
}

/// 13:00 in Moscow: outside the quiet hours.
fn now0() -> DateTime<Utc> {
    t0() + Duration::days(30)
}

impl Harness {
    async fn new() -> Harness {
        Harness::with_token(TOKEN).await
    }

    /// A bot configured with `token`; the stand-in always knows [`TOKEN`].
    async fn with_token(token: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.db"), &OpenOptions::default()).unwrap();
        let clock = Arc::new(FakeClock::new(now0()));
        let sim = TelegramSim::start(TOKEN, clock.clone()).await.unwrap();
        let mut cfg = Config {
            timezone: chrono_tz::Europe::Moscow,
            program: kopilka::rules_file::parse(RULES, "rules.toml").unwrap_or_else(|e| panic!("{e}")),
            warn_before: Duration::days(14),
            ..Config::default()
        };
        cfg.notify.telegram = Some(TelegramConfig {
            token: Secret::new(token),
            api_url: sim.base_url.clone(),
            bot_username: Some("kopilka_test_bot".into()),
            poll_timeout: StdDuration::from_secs(1),
        });
        assert!(
            cfg.notify_plan().is_some(),
            "the rules route accruals to telegram"
        );
        Harness {
            _dir: dir,
            cfg: Arc::new(cfg),
            ledger: SharedLedger::new(ledger),
            clock,
            sim,
            job: TelegramJob::with_poll(StdDuration::ZERO),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        kopilka::clock::Clock::now(self.clock.as_ref())
    }

    /// A sale of `rubles` to `card`, `ago` before now (5 % of it in points).
    fn sell(&self, id: &str, card: &str, rubles: i64, ago: Duration) {
        let mut d = sale(id, Some(card), &[("TEA", 1, rubles)]);
        d.occurred_at = self.now() - ago;
        let d = reversion(d);
        let now = self.now();
        let dest = self.cfg.destinations();
        let ctx = self.cfg.ingest_context(now, &dest);
        let r = self
            .ledger
            .lock()
            .ingest(
                Batch {
                    source: "test".into(),
                    items: vec![Item::Incoming(Incoming::Document(d))],
                    checkpoint: None,
                    ..Default::default()
                },
                &ctx,
            )
            .unwrap();
        assert_eq!(r.quarantined, 0, "{r:?}");
    }

    fn customer(&self, card: &str) -> i64 {
        self.ledger
            .lock()
            .balance(card, self.now(), Duration::days(14))
            .unwrap()
            .customer
            .id
    }

    fn code(&self, card: &str) -> String {
        let id = self.customer(card);
        let now = self.now();
        self.ledger.lock().telegram_link_code(id, now).unwrap()
    }

    fn ctx(&self) -> JobContext {
        JobContext {
            cfg: self.cfg.clone(),
            ledger: self.ledger.clone(),
            clock: self.clock.clone(),
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }

    async fn run(&self) -> JobOutcome {
        self.job.run(&self.ctx()).await.unwrap()
    }

    /// The member says `text` and the bot's next run answers; returns the answer (sent before
    /// any message of the same run).
    async fn ask(&self, chat: i64, text: &str) -> String {
        let before = self.sim.texts_to(chat).len();
        self.sim.user_says(chat, text);
        self.run().await;
        let texts = self.sim.texts_to(chat);
        assert!(texts.len() > before, "no answer to {text:?}: {texts:#?}");
        texts[before].replace('\u{a0}', " ")
    }

    fn rows(&self, destination: &str) -> Vec<OutboxRow> {
        self.ledger
            .lock()
            .outbox_list(&OutboxFilter {
                state: None,
                destination: Some(destination.into()),
                limit: None,
            })
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_links_with_a_code_and_reads_their_points() {
    let h = Harness::new().await;
    // 2 000 ₽ three weeks ago (100 points, usable), 1 000 ₽ an hour ago (50, in the return window)
    h.sell("S1", "1001", 2_000, Duration::days(21));
    h.sell("S2", "1001", 1_000, Duration::hours(1));
    h.sell("S3", "2002", 4_000, Duration::days(21));
    let code = h.code("1001");
    assert_eq!(
        h.code("1001"),
        code,
        "the unused code is shown again, not replaced"
    );

    let hello = h.ask(555, "/start").await;
    assert!(
        hello.contains("Чайный дом") && hello.contains("код привязки"),
        "{hello}"
    );
    let first = h.ask(555, "/balance").await;
    assert!(first.starts_with("Сначала привяжите чат"), "{first}");

    let linked = h.ask(555, &format!("/link {}", code.to_lowercase())).await;
    assert!(linked.starts_with("Готово: чат привязан"), "{linked}");
    assert!(linked.contains("Доступно 100 баллов"), "{linked}");
    // the hour-old accrual waited for the link and follows the answer
    let texts = h.sim.texts_to(555);
    assert_eq!(texts.len(), 4, "{texts:#?}");
    assert!(texts[3].contains("начислено 50"), "{texts:#?}");

    let balance = h.ask(555, "/balance").await;
    assert_eq!(
        balance,
        "Доступно: 100 баллов.\nОжидают начисления: 50 баллов (станут доступны после срока возврата покупки)."
    );
    let history = h.ask(555, "/history").await;
    assert!(
        history.contains("+50 баллов — начисление, чек №N-S2")
            && history.contains("+100 баллов — начисление, чек №N-S1"),
        "{history}"
    );
    assert!(!history.contains("200"), "another member's movement: {history}");
    let friend = h.ask(555, "/friend").await;
    let member = h.customer("1001");
    let friend_code = h.ledger.lock().referral_code(member).unwrap().unwrap();
    assert!(friend.contains(&friend_code), "{friend}");
    let expiring = h.ask(555, "/expiring").await;
    assert!(expiring.contains("сгор"), "{expiring}");

    // another chat sees nothing of this member
    let stranger = h.ask(777, "/balance").await;
    assert!(stranger.starts_with("Сначала привяжите чат"), "{stranger}");
    // every update was confirmed to Telegram
    h.run().await;
    assert_eq!(h.sim.unconfirmed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_refused_and_guessing_stops_for_an_hour() {
    let h = Harness::new().await;
    h.sell("S1", "1001", 1_000, Duration::days(21));
    let code = h.code("1001");
    for left in (1..=4).rev() {
        let answer = h.ask(555, "/link ZZZZZZ").await;
        assert!(
            answer.starts_with("Такого кода нет") && answer.contains(&format!("осталось {left}")),
            "{answer}"
        );
    }
    let fifth = h.ask(555, "ZZZZZY").await;
    assert!(fifth.starts_with("Слишком много неверных кодов"), "{fifth}");
    // the right code is refused too while the hour lasts, and the code stays unused
    let right = h.ask(555, &code).await;
    assert!(right.starts_with("Слишком много неверных кодов"), "{right}");
    assert_eq!(h.ledger.lock().telegram_chat(555).unwrap(), None);
    // another chat is not held back by this one's guesses
    let other = h.ask(556, "/link 222222").await;
    assert!(other.contains("осталось 4"), "{other}");

    h.clock.advance(Duration::minutes(61));
    let later = h.ask(555, &code).await;
    assert!(later.starts_with("Готово"), "{later}");
    let malformed = h.ask(556, "/link 12").await;
    assert!(malformed.starts_with("Код привязки — шесть"), "{malformed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_code_cannot_be_used_again() {
    let h = Harness::new().await;
    h.sell("S1", "1001", 1_000, Duration::days(21));
    let code = h.code("1001");
    assert!(h.ask(555, &format!("/start {code}")).await.starts_with("Готово"));
    let again = h.ask(555, &code).await;
    assert!(again.starts_with("Этот чат уже привязан"), "{again}");
    let thief = h.ask(666, &code).await;
    assert_eq!(thief, "Этот код уже использован. Попросите новый код на кассе.");
    let thief_balance = h.ask(666, "/balance").await;
    assert!(
        thief_balance.starts_with("Сначала привяжите чат"),
        "{thief_balance}"
    );
    // the member gets a new code for a second device
    assert_ne!(h.code("1001"), code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accrual_reaches_the_linked_chat_exactly_once() {
    let h = Harness::new().await;
    h.sell("S0", "1001", 1_000, Duration::days(21)); // history: no message (older than max_age)
    let code = h.code("1001");
    h.ask(555, &code).await;
    h.sell("S1", "1001", 2_000, Duration::minutes(5));
    h.run().await;
    h.run().await;
    let texts = h.sim.texts_to(555);
    let news: Vec<&String> = texts.iter().filter(|t| t.contains("начислено")).collect();
    assert_eq!(news.len(), 1, "{texts:#?}");
    assert_eq!(
        news[0].replace('\u{a0}', " "),
        "Здравствуйте, за покупку №N-S1 начислено 100 баллов, их можно потратить с 15.04.2026. Сейчас на счёте 50 баллов."
    );
    let rows = h.rows("notify:telegram");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, OutboxState::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_never_linked_gets_nothing_and_the_message_waits() {
    let h = Harness::new().await;
    h.sell("S1", "1001", 2_000, Duration::minutes(5));
    let out = h.run().await;
    assert!(out.summary.contains("1 held"), "{}", out.summary);
    let rows = h.rows("notify:telegram");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, OutboxState::Pending);
    assert_eq!(
        rows[0].note.as_deref(),
        Some("held: waiting for the member to link the Telegram bot")
    );
    let status = h.ledger.lock().notify_status(h.now()).unwrap();
    assert_eq!(
        status[0]
            .held
            .get("waiting for the member to link the Telegram bot"),
        Some(&1)
    );
    assert_eq!(h.sim.calls("sendMessage"), 0);

    // linking makes the waiting message due at once
    let code = h.code("1001");
    h.ask(555, &code).await;
    h.run().await;
    let texts = h.sim.texts_to(555);
    assert_eq!(
        texts.iter().filter(|t| t.contains("начислено")).count(),
        1,
        "{texts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_the_next_message_and_start_brings_them_back() {
    let h = Harness::new().await;
    h.sell("S0", "1001", 1_000, Duration::days(21));
    let code = h.code("1001");
    h.ask(555, &code).await;
    let stop = h.ask(555, "/stop").await;
    assert!(stop.starts_with("Больше не пришлю"), "{stop}");
    h.sell("S1", "1001", 2_000, Duration::minutes(5));
    h.run().await;
    let rows = h.rows("notify:telegram");
    assert_eq!(rows[0].state, OutboxState::Dropped);
    assert!(
        rows[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("unsubscribed from telegram")),
        "{:?}",
        rows[0].note
    );
    assert!(!h.sim.texts_to(555).iter().any(|t| t.contains("начислено")));
    // asking still works after /stop
    assert!(h.ask(555, "/balance").await.starts_with("Доступно: 50 баллов"));

    let back = h.ask(555, "/start").await;
    assert!(back.starts_with("Снова присылаю"), "{back}");
    h.sell("S2", "1001", 2_000, Duration::minutes(1));
    h.run().await;
    assert_eq!(
        h.sim
            .texts_to(555)
            .iter()
            .filter(|t| t.contains("начислено"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_send_and_mark_sends_once() {
    let h = Harness::new().await;
    let code = {
        h.sell("S0", "1001", 1_000, Duration::days(21));
        h.code("1001")
    };
    h.ask(555, &code).await;
    h.sell("S1", "1001", 2_000, Duration::minutes(5));
    let api = Arc::new(Api::new(h.cfg.notify.telegram.as_ref().unwrap(), h.clock.clone()).unwrap());
    let sink = NotifySink {
        ledger: h.ledger.clone(),
        plan: h.cfg.notify_plan().unwrap(),
        clock: h.clock.clone(),
        transport: Telegram {
            api,
            ledger: h.ledger.clone(),
        },
    };
    let now = h.now();
    let due = h.ledger.lock().outbox_due("notify:telegram", 10, now).unwrap();
    assert_eq!(due.len(), 1);
    let results = sink.deliver(&due).await;
    assert!(results[0].is_ok(), "{results:?}");
    // …killed here: the row was never marked delivered
    assert_eq!(h.rows("notify:telegram")[0].state, OutboxState::Pending);
    let r = deliver_due(&h.ledger, &sink, &DeliveryPolicy::default(), h.clock.as_ref())
        .await
        .unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(
        h.sim
            .texts_to(555)
            .iter()
            .filter(|t| t.contains("начислено"))
            .count(),
        1,
        "sent once"
    );
    assert_eq!(h.rows("notify:telegram")[0].state, OutboxState::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_loses_nor_repeats_an_update() {
    let h = Harness::new().await;
    h.sim.user_says(555, "/start");
    // answered in the ledger, then killed before the answer went out
    let api = Api::new(h.cfg.notify.telegram.as_ref().unwrap(), h.clock.clone()).unwrap();
    let settings = kopilka::ledger::BotSettings {
        timezone: h.cfg.timezone,
        warn_before: h.cfg.warn_before,
        shop: "Чайный дом".into(),
    };
    let a = kopilka::notify::telegram::answer_updates(&api, &h.ledger, &settings, StdDuration::ZERO)
        .await
        .unwrap();
    assert_eq!(a.replies, 1);
    assert_eq!(h.sim.unconfirmed(), 1, "Telegram has not heard the offset yet");
    // the restarted daemon sees the update again, answers nothing twice, sends the answer
    let restarted = TelegramJob::with_poll(StdDuration::ZERO);
    restarted.run(&h.ctx()).await.unwrap();
    assert_eq!(h.sim.texts_to(555).len(), 1, "{:#?}", h.sim.texts_to(555));
    assert_eq!(h.rows("telegram:reply").len(), 1);
    restarted.run(&h.ctx()).await.unwrap();
    assert_eq!(h.sim.unconfirmed(), 0);
    assert_eq!(h.sim.texts_to(555).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_throttled_and_refused_bots_are_told_apart() {
    let h = Harness::new().await;
    h.sell("S0", "1001", 1_000, Duration::days(21));
    let code = h.code("1001");
    h.ask(555, &code).await;

    // 429: the message waits exactly as long as asked, then goes
    h.sell("S1", "1001", 2_000, Duration::minutes(5));
    h.sim.throttle_next(30);
    let out = h.run().await;
    assert!(out.summary.contains("1 held"), "{}", out.summary);
    let row = &h.rows("notify:telegram")[0];
    assert_eq!(row.state, OutboxState::Pending);
    assert_eq!(row.next_attempt_at, h.now() + Duration::seconds(30));
    h.clock.advance(Duration::seconds(31));
    h.run().await;
    assert_eq!(h.rows("notify:telegram")[0].state, OutboxState::Delivered);

    // 403: the member blocked the bot; the chat stops being an address
    h.sim.block(555);
    h.sell("S2", "1001", 2_000, Duration::minutes(1));
    h.run().await;
    let rows = h.rows("notify:telegram");
    assert_eq!(rows[0].state, OutboxState::Dropped);
    assert_eq!(
        rows[0].note.as_deref(),
        Some("not sent: the member blocked the bot")
    );
    let customer = h.customer("1001");
    assert_eq!(
        h.ledger.lock().telegram_chat(555).unwrap(),
        Some((customer, true))
    );

    // 401: a wrong token halts the job with a message a person can act on
    let wrong = Harness::with_token("999:wrong").await;
    let err = wrong.job.run(&wrong.ctx()).await.unwrap_err();
    assert!(format!("{err:#}").contains("refused the bot token"), "{err:#}");
    assert!(
        !format!("{err:#}").contains("999:wrong"),
        "the token leaked: {err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_member_unlinks_their_chat() {
    let h = Harness::new().await;
    h.sell("S0", "1001", 1_000, Duration::days(21));
    let code = h.code("1001");
    h.ask(555, &code).await;
    let now = h.now();
    let f = h
        .ledger
        .lock()
        .forget_customer("1001", "152-ФЗ request", "test", now)
        .unwrap();
    assert_eq!(f.telegram_chats_removed, 1);
    assert_eq!(h.ledger.lock().telegram_chat(555).unwrap(), None);
    for row in h.rows("telegram:reply") {
        assert!(!row.idem_key.contains("555"), "{}", row.idem_key);
        assert!(!row.payload.contains("555"), "{}", row.payload);
    }
    let after = h.ask(555, "/balance").await;
    assert!(after.starts_with("Сначала привяжите чат"), "{after}");
}

#[test]
fn balance_shows_the_link_code_only_when_the_bot_is_configured() {
    let kopilka = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
            .args(args)
            .env_remove("KOPILKA_CONFIG")
            .env_remove("KOPILKA_LEDGER")
            .env_remove("KOPILKA_TELEGRAM_TOKEN")
            .output()
            .expect("kopilka runs")
    };
    let dir = tempfile::tempdir().unwrap();
    let demo = kopilka(&[
        "demo",
        "--sales",
        "200",
        "--customers",
        "20",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let db = dir.path().join("kopilka.db");
    let token = dir.path().join("telegram.token");
    std::fs::write(&token, "123456:test-token\n").unwrap();
    let with_bot = dir.path().join("with-bot.toml");
    std::fs::write(
        &with_bot,
        format!(
            "[ledger]\npath = {:?}\n[notify.telegram]\ntoken_file = {:?}\nbot_username = \"shop_bonus_bot\"\n",
            db.display().to_string(),
            token.display().to_string()
        ),
    )
    .unwrap();
    let balance = |cfg: &std::path::Path, json: bool| {
        let mut args = vec!["--config", cfg.to_str().unwrap(), "balance", "200000000000"];
        if json {
            args.push("--json");
        }
        let out = kopilka(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: serde_json::Value = serde_json::from_str(&balance(&with_bot, true)).unwrap();
    let code = v["telegram_link_code"].as_str().unwrap().to_string();
    assert_eq!(
        kopilka::core::bot::normalize_code(&code).as_deref(),
        Some(code.as_str())
    );
    let text = balance(&with_bot, false);
    assert!(
        text.contains(&code)
            && text.contains("@shop_bonus_bot")
            && text.contains(&format!("https://t.me/shop_bonus_bot?start={code}")),
        "{text}"
    );
    // the same code until it is used
    let again: serde_json::Value = serde_json::from_str(&balance(&with_bot, true)).unwrap();
    assert_eq!(again["telegram_link_code"], code.as_str());

    let without = dir.path().join("without-bot.toml");
    std::fs::write(
        &without,
        format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&balance(&without, true)).unwrap();
    assert!(v.get("telegram_link_code").is_none(), "{v}");
    assert!(!balance(&without, false).contains(&code));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_runs_every_few_seconds_unless_configured_otherwise() {
    let h = Harness::new().await;
    let jobs = kopilka::daemon::registry::jobs(&h.cfg);
    let job = jobs
        .iter()
        .find(|j| j.name() == "notify:telegram")
        .expect("enabled by [notify.telegram]");
    let s = kopilka::daemon::runtime::schedule_for(&h.cfg, job.as_ref());
    assert_eq!(s.source(), "*/3 * * * * *");
}
