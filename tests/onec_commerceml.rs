//! The CommerceML reader against real exchange files (`../shared/samples/onec/`), handmade
//! fixtures (`tests/fixtures/onec/`), files the 1C simulator writes, and broken input.

use std::io::{BufReader, Cursor, Write};
use std::str::FromStr;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use kopilka::core::document::{DocKind, Document, DocumentLimits, Incoming, Rejected, VoidReason, validate};
use kopilka::core::identity::{Email, Phone};
use kopilka::core::money::{Money, Points};
use kopilka::onec::commerceml::{FileError, FileInfo, Item, Limits, Options, OrderPolicy, parse};
use kopilka::sim::commerceml::{
    DocState, DocumentsWriter, GenerateSpec, Generated, Generator, Malformed, WriterOptions, XmlEncoding,
    account, generate,
};
use kopilka::sim::sales::{Shop, Truth};

const SAMPLES: [&str; 5] = [
    "1c-sample-orders.xml",
    "1c-sample-import.xml",
    "1c-sample-offers.xml",
    "bitrix-import0_1.xml",
    "bitrix-offers0_1.xml",
];

fn sample_path(name: &str) -> String {
    format!("{}/../shared/samples/onec/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/onec/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn opts() -> Options {
    Options {
        points_requisite: Some("ОплаченоБаллами".into()),
        ..Options::default()
    }
}

fn run(bytes: &[u8], label: &str, opts: &Options) -> (Result<FileInfo, FileError>, Vec<Item>) {
    let mut items = Vec::new();
    let result = parse(Cursor::new(bytes), label, opts, &mut |item| {
        items.push(item);
        Ok(())
    });
    (result, items)
}

fn run_ok(bytes: &[u8], label: &str, opts: &Options) -> (FileInfo, Vec<Item>) {
    let (result, items) = run(bytes, label, opts);
    match result {
        Ok(info) => (info, items),
        Err(e) => panic!("{label}: {e}"),
    }
}

fn documents(items: &[Item]) -> Vec<&Document> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Document(Incoming::Document(d)) => Some(d),
            _ => None,
        })
        .collect()
}

fn rejected(items: &[Item]) -> Vec<&Rejected> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Rejected(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn by_id<'a>(items: &'a [Item], id: &str) -> &'a Item {
    items
        .iter()
        .find(|i| match i {
            Item::Document(inc) => inc.source().doc_id == id,
            Item::Rejected(r) => r.doc_ref == id,
            _ => false,
        })
        .unwrap_or_else(|| panic!("no item {id} in {items:#?}"))
}

fn doc<'a>(items: &'a [Item], id: &str) -> &'a Document {
    match by_id(items, id) {
        Item::Document(Incoming::Document(d)) => d,
        other => panic!("{id} is not a document: {other:?}"),
    }
}

fn rejection<'a>(items: &'a [Item], id: &str) -> &'a Rejected {
    match by_id(items, id) {
        Item::Rejected(r) => r,
        other => panic!("{id} is not rejected: {other:?}"),
    }
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A "now" after every document here, so only the date's lower bound is in play.
fn far_future() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

// ---------------------------------------------------------------------------------------
// Real files

#[test]
fn every_real_sample_parses_whole() {
    for name in SAMPLES {
        let (info, items) = run_ok(&read(&sample_path(name)), name, &opts());
        assert_eq!(info.truncated, None, "{name}");
        assert_eq!(info.rejected, 0, "{name}: {:?}", rejected(&items));
        assert!(info.schema_version.is_some(), "{name}");
        assert!(info.generated_at.is_some(), "{name}");
        assert!(!info.only_changes, "{name}");
    }
}

#[test]
fn the_1c_catalog_sample_yields_its_group_and_products() {
    let (info, items) = run_ok(&read(&sample_path("1c-sample-import.xml")), "import", &opts());
    assert_eq!(info.schema_version.as_deref(), Some("2.04"));
    assert_eq!(info.generated_at, Some(utc("2008-01-09T15:13:34Z")));
    let groups: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Group(g) = i { Some(g) } else { None })
        .collect();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].id, "05e26d6f-01e4-11dc-a411-00055d80a2d1");
    assert_eq!(groups[0].name, "Мебель");
    assert_eq!(groups[0].parent, None);
    let products: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Product(p) = i { Some(p) } else { None })
        .collect();
    assert_eq!(products.len(), 4);
    assert_eq!(
        products[0].id,
        "05e26d70-01e4-11dc-a411-00055d80a2d1#05e26d76-01e4-11dc-a411-00055d80a2d1"
    );
    assert_eq!(products[0].name, "Стол обеденный");
    assert_eq!(products[3].name, "Стулья");
    assert!(products.iter().all(|p| p.groups == vec![groups[0].id.clone()]));
    assert!(
        products
            .iter()
            .all(|p| !p.service && !p.deleted && p.article.is_none())
    );
}

#[test]
fn the_1c_offers_sample_yields_four_price_types_including_purchase() {
    let (_, items) = run_ok(&read(&sample_path("1c-sample-offers.xml")), "offers", &opts());
    let types: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::PriceType(t) = i { Some(t) } else { None })
        .collect();
    let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["Оптовая", "Закупочная", "Плановая", "Розничная"]);
    let purchase = types[1];
    assert_eq!(purchase.id, "bd72d8fc-55bc-11d9-848a-00112f43529a");
    assert_eq!(purchase.currency.as_deref(), Some("USD"));
    assert_eq!(types[3].currency.as_deref(), Some("RUB")); // written `руб`

    let offers: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Offer(o) = i { Some(o) } else { None })
        .collect();
    assert_eq!(offers.len(), 2);
    let first = offers[0];
    assert_eq!(
        first.id,
        "05e26d70-01e4-11dc-a411-00055d80a2d1#05e26d76-01e4-11dc-a411-00055d80a2d1"
    );
    assert_eq!(first.product_id, "05e26d70-01e4-11dc-a411-00055d80a2d1");
    assert_eq!(first.prices.len(), 4);
    let cost = first
        .prices
        .iter()
        .find(|p| p.price_type_id == purchase.id)
        .expect("a purchase price");
    assert_eq!(cost.unit_price, Money(400));
    assert_eq!(cost.currency.as_deref(), Some("USD"));
    assert_eq!(cost.coefficient, Some(Decimal::ONE));
    let retail = first
        .prices
        .iter()
        .find(|p| p.price_type_id == types[3].id)
        .unwrap();
    assert_eq!(
        (retail.unit_price, retail.currency.as_deref()),
        (Money(700), Some("RUB"))
    );
}

