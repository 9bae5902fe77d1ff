//! Time enters the core only as a value. The trait lives here so the core can name it; the
//! implementations that read the system clock live outside the core (`crate::clock`).

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}
