//! CommerceML 2 exchange files, read as a stream.
//!
//! 1C and the sites it talks to write `КоммерческаяИнформация` files: business documents
//! (`Документ`: sales, returns, orders), the catalog (`Классификатор`, `Каталог`) and price
//! lists (`ПакетПредложений`). Such a file can be hundreds of megabytes, so it is read with a
//! pull parser, one element at a time, and only one document (bounded by [`Limits`]) is held
//! at once: memory does not grow with the file.
//!
//! What comes out is core data ([`Incoming`], [`Rejected`]) and plain catalog records; nothing
//! of the XML shape leaks past this module. The parser converts faithfully and leaves business
//! judgement (negative quantities, totals that disagree with their lines) to
//! `core::document::validate`, so every source is refused for the same reasons.
//!
//! Format facts follow `shared/specs/onec.md` section A: element names are matched by local
//! name (2.07+ files declare a default namespace, older ones none), children in any order,
//! text trimmed, UTF-8 with or without BOM or windows-1251 as declared.
//!
//! Decisions where the format is open:
//! - Orders (`Заказ товара`) follow [`OrderPolicy`]; with `WhenShipped` an order counts when the
//!   site says `Финальный статус` = true or `Статус заказа` names a finished state (see
//!   [`is_shipped_status`]).
//! - A document whose requisites say `ПометкаУдаления` = true, `Отменен` = true or
//!   `Проведен` = false (checked in that order) is a void, whatever else it holds; a 1C reply
//!   that holds only requisites and says none of that is skipped, not quarantined.
//! - A void's version is `{content_version}:{reason}` when the document converts, otherwise a
//!   hash of its identifying fields plus the reason: the same void read twice is one version.
//! - Discounts: a line discount with `УчтеноВСумме` = true (the default when absent) is already
//!   in the line's `Сумма`; with false it is subtracted. A document-level discount not included
//!   in the sums is spread over the lines in proportion to their net; the document total is the
//!   stated `Сумма`, less that discount when the stated sum equals the lines before it.
//! - A file that breaks part-way (cut off, corrupted, nested too deep) still yields every whole
//!   document before the break; [`FileInfo::truncated`] says where and why.

use std::io::{self, BufRead, Read};
use std::str::FromStr;

use chrono::{DateTime, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use quick_xml::Reader;
use quick_xml::encoding::Decoder;
use quick_xml::events::{BytesRef, BytesStart, Event};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sha2::{Digest, Sha256};

use crate::core::document::{
    DocKind, Document, Incoming, Line, Rejected, SourceRef, VoidReason, content_version,
};
use crate::core::identity::{CustomerIdentity, Email, Phone, normalize_card};
use crate::core::money::{Money, Points, parse_decimal};

/// Requisite names tried for a loyalty card number after [`Options::card_requisite`]: the
/// names 1C configurations and site modules use for it.
pub const DEFAULT_CARD_REQUISITES: &[&str] = &["ДисконтнаяКарта", "Карта лояльности", "НомерКарты"];

/// Largest amount accepted, in rubles. Far above any real receipt, and low enough that
/// kopeck sums over [`Limits::max_lines_per_document`] lines cannot overflow.
const MAX_AMOUNT_RUBLES: i64 = 1_000_000_000_000;
/// Largest quantity accepted on a line, for the same reason.
const MAX_QUANTITY: i64 = 1_000_000_000;
/// Discounts (`Скидки/Скидка`) kept per line or per document; more is not a real receipt.
const MAX_DISCOUNTS_PER_ENTRY: usize = 64;
/// Prices kept per offer and groups per product: catalog entries are small by nature.
const MAX_LIST_ITEMS_PER_ENTRY: usize = 1_000;
/// Most bytes the reader hands quick-xml at once (see `Guard`).
const GUARD_CHUNK_BYTES: usize = 64 * 1024;
/// How much of a bad value a quarantine excerpt shows.
const MAX_EXCERPT_CHARS: usize = 200;
/// Broken places (a token too long, a syntax error) read past in one file before giving
/// up on the rest of it.
const MAX_RECOVERIES_PER_FILE: usize = 10_000;
/// Bytes of element names open beyond [`Limits::max_depth`] before the file is given up:
/// quick-xml keeps them to check end tags, so they cost memory.
const MAX_OVERFLOW_NAME_BYTES: usize = 16 << 20;

/// How a file is read: where its documents say they come from and what is trusted.
#[derive(Clone, Debug)]
pub struct Options {
    /// [`SourceRef::system`] of every document read, e.g. `onec` or `onec:partner-shop`.
    pub system: String,
    /// 1C writes naive local times (`Дата` + `Время`, `ДатаФормирования`); this zone makes
    /// them instants.
    pub timezone: Tz,
    /// Orders are promises, not sales: see [`OrderPolicy`].
    pub orders: OrderPolicy,
    /// A requisite naming a return's base document (its `Ид` or `Номер`), besides the
    /// non-schema child `Основание` that connectors write.
    pub return_link_requisite: Option<String>,
    /// A requisite holding a loyalty card number; [`DEFAULT_CARD_REQUISITES`] are tried after it.
    pub card_requisite: Option<String>,
    /// A requisite holding the points the customer paid with (a whole number).
    pub points_requisite: Option<String>,
    /// Requisites a site or 1C writes on a document for its customer (issue 20): the friend
    /// code they came with, an invite code, a birthday (`ДД.ММ.ГГГГ` or ISO).
    pub referral_requisite: Option<String>,
    pub invite_requisite: Option<String>,
    pub birthday_requisite: Option<String>,
    pub limits: Limits,
}

impl Options {
    pub fn new(system: impl Into<String>, timezone: Tz) -> Options {
        Options {
            system: system.into(),
            timezone,
            orders: OrderPolicy::default(),
            return_link_requisite: None,
            card_requisite: None,
            points_requisite: None,
            referral_requisite: None,
            invite_requisite: None,
            birthday_requisite: None,
            limits: Limits::default(),
        }
    }
}

impl Default for Options {
    /// `onec` in Moscow time: what a single Russian shop needs.
    fn default() -> Self {
        Options::new("onec", chrono_tz::Europe::Moscow)
    }
}

/// When an order (`ХозОперация` = `Заказ товара`) counts as a sale. A site order is a promise:
/// it may never be paid or shipped, and 1C usually sends the shipment (`Отпуск товара`) later,
/// which would then count twice. So orders are ignored unless the shop says otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrderPolicy {
    /// Orders are skipped (and counted in [`FileInfo::skipped`]), voids for them too.
    #[default]
    Ignore,
    /// An order is a sale once it is paid: a stock 1C fills «Номер оплаты по 1С» / «Дата
    /// оплаты по 1С» (UT `OS:5688-5728`); a site's own reply says `Заказ оплачен` = true.
    WhenPaid,
    /// An order is a sale once it is shipped: «Номер/Дата отгрузки по 1С» filled, or
    /// `Финальный статус` true, or `Статус заказа` naming a finished state
    /// ([`is_shipped_status`]).
    WhenShipped,
    /// Every order is a sale.
    Always,
}

/// Bounds on what one file may make the parser hold, so a hostile or broken file costs a
/// rejection, not the daemon's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Element nesting; real files nest about ten deep. Deeper stops the file.
    pub max_depth: usize,
    /// Text of one element, in bytes as written. Longer rejects the entry holding it.
    pub max_text_bytes: usize,
    /// `Товар` lines of one document. More rejects that document only.
    pub max_lines_per_document: usize,
    /// Attributes of one element. More rejects the entry holding it.
    pub max_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 64,
            max_text_bytes: 1 << 20,
            max_lines_per_document: 10_000,
            max_attributes: 64,
        }
    }
}

/// One thing read from a file, in file order.
#[allow(clippy::large_enum_variant)] // items are handed over one at a time, never stored in bulk
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A sale, a return or a void.
    Document(Incoming),
    /// A `Документ` (or a catalog entry) that could not be converted, with the reason.
    Rejected(Rejected),
    Group(Group),
    Product(Product),
    PriceType(PriceType),
    Offer(Offer),
}

/// A catalog group (`Классификатор/Группы/Группа`). Nested groups are emitted before the
/// group that holds them; `parent` links them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub parent: Option<String>,
}

/// A catalog item (`Каталог/Товары/Товар`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub article: Option<String>,
    /// `Группы/Ид`: the groups the item belongs to.
    pub groups: Vec<String>,
    /// `ВидНоменклатуры`/`ТипНоменклатуры` = `Услуга`.
    pub service: bool,
    /// `Статус="Удален"` (attribute or child element): the item was deleted in 1C and is
    /// listed only so that sites remove it.
    pub deleted: bool,
}

/// A price list (`ТипыЦен/ТипЦены`): `Розничная`, `Закупочная` (how cost reaches kopilka), …
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceType {
    pub id: String,
    pub name: String,
    /// ISO 4217 code when the currency is recognised, otherwise the text as written.
    pub currency: Option<String>,
}

/// The prices of one product or variant (`Предложения/Предложение`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// `product#variant` or just `product`.
    pub id: String,
    /// The part of `id` before `#`.
    pub product_id: String,
    pub prices: Vec<OfferPrice>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferPrice {
    pub price_type_id: String,
    pub unit_price: Money,
    /// ISO 4217 code when recognised, otherwise the text as written.
    pub currency: Option<String>,
    pub coefficient: Option<Decimal>,
}

/// What a file said about itself and what became of its documents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileInfo {
    /// `ВерсияСхемы`.
    pub schema_version: Option<String>,
    /// `ДатаФормирования`, local time made an instant with [`Options::timezone`].
    pub generated_at: Option<DateTime<Utc>>,
    /// `СодержитТолькоИзменения="true"` on the catalog or offers: a delta, not a full list.
    pub only_changes: bool,
    /// [`Item::Document`]s emitted (sales, returns, voids).
    pub documents: usize,
    /// Documents that are not sales or returns (orders per policy, invoices, replies).
    pub skipped: usize,
    /// [`Item::Rejected`]s emitted.
    pub rejected: usize,
    /// Why the file ended early or broke part-way, if it did. Every whole document before
    /// the break was emitted; the one in progress was not.
    pub truncated: Option<String>,
}

/// The file cannot be read at all. Messages name the file and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{file}: cannot read at byte {offset}: {source}")]
    Io {
        file: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{file}: not an XML file: {reason} at byte {offset}")]
    NotXml {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("{file}: root element is <{found}> at byte {offset}, expected <КоммерческаяИнформация>")]
    WrongRoot {
        file: String,
        offset: u64,
        found: String,
    },
    #[error(
        "{file}: document type declaration (<!DOCTYPE) at byte {offset} refused: exchange files \
         carry none, and entities declared in one can expand without bound"
    )]
    Dtd { file: String, offset: u64 },
    #[error("{file}: stopped at byte {offset}: {message}")]
    Stopped {
        file: String,
        offset: u64,
        message: String,
    },
}

impl FileError {
    /// Where in the file the problem was found.
    pub fn offset(&self) -> u64 {
        match self {
            FileError::Io { offset, .. }
            | FileError::NotXml { offset, .. }
            | FileError::WrongRoot { offset, .. }
            | FileError::Dtd { offset, .. }
            | FileError::Stopped { offset, .. } => *offset,
        }
    }
}

