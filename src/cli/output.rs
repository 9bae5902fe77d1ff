//! How results look: aligned tables for people, JSON (stable keys) for scripts.

use std::io::Write;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::core::rules::Tier;
use crate::core::simulate::SimReport;
use crate::ledger::{
    BalanceView, CustomerOffers, CustomerView, HistoryEntry, OutboxRow, OutboxState, PartnerTotals,
    QuarantineEntry, Summary, Violation,
};

fn json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    let mut out = super::out::Stdout;
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn local(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
}

fn who(c: &CustomerView) -> String {
    let mut parts = vec![format!("id:{}", c.id)];
    for v in [&c.name, &c.card, &c.phone, &c.email].into_iter().flatten() {
        parts.push(v.clone());
    }
    parts.join("  ")
}

/// `telegram`: the member's link code and the bot's `@username`, when the bot is configured.
pub fn balance(
    b: &BalanceView,
    tier: Option<&Tier>,
    telegram: Option<(&str, Option<&str>)>,
    as_json: bool,
    tz: Tz,
) -> anyhow::Result<()> {
    if as_json {
        let mut v = serde_json::json!({
            "customer": b.customer,
            "available": b.available,
            "held": b.held,
            "pending": b.pending,
            "expiring": {
                "points": b.expiring.points,
                "within_days": b.expiring.within_days,
                "date": b.expiring.date.map(|d| d.with_timezone(&tz).date_naive().to_string()),
                "date_points": b.expiring.date_points,
            },
            "debt": b.debt,
            "tier": b.tier,
            "tier_name": tier.map(|t| t.name.clone()),
            "discount_pct": tier.map(|t| t.discount_pct.normalize().to_string()),
            "referral_code": b.referral_code,
            "vouchers": b.vouchers.iter().map(|v| serde_json::json!({
                "code": v.code,
                "product": v.product,
                "item": v.item,
                "state": v.state,
                "expires": v.expires_at.map(|u| u.with_timezone(&tz).date_naive().to_string()),
            })).collect::<Vec<_>>(),
            "memberships": b.memberships.iter().map(|(p, until)| serde_json::json!({
                "program": p,
                "until": until.map(|u| u.with_timezone(&tz).date_naive().to_string()),
            })).collect::<Vec<_>>(),
        });
        if let Some((code, _)) = telegram {
            v["telegram_link_code"] = code.into();
        }
        return json(&v);
    }
    println!("{}", who(&b.customer));
    println!("  available  {:>10}", b.available);
    if b.held > 0 {
        println!(
            "  held       {:>10}  (reserved by tills or the site until committed)",
            b.held
        );
    }
    println!("  pending    {:>10}  (inside the return window)", b.pending);
    println!(
        "  expiring   {:>10}  within {} days",
        b.expiring.points, b.expiring.within_days
    );
    if let Some(d) = b.expiring.date {
        println!(
            "  next burn  {:>10}  on {}",
            b.expiring.date_points,
            d.with_timezone(&tz).date_naive()
        );
    }
    if b.debt > 0 {
        println!("  debt       {:>10}  (taken back after being spent)", b.debt);
    }
    match tier {
        Some(t) => println!(
            "  tier       {:>10}  discount {}%",
            t.name,
            t.discount_pct.normalize()
        ),
        None => println!("  tier       {:>10}", b.tier.as_deref().unwrap_or("—")),
    }
    for v in &b.vouchers {
        println!(
            "  voucher    {:>10}  {} — {}{}",
            v.code.as_deref().unwrap_or("—"),
            v.item,
            v.state,
            v.expires_at
                .filter(|_| v.state == "issued")
                .map(|e| format!(", until {}", e.with_timezone(&tz).date_naive().format("%d.%m.%Y")))
                .unwrap_or_default()
        );
    }
    for (program, until) in &b.memberships {
        match until {
            Some(u) => println!(
                "  member of  {:>10}  until {}",
                program,
                u.with_timezone(&tz).date_naive().format("%d.%m.%Y")
            ),
            None => println!("  member of  {:>10}", program),
        }
    }
    if let Some(code) = &b.referral_code {
        println!(
            "  friend code {:>9}  (a friend gives it when they join: both earn by the rules)",
            code
        );
    }
    if let Some((code, bot)) = telegram {
        match bot.map(|b| b.trim_start_matches('@')) {
            // the deep link passes the code as /start's payload: one tap links the chat
            Some(b) => println!(
                "  telegram   {:>10}  (the member sends it to @{b} or opens https://t.me/{b}?start={code}; used once)",
                code
            ),
            None => println!(
                "  telegram   {:>10}  (the member sends it to the shop's bot to link the chat; used once)",
                code
            ),
        }
    }
    Ok(())
}

