//! TLS against real servers: an owned server with `ssl = on` and a certificate made at test time
//! (by the `openssl` command) for the name `localhost` only, and the shared server without TLS.
//!
//! Whether a session really is encrypted is read from the server log (`log_connections`), not
//! taken from the connector's word.

use super::common;

use std::path::PathBuf;
use std::process::Command;

use connector_core::{Batch, Change, Connector, Cursors, Error, ErrorKind, ReadMode, ReadRequest, TenantId};
use connector_postgres::{PostgresConfig, PostgresConnector, SslMode};
use connector_testkit::PgServer;
use futures::StreamExt;
use tokio::sync::OnceCell;

/// The certificate names only this host; `127.0.0.1` reaches the same server under a name the
/// certificate does not list.
const CERT_HOST: &str = "localhost";
const IP_HOST: &str = "127.0.0.1";

/// Files of the test PKI, as written into the TLS server's data folder.
const CA: &str = "ca.crt";
const OTHER_CA: &str = "other-ca.crt";

static TLS_SERVER: OnceCell<PgServer> = OnceCell::const_new();
static OLD_TLS_SERVER: OnceCell<PgServer> = OnceCell::const_new();

/// Runs `openssl` in `dir`; fails the test, loudly, when there is no `openssl`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!(
            "the TLS tests make their certificates with the `openssl` command, which could not be run ({e}); \
             install it (apt-get install openssl)"
        )
    });
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a second unrelated CA, and a server certificate from the first for `localhost` only.
/// Returns the files (name, contents) the server needs and the tests trust.
fn make_certificates() -> Vec<(&'static str, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = |name: &str, subject: &str| {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-days",
                "3",
                "-subj",
                subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )
    };
    ca("ca", "/CN=connector-postgres test CA");
    ca("other-ca", "/CN=connector-postgres unrelated CA");
    openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={CERT_HOST}"),
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        format!(
            "subjectAltName=DNS:{CERT_HOST}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "4242",
            "-days",
            "3",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    let read = |name: &str| std::fs::read(d.join(name)).unwrap();
    vec![
        ("server.crt", read("server.crt")),
        ("server.key", read("server.key")),
        (CA, read("ca.crt")),
        (OTHER_CA, read("other-ca.crt")),
    ]
}

/// Starts an owned server with TLS and `extra` settings, logging every connection.
async fn start_tls_server(extra: &'static [(&'static str, &'static str)]) -> PgServer {
    let files = make_certificates();
    tokio::task::spawn_blocking(move || {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
        let mut settings = vec![
            ("ssl", "on"),
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
            ("log_connections", "on"),
        ];
        settings.extend_from_slice(extra);
        PgServer::start_with_files(&settings, &files)
    })
    .await
    .unwrap()
    .expect("starting PostgreSQL with TLS")
}

/// The TLS server of this test process.
async fn tls_server() -> &'static PgServer {
    TLS_SERVER.get_or_init(|| start_tls_server(&[])).await
}

/// A server that offers TLS but only versions rustls refuses (1.0 and 1.1): every handshake fails.
async fn old_tls_server() -> &'static PgServer {
    OLD_TLS_SERVER
        .get_or_init(|| {
            start_tls_server(&[
                ("ssl_min_protocol_version", "TLSv1"),
                ("ssl_max_protocol_version", "TLSv1.1"),
            ])
        })
        .await
}

/// A fresh database `name` on `pg` with table `docs` of three rows.
async fn database(pg: &PgServer, name: &str) -> String {
    let db = pg.create_database(name).await.unwrap();
    pg.execute_batch(
        &db,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO docs (id, body) VALUES (1, 'one'), (2, 'two'), (3, 'three');",
    )
    .await
    .unwrap();
    db
}

fn config(
    pg: &PgServer,
    host: &str,
    db: &str,
    sslmode: SslMode,
    sslrootcert: Option<&str>,
) -> PostgresConfig {
    PostgresConfig {
        host: host.into(),
        port: pg.port(),
        sslmode,
        sslrootcert: sslrootcert.map(|name| pki_file(pg, name)),
        ..PostgresConfig::new(TenantId::new("t1").unwrap(), db, vec!["docs".into()])
    }
}

