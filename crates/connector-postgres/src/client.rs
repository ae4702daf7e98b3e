//! The database client: connecting with credentials from the provider, catalog queries, and
//! [`parse_error`], the one place where `tokio_postgres` errors become core [`Error`]s.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connector_core::credentials::require_credential;
use connector_core::{Error, ErrorKind, ExposeSecret, Result};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Config, Connection, NoTls, Notification, Socket};

use crate::config::SslMode;
use crate::connector::Shared;
use crate::sql::{ColumnInfo, quote_ident};

/// Credential key of the user name (`ARAGORA_POSTGRES_USER`).
pub const USER_KEY: &str = "postgres_user";
/// Credential key of the password (`ARAGORA_POSTGRES_PASSWORD`); optional for trust or peer auth.
pub const PASSWORD_KEY: &str = "postgres_password";
/// How long establishing a connection (TCP, startup and authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `application_name` of the connections that read tables.
const APPLICATION_NAME: &str = "enterprise-connectors";
/// The `application_name` of the LISTEN connection of the change feed.
pub(crate) const LISTENER_APPLICATION_NAME: &str = "enterprise-connectors-listener";

/// Session settings of every connection: text forms of cursor values are rendered and parsed
/// under the same zone and date style, and the session never writes.
const SESSION_SETUP: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 3; SET default_transaction_read_only = on";

/// Where we connect and as whom: everything an error message may name. No secrets.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    /// Where the password is looked up (`environment variable ARAGORA_POSTGRES_PASSWORD`).
    pub password_location: String,
    /// The configured TLS mode, named in TLS errors.
    pub sslmode: SslMode,
    /// Where trusted roots come from, when certificates are verified (`sslrootcert "/ca.pem"`).
    pub roots: Option<String>,
}

impl Target {
    fn address(&self) -> String {
        if self.host.starts_with('/') {
            format!("socket {}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What went wrong, as plain facts, so that the mapping in [`classify`] is testable without
/// a server (`tokio_postgres::Error` cannot be constructed outside its crate).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ErrorFacts {
    /// The SQLSTATE of a server error.
    pub code: Option<String>,
    /// The server's message, detail and hint; or the client error with its causes.
    pub message: String,
    /// The connection was closed (by the server, the network or a crash).
    pub closed: bool,
    /// The kind of the underlying I/O error, if any.
    pub io: Option<io::ErrorKind>,
    /// The error happened while connecting or authenticating.
    pub connecting: bool,
    /// The server asked for a password and the provider had none.
    pub password_missing: bool,
    /// The error happened while negotiating TLS, and how.
    pub tls: Option<TlsFailure>,
}

/// How negotiating TLS failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// The server does not do TLS (it answered the TLS request with "no").
    NotSupported,
    /// The certificate chain does not lead to a trusted root.
    UnknownIssuer,
    /// The certificate was not issued for the host name.
    NameMismatch,
    /// Another certificate problem: expired, not valid yet, bad signature, wrong usage...
    Certificate,
    /// The TLS protocol failed: no common version or cipher suite, an alert from the server.
    Protocol,
    /// The connection broke during the handshake.
    Network,
}

/// The one mapping from `tokio_postgres` errors to core errors. Messages name the host, port,
/// database, user, table or column, and never a password.
pub(crate) fn parse_error(err: &tokio_postgres::Error, target: &Target, connecting: bool) -> Error {
    classify(&facts(err, connecting), target)
}

fn facts(err: &tokio_postgres::Error, connecting: bool) -> ErrorFacts {
    use std::error::Error as _;
    let mut facts = ErrorFacts { connecting, closed: err.is_closed(), ..Default::default() };
    if let Some(db) = err.as_db_error() {
        facts.code = Some(db.code().code().to_string());
        facts.message = db.message().to_string();
        if let Some(detail) = db.detail() {
            facts.message.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            facts.message.push_str(&format!("; hint: {hint}"));
        }
        return facts;
    }
    facts.message = err.to_string();
    // tokio_postgres's message for every error of the TLS negotiation (made while connecting
    // only: a TLS error on an established connection is a lost connection).
    let negotiating_tls = facts.message.starts_with("error performing TLS handshake");
    let mut source = err.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            facts.io.get_or_insert(io.kind());
            // tokio-rustls reports a failed handshake as an I/O error around the rustls error.
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
                && negotiating_tls
            {
                facts.tls.get_or_insert(crate::tls::failure_of(tls));
            }
        }
        if let Some(tls) = s.downcast_ref::<rustls::Error>()
            && negotiating_tls
        {
            facts.tls.get_or_insert(crate::tls::failure_of(tls));
        }
        let text = s.to_string();
        if text == "password missing" {
            facts.password_missing = true;
        }
        if negotiating_tls && text == "server does not support TLS" {
            facts.tls = Some(TlsFailure::NotSupported);
        }
        if !facts.message.contains(&text) {
            facts.message.push_str(": ");
            facts.message.push_str(&text);
        }
        source = s.source();
    }
    if negotiating_tls && facts.tls.is_none() {
        facts.tls = Some(TlsFailure::Network);
    }
    facts
}

