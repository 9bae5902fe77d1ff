//! Migrating a shop's existing points: a spreadsheet of balances (CSV, as Excel or 1C save
//! it) → opening rows for the ledger.
//!
//! The file needs a header row. Columns are found by name, in English or Russian, in any
//! order: card (`карта`), phone (`телефон`), email (`почта`), onec_id (`контрагент`), points
//! (`баллы`, `остаток`), expires (`сгорают`, `дата сгорания`), tier (`уровень`). The
//! delimiter (`,` `;` or tab) is taken from the header; the encoding is UTF-8 (with or
//! without BOM) or windows-1251. A row that cannot be read is reported with its line
//! number and the reason; the rest apply.

use chrono::{NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::core::identity::{CustomerIdentity, Email, Phone, normalize_card};
use crate::ledger::OpeningRow;

/// Rows of one file, at most.
const MAX_ROWS: usize = 5_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Card,
    Phone,
    Email,
    OnecId,
    Points,
    Expires,
    Tier,
    Name,
    Ignored,
}

fn column(name: &str) -> Column {
    let n = name
        .trim()
        .trim_matches('"')
        .to_lowercase()
        .replace(['_', '-', ' '], "");
    match n.as_str() {
        "card" | "cardnumber" | "карта" | "номеркарты" | "дисконтнаякарта" => {
            Column::Card
        }
        "phone" | "телефон" | "тел" | "mobile" => Column::Phone,
        "email" | "mail" | "почта" | "электроннаяпочта" => Column::Email,
        "onecid" | "1cid" | "контрагент" | "идконтрагента" | "counterparty" => {
            Column::OnecId
        }
        "points" | "balance" | "баллы" | "остаток" | "бонусы" | "бонусныебаллы" => {
            Column::Points
        }
        "expires" | "expiresat" | "expiry" | "сгорают" | "датасгорания" => Column::Expires,
        "tier" | "level" | "уровень" => Column::Tier,
        "name" | "фио" | "имя" | "покупатель" => Column::Name,
        _ => Column::Ignored,
    }
}

/// Decodes the file: UTF-8 when it is valid UTF-8 (a BOM is dropped), windows-1251 otherwise.
pub fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => encoding_rs::WINDOWS_1251
            .decode_without_bom_handling(bytes)
            .0
            .into_owned(),
    }
}

fn parse_points(text: &str) -> Result<i64, String> {
    let d = crate::core::money::parse_decimal(text).map_err(|e| format!("points: {e}"))?;
    if !d.fract().is_zero() {
        return Err(format!("points {text:?} is not a whole number"));
    }
    rust_decimal::prelude::ToPrimitive::to_i64(&d).ok_or_else(|| format!("points {text:?} out of range"))
}

fn parse_expiry(text: &str, tz: Tz) -> Result<chrono::DateTime<Utc>, String> {
    let t = text.trim();
    let date = NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(t, "%d.%m.%Y"))
        .map_err(|_| format!("expiry {t:?} is not a date (YYYY-MM-DD or DD.MM.YYYY)"))?;
    // the points are usable through that date: they burn at the next local midnight
    let next = date
        .succ_opt()
        .ok_or_else(|| format!("expiry {t:?} is out of range"))?;
    tz.from_local_datetime(&next.and_hms_opt(0, 0, 0).unwrap_or_default())
        .earliest()
        .map(|d| d.with_timezone(&Utc))
        .ok_or_else(|| format!("expiry {t:?} has no midnight in {tz}"))
}

/// A row of the file: an opening balance, or `(line, reason)` when it cannot be read.
pub type CsvRow = Result<OpeningRow, (usize, String)>;

