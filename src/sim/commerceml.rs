//! A 1C that writes CommerceML 2 documents files: sales, returns, voids and deliberately
//! broken documents, in the shape 1C's exchange writes them (`shared/specs/onec.md` A).
//!
//! Nobody publishes real files with sales and returns, so the connector is tested against
//! these. They are written from the format description, not from what the parser happens to
//! accept: children in schema order (`Время` after `Контрагенты`), `Валюта` as `руб`, unit
//! prices with four decimals, `Код="796 "` with 1C's trailing space, phones as a person types
//! them. Output streams to any `Write`, one document at a time, so a file of any size can be
//! made without holding it.

use std::io::{self, Write};

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::core::document::{DocKind, Document, Incoming, Line, SourceRef, VoidReason, content_version};
use crate::core::money::Money;
use crate::sim::sales::{Shop, Truth};

/// How the bytes of a file are encoded; the XML declaration always says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XmlEncoding {
    Utf8,
    /// UTF-8 preceded by a byte order mark, as 1C's own export writes it.
    Utf8Bom,
    /// What older 1C exchange setups and reference servers write.
    Windows1251,
}

/// What a written file looks like beyond its documents.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    pub encoding: XmlEncoding,
    /// `ВерсияСхемы`; 2.07 and later also get the `urn:1C.ru:commerceml_2` namespace.
    pub schema_version: String,
    /// `ДатаФормирования`, written as the shop's local time like 1C does.
    pub generated_at: DateTime<Utc>,
    /// The shop's zone: 1C writes every time naive and local.
    pub timezone: Tz,
    /// The requisite carrying the loyalty card number.
    pub card_requisite: String,
    /// The requisite carrying points paid with; written only when points were redeemed.
    pub points_requisite: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            encoding: XmlEncoding::Utf8,
            schema_version: "2.08".into(),
            generated_at: DateTime::<Utc>::from_timestamp(1_768_046_400, 0).unwrap_or_default(),
            timezone: chrono_tz::Europe::Moscow,
            card_requisite: "ДисконтнаяКарта".into(),
            points_requisite: "ОплаченоБаллами".into(),
        }
    }
}

/// The posting state a document is written with: how 1C tells a live document from one
/// that lost its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocState {
    Posted,
    Unposted,
    DeletionMarked,
    /// A site's `Отменен` = true.
    Cancelled,
}

impl DocState {
    fn of(reason: VoidReason) -> DocState {
        match reason {
            VoidReason::Unposted => DocState::Unposted,
            // A file cannot say "gone"; a deletion mark is the closest 1C writes.
            VoidReason::DeletionMarked | VoidReason::Deleted => DocState::DeletionMarked,
            VoidReason::Cancelled => DocState::Cancelled,
        }
    }
}

/// Ways a document is written wrong, each the kind of mistake real exchange files carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// `Количество` written as a word.
    QuantityNotANumber,
    /// `Валюта` nobody knows.
    UnknownCurrency,
    /// No `Ид` at all.
    MissingId,
    /// `Дата` that is no date (30 February).
    BadDate,
    /// A line with a negative quantity and sum: readable, but no valid sale.
    NegativeQuantity,
    /// A document `Сумма` 1000 rubles off its lines: readable, but no valid sale.
    TotalMismatch,
}

impl Malformed {
    pub const ALL: [Malformed; 6] = [
        Malformed::QuantityNotANumber,
        Malformed::UnknownCurrency,
        Malformed::MissingId,
        Malformed::BadDate,
        Malformed::NegativeQuantity,
        Malformed::TotalMismatch,
    ];

    /// Whether a reader cannot even convert it (as opposed to converting it into a
    /// document that business validation refuses).
    pub fn unreadable(self) -> bool {
        !matches!(self, Malformed::NegativeQuantity | Malformed::TotalMismatch)
    }
}

/// Writes one CommerceML documents file. Call [`DocumentsWriter::finish`] to close the root
/// element; a writer dropped without it leaves a truncated file, which is also useful.
pub struct DocumentsWriter<W: Write> {
    out: W,
    opts: WriterOptions,
    buf: String,
}

