//! [`PostgresConfig`]: the options of a `type = "postgres"` connector, as named in the setup guide.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use connector_core::{ConnectorId, Error, Result, TenantId};
use serde::{Deserialize, Serialize};

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1` bytes); longer names are
/// truncated by the server, so a longer configured name could never match.
pub const MAX_IDENTIFIER_LEN: usize = 63;

/// The most connections [`PostgresConfig::pool_size`] may ask for.
pub const MAX_POOL_SIZE: usize = 64;

/// The largest [`PostgresConfig::batch_size`]: larger batches only cost memory.
pub const MAX_BATCH_SIZE: usize = 100_000;

/// Whether and how the connection is encrypted and the server authenticated, with libpq's
/// names and meanings. See the "TLS" section of the [crate docs](crate).
///
/// TLS is never used over a Unix socket (a `host` starting with `/`), whatever the mode: as in
/// libpq, the mode only applies to TCP connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP: never TLS.
    Disable,
    /// TLS when the server offers it, else plain TCP (also when the TLS handshake fails). The
    /// certificate is not verified. The default, as in libpq.
    #[default]
    Prefer,
    /// TLS or fail. The certificate is not verified (the connection is encrypted, but a
    /// man in the middle cannot be told apart from the server), except that with
    /// [`sslrootcert`](PostgresConfig::sslrootcert) set the chain is verified as with
    /// [`VerifyCa`](SslMode::VerifyCa), as libpq does.
    Require,
    /// TLS, and the certificate chain must lead to a trusted root (`sslrootcert`, else the
    /// system's roots). The host name is not checked.
    VerifyCa,
    /// TLS, a trusted chain, and a certificate issued for `host` (a DNS name, or an IP
    /// address listed as such in the certificate).
    VerifyFull,
}

impl SslMode {
    /// Every mode, weakest first.
    pub const ALL: [SslMode; 5] =
        [SslMode::Disable, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull];

    /// The libpq name (`verify-full`).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    /// Parses a libpq name; the error names the key, the value and the accepted values.
    fn from_str(value: &str) -> Result<Self> {
        SslMode::ALL.into_iter().find(|mode| mode.as_str() == value).ok_or_else(|| {
            let names: Vec<&str> = SslMode::ALL.iter().map(|m| m.as_str()).collect();
            Error::config(format!("sslmode = {value:?}: expected one of {}", names.join(", ")))
        })
    }
}

impl<'de> Deserialize<'de> for SslMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        value.parse().map_err(|e: Error| serde::de::Error::custom(e.message()))
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configuration of one PostgreSQL connector instance (`[[connectors]] type = "postgres"`).
///
/// Holds no secrets: the user name and password come from the credential provider
/// (`postgres_user`, `postgres_password`; `ARAGORA_POSTGRES_USER` / `ARAGORA_POSTGRES_PASSWORD`
/// with the default environment provider).
///
/// Table and column names are used exactly as written (case-sensitive, as if double-quoted in
/// SQL): a table created as `CREATE TABLE Docs` is named `docs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The connector's stable id. Default: derived from `postgres`, host, database and (when it
    /// is not `public`) schema, e.g. `postgres-localhost-myapp`.
    #[serde(default)]
    pub id: Option<ConnectorId>,
    /// The tenant whose knowledge store namespace receives the rows. Required.
    pub tenant_id: TenantId,
    /// Server host name or address, or the directory of a Unix socket (`/var/run/postgresql`).
    /// Default `localhost`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Server port. Default `5432`.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name. Required.
    pub database: String,
    /// Schema that holds the tables. Default `public`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Tables (or views) to sync, each one stream named `{schema}.{table}`. Required, non-empty.
    pub tables: Vec<String>,
    /// Column that orders changes: every insert and update must set it to a value that is not
    /// older than before (typically `timestamptz` maintained by a trigger). Default `updated_at`.
    #[serde(default = "default_timestamp_column")]
    pub timestamp_column: String,
    /// Column that identifies a row; unique and not null. Any orderable type (integer, uuid,
    /// text, ...). Default `id`.
    #[serde(default = "default_primary_key_column")]
    pub primary_key_column: String,
    /// Columns whose values form the searchable content. Default: every column except the
    /// primary key, the timestamp column and `bytea` columns.
    #[serde(default)]
    pub content_columns: Vec<String>,
    /// Channel for real-time updates via LISTEN/NOTIFY (exact name, case-sensitive, as given to
    /// `pg_notify`). When set, the connector's change feed listens on it and turns the trigger's
    /// notifications into immediate fetches of the changed rows; see the crate docs.
    #[serde(default)]
    pub notify_channel: Option<String>,
    /// The most connections a sync opens at once; tables are read concurrently, one connection
    /// each. Default `5`, range 1 to 64.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// The most rows in one batch (one store write and one checkpoint). Default `1000`.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Transport security, as in libpq: `disable`, `prefer` (default), `require`, `verify-ca`
    /// or `verify-full`. See [`SslMode`].
    #[serde(default)]
    pub sslmode: SslMode,
    /// A PEM file of the certificates (root CAs, and intermediates if the server does not send
    /// them) that `verify-ca` and `verify-full` trust instead of the system's roots; with
    /// `require`, setting it turns on the chain check (as in libpq). Not allowed with `disable`
    /// or `prefer`, which never verify. Read when the connector is created.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
}

fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    5432
}
fn default_schema() -> String {
    "public".into()
}
fn default_timestamp_column() -> String {
    "updated_at".into()
}
fn default_primary_key_column() -> String {
    "id".into()
}
fn default_pool_size() -> usize {
    5
}
fn default_batch_size() -> usize {
    1000
}

impl PostgresConfig {
    /// A configuration with the required options and every other option at its default.
    pub fn new(tenant_id: TenantId, database: impl Into<String>, tables: Vec<String>) -> Self {
        Self {
            id: None,
            tenant_id,
            host: default_host(),
            port: default_port(),
            database: database.into(),
            schema: default_schema(),
            tables,
            timestamp_column: default_timestamp_column(),
            primary_key_column: default_primary_key_column(),
            content_columns: Vec::new(),
            notify_channel: None,
            pool_size: default_pool_size(),
            batch_size: default_batch_size(),
            sslmode: SslMode::default(),
            sslrootcert: None,
        }
    }

    /// The configured id, or the one derived from host, database and schema.
    pub fn connector_id(&self) -> ConnectorId {
        if let Some(id) = &self.id {
            return id.clone();
        }
        if self.schema == "public" {
            ConnectorId::derive(&["postgres", &self.host, &self.database])
        } else {
            ConnectorId::derive(&["postgres", &self.host, &self.database, &self.schema])
        }
    }

    /// The stream name of `table`: `{schema}.{table}`.
    pub fn stream_name(&self, table: &str) -> String {
        format!("{}.{}", self.schema, table)
    }