#[test]
fn the_bitrix_catalog_with_bom_and_namespace_parses() {
    let bytes = read(&sample_path("bitrix-import0_1.xml"));
    assert!(bytes.starts_with(b"\xEF\xBB\xBF"), "the sample carries a BOM");
    let (info, items) = run_ok(&bytes, "bitrix-import", &opts());
    assert_eq!(info.schema_version.as_deref(), Some("2.07"));
    assert_eq!(info.generated_at, Some(utc("2020-04-07T10:16:06Z"))); // 13:16:06 Moscow
    let groups: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Group(g) = i { Some(g) } else { None })
        .collect();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, "Коврики для дома");
    let products: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Product(p) = i { Some(p) } else { None })
        .collect();
    assert_eq!(products.len(), 36); // 35 `<Товар>` and one `<Товар Статус="Удален">`
    assert_eq!(products[0].id, "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1");
    assert_eq!(products[0].article.as_deref(), Some("PM-421-WP"));
    assert_eq!(
        products[0].name,
        "Портативный коврик Portable 140x200x1 см, Деревянные лошадки"
    );
    assert_eq!(
        products[0].groups,
        vec!["82cfb8dc-18f9-11e7-80c2-0cc47ab29cd1".to_string()]
    );
    // `ВидНоменклатуры` here is a category name, not `Услуга`
    assert!(products.iter().all(|p| !p.service));
    let deleted: Vec<_> = products
        .iter()
        .filter(|p| p.deleted)
        .map(|p| p.article.as_deref())
        .collect();
    assert_eq!(deleted, [Some("KM-245-BC")]);
}

#[test]
fn the_bitrix_offers_with_stock_attributes_parse() {
    let (_, items) = run_ok(
        &read(&sample_path("bitrix-offers0_1.xml")),
        "bitrix-offers",
        &opts(),
    );
    let types: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::PriceType(t) = i { Some(t) } else { None })
        .collect();
    assert_eq!(types.len(), 1);
    assert_eq!(
        (types[0].name.as_str(), types[0].currency.as_deref()),
        ("BASE", Some("RUB"))
    );
    let offers: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Offer(o) = i { Some(o) } else { None })
        .collect();
    assert_eq!(offers.len(), 44);
    assert_eq!(offers[0].id, "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1");
    assert_eq!(offers[0].product_id, offers[0].id);
    assert_eq!(offers[0].prices[0].unit_price, Money(10000));
    assert!(
        offers
            .iter()
            .all(|o| o.prices.len() == 1 && o.prices[0].price_type_id == types[0].id)
    );
}

#[test]
fn the_orders_sample_yields_no_rejections_under_any_policy() {
    let bytes = read(&sample_path("1c-sample-orders.xml"));
    // Ignore (the default): the site order and both 1C replies are orders, so all skipped.
    let (info, items) = run_ok(&bytes, "orders", &opts());
    assert_eq!((info.documents, info.skipped, info.rejected), (0, 3, 0));
    assert!(items.is_empty());

    // Not paid, not finished: the order waits; the replies say posted and not deleted, which
    // voids nothing and holds no goods, so they are skipped rather than quarantined.
    for policy in [OrderPolicy::WhenPaid, OrderPolicy::WhenShipped] {
        let o = Options {
            orders: policy,
            ..opts()
        };
        let (info, _) = run_ok(&bytes, "orders", &o);
        assert_eq!(
            (info.documents, info.skipped, info.rejected),
            (0, 3, 0),
            "{policy:?}"
        );
    }

    let o = Options {
        orders: OrderPolicy::Always,
        ..opts()
    };
    let (info, items) = run_ok(&bytes, "orders", &o);
    assert_eq!((info.documents, info.skipped, info.rejected), (1, 2, 0));
    let d = doc(&items, "36");
    assert_eq!(d.kind, DocKind::Sale);
    assert_eq!(d.total, Money(673447));
    assert_eq!(d.occurred_at, utc("2007-10-30T12:19:27Z"));
    assert_eq!(d.customer.onec_id.as_deref(), Some("1#admin# admin"));
    assert_eq!(d.customer.name.as_deref(), Some("admin"));
    assert_eq!(d.source.stamp, Some(utc("2007-10-30T15:13:34Z").timestamp()));
    assert_eq!(d.lines.len(), 2);
    assert_eq!(d.lines[0].product_id, "ORDER_DELIVERY");
    assert!(d.lines[0].service);
    assert!(!d.lines[1].service);
    assert_eq!(d.lines[1].net, Money(639447));
    assert_eq!(validate(d, &DocumentLimits::default(), far_future()), Ok(()));
}

// ---------------------------------------------------------------------------------------
// Handmade documents

fn handmade() -> (FileInfo, Vec<Item>) {
    let o = Options {
        points_requisite: Some("Оплачено баллами".into()),
        ..Options::default()
    };
    run_ok(
        &read(&fixture_path("sales-2.03-handmade.xml")),
        "handmade.xml",
        &o,
    )
}

