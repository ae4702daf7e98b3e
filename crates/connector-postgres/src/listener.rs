//! The LISTEN/NOTIFY change feed: one connection that listens on `notify_channel` and turns
//! the setup guide's trigger payloads into [`ChangeHint`]s.
//!
//! The connection task forwards notifications into a bounded queue and never waits for the
//! feed (see [`NotificationSink`]); the feed takes what is queued as one hint. A lost
//! connection is reopened with capped exponential backoff, and once it listens again the feed
//! sends [`ChangeHint::CatchUp`]: notifications sent meanwhile are gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use connector_core::reexports::tokio_util::sync::CancellationToken;
use connector_core::{ChangeFeed, ChangeHint, ItemRef, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_postgres::Notification;

use crate::client::{NotificationSink, PgClient};
use crate::connector::Shared;
use crate::sql::quote_ident;

/// Notifications queued between the connection and the feed; beyond it they are dropped and
/// a catch-up sync replaces them (a payload is at most 8000 bytes: at most ~8 MB queued).
const MAX_QUEUED: usize = 1024;
/// The most notifications one hint gathers.
const MAX_PER_HINT: usize = 1000;
/// The first delay before reconnecting; it doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that listened this long resets the backoff when it is lost.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// An idle listener asks the server for a reply this often, to notice a dead connection
/// (TCP keepalives alone take hours by default).
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a malformed payload a warning shows.
const LOGGED_PAYLOAD_CHARS: usize = 200;

/// The change feed of a connector with `notify_channel` set.
pub(crate) struct PgChangeFeed {
    shared: Arc<Shared>,
    channel: String,
    /// The configured streams, `{schema}.{table}`.
    streams: HashSet<String>,
}

impl PgChangeFeed {
    pub fn new(shared: Arc<Shared>, channel: String) -> Self {
        let config = &shared.config;
        let streams = config.tables.iter().map(|t| config.stream_name(t)).collect();
        Self { shared, channel, streams }
    }
}

/// How a listening session ended.
enum Ended {
    /// Shutdown, or nobody receives hints any more.
    Stopped,
    /// The connection was lost, for this reason.
    Lost(String),
}

/// The delay before reconnect attempt `failures + 1`.
fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN.saturating_mul(1u32 << failures.min(16)).min(BACKOFF_MAX)
}

#[async_trait]
impl ChangeFeed for PgChangeFeed {
    async fn run(
        self: Box<Self>,
        hints: mpsc::Sender<ChangeHint>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let stop = Stop { feed: shutdown, process: self.shared.shutdown.clone(), hints: hints.clone() };
        // Consecutive attempts that failed (or listened only briefly).
        let mut failures = 0u32;
        // Whether notifications may have been missed since the feed started.
        let mut gap = false;
        loop {
            let opened = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                opened = self.listen() => opened,
            };
            match opened {
                Err(e) if !e.is_retryable() => {
                    tracing::error!(channel = %self.channel, error = %e, "postgres change feed stopped");
                    return Err(e.context(format!("postgres change feed on channel {:?}", self.channel)));
                }
                Err(e) => {
                    tracing::warn!(
                        channel = %self.channel, error = %e, retry_in_ms = backoff(failures).as_millis() as u64,
                        "postgres change feed cannot listen; retrying"
                    );
                    gap = true;
                    failures += 1;
                }
                Ok((client, queue, overflowed)) => {
                    tracing::info!(channel = %self.channel, "postgres change feed listening");
                    let listening = Instant::now();
                    if gap && !send(&hints, &stop, ChangeHint::CatchUp).await {
                        return Ok(());
                    }
                    match self.relay(&client, queue, &overflowed, &hints, &stop).await {
                        Ended::Stopped => return Ok(()),
                        Ended::Lost(reason) => {
                            if listening.elapsed() >= HEALTHY_AFTER {
                                failures = 0;
                            }
                            tracing::warn!(
                                channel = %self.channel, reason = %reason,
                                retry_in_ms = backoff(failures).as_millis() as u64,
                                "postgres change feed lost its connection; notifications until it listens \
                                 again are lost, a catch-up sync follows"
                            );
                            gap = true;
                            failures += 1;
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff(failures - 1)) => {}
            }
        }
    }
}

type Listening = (PgClient, mpsc::Receiver<Notification>, Arc<AtomicBool>);

impl PgChangeFeed {
    /// Connects and runs `LISTEN`.
    async fn listen(&self) -> Result<Listening> {
        let (tx, queue) = mpsc::channel(MAX_QUEUED);
        let overflowed = Arc::new(AtomicBool::new(false));
        let sink = NotificationSink { tx, overflowed: overflowed.clone() };
        let client = PgClient::connect_listener(&self.shared, sink).await?;
        let sql = format!("LISTEN {}", quote_ident(&self.channel));
        client.inner().batch_execute(&sql).await.map_err(|e| client.error(&e))?;
        Ok((client, queue, overflowed))
    }

