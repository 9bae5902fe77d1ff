//! The pure core: domain types, rules and ledger arithmetic.
//!
//! Nothing in here performs I/O, reads the clock or knows a wire format: connectors convert
//! to these types at their boundary, the ledger stores what these functions decide.
//! `tests/core_purity.rs` fails the build if an I/O crate is imported here.

pub mod backoff;
pub mod bot;
pub mod clawback;
pub mod clock;
pub mod document;
pub mod effects;
pub mod identity;
pub mod journal;
pub mod lots;
pub mod money;
pub mod notify;
pub mod offers;
pub mod program;
pub mod rules;
pub mod simulate;
pub mod words;
