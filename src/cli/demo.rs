//! `kopilka demo`: the real jobs against built-in simulators of 1C (OData and the site
//! exchange) and AmoCRM on loopback, on a fresh machine with nothing else.
//!
//! A seeded shop's 1C base is polled over OData; 1C's site exchange uploads more sales
//! (with a malformed one) to kopilka's own endpoint; then the base changes — edits,
//! unpostings, returns, new sales, a malformed receipt — and is polled again. Everything
//! is delivered: contact fields to AmoCRM, bonus documents back to 1C. At the end the
//! ledger is compared with both simulators' truth, reconciled and verified.

use chrono::DurationRound;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::clock::{Clock, SystemClock};
use crate::config;
use crate::core::money::Money;
use crate::daemon::{JobContext, run_once};
use crate::ledger::{DateRange, Ledger, SharedLedger};
use crate::sim::amocrm::AmoSim;
use crate::sim::commerceml::{GenerateSpec, Malformed, WriterOptions, generate};
use crate::sim::onec_odata::{Entity, OdataSimBuilder, RECEIPTS, Val};
use crate::sim::onec_site::SiteClient;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Sales in the simulated 1C base.
    #[arg(long, default_value_t = 2000)]
    pub sales: usize,
    #[arg(long, default_value_t = 200)]
    pub customers: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep the demo's files (config, ledger) in this directory instead of a temporary one.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

struct Progress {
    tty: bool,
    step: usize,
    steps: usize,
}

impl Progress {
    fn show(&mut self, what: &str) {
        self.step += 1;
        let done = self.step * 30 / self.steps;
        if self.tty {
            eprint!("\r[{}{}] {what:<60}", "#".repeat(done), ".".repeat(30 - done));
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("[{}/{}] {what}", self.step, self.steps);
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The demo's history covers the last three months (or more, for many sales at one every
/// 7 minutes) and ends yesterday, so the pages for "today" and "the last 30 days" show it and
/// most points have passed the return window. Whole hours, so runs on one day agree.
fn demo_history(sales: usize) -> (chrono::DateTime<chrono::Utc>, i64) {
    let spacing = (90 * 24 * 60 / sales.max(1) as i64).max(7);
    // the base later gets sales/20 (at least 5) more, and a few returns a minute apart
    let generated = sales + (sales / 20).max(5) + 50;
    let span = chrono::Duration::minutes(spacing * generated as i64) + chrono::Duration::days(1);
    let at = chrono::Utc::now() - span;
    (
        at.duration_trunc(chrono::Duration::hours(1)).unwrap_or(at),
        spacing,
    )
}

pub fn run(a: &DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(demo(a))
}

async fn demo(a: &DemoArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("kopilka-demo-").tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("kopilka.db"));
    let mut p = Progress {
        tty: std::io::stderr().is_terminal(),
        step: 0,
        steps: 9,
    };
    println!(
        "kopilka demo: a shop with {} customers and {} sales in a simulated 1C, and a simulated AmoCRM (seed {})",
        a.customers, a.sales, a.seed
    );

    p.show("starting the 1C (OData) and AmoCRM simulators on loopback");
    let (history_start, spacing) = demo_history(a.sales);
    let onec = OdataSimBuilder::new(a.seed)
        .sales(a.sales)
        .customers(a.customers.max(1))
        .products(300)
        .lines(3)
        .returns_percent(3)
        .starting_at(history_start)
        .spacing_minutes(spacing)
        .start()
        .await
        .context("starting the 1C simulator")?;
    let token = "demo-long-lived-token";
    let amo = AmoSim::builder()
        .requests_per_second(50)
        .long_lived_token(token, chrono::Utc::now() + chrono::Duration::days(365))
        .start()
        .await
        .context("starting the AmoCRM simulator")?;

    // the configuration a shop would write, pointed at the simulators
    std::fs::write(dir.join("odata-password"), onec.password())?;
    std::fs::write(dir.join("site-password"), "1c-exchange")?;
    std::fs::write(dir.join("amocrm-token"), token)?;
    std::fs::write(dir.join("rules.toml"), include_str!("../../config/rules.toml"))?;
    let cfg_text = format!(
        r#"[general]
timezone = "Europe/Moscow"
[ledger]
path = "{ledger}"
[rules]
path = "rules.toml"
[onec]
system = "onec"
cost_price_type = "Закупочная"
exchange_dir = "{exchange}"
[onec.odata]
url = "{odata}"
user = "{user}"
password_file = "odata-password"
mapping = "roznica"
overlap_minutes = {overlap}
[onec.site_exchange]
listen = "127.0.0.1:0"
user = "1c"
password_file = "site-password"
[amocrm]
base_url = "{amocrm}"
token_file = "amocrm-token"
requests_per_second = 50
[accounting]
entity = "ООО «Демо»"
postback = "commerceml"
[daemon]
http_listen = "127.0.0.1:0"
"#,
        ledger = dir.join("kopilka.db").display(),
        // the demo edits its latest ~20 documents; the window reaches them, as a shop's
        // overlap reaches the days its staff still correct
        overlap = (spacing * 30).max(1440),
        exchange = dir.join("exchange").display(),
        odata = onec.base_url(),
        user = onec.user(),
        amocrm = amo.base_url,
    );
    let cfg_path = dir.join("kopilka.toml");
    std::fs::write(&cfg_path, cfg_text)?;
    std::fs::create_dir_all(dir.join("exchange"))?;
    let cfg = Arc::new(config::load(Some(&cfg_path), &[])?);
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ctx = JobContext {
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    // kopilka's own «Обмен с сайтом» endpoint, where 1C uploads and collects documents
    let exchange = crate::onec::site_exchange::SiteExchange::new(
        cfg.clone(),
        ledger.clone(),
        clock.clone(),
        dir.join("exchange/site"),
    )
    .context("the site exchange is configured")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site_url = format!("http://{}/1c_exchange.php", listener.local_addr()?);
    let router = exchange.router();
    let stop = ctx.cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });

    let mut failures = Vec::new();
    let jobs = |label: &'static str| {
        let ctx = ctx.clone();
        async move {
            let results = run_once(&ctx, None).await;
            results
                .into_iter()
                .filter_map(|(name, r)| r.err().map(|e| format!("{label}: {name}: {e:#}")))
                .collect::<Vec<_>>()
        }
    };

