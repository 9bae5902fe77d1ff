//! `[notify.*]`: how kopilka reaches members (issue 21). Which event goes where and in which
//! words is the rules file's `[notifications]`; this is only the channels' wiring and secrets.

use std::path::PathBuf;

use serde::Deserialize;

use super::connectors::{Check, Secret};
use crate::core::notify::Channel;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawNotify {
    email: Option<RawEmail>,
    telegram: Option<RawTelegram>,
    salesbot: Option<RawSalesbot>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawEmail {
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    from: Option<String>,
    reply_to: Option<String>,
    unsubscribe_url: Option<String>,
    timeout_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawTelegram {
    token_file: Option<PathBuf>,
    api_url: Option<String>,
    bot_username: Option<String>,
    poll_timeout_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawSalesbot {
    bot_id: Option<i64>,
    batch: Option<usize>,
}

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refused if the server cannot.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on this machine.
    None,
}

#[derive(Clone, Debug)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub credentials: Option<(String, Secret)>,
    /// `Магазин «Чайный дом» <bonus@shop.example>`.
    pub from: String,
    pub reply_to: Option<String>,
    /// A public address that unsubscribes (`…?token=`); without it the messages offer a
    /// reply with «Отписаться» to `reply_to`/`from` (the `List-Unsubscribe` mailto).
    pub unsubscribe_url: Option<String>,
    pub timeout: std::time::Duration,
}

#[derive(Clone, Debug)]
pub struct TelegramConfig {
    pub token: Secret,
    pub api_url: String,
    /// `@shop_bonus_bot`, for the texts that tell members where to write.
    pub bot_username: Option<String>,
    pub poll_timeout: std::time::Duration,
}

#[derive(Clone, Debug)]
pub struct SalesbotConfig {
    pub bot_id: i64,
    /// Tasks per `salesbot/run` request (AmoCRM takes at most 100). The contact field the
    /// bot's text reads is the field map's `message` (`KOPILKA_MESSAGE` by default):
    /// kopilka writes the message there before it starts the bot.
    pub batch: usize,
}

#[derive(Clone, Debug, Default)]
pub struct NotifyConfig {
    pub email: Option<EmailConfig>,
    pub telegram: Option<TelegramConfig>,
    pub salesbot: Option<SalesbotConfig>,
}

impl NotifyConfig {
    pub fn channels(&self) -> Vec<Channel> {
        let mut out = Vec::new();
        if self.email.is_some() {
            out.push(Channel::Email);
        }
        if self.telegram.is_some() {
            out.push(Channel::Telegram);
        }
        if self.salesbot.is_some() {
            out.push(Channel::Salesbot);
        }
        out
    }
}

fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn notify(raw: &RawNotify, c: &mut Check<'_>, has_amocrm: bool) -> NotifyConfig {
    let email = raw.email.as_ref().map(|e| {
        let host = e.host.clone().unwrap_or_else(|| {
            c.bad("notify.email.host", "the SMTP server's host name is required");
            String::new()
        });
        let tls = match e.tls.as_deref().unwrap_or("starttls") {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            "none" => SmtpTls::None,
            other => {
                c.bad("notify.email.tls", format!("{other:?} is not starttls, tls or none"));
                SmtpTls::StartTls
            }
        };
        if tls == SmtpTls::None && !host.is_empty() && !loopback(&host) {
            c.bad(
                "notify.email.tls",
                format!("\"none\" sends members' addresses and the password in clear to {host}; it is only for a relay on this machine (127.0.0.1)"),
            );
        }
        let credentials = e.username.clone().map(|u| {
            let secret = c.secret(
                "notify.email.password_file",
                e.password_file.as_deref(),
                "KOPILKA_SMTP_PASSWORD",
                true,
            );
            (u, secret)
        });
        let from = e.from.clone().unwrap_or_else(|| {
            c.bad("notify.email.from", "the sender address is required (\"Магазин <bonus@shop.example>\")");
            String::new()
        });
        if !from.is_empty() && from.parse::<lettre::message::Mailbox>().is_err() {
            c.bad("notify.email.from", format!("{from:?} is not an e-mail address"));
        }
        let unsubscribe_url = e.unsubscribe_url.as_ref().map(|u| c.url("notify.email.unsubscribe_url", Some(u)));
        EmailConfig {
            port: e.port.unwrap_or(match tls {
                SmtpTls::StartTls => 587,
                SmtpTls::Tls => 465,
                SmtpTls::None => 25,
            }),
            host,
            tls,
            credentials,
            from,
            reply_to: e.reply_to.clone(),
            unsubscribe_url,
            timeout: std::time::Duration::from_secs(e.timeout_seconds.unwrap_or(30).clamp(1, 600)),
        }
    });
    let telegram = raw.telegram.as_ref().map(|t| TelegramConfig {
        token: c.secret(
            "notify.telegram.token_file",
            t.token_file.as_deref(),
            "KOPILKA_TELEGRAM_TOKEN",
            true,
        ),
        api_url: c.url(
            "notify.telegram.api_url",
            Some(
                &t.api_url
                    .clone()
                    .unwrap_or_else(|| "https://api.telegram.org".into()),
            ),
        ),
        bot_username: t.bot_username.clone(),
        poll_timeout: std::time::Duration::from_secs(t.poll_timeout_seconds.unwrap_or(30).clamp(1, 50)),
    });
    let salesbot = raw.salesbot.as_ref().map(|s| {
        if !has_amocrm {
            c.bad(
                "notify.salesbot",
                "a Salesbot runs in AmoCRM: configure [amocrm] first",
            );
        }
        let bot_id = s.bot_id.unwrap_or_else(|| {
            c.bad(
                "notify.salesbot.bot_id",
                "the id of the bot to start is required (AmoCRM → Salesbot)",
            );
            0
        });
        let batch = s.batch.unwrap_or(50);
        if !(1..=100).contains(&batch) {
            c.bad(
                "notify.salesbot.batch",
                format!("{batch} is outside 1..=100 (AmoCRM's limit per request)"),
            );
        }
        SalesbotConfig {
            bot_id,
            batch: batch.clamp(1, 100),
        }
    });
    NotifyConfig {
        email,
        telegram,
        salesbot,
    }
}
