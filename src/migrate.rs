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
    Birthday,
    ReferralCode,
    InviteCode,
    ConsentService,
    ConsentAds,
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
        "birthday" | "birthdate" | "датарождения" | "деньрождения" => {
            Column::Birthday
        }
        "referralcode"
        | "referredby"
        | "friendcode"
        | "коддруга"
        | "кодприглашенияодруга"
        | "реферальныйкод" => Column::ReferralCode,
        "invitecode" | "invitation" | "кодприглашения" | "приглашение" => {
            Column::InviteCode
        }
        "consent" | "consentservice" | "согласие" | "согласиенарассылку" | "согласиенауведомления" => {
            Column::ConsentService
        }
        "consentads" | "consentadvertising" | "согласиенарекламу" | "реклама" => {
            Column::ConsentAds
        }
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
pub type CsvRow = RowOf<OpeningRow>;

/// A row read into `T`, or `(line, reason)` when it cannot be.
type RowOf<T> = Result<T, (usize, String)>;

/// Reads a CSV the way both files are read: the header row names the columns (checked by
/// `needs`), every other row becomes a `T` or `(line, reason)`. An `Err` means the file as a
/// whole is unusable.
fn read_csv<T>(
    bytes: &[u8],
    needs: impl Fn(&[Column]) -> Result<(), String>,
    parse: impl Fn(usize, &[Column], &csv::StringRecord) -> Result<T, (usize, String)>,
) -> Result<Vec<RowOf<T>>, String> {
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
    needs(&columns)?;
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
        out.push(parse(line, &columns, &record));
    }
    Ok(out)
}

/// Reads a balances CSV into opening rows. An `Err` means the file as a whole is unusable.
pub fn read_balances_csv(bytes: &[u8], tz: Tz) -> Result<Vec<CsvRow>, String> {
    read_csv(
        bytes,
        |columns| {
            if columns.contains(&Column::Points) {
                Ok(())
            } else {
                Err("the header names no points column (points, баллы or остаток)".into())
            }
        },
        |line, columns, record| row(line, columns, record, tz),
    )
}

/// The columns that say who the customer is, the same in every file: `Ok(true)` when `c` is
/// one of them and `v` went into `identity`.
fn key_column(c: Column, v: &str, identity: &mut CustomerIdentity) -> Result<bool, String> {
    match c {
        Column::Card => identity.card = normalize_card(v),
        Column::Phone => {
            identity.phone =
                Some(Phone::parse(v).ok_or_else(|| format!("phone {v:?} is not a phone number"))?)
        }
        Column::Email => {
            identity.email = Some(Email::parse(v).ok_or_else(|| format!("e-mail {v:?} is not an address"))?)
        }
        Column::OnecId => identity.onec_id = Some(v.to_string()),
        Column::Name => identity.name = Some(v.to_string()),
        _ => return Ok(false),
    }
    Ok(true)
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
        if key_column(*c, v, &mut identity).map_err(fail)? {
            continue;
        }
        match c {
            Column::Points => points = Some(parse_points(v).map_err(fail)?),
            Column::Expires => expires_at = Some(parse_expiry(v, tz).map_err(fail)?),
            Column::Tier => tier = Some(v.to_string()),
            _ => {}
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

/// A row of a customers file (`kopilka import-customers`): who, and what the shop knows of
/// them that no sale carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerRow {
    pub line: usize,
    /// Keys and name, birthday, friend code and invite code.
    pub identity: CustomerIdentity,
    /// Consent to service messages (points, expiry) and to advertising (38-ФЗ): `None` when
    /// the file says nothing.
    pub consent_service: Option<bool>,
    pub consent_ads: Option<bool>,
}

/// A row of a customers file, or `(line, reason)` when it cannot be read.
pub type CustomerCsvRow = RowOf<CustomerRow>;

pub use crate::core::identity::{parse_birthday, parse_consent};

/// Reads a customers CSV (header names in English or Russian, as [`read_balances_csv`]): card,
/// phone, email, name/фио, birthday/дата рождения (`ДД.ММ.ГГГГ` or ISO), referral_code/код
/// друга (the code the customer was referred with), invite_code/код приглашения, consent/
/// согласие (service messages) and consent_ads/согласие на рекламу. A row that cannot be read
/// is `(line, reason)`; the rest apply.
pub fn read_customers_csv(bytes: &[u8]) -> Result<Vec<CustomerCsvRow>, String> {
    read_csv(bytes, |_| Ok(()), customer_row)
}

fn customer_row(
    line: usize,
    columns: &[Column],
    record: &csv::StringRecord,
) -> Result<CustomerRow, (usize, String)> {
    let fail = |why: String| (line, why);
    let mut row = CustomerRow {
        line,
        identity: CustomerIdentity::default(),
        consent_service: None,
        consent_ads: None,
    };
    let id = &mut row.identity;
    for (c, value) in columns.iter().zip(record.iter()) {
        let v = value.trim();
        if v.is_empty() {
            continue;
        }
        if key_column(*c, v, id).map_err(fail)? {
            continue;
        }
        match c {
            Column::Birthday => id.birthday = Some(parse_birthday(v).map_err(fail)?),
            Column::ReferralCode => id.referred_by = Some(v.to_string()),
            Column::InviteCode => id.invite_code = Some(v.to_string()),
            Column::ConsentService => row.consent_service = Some(parse_consent(v).map_err(fail)?),
            Column::ConsentAds => row.consent_ads = Some(parse_consent(v).map_err(fail)?),
            _ => {}
        }
    }
    if row.identity.is_empty() {
        return Err(fail("no card, phone, e-mail or 1C id on the row".into()));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_customers_file_with_russian_headers() {
        let text = "Карта;Телефон;ФИО;Дата рождения;Код друга;Согласие на рекламу\n\
                    2000 0001;8 (912) 345-67-89;Иванова Анна;07.03.1990;K7M2QX4;да\n\
                    2000 0002;;;31.02.1991;;\n\
                    ;;Пётр;;;\n\
                    2000 0003;;;1985-12-01;;может быть\n";
        let rows = read_customers_csv(text.as_bytes()).unwrap();
        assert_eq!(rows.len(), 4);
        let r = rows[0].as_ref().unwrap();
        assert_eq!(r.identity.birthday, NaiveDate::from_ymd_opt(1990, 3, 7));
        assert_eq!(r.identity.referred_by.as_deref(), Some("K7M2QX4"));
        assert_eq!(r.identity.name.as_deref(), Some("Иванова Анна"));
        assert_eq!((r.consent_service, r.consent_ads), (None, Some(true)));
        let e = rows[1].as_ref().unwrap_err();
        assert_eq!(e.0, 3);
        assert!(e.1.contains("31.02.1991"), "{}", e.1);
        assert!(rows[2].as_ref().unwrap_err().1.contains("no card"));
        assert!(rows[3].as_ref().unwrap_err().1.contains("consent"));
    }

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
