//! Configuration of the 1C and AmoCRM connectors: raw sections and their validation.
//! Secrets are read here, once, from files (systemd `LoadCredential`) or the environment,
//! and kept in [`Secret`], which never prints its value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret value: `Debug` and `Display` show only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it (an HTTP header, a token exchange).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, compared in constant time (a token from a request).
    pub fn matches(&self, given: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }

    /// Whether an `Authorization` header value is HTTP Basic with `user` and this secret as
    /// its password, compared in constant time: how 1C's exchange and till protocols log in.
    pub fn matches_basic(&self, user: &str, header: Option<&str>) -> bool {
        use base64::Engine as _;
        let Some(encoded) =
            header.and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        Secret::new(format!("{user}:{}", self.0)).matches(&decoded)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Reads a secret from `file` (relative paths are taken from `$CREDENTIALS_DIRECTORY`,
/// where systemd's `LoadCredential` puts them, or else from the config file's folder),
/// or from the environment variable `env` when no file is named.
pub fn read_secret(file: Option<&Path>, env: &str, base: Option<&Path>) -> Result<Option<Secret>, String> {
    match file {
        Some(f) => {
            let path = if f.is_absolute() {
                f.to_path_buf()
            } else if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
                PathBuf::from(dir).join(f)
            } else {
                base.map_or_else(|| f.to_path_buf(), |b| b.join(f))
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
            let value = text.trim_end_matches(['\n', '\r']).to_string();
            if value.is_empty() {
                return Err(format!("the secret file {} is empty", path.display()));
            }
            Ok(Some(Secret(value)))
        }
        None => Ok(std::env::var(env).ok().filter(|v| !v.is_empty()).map(Secret)),
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawSiteExchange {
    pub listen: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub file_limit_bytes: Option<u64>,
    pub zip: Option<bool>,
    pub max_sessions: Option<usize>,
    pub max_upload_bytes: Option<u64>,
    pub reply_encoding: Option<String>,
    pub session_idle_minutes: Option<i64>,
}

/// `[onec.loyalty_server]`: the «Сервер лояльности» УНФ's and Розница 3.0's cashier
/// workplace calls (`../shared/specs/onec-till-protocols.md` §2).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawLoyaltyServer {
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub path: Option<String>,
    pub hold_minutes: Option<i64>,
}

/// `[onec.discount_server]`: the «Дисконтный сервер» (SOAP) 1С:Розница 2.x pushes receipts
/// to and reads bonus balances from (`../shared/specs/onec-till-protocols.md` §1).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawDiscountServer {
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub path: Option<String>,
    pub public_url: Option<String>,
    pub record_sales: Option<bool>,
    pub voucher_discount: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawOdata {
    pub url: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub mapping: Option<String>,
    pub page_size: Option<u32>,
    pub overlap_minutes: Option<i64>,
    pub timeout_seconds: Option<u64>,
    pub rescan_days: Option<i64>,
    pub rescan_every_hours: Option<i64>,
    pub bonus_program: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawOnec {
    pub system: Option<String>,
    pub exchange_dir: Option<PathBuf>,
    pub cost_price_type: Option<String>,
    pub cost_backfill: Option<bool>,
    pub orders: Option<String>,
    pub card_requisite: Option<String>,
    pub return_link_requisite: Option<String>,
    pub points_requisite: Option<String>,
    pub referral_requisite: Option<String>,
    pub invite_requisite: Option<String>,
    pub birthday_requisite: Option<String>,
    pub keep_days: Option<i64>,
    pub keep_max_bytes: Option<u64>,
    pub site_exchange: Option<RawSiteExchange>,
    pub odata: Option<RawOdata>,
    pub loyalty_server: Option<RawLoyaltyServer>,
    pub discount_server: Option<RawDiscountServer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawAmocrm {
    pub base_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub redirect_uri: Option<String>,
    pub requests_per_second: Option<u32>,
    pub create_missing: Option<bool>,
    pub pipelines: Option<Vec<i64>>,
    pub won_status: Option<i64>,
    pub deal_category: Option<String>,
    pub batch_size: Option<usize>,
    pub events_page_size: Option<u32>,
    pub overlap_seconds: Option<i64>,
    pub timeout_seconds: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub mapping: Option<PathBuf>,
    pub notes: Option<Vec<String>>,
    pub note_accrual_min_points: Option<i64>,
    pub tags: Option<bool>,
}

/// How 1C's orders («Заказ товара») count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orders {
    Ignore,
    WhenPaid,
    WhenShipped,
    Always,
}

#[derive(Clone, Debug)]
pub struct SiteExchangeConfig {
    pub listen: SocketAddr,
    pub user: String,
    pub password: Secret,
    pub file_limit_bytes: u64,
    pub zip: bool,
    /// Sessions with work in progress (an upload not yet imported, an import running, a
    /// `query` waiting for `success`) at once; finished sessions never count.
    pub max_sessions: usize,
    pub max_upload_bytes: u64,
    /// Encoding of every reply: `utf-8` (default) or `windows-1251`.
    pub reply_windows_1251: bool,
    /// A session not heard from this long is forgotten (what it uploaded is imported or
    /// rejected, its folder removed).
    pub session_idle: chrono::Duration,
}

/// The «Сервер лояльности» endpoint for УНФ / Розница 3.0 tills, on the daemon's HTTP
/// listener (README, "Tills").
#[derive(Clone, Debug)]
pub struct LoyaltyServerConfig {
    /// The login the till sends (1C makes no request with an empty one).
    pub user: String,
    pub password: Secret,
    /// Where the resources live: the till's «Адрес сервера лояльности» is
    /// `http://HOST:PORT` + this path.
    pub path: String,
    /// How long points read at a card scan stay reserved for that till: a cashier's whole
    /// receipt, not the few minutes of a site checkout (`[holds] ttl_seconds`).
    pub hold: chrono::Duration,
}

/// The «Дисконтный сервер» endpoint for Розница 2.x, on the daemon's HTTP listener (README,
/// "Розница 2.x: «Дисконтный сервер»").
#[derive(Clone, Debug)]
pub struct DiscountServerConfig {
    /// The login Розница sends (`ПользовательДисконтногоСервера`).
    pub user: String,
    pub password: Secret,
    /// Where the service lives: Розница's `АдресДисконтногоСервера` is
    /// `http://HOST:PORT` + this path + `?wsdl`.
    pub path: String,
    /// The address written into the WSDL's `soap:address` (Розница posts every call there);
    /// `None`: `http://` + the request's `Host` + `path`.
    pub public_url: Option<String>,
    /// Whether pushed sales tables become ledger documents. Off by default when `[onec.odata]`
    /// is set: the poll reads the same receipts (with prices and points paid) under another
    /// source, and both would count.
    pub record_sales: bool,
    /// The GUID of the shop's discount in 1C («Скидки (наценки)», a one-time discount by
    /// coupon that gives the gift) that a kopilka voucher's code turns on at the till
    /// (`ПолучитьСкидкиПоКупону`). `None`: codes are not answered (the register stays 1C's).
    pub voucher_discount: Option<String>,
}

/// How long files kopilka keeps for people (`processed/`, `rejected/`) stay: the oldest go
/// first once either bound is passed, so the exchange folder never fills the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keep {
    pub max_age: chrono::Duration,
    pub max_bytes: u64,
}

impl Default for Keep {
    fn default() -> Keep {
        Keep {
            max_age: chrono::Duration::days(30),
            max_bytes: 1 << 30,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OdataConfig {
    /// Base URL ending in `/odata/standard.odata`.
    pub url: String,
    pub user: String,
    pub password: Secret,
    /// A mapping name (`roznica`, `ut11`, `unf`) or a path to a mapping file.
    pub mapping: String,
    pub page_size: u32,
    pub overlap: chrono::Duration,
    pub timeout: std::time::Duration,
    /// The periodic wide re-scan that catches edits older than the overlap window.
    pub rescan_window: chrono::Duration,
    pub rescan_every: chrono::Duration,
    /// The bonus program (`Catalog_БонусныеПрограммыЛояльности` description or key) for
    /// `import-balances --from-1c`, when the base has several.
    pub bonus_program: Option<String>,
    /// The mapping names an additional attribute for the tier (`[attributes] tier`), so tier
    /// changes are queued for 1C. Read from the mapping when the configuration is: the
    /// ledger queues rows only for a destination that will deliver them.
    pub publishes_tier: bool,
}

#[derive(Clone, Debug)]
pub struct OnecConfig {
    /// Source system name in the ledger (`onec`; another base: `onec:partner`).
    pub system: String,
    pub exchange_dir: Option<PathBuf>,
    /// Price type (Ид or Наименование) whose price is the cost.
    pub cost_price_type: Option<String>,
    /// Use the earliest known cost for sales older than every price list.
    pub cost_backfill: bool,
    pub orders: Orders,
    pub card_requisite: Option<String>,
    pub return_link_requisite: Option<String>,
    pub points_requisite: Option<String>,
    /// Document requisites (CommerceML `ЗначенияРеквизитов`) naming the customer's friend code,
    /// invite code and birthday; none read unless named.
    pub referral_requisite: Option<String>,
    pub invite_requisite: Option<String>,
    pub birthday_requisite: Option<String>,
    /// Retention of `processed/` and `rejected/` files (exchange folder and site exchange).
    pub keep: Keep,
    pub site_exchange: Option<SiteExchangeConfig>,
    pub odata: Option<OdataConfig>,
    pub loyalty_server: Option<LoyaltyServerConfig>,
    pub discount_server: Option<DiscountServerConfig>,
}

#[derive(Clone, Debug)]
pub enum AmocrmAuth {
    /// A long-lived token from the integration's settings.
    LongLived(Secret),
    /// OAuth 2 authorization code flow; the token pair lives in the ledger, sealed.
    OAuth {
        client_id: String,
        client_secret: Secret,
        redirect_uri: String,
    },
}

#[derive(Clone, Debug)]
pub struct AmocrmConfig {
    pub base_url: String,
    pub auth: AmocrmAuth,
    pub requests_per_second: u32,
    pub create_missing: bool,
    /// Pipelines whose won deals are sales, each paired with `won_status`.
    pub pipelines: Vec<i64>,
    pub won_status: i64,
    /// Category of the one line a deal without catalog items becomes.
    pub deal_category: String,
    pub batch_size: usize,
    pub events_page_size: u32,
    pub overlap: chrono::Duration,
    pub timeout: std::time::Duration,
    /// Back-off after 429s and failures: doubles from the initial delay up to the maximum.
    pub backoff_initial: std::time::Duration,
    pub backoff_max: std::time::Duration,
    /// Field map (`mappings/amocrm.toml`); built-in codes when absent.
    pub mapping: Option<PathBuf>,
    /// Which notes to write on contacts: accrual, redemption, tier, expiry, voucher.
    pub notes: Vec<String>,
    pub note_accrual_min_points: i64,
    pub tags: bool,
}

pub(super) struct Check<'a> {
    pub issues: Vec<(String, String)>,
    pub base: Option<&'a Path>,
}

impl Check<'_> {
    pub(super) fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.issues.push((key.to_string(), message.into()));
    }

    pub(super) fn secret(&mut self, key: &str, file: Option<&Path>, env: &str, required: bool) -> Secret {
        match read_secret(file, env, self.base) {
            Ok(Some(s)) => s,
            Ok(None) => {
                if required {
                    self.bad(
                        key,
                        format!("set {key} (a file with the secret) or the environment variable {env}"),
                    );
                }
                Secret(String::new())
            }
            Err(e) => {
                self.bad(key, e);
                Secret(String::new())
            }
        }
    }

    pub(super) fn url(&mut self, key: &str, v: Option<&String>) -> String {
        match v {
            None => {
                self.bad(key, "a URL is required");
                String::new()
            }
            Some(u) => match reqwest::Url::parse(u) {
                Ok(p) if !p.username().is_empty() || p.password().is_some() => {
                    // Never echo the URL: the part refused is a password.
                    self.bad(
                        key,
                        format!(
                            "the URL carries a user name or password (user:password@); write it without \
                             them and put {}",
                            credentials_hint(key)
                        ),
                    );
                    String::new()
                }
                Ok(p) if matches!(p.scheme(), "http" | "https") => u.trim_end_matches('/').to_string(),
                _ if u.contains('@') => {
                    self.bad(
                        key,
                        "not an http(s) URL (not shown: it holds an @, perhaps a password)".to_string(),
                    );
                    String::new()
                }
                _ => {
                    self.bad(key, format!("{u:?} is not an http(s) URL"));
                    String::new()
                }
            },
        }
    }
}

/// Where the credentials of the service behind the URL `key` belong instead of the URL.
fn credentials_hint(key: &str) -> &'static str {
    if key.starts_with("onec.odata") {
        "the user in onec.odata.user and the password in a file named by onec.odata.password_file \
         (or KOPILKA_ONEC_ODATA_PASSWORD)"
    } else if key.starts_with("amocrm") {
        "the token in a file named by amocrm.token_file (or KOPILKA_AMOCRM_TOKEN), or the OAuth \
         client secret in amocrm.client_secret_file"
    } else {
        "credentials in a file named by the section's …_file key"
    }
}

pub(super) fn onec(raw: &RawOnec, c: &mut Check<'_>) -> OnecConfig {
    let orders = match raw.orders.as_deref().unwrap_or("ignore") {
        "ignore" => Orders::Ignore,
        "when_paid" => Orders::WhenPaid,
        "when_shipped" => Orders::WhenShipped,
        "always" => Orders::Always,
        other => {
            c.bad(
                "onec.orders",
                format!("{other:?} is not one of ignore, when_paid, when_shipped, always"),
            );
            Orders::Ignore
        }
    };
    let site_exchange = raw.site_exchange.as_ref().map(|s| {
        let listen_text = s.listen.clone().unwrap_or_else(|| "127.0.0.1:8088".into());
        let listen = listen_text.parse().unwrap_or_else(|_| {
            c.bad(
                "onec.site_exchange.listen",
                format!("{listen_text:?} is not an address like 127.0.0.1:8088"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8088))
        });
        let user = s.user.clone().unwrap_or_else(|| {
            c.bad("onec.site_exchange.user", "the user 1C logs in as is required");
            String::new()
        });
        let password = c.secret(
            "onec.site_exchange.password_file",
            s.password_file.as_deref(),
            "KOPILKA_ONEC_SITE_PASSWORD",
            true,
        );
        let reply_windows_1251 = match s.reply_encoding.as_deref().unwrap_or("utf-8") {
            "utf-8" => false,
            "windows-1251" => true,
            other => {
                c.bad(
                    "onec.site_exchange.reply_encoding",
                    format!("{other:?} is not utf-8 or windows-1251"),
                );
                false
            }
        };
        let file_limit = s.file_limit_bytes.unwrap_or(8 << 20);
        if !(64 << 10..=1 << 30).contains(&file_limit) {
            c.bad(
                "onec.site_exchange.file_limit_bytes",
                format!("{file_limit} is outside 64 KiB..=1 GiB"),
            );
        }
        let idle = s.session_idle_minutes.unwrap_or(15);
        if !(1..=24 * 60).contains(&idle) {
            c.bad(
                "onec.site_exchange.session_idle_minutes",
                format!("{idle} is outside 1..=1440"),
            );
        }
        SiteExchangeConfig {
            listen,
            user,
            password,
            file_limit_bytes: file_limit,
            zip: s.zip.unwrap_or(true),
            max_sessions: s.max_sessions.unwrap_or(4).max(1),
            max_upload_bytes: s.max_upload_bytes.unwrap_or(2 << 30),
            reply_windows_1251,
            session_idle: chrono::Duration::minutes(idle),
        }
    });
    let odata = raw.odata.as_ref().map(|o| {
        let url = c.url("onec.odata.url", o.url.as_ref());
        let user = o.user.clone().unwrap_or_else(|| {
            c.bad("onec.odata.user", "the 1C user kopilka reads as is required");
            String::new()
        });
        let password = c.secret(
            "onec.odata.password_file",
            o.password_file.as_deref(),
            "KOPILKA_ONEC_ODATA_PASSWORD",
            true,
        );
        let page_size = o.page_size.unwrap_or(500);
        if !(1..=5000).contains(&page_size) {
            c.bad("onec.odata.page_size", format!("{page_size} is outside 1..=5000"));
        }
        let overlap = o.overlap_minutes.unwrap_or(60);
        if !(0..=60 * 24 * 31).contains(&overlap) {
            c.bad(
                "onec.odata.overlap_minutes",
                format!("{overlap} is outside 0..=44640"),
            );
        }
        let timeout = o.timeout_seconds.unwrap_or(120);
        if !(1..=3600).contains(&timeout) {
            c.bad(
                "onec.odata.timeout_seconds",
                format!("{timeout} is outside 1..=3600"),
            );
        }
        let mapping = o.mapping.clone().unwrap_or_else(|| "roznica".into());
        // a mapping that cannot be read is reported where it is used (the poll, `check
        // --probe`); here it only means no tier is published
        let publishes_tier = crate::onec::mapping::load(&mapping, c.base)
            .ok()
            .and_then(|m| m.attributes)
            .is_some_and(|a| a.tier.is_some());
        OdataConfig {
            url,
            user,
            password,
            publishes_tier,
            mapping,
            page_size,
            overlap: chrono::Duration::minutes(overlap),
            timeout: std::time::Duration::from_secs(timeout),
            rescan_window: chrono::Duration::days(o.rescan_days.unwrap_or(35).clamp(1, 3650)),
            rescan_every: chrono::Duration::hours(o.rescan_every_hours.unwrap_or(24).clamp(1, 24 * 31)),
            bonus_program: o.bonus_program.clone(),
        }
    });
    let keep_days = raw.keep_days.unwrap_or(30);
    if !(1..=3650).contains(&keep_days) {
        c.bad("onec.keep_days", format!("{keep_days} is outside 1..=3650"));
    }
    let keep = Keep {
        max_age: chrono::Duration::days(keep_days),
        max_bytes: raw.keep_max_bytes.unwrap_or(1 << 30),
    };
    let system = raw
        .system
        .clone()
        .unwrap_or_else(|| super::DEFAULT_ONEC_SYSTEM.into());
    if system.is_empty() || system.contains(char::is_whitespace) {
        c.bad(
            "onec.system",
            format!("{system:?} must be one word, e.g. onec or onec:partner"),
        );
    }
    let loyalty_server = raw.loyalty_server.as_ref().map(|l| {
        let user = l
            .user
            .clone()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| {
                c.bad(
                    "onec.loyalty_server.user",
                    "the login the till sends is required (1C makes no request without one)",
                );
                String::new()
            });
        let password = c.secret(
            "onec.loyalty_server.password_file",
            l.password_file.as_deref(),
            "KOPILKA_ONEC_LOYALTY_PASSWORD",
            true,
        );
        let path = l.path.clone().unwrap_or_else(|| "/hs/loyaltyservice".into());
        let path = path.trim_end_matches('/').to_string();
        if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', '{', '}', ' ']) {
            c.bad(
                "onec.loyalty_server.path",
                format!("{path:?} is not a path like /hs/loyaltyservice"),
            );
        }
        let minutes = l.hold_minutes.unwrap_or(30);
        if !(1..=24 * 60).contains(&minutes) {
            c.bad(
                "onec.loyalty_server.hold_minutes",
                format!("{minutes} is outside 1..=1440"),
            );
        }
        LoyaltyServerConfig {
            user,
            password,
            path,
            hold: chrono::Duration::minutes(minutes.clamp(1, 24 * 60)),
        }
    });
    let discount_server = raw.discount_server.as_ref().map(|d| {
        let user = d
            .user
            .clone()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| {
                c.bad(
                    "onec.discount_server.user",
                    "the login Розница sends is required (ПользовательДисконтногоСервера)",
                );
                String::new()
            });
        let password = c.secret(
            "onec.discount_server.password_file",
            d.password_file.as_deref(),
            "KOPILKA_ONEC_DISCOUNT_PASSWORD",
            true,
        );
        let path = d
            .path
            .clone()
            .unwrap_or_else(|| "/ws/DiscountService.1cws".into());
        let path = path.trim_end_matches('/').to_string();
        if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', '{', '}', ' ']) {
            c.bad(
                "onec.discount_server.path",
                format!("{path:?} is not a path like /ws/DiscountService.1cws"),
            );
        }
        // the daemon's own routes (`daemon::http`): the same path twice stops the router
        if ["/healthz", "/metrics", "/status", "/report"].contains(&path.as_str()) || path.starts_with("/v1/") {
            c.bad(
                "onec.discount_server.path",
                format!("{path:?} is one of the daemon's own addresses"),
            );
        }
        let public_url = d.public_url.as_ref().map(|u| u.trim().to_string());
        if let Some(u) = &public_url {
            match reqwest::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https")
                    && p.host_str().is_some()
                    && p.username().is_empty()
                    && p.password().is_none()
                    && p.query().is_none() => {}
                _ => c.bad(
                    "onec.discount_server.public_url",
                    "not an http(s) URL like http://shop-server:8090/ws/DiscountService.1cws (no login, no query)",
                ),
            }
        }
        let voucher_discount = d.voucher_discount.as_ref().map(|g| g.trim().to_ascii_lowercase());
        if let Some(g) = &voucher_discount
            && (uuid::Uuid::parse_str(g).is_err() || g.len() != 36 || g.chars().all(|c| c == '0' || c == '-'))
        {
            c.bad(
                "onec.discount_server.voucher_discount",
                format!(
                    "{g:?} is not the GUID of a discount (Справочник «Скидки (наценки)»: the Ref_Key, \
                     like 3f2a8e10-5b1c-11ef-9c5e-0242ac120002)"
                ),
            );
        }
        DiscountServerConfig {
            user,
            password,
            path,
            public_url,
            record_sales: d.record_sales.unwrap_or(raw.odata.is_none()),
            voucher_discount,
        }
    });
    OnecConfig {
        system,
        exchange_dir: raw.exchange_dir.clone(),
        cost_price_type: raw.cost_price_type.clone(),
        cost_backfill: raw.cost_backfill.unwrap_or(false),
        orders,
        card_requisite: raw.card_requisite.clone(),
        referral_requisite: raw.referral_requisite.clone(),
        invite_requisite: raw.invite_requisite.clone(),
        birthday_requisite: raw.birthday_requisite.clone(),
        return_link_requisite: raw.return_link_requisite.clone(),
        points_requisite: raw.points_requisite.clone(),
        keep,
        site_exchange,
        odata,
        loyalty_server,
        discount_server,
    }
}

