//! `kopilka report`: how the program is doing — members and how many are active, how often
//! they buy and how much, what the program costs against the margin it earns, what the
//! shop owes in points, and where points were paid below cost.

use chrono::{DateTime, Duration, Utc};
use rusqlite::params;
use serde::Serialize;

use super::{DateRange, Ledger, Result, from_ts, ts};

#[derive(Clone, Debug, Default, Serialize)]
pub struct LossLine {
    pub source: String,
    pub doc_id: String,
    pub number: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub product_id: String,
    pub name: Option<String>,
    /// What the line lost below cost: in the program's list, only the part the points paid
    /// on it caused; in the pricing list, cost × quantity − net (no points involved).
    pub loss_kopecks: i64,
    /// Kopecks of points paid on the line (0 in the pricing list's lines without points).
    pub points_paid_kopecks: i64,
}

/// A list of loss lines that adds up to its headline: the largest lines, and what the rest
/// of them come to.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LossList {
    pub lines: Vec<LossLine>,
    /// Every loss line of the period, and their sum (the headline).
    pub line_count: i64,
    pub total_kopecks: i64,
    /// Lines not listed, and their sum: listed + rest = total.
    pub rest_count: i64,
    pub rest_kopecks: i64,
}

impl LossList {
    const SHOWN: usize = 10;

    fn from_lines(mut lines: Vec<LossLine>) -> LossList {
        lines.sort_by_key(|l| (std::cmp::Reverse(l.loss_kopecks), l.occurred_at, l.doc_id.clone()));
        let total_kopecks = lines.iter().map(|l| l.loss_kopecks).sum();
        let line_count = lines.len() as i64;
        let rest: Vec<LossLine> = lines.split_off(lines.len().min(Self::SHOWN));
        LossList {
            lines,
            line_count,
            total_kopecks,
            rest_count: rest.len() as i64,
            rest_kopecks: rest.iter().map(|l| l.loss_kopecks).sum(),
        }
    }
}

impl LossLine {
    /// «Продажа ЧК-000777 от 15.11.2026 (onec:…)», the date in `tz`.
    pub fn title(&self, tz: chrono_tz::Tz) -> String {
        crate::core::document::document_title(
            Some(crate::core::document::DocKind::Sale.label()),
            self.number.as_deref(),
            Some(self.occurred_at.with_timezone(&tz).date_naive()),
            &self.source,
            &self.doc_id,
        )
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramReport {
    pub from: Option<DateTime<Utc>>,
    pub to: DateTime<Utc>,
    pub members: i64,
    /// Members who bought in the 90 days before `to`.
    pub active_members_90d: i64,
    /// Share of members who did not (the documents this product is built from cite 54%).
    pub inactive_share_pct: f64,
    pub member_sales: i64,
    pub member_sales_kopecks: i64,
    pub anonymous_sales: i64,
    pub anonymous_sales_kopecks: i64,
    pub member_average_check_kopecks: i64,
    pub anonymous_average_check_kopecks: i64,
    /// Purchases per buying member in the period.
    pub purchase_frequency: f64,
    /// Average lifetime spend of members who bought at least once.
    pub ltv_kopecks: i64,
    /// Members whose last purchase is more than 180 days old.
    pub churned_members: i64,
    /// Members who came back in the last 90 days after a gap of more than 180 days.
    pub returned_members: i64,
    pub liability_points: i64,
    pub liability_kopecks: i64,
    pub points_issued: i64,
    pub program_cost_kopecks: i64,
    /// Margin of the lines whose cost is known (the rest have none to count).
    pub gross_margin_kopecks: i64,
    /// Program cost as a share of gross margin, percent (of the known margin).
    pub cost_share_of_margin_pct: f64,
    /// Sale lines of the period, and those without a cost with their revenue: a margin that
    /// leaves them out is not the shop's margin, and the report says so (issue 16, point 8).
    pub sale_lines: i64,
    pub lines_without_cost: i64,
    pub revenue_without_cost_kopecks: i64,
    pub segments: Vec<(String, i64)>,
    /// Sales where points paid at the till took lines below cost (flag `loss_maker`), and the
    /// part of the loss the points caused: the program's loss.
    pub loss_maker_sales: i64,
    pub loss_maker_kopecks: i64,
    /// The program's loss line by line; adds up to `loss_maker_kopecks`.
    pub loss_lines: LossList,
    /// Lines sold below cost by their price alone (before any point): the owner's pricing,
    /// not the program's doing, listed apart.
    pub pricing_loss: LossList,
}

fn pct(a: i64, b: i64) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 * 1000.0 / b as f64).round() / 10.0
    }
}

