//! The members' self-service bot (issue 21, Telegram): what a member's message asks for and
//! the words of every answer. Pure, so the wording a member reads is table-tested; the ledger
//! finds the figures and keeps the links, the channel carries the text.
//!
//! The one secret here is the link code: whoever holds it sees that member's points, so it is
//! drawn from random bytes the caller gets from the operating system, used once, and a chat
//! that guesses is stopped after [`MAX_FAILED_CODES`] misses in [`FAILED_CODES_WINDOW`].

use chrono::{Duration, NaiveDate};

use super::words;

/// Symbols of a link code: no 0/O, 1/I/L, so a code read aloud at the till or copied from a
/// receipt cannot be mistyped into another one.
pub const CODE_ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
/// 31⁶ ≈ 887 million codes: with 5 guesses an hour a chat would need ten thousand years to
/// find one of a thousand live codes. Six, not seven, so a friend code is never taken for it.
pub const CODE_LEN: usize = 6;
pub const MAX_FAILED_CODES: usize = 5;
pub const FAILED_CODES_WINDOW: Duration = Duration::hours(1);
/// Movements `/history` lists: enough to find the last purchase, short enough for a phone.
pub const HISTORY_MOVEMENTS: usize = 5;

/// A link code from random bytes, or `None` when the bytes run out before six symbols
/// (rejection sampling keeps every symbol equally likely; 16 bytes almost always suffice).
pub fn link_code_from(random: &[u8]) -> Option<String> {
    // 248 = 8 × 31: bytes above it would favour the first symbols
    let code: String = random
        .iter()
        .filter(|b| **b < 248)
        .take(CODE_LEN)
        .map(|b| CODE_ALPHABET[(*b % 31) as usize] as char)
        .collect();
    (code.len() == CODE_LEN).then_some(code)
}

/// A link code as people type it (any case, spaces and dashes ignored), or `None` when the
/// text is no code.
pub fn normalize_code(text: &str) -> Option<String> {
    let code: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CODE_LEN && code.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(code)
}

/// What a member's message asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `/start` without a code: a greeting, or a comeback after `/stop`.
    Start,
    /// `/start CODE`, `/link CODE` or just the code: link this chat to the code's member.
    Link(String),
    /// `/link` with something that is no code.
    BadCode,
    Balance,
    History,
    Expiring,
    Friend,
    Stop,
    Help,
}

/// Reads a message: commands with or without the bot's name (`/balance@shop_bot`), in any
/// case, and the Russian words a member may type instead.
pub fn parse(text: &str) -> Command {
    let text = text.trim();
    let mut parts = text.split_whitespace();
    let first = parts.next().unwrap_or("");
    let rest: String = parts.collect::<Vec<_>>().join(" ");
    let Some(command) = first.strip_prefix('/') else {
        if let Some(code) = normalize_code(text) {
            return Command::Link(code);
        }
        return match text.to_lowercase().as_str() {
            "баланс" | "баллы" => Command::Balance,
            "история" => Command::History,
            "сгорание" | "сгорят" => Command::Expiring,
            "друг" | "код для друга" => Command::Friend,
            "стоп" | "отписаться" => Command::Stop,
            _ => Command::Help,
        };
    };
    let command = command.split('@').next().unwrap_or("").to_lowercase();
    match command.as_str() {
        "start" | "link" if !rest.is_empty() => match normalize_code(&rest) {
            Some(code) => Command::Link(code),
            // a deep link's payload that is no code is a plain start
            None if command == "start" => Command::Start,
            None => Command::BadCode,
        },
        "start" => Command::Start,
        "link" => Command::BadCode,
        "balance" => Command::Balance,
        "history" => Command::History,
        "expiring" => Command::Expiring,
        "friend" => Command::Friend,
        "stop" => Command::Stop,
        _ => Command::Help,
    }
}

const COMMANDS: &str = "/balance — баланс\n/history — последние операции\n/expiring — когда сгорят баллы\n\
/friend — код для друзей\n/stop — не присылать сообщения";

fn program(shop: &str) -> String {
    if shop.trim().is_empty() {
        "бонусной программы".into()
    } else {
        format!("бонусной программы {}", shop.trim())
    }
}