#[test]
fn number_spellings_and_moscow_time() {
    let (info, items) = handmade();
    // one-digit hour; Moscow was UTC+4 in 2014
    assert_eq!(info.generated_at, Some(utc("2014-05-31T20:36:33Z")));
    let d = doc(&items, "D1");
    assert_eq!(d.occurred_at, utc("2014-05-31T19:15:00Z"));
    assert_eq!(d.number.as_deref(), Some("ЧК-001"));
    assert_eq!(d.currency, "RUB");
    assert_eq!(d.lines[0].unit_price, Money(23174)); // 231.7400
    assert_eq!(d.lines[0].name, "Кофе \"Арабика\" & чашка");
    assert_eq!(d.lines[1].unit_price, Money(16032)); // 160,316 half away from zero
    assert_eq!(d.lines[1].quantity, dec("1"));
    assert_eq!(d.lines[1].net, Money(16032));
    assert_eq!(d.lines[2].unit_price, Money(123450)); // 1 234,50
    assert_eq!(d.total, Money(185830));
    assert_eq!(validate(d, &DocumentLimits::default(), far_future()), Ok(()));
    // after 26 October 2014 Moscow is UTC+3; no Время means midnight
    assert_eq!(doc(&items, "D12").occurred_at, utc("2014-10-31T21:00:00Z"));
    assert_eq!(doc(&items, "D12").currency, "RUB"); // written 643
}

#[test]
fn date_only_generation_date() {
    let xml = "<КоммерческаяИнформация ВерсияСхемы=\"2.10\" ДатаФормирования=\"2014-06-01\"/>";
    let (info, items) = run_ok(xml.as_bytes(), "empty.xml", &opts());
    assert_eq!(info.generated_at, Some(utc("2014-05-31T20:00:00Z")));
    assert_eq!(info.schema_version.as_deref(), Some("2.10"));
    assert!(items.is_empty());
}

#[test]
fn the_buyer_is_the_customer_with_normalised_keys() {
    let (_, items) = handmade();
    let c = &doc(&items, "D1").customer;
    assert_eq!(c.onec_id.as_deref(), Some("1#admin# admin"));
    assert_eq!(c.name.as_deref(), Some("Иван Петров"));
    // the first phone contact is free text; the first one that is a number wins
    assert_eq!(c.phone, Phone::parse("+79123456789"));
    assert_eq!(c.email, Email::parse("ivan.petrov@example.ru"));
    assert_eq!(c.card.as_deref(), Some("200000000042"));
    assert_eq!(doc(&items, "D1").source.doc_id, "D1"); // trimmed
    assert!(doc(&items, "D3").customer.is_empty(), "anonymous return");
}

#[test]
fn discounts_are_subtracted_once_and_spread_to_the_kopeck() {
    let (_, items) = handmade();
    let d = doc(&items, "D2");
    let nets: Vec<i64> = d.lines.iter().map(|l| l.net.0).collect();
    let discounts: Vec<i64> = d.lines.iter().map(|l| l.discount.0).collect();
    // line 1: 300.00 with 30.00 not included → 270.00; line 2: no Сумма, 2 × 50 less an
    // included 10 % → 90.00; delivery 340.00. Then 10.00 off the document, by net:
    // 385 + 128 + 485 kopecks, the 2 left over to the largest line.
    assert_eq!(nets, [26615, 8872, 33513]);
    assert_eq!(discounts, [3000 + 385, 1000 + 128, 487]);
    assert_eq!(d.total, Money(69000)); // stated 700.00 was before that discount
    assert_eq!(d.lines.iter().map(|l| l.net.0).sum::<i64>(), d.total.0);
    assert!(d.lines[2].service, "ORDER_DELIVERY is a service");
    assert_eq!(validate(d, &DocumentLimits::default(), far_future()), Ok(()));
}

#[test]
fn returns_carry_their_base_document() {
    let (_, items) = handmade();
    let r = doc(&items, "D3");
    assert_eq!(r.kind, DocKind::Return);
    assert_eq!(r.original.as_deref(), Some("D1"));
    assert_eq!(r.total, Money(23174));

    let o = Options {
        return_link_requisite: Some("ДокументОснование".into()),
        ..opts()
    };
    let xml = r#"<КоммерческаяИнформация ВерсияСхемы="2.08"><Документ><Ид>R1</Ид><Дата>2026-01-10</Дата>
        <ХозОперация>Возврат товара</ХозОперация><Валюта>руб</Валюта><Сумма>1</Сумма>
        <Товары><Товар><Ид>P</Ид><Количество>1</Количество><Сумма>1</Сумма></Товар></Товары>
        <ЗначенияРеквизитов><ЗначениеРеквизита><Наименование>ДокументОснование</Наименование>
        <Значение>ЧК-77</Значение></ЗначениеРеквизита></ЗначенияРеквизитов></Документ></КоммерческаяИнформация>"#;
    let (_, items) = run_ok(xml.as_bytes(), "r.xml", &o);
    assert_eq!(doc(&items, "R1").original.as_deref(), Some("ЧК-77"));
}

