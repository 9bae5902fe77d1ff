//! `kopilka check --probe`: the mapping against the base's own `$metadata`.
//!
//! 1C answers 404 for a set not added to the OData content and silently ignores unknown
//! property names in places, so a wrong name in a mapping shows up late and quietly. The
//! probe reads `$metadata` (EDMX, XML only) once and names every mapped set, field, tabular
//! section and row field the base does not publish, with the mapping key that needs it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

use super::{OdataClient, OdataError, RetryPolicy};
use crate::config::Config;
use crate::onec::mapping::{self, Mapping};

/// Entity sets and the properties of every entity and complex type, by local name.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    /// Entity set → its entity type's local name.
    pub sets: HashMap<String, String>,
    /// Type → property name → property type (`Edm.Double`, `Collection(StandardODATA.X_RowType)`).
    pub types: HashMap<String, HashMap<String, String>>,
}

/// One name the base does not publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// `entity set Document_ЧекККМВозврат`, `field Document_ЧекККМ.КартаЛояльности_Key`, …
    pub what: String,
    /// The mapping key that names it.
    pub needed_by: String,
}

/// What the probe found.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub url: String,
    pub mapping: String,
    /// Entity sets the base publishes.
    pub sets_published: usize,
    /// Names checked.
    pub checked: usize,
    pub missing: Vec<Missing>,
    /// The built-in mappings whose every name the base publishes (reading and, with an
    /// OData postback, writing): the editions the base looks like.
    pub looks_like: Vec<String>,
}

impl ProbeReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "odata probe: {}/$metadata publishes {} entity sets; {} names of mapping {} checked",
            self.url, self.sets_published, self.checked, self.mapping
        )?;
        if self.missing.is_empty() {
            return writeln!(f, "  every mapped set and field is published");
        }
        writeln!(f, "  {} mapped name(s) missing in this base:", self.missing.len())?;
        for m in &self.missing {
            writeln!(f, "  missing {} (needed by {})", m.what, m.needed_by)?;
        }
        if self.looks_like.is_empty() {
            writeln!(f, "  the base matches none of the built-in mappings whole")?;
        } else {
            writeln!(
                f,
                "  the base looks like: {} (every name of the built-in mapping published)",
                self.looks_like.join(", ")
            )?;
        }
        writeln!(
            f,
            "  publish them (УстановитьСоставСтандартногоИнтерфейсаOData) or correct the mapping"
        )
    }
}

fn local(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    match s.rsplit_once(':') {
        Some((_, l)) => l.to_string(),
        None => s.into_owned(),
    }
}

fn attrs(e: &BytesStart<'_>, decoder: quick_xml::encoding::Decoder) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for attr in e.attributes().with_checks(false).flatten() {
        let key = local(attr.key.local_name().as_ref());
        if let Ok(v) = attr.decode_and_unescape_value(decoder) {
            out.insert(key, v.into_owned());
        }
    }
    out
}

/// The part after the namespace: `StandardODATA.Document_ЧекККМ` → `Document_ЧекККМ`.
fn unqualified(t: &str) -> &str {
    let inner = t
        .strip_prefix("Collection(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(t);
    inner.rsplit_once('.').map_or(inner, |(_, n)| n)
}

/// Reads an EDMX `$metadata` document.
pub fn parse_metadata(xml: &str) -> Result<Schema, String> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut schema = Schema::default();
    let mut current: Option<String> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("$metadata is not XML at byte {}: {e}", reader.error_position()))?;
        let (e, empty) = match event {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(e) => {
                let name = local(e.local_name().as_ref());
                if name == "EntityType" || name == "ComplexType" {
                    current = None;
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = local(e.local_name().as_ref());
        let a = attrs(&e, reader.decoder());
        match name.as_str() {
            "EntityType" | "ComplexType" => {
                if let Some(n) = a.get("Name") {
                    schema.types.entry(n.clone()).or_default();
                    // an empty element has no end event: nothing belongs to it
                    current = (!empty).then(|| n.clone());
                }
            }
            "Property" | "NavigationProperty" => {
                if let (Some(t), Some(n)) = (&current, a.get("Name")) {
                    let ty = a.get("Type").cloned().unwrap_or_default();
                    schema.types.entry(t.clone()).or_default().insert(n.clone(), ty);
                }
            }
            "EntitySet" => {
                if let Some(n) = a.get("Name") {
                    let ty = a.get("EntityType").map(|t| unqualified(t).to_string());
                    schema.sets.insert(n.clone(), ty.unwrap_or_else(|| n.clone()));
                }
            }
            _ => {}
        }
    }
    if schema.sets.is_empty() && schema.types.is_empty() {
        return Err("$metadata lists no entity sets or types".into());
    }
    Ok(schema)
}

struct Checker<'a> {
    schema: &'a Schema,
    checked: usize,
    missing: Vec<Missing>,
}

