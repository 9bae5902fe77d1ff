//! The HTTP server's bounds against the clients they exist for: a slowloris client
//! trickling its headers, an idle kept-alive connection, and more connections than
//! slots. Each test is bounded (a generous outer timeout fails it instead of hanging);
//! none asserts how long anything took, only what happened and in which order.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use kopilka::config::HttpLimits;
use kopilka::daemon::serve::serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fails a test that would otherwise hang.
const BOUND: Duration = Duration::from_secs(30);

async fn server(limits: HttpLimits) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let app = Router::new().route("/", get(|| async { "hello" }));
    tokio::spawn(serve(listener, app, limits, stop.clone()));
    (addr, stop)
}

/// Reads until the server closes the connection; the bytes read.
async fn read_to_close(conn: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    // the idle timeout never fires (a byte comes every 200 ms): only the header timeout can
    let (addr, stop) = server(HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3600),
        max_connections: 4,
    })
    .await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let trickle = async {
        let mut buf = [0u8; 256];
        loop {
            if conn.write_all(b"X").await.is_err() {
                return Vec::new();
            }
            match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Vec::new(),
                Ok(Ok(n)) => return buf[..n].to_vec(),
                Err(_) => {} // nothing yet: trickle on
            }
        }
    };
    let answer = tokio::time::timeout(BOUND, trickle)
        .await
        .expect("the server cut the slow client off");
    // hyper may answer 408 before closing; it never serves the request
    assert!(!String::from_utf8_lossy(&answer).contains("hello"));
    stop.cancel();
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let (addr, stop) = server(HttpLimits {
        header_read_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(1),
        max_connections: 4,
    })
    .await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let all = tokio::time::timeout(BOUND, read_to_close(&mut conn))
        .await
        .expect("the idle connection was closed");
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("hello"), "{text}");
    stop.cancel();
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let (addr, stop) = server(HttpLimits {
        header_read_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(1),
        max_connections: 1,
    })
    .await;
    // A takes the only slot and says nothing
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(b"G").await.unwrap();
    // B is queued behind it: its answer comes only once A is gone
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    let tx = order_tx.clone();
    tokio::spawn(async move {
        read_to_close(&mut a).await;
        let _ = tx.send("A closed");
    });
    tokio::spawn(async move {
        let answer = read_to_close(&mut b).await;
        let _ = order_tx.send(if String::from_utf8_lossy(&answer).contains("hello") {
            "B served"
        } else {
            "B refused"
        });
    });
    let first = tokio::time::timeout(BOUND, order_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(BOUND, order_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first, second), ("A closed", "B served"));
    stop.cancel();
}

#[test]
fn the_limits_come_from_the_daemon_section_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kopilka.toml");
    std::fs::write(&path, "[daemon]\n").unwrap();
    let cfg = kopilka::config::load(Some(&path), &[]).unwrap();
    assert_eq!(cfg.daemon.http_limits, HttpLimits::default());
    assert_eq!(
        (
            HttpLimits::default().header_read_timeout,
            HttpLimits::default().idle_timeout,
            HttpLimits::default().max_connections
        ),
        (Duration::from_secs(10), Duration::from_secs(60), 256)
    );
    std::fs::write(
        &path,
        "[daemon]\nheader_read_timeout_seconds = 5\nidle_timeout_seconds = 30\nmax_connections = 64\n",
    )
    .unwrap();
    let cfg = kopilka::config::load(Some(&path), &[]).unwrap();
    assert_eq!(
        cfg.daemon.http_limits,
        HttpLimits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_connections: 64
        }
    );
    std::fs::write(&path, "[daemon]\nidle_timeout_seconds = 0\nmax_connections = 0\n").unwrap();
    let err = kopilka::config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(
        err.contains("daemon.idle_timeout_seconds") && err.contains("daemon.max_connections"),
        "{err}"
    );
}
