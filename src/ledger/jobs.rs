//! Nightly work over the whole ledger: tier re-evaluation, birthday and referral bonuses.
//! Each job is one transaction and idempotent: running it twice on the same day changes
//! nothing the second time (bonuses carry idempotency keys, tier changes only happen when
//! the tier differs).

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rusqlite::{OptionalExtension, params};

use super::WrittenLines;
use super::ingest::{IngestContext, LotDates, NewTx, finish_write, post};
use super::query::holdings;
use super::{Ledger, Result, from_ts, ts};
use crate::core::journal::{Account, Explanation, TxKind};
use crate::core::lots;
use crate::core::money::Money;
use crate::core::program::Rules;
use crate::core::rules::{RuleSet, birthday_due, tier_at_reevaluation};

/// A warning for each open lot that burns in (?1, ?2] and has none yet; named so a test can
/// check it reads `lots_open` alone (migration 35).
pub(super) const WARN_SQL: &str = "INSERT INTO expiry_warnings (lot_id, customer_id, points, expires_at, warned_at) \
     SELECT id, customer_id, remaining, expires_at, ?1 FROM lots \
     WHERE remaining > 0 AND expires_at IS NOT NULL AND expires_at > ?1 AND expires_at <= ?2 \
       AND id NOT IN (SELECT lot_id FROM expiry_warnings)";

/// What the nightly jobs did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NightlyReport {
    pub expired_points: i64,
    pub tier_changes: usize,
    pub birthday_bonuses: usize,
    pub referral_bonuses: usize,
    /// Referrals that pay nobody, and why (an unknown code, one's own code, a cycle).
    pub referrals_refused: Vec<String>,
    /// Customers warned that points burn soon (once per lot).
    pub expiry_warnings: usize,
    /// Gift vouchers that reached their end since the last run (their cards no longer list
    /// them).
    pub vouchers_expired: usize,
    pub offers: super::OffersRefresh,
}

/// An event bonus to grant once.
struct Grant<'a> {
    customer: i64,
    points: i64,
    rule: &'a str,
    key: &'a str,
    text: String,
}

/// Posts an event bonus once per key; returns whether it was new.
fn grant(conn: &rusqlite::Connection, rules: &RuleSet, g: Grant<'_>, now: DateTime<Utc>) -> Result<bool> {
    let Grant {
        customer,
        points,
        rule,
        key,
        text,
    } = g;
    if points <= 0 {
        return Ok(false);
    }
    let exists: Option<i64> = conn
        .prepare_cached("SELECT id FROM journal WHERE idem_key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    if exists.is_some() {
        return Ok(false);
    }
    let mut h = holdings(conn, customer)?;
    let moves = lots::plan_credit(&h, points, &[]);
    let (avail, exp) = rules.lot_times(now);
    let explanation = Explanation::text(text);
    post(
        conn,
        NewTx {
            kind: TxKind::Bonus,
            role: "effect",
            customer_id: customer,
            document_id: None,
            epoch: None,
            reverses: None,
            effective_at: now,
            explanation: &explanation,
            lines: WrittenLines::NONE,
            actor: None,
            idem_key: Some(key),
            partner: None,
            rule: Some(rule),
            counter: Account::Expense,
            moves,
            // event bonuses are usable at once and live as long as earned points
            new_lot: Some(LotDates {
                earned: now,
                available: now,
                expires: exp.map(|e| now + (e - avail)),
            }),
        },
        &mut h,
        now,
    )?;
    Ok(true)
}