impl Checker<'_> {
    fn miss(&mut self, what: String, needed_by: &str) {
        self.missing.push(Missing {
            what,
            needed_by: needed_by.to_string(),
        });
    }

    /// The properties of a set's type, or `None` (reported) when the set is not published.
    fn set(&mut self, set: &str, needed_by: &str) -> Option<&HashMap<String, String>> {
        self.checked += 1;
        let ty = self.schema.sets.get(set);
        match ty.and_then(|t| self.schema.types.get(t)) {
            Some(props) => Some(props),
            None => {
                self.miss(format!("entity set {set}"), needed_by);
                None
            }
        }
    }

    fn fields(&mut self, set: &str, props: &HashMap<String, String>, fields: &[(&str, String)]) {
        for (field, key) in fields {
            self.checked += 1;
            if !props.contains_key(*field) {
                self.missing.push(Missing {
                    what: format!("field {set}.{field}"),
                    needed_by: key.clone(),
                });
            }
        }
    }

    /// The row type of a tabular section: the type of its collection property, or the set of
    /// its own (`Document_X_Товары`).
    fn section(
        &self,
        set: &str,
        props: &HashMap<String, String>,
        rows: &str,
    ) -> Option<&HashMap<String, String>> {
        let by_property = props
            .get(rows)
            .filter(|t| t.starts_with("Collection("))
            .and_then(|t| self.schema.types.get(unqualified(t)));
        by_property
            .or_else(|| self.schema.types.get(&format!("{set}_{rows}_RowType")))
            .or_else(|| {
                let own = format!("{set}_{rows}");
                self.schema.sets.get(&own).and_then(|t| self.schema.types.get(t))
            })
    }
}

