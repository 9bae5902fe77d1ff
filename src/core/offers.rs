//! Personal offers from purchase history, and RFM segments.
//!
//! A loyalty program is permission to use purchase history: a customer who buys coffee is
//! offered the honey that coffee buyers also take. "Bought together" statistics are counted
//! over baskets (one sale = one basket of distinct products): support, confidence and lift
//! per ordered pair. A customer's offer is an item they have not bought recently, most
//! likely to go with what they do buy, ranked by **expected margin** (confidence × the
//! item's average margin per unit) — an offer should sell something profitable, so an item
//! whose average margin is not positive is never offered.

use std::collections::{BTreeMap, HashSet};

use rust_decimal::Decimal;
use serde::Serialize;

use super::money::Money;

/// Counts for one item across all baskets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemStat {
    pub item: String,
    /// Baskets containing the item.
    pub baskets: i64,
    /// Units sold with a known cost, and the margin they made (kopecks).
    pub margin_units: i64,
    pub margin: i64,
}

impl ItemStat {
    /// Average margin per unit, when any unit had a known cost.
    pub fn unit_margin(&self) -> Option<Decimal> {
        (self.margin_units > 0).then(|| Decimal::from(self.margin) / Decimal::from(self.margin_units))
    }
}

/// How often `b` was in a basket with `a`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairStat {
    pub a: String,
    pub b: String,
    pub together: i64,
}

#[derive(Clone, Copy, Debug)]
pub struct OfferParams {
    /// Baskets a pair must share before it is evidence.
    pub min_together: i64,
    pub min_confidence: Decimal,
    /// Lift above 1 means "more often together than by chance".
    pub min_lift: Decimal,
}

impl Default for OfferParams {
    fn default() -> Self {
        OfferParams {
            min_together: 3,
            min_confidence: Decimal::new(5, 2),
            min_lift: Decimal::new(11, 1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub item: String,
    /// The item the customer buys that this one goes with.
    pub because: String,
    pub together: i64,
    pub baskets_with_because: i64,
    pub support: Decimal,
    pub confidence: Decimal,
    pub lift: Decimal,
    pub expected_margin_kopecks: i64,
}

/// Ranks offers for a customer who buys `bought` and bought `recent` lately.
/// `pairs` are pairs `(a, b)` with `a` in `bought`; `stats` holds every item named.
pub fn recommend(
    total_baskets: i64,
    bought: &[String],
    recent: &HashSet<String>,
    pairs: &[PairStat],
    stats: &BTreeMap<String, ItemStat>,
    params: OfferParams,
) -> Vec<Offer> {
    let mut best: BTreeMap<&str, Offer> = BTreeMap::new();
    if total_baskets <= 0 {
        return Vec::new();
    }
    let n = Decimal::from(total_baskets);
    for p in pairs {
        if !bought.contains(&p.a)
            || bought.contains(&p.b)
            || recent.contains(&p.b)
            || p.together < params.min_together
        {
            continue;
        }
        let (Some(a), Some(b)) = (stats.get(&p.a), stats.get(&p.b)) else {
            continue;
        };
        if a.baskets <= 0 || b.baskets <= 0 {
            continue;
        }
        let Some(unit_margin) = b.unit_margin().filter(|m| *m > Decimal::ZERO) else {
            continue;
        };
        let confidence = Decimal::from(p.together) / Decimal::from(a.baskets);
        let lift = confidence / (Decimal::from(b.baskets) / n);
        if confidence < params.min_confidence || lift < params.min_lift {
            continue;
        }
        let expected = (confidence * unit_margin).floor();
        let offer = Offer {
            item: p.b.clone(),
            because: p.a.clone(),
            together: p.together,
            baskets_with_because: a.baskets,
            support: (Decimal::from(p.together) / n).round_dp(4),
            confidence: confidence.round_dp(4),
            lift: lift.round_dp(3),
            expected_margin_kopecks: rust_decimal::prelude::ToPrimitive::to_i64(&expected).unwrap_or(0),
        };
        match best.get(p.b.as_str()) {
            Some(o) if o.expected_margin_kopecks >= offer.expected_margin_kopecks => {}
            _ => {
                best.insert(p.b.as_str(), offer);
            }
        }
    }
    let mut out: Vec<Offer> = best.into_values().collect();
    out.sort_by(|x, y| {
        y.expected_margin_kopecks
            .cmp(&x.expected_margin_kopecks)
            .then(y.lift.cmp(&x.lift))
            .then(x.item.cmp(&y.item))
    });
    out
}

/// RFM segments, with the Russian names managers filter on in AmoCRM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    New,
    Champions,
    Regular,
    Occasional,
    AtRisk,
    Lost,
}

impl Segment {
    pub const ALL: [Segment; 6] = [
        Segment::New,
        Segment::Champions,
        Segment::Regular,
        Segment::Occasional,
        Segment::AtRisk,
        Segment::Lost,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Segment::New => "new",
            Segment::Champions => "champions",
            Segment::Regular => "regular",
            Segment::Occasional => "occasional",
            Segment::AtRisk => "at_risk",
            Segment::Lost => "lost",
        }
    }

    pub fn label_ru(self) -> &'static str {
        match self {
            Segment::New => "новый",
            Segment::Champions => "чемпион",
            Segment::Regular => "постоянный",
            Segment::Occasional => "разовый",
            Segment::AtRisk => "в зоне риска",
            Segment::Lost => "потерянный",
        }
    }

