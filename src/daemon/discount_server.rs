//! «Дисконтный сервер»: the SOAP service 1С:Розница 2.x pushes every card document to and reads
//! bonus balances from, answered by kopilka, so a shop sets `АдресДисконтногоСервера` to
//! kopilka and changes nothing in the configuration.
//!
//! The contract is the one Розница's client code needs (`../shared/specs/onec-till-protocols.md`
//! §1, read from DeZargo/1c_retail_apple @ 896da2e1: `CommonModules/ДисконтныйСервер`,
//! `WebServices/ДисконтныйСервер.xml`, `XDTOPackages/ДисконтныйСервер`):
//! - every call is a WSDL GET (`WSОпределения`) then a POST to the WSDL's `soap:address` of
//!   port `ДисконтныйСерверSoap`, both with Basic auth; the WSDL is document/literal wrapped
//!   in the namespace `http://localhost/rt2discountservice` and declares the types the
//!   answers really carry (§1.4 "real returns"), so 1C's XDTO reads their properties;
//! - requests are dispatched on the name of the Body's first element, never on `SOAPAction`;
//! - `ОбновитьДанныеОПродажах` answers `true` for anything kopilka has taken care of, a bad
//!   document included (it is quarantined: `false` would make 1C resend it daily for ever and
//!   skip the bonus call, §1.5 point 2); only a ledger that cannot be written (or a 1C that
//!   cannot be asked about a card) is a Fault, which 1C's queue retries.
//!
//! Ledger terms (§1.6): the sales table of one document is one ledger document of source
//! `<[onec] system>:discount_server`, id = the document's GUID, version = a hash of its
//! content, so the same table again changes nothing, another table replaces the old one and
//! an empty table (an un-posted document) voids it. Negative rows are a return. With
//! `[onec.odata]` the poll reads the same receipts, so pushes are answered and not recorded
//! unless `record_sales` says so. Розница's card is its `Справочник.ИнформационныеКарты` ref
//! GUID: with `[onec.odata]` it is read from 1C as the poll reads a receipt's card (its number
//! and owner), otherwise the ledger knows the customer by the key `onec:card:<GUID>`
//! ([`card_key`]). Balances are the card's free points (`spendable`); turnover and the last
//! purchase come from the documents in force. Point movements Розница computes
//! (`ОбновитьДанныеОБонусах`) are not recorded: kopilka accrues by its own rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::NaiveDateTime;
use quick_xml::events::Event;
use rust_decimal::Decimal;

use super::JobContext;
use crate::config::DiscountServerConfig;
use crate::core::document::{
    DocKind, Document, Incoming, Line, Rejected, SourceRef, VoidReason, content_version,
};
use crate::core::identity::CustomerIdentity;
use crate::core::money::{Money, Points};
use crate::ledger::{Batch, HoldError, IngestReport, Item, LedgerError};
use crate::onec::odata::poll::{OdataPoller, to_utc};