pub fn history(
    c: &CustomerView,
    entries: &[HistoryEntry],
    changes: &[crate::ledger::AttributeChange],
    vouchers: &[crate::ledger::VoucherView],
    as_json: bool,
    tz: Tz,
) -> anyhow::Result<()> {
    if as_json {
        return json(&serde_json::json!({
            "customer": c,
            "entries": entries,
            "attribute_changes": changes,
            "vouchers": vouchers,
        }));
    }
    println!("{}", who(c));
    // a voucher moves no points, so the journal below does not show it: its own lines
    for v in vouchers.iter().rev() {
        println!(
            "  {}  voucher {} for {}: {}{}",
            local(v.issued_at, tz),
            v.code.as_deref().unwrap_or("—"),
            v.item,
            v.state,
            match (v.used_at, v.expires_at) {
                (Some(u), _) => format!(" {}", local(u, tz)),
                (None, Some(e)) => format!(", until {}", local(e, tz)),
                (None, None) => String::new(),
            }
        );
    }
    for ch in changes {
        match &ch.refused {
            None => println!(
                "  {}  {} = {} (was {}) from {}",
                local(ch.at, tz),
                ch.field,
                ch.new.as_deref().unwrap_or("—"),
                ch.old.as_deref().unwrap_or("—"),
                ch.source
            ),
            Some(why) => println!(
                "  {}  {} ≠ {} from {}: refused, {why}",
                local(ch.at, tz),
                ch.field,
                ch.new.as_deref().unwrap_or("—"),
                ch.source
            ),
        }
    }
    println!(
        "{:>7}  {:<16}  {:<10}  {:>8}  {:<28}  explanation",
        "tx", "date", "kind", "points", "document"
    );
    for e in entries {
        let doc = match (&e.source, &e.doc_id) {
            (Some(s), Some(d)) => format!(
                "{s}:{d}{}",
                e.number.as_ref().map(|n| format!(" №{n}")).unwrap_or_default()
            ),
            _ => e.actor.clone().unwrap_or_default(),
        };
        println!(
            "{:>7}  {:<16}  {:<10}  {:>8}  {:<28}  {}",
            e.tx_id,
            local(e.effective_at, tz),
            e.kind,
            e.points,
            doc,
            e.explanation.summary
        );
        for item in &e.explanation.items {
            let mut detail = format!("{} pts  rule {}", item.points, item.rule);
            if let Some(p) = &item.product {
                detail.push_str(&format!("  product {p}"));
            }
            if let Some(b) = item.base_kopecks {
                detail.push_str(&format!("  base {}", crate::core::money::Money(b)));
            }
            if let Some(r) = &item.rate {
                detail.push_str(&format!("  rate {r}"));
            }
            if let (Some(cap), Some(by)) = (&item.cap, item.capped_by) {
                detail.push_str(&format!("  capped by {cap} (−{by})"));
            }
            println!("{:>78}{detail}", "");
        }
        for f in &e.explanation.flags {
            println!("{:>78}flag {}: {}", "", f.code, f.detail);
        }
    }
    Ok(())
}