/// Maps error facts to a core error; see the table in the tests.
pub(crate) fn classify(f: &ErrorFacts, t: &Target) -> Error {
    let at = format!("{}/{}", t.address(), t.database);
    if f.password_missing {
        return Error::auth(format!(
            "PostgreSQL at {at} requires a password for user {:?}: set {}",
            t.user, t.password_location
        ));
    }
    if let Some(tls) = f.tls {
        return tls_error(tls, f, t);
    }
    let Some(code) = f.code.as_deref() else {
        if f.connecting && f.io == Some(io::ErrorKind::TimedOut) {
            return Error::transient(format!(
                "cannot connect to PostgreSQL at {}: timed out after {}s ({})",
                t.address(),
                CONNECT_TIMEOUT.as_secs(),
                f.message
            ));
        }
        if f.connecting {
            return Error::transient(format!(
                "cannot connect to PostgreSQL at {}: {}",
                t.address(),
                f.message
            ));
        }
        if f.closed || f.io.is_some() {
            return Error::transient(format!("connection to PostgreSQL at {at} lost: {}", f.message));
        }
        return Error::source_error(format!("PostgreSQL at {at}: {}", f.message));
    };
    let m = &f.message;
    let kind = match code {
        // invalid_password, invalid_authorization_specification (no pg_hba entry, no such role)
        "28P01" | "28000" => {
            return Error::auth(format!("authentication failed for user {:?} on {at}: {m}", t.user));
        }
        // insufficient_privilege
        "42501" => {
            return Error::auth(format!(
                "permission denied for user {:?} on {at}: {m} (grant USAGE on the schema and SELECT on the tables)",
                t.user
            ));
        }
        // invalid_catalog_name
        "3D000" => {
            return Error::not_found(format!(
                "database {:?} does not exist on {}: {m}",
                t.database,
                t.address()
            ));
        }
        // undefined_table, invalid_schema_name
        "42P01" | "3F000" => ErrorKind::NotFound,
        // undefined_column: a configured column name is wrong
        "42703" => ErrorKind::Config,
        // admin_shutdown, crash_shutdown, cannot_connect_now, serialization_failure, deadlock,
        // lock_not_available, query_canceled (statement timeout or pg_cancel_backend)
        "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03" | "57014" => ErrorKind::Transient,
        // connection_exception, insufficient_resources (too many connections, out of memory or disk)
        c if c.starts_with("08") || c.starts_with("53") => ErrorKind::Transient,
        _ => ErrorKind::Source,
    };
    Error::new(kind, format!("PostgreSQL at {at}: {m} (SQLSTATE {code})"))
}

/// A TLS failure while connecting: names the address and the sslmode; certificate problems are
/// `auth` errors and protocol mismatches `config` errors (neither is retried), a broken
/// connection is `transient`.
fn tls_error(failure: TlsFailure, f: &ErrorFacts, t: &Target) -> Error {
    let at =
        format!("cannot connect to PostgreSQL at {} with sslmode = {:?}", t.address(), t.sslmode.as_str());
    let m = &f.message;
    let roots = t.roots.as_deref().unwrap_or("the trusted roots");
    match failure {
        TlsFailure::NotSupported => Error::config(format!(
            "{at}: the server does not accept TLS connections ({m}); enable ssl on the server, \
             or set sslmode = \"prefer\" (TLS when offered) or \"disable\""
        )),
        TlsFailure::UnknownIssuer => Error::auth(format!(
            "{at}: the server's certificate is not signed by a CA in {roots} ({m}); set sslrootcert \
             to a PEM file with the CA that issued the server's certificate"
        )),
        TlsFailure::NameMismatch => Error::auth(format!(
            "{at}: the server's certificate is not valid for host name {:?} ({m}); connect with a name \
             the certificate lists, or use sslmode = \"verify-ca\" to verify the chain only",
            t.host
        )),
        TlsFailure::Certificate => Error::auth(format!("{at}: the server's certificate was rejected ({m})")),
        TlsFailure::Protocol => Error::config(format!("{at}: the TLS handshake failed ({m})")),
        TlsFailure::Network => {
            Error::transient(format!("{at}: the connection broke during the TLS handshake ({m})"))
        }
    }
}

