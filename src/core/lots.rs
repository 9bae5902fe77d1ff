//! Points lots: where every point a customer holds came from, when it becomes usable and
//! when it burns. Pure planning over plain data; the ledger writes what these functions plan.
//!
//! A customer's holdings are their lots plus a *debt*: points taken back (a return after the
//! points were spent) that no lot could cover. A debt is repaid by the next credit before any
//! new lot is filled, so `balance = Σ lot.remaining − debt` always holds.

use chrono::{DateTime, Utc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lot {
    pub id: i64,
    pub available_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub remaining: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    pub lots: Vec<Lot>,
    /// Points owed by the customer; never negative.
    pub debt: i64,
}

/// Where one customer-side posting goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Lot(i64),
    /// The lot the transaction itself creates.
    NewLot,
    /// The customer's debt: negative = more debt, positive = repaid.
    Debt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub target: Target,
    pub amount: i64,
}

impl Holdings {
    pub fn balance(&self) -> i64 {
        self.lots.iter().map(|l| l.remaining).sum::<i64>() - self.debt
    }

    fn lot_mut(&mut self, id: i64) -> Option<&mut Lot> {
        self.lots.iter_mut().find(|l| l.id == id)
    }

    /// Applies planned moves so the next plan in the same transaction sees them. A new lot
    /// gets `new_lot` as its id (the caller knows it after inserting).
    pub fn apply(&mut self, moves: &[Move], new_lot: Option<Lot>) {
        let mut new_lot = new_lot;
        for m in moves {
            match m.target {
                Target::Lot(id) => {
                    if let Some(l) = self.lot_mut(id) {
                        l.remaining += m.amount;
                    }
                }
                Target::Debt => self.debt -= m.amount,
                Target::NewLot => {
                    if let Some(mut l) = new_lot.take() {
                        l.remaining = m.amount;
                        self.lots.push(l);
                    }
                }
            }
        }
        self.lots.retain(|l| l.remaining > 0);
    }
}

fn usable_at(l: &Lot, at: DateTime<Utc>) -> bool {
    l.available_at <= at && l.expires_at.is_none_or(|e| e > at)
}

/// Takes `amount` points from a customer: first from `prefer` (the lot a reversed accrual
/// created), then FIFO from lots usable at `at` (soonest to expire first), then from any
/// other lot (pending, or past expiry but not yet expired by the nightly job), and what is
/// still missing becomes debt. Redemptions at the till are facts: they are never refused.
pub fn plan_debit(h: &Holdings, amount: i64, prefer: &[i64], at: DateTime<Utc>) -> Vec<Move> {
    let mut left = amount.max(0);
    let mut moves = Vec::new();
    let mut taken: Vec<(i64, i64)> = Vec::new();
    let mut take = |lot: &Lot, left: &mut i64, moves: &mut Vec<Move>| {
        let already = taken.iter().find(|(id, _)| *id == lot.id).map_or(0, |t| t.1);
        let free = lot.remaining - already;
        let n = free.min(*left);
        if n > 0 {
            moves.push(Move {
                target: Target::Lot(lot.id),
                amount: -n,
            });
            *left -= n;
            taken.push((lot.id, n));
        }
    };
    for id in prefer {
        if let Some(l) = h.lots.iter().find(|l| l.id == *id) {
            take(l, &mut left, &mut moves);
        }
    }
    let mut usable: Vec<&Lot> = h.lots.iter().filter(|l| usable_at(l, at)).collect();
    usable.sort_by_key(|l| (l.expires_at.is_none(), l.expires_at, l.available_at, l.id));
    for l in usable {
        take(l, &mut left, &mut moves);
    }
    let mut rest: Vec<&Lot> = h.lots.iter().filter(|l| !usable_at(l, at)).collect();
    rest.sort_by_key(|l| (l.available_at, l.id));
    for l in rest {
        take(l, &mut left, &mut moves);
    }
    if left > 0 {
        moves.push(Move {
            target: Target::Debt,
            amount: -left,
        });
    }
    moves
}

/// Gives `amount` points to a customer: repays debt first, then restores the lots in
/// `restore` (lot id, at most how much) in order, and puts the rest in a new lot.
pub fn plan_credit(h: &Holdings, amount: i64, restore: &[(i64, i64)]) -> Vec<Move> {
    let mut left = amount.max(0);
    let mut moves = Vec::new();
    let repay = h.debt.min(left);
    if repay > 0 {
        moves.push(Move {
            target: Target::Debt,
            amount: repay,
        });
        left -= repay;
    }
    for (id, max) in restore {
        let n = (*max).min(left);
        if n > 0 {
            moves.push(Move {
                target: Target::Lot(*id),
                amount: n,
            });
            left -= n;
        }
    }
    if left > 0 {
        moves.push(Move {
            target: Target::NewLot,
            amount: left,
        });
    }
    moves
}

