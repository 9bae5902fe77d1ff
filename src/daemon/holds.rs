//! `/v1/holds`: two-phase redemption for tills and the site (ARCHITECTURE.md, "Holds").
//!
//! `POST /v1/holds` reserves points for a basket, `POST /v1/holds/{id}/commit` spends them on
//! the final basket, `POST /v1/holds/{id}/cancel` releases them, `GET /v1/holds/{id}` shows
//! one. Every refusal is a 4xx JSON body `{"status", "error", "detail", …}` whose `error` is
//! a stable code a till can branch on; nothing is written for a refused request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::JobContext;
use crate::core::document::Line;
use crate::core::money::Money;
use crate::ledger::{
    CommitRequest, CostPolicy, HoldError, HoldMatching, HoldRequest, HoldSettings, HoldView,
};

/// Largest request body a till may send (a basket of `MAX_LINES` lines fits easily).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most lines one basket may carry.
pub const MAX_LINES: usize = 1_000;

/// Refused requests by reason since the process started (held, committed, cancelled and
/// expired holds are counted from the ledger, so they survive restarts).
static REFUSED: [AtomicU64; REFUSAL_CODES.len()] = [const { AtomicU64::new(0) }; REFUSAL_CODES.len()];
const REFUSAL_CODES: [&str; 12] = [
    "invalid_request",
    "body_too_large",
    "unknown_customer",
    "ambiguous_customer",
    "unknown_hold",
    "idempotency_key_reused",
    "insufficient_points",
    "hold_expired",
    "hold_closed",
    "over_hold",
    "basket_too_small",
    "unauthorized",
];

fn refuse(status: StatusCode, code: &'static str, detail: String, extra: serde_json::Value) -> Response {
    if let Some(i) = REFUSAL_CODES.iter().position(|c| *c == code) {
        REFUSED[i].fetch_add(1, Ordering::Relaxed);
    }
    let mut body = serde_json::json!({ "status": status.as_u16(), "error": code, "detail": detail });
    if let (Some(b), serde_json::Value::Object(more)) = (body.as_object_mut(), extra) {
        b.extend(more);
    }
    (status, Json(body)).into_response()
}

fn invalid(detail: impl Into<String>) -> Response {
    refuse(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        detail.into(),
        serde_json::Value::Null,
    )
}

fn hold_error(e: HoldError) -> Response {
    use serde_json::json;
    let detail = e.to_string();
    match e {
        HoldError::UnknownCustomer(_) => {
            refuse(StatusCode::NOT_FOUND, "unknown_customer", detail, json!(null))
        }
        HoldError::AmbiguousCustomer(..) => {
            refuse(StatusCode::CONFLICT, "ambiguous_customer", detail, json!(null))
        }
        HoldError::UnknownHold(_) => refuse(StatusCode::NOT_FOUND, "unknown_hold", detail, json!(null)),
        HoldError::KeyReused { hold_id, .. } => refuse(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            detail,
            json!({ "hold_id": hold_id.to_string() }),
        ),
        HoldError::NothingToHold {
            reason,
            available,
            held,
        } => refuse(
            StatusCode::CONFLICT,
            "insufficient_points",
            detail,
            json!({ "max_points": 0, "limited_by": reason, "available": available, "held": held }),
        ),
        HoldError::NotEnough { max, reason, .. } => refuse(
            StatusCode::CONFLICT,
            "insufficient_points",
            detail,
            json!({ "max_points": max, "limited_by": reason }),
        ),
        HoldError::Expired { hold_id, expired_at } => refuse(
            StatusCode::GONE,
            "hold_expired",
            detail,
            json!({ "hold_id": hold_id.to_string(), "expired_at": expired_at }),
        ),
        HoldError::Closed { hold_id, state, .. } => refuse(
            StatusCode::CONFLICT,
            "hold_closed",
            detail,
            json!({ "hold_id": hold_id.to_string(), "state": state }),
        ),
        HoldError::CommittedDifferently { hold_id } => refuse(
            StatusCode::CONFLICT,
            "hold_closed",
            detail,
            json!({ "hold_id": hold_id.to_string(), "state": "committed" }),
        ),
        HoldError::OverHold { held, .. } => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "over_hold",
            detail,
            json!({ "max_points": held }),
        ),
        HoldError::BasketTooSmall { max, reason } => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "basket_too_small",
            detail,
            json!({ "max_points": max, "limited_by": reason }),
        ),
        HoldError::Invalid(_) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            detail,
            json!(null),
        ),
        HoldError::Ledger(e) => {
            tracing::error!(error = %e, "hold request failed in the ledger");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": 503, "error": "ledger_unavailable", "detail": e.to_string() })),
            )
                .into_response()
        }
    }
}