    /// Turns notifications into hints until the connection is lost or the feed stops.
    async fn relay(
        &self,
        client: &PgClient,
        mut queue: mpsc::Receiver<Notification>,
        overflowed: &AtomicBool,
        hints: &mpsc::Sender<ChangeHint>,
        stop: &Stop,
    ) -> Ended {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ended::Stopped,
                first = queue.recv() => first,
                _ = ping.tick() => {
                    let pinged = tokio::time::timeout(PING_TIMEOUT, client.inner().batch_execute("SELECT 1")).await;
                    match pinged {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return Ended::Lost(client.error(&e).to_string()),
                        Err(_) => return Ended::Lost(format!("no reply within {}s", PING_TIMEOUT.as_secs())),
                    }
                }
            };
            let Some(first) = first else {
                return Ended::Lost(client.closed_because().unwrap_or_else(|| "the connection ended".into()));
            };
            // Notifications of one commit arrive together: let the connection task queue the
            // rest before taking them.
            tokio::task::yield_now().await;
            let mut burst = Burst::default();
            burst.add(self, &first);
            while burst.taken < MAX_PER_HINT {
                match queue.try_recv() {
                    Ok(n) => burst.add(self, &n),
                    Err(_) => break,
                }
            }
            if overflowed.swap(false, Ordering::SeqCst) {
                tracing::warn!(
                    channel = %self.channel, queued = MAX_QUEUED,
                    "postgres change feed fell behind and dropped notifications; asking for a catch-up sync"
                );
                burst.catch_up = true;
            }
            if !burst.items.is_empty() && !send(hints, stop, ChangeHint::Items(burst.items)).await {
                return Ended::Stopped;
            }
            if burst.catch_up && !send(hints, stop, ChangeHint::CatchUp).await {
                return Ended::Stopped;
            }
        }
    }

    /// The stream and key a payload names, [`Parsed::Ignored`] for a table that is not
    /// configured, [`Parsed::CatchUp`] for a change the feed cannot name row by row, or why the
    /// payload is malformed.
    fn parse(&self, payload: &str) -> std::result::Result<Parsed, String> {
        let p: Payload<'_> =
            serde_json::from_str(payload).map_err(|e| format!("not the expected JSON: {e}"))?;
        let key = key_text(p.id)?;
        match p.operation.to_ascii_uppercase().as_str() {
            "INSERT" | "UPDATE" | "DELETE" => {}
            "TRUNCATE" => return Ok(Parsed::CatchUp),
            other => return Err(format!("unknown operation {other:?} (expected INSERT, UPDATE or DELETE)")),
        }
        let Some(key) = key else { return Err("\"id\" is missing or null".into()) };
        let schema = p.schema.as_deref().unwrap_or(&self.shared.config.schema);
        let stream = format!("{schema}.{}", p.table);
        if !self.streams.contains(&stream) {
            return Ok(Parsed::Ignored(stream));
        }
        Ok(Parsed::Item(ItemRef { stream, key }))
    }
}

