//! Item 4, start and idle: the time from process start to READY of `kopilka run` on a
//! ledger of 10M journal entries (target ≤ 200 ms; nothing may scan a table at start), and
//! the resident memory of the idle daemon after READY (target ≤ 20 MiB).
//!
//! Each start is the real binary run as systemd runs it: a child process with
//! `NOTIFY_SOCKET` pointing at a unix datagram socket the bench listens on, so READY is the
//! moment `sd_notify(READY=1)` arrives, not a polling interval. The same starts on an empty
//! ledger, and `kopilka --version` (process start and exit, the floor of any start), are
//! measured beside it: READY on 10M entries ÷ READY on an empty ledger ≈ 1 says nothing
//! at start grows with the ledger.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::data::{self, History};
use super::{Check, Ctx, Outcome, bulk, mib, proc_status_kib, thousands};

/// How long the daemon is left idle after READY before its memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(2);
/// READY must come within this, or the start counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const TARGET_READY_MS: f64 = 200.0;
const TARGET_IDLE_KIB: u64 = 20 * 1024;
/// Lines per sale of the big ledger: entries, not lines, make it big.
const LINES: usize = 2;

pub fn run(ctx: &Ctx, entries: Option<usize>) -> anyhow::Result<Outcome> {
    let entries = entries.unwrap_or(if ctx.quick { 100_000 } else { 10_000_000 });
    let starts = if ctx.quick { 3 } else { 7 };
    ctx.say(format!(
        "start: kopilka run to READY on a ledger of {} journal entries, {starts} starts each",
        thousands(entries as u64)
    ));
    let started = Instant::now();
    let (big, built) = ctx.work.cached(&format!("start-{entries}.db"), |p| {
        build_big(p, entries).map(|_| ())
    })?;
    let big_bytes = std::fs::metadata(&big)?.len();
    if built {
        ctx.say(format!(
            "  built {} ({:.0} MiB) with direct SQL in {}",
            big.display(),
            big_bytes as f64 / 1_048_576.0,
            data::secs(started.elapsed())
        ));
    }
    let real_entries: u64 = {
        let c = rusqlite::Connection::open_with_flags(&big, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        c.query_row("SELECT MAX(id) FROM journal", [], |r| r.get::<_, Option<u64>>(0))?
            .unwrap_or(0)
    };
    let empty = ctx.work.fresh("start-empty.db");
    drop(crate::ledger::Ledger::open(&empty, &Default::default())?);

    let exe = std::env::current_exe()?;
    let mut floor = Vec::new();
    for _ in 0..starts {
        let t = Instant::now();
        let s = Command::new(&exe)
            .arg("--version")
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(s.success(), "kopilka --version failed");
        floor.push(t.elapsed());
    }
    let floor_ms = median_ms(&floor);

    let mut runs = Vec::new();
    for (label, ledger) in [("empty", &empty), ("big", &big)] {
        let config = data::write_config(
            &ctx.work.dir,
            &format!("start-{label}.toml"),
            ledger,
            &format!(
                "{}exchange_dir = {:?}\n[daemon]\nhttp_listen = \"127.0.0.1:0\"\nlog_format = \"json\"\n",
                data::onec_section(),
                ctx.work.path("exchange").display().to_string()
            ),
        )?;
        let mut ready = Vec::new();
        let mut idle = Vec::new();
        for i in 0..starts {
            let s = one_start(ctx, &exe, &config, &format!("{label}-{i}"))?;
            ready.push(s.ready);
            idle.push(s.idle_rss_kib);
        }
        idle.sort_unstable();
        let r = median_ms(&ready);
        let idle_kib = idle[idle.len() / 2];
        ctx.say(format!(
            "  {label:>5} ledger: READY after {r:.1} ms (min {:.1}, max {:.1}); idle RSS {}",
            ms(*ready.iter().min().unwrap_or(&Duration::ZERO)),
            ms(*ready.iter().max().unwrap_or(&Duration::ZERO)),
            mib(idle_kib)
        ));
        runs.push((label, r, idle_kib, ready));
    }
    let big_ready = runs[1].1;
    let empty_ready = runs[0].1;
    let idle_kib = runs[1].2;
    ctx.say(format!(
        "  process floor (kopilka --version): {floor_ms:.1} ms; READY big ÷ empty = {:.2}",
        big_ready / empty_ready
    ));
    let figures = serde_json::json!({
        "entries": real_entries,
        "ledger_bytes": big_bytes,
        "starts": starts,
        "version_floor_ms": floor_ms,
        "ready_ms": runs.iter().map(|(l, r, _, all)| (l.to_string(), serde_json::json!({
            "median": r, "all": all.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        }))).collect::<serde_json::Map<_, _>>(),
        "idle_rss_kib": runs.iter().map(|(l, _, i, _)| (l.to_string(), serde_json::json!(i)))
            .collect::<serde_json::Map<_, _>>(),
        "ready_big_over_empty": big_ready / empty_ready,
    });
    Ok(Outcome {
        item: "start",
        figures,
        checks: vec![
            Check {
                item: "start",
                what: format!("start to READY, {} entries (median)", thousands(real_entries)),
                value: format!("{big_ready:.1} ms"),
                target: "≤ 200 ms".into(),
                met: big_ready <= TARGET_READY_MS,
            },
            Check {
                item: "start",
                what: "READY on the big ledger ÷ READY on an empty one".to_string(),
                value: format!("{:.2}", big_ready / empty_ready),
                target: "≈ 1 (no scan)".into(),
                met: big_ready / empty_ready < 1.5,
            },
            Check {
                item: "start",
                what: "idle RSS of kopilka run after READY".into(),
                value: mib(idle_kib),
                target: "≤ 20 MiB".into(),
                met: idle_kib <= TARGET_IDLE_KIB,
            },
        ],
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).map_or(f64::NAN, |d| ms(*d))
}

/// The big ledger: every sale a customer's, 2 lines, each but a customer's first paid
/// partly with points from the previous lot — two journal entries per sale.
fn build_big(path: &Path, entries: usize) -> anyhow::Result<bulk::Built> {
    let customers = History::customers_for(entries / 2);
    let h = History::new((entries + customers) / 2);
    let n_customers = h.shop.customers.len();
    let sales = h.iter().enumerate().map(|(i, mut d)| {
        d.lines.truncate(LINES);
        d.total = d.lines.iter().map(|l| l.net).sum();
        if d.customer.card.is_none() {
            d.customer = h.shop.customers[i % n_customers].clone();
        }
        d.points_redeemed = crate::core::money::Points(1 + (i as i64 % 40));
        d.source.version = crate::core::document::content_version(&d);
        d
    });
    bulk::build(path, sales)
}

struct Start {
    ready: Duration,
    idle_rss_kib: u64,
}

/// One `kopilka run`: spawned with NOTIFY_SOCKET, timed to READY=1, left idle, measured,
/// then stopped with SIGTERM.
fn one_start(ctx: &Ctx, exe: &Path, config: &Path, tag: &str) -> anyhow::Result<Start> {
    let sock_path = ctx.work.path(&format!("notify-{tag}.sock"));
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(READY_TIMEOUT))?;
    let log = std::fs::File::create(ctx.work.path(&format!("run-{tag}.log")))?;
    let t = Instant::now();
    let child = Command::new(exe)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("KOPILKA_CONFIG")
        .env_remove("KOPILKA_LEDGER")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut guard = Running(Some(child));
    let mut buf = [0u8; 4096];
    let ready = loop {
        let n = sock
            .recv(&mut buf)
            .map_err(|e| anyhow::anyhow!("no READY=1 from kopilka run within {READY_TIMEOUT:?}: {e}"))?;
        let msg = String::from_utf8_lossy(&buf[..n]);
        if msg.lines().any(|l| l.trim() == "READY=1") {
            break t.elapsed();
        }
    };
    std::thread::sleep(IDLE_BEFORE_RSS);
    let pid = guard.pid().to_string();
    let idle_rss_kib = proc_status_kib(&pid, "VmRSS:").unwrap_or(0);
    guard.stop()?;
    let _ = std::fs::remove_file(&sock_path);
    Ok(Start { ready, idle_rss_kib })
}

/// A child stopped with SIGTERM when done, killed if the bench fails first.
struct Running(Option<Child>);

impl Running {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    anyhow::bail!("kopilka run did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
