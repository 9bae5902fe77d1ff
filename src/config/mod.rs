//! Configuration: a TOML file plus `KOPILKA_SECTION__KEY` environment overrides.
//!
//! Two stages. [`load`] reads the raw values with the `config` crate and deserialises each
//! section on its own, collecting every unknown key (through `serde_ignored`, so that all of
//! them are reported at once rather than only the first, which is all `deny_unknown_fields`
//! could do) and every type error. [`validate`] then checks meanings (ranges, time zones) and
//! collects every problem too. The result is one report naming each bad key with its path
//! and the file (or the environment) it came from; `kopilka check` prints exactly that and
//! exits 78 (EX_CONFIG) so systemd does not restart-loop on a typo.

mod connectors;
mod holds;
mod notify;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::Duration;
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::core::document::DocumentLimits;
use crate::core::money::Money;
use crate::core::rules::RuleSet;
use crate::ledger::{DeliveryPolicy, OpenOptions};
pub use holds::{HoldMatch, HoldsConfig};
pub use notify::{EmailConfig, NotifyConfig, SalesbotConfig, SmtpTls, TelegramConfig};

pub use connectors::{
    AmocrmAuth, AmocrmConfig, DiscountServerConfig, Keep, LoyaltyServerConfig, OdataConfig, OnecConfig,
    Orders, Secret, SiteExchangeConfig, read_secret,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kopilka/kopilka.toml";
pub const DEFAULT_LEDGER_PATH: &str = "/var/lib/kopilka/kopilka.db";
/// EX_CONFIG from sysexits.h; `RestartPreventExitStatus=78` in the unit.
pub const EXIT_CONFIG: i32 = 78;

/// One problem with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `ledger.no_such_key`.
    pub key: String,
    /// The file path, or "the environment".
    pub origin: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.key, self.message)
    }
}

