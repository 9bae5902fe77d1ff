//! Simulated surroundings for `kopilka demo`, benchmarks and tests: synthetic shops, and
//! (with the connector issues) simulators of 1C and AmoCRM that speak the real protocols.

pub mod amocrm;
pub mod commerceml;
pub mod onec_odata;
pub mod onec_orders;
pub mod onec_site;
pub mod sales;
pub mod smtp;
pub mod telegram;