/// A freshly opened connection whose connection task runs.
type Opened = (tokio_postgres::Client, JoinHandle<()>, Arc<Mutex<Option<String>>>);

/// Where a listening connection's notifications go. The connection task never waits for the
/// listener: when the queue is full the notification is dropped and `overflowed` set, so the
/// listener asks for a catch-up sync instead, and memory stays bounded.
#[derive(Clone)]
pub(crate) struct NotificationSink {
    pub tx: mpsc::Sender<Notification>,
    pub overflowed: Arc<AtomicBool>,
}

/// Drives a connection: with a sink, forwarding its notifications (the driver's `Future`
/// implementation drops them); without, as the driver does.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    sink: Option<NotificationSink>,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(sink) = sink else { return connection.await };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message? {
            AsyncMessage::Notification(n) => match sink.tx.try_send(n) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => sink.overflowed.store(true, Ordering::SeqCst),
                // The listener is gone: nobody needs the connection any more.
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            },
            AsyncMessage::Notice(notice) => tracing::info!("{}: {}", notice.severity(), notice.message()),
            _ => {}
        }
    }
    Ok(())
}

/// Connects with `tls`; `None` when the server did not complete the startup in time.
/// `connect_timeout` covers the TCP connect only; a server that accepts and then stalls during
/// startup (or the TLS handshake) is bounded here.
async fn open<T>(
    pg: &Config,
    tls: T,
    sink: Option<NotificationSink>,
) -> Option<Result<Opened, tokio_postgres::Error>>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let connected =
        tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(5), pg.connect(tls)).await.ok()?;
    let (client, connection) = match connected {
        Ok(pair) => pair,
        Err(e) => return Some(Err(e)),
    };
    let connection_error = Arc::new(Mutex::new(None));
    let slot = connection_error.clone();
    let connection = tokio::spawn(async move {
        if let Err(e) = drive(connection, sink).await {
            *slot.lock().expect("poisoned") = Some(facts(&e, false).message);
        }
    });
    Some(Ok((client, connection, connection_error)))
}

/// A connection. Dropping it closes the socket at once, even mid-query: letting the driver
/// drain the rest of a large result first would read the whole table for nothing.
pub(crate) struct PgClient {
    client: tokio_postgres::Client,
    connection: JoinHandle<()>,
    /// Why the connection task ended, if it failed; named in "connection lost" errors.
    connection_error: Arc<Mutex<Option<String>>>,
    pub target: Arc<Target>,
}

impl Drop for PgClient {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgClient {
    /// Reads the credentials and connects. The password goes from the secret straight into
    /// the driver's config (whose `Debug` redacts it); it is never formatted.
    ///
    /// With `sslmode = prefer`, a failed TLS handshake is followed by one plain attempt, as in
    /// libpq (a server that declines TLS is handled by the driver on the same connection).
    pub async fn connect(shared: &Shared) -> Result<PgClient> {
        Self::connect_with(shared, APPLICATION_NAME, None).await
    }

    /// Connects like [`connect`](Self::connect), named [`LISTENER_APPLICATION_NAME`], and
    /// forwards the connection's notifications to `sink`.
    pub async fn connect_listener(shared: &Shared, sink: NotificationSink) -> Result<PgClient> {
        Self::connect_with(shared, LISTENER_APPLICATION_NAME, Some(sink)).await
    }