/// The service's namespace (`WSX:13`).
pub const NAMESPACE: &str = "http://localhost/rt2discountservice";
const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// A request body larger than this is refused (a receipt of 10 000 lines is ~4 MiB).
const MAX_BODY_BYTES: usize = 16 << 20;
/// Elements nested deeper than this are not a Розница request.
const MAX_DEPTH: usize = 32;
const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// The eight operations, in `WSX` order, with their parameters (name, XSD type) in the order
/// WSПрокси writes them (§1.3) and the type the answer really carries (§1.4).
/// (name, XSD type) of a parameter or property.
type Field = (&'static str, &'static str);
/// (operation, its parameters, the type its answer carries).
pub type Operation = (&'static str, &'static [Field], &'static str);
/// (property, type — `?` marks nillable —, a list).
type Property = (&'static str, &'static str, bool);

pub const OPERATIONS: &[Operation] = &[
    (
        "ПолучитьСуммуНакопления",
        &[
            ("ИдентификаторКарты", "xs:string"),
            ("ДатаНачала", "xs:dateTime"),
            ("ДатаОкончания", "xs:dateTime"),
            ("ИдентификаторСегмента", "xs:string"),
            ("ИдентификаторИсключаемогоДокументта", "xs:string"),
        ],
        "tns:РезультатЗапросаОНакоплениях",
    ),
    (
        "ПолучитьДанныеПоследнейПокупки",
        &[
            ("ИдентификаторКарты", "xs:string"),
            ("ДатаРасчета", "xs:dateTime"),
            ("ИдентификаторСегмента", "xs:string"),
            ("ИдентификаторИсключаемогоДокументта", "xs:string"),
        ],
        "tns:РезультатЗапросаОПоследнейПокупке",
    ),
    (
        "ПолучитьОстатокБонусов",
        &[
            ("ИдентификаторКарты", "xs:string"),
            ("ДатаЗапроса", "xs:dateTime"),
        ],
        "tns:РезультатЗапросаОБонусах",
    ),
    (
        "ПолучитьОстатокБонусовРасширенный",
        &[
            ("ИдентификаторКарты", "xs:string"),
            ("ДатаЗапроса", "xs:dateTime"),
        ],
        "tns:РезультатЗапросаОБонусахРасширенный",
    ),
    (
        "ОбновитьДанныеОПродажах",
        &[
            ("ТипДокумента", "xs:string"),
            ("ИдентификаторДокумента", "xs:string"),
            ("ТаблицаТоваров", "tns:ТаблицаПродаж"),
        ],
        "xs:boolean",
    ),
    (
        "ОбновитьДанныеОБонусах",
        &[
            ("ТипДокумента", "xs:string"),
            ("ИдентификаторДокумента", "xs:string"),
            ("ТаблицаБонусов", "tns:ТаблицаБонусов"),
        ],
        "xs:boolean",
    ),
    (
        "ОбновитьДанныеОКупонах",
        &[
            ("ТипДокумента", "xs:string"),
            ("ИдентификаторДокумента", "xs:string"),
            ("ТаблицаКупонов", "tns:ТаблицаКупонов"),
        ],
        "xs:boolean",
    ),
    (
        "ПолучитьСкидкиПоКупону",
        &[("КодКупона", "xs:string"), ("ДатаЗапроса", "xs:dateTime")],
        "tns:ТаблицаКупонов",
    ),
];

/// The XDTO package (`PKG:1-66`): object types and their properties (name, type, list).
const TYPES: &[(&str, &[Property])] = &[
    (
        "СтрокаРезультатаЗапросаОНакоплениях",
        &[
            ("СуммаНакопления", "xs:decimal", false),
            ("КоличествоНакопления", "xs:decimal", false),
        ],
    ),
    (
        "РезультатЗапросаОНакоплениях",
        &[(
            "РезультатЗапроса",
            "tns:СтрокаРезультатаЗапросаОНакоплениях",
            true,
        )],
    ),
    (
        "СтрокаРезультатаЗапросаОПоследнейПокупке",
        &[
            ("ДатаПокупки", "xs:dateTime", false),
            ("СуммаНакопления", "xs:decimal", false),
            ("КоличествоНакопления", "xs:decimal", false),
        ],
    ),
    (
        "РезультатЗапросаОПоследнейПокупке",
        &[(
            "РезультатЗапроса",
            "tns:СтрокаРезультатаЗапросаОПоследнейПокупке",
            true,
        )],
    ),
    (
        "СтрокаРезультатаЗапросаОБонусах",
        &[
            ("ДатаОперации", "xs:dateTime", false),
            ("КоличествоБаллов", "xs:decimal", false),
        ],
    ),
    (
        "РезультатЗапросаОБонусах",
        &[("РезультатЗапроса", "tns:СтрокаРезультатаЗапросаОБонусах", true)],
    ),
    (
        "СтрокаРезультатаЗапросаОБонусахРасширенного",
        &[
            ("ПредставлениеПериода", "xs:string", false),
            ("КоличествоБаллов", "xs:decimal", false),
            ("Изменение", "xs:decimal", false),
            ("ТекущийОстаток", "xs:boolean", false),
        ],
    ),
    (
        "РезультатЗапросаОБонусахРасширенный",
        &[(
            "РезультатЗапроса",
            "tns:СтрокаРезультатаЗапросаОБонусахРасширенного",
            true,
        )],
    ),
    (
        "СтрокаТаблицыПродаж",
        &[
            ("Период", "xs:dateTime", false),
            ("ИдентификаторКарты", "xs:string?", false),
            ("ИдентификаторНоменклатуры", "xs:string?", false),
            ("ИдентификаторХарактеристики", "xs:string?", false),
            ("Сумма", "xs:decimal?", false),
            ("Количество", "xs:decimal?", false),
        ],
    ),
    (
        "ТаблицаПродаж",
        &[("СтрокиТаблицы", "tns:СтрокаТаблицыПродаж", true)],
    ),
    (
        "СтрокаТаблицыБонусов",
        &[
            ("Период", "xs:dateTime", false),
            ("ВидДвижения", "xs:decimal", false),
            ("ИдентификаторБонуснойПрограммы", "xs:string?", false),
            ("ИдентификаторКарты", "xs:string?", false),
            ("Начислено", "xs:decimal?", false),
            ("КСписанию", "xs:decimal?", false),
        ],
    ),
    (
        "ТаблицаБонусов",
        &[("СтрокиТаблицы", "tns:СтрокаТаблицыБонусов", true)],
    ),
    (
        "СтрокаТаблицыКупонов",
        &[
            ("Период", "xs:dateTime", false),
            ("ИдентификаторСкидки", "xs:string?", false),
            ("КодКупона", "xs:string?", false),
            ("Состояние", "xs:string?", false),
            ("ИдентификаторМагазина", "xs:string?", false),
            ("ПериодДействия", "xs:dateTime", false),
        ],
    ),
    (
        "ТаблицаКупонов",
        &[("СтрокиТаблицы", "tns:СтрокаТаблицыКупонов", true)],
    ),
];

/// The routes, when `[onec.discount_server]` is configured: `GET PATH?wsdl` and `POST PATH`.
pub fn router(ctx: JobContext) -> Option<Router> {
    let onec = ctx.cfg.onec.as_ref()?;
    let path = onec.discount_server.as_ref()?.path.clone();
    let cards = if onec.odata.is_some() {
        match OdataPoller::new(ctx.cfg.clone()) {
            Ok(poller) => Cards::Odata {
                poller: Box::new(poller),
                known: Mutex::new(HashMap::new()),
            },
            Err(e) => {
                tracing::error!(error = %e, "[onec.odata] is unusable: the discount server cannot read Розница's cards");
                Cards::Broken(e.to_string())
            }
        }
    } else {
        Cards::ByGuid
    };
    Some(
        Router::new()
            .route(&path, get(wsdl_handler).post(soap_handler))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(Ds {
                ctx,
                cards: Arc::new(cards),
            }),
    )
}

#[derive(Clone)]
struct Ds {
    ctx: JobContext,
    cards: Arc<Cards>,
}

/// How Розница's card ref GUID becomes a ledger customer.
enum Cards {
    /// No `[onec.odata]`: the customer is known by the key `onec:card:<guid>` alone.
    ByGuid,
    /// Through 1C's OData, as the poll names a receipt's customer (the card's number, its
    /// owner): the same customer the polled receipts, `import-balances --from-1c` and the
    /// tills' card numbers reach. A card once read is remembered for the daemon's life.
    Odata {
        poller: Box<OdataPoller>,
        known: Mutex<HashMap<String, CustomerIdentity>>,
    },
    /// `[onec.odata]` is configured but cannot be used: card calls fail (transient).
    Broken(String),
}

impl Cards {
    /// The customer of a card GUID. `Err`: 1C could not be asked (a retry may cure it);
    /// `Ok(Err(reason))`: there is no such card.
    async fn customer(&self, guid: &str) -> Result<Result<CustomerIdentity, String>, String> {
        match self {
            Cards::ByGuid => Ok(Ok(by_guid(guid))),
            Cards::Broken(why) => Err(format!("[onec.odata] is unusable: {why}")),
            Cards::Odata { poller, known } => {
                if let Some(id) = known.lock().unwrap_or_else(|e| e.into_inner()).get(guid) {
                    return Ok(Ok(id.clone()));
                }
                let found = poller
                    .card_customer(guid)
                    .await
                    .map_err(|e| format!("1C's card {guid} could not be read over OData: {e}"))?;
                if let Ok(id) = &found {
                    known
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(guid.to_string(), id.clone());
                }
                Ok(found)
            }
        }
    }
}

/// The identity of a card known by its GUID alone (no `[onec.odata]`).
fn by_guid(guid: &str) -> CustomerIdentity {
    CustomerIdentity {
        onec_id: Some(card_key(guid).trim_start_matches("onec:").to_string()),
        ..Default::default()
    }
}

/// How the ledger's customer lookup is asked for this identity: the card number first.
fn lookup_text(id: &CustomerIdentity) -> Option<String> {
    id.card
        .clone()
        .or_else(|| id.onec_id.as_ref().map(|o| format!("onec:{o}")))
        .or_else(|| id.phone.as_ref().map(|p| p.as_str().to_string()))
        .or_else(|| id.email.as_ref().map(|e| e.as_str().to_string()))
}

/// The customer key a Розница card ref GUID is kept under (`onec:card:<guid>`, lower case).
pub fn card_key(card_guid: &str) -> String {
    format!("onec:card:{}", card_guid.trim().to_ascii_lowercase())
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The WSDL 1C's `WSОпределения` reads: document/literal wrapped, one SOAP 1.1 port whose
/// address is `location`.
pub fn wsdl(location: &str) -> String {
    let mut s = String::with_capacity(16 << 10);
    s.push_str(&format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<definitions xmlns=\"http://schemas.xmlsoap.org/wsdl/\" \
         xmlns:soap=\"http://schemas.xmlsoap.org/wsdl/soap/\" xmlns:xs=\"http://www.w3.org/2001/XMLSchema\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:tns=\"{NAMESPACE}\" name=\"ДисконтныйСервер\" \
         targetNamespace=\"{NAMESPACE}\">\n<types>\n<xs:schema targetNamespace=\"{NAMESPACE}\" \
         attributeFormDefault=\"unqualified\" elementFormDefault=\"qualified\">\n"
    ));
    for (name, props) in TYPES {
        s.push_str(&format!("<xs:complexType name=\"{name}\"><xs:sequence>"));
        for (prop, ty, list) in *props {
            let (ty, nillable) = match ty.strip_suffix('?') {
                Some(t) => (t, true),
                None => (*ty, *list),
            };
            let occurs = if *list {
                " minOccurs=\"0\" maxOccurs=\"unbounded\""
            } else {
                ""
            };
            let nil = if nillable { " nillable=\"true\"" } else { "" };
            s.push_str(&format!(
                "<xs:element name=\"{prop}\" type=\"{ty}\"{occurs}{nil}/>"
            ));
        }
        s.push_str("</xs:sequence></xs:complexType>\n");
    }
    for (op, params, ret) in OPERATIONS {
        s.push_str(&format!(
            "<xs:element name=\"{op}\"><xs:complexType><xs:sequence>"
        ));
        for (p, ty) in *params {
            // the coupons table is the one nillable parameter (`WSX:477`)
            let nil = if *p == "ТаблицаКупонов" {
                " nillable=\"true\""
            } else {
                ""
            };
            s.push_str(&format!("<xs:element name=\"{p}\" type=\"{ty}\"{nil}/>"));
        }
        s.push_str("</xs:sequence></xs:complexType></xs:element>\n");
        // every return is nillable except the coupon discounts (`WSX:513`)
        let nil = if *op == "ПолучитьСкидкиПоКупону" {
            ""
        } else {
            " nillable=\"true\""
        };
        s.push_str(&format!(
            "<xs:element name=\"{op}Response\"><xs:complexType><xs:sequence>\
             <xs:element name=\"return\" type=\"{ret}\"{nil}/></xs:sequence></xs:complexType></xs:element>\n"
        ));
    }
    s.push_str("</xs:schema>\n</types>\n");
    for (op, _, _) in OPERATIONS {
        s.push_str(&format!(
            "<message name=\"{op}RequestMessage\"><part name=\"parameters\" element=\"tns:{op}\"/></message>\n\
             <message name=\"{op}ResponseMessage\"><part name=\"parameters\" element=\"tns:{op}Response\"/></message>\n"
        ));
    }
    s.push_str("<portType name=\"ДисконтныйСерверPortType\">\n");
    for (op, _, _) in OPERATIONS {
        s.push_str(&format!(
            "<operation name=\"{op}\"><input message=\"tns:{op}RequestMessage\"/>\
             <output message=\"tns:{op}ResponseMessage\"/></operation>\n"
        ));
    }
    s.push_str(
        "</portType>\n<binding name=\"ДисконтныйСерверSoapBinding\" type=\"tns:ДисконтныйСерверPortType\">\n\
         <soap:binding style=\"document\" transport=\"http://schemas.xmlsoap.org/soap/http\"/>\n",
    );
    for (op, _, _) in OPERATIONS {
        s.push_str(&format!(
            "<operation name=\"{op}\"><soap:operation style=\"document\" \
             soapAction=\"{NAMESPACE}#ДисконтныйСервер:{op}\"/>\
             <input><soap:body use=\"literal\"/></input><output><soap:body use=\"literal\"/></output></operation>\n"
        ));
    }
    s.push_str(&format!(
        "</binding>\n<service name=\"ДисконтныйСервер\">\n<port name=\"ДисконтныйСерверSoap\" \
         binding=\"tns:ДисконтныйСерверSoapBinding\">\n<documentation>\n<wsi:Claim \
         xmlns:wsi=\"http://ws-i.org/schemas/conformanceClaim/\" conformsTo=\"http://ws-i.org/profiles/basic/1.1\"/>\n\
         </documentation>\n<soap:address location=\"{}\"/>\n</port>\n</service>\n</definitions>\n",
        esc(location)
    ));
    s
}

/// Basic auth with the configured login and password.
fn authorized(cfg: &DiscountServerConfig, headers: &HeaderMap) -> bool {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    cfg.password.matches_basic(&cfg.user, header)
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"kopilka\", charset=\"UTF-8\"",
        )],
        "",
    )
        .into_response()
}

