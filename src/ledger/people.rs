//! What the shop knows of its members beyond their sales (issue 20): attributes from the
//! shop's own list (`kopilka import-customers`), and forgetting a member's personal data on
//! request (152-ФЗ) while the journal and its sums stay as they were.
//!
//! Precedence ([`Precedence`]): the customers file — the shop's own list, typed by a person —
//! sets a customer's name, birthday, friend code and consents. AmoCRM's contact fields
//! (`[sources]` in `mappings/amocrm.toml`) and 1C's additional attributes
//! (`[attributes.sources]` in the OData mapping) fill what no source set and follow their own
//! later edits, but never replace a value the file (or a document, when the customer was
//! first seen) set. Every value applied is recorded in `customer_changes` with the old value and
//! the source; every value refused (an unknown or own friend code, a date that is not one, a
//! conflict lost) too, with the reason, so `kopilka history` shows both.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Ledger, LedgerError, Result, ts};
use crate::core::journal::Explanation;
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
    /// Why the value was not applied (`new` is the value as the source held it, `old` what
    /// the customer kept); absent when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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

/// How a source's values meet the values the ledger already has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precedence {
    /// The customers file and the till's registration: a person typed the shop's own list,
    /// so its values replace whatever another source said.
    Sets,
    /// AmoCRM: fills what no source has set, and keeps following the values it set itself
    /// (a manager correcting a birthday on the card), but never replaces a value another
    /// source set — a CRM card is edited by many hands, the shop's list by one.
    FillsEmptyOrOwn,
}

/// A value a source holds that cannot be read: as it was written, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub text: String,
    pub reason: String,
}

/// What one source says of one customer; `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub name: Option<String>,
    pub birthday: Option<std::result::Result<NaiveDate, Unreadable>>,
    /// The friend code the customer came with.
    pub referral_code: Option<String>,
    pub invite_code: Option<String>,
    pub consent_service: Option<std::result::Result<bool, Unreadable>>,
    pub consent_ads: Option<std::result::Result<bool, Unreadable>>,
}

/// What applying one source's attributes did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct AttributesReport {
    pub changed: usize,
    pub unchanged: usize,
    /// (customer id, reason) for each value refused; each is in the customer's history too.
    pub refused: Vec<(i64, String)>,
    /// Values left as another source set them (the conflict is in the customer's history).
    pub kept: usize,
}

/// What applying one customer's attributes did.
#[derive(Default)]
struct Applied {
    changed: bool,
    /// Reasons of the values refused.
    problems: Vec<String>,
    /// Values another source owns, left as they were.
    kept: usize,
}

/// What setting one attribute did.
#[derive(PartialEq, Eq)]
enum Set {
    Changed,
    Unchanged,
    /// Another source owns the value: kept, the conflict recorded.
    Kept,
}

/// The source and rules a batch of attributes is applied with.
struct Applying<'a> {
    source: &'a str,
    precedence: Precedence,
    rules: &'a dyn crate::core::program::Rules,
    now: DateTime<Utc>,
}

/// What a document says of its customer beyond its keys (a friend code in a CommerceML
/// requisite), applied inside the document's transaction like any filling source: a value
/// that cannot be used is refused for that customer, with the reason in history.
pub(super) fn apply_from_document(
    tx: &Connection,
    c: i64,
    source: &str,
    attributes: &Attributes,
    rules: &dyn crate::core::program::Rules,
    now: DateTime<Utc>,
) -> Result<()> {
    let how = Applying {
        source,
        precedence: Precedence::FillsEmptyOrOwn,
        rules,
        now,
    };
    apply_attributes(tx, c, attributes, &how)?;
    Ok(())
}

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
        let how = Applying {
            source,
            precedence: Precedence::Sets,
            rules,
            now,
        };
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
            let attributes = Attributes {
                name: row.identity.name.clone(),
                birthday: row.identity.birthday.map(Ok),
                referral_code: row.identity.referred_by.clone(),
                invite_code: row.identity.invite_code.clone(),
                consent_service: row.consent_service.map(Ok),
                consent_ads: row.consent_ads.map(Ok),
            };
            let applied = apply_attributes(&tx, c, &attributes, &how)?;
            report
                .problems
                .extend(applied.problems.into_iter().map(|p| (row.line, p)));
            if created {
                report.created += 1;
            } else if applied.changed {
                report.updated += 1;
            } else {
                report.unchanged += 1;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    /// Applies what a source other than the customers file says of customers it is linked
    /// to (AmoCRM contact fields), in one transaction. A value that cannot be used is
    /// refused for that customer only, with the reason in their history; the rest apply.
    pub fn apply_attributes(
        &mut self,
        source: &str,
        precedence: Precedence,
        items: Vec<(i64, Attributes)>,
        rules: &RuleSet,
        now: DateTime<Utc>,
    ) -> Result<AttributesReport> {
        let how = Applying {
            source,
            precedence,
            rules,
            now,
        };
        let mut report = AttributesReport::default();
        let tx = self.conn.transaction()?;
        for (c, attributes) in items {
            let applied = apply_attributes(&tx, c, &attributes, &how)?;
            if applied.changed {
                report.changed += 1;
            } else {
                report.unchanged += 1;
            }
            report.kept += applied.kept;
            report
                .refused
                .extend(applied.problems.into_iter().map(|p| (c, p)));
        }
        tx.commit()?;
        Ok(report)
    }

    /// The customer a source's key names (`onec`, a 1C reference), if any.
    pub fn customer_of_key(&self, kind: &str, value: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT customer_id FROM customer_keys WHERE kind = ?1 AND value = ?2")?
            .query_row(params![kind, value], |r| r.get(0))
            .optional()?)
    }

    /// The attribute changes recorded for a customer, oldest first.
    pub fn attribute_changes(&self, customer: &str) -> Result<Vec<AttributeChange>> {
        let id = super::query::find_customer(&self.conn, customer)?;
        let mut st = self.conn.prepare(
            "SELECT at, field, old, new, source, refused FROM customer_changes WHERE customer_id = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([id], |r| {
                Ok(AttributeChange {
                    at: super::from_ts(r.get(0)?),
                    field: r.get(1)?,
                    old: r.get(2)?,
                    new: r.get(3)?,
                    source: r.get(4)?,
                    refused: r.get(5)?,
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
            "UPDATE customer_changes SET old = NULL, new = NULL, \
             refused = CASE WHEN refused IS NULL THEN NULL ELSE ?2 END WHERE customer_id = ?1 \
             AND field IN ('name', 'birthday')",
            params![id, FORGOTTEN],
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
                             WHERE typeof(\"{column}\") = 'text' \
                               AND (instr(\"{column}\", ?1) > 0 OR instr(\"{column}\", ?2) > 0)"
                        ),
                        params![needle, lower, FORGOTTEN],
                    )?;
                }
            }
        }
        rows_scrubbed += scrub_packed_explanations(&tx, &needles)?;
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