    async fn connect_with(
        shared: &Shared,
        application_name: &str,
        sink: Option<NotificationSink>,
    ) -> Result<PgClient> {
        let (config, tls, credentials) = (&shared.config, &shared.tls, shared.credentials.as_ref());
        let user = require_credential(credentials, USER_KEY).await?;
        let password = credentials.get_credential(PASSWORD_KEY).await?;
        let target = Arc::new(Target {
            host: config.host.clone(),
            port: config.port,
            database: config.database.clone(),
            user: user.expose_secret().to_string(),
            password_location: credentials.location_of(PASSWORD_KEY),
            sslmode: tls.sslmode,
            roots: tls.roots.clone(),
        });

        let mut pg = Config::new();
        pg.host(&config.host)
            .port(config.port)
            .dbname(&config.database)
            .user(user.expose_secret())
            .application_name(application_name)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .ssl_mode(tls.driver_mode);
        if let Some(password) = &password {
            pg.password(password.expose_secret().as_bytes());
        }
        let mut opened = match &tls.connector {
            Some(connector) => open(&pg, connector.clone(), sink.clone()).await,
            None => open(&pg, NoTls, sink.clone()).await,
        };
        if tls.driver_mode == DriverSslMode::Prefer
            && let Some(Err(e)) = &opened
            && let failed = facts(e, true)
            && failed.tls.is_some()
        {
            tracing::warn!(
                address = %target.address(),
                "TLS handshake failed with sslmode = prefer, connecting without TLS: {}",
                failed.message
            );
            pg.ssl_mode(DriverSslMode::Disable);
            opened = open(&pg, NoTls, sink).await;
        }
        drop(pg);
        let (client, connection, connection_error) = match opened {
            Some(Ok(opened)) => opened,
            Some(Err(e)) => return Err(parse_error(&e, &target, true)),
            None => {
                let facts = ErrorFacts {
                    message: "no answer during startup".into(),
                    io: Some(io::ErrorKind::TimedOut),
                    connecting: true,
                    ..Default::default()
                };
                return Err(classify(&facts, &target));
            }
        };
        let client = PgClient { client, connection, connection_error, target };
        client.client.batch_execute(SESSION_SETUP).await.map_err(|e| client.error(&e))?;
        Ok(client)
    }

