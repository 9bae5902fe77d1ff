//! Hostile and careless input, generated here (no large file is committed): every class the
//! issue "Hostile input and careless configs" found — a token too long to buffer, nesting
//! 100 000 deep, a 1 MiB `Ид`, a NUL in a name, a line whose `Сумма` disagrees with
//! `Количество` × `ЦенаЗаЕдиницу`, a date in year 9999, a broken tag, a file cut short, a
//! UTF-16LE file with its BOM. Each must end applied, quarantined with a reason, or refused
//! with a reason, with the good documents around it kept, no panic and memory bounded.
//! A property test then mutates the real exchange files of `../shared/samples/onec/`.
//!
//! The document shape follows the real 1C sample `1c-sample-orders.xml` (CommerceML 2.03,
//! `Документ` with `Ид`, `Дата`, `ХозОперация`, `Валюта`, `Сумма`, `Товары/Товар`).

use std::io::Cursor;
use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use kopilka::config::{self, Config};
use kopilka::ledger::{Ledger, OpenOptions};
use kopilka::onec::commerceml::{FileInfo, Item, Limits, Options, OrderPolicy, parse};
use kopilka::onec::import::{ImportSettings, import_path};

fn sale(id: &str, extra: &str, line: &str) -> String {
    format!(
        "<Документ><Ид>{id}</Ид><Номер>{id}</Номер><Дата>2026-05-10</Дата><Время>12:00:00</Время>\
         <ХозОперация>Отпуск товара</ХозОперация><Валюта>руб</Валюта><Сумма>200.00</Сумма>{extra}\
         <Товары>{line}</Товары></Документ>\n"
    )
}

const GOOD_LINE: &str = "<Товар><Ид>P1</Ид><Наименование>Хлеб</Наименование>\
    <ЦенаЗаЕдиницу>100.00</ЦенаЗаЕдиницу><Количество>2</Количество><Сумма>200.00</Сумма></Товар>";

fn good(id: &str) -> String {
    sale(id, "", GOOD_LINE)
}

fn file_of(docs: &[String]) -> Vec<u8> {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация ВерсияСхемы=\"2.08\" \
         ДатаФормирования=\"2026-05-10T12:00:00\">\n",
    );
    for d in docs {
        s.push_str(d);
    }
    s.push_str("</КоммерческаяИнформация>\n");
    s.into_bytes()
}

fn opts() -> Options {
    Options {
        limits: Limits {
            // small, so that "too long" costs kilobytes here, not megabytes
            max_text_bytes: 4096,
            ..Limits::default()
        },
        ..Options::default()
    }
}

fn run(bytes: &[u8], o: &Options) -> (FileInfo, Vec<Item>) {
    let mut items = Vec::new();
    let info = parse(Cursor::new(bytes), "hostile.xml", o, &mut |item| {
        items.push(item);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (info, items)
}

fn ids(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Document(kopilka::core::document::Incoming::Document(d)) => Some(d.source.doc_id.clone()),
            _ => None,
        })
        .collect()
}

fn rejections(items: &[Item]) -> Vec<(String, String, Option<String>)> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Rejected(r) => Some((r.doc_ref.clone(), r.reason.clone(), r.excerpt.clone())),
            _ => None,
        })
        .collect()
}

/// Parses `A, bad, B` and checks A and B come out as documents and `bad` as one rejection
/// whose reason holds `why`; returns that rejection.
fn one_bad(bad: String, why: &str) -> (String, String, Option<String>) {
    let (info, items) = run(&file_of(&[good("A"), bad, good("B")]), &opts());
    assert_eq!(info.truncated, None, "{:?}", info.truncated);
    assert_eq!(ids(&items), ["A", "B"], "{:?}", rejections(&items));
    let rej = rejections(&items);
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert!(rej[0].1.contains(why), "{:?} should say {why:?}", rej[0].1);
    assert!(
        rej[0].0.chars().count() <= 80,
        "doc_ref bounded: {}",
        rej[0].0.len()
    );
    assert!(
        rej[0].2.as_ref().is_none_or(|e| e.chars().count() <= 201),
        "excerpt bounded"
    );
    rej.into_iter().next().unwrap()
}

