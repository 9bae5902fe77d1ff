//! The daemon's HTTP endpoint (loopback by default): `/healthz` and `/metrics` for IT,
//! `/status` for people, and `/v1` for tills and the site (balance, quote) behind a bearer
//! token.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::JobContext;
use super::runtime::Runtime;
use crate::core::document::{DocKind, Document, Line, SourceRef};
use crate::core::money::{Money, Points};
use crate::core::program::{CustomerState, Rules};
use crate::core::rules::{QuoteRequest, quote};
use crate::ledger::{CostPolicy, DateRange, OutboxState};

#[derive(Clone)]
struct AppState {
    ctx: JobContext,
    rt: Arc<Runtime>,
}

pub fn router(ctx: JobContext, rt: Arc<Runtime>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/", get(status))
        .route("/report", get(report))
        .route("/v1/customers/{id}/balance", get(balance))
        .route("/v1/quote", post(quote_handler))
        .route("/v1/customers", post(register))
        .route("/unsubscribe", get(unsubscribe_page).post(unsubscribe))
        .with_state(AppState { ctx: ctx.clone(), rt })
        .merge(super::holds::router(ctx.clone()))
        .merge(super::loyalty_server::router(ctx.clone()).unwrap_or_default())
        .merge(super::discount_server::router(ctx).unwrap_or_default())
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "status": status.as_u16(), "detail": detail.into() })),
    )
        .into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    let now = s.ctx.clock.now();
    let ready = s.rt.ready.load(std::sync::atomic::Ordering::SeqCst);
    let mut reasons = Vec::new();
    let live = s.rt.healthy(now);
    if let Err(e) = &live {
        reasons.push(e.clone());
    }
    if !ready {
        reasons.push("starting".to_string());
    }
    for (name, j) in s.rt.jobs() {
        if let Some(e) = j.last_error {
            reasons.push(format!("job {name} failed its last run: {e}"));
        }
    }
    let dead = s
        .ctx
        .ledger
        .run(|l| l.outbox_open_counts())
        .await
        .map(|c| {
            c.iter()
                .filter(|(_, st, _)| *st == OutboxState::Dead)
                .map(|(_, _, n)| n)
                .sum::<i64>()
        })
        .unwrap_or(0);
    if dead > 0 {
        reasons.push(format!(
            "{dead} outbox rows are dead letters (kopilka outbox list --state dead)"
        ));
    }
    let (code, status) = match (&live, ready, reasons.is_empty()) {
        (Err(_), _, _) | (_, false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (Ok(()), true, true) => (StatusCode::OK, "ok"),
        (Ok(()), true, false) => (StatusCode::OK, "degraded"),
    };
    (
        code,
        Json(serde_json::json!({ "status": status, "ready": ready, "reasons": reasons })),
    )
        .into_response()
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

async fn metrics(State(s): State<AppState>) -> Response {
    let now = s.ctx.clock.now();
    let data = s
        .ctx
        .ledger
        .run(move |l| -> crate::ledger::Result<_> {
            Ok((
                l.summary(&DateRange::default(), now)?,
                l.outbox_counts()?,
                l.checkpoints()?,
                l.hold_counts(now)?,
                l.notify_status(now)?,
            ))
        })
        .await;
    let (summary, outbox, checkpoints, holds, messages) = match data {
        Ok(d) => d,
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")),
    };
    let mut out = String::new();
    metric(
        &mut out,
        "kopilka_documents_total",
        "Documents in the ledger by state.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kopilka_documents_total{{kind=\"sale\"}} {}",
        summary.sales_count
    );
    let _ = writeln!(
        out,
        "kopilka_documents_total{{kind=\"return\"}} {}",
        summary.returns_count
    );
    let _ = writeln!(
        out,
        "kopilka_documents_total{{kind=\"void\"}} {}",
        summary.voided_documents
    );
    metric(
        &mut out,
        "kopilka_documents_quarantined",
        "Documents waiting in quarantine.",
        "gauge",
    );
    let _ = writeln!(out, "kopilka_documents_quarantined {}", summary.quarantined);
    metric(
        &mut out,
        "kopilka_outbox_rows",
        "Outbox rows by destination and state.",
        "gauge",
    );
    for (dest, state, n) in outbox {
        let _ = writeln!(
            out,
            "kopilka_outbox_rows{{destination=\"{dest}\",state=\"{}\"}} {n}",
            state.as_str()
        );
    }
    metric(
        &mut out,
        "kopilka_points_liability_points",
        "Points customers hold (pending and available).",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kopilka_points_liability_points{{state=\"available\"}} {}",
        summary.points_available
    );
    let _ = writeln!(
        out,
        "kopilka_points_liability_points{{state=\"pending\"}} {}",
        summary.points_pending
    );
    metric(
        &mut out,
        "kopilka_sync_lag_seconds",
        "Seconds since a source's checkpoint last moved.",
        "gauge",
    );
    for (source, _, at) in checkpoints {
        let _ = writeln!(
            out,
            "kopilka_sync_lag_seconds{{source=\"{source}\"}} {}",
            (now - at).num_seconds().max(0)
        );
    }
    super::holds::write_metrics(&mut out, &holds);
    metric(
        &mut out,
        "kopilka_messages",
        "Members' messages by channel and outcome (held and not_sent by reason).",
        "gauge",
    );
    for c in &messages {
        for (outcome, n) in [("queued", c.queued), ("sent", c.sent), ("failed", c.failed)] {
            let _ = writeln!(
                out,
                "kopilka_messages{{channel=\"{}\",outcome=\"{outcome}\"}} {n}",
                c.channel
            );
        }
        for (outcome, by) in [("held", &c.held), ("not_sent", &c.not_sent)] {
            for (reason, n) in by {
                let _ = writeln!(
                    out,
                    "kopilka_messages{{channel=\"{}\",outcome=\"{outcome}\",reason=\"{}\"}} {n}",
                    c.channel,
                    reason.replace(['"', '\\', '\n'], " ")
                );
            }
        }
    }
    let jobs = s.rt.jobs();
    metric(
        &mut out,
        "kopilka_job_runs_total",
        "Job runs by result.",
        "counter",
    );
    for (name, j) in &jobs {
        let _ = writeln!(
            out,
            "kopilka_job_runs_total{{job=\"{name}\",result=\"ok\"}} {}",
            j.runs - j.failures
        );
        let _ = writeln!(
            out,
            "kopilka_job_runs_total{{job=\"{name}\",result=\"failed\"}} {}",
            j.failures
        );
    }
    metric(
        &mut out,
        "kopilka_job_duration_seconds_total",
        "Time spent in job runs.",
        "counter",
    );
    for (name, j) in &jobs {
        let _ = writeln!(
            out,
            "kopilka_job_duration_seconds_total{{job=\"{name}\"}} {:.3}",
            j.total_duration_ms as f64 / 1000.0
        );
    }
    let mut r = out.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[derive(Deserialize)]
struct UnsubscribeQuery {
    /// The member's id.
    m: i64,
    /// The channel (`email`, `telegram`, `salesbot`).
    c: String,
    /// The member's token for that channel.
    t: String,
}

async fn check_unsubscribe(
    s: &AppState,
    q: &UnsubscribeQuery,
) -> Result<crate::core::notify::Channel, Response> {
    let Some(channel) = crate::core::notify::Channel::parse(&q.c) else {
        return Err(problem(StatusCode::NOT_FOUND, "no such channel"));
    };
    let secret = s
        .ctx
        .ledger
        .run(|l| l.notify_secret())
        .await
        .map_err(|e| problem(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")))?;
    if !crate::core::notify::unsubscribe_token_matches(&secret, q.m, channel, &q.t) {
        return Err(problem(StatusCode::NOT_FOUND, "this link is not valid"));
    }
    Ok(channel)
}

/// The page an unsubscribe link opens: a button, not the unsubscribe itself, because mail
/// scanners open links on their own (RFC 8058 §1); the button and a mail client's one-click
/// both POST.
async fn unsubscribe_page(State(s): State<AppState>, Query(q): Query<UnsubscribeQuery>) -> Response {
    if let Err(r) = check_unsubscribe(&s, &q).await {
        return r;
    }
    Html(format!(
        "<!doctype html><html lang=\"ru\"><meta charset=\"utf-8\"><title>Отписка</title><body>\
         <form method=\"post\" action=\"?m={}&amp;c={}&amp;t={}\">\
         <p>Больше не присылать сообщения программы лояльности на этот адрес?</p>\
         <button type=\"submit\">Отписаться</button></form></body></html>",
        q.m, q.c, q.t
    ))
    .into_response()
}

/// RFC 8058 one-click (`List-Unsubscribe=One-Click` in the body) and the page's button:
/// honoured at once, pending messages on the channel are refused.
async fn unsubscribe(State(s): State<AppState>, Query(q): Query<UnsubscribeQuery>) -> Response {
    let channel = match check_unsubscribe(&s, &q).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = s.ctx.clock.now();
    let m = q.m;
    match s
        .ctx
        .ledger
        .run(move |l| l.notify_unsubscribe(m, channel, "unsubscribe link", now))
        .await
    {
        Ok(_) => Html(
            "<!doctype html><html lang=\"ru\"><meta charset=\"utf-8\"><title>Отписка</title>\
             <body><p>Готово: сообщений на этот адрес больше не будет.</p></body></html>"
                .to_string(),
        )
        .into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")),
    }
}

/// `Err` holds the reply to send (boxed: a response is large).
fn authorized(s: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &s.ctx.cfg.daemon.api_token else {
        return Err(Box::new(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the /v1 API is off: set daemon.api_token_file to enable it",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.matches(given.as_bytes()) {
        Ok(())
    } else {
        Err(Box::new(problem(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required",
        )))
    }
}

/// The pages with business data (`/status`, `/report`: customers, revenue, liability) are
/// open on loopback, where only the machine's own users (or a proxy that authenticates)
/// reach them. Off loopback they need `daemon.read_token_file` or the API token, as a
/// bearer token or as the password of HTTP Basic (so a browser can open them; any user
/// name). `Err` holds the reply to send.
fn page_access(s: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let d = &s.ctx.cfg.daemon;
    if d.http_listen.ip().is_loopback() {
        return Ok(());
    }
    let tokens: Vec<&crate::config::Secret> = [&d.read_token, &d.api_token].into_iter().flatten().collect();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(t) = v.strip_prefix("Bearer ") {
                return Some(t.trim().to_string());
            }
            use base64::Engine as _;
            let b = v.strip_prefix("Basic ")?;
            let raw = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok()?;
            let text = String::from_utf8(raw).ok()?;
            text.split_once(':').map(|(_, password)| password.to_string())
        });
    if let Some(given) = given
        && tokens.iter().any(|t| t.matches(given.as_bytes()))
    {
        return Ok(());
    }
    let detail = if tokens.is_empty() {
        "this page shows business data and kopilka listens off loopback: set daemon.read_token_file \
         (or daemon.api_token_file) and give the token"
    } else {
        "a valid token is required (Authorization: Bearer, or as the password of HTTP Basic)"
    };
    let mut r = problem(StatusCode::UNAUTHORIZED, detail);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"kopilka\", charset=\"UTF-8\""),
    );
    Err(Box::new(r))
}

fn ledger_error(e: crate::ledger::LedgerError) -> Response {
    match e {
        crate::ledger::LedgerError::UnknownCustomer(_) => problem(StatusCode::NOT_FOUND, e.to_string()),
        crate::ledger::LedgerError::AmbiguousCustomer(..) => problem(StatusCode::CONFLICT, e.to_string()),
        other => problem(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

async fn balance(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    let now = s.ctx.clock.now();
    let warn = s.ctx.cfg.warn_before;
    match s.ctx.ledger.run(move |l| l.balance(&id, now, warn)).await {
        Ok(b) => {
            let tier = b.tier.as_deref().and_then(|t| s.ctx.cfg.program.tier(t));
            Json(serde_json::json!({
                "customer": b.customer,
                "available": b.available,
                "held": b.held,
                "pending": b.pending,
                "expiring": b.expiring,
                "debt": b.debt,
                "tier": b.tier,
                "discount_pct": tier.map(|t| t.discount_pct.normalize().to_string()),
                "point_value_kopecks": s.ctx.cfg.program.point_value.0,
                "referral_code": b.referral_code,
            }))
            .into_response()
        }
        Err(e) => ledger_error(e),
    }
}

/// A till or the site registering a member (issue 20): the keys, and what the customer says
/// at the counter — birthday, the friend code they came with, consent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    card: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// `YYYY-MM-DD` or `ДД.ММ.ГГГГ`.
    #[serde(default)]
    birthday: Option<String>,
    #[serde(default)]
    referral_code: Option<String>,
    #[serde(default)]
    consent: Option<bool>,
    #[serde(default)]
    consent_ads: Option<bool>,
}

/// `POST /v1/customers`: enrols (or finds) the customer by card, phone or e-mail and records
/// what the body says, as a customers file's row would; answers the customer's id, friend
/// code and what was not recorded (an unknown or own friend code) — 422 when nothing could be.
async fn register(State(s): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    let b: RegisterBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, format!("body: {e}")),
    };
    let mut identity = crate::core::identity::CustomerIdentity {
        card: b.card.as_deref().and_then(crate::core::identity::normalize_card),
        name: b.name.filter(|n| !n.trim().is_empty()),
        referred_by: b.referral_code.filter(|c| !c.trim().is_empty()),
        ..Default::default()
    };
    if let Some(p) = &b.phone {
        match crate::core::identity::Phone::parse(p) {
            Some(p) => identity.phone = Some(p),
            None => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("phone {p:?} is not a phone number"),
                );
            }
        }
    }
    if let Some(e) = &b.email {
        match crate::core::identity::Email::parse(e) {
            Some(e) => identity.email = Some(e),
            None => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("e-mail {e:?} is not an address"),
                );
            }
        }
    }
    if let Some(d) = &b.birthday {
        match crate::migrate::parse_birthday(d) {
            Ok(d) => identity.birthday = Some(d),
            Err(why) => return problem(StatusCode::UNPROCESSABLE_ENTITY, why),
        }
    }
    if identity.card.is_none() && identity.phone.is_none() && identity.email.is_none() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a card, phone or e-mail is needed",
        );
    }
    let key = identity
        .card
        .clone()
        .or_else(|| identity.phone.as_ref().map(|p| p.as_str().to_string()))
        .or_else(|| identity.email.as_ref().map(|e| e.as_str().to_string()))
        .unwrap_or_default();
    let row = crate::migrate::CustomerRow {
        line: 1,
        identity,
        consent_service: b.consent,
        consent_ads: b.consent_ads,
    };
    let now = s.ctx.clock.now();
    let cfg = s.ctx.cfg.clone();
    let warn = cfg.warn_before;
    let result = s
        .ctx
        .ledger
        .run(move |l| {
            let r = l.import_customers("api", vec![Ok(row)], &cfg.program, now)?;
            let b = l.balance(&key, now, warn)?;
            Ok::<_, crate::ledger::LedgerError>((r, b))
        })
        .await;
    match result {
        Ok((r, b)) => {
            let status = if r.created > 0 {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                Json(serde_json::json!({
                    "customer_id": b.customer.id,
                    "created": r.created > 0,
                    "referral_code": b.referral_code,
                    "not_recorded": r.problems.iter().map(|(_, why)| why).collect::<Vec<_>>(),
                })),
            )
                .into_response()
        }
        Err(e) => ledger_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteLineBody {
    product_id: String,
    #[serde(default)]
    category: Option<String>,
    /// A decimal as a string ("1.5") or an integer.
    quantity: serde_json::Value,
    net_kopecks: i64,
    #[serde(default)]
    unit_cost_kopecks: Option<i64>,
    #[serde(default)]
    service: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteBody {
    customer: String,
    lines: Vec<QuoteLineBody>,
    #[serde(default)]
    points_wanted: Option<i64>,
}

/// Most lines one quote may carry.
const MAX_QUOTE_LINES: usize = 1_000;

fn quantity(v: &serde_json::Value) -> Option<Decimal> {
    match v {
        serde_json::Value::String(s) => crate::core::money::parse_decimal(s).ok(),
        serde_json::Value::Number(n) if n.is_i64() => n.as_i64().map(Decimal::from),
        _ => None,
    }
}

async fn quote_handler(State(s): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    let req: QuoteBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("invalid quote request: {e}")),
    };
    if req.lines.is_empty() || req.lines.len() > MAX_QUOTE_LINES {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("a quote needs 1..={MAX_QUOTE_LINES} lines"),
        );
    }
    let mut lines = Vec::with_capacity(req.lines.len());
    for (i, l) in req.lines.iter().enumerate() {
        let Some(q) = quantity(&l.quantity).filter(|q| *q > Decimal::ZERO) else {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "line {}: quantity must be a positive decimal (\"1.5\") or integer",
                    i + 1
                ),
            );
        };
        if l.net_kopecks < 0 {
            return problem(StatusCode::BAD_REQUEST, format!("line {}: negative net", i + 1));
        }
        lines.push(Line {
            product_id: l.product_id.clone(),
            name: l.product_id.clone(),
            category: l.category.clone(),
            category_parents: Vec::new(),
            quantity: q,
            unit_price: Money(0),
            discount: Money(0),
            net: Money(l.net_kopecks),
            unit_cost: l.unit_cost_kopecks.map(Money),
            service: l.service,
        });
    }
    let now = s.ctx.clock.now();
    let cfg = s.ctx.cfg.clone();
    let customer = req.customer.clone();
    let points_wanted = req.points_wanted;
    let result = s
        .ctx
        .ledger
        .run(move |l| -> crate::ledger::Result<serde_json::Value> {
            let b = l.balance(&customer, now, cfg.warn_before)?;
            let policy = cfg.onec.as_ref().and_then(|o| {
                o.cost_price_type.clone().map(|price_type| CostPolicy {
                    price_type,
                    backfill: o.cost_backfill,
                })
            });
            let mut doc = Document {
                source: SourceRef {
                    system: "quote".into(),
                    doc_id: "quote".into(),
                    version: String::new(),
                    stamp: None,
                },
                kind: DocKind::Sale,
                number: None,
                occurred_at: now,
                customer: Default::default(),
                currency: cfg.limits.currency.clone(),
                total: Money(lines.iter().map(|l| l.net.0).sum()),
                lines,
                points_redeemed: Points(0),
                original: None,
                store: None,
                partner: None,
            };
            l.complete_from_catalog(&mut doc, policy.as_ref())?;
            let state = CustomerState {
                customer_id: Some(b.customer.id),
                available: b.available,
                tier: b.tier.clone(),
                prior_sales: 1,
                ..Default::default()
            };
            let q = quote(
                &cfg.program,
                &QuoteRequest {
                    lines: doc.lines.clone(),
                    points_wanted,
                },
                &state,
            );
            // what the basket would earn if paid with the quoted points
            doc.points_redeemed = Points(q.max_redeemable_points);
            let preview = cfg.program.evaluate(&doc, &state, now);
            Ok(serde_json::json!({
                "customer_id": b.customer.id,
                "available": b.available,
                "tier": b.tier,
                "max_redeemable_points": q.max_redeemable_points,
                "max_redeemable_kopecks": q.max_redeemable_points * cfg.program.point_value.0,
                "limited_by": q.limited_by,
                "allocation_kopecks": q.allocation,
                "lines": q.lines.iter().map(|l| serde_json::json!({
                    "line": l.line, "product_id": l.product, "max_redeem_kopecks": l.max_redeem_kopecks, "reason": l.reason,
                })).collect::<Vec<_>>(),
                "accrual_preview": {
                    "points": preview.accrual,
                    "explanation": preview.explanation,
                    "flags": preview.flags,
                },
            }))
        })
        .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => ledger_error(e),
    }
}