fn discount_config(ctx: &JobContext) -> Option<DiscountServerConfig> {
    ctx.cfg.onec.as_ref().and_then(|o| o.discount_server.clone())
}

/// The address Розница posts to: `public_url`, else `http://` + the request's `Host` + path
/// (a `Host` that is not a plain host[:port] is replaced by `localhost`).
fn location(ds: &DiscountServerConfig, headers: &HeaderMap) -> String {
    if let Some(u) = &ds.public_url {
        return u.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        })
        .unwrap_or("localhost");
    format!("http://{host}{}", ds.path)
}

async fn wsdl_handler(
    State(Ds { ctx, .. }): State<Ds>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(ds) = discount_config(&ctx) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(&ds, &headers) {
        return unauthorized();
    }
    let asks_wsdl = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|p| p.split('=').next().unwrap_or("").eq_ignore_ascii_case("wsdl"));
    if !asks_wsdl {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "kopilka: the discount server's description is at this address with ?wsdl",
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        wsdl(&location(&ds, &headers)),
    )
        .into_response()
}

/// One element of a request: local name (prefix dropped), text, `xsi:nil`, children.
#[derive(Debug, Default)]
pub struct El {
    pub name: String,
    pub text: String,
    pub nil: bool,
    pub children: Vec<El>,
}