#[test]
fn a_token_too_long_to_buffer_rejects_its_document_and_reading_goes_on() {
    // no `<` for 300 KB: quick-xml would buffer it whole; the guard stops at ~80 KB
    let huge = format!("<Комментарий>{}</Комментарий>", "a".repeat(300_000));
    let (doc_ref, _, _) = one_bad(sale("X", &huge, GOOD_LINE), "longer than");
    assert_eq!(doc_ref, "X");
    // the same inside a start tag (an attribute that never ends soon)
    let tag = format!("<Склад Имя=\"{}\"/>", "b".repeat(300_000));
    one_bad(sale("Y", &tag, GOOD_LINE), "longer than");
}

#[test]
fn nesting_100_000_deep_rejects_its_document_and_reading_goes_on() {
    let deep = format!("{}{}", "<x>".repeat(100_000), "</x>".repeat(100_000));
    let (doc_ref, reason, _) = one_bad(sale("X", &deep, GOOD_LINE), "nest deeper than 64");
    assert_eq!(doc_ref, "X", "{reason}");
}

#[test]
fn an_id_longer_than_the_schema_allows_is_refused_and_never_stored_whole() {
    // (a 1 MiB one goes through the importer below, under the default limits)
    let (doc_ref, reason, excerpt) = one_bad(
        sale(&"Ж".repeat(1000), "", GOOD_LINE),
        "more than the 40 the CommerceML schema allows",
    );
    assert!(doc_ref.starts_with("hostile.xml@"), "{doc_ref}");
    assert!(reason.len() < 300, "{reason}");
    assert!(excerpt.is_some());
    // goods ids may have 80
    let long_good = GOOD_LINE.replace("<Ид>P1</Ид>", &format!("<Ид>{}</Ид>", "p".repeat(81)));
    one_bad(sale("G", "", &long_good), "more than the 80");
    let ok_good = GOOD_LINE.replace("<Ид>P1</Ид>", &format!("<Ид>{}</Ид>", "p".repeat(80)));
    let (_, items) = run(&file_of(&[sale("G", "", &ok_good)]), &opts());
    assert_eq!(ids(&items), ["G"]);
}

#[test]
fn control_characters_are_refused_with_the_reason() {
    let nul = GOOD_LINE.replace("Хлеб", "Хл\u{0}еб");
    let (_, reason, excerpt) = one_bad(sale("N", "", &nul), "control character U+0000");
    assert!(!excerpt.unwrap_or_default().contains('\u{0}'));
    assert!(reason.contains("Наименование"), "{reason}");
}

#[test]
fn a_broken_tag_inside_a_document_rejects_it_and_reading_goes_on() {
    let broken = sale("M", "", GOOD_LINE).replace("<Номер>M</Номер>", "<Номер>M</Номр>");
    one_bad(broken, "the XML breaks");
}

#[test]
fn a_file_cut_short_says_where_and_quarantines_the_document_in_progress() {
    let mut bytes = file_of(&[good("A"), good("B")]);
    let cut = String::from_utf8_lossy(&bytes).find("<Документ><Ид>B").unwrap() + 60;
    bytes.truncate(cut);
    let (info, items) = run(&bytes, &opts());
    assert_eq!(ids(&items), ["A"]);
    let reason = info.truncated.expect("a cut file says so");
    assert!(reason.contains(&format!("ends at byte {cut}")), "{reason}");
    let rej = rejections(&items);
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert_eq!(rej[0].0, "B");
    assert!(rej[0].1.contains("inside this entry"), "{}", rej[0].1);
}

#[test]
fn a_utf16le_file_with_its_bom_reads_like_its_utf8_twin() {
    let utf8 = String::from_utf8(file_of(&[good("A"), good("B")]))
        .unwrap()
        .replace("encoding=\"UTF-8\"", "encoding=\"UTF-16\"");
    let mut utf16 = vec![0xFF, 0xFE];
    for unit in utf8.encode_utf16() {
        utf16.extend(unit.to_le_bytes());
    }
    let (info, items) = run(&utf16, &opts());
    assert_eq!(info.truncated, None);
    assert_eq!(ids(&items), ["A", "B"], "{:?}", rejections(&items));
    // big-endian too
    let mut be = vec![0xFE, 0xFF];
    for unit in utf8.encode_utf16() {
        be.extend(unit.to_be_bytes());
    }
    assert_eq!(ids(&run(&be, &opts()).1), ["A", "B"]);
}