/// The journal's explanations are packed (deflated, issue 19), so the text scrub above
/// cannot see into them: each is unpacked, scrubbed as text and packed again. A manual
/// adjustment's reason is typed by a person and may name anyone, so every packed row is
/// read, not only the customer's — forgetting is rare, and a full pass is what it costs.
fn scrub_packed_explanations(tx: &Connection, needles: &BTreeSet<String>) -> Result<usize> {
    let mut changed = Vec::new();
    {
        let mut st = tx
            .prepare("SELECT id, explanation, document_id FROM journal WHERE typeof(explanation) = 'blob'")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            // whole, its lines' facts filled in: a row rewritten here keeps them itself
            let stored = super::explanation_read(tx, r.get_ref(1)?, r.get(2)?)?.to_stored();
            let mut scrubbed = stored.clone();
            for needle in needles {
                scrubbed = scrubbed
                    .replace(needle.as_str(), FORGOTTEN)
                    .replace(&needle.to_lowercase(), FORGOTTEN);
            }
            if scrubbed != stored {
                changed.push((
                    r.get::<_, i64>(0)?,
                    super::explanation_column(&Explanation::from_stored(&scrubbed)),
                ));
            }
        }
    }
    for (id, value) in &changed {
        tx.execute(
            "UPDATE journal SET explanation = ?2 WHERE id = ?1",
            params![id, value],
        )?;
    }
    Ok(changed.len())
}

/// Applies one source's attributes to customer `c`. Every value refused or kept is also
/// recorded in the customer's history.
fn apply_attributes(tx: &Connection, c: i64, a: &Attributes, how: &Applying<'_>) -> Result<Applied> {
    let mut out = Applied::default();
    let mut problems = Vec::new();
    let mut refuse = |field: &str, text: &str, reason: String| -> Result<()> {
        if record_refusal(tx, c, field, text, &reason, how)? {
            tracing::warn!(
                customer = c,
                field,
                source = how.source,
                reason,
                "A customer attribute was refused."
            );
        }
        problems.push(reason);
        Ok(())
    };
    let mut set = |field: &str, new: &str| -> Result<()> {
        match set_attribute(tx, c, field, new, how)? {
            Set::Changed => out.changed = true,
            Set::Kept => out.kept += 1,
            Set::Unchanged => {}
        }
        Ok(())
    };
    let mut joined = false;
    if let Some(name) = &a.name {
        set("name", name)?;
    }
    match &a.birthday {
        Some(Ok(b)) => set("birthday", &b.to_string())?,
        Some(Err(u)) => refuse("birthday", &u.text, u.reason.clone())?,
        None => {}
    }
    if let Some(code) = &a.referral_code {
        match super::jobs::referrer_of(tx, code)? {
            None => refuse(
                "referred_by",
                code,
                format!(
                    "friend code {code:?} is no member's of this program (a typo, or another program's code): not recorded"
                ),
            )?,
            Some(r) if r == c => refuse(
                "referred_by",
                code,
                format!("friend code {code:?} is the customer's own: not recorded"),
            )?,
            Some(r) => {
                // the same friend written another way (lower case, a dash, the card) is no change
                let current: Option<String> = tx
                    .prepare_cached("SELECT referred_by FROM customers WHERE id = ?1")?
                    .query_row([c], |row| row.get(0))?;
                let same = match &current {
                    Some(cur) => super::jobs::referrer_of(tx, cur)? == Some(r),
                    None => false,
                };
                if !same {
                    set("referred_by", code)?;
                }
            }
        }
    }
    for (field, value) in [
        ("consent_service", &a.consent_service),
        ("consent_ads", &a.consent_ads),
    ] {
        match value {
            Some(Ok(b)) => set(field, if *b { "1" } else { "0" })?,
            Some(Err(u)) => refuse(field, &u.text, u.reason.clone())?,
            None => {}
        }
    }
    if let Some(code) = &a.invite_code {
        match super::state::join_by_invite(tx, c, how.rules, code, how.now)? {
            Ok(now_joined) => joined |= now_joined,
            Err(reason) => refuse("invite_code", code, reason)?,
        }
    }
    out.changed |= joined;
    out.problems = problems;
    Ok(out)
}

