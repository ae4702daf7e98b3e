//! Leases: several `connectors run` processes sharing one PostgreSQL store split the
//! connectors between them, and a dead process's connectors move to the living.
//!
//! Each process (a *holder*) runs a [`LeaseManager`]. Every cycle (a third of the lease TTL) it
//! heartbeats, renews the leases it holds, counts the live holders, and takes free or expired
//! leases until it holds its fair share, `ceil(connectors / live holders)`; above its share it
//! gives back leases of connectors that are not running. The scheduler runs a connector only
//! while this process [holds](LeaseManager::holds) its lease, so each scheduled run happens in
//! one process; the run's time lives in the shared state store, so a connector that changes
//! hands keeps its schedule. A killed process stops renewing: its leases expire after the TTL
//! and the others take them.
//!
//! Expiry is judged by the database's clock (`now()`), never by the processes' clocks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::ids::{ConnectorId, TenantId};

/// What a lease is for: one connector of one tenant.
pub type LeaseKey = (ConnectorId, TenantId);

/// Where leases live.
///
/// # Behavior
/// - `acquire` grants a lease that is free, expired, or already the holder's, and fails
///   otherwise; it is atomic across processes.
/// - Times are the store's; `ttl` is counted from the call.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Records that `holder` is alive; returns how many holders were seen within `ttl`.
    async fn heartbeat(&self, holder: &str, ttl: Duration) -> Result<usize>;
    /// Takes `key` for `holder` until `ttl` from now, if free, expired or already its own.
    async fn acquire(&self, key: &LeaseKey, holder: &str, ttl: Duration) -> Result<bool>;
    /// Extends every lease `holder` still holds; returns them.
    async fn renew(&self, holder: &str, ttl: Duration) -> Result<BTreeSet<LeaseKey>>;
    /// Gives `key` back, if `holder` holds it.
    async fn release(&self, key: &LeaseKey, holder: &str) -> Result<()>;
    /// Where the leases are, for messages.
    fn describe(&self) -> String;
}

/// Leases in memory: one process (tests, and `connectors run` without a shared store), or
/// several simulated holders in tests. `advance` moves its clock.
#[derive(Debug, Default)]
pub struct MemoryLeaseStore {
    inner: Mutex<MemoryLeases>,
}

#[derive(Debug, Default)]
struct MemoryLeases {
    offset: Duration,
    leases: BTreeMap<LeaseKey, (String, DateTime<Utc>)>,
    holders: BTreeMap<String, DateTime<Utc>>,
}

impl MemoryLeases {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }
}

impl MemoryLeaseStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the store's clock forward (tests of expiry).
    pub fn advance(&self, by: Duration) {
        self.inner.lock().expect("poisoned").offset += by;
    }

    /// Who holds `key` now, if anyone.
    pub fn holder_of(&self, key: &LeaseKey) -> Option<String> {
        let inner = self.inner.lock().expect("poisoned");
        let now = inner.now();
        inner.leases.get(key).filter(|(_, until)| *until > now).map(|(h, _)| h.clone())
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn heartbeat(&self, holder: &str, ttl: Duration) -> Result<usize> {
        let mut inner = self.inner.lock().expect("poisoned");
        let now = inner.now();
        inner.holders.insert(holder.to_owned(), now);
        let since = now - ttl;
        Ok(inner.holders.values().filter(|seen| **seen > since).count())
    }

    async fn acquire(&self, key: &LeaseKey, holder: &str, ttl: Duration) -> Result<bool> {
        let mut inner = self.inner.lock().expect("poisoned");
        let now = inner.now();
        let free = match inner.leases.get(key) {
            None => true,
            Some((h, until)) => h == holder || *until <= now,
        };
        if free {
            inner.leases.insert(key.clone(), (holder.to_owned(), now + ttl));
        }
        Ok(free)
    }

    async fn renew(&self, holder: &str, ttl: Duration) -> Result<BTreeSet<LeaseKey>> {
        let mut inner = self.inner.lock().expect("poisoned");
        let now = inner.now();
        let mut held = BTreeSet::new();
        for (key, (h, until)) in inner.leases.iter_mut() {
            if h == holder && *until > now {
                *until = now + ttl;
                held.insert(key.clone());
            }
        }
        Ok(held)
    }

    async fn release(&self, key: &LeaseKey, holder: &str) -> Result<()> {
        let mut inner = self.inner.lock().expect("poisoned");
        if inner.leases.get(key).is_some_and(|(h, _)| h == holder) {
            inner.leases.remove(key);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory leases".into()
    }
}

/// Leases in PostgreSQL (tables `connector_leases` and `connector_holders`, created when
/// missing), for processes sharing a PostgreSQL store.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PgLeaseStore {
    pool: sqlx::PgPool,
}

