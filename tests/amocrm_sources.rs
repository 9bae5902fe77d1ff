//! Issue 20, the AmoCRM part: customer attributes read from contact fields named in
//! `[sources]` of the field map (a birthday field, the friend code a customer came with,
//! consent checkboxes). Each test starts from what a shop has — a contact a manager filled
//! in the simulator, a sale from the till, the customers file — and runs the AmoCRM jobs and
//! the nightly ones; no SQL edits anywhere.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use kopilka::amocrm::ClientOptions;
use kopilka::clock::{Clock, FakeClock};
use kopilka::config::{self, Config};
use kopilka::core::document::{DocKind, Document, Incoming, Line, SourceRef, content_version};
use kopilka::core::identity::{CustomerIdentity, Phone};
use kopilka::core::money::{Money, Points};
use kopilka::daemon::amocrm::{Deliver, Events, Shared};
use kopilka::daemon::{Job, JobContext};
use kopilka::ledger::{AttributeChange, Batch, IngestContext, Item, Ledger, SharedLedger};
use kopilka::sim::amocrm::AmoSim;
use rust_decimal::Decimal;
use serde_json::json;

/// 13:00 in Moscow.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap()
}

const RULES: &str = r#"
[program]
return_window_days = 14
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[birthday]
points = 300
days_before = 0
days_after = 0
[referral]
referrer_points = 300
referee_points = 200
[[closed_programs]]
id = "club"
invite_codes = ["CLUB2026"]
"#;

const SOURCES: &str = r#"
[sources]
birthday = "BIRTHDAY"
referral_code = "FRIEND_CODE_USED"
invite_code = "INVITE_CODE"
consent_ads = "CONSENT_ADS"
"#;

struct World {
    sim: AmoSim,
    clock: Arc<FakeClock>,
    dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ctx: JobContext,
    shared: Arc<Shared>,
}

/// The simulator with the fields the shop created (`birthday_type`: `birthday` for AmoCRM's
/// birthday field, `text` for a field managers type dates into), and kopilka configured to
/// read them.
async fn world(birthday_type: &str) -> World {
    world_with(birthday_type, "").await
}

/// [`world`] with more of the rules file (`extra` is appended to it).
async fn world_with(birthday_type: &str, extra: &str) -> World {
    let clock = Arc::new(FakeClock::new(t0()));
    let sim = AmoSim::builder()
        .clock(clock.clone())
        .requests_per_second(50)
        .long_lived_token("long-lived-1", t0() + Duration::days(3650))
        .start()
        .await
        .unwrap();
    sim.add_field("День рождения", "BIRTHDAY", birthday_type);
    sim.add_field("Код друга, с которым пришёл", "FRIEND_CODE_USED", "text");
    sim.add_field("Код приглашения", "INVITE_CODE", "text");
    sim.add_field("Согласие на рекламу", "CONSENT_ADS", "checkbox");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "long-lived-1\n").unwrap();
    std::fs::write(dir.path().join("rules.toml"), format!("{RULES}{extra}")).unwrap();
    std::fs::write(dir.path().join("amocrm.toml"), SOURCES).unwrap();
    let text = format!(
        "[general]\ntimezone = \"Europe/Moscow\"\n[ledger]\npath = \"{}\"\n[rules]\npath = \"{}\"\n\
         [outbox]\nmax_rows_per_run = 100000\n\
         [amocrm]\nbase_url = \"{}\"\ntoken_file = \"{}\"\nrequests_per_second = 50\nmapping = \"{}\"\n",
        dir.path().join("ledger.db").display(),
        dir.path().join("rules.toml").display(),
        sim.base_url,
        dir.path().join("token").display(),
        dir.path().join("amocrm.toml").display(),
    );
    let path = dir.path().join("kopilka.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|r| panic!("{r}")));
    let mut opts = ClientOptions::from_config(cfg.amocrm.as_ref().unwrap());
    opts.backoff_initial = StdDuration::from_millis(20);
    opts.backoff_max = StdDuration::from_millis(200);
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).unwrap()),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    World {
        sim,
        clock,
        dir,
        cfg,
        ctx,
        shared: Arc::new(Shared::with_options(opts)),
    }
}

