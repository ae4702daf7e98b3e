//! A throwaway PostgreSQL server for the integration tests: one per test process, on a free
//! port under a temporary directory, stopped by a watchdog when the process exits.
//!
//! Found through `PG_BIN` or `/usr/lib/postgresql/*/bin`; when there is none, tests that
//! need it print why and pass without running (`CONNECTOR_PG_TESTS=require` makes that a
//! failure, for CI machines that must run them). As root, the server runs as `postgres`
//! (PostgreSQL refuses root), through `runuser`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use connector_core::{ConnectorContext, StaticCredentialProvider, TenantId};
use connector_postgres::PostgresConfig;

pub struct Server {
    pub port: u16,
    pub socket_dir: PathBuf,
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();

fn pg_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(as_postgres: bool, program: &Path, args: &[&str]) {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().unwrap_or_else(|e| panic!("running {program:?}: {e}"));
    assert!(
        out.status.success(),
        "{program:?} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start() -> Option<Server> {
    let Some(bin) = pg_bin() else {
        let msg = "no PostgreSQL binaries (set PG_BIN): skipping integration test";
        if std::env::var("CONNECTOR_PG_TESTS").as_deref() == Ok("require") {
            panic!("{msg}");
        }
        eprintln!("{msg}");
        return None;
    };
    let is_root =
        Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
    let root = tempfile::Builder::new().prefix("connector-postgres-test-").tempdir().unwrap().keep();
    let data = root.join("data");
    let socket_dir = root.join("sock");
    std::fs::create_dir_all(&socket_dir).unwrap();
    if is_root {
        run(false, Path::new("chown"), &["-R", "postgres:postgres", root.to_str().unwrap()]);
    }
    let data_s = data.to_str().unwrap();
    run(
        is_root,
        &bin.join("initdb"),
        &["-D", data_s, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
    );
    // pwuser must give a password over TCP; everyone else is trusted.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all pwuser 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let port = free_port();
    let opts = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        socket_dir.display()
    );
    let log = root.join("server.log");
    run(
        is_root,
        &bin.join("pg_ctl"),
        &["-D", data_s, "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"],
    );

    // Stop the server and remove its files once this test process is gone.
    let pg_ctl = bin.join("pg_ctl");
    let stop = if is_root {
        format!("runuser -u postgres -- {} -D {data_s} -m immediate stop", pg_ctl.display())
    } else {
        format!("{} -D {data_s} -m immediate stop", pg_ctl.display())
    };
    // The watchdog runs in the background of a shell that exits at once: it outlives us.
    let script = format!(
        "(while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {root}) \
         </dev/null >/dev/null 2>&1 &",
        pid = std::process::id(),
        root = root.display()
    );
    let status = Command::new("sh").args(["-c", &script]).status().unwrap();
    assert!(status.success(), "starting the server watchdog failed");
    Some(Server { port, socket_dir })
}

/// The shared server, or None when PostgreSQL is not installed.
pub fn server() -> Option<&'static Server> {
    SERVER.get_or_init(start).as_ref()
}

impl Server {
    /// A superuser connection to `db`.
    pub async fn admin(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// A fresh database named `name` (dropped first if it exists), set up with `sql`.
    pub async fn database(&self, name: &str, sql: &str) -> tokio_postgres::Client {
        let admin = self.admin("postgres").await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let client = self.admin(name).await;
        client.batch_execute(sql).await.unwrap();
        client
    }

    /// A config for `tables` in database `db` on this server, tenant `t1`.
    pub fn config(&self, db: &str, tables: &[&str]) -> PostgresConfig {
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            ..PostgresConfig::new(
                TenantId::new("t1").unwrap(),
                db,
                tables.iter().map(|t| t.to_string()).collect(),
            )
        }
    }
}

/// A context whose credentials are the superuser `postgres` (trusted, no password).
pub fn ctx() -> ConnectorContext {
    ctx_with(StaticCredentialProvider::new().with("postgres_user", "postgres"))
}

pub fn ctx_with(provider: StaticCredentialProvider) -> ConnectorContext {
    ConnectorContext::new(Arc::new(provider))
}

/// Skips the test when no server is available.
#[macro_export]
macro_rules! require_server {
    () => {
        match common::server() {
            Some(s) => s,
            None => return,
        }
    };
}
