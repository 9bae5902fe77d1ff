//! The vocabulary of the journal: transaction kinds, accounts and explanations.
//!
//! Accounts are in points. A customer's account holds what the shop owes them (the program
//! liability is the sum of all customer accounts); every transaction moves points between a
//! customer and exactly one counter-account, so each transaction sums to zero by construction
//! and `ledger verify` re-checks it from the stored rows.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
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
    /// Absent only on an item left to its line (`e`) that earned what the line holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<String>,
    /// `1`: the product and base (and, unless written here, the points and number) are the
    /// named line's own, which the document's stored line holds; they are not repeated here
    /// (see [`LineFacts`]). `3`: the margin too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<u8>,
}

/// What a document's line says of itself that an explanation item naming the line repeats:
/// the product and the money paid for it. An accrual names every line with both (≈ 90 of its
/// ≈ 220 packed bytes, the journal's largest column; issue 19), and the ledger holds them in
/// `document_line_rows` anyway. So an item whose product and base are exactly its line's is
/// stored with a mark instead of the two values, and filled from the line when read. Only a
/// document's own lines, while they are the ones the entry was made against: the ledger
/// writes the values back into the stored explanation before a new version replaces them.
///
/// Since the seventh part of issue 19 the points a sale's item earned are left to the line
/// too (the line's `points` holds exactly what its item earned), and so is the item's line
/// number when it is the one after the previous item's, and the margin a capped item was
/// measured against when it is the line's own (its margin less the points paid on it):
/// together ≈ 40 packed bytes of an accrual. An item left to its line is marked `e` (1; 3 when its
/// margin is left too); its number is written only when it is not the next one, its points
/// only when they differ from the line's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineFacts {
    pub product: String,
    pub net: i64,
    /// The points the line holds (`document_line_rows.points`).
    pub points: i64,
    /// The line's margin less the points paid on it (`rules::margin_of`), `None` when its
    /// cost is unknown: what the margin cap measures a line by.
    pub margin: Option<i64>,
}

/// What the writer knows of a line an item may name, as [`LineFacts`] holds it when read back.
#[derive(Clone, Copy, Debug)]
pub struct LineOwn<'a> {
    pub product: &'a str,
    pub net: i64,
    pub points: i64,
    pub margin: Option<i64>,
}

/// The mark of an item left to its line (`StoredItem::e`): its product, base, points and
/// number are the line's; with [`MARGIN_LEFT`] its margin too.
const LEFT: u8 = 1;
const MARGIN_LEFT: u8 = 2;

impl Explanation {
    /// What the journal's `explanation` column holds.
    pub fn to_stored(&self) -> String {
        self.to_stored_against(|_| None)
    }