struct Env {
    dir: tempfile::TempDir,
    cfg: Config,
    ledger: Ledger,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = config::load(Some(&cfg_path), &[]).unwrap_or_else(|e| panic!("{e}"));
    let ledger = Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap();
    Env { dir, cfg, ledger }
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Every class in one file through the importer into a real ledger: the implausible
/// documents parse but the ledger quarantines them with the reason; the good ones are
/// applied; the file is not reported as cut; memory and disk stay small.
#[test]
fn every_class_in_one_file_ends_applied_or_quarantined_with_a_reason() {
    let mut e = env();
    let greedy = GOOD_LINE.replace("<Сумма>200.00</Сумма>", "<Сумма>99999.00</Сумма>");
    let docs = vec![
        good("G1"),
        sale("SUM", "", &greedy).replace("<Сумма>200.00</Сумма><Товары>", "<Сумма>99999.00</Сумма><Товары>"),
        good("G2"),
        sale("FUTURE", "", GOOD_LINE).replace("2026-05-10</Дата>", "9999-12-31</Дата>"),
        good("G3"),
        sale("NUL", "", &GOOD_LINE.replace("Хлеб", "Хл\u{0}еб")),
        sale(&"I".repeat(1 << 20), "", GOOD_LINE),
        sale(
            "DEEP",
            &format!("{}{}", "<x>".repeat(100_000), "</x>".repeat(100_000)),
            GOOD_LINE,
        ),
        sale(
            "TOKEN",
            &format!("<Комментарий>{}</Комментарий>", "z".repeat(8 << 20)),
            GOOD_LINE,
        ),
        good("G4"),
    ];
    let path = e.dir.path().join("hostile.xml");
    std::fs::write(&path, file_of(&docs)).unwrap();
    let settings = ImportSettings::from_config(&e.cfg);
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    let r = import_path(&mut e.ledger, &path, &settings, &e.cfg, now).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(r.truncated, None);
    assert_eq!(r.documents, 10, "{r:?}");
    assert_eq!(r.applied, 4, "{r:?}");
    assert_eq!(r.quarantined, 6, "{r:?}");
    let q = e.ledger.quarantine_list(false).unwrap();
    let reason = |doc_ref: &str| {
        q.iter()
            .find(|x| x.doc_ref == doc_ref)
            .map(|x| x.reason.clone())
            .unwrap_or_else(|| panic!("{doc_ref} not quarantined: {q:?}"))
    };
    assert!(
        reason("SUM").contains("is more than quantity 2 × price 100.00"),
        "{}",
        reason("SUM")
    );
    assert!(
        reason("FUTURE").contains("not a plausible date"),
        "{}",
        reason("FUTURE")
    );
    assert!(reason("NUL").contains("U+0000"), "{}", reason("NUL"));
    assert!(reason("DEEP").contains("nest deeper"), "{}", reason("DEEP"));
    assert!(reason("TOKEN").contains("longer than"), "{}", reason("TOKEN"));
    for entry in &q {
        assert!(entry.doc_ref.len() <= 200, "doc_ref bounded");
        assert!(
            entry.reason.chars().count() <= 400,
            "reason bounded: {}",
            entry.reason
        );
        assert!(entry.excerpt.as_ref().is_none_or(|x| x.chars().count() <= 201));
    }
    // the 1 MiB id and 8 MiB comment are not in the ledger
    drop(e.ledger);
    let size: u64 = std::fs::read_dir(e.dir.path())
        .unwrap()
        .filter_map(|f| f.ok())
        .filter(|f| f.file_name().to_string_lossy().starts_with("k.db"))
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(size < 4 << 20, "ledger files {size} bytes");
    if let Some(kib) = peak_rss_kib() {
        assert!(kib < 1 << 20, "peak RSS {kib} KiB");
    }
}

fn sample(name: &str) -> Vec<u8> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples/onec")).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const SAMPLES: [&str; 5] = [
    "1c-sample-orders.xml",
    "1c-sample-import.xml",
    "1c-sample-offers.xml",
    "bitrix-import0_1.xml",
    "bitrix-offers0_1.xml",
];

