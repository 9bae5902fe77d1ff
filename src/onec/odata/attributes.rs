//! Customer attributes in 1C's additional attributes (`ДополнительныеРеквизиты`, the БСП
//! «Свойства» subsystem) of the `[people]` catalogs: the values named in `[attributes.sources]`
//! of the mapping, read when a document's customer is read and applied with the precedence
//! of every filling source (`ledger::Precedence::FillsEmptyOrOwn`), and the property the
//! customer's tier is published to (`[attributes] tier`, the `onec:tier` outbox rows, written
//! by `write`).
//!
//! A shop creates a property in 1C's form and sees only its title, so the mapping names titles
//! and kopilka finds their keys in the chart of characteristic types
//! (`ChartOfCharacteristicTypes_ДополнительныеРеквизитыИСведения`: `Заголовок`, `Description`,
//! `Имя` in every dump — УТ 11, УНФ 3.0, Розница 2, `ChartsOfCharacteristicTypes/
//! ДополнительныеРеквизитыИСведения.xml`). Two properties may share a title (one per
//! catalog's set of properties); a row counts when its property is any of them.
//!
//! The row's `Значение` is of the characteristic's type, composite in OData: a string and its
//! `Значение_Type` (`Edm.String`, `Edm.Boolean`, `Edm.DateTime`, `Edm.Double`, or a reference
//! such as `StandardODATA.Catalog_ЗначенияСвойствОбъектов`, the shop's own list of values;
//! 1C:Enterprise 8.3 Developer Guide 17.4.3 «Data presentation»: a flexible type is two
//! `Edm.String` properties, the value and the type's name). A reference is read as its item's
//! `Description`, what a person picked. A value that cannot be read is refused for that
//! customer with the text and the reason, like AmoCRM's.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};
use serde_json::Value;

use super::json::{Obj, reference, text};
use super::{OdataClient, OdataError, by_key};
use crate::core::identity::{parse_birthday, parse_consent};
use crate::ledger::{Attributes, Unreadable};
use crate::onec::mapping::{self, AttributeKey, AttributesMap};

/// Properties read at most from the chart (a base has dozens, a large one hundreds).
const MAX_PROPERTIES: usize = 100_000;

/// One row of a person's additional attributes, as 1C holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The property's key.
    pub property: String,
    /// The value's text.
    pub value: String,
    /// The value's type (`Edm.String`, `StandardODATA.Catalog_…`); absent when the base
    /// publishes the value as a single type.
    pub ty: Option<String>,
}

/// The properties the mapping names, found in the chart.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Each source with the keys of the properties of its title.
    pub sources: Vec<(AttributeKey, Vec<String>)>,
    /// The tier property's keys.
    pub tier: Vec<String>,
    /// (mapping key, title) of each title the chart does not have.
    pub missing: Vec<(String, String)>,
}

