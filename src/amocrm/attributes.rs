//! Customer attributes read from contact cards (issue 20): the fields named in `[sources]`
//! of `mappings/amocrm.toml`, applied to the linked customer with AmoCRM's precedence
//! (`ledger::Precedence::FillsEmptyOrOwn`: the customers file wins, AmoCRM fills what is
//! empty and follows its own later edits).
//!
//! Values are read as the account holds them (`../shared/specs/amocrm.md`, "Custom fields":
//! `date` is Unix seconds; the official PHP library reads `birthday` like `date` and a
//! checkbox as a boolean). A date's seconds are the account's midnight, so they are read in
//! `[general] timezone`: 1990-05-14 00:00 in Moscow is 13 May 21:00 UTC, and a birthday read
//! in UTC would be a day early. A text field is read as people type dates (`ДД.ММ.ГГГГ`,
//! ISO). A value that cannot be read is refused for that customer, with the text and why.

use chrono::{DateTime, Datelike, NaiveDate};
use chrono_tz::Tz;
use serde_json::Value;

use super::AmoError;
use super::connector::Connector;
use super::fields::{SourceField, SourceValue};
use super::wire::Contact;
use crate::core::identity::{parse_birthday, parse_consent};
use crate::ledger::{Attributes, AttributesReport, Precedence, Unreadable};

/// The source name attribute changes carry in `history`.
pub const SOURCE: &str = "amocrm";

/// The raw values of one field on a contact.
fn values(contact: &Contact, id: i64) -> Vec<&Value> {
    contact
        .custom_fields_values
        .iter()
        .flatten()
        .filter(|f| f.field_id == Some(id))
        .flat_map(|f| f.values.iter().flatten().filter_map(|v| v.value.as_ref()))
        .filter(|v| !v.is_null() && v.as_str().is_none_or(|s| !s.trim().is_empty()))
        .collect()
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    }
}

fn unreadable(v: &Value, reason: String) -> Unreadable {
    Unreadable {
        text: text_of(v),
        reason,
    }
}

/// A birthday as a `birthday`/`date` field (Unix seconds, as a number or digits) or a text
/// field holds it.
pub fn birthday(v: &Value, tz: Tz) -> Result<NaiveDate, Unreadable> {
    let seconds = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s)
            if s.trim()
                .trim_start_matches('-')
                .chars()
                .all(|c| c.is_ascii_digit()) =>
        {
            s.trim().parse().ok()
        }
        _ => None,
    };
    let date = match (seconds, v) {
        (Some(s), _) => DateTime::from_timestamp(s, 0)
            .map(|t| t.with_timezone(&tz).date_naive())
            .ok_or_else(|| unreadable(v, format!("birthday {} is not a date", text_of(v))))?,
        (None, Value::String(s)) => match DateTime::parse_from_rfc3339(s.trim()) {
            Ok(t) => t.date_naive(),
            Err(_) => parse_birthday(s).map_err(|e| unreadable(v, e))?,
        },
        _ => return Err(unreadable(v, format!("birthday {v} is not a date"))),
    };
    if date.year() < 1900 {
        return Err(unreadable(v, format!("birthday {date} is before 1900")));
    }
    Ok(date)
}

/// A consent as a checkbox (`true`/`false`) or a text field («да»/«нет», 1/0) holds it.
pub fn consent(v: &Value) -> Result<bool, Unreadable> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
        Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
        Value::String(s) => parse_consent(s).map_err(|e| unreadable(v, e)),
        other => Err(unreadable(
            other,
            format!("consent {other} is neither yes nor no"),
        )),
    }
}

/// What a contact's source fields say of its customer; `None` when none holds a value (an
/// empty field says nothing: clearing it in AmoCRM leaves the ledger's value as it is).
pub fn attributes_of(contact: &Contact, sources: &[SourceField], tz: Tz) -> Option<Attributes> {
    let mut a = Attributes::default();
    let mut any = false;
    for f in sources {
        let Some(v) = values(contact, f.id).into_iter().next() else {
            continue;
        };
        any = true;
        match f.value {
            SourceValue::Birthday => a.birthday = Some(birthday(v, tz)),
            SourceValue::ReferralCode => a.referral_code = Some(text_of(v)),
            SourceValue::InviteCode => a.invite_code = Some(text_of(v)),
            SourceValue::ConsentService => a.consent_service = Some(consent(v)),
            SourceValue::ConsentAds => a.consent_ads = Some(consent(v)),
        }
    }
    any.then_some(a)
}

/// Applies what these contacts' source fields say to the customers they are linked to, in
/// one ledger transaction; contacts linked to no customer are skipped.
pub async fn apply(conn: &Connector, contacts: Vec<(i64, Attributes)>) -> Result<AttributesReport, AmoError> {
    if contacts.is_empty() {
        return Ok(AttributesReport::default());
    }
    let cfg = conn.cfg.clone();
    let now = conn.client.now();
    let report = conn
        .ledger()
        .run(move |l| {
            let mut items = Vec::with_capacity(contacts.len());
            for (contact, a) in contacts {
                if let Some(customer) = l.amocrm_customer_of(contact)? {
                    items.push((customer, a));
                }
            }
            l.apply_attributes(SOURCE, Precedence::FillsEmptyOrOwn, items, &cfg.program, now)
        })
        .await?;
    if report.changed > 0 || !report.refused.is_empty() || report.kept > 0 {
        tracing::info!(
            changed = report.changed,
            refused = report.refused.len(),
            kept = report.kept,
            "Customer attributes read from AmoCRM contacts."
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value, expected: Result<&str, &str>) {
        let got = birthday(&v, chrono_tz::Europe::Moscow);
        match (got, expected) {
            (Ok(d), Ok(e)) => assert_eq!(d.to_string(), e, "{v}"),
            (Err(u), Err(e)) => assert!(u.reason.contains(e), "{v}: {}", u.reason),
            (got, e) => panic!("{v}: got {got:?}, expected {e:?}"),
        }
    }

    #[test]
    fn birthdays_read_as_the_account_holds_them() {
        // 1990-05-14 00:00 Moscow (+04:00 in 1990 summer) = 1990-05-13 20:00 UTC
        check(json!(642628800), Ok("1990-05-14"));
        check(json!("642628800"), Ok("1990-05-14"));
        check(json!("14.05.1990"), Ok("1990-05-14"));
        check(json!("1990-05-14"), Ok("1990-05-14"));
        check(json!("1990-05-14T00:00:00+04:00"), Ok("1990-05-14"));
        check(json!("31.02.1990"), Err("is not a date"));
        check(json!("скоро"), Err("is not a date"));
        check(json!(true), Err("is not a date"));
        check(json!(-2_300_000_000i64), Err("before 1900"));
    }

    #[test]
    fn consents_read_from_checkboxes_and_words() {
        assert_eq!(consent(&json!(true)), Ok(true));
        assert_eq!(consent(&json!(0)), Ok(false));
        assert_eq!(consent(&json!("Да")), Ok(true));
        assert!(consent(&json!("может быть")).is_err());
    }
}