pub fn summary(s: &Summary, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(s);
    }
    let money = |k: i64| crate::core::money::Money(k).to_string();
    println!("sales                {:>14}", s.sales_count);
    println!(
        "sales total, RUB     {:>14}  (net of returns)",
        money(s.sales_total_kopecks)
    );
    println!(
        "returns              {:>14}  ({} RUB)",
        s.returns_count,
        money(s.returns_total_kopecks)
    );
    println!(
        "customers            {:>14}  (by their first document)",
        s.customers
    );
    // every term of the identity, signed as it enters it, so the table adds up on its face
    println!("points at start      {:>14}", s.points_at_start);
    println!("+ points accrued     {:>14}", s.points_accrued);
    println!("+ points bonus       {:>14}", s.points_bonus);
    println!("− points redeemed    {:>14}", s.points_redeemed);
    println!("− points expired     {:>14}", s.points_expired);
    println!("− points reversed    {:>14}", s.points_reversed);
    println!("+ points adjusted    {:>14}", s.points_adjusted);
    println!("+ points opening     {:>14}", s.points_opening);
    println!("+ points written off {:>14}", s.points_written_off);
    println!("= points pending     {:>14}", s.points_pending);
    println!(
        "+ points available   {:>14}  (net of points debt {})",
        s.points_available, s.points_debt
    );
    let left = s.identity_left();
    let right = s.points_pending + s.points_available;
    println!(
        "identity             {:>14}  {}",
        format!("{left} = {right}"),
        if left == right { "holds" } else { "DOES NOT HOLD" }
    );
    println!("quarantined          {:>14}", s.quarantined);
    println!("voided documents     {:>14}", s.voided_documents);
    Ok(())
}

pub fn violations(v: &[Violation], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(v);
    }
    if v.is_empty() {
        println!("ledger ok: every invariant holds");
    } else {
        println!("{} violation(s):", v.len());
        for x in v {
            println!("  [{}] {}", x.check, x.detail);
        }
    }
    Ok(())
}