/// The current value of a customer's attribute, as text.
fn current_value(tx: &Connection, c: i64, field: &str) -> Result<Option<String>> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT CAST({field} AS TEXT) FROM customers WHERE id = ?1"
        ))?
        .query_row([c], |r| r.get(0))?)
}

/// The source that last set a customer's attribute (`None`: none recorded — empty, or filled
/// from a document when the customer was first seen).
fn last_setter(tx: &Connection, c: i64, field: &str) -> Result<Option<String>> {
    Ok(tx
        .prepare_cached(
            "SELECT source FROM customer_changes WHERE customer_id = ?1 AND field = ?2 \
             AND refused IS NULL ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![c, field], |r| r.get(0))
        .optional()?)
}

/// Sets an attribute when the source's precedence allows it, recording the change with the
/// value before it. A value another source owns is kept, and the conflict is recorded as a
/// refusal so `history` shows both.
fn set_attribute(tx: &Connection, c: i64, field: &str, new: &str, how: &Applying<'_>) -> Result<Set> {
    let old = current_value(tx, c, field)?;
    let owner = last_setter(tx, c, field)?;
    if old.as_deref() == Some(new) {
        // the file confirms a value another source set: from now on it is the file's, so
        // a later edit in AmoCRM does not replace what the shop's list says
        if how.precedence == Precedence::Sets && owner.as_deref().is_some_and(|o| o != how.source) {
            record_change(tx, c, field, (old.as_deref(), Some(new)), None, how)?;
        }
        return Ok(Set::Unchanged);
    }
    if how.precedence == Precedence::FillsEmptyOrOwn
        && let Some(kept) = &old
        && owner.as_deref() != Some(how.source)
    {
        let by = owner.unwrap_or_else(|| "a document".into());
        let reason = format!(
            "kept {kept:?} set by {by}: {} only fills values no other source set",
            how.source
        );
        record_refusal(tx, c, field, new, &reason, how)?;
        return Ok(Set::Kept);
    }
    tx.prepare_cached(&format!("UPDATE customers SET {field} = ?2 WHERE id = ?1"))?
        .execute(params![c, new])?;
    record_change(tx, c, field, (old.as_deref(), Some(new)), None, how)?;
    Ok(Set::Changed)
}

/// Records a value refused, unless the same value was refused for the same reason last
/// time (a contact read at every poll must not fill the history with one complaint).
/// Returns whether it recorded.
fn record_refusal(
    tx: &Connection,
    c: i64,
    field: &str,
    value: &str,
    reason: &str,
    how: &Applying<'_>,
) -> Result<bool> {
    refuse_from_source(tx, c, how.source, field, value, reason, how.now)
}

/// [`record_refusal`] for a value a document's source gave (a CommerceML birth date of
/// 31.02), outside an attributes import.
pub(super) fn refuse_from_source(
    tx: &Connection,
    c: i64,
    source: &str,
    field: &str,
    value: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<bool> {
    let last: Option<(Option<String>, Option<String>)> = tx
        .prepare_cached(
            "SELECT new, refused FROM customer_changes WHERE customer_id = ?1 AND field = ?2 \
             AND source = ?3 ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![c, field, source], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if last == Some((Some(value.to_string()), Some(reason.to_string()))) {
        return Ok(false);
    }
    // an invite code is not kept on the customer (it makes a membership): nothing to show as kept
    let old = if field == "invite_code" {
        None
    } else {
        current_value(tx, c, field)?
    };
    tx.prepare_cached(
        "INSERT INTO customer_changes (customer_id, at, field, old, new, source, refused) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![c, ts(now), field, old, value, source, reason])?;
    Ok(true)
}

fn record_change(
    tx: &Connection,
    c: i64,
    field: &str,
    (old, new): (Option<&str>, Option<&str>),
    refused: Option<&str>,
    how: &Applying<'_>,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO customer_changes (customer_id, at, field, old, new, source, refused) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![c, ts(how.now), field, old, new, how.source, refused])?;
    Ok(())
}
