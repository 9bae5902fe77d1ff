//! «Сервер лояльности» as УНФ 3.0's cashier workplace calls it, over real HTTP on loopback
//! (the daemon's router, an SQLite file, a fake clock).
//!
//! The requests follow the client code of УНФ 3.0.8.73 as `../shared/specs/onec-till-protocols.md`
//! §2 reads it (AlexanderYekat/unf @ 39143e43): the resource appended to the configured
//! address, the 15 keys of `ПараметрыМетодовБонуснойПодсистемы` in their order with every key
//! present (`KS:265-286`), values as `Строка()` prints them (`Нет`, `01.01.0001 0:00:00`,
//! `1 500` with a no-break space), not encoded by the code (the platform's encoding of spaces
//! and Cyrillic is open in the spec; reqwest percent-encodes exactly those), Basic auth with a
//! login, and the order of calls of §2.2: `useautomaticdiscounts`, `getclientbonuses` (which
//! locks), then `writeoffclientbonuses` after the fiscal receipt or `unlockclientbonuses` when
//! the receipt is cleared. The replies are checked the way the RMK reads them: HTTP 200,
//! numbers as JSON numbers, the exact texts. 1C's own receipt arrives as the OData poll hands
//! it to the ledger (`Batch` of `onec:odata`), and must not spend the points a second time.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use kopilka::clock::{Clock, FakeClock};
use kopilka::config;
use kopilka::daemon::JobContext;
use kopilka::daemon::loyalty_server::{UNLOCKED, WRITTEN_OFF};
use kopilka::daemon::runtime::Runtime;
use kopilka::ledger::{DateRange, Ledger, OpenOptions, OpeningRow, SharedLedger};
use serde_json::Value;

const CARD: &str = "2000000000017";
const OTHER: &str = "2000000000024";
const USER: &str = "kassa";
const PASSWORD: &str = "till-secret";

struct Env {
    _dir: tempfile::TempDir,
    /// The till's «Адрес сервера лояльности».
    address: String,
    clock: Arc<FakeClock>,
    ledger: SharedLedger,
    cfg: Arc<config::Config>,
    http: reqwest::Client,
}

/// A ledger where `CARD` has `points` and `OTHER` 100, a point worth `point_value` kopecks.
async fn env(points: i64, point_value: i64) -> Env {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("till.pass"), PASSWORD).unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n[program]\npoint_value_kopecks = {point_value}\n[onec]\nsystem = \"onec\"\n\
             [onec.loyalty_server]\nuser = \"{USER}\"\npassword_file = \"till.pass\"\nhold_minutes = 20\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let start = Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap();
    let clock = Arc::new(FakeClock::new(start));
    let mut ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    let dest = cfg.destinations();
    let row = |line, card: &str, points| {
        Ok(OpeningRow {
            line,
            identity: kopilka::core::identity::CustomerIdentity {
                card: Some(card.into()),
                ..Default::default()
            },
            points,
            expires_at: None,
            tier: None,
            lots: None,
        })
    };
    let report = ledger
        .import_opening_balances(
            "test",
            "test",
            vec![row(1, CARD, points), row(2, OTHER, 100)],
            &cfg.ingest_context(start, &dest),
        )
        .unwrap();
    assert_eq!(report.applied, 2, "{report:?}");
    let ledger = SharedLedger::new(ledger);
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let app = kopilka::daemon::http::router(ctx, Arc::new(Runtime::new(start)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}/hs/loyaltyservice", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Env {
        _dir: dir,
        address,
        clock,
        ledger,
        cfg,
        http: reqwest::Client::new(),
    }
}