/// Reads one CommerceML file from `reader`, calling `on_item` for every item in file order.
///
/// `file_label` names the file in errors and quarantine locations. Returns what the file
/// said about itself; a file that broke part-way is still `Ok` with
/// [`FileInfo::truncated`] set. If `on_item` returns `Err`, reading stops with
/// [`FileError::Stopped`] carrying its message.
pub fn parse<R: BufRead>(
    reader: R,
    file_label: &str,
    opts: &Options,
    on_item: &mut dyn FnMut(Item) -> Result<(), String>,
) -> Result<FileInfo, FileError> {
    let mut parser = Parser {
        label: file_label,
        opts,
        on_item,
        stack: Vec::with_capacity(32),
        name: String::with_capacity(64),
        text: String::with_capacity(256),
        text_bytes: 0,
        text_too_long: false,
        cur: None,
        groups: Vec::new(),
        info: FileInfo::default(),
        stamp: None,
        root_seen: false,
        overflow: 0,
        overflow_name_bytes: 0,
    };
    let mut reader = reader;
    let utf16 = match reader.fill_buf() {
        Ok([0xFF, 0xFE, ..]) => Some(encoding_rs::UTF_16LE),
        Ok([0xFE, 0xFF, ..]) => Some(encoding_rs::UTF_16BE),
        _ => None,
    };
    match utf16 {
        Some(encoding) => parser.run(Utf16::new(reader, encoding)),
        None => parser.run(reader),
    }
}

/// `Статус заказа` values that mean the goods left the shop, for [`OrderPolicy::WhenShipped`]:
/// 1C's `Закрыт`/`Выполнен`/`Отгружен`/`Доставлен`/`Завершен`, and Bitrix's finished code
/// `[F]` (its statuses are written `[F] Выполнен`). Case and a leading `[X]` code are ignored.
pub fn is_shipped_status(text: &str) -> bool {
    let t = text.trim();
    let (code, rest) = match t.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((code, rest)) => (Some(code.trim()), rest.trim()),
        None => (None, t),
    };
    if code.is_some_and(|c| c.eq_ignore_ascii_case("F")) {
        return true;
    }
    let lower = rest.to_lowercase();
    [
        "закрыт",
        "выполнен",
        "отгружен",
        "доставлен",
        "завершен",
        "завершён",
    ]
    .contains(&lower.as_str())
}

// ---------------------------------------------------------------------------------------
// Reading

/// Caps the bytes quick-xml may buffer for one event. quick-xml collects a whole text run
/// or tag before returning it, so without this a file with no `<` for a gigabyte would be
/// held in memory whole; with it, such a file breaks off with a reason instead.
struct Guard<R> {
    inner: R,
    since_event_bytes: u64,
    limit_bytes: u64,
    tripped: bool,
    /// The token being read started with `<` (markup), not text.
    in_markup: bool,
}

impl<R> Guard<R> {
    fn check(&mut self) -> io::Result<()> {
        if self.since_event_bytes > self.limit_bytes {
            self.tripped = true;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "xml token too long"));
        }
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        let n = self.inner.read(buf)?;
        self.since_event_bytes = self.since_event_bytes.saturating_add(n as u64);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Guard<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.check()?;
        // Hand over at most a chunk at a time, so that the count is checked between chunks
        // even when the inner reader holds the whole file (a slice, a memory map).
        let buf = self.inner.fill_buf()?;
        if self.since_event_bytes == 0
            && let Some(&first) = buf.first()
        {
            self.in_markup = first == b'<';
        }
        Ok(buf.get(..GUARD_CHUNK_BYTES).unwrap_or(buf))
    }

    fn consume(&mut self, amt: usize) {
        self.since_event_bytes = self.since_event_bytes.saturating_add(amt as u64);
        self.inner.consume(amt);
    }
}

type Input<R> = Guard<io::Chain<io::Cursor<Vec<u8>>, R>>;

fn reader_over<R: BufRead>(input: Input<R>) -> Reader<Input<R>> {
    let mut reader = Reader::from_reader(input);
    let cfg = reader.config_mut();
    cfg.trim_text(false);
    cfg.check_end_names = true;
    cfg.expand_empty_elements = false;
    cfg.check_comments = false;
    reader
}

/// A reader for the rest of the stream after quick-xml gave up on a token too long (it
/// stops for good at an I/O error). The new reader starts with a declaration of the
/// encoding in use, and tolerates end tags of the elements the old one had opened.
/// Returns it, the bytes the old reader consumed and the bytes put in front.
fn resume<R: BufRead>(old: Reader<Input<R>>) -> (Reader<Input<R>>, u64, u64) {
    let consumed = old.buffer_position();
    let encoding = old.decoder().encoding().name();
    let guard = old.into_inner();
    let (prefix, rest) = guard.inner.into_inner();
    let mut head = format!("<?xml version=\"1.0\" encoding=\"{encoding}\"?>").into_bytes();
    let added = head.len() as u64;
    let at = usize::try_from(prefix.position()).unwrap_or(usize::MAX);
    head.extend(prefix.get_ref().get(at..).unwrap_or(&[]));
    let mut reader = reader_over(Guard {
        inner: io::Cursor::new(head).chain(rest),
        since_event_bytes: 0,
        limit_bytes: guard.limit_bytes,
        tripped: false,
        in_markup: false,
    });
    reader.config_mut().allow_unmatched_ends = true;
    (reader, consumed, added)
}

/// A UTF-16 file (with its BOM) as UTF-8: quick-xml reads only ASCII-compatible
/// encodings. The stream starts with an XML declaration saying UTF-8, which fixes the
/// encoding before the file's own declaration (`encoding="UTF-16"`) is read; byte offsets
/// in messages about such a file count the UTF-8 text.
struct Utf16<R> {
    inner: R,
    decoder: encoding_rs::Decoder,
    out: Vec<u8>,
    at: usize,
    done: bool,
}

impl<R: BufRead> Utf16<R> {
    fn new(inner: R, encoding: &'static encoding_rs::Encoding) -> Utf16<R> {
        Utf16 {
            inner,
            decoder: encoding.new_decoder_with_bom_removal(),
            out: br#"<?xml version="1.0" encoding="UTF-8"?>"#.to_vec(),
            at: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Utf16<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Utf16<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at >= self.out.len() && !self.done {
            self.out.clear();
            self.at = 0;
            let src = self.inner.fill_buf()?;
            let last = src.is_empty();
            let room = self
                .decoder
                .max_utf8_buffer_length(src.len())
                .unwrap_or(src.len().saturating_mul(3))
                .max(16);
            self.out.resize(room, 0);
            let (_, read, written, _) = self.decoder.decode_to_utf8(src, &mut self.out, last);
            self.inner.consume(read);
            self.out.truncate(written);
            self.done = last;
        }
        Ok(self.out.get(self.at..).unwrap_or(&[]))
    }

    fn consume(&mut self, amt: usize) {
        self.at = (self.at + amt).min(self.out.len());
    }
}

/// Element names the parser acts on; everything else is `Other` and only nests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Root,
    Classifier,
    Groups,
    Group,
    Catalog,
    Goods,
    Good,
    OfferPackage,
    OfferPackageChanges,
    PriceTypes,
    PriceKind,
    Offers,
    OfferEntry,
    Prices,
    Price,
    PriceTypeId,
    UnitPrice,
    Currency,
    Coefficient,
    Container,
    Doc,
    Id,
    Number,
    Date,
    Time,
    Operation,
    Sum,
    Parties,
    Party,
    Name,
    FullName,
    BirthDate,
    Role,
    Contacts,
    Contact,
    Type,
    Value,
    Discounts,
    Discount,
    Percent,
    Included,
    Quantity,
    Article,
    Requisites,
    Requisite,
    Basis,
    Status,
    Other,
}

impl Tag {
    fn of(name: &str) -> Tag {
        match name {
            "КоммерческаяИнформация" => Tag::Root,
            "Классификатор" => Tag::Classifier,
            "Группы" => Tag::Groups,
            "Группа" => Tag::Group,
            "Каталог" => Tag::Catalog,
            "Товары" => Tag::Goods,
            "Товар" => Tag::Good,
            "ПакетПредложений" => Tag::OfferPackage,
            "ИзмененияПакетаПредложений" => Tag::OfferPackageChanges,
            "ТипыЦен" => Tag::PriceTypes,
            "ТипЦены" => Tag::PriceKind,
            "Предложения" => Tag::Offers,
            "Предложение" => Tag::OfferEntry,
            "Цены" => Tag::Prices,
            "Цена" => Tag::Price,
            "ИдТипаЦены" => Tag::PriceTypeId,
            "ЦенаЗаЕдиницу" => Tag::UnitPrice,
            "Валюта" => Tag::Currency,
            "Коэффициент" => Tag::Coefficient,
            "Контейнер" => Tag::Container,
            "Документ" => Tag::Doc,
            "Ид" => Tag::Id,
            "Номер" => Tag::Number,
            "Дата" => Tag::Date,
            "Время" => Tag::Time,
            "ХозОперация" => Tag::Operation,
            "Сумма" => Tag::Sum,
            "Контрагенты" => Tag::Parties,
            "Контрагент" => Tag::Party,
            "Наименование" => Tag::Name,
            "ПолноеНаименование" => Tag::FullName,
            "ДатаРождения" => Tag::BirthDate,
            "Роль" => Tag::Role,
            "Контакты" => Tag::Contacts,
            "Контакт" => Tag::Contact,
            "Тип" => Tag::Type,
            "Значение" => Tag::Value,
            "Скидки" => Tag::Discounts,
            "Скидка" => Tag::Discount,
            "Процент" => Tag::Percent,
            "УчтеноВСумме" => Tag::Included,
            "Количество" => Tag::Quantity,
            "Артикул" => Tag::Article,
            "ЗначенияРеквизитов" => Tag::Requisites,
            "ЗначениеРеквизита" => Tag::Requisite,
            "Основание" => Tag::Basis,
            "Статус" => Tag::Status,
            _ => Tag::Other,
        }
    }
}

/// Why an entry cannot be converted, for the quarantine.
#[derive(Clone, Debug)]
struct Problem {
    reason: String,
    excerpt: Option<String>,
}

/// The entry being read: one document or catalog record, from its start tag to its end.
struct Active {
    /// Index in the element stack of the entry's own element.
    base: usize,
    /// Byte offset of its start tag.
    offset: u64,
    problem: Option<Problem>,
    entity: Entity,
}

enum Entity {
    Document(Box<DocDraft>),
    Product(ProductDraft),
    PriceType(PriceTypeDraft),
    Offer(OfferDraft),
    /// A group tree; the drafts are in `Parser::groups`.
    Groups,
}

enum Flow {
    Continue,
    /// The root element closed: the file is complete.
    Done,
    /// The file cannot be followed further; the reason goes to `FileInfo::truncated`.
    Cut(String),
}

struct Parser<'a> {
    label: &'a str,
    opts: &'a Options,
    on_item: &'a mut dyn FnMut(Item) -> Result<(), String>,
    stack: Vec<Tag>,
    /// Local name of the latest start tag, decoded (for messages).
    name: String,
    /// Text of the current element, kept only inside an entry.
    text: String,
    text_bytes: usize,
    text_too_long: bool,
    cur: Option<Active>,
    groups: Vec<GroupDraft>,
    info: FileInfo,
    stamp: Option<i64>,
    root_seen: bool,
    /// Elements open beyond [`Limits::max_depth`]: counted, not stacked.
    overflow: usize,
    /// What quick-xml keeps of those open names (it stacks them for end-tag checks),
    /// estimated; bounded by [`MAX_OVERFLOW_NAME_BYTES`].
    overflow_name_bytes: usize,
}

