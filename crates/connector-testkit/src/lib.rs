//! Test servers, vendor fakes and the conformance suite.
//!
//! - [`postgres`]: a real PostgreSQL server per test run ([`PgServer`]).
#![deny(missing_docs)]

pub mod postgres;

pub use postgres::PgServer;
