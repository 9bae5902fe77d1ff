//! Which OData entity sets and fields a 1C configuration keeps its sales, returns, catalog,
//! cards and bonus points in.
//!
//! Every 1C configuration names its objects its own way (`Товары` in Розница, `Запасы` in УНФ),
//! and shops modify their configurations, so the names live in mapping files
//! (`mappings/1c/*.toml`), not in code. Three are built in (`roznica`, `ut11`, `unf`, embedded
//! with `include_str!` so the binary needs no files beside it); `[onec.odata] mapping` may
//! instead name a file an integrator wrote for a modified configuration.
//!
//! A mapping is checked as strictly as the configuration: every unknown key is an error (a
//! misspelt key would otherwise silently fall back to a default and read the wrong field),
//! every name must be one OData can carry in `$select`, and every problem is reported at once.
//! Whether the names exist in a given base is a separate question, answered by
//! `kopilka check --probe` against `$metadata`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::document::DocKind;

/// The mappings compiled into kopilka, by the name `[onec.odata] mapping` uses.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("roznica2", include_str!("../../mappings/1c/roznica2.toml")),
    ("roznica3", include_str!("../../mappings/1c/roznica3.toml")),
    ("ut11", include_str!("../../mappings/1c/ut11.toml")),
    ("unf", include_str!("../../mappings/1c/unf.toml")),
];

/// Older names of built-in mappings, kept so existing configurations go on working:
/// `roznica` was written for «Розница 2.x/3.x» and is Розница 2 (3.0 is УНФ-shaped).
pub const ALIASES: &[(&str, &str)] = &[("roznica", "roznica2")];

/// A validated mapping.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    /// The built-in name or the file it was read from, for messages.
    pub origin: String,
    /// The configuration it describes, as people name it (`1С:Розница 2.3`).
    pub configuration: String,
    /// Document types to read, in the order they are polled (sales before their returns, so
    /// a return usually finds its sale already in the ledger).
    pub documents: Vec<DocumentMap>,
    pub products: ProductMap,
    pub prices: Option<PriceMap>,
    pub cards: Option<CardMap>,
    pub people: Option<PeopleMap>,
    pub bonus: Option<BonusMap>,
    /// The bonus document kopilka writes when `[accounting] postback = "odata"`.
    pub bonus_document: Option<BonusDocumentMap>,
    /// The document the daily accounting postings become over OData.
    pub accounting_document: Option<AccountingDocumentMap>,
    /// 1C's additional attributes of the `[people]` catalogs: what kopilka reads from them
    /// and where it publishes the tier.
    pub attributes: Option<AttributesMap>,
}

/// One document type: a till receipt, a return, a sale invoice.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentMap {
    /// Entity set, e.g. `Document_ЧекККМ`.
    pub set: String,
    /// What a document of this set is, unless `operation` says it is a return.
    pub kind: DocKind,
    /// The tabular section holding the goods lines (`Товары`, `Запасы`).
    pub rows: String,
    pub row: RowMap,
    /// Header field with the document total as 1C states it; without it the total is the
    /// sum of the lines.
    pub total: Option<String>,
    /// Header reference to the store or till (`Магазин_Key`, `КассаККМ_Key`).
    pub store: Option<String>,
    /// Header reference to the loyalty card (a key into [`CardMap::set`]).
    pub card: Option<String>,
    /// Header reference to the customer (a key into [`PeopleMap::set`]).
    pub customer: Option<String>,
    /// Header field (an enum) whose value can make a document of a sales set a return
    /// (Розница's `ВидОперации` = `Возврат`) or no sale at all (УНФ's `РасходнаяНакладная`
    /// with `ВидОперации` = `ВозвратПоставщику`).
    pub operation: Option<String>,
    /// Values of `operation` that mean "return", compared without regard to case.
    pub return_operations: Vec<String>,
    /// Values of `operation` that mean "sale to a customer"; when given, a document with any
    /// other value is not a sale and has no effect (a transfer, a return to a supplier).
    pub sale_operations: Vec<String>,
    /// Header reference to the sale a return takes back (`ЧекККМ_Key`, or a composite
    /// `ДокументРеализации` read with its `_Type`).
    pub return_link: Option<String>,
}

/// The fields of one goods line.
#[derive(Clone, Debug, PartialEq)]
pub struct RowMap {
    /// Reference to the product (`Номенклатура_Key`).
    pub product: String,
    /// Reference to the variant (`Характеристика_Key`); a non-empty one makes the line's
    /// product id `product#variant`, as CommerceML writes it.
    pub variant: Option<String>,
    pub quantity: String,
    /// Unit price before discounts.
    pub price: String,
    /// What the line costs after every discount (`Сумма`, УНФ `Всего`).
    pub net: String,
    /// Discount amounts, already taken off `net`, summed into the line's discount.
    pub discounts: Vec<String>,
    /// The part of the line paid with bonus points, in rubles.
    pub points_paid: Option<String>,
    /// Whether `net` already has `points_paid` taken off (1C books a payment with points as a
    /// discount). kopilka counts a sale at its value before points, so it adds them back.
    pub net_excludes_points_paid: bool,
    /// A return whose link to its sale is per line (Розница 2's `ВозвратТоваровОтПокупателя`:
    /// `Товары.ЧекККМ_Key`). All lines must name the same sale.
    pub return_link: Option<String>,
}

/// The product catalog: groups (folders) and products.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductMap {
    /// `Catalog_Номенклатура`; hierarchical, so `Parent_Key` and `IsFolder` exist.
    pub set: String,
    pub article: Option<String>,
    /// An enum field telling goods from services, and the values that mean a service.
    pub service: Option<String>,
    pub service_values: Vec<String>,
}

/// Where the cost price comes from: a price register and its price types.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceMap {
    /// The price register records (`InformationRegister_ЦеныНоменклатуры`), filtered by
    /// `Period`. A register written by documents is read through its `_RecordType` set.
    pub set: String,
    pub product: String,
    pub variant: Option<String>,
    pub price_type: String,
    pub price: String,
    /// The price type catalog (`Catalog_ВидыЦен`), so `[onec] cost_price_type` may name
    /// a price type by its description.
    pub price_types: String,
}

