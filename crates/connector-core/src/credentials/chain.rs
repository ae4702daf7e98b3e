//! Provider combinators: [`ChainCredentialProvider`] and [`CachedCredentialProvider`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tokio::time::Instant;

use super::{CredentialProvider, validate_key};
use crate::error::{Error, Result};

/// Several providers asked in order.
///
/// # Rules
/// - **Reads**: the first provider that holds the key wins; later providers are not asked.
///   A provider that fails (Vault unreachable, access denied) fails the read: the chain does
///   not fall through to a later provider, which could hold another, stale value.
/// - **Writes** go to the first provider that [is writable](CredentialProvider::is_writable)
///   (the environment is not), and only to it. When no provider is writable, writes fail.
/// - Because reads prefer earlier providers, a key that an earlier provider holds shadows a
///   value written to a later one. Put the store of rotating secrets (OAuth2 refresh tokens)
///   before read-only sources, or keep those keys out of the read-only sources.
///
/// ```
/// # use std::sync::Arc;
/// use connector_core::credentials::{ChainCredentialProvider, EnvCredentialProvider, StaticCredentialProvider};
///
/// let chain = ChainCredentialProvider::new()
///     .then(Arc::new(EnvCredentialProvider::new()))
///     .then(Arc::new(StaticCredentialProvider::new()));
/// ```
#[derive(Default)]
pub struct ChainCredentialProvider {
    providers: Vec<Arc<dyn CredentialProvider>>,
}

impl std::fmt::Debug for ChainCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let providers: Vec<String> = self.providers.iter().map(|p| p.describe()).collect();
        f.debug_struct("ChainCredentialProvider").field("providers", &providers).finish()
    }
}

impl ChainCredentialProvider {
    /// An empty chain: it holds no key and cannot be written.
    pub fn new() -> Self {
        Self::default()
    }

    /// A chain of `providers`, asked in this order.
    pub fn from_providers(providers: Vec<Arc<dyn CredentialProvider>>) -> Self {
        Self { providers }
    }

    /// Appends `provider`: it is asked after the ones already in the chain.
    pub fn then(mut self, provider: Arc<dyn CredentialProvider>) -> Self {
        self.providers.push(provider);
        self
    }

    /// The providers, in order.
    pub fn providers(&self) -> &[Arc<dyn CredentialProvider>] {
        &self.providers
    }
}

#[async_trait]
impl CredentialProvider for ChainCredentialProvider {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        validate_key(key)?;
        for provider in &self.providers {
            if let Some(value) = provider.get_credential(key).await? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        validate_key(key)?;
        match self.providers.iter().find(|p| p.is_writable()) {
            Some(provider) => provider.set_credential(key, value).await,
            None => Err(Error::config(format!(
                "cannot store credential `{key}`: no writable provider in {}",
                self.describe()
            ))),
        }
    }

    fn describe(&self) -> String {
        if self.providers.is_empty() {
            return "an empty credential chain".into();
        }
        let names: Vec<String> = self.providers.iter().map(|p| p.describe()).collect();
        format!("credential chain: {}", names.join(", then "))
    }

    fn location_of(&self, key: &str) -> String {
        if self.providers.is_empty() {
            return self.describe();
        }
        let places: Vec<String> = self.providers.iter().map(|p| p.location_of(key)).collect();
        places.join(" or ")
    }

    fn is_writable(&self) -> bool {
        self.providers.iter().any(|p| p.is_writable())
    }
}

/// A provider with a cache in front: found values are kept for a TTL (60 s by default).
///
/// - A hit within the TTL does not ask the inner provider.
/// - Misses (`Ok(None)`) and errors are not cached: the next read asks again.
/// - `set_credential` writes through to the inner provider, then caches the new value; when the
///   write fails, the key's entry is dropped (the stored value may have changed).
/// - Other processes' writes are seen once the entry expires.
pub struct CachedCredentialProvider<P> {
    inner: P,
    ttl: Duration,
    entries: Mutex<HashMap<String, (SecretString, Instant)>>,
}

impl<P: CredentialProvider + std::fmt::Debug> std::fmt::Debug for CachedCredentialProvider<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.entries.lock().expect("poisoned").len();
        f.debug_struct("CachedCredentialProvider")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .field("cached", &cached)
            .finish()
    }
}

impl<P: CredentialProvider> CachedCredentialProvider<P> {
    /// The default time a value stays cached.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

