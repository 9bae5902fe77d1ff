//! kopilka's «Обмен с сайтом» endpoint driven exactly as 1C drives it (the client in
//! `kopilka::sim::onec_site` follows the site-exchange code of УТ 11.5, Розница 2.2 and УНФ
//! 3.0, `../shared/specs/onec-stock-channels.md` §3): checkauth, init, a file in several
//! chunks (zipped and plain), import, and for sales query and success; site orders shaped as
//! УТ writes them; a month of 1C's schedule on a fake clock. Real HTTP over loopback.

use std::sync::Arc;

use kopilka::clock::{Clock, FakeClock, SystemClock};
use kopilka::config;
use kopilka::ledger::{DateRange, Ledger, OpenOptions, SharedLedger};
use kopilka::onec::site_exchange::SiteExchange;
use kopilka::sim::commerceml::{GenerateSpec, WriterOptions, generate};
use kopilka::sim::onec_orders::SiteOrders;
use kopilka::sim::onec_site::{Edition, Kill, SiteClient, SiteError};
use kopilka::sim::sales::Shop;

struct Server {
    _dir: tempfile::TempDir,
    url: String,
    ledger: SharedLedger,
    exchange: Arc<SiteExchange>,
    cancel: tokio_util::sync::CancellationToken,
}

async fn server(zip: bool) -> Server {
    server_with(zip, "").await
}

async fn server_with(zip: bool, extra: &str) -> Server {
    server_clocked(zip, extra, Arc::new(SystemClock)).await
}

async fn server_clocked(zip: bool, extra: &str, clock: Arc<dyn Clock>) -> Server {
    server_with_onec(zip, extra, "", clock).await
}

/// `extra` goes into `[onec.site_exchange]` (or later sections), `onec` into `[onec]`.
async fn server_with_onec(zip: bool, extra: &str, onec: &str, clock: Arc<dyn Clock>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("site-password"), "s3cret\n").unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\nexchange_dir = \"{}\"\n{onec}[onec.site_exchange]\nuser = \"1c\"\n\
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
        clock,
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
        exchange,
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
    // УТ and Розница download with no `init` (UT `OS:3869-3965`)
    onec.checkauth("sale").await.unwrap();
    let xml = onec.query().await.unwrap();
    let text = String::from_utf8(xml).unwrap();
    assert!(
        text.starts_with("<?xml") && text.contains("<КоммерческаяИнформация"),
        "{text}"
    );
    // by default no document at all: 1C loads only «Заказ товара» and aborts on anything else
    assert!(!text.contains("<Документ"), "{text}");
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
    // both "uploads" are incomplete CommerceML: 1C's import call reads and rejects them
    let reply = onec.import("catalog", "import.xml").await;
    assert!(matches!(reply, Err(SiteError::Failure { .. })), "{reply:?}");
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

async fn get(
    s: &Server,
    query: &[(&str, &str)],
    cookie: Option<&str>,
) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(&s.url).query(query);
    if let Some(c) = cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    let r = req.basic_auth("1c", Some("s3cret")).send().await.unwrap();
    (r.headers().clone(), r.bytes().await.unwrap().to_vec())
}

/// The cookie of a raw `checkauth` reply (`success`, name, value, `sessid=…`).
fn cookie_of(reply: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(reply).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"success"), "{text}");
    (
        format!("{}={}", lines[1], lines[2]),
        lines[3].trim_start_matches("sessid=").to_string(),
    )
}

#[tokio::test]
async fn init_answers_exactly_two_lines_and_every_reply_says_its_charset() {
    let s = server_with(false, "reply_encoding = \"windows-1251\"").await;
    let (h, body) = get(&s, &[("type", "sale"), ("mode", "checkauth")], None).await;
    assert_eq!(
        h[reqwest::header::CONTENT_TYPE],
        "text/plain; charset=windows-1251"
    );
    let (cookie, _) = cookie_of(&body);
    let (h, body) = get(&s, &[("type", "sale"), ("mode", "init")], Some(&cookie)).await;
    assert_eq!(
        h[reqwest::header::CONTENT_TYPE],
        "text/plain; charset=windows-1251"
    );
    let text = String::from_utf8(body).unwrap();
    // УТ/Розница: `СтрЧислоСтрок(ОтветСервера) <> 2` aborts the upload
    assert_eq!(text.trim_end_matches('\n').split('\n').count(), 2, "{text:?}");
    assert!(text.starts_with("zip=no\nfile_limit=65536"), "{text:?}");
    // a failure text in Russian arrives in the charset it names
    let (h, body) = get(&s, &[("type", "sale"), ("mode", "nonsense")], Some(&cookie)).await;
    assert_eq!(
        h[reqwest::header::CONTENT_TYPE],
        "text/plain; charset=windows-1251"
    );
    let (text, _, bad) = encoding_rs::WINDOWS_1251.decode(&body);
    assert!(!bad && text.starts_with("failure\nнеизвестный режим"), "{text}");
    // the query reply: an XML declaration first, no BOM, charset in the header and the XML
    let (h, body) = get(&s, &[("type", "sale"), ("mode", "query")], Some(&cookie)).await;
    assert_eq!(
        h[reqwest::header::CONTENT_TYPE],
        "application/xml; charset=windows-1251"
    );
    assert!(body.starts_with(b"<?xml version=\"1.0\" encoding=\"windows-1251\"?>"));
    s.cancel.cancel();
}