/// Lots whose expiry has come: (lot id, points to expire).
pub fn plan_expiry(h: &Holdings, now: DateTime<Utc>) -> Vec<(i64, i64)> {
    h.lots
        .iter()
        .filter(|l| l.remaining > 0 && l.expires_at.is_some_and(|e| e <= now))
        .map(|l| (l.id, l.remaining))
        .collect()
}

/// What a customer sees: usable now, still pending, and what burns next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalanceFigures {
    /// Usable points (can be negative while a debt is outstanding).
    pub available: i64,
    /// Earned but inside the return window.
    pub pending: i64,
    /// Points that burn within the warning window.
    pub expiring_soon: i64,
    /// The next date any held points burn, and how many burn then.
    pub next_expiry: Option<(DateTime<Utc>, i64)>,
}

pub fn figures(h: &Holdings, now: DateTime<Utc>, warn_before: chrono::Duration) -> BalanceFigures {
    let mut f = BalanceFigures::default();
    for l in &h.lots {
        if l.available_at <= now {
            f.available += l.remaining;
        } else {
            f.pending += l.remaining;
        }
        if let Some(e) = l.expires_at {
            if e <= now + warn_before {
                f.expiring_soon += l.remaining;
            }
            match &mut f.next_expiry {
                Some((d, n)) if *d == e => *n += l.remaining,
                Some((d, _)) if *d < e => {}
                _ => f.next_expiry = Some((e, l.remaining)),
            }
        }
    }
    f.available -= h.debt;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, day, 0, 0, 0).unwrap()
    }

    fn lot(id: i64, avail: u32, exp: u32, rem: i64) -> Lot {
        Lot {
            id,
            available_at: t(avail),
            expires_at: Some(t(exp)),
            remaining: rem,
        }
    }

    fn check_debit(h: &Holdings, amount: i64, prefer: &[i64], at: u32, expected: &[Move]) {
        assert_eq!(plan_debit(h, amount, prefer, t(at)), expected);
    }

    fn m(target: Target, amount: i64) -> Move {
        Move { target, amount }
    }

    #[test]
    fn debit_takes_preferred_then_fifo_then_pending_then_debt() {
        let h = Holdings {
            lots: vec![lot(1, 1, 20, 10), lot(2, 2, 10, 5), lot(3, 25, 30, 7)],
            debt: 0,
        };
        check_debit(&h, 3, &[], 5, &[m(Target::Lot(2), -3)]);
        check_debit(&h, 8, &[], 5, &[m(Target::Lot(2), -5), m(Target::Lot(1), -3)]);
        check_debit(&h, 4, &[1], 5, &[m(Target::Lot(1), -4)]);
        check_debit(
            &h,
            30,
            &[],
            5,
            &[
                m(Target::Lot(2), -5),
                m(Target::Lot(1), -10),
                m(Target::Lot(3), -7),
                m(Target::Debt, -8),
            ],
        );
        // at day 12 lot 2 is past expiry: used only after usable lots
        check_debit(&h, 12, &[], 12, &[m(Target::Lot(1), -10), m(Target::Lot(2), -2)]);
    }

    #[test]
    fn credit_repays_debt_first_then_restores_then_new_lot() {
        let h = Holdings {
            lots: vec![lot(1, 1, 20, 0)],
            debt: 4,
        };
        assert_eq!(
            plan_credit(&h, 10, &[(1, 3)]),
            vec![m(Target::Debt, 4), m(Target::Lot(1), 3), m(Target::NewLot, 3)]
        );
        assert_eq!(plan_credit(&h, 2, &[]), vec![m(Target::Debt, 2)]);
    }

    #[test]
    fn figures_split_available_pending_and_expiry() {
        let h = Holdings {
            lots: vec![lot(1, 1, 20, 10), lot(2, 2, 10, 5), lot(3, 25, 30, 7)],
            debt: 2,
        };
        let f = figures(&h, t(5), chrono::Duration::days(7));
        assert_eq!(f.available, 13);
        assert_eq!(f.pending, 7);
        assert_eq!(f.expiring_soon, 5);
        assert_eq!(f.next_expiry, Some((t(10), 5)));
        assert_eq!(plan_expiry(&h, t(20)), vec![(1, 10), (2, 5)]);
    }

    #[test]
    fn apply_keeps_balance_identity() {
        let mut h = Holdings {
            lots: vec![lot(1, 1, 20, 10)],
            debt: 0,
        };
        let d = plan_debit(&h, 15, &[], t(5));
        h.apply(&d, None);
        assert_eq!((h.balance(), h.debt), (-5, 5));
        let c = plan_credit(&h, 8, &[]);
        h.apply(&c, Some(lot(9, 5, 30, 0)));
        assert_eq!((h.balance(), h.debt, h.lots.len()), (3, 0, 1));
    }
}