impl Parser<'_> {
    fn run<R: BufRead>(&mut self, input: R) -> Result<FileInfo, FileError> {
        let limit_bytes = (self.opts.limits.max_text_bytes as u64)
            .saturating_mul(4)
            .saturating_add(64 * 1024);
        let mut reader = reader_over(Guard {
            inner: io::Cursor::new(Vec::new()).chain(input),
            since_event_bytes: 0,
            limit_bytes,
            tripped: false,
            in_markup: false,
        });
        // Byte offset in the file of the current reader's byte 0: a reader is replaced
        // after a token too long to read (quick-xml stops at an I/O error), and the new one
        // starts with a declaration naming the encoding, which is not in the file.
        let mut base: u64 = 0;
        // quick-xml recovers from a broken token and reads on; so does the parser, up to
        // this many times in one file
        let mut recoveries = 0usize;
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            buf.clear();
            reader.get_mut().since_event_bytes = 0;
            let pos = base + reader.buffer_position();
            let event = match reader.read_event_into(&mut buf) {
                Ok(event) => event,
                Err(err) => {
                    let at = (base + reader.error_position()).max(pos);
                    let tripped = std::mem::take(&mut reader.get_mut().tripped);
                    let reason = if tripped {
                        format!("an XML token at byte {pos} is longer than {limit_bytes} bytes")
                    } else {
                        format!("the XML breaks at byte {at}: {err}")
                    };
                    if let (false, quick_xml::Error::Io(io_err)) = (tripped, &err) {
                        return Err(FileError::Io {
                            file: self.label.to_string(),
                            offset: base + reader.buffer_position(),
                            source: io::Error::new(io_err.kind(), io_err.to_string()),
                        });
                    }
                    if !self.root_seen {
                        return Err(self.not_xml(if tripped { pos } else { at }, reason));
                    }
                    recoveries += 1;
                    if recoveries > MAX_RECOVERIES_PER_FILE {
                        return self.cut(format!(
                            "{reason}; more than {MAX_RECOVERIES_PER_FILE} broken places in one file{}",
                            self.unread()
                        ));
                    }
                    // Read on: the entry holding the break is refused with the reason,
                    // the entries around it are kept.
                    if self.cur.is_some() {
                        self.problem(reason.clone(), None);
                    } else if tripped && reader.get_ref().in_markup {
                        // a start tag too long to read may have been a document's: say so
                        // rather than lose it without a word
                        let item = self.rejected(
                            None,
                            pos,
                            Problem {
                                reason: format!(
                                    "{reason}: markup skipped (if it was the start of a document or \
                                     catalog entry, that entry is this one)"
                                ),
                                excerpt: None,
                            },
                        );
                        self.emit(item, pos)?;
                    }
                    if tripped {
                        // the rest of the long token is read as text by a new reader
                        let (next, consumed, head) = resume(reader);
                        base = (base + consumed).saturating_sub(head);
                        reader = next;
                        continue;
                    }
                    if let quick_xml::Error::IllFormed(
                        quick_xml::errors::IllFormedError::MismatchedEndTag { .. },
                    ) = &err
                    {
                        // quick-xml closed the element it had open; so does the parser
                        if self.overflow > 0 {
                            self.overflow -= 1;
                        } else if let Flow::Done = self.end(at)? {
                            return Ok(std::mem::take(&mut self.info));
                        }
                    }
                    continue;
                }
            };
            let decoder = reader.decoder();
            let flow = match event {
                Event::Start(e) => self.start(&e, pos, decoder)?,
                Event::Empty(e) => match self.start(&e, pos, decoder)? {
                    Flow::Continue if self.overflow > 0 => {
                        self.overflow -= 1;
                        Flow::Continue
                    }
                    Flow::Continue => self.end(pos)?,
                    other => other,
                },
                Event::End(_) if self.overflow > 0 => {
                    self.overflow -= 1;
                    Flow::Continue
                }
                Event::End(_) => self.end(pos)?,
                Event::Text(t) => {
                    self.text(&t, decoder);
                    Flow::Continue
                }
                Event::CData(t) => {
                    self.text(&t, decoder);
                    Flow::Continue
                }
                Event::GeneralRef(r) => {
                    self.reference(&r, decoder);
                    Flow::Continue
                }
                Event::DocType(_) => {
                    return Err(FileError::Dtd {
                        file: self.label.to_string(),
                        offset: pos,
                    });
                }
                Event::Eof => {
                    if !self.root_seen {
                        return Err(self.not_xml(pos, "no root element".to_string()));
                    }
                    // the entry in progress is refused with the reason, not lost
                    if let Some(active) = self.cur.take() {
                        let offset = active.offset;
                        if !matches!(active.entity, Entity::Groups) {
                            let problem = Problem {
                                reason: format!("the file ends at byte {pos} inside this entry"),
                                excerpt: None,
                            };
                            let id = match &active.entity {
                                Entity::Document(d) => d.id.clone(),
                                _ => None,
                            };
                            let item = self.rejected(id.as_deref(), offset, problem);
                            self.emit(item, pos)?;
                        }
                        self.cur = Some(active);
                    }
                    Flow::Cut(format!(
                        "the file ends at byte {pos} with {} element(s) still open{}",
                        self.stack.len(),
                        self.unread()
                    ))
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) => Flow::Continue,
            };
            match flow {
                Flow::Continue => {}
                Flow::Done => return Ok(std::mem::take(&mut self.info)),
                Flow::Cut(reason) => return self.cut(reason),
            }
        }
    }

    fn not_xml(&self, offset: u64, reason: String) -> FileError {
        FileError::NotXml {
            file: self.label.to_string(),
            offset,
            reason,
        }
    }

    /// Names the entry a cut leaves unread, for the reason in `FileInfo::truncated`.
    fn unread(&self) -> String {
        self.cur.as_ref().map_or(String::new(), |a| {
            format!("; the entry at byte {} was not read", a.offset)
        })
    }

    fn cut(&mut self, reason: String) -> Result<FileInfo, FileError> {
        self.info.truncated = Some(reason);
        Ok(std::mem::take(&mut self.info))
    }

    fn location(&self, offset: u64) -> String {
        format!("{} byte {offset}", self.label)
    }

    /// Records a problem with the entry being read; the first one is what a person sees.
    fn problem(&mut self, reason: String, excerpt: Option<String>) {
        let slot = match &mut self.cur {
            Some(Active {
                entity: Entity::Groups,
                ..
            }) => match self.groups.last_mut() {
                Some(g) => &mut g.problem,
                None => return,
            },
            Some(active) => &mut active.problem,
            None => return,
        };
        if slot.is_none() {
            *slot = Some(Problem { reason, excerpt });
        }
    }

    fn start(&mut self, e: &BytesStart<'_>, pos: u64, decoder: Decoder) -> Result<Flow, FileError> {
        self.name.clear();
        let local = e.local_name();
        let tag = if decoder.decode_into(local.as_ref(), &mut self.name).is_ok() {
            Tag::of(&self.name)
        } else {
            // Say so: a file declared UTF-8 but written in windows-1251 lands here.
            self.name.clear();
            self.name.push_str(&String::from_utf8_lossy(local.as_ref()));
            self.name
                .push_str(&format!(" (not valid {})", decoder.encoding().name()));
            Tag::Other
        };
        if !self.root_seen {
            if tag != Tag::Root {
                return Err(FileError::WrongRoot {
                    file: self.label.to_string(),
                    offset: pos,
                    found: clip(&self.name),
                });
            }
            self.root_seen = true;
            self.stack.push(tag);
            self.root_attributes(e, decoder);
            return Ok(Flow::Continue);
        }
        if self.stack.is_empty() {
            return Ok(Flow::Done);
        }
        if self.overflow > 0 || self.stack.len() >= self.opts.limits.max_depth {
            // Deeper than any real file: the entry holding it is refused, the nesting is
            // only counted (not kept), and reading goes on after it closes.
            self.overflow += 1;
            self.overflow_name_bytes = self
                .overflow_name_bytes
                .saturating_add(e.name().as_ref().len() + 8);
            if self.overflow_name_bytes > MAX_OVERFLOW_NAME_BYTES {
                return Ok(Flow::Cut(format!(
                    "elements nest deeper than {} at byte {pos}, with more than {MAX_OVERFLOW_NAME_BYTES} \
                     bytes of open element names{}",
                    self.opts.limits.max_depth,
                    self.unread()
                )));
            }
            if self.overflow == 1 {
                let reason = format!(
                    "elements nest deeper than {} at byte {pos} (<{}>)",
                    self.opts.limits.max_depth,
                    clip(&self.name)
                );
                self.problem(reason, None);
            }
            return Ok(Flow::Continue);
        }
        self.stack.push(tag);
        self.text.clear();
        self.text_bytes = 0;
        self.text_too_long = false;

        let mut only_changes = false;
        let mut deleted = false;
        let attrs = self.attributes(e, decoder, |key, value| {
            if key == "СодержитТолькоИзменения" && parse_bool(value) == Some(true) {
                only_changes = true;
            } else if key == "Статус" && key_eq(value, "Удален") {
                deleted = true;
            }
        });
        if let Err(reason) = attrs {
            let reason = format!("<{}> at byte {pos}: {reason}", clip(&self.name));
            self.problem(reason, None);
        }
        self.enter(tag, pos, only_changes, deleted);
        Ok(Flow::Continue)
    }

    /// Reads `ВерсияСхемы` and `ДатаФормирования`; a bad date only loses the stamp.
    fn root_attributes(&mut self, e: &BytesStart<'_>, decoder: Decoder) {
        let mut version = None;
        let mut generated = None;
        let _ = self.attributes(e, decoder, |key, value| match key {
            "ВерсияСхемы" => version = Some(value.trim().to_string()),
            "ДатаФормирования" => generated = Some(value.trim().to_string()),
            _ => {}
        });
        self.info.schema_version = version.filter(|v| !v.is_empty());
        self.info.generated_at = generated.and_then(|g| parse_stamp(&g, self.opts.timezone));
        self.stamp = self.info.generated_at.map(|t| t.timestamp());
    }

    /// Walks an element's attributes (by local name, decoded and unescaped), refusing more
    /// than [`Limits::max_attributes`] of them.
    fn attributes(
        &self,
        e: &BytesStart<'_>,
        decoder: Decoder,
        mut f: impl FnMut(&str, &str),
    ) -> Result<(), String> {
        if e.attributes_raw().iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let mut key = String::new();
        for (n, attr) in e.attributes().with_checks(false).enumerate() {
            if n >= self.opts.limits.max_attributes {
                return Err(format!(
                    "more than {} attributes",
                    self.opts.limits.max_attributes
                ));
            }
            let attr = attr.map_err(|err| format!("malformed attribute: {err}"))?;
            key.clear();
            decoder
                .decode_into(attr.key.local_name().as_ref(), &mut key)
                .map_err(|err| format!("attribute name: {err}"))?;
            let value = attr
                .decode_and_unescape_value(decoder)
                .map_err(|err| format!("attribute {key}: {err}"))?;
            f(&key, &value);
        }
        Ok(())
    }

    /// Starts an entry when the new element is one, or notes structure inside the current one.
    fn enter(&mut self, tag: Tag, pos: u64, only_changes: bool, deleted: bool) {
        use Tag::*;
        let base = self.stack.len() - 1;
        if self.cur.is_none() {
            let entity = match self.stack.as_slice() {
                [Root, Doc] | [Root, Container, Doc] => Some(Entity::Document(Box::default())),
                [Root, Catalog, Goods, Good] => Some(Entity::Product(ProductDraft {
                    deleted,
                    ..ProductDraft::default()
                })),
                [
                    Root,
                    OfferPackage | OfferPackageChanges | Classifier,
                    PriceTypes,
                    PriceKind,
                ] => Some(Entity::PriceType(PriceTypeDraft::default())),
                [Root, OfferPackage | OfferPackageChanges, Offers, OfferEntry] => {
                    Some(Entity::Offer(OfferDraft::default()))
                }
                [Root, Classifier, Groups, Group] => {
                    self.groups.clear();
                    self.groups.push(GroupDraft::new(base, pos));
                    Some(Entity::Groups)
                }
                [Root, Catalog | OfferPackage | OfferPackageChanges | Classifier] => {
                    self.info.only_changes |= only_changes;
                    None
                }
                _ => None,
            };
            if let Some(entity) = entity {
                self.cur = Some(Active {
                    base,
                    offset: pos,
                    problem: None,
                    entity,
                });
            }
            return;
        }
        let max_lines = self.opts.limits.max_lines_per_document;
        let Some(active) = &mut self.cur else { return };
        let rel = self.stack.get(active.base + 1..).unwrap_or(&[]);
        match &mut active.entity {
            Entity::Groups => {
                let n = self.stack.len();
                let parent_at = self.groups.last().map(|g| g.depth);
                if tag == Group
                    && n >= 3
                    && self.stack.get(n - 2) == Some(&Groups)
                    && parent_at == Some(n - 3)
                {
                    self.groups.push(GroupDraft::new(base, pos));
                }
            }
            Entity::Document(d) => {
                if rel == [Goods, Good] {
                    d.goods_seen += 1;
                    if d.goods_seen > max_lines && active.problem.is_none() {
                        active.problem = Some(Problem {
                            reason: format!("more than {max_lines} lines (Товары/Товар)"),
                            excerpt: d.excerpt(None),
                        });
                    }
                }
            }
            Entity::Product(_) | Entity::PriceType(_) | Entity::Offer(_) => {}
        }
    }

    fn text(&mut self, raw: &[u8], decoder: Decoder) {
        if self.cur.is_none() || self.text_too_long {
            return;
        }
        self.text_bytes = self.text_bytes.saturating_add(raw.len());
        if self.text_bytes > self.opts.limits.max_text_bytes {
            self.text_too_long = true;
            self.text.clear();
            let reason = format!(
                "text of <{}> is longer than {} bytes",
                clip(&self.name),
                self.opts.limits.max_text_bytes
            );
            self.problem(reason, None);
            return;
        }
        if let Err(err) = decoder.decode_into(raw, &mut self.text) {
            let reason = format!("text of <{}> cannot be decoded: {err}", clip(&self.name));
            self.problem(reason, None);
        }
    }

    /// An entity or character reference inside text. There is no DTD, so only XML's five
    /// predefined entities exist; anything else is kept as written for a person to see.
    fn reference(&mut self, r: &BytesRef<'_>, decoder: Decoder) {
        if self.cur.is_none() || self.text_too_long {
            return;
        }
        self.text_bytes = self.text_bytes.saturating_add(r.len() + 2);
        match r.resolve_char_ref() {
            Ok(Some(c)) => self.text.push(c),
            Ok(None) => match &**r {
                b"amp" => self.text.push('&'),
                b"lt" => self.text.push('<'),
                b"gt" => self.text.push('>'),
                b"quot" => self.text.push('"'),
                b"apos" => self.text.push('\''),
                other => {
                    self.text.push('&');
                    let _ = decoder.decode_into(other, &mut self.text);
                    self.text.push(';');
                }
            },
            Err(err) => {
                let reason = format!("text of <{}>: {err}", clip(&self.name));
                self.problem(reason, None);
            }
        }
    }

    fn end(&mut self, pos: u64) -> Result<Flow, FileError> {
        let Some(idx) = self.stack.len().checked_sub(1) else {
            return Ok(Flow::Done);
        };
        let field = match &self.cur {
            Some(active) if idx > active.base => {
                let own_id = matches!(active.entity, Entity::Document(_)) && idx == active.base + 1;
                field_problem(
                    self.stack.get(idx).copied().unwrap_or(Tag::Other),
                    own_id,
                    self.text.trim(),
                )
            }
            _ => None,
        };
        if let Some(problem) = field {
            let excerpt = clip(self.text.trim());
            self.problem(problem, Some(excerpt));
            // a refused value goes no further: not as an id, not into any message
            self.text.clear();
        }
        if let Some(active) = &mut self.cur {
            if idx > active.base {
                let rel = self.stack.get(active.base + 1..).unwrap_or(&[]);
                let text = self.text.trim();
                match &mut active.entity {
                    Entity::Document(d) => d.end(rel, text, self.opts, &mut active.problem),
                    Entity::Product(p) => p.end(rel, text, &mut active.problem),
                    Entity::PriceType(p) => p.end(rel, text),
                    Entity::Offer(o) => o.end(rel, text, &mut active.problem),
                    Entity::Groups => {
                        let depth = self.groups.last().map_or(usize::MAX, |g| g.depth);
                        if depth < idx {
                            if let Some(g) = self.groups.last_mut() {
                                g.end(self.stack.get(depth + 1..).unwrap_or(&[]), text);
                            }
                        } else if depth == idx {
                            self.finish_group()?;
                        }
                    }
                }
            } else if idx == active.base
                && let Some(active) = self.cur.take()
            {
                self.finish(active, pos)?;
            }
        }
        self.stack.pop();
        self.text.clear();
        self.text_bytes = 0;
        self.text_too_long = false;
        if self.stack.is_empty() {
            return Ok(Flow::Done);
        }
        Ok(Flow::Continue)
    }

    fn emit(&mut self, item: Item, pos: u64) -> Result<(), FileError> {
        match &item {
            Item::Document(_) => self.info.documents += 1,
            Item::Rejected(_) => self.info.rejected += 1,
            _ => {}
        }
        (self.on_item)(item).map_err(|message| FileError::Stopped {
            file: self.label.to_string(),
            offset: pos,
            message,
        })
    }

    fn rejected(&self, doc_ref: Option<&str>, offset: u64, problem: Problem) -> Item {
        let doc_ref = match doc_ref.map(str::trim).filter(|r| !r.is_empty()) {
            Some(r) => r.to_string(),
            None => format!("{}@{offset}", self.label),
        };
        Item::Rejected(Rejected {
            system: self.opts.system.clone(),
            doc_ref,
            reason: problem.reason,
            location: Some(self.location(offset)),
            excerpt: problem.excerpt.map(|e| clip(&e)),
            ..Default::default()
        })
    }

    fn finish(&mut self, active: Active, pos: u64) -> Result<(), FileError> {
        let offset = active.offset;
        let item = match active.entity {
            Entity::Document(d) => {
                let ctx = DocContext {
                    opts: self.opts,
                    stamp: self.stamp,
                };
                let found = d.found(self.opts.timezone);
                match d.finish(active.problem, &ctx) {
                    DocOutcome::Emit(incoming) => Item::Document(incoming),
                    DocOutcome::Skip => {
                        self.info.skipped += 1;
                        return Ok(());
                    }
                    DocOutcome::Reject(id, problem) => {
                        let mut item = self.rejected(id.as_deref(), offset, problem);
                        if let Item::Rejected(r) = &mut item {
                            (r.kind, r.number, r.occurred_at) = found;
                        }
                        item
                    }
                }
            }
            Entity::Product(p) => match p.finish(active.problem) {
                Ok(product) => Item::Product(product),
                Err((id, problem)) => self.rejected(id.as_deref(), offset, problem),
            },
            Entity::PriceType(p) => match p.finish(active.problem) {
                Ok(price_type) => Item::PriceType(price_type),
                Err((id, problem)) => self.rejected(id.as_deref(), offset, problem),
            },
            Entity::Offer(o) => match o.finish(active.problem) {
                Ok(offer) => Item::Offer(offer),
                Err((id, problem)) => self.rejected(id.as_deref(), offset, problem),
            },
            Entity::Groups => return self.finish_group(),
        };
        self.emit(item, pos)
    }

    /// Closes the innermost open group. Its parent is the enclosing group when that group's
    /// `Ид` is already known; otherwise the group waits for it (children before `Ид` is an
    /// unusual order, but children come in any order). Groups come out children first.
    fn finish_group(&mut self) -> Result<(), FileError> {
        let Some(g) = self.groups.pop() else { return Ok(()) };
        let GroupDraft {
            id,
            name,
            problem,
            waiting,
            offset,
            ..
        } = g;
        let id = id.filter(|i| !i.is_empty());
        let (item, id) = match (problem, id) {
            (Some(problem), id) => (self.rejected(id.as_deref(), offset, problem), None),
            (None, None) => {
                let problem = Problem {
                    reason: "group without Ид".into(),
                    excerpt: name.clone().map(|n| format!("Наименование {:?}", clip(&n))),
                };
                (self.rejected(None, offset, problem), None)
            }
            (None, Some(id)) => {
                let parent_id = self.groups.last().and_then(|p| p.id.clone());
                let group = Group {
                    id: id.clone(),
                    name: name.unwrap_or_default(),
                    parent: parent_id.clone(),
                };
                if let Some(parent) = self.groups.last_mut() {
                    let room = parent.waiting.len() + 1 + waiting.len() <= MAX_LIST_ITEMS_PER_ENTRY;
                    if parent_id.is_none() && room {
                        parent.waiting.push(group);
                        for w in waiting {
                            let parent_of_w = w.parent.clone().or_else(|| Some(id.clone()));
                            parent.waiting.push(Group {
                                parent: parent_of_w,
                                ..w
                            });
                        }
                        return Ok(());
                    }
                }
                (Item::Group(group), Some(id))
            }
        };
        // Children waiting for this group's `Ид` get it now; under a group that has none
        // (refused) they come out without a parent rather than not at all.
        for w in waiting {
            let parent_of_w = w.parent.clone().or_else(|| id.clone());
            self.emit(
                Item::Group(Group {
                    parent: parent_of_w,
                    ..w
                }),
                offset,
            )?;
        }
        self.emit(item, offset)
    }
}