#[tokio::test]
async fn sessid_as_each_configuration_sends_it() {
    let s = server(false).await;
    // Розница 2.2 never sends sessid; УТ sends it on every call, empty after a 3-line reply
    for sessid in [None, Some("")] {
        let (_, body) = get(&s, &[("type", "sale"), ("mode", "checkauth")], None).await;
        let (cookie, _) = cookie_of(&body);
        let mut q = vec![("type", "sale"), ("mode", "init")];
        if let Some(v) = sessid {
            q.push(("sessid", v));
        }
        let (_, body) = get(&s, &q, Some(&cookie)).await;
        assert!(body.starts_with(b"zip="), "{}", String::from_utf8_lossy(&body));
    }
    // the right sessid binds the session to it; a wrong one is refused
    let (_, body) = get(&s, &[("type", "sale"), ("mode", "checkauth")], None).await;
    let (cookie, sessid) = cookie_of(&body);
    let (_, ok) = get(
        &s,
        &[("type", "sale"), ("mode", "init"), ("sessid", &sessid)],
        Some(&cookie),
    )
    .await;
    assert!(ok.starts_with(b"zip="));
    let (_, bad) = get(
        &s,
        &[("type", "sale"), ("mode", "init"), ("sessid", "forged")],
        Some(&cookie),
    )
    .await;
    assert!(bad.starts_with(b"failure"));
    // the whole scheduled run of each edition goes through
    for edition in [Edition::Ut, Edition::Roznica, Edition::Unf] {
        let mut onec = SiteClient::new(&s.url, "1c", "s3cret").edition(edition);
        let (_, bytes) = documents_file(5);
        onec.scheduled_run(Some(("orders-x_1.xml", &bytes)), None)
            .await
            .unwrap_or_else(|e| panic!("{edition:?}: {e}"));
    }
    s.cancel.cancel();
}

#[tokio::test]
async fn scheduled_checkauths_are_never_refused_for_finished_sessions() {
    let clock = Arc::new(FakeClock::new(chrono::Utc::now()));
    let s = server_clocked(false, "max_sessions = 2", clock.clone()).await;
    // a hundred runs within one idle window: three sessions each, none ever logs out
    for _ in 0..100 {
        let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
        onec.scheduled_run(None, None).await.unwrap();
        clock.advance(chrono::Duration::seconds(5));
    }
    let stats = s.exchange.stats();
    assert_eq!((stats.checkauth_accepted, stats.checkauth_refused), (200, 0));
    assert_eq!(s.exchange.session_counts().1, 0, "nothing in progress");
    s.cancel.cancel();
}

#[tokio::test]
async fn a_chunk_over_the_limit_refuses_the_rest_of_its_file_and_keeps_nothing() {
    let s = server_with(false, "max_upload_bytes = 100000").await;
    let (_, bytes) = documents_file(200);
    assert!(bytes.len() > 100_000);
    // Розница 2.2 (no sessid), so the raw calls below need only the cookie
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret").edition(Edition::Roznica);
    onec.checkauth("sale").await.unwrap();
    onec.init("sale").await.unwrap();
    let mut replies = Vec::new();
    for chunk in bytes.chunks(40_000) {
        let r = reqwest::Client::new()
            .post(&s.url)
            .query(&[("type", "sale"), ("mode", "file"), ("filename", "orders.xml")])
            .header(reqwest::header::COOKIE, onec_cookie(&mut onec).await)
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        replies.push(r.lines().next().unwrap_or("").to_string());
    }
    assert_eq!(&replies[..2], ["success", "success"]);
    assert!(replies[2..].iter().all(|r| r == "failure"), "{replies:?}");
    let reply = onec.import("sale", "orders.xml").await;
    assert!(matches!(reply, Err(SiteError::Failure { .. })), "{reply:?}");
    assert!(dir_files(&s._dir.path().join("exchange/site")).is_empty());
    s.cancel.cancel();
}