#[test]
fn broken_documents_are_rejected_with_reasons_and_the_rest_continues() {
    let (info, items) = handmade();
    assert_eq!(info.truncated, None);
    assert_eq!(info.skipped, 1, "the invoice D4");
    let r = rejection(&items, "D5");
    assert!(r.reason.contains("unknown currency \"тугрик\""), "{}", r.reason);
    assert_eq!(r.system, "onec");
    assert!(r.location.as_deref().unwrap().starts_with("handmade.xml byte "));

    let r = rejection(&items, "D6");
    assert!(r.reason.contains("line 2 (P-2)"), "{}", r.reason);
    assert!(
        r.reason.contains("Количество \"два\" is not a number"),
        "{}",
        r.reason
    );
    let excerpt = r.excerpt.as_deref().unwrap();
    assert!(excerpt.contains("D6") && excerpt.contains("два"), "{excerpt}");

    // no Ид: referred to by file and offset, which is also where it is
    let no_id: Vec<_> = rejected(&items)
        .into_iter()
        .filter(|r| r.doc_ref.starts_with("handmade.xml@"))
        .collect();
    assert_eq!(no_id.len(), 1);
    assert!(no_id[0].reason.contains("no Ид"));
    let offset = no_id[0].doc_ref.trim_start_matches("handmade.xml@");
    assert_eq!(
        no_id[0].location.as_deref(),
        Some(format!("handmade.xml byte {offset}").as_str())
    );
    let bytes = read(&fixture_path("sales-2.03-handmade.xml"));
    let at: usize = offset.parse().unwrap();
    assert!(bytes[at..].starts_with("<Документ>".as_bytes()));
    assert!(no_id[0].excerpt.as_deref().unwrap().contains("ЧК-007"));

    let r = rejection(&items, "D10");
    assert!(r.reason.contains("whole number of points"), "{}", r.reason);
    let r = rejection(&items, "D11");
    assert!(
        r.reason.contains("Дата \"2014-06-31\" is not a date"),
        "{}",
        r.reason
    );
    assert_eq!(info.rejected, 5);
    assert_eq!(doc(&items, "D9").points_redeemed, Points(15));
}

#[test]
fn unposted_deleted_and_cancelled_documents_are_voids() {
    let (_, items) = handmade();
    let Item::Document(Incoming::Void { source, reason }) = by_id(&items, "D8") else {
        panic!("D8 should be a void");
    };
    assert_eq!(*reason, VoidReason::Unposted);
    assert!(source.version.ends_with(":unposted"), "{}", source.version);
    assert_eq!(source.stamp, Some(utc("2014-05-31T20:36:33Z").timestamp()));

    let bytes = read(&fixture_path("orders-replies.xml"));
    let o = Options {
        orders: OrderPolicy::WhenPaid,
        ..opts()
    };
    let (info, items) = run_ok(&bytes, "replies.xml", &o);
    let void = |id: &str| match by_id(&items, id) {
        Item::Document(Incoming::Void { source, reason }) => (source.version.clone(), *reason),
        other => panic!("{id}: {other:?}"),
    };
    // a reply holding only requisites: deletion mark wins over unposted
    assert_eq!(void("92").1, VoidReason::DeletionMarked);
    assert_eq!(void("93").1, VoidReason::Unposted);
    assert_eq!(void("97").1, VoidReason::Cancelled);
    assert_eq!(doc(&items, "95").total, Money(50000)); // paid
    // 94: posted reply, nothing to void; 96: finished but not paid
    assert_eq!((info.documents, info.skipped, info.rejected), (4, 2, 0));

    // the same void read again is the same version; another reason is another version
    let (_, again) = run_ok(&bytes, "replies.xml", &o);
    assert_eq!(items, again);
    assert_ne!(void("92").0.split(':').nth(1), None);
    assert_ne!(void("92").0, void("93").0);

    let shipped = Options {
        orders: OrderPolicy::WhenShipped,
        ..opts()
    };
    let (_, items) = run_ok(&bytes, "replies.xml", &shipped);
    assert_eq!(
        documents(&items)
            .iter()
            .map(|d| d.source.doc_id.as_str())
            .collect::<Vec<_>>(),
        ["96"]
    );
}

#[test]
fn a_windows_1251_file_decodes() {
    let bytes = read(&fixture_path("sale-windows-1251.xml"));
    assert!(std::str::from_utf8(&bytes).is_err(), "the fixture is not UTF-8");
    let (info, items) = run_ok(&bytes, "cp1251.xml", &opts());
    assert_eq!(info.generated_at, Some(utc("2016-03-01T06:05:00Z")));
    let d = doc(&items, "c7d1e6a2-0001");
    assert_eq!(d.number.as_deref(), Some("ЧК-0001"));
    assert_eq!(d.lines[0].name, "Чай «Эрл Грей» №5");
    assert_eq!(d.customer.name.as_deref(), Some("Ёлкина Мария Сергеевна"));
    assert_eq!(d.customer.email, Email::parse("maria@пример.рф"));
    assert_eq!(d.customer.phone, Phone::parse("+74951234567"));
    assert_eq!(d.total, Money(149990));
    assert_eq!(d.occurred_at, utc("2016-03-01T06:00:00Z"));
}

// ---------------------------------------------------------------------------------------
// Files the simulator writes

fn shop() -> Shop {
    Shop::generate(7, 60, 40)
}

fn writer_opts(encoding: XmlEncoding) -> WriterOptions {
    WriterOptions {
        encoding,
        ..WriterOptions::default()
    }
}

/// A sale or return as the parser must give it back: catalog data (category, cost) and the
/// store are not in CommerceML documents.
fn as_read(d: &Document, stamp: Option<i64>) -> Document {
    let mut d = d.clone();
    for l in &mut d.lines {
        l.category = None;
        l.unit_cost = None;
    }
    d.store = None;
    // CommerceML documents carry no birthday, referral or invite code
    d.customer.birthday = None;
    d.customer.referred_by = None;
    d.customer.invite_code = None;
    d.source.stamp = stamp;
    d.source.version = kopilka::core::document::content_version(&d);
    d
}