/// Loyalty cards: how a card reference becomes a card number and an owner.
#[derive(Clone, Debug, PartialEq)]
pub struct CardMap {
    pub set: String,
    /// Fields holding the number, tried in order; the first non-empty one is the card number.
    pub number: Vec<String>,
    /// Reference to the card's owner (a key into [`PeopleMap::set`]).
    pub owner: Option<String>,
}

/// Customers (partners or counterparties): name, phones, e-mails.
#[derive(Clone, Debug, PartialEq)]
pub struct PeopleMap {
    pub set: String,
    /// More catalogs a composite owner or customer may point into, each with the same
    /// fields (Розница 2: a card's owner is `Catalog_Контрагенты` or `Catalog_ФизическиеЛица`);
    /// the reference's `_Type` says which.
    pub also: Vec<String>,
    /// Field with the customer's name; `Description` in every configuration.
    pub name: String,
    /// The contact information tabular section, its kind and value fields, and the kinds
    /// (enum values) that are phones and e-mails.
    pub contacts: Option<String>,
    pub contact_kind: String,
    pub contact_value: String,
    pub phone_kinds: Vec<String>,
    pub email_kinds: Vec<String>,
    /// The person's birth date (`ДатаРождения`, finding S5), for the birthday bonus; read
    /// only from `birth_date_in` when it is given (Розница 2 keeps it on natural persons, not
    /// on counterparties), else from every set.
    pub birth_date: Option<String>,
    pub birth_date_in: Vec<String>,
}

impl PeopleMap {
    /// The birth-date field, when `set` has it.
    pub fn birth_date_of(&self, set: &str) -> Option<&str> {
        self.birth_date
            .as_deref()
            .filter(|_| self.birth_date_in.is_empty() || self.birth_date_in.iter().any(|s| s == set))
    }
}

/// A customer attribute kopilka reads from a 1C additional attribute: the same keys as
/// `[sources]` in `mappings/amocrm.toml`, so a shop names the same things in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttributeKey {
    Birthday,
    ReferralCode,
    InviteCode,
    ConsentService,
    ConsentAds,
}

impl AttributeKey {
    pub const ALL: [AttributeKey; 5] = [
        AttributeKey::Birthday,
        AttributeKey::ReferralCode,
        AttributeKey::InviteCode,
        AttributeKey::ConsentService,
        AttributeKey::ConsentAds,
    ];

    /// The key as the mapping file spells it.
    pub fn key(self) -> &'static str {
        match self {
            AttributeKey::Birthday => "birthday",
            AttributeKey::ReferralCode => "referral_code",
            AttributeKey::InviteCode => "invite_code",
            AttributeKey::ConsentService => "consent_service",
            AttributeKey::ConsentAds => "consent_ads",
        }
    }
}

/// 1C's additional attributes (`ДополнительныеРеквизиты`, the «Свойства» subsystem of БСП):
/// a tabular section on each people catalog whose rows name a property of a chart of
/// characteristic types and hold its value. A shop adds properties in 1C's own forms, so
/// they are named here by the title a person sees, never by a key kopilka would have to be
/// told; the title is looked up in the chart once per run.
#[derive(Clone, Debug, PartialEq)]
pub struct AttributesMap {
    /// The tabular section (`ДополнительныеРеквизиты`).
    pub section: String,
    /// The row's reference to the property (`Свойство_Key`).
    pub property: String,
    /// The row's value (`Значение`): composite, so read and written with its `_Type`.
    pub value: String,
    /// The chart of characteristic types the properties are in.
    pub properties: String,
    /// The chart's fields a title is compared with, in order: what the form shows
    /// (`Заголовок`), the standard `Description` (the title, or «title (set)» for older
    /// properties), the programmatic name (`Имя`).
    pub title_fields: Vec<String>,
    /// Attributes read, each with its property's title.
    pub sources: Vec<(AttributeKey, String)>,
    /// The property kopilka writes the customer's tier name to.
    pub tier: Option<String>,
}

impl AttributesMap {
    /// Whether anything is read from the section.
    pub fn reads(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The `_Type` companion of the value field.
    pub fn value_type(&self) -> String {
        type_field(&self.value)
    }

    /// Every title named, with the mapping key that names it.
    pub fn titles(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = self
            .sources
            .iter()
            .map(|(k, t)| (format!("attributes.sources.{}", k.key()), t.as_str()))
            .collect();
        out.extend(self.tier.as_deref().map(|t| ("attributes.tier".to_string(), t)));
        out
    }
}

/// What a bonus register dimension refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BonusHolder {
    /// A customer in [`PeopleMap::set`] (Розница, УТ 11: `Партнер`).
    People,
    /// A card in [`CardMap::set`] (УНФ: `БонуснаяКарта`).
    Card,
}

/// 1C's own bonus register, read once to migrate opening balances.
#[derive(Clone, Debug, PartialEq)]
pub struct BonusMap {
    /// `AccumulationRegister_БонусныеБаллы`; its balance is read through `/Balance()`.
    pub set: String,
    /// The dimension naming whose points a balance row holds.
    pub holder: String,
    pub holder_is: BonusHolder,
    /// The program dimension, used with `[onec.odata] bonus_program`.
    pub program: Option<String>,
    /// The program catalog, to find `bonus_program` by its description.
    pub programs: Option<String>,
    /// Resources whose balances make up the points (`Начислено` → `НачисленоBalance`).
    pub add: Vec<String>,
    /// Resources whose balances are taken off, never below zero in sum: 1C's spendable
    /// balance is `Начислено − max(КСписанию, 0)` at a date.
    pub subtract: Vec<String>,
    /// The resource whose future receipts are the points scheduled to burn, by date
    /// (`КСписанию`): read from the register's records after the import date, so opening
    /// balances keep 1C's burn dates.
    pub burn: Option<String>,
}