pub fn outbox_rows(
    rows: &[OutboxRow],
    counts: &[(String, OutboxState, i64)],
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        return json(rows);
    }
    for (dest, state, n) in counts {
        println!("{dest:<16} {:<10} {n}", state.as_str());
    }
    if !counts.is_empty() {
        println!();
    }
    println!(
        "{:>8}  {:<16}  {:<10}  {:>8}  {:<40}  last error",
        "id", "destination", "state", "attempts", "key"
    );
    for r in rows {
        println!(
            "{:>8}  {:<16}  {:<10}  {:>8}  {:<40}  {}",
            r.id,
            r.destination,
            r.state.as_str(),
            r.attempts,
            r.idem_key,
            r.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub fn outbox_row(r: &OutboxRow, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(r);
    }
    println!("id            {}", r.id);
    println!("destination   {}", r.destination);
    println!("state         {}", r.state.as_str());
    println!("key           {}", r.idem_key);
    println!("coalesce key  {}", r.coalesce_key.as_deref().unwrap_or("—"));
    println!("attempts      {}", r.attempts);
    println!("next attempt  {}", r.next_attempt_at);
    println!("created       {}", r.created_at);
    if let Some(d) = r.delivered_at {
        println!("delivered     {d}");
    }
    if let Some(s) = r.superseded_by {
        println!("superseded by {s}");
    }
    println!("last error    {}", r.last_error.as_deref().unwrap_or("—"));
    println!("note          {}", r.note.as_deref().unwrap_or("—"));
    println!("payload       {}", r.payload);
    Ok(())
}

pub fn quarantine(entries: &[QuarantineEntry], as_json: bool, tz: Tz) -> anyhow::Result<()> {
    if as_json {
        return json(entries);
    }
    if entries.is_empty() {
        println!("quarantine is empty");
    }
    for q in entries {
        println!(
            "{:>6}  {}  {}  seen {}×  {}{}",
            q.id,
            local(q.last_seen_at, tz),
            q.title(tz),
            q.seen_count,
            q.reason,
            q.location
                .as_ref()
                .map(|l| format!("  at {l}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// The ledger's own figures for the period beside the replay of the rules in force, and
/// where they differ, why (issue 16, point 7): a comparison an owner can trust starts from
/// what was really issued.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Baseline {
    pub ledger: crate::ledger::LedgerIssued,
    pub replayed: i64,
    /// Sales the replay gives other points than the ledger did, and the points in sum
    /// (replay − ledger).
    pub differing_sales: i64,
    pub differing_points: i64,
    /// Of the differing sales: with a sale of the same customer recorded out of date order
    /// around them (1C sent it late), applied again after an edit, after
    /// a return of the customer, and the rest (the rules file or a nightly tier change since
    /// the sale was recorded).
    pub out_of_order: i64,
    pub reapplied: i64,
    pub after_return: i64,
    pub other: i64,
}

impl Baseline {
    pub fn new(ledger: &crate::ledger::LedgerIssued, current: &SimReport) -> Baseline {
        let mut b = Baseline {
            ledger: ledger.clone(),
            replayed: current.points_issued,
            ..Default::default()
        };
        for (id, replayed) in &current.issued_by_sale {
            let issued = ledger.by_sale.get(id).copied().unwrap_or(0);
            if *replayed == issued {
                continue;
            }
            b.differing_sales += 1;
            b.differing_points += replayed - issued;
            if ledger.out_of_order.contains(id) {
                b.out_of_order += 1;
            } else if ledger.reapplied.contains(id) {
                b.reapplied += 1;
            } else if ledger.after_return.contains(id) {
                b.after_return += 1;
            } else {
                b.other += 1;
            }
        }
        b
    }
}

pub fn simulation(
    current: &SimReport,
    proposed: &SimReport,
    baseline: &Baseline,
    file: &std::path::Path,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        return json(&serde_json::json!({
            "baseline": baseline,
            "current": current,
            "proposed": proposed,
            "difference": {
                "points_issued": proposed.points_issued - current.points_issued,
                "points_cost_kopecks": proposed.points_cost_kopecks - current.points_cost_kopecks,
                "margin_after_program_kopecks": proposed.margin_after_program_kopecks - current.margin_after_program_kopecks,
            }
        }));
    }
    let m = |k: i64| crate::core::money::Money(k).to_string();
    println!(
        "{} sales, {} lines replayed; proposed rules: {}",
        proposed.sales,
        proposed.lines,
        file.display()
    );
    println!();
    let l = &baseline.ledger;
    println!(
        "the ledger issued on these sales   {:>16}  (current rules replayed: {}, {} on {} sales)",
        l.on_sales,
        baseline.replayed,
        signed(baseline.replayed - l.on_sales),
        baseline.differing_sales
    );
    if baseline.differing_sales > 0 {
        println!(
            "  where the replay differs: {} sales next to a sale of the same customer 1C sent out of date order, \
             {} applied again after an edit in 1C (on the state of that day), {} after a return of the customer, \
             {} otherwise (the rules file changed, a nightly tier change, or the program budget filled in the order 1C sent the sales)",
            baseline.out_of_order, baseline.reapplied, baseline.after_return, baseline.other
        );
    }
    println!(
        "  not replayed: bonuses without a sale {} (joining, birthdays, referrals), adjustments {}, \
         taken back by returns {}",
        l.bonuses_without_sale, l.adjustments, l.taken_back_by_returns
    );
    println!();
    println!(
        "{:<34} {:>16} {:>16} {:>16}",
        "", "current", "proposed", "difference"
    );
    let row = |name: &str, a: i64, b: i64, money: bool| {
        if money {
            println!("{name:<34} {:>16} {:>16} {:>16}", m(a), m(b), m(b - a));
        } else {
            println!("{name:<34} {a:>16} {b:>16} {:>16}", b - a);
        }
    };
    row(
        "points issued",
        current.points_issued,
        proposed.points_issued,
        false,
    );
    row(
        "their cost, RUB",
        current.points_cost_kopecks,
        proposed.points_cost_kopecks,
        true,
    );
    row(
        "gross margin before program, RUB",
        current.gross_margin_kopecks,
        proposed.gross_margin_kopecks,
        true,
    );
    row(
        "gross margin after program, RUB",
        current.margin_after_program_kopecks,
        proposed.margin_after_program_kopecks,
        true,
    );
    row(
        "lines capped by the margin guard",
        current.lines_capped_by_margin,
        proposed.lines_capped_by_margin,
        false,
    );
    row(
        "loss-making lines",
        current.loss_making_lines,
        proposed.loss_making_lines,
        false,
    );
    row(
        "sales capped by the budget",
        current.budget_capped_sales,
        proposed.budget_capped_sales,
        false,
    );
    row(
        "points granted blind (no cost)",
        current.blind_points,
        proposed.blind_points,
        false,
    );
    println!();
    println!("per rule (proposed):");
    println!(
        "  {:<32} {:>12} {:>16} {:>14}",
        "rule", "points", "cost, RUB", "lines capped"
    );
    for r in &proposed.by_rule {
        println!(
            "  {:<32} {:>12} {:>16} {:>14}",
            r.rule,
            r.points,
            m(r.cost_kopecks),
            r.lines_capped
        );
    }
    Ok(())
}

fn signed(v: i64) -> String {
    if v > 0 { format!("+{v}") } else { v.to_string() }
}

pub fn partners(rows: &[PartnerTotals], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(rows);
    }
    if rows.is_empty() {
        println!("no partner sales in the period");
    }
    println!(
        "{:<24} {:>10} {:>10} {:>16} {:>16} {:>16} {:>10}",
        "partner", "issued", "redeemed", "issued, ₽", "redeemed, ₽", "net, ₽", "documents"
    );
    for r in rows {
        println!(
            "{:<24} {:>10} {:>10} {:>16} {:>16} {:>16} {:>10}",
            r.partner,
            r.points_issued,
            r.points_redeemed,
            crate::core::money::Money(r.issued_kopecks).to_string(),
            crate::core::money::Money(r.redeemed_kopecks).to_string(),
            crate::core::money::Money(r.net_kopecks).to_string(),
            r.documents
        );
    }
    if !rows.is_empty() {
        println!("net above zero: the partner owes the program; below zero: the program owes the partner");
    }
    Ok(())
}

pub fn offers(o: &CustomerOffers, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(o);
    }
    println!(
        "customer id:{}  segment: {}  last purchase {} days ago, {} purchases and {} RUB in 365 days",
        o.customer_id,
        o.segment_ru.unwrap_or("—"),
        o.days_since_last.map_or("—".to_string(), |d| d.to_string()),
        o.purchases_365,
        crate::core::money::Money(o.spend_365_kopecks)
    );
    if o.offers.is_empty() {
        println!("no offer: not enough evidence yet (run `kopilka nightly` to refresh the statistics)");
    }
    for (i, f) in o.offers.iter().enumerate() {
        println!(
            "{}. {}  because they buy {}: together in {} of {} baskets (confidence {}, lift {}, support {}), \
             expected margin {} RUB",
            i + 1,
            f.item,
            f.because,
            f.together,
            f.baskets_with_because,
            f.confidence,
            f.lift,
            f.support,
            crate::core::money::Money(f.expected_margin_kopecks)
        );
    }
    Ok(())
}

pub fn import_reports(reports: &[crate::onec::import::FileReport], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(reports);
    }
    for r in reports {
        println!(
            "{}: {} documents — {} applied, {} new versions, {} voided, {} unchanged, {} stale, {} quarantined; \
             {} skipped; {} catalog entries{}",
            r.file,
            r.documents,
            r.applied,
            r.new_versions,
            r.voided,
            r.unchanged,
            r.stale,
            r.quarantined,
            r.skipped,
            r.catalog_items,
            r.truncated
                .as_ref()
                .map(|t| format!("; INCOMPLETE: {t}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub fn customers_report(file: &str, r: &crate::ledger::CustomersReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&serde_json::json!({ "file": file, "report": r }));
    }
    println!(
        "{file}: {} customers enrolled, {} updated, {} unchanged, {} problems",
        r.created,
        r.updated,
        r.unchanged,
        r.problems.len()
    );
    for (line, why) in &r.problems {
        println!("  line {line}: {why}");
    }
    Ok(())
}

pub fn opening_report(file: &str, r: &crate::ledger::OpeningReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&serde_json::json!({ "file": file, "report": r }));
    }
    println!(
        "{file}: {} customers imported ({} points), {} already imported, {} rows not applied",
        r.applied,
        r.points_imported,
        r.unchanged,
        r.problems.len()
    );
    for (line, why) in &r.problems {
        println!("  line {line}: {why}");
    }
    Ok(())
}

pub fn postings(
    rows: &[crate::ledger::PostingRecord],
    cfg: &crate::config::Config,
    as_json: bool,
) -> anyhow::Result<()> {
    let pv = cfg.program.point_value.0;
    if as_json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                let (p, outbox, created) = (&r.posting, r.outbox_id, r.created_at);
                serde_json::json!({
                    "entity": p.entity, "day": p.day.to_string(), "seq": p.seq, "adjusting": p.seq > 1,
                    "points": p.points,
                    "amounts_kopecks": p.points.iter().map(|(k, v)| (k.clone(), v * pv)).collect::<std::collections::BTreeMap<_, _>>(),
                    "outbox_id": outbox, "created_at": created,
                })
            })
            .collect();
        return json(&out);
    }
    if rows.is_empty() {
        println!("no postings in the period");
    }
    println!(
        "{:<10}  {:<24} {:>3}  {:<12} {:>8} {:>8} {:>14}",
        "day", "entity", "seq", "movement", "Дт", "Кт", "amount, RUB"
    );
    for r in rows {
        let p = &r.posting;
        for (movement, points) in &p.points {
            let (dt, kt) = cfg.accounting.accounts.get(movement).cloned().unwrap_or_default();
            println!(
                "{:<10}  {:<24} {:>3}  {:<12} {:>8} {:>8} {:>14}",
                p.day,
                p.entity,
                p.seq,
                movement,
                dt,
                kt,
                crate::core::money::Money(points * pv)
            );
        }
    }
    Ok(())
}

