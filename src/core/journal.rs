//! The vocabulary of the journal: transaction kinds, accounts and explanations.
//!
//! Accounts are in points. A customer's account holds what the shop owes them (the program
//! liability is the sum of all customer accounts); every transaction moves points between a
//! customer and exactly one counter-account, so each transaction sums to zero by construction
//! and `ledger verify` re-checks it from the stored rows.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxKind {
    /// Points earned on a sale.
    Accrual,
    /// Points spent at the till.
    Redemption,
    /// Takes back (part of) an earlier transaction; names the one it reverses.
    Reversal,
    /// Points burnt at the end of their life.
    Expiry,
    /// A person's audited correction (`kopilka adjust`).
    Adjustment,
    /// A balance migrated from the shop's previous program.
    Opening,
    /// Points granted by an event rather than a sale's lines (welcome, birthday, referral).
    Bonus,
    /// Points a customer owed, forgiven by the negative-balance policy.
    WriteOff,
}

impl TxKind {
    pub const ALL: [TxKind; 8] = [
        TxKind::Accrual,
        TxKind::Redemption,
        TxKind::Reversal,
        TxKind::Expiry,
        TxKind::Adjustment,
        TxKind::Opening,
        TxKind::Bonus,
        TxKind::WriteOff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Accrual => "accrual",
            TxKind::Redemption => "redemption",
            TxKind::Reversal => "reversal",
            TxKind::Expiry => "expiry",
            TxKind::Adjustment => "adjustment",
            TxKind::Opening => "opening",
            TxKind::Bonus => "bonus",
            TxKind::WriteOff => "writeoff",
        }
    }

    pub fn parse(s: &str) -> Option<TxKind> {
        TxKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The account on the other side of the customer's.
    pub fn counter_account(self) -> Account {
        match self {
            TxKind::Accrual | TxKind::Bonus | TxKind::WriteOff => Account::Expense,
            TxKind::Redemption => Account::Redemption,
            TxKind::Expiry => Account::Breakage,
            TxKind::Adjustment => Account::Adjustment,
            TxKind::Opening => Account::Opening,
            // A reversal posts against the counter-account of what it reverses.
            TxKind::Reversal => Account::Expense,
        }
    }

    /// Russian name for people (history, AmoCRM notes).
    pub fn label_ru(self) -> &'static str {
        match self {
            TxKind::Accrual => "Начисление",
            TxKind::Redemption => "Списание",
            TxKind::Reversal => "Сторно",
            TxKind::Expiry => "Сгорание",
            TxKind::Adjustment => "Корректировка",
            TxKind::Opening => "Начальный остаток",
            TxKind::Bonus => "Бонус",
            TxKind::WriteOff => "Списание долга",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Account {
    /// Points a customer holds (program liability, per customer).
    Customer,
    /// Program expense: what accruals and bonuses cost.
    Expense,
    /// Points used as payment.
    Redemption,
    /// Expired points (breakage).
    Breakage,
    /// Manual corrections.
    Adjustment,
    /// Migrated opening balances.
    Opening,
}

impl Account {
    pub const ALL: [Account; 6] = [
        Account::Customer,
        Account::Expense,
        Account::Redemption,
        Account::Breakage,
        Account::Adjustment,
        Account::Opening,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Account::Customer => "customer",
            Account::Expense => "expense",
            Account::Redemption => "redemption",
            Account::Breakage => "breakage",
            Account::Adjustment => "adjustment",
            Account::Opening => "opening",
        }
    }

    pub fn parse(s: &str) -> Option<Account> {
        Account::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Why a transaction has the amount it has: stored with the entry, shown by `history`.
/// For accruals the items' points sum exactly to the posted amount.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub summary: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ExplanationItem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplanationItem {
    /// Rule id from the rules file (or a built-in name).
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// The amount the rate applies to, in kopecks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_kopecks: Option<i64>,
    /// The rate as written in the rules (percent, or points per unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Which cap limited the amount, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<String>,
    /// By how many points the cap reduced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capped_by: Option<i64>,
    /// The line's margin (kopecks) the margin cap was measured against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin_kopecks: Option<i64>,
    pub points: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Something about a sale that people should look at, without it being an error:
/// a loss-making line, a redemption without a customer, an unlinked return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    pub code: String,
    pub detail: String,
}

impl Flag {
    pub fn new(code: &str, detail: impl Into<String>) -> Flag {
        Flag {
            code: code.to_string(),
            detail: detail.into(),
        }
    }
}

impl Explanation {
    pub fn text(summary: impl Into<String>) -> Explanation {
        Explanation {
            summary: summary.into(),
            ..Default::default()
        }
    }
}
