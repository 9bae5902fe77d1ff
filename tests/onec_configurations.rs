//! kopilka against each configuration's simulated base (Розница 2, УНФ 3.0 = Розница 3.0,
//! УТ 11; `src/sim/onec_odata.rs` follows their configuration dumps, named there): the built-in
//! mapping with no overrides reads every sale, return, point paid and card owner right, the
//! probe finds every name, and after migrating 1C's own balances, polls and postbacks 1C's
//! register equals the ledger for every customer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};

use kopilka::clock::{Clock, FakeClock};
use kopilka::config::{self, Config, ONEC_BONUS};
use kopilka::ledger::{DateRange, Ledger, SharedLedger, deliver_due};
use kopilka::onec::odata::write::OdataWriter;
use kopilka::onec::odata::{OdataPoller, PollOptions, import_balances_from_1c_at, probe};
use kopilka::sim::onec_odata::{Configuration, OdataSim, OdataSimBuilder};
use tokio_util::sync::CancellationToken;

const ALL: [Configuration; 3] = [Configuration::Roznica2, Configuration::Unf, Configuration::Ut11];

fn local(t: NaiveDateTime) -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .from_local_datetime(&t)
        .earliest()
        .expect("a Moscow time")
        .with_timezone(&Utc)
}

fn write_config(dir: &Path, sim: &OdataSim, mapping: &str) -> Arc<Config> {
    let pass = dir.join("odata.pass");
    std::fs::write(&pass, sim.password()).expect("password file");
    let toml = format!(
        r#"
[general]
timezone = "Europe/Moscow"
[ledger]
path = "{ledger}"
[program]
point_value_kopecks = 100
[accounting]
postback = "odata"
[onec]
system = "onec"
[onec.odata]
url = "{url}"
user = "{user}"
password_file = "{pass}"
mapping = "{mapping}"
page_size = 100
"#,
        ledger = dir.join("kopilka.db").display(),
        url = sim.base_url(),
        user = sim.user(),
        pass = pass.display(),
    );
    let file = dir.join("kopilka.toml");
    std::fs::write(&file, toml).expect("config file");
    Arc::new(config::load(Some(&file), &[]).unwrap_or_else(|r| panic!("{r}")))
}

struct Rig {
    sim: OdataSim,
    _dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ledger: SharedLedger,
}

async fn rig(conf: Configuration, seed: u64, start: Option<DateTime<Utc>>) -> Rig {
    let mut b = OdataSimBuilder::new(seed)
        .configuration(conf)
        .sales(240)
        .customers(30)
        .products(40)
        .returns_percent(15);
    if let Some(s) = start {
        b = b.starting_at(s);
    }
    let sim = b.start().await.expect("sim");
    // later returns and till returns of sales with points paid, where there are any
    for (i, k) in sim.sale_keys().iter().enumerate().filter(|(i, _)| i % 11 == 5) {
        if i % 2 == 0 {
            sim.add_return(k);
        } else {
            sim.add_till_return(k);
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(dir.path(), &sim, sim.names().mapping);
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).expect("ledger"));
    Rig {
        sim,
        _dir: dir,
        cfg,
        ledger,
    }
}

impl Rig {
    fn now(&self) -> DateTime<Utc> {
        local(self.sim.last_date() + chrono::Duration::hours(1))
    }

    async fn poll(&self) {
        self.poll_at(self.now()).await;
    }

