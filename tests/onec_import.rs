//! Importing CommerceML files into the ledger, end to end: generated files with known
//! totals in both encodings, the real samples, versions and returns, the exchange folder,
//! costs from the catalog, and opening balances from a spreadsheet.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{Duration, TimeZone, Utc};
use kopilka::config::{self, Config};
use kopilka::core::document::Document;
use kopilka::ledger::{DateRange, Ledger, OpenOptions};
use kopilka::onec::import::{ImportSettings, import_path};
use kopilka::sim::commerceml::{
    DocState, DocumentsWriter, GenerateSpec, WriterOptions, XmlEncoding, generate,
};
use kopilka::sim::sales::Shop;

fn samples() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples/onec"))
}

struct Env {
    dir: tempfile::TempDir,
    cfg: Config,
    ledger: Ledger,
}

fn env(extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    let text = format!(
        "[ledger]\npath = \"{}\"\n[onec]\npoints_requisite = \"ОплаченоБаллами\"\n{extra}\n",
        dir.path().join("k.db").display()
    );
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = config::load(Some(&cfg_path), &[]).unwrap_or_else(|e| panic!("{e}"));
    let ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    Env { dir, cfg, ledger }
}

impl Env {
    fn import(&mut self, path: &Path) -> kopilka::onec::import::FileReport {
        let settings = ImportSettings::from_config(&self.cfg);
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        import_path(&mut self.ledger, path, &settings, &self.cfg, now).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A file of 3,000 three-line sales of 300 customers, for imports in several batches.
    fn three_thousand_sales(&self, seed: u64) -> (kopilka::sim::sales::Truth, PathBuf) {
        let shop = Shop::generate(3, 300, 500);
        let spec = GenerateSpec {
            seed,
            sales: 3_000,
            returns: 0,
            malformed: 0,
            lines: 3,
        };
        let (truth, bytes) = generate(&shop, spec, WriterOptions::default(), Vec::new()).unwrap();
        (truth, self.write("documents.xml", &bytes))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn summary(&self) -> kopilka::ledger::Summary {
        self.ledger
            .summary(
                &DateRange::default(),
                Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap(),
            )
            .unwrap()
    }

    fn verified(&self) {
        let v = self.ledger.verify().unwrap();
        assert!(v.is_empty(), "{v:#?}");
    }
}

fn check_generated(encoding: XmlEncoding) {
    let mut env = env("");
    let shop = Shop::generate(3, 300, 500);
    let spec = GenerateSpec {
        seed: 9,
        sales: 3_000,
        returns: 40,
        malformed: 3,
        lines: 3,
    };
    let opts = WriterOptions {
        encoding,
        ..WriterOptions::default()
    };
    let (truth, bytes) = generate(&shop, spec, opts, Vec::new()).unwrap();
    let path = env.write("documents.xml", &bytes);
    let r = env.import(&path);
    assert_eq!(r.truncated, None);
    let s = env.summary();
    assert_eq!(
        (
            s.sales_count,
            s.returns_count,
            s.sales_total_kopecks,
            s.quarantined
        ),
        (truth.sales, truth.returns, truth.net_total, truth.malformed),
        "{r:?}"
    );
    let reasons: Vec<String> = env
        .ledger
        .quarantine_list(false)
        .unwrap()
        .into_iter()
        .map(|q| q.reason)
        .collect();
    assert_eq!(reasons.len(), 3);
    assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
    env.verified();
    // the same file again changes nothing
    let again = env.import(&path);
    assert_eq!(again.applied + again.new_versions + again.voided, 0, "{again:?}");
    assert_eq!(env.summary(), s);
    env.verified();
}

#[test]
fn a_generated_file_in_utf8_imports_exactly_once() {
    check_generated(XmlEncoding::Utf8);
}

#[test]
fn a_generated_file_in_windows_1251_imports_exactly_once() {
    check_generated(XmlEncoding::Windows1251);
}

#[test]
fn every_sample_file_imports_without_quarantine() {
    for orders in ["ignore", "always", "when_paid", "when_shipped"] {
        let mut env = env(&format!("orders = \"{orders}\""));
        for f in std::fs::read_dir(samples()).unwrap() {
            let path = f.unwrap().path();
            let r = env.import(&path);
            assert_eq!(
                (r.quarantined, r.truncated.as_deref()),
                (0, None),
                "{orders}: {r:?}"
            );
        }
        assert_eq!(env.summary().quarantined, 0);
        env.verified();
    }
    // with orders counted, the site order in the sample is a sale with its delivery line
    let mut env = env("orders = \"always\"");
    env.import(&samples().join("1c-sample-orders.xml"));
    assert_eq!(env.summary().sales_count, 1);
}

fn one(doc: &Document, state: DocState, generated_at: chrono::DateTime<Utc>) -> Vec<u8> {
    let mut w = DocumentsWriter::new(
        Vec::new(),
        WriterOptions {
            generated_at,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    w.document_with_state(doc, state).unwrap();
    w.finish().unwrap()
}

#[test]
fn new_versions_unposting_and_returns_from_files() {
    let mut env = env("");
    let shop = Shop::generate(5, 50, 10);
    let mut rng = fastrand::Rng::with_seed(5);
    let sale = shop.sale(&mut rng, 1, 3, Some(2), 0);
    let t0 = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
    env.import(&env.write("a.xml", &one(&sale, DocState::Posted, t0)));
    let card = shop.customers[2].card.clone().unwrap();
    let before = env
        .ledger
        .balance(&card, t0 + Duration::days(30), Duration::days(14))
        .unwrap();
    assert!(before.available > 0);

    // the same document with one line fewer: reversed and re-posted
    let mut edited = sale.clone();
    let gone = edited.lines.pop().unwrap();
    edited.total = kopilka::core::money::Money(edited.total.0 - gone.net.0);
    let r = env.import(&env.write("b.xml", &one(&edited, DocState::Posted, t0 + Duration::hours(1))));
    assert_eq!(r.new_versions, 1, "{r:?}");
    let after = env
        .ledger
        .balance(&card, t0 + Duration::days(30), Duration::days(14))
        .unwrap();
    assert!(after.available < before.available);
    assert_eq!(env.summary().sales_total_kopecks, edited.total.0);

    // a return of the first line takes back exactly that line's points
    let ret = shop.return_of(&edited, 900, 1, 1);
    env.import(&env.write("c.xml", &one(&ret, DocState::Posted, t0 + Duration::hours(2))));
    let (_, history) = env.ledger.history(&card).unwrap();
    let claw = history
        .iter()
        .find(|h| h.kind == "reversal" && h.role == "effect")
        .expect("a clawback");
    assert!(claw.points < 0);
    let s = env.summary();
    assert_eq!(s.returns_count, 1);

    // Проведен = false: the sale loses its effect, the return is kept but unlinked
    env.import(&env.write(
        "d.xml",
        &one(&edited, DocState::Unposted, t0 + Duration::hours(3)),
    ));
    let s = env.summary();
    assert_eq!(s.sales_count, 0);
    let b = env
        .ledger
        .balance(&card, t0 + Duration::days(30), Duration::days(14))
        .unwrap();
    assert_eq!(b.available + b.pending, 0);
    env.verified();
}

#[test]
fn a_truncated_file_applies_whole_documents_and_stays_in_the_folder() {
    let mut env = env("");
    let exchange = env.dir.path().join("exchange");
    std::fs::create_dir_all(&exchange).unwrap();
    env.cfg.onec.as_mut().unwrap().exchange_dir = Some(exchange.clone());
    let shop = Shop::generate(3, 50, 50);
    let spec = GenerateSpec {
        seed: 1,
        sales: 200,
        returns: 0,
        malformed: 0,
        lines: 2,
    };
    let (truth, bytes) = generate(&shop, spec, WriterOptions::default(), Vec::new()).unwrap();
    std::fs::write(exchange.join("cut.xml"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    std::fs::write(exchange.join("whole.xml"), &bytes).unwrap();
    std::fs::write(exchange.join("garbage.xml"), b"this is not xml at all").unwrap();
    let later = Utc::now() + Duration::minutes(1);
    let r = kopilka::onec::exchange::process_folder(&mut env.ledger, &exchange, &env.cfg, later).unwrap();
    assert_eq!(r.files.len(), 2);
    assert_eq!(r.rejected.len(), 1);
    assert!(
        exchange.join("cut.xml").exists(),
        "an incomplete file stays to be read again"
    );
    assert!(exchange.join("processed/whole.xml").exists());
    assert!(exchange.join("rejected/garbage.xml").exists());
    let reason = std::fs::read_to_string(exchange.join("rejected/garbage.xml.reason")).unwrap();
    assert!(
        reason.contains("not an XML file") || reason.contains("garbage.xml"),
        "{reason}"
    );
    assert_eq!(
        env.summary().sales_count,
        truth.sales,
        "the cut file's documents were all in the whole one too"
    );
    env.verified();
}

#[test]
fn costs_come_from_the_purchase_price_type_of_the_offers_file() {
    let mut env = env("cost_price_type = \"Закупочная\"");
    env.import(&samples().join("1c-sample-import.xml"));
    env.import(&samples().join("1c-sample-offers.xml"));
    // a product that has a purchase price in the sample offers
    let db = rusqlite::Connection::open(&env.cfg.ledger_path).unwrap();
    let (first_offer, price): (String, i64) = db
        .query_row(
            "SELECT p.product_id, p.unit_price FROM catalog_prices p JOIN catalog_price_types t ON t.id = p.price_type \
             WHERE t.name = 'Закупочная' ORDER BY p.product_id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let policy = kopilka::ledger::CostPolicy {
        price_type: "Закупочная".into(),
        backfill: false,
    };
    let cost = env
        .ledger
        .cost_at(
            &first_offer,
            &policy,
            Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap(),
        )
        .unwrap();
    assert_eq!(
        cost,
        Some(kopilka::core::money::Money(price)),
        "purchase price of {first_offer}"
    );
    let before = env
        .ledger
        .cost_at(
            &first_offer,
            &policy,
            Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap(),
        )
        .unwrap();
    assert_eq!(
        before, None,
        "no cost is guessed for a date before every price list"
    );
}

/// Issue 16, point 5: a product in group "Зерно" under "Кофе" (under "Продукты"), as 1C
/// nests `Группа` inside its parent's `Группы`, earns the coffee rule's rate after the
/// catalog import: the line carries its whole path, not only its own group.
#[test]
fn a_nested_group_from_the_catalog_reaches_the_line_and_the_parent_rule() {
    use kopilka::core::document::{DocKind, Line, SourceRef};
    use kopilka::core::money::{Money, Points};
    use kopilka::core::program::{CustomerState, Rules};

    let mut env = env("");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onec/catalog-nested-groups.xml");
    let r = env.import(&fixture);
    assert!(r.catalog_items >= 4, "{r:?}");

    let line = Line {
        product_id: "p-1#1kg".into(), // the offer of p-1, filed under Зерно
        name: "Кофе в зёрнах 1 кг".into(),
        category: None,
        category_parents: Vec::new(),
        quantity: 1.into(),
        unit_price: Money(189_000),
        discount: Money(0),
        net: Money(189_000),
        unit_cost: Some(Money(104_355)),
        service: false,
    };
    let mut doc = Document {
        source: SourceRef {
            system: "onec".into(),
            doc_id: "D-beans".into(),
            version: "v1".into(),
            stamp: None,
        },
        kind: DocKind::Sale,
        number: Some("1".into()),
        occurred_at: Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap(),
        customer: kopilka::core::identity::CustomerIdentity {
            card: Some("C1".into()),
            ..Default::default()
        },
        currency: "RUB".into(),
        lines: vec![line],
        total: Money(189_000),
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    };
    env.ledger.complete_from_catalog(&mut doc, None).unwrap();
    let l = &doc.lines[0];
    assert_eq!(l.category.as_deref(), Some("Зерно"));
    assert_eq!(l.category_parents, ["Кофе", "Продукты"]);

    let rules = kopilka::rules_file::parse(
        r#"
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "all-5"
percent = "5"
[[rules]]
id = "coffee-10"
percent = "10"
include_categories = ["Кофе"]
"#,
        "rules.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let customer = CustomerState {
        customer_id: Some(1),
        ..Default::default()
    };
    let d = rules.evaluate(&doc, &customer, doc.occurred_at);
    // 10 % of 1 890 ₽ at 1 ₽ a point
    assert_eq!(d.accrual, 189, "{:?}", d.explanation);
    assert_eq!(d.explanation.items[0].rule, "coffee-10");
}

#[test]
fn opening_balances_from_a_spreadsheet() {
    let mut env = env("");
    let mut csv = String::from("card;phone;points;expires\n");
    let spellings = [
        "+7 (9{a}) {b}-{c}-{d}",
        "89{a}{b}{c}{d}",
        "8 9{a} {b} {c} {d}",
        "+79{a}{b}{c}{d}",
    ];
    let mut expected = Vec::new();
    for i in 0..1000 {
        let (a, b, c, d) = (
            format!("{:02}", 10 + i % 80),
            format!("{:03}", i),
            format!("{:02}", i % 97),
            format!("{:02}", (i * 7) % 100),
        );
        let phone = spellings[i % 4]
            .replace("{a}", &a)
            .replace("{b}", &b)
            .replace("{c}", &c)
            .replace("{d}", &d);
        let card = format!("77{i:06}");
        let points = 10 + i as i64;
        csv.push_str(&format!("{card};{phone};{points};31.12.2027\n"));
        expected.push((card, points));
    }
    csv.push_str(";;15;\n");
    csv.push_str("9999;;many;\n");
    csv.push_str("8888;12345;5;\n");
    let path = env.write("balances.csv", csv.as_bytes());
    let rows = kopilka::migrate::read_balances_csv(&std::fs::read(&path).unwrap(), chrono_tz::Europe::Moscow)
        .unwrap();
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let dest = env.cfg.destinations();
    let r = env
        .ledger
        .import_opening_balances(
            "csv",
            "csv:balances.csv",
            rows.clone(),
            &env.cfg.ingest_context(now, &dest),
        )
        .unwrap();
    assert_eq!(r.applied, 1000);
    let lines: Vec<usize> = r.problems.iter().map(|p| p.0).collect();
    assert_eq!(lines, vec![1002, 1003, 1004], "{:?}", r.problems);
    for (card, points) in &expected {
        let b = env.ledger.balance(card, now, Duration::days(14)).unwrap();
        assert_eq!(b.available, *points, "{card}");
    }
    let again = env
        .ledger
        .import_opening_balances(
            "csv",
            "csv:balances-copy.csv",
            rows,
            &env.cfg.ingest_context(now, &dest),
        )
        .unwrap();
    assert_eq!(
        (again.applied, again.unchanged),
        (0, 1000),
        "the same content under another file name is applied once"
    );
    assert_eq!(
        env.summary().points_opening,
        expected.iter().map(|e| e.1).sum::<i64>()
    );
    env.verified();
}

#[test]
fn a_zip_archive_imports_catalog_first() {
    let mut env = env("cost_price_type = \"Закупочная\"");
    let path = env.dir.path().join("exchange.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for name in [
        "1c-sample-orders.xml",
        "1c-sample-offers.xml",
        "1c-sample-import.xml",
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(&std::fs::read(samples().join(name)).unwrap())
            .unwrap();
    }
    zip.finish().unwrap();
    let r = env.import(&path);
    assert_eq!((r.quarantined, r.truncated.as_deref()), (0, None));
    assert!(r.catalog_items > 10, "{r:?}");
}

/// A zip bomb within the entry and size limits: 64 MiB of one repeated byte packs about
/// 1000 : 1; exchange XML packs 10–30 : 1. Refused before a byte is unpacked, and nothing
/// in the ledger.
#[test]
fn an_archive_that_unpacks_a_thousand_times_its_size_is_refused() {
    let mut env = env("");
    let path = env.dir.path().join("bomb.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    zip.start_file("orders.xml", zip::write::SimpleFileOptions::default())
        .unwrap();
    let block = vec![b' '; 1 << 20];
    for _ in 0..64 {
        zip.write_all(&block).unwrap();
    }
    zip.finish().unwrap();
    let packed = std::fs::metadata(&path).unwrap().len();
    assert!(packed < 1 << 20, "{packed}");
    let settings = ImportSettings::from_config(&env.cfg);
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let err = import_path(&mut env.ledger, &path, &settings, &env.cfg, now).expect_err("refused");
    assert!(err.to_string().contains("zip bomb"), "{err}");
    assert_eq!(env.summary().sales_count, 0);
}

#[test]
fn an_unknown_tier_in_opening_balances_is_refused_with_its_line() {
    let mut env = env("");
    let csv = "card;points;tier\n7700001;100;\n7700002;200;platinum\n";
    let rows = kopilka::migrate::read_balances_csv(csv.as_bytes(), chrono_tz::Europe::Moscow).unwrap();
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let dest = env.cfg.destinations();
    let r = env
        .ledger
        .import_opening_balances("csv", "csv:tiers.csv", rows, &env.cfg.ingest_context(now, &dest))
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].0, 3, "the line of the row");
    assert!(
        r.problems[0].1.contains("unknown tier \"platinum\""),
        "{:?}",
        r.problems
    );
    assert!(
        env.ledger.balance("7700002", now, Duration::days(14)).is_err(),
        "nothing stored for it"
    );
}

/// The parse runs on its own thread ahead of the ledger (issue 19). When the ledger fails
/// part-way — here a trigger, installed from outside, that breaks the checkpoint of the tenth
/// batch of 100 — the import stops with the ledger's error instead of parsing on or hanging,
/// the nine batches before stay (each with its checkpoint), the failed one leaves nothing,
/// and the next import of the same file applies the rest exactly once.
#[test]
fn a_ledger_failure_part_way_stops_the_parse_and_keeps_the_batches_before() {
    let mut env = env("");
    let (truth, path) = env.three_thousand_sales(11);
    let outside = rusqlite::Connection::open(&env.cfg.ledger_path).unwrap();
    for event in ["INSERT", "UPDATE"] {
        outside
            .execute_batch(&format!(
                "CREATE TRIGGER break_{event} AFTER {event} ON checkpoints WHEN NEW.cursor LIKE '%#1000' \
                 BEGIN SELECT json('{{'); END;"
            ))
            .unwrap();
    }
    let mut settings = ImportSettings::from_config(&env.cfg);
    settings.batch_documents = 100;
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let err = import_path(&mut env.ledger, &path, &settings, &env.cfg, now).expect_err("the ledger fails");
    assert!(
        matches!(err, kopilka::onec::import::ImportError::Ledger(_)),
        "{err}"
    );
    assert!(err.to_string().contains("malformed JSON"), "{err}");
    assert_eq!(env.summary().sales_count, 900);
    env.verified();
    outside
        .execute_batch("DROP TRIGGER break_INSERT; DROP TRIGGER break_UPDATE;")
        .unwrap();
    let r = import_path(&mut env.ledger, &path, &settings, &env.cfg, now).unwrap();
    assert_eq!((r.applied, r.unchanged), (2_100, 900), "{r:?}");
    let s = env.summary();
    assert_eq!(
        (s.sales_count, s.sales_total_kopecks),
        (truth.sales, truth.net_total)
    );
    env.verified();
}

/// The log's checkpoints run on a thread of their own during an import
/// (`ledger::with_wal_checkpointer`): the log stays small though the importer's own
/// automatic checkpoint is off, and when the import returns the database file alone holds
/// every batch (a copy of it without the log has every sale). Checked to fail both ways:
/// with no limit on the log (the writer never finds it all copied back when it begins, so
/// never starts it again) the log reached 11.9 MB beside a 2.3 MB database, with no
/// checkpoints the same and the copy was empty; with the limit it stays at ≈ 0.85 MB.
#[test]
fn an_import_copies_its_log_back_on_another_thread_and_keeps_the_log_small() {
    let mut env = env("");
    let (truth, path) = env.three_thousand_sales(12);
    let mut settings = ImportSettings::from_config(&env.cfg);
    settings.batch_documents = 100;
    settings.wal_limit_pages = 32;
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let r = import_path(&mut env.ledger, &path, &settings, &env.cfg, now).unwrap();
    assert_eq!(r.applied, 3_000, "{r:?}");
    let db = std::fs::metadata(&env.cfg.ledger_path).unwrap().len();
    // the log file keeps the largest size it reached
    let wal_path = PathBuf::from(format!("{}-wal", env.cfg.ledger_path.display()));
    let wal = std::fs::metadata(&wal_path).map_or(0, |m| m.len());
    eprintln!("database {db} bytes, log at most {wal} bytes");
    assert!(wal < db, "the log grew to {wal} bytes for a {db}-byte database");
    let copy = env.dir.path().join("copy.db");
    std::fs::copy(&env.cfg.ledger_path, &copy).unwrap();
    let copied = Ledger::open(&copy, &OpenOptions::default()).unwrap();
    let s = copied.summary(&DateRange::default(), now).unwrap();
    assert_eq!(
        (s.sales_count, s.sales_total_kopecks),
        (truth.sales, truth.net_total)
    );
    env.verified();
}