/// Every item a file yields, or the refusal's message.
fn items_of(bytes: &[u8], o: &Options) -> Result<(FileInfo, Vec<Item>), String> {
    let mut items = Vec::new();
    parse(Cursor::new(bytes), "mutant.xml", o, &mut |item| {
        items.push(item);
        Ok(())
    })
    .map(|info| (info, items))
    .map_err(|e| e.to_string())
}

fn all_orders() -> Options {
    Options {
        orders: OrderPolicy::Always,
        ..Options::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any edit anywhere: no panic; a file is refused with its name, or read with every
    /// entry counted; nothing before the first edited byte is lost.
    #[test]
    fn random_edits_of_the_real_samples_never_panic(
        which in 0..SAMPLES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>(), 1usize..16), 1..4),
    ) {
        let original = sample(SAMPLES[which]);
        let mut bytes = original.clone();
        let mut first = bytes.len();
        for (at, kind, byte, len) in edits {
            if bytes.is_empty() { break; }
            let at = at.index(bytes.len());
            first = first.min(at);
            match kind {
                0 => bytes[at] = byte,
                1 => { let end = (at + len).min(bytes.len()); bytes.drain(at..end); }
                2 => { bytes.splice(at..at, std::iter::repeat_n(byte, len)); }
                _ => bytes.truncate(at),
            }
        }
        let o = all_orders();
        // what the untouched prefix yields (less the entry the cut leaves open) must come
        // out of the mutant too, first and unchanged
        let kept: Vec<Item> = match items_of(&original[..first], &o) {
            Ok((_, items)) => items
                .into_iter()
                .filter(|i| !matches!(i, Item::Rejected(r) if r.reason.contains("inside this entry")))
                .collect(),
            Err(_) => Vec::new(),
        };
        match std::panic::catch_unwind(|| items_of(&bytes, &o)) {
            Err(_) => return Err(TestCaseError::fail("panicked")),
            Ok(Err(message)) => prop_assert!(message.starts_with("mutant.xml: "), "{}", message),
            Ok(Ok((info, items))) => {
                let counted = items.iter().filter(|i| matches!(i, Item::Document(_) | Item::Rejected(_))).count();
                prop_assert_eq!(info.documents + info.rejected, counted);
                prop_assert!(items.len() >= kept.len(), "{} items, {} before byte {}", items.len(), kept.len(), first);
                prop_assert_eq!(&items[..kept.len()], &kept[..]);
            }
        }
    }

    /// An edit confined to one value of one document of the real orders file: every
    /// document is still accounted for — applied, skipped or rejected with a reason.
    #[test]
    fn a_bad_value_never_loses_a_document_of_the_real_orders_file(
        pick in any::<prop::sample::Index>(),
        junk in prop::collection::vec(any::<u8>().prop_filter("no markup", |b| *b != b'<' && *b != b'&'), 0..400),
    ) {
        let original = sample("1c-sample-orders.xml");
        let text = String::from_utf8(original.clone()).unwrap();
        // the text values inside documents: between `>` and `</`
        let values: Vec<(usize, usize)> = text
            .match_indices('>')
            .filter_map(|(i, _)| {
                let start = i + 1;
                let end = start + text[start..].find("</")?;
                (end > start && !text[start..end].contains('<')).then_some((start, end))
            })
            .filter(|(start, _)| text[..*start].rfind("<Документ>") > text[..*start].rfind("</Документ>"))
            .collect();
        let (start, end) = values[pick.index(values.len())];
        let mut bytes = original[..start].to_vec();
        bytes.extend(&junk);
        bytes.extend(&original[end..]);
        let o = all_orders();
        let (info, _) = items_of(&bytes, &o).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&info.truncated, &None);
        prop_assert_eq!(info.documents + info.rejected + info.skipped, 3, "{:?}", info);
    }
}