/// Names every mapped set and field that `schema` does not publish.
pub fn check(mapping: &Mapping, schema: &Schema) -> (usize, Vec<Missing>) {
    let mut c = Checker {
        schema,
        checked: 0,
        missing: Vec::new(),
    };
    for (i, d) in mapping.documents.iter().enumerate() {
        let key = |f: &str| format!("documents[{i}].{f}");
        let Some(props) = c.set(&d.set, &key("set")).cloned() else {
            continue;
        };
        let mut fields: Vec<(&str, String)> = [
            "Ref_Key",
            "DataVersion",
            "Number",
            "Date",
            "Posted",
            "DeletionMark",
        ]
        .iter()
        .map(|f| (*f, format!("the standard fields of {}", d.set)))
        .collect();
        let types = d.type_fields();
        for (f, k) in [
            (&d.total, "total"),
            (&d.store, "store"),
            (&d.card, "card"),
            (&d.customer, "customer"),
            (&d.operation, "operation"),
            (&d.return_link, "return_link"),
        ] {
            if let Some(f) = f {
                fields.push((f.as_str(), key(k)));
                if let Some(t) = types.iter().find(|t| **t == mapping::type_field(f)) {
                    fields.push((t.as_str(), key(&format!("{k} (a composite reference)"))));
                }
            }
        }
        c.fields(&d.set, &props, &fields);
        c.checked += 1;
        let Some(row_props) = c.section(&d.set, &props, &d.rows).cloned() else {
            c.miss(format!("tabular section {}.{}", d.set, d.rows), &key("rows"));
            continue;
        };
        let r = &d.row;
        let mut row_fields = vec![
            (r.product.as_str(), key("row.product")),
            (r.quantity.as_str(), key("row.quantity")),
            (r.price.as_str(), key("row.price")),
            (r.net.as_str(), key("row.net")),
        ];
        row_fields.extend(r.variant.as_deref().map(|v| (v, key("row.variant"))));
        row_fields.extend(r.points_paid.as_deref().map(|v| (v, key("row.points_paid"))));
        let link_type = r
            .return_link
            .as_deref()
            .filter(|f| mapping::is_composite(f))
            .map(mapping::type_field);
        row_fields.extend(r.return_link.as_deref().map(|v| (v, key("row.return_link"))));
        row_fields.extend(
            link_type
                .as_deref()
                .map(|v| (v, key("row.return_link (a composite reference)"))),
        );
        for (n, f) in r.discounts.iter().enumerate() {
            row_fields.push((f.as_str(), key(&format!("row.discounts[{n}]"))));
        }
        c.fields(&format!("{}.{}", d.set, d.rows), &row_props, &row_fields);
    }
    let p = &mapping.products;
    if let Some(props) = c.set(&p.set, "products.set").cloned() {
        let mut f: Vec<(&str, String)> = [
            "Ref_Key",
            "DataVersion",
            "DeletionMark",
            "Description",
            "Parent_Key",
            "IsFolder",
        ]
        .iter()
        .map(|s| (*s, "the standard fields of a hierarchical catalog".to_string()))
        .collect();
        f.extend(p.article.as_deref().map(|a| (a, "products.article".to_string())));
        f.extend(p.service.as_deref().map(|a| (a, "products.service".to_string())));
        c.fields(&p.set, &props, &f);
    }
    if let Some(pr) = &mapping.prices {
        if let Some(props) = c.set(&pr.set, "prices.set").cloned() {
            let mut f = vec![
                ("Period", "prices.set (a periodic register)".to_string()),
                (pr.product.as_str(), "prices.product".to_string()),
                (pr.price_type.as_str(), "prices.price_type".to_string()),
                (pr.price.as_str(), "prices.price".to_string()),
            ];
            f.extend(pr.variant.as_deref().map(|v| (v, "prices.variant".to_string())));
            c.fields(&pr.set, &props, &f);
        }
        if let Some(props) = c.set(&pr.price_types, "prices.price_types").cloned() {
            c.fields(
                &pr.price_types,
                &props,
                &[("Description", "prices.price_types".to_string())],
            );
        }
    }
    if let Some(cm) = &mapping.cards
        && let Some(props) = c.set(&cm.set, "cards.set").cloned()
    {
        let mut f: Vec<(&str, String)> = cm
            .number
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), format!("cards.number[{i}]")))
            .collect();
        let owner_type = cm
            .owner
            .as_deref()
            .filter(|o| mapping::is_composite(o))
            .map(mapping::type_field);
        f.extend(cm.owner.as_deref().map(|o| (o, "cards.owner".to_string())));
        f.extend(
            owner_type
                .as_deref()
                .map(|o| (o, "cards.owner (a composite reference)".to_string())),
        );
        c.fields(&cm.set, &props, &f);
    }
    if let Some(pm) = &mapping.people {
        for (i, set) in pm.sets().enumerate() {
            let set_key = if i == 0 {
                "people.set".to_string()
            } else {
                format!("people.also[{}]", i - 1)
            };
            let Some(props) = c.set(set, &set_key).cloned() else {
                continue;
            };
            c.fields(set, &props, &[(pm.name.as_str(), "people.name".to_string())]);
            if let Some(b) = pm.birth_date_of(set) {
                c.fields(set, &props, &[(b, "people.birth_date".to_string())]);
            }
            if let Some(section) = &pm.contacts {
                c.checked += 1;
                match c.section(set, &props, section).cloned() {
                    Some(rows) => c.fields(
                        &format!("{set}.{section}"),
                        &rows,
                        &[
                            (pm.contact_kind.as_str(), "people.contact_kind".to_string()),
                            (pm.contact_value.as_str(), "people.contact_value".to_string()),
                        ],
                    ),
                    None => c.miss(format!("tabular section {set}.{section}"), "people.contacts"),
                }
            }
            // the additional attributes, only when something is read or written through them
            if let Some(am) = mapping
                .attributes
                .as_ref()
                .filter(|a| a.reads() || a.tier.is_some())
            {
                c.checked += 1;
                match c.section(set, &props, &am.section).cloned() {
                    Some(rows) => {
                        let value_type = am.value_type();
                        c.fields(
                            &format!("{set}.{}", am.section),
                            &rows,
                            &[
                                (am.property.as_str(), "attributes.property".to_string()),
                                (am.value.as_str(), "attributes.value".to_string()),
                                (
                                    value_type.as_str(),
                                    "attributes.value (a composite value)".to_string(),
                                ),
                            ],
                        );
                    }
                    None => c.miss(
                        format!("tabular section {set}.{}", am.section),
                        "attributes.section",
                    ),
                }
            }
        }
    }
    if let Some(am) = mapping
        .attributes
        .as_ref()
        .filter(|a| a.reads() || a.tier.is_some())
        && let Some(props) = c.set(&am.properties, "attributes.properties").cloned()
    {
        let f: Vec<(&str, String)> = am
            .title_fields
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), format!("attributes.title_fields[{i}]")))
            .collect();
        c.fields(&am.properties, &props, &f);
    }
    if let Some(b) = &mapping.bonus {
        c.checked += 1;
        let record = format!("{}_RecordType", b.set);
        if !schema.sets.contains_key(&b.set) && !schema.sets.contains_key(&record) {
            c.miss(format!("entity set {}", b.set), "bonus.set");
        } else {
            // dimensions and resources live on the register's record (or row) type
            let mut props: HashMap<String, String> = HashMap::new();
            let candidates = [
                schema.sets.get(&b.set).cloned(),
                schema.sets.get(&record).cloned(),
                Some(record.clone()),
                Some(format!("{}_RowType", b.set)),
            ];
            let mut seen = HashSet::new();
            for t in candidates.into_iter().flatten() {
                if seen.insert(t.clone())
                    && let Some(p) = schema.types.get(&t)
                {
                    props.extend(p.clone());
                }
            }
            let mut f = vec![(b.holder.as_str(), "bonus.holder".to_string())];
            f.extend(b.program.as_deref().map(|p| (p, "bonus.program".to_string())));
            for (i, r) in b.add.iter().enumerate() {
                f.push((r.as_str(), format!("bonus.add[{i}]")));
            }
            for (i, r) in b.subtract.iter().enumerate() {
                f.push((r.as_str(), format!("bonus.subtract[{i}]")));
            }
            f.extend(b.burn.as_deref().map(|r| (r, "bonus.burn".to_string())));
            c.fields(&b.set, &props, &f);
            if b.burn.is_some() && !schema.sets.contains_key(&record) {
                c.miss(
                    format!("entity set {record}"),
                    "bonus.burn (the register's records)",
                );
            }
        }
        if let Some(programs) = &b.programs {
            c.set(programs, "bonus.programs");
        }
    }
    (c.checked, c.missing)
}

