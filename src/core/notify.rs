//! Members' messages (issue 21): which ledger event becomes which message on which channel,
//! in which words, and whether it may go out now. Pure: the ledger gathers the events and the
//! recipient's facts, the channels deliver; everything a person would argue about — consent,
//! the quiet window, the caps, the wording — is decided here and table-tested.
//!
//! Law behind the defaults: advertising needs the member's prior consent (38-ФЗ «О рекламе»,
//! ст. 18); any message to a member is processing of personal data (152-ФЗ), so service
//! messages need consent too — except on a channel the member opened themselves (linking the
//! Telegram bot is asking for it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::words;

/// What happened to a member that they may want to hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Points earned on a purchase.
    Accrual,
    /// Points granted without a purchase by a rule other than birthday (referral, first purchase…).
    Bonus,
    /// Points paid with at the till.
    Redemption,
    /// Points taken back because goods came back.
    Return,
    /// Points that burn soon.
    Expiry,
    TierUp,
    TierDown,
    Birthday,
    /// The member joined the program.
    Welcome,
    /// A free-item voucher was issued.
    Voucher,
    /// Points earned earlier passed the return window and can be spent now.
    Available,
    /// A purchase brought the member close to the next tier (advertising: it invites to buy).
    NearTier,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Accrual,
        EventKind::Bonus,
        EventKind::Redemption,
        EventKind::Return,
        EventKind::Expiry,
        EventKind::TierUp,
        EventKind::TierDown,
        EventKind::Birthday,
        EventKind::Welcome,
        EventKind::Voucher,
        EventKind::Available,
        EventKind::NearTier,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accrual => "accrual",
            EventKind::Bonus => "bonus",
            EventKind::Redemption => "redemption",
            EventKind::Return => "return",
            EventKind::Expiry => "expiry",
            EventKind::TierUp => "tier_up",
            EventKind::TierDown => "tier_down",
            EventKind::Birthday => "birthday",
            EventKind::Welcome => "welcome",
            EventKind::Voucher => "voucher",
            EventKind::Available => "available",
            EventKind::NearTier => "near_tier",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A channel a member can be reached on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Telegram,
    /// An AmoCRM Salesbot, writing through the messengers the shop connected in AmoCRM.
    Salesbot,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Telegram, Channel::Salesbot];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Telegram => "telegram",
            Channel::Salesbot => "salesbot",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The outbox destination of this channel's messages.
    pub fn destination(self) -> &'static str {
        match self {
            Channel::Email => "notify:email",
            Channel::Telegram => "notify:telegram",
            Channel::Salesbot => "notify:salesbot",
        }
    }

    pub fn from_destination(d: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.destination() == d)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as the ledger found it, with every fact a template may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: Option<EventKind>,
    pub customer_id: i64,
    /// Unique per event and stable (`journal:123`, `tier:7`, `expiry:42:1765000000`): the
    /// message's idempotency key is built from it.
    pub key: String,
    pub at: DateTime<Utc>,
    pub points: i64,
    /// Points the member can spend after the event.
    pub balance: i64,
    /// The day the event points at: when points burn, when a voucher ends.
    pub date: Option<NaiveDate>,
    /// The tier's name after a tier change.
    pub tier: Option<String>,
    /// A voucher's code, or the friend code in a welcome.
    pub code: Option<String>,
    /// What the voucher gives (the product's name).
    pub item: Option<String>,
    /// Kopecks: the spend still missing to the next tier.
    pub amount: Option<i64>,
    /// The document number the event came from, as the member sees it on the receipt.
    pub document: Option<String>,
    pub name: Option<String>,
    pub friend_code: Option<String>,
}

/// A message ready for a channel: the outbox row's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub customer_id: i64,
    pub channel: Channel,
    pub kind: EventKind,
    pub advertising: bool,
    /// When the event happened (a message that waited too long for an address is dropped).
    pub at: i64,
    pub subject: String,
    pub text: String,
}

/// A template: a subject (e-mail only) and a text with `{placeholders}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub subject: String,
    pub text: String,
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "points",
    "balance",
    "date",
    "tier",
    "code",
    "item",
    "document",
    "name",
    "friend_code",
    "shop",
    "amount",
];