    pub fn parse(code: &str) -> Option<Segment> {
        Segment::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// Recency, frequency and monetary value of a customer (over the last 365 days).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfm {
    pub days_since_last: i64,
    pub days_since_first: i64,
    pub purchases_365: i64,
    pub spend_365: Money,
}

/// Fixed, documented thresholds: new = first purchase within 30 days and only one;
/// lost = nothing for 180 days; at risk = nothing for 60; champions = 6+ purchases and
/// 30 000 ₽+ a year; regular = 2+ purchases; otherwise occasional.
pub fn segment(r: Rfm) -> Segment {
    if r.days_since_first <= 30 && r.purchases_365 <= 1 {
        Segment::New
    } else if r.days_since_last > 180 {
        Segment::Lost
    } else if r.days_since_last > 60 {
        Segment::AtRisk
    } else if r.purchases_365 >= 6 && r.spend_365 >= Money(3_000_000) {
        Segment::Champions
    } else if r.purchases_365 >= 2 {
        Segment::Regular
    } else {
        Segment::Occasional
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(item: &str, baskets: i64, units: i64, margin: i64) -> (String, ItemStat) {
        (
            item.to_string(),
            ItemStat {
                item: item.into(),
                baskets,
                margin_units: units,
                margin,
            },
        )
    }

    fn pair(a: &str, b: &str, n: i64) -> PairStat {
        PairStat {
            a: a.into(),
            b: b.into(),
            together: n,
        }
    }

    #[test]
    fn the_profitable_likely_item_not_bought_recently_wins() {
        let stats: BTreeMap<String, ItemStat> = [
            stat("coffee", 100, 100, 10_000),
            stat("honey", 40, 40, 8_000),
            stat("sugar", 50, 50, 100),
            stat("loss", 45, 45, -500),
            stat("cup", 5, 5, 50_000),
        ]
        .into_iter()
        .collect();
        let pairs = vec![
            pair("coffee", "honey", 30),
            pair("coffee", "sugar", 40),
            pair("coffee", "loss", 40),
            pair("coffee", "cup", 2),
        ];
        let offers = recommend(
            1000,
            &["coffee".into()],
            &HashSet::new(),
            &pairs,
            &stats,
            OfferParams::default(),
        );
        let items: Vec<&str> = offers.iter().map(|o| o.item.as_str()).collect();
        // honey: confidence 0.3 × 2.00 ₽ a unit beats sugar's 0.4 × 0.02 ₽; a loss-maker and
        // a pair with too little evidence are never offered
        assert_eq!(items, ["honey", "sugar"]);
        assert_eq!(offers[0].expected_margin_kopecks, 60);
        assert_eq!(offers[0].lift, Decimal::new(75, 1));
        let recent: HashSet<String> = ["honey".to_string()].into();
        let offers = recommend(
            1000,
            &["coffee".into()],
            &recent,
            &pairs,
            &stats,
            OfferParams::default(),
        );
        assert_eq!(offers[0].item, "sugar");
    }

    #[test]
    fn segments_follow_the_documented_thresholds() {
        let r = |last, first, n, spend| Rfm {
            days_since_last: last,
            days_since_first: first,
            purchases_365: n,
            spend_365: Money(spend),
        };
        assert_eq!(segment(r(5, 5, 1, 1000)), Segment::New);
        assert_eq!(segment(r(5, 300, 8, 5_000_000)), Segment::Champions);
        assert_eq!(segment(r(5, 300, 3, 100_000)), Segment::Regular);
        assert_eq!(segment(r(40, 300, 1, 100_000)), Segment::Occasional);
        assert_eq!(segment(r(90, 300, 3, 100_000)), Segment::AtRisk);
        assert_eq!(segment(r(200, 300, 0, 0)), Segment::Lost);
    }
}