/// Names the documents kopilka writes (`[bonus_document]`, `[accounting_document]`) need
/// that `schema` does not publish: 1C silently ignores an unknown property in a POST.
pub fn check_writing(mapping: &Mapping, schema: &Schema) -> (usize, Vec<Missing>) {
    let mut c = Checker {
        schema,
        checked: 0,
        missing: Vec::new(),
    };
    let standard = [
        "Ref_Key",
        "DataVersion",
        "Number",
        "Date",
        "Posted",
        "DeletionMark",
    ];
    let document = |c: &mut Checker<'_>,
                    key: &str,
                    set: &str,
                    header: Vec<(&str, String)>,
                    sections: Vec<(&str, Vec<(&str, String)>)>| {
        let Some(props) = c.set(set, &format!("{key}.set")).cloned() else {
            return;
        };
        let mut fields: Vec<(&str, String)> = standard
            .iter()
            .map(|f| (*f, format!("the standard fields of {set}")))
            .collect();
        fields.extend(header);
        c.fields(set, &props, &fields);
        for (rows, mut row_fields) in sections {
            c.checked += 1;
            let Some(row_props) = c.section(set, &props, rows).cloned() else {
                c.miss(format!("tabular section {set}.{rows}"), &format!("{key} rows"));
                continue;
            };
            row_fields.insert(0, ("LineNumber", format!("the rows of {set}.{rows}")));
            c.fields(&format!("{set}.{rows}"), &row_props, &row_fields);
        }
    };
    if let Some(b) = &mapping.bonus_document {
        let k = |f: &str| format!("bonus_document.{f}");
        let mut header = vec![(b.comment.as_str(), k("comment"))];
        header.extend(b.program.as_deref().map(|p| (p, k("program"))));
        fn section<'m>(name: &str, r: &'m mapping::BonusRowsMap) -> Vec<(&'m str, String)> {
            let k = |f: &str| format!("bonus_document.{f}");
            let mut f = vec![
                (r.holder.as_str(), k(&format!("{name}.holder"))),
                (r.points.as_str(), k(&format!("{name}.points"))),
            ];
            for (v, n) in [
                (&r.accrued_on, "accrued_on"),
                (&r.expires_on, "expires_on"),
                (&r.burn_correction, "burn_correction"),
            ] {
                f.extend(v.as_deref().map(|v| (v, k(&format!("{name}.{n}")))));
            }
            f
        }
        let sections = vec![
            (b.accruals.rows.as_str(), section("accruals", &b.accruals)),
            (b.writeoffs.rows.as_str(), section("writeoffs", &b.writeoffs)),
        ];
        document(&mut c, "bonus_document", &b.set, header, sections);
        if let Some(programs) = &b.programs
            && let Some(props) = c.set(programs, &k("programs")).cloned()
        {
            c.fields(programs, &props, &[("Description", k("programs"))]);
        }
    }
    if let Some(a) = &mapping.accounting_document {
        let k = |f: &str| format!("accounting_document.{f}");
        let mut header = vec![(a.comment.as_str(), k("comment"))];
        for (v, n) in [
            (&a.organization, "organization"),
            (&a.amount, "amount"),
            (&a.content, "content"),
        ] {
            header.extend(v.as_deref().map(|v| (v, k(n))));
        }
        let mut rows = vec![
            (a.row.debit.as_str(), k("row.debit")),
            (a.row.credit.as_str(), k("row.credit")),
            (a.row.amount.as_str(), k("row.amount")),
        ];
        rows.extend(a.row.content.as_deref().map(|v| (v, k("row.content"))));
        document(
            &mut c,
            "accounting_document",
            &a.set,
            header,
            vec![(a.rows.as_str(), rows)],
        );
        for (set, field, key) in [
            (&a.organizations, "Description", "organizations"),
            (&a.accounts, "Code", "accounts"),
        ] {
            if let Some(set) = set
                && let Some(props) = c.set(set, &k(key)).cloned()
            {
                c.fields(set, &props, &[(field, k(key))]);
            }
        }
    }
    (c.checked, c.missing)
}