/// The 15 keys of `ПараметрыМетодовБонуснойПодсистемы`, in their order, as the RMK fills
/// them for a card found in its own base (`RMK:5612-5646`): the card's code and GUID, the
/// rest empty or `Строка()` of an empty value.
fn bonus_params(card: &str, bonuses_count: &str) -> String {
    [
        ("ClientCardID", card),
        ("CardGUID", "6f1c1a52-8a0e-11ee-b9d1-0242ac120002"),
        ("Phone", ""),
        ("Email", ""),
        ("Client", ""),
        ("Store", ""),
        ("GiftCardNumber", ""),
        ("GiftCardUID", "00000000-0000-0000-0000-000000000000"),
        ("BonusesCount", bonuses_count),
        ("GiftCardWriteOffAmount", "0"),
        ("Promocode", ""),
        ("DateOfBirth", "01.01.0001 0:00:00"),
        ("ClientCardTypeUID", "00000000-0000-0000-0000-000000000000"),
        ("Currency", "643"),
        ("GenerateNumber", "Нет"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>()
    .join("&")
}

impl Env {
    /// One call as `ВыполнитьЗапросКСерверуЛояльности` makes it: address + `/` + resource.
    async fn call(
        &self,
        method: reqwest::Method,
        resource: &str,
        auth: Option<(&str, &str)>,
    ) -> (u16, String) {
        let mut r = self.http.request(method, format!("{}/{resource}", self.address));
        if let Some((u, p)) = auth {
            r = r.basic_auth(u, Some(p));
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    async fn get(&self, resource: &str) -> (u16, String) {
        self.call(reqwest::Method::GET, resource, Some((USER, PASSWORD)))
            .await
    }

    async fn post(&self, resource: &str) -> (u16, String) {
        self.call(reqwest::Method::POST, resource, Some((USER, PASSWORD)))
            .await
    }

    /// `getclientbonuses` read the way `ИнтерфейсРМКСлужебныйКлиентСервер` reads it.
    async fn bonuses(&self, card: &str) -> Value {
        let (status, body) = self
            .get(&format!("getclientbonuses/?{}", bonus_params(card, "0")))
            .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["ClientNotFound"], Value::Bool(false), "{body}");
        for n in ["BonusCount", "BonusRate", "PaymentPercent"] {
            assert!(v[n].is_number(), "{n} must be a JSON number: {body}");
        }
        v
    }

    async fn balance(&self, card: &str) -> (i64, i64) {
        let now = self.clock.now();
        let card = card.to_string();
        let v = self.ledger.run(move |l| l.spendable(&card, now)).await.unwrap();
        (v.free, v.held)
    }

    async fn redeemed(&self) -> i64 {
        let now = self.clock.now();
        self.ledger
            .run(move |l| l.summary(&DateRange::default(), now))
            .await
            .unwrap()
            .points_redeemed
    }

    async fn hold_states(&self) -> Vec<(String, i64)> {
        let now = self.clock.now();
        self.ledger.run(move |l| l.hold_counts(now)).await.unwrap()
    }

    /// 1C's receipt as the OData poll hands it to the ledger: `points` paid with points.
    async fn receipt(&self, doc_id: &str, points: i64) -> kopilka::ledger::IngestReport {
        use kopilka::core::document::{DocKind, Document, Incoming, Line, SourceRef};
        use kopilka::core::money::{Money, Points};
        let now = self.clock.now();
        let doc = Document {
            source: SourceRef {
                system: "onec:odata".into(),
                doc_id: doc_id.into(),
                version: "v1".into(),
                stamp: None,
            },
            kind: DocKind::Sale,
            number: Some(format!("ЧК-{doc_id}")),
            occurred_at: now,
            customer: kopilka::core::identity::CustomerIdentity {
                card: Some(CARD.into()),
                ..Default::default()
            },
            currency: "RUB".into(),
            lines: vec![Line {
                product_id: "P1".into(),
                name: "P1".into(),
                category: None,
                category_parents: Vec::new(),
                quantity: rust_decimal::Decimal::ONE,
                unit_price: Money(500_000),
                discount: Money(0),
                net: Money(500_000),
                unit_cost: Some(Money(100_000)),
                service: false,
            }],
            total: Money(500_000),
            points_redeemed: Points(points),
            original: None,
            store: None,
            partner: None,
        };
        let cfg = self.cfg.clone();
        self.ledger
            .run(move |l| {
                let dest = cfg.destinations();
                l.ingest(
                    kopilka::ledger::Batch {
                        source: "onec:odata:Document_ЧекККМ".into(),
                        items: vec![kopilka::ledger::Item::Incoming(Incoming::Document(doc))],
                        checkpoint: None,
                        ..Default::default()
                    },
                    &cfg.ingest_context(now, &dest),
                )
            })
            .await
            .unwrap()
    }

    async fn verify(&self) {
        let problems = self.ledger.run(|l| l.verify()).await.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }
}

fn count(states: &[(String, i64)], state: &str) -> i64 {
    states.iter().find(|(s, _)| s == state).map_or(0, |s| s.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_paid_with_points_at_an_unf_till_spends_them_once() {
    let e = env(2_000, 100).await;
    // the settings form's connection check, and the RMK's start
    assert_eq!(e.get("ping").await, (200, "ok".to_string()));
    let (status, body) = e.get("useautomaticdiscounts").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Error"], Value::Bool(false), "{body}");
    assert_eq!(v["UseAutomaticDiscounts"], Value::Bool(false), "{body}");
    assert!(
        v.get("Version").is_none(),
        "no Version: the RMK keeps finding cards in its own base: {body}"
    );

    // the card scanned at till 1: the read locks the card's points for this receipt
    let v = e.bonuses(CARD).await;
    assert_eq!(v["BonusCount"], 2_000);
    assert_eq!(v["BonusRate"], 1, "a point is worth 1 ruble");
    assert_eq!(v["PaymentPercent"], 50, "the guard's share of a receipt");
    assert_eq!(e.balance(CARD).await, (0, 2_000));
    // the same card at till 2 meanwhile: nothing to spend there
    assert_eq!(e.bonuses(CARD).await["BonusCount"], 0);
    assert_eq!(
        e.balance(CARD).await,
        (0, 2_000),
        "a read of nothing holds nothing"
    );

    // the fiscal receipt is printed with 1 500 rubles paid in points
    let (status, body) = e
        .post(&format!(
            "writeoffclientbonuses/?{}",
            bonus_params(CARD, "1\u{a0}500")
        ))
        .await;
    assert_eq!(
        (status, body.as_str()),
        (200, WRITTEN_OFF),
        "the exact text, nothing more"
    );
    assert_eq!(
        e.balance(CARD).await,
        (500, 0),
        "the rest of the hold is released"
    );
    assert_eq!(e.redeemed().await, 1_500);
    let states = e.hold_states().await;
    assert_eq!(count(&states, "committed"), 1, "{states:?}");
    assert_eq!(count(&states, "held"), 0, "{states:?}");

    // 1C's receipt arrives over OData ten minutes later: the same points count once
    e.clock.advance(Duration::minutes(10));
    let r = e.receipt("r1", 1_500).await;
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(
        e.redeemed().await,
        1_500,
        "the write-off and 1C's receipt are one redemption"
    );
    assert_eq!(e.balance(CARD).await.0, 500);
    // the nightly jobs read every document: a till's redemption (a document that is no
    // sale) is one of them
    let cfg = e.cfg.clone();
    let now = e.clock.now();
    let offers = e
        .ledger
        .run(move |l| {
            let dest = cfg.destinations();
            l.refresh_offers(&cfg.ingest_context(now, &dest))
        })
        .await
        .unwrap_or_else(|err| panic!("nightly offers refresh: {err}"));
    assert!(offers.documents >= 2, "{offers:?}");
    // and reconcile sees one sale, 1C's receipt: the write-off's own document is no sale
    let cfg = e.cfg.clone();
    let day = now.with_timezone(&cfg.timezone).date_naive();
    let r = e
        .ledger
        .run(move |l| l.reconcile(day, day, &cfg.books(), day, None))
        .await
        .unwrap();
    assert!(r.differences.is_empty(), "{:#?}", r.differences);

    // the next customer: the card is read, the receipt cleared — unlocked, nothing spent
    let v = e.bonuses(OTHER).await;
    assert_eq!(v["BonusCount"], 100);
    let (status, body) = e
        .post(&format!("unlockclientbonuses/?{}", bonus_params(OTHER, "0")))
        .await;
    assert_eq!((status, body.as_str()), (200, UNLOCKED));
    assert_eq!(e.balance(OTHER).await, (100, 0));
    // unlocking again, or a card kopilka does not know, is no error for the till
    assert_eq!(
        e.post(&format!("unlockclientbonuses/?{}", bonus_params("9999", "0")))
            .await,
        (200, UNLOCKED.to_string())
    );
    e.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_off_over_the_balance_is_refused_and_writes_nothing() {
    let e = env(300, 50).await;
    let v = e.bonuses(CARD).await;
    assert_eq!(v["BonusCount"], 300);
    assert_eq!(v["BonusRate"], 0.5, "a point is worth 50 kopecks");
    // 200 rubles = 400 points of 50 kopecks: more than the card has
    let (status, body) = e
        .post(&format!("writeoffclientbonuses/?{}", bonus_params(CARD, "200")))
        .await;
    assert_ne!(status, 200, "{body}");
    assert_ne!(body, WRITTEN_OFF);
    assert_eq!(e.redeemed().await, 0);
    // the RMK unlocks after a refused write-off
    assert_eq!(
        e.post(&format!("unlockclientbonuses/?{}", bonus_params(CARD, "0")))
            .await
            .1,
        UNLOCKED
    );
    assert_eq!(e.balance(CARD).await, (300, 0));

    // a write-off after the hold ran out (a long receipt) spends what is free directly
    e.bonuses(CARD).await;
    e.clock.advance(Duration::minutes(21));
    assert_eq!(e.balance(CARD).await, (300, 0), "the hold expired");
    let (status, body) = e
        .post(&format!("writeoffclientbonuses/?{}", bonus_params(CARD, "100,5")))
        .await;
    assert_eq!((status, body.as_str()), (200, WRITTEN_OFF));
    assert_eq!(e.redeemed().await, 201, "100.50 rubles at 50 kopecks a point");
    assert_eq!(e.balance(CARD).await, (99, 0));
    e.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_till_is_answered_only_with_its_login_and_at_both_spellings_of_a_resource() {
    let e = env(100, 100).await;
    let (status, _) = e.call(reqwest::Method::GET, "ping", None).await;
    assert_eq!(status, 401);
    let (status, _) = e.call(reqwest::Method::GET, "ping", Some((USER, "wrong"))).await;
    assert_eq!(status, 401);
    assert_eq!(e.get("ping/").await.0, 200);
    assert_eq!(e.get("calculatediscounts").await, (200, "{}".to_string()));
    // an unknown card: ClientNotFound, and nothing held
    let (status, body) = e
        .get(&format!(
            "getclientbonuses/?{}",
            bonus_params("2000000009999", "0")
        ))
        .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ClientNotFound"], Value::Bool(true), "{body}");
    // findclientcard (the RMK's newer algorithm) finds by card and does not lock without BlockBonuses=1
    let (status, body) = e
        .get(&format!(
            "findclientcard/?ClientCardID={CARD}&Phone=&Email=&BlockBonuses=0&ClientGUID=&CardGUID="
        ))
        .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["LoyaltyCardsList"][0]["Barcode"], CARD, "{body}");
    assert_eq!(v["LoyaltyCardsList"][0]["BonusData"]["BonusCount"], 100, "{body}");
    assert_eq!(e.balance(CARD).await, (100, 0));
    let (_, body) = e.post("issueclientcard/?Client=Иванов").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Error"], Value::Bool(true), "{body}");
}
