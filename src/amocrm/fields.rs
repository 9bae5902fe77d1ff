//! The contact-card fields kopilka fills, where they live in the account, and creating the
//! missing ones (`kopilka amocrm fields --create`).
//!
//! Each value has a stable default code (`KOPILKA_POINTS`, …) so integrators can build on
//! them; `mappings/amocrm.toml` may point a value at an existing field by id or code, or
//! switch it off with `false`.

use std::path::Path;

use serde_json::{Value, json};

use super::AmoError;
use super::client::{Client, Send};
use super::wire::CustomField;

/// A value kopilka writes on a contact card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CardValue {
    Points,
    Pending,
    Tier,
    Discount,
    BurnPoints,
    BurnDate,
    Ltv,
    LastPurchase,
    Card,
    Offer,
    /// The member's friend code (issue 20): a manager reads it out, a friend gives it.
    ReferralCode,
    /// The member's open gift vouchers (code, item, last day), which a manager reads out and
    /// the till accepts; cleared as they are used or expire.
    Vouchers,
    /// The text of the member's latest message, which the shop's Salesbot sends
    /// (`{{contact.cf.…}}` in the bot); written only when `[notify.salesbot]` is set.
    Message,
}

impl CardValue {
    pub const ALL: [CardValue; 13] = [
        CardValue::Points,
        CardValue::Pending,
        CardValue::Tier,
        CardValue::Discount,
        CardValue::BurnPoints,
        CardValue::BurnDate,
        CardValue::Ltv,
        CardValue::LastPurchase,
        CardValue::Card,
        CardValue::Offer,
        CardValue::ReferralCode,
        CardValue::Vouchers,
        CardValue::Message,
    ];

    /// The key in `mappings/amocrm.toml`.
    pub fn key(self) -> &'static str {
        match self {
            CardValue::Points => "points",
            CardValue::Pending => "pending",
            CardValue::Tier => "tier",
            CardValue::Discount => "discount",
            CardValue::BurnPoints => "burn_points",
            CardValue::BurnDate => "burn_date",
            CardValue::Ltv => "ltv",
            CardValue::LastPurchase => "last_purchase",
            CardValue::Card => "card",
            CardValue::Offer => "offer",
            CardValue::ReferralCode => "referral_code",
            CardValue::Vouchers => "vouchers",
            CardValue::Message => "message",
        }
    }

    pub fn default_code(self) -> &'static str {
        match self {
            CardValue::Points => "KOPILKA_POINTS",
            CardValue::Pending => "KOPILKA_PENDING",
            CardValue::Tier => "KOPILKA_TIER",
            CardValue::Discount => "KOPILKA_DISCOUNT",
            CardValue::BurnPoints => "KOPILKA_BURN_POINTS",
            CardValue::BurnDate => "KOPILKA_BURN_DATE",
            CardValue::Ltv => "KOPILKA_LTV",
            CardValue::LastPurchase => "KOPILKA_LAST_PURCHASE",
            CardValue::Card => "KOPILKA_CARD",
            CardValue::Offer => "KOPILKA_OFFER",
            CardValue::ReferralCode => "KOPILKA_FRIEND_CODE",
            CardValue::Vouchers => "KOPILKA_VOUCHERS",
            CardValue::Message => "KOPILKA_MESSAGE",
        }
    }

    /// The name managers see on the card.
    pub fn name_ru(self) -> &'static str {
        match self {
            CardValue::Points => "Бонусные баллы",
            CardValue::Pending => "Баллы в ожидании",
            CardValue::Tier => "Уровень",
            CardValue::Discount => "Скидка уровня, %",
            CardValue::BurnPoints => "Баллы сгорают скоро",
            CardValue::BurnDate => "Дата сгорания баллов",
            CardValue::Ltv => "LTV, руб.",
            CardValue::LastPurchase => "Последняя покупка",
            CardValue::Card => "Карта лояльности",
            CardValue::Offer => "Следующее предложение",
            CardValue::ReferralCode => "Код для друга",
            CardValue::Vouchers => "Подарки по купонам",
            CardValue::Message => "Сообщение для клиента",
        }
    }

    /// The AmoCRM field type.
    pub fn field_type(self) -> &'static str {
        match self {
            CardValue::Points
            | CardValue::Pending
            | CardValue::Discount
            | CardValue::BurnPoints
            | CardValue::Ltv => "numeric",
            CardValue::BurnDate | CardValue::LastPurchase => "date",
            CardValue::Tier | CardValue::Card | CardValue::Offer | CardValue::ReferralCode => "text",
            CardValue::Vouchers | CardValue::Message => "textarea",
        }
    }

    /// Read-only for people: figures the ledger owns. The card number stays editable, so
    /// a manager can type it and link the contact.
    pub fn api_only(self) -> bool {
        !matches!(self, CardValue::Card)
    }
}