impl El {
    fn child(&self, name: &str) -> Option<&El> {
        self.children.iter().find(|c| c.name == name)
    }

    /// A child's trimmed text; `""` when absent or nil.
    fn value(&self, name: &str) -> &str {
        self.child(name).filter(|c| !c.nil).map_or("", |c| c.text.trim())
    }
}

fn local(name: &[u8]) -> String {
    let n = name.rsplit(|b| *b == b':').next().unwrap_or(name);
    String::from_utf8_lossy(n).into_owned()
}

/// Reads an XML document into a tree of [`El`]: namespaces are not resolved (Розница's
/// prefixes vary), a DTD is refused, depth is bounded.
pub fn parse_xml(body: &[u8]) -> Result<El, String> {
    let mut reader = quick_xml::Reader::from_reader(body);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<El> = vec![El::default()];
    let mut buf = Vec::new();
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("not XML at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(e) => open(&mut stack, &e)?,
            Event::Empty(e) => {
                open(&mut stack, &e)?;
                close(&mut stack)?;
            }
            Event::End(_) => close(&mut stack)?,
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.decode().map_err(|e| format!("text cannot be decoded: {e}"))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c,
                    Ok(None) => match &*r {
                        b"amp" => '&',
                        b"lt" => '<',
                        b"gt" => '>',
                        b"quot" => '"',
                        b"apos" => '\'',
                        other => {
                            return Err(format!("unknown entity &{};", String::from_utf8_lossy(other)));
                        }
                    },
                    Err(e) => return Err(format!("bad character reference: {e}")),
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push(c);
                }
            }
            Event::DocType(_) => return Err("a DTD is not accepted".into()),
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if stack.len() != 1 {
        return Err("the document ends inside an element".into());
    }
    let root = stack.pop().unwrap_or_default();
    root.children
        .into_iter()
        .next()
        .ok_or_else(|| "no root element".to_string())
}

fn open(stack: &mut Vec<El>, e: &quick_xml::events::BytesStart<'_>) -> Result<(), String> {
    let mut el = El {
        name: local(e.name().as_ref()),
        ..El::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|err| format!("bad attribute: {err}"))?;
        if local(a.key.as_ref()) == "nil" {
            let v = String::from_utf8_lossy(&a.value).to_ascii_lowercase();
            el.nil = v == "true" || v == "1";
        }
    }
    stack.push(el);
    if stack.len() > MAX_DEPTH {
        return Err(format!("elements nested deeper than {MAX_DEPTH}"));
    }
    Ok(())
}

fn close(stack: &mut Vec<El>) -> Result<(), String> {
    if stack.len() < 2 {
        return Err("an end tag without its start".into());
    }
    let el = stack.pop().unwrap_or_default();
    if let Some(parent) = stack.last_mut() {
        parent.children.push(el);
    }
    Ok(())
}