/// The `Cookie` header the client got from its `checkauth`, for the raw calls of a test.
async fn onec_cookie(onec: &mut SiteClient) -> String {
    onec.cookie_header().expect("after checkauth")
}

/// Every file below `dir`, recursively, with its size.
fn dir_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(dir_files(&p));
            } else {
                out.push((p.clone(), e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_file_sent_in_chunks_is_imported_once_and_its_folder_goes() {
    let s = server(false).await;
    let (truth, bytes) = documents_file(300);
    let chunks = bytes.len().div_ceil(65536);
    assert!(chunks >= 4, "{chunks} chunks");
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.exchange("sale", &[("orders-1.xml", bytes)]).await.unwrap();
    assert_eq!(
        s.exchange.stats().files_imported,
        1,
        "one import for {chunks} chunks"
    );
    let summary = s
        .ledger
        .run(|l| l.summary(&DateRange::default(), chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(summary.sales_count, truth.sales);
    // the work is done: no session folder, no file
    assert!(dir_files(&s._dir.path().join("exchange/site")).is_empty());
    s.cancel.cancel();
}

#[tokio::test]
async fn a_crash_leaves_no_session_folder_after_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("exchange/site");
    std::fs::create_dir_all(root.join("0123abcd")).unwrap();
    std::fs::write(root.join("0123abcd/orders.xml"), b"<half").unwrap();
    std::fs::write(dir.path().join("site-password"), "s3cret\n").unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\n[onec.site_exchange]\nuser = \"1c\"\npassword_file = \"site-password\"\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&cfg_path), &[]).unwrap());
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap());
    let _ex = SiteExchange::new(cfg, ledger, Arc::new(SystemClock), root.clone()).unwrap();
    assert!(dir_files(&root).is_empty());
}

/// Orders as УТ uploads them (`kopilka::sim::onec_orders`, from УТ's own code): counted when
/// paid — «Номер/Дата оплаты по 1С» filled — once, voided when cancelled.
#[tokio::test]
async fn site_orders_count_when_paid_once_and_go_when_cancelled() {
    let s = server_orders("when_paid").await;
    let shop = Shop::generate(7, 40, 30);
    let mut orders = SiteOrders::new(shop, 7, chrono_tz::Europe::Moscow);
    let t0 = chrono::Utc::now() - chrono::Duration::days(3);
    let placed = orders.place(14, t0);
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    let upload = orders.upload(chrono::Utc::now()).unwrap();
    onec.scheduled_run(Some((&upload.0, &upload.1)), None)
        .await
        .unwrap();
    orders.confirm();
    let sales = |s: &Server| {
        let l = s.ledger.clone();
        async move {
            l.run(|l| l.summary(&DateRange::default(), chrono::Utc::now()))
                .await
                .unwrap()
        }
    };
    assert_eq!(sales(&s).await.sales_count, 0, "nothing is paid yet");
    for o in placed.iter().take(8) {
        orders.pay(*o, t0 + chrono::Duration::hours(2));
    }
    let upload = orders.upload(chrono::Utc::now()).unwrap();
    // 1C repeats the same upload (a run it did not see confirmed): still once
    for _ in 0..2 {
        let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
        onec.scheduled_run(Some((&upload.0, &upload.1)), None)
            .await
            .unwrap();
    }
    orders.confirm();
    let (paid, total) = orders.paid_truth();
    let summary = sales(&s).await;
    assert_eq!(
        (summary.sales_count, summary.sales_total_kopecks),
        (paid as i64, total.0)
    );
    assert_eq!(paid, 8);
    orders.cancel(placed[0]);
    let upload = orders.upload(chrono::Utc::now()).unwrap();
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.scheduled_run(Some((&upload.0, &upload.1)), None)
        .await
        .unwrap();
    let (paid, total) = orders.paid_truth();
    let summary = sales(&s).await;
    assert_eq!((summary.sales_count, summary.sales_total_kopecks), (7, total.0));
    assert_eq!(paid, 7);
    s.cancel.cancel();
}

async fn server_orders(policy: &str) -> Server {
    server_with_onec(
        false,
        "",
        &format!("orders = \"{policy}\"\n"),
        Arc::new(SystemClock),
    )
    .await
}

/// A month of 1C's schedule on a fake clock: every 5 minutes the test `checkauth`,
/// `query`/`success`, and an upload when orders changed — УТ, Розница and УНФ in turn, with
/// and without `sessid` and `import`, some runs cut halfway. Every run is accepted, every
/// paid order counts once, and sessions and the exchange folder stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_of_scheduled_runs_stays_bounded() {
    const RUNS: usize = 30 * 24 * 12;
    let start = chrono::Utc::now() - chrono::Duration::days(31);
    let clock = Arc::new(FakeClock::new(start));
    let s = server_with_onec(true, "", "orders = \"when_paid\"\nkeep_days = 7\n", clock.clone()).await;
    let shop = Shop::generate(11, 60, 40);
    let mut orders = SiteOrders::new(shop, 11, chrono_tz::Europe::Moscow);
    let root = s._dir.path().join("exchange/site");
    let (mut max_files, mut max_bytes, mut max_busy, mut killed) = (0usize, 0u64, 0usize, 0usize);
    for run in 0..RUNS {
        let now = clock.now();
        // an order an hour; most are paid two hours later, every seventh is cancelled
        if run % 12 == 0 {
            orders.place(1, now);
        }
        if run % 12 == 6 && run >= 24 {
            let i = run / 12 - 2;
            if i % 7 == 3 {
                orders.cancel(i);
            } else {
                orders.pay(i, now);
            }
        }
        let edition = [Edition::Ut, Edition::Roznica, Edition::Unf][run % 3];
        let kill = match run % 41 {
            7 => Some(Kill::AfterQuery),
            19 => Some(Kill::AfterFirstChunk),
            _ => None,
        };
        let upload = orders.upload(now);
        let mut onec = SiteClient::new(&s.url, "1c", "s3cret").edition(edition);
        onec.scheduled_run(upload.as_ref().map(|(n, b)| (n.as_str(), b.as_slice())), kill)
            .await
            .unwrap_or_else(|e| panic!("run {run} ({edition:?}, {kill:?}) refused: {e}"));
        if kill.is_some() && upload.is_some() {
            killed += 1;
        } else {
            orders.confirm();
        }
        let files: Vec<_> = dir_files(&root)
            .into_iter()
            .filter(|(p, _)| !p.starts_with(root.join("rejected")))
            .collect();
        max_files = max_files.max(files.len());
        max_bytes = max_bytes.max(files.iter().map(|(_, n)| n).sum());
        max_busy = max_busy.max(s.exchange.session_counts().1);
        clock.advance(chrono::Duration::minutes(5));
    }
    // what the last runs left in the background has finished
    let mut onec = SiteClient::new(&s.url, "1c", "s3cret");
    onec.scheduled_run(None, None).await.unwrap();
    let stats = s.exchange.stats();
    println!(
        "soak: {RUNS} runs, {} checkauth accepted, {} refused, {} files imported, {} rejected, {killed} uploads cut; \
         maxima: {} sessions remembered, {max_busy} in progress, {max_files} files / {max_bytes} bytes in the exchange folder",
        stats.checkauth_accepted,
        stats.checkauth_refused,
        stats.files_imported,
        stats.files_rejected,
        stats.max_sessions_seen,
    );
    assert_eq!(stats.checkauth_refused, 0);
    assert!(stats.max_sessions_seen <= 256, "{stats:?}");
    assert!(max_busy <= 4, "{max_busy}");
    assert!(
        max_files <= 4 && max_bytes < 1 << 20,
        "{max_files} files, {max_bytes} bytes"
    );
    // cut uploads were rejected with their reasons, and the oldest pruned after 7 days
    let rejected = dir_files(&root.join("rejected")).len() as u64;
    assert!(
        stats.files_rejected > 0 && rejected < 2 * stats.files_rejected,
        "{rejected} kept of {stats:?}"
    );
    let (paid, total) = orders.paid_truth();
    assert!(paid > 500, "{paid}");
    let summary = s
        .ledger
        .run(move |l| l.summary(&DateRange::default(), start + chrono::Duration::days(40)))
        .await
        .unwrap();
    assert_eq!(
        (summary.sales_count, summary.sales_total_kopecks),
        (paid as i64, total.0)
    );
    let violations = s.ledger.run(|l| l.verify()).await.unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    s.cancel.cancel();
}