/// A customer attribute kopilka reads from a contact card (`[sources]` in the field map)
/// and never writes: the shop's managers type it, kopilka follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceValue {
    Birthday,
    /// The friend code the customer came with (another member's code, or their card).
    ReferralCode,
    InviteCode,
    ConsentService,
    ConsentAds,
}

impl SourceValue {
    pub const ALL: [SourceValue; 5] = [
        SourceValue::Birthday,
        SourceValue::ReferralCode,
        SourceValue::InviteCode,
        SourceValue::ConsentService,
        SourceValue::ConsentAds,
    ];

    /// The key in `[sources]`.
    pub fn key(self) -> &'static str {
        match self {
            SourceValue::Birthday => "birthday",
            SourceValue::ReferralCode => "referral_code",
            SourceValue::InviteCode => "invite_code",
            SourceValue::ConsentService => "consent_service",
            SourceValue::ConsentAds => "consent_ads",
        }
    }

    /// The field types whose values kopilka can read for this attribute: a birthday from
    /// AmoCRM's `birthday` or `date` field (Unix seconds) or from text a manager typed;
    /// consents from a checkbox, or text such as «да»/«нет».
    pub fn readable_types(self) -> &'static [&'static str] {
        match self {
            SourceValue::Birthday => &["birthday", "date", "date_time", "text"],
            SourceValue::ReferralCode | SourceValue::InviteCode => &["text", "textarea", "numeric"],
            SourceValue::ConsentService | SourceValue::ConsentAds => &["checkbox", "text"],
        }
    }
}

/// The contact fields kopilka reads (`[sources]`). None is read unless named: a guessed
/// code could set a thousand birthdays from a field that means something else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources(pub Vec<(SourceValue, Target)>);

/// A source field found in the account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceField {
    pub value: SourceValue,
    pub id: i64,
    /// The field's AmoCRM type (`birthday`, `date`, `text`, `checkbox`…).
    pub kind: Option<String>,
}

/// Where a value is written: a field id, or a field code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Id(i64),
    Code(String),
}

/// The field map: each value's target, or `None` when switched off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMap(pub Vec<(CardValue, Option<Target>)>);

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap(
            CardValue::ALL
                .iter()
                .map(|v| (*v, Some(Target::Code(v.default_code().to_string()))))
                .collect(),
        )
    }
}

impl FieldMap {
    /// Reads `[fields]` from a mapping file; absent keys keep their default code. Every
    /// problem is reported at once.
    pub fn load(path: Option<&Path>) -> Result<FieldMap, String> {
        load_mapping(path).map(|(map, _)| map)
    }

    pub fn parse(text: &str) -> Result<FieldMap, String> {
        parse_mapping(text).map(|(map, _)| map)
    }
}

