//! The program report as an HTML page with charts drawn as inline SVG (no script, no
//! external assets): `kopilka report --format html` and the daemon's `/report`.

use std::fmt::Write as _;

use chrono_tz::Tz;

use crate::core::offers::Segment;
use crate::ledger::ProgramReport;

/// Digits grouped by thousands with a narrow no-break space, as Russian documents print them.
pub(crate) fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 3 + 1);
    if n < 0 {
        out.push('−');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// Kopecks as roubles the way 1C prints them: `24 562 394,96`.
pub(crate) fn rub(kopecks: i64) -> String {
    let sign = if kopecks < 0 { "−" } else { "" };
    let abs = kopecks.unsigned_abs();
    format!("{sign}{},{:02}", group((abs / 100) as i64), abs % 100)
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Horizontal bars for labelled values; `show` formats the number printed after a bar.
fn bars(rows: &[(String, i64)], color: &str, show: fn(i64) -> String) -> String {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let h = 26.0 * rows.len() as f64 + 4.0;
    let mut svg = format!("<svg viewBox=\"0 0 600 {h}\" width=\"100%\" role=\"img\">");
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = 4.0 + 26.0 * i as f64;
        let w = *v as f64 / max * 300.0;
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{:.0}\" font-size=\"13\">{}</text>\
             <rect x=\"170\" y=\"{y:.0}\" width=\"{w:.1}\" height=\"18\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.0}\" font-size=\"13\">{}</text>",
            y + 14.0,
            esc(label),
            175.0 + w,
            y + 14.0,
            show(*v)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Two-part bar: a share of a whole.
fn share(part: i64, whole: i64, part_label: &str, rest_label: &str) -> String {
    let p = if whole > 0 {
        part as f64 / whole as f64
    } else {
        0.0
    };
    format!(
        "<svg viewBox=\"0 0 600 40\" width=\"100%\" role=\"img\">\
         <rect x=\"0\" y=\"0\" width=\"{:.1}\" height=\"24\" fill=\"#2e7d32\"/>\
         <rect x=\"{:.1}\" y=\"0\" width=\"{:.1}\" height=\"24\" fill=\"#bdbdbd\"/>\
         <text x=\"0\" y=\"38\" font-size=\"12\">{} {part} · {} {}</text></svg>",
        600.0 * p,
        600.0 * p,
        600.0 * (1.0 - p),
        esc(part_label),
        esc(rest_label),
        whole - part
    )
}

/// `nav` adds links to other periods; the daemon's `/report` reads them back as `?days=`.
pub fn render(r: &ProgramReport, tz: Tz, nav: bool) -> String {
    let m = rub;
    let mut h = String::with_capacity(16 << 10);
    let period = match r.from {
        Some(f) => format!(
            "{} — {}",
            f.with_timezone(&tz).date_naive(),
            r.to.with_timezone(&tz).date_naive()
        ),
        None => format!("по {}", r.to.with_timezone(&tz).date_naive()),
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=\"ru\"><head><meta charset=\"utf-8\"><title>kopilka — отчёт по программе</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1000px}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}}\
         .num{{text-align:right}}.cards{{display:flex;gap:1em;flex-wrap:wrap}}\
         .card{{border:1px solid #ddd;border-radius:8px;padding:.8em 1.2em;min-width:11em}}.card b{{font-size:1.4em;display:block}}</style>\
         </head><body><h1>Программа лояльности</h1><p>{}{}</p>",
        esc(&period),
        if nav {
            " · <a href=\"/report?days=30\">30 дней</a> · <a href=\"/report?days=90\">90 дней</a> · \
             <a href=\"/report?days=365\">год</a> · <a href=\"/report?days=all\">всё время</a> · <a href=\"/status\">статус</a>"
        } else {
            ""
        }
    );
    let _ = write!(
        h,
        "<div class=\"cards\">\
         <div class=\"card\">Участники<b>{}</b>активны за 90 дней: {}</div>\
         <div class=\"card\">Неактивны<b>{:.1}%</b>в исследованиях — 54%</div>\
         <div class=\"card\">Средний чек участника<b>{} ₽</b>без карты: {} ₽</div>\
         <div class=\"card\">Частота покупок<b>{:.2}</b>на покупателя за период</div>\
         <div class=\"card\">LTV<b>{} ₽</b></div>\
         <div class=\"card\">Обязательства по баллам<b>{} ₽</b>{} баллов</div>\
         <div class=\"card\">Стоимость программы<b>{} ₽</b>{:.1}% валовой маржи {} ₽</div>\
         <div class=\"card\">Ушли / вернулись<b>{} / {}</b></div></div>",
        group(r.members),
        group(r.active_members_90d),
        r.inactive_share_pct,
        m(r.member_average_check_kopecks),
        m(r.anonymous_average_check_kopecks),
        r.purchase_frequency,
        m(r.ltv_kopecks),
        m(r.liability_kopecks),
        group(r.liability_points),
        m(r.program_cost_kopecks),
        r.cost_share_of_margin_pct,
        m(r.gross_margin_kopecks),
        r.churned_members,
        r.returned_members
    );
    if r.lines_without_cost > 0 {
        let _ = write!(
            h,
            "<p class=\"bad\">Себестоимость неизвестна у {} из {} строк продаж ({} ₽ выручки): их маржа не учтена, \
             доля программы в марже {}. Укажите вид цены закупки ([onec] cost_price_type).</p>",
            r.lines_without_cost,
            r.sale_lines,
            m(r.revenue_without_cost_kopecks),
            if r.lines_without_cost == r.sale_lines {
                "неизвестна"
            } else {
                "посчитана по известной марже"
            }
        );
    }
    h.push_str("<h2>Активность участников</h2>");
    h.push_str(&share(r.active_members_90d, r.members, "активны", "неактивны"));
    h.push_str("<h2>Сегменты RFM</h2>");
    let segs: Vec<(String, i64)> = r
        .segments
        .iter()
        .map(|(code, n)| {
            (
                Segment::parse(code).map_or(code.clone(), |s| s.label_ru().to_string()),
                *n,
            )
        })
        .collect();
    h.push_str(&bars(&segs, "#1565c0", group));
    h.push_str("<h2>Выручка: участники и покупатели без карты</h2>");
    h.push_str(&bars(
        &[
            (
                format!("участники ({} чеков)", r.member_sales),
                r.member_sales_kopecks,
            ),
            (
                format!("без карты ({} чеков)", r.anonymous_sales),
                r.anonymous_sales_kopecks,
            ),
        ],
        "#6a1b9a",
        |k| format!("{} ₽", rub(k)),
    ));
    let _ = write!(
        h,
        "<h2>Убыточные строки</h2><p>Продаж, где оплата баллами увела строки ниже себестоимости: {} \
         (строк: {}), убыток по вине программы {} ₽.</p>",
        r.loss_maker_sales,
        r.loss_lines.line_count,
        m(r.loss_maker_kopecks)
    );
    loss_table(&mut h, &r.loss_lines, tz);
    let _ = write!(
        h,
        "<h2>Продано ниже себестоимости по цене</h2><p>Строк: {} на {} ₽ — убыток от цены до всяких \
         баллов: это ценообразование, не программа.</p>",
        r.pricing_loss.line_count,
        m(r.pricing_loss.total_kopecks)
    );
    loss_table(&mut h, &r.pricing_loss, tz);
    h.push_str("</body></html>");
    h
}

/// A loss list as a table that adds up to its headline: the largest lines by document,
/// date and product, and a row for the rest.
fn loss_table(h: &mut String, list: &crate::ledger::LossList, tz: chrono_tz::Tz) {
    if list.lines.is_empty() {
        return;
    }
    let m = |k: i64| crate::core::money::Money(k).to_string();
    h.push_str(
        "<table><tr><th>Документ</th><th>Дата</th><th>Товар</th><th class=\"num\">Оплачено баллами, ₽</th>\
         <th class=\"num\">Убыток, ₽</th></tr>",
    );
    for l in &list.lines {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&l.title(tz)),
            l.occurred_at.with_timezone(&tz).format("%d.%m.%Y"),
            esc(l.name.as_deref().unwrap_or(&l.product_id)),
            m(l.points_paid_kopecks),
            m(l.loss_kopecks)
        );
    }
    if list.rest_count > 0 {
        let _ = write!(
            h,
            "<tr><td colspan=\"4\">ещё строк: {}</td><td class=\"num\">{}</td></tr>",
            list.rest_count,
            m(list.rest_kopecks)
        );
    }
    let _ = write!(
        h,
        "<tr><th colspan=\"4\">Итого</th><th class=\"num\">{}</th></tr></table>",
        m(list.total_kopecks)
    );
}
