//! Credentials: the [`CredentialProvider`] trait and the default [`EnvCredentialProvider`].
//!
//! Other providers: [`StaticCredentialProvider`] (in memory), `VaultCredentialProvider` (HashiCorp
//! Vault KV v2, cargo feature `vault`), `AwsSecretsManagerCredentialProvider` (AWS Secrets
//! Manager, cargo feature `aws-secrets-manager`), and the combinators [`ChainCredentialProvider`]
//! (several sources in order) and [`CachedCredentialProvider`] (a TTL cache in front of a
//! provider).
//!
//! A key is a lowercase snake name, the guide's environment variable without its prefix:
//! `postgres_password`, `github_token`. Values are [`SecretString`]s: they never appear in
//! `Debug` output, logs or error messages.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
pub use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

#[cfg(feature = "aws-secrets-manager")]
mod aws;
mod chain;
#[cfg(feature = "vault")]
mod vault;

#[cfg(feature = "aws-secrets-manager")]
pub use aws::{AwsSecretsManagerConfig, AwsSecretsManagerCredentialProvider, SecretVersion};
pub use chain::{CachedCredentialProvider, ChainCredentialProvider};
#[cfg(feature = "vault")]
pub use vault::{VaultConfig, VaultCredentialProvider};

/// A source of secrets.
///
/// # Behavior
/// - `get_credential` returns `Ok(None)` when the provider does not hold the key, and an
///   error only when the provider itself failed (unreachable, access denied).
/// - Errors name the key, never the value.
#[async_trait]
pub trait CredentialProvider: Send + Sync {
    /// Reads the secret stored under `key`.
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>>;

    /// Stores `value` under `key` (used for rotated OAuth2 tokens).
    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()>;

    /// A short description for messages (`environment variables ARAGORA_*`).
    fn describe(&self) -> String;

    /// Where `key` would be looked up, for error messages (`ARAGORA_POSTGRES_PASSWORD`).
    fn location_of(&self, key: &str) -> String {
        format!("{key} in {}", self.describe())
    }

    /// Whether `set_credential` stores values where restarts and other processes see them.
    /// [`ChainCredentialProvider`] writes to the first provider that is writable.
    fn is_writable(&self) -> bool {
        true
    }
}

/// Checks that `key` is a lowercase snake name.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > 128
        || !key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::config(format!(
            "credential key {key:?} must be a lowercase snake name such as `postgres_password`"
        )));
    }
    Ok(())
}

/// Reads `ARAGORA_<KEY>` (the key in upper case) from the process environment.
///
/// `set_credential` keeps the value in memory for the life of the process (the environment
/// cannot be written back durably); use a secret manager where tokens rotate.
#[derive(Default)]
pub struct EnvCredentialProvider {
    prefix: String,
    overrides: Mutex<HashMap<String, SecretString>>,
}

impl std::fmt::Debug for EnvCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvCredentialProvider").field("prefix", &self.prefix()).finish_non_exhaustive()
    }
}

impl EnvCredentialProvider {
    /// The provider with the default prefix `ARAGORA_`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A provider with another prefix (`MYAPP_`).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into(), overrides: Mutex::default() }
    }

    fn prefix(&self) -> &str {
        if self.prefix.is_empty() { "ARAGORA_" } else { &self.prefix }
    }

    /// The variable that holds `key`.
    pub fn variable(&self, key: &str) -> String {
        format!("{}{}", self.prefix(), key.to_ascii_uppercase())
    }
}

#[async_trait]
impl CredentialProvider for EnvCredentialProvider {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        validate_key(key)?;
        if let Some(v) = self.overrides.lock().expect("poisoned").get(key) {
            return Ok(Some(v.clone()));
        }
        match std::env::var(self.variable(key)) {
            Ok(v) if !v.is_empty() => Ok(Some(SecretString::from(v))),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::config(format!("environment variable {} is not valid UTF-8", self.variable(key))))
            }
        }
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        validate_key(key)?;
        self.overrides.lock().expect("poisoned").insert(key.to_owned(), value);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("environment variables {}*", self.prefix())
    }

    fn location_of(&self, key: &str) -> String {
        format!("environment variable {}", self.variable(key))
    }

    /// False: written values live in this process only.
    fn is_writable(&self) -> bool {
        false
    }
}

/// An in-memory provider, for tests and for library users who hold secrets themselves.
#[derive(Default)]
pub struct StaticCredentialProvider {
    values: Mutex<HashMap<String, SecretString>>,
}

impl std::fmt::Debug for StaticCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self.values.lock().expect("poisoned").keys().cloned().collect();
        f.debug_struct("StaticCredentialProvider").field("keys", &keys).finish()
    }
}

impl StaticCredentialProvider {
    /// An empty provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` = `value`.
    pub fn with(self, key: &str, value: impl Into<String>) -> Self {
        self.values.lock().expect("poisoned").insert(key.to_owned(), SecretString::from(value.into()));
        self
    }
}

#[async_trait]
impl CredentialProvider for StaticCredentialProvider {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        validate_key(key)?;
        Ok(self.values.lock().expect("poisoned").get(key).cloned())
    }
    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        validate_key(key)?;
        self.values.lock().expect("poisoned").insert(key.to_owned(), value);
        Ok(())
    }
    fn describe(&self) -> String {
        "in-memory credentials".into()
    }
}

/// Reads a credential that must exist, with an error that says where it was looked for.
pub async fn require_credential(provider: &dyn CredentialProvider, key: &str) -> Result<SecretString> {
    provider
        .get_credential(key)
        .await?
        .ok_or_else(|| Error::auth(format!("missing credential `{key}`: set {}", provider.location_of(key))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn env_provider_reads_prefixed_upper_case() {
        // SAFETY: the variable name is unique to this test.
        unsafe { std::env::set_var("CORETEST_SOME_TOKEN", "s3cr3t") };
        let p = EnvCredentialProvider::with_prefix("CORETEST_");
        let v = p.get_credential("some_token").await.unwrap().unwrap();
        assert_eq!(v.expose_secret(), "s3cr3t");
        assert!(p.get_credential("absent_key").await.unwrap().is_none());
        assert!(!format!("{v:?}").contains("s3cr3t"));
        assert!(p.get_credential("Bad-Key").await.is_err());
        let err = require_credential(&p, "absent_key").await.unwrap_err().to_string();
        assert_eq!(err, "missing credential `absent_key`: set environment variable CORETEST_ABSENT_KEY");
    }
}
