//! Issue 20, the 1C OData part: customer attributes kept in 1C's additional attributes
//! (`ДополнительныеРеквизиты` of the people catalogs, named in `[attributes]` of the mapping by
//! the title a person sees) and the tier published back into one of them. Each test starts
//! from what a shop has in 1C — properties created in its form, values typed on a partner's
//! card, receipts at the till — served by the OData simulator (which follows the
//! configuration dumps) over loopback; no SQL edits anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use kopilka::clock::FakeClock;
use kopilka::config::{self, Config, ONEC_TIER};
use kopilka::ledger::{Ledger, OutboxFilter, OutboxState, SharedLedger, deliver_due};
use kopilka::onec::mapping::BUILT_IN;
use kopilka::onec::odata::write::OdataWriter;
use kopilka::onec::odata::{OdataPoller, PollOptions, PollReport, probe};
use kopilka::sim::onec_odata::{Configuration, OdataSim, OdataSimBuilder, RECEIPTS, Val};
use tokio_util::sync::CancellationToken;

const ALL: [Configuration; 3] = [Configuration::Roznica2, Configuration::Unf, Configuration::Ut11];

const RULES: &str = r#"
[program]
return_window_days = 14
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[referral]
referrer_points = 300
referee_points = 200
[tier_policy]
window_days = 3650
[[tiers]]
id = "base"
name = "Базовый"
min_spend_kopecks = 0
[[tiers]]
id = "silver"
name = "Серебряный"
min_spend_kopecks = 300000
[[tiers]]
id = "gold"
name = "Золотой"
min_spend_kopecks = 1500000
"#;

const EMPTY: &str = "00000000-0000-0000-0000-000000000000";

fn local(t: NaiveDateTime) -> DateTime<Utc> {
    chrono_tz::Europe::Moscow
        .from_local_datetime(&t)
        .earliest()
        .expect("a Moscow time")
        .with_timezone(&Utc)
}

/// The built-in mapping of the simulated configuration with `[attributes]` filled in as a
/// shop would: uncommented sources, a tier property.
fn mapping_text(sim: &OdataSim, sources: &[(&str, &str)], tier: Option<&str>) -> String {
    let name = sim.names().mapping;
    let (_, text) = BUILT_IN.iter().find(|(n, _)| *n == name).expect("built in");
    let mut extra = String::new();
    for (k, v) in sources {
        extra.push_str(&format!("{k} = {v:?}\n"));
    }
    let mut text = text.replace(
        "[attributes.sources]\n",
        &format!("[attributes.sources]\n{extra}"),
    );
    if let Some(t) = tier {
        text = text.replace("# tier = \"Уровень лояльности\"", &format!("tier = {t:?}"));
    }
    text
}