fn pki_file(pg: &PgServer, name: &str) -> PathBuf {
    pg.data_dir().expect("an owned server").join(name)
}

/// Checks and reads `docs` with `config`: the number of rows read.
async fn check_and_read(config: PostgresConfig) -> Result<usize, Error> {
    let c = PostgresConnector::new(config, &common::ctx())?;
    c.check().await?;
    let request =
        ReadRequest { mode: ReadMode::Full, cursors: Cursors::new(), batch_size: 10, batch_bytes: 1 << 20 };
    let mut stream = c.read(request);
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        let batch: Batch = batch?;
        rows += batch.changes.iter().filter(|c| matches!(c, Change::Upsert(_))).count();
    }
    Ok(rows)
}

/// Sessions of the connector in `db` that the server logged, as (encrypted, plain).
fn logged_sessions(pg: &PgServer, db: &str) -> (usize, usize) {
    let log = std::fs::read_to_string(pg.log_file().unwrap()).unwrap();
    let ours = log.lines().filter(|line| {
        line.contains("connection authorized:")
            && line.contains(&format!(" database={db} "))
            && line.contains("application_name=enterprise-connectors")
    });
    ours.fold(
        (0, 0),
        |(tls, plain), line| {
            if line.contains("SSL enabled") { (tls + 1, plain) } else { (tls, plain + 1) }
        },
    )
}