/// The operation element of a SOAP envelope (SOAP 1.1 or 1.2): the Body's first child.
pub fn operation(envelope: &El) -> Result<&El, String> {
    if envelope.name != "Envelope" {
        return Err(format!("<{}> is not a SOAP Envelope", envelope.name));
    }
    envelope
        .child("Body")
        .ok_or("the envelope has no Body")?
        .children
        .first()
        .ok_or_else(|| "the Body is empty".to_string())
}

fn envelope(inner: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soap:Envelope xmlns:soap=\"{SOAP11}\">\
         <soap:Header/><soap:Body>{inner}</soap:Body></soap:Envelope>"
    )
}

fn xml_ok(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A SOAP 1.1 Fault: `soap:Client` for a request kopilka cannot read, `soap:Server` for
/// trouble on kopilka's side that a retry may cure.
fn fault(client: bool, reason: &str) -> Response {
    let code = if client { "soap:Client" } else { "soap:Server" };
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        envelope(&format!(
            "<soap:Fault><faultcode>{code}</faultcode><faultstring>{}</faultstring></soap:Fault>",
            esc(reason)
        )),
    )
        .into_response()
}

/// `<m:OpResponse><m:return …>inner</m:return></m:OpResponse>`; with `ty`, the return carries
/// `xsi:type` too (the WSDL already declares it; a client reading an older WSDL still knows).
fn reply(op: &str, ty: Option<&str>, inner: &str) -> Response {
    let ty = ty.map_or(String::new(), |t| {
        format!(" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xsi:type=\"m:{t}\"")
    });
    xml_ok(envelope(&format!(
        "<m:{op}Response xmlns:m=\"{NAMESPACE}\"><m:return{ty}>{inner}</m:return></m:{op}Response>"
    )))
}

async fn soap_handler(State(state): State<Ds>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = &state.ctx;
    let Some(ds) = discount_config(ctx) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(&ds, &headers) {
        return unauthorized();
    }
    let tree = match parse_xml(&body) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "discount server request is not XML");
            return fault(true, &format!("kopilka: {e}"));
        }
    };
    let op = match operation(&tree) {
        Ok(op) => op,
        Err(e) => {
            tracing::warn!(error = %e, "discount server request is not a SOAP call");
            return fault(true, &format!("kopilka: {e}"));
        }
    };
    let name = op.name.as_str();
    let result = match name {
        // the OData poll records the same receipts (`record_sales`, README)
        "ОбновитьДанныеОПродажах" if !ds.record_sales => Ok(reply(name, None, "true")),
        "ОбновитьДанныеОПродажах" => {
            sales(&state, op).await.map(|_| reply(name, None, "true"))
        }
        // kopilka accrues by its own rules: Розница's movements are not recorded (README)
        "ОбновитьДанныеОБонусах" => Ok(reply(name, None, "true")),
        "ОбновитьДанныеОКупонах" => {
            coupons_used(&state, op).await.map(|_| reply(name, None, "true"))
        }
        "ПолучитьОстатокБонусов" => balance(&state, op).await.map(|(points, date)| {
            reply(
                name,
                Some("РезультатЗапросаОБонусах"),
                &format!(
                    "<m:РезультатЗапроса><m:ДатаОперации>{date}</m:ДатаОперации>\
                     <m:КоличествоБаллов>{points}</m:КоличествоБаллов></m:РезультатЗапроса>"
                ),
            )
        }),
        "ПолучитьОстатокБонусовРасширенный" => {
            balance(&state, op).await.map(|(points, _)| {
                reply(
                    name,
                    Some("РезультатЗапросаОБонусахРасширенный"),
                    &format!(
                        "<m:РезультатЗапроса><m:ПредставлениеПериода>Сейчас</m:ПредставлениеПериода>\
                     <m:КоличествоБаллов>{points}</m:КоличествоБаллов><m:Изменение>0</m:Изменение>\
                     <m:ТекущийОстаток>true</m:ТекущийОстаток></m:РезультатЗапроса>"
                    ),
                )
            })
        }
        "ПолучитьСуммуНакопления" => {
            accumulation(&state, op).await.map(|(sum, qty)| {
                reply(
                    name,
                    Some("РезультатЗапросаОНакоплениях"),
                    &format!(
                        "<m:РезультатЗапроса><m:СуммаНакопления>{sum}</m:СуммаНакопления>\
                     <m:КоличествоНакопления>{qty}</m:КоличествоНакопления></m:РезультатЗапроса>"
                    ),
                )
            })
        }
        "ПолучитьДанныеПоследнейПокупки" => {
            last_purchase(&state, op).await.map(|row| {
                let inner = row.map_or(String::new(), |(date, sum, qty)| {
                    format!(
                        "<m:РезультатЗапроса><m:ДатаПокупки>{date}</m:ДатаПокупки>\
                     <m:СуммаНакопления>{sum}</m:СуммаНакопления>\
                     <m:КоличествоНакопления>{qty}</m:КоличествоНакопления></m:РезультатЗапроса>"
                    )
                });
                reply(name, Some("РезультатЗапросаОПоследнейПокупке"), &inner)
            })
        }
        "ПолучитьСкидкиПоКупону" => coupon(&state, op)
            .await
            .map(|rows| reply(name, Some("ТаблицаКупонов"), &rows)),
        other => {
            tracing::warn!(operation = %other, "discount server operation unknown");
            return fault(true, &format!("kopilka does not serve the operation {other:?}"));
        }
    };
    result.unwrap_or_else(|e| {
        tracing::error!(operation = %name, error = %e, "discount server call failed");
        fault(false, &format!("kopilka: {e}"))
    })
}

/// A 1C dateTime as Розница writes it (local time, no zone); `None` for 1C's empty date.
fn local_date(text: &str) -> Option<NaiveDateTime> {
    let t = text.trim();
    let t = t.split(['Z', '+']).next().unwrap_or(t);
    NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S"))
        .ok()
        .filter(|d| chrono::Datelike::year(d) > 1)
}