// ---------------------------------------------------------------------------------------
// Documents

#[derive(Default)]
struct DiscountDraft {
    sum: Option<String>,
    percent: Option<String>,
    included: Option<String>,
}

impl DiscountDraft {
    fn end(&mut self, field: Tag, text: &str) {
        match field {
            Tag::Sum => self.sum = Some(text.to_string()),
            Tag::Percent => self.percent = Some(text.to_string()),
            Tag::Included => self.included = Some(text.to_string()),
            _ => {}
        }
    }

    /// The discount's amount and whether the sums already include it. `base` is what a
    /// percentage applies to. The sign is dropped: a discount only ever reduces, and some
    /// site modules write it negative.
    fn amount(&self, base: Money) -> Result<(Money, bool), String> {
        let included = match self.included.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => true,
            Some(t) => parse_bool(t).ok_or_else(|| format!("УчтеноВСумме {t:?} is not true or false"))?,
        };
        if let Some(sum) = self.sum.as_deref().filter(|s| !s.trim().is_empty()) {
            let m = money(sum).map_err(|e| format!("discount Сумма {e}"))?;
            return Ok((Money(m.0.abs()), included));
        }
        if let Some(pct) = self.percent.as_deref().filter(|s| !s.trim().is_empty()) {
            let p = parse_decimal(pct.trim().trim_end_matches('%'))
                .map_err(|_| format!("discount Процент {pct:?} is not a number"))?;
            let amount = base
                .as_decimal()
                .checked_mul(p)
                .and_then(|v| v.checked_div(Decimal::ONE_HUNDRED))
                .ok_or_else(|| format!("discount Процент {pct:?} is out of range"))?;
            let m = rubles(amount).map_err(|e| format!("discount Процент {e}"))?;
            return Ok((Money(m.0.abs()), included));
        }
        Ok((Money::ZERO, included))
    }
}