impl<W: Write> DocumentsWriter<W> {
    /// Writes the XML declaration and opens `КоммерческаяИнформация`.
    pub fn new(out: W, opts: WriterOptions) -> io::Result<Self> {
        let mut w = DocumentsWriter {
            out,
            opts,
            buf: String::with_capacity(16 * 1024),
        };
        if w.opts.encoding == XmlEncoding::Utf8Bom {
            w.out.write_all(b"\xEF\xBB\xBF")?;
        }
        let label = match w.opts.encoding {
            XmlEncoding::Utf8 | XmlEncoding::Utf8Bom => "UTF-8",
            XmlEncoding::Windows1251 => "windows-1251",
        };
        let ns = if namespaced(&w.opts.schema_version) {
            " xmlns=\"urn:1C.ru:commerceml_2\" xmlns:xs=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\""
        } else {
            ""
        };
        let generated = w.opts.generated_at.with_timezone(&w.opts.timezone);
        w.buf.push_str(&format!(
            "<?xml version=\"1.0\" encoding=\"{label}\"?>\n<КоммерческаяИнформация{ns} ВерсияСхемы=\""
        ));
        let version = w.opts.schema_version.clone();
        escape_into(&mut w.buf, &version);
        w.buf.push_str(&format!(
            "\" ДатаФормирования=\"{}\">\n",
            generated.format("%Y-%m-%dT%H:%M:%S")
        ));
        w.flush_buf()?;
        Ok(w)
    }

    /// A posted sale or return.
    pub fn document(&mut self, doc: &Document) -> io::Result<()> {
        self.document_with_state(doc, DocState::Posted)
    }

    /// A whole document with its posting state, as 1C sends a document again after a
    /// cashier unposts or marks it.
    pub fn document_with_state(&mut self, doc: &Document, state: DocState) -> io::Result<()> {
        self.write_document(doc, state, None)
    }

    /// A sale or return as is, or a void as 1C's short reply: `Ид`, date, operation and the
    /// requisites that say the document lost its effect, nothing else.
    pub fn incoming(&mut self, item: &Incoming) -> io::Result<()> {
        match item {
            Incoming::Document(d) => self.document(d),
            Incoming::Void { source, reason } => self.void_reply(source, *reason),
        }
    }

    /// `doc` written with the mistake `kind`.
    pub fn malformed(&mut self, doc: &Document, kind: Malformed) -> io::Result<()> {
        self.write_document(doc, DocState::Posted, Some(kind))
    }