/// Reads the whole field map file: what kopilka writes (`[fields]`) and what it reads
/// (`[sources]`). Every problem is reported at once, each with the file and its key.
pub fn load_mapping(path: Option<&Path>) -> Result<(FieldMap, Sources), String> {
    let Some(path) = path else {
        return Ok((FieldMap::default(), Sources::default()));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the amocrm field map {}: {e}", path.display()))?;
    parse_mapping(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A field id, a field code, or `None` for `false`; `Err` says what the value should be.
fn target_of(v: &toml::Value) -> Result<Option<Target>, String> {
    match v {
        toml::Value::Integer(i) if *i > 0 => Ok(Some(Target::Id(*i))),
        toml::Value::String(s) if !s.trim().is_empty() => Ok(Some(Target::Code(s.trim().to_string()))),
        toml::Value::Boolean(false) => Ok(None),
        other => Err(format!(
            "{other} is not a field id (a positive number), a field code (text) or false"
        )),
    }
}

pub fn parse_mapping(text: &str) -> Result<(FieldMap, Sources), String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let mut map = FieldMap::default();
    let mut sources = Sources::default();
    let mut problems = Vec::new();
    for k in table.keys() {
        if k != "fields" && k != "sources" {
            problems.push(format!("unknown section {k:?} (expected [fields] or [sources])"));
        }
    }
    if let Some(fields) = table.get("fields") {
        let Some(fields) = fields.as_table() else {
            return Err("fields must be a table".into());
        };
        for (k, v) in fields {
            let Some(value) = CardValue::ALL.iter().find(|c| c.key() == k) else {
                problems.push(format!(
                    "fields.{k}: unknown value; one of {}",
                    CardValue::ALL.map(CardValue::key).join(", ")
                ));
                continue;
            };
            let target = match target_of(v) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("fields.{k}: {e}"));
                    continue;
                }
            };
            if let Some(slot) = map.0.iter_mut().find(|(c, _)| c == value) {
                slot.1 = target;
            }
        }
    }
    if let Some(table) = table.get("sources") {
        let Some(table) = table.as_table() else {
            return Err("sources must be a table".into());
        };
        for (k, v) in table {
            let Some(value) = SourceValue::ALL.iter().find(|c| c.key() == k) else {
                problems.push(format!(
                    "sources.{k}: unknown attribute; one of {}",
                    SourceValue::ALL.map(SourceValue::key).join(", ")
                ));
                continue;
            };
            let target = match target_of(v) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("sources.{k}: {e}"));
                    continue;
                }
            };
            // kopilka's own writes would come back as the customer's values (their own friend
            // code as the code they came with), so a field cannot be both
            let written = map.0.iter().find(|(_, t)| match (t, &target) {
                (Some(Target::Id(a)), Target::Id(b)) => a == b,
                (Some(Target::Code(a)), Target::Code(b)) => a.eq_ignore_ascii_case(b),
                _ => false,
            });
            if let Some((by, _)) = written {
                problems.push(format!(
                    "sources.{k}: kopilka writes this field (fields.{}); name the field managers type the {} into",
                    by.key(),
                    k.replace('_', " ")
                ));
                continue;
            }
            sources.0.push((*value, target));
        }
    }
    if problems.is_empty() {
        Ok((map, sources))
    } else {
        Err(problems.join("; "))
    }
}

/// The map resolved against the account: field ids to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub ids: Vec<(CardValue, i64)>,
    /// Values whose field does not exist in the account (with the target sought).
    pub missing: Vec<(CardValue, Target)>,
    pub phone: Option<i64>,
    pub email: Option<i64>,
    /// The contact fields kopilka reads attributes from (`[sources]`), found in the account.
    pub sources: Vec<SourceField>,
    /// Source fields named in the map that the account does not have (never created: they
    /// are the shop's fields).
    pub missing_sources: Vec<(SourceValue, Target)>,
}

impl Resolved {
    pub fn id(&self, v: CardValue) -> Option<i64> {
        self.ids.iter().find(|(c, _)| *c == v).map(|(_, id)| *id)
    }
}

/// Finds the source fields in the account's field list.
pub fn resolve_sources(
    sources: &Sources,
    fields: &[CustomField],
) -> (Vec<SourceField>, Vec<(SourceValue, Target)>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (value, target) in &sources.0 {
        let field = fields.iter().find(|f| match target {
            Target::Id(id) => f.id == *id,
            Target::Code(c) => f.code.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(c)),
        });
        match field {
            Some(f) => found.push(SourceField {
                value: *value,
                id: f.id,
                kind: f.kind.clone(),
            }),
            None => missing.push((*value, target.clone())),
        }
    }
    (found, missing)
}

