//! `/status` and `/report` show customers, revenue and liability: open on loopback, behind
//! the read token (or the API token) when kopilka listens off loopback (README, "Security
//! and limits"). Over real HTTP on loopback, the daemon's router built from a configuration
//! whose `http_listen` is `0.0.0.0` (the address decides, not the peer: a proxy on the same
//! machine would otherwise open the pages to everyone behind it).

use std::sync::Arc;

use base64::Engine as _;
use chrono::{TimeZone, Utc};
use kopilka::clock::FakeClock;
use kopilka::config;
use kopilka::daemon::JobContext;
use kopilka::daemon::runtime::Runtime;
use kopilka::ledger::{Ledger, OpenOptions, SharedLedger};

const READ: &str = "read-token-1";
const API: &str = "api-token-1";

async fn serve(listen: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("read-token"), READ).unwrap();
    std::fs::write(dir.path().join("api-token"), API).unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\npath = \"{}\"\n[daemon]\nhttp_listen = \"{listen}\"\nread_token_file = \"read-token\"\n\
             api_token_file = \"api-token\"\n",
            dir.path().join("k.db").display()
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let start = Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap();
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap());
    let ctx = JobContext {
        cfg,
        ledger,
        clock: Arc::new(FakeClock::new(start)),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let app = kopilka::daemon::http::router(ctx, Arc::new(Runtime::new(start)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (dir, base)
}

async fn status(url: &str, auth: Option<&str>) -> u16 {
    let mut r = reqwest::Client::new().get(url);
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    r.send().await.unwrap().status().as_u16()
}

fn basic(password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("anyone:{password}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_business_pages_need_a_token() {
    let (_dir, base) = serve("0.0.0.0:8090").await;
    for page in ["/status", "/report", "/"] {
        let url = format!("{base}{page}");
        assert_eq!(status(&url, None).await, 401, "{page} without a token");
        assert_eq!(status(&url, Some("Bearer wrong")).await, 401, "{page}");
        assert_eq!(status(&url, Some(&basic("wrong"))).await, 401, "{page}");
        assert_eq!(
            status(&url, Some(&format!("Bearer {READ}"))).await,
            200,
            "{page} read token"
        );
        assert_eq!(
            status(&url, Some(&format!("Bearer {API}"))).await,
            200,
            "{page} API token"
        );
        assert_eq!(
            status(&url, Some(&basic(READ))).await,
            200,
            "{page} as a browser's Basic"
        );
    }
    // health says nothing about the business: monitoring reaches it without a token
    assert_ne!(status(&format!("{base}/healthz"), None).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_the_business_pages_are_open() {
    let (_dir, base) = serve("127.0.0.1:8090").await;
    for page in ["/status", "/report"] {
        assert_eq!(status(&format!("{base}{page}"), None).await, 200, "{page}");
    }
}