/// Every problem found, in the order of the keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report(pub Vec<Issue>);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "configuration has {} problem(s):", self.0.len())?;
        for i in &self.0 {
            writeln!(f, "  {i}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// A decimal written as a string (`"2.5"`) or an integer; floats are refused so that
/// rates stay exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecimalText(pub Decimal);

impl<'de> Deserialize<'de> for DecimalText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DecimalText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal as a string, e.g. \"2.5\", or an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DecimalText, E> {
                Ok(DecimalText(Decimal::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DecimalText, E> {
                Ok(DecimalText(Decimal::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DecimalText, E> {
                Err(E::custom(format!(
                    "{v} is a float; write it as a string (\"{v}\") so it stays exact"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DecimalText, E> {
                crate::core::money::parse_decimal(v)
                    .map(DecimalText)
                    .map_err(|e| E::custom(format!("{e}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawGeneral {
    timezone: Option<String>,
    currency: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawLedger {
    path: Option<PathBuf>,
    busy_timeout_ms: Option<u64>,
    synchronous_full: Option<bool>,
    max_documents_per_transaction: Option<usize>,
    max_lines_per_document: Option<usize>,
    backup_dir: Option<PathBuf>,
    backup_keep: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawProgram {
    accrual_percent: Option<DecimalText>,
    point_value_kopecks: Option<i64>,
    return_window_days: Option<i64>,
    expire_after_days: Option<i64>,
    warn_before_days: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawOutbox {
    max_attempts: Option<u32>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_rows_per_run: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawRules {
    path: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawDaemon {
    http_listen: Option<String>,
    api_token_file: Option<PathBuf>,
    read_token_file: Option<PathBuf>,
    header_read_timeout_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    max_connections: Option<usize>,
    shutdown_deadline_seconds: Option<u64>,
    log_format: Option<String>,
    schedule: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawAccounting {
    entity: Option<String>,
    entities: Option<BTreeMap<String, String>>,
    accounts: Option<BTreeMap<String, String>>,
    lookback_days: Option<i64>,
    postback: Option<String>,
    history: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct Raw {
    daemon: RawDaemon,
    accounting: RawAccounting,
    general: RawGeneral,
    ledger: RawLedger,
    program: RawProgram,
    program_given: bool,
    rules: RawRules,
    outbox: RawOutbox,
    onec: Option<connectors::RawOnec>,
    amocrm: Option<connectors::RawAmocrm>,
    holds: holds::RawHolds,
    notify: notify::RawNotify,
}

/// The validated configuration every part of kopilka reads.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    /// The time zone 1C's naive local times are in.
    pub timezone: chrono_tz::Tz,
    pub ledger_path: PathBuf,
    pub ledger: OpenOptions,
    /// Where the nightly `ledger:backup` job writes copies of the ledger, and how many it
    /// keeps (newest first); no scheduled backups without a folder.
    pub backup_dir: Option<PathBuf>,
    pub backup_keep: usize,
    pub max_documents_per_transaction: usize,
    pub limits: DocumentLimits,
    /// The loyalty program: from the rules file when `[rules] path` is set, otherwise a
    /// flat percentage from `[program]` with the default cost guard.
    pub program: RuleSet,
    pub rules_file: Option<PathBuf>,
    pub warn_before: Duration,
    pub delivery: DeliveryPolicy,
    /// The 1C connector, when `[onec]` is present.
    pub onec: Option<OnecConfig>,
    /// The AmoCRM connector, when `[amocrm]` is present.
    pub amocrm: Option<AmocrmConfig>,
    pub daemon: DaemonConfig,
    pub accounting: AccountingConfig,
    /// `[holds]`: reservations of points by tills and the site.
    pub holds: HoldsConfig,
    /// `[notify.*]`: the channels members' messages go out on (issue 21).
    pub notify: NotifyConfig,
    /// Things that work but are probably not what was meant (a listener off loopback
    /// without TLS in front); `kopilka check` and `kopilka run` print them.
    pub warnings: Vec<Issue>,
}

/// How points become accounting postings (see README, "Accountants").
#[derive(Clone, Debug)]
pub struct AccountingConfig {
    /// Legal entity (Организация) of every source not named in `entities`.
    pub entity: String,
    /// Source system → legal entity.
    pub entities: BTreeMap<String, String>,
    /// Movement → (debit, credit) account codes.
    pub accounts: BTreeMap<String, (String, String)>,
    /// Days back a late correction is still turned into an adjusting posting.
    pub lookback_days: i64,
    /// How the days older than `lookback_days` reach the books: one opening posting per
    /// entity (`opening`, the default) or a posting per day (`daily`).
    pub history: crate::ledger::HistoryPosting,
    /// Where bonus documents and postings go in 1C: `none`, `commerceml` (served to 1C's
    /// site exchange on `mode=query`) or `odata` (created and posted through OData).
    pub postback: Postback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Postback {
    None,
    CommerceMl,
    Odata,
}

/// Movements of points and their default accounts in the Russian chart of accounts:
/// accruals are a selling expense reserved as a liability (Дт 44 Кт 96), redemptions use the
/// reserve against the customer's payment (Дт 96 Кт 62), expired points release it to other
/// income (Дт 96 Кт 91.01); reversals, write-offs and corrections mirror them.
pub const MOVEMENTS: &[(&str, &str, &str)] = &[
    ("accrued", "44.01", "96"),
    ("redeemed", "96", "62.01"),
    ("expired", "96", "91.01"),
    ("reversed", "96", "44.01"),
    ("written_off", "44.01", "96"),
    ("adjusted", "44.01", "96"),
    ("opening", "91.02", "96"),
    // a coalition partner's settlement (`kopilka partners --post`): the points its sales
    // issued it owes the program, the points spent with it the program owes it
    ("partner_issued", "76.09", "91.01"),
    ("partner_redeemed", "91.02", "76.09"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines when stderr is not a terminal (journald), human otherwise.
    Auto,
    Json,
    Human,
}

/// `kopilka run`: schedules, the HTTP endpoint, shutdown.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Status page, health, metrics and the till API; loopback unless said otherwise.
    pub http_listen: std::net::SocketAddr,
    /// Bearer token of the `/v1` API (tills, the site). Without it `/v1` answers 503.
    pub api_token: Option<Secret>,
    /// A token that opens `/status` and `/report` only (for whoever reads the pages but must
    /// not move points). The API token opens them too.
    pub read_token: Option<Secret>,
    /// Timeouts and the connection limit of every HTTP listener (this one and the site
    /// exchange).
    pub http_limits: HttpLimits,
    pub shutdown_deadline: std::time::Duration,
    pub log_format: LogFormat,
    /// Job name → cron expression (seconds first: `sec min hour day month weekday`), in
    /// the shop's time zone. Jobs not named run on their stage's default.
    pub schedule: BTreeMap<String, cron::Schedule>,
}

/// Bounds on what HTTP clients may hold: a slow or idle client costs a connection slot for
/// at most these timeouts, and the slots are bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (slowloris).
    pub header_read_timeout: std::time::Duration,
    /// A connection with no byte read or written for this long is closed (kept-alive
    /// connections between requests, a stalled body, a client that stopped reading).
    pub idle_timeout: std::time::Duration,
    /// Connections served at once per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            max_connections: 256,
        }
    }
}

impl Config {
    /// What the ledger needs to apply documents under this configuration.
    pub fn ingest_context<'a>(
        &'a self,
        now: chrono::DateTime<chrono::Utc>,
        destinations: &'a crate::ledger::Destinations,
    ) -> crate::ledger::IngestContext<'a> {
        crate::ledger::IngestContext {
            rules: &self.program,
            limits: &self.limits,
            destinations,
            now,
            warn_before: self.warn_before,
        }
    }

    /// The books accounting postings are made in.
    pub fn books(&self) -> crate::ledger::Books<'_> {
        crate::ledger::Books {
            default_entity: &self.accounting.entity,
            entities: &self.accounting.entities,
            tz: self.timezone,
            point_value_kopecks: self.program.point_value.0,
            destination: (self.accounting.postback != Postback::None).then_some(ONEC_ACCOUNTING),
            history: self.accounting.history,
        }
    }

    /// The outbox destinations this configuration delivers to: rows are only queued for a
    /// destination that will deliver them.
    pub fn destinations(&self) -> crate::ledger::Destinations {
        crate::ledger::Destinations {
            contact_state: self.amocrm.as_ref().map(|_| "amocrm".to_string()),
            onec_bonus: (self.accounting.postback != Postback::None).then(|| ONEC_BONUS.to_string()),
            onec_system: self.onec.as_ref().map(|o| o.system.clone()),
            notify: self.notify_plan(),
            onec_tier: self
                .onec
                .as_ref()
                .and_then(|o| o.odata.as_ref())
                .filter(|o| o.publishes_tier)
                .map(|_| ONEC_TIER.to_string()),
        }
    }
}

impl Config {
    /// Members' messages as the ledger needs them: none unless a channel is set up and the
    /// rules file routes an event to it.
    pub fn notify_plan(&self) -> Option<std::sync::Arc<crate::core::notify::Plan>> {
        let channels = self.notify.channels();
        if channels.is_empty() || self.program.notify.routes.is_empty() {
            return None;
        }
        let mut tiers: Vec<&crate::core::rules::Tier> = self.program.tiers.iter().collect();
        tiers.sort_by_key(|t| t.min_spend);
        Some(std::sync::Arc::new(crate::core::notify::Plan {
            policy: self.program.notify.clone(),
            channels,
            timezone: self.timezone,
            tiers: tiers.iter().map(|t| (t.id.clone(), t.name.clone())).collect(),
            tier_spend: tiers.iter().map(|t| t.min_spend.0).collect(),
            tier_window: self.program.tier_policy.window,
        }))
    }
}

impl Default for Config {
    fn default() -> Self {
        validate(&Raw::default(), &Origins::default(), None)
            .unwrap_or_else(|r| panic!("built-in defaults are invalid: {r}"))
    }
}

/// Where each key came from, for error messages.
#[derive(Clone, Debug, Default)]
struct Origins {
    file: Option<String>,
    by_key: BTreeMap<String, String>,
}

impl Origins {
    fn of(&self, key: &str) -> String {
        let mut k = key;
        loop {
            if let Some(o) = self.by_key.get(k) {
                // the config crate names files relative to the working directory; people
                // want the path they gave
                if o == ENVIRONMENT {
                    return o.clone();
                }
                return self.file.clone().unwrap_or_else(|| o.clone());
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => break,
            }
        }
        self.file.clone().unwrap_or_else(|| "defaults".to_string())
    }

    fn collect(&mut self, prefix: &str, v: &config::Value) {
        if let Some(o) = v.origin() {
            self.by_key.insert(prefix.to_string(), o.to_string());
        }
        if let config::ValueKind::Table(t) = &v.kind {
            for (k, child) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                self.collect(&key, child);
            }
        }
    }
}

/// The ledger's name of the 1C base when `[onec] system` does not say (the only one in most
/// shops): what a bonus document's stored reference leaves out (issue 19).
pub const DEFAULT_ONEC_SYSTEM: &str = "onec";
/// Outbox destination of bonus documents for 1C.
pub const ONEC_BONUS: &str = "onec:bonus";
/// Outbox destination of daily accounting postings for 1C.
pub const ONEC_ACCOUNTING: &str = "onec:accounting";
/// Outbox destination of customers' tiers for 1C (an additional attribute of the customer).
pub const ONEC_TIER: &str = "onec:tier";

/// How the `config` crate names values that came from environment variables.
const ENVIRONMENT: &str = "the environment";

const SECTIONS: &[&str] = &[
    "general", "ledger", "program", "rules", "outbox", "onec", "amocrm", "holds", "notify",
];

/// Environment variables that override the file: `KOPILKA_<SECTION>__<KEY>`. Other
/// `KOPILKA_*` variables (`KOPILKA_CONFIG`, `KOPILKA_LOG`) are not config keys.
pub fn env_overrides() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("KOPILKA_") && k.contains("__"))
        .collect()
}

/// Reads and validates the configuration. `path = None` reads the default file if it
/// exists and otherwise runs on defaults (so ledger-only commands need no file).
pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, Report> {
    let file = match path {
        Some(p) => {
            if !p.exists() {
                return Err(Report(vec![Issue {
                    key: "(file)".into(),
                    origin: p.display().to_string(),
                    message: "configuration file not found".into(),
                }]));
            }
            Some(p.to_path_buf())
        }
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    let mut builder = config::Config::builder();
    if let Some(f) = &file {
        builder = builder.add_source(
            config::File::from(f.as_path())
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let env_map: config::Map<String, String> = env.iter().cloned().collect();
    builder = builder.add_source(
        config::Environment::with_prefix("KOPILKA")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env_map)),
    );
    let origin_file = file.as_ref().map(|f| f.display().to_string());
    let built = builder.build().map_err(|e| {
        Report(vec![Issue {
            key: "(file)".into(),
            origin: origin_file.clone().unwrap_or_else(|| "the environment".into()),
            message: e.to_string(),
        }])
    })?;
    let mut origins = Origins {
        file: origin_file,
        ..Default::default()
    };
    origins.collect("", &built.cache);
    let root = match built.cache.kind {
        config::ValueKind::Table(t) => t,
        _ => Default::default(),
    };
    let mut issues = Vec::new();
    let mut raw = Raw::default();
    for (name, value) in root {
        match name.as_str() {
            "general" => raw.general = section(&name, value, &origins, &mut issues),
            "ledger" => raw.ledger = section(&name, value, &origins, &mut issues),
            "program" => {
                raw.program = section(&name, value, &origins, &mut issues);
                raw.program_given = true;
            }
            "rules" => raw.rules = section(&name, value, &origins, &mut issues),
            "outbox" => raw.outbox = section(&name, value, &origins, &mut issues),
            "onec" => raw.onec = Some(section(&name, value, &origins, &mut issues)),
            "daemon" => raw.daemon = section(&name, value, &origins, &mut issues),
            "accounting" => raw.accounting = section(&name, value, &origins, &mut issues),
            "amocrm" => raw.amocrm = Some(section(&name, value, &origins, &mut issues)),
            "holds" => raw.holds = section(&name, value, &origins, &mut issues),
            "notify" => raw.notify = section(&name, value, &origins, &mut issues),
            _ => issues.push(Issue {
                key: name.clone(),
                origin: origins.of(&name),
                message: format!("unknown section; known sections: {}", SECTIONS.join(", ")),
            }),
        }
    }
    let validated = validate(&raw, &origins, file.as_deref().and_then(Path::parent));
    issues.sort_by(|a, b| a.key.cmp(&b.key));
    match validated {
        Ok(mut c) if issues.is_empty() => {
            c.file = file;
            Ok(c)
        }
        Ok(_) => Err(Report(issues)),
        Err(Report(more)) => {
            issues.extend(more);
            Err(Report(issues))
        }
    }
}

/// Deserialises one section key by key, so that every bad key is reported (serde stops
/// at the first error of a struct): each key is tried alone, the good ones are then read
/// together.
fn section<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    value: config::Value,
    origins: &Origins,
    issues: &mut Vec<Issue>,
) -> T {
    let origin = value.origin().map(str::to_string);
    let table = match value.into_table() {
        Ok(t) => t,
        Err(_) => {
            issues.push(Issue {
                key: name.to_string(),
                origin: origins.of(name),
                message: "must be a table ([section] with keys)".into(),
            });
            return T::default();
        }
    };
    let mut good = config::Map::new();
    for (k, v) in table {
        let key = format!("{name}.{k}");
        let single: config::Map<String, config::Value> = [(k.clone(), v.clone())].into_iter().collect();
        let mut unknown = Vec::new();
        let result: Result<T, _> =
            serde_ignored::deserialize(config::Value::new(origin.as_ref(), single), |path| {
                unknown.push(path.to_string())
            });
        for path in &unknown {
            let key = format!("{name}.{path}");
            issues.push(Issue {
                origin: origins.of(&key),
                key,
                message: "unknown key".into(),
            });
        }
        match result {
            Ok(_) if unknown.is_empty() => {
                good.insert(k, v);
            }
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                let message = msg.split(" for key `").next().unwrap_or(&msg).to_string();
                issues.push(Issue {
                    origin: origins.of(&key),
                    key,
                    message,
                });
            }
        }
    }
    config::Value::new(origin.as_ref(), good)
        .try_deserialize()
        .unwrap_or_default()
}

fn validate(raw: &Raw, origins: &Origins, base: Option<&Path>) -> Result<Config, Report> {
    let mut issues = Vec::new();
    let mut bad = |key: &str, message: String| {
        issues.push(Issue {
            key: key.to_string(),
            origin: origins.of(key),
            message,
        })
    };
    let timezone = match &raw.general.timezone {
        None => chrono_tz::Europe::Moscow,
        Some(t) => chrono_tz::Tz::from_str(t).unwrap_or_else(|_| {
            bad(
                "general.timezone",
                format!("{t:?} is not an IANA time zone (e.g. \"Europe/Moscow\")"),
            );
            chrono_tz::Europe::Moscow
        }),
    };
    let currency = raw.general.currency.clone().unwrap_or_else(|| "RUB".into());
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        bad(
            "general.currency",
            format!("{currency:?} is not an ISO 4217 code such as \"RUB\""),
        );
    }
    let l = &raw.ledger;
    let ledger_path = l
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LEDGER_PATH));
    if ledger_path.as_os_str().is_empty() {
        bad("ledger.path", "must not be empty".into());
    }
    let busy = l.busy_timeout_ms.unwrap_or(5000);
    if busy > 600_000 {
        bad(
            "ledger.busy_timeout_ms",
            format!("{busy} ms is more than 10 minutes"),
        );
    }
    let per_tx = l.max_documents_per_transaction.unwrap_or(500);
    if !(1..=100_000).contains(&per_tx) {
        bad(
            "ledger.max_documents_per_transaction",
            format!("{per_tx} is outside 1..=100000"),
        );
    }
    let max_lines = l.max_lines_per_document.unwrap_or(10_000);
    if !(1..=1_000_000).contains(&max_lines) {
        bad(
            "ledger.max_lines_per_document",
            format!("{max_lines} is outside 1..=1000000"),
        );
    }
    let p = &raw.program;
    let percent = p.accrual_percent.map_or(Decimal::from(5), |d| d.0);
    if percent < Decimal::ZERO || percent > Decimal::ONE_HUNDRED {
        bad("program.accrual_percent", format!("{percent} is outside 0..=100"));
    }
    let point_value = p.point_value_kopecks.unwrap_or(100);
    if point_value <= 0 {
        bad(
            "program.point_value_kopecks",
            format!("{point_value} must be positive"),
        );
    }
    let window = p.return_window_days.unwrap_or(14);
    if !(0..=365).contains(&window) {
        bad(
            "program.return_window_days",
            format!("{window} is outside 0..=365"),
        );
    }
    let expire = p.expire_after_days.unwrap_or(365);
    if !(0..=36_500).contains(&expire) {
        bad(
            "program.expire_after_days",
            format!("{expire} is outside 0..=36500 (0 = never)"),
        );
    }
    let warn = p.warn_before_days.unwrap_or(14);
    if !(0..=365).contains(&warn) {
        bad("program.warn_before_days", format!("{warn} is outside 0..=365"));
    }
    let mut warn_before = Duration::days(warn);
    let mut rules_issues = Vec::new();
    let program = match &raw.rules.path {
        Some(path) => {
            if raw.program_given {
                bad(
                    "program",
                    "with [rules] path set, the program is defined in the rules file; remove [program]"
                        .into(),
                );
            }
            // a relative path is taken from the configuration file's folder
            let path = match base {
                Some(b) if path.is_relative() => b.join(path),
                _ => path.clone(),
            };
            match crate::rules_file::load(&path) {
                Ok(mut r) => {
                    r.timezone = timezone;
                    warn_before = r.warn_before;
                    r
                }
                Err(report) => {
                    rules_issues = report.0;
                    RuleSet::flat(percent, Money(point_value), Duration::days(window), None)
                }
            }
        }
        None => {
            let mut r = RuleSet::flat(
                percent,
                Money(point_value.max(1)),
                Duration::days(window),
                (expire > 0).then(|| Duration::days(expire)),
            );
            r.timezone = timezone;
            r.warn_before = warn_before;
            r
        }
    };
    let o = &raw.outbox;
    let attempts = o.max_attempts.unwrap_or(12);
    if attempts == 0 {
        bad("outbox.max_attempts", "must be at least 1".into());
    }
    let initial = o.backoff_initial_ms.unwrap_or(5_000);
    let max = o.backoff_max_ms.unwrap_or(3_600_000);
    if initial == 0 {
        bad("outbox.backoff_initial_ms", "must be positive".into());
    }
    if max < initial {
        bad(
            "outbox.backoff_max_ms",
            format!("{max} is below outbox.backoff_initial_ms ({initial})"),
        );
    }
    let rows_per_run = o.max_rows_per_run.unwrap_or(10_000);
    if rows_per_run == 0 {
        bad("outbox.max_rows_per_run", "must be at least 1".into());
    }
    issues.extend(rules_issues);
    let mut check = connectors::Check {
        issues: Vec::new(),
        base,
    };
    let d = &raw.daemon;
    let listen_text = d.http_listen.clone().unwrap_or_else(|| "127.0.0.1:8090".into());
    let http_listen = listen_text.parse().unwrap_or_else(|_| {
        check.issues.push((
            "daemon.http_listen".into(),
            format!("{listen_text:?} is not an address like 127.0.0.1:8090"),
        ));
        std::net::SocketAddr::from(([127, 0, 0, 1], 8090))
    });
    let api_token = match connectors::read_secret(d.api_token_file.as_deref(), "KOPILKA_API_TOKEN", base) {
        Ok(t) => t,
        Err(e) => {
            check.issues.push(("daemon.api_token_file".into(), e));
            None
        }
    };
    let read_token = match connectors::read_secret(d.read_token_file.as_deref(), "KOPILKA_READ_TOKEN", base) {
        Ok(t) => t,
        Err(e) => {
            check.issues.push(("daemon.read_token_file".into(), e));
            None
        }
    };
    let defaults = HttpLimits::default();
    let mut seconds = |key: &str, v: Option<u64>, default: std::time::Duration| {
        let v = v.unwrap_or(default.as_secs());
        if !(1..=3600).contains(&v) {
            check
                .issues
                .push((format!("daemon.{key}"), format!("{v} is outside 1..=3600")));
        }
        std::time::Duration::from_secs(v.clamp(1, 3600))
    };
    let header_read_timeout = seconds(
        "header_read_timeout_seconds",
        d.header_read_timeout_seconds,
        defaults.header_read_timeout,
    );
    let idle_timeout = seconds(
        "idle_timeout_seconds",
        d.idle_timeout_seconds,
        defaults.idle_timeout,
    );
    let max_connections = d.max_connections.unwrap_or(defaults.max_connections);
    if !(1..=100_000).contains(&max_connections) {
        check.issues.push((
            "daemon.max_connections".into(),
            format!("{max_connections} is outside 1..=100000"),
        ));
    }
    let http_limits = HttpLimits {
        header_read_timeout,
        idle_timeout,
        max_connections: max_connections.clamp(1, 100_000),
    };
    let log_format = match d.log_format.as_deref().unwrap_or("auto") {
        "auto" => LogFormat::Auto,
        "json" => LogFormat::Json,
        "human" => LogFormat::Human,
        other => {
            check.issues.push((
                "daemon.log_format".into(),
                format!("{other:?} is not auto, json or human"),
            ));
            LogFormat::Auto
        }
    };
    let mut schedule = BTreeMap::new();
    for (job, expr) in d.schedule.clone().unwrap_or_default() {
        match cron::Schedule::from_str(&expr) {
            Ok(s) => {
                schedule.insert(job, s);
            }
            Err(e) => check.issues.push((
                format!("daemon.schedule.{job}"),
                format!("{expr:?} is not a cron expression (sec min hour day month weekday): {e}"),
            )),
        }
    }
    let deadline = d.shutdown_deadline_seconds.unwrap_or(20);
    if !(1..=600).contains(&deadline) {
        check.issues.push((
            "daemon.shutdown_deadline_seconds".into(),
            format!("{deadline} is outside 1..=600"),
        ));
    }
    let daemon = DaemonConfig {
        http_listen,
        api_token,
        read_token,
        http_limits,
        shutdown_deadline: std::time::Duration::from_secs(deadline),
        log_format,
        schedule,
    };
    let a = &raw.accounting;
    let mut accounts: BTreeMap<String, (String, String)> = MOVEMENTS
        .iter()
        .map(|(m, d, c)| (m.to_string(), (d.to_string(), c.to_string())))
        .collect();
    for (key, value) in a.accounts.clone().unwrap_or_default() {
        let (movement, side) = match key.rsplit_once('_') {
            Some((m, side @ ("debit" | "credit"))) if accounts.contains_key(m) => (m.to_string(), side),
            _ => {
                check.issues.push((
                    format!("accounting.accounts.{key}"),
                    "expected <movement>_debit or <movement>_credit, movements: accrued, redeemed, expired, \
                     reversed, written_off, adjusted, opening, partner_issued, partner_redeemed"
                        .into(),
                ));
                continue;
            }
        };
        if let Some(e) = accounts.get_mut(&movement) {
            if side == "debit" {
                e.0 = value;
            } else {
                e.1 = value;
            }
        }
    }
    let postback = match a.postback.as_deref().unwrap_or("none") {
        "none" => Postback::None,
        "commerceml" => Postback::CommerceMl,
        "odata" => Postback::Odata,
        other => {
            check.issues.push((
                "accounting.postback".into(),
                format!("{other:?} is not none, commerceml or odata"),
            ));
            Postback::None
        }
    };
    let history = match a.history.as_deref().unwrap_or("opening") {
        "opening" => crate::ledger::HistoryPosting::Opening,
        "daily" => crate::ledger::HistoryPosting::Daily,
        other => {
            check.issues.push((
                "accounting.history".into(),
                format!("{other:?} is not opening or daily"),
            ));
            crate::ledger::HistoryPosting::Opening
        }
    };
    let accounting = AccountingConfig {
        history,
        entity: a.entity.clone().unwrap_or_else(|| "Организация".into()),
        entities: a.entities.clone().unwrap_or_default(),
        accounts,
        lookback_days: a.lookback_days.unwrap_or(35).clamp(1, 366),
        postback,
    };
    let onec = raw.onec.as_ref().map(|o| connectors::onec(o, &mut check));
    let amocrm = raw.amocrm.as_ref().map(|a| connectors::amocrm(a, &mut check));
    let holds = holds::holds(&raw.holds, &mut check.issues);
    let notify = notify::notify(&raw.notify, &mut check, amocrm.is_some());
    let mut warnings = Vec::new();
    let mut warn = |key: &str, message: String| {
        warnings.push(Issue {
            origin: origins.of(key),
            key: key.to_string(),
            message,
        })
    };
    if !daemon.http_listen.ip().is_loopback() {
        warn(
            "daemon.http_listen",
            format!(
                "{} is not loopback and kopilka speaks plain HTTP: put a TLS proxy in front (or listen \
                 on 127.0.0.1), or tokens and the status pages cross the network in clear",
                daemon.http_listen
            ),
        );
        if daemon.api_token.is_none() && daemon.read_token.is_none() {
            warn(
                "daemon.http_listen",
                "off loopback /status and /report need a token: they answer 401 until \
                 daemon.read_token_file or daemon.api_token_file is set"
                    .into(),
            );
        }
    }
    if let Some(se) = onec.as_ref().and_then(|o| o.site_exchange.as_ref())
        && !se.listen.ip().is_loopback()
    {
        warn(
            "onec.site_exchange.listen",
            format!(
                "{} is not loopback and the site exchange speaks plain HTTP: 1C sends its password \
                 with every request, so put a TLS proxy in front",
                se.listen
            ),
        );
    }
    for (key, message) in check.issues {
        issues.push(Issue {
            origin: origins.of(&key),
            key,
            message,
        });
    }
    if !issues.is_empty() {
        return Err(Report(issues));
    }
    Ok(Config {
        file: None,
        timezone,
        ledger_path,
        backup_dir: l.backup_dir.clone().map(|d| match base {
            Some(b) if d.is_relative() => b.join(d),
            _ => d,
        }),
        backup_keep: l.backup_keep.unwrap_or(7).clamp(1, 1000),
        ledger: OpenOptions {
            busy_timeout: std::time::Duration::from_millis(busy),
            synchronous_full: l.synchronous_full.unwrap_or(false),
            read_only: false,
        },
        max_documents_per_transaction: per_tx,
        limits: DocumentLimits {
            currency,
            max_lines,
            total_tolerance: Money(1),
        },
        program,
        rules_file: raw.rules.path.as_ref().map(|p| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.clone(),
        }),
        warn_before,
        delivery: DeliveryPolicy {
            max_attempts: attempts,
            backoff_initial: std::time::Duration::from_millis(initial),
            backoff_max: std::time::Duration::from_millis(max),
            max_rows_per_run: rows_per_run,
        },
        onec,
        amocrm,
        daemon,
        warnings,
        accounting,
        holds,
        notify,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, Report> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kopilka.toml");
        std::fs::write(&path, toml).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        load(Some(&path), &env)
    }

    fn keys(r: Report) -> Vec<String> {
        r.0.into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn every_section_is_optional() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.ledger_path, PathBuf::from(DEFAULT_LEDGER_PATH));
        assert_eq!(c.timezone, chrono_tz::Europe::Moscow);
        let c = load_str("[ledger]\npath = \"/tmp/x.db\"\n", &[]).unwrap();
        assert_eq!(c.ledger_path, PathBuf::from("/tmp/x.db"));
    }

    #[test]
    fn reports_every_unknown_key_with_its_path_and_file() {
        let err = load_str(
            "[ledger]\nno_such_key = 1\npath = \"/tmp/x.db\"\n[program]\nacrual_percent = \"3\"\n[nope]\nx = 1\n",
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(
            keys(err.clone()),
            ["ledger.no_such_key", "nope", "program.acrual_percent"]
        );
        assert!(
            text.contains("kopilka.toml: ledger.no_such_key: unknown key"),
            "{text}"
        );
    }

    #[test]
    fn reports_type_and_range_errors_together() {
        let err = load_str(
            "[general]\ntimezone = \"Mars/Olympus\"\n[program]\naccrual_percent = 2.5\nreturn_window_days = 999\n[outbox]\nmax_attempts = \"many\"\n",
            &[],
        )
        .unwrap_err();
        let k = keys(err.clone());
        assert!(k.contains(&"general.timezone".to_string()), "{k:?}");
        assert!(k.iter().any(|k| k.starts_with("program")), "{k:?}");
        assert!(k.iter().any(|k| k.starts_with("outbox")), "{k:?}");
        assert!(err.to_string().contains("float"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_in_errors() {
        let c = load_str(
            "[ledger]\npath = \"/tmp/a.db\"\n",
            &[("KOPILKA_LEDGER__PATH", "/tmp/b.db")],
        )
        .unwrap();
        assert_eq!(c.ledger_path, PathBuf::from("/tmp/b.db"));
        let c = load_str("", &[("KOPILKA_PROGRAM__ACCRUAL_PERCENT", "2.5")]).unwrap();
        assert_eq!(
            c.program.earn[0].kind,
            crate::core::rules::EarnKind::Percent(Decimal::from_str("2.5").unwrap())
        );
        let err = load_str("", &[("KOPILKA_LEDGER__TYPO", "1")]).unwrap_err();
        assert_eq!(err.0[0].key, "ledger.typo");
        assert_eq!(err.0[0].origin, "the environment");
    }

    #[test]
    fn a_missing_file_named_explicitly_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/kopilka.toml")), &[]).unwrap_err();
        assert!(err.to_string().contains("not found"));
    }
}
