//! `bench site`: 1C uploading one big documents file through the site exchange at two chunk
//! sizes (`file_limit` 1 MiB and 8 MiB), timed from `checkauth` to the `import` reply. A file
//! is imported once, when complete, so the small chunks cost only their HTTP round trips; the
//! target is that the two times are within 20 % of each other.

use std::sync::Arc;
use std::time::Instant;

use super::{Check, Ctx, Outcome, data};
use crate::clock::SystemClock;
use crate::config;
use crate::ledger::{Ledger, SharedLedger};
use crate::onec::site_exchange::SiteExchange;
use crate::sim::commerceml::{GenerateSpec, WriterOptions, generate};
use crate::sim::onec_site::SiteClient;
use crate::sim::sales::Shop;

pub fn run(ctx: &Ctx, mb: Option<usize>) -> anyhow::Result<Outcome> {
    let mb = mb.unwrap_or(if ctx.quick { 4 } else { 60 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(upload(ctx, mb))
}

async fn once(dir: &std::path::Path, chunk: u64, file: &[u8]) -> anyhow::Result<(f64, usize)> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("site-password"), "bench")?;
    let cfg_path = dir.join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\nexchange_dir = \"{}\"\n[onec.site_exchange]\nuser = \"1c\"\n\
             password_file = \"site-password\"\nzip = false\nfile_limit_bytes = {chunk}\n",
            dir.join("k.db").display(),
            dir.join("exchange").display()
        ),
    )?;
    let cfg = Arc::new(config::load(Some(&cfg_path), &[])?);
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger)?);
    let exchange = SiteExchange::new(cfg, ledger, Arc::new(SystemClock), dir.join("exchange/site"))
        .ok_or_else(|| anyhow::anyhow!("site exchange not configured"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/1c_exchange.php", listener.local_addr()?);
    let router = exchange.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let started = Instant::now();
    let mut onec = SiteClient::new(&url, "1c", "bench");
    onec.checkauth("sale").await?;
    onec.init("sale").await?;
    let chunks = file.len().div_ceil(onec.file_limit.max(1));
    onec.upload("sale", "orders-bench_1.xml", file).await?;
    let reply = onec.import("sale", "orders-bench_1.xml").await?;
    let secs = started.elapsed().as_secs_f64();
    server.abort();
    anyhow::ensure!(reply.starts_with("success"), "import replied {reply:?}");
    anyhow::ensure!(exchange.stats().files_imported == 1, "imported once");
    Ok((secs, chunks))
}

async fn upload(ctx: &Ctx, mb: usize) -> anyhow::Result<Outcome> {
    // about 4 KB per generated sale of 3 lines (measured: 232.4 MB for 57,195 sales)
    let sales = mb * 1_000_000 / 4_060;
    let shop = Shop::generate(5, 500, 5_000);
    let spec = GenerateSpec {
        seed: 5,
        sales,
        returns: sales / 50,
        malformed: 0,
        lines: 3,
    };
    let (_, file) = generate(&shop, spec, WriterOptions::default(), Vec::new())?;
    ctx.say(format!(
        "site: one {:.1} MB documents file ({} sales) uploaded through the site exchange at 1 MiB and 8 MiB chunks",
        file.len() as f64 / 1e6,
        super::thousands(sales as u64)
    ));
    let mut times = Vec::new();
    for (i, chunk) in [1u64 << 20, 8 << 20].into_iter().enumerate() {
        let dir = ctx.work.path(&format!("site-{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (secs, chunks) = once(&dir, chunk, &file).await?;
        ctx.say(format!(
            "  {} MiB chunks: {chunks} file calls, checkauth to import reply {}",
            chunk >> 20,
            data::secs(std::time::Duration::from_secs_f64(secs))
        ));
        times.push(secs);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let ratio = times[0] / times[1].max(1e-9);
    Ok(Outcome {
        item: "site",
        figures: serde_json::json!({
            "file_bytes": file.len(),
            "sales": sales,
            "seconds_1mib": times[0],
            "seconds_8mib": times[1],
            "ratio": ratio,
        }),
        checks: vec![Check {
            item: "site",
            what: format!(
                "{} MB upload, time at 1 MiB ÷ time at 8 MiB chunks",
                file.len() / 1_000_000
            ),
            value: format!("{ratio:.2}"),
            target: "0.8..=1.2".into(),
            met: (0.8..=1.2).contains(&ratio),
        }],
    })
}
