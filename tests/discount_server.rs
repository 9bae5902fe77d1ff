//! «Дисконтный сервер» as 1С:Розница 2.x calls it, over real HTTP on loopback (the daemon's
//! router, an SQLite file, a fake clock).
//!
//! The requests follow `../shared/specs/onec-till-protocols.md` §1 (§1.3 parameter order,
//! §1.4 the request as WSПрокси writes it: `soap:`/`m:` prefixes, `xs`/`xsi` declared on each
//! parameter, `Content-Type: text/xml; charset=utf-8`, the UTF-8 `SOAPAction`), which reads
//! Розница 2.2's client, DeZargo/1c_retail_apple @ 896da2e1
//! `CommonModules/ДисконтныйСервер/Ext/Module.bsl`: the WSDL GET then the POST of every call
//! (l. 279-307), the sales table of a document with its date, card ref GUID, item and
//! characteristic GUIDs, Сумма and Количество (l. 330-370), returns negated and an
//! un-posted document's table empty (l. 602-627), the bonus push after a `true` (l. 384-420),
//! and the balance reads (`ПолучитьОстатокБонусов` l. 88-128, `…Расширенный` l. 140-192,
//! whose row 0 the bonus-payment form takes as the balance). The replies are read the way
//! that code reads them: `return` as `true`, `РезультатЗапроса` rows by property name.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use kopilka::clock::{Clock, FakeClock};
use kopilka::config;
use kopilka::daemon::JobContext;
use kopilka::daemon::discount_server::{OPERATIONS, card_key};
use kopilka::daemon::runtime::Runtime;
use kopilka::ledger::{DateRange, Ledger, OpenOptions, OpeningRow, SharedLedger, Summary};

const USER: &str = "rozn";
const PASSWORD: &str = "ds-secret";
const NS: &str = "http://localhost/rt2discountservice";
const CARD: &str = "6f1c1a52-8a0e-11ee-b9d1-0242ac120002";
const NEW_CARD: &str = "7a2b3c4d-8a0e-11ee-b9d1-0242ac120002";
const ITEM: &str = "0b5e8d3a-aaaa-2222-3333-444455556666";
const ITEM2: &str = "0b5e8d3a-bbbb-2222-3333-444455556666";
const VARIANT: &str = "0b5e8d3a-cccc-2222-3333-444455556666";
const ZERO: &str = "00000000-0000-0000-0000-000000000000";
const SALE: &str = "0b5e8d3a-1111-2222-3333-444455556666";
const RETURN: &str = "0b5e8d3a-1111-2222-3333-777755556666";

struct Env {
    _dir: tempfile::TempDir,
    /// Розница's `АдресДисконтногоСервера` without `?wsdl`.
    address: String,
    clock: Arc<FakeClock>,
    ledger: SharedLedger,
    cfg: Arc<config::Config>,
    http: reqwest::Client,
}

/// A ledger where the Розница card `CARD` has `points` opening points, 5 % accrual that is
/// usable at once.
async fn env(points: i64) -> Env {
    env_with("", &[], points).await
}

/// The same with more of `[onec]` (an `[onec.odata]` section) and the files it names.
async fn env_with(onec_extra: &str, files: &[(&str, &str)], points: i64) -> Env {
    env_full("[program]\nreturn_window_days = 0\n", onec_extra, files, points).await
}

