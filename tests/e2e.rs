//! End to end: the `connectors` binary against a real PostgreSQL (started by the testkit,
//! or the one `cargo xtask test` announces), writing into the embedded store.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use connector_core::store::{KnowledgeStore, SqliteKnowledgeStore};
use connector_core::{ConnectorId, TenantId};
use connector_testkit::postgres::PgServer;
use futures::StreamExt;
use serde_json::Value;

/// A role the connector logs in as; its password must never be printed.
const READER: &str = "reader_e2e";
const READER_PASSWORD: &str = "pw-Zq8xK-never-print-7731";

struct Env {
    server: &'static PgServer,
    db: String,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new(prefix: &str) -> Env {
        let server = PgServer::shared().await.expect("PostgreSQL for tests");
        let db = server.create_database(prefix).await.unwrap();
        server
            .execute_batch(
                &db,
                &format!(
                    "DO $$ BEGIN
                       IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
                         CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}';
                       END IF;
                     END $$;
                     GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER};
                     ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {READER};"
                ),
            )
            .await
            .unwrap();
        Env { server, db, dir: tempfile::tempdir().unwrap() }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn sql(&self, sql: &str) -> impl std::future::Future<Output = ()> + '_ {
        let sql = sql.to_owned();
        async move { self.server.execute_batch(&self.db, &sql).await.unwrap() }
    }

    /// A documents table; `n` rows, the first `shared` of them with one timestamp.
    async fn documents_table(&self, table: &str, n: i64, shared: i64) {
        self.sql(&format!(
            "CREATE TABLE {table} (
                id bigserial PRIMARY KEY,
                title text NOT NULL,
                body text,
                score numeric(10,2),
                tags text[],
                published boolean DEFAULT true,
                extra jsonb,
                created_at timestamptz DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {table} (title, body, score, tags, extra, updated_at)
             SELECT 'Doc ' || g, 'body of document ' || g || ' about topic' || (g % 7),
                    g / 3.0, ARRAY['t' || (g % 3)], jsonb_build_object('n', g),
                    CASE WHEN g <= {shared} THEN timestamptz '2024-01-01 00:00:00+00'
                         ELSE timestamptz '2024-01-02 00:00:00+00' + g * interval '1 second' END
             FROM generate_series(1, {n}) g;
             GRANT SELECT ON {table} TO {READER};"
        ))
        .await;
    }

    fn write_config(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("connectors.toml");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn pg_connector(&self, id: &str, tenant: &str, tables: &[&str]) -> String {
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        format!(
            "[[connectors]]\ntype = \"postgres\"\nid = \"{id}\"\ntenant_id = \"{tenant}\"\nhost = \"{}\"\nport = {}\n\
             database = \"{}\"\ntables = [{}]\ncontent_columns = [\"title\", \"body\"]\n",
            self.server.host(),
            self.server.port(),
            self.db,
            tables.join(", ")
        )
    }

    fn command(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_connectors"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .env("ARAGORA_HOME", self.home())
            .env("ARAGORA_POSTGRES_USER", READER)
            .env("ARAGORA_POSTGRES_PASSWORD", READER_PASSWORD)
            .env_remove("ARAGORA_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, config: &Path, args: &[&str]) -> Output {
        self.command(config, args).output().expect("running connectors")
    }

    async fn store(&self) -> SqliteKnowledgeStore {
        SqliteKnowledgeStore::open(self.home().join("knowledge.db")).await.unwrap()
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn sync_json(env: &Env, config: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["sync", "--json"];
    args.extend_from_slice(extra);
    let out = env.run(config, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{}", text(&out));
    lines.remove(0)
}

fn counts(v: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    (n("items_synced"), n("items_unchanged"), n("items_deleted"), n("items_failed"))
}

#[tokio::test]
async fn full_incremental_no_change_deletes_and_search() {
    let env = Env::new("e2e_main").await;
    // 1,500 of 2,000 rows share one timestamp: more than a batch (1,000).
    env.documents_table("documents", 2000, 1500).await;
    let config = env.write_config(&env.pg_connector("docs-db", "workspace-1", &["documents"]));

    let r = sync_json(&env, &config, &[]);
    assert_eq!(r["success"], true);
    assert_eq!(r["full_sync"], true, "the first sync is full");
    assert_eq!(counts(&r), (2000, 0, 0, 0));

    // Inserts and updates that all share one (new) timestamp.
    env.sql(
        "INSERT INTO documents (title, body, updated_at)
           SELECT 'New ' || g, 'fresh zebracorn text ' || g, timestamptz '2030-01-01 00:00:00+00'
           FROM generate_series(1, 1200) g;
         UPDATE documents SET body = body || ' edited', updated_at = timestamptz '2030-01-01 00:00:00+00'
           WHERE id % 10 = 0 AND id <= 2000;",
    )
    .await;
    let r = sync_json(&env, &config, &[]);
    assert_eq!(r["full_sync"], false);
    assert_eq!(counts(&r), (1400, 0, 0, 0), "1,200 inserts + 200 updates, each once");

    let store = env.store().await;
    let tenant = TenantId::new("workspace-1").unwrap();
    let cid = ConnectorId::new("docs-db").unwrap();
    assert_eq!(store.count(&tenant, Some(&cid)).await.unwrap(), 3200);
    let doc = store.get(&tenant, &cid, "documents:20").await.unwrap().expect("row 20");
    assert!(doc.document.content.contains("edited"), "{:?}", doc.document.content);
    assert_eq!(doc.document.metadata["tags"], serde_json::json!(["t2"]));

    // Nothing changed: nothing read, nothing written.
    let db_file = env.home().join("knowledge.db");
    let before = std::fs::metadata(&db_file).unwrap().modified().unwrap();
    let r = sync_json(&env, &config, &[]);
    assert_eq!(counts(&r), (0, 0, 0, 0));
    let synced_at = store.get(&tenant, &cid, "documents:20").await.unwrap().unwrap().synced_at;
    assert_eq!(synced_at, doc.synced_at, "no rewrite");
    assert_eq!(std::fs::metadata(&db_file).unwrap().modified().unwrap(), before, "store file untouched");

    // Deleted rows disappear with a full sync; unchanged rows are not rewritten.
    env.sql("DELETE FROM documents WHERE id BETWEEN 101 AND 150").await;
    let r = sync_json(&env, &config, &["--full"]);
    assert_eq!(counts(&r), (0, 3150, 50, 0));
    assert_eq!(store.count(&tenant, Some(&cid)).await.unwrap(), 3150);
    assert!(store.get(&tenant, &cid, "documents:120").await.unwrap().is_none());

    // Search, through the CLI.
    let out = env.run(&config, &["search", "zebracorn", "--tenant", "workspace-1", "--limit", "3", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let hits = json_lines(&out);
    assert_eq!(hits.len(), 3);
    for h in &hits {
        assert!(h["title"].as_str().unwrap().starts_with("New "), "{h}");
        assert!(h["snippet"].as_str().unwrap().contains("[zebracorn]"), "{h}");
        assert_eq!(h["connector_id"], "docs-db");
    }

    // Status and history speak JSON Lines with the guide's fields.
    let out = env.run(&config, &["status", "--json"]);
    let status = &json_lines(&out)[0];
    assert_eq!(status["status"], "success");
    assert_eq!(status["documents"], 3150);
    assert!(status["last_sync_at"].is_string());
    let out = env.run(&config, &["history", "--json", "--limit", "2"]);
    let runs = json_lines(&out);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["full_sync"], true, "newest first");
    assert_eq!(runs[0]["items_deleted"], 50);

    // Export: one document per line.
    let out = env.run(&config, &["export", "--tenant", "workspace-1"]);
    let docs = json_lines(&out);
    assert_eq!(docs.len(), 3150);
    for key in [
        "id",
        "tenant_id",
        "connector_id",
        "kind",
        "title",
        "content",
        "url",
        "author",
        "created_at",
        "updated_at",
        "metadata",
    ] {
        assert!(docs[0].get(key).is_some(), "export lacks {key}: {}", docs[0]);
    }
    assert!(!docs.iter().any(|d| d["url"].as_str().unwrap_or("").contains(READER_PASSWORD)));

    // Reset: the next sync is a full one again.
    let out = env.run(&config, &["state", "reset", "--connector", "docs-db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = sync_json(&env, &config, &[]);
    assert_eq!(r["full_sync"], true);
    assert_eq!(counts(&r), (0, 3150, 0, 0));
}

#[tokio::test]
async fn two_tenants_never_see_each_other() {
    let env = Env::new("e2e_tenants").await;
    env.documents_table("alpha", 50, 0).await;
    env.documents_table("bravo", 70, 0).await;
    env.sql("UPDATE alpha SET body = body || ' alphaonly'; UPDATE bravo SET body = body || ' bravoonly';")
        .await;
    let config = env.write_config(&format!(
        "{}\n{}",
        env.pg_connector("a-docs", "tenant-a", &["alpha"]),
        env.pg_connector("b-docs", "tenant-b", &["bravo"])
    ));
    let out = env.run(&config, &["sync", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json_lines(&out).len(), 2);

    let search = |tenant: &str, word: &str| {
        json_lines(&env.run(&config, &["search", word, "--tenant", tenant, "--json", "--limit", "100"])).len()
    };
    assert_eq!(search("tenant-a", "alphaonly"), 50);
    assert_eq!(search("tenant-a", "bravoonly"), 0);
    assert_eq!(search("tenant-b", "bravoonly"), 70);
    assert_eq!(search("tenant-b", "alphaonly"), 0);
    let exported = json_lines(&env.run(&config, &["export", "--tenant", "tenant-b"]));
    assert_eq!(exported.len(), 70);
    assert!(exported.iter().all(|d| d["tenant_id"] == "tenant-b" && d["connector_id"] == "b-docs"));
}

#[tokio::test]
async fn kill_9_mid_sync_then_resume_gives_exactly_the_table() {
    let env = Env::new("e2e_kill").await;
    const ROWS: i64 = 200_000;
    // Many rows share timestamps, so the cut is likely inside a run of equal timestamps.
    env.sql(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, title text NOT NULL, body text, updated_at timestamptz NOT NULL);
         INSERT INTO big SELECT g, 'Row ' || g, md5(g::text) || ' ' || repeat('x', g % 50),
                timestamptz '2024-01-01 00:00:00+00' + (g / 5000) * interval '1 minute'
         FROM generate_series(1, {ROWS}) g;
         GRANT SELECT ON big TO {READER};"
    ))
    .await;
    let config = env.write_config(&env.pg_connector("big-db", "t", &["big"]));
    let state_file = env.home().join("sync_state/big-db_t.json");

    let mut child =
        env.command(&config, &["sync"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill once a few checkpoints are durable but well before the end.
    let started = Instant::now();
    loop {
        let progressed = std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|s| s["full_sync"]["cursors"]["public.big"]["pk"].as_str().map(str::to_owned))
            .and_then(|pk| pk.parse::<i64>().ok())
            .is_some_and(|pk| pk >= 20_000);
        if progressed {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sync ended ({status}) before it could be killed");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = env.store().await;
    let tenant = TenantId::new("t").unwrap();
    let cid = ConnectorId::new("big-db").unwrap();
    let partial = store.count(&tenant, Some(&cid)).await.unwrap();
    assert!(partial > 0 && partial < ROWS as u64, "killed mid-sync: {partial} rows stored");

    let r = sync_json(&env, &config, &[]);
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["full_sync"], true, "the interrupted full sync resumes");
    let (synced, unchanged, deleted, failed) = counts(&r);
    assert_eq!((deleted, failed), (0, 0));
    assert!(synced < ROWS as u64, "resumed from a checkpoint, not from scratch: {r}");
    assert!(synced + unchanged <= ROWS as u64 - 20_000 + 5_000, "{r}");
    assert_eq!(synced + partial, ROWS as u64, "each row written once: {r}");

    // Exactly the table: every id once, with the table's content.
    assert_eq!(store.count(&tenant, Some(&cid)).await.unwrap(), ROWS as u64);
    let mut ids = Vec::with_capacity(ROWS as usize);
    let mut docs = store.export(&tenant, Some(&cid));
    while let Some(d) = docs.next().await {
        let d = d.unwrap();
        let n: i64 = d.document.id.strip_prefix("big:").unwrap().parse().unwrap();
        if n % 9973 == 0 {
            assert_eq!(d.document.title, format!("Row {n}"));
        }
        ids.push(n);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());
}

#[tokio::test]
async fn configuration_errors_exit_2_and_name_the_problem() {
    let env = Env::new("e2e_config").await;
    env.documents_table("documents", 5, 0).await;
    let good = env.pg_connector("docs-db", "workspace-1", &["documents"]);

    let config = env.write_config(&good.replace("tables =", "tabels ="));
    let out = env.run(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("connectors.toml") && msg.contains("connectors[0]") && msg.contains("tabels"),
        "{msg}"
    );

    let config = env.write_config(&good.replace("\"workspace-1\"", "\"../x\""));
    let out = env.run(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("tenant_id") && msg.contains("../x"), "{msg}");
    assert!(!env.home().join("sync_state").exists(), "nothing written for a bad config");

    let config = env.write_config(&format!("[stor]\nurl = \"x\"\n{good}"));
    let out = env.run(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("stor"), "{}", text(&out));

    let out = env.run(&env.dir.path().join("missing.toml"), &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("missing.toml"));

    let config = env.write_config(&good);
    let out = env.run(&config, &["sync", "--connector", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("docs-db"), "lists the configured ids: {}", text(&out));
}

#[tokio::test]
async fn connection_errors_exit_1_without_leaking_the_password() {
    let env = Env::new("e2e_auth").await;
    env.documents_table("documents", 20, 0).await;

    // Unreachable host: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = env.write_config(
        &env.pg_connector("docs-db", "workspace-1", &["documents"])
            .replace(&format!("port = {}", env.server.port()), &format!("port = {closed}")),
    );
    let out = env.run(&config, &["sync", "--max-retries", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("127.0.0.1:{closed}")), "names host and port: {}", text(&out));
    let out = env.run(&config, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // Wrong password.
    let config = env.write_config(&env.pg_connector("docs-db", "workspace-1", &["documents"]));
    let wrong = "wrong-Pw-55xq-should-not-print";
    let out = env
        .command(&config, &["sync"])
        .env("ARAGORA_POSTGRES_PASSWORD", wrong)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("authentication failed"), "{msg}");
    assert!(!msg.contains(wrong), "the password leaked: {msg}");
    let state = env.run(&config, &["status", "--json"]);
    assert_eq!(json_lines(&state)[0]["status"], "failed");
    assert!(!text(&state).contains(wrong));

    // A good sync at trace level prints no password either.
    let out = env.command(&config, &["sync", "--json"]).env("RUST_LOG", "trace").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.len() > 1000, "trace logging is on: {} bytes", msg.len());
    assert!(!msg.contains(READER_PASSWORD), "the password leaked at trace level");
    for file in walk(&env.home()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(READER_PASSWORD.len()).any(|w| w == READER_PASSWORD.as_bytes()),
            "password in {}",
            file.display()
        );
    }
}

#[tokio::test]
async fn postgres_store_and_state_for_shared_deployments() {
    let env = Env::new("e2e_pgstore").await;
    env.documents_table("documents", 300, 100).await;
    let store_db = env.server.create_database("e2e_store").await.unwrap();
    let url = env.server.url(&store_db);
    let config = env.write_config(&format!(
        "[store]\nurl = \"{url}\"\n[state]\nurl = \"{url}\"\n{}",
        env.pg_connector("docs-db", "workspace-1", &["documents"])
    ));
    let r = sync_json(&env, &config, &[]);
    assert_eq!(counts(&r), (300, 0, 0, 0));
    env.sql("UPDATE documents SET body = 'quasar nebula', updated_at = now() WHERE id = 7; DELETE FROM documents WHERE id = 8;").await;
    let r = sync_json(&env, &config, &[]);
    assert_eq!(counts(&r), (1, 0, 0, 0));
    let r = sync_json(&env, &config, &["--full"]);
    assert_eq!(counts(&r), (0, 299, 1, 0));
    let hits = json_lines(&env.run(&config, &["search", "quasar", "--tenant", "workspace-1", "--json"]));
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["id"], "documents:7");
    assert!(!env.home().join("sync_state").exists(), "state went to PostgreSQL");
    // The store URL carries a password: no output shows it, even at trace level.
    for args in
        [&["status"][..], &["sync", "--full"][..], &["search", "quasar", "--tenant", "workspace-1"][..]]
    {
        let out = env.command(&config, args).env("RUST_LOG", "trace").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(!text(&out).contains(PgServer::SUPERUSER_PASSWORD), "password leaked by {args:?}");
    }
    let bad = config.with_file_name("bad-store.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(PgServer::SUPERUSER_PASSWORD, "Wr0ng-store-pw-9931"),
    )
    .unwrap();
    let out = env.command(&bad, &["status"]).env("RUST_LOG", "trace").output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out).contains("authentication failed"), "{}", text(&out));
    assert!(!text(&out).contains("Wr0ng-store-pw-9931"), "password leaked: {}", text(&out));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}