/// The `$select` parts of a person's read that bring its attribute rows.
pub fn select(m: &AttributesMap) -> Vec<String> {
    vec![
        format!("{}/{}", m.section, m.property),
        format!("{}/{}", m.section, m.value),
        format!("{}/{}", m.section, m.value_type()),
    ]
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// A person's attribute rows with a value, as read.
pub fn rows_of(m: &AttributesMap, o: &Obj) -> Vec<Row> {
    let rows = o.get(&m.section).and_then(Value::as_array);
    let mut out = Vec::new();
    for row in rows.into_iter().flatten().filter_map(Value::as_object) {
        let Some(property) = reference(row, &m.property) else {
            continue;
        };
        let Some(value) = row.get(&m.value).and_then(value_text) else {
            continue;
        };
        let ty = text(row, &m.value_type())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        // 1C writes an unfilled value as an empty string, an empty reference or Undefined
        let undefined = ty.as_deref().is_some_and(|t| t.ends_with("Undefined"));
        if value.is_empty() || value == super::json::EMPTY_GUID || undefined {
            continue;
        }
        out.push(Row {
            property: property.to_lowercase(),
            value,
            ty,
        });
    }
    out
}

/// Whether a row's value is a reference to a catalog item (`StandardODATA.Catalog_X`), and
/// which catalog.
pub fn reference_set(row: &Row) -> Option<&str> {
    let t = row.ty.as_deref()?;
    let set = mapping::type_set(t);
    (!t.starts_with("Edm.") && set.contains('_')).then_some(set)
}

/// Finds the mapping's titles in the chart of properties.
pub async fn resolve(client: &OdataClient, m: &AttributesMap, page: usize) -> Result<Resolved, OdataError> {
    let mut select = vec!["Ref_Key".to_string(), "DeletionMark".to_string()];
    select.extend(m.title_fields.iter().cloned());
    let page = page.max(1);
    let mut all: Vec<Obj> = Vec::new();
    for n in 0..MAX_PROPERTIES.div_ceil(page) {
        let q = super::poll::page_query(&select.join(","), None, "Ref_Key", n * page, page);
        let items = client.list(&m.properties, &m.properties, &q).await?;
        let short = items.len() < page;
        all.extend(items);
        if short {
            break;
        }
    }
    Ok(match_titles(m, &all))
}

/// The keys of the properties whose title fields say `title`, by the first field that
/// names any (the form's title before the description before the programmatic name).
fn keys_of(m: &AttributesMap, all: &[Obj], title: &str) -> Vec<String> {
    let wanted = title.trim().to_lowercase();
    for field in &m.title_fields {
        let keys: Vec<String> = all
            .iter()
            .filter(|o| super::json::flag(o, "DeletionMark") != Some(true))
            .filter(|o| text(o, field).is_some_and(|t| t.trim().to_lowercase() == wanted))
            .filter_map(|o| reference(o, "Ref_Key").map(str::to_lowercase))
            .collect();
        if !keys.is_empty() {
            return keys;
        }
    }
    Vec::new()
}

/// [`resolve`] over the chart's rows.
pub fn match_titles(m: &AttributesMap, all: &[Obj]) -> Resolved {
    let mut r = Resolved::default();
    for (key, title) in &m.sources {
        let keys = keys_of(m, all, title);
        if keys.is_empty() {
            r.missing
                .push((format!("attributes.sources.{}", key.key()), title.clone()));
        } else {
            r.sources.push((*key, keys));
        }
    }
    if let Some(t) = &m.tier {
        r.tier = keys_of(m, all, t);
        if r.tier.is_empty() {
            r.missing.push(("attributes.tier".into(), t.clone()));
        }
    }
    r
}

fn unreadable(row: &Row, reason: String) -> Unreadable {
    Unreadable {
        text: row.value.clone(),
        reason,
    }
}

/// A birthday as a date property (`Edm.DateTime`, the empty date is no value) or a string one
/// holds it.
fn birthday(row: &Row) -> Result<NaiveDate, Unreadable> {
    let is_date = row
        .ty
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("Edm.DateTime"));
    let date = if is_date {
        NaiveDate::parse_from_str(row.value.get(..10).unwrap_or(&row.value), "%Y-%m-%d")
            .map_err(|_| unreadable(row, format!("birthday {} is not a date", row.value)))?
    } else {
        parse_birthday(&row.value).map_err(|e| unreadable(row, e))?
    };
    if date.year() < 1900 {
        return Err(unreadable(row, format!("birthday {date} is before 1900")));
    }
    Ok(date)
}

fn consent(row: &Row) -> Result<bool, Unreadable> {
    parse_consent(&row.value).map_err(|e| unreadable(row, e))
}

/// What a person's rows say through the named properties; `None` when none holds a value
/// (an emptied property says nothing: the ledger keeps what it has). `names` gives the text
/// of a reference value (`Catalog_ЗначенияСвойствОбъектов` item → its `Description`).
pub fn attributes_of(
    resolved: &Resolved,
    rows: &[Row],
    names: &HashMap<(String, String), String>,
) -> Option<Attributes> {
    let mut a = Attributes::default();
    let mut any = false;
    for (key, properties) in &resolved.sources {
        let Some(row) = rows.iter().find(|r| properties.contains(&r.property)) else {
            continue;
        };
        // a value picked from a list reads as the item's name
        let named;
        let row = match reference_set(row) {
            Some(set) => match names.get(&(set.to_string(), row.value.to_lowercase())) {
                Some(name) => {
                    named = Row {
                        value: name.clone(),
                        ty: Some("Edm.String".into()),
                        ..row.clone()
                    };
                    &named
                }
                None => row,
            },
            None => row,
        };
        any = true;
        match key {
            AttributeKey::Birthday => a.birthday = Some(birthday(row)),
            AttributeKey::ReferralCode => a.referral_code = Some(row.value.clone()),
            AttributeKey::InviteCode => a.invite_code = Some(row.value.clone()),
            AttributeKey::ConsentService => a.consent_service = Some(consent(row)),
            AttributeKey::ConsentAds => a.consent_ads = Some(consent(row)),
        }
    }
    any.then_some(a)
}

