//! Backup and restore as IT does it: `kopilka ledger backup` while the ledger is in use, more
//! sales and deliveries, `kopilka ledger restore` (refused while a daemon holds the ledger),
//! then the jobs again. The ledger converges to the same totals, and the 1C OData simulator and
//! the AmoCRM simulator hold every movement once: what was already delivered is recognised by
//! its idempotency key.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kopilka::clock::SystemClock;
use kopilka::config;
use kopilka::daemon::{JobContext, run_once};
use kopilka::ledger::{DateRange, Ledger, OpenOptions, OutboxFilter, OutboxState, SharedLedger, Summary};
use kopilka::onec::postback::document_id;
use kopilka::sim::amocrm::AmoSim;
use kopilka::sim::onec_odata::{OdataSim, OdataSimBuilder};

fn kopilka(cfg: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kopilka"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn context(cfg: &Arc<config::Config>) -> JobContext {
    JobContext {
        cfg: cfg.clone(),
        ledger: SharedLedger::new(Ledger::open(&cfg.ledger_path, &OpenOptions::default()).unwrap()),
        clock: Arc::new(SystemClock),
        cancel: tokio_util::sync::CancellationToken::new(),
    }
}

/// Runs every job until a run leaves nothing pending (three runs at most).
async fn settle(ctx: &JobContext) {
    for _ in 0..3 {
        let failures: Vec<String> = run_once(ctx, None)
            .await
            .into_iter()
            .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e:#}")))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }
}

#[derive(Debug, PartialEq, Eq)]
struct State {
    summary: Summary,
    /// delivered bonus rows, and the documents the 1C simulator holds for them
    bonus_rows: usize,
    bonus_docs: usize,
    /// documents in 1C that no row of this ledger accounts for
    strangers: usize,
    contacts: usize,
    fields_equal: bool,
}

async fn state(ctx: &JobContext, onec: &OdataSim, amo: &AmoSim, set: &str) -> State {
    let now = chrono::Utc::now();
    let summary = ctx
        .ledger
        .run(move |l| l.summary(&DateRange::default(), now))
        .await
        .unwrap();
    let rows = ctx
        .ledger
        .run(|l| {
            l.outbox_list(&OutboxFilter {
                destination: Some(config::ONEC_BONUS.into()),
                ..Default::default()
            })
        })
        .await
        .unwrap();
    assert!(
        rows.iter().all(|r| r.state == OutboxState::Delivered),
        "all delivered"
    );
    let ids: BTreeSet<String> = rows.iter().map(|r| document_id(r).to_string()).collect();
    let docs = onec.entities(set);
    let strangers = docs.iter().filter(|d| !ids.contains(&d.key)).count();
    let ids_owned = ctx.ledger.run(|l| l.customer_ids()).await.unwrap();
    let mut fields_equal = true;
    for id in ids_owned {
        let (b, link) = ctx
            .ledger
            .run(move |l| -> kopilka::ledger::Result<_> {
                let b = l.balance_of(id, now, chrono::Duration::days(14))?;
                Ok((b.available, b.customer.amocrm_id.clone()))
            })
            .await
            .unwrap();
        if let Some(c) = link.and_then(|c| c.parse::<i64>().ok()) {
            fields_equal &= amo.field_value(c, "KOPILKA_POINTS").and_then(|v| v.parse().ok()) == Some(b);
        }
    }
    State {
        summary,
        bonus_rows: rows.len(),
        bonus_docs: docs.len(),
        strangers,
        contacts: amo.contact_ids().len(),
        fields_equal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_ledger_converges_and_nothing_is_doubled_in_1c_or_amocrm() {
    let dir = tempfile::tempdir().unwrap();
    let onec = OdataSimBuilder::new(31)
        .sales(300)
        .customers(40)
        .products(40)
        .lines(2)
        .start()
        .await
        .unwrap();
    let token = "restore-token";
    let amo = AmoSim::builder()
        .requests_per_second(50)
        .long_lived_token(token, chrono::Utc::now() + chrono::Duration::days(30))
        .start()
        .await
        .unwrap();
    std::fs::write(dir.path().join("odata-password"), onec.password()).unwrap();
    std::fs::write(dir.path().join("amocrm-token"), token).unwrap();
    let cfg_path = dir.path().join("kopilka.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[ledger]\npath = \"{}\"\n[onec]\ncost_price_type = \"Закупочная\"\n[onec.odata]\nurl = \"{}\"\nuser = \"{}\"\n\
             password_file = \"odata-password\"\noverlap_minutes = 44640\n[amocrm]\nbase_url = \"{}\"\n\
             token_file = \"amocrm-token\"\nrequests_per_second = 50\n[accounting]\nentity = \"{}\"\npostback = \"odata\"\n",
            dir.path().join("k.db").display(),
            onec.base_url(),
            onec.user(),
            amo.base_url,
            kopilka::sim::onec_odata::ORGANIZATION,
        ),
    )
    .unwrap();
    let cfg = Arc::new(config::load(Some(&cfg_path), &[]).unwrap_or_else(|e| panic!("{e}")));
    let mapping = kopilka::onec::mapping::load("roznica", None).unwrap();
    let set = mapping.bonus_document.expect("a bonus document").set;

    let ctx = context(&cfg);
    settle(&ctx).await;
    // a backup taken while the ledger is open and in use
    let backup = dir.path().join("backup.db");
    let out = kopilka(&cfg_path, &["ledger", "backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let at_backup = state(&ctx, &onec, &amo, &set).await;

    // life goes on: more sales, a return, deliveries to 1C and AmoCRM
    let keys = onec.sale_keys();
    onec.add_sales(25, None);
    onec.add_return(&keys[7]);
    settle(&ctx).await;
    let before = state(&ctx, &onec, &amo, &set).await;
    assert!(before.summary.sales_count > at_backup.summary.sales_count);
    assert!(before.bonus_docs > at_backup.bonus_docs);
    assert_eq!((before.bonus_docs, before.strangers), (before.bonus_rows, 0));

    // restore is refused while a daemon holds the ledger
    let lock = kopilka::ledger::backup::try_lock(&cfg.ledger_path)
        .unwrap()
        .expect("free");
    let out = kopilka(&cfg_path, &["ledger", "restore", backup.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("daemon holds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lock);
    drop(ctx);
    let out = kopilka(&cfg_path, &["ledger", "restore", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // the restored ledger is the backup's; the jobs read again from its checkpoints
    let ctx = context(&cfg);
    let restored = state(&ctx, &onec, &amo, &set).await;
    assert_eq!(restored.summary, at_backup.summary);
    settle(&ctx).await;
    let after = state(&ctx, &onec, &amo, &set).await;
    assert_eq!(
        after, before,
        "the same totals; every movement once in 1C and AmoCRM"
    );
    assert!(after.fields_equal);
    let violations = ctx.ledger.run(|l| l.verify()).await.unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Every ledger has its own id, kept across reopening and in its backups, so two ledgers (a
/// rebuilt one, a second instance, a test copy) never name different movements alike in 1C.
#[test]
fn each_ledger_has_its_own_id_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    let uid = |p: &Path| {
        Ledger::open(p, &OpenOptions::default())
            .unwrap()
            .ledger_uid()
            .unwrap()
    };
    let (ua, ub) = (uid(&a), uid(&b));
    assert_ne!(ua, ub);
    assert_eq!(ua.len(), 12);
    assert_eq!(uid(&a), ua, "stable when reopened");
    let copy = dir.path().join("copy.db");
    Ledger::open(&a, &OpenOptions::default())
        .unwrap()
        .backup_to(&copy)
        .unwrap();
    assert_eq!(uid(&copy), ua, "a backup is the same ledger");
}
