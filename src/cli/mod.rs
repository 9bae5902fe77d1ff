//! Command-line interface: argument parsing and output formatting only. Each command calls
//! into the ledger (or, later, the daemon) and prints what it gets back.

// Every text command prints through `out` (a closed pipe ends output quietly instead of
// panicking); these shadow std's macros in this module and the ones below it.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::out::out(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::cli::out::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::out(format_args!("{}\n", format_args!($($arg)*))) };
}
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::cli::out::err(format_args!($($arg)*)) };
}
macro_rules! eprintln {
    () => { $crate::cli::out::err(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::err(format_args!("{}\n", format_args!($($arg)*))) };
}

mod amocrm;
mod bench;
mod demo;
mod out;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chrono::{NaiveDate, TimeZone};
use clap::{Args, Parser, Subcommand};

use crate::clock::{Clock, SystemClock};
use crate::config::{self, Config, EXIT_CONFIG};
use crate::ledger::{AdjustOutcome, AdjustRequest, DateRange, Ledger, OutboxFilter, OutboxState};

#[derive(Parser, Debug)]
#[command(
    name = "kopilka",
    version,
    about = "Loyalty ledger between 1C:Enterprise and AmoCRM"
)]
pub struct Cli {
    /// Configuration file [default: /etc/kopilka/kopilka.toml if it exists].
    #[arg(long, global = true, env = "KOPILKA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ledger database; overrides `[ledger] path`. With --ledger and no --config, ledger
    /// commands read no configuration file at all.
    #[arg(long, global = true, env = "KOPILKA_LEDGER")]
    pub ledger: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate the configuration and report every problem at once (exit 78 on error).
    Check {
        /// Also connect to 1C's OData and name every mapped set and field the base does not
        /// publish (exit 1 if any is missing or 1C cannot be reached).
        #[arg(long)]
        probe: bool,
    },
    /// Import CommerceML files (documents, catalog, offers; .xml or .zip) into the ledger.
    /// Needs only --ledger: for backfills and accountants.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Migrate opening balances from a CSV file (card/phone/e-mail/1C id, points, optional
    /// expiry and tier; UTF-8 or windows-1251), idempotent by content (customer, points,
    /// expiry) whatever the file is called.
    ImportBalances {
        files: Vec<PathBuf>,
        /// Read the balances from 1C's own bonus register over OData instead.
        #[arg(long = "from-1c")]
        from_1c: bool,
        #[arg(long)]
        json: bool,
    },
    /// Customers from the shop's own list (CSV): card/карта, phone/телефон, email/почта,
    /// name/фио, birthday/дата рождения (ДД.ММ.ГГГГ or ISO), referral_code/код друга,
    /// invite_code/код приглашения, consent/согласие, consent_ads/согласие на рекламу. The
    /// file's values win over what sources filled; each change is kept for `history`.
    ImportCustomers {
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// A customer's personal data: `kopilka customer forget CUSTOMER --reason TEXT`.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// A customer's points: available, pending, expiring soon.
    Balance(CustomerArgs),
    /// Every ledger entry of a customer with its source document and explanation.
    History(CustomerArgs),
    /// Ledger totals for a period of business dates.
    Summary(SummaryArgs),
    /// A manual, audited correction of a customer's points.
    Adjust(AdjustArgs),
    /// Ledger maintenance.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Inspect and act on the outbox (what must still reach 1C or AmoCRM).
    Outbox(OutboxArgs),
    /// Members' messages per channel: queued, held (quiet hours, caps, no address yet), sent,
    /// not sent (no consent, unsubscribed) and failed; unsubscribe a member on their request.
    Notify(NotifyArgs),
    /// Documents that could not be applied, with the reason.
    Quarantine(QuarantineArgs),
    /// Burn the points whose expiry date has come.
    Expire,
    /// The nightly jobs now: expiry, tier re-evaluation, birthday and referral bonuses.
    Nightly {
        #[arg(long)]
        json: bool,
    },
    /// Replay the stored sales of a period under another rules file, without touching
    /// the ledger, and compare with the current rules.
    Simulate(SimulateArgs),
    /// A customer's RFM segment and next offers ("bought together"), with the evidence.
    Offers(CustomerArgs),
    /// Day by day: documents at the source and in the ledger, points, deliveries to 1C, and
    /// every difference with the document causing it. Exit 1 when there is any.
    Reconcile {
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Where 1C's side comes from: `recorded` (what kopilka saw at ingest, the default)
        /// or `odata` (re-read the period from 1C now; needs [onec.odata], and every 1C
        /// document of this source must reach kopilka over OData)
        #[arg(long, value_enum, default_value_t = TruthSource::Recorded)]
        source: TruthSource,
    },
    /// Program metrics: members and activity, frequency, average checks, LTV, churn,
    /// liability, program cost against gross margin, loss-making lines.
    Report {
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Accounting postings per legal entity and day (make the due ones with --post).
    Postings {
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        /// Make the postings that are due now (what the nightly `accounting` job does).
        #[arg(long)]
        post: bool,
        #[arg(long)]
        json: bool,
    },
    /// Points issued and redeemed per partner, in rubles and net (coalition settlement);
    /// `--post` makes the settlement postings for 1C.
    Partners(PartnersArgs),
    /// Run the daemon: every enabled job on its schedule, the HTTP endpoint, the 1C site
    /// exchange; stops cleanly on SIGTERM or Ctrl-C.
    Run,
    /// Run every enabled job once (poll each configured source, then deliver the outbox)
    /// and exit: 0 when all succeeded, 1 naming the jobs that did not.
    Once {
        /// Run only this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// Run kopilka on synthetic data in a temporary directory and show what it did.
    Demo(demo::DemoArgs),
    /// Measure throughput on synthetic data.
    Bench(bench::BenchArgs),
    /// AmoCRM: authorise, card fields, customers not linked to a contact.
    Amocrm(amocrm::AmocrmArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
    Html,
}

#[derive(Subcommand, Debug)]
pub enum CustomerCommand {
    /// Forget a customer's personal data (152-ФЗ): name, birthday, phones and e-mails leave
    /// the ledger — every table, overwritten on disk — while the journal, its sums and the
    /// card stay, auditable; the request is recorded with its reason.
    Forget {
        customer: String,
        /// Why (the customer's request, its date): kept with the record.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct CustomerArgs {
    /// Card number, phone (any spelling), e-mail, or id:N.
    pub customer: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// First business date (YYYY-MM-DD, in the configured time zone), inclusive.
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last business date, inclusive.
    #[arg(long)]
    pub to: Option<NaiveDate>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PartnersArgs {
    /// First business date (YYYY-MM-DD, in the configured time zone), inclusive.
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last business date, inclusive.
    #[arg(long)]
    pub to: Option<NaiveDate>,
    #[arg(long)]
    pub json: bool,
    /// Post each partner's position for the period (`--from` and `--to` required) as a
    /// settlement posting beside the daily ones; again for the same period posts only what
    /// changed.
    #[arg(long)]
    pub post: bool,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// The rules file to try.
    #[arg(long)]
    pub rules: PathBuf,
    #[arg(long)]
    pub from: Option<NaiveDate>,
    #[arg(long)]
    pub to: Option<NaiveDate>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AdjustArgs {
    pub customer: String,
    /// Points to add (negative to take away).
    #[arg(allow_negative_numbers = true)]
    pub points: i64,
    /// Why; stored with the entry and shown in history.
    #[arg(long)]
    pub reason: String,
    /// Idempotency key: the same key again changes nothing.
    #[arg(long)]
    pub key: Option<String>,
    /// Who made the correction [default: the OS user].
    #[arg(long)]
    pub by: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Re-check every invariant from the stored rows; exit 1 listing violations.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// A consistent copy of the ledger, taken while the daemon runs (SQLite's VACUUM INTO).
    Backup {
        /// Where to write the copy (must not exist).
        path: std::path::PathBuf,
    },
    /// Put a backup in place of the ledger; refused while a daemon holds it. The replaced
    /// ledger is kept beside it as <ledger>.before-restore-<moment>.
    Restore {
        /// The backup to restore.
        path: std::path::PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub action: Option<OutboxAction>,
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NotifyArgs {
    #[command(subcommand)]
    pub action: Option<NotifyAction>,
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum NotifyAction {
    /// Messages per channel by outcome (the default).
    Status,
    /// Stop a channel's messages to a member (their request by phone or at the till),
    /// honoured at once: pending messages there are not sent.
    Unsubscribe {
        customer: String,
        #[arg(long)]
        channel: String,
    },
    /// Let a channel's messages reach a member again.
    Resubscribe {
        customer: String,
        #[arg(long)]
        channel: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OutboxAction {
    /// Rows, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One row with its payload and last error.
    Show { id: i64 },
    /// Put a dead row (or all of them) back in the queue.
    Retry {
        id: Option<i64>,
        #[arg(long)]
        all_dead: bool,
    },
    /// Give up on a row, recording why.
    Drop {
        id: i64,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Args, Debug)]
pub struct QuarantineArgs {
    /// Include entries that were later applied.
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

/// Logs go to stderr: human-readable on a terminal, JSON lines otherwise (journald), or as
/// `[daemon] log_format` says. `KOPILKA_LOG` sets the filter (`info`, `kopilka=debug`).
/// Secrets never reach the log: configuration holds them as `Secret`, which prints `***`.
fn init_logging(default: &str, format: crate::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOPILKA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = match format {
        crate::config::LogFormat::Json => true,
        crate::config::LogFormat::Human => false,
        crate::config::LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Turns a failure into the process exit status, printing it the way people read it.
pub fn main_with(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Run) {
        init_logging("warn", crate::config::LogFormat::Auto);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(report) = e.downcast_ref::<config::Report>() {
                eprint!("kopilka: {report}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            eprintln!("kopilka: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The configuration a command runs with (see `--ledger` for the ledger-only mode).
fn channel_arg(name: &str) -> anyhow::Result<crate::core::notify::Channel> {
    crate::core::notify::Channel::parse(name)
        .ok_or_else(|| anyhow::anyhow!("--channel {name:?}: channels are email, telegram, salesbot"))
}

fn notify(
    cfg: &Config,
    ledger: &mut Ledger,
    a: &NotifyArgs,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    match a.action.as_ref().unwrap_or(&NotifyAction::Status) {
        NotifyAction::Status => {
            let status = ledger.notify_status(now)?;
            output::notify_status(cfg, &status, a.json)?;
        }
        NotifyAction::Unsubscribe { customer, channel } => {
            let ch = channel_arg(channel)?;
            let id = ledger.customer_id_of(customer)?;
            let n = ledger.notify_unsubscribe(id, ch, &format!("cli:{by}"), now)?;
            println!("customer id:{id} unsubscribed from {ch}; {n} pending messages will not be sent");
        }
        NotifyAction::Resubscribe { customer, channel } => {
            let ch = channel_arg(channel)?;
            let id = ledger.customer_id_of(customer)?;
            if ledger.notify_resubscribe(id, ch)? {
                println!("customer id:{id} receives {ch} messages again");
            } else {
                println!("customer id:{id} was not unsubscribed from {ch}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match (&cli.config, &cli.ledger) {
        (None, Some(_)) => Config::default(),
        (path, _) => config::load(path.as_deref(), &config::env_overrides())?,
    };
    if let Some(l) = &cli.ledger {
        cfg.ledger_path = l.clone();
    }
    Ok(cfg)
}

fn open_existing(cfg: &Config) -> anyhow::Result<Ledger> {
    if !cfg.ledger_path.exists() {
        bail!(
            "no ledger at {} (set [ledger] path in the config or pass --ledger)",
            cfg.ledger_path.display()
        );
    }
    Ledger::open(&cfg.ledger_path, &cfg.ledger)
        .with_context(|| format!("opening {}", cfg.ledger_path.display()))
}

/// Asks Telegram who the bot is (`getMe`): proves the token and names the bot members look for.
fn probe_telegram(t: &config::TelegramConfig) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = crate::notify::telegram::Api::new(t, std::sync::Arc::new(SystemClock))?;
    match rt.block_on(api.get_me()) {
        Ok(name) => {
            println!("  probe: telegram bot @{name} answers");
            if let Some(configured) = t.bot_username.as_deref()
                && !configured.trim_start_matches('@').eq_ignore_ascii_case(&name)
            {
                println!(
                    "  warning: notify.telegram.bot_username is {configured:?}, but the token is @{name}'s"
                );
            }
            Ok(true)
        }
        Err(e) => {
            println!("  probe: telegram: {e}");
            Ok(false)
        }
    }
}

fn os_user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn local_range(cfg: &Config, from: Option<NaiveDate>, to: Option<NaiveDate>) -> anyhow::Result<DateRange> {
    let start = |d: NaiveDate| {
        cfg.timezone
            .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .map(|t| t.with_timezone(&chrono::Utc))
            .with_context(|| format!("{d} has no midnight in {}", cfg.timezone))
    };
    Ok(DateRange {
        from: from.map(start).transpose()?,
        to: to.map(|d| start(d.succ_opt().unwrap_or(d))).transpose()?,
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let clock = SystemClock;
    let now = clock.now();
    match &cli.command {
        Command::Check { probe } => {
            let cfg = config::load(cli.config.as_deref(), &config::env_overrides())?;
            println!(
                "configuration ok ({})",
                cfg.file
                    .as_ref()
                    .map_or("built-in defaults".to_string(), |f| f.display().to_string())
            );
            for w in &cfg.warnings {
                println!("  warning: {w}");
            }
            println!("  ledger: {}", cfg.ledger_path.display());
            println!("  time zone: {}", cfg.timezone);
            let p = &cfg.program;
            println!(
                "  rules: {} ({} earning rules, {} tiers, {} stamp cards, {} thresholds)",
                cfg.rules_file
                    .as_ref()
                    .map_or("flat percentage from [program]".to_string(), |f| f
                        .display()
                        .to_string()),
                p.earn.len(),
                p.tiers.len(),
                p.stamps.len(),
                p.thresholds.len()
            );
            if let Some(amo) = &cfg.amocrm {
                // the field map is read when the AmoCRM jobs start; a bad key must fail here first
                match crate::amocrm::fields::load_mapping(amo.mapping.as_deref()) {
                    Ok((_, sources)) => println!(
                        "  amocrm field map: {} ({} contact fields read as customer attributes)",
                        amo.mapping
                            .as_ref()
                            .map_or("built-in codes".to_string(), |m| m.display().to_string()),
                        sources.0.len()
                    ),
                    Err(e) => {
                        println!("  error: {e}");
                        return Ok(ExitCode::from(78));
                    }
                }
            }
            let mut failed = false;
            if *probe && cfg.amocrm.is_some() {
                failed |= !amocrm::probe(&cli)?;
            }
            if *probe && cfg.onec.as_ref().is_some_and(|o| o.odata.is_some()) {
                let report = crate::onec::odata::probe_blocking(&cfg).context("odata probe")?;
                print!("{report}");
                failed |= !report.ok();
            }
            if *probe && let Some(t) = &cfg.notify.telegram {
                failed |= !probe_telegram(t)?;
            }
            if *probe
                && cfg.onec.as_ref().is_none_or(|o| o.odata.is_none())
                && cfg.notify.telegram.is_none()
                && cfg.amocrm.is_none()
            {
                println!(
                    "  probe: none of [onec.odata], [notify.telegram] and [amocrm] is configured; nothing to probe"
                );
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Import { files, json } => {
            let cfg = load_config(&cli)?;
            let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
                .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
            let mut settings = crate::onec::import::ImportSettings::from_config(&cfg);
            // someone at a terminal watches a long backfill; a pipe gets only the report
            let watch = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let progress = std::sync::Arc::new(crate::onec::import::ImportProgress::default());
                settings.progress = Some(progress.clone());
                ImportWatch::start(progress)
            });
            let mut failed = false;
            let mut reports = Vec::new();
            for f in files {
                match crate::onec::import::import_path(&mut ledger, f, &settings, &cfg, SystemClock.now()) {
                    Ok(r) => {
                        failed |= r.truncated.is_some();
                        reports.push(r);
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("kopilka: {}: {e}", f.display());
                    }
                }
            }
            if let Some(w) = watch {
                w.finish();
            }
            output::import_reports(&reports, *json)?;
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::ImportBalances { files, from_1c, json } => {
            let cfg = load_config(&cli)?;
            let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
                .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
            if *from_1c {
                let shared = crate::ledger::SharedLedger::new(ledger);
                let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                let r = rt.block_on(crate::onec::odata::import_balances_from_1c(&cfg, &shared))?;
                output::opening_report("1C bonus register", &r, *json)?;
                return Ok(if r.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            if files.is_empty() {
                bail!("name the CSV file(s) to import, or --from-1c");
            }
            let dest = cfg.destinations();
            let mut any_problem = false;
            for f in files {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let rows = crate::migrate::read_balances_csv(&bytes, cfg.timezone)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                let file = format!(
                    "csv:{}",
                    f.file_name()
                        .map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into_owned())
                );
                let r =
                    ledger.import_opening_balances("csv", &file, rows, &cfg.ingest_context(now, &dest))?;
                any_problem |= !r.problems.is_empty();
                output::opening_report(&f.display().to_string(), &r, *json)?;
            }
            Ok(if any_problem {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Balance(a) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            let b = ledger.balance(&a.customer, now, cfg.warn_before)?;
            let tier = b.tier.as_deref().and_then(|t| cfg.program.tier(t));
            // the code the member sends the bot; made here, the one place staff look a member up
            let link_code = match cfg.notify.telegram {
                Some(_) => Some(ledger.telegram_link_code(b.customer.id, now)?),
                None => None,
            };
            let bot = cfg
                .notify
                .telegram
                .as_ref()
                .and_then(|t| t.bot_username.as_deref());
            output::balance(
                &b,
                tier,
                link_code.as_deref().map(|c| (c, bot)),
                a.json,
                cfg.timezone,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::History(a) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let (c, entries) = ledger.history(&a.customer)?;
            let changes = ledger.attribute_changes(&a.customer)?;
            let vouchers = ledger.balance(&a.customer, now, cfg.warn_before)?.vouchers;
            output::history(&c, &entries, &changes, &vouchers, a.json, cfg.timezone)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ImportCustomers { files, json } => {
            let cfg = load_config(&cli)?;
            let mut ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
                .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
            if files.is_empty() {
                bail!("name the CSV file(s) to import");
            }
            let mut any_problem = false;
            for f in files {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let rows = crate::migrate::read_customers_csv(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                let name = f
                    .file_name()
                    .map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into_owned());
                let r = ledger.import_customers(&format!("csv:{name}"), rows, &cfg.program, now)?;
                any_problem |= !r.problems.is_empty();
                output::customers_report(&f.display().to_string(), &r, *json)?;
            }
            Ok(if any_problem {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Customer(CustomerCommand::Forget {
            customer,
            reason,
            json,
        }) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
            let f = ledger.forget_customer(customer, reason, &format!("cli:{by}"), now)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                println!(
                    "customer id:{} forgotten: {} phone/e-mail keys removed, {} Telegram chats unlinked, {} texts scrubbed; \
                     the journal is unchanged",
                    f.customer_id, f.keys_removed, f.telegram_chats_removed, f.rows_scrubbed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Summary(a) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let range = local_range(&cfg, a.from, a.to)?;
            let s = ledger.summary(&range, now)?;
            output::summary(&s, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Adjust(a) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            if a.reason.trim().is_empty() {
                bail!("--reason must say why the balance is corrected");
            }
            let req = AdjustRequest {
                customer: a.customer.clone(),
                points: a.points,
                reason: a.reason.clone(),
                key: a.key.clone(),
                by: a.by.clone().unwrap_or_else(os_user),
            };
            let dest = cfg.destinations();
            let ctx = cfg.ingest_context(now, &dest);
            match ledger.adjust(&req, &ctx)? {
                AdjustOutcome::Applied { tx_id, customer_id } => {
                    println!(
                        "adjusted customer id:{customer_id} by {} points (tx {tx_id})",
                        a.points
                    )
                }
                AdjustOutcome::AlreadyApplied { tx_id, customer_id } => println!(
                    "already applied: key {:?} is tx {tx_id} for customer id:{customer_id}; nothing changed",
                    a.key.as_deref().unwrap_or("")
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger(LedgerCommand::Verify { json }) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let v = ledger.verify()?;
            output::violations(&v, *json)?;
            Ok(if v.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Ledger(LedgerCommand::Backup { path }) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            ledger.backup_to(path)?;
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            println!(
                "backed up {} to {} ({size} bytes)",
                cfg.ledger_path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger(LedgerCommand::Restore { path }) => {
            let cfg = load_config(&cli)?;
            let r = crate::ledger::backup::restore(path, &cfg.ledger_path, &cfg.ledger, now)?;
            println!(
                "restored {} from {} (schema {}){}",
                cfg.ledger_path.display(),
                path.display(),
                r.schema_version,
                r.previous
                    .map(|p| format!("; the replaced ledger is kept as {}", p.display()))
                    .unwrap_or_default()
            );
            println!(
                "next start: every source is read again from the backup's checkpoints; what was already \
                 delivered is recognised by its idempotency key and not doubled in 1C or AmoCRM"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox(a) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            outbox(&mut ledger, a, now)
        }
        Command::Notify(a) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            notify(&cfg, &mut ledger, a, now)
        }
        Command::Quarantine(a) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            output::quarantine(&ledger.quarantine_list(a.all)?, a.json, cfg.timezone)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Expire => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            let dest = cfg.destinations();
            let ctx = cfg.ingest_context(now, &dest);
            let n = ledger.expire_due(&ctx)?;
            println!("{n} points expired");
            Ok(ExitCode::SUCCESS)
        }
        Command::Nightly { json } => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            let dest = cfg.destinations();
            let ctx = cfg.ingest_context(now, &dest);
            let r = ledger.nightly(&cfg.program, &ctx)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "expired {} points; {} tier changes; {} birthday bonuses; {} referral pairs rewarded; {} vouchers expired",
                    r.expired_points,
                    r.tier_changes,
                    r.birthday_bonuses,
                    r.referral_bonuses,
                    r.vouchers_expired
                );
                for why in &r.referrals_refused {
                    println!("referral refused: {why}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(a) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let mut candidate = crate::rules_file::load(&a.rules)?;
            candidate.timezone = cfg.timezone;
            let range = local_range(&cfg, a.from, a.to)?;
            // the sales before the period build the state the period's sales found
            let mut sales = Vec::new();
            let history = crate::ledger::DateRange {
                from: None,
                to: range.to,
            };
            ledger.for_each_sale(&history, |s| sales.push(s))?;
            let current = crate::core::simulate::simulate(&cfg.program, sales.iter().cloned(), range.from);
            let proposed = crate::core::simulate::simulate(&candidate, sales, range.from);
            let baseline = output::Baseline::new(&ledger.issued_figures(&range)?, &current);
            output::simulation(&current, &proposed, &baseline, &a.rules, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Offers(a) => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            output::offers(&ledger.offers_for(&a.customer, now)?, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile {
            from,
            to,
            format,
            source,
        } => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let today = now.with_timezone(&cfg.timezone).date_naive();
            let to = to.unwrap_or(today);
            let from = from.unwrap_or(to - chrono::Duration::days(6));
            let truth = match source {
                TruthSource::Recorded => None,
                TruthSource::Odata => Some(reread_odata(&cfg, from, to)?),
            };
            let r = ledger.reconcile(from, to, &cfg.books(), today, truth.as_deref())?;
            output::reconciliation(&r, *format)?;
            Ok(if r.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Report { from, to, format } => {
            let cfg = load_config(&cli)?;
            let ledger = open_existing(&cfg)?;
            let range = local_range(&cfg, *from, *to)?;
            let r = ledger.program_report(&range, now, cfg.program.point_value.0)?;
            match format {
                Format::Html => println!("{}", crate::daemon::report_html::render(&r, cfg.timezone, false)),
                Format::Json | Format::Csv => println!("{}", serde_json::to_string_pretty(&r)?),
                Format::Table => output::report(&r, cfg.timezone),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Postings { from, to, post, json } => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            if *post {
                let dest = cfg.destinations();
                let made = ledger.post_accounting(
                    &cfg.books(),
                    cfg.accounting.lookback_days,
                    &cfg.ingest_context(now, &dest),
                )?;
                eprintln!("{} postings made", made.len());
            }
            let today = now.with_timezone(&cfg.timezone).date_naive();
            let from = from.unwrap_or(today - chrono::Duration::days(31));
            let to = to.unwrap_or(today);
            output::postings(&ledger.postings(from, to)?, &cfg, *json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Partners(a) => {
            let cfg = load_config(&cli)?;
            let mut ledger = open_existing(&cfg)?;
            if a.post {
                let (Some(from), Some(to)) = (a.from, a.to) else {
                    anyhow::bail!("partners --post needs --from and --to: the period being settled");
                };
                let made = ledger.post_partner_settlement(&cfg.books(), from, to, now)?;
                eprintln!("{} settlement postings made", made.len());
            }
            let range = local_range(&cfg, a.from, a.to)?;
            output::partners(&ledger.partner_totals(&range, cfg.program.point_value)?, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let cfg = load_config(&cli)?;
            init_logging("info", cfg.daemon.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("Stop requested");
                    trigger.cancel();
                });
                let runtime = std::sync::Arc::new(crate::daemon::runtime::Runtime::new(SystemClock.now()));
                crate::daemon::runtime::run(
                    std::sync::Arc::new(cfg),
                    std::sync::Arc::new(SystemClock),
                    shutdown,
                    runtime,
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Once { job } => {
            let cfg = load_config(&cli)?;
            let ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
                .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let ctx = crate::daemon::JobContext {
                cfg: std::sync::Arc::new(cfg),
                ledger: crate::ledger::SharedLedger::new(ledger),
                clock: std::sync::Arc::new(SystemClock),
                cancel: tokio_util::sync::CancellationToken::new(),
            };
            let results = rt.block_on(crate::daemon::run_once(&ctx, job.as_deref()));
            if results.is_empty() {
                bail!(
                    "no job {:?} is enabled by this configuration",
                    job.as_deref().unwrap_or("")
                );
            }
            let mut failed = Vec::new();
            for (name, r) in &results {
                match r {
                    Ok(o) => println!("{name}: ok — {}", o.summary),
                    Err(e) => {
                        println!("{name}: FAILED — {e:#}");
                        failed.push(name.clone());
                    }
                }
            }
            if failed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("kopilka: jobs failed: {}", failed.join(", "));
                Ok(ExitCode::from(1))
            }
        }
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Amocrm(a) => amocrm::run(&cli, a),
    }
}

fn outbox(
    ledger: &mut Ledger,
    a: &OutboxArgs,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    let action = a.action.as_ref().unwrap_or(&OutboxAction::List {
        state: None,
        destination: None,
        limit: 50,
    });
    match action {
        OutboxAction::List {
            state,
            destination,
            limit,
        } => {
            let state = match state {
                Some(s) => Some(OutboxState::parse(s).with_context(|| {
                    format!("unknown state {s:?}; one of pending, delivered, dead, superseded, dropped")
                })?),
                None => None,
            };
            let rows = ledger.outbox_list(&OutboxFilter {
                state,
                destination: destination.clone(),
                limit: Some(*limit),
            })?;
            output::outbox_rows(&rows, &ledger.outbox_counts()?, a.json)?;
        }
        OutboxAction::Show { id } => output::outbox_row(&ledger.outbox_show(*id)?, a.json)?,
        OutboxAction::Retry { id, all_dead } => match (id, all_dead) {
            (Some(id), false) => {
                ledger.outbox_retry(*id, now)?;
                println!("outbox row {id} is pending again");
            }
            (None, true) => println!(
                "{} dead rows are pending again",
                ledger.outbox_retry_all_dead(now)?
            ),
            _ => bail!("give either an outbox row id or --all-dead"),
        },
        OutboxAction::Drop { id, reason } => {
            if reason.trim().is_empty() {
                bail!("--reason must say why the row is dropped");
            }
            ledger.outbox_drop(*id, &format!("{reason} (by {})", os_user()), now)?;
            println!("outbox row {id} dropped");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (systemd) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Where `kopilka reconcile` takes 1C's side from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TruthSource {
    Recorded,
    Odata,
}

/// The period's documents as 1C's OData interface has them now.
fn reread_odata(
    cfg: &Config,
    from: NaiveDate,
    to: NaiveDate,
) -> anyhow::Result<Vec<crate::ledger::SourceDoc>> {
    anyhow::ensure!(
        cfg.onec.as_ref().and_then(|o| o.odata.as_ref()).is_some(),
        "--source odata needs [onec.odata] in the configuration"
    );
    let poller = crate::onec::odata::poll::OdataPoller::new(std::sync::Arc::new(cfg.clone()))
        .context("the OData source")?;
    let start = from.and_hms_opt(0, 0, 0).unwrap_or_default();
    let end = to
        .succ_opt()
        .unwrap_or(to)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(poller.source_docs(start, end))
        .context("re-reading the period from 1C over OData")
}

/// The terminal's view of a running import: documents, bytes, documents per second and the
/// time left, redrawn a few times a second from the importer's counters (`indicatif`).
struct ImportWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl ImportWatch {
    fn start(progress: std::sync::Arc<crate::onec::import::ImportProgress>) -> ImportWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes}  {msg}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let started = std::time::Instant::now();
            loop {
                let finished = done.load(Ordering::Relaxed);
                let documents = progress.documents.load(Ordering::Relaxed);
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.bytes.load(Ordering::Relaxed));
                let secs = started.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!("{documents} documents, {:.0}/s", documents as f64 / secs));
                if finished {
                    bar.finish_and_clear();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        ImportWatch { stop, thread }
    }

    fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