/// The same with the program's section too (`[rules] path = …` for a rules file in `files`).
async fn env_full(program: &str, onec_extra: &str, files: &[(&str, &str)], points: i64) -> Env {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ds.pass"), PASSWORD).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[general]\ntimezone = \"Europe/Moscow\"\n[ledger]\npath = \"{}\"\n{program}\
             [onec]\nsystem = \"onec\"\n[onec.discount_server]\nuser = \"{USER}\"\npassword_file = \"ds.pass\"\n{onec_extra}",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let start = Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap();
    let clock = Arc::new(FakeClock::new(start));
    let mut ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    let dest = cfg.destinations();
    let report = ledger
        .import_opening_balances(
            "test",
            "test",
            vec![Ok(OpeningRow {
                line: 1,
                identity: kopilka::core::identity::CustomerIdentity {
                    onec_id: Some(card_key(CARD).trim_start_matches("onec:").to_string()),
                    ..Default::default()
                },
                points,
                expires_at: None,
                tier: None,
                lots: None,
            })],
            &cfg.ingest_context(start, &dest),
        )
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    let ledger = SharedLedger::new(ledger);
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let app = kopilka::daemon::http::router(ctx, Arc::new(Runtime::new(start)));
    let cfg_kept = cfg.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!(
        "http://{}/ws/DiscountService.1cws",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Env {
        _dir: dir,
        address,
        clock,
        ledger,
        cfg: cfg_kept,
        http: reqwest::Client::new(),
    }
}

/// One parameter as WSПрокси writes it: `m:` prefix, `xs`/`xsi` declared on it.
fn param(name: &str, inner: &str) -> String {
    format!(
        "<m:{name} xmlns:xs=\"http://www.w3.org/2001/XMLSchema\"\n\t\t\t\t\
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">{inner}</m:{name}>"
    )
}

/// The envelope of §1.4 around one operation.
fn envelope(op: &str, params: &[String]) -> String {
    format!(
        "<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\">\n\t<soap:Header/>\n\t<soap:Body>\n\
         \t\t<m:{op} xmlns:m=\"{NS}\">\n\t\t\t{}\n\t\t</m:{op}>\n\t</soap:Body>\n</soap:Envelope>",
        params.join("\n\t\t\t")
    )
}

/// A sales-table row in `PKG` order (`DS:357-364`): the document date, the card, the item,
/// the characteristic, Сумма and Количество as XDTO writes decimals.
fn row(card: &str, item: &str, variant: &str, sum: &str, qty: &str) -> String {
    format!(
        "<m:СтрокиТаблицы><m:Период>2026-11-02T11:30:00</m:Период><m:ИдентификаторКарты>{card}</m:ИдентификаторКарты>\
         <m:ИдентификаторНоменклатуры>{item}</m:ИдентификаторНоменклатуры>\
         <m:ИдентификаторХарактеристики>{variant}</m:ИдентификаторХарактеристики>\
         <m:Сумма>{sum}</m:Сумма><m:Количество>{qty}</m:Количество></m:СтрокиТаблицы>"
    )
}

fn sales(doc_type: &str, doc_id: &str, rows: &[String]) -> String {
    envelope(
        "ОбновитьДанныеОПродажах",
        &[
            param("ТипДокумента", doc_type),
            param("ИдентификаторДокумента", doc_id),
            param("ТаблицаТоваров", &rows.concat()),
        ],
    )
}

fn balance_request(op: &str, card: &str, date: &str) -> String {
    envelope(
        op,
        &[param("ИдентификаторКарты", card), param("ДатаЗапроса", date)],
    )
}

/// The text of every element with this local name, in document order.
fn texts(xml: &str, local: &str) -> Vec<String> {
    let doc = roxmltree_free::parse(xml);
    doc.into_iter()
        .filter(|(n, _)| n == local)
        .map(|(_, t)| t)
        .collect()
}

/// A tiny reader over quick-xml (the crate's own dependency): (local name, text) of every
/// element, and a hard failure on XML that is not well formed.
mod roxmltree_free {
    use quick_xml::events::Event;

    pub fn parse(xml: &str) -> Vec<(String, String)> {
        let mut r = quick_xml::Reader::from_str(xml);
        let mut out: Vec<(String, String)> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        loop {
            match r.read_event().unwrap_or_else(|e| panic!("not XML: {e}: {xml}")) {
                Event::Start(e) => {
                    let n = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                    out.push((n, String::new()));
                    open.push(out.len() - 1);
                }
                Event::Empty(e) => {
                    let n = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                    out.push((n, String::new()));
                }
                Event::Text(t) => {
                    if let Some(i) = open.last() {
                        out[*i].1.push_str(&t.decode().unwrap());
                    }
                }
                Event::End(_) => {
                    open.pop().expect("balanced");
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(open.is_empty(), "unclosed elements: {xml}");
        out
    }
}

impl Env {
    /// One call as Розница makes it: the WSDL GET, then the POST to the WSDL's address.
    async fn call(&self, op: &str, body: String) -> (u16, String) {
        let (status, wsdl) = self.wsdl(Some((USER, PASSWORD))).await;
        assert_eq!(status, 200, "{wsdl}");
        let location = soap_address(&wsdl);
        let r = self
            .http
            .post(location)
            .basic_auth(USER, Some(PASSWORD))
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", format!("\"{NS}#ДисконтныйСервер:{op}\""))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    async fn wsdl(&self, auth: Option<(&str, &str)>) -> (u16, String) {
        let mut r = self.http.get(format!("{}?wsdl", self.address));
        if let Some((u, p)) = auth {
            r = r.basic_auth(u, Some(p));
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// `ОбновитьДанныеОПродажах`, asserting Розница's only success: `return` = `true`.
    async fn push(&self, body: String) {
        // each push is a later moment: Розница sends a document's current state
        self.clock.advance(Duration::seconds(5));
        let (status, reply) = self.call("ОбновитьДанныеОПродажах", body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(texts(&reply, "return"), ["true"], "{reply}");
    }

    async fn summary(&self) -> Summary {
        let now = self.clock.now();
        self.ledger
            .run(move |l| l.summary(&DateRange::default(), now))
            .await
            .unwrap()
    }

    async fn free(&self, card: &str) -> i64 {
        let now = self.clock.now();
        let key = card_key(card);
        self.ledger
            .run(move |l| l.spendable(&key, now))
            .await
            .map_or(0, |v| v.free)
    }

    /// Row 0 of `ПолучитьОстатокБонусовРасширенный`, as the payment form reads it.
    async fn extended_balance(&self, card: &str) -> Vec<(String, String, String, String)> {
        let (status, reply) = self
            .call(
                "ПолучитьОстатокБонусовРасширенный",
                balance_request("ПолучитьОстатокБонусовРасширенный", card, "0001-01-01T00:00:00"),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        let periods = texts(&reply, "ПредставлениеПериода");
        let points = texts(&reply, "КоличествоБаллов");
        let change = texts(&reply, "Изменение");
        let current = texts(&reply, "ТекущийОстаток");
        assert_eq!(periods.len(), points.len(), "{reply}");
        periods
            .into_iter()
            .zip(points)
            .zip(change)
            .zip(current)
            .map(|(((a, b), c), d)| (a, b, c, d))
            .collect()
    }

    /// `ПолучитьСуммуНакопления`, the last row read as `DS:48-57` reads it.
    async fn accumulation(
        &self,
        card: &str,
        from: &str,
        to: &str,
        segment: &str,
        exclude: &str,
    ) -> (String, String) {
        let op = "ПолучитьСуммуНакопления";
        let (status, reply) = self
            .call(
                op,
                envelope(
                    op,
                    &[
                        param("ИдентификаторКарты", card),
                        param("ДатаНачала", from),
                        param("ДатаОкончания", to),
                        param("ИдентификаторСегмента", segment),
                        param("ИдентификаторИсключаемогоДокументта", exclude),
                    ],
                ),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        let sum = texts(&reply, "СуммаНакопления");
        let qty = texts(&reply, "КоличествоНакопления");
        assert_eq!((sum.len(), qty.len()), (1, 1), "{reply}");
        (sum[0].clone(), qty[0].clone())
    }

    async fn verify(&self) {
        let problems = self.ledger.run(|l| l.verify()).await.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }
}

fn soap_address(wsdl: &str) -> String {
    let i = wsdl.find("<soap:address location=\"").expect("soap:address") + 24;
    let j = wsdl[i..].find('"').unwrap() + i;
    wsdl[i..j].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_its_repeat_its_edit_and_its_unposting_count_as_rozница_says() {
    let e = env(0).await;
    let receipt = || {
        sales(
            "ЧекККМ",
            SALE,
            &[
                row(CARD, ITEM, ZERO, "1000", "2"),
                row(CARD, ITEM2, VARIANT, "999.99", "1.5"),
            ],
        )
    };
    e.push(receipt()).await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.sales_total_kopecks), (1, 199_999), "{s:?}");
    let accrued = s.points_accrued;
    assert!(accrued > 0, "5 % of the receipt: {s:?}");
    assert_eq!(e.free(CARD).await, accrued);
    // the bonus push that follows a `true` (`DS:384-420`): answered, nothing recorded
    let (status, reply) = e
        .call(
            "ОбновитьДанныеОБонусах",
            envelope(
                "ОбновитьДанныеОБонусах",
                &[
                    param("ТипДокумента", "ЧекККМ"),
                    param("ИдентификаторДокумента", SALE),
                    param(
                        "ТаблицаБонусов",
                        "<m:СтрокиТаблицы><m:Период>2026-11-02T11:30:00</m:Период><m:ВидДвижения>0</m:ВидДвижения>\
                         <m:ИдентификаторБонуснойПрограммы>0b5e8d3a-dddd-2222-3333-444455556666</m:ИдентификаторБонуснойПрограммы>\
                         <m:ИдентификаторКарты>6f1c1a52-8a0e-11ee-b9d1-0242ac120002</m:ИдентификаторКарты>\
                         <m:Начислено>100</m:Начислено><m:КСписанию>0</m:КСписанию></m:СтрокиТаблицы>",
                    ),
                ],
            ),
        )
        .await;
    assert_eq!(
        (status, texts(&reply, "return")),
        (200, vec!["true".to_string()]),
        "{reply}"
    );
    assert_eq!(e.summary().await.points_accrued, accrued);

    // the scheduled job resends the same document: nothing changes
    e.push(receipt()).await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.points_accrued), (1, accrued), "{s:?}");

    // the receipt is edited: one line left; the new table replaces the old
    e.push(sales("ЧекККМ", SALE, &[row(CARD, ITEM, ZERO, "1000", "2")]))
        .await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.sales_total_kopecks), (1, 100_000), "{s:?}");
    assert_eq!(e.free(CARD).await, s.points_accrued - s.points_reversed);

    // un-posted: the table comes empty and voids the sale
    e.push(sales("ЧекККМ", SALE, &[])).await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.voided_documents), (0, 1), "{s:?}");
    assert_eq!(e.free(CARD).await, 0);
    // un-posted again (the queue resends): still one void
    e.push(sales("ЧекККМ", SALE, &[])).await;
    assert_eq!(e.summary().await.voided_documents, 1);

    // posted again with its first table: counts again, once
    e.push(receipt()).await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.sales_total_kopecks), (1, 199_999), "{s:?}");
    assert_eq!(e.free(CARD).await, accrued);
    e.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_arrives_negated_and_is_a_return() {
    let e = env(0).await;
    e.push(sales("ЧекККМ", SALE, &[row(CARD, ITEM, ZERO, "1000", "2")]))
        .await;
    // ВозвратТоваровОтПокупателя: coefficient −1 on Сумма and Количество (`DS:604-611`)
    e.push(sales(
        "ВозвратТоваровОтПокупателя",
        RETURN,
        &[row(CARD, ITEM, ZERO, "-500", "-1")],
    ))
    .await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.sales_total_kopecks), (1, 50_000), "{s:?}");
    assert_eq!((s.returns_count, s.returns_total_kopecks), (1, 50_000), "{s:?}");
    // a table of both signs is neither: quarantined, and still `true` so 1C does not resend
    // it for ever (§1.5 point 2)
    e.push(sales(
        "ЧекККМ",
        "0b5e8d3a-1111-2222-3333-888855556666",
        &[
            row(CARD, ITEM, ZERO, "-500", "-1"),
            row(CARD, ITEM2, ZERO, "300", "1"),
        ],
    ))
    .await;
    // an amount that is not money: the same
    e.push(sales(
        "ЧекККМ",
        "0b5e8d3a-1111-2222-3333-999955556666",
        &[row(CARD, ITEM, ZERO, "10.005", "1")],
    ))
    .await;
    let s = e.summary().await;
    assert_eq!(s.quarantined, 2, "{s:?}");
    assert_eq!((s.sales_count, s.returns_count), (1, 1), "{s:?}");

    // the card's turnover for accumulative discounts: sales less returns in the period
    let other = "0b5e8d3a-1111-2222-3333-aaaa55556666";
    e.push(sales("ЧекККМ", other, &[row(CARD, ITEM2, ZERO, "300.5", "1.25")]))
        .await;
    let (day, end) = ("2026-11-02T00:00:00", "2026-11-02T23:59:59");
    let t = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(e.accumulation(CARD, day, end, "", "").await, t("800.5", "2.25"));
    assert_eq!(
        e.accumulation(CARD, day, end, "", other).await,
        t("500", "1"),
        "the receipt being computed is left out"
    );
    assert_eq!(
        e.accumulation(CARD, "0001-01-01T00:00:00", "2026-11-01T23:59:59", "", "")
            .await,
        t("0", "0"),
        "nothing before the period's end"
    );
    assert_eq!(
        e.accumulation(CARD, day, end, "0b5e8d3a-eeee-2222-3333-444455556666", "")
            .await,
        t("0", "0"),
        "a segment kopilka cannot filter by: 0, never the unfiltered sum"
    );
    assert_eq!(e.accumulation(NEW_CARD, day, end, "", "").await, t("0", "0"));

    // the last purchase: the latest document; a return after it means none (`…:722-789`)
    let op = "ПолучитьДанныеПоследнейПокупки";
    let last = |exclude: &str| {
        envelope(
            op,
            &[
                param("ИдентификаторКарты", CARD),
                param("ДатаРасчета", "2026-11-02T23:00:00"),
                param("ИдентификаторСегмента", ""),
                param("ИдентификаторИсключаемогоДокументта", exclude),
            ],
        )
    };
    let (status, reply) = e.call(op, last("")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(texts(&reply, "СуммаНакопления"), ["300.5"], "{reply}");
    assert_eq!(texts(&reply, "ДатаПокупки"), ["2026-11-02T11:30:00"], "{reply}");
    let (_, reply) = e.call(op, last(other)).await;
    assert!(
        texts(&reply, "РезультатЗапроса").is_empty(),
        "the latest left is the return: no last purchase: {reply}"
    );
    e.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_answer_what_the_ledger_says_and_never_zero_rows() {
    let e = env(750).await;
    assert_eq!(e.free(CARD).await, 750);
    let rows = e.extended_balance(CARD).await;
    assert_eq!(
        rows,
        [("Сейчас".into(), "750".into(), "0".into(), "true".into())],
        "row 0 is the balance (`FOB:35-37`)"
    );
    // ПолучитьОстатокБонусов for a receipt dated 11:30: one row, the date echoed
    let (status, reply) = e
        .call(
            "ПолучитьОстатокБонусов",
            balance_request("ПолучитьОстатокБонусов", CARD, "2026-11-02T11:30:00"),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(texts(&reply, "КоличествоБаллов"), ["750"], "{reply}");
    assert_eq!(texts(&reply, "ДатаОперации"), ["2026-11-02T11:30:00"], "{reply}");
    // a sale on the card adds its points to what is read
    e.push(sales("ЧекККМ", SALE, &[row(CARD, ITEM, ZERO, "1000", "1")]))
        .await;
    let free = e.free(CARD).await;
    assert!(free > 750, "{free}");
    assert_eq!(e.extended_balance(CARD).await[0].1, free.to_string());
    // a card kopilka has never seen: one row of 0, never zero rows
    assert_eq!(
        e.extended_balance(NEW_CARD).await,
        [("Сейчас".into(), "0".into(), "0".into(), "true".into())]
    );

    // the settings form's «Проверить подключение» (`NPF:49-108`): the zero GUID, now, now, "", ""
    let (status, reply) = e
        .call(
            "ПолучитьСуммуНакопления",
            envelope(
                "ПолучитьСуммуНакопления",
                &[
                    param("ИдентификаторКарты", ZERO),
                    param("ДатаНачала", "2026-11-02T12:00:00"),
                    param("ДатаОкончания", "2026-11-02T12:00:00"),
                    param("ИдентификаторСегмента", ""),
                    param("ИдентификаторИсключаемогоДокументта", ""),
                ],
            ),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(texts(&reply, "СуммаНакопления"), ["0"], "{reply}");
    let (status, reply) = e
        .call(
            "ПолучитьДанныеПоследнейПокупки",
            envelope(
                "ПолучитьДанныеПоследнейПокупки",
                &[
                    param("ИдентификаторКарты", CARD),
                    param("ДатаРасчета", "2026-11-02T12:00:00"),
                    param("ИдентификаторСегмента", ""),
                    param("ИдентификаторИсключаемогоДокументта", ""),
                ],
            ),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(texts(&reply, "СуммаНакопления"), ["1000"], "{reply}");
    assert_eq!(texts(&reply, "return").len(), 1, "{reply}");
    let (status, reply) = e
        .call(
            "ПолучитьСкидкиПоКупону",
            envelope(
                "ПолучитьСкидкиПоКупону",
                &[
                    param("КодКупона", "ABC"),
                    param("ДатаЗапроса", "2026-11-02T12:00:00"),
                ],
            ),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(texts(&reply, "СтрокиТаблицы").is_empty(), "{reply}");
    let (status, reply) = e
        .call(
            "ОбновитьДанныеОКупонах",
            envelope(
                "ОбновитьДанныеОКупонах",
                &[
                    param("ТипДокумента", "ЧекККМ"),
                    param("ИдентификаторДокумента", SALE),
                    "<m:ТаблицаКупонов xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xsi:nil=\"true\"/>"
                        .to_string(),
                ],
            ),
        )
        .await;
    assert_eq!(
        (status, texts(&reply, "return")),
        (200, vec!["true".to_string()]),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wsdl_names_every_operation_and_only_rozница_s_login_is_answered() {
    let e = env(0).await;
    let (status, _) = e.wsdl(None).await;
    assert_eq!(status, 401);
    let (status, _) = e.wsdl(Some((USER, "wrong"))).await;
    assert_eq!(status, 401);
    let r = e
        .http
        .post(&e.address)
        .header("Content-Type", "text/xml; charset=utf-8")
        .body(balance_request(
            "ПолучитьОстатокБонусов",
            CARD,
            "0001-01-01T00:00:00",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("www-authenticate").is_some());

    let (status, wsdl) = e.wsdl(Some((USER, PASSWORD))).await;
    assert_eq!(status, 200);
    let elements = roxmltree_free::parse(&wsdl);
    assert!(wsdl.contains(&format!("targetNamespace=\"{NS}\"")), "{wsdl}");
    assert!(wsdl.contains("<service name=\"ДисконтныйСервер\">"), "{wsdl}");
    assert!(wsdl.contains("<port name=\"ДисконтныйСерверSoap\""), "{wsdl}");
    assert_eq!(soap_address(&wsdl), e.address, "the address Розница posts to");
    assert!(elements.iter().any(|(n, _)| n == "definitions"), "a WSDL: {wsdl}");
    let operations = wsdl.matches("<operation name=\"").count();
    assert_eq!(operations, 16, "{wsdl}");
    for (op, params, ret) in OPERATIONS {
        assert!(wsdl.contains(&format!("<xs:element name=\"{op}\">")), "{op}");
        assert!(
            wsdl.contains(&format!("<xs:element name=\"return\" type=\"{ret}\"")),
            "{op} returns {ret}"
        );
        assert!(
            wsdl.contains(&format!("soapAction=\"{NS}#ДисконтныйСервер:{op}\"")),
            "{op}"
        );
        let order: Vec<String> = params.iter().map(|(p, _)| format!("name=\"{p}\"")).collect();
        let at = wsdl.find(&format!("<xs:element name=\"{op}\">")).unwrap();
        let mut pos = at;
        for p in &order {
            pos += wsdl[pos..]
                .find(p.as_str())
                .unwrap_or_else(|| panic!("{op}: {p} in order"));
        }
    }
    for ty in [
        "ТаблицаПродаж",
        "СтрокаТаблицыПродаж",
        "ТаблицаБонусов",
        "СтрокаТаблицыБонусов",
        "ТаблицаКупонов",
        "СтрокаТаблицыКупонов",
        "РезультатЗапросаОНакоплениях",
        "РезультатЗапросаОБонусах",
        "РезультатЗапросаОБонусахРасширенный",
        "РезультатЗапросаОПоследнейПокупке",
    ] {
        assert!(wsdl.contains(&format!("<xs:complexType name=\"{ty}\">")), "{ty}");
    }
    // a request that is not SOAP is a Client fault, not a crash
    let r = e
        .http
        .post(&e.address)
        .basic_auth(USER, Some(PASSWORD))
        .body("<html>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(texts(&r.text().await.unwrap(), "faultcode"), ["soap:Client"]);
}

#[test]
fn amounts_are_exact_kopecks_and_requests_read_as_1c_writes_them() {
    use kopilka::daemon::discount_server::{kopecks, parse_xml};
    for (text, want) in [
        ("-120.5", Some(-12_050)),
        ("3", Some(300)),
        ("0.01", Some(1)),
        ("1.005", None),
        ("", None),
        ("1e3", None),
    ] {
        assert_eq!(kopecks(text), want, "{text:?}");
    }
    let t = parse_xml(
        "<a:E xmlns:a='x'><a:B><m:Op><m:X xsi:nil=\"true\"/><m:Y>a &amp; b&#1046;</m:Y><m:Z/></m:Op></a:B></a:E>"
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(t.name, "E");
    let op = &t.children[0].children[0];
    assert_eq!(op.name, "Op");
    assert!(op.children[0].nil);
    assert_eq!(op.children[1].text, "a & bЖ");
    assert_eq!(op.children[2].text, "");
    assert!(parse_xml(b"<a><b></a>").is_err());
    assert!(parse_xml(b"<!DOCTYPE a><a/>").is_err());
}

/// With `[onec.odata]`, Розница's card GUID is read from 1C's `Catalog_ИнформационныеКарты`
/// (the Розница 2 OData simulator, `src/sim/onec_odata.rs`, after the same dump): pushes and
/// balance reads reach the customer the polled receipts made, known by the card's number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_odata_a_card_guid_is_the_customer_the_poll_knows() {
    use kopilka::sim::onec_odata::{CARDS, OdataSimBuilder, Val};
    let sim = OdataSimBuilder::new(5)
        .sales(30)
        .customers(4)
        .starting_at(Utc.with_ymd_and_hms(2026, 10, 20, 7, 0, 0).unwrap())
        .start()
        .await
        .expect("sim");
    // this document is not in the base the poll reads, so its push is recorded here (a polled
    // base leaves sales to the poll by default)
    let e = env_with(
        &format!(
            "record_sales = true\n[onec.odata]\nurl = \"{}\"\nuser = \"{}\"\npassword_file = \"odata.pass\"\nmapping = \"roznica2\"\n",
            sim.base_url(),
            sim.user()
        ),
        &[("odata.pass", sim.password())],
        0,
    )
    .await;
    let poller = kopilka::onec::odata::poll::OdataPoller::new(e.cfg.clone()).expect("poller");
    let report = poller
        .poll(
            &e.ledger,
            e.clock.now(),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("poll");
    assert!(report.applied > 0, "{report:?}");
    let before = e.summary().await;
    // a card whose customer the poll made, with points
    let mut chosen = None;
    for key in sim.keys(CARDS) {
        let Some(Val::Str(number)) = sim.entity(CARDS, &key).and_then(|c| c.get("КодКарты").cloned())
        else {
            continue;
        };
        let now = e.clock.now();
        let n = number.clone();
        if let Ok(v) = e.ledger.run(move |l| l.spendable(&n, now)).await
            && v.free > 0
        {
            chosen = Some((key, number, v.free));
            break;
        }
    }
    let (guid, number, free) = chosen.expect("a polled card with points");
    assert_eq!(
        e.extended_balance(&guid).await[0].1,
        free.to_string(),
        "Розница reads the balance of card {number} by its GUID"
    );
    e.push(sales("ЧекККМ", SALE, &[row(&guid, ITEM, ZERO, "1000", "1")]))
        .await;
    let after = e.summary().await;
    assert_eq!(after.customers, before.customers, "no new customer: {after:?}");
    assert_eq!(after.sales_count, before.sales_count + 1);
    let now = e.clock.now();
    let grown = e
        .ledger
        .run(move |l| l.spendable(&number, now))
        .await
        .unwrap()
        .free;
    assert!(grown > free, "{grown} after {free}");
    assert_eq!(e.extended_balance(&guid).await[0].1, grown.to_string());
    // a card 1C does not have: quarantined (still `true`), and a balance of 0
    e.push(sales("ЧекККМ", RETURN, &[row(NEW_CARD, ITEM, ZERO, "10", "1")]))
        .await;
    assert_eq!(e.summary().await.quarantined, after.quarantined + 1);
    assert_eq!(e.extended_balance(NEW_CARD).await[0].1, "0");
    e.verify().await;
}

/// A base whose receipts the OData poll reads: by default a push is answered and not
/// recorded, so the receipt counts once (under the poll's source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_base_leaves_sales_to_the_poll() {
    let e = env_with(
        "[onec.odata]\nurl = \"http://127.0.0.1:9/shop/odata/standard.odata\"\nuser = \"kopilka\"\n\
         password_file = \"odata.pass\"\nmapping = \"roznica2\"\n",
        &[("odata.pass", "x")],
        0,
    )
    .await;
    e.push(sales("ЧекККМ", SALE, &[row(CARD, ITEM, ZERO, "1000", "1")]))
        .await;
    let s = e.summary().await;
    assert_eq!((s.sales_count, s.quarantined), (0, 0), "{s:?}");
}

#[test]
fn bad_settings_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\n[onec.discount_server]\nuser = \"\"\npath = \"ws/x?wsdl\"\n\
             public_url = \"ftp://user:pw@host/ws\"\nvoucher_discount = \"Подарок по купону\"\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let err = config::load(Some(&path), &[]).unwrap_err().to_string();
    for key in [
        "onec.discount_server.user",
        "onec.discount_server.password_file",
        "onec.discount_server.path",
        "onec.discount_server.public_url",
        "onec.discount_server.voucher_discount",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
    assert!(
        !err.contains("pw@"),
        "a password in the URL is never echoed: {err}"
    );
}

/// A kopilka voucher at Розница's till. The cashier types its code; `ПолучитьСкидкиПоКупону`
/// answers one active row of the shop's gift discount (`voucher_discount`) until the voucher's
/// end, as `ДисконтныйСервер.ТаблицаСкидокДляКупона` reads it (DeZargo/1c_retail_apple
/// @ 896da2e1 `CommonModules/ДисконтныйСервер/Ext/Module.bsl` l. 545-590). After the receipt
/// Розница pushes the sale, then the coupons its register moved, state «Применена» (l. 423-475):
/// the voucher with that code is used, once — the one the cashier typed, not the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_code_at_the_till_turns_on_the_shop_s_gift_discount_once() {
    const DISCOUNT: &str = "3f2a8e10-5b1c-11ef-9c5e-0242ac120002";
    const GIFT_RECEIPT: &str = "0b5e8d3a-1111-2222-3333-999955556666";
    let rules = format!(
        "[program]\nreturn_window_days = 0\n[[rules]]\nid = \"base\"\npercent = \"5\"\n\
         [[stamp_cards]]\nid = \"gift\"\nevery = 2\ncount = \"items\"\nreward_product = \"{ITEM2}\"\nreward_valid_days = 30\n"
    );
    let e = env_full(
        "[rules]\npath = \"rules.toml\"\n",
        &format!("voucher_discount = \"{DISCOUNT}\"\n"),
        &[("rules.toml", rules.as_str())],
        0,
    )
    .await;
    // two receipts of two items each: two vouchers for the gift
    e.push(sales("ЧекККМ", SALE, &[row(CARD, ITEM, ZERO, "1000", "2")]))
        .await;
    e.push(sales("ЧекККМ", RETURN, &[row(CARD, ITEM, ZERO, "1000", "2")]))
        .await;
    let vouchers = || async {
        let now = e.clock.now();
        let key = card_key(CARD);
        let mut v = e
            .ledger
            .run(move |l| l.balance(&key, now, Duration::days(14)))
            .await
            .unwrap()
            .vouchers;
        v.reverse(); // oldest first
        v.into_iter()
            .map(|v| (v.code.unwrap(), v.state, v.expires_at))
            .collect::<Vec<_>>()
    };
    let v = vouchers().await;
    assert_eq!(v.len(), 2, "{v:?}");
    let (older, newer) = (v[0].0.clone(), v[1].0.clone());
    assert!(v.iter().all(|x| x.1 == "issued"), "{v:?}");

    let ask = |code: String| {
        let e = &e;
        async move {
            let (status, reply) = e
                .call(
                    "ПолучитьСкидкиПоКупону",
                    envelope(
                        "ПолучитьСкидкиПоКупону",
                        &[
                            param("КодКупона", &code),
                            param("ДатаЗапроса", "2026-11-02T12:15:00"),
                        ],
                    ),
                )
                .await;
            assert_eq!(status, 200, "{reply}");
            reply
        }
    };
    // the cashier types the newer code, in lower case
    let reply = ask(newer.to_lowercase()).await;
    assert_eq!(texts(&reply, "ИдентификаторСкидки"), [DISCOUNT], "{reply}");
    assert_eq!(texts(&reply, "КодКупона"), [newer.as_str()]);
    assert_eq!(texts(&reply, "Состояние"), ["Активна"]);
    assert_eq!(texts(&reply, "ИдентификаторМагазина"), [ZERO]);
    let end = v[1]
        .2
        .unwrap()
        .with_timezone(&chrono_tz::Europe::Moscow)
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    assert_eq!(texts(&reply, "ПериодДействия"), [end]);
    // no code of kopilka's: the empty table 1C reads as "no discounts"
    for other in ["V-ZZZZZZZ", CARD, ""] {
        let reply = ask(other.to_string()).await;
        assert!(texts(&reply, "СтрокиТаблицы").is_empty(), "{other}: {reply}");
    }

    // the receipt: the gift free and a paid item; then the coupons Розница's register moved
    let gift = || {
        sales(
            "ЧекККМ",
            GIFT_RECEIPT,
            &[
                row(CARD, ITEM2, ZERO, "0", "1"),
                row(CARD, VARIANT, ZERO, "300", "1"),
            ],
        )
    };
    // (the gift receipt's own two items earn a third voucher, left aside here)
    let states = || async {
        vouchers()
            .await
            .into_iter()
            .filter(|v| v.0 == older || v.0 == newer)
            .map(|v| (v.0, v.1))
            .collect::<Vec<_>>()
    };
    e.push(gift()).await;
    assert_eq!(
        states().await,
        vec![
            (older.clone(), "used".to_string()),
            (newer.clone(), "issued".to_string())
        ],
        "the sale alone takes the oldest, as a till without codes does"
    );
    let coupons = envelope(
        "ОбновитьДанныеОКупонах",
        &[
            param("ТипДокумента", "ЧекККМ"),
            param("ИдентификаторДокумента", GIFT_RECEIPT),
            param(
                "ТаблицаКупонов",
                &format!(
                    "<m:СтрокиТаблицы><m:Период>2026-11-02T12:16:00</m:Период>\
                     <m:ИдентификаторСкидки>{DISCOUNT}</m:ИдентификаторСкидки><m:КодКупона>{newer}</m:КодКупона>\
                     <m:Состояние>Применена</m:Состояние><m:ИдентификаторМагазина></m:ИдентификаторМагазина>\
                     <m:ПериодДействия>0001-01-01T00:00:00</m:ПериодДействия></m:СтрокиТаблицы>"
                ),
            ),
        ],
    );
    for _ in 0..2 {
        let (status, reply) = e.call("ОбновитьДанныеОКупонах", coupons.clone()).await;
        assert_eq!(
            (status, texts(&reply, "return")),
            (200, vec!["true".to_string()]),
            "{reply}"
        );
    }
    let expected = vec![
        (older.clone(), "issued".to_string()),
        (newer.clone(), "used".to_string()),
    ];
    assert_eq!(
        states().await,
        expected,
        "the typed code is used, the older one open again"
    );
    let reply = ask(newer.clone()).await;
    assert!(texts(&reply, "СтрокиТаблицы").is_empty(), "used: {reply}");
    assert_eq!(texts(&ask(older.clone()).await, "КодКупона"), [older.as_str()]);

    // the receipt sent again, then edited: the till's word stands, no other voucher is taken
    e.push(gift()).await;
    e.push(sales(
        "ЧекККМ",
        GIFT_RECEIPT,
        &[
            row(CARD, ITEM2, ZERO, "0", "1"),
            row(CARD, VARIANT, ZERO, "350", "1"),
        ],
    ))
    .await;
    assert_eq!(states().await, expected);
    e.verify().await;
}