impl Ledger {
    pub fn program_report(
        &self,
        range: &DateRange,
        now: DateTime<Utc>,
        point_value: i64,
    ) -> Result<ProgramReport> {
        let c = &self.conn;
        let to = range.to.unwrap_or(now);
        let from = range.from.map_or(i64::MIN, ts);
        let mut r = ProgramReport {
            from: range.from,
            to,
            ..Default::default()
        };
        r.members = c.query_row(
            "SELECT COUNT(*) FROM customers WHERE created_at <= ?1",
            [ts(to)],
            |x| x.get(0),
        )?;
        r.active_members_90d = c.query_row(
            "SELECT COUNT(DISTINCT customer_id) FROM documents WHERE kind = 'sale' AND state = 'active' \
             AND customer_id IS NOT NULL AND occurred_at >= ?1 AND occurred_at < ?2",
            params![ts(to - Duration::days(90)), ts(to)],
            |x| x.get(0),
        )?;
        r.inactive_share_pct = pct(r.members - r.active_members_90d, r.members);
        c.query_row(
            "SELECT COALESCE(SUM(customer_id IS NOT NULL), 0), \
                    COALESCE(SUM(CASE WHEN customer_id IS NOT NULL THEN total END), 0), \
                    COALESCE(SUM(customer_id IS NULL), 0), \
                    COALESCE(SUM(CASE WHEN customer_id IS NULL THEN total END), 0), \
                    COUNT(DISTINCT customer_id), COALESCE(SUM(margin), 0) \
             FROM documents WHERE kind = 'sale' AND state = 'active' AND occurred_at >= ?1 AND occurred_at < ?2",
            params![from, ts(to)],
            |x| {
                r.member_sales = x.get(0)?;
                r.member_sales_kopecks = x.get(1)?;
                r.anonymous_sales = x.get(2)?;
                r.anonymous_sales_kopecks = x.get(3)?;
                let buyers: i64 = x.get(4)?;
                r.purchase_frequency = if buyers == 0 {
                    0.0
                } else {
                    (r.member_sales as f64 / buyers as f64 * 100.0).round() / 100.0
                };
                r.gross_margin_kopecks = x.get(5)?;
                Ok(())
            },
        )?;
        r.member_average_check_kopecks = r.member_sales_kopecks.checked_div(r.member_sales).unwrap_or(0);
        r.anonymous_average_check_kopecks = r
            .anonymous_sales_kopecks
            .checked_div(r.anonymous_sales)
            .unwrap_or(0);
        r.ltv_kopecks = c.query_row(
            "SELECT COALESCE(AVG(spend), 0) FROM (SELECT SUM(total) AS spend FROM documents \
             WHERE kind = 'sale' AND state = 'active' AND customer_id IS NOT NULL AND occurred_at < ?1 GROUP BY customer_id)",
            [ts(to)],
            |x| x.get::<_, f64>(0),
        )? as i64;
        r.churned_members = c.query_row(
            "SELECT COUNT(*) FROM (SELECT customer_id, MAX(occurred_at) AS last FROM documents \
             WHERE kind = 'sale' AND state = 'active' AND customer_id IS NOT NULL AND occurred_at < ?1 \
             GROUP BY customer_id) WHERE last < ?2",
            params![ts(to), ts(to - Duration::days(180))],
            |x| x.get(0),
        )?;
        r.returned_members = c.query_row(
            "SELECT COUNT(DISTINCT customer_id) FROM (SELECT customer_id, occurred_at, \
               LAG(occurred_at) OVER (PARTITION BY customer_id ORDER BY occurred_at) AS prev FROM documents \
               WHERE kind = 'sale' AND state = 'active' AND customer_id IS NOT NULL AND occurred_at < ?1) \
             WHERE occurred_at >= ?2 AND prev IS NOT NULL AND occurred_at - prev > ?3",
            params![ts(to), ts(to - Duration::days(90)), 180 * 86_400],
            |x| x.get(0),
        )?;
        let s = self.summary(range, now)?;
        r.liability_points = s.points_available + s.points_pending;
        r.liability_kopecks = r.liability_points * point_value;
        r.points_issued = s.points_accrued + s.points_bonus;
        r.program_cost_kopecks = r.points_issued * point_value;
        c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(l.unit_cost IS NULL), 0), \
                    COALESCE(SUM(CASE WHEN l.unit_cost IS NULL THEN l.net END), 0) \
             FROM documents d JOIN document_lines l ON l.document_id = d.id \
             WHERE d.kind = 'sale' AND d.state = 'active' AND d.occurred_at >= ?1 AND d.occurred_at < ?2",
            params![from, ts(to)],
            |x| {
                r.sale_lines = x.get(0)?;
                r.lines_without_cost = x.get(1)?;
                r.revenue_without_cost_kopecks = x.get(2)?;
                Ok(())
            },
        )?;
        r.cost_share_of_margin_pct = pct(r.program_cost_kopecks, r.gross_margin_kopecks);
        let mut st = c.prepare(
            "SELECT COALESCE(segment, 'none'), COUNT(*) FROM customers GROUP BY 1 ORDER BY 2 DESC",
        )?;
        r.segments = st
            .query_map([], |x| Ok((x.get(0)?, x.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(loss), 0) FROM documents WHERE loss > 0 AND state = 'active' \
             AND occurred_at >= ?1 AND occurred_at < ?2",
            params![from, ts(to)],
            |x| {
                r.loss_maker_sales = x.get(0)?;
                r.loss_maker_kopecks = x.get(1)?;
                Ok(())
            },
        )?;
        // candidates by a loose filter; each loss is computed exactly, with the guard's own
        // function, so the program's list adds up to the documents' `loss`
        let mut st = c.prepare(
            "SELECT d.source, d.doc_id, d.number, d.occurred_at, l.product_id, l.name, l.quantity, l.net, \
                    l.unit_cost, COALESCE(l.redeemed, 0) \
             FROM document_lines l JOIN documents d ON d.id = l.document_id \
             WHERE d.kind = 'sale' AND d.state = 'active' AND d.applied = 1 \
               AND d.occurred_at >= ?1 AND d.occurred_at < ?2 AND l.unit_cost IS NOT NULL \
               AND l.unit_cost * CAST(l.quantity AS REAL) >= l.net - COALESCE(l.redeemed, 0) - 1",
        )?;
        let rows = st.query_map(params![from, ts(to)], |x| {
            Ok((
                LossLine {
                    source: x.get(0)?,
                    doc_id: x.get(1)?,
                    number: x.get(2)?,
                    occurred_at: from_ts(x.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                    product_id: x.get(4)?,
                    name: x.get(5)?,
                    loss_kopecks: 0,
                    points_paid_kopecks: x.get(9)?,
                },
                x.get::<_, String>(6)?,
                x.get::<_, i64>(7)?,
                x.get::<_, i64>(8)?,
            ))
        })?;
        let (mut program, mut pricing) = (Vec::new(), Vec::new());
        for row in rows {
            let (line, qty, net, cost) = row?;
            let quantity: rust_decimal::Decimal = qty.parse().unwrap_or_default();
            let Ok(cost_total) = crate::core::money::Money(cost).mul_decimal(quantity) else {
                continue;
            };
            let by_points = crate::core::rules::program_loss(cost_total.0, net, line.points_paid_kopecks);
            if by_points > 0 {
                program.push(LossLine {
                    loss_kopecks: by_points,
                    ..line.clone()
                });
            }
            if cost_total.0 > net {
                pricing.push(LossLine {
                    loss_kopecks: cost_total.0 - net,
                    ..line
                });
            }
        }
        r.loss_lines = LossList::from_lines(program);
        r.pricing_loss = LossList::from_lines(pricing);
        Ok(r)
    }
}
