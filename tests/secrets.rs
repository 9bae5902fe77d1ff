//! An upstream that echoes the request back — as a debugging proxy, a misconfigured
//! load balancer's error page or httpbin's `/anything` do — must not make kopilka store or
//! show the credentials it sent: not in the log, not on `/status` or `/healthz`, not in the
//! ledger file (its bytes are scanned). The echo format follows httpbin's `/headers`
//! (https://httpbin.org/#/Request_inspection/get_headers): every request header as
//! `Name: value`, here in a plain-text error page with status 400.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use kopilka::clock::SystemClock;
use kopilka::config;
use kopilka::daemon::runtime::{Runtime, run};

const ODATA_PASSWORD: &str = "s3cr3t-0data-pass";
const AMOCRM_TOKEN: &str = "amo-t0ken-eyJ-long-lived-9f8e7d";

async fn echo(headers: HeaderMap) -> (StatusCode, String) {
    let mut body = String::from("Bad request. You sent:\n");
    for (name, value) in &headers {
        body.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
    }
    (StatusCode::BAD_REQUEST, body)
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn secrets() -> Vec<String> {
    use base64::Engine as _;
    vec![
        ODATA_PASSWORD.to_string(),
        base64::engine::general_purpose::STANDARD.encode(format!("odata:{ODATA_PASSWORD}")),
        AMOCRM_TOKEN.to_string(),
    ]
}

fn assert_clean(what: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(&s), "{what} holds the secret {s:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_echoes_headers_leaks_no_secret() {
    let log = Log::default();
    let writer = log.clone();
    // global: the daemon logs from the runtime's worker threads
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .expect("the only subscriber of this test binary");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, Router::new().fallback(echo)).await;
    });

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("odata-password"), ODATA_PASSWORD).unwrap();
    std::fs::write(dir.path().join("amocrm-token"), AMOCRM_TOKEN).unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n[daemon]\nhttp_listen = \"127.0.0.1:0\"\nshutdown_deadline_seconds = 5\n\
             [daemon.schedule]\n\"onec:odata\" = \"* * * * * *\"\n\"amocrm:deliver\" = \"* * * * * *\"\n\
             [onec]\n[onec.odata]\nurl = \"http://{upstream}/base/odata/standard.odata\"\nuser = \"odata\"\n\
             password_file = \"odata-password\"\nmapping = \"roznica\"\n\
             [amocrm]\nbase_url = \"http://{upstream}\"\ntoken_file = \"amocrm-token\"\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
    let ledger_path = cfg.ledger_path.clone();

    let rt = Arc::new(Runtime::new(chrono::Utc::now()));
    let stop = tokio_util::sync::CancellationToken::new();
    let ready = rt.ran.notified();
    let handle = tokio::spawn(run(
        Arc::new(cfg),
        Arc::new(SystemClock),
        stop.clone(),
        rt.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("the daemon becomes ready");
    let base = format!("http://{}", rt.http_addr.lock().unwrap().expect("listening"));

    // both connectors have met the upstream and failed on its echo
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ran = rt.ran.notified();
        let jobs = rt.jobs();
        let failed = |name: &str| jobs.get(name).is_some_and(|j| j.last_error.is_some());
        if failed("onec:odata")
            && (failed("amocrm:deliver")
                || String::from_utf8_lossy(&log.0.lock().unwrap()).contains("AmoCRM refused"))
        {
            break;
        }
        tokio::time::timeout_at(deadline, ran)
            .await
            .unwrap_or_else(|_| panic!("the jobs did not meet the echo: {:?}", rt.jobs()));
    }

    let http = reqwest::Client::new();
    let healthz = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop.cancel();
    let _ = handle.await;

    // the failures are shown, with what 1C's side said, but without what we sent
    assert!(healthz.contains("onec:odata"), "{healthz}");
    assert!(
        healthz.contains("[removed]") || healthz.contains("400"),
        "{healthz}"
    );
    assert_clean("/healthz", &healthz);
    assert_clean("/status", &status);
    let logged = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("Bad request"),
        "the echo was read and logged: {logged}"
    );
    assert_clean("the log", &logged);
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("k.db") {
            bytes.extend(std::fs::read(entry.path()).unwrap());
        }
    }
    assert!(!bytes.is_empty());
    let ledger_text = String::from_utf8_lossy(&bytes);
    assert_clean(
        &format!("the ledger file {}", ledger_path.display()),
        &ledger_text,
    );
}