/// The built-in Russian wording of each event.
pub fn default_template(kind: EventKind) -> Template {
    let (subject, text) = match kind {
        EventKind::Accrual => (
            "Начислены баллы",
            "{name}, за покупку {document} начислено {points}, их можно потратить с {date}. Сейчас на счёте {balance}.",
        ),
        EventKind::Bonus => (
            "Бонусные баллы",
            "{name}, вам начислено {points}. На счёте {balance}.",
        ),
        EventKind::Redemption => (
            "Списаны баллы",
            "{name}, {points} списано в оплату покупки {document}. На счёте {balance}.",
        ),
        EventKind::Return => (
            "Возврат покупки",
            "{name}, по возврату {document} списано {points}, начисленных за покупку. На счёте {balance}.",
        ),
        EventKind::Expiry => (
            "Баллы скоро сгорят",
            "{name}, {points} сгорят {date}. Потратьте их до этого дня — на счёте {balance}.",
        ),
        EventKind::TierUp => (
            "Новый уровень",
            "{name}, поздравляем: ваш уровень теперь «{tier}».",
        ),
        EventKind::TierDown => ("Уровень изменился", "{name}, ваш уровень теперь «{tier}»."),
        EventKind::Birthday => (
            "С днём рождения!",
            "{name}, с днём рождения! Дарим {points}. На счёте {balance}.",
        ),
        EventKind::Welcome => (
            "Добро пожаловать в программу",
            "{name}, добро пожаловать в программу {shop}! Ваш код для друзей: {friend_code}.",
        ),
        EventKind::Voucher => (
            "Подарок за покупки",
            "{name}, вам подарок: {item}. Код {code}, действует до {date}.",
        ),
        EventKind::Available => (
            "Баллы можно тратить",
            "{name}, {points} за покупки теперь можно тратить. На счёте {balance}.",
        ),
        EventKind::NearTier => (
            "Почти новый уровень",
            "{name}, до уровня «{tier}» осталось купить на {amount}.",
        ),
    };
    Template {
        subject: subject.into(),
        text: text.into(),
    }
}

/// Placeholders in `text` that are not in [`PLACEHOLDERS`] (a typo in a rules file).
pub fn unknown_placeholders(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push(after.chars().take(20).collect());
            break;
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            out.push(name.to_string());
        }
        rest = &after[close + 1..];
    }
    out
}

/// Writes an event in a template's words: points, roubles and dates the way a Russian reader
/// expects them (`1 480 баллов`, `24.12.2026`). A missing fact reads as a neutral word, never as
/// an empty gap: a member without a name on file is greeted «Здравствуйте».
pub fn render(t: &Template, e: &Event, shop: &str) -> (String, String) {
    let fill = |text: &str| -> String {
        let mut out = text.to_string();
        let name = e
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(first_name)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "Здравствуйте".to_string());
        for (k, v) in [
            ("points", words::points(e.points)),
            ("balance", words::points(e.balance)),
            ("date", e.date.map(words::date).unwrap_or_else(|| "скоро".into())),
            ("tier", e.tier.clone().unwrap_or_else(|| "базовый".into())),
            ("code", e.code.clone().unwrap_or_default()),
            ("item", e.item.clone().unwrap_or_else(|| "подарок".into())),
            (
                "document",
                e.document.as_deref().map(|d| format!("№{d}")).unwrap_or_default(),
            ),
            ("name", name),
            ("friend_code", e.friend_code.clone().unwrap_or_default()),
            ("shop", shop.to_string()),
            ("amount", words::rubles(e.amount.unwrap_or(0))),
        ] {
            out = out.replace(&format!("{{{k}}}"), &v);
        }
        // a fact that was empty leaves no double space or space before punctuation
        while out.contains("  ") {
            out = out.replace("  ", " ");
        }
        out.replace(" .", ".").replace(" ,", ",").trim().to_string()
    };
    (fill(&t.subject), fill(&t.text))
}

