//! What one sale causes, as one value.
//!
//! The ledger loads the customer's state once — their lots and debt, counters, tier,
//! memberships, the program budget's position, the points a till already took through
//! committed holds — calls [`sale_effects`], and writes the [`SaleEffects`] it gets back.
//! Nothing here reads the store between decisions, so what a sale caused is decided in one
//! place and can be tested without a ledger. Cancelling the sale later reverses exactly the
//! journal transactions written from this value (they carry the document's epoch) and the
//! bookkeeping rows keyed by the document (counters, budget, vouchers, memberships).

use chrono::{DateTime, Duration, Utc};
use rust_decimal::prelude::ToPrimitive;

use super::document::Document;
use super::journal::{Account, Explanation, TxKind};
use super::lots::{self, Holdings, Lot, Move, Target};
use super::money::Money;
use super::program::{CustomerState, Decision, Rules};
use super::rules::{NegativeBalance, TierChange};

/// Dates of the lot a transaction's `Target::NewLot` move fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LotDates {
    pub earned: DateTime<Utc>,
    pub available: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
}

/// One journal transaction a document causes, before the ledger gives it an id. The
/// customer side is `moves`; the ledger posts their opposite to `counter`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTx {
    pub kind: TxKind,
    pub counter: Account,
    pub moves: Vec<Move>,
    pub new_lot: Option<LotDates>,
    pub explanation: Explanation,
    /// Who decided it when it is not the document itself (a policy).
    pub actor: Option<&'static str>,
    /// The rule behind a bonus.
    pub rule: Option<String>,
    /// Whether the transaction belongs to the sale's partner program (a policy write-off
    /// belongs to nobody's).
    pub partner: bool,
}

/// Points a till already spent on this receipt through committed holds: they were taken
/// when the hold was committed and must not be taken again when the receipt arrives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    pub points: i64,
    pub holds: Vec<i64>,
}

/// A stamp or spend counter's share of a sale, stored with the sale so counters follow
/// edits and returns; `prior` is the counter's value before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterShare {
    pub key: String,
    pub amount: i64,
    pub prior: Option<i64>,
}

/// A voucher a full stamp card earned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherGrant {
    pub card: String,
    pub product: String,
    pub valid: Duration,
}

/// A closed program the sale enrols the customer in (or renews).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipGrant {
    pub program: String,
    pub product: String,
    pub term: Option<Duration>,
}

/// Everything one sale causes.
#[derive(Clone, Debug)]
pub struct SaleEffects {
    /// The rules' decision: points per line, kopecks of redemption per line, flags, margin
    /// and loss (what the document row and its lines record).
    pub decision: Decision,
    /// The partner program the sale belongs to (the document's own, else the rules').
    pub partner: Option<String>,
    /// Journal transactions in the order they are written: the redemption, the write-off
    /// the negative-balance policy asks for after it, the accrual, each bonus.
    pub txs: Vec<PlannedTx>,
    /// Points the sale issued (accrual and bonuses), and what they are worth.
    pub issued: i64,
    pub reward_value: Money,
    /// The budget period the sale's margin and reward count in.
    pub budget_period: Option<String>,
    pub counters: Vec<CounterShare>,
    pub vouchers: Vec<VoucherGrant>,
    pub memberships: Vec<MembershipGrant>,
    pub tier: Option<TierChange>,
}

/// The write-off the negative-balance policy asks for once points were taken from a
/// customer whose holdings are now `h`; `None` when nothing is to be forgiven.
pub fn debt_write_off(policy: NegativeBalance, h: &Holdings) -> Option<PlannedTx> {
    let forgive = match policy {
        NegativeBalance::Allow => 0,
        NegativeBalance::Cap(cap) => (h.debt - cap).max(0),
        NegativeBalance::WriteOff => h.debt,
    };
    (forgive > 0).then(|| PlannedTx {
        kind: TxKind::WriteOff,
        counter: Account::Expense,
        moves: vec![Move {
            target: Target::Debt,
            amount: forgive,
        }],
        new_lot: None,
        explanation: Explanation::text(format!(
            "{forgive} owed points written off by the negative-balance policy"
        )),
        actor: Some("policy:negative_balance"),
        rule: None,
        partner: false,
    })
}