#[cfg(feature = "postgres")]
impl PgLeaseStore {
    /// Leases in the database of `pool` (the store's or the state store's pool).
    pub async fn new(pool: sqlx::PgPool) -> Result<Self> {
        let fail = |e| crate::Error::state("creating the lease tables").with_source(e);
        // Serialized: concurrent CREATE TABLE IF NOT EXISTS can race on the catalog.
        let mut tx = pool.begin().await.map_err(fail)?;
        for sql in [
            "SELECT pg_advisory_xact_lock(7413021)",
            "CREATE TABLE IF NOT EXISTS connector_leases (
                connector_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL,
                holder TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (connector_id, tenant_id))",
            "CREATE TABLE IF NOT EXISTS connector_holders (
                holder TEXT PRIMARY KEY,
                seen_at TIMESTAMPTZ NOT NULL)",
        ] {
            sqlx::query(sql).execute(&mut *tx).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(Self { pool })
    }

    fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> crate::Error {
        move |e| crate::Error::state(format!("{what} (connector leases in PostgreSQL)")).with_source(e)
    }
}

#[cfg(feature = "postgres")]
fn interval(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

#[cfg(feature = "postgres")]
#[async_trait]
impl LeaseStore for PgLeaseStore {
    async fn heartbeat(&self, holder: &str, ttl: Duration) -> Result<usize> {
        sqlx::query(
            "INSERT INTO connector_holders (holder, seen_at) VALUES ($1, now()) \
             ON CONFLICT (holder) DO UPDATE SET seen_at = now()",
        )
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(Self::err("recording a heartbeat"))?;
        // Long-dead holders go, so the table stays small.
        sqlx::query("DELETE FROM connector_holders WHERE seen_at < now() - make_interval(secs => $1 * 10)")
            .bind(interval(ttl))
            .execute(&self.pool)
            .await
            .map_err(Self::err("pruning holders"))?;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM connector_holders WHERE seen_at > now() - make_interval(secs => $1)",
        )
        .bind(interval(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(Self::err("counting holders"))?;
        Ok(live.max(1) as usize)
    }

    async fn acquire(&self, key: &LeaseKey, holder: &str, ttl: Duration) -> Result<bool> {
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO connector_leases (connector_id, tenant_id, holder, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
             ON CONFLICT (connector_id, tenant_id) DO UPDATE \
                SET holder = excluded.holder, expires_at = excluded.expires_at \
                WHERE connector_leases.holder = excluded.holder OR connector_leases.expires_at <= now() \
             RETURNING holder",
        )
        .bind(key.0.as_str())
        .bind(key.1.as_str())
        .bind(holder)
        .bind(interval(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(Self::err("taking a lease"))?;
        Ok(got.is_some())
    }

    async fn renew(&self, holder: &str, ttl: Duration) -> Result<BTreeSet<LeaseKey>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE connector_leases SET expires_at = now() + make_interval(secs => $2) \
             WHERE holder = $1 AND expires_at > now() RETURNING connector_id, tenant_id",
        )
        .bind(holder)
        .bind(interval(ttl))
        .fetch_all(&self.pool)
        .await
        .map_err(Self::err("renewing leases"))?;
        rows.into_iter().map(|(c, t)| Ok((ConnectorId::new(c)?, TenantId::new(t)?))).collect()
    }

    async fn release(&self, key: &LeaseKey, holder: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM connector_leases WHERE connector_id = $1 AND tenant_id = $2 AND holder = $3",
        )
        .bind(key.0.as_str())
        .bind(key.1.as_str())
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(Self::err("releasing a lease"))?;
        Ok(())
    }

    fn describe(&self) -> String {
        "connector leases in PostgreSQL".into()
    }
}

/// One process's side of the leases: which of the configured connectors it runs.
pub struct LeaseManager {
    store: Arc<dyn LeaseStore>,
    holder: String,
    ttl: Duration,
    keys: Vec<LeaseKey>,
    held: Mutex<BTreeSet<LeaseKey>>,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager")
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .field("held", &self.held.lock().expect("poisoned").len())
            .finish_non_exhaustive()
    }
}