/// How to greet a member by the name on file: «Иванова Мария Петровна» (ФИО, as 1C keeps
/// it: surname, given name, patronymic) → «Мария»; any other shape is used whole («Анна
/// Иванова», «Мария»), and a name with digits in it («Покупатель 180», a placeholder a till
/// typed) is not a name: the greeting falls back to «Здравствуйте».
fn first_name(full: &str) -> String {
    let parts: Vec<&str> = full.split_whitespace().collect();
    if parts.iter().any(|p| p.chars().any(|c| c.is_ascii_digit())) {
        return String::new();
    }
    const PATRONYMIC: &[&str] = &["вич", "вна", "чна", "ична", "оглы", "кызы", "улы", "кизи"];
    match parts.as_slice() {
        [_, given, third] if PATRONYMIC.iter().any(|e| third.to_lowercase().ends_with(e)) => {
            (*given).to_string()
        }
        _ => parts.join(" "),
    }
}

/// The notification policy of the rules file (`[notifications]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Event → the channels it goes to.
    pub routes: BTreeMap<EventKind, Vec<Channel>>,
    pub templates: BTreeMap<EventKind, Template>,
    /// Events whose messages are advertising in the sense of 38-ФЗ (they invite to buy rather
    /// than report what happened to the member's account) and need consent to advertising.
    /// None is by default: every built-in text reports a fact about the member's points; a
    /// shop that writes an offer into a template marks the event here.
    pub advertising: BTreeSet<EventKind>,
    /// The quiet window in local time: a message due in it waits for its end.
    pub quiet: Option<(NaiveTime, NaiveTime)>,
    /// At most this many messages per member per rolling day and week (all channels).
    pub per_day: u32,
    pub per_week: u32,
    /// An event older than this when found is history, not news: no message (a backfill of
    /// five years of receipts must not greet anyone).
    pub max_age: Duration,
    /// How long a message waits for an address (an e-mail, a Telegram link, an AmoCRM
    /// contact) before it is dropped as undeliverable.
    pub wait_for_address: Duration,
    /// Accruals smaller than this are not worth a message.
    pub accrual_min_points: i64,
    /// "Close to the next tier": the spend missing is at most this share (percent) of the
    /// tier's threshold.
    pub near_tier_percent: i64,
    /// The shop's name in messages.
    pub shop: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            routes: BTreeMap::new(),
            templates: BTreeMap::new(),
            advertising: BTreeSet::new(),
            quiet: Some((
                NaiveTime::from_hms_opt(21, 0, 0).unwrap_or_default(),
                NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default(),
            )),
            per_day: 2,
            per_week: 6,
            max_age: Duration::days(3),
            wait_for_address: Duration::days(7),
            accrual_min_points: 1,
            near_tier_percent: 20,
            shop: "лояльности".into(),
        }
    }
}

impl Policy {
    pub fn template(&self, kind: EventKind) -> Template {
        self.templates
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| default_template(kind))
    }

    /// The messages an event makes on the channels that are configured, or none when the
    /// event is history or too small to mention.
    pub fn messages(&self, e: &Event, enabled: &[Channel], now: DateTime<Utc>) -> Vec<Message> {
        let Some(kind) = e.kind else {
            return Vec::new();
        };
        if now - e.at > self.max_age {
            return Vec::new();
        }
        if kind == EventKind::Accrual && e.points < self.accrual_min_points {
            return Vec::new();
        }
        let Some(channels) = self.routes.get(&kind) else {
            return Vec::new();
        };
        let (subject, text) = render(&self.template(kind), e, &self.shop);
        channels
            .iter()
            .filter(|c| enabled.contains(c))
            .map(|c| Message {
                customer_id: e.customer_id,
                channel: *c,
                kind,
                // an invitation to spend more is advertising whatever the template says
                advertising: kind == EventKind::NearTier || self.advertising.contains(&kind),
                at: e.at.timestamp(),
                subject: subject.clone(),
                text: text.clone(),
            })
            .collect()
    }
}

/// What the ledger needs to turn events into messages: the policy, the channels this
/// installation has set up, the shop's time zone and the tiers in rank order (to tell a
/// tier-up from a tier-down).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub policy: Policy,
    pub channels: Vec<Channel>,
    pub timezone: Tz,
    /// (id, name), lowest first.
    pub tiers: Vec<(String, String)>,
    /// Each tier's spend threshold (kopecks), in the order of `tiers`, and the window the
    /// spend is counted over: what "close to the next tier" is measured against.
    pub tier_spend: Vec<i64>,
    pub tier_window: Duration,
}