    /// The driver client.
    pub fn inner(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// Why the connection ended, once it has: the cause the connection task saw, or None
    /// while it is open.
    pub fn closed_because(&self) -> Option<String> {
        if !self.client.is_closed() && !self.connection.is_finished() {
            return None;
        }
        Some(
            self.connection_error
                .lock()
                .expect("poisoned")
                .clone()
                .unwrap_or_else(|| "the server closed the connection".into()),
        )
    }

    /// Maps a query error; a lost connection names the cause the connection task saw.
    pub fn error(&self, err: &tokio_postgres::Error) -> Error {
        let mut facts = facts(err, false);
        if err.is_closed()
            && let Some(cause) = self.connection_error.lock().expect("poisoned").as_deref()
        {
            facts.message = format!("{} ({cause})", facts.message);
        }
        classify(&facts, &self.target)
    }

    /// The columns of `schema.table` (tables, partitioned tables, views, materialized views,
    /// foreign tables), in table order; empty when there is no such relation.
    pub async fn table_columns(&self, schema: &str, table: &str) -> Result<Vec<ColumnInfo>> {
        // Domains are described by their base type (what the server sends for them); arrays
        // by their element type. A true array type has typlen -1 and an element type.
        const SQL: &str = "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), bt.oid, \
                CASE WHEN bt.typlen = -1 AND bt.typelem <> 0 THEN bt.typelem END, a.attnotnull \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
               AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum";
        let rows = self.client.query(SQL, &[&schema, &table]).await.map_err(|e| self.error(&e))?;
        rows.iter()
            .map(|r| {
                Ok(ColumnInfo {
                    name: r.try_get(0)?,
                    type_sql: r.try_get(1)?,
                    type_oid: r.try_get(2)?,
                    elem_oid: r.try_get(3)?,
                    not_null: r.try_get(4)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.error(&e))
    }

    /// A not-found error for a table that [`table_columns`](Self::table_columns) did not find,
    /// saying whether the schema exists and naming tables that differ only in case.
    pub async fn table_not_found(&self, schema: &str, table: &str) -> Error {
        const SQL: &str = "SELECT (SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = $1), \
                ARRAY(SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                      WHERE lower(c.relname) = lower($2) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
                      ORDER BY 1 LIMIT 5)";
        let at = format!("{}/{}", self.target.address(), self.target.database);
        let (schema_exists, similar) = match self.client.query_one(SQL, &[&schema, &table]).await {
            Ok(row) => (row.get::<_, i64>(0) > 0, row.get::<_, Vec<String>>(1)),
            Err(_) => (true, Vec::new()),
        };
        let hint = if !schema_exists {
            format!(": schema {schema:?} does not exist (or the user may not use it)")
        } else if !similar.is_empty() {
            format!(" (found {}; names are case-sensitive)", similar.join(", "))
        } else {
            String::new()
        };
        Error::not_found(format!("table {schema}.{table} not found in {at}{hint}"))
    }

    /// Whether the user may read `schema.table`, as an authorization error naming what to grant.
    pub async fn check_privileges(&self, schema: &str, table: &str) -> Result<()> {
        const SQL: &str = "SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE'), \
                pg_catalog.has_table_privilege(c.oid, 'SELECT') \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2";
        let row = self.client.query_opt(SQL, &[&schema, &table]).await.map_err(|e| self.error(&e))?;
        let Some(row) = row else { return Ok(()) };
        let (usage, select): (bool, bool) = (row.get(0), row.get(1));
        let user = &self.target.user;
        if !usage {
            return Err(Error::auth(format!(
                "user {user:?} may not use schema {schema:?}: GRANT USAGE ON SCHEMA {} TO {}",
                quote_ident(schema),
                quote_ident(user)
            )));
        }
        if !select {
            return Err(Error::auth(format!(
                "user {user:?} may not read table {schema}.{table}: GRANT SELECT ON {} TO {}",
                crate::sql::qualified(schema, table),
                quote_ident(user)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            host: "db.internal".into(),
            port: 5433,
            database: "myapp".into(),
            user: "reader".into(),
            password_location: "environment variable ARAGORA_POSTGRES_PASSWORD".into(),
            sslmode: SslMode::Prefer,
            roots: None,
        }
    }

    fn db(code: &str, message: &str) -> ErrorFacts {
        ErrorFacts { code: Some(code.into()), message: message.into(), ..Default::default() }
    }

    #[test]
    fn error_mapping_table() {
        let refused = ErrorFacts {
            message: "error connecting to server: Connection refused (os error 111)".into(),
            io: Some(io::ErrorKind::ConnectionRefused),
            connecting: true,
            ..Default::default()
        };
        let timed_out = ErrorFacts {
            message: "error connecting to server: connection timed out".into(),
            io: Some(io::ErrorKind::TimedOut),
            connecting: true,
            ..Default::default()
        };
        let closed = ErrorFacts { message: "connection closed".into(), closed: true, ..Default::default() };
        let reset = ErrorFacts {
            message: "error communicating with the server: Connection reset by peer".into(),
            io: Some(io::ErrorKind::ConnectionReset),
            ..Default::default()
        };
        let no_password = ErrorFacts {
            message: "invalid configuration: password missing".into(),
            password_missing: true,
            connecting: true,
            ..Default::default()
        };
        let unexpected = ErrorFacts { message: "error deserializing column 3".into(), ..Default::default() };
        let table: Vec<(ErrorFacts, ErrorKind, &str)> = vec![
            (
                db("28P01", "password authentication failed for user \"reader\""),
                ErrorKind::Auth,
                "authentication failed for user \"reader\" on db.internal:5433/myapp: password authentication failed",
            ),
            (
                db("28000", "no pg_hba.conf entry for host \"10.0.0.1\""),
                ErrorKind::Auth,
                "authentication failed for user \"reader\" on db.internal:5433/myapp",
            ),
            (
                db("42501", "permission denied for table docs"),
                ErrorKind::Auth,
                "grant USAGE on the schema and SELECT",
            ),
            (
                db("3D000", "database \"myapp\" does not exist"),
                ErrorKind::NotFound,
                "database \"myapp\" does not exist on db.internal:5433",
            ),
            (
                db("42P01", "relation \"public.docs\" does not exist"),
                ErrorKind::NotFound,
                "relation \"public.docs\"",
            ),
            (db("3F000", "schema \"x\" does not exist"), ErrorKind::NotFound, "schema \"x\""),
            (db("42703", "column \"updated_at\" does not exist"), ErrorKind::Config, "column \"updated_at\""),
            (
                db("57P01", "terminating connection due to administrator command"),
                ErrorKind::Transient,
                "57P01",
            ),
            (db("57P03", "the database system is starting up"), ErrorKind::Transient, "starting up"),
            (db("40001", "could not serialize access"), ErrorKind::Transient, "40001"),
            (db("40P01", "deadlock detected"), ErrorKind::Transient, "deadlock"),
            (db("53300", "sorry, too many clients already"), ErrorKind::Transient, "too many clients"),
            (db("08006", "connection failure"), ErrorKind::Transient, "08006"),
            (db("22007", "invalid input syntax for type timestamp"), ErrorKind::Source, "SQLSTATE 22007"),
            (
                refused,
                ErrorKind::Transient,
                "cannot connect to PostgreSQL at db.internal:5433: error connecting",
            ),
            (
                timed_out,
                ErrorKind::Transient,
                "cannot connect to PostgreSQL at db.internal:5433: timed out after 10s",
            ),
            (closed, ErrorKind::Transient, "connection to PostgreSQL at db.internal:5433/myapp lost"),
            (reset, ErrorKind::Transient, "lost: error communicating"),
            (
                no_password,
                ErrorKind::Auth,
                "requires a password for user \"reader\": set environment variable ARAGORA_POSTGRES_PASSWORD",
            ),
            (
                unexpected,
                ErrorKind::Source,
                "PostgreSQL at db.internal:5433/myapp: error deserializing column 3",
            ),
        ];
        for (facts, kind, expected) in table {
            let err = classify(&facts, &target());
            assert_eq!(err.kind(), kind, "{facts:?} -> {err}");
            assert!(err.to_string().contains(expected), "expected {expected:?} in {err}");
        }
    }

    #[test]
    fn tls_failures_name_address_and_sslmode() {
        let tls = |failure: TlsFailure, message: &str| ErrorFacts {
            message: message.into(),
            connecting: true,
            io: Some(io::ErrorKind::InvalidData),
            tls: Some(failure),
            ..Default::default()
        };
        let verify = Target {
            sslmode: SslMode::VerifyFull,
            roots: Some("sslrootcert \"/etc/db-ca.pem\"".into()),
            ..target()
        };
        let at = "cannot connect to PostgreSQL at db.internal:5433 with sslmode = ";
        let table: Vec<(ErrorFacts, Target, ErrorKind, String)> = vec![
            (
                tls(TlsFailure::NotSupported, "error performing TLS handshake: server does not support TLS"),
                Target { sslmode: SslMode::Require, ..target() },
                ErrorKind::Config,
                format!("{at}\"require\": the server does not accept TLS connections"),
            ),
            (
                tls(
                    TlsFailure::UnknownIssuer,
                    "error performing TLS handshake: invalid peer certificate: UnknownIssuer",
                ),
                verify.clone(),
                ErrorKind::Auth,
                format!(
                    "{at}\"verify-full\": the server's certificate is not signed by a CA in \
                     sslrootcert \"/etc/db-ca.pem\" (error performing TLS handshake: invalid peer certificate"
                ),
            ),
            (
                tls(TlsFailure::NameMismatch, "certificate not valid for name \"db.internal\""),
                verify.clone(),
                ErrorKind::Auth,
                format!(
                    "{at}\"verify-full\": the server's certificate is not valid for host name \"db.internal\""
                ),
            ),
            (
                tls(TlsFailure::Certificate, "invalid peer certificate: Expired"),
                verify.clone(),
                ErrorKind::Auth,
                format!(
                    "{at}\"verify-full\": the server's certificate was rejected (invalid peer certificate: Expired)"
                ),
            ),
            (
                tls(TlsFailure::Protocol, "received fatal alert: ProtocolVersion"),
                Target { sslmode: SslMode::Require, ..target() },
                ErrorKind::Config,
                format!("{at}\"require\": the TLS handshake failed (received fatal alert: ProtocolVersion)"),
            ),
            (
                ErrorFacts {
                    io: Some(io::ErrorKind::UnexpectedEof),
                    ..tls(TlsFailure::Network, "unexpected EOF")
                },
                verify.clone(),
                ErrorKind::Transient,
                format!(
                    "{at}\"verify-full\": the connection broke during the TLS handshake (unexpected EOF)"
                ),
            ),
        ];
        for (facts, target, kind, expected) in table {
            let err = classify(&facts, &target);
            assert_eq!(err.kind(), kind, "{facts:?} -> {err}");
            assert_eq!(err.is_retryable(), kind == ErrorKind::Transient, "{err}");
            assert!(err.to_string().starts_with(&expected), "expected {expected:?} at the start of {err}");
        }
    }

    #[test]
    fn socket_hosts_are_named_as_sockets() {
        let t = Target { host: "/var/run/postgresql".into(), ..target() };
        let err = classify(
            &ErrorFacts {
                message: "No such file or directory".into(),
                connecting: true,
                ..Default::default()
            },
            &t,
        );
        assert!(err.to_string().contains("socket /var/run/postgresql/.s.PGSQL.5433"), "{err}");
    }
}