/// The trigger payload: `{"table": ..., "operation": ..., "id": ...}`, optionally with
/// `"schema"`. Other fields are ignored.
#[derive(Deserialize)]
struct Payload<'a> {
    table: String,
    #[serde(default)]
    schema: Option<String>,
    operation: String,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// The key text of an `id`: a string's value, or a number exactly as written (`1.50` stays
/// `1.50`, large integers keep every digit).
fn key_text(id: Option<&RawValue>) -> std::result::Result<Option<String>, String> {
    let Some(raw) = id else { return Ok(None) };
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str(text).map(Some).map_err(|e| format!("\"id\": {e}")),
        Some(b'-' | b'0'..=b'9') => Ok(Some(text.to_string())),
        _ if text == "null" => Ok(None),
        _ => Err(format!("\"id\" must be a number or a string, got {}", shorten(text))),
    }
}

enum Parsed {
    Item(ItemRef),
    /// A stream that is not configured.
    Ignored(String),
    /// A change the payload cannot name row by row (TRUNCATE).
    CatchUp,
}

/// What one wake-up gathered.
#[derive(Default)]
struct Burst {
    items: Vec<ItemRef>,
    seen: HashSet<ItemRef>,
    taken: usize,
    catch_up: bool,
}

impl Burst {
    fn add(&mut self, feed: &PgChangeFeed, n: &Notification) {
        self.taken += 1;
        if n.channel() != feed.channel {
            return;
        }
        match feed.parse(n.payload()) {
            Ok(Parsed::Item(item)) => {
                if self.seen.insert(item.clone()) {
                    self.items.push(item);
                }
            }
            Ok(Parsed::Ignored(stream)) => {
                tracing::debug!(channel = %feed.channel, %stream, "notification for a table that is not configured, ignored");
            }
            Ok(Parsed::CatchUp) => {
                tracing::info!(channel = %feed.channel, "notification names no row (TRUNCATE); asking for a catch-up sync");
                self.catch_up = true;
            }
            Err(why) => {
                tracing::warn!(
                    channel = %feed.channel, payload = %shorten(n.payload()), bytes = n.payload().len(),
                    "malformed notification payload ({why}); asking for a catch-up sync"
                );
                self.catch_up = true;
            }
        }
    }
}

/// `s` cut to [`LOGGED_PAYLOAD_CHARS`] characters.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(LOGGED_PAYLOAD_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// Sends a hint; false when the feed should stop (shutdown, or nobody receives hints).
async fn send(hints: &mpsc::Sender<ChangeHint>, stop: &Stop, hint: ChangeHint) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        sent = hints.send(hint) => sent.is_ok(),
    }
}

/// When the feed stops: its shutdown signal, the process's, or nobody receiving hints.
struct Stop {
    feed: CancellationToken,
    process: CancellationToken,
    hints: mpsc::Sender<ChangeHint>,
}