    /// Checks every option; the error names the key and the offending value.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &str, value: &dyn fmt::Debug, why: &str| {
            Err(Error::config(format!("postgres connector: {key} = {value:?}: {why}")))
        };

        if self.host.is_empty() {
            return invalid("host", &self.host, "must not be empty");
        }
        if self.host.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
            return invalid(
                "host",
                &self.host,
                "must be one host name, address or socket directory (no spaces, commas or control characters)",
            );
        }
        if self.port == 0 {
            return invalid("port", &self.port, "must be between 1 and 65535");
        }
        check_name("database", &self.database)?;
        check_name("schema", &self.schema)?;

        if self.tables.is_empty() {
            return Err(Error::config("postgres connector: tables: list at least one table to sync"));
        }
        for (i, table) in self.tables.iter().enumerate() {
            check_name(&format!("tables[{i}]"), table)?;
            if let Some(j) = self.tables[..i].iter().position(|t| t == table) {
                return invalid(&format!("tables[{i}]"), table, &format!("repeats tables[{j}]"));
            }
        }
        check_name("timestamp_column", &self.timestamp_column)?;
        check_name("primary_key_column", &self.primary_key_column)?;
        if self.timestamp_column == self.primary_key_column {
            return invalid(
                "primary_key_column",
                &self.primary_key_column,
                "must differ from timestamp_column: the cursor needs both a change time and a row key",
            );
        }
        for (i, column) in self.content_columns.iter().enumerate() {
            check_name(&format!("content_columns[{i}]"), column)?;
            if let Some(j) = self.content_columns[..i].iter().position(|c| c == column) {
                return invalid(
                    &format!("content_columns[{i}]"),
                    column,
                    &format!("repeats content_columns[{j}]"),
                );
            }
        }
        if let Some(channel) = &self.notify_channel {
            check_name("notify_channel", channel)?;
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return invalid("pool_size", &self.pool_size, &format!("must be between 1 and {MAX_POOL_SIZE}"));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return invalid(
                "batch_size",
                &self.batch_size,
                &format!("must be between 1 and {MAX_BATCH_SIZE}"),
            );
        }
        if let Some(path) = &self.sslrootcert {
            if path.as_os_str().is_empty() {
                return invalid(
                    "sslrootcert",
                    &path,
                    "must not be empty (leave it out to trust the system's roots)",
                );
            }
            if matches!(self.sslmode, SslMode::Disable | SslMode::Prefer) {
                return invalid(
                    "sslrootcert",
                    &path,
                    &format!(
                        "is never used with sslmode = \"{}\"; set sslmode = \"verify-full\" (or \"verify-ca\") \
                         to verify the server's certificate against it",
                        self.sslmode
                    ),
                );
            }
            // A missing, unreadable or empty file is a configuration error now, not at the
            // first connection.
            crate::tls::load_root_file(path)?;
        }
        Ok(())
    }
}