    /// Caches `inner`'s values for [`Self::DEFAULT_TTL`].
    pub fn new(inner: P) -> Self {
        Self::with_ttl(inner, Self::DEFAULT_TTL)
    }

    /// Caches `inner`'s values for `ttl`.
    pub fn with_ttl(inner: P, ttl: Duration) -> Self {
        Self { inner, ttl, entries: Mutex::default() }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Forgets the cached value of `key`.
    pub fn invalidate(&self, key: &str) {
        self.entries.lock().expect("poisoned").remove(key);
    }

    /// Forgets all cached values.
    pub fn clear(&self) {
        self.entries.lock().expect("poisoned").clear();
    }

    fn store(&self, key: &str, value: SecretString) {
        let expires = Instant::now() + self.ttl;
        self.entries.lock().expect("poisoned").insert(key.to_owned(), (value, expires));
    }
}

#[async_trait]
impl<P: CredentialProvider> CredentialProvider for CachedCredentialProvider<P> {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        validate_key(key)?;
        {
            let mut entries = self.entries.lock().expect("poisoned");
            match entries.get(key) {
                Some((value, expires)) if Instant::now() < *expires => return Ok(Some(value.clone())),
                Some(_) => {
                    entries.remove(key);
                }
                None => {}
            }
        }
        let value = self.inner.get_credential(key).await?;
        if let Some(value) = &value {
            self.store(key, value.clone());
        }
        Ok(value)
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        validate_key(key)?;
        match self.inner.set_credential(key, value.clone()).await {
            Ok(()) => {
                self.store(key, value);
                Ok(())
            }
            Err(e) => {
                self.invalidate(key);
                Err(e)
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} (cached for {} s)", self.inner.describe(), self.ttl.as_secs())
    }

    fn location_of(&self, key: &str) -> String {
        self.inner.location_of(key)
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use secrecy::ExposeSecret;

    use super::*;
    use crate::credentials::{EnvCredentialProvider, StaticCredentialProvider};
    use crate::error::ErrorKind;

    /// A static provider that counts reads and can be made read-only or failing.
    #[derive(Default)]
    struct Probe {
        name: &'static str,
        values: StaticCredentialProvider,
        reads: AtomicUsize,
        read_only: bool,
        failing: bool,
    }

    impl Probe {
        fn new(name: &'static str) -> Self {
            Self { name, ..Self::default() }
        }
        fn with(mut self, key: &str, value: &str) -> Self {
            self.values = self.values.with(key, value);
            self
        }
        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    impl std::fmt::Debug for Probe {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.name)
        }
    }

