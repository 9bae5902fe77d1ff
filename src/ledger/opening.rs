//! Opening balances: the points a shop's customers already had in its previous program
//! (1C's own bonus register, a spreadsheet), migrated once as opening lots.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::WrittenLines;
use super::ingest::{IngestContext, LotDates, NewTx, finish_write, post, resolve_customer};
use super::query::holdings;
use super::{Ledger, Result};
use crate::core::identity::CustomerIdentity;
use crate::core::journal::{Account, Explanation, TxKind};
use crate::core::lots;

/// The opening-balance source of a 1C base's own bonus register (`onec:odata:bonus`): points
/// imported from it are 1C's, never posted back to it.
pub fn opening_source_from_register(system: &str) -> String {
    format!("{system}:odata:bonus")
}

/// One customer's balance from the previous program.
#[derive(Clone, Debug, PartialEq)]
pub struct OpeningRow {
    /// Where it came from (a line number, a register key), for messages.
    pub line: usize,
    pub identity: CustomerIdentity,
    pub points: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub tier: Option<String>,
    /// The balance as the previous program dated it: portions of `points` (summing to it)
    /// and when each burns (`None`: never). Taken as is, without the program's default
    /// expiry, so the points burn when the old program would have burnt them. `None`: one
    /// lot expiring at `expires_at`, or by the program's default.
    pub lots: Option<Vec<(i64, Option<DateTime<Utc>>)>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpeningReport {
    pub applied: usize,
    /// Already imported from this source for this customer: nothing changed.
    pub unchanged: usize,
    pub points_imported: i64,
    /// (line, reason) of every row not applied.
    pub problems: Vec<(usize, String)>,
}

impl Ledger {
    /// Imports opening balances from `source` (`csv`, `1c`) in one transaction, idempotent
    /// by content per source: a customer's balance already imported from that source with
    /// the same points and expiry changes nothing, whatever file it came in (`file` names it
    /// in messages and the journal); a different one is refused (a correction is
    /// `kopilka adjust`). Rows that cannot be parsed arrive as `Err((line, reason))` and are
    /// listed, so is a tier the program does not have; the rest apply.
    pub fn import_opening_balances(
        &mut self,
        source: &str,
        file: &str,
        rows: Vec<std::result::Result<OpeningRow, (usize, String)>>,
        ctx: &IngestContext<'_>,
    ) -> Result<OpeningReport> {
        let now = ctx.now;
        let tx = self.conn.transaction()?;
        let since = super::accounting::journal_head(&tx)?;
        let mut report = OpeningReport::default();
        let mut touched = std::collections::BTreeSet::new();
        for row in rows {
            let row = match row {
                Ok(r) => r,
                Err(problem) => {
                    report.problems.push(problem);
                    continue;
                }
            };
            if row.points < 0 {
                report
                    .problems
                    .push((row.line, format!("negative balance {}", row.points)));
                continue;
            }
            let tier = match &row.tier {
                None => None,
                Some(t) => match ctx.rules.tier_named(t) {
                    Some(id) => Some(id),
                    None => {
                        report.problems.push((
                            row.line,
                            format!("unknown tier {t:?}: the program has no tier by that id or name"),
                        ));
                        continue;
                    }
                },
            };
            let Some((customer, _)) = resolve_customer(&tx, &row.identity, now)? else {
                report.problems.push((
                    row.line,
                    "no card, phone, e-mail or 1C id to know the customer by".into(),
                ));
                continue;
            };
            let key = format!("opening:{source}:{customer}");
            // earlier kopilka keyed a file's rows by its name (`opening:csv:<file>:<customer>`)
            let prior: Option<(i64, Option<i64>, Option<String>)> = tx
                .prepare_cached(
                    "SELECT j.amount, (SELECT MAX(l.expires_at) FROM postings p JOIN lots l ON l.id = p.lot_id WHERE p.tx_id = j.id AND l.origin_tx = j.id), j.actor \
                     FROM journal j WHERE j.kind = 'opening' AND j.customer_id = ?1 \
                     AND (j.idem_key = ?2 OR j.idem_key LIKE ?3) ORDER BY j.id LIMIT 1",
                )?
                .query_row(
                    params![customer, key, format!("opening:{source}:%:{customer}")],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            // a balance in several lots was posted as several transactions: key, key:2, …
            let prior = match prior {
                Some((first, expires, from)) => {
                    let rest: i64 = tx
                        .prepare_cached(
                            "SELECT COALESCE(SUM(amount), 0) FROM journal WHERE idem_key LIKE ?1 || ':%'",
                        )?
                        .query_row([&key], |r| r.get(0))?;
                    Some((first + rest, expires, from))
                }
                None => None,
            };
            if let Some((amount, expires, from)) = prior {
                // a row without expiry got the program's default, counted from its import; a
                // balance in lots is compared by its points
                let same_expiry =
                    row.lots.is_some() || row.expires_at.is_none_or(|e| Some(super::ts(e)) == expires);
                if amount == row.points && same_expiry {
                    report.unchanged += 1;
                } else {
                    report.problems.push((
                        row.line,
                        format!(
                            "customer id:{customer} already has an opening balance of {amount} from {}; \
                             correct it with `kopilka adjust`",
                            from.as_deref().unwrap_or(source)
                        ),
                    ));
                }
                continue;
            }
            if let Some(tier) = &tier {
                tx.prepare_cached(
                    "UPDATE customers SET tier = ?2, tier_since = ?3, tier_below_since = NULL WHERE id = ?1",
                )?
                .execute(params![customer, tier, super::ts(now)])?;
            }
            if row.points == 0 {
                report.applied += 1;
                continue;
            }
            let mut h = holdings(&tx, customer)?;
            let (_, default_expiry) = ctx.rules.lot_times(now);
            let parts: Vec<(i64, Option<DateTime<Utc>>)> = match &row.lots {
                Some(parts) => parts.iter().filter(|(p, _)| *p > 0).cloned().collect(),
                None => vec![(row.points, row.expires_at.or(default_expiry))],
            };
            if parts.iter().map(|(p, _)| *p).sum::<i64>() != row.points {
                report.problems.push((
                    row.line,
                    format!("its lots do not add up to {} points", row.points),
                ));
                continue;
            }
            for (n, (points, expires)) in parts.into_iter().enumerate() {
                let moves = lots::plan_credit(&h, points, &[]);
                let explanation = Explanation::text(match expires {
                    Some(e) if row.lots.is_some() => format!(
                        "opening balance: {points} points from {file} burning on {} (line {})",
                        e.format("%Y-%m-%d"),
                        row.line
                    ),
                    _ => format!(
                        "opening balance of {points} points from {file} (line {})",
                        row.line
                    ),
                });
                let idem = if n == 0 {
                    key.clone()
                } else {
                    format!("{key}:{}", n + 1)
                };
                post(
                    &tx,
                    NewTx {
                        kind: TxKind::Opening,
                        role: "effect",
                        customer_id: customer,
                        document_id: None,
                        epoch: None,
                        reverses: None,
                        effective_at: now,
                        explanation: &explanation,
                        lines: WrittenLines::NONE,
                        actor: Some(file),
                        idem_key: Some(&idem),
                        partner: None,
                        rule: None,
                        counter: Account::Opening,
                        moves,
                        new_lot: Some(LotDates {
                            earned: now,
                            available: now,
                            expires,
                        }),
                    },
                    &mut h,
                    now,
                )?;
            }
            report.applied += 1;
            report.points_imported += row.points;
            touched.insert(customer);
        }
        finish_write(&tx, since, &touched, ctx)?;
        tx.commit()?;
        Ok(report)
    }
}