#[derive(Default)]
struct LineDraft {
    id: Option<String>,
    name: Option<String>,
    price: Option<String>,
    quantity: Option<String>,
    sum: Option<String>,
    discounts: Vec<DiscountDraft>,
    discount: DiscountDraft,
    service: bool,
    req_name: Option<String>,
    req_value: Option<String>,
}

impl LineDraft {
    /// Converts the line; `n` is its 1-based position for messages.
    fn finish(self, n: usize) -> Result<Line, Problem> {
        let id = self.id.unwrap_or_default();
        let fail = |what: String, value: Option<&str>| Problem {
            reason: format!("line {n} ({id}): {what}"),
            excerpt: value.map(|v| format!("Товар {id:?}: {v:?}")),
        };
        let qty_text = self.quantity.as_deref().unwrap_or("");
        if qty_text.is_empty() {
            return Err(fail("no Количество".into(), None));
        }
        let quantity = quantity(qty_text).map_err(|e| fail(format!("Количество {e}"), Some(qty_text)))?;
        let price = match self.price.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(money(p).map_err(|e| fail(format!("ЦенаЗаЕдиницу {e}"), Some(p)))?),
            None => None,
        };
        let sum = match self.sum.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(money(s).map_err(|e| fail(format!("Сумма {e}"), Some(s)))?),
            None => None,
        };
        let gross = match price {
            Some(p) => Some(
                p.as_decimal()
                    .checked_mul(quantity)
                    .ok_or(AmountProblem::OutOfRange)
                    .and_then(rubles)
                    .map_err(|e| fail(format!("ЦенаЗаЕдиницу × Количество {e}"), None))?,
            ),
            None => None,
        };
        let Some(base) = gross.or(sum) else {
            return Err(fail("neither Сумма nor ЦенаЗаЕдиницу".into(), None));
        };
        let mut included = 0i64;
        let mut excluded = 0i64;
        for d in &self.discounts {
            let (amount, inc) = d.amount(base).map_err(|e| fail(e, None))?;
            let slot = if inc { &mut included } else { &mut excluded };
            *slot = slot
                .checked_add(amount.0)
                .ok_or_else(|| fail("discounts out of range".into(), None))?;
        }
        let discount = included
            .checked_add(excluded)
            .ok_or_else(|| fail("discounts out of range".into(), None))?;
        let net = match (sum, gross) {
            (Some(s), _) => s.0.checked_sub(excluded),
            (None, Some(g)) => g.0.checked_sub(discount),
            (None, None) => None,
        }
        .ok_or_else(|| fail("amounts out of range".into(), None))?;
        let unit_price = match price {
            Some(p) => p,
            None if !quantity.is_zero() => Decimal::new(net.saturating_add(discount), 2)
                .checked_div(quantity)
                .ok_or(AmountProblem::OutOfRange)
                .and_then(rubles)
                .map_err(|e| fail(format!("unit price {e}"), None))?,
            None => Money::ZERO,
        };
        let service = self.service || id == "ORDER_DELIVERY";
        Ok(Line {
            product_id: id,
            name: self.name.unwrap_or_default(),
            category: None,
            category_parents: Vec::new(),
            quantity,
            unit_price,
            discount: Money(discount),
            net: Money(net),
            unit_cost: None,
            service,
        })
    }
}

#[derive(Default)]
struct PartyDraft {
    id: Option<String>,
    name: Option<String>,
    full_name: Option<String>,
    /// `ДатаРождения` of a person (the XSD's `РеквизитыФизЛица`, `ДатаТип`): the birthday
    /// bonus's source when 1C sends its counterparties.
    birth_date: Option<String>,
    role: Option<String>,
    phone: Option<Phone>,
    email: Option<Email>,
    contact_type: Option<String>,
    contact_value: Option<String>,
}

impl PartyDraft {
    fn finish_contact(&mut self) {
        let kind = self.contact_type.take().unwrap_or_default().to_lowercase();
        let value = self.contact_value.take().unwrap_or_default();
        if kind.contains("телефон") || kind.contains("phone") {
            if self.phone.is_none() {
                self.phone = Phone::parse(&value);
            }
        } else if (kind.contains("почта") || kind.contains("mail")) && self.email.is_none() {
            self.email = Email::parse(&value);
        }
    }
}

#[derive(Default)]
struct DocDraft {
    id: Option<String>,
    number: Option<String>,
    date: Option<String>,
    time: Option<String>,
    operation: Option<String>,
    currency: Option<String>,
    sum: Option<String>,
    basis: Option<String>,
    party: PartyDraft,
    buyer: Option<PartyDraft>,
    other_party: Option<PartyDraft>,
    discount: DiscountDraft,
    discounts: Vec<DiscountDraft>,
    line: LineDraft,
    lines: Vec<Line>,
    goods_seen: usize,
    req_name: Option<String>,
    req_value: Option<String>,
    posted: Option<String>,
    deletion_mark: Option<String>,
    cancelled: Option<String>,
    paid: Option<String>,
    /// «Номер/Дата оплаты по 1С»: how a stock 1C marks a paid site order (UT `OS:5688-5728`).
    payment_ref: bool,
    /// «Номер/Дата отгрузки по 1С»: how it marks a shipped one.
    shipment_ref: bool,
    final_status: Option<String>,
    order_status: Option<String>,
    link: Option<String>,
    card: Option<String>,
    card_fallback: Option<String>,
    /// The customer requisites named in [`Options`]: friend code, invite code, birthday.
    referral: Option<String>,
    invite: Option<String>,
    birthday: Option<String>,
    points: Option<String>,
}

// Made once per document and consumed at once; boxing would cost an allocation per sale.
#[allow(clippy::large_enum_variant)]
enum DocOutcome {
    Emit(Incoming),
    Skip,
    Reject(Option<String>, Problem),
}

struct DocContext<'a> {
    opts: &'a Options,
    stamp: Option<i64>,
}

/// What `ХозОперация` says the document is.
enum Operation {
    Sale,
    Return,
    Order,
    Other,
}

fn set(slot: &mut Option<String>, text: &str) {
    *slot = Some(text.to_string());
}

impl DocDraft {
    /// Handles the end of an element inside the document; `rel` is its path below `Документ`.
    fn end(&mut self, rel: &[Tag], text: &str, opts: &Options, problem: &mut Option<Problem>) {
        use Tag::*;
        match rel {
            [Id] => set(&mut self.id, text),
            [Number] => set(&mut self.number, text),
            [Date] => set(&mut self.date, text),
            [Time] => set(&mut self.time, text),
            [Operation] => set(&mut self.operation, text),
            [Currency] => set(&mut self.currency, text),
            [Sum] => set(&mut self.sum, text),
            [Basis] => set(&mut self.basis, text),

            [Parties, Party, Id] => set(&mut self.party.id, text),
            [Parties, Party, Name] => set(&mut self.party.name, text),
            [Parties, Party, FullName] => set(&mut self.party.full_name, text),
            [Parties, Party, BirthDate] => set(&mut self.party.birth_date, text),
            [Parties, Party, Role] => set(&mut self.party.role, text),
            [Parties, Party, Contacts, Contact, Type] => set(&mut self.party.contact_type, text),
            [Parties, Party, Contacts, Contact, Value] => set(&mut self.party.contact_value, text),
            [Parties, Party, Contacts, Contact] => self.party.finish_contact(),
            [Parties, Party] => {
                let party = std::mem::take(&mut self.party);
                let role = party.role.as_deref().unwrap_or("");
                if key_eq(role, "Покупатель") {
                    if self.buyer.is_none() {
                        self.buyer = Some(party);
                    }
                } else if !key_eq(role, "Продавец") && self.other_party.is_none() {
                    self.other_party = Some(party);
                }
            }

            [Discounts, Discount, field] => self.discount.end(*field, text),
            [Discounts, Discount] => {
                let d = std::mem::take(&mut self.discount);
                if self.discounts.len() < MAX_DISCOUNTS_PER_ENTRY {
                    self.discounts.push(d);
                } else if problem.is_none() {
                    *problem = Some(Problem {
                        reason: format!("more than {MAX_DISCOUNTS_PER_ENTRY} document discounts"),
                        excerpt: self.excerpt(None),
                    });
                }
            }

            [Goods, Good, Id] => set(&mut self.line.id, text),
            [Goods, Good, Name] => set(&mut self.line.name, text),
            [Goods, Good, UnitPrice] => set(&mut self.line.price, text),
            [Goods, Good, Quantity] => set(&mut self.line.quantity, text),
            [Goods, Good, Sum] => set(&mut self.line.sum, text),
            [Goods, Good, Discounts, Discount, field] => self.line.discount.end(*field, text),
            [Goods, Good, Discounts, Discount] => {
                let d = std::mem::take(&mut self.line.discount);
                if self.line.discounts.len() < MAX_DISCOUNTS_PER_ENTRY {
                    self.line.discounts.push(d);
                } else if problem.is_none() {
                    *problem = Some(Problem {
                        reason: format!(
                            "line {}: more than {MAX_DISCOUNTS_PER_ENTRY} discounts",
                            self.goods_seen
                        ),
                        excerpt: self.excerpt(None),
                    });
                }
            }
            [Goods, Good, Requisites, Requisite, Name] => set(&mut self.line.req_name, text),
            [Goods, Good, Requisites, Requisite, Value] => set(&mut self.line.req_value, text),
            [Goods, Good, Requisites, Requisite] => {
                let name = self.line.req_name.take().unwrap_or_default();
                let value = self.line.req_value.take().unwrap_or_default();
                if (key_eq(&name, "ВидНоменклатуры") || key_eq(&name, "ТипНоменклатуры"))
                    && key_eq(&value, "Услуга")
                {
                    self.line.service = true;
                }
            }
            [Goods, Good] => {
                let line = std::mem::take(&mut self.line);
                if problem.is_some() || self.goods_seen > opts.limits.max_lines_per_document {
                    return;
                }
                match line.finish(self.goods_seen) {
                    Ok(line) => self.lines.push(line),
                    Err(mut p) => {
                        p.excerpt = self.excerpt(p.excerpt.as_deref());
                        *problem = Some(p);
                    }
                }
            }

            [Requisites, Requisite, Name] => set(&mut self.req_name, text),
            [Requisites, Requisite, Value] => set(&mut self.req_value, text),
            [Requisites, Requisite] => {
                let name = self.req_name.take().unwrap_or_default();
                let value = self.req_value.take().unwrap_or_default();
                self.requisite(&name, value, opts);
            }
            _ => {}
        }
    }

    /// Keeps the requisites that matter; the rest of a document's requisites are dropped as
    /// they arrive, so a document with thousands of them holds none.
    fn requisite(&mut self, name: &str, value: String, opts: &Options) {
        let configured = |o: &Option<String>| o.as_deref().is_some_and(|n| key_eq(name, n));
        if configured(&opts.return_link_requisite) {
            self.link = Some(value);
        } else if configured(&opts.points_requisite) {
            self.points = Some(value);
        } else if configured(&opts.card_requisite) {
            self.card = Some(value);
        } else if configured(&opts.referral_requisite) {
            self.referral = Some(value).filter(|v| !v.trim().is_empty());
        } else if configured(&opts.invite_requisite) {
            self.invite = Some(value).filter(|v| !v.trim().is_empty());
        } else if configured(&opts.birthday_requisite) {
            self.birthday = Some(value).filter(|v| !v.trim().is_empty());
        } else if key_eq(name, "Проведен") {
            self.posted = Some(value);
        } else if key_eq(name, "ПометкаУдаления") {
            self.deletion_mark = Some(value);
        } else if key_eq(name, "Отменен") {
            self.cancelled = Some(value);
        } else if key_eq(name, "Заказ оплачен") {
            self.paid = Some(value);
        } else if key_eq(name, "Номер оплаты по 1С") || key_eq(name, "Дата оплаты по 1С")
        {
            self.payment_ref |= !value.trim().is_empty();
        } else if key_eq(name, "Номер отгрузки по 1С") || key_eq(name, "Дата отгрузки по 1С")
        {
            self.shipment_ref |= !value.trim().is_empty();
        } else if key_eq(name, "Финальный статус") {
            self.final_status = Some(value);
        } else if key_eq(name, "Статус заказа") {
            self.order_status = Some(value);
        } else if DEFAULT_CARD_REQUISITES.iter().any(|n| key_eq(name, n)) && self.card_fallback.is_none() {
            self.card_fallback = Some(value);
        }
    }

