//! Issue 21, channel 2: from a ledger event to a mailbox. The member comes from the shop's
//! customers file (e-mail, consent), the event from a sale; the message goes through lettre to
//! an SMTP server on loopback (`kopilka::sim::smtp`, written from RFC 5321) and is read back
//! there. Time is a fake clock in the shop's zone (Moscow), so quiet hours and caps are exact.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{Env, reversion, sale};
use kopilka::clock::FakeClock;
use kopilka::config::{EmailConfig, SmtpTls};
use kopilka::core::notify::{Channel, Plan, unsubscribe_token_matches};
use kopilka::ledger::{DeliveryPolicy, Ledger, OpenOptions, SharedLedger, deliver_due};
use kopilka::notify::NotifySink;
use kopilka::notify::email::Email;
use kopilka::sim::smtp::SmtpSim;

const PROGRAM: &str = r#"
[program]
return_window_days = 14
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[notifications]
shop = "«Чайный дом»"
quiet_hours = "21:00-09:00"
per_day = 2
per_week = 6
[notifications.events]
accrual = ["email"]
welcome = ["email"]
available = ["email"]
"#;

const CUSTOMERS: &str = "Карта;Почта;ФИО;Согласие\n\
    1001;anna@example.ru;Иванова Анна Петровна;да\n\
    1002;boris@example.ru;Борис;\n\
    1003;;Вера;да\n";

/// 13:00 in Moscow.
fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap()
}

struct Shop {
    env: Env,
    smtp: SmtpSim,
    clock: Arc<FakeClock>,
    sink: NotifySink<Email>,
    shared: SharedLedger,
}

async fn shop() -> Shop {
    let mut env = Env::with_rules(PROGRAM);
    env.now = noon();
    let plan = Arc::new(Plan {
        policy: env.rules.notify.clone(),
        channels: vec![Channel::Email],
        timezone: chrono_tz::Europe::Moscow,
        tiers: Vec::new(),
        tier_spend: Vec::new(),
        tier_window: Duration::days(365),
    });
    env.dest.notify = Some(plan.clone());
    let rows = kopilka::migrate::read_customers_csv(CUSTOMERS.as_bytes()).unwrap();
    let rules = env.rules.clone();
    env.ledger
        .import_customers("csv:customers.csv", rows, &rules, env.now)
        .unwrap();
    let smtp = SmtpSim::start().await.unwrap();
    let cfg = EmailConfig {
        host: "127.0.0.1".into(),
        port: smtp.port,
        tls: SmtpTls::None,
        credentials: None,
        from: "Чайный дом <bonus@shop.example>".into(),
        reply_to: None,
        unsubscribe_url: Some("https://shop.example/kopilka/unsubscribe".into()),
        timeout: std::time::Duration::from_secs(10),
    };
    let secret = env.ledger.notify_secret().unwrap();
    let link = Box::new(move |c: i64| {
        kopilka::daemon::notify::unsubscribe_link(
            Some("https://shop.example/kopilka/unsubscribe"),
            &secret,
            c,
            Channel::Email,
        )
    });
    let clock = Arc::new(FakeClock::new(noon()));
    let shared = SharedLedger::new(Ledger::open(&env.path, &OpenOptions::default()).unwrap());
    let sink = NotifySink {
        ledger: shared.clone(),
        plan,
        clock: clock.clone(),
        transport: Email::new(&cfg, link).unwrap(),
    };
    Shop {
        env,
        smtp,
        clock,
        sink,
        shared,
    }
}

impl Shop {
    /// A sale an hour before the env's now, for a card.
    fn buy(&mut self, id: &str, card: &str, rubles: i64) {
        let mut s = sale(id, Some(card), &[("A", 1, rubles)]);
        s.occurred_at = self.env.now - Duration::hours(1);
        self.env.docs(vec![reversion(s)]);
    }

    async fn deliver(&self) -> kopilka::ledger::DeliveryReport {
        deliver_due(
            &self.shared,
            &self.sink,
            &DeliveryPolicy::default(),
            self.clock.as_ref(),
        )
        .await
        .unwrap()
    }

    fn status(&self) -> kopilka::ledger::ChannelStatus {
        let s = self.env.ledger.notify_status(self.clock.now()).unwrap();
        s.into_iter().find(|c| c.channel == "email").unwrap_or_default()
    }
}