/// A 1C local dateTime as an instant in the shop's zone; `None` for 1C's empty date.
fn instant(text: &str, tz: chrono_tz::Tz) -> Option<chrono::DateTime<chrono::Utc>> {
    local_date(text)
        .and_then(|d| d.and_local_timezone(tz).earliest())
        .map(|d| d.with_timezone(&chrono::Utc))
}

/// An `xs:decimal` (`-120.5`, `3`) in kopecks; more than two decimals is not money.
pub fn kopecks(text: &str) -> Option<i64> {
    let d = xs_decimal(text)?;
    let k = d * Decimal::ONE_HUNDRED;
    if !k.fract().is_zero() {
        return None;
    }
    i64::try_from(k).ok()
}

/// An `xs:decimal`: digits, one optional sign and point, no exponent.
fn xs_decimal(text: &str) -> Option<Decimal> {
    let t = text.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    t.parse().ok()
}

fn is_guid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

/// Turns one sales push into a ledger item. `system` is the ledger's source system, `stamp`
/// orders pushes of one document (Розница always sends the current state).
pub fn sales_push(op: &El, system: &str, currency: &str, tz: chrono_tz::Tz, stamp: i64) -> Item {
    let doc_type = op.value("ТипДокумента").to_string();
    let doc_id = op.value("ИдентификаторДокумента").to_ascii_lowercase();
    let reject = |reason: String| {
        Item::Rejected(Rejected {
            system: system.to_string(),
            doc_ref: if doc_id.is_empty() {
                format!("{doc_type}:?")
            } else {
                doc_id.clone()
            },
            reason,
            location: Some(format!("discount server: {doc_type} {doc_id}")),
            excerpt: None,
            // Розница's push names no number; the kind is the document's metadata name
            kind: (!doc_type.is_empty()).then(|| doc_type.clone()),
            number: None,
            occurred_at: None,
        })
    };
    if !is_guid(&doc_id) || doc_id == ZERO_GUID {
        return reject(format!(
            "ИдентификаторДокумента {doc_id:?} is not a document GUID"
        ));
    }
    let rows: Vec<&El> = op
        .child("ТаблицаТоваров")
        .map(|t| t.children.iter().filter(|c| c.name == "СтрокиТаблицы").collect())
        .unwrap_or_default();
    if rows.is_empty() {
        // an un-posted document arrives with no rows (`DS:621`)
        return Item::Incoming(Incoming::Void {
            source: SourceRef {
                system: system.to_string(),
                doc_id,
                version: "void".into(),
                stamp: Some(stamp),
            },
            reason: VoidReason::Unposted,
        });
    }
    let mut card: Option<String> = None;
    let mut date: Option<NaiveDateTime> = None;
    let mut signed: Vec<(String, Decimal, i64)> = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let n = i + 1;
        let c = r.value("ИдентификаторКарты").to_ascii_lowercase();
        if !is_guid(&c) || c == ZERO_GUID {
            return reject(format!("row {n}: ИдентификаторКарты {c:?} is not a card GUID"));
        }
        match &card {
            Some(first) if *first != c => {
                return reject(format!("row {n}: a second card {c} (row 1 has {first})"));
            }
            _ => card = Some(c),
        }
        let period = r.value("Период");
        let Some(d) = local_date(period) else {
            return reject(format!("row {n}: Период {period:?} is not a date"));
        };
        date.get_or_insert(d);
        let item = r.value("ИдентификаторНоменклатуры").to_ascii_lowercase();
        if !is_guid(&item) || item == ZERO_GUID {
            return reject(format!(
                "row {n}: ИдентификаторНоменклатуры {item:?} is not an item GUID"
            ));
        }
        let variant = r.value("ИдентификаторХарактеристики").to_ascii_lowercase();
        // as the OData poll names products: `item#variant` for a real characteristic
        let product = if variant.is_empty() || variant == ZERO_GUID {
            item
        } else {
            format!("{item}#{variant}")
        };
        let sum = r.value("Сумма");
        let Some(net) = kopecks(sum) else {
            return reject(format!(
                "row {n}: Сумма {sum:?} is not an amount in rubles and kopecks"
            ));
        };
        let qty = r.value("Количество");
        let Some(quantity) = xs_decimal(qty) else {
            return reject(format!("row {n}: Количество {qty:?} is not a number"));
        };
        signed.push((product, quantity, net));
    }
    // a return arrives negated (`DS:604-611`): every row ≤ 0
    let negative = signed.iter().any(|(_, q, s)| *q < Decimal::ZERO || *s < 0);
    let positive = signed.iter().any(|(_, q, s)| *q > Decimal::ZERO || *s > 0);
    if negative && positive {
        return reject("rows of both signs: neither a sale nor a return".into());
    }
    let kind = if negative { DocKind::Return } else { DocKind::Sale };
    let lines: Vec<Line> = signed
        .into_iter()
        .map(|(product, quantity, net)| {
            let (quantity, net) = (quantity.abs(), net.abs());
            // the table has no price: net ÷ quantity, to the kopeck
            let unit_price = if quantity.is_zero() {
                0
            } else {
                (Decimal::from(net) / quantity)
                    .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
                    .try_into()
                    .unwrap_or(0)
            };
            Line {
                name: product.clone(),
                product_id: product,
                category: None,
                category_parents: Vec::new(),
                quantity,
                unit_price: Money(unit_price),
                discount: Money(0),
                net: Money(net),
                unit_cost: None,
                service: false,
            }
        })
        .collect();
    let total = Money(lines.iter().map(|l| l.net.0).sum());
    let card = card.unwrap_or_default();
    let mut doc = Document {
        source: SourceRef {
            system: system.to_string(),
            doc_id,
            version: String::new(),
            stamp: Some(stamp),
        },
        kind,
        number: None,
        occurred_at: to_utc(date.unwrap_or_default(), tz),
        customer: by_guid(&card),
        currency: currency.to_string(),
        lines,
        total,
        points_redeemed: Points(0),
        original: None,
        store: None,
        partner: None,
    };
    doc.source.version = content_version(&doc);
    Item::Incoming(Incoming::Document(doc))
}