/// Reads the names of the reference values among `rows` of the named properties, one
/// request per item not read before.
pub async fn value_names(
    client: &OdataClient,
    resolved: &Resolved,
    rows: &[Row],
    names: &mut HashMap<(String, String), String>,
) -> Result<(), OdataError> {
    for row in rows {
        if !resolved
            .sources
            .iter()
            .any(|(_, keys)| keys.contains(&row.property))
        {
            continue;
        }
        let Some(set) = reference_set(row) else {
            continue;
        };
        let k = (set.to_string(), row.value.to_lowercase());
        if names.contains_key(&k) {
            continue;
        }
        let q = [("$select", "Ref_Key,Description".to_string())];
        let name = match client.object(set, &by_key(set, &row.value), &q).await {
            Ok(Some(o)) => text(&o, "Description").map(|s| s.trim().to_string()),
            Ok(None) => None,
            // an unpublished value list: the reference is refused as unreadable below
            Err(OdataError::Request { .. }) => None,
            Err(e) => return Err(e),
        };
        names.insert(k, name.unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> AttributesMap {
        let text = include_str!("../../../mappings/1c/ut11.toml").replace(
            "# referral_code   = \"Код друга\"",
            "referral_code = \"Код друга\"\nbirthday = \"День рождения\"\nconsent_ads = \"Рассылка\"",
        );
        mapping::parse(&text, "test")
            .expect("mapping")
            .attributes
            .expect("attributes")
    }

    fn row(p: &str, v: &str, t: &str) -> Row {
        Row {
            property: p.into(),
            value: v.into(),
            ty: Some(t.into()),
        }
    }

    #[test]
    fn titles_find_their_properties_and_rows_their_values() {
        let m = map();
        let chart: Vec<Obj> = [
            (r#"{"Ref_Key":"A","Заголовок":"Код друга","Description":"Код друга (Партнеры)","Имя":"КодДруга"}"#),
            (r#"{"Ref_Key":"B","Заголовок":"Код друга","Description":"Код друга (Номенклатура)","Имя":""}"#),
            (r#"{"Ref_Key":"C","Заголовок":"","Description":"День рождения","Имя":""}"#),
            (r#"{"Ref_Key":"D","Заголовок":"Рассылка","DeletionMark":true}"#),
        ]
        .iter()
        .map(|t| serde_json::from_str::<Value>(t).expect("json").as_object().cloned().expect("obj"))
        .collect();
        let r = match_titles(&m, &chart);
        assert_eq!(
            r.missing,
            vec![(
                "attributes.sources.consent_ads".to_string(),
                "Рассылка".to_string()
            )]
        );
        let rows = vec![
            row("b", "abcd", "Edm.String"),
            row("c", "1990-02-31", "Edm.String"),
        ];
        let a = attributes_of(&r, &rows, &HashMap::new()).expect("values");
        assert_eq!(a.referral_code.as_deref(), Some("abcd"));
        assert!(
            matches!(a.birthday, Some(Err(ref u)) if u.reason.contains("not a date")),
            "{a:?}"
        );
        let rows = vec![row("c", "1990-05-14T00:00:00", "Edm.DateTime")];
        let a = attributes_of(&r, &rows, &HashMap::new()).expect("values");
        assert_eq!(
            a.birthday,
            Some(Ok(NaiveDate::from_ymd_opt(1990, 5, 14).expect("date")))
        );
        assert!(attributes_of(&r, &[row("x", "1", "Edm.String")], &HashMap::new()).is_none());
    }

    #[test]
    fn empty_values_are_no_rows() {
        let m = map();
        let o: Obj = serde_json::from_str::<Value>(
            r#"{"ДополнительныеРеквизиты":[
                {"LineNumber":"1","Свойство_Key":"A","Значение":"","Значение_Type":"Edm.String"},
                {"LineNumber":"2","Свойство_Key":"B","Значение":"00000000-0000-0000-0000-000000000000","Значение_Type":"StandardODATA.Catalog_ЗначенияСвойствОбъектов"},
                {"LineNumber":"3","Свойство_Key":"C","Значение":true,"Значение_Type":"Edm.Boolean"}]}"#,
        )
        .expect("json")
        .as_object()
        .cloned()
        .expect("obj");
        assert_eq!(rows_of(&m, &o), vec![row("c", "true", "Edm.Boolean")]);
    }
}