use kopilka::clock::Clock as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accrual_reaches_the_members_mailbox_in_russian_with_a_way_out() {
    let mut s = shop().await;
    s.buy("S1", "1001", 1_000);
    let r = s.deliver().await;
    assert_eq!(r.delivered, 1, "{r:?}");
    let got = s.smtp.received();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.to, vec!["anna@example.ru".to_string()]);
    assert_eq!(m.from, "bonus@shop.example");
    let text = m.text().replace('\u{a0}', " ");
    assert!(
        text.starts_with("Анна, за покупку №N-S1 начислено 50 баллов, их можно потратить с 21.12.2026. Сейчас на счёте 0 баллов."),
        "{text}"
    );
    let id = m.header("Message-ID").unwrap();
    assert!(id.contains("notify.email.journal."), "{id}");
    // the member's own link, which a mail client offers as "unsubscribe"
    let unsub = m.header("List-Unsubscribe").unwrap();
    let url = unsub
        .split(['<', '>'])
        .find(|p| p.starts_with("https://"))
        .unwrap()
        .to_string();
    let q: std::collections::HashMap<String, String> = reqwest::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let customer: i64 = q["m"].parse().unwrap();
    let secret = s.env.ledger.notify_secret().unwrap();
    assert!(unsubscribe_token_matches(
        &secret,
        customer,
        Channel::Email,
        &q["t"]
    ));
    assert_eq!(
        m.header("List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    assert_eq!(s.status().sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_consent_or_address_nothing_is_sent_and_the_reason_shows() {
    let mut s = shop().await;
    s.buy("S2", "1002", 1_000); // Борис: no consent on file
    s.buy("S3", "1003", 1_000); // Вера: consent, no e-mail
    let r = s.deliver().await;
    assert_eq!((r.delivered, r.refused, r.held), (0, 1, 1), "{r:?}");
    assert!(s.smtp.received().is_empty());
    let st = s.status();
    assert_eq!(
        st.not_sent.get("no consent to service messages on file"),
        Some(&1),
        "{st:?}"
    );
    assert_eq!(st.held.get("waiting for an e-mail address"), Some(&1), "{st:?}");
    // a week later the address never came: dropped, with that reason
    s.clock.set(noon() + Duration::days(8));
    s.deliver().await;
    assert_eq!(
        s.status().not_sent.get("no email address within 7 days"),
        Some(&1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_hold_a_late_message_until_nine_local() {
    let mut s = shop().await;
    // 22:30 in Moscow
    let late = Utc.with_ymd_and_hms(2026, 12, 7, 19, 30, 0).unwrap();
    s.env.now = late;
    s.clock.set(late);
    s.buy("S4", "1001", 1_000);
    let r = s.deliver().await;
    assert_eq!((r.delivered, r.held), (0, 1));
    assert_eq!(s.status().held.get("quiet hours"), Some(&1));
    s.clock.set(Utc.with_ymd_and_hms(2026, 12, 8, 5, 59, 0).unwrap()); // 08:59
    assert_eq!(s.deliver().await.delivered, 0);
    assert!(s.smtp.received().is_empty());
    s.clock.set(Utc.with_ymd_and_hms(2026, 12, 8, 6, 0, 0).unwrap()); // 09:00
    assert_eq!(s.deliver().await.delivered, 1);
    assert_eq!(s.smtp.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_cap_holds_the_third_message_for_a_day() {
    let mut s = shop().await;
    for id in ["S5", "S6", "S7"] {
        s.buy(id, "1001", 1_000);
        s.deliver().await;
    }
    assert_eq!(s.smtp.received().len(), 2);
    assert_eq!(s.status().held.get("cap of 2 messages a day"), Some(&1));
    s.clock.set(noon() + Duration::hours(24) + Duration::minutes(1));
    assert_eq!(s.deliver().await.delivered, 1);
    assert_eq!(s.smtp.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_stops_what_is_queued_at_once() {
    let mut s = shop().await;
    s.buy("S8", "1001", 1_000);
    let id = s.env.ledger.customer_id_of("1001").unwrap();
    let refused = s
        .env
        .ledger
        .notify_unsubscribe(id, Channel::Email, "test", s.clock.now())
        .unwrap();
    assert_eq!(refused, 1);
    assert_eq!(s.deliver().await.delivered, 0);
    assert!(s.smtp.received().is_empty());
    assert_eq!(s.status().not_sent.get("unsubscribed from email"), Some(&1));
    s.buy("S9", "1001", 1_000);
    s.deliver().await;
    assert!(s.smtp.received().is_empty());
    assert!(
        s.status()
            .not_sent
            .keys()
            .any(|k| k.starts_with("unsubscribed from email on ")),
        "{:?}",
        s.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_send_and_mark_sends_once() {
    let mut s = shop().await;
    s.buy("S10", "1001", 1_000);
    // the sink sends and records, then the process dies before the outbox row is marked
    let rows = s
        .shared
        .run(|l| l.outbox_due(Channel::Email.destination(), 10, noon()))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let results = kopilka::ledger::Sink::deliver(&s.sink, &rows).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(s.smtp.received().len(), 1);
    // restart: the row is still pending, and is marked without a second send
    let r = s.deliver().await;
    assert_eq!(r.delivered, 1);
    assert_eq!(s.smtp.received().len(), 1, "the member got it once");
    assert_eq!(s.smtp.mailbox().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_old_sales_greets_nobody() {
    let mut s = shop().await;
    let mut old = sale("OLD", Some("1001"), &[("A", 1, 1_000)]);
    old.occurred_at = noon() - Duration::days(400);
    s.env.docs(vec![reversion(old)]);
    assert_eq!(s.deliver().await.delivered, 0);
    assert!(s.smtp.received().is_empty());
    assert!(s.status().sent == 0 && s.status().queued == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_that_pass_the_return_window_are_announced_once() {
    let mut s = shop().await;
    s.buy("S11", "1001", 1_000);
    assert_eq!(s.deliver().await.delivered, 1, "the accrual");
    // fifteen days later the night's jobs write (expiry): the points are usable now
    let later = noon() + Duration::days(15);
    s.env.now = later;
    s.clock.set(later);
    s.env.expire();
    s.env.expire();
    assert_eq!(
        s.deliver().await.delivered,
        1,
        "one announcement, however many writes"
    );
    let got = s.smtp.received();
    let text = got[1].text().replace('\u{a0}', " ");
    assert!(
        text.starts_with("Анна, 50 баллов за покупки теперь можно тратить. На счёте 50 баллов."),
        "{text}"
    );
}
