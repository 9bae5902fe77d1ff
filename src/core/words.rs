//! Numbers, money and dates as a Russian customer reads them, for every text kopilka writes
//! to people (notes on AmoCRM cards today; members' messages, issue 21): `1 баллов` is a
//! mistake a shop is judged by.
//!
//! Thousands are grouped with a no-break space (U+00A0), as Russian typography does and so a
//! number never breaks across lines; decimals take a comma; dates are `ДД.ММ.ГГГГ`.

use chrono::NaiveDate;

/// The form of a noun after `n`: `one` for 1, 21, 101 (but not 11); `few` for 2–4, 22–24 (but
/// not 12–14); `many` otherwise — the three forms Russian has.
pub fn plural<'a>(n: i64, one: &'a str, few: &'a str, many: &'a str) -> &'a str {
    let n = n.unsigned_abs();
    match (n % 10, n % 100) {
        (1, r) if r != 11 => one,
        (2..=4, r) if !(12..=14).contains(&r) => few,
        _ => many,
    }
}

/// `1480` → `1 480` (with a no-break space), `-25000` → `−25 000`.
pub fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{a0}');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

/// `1480` → `1 480 баллов`, `21` → `21 балл`, `2` → `2 балла`.
pub fn points(n: i64) -> String {
    format!("{}\u{a0}{}", group(n), plural(n, "балл", "балла", "баллов"))
}

/// Kopecks as rubles: `120050` → `1 200,50 ₽`.
pub fn rubles(kopecks: i64) -> String {
    let sign = if kopecks < 0 { "−" } else { "" };
    let k = kopecks.unsigned_abs();
    format!(
        "{sign}{},{:02}\u{a0}₽",
        group(i64::try_from(k / 100).unwrap_or(i64::MAX)),
        k % 100
    )
}

/// `24.12.2026`.
pub fn date(d: NaiveDate) -> String {
    d.format("%d.%m.%Y").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_take_the_right_form() {
        for (n, text) in [
            (0, "0 баллов"),
            (1, "1 балл"),
            (2, "2 балла"),
            (4, "4 балла"),
            (5, "5 баллов"),
            (11, "11 баллов"),
            (12, "12 баллов"),
            (14, "14 баллов"),
            (21, "21 балл"),
            (22, "22 балла"),
            (101, "101 балл"),
            (111, "111 баллов"),
            (1_480, "1 480 баллов"),
            (1_000_001, "1 000 001 балл"),
            (-3, "−3 балла"),
        ] {
            assert_eq!(points(n).replace('\u{a0}', " "), text, "{n}");
        }
        assert!(points(1_480).contains('\u{a0}'), "no line break inside a number");
    }

    #[test]
    fn rubles_and_dates_as_a_customer_reads_them() {
        assert_eq!(rubles(120_050).replace('\u{a0}', " "), "1 200,50 ₽");
        assert_eq!(rubles(5).replace('\u{a0}', " "), "0,05 ₽");
        assert_eq!(rubles(-100_000).replace('\u{a0}', " "), "−1 000,00 ₽");
        assert_eq!(date(NaiveDate::from_ymd_opt(2026, 12, 24).unwrap()), "24.12.2026");
    }
}