impl LeaseManager {
    /// A manager for `keys` (every connector of the configuration), as `holder` (unique per
    /// process: host name, pid and a random suffix), with leases that live `ttl` unless
    /// renewed.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        holder: impl Into<String>,
        ttl: Duration,
        keys: Vec<LeaseKey>,
    ) -> Self {
        Self { store, holder: holder.into(), ttl, keys, held: Mutex::default() }
    }

    /// A holder name unique to this process.
    pub fn process_holder() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".into());
        format!("{host}:{}:{:08x}", std::process::id(), rand::random::<u32>())
    }

    /// This process's name in the lease table.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How often [`cycle`](Self::cycle) should run: a third of the TTL, so one missed cycle
    /// does not lose a lease.
    pub fn period(&self) -> Duration {
        self.ttl / 3
    }

    /// Whether this process holds the lease of `key` (as of the last cycle).
    pub fn holds(&self, key: &LeaseKey) -> bool {
        self.held.lock().expect("poisoned").contains(key)
    }

    /// The leases held as of the last cycle.
    pub fn held(&self) -> BTreeSet<LeaseKey> {
        self.held.lock().expect("poisoned").clone()
    }

    /// One cycle: heartbeat, renew, then take or give back leases toward the fair share.
    /// `busy` tells which connectors are running (never given back mid-run). Returns the
    /// leases held afterwards.
    pub async fn cycle(&self, busy: &(dyn Fn(&LeaseKey) -> bool + Sync)) -> Result<BTreeSet<LeaseKey>> {
        let live = self.store.heartbeat(&self.holder, self.ttl).await?;
        let mut held: BTreeSet<LeaseKey> = self.store.renew(&self.holder, self.ttl).await?;
        held.retain(|k| self.keys.contains(k));
        let share = self.keys.len().div_ceil(live.max(1));
        if held.len() < share {
            // Start at a different place in each process, so they do not all race for the
            // same free leases.
            let start = rand::random::<u64>() as usize % self.keys.len().max(1);
            let candidates = self.keys[start..].iter().chain(&self.keys[..start]);
            for key in candidates {
                if held.len() >= share {
                    break;
                }
                if !held.contains(key) && self.store.acquire(key, &self.holder, self.ttl).await? {
                    held.insert(key.clone());
                }
            }
        } else if held.len() > share {
            let extra: Vec<LeaseKey> =
                held.iter().filter(|k| !busy(k)).take(held.len() - share).cloned().collect();
            // Stop holding them here first (`holds` turns false, so no new run starts), then
            // give back those still idle: a run that started in between keeps its lease.
            self.held.lock().expect("poisoned").retain(|k| !extra.contains(k));
            for key in extra {
                if busy(&key) {
                    continue;
                }
                self.store.release(&key, &self.holder).await?;
                held.remove(&key);
            }
        }
        *self.held.lock().expect("poisoned") = held.clone();
        Ok(held)
    }

    /// Gives back every lease (graceful shutdown), so others take over at once.
    pub async fn release_all(&self) -> Result<()> {
        let held = std::mem::take(&mut *self.held.lock().expect("poisoned"));
        for key in held {
            self.store.release(&key, &self.holder).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<LeaseKey> {
        (0..n).map(|i| (ConnectorId::new(format!("c{i}")).unwrap(), TenantId::new("t").unwrap())).collect()
    }

    #[tokio::test]
    async fn holders_split_the_connectors_and_take_over_from_the_dead() {
        let store = Arc::new(MemoryLeaseStore::new());
        let ttl = Duration::from_secs(30);
        let a = LeaseManager::new(store.clone(), "a", ttl, keys(20));
        let b = LeaseManager::new(store.clone(), "b", ttl, keys(20));
        let idle = |_: &LeaseKey| false;

        // Alone, a takes everything.
        assert_eq!(a.cycle(&idle).await.unwrap().len(), 20);
        // b joins: it gets nothing at first (all taken), a gives back down to its share,
        // and b takes the rest.
        assert_eq!(b.cycle(&idle).await.unwrap().len(), 0);
        assert_eq!(a.cycle(&idle).await.unwrap().len(), 10);
        assert_eq!(b.cycle(&idle).await.unwrap().len(), 10);
        let (ha, hb) = (a.held(), b.held());
        assert!(ha.is_disjoint(&hb), "no connector is held twice");
        assert_eq!(ha.len() + hb.len(), 20);

        // b dies (no more cycles). Before expiry a cannot take its leases...
        store.advance(Duration::from_secs(20));
        assert_eq!(a.cycle(&idle).await.unwrap().len(), 10);
        // ... after it, a holds everything again.
        store.advance(Duration::from_secs(31));
        assert_eq!(a.cycle(&idle).await.unwrap().len(), 20);
        for key in keys(20) {
            assert_eq!(store.holder_of(&key).as_deref(), Some("a"));
        }
    }

    #[tokio::test]
    async fn running_connectors_are_not_given_back_and_shutdown_releases() {
        let store = Arc::new(MemoryLeaseStore::new());
        let ttl = Duration::from_secs(30);
        let a = LeaseManager::new(store.clone(), "a", ttl, keys(4));
        let b = LeaseManager::new(store.clone(), "b", ttl, keys(4));
        a.cycle(&|_| false).await.unwrap();
        b.cycle(&|_| false).await.unwrap();
        // Everything a holds is running: it keeps all four for now.
        assert_eq!(a.cycle(&|_| true).await.unwrap().len(), 4);
        a.release_all().await.unwrap();
        assert!(a.held().is_empty());
        assert_eq!(b.cycle(&|_| false).await.unwrap().len(), 2, "b takes its share at once");
    }
}
