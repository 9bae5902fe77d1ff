//! Everything kopilka knows about 1C:Enterprise's wire formats lives under this module and
//! nowhere else: the rest of the program only ever sees core documents. `commerceml` reads
//! CommerceML 2 exchange files (documents, catalog, offers) as a stream, so a file of any
//! size costs the same memory, and turns each `Документ` into a core `Incoming` or, when it
//! cannot be converted, into a `Rejected` a person can act on.

pub mod commerceml;
pub mod exchange;
pub mod import;
pub mod mapping;
pub mod odata;
pub mod postback;
pub mod retention;
pub mod site_exchange;
