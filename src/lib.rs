//! kopilka: a loyalty ledger between 1C:Enterprise and AmoCRM. See ARCHITECTURE.md.

pub mod amocrm;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod daemon;
pub mod ledger;
pub mod migrate;
pub mod notify;
pub mod onec;
pub mod rules_file;
pub mod scrub;
pub mod sim;