    /// `Ид` and `Номер`, plus a bad value when there is one: enough to find the document in 1C.
    fn excerpt(&self, bad: Option<&str>) -> Option<String> {
        let mut out = String::new();
        if let Some(id) = &self.id {
            out.push_str(&format!("Ид {:?}", clip(id)));
        }
        if let Some(n) = &self.number {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&format!("Номер {:?}", clip(n)));
        }
        if let Some(b) = bad {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(b);
        }
        (!out.is_empty()).then(|| clip(&out))
    }

    fn operation(&self) -> Option<Operation> {
        let op = self.operation.as_deref()?.trim();
        Some(if key_eq(op, "Отпуск товара") {
            Operation::Sale
        } else if key_eq(op, "Возврат товара") {
            Operation::Return
        } else if key_eq(op, "Заказ товара") {
            Operation::Order
        } else {
            Operation::Other
        })
    }

    /// The void a document's requisites declare, if any; a value that is not a boolean is
    /// an error rather than a guess, since guessing wrong would count an unposted sale.
    fn void_reason(&self) -> Result<Option<VoidReason>, Problem> {
        let flag = |name: &str, value: &Option<String>| -> Result<Option<bool>, Problem> {
            match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => parse_bool(v).map(Some).ok_or_else(|| Problem {
                    reason: format!("requisite {name} is {:?}, expected true or false", clip(v)),
                    excerpt: self.excerpt(Some(&format!("{name} {v:?}"))),
                }),
            }
        };
        if flag("ПометкаУдаления", &self.deletion_mark)? == Some(true) {
            return Ok(Some(VoidReason::DeletionMarked));
        }
        if flag("Отменен", &self.cancelled)? == Some(true) {
            return Ok(Some(VoidReason::Cancelled));
        }
        if flag("Проведен", &self.posted)? == Some(false) {
            return Ok(Some(VoidReason::Unposted));
        }
        Ok(None)
    }

    /// A 1C reply to a site's order: requisites only (`Номер по 1С`, `Проведен`, …), no
    /// goods, no sum, no currency.
    fn is_reply(&self) -> bool {
        self.goods_seen == 0 && self.sum.is_none() && self.currency.is_none()
    }

    fn finish(mut self: Box<Self>, problem: Option<Problem>, ctx: &DocContext<'_>) -> DocOutcome {
        let id = self
            .id
            .as_deref()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(str::to_string);
        let reject = |id: &Option<String>, p: Problem| DocOutcome::Reject(id.clone(), p);
        let kind = match self.operation() {
            Some(Operation::Sale) => DocKind::Sale,
            Some(Operation::Return) => DocKind::Return,
            Some(Operation::Other) => return DocOutcome::Skip,
            Some(Operation::Order) => match ctx.opts.orders {
                OrderPolicy::Ignore => return DocOutcome::Skip,
                _ => DocKind::Sale,
            },
            None => {
                let p = problem.unwrap_or_else(|| Problem {
                    reason: "document has no ХозОперация".into(),
                    excerpt: self.excerpt(None),
                });
                return reject(&id, p);
            }
        };
        let is_order = matches!(self.operation(), Some(Operation::Order));
        let void = match self.void_reason() {
            Ok(v) => v,
            Err(p) => return reject(&id, problem.unwrap_or(p)),
        };
        let Some(doc_id) = id.clone() else {
            let p = problem.unwrap_or_else(|| Problem {
                reason: "document has no Ид".into(),
                excerpt: self.excerpt(None),
            });
            return reject(&None, p);
        };
        if let Some(reason) = void {
            let version = match (&problem, self.convert(kind, doc_id.clone(), ctx)) {
                (None, Ok(doc)) => format!("{}:{}", content_version(&doc), reason.as_str()),
                _ => format!("{}:{}", self.identity_hash(), reason.as_str()),
            };
            return DocOutcome::Emit(Incoming::Void {
                source: SourceRef {
                    system: ctx.opts.system.clone(),
                    doc_id,
                    version,
                    stamp: ctx.stamp,
                },
                reason,
            });
        }
        if is_order {
            let yes = |v: &Option<String>| v.as_deref().and_then(parse_bool) == Some(true);
            let counts = match ctx.opts.orders {
                OrderPolicy::Ignore => false,
                OrderPolicy::Always => true,
                OrderPolicy::WhenPaid => yes(&self.paid) || self.payment_ref,
                OrderPolicy::WhenShipped => {
                    yes(&self.final_status)
                        || self.shipment_ref
                        || self.order_status.as_deref().is_some_and(is_shipped_status)
                }
            };
            if !counts {
                return DocOutcome::Skip;
            }
        }
        if let Some(p) = problem {
            return reject(&id, p);
        }
        if self.is_reply() {
            return DocOutcome::Skip;
        }
        match self.convert(kind, doc_id, ctx) {
            Ok(doc) => DocOutcome::Emit(Incoming::Document(doc)),
            Err(p) => reject(&id, p),
        }
    }

    /// A stable hash of what identifies a document that cannot be converted (a 1C reply):
    /// the void built from it gets the same version every time it is read.
    fn identity_hash(&self) -> String {
        let mut h = Sha256::new();
        for field in [
            &self.id,
            &self.number,
            &self.date,
            &self.time,
            &self.operation,
            &self.posted,
            &self.deletion_mark,
            &self.cancelled,
        ] {
            let s = field.as_deref().unwrap_or("");
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        crate::core::document::hash_version(&h.finalize()[..16])
    }

    fn convert(&mut self, kind: DocKind, doc_id: String, ctx: &DocContext<'_>) -> Result<Document, Problem> {
        let fail = |this: &Self, reason: String, bad: Option<String>| Problem {
            reason,
            excerpt: this.excerpt(bad.as_deref()),
        };
        let currency = match self.currency.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
            None => return Err(fail(self, "document has no Валюта".into(), None)),
            Some(c) => match currency_code(c) {
                Some(code) => code.to_string(),
                None => {
                    return Err(fail(
                        self,
                        format!("unknown currency {:?} in Валюта", clip(c)),
                        Some(format!("Валюта {c:?}")),
                    ));
                }
            },
        };
        let occurred_at = self
            .occurred_at(ctx.opts.timezone)
            .map_err(|r| fail(self, r, None))?;

        let mut lines = std::mem::take(&mut self.lines);
        let mut lines_sum = 0i64;
        for l in &lines {
            lines_sum = lines_sum
                .checked_add(l.net.0)
                .ok_or_else(|| fail(self, "line sums out of range".into(), None))?;
        }
        let mut spread = 0i64;
        for d in &self.discounts {
            let (amount, included) = d.amount(Money(lines_sum)).map_err(|r| fail(self, r, None))?;
            if !included {
                spread = spread
                    .checked_add(amount.0)
                    .ok_or_else(|| fail(self, "discounts out of range".into(), None))?;
            }
        }
        if spread != 0 {
            spread_discount(&mut lines, spread);
        }
        let stated = match self.sum.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(
                money(s)
                    .map_err(|e| fail(self, format!("document Сумма {e}"), Some(format!("Сумма {s:?}"))))?,
            ),
            None => None,
        };
        let total = match stated {
            Some(s) if spread != 0 && s.0 == lines_sum => Money(s.0 - spread),
            Some(s) => s,
            None => Money(lines_sum - spread),
        };

        let points_redeemed = match self.points.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
            None => Points(0),
            Some(p) => {
                let name = ctx.opts.points_requisite.as_deref().unwrap_or("points");
                let value = parse_decimal(p)
                    .ok()
                    .filter(|v| v.fract().is_zero())
                    .and_then(|v| v.to_i64())
                    .filter(|v| v.unsigned_abs() <= MAX_AMOUNT_RUBLES as u64);
                match value {
                    Some(v) => Points(v),
                    None => {
                        return Err(fail(
                            self,
                            format!(
                                "requisite {name} is {:?}, expected a whole number of points",
                                clip(p)
                            ),
                            Some(format!("{name} {p:?}")),
                        ));
                    }
                }
            }
        };

        let party = self.buyer.take().or_else(|| self.other_party.take());
        let card = self
            .card
            .as_deref()
            .and_then(normalize_card)
            .or_else(|| self.card_fallback.as_deref().and_then(normalize_card));
        let mut customer = match party {
            Some(p) => {
                // a date that is no date (31.02) is left out and said on the customer: the
                // sale still counts
                let (birthday, unreadable) = match p.birth_date.as_deref().map(str::trim) {
                    Some(d) if !d.is_empty() => match chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d") {
                        Ok(date) => (Some(date), Vec::new()),
                        Err(_) => (
                            None,
                            vec![(
                                "birthday".to_string(),
                                d.to_string(),
                                format!("ДатаРождения {d:?} is not a date (the XSD's ДатаТип: YYYY-MM-DD)"),
                            )],
                        ),
                    },
                    _ => (None, Vec::new()),
                };
                CustomerIdentity {
                    card,
                    phone: p.phone,
                    email: p.email,
                    onec_id: p.id.map(|i| i.trim().to_string()).filter(|i| !i.is_empty()),
                    amocrm_id: None,
                    name: p.name.or(p.full_name).filter(|n| !n.is_empty()),
                    birthday,
                    unreadable,
                    ..CustomerIdentity::default()
                }
            }
            None => CustomerIdentity {
                card,
                ..CustomerIdentity::default()
            },
        };
        // what the document's requisites say of its customer (a site's order form, a field
        // the shop added): a birthday fills one the counterparty does not give
        customer.referred_by = self.referral.take().map(|v| v.trim().to_string());
        customer.invite_code = self.invite.take().map(|v| v.trim().to_string());
        if let Some(text) = self.birthday.take() {
            match crate::core::identity::parse_birthday(&text) {
                Ok(d) => {
                    customer.birthday.get_or_insert(d);
                }
                Err(reason) => customer.unreadable.push((
                    "birthday".to_string(),
                    text.trim().to_string(),
                    format!(
                        "requisite {:?}: {reason}",
                        ctx.opts.birthday_requisite.as_deref().unwrap_or_default()
                    ),
                )),
            }
        }
        let original = match kind {
            DocKind::Return => self
                .link
                .as_deref()
                .or(self.basis.as_deref())
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string),
            DocKind::Sale => None,
        };
        let mut doc = Document {
            source: SourceRef {
                system: ctx.opts.system.clone(),
                doc_id,
                version: String::new(),
                stamp: ctx.stamp,
            },
            kind,
            number: self.number.clone().filter(|n| !n.is_empty()),
            occurred_at,
            customer,
            currency,
            lines,
            total,
            points_redeemed,
            original,
            store: None,
            partner: None,
        };
        doc.source.version = content_version(&doc);
        Ok(doc)
    }

    /// `ХозОперация`, `Номер` and the date as far as they could be read, so a rejected
    /// document can still be found in 1C and counted on its own day (noon when only the
    /// time is unreadable).
    fn found(&self, tz: Tz) -> (Option<String>, Option<String>, Option<DateTime<Utc>>) {
        let clean = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(clip);
        let at = self.occurred_at(tz).ok().or_else(|| {
            let date = parse_date(split_date_time(self.date.as_deref()?.trim()).0)?;
            to_utc(date.and_time(NaiveTime::from_hms_opt(12, 0, 0)?), None, tz)
        });
        (clean(&self.operation), clean(&self.number), at)
    }

    /// `Дата` (xs:date; some writers put a full dateTime there) plus `Время` (xs:time, the
    /// shop's local time), made an instant.
    fn occurred_at(&self, tz: Tz) -> Result<DateTime<Utc>, String> {
        let date_text = self.date.as_deref().map(str::trim).unwrap_or("");
        if date_text.is_empty() {
            return Err("document has no Дата".into());
        }
        let (date_part, time_in_date) = split_date_time(date_text);
        let date = parse_date(date_part)
            .ok_or_else(|| format!("Дата {:?} is not a date (expected yyyy-mm-dd)", clip(date_text)))?;
        let time_text = self
            .time
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .or(time_in_date);
        let (time, offset) = match time_text {
            None => (NaiveTime::MIN, None),
            Some(t) => parse_time(t)
                .ok_or_else(|| format!("Время {:?} is not a time (expected hh:mm:ss)", clip(t)))?,
        };
        to_utc(date.and_time(time), offset, tz)
            .ok_or_else(|| format!("Дата {date_text:?} and Время {time_text:?} name no instant"))
    }
}

