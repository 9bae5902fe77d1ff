//! AmoCRM's JSON shapes, read leniently: every field optional, unknown fields ignored,
//! `null` where a list was expected accepted. Only this folder uses them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `_links.next.href`, when there is a next page.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Links {
    #[serde(default)]
    pub next: Option<Href>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Href {
    #[serde(default)]
    pub href: Option<String>,
}

/// A list page: `{"_page":N, "_links":{…}, "_embedded":{"contacts":[…]}}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Page {
    #[serde(default, rename = "_links")]
    pub links: Option<Links>,
    #[serde(default, rename = "_embedded")]
    pub embedded: Option<HashMap<String, Value>>,
}

impl Page {
    /// The items under `_embedded.<key>` that parse as `T`; the others are skipped and
    /// counted, so one odd item never loses a page.
    pub fn items<T: for<'de> Deserialize<'de>>(&self, key: &str) -> (Vec<T>, usize) {
        let Some(Value::Array(list)) = self.embedded.as_ref().and_then(|e| e.get(key)) else {
            return (Vec::new(), 0);
        };
        let mut out = Vec::with_capacity(list.len());
        let mut bad = 0;
        for v in list {
            match T::deserialize(v) {
                Ok(t) => out.push(t),
                Err(_) => bad += 1,
            }
        }
        (out, bad)
    }

    pub fn next(&self) -> Option<&str> {
        self.links.as_ref()?.next.as_ref()?.href.as_deref()
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct FieldValueItem {
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enum_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enum_code: Option<String>,
    /// Reads may say `enum` where writes say `enum_code`.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub enum_name: Option<String>,
}

impl FieldValueItem {
    /// The value as text: strings as they are, numbers written out.
    pub fn text(&self) -> Option<String> {
        match self.value.as_ref()? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct FieldValues {
    #[serde(default)]
    pub field_id: Option<i64>,
    #[serde(default)]
    pub field_code: Option<String>,
    #[serde(default)]
    pub field_name: Option<String>,
    #[serde(default)]
    pub values: Option<Vec<FieldValueItem>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Tag {
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContactEmbedded {
    #[serde(default)]
    pub tags: Option<Vec<Tag>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Contact {
    pub id: i64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub custom_fields_values: Option<Vec<FieldValues>>,
    #[serde(default)]
    pub updated_at: Option<i64>,
    #[serde(default, rename = "_embedded")]
    pub embedded: Option<ContactEmbedded>,
}

impl Contact {
    /// The text values of the field with this code (or id).
    pub fn values_of(&self, code: &str, id: Option<i64>) -> Vec<String> {
        self.custom_fields_values
            .iter()
            .flatten()
            .filter(|f| {
                f.field_code
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(code))
                    || (id.is_some() && f.field_id == id)
            })
            .flat_map(|f| f.values.iter().flatten().filter_map(FieldValueItem::text))
            .collect()
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CustomField {
    pub id: i64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub is_api_only: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LinkedContact {
    pub id: i64,
    #[serde(default)]
    pub is_main: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CatalogMetadata {
    #[serde(default)]
    pub quantity: Option<Value>,
    #[serde(default)]
    pub catalog_id: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CatalogElement {
    pub id: i64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub metadata: Option<CatalogMetadata>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LeadEmbedded {
    #[serde(default)]
    pub contacts: Option<Vec<LinkedContact>>,
    #[serde(default)]
    pub catalog_elements: Option<Vec<CatalogElement>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Lead {
    pub id: i64,
    #[serde(default)]
    pub name: Option<String>,
    /// Whole currency units.
    #[serde(default)]
    pub price: Option<i64>,
    #[serde(default)]
    pub status_id: Option<i64>,
    #[serde(default)]
    pub pipeline_id: Option<i64>,
    #[serde(default)]
    pub closed_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
    #[serde(default, rename = "_embedded")]
    pub embedded: Option<LeadEmbedded>,
}

impl Lead {
    /// The main contact, or the first one when none is marked main.
    pub fn main_contact(&self) -> Option<i64> {
        let list = self.embedded.as_ref()?.contacts.as_ref()?;
        list.iter()
            .find(|c| c.is_main == Some(true))
            .or_else(|| list.first())
            .map(|c| c.id)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Event {
    /// A string (ULID-like); numbers are accepted too.
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub entity_id: Option<i64>,
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub value_after: Option<Value>,
    #[serde(default)]
    pub value_before: Option<Value>,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "event id {other} is neither a string nor a number"
        ))),
    }
}

/// `application/problem+json`, with AmoCRM's validation errors.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Problem {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default, rename = "validation-errors")]
    pub validation_errors: Option<Vec<ValidationError>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ValidationError {
    #[serde(default, deserialize_with = "opt_string_or_number")]
    pub request_id: Option<String>,
    #[serde(default)]
    pub errors: Option<Vec<ValidationItem>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ValidationItem {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

fn opt_string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// The token endpoint's answer.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TokenReply {
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    pub expires_in: Option<i64>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
}
