//! `kopilka demo`: the real jobs against built-in simulators of 1C (OData and the site
//! exchange) and AmoCRM on loopback, on a fresh machine with nothing else.
//!
//! Each channel carries what a stock 1C really sends on it
//! (`../shared/specs/onec-stock-channels.md`): till receipts and returns are read from the
//! 1C base over OData; the site exchange brings only the site's orders and their payment
//! status, on 1C's own schedule (a test `checkauth`, `query`/`success`, the upload); bonus
//! documents go back to 1C over OData. The base then changes — edits, unpostings, returns,
//! new sales, a malformed receipt — and is polled again. At the end the ledger is compared
//! with both simulators' truth, reconciled and verified.

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
use crate::sim::onec_odata::{Entity, OdataSimBuilder, RECEIPTS, Val};
use crate::sim::onec_orders::SiteOrders;
use crate::sim::onec_site::{Edition, SiteClient};

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
        if self.tty {
            eprint!("\r[{}] {what:<60}", bar(self.step, self.steps));
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

/// A 30-cell progress bar after `step` of `steps`; never past its end, whatever the count of
/// steps says (a step more than counted once made the terminal run panic at its last line).
fn bar(step: usize, steps: usize) -> String {
    let done = (step * 30 / steps.max(1)).min(30);
    format!("{}{}", "#".repeat(done), ".".repeat(30 - done))
}

#[cfg(test)]
mod bar_tests {
    #[test]
    fn the_bar_fills_and_stops_at_its_end() {
        assert_eq!(super::bar(0, 10), ".".repeat(30));
        assert_eq!(super::bar(5, 10), format!("{}{}", "#".repeat(15), ".".repeat(15)));
        assert_eq!(super::bar(10, 10), "#".repeat(30));
        assert_eq!(super::bar(11, 10), "#".repeat(30));
        assert_eq!(super::bar(1, 0), "#".repeat(30));
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
        steps: 10,
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
    // the shop's Salesbot in AmoCRM and its mail relay, for members' messages
    amo.add_bot(DEMO_BOT);
    // the field where managers type the friend code a new customer came with
    amo.add_field("Код друга, с которым пришёл", "FRIEND_CODE_USED", "text");
    // the shop's own programs, as 1C holds them: a gift tea for every ten teas (a product
    // added to the catalog for it) and a club whose card is sold for a month at a time
    let tz = onec.timezone();
    let now_local = |days: i64| {
        (chrono::Utc::now() - chrono::Duration::days(days))
            .with_timezone(&tz)
            .naive_local()
    };
    let gift = onec.add_product(
        "GIFT-TEA",
        "Чай в подарок, 50 г",
        "gifts",
        Money(15_000),
        Money(6_000),
    );
    let club = onec.add_product(
        "CLUB-MONTH",
        "Клубная карта «Чайный клуб», месяц",
        "club",
        Money(50_000),
        Money(0),
    );
    // one member bought the club card 45 days ago and never again (lapsed 15 days ago),
    // another 10 days ago (in force) — or on the base's last day when a small base ends
    // earlier: a receipt dated past every other would move the poll's watermark beyond the
    // days the demo edits later
    let club_buyers = [(3usize, 45i64), (4, 10)];
    for (i, days) in club_buyers {
        onec.add_sale_of(
            i,
            &[("CLUB-MONTH", 1, false)],
            now_local(days).min(onec.last_date()),
        );
    }
    let smtp = crate::sim::smtp::SmtpSim::start()
        .await
        .context("starting the SMTP server")?;
    let bot_token = "7001:demo-bot-token";
    let telegram = crate::sim::telegram::TelegramSim::start(bot_token, Arc::new(SystemClock))
        .await
        .context("starting the Telegram Bot API stand-in")?;

    // the configuration a shop would write, pointed at the simulators
    std::fs::write(dir.join("odata-password"), onec.password())?;
    std::fs::write(dir.join("site-password"), "1c-exchange")?;
    std::fs::write(dir.join("amocrm-token"), token)?;
    std::fs::write(dir.join("telegram-token"), bot_token)?;
    std::fs::write(dir.join("api-token"), "demo-till-token")?;
    // the shipped rules; the demo runs at any hour, so its members have no quiet hours
    std::fs::write(dir.join("rules.toml"), demo_rules(&gift, &club))?;
    // the field map, with the one field the shop's managers fill in for kopilka to read
    std::fs::write(
        dir.join("amocrm.toml"),
        include_str!("../../mappings/amocrm.toml").replace(
            "# referral_code   = \"FRIEND_CODE_USED\"",
            "referral_code = \"FRIEND_CODE_USED\"",
        ),
    )?;
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
# site orders paid online count as sales (their receipts are not in 1C's till)
orders = "when_paid"
[onec.odata]
url = "{odata}"
user = "{user}"
password_file = "odata-password"
mapping = "roznica2"
overlap_minutes = {overlap}
[onec.site_exchange]
listen = "127.0.0.1:0"
user = "1c"
password_file = "site-password"
[amocrm]
base_url = "{amocrm}"
token_file = "amocrm-token"
requests_per_second = 50
mapping = "amocrm.toml"
[notify.email]
host = "127.0.0.1"
port = {smtp}
tls = "none"
from = "Чайный дом <bonus@shop.example>"
[notify.salesbot]
bot_id = {bot}
[notify.telegram]
token_file = "telegram-token"
api_url = "{telegram}"
bot_username = "chaynyi_dom_bot"
[accounting]
entity = "{org}"
postback = "odata"
[daemon]
http_listen = "127.0.0.1:0"
api_token_file = "api-token"
"#,
        ledger = dir.join("kopilka.db").display(),
        // the demo edits its latest ~20 documents; the window reaches them, as a shop's
        // overlap reaches the days its staff still correct
        overlap = (spacing * 30).max(1440),
        exchange = dir.join("exchange").display(),
        odata = onec.base_url(),
        user = onec.user(),
        amocrm = amo.base_url,
        org = crate::sim::onec_odata::ORGANIZATION,
        smtp = smtp.port,
        bot = DEMO_BOT,
        telegram = telegram.base_url,
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

    // the shop's own member list: who agreed to messages (every third declined)
    let mut agreed = 0;
    let members = {
        let mut csv = String::from("Карта;Телефон;Почта;ФИО;Согласие\n");
        for (i, c) in onec.shop().customers.iter().enumerate() {
            let Some(card) = &c.card else { continue };
            agreed += usize::from(i % 3 != 2);
            csv.push_str(&format!(
                "{card};{};{};{};{}\n",
                c.phone
                    .as_ref()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                c.email
                    .as_ref()
                    .map(|e| e.as_str().to_string())
                    .unwrap_or_default(),
                c.name.clone().unwrap_or_default(),
                if i % 3 == 2 { "нет" } else { "да" }
            ));
        }
        let rows = crate::migrate::read_customers_csv(csv.as_bytes())
            .map_err(|e| anyhow::anyhow!("members list: {e}"))?;
        let rules = cfg.program.clone();
        let now = clock.now();
        ledger
            .run(move |l| l.import_customers("csv:members.csv", rows, &rules, now))
            .await?
    };

    p.show("first poll of 1C over OData, contacts to AmoCRM");
    failures.extend(jobs("first run").await);

    p.show("a till pays with points through kopilka's holds: hold, a second till refused, commit");
    let till = till_pays(&ctx, &onec.shop()).await?;
    failures.extend(till.failure.clone());

    p.show("1C's site exchange runs on its schedule: the site's orders and their payments");
    let shop = onec.shop();
    let partners = (0..shop.customers.len()).map(|i| onec.person_key(i)).collect();
    let mut orders = SiteOrders::new(shop, a.seed + 1, cfg.timezone).customer_ids(partners);
    let n_orders = (a.sales / 20).max(10);
    let order_day = clock.now() - chrono::Duration::days(2);
    let placed = orders.place(n_orders, order_day);
    let mut onec_site = SiteClient::new(&site_url, "1c", "1c-exchange").edition(Edition::Ut);
    let mut site_runs = 0;
    // run 1: the new orders; run 2: most are paid, one is cancelled; run 3: nothing changed
    for run in 0..3 {
        if run == 1 {
            for (i, o) in placed.iter().enumerate() {
                if i % 5 != 4 {
                    orders.pay(*o, order_day + chrono::Duration::hours(1));
                }
            }
            if let Some(o) = placed.last() {
                orders.cancel(*o);
            }
        }
        let upload = orders.upload(clock.now());
        onec_site
            .scheduled_run(upload.as_ref().map(|(n, b)| (n.as_str(), b.as_slice())), None)
            .await
            .context("1C's scheduled site exchange")?;
        orders.confirm();
        site_runs += 1;
    }
    let (paid_orders, paid_total) = orders.paid_truth();

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
    // and this morning's sales: news the members hear about (older events make no message)
    let this_morning = (clock.now() - chrono::Duration::hours(2))
        .with_timezone(&cfg.timezone)
        .naive_local();
    onec.add_sales(8, Some(this_morning));
    // and what people did for the event programs: a friend code typed in AmoCRM, a birth
    // date typed in 1C, a gift tea taken free
    let programs = programs_from_the_shop(&ctx, &onec, &amo).await?;
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
        // typed this morning, among the news (a small base's spaced sales end weeks ago)
        bad.set(
            "Date",
            Val::str(this_morning.format("%Y-%m-%dT%H:%M:%S").to_string()),
        );
        bad.set("Number", Val::str("ДЕМО-БРАК"));
        onec.insert(RECEIPTS, Entity { ..bad });
        bad_malformed = 1;
    }
    let with_bad = onec.truth();

    p.show("second poll of 1C, changes applied");
    failures.extend(jobs("second run").await);
    // a member whose message waits for the Telegram link opens the bot with the code the
    // shop gave them (`kopilka balance` shows it): the waiting message follows the link
    let waiting = ledger
        .run(|l| {
            l.outbox_list(&crate::ledger::OutboxFilter {
                destination: Some(crate::core::notify::Channel::Telegram.destination().to_string()),
                state: Some(crate::ledger::OutboxState::Pending),
                ..Default::default()
            })
        })
        .await?;
    let chat = 500_100;
    let linked = match waiting
        .iter()
        .find_map(|r| serde_json::from_str::<crate::core::notify::Message>(&r.payload).ok())
    {
        Some(m) => {
            let now = clock.now();
            let code = ledger
                .run(move |l| l.telegram_link_code(m.customer_id, now))
                .await?;
            telegram.user_says(chat, &format!("/start {code}"));
            Some(m.customer_id)
        }
        None => None,
    };

    p.show("deliveries: AmoCRM contacts and notes, Telegram, e-mail, nightly jobs, postings");
    failures.extend(jobs("third run").await);

    p.show("1C's next scheduled exchange; bonus documents in 1C over OData");
    // 1C keeps calling on its schedule; the reply it loads holds no foreign documents
    onec_site
        .scheduled_run(None, None)
        .await
        .context("1C's scheduled site exchange")?;
    site_runs += 1;
    let site_stats = exchange.stats();
    let mapping = crate::onec::mapping::load(
        &cfg.onec
            .as_ref()
            .and_then(|o| o.odata.as_ref())
            .map_or_else(|| "roznica2".to_string(), |o| o.mapping.clone()),
        cfg_path.parent(),
    )?;
    let (bonus_rows, bonus_in_1c) = {
        let rows = ledger
            .run(|l| {
                l.outbox_list(&crate::ledger::OutboxFilter {
                    destination: Some(config::ONEC_BONUS.to_string()),
                    ..Default::default()
                })
            })
            .await?;
        let set = mapping
            .bonus_document
            .as_ref()
            .map(|b| b.set.clone())
            .unwrap_or_default();
        let in_1c = rows
            .iter()
            .filter(|r| {
                r.state == crate::ledger::OutboxState::Delivered
                    && onec
                        .entity(&set, &crate::onec::postback::document_id(r).to_string())
                        .is_some()
            })
            .count();
        (rows.len(), in_1c)
    };

    // members' messages: what each channel's far side received
    let mails = smtp.mailbox();
    let bot_runs = amo.bot_runs();
    let chat_texts = telegram.texts_to(chat);
    let status_now = clock.now();
    let messages = ledger.run(move |l| l.notify_status(status_now)).await?;

    p.show("checking the ledger against 1C and AmoCRM");
    let now = clock.now();
    let s = ledger.run(move |l| l.summary(&DateRange::default(), now)).await?;
    let expected_sales = with_bad.sales - bad_malformed + paid_orders as i64;
    let expected_returns = with_bad.returns;
    let bad_value = with_bad.net_total_kopecks - before_bad.net_total_kopecks;
    let expected_total = with_bad.net_total_kopecks - bad_value + paid_total.0;
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
    let prog = ledger.run(move |l| l.programs_report(now)).await?;
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
        "1C holds {} till sales, {} returns, {} RUB net (read over OData) and {} paid site orders, {} RUB \
         (from the site exchange); the ledger holds {} sales, {} returns, {} RUB",
        with_bad.sales - bad_malformed,
        with_bad.returns,
        Money(with_bad.net_total_kopecks - bad_value),
        paid_orders,
        paid_total,
        s.sales_count,
        s.returns_count,
        Money(s.sales_total_kopecks)
    );
    println!(
        "malformed documents planted: {bad_malformed} — quarantined: {} (each listed above with its reason)",
        s.quarantined
    );
    println!(
        "site exchange: {site_runs} scheduled runs of 1C, {} checkauth accepted, {} refused, {} order files imported, {} rejected",
        site_stats.checkauth_accepted,
        site_stats.checkauth_refused,
        site_stats.files_imported,
        site_stats.files_rejected
    );
    println!(
        "AmoCRM: {contacts_equal} of {contacts_checked} sampled contacts show exactly the ledger's balance"
    );
    println!("{}", till.line);
    println!(
        "1C holds {bonus_in_1c} of {bonus_rows} bonus documents kopilka wrote over OData (posted, one per movement)"
    );
    println!(
        "members: {} from the shop's list ({} agreed to messages)",
        members.created + members.updated,
        agreed
    );
    for c in &messages {
        println!(
            "messages by {}: {} sent, {} held, {} not sent ({}), {} failed",
            c.channel,
            c.sent,
            c.held.values().sum::<i64>(),
            c.not_sent.values().sum::<i64>(),
            c.not_sent
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect::<Vec<_>>()
                .join("; "),
            c.failed
        );
    }
    if mails.is_empty() {
        println!("e-mail: no member with an address and consent had an e-mail event in this run");
    }
    if let Some(m) = mails.first() {
        println!(
            "an e-mail as the mail server received it — To: {}; Message-ID: {}\n  {}",
            m.to.join(", "),
            m.header("Message-ID").unwrap_or_default(),
            m.text().lines().next().unwrap_or_default().replace('\u{a0}', " ")
        );
    }
    if let Some(customer) = linked {
        println!(
            "the Telegram chat of member id:{customer}, linked with a one-time code, as the Bot API received it:"
        );
        for t in &chat_texts {
            println!("  {}", t.replace('\u{a0}', " ").replace('\n', " / "));
        }
    }
    if let Some(r) = bot_runs.first() {
        println!(
            "a Salesbot run as AmoCRM received it — bot {} on contact {}, the message field read:\n  {}",
            r.bot_id,
            r.entity_id,
            r.message.clone().unwrap_or_default().replace('\u{a0}', " ")
        );
    }
    println!("programs, from what people did in the simulators (no SQL):");
    match &programs.referral {
        Some((code, from, to, contact)) => println!(
            "  referral: card {from}'s friend code {code} (from its AmoCRM card) typed on contact {contact} of card {to} \
             → {} pair(s) paid, {} points",
            prog.referral_pairs, prog.referral_points
        ),
        None => println!("  referral: no two members had AmoCRM contacts to plant one"),
    }
    match &programs.birthday {
        Some((card, date)) => println!(
            "  birthday: ДатаРождения {} typed in 1C for card {card}, who bought this morning → {} birthday bonus(es), {} points",
            date.format("%d.%m.%Y"),
            prog.birthday_bonuses,
            prog.birthday_points
        ),
        None => println!("  birthday: no member without a birth date to plant one"),
    }
    println!(
        "  vouchers (a free gift tea for every ten teas): {} issued, {} sent, {} used{}, {} expired",
        prog.vouchers_issued,
        prog.vouchers_sent,
        prog.vouchers_used,
        programs
            .voucher
            .as_ref()
            .map(|(code, card)| format!(" ({code} of card {card} at the till this morning)"))
            .unwrap_or_default(),
        prog.vouchers_expired
    );
    println!(
        "  club memberships (a month each, sold in 1C): {} in force, {} lapsed, {} ended by a returned fee",
        prog.memberships_in_force, prog.memberships_lapsed, prog.memberships_ended
    );
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
        && contacts_equal == contacts_checked
        && site_stats.checkauth_refused == 0
        && site_stats.files_rejected == 0
        && bonus_rows > 0
        && bonus_in_1c == bonus_rows
        // what was planted pays; at the default size every program is planted (a small shop
        // may have no member left to plant one on, and says so above)
        && programs.referral.as_ref().is_none_or(|_| prog.referral_pairs > 0)
        && programs.birthday.as_ref().is_none_or(|_| prog.birthday_bonuses > 0)
        && programs.voucher.as_ref().is_none_or(|_| prog.vouchers_used > 0)
        && (a.customers < 100
            || (programs.referral.is_some()
                && programs.birthday.is_some()
                && programs.voucher.is_some()
                && prog.memberships_lapsed > 0
                && prog.memberships_in_force > 0))
        && messages.iter().all(|c| c.failed == 0)
        && messages.iter().map(|c| c.sent).sum::<i64>() > 0
        && mails.len() as i64
            == messages
                .iter()
                .find(|c| c.channel == "email")
                .map_or(0, |c| c.sent)
        && bot_runs.len() as i64
            == messages
                .iter()
                .find(|c| c.channel == "salesbot")
                .map_or(0, |c| c.sent);
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

/// The shipped rules as the demo shop runs them: no quiet hours (the demo runs at any hour),
/// the club card sold for a month at a time, and a gift tea for every ten teas bought —
/// products named by their 1C keys, folders by their codes, as for an OData base.
fn demo_rules(gift: &str, club: &str) -> String {
    let mut rules = include_str!("../../config/rules.toml")
        .replace("quiet_hours = \"21:00-09:00\"", "quiet_hours = \"none\"")
        .replace(
            "membership_products = [\"CLUB-FEE\"]",
            &format!(
                "membership_products = [\"{club}\"]            # «Клубная карта», 1C key\nterm_days = 30"
            ),
        );
    rules.push_str(&format!(
        "\n# every tenth tea (1C's folder «tea») earns a free 50 g pack of the gift tea\n\
         [[stamp_cards]]\nid = \"gift-tea\"\nevery = 10\ncount = \"items\"\ninclude_categories = [\"tea\"]\n\
         reward_product = \"{gift}\"\nreward_valid_days = 60\n"
    ));
    rules
}

/// What the demo's people did to reach the event programs, each in a simulator, never in
/// the ledger: a manager typed a member's friend code on a friend's AmoCRM contact; a cashier
/// typed a member's birth date into 1C and the member bought something; a member holding a
/// gift-tea voucher took the tea free at the till.
#[derive(Default)]
struct Planted {
    /// (friend code, the referrer's card, the friend's card, the friend's contact)
    referral: Option<(String, String, String, i64)>,
    /// (card, the birth date typed)
    birthday: Option<(String, chrono::NaiveDate)>,
    /// (voucher code, card)
    voucher: Option<(String, String)>,
}

async fn programs_from_the_shop(
    ctx: &JobContext,
    onec: &crate::sim::onec_odata::OdataSim,
    amo: &AmoSim,
) -> anyhow::Result<Planted> {
    let shop = onec.shop();
    let now = ctx.clock.now();
    let tz = ctx.cfg.timezone;
    let morning = (now - chrono::Duration::hours(3))
        .with_timezone(&tz)
        .naive_local();
    let warn = ctx.cfg.warn_before;
    let cards: Vec<Option<String>> = shop.customers.iter().map(|c| c.card.clone()).collect();
    let views = ctx
        .ledger
        .run(move |l| {
            Ok::<_, crate::ledger::LedgerError>(
                cards
                    .iter()
                    .map(|c| c.as_ref().and_then(|c| l.balance(c, now, warn).ok()))
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
    let mut planted = Planted::default();
    // scenes for the programs pick members further down the list (the 20th, 40th, 60th of the
    // default 200), so the demo's other scenes keep their own people; a smaller shop, alike
    let n = views.len();
    let at = |k: usize| k * n.min(200) / 200;

    // the friend code a member gives: as kopilka published it on their AmoCRM card (members
    // further down the list, so the demo's other scenes keep their own people)
    let linked: Vec<(usize, i64)> = views
        .iter()
        .enumerate()
        .skip(at(20))
        .filter_map(|(i, v)| {
            let contact = v.as_ref()?.customer.amocrm_id.as_ref()?.parse::<i64>().ok()?;
            Some((i, contact))
        })
        .take(2)
        .collect();
    if let [(a, contact_a), (b, contact_b)] = linked[..]
        && let Some(code) = amo.field_value(contact_a, "KOPILKA_FRIEND_CODE")
        && amo.set_contact_field(contact_b, "FRIEND_CODE_USED", &code)
    {
        planted.referral = Some((
            code,
            shop.customers[a].card.clone().unwrap_or_default(),
            shop.customers[b].card.clone().unwrap_or_default(),
            contact_b,
        ));
    }

    // a birth date typed into 1C for a member the ledger has none for, who then buys
    let today = now.with_timezone(&tz).date_naive();
    let born = chrono::NaiveDate::from_ymd_opt(
        1990,
        chrono::Datelike::month(&today),
        chrono::Datelike::day(&today),
    )
    .unwrap_or_else(|| today - chrono::Duration::days(365 * 36));
    let regular = shop.products.first().map(|p| p.id.clone()).unwrap_or_default();
    for (i, v) in views.iter().enumerate().skip(at(40)) {
        let Some(v) = v else { continue };
        if v.customer.birthday.is_none() && onec.set_birthday(i, born) {
            onec.add_sale_of(i, &[(regular.as_str(), 1, false)], morning);
            planted.birthday = Some((v.customer.card.clone().unwrap_or_default(), born));
            break;
        }
    }

    // a member with an open gift-tea voucher takes the tea free at the till
    for (i, v) in views.iter().enumerate().skip(at(60)) {
        let Some(v) = v else { continue };
        // the oldest open one: a free line without a typed code uses that (balance lists the
        // newest first)
        if let Some(code) = v
            .vouchers
            .iter()
            .rev()
            .find(|x| x.state == "issued" || x.state == "sent")
            .and_then(|x| x.code.clone())
        {
            onec.add_sale_of(i, &[("GIFT-TEA", 1, true)], morning);
            planted.voucher = Some((code, v.customer.card.clone().unwrap_or_default()));
            break;
        }
    }
    Ok(planted)
}

/// What the till step did: a line for the report, and what went wrong if anything.
struct TillOutcome {
    line: String,
    failure: Option<String>,
}

/// A till (or the shop's site) pays with points the way README's "Tills and the site: holds"
/// says: a hold for the basket, then its commit; meanwhile a second till asking for the whole
/// balance of the same card is refused, so the points cannot be spent twice. Over kopilka's
/// own HTTP API on loopback, with the `/v1` token.
/// The demo shop's Salesbot in the simulated AmoCRM.
const DEMO_BOT: i64 = 7_001;

async fn till_pays(ctx: &JobContext, shop: &crate::sim::sales::Shop) -> anyhow::Result<TillOutcome> {
    let app = crate::daemon::http::router(
        ctx.clone(),
        Arc::new(crate::daemon::runtime::Runtime::new(ctx.clock.now())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = ctx.cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    let now = ctx.clock.now();
    let mut card = None;
    for c in shop.customers.iter().filter_map(|c| c.card.clone()) {
        let probe = c.clone();
        if let Ok(v) = ctx.ledger.run(move |l| l.spendable(&probe, now)).await
            && v.free >= 200
        {
            card = Some((c, v.free));
            break;
        }
    }
    let Some((card, before)) = card else {
        return Ok(TillOutcome {
            line: "till: no customer has 200 points yet".into(),
            failure: Some("till: no customer with points to spend".into()),
        });
    };
    let http = reqwest::Client::new();
    let basket = serde_json::json!([
        {"product_id": "till-1", "quantity": "2", "net_kopecks": 600000, "unit_cost_kopecks": 100000},
        {"product_id": "till-2", "quantity": 1, "net_kopecks": 400000, "unit_cost_kopecks": 100000}
    ]);
    let post = |path: String, body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http
                .post(url)
                .bearer_auth("demo-till-token")
                .json(&body)
                .send()
                .await?;
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
            anyhow::Ok((status, v))
        }
    };
    let spend = 100;
    let (s1, hold) = post(
        "/v1/holds".into(),
        serde_json::json!({"customer": card, "lines": basket, "points_wanted": spend,
            "idempotency_key": "demo-till-1:receipt-1"}),
    )
    .await?;
    let (s2, other) = post(
        "/v1/holds".into(),
        serde_json::json!({"customer": card, "lines": basket, "points_wanted": before,
            "idempotency_key": "demo-till-2:receipt-1"}),
    )
    .await?;
    let id = hold["hold_id"].as_str().unwrap_or_default().to_string();
    let (s3, committed) = post(
        format!("/v1/holds/{id}/commit"),
        serde_json::json!({"lines": basket}),
    )
    .await?;
    let probe = card.clone();
    let after = ctx
        .ledger
        .run(move |l| l.spendable(&probe, now))
        .await
        .map_or(-1, |v| v.free);
    let ok = s1 == 200
        && s2 == 409
        && other["error"] == "insufficient_points"
        && s3 == 200
        && committed["state"] == "committed"
        && after == before - spend;
    let line = format!(
        "till: card {card} paid {spend} points (hold {id} → {}); a second till asking for all {before} meanwhile got {} {}; balance {before} → {after}",
        committed["commit"]["document"].as_str().unwrap_or("?"),
        s2,
        other["error"].as_str().unwrap_or("")
    );
    Ok(TillOutcome {
        failure: (!ok).then(|| format!("till: {line}")),
        line,
    })
}