/// Spreads a document-level discount (kopecks) over the lines in proportion to their net,
/// so that the shares add up to it exactly; the rounding remainder goes to the largest line.
fn spread_discount(lines: &mut [Line], amount: i64) {
    let weights: Vec<i128> = lines.iter().map(|l| i128::from(l.net.0.max(0))).collect();
    let total: i128 = weights.iter().sum();
    let largest = weights
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i);
    let Some(largest) = largest else { return };
    let mut given = 0i64;
    if total > 0 {
        for (line, w) in lines.iter_mut().zip(&weights) {
            let share = i64::try_from(i128::from(amount) * w / total).unwrap_or(0);
            line.net = Money(line.net.0.saturating_sub(share));
            line.discount = Money(line.discount.0.saturating_add(share));
            given = given.saturating_add(share);
        }
    }
    if let Some(line) = lines.get_mut(largest) {
        let rest = amount.saturating_sub(given);
        line.net = Money(line.net.0.saturating_sub(rest));
        line.discount = Money(line.discount.0.saturating_add(rest));
    }
}

// ---------------------------------------------------------------------------------------
// Catalog

#[derive(Default)]
struct GroupDraft {
    depth: usize,
    offset: u64,
    id: Option<String>,
    name: Option<String>,
    problem: Option<Problem>,
    /// Finished child groups waiting for this group's `Ид`.
    waiting: Vec<Group>,
}

impl GroupDraft {
    fn new(depth: usize, offset: u64) -> GroupDraft {
        GroupDraft {
            depth,
            offset,
            ..GroupDraft::default()
        }
    }

    fn end(&mut self, rel: &[Tag], text: &str) {
        match rel {
            [Tag::Id] => set(&mut self.id, text),
            [Tag::Name] => set(&mut self.name, text),
            _ => {}
        }
    }
}

#[derive(Default)]
struct ProductDraft {
    id: Option<String>,
    name: Option<String>,
    article: Option<String>,
    groups: Vec<String>,
    service: bool,
    deleted: bool,
    req_name: Option<String>,
    req_value: Option<String>,
}

type EntryResult<T> = Result<T, (Option<String>, Problem)>;

impl ProductDraft {
    fn end(&mut self, rel: &[Tag], text: &str, problem: &mut Option<Problem>) {
        use Tag::*;
        match rel {
            [Id] => set(&mut self.id, text),
            [Name] => set(&mut self.name, text),
            [Article] => set(&mut self.article, text),
            [Status] => self.deleted |= key_eq(text, "Удален"),
            [Groups, Id] if !text.is_empty() => {
                if self.groups.len() < MAX_LIST_ITEMS_PER_ENTRY {
                    self.groups.push(text.to_string());
                } else if problem.is_none() {
                    *problem = Some(Problem {
                        reason: format!("product in more than {MAX_LIST_ITEMS_PER_ENTRY} groups"),
                        excerpt: None,
                    });
                }
            }
            [Requisites, Requisite, Name] => set(&mut self.req_name, text),
            [Requisites, Requisite, Value] => set(&mut self.req_value, text),
            [Requisites, Requisite] => {
                let name = self.req_name.take().unwrap_or_default();
                let value = self.req_value.take().unwrap_or_default();
                if (key_eq(&name, "ВидНоменклатуры") || key_eq(&name, "ТипНоменклатуры"))
                    && key_eq(&value, "Услуга")
                {
                    self.service = true;
                }
            }
            _ => {}
        }
    }

    fn finish(self, problem: Option<Problem>) -> EntryResult<Product> {
        let id = self.id.filter(|i| !i.is_empty());
        if let Some(p) = problem {
            return Err((id, p));
        }
        let Some(id) = id else {
            return Err((
                None,
                Problem {
                    reason: "product without Ид".into(),
                    excerpt: self.name.map(|n| format!("Наименование {:?}", clip(&n))),
                },
            ));
        };
        Ok(Product {
            id,
            name: self.name.unwrap_or_default(),
            article: self.article.filter(|a| !a.is_empty()),
            groups: self.groups,
            service: self.service,
            deleted: self.deleted,
        })
    }
}

#[derive(Default)]
struct PriceTypeDraft {
    id: Option<String>,
    name: Option<String>,
    currency: Option<String>,
}

impl PriceTypeDraft {
    fn end(&mut self, rel: &[Tag], text: &str) {
        match rel {
            [Tag::Id] => set(&mut self.id, text),
            [Tag::Name] => set(&mut self.name, text),
            [Tag::Currency] => set(&mut self.currency, text),
            _ => {}
        }
    }

    fn finish(self, problem: Option<Problem>) -> EntryResult<PriceType> {
        let id = self.id.filter(|i| !i.is_empty());
        if let Some(p) = problem {
            return Err((id, p));
        }
        let Some(id) = id else {
            return Err((
                None,
                Problem {
                    reason: "price type without Ид".into(),
                    excerpt: self.name.map(|n| format!("Наименование {:?}", clip(&n))),
                },
            ));
        };
        Ok(PriceType {
            id,
            name: self.name.unwrap_or_default(),
            currency: catalog_currency(self.currency.as_deref()),
        })
    }
}

#[derive(Default)]
struct PriceDraft {
    price_type_id: Option<String>,
    unit_price: Option<String>,
    currency: Option<String>,
    coefficient: Option<String>,
}

#[derive(Default)]
struct OfferDraft {
    id: Option<String>,
    price: PriceDraft,
    prices: Vec<PriceDraft>,
}

impl OfferDraft {
    fn end(&mut self, rel: &[Tag], text: &str, problem: &mut Option<Problem>) {
        use Tag::*;
        match rel {
            [Id] => set(&mut self.id, text),
            [Prices, Price, PriceTypeId] => set(&mut self.price.price_type_id, text),
            [Prices, Price, UnitPrice] => set(&mut self.price.unit_price, text),
            [Prices, Price, Currency] => set(&mut self.price.currency, text),
            [Prices, Price, Coefficient] => set(&mut self.price.coefficient, text),
            [Prices, Price] => {
                let p = std::mem::take(&mut self.price);
                if self.prices.len() < MAX_LIST_ITEMS_PER_ENTRY {
                    self.prices.push(p);
                } else if problem.is_none() {
                    *problem = Some(Problem {
                        reason: format!("offer with more than {MAX_LIST_ITEMS_PER_ENTRY} prices"),
                        excerpt: None,
                    });
                }
            }
            _ => {}
        }
    }

    fn finish(self, problem: Option<Problem>) -> EntryResult<Offer> {
        let id = self.id.filter(|i| !i.is_empty());
        if let Some(p) = problem {
            return Err((id, p));
        }
        let Some(id) = id else {
            return Err((
                None,
                Problem {
                    reason: "offer without Ид".into(),
                    excerpt: None,
                },
            ));
        };
        let mut prices = Vec::with_capacity(self.prices.len());
        for (i, p) in self.prices.into_iter().enumerate() {
            let n = i + 1;
            let fail = |what: String, value: &str| {
                (
                    Some(id.clone()),
                    Problem {
                        reason: format!("offer {id}: price {n}: {what}"),
                        excerpt: Some(format!("Предложение {id:?}: {value:?}")),
                    },
                )
            };
            let text = p.unit_price.as_deref().unwrap_or("");
            if text.is_empty() {
                return Err(fail("no ЦенаЗаЕдиницу".into(), ""));
            }
            let unit_price = money(text).map_err(|e| fail(format!("ЦенаЗаЕдиницу {e}"), text))?;
            let coefficient = match p.coefficient.as_deref().filter(|c| !c.is_empty()) {
                None => None,
                Some(c) => Some(
                    parse_decimal(c).map_err(|_| fail(format!("Коэффициент {c:?} is not a number"), c))?,
                ),
            };
            prices.push(OfferPrice {
                price_type_id: p.price_type_id.unwrap_or_default(),
                unit_price,
                currency: catalog_currency(p.currency.as_deref()),
                coefficient,
            });
        }
        let product_id = id.split('#').next().unwrap_or("").to_string();
        Ok(Offer {
            id,
            product_id,
            prices,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Values

/// Why an amount was refused; shown after the field name and value.
#[derive(Debug)]
enum AmountProblem {
    NotANumber(String),
    OutOfRange,
}

impl std::fmt::Display for AmountProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmountProblem::NotANumber(t) => write!(f, "{:?} is not a number", clip(t)),
            AmountProblem::OutOfRange => write!(f, "is out of range"),
        }
    }
}

/// Rubles as written (`231.7400`, `160,316`, `1 234,50`) → kopecks, half away from zero.
fn money(text: &str) -> Result<Money, AmountProblem> {
    let value = parse_decimal(text).map_err(|_| AmountProblem::NotANumber(text.to_string()))?;
    rubles(value)
}

/// A decimal of rubles → kopecks, refusing magnitudes no receipt has (and that would
/// overflow the arithmetic that follows).
fn rubles(value: Decimal) -> Result<Money, AmountProblem> {
    if value.abs() > Decimal::from(MAX_AMOUNT_RUBLES) {
        return Err(AmountProblem::OutOfRange);
    }
    Money::from_rubles(value).map_err(|_| AmountProblem::OutOfRange)
}

fn quantity(text: &str) -> Result<Decimal, AmountProblem> {
    let value = parse_decimal(text).map_err(|_| AmountProblem::NotANumber(text.to_string()))?;
    if value.abs() > Decimal::from(MAX_QUANTITY) {
        return Err(AmountProblem::OutOfRange);
    }
    Ok(value)
}

/// `true`/`false` as 1C writes requisites, plus the Russian and numeric spellings people use.
fn parse_bool(text: &str) -> Option<bool> {
    let t = text.trim();
    for yes in ["true", "да", "истина", "1"] {
        if key_eq(t, yes) {
            return Some(true);
        }
    }
    for no in ["false", "нет", "ложь", "0"] {
        if key_eq(t, no) {
            return Some(false);
        }
    }
    None
}

/// Compares names the way people vary them: ignoring case and spaces, so
/// `Пометка удаления` is `ПометкаУдаления` and `Заказ Оплачен` is `Заказ оплачен`.
fn key_eq(a: &str, b: &str) -> bool {
    // most comparisons are between names spelt the same way, or differing at once
    if a == b {
        return true;
    }
    fn folded(s: &str) -> impl Iterator<Item = char> + '_ {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
    }
    folded(a).eq(folded(b))
}