    p.show("first poll of 1C over OData, contacts to AmoCRM");
    failures.extend(jobs("first run").await);

    p.show("1C uploads more sales through the site exchange");
    let shop = onec.shop();
    let spec = GenerateSpec {
        seed: a.seed + 1,
        sales: (a.sales / 10).max(10),
        returns: 2,
        malformed: 1,
        lines: 2,
    };
    let (site_truth, file) = generate(&shop, spec, WriterOptions::default(), Vec::new())?;
    let mut onec_site = SiteClient::new(&site_url, "1c", "1c-exchange");
    onec_site
        .exchange("sale", &[("orders-demo.xml", file)])
        .await
        .context("1C's site exchange upload")?;

    p.show("the 1C base changes: edits, unpostings, returns, new sales, a malformed receipt");
    // recent documents are the ones people correct; older changes wait for the re-scan
    let mut keys = onec.sale_keys();
    let date_of = |k: &String| {
        onec.entity(RECEIPTS, k)
            .and_then(|e| match e.get("Date") {
                Some(Val::Str(d)) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_default()
    };
    keys.sort_by_key(|k| std::cmp::Reverse(date_of(k)));
    for k in keys.iter().take(10) {
        onec.edit(k);
    }
    for k in keys.iter().skip(10).take(3) {
        onec.set_posted(k, false);
    }
    for k in keys.iter().skip(13).take(5) {
        onec.add_return(k);
    }
    onec.add_sales((a.sales / 20).max(5), None);
    let before_bad = onec.truth();
    let mut bad_malformed = 0;
    if let Some(mut bad) = keys.get(20).and_then(|k| onec.entity(RECEIPTS, k)) {
        bad.key = crate::sim::onec_odata::guid("doc", "demo-malformed");
        bad.set("Ref_Key", Val::str(bad.key.clone()));
        if let Some(Val::Rows(rows)) = bad.get("Товары").cloned() {
            let rows = rows
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|(n, v)| {
                            if n == "Количество" {
                                (n, Val::str("много"))
                            } else {
                                (n, v)
                            }
                        })
                        .collect()
                })
                .collect();
            bad.set("Товары", Val::Rows(rows));
        }
        bad.set("DataVersion", onec.next_data_version());
        bad.set(
            "Date",
            Val::str(onec.last_date().format("%Y-%m-%dT%H:%M:%S").to_string()),
        );
        bad.set("Number", Val::str("ДЕМО-БРАК"));
        onec.insert(RECEIPTS, Entity { ..bad });
        bad_malformed = 1;
    }
    let with_bad = onec.truth();

    p.show("second poll of 1C, changes applied");
    failures.extend(jobs("second run").await);
    p.show("deliveries: AmoCRM contacts and notes, nightly jobs, postings");
    failures.extend(jobs("third run").await);

    p.show("1C collects its bonus documents (query, success)");
    let mut bonus_docs = 0;
    for _ in 0..1_000 {
        let mut collect = SiteClient::new(&site_url, "1c", "1c-exchange");
        collect.checkauth("sale").await?;
        collect.init("sale").await?;
        let back = collect.query().await?;
        let n = String::from_utf8_lossy(&back).matches("<Документ>").count();
        collect.success().await?;
        bonus_docs += n;
        if n == 0 {
            break;
        }
    }

    p.show("checking the ledger against 1C and AmoCRM");
    let now = clock.now();
    let s = ledger.run(move |l| l.summary(&DateRange::default(), now)).await?;
    let expected_sales = with_bad.sales - bad_malformed + site_truth.sales;
    let expected_returns = with_bad.returns + site_truth.returns;
    let bad_value = with_bad.net_total_kopecks - before_bad.net_total_kopecks;
    let expected_total = with_bad.net_total_kopecks - bad_value + site_truth.net_total;
    let tz = cfg.timezone;
    let today = now.with_timezone(&tz).date_naive();
    let recon = ledger
        .run({
            let cfg = cfg.clone();
            move |l| {
                l.reconcile(
                    today - chrono::Duration::days(400),
                    today,
                    &cfg.books(),
                    today,
                    None,
                )
            }
        })
        .await?;
    let violations = ledger.run(|l| l.verify()).await?;
    let cards = ledger.run(|l| l.customer_ids()).await?;
    let mut contacts_checked = 0;
    let mut contacts_equal = 0;
    for id in cards.iter().take(50) {
        let id = *id;
        let (b, link) = ledger
            .run(move |l| -> crate::ledger::Result<_> {
                let b = l.balance_of(id, now, chrono::Duration::days(14))?;
                Ok((b.available, b.customer.amocrm_id.clone()))
            })
            .await?;
        if let Some(contact) = link.and_then(|c| c.parse::<i64>().ok()) {
            contacts_checked += 1;
            if amo
                .field_value(contact, "KOPILKA_POINTS")
                .and_then(|v| v.parse::<i64>().ok())
                == Some(b)
            {
                contacts_equal += 1;
            }
        }
    }
    p.show("done");
    p.finish();

    println!();
    super::output::summary(&s, false)?;
    println!();
    super::output::reconciliation(&recon, super::Format::Table)?;
    let planted = recon
        .differences
        .iter()
        .filter(|d| d.kind == crate::ledger::DiffKind::Quarantined)
        .count();
    let unexplained = recon.differences.len() - planted;
    println!();
    println!(
        "1C holds {} sales, {} returns, {} RUB net (+{} sales uploaded through the site exchange); \
         the ledger holds {} sales, {} returns, {} RUB",
        with_bad.sales - bad_malformed,
        with_bad.returns,
        Money(with_bad.net_total_kopecks - bad_value),
        site_truth.sales,
        s.sales_count,
        s.returns_count,
        Money(s.sales_total_kopecks)
    );
    println!(
        "malformed documents planted: {} — quarantined: {} (each listed above with its reason)",
        bad_malformed as usize + Malformed::ALL.len().min(site_truth.malformed as usize),
        s.quarantined
    );
    println!(
        "AmoCRM: {contacts_equal} of {contacts_checked} sampled contacts show exactly the ledger's balance"
    );
    println!("1C collected {bonus_docs} bonus documents through the site exchange");
    println!("unexplained differences: {unexplained}");
    println!(
        "ledger verify: {}",
        if violations.is_empty() {
            "every invariant holds".to_string()
        } else {
            format!("{} violations", violations.len())
        }
    );
    for f in &failures {
        println!("job failure: {f}");
    }
    ctx.cancel.cancel();
    let ok = violations.is_empty()
        && failures.is_empty()
        && unexplained == 0
        && s.sales_count == expected_sales
        && s.returns_count == expected_returns
        && s.sales_total_kopecks == expected_total
        && contacts_checked > 0
        && contacts_equal == contacts_checked;
    println!(
        "demo: {}",
        if ok {
            "everything matches"
        } else {
            "MISMATCH (see above)"
        }
    );
    if a.dir.is_some() {
        println!("files kept in {}", dir.display());
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