pub(super) fn amocrm(raw: &RawAmocrm, c: &mut Check<'_>) -> AmocrmConfig {
    let base_url = c.url("amocrm.base_url", raw.base_url.as_ref());
    let auth = match (&raw.token_file, &raw.client_id) {
        (Some(_), Some(_)) => {
            c.bad(
                "amocrm.token_file",
                "give either token_file (long-lived token) or client_id (OAuth), not both",
            );
            AmocrmAuth::LongLived(Secret(String::new()))
        }
        (_, Some(id)) => {
            let client_secret = c.secret(
                "amocrm.client_secret_file",
                raw.client_secret_file.as_deref(),
                "KOPILKA_AMOCRM_CLIENT_SECRET",
                true,
            );
            if raw
                .redirect_uri
                .as_deref()
                .and_then(|u| reqwest::Url::parse(u).ok())
                .is_some_and(|u| !u.username().is_empty() || u.password().is_some())
            {
                c.bad(
                    "amocrm.redirect_uri",
                    "the URL carries a user name or password (user:password@); AmoCRM sends the code \
                     to it, so write it without them",
                );
            }
            let redirect_uri = raw.redirect_uri.clone().unwrap_or_else(|| {
                c.bad(
                    "amocrm.redirect_uri",
                    "OAuth needs the redirect_uri registered with the integration",
                );
                String::new()
            });
            AmocrmAuth::OAuth {
                client_id: id.clone(),
                client_secret,
                redirect_uri,
            }
        }
        (file, None) => AmocrmAuth::LongLived(c.secret(
            "amocrm.token_file",
            file.as_deref(),
            "KOPILKA_AMOCRM_TOKEN",
            true,
        )),
    };
    let rps = raw.requests_per_second.unwrap_or(7);
    if !(1..=50).contains(&rps) {
        c.bad(
            "amocrm.requests_per_second",
            format!("{rps} is outside 1..=50 (the account-wide limit)"),
        );
    }
    let batch = raw.batch_size.unwrap_or(50);
    if !(1..=250).contains(&batch) {
        c.bad("amocrm.batch_size", format!("{batch} is outside 1..=250"));
    }
    let events = raw.events_page_size.unwrap_or(100);
    if !(1..=250).contains(&events) {
        c.bad("amocrm.events_page_size", format!("{events} is outside 1..=250"));
    }
    let notes = raw.notes.clone().unwrap_or_else(|| {
        vec![
            "accrual".into(),
            "redemption".into(),
            "tier".into(),
            "expiry".into(),
            "voucher".into(),
        ]
    });
    for n in &notes {
        if !["accrual", "redemption", "tier", "expiry", "voucher"].contains(&n.as_str()) {
            c.bad(
                "amocrm.notes",
                format!("{n:?} is not one of accrual, redemption, tier, expiry, voucher"),
            );
        }
    }
    AmocrmConfig {
        base_url,
        auth,
        requests_per_second: rps,
        create_missing: raw.create_missing.unwrap_or(true),
        pipelines: raw.pipelines.clone().unwrap_or_default(),
        won_status: raw.won_status.unwrap_or(142),
        deal_category: raw.deal_category.clone().unwrap_or_else(|| "amocrm-deal".into()),
        batch_size: batch,
        events_page_size: events,
        overlap: chrono::Duration::seconds(raw.overlap_seconds.unwrap_or(300).clamp(0, 86_400)),
        timeout: std::time::Duration::from_secs(raw.timeout_seconds.unwrap_or(30).clamp(1, 600)),
        backoff_initial: std::time::Duration::from_millis(
            raw.backoff_initial_ms.unwrap_or(1000).clamp(1, 60_000),
        ),
        backoff_max: std::time::Duration::from_millis(
            raw.backoff_max_ms.unwrap_or(60_000).clamp(1, 3_600_000),
        ),
        // a relative path is the config file's neighbour, as the rules file is
        mapping: raw.mapping.as_ref().map(|m| match c.base {
            Some(b) if m.is_relative() => b.join(m),
            _ => m.clone(),
        }),
        notes,
        note_accrual_min_points: raw.note_accrual_min_points.unwrap_or(100),
        tags: raw.tags.unwrap_or(true),
    }
}