fn check_round_trip(encoding: XmlEncoding, schema: &str) {
    let shop = shop();
    let spec = GenerateSpec {
        seed: 42,
        sales: 3_000,
        returns: 40,
        malformed: 3,
        lines: 4,
    };
    let wopts = WriterOptions {
        schema_version: schema.into(),
        ..writer_opts(encoding)
    };
    let stamp = Some(wopts.generated_at.timestamp());
    let (truth, bytes) = generate(&shop, spec, wopts, Vec::new()).unwrap();
    assert_eq!((truth.sales, truth.returns, truth.malformed), (3_000, 40, 3));
    match encoding {
        XmlEncoding::Utf8Bom => assert!(bytes.starts_with(b"\xEF\xBB\xBF<?xml")),
        XmlEncoding::Windows1251 => {
            assert!(bytes.starts_with(b"<?xml version=\"1.0\" encoding=\"windows-1251\"?>"));
            assert!(std::str::from_utf8(&bytes).is_err());
        }
        XmlEncoding::Utf8 => assert!(std::str::from_utf8(&bytes).is_ok()),
    }

    let (info, items) = run_ok(&bytes, "generated.xml", &opts());
    assert_eq!(info.truncated, None);
    let limits = DocumentLimits::default();
    let mut got = Truth::default();
    let mut refused = Vec::new();
    for item in &items {
        match item {
            Item::Document(Incoming::Document(d)) => match validate(d, &limits, far_future()) {
                Ok(()) if d.kind == DocKind::Sale => {
                    got.sales += 1;
                    got.net_total += d.total.0;
                }
                Ok(()) => {
                    got.returns += 1;
                    got.net_total -= d.total.0;
                    assert!(d.original.is_some(), "return {} has no base", d.source.doc_id);
                }
                Err(why) => refused.push(why.0.clone()),
            },
            Item::Rejected(r) => {
                assert!(!r.reason.is_empty() && r.location.is_some());
                got.malformed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got.malformed += refused.len() as i64;
    assert_eq!(
        (got.sales, got.returns, got.net_total, got.malformed),
        (truth.sales, truth.returns, truth.net_total, truth.malformed),
        "refused: {refused:?}"
    );

    // and document by document, exactly what was written
    let mut read_back = items.iter();
    for entry in Generator::new(&shop, spec) {
        let item = read_back.next().expect("as many items as entries");
        match (&entry, item) {
            (Generated::Document(written), Item::Document(Incoming::Document(read))) => {
                assert_eq!(read, &as_read(written, stamp));
            }
            (Generated::Malformed(written, kind), item) => match (kind.unreadable(), item) {
                (true, Item::Rejected(r)) => {
                    if *kind != Malformed::MissingId {
                        assert_eq!(r.doc_ref, written.source.doc_id);
                    }
                }
                (false, Item::Document(Incoming::Document(d))) => {
                    assert!(
                        validate(d, &limits, far_future()).is_err(),
                        "{kind:?} should be refused"
                    );
                }
                other => panic!("{kind:?} came back as {other:?}"),
            },
            other => panic!("mismatch: {other:?}"),
        }
    }
    assert!(read_back.next().is_none());
}

#[test]
fn round_trip_utf8() {
    check_round_trip(XmlEncoding::Utf8, "2.08");
}

#[test]
fn round_trip_windows_1251() {
    check_round_trip(XmlEncoding::Windows1251, "2.04");
}

#[test]
fn round_trip_utf8_with_bom() {
    check_round_trip(XmlEncoding::Utf8Bom, "2.10");
}

#[test]
fn voids_written_by_the_simulator_read_back_as_voids() {
    let shop = shop();
    let mut rng = fastrand::Rng::with_seed(1);
    let sale = shop.sale(&mut rng, 1, 2, Some(3), 0);
    let mut w = DocumentsWriter::new(Vec::new(), writer_opts(XmlEncoding::Utf8)).unwrap();
    w.document(&sale).unwrap();
    w.document_with_state(&sale, DocState::Unposted).unwrap();
    w.document_with_state(&sale, DocState::DeletionMarked).unwrap();
    w.incoming(&Incoming::Void {
        source: sale.source.clone(),
        reason: VoidReason::Cancelled,
    })
    .unwrap();
    let bytes = w.finish().unwrap();
    let (info, items) = run_ok(&bytes, "voids.xml", &opts());
    assert_eq!(info.documents, 4);
    let reasons: Vec<_> = items
        .iter()
        .filter_map(|i| match i {
            Item::Document(Incoming::Void { source, reason }) => {
                assert_eq!(source.doc_id, sale.source.doc_id);
                Some(*reason)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            VoidReason::Unposted,
            VoidReason::DeletionMarked,
            VoidReason::Cancelled
        ]
    );
    // a whole unposted document's void version is the content version plus the reason
    let Item::Document(Incoming::Document(posted)) = &items[0] else {
        panic!()
    };
    let Item::Document(Incoming::Void { source, .. }) = &items[1] else {
        panic!()
    };
    assert_eq!(source.version, format!("{}:unposted", posted.source.version));
}

// ---------------------------------------------------------------------------------------
// Hostile and broken input

#[test]
fn a_dtd_is_refused() {
    let bytes = read(&fixture_path("dtd-billion-laughs.xml"));
    let (result, items) = run(&bytes, "laughs.xml", &opts());
    let err = result.unwrap_err();
    assert!(matches!(err, FileError::Dtd { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("laughs.xml: document type declaration"), "{msg}");
    assert!(msg.contains(&format!("byte {}", err.offset())));
    assert!(items.is_empty());
}

#[test]
fn files_that_are_not_commerceml_are_errors() {
    let check = |bytes: &[u8], what: &str| {
        let (result, items) = run(bytes, "x.xml", &opts());
        let err = result.expect_err(what);
        assert!(items.is_empty());
        assert!(err.to_string().starts_with("x.xml: "), "{err}");
        err
    };
    assert!(matches!(check(b"", "empty"), FileError::NotXml { .. }));
    assert!(matches!(check(b"{\"a\": 1}", "json"), FileError::NotXml { .. }));
    assert!(matches!(
        check(b"\x00\x01\x02\xff", "binary"),
        FileError::NotXml { .. }
    ));
    let err = check(b"<?xml version=\"1.0\"?>\n<html><body>502</body></html>", "html");
    assert!(
        matches!(&err, FileError::WrongRoot { found, offset: 22, .. } if found == "html"),
        "{err}"
    );
    assert!(matches!(
        check(b"<a><b></a>", "mismatched"),
        FileError::WrongRoot { .. }
    ));
    assert!(matches!(check(b"<\xD0", "cut"), FileError::NotXml { .. }));
}

#[test]
fn a_consumer_error_stops_reading() {
    let bytes = read(&fixture_path("sales-2.03-handmade.xml"));
    let mut seen = 0;
    let err = parse(Cursor::new(&bytes), "h.xml", &opts(), &mut |_| {
        seen += 1;
        if seen == 2 {
            Err("disk full".into())
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(
        matches!(&err, FileError::Stopped { message, .. } if message == "disk full"),
        "{err}"
    );
    assert_eq!(seen, 2);
}

fn sale_xml(id: &str, extra: &str) -> String {
    format!(
        "<Документ><Ид>{id}</Ид><Дата>2026-01-10</Дата><ХозОперация>Отпуск товара</ХозОперация>\
         <Валюта>руб</Валюта><Сумма>1.00</Сумма>{extra}<Товары><Товар><Ид>P</Ид><Количество>1</Количество>\
         <Сумма>1.00</Сумма></Товар></Товары></Документ>\n"
    )
}

fn file_of(docs: &[String]) -> Vec<u8> {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация ВерсияСхемы=\"2.08\">\n",
    );
    for d in docs {
        s.push_str(d);
    }
    s.push_str("</КоммерческаяИнформация>\n");
    s.into_bytes()
}

#[test]
fn nesting_deeper_than_the_limit_rejects_only_its_document() {
    let deep = format!("{}{}", "<x>".repeat(100), "</x>".repeat(100));
    let bytes = file_of(&[sale_xml("A", ""), sale_xml("B", &deep), sale_xml("C", "")]);
    let (info, items) = run_ok(&bytes, "deep.xml", &opts());
    assert_eq!(
        (documents(&items).len(), info.rejected, info.truncated),
        (2, 1, None)
    );
    let reason = &rejection(&items, "B").reason;
    assert!(reason.contains("deeper than 64"), "{reason}");

    let o = Options {
        limits: Limits {
            max_depth: 200,
            ..Limits::default()
        },
        ..opts()
    };
    let (info, items) = run_ok(&bytes, "deep.xml", &o);
    assert_eq!((documents(&items).len(), info.truncated), (3, None));
}

#[test]
fn text_longer_than_the_limit_rejects_its_document() {
    let o = Options {
        limits: Limits {
            max_text_bytes: 1024,
            ..Limits::default()
        },
        ..opts()
    };
    let long = format!("<Комментарий>{}</Комментарий>", "ж".repeat(600));
    let bytes = file_of(&[sale_xml("A", ""), sale_xml("B", &long), sale_xml("C", "")]);
    let (info, items) = run_ok(&bytes, "long.xml", &o);
    assert_eq!(info.truncated, None);
    assert_eq!(documents(&items).len(), 2);
    let r = rejection(&items, "B");
    assert!(
        r.reason
            .contains("text of <Комментарий> is longer than 1024 bytes"),
        "{}",
        r.reason
    );

    // a text run far past the limit is not even buffered: its document is refused and
    // reading goes on after it
    let huge = format!("<Комментарий>{}</Комментарий>", "a".repeat(300_000));
    let bytes = file_of(&[sale_xml("A", ""), sale_xml("B", &huge), sale_xml("C", "")]);
    let (info, items) = run_ok(&bytes, "huge.xml", &o);
    assert_eq!((documents(&items).len(), info.truncated), (2, None));
    let reason = &rejection(&items, "B").reason;
    assert!(reason.contains("longer than"), "{reason}");
}

#[test]
fn more_lines_than_the_limit_rejects_only_that_document() {
    let o = Options {
        limits: Limits {
            max_lines_per_document: 5,
            ..Limits::default()
        },
        ..opts()
    };
    let line = "<Товар><Ид>P</Ид><Количество>1</Количество><Сумма>0</Сумма></Товар>";
    let many = format!("<Товары>{}</Товары>", line.repeat(6));
    let bytes = file_of(&[sale_xml("A", ""), sale_xml("B", &many), sale_xml("C", "")]);
    let (info, items) = run_ok(&bytes, "lines.xml", &o);
    assert_eq!((info.documents, info.rejected, info.truncated), (2, 1, None));
    assert!(rejection(&items, "B").reason.contains("more than 5 lines"));
}

#[test]
fn more_attributes_than_the_limit_rejects_the_entry() {
    let o = Options {
        limits: Limits {
            max_attributes: 4,
            ..Limits::default()
        },
        ..opts()
    };
    let attrs = "<Склад a=\"1\" b=\"2\" c=\"3\" d=\"4\" e=\"5\"/>";
    let bytes = file_of(&[sale_xml("A", attrs), sale_xml("B", "<Склад a=\"1\"/>")]);
    let (info, items) = run_ok(&bytes, "attrs.xml", &o);
    assert_eq!((info.documents, info.rejected), (1, 1));
    assert!(rejection(&items, "A").reason.contains("more than 4 attributes"));
}

#[test]
fn a_truncated_file_yields_every_whole_document_before_the_cut() {
    let shop = shop();
    let spec = GenerateSpec {
        seed: 9,
        sales: 12,
        returns: 3,
        malformed: 0,
        lines: 3,
    };
    let (_, bytes) = generate(&shop, spec, writer_opts(XmlEncoding::Utf8), Vec::new()).unwrap();
    let close = "</Документ>".as_bytes();
    let root = "<КоммерческаяИнформация".as_bytes();
    let root_start = bytes.windows(root.len()).position(|w| w == root).unwrap();
    let root_end = root_start + bytes[root_start..].iter().position(|&b| b == b'>').unwrap();
    let ends: Vec<usize> = bytes
        .windows(close.len())
        .enumerate()
        .filter(|(_, w)| *w == close)
        .map(|(i, _)| i + close.len())
        .collect();
    assert_eq!(ends.len(), 15);
    let complete = bytes.len() - 1; // everything but the final newline
    for cut in (0..bytes.len()).step_by(7).chain([complete, root_end + 1]) {
        let (result, items) = run(&bytes[..cut], "cut.xml", &opts());
        if cut <= root_end {
            assert!(result.is_err(), "cut at {cut} is before the root opens");
            continue;
        }
        let info = result.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let whole = ends.iter().filter(|&&e| e <= cut).count();
        assert_eq!(info.documents, whole, "cut at {cut}");
        // the document the cut falls in is quarantined, not lost
        assert!(info.rejected <= 1, "cut at {cut}: {items:?}");
        assert_eq!(items.len(), whole + info.rejected, "cut at {cut}");
        if let Some(Item::Rejected(r)) = items.last() {
            assert!(
                r.reason.contains("inside this entry"),
                "cut at {cut}: {}",
                r.reason
            );
        }
        assert_eq!(
            info.truncated.is_some(),
            cut < complete,
            "cut at {cut}: {:?}",
            info.truncated
        );
    }
}

/// Applies one random edit: a bit flip, a deletion, an insertion, a duplication or a cut.
fn mutate(rng: &mut fastrand::Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(b'<');
        return;
    }
    let at = rng.usize(0..bytes.len());
    match rng.u8(0..6) {
        0 => bytes[at] ^= 1 << rng.u8(0..8),
        1 => {
            let end = (at + rng.usize(1..32)).min(bytes.len());
            bytes.drain(at..end);
        }
        2 => {
            const NASTY: &[&[u8]] = &[
                b"<",
                b">",
                b"&",
                b"&#0;",
                b"&#xD800;",
                b"&bogus;",
                b"\"",
                b"/>",
                b"<!DOCTYPE x>",
                b"<![CDATA[",
                b"]]>",
                b"\xD0",
                b"\xFF\xFE",
                b"<!--",
                b"<?x?>",
                b"</\xD0\x94>",
                b"\xEF\xBB\xBF",
                b"=\"",
                b"99999999999999999999999999999",
            ];
            let piece = NASTY[rng.usize(0..NASTY.len())];
            bytes.splice(at..at, piece.iter().copied());
        }
        3 => {
            let end = (at + rng.usize(1..64)).min(bytes.len());
            let copy = bytes[at..end].to_vec();
            let to = rng.usize(0..bytes.len());
            bytes.splice(to..to, copy);
        }
        4 => bytes.truncate(at),
        _ => bytes[at] = rng.u8(..),
    }
}

#[test]
fn random_edits_never_panic() {
    let shop = shop();
    let spec = GenerateSpec {
        seed: 5,
        sales: 20,
        returns: 3,
        malformed: 6,
        lines: 3,
    };
    let mut inputs: Vec<Vec<u8>> = SAMPLES.iter().map(|s| read(&sample_path(s))).collect();
    for name in [
        "sales-2.03-handmade.xml",
        "orders-replies.xml",
        "sale-windows-1251.xml",
    ] {
        inputs.push(read(&fixture_path(name)));
    }
    for encoding in [XmlEncoding::Utf8, XmlEncoding::Windows1251] {
        inputs.push(
            generate(&shop, spec, writer_opts(encoding), Vec::new())
                .unwrap()
                .1,
        );
    }
    let tight = Options {
        orders: OrderPolicy::Always,
        limits: Limits {
            max_depth: 8,
            max_text_bytes: 64,
            max_lines_per_document: 2,
            max_attributes: 2,
        },
        ..opts()
    };
    // KOPILKA_CML_MUTATIONS and KOPILKA_CML_SEED run it longer or elsewhere
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("KOPILKA_CML_MUTATIONS").unwrap_or(4_000) as usize;
    let seed = env("KOPILKA_CML_SEED").unwrap_or(0xC0FFEE);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut ok, mut cut, mut err) = (0, 0, 0);
    for case in 0..cases {
        let input = &inputs[case % inputs.len()];
        let mut bytes = input.clone();
        for _ in 0..rng.usize(1..5) {
            mutate(&mut rng, &mut bytes);
        }
        let o = if case % 3 == 0 { &tight } else { &opts() };
        let outcome = std::panic::catch_unwind(|| run(&bytes, "mutant.xml", o));
        match outcome {
            Ok((Ok(info), _)) if info.truncated.is_some() => cut += 1,
            Ok((Ok(_), _)) => ok += 1,
            Ok((Err(e), _)) => {
                assert!(e.to_string().starts_with("mutant.xml: "));
                err += 1
            }
            Err(_) => {
                let path = std::env::temp_dir().join(format!("kopilka-cml-mutant-{case}.xml"));
                let _ = std::fs::write(&path, &bytes);
                panic!(
                    "seed {seed} case {case} panicked; input saved to {}",
                    path.display()
                );
            }
        }
    }
    assert_eq!(ok + cut + err, cases);
    assert!(ok > 0 && cut > 0 && err > 0, "ok {ok}, cut {cut}, err {err}");
}

// ---------------------------------------------------------------------------------------
// Throughput

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Generates a file of `KOPILKA_CML_BENCH_MB` megabytes (default 4) on disk and parses it
/// from a buffered file reader, checking the counts and printing speed and peak memory.
#[test]
fn throughput_on_a_generated_file() {
    let mb: u64 = std::env::var("KOPILKA_CML_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let shop = shop();
    // about 4.5 KB per document at up to 4 lines
    let sales = (mb * 1_000_000 / 4_500) as usize;
    let spec = GenerateSpec {
        seed: 77,
        sales,
        returns: sales / 50,
        malformed: 10,
        lines: 4,
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    let (truth, out) = generate(
        &shop,
        spec,
        writer_opts(XmlEncoding::Utf8),
        std::io::BufWriter::new(file.reopen().unwrap()),
    )
    .unwrap();
    out.into_inner().unwrap().flush().unwrap();
    let generated_in = started.elapsed();
    let size = std::fs::metadata(file.path()).unwrap().len();

    // forget the generator's peak so that VmHWM shows the parser's
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let mut got = Truth::default();
    let info = parse(
        BufReader::with_capacity(64 * 1024, std::fs::File::open(file.path()).unwrap()),
        "bench.xml",
        &opts(),
        &mut |item| {
            match item {
                Item::Document(Incoming::Document(d))
                    if validate(&d, &DocumentLimits::default(), far_future()).is_ok() =>
                {
                    account(&mut got, &Generated::Document(d))
                }
                Item::Document(_) | Item::Rejected(_) => got.malformed += 1,
                _ => {}
            }
            Ok(())
        },
    )
    .unwrap();
    let parsed_in = started.elapsed().as_secs_f64();
    let rss_after = peak_rss_kib();
    assert_eq!(info.truncated, None);
    assert_eq!(
        (got.sales, got.returns, got.net_total, got.malformed),
        (truth.sales, truth.returns, truth.net_total, truth.malformed)
    );
    let docs = info.documents + info.rejected;
    println!(
        "commerceml: {:.1} MB, {docs} documents (generated in {:.1} s); parsed in {parsed_in:.2} s = \
         {:.1} MB/s, {:.0} documents/s; VmHWM {rss_before:?} KiB before, {rss_after:?} KiB after",
        size as f64 / 1e6,
        generated_in.as_secs_f64(),
        size as f64 / 1e6 / parsed_in,
        docs as f64 / parsed_in,
    );
}

#[test]
fn moscow_local_times_become_utc_instants() {
    // Дата + Время in Moscow (UTC+3 since 2014) → UTC, for a sale written by the simulator
    let shop = shop();
    let mut rng = fastrand::Rng::with_seed(3);
    let mut sale = shop.sale(&mut rng, 5, 1, None, 0);
    sale.occurred_at = Utc.with_ymd_and_hms(2026, 3, 29, 0, 30, 0).unwrap();
    let mut w = DocumentsWriter::new(Vec::new(), writer_opts(XmlEncoding::Utf8)).unwrap();
    w.document(&sale).unwrap();
    let bytes = w.finish().unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(text.contains("<Дата>2026-03-29</Дата>") && text.contains("<Время>03:30:00</Время>"));
    let (_, items) = run_ok(&bytes, "msk.xml", &opts());
    assert_eq!(documents(&items)[0].occurred_at, sale.occurred_at);
}

#[test]
fn nested_groups_deltas_and_offers() {
    let bytes = read(&fixture_path("catalog-nested-groups.xml"));
    let (info, items) = run_ok(&bytes, "catalog.xml", &opts());
    assert!(info.only_changes);
    assert_eq!(info.schema_version.as_deref(), Some("2.10"));
    let groups: Vec<(&str, Option<&str>)> = items
        .iter()
        .filter_map(|i| match i {
            Item::Group(g) => Some((g.id.as_str(), g.parent.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("g-beans", Some("g-coffee")),
            ("g-coffee", Some("g-food")),
            ("g-green", Some("g-tea")), // waited for Чай's Ид
            ("g-tea", Some("g-food")),
            ("g-food", None),
        ]
    );
    let no_id = rejected(&items);
    assert_eq!(no_id.len(), 2, "{no_id:?}");
    assert!(no_id[0].reason.contains("group without Ид"));
    assert!(no_id[0].excerpt.as_deref().unwrap().contains("Без Ид"));
    assert!(
        no_id[1]
            .reason
            .contains("ЦенаЗаЕдиницу \"по запросу\" is not a number"),
        "{}",
        no_id[1].reason
    );
    assert_eq!(no_id[1].doc_ref, "p-2");

    let products: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Product(p) = i { Some(p) } else { None })
        .collect();
    assert_eq!(products.len(), 3);
    assert_eq!(products[0].groups, ["g-beans"]);
    assert_eq!(products[0].article.as_deref(), Some("K-1"));
    assert!(products[1].service && !products[0].service);
    assert!(products[2].deleted && !products[0].deleted);

    let types: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::PriceType(t) = i { Some(t) } else { None })
        .collect();
    assert_eq!(types.len(), 2);
    assert_eq!(types[1].currency.as_deref(), Some("RUB")); // `руб.`
    let offers: Vec<_> = items
        .iter()
        .filter_map(|i| if let Item::Offer(o) = i { Some(o) } else { None })
        .collect();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].product_id, "p-1");
    assert_eq!(offers[0].prices[0].unit_price, Money(189000));
    assert_eq!(offers[0].prices[1].unit_price, Money(104355));
    assert_eq!(offers[0].prices[1].coefficient, None);
}

#[test]
fn the_card_comes_from_the_configured_requisite_then_the_usual_names() {
    let with = |requisites: &[(&str, &str)]| {
        let mut x = String::from("<ЗначенияРеквизитов>");
        for (name, value) in requisites {
            x.push_str(&format!(
                "<ЗначениеРеквизита><Наименование>{name}</Наименование><Значение>{value}</Значение></ЗначениеРеквизита>"
            ));
        }
        x.push_str("</ЗначенияРеквизитов>");
        sale_xml("A", &x)
    };
    let o = Options {
        card_requisite: Some("Бонусная карта".into()),
        ..opts()
    };
    let card = |requisites: &[(&str, &str)]| {
        let (_, items) = run_ok(&file_of(&[with(requisites)]), "card.xml", &o);
        doc(&items, "A").customer.card.clone()
    };
    assert_eq!(card(&[("Бонусная карта", "ab-12 34")]), Some("AB1234".into()));
    assert_eq!(
        card(&[("Карта лояльности", "77"), ("БонуснаяКарта", "88")]),
        Some("88".into())
    );
    assert_eq!(card(&[("НомерКарты", "77")]), Some("77".into()));
    assert_eq!(
        card(&[("Бонусная карта", " "), ("ДисконтнаяКарта", "99")]),
        Some("99".into())
    );
    assert_eq!(card(&[("Комментарий", "карта 5")]), None);
}