/// Checks an identifier (or database name). Any character is allowed because every name is
/// quoted before it reaches SQL, but NUL cannot be sent, over-long names are truncated by the
/// server, and surrounding whitespace is almost always a typo.
fn check_name(key: &str, value: &str) -> Result<()> {
    let why = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.len() > MAX_IDENTIFIER_LEN {
        format!("is {} bytes long; PostgreSQL names are at most {MAX_IDENTIFIER_LEN} bytes", value.len())
    } else if value.contains('\0') {
        "must not contain NUL characters".to_string()
    } else if value.trim() != value {
        "has leading or trailing whitespace".to_string()
    } else {
        return Ok(());
    };
    Err(Error::config(format!("postgres connector: {key} = {value:?}: {why}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use connector_core::ErrorKind;

    fn base() -> PostgresConfig {
        PostgresConfig::new(TenantId::new("workspace-1").unwrap(), "myapp", vec!["documents".into()])
    }

    #[test]
    fn guide_example_parses_with_defaults() {
        let cfg: PostgresConfig = toml::from_str(
            r#"
            id = "docs-db"
            tenant_id = "workspace-1"
            host = "localhost"
            port = 5432
            database = "myapp"
            schema = "public"
            tables = ["documents", "articles", "faq"]
            timestamp_column = "updated_at"
            primary_key_column = "id"
            content_columns = ["title", "body", "summary"]
            notify_channel = "document_changes"
            pool_size = 5
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.connector_id().as_str(), "docs-db");
        assert_eq!(cfg.batch_size, 1000);
        assert_eq!(cfg.sslmode, SslMode::Prefer, "libpq's default");
        assert_eq!(cfg.sslrootcert, None);
        assert_eq!(cfg.stream_name("faq"), "public.faq");

        let minimal: PostgresConfig =
            toml::from_str("tenant_id = \"t\"\ndatabase = \"myapp\"\ntables = [\"docs\"]").unwrap();
        assert_eq!(minimal.host, "localhost");
        assert_eq!(minimal.port, 5432);
        assert_eq!(minimal.schema, "public");
        assert_eq!(minimal.timestamp_column, "updated_at");
        assert_eq!(minimal.primary_key_column, "id");
        assert!(minimal.content_columns.is_empty());
        assert_eq!(minimal.pool_size, 5);
        assert_eq!(minimal.connector_id().as_str(), "postgres-localhost-myapp");
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let err = toml::from_str::<PostgresConfig>(
            "tenant_id = \"t\"\ndatabase = \"d\"\ntables = [\"x\"]\ntimestamp_colum = \"u\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("timestamp_colum"), "{err}");
        let err =
            toml::from_str::<PostgresConfig>("tenant_id = \"t\"\ntables = [\"x\"]").unwrap_err().to_string();
        assert!(err.contains("database"), "{err}");
        let err = toml::from_str::<PostgresConfig>(
            "tenant_id = \"t\"\ndatabase = \"d\"\ntables = [\"x\"]\nsslmode = \"verify_full\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "sslmode = \"verify_full\": expected one of disable, prefer, require, verify-ca, verify-full"
            ),
            "{err}"
        );
        // The registry deserializes from a `toml::Value`, whose errors carry no line: the
        // message itself names the key.
        let table: toml::Table =
            toml::from_str("tenant_id = \"t\"\ndatabase = \"d\"\ntables = [\"x\"]\nsslmode = \"on\"")
                .unwrap();
        let err = PostgresConfig::deserialize(toml::Value::Table(table)).unwrap_err();
        assert!(err.message().contains("sslmode = \"on\": expected one of"), "{err}");
        let err = toml::from_str::<PostgresConfig>(
            "tenant_id = \"t\"\ndatabase = \"d\"\ntables = [\"x\"]\nsslrootcert = 5",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let err =
            toml::from_str::<PostgresConfig>("tenant_id = \"../t\"\ndatabase = \"d\"\ntables = [\"x\"]")
                .unwrap_err()
                .to_string();
        assert!(err.contains("tenant_id"), "{err}");
    }

    #[test]
    fn derived_id_includes_non_public_schema() {
        let mut cfg = base();
        cfg.host = "db.example.com".into();
        assert_eq!(cfg.connector_id().as_str(), "postgres-db-example-com-myapp");
        cfg.schema = "Sales".into();
        assert_eq!(cfg.connector_id().as_str(), "postgres-db-example-com-myapp-sales");
    }

    #[test]
    fn validation_errors_name_key_and_value() {
        type Edit = fn(&mut PostgresConfig);
        let cases: &[(Edit, &str)] = &[
            (|c| c.tables = vec![], "tables: list at least one table"),
            (|c| c.tables = vec!["a".into(), "".into()], "tables[1] = \"\": must not be empty"),
            (|c| c.tables = vec!["a".into(), "a".into()], "tables[1] = \"a\": repeats tables[0]"),
            (|c| c.tables = vec!["a\0b".into()], "tables[0] = \"a\\0b\": must not contain NUL"),
            (|c| c.tables = vec!["x".repeat(64)], "tables[0] = \"xxxx"),
            (
                |c| c.tables = vec![" docs".into()],
                "tables[0] = \" docs\": has leading or trailing whitespace",
            ),
            (|c| c.host = String::new(), "host = \"\": must not be empty"),
            (|c| c.host = "a b".into(), "host = \"a b\""),
            (|c| c.port = 0, "port = 0"),
            (|c| c.database = String::new(), "database = \"\""),
            (|c| c.schema = String::new(), "schema = \"\""),
            (|c| c.timestamp_column = "id".into(), "primary_key_column = \"id\": must differ"),
            (|c| c.content_columns = vec!["a".into(), "".into()], "content_columns[1] = \"\""),
            (|c| c.content_columns = vec!["a".into(), "a".into()], "content_columns[1] = \"a\": repeats"),
            (|c| c.notify_channel = Some(String::new()), "notify_channel = \"\""),
            (|c| c.pool_size = 0, "pool_size = 0: must be between 1 and 64"),
            (|c| c.pool_size = 65, "pool_size = 65"),
            (|c| c.batch_size = 0, "batch_size = 0"),
            (
                |c| c.sslrootcert = Some("/etc/ca.pem".into()),
                "sslrootcert = \"/etc/ca.pem\": is never used with sslmode = \"prefer\"; set sslmode = \"verify-full\"",
            ),
            (
                |c| (c.sslmode, c.sslrootcert) = (SslMode::Disable, Some("/etc/ca.pem".into())),
                "sslrootcert = \"/etc/ca.pem\": is never used with sslmode = \"disable\"",
            ),
            (
                |c| (c.sslmode, c.sslrootcert) = (SslMode::VerifyFull, Some("".into())),
                "sslrootcert = \"\": must not be empty",
            ),
            (
                |c| (c.sslmode, c.sslrootcert) = (SslMode::VerifyCa, Some("/nonexistent/ca.pem".into())),
                "sslrootcert = \"/nonexistent/ca.pem\": cannot read the file: No such file or directory",
            ),
            (
                |c| (c.sslmode, c.sslrootcert) = (SslMode::Require, Some("/".into())),
                "sslrootcert = \"/\": cannot read the file",
            ),
        ];
        for (edit, expected) in cases {
            let mut cfg = base();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(expected), "expected {expected:?} in {err}");
        }
    }

    #[test]
    fn sslmode_names_are_libpqs() {
        for (name, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(name.parse::<SslMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), name);
            let cfg: PostgresConfig = toml::from_str(&format!(
                "tenant_id = \"t\"\ndatabase = \"d\"\ntables = [\"x\"]\nsslmode = \"{name}\""
            ))
            .unwrap();
            assert_eq!(cfg.sslmode, mode);
            cfg.validate().unwrap();
            // Serializing gives the same name back.
            assert!(toml::to_string(&cfg).unwrap().contains(&format!("sslmode = \"{name}\"")));
        }
        for bad in ["", "Require", "verify_full", "allow", "true"] {
            let err = bad.parse::<SslMode>().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(&format!("sslmode = {bad:?}: expected one of")), "{err}");
        }
    }

    /// A self-signed CA certificate (EC P-256, valid until 2126), for loading only.
    pub(crate) const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBvDCCAWGgAwIBAgIUWgTAANRQ0FtAdNTCs13On/uJjpcwCgYIKoZIzj0EAwIw
KjEoMCYGA1UEAwwfY29ubmVjdG9yLXBvc3RncmVzIHVuaXQgdGVzdCBDQTAgFw0y
NjExMjIwMzQ5MjVaGA8yMTI2MTAyOTAzNDkyNVowKjEoMCYGA1UEAwwfY29ubmVj
dG9yLXBvc3RncmVzIHVuaXQgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABI0SVQIjjM4bdHjOlKA8tqTVvc90RZN1zOzB9VEs0Hh7XgdaQ/Ca16R7xZyh
/h9nNrwfnP2l1NCEI63dD+5P6MGjYzBhMB0GA1UdDgQWBBQeL//XJKLJly+ueahc
mVNN3RAqkDAfBgNVHSMEGDAWgBQeL//XJKLJly+ueahcmVNN3RAqkDAPBgNVHRMB
Af8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQDAgNJADBGAiEA9QVP
k/Zvut1LKK/uyaBGrTcGQyOh78bEPyxZwxF8poICIQDuJq0W78p5uQyQOXv6g1h/
NBJwE4uiQ5Bt+cLAet+aSA==
-----END CERTIFICATE-----
";

    #[test]
    fn sslrootcert_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let good = file("ca.pem", &format!("# our CA\n{TEST_CA_PEM}"));
        let cases = [
            (file("empty.pem", ""), "contains no PEM certificate"),
            (
                file("key-only.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                "contains no PEM certificate",
            ),
            (file("text.pem", "not a certificate at all\n"), "contains no PEM certificate"),
            (file("truncated.pem", &TEST_CA_PEM[..200]), "is not a valid PEM file"),
            (
                file("not-der.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                "certificate 1 cannot be used as a root",
            ),
        ];
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            let mut cfg = base();
            cfg.sslmode = mode;
            cfg.sslrootcert = Some(good.clone());
            cfg.validate().unwrap();
            for (path, expected) in &cases {
                cfg.sslrootcert = Some(path.clone());
                let err = cfg.validate().unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Config);
                let text = err.to_string();
                assert!(text.contains(&format!("sslrootcert = {path:?}: {expected}")), "{mode}: {text}");
            }
        }
    }

    #[test]
    fn odd_but_quotable_names_are_accepted() {
        let mut cfg = base();
        cfg.tables = vec!["we\"ird; DROP TABLE x".into(), "Mixed Case".into()];
        cfg.content_columns = vec!["ü-col".into()];
        cfg.notify_channel = Some("document_changes".into());
        cfg.validate().unwrap();
    }
}
