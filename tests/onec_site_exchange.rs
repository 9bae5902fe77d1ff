//! kopilka's «Обмен с сайтом» endpoint driven exactly as 1C drives it: checkauth, init, a
//! file in several chunks (zipped and plain), import, and for sales query and success.
//! Real HTTP over loopback.

use std::sync::Arc;

use kopilka::clock::SystemClock;
use kopilka::config;
use kopilka::ledger::{DateRange, Ledger, OpenOptions, SharedLedger};
use kopilka::onec::site_exchange::SiteExchange;
use kopilka::sim::commerceml::{GenerateSpec, WriterOptions, generate};
use kopilka::sim::onec_site::{SiteClient, SiteError};
use kopilka::sim::sales::Shop;

struct Server {
    _dir: tempfile::TempDir,
    url: String,
    ledger: SharedLedger,
    cancel: tokio_util::sync::CancellationToken,
}

async fn server(zip: bool) -> Server {
    server_with(zip, "").await
}

async fn server_with(zip: bool, extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("site-password"), "s3cret\n").unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\nexchange_dir = \"{}\"\n[onec.site_exchange]\nuser = \"1c\"\n\
             password_file = \"site-password\"\nfile_limit_bytes = 65536\nzip = {zip}\n{extra}\n",
            dir.path().join("k.db").display(),
            dir.path().join("exchange").display()
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&cfg_path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap());
    let exchange = SiteExchange::new(
        cfg.clone(),
        ledger.clone(),
        Arc::new(SystemClock),
        dir.path().join("exchange/site"),
    )
    .expect("site exchange configured");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/1c_exchange.php", listener.local_addr().unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    let router = exchange.router();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    });
    Server {
        _dir: dir,
        url,
        ledger,
        cancel,
    }
}

fn documents_file(sales: usize) -> (kopilka::sim::sales::Truth, Vec<u8>) {
    let shop = Shop::generate(4, 80, 60);
    let spec = GenerateSpec {
        seed: 4,
        sales,
        returns: 5,
        malformed: 1,
        lines: 3,
    };
    generate(&shop, spec, WriterOptions::default(), Vec::new()).unwrap()
}