pub fn greeting(shop: &str) -> String {
    format!(
        "Здравствуйте! Это бот {}. Здесь можно узнать баланс баллов и получать сообщения о них.\n\n\
         Чтобы привязать чат к своей карте, пришлите код привязки — шесть букв и цифр. \
         Код назовёт продавец на кассе.",
        program(shop)
    )
}

pub fn help(linked: bool) -> String {
    if linked {
        format!("Что я умею:\n{COMMANDS}")
    } else {
        link_first()
    }
}

pub fn link_first() -> String {
    "Сначала привяжите чат к своей карте: пришлите код привязки — шесть букв и цифр. \
     Код назовёт продавец на кассе."
        .into()
}

pub fn already_linked() -> String {
    format!("Этот чат уже привязан к вашей карте.\n\n{COMMANDS}")
}

pub fn linked(available: i64) -> String {
    format!(
        "Готово: чат привязан к вашей карте. Доступно {}.\n\nСюда будут приходить сообщения о баллах.\n{COMMANDS}",
        words::points(available)
    )
}

/// A code that is not known, with the guesses left before the hour's pause.
pub fn code_unknown(left: usize) -> String {
    if left == 0 {
        return too_many_codes();
    }
    format!(
        "Такого кода нет. Проверьте код и пришлите его ещё раз (осталось {} {}).",
        left,
        words::plural(left as i64, "попытка", "попытки", "попыток")
    )
}

pub fn code_used() -> String {
    "Этот код уже использован. Попросите новый код на кассе.".into()
}

pub fn bad_code() -> String {
    "Код привязки — шесть букв и цифр, например: /link K7M2QX.".into()
}

pub fn too_many_codes() -> String {
    "Слишком много неверных кодов. Попробуйте снова через час.".into()
}

pub fn stopped() -> String {
    "Больше не пришлю сообщений о баллах. Баланс можно узнать командой /balance, \
     вернуть сообщения — командой /start."
        .into()
}

pub fn restarted() -> String {
    "Снова присылаю сообщения о баллах. Отказаться — командой /stop.".into()
}

/// A member's figures as `/balance` and `/expiring` tell them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub available: i64,
    /// Earned but inside the return window.
    pub pending: i64,
    /// Points that burn within `within_days`.
    pub expiring: i64,
    pub within_days: i64,
    /// The next day points burn (local date) and how many.
    pub next_burn: Option<(NaiveDate, i64)>,
}

pub fn balance(f: &Figures) -> String {
    let mut out = format!("Доступно: {}.", words::points(f.available));
    if f.pending > 0 {
        out.push_str(&format!(
            "\nОжидают начисления: {} (станут доступны после срока возврата покупки).",
            words::points(f.pending)
        ));
    }
    if let Some((day, n)) = f.next_burn.filter(|_| f.expiring > 0) {
        out.push_str(&format!(
            "\nСкоро сгорят: {} — {}.",
            words::points(n),
            words::date(day)
        ));
    }
    out
}

pub fn expiring(f: &Figures) -> String {
    match f.next_burn {
        None => "Сгорающих баллов нет.".into(),
        Some((day, n)) => {
            let mut out = format!("{} {} {}.", words::points(n), burn_verb(n), words::date(day));
            if f.expiring > n {
                out.push_str(&format!(
                    "\nВсего в ближайшие {} {}: {}.",
                    f.within_days,
                    words::plural(f.within_days, "день", "дня", "дней"),
                    words::points(f.expiring)
                ));
            }
            out.push_str(" Потратьте их до этого дня.");
            out
        }
    }
}

fn burn_verb(n: i64) -> &'static str {
    if words::plural(n, "1", "2", "5") == "1" {
        "сгорит"
    } else {
        "сгорят"
    }
}

/// One movement of points as `/history` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movement {
    pub day: NaiveDate,
    /// Signed: what the movement did to the member's points.
    pub points: i64,
    /// The journal's kind: accrual, redemption, reversal, expiry, adjustment, opening, bonus.
    pub kind: String,
    /// The receipt's number when the movement came from one.
    pub document: Option<String>,
}

