//! The PostgreSQL test server: it starts, isolates tests, checks passwords, and goes away.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use connector_testkit::PgServer;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn shared_server_creates_isolated_databases_and_runs_queries() -> Result<()> {
    let pg = PgServer::shared().await?;
    let db = pg.create_database("testkit_query").await?;
    let other = pg.create_database("testkit_query").await?;
    assert_ne!(db, other);

    pg.execute_batch(
        &db,
        "CREATE TABLE t (id bigint PRIMARY KEY, body text); INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    )
    .await?;
    let client = pg.client(&db).await?;
    let row = client.query_one("SELECT count(*), string_agg(body, ',' ORDER BY id) FROM t", &[]).await?;
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, String>(1), "a,b");

    // The other database does not see the table.
    let err = pg.client(&other).await?.query("SELECT * FROM t", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));

    // Logical replication tests need this.
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    assert_eq!(wal_level, "logical");

    // psql reaches the same database over TCP with the password from the environment.
    let out = pg.psql(&db, ["-At", "-c", "SELECT body FROM t WHERE id = 2"])?;
    assert_eq!(out.trim(), "b");
    let script = "\\pset tuples_only on\n\\pset format unaligned\nCOPY t FROM STDIN;\n3\tc\n\\.\nSELECT count(*) FROM t;\n";
    assert_eq!(pg.psql_script(&db, script)?.trim(), "3");
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_rejected_over_tcp() -> Result<()> {
    let pg = PgServer::shared().await?;
    let err = tokio_postgres::Config::new()
        .host(pg.host())
        .port(pg.port())
        .user(PgServer::SUPERUSER)
        .password("not-the-password")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .context("connecting with a wrong password succeeded")?;
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    // And the URL carries the right one.
    let (client, connection) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    Ok(())
}

#[test]
fn owned_server_trusts_its_socket_and_cleans_up_on_drop() -> Result<()> {
    let pg = PgServer::start()?;
    let pid = pg.pid().context("an owned server knows its pid")?;
    let run_dir = pg.data_dir().unwrap().parent().unwrap().to_path_buf();
    assert!(alive(pid));

    // No password over the unix socket.
    let out = pg
        .psql_command("postgres")
        .env_remove("PGPASSWORD")
        .arg("-h")
        .arg(pg.socket_dir().unwrap())
        .args(["-At", "-c", "SELECT current_user"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres");

    drop(pg);
    assert!(!alive(pid), "postmaster {pid} still runs after drop");
    assert!(!run_dir.exists(), "{} still exists after drop", run_dir.display());
    Ok(())
}

#[tokio::test]
async fn owned_server_takes_extra_settings_and_files() -> Result<()> {
    // A value with a space and a quote must reach the server as one word.
    let pg = tokio::task::spawn_blocking(|| {
        PgServer::start_with_files(
            &[("cluster_name", "it's a test"), ("work_mem", "7MB")],
            &[("note.txt", b"hello from the testkit")],
        )
    })
    .await??;
    let client = pg.client("postgres").await?;
    let name: String = client.query_one("SHOW cluster_name", &[]).await?.get(0);
    assert_eq!(name, "it's a test");
    let work_mem: String = client.query_one("SHOW work_mem", &[]).await?.get(0);
    assert_eq!(work_mem, "7MB");
    // Relative paths are relative to the data folder; the server's user can read the file.
    let note: String = client.query_one("SELECT pg_read_file('note.txt')", &[]).await?.get(0);
    assert_eq!(note, "hello from the testkit");
    let path = pg.data_dir().unwrap().join("note.txt");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    // The testkit's own settings still apply.
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    assert_eq!(wal_level, "logical");
    drop(client);
    tokio::task::spawn_blocking(move || pg.stop()).await??;

    let err = PgServer::start_with_options(&[("bad name", "1")]).unwrap_err();
    assert!(err.to_string().contains("server setting name \"bad name\""), "{err}");
    let err = PgServer::start_with_files(&[], &[("../x", b"")]).unwrap_err();
    assert!(err.to_string().contains("server file name \"../x\""), "{err}");
    Ok(())
}

/// Started by the test below in a child process, which it then kills with SIGKILL.
#[test]
#[ignore = "helper process for watchdog_stops_server_when_owner_is_killed"]
fn helper_start_server_and_wait() {
    if std::env::var_os("TESTKIT_PG_HELPER").is_none() {
        return;
    }
    let pg = PgServer::start().unwrap();
    println!("SERVER {} {}", pg.pid().unwrap(), pg.data_dir().unwrap().parent().unwrap().display());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn watchdog_stops_server_when_owner_is_killed() -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["helper_start_server_and_wait", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TESTKIT_PG_HELPER", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // libtest prints "test NAME ... " before the helper's own line.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| Some(line.split_once("SERVER ")?.1.to_owned()))
        .context("the helper did not start a server")?;
    let mut words = line.split_whitespace();
    let pid: u32 = words.next().unwrap().parse()?;
    let run_dir = words.next().unwrap().to_owned();
    assert!(alive(pid));

    child.kill()?; // SIGKILL: no destructor runs
    child.wait()?;

    let deadline = Instant::now() + Duration::from_secs(15);
    while (alive(pid) || Path::new(&run_dir).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(pid), "postmaster {pid} outlived its owner");
    assert!(!Path::new(&run_dir).exists(), "{run_dir} outlived its owner");
    Ok(())
}

/// Running and not a zombie (PID 1 of a container may not reap orphans).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// Connector leases in PostgreSQL (`connector_core::lease::PgLeaseStore`): two holders split
/// the connectors, and the survivor takes over the dead one's after the TTL, by the database's
/// clock.
#[tokio::test]
async fn pg_leases_split_connectors_and_expire() -> Result<()> {
    use std::sync::Arc;

    use connector_core::lease::{LeaseKey, LeaseManager, PgLeaseStore};
    use connector_core::{ConnectorId, TenantId};

    let pg = PgServer::shared().await?;
    let db = pg.create_database("testkit_leases").await?;
    let pool = connector_core::reexports::sqlx::PgPool::connect(&pg.url(&db)).await?;
    // Two processes creating the tables at once is fine.
    let (s1, s2) = tokio::join!(PgLeaseStore::new(pool.clone()), PgLeaseStore::new(pool.clone()));
    let (s1, s2) = (Arc::new(s1?), Arc::new(s2?));
    let keys: Vec<LeaseKey> =
        (0..20).map(|i| (ConnectorId::new(format!("c{i}")).unwrap(), TenantId::new("t").unwrap())).collect();
    let ttl = Duration::from_secs(2);
    let a = LeaseManager::new(s1, "a", ttl, keys.clone());
    let b = LeaseManager::new(s2, "b", ttl, keys.clone());
    let idle = |_: &LeaseKey| false;
    assert_eq!(a.cycle(&idle).await?.len(), 20);
    assert_eq!(b.cycle(&idle).await?.len(), 0);
    assert_eq!(a.cycle(&idle).await?.len(), 10);
    assert_eq!(b.cycle(&idle).await?.len(), 10);
    assert!(a.held().is_disjoint(&b.held()));

    // b stops renewing; after the TTL a takes everything.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(a.cycle(&idle).await?.len(), 20);
    let held_by_b: i64 = connector_core::reexports::sqlx::query_scalar(
        "SELECT count(*) FROM connector_leases WHERE holder = 'b'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(held_by_b, 0);
    Ok(())
}
