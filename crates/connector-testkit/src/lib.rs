//! Test servers, vendor fakes and the conformance suite.
//!
//! - [`postgres`]: a real PostgreSQL server per test run ([`PgServer`]).
//! - [`moto`]: moto, a local AWS Secrets Manager ([`MotoServer`]).
//! - [`vault`]: a HashiCorp Vault fake, KV v2 and AppRole ([`VaultFake`]; feature `conformance`).
#![deny(missing_docs)]

pub mod moto;
pub mod postgres;
#[cfg(feature = "conformance")]
pub mod vault;

pub use moto::MotoServer;
pub use postgres::PgServer;
#[cfg(feature = "conformance")]
pub use vault::VaultFake;