/// `?days=N` (default 30) or `?days=all` picks the period ending now.
#[derive(Deserialize)]
struct ReportQuery {
    days: Option<String>,
}

async fn report(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<ReportQuery>) -> Response {
    if let Err(r) = page_access(&s, &headers) {
        return *r;
    }
    let now = s.ctx.clock.now();
    let pv = s.ctx.cfg.program.point_value.0;
    let from = match q.days.as_deref().map(str::trim) {
        None | Some("") => Some(now - Duration::days(30)),
        Some("all") => None,
        Some(d) => match d.parse::<u16>() {
            Ok(n) if n > 0 => Some(now - Duration::days(i64::from(n))),
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!("days: expected a number of days from 1 to 65535 or \"all\", got {d:?}"),
                );
            }
        },
    };
    let range = DateRange { from, to: None };
    match s.ctx.ledger.run(move |l| l.program_report(&range, now, pv)).await {
        Ok(r) => Html(super::report_html::render(&r, s.ctx.cfg.timezone, true)).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")),
    }
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Bars of points per day (accrued up, redeemed and expired down) as inline SVG.
fn chart(days: &[(chrono::NaiveDate, i64, i64, i64)]) -> String {
    let w = 720.0;
    let h = 220.0;
    // the axis sits where the larger side needs it, so a month with no redemptions
    // does not leave half the chart empty
    let up_max = days.iter().map(|d| d.1).max().unwrap_or(0).max(0) as f64;
    let down_max = days.iter().map(|d| d.2 + d.3).max().unwrap_or(0).max(0) as f64;
    let scale = (up_max + down_max).max(1.0);
    let usable = h - 20.0;
    let mid = 10.0 + usable * up_max / scale;
    let per_point = usable / scale;
    let n = days.len().max(1) as f64;
    let bar = w / n;
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"100%\" role=\"img\" aria-label=\"points per day\">\
         <line x1=\"0\" y1=\"{mid:.1}\" x2=\"{w}\" y2=\"{mid:.1}\" stroke=\"#999\"/>"
    );
    for (i, (day, accrued, redeemed, expired)) in days.iter().enumerate() {
        let x = i as f64 * bar + 1.0;
        let up = *accrued as f64 * per_point;
        let down_r = *redeemed as f64 * per_point;
        let down_e = *expired as f64 * per_point;
        let _ = write!(
            svg,
            "<g><title>{day}: +{accrued} accrued, −{redeemed} redeemed, −{expired} expired</title>\
             <rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{up:.1}\" fill=\"#2e7d32\"/>\
             <rect x=\"{x:.1}\" y=\"{mid:.1}\" width=\"{:.1}\" height=\"{down_r:.1}\" fill=\"#1565c0\"/>\
             <rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{down_e:.1}\" fill=\"#c62828\"/></g>",
            mid - up,
            bar - 2.0,
            bar - 2.0,
            mid + down_r,
            bar - 2.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

async fn status(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = page_access(&s, &headers) {
        return *r;
    }
    let now = s.ctx.clock.now();
    let tz = s.ctx.cfg.timezone;
    let today = now.with_timezone(&tz).date_naive();
    let from = now - Duration::days(30);
    let cfg = s.ctx.cfg.clone();
    let data = s
        .ctx
        .ledger
        .run(move |l| -> crate::ledger::Result<_> {
            Ok((
                l.summary(&DateRange::default(), now)?,
                l.outbox_counts()?,
                l.checkpoints()?,
                l.points_by_hour(from, now)?,
                l.loss_makers(15)?,
                l.outbox_list(&crate::ledger::OutboxFilter {
                    state: Some(OutboxState::Dead),
                    destination: None,
                    limit: Some(15),
                })?,
                l.quarantine_list(false)?,
                l.reconcile(today - Duration::days(1), today, &cfg.books(), today, None)?,
            ))
        })
        .await;
    let (summary, outbox, checkpoints, hours, losses, dead, quarantine, recon) = match data {
        Ok(d) => d,
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, format!("ledger: {e}")),
    };
    let mut days: BTreeMap<chrono::NaiveDate, (i64, i64, i64)> = BTreeMap::new();
    for i in 0..30 {
        days.insert(today - Duration::days(29 - i), (0, 0, 0));
    }
    for (hour, kind, sum) in hours {
        let day = hour.with_timezone(&tz).date_naive();
        if let Some(e) = days.get_mut(&day) {
            match kind.as_str() {
                "accrual" | "bonus" => e.0 += sum,
                "redemption" => e.1 -= sum,
                "expiry" => e.2 -= sum,
                _ => {}
            }
        }
    }
    let series: Vec<_> = days.into_iter().map(|(d, (a, r, x))| (d, a, r, x)).collect();
    let local = |t: DateTime<Utc>| t.with_timezone(&tz).format("%d.%m.%Y %H:%M").to_string();
    let mut html = String::with_capacity(16 << 10);
    let _ = write!(
        html,
        "<!doctype html><html lang=\"ru\"><head><meta charset=\"utf-8\"><title>kopilka — статус</title>\
         <meta http-equiv=\"refresh\" content=\"60\"><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}}\
         th{{background:#f4f4f4}}.num{{text-align:right}}.bad{{color:#c62828;font-weight:600}}.ok{{color:#2e7d32}}\
         .cards{{display:flex;gap:1em;flex-wrap:wrap}}.card{{border:1px solid #ddd;border-radius:8px;padding:.8em 1.2em;min-width:10em}}\
         .card b{{font-size:1.5em;display:block}}</style></head><body>\
         <h1>kopilka</h1><p>{} · работает с {} · <a href=\"/report\">отчёт по программе</a></p>",
        esc(&local(now)),
        esc(&local(s.rt.started_at))
    );
    let money = super::report_html::rub;
    let _ = write!(
        html,
        "<div class=\"cards\"><div class=\"card\">Продажи<b>{}</b>{} ₽</div><div class=\"card\">Возвраты<b>{}</b></div>\
         <div class=\"card\">Баллы у покупателей<b>{}</b>ещё {} в ожидании</div>\
         <div class=\"card\">Карантин<b class=\"{}\">{}</b></div></div>",
        super::report_html::group(summary.sales_count),
        money(summary.sales_total_kopecks),
        super::report_html::group(summary.returns_count),
        super::report_html::group(summary.points_available),
        super::report_html::group(summary.points_pending),
        if summary.quarantined > 0 { "bad" } else { "ok" },
        summary.quarantined
    );
    html.push_str("<h2>Баллы по дням (30 дней)</h2>");
    if series.iter().all(|d| d.1 == 0 && d.2 == 0 && d.3 == 0) {
        html.push_str("<p>За последние 30 дней баллы не начислялись, не списывались и не сгорали.</p>");
    } else {
        html.push_str(&chart(&series));
        html.push_str("<p><span style=\"color:#2e7d32\">■</span> начислено <span style=\"color:#1565c0\">■</span> списано <span style=\"color:#c62828\">■</span> сгорело</p>");
    }
    // today's and yesterday's reconciliation, as `kopilka reconcile` prints it
    let _ = write!(
        html,
        "<h2>Сверка за вчера и сегодня</h2><table><tr><th>День</th><th class=\"num\">Документов в источнике</th>\
         <th class=\"num\">Сумма в источнике, ₽</th><th class=\"num\">Продаж / возвратов в kopilka</th>\
         <th class=\"num\">Сумма в kopilka, ₽</th><th class=\"num\">Начислено / списано / сгорело / сторно</th>\
         <th class=\"num\">Проводки: доставлено / в очереди / ошибка</th></tr>"
    );
    for d in &recon.days {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td>\
             <td class=\"num {}\">{}</td><td class=\"num\">{} / {} / {} / {}</td><td class=\"num\">{} / {} / <span class=\"{}\">{}</span></td></tr>",
            d.day.format("%d.%m.%Y"),
            super::report_html::group(d.source_documents),
            money(d.source_total_kopecks),
            super::report_html::group(d.ledger_sales),
            super::report_html::group(d.ledger_returns),
            if d.ledger_total_kopecks == d.source_total_kopecks {
                ""
            } else {
                "bad"
            },
            money(d.ledger_total_kopecks),
            super::report_html::group(d.points_accrued),
            super::report_html::group(d.points_redeemed),
            super::report_html::group(d.points_expired),
            super::report_html::group(d.points_reversed),
            d.postings_delivered,
            d.postings_pending,
            if d.postings_dead > 0 { "bad" } else { "" },
            d.postings_dead
        );
    }
    html.push_str("</table>");
    if recon.differences.is_empty() {
        html.push_str("<p class=\"ok\">Расхождений нет.</p>");
    } else {
        let _ = write!(
            html,
            "<p class=\"bad\">Расхождений: {}</p><table><tr><th>День</th><th>Что</th><th>Документ</th><th>Подробности</th></tr>",
            recon.differences.len()
        );
        for d in recon.differences.iter().take(20) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"bad\">{}</td><td>{}:{}</td><td>{}</td></tr>",
                d.day
                    .map(|x| x.format("%d.%m.%Y").to_string())
                    .unwrap_or_default(),
                esc(d.kind.label()),
                esc(&d.source),
                esc(&d.document),
                esc(&d.detail)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Синхронизация</h2><table><tr><th>Источник</th><th>Отметка</th><th>Обновлена</th><th class=\"num\">Отставание</th></tr>");
    for (source, cursor, at) in &checkpoints {
        let lag = (now - *at).num_minutes();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num {}\">{lag} мин</td></tr>",
            esc(source),
            esc(cursor),
            esc(&local(*at)),
            if lag > 60 { "bad" } else { "" }
        );
    }
    html.push_str("</table><h2>Задания</h2><table><tr><th>Задание</th><th>Последний запуск</th><th>Итог</th><th>Следующий</th></tr>");
    for (name, j) in s.rt.jobs() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&name),
            j.last_finished.map(local).unwrap_or_else(|| "—".into()),
            if j.last_error.is_some() { "bad" } else { "ok" },
            esc(j
                .last_error
                .as_deref()
                .or(j.last_summary.as_deref())
                .unwrap_or("—")),
            j.next_run.map(local).unwrap_or_else(|| "—".into())
        );
    }
    html.push_str("</table><h2>Очередь доставки</h2><table><tr><th>Куда</th><th>Состояние</th><th class=\"num\">Строк</th></tr>");
    for (dest, state, n) in &outbox {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td class=\"num\">{n}</td></tr>",
            esc(dest),
            if *state == OutboxState::Dead { "bad" } else { "" },
            state.as_str()
        );
    }
    html.push_str("</table>");
    if !dead.is_empty() {
        html.push_str("<h3>Не доставлено (нужно вмешательство)</h3><table><tr><th>id</th><th>Куда</th><th>Ключ</th><th>Ошибка</th></tr>");
        for r in &dead {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"bad\">{}</td></tr>",
                r.id,
                esc(&r.destination),
                esc(&r.idem_key),
                esc(r.last_error.as_deref().unwrap_or(""))
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Убыточные продажи (оплата баллами ниже себестоимости)</h2>");
    if losses.is_empty() {
        html.push_str("<p class=\"ok\">Нет.</p>");
    } else {
        html.push_str("<table><tr><th>Документ</th><th>Дата</th><th class=\"num\">Убыток, ₽</th></tr>");
        for l in &losses {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"num bad\">{}</td></tr>",
                esc(&l.title(tz)),
                esc(&local(l.occurred_at)),
                money(l.loss_kopecks)
            );
        }
        html.push_str("</table>");
    }
    if !quarantine.is_empty() {
        html.push_str("<h2>Карантин</h2><table><tr><th>Документ</th><th>Причина</th><th>Где</th></tr>");
        for q in quarantine.iter().take(20) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"bad\">{}</td><td>{}</td></tr>",
                esc(&q.title(tz)),
                esc(&q.reason),
                esc(q.location.as_deref().unwrap_or(""))
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>");
    Html(html).into_response()
}