/// The bonus document kopilka creates and posts in 1C, one per journal transaction
/// (`Document_НачислениеИСписаниеБонусныхБаллов`; УНФ without «И»).
#[derive(Clone, Debug, PartialEq)]
pub struct BonusDocumentMap {
    pub set: String,
    /// Header reference to the bonus program (`БонуснаяПрограмма_Key`).
    pub program: Option<String>,
    /// The program catalog `[onec.odata] bonus_program` is looked up in; `bonus.programs`
    /// when not given.
    pub programs: Option<String>,
    /// Header text field carrying `kopilka:<outbox key>` (`Комментарий`).
    pub comment: String,
    /// What a row's holder refers to: a card ([`CardMap::set`]) or a customer
    /// ([`PeopleMap::set`]).
    pub holder_is: BonusHolder,
    /// Points added (accruals, a reversed redemption).
    pub accruals: BonusRowsMap,
    /// Points taken (redemptions, expiry, a reversed accrual).
    pub writeoffs: BonusRowsMap,
}

/// One tabular section of the bonus document.
#[derive(Clone, Debug, PartialEq)]
pub struct BonusRowsMap {
    pub rows: String,
    /// Reference to the card or customer (`БонуснаяКарта_Key`).
    pub holder: String,
    /// The points, a whole number (`Количество`).
    pub points: String,
    /// Accruals: the date the points were given (`ДатаНачисления`).
    pub accrued_on: Option<String>,
    /// Accruals: the date they burn (`ДатаСгорания`; empty date when they never do).
    pub expires_on: Option<String>,
    /// Write-offs: the correction of the points scheduled to burn
    /// (`КорректировкаКСписанию`): the points for an expiry, 0 otherwise.
    pub burn_correction: Option<String>,
}

/// The document a day's accounting posting becomes: a header with the legal entity and
/// the total, one row per movement with its debit and credit accounts and amount.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountingDocumentMap {
    pub set: String,
    /// Header field for the legal entity; a `…_Key` reference is looked up by
    /// `Description` in `organizations`, any other field takes the name as text.
    pub organization: Option<String>,
    pub organizations: Option<String>,
    /// Header field with the signed total of the rows, in rubles.
    pub amount: Option<String>,
    /// Header text describing the operation (`Содержание`).
    pub content: Option<String>,
    /// Header text field carrying `kopilka:<outbox key>`.
    pub comment: String,
    /// The tabular section of postings.
    pub rows: String,
    pub row: PostingRowMap,
    /// The chart of accounts: `…_Key` account fields are looked up by `Code` in it.
    pub accounts: Option<String>,
}

/// The fields of one posting row.
#[derive(Clone, Debug, PartialEq)]
pub struct PostingRowMap {
    pub debit: String,
    pub credit: String,
    /// Rubles with kopecks; negative for a reversing adjustment.
    pub amount: String,
    pub content: Option<String>,
}