/// ISO 4217 codes with their numeric codes, for currencies a Russian shop meets.
const CURRENCIES: &[(&str, &str)] = &[
    ("RUB", "643"),
    ("USD", "840"),
    ("EUR", "978"),
    ("KZT", "398"),
    ("BYN", "933"),
    ("UAH", "980"),
    ("CNY", "156"),
    ("GBP", "826"),
    ("CHF", "756"),
    ("JPY", "392"),
    ("KGS", "417"),
    ("AMD", "051"),
    ("GEL", "981"),
    ("UZS", "860"),
    ("AZN", "944"),
    ("TJS", "972"),
    ("MDL", "498"),
    ("TRY", "949"),
    ("PLN", "985"),
    ("CZK", "203"),
    ("AED", "784"),
    ("INR", "356"),
    ("TMT", "934"),
    ("MNT", "496"),
];

/// Maps a currency as 1C writes it (`руб`, `RUB`, `РУБ`, `643`, `USD`, …) to its ISO code.
/// `None` for anything not recognised: guessing a currency would misstate amounts.
pub fn currency_code(text: &str) -> Option<&'static str> {
    let t = text.trim().trim_end_matches('.').trim();
    let lower = t.to_lowercase();
    match lower.as_str() {
        "руб" | "рубль" | "рублей" | "р" | "₽" | "rur" | "рос. руб" | "российский рубль" =>
        {
            return Some("RUB");
        }
        "долл" | "доллар" | "$" | "долл. сша" | "доллар сша" => return Some("USD"),
        "евро" | "€" => return Some("EUR"),
        "тенге" => return Some("KZT"),
        _ => {}
    }
    CURRENCIES
        .iter()
        .find(|(code, num)| t.eq_ignore_ascii_case(code) || t == *num)
        .map(|(code, _)| *code)
}

/// Catalog currencies: the ISO code when recognised, else the text as written (a price list
/// in an unknown currency is not an error until someone uses it as a cost).
fn catalog_currency(text: Option<&str>) -> Option<String> {
    let t = text?.trim();
    if t.is_empty() {
        return None;
    }
    Some(currency_code(t).map_or_else(|| t.to_string(), str::to_string))
}

/// Splits `2007-10-30T15:19:27` (or with a space) into date and time parts.
fn split_date_time(text: &str) -> (&str, Option<&str>) {
    match text.split_once(['T', 't', ' ']) {
        Some((d, t)) if !t.trim().is_empty() => (d.trim(), Some(t.trim())),
        Some((d, _)) => (d.trim(), None),
        None => (text, None),
    }
}

fn digits<T: FromStr>(text: &str, min_len: usize, max_len: usize) -> Option<T> {
    if text.len() < min_len || text.len() > max_len || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `yyyy-mm-dd` (xs:date) or `dd.mm.yyyy` (requisite dates typed by people).
fn parse_date(text: &str) -> Option<NaiveDate> {
    let t = text.trim();
    let (y, m, d) = if let Some((y, rest)) = t.split_once('-') {
        let (m, d) = rest.split_once('-')?;
        (y, m, d)
    } else {
        let (d, rest) = t.split_once('.')?;
        let (m, y) = rest.split_once('.')?;
        (y, m, d)
    };
    NaiveDate::from_ymd_opt(digits(y, 4, 4)?, digits(m, 1, 2)?, digits(d, 1, 2)?)
}

/// xs:time as 1C writes it, tolerating a one-digit hour (`0:36:33`), missing seconds and a
/// fraction; an explicit zone (`Z`, `+03:00`) is returned when present.
fn parse_time(text: &str) -> Option<(NaiveTime, Option<FixedOffset>)> {
    let t = text.trim();
    let (clock, offset) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
        (c, Some(FixedOffset::east_opt(0)?))
    } else if let Some(i) = t.rfind(['+', '-']).filter(|&i| i > 0) {
        let (c, zone) = t.split_at(i);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let zone = zone.get(1..)?;
        let (hh, mm) = zone.split_once(':').unwrap_or((zone.get(..2)?, zone.get(2..)?));
        let secs = digits::<i32>(hh, 2, 2)? * 3600 + digits::<i32>(mm, 2, 2)? * 60;
        (c, Some(FixedOffset::east_opt(sign * secs)?))
    } else {
        (t, None)
    };
    let mut parts = clock.split(':');
    let h: u32 = digits(parts.next()?, 1, 2)?;
    let m: u32 = digits(parts.next()?, 2, 2)?;
    let (s, nanos) = match parts.next() {
        None => (0, 0),
        Some(sec) => {
            let (whole, frac) = sec.split_once(['.', ',']).unwrap_or((sec, ""));
            let s: u32 = digits(whole, 1, 2)?;
            let nanos = if frac.is_empty() {
                0
            } else {
                let f: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
                digits(&f, 9, 9)?
            };
            (s, nanos)
        }
    };
    if parts.next().is_some() {
        return None;
    }
    Some((NaiveTime::from_hms_nano_opt(h, m, s, nanos)?, offset))
}

/// A local time made an instant. An ambiguous time (clocks set back) takes the earlier
/// instant; a time that never happened (clocks set forward) the instant an hour later.
fn to_utc(local: NaiveDateTime, offset: Option<FixedOffset>, tz: Tz) -> Option<DateTime<Utc>> {
    if let Some(off) = offset {
        return off
            .from_local_datetime(&local)
            .single()
            .map(|t| t.with_timezone(&Utc));
    }
    tz.from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            let later = local.checked_add_signed(Duration::hours(1))?;
            tz.from_local_datetime(&later).earliest()
        })
        .map(|t| t.with_timezone(&Utc))
}

/// `ДатаФормирования`: xs:dateTime, a bare date, or a one-digit hour.
fn parse_stamp(text: &str, tz: Tz) -> Option<DateTime<Utc>> {
    let (date, time) = split_date_time(text.trim());
    let date = parse_date(date)?;
    let (time, offset) = match time {
        Some(t) => parse_time(t)?,
        None => (NaiveTime::MIN, None),
    };
    to_utc(date.and_time(time), offset, tz)
}

/// `Ид` of a document (`ИдентификаторГлобальныйТип` in the CommerceML 2.09/2.10 schema).
const MAX_DOCUMENT_ID_CHARS: usize = 40;
/// `Ид` of goods, offers (`product#variant`), groups, parties (`Идентификатор80`, the
/// widest the schema has for an id).
const MAX_ID_CHARS: usize = 80;
/// `Наименование`, `ПолноеНаименование`, `Номер`, `Артикул` (`НаименованиеТип`,
/// `НомерТип`, `АртикулТип`: 255).
const MAX_NAME_CHARS: usize = 255;
/// `Значение` of a requisite or a contact (`ЗначениеТип`: 1000).
const MAX_VALUE_CHARS: usize = 1_000;

/// Why the text of a field cannot be believed, if it cannot: a control character (a NUL
/// in a name is corruption) or more characters than the schema allows for the field.
/// `own_id` says the field is the document's own `Ид`.
fn field_problem(tag: Tag, own_id: bool, text: &str) -> Option<String> {
    let element = |t: Tag| match t {
        Tag::Id => "Ид",
        Tag::Name => "Наименование",
        Tag::FullName => "ПолноеНаименование",
        Tag::Number => "Номер",
        Tag::Article => "Артикул",
        Tag::Value => "Значение",
        _ => "an element",
    };
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Some(format!(
            "{} holds the control character U+{:04X}",
            element(tag),
            u32::from(c)
        ));
    }
    let max = match tag {
        Tag::Id if own_id => MAX_DOCUMENT_ID_CHARS,
        Tag::Id => MAX_ID_CHARS,
        Tag::Name | Tag::FullName | Tag::Number | Tag::Article => MAX_NAME_CHARS,
        Tag::Value => MAX_VALUE_CHARS,
        _ => return None,
    };
    let n = text.chars().count();
    (n > max).then(|| {
        format!(
            "{} is {n} characters long, more than the {max} the CommerceML schema allows",
            element(tag)
        )
    })
}

/// Shortens text for messages and excerpts, on a character boundary, with control
/// characters shown escaped (`\u{0}`) so an excerpt never carries one.
fn clip(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == MAX_EXCERPT_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_as_1c_writes_them() {
        let tz = chrono_tz::Europe::Moscow;
        let check = |text: &str, expected: Option<&str>| {
            let got = parse_stamp(text, tz).map(|t| t.to_rfc3339());
            assert_eq!(got.as_deref(), expected, "{text:?}");
        };
        check("2007-10-30T18:13:34", Some("2007-10-30T15:13:34+00:00"));
        check("2014-06-01T0:36:33", Some("2014-05-31T20:36:33+00:00"));
        check("2014-06-01", Some("2014-05-31T20:00:00+00:00"));
        check("2020-04-07T13:16:06Z", Some("2020-04-07T13:16:06+00:00"));
        check("2020-04-07T13:16:06+05:00", Some("2020-04-07T08:16:06+00:00"));
        check("2020-04-07T13:16:06.250", Some("2020-04-07T10:16:06.250+00:00"));
        check("07.04.2020 13:16:06", Some("2020-04-07T10:16:06+00:00"));
        check("2020-02-30", None);
        check("yesterday", None);
        check("2020-04-07T25:00:00", None);
        check("", None);
    }

    #[test]
    fn currencies_map_to_iso_codes() {
        for (text, code) in [
            ("руб", Some("RUB")),
            ("руб.", Some("RUB")),
            ("RUB", Some("RUB")),
            ("РУБ", Some("RUB")),
            ("rub", Some("RUB")),
            ("643", Some("RUB")),
            ("USD", Some("USD")),
            ("eur", Some("EUR")),
            ("тугрик", None),
            ("", None),
            ("XYZ", None),
        ] {
            assert_eq!(currency_code(text), code, "{text:?}");
        }
    }

    #[test]
    fn shipped_statuses() {
        assert!(is_shipped_status("[F] Выполнен"));
        assert!(is_shipped_status("Закрыт"));
        assert!(is_shipped_status(" отгружен "));
        assert!(!is_shipped_status("[N] Принят"));
        assert!(!is_shipped_status("Открыт"));
    }

    #[test]
    fn document_discount_spreads_to_the_kopeck() {
        let line = |net: i64| Line {
            product_id: "P".into(),
            name: String::new(),
            category: None,
            category_parents: Vec::new(),
            quantity: Decimal::ONE,
            unit_price: Money(net),
            discount: Money(0),
            net: Money(net),
            unit_cost: None,
            service: false,
        };
        let mut lines = vec![line(100), line(200), line(300)];
        spread_discount(&mut lines, 100);
        let nets: Vec<i64> = lines.iter().map(|l| l.net.0).collect();
        assert_eq!(nets, vec![84, 167, 249]);
        assert_eq!(lines.iter().map(|l| l.discount.0).sum::<i64>(), 100);
        let mut zero = vec![line(0), line(0)];
        spread_discount(&mut zero, 10);
        assert_eq!(zero.iter().map(|l| l.discount.0).sum::<i64>(), 10);
    }

    #[test]
    fn names_compare_ignoring_case_and_spaces() {
        assert!(key_eq("Пометка удаления", "ПометкаУдаления"));
        assert!(key_eq(" заказ ОПЛАЧЕН", "Заказ оплачен"));
        assert!(!key_eq("Проведен", "Отменен"));
        assert_eq!(parse_bool(" TRUE "), Some(true));
        assert_eq!(parse_bool("нет"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