impl Ledger {
    /// Re-evaluates every customer's tier against their spend over the tier window:
    /// upgrades that sales missed, and downgrades once the grace period since the spend
    /// first fell below the tier's threshold has passed. The dip's start is stored
    /// (`tier_below_since`) so later nights count from it, and cleared when spend recovers.
    pub fn reevaluate_tiers(&mut self, rules: &RuleSet, ctx: &IngestContext<'_>) -> Result<usize> {
        if rules.tiers.is_empty() {
            return Ok(0);
        }
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let from = ts(now - rules.tier_policy.window);
        let rows: Vec<(i64, Option<String>, Option<i64>, i64)> = tx
            .prepare(
                "SELECT c.id, c.tier, c.tier_below_since, COALESCE((SELECT SUM(d.total) FROM documents d \
                 WHERE d.customer_id = c.id AND d.kind_code = 0 /* sale */ AND d.applied = 1 AND d.occurred_at >= ?1 \
                 AND d.occurred_at <= ?2), 0) FROM customers c",
            )?
            .query_map(params![from, ts(now)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut changed = BTreeSet::new();
        for (c, tier, below, spend) in rows {
            let r = tier_at_reevaluation(rules, tier.as_deref(), below.map(from_ts), Money(spend), now);
            if let Some(change) = &r.change {
                super::state::record_tier(&tx, c, change, now, None)?;
                changed.insert(c);
            } else if r.below_since.map(ts) != below {
                // the dip started tonight, or the spend is back at the threshold
                tx.prepare_cached("UPDATE customers SET tier_below_since = ?2 WHERE id = ?1")?
                    .execute(params![c, r.below_since.map(ts)])?;
            }
        }
        finish_write(&tx, since, &changed, ctx)?;
        tx.commit()?;
        Ok(changed.len())
    }

    /// Birthday bonuses for customers whose birthday window includes today (local date),
    /// once per customer and year.
    pub fn birthday_bonuses(&mut self, rules: &RuleSet, ctx: &IngestContext<'_>) -> Result<usize> {
        let Some(b) = &rules.birthday else { return Ok(0) };
        let now = ctx.now;
        let today = now.with_timezone(&rules.timezone).date_naive();
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let rows: Vec<(i64, String)> = tx
            .prepare("SELECT id, birthday FROM customers WHERE birthday IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut granted = BTreeSet::new();
        for (c, birthday) in rows {
            let Ok(date) = birthday.parse::<NaiveDate>() else {
                continue;
            };
            let Some(year) = birthday_due(rules, date, today) else {
                continue;
            };
            let key = format!("birthday:{c}:{year}");
            let text = format!(
                "birthday bonus {year} ({:02}.{:02}): {} points",
                date.day(),
                date.month(),
                b.points
            );
            let g = Grant {
                customer: c,
                points: b.points,
                rule: "birthday",
                key: &key,
                text,
            };
            if grant(&tx, rules, g, now)? {
                granted.insert(c);
            }
        }
        finish_write(&tx, since, &granted, ctx)?;
        tx.commit()?;
        Ok(granted.len())
    }

    /// Referral bonuses: when a referred customer's first purchase that was not returned in
    /// full has passed the return window, both sides get their points, once. The friend's
    /// code is a referral code (`balance` shows it) or, as before, the referrer's card.
    /// Self-referral and cycles (A brought by B, B by A: the later one) pay nobody and are
    /// reported.
    pub fn referral_bonuses(&mut self, rules: &RuleSet, ctx: &IngestContext<'_>) -> Result<usize> {
        Ok(self.referrals(rules, ctx)?.0)
    }

    /// [`Self::referral_bonuses`], with the referrals refused and why.
    pub fn referrals(&mut self, rules: &RuleSet, ctx: &IngestContext<'_>) -> Result<(usize, Vec<String>)> {
        let Some(r) = &rules.referral else {
            return Ok((0, Vec::new()));
        };
        let now = ctx.now;
        let settled = ts(now - rules.return_window);
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        // a sale returned in full is no purchase: it pays nobody
        let rows: Vec<(i64, String, i64)> = tx
            .prepare(
                "SELECT c.id, c.referred_by, MIN(d.occurred_at) FROM customers c \
                 JOIN documents d ON d.customer_id = c.id AND d.kind = 'sale' AND d.applied = 1 \
                   AND d.total > COALESCE((SELECT SUM(x.total) FROM documents x WHERE x.original_id = d.id \
                     AND x.kind = 'return' AND x.applied = 1), 0) \
                 WHERE c.referred_by IS NOT NULL GROUP BY c.id HAVING MIN(d.occurred_at) <= ?1",
            )?
            .query_map([settled], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut touched = BTreeSet::new();
        let mut pairs = 0;
        let mut refused = Vec::new();
        for (referee, code, _first) in rows {
            let Some(referrer) = referrer_of(&tx, &code)? else {
                refused.push(format!(
                    "customer id:{referee}: friend code {code:?} is no member's of this program"
                ));
                continue;
            };
            if referrer == referee {
                refused.push(format!("customer id:{referee}: gave their own code {code:?}"));
                continue;
            }
            let back: Option<String> = tx
                .prepare_cached("SELECT referred_by FROM customers WHERE id = ?1")?
                .query_row([referrer], |row| row.get(0))?;
            if let Some(back) = back
                && referrer_of(&tx, &back)? == Some(referee)
                && referee > referrer
            {
                refused.push(format!(
                    "customer id:{referee}: referred by id:{referrer}, who was referred by them (a cycle)"
                ));
                continue;
            }
            let referee_key = format!("referral:{referee}:referee");
            let a = grant(
                &tx,
                rules,
                Grant {
                    customer: referee,
                    points: r.referee_points,
                    rule: "referral:referee",
                    key: &referee_key,
                    text: format!("referral bonus: joined with friend code {code}"),
                },
                now,
            )?;
            let referrer_key = format!("referral:{referee}:referrer");
            let b = grant(
                &tx,
                rules,
                Grant {
                    customer: referrer,
                    points: r.referrer_points,
                    rule: "referral:referrer",
                    key: &referrer_key,
                    text: format!("referral bonus: brought customer id:{referee}"),
                },
                now,
            )?;
            if a || b {
                pairs += 1;
                touched.insert(referee);
                touched.insert(referrer);
            }
        }
        finish_write(&tx, since, &touched, ctx)?;
        tx.commit()?;
        Ok((pairs, refused))
    }

    /// Records a warning for every lot that burns within the warning window and was not
    /// warned about yet, and queues the customers' state (the AmoCRM connector turns it into
    /// the "burning soon" field and a note). Returns the customers warned.
    pub fn expiry_warnings(&mut self, ctx: &IngestContext<'_>) -> Result<usize> {
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let inserted = tx.execute(WARN_SQL, params![ts(now), ts(now + ctx.warn_before)])?;
        let customers: BTreeSet<i64> = if inserted > 0 {
            tx.prepare("SELECT DISTINCT customer_id FROM expiry_warnings WHERE warned_at = ?1")?
                .query_map([ts(now)], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        } else {
            BTreeSet::new()
        };
        finish_write(&tx, since, &customers, ctx)?;
        tx.commit()?;
        Ok(customers.len())
    }

    /// Gift vouchers past their end since the last look: `expired` is read from the end date,
    /// not stored, so nothing else would tell the AmoCRM card to stop showing them; their
    /// holders' cards are queued in the same transaction as the cursor.
    pub fn vouchers_expired(&mut self, ctx: &IngestContext<'_>) -> Result<usize> {
        const CURSOR: &str = "vouchers:expired";
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let last = super::notify::cursor(&tx, CURSOR)?;
        let mut expired = 0;
        let mut customers = BTreeSet::new();
        {
            let mut st = tx.prepare(
                "SELECT customer_id FROM vouchers WHERE state = 'issued' AND expires_at > ?1 AND expires_at <= ?2",
            )?;
            for c in st.query_map(params![last, ts(now)], |r| r.get::<_, i64>(0))? {
                customers.insert(c?);
                expired += 1;
            }
        }
        super::notify::set_cursor(&tx, CURSOR, ts(now), now)?;
        finish_write(&tx, since, &customers, ctx)?;
        tx.commit()?;
        Ok(expired)
    }

    /// The open voucher a code names at `at` — issued, not past its end — as a till asks for it
    /// when a cashier types the code (Розница's `ПолучитьСкидкиПоКупону`). Read as people type
    /// it: any case, spaces around ignored.
    pub fn open_voucher(&self, code: &str, at: DateTime<Utc>) -> Result<Option<TillVoucher>> {
        let code = code.trim().to_uppercase();
        Ok(self
            .conn
            .prepare_cached(
                "SELECT code, issued_at, expires_at FROM vouchers WHERE code = ?1 AND state = 'issued' \
                 AND issued_at <= ?2 AND (expires_at IS NULL OR expires_at > ?2)",
            )?
            .query_row(params![code, ts(at)], |r| {
                Ok(TillVoucher {
                    code: r.get(0)?,
                    issued_at: from_ts(r.get(1)?),
                    expires_at: r.get::<_, Option<i64>>(2)?.map(from_ts),
                })
            })
            .optional()?)
    }

    /// The till says it used a voucher's code on its receipt `document` (Розница's
    /// `ОбновитьДанныеОКупонах`, state «Применена»): the voucher is used, once — a second
    /// report, or a code that is used, cancelled or not kopilka's, changes nothing (`false`).
    /// When the receipt is in the ledger already and gave the item free by another open
    /// voucher (the oldest, as a sale without a code does), that use moves to the code the
    /// cashier typed and the other voucher opens again. The holder's AmoCRM card is queued in
    /// the same transaction.
    pub fn apply_voucher_code(
        &mut self,
        code: &str,
        document: &str,
        at: DateTime<Utc>,
        ctx: &IngestContext<'_>,
    ) -> Result<bool> {
        let code = code.trim().to_uppercase();
        let document = document.trim().to_lowercase();
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let found: Option<(i64, i64, String, String)> = tx
            .prepare_cached("SELECT id, customer_id, product, state FROM vouchers WHERE code = ?1")?
            .query_row([&code], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let Some((id, customer, product, state)) = found else {
            return Ok(false);
        };
        if state != "issued" {
            return Ok(false);
        }
        let doc_row: Option<i64> = tx
            .prepare_cached(
                // the holder's receipts (by index): a voucher given to someone else links at
                // that receipt's arrival instead
                "SELECT id FROM documents WHERE customer_id = ?2 AND lower(doc_id) = ?1 \
                 AND state = 'active' AND kind = 'sale' LIMIT 1",
            )?
            .query_row(params![document, customer], |r| r.get(0))
            .optional()?;
        if let Some(doc_row) = doc_row {
            tx.prepare_cached(
                "UPDATE vouchers SET state = 'issued', used_document = NULL, used_at = NULL WHERE id = \
                 (SELECT id FROM vouchers WHERE used_document = ?1 AND product = ?2 AND customer_id = ?3 \
                    AND state = 'used' AND used_by IS NULL ORDER BY issued_at DESC, id DESC LIMIT 1)",
            )?
            .execute(params![doc_row, product, customer])?;
        }
        tx.prepare_cached(
            "UPDATE vouchers SET state = 'used', used_by = ?2, used_document = ?3, used_at = ?4 WHERE id = ?1",
        )?
        .execute(params![id, document, doc_row, ts(at)])?;
        finish_write(&tx, since, &BTreeSet::from([customer]), ctx)?;
        tx.commit()?;
        Ok(true)
    }

    /// Every nightly job in order: expiry first (so a birthday bonus is not burnt at once).
    pub fn nightly(&mut self, rules: &RuleSet, ctx: &IngestContext<'_>) -> Result<NightlyReport> {
        let expired_points = self.expire_due(ctx)?;
        let tier_changes = self.reevaluate_tiers(rules, ctx)?;
        let birthday_bonuses = self.birthday_bonuses(rules, ctx)?;
        let (referral_bonuses, referrals_refused) = self.referrals(rules, ctx)?;
        Ok(NightlyReport {
            expired_points,
            tier_changes,
            birthday_bonuses,
            referral_bonuses,
            referrals_refused,
            expiry_warnings: self.expiry_warnings(ctx)?,
            vouchers_expired: self.vouchers_expired(ctx)?,
            offers: self.refresh_offers(ctx)?,
        })
    }

    /// A customer's tier and the discount it publishes, with the history of changes.
    pub fn tier_of(&self, customer: i64) -> Result<(Option<String>, Vec<TierEvent>)> {
        let tier: Option<String> =
            self.conn
                .query_row("SELECT tier FROM customers WHERE id = ?1", [customer], |r| {
                    r.get(0)
                })?;
        let mut st = self.conn.prepare(
            "SELECT from_tier, to_tier, at, reason FROM tier_events WHERE customer_id = ?1 ORDER BY id",
        )?;
        let events = st
            .query_map([customer], |r| {
                Ok(TierEvent {
                    from: r.get(0)?,
                    to: r.get(1)?,
                    at: from_ts(r.get(2)?),
                    reason: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok((tier, events))
    }
}

/// A voucher as a till sees it: the code the cashier typed, since when and until when it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TillVoucher {
    pub code: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TierEvent {
    pub from: Option<String>,
    pub to: Option<String>,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// The customer a friend code names: a referral code of a known customer, else a card.
pub(crate) fn referrer_of(conn: &rusqlite::Connection, code: &str) -> Result<Option<i64>> {
    if let Some(id) = crate::core::identity::referral_id(code, super::code_key(conn)?) {
        let known: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM customers WHERE id = ?1)")?
            .query_row([id], |r| r.get(0))?;
        if known {
            return Ok(Some(id));
        }
    }
    let Some(card) = crate::core::identity::normalize_card(code) else {
        return Ok(None);
    };
    Ok(conn
        .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = 'card' AND value = ?1")?
        .query_row([&card], |row| row.get(0))
        .optional()?)
}
