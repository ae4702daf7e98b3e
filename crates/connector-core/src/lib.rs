#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod connector;
pub mod credentials;
pub mod document;
pub mod engine;
pub mod error;
pub mod filter;
pub mod home;
#[cfg(feature = "http")]
pub mod http;
pub mod metrics;
#[cfg(feature = "oauth")]
pub mod oauth;
#[cfg(feature = "scheduler")]
pub mod scheduler;

pub mod ids;
pub mod lease;
pub mod realtime;
pub mod state;
pub mod store;
#[cfg(feature = "webhooks")]
pub mod webhook;

pub use connector::{
    Batch, Capabilities, Checkpoint, Connector, ConnectorContext, Cursor, Cursors, ReadMode, ReadRequest,
};
#[cfg(feature = "aws-secrets-manager")]
pub use credentials::{AwsSecretsManagerConfig, AwsSecretsManagerCredentialProvider};
pub use credentials::{
    CachedCredentialProvider, ChainCredentialProvider, CredentialProvider, EnvCredentialProvider,
    ExposeSecret, SecretString, StaticCredentialProvider,
};
#[cfg(feature = "vault")]
pub use credentials::{VaultConfig, VaultCredentialProvider};
pub use document::{Change, Document, ItemFailure};

pub use error::{Error, ErrorKind, Result, RetryClass};
pub use ids::{ConnectorId, TenantId};
pub use realtime::{ChangeFeed, ChangeHint, ItemRef};

/// Re-exports for connector crates, so they share core's versions.
pub mod reexports {
    pub use async_trait::async_trait;
    /// The AWS SDK's configuration loader, for
    /// [`AwsSecretsManagerCredentialProvider::with_sdk_config`](crate::AwsSecretsManagerCredentialProvider::with_sdk_config).
    #[cfg(feature = "aws-secrets-manager")]
    pub use aws_config;
    /// The AWS Secrets Manager SDK the provider uses.
    #[cfg(feature = "aws-secrets-manager")]
    pub use aws_sdk_secretsmanager;
    pub use chrono;
    pub use futures;
    pub use secrecy;
    pub use serde_json;
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub use sqlx;
    pub use tokio_util;
    pub use tracing;
}
pub use engine::{StatusReport, SyncEngine, SyncOptions, SyncResult, SyncStatus, SyncTimings};
#[cfg(feature = "scheduler")]
pub use scheduler::{SchedulerOptions, SyncSchedule, SyncScheduler};
pub use state::{JsonFileStateStore, MemoryStateStore, StateStore, SyncState};
pub use store::{KnowledgeStore, SearchHit, StoredDocument};