/// A till sale of `rub` rubles by a customer known by card or phone.
fn sale(id: &str, card: Option<&str>, phone: Option<&str>, rub: i64, at: DateTime<Utc>) -> Document {
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

/// The account's midnight of a date in Moscow, as AmoCRM's date picker stores it.
fn moscow_midnight(y: i32, m: u32, d: u32) -> i64 {
    chrono_tz::Europe::Moscow
        .from_local_datetime(
            &NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        )
        .unwrap()
        .timestamp()
}

impl World {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn ctx_run<R>(&self, f: impl FnOnce(&mut Ledger, &IngestContext<'_>) -> R) -> R {
        let dest = self.cfg.destinations();
        let ictx = IngestContext {
            rules: &self.cfg.program,
            limits: &self.cfg.limits,
            destinations: &dest,
            now: self.now(),
            warn_before: self.cfg.warn_before,
        };
        f(&mut self.ctx.ledger.lock(), &ictx)
    }

    fn ingest(&self, docs: Vec<Document>) {
        let items = docs
            .into_iter()
            .map(|d| Item::Incoming(Incoming::Document(d)))
            .collect();
        let r = self.ctx_run(|l, c| {
            l.ingest(
                Batch {
                    source: "test".into(),
                    items,
                    checkpoint: None,
                    ..Default::default()
                },
                c,
            )
            .unwrap()
        });
        assert_eq!(r.quarantined, 0, "{r:?}");
    }

    async fn deliver(&self) -> String {
        Deliver(self.shared.clone()).run(&self.ctx).await.unwrap().summary
    }

    async fn events(&self) -> String {
        Events(self.shared.clone()).run(&self.ctx).await.unwrap().summary
    }

    fn birthday(&self, key: &str) -> Option<String> {
        self.ctx
            .ledger
            .lock()
            .balance(key, self.now(), Duration::days(14))
            .unwrap()
            .customer
            .birthday
    }

    fn available(&self, key: &str) -> i64 {
        self.ctx
            .ledger
            .lock()
            .balance(key, self.now(), Duration::days(14))
            .unwrap()
            .available
    }

    fn friend_code(&self, key: &str) -> String {
        self.ctx
            .ledger
            .lock()
            .balance(key, self.now(), Duration::days(14))
            .unwrap()
            .referral_code
            .unwrap()
    }

    fn changes(&self, key: &str) -> Vec<AttributeChange> {
        self.ctx.ledger.lock().attribute_changes(key).unwrap()
    }

    fn import_csv(&self, csv: &str) {
        let rows = kopilka::migrate::read_customers_csv(csv.as_bytes()).unwrap();
        let r = self
            .ctx
            .ledger
            .lock()
            .import_customers("csv:customers.csv", rows, &self.cfg.program, self.now())
            .unwrap();
        assert!(r.problems.is_empty(), "{r:?}");
    }

    fn kopilka(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
            .arg("--config")
            .arg(self.dir.path().join("kopilka.toml"))
            .args(args)
            .output()
            .unwrap()
    }
}

fn refused<'a>(changes: &'a [AttributeChange], field: &str) -> Vec<&'a AttributeChange> {
    changes
        .iter()
        .filter(|c| c.field == field && c.refused.is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_birthday_field_on_the_contact_pays_the_birthday_bonus_on_the_day() {
    let w = world("birthday").await;
    let contact = w.sim.add_contact("Анна", &["+7 912 000-00-01"], &[]);
    // AmoCRM keeps the Moscow midnight of 2 March: 1 March 21:00 UTC
    assert!(
        w.sim
            .set_contact_value(contact, "BIRTHDAY", json!(moscow_midnight(1990, 3, 2)))
    );
    w.ingest(vec![sale("S1", None, Some("89120000001"), 1000, w.now())]);
    let out = w.deliver().await;
    assert!(
        out.contains("attributes: 1 customers changed, 0 refused"),
        "{out}"
    );
    assert_eq!(w.birthday("+79120000001").as_deref(), Some("1990-03-02"));
    let changes = w.changes("+79120000001");
    assert!(
        changes
            .iter()
            .any(|c| c.field == "birthday" && c.source == "amocrm" && c.refused.is_none()),
        "{changes:?}"
    );
    // the nightly job pays it today (a window of the day itself: a day's slip would miss it)
    let before = w.available("+79120000001");
    let paid = w.ctx_run(|l, c| l.birthday_bonuses(&w.cfg.program, c)).unwrap();
    assert_eq!(paid, 1);
    assert_eq!(w.available("+79120000001"), before + 300);
    // reading the contact again changes nothing and records nothing
    let out = w.deliver().await;
    assert!(out.contains("attributes: 0 customers changed"), "{out}");
    assert_eq!(w.changes("+79120000001"), changes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_friend_code_on_the_contact_pays_both_after_the_return_window() {
    let w = world("birthday").await;
    // the referrer: a member for two months, whose friend code `balance` shows
    w.ingest(vec![sale(
        "S0",
        Some("1001"),
        None,
        1000,
        w.now() - Duration::days(60),
    )]);
    let code = w.friend_code("1001");
    // the friend came to the shop with it; a manager typed it on their card
    let friend = w.sim.add_contact("Борис", &["+7 912 000-00-02"], &[]);
    assert!(
        w.sim
            .set_contact_field(friend, "FRIEND_CODE_USED", &code.to_lowercase())
    );
    // the friend's first purchase, 20 days ago, is past the 14-day return window
    w.ingest(vec![sale(
        "S1",
        None,
        Some("+79120000002"),
        1000,
        w.now() - Duration::days(20),
    )]);
    w.deliver().await;
    let (referrer, friend_before) = (w.available("1001"), w.available("+79120000002"));
    let paid = w.ctx_run(|l, c| l.referral_bonuses(&w.cfg.program, c)).unwrap();
    assert_eq!(paid, 1, "one pair paid");
    assert_eq!(w.available("1001"), referrer + 300);
    assert_eq!(w.available("+79120000002"), friend_before + 200);
    // once
    assert_eq!(
        w.ctx_run(|l, c| l.referral_bonuses(&w.cfg.program, c)).unwrap(),
        0
    );
    let changes = w.changes("+79120000002");
    assert!(
        changes
            .iter()
            .any(|c| c.field == "referred_by" && c.source == "amocrm" && c.refused.is_none()),
        "{changes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_on_their_customer_with_the_reason_and_the_rest_flow() {
    // the shop keeps birthdays in a text field managers type into
    let w = world("text").await;
    w.ingest(vec![
        sale("A", None, Some("+79120000011"), 500, w.now()),
        sale("B", None, Some("+79120000012"), 500, w.now()),
        sale("C", None, Some("+79120000013"), 500, w.now()),
    ]);
    let own = w.friend_code("+79120000011");
    let a = w.sim.add_contact("А", &["+79120000011"], &[]);
    let b = w.sim.add_contact("Б", &["+79120000012"], &[]);
    let c = w.sim.add_contact("В", &["+79120000013"], &[]);
    assert!(w.sim.set_contact_field(a, "FRIEND_CODE_USED", &own));
    assert!(w.sim.set_contact_field(b, "BIRTHDAY", "31.02.1990"));
    assert!(w.sim.set_contact_field(c, "BIRTHDAY", "02.03.1985"));
    assert!(w.sim.set_contact_field(c, "FRIEND_CODE_USED", "ZZZZZZZ"));
    assert!(w.sim.set_contact_field(c, "INVITE_CODE", "CLUB2026"));
    // a checkbox cannot hold text: the card refuses it, as AmoCRM's form does
    assert!(!w.sim.set_contact_value(c, "CONSENT_ADS", json!("да")));
    assert!(w.sim.set_contact_value(c, "CONSENT_ADS", json!(true)));
    let out = w.deliver().await;
    assert!(out.contains("3 linked"), "{out}");
    assert!(
        out.contains("attributes: 1 customers changed, 3 refused"),
        "{out}"
    );
    // every card was still delivered
    for contact in [a, b, c] {
        assert!(w.sim.field_value(contact, "KOPILKA_POINTS").is_some(), "{out}");
    }
    // the events of the managers' typing: read once, nothing new
    w.events().await;

    let ha = w.changes("+79120000011");
    let why = refused(&ha, "referred_by");
    assert_eq!(why.len(), 1, "{ha:?}");
    assert!(why[0].refused.as_deref().unwrap().contains("own"), "{why:?}");
    assert_eq!(why[0].source, "amocrm");

    let hb = w.changes("+79120000012");
    let why = refused(&hb, "birthday");
    assert_eq!(why.len(), 1, "{hb:?}");
    assert_eq!(why[0].new.as_deref(), Some("31.02.1990"));
    assert!(
        why[0].refused.as_deref().unwrap().contains("not a date"),
        "{why:?}"
    );
    assert_eq!(w.birthday("+79120000012"), None);

    // the customer with one bad value keeps the good ones
    let hc = w.changes("+79120000013");
    assert_eq!(w.birthday("+79120000013").as_deref(), Some("1985-03-02"));
    assert!(
        refused(&hc, "referred_by")[0]
            .refused
            .as_deref()
            .unwrap()
            .contains("no member's of this program")
    );
    assert!(
        hc.iter()
            .any(|x| x.field == "consent_ads" && x.new.as_deref() == Some("1"))
    );
    let memberships = w
        .ctx
        .ledger
        .lock()
        .balance("+79120000013", w.now(), Duration::days(14))
        .unwrap()
        .memberships;
    assert_eq!(memberships, vec![("club".to_string(), None)]);

    // the same bad values read again (a manager edits another field) are not recorded twice
    w.clock.advance(Duration::seconds(5));
    assert!(w.sim.set_contact_field(b, "INVITE_CODE", "NOPE"));
    let out = w.events().await;
    // the contact is read whole: its birthday is refused again, but recorded once
    assert!(
        out.contains("0 customers' attributes changed, 2 refused"),
        "{out}"
    );
    let hb2 = w.changes("+79120000012");
    assert_eq!(refused(&hb2, "birthday").len(), 1, "{hb2:?}");
    assert!(
        refused(&hb2, "invite_code")[0]
            .refused
            .as_deref()
            .unwrap()
            .contains("opens no program")
    );

    // `history` shows a refusal with its reason
    let out = w.kopilka(&["history", "+79120000012"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("birthday ≠ 31.02.1990 from amocrm: refused, birthday \"31.02.1990\" is not a date"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customers_file_wins_and_amocrm_follows_its_own_values() {
    let w = world("birthday").await;
    // X is in the shop's list with a birthday and no consent to advertising
    w.import_csv("Телефон;Дата рождения;Согласие на рекламу\n+79120000021;14.05.1985;нет\n");
    w.ingest(vec![
        sale("X", None, Some("+79120000021"), 500, w.now()),
        sale("Y", None, Some("+79120000022"), 500, w.now()),
    ]);
    let x = w.sim.add_contact("Х", &["+79120000021"], &[]);
    let y = w.sim.add_contact("У", &["+79120000022"], &[]);
    for contact in [x, y] {
        assert!(
            w.sim
                .set_contact_value(contact, "BIRTHDAY", json!(moscow_midnight(1990, 3, 2)))
        );
        assert!(w.sim.set_contact_value(contact, "CONSENT_ADS", json!(true)));
    }
    w.deliver().await;
    w.events().await;

    // the file's values stay; the conflict is in history with both sources
    assert_eq!(w.birthday("+79120000021").as_deref(), Some("1985-05-14"));
    let hx = w.changes("+79120000021");
    let lost = refused(&hx, "birthday");
    assert_eq!(lost.len(), 1, "{hx:?}");
    assert_eq!(lost[0].source, "amocrm");
    assert_eq!(lost[0].new.as_deref(), Some("1990-03-02"));
    assert_eq!(lost[0].old.as_deref(), Some("1985-05-14"));
    assert!(
        lost[0].refused.as_deref().unwrap().contains("csv:customers.csv"),
        "{lost:?}"
    );
    assert_eq!(refused(&hx, "consent_ads").len(), 1, "{hx:?}");

    // AmoCRM fills what nobody set
    assert_eq!(w.birthday("+79120000022").as_deref(), Some("1990-03-02"));

    // a manager corrects Y's birthday and X's: Y follows, X keeps the file's
    w.clock.advance(Duration::seconds(5));
    assert!(
        w.sim
            .set_contact_value(y, "BIRTHDAY", json!(moscow_midnight(1991, 4, 3)))
    );
    assert!(
        w.sim
            .set_contact_value(x, "BIRTHDAY", json!(moscow_midnight(1992, 1, 1)))
    );
    let out = w.events().await;
    // X's birthday and consent both lose to the file again
    assert!(
        out.contains("1 customers' attributes changed, 0 refused, 2 kept"),
        "{out}"
    );
    assert_eq!(w.birthday("+79120000022").as_deref(), Some("1991-04-03"));
    assert_eq!(w.birthday("+79120000021").as_deref(), Some("1985-05-14"));
    let hy = w.changes("+79120000022");
    let edit = hy
        .iter()
        .find(|c| c.field == "birthday" && c.new.as_deref() == Some("1991-04-03"))
        .unwrap_or_else(|| panic!("{hy:?}"));
    assert_eq!(edit.old.as_deref(), Some("1990-03-02"));
    assert_eq!(edit.source, "amocrm");
    assert!(edit.refused.is_none());

    // the file later sets Y's birthday: the file's from then on, and AmoCRM's edits stop
    w.import_csv("Телефон;Дата рождения\n+79120000022;03.04.1991\n");
    w.clock.advance(Duration::seconds(5));
    assert!(
        w.sim
            .set_contact_value(y, "BIRTHDAY", json!(moscow_midnight(1993, 6, 6)))
    );
    w.events().await;
    assert_eq!(w.birthday("+79120000022").as_deref(), Some("1991-04-03"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_bad_source_key_and_the_probe_a_missing_field() {
    let w = world("birthday").await;
    // a field the account does not have
    std::fs::write(
        w.dir.path().join("amocrm.toml"),
        format!("{SOURCES}consent_service = \"NO_SUCH_FIELD\"\n"),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking({
        let dir = w.dir.path().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kopilka"))
                .arg("--config")
                .arg(dir.join("kopilka.toml"))
                .args(["check", "--probe"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("consent_service"), "{text}");
    assert!(text.contains("NO_SUCH_FIELD"), "{text}");
    assert!(
        text.contains("missing: the account has no such contact field"),
        "{text}"
    );
    assert!(
        text.contains("birthday") && text.contains("ok (birthday)"),
        "{text}"
    );

    // an unknown key is a configuration error naming the file and the key
    std::fs::write(
        w.dir.path().join("amocrm.toml"),
        "[sources]\nbirthdate = \"BIRTHDAY\"\n",
    )
    .unwrap();
    let out = w.kopilka(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("amocrm.toml") && text.contains("sources.birthdate"),
        "{text}"
    );
}

/// The voucher's whole life as the shop sees it: the sixth coffee earns a free one; the
/// contact card lists it (code, item, last day) and a note tells the manager; the till gives
/// the item free in a 1C sale and the voucher is used — once, however often 1C sends the
/// sale again, and a second free line finds no other voucher; the card's list empties. A
/// second voucher left unused expires: `balance` says so and the card stops listing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_reaches_the_card_is_used_once_by_a_1c_sale_and_expires() {
    let w = world_with(
        "birthday",
        "[[stamp_cards]]\nid = \"coffee\"\nevery = 6\ninclude_products = [\"P1\"]\n\
         reward_product = \"P1\"\nreward_valid_days = 30\n",
    )
    .await;
    // the product as 1C's catalog names it
    w.ctx_run(|l, _| {
        l.upsert_catalog(
            &[kopilka::ledger::CatalogItem::Product {
                id: "P1".into(),
                name: "Кофе".into(),
                article: None,
                group: None,
                service: false,
                deleted: false,
            }],
            w.now(),
        )
    })
    .unwrap();
    let contact = w.sim.add_contact("Анна", &["+7 912 000-00-07"], &[]);
    let phone = Some("+79120000007");
    let six = |id: &str, at| {
        let mut d = sale(id, None, phone, 600, at);
        d.lines[0].quantity = Decimal::from(6);
        d.lines[0].unit_price = Money(10_000);
        d.source.version = content_version(&d);
        d
    };
    w.ingest(vec![six("S1", w.now() - Duration::hours(3))]);
    let vouchers = |w: &World| {
        w.ctx_run(|l, _| l.balance("+79120000007", w.now(), Duration::days(14)))
            .unwrap()
            .vouchers
    };
    let v = vouchers(&w);
    assert_eq!(v.len(), 1, "{v:?}");
    let code = v[0].code.clone().unwrap();
    assert_eq!(v[0].state, "issued");

    let out = w.deliver().await;
    let card = w.sim.field_value(contact, "KOPILKA_VOUCHERS").unwrap_or_default();
    let until = (w.now() - Duration::hours(3) + Duration::days(30))
        .with_timezone(&chrono_tz::Europe::Moscow)
        .format("%d.%m.%Y")
        .to_string();
    assert_eq!(card, format!("{code} — Кофе, до {until}"), "{out}");
    let notes: Vec<String> = w
        .sim
        .notes()
        .into_iter()
        .filter(|n| n.entity_id == contact && n.text.contains("купон"))
        .map(|n| n.text)
        .collect();
    assert_eq!(
        notes,
        vec![format!(
            "Выдан купон на подарок: Кофе, код {code}, действует до {until}. Клиент называет код на кассе."
        )]
    );
    // the note was delivered: the voucher is `sent`
    assert_eq!(vouchers(&w)[0].state, "sent");

    // the till gives one coffee free; 1C sends the sale twice (a re-scan)
    let free = |id: &str, units: i64| {
        let mut d = sale(id, None, phone, 100, w.now() - Duration::hours(1));
        d.lines[0].quantity = Decimal::from(units);
        d.lines[0].discount = d.lines[0].net;
        d.lines[0].net = Money(0);
        d.total = Money(0);
        d.source.version = content_version(&d);
        d
    };
    w.ingest(vec![free("S2", 1)]);
    w.ingest(vec![free("S2", 1)]);
    let v = vouchers(&w);
    assert_eq!((v.len(), v[0].state.as_str()), (1, "used"), "{v:?}");
    // another free coffee finds no open voucher: nothing more is used
    w.ingest(vec![free("S3", 1)]);
    let v = vouchers(&w);
    assert_eq!(v.iter().filter(|v| v.state == "used").count(), 1, "{v:?}");
    let out = w.deliver().await;
    assert_eq!(w.sim.field_value(contact, "KOPILKA_VOUCHERS"), None, "{out}");

    // six more: a second voucher, never used; 31 days on it has expired
    w.ingest(vec![six("S4", w.now())]);
    w.deliver().await;
    assert!(
        w.sim
            .field_value(contact, "KOPILKA_VOUCHERS")
            .is_some_and(|t| t.starts_with("V-") && !t.contains(&code)),
    );
    w.clock.advance(Duration::days(31));
    let report = w.ctx_run(|l, c| l.nightly(&w.cfg.program, c)).unwrap();
    assert_eq!(report.vouchers_expired, 1, "{report:?}");
    let states: Vec<String> = vouchers(&w).into_iter().map(|v| v.state).collect();
    assert_eq!(states, vec!["expired", "used"]);
    w.deliver().await;
    assert_eq!(w.sim.field_value(contact, "KOPILKA_VOUCHERS"), None);
    // the expired one is not announced again, nor used by a late free line
    w.ingest(vec![free("S5", 1)]);
    let states: Vec<String> = vouchers(&w).into_iter().map(|v| v.state).collect();
    assert_eq!(states, vec!["expired", "used"]);
}