    /// Closes the root element and hands back the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.buf.push_str("</КоммерческаяИнформация>\n");
        self.flush_buf()?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        match self.opts.encoding {
            XmlEncoding::Utf8 | XmlEncoding::Utf8Bom => self.out.write_all(self.buf.as_bytes())?,
            XmlEncoding::Windows1251 => {
                // Characters windows-1251 lacks become numeric character references, which
                // XML reads back as the same characters.
                let (bytes, _, _) = encoding_rs::WINDOWS_1251.encode(&self.buf);
                self.out.write_all(&bytes)?;
            }
        }
        self.buf.clear();
        Ok(())
    }

    fn void_reply(&mut self, source: &SourceRef, reason: VoidReason) -> io::Result<()> {
        let local = self.opts.generated_at.with_timezone(&self.opts.timezone);
        let b = &mut self.buf;
        b.push_str("\t<Документ>\n");
        leaf(b, 2, "Ид", &source.doc_id);
        leaf(b, 2, "Дата", &local.format("%Y-%m-%d").to_string());
        leaf(b, 2, "Время", &local.format("%H:%M:%S").to_string());
        leaf(b, 2, "ХозОперация", "Отпуск товара");
        leaf(b, 2, "Роль", "Продавец");
        b.push_str("\t\t<ЗначенияРеквизитов>\n");
        for (name, value) in state_requisites(DocState::of(reason)) {
            requisite(b, 3, name, value);
        }
        b.push_str("\t\t</ЗначенияРеквизитов>\n\t</Документ>\n");
        self.flush_buf()
    }

    fn write_document(&mut self, doc: &Document, state: DocState, bad: Option<Malformed>) -> io::Result<()> {
        let local = doc.occurred_at.with_timezone(&self.opts.timezone);
        let card_requisite = self.opts.card_requisite.clone();
        let points_requisite = self.opts.points_requisite.clone();
        let b = &mut self.buf;
        b.push_str("\t<Документ>\n");
        if bad != Some(Malformed::MissingId) {
            leaf(b, 2, "Ид", &doc.source.doc_id);
        }
        if let Some(n) = &doc.number {
            leaf(b, 2, "Номер", n);
        }
        let date = match bad {
            Some(Malformed::BadDate) => format!("{}-02-30", local.format("%Y")),
            _ => local.format("%Y-%m-%d").to_string(),
        };
        leaf(b, 2, "Дата", &date);
        let operation = match doc.kind {
            DocKind::Sale => "Отпуск товара",
            DocKind::Return => "Возврат товара",
        };
        leaf(b, 2, "ХозОперация", operation);
        leaf(b, 2, "Роль", "Продавец");
        let currency = match bad {
            Some(Malformed::UnknownCurrency) => "тугрик".to_string(),
            _ if doc.currency == "RUB" => "руб".to_string(),
            _ => doc.currency.clone(),
        };
        leaf(b, 2, "Валюта", &currency);
        leaf(b, 2, "Курс", "1");
        let total = match bad {
            Some(Malformed::TotalMismatch) => Money(doc.total.0 + 100_000),
            Some(Malformed::NegativeQuantity) => {
                let first = doc.lines.first().map_or(0, |l| l.net.0);
                Money(doc.total.0 - 2 * first)
            }
            _ => doc.total,
        };
        leaf(b, 2, "Сумма", &total.to_string());
        let c = &doc.customer;
        let has_party = c.onec_id.is_some() || c.name.is_some() || c.phone.is_some() || c.email.is_some();
        if has_party {
            b.push_str("\t\t<Контрагенты>\n\t\t\t<Контрагент>\n");
            if let Some(id) = &c.onec_id {
                leaf(b, 4, "Ид", id);
            }
            if let Some(name) = &c.name {
                leaf(b, 4, "Наименование", name);
                leaf(b, 4, "ПолноеНаименование", name);
            }
            leaf(b, 4, "Роль", "Покупатель");
            if c.phone.is_some() || c.email.is_some() {
                b.push_str("\t\t\t\t<Контакты>\n");
                if let Some(p) = &c.phone {
                    contact(b, "Телефон мобильный", &typed_phone(p.as_str()));
                }
                if let Some(e) = &c.email {
                    contact(b, "Почта", e.as_str());
                }
                b.push_str("\t\t\t\t</Контакты>\n");
            }
            b.push_str("\t\t\t</Контрагент>\n\t\t</Контрагенты>\n");
        }
        leaf(b, 2, "Время", &local.format("%H:%M:%S").to_string());
        b.push_str("\t\t<Товары>\n");
        for (i, line) in doc.lines.iter().enumerate() {
            let line_bad = if i == 0 { bad } else { None };
            write_line(b, line, line_bad);
        }
        b.push_str("\t\t</Товары>\n");
        b.push_str("\t\t<ЗначенияРеквизитов>\n");
        for (name, value) in state_requisites(state) {
            requisite(b, 3, name, value);
        }
        if let Some(card) = &c.card {
            requisite(b, 3, &card_requisite, card);
        }
        if doc.points_redeemed.0 != 0 {
            requisite(b, 3, &points_requisite, &doc.points_redeemed.0.to_string());
        }
        b.push_str("\t\t</ЗначенияРеквизитов>\n");
        if doc.kind == DocKind::Return
            && let Some(original) = &doc.original
        {
            leaf(b, 2, "Основание", original);
        }
        b.push_str("\t</Документ>\n");
        self.flush_buf()
    }
}

fn namespaced(version: &str) -> bool {
    let mut parts = version.split('.');
    let major: u32 = parts.next().and_then(|p| p.trim().parse().ok()).unwrap_or(2);
    let minor: u32 = parts.next().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
    major > 2 || minor >= 7
}

fn state_requisites(state: DocState) -> Vec<(&'static str, &'static str)> {
    match state {
        DocState::Posted => vec![("Проведен", "true"), ("ПометкаУдаления", "false")],
        DocState::Unposted => vec![("Проведен", "false"), ("ПометкаУдаления", "false")],
        DocState::DeletionMarked => vec![("Проведен", "false"), ("ПометкаУдаления", "true")],
        DocState::Cancelled => vec![("Отменен", "true")],
    }
}

