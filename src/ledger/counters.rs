//! A document's counter shares (stamps, spend toward a threshold), packed into its own row.
//!
//! Every sale sums its customer's earlier shares of each counter (`state::customer_state`).
//! Kept in a table of their own keyed by document, that sum fetched one row per earlier
//! document, each on a page of its own in a large ledger: at a million sales the largest
//! single piece of a sale's time (15 %). Packed into the document row and carried by the
//! customer's index (`documents_customer`, migration 36), the sum never leaves the index,
//! and the ledger is smaller (no key repeated per share).
//!
//! Two columns, because only the amounts are summed: `counters` (in the index) holds each
//! share as the counter's key in `counter_names` and the amount; `counter_priors` (the row
//! only) holds what each counter held when the sale added to it, in the same order. Both are
//! LEB128 varints, signed values zig-zag coded. SQLite reads them through the functions
//! [`register`] adds to every connection of the ledger: the view `document_counters` shows
//! them as the rows they were before.

use rusqlite::Connection;
use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::ValueRef;

/// One counter's share in a document: the counter's key, the amount, the counter before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Share {
    pub counter: i64,
    pub amount: i64,
    pub prior: Option<i64>,
}

fn put(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Reads one varint; `None` on a truncated or overlong one (a damaged row, never a panic).
/// Wider than an `i64`'s code, so a prior's code plus one (below) never wraps.
fn take(bytes: &mut &[u8]) -> Option<u128> {
    let mut v = 0u128;
    for shift in (0..128).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u128::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The two column values for a document's shares: merged by counter (a counter named twice
/// adds up and keeps the first prior, as the rows' `ON CONFLICT` did), ordered by key;
/// `None` for a column with nothing to say.
pub(crate) fn pack(shares: &[Share]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let mut merged: Vec<Share> = Vec::with_capacity(shares.len());
    for s in shares {
        match merged.iter_mut().find(|m| m.counter == s.counter) {
            Some(m) => m.amount = m.amount.saturating_add(s.amount),
            None => merged.push(*s),
        }
    }
    merged.sort_by_key(|s| s.counter);
    if merged.is_empty() {
        return (None, None);
    }
    let mut counters = Vec::with_capacity(merged.len() * 4);
    let mut priors = Vec::with_capacity(merged.len() * 4);
    for s in &merged {
        put(&mut counters, zigzag(s.counter).into());
        put(&mut counters, zigzag(s.amount).into());
        // 0: none; otherwise the zig-zag code plus one
        put(&mut priors, s.prior.map_or(0, |p| u128::from(zigzag(p)) + 1));
    }
    let any_prior = merged.iter().any(|s| s.prior.is_some());
    (Some(counters), any_prior.then_some(priors))
}

/// The shares packed in a document's two columns; `None` when they are damaged.
pub(crate) fn unpack(counters: &[u8], priors: Option<&[u8]>) -> Option<Vec<Share>> {
    let mut c = counters;
    let mut p = priors.unwrap_or(&[]);
    let mut out = Vec::new();
    while !c.is_empty() {
        let counter = unzigzag(u64::try_from(take(&mut c)?).ok()?);
        let amount = unzigzag(u64::try_from(take(&mut c)?).ok()?);
        let prior = if priors.is_some() {
            match take(&mut p)? {
                0 => None,
                v => Some(unzigzag(u64::try_from(v - 1).ok()?)),
            }
        } else {
            None
        };
        out.push(Share {
            counter,
            amount,
            prior,
        });
    }
    // a prior for a share that is not there: the two columns disagree
    p.is_empty().then_some(out)
}

fn damaged() -> rusqlite::Error {
    rusqlite::Error::UserFunctionError("a document's packed counters are damaged".into())
}

fn blob<'a>(ctx: &'a Context<'_>, i: usize) -> rusqlite::Result<Option<&'a [u8]>> {
    match ctx.get_raw(i) {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(b) => Ok(Some(b)),
        _ => Err(damaged()),
    }
}

fn share_of(ctx: &Context<'_>) -> rusqlite::Result<Option<Share>> {
    let Some(counters) = blob(ctx, 0)? else {
        return Ok(None);
    };
    let priors = if ctx.len() > 2 { blob(ctx, 1)? } else { None };
    let Some(counter) = ctx.get::<Option<i64>>(ctx.len() - 1)? else {
        return Ok(None);
    };
    let shares = unpack(counters, priors).ok_or_else(damaged)?;
    Ok(shares.into_iter().find(|s| s.counter == counter))
}

/// `counter_pack(list, which)` for the migration that moved the rows into the documents:
/// `list` is `counter:amount:prior` items joined by commas (prior empty when none); `which`
/// 0 gives the `counters` column, 1 the `counter_priors` one.
fn pack_list(ctx: &Context<'_>) -> rusqlite::Result<Option<Vec<u8>>> {
    let Some(list) = ctx.get::<Option<String>>(0)? else {
        return Ok(None);
    };
    let which: i64 = ctx.get(1)?;
    let mut shares = Vec::new();
    for item in list.split(',') {
        let mut f = item.split(':');
        let mut num = || f.next().map(str::trim).unwrap_or("");
        let (counter, amount, prior) = (num(), num(), num());
        let bad = || rusqlite::Error::UserFunctionError(format!("counter_pack: bad item {item:?}").into());
        shares.push(Share {
            counter: counter.parse().map_err(|_| bad())?,
            amount: amount.parse().map_err(|_| bad())?,
            prior: if prior.is_empty() {
                None
            } else {
                Some(prior.parse().map_err(|_| bad())?)
            },
        });
    }
    let (counters, priors) = pack(&shares);
    Ok(if which == 0 { counters } else { priors })
}

/// Adds the functions that read packed counters to a connection: `counter_amount(counters,
/// key)` (0 when the document has no share of it), `counter_has(counters, key)`,
/// `counter_prior(counters, priors, key)`, the migration's `counter_pack` and `ledger
/// verify`'s `counter_shares_ok(counters, priors)`. Every
/// connection of the ledger has them; a plain `sqlite3` shell does not, so it cannot read
/// the view `document_counters` (the rest of the ledger reads as before).
pub fn register(conn: &Connection) -> rusqlite::Result<()> {
    let flags =
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC | FunctionFlags::SQLITE_INNOCUOUS;
    conn.create_scalar_function("counter_amount", 2, flags, |ctx| {
        Ok(share_of(ctx)?.map_or(0, |s| s.amount))
    })?;
    conn.create_scalar_function("counter_has", 2, flags, |ctx| Ok(share_of(ctx)?.is_some()))?;
    conn.create_scalar_function("counter_prior", 3, flags, |ctx| {
        Ok(share_of(ctx)?.and_then(|s| s.prior))
    })?;
    conn.create_scalar_function("counter_pack", 2, flags, pack_list)?;
    // for `ledger verify`: whether a document's two columns read back (never an error)
    conn.create_scalar_function("counter_shares_ok", 2, flags, |ctx| {
        Ok(match (ctx.get_raw(0), ctx.get_raw(1)) {
            (ValueRef::Null, ValueRef::Null) => true,
            (ValueRef::Blob(c), ValueRef::Null) => unpack(c, None).is_some(),
            (ValueRef::Blob(c), ValueRef::Blob(p)) => unpack(c, Some(p)).is_some(),
            _ => false,
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn share() -> impl Strategy<Value = Share> {
        (0i64..6, any::<i64>(), proptest::option::of(any::<i64>())).prop_map(|(counter, amount, prior)| {
            Share {
                counter,
                amount,
                prior,
            }
        })
    }

    proptest! {
        /// What is packed reads back: one share per counter, amounts added up, the first
        /// prior kept — the old rows' `ON CONFLICT … amount = amount + excluded.amount`.
        #[test]
        fn packed_shares_read_back(shares in proptest::collection::vec(share(), 0..8)) {
            let (counters, priors) = pack(&shares);
            let mut expected: Vec<Share> = Vec::new();
            for s in &shares {
                match expected.iter_mut().find(|e| e.counter == s.counter) {
                    Some(e) => e.amount = e.amount.saturating_add(s.amount),
                    None => expected.push(*s),
                }
            }
            expected.sort_by_key(|s| s.counter);
            match counters {
                None => prop_assert!(expected.is_empty()),
                Some(c) => prop_assert_eq!(unpack(&c, priors.as_deref()), Some(expected)),
            }
        }
    }

    /// The extremes read back exactly: `i64::MIN`'s code plus one does not fit 64 bits.
    #[test]
    fn the_extremes_read_back() {
        let shares = [
            Share {
                counter: 0,
                amount: i64::MIN,
                prior: Some(i64::MIN),
            },
            Share {
                counter: 1,
                amount: i64::MAX,
                prior: Some(i64::MAX),
            },
            Share {
                counter: 2,
                amount: -1,
                prior: Some(-1),
            },
            Share {
                counter: 3,
                amount: 0,
                prior: None,
            },
        ];
        let (c, p) = pack(&shares);
        assert_eq!(unpack(&c.unwrap(), p.as_deref()), Some(shares.to_vec()));
    }

    #[test]
    fn sql_reads_what_rust_packed() {
        let conn = Connection::open_in_memory().unwrap();
        register(&conn).unwrap();
        let (c, p) = pack(&[
            Share {
                counter: 2,
                amount: 2_459_468,
                prior: Some(300_000),
            },
            Share {
                counter: 1,
                amount: 3,
                prior: None,
            },
        ]);
        let row: (i64, i64, i64, bool, Option<i64>, Option<i64>) = conn
            .query_row(
                "SELECT counter_amount(?1, 2), counter_amount(?1, 1), counter_amount(?1, 7), \
                 counter_has(?1, 7), counter_prior(?1, ?2, 2), counter_prior(?1, ?2, 1)",
                rusqlite::params![c, p],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(row, (2_459_468, 3, 0, false, Some(300_000), None));
        let from_list: (Vec<u8>, Vec<u8>) = conn
            .query_row(
                "SELECT counter_pack('2:2459468:300000,1:3:', 0), counter_pack('2:2459468:300000,1:3:', 1)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((Some(from_list.0), Some(from_list.1)), (c.clone(), p.clone()));
        let err = conn.query_row("SELECT counter_amount(x'ff', 1)", [], |r| r.get::<_, i64>(0));
        assert!(err.is_err(), "a truncated varint is an error: {err:?}");
        let mut one_too_many = p.clone().unwrap();
        one_too_many.push(2);
        let ok: (bool, bool, bool, bool, bool) = conn
            .query_row(
                "SELECT counter_shares_ok(?1, ?2), counter_shares_ok(NULL, NULL), counter_shares_ok(x'ff', NULL), \
                 counter_shares_ok(?1, ?3), counter_shares_ok(NULL, ?2)",
                rusqlite::params![c, p, one_too_many],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(
            ok,
            (true, true, false, false, false),
            "what was packed reads back; a truncated share, a prior too many and priors without shares do not"
        );
    }
}