/// How explanations name a document: its number where it has one, and always its source id.
pub fn document_label(d: &Document) -> String {
    match &d.number {
        Some(n) => format!("№{n} ({}:{})", d.source.system, d.source.doc_id),
        None => format!("{}:{}", d.source.system, d.source.doc_id),
    }
}

/// Decides everything `doc` causes for a customer in `state` holding `holdings` (`None`
/// customer: an anonymous sale, which still counts in the budget and counters).
pub fn sale_effects(
    rules: &dyn Rules,
    doc: &Document,
    state: &CustomerState,
    holdings: &Holdings,
    committed: &Committed,
    now: DateTime<Utc>,
) -> SaleEffects {
    let decision = rules.evaluate(doc, state, now);
    let partner = doc.partner.clone().or_else(|| decision.partner.clone());
    let mut txs = Vec::new();
    let mut issued = 0;
    if state.customer_id.is_some() {
        // each plan sees the moves before it, as the ledger will when it writes them
        let mut h = holdings.clone();
        let mut placeholder = 0;
        let mut plan = |tx: PlannedTx, h: &mut Holdings, txs: &mut Vec<PlannedTx>| {
            let new_lot = tx.new_lot.map(|d| {
                placeholder -= 1;
                Lot {
                    id: placeholder,
                    available_at: d.available,
                    expires_at: d.expires,
                    remaining: 0,
                }
            });
            h.apply(&tx.moves, new_lot);
            txs.push(tx);
        };
        let redeem = (doc.points_redeemed.0 - committed.points).max(0);
        if redeem > 0 {
            let moves = lots::plan_debit(&h, redeem, &[], doc.occurred_at);
            let summary = if committed.holds.is_empty() {
                format!(
                    "{} points paid at the till on {}",
                    doc.points_redeemed,
                    document_label(doc)
                )
            } else {
                format!(
                    "{} points paid at the till on {}, {} of them already through hold {:?}",
                    doc.points_redeemed,
                    document_label(doc),
                    committed.points,
                    committed.holds
                )
            };
            let tx = PlannedTx {
                kind: TxKind::Redemption,
                counter: Account::Redemption,
                moves,
                new_lot: None,
                explanation: Explanation::text(summary),
                actor: None,
                rule: None,
                partner: true,
            };
            plan(tx, &mut h, &mut txs);
            if let Some(w) = debt_write_off(rules.negative_balance(), &h) {
                plan(w, &mut h, &mut txs);
            }
        }
        let lot = LotDates {
            earned: doc.occurred_at,
            available: decision.available_at.unwrap_or(doc.occurred_at),
            expires: decision.expires_at,
        };
        if decision.accrual > 0 {
            let mut explanation = decision.explanation.clone();
            explanation.flags = decision.flags.clone();
            let tx = PlannedTx {
                kind: TxKind::Accrual,
                counter: Account::Expense,
                moves: lots::plan_credit(&h, decision.accrual, &[]),
                new_lot: Some(lot),
                explanation,
                actor: None,
                rule: None,
                partner: true,
            };
            plan(tx, &mut h, &mut txs);
            issued += decision.accrual;
        }
        for bonus in &decision.bonuses {
            let tx = PlannedTx {
                kind: TxKind::Bonus,
                counter: Account::Expense,
                moves: lots::plan_credit(&h, bonus.points, &[]),
                new_lot: Some(lot),
                explanation: bonus.explanation.clone(),
                actor: None,
                rule: Some(bonus.rule.clone()),
                partner: true,
            };
            plan(tx, &mut h, &mut txs);
            issued += bonus.points;
        }
    }
    let counters = rules
        .counter_contributions(doc, &decision)
        .into_iter()
        .filter(|(_, amount)| *amount != 0)
        .map(|(key, amount)| CounterShare {
            prior: state.counters.get(&key).and_then(|v| v.trunc().to_i64()),
            key,
            amount,
        })
        .collect();
    let rule_set = rules.rule_set();
    let (vouchers, memberships, tier) = if state.customer_id.is_some() {
        let vouchers = decision
            .vouchers
            .iter()
            .map(|(card, product)| VoucherGrant {
                card: card.clone(),
                product: product.clone(),
                valid: rule_set
                    .and_then(|r| r.stamps.iter().find(|s| &s.id == card))
                    .map_or(Duration::days(90), |s| s.voucher_valid),
            })
            .collect();
        let memberships = decision
            .memberships
            .iter()
            .map(|(program, product)| MembershipGrant {
                program: program.clone(),
                product: product.clone(),
                term: rule_set
                    .and_then(|r| r.closed_programs.iter().find(|p| &p.id == program))
                    .and_then(|p| p.term),
            })
            .collect();
        let tier = rules.tier_after_sale(state.tier.as_deref(), state.spend_in_window + doc.total);
        (vouchers, memberships, tier)
    } else {
        (Vec::new(), Vec::new(), None)
    };
    SaleEffects {
        partner,
        txs,
        issued,
        reward_value: Money(issued.saturating_mul(rules.point_value().0)),
        budget_period: rules.budget_period_key(doc.occurred_at),
        counters,
        vouchers,
        memberships,
        tier,
        decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::document::tests::sample;
    use crate::core::money::Points;
    use crate::core::program::FlatPercent;
    use crate::core::rules::RuleSet;
    use chrono::TimeZone;
    use rust_decimal::Decimal;

    fn lot(id: i64, remaining: i64) -> Lot {
        Lot {
            id,
            available_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            expires_at: None,
            remaining,
        }
    }

    fn member() -> CustomerState {
        CustomerState {
            customer_id: Some(1),
            ..Default::default()
        }
    }

    /// What a sale causes under the default 5 % program.
    fn flat(doc: &Document, state: &CustomerState, h: &Holdings, committed: &Committed) -> SaleEffects {
        sale_effects(&FlatPercent::default(), doc, state, h, committed, doc.occurred_at)
    }

    fn moves(tx: &PlannedTx) -> Vec<(Target, i64)> {
        tx.moves.iter().map(|m| (m.target, m.amount)).collect()
    }

    /// What the effects do to the holdings they were planned on, the way the ledger applies
    /// them one transaction after another.
    fn after(h: &Holdings, fx: &SaleEffects) -> Holdings {
        let mut h = h.clone();
        for (i, tx) in fx.txs.iter().enumerate() {
            let new_lot = tx.new_lot.map(|d| Lot {
                id: 1000 + i as i64,
                available_at: d.available,
                expires_at: d.expires,
                remaining: 0,
            });
            h.apply(&tx.moves, new_lot);
        }
        h
    }

    /// 200 points paid on a 1 000 ₽ receipt by a member holding 150: the 50 missing become
    /// debt (the till's payment is a fact), and the 40 points the receipt earns (5 % of the
    /// 800 ₽ paid in money) repay that debt before any lot is filled.
    #[test]
    fn a_redemption_beyond_the_holdings_is_owed_and_the_accrual_repays_it_first() {
        let mut doc = sample();
        doc.points_redeemed = Points(200);
        let h = Holdings {
            lots: vec![lot(7, 150)],
            debt: 0,
        };
        let fx = flat(&doc, &member(), &h, &Committed::default());
        let kinds: Vec<TxKind> = fx.txs.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TxKind::Redemption, TxKind::Accrual]);
        assert_eq!(moves(&fx.txs[0]), [(Target::Lot(7), -150), (Target::Debt, -50)]);
        assert_eq!(fx.txs[0].counter, Account::Redemption);
        assert_eq!(moves(&fx.txs[1]), [(Target::Debt, 40)]);
        assert_eq!((fx.issued, fx.reward_value), (40, Money(4000)));
        let end = after(&h, &fx);
        assert_eq!((end.balance(), end.debt), (150 - 200 + 40, 10));
    }

    /// The same receipt under `negative_balance = "write_off"`: the debt is forgiven right
    /// after the redemption, by the policy (not the sale's partner), and the accrual fills a
    /// new lot with the rules' dates.
    #[test]
    fn the_write_off_policy_forgives_the_debt_between_the_redemption_and_the_accrual() {
        let mut rules = RuleSet::flat(Decimal::from(5), Money(100), Duration::days(14), None);
        rules.negative_balance = NegativeBalance::WriteOff;
        let mut doc = sample();
        doc.points_redeemed = Points(200);
        doc.partner = Some("partner-a".into());
        let h = Holdings {
            lots: vec![lot(7, 150)],
            debt: 0,
        };
        let fx = sale_effects(
            &rules,
            &doc,
            &member(),
            &h,
            &Committed::default(),
            doc.occurred_at,
        );
        let kinds: Vec<TxKind> = fx.txs.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TxKind::Redemption, TxKind::WriteOff, TxKind::Accrual]);
        let w = &fx.txs[1];
        assert_eq!(moves(w), [(Target::Debt, 50)]);
        assert_eq!(
            (w.actor, w.partner, w.counter),
            (Some("policy:negative_balance"), false, Account::Expense)
        );
        assert_eq!(fx.partner.as_deref(), Some("partner-a"));
        let accrual = &fx.txs[2];
        assert!(fx.decision.accrual > 0);
        assert_eq!(moves(accrual), [(Target::NewLot, fx.decision.accrual)]);
        let dates = accrual.new_lot.expect("an accrual fills a new lot");
        assert_eq!(dates.earned, doc.occurred_at);
        assert_eq!(
            dates.available,
            fx.decision.available_at.unwrap_or(doc.occurred_at)
        );
        let end = after(&h, &fx);
        assert_eq!((end.debt, end.balance()), (0, fx.decision.accrual));
    }

    /// Points a till already took through a committed hold are not taken again; a part not
    /// covered is, and its explanation names the hold.
    #[test]
    fn points_a_committed_hold_took_are_taken_once() {
        let mut doc = sample();
        doc.points_redeemed = Points(200);
        let h = Holdings {
            lots: vec![lot(7, 500)],
            debt: 0,
        };
        let all = Committed {
            points: 200,
            holds: vec![3],
        };
        let fx = flat(&doc, &member(), &h, &all);
        assert!(fx.txs.iter().all(|t| t.kind != TxKind::Redemption));
        let part = Committed {
            points: 120,
            holds: vec![3],
        };
        let fx = flat(&doc, &member(), &h, &part);
        assert_eq!(moves(&fx.txs[0]), [(Target::Lot(7), -80)]);
        assert!(
            fx.txs[0]
                .explanation
                .summary
                .contains("120 of them already through hold [3]"),
            "{}",
            fx.txs[0].explanation.summary
        );
    }

    /// A receipt without a member moves no points, grants nothing to anyone, and still
    /// counts in the budget period the rules name.
    #[test]
    fn an_anonymous_sale_moves_no_points() {
        let doc = sample();
        let fx = flat(
            &doc,
            &CustomerState::default(),
            &Holdings::default(),
            &Committed::default(),
        );
        assert!(fx.txs.is_empty());
        assert_eq!((fx.issued, fx.reward_value), (0, Money(0)));
        assert!(fx.vouchers.is_empty() && fx.memberships.is_empty() && fx.tier.is_none());
    }

    /// The ids the plan gives the lots it creates never reach a move (a move names a new lot
    /// as `NewLot`, never by id), and the moves add up to the holdings' change.
    #[test]
    fn planned_moves_never_name_a_placeholder_lot() {
        let mut doc = sample();
        doc.points_redeemed = Points(30);
        let h = Holdings {
            lots: vec![lot(7, 10)],
            debt: 5,
        };
        let fx = flat(&doc, &member(), &h, &Committed::default());
        for tx in &fx.txs {
            for m in &tx.moves {
                if let Target::Lot(id) = m.target {
                    assert!(id > 0, "{tx:?}");
                }
            }
        }
        let end = after(&h, &fx);
        let moved: i64 = fx.txs.iter().flat_map(|t| &t.moves).map(|m| m.amount).sum();
        assert_eq!(end.balance(), h.balance() + moved);
    }
}
