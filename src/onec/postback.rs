//! Bonus documents and accounting postings written as CommerceML for 1C's site exchange
//! (`type=sale&mode=query`), **only** when `[accounting] postback = "commerceml"`.
//!
//! A stock 1C does not take them: its order load accepts «Заказ товара» alone and aborts at
//! the first other `ХозОперация` (UT `ОбменССайтом:4205-4217`,
//! `../shared/specs/onec-stock-channels.md` §2), and `ОбменССайтомПереопределяемый` has no hook
//! for foreign documents. The setting is for a base with a configuration extension that
//! intercepts `ОбменССайтом.СоздатьОбновитьЗаказы` (README, «CommerceML postback»): it picks
//! the documents whose `ХозОперация` is «Прочие» and whose requisite `ВидДокумента` is
//! `НачислениеИСписаниеБонусныхБаллов` or `ОперацияБух` out of the reply before the stock
//! code sees it. By default bonus documents and postings go to 1C over OData.
//!
//! What is written validates against the official CommerceML 2.10 schema
//! (`../shared/specs/commerceml-xsd/`). The `Ид` is stable for an outbox row (UUIDv5 of its
//! key, which carries the ledger's own id): 1C sees a repeat of a document it already took,
//! never a second document.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::config::{Config, ONEC_ACCOUNTING, ONEC_BONUS};
use crate::core::money::Money;
use crate::ledger::OutboxRow;

/// Namespace of the document ids kopilka gives 1C.
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b6f_7069_6c6b_6140_b0a5_1c0d_0c0e_0001);

/// The 1C id (`Ref_Key` / `Ид`) of the document an outbox row becomes.
pub fn document_id(row: &OutboxRow) -> uuid::Uuid {
    uuid::Uuid::new_v5(&ID_NAMESPACE, row.idem_key.as_bytes())
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn requisite(out: &mut String, name: &str, value: &str) {
    let _ = write!(
        out,
        "<ЗначениеРеквизита><Наименование>{}</Наименование><Значение>{}</Значение></ЗначениеРеквизита>",
        esc(name),
        esc(value)
    );
}

fn operation(kind: &str, points: i64) -> &'static str {
    match (kind, points >= 0) {
        ("expiry", _) => "Сгорание",
        ("reversal", _) => "Сторно",
        ("adjustment", _) => "Корректировка",
        ("opening", _) => "НачальныйОстаток",
        ("writeoff", _) => "СписаниеДолга",
        (_, true) => "Начисление",
        (_, false) => "Списание",
    }
}

/// The document's head in the schema's order (`Ид` … `Сумма`, `Контрагенты`, `Время`,
/// `Комментарий`); `party` is the one `Контрагент` (id, name, role) the schema requires.
fn header(
    out: &mut String,
    row: &OutboxRow,
    at: DateTime<Utc>,
    tz: Tz,
    amount: Money,
    party: (&str, &str, &str),
    comment: &str,
) {
    let local = at.with_timezone(&tz);
    let _ = write!(
        out,
        "<Документ><Ид>{}</Ид><Номер>KP-{}</Номер><Дата>{}</Дата>\
         <ХозОперация>Прочие</ХозОперация><Роль>Продавец</Роль><Валюта>руб</Валюта><Курс>1</Курс>\
         <Сумма>{}</Сумма><Контрагенты><Контрагент><Ид>{}</Ид><Наименование>{}</Наименование>\
         <ПолноеНаименование>{}</ПолноеНаименование><Роль>{}</Роль></Контрагент></Контрагенты><Время>{}</Время><Комментарий>{}</Комментарий>",
        document_id(row),
        row.id,
        local.format("%Y-%m-%d"),
        amount,
        esc(party.0),
        esc(party.1),
        esc(party.1),
        party.2,
        local.format("%H:%M:%S"),
        esc(&format!("kopilka:{} {comment}", row.idem_key))
    );
}

