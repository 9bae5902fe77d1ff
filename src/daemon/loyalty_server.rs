//! «Сервер лояльности»: the JSON-over-HTTP loyalty server УНФ 3.0 and Розница 3.0 cashier
//! workplaces (РМК) call, answered from the ledger on the hold → commit core, so a shop sets
//! kopilka's address in «Настройки рабочего места кассира» and changes nothing in 1C.
//!
//! The contract is the one the 1C client code needs, read from УНФ 3.0.8.73
//! (`../shared/specs/onec-till-protocols.md` §2, AlexanderYekat/unf @ 39143e43):
//! - the RMK treats anything but HTTP 200 as a failure and reads JSON into a structure, so
//!   every success is a 200 and numbers are JSON numbers;
//! - parameters come in the raw query string, every key present even when empty, values not
//!   URL-encoded by the code (`+` is a plus: phones), numbers as 1C prints them (`1 500,5`);
//! - `writeoffclientbonuses` and `unlockclientbonuses` succeed only on their exact texts
//!   («Бонусы успешно списаны», «Бонусы разблокированы»);
//! - `useautomaticdiscounts` answers without `Version`, so the RMK finds the card in its own
//!   base (the receipt then names 1C's card, and kopilka's OData poll its customer) and asks
//!   `getclientbonuses` for the balance; `findclientcard` (the newer algorithm) is served too.
//!
//! Ledger terms (§2.5): a read that locks (`getclientbonuses`, or `findclientcard` with
//! `BlockBonuses=1`) holds the card's whole free balance for `hold_minutes`, and while it is
//! held other reads see what is left; `writeoffclientbonuses` commits the hold with
//! `BonusesCount` (money, turned into points by the point value) and `unlockclientbonuses`
//! cancels it. The finished receipt never comes this way: its accrual, and the match of its
//! points to the commit (same card, same points, within `[holds] match_window_minutes`),
//! come with 1C's receipt over OData.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use rust_decimal::Decimal;

use super::JobContext;
use super::holds::{TillHolds, run_with_settings};
use crate::config::LoyaltyServerConfig;
use crate::ledger::{CommitRequest, HoldError, HoldRequest, SpendableView};

/// The idempotency-key prefix of this protocol's holds: its reads find and release only them.
const KEY_PREFIX: &str = "rmk:";
/// What the provider must answer, to the byte, for the RMK to take the write-off (`HS:104-145`).
pub const WRITTEN_OFF: &str = "Бонусы успешно списаны";
/// The same for an unlock (`HS:66-102`).
pub const UNLOCKED: &str = "Бонусы разблокированы";

/// The routes, when `[onec.loyalty_server]` is configured: `PATH/<resource>` and
/// `PATH/<resource>/`, any method (the RMK sends `calculatediscounts` as a GET with a body).
pub fn router(ctx: JobContext) -> Option<Router> {
    let path = ctx.cfg.onec.as_ref()?.loyalty_server.as_ref()?.path.clone();
    Some(
        Router::new()
            .route(&format!("{path}/{{resource}}"), any(handle))
            .route(&format!("{path}/{{resource}}/"), any(handle))
            .with_state(ctx),
    )
}

/// The query string as 1C writes it: `&`-separated `key=value`, values percent-decoded where
/// the platform encoded them, `+` kept (a phone's `+7…` is not a space).
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.trim())
}

/// An amount as 1C's `Строка()` prints it (`1 500,5`, with NBSP or space groups and a decimal
/// comma, or `1500.50`) in kopecks; more than two decimals is not money.
pub fn parse_money(text: &str) -> Option<i64> {
    let clean: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\u{a0}' && *c != '\u{202f}')
        .map(|c| if c == ',' { '.' } else { c })
        .collect();
    let d: Decimal = clean.parse().ok()?;
    let kopecks = d * Decimal::ONE_HUNDRED;
    if !kopecks.fract().is_zero() || d < Decimal::ZERO {
        return None;
    }
    i64::try_from(kopecks).ok()
}