async fn run_exchange(zip: bool) {
    let s = server(zip).await;
    let (truth, bytes) = documents_file(150);
    assert!(
        bytes.len() > 2 * 65536,
        "the file needs several chunks: {} bytes",
        bytes.len()
    );
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    let replies = onec
        .exchange("sale", &[("orders-0001.xml", bytes.clone())])
        .await
        .unwrap();
    assert_eq!(onec.zip, zip);
    assert!(replies[0].starts_with("success"), "{replies:?}");
    let summary = s
        .ledger
        .run(|l| l.summary(&DateRange::default(), chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(
        (
            summary.sales_count,
            summary.returns_count,
            summary.sales_total_kopecks,
            summary.quarantined
        ),
        (truth.sales, truth.returns, truth.net_total, truth.malformed)
    );
    // 1C repeats the exchange (it does after a timeout): the sales land once
    let mut again = SiteClient::new(&s.url, "1c", "s3cret");
    again
        .exchange("sale", &[("orders-0001.xml", bytes)])
        .await
        .unwrap();
    let after = s
        .ledger
        .run(|l| l.summary(&DateRange::default(), chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(after, summary);
    let violations = s.ledger.run(|l| l.verify()).await.unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    s.cancel.cancel();
}

#[tokio::test]
async fn a_plain_exchange_in_chunks_lands_once() {
    run_exchange(false).await;
}

#[tokio::test]
async fn a_zipped_exchange_lands_once() {
    run_exchange(true).await;
}

#[tokio::test]
async fn the_catalog_is_imported_from_1c() {
    let s = server(false).await;
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples/onec/");
    let files: Vec<(&str, Vec<u8>)> = ["1c-sample-import.xml", "1c-sample-offers.xml"]
        .iter()
        .map(|n| (*n, std::fs::read(format!("{samples}{n}")).unwrap()))
        .collect();
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    let replies = onec.exchange("catalog", &files).await.unwrap();
    assert!(replies.iter().all(|r| r.starts_with("success")), "{replies:?}");
    s.cancel.cancel();
}

#[tokio::test]
async fn query_answers_a_valid_documents_file_and_success_is_acknowledged() {
    let s = server(false).await;
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.checkauth("sale").await.unwrap();
    onec.init("sale").await.unwrap();
    let xml = onec.query().await.unwrap();
    let text = String::from_utf8(xml).unwrap();
    assert!(
        text.starts_with("<?xml") && text.contains("<КоммерческаяИнформация"),
        "{text}"
    );
    let parsed =
        kopilka::onec::commerceml::parse(text.as_bytes(), "query", &Default::default(), &mut |_| Ok(()))
            .unwrap();
    assert_eq!(parsed.truncated, None);
    onec.success().await.unwrap();
    s.cancel.cancel();
}

#[tokio::test]
async fn every_call_without_a_valid_session_is_refused() {
    let s = server(false).await;
    let mut wrong = SiteClient::new(&s.url, "1c", "guess");
    assert!(matches!(
        wrong.checkauth("sale").await,
        Err(SiteError::Failure { .. })
    ));
    // no checkauth at all
    let mut anon = SiteClient::new(&s.url, "1c", "s3cret");
    anon.file_limit = 1000;
    assert!(matches!(anon.init("sale").await, Err(SiteError::Failure { .. })));
    assert!(matches!(
        anon.upload("sale", "x.xml", b"<x/>").await,
        Err(SiteError::Failure { .. })
    ));
    // a session with a wrong sessid
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.checkauth("sale").await.unwrap();
    onec.init("sale").await.unwrap();
    let http = reqwest::Client::new();
    let reply = http
        .get(&s.url)
        .query(&[("type", "sale"), ("mode", "init"), ("sessid", "forged")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(reply.starts_with("failure"), "{reply}");
    s.cancel.cancel();
}

#[tokio::test]
async fn a_path_in_the_file_name_never_writes_outside_the_session_folder() {
    let s = server(false).await;
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.checkauth("catalog").await.unwrap();
    onec.init("catalog").await.unwrap();
    onec.upload("catalog", "../../../escaped.xml", b"<x/>")
        .await
        .unwrap();
    onec.upload("catalog", "C:\\1C\\Temp\\import.xml", b"<x/>")
        .await
        .unwrap();
    let root = s._dir.path();
    assert!(!root.join("escaped.xml").exists() && !root.join("exchange/escaped.xml").exists());
    let sessions: Vec<_> = std::fs::read_dir(root.join("exchange/site"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0].path().join("escaped.xml").exists());
    assert!(sessions[0].path().join("import.xml").exists());
    assert!(matches!(
        onec.upload("catalog", "..", b"x").await,
        Err(SiteError::Failure { .. })
    ));
    s.cancel.cancel();
}

#[tokio::test]
async fn bonus_documents_go_back_to_1c_on_query_and_are_delivered_on_success() {
    let s = server_with(false, "[accounting]\npostback = \"commerceml\"").await;
    let (_, bytes) = documents_file(30);
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.exchange("sale", &[("orders.xml", bytes)]).await.unwrap();
    let pending = |l: &mut Ledger| {
        l.outbox_list(&kopilka::ledger::OutboxFilter {
            state: Some(kopilka::ledger::OutboxState::Pending),
            destination: Some("onec:bonus".into()),
            limit: None,
        })
        .map(|r| r.len())
    };
    let waiting = s.ledger.run(pending).await.unwrap();
    assert!(
        waiting > 20,
        "one bonus document per accrual and redemption: {waiting}"
    );

    let ids = |xml: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(xml)
            .split("<Документ><Ид>")
            .skip(1)
            .map(|p| p.split("</Ид>").next().unwrap_or("").to_string())
            .collect()
    };
    // a query without success: the same documents, same ids, next time
    let mut first = SiteClient::new(&s.url, "1c", "s3cret");
    first.checkauth("sale").await.unwrap();
    first.init("sale").await.unwrap();
    let a = first.query().await.unwrap();
    let mut second = SiteClient::new(&s.url, "1c", "s3cret");
    second.checkauth("sale").await.unwrap();
    second.init("sale").await.unwrap();
    let b = second.query().await.unwrap();
    assert_eq!(ids(&a).len(), waiting);
    assert_eq!(ids(&a), ids(&b));
    assert!(String::from_utf8_lossy(&a).contains("НачислениеИСписаниеБонусныхБаллов"));
    let parsed =
        kopilka::onec::commerceml::parse(a.as_slice(), "query", &Default::default(), &mut |_| Ok(()));
    assert!(
        parsed.is_ok_and(|i| i.truncated.is_none()),
        "a well-formed CommerceML file"
    );
    // 1C confirms: delivered, nothing left
    second.success().await.unwrap();
    assert_eq!(s.ledger.run(pending).await.unwrap(), 0);
    let mut third = SiteClient::new(&s.url, "1c", "s3cret");
    third.checkauth("sale").await.unwrap();
    third.init("sale").await.unwrap();
    assert!(ids(&third.query().await.unwrap()).is_empty());
    s.cancel.cancel();
}
