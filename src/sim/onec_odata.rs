//! A 1C base — Розница 2, УНФ 3.0 (= Розница 3.0) or УТ 11 — seen through its standard OData
//! interface, for `kopilka demo`, tests and benchmarks.
//!
//! The objects follow the configurations' own metadata, not kopilka's mappings: the dumps of
//! 1С:Розница 2.2.12.30 (github DeZargo/1c_retail_apple @ 896da2e1), УНФ 3.0.8.73
//! (AlexanderYekat/unf @ 39143e43) and УТ 11.5.8.254 (evlahov-igor/UT11 @ 302d05cb), as graded
//! in `shared/specs/onec-configurations.md` ([`schema`] names each object's XML). Per
//! configuration: Розница 2 keeps cards in `Catalog_ИнформационныеКарты` whose owner is a
//! composite reference (`ВладелецКарты` + `ВладелецКарты_Type`: ФизическиеЛица or
//! Контрагенты), makes a till return a `ЧекККМ` with `ВидОперации = Возврат` naming its sale in
//! `ЧекККМПродажа_Key`, and a later return a `ВозвратТоваровОтПокупателя` naming the sale per
//! line (`Товары.ЧекККМ_Key`); УНФ has `Запасы`, `Catalog_ДисконтныеКарты`,
//! `ЧекККМВозврат` and invoices (`РасходнаяНакладная`) of which only `ВидОперации =
//! ПродажаПокупателю` is a sale; УТ 11 has `Catalog_КартыЛояльности`/`Catalog_Партнеры` and
//! pays with points in `СуммаБонусныхБалловКСписаниюВВалюте`. Return lines carry the points
//! paid on the returned goods where the configuration has the field (Розница 2, УНФ). УТ 11's
//! `ЧекККМВозврат` has no such field (OPEN how 1C fills it), so its simulated returns are only
//! of sales paid in money.
//!
//! The bonus register (`AccumulationRegister_БонусныеБаллы`, per card in Розница 2 and УНФ, per
//! partner in УТ 11) is derived from what is posted, in date order, the way the spec's semantic
//! findings describe it: an accrual is a `Начислено` receipt and, with a burn date, a
//! `КСписанию` receipt at that date; points paid at the till are a `Начислено` expense that also
//! lowers the soonest scheduled burns; a return gives its points back; a bonus document's
//! write-off lowers the schedule by its burn correction. `/Balance(Period=…)` answers
//! `Начислено − КСписанию` movements before the date, `_RecordType` lists the movements, and
//! [`OdataSim::register_balances`] is 1C's spendable balance `Начислено − max(КСписанию, 0)`.
//!
//! The protocol follows its description (`shared/specs/onec.md` C), not kopilka's
//! client: it serves `/<publication>/odata/standard.odata/` on `127.0.0.1:0` with HTTP Basic
//! auth (401 without it), JSON only on `$format=json` or `Accept: application/json` (Atom
//! otherwise), `$metadata` as EDMX, entity sets with tabular sections inline, one entity by
//! `Set(guid'…')`, the bonus register's `/Balance()` virtual table, and the query options
//! 1C honours: `$filter` (`eq ne gt ge lt le and or not`, `datetime'…'`, `guid'…'`, strings,
//! numbers, booleans, parentheses), `$orderby` (with `desc`), `$skip` before `$top`,
//! `$select` (`Товары/Цена` picks row fields) and `$inlinecount=allpages`, which — as in
//! 1C — makes `$skip` and `$top` ignored. Errors are `odata.error` bodies with 1C's codes
//! (9 not found → 404, 10 no such property → 400, 14 bad option → 400).
//!
//! Writing, as the spec's "Writing" part describes it: `POST /Set` creates a document or
//! catalog item with the `Ref_Key` given (or a new one) and answers 201 with `Location` and
//! the entity (`Ref_Key`, `Number`, `DataVersion`, …); unknown property names are silently
//! ignored; a tabular section row without `LineNumber` is a 500 «Произошла внутренняя ошибка
//! OData сервиса»; a second POST with the same `Ref_Key` is a 400 with code 15 «Сущность с
//! таким ключом уже существует». `POST /Set(guid'…')/Post` posts (200) or refuses with a 500,
//! code `-1` and a reason — when scripted ([`OdataSim::refuse_posting`]), when the document is
//! marked for deletion, or when a bonus document names no card or an unknown one (an
//! accounting document an unknown account); `…/Unpost` unposts. The simulated base also
//! publishes an accounting document (`Document_ОперацияБух` with a `Проводки` section, as
//! kopilka's mappings name it), legal entities and a chart of accounts.
//!
//! Numbers are written as the literal text they were given (`231.74`, `1.2345`), `Int64` as
//! strings, dates as naive local wall-clock times, `DataVersion` as opaque base64 that
//! changes on every write. Tests script faults ([`Fault`]), mutate documents the way people
//! do in 1C (edit, unpost, mark for deletion, delete, add, back-date) and count requests in
//! the log.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use chrono::{Duration as ChronoDuration, NaiveDateTime};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::core::document::{DocKind, Document};
use crate::core::money::Money;
use crate::sim::sales::Shop;

/// A field value as the simulator stores and writes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Str(String),
    /// A JSON number literal, written exactly as given.
    Num(String),
    Bool(bool),
    Null,
    /// A tabular section: rows of fields.
    Rows(Vec<Vec<(String, Val)>>),
}

impl Val {
    pub fn str(s: impl Into<String>) -> Val {
        Val::Str(s.into())
    }

    /// Money as 1C writes it: rubles with up to two decimals, trailing zeros dropped.
    pub fn money(m: Money) -> Val {
        Val::Num(m.as_decimal().normalize().to_string())
    }

    fn as_text(&self) -> Option<&str> {
        match self {
            Val::Str(s) | Val::Num(s) => Some(s),
            _ => None,
        }
    }
}

/// One entity: its key (`Ref_Key`, or a synthetic one for register records) and fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Entity {
    pub key: String,
    pub fields: Vec<(String, Val)>,
}

impl Entity {
    pub fn new(key: impl Into<String>) -> Entity {
        Entity {
            key: key.into(),
            fields: Vec::new(),
        }
    }

    /// Sets a field (replacing it if present); builder style.
    pub fn with(mut self, name: &str, v: Val) -> Entity {
        self.set(name, v);
        self
    }

    pub fn set(&mut self, name: &str, v: Val) {
        match self.fields.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = v,
            None => self.fields.push((name.to_string(), v)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Val> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// What a scripted fault does to a matching request.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// 500 with `odata.error` code `-1`: an exception in the configuration's code.
    Exception,
    /// 500 «Произошла внутренняя ошибка OData сервиса» (code 0).
    InternalError,
    /// 503 from the web server, an HTML page.
    Unavailable,
    /// Any status with an `odata.error` code.
    Status(u16, String),
    /// Answers correctly, but only after this long.
    Delay(Duration),
    /// 200 with the JSON cut in half.
    Truncated,
    /// 200 with the web server's HTML page (a broken publication).
    Html200,
}

/// A scripted fault: fires on requests whose path contains `path_contains` (and whose query
/// contains `query_contains`), after letting `skip` of them through, `times` times.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    pub path_contains: String,
    pub query_contains: Option<String>,
    /// Only requests of this method (`POST`), when given.
    pub method: Option<String>,
    pub skip: usize,
    pub times: usize,
}

impl Fault {
    /// Fires once on any request.
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            path_contains: String::new(),
            query_contains: None,
            method: None,
            skip: 0,
            times: 1,
        }
    }

    pub fn on(mut self, path_contains: &str) -> Fault {
        self.path_contains = path_contains.to_string();
        self
    }

    pub fn query(mut self, query_contains: &str) -> Fault {
        self.query_contains = Some(query_contains.to_string());
        self
    }

    /// Fires on requests of this method only (`"POST"`).
    pub fn method(mut self, method: &str) -> Fault {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    pub fn after(mut self, skip: usize) -> Fault {
        self.skip = skip;
        self
    }

    pub fn times(mut self, times: usize) -> Fault {
        self.times = times;
        self
    }
}

/// One request as the simulator saw it (path and query percent-decoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// The part after `standard.odata/`.
    pub resource: String,
    pub query: String,
    pub status: u16,
}

/// What the base holds, in the loyalty sense: documents in force and their value before
/// points (rows' `Сумма` + `СуммаСкидкиОплатыБонусом`), returns taken off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimTruth {
    pub sales: i64,
    pub returns: i64,
    pub net_total_kopecks: i64,
}

/// One customer's points in the bonus register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BonusTruth {
    /// The customer's 1C key (a person, counterparty or partner).
    pub person_key: String,
    pub card: Option<String>,
    pub points: i64,
}

/// Which configuration the simulated base is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Configuration {
    /// 1С:Розница 2.2 (`DeZargo/1c_retail_apple`).
    #[default]
    Roznica2,
    /// 1С:УНФ 3.0, which Розница 3.0 is built on (`AlexanderYekat/unf`).
    Unf,
    /// 1С:УТ 11.5 (`evlahov-igor/UT11`).
    Ut11,
}