fn write_line(b: &mut String, line: &Line, bad: Option<Malformed>) {
    b.push_str("\t\t\t<Товар>\n");
    leaf(b, 4, "Ид", &line.product_id);
    leaf(b, 4, "Наименование", &line.name);
    b.push_str(
        "\t\t\t\t<БазоваяЕдиница Код=\"796 \" НаименованиеПолное=\"Штука\" \
         МеждународноеСокращение=\"PCE\">шт</БазоваяЕдиница>\n",
    );
    // 1C writes unit prices with four decimals (`231.7400`).
    leaf(b, 4, "ЦенаЗаЕдиницу", &format!("{}00", line.unit_price));
    let (quantity, sum) = match bad {
        Some(Malformed::QuantityNotANumber) => ("два".to_string(), line.net.to_string()),
        Some(Malformed::NegativeQuantity) => (
            format!("-{}", three_decimals(line.quantity)),
            Money(-line.net.0).to_string(),
        ),
        _ => (three_decimals(line.quantity), line.net.to_string()),
    };
    leaf(b, 4, "Количество", &quantity);
    leaf(b, 4, "Сумма", &sum);
    if line.discount.0 != 0 {
        b.push_str("\t\t\t\t<Скидки>\n\t\t\t\t\t<Скидка>\n");
        leaf(b, 6, "Наименование", "Скидка");
        leaf(b, 6, "Сумма", &line.discount.to_string());
        leaf(b, 6, "УчтеноВСумме", "true");
        b.push_str("\t\t\t\t\t</Скидка>\n\t\t\t\t</Скидки>\n");
    }
    let kind = if line.service {
        "Услуга"
    } else {
        "Товар"
    };
    b.push_str("\t\t\t\t<ЗначенияРеквизитов>\n");
    requisite(b, 5, "ВидНоменклатуры", kind);
    requisite(b, 5, "ТипНоменклатуры", kind);
    b.push_str("\t\t\t\t</ЗначенияРеквизитов>\n");
    b.push_str("\t\t\t</Товар>\n");
}

fn three_decimals(q: Decimal) -> String {
    let mut q = q;
    if q.scale() < 3 {
        q.rescale(3);
    }
    q.to_string()
}

/// `+79123456789` as a cashier types it: `8 (912) 345-67-89`.
fn typed_phone(e164: &str) -> String {
    match e164.strip_prefix("+7") {
        Some(rest) if rest.len() == 10 && rest.is_ascii() => format!(
            "8 ({}) {}-{}-{}",
            &rest[..3],
            &rest[3..6],
            &rest[6..8],
            &rest[8..]
        ),
        _ => e164.to_string(),
    }
}

fn indent(b: &mut String, depth: usize) {
    for _ in 0..depth {
        b.push('\t');
    }
}

fn leaf(b: &mut String, depth: usize, name: &str, text: &str) {
    indent(b, depth);
    b.push('<');
    b.push_str(name);
    b.push('>');
    escape_into(b, text);
    b.push_str("</");
    b.push_str(name);
    b.push_str(">\n");
}

fn requisite(b: &mut String, depth: usize, name: &str, value: &str) {
    indent(b, depth);
    b.push_str("<ЗначениеРеквизита>\n");
    leaf(b, depth + 1, "Наименование", name);
    leaf(b, depth + 1, "Значение", value);
    indent(b, depth);
    b.push_str("</ЗначениеРеквизита>\n");
}

fn contact(b: &mut String, kind: &str, value: &str) {
    b.push_str("\t\t\t\t\t<Контакт>\n");
    leaf(b, 6, "Тип", kind);
    leaf(b, 6, "Значение", value);
    b.push_str("\t\t\t\t\t</Контакт>\n");
}

fn escape_into(b: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => b.push_str("&amp;"),
            '<' => b.push_str("&lt;"),
            '>' => b.push_str("&gt;"),
            '"' => b.push_str("&quot;"),
            _ => b.push(c),
        }
    }
}

/// What a generated file holds, besides the counts in [`Truth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerateSpec {
    pub seed: u64,
    pub sales: usize,
    pub returns: usize,
    pub malformed: usize,
    /// Goods lines per sale (a delivery line is added to some sales on top).
    pub lines: usize,
}

/// One generated entry, in file order.
#[derive(Clone, Debug, PartialEq)]
pub enum Generated {
    /// A posted sale or return, exactly as written.
    Document(Document),
    /// A document written with a mistake.
    Malformed(Document, Malformed),
}

/// A seeded stream of sales, returns of earlier sales and malformed documents, interleaved
/// the way a day's export mixes them. Holds only a bounded pool of recent sales to return,
/// so any number of documents costs the same memory.
pub struct Generator<'a> {
    shop: &'a Shop,
    spec: GenerateSpec,
    rng: fastrand::Rng,
    left_sales: usize,
    left_returns: usize,
    left_malformed: usize,
    n: usize,
    returns_made: usize,
    recent: std::collections::VecDeque<Document>,
}

/// Sales kept as candidates for returns.
const RECENT_SALES_POOL: usize = 512;