pub fn router(ctx: JobContext) -> Router {
    Router::new()
        .route("/v1/holds", post(create))
        .route("/v1/holds/{id}", get(show))
        .route("/v1/holds/{id}/commit", post(commit))
        .route("/v1/holds/{id}/cancel", post(cancel))
        .with_state(ctx)
}

/// Hold metrics for `/metrics`: holds by outcome (from the ledger) and refusals by reason.
pub fn write_metrics(out: &mut String, counts: &[(String, i64)]) {
    let _ = writeln!(
        out,
        "# HELP kopilka_holds_total Holds by outcome (held now, committed, cancelled, expired).\n# TYPE kopilka_holds_total gauge"
    );
    for outcome in ["held", "committed", "cancelled", "expired"] {
        let n = counts.iter().find(|(s, _)| s == outcome).map_or(0, |c| c.1);
        let _ = writeln!(out, "kopilka_holds_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP kopilka_hold_refusals_total Hold, commit and cancel requests refused, by reason.\n# TYPE kopilka_hold_refusals_total counter"
    );
    for (code, n) in REFUSAL_CODES.iter().zip(&REFUSED) {
        let _ = writeln!(
            out,
            "kopilka_hold_refusals_total{{reason=\"{code}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
}

/// `Err` holds the reply to send (boxed: a response is large).
fn authorized(ctx: &JobContext, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &ctx.cfg.daemon.api_token else {
        return Err(Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "status": 503, "error": "api_off",
                    "detail": "the /v1 API is off: set daemon.api_token_file to enable it" })),
            )
                .into_response(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.matches(given.as_bytes()) {
        Ok(())
    } else {
        Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required".into(),
            serde_json::Value::Null,
        )))
    }
}

/// The body as JSON, within the size limit; `Err` is the reply.
async fn json_body(body: Body) -> Result<serde_json::Value, Box<Response>> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| {
        Box::new(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
            serde_json::Value::Null,
        ))
    })?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(Box::new(invalid("the body must be a JSON object"))),
        Err(e) => Err(Box::new(invalid(format!("the body is not JSON: {e}")))),
    }
}

/// One basket line as tills send it (the quote's shape).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LineBody {
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

/// Checks and converts a basket; `Err` says which line is wrong and how.
pub(super) fn basket_lines(lines: &[LineBody]) -> Result<Vec<Line>, String> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(format!(
            "a basket needs 1..={MAX_LINES} lines, got {}",
            lines.len()
        ));
    }
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let n = i + 1;
        let quantity = match &l.quantity {
            serde_json::Value::String(s) => crate::core::money::parse_decimal(s).ok(),
            serde_json::Value::Number(q) if q.is_i64() => q.as_i64().map(Decimal::from),
            _ => None,
        }
        .filter(|q| *q > Decimal::ZERO)
        .ok_or_else(|| format!("lines[{n}].quantity must be a positive decimal (\"1.5\") or integer"))?;
        if l.product_id.trim().is_empty() {
            return Err(format!("lines[{n}].product_id must not be empty"));
        }
        if l.net_kopecks < 0 {
            return Err(format!("lines[{n}].net_kopecks must not be negative"));
        }
        if l.unit_cost_kopecks.is_some_and(|c| c < 0) {
            return Err(format!("lines[{n}].unit_cost_kopecks must not be negative"));
        }
        out.push(Line {
            product_id: l.product_id.clone(),
            name: l.product_id.clone(),
            category: l.category.clone(),
            category_parents: Vec::new(),
            quantity,
            unit_price: Money(0),
            discount: Money(0),
            net: Money(l.net_kopecks),
            unit_cost: l.unit_cost_kopecks.map(Money),
            service: l.service,
        });
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    customer: String,
    lines: Vec<LineBody>,
    #[serde(default)]
    points_wanted: Option<i64>,
    #[allow(dead_code)] // read from the raw value: it is not part of the request's identity
    idempotency_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    lines: Vec<LineBody>,
    #[serde(default)]
    points: Option<i64>,
}

/// Runs a hold operation on the ledger with the configuration's settings.
async fn with_settings<F>(ctx: &JobContext, f: F) -> Response
where
    F: FnOnce(&mut crate::ledger::Ledger, &HoldSettings<'_>) -> Result<HoldView, HoldError> + Send + 'static,
{
    match run_with_settings(ctx, None, f).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => hold_error(e),
    }
}

/// How a till protocol's holds differ from `[holds]`: their own lifetime, and matched to
/// 1C's receipt by card, points and time (the till puts no reference on the receipt).
#[derive(Clone, Copy, Debug)]
pub(super) struct TillHolds {
    pub ttl: chrono::Duration,
}