/// The error is permanent, names the address and mode, and does not show the password.
fn assert_permanent(err: &Error, kind: ErrorKind, address: &str, sslmode: &str, expected: &str) {
    let text = err.to_string();
    eprintln!("{sslmode}: {text}");
    assert_eq!(err.kind(), kind, "{text}");
    assert!(!err.is_retryable(), "{text}");
    assert!(
        text.starts_with(&format!(
            "cannot connect to PostgreSQL at {address} with sslmode = \"{sslmode}\": "
        )),
        "{text}"
    );
    assert!(text.contains(expected), "expected {expected:?} in {text}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(PgServer::SUPERUSER_PASSWORD), "password leaked: {shown}");
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_verifying() {
    let pg = tls_server().await;
    for (mode, name) in [(SslMode::Require, "tls_require"), (SslMode::Prefer, "tls_prefer")] {
        let db = database(pg, name).await;
        // 127.0.0.1 is not in the certificate: neither mode checks names or issuers.
        assert_eq!(check_and_read(config(pg, IP_HOST, &db, mode, None)).await.unwrap(), 3, "{mode}");
        let (tls, plain) = logged_sessions(pg, &db);
        assert!(tls >= 2 && plain == 0, "{mode}: {tls} encrypted and {plain} plain sessions");
    }
    // The default is prefer.
    let db = database(pg, "tls_default").await;
    let cfg = PostgresConfig {
        host: IP_HOST.into(),
        port: pg.port(),
        ..PostgresConfig::new(TenantId::new("t1").unwrap(), db.clone(), vec!["docs".into()])
    };
    assert_eq!(check_and_read(cfg).await.unwrap(), 3);
    assert!(matches!(logged_sessions(pg, &db), (2.., 0)), "{:?}", logged_sessions(pg, &db));

    // disable stays plain on a server that offers TLS.
    let db = database(pg, "tls_disable").await;
    assert_eq!(check_and_read(config(pg, IP_HOST, &db, SslMode::Disable, None)).await.unwrap(), 3);
    let (tls, plain) = logged_sessions(pg, &db);
    assert!(tls == 0 && plain >= 2, "disable: {tls} encrypted and {plain} plain sessions");
}

#[tokio::test]
async fn verify_full_checks_the_chain_and_the_host_name() {
    let pg = tls_server().await;
    let db = database(pg, "tls_verify_full").await;
    assert_eq!(check_and_read(config(pg, CERT_HOST, &db, SslMode::VerifyFull, Some(CA))).await.unwrap(), 3);
    let (tls, plain) = logged_sessions(pg, &db);
    assert!(tls >= 2 && plain == 0, "{tls} encrypted and {plain} plain sessions");

    // Same server, same CA, a name the certificate does not list.
    let err = check_and_read(config(pg, IP_HOST, &db, SslMode::VerifyFull, Some(CA))).await.unwrap_err();
    let address = format!("{IP_HOST}:{}", pg.port());
    assert_permanent(
        &err,
        ErrorKind::Auth,
        &address,
        "verify-full",
        "the server's certificate is not valid for host name \"127.0.0.1\"",
    );
    assert!(err.to_string().contains("verify-ca"), "the error names the way out: {err}");

    // verify-ca checks the chain only.
    assert_eq!(check_and_read(config(pg, IP_HOST, &db, SslMode::VerifyCa, Some(CA))).await.unwrap(), 3);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_an_auth_error_not_retried() {
    let pg = tls_server().await;
    let db = database(pg, "tls_other_ca").await;
    let other = pki_file(pg, OTHER_CA);
    for (mode, host) in [(SslMode::VerifyCa, IP_HOST), (SslMode::VerifyFull, CERT_HOST)] {
        let err = check_and_read(config(pg, host, &db, mode, Some(OTHER_CA))).await.unwrap_err();
        assert_permanent(
            &err,
            ErrorKind::Auth,
            &format!("{host}:{}", pg.port()),
            mode.as_str(),
            &format!("the server's certificate is not signed by a CA in sslrootcert {other:?}"),
        );
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }
    // As in libpq, require with a root file checks the chain.
    let err = check_and_read(config(pg, IP_HOST, &db, SslMode::Require, Some(OTHER_CA))).await.unwrap_err();
    assert_permanent(
        &err,
        ErrorKind::Auth,
        &format!("{IP_HOST}:{}", pg.port()),
        "require",
        "not signed by a CA",
    );
    assert_eq!(check_and_read(config(pg, IP_HOST, &db, SslMode::Require, Some(CA))).await.unwrap(), 3);

    // The system's roots do not know the test CA.
    let err = match check_and_read(config(pg, CERT_HOST, &db, SslMode::VerifyFull, None)).await {
        Err(err) => err,
        Ok(_) => panic!("a test certificate was trusted by the system's roots"),
    };
    if err.kind() == ErrorKind::Config {
        // A machine without a system store.
        assert!(err.to_string().contains("no trusted root certificates"), "{err}");
    } else {
        assert_permanent(
            &err,
            ErrorKind::Auth,
            &format!("{CERT_HOST}:{}", pg.port()),
            "verify-full",
            "not signed by a CA in the system's trusted roots",
        );
    }
}

#[tokio::test]
async fn a_server_without_tls() {
    let server = common::server().await;
    server
        .database(
            "no_tls",
            "CREATE TABLE docs (id int PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO docs (id, body) VALUES (1, 'one'), (2, 'two');",
        )
        .await;
    let address = format!("127.0.0.1:{}", server.port());
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let cfg = PostgresConfig { sslmode: mode, ..server.config("no_tls", &["docs"]) };
        let err = check_and_read(cfg).await.unwrap_err();
        assert_permanent(
            &err,
            ErrorKind::Config,
            &address,
            mode.as_str(),
            "the server does not accept TLS connections",
        );
    }
    // prefer (the default) falls back to plain TCP.
    for mode in [SslMode::Prefer, SslMode::Disable] {
        let cfg = PostgresConfig { sslmode: mode, ..server.config("no_tls", &["docs"]) };
        assert_eq!(check_and_read(cfg).await.unwrap(), 2, "{mode}");
    }
}

#[tokio::test]
async fn prefer_falls_back_to_plain_when_the_handshake_fails() {
    let pg = old_tls_server().await;
    let db = database(pg, "tls_old").await;
    let address = format!("{IP_HOST}:{}", pg.port());
    let err = check_and_read(config(pg, IP_HOST, &db, SslMode::Require, None)).await.unwrap_err();
    assert_permanent(&err, ErrorKind::Config, &address, "require", "the TLS handshake failed");

    assert_eq!(check_and_read(config(pg, IP_HOST, &db, SslMode::Prefer, None)).await.unwrap(), 3);
    let (tls, plain) = logged_sessions(pg, &db);
    assert!(tls == 0 && plain >= 2, "{tls} encrypted and {plain} plain sessions");
}