    /// The stored form, leaving out of every item what `line` says its line holds (see
    /// [`LineFacts`]); an item whose values differ from its line's keeps them.
    pub fn to_stored_against<'a>(&self, line: impl Fn(u32) -> Option<LineOwn<'a>>) -> String {
        let mut previous = 0u32;
        let stored = Stored {
            s: self.summary.clone(),
            i: self
                .items
                .iter()
                .map(|x| {
                    let facts = x
                        .line
                        .and_then(&line)
                        .filter(|f| x.product.as_deref() == Some(f.product) && x.base_kopecks == Some(f.net));
                    let own = facts.is_some();
                    let margin_own =
                        facts.is_some_and(|f| x.margin_kopecks.is_some() && x.margin_kopecks == f.margin);
                    // the number is implied only for an item left to its line (`e`)
                    let next = own && x.line == previous.checked_add(1);
                    previous = x.line.unwrap_or(previous);
                    StoredItem {
                        r: x.rule.clone(),
                        l: if next { None } else { x.line },
                        p: if own { None } else { x.product.clone() },
                        b: if own { None } else { x.base_kopecks },
                        t: x.rate.clone(),
                        c: x.cap.clone(),
                        cb: x.capped_by,
                        m: if margin_own { None } else { x.margin_kopecks },
                        n: match facts {
                            Some(f) if f.points == x.points => None,
                            _ => Some(x.points),
                        },
                        o: x.note.clone(),
                        e: own.then_some(if margin_own { LEFT | MARGIN_LEFT } else { LEFT }),
                    }
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
    /// JSON of earlier versions, or plain text (taken as the summary). Items stored against
    /// their line read without product and base: see [`Explanation::from_stored_with`].
    pub fn from_stored(text: &str) -> Explanation {
        Explanation::from_stored_with(text, |_| None)
    }

    /// Reads the column, taking the product and base an item left to its line from `line`
    /// (the document's stored lines). `line` is asked only for such items, so a reader can
    /// load the lines lazily; an item whose line it does not give reads without them.
    pub fn from_stored_with(text: &str, mut line: impl FnMut(u32) -> Option<LineFacts>) -> Explanation {
        if let Ok(s) = serde_json::from_str::<Stored>(text) {
            let mut previous = 0u32;
            return Explanation {
                summary: s.s,
                items: s
                    .i
                    .into_iter()
                    .map(|x| {
                        // an item left to its line without a number names the next line
                        let number = x.l.or_else(|| x.e.and_then(|_| previous.checked_add(1)));
                        previous = number.unwrap_or(previous);
                        let facts = x.e.zip(number).and_then(|(_, l)| line(l));
                        let points = x.n.or(facts.as_ref().map(|f| f.points)).unwrap_or(0);
                        let margin_kopecks = match x.e {
                            Some(e) if e & MARGIN_LEFT != 0 => facts.as_ref().and_then(|f| f.margin),
                            _ => x.m,
                        };
                        let (product, base_kopecks) = match facts {
                            Some(f) => (Some(f.product), Some(f.net)),
                            None => (x.p, x.b),
                        };
                        ExplanationItem {
                            rule: x.r,
                            line: number,
                            product,
                            base_kopecks,
                            rate: x.t,
                            cap: x.c,
                            capped_by: x.cb,
                            margin_kopecks,
                            points,
                            note: x.o,
                        }
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

/// The first byte of a packed explanation: which dictionary it was deflated against. A new
/// dictionary gets a new tag; the text of this one never changes, or rows written with it
/// would no longer read.
const PACKED_V1: u8 = 1;

/// What explanations are made of, as deflate's preset dictionary: kopilka's own words only
/// (the stored form's keys, cap and flag codes, the summaries' fixed phrases) — nothing of a
/// shop's rules or catalogue, so every ledger compresses alike. With it an accrual's
/// explanation takes ≈ 200 bytes instead of ≈ 650 (issue 19: it was the journal's largest
/// column, a quarter of the ledger). Deflate reaches back 32 KiB, so all of it is in reach;
/// the commonest pieces stand last, where matches are cheapest.
const DICTIONARY_V1: &str = concat!(
    "opening balance:  points from  burning on  (line ",
    "stamp card : every  →  points",
    " owed points written off by the negative-balance policy",
    " points paid with on sale  given back for the return ",
    " points taken back for goods returned by  (sale ",
    " points taken back by the return  (sale ",
    " points paid through hold ",
    " points paid at the till on sale ",
    ") cancelled: ",
    "{\"s\":\"welcome bonus for joining: 100 points\"}",
    "{\"s\":\"no customer on the document: nothing earned\"}",
    "{\"s\":\"spend of 10000.00 reached within 30 days: 200 points\"}",
    "{\"s\":\"100 points reached their expiry date\"}",
    "{\"s\":\"welcome bonus for the first purchase: 100 points\"}",
    "[\"velocity\",\"2 sales by this customer today (limit 1)\"]",
    "[\"redemption_without_customer\",\" points paid without a customer to take them from\"]",
    "[\"redemption_over_share\",\" paid with points is more than 30% of the check\"]",
    "[\"loss_maker\",\"points paid at the till took lines  below cost + markup ( below cost)\"]",
    "[\"budget_capped\",\" points not issued: the program budget for the period is spent\"]",
    "],\"f\":[[\"no_margin\",\"a line with no margin earned nothing\"]]}",
    ",\"c\":\"max_reward_share_of_margin of the check; program budget\",\"cb\":",
    "{\"r\":\"visit\",\"t\":\"10 per check\",\"n\":10}]}",
    ",\"c\":\"margin_not_positive\",\"cb\":0,\"m\":-0,\"n\":0},",
    ",\"c\":\"max_reward_share_of_margin\",\"cb\":0,\"m\":0,\"n\":0},",
    "{\"s\":\"100 points on 1000.00 (tier  × 1.5), 1 point = 1.00\",\"i\":[",
    "{\"r\":\"base-cashback\",\"l\":1,\"p\":\"\",\"b\":100000,\"t\":\"5% × 1.25\",\"n\":0},",
    "{\"r\":\"\",\"l\":2,\"p\":\"\",\"b\":100000,\"t\":\"7% × 1.5\",\"n\":0},",
);

thread_local! {
    /// Deflate's state is ≈ 300 KiB to set up; one per thread, reset between explanations.
    static PACKER: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
}

impl Explanation {
    /// What the journal's `explanation` column holds: the compact form, deflated against
    /// [`DICTIONARY_V1`] and tagged. Rows written before (text) still read: see
    /// [`Explanation::from_packed`]. `None` only if deflate fails, which on bytes in memory
    /// is a bug: the caller stores the compact text instead (`to_stored`), which reads too.
    pub fn pack(&self) -> Option<Vec<u8>> {
        self.pack_against(|_| None)
    }

    /// Packs the stored form made against the document's lines ([`Explanation::to_stored_against`]).
    pub fn pack_against<'a>(&self, line: impl Fn(u32) -> Option<LineOwn<'a>>) -> Option<Vec<u8>> {
        let text = self.to_stored_against(line);
        let mut out = Vec::with_capacity(text.len() + 64);
        out.push(PACKED_V1);
        PACKER.with(|p| {
            let mut p = p.borrow_mut();
            p.reset();
            p.set_dictionary(DICTIONARY_V1.as_bytes()).ok()?;
            loop {
                let consumed = usize::try_from(p.total_in()).ok()?;
                match p.compress_vec(text.as_bytes().get(consumed..)?, &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => return Some(out),
                    Ok(_) if out.capacity() < 1 << 22 => out.reserve(text.len().max(64)),
                    _ => return None,
                }
            }
        })
    }

    /// Reads a packed explanation. A blob that does not inflate (a damaged file) reads as a
    /// sentence saying so, never a panic. Text rows (every version before) go through
    /// [`Explanation::from_stored`].
    pub fn from_packed(bytes: &[u8]) -> Explanation {
        Explanation::from_packed_with(bytes, |_| None)
    }

    /// Reads a packed explanation, filling items stored against their line from `line` (as
    /// [`Explanation::from_stored_with`]).
    pub fn from_packed_with(bytes: &[u8], line: impl FnMut(u32) -> Option<LineFacts>) -> Explanation {
        match Explanation::inflate(bytes) {
            Some(text) => Explanation::from_stored_with(&text, line),
            None => Explanation::text("(the stored explanation could not be read)"),
        }
    }

    fn inflate(bytes: &[u8]) -> Option<String> {
        let (&tag, body) = bytes.split_first()?;
        if tag != PACKED_V1 {
            return None;
        }
        let mut d = Decompress::new(false);
        d.set_dictionary(DICTIONARY_V1.as_bytes()).ok()?;
        let mut out = Vec::with_capacity(body.len() * 4 + 64);
        loop {
            let (read, written) = (d.total_in(), d.total_out());
            let rest = body.get(read as usize..)?;
            if d.decompress_vec(rest, &mut out, FlushDecompress::Finish).ok()? == Status::StreamEnd {
                break;
            }
            if out.len() == out.capacity() {
                // an explanation is a few KiB at most; a bomb stops at 1 MiB
                if out.capacity() >= 1 << 20 {
                    return None;
                }
                out.reserve(out.capacity());
            } else if (d.total_in(), d.total_out()) == (read, written) {
                return None; // cut short
            }
        }
        String::from_utf8(out).ok()
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    /// The per-check part of an accrual: no line, a fixed rate.
    fn visit_bonus() -> ExplanationItem {
        ExplanationItem {
            rule: "visit-bonus".into(),
            rate: Some("10 per check".into()),
            points: 10,
            ..Default::default()
        }
    }

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
                visit_bonus(),
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
    fn a_packed_explanation_reads_back_as_written_in_a_third_of_the_bytes() {
        // an accrual as the bench's program writes it: five lines under two rules and caps
        let line =
            |l: u32, rule: &str, base: i64, rate: &str, cap: Option<&str>, points: i64| ExplanationItem {
                rule: rule.into(),
                line: Some(l),
                product: Some(format!("P0{l}4{l}7")),
                base_kopecks: Some(base),
                rate: Some(rate.into()),
                cap: cap.map(Into::into),
                capped_by: cap.map(|_| 213),
                margin_kopecks: cap.map(|_| 15_388),
                points,
                note: None,
            };
        let e = Explanation {
            summary: "1922 points on 33407.21 (tier Золотой × 1.5), 1 point = 1.00".into(),
            items: vec![
                line(1, "base-cashback", 413_100, "5% × 1.5", None, 309),
                line(
                    2,
                    "base-cashback",
                    346_221,
                    "5% × 1.5",
                    Some("max_reward_share_of_margin"),
                    46,
                ),
                line(
                    3,
                    "coffee-7",
                    891_600,
                    "7% × 1.5",
                    Some("max_reward_share_of_margin"),
                    561,
                ),
                line(
                    4,
                    "base-cashback",
                    693_800,
                    "5% × 1.5",
                    Some("margin_not_positive"),
                    0,
                ),
                line(5, "coffee-7", 996_000, "7% × 1.5", None, 747),
                visit_bonus(),
            ],
            flags: vec![Flag::new("no_margin", "a line with no margin earned nothing")],
        };
        let packed = e.pack().unwrap();
        assert_eq!(packed[0], PACKED_V1);
        assert_eq!(Explanation::from_packed(&packed), e);
        let stored = e.to_stored().len();
        assert!(
            packed.len() * 5 <= stored * 2,
            "{} of {stored} bytes",
            packed.len()
        );
        // the short ones too, and twice in a row on one thread (the packer is reused)
        for e in [
            Explanation::text("manual correction"),
            Explanation::default(),
            accrual(),
        ] {
            assert_eq!(Explanation::from_packed(&e.pack().unwrap()), e);
        }
    }

    /// An item that repeats its line's product and net leaves them to the line — and its
    /// points and margin when the line holds the same, its number when it is the next line —
    /// and reads back whole when the line is given; one whose base differs (points paid on the line)
    /// keeps its own; an item without a line, or a line the reader does not give, is as stored.
    #[test]
    fn an_item_leaves_to_its_line_only_what_the_line_holds() {
        let mut e = accrual_of_three_lines();
        // capped against their line's margin: line 1's own, line 3's another
        for (i, margin) in [(0, 91_726), (2, 15_388)] {
            e.items[i].cap = Some("max_reward_share_of_margin".into());
            e.items[i].capped_by = Some(11);
            e.items[i].margin_kopecks = Some(margin);
        }
        let lines = [
            ("P00962", 366_700, 183, Some(91_726)),
            ("P01583", 439_550, 200, Some(5)),
            ("P00888", 550_350, 270, Some(20_000)),
        ];
        let line = |n: u32| {
            lines
                .get(n as usize - 1)
                .map(|&(product, net, points, margin)| LineOwn {
                    product,
                    net,
                    points,
                    margin,
                })
        };
        let facts = |n: u32| {
            lines
                .get(n as usize - 1)
                .map(|(p, net, points, margin)| LineFacts {
                    product: p.to_string(),
                    net: *net,
                    points: *points,
                    margin: *margin,
                })
        };
        let stored = e.to_stored_against(line);
        assert!(
            !stored.contains("P00962") && !stored.contains("366700"),
            "{stored}"
        );
        assert!(
            stored.contains("P01583") && stored.contains("400000"),
            "line 2 paid with points: its base is its own: {stored}"
        );
        assert!(
            !stored.contains("183"),
            "line 1's points are its line's: {stored}"
        );
        assert!(
            stored.contains("275"),
            "line 3 earned other than its line holds: {stored}"
        );
        assert!(
            !stored.contains("91726") && stored.contains("15388"),
            "only line 1 was capped against its line's own margin: {stored}"
        );
        assert_eq!(
            stored.matches("\"l\":").count(),
            1,
            "only line 2, kept whole, says its number: {stored}"
        );
        assert!(stored.len() < e.to_stored().len());
        assert_eq!(Explanation::from_stored_with(&stored, facts), e);
        let packed = e.pack_against(line).unwrap();
        assert!(packed.len() < e.pack().unwrap().len());
        assert_eq!(Explanation::from_packed_with(&packed, facts), e);
        // read without the lines: the left-out values are missing, nothing else changes
        let bare = Explanation::from_packed(&packed);
        assert_eq!(bare.items[0].product, None);
        assert_eq!(bare.items[0].base_kopecks, None);
        assert_eq!(
            (
                bare.items[0].line,
                bare.items[0].points,
                bare.items[0].margin_kopecks
            ),
            (Some(1), 0, None)
        );
        assert_eq!(
            (
                bare.items[2].line,
                bare.items[2].points,
                bare.items[2].margin_kopecks
            ),
            (Some(3), 275, Some(15_388))
        );
        assert_eq!(bare.items[1], e.items[1]);
        assert_eq!(bare.items[3], e.items[3]);
        assert_eq!(bare.summary, e.summary);
        // an item stored whole never asks for its line; one stored against it asks once
        let mut asked = Vec::new();
        Explanation::from_stored_with(&e.to_stored(), |n| {
            asked.push(n);
            None
        });
        assert!(asked.is_empty());
        Explanation::from_stored_with(&stored, |n| {
            asked.push(n);
            None
        });
        assert_eq!(asked, [1, 3]);
    }

    fn accrual_of_three_lines() -> Explanation {
        let item = |l: u32, p: &str, base: i64, points: i64| ExplanationItem {
            rule: "base-cashback".into(),
            line: Some(l),
            product: Some(p.into()),
            base_kopecks: Some(base),
            rate: Some("5%".into()),
            points,
            ..Default::default()
        };
        Explanation {
            summary: "668 points on 13566.00, 1 point = 1.00".into(),
            items: vec![
                item(1, "P00962", 366_700, 183),
                item(2, "P01583", 400_000, 200),
                item(3, "P00888", 550_350, 275),
                visit_bonus(),
            ],
            flags: vec![],
        }
    }

    /// Rows packed by this version must read in every later one. This blob was deflated once
    /// against `DICTIONARY_V1` by another implementation (Python's zlib, raw deflate with
    /// `zdict`), so it pins what the format means, not one library's output; the dictionary's
    /// checksum pins every byte of it (a change anywhere shifts or breaks what old rows refer
    /// to). A new dictionary needs a new tag.
    #[test]
    fn a_row_packed_against_the_first_dictionary_reads_for_good() {
        // a zlib stream reports the dictionary's Adler-32 (a raw one does not compute it)
        let mut c = Compress::new(Compression::default(), true);
        let adler = c.set_dictionary(DICTIONARY_V1.as_bytes()).unwrap();
        assert_eq!(
            (DICTIONARY_V1.len(), adler),
            (1446, 0xc079_e20c),
            "DICTIONARY_V1 changed: rows packed with tag 1 no longer read"
        );
        const PACKED: &[u8] = &[
            1, 131, 58, 222, 20, 217, 241, 198, 16, 199, 147, 233, 90, 71, 136, 181, 198, 40, 206, 85, 34,
            50, 104, 141, 193, 65, 107, 8, 214, 9, 138, 69, 83, 96, 52, 82, 146, 220, 0,
        ];
        let e = Explanation::from_packed(PACKED);
        assert_eq!(
            e,
            Explanation {
                summary: "150 points on 3000.00, 1 point = 1.00".into(),
                items: vec![ExplanationItem {
                    rule: "base-cashback".into(),
                    line: Some(1),
                    product: Some("A".into()),
                    base_kopecks: Some(300_000),
                    rate: Some("5%".into()),
                    cap: Some("max_reward_share_of_margin".into()),
                    capped_by: Some(3),
                    margin_kopecks: Some(1000),
                    points: 150,
                    note: None,
                }],
                flags: vec![Flag::new("no_margin", "a line with no margin earned nothing")],
            }
        );
        // and this version packs the same explanation to something that reads the same
        assert_eq!(Explanation::from_packed(&e.pack().unwrap()), e);
    }

    #[test]
    fn a_damaged_or_unknown_packed_explanation_reads_as_a_sentence_saying_so() {
        let mut packed = accrual().pack().unwrap();
        let unreadable = Explanation::text("(the stored explanation could not be read)");
        let cut = packed.len() / 2;
        assert_eq!(Explanation::from_packed(&packed[..cut]), unreadable);
        assert_eq!(Explanation::from_packed(&[]), unreadable);
        packed[0] = 2;
        assert_eq!(
            Explanation::from_packed(&packed),
            unreadable,
            "a tag this version does not know"
        );
        let garbage: Vec<u8> = std::iter::once(PACKED_V1)
            .chain((0..200u8).map(|b| b.wrapping_mul(37)))
            .collect();
        assert_eq!(Explanation::from_packed(&garbage), unreadable);
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