/// One outbox row as a `Документ`, or `None` for a row of another destination.
fn document(row: &OutboxRow, cfg: &Config) -> Option<String> {
    let p: serde_json::Value = serde_json::from_str(&row.payload).ok()?;
    let tz = cfg.timezone;
    let mut out = String::with_capacity(1024);
    if row.destination == ONEC_BONUS {
        let points = p["points"].as_i64().unwrap_or(0);
        let kind = p["kind"].as_str().unwrap_or("");
        let at = p["at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(row.created_at, |t| t.with_timezone(&Utc));
        let amount = Money(p["amount_kopecks"].as_i64().unwrap_or(0));
        let card = p["card"].as_str();
        let holder = p["onec_id"].as_str().or(card).map_or_else(
            || format!("kopilka:customer:{}", p["customer_id"]),
            str::to_string,
        );
        let name = card.map_or_else(|| "Покупатель".to_string(), |c| format!("Карта {c}"));
        header(
            &mut out,
            row,
            at,
            tz,
            amount,
            (&holder, &name, "Покупатель"),
            p["comment"].as_str().unwrap_or(""),
        );
        out.push_str("<ЗначенияРеквизитов>");
        requisite(&mut out, "ВидДокумента", "НачислениеИСписаниеБонусныхБаллов");
        requisite(&mut out, "Операция", operation(kind, points));
        requisite(&mut out, "Баллы", &points.to_string());
        if let Some(card) = p["card"].as_str() {
            requisite(&mut out, "ДисконтнаяКарта", card);
        }
        if let Some(exp) = p["expires_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        {
            requisite(
                &mut out,
                "ДатаСгорания",
                &exp.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S").to_string(),
            );
        }
        let doc = &p["document"];
        if let (Some(source), Some(id)) = (doc["source"].as_str(), doc["doc_id"].as_str()) {
            let number = doc["number"]
                .as_str()
                .map(|n| format!(" №{n}"))
                .unwrap_or_default();
            requisite(&mut out, "ДокументОснование", &format!("{source}:{id}{number}"));
        }
        out.push_str("</ЗначенияРеквизитов></Документ>");
    } else if row.destination == ONEC_ACCOUNTING {
        let day = p["day"].as_str().unwrap_or("");
        let at = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(23, 59, 59))
            .and_then(|d| d.and_local_timezone(tz).earliest())
            .map_or(row.created_at, |t| t.with_timezone(&Utc));
        let pv = p["point_value_kopecks"].as_i64().unwrap_or(100);
        let points = p["points"].as_object()?;
        let total: i64 = points.values().filter_map(|v| v.as_i64()).map(|v| v * pv).sum();
        let what = match (p["kind"].as_str(), p["adjusting"].as_bool().unwrap_or(false)) {
            (Some("history"), false) => format!(
                "бонусные баллы: остаток за {}–{day}",
                p["first_day"].as_str().unwrap_or("")
            ),
            (Some("history"), true) => format!(
                "бонусные баллы: корректировка за {}–{day}",
                p["first_day"].as_str().unwrap_or("")
            ),
            (Some("settlement"), adjusting) => format!(
                "бонусные баллы: {}расчёты с партнёром {} за {}–{day}",
                if adjusting {
                    "корректировка, "
                } else {
                    ""
                },
                p["partner"].as_str().unwrap_or(""),
                p["first_day"].as_str().unwrap_or("")
            ),
            (_, true) => format!("бонусные баллы корректировка {day}"),
            (_, false) => format!("бонусные баллы за день {day}"),
        };
        let entity = p["entity"].as_str().unwrap_or("");
        header(
            &mut out,
            row,
            at,
            tz,
            Money(total),
            (entity, entity, "Получатель"),
            &what,
        );
        out.push_str("<ЗначенияРеквизитов>");
        requisite(&mut out, "ВидДокумента", "ОперацияБух");
        requisite(&mut out, "Организация", p["entity"].as_str().unwrap_or(""));
        for (movement, v) in points {
            let (dt, kt) = cfg.accounting.accounts.get(movement).cloned().unwrap_or_default();
            let amount = Money(v.as_i64().unwrap_or(0) * pv);
            requisite(
                &mut out,
                &format!("Проводка {movement}"),
                &format!("Дт {dt} Кт {kt} {amount}"),
            );
        }
        out.push_str("</ЗначенияРеквизитов></Документ>");
    } else {
        return None;
    }
    Some(out)
}

/// A documents file of the rows, in the encoding 1C asked for.
pub fn documents_file(rows: &[OutboxRow], cfg: &Config, now: DateTime<Utc>, windows_1251: bool) -> Vec<u8> {
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"{}\"?>\n<КоммерческаяИнформация xmlns=\"urn:1C.ru:commerceml_2\" ВерсияСхемы=\"2.10\" ДатаФормирования=\"{}\">\n",
        if windows_1251 { "windows-1251" } else { "UTF-8" },
        now.with_timezone(&cfg.timezone).format("%Y-%m-%dT%H:%M:%S")
    );
    for row in rows {
        if let Some(d) = document(row, cfg) {
            xml.push_str(&d);
            xml.push('\n');
        }
    }
    xml.push_str("</КоммерческаяИнформация>\n");
    if windows_1251 {
        encoding_rs::WINDOWS_1251.encode(&xml).0.into_owned()
    } else {
        xml.into_bytes()
    }
}