/// Reads `$metadata` and checks the configured mapping against it (and, with
/// `[accounting] postback = "odata"`, the documents kopilka writes).
pub async fn probe(cfg: &Config) -> Result<ProbeReport, OdataError> {
    let odata = cfg
        .onec
        .as_ref()
        .and_then(|o| o.odata.as_ref())
        .ok_or(OdataError::NotConfigured)?;
    let base = cfg.file.as_deref().and_then(std::path::Path::parent);
    let mapping = mapping::load(&odata.mapping, base)?;
    let client = OdataClient::new(odata, RetryPolicy::default())?;
    let xml = client.metadata().await?;
    let schema = parse_metadata(&xml).map_err(|e| OdataError::Request {
        entity: "$metadata".into(),
        url: client.readable_url("$metadata", &[]),
        failure: super::Failure::BadJson(e),
        class: super::ErrorClass::Permanent,
        attempts: 1,
    })?;
    let writing = cfg.accounting.postback == crate::config::Postback::Odata;
    let (mut checked, mut missing) = check_all(&mapping, &schema, writing);
    // the properties are data, not metadata: each title named must be in the chart
    if let Some(am) = mapping
        .attributes
        .as_ref()
        .filter(|a| a.reads() || a.tier.is_some())
        && schema.sets.contains_key(&am.properties)
    {
        let resolved = super::attributes::resolve(&client, am, odata.page_size.max(1) as usize).await?;
        checked += am.titles().len();
        for (key, title) in resolved.missing {
            missing.push(Missing {
                what: format!("additional attribute {title:?} in {}", am.properties),
                needed_by: key,
            });
        }
    }
    Ok(ProbeReport {
        url: client.base().to_string(),
        mapping: mapping.origin.clone(),
        sets_published: schema.sets.len(),
        checked,
        missing,
        looks_like: looks_like(&schema, writing),
    })
}

/// [`check`], and with `writing` [`check_writing`] too.
pub fn check_all(mapping: &Mapping, schema: &Schema, writing: bool) -> (usize, Vec<Missing>) {
    let (mut checked, mut missing) = check(mapping, schema);
    if writing {
        let (n, m) = check_writing(mapping, schema);
        checked += n;
        missing.extend(m);
    }
    (checked, missing)
}

/// The built-in mappings `schema` publishes every name of (the accounting document aside: it
/// lives in an accounting base or an extension), so an integrator sees which edition a base
/// is before choosing.
pub fn looks_like(schema: &Schema, writing: bool) -> Vec<String> {
    mapping::BUILT_IN
        .iter()
        .filter_map(|(name, _)| {
            let mut m = mapping::load(name, None).ok()?;
            m.accounting_document = None;
            let (_, missing) = check_all(&m, schema, writing);
            missing.is_empty().then(|| (*name).to_string())
        })
        .collect()
}

/// [`probe`] for synchronous callers (`kopilka check`).
pub fn probe_blocking(cfg: &Config) -> Result<ProbeReport, OdataError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OdataError::Client(e.to_string()))?;
    rt.block_on(probe(cfg))
}
