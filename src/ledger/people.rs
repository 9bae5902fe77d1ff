//! What the shop knows of its members beyond their sales (issue 20): attributes from the
//! shop's own list (`kopilka import-customers`), and forgetting a member's personal data on
//! request (152-ФЗ) while the journal and its sums stay as they were.
//!
//! Precedence: a source (1C, AmoCRM, a document) fills a customer's name, birthday and friend
//! code only where the ledger has none; the customers file — the shop's own list, typed by a
//! person — sets them. Every value it changes is recorded in `customer_changes` with the old
//! value and the file, and `kopilka history` shows it.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Ledger, LedgerError, Result, ts};
use crate::core::rules::RuleSet;

/// What importing a customers file did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CustomersReport {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// (line, reason): a row not applied, or the part of a row that was not (an unknown
    /// friend code, one's own code, an unknown invite code).
    pub problems: Vec<(usize, String)>,
}

/// A change of a customer's attribute, as `history` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AttributeChange {
    pub at: DateTime<Utc>,
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub source: String,
}

/// What `kopilka customer forget` removed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Forgotten {
    pub customer_id: i64,
    /// Rows whose text held the customer's phone, e-mail or name, now replaced.
    pub rows_scrubbed: usize,
    pub keys_removed: usize,
    /// Telegram chats unlinked (a chat id is personal data; the member can link again).
    pub telegram_chats_removed: usize,
}

const FORGOTTEN: &str = "[forgotten]";