/// Reads a balances CSV into opening rows. An `Err` means the file as a whole is unusable.
pub fn read_balances_csv(bytes: &[u8], tz: Tz) -> Result<Vec<CsvRow>, String> {
    let text = decode(bytes);
    let header = text
        .lines()
        .next()
        .ok_or("the file is empty: a header row is expected")?;
    let delimiter = [b';', b',', b'\t']
        .into_iter()
        .max_by_key(|d| header.bytes().filter(|b| b == d).count())
        .unwrap_or(b',');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let columns: Vec<Column> = reader
        .headers()
        .map_err(|e| format!("header row: {e}"))?
        .iter()
        .map(column)
        .collect();
    if !columns.contains(&Column::Points) {
        return Err("the header names no points column (points, баллы or остаток)".into());
    }
    if !columns
        .iter()
        .any(|c| matches!(c, Column::Card | Column::Phone | Column::Email | Column::OnecId))
    {
        return Err("the header names no customer column (card, phone, email or onec_id)".into());
    }
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        if out.len() >= MAX_ROWS {
            return Err(format!("more than {MAX_ROWS} rows"));
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                out.push(Err((line, format!("unreadable row: {e}"))));
                continue;
            }
        };
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        out.push(row(line, &columns, &record, tz));
    }
    Ok(out)
}

fn row(
    line: usize,
    columns: &[Column],
    record: &csv::StringRecord,
    tz: Tz,
) -> Result<OpeningRow, (usize, String)> {
    let mut identity = CustomerIdentity::default();
    let mut points = None;
    let mut expires_at = None;
    let mut tier = None;
    let fail = |why: String| (line, why);
    for (c, value) in columns.iter().zip(record.iter()) {
        let v = value.trim();
        if v.is_empty() {
            continue;
        }
        match c {
            Column::Card => identity.card = normalize_card(v),
            Column::Phone => {
                identity.phone =
                    Some(Phone::parse(v).ok_or_else(|| fail(format!("phone {v:?} is not a phone number")))?)
            }
            Column::Email => {
                identity.email =
                    Some(Email::parse(v).ok_or_else(|| fail(format!("e-mail {v:?} is not an address")))?)
            }
            Column::OnecId => identity.onec_id = Some(v.to_string()),
            Column::Points => points = Some(parse_points(v).map_err(fail)?),
            Column::Expires => expires_at = Some(parse_expiry(v, tz).map_err(fail)?),
            Column::Tier => tier = Some(v.to_string()),
            Column::Name => identity.name = Some(v.to_string()),
            Column::Ignored => {}
        }
    }
    let points = points.ok_or_else(|| fail("no points on the row".into()))?;
    if identity.is_empty() {
        return Err(fail("no card, phone, e-mail or 1C id on the row".into()));
    }
    Ok(OpeningRow {
        line,
        identity,
        points,
        expires_at,
        tier,
        lots: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_russian_headers_semicolons_and_windows_1251() {
        let text = "Карта;Телефон;Баллы;Дата сгорания\n2000 0001;8 (912) 345-67-89;1 500;31.12.2026\n;;12;\n;89123;abc;\n";
        let (bytes, _, _) = encoding_rs::WINDOWS_1251.encode(text);
        let rows = read_balances_csv(&bytes, chrono_tz::Europe::Moscow).unwrap();
        assert_eq!(rows.len(), 3);
        let r = rows[0].as_ref().unwrap();
        assert_eq!((r.line, r.points), (2, 1500));
        assert_eq!(r.identity.card.as_deref(), Some("20000001"));
        assert_eq!(
            r.identity.phone.as_ref().map(|p| p.as_str()),
            Some("+79123456789")
        );
        assert_eq!(r.expires_at.unwrap().to_rfc3339(), "2026-12-31T21:00:00+00:00");
        assert_eq!(rows[1].as_ref().unwrap_err().0, 3);
        assert!(rows[1].as_ref().unwrap_err().1.contains("no card"));
        assert!(rows[2].as_ref().unwrap_err().1.contains("phone"));
    }

    #[test]
    fn refuses_a_file_without_the_needed_columns() {
        assert!(
            read_balances_csv(b"name,comment\nx,y\n", chrono_tz::UTC)
                .unwrap_err()
                .contains("points")
        );
        assert!(
            read_balances_csv(b"points\n5\n", chrono_tz::UTC)
                .unwrap_err()
                .contains("customer")
        );
    }
}
