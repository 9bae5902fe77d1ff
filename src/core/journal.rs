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

/// The stored form of an [`Explanation`]: the same facts under one- and two-letter keys.
/// An accrual's explanation names every line's rule, base, rate and cap; with the long keys
/// that was ≈ 560 bytes a transaction and the journal's largest column (issue 19: the ledger
/// held 3.6 KB per 5-line sale). Only the ledger's column uses it: `history --json`, AmoCRM
/// notes and 1C comments keep the long names. Rows written before it (the long-key JSON, or
/// plain text) are still read.
#[derive(Serialize, Deserialize)]
struct Stored {
    s: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    i: Vec<StoredItem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    f: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct StoredItem {
    r: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cb: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<i64>,
    n: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<String>,
}

impl Explanation {
    /// What the journal's `explanation` column holds.
    pub fn to_stored(&self) -> String {
        let stored = Stored {
            s: self.summary.clone(),
            i: self
                .items
                .iter()
                .map(|x| StoredItem {
                    r: x.rule.clone(),
                    l: x.line,
                    p: x.product.clone(),
                    b: x.base_kopecks,
                    t: x.rate.clone(),
                    c: x.cap.clone(),
                    cb: x.capped_by,
                    m: x.margin_kopecks,
                    n: x.points,
                    o: x.note.clone(),
                })
                .collect(),
            f: self
                .flags
                .iter()
                .map(|f| (f.code.clone(), f.detail.clone()))
                .collect(),
        };
        // a struct of strings and integers always serialises
        serde_json::to_string(&stored).unwrap_or_else(|_| self.summary.clone())
    }

    /// Reads the column in any form it was ever written in: the compact form, the long-key
    /// JSON of earlier versions, or plain text (taken as the summary).
    pub fn from_stored(text: &str) -> Explanation {
        if let Ok(s) = serde_json::from_str::<Stored>(text) {
            return Explanation {
                summary: s.s,
                items: s
                    .i
                    .into_iter()
                    .map(|x| ExplanationItem {
                        rule: x.r,
                        line: x.l,
                        product: x.p,
                        base_kopecks: x.b,
                        rate: x.t,
                        cap: x.c,
                        capped_by: x.cb,
                        margin_kopecks: x.m,
                        points: x.n,
                        note: x.o,
                    })
                    .collect(),
                flags: s
                    .f
                    .into_iter()
                    .map(|(code, detail)| Flag { code, detail })
                    .collect(),
            };
        }
        serde_json::from_str(text).unwrap_or_else(|_| Explanation::text(text))
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    fn accrual() -> Explanation {
        Explanation {
            summary: "1468 points on 29198.25, 1 point = 1.00".into(),
            items: vec![
                ExplanationItem {
                    rule: "coffee-7".into(),
                    line: Some(3),
                    product: Some("P00888".into()),
                    base_kopecks: Some(550_350),
                    rate: Some("7%".into()),
                    cap: Some("max_reward_share_of_margin".into()),
                    capped_by: Some(110),
                    margin_kopecks: Some(91_726),
                    points: 275,
                    note: Some("a note".into()),
                },
                ExplanationItem {
                    rule: "visit-bonus".into(),
                    rate: Some("10 per check".into()),
                    points: 10,
                    ..Default::default()
                },
            ],
            flags: vec![Flag::new("no_margin", "a line with no margin earned nothing")],
        }
    }

    #[test]
    fn the_stored_form_reads_back_as_written_and_is_shorter() {
        let e = accrual();
        let stored = e.to_stored();
        assert_eq!(Explanation::from_stored(&stored), e);
        let long = serde_json::to_string(&e).unwrap();
        assert!(
            stored.len() < long.len(),
            "{} vs {} bytes",
            stored.len(),
            long.len()
        );
        // the common item, a line's rate: its keys were most of it
        let line = Explanation {
            summary: String::new(),
            items: vec![ExplanationItem {
                rule: "base-cashback".into(),
                line: Some(1),
                product: Some("P00962".into()),
                base_kopecks: Some(366_700),
                rate: Some("5%".into()),
                points: 183,
                ..Default::default()
            }],
            flags: vec![],
        };
        let (short, long) = (
            line.to_stored().len(),
            serde_json::to_string(&line).unwrap().len(),
        );
        assert!(short * 10 <= long * 7, "{short} vs {long} bytes");
    }

    #[test]
    fn rows_written_before_the_compact_form_still_read() {
        let e = accrual();
        let long = serde_json::to_string(&e).unwrap();
        assert_eq!(Explanation::from_stored(&long), e);
        assert_eq!(
            Explanation::from_stored("manual correction"),
            Explanation::text("manual correction")
        );
        let text_only = Explanation::text("welcome bonus");
        assert_eq!(Explanation::from_stored(&text_only.to_stored()), text_only);
    }
}
