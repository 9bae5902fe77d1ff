//! Whatever CommerceML kopilka writes validates against the official CommerceML 2.10 schema
//! (`../shared/specs/commerceml-xsd/commerceml-2.10.xsd`, from carono/yii2-1c-exchange at
//! 90d49df0), checked with libxml2's `xmllint` (Debian package libxml2-utils, which `.ci/run`
//! installs): the `mode=query` reply (empty by default, bonus documents and postings with
//! `postback = "commerceml"`) and the site orders the 1C simulator uploads.

use std::io::Write;
use std::process::Command;

use chrono::{TimeZone, Utc};
use kopilka::config;
use kopilka::ledger::{OutboxRow, OutboxState};
use kopilka::onec::postback::documents_file;
use kopilka::sim::onec_orders::SiteOrders;
use kopilka::sim::sales::Shop;

const XSD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/specs/commerceml-xsd/commerceml-2.10.xsd"
);

/// `xmllint`'s verdict on one document; a missing `xmllint` fails the test (never skips it).
fn validate(xml: &[u8]) -> Result<(), String> {
    let mut f = tempfile::Builder::new().suffix(".xml").tempfile().unwrap();
    f.write_all(xml).unwrap();
    let out = Command::new("xmllint")
        .args(["--noout", "--schema", XSD])
        .arg(f.path())
        .output()
        .expect("xmllint (Debian package libxml2-utils) is needed to check files against the schema");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn config(postback: &str) -> config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!("[accounting]\nentity = \"ООО «Ромашка»\"\npostback = \"{postback}\"\n"),
    )
    .unwrap();
    config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn row(id: i64, destination: &str, key: &str, payload: serde_json::Value) -> OutboxRow {
    let at = Utc.with_ymd_and_hms(2026, 11, 15, 9, 30, 0).unwrap();
    OutboxRow {
        id,
        destination: destination.into(),
        idem_key: key.into(),
        coalesce_key: None,
        payload: payload.to_string(),
        state: OutboxState::Pending,
        attempts: 0,
        next_attempt_at: at,
        last_error: None,
        created_at: at,
        updated_at: at,
        delivered_at: None,
        superseded_by: None,
        note: None,
    }
}

#[test]
fn the_default_query_reply_is_valid_and_empty() {
    let cfg = config("none");
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
    for windows_1251 in [false, true] {
        let xml = documents_file(&[], &cfg, now, windows_1251);
        assert!(xml.starts_with(b"<?xml"), "no BOM, no blank first");
        validate(&xml).unwrap_or_else(|e| panic!("windows-1251 {windows_1251}: {e}"));
    }
}

#[test]
fn bonus_documents_and_postings_validate() {
    let cfg = config("commerceml");
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
    let rows = vec![
        row(
            1,
            config::ONEC_BONUS,
            "onec:bonus:0a1b2c3d4e5f:tx1",
            serde_json::json!({
                "tx_id": 1, "kind": "accrual", "points": 120, "amount_kopecks": 12000,
                "at": "2026-11-15T09:30:00+00:00", "expires_at": "2027-11-15T09:30:00+00:00",
                "customer_id": 7, "card": "2000000007", "onec_id": "9d1c6b0e-1111-4a7e-9d55-0b1f2c3d4e5f",
                "document": {"source": "onec", "doc_id": "abc", "number": "ЧК-000777"},
                "comment": "5 % от 2 400,00 <руб> & бонус",
            }),
        ),
        row(
            2,
            config::ONEC_BONUS,
            "onec:bonus:0a1b2c3d4e5f:tx2",
            serde_json::json!({
                "tx_id": 2, "kind": "redemption", "points": -50, "amount_kopecks": -5000,
                "at": "2026-11-16T12:00:00+00:00", "customer_id": 8, "card": null, "onec_id": null,
                "document": {"source": "api", "doc_id": "h1", "number": null}, "comment": "",
            }),
        ),
        row(
            3,
            config::ONEC_ACCOUNTING,
            "accounting:0a1b2c3d4e5f:ООО «Ромашка»:2026-11-15:1",
            serde_json::json!({
                "entity": "ООО «Ромашка»", "day": "2026-11-15", "seq": 1, "adjusting": false,
                "point_value_kopecks": 100, "points": {"accrued": 120, "redeemed": 50},
            }),
        ),
    ];
    for windows_1251 in [false, true] {
        let xml = documents_file(&rows, &cfg, now, windows_1251);
        let text = if windows_1251 {
            encoding_rs::WINDOWS_1251.decode(&xml).0.into_owned()
        } else {
            String::from_utf8(xml.clone()).unwrap()
        };
        assert_eq!(text.matches("<Документ>").count(), 3, "{text}");
        validate(&xml).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

/// The simulator's orders follow УТ's code, which checks them against 1C's own CML package
/// before writing (`КоммерческаяИнформация.Проверить()`); the official schema must agree.
#[test]
fn the_simulated_site_orders_validate() {
    let shop = Shop::generate(3, 20, 10);
    let mut orders = SiteOrders::new(shop, 3, chrono_tz::Europe::Moscow);
    let at = Utc.with_ymd_and_hms(2026, 11, 15, 9, 30, 0).unwrap();
    let placed = orders.place(4, at);
    orders.pay(placed[0], at);
    orders.ship(placed[1], at);
    orders.cancel(placed[2]);
    let (_, xml) = orders.upload(at).unwrap();
    // 1C writes a BOM; xmllint reads it
    validate(&xml).unwrap_or_else(|e| panic!("{e}"));
}