pub fn reconciliation(r: &crate::ledger::Reconciliation, format: super::Format) -> anyhow::Result<()> {
    use super::Format;
    let m = |k: i64| crate::core::money::Money(k).to_string();
    match format {
        Format::Json => return json(r),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(super::out::Stdout);
            w.write_record([
                "day",
                "source_documents",
                "source_total",
                "ledger_sales",
                "ledger_returns",
                "ledger_total",
                "points_accrued",
                "points_bonus",
                "points_redeemed",
                "points_expired",
                "points_reversed",
                "points_adjusted",
                "points_opening",
                "points_written_off",
                "books",
                "postings_delivered",
                "postings_pending",
                "postings_dead",
            ])?;
            for d in &r.days {
                w.write_record([
                    d.day.to_string(),
                    d.source_documents.to_string(),
                    m(d.source_total_kopecks),
                    d.ledger_sales.to_string(),
                    d.ledger_returns.to_string(),
                    m(d.ledger_total_kopecks),
                    d.points_accrued.to_string(),
                    d.points_bonus.to_string(),
                    d.points_redeemed.to_string(),
                    d.points_expired.to_string(),
                    d.points_reversed.to_string(),
                    d.points_adjusted.to_string(),
                    d.points_opening.to_string(),
                    d.points_written_off.to_string(),
                    d.books.clone(),
                    d.postings_delivered.to_string(),
                    d.postings_pending.to_string(),
                    d.postings_dead.to_string(),
                ])?;
            }
            for x in &r.differences {
                w.write_record([
                    x.day.map(|d| d.to_string()).unwrap_or_default(),
                    x.kind.label().to_string(),
                    x.source.clone(),
                    x.document.clone(),
                    x.title.clone(),
                    x.detail.clone(),
                ])?;
            }
            w.flush()?;
            return Ok(());
        }
        Format::Table | Format::Html => {}
    }
    println!(
        "period {} – {} ({} days); source side: {}",
        r.from.format("%d.%m.%Y"),
        r.to.format("%d.%m.%Y"),
        r.days.len(),
        r.truth
    );
    println!(
        "points by the names of `kopilka summary`; books: is the day in the postings; \
         to 1C: bonus documents and postings for the day, delivered/waiting/dead"
    );
    let line = |cells: [String; 16]| {
        println!(
            "{:<10} {:>5} {:>13} {:>5} {:>4} {:>13} {:>8} {:>6} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7}  {:<10} {:>18}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10],
            cells[11],
            cells[12],
            cells[13],
            cells[14],
            cells[15]
        )
    };
    line(
        [
            "day",
            "1C",
            "1C RUB",
            "sales",
            "ret.",
            "ledger RUB",
            "accrued",
            "bonus",
            "redeemed",
            "expired",
            "reversed",
            "adjusted",
            "opening",
            "wr.off",
            "books",
            "to 1C ok/wait/dead",
        ]
        .map(String::from),
    );
    let quiet = |d: &crate::ledger::DayRow| {
        d.source_documents == 0
            && d.ledger_sales == 0
            && d.ledger_returns == 0
            && d.books.is_empty()
            && d.postings_delivered + d.postings_pending + d.postings_dead == 0
    };
    let omitted = r.days.iter().filter(|d| quiet(d)).count();
    for d in r.days.iter().filter(|d| !quiet(d)) {
        line([
            d.day.to_string(),
            d.source_documents.to_string(),
            m(d.source_total_kopecks),
            d.ledger_sales.to_string(),
            d.ledger_returns.to_string(),
            m(d.ledger_total_kopecks),
            d.points_accrued.to_string(),
            d.points_bonus.to_string(),
            d.points_redeemed.to_string(),
            d.points_expired.to_string(),
            d.points_reversed.to_string(),
            d.points_adjusted.to_string(),
            d.points_opening.to_string(),
            d.points_written_off.to_string(),
            d.books.clone(),
            format!(
                "{}/{}/{}",
                d.postings_delivered, d.postings_pending, d.postings_dead
            ),
        ]);
    }
    if omitted > 0 {
        println!("({omitted} days without any activity omitted)");
    }
    if r.differences.is_empty() {
        println!(
            "no differences: the ledger holds exactly what the source holds, and the books what the ledger holds"
        );
    } else {
        println!("{} difference(s):", r.differences.len());
        for x in &r.differences {
            println!(
                "  {} {:<22} {}  {}",
                x.day.map(|d| d.to_string()).unwrap_or_else(|| "—".into()),
                x.kind.label(),
                if x.title.is_empty() {
                    format!("{}:{}", x.source, x.document)
                } else {
                    x.title.clone()
                },
                x.detail
            );
        }
    }
    Ok(())
}