pub fn history(moves: &[Movement]) -> String {
    if moves.is_empty() {
        return "Операций с баллами пока не было.".into();
    }
    let mut out = String::from("Последние операции:");
    for m in moves {
        let what = match m.kind.as_str() {
            "accrual" => "начисление",
            "redemption" => "оплата баллами",
            "reversal" => "отмена",
            "expiry" => "сгорание",
            "adjustment" => "корректировка",
            "opening" => "перенос остатка",
            "bonus" => "бонус",
            _ => "операция",
        };
        let sign = if m.points > 0 { "+" } else { "" };
        out.push_str(&format!(
            "\n{} {sign}{} — {what}{}",
            words::date(m.day),
            words::points(m.points),
            m.document
                .as_deref()
                .map(|d| format!(", чек №{d}"))
                .unwrap_or_default()
        ));
    }
    out
}

pub fn friend(code: Option<&str>) -> String {
    match code {
        Some(c) => format!(
            "Ваш код для друзей: {c}. Друг называет его при первой покупке — баллы по правилам программы получите оба."
        ),
        None => "Код для друзей пока не выдан.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Command) {
        assert_eq!(parse(text), expected, "{text:?}");
    }

    #[test]
    fn messages_read_as_members_write_them() {
        check("/start", Command::Start);
        check("/start k7m2qx", Command::Link("K7M2QX".into()));
        check("/start campaign_1", Command::Start);
        check("/link K7M-2QX", Command::Link("K7M2QX".into()));
        check("/link 0000", Command::BadCode);
        check("/link", Command::BadCode);
        check("  k7m 2qx ", Command::Link("K7M2QX".into()));
        check("/balance@shop_bonus_bot", Command::Balance);
        check("/BALANCE", Command::Balance);
        check("Баланс", Command::Balance);
        check("/history", Command::History);
        check("/expiring", Command::Expiring);
        check("/friend", Command::Friend);
        check("/stop", Command::Stop);
        check("привет", Command::Help);
        check("/unknown", Command::Help);
        // a friend code (seven symbols) or a code with a 0 is no link code
        check("K7M2QXA", Command::Help);
        check("K0M2QX", Command::Help);
    }

    #[test]
    fn codes_come_from_the_alphabet_evenly() {
        assert_eq!(
            link_code_from(&[0, 1, 30, 31, 247, 100]).as_deref(),
            Some("23Z2Z9")
        );
        // bytes at or above 248 are skipped, not folded onto the first symbols
        assert_eq!(
            link_code_from(&[248, 255, 0, 0, 0, 0, 0, 0]).as_deref(),
            Some("222222")
        );
        assert_eq!(link_code_from(&[255; 16]), None);
        assert_eq!(normalize_code("k7m-2qx").as_deref(), Some("K7M2QX"));
    }

    #[test]
    fn figures_read_as_russian() {
        let nb = |s: String| s.replace('\u{a0}', " ");
        let f = Figures {
            available: 1_480,
            pending: 21,
            expiring: 300,
            within_days: 14,
            next_burn: NaiveDate::from_ymd_opt(2026, 12, 24).map(|d| (d, 300)),
        };
        assert_eq!(
            nb(balance(&f)),
            "Доступно: 1 480 баллов.\nОжидают начисления: 21 балл (станут доступны после срока возврата покупки).\n\
             Скоро сгорят: 300 баллов — 24.12.2026."
        );
        assert_eq!(nb(balance(&Figures::default())), "Доступно: 0 баллов.");
        assert_eq!(
            nb(expiring(&Figures {
                expiring: 301,
                next_burn: NaiveDate::from_ymd_opt(2026, 12, 24).map(|d| (d, 1)),
                ..f.clone()
            })),
            "1 балл сгорит 24.12.2026.\nВсего в ближайшие 14 дней: 301 балл. Потратьте их до этого дня."
        );
        assert_eq!(expiring(&Figures::default()), "Сгорающих баллов нет.");
        let day = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap_or_default();
        assert_eq!(
            nb(history(&[
                Movement {
                    day,
                    points: 120,
                    kind: "accrual".into(),
                    document: Some("N-1".into())
                },
                Movement {
                    day,
                    points: -50,
                    kind: "redemption".into(),
                    document: None
                },
            ])),
            "Последние операции:\n05.12.2026 +120 баллов — начисление, чек №N-1\n05.12.2026 −50 баллов — оплата баллами"
        );
        assert_eq!(
            code_unknown(4),
            "Такого кода нет. Проверьте код и пришлите его ещё раз (осталось 4 попытки)."
        );
        assert_eq!(code_unknown(0), too_many_codes());
    }
}
