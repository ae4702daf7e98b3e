#![doc = include_str!("../docs.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
pub mod config;
mod connector;
mod decode;
mod fetch;
mod listener;
mod reader;
mod sql;
mod tls;

pub use client::{CONNECT_TIMEOUT, PASSWORD_KEY, USER_KEY};
pub use config::{PostgresConfig, SslMode};
pub use connector::PostgresConnector;
pub use sql::KeysetCursor;

/// The connector type, as in `type = "postgres"`.
pub const KIND: &str = "postgres";