/// The largest lines of a loss list by document number, date and product, and what the rest
/// come to, so the lines add up to the headline above them.
fn loss_list(list: &crate::ledger::LossList, what: &str, tz: Tz) {
    let m = |k: i64| crate::core::money::Money(k).to_string();
    for l in &list.lines {
        let points = if l.points_paid_kopecks > 0 {
            format!(" (points paid {} RUB)", m(l.points_paid_kopecks))
        } else {
            String::new()
        };
        println!(
            "  {} · {} · {what} {} RUB{points}",
            l.title(tz),
            l.name.as_deref().unwrap_or(&l.product_id),
            m(l.loss_kopecks)
        );
    }
    if list.rest_count > 0 {
        println!(
            "  … {} more lines            {} RUB",
            list.rest_count,
            m(list.rest_kopecks)
        );
    }
}

pub fn report(r: &crate::ledger::ProgramReport, tz: Tz) {
    let m = |k: i64| crate::core::money::Money(k).to_string();
    println!("members                      {:>14}", r.members);
    println!(
        "active in 90 days            {:>14}  ({:.1}% inactive; the literature cites 54%)",
        r.active_members_90d, r.inactive_share_pct
    );
    println!(
        "member sales / average check {:>14}  {} RUB",
        r.member_sales,
        m(r.member_average_check_kopecks)
    );
    println!(
        "anonymous sales / avg check  {:>14}  {} RUB",
        r.anonymous_sales,
        m(r.anonymous_average_check_kopecks)
    );
    println!(
        "purchase frequency           {:>14.2}  per buying member",
        r.purchase_frequency
    );
    println!("LTV, RUB                     {:>14}", m(r.ltv_kopecks));
    println!(
        "churned / returned           {:>14}",
        format!("{} / {}", r.churned_members, r.returned_members)
    );
    println!(
        "liability                    {:>14}  points = {} RUB",
        r.liability_points,
        m(r.liability_kopecks)
    );
    if r.sale_lines > 0 && r.lines_without_cost == r.sale_lines {
        println!(
            "program cost, RUB            {:>14}  (gross margin unknown: none of the {} sale lines has a cost)",
            m(r.program_cost_kopecks),
            r.sale_lines
        );
    } else {
        println!(
            "program cost, RUB            {:>14}  ({:.1}% of gross margin {} RUB)",
            m(r.program_cost_kopecks),
            r.cost_share_of_margin_pct,
            m(r.gross_margin_kopecks)
        );
    }
    if r.lines_without_cost > 0 {
        println!(
            "lines without a cost         {:>14}  of {} ({} RUB of revenue): their margin is unknown and left out; \
             set [onec] cost_price_type",
            r.lines_without_cost,
            r.sale_lines,
            m(r.revenue_without_cost_kopecks)
        );
    }
    println!(
        "loss-maker sales             {:>14}  ({} RUB below cost caused by points paid, {} lines)",
        r.loss_maker_sales,
        m(r.loss_maker_kopecks),
        r.loss_lines.line_count
    );
    loss_list(&r.loss_lines, "points took below cost", tz);
    println!(
        "lines sold below cost        {:>14}  ({} RUB below cost by their price, before any point: pricing, not the program)",
        r.pricing_loss.line_count,
        m(r.pricing_loss.total_kopecks)
    );
    loss_list(&r.pricing_loss, "below cost by price", tz);
    for (seg, n) in &r.segments {
        println!("segment {:<20} {:>14}", seg, n);
    }
}

/// `kopilka notify`: one block per channel, reasons spelled out.
pub fn notify_status(
    cfg: &crate::config::Config,
    status: &[crate::ledger::ChannelStatus],
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    let configured = cfg.notify.channels();
    if configured.is_empty() {
        println!("no channel is configured ([notify.email], [notify.telegram], [notify.salesbot])");
    } else if cfg.program.notify.routes.is_empty() {
        println!("no event is routed to a channel ([notifications.events] in the rules file)");
    }
    if status.is_empty() {
        println!("no messages yet");
    }
    for c in status {
        println!(
            "{}: {} sent, {} queued, {} held, {} not sent, {} failed",
            c.channel,
            c.sent,
            c.queued,
            c.held.values().sum::<i64>(),
            c.not_sent.values().sum::<i64>(),
            c.failed
        );
        for (reason, n) in &c.held {
            println!("  held ({reason}): {n}");
        }
        for (reason, n) in &c.not_sent {
            println!("  not sent ({reason}): {n}");
        }
    }
    Ok(())
}