/// Kopecks as a JSON number of rubles (`100` → `1`, `50` → `0.5`): exact, no float.
fn rubles(kopecks: i64) -> String {
    Decimal::new(kopecks, 2).normalize().to_string()
}

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn json(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Basic auth with the configured login and password.
fn authorized(cfg: &LoyaltyServerConfig, headers: &HeaderMap) -> bool {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    cfg.password.matches_basic(&cfg.user, header)
}

/// The customer the till names: by card number, then phone, then e-mail (the RMK fills the
/// ones it has). `Ok(None)`: nobody matches.
async fn find(ctx: &JobContext, params: &[(String, String)]) -> Result<Option<SpendableView>, HoldError> {
    let mut candidates: Vec<String> = Vec::new();
    for key in ["ClientCardID", "Phone", "Email"] {
        let v = param(params, key);
        // `*123`: "phone ending in" — a search, not an identity; kopilka does not guess
        if !v.is_empty() && !v.starts_with('*') {
            candidates.push(v.to_string());
        }
    }
    let now = ctx.clock.now();
    for c in candidates {
        match ctx.ledger.run(move |l| l.spendable(&c, now)).await {
            Ok(v) => return Ok(Some(v)),
            Err(HoldError::UnknownCustomer(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The points shown to the till: with `lock`, the card's free balance is held for this till
/// (nothing held when nothing is free); without, what is free now.
async fn bonus_count(
    ctx: &JobContext,
    ls: &LoyaltyServerConfig,
    who: &SpendableView,
    lock: bool,
) -> Result<i64, HoldError> {
    if !lock || who.free <= 0 {
        return Ok(who.free.max(0));
    }
    let customer = format!("id:{}", who.customer.id);
    let key = format!("{KEY_PREFIX}{}:{}", who.customer.id, uuid::Uuid::new_v4());
    let view = run_with_settings(ctx, Some(TillHolds { ttl: ls.hold }), move |l, s| {
        l.hold(
            HoldRequest {
                idempotency_key: key,
                request: "rmk".into(),
                customer,
                lines: Vec::new(),
                points_wanted: None,
            },
            s,
        )
    })
    .await;
    match view {
        Ok(v) => Ok(v.points),
        // another till took the points between the read and the hold
        Err(HoldError::NothingToHold { .. }) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The share of a receipt points may pay, in percent, for this customer's tier: the guard's
/// `max_redeem_share_of_check` (the RMK pays at most the receipt × this share).
fn payment_percent(ctx: &JobContext, who: &SpendableView) -> String {
    let program = &ctx.cfg.program;
    let share = who
        .tier
        .as_deref()
        .and_then(|t| program.tier(t))
        .and_then(|t| t.max_redeem_share)
        .map_or(program.guard.max_redeem_share_of_check, |s| {
            s.min(program.guard.max_redeem_share_of_check)
        });
    (share * Decimal::ONE_HUNDRED).normalize().to_string()
}

fn bonus_data(ctx: &JobContext, who: &SpendableView, points: i64) -> String {
    format!(
        "\"BonusCount\":{points},\"BonusRate\":{},\"PaymentPercent\":{}",
        rubles(ctx.cfg.program.point_value.0),
        payment_percent(ctx, who)
    )
}

async fn handle(
    State(ctx): State<JobContext>,
    Path(resource): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    _body: Body,
) -> Response {
    let Some(ls) = ctx.cfg.onec.as_ref().and_then(|o| o.loyalty_server.clone()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(&ls, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"kopilka\", charset=\"UTF-8\"",
            )],
            "",
        )
            .into_response();
    }
    let params = parse_query(query.as_deref().unwrap_or(""));
    let resource = resource.to_ascii_lowercase();
    let result = match resource.as_str() {
        "ping" => Ok(text(StatusCode::OK, "ok")),
        // no `Version`: the RMK finds cards in its own base, so its receipts name 1C's card
        "useautomaticdiscounts" => Ok(json(r#"{"Error":false,"UseAutomaticDiscounts":false}"#.into())),
        // pricing only; kopilka computes no discounts at the till
        "calculatediscounts" => Ok(json("{}".into())),
        "getclientbonuses" => get_client_bonuses(&ctx, &ls, &params).await,
        "findclientcard" => find_client_card(&ctx, &ls, &params).await,
        "writeoffclientbonuses" => write_off(&ctx, &ls, &params).await,
        "unlockclientbonuses" => unlock(&ctx, &params).await,
        "issueclientcard" => Ok(json(format!(
            "{{\"Error\":true,\"ErrorMessage\":{}}}",
            quoted(
                "kopilka не выпускает карты: выпустите карту в 1С, kopilka узнает о ней при следующем опросе"
            )
        ))),
        other => Ok(text(
            StatusCode::NOT_FOUND,
            &format!("kopilka does not serve the loyalty-server resource {other:?}"),
        )),
    };
    result.unwrap_or_else(|e| {
        tracing::error!(resource = %resource, error = %e, "loyalty server request failed");
        text(StatusCode::SERVICE_UNAVAILABLE, &format!("kopilka: {e}"))
    })
}

async fn get_client_bonuses(
    ctx: &JobContext,
    ls: &LoyaltyServerConfig,
    params: &[(String, String)],
) -> Result<Response, HoldError> {
    let Some(who) = find(ctx, params).await? else {
        return Ok(json(r#"{"Error":false,"ClientNotFound":true}"#.into()));
    };
    // the reference provider locks on this read (PDU:1815-1823); `BlockBonuses=0` does not
    let lock = param(params, "BlockBonuses") != "0";
    let points = bonus_count(ctx, ls, &who, lock).await?;
    Ok(json(format!(
        "{{\"Error\":false,\"ClientNotFound\":false,{}}}",
        bonus_data(ctx, &who, points)
    )))
}

async fn find_client_card(
    ctx: &JobContext,
    ls: &LoyaltyServerConfig,
    params: &[(String, String)],
) -> Result<Response, HoldError> {
    let Some(who) = find(ctx, params).await? else {
        return Ok(json(r#"{"Error":false,"LoyaltyCardsList":[]}"#.into()));
    };
    let lock = matches!(param(params, "BlockBonuses"), "1" | "Да" | "true");
    let points = bonus_count(ctx, ls, &who, lock).await?;
    let c = &who.customer;
    let card = c.card.clone().unwrap_or_default();
    let card_guid = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("kopilka-card:{card}").as_bytes(),
    );
    Ok(json(format!(
        "{{\"Error\":false,\"LoyaltyCardsList\":[{{\"Barcode\":{},\"MagneticCode\":\"\",\"CardGUID\":{},\
         \"ClientName\":{},\"Phone\":{},\"Email\":{},\"DateOfBirth\":\"0001-01-01T00:00:00\",\"IsPerson\":true,\
         \"SearchType\":\"ClientCardID\",\"BonusData\":{{{}}}}}]}}",
        quoted(&card),
        quoted(&card_guid.to_string()),
        quoted(c.name.as_deref().unwrap_or("")),
        quoted(c.phone.as_deref().unwrap_or("")),
        quoted(c.email.as_deref().unwrap_or("")),
        bonus_data(ctx, &who, points)
    )))
}

/// The till paid `BonusesCount` rubles with points: the card's hold is committed with that
/// many points (a write-off with no live hold spends from the free balance directly), and the
/// rest of its holds are released. Anything but the exact success text makes the RMK unlock.
async fn write_off(
    ctx: &JobContext,
    ls: &LoyaltyServerConfig,
    params: &[(String, String)],
) -> Result<Response, HoldError> {
    let refuse = |why: String| {
        tracing::warn!(reason = %why, "loyalty server write-off refused");
        Ok(text(StatusCode::CONFLICT, &why))
    };
    let Some(who) = find(ctx, params).await? else {
        return refuse("Карта не найдена в kopilka".into());
    };
    let amount = param(params, "BonusesCount");
    let Some(kopecks) = parse_money(amount) else {
        return refuse(format!("BonusesCount {amount:?} не сумма"));
    };
    let pv = ctx.cfg.program.point_value.0.max(1);
    // as the receipt's points are read over OData: whole points, rounded down
    let points = kopecks / pv;
    if points <= 0 {
        return refuse(format!("BonusesCount {amount:?} меньше одного балла"));
    }
    let customer_id = who.customer.id;
    let now = ctx.clock.now();
    let till = Some(TillHolds { ttl: ls.hold });
    let committed = run_with_settings(ctx, till, move |l, s| {
        let live = l.live_holds(customer_id, KEY_PREFIX, now)?;
        let hold = match live.iter().find(|(_, p)| *p >= points) {
            Some((id, _)) => *id,
            None => {
                // no hold covers it (expired, or never read with a lock): spend what is free,
                // the holds of this card included
                for (id, _) in &live {
                    l.cancel_hold(*id, now)?;
                }
                let key = format!("{KEY_PREFIX}{customer_id}:{}", uuid::Uuid::new_v4());
                let v = l.hold(
                    HoldRequest {
                        idempotency_key: key,
                        request: "rmk".into(),
                        customer: format!("id:{customer_id}"),
                        lines: Vec::new(),
                        points_wanted: Some(points),
                    },
                    s,
                )?;
                v.hold_id
                    .parse()
                    .map_err(|_| HoldError::Invalid(format!("hold id {:?}", v.hold_id)))?
            }
        };
        let view = l.commit_hold(
            hold,
            CommitRequest {
                request: format!("rmk:{points}"),
                lines: Vec::new(),
                points: Some(points),
            },
            s,
        )?;
        for (id, _) in l.live_holds(customer_id, KEY_PREFIX, now)? {
            l.cancel_hold(id, now)?;
        }
        Ok(view)
    })
    .await;
    match committed {
        Ok(v) => {
            tracing::info!(customer = customer_id, points, hold = %v.hold_id, "till wrote off points");
            Ok(text(StatusCode::OK, WRITTEN_OFF))
        }
        Err(HoldError::Ledger(e)) => Err(HoldError::Ledger(e)),
        Err(e) => refuse(format!("Бонусы не списаны: {e}")),
    }
}

/// The till let the card go (receipt cleared or paid without points): its holds are
/// released. Nothing held, or an unknown card, is no error for the till.
async fn unlock(ctx: &JobContext, params: &[(String, String)]) -> Result<Response, HoldError> {
    if let Some(who) = find(ctx, params).await? {
        let id = who.customer.id;
        let now = ctx.clock.now();
        ctx.ledger
            .run(move |l| -> Result<(), HoldError> {
                for (hold, _) in l.live_holds(id, KEY_PREFIX, now)? {
                    l.cancel_hold(hold, now)?;
                }
                Ok(())
            })
            .await?;
    }
    Ok(text(StatusCode::OK, UNLOCKED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_keep_their_plus_and_decode_the_rest() {
        let p = parse_query(
            "ClientCardID=&Phone=+79161234567&Email=a%40b.ru&BonusesCount=1%C2%A0500,5&Client=%D0%98",
        );
        assert_eq!(param(&p, "Phone"), "+79161234567");
        assert_eq!(param(&p, "email"), "a@b.ru");
        assert_eq!(param(&p, "ClientCardID"), "");
        assert_eq!(param(&p, "Client"), "И");
        assert_eq!(parse_money(param(&p, "BonusesCount")), Some(150_050));
    }

    #[test]
    fn amounts_read_as_1c_prints_them() {
        for (text, want) in [
            ("150", Some(15_000)),
            ("150,5", Some(15_050)),
            ("1 500,25", Some(150_025)),
            ("1\u{a0}500", Some(150_000)),
            ("0", Some(0)),
            ("1.005", None),
            ("-5", None),
            ("много", None),
            ("", None),
        ] {
            assert_eq!(parse_money(text), want, "{text:?}");
        }
        assert_eq!(rubles(100), "1");
        assert_eq!(rubles(50), "0.5");
        assert_eq!(rubles(1), "0.01");
    }
}
