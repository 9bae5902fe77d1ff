//! `kopilka ledger verify`: every invariant re-checked from the stored rows alone, so a bug
//! in the code that wrote them cannot hide behind the same bug in the code that reads them.

use serde::Serialize;

use super::{Ledger, Result};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

/// (check name, query returning one text column per violation)
const CHECKS: &[(&str, &str)] = &[
    (
        "transaction sums to zero",
        "SELECT 'tx ' || tx_id || ' sums to ' || SUM(amount) FROM postings GROUP BY tx_id HAVING SUM(amount) != 0",
    ),
    (
        "transaction has postings",
        "SELECT 'tx ' || j.id || ' (' || j.kind || ') has fewer than two postings' FROM journal j \
         LEFT JOIN postings p ON p.tx_id = j.id GROUP BY j.id HAVING COUNT(p.tx_id) < 2",
    ),
    (
        "transaction amount equals its customer postings",
        "SELECT 'tx ' || j.id || ' says ' || j.amount || ' but its customer postings sum to ' || COALESCE(SUM(p.amount), 0) \
         FROM journal j LEFT JOIN postings p ON p.tx_id = j.id AND p.account = 'customer' \
         GROUP BY j.id HAVING COALESCE(SUM(p.amount), 0) != j.amount",
    ),
    (
        "customer postings belong to the transaction's customer",
        "SELECT 'posting ' || p.leg || ' of tx ' || j.id || ' is for customer ' || p.customer_id || ', not ' || j.customer_id \
         FROM postings p JOIN journal j ON j.id = p.tx_id WHERE p.account = 'customer' AND p.customer_id IS NOT j.customer_id",
    ),
    (
        "lot remaining equals its postings",
        "SELECT 'lot ' || l.id || ' remaining ' || l.remaining || ' but postings sum to ' || COALESCE(SUM(p.amount), 0) \
         FROM lots l LEFT JOIN postings p ON p.lot_id = l.id GROUP BY l.id HAVING COALESCE(SUM(p.amount), 0) != l.remaining",
    ),
    (
        "no lot below zero or above its size",
        "SELECT 'lot ' || id || ' remaining ' || remaining || ' of ' || amount FROM lots WHERE remaining < 0 OR remaining > amount",
    ),
    (
        "lot belongs to its customer",
        "SELECT 'posting ' || p.leg || ' of tx ' || p.tx_id || ' moves lot ' || l.id || ' of customer ' || l.customer_id || ' for customer ' || p.customer_id \
         FROM postings p JOIN lots l ON l.id = p.lot_id WHERE p.customer_id IS NOT l.customer_id",
    ),
    (
        "debt equals postings without a lot",
        "SELECT 'customer ' || c.id || ' debt ' || c.debt || ' but lot-less postings sum to ' || COALESCE(SUM(p.amount), 0) \
         FROM customers c LEFT JOIN postings p ON p.customer_id = c.id AND p.account = 'customer' AND p.lot_id IS NULL \
         GROUP BY c.id HAVING -COALESCE(SUM(p.amount), 0) != c.debt OR c.debt < 0",
    ),
    (
        "balance equals remaining lots minus debt",
        "SELECT 'customer ' || c.id || ' balance ' || b.bal || ' but lots hold ' || COALESCE(l.rem, 0) || ' and debt is ' || c.debt \
         FROM customers c \
         JOIN (SELECT customer_id, SUM(amount) AS bal FROM postings WHERE account = 'customer' GROUP BY customer_id) b \
           ON b.customer_id = c.id \
         LEFT JOIN (SELECT customer_id, SUM(remaining) AS rem FROM lots GROUP BY customer_id) l ON l.customer_id = c.id \
         WHERE b.bal != COALESCE(l.rem, 0) - c.debt",
    ),
    (
        "every entry traces to a source",
        "SELECT 'tx ' || id || ' (' || kind || ') names no ' || \
           CASE WHEN kind IN ('accrual','redemption') OR role = 'cancel' OR kind = 'reversal' THEN 'document' ELSE 'actor' END \
         FROM journal WHERE \
           ((kind IN ('accrual','redemption','reversal') OR role = 'cancel') AND document_id IS NULL) \
           OR (kind IN ('adjustment','writeoff') AND (actor IS NULL OR actor = '')) \
           OR (kind = 'bonus' AND document_id IS NULL AND idem_key IS NULL) \
           OR (kind = 'opening' AND idem_key IS NULL)",
    ),
    (
        "reversals name what they reverse",
        "SELECT 'tx ' || r.id || ' reverses ' || COALESCE(r.reverses, 'nothing') FROM journal r \
         LEFT JOIN journal o ON o.id = r.reverses \
         WHERE r.kind = 'reversal' AND (r.reverses IS NULL OR o.id IS NULL OR o.id >= r.id OR o.customer_id != r.customer_id)",
    ),
    (
        "a reversal takes back no more than its original",
        "SELECT 'tx ' || o.id || ' (' || o.amount || ') reversed by ' || SUM(r.amount) FROM journal o \
         JOIN journal r ON r.reverses = o.id AND r.role = 'effect' \
           AND NOT EXISTS (SELECT 1 FROM journal c WHERE c.reverses = r.id AND c.role = 'cancel') \
         GROUP BY o.id HAVING ABS(SUM(r.amount)) > ABS(o.amount) OR (o.amount > 0 AND SUM(r.amount) > 0) \
           OR (o.amount < 0 AND SUM(r.amount) < 0)",
    ),
    (
        "every cancelled effect is cancelled once, exactly",
        "SELECT 'tx ' || o.id || ' (' || o.amount || ') cancelled ' || COUNT(r.id) || ' times by ' || SUM(r.amount) \
         FROM journal o JOIN journal r ON r.reverses = o.id AND r.role = 'cancel' \
         GROUP BY o.id HAVING COUNT(r.id) != 1 OR SUM(r.amount) != -o.amount",
    ),
    (
        "void documents have no effect in force",
        "SELECT 'document ' || d.source || ':' || d.doc_id || ' is void but tx ' || j.id || ' is not cancelled' \
         FROM documents d JOIN journal j ON j.document_id = d.id AND j.role = 'effect' \
         WHERE d.state = 'void' AND NOT EXISTS (SELECT 1 FROM journal c WHERE c.reverses = j.id AND c.role = 'cancel')",
    ),
    (
        "only the current epoch of a document is in force",
        "SELECT 'document ' || d.source || ':' || d.doc_id || ' epoch ' || d.epoch || ' has tx ' || j.id || \
           ' of epoch ' || j.epoch || ' still in force' \
         FROM documents d JOIN journal j ON j.document_id = d.id AND j.role = 'effect' \
         WHERE j.epoch != d.epoch AND NOT EXISTS (SELECT 1 FROM journal c WHERE c.reverses = j.id AND c.role = 'cancel')",
    ),
    (
        "active documents are applied",
        "SELECT 'document ' || source || ':' || doc_id || ' is ' || state || ' with applied = ' || applied FROM documents \
         WHERE (state = 'active') != (applied = 1)",
    ),
    (
        "every bonus document names a journal transaction",
        "SELECT 'outbox row ' || o.id || ' (' || o.idem_key || ') names no journal transaction' FROM outbox o \
         WHERE o.destination = 'onec:bonus' AND NOT EXISTS (SELECT 1 FROM journal j \
           WHERE j.id = CAST(CASE WHEN o.idem_key LIKE 'b:%' THEN substr(o.idem_key, 3) \
                                 ELSE substr(o.idem_key, instr(o.idem_key, ':tx') + 3) END AS INTEGER))",
    ),
    (
        "kept totals equal the rows they count",
        "WITH counted (name, n, amount) AS ( \
           SELECT 'documents:' || state || ':' || COALESCE(kind, ''), COUNT(*), SUM(total) FROM documents GROUP BY 1 \
           UNION ALL SELECT 'journal:' || kind, COUNT(*), SUM(amount) FROM journal GROUP BY 1 \
           UNION ALL SELECT 'outbox:' || state || ':' || destination, COUNT(*), 0 FROM outbox \
             WHERE state != 'pending' GROUP BY 1 \
           UNION ALL SELECT 'holds:' || state, COUNT(*), 0 FROM holds GROUP BY 1 \
           UNION ALL SELECT 'customers', COUNT(*), 0 FROM customers \
           UNION ALL SELECT 'lots:undelayed_earned', 0, NULL) \
         SELECT 'total ' || c.name || ' kept as ' || COALESCE(t.n, 'nothing') || ' rows, ' || COALESCE(t.amount, 0) || \
           ' but counted ' || c.n || ' rows, ' || COALESCE(c.amount, 'any amount') \
         FROM counted c LEFT JOIN totals t ON t.name = c.name \
         WHERE t.name IS NULL AND (c.n != 0 OR c.name IN ('customers', 'lots:undelayed_earned')) \
           OR t.n != c.n OR t.amount != COALESCE(c.amount, t.amount) \
         UNION ALL \
         SELECT 'total ' || t.name || ' kept as ' || t.n || ' rows, ' || t.amount || ' but no such rows exist' \
         FROM totals t WHERE (t.n != 0 OR t.amount != 0) AND NOT EXISTS (SELECT 1 FROM counted c WHERE c.name = t.name) \
         UNION ALL \
         SELECT 'total lots:undelayed_earned kept as ' || t.amount || ' but a lot available when earned was earned at ' || l.m \
         FROM totals t, (SELECT MAX(earned_at) AS m FROM lots WHERE available_at <= earned_at) l \
         WHERE t.name = 'lots:undelayed_earned' AND l.m > t.amount",
    ),
    (
        "a document's counter shares read back",
        "SELECT 'document ' || source || ':' || doc_id || ' has counter shares that do not read back' FROM documents \
         WHERE (counters IS NOT NULL OR counter_priors IS NOT NULL) AND NOT counter_shares_ok(counters, counter_priors)",
    ),
    (
        "outbox rows are in a known state",
        "SELECT 'outbox row ' || id || ' superseded without a successor' FROM outbox \
         WHERE state = 'superseded' AND superseded_by IS NULL",
    ),
];

impl Ledger {
    pub fn verify(&self) -> Result<Vec<Violation>> {
        let mut out = Vec::new();
        for (check, sql) in CHECKS {
            let mut st = self.conn.prepare(sql)?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            for r in rows {
                out.push(Violation { check, detail: r? });
            }
        }
        let integrity: String = self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if integrity != "ok" {
            out.push(Violation {
                check: "sqlite integrity",
                detail: integrity,
            });
        }
        let fk: Option<String> = self
            .conn
            .query_row("PRAGMA foreign_key_check", [], |r| r.get::<_, String>(0))
            .ok();
        if let Some(table) = fk {
            out.push(Violation {
                check: "foreign keys",
                detail: format!("a row in {table} points at a missing row"),
            });
        }
        Ok(out)
    }
}