/// Every contact field of the account.
pub async fn list(client: &Client) -> Result<Vec<CustomField>, AmoError> {
    client
        .get_all("/api/v4/contacts/custom_fields?limit=250", "custom_fields")
        .await
}

pub fn resolve(map: &FieldMap, fields: &[CustomField]) -> Resolved {
    let by_code = |code: &str| {
        fields
            .iter()
            .find(|f| f.code.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(code)))
            .map(|f| f.id)
    };
    let mut r = Resolved {
        phone: by_code("PHONE"),
        email: by_code("EMAIL"),
        ..Default::default()
    };
    for (value, target) in &map.0 {
        let Some(target) = target else { continue };
        let found = match target {
            Target::Id(id) => fields.iter().find(|f| f.id == *id).map(|f| f.id),
            Target::Code(c) => by_code(c),
        };
        match found {
            Some(id) => r.ids.push((*value, id)),
            None => r.missing.push((*value, target.clone())),
        }
    }
    r
}

/// Creates the missing fields that are named by code (a missing field id cannot be
/// created: it names a field that was deleted). Returns the values created.
pub async fn create_missing(
    client: &Client,
    missing: &[(CardValue, Target)],
) -> Result<Vec<CardValue>, AmoError> {
    let mut body = Vec::new();
    let mut created = Vec::new();
    for (i, (value, target)) in missing.iter().enumerate() {
        let Target::Code(code) = target else { continue };
        body.push(json!({
            "name": value.name_ru(),
            "type": value.field_type(),
            "code": code,
            "sort": 500 + i,
            "is_api_only": value.api_only(),
            "request_id": i.to_string(),
        }));
        created.push(*value);
    }
    if body.is_empty() {
        return Ok(created);
    }
    let body = Value::Array(body);
    client
        .send(
            reqwest::Method::POST,
            "/api/v4/contacts/custom_fields",
            Send {
                body: Some(&body),
                halve_on_504: false,
            },
        )
        .await?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_files_override_defaults_and_report_every_problem() {
        let m = FieldMap::parse("[fields]\npoints = 123\noffer = false\ntier = \"MY_TIER\"\n").unwrap();
        assert!(m.0.contains(&(CardValue::Points, Some(Target::Id(123)))));
        assert!(m.0.contains(&(CardValue::Offer, None)));
        assert!(m.0.contains(&(CardValue::Tier, Some(Target::Code("MY_TIER".into())))));
        assert!(m.0.contains(&(CardValue::Ltv, Some(Target::Code("KOPILKA_LTV".into())))));
        let e = FieldMap::parse("[fields]\nbalance = 1\npoints = -2\n[other]\n").unwrap_err();
        assert!(
            e.contains("fields.balance") && e.contains("fields.points") && e.contains("\"other\""),
            "{e}"
        );
    }

    #[test]
    fn sources_are_read_only_where_named_and_never_from_a_written_field() {
        let (_, none) = parse_mapping("[fields]\n").unwrap();
        assert!(none.0.is_empty(), "nothing is read unless named");
        let (_, s) =
            parse_mapping("[sources]\nbirthday = \"BIRTHDAY\"\nconsent_ads = 77\ninvite_code = false\n")
                .unwrap();
        assert_eq!(
            s.0,
            vec![
                (SourceValue::Birthday, Target::Code("BIRTHDAY".into())),
                (SourceValue::ConsentAds, Target::Id(77)),
            ]
        );
        let e = parse_mapping(
            "[sources]\nbirthdate = \"B\"\nreferral_code = \"kopilka_friend_code\"\nconsent_ads = 0\n",
        )
        .unwrap_err();
        assert!(e.contains("sources.birthdate: unknown attribute"), "{e}");
        assert!(
            e.contains("sources.referral_code: kopilka writes this field (fields.referral_code)"),
            "{e}"
        );
        assert!(e.contains("sources.consent_ads: 0 is not a field id"), "{e}");
    }
}