fn write_config(dir: &Path, sim: &OdataSim, mapping: &str) -> Arc<Config> {
    let pass = dir.join("odata.pass");
    std::fs::write(&pass, sim.password()).expect("password file");
    std::fs::write(dir.join("rules.toml"), RULES).expect("rules");
    std::fs::write(dir.join("mapping.toml"), mapping).expect("mapping");
    let toml = format!(
        r#"
[general]
timezone = "Europe/Moscow"
[ledger]
path = "{ledger}"
[rules]
path = "{rules}"
[outbox]
max_rows_per_run = 100000
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
        rules = dir.join("rules.toml").display(),
        mapping = dir.join("mapping.toml").display(),
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
    dir: tempfile::TempDir,
    cfg: Arc<Config>,
    ledger: SharedLedger,
    poller: OdataPoller,
}

async fn rig(conf: Configuration, seed: u64, sales: usize) -> Rig {
    let sim = OdataSimBuilder::new(seed)
        .configuration(conf)
        .sales(sales)
        .customers(12)
        .products(15)
        .start()
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("temp dir");
    // a placeholder until the test writes the shop's mapping
    let cfg = write_config(dir.path(), &sim, &mapping_text(&sim, &[], None));
    let ledger = SharedLedger::new(Ledger::open(&cfg.ledger_path, &cfg.ledger).expect("ledger"));
    let poller = OdataPoller::with_options(cfg.clone(), PollOptions::default()).expect("poller");
    Rig {
        sim,
        dir,
        cfg,
        ledger,
        poller,
    }
}

impl Rig {
    /// Writes the shop's mapping and starts a new poller on it (as a restart does).
    fn mapping(&mut self, sources: &[(&str, &str)], tier: Option<&str>) {
        let text = mapping_text(&self.sim, sources, tier);
        self.cfg = write_config(self.dir.path(), &self.sim, &text);
        self.poller = OdataPoller::with_options(self.cfg.clone(), PollOptions::default()).expect("poller");
    }

    fn now(&self) -> DateTime<Utc> {
        local(self.sim.last_date() + Duration::hours(1))
    }

    async fn poll(&self) -> PollReport {
        let report = self
            .poller
            .poll(&self.ledger, self.now(), &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"));
        assert_eq!(
            (report.rejected, report.quarantined),
            (0, 0),
            "{}",
            report.summary()
        );
        report
    }

    fn customer(&self, person: &str) -> Option<i64> {
        self.ledger
            .lock()
            .customer_of_key("onec", person)
            .expect("lookup")
    }
}

/// The customer a receipt names, as the configuration names it.
fn person_of(sim: &OdataSim, key: &str) -> Option<String> {
    let e = sim.entity(RECEIPTS, key)?;
    let field = match sim.names().mapping {
        "ut11" => "Партнер_Key",
        "unf" => "Контрагент_Key",
        _ => "ВладелецДисконтнойКарты",
    };
    match e.get(field) {
        Some(Val::Str(s)) if s != EMPTY && !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// New receipts until `n` people other than `except` have bought; their keys.
fn new_buyers(sim: &OdataSim, n: usize, except: &[String], known: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for _ in 0..500 {
        let key = sim.add_sales(1, None).pop().expect("a sale");
        if let Some(p) = person_of(sim, &key)
            && !except.contains(&p)
            && !out.contains(&p)
            && known(&p)
        {
            out.push(p);
            if out.len() == n {
                return out;
            }
        }
    }
    panic!("fewer than {n} buyers in 500 receipts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_friend_code_typed_in_1c_pays_both_and_ones_own_code_is_refused() {
    for (n, conf) in ALL.into_iter().enumerate() {
        let mut r = rig(conf, 301 + n as u64, 60).await;
        r.sim.add_property("Код друга");
        r.sim.add_property("День рождения");
        // a property kopilka is not told about is never read
        let colour = r.sim.add_property("Любимый цвет");
        r.mapping(
            &[("referral_code", "Код друга"), ("birthday", "День рождения")],
            None,
        );
        r.poll().await;

        // the referrer: someone who bought in the history; the friend and the cheat buy now
        let first = r
            .sim
            .sale_keys()
            .into_iter()
            .find_map(|k| person_of(&r.sim, &k))
            .expect("a buyer");
        let referrer = r.customer(&first).expect("in the ledger");
        let got = new_buyers(&r.sim, 2, std::slice::from_ref(&first), |p| {
            r.customer(p).is_some()
        });
        let (friend, cheat) = (got[0].clone(), got[1].clone());
        let cheat_id = r.customer(&cheat).expect("known");
        let code = |id: i64| r.ledger.lock().referral_code(id).unwrap().expect("a code");
        // a manager types the codes on the customers' cards in 1C
        let friend_key = r.sim.add_property("Код друга"); // the same property: its key
        assert!(
            r.sim
                .set_attribute(&friend, &friend_key, &code(referrer), "Edm.String")
        );
        assert!(r.sim.set_attribute(&friend, &colour, "зелёный", "Edm.String"));
        assert!(
            r.sim
                .set_attribute(&cheat, &friend_key, &code(cheat_id), "Edm.String")
        );
        let bday = r.sim.add_property("День рождения");
        assert!(r.sim.set_attribute(&cheat, &bday, "31.02.1990", "Edm.String"));

        let report = r.poll().await;
        assert!(
            report.applied >= 2,
            "{conf:?}: the cheat's receipt flows: {}",
            report.summary()
        );
        assert!(report.attributes_refused >= 2, "{conf:?}: {}", report.summary());

        let friend_id = r.customer(&friend).expect("known");
        let history = |id: i64| {
            r.ledger
                .lock()
                .attribute_changes(&format!("id:{id}"))
                .expect("history")
        };
        let changes = history(friend_id);
        assert!(
            changes
                .iter()
                .any(|c| c.field == "referred_by" && c.source == "onec" && c.refused.is_none()),
            "{conf:?}: {changes:?}"
        );
        assert!(
            !changes.iter().any(|c| c.new.as_deref() == Some("зелёный")),
            "{conf:?}"
        );
        let cheat_changes = history(cheat_id);
        let refused: Vec<&str> = cheat_changes
            .iter()
            .filter_map(|c| c.refused.as_deref())
            .collect();
        assert!(
            refused.iter().any(|r| r.contains("the customer's own")),
            "{conf:?}: {cheat_changes:?}"
        );
        assert!(
            refused.iter().any(|r| r.contains("not a date")),
            "{conf:?}: {cheat_changes:?}"
        );

        // the same values read again are not refused twice
        r.sim.add_sales(3, None);
        r.poll().await;
        let again = r
            .ledger
            .lock()
            .attribute_changes(&format!("id:{cheat_id}"))
            .expect("history");
        assert_eq!(again.len(), cheat_changes.len(), "{conf:?}");

        // after the friend's first purchase is past its return window, the nightly job pays both
        let later = r.now() + Duration::days(15);
        let cfg = r.cfg.clone();
        let nightly = r
            .ledger
            .run(move |l| {
                let dest = cfg.destinations();
                l.nightly(&cfg.program, &cfg.ingest_context(later, &dest))
            })
            .await
            .expect("nightly");
        assert_eq!(nightly.referral_bonuses, 1, "{conf:?}: {nightly:?}");
        let l = r.ledger.lock();
        let bonus = |id: i64| -> i64 {
            l.history(&format!("id:{id}"))
                .expect("history")
                .1
                .iter()
                .filter(|e| e.kind == "bonus")
                .map(|e| e.points)
                .sum()
        };
        assert_eq!((bonus(referrer), bonus(friend_id)), (300, 200), "{conf:?}");
        assert_eq!(bonus(cheat_id), 0, "{conf:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_is_written_to_the_customers_attribute_and_the_rest_survive() {
    for (n, conf) in ALL.into_iter().enumerate() {
        let mut r = rig(conf, 401 + n as u64, 150).await;
        let level = r.sim.add_property("Уровень лояльности");
        let colour = r.sim.add_property("Любимый цвет");
        r.mapping(&[], Some("Уровень лояльности"));
        assert!(r.cfg.destinations().onec_tier.is_some(), "{conf:?}");
        // the shop's own attributes on every customer's card
        let people: BTreeSet<String> = r
            .sim
            .sale_keys()
            .iter()
            .filter_map(|k| person_of(&r.sim, k))
            .collect();
        for p in &people {
            assert!(r.sim.set_attribute(p, &colour, "зелёный", "Edm.String"));
        }
        r.poll().await;

        let rows = |r: &Rig| {
            r.ledger
                .lock()
                .outbox_list(&OutboxFilter {
                    destination: Some(ONEC_TIER.into()),
                    ..Default::default()
                })
                .expect("outbox")
        };
        let queued = rows(&r);
        let pending: Vec<_> = queued
            .iter()
            .filter(|x| x.state == OutboxState::Pending)
            .collect();
        // customers went base → silver → gold within the history: only the newest is written
        // (the states it replaced were never attempted, so they are gone): more tier events
        // than rows
        let newest_event = pending
            .iter()
            .filter_map(|x| serde_json::from_str::<serde_json::Value>(&x.payload).ok())
            .filter_map(|p| p["tier_event"].as_i64())
            .max()
            .unwrap_or(0);
        assert!(
            newest_event > pending.len() as i64,
            "{conf:?}: {} rows, newest event {newest_event}",
            queued.len()
        );
        assert_eq!(queued.len(), pending.len(), "{conf:?}");
        let mut per_customer: BTreeMap<String, usize> = BTreeMap::new();
        for x in &pending {
            *per_customer
                .entry(x.coalesce_key.clone().unwrap_or_default())
                .or_default() += 1;
        }
        assert!(
            per_customer.values().all(|n| *n == 1),
            "{conf:?}: {per_customer:?}"
        );

        let writer = OdataWriter::new(r.cfg.clone()).expect("writer");
        let clock = FakeClock::new(r.now());
        let report = deliver_due(&r.ledger, &writer.tier_sink(), &r.cfg.delivery, &clock)
            .await
            .expect("delivery");
        assert_eq!(
            (report.delivered, report.dead),
            (pending.len(), 0),
            "{conf:?}: {report:?}"
        );
        assert_eq!(
            r.sim.patches(),
            pending.len() as u64,
            "{conf:?}: one PATCH per customer"
        );

        let names: BTreeMap<&str, &str> =
            [("base", "Базовый"), ("silver", "Серебряный"), ("gold", "Золотой")].into();
        let mut checked = 0;
        for p in &people {
            let Some(id) = r.customer(p) else { continue };
            let tier = r
                .ledger
                .lock()
                .balance_of(id, r.now(), Duration::days(30))
                .expect("balance")
                .tier;
            let Some(tier) = tier else { continue };
            let attrs = r.sim.attributes_of(p);
            assert!(
                attrs.contains(&(
                    level.clone(),
                    names[tier.as_str()].to_string(),
                    "Edm.String".into()
                )),
                "{conf:?} {p}: {attrs:?}"
            );
            assert!(
                attrs.contains(&(colour.clone(), "зелёный".into(), "Edm.String".into())),
                "{conf:?} {p}: the shop's own attribute survives: {attrs:?}"
            );
            assert_eq!(attrs.len(), 2, "{conf:?}: {attrs:?}");
            checked += 1;
        }
        assert!(checked >= 3, "{conf:?}: {checked}");

        // delivered again (an answer lost): the row already says it, nothing is written
        let before = r.sim.patches();
        for x in rows(&r)
            .iter()
            .filter(|x| x.state == OutboxState::Delivered)
            .take(2)
        {
            writer.deliver_row(x).await.expect("again");
        }
        assert_eq!(r.sim.patches(), before, "{conf:?}");

        // a later change: the newest tier replaces the old one in the same row
        let buyer = new_buyers(&r.sim, 1, &[], |p| r.customer(p).is_some())
            .pop()
            .expect("buyer");
        let id = r.customer(&buyer).expect("known");
        let was = r
            .ledger
            .lock()
            .balance_of(id, r.now(), Duration::days(30))
            .expect("balance")
            .tier;
        let mut spent = 0;
        while r
            .ledger
            .lock()
            .balance_of(id, r.now(), Duration::days(30))
            .expect("balance")
            .tier
            == was
            && spent < 40
        {
            // the buyer comes back until the tier moves (or is at the top already)
            if was.as_deref() == Some("gold") {
                break;
            }
            let k = r.sim.add_sales(1, None).pop().expect("sale");
            if person_of(&r.sim, &k).as_deref() == Some(buyer.as_str()) {
                spent += 1;
            }
            r.poll().await;
        }
        let now_tier = r
            .ledger
            .lock()
            .balance_of(id, r.now(), Duration::days(30))
            .expect("balance")
            .tier;
        let clock = FakeClock::new(r.now());
        deliver_due(&r.ledger, &writer.tier_sink(), &r.cfg.delivery, &clock)
            .await
            .expect("delivery");
        let attrs = r.sim.attributes_of(&buyer);
        let want = names[now_tier.as_deref().expect("a tier")];
        assert_eq!(
            attrs
                .iter()
                .filter(|(p, _, _)| *p == level)
                .map(|(_, v, _)| v.as_str())
                .collect::<Vec<_>>(),
            vec![want],
            "{conf:?}: {attrs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_names_a_property_1c_does_not_have() {
    let mut r = rig(Configuration::Ut11, 501, 20).await;
    r.sim.add_property("Код друга");
    r.sim.add_property("Уровень лояльности");
    r.mapping(&[("referral_code", "Код друга")], Some("Уровень лояльности"));
    let report = probe(&r.cfg).await.expect("probe");
    assert!(report.ok(), "{report}");
    // a title typed differently from 1C's form, and one nobody created
    r.mapping(
        &[("referral_code", "Код Друга "), ("birthday", "День рожденья")],
        Some("Уровень"),
    );
    let report = probe(&r.cfg).await.expect("probe");
    let got: Vec<(String, String)> = report
        .missing
        .iter()
        .map(|m| (m.what.clone(), m.needed_by.clone()))
        .collect();
    let chart = "ChartOfCharacteristicTypes_ДополнительныеРеквизитыИСведения";
    assert_eq!(
        got,
        vec![
            (
                format!("additional attribute \"День рожденья\" in {chart}"),
                "attributes.sources.birthday".to_string()
            ),
            (
                format!("additional attribute \"Уровень\" in {chart}"),
                "attributes.tier".to_string()
            ),
        ],
        "{report}"
    );
    assert!(report.to_string().contains("День рожденья"), "{report}");
    // nothing named, nothing probed: the chart need not even be published
    r.sim.hide_set(chart);
    r.mapping(&[], None);
    assert!(probe(&r.cfg).await.expect("probe").ok());
}