async fn sales(ds: &Ds, op: &El) -> Result<IngestReport, String> {
    let ctx = &ds.ctx;
    let system = format!(
        "{}:discount_server",
        ctx.cfg.onec.as_ref().map_or("onec", |o| o.system.as_str())
    );
    let now = ctx.clock.now();
    let mut item = sales_push(
        op,
        &system,
        &ctx.cfg.limits.currency,
        ctx.cfg.timezone,
        // milliseconds: an un-posting and a re-posting in the same second still order
        now.timestamp_millis(),
    );
    // the version stays the hash of Розница's table; the customer is who 1C says the card is
    if let Item::Incoming(Incoming::Document(d)) = &mut item {
        let guid = d
            .customer
            .onec_id
            .as_deref()
            .and_then(|k| k.strip_prefix("card:"))
            .unwrap_or("")
            .to_string();
        match ds.cards.customer(&guid).await? {
            Ok(id) => d.customer = id,
            Err(reason) => {
                item = Item::Rejected(Rejected {
                    system: system.clone(),
                    doc_ref: d.source.doc_id.clone(),
                    reason: format!("card {guid}: {reason}"),
                    location: Some(format!("discount server: {}", op.value("ТипДокумента"))),
                    excerpt: None,
                    kind: Some(op.value("ТипДокумента").to_string()),
                    number: d.number.clone(),
                    occurred_at: Some(d.occurred_at),
                });
            }
        }
    }
    let doc_type = op.value("ТипДокумента").to_string();
    if let Item::Rejected(r) = &item {
        tracing::error!(doc_id = %r.doc_ref, reason = %r.reason, "Розница's document cannot be read; quarantined");
    }
    let cfg = ctx.cfg.clone();
    let report = ctx
        .ledger
        .run(move |l| {
            let dest = cfg.destinations();
            l.ingest(
                Batch {
                    source: format!("{system}:{doc_type}"),
                    items: vec![item],
                    checkpoint: None,
                    ..Default::default()
                },
                &cfg.ingest_context(now, &dest),
            )
        })
        .await
        .map_err(|e: LedgerError| e.to_string())?;
    tracing::info!(outcomes = ?report.outcomes, "Розница pushed a document");
    Ok(report)
}

/// `ПолучитьСкидкиПоКупону`: a cashier typed a code. For an open kopilka voucher the answer is
/// one active row of the shop's gift discount (`voucher_discount`), from the voucher's issue
/// to its end; Розница then applies that discount as it applies its own coupons
/// (`СкидкиНаценкиСерверПереопределяемый.СкидкиДляКупона`, `ДисконтныйСервер` `DS:545-590`:
/// `ИдентификаторСкидки` names a «Скидки (наценки)» item, `Состояние` an enum value name,
/// `ИдентификаторМагазина` a shop or none). Any other code — used, expired, the shop's own
/// coupons, no `voucher_discount` — gets the empty table 1C reads as "no discounts".
async fn coupon(ds: &Ds, op: &El) -> Result<String, String> {
    let ctx = &ds.ctx;
    let Some(discount) = discount_config(ctx).and_then(|d| d.voucher_discount) else {
        return Ok(String::new());
    };
    let code = op.value("КодКупона").to_string();
    if code.is_empty() || code.len() > 64 {
        return Ok(String::new());
    }
    let tz = ctx.cfg.timezone;
    let at = instant(op.value("ДатаЗапроса"), tz).unwrap_or_else(|| ctx.clock.now());
    let found = ctx
        .ledger
        .run(move |l| l.open_voucher(&code, at))
        .await
        .map_err(|e: LedgerError| e.to_string())?;
    let Some(v) = found else {
        return Ok(String::new());
    };
    let local =
        |t: chrono::DateTime<chrono::Utc>| t.with_timezone(&tz).format("%Y-%m-%dT%H:%M:%S").to_string();
    Ok(format!(
        "<m:СтрокиТаблицы><m:Период>{}</m:Период><m:ИдентификаторСкидки>{discount}</m:ИдентификаторСкидки>\
         <m:КодКупона>{}</m:КодКупона><m:Состояние>Активна</m:Состояние>\
         <m:ИдентификаторМагазина>{ZERO_GUID}</m:ИдентификаторМагазина>\
         <m:ПериодДействия>{}</m:ПериодДействия></m:СтрокиТаблицы>",
        local(v.issued_at),
        esc(&v.code),
        v.expires_at
            .map_or_else(|| "0001-01-01T00:00:00".to_string(), local),
    ))
}