impl Stop {
    async fn cancelled(&self) {
        tokio::select! {
            _ = self.feed.cancelled() => {}
            _ = self.process.cancelled() => {}
            _ = self.hints.closed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresConfig;
    use crate::tls::Tls;
    use connector_core::{StaticCredentialProvider, TenantId};

    fn feed(schema: &str) -> PgChangeFeed {
        let config = PostgresConfig {
            schema: schema.into(),
            notify_channel: Some("document_changes".into()),
            ..PostgresConfig::new(TenantId::new("t").unwrap(), "db", vec!["documents".into(), "faq".into()])
        };
        let shared = Shared {
            tls: Tls::new(&config).unwrap(),
            config,
            credentials: Arc::new(StaticCredentialProvider::new()),
            shutdown: CancellationToken::new(),
        };
        PgChangeFeed::new(Arc::new(shared), "document_changes".into())
    }

    fn item(feed: &PgChangeFeed, payload: &str) -> ItemRef {
        match feed.parse(payload) {
            Ok(Parsed::Item(item)) => item,
            Ok(Parsed::Ignored(s)) => panic!("{payload}: ignored {s}"),
            Ok(Parsed::CatchUp) => panic!("{payload}: catch-up"),
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    #[test]
    fn guide_payloads_name_stream_and_key() {
        let f = feed("public");
        let cases = [
            (r#"{"table" : "documents", "operation" : "INSERT", "id" : 42}"#, "public.documents", "42"),
            (r#"{"table":"faq","operation":"UPDATE","id":"a\"b\u00e9"}"#, "public.faq", "a\"bé"),
            (r#"{"table":"faq","operation":"delete","id":-1.50}"#, "public.faq", "-1.50"),
            (
                r#"{"table":"faq","operation":"DELETE","id":123456789012345678901234567890}"#,
                "public.faq",
                "123456789012345678901234567890",
            ),
            (
                r#"{"schema":"public","table":"documents","operation":"UPDATE","id":"550e8400-e29b-41d4-a716-446655440000","extra":[1]}"#,
                "public.documents",
                "550e8400-e29b-41d4-a716-446655440000",
            ),
        ];
        for (payload, stream, key) in cases {
            assert_eq!(item(&f, payload), ItemRef::new(stream, key), "{payload}");
        }
        let f = feed("Sales Data");
        assert_eq!(
            item(&f, r#"{"table":"documents","operation":"INSERT","id":1}"#),
            ItemRef::new("Sales Data.documents", "1")
        );
        assert!(matches!(
            f.parse(r#"{"schema":"public","table":"documents","operation":"INSERT","id":1}"#),
            Ok(Parsed::Ignored(s)) if s == "public.documents"
        ));
    }

    #[test]
    fn other_tables_are_ignored_and_bad_payloads_rejected() {
        let f = feed("public");
        assert!(matches!(
            f.parse(r#"{"table":"other","operation":"INSERT","id":1}"#),
            Ok(Parsed::Ignored(s)) if s == "public.other"
        ));
        assert!(matches!(
            f.parse(r#"{"table":"faq","operation":"TRUNCATE","id":null}"#),
            Ok(Parsed::CatchUp)
        ));
        for (payload, why) in [
            ("not json", "not the expected JSON"),
            ("", "not the expected JSON"),
            (r#"{"operation":"INSERT","id":1}"#, "missing field `table`"),
            (r#"{"table":"faq","id":1}"#, "missing field `operation`"),
            (r#"{"table":"faq","operation":"INSERT"}"#, "\"id\" is missing or null"),
            (r#"{"table":"faq","operation":"UPDATE","id":null}"#, "\"id\" is missing or null"),
            (r#"{"table":"faq","operation":"UPSERT","id":1}"#, "unknown operation \"UPSERT\""),
            (r#"{"table":"faq","operation":"INSERT","id":[1]}"#, "must be a number or a string, got [1]"),
            (r#"{"table":"faq","operation":"INSERT","id":true}"#, "must be a number or a string"),
            (r#"{"table":1,"operation":"INSERT","id":1}"#, "not the expected JSON"),
        ] {
            match f.parse(payload) {
                Err(e) => assert!(e.contains(why), "{payload}: {e}"),
                Ok(_) => panic!("{payload} accepted"),
            }
        }
    }

    #[test]
    fn long_payloads_are_shortened_in_logs_and_backoff_is_capped() {
        let long = "é".repeat(5000);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), LOGGED_PAYLOAD_CHARS + 3);
        assert_eq!(shorten("abc"), "abc");
        assert_eq!(backoff(0), BACKOFF_MIN);
        assert_eq!(backoff(1), BACKOFF_MIN * 2);
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