impl Plan {
    /// Whether `to` ranks above `from` (no tier ranks lowest).
    pub fn is_up(&self, from: Option<&str>, to: Option<&str>) -> bool {
        let rank = |t: Option<&str>| {
            t.and_then(|t| self.tiers.iter().position(|(id, _)| id == t).map(|i| i + 1))
                .unwrap_or(0)
        };
        rank(to) > rank(from)
    }

    /// The next tier above `current` for a spend, and what is missing to it, when the
    /// missing part is at most `near_tier_percent` of its threshold.
    pub fn near_tier(&self, current: Option<&str>, spend: i64, percent: i64) -> Option<(String, i64)> {
        let rank = current.and_then(|t| self.tiers.iter().position(|(id, _)| id == t));
        let start = rank.map_or(0, |r| r + 1);
        // the first tier above the current one that the spend has not reached yet
        let (i, threshold) = (start..self.tiers.len())
            .filter_map(|i| self.tier_spend.get(i).map(|t| (i, *t)))
            .find(|(_, t)| *t > spend)?;
        let missing = threshold - spend;
        (missing * 100 <= threshold * percent).then(|| (self.tiers[i].1.clone(), missing))
    }

    pub fn tier_name(&self, id: &str) -> String {
        self.tiers
            .iter()
            .find(|(t, _)| t == id)
            .map_or_else(|| id.to_string(), |(_, n)| n.clone())
    }
}

/// What the recipient's record says, at send time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recipient {
    pub consent_service: Option<bool>,
    pub consent_ads: Option<bool>,
    /// The member opened this channel themselves (linked the Telegram bot).
    pub opted_in_channel: bool,
    /// When they unsubscribed on this channel, if they did.
    pub unsubscribed_at: Option<DateTime<Utc>>,
    /// The channel's address is known (an e-mail, a linked chat, an AmoCRM contact).
    pub has_address: bool,
    /// Send times of this member's messages (all channels) in the last 7 days.
    pub sent: Vec<DateTime<Utc>>,
}

/// Why a message is not sent now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// Wait until the time, for the reason; the message is still due.
    Hold {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Never send it, for the reason.
    Refuse {
        reason: String,
    },
}

/// How often a message waiting for an address looks again.
pub const ADDRESS_RECHECK: Duration = Duration::minutes(15);

/// Whether a message may go out at `now`, in the order a person would check: the member's
/// wishes first (unsubscribed, consent), then whether they can be reached, then manners (the
/// quiet window, the caps).
pub fn decide(p: &Policy, m: &Message, r: &Recipient, now: DateTime<Utc>, tz: Tz) -> Decision {
    if let Some(at) = r.unsubscribed_at {
        return Decision::Refuse {
            reason: format!(
                "unsubscribed from {} on {}",
                m.channel,
                at.with_timezone(&tz).format("%d.%m.%Y")
            ),
        };
    }
    if m.advertising && r.consent_ads != Some(true) {
        return Decision::Refuse {
            reason: "no consent to advertising (38-ФЗ)".into(),
        };
    }
    // on Telegram the link is the consent: a member who has not linked yet may still do so,
    // so the message waits for the link (below) instead of being refused for want of consent
    let consent_to_come = m.channel == Channel::Telegram && !r.has_address;
    if !m.advertising && r.consent_service != Some(true) && !r.opted_in_channel && !consent_to_come {
        return Decision::Refuse {
            reason: match r.consent_service {
                Some(false) => "the member refused service messages".into(),
                _ => "no consent to service messages on file".into(),
            },
        };
    }
    if !r.has_address {
        let at = DateTime::from_timestamp(m.at, 0).unwrap_or(now);
        if now - at > p.wait_for_address {
            return Decision::Refuse {
                reason: format!(
                    "no {} address within {} days",
                    m.channel,
                    p.wait_for_address.num_days()
                ),
            };
        }
        return Decision::Hold {
            until: now + ADDRESS_RECHECK,
            reason: match m.channel {
                Channel::Email => "waiting for an e-mail address".into(),
                Channel::Telegram => "waiting for the member to link the Telegram bot".into(),
                Channel::Salesbot => "waiting for the AmoCRM contact".into(),
            },
        };
    }
    if let Some(end) = quiet_until(p, now, tz) {
        return Decision::Hold {
            until: end,
            reason: "quiet hours".into(),
        };
    }
    for (limit, window, name) in [
        (p.per_day, Duration::days(1), "day"),
        (p.per_week, Duration::days(7), "week"),
    ] {
        let mut inside: Vec<DateTime<Utc>> = r.sent.iter().copied().filter(|s| now - *s < window).collect();
        if limit > 0 && inside.len() >= limit as usize {
            inside.sort();
            // the window frees when enough old sends leave it for one more
            let free_at = inside[inside.len() - limit as usize] + window;
            return Decision::Hold {
                until: free_at.max(now + Duration::seconds(1)),
                reason: format!("cap of {limit} messages a {name}"),
            };
        }
    }
    Decision::Send
}