    #[async_trait]
    impl CredentialProvider for Probe {
        async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing {
                return Err(Error::transient(format!("{} is down", self.name)));
            }
            self.values.get_credential(key).await
        }
        async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
            if self.failing {
                return Err(Error::transient(format!("{} is down", self.name)));
            }
            self.values.set_credential(key, value).await
        }
        fn describe(&self) -> String {
            self.name.into()
        }
        fn location_of(&self, key: &str) -> String {
            format!("{key} in {}", self.name)
        }
        fn is_writable(&self) -> bool {
            !self.read_only
        }
    }

    async fn read(p: &dyn CredentialProvider, key: &str) -> Option<String> {
        p.get_credential(key).await.unwrap().map(|v| v.expose_secret().to_owned())
    }

    #[tokio::test]
    async fn chain_reads_from_the_first_provider_that_holds_the_key() {
        let first = Arc::new(Probe::new("first").with("a", "1"));
        let second = Arc::new(Probe::new("second").with("a", "2").with("b", "3"));
        let chain = ChainCredentialProvider::new().then(first.clone()).then(second.clone());

        assert_eq!(read(&chain, "a").await.as_deref(), Some("1"));
        assert_eq!(second.reads(), 0, "a hit in the first provider does not ask the second");
        assert_eq!(read(&chain, "b").await.as_deref(), Some("3"));
        assert_eq!(read(&chain, "c").await, None);
        assert_eq!((first.reads(), second.reads()), (3, 2));
        assert_eq!(chain.describe(), "credential chain: first, then second");
        assert_eq!(chain.location_of("c"), "c in first or c in second");
        assert!(chain.get_credential("Bad-Key").await.is_err());
    }

    #[tokio::test]
    async fn chain_does_not_fall_through_a_failing_provider() {
        let down = Arc::new(Probe { failing: true, ..Probe::new("down") });
        let backup = Arc::new(Probe::new("backup").with("a", "stale"));
        let chain = ChainCredentialProvider::from_providers(vec![down, backup.clone()]);
        let err = chain.get_credential("a").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient);
        assert_eq!(backup.reads(), 0);
    }

    #[tokio::test]
    async fn chain_writes_to_the_first_writable_provider() {
        let env = Arc::new(EnvCredentialProvider::with_prefix("CHAINTEST_"));
        let read_only = Arc::new(Probe { read_only: true, ..Probe::new("read-only") });
        let store = Arc::new(Probe::new("store"));
        let chain =
            ChainCredentialProvider::new().then(env.clone()).then(read_only.clone()).then(store.clone());
        assert!(chain.is_writable());

        chain.set_credential("token", SecretString::from("new")).await.unwrap();
        assert_eq!(read(store.as_ref(), "token").await.as_deref(), Some("new"));
        assert_eq!(read(env.as_ref(), "token").await, None, "the environment is not written");
        assert_eq!(read(read_only.as_ref(), "token").await, None);
        assert_eq!(read(&chain, "token").await.as_deref(), Some("new"));

        let unwritable = ChainCredentialProvider::new().then(env);
        assert!(!unwritable.is_writable());
        let err = unwritable.set_credential("token", SecretString::from("x")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("no writable provider"), "{err}");
    }

    #[tokio::test]
    async fn empty_chain_holds_nothing() {
        let chain = ChainCredentialProvider::new();
        assert_eq!(read(&chain, "a").await, None);
        assert!(!chain.is_writable());
        assert_eq!(chain.location_of("a"), "an empty credential chain");
    }

    #[tokio::test(start_paused = true)]
    async fn cache_serves_hits_until_the_ttl_ends() {
        let cached =
            CachedCredentialProvider::with_ttl(Probe::new("inner").with("a", "1"), Duration::from_secs(10));
        assert_eq!(read(&cached, "a").await.as_deref(), Some("1"));
        assert_eq!(read(&cached, "a").await.as_deref(), Some("1"));
        assert_eq!(cached.inner().reads(), 1, "the second read is a cache hit");

        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(read(&cached, "a").await.as_deref(), Some("1"));
        assert_eq!(cached.inner().reads(), 2, "an expired entry is read again");

        cached.invalidate("a");
        assert_eq!(read(&cached, "a").await.as_deref(), Some("1"));
        assert_eq!(cached.inner().reads(), 3);
        assert_eq!(cached.describe(), "inner (cached for 10 s)");
    }

    #[tokio::test]
    async fn cache_does_not_keep_misses_or_errors() {
        let cached = CachedCredentialProvider::new(Probe::new("inner"));
        assert_eq!(read(&cached, "a").await, None);
        assert_eq!(read(&cached, "a").await, None);
        assert_eq!(cached.inner().reads(), 2);

        let failing = CachedCredentialProvider::new(Probe { failing: true, ..Probe::new("down") });
        assert!(failing.get_credential("a").await.is_err());
        assert!(failing.get_credential("a").await.is_err());
        assert_eq!(failing.inner().reads(), 2);
    }

    #[tokio::test]
    async fn cache_writes_through_and_keeps_the_new_value() {
        let cached = CachedCredentialProvider::new(Probe::new("inner").with("a", "old"));
        assert_eq!(read(&cached, "a").await.as_deref(), Some("old"));
        cached.set_credential("a", SecretString::from("new")).await.unwrap();
        assert_eq!(read(cached.inner(), "a").await.as_deref(), Some("new"), "written through");
        let reads = cached.inner().reads();
        assert_eq!(read(&cached, "a").await.as_deref(), Some("new"));
        assert_eq!(cached.inner().reads(), reads, "the written value is served from the cache");
        assert!(cached.is_writable());
        assert!(!format!("{cached:?}").contains("new"));
    }

    #[tokio::test]
    async fn cache_drops_the_entry_when_a_write_fails() {
        let cached = CachedCredentialProvider::new(Probe { failing: true, ..Probe::new("down") });
        cached.store("a", SecretString::from("old"));
        assert!(cached.set_credential("a", SecretString::from("new")).await.is_err());
        assert!(
            cached.get_credential("a").await.is_err(),
            "the old value is not served after a failed write"
        );
    }
}