    async fn poll_at(&self, at: DateTime<Utc>) {
        let poller = OdataPoller::with_options(self.cfg.clone(), PollOptions::default()).expect("poller");
        let report = poller
            .poll(&self.ledger, at, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"));
        assert_eq!(
            (report.rejected, report.quarantined),
            (0, 0),
            "{}",
            report.summary()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_configuration_is_read_right_to_the_kopeck_with_its_built_in_mapping() {
    for (n, conf) in ALL.into_iter().enumerate() {
        let r = rig(conf, 40 + n as u64, None).await;
        r.poll().await;
        let now = r.now();
        let s = r
            .ledger
            .lock()
            .summary(&DateRange::default(), now)
            .expect("summary");
        let t = r.sim.truth();
        assert!(t.returns > 3 && t.sales > 200, "{conf:?}: {t:?}");
        assert_eq!(
            (s.sales_count, s.returns_count, s.sales_total_kopecks),
            (t.sales, t.returns, t.net_total_kopecks),
            "{conf:?}: ledger {s:?} vs base {t:?}"
        );
        // points paid at the till, as 1C's register has them: every customer's balance
        // moved exactly as 1C's own (no opening balances imported, nothing posted back yet:
        // the ledger's redemptions and give-backs are 1C's register movements after the
        // history began, its accruals are kopilka's)
        assert!(s.points_redeemed > 0, "{conf:?}: {s:?}");
        let before = r
            .sim
            .register_balances(r.sim.shop().start - chrono::Duration::hours(1));
        let after = r.sim.register_balances(now + chrono::Duration::days(1));
        let warn = chrono::Duration::days(14);
        let mut owners = 0;
        for (b, a) in before.iter().zip(&after) {
            let spent_in_1c = b.points - a.points;
            let Ok(view) = r
                .ledger
                .lock()
                .balance(&format!("onec:{}", a.person_key), now, warn)
            else {
                assert_eq!(spent_in_1c, 0, "{conf:?}: {a:?} paid with points but is unknown");
                continue;
            };
            owners += 1;
            // the card's owner is who 1C says, found through the card
            assert_eq!(view.customer.card.as_deref(), a.card.as_deref(), "{conf:?}");
            let (_, history) = r
                .ledger
                .lock()
                .history(&format!("onec:{}", a.person_key))
                .expect("history");
            let redemptions: Vec<i64> = history
                .iter()
                .filter(|h| h.kind == "redemption")
                .map(|h| h.tx_id)
                .collect();
            let paid: i64 = history
                .iter()
                .filter(|h| h.kind == "redemption" || h.reverses.is_some_and(|x| redemptions.contains(&x)))
                .map(|h| -h.points)
                .sum();
            assert_eq!(paid, spent_in_1c, "{conf:?}: points paid and given back of {a:?}");
        }
        assert!(owners > 10, "{conf:?}: {owners} customers");
        // issue 20, finding S5: the birth date 1C keeps on the customer reaches the ledger
        // (Розница 2: natural persons have one, counterparties have no such field)
        let (mut with, mut without) = (0, 0);
        for i in 0..r.sim.shop().customers.len() {
            let Ok(view) = r
                .ledger
                .lock()
                .balance(&format!("onec:{}", r.sim.person_key(i)), now, warn)
            else {
                continue;
            };
            let expected = r.sim.birthday_in_base(i);
            assert_eq!(
                view.customer.birthday,
                expected.map(|d| d.to_string()),
                "{conf:?}: customer {i}"
            );
            with += usize::from(expected.is_some());
            without += usize::from(
                expected.is_none() && kopilka::sim::onec_odata::OdataSim::birthday_of(i).is_some(),
            );
        }
        assert!(with > 3, "{conf:?}: {with} birthdays");
        // and it pays the birthday bonus on the day, with no other step (issue 20)
        let (i, born) = (0..r.sim.shop().customers.len())
            .find_map(|i| {
                let born = r.sim.birthday_in_base(i)?;
                r.ledger
                    .lock()
                    .balance(&format!("onec:{}", r.sim.person_key(i)), now, warn)
                    .ok()
                    .map(|_| (i, born))
            })
            .expect("a customer with a birth date in 1C");
        let mut rules = r.cfg.program.clone();
        rules.birthday = Some(kopilka::core::rules::Birthday {
            points: 300,
            days_before: 0,
            days_after: 0,
        });
        let day = chrono::NaiveDate::from_ymd_opt(
            2026,
            chrono::Datelike::month(&born),
            chrono::Datelike::day(&born),
        )
        .unwrap_or_else(|| chrono::NaiveDate::from_ymd_opt(2026, 3, 1).expect("a date"));
        let noon = day
            .and_hms_opt(12, 0, 0)
            .expect("noon")
            .and_local_timezone(chrono_tz::Europe::Moscow)
            .single()
            .expect("one noon")
            .with_timezone(&Utc);
        let key = format!("onec:{}", r.sim.person_key(i));
        let dest = r.cfg.destinations();
        let paid = r
            .ledger
            .lock()
            .birthday_bonuses(&rules, &r.cfg.ingest_context(noon, &dest))
            .expect("birthday job");
        assert!(paid >= 1, "{conf:?}");
        let (_, entries) = r.ledger.lock().history(&key).expect("history");
        assert!(
            entries.iter().any(|e| e.kind == "bonus" && e.points == 300),
            "{conf:?}: customer {i} born {born}: {entries:?}"
        );
        if conf == Configuration::Roznica2 {
            assert!(
                without > 0,
                "a counterparty's birth date is not read where there is none"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_finds_every_name_of_each_configuration_and_every_wrong_one() {
    for (n, conf) in ALL.into_iter().enumerate() {
        let r = rig(conf, 60 + n as u64, None).await;
        let report = probe(&r.cfg).await.expect("probe");
        assert!(report.ok(), "{conf:?}: {report}");
        assert!(
            report.looks_like.iter().any(|m| m == r.sim.names().mapping),
            "{conf:?}: {report}"
        );
        // Розница 3.0 is УНФ-shaped: an УНФ base publishes every name `roznica3` uses
        if conf == Configuration::Unf {
            assert!(report.looks_like.iter().any(|m| m == "roznica3"), "{report}");
        }
    }
    // a mapping written from guesses: each wrong name is named with the key that needs it
    let r = rig(Configuration::Roznica2, 70, None).await;
    let text = include_str!("../mappings/1c/roznica2.toml")
        .replace(
            "card = \"ДисконтнаяКарта_Key\"        # → Catalog_ИнформационныеКарты (#14)",
            "card = \"КартаЛояльности_Key\"",
        )
        .replace("number = [\"КодКарты\"]", "number = [\"Штрихкод\"]")
        .replace("set = \"Catalog_ФизическиеЛица\"", "set = \"Catalog_Партнеры\"")
        .replace(
            "holder = \"ДисконтнаяКарта_Key\"                 # #52: the register is kept per card",
            "holder = \"Партнер_Key\"",
        )
        .replace("rows = \"Начисление\"", "rows = \"НачисленияБонусов\"");
    let file = r._dir.path().join("guessed.toml");
    std::fs::write(&file, text).expect("mapping file");
    let cfg_text = std::fs::read_to_string(r.cfg.file.as_ref().expect("file"))
        .expect("config")
        .replace(
            "mapping = \"roznica2\"",
            &format!("mapping = {:?}", file.display().to_string()),
        );
    let cfg_file = r._dir.path().join("guessed-kopilka.toml");
    std::fs::write(&cfg_file, cfg_text).expect("config");
    let cfg = config::load(Some(&cfg_file), &[]).unwrap_or_else(|e| panic!("{e}"));
    let report = probe(&cfg).await.expect("probe");
    let mut got: Vec<(String, String)> = report
        .missing
        .iter()
        .map(|m| (m.what.clone(), m.needed_by.clone()))
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = [
        ("entity set Catalog_Партнеры", "people.set"),
        (
            "field AccumulationRegister_БонусныеБаллы.Партнер_Key",
            "bonus.holder",
        ),
        ("field Catalog_ИнформационныеКарты.Штрихкод", "cards.number[0]"),
        ("field Document_ЧекККМ.КартаЛояльности_Key", "documents[0].card"),
        (
            "tabular section Document_НачислениеИСписаниеБонусныхБаллов.НачисленияБонусов",
            "bonus_document rows",
        ),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want, "{report}");
}

/// 1C's spendable balance per customer equals the ledger's total (available and pending:
/// 1C has kopilka's accruals at once, the ledger holds them through the return window).
fn assert_register_equals_ledger(r: &Rig, at: DateTime<Utc>, when: &str) {
    let warn = chrono::Duration::days(14);
    let mut compared = 0;
    for b in r.sim.register_balances(at) {
        let ledger = r
            .ledger
            .lock()
            .balance(&format!("onec:{}", b.person_key), at, warn)
            .map_or(0, |v| v.available + v.pending - v.debt);
        assert_eq!(ledger, b.points, "{when}: customer {b:?}");
        compared += 1;
    }
    assert!(compared >= 30, "{when}: {compared}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_migration_polls_and_postbacks_1c_register_equals_the_ledger() {
    for (n, conf) in ALL.into_iter().enumerate() {
        let start = Utc.with_ymd_and_hms(2026, 9, 1, 7, 0, 0).single().expect("date");
        let r = rig(conf, 80 + n as u64, Some(start)).await;
        // the migration, an hour before the history kopilka reads
        let import_at = start - chrono::Duration::hours(1);
        let expected = r.sim.register_balances(import_at);
        let report = import_balances_from_1c_at(&r.cfg, &r.ledger, import_at)
            .await
            .expect("import");
        assert!(report.problems.is_empty(), "{conf:?}: {report:?}");
        assert_eq!(
            report.points_imported,
            expected.iter().map(|b| b.points).sum::<i64>(),
            "{conf:?}: 1C's spendable balance at the date, not deferred or burnt points"
        );
        assert_register_equals_ledger(&r, import_at, &format!("{conf:?} after the import"));
        // 1C's burn dates are kept: points burning in a year, none for the rest
        let burning: HashMap<i64, usize> = {
            let l = r.ledger.lock();
            let mut m = HashMap::new();
            for b in &expected {
                if let Ok(v) = l.balance(
                    &format!("onec:{}", b.person_key),
                    import_at,
                    chrono::Duration::days(400),
                ) {
                    *m.entry(v.expiring.points).or_default() += 1;
                }
            }
            m
        };
        assert!(
            burning.keys().any(|p| *p > 0) && burning.get(&0).is_some_and(|n| *n > 0),
            "{conf:?}: some customers have points burning within 400 days, some none: {burning:?}"
        );
        // nothing read from 1C waits to be posted back to it
        let queued = |r: &Rig| {
            r.ledger
                .lock()
                .outbox_list(&kopilka::ledger::OutboxFilter {
                    destination: Some(ONEC_BONUS.into()),
                    ..Default::default()
                })
                .expect("outbox")
                .len()
        };
        assert_eq!(queued(&r), 0, "{conf:?}");

        r.poll().await;
        let clock = FakeClock::new(r.now());
        let writer = OdataWriter::new(r.cfg.clone()).expect("writer");
        let sink = writer.bonus_sink();
        let report = deliver_due(&r.ledger, &sink, &r.cfg.delivery, &clock)
            .await
            .expect("delivery");
        assert!(report.delivered > 0 && report.dead == 0, "{conf:?}: {report:?}");
        assert_register_equals_ledger(&r, clock.now(), &format!("{conf:?} after polls and postbacks"));

        // 1C's people edit, unpost and return; kopilka follows; the register still agrees
        let keys = r.sim.sale_keys();
        r.sim.edit(&keys[3]);
        r.sim.set_posted(&keys[7], false);
        r.sim.add_return(&keys[9]);
        // the edits are of old documents, beyond the overlap: the next re-scan sees them
        let later = r.now() + chrono::Duration::hours(25);
        r.poll_at(later).await;
        let clock = FakeClock::new(later);
        let report = deliver_due(&r.ledger, &sink, &r.cfg.delivery, &clock)
            .await
            .expect("delivery");
        assert_eq!(report.dead, 0, "{conf:?}: {report:?}");
        assert_register_equals_ledger(&r, clock.now(), &format!("{conf:?} after changes"));
    }
}