impl<'a> Generator<'a> {
    pub fn new(shop: &'a Shop, spec: GenerateSpec) -> Generator<'a> {
        Generator {
            shop,
            spec,
            rng: fastrand::Rng::with_seed(spec.seed),
            left_sales: spec.sales,
            left_returns: spec.returns,
            left_malformed: spec.malformed,
            n: 0,
            returns_made: 0,
            recent: std::collections::VecDeque::with_capacity(RECENT_SALES_POOL),
        }
    }

    fn sale(&mut self) -> Document {
        let shop = self.shop;
        let customer = (self.rng.u8(0..10) != 0 && !shop.customers.is_empty())
            .then(|| self.rng.usize(0..shop.customers.len()));
        let redeem = if customer.is_some() && self.rng.u8(0..6) == 0 {
            self.rng.i64(1..50)
        } else {
            0
        };
        let lines = self.rng.usize(1..=self.spec.lines.max(1));
        let mut d = shop.sale(&mut self.rng, self.n, lines, customer, redeem);
        if let Some(c) = customer {
            d.customer.onec_id = Some(format!("CP-{c:05}"));
        }
        if self.n % 7 == 3
            && let Some(delivery) = shop.products.iter().find(|p| p.service)
        {
            d.lines.push(Line {
                product_id: delivery.id.clone(),
                name: delivery.name.clone(),
                category: Some(delivery.category.clone()),
                category_parents: Vec::new(),
                quantity: Decimal::ONE,
                unit_price: delivery.price,
                discount: Money::ZERO,
                net: delivery.price,
                unit_cost: Some(delivery.cost),
                service: true,
            });
            d.total = Money(d.total.0 + delivery.price.0);
        }
        d.occurred_at = shop.start + Duration::seconds(self.n as i64 * 97);
        d.source.version = content_version(&d);
        d
    }
}

impl Iterator for Generator<'_> {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        let left = self.left_sales + self.left_returns + self.left_malformed;
        if left == 0 {
            return None;
        }
        self.n += 1;
        let pick = self.rng.usize(0..left);
        let can_return = !self.recent.is_empty() || self.left_sales == 0;
        if pick < self.left_returns && can_return {
            self.left_returns -= 1;
            self.returns_made += 1;
            let i = self.rng.usize(0..self.recent.len().max(1));
            let sale = match self.recent.remove(i) {
                Some(s) => s,
                // No sale to return: a return of a sale this file never saw.
                None => self.sale(),
            };
            let lines = self.rng.usize(1..=sale.lines.len().max(1));
            let mut r = self.shop.return_of(&sale, self.n, lines, 1);
            r.occurred_at = sale.occurred_at + Duration::hours(30);
            if self.returns_made.is_multiple_of(4) {
                // connectors name the base document by its number as often as by its id
                r.original = sale.number.clone();
            }
            r.source.version = content_version(&r);
            return Some(Generated::Document(r));
        }
        if pick >= left - self.left_malformed {
            self.left_malformed -= 1;
            let mut d = self.sale();
            d.source.doc_id = format!("M{:08}", self.n);
            d.source.version = content_version(&d);
            let kind = Malformed::ALL[self.left_malformed % Malformed::ALL.len()];
            return Some(Generated::Malformed(d, kind));
        }
        // A return picked before any sale exists falls through to here: a sale comes first.
        self.left_sales = self.left_sales.saturating_sub(1);
        let d = self.sale();
        if self.recent.len() >= RECENT_SALES_POOL {
            self.recent.pop_front();
        }
        self.recent.push_back(d.clone());
        Some(Generated::Document(d))
    }
}

/// Adds one generated entry to what a reader must find.
pub fn account(truth: &mut Truth, entry: &Generated) {
    match entry {
        Generated::Document(d) if d.kind == DocKind::Sale => {
            truth.sales += 1;
            truth.net_total += d.total.0;
        }
        Generated::Document(d) => {
            truth.returns += 1;
            truth.net_total -= d.total.0;
        }
        Generated::Malformed(..) => truth.malformed += 1,
    }
}

/// Writes a documents file of `spec.sales` sales, `spec.returns` returns and
/// `spec.malformed` malformed documents from `shop` to `out`, and returns what a reader must
/// find: the counts and the net total (sales minus returns) in kopecks.
pub fn generate<W: Write>(
    shop: &Shop,
    spec: GenerateSpec,
    opts: WriterOptions,
    out: W,
) -> io::Result<(Truth, W)> {
    let mut writer = DocumentsWriter::new(out, opts)?;
    let mut truth = Truth::default();
    for entry in Generator::new(shop, spec) {
        account(&mut truth, &entry);
        match &entry {
            Generated::Document(d) => writer.document(d)?,
            Generated::Malformed(d, kind) => writer.malformed(d, *kind)?,
        }
    }
    Ok((truth, writer.finish()?))
}