/// Everything wrong with a mapping, each problem with its key path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct MappingError {
    pub origin: String,
    pub problems: Vec<String>,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mapping {} has {} problem(s): ",
            self.origin,
            self.problems.len()
        )?;
        f.write_str(&self.problems.join("; "))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawMapping {
    configuration: Option<String>,
    documents: Vec<RawDocument>,
    products: Option<RawProducts>,
    prices: Option<RawPrices>,
    cards: Option<RawCards>,
    people: Option<RawPeople>,
    bonus: Option<RawBonus>,
    bonus_document: Option<RawBonusDocument>,
    accounting_document: Option<RawAccountingDocument>,
    attributes: Option<RawAttributes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAttributes {
    section: Option<String>,
    property: Option<String>,
    value: Option<String>,
    properties: Option<String>,
    title_fields: Vec<String>,
    sources: RawSources,
    tier: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSources {
    birthday: Option<String>,
    referral_code: Option<String>,
    invite_code: Option<String>,
    consent_service: Option<String>,
    consent_ads: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawDocument {
    set: Option<String>,
    kind: Option<String>,
    rows: Option<String>,
    row: Option<RawRow>,
    total: Option<String>,
    store: Option<String>,
    card: Option<String>,
    customer: Option<String>,
    operation: Option<String>,
    return_operations: Vec<String>,
    sale_operations: Vec<String>,
    return_link: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRow {
    product: Option<String>,
    variant: Option<String>,
    quantity: Option<String>,
    price: Option<String>,
    net: Option<String>,
    discounts: Vec<String>,
    points_paid: Option<String>,
    net_excludes_points_paid: Option<bool>,
    return_link: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProducts {
    set: Option<String>,
    article: Option<String>,
    service: Option<String>,
    service_values: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPrices {
    set: Option<String>,
    product: Option<String>,
    variant: Option<String>,
    price_type: Option<String>,
    price: Option<String>,
    price_types: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCards {
    set: Option<String>,
    number: Vec<String>,
    owner: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPeople {
    set: Option<String>,
    also: Vec<String>,
    name: Option<String>,
    contacts: Option<String>,
    contact_kind: Option<String>,
    contact_value: Option<String>,
    phone_kinds: Vec<String>,
    email_kinds: Vec<String>,
    birth_date: Option<String>,
    birth_date_in: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawBonus {
    set: Option<String>,
    holder: Option<String>,
    holder_is: Option<String>,
    program: Option<String>,
    programs: Option<String>,
    add: Vec<String>,
    subtract: Vec<String>,
    burn: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawBonusDocument {
    set: Option<String>,
    program: Option<String>,
    programs: Option<String>,
    comment: Option<String>,
    holder_is: Option<String>,
    accruals: Option<RawBonusRows>,
    writeoffs: Option<RawBonusRows>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawBonusRows {
    rows: Option<String>,
    holder: Option<String>,
    points: Option<String>,
    accrued_on: Option<String>,
    expires_on: Option<String>,
    burn_correction: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAccountingDocument {
    set: Option<String>,
    organization: Option<String>,
    organizations: Option<String>,
    amount: Option<String>,
    content: Option<String>,
    comment: Option<String>,
    rows: Option<String>,
    row: Option<RawPostingRow>,
    accounts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPostingRow {
    debit: Option<String>,
    credit: Option<String>,
    amount: Option<String>,
    content: Option<String>,
}

/// Entity set prefixes 1C's standard OData interface uses.
const SET_PREFIXES: &[&str] = &[
    "Catalog_",
    "Document_",
    "DocumentJournal_",
    "InformationRegister_",
    "AccumulationRegister_",
    "AccountingRegister_",
    "CalculationRegister_",
    "ExchangePlan_",
    "ChartOfCharacteristicTypes_",
    "ChartOfAccounts_",
    "ChartOfCalculationTypes_",
    "BusinessProcess_",
    "Task_",
    "Constant_",
];

/// Collects problems with their key paths.
struct Problems(Vec<String>);

impl Problems {
    fn bad(&mut self, key: &str, message: impl fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }

    /// A field or section name as OData carries it in `$select` and `$filter`: letters
    /// (Cyrillic included), digits and underscores, not starting with a digit.
    fn name(&mut self, key: &str, value: &str) -> String {
        let ok = !value.is_empty()
            && value.chars().count() <= 128
            && value.chars().all(|c| c.is_alphanumeric() || c == '_')
            && !value.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            self.bad(
                key,
                format!("{value:?} is not a 1C name (letters, digits and _ only)"),
            );
        }
        value.to_string()
    }

    fn required(&mut self, key: &str, value: Option<&String>) -> String {
        match value {
            Some(v) => self.name(key, v),
            None => {
                self.bad(key, "is required");
                String::new()
            }
        }
    }

    fn optional(&mut self, key: &str, value: Option<&String>) -> Option<String> {
        value.map(|v| self.name(key, v))
    }

    fn names(&mut self, key: &str, values: &[String]) -> Vec<String> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| self.name(&format!("{key}[{i}]"), v))
            .collect()
    }

    fn set(&mut self, key: &str, value: Option<&String>) -> String {
        let v = self.required(key, value);
        if !v.is_empty() && !SET_PREFIXES.iter().any(|p| v.starts_with(p) && v.len() > p.len()) {
            self.bad(
                key,
                format!("{v:?} is not an entity set name (Catalog_…, Document_…, InformationRegister_…, …)"),
            );
        }
        v
    }

    /// Enum values are compared as text; they only need to be non-empty.
    fn values(&mut self, key: &str, values: &[String]) -> Vec<String> {
        for (i, v) in values.iter().enumerate() {
            if v.trim().is_empty() {
                self.bad(&format!("{key}[{i}]"), "is empty");
            }
        }
        values.to_vec()
    }
}

/// Reads a built-in mapping by name, or a mapping file by path (a relative path is taken
/// from `base`, the configuration file's folder, when given).
pub fn load(name_or_path: &str, base: Option<&Path>) -> Result<Mapping, MappingError> {
    let name_or_path = ALIASES
        .iter()
        .find(|(old, _)| *old == name_or_path)
        .map_or(name_or_path, |(_, new)| *new);
    if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
        return parse(text, &format!("built-in {name}"));
    }
    let path = PathBuf::from(name_or_path);
    let path = match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path,
    };
    let origin = path.display().to_string();
    if !name_or_path.contains(['/', '\\', '.']) {
        let known: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        return Err(MappingError {
            origin: name_or_path.to_string(),
            problems: vec![format!(
                "no built-in mapping {name_or_path:?} (built in: {}); a mapping file is named by its path",
                known.join(", ")
            )],
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| MappingError {
        origin: origin.clone(),
        problems: vec![format!("cannot read the file: {e}")],
    })?;
    parse(&text, &origin)
}

/// Parses and validates mapping text; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<Mapping, MappingError> {
    let fail = |problems: Vec<String>| MappingError {
        origin: origin.to_string(),
        problems,
    };
    let value: toml::Value = toml::from_str(text).map_err(|e| fail(vec![format!("not valid TOML: {e}")]))?;
    let mut unknown = Vec::new();
    let raw: Result<RawMapping, _> = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    let mut p = Problems(
        unknown
            .into_iter()
            .map(|k| format!("{}: unknown key", bracket_indices(&k)))
            .collect(),
    );
    let raw = match raw {
        Ok(r) => r,
        Err(e) => {
            p.0.push(e.to_string().trim_end_matches('\n').to_string());
            return Err(fail(p.0));
        }
    };
    let mapping = convert(&raw, origin, &mut p);
    if p.0.is_empty() {
        Ok(mapping)
    } else {
        Err(fail(p.0))
    }
}

/// `documents.0.row.?.nett` (serde's path; `?` is an `Option`) → `documents[0].row.nett`,
/// as the other messages say it.
fn bracket_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 2);
    for seg in path.split('.').filter(|s| *s != "?") {
        if !out.is_empty() && !seg.is_empty() && seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn convert(raw: &RawMapping, origin: &str, p: &mut Problems) -> Mapping {
    if raw.documents.is_empty() {
        p.bad("documents", "at least one [[documents]] table is required");
    }
    let mut documents = Vec::with_capacity(raw.documents.len());
    for (i, d) in raw.documents.iter().enumerate() {
        let k = |field: &str| format!("documents[{i}].{field}");
        let set = p.set(&k("set"), d.set.as_ref());
        if documents.iter().any(|x: &DocumentMap| x.set == set) {
            p.bad(&k("set"), format!("{set:?} is mapped twice"));
        }
        let kind = match d.kind.as_deref() {
            Some("sale") => DocKind::Sale,
            Some("return") => DocKind::Return,
            Some(other) => {
                p.bad(&k("kind"), format!("{other:?} is not sale or return"));
                DocKind::Sale
            }
            None => {
                p.bad(&k("kind"), "is required (sale or return)");
                DocKind::Sale
            }
        };
        let rows = p.required(&k("rows"), d.rows.as_ref());
        let r = d.row.as_ref();
        if r.is_none() {
            p.bad(&k("row"), "is required: the fields of a goods line");
        }
        let empty = RawRow::default();
        let r = r.unwrap_or(&empty);
        let row = RowMap {
            product: p.required(&k("row.product"), r.product.as_ref()),
            variant: p.optional(&k("row.variant"), r.variant.as_ref()),
            quantity: p.required(&k("row.quantity"), r.quantity.as_ref()),
            price: p.required(&k("row.price"), r.price.as_ref()),
            net: p.required(&k("row.net"), r.net.as_ref()),
            discounts: p.names(&k("row.discounts"), &r.discounts),
            points_paid: p.optional(&k("row.points_paid"), r.points_paid.as_ref()),
            net_excludes_points_paid: r.net_excludes_points_paid.unwrap_or(true),
            return_link: p.optional(&k("row.return_link"), r.return_link.as_ref()),
        };
        if row.return_link.is_some() && kind != DocKind::Return {
            p.bad(&k("row.return_link"), "only a return set names its sale per line");
        }
        let operation = p.optional(&k("operation"), d.operation.as_ref());
        let return_operations = p.values(&k("return_operations"), &d.return_operations);
        let sale_operations = p.values(&k("sale_operations"), &d.sale_operations);
        if operation.is_some() == (return_operations.is_empty() && sale_operations.is_empty()) {
            p.bad(
                &k("operation"),
                "operation goes with return_operations and/or sale_operations: the field, and its values that mean a return or a sale",
            );
        }
        if !return_operations.is_empty() && kind == DocKind::Return {
            p.bad(
                &k("return_operations"),
                "only a sales set needs an operation telling returns apart",
            );
        }
        let card = p.optional(&k("card"), d.card.as_ref());
        if card.is_some() && raw.cards.is_none() {
            p.bad(
                &k("card"),
                "needs a [cards] table to turn a card reference into a number",
            );
        }
        let customer = p.optional(&k("customer"), d.customer.as_ref());
        if customer.is_some() && raw.people.is_none() {
            p.bad(&k("customer"), "needs a [people] table to read the customer");
        }
        documents.push(DocumentMap {
            set,
            kind,
            rows,
            row,
            total: p.optional(&k("total"), d.total.as_ref()),
            store: p.optional(&k("store"), d.store.as_ref()),
            card,
            customer,
            operation,
            return_operations,
            sale_operations,
            return_link: p.optional(&k("return_link"), d.return_link.as_ref()),
        });
    }
    let products = match &raw.products {
        None => {
            p.bad(
                "products",
                "a [products] table naming the product catalog is required",
            );
            ProductMap {
                set: String::new(),
                article: None,
                service: None,
                service_values: Vec::new(),
            }
        }
        Some(pr) => {
            let service = p.optional("products.service", pr.service.as_ref());
            let service_values = p.values("products.service_values", &pr.service_values);
            if service.is_some() == service_values.is_empty() {
                p.bad(
                    "products.service",
                    "service and service_values go together: the field, and its values that mean a service",
                );
            }
            ProductMap {
                set: p.set("products.set", pr.set.as_ref()),
                article: p.optional("products.article", pr.article.as_ref()),
                service,
                service_values,
            }
        }
    };
    let prices = raw.prices.as_ref().map(|pr| PriceMap {
        set: p.set("prices.set", pr.set.as_ref()),
        product: p.required("prices.product", pr.product.as_ref()),
        variant: p.optional("prices.variant", pr.variant.as_ref()),
        price_type: p.required("prices.price_type", pr.price_type.as_ref()),
        price: p.required("prices.price", pr.price.as_ref()),
        price_types: p.set("prices.price_types", pr.price_types.as_ref()),
    });
    let cards = raw.cards.as_ref().map(|c| {
        if c.number.is_empty() {
            p.bad("cards.number", "name at least one field holding the card number");
        }
        let owner = p.optional("cards.owner", c.owner.as_ref());
        if owner.is_some() && raw.people.is_none() {
            p.bad("cards.owner", "needs a [people] table to read the card's owner");
        }
        CardMap {
            set: p.set("cards.set", c.set.as_ref()),
            number: p.names("cards.number", &c.number),
            owner,
        }
    });
    let people = raw.people.as_ref().map(|c| {
        let contacts = p.optional("people.contacts", c.contacts.as_ref());
        let default_kind = "Тип".to_string();
        let default_value = "Представление".to_string();
        PeopleMap {
            set: p.set("people.set", c.set.as_ref()),
            also: c
                .also
                .iter()
                .enumerate()
                .map(|(i, s)| p.set(&format!("people.also[{i}]"), Some(s)))
                .collect(),
            name: p.name("people.name", c.name.as_deref().unwrap_or("Description")),
            contact_kind: p.name(
                "people.contact_kind",
                c.contact_kind.as_ref().unwrap_or(&default_kind),
            ),
            contact_value: p.name(
                "people.contact_value",
                c.contact_value.as_ref().unwrap_or(&default_value),
            ),
            phone_kinds: p.values("people.phone_kinds", &c.phone_kinds),
            email_kinds: p.values("people.email_kinds", &c.email_kinds),
            birth_date: c.birth_date.as_deref().map(|b| p.name("people.birth_date", b)),
            birth_date_in: c
                .birth_date_in
                .iter()
                .enumerate()
                .map(|(i, s)| p.set(&format!("people.birth_date_in[{i}]"), Some(s)))
                .collect(),
            contacts,
        }
    });
    let bonus = raw.bonus.as_ref().map(|b| {
        let holder_is = match b.holder_is.as_deref().unwrap_or("people") {
            "people" => BonusHolder::People,
            "card" => BonusHolder::Card,
            other => {
                p.bad("bonus.holder_is", format!("{other:?} is not people or card"));
                BonusHolder::People
            }
        };
        match holder_is {
            BonusHolder::People if raw.people.is_none() => {
                p.bad("bonus.holder_is", "people needs a [people] table")
            }
            BonusHolder::Card if raw.cards.is_none() => {
                p.bad("bonus.holder_is", "card needs a [cards] table")
            }
            _ => {}
        }
        if b.add.is_empty() {
            p.bad(
                "bonus.add",
                "name at least one resource whose balance is the points",
            );
        }
        let program = p.optional("bonus.program", b.program.as_ref());
        let programs = b.programs.as_ref().map(|s| p.set("bonus.programs", Some(s)));
        if programs.is_some() && program.is_none() {
            p.bad(
                "bonus.programs",
                "needs bonus.program, the dimension naming the program",
            );
        }
        BonusMap {
            set: p.set("bonus.set", b.set.as_ref()),
            holder: p.required("bonus.holder", b.holder.as_ref()),
            holder_is,
            program,
            programs,
            add: p.names("bonus.add", &b.add),
            subtract: p.names("bonus.subtract", &b.subtract),
            burn: p.optional("bonus.burn", b.burn.as_ref()),
        }
    });
    let bonus_document = raw
        .bonus_document
        .as_ref()
        .map(|d| bonus_document(d, raw, bonus.as_ref(), p));
    let accounting_document = raw
        .accounting_document
        .as_ref()
        .map(|d| accounting_document(d, p));
    let attributes = raw.attributes.as_ref().map(|a| {
        if raw.people.is_none() {
            p.bad(
                "attributes",
                "needs a [people] table: the attributes are the customers'",
            );
        }
        attributes(a, p)
    });
    Mapping {
        origin: origin.to_string(),
        configuration: raw.configuration.clone().unwrap_or_else(|| origin.to_string()),
        documents,
        products,
        prices,
        cards,
        people,
        bonus,
        bonus_document,
        accounting_document,
        attributes,
    }
}

/// A property's title as 1C's form takes it: any text but empty, at most the chart's
/// `Description` length (150).
fn title(p: &mut Problems, key: &str, value: &str) -> String {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > 150 {
        p.bad(
            key,
            format!("{value:?} is not a property title (1 to 150 characters)"),
        );
    }
    v.to_string()
}

fn attributes(a: &RawAttributes, p: &mut Problems) -> AttributesMap {
    let s = &a.sources;
    let mut sources = Vec::new();
    for (key, v) in AttributeKey::ALL.into_iter().zip([
        &s.birthday,
        &s.referral_code,
        &s.invite_code,
        &s.consent_service,
        &s.consent_ads,
    ]) {
        if let Some(v) = v {
            sources.push((key, title(p, &format!("attributes.sources.{}", key.key()), v)));
        }
    }
    let tier = a.tier.as_deref().map(|t| title(p, "attributes.tier", t));
    if let Some(t) = &tier
        && let Some((k, _)) = sources.iter().find(|(_, s)| s.to_lowercase() == t.to_lowercase())
    {
        // kopilka never writes what it reads: its own tier would come back as the shop's value
        p.bad(
            "attributes.tier",
            format!("{t:?} is also read as attributes.sources.{}", k.key()),
        );
    }
    let title_fields = if a.title_fields.is_empty() {
        vec![
            "Заголовок".to_string(),
            "Description".to_string(),
            "Имя".to_string(),
        ]
    } else {
        p.names("attributes.title_fields", &a.title_fields)
    };
    AttributesMap {
        section: p.name(
            "attributes.section",
            a.section.as_deref().unwrap_or("ДополнительныеРеквизиты"),
        ),
        property: p.name(
            "attributes.property",
            a.property.as_deref().unwrap_or("Свойство_Key"),
        ),
        value: p.name("attributes.value", a.value.as_deref().unwrap_or("Значение")),
        properties: p.set(
            "attributes.properties",
            Some(
                &a.properties
                    .clone()
                    .unwrap_or_else(|| "ChartOfCharacteristicTypes_ДополнительныеРеквизитыИСведения".into()),
            ),
        ),
        title_fields,
        sources,
        tier,
    }
}

fn bonus_document(
    d: &RawBonusDocument,
    raw: &RawMapping,
    bonus: Option<&BonusMap>,
    p: &mut Problems,
) -> BonusDocumentMap {
    let holder_is = match d.holder_is.as_deref().unwrap_or("card") {
        "card" => BonusHolder::Card,
        "people" => BonusHolder::People,
        other => {
            p.bad(
                "bonus_document.holder_is",
                format!("{other:?} is not card or people"),
            );
            BonusHolder::Card
        }
    };
    match holder_is {
        BonusHolder::Card if raw.cards.is_none() => p.bad(
            "bonus_document.holder_is",
            "card needs a [cards] table to find a card by its number",
        ),
        BonusHolder::People if raw.people.is_none() => {
            p.bad("bonus_document.holder_is", "people needs a [people] table")
        }
        _ => {}
    }
    let program = p.optional("bonus_document.program", d.program.as_ref());
    let programs = d
        .programs
        .as_ref()
        .map(|s| p.set("bonus_document.programs", Some(s)))
        .or_else(|| bonus.and_then(|b| b.programs.clone()));
    if d.programs.is_some() && program.is_none() {
        p.bad(
            "bonus_document.programs",
            "needs bonus_document.program, the header field naming the program",
        );
    }
    let mut rows = |key: &str, r: Option<&RawBonusRows>, accruals: bool| {
        let empty = RawBonusRows::default();
        if r.is_none() {
            p.bad(key, "is required: the tabular section and its fields");
        }
        let r = r.unwrap_or(&empty);
        let k = |f: &str| format!("{key}.{f}");
        let only = |p: &mut Problems, f: &str, v: &Option<String>, yes: bool| {
            if v.is_some() && !yes {
                p.bad(&k(f), "does not belong to this section");
            }
        };
        only(p, "accrued_on", &r.accrued_on, accruals);
        only(p, "expires_on", &r.expires_on, accruals);
        only(p, "burn_correction", &r.burn_correction, !accruals);
        BonusRowsMap {
            rows: p.required(&k("rows"), r.rows.as_ref()),
            holder: p.required(&k("holder"), r.holder.as_ref()),
            points: p.required(&k("points"), r.points.as_ref()),
            accrued_on: p.optional(&k("accrued_on"), r.accrued_on.as_ref()),
            expires_on: p.optional(&k("expires_on"), r.expires_on.as_ref()),
            burn_correction: p.optional(&k("burn_correction"), r.burn_correction.as_ref()),
        }
    };
    let accruals = rows("bonus_document.accruals", d.accruals.as_ref(), true);
    let writeoffs = rows("bonus_document.writeoffs", d.writeoffs.as_ref(), false);
    if accruals.rows == writeoffs.rows && !accruals.rows.is_empty() {
        p.bad(
            "bonus_document.writeoffs.rows",
            "must differ from bonus_document.accruals.rows",
        );
    }
    BonusDocumentMap {
        set: p.set("bonus_document.set", d.set.as_ref()),
        program,
        programs,
        comment: p.name(
            "bonus_document.comment",
            d.comment.as_deref().unwrap_or("Комментарий"),
        ),
        holder_is,
        accruals,
        writeoffs,
    }
}

fn accounting_document(d: &RawAccountingDocument, p: &mut Problems) -> AccountingDocumentMap {
    let organization = p.optional("accounting_document.organization", d.organization.as_ref());
    let organizations = d
        .organizations
        .as_ref()
        .map(|s| p.set("accounting_document.organizations", Some(s)));
    if organization.as_deref().is_some_and(is_reference) && organizations.is_none() {
        p.bad(
            "accounting_document.organization",
            "a reference (…_Key) needs accounting_document.organizations, the catalog to find the entity in",
        );
    }
    let r = d.row.as_ref();
    if r.is_none() {
        p.bad(
            "accounting_document.row",
            "is required: the fields of a posting row",
        );
    }
    let empty = RawPostingRow::default();
    let r = r.unwrap_or(&empty);
    let row = PostingRowMap {
        debit: p.required("accounting_document.row.debit", r.debit.as_ref()),
        credit: p.required("accounting_document.row.credit", r.credit.as_ref()),
        amount: p.required("accounting_document.row.amount", r.amount.as_ref()),
        content: p.optional("accounting_document.row.content", r.content.as_ref()),
    };
    let accounts = d
        .accounts
        .as_ref()
        .map(|s| p.set("accounting_document.accounts", Some(s)));
    if (is_reference(&row.debit) || is_reference(&row.credit)) && accounts.is_none() {
        p.bad(
            "accounting_document.accounts",
            "account references (…_Key) need the chart of accounts to find the codes in",
        );
    }
    AccountingDocumentMap {
        set: p.set("accounting_document.set", d.set.as_ref()),
        organization,
        organizations,
        amount: p.optional("accounting_document.amount", d.amount.as_ref()),
        content: p.optional("accounting_document.content", d.content.as_ref()),
        comment: p.name(
            "accounting_document.comment",
            d.comment.as_deref().unwrap_or("Комментарий"),
        ),
        rows: p.required("accounting_document.rows", d.rows.as_ref()),
        row,
        accounts,
    }
}

/// Whether a field is a reference (`X_Key`), written as a GUID found by lookup.
pub fn is_reference(field: &str) -> bool {
    field.ends_with("_Key") && field.len() > 4
}

/// Whether a field that refers to something is a composite reference: 1C publishes an
/// attribute of several reference types as two strings, `X` (the GUID) and `X_Type` (the
/// type, `StandardODATA.Catalog_ФизическиеЛица`), where a single type is `X_Key`.
pub fn is_composite(field: &str) -> bool {
    !is_reference(field)
}

/// The `_Type` companion of a composite reference field.
pub fn type_field(field: &str) -> String {
    format!("{field}_Type")
}

/// The entity set a composite reference's `_Type` names (`StandardODATA.Catalog_X` →
/// `Catalog_X`).
pub fn type_set(type_name: &str) -> &str {
    let t = type_name.trim();
    t.rsplit_once('.').map_or(t, |(_, set)| set)
}

impl PeopleMap {
    /// Every catalog a customer reference may point into, the main one first.
    pub fn sets(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.set.as_str()).chain(self.also.iter().map(String::as_str))
    }
}

impl DocumentMap {
    /// Header fields read besides the standard ones, each once.
    pub fn header_fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for f in [
            &self.total,
            &self.store,
            &self.card,
            &self.customer,
            &self.operation,
            &self.return_link,
        ]
        .into_iter()
        .flatten()
        {
            if !out.contains(&f.as_str()) {
                out.push(f);
            }
        }
        out
    }

    /// The `_Type` fields of the composite references among the header fields.
    pub fn type_fields(&self) -> Vec<String> {
        [&self.customer, &self.return_link]
            .into_iter()
            .flatten()
            .filter(|f| is_composite(f))
            .map(|f| type_field(f))
            .collect()
    }
}

impl RowMap {
    /// Row fields read, each once (`LineNumber` first).
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec!["LineNumber"];
        let all = [&self.product, &self.quantity, &self.price, &self.net]
            .into_iter()
            .chain(self.variant.iter())
            .chain(self.discounts.iter())
            .chain(self.points_paid.iter())
            .chain(self.return_link.iter());
        for f in all {
            if !out.contains(&f.as_str()) {
                out.push(f);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_mappings_are_valid() {
        for (name, _) in BUILT_IN {
            let m = load(name, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(!m.documents.is_empty(), "{name}");
            assert!(m.bonus.is_some(), "{name} maps the bonus register");
        }
        // the old name keeps working, as Розница 2
        let r = load("roznica", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r, load("roznica2", None).unwrap_or_else(|e| panic!("{e}")));
        let receipts = &r.documents[0];
        assert_eq!(receipts.set, "Document_ЧекККМ");
        assert_eq!(receipts.operation.as_deref(), Some("ВидОперации"));
        assert_eq!(receipts.return_link.as_deref(), Some("ЧекККМПродажа_Key"));
        assert_eq!(
            receipts.row.points_paid.as_deref(),
            Some("СуммаСкидкиОплатыБонусом")
        );
        let later = &r.documents[1];
        assert_eq!(later.set, "Document_ВозвратТоваровОтПокупателя");
        assert_eq!(later.row.return_link.as_deref(), Some("ЧекККМ_Key"));
        assert!(later.row.points_paid.is_some(), "returned points are read");
        let cards = r.cards.as_ref().expect("cards");
        assert!(is_composite(cards.owner.as_deref().unwrap_or("")));
        assert_eq!(
            r.people.as_ref().map(|p| p.sets().collect::<Vec<_>>()),
            Some(vec!["Catalog_ФизическиеЛица", "Catalog_Контрагенты"])
        );
        // every return set of every built-in mapping reads the points given back, where the
        // configuration has them per line
        for name in ["roznica2", "roznica3", "unf"] {
            let m = load(name, None).unwrap_or_else(|e| panic!("{e}"));
            for d in &m.documents {
                assert!(d.row.points_paid.is_some(), "{name} {}", d.set);
            }
            let b = m.bonus.expect("bonus");
            assert_eq!(b.subtract, ["КСписанию"], "{name}");
        }
        let unf = load("unf", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unf.documents[2].sale_operations, ["ПродажаПокупателю"]);
    }

    #[test]
    fn built_in_mappings_name_the_documents_kopilka_writes() {
        // (set, program, sections, holder, points, burn correction), from the dumps
        for (name, set, program, rows, holder, points, burn) in [
            (
                "roznica2",
                "Document_НачислениеИСписаниеБонусныхБаллов",
                "БонуснаяПрограммаЛояльности_Key",
                ("Начисление", "Списание"),
                "ДисконтнаяКарта_Key",
                "Баллы",
                Some("БаллыКСписанию"),
            ),
            (
                "ut11",
                "Document_НачислениеИСписаниеБонусныхБаллов",
                "БонуснаяПрограммаЛояльности_Key",
                ("Начисление", "Списание"),
                "Партнер_Key",
                "Баллы",
                None,
            ),
            (
                "unf",
                "Document_НачислениеСписаниеБонусныхБаллов",
                "БонуснаяПрограмма_Key",
                ("НачисленияБонусов", "СписанияБонусов"),
                "БонуснаяКарта_Key",
                "Количество",
                Some("КорректировкаКСписанию"),
            ),
            (
                "roznica3",
                "Document_НачислениеСписаниеБонусныхБаллов",
                "БонуснаяПрограмма_Key",
                ("НачисленияБонусов", "СписанияБонусов"),
                "БонуснаяКарта_Key",
                "Количество",
                Some("КорректировкаКСписанию"),
            ),
        ] {
            let m = load(name, None).unwrap_or_else(|e| panic!("{e}"));
            let b = m
                .bonus_document
                .unwrap_or_else(|| panic!("{name} maps the bonus document"));
            assert_eq!(b.set, set);
            assert_eq!(b.program.as_deref(), Some(program));
            assert_eq!((b.accruals.rows.as_str(), b.writeoffs.rows.as_str()), rows);
            assert_eq!(
                (b.accruals.holder.as_str(), b.accruals.points.as_str()),
                (holder, points)
            );
            assert_eq!(b.writeoffs.burn_correction.as_deref(), burn);
            let a = m
                .accounting_document
                .unwrap_or_else(|| panic!("{name} maps postings"));
            assert_eq!(a.set, "Document_ОперацияБух");
        }
    }

    #[test]
    fn a_bonus_document_is_checked_like_the_rest() {
        let text = MINIMAL.to_string()
            + "\n[bonus_document]\nset = \"Бонусы\"\nholder_is = \"card\"\nprograms = \"Catalog_П\"\n\
               [bonus_document.accruals]\nrows = \"Н\"\nholder = \"К_Key\"\npoints = \"Количество\"\nburn_correction = \"X\"\n\
               [accounting_document]\nset = \"Document_ОперацияБух\"\nrows = \"Проводки\"\norganization = \"Организация_Key\"\n\
               [accounting_document.row]\ndebit = \"СчетДт_Key\"\ncredit = \"СчетКт\"\namount = \"Сумма\"\n";
        let p = problems(&text);
        let has = |s: &str| p.iter().any(|m| m.contains(s));
        assert!(
            has("bonus_document.set: \"Бонусы\" is not an entity set name"),
            "{p:?}"
        );
        assert!(
            has("bonus_document.holder_is: card needs a [cards] table"),
            "{p:?}"
        );
        assert!(
            has("bonus_document.programs: needs bonus_document.program"),
            "{p:?}"
        );
        assert!(
            has("bonus_document.accruals.burn_correction: does not belong"),
            "{p:?}"
        );
        assert!(has("bonus_document.writeoffs: is required"), "{p:?}");
        assert!(has("accounting_document.organization: a reference"), "{p:?}");
        assert!(has("accounting_document.accounts: account references"), "{p:?}");
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text, "test.toml")
            .expect_err("the mapping should be refused")
            .problems
    }

    const MINIMAL: &str = r#"
        [[documents]]
        set = "Document_ЧекККМ"
        kind = "sale"
        rows = "Товары"
        [documents.row]
        product = "Номенклатура_Key"
        quantity = "Количество"
        price = "Цена"
        net = "Сумма"
        [products]
        set = "Catalog_Номенклатура"
    "#;

    #[test]
    fn a_minimal_mapping_reads() {
        let m = parse(MINIMAL, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m.documents[0].row.fields(),
            ["LineNumber", "Номенклатура_Key", "Количество", "Цена", "Сумма"]
        );
        assert!(m.documents[0].row.net_excludes_points_paid);
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_path() {
        let text = MINIMAL.replace("net = \"Сумма\"", "net = \"Сумма\"\nnett = \"x\"")
            + "\n[cards]\nset = \"Catalog_КартыЛояльности\"\nnumber = [\"Штрихкод\"]\nowner_field = \"x\"\n";
        let p = problems(&text);
        assert!(
            p.iter().any(|m| m.contains("documents[0].row.nett: unknown key")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("cards.owner_field: unknown key")),
            "{p:?}"
        );
    }

    #[test]
    fn names_kinds_and_dependencies_are_checked_together() {
        let text = MINIMAL
            .replace("kind = \"sale\"", "kind = \"refund\"\ncard = \"Карта_Key\"")
            .replace("Товары", "Товары, Услуги")
            .replace("Catalog_Номенклатура", "Номенклатура");
        let p = problems(&text);
        let has = |s: &str| p.iter().any(|m| m.contains(s));
        assert!(
            has("documents[0].kind: \"refund\" is not sale or return"),
            "{p:?}"
        );
        assert!(has("documents[0].card: needs a [cards] table"), "{p:?}");
        assert!(
            has("documents[0].rows: \"Товары, Услуги\" is not a 1C name"),
            "{p:?}"
        );
        assert!(
            has("products.set: \"Номенклатура\" is not an entity set name"),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_names_and_unreadable_files_say_what_exists() {
        let e = load("retail", None).expect_err("no such built-in");
        assert!(
            e.to_string().contains("built in: roznica2, roznica3, ut11, unf"),
            "{e}"
        );
        let e = load("./no/such/mapping.toml", None).expect_err("no such file");
        assert!(e.to_string().contains("cannot read the file"), "{e}");
        let e = parse("documents = 3", "x").expect_err("wrong type");
        assert!(!e.problems.is_empty());
    }
}