/// The end of the quiet window `now` falls in, if it does.
pub fn quiet_until(p: &Policy, now: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    let (start, end) = p.quiet?;
    if start == end {
        return None;
    }
    let local = now.with_timezone(&tz);
    let t = local.time();
    let inside = if start < end {
        t >= start && t < end
    } else {
        t >= start || t < end
    };
    if !inside {
        return None;
    }
    let mut day = local.date_naive();
    if t >= end {
        day = day.succ_opt()?;
    }
    let at = day.and_time(end);
    // a quiet end on a day the clocks skip falls to the first valid local time after it
    let resolved = tz
        .from_local_datetime(&at)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(at + Duration::hours(1))).earliest())?;
    Some(resolved.with_timezone(&Utc))
}

/// The member's own unsubscribe token for a channel: a keyed hash (HKDF-SHA256 of the
/// installation's secret) of who and where, so a link unsubscribes that member only and
/// cannot be guessed for another.
pub fn unsubscribe_token(secret: &[u8], customer_id: i64, channel: Channel) -> String {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"kopilka unsubscribe"), secret);
    let mut out = [0u8; 12];
    let info = format!("{customer_id}:{}", channel.as_str());
    // 12 bytes is far below HKDF's limit of 255 × 32: expand cannot fail
    let _ = hk.expand(info.as_bytes(), &mut out);
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `token` is the member's token, compared in constant time.
pub fn unsubscribe_token_matches(secret: &[u8], customer_id: i64, channel: Channel, token: &str) -> bool {
    let expected = unsubscribe_token(secret, customer_id, channel);
    expected.len() == token.len()
        && expected
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn msg(advertising: bool) -> Message {
        Message {
            customer_id: 1,
            channel: Channel::Email,
            kind: EventKind::Accrual,
            advertising,
            at: utc("2026-12-06T10:00:00Z").timestamp(),
            subject: String::new(),
            text: String::new(),
        }
    }

    fn ok() -> Recipient {
        Recipient {
            consent_service: Some(true),
            consent_ads: Some(true),
            has_address: true,
            ..Recipient::default()
        }
    }

    const MSK: Tz = chrono_tz::Europe::Moscow;

    #[test]
    fn a_member_hears_only_what_they_agreed_to() {
        let p = Policy::default();
        let noon = utc("2026-12-06T09:00:00Z"); // 12:00 in Moscow
        assert_eq!(decide(&p, &msg(false), &ok(), noon, MSK), Decision::Send);
        let no_service = Recipient {
            consent_service: None,
            ..ok()
        };
        assert!(matches!(
            decide(&p, &msg(false), &no_service, noon, MSK),
            Decision::Refuse { reason } if reason.contains("no consent to service")
        ));
        let telegram_linked = Recipient {
            opted_in_channel: true,
            ..no_service
        };
        assert_eq!(
            decide(&p, &msg(false), &telegram_linked, noon, MSK),
            Decision::Send
        );
        let no_ads = Recipient {
            consent_ads: Some(false),
            ..ok()
        };
        assert!(matches!(
            decide(&p, &msg(true), &no_ads, noon, MSK),
            Decision::Refuse { reason } if reason.contains("38-ФЗ")
        ));
        let gone = Recipient {
            unsubscribed_at: Some(noon),
            ..ok()
        };
        assert!(matches!(
            decide(&p, &msg(false), &gone, noon, MSK),
            Decision::Refuse { reason } if reason.contains("unsubscribed from email")
        ));
    }

    #[test]
    fn telegram_without_consent_waits_for_the_link_that_gives_it() {
        let p = Policy::default();
        let noon = utc("2026-12-06T09:00:00Z");
        let m = Message {
            channel: Channel::Telegram,
            ..msg(false)
        };
        let unlinked = Recipient {
            consent_service: None,
            has_address: false,
            ..Recipient::default()
        };
        assert!(matches!(
            decide(&p, &m, &unlinked, noon, MSK),
            Decision::Hold { reason, .. } if reason == "waiting for the member to link the Telegram bot"
        ));
        // e-mail has no such path: no consent is a refusal
        assert!(matches!(
            decide(&p, &msg(false), &unlinked, noon, MSK),
            Decision::Refuse { reason } if reason.contains("no consent")
        ));
        // advertising still needs its own consent
        let ad = Message {
            channel: Channel::Telegram,
            ..msg(true)
        };
        assert!(matches!(
            decide(&p, &ad, &unlinked, noon, MSK),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn quiet_hours_hold_until_nine_local() {
        let p = Policy::default();
        // 22:30 Moscow → 09:00 Moscow next day = 06:00 UTC
        let late = utc("2026-12-06T19:30:00Z");
        assert_eq!(
            decide(&p, &msg(false), &ok(), late, MSK),
            Decision::Hold {
                until: utc("2026-12-07T06:00:00Z"),
                reason: "quiet hours".into()
            }
        );
        // 03:00 Moscow → 09:00 the same day
        let night = utc("2026-12-07T00:00:00Z");
        assert!(matches!(decide(&p, &msg(false), &ok(), night, MSK),
            Decision::Hold { until, .. } if until == utc("2026-12-07T06:00:00Z")));
        // 09:00 exactly is outside the window
        assert_eq!(
            decide(&p, &msg(false), &ok(), utc("2026-12-07T06:00:00Z"), MSK),
            Decision::Send
        );
        let never_quiet = Policy { quiet: None, ..p };
        assert_eq!(
            decide(&never_quiet, &msg(false), &ok(), late, MSK),
            Decision::Send
        );
    }

    #[test]
    fn caps_hold_until_the_window_frees() {
        let p = Policy::default(); // 2 a day, 6 a week
        let now = utc("2026-12-06T10:00:00Z");
        let r = Recipient {
            sent: vec![utc("2026-12-06T08:00:00Z"), utc("2026-12-05T12:00:00Z")],
            ..ok()
        };
        assert_eq!(
            decide(&p, &msg(false), &r, now, MSK),
            Decision::Hold {
                until: utc("2026-12-06T12:00:00Z"),
                reason: "cap of 2 messages a day".into()
            }
        );
        let week: Vec<_> = (1..=6)
            .map(|d| now - Duration::days(d) + Duration::minutes(1))
            .collect();
        let r = Recipient { sent: week, ..ok() };
        assert!(matches!(decide(&p, &msg(false), &r, now, MSK),
            Decision::Hold { reason, .. } if reason == "cap of 6 messages a week"));
    }

    #[test]
    fn no_address_waits_then_gives_up() {
        let p = Policy::default();
        let m = msg(false);
        let r = Recipient {
            has_address: false,
            ..ok()
        };
        let soon = utc("2026-12-06T11:00:00Z");
        assert!(
            matches!(decide(&p, &m, &r, soon, MSK), Decision::Hold { until, .. } if until == soon + ADDRESS_RECHECK)
        );
        let later = utc("2026-12-20T11:00:00Z");
        assert!(
            matches!(decide(&p, &m, &r, later, MSK), Decision::Refuse { reason } if reason.contains("within 7 days"))
        );
    }

    #[test]
    fn templates_read_as_russian_and_typos_are_caught() {
        let e = Event {
            kind: Some(EventKind::Expiry),
            points: 480,
            balance: 1_480,
            date: NaiveDate::from_ymd_opt(2026, 12, 24),
            name: Some("Иванова Мария Петровна".into()),
            ..Event::default()
        };
        let (subject, text) = render(&default_template(EventKind::Expiry), &e, "Чайный дом");
        assert_eq!(subject, "Баллы скоро сгорят");
        assert_eq!(
            text.replace('\u{a0}', " "),
            "Мария, 480 баллов сгорят 24.12.2026. Потратьте их до этого дня — на счёте 1 480 баллов."
        );
        let anon = Event {
            kind: Some(EventKind::Accrual),
            points: 21,
            balance: 2,
            date: NaiveDate::from_ymd_opt(2026, 12, 20),
            ..Event::default()
        };
        let (_, text) = render(&default_template(EventKind::Accrual), &anon, "");
        assert_eq!(
            text.replace('\u{a0}', " "),
            "Здравствуйте, за покупку начислено 21 балл, их можно потратить с 20.12.2026. Сейчас на счёте 2 балла."
        );
        assert_eq!(unknown_placeholders("{points} до {dat}"), vec!["dat".to_string()]);
        for (name, greeting) in [
            ("Иванова Мария Петровна", "Мария"),
            ("Мамедов Эльдар Рауф оглы", "Мамедов Эльдар Рауф оглы"),
            ("Анна Иванова", "Анна Иванова"),
            ("Покупатель 180", "Здравствуйте"),
            ("  ", "Здравствуйте"),
        ] {
            let e = Event {
                kind: Some(EventKind::TierUp),
                name: Some(name.into()),
                ..Event::default()
            };
            let (_, text) = render(&default_template(EventKind::TierUp), &e, "");
            assert!(text.starts_with(&format!("{greeting}, ")), "{name}: {text}");
        }
        for k in EventKind::ALL {
            assert!(
                unknown_placeholders(&default_template(k).text).is_empty(),
                "{k:?}"
            );
        }
    }

    #[test]
    fn near_the_next_tier_is_within_a_share_of_its_threshold() {
        let plan = Plan {
            policy: Policy::default(),
            channels: Vec::new(),
            timezone: MSK,
            tiers: vec![
                ("base".into(), "Базовый".into()),
                ("silver".into(), "Серебряный".into()),
                ("gold".into(), "Золотой".into()),
            ],
            tier_spend: vec![0, 3_000_000, 10_000_000],
            tier_window: Duration::days(365),
        };
        assert_eq!(
            plan.near_tier(None, 2_500_000, 20),
            Some(("Серебряный".into(), 500_000))
        );
        assert_eq!(
            plan.near_tier(Some("base"), 2_500_000, 20),
            Some(("Серебряный".into(), 500_000))
        );
        assert_eq!(
            plan.near_tier(None, 2_000_000, 20),
            None,
            "10 000 ₽ short is not near"
        );
        assert_eq!(
            plan.near_tier(Some("silver"), 8_500_000, 20),
            Some(("Золотой".into(), 1_500_000))
        );
        assert_eq!(
            plan.near_tier(Some("gold"), 9_999_999, 20),
            None,
            "no tier above gold"
        );
        assert!(plan.is_up(Some("base"), Some("gold")) && !plan.is_up(Some("gold"), Some("silver")));
    }

    #[test]
    fn unsubscribe_tokens_are_per_member_and_channel() {
        let t = unsubscribe_token(b"secret", 7, Channel::Email);
        assert_eq!(t.len(), 24);
        assert!(unsubscribe_token_matches(b"secret", 7, Channel::Email, &t));
        assert!(!unsubscribe_token_matches(b"secret", 8, Channel::Email, &t));
        assert!(!unsubscribe_token_matches(b"secret", 7, Channel::Telegram, &t));
        assert!(!unsubscribe_token_matches(b"other", 7, Channel::Email, &t));
    }

    #[test]
    fn history_and_small_accruals_make_no_message() {
        let mut p = Policy::default();
        p.routes
            .insert(EventKind::Accrual, vec![Channel::Email, Channel::Telegram]);
        p.accrual_min_points = 10;
        let now = utc("2026-12-06T10:00:00Z");
        let e = Event {
            kind: Some(EventKind::Accrual),
            points: 50,
            at: now - Duration::hours(1),
            ..Event::default()
        };
        assert_eq!(
            p.messages(&e, &[Channel::Email], now).len(),
            1,
            "only configured channels"
        );
        assert_eq!(p.messages(&e, &Channel::ALL, now).len(), 2);
        let old = Event {
            at: now - Duration::days(30),
            ..e.clone()
        };
        assert!(p.messages(&old, &Channel::ALL, now).is_empty());
        let small = Event { points: 5, ..e };
        assert!(p.messages(&small, &Channel::ALL, now).is_empty());
    }
}