impl Ledger {
    /// Applies a customers file (or one registration from the till API) in one transaction:
    /// each row finds or enrols its customer by its keys and sets what the row says. `source`
    /// names where the values came from in `history` (`csv:customers.csv`, `api`).
    pub fn import_customers(
        &mut self,
        source: &str,
        rows: Vec<crate::migrate::CustomerCsvRow>,
        rules: &RuleSet,
        now: DateTime<Utc>,
    ) -> Result<CustomersReport> {
        let mut report = CustomersReport::default();
        let tx = self.conn.transaction()?;
        for row in rows {
            let row = match row {
                Ok(r) => r,
                Err(p) => {
                    report.problems.push(p);
                    continue;
                }
            };
            let keys_only = crate::core::identity::CustomerIdentity {
                name: None,
                birthday: None,
                referred_by: None,
                invite_code: None,
                ..row.identity.clone()
            };
            let Some((c, created)) = super::ingest::resolve_customer(&tx, &keys_only, now)? else {
                report
                    .problems
                    .push((row.line, "no key to find the customer by".into()));
                continue;
            };
            let mut changed = false;
            let mut set = |field: &str, new: Option<String>| -> Result<()> {
                let Some(new) = new else { return Ok(()) };
                let old: Option<String> = tx
                    .prepare_cached(&format!(
                        "SELECT CAST({field} AS TEXT) FROM customers WHERE id = ?1"
                    ))?
                    .query_row([c], |r| r.get(0))?;
                if old.as_deref() == Some(new.as_str()) {
                    return Ok(());
                }
                tx.prepare_cached(&format!("UPDATE customers SET {field} = ?2 WHERE id = ?1"))?
                    .execute(params![c, new])?;
                tx.prepare_cached(
                    "INSERT INTO customer_changes (customer_id, at, field, old, new, source) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![c, ts(now), field, old, new, source])?;
                changed = true;
                Ok(())
            };
            set("name", row.identity.name.clone())?;
            set("birthday", row.identity.birthday.map(|b| b.to_string()))?;
            if let Some(code) = &row.identity.referred_by {
                match super::jobs::referrer_of(&tx, code)? {
                    None => report.problems.push((
                        row.line,
                        format!("friend code {code:?} is nobody's: not recorded"),
                    )),
                    Some(r) if r == c => report.problems.push((
                        row.line,
                        format!("friend code {code:?} is the customer's own: not recorded"),
                    )),
                    Some(_) => set("referred_by", Some(code.clone()))?,
                }
            }
            set(
                "consent_service",
                row.consent_service.map(|b| i64::from(b).to_string()),
            )?;
            set("consent_ads", row.consent_ads.map(|b| i64::from(b).to_string()))?;
            if let Some(code) = &row.identity.invite_code {
                match crate::core::rules::membership_for_invite(rules, code) {
                    Some(program) => {
                        let before: bool = tx
                            .prepare_cached(
                                "SELECT EXISTS (SELECT 1 FROM memberships WHERE customer_id = ?1 AND program = ?2)",
                            )?
                            .query_row(params![c, program], |r| r.get(0))?;
                        if !before {
                            super::state::join_program(
                                &tx,
                                c,
                                &program,
                                &format!("invite code {code}"),
                                now,
                            )?;
                            changed = true;
                        }
                    }
                    None => report
                        .problems
                        .push((row.line, format!("invite code {code:?} opens no program"))),
                }
            }
            if created {
                report.created += 1;
            } else if changed {
                report.updated += 1;
            } else {
                report.unchanged += 1;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    /// The attribute changes recorded for a customer, oldest first.
    pub fn attribute_changes(&self, customer: &str) -> Result<Vec<AttributeChange>> {
        let id = super::query::find_customer(&self.conn, customer)?;
        let mut st = self.conn.prepare(
            "SELECT at, field, old, new, source FROM customer_changes WHERE customer_id = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([id], |r| {
                Ok(AttributeChange {
                    at: super::from_ts(r.get(0)?),
                    field: r.get(1)?,
                    old: r.get(2)?,
                    new: r.get(3)?,
                    source: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Forgets a customer's personal data (152-ФЗ): name, birthday, phones and e-mails leave
    /// the customer's row and keys, and every text in the ledger that held them (a quarantined
    /// document's excerpt, an outbox body, an explanation) has them replaced by
    /// `[forgotten]`. Amounts, dates and the customer's id and card stay, so the journal, its
    /// sums and `ledger verify` are as before; the request is recorded in `forgotten`.
    /// Deleted content is overwritten on disk (`secure_delete`) and the WAL folded into the
    /// file, so the old values are not left in free pages.
    pub fn forget_customer(
        &mut self,
        customer: &str,
        reason: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Forgotten> {
        if reason.trim().is_empty() {
            return Err(LedgerError::Refused(
                "a reason is required to forget a customer".into(),
            ));
        }
        let id = super::query::find_customer(&self.conn, customer)?;
        self.conn.pragma_update(None, "secure_delete", true)?;
        let tx = self.conn.transaction()?;
        let name: Option<String> =
            tx.query_row("SELECT name FROM customers WHERE id = ?1", [id], |r| r.get(0))?;
        let keys: Vec<(String, String)> = tx
            .prepare(
                "SELECT kind, value FROM customer_keys WHERE customer_id = ?1 AND kind IN ('phone', 'email')",
            )?
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        // every form a text may hold them in: a phone as +7…, 7…, 8… all contain its last ten
        // digits; an e-mail as stored and as typed
        let mut needles: BTreeSet<String> = BTreeSet::new();
        for (kind, value) in &keys {
            if kind == "phone" {
                let digits: String = value.chars().filter(char::is_ascii_digit).collect();
                let tail = &digits[digits.len().saturating_sub(10)..];
                needles.insert(if tail.len() >= 7 {
                    tail.to_string()
                } else {
                    value.clone()
                });
            } else {
                needles.insert(value.clone());
            }
        }
        if let Some(n) = name.as_ref().filter(|n| n.chars().count() >= 3) {
            needles.insert(n.clone());
        }
        let keys_removed = tx.execute(
            "DELETE FROM customer_keys WHERE customer_id = ?1 AND kind IN ('phone', 'email')",
            [id],
        )?;
        tx.execute(
            "UPDATE customers SET name = NULL, birthday = NULL WHERE id = ?1",
            [id],
        )?;
        tx.execute(
            "UPDATE customer_changes SET old = NULL, new = NULL WHERE customer_id = ?1 \
             AND field IN ('name', 'birthday')",
            [id],
        )?;
        let tables: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut rows_scrubbed = 0;
        for table in &tables {
            let columns: Vec<String> = tx
                .prepare(&format!(
                    "SELECT name FROM pragma_table_info('{table}') WHERE type = 'TEXT'"
                ))?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for column in &columns {
                for needle in &needles {
                    let lower = needle.to_lowercase();
                    rows_scrubbed += tx.execute(
                        &format!(
                            "UPDATE \"{table}\" SET \"{column}\" = REPLACE(REPLACE(\"{column}\", ?1, ?3), ?2, ?3) \
                             WHERE instr(\"{column}\", ?1) > 0 OR instr(\"{column}\", ?2) > 0"
                        ),
                        params![needle, lower, FORGOTTEN],
                    )?;
                }
            }
        }
        let telegram_chats_removed = super::telegram::forget(&tx, id, now)?;
        tx.execute(
            "INSERT INTO forgotten (customer_id, at, reason, requested_by) VALUES (?1, ?2, ?3, ?4)",
            params![id, ts(now), reason, by],
        )?;
        tx.commit()?;
        self.conn.pragma_update(None, "secure_delete", false)?;
        let _: Option<i64> = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .optional()?;
        Ok(Forgotten {
            customer_id: id,
            rows_scrubbed,
            keys_removed,
            telegram_chats_removed,
        })
    }
}