/// The names a configuration gives the objects the simulator publishes.
#[derive(Clone, Copy, Debug)]
pub struct Names {
    /// The built-in kopilka mapping for this configuration.
    pub mapping: &'static str,
    pub receipts: &'static str,
    /// Where returns made apart from a receipt go.
    pub returns: &'static str,
    /// УНФ's sale invoices.
    pub invoices: Option<&'static str>,
    pub rows: &'static str,
    pub store: &'static str,
    pub card: &'static str,
    /// The line after every discount and points.
    pub net: &'static str,
    pub discounts: [&'static str; 2],
    /// The rubles paid with points on a line.
    pub points_paid: &'static str,
    pub cards: &'static str,
    pub card_number: &'static str,
    pub card_owner: &'static str,
    pub people: &'static str,
    /// The second catalog a composite owner may point into.
    pub people_other: Option<&'static str>,
    pub programs: &'static str,
    pub prices: &'static str,
    pub price_type: &'static str,
    pub price_variant: &'static str,
    pub bonus_holder: &'static str,
    pub bonus_program: Option<&'static str>,
    pub bonus_documents: &'static str,
    pub bonus_document_program: &'static str,
    pub accruals: &'static str,
    pub writeoffs: &'static str,
    pub bonus_document_holder: &'static str,
    pub bonus_document_points: &'static str,
    pub accrued_on: Option<&'static str>,
    pub expires_on: Option<&'static str>,
    pub burn_correction: Option<&'static str>,
}

impl Configuration {
    pub fn names(self) -> Names {
        match self {
            Configuration::Roznica2 => Names {
                mapping: "roznica2",
                receipts: RECEIPTS,
                returns: "Document_ВозвратТоваровОтПокупателя",
                invoices: None,
                rows: "Товары",
                store: "Магазин_Key",
                card: "ДисконтнаяКарта_Key",
                net: "Сумма",
                discounts: ["СуммаРучнойСкидки", "СуммаАвтоматическойСкидки"],
                points_paid: "СуммаСкидкиОплатыБонусом",
                cards: "Catalog_ИнформационныеКарты",
                card_number: "КодКарты",
                card_owner: "ВладелецКарты",
                people: "Catalog_ФизическиеЛица",
                people_other: Some("Catalog_Контрагенты"),
                programs: "Catalog_БонусныеПрограммыЛояльности",
                prices: PRICES,
                price_type: "ВидЦены_Key",
                price_variant: "Характеристика_Key",
                bonus_holder: "ДисконтнаяКарта_Key",
                bonus_program: Some("БонуснаяПрограммаЛояльности_Key"),
                bonus_documents: "Document_НачислениеИСписаниеБонусныхБаллов",
                bonus_document_program: "БонуснаяПрограммаЛояльности_Key",
                accruals: "Начисление",
                writeoffs: "Списание",
                bonus_document_holder: "ДисконтнаяКарта_Key",
                bonus_document_points: "Баллы",
                accrued_on: None,
                expires_on: None,
                burn_correction: Some("БаллыКСписанию"),
            },
            Configuration::Unf => Names {
                mapping: "unf",
                receipts: RECEIPTS,
                returns: "Document_ЧекККМВозврат",
                invoices: Some("Document_РасходнаяНакладная"),
                rows: "Запасы",
                store: "КассаККМ_Key",
                card: "ДисконтнаяКарта_Key",
                net: "Всего",
                discounts: ["СуммаСкидкиНаценки", "СуммаАвтоматическойСкидки"],
                points_paid: "СуммаСкидкиОплатыБонусом",
                cards: "Catalog_ДисконтныеКарты",
                card_number: "КодКартыШтрихкод",
                card_owner: "ВладелецКарты_Key",
                people: "Catalog_Контрагенты",
                people_other: None,
                programs: "Catalog_БонусныеПрограммы",
                prices: PRICES,
                price_type: "ВидЦен_Key",
                price_variant: "Характеристика_Key",
                bonus_holder: "БонуснаяКарта_Key",
                bonus_program: None,
                bonus_documents: "Document_НачислениеСписаниеБонусныхБаллов",
                bonus_document_program: "БонуснаяПрограмма_Key",
                accruals: "НачисленияБонусов",
                writeoffs: "СписанияБонусов",
                bonus_document_holder: "БонуснаяКарта_Key",
                bonus_document_points: "Количество",
                accrued_on: Some("ДатаНачисления"),
                expires_on: Some("ДатаСгорания"),
                burn_correction: Some("КорректировкаКСписанию"),
            },
            Configuration::Ut11 => Names {
                mapping: "ut11",
                receipts: RECEIPTS,
                returns: "Document_ЧекККМВозврат",
                invoices: None,
                rows: "Товары",
                store: "Склад_Key",
                card: "КартаЛояльности_Key",
                net: "Сумма",
                discounts: ["СуммаРучнойСкидки", "СуммаАвтоматическойСкидки"],
                points_paid: "СуммаБонусныхБалловКСписаниюВВалюте",
                cards: "Catalog_КартыЛояльности",
                card_number: "Штрихкод",
                card_owner: "Партнер_Key",
                people: "Catalog_Партнеры",
                people_other: None,
                programs: "Catalog_БонусныеПрограммыЛояльности",
                prices: "InformationRegister_ЦеныНоменклатуры25",
                price_type: "ВидЦены_Key",
                price_variant: "ХарактеристикаЦО_Key",
                bonus_holder: "Партнер_Key",
                bonus_program: Some("БонуснаяПрограммаЛояльности_Key"),
                bonus_documents: "Document_НачислениеИСписаниеБонусныхБаллов",
                bonus_document_program: "БонуснаяПрограммаЛояльности_Key",
                accruals: "Начисление",
                writeoffs: "Списание",
                bonus_document_holder: "Партнер_Key",
                bonus_document_points: "Баллы",
                accrued_on: None,
                expires_on: None,
                burn_correction: None,
            },
        }
    }
}

pub const RECEIPTS: &str = "Document_ЧекККМ";
/// Розница 2's later returns (the default configuration's).
pub const RETURNS: &str = "Document_ВозвратТоваровОтПокупателя";
pub const PRODUCTS: &str = "Catalog_Номенклатура";
pub const PRICE_TYPES: &str = "Catalog_ВидыЦен";
pub const PRICES: &str = "InformationRegister_ЦеныНоменклатуры";
/// Розница 2's cards (the default configuration's).
pub const CARDS: &str = "Catalog_ИнформационныеКарты";
pub const BONUS: &str = "AccumulationRegister_БонусныеБаллы";
/// The register's movements, one entity per record.
pub const BONUS_RECORDS: &str = "AccumulationRegister_БонусныеБаллы_RecordType";
/// The accounting document kopilka writes its daily postings to (БП 3.0's ОперацияБух with a
/// `Проводки` section an extension adds, as kopilka's mappings name it).
pub const ACCOUNTING_DOCUMENTS: &str = "Document_ОперацияБух";
pub const ORGANIZATIONS: &str = "Catalog_Организации";
/// The chart of the additional attributes' properties (БСП «Свойства»).
pub const PROPERTIES: &str = "ChartOfCharacteristicTypes_ДополнительныеРеквизитыИСведения";
/// The values of list properties.
pub const PROPERTY_VALUES: &str = "Catalog_ЗначенияСвойствОбъектов";
/// The people catalogs' tabular section of additional attributes.
pub const EXTRA: &str = "ДополнительныеРеквизиты";
pub const ACCOUNTS: &str = "ChartOfAccounts_Хозрасчетный";
/// The legal entity the simulated base has.
pub const ORGANIZATION: &str = "ООО «Ромашка»";
/// The accounts of the simulated chart (kopilka's default accounts).
pub const ACCOUNT_CODES: &[&str] = &["44.01", "96", "62.01", "91.01", "91.02"];
const EMPTY: &str = "00000000-0000-0000-0000-000000000000";
/// 1C's empty date.
const EMPTY_DATE: &str = "0001-01-01T00:00:00";

/// A set's shape for `$metadata`: properties (name, EDM type) and tabular sections.
struct SetSchema {
    set: &'static str,
    props: Vec<(&'static str, &'static str)>,
    sections: Vec<(&'static str, Vec<(&'static str, &'static str)>)>,
}

const G: &str = "Edm.Guid";
const S: &str = "Edm.String";
const B: &str = "Edm.Boolean";
const D: &str = "Edm.Double";
const T: &str = "Edm.DateTime";
const I: &str = "Edm.Int64";

type Props = Vec<(&'static str, &'static str)>;

/// The objects a configuration publishes, each with a subset of its attributes as the dump
/// has them (`Documents/ЧекККМ.xml` etc. of the repositories named in the module docs).
fn schema(conf: Configuration) -> Vec<SetSchema> {
    let n = conf.names();
    let with = |base: &[(&'static str, &'static str)], extra: &[(&'static str, &'static str)]| -> Props {
        let mut p = base.to_vec();
        p.extend_from_slice(extra);
        p
    };
    let doc: Props = vec![
        ("Ref_Key", G),
        ("DataVersion", S),
        ("DeletionMark", B),
        ("Number", S),
        ("Date", T),
        ("Posted", B),
        ("Комментарий", S),
    ];
    let catalog: Props = vec![
        ("Ref_Key", G),
        ("DataVersion", S),
        ("DeletionMark", B),
        ("Code", S),
        ("Description", S),
        ("Predefined", B),
    ];
    let line: Props = vec![
        ("LineNumber", I),
        ("Номенклатура_Key", G),
        ("Характеристика_Key", G),
        ("Количество", D),
        ("Цена", D),
        ("Сумма", D),
    ];
    let contacts = (
        "КонтактнаяИнформация",
        vec![("LineNumber", I), ("Тип", S), ("Представление", S)],
    );
    // БСП «Свойства»: the section every people catalog of the three dumps has
    // [Catalogs/Партнеры.xml (УТ 11), Catalogs/Контрагенты.xml (УНФ), Catalogs/ФизическиеЛица.xml
    // and Catalogs/Контрагенты.xml (Розница 2)]; Значение is of the characteristic's type, so
    // OData publishes it composite, with Значение_Type
    let extra = (
        "ДополнительныеРеквизиты",
        vec![
            ("LineNumber", I),
            ("Свойство_Key", G),
            ("Значение", S),
            ("Значение_Type", S),
            ("ТекстоваяСтрока", S),
        ],
    );
    let register: Props = vec![
        ("Period", T),
        ("Recorder", S),
        ("Recorder_Type", S),
        ("LineNumber", I),
        ("Active", B),
        ("RecordType", S),
    ];
    let mut out = match conf {
        // Documents/ЧекККМ.xml, Documents/ВозвратТоваровОтПокупателя.xml,
        // Catalogs/ИнформационныеКарты.xml, Catalogs/ФизическиеЛица.xml, Catalogs/Контрагенты.xml,
        // AccumulationRegisters/БонусныеБаллы.xml, Documents/НачислениеИСписаниеБонусныхБаллов.xml
        Configuration::Roznica2 => {
            let goods = with(
                &line,
                &[
                    ("СуммаРучнойСкидки", D),
                    ("СуммаАвтоматическойСкидки", D),
                    ("СуммаСкидкиОплатыБонусом", D),
                    ("Продавец_Key", G),
                ],
            );
            vec![
                SetSchema {
                    set: RECEIPTS,
                    props: with(
                        &doc,
                        &[
                            ("ВидОперации", S),
                            ("Магазин_Key", G),
                            ("КассаККМ_Key", G),
                            ("ДисконтнаяКарта_Key", G),
                            ("ВладелецДисконтнойКарты", S),
                            ("ВладелецДисконтнойКарты_Type", S),
                            ("Контрагент_Key", G),
                            ("ЧекККМПродажа_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Товары", goods.clone())],
                },
                SetSchema {
                    set: n.returns,
                    props: with(
                        &doc,
                        &[
                            ("Магазин_Key", G),
                            ("ДисконтнаяКарта_Key", G),
                            ("ВладелецДисконтнойКарты", S),
                            ("ВладелецДисконтнойКарты_Type", S),
                            ("Контрагент_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![(
                        "Товары",
                        with(
                            &goods,
                            &[
                                ("ЧекККМ_Key", G),
                                ("ДокументПродажи", S),
                                ("ДокументПродажи_Type", S),
                            ],
                        ),
                    )],
                },
                SetSchema {
                    set: n.cards,
                    props: with(
                        &catalog,
                        &[
                            ("КодКарты", S),
                            ("ВладелецКарты", S),
                            ("ВладелецКарты_Type", S),
                            ("ВидКарты", S),
                            ("БонуснаяПрограммаЛояльности_Key", G),
                        ],
                    ),
                    sections: vec![],
                },
                SetSchema {
                    set: n.people,
                    // S5: ДатаРождения [Catalogs/ФизическиеЛица.xml, Контрагенты.xml (УНФ), Партнеры.xml]
                    props: with(&catalog, &[("ДатаРождения", T)]),
                    sections: vec![contacts.clone(), extra.clone()],
                },
                SetSchema {
                    set: "Catalog_Контрагенты",
                    props: catalog.clone(),
                    sections: vec![contacts.clone(), extra.clone()],
                },
                SetSchema {
                    set: n.bonus_documents,
                    props: with(
                        &doc,
                        &[
                            ("БонуснаяПрограммаЛояльности_Key", G),
                            ("ПериодДействия", S),
                            ("ДатаОкончанияСрокаДействия", T),
                        ],
                    ),
                    sections: vec![
                        (
                            "Начисление",
                            vec![("LineNumber", I), ("ДисконтнаяКарта_Key", G), ("Баллы", D)],
                        ),
                        (
                            "Списание",
                            vec![
                                ("LineNumber", I),
                                ("ДисконтнаяКарта_Key", G),
                                ("Баллы", D),
                                ("БаллыКСписанию", D),
                            ],
                        ),
                    ],
                },
            ]
        }
        // Documents/ЧекККМ.xml, Documents/ЧекККМВозврат.xml, Documents/РасходнаяНакладная.xml,
        // Catalogs/ДисконтныеКарты.xml, Catalogs/Контрагенты.xml, Catalogs/БонусныеПрограммы.xml,
        // AccumulationRegisters/БонусныеБаллы.xml, Documents/НачислениеСписаниеБонусныхБаллов.xml
        Configuration::Unf => {
            let stock = with(
                &line,
                &[
                    ("СуммаСкидкиНаценки", D),
                    ("СуммаНДС", D),
                    ("Всего", D),
                    ("СуммаАвтоматическойСкидки", D),
                    ("СуммаСкидкиОплатыБонусом", D),
                ],
            );
            let head = with(
                &doc,
                &[
                    ("КассаККМ_Key", G),
                    ("ДисконтнаяКарта_Key", G),
                    ("Контрагент_Key", G),
                    ("СуммаДокумента", D),
                ],
            );
            vec![
                SetSchema {
                    set: RECEIPTS,
                    props: head.clone(),
                    sections: vec![("Запасы", stock.clone())],
                },
                SetSchema {
                    set: n.returns,
                    props: with(&head, &[("ЧекККМ_Key", G)]),
                    sections: vec![(
                        "Запасы",
                        with(
                            &stock,
                            &[
                                ("СуммаСкидкиОплатыБонусомЧекаПродажи", D),
                                ("СуммаАвтоматическойСкидкиЧекаПродажи", D),
                            ],
                        ),
                    )],
                },
                SetSchema {
                    set: "Document_РасходнаяНакладная",
                    props: with(
                        &doc,
                        &[
                            ("ВидОперации", S),
                            ("ДисконтнаяКарта_Key", G),
                            ("Контрагент_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Запасы", stock)],
                },
                SetSchema {
                    set: n.cards,
                    props: with(
                        &catalog,
                        &[
                            ("КодКартыШтрихкод", S),
                            ("КодКартыМагнитный", S),
                            ("ВладелецКарты_Key", G),
                        ],
                    ),
                    sections: vec![],
                },
                SetSchema {
                    set: n.people,
                    // S5: ДатаРождения [Catalogs/ФизическиеЛица.xml, Контрагенты.xml (УНФ), Партнеры.xml]
                    props: with(&catalog, &[("ДатаРождения", T)]),
                    sections: vec![contacts.clone(), extra.clone()],
                },
                SetSchema {
                    set: n.bonus_documents,
                    props: with(&doc, &[("БонуснаяПрограмма_Key", G)]),
                    sections: vec![
                        (
                            "НачисленияБонусов",
                            vec![
                                ("LineNumber", I),
                                ("БонуснаяКарта_Key", G),
                                ("Количество", D),
                                ("ДатаНачисления", T),
                                ("ДатаСгорания", T),
                            ],
                        ),
                        (
                            "СписанияБонусов",
                            vec![
                                ("LineNumber", I),
                                ("БонуснаяКарта_Key", G),
                                ("Количество", D),
                                ("КорректировкаКСписанию", D),
                            ],
                        ),
                    ],
                },
            ]
        }
        // Documents/ЧекККМ.xml, Documents/ЧекККМВозврат.xml, Documents/РеализацияТоваровУслуг.xml,
        // Documents/ВозвратТоваровОтКлиента.xml, Catalogs/КартыЛояльности.xml, Catalogs/Партнеры.xml,
        // InformationRegisters/ЦеныНоменклатуры25.xml, AccumulationRegisters/БонусныеБаллы.xml,
        // Documents/НачислениеИСписаниеБонусныхБаллов.xml
        Configuration::Ut11 => {
            let goods = with(
                &line,
                &[
                    ("СуммаНДС", D),
                    ("СуммаАвтоматическойСкидки", D),
                    ("СуммаРучнойСкидки", D),
                    ("СуммаБонусныхБалловКСписанию", D),
                    ("СуммаБонусныхБалловКСписаниюВВалюте", D),
                ],
            );
            let invoice_goods = vec![
                ("LineNumber", I),
                ("Номенклатура_Key", G),
                ("Характеристика_Key", G),
                ("Количество", D),
                ("Цена", D),
                ("Сумма", D),
                ("СуммаСНДС", D),
                ("СуммаРучнойСкидки", D),
                ("СуммаАвтоматическойСкидки", D),
            ];
            vec![
                SetSchema {
                    set: RECEIPTS,
                    props: with(
                        &doc,
                        &[
                            ("КассаККМ_Key", G),
                            ("Склад_Key", G),
                            ("КартаЛояльности_Key", G),
                            ("Партнер_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Товары", goods)],
                },
                SetSchema {
                    set: n.returns,
                    props: with(
                        &doc,
                        &[
                            ("КассаККМ_Key", G),
                            ("Склад_Key", G),
                            ("ЧекККМ_Key", G),
                            ("Партнер_Key", G),
                            ("КартаЛояльности_Key", G),
                            ("СуммаБонусныхБалловКВозврату", D),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Товары", with(&line, &[("СуммаНДС", D)]))],
                },
                SetSchema {
                    set: "Document_РеализацияТоваровУслуг",
                    props: with(
                        &doc,
                        &[
                            ("Партнер_Key", G),
                            ("КартаЛояльности_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Товары", invoice_goods.clone())],
                },
                SetSchema {
                    set: "Document_ВозвратТоваровОтКлиента",
                    props: with(
                        &doc,
                        &[
                            ("Партнер_Key", G),
                            ("ДокументРеализации", S),
                            ("ДокументРеализации_Type", S),
                            ("ЧекККМ_Key", G),
                            ("СуммаДокумента", D),
                        ],
                    ),
                    sections: vec![("Товары", invoice_goods)],
                },
                SetSchema {
                    set: n.cards,
                    props: with(
                        &catalog,
                        &[
                            ("Штрихкод", S),
                            ("МагнитныйКод", S),
                            ("Партнер_Key", G),
                            ("Контрагент_Key", G),
                        ],
                    ),
                    sections: vec![],
                },
                SetSchema {
                    set: n.people,
                    // S5: ДатаРождения [Catalogs/ФизическиеЛица.xml, Контрагенты.xml (УНФ), Партнеры.xml]
                    props: with(&catalog, &[("ДатаРождения", T)]),
                    sections: vec![contacts.clone(), extra.clone()],
                },
                SetSchema {
                    set: n.bonus_documents,
                    props: with(
                        &doc,
                        &[
                            ("БонуснаяПрограммаЛояльности_Key", G),
                            ("ПериодДействия", S),
                            ("ДатаОкончанияСрокаДействия", T),
                        ],
                    ),
                    sections: vec![
                        (
                            "Начисление",
                            vec![("LineNumber", I), ("Партнер_Key", G), ("Баллы", D)],
                        ),
                        (
                            "Списание",
                            vec![("LineNumber", I), ("Партнер_Key", G), ("Баллы", D)],
                        ),
                    ],
                },
            ]
        }
    };
    let mut bonus = register.clone();
    bonus.push((n.bonus_holder, G));
    bonus.extend(n.bonus_program.map(|p| (p, G)));
    bonus.extend([("Начислено", D), ("КСписанию", D)]);
    out.extend([
        SetSchema {
            set: PRODUCTS,
            props: with(
                &catalog,
                &[
                    ("Parent_Key", G),
                    ("IsFolder", B),
                    ("Артикул", S),
                    ("ТипНоменклатуры", S),
                ],
            ),
            sections: vec![],
        },
        SetSchema {
            set: PRICE_TYPES,
            props: catalog.clone(),
            sections: vec![],
        },
        SetSchema {
            set: n.prices,
            props: vec![
                ("Period", T),
                ("Номенклатура_Key", G),
                (n.price_variant, G),
                (n.price_type, G),
                ("Цена", D),
            ],
            sections: vec![],
        },
        SetSchema {
            set: n.programs,
            props: catalog.clone(),
            sections: vec![],
        },
        SetSchema {
            set: BONUS,
            props: bonus.clone(),
            sections: vec![],
        },
        SetSchema {
            set: BONUS_RECORDS,
            props: bonus,
            sections: vec![],
        },
        SetSchema {
            set: ACCOUNTING_DOCUMENTS,
            props: vec![
                ("Ref_Key", G),
                ("DataVersion", S),
                ("DeletionMark", B),
                ("Number", S),
                ("Date", T),
                ("Posted", B),
                ("Организация_Key", G),
                ("СуммаОперации", D),
                ("Содержание", S),
                ("Комментарий", S),
            ],
            sections: vec![(
                "Проводки",
                vec![
                    ("LineNumber", I),
                    ("СчетДт_Key", G),
                    ("СчетКт_Key", G),
                    ("Сумма", D),
                    ("Содержание", S),
                ],
            )],
        },
        SetSchema {
            set: ORGANIZATIONS,
            props: catalog.clone(),
            sections: vec![],
        },
        // [ChartsOfCharacteristicTypes/ДополнительныеРеквизитыИСведения.xml], the same in the
        // three dumps: no code (CodeLength 0), the title a form shows in Заголовок, the
        // programmatic name in Имя
        SetSchema {
            set: PROPERTIES,
            props: vec![
                ("Ref_Key", G),
                ("DataVersion", S),
                ("DeletionMark", B),
                ("Description", S),
                ("Predefined", B),
                ("Заголовок", S),
                ("Имя", S),
                ("ЭтоДополнительноеСведение", B),
                ("НаборСвойств_Key", G),
            ],
            sections: vec![],
        },
        // [Catalogs/ЗначенияСвойствОбъектов.xml]: the values of a list property, owned by it
        SetSchema {
            set: PROPERTY_VALUES,
            props: with(&catalog, &[("Owner_Key", G), ("Parent_Key", G), ("IsFolder", B)]),
            sections: vec![],
        },
        SetSchema {
            set: ACCOUNTS,
            props: catalog,
            sections: vec![],
        },
    ]);
    out
}

/// A stable GUID for a simulated object.
pub fn guid(kind: &str, id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("kopilka-sim:{kind}:{id}").as_bytes(),
    )
    .to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim().bytes() {
        if c == b'=' {
            break;
        }
        let v = B64.iter().position(|x| *x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Naive local wall-clock time → an instant (the earlier one when ambiguous).
fn instant(t: NaiveDateTime, tz: Tz) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    tz.from_local_datetime(&t)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(t + ChronoDuration::hours(1))).earliest())
        .map_or_else(|| t.and_utc(), |x| x.with_timezone(&chrono::Utc))
}

fn local_text(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Builds a simulator: a seeded synthetic shop's history as a base of one configuration.
#[derive(Clone, Debug)]
pub struct OdataSimBuilder {
    seed: u64,
    products: usize,
    customers: usize,
    sales: usize,
    lines: usize,
    /// Out of 100 sales, how many get a return.
    returns_percent: u8,
    user: String,
    password: String,
    publication: String,
    timezone: Tz,
    point_value: Money,
    start: Option<chrono::DateTime<chrono::Utc>>,
    spacing_minutes: i64,
    configuration: Configuration,
}

impl OdataSimBuilder {
    pub fn new(seed: u64) -> OdataSimBuilder {
        OdataSimBuilder {
            seed,
            products: 200,
            customers: 100,
            sales: 1_000,
            lines: 3,
            returns_percent: 3,
            user: "kopilka".into(),
            password: "секрет-1".into(),
            publication: "shop".into(),
            timezone: chrono_tz::Europe::Moscow,
            point_value: Money(100),
            start: None,
            spacing_minutes: 7,
            configuration: Configuration::default(),
        }
    }

    /// Which configuration the base is (Розница 2 by default).
    pub fn configuration(mut self, c: Configuration) -> Self {
        self.configuration = c;
        self
    }

    /// Minutes between consecutive generated sales (default 7).
    pub fn spacing_minutes(mut self, m: i64) -> Self {
        self.spacing_minutes = m.max(1);
        self
    }

    /// When the shop's history begins; the default is a fixed date so that seeded runs
    /// repeat exactly. The demo starts it a few weeks back so the pages show recent sales.
    pub fn starting_at(mut self, at: chrono::DateTime<chrono::Utc>) -> Self {
        self.start = Some(at);
        self
    }

    pub fn sales(mut self, n: usize) -> Self {
        self.sales = n;
        self
    }

    pub fn products(mut self, n: usize) -> Self {
        self.products = n.max(1);
        self
    }

    pub fn customers(mut self, n: usize) -> Self {
        self.customers = n.max(1);
        self
    }

    pub fn lines(mut self, n: usize) -> Self {
        self.lines = n.max(1);
        self
    }

    pub fn returns_percent(mut self, p: u8) -> Self {
        self.returns_percent = p.min(100);
        self
    }

    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.user = user.into();
        self.password = password.into();
        self
    }

    /// What one point is worth when a customer pays with points (the 1C program's rate).
    pub fn point_value(mut self, m: Money) -> Self {
        self.point_value = m;
        self
    }

    /// Generates the data and serves it on `127.0.0.1:0` from the current tokio runtime.
    pub async fn start(self) -> std::io::Result<OdataSim> {
        let state = Arc::new(Mutex::new(Base::generate(&self)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback(handle).with_state(Served {
            base: state.clone(),
            publication: self.publication.clone(),
            addr,
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "1C OData simulator stopped");
            }
        });
        Ok(OdataSim {
            base: state,
            addr,
            publication: self.publication,
            user: self.user,
            password: self.password,
            _shutdown: tx,
        })
    }
}

/// One movement of the bonus register.
#[derive(Clone, Debug)]
struct Movement {
    period: NaiveDateTime,
    recorder: String,
    receipt: bool,
    holder: String,
    accrued: Decimal,
    to_burn: Decimal,
}

/// The simulated base's state.
struct Base {
    conf: Configuration,
    sets: BTreeMap<String, BTreeMap<String, Entity>>,
    /// The register's movements before the shop's history (1C's own program): accruals,
    /// deferred ones, burn dates, burns.
    opening: Vec<Movement>,
    /// The bonus program's key.
    program: String,
    hidden_sets: HashSet<String>,
    hidden_props: HashSet<(String, String)>,
    faults: Vec<Fault>,
    log: Vec<LoggedRequest>,
    versions: u64,
    rng: fastrand::Rng,
    shop: Shop,
    next_doc: usize,
    /// Units returned so far per sale's first line: 1C refuses a return of more than was
    /// sold (its return is filled from the sale, less what earlier returns took).
    returned: BTreeMap<String, Decimal>,
    last_date: NaiveDateTime,
    tz: Tz,
    user: String,
    password: String,
    point_value: Money,
    lines: usize,
    spacing: ChronoDuration,
    /// Why every `Post` action is refused, while scripted.
    refuse_posting: Option<String>,
    /// Documents created by POST, for their numbers.
    created: u64,
    /// Objects changed by PATCH.
    patched: u64,
    /// POST ignores the client's `Ref_Key` and assigns its own (a configuration that does
    /// not keep client keys: open in the spec).
    own_keys: bool,
}

fn row_text<'a>(row: &'a [(String, Val)], field: &str) -> &'a str {
    row.iter()
        .find(|(n, _)| n == field)
        .and_then(|(_, v)| v.as_text())
        .unwrap_or("")
}

fn row_dec(row: &[(String, Val)], field: &str) -> Decimal {
    Decimal::from_str(row_text(row, field)).unwrap_or_default()
}

fn kopecks(d: Decimal) -> i64 {
    Money::from_rubles(d).map_or(0, |m| m.0)
}

fn parse_local(t: &str) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S").ok()
}

impl Base {
    fn names(&self) -> Names {
        self.conf.names()
    }

    fn data_version(&mut self) -> Val {
        self.versions += 1;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&(self.versions as u32).to_be_bytes());
        Val::Str(base64(&bytes))
    }

    fn put(&mut self, set: &str, e: Entity) {
        self.sets
            .entry(set.to_string())
            .or_default()
            .insert(e.key.clone(), e);
    }

    fn catalog_item(&mut self, key: &str, code: &str, name: &str) -> Entity {
        let dv = self.data_version();
        Entity::new(key.to_string())
            .with("Ref_Key", Val::str(key))
            .with("DataVersion", dv)
            .with("DeletionMark", Val::Bool(false))
            .with("Code", Val::str(code))
            .with("Description", Val::str(name))
            .with("Predefined", Val::Bool(false))
    }

    /// The customer's 1C key and the catalog it is in (Розница 2: every fourth one is a
    /// counterparty, the rest natural persons).
    fn person(&self, i: usize) -> (String, &'static str) {
        let n = self.names();
        match n.people_other {
            Some(other) if i % 4 == 3 => (guid("counterparty", &i.to_string()), other),
            _ => (guid("partner", &i.to_string()), n.people),
        }
    }

    /// Whose points a customer's register rows are: the card (Розница 2, УНФ) or the partner.
    fn holder_of(&self, i: usize) -> String {
        match self.conf {
            Configuration::Ut11 => self.person(i).0,
            _ => guid("card", &i.to_string()),
        }
    }

    fn generate(b: &OdataSimBuilder) -> Base {
        let mut shop = Shop::generate(b.seed, b.products, b.customers);
        if let Some(at) = b.start {
            shop.start = at;
        }
        let start_local = shop.start.with_timezone(&b.timezone).naive_local();
        let mut base = Base {
            conf: b.configuration,
            sets: BTreeMap::new(),
            opening: Vec::new(),
            program: guid("program", "Бонусы"),
            hidden_sets: HashSet::new(),
            hidden_props: HashSet::new(),
            faults: Vec::new(),
            log: Vec::new(),
            versions: 0,
            rng: fastrand::Rng::with_seed(b.seed ^ 0x0da7a),
            shop: shop.clone(),
            next_doc: 0,
            returned: BTreeMap::new(),
            last_date: start_local,
            tz: b.timezone,
            user: b.user.clone(),
            password: b.password.clone(),
            point_value: b.point_value,
            lines: b.lines,
            spacing: ChronoDuration::minutes(b.spacing_minutes),
            refuse_posting: None,
            created: 0,
            patched: 0,
            own_keys: false,
        };
        let n = base.names();
        for s in schema(base.conf) {
            if s.set != BONUS && s.set != BONUS_RECORDS {
                base.sets.entry(s.set.to_string()).or_default();
            }
        }
        // catalog: a folder per category, products under them, two price types and prices
        let mut groups: BTreeMap<String, String> = BTreeMap::new();
        for p in &shop.products {
            let group = groups
                .entry(p.category.clone())
                .or_insert_with(|| guid("group", &p.category))
                .clone();
            let key = guid("product", &p.id);
            let e = base
                .catalog_item(&key, &p.id, &p.name)
                .with("Parent_Key", Val::str(group))
                .with("IsFolder", Val::Bool(false))
                .with("Артикул", Val::str(&p.id))
                .with("ТипНоменклатуры", Val::str("Товар"));
            base.put(PRODUCTS, e);
        }
        for (name, key) in &groups {
            let e = base
                .catalog_item(key, name, name)
                .with("Parent_Key", Val::str(EMPTY))
                .with("IsFolder", Val::Bool(true))
                .with("Артикул", Val::str(""))
                .with("ТипНоменклатуры", Val::str(""));
            base.put(PRODUCTS, e);
        }
        for name in ["Розничная", "Закупочная"] {
            let e = base.catalog_item(&guid("price-type", name), name, name);
            base.put(PRICE_TYPES, e);
        }
        let period = local_text(start_local - ChronoDuration::days(30));
        for (i, p) in shop.products.iter().enumerate() {
            for (ty, price) in [("Розничная", p.price), ("Закупочная", p.cost)] {
                let e = Entity::new(format!("price:{i:06}:{ty}"))
                    .with("Period", Val::str(&period))
                    .with("Номенклатура_Key", Val::str(guid("product", &p.id)))
                    .with(n.price_variant, Val::str(EMPTY))
                    .with(n.price_type, Val::str(guid("price-type", ty)))
                    .with("Цена", Val::money(price));
                base.put(n.prices, e);
            }
        }
        // the legal entity and the accounts postings name
        let org = guid("organization", ORGANIZATION);
        let e = base.catalog_item(&org, "000000001", ORGANIZATION);
        base.put(ORGANIZATIONS, e);
        for code in ACCOUNT_CODES {
            let mut e = base.catalog_item(&guid("account", code), code, &format!("Счет {code}"));
            e.set("Predefined", Val::Bool(true));
            base.put(ACCOUNTS, e);
        }
        let program = base.program.clone();
        let e = base.catalog_item(&program, "000000001", "Бонусы");
        base.put(n.programs, e);
        // customers: a person with contact information and a card each, and the points 1C's
        // own program gave them before the history starts
        for (i, c) in shop.customers.iter().enumerate() {
            let (person, people_set) = base.person(i);
            let mut contacts = Vec::new();
            if let Some(p) = &c.phone {
                // as a person types it
                let d = p.as_str().trim_start_matches("+7");
                let shown = if d.len() == 10 {
                    format!("8 ({}) {}-{}-{}", &d[..3], &d[3..6], &d[6..8], &d[8..])
                } else {
                    p.as_str().to_string()
                };
                contacts.push(vec![
                    ("LineNumber".to_string(), Val::str("1")),
                    ("Тип".to_string(), Val::str("Телефон")),
                    ("Представление".to_string(), Val::str(shown)),
                ]);
            }
            if let Some(e) = &c.email {
                contacts.push(vec![
                    (
                        "LineNumber".to_string(),
                        Val::str((contacts.len() + 1).to_string()),
                    ),
                    ("Тип".to_string(), Val::str("АдресЭлектроннойПочты")),
                    ("Представление".to_string(), Val::str(e.as_str().to_uppercase())),
                ]);
            }
            let mut e = base
                .catalog_item(&person, &format!("{i:09}"), &c.name.clone().unwrap_or_default())
                .with("КонтактнаяИнформация", Val::Rows(contacts))
                .with(EXTRA, Val::Rows(Vec::new()));
            // a birth date where the catalog has one (Розница 2's counterparties do not)
            if people_set == n.people
                && let Some(b) = OdataSim::birthday_of(i)
            {
                e = e.with(
                    "ДатаРождения",
                    Val::str(format!("{}T00:00:00", b.format("%Y-%m-%d"))),
                );
            }
            base.put(people_set, e);
            let card = guid("card", &i.to_string());
            let number = c.card.clone().unwrap_or_default();
            let mut e = base.catalog_item(&card, &format!("{i:09}"), &number);
            match base.conf {
                Configuration::Roznica2 => {
                    e.set("КодКарты", Val::str(&number));
                    e.set("ВладелецКарты", Val::str(&person));
                    e.set(
                        "ВладелецКарты_Type",
                        Val::str(format!("StandardODATA.{people_set}")),
                    );
                    e.set("ВидКарты", Val::str("Смешанная"));
                    e.set("БонуснаяПрограммаЛояльности_Key", Val::str(&program));
                }
                Configuration::Unf => {
                    e.set("КодКартыШтрихкод", Val::str(&number));
                    e.set("КодКартыМагнитный", Val::str(""));
                    e.set("ВладелецКарты_Key", Val::str(&person));
                }
                Configuration::Ut11 => {
                    e.set("Штрихкод", Val::str(&number));
                    e.set("МагнитныйКод", Val::str(""));
                    e.set("Партнер_Key", Val::str(&person));
                    e.set("Контрагент_Key", Val::str(EMPTY));
                }
            }
            base.put(n.cards, e);
            base.opening_points(i, start_local);
        }
        // the history
        let mut sales: Vec<String> = Vec::new();
        for _ in 0..b.sales {
            let key = base.new_sale(None);
            let make_return = base.rng.u8(0..100) < b.returns_percent && sales.len() > 3;
            let earlier = make_return.then(|| sales[base.rng.usize(0..sales.len())].clone());
            sales.push(key);
            if let Some(s) = earlier {
                let at_till = base.rng.u8(0..3) == 0;
                let date = base.last_date + ChronoDuration::minutes(1);
                base.last_date = date;
                base.new_return(&s, at_till, date);
            }
        }
        // УНФ: invoices, one in ten of them a return to a supplier (no sale)
        if base.conf == Configuration::Unf {
            for k in 0..(b.sales / 20) {
                let op = if k % 10 == 9 {
                    "ВозвратПоставщику"
                } else {
                    "ПродажаПокупателю"
                };
                base.new_invoice(op);
            }
        }
        base
    }

    /// 1C's own points of customer `i` before the history: a plain accrual; for some an
    /// accrual past its burn date not yet burnt, one burning in a year, one not yet active
    /// (deferred), one burnt already.
    fn opening_points(&mut self, i: usize, start: NaiveDateTime) {
        let holder = self.holder_of(i);
        let rec = format!("opening:{i}");
        let day = |d: i64| start + ChronoDuration::days(d);
        let push = |period: NaiveDateTime,
                    receipt: bool,
                    accrued: i64,
                    to_burn: i64,
                    opening: &mut Vec<Movement>| {
            opening.push(Movement {
                period,
                recorder: rec.clone(),
                receipt,
                holder: holder.clone(),
                accrued: Decimal::from(accrued),
                to_burn: Decimal::from(to_burn),
            });
        };
        let mut v = Vec::new();
        let plain = self.rng.i64(0..5_000);
        push(day(-60), true, plain, 0, &mut v);
        match i % 4 {
            0 => {
                let p = self.rng.i64(10..500);
                push(day(-40), true, p, 0, &mut v);
                push(day(-5), true, 0, p, &mut v); // past its burn date, not burnt yet
            }
            1 => {
                let p = self.rng.i64(10..500);
                push(day(-20), true, p, 0, &mut v);
                push(day(365), true, 0, p, &mut v); // burns in a year
            }
            2 => {
                let p = self.rng.i64(10..300);
                push(day(500), true, p, 0, &mut v); // deferred: active only later
            }
            _ => {
                let p = self.rng.i64(10..300);
                push(day(-90), true, p, 0, &mut v);
                push(day(-40), true, 0, p, &mut v);
                push(day(-40), false, p, p, &mut v); // 1C's burn ran
            }
        }
        self.opening.extend(v);
    }

    fn customer_index(&self, d: &Document) -> Option<usize> {
        let card = d.customer.card.as_ref()?;
        self.shop
            .customers
            .iter()
            .position(|c| c.card.as_ref() == Some(card))
    }

    /// A goods line as the configuration writes it: `price` is the unit price and the line's
    /// discount, `net` the line before points, `bonus` the part of it paid with points
    /// (kopecks).
    fn row(
        &self,
        i: usize,
        product: &str,
        qty: &str,
        (price, discount): (Money, Money),
        net: i64,
        bonus: i64,
    ) -> Vec<(String, Val)> {
        let mut r = vec![
            ("LineNumber".to_string(), Val::str((i + 1).to_string())),
            ("Номенклатура_Key".to_string(), Val::str(product)),
            ("Характеристика_Key".to_string(), Val::str(EMPTY)),
            ("Количество".to_string(), Val::Num(qty.to_string())),
            ("Цена".to_string(), Val::money(price)),
            ("Сумма".to_string(), Val::money(Money(net - bonus))),
        ];
        let mut add = |f: &str, v: Val| r.push((f.to_string(), v));
        match self.conf {
            Configuration::Roznica2 => {
                add("СуммаРучнойСкидки", Val::money(discount));
                add("СуммаАвтоматическойСкидки", Val::Num("0".into()));
                add("СуммаСкидкиОплатыБонусом", Val::money(Money(bonus)));
                add("Продавец_Key", Val::str(EMPTY));
            }
            Configuration::Unf => {
                add("СуммаСкидкиНаценки", Val::money(discount));
                add("СуммаАвтоматическойСкидки", Val::Num("0".into()));
                add("СуммаСкидкиОплатыБонусом", Val::money(Money(bonus)));
                // prices include VAT (СуммаВключаетНДС): Всего = Сумма
                add("СуммаНДС", Val::Num("0".into()));
                add("Всего", Val::money(Money(net - bonus)));
            }
            Configuration::Ut11 => {
                add("СуммаНДС", Val::Num("0".into()));
                add("СуммаАвтоматическойСкидки", Val::Num("0".into()));
                add("СуммаРучнойСкидки", Val::money(discount));
                let points = bonus / self.point_value.0.max(1);
                add("СуммаБонусныхБалловКСписанию", Val::Num(points.to_string()));
                add("СуммаБонусныхБалловКСписаниюВВалюте", Val::money(Money(bonus)));
            }
        }
        r
    }

    /// The header fields naming the customer's card and the customer.
    fn customer_fields(&self, i: Option<usize>) -> Vec<(&'static str, Val)> {
        let card = i.map_or_else(|| EMPTY.to_string(), |i| guid("card", &i.to_string()));
        let (person, set) = i.map_or((EMPTY.to_string(), ""), |i| self.person(i));
        match self.conf {
            Configuration::Roznica2 => vec![
                ("ДисконтнаяКарта_Key", Val::str(card)),
                ("ВладелецДисконтнойКарты", Val::str(&person)),
                (
                    "ВладелецДисконтнойКарты_Type",
                    Val::str(if set.is_empty() {
                        String::new()
                    } else {
                        format!("StandardODATA.{set}")
                    }),
                ),
                ("Контрагент_Key", Val::str(EMPTY)),
            ],
            Configuration::Unf => vec![
                ("ДисконтнаяКарта_Key", Val::str(card)),
                ("Контрагент_Key", Val::str(person)),
            ],
            Configuration::Ut11 => vec![
                ("КартаЛояльности_Key", Val::str(card)),
                ("Партнер_Key", Val::str(person)),
            ],
        }
    }

    fn head(&mut self, key: &str, number: &str, date: NaiveDateTime, total: i64) -> Entity {
        let dv = self.data_version();
        Entity::new(key.to_string())
            .with("Ref_Key", Val::str(key))
            .with("DataVersion", dv)
            .with("DeletionMark", Val::Bool(false))
            .with("Number", Val::str(number))
            .with("Date", Val::str(local_text(date)))
            .with("Posted", Val::Bool(true))
            .with("Комментарий", Val::str(""))
            .with("СуммаДокумента", Val::money(Money(total)))
    }

    /// A new posted sale dated `at` (local) or one spacing after the latest document;
    /// returns its key.
    fn new_sale(&mut self, at: Option<NaiveDateTime>) -> String {
        let n = self.next_doc;
        self.next_doc += 1;
        let customer = (self.rng.u8(0..10) != 0).then(|| self.rng.usize(0..self.shop.customers.len()));
        let redeem = if customer.is_some() && self.rng.u8(0..8) == 0 {
            self.rng.i64(1..30)
        } else {
            0
        };
        let mut rng = fastrand::Rng::with_seed(self.rng.u64(..));
        let mut d = self.shop.sale(&mut rng, n, self.lines, customer, redeem);
        let date = at.unwrap_or(self.last_date + self.spacing);
        if at.is_none() {
            self.last_date = date;
        }
        d.occurred_at = instant(date, self.tz);
        let key = guid("doc", &d.source.doc_id);
        let (rows, total) = self.sale_rows(&d);
        let names = self.names();
        let mut e = self.head(&key, &d.number.clone().unwrap_or_default(), date, total);
        for (f, v) in self.customer_fields(self.customer_index(&d)) {
            e.set(f, v);
        }
        match self.conf {
            Configuration::Roznica2 => {
                e.set("ВидОперации", Val::str("Продажа"));
                e.set("Магазин_Key", Val::str(guid("store", "Тверская")));
                e.set("КассаККМ_Key", Val::str(guid("till", "1")));
                e.set("ЧекККМПродажа_Key", Val::str(EMPTY));
            }
            Configuration::Unf => e.set("КассаККМ_Key", Val::str(guid("till", "1"))),
            Configuration::Ut11 => {
                e.set("КассаККМ_Key", Val::str(guid("till", "1")));
                e.set("Склад_Key", Val::str(guid("store", "Тверская")));
            }
        }
        e.set(names.rows, Val::Rows(rows));
        self.put(RECEIPTS, e);
        key
    }

    /// The rows of a sale, points paid spread over the lines in order; and the total paid in
    /// money.
    fn sale_rows(&self, d: &Document) -> (Vec<Vec<(String, Val)>>, i64) {
        let mut left = if d.kind == DocKind::Sale {
            d.points_redeemed.0 * self.point_value.0
        } else {
            0
        };
        let mut rows = Vec::with_capacity(d.lines.len());
        let mut total = 0i64;
        for (i, l) in d.lines.iter().enumerate() {
            let bonus = left.min(l.net.0);
            left -= bonus;
            total += l.net.0 - bonus;
            rows.push(self.row(
                i,
                &guid("product", &l.product_id),
                &l.quantity.normalize().to_string(),
                (l.unit_price, l.discount),
                l.net.0,
                bonus,
            ));
        }
        (rows, total)
    }

    /// An invoice of УНФ with the given operation kind.
    fn new_invoice(&mut self, operation: &str) -> String {
        let n = self.next_doc;
        self.next_doc += 1;
        let customer = Some(self.rng.usize(0..self.shop.customers.len()));
        let mut rng = fastrand::Rng::with_seed(self.rng.u64(..));
        let d = self.shop.sale(&mut rng, n, self.lines, customer, 0);
        let date = self.last_date + self.spacing;
        self.last_date = date;
        let key = guid("doc", &format!("invoice-{n}"));
        let (rows, total) = self.sale_rows(&d);
        let mut e = self.head(&key, &format!("РН-{n:08}"), date, total);
        for (f, v) in self.customer_fields(self.customer_index(&d)) {
            e.set(f, v);
        }
        e.set("ВидОперации", Val::str(operation));
        e.set("Запасы", Val::Rows(rows));
        self.put("Document_РасходнаяНакладная", e);
        key
    }

    /// A return of one unit of the sale's first line (УТ 11: of its first line paid in money
    /// only), dated `date`: at the till (Розница 2: a ЧекККМ with ВидОперации = Возврат) or
    /// later (Розница 2: ВозвратТоваровОтПокупателя naming the sale per line; УНФ, УТ 11:
    /// ЧекККМВозврат). The line carries its share of the points paid on it. Returns its key;
    /// none when the line was returned in full already (1C fills a return from the sale less
    /// what earlier returns took, so it cannot return more than was sold).
    fn new_return(&mut self, sale_key: &str, at_till: bool, date: NaiveDateTime) -> Option<String> {
        let names = self.names();
        let sale = self.sets.get(RECEIPTS)?.get(sale_key)?.clone();
        let Some(Val::Rows(rows)) = sale.get(names.rows) else {
            return None;
        };
        let points_field = names.points_paid;
        // УТ 11: how its ЧекККМВозврат gives points back is OPEN, so only sales paid in money
        // are returned there
        if self.conf == Configuration::Ut11 && rows.iter().any(|r| !row_dec(r, points_field).is_zero()) {
            return None;
        }
        let first = rows.first()?.clone();
        let qty = row_dec(&first, "Количество").max(Decimal::ONE);
        let returned = self.returned.entry(sale_key.to_string()).or_default();
        if *returned >= qty {
            return None;
        }
        *returned += Decimal::ONE;
        let unit = |f: &str| kopecks(row_dec(&first, f)) / i64::try_from(qty).unwrap_or(1).max(1);
        let paid = unit(names.net); // money paid for one unit
        let bonus = unit(points_field);
        let discount = unit(names.discounts[0]);
        let n = self.next_doc;
        self.next_doc += 1;
        let key = guid("doc", &format!("R{n:08}"));
        let mut row = self.row(
            0,
            row_text(&first, "Номенклатура_Key"),
            "1",
            (Money(kopecks(row_dec(&first, "Цена"))), Money(discount)),
            paid + bonus,
            bonus,
        );
        let mut e = self.head(&key, &format!("ВК-{n:08}"), date, paid);
        for f in [
            names.card,
            "ВладелецДисконтнойКарты",
            "ВладелецДисконтнойКарты_Type",
            "Контрагент_Key",
            "Партнер_Key",
        ] {
            if let Some(v) = sale.get(f) {
                e.set(f, v.clone());
            }
        }
        let set = match (self.conf, at_till) {
            (Configuration::Roznica2, true) => {
                e.set("ВидОперации", Val::str("Возврат"));
                e.set("ЧекККМПродажа_Key", Val::str(sale_key));
                for f in ["Магазин_Key", "КассаККМ_Key"] {
                    e.set(f, sale.get(f).cloned().unwrap_or(Val::str(EMPTY)));
                }
                RECEIPTS
            }
            (Configuration::Roznica2, false) => {
                e.set(
                    "Магазин_Key",
                    sale.get("Магазин_Key").cloned().unwrap_or(Val::str(EMPTY)),
                );
                row.push(("ЧекККМ_Key".to_string(), Val::str(sale_key)));
                row.push(("ДокументПродажи".to_string(), Val::str(EMPTY)));
                row.push(("ДокументПродажи_Type".to_string(), Val::str("")));
                names.returns
            }
            (Configuration::Unf, _) => {
                e.set(
                    "КассаККМ_Key",
                    sale.get("КассаККМ_Key").cloned().unwrap_or(Val::str(EMPTY)),
                );
                e.set("ЧекККМ_Key", Val::str(sale_key));
                row.push((
                    "СуммаСкидкиОплатыБонусомЧекаПродажи".to_string(),
                    Val::money(Money(bonus)),
                ));
                row.push((
                    "СуммаАвтоматическойСкидкиЧекаПродажи".to_string(),
                    Val::Num("0".into()),
                ));
                names.returns
            }
            (Configuration::Ut11, _) => {
                for f in ["КассаККМ_Key", "Склад_Key"] {
                    e.set(f, sale.get(f).cloned().unwrap_or(Val::str(EMPTY)));
                }
                e.set("ЧекККМ_Key", Val::str(sale_key));
                e.set("СуммаБонусныхБалловКВозврату", Val::Num("0".into()));
                // УТ 11's return lines have no discount or points fields
                row.retain(|(f, _)| {
                    [
                        "LineNumber",
                        "Номенклатура_Key",
                        "Характеристика_Key",
                        "Количество",
                        "Цена",
                        "Сумма",
                        "СуммаНДС",
                    ]
                    .contains(&f.as_str())
                });
                names.returns
            }
        };
        e.set(names.rows, Val::Rows(vec![row]));
        self.put(set, e);
        Some(key)
    }

    /// The sets holding documents the shop made (not kopilka's).
    fn doc_sets(&self) -> Vec<&'static str> {
        let n = self.names();
        let mut v = vec![RECEIPTS, n.returns];
        v.extend(n.invoices);
        v
    }

    fn find_doc(&mut self, key: &str) -> Option<(&'static str, &mut Entity)> {
        for set in self.doc_sets() {
            if self.sets.get(set).is_some_and(|s| s.contains_key(key)) {
                return self
                    .sets
                    .get_mut(set)
                    .and_then(|s| s.get_mut(key))
                    .map(|e| (set, e));
            }
        }
        None
    }

    fn bump(&mut self, key: &str) {
        let dv = self.data_version();
        if let Some((_, e)) = self.find_doc(key) {
            e.set("DataVersion", dv);
        }
    }

    /// What a posted document of the shop is: `Some(true)` a return, `Some(false)` a sale,
    /// `None` neither (unposted, marked, or an invoice that is no sale).
    fn doc_kind(&self, set: &str, e: &Entity) -> Option<bool> {
        let posted = e.get("Posted") == Some(&Val::Bool(true));
        let marked = e.get("DeletionMark") == Some(&Val::Bool(true));
        if !posted || marked {
            return None;
        }
        let op = e.get("ВидОперации").and_then(Val::as_text).unwrap_or("");
        if set == "Document_РасходнаяНакладная" {
            return (op == "ПродажаПокупателю").then_some(false);
        }
        Some(set == self.names().returns || op == "Возврат")
    }

    /// A document's value before points and the kopecks paid with points.
    fn doc_value(&self, e: &Entity) -> (i64, i64) {
        let n = self.names();
        let mut value = 0;
        let mut points = 0;
        if let Some(Val::Rows(rows)) = e.get(n.rows) {
            for r in rows {
                let p = kopecks(row_dec(r, n.points_paid));
                value += kopecks(row_dec(r, n.net)) + p;
                points += p;
            }
        }
        (value, points)
    }

    fn truth(&self, before: Option<NaiveDateTime>) -> SimTruth {
        let mut t = SimTruth::default();
        for set in self.doc_sets() {
            for e in self.sets.get(set).into_iter().flat_map(|s| s.values()) {
                let Some(is_return) = self.doc_kind(set, e) else {
                    continue;
                };
                let date = e.get("Date").and_then(Val::as_text).and_then(parse_local);
                if let (Some(b), Some(d)) = (before, date)
                    && d >= b
                {
                    continue;
                }
                let (value, _) = self.doc_value(e);
                if is_return {
                    t.returns += 1;
                    t.net_total_kopecks -= value;
                } else {
                    t.sales += 1;
                    t.net_total_kopecks += value;
                }
            }
        }
        t
    }

    /// The card's holder in the register: the card (Розница 2, УНФ) or its partner (УТ 11).
    fn register_holder(&self, card: &str) -> Option<String> {
        if card.is_empty() || card == EMPTY {
            return None;
        }
        match self.conf {
            Configuration::Ut11 => self
                .sets
                .get(self.names().cards)?
                .get(card)?
                .get("Партнер_Key")
                .and_then(Val::as_text)
                .map(str::to_string),
            _ => Some(card.to_string()),
        }
    }

    /// Every movement of the bonus register, derived in date order from what is posted: the
    /// opening movements, the shop's documents (points paid and given back) and the bonus
    /// documents kopilka wrote.
    fn register(&self) -> Vec<Movement> {
        let n = self.names();
        let pv = Decimal::from(self.point_value.0.max(1));
        // (date, order, recorder, holder, Δ accrued, burn date for an accrual, correction)
        enum Ev {
            Paid(Decimal),
            GivenBack(Decimal),
            Accrual(Decimal, NaiveDateTime, Option<NaiveDateTime>),
            WriteOff(Decimal, Decimal),
        }
        let mut events: Vec<(NaiveDateTime, String, String, Ev)> = Vec::new();
        for set in self.doc_sets() {
            for e in self.sets.get(set).into_iter().flat_map(|s| s.values()) {
                let Some(is_return) = self.doc_kind(set, e) else {
                    continue;
                };
                let Some(date) = e.get("Date").and_then(Val::as_text).and_then(parse_local) else {
                    continue;
                };
                let card = e.get(n.card).and_then(Val::as_text).unwrap_or("");
                let Some(holder) = self.register_holder(card) else {
                    continue;
                };
                let (_, paid) = self.doc_value(e);
                let points = (Decimal::from(paid) / pv).floor();
                if points.is_zero() {
                    continue;
                }
                let ev = if is_return {
                    Ev::GivenBack(points)
                } else {
                    Ev::Paid(points)
                };
                events.push((date, e.key.clone(), holder, ev));
            }
        }
        for e in self
            .sets
            .get(n.bonus_documents)
            .into_iter()
            .flat_map(|s| s.values())
        {
            if e.get("Posted") != Some(&Val::Bool(true)) {
                continue;
            }
            let Some(date) = e.get("Date").and_then(Val::as_text).and_then(parse_local) else {
                continue;
            };
            let rows = |section: &str| match e.get(section) {
                Some(Val::Rows(r)) => r.clone(),
                _ => Vec::new(),
            };
            for r in rows(n.accruals) {
                let holder = row_text(&r, n.bonus_document_holder).to_string();
                let points = row_dec(&r, n.bonus_document_points);
                let from = n
                    .accrued_on
                    .and_then(|f| parse_local(row_text(&r, f)))
                    .unwrap_or(date);
                let burn = n
                    .expires_on
                    .map(|f| row_text(&r, f))
                    .filter(|t| *t != EMPTY_DATE)
                    .and_then(parse_local);
                events.push((date, e.key.clone(), holder, Ev::Accrual(points, from, burn)));
            }
            for r in rows(n.writeoffs) {
                let holder = row_text(&r, n.bonus_document_holder).to_string();
                let points = row_dec(&r, n.bonus_document_points);
                let correction = n.burn_correction.map_or(Decimal::ZERO, |f| row_dec(&r, f));
                events.push((date, e.key.clone(), holder, Ev::WriteOff(points, correction)));
            }
        }
        events.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut out = self.opening.clone();
        // scheduled burns per holder: date → points still to burn then
        let mut schedule: BTreeMap<String, BTreeMap<NaiveDateTime, Decimal>> = BTreeMap::new();
        for m in &self.opening {
            let s = schedule
                .entry(m.holder.clone())
                .or_default()
                .entry(m.period)
                .or_default();
            *s += if m.receipt { m.to_burn } else { -m.to_burn };
        }
        let lower = |schedule: &mut BTreeMap<String, BTreeMap<NaiveDateTime, Decimal>>,
                     out: &mut Vec<Movement>,
                     holder: &str,
                     recorder: &str,
                     after: Option<(NaiveDateTime, bool)>,
                     mut amount: Decimal| {
            let Some(s) = schedule.get_mut(holder) else {
                return;
            };
            for (when, left) in s.iter_mut() {
                if amount <= Decimal::ZERO {
                    break;
                }
                if after.is_some_and(|(a, strict)| *when < a || (strict && *when == a))
                    || *left <= Decimal::ZERO
                {
                    continue;
                }
                let take = amount.min(*left);
                *left -= take;
                amount -= take;
                out.push(Movement {
                    period: *when,
                    recorder: recorder.to_string(),
                    receipt: false,
                    holder: holder.to_string(),
                    accrued: Decimal::ZERO,
                    to_burn: take,
                });
            }
        };
        for (date, recorder, holder, ev) in events {
            let m = |period, receipt, accrued, to_burn| Movement {
                period,
                recorder: recorder.clone(),
                receipt,
                holder: holder.clone(),
                accrued,
                to_burn,
            };
            match ev {
                Ev::Paid(p) => {
                    out.push(m(date, false, p, Decimal::ZERO));
                    // 1C lowers the soonest burns still ahead by what was spent
                    lower(&mut schedule, &mut out, &holder, &recorder, Some((date, true)), p);
                }
                Ev::GivenBack(p) => out.push(m(date, true, p, Decimal::ZERO)),
                Ev::Accrual(p, from, burn) => {
                    out.push(m(from, true, p, Decimal::ZERO));
                    if let Some(b) = burn {
                        out.push(m(b, true, Decimal::ZERO, p));
                        *schedule.entry(holder.clone()).or_default().entry(b).or_default() += p;
                    }
                }
                Ev::WriteOff(p, correction) => {
                    out.push(m(date, false, p, Decimal::ZERO));
                    lower(
                        &mut schedule,
                        &mut out,
                        &holder,
                        &recorder,
                        Some((date, false)),
                        correction,
                    );
                }
            }
        }
        out
    }

    /// The register's balance per holder before `at`: (Начислено, КСписанию).
    fn balances(&self, at: NaiveDateTime) -> BTreeMap<String, (Decimal, Decimal)> {
        let mut out: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
        for m in self.register() {
            if m.period >= at {
                continue;
            }
            let e = out.entry(m.holder.clone()).or_default();
            let sign = if m.receipt { Decimal::ONE } else { -Decimal::ONE };
            e.0 += sign * m.accrued;
            e.1 += sign * m.to_burn;
        }
        out
    }
}

/// A running simulator. Dropping it stops the server.
pub struct OdataSim {
    base: Arc<Mutex<Base>>,
    addr: SocketAddr,
    publication: String,
    user: String,
    password: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl OdataSim {
    fn lock(&self) -> MutexGuard<'_, Base> {
        self.base.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:<port>/<publication>/odata/standard.odata`: what `[onec.odata] url` takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/{}/odata/standard.odata", self.addr, self.publication)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The synthetic shop behind the data (its products, customers and start date).
    pub fn shop(&self) -> Shop {
        self.lock().shop.clone()
    }

    pub fn timezone(&self) -> Tz {
        self.lock().tz
    }

    /// The latest document date (naive local), where new sales follow.
    pub fn last_date(&self) -> NaiveDateTime {
        self.lock().last_date
    }

    /// Keys of the documents in a set, in date order.
    pub fn keys(&self, set: &str) -> Vec<String> {
        let b = self.lock();
        let mut v: Vec<(String, String)> = b
            .sets
            .get(set)
            .into_iter()
            .flat_map(|s| s.values())
            .map(|e| {
                let d = e.get("Date").and_then(Val::as_text).unwrap_or("").to_string();
                (d, e.key.clone())
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }

    /// Keys of posted sales at the till (not returns by operation), in date order.
    /// The reference 1C keeps customer `i` under (the card owner: a partner, a person or a
    /// counterparty, as the configuration has it): what the base's other channels, its site
    /// orders included, name the same person by.
    /// The birth date the simulated base holds for customer `i` (every third one), where its
    /// catalog has the field.
    pub fn birthday_of(i: usize) -> Option<chrono::NaiveDate> {
        i.is_multiple_of(3).then(|| {
            chrono::NaiveDate::from_ymd_opt(1970 + (i % 40) as i32, (i % 12) as u32 + 1, (i % 28) as u32 + 1)
        })?
    }

    /// Customer `i`'s birth date as the base holds it: none when their catalog has no such
    /// field (Розница 2's counterparties).
    pub fn birthday_in_base(&self, i: usize) -> Option<chrono::NaiveDate> {
        let base = self.lock();
        let (_, set) = base.person(i);
        (set == base.names().people).then(|| OdataSim::birthday_of(i))?
    }

    pub fn person_key(&self, i: usize) -> String {
        self.lock().person(i).0
    }

    pub fn sale_keys(&self) -> Vec<String> {
        let keys = self.keys(RECEIPTS);
        let b = self.lock();
        keys.into_iter()
            .filter(|k| {
                b.sets
                    .get(RECEIPTS)
                    .and_then(|s| s.get(k))
                    .is_some_and(|e| b.doc_kind(RECEIPTS, e) == Some(false))
            })
            .collect()
    }

    /// The configuration's names for what it publishes.
    pub fn names(&self) -> Names {
        self.lock().names()
    }

    /// A copy of an entity.
    pub fn entity(&self, set: &str, key: &str) -> Option<Entity> {
        self.lock().sets.get(set).and_then(|s| s.get(key)).cloned()
    }

    /// Adds or replaces an entity as given (raw: malformed or hand-made documents).
    pub fn insert(&self, set: &str, e: Entity) {
        self.lock().put(set, e);
    }

    /// A fresh `DataVersion` value.
    pub fn next_data_version(&self) -> Val {
        self.lock().data_version()
    }

    /// The cashier corrects a receipt: the last line is removed, or with one line left its
    /// quantity grows by one. A new `DataVersion`.
    pub fn edit(&self, key: &str) -> bool {
        let mut b = self.lock();
        let n = b.names();
        let Some((_, e)) = b.find_doc(key) else {
            return false;
        };
        let Some(Val::Rows(rows)) = e.get(n.rows).cloned() else {
            return false;
        };
        let mut rows = rows;
        if rows.len() > 1 {
            rows.pop();
        } else if let Some(r) = rows.first_mut() {
            let qty = row_dec(r, "Количество") + Decimal::ONE;
            let price = row_dec(r, "Цена");
            for (f, v) in r.iter_mut() {
                if f == "Количество" {
                    *v = Val::Num(qty.normalize().to_string());
                } else if f == "Сумма" || f == n.net {
                    let sum = Decimal::from_str(v.as_text().unwrap_or("0")).unwrap_or_default() + price;
                    *v = Val::Num(sum.normalize().to_string());
                }
            }
        }
        let total: Decimal = rows.iter().map(|r| row_dec(r, n.net)).sum();
        e.set(n.rows, Val::Rows(rows));
        e.set("СуммаДокумента", Val::Num(total.normalize().to_string()));
        b.bump(key);
        true
    }

    /// Posts or unposts a document. A new `DataVersion`.
    pub fn set_posted(&self, key: &str, posted: bool) -> bool {
        let mut b = self.lock();
        let Some((_, e)) = b.find_doc(key) else {
            return false;
        };
        e.set("Posted", Val::Bool(posted));
        b.bump(key);
        true
    }

    /// Marks a document for deletion (1C unposts it too) or clears the mark.
    pub fn set_deletion_mark(&self, key: &str, marked: bool) -> bool {
        let mut b = self.lock();
        let Some((_, e)) = b.find_doc(key) else {
            return false;
        };
        e.set("DeletionMark", Val::Bool(marked));
        if marked {
            e.set("Posted", Val::Bool(false));
        }
        b.bump(key);
        true
    }

    /// Deletes a document outright (what `DELETE` does in 1C: no mark, gone).
    pub fn delete(&self, key: &str) -> bool {
        let mut b = self.lock();
        b.doc_sets()
            .iter()
            .any(|s| b.sets.get_mut(*s).is_some_and(|m| m.remove(key).is_some()))
    }

    /// Moves a document to another date (a back-dated correction). A new `DataVersion`.
    pub fn set_date(&self, key: &str, date: NaiveDateTime) -> bool {
        let mut b = self.lock();
        let Some((_, e)) = b.find_doc(key) else {
            return false;
        };
        e.set("Date", Val::str(local_text(date)));
        b.bump(key);
        true
    }

    /// New posted sales after the latest document, or all dated `at` (local) if given
    /// (back-dated entry). Returns their keys.
    pub fn add_sales(&self, n: usize, at: Option<NaiveDateTime>) -> Vec<String> {
        let mut b = self.lock();
        (0..n).map(|_| b.new_sale(at)).collect()
    }

    /// A product the shop added to 1C's catalog (`Catalog_Номенклатура`, with its retail and
    /// cost prices), in a new folder `category`; random sales never pick it. Its key is what
    /// kopilka sees as the product id.
    pub fn add_product(&self, id: &str, name: &str, category: &str, price: Money, cost: Money) -> String {
        let mut b = self.lock();
        let key = guid("product", id);
        let group = guid("group", category);
        if b.sets.get(PRODUCTS).is_none_or(|s| !s.contains_key(&group)) {
            let e = b
                .catalog_item(&group, category, category)
                .with("Parent_Key", Val::str(EMPTY))
                .with("IsFolder", Val::Bool(true))
                .with("Артикул", Val::str(""))
                .with("ТипНоменклатуры", Val::str(""));
            b.put(PRODUCTS, e);
        }
        let e = b
            .catalog_item(&key, id, name)
            .with("Parent_Key", Val::str(group))
            .with("IsFolder", Val::Bool(false))
            .with("Артикул", Val::str(id))
            .with("ТипНоменклатуры", Val::str("Товар"));
        b.put(PRODUCTS, e);
        let n = b.names();
        let period = local_text(b.shop.start.with_timezone(&b.tz).naive_local() - ChronoDuration::days(30));
        for (ty, value) in [("Розничная", price), ("Закупочная", cost)] {
            let e = Entity::new(format!("price:{id}:{ty}"))
                .with("Period", Val::str(&period))
                .with("Номенклатура_Key", Val::str(&key))
                .with(n.price_variant, Val::str(EMPTY))
                .with(n.price_type, Val::str(guid("price-type", ty)))
                .with("Цена", Val::money(value));
            b.put(n.prices, e);
        }
        b.shop.products.push(crate::sim::sales::Product {
            id: id.to_string(),
            name: name.to_string(),
            category: category.to_string(),
            price,
            cost,
            service: false,
        });
        key
    }

    /// A receipt of customer `i` at `at` (naive local) with the given lines: (product id as
    /// the shop knows it, quantity, given free — a 100 % discount, as a cashier gives a gift
    /// item). Returns the receipt's key.
    pub fn add_sale_of(&self, i: usize, lines: &[(&str, i64, bool)], at: NaiveDateTime) -> Option<String> {
        let mut b = self.lock();
        let n = b.next_doc;
        b.next_doc += 1;
        let mut rng = fastrand::Rng::with_seed(n as u64);
        let mut d = b.shop.sale(&mut rng, n, 1, Some(i), 0);
        let mut out = Vec::with_capacity(lines.len());
        for (id, qty, free) in lines {
            let p = b.shop.products.iter().find(|p| p.id == *id)?;
            let gross = p.price.0 * qty;
            let discount = if *free { gross } else { 0 };
            out.push(crate::core::document::Line {
                product_id: p.id.clone(),
                name: p.name.clone(),
                category: Some(p.category.clone()),
                category_parents: Vec::new(),
                quantity: Decimal::from(*qty),
                unit_price: p.price,
                discount: Money(discount),
                net: Money(gross - discount),
                unit_cost: Some(p.cost),
                service: false,
            });
        }
        d.lines = out;
        d.total = d.lines.iter().map(|l| l.net).sum();
        d.occurred_at = instant(at, b.tz);
        let key = guid("doc", &d.source.doc_id);
        let (rows, total) = b.sale_rows(&d);
        let names = b.names();
        let mut e = b.head(&key, &d.number.clone().unwrap_or_default(), at, total);
        for (f, v) in b.customer_fields(Some(i)) {
            e.set(f, v);
        }
        match b.conf {
            Configuration::Roznica2 => {
                e.set("ВидОперации", Val::str("Продажа"));
                e.set("Магазин_Key", Val::str(guid("store", "Тверская")));
                e.set("КассаККМ_Key", Val::str(guid("till", "1")));
                e.set("ЧекККМПродажа_Key", Val::str(EMPTY));
            }
            Configuration::Unf => e.set("КассаККМ_Key", Val::str(guid("till", "1"))),
            Configuration::Ut11 => {
                e.set("КассаККМ_Key", Val::str(guid("till", "1")));
                e.set("Склад_Key", Val::str(guid("store", "Тверская")));
            }
        }
        e.set(names.rows, Val::Rows(rows));
        b.put(RECEIPTS, e);
        Some(key)
    }

    /// A cashier types customer `i`'s birth date into their card in 1C (`ДатаРождения`,
    /// finding S5, where the catalog has it): a new `DataVersion`. `false` when the customer's
    /// catalog has no such field (Розница 2's counterparties).
    pub fn set_birthday(&self, i: usize, date: chrono::NaiveDate) -> bool {
        let mut b = self.lock();
        let (key, set) = b.person(i);
        if set != b.names().people {
            return false;
        }
        let dv = b.data_version();
        let Some(e) = b.sets.get_mut(set).and_then(|s| s.get_mut(&key)) else {
            return false;
        };
        e.set(
            "ДатаРождения",
            Val::str(format!("{}T00:00:00", date.format("%Y-%m-%d"))),
        );
        e.set("DataVersion", dv);
        true
    }

    /// A later return of one unit of a sale's first line, on the configuration's return
    /// document (Розница 2: `ВозвратТоваровОтПокупателя`, the sale named per line).
    pub fn add_return(&self, sale_key: &str) -> Option<String> {
        let mut b = self.lock();
        let date = b.last_date + ChronoDuration::minutes(1);
        b.last_date = date;
        b.new_return(sale_key, false, date)
    }

    /// A return at the till (Розница 2: a `ЧекККМ` with `ВидОперации = Возврат`).
    pub fn add_till_return(&self, sale_key: &str) -> Option<String> {
        let mut b = self.lock();
        let date = b.last_date + ChronoDuration::minutes(1);
        b.last_date = date;
        b.new_return(sale_key, true, date)
    }

    /// Sales, returns and net value in force.
    pub fn truth(&self) -> SimTruth {
        self.lock().truth(None)
    }

    /// The same, of documents dated before `before` (naive local).
    pub fn truth_before(&self, before: NaiveDateTime) -> SimTruth {
        self.lock().truth(Some(before))
    }

    /// 1C's spendable balance of every holder at `at`, as its own code computes it:
    /// `Начислено − max(КСписанию, 0)` of the register before the date, with the holder's
    /// customer key and card number.
    pub fn register_balances(&self, at: chrono::DateTime<chrono::Utc>) -> Vec<BonusTruth> {
        let b = self.lock();
        let n = b.names();
        let at = at.with_timezone(&b.tz).naive_local();
        let mut out = Vec::new();
        let balances = b.balances(at);
        let _ = n;
        for (i, c) in b.shop.customers.iter().enumerate() {
            let holder = b.holder_of(i);
            let (accrued, to_burn) = balances.get(&holder).copied().unwrap_or_default();
            let points = accrued - to_burn.max(Decimal::ZERO);
            out.push(BonusTruth {
                person_key: b.person(i).0,
                card: c.card.clone(),
                points: points.floor().to_string().parse().unwrap_or(0),
            });
        }
        out
    }

    /// Every entity of a set, in key order (what kopilka wrote: bonus and accounting
    /// documents).
    pub fn entities(&self, set: &str) -> Vec<Entity> {
        self.lock()
            .sets
            .get(set)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// From now on every `Post` action is refused with this reason (500, code `-1`), until
    /// called with `None`.
    /// Adds a property to the chart of additional attributes, as a shop does in 1C's form
    /// (title in `Заголовок` and `Description`); returns its key.
    pub fn add_property(&self, title: &str) -> String {
        let mut b = self.lock();
        let key = guid("property", title);
        let dv = b.data_version();
        let e = Entity::new(key.clone())
            .with("Ref_Key", Val::str(&key))
            .with("DataVersion", dv)
            .with("DeletionMark", Val::Bool(false))
            .with("Description", Val::str(title))
            .with("Predefined", Val::Bool(false))
            .with("Заголовок", Val::str(title))
            .with("Имя", Val::str(""))
            .with("ЭтоДополнительноеСведение", Val::Bool(false))
            .with("НаборСвойств_Key", Val::str(EMPTY));
        b.put(PROPERTIES, e);
        key
    }

    /// Adds an item to a list property's values; returns its key.
    pub fn add_property_value(&self, property: &str, name: &str) -> String {
        let mut b = self.lock();
        let key = guid("value", &format!("{property}/{name}"));
        let e = b
            .catalog_item(&key, "", name)
            .with("Owner_Key", Val::str(property))
            .with("Parent_Key", Val::str(EMPTY))
            .with("IsFolder", Val::Bool(false));
        b.put(PROPERTY_VALUES, e);
        key
    }

    /// Sets a person's additional attribute as a user does in its form: the row of the
    /// property is replaced or added, the others stay. `ty` is the value's OData type
    /// (`Edm.String`, `Edm.DateTime`, `StandardODATA.Catalog_ЗначенияСвойствОбъектов`).
    pub fn set_attribute(&self, person: &str, property: &str, value: &str, ty: &str) -> bool {
        let mut b = self.lock();
        let n = b.names();
        let dv = b.data_version();
        for set in std::iter::once(n.people).chain(n.people_other) {
            let Some(e) = b.sets.get_mut(set).and_then(|m| m.get_mut(person)) else {
                continue;
            };
            let mut rows = match e.get(EXTRA) {
                Some(Val::Rows(r)) => r.clone(),
                _ => Vec::new(),
            };
            rows.retain(|r| row_text(r, "Свойство_Key") != property);
            rows.push(vec![
                ("LineNumber".into(), Val::str((rows.len() + 1).to_string())),
                ("Свойство_Key".into(), Val::str(property)),
                ("Значение".into(), Val::str(value)),
                ("Значение_Type".into(), Val::str(ty)),
                ("ТекстоваяСтрока".into(), Val::str("")),
            ]);
            for (i, r) in rows.iter_mut().enumerate() {
                r[0].1 = Val::str((i + 1).to_string());
            }
            e.set(EXTRA, Val::Rows(rows));
            e.set("DataVersion", dv);
            return true;
        }
        false
    }

    /// A person's additional attributes: (property key, value, value type) per row.
    pub fn attributes_of(&self, person: &str) -> Vec<(String, String, String)> {
        let b = self.lock();
        let n = b.names();
        std::iter::once(n.people)
            .chain(n.people_other)
            .find_map(|set| b.sets.get(set).and_then(|m| m.get(person)))
            .and_then(|e| match e.get(EXTRA) {
                Some(Val::Rows(r)) => Some(
                    r.iter()
                        .map(|row| {
                            (
                                row_text(row, "Свойство_Key").to_string(),
                                row_text(row, "Значение").to_string(),
                                row_text(row, "Значение_Type").to_string(),
                            )
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Objects changed by PATCH so far.
    pub fn patches(&self) -> u64 {
        self.lock().patched
    }

    pub fn refuse_posting(&self, reason: Option<&str>) {
        self.lock().refuse_posting = reason.map(str::to_string);
    }

    /// From now on POST ignores the client's `Ref_Key` and gives a key of its own.
    pub fn assign_own_keys(&self, on: bool) {
        self.lock().own_keys = on;
    }

    pub fn inject(&self, f: Fault) {
        self.lock().faults.push(f);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Unpublishes a set: gone from `$metadata`, 404 on every request.
    pub fn hide_set(&self, set: &str) {
        self.lock().hidden_sets.insert(set.to_string());
    }

    /// Removes a property from `$metadata` and from answers; `scope` is a set or
    /// `Set.Section` for a row field. Naming it in `$select` or `$filter` is then a 400.
    pub fn hide_property(&self, scope: &str, property: &str) {
        self.lock()
            .hidden_props
            .insert((scope.to_string(), property.to_string()));
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().log.len()
    }

    pub fn clear_log(&self) {
        self.lock().log.clear();
    }
}

// ----------------------------------------------------------------------------------------
// Serving
// ----------------------------------------------------------------------------------------

#[derive(Clone)]
struct Served {
    base: Arc<Mutex<Base>>,
    publication: String,
    addr: SocketAddr,
}

/// An answer, built under the lock and turned into a response outside it.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    challenge: bool,
    location: Option<String>,
}

impl Reply {
    fn into_response(self) -> Response {
        let mut r = Response::builder()
            .status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
        if !self.content_type.is_empty() {
            r = r.header(header::CONTENT_TYPE, self.content_type);
        }
        if self.challenge {
            r = r.header(header::WWW_AUTHENTICATE, "Basic realm=\"1C:Enterprise\"");
        }
        if let Some(l) = &self.location {
            r = r.header(header::LOCATION, l);
        }
        r.body(Body::from(self.body)).unwrap_or_default()
    }
}

const JSON: &str = "application/json;odata=minimalmetadata;streaming=true;charset=utf-8";

fn json_response(status: u16, body: String) -> Reply {
    Reply {
        status,
        content_type: JSON,
        body,
        challenge: false,
        location: None,
    }
}

fn error_body(code: &str, message: &str) -> String {
    let mut s = String::from("{\"odata.error\":{\"code\":");
    write_json_str(&mut s, code);
    s.push_str(",\"message\":{\"lang\":\"ru\",\"value\":");
    write_json_str(&mut s, message);
    s.push_str("}}}");
    s
}

fn odata_error(status: u16, code: &str, message: &str) -> Reply {
    json_response(status, error_body(code, message))
}

fn html(status: u16, title: &str) -> Reply {
    Reply {
        status,
        content_type: "text/html; charset=utf-8",
        body: format!(
            "<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
        ),
        challenge: false,
        location: None,
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_val(out: &mut String, v: &Val, sub: Option<&[String]>) {
    match v {
        Val::Str(s) => write_json_str(out, s),
        Val::Num(n) => out.push_str(n),
        Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Val::Null => out.push_str("null"),
        Val::Rows(rows) => {
            out.push('[');
            for (i, r) in rows.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_fields(out, r.iter().map(|(n, v)| (n.as_str(), v)), sub, &[]);
            }
            out.push(']');
        }
    }
}

/// Writes an object of fields, keeping only `select` (when given) and leaving out hidden ones.
fn write_fields<'a>(
    out: &mut String,
    fields: impl Iterator<Item = (&'a str, &'a Val)>,
    select: Option<&[String]>,
    hidden: &[&str],
) {
    out.push('{');
    let mut first = true;
    for (name, v) in fields {
        if hidden.contains(&name) {
            continue;
        }
        let sub: Option<Vec<String>> = match (select, v) {
            (None, _) => None,
            (Some(sel), Val::Rows(_)) => {
                let prefix = format!("{name}/");
                let inner: Vec<String> = sel
                    .iter()
                    .filter_map(|s| s.strip_prefix(&prefix).map(str::to_string))
                    .collect();
                if !sel.iter().any(|s| s == name) && inner.is_empty() {
                    continue;
                }
                (!inner.is_empty()).then_some(inner)
            }
            (Some(sel), _) => {
                if !sel.iter().any(|s| s == name || s == "*") {
                    continue;
                }
                None
            }
        };
        if !first {
            out.push(',');
        }
        first = false;
        write_json_str(out, name);
        out.push(':');
        write_val(out, v, sub.as_deref());
    }
    out.push('}');
}

/// Splits `a,b` at top-level commas.
fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

// --- $filter ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Typed(String, String),
    Num(String),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let read_quoted = |i: &mut usize| -> Result<String, String> {
        // at the opening quote
        *i += 1;
        let mut v = String::new();
        loop {
            match chars.get(*i) {
                None => return Err("unterminated string literal".into()),
                Some('\'') if chars.get(*i + 1) == Some(&'\'') => {
                    v.push('\'');
                    *i += 2;
                }
                Some('\'') => {
                    *i += 1;
                    return Ok(v);
                }
                Some(c) => {
                    v.push(*c);
                    *i += 1;
                }
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '\'' {
            out.push(Tok::Str(read_quoted(&mut i)?));
        } else if c.is_ascii_digit() || c == '-' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || matches!(chars[i], '.' | '-' | 'e' | 'E'))
            {
                i += 1;
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '/' | '$')) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if chars.get(i) == Some(&'\'') {
                let v = read_quoted(&mut i)?;
                out.push(Tok::Typed(word, v));
            } else {
                out.push(Tok::Ident(word));
            }
        } else {
            return Err(format!("unexpected character {c:?}"));
        }
    }
    Ok(out)
}

#[derive(Clone, Debug)]
enum Lit {
    Time(NaiveDateTime),
    Guid(String),
    Str(String),
    Num(Decimal),
    Bool(bool),
}

#[derive(Clone, Debug)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(String, String, Lit),
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Ident(x)) if x == w)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.toks.get(self.pos) == Some(&Tok::Open) {
            self.pos += 1;
            let e = self.or()?;
            if self.toks.get(self.pos) != Some(&Tok::Close) {
                return Err("missing )".into());
            }
            self.pos += 1;
            return Ok(e);
        }
        let field = match self.toks.get(self.pos) {
            Some(Tok::Ident(f)) => f.clone(),
            other => return Err(format!("expected a property, found {other:?}")),
        };
        let op = match self.toks.get(self.pos + 1) {
            Some(Tok::Ident(o)) if ["eq", "ne", "gt", "ge", "lt", "le"].contains(&o.as_str()) => o.clone(),
            other => return Err(format!("expected a comparison after {field}, found {other:?}")),
        };
        let lit = match self.toks.get(self.pos + 2) {
            Some(Tok::Typed(t, v)) if t == "datetime" => Lit::Time(
                NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S")
                    .map_err(|_| format!("bad datetime literal {v:?}"))?,
            ),
            Some(Tok::Typed(t, v)) if t == "guid" => Lit::Guid(v.to_lowercase()),
            Some(Tok::Str(v)) => Lit::Str(v.clone()),
            Some(Tok::Num(v)) => Lit::Num(Decimal::from_str(v).map_err(|_| format!("bad number {v:?}"))?),
            Some(Tok::Ident(b)) if b == "true" || b == "false" => Lit::Bool(b == "true"),
            other => return Err(format!("expected a literal, found {other:?}")),
        };
        self.pos += 3;
        Ok(Expr::Cmp(field, op, lit))
    }
}

fn parse_filter(s: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: tokenize(s)?,
        pos: 0,
    };
    let e = p.or()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?}", p.toks.get(p.pos)));
    }
    Ok(e)
}

fn filter_fields(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => {
            filter_fields(a, out);
            filter_fields(b, out);
        }
        Expr::Not(a) => filter_fields(a, out),
        Expr::Cmp(f, _, _) => out.push(f.clone()),
    }
}

fn eval(e: &Expr, ent: &Entity) -> bool {
    match e {
        Expr::And(a, b) => eval(a, ent) && eval(b, ent),
        Expr::Or(a, b) => eval(a, ent) || eval(b, ent),
        Expr::Not(a) => !eval(a, ent),
        Expr::Cmp(f, op, lit) => {
            let v = ent.get(f);
            let ord = match (v, lit) {
                (Some(v), Lit::Time(t)) => v
                    .as_text()
                    .and_then(|s| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").ok())
                    .map(|x| x.cmp(t)),
                (Some(v), Lit::Guid(g)) => v.as_text().map(|s| s.to_lowercase().cmp(g)),
                (Some(v), Lit::Str(s)) => v.as_text().map(|x| x.cmp(s.as_str())),
                (Some(v), Lit::Num(n)) => v
                    .as_text()
                    .and_then(|s| Decimal::from_str(s).ok())
                    .map(|x| x.cmp(n)),
                (Some(Val::Bool(b)), Lit::Bool(l)) => Some(b.cmp(l)),
                _ => None,
            };
            let Some(ord) = ord else { return false };
            use std::cmp::Ordering::*;
            match op.as_str() {
                "eq" => ord == Equal,
                "ne" => ord != Equal,
                "gt" => ord == Greater,
                "ge" => ord != Less,
                "lt" => ord == Less,
                "le" => ord != Greater,
                _ => false,
            }
        }
    }
}

fn cmp_val(a: Option<&Val>, b: Option<&Val>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(Val::Num(x)), Some(Val::Num(y))) => {
            let dx = Decimal::from_str(x).unwrap_or_default();
            let dy = Decimal::from_str(y).unwrap_or_default();
            dx.cmp(&dy)
        }
        (Some(Val::Bool(x)), Some(Val::Bool(y))) => x.cmp(y),
        (Some(x), Some(y)) => x.as_text().unwrap_or("").cmp(y.as_text().unwrap_or("")),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

// --- $metadata ---------------------------------------------------------------------------

fn metadata(b: &Base) -> String {
    let mut types = String::new();
    let mut sets = String::new();
    let hidden = |scope: &str, p: &str| b.hidden_props.contains(&(scope.to_string(), p.to_string()));
    for s in schema(b.conf) {
        if b.hidden_sets.contains(s.set) {
            continue;
        }
        let is_register =
            s.set.starts_with("AccumulationRegister_") || s.set.starts_with("InformationRegister_");
        let ty = if s.set.starts_with("AccumulationRegister_") {
            format!("{}_RecordType", s.set)
        } else {
            s.set.to_string()
        };
        let _ = write!(types, "<EntityType Name=\"{ty}\">");
        if !is_register {
            types.push_str("<Key><PropertyRef Name=\"Ref_Key\"/></Key>");
        }
        for (p, t) in &s.props {
            if !hidden(s.set, p) {
                let _ = write!(types, "<Property Name=\"{p}\" Type=\"{t}\" Nullable=\"true\"/>");
            }
        }
        for (section, _) in &s.sections {
            let scope = format!("{}.{section}", s.set);
            if !hidden(s.set, section) && !b.hidden_sets.contains(&scope) {
                let _ = write!(
                    types,
                    "<Property Name=\"{section}\" Type=\"Collection(StandardODATA.{}_{section}_RowType)\" Nullable=\"false\"/>",
                    s.set
                );
            }
        }
        types.push_str("</EntityType>");
        for (section, props) in &s.sections {
            let scope = format!("{}.{section}", s.set);
            let _ = write!(types, "<ComplexType Name=\"{}_{section}_RowType\">", s.set);
            for (p, t) in props {
                if !hidden(&scope, p) {
                    let _ = write!(types, "<Property Name=\"{p}\" Type=\"{t}\" Nullable=\"true\"/>");
                }
            }
            types.push_str("</ComplexType>");
            let _ = write!(
                sets,
                "<EntitySet Name=\"{}_{section}\" EntityType=\"StandardODATA.{}_{section}\"/>",
                s.set, s.set
            );
            let _ = write!(
                types,
                "<EntityType Name=\"{}_{section}\"><Key><PropertyRef Name=\"Ref_Key\"/><PropertyRef Name=\"LineNumber\"/></Key><Property Name=\"Ref_Key\" Type=\"Edm.Guid\"/></EntityType>",
                s.set
            );
        }
        let _ = write!(
            sets,
            "<EntitySet Name=\"{ty}\" EntityType=\"StandardODATA.{ty}\"/>"
        );
        if s.set.starts_with("AccumulationRegister_") {
            let _ = write!(
                sets,
                "<EntitySet Name=\"{}\" EntityType=\"StandardODATA.{ty}\"/>",
                s.set
            );
        }
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <edmx:Edmx xmlns:edmx=\"http://schemas.microsoft.com/ado/2007/06/edmx\" Version=\"1.0\">\
         <edmx:DataServices xmlns:m=\"http://schemas.microsoft.com/ado/2007/08/dataservices/metadata\" m:DataServiceVersion=\"3.0\">\
         <Schema xmlns=\"http://schemas.microsoft.com/ado/2009/11/edm\" Namespace=\"StandardODATA\">{types}\
         <EntityContainer Name=\"EnterpriseV8\" m:IsDefaultEntityContainer=\"true\">{sets}</EntityContainer>\
         </Schema></edmx:DataServices></edmx:Edmx>"
    )
}

// --- the handler -------------------------------------------------------------------------

/// What the handler decided, computed under the lock; the response is sent outside it.
enum Outcome {
    Now(Reply),
    Later(Duration, Reply),
}

async fn handle(
    State(s): State<Served>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let outcome = {
        let mut b = s.base.lock().unwrap_or_else(|e| e.into_inner());
        decide(&mut b, &s, &method, &uri, &headers, &body)
    };
    match outcome {
        Outcome::Now(r) => r.into_response(),
        Outcome::Later(d, r) => {
            tokio::time::sleep(d).await;
            r.into_response()
        }
    }
}

fn decide(b: &mut Base, s: &Served, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Outcome {
    let raw_path = uri.path();
    let raw_query = uri.query().unwrap_or("");
    let path = percent_decode(raw_path);
    let query: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect();
    let root = format!("/{}/odata/standard.odata", s.publication);
    let resource = path
        .strip_prefix(&root)
        .map(|r| r.trim_start_matches('/').to_string());
    let decoded_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut log = LoggedRequest {
        method: method.to_string(),
        resource: resource.clone().unwrap_or_else(|| path.clone()),
        query: decoded_query.clone(),
        status: 0,
    };
    let outcome = route(b, s, method, resource, &query, &decoded_query, headers, body);
    let response = match &outcome {
        Outcome::Now(r) | Outcome::Later(_, r) => r,
    };
    log.status = response.status;
    b.log.push(log);
    outcome
}

#[allow(clippy::too_many_arguments)]
fn route(
    b: &mut Base,
    s: &Served,
    method: &Method,
    resource: Option<String>,
    query: &[(String, String)],
    decoded_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let Some(resource) = resource else {
        return Outcome::Now(html(404, "404 - Not Found"));
    };
    // Basic auth as the publication's 1C user
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(unbase64)
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .is_some_and(|cred| cred == format!("{}:{}", b.user, b.password));
    if !authorized {
        return Outcome::Now(Reply {
            status: 401,
            content_type: "",
            body: String::new(),
            challenge: true,
            location: None,
        });
    }
    // scripted faults
    let mut fired = None;
    for f in b.faults.iter_mut() {
        if f.times == 0
            || f.method.as_ref().is_some_and(|m| m != method.as_str())
            || !resource.contains(&f.path_contains)
            || f.query_contains
                .as_ref()
                .is_some_and(|q| !decoded_query.contains(q.as_str()))
        {
            continue;
        }
        if f.skip > 0 {
            f.skip -= 1;
            continue;
        }
        f.times -= 1;
        fired = Some(f.kind.clone());
        break;
    }
    b.faults.retain(|f| f.times > 0);
    let mut delay = None;
    match fired {
        Some(FaultKind::Exception) => {
            return Outcome::Now(odata_error(
                500,
                "-1",
                "Ошибка при вызове метода контекста: деление на 0",
            ));
        }
        Some(FaultKind::InternalError) => {
            return Outcome::Now(odata_error(500, "0", "Произошла внутренняя ошибка OData сервиса"));
        }
        Some(FaultKind::Unavailable) => return Outcome::Now(html(503, "503 Service Unavailable")),
        Some(FaultKind::Status(st, code)) => {
            return Outcome::Now(odata_error(st, &code, "Ошибка"));
        }
        Some(FaultKind::Html200) => return Outcome::Now(html(200, "Веб-сервер: публикация не найдена")),
        Some(FaultKind::Delay(d)) => delay = Some(d),
        Some(FaultKind::Truncated) | None => {}
    }
    let response = if method == Method::GET {
        answer(b, s, &resource, query, headers)
    } else if method == Method::POST {
        write(b, s, &resource, body)
    } else if method == Method::PATCH {
        patch(b, s, &resource, body)
    } else {
        return Outcome::Now(odata_error(405, "6", "Метод не поддерживается симулятором"));
    };
    let response = if fired == Some(FaultKind::Truncated) {
        truncate(response)
    } else {
        response
    };
    match delay {
        Some(d) => Outcome::Later(d, response),
        None => Outcome::Now(response),
    }
}

/// The first half of the body (at a character boundary): a transfer cut off.
fn truncate(mut r: Reply) -> Reply {
    let mut cut = r.body.len() / 2;
    while !r.body.is_char_boundary(cut) {
        cut -= 1;
    }
    r.body.truncate(cut);
    r
}

fn wants_json(query: &[(String, String)], headers: &HeaderMap) -> bool {
    query
        .iter()
        .any(|(k, v)| k == "$format" && (v == "json" || v.starts_with("application/json")))
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"))
}

fn answer(
    b: &mut Base,
    s: &Served,
    resource: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> Reply {
    let root = format!("http://{}/{}/odata/standard.odata", s.addr, s.publication);
    if resource == "$metadata" {
        return Reply {
            status: 200,
            content_type: "application/xml;charset=utf-8",
            body: metadata(b),
            challenge: false,
            location: None,
        };
    }
    if !wants_json(query, headers) {
        return Reply {
            status: 200,
            content_type: "application/atom+xml;type=feed;charset=utf-8",
            body: format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><feed xmlns=\"http://www.w3.org/2005/Atom\" xml:base=\"{root}/\"><title type=\"text\">{resource}</title></feed>"
            ),
            challenge: false,
            location: None,
        };
    }
    if resource.is_empty() {
        let mut out = format!("{{\"odata.metadata\":\"{root}/$metadata\",\"value\":[");
        let names: Vec<&String> = b.sets.keys().filter(|k| !b.hidden_sets.contains(*k)).collect();
        for (i, n) in names.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"name\":");
            write_json_str(&mut out, n);
            out.push_str(",\"url\":");
            write_json_str(&mut out, n);
            out.push('}');
        }
        out.push_str("]}");
        return json_response(200, out);
    }
    // Set, Set(guid'…'), Set/Balance(…)
    let (set, rest) = match resource.find(['(', '/']) {
        Some(i) => (&resource[..i], &resource[i..]),
        None => (resource, ""),
    };
    let register = set == BONUS || set == BONUS_RECORDS;
    if b.hidden_sets.contains(set) || !(b.sets.contains_key(set) || register) {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    }
    let opt = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let select = opt("$select").map(split_list);
    let hidden: Vec<String> = b
        .hidden_props
        .iter()
        .filter(|(scope, _)| scope == set)
        .map(|(_, p)| p.clone())
        .collect();
    let hidden_refs: Vec<&str> = hidden.iter().map(String::as_str).collect();
    // every selected name must exist (a row field as Section/Field)
    if let Some(sel) = &select
        && let Some(bad) = sel.iter().find(|f| !property_exists(b, set, f))
    {
        return odata_error(400, "10", &format!("Неверное имя свойства: {bad}"));
    }
    if let Some(key) = rest.strip_prefix("(guid'").and_then(|r| r.strip_suffix("')")) {
        let key = key.to_lowercase();
        let Some(e) = b.sets.get(set).and_then(|m| m.get(&key)) else {
            return odata_error(404, "9", &format!("Не найден объект {set}(guid'{key}')"));
        };
        let mut out = format!("{{\"odata.metadata\":\"{root}/$metadata#{set}/@Element\",");
        let mut body = String::new();
        write_fields(
            &mut body,
            e.fields.iter().map(|(n, v)| (n.as_str(), v)),
            select.as_deref(),
            &hidden_refs,
        );
        out.push_str(body.trim_start_matches('{'));
        return json_response(200, out);
    }
    let derived: Vec<Entity>;
    let names = b.names();
    let rows: Vec<&Entity> = if rest.starts_with("/Balance(") && set == BONUS {
        // Balance() or Balance(Period=datetime'…'): totals of the movements before the date
        let at = rest
            .strip_prefix("/Balance(Period=datetime'")
            .and_then(|r| r.strip_suffix("')"))
            .map(|t| parse_local(t).ok_or(t));
        let at = match at {
            None if rest == "/Balance()" => NaiveDateTime::MAX,
            Some(Ok(t)) => t,
            _ => {
                return odata_error(
                    400,
                    "14",
                    &format!("Неверные параметры виртуальной таблицы: {rest}"),
                );
            }
        };
        derived = b
            .balances(at)
            .into_iter()
            .enumerate()
            .map(|(i, (holder, (accrued, to_burn)))| {
                let mut e = Entity::new(format!("balance:{i:08}"))
                    .with(names.bonus_holder, Val::str(holder))
                    .with("НачисленоBalance", Val::Num(accrued.normalize().to_string()))
                    .with("КСписаниюBalance", Val::Num(to_burn.normalize().to_string()));
                if let Some(p) = names.bonus_program {
                    e.set(p, Val::str(&b.program));
                }
                e
            })
            .collect();
        derived.iter().collect()
    } else if set == BONUS_RECORDS && rest.is_empty() {
        derived = b
            .register()
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let mut e = Entity::new(format!("record:{i:08}"))
                    .with("Period", Val::str(local_text(m.period)))
                    .with("Recorder", Val::str(&m.recorder))
                    .with("LineNumber", Val::str((i + 1).to_string()))
                    .with("Active", Val::Bool(true))
                    .with(
                        "RecordType",
                        Val::str(if m.receipt { "Receipt" } else { "Expense" }),
                    )
                    .with(names.bonus_holder, Val::str(&m.holder))
                    .with("Начислено", Val::Num(m.accrued.normalize().to_string()))
                    .with("КСписанию", Val::Num(m.to_burn.normalize().to_string()));
                if let Some(p) = names.bonus_program {
                    e.set(p, Val::str(&b.program));
                }
                e
            })
            .collect();
        derived.iter().collect()
    } else if rest.is_empty() {
        b.sets.get(set).map(|m| m.values().collect()).unwrap_or_default()
    } else {
        return odata_error(400, "6", &format!("Неверный адрес ресурса: {resource}"));
    };
    let filter = match opt("$filter").map(parse_filter).transpose() {
        Ok(f) => f,
        Err(e) => return odata_error(400, "14", &format!("Неверный параметр $filter: {e}")),
    };
    if let Some(f) = &filter {
        let mut fields = Vec::new();
        filter_fields(f, &mut fields);
        if let Some(bad) = fields
            .iter()
            .find(|f| !property_exists(b, set, f) && !rest.starts_with("/Balance("))
        {
            return odata_error(400, "10", &format!("Сегмент пути \"{bad}\" не найден"));
        }
    }
    let mut rows: Vec<&Entity> = match &filter {
        Some(f) => rows.into_iter().filter(|e| eval(f, e)).collect(),
        None => rows,
    };
    if let Some(order) = opt("$orderby") {
        let keys: Vec<(String, bool)> = split_list(order)
            .into_iter()
            .map(|k| match k.split_once(' ') {
                Some((f, dir)) => (f.to_string(), dir.trim().eq_ignore_ascii_case("desc")),
                None => (k, false),
            })
            .collect();
        rows.sort_by(|a, c| {
            for (f, desc) in &keys {
                let o = cmp_val(a.get(f), c.get(f));
                let o = if *desc { o.reverse() } else { o };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        });
    }
    let count = rows.len();
    let inline = opt("$inlinecount") == Some("allpages");
    if !inline {
        let skip = opt("$skip").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let top = opt("$top")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        rows = rows.into_iter().skip(skip).take(top).collect();
    }
    let mut out = format!("{{\"odata.metadata\":\"{root}/$metadata#{set}\",");
    if inline {
        let _ = write!(out, "\"odata.count\":\"{count}\",");
    }
    out.push_str("\"value\":[");
    for (i, e) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_fields(
            &mut out,
            e.fields.iter().map(|(n, v)| (n.as_str(), v)),
            select.as_deref(),
            &hidden_refs,
        );
    }
    out.push_str("]}");
    json_response(200, out)
}

// --- writing -----------------------------------------------------------------------------

/// `POST /Set` (create) or `POST /Set(guid'…')/Post|Unpost` (an action).
fn write(b: &mut Base, s: &Served, resource: &str, body: &[u8]) -> Reply {
    let root = format!("http://{}/{}/odata/standard.odata", s.addr, s.publication);
    match resource.rsplit_once('/') {
        None => create(b, &root, resource, body),
        Some((target, action)) => {
            let Some((set, key)) = target
                .split_once("(guid'")
                .and_then(|(set, rest)| rest.strip_suffix("')").map(|k| (set, k.to_lowercase())))
            else {
                return odata_error(400, "6", &format!("Неверный адрес ресурса: {resource}"));
            };
            match action {
                "Post" | "Post()" => act(b, set, &key, true),
                "Unpost" | "Unpost()" => act(b, set, &key, false),
                _ => odata_error(400, "6", &format!("Неизвестное действие {action}")),
            }
        }
    }
}

fn valid_guid(s: &str) -> Option<String> {
    let t = s.trim().to_lowercase();
    uuid::Uuid::parse_str(&t).ok().map(|_| t)
}

/// A JSON value (numbers as their literal text) as a property of EDM type `ty`.
fn from_json(ty: &str, v: &serde_json::Value) -> Result<Val, String> {
    use serde_json::Value as J;
    match (ty, v) {
        (_, J::Null) => Ok(default_val(ty)),
        (D, J::String(n)) => Decimal::from_str(n.trim())
            .map(|_| Val::Num(n.trim().to_string()))
            .map_err(|_| format!("{n:?} is not a number")),
        (I, J::String(n)) => n
            .trim()
            .parse::<i64>()
            .map(|_| Val::str(n.trim()))
            .map_err(|_| format!("{n:?} is not an integer")),
        (B, J::Bool(x)) => Ok(Val::Bool(*x)),
        (G, J::String(g)) => valid_guid(g)
            .map(Val::Str)
            .ok_or_else(|| format!("{g:?} is not a GUID")),
        (T, J::String(t)) => NaiveDateTime::parse_from_str(t.trim(), "%Y-%m-%dT%H:%M:%S")
            .map(|d| Val::str(local_text(d)))
            .map_err(|_| format!("{t:?} is not a date")),
        (S, J::String(t)) => Ok(Val::str(t)),
        (_, other) => Err(format!("{other} does not fit {ty}")),
    }
}

/// A tabular section's rows as a POST or PATCH body gives them, read alike by both: each row
/// an object with `LineNumber` (1C's OData fails inside without it), each property of its type
/// or the type's empty value. `Err` is the answer 1C gives.
fn section_rows(
    section: &str,
    props: &[(&'static str, &'static str)],
    rows: &[serde_json::Value],
    hidden: impl Fn(&str) -> bool,
) -> Result<Vec<Vec<(String, Val)>>, Reply> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(r) = r.as_object() else {
            return Err(odata_error(
                400,
                "14",
                &format!("{section}: строка не является объектом"),
            ));
        };
        if !r.contains_key("LineNumber") {
            return Err(odata_error(500, "0", "Произошла внутренняя ошибка OData сервиса"));
        }
        let mut row = Vec::with_capacity(props.len());
        for (p, ty) in props {
            let given = r.get(*p).filter(|_| !hidden(p));
            match given.map(|v| from_json(ty, v)).transpose() {
                Ok(v) => row.push((p.to_string(), v.unwrap_or_else(|| default_val(ty)))),
                Err(why) => {
                    return Err(odata_error(
                        400,
                        "14",
                        &format!("Неверное значение свойства {section}.{p}: {why}"),
                    ));
                }
            }
        }
        out.push(row);
    }
    Ok(out)
}

fn default_val(ty: &str) -> Val {
    match ty {
        D => Val::Num("0".into()),
        B => Val::Bool(false),
        G => Val::str(EMPTY),
        T => Val::str("0001-01-01T00:00:00"),
        _ => Val::str(""),
    }
}

fn entity_json(root: &str, set: &str, e: &Entity) -> String {
    let mut out = format!("{{\"odata.metadata\":\"{root}/$metadata#{set}/@Element\",");
    let mut body = String::new();
    write_fields(
        &mut body,
        e.fields.iter().map(|(n, v)| (n.as_str(), v)),
        None,
        &[],
    );
    out.push_str(body.trim_start_matches('{'));
    out
}

/// Creates an entity from a POST body, as 1C does: the client's `Ref_Key` kept, unknown
/// names ignored, every row with its `LineNumber`.
fn create(b: &mut Base, root: &str, set: &str, body: &[u8]) -> Reply {
    if b.hidden_sets.contains(set) || !b.sets.contains_key(set) {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    }
    let Some(sch) = schema(b.conf).into_iter().find(|x| x.set == set) else {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    };
    let is_document = set.starts_with("Document_");
    if !is_document && !set.starts_with("Catalog_") {
        return odata_error(405, "6", &format!("Запись в {set} не поддерживается"));
    }
    let text = String::from_utf8_lossy(body);
    let fields = match crate::onec::odata::json::parse(&text) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return odata_error(400, "14", "Тело запроса не является объектом JSON"),
    };
    let given_key = fields.get("Ref_Key").filter(|_| !b.own_keys);
    let key = match given_key {
        None => uuid::Uuid::from_u128(b.rng.u128(..)).to_string(),
        Some(serde_json::Value::String(k)) => match valid_guid(k) {
            Some(k) => k,
            None => return odata_error(400, "14", &format!("Неверное значение Ref_Key: {k}")),
        },
        Some(other) => return odata_error(400, "14", &format!("Неверное значение Ref_Key: {other}")),
    };
    if b.sets.get(set).is_some_and(|m| m.contains_key(&key)) {
        return odata_error(400, "15", "Сущность с таким ключом уже существует");
    }
    let hidden = |scope: &str, p: &str| b.hidden_props.contains(&(scope.to_string(), p.to_string()));
    let mut e = Entity::new(key.clone());
    for (p, ty) in &sch.props {
        let given = fields.get(*p).filter(|_| !hidden(set, p));
        let v = match *p {
            "Ref_Key" => Val::str(&key),
            "DataVersion" | "Posted" | "Number" | "Predefined" => continue,
            "Date" if given.is_none() => Val::str(local_text(b.last_date)),
            _ => match given.map(|v| from_json(ty, v)).transpose() {
                Ok(v) => v.unwrap_or_else(|| default_val(ty)),
                Err(why) => return odata_error(400, "14", &format!("Неверное значение свойства {p}: {why}")),
            },
        };
        e.set(p, v);
    }
    for (section, props) in &sch.sections {
        let scope = format!("{set}.{section}");
        let given = fields.get(*section).filter(|_| !hidden(set, section));
        let rows = match given {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(rows)) => rows.clone(),
            Some(_) => return odata_error(400, "14", &format!("{section}: ожидается массив строк")),
        };
        let out = match section_rows(section, props, &rows, |p| hidden(&scope, p)) {
            Ok(out) => out,
            Err(reply) => return reply,
        };
        e.set(section, Val::Rows(out));
    }
    b.created += 1;
    let dv = b.data_version();
    e.set("DataVersion", dv);
    if sch.props.iter().any(|(p, _)| *p == "Posted") {
        e.set("Posted", Val::Bool(false));
    }
    if is_document {
        e.set("Number", Val::str(format!("КП00-{:06}", b.created)));
    } else {
        e.set("Predefined", Val::Bool(false));
    }
    let reply = json_response(201, entity_json(root, set, &e));
    b.put(set, e);
    Reply {
        location: Some(format!("{root}/{set}(guid'{key}')")),
        ..reply
    }
}

/// `PATCH /Set(guid'…')` of a catalog item, as the standard interface changes an object:
/// the properties given replace theirs, unknown names are ignored, and a tabular section
/// given replaces the whole section — its rows not sent are gone (a book on 1C's REST
/// interfaces, rutlib.com/book/43553/p/65: «данные табличной части нужно перезаписывать
/// полностью»; rows cannot be added one by one, code 13), every row with its `LineNumber`.
/// Answers 200 with the object; 404 (code 9) for an unknown key.
fn patch(b: &mut Base, s: &Served, resource: &str, body: &[u8]) -> Reply {
    let root = format!("http://{}/{}/odata/standard.odata", s.addr, s.publication);
    let Some((set, key)) = resource.split_once("(guid'").and_then(|(set, rest)| {
        rest.strip_suffix("')")
            .map(|k| (set.to_string(), k.to_lowercase()))
    }) else {
        return odata_error(400, "6", &format!("Неверный адрес ресурса: {resource}"));
    };
    if b.hidden_sets.contains(&set) || !set.starts_with("Catalog_") {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    }
    let Some(sch) = schema(b.conf).into_iter().find(|x| x.set == set) else {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    };
    if !b.sets.get(&set).is_some_and(|m| m.contains_key(&key)) {
        return odata_error(404, "9", &format!("Не найден объект {set}(guid'{key}')"));
    }
    let text = String::from_utf8_lossy(body);
    let fields = match crate::onec::odata::json::parse(&text) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return odata_error(400, "14", "Тело запроса не является объектом JSON"),
    };
    let hidden = |scope: &str, p: &str| b.hidden_props.contains(&(scope.to_string(), p.to_string()));
    let mut changes: Vec<(String, Val)> = Vec::new();
    for (p, ty) in &sch.props {
        if matches!(*p, "Ref_Key" | "DataVersion" | "Predefined") || hidden(&set, p) {
            continue;
        }
        if let Some(v) = fields.get(*p) {
            match from_json(ty, v) {
                Ok(v) => changes.push((p.to_string(), v)),
                Err(why) => return odata_error(400, "14", &format!("Неверное значение свойства {p}: {why}")),
            }
        }
    }
    for (section, props) in &sch.sections {
        let scope = format!("{set}.{section}");
        let rows = match fields.get(*section).filter(|_| !hidden(&set, section)) {
            None => continue,
            Some(serde_json::Value::Array(rows)) => rows.clone(),
            Some(_) => return odata_error(400, "14", &format!("{section}: ожидается массив строк")),
        };
        let out = match section_rows(section, props, &rows, |p| hidden(&scope, p)) {
            Ok(out) => out,
            Err(reply) => return reply,
        };
        changes.push((section.to_string(), Val::Rows(out)));
    }
    b.patched += 1;
    let dv = b.data_version();
    let Some(e) = b.sets.get_mut(&set).and_then(|m| m.get_mut(&key)) else {
        return odata_error(404, "9", &format!("Не найден объект {set}(guid'{key}')"));
    };
    for (p, v) in changes {
        e.set(&p, v);
    }
    e.set("DataVersion", dv);
    json_response(200, entity_json(&root, &set, e))
}

/// Why the configuration's posting code would refuse the document, if it would.
fn posting_refusal(b: &Base, set: &str, e: &Entity) -> Option<String> {
    if let Some(r) = &b.refuse_posting {
        return Some(r.clone());
    }
    if e.get("DeletionMark") == Some(&Val::Bool(true)) {
        return Some("Помеченный на удаление объект не может быть проведен".into());
    }
    let known = |s: &str, key: &str| b.sets.get(s).is_some_and(|m| m.contains_key(key));
    let rows = |section: &str| match e.get(section) {
        Some(Val::Rows(r)) => r.clone(),
        _ => Vec::new(),
    };
    let n = b.names();
    if set == n.bonus_documents {
        let all: Vec<Vec<(String, Val)>> = [n.accruals, n.writeoffs].iter().flat_map(|s| rows(s)).collect();
        if all.is_empty() {
            return Some("Нет данных для проведения: табличные части не заполнены".into());
        }
        for r in &all {
            let holder = row_text(r, n.bonus_document_holder);
            let holders = if n.bonus_document_holder == n.bonus_holder && n.bonus_holder == "Партнер_Key"
            {
                n.people
            } else {
                n.cards
            };
            if holder == EMPTY || !known(holders, holder) {
                return Some(format!(
                    "Строка {}: не заполнена или не найдена бонусная карта {holder}",
                    row_text(r, "LineNumber")
                ));
            }
            let qty = Decimal::from_str(row_text(r, n.bonus_document_points)).unwrap_or_default();
            if qty <= Decimal::ZERO {
                return Some(format!(
                    "Строка {}: количество баллов должно быть больше нуля",
                    row_text(r, "LineNumber")
                ));
            }
        }
    }
    if set == ACCOUNTING_DOCUMENTS {
        let org = e.get("Организация_Key").and_then(Val::as_text).unwrap_or("");
        if !known(ORGANIZATIONS, org) {
            return Some("Не заполнена организация".into());
        }
        for r in rows("Проводки") {
            for f in ["СчетДт_Key", "СчетКт_Key"] {
                if !known(ACCOUNTS, row_text(&r, f)) {
                    return Some(format!(
                        "Строка {}: не указан счет {f}",
                        row_text(&r, "LineNumber")
                    ));
                }
            }
        }
    }
    None
}

/// `Post` or `Unpost` of a document.
fn act(b: &mut Base, set: &str, key: &str, post: bool) -> Reply {
    if b.hidden_sets.contains(set) || !set.starts_with("Document_") {
        return odata_error(404, "9", &format!("Не найден ресурс {set}"));
    }
    let Some(e) = b.sets.get(set).and_then(|m| m.get(key)).cloned() else {
        return odata_error(404, "9", &format!("Не найден объект {set}(guid'{key}')"));
    };
    if post && let Some(why) = posting_refusal(b, set, &e) {
        return odata_error(500, "-1", &why);
    }
    let dv = b.data_version();
    if let Some(e) = b.sets.get_mut(set).and_then(|m| m.get_mut(key)) {
        e.set("Posted", Val::Bool(post));
        e.set("DataVersion", dv);
    }
    Reply {
        status: 200,
        content_type: "",
        body: String::new(),
        challenge: false,
        location: None,
    }
}

/// Whether `name` (`Field` or `Section/Field`) is a published property of `set`.
fn property_exists(b: &Base, set: &str, name: &str) -> bool {
    if name == "*" || name == "**" {
        return true;
    }
    let hidden = |scope: &str, p: &str| b.hidden_props.contains(&(scope.to_string(), p.to_string()));
    let Some(sch) = schema(b.conf).into_iter().find(|s| s.set == set) else {
        return false;
    };
    match name.split_once('/') {
        None => {
            (sch.props.iter().any(|(p, _)| *p == name) || sch.sections.iter().any(|(p, _)| *p == name))
                && !hidden(set, name)
        }
        Some((section, field)) => sch.sections.iter().any(|(s, props)| {
            *s == section
                && !hidden(set, section)
                && props.iter().any(|(p, _)| *p == field)
                && !hidden(&format!("{set}.{section}"), field)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "kopilka:секрет-1"] {
            assert_eq!(unbase64(&base64(s.as_bytes())).as_deref(), Some(s.as_bytes()));
        }
        assert_eq!(base64(b"\0\0\0\x07\0\0\0\0"), "AAAABwAAAAA=");
    }

    #[test]
    fn filters_parse_and_evaluate_like_1c() {
        let e = Entity::new("k")
            .with("Date", Val::str("2026-01-10T10:00:00"))
            .with("Posted", Val::Bool(true))
            .with("Ref_Key", Val::str("AB"))
            .with("Сумма", Val::Num("10.5".into()))
            .with("Комментарий", Val::str("it's"));
        let t = |f: &str| eval(&parse_filter(f).unwrap_or_else(|e| panic!("{f}: {e}")), &e);
        assert!(t("Date ge datetime'2026-01-10T10:00:00'"));
        assert!(!t("Date gt datetime'2026-01-10T10:00:00'"));
        assert!(t("Date lt datetime'2026-01-11T00:00:00' and Posted eq true"));
        assert!(t("not (Posted eq false) or Сумма gt 100"));
        assert!(t("Ref_Key eq guid'ab'"));
        assert!(t("Сумма gt 10.25"));
        assert!(t("Комментарий eq 'it''s'"));
        assert!(parse_filter("Date ge").is_err());
        assert!(parse_filter("(Date ge datetime'x')").is_err());
    }

    #[test]
    fn percent_decoding_takes_utf8_and_plus() {
        assert_eq!(percent_decode("Document_%D0%A7%D0%B5%D0%BA"), "Document_Чек");
        assert_eq!(percent_decode("a+b%20c%"), "a b c%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
