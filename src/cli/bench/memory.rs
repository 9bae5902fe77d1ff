//! Item 2, memory: peak RSS (`VmHWM`) of `kopilka import` at N/10 and N sales (100k and 1M
//! in the full run), each import in a child process of its own so each has its own peak.
//! Streaming means the peak does not grow with the file. Target: ≤ 64 MiB at any N.

use super::backfill::{self, ChildImport};
use super::{Check, Ctx, Outcome, mib, thousands};

/// The flat-memory bound: how much the larger import's peak may exceed the smaller one's
/// before it counts as growing with N (allocator noise, SQLite's page cache filling up).
const GROWTH_TOLERANCE_KIB: u64 = 8 * 1024;
const TARGET_KIB: u64 = 64 * 1024;

pub fn run(ctx: &mut Ctx) -> anyhow::Result<Outcome> {
    let n = backfill::default_sales(ctx);
    let sizes = [(n / 10).max(1), n];
    ctx.say(format!(
        "memory: peak RSS of kopilka import at {} and {} sales, one child process each",
        thousands(sizes[0] as u64),
        thousands(sizes[1] as u64)
    ));
    let mut runs: Vec<ChildImport> = Vec::new();
    for &size in &sizes {
        let c = match ctx.imports.get(&size) {
            Some(c) => c.clone(),
            None => {
                let (file, bytes) = backfill::documents_file(ctx, size)?;
                let c = backfill::import_in_child(ctx, size, &file, bytes)?;
                ctx.imports.insert(size, c.clone());
                c
            }
        };
        ctx.say(format!(
            "  {:>9} sales ({:>5.0} MiB file): peak RSS {}  ({:.0} sales/s)",
            thousands(size as u64),
            c.file_bytes as f64 / 1_048_576.0,
            mib(c.peak_rss_kib),
            c.sales_per_second()
        ));
        runs.push(c);
    }
    let small = runs[0].peak_rss_kib;
    let large = runs[1].peak_rss_kib;
    let growth = large.saturating_sub(small);
    let worst = small.max(large);
    let figures = serde_json::json!({
        "runs": runs.iter().map(|c| serde_json::json!({
            "sales": c.sales, "file_bytes": c.file_bytes, "peak_rss_kib": c.peak_rss_kib,
        })).collect::<Vec<_>>(),
        "growth_kib": growth,
    });
    Ok(Outcome {
        item: "memory",
        figures,
        checks: vec![
            Check {
                item: "memory",
                what: format!("peak RSS of import, worst of {} and {}", sizes[0], sizes[1]),
                value: mib(worst),
                target: "≤ 64 MiB".into(),
                met: worst <= TARGET_KIB,
            },
            Check {
                item: "memory",
                what: format!("peak RSS growth from {} to {} sales", sizes[0], sizes[1]),
                value: mib(growth),
                target: "≈ 0 (≤ 8 MiB)".into(),
                met: growth <= GROWTH_TOLERANCE_KIB,
            },
        ],
    })
}
