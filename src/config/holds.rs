//! `[holds]`: two-phase redemption for tills and the site (see ARCHITECTURE.md, "Holds").

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawHolds {
    ttl_seconds: Option<i64>,
    offline_limit_points: Option<i64>,
    #[serde(rename = "match")]
    match_by: Option<String>,
    match_window_minutes: Option<i64>,
}

/// How 1C's later receipt is recognised as the one that used a committed hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldMatch {
    /// The hold id the till put on the receipt (its number or comment) only.
    Reference,
    /// The reference, else the same customer and points within the window of the commit.
    CardPointsTime,
}

#[derive(Clone, Debug)]
pub struct HoldsConfig {
    /// How long a hold reserves points before it releases itself. A till holds while the
    /// cashier finishes the receipt: minutes, not hours, so a forgotten hold frees the points.
    pub ttl: chrono::Duration,
    /// The most a till may redeem on its own while it cannot reach kopilka (documented
    /// policy; the redemption arrives later with 1C's receipt).
    pub offline_limit_points: i64,
    pub match_by: HoldMatch,
    pub match_window: chrono::Duration,
}

/// Longest hold: a reservation that outlives a shift is a lost reservation.
const MAX_TTL_SECONDS: i64 = 86_400;

pub(super) fn holds(raw: &RawHolds, issues: &mut Vec<(String, String)>) -> HoldsConfig {
    let ttl = raw.ttl_seconds.unwrap_or(300);
    if !(10..=MAX_TTL_SECONDS).contains(&ttl) {
        issues.push((
            "holds.ttl_seconds".into(),
            format!("{ttl} is outside 10..={MAX_TTL_SECONDS}"),
        ));
    }
    let offline = raw.offline_limit_points.unwrap_or(0);
    if offline < 0 {
        issues.push((
            "holds.offline_limit_points".into(),
            format!("{offline} is negative"),
        ));
    }
    let match_by = match raw.match_by.as_deref().unwrap_or("card_points_time") {
        "reference" => HoldMatch::Reference,
        "card_points_time" => HoldMatch::CardPointsTime,
        other => {
            issues.push((
                "holds.match".into(),
                format!("{other:?} is not reference or card_points_time"),
            ));
            HoldMatch::CardPointsTime
        }
    };
    let window = raw.match_window_minutes.unwrap_or(120);
    if !(1..=10_080).contains(&window) {
        issues.push((
            "holds.match_window_minutes".into(),
            format!("{window} is outside 1..=10080 (a week)"),
        ));
    }
    HoldsConfig {
        ttl: chrono::Duration::seconds(ttl.clamp(10, MAX_TTL_SECONDS)),
        offline_limit_points: offline.max(0),
        match_by,
        match_window: chrono::Duration::minutes(window.clamp(1, 10_080)),
    }
}