/// `ОбновитьДанныеОКупонах`: after a receipt, Розница reports the coupons its register moved
/// (`DS:423-475`); a row «Применена» with a kopilka voucher's code marks that voucher used by
/// the receipt, once. Rows of the shop's own coupons and other states change nothing.
async fn coupons_used(ds: &Ds, op: &El) -> Result<(), String> {
    let ctx = &ds.ctx;
    let document = op.value("ИдентификаторДокумента").to_ascii_lowercase();
    let tz = ctx.cfg.timezone;
    let now = ctx.clock.now();
    let used: Vec<(String, chrono::DateTime<chrono::Utc>)> = op
        .child("ТаблицаКупонов")
        .map(|t| {
            t.children
                .iter()
                .filter(|c| c.name == "СтрокиТаблицы")
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.value("Состояние") == "Применена" && !r.value("КодКупона").is_empty())
        .map(|r| {
            let at = instant(r.value("Период"), tz).unwrap_or(now);
            (r.value("КодКупона").to_string(), at)
        })
        .collect();
    if used.is_empty() || !is_guid(&document) {
        return Ok(());
    }
    let cfg = ctx.cfg.clone();
    let applied = ctx
        .ledger
        .run(move |l| {
            let dest = cfg.destinations();
            let ictx = cfg.ingest_context(now, &dest);
            let mut applied = Vec::new();
            for (code, at) in &used {
                if l.apply_voucher_code(code, &document, *at, &ictx)? {
                    applied.push(code.clone());
                }
            }
            Ok::<_, LedgerError>(applied)
        })
        .await
        .map_err(|e: LedgerError| e.to_string())?;
    if !applied.is_empty() {
        tracing::info!(codes = ?applied, "Розница used kopilka's vouchers at the till");
    }
    Ok(())
}

/// The card's free points now (0 for a card kopilka or 1C does not know) and the date to
/// answer with (`ДатаЗапроса`, or now in the shop's time zone for 1C's empty date).
async fn balance(ds: &Ds, op: &El) -> Result<(i64, String), String> {
    let ctx = &ds.ctx;
    let card = op.value("ИдентификаторКарты").to_ascii_lowercase();
    let now = ctx.clock.now();
    let date = local_date(op.value("ДатаЗапроса"))
        .unwrap_or_else(|| now.with_timezone(&ctx.cfg.timezone).naive_local())
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    if !is_guid(&card) || card == ZERO_GUID {
        return Ok((0, date));
    }
    let Ok(id) = ds.cards.customer(&card).await? else {
        return Ok((0, date));
    };
    let Some(key) = lookup_text(&id) else {
        return Ok((0, date));
    };
    match ctx.ledger.run(move |l| l.spendable(&key, now)).await {
        Ok(v) => Ok((v.free.max(0), date)),
        Err(HoldError::UnknownCustomer(_)) => Ok((0, date)),
        Err(e) => Err(e.to_string()),
    }
}

/// `ПолучитьСуммуНакопления`: the card's turnover in force (sales less returns, every
/// source) dated in `[ДатаНачала, ДатаОкончания]`, leaving out the excluded document, as
/// rubles and quantity. A segment filter needs item→segment data kopilka does not have:
/// 0 then, not an unfiltered sum that would over-grant discounts (§1.6); so is an unknown card.
async fn accumulation(ds: &Ds, op: &El) -> Result<(String, String), String> {
    let zero = || Ok(("0".to_string(), "0".to_string()));
    let card = op.value("ИдентификаторКарты").to_ascii_lowercase();
    if !op.value("ИдентификаторСегмента").is_empty() || !is_guid(&card) || card == ZERO_GUID
    {
        return zero();
    }
    let Ok(id) = ds.cards.customer(&card).await? else {
        return zero();
    };
    let Some(key) = lookup_text(&id) else {
        return zero();
    };
    let tz = ds.ctx.cfg.timezone;
    let from = local_date(op.value("ДатаНачала")).map(|d| to_utc(d, tz));
    let to = local_date(op.value("ДатаОкончания")).map(|d| to_utc(d, tz));
    let exclude = op
        .value("ИдентификаторИсключаемогоДокументта")
        .to_ascii_lowercase();
    let exclude = (!exclude.is_empty()).then_some(exclude);
    let found = ds
        .ctx
        .ledger
        .run(move |l| l.turnover(&key, from, to, exclude.as_deref()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(found.map_or(("0".into(), "0".into()), |(kopecks, qty)| {
        (
            Decimal::new(kopecks, 2).normalize().to_string(),
            qty.normalize().to_string(),
        )
    }))
}

/// `ПолучитьДанныеПоследнейПокупки`: the card's latest document in force at or before
/// `ДатаРасчета` (not the excluded one), as Розница's own server answers it
/// (`СкидкиНаценкиСерверПереопределяемый:722-789`): its local date, rubles and quantity
/// when it is a sale worth more than 0; no row otherwise (a return after a sale, a segment,
/// an unknown card), which Розница reads as no last purchase.
async fn last_purchase(ds: &Ds, op: &El) -> Result<Option<(String, String, String)>, String> {
    let card = op.value("ИдентификаторКарты").to_ascii_lowercase();
    if !op.value("ИдентификаторСегмента").is_empty() || !is_guid(&card) || card == ZERO_GUID
    {
        return Ok(None);
    }
    let Ok(id) = ds.cards.customer(&card).await? else {
        return Ok(None);
    };
    let Some(key) = lookup_text(&id) else {
        return Ok(None);
    };
    let tz = ds.ctx.cfg.timezone;
    let at = local_date(op.value("ДатаРасчета")).map_or_else(|| ds.ctx.clock.now(), |d| to_utc(d, tz));
    let exclude = op
        .value("ИдентификаторИсключаемогоДокументта")
        .to_ascii_lowercase();
    let exclude = (!exclude.is_empty()).then_some(exclude);
    let found = ds
        .ctx
        .ledger
        .run(move |l| l.last_document(&key, at, exclude.as_deref()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(found.and_then(|d| {
        (d.kind == DocKind::Sale && d.total_kopecks > 0).then(|| {
            (
                d.occurred_at
                    .with_timezone(&tz)
                    .naive_local()
                    .format("%Y-%m-%dT%H:%M:%S")
                    .to_string(),
                Decimal::new(d.total_kopecks, 2).normalize().to_string(),
                d.quantity.normalize().to_string(),
            )
        })
    }))
}