/// Runs hold operations on the ledger, in one call, with the configuration's settings (or a
/// till protocol's).
pub(super) async fn run_with_settings<T, F>(
    ctx: &JobContext,
    till: Option<TillHolds>,
    f: F,
) -> Result<T, HoldError>
where
    T: Send + 'static,
    F: FnOnce(&mut crate::ledger::Ledger, &HoldSettings<'_>) -> Result<T, HoldError> + Send + 'static,
{
    let cfg = ctx.cfg.clone();
    let now = ctx.clock.now();
    ctx.ledger
        .run(move |l| {
            let destinations = cfg.destinations();
            let ingest = cfg.ingest_context(now, &destinations);
            let cost = cost_policy_of(&cfg);
            let settings = HoldSettings {
                program: &cfg.program,
                cost: cost.as_ref(),
                ttl: till.map_or(cfg.holds.ttl, |t| t.ttl),
                matching: HoldMatching {
                    reference_only: till.is_none()
                        && cfg.holds.match_by == crate::config::HoldMatch::Reference,
                    window: cfg.holds.match_window,
                },
                ingest: &ingest,
            };
            f(l, &settings)
        })
        .await
}

fn cost_policy_of(cfg: &crate::config::Config) -> Option<CostPolicy> {
    cfg.onec.as_ref().and_then(|o| {
        o.cost_price_type.clone().map(|price_type| CostPolicy {
            price_type,
            backfill: o.cost_backfill,
        })
    })
}

fn hold_id(text: &str) -> Result<i64, Box<Response>> {
    text.parse::<i64>().map_err(|_| {
        Box::new(refuse(
            StatusCode::NOT_FOUND,
            "unknown_hold",
            format!("no hold {text:?}: hold ids are the numbers /v1/holds answered"),
            serde_json::Value::Null,
        ))
    })
}

async fn create(State(ctx): State<JobContext>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = authorized(&ctx, &headers) {
        return *r;
    }
    let mut value = match json_body(body).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let parsed: HoldBody = match serde_json::from_value(value.clone()) {
        Ok(b) => b,
        Err(e) => return invalid(format!("invalid hold request: {e}")),
    };
    let key = match value.as_object_mut().and_then(|o| o.remove("idempotency_key")) {
        Some(serde_json::Value::String(k)) => k,
        _ => return invalid("idempotency_key must be a string"),
    };
    if key.trim().is_empty() || key.len() > 200 {
        return invalid("idempotency_key must be 1..=200 characters");
    }
    let lines = match basket_lines(&parsed.lines) {
        Ok(l) => l,
        Err(e) => return invalid(e),
    };
    let req = HoldRequest {
        idempotency_key: key,
        request: value.to_string(),
        customer: parsed.customer,
        lines,
        points_wanted: parsed.points_wanted,
    };
    with_settings(&ctx, move |l, s| l.hold(req, s)).await
}

async fn show(State(ctx): State<JobContext>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&ctx, &headers) {
        return *r;
    }
    let id = match hold_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let now = ctx.clock.now();
    match ctx.ledger.run(move |l| l.hold_view(id, now)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => hold_error(e),
    }
}

async fn commit(
    State(ctx): State<JobContext>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    if let Err(r) = authorized(&ctx, &headers) {
        return *r;
    }
    let id = match hold_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let value = match json_body(body).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let parsed: CommitBody = match serde_json::from_value(value.clone()) {
        Ok(b) => b,
        Err(e) => return invalid(format!("invalid commit request: {e}")),
    };
    let lines = match basket_lines(&parsed.lines) {
        Ok(l) => l,
        Err(e) => return invalid(e),
    };
    let req = CommitRequest {
        request: value.to_string(),
        lines,
        points: parsed.points,
    };
    with_settings(&ctx, move |l, s| l.commit_hold(id, req, s)).await
}

async fn cancel(State(ctx): State<JobContext>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = authorized(&ctx, &headers) {
        return *r;
    }
    let id = match hold_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let now = ctx.clock.now();
    match ctx.ledger.run(move |l| l.cancel_hold(id, now)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => hold_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(q: serde_json::Value, net: i64) -> LineBody {
        LineBody {
            product_id: "p".into(),
            category: None,
            quantity: q,
            net_kopecks: net,
            unit_cost_kopecks: None,
            service: false,
        }
    }

    #[test]
    fn baskets_are_checked_line_by_line() {
        let check = |lines: Vec<LineBody>, want: Result<usize, &str>| {
            let got = basket_lines(&lines).map(|l| l.len());
            match want {
                Ok(n) => assert_eq!(got, Ok(n)),
                Err(part) => assert!(got.as_ref().is_err_and(|e| e.contains(part)), "{got:?}"),
            }
        };
        check(vec![line("1.5".into(), 100)], Ok(1));
        check(vec![line(2.into(), 100)], Ok(1));
        check(vec![], Err("1..=1000 lines"));
        check(vec![line("0".into(), 100)], Err("lines[1].quantity"));
        check(vec![line(1.5.into(), 100)], Err("lines[1].quantity"));
        check(
            vec![line(1.into(), 100), line(1.into(), -1)],
            Err("lines[2].net_kopecks"),
        );
    }
}
