//! End to end: the `connectors` binary against a real PostgreSQL (started by the testkit,
//! or the one `cargo xtask test` announces), writing into the embedded store.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use connector_core::http::Url;
use connector_core::store::{KnowledgeStore, SqliteKnowledgeStore};
use connector_core::{ConnectorId, TenantId};
use connector_testkit::VaultFake;
use connector_testkit::postgres::PgServer;
use futures::StreamExt;
use oauth_fake::{ACCESS_TOKEN, CLIENT_ID, CLIENT_SECRET, CODE, REFRESH_TOKEN, TokenFake};
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

    // `connectors run`'s settings: the schedule (core's parser) and [server].
    for (bad, expected) in [
        (format!("{good}[connectors.schedule]\ninterval_minutes = 5\ncron = \"* * * * *\"\n"), "only one of"),
        (format!("{good}[connectors.schedule]\ninterval_hours = 1\ntimezone = \"Mars/Base\"\n"), "Mars/Base"),
        (format!("[server]\nlease_ttl_seconds = 0\n{good}"), "lease_ttl_seconds"),
        (format!("[server]\nmax_concurrent_syncs = 0\n{good}"), "max_concurrent_syncs"),
        (format!("[server]\nlease_ttl = 3\n{good}"), "lease_ttl"),
        (format!("[server]\nlisten = \"localhost\"\n{good}"), "server.listen"),
    ] {
        let config = env.write_config(&bad);
        let out = env.run(&config, &["run"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(expected), "{expected:?}: {}", text(&out));
    }
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

// ---------------------------------------------------------------------------------------------
// Credential providers in the configuration, and `connectors auth`.

/// A scratch folder with a configuration file, for tests that need no PostgreSQL.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { dir: tempfile::tempdir().unwrap() }
    }

    fn write_config(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("connectors.toml");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn command(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_connectors"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .env("ARAGORA_HOME", self.dir.path().join("home"))
            .stdin(Stdio::null());
        for var in [
            "ARAGORA_CONFIG",
            "RUST_LOG",
            "VAULT_ADDR",
            "VAULT_TOKEN",
            "ARAGORA_OAUTH_AUTH_URL",
            "ARAGORA_OAUTH_TOKEN_URL",
            "ARAGORA_QBO_CLIENT_ID",
            "ARAGORA_QBO_CLIENT_SECRET",
            "ARAGORA_QBO_REFRESH_TOKEN",
            "ARAGORA_QBO_ACCESS_TOKEN",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }
}

/// A Vault token that must never be printed (the fake accepts its own root token only).
const FAKE_VAULT_TOKEN: &str = "hvs.CLItest-vault-token-never-print-4412";

#[tokio::test]
async fn credentials_configuration_errors_exit_2_and_name_file_and_key() {
    let scratch = Scratch::new();
    let run = |body: &str| {
        let config = scratch.write_config(body);
        let out = scratch.command(&config, &["sync"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{body}\n{}", text(&out));
        let msg = text(&out);
        assert!(msg.contains("connectors.toml"), "names the file: {msg}");
        assert!(!msg.contains(FAKE_VAULT_TOKEN), "the Vault token leaked: {msg}");
        msg
    };

    // An unknown provider: the known ones are listed.
    let msg = run("[credentials]\nproviders = [\"env\", \"vaultt\"]\n");
    assert!(msg.contains("[credentials] providers") && msg.contains("\"vaultt\""), "{msg}");
    for known in ["\"env\"", "\"vault\"", "\"aws-secrets-manager\""] {
        assert!(msg.contains(known), "lists {known}: {msg}");
    }

    // A typo in the Vault table, next to a token: the key is named, the token is not shown.
    let msg = run(&format!(
        "[credentials]\nproviders = [\"vault\", \"env\"]\n[credentials.vault]\naddress = \
         \"http://127.0.0.1:8200\"\ntoken = \"{FAKE_VAULT_TOKEN}\"\ntokn = \"{FAKE_VAULT_TOKEN}\"\n"
    ));
    assert!(msg.contains("[credentials.vault]") && msg.contains("unknown field `tokn`"), "{msg}");

    // A TOML syntax error on the token's line: no source line is quoted.
    let msg = run(&format!(
        "[credentials]\nproviders = [\"vault\"]\n[credentials.vault]\ntoken = \"{FAKE_VAULT_TOKEN}\n"
    ));
    assert!(msg.contains("[credentials.vault] token") && msg.contains("line 4"), "{msg}");

    // A token of the wrong type is not echoed either.
    let msg = run("[credentials]\nproviders = [\"vault\"]\n[credentials.vault]\ntoken = 4412999\n");
    assert!(msg.contains("`token` must be a string") && !msg.contains("4412999"), "{msg}");

    // A provider table whose provider is not in the list.
    let msg = run(&format!(
        "[credentials]\nproviders = [\"env\"]\n[credentials.vault]\naddress = \"http://127.0.0.1:8200\"\n\
         token = \"{FAKE_VAULT_TOKEN}\"\n"
    ));
    assert!(
        msg.contains("[credentials.vault]") && msg.contains("\"vault\" is not in [credentials] providers"),
        "{msg}"
    );

    // Unknown keys of the section itself, and a wrong type.
    let msg = run("[credentials]\nproviders = [\"env\"]\ncache_ttl = 5\n");
    assert!(msg.contains("[credentials] cache_ttl") && msg.contains("unknown field `cache_ttl`"), "{msg}");
    let msg = run("[credentials]\nproviders = \"vault\"\n");
    assert!(msg.contains("[credentials] providers") && msg.contains("expected a sequence"), "{msg}");
}

/// Standard base64 (`url_safe`: the URL-safe alphabet without padding, as PKCE uses).
fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url_safe {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

mod oauth_fake {
    //! A vendor's OAuth2 token endpoint: checks the client, the code, the redirect URI and the
    //! PKCE verifier of an authorization-code grant, and answers with tokens.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use connector_core::http::Url;
    use serde_json::json;
    use sha2::{Digest, Sha256};

    pub const CLIENT_ID: &str = "client-e2e-7c1";
    pub const CLIENT_SECRET: &str = "clientsecret-never-print-9d2";
    pub const CODE: &str = "authcode-never-print-31f";
    pub const ACCESS_TOKEN: &str = "accesstoken-never-print-a81";
    pub const REFRESH_TOKEN: &str = "refreshtoken-never-print-b72";

    #[derive(Default)]
    pub struct Expect {
        pub redirect_uri: String,
        /// The S256 challenge of the authorization URL; `None`: no verifier may be sent.
        pub pkce_challenge: Option<String>,
        /// Every request: `Ok(())` when it was accepted, else why not.
        pub requests: Vec<Result<(), String>>,
    }

    pub struct TokenFake {
        pub token_url: String,
        pub expect: Arc<Mutex<Expect>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for TokenFake {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    impl TokenFake {
        pub async fn start() -> TokenFake {
            let expect = Arc::new(Mutex::new(Expect::default()));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let token_url = format!("http://{}/oauth2/token", listener.local_addr().unwrap());
            let app = Router::new().route("/oauth2/token", post(token)).with_state(expect.clone());
            let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            TokenFake { token_url, expect, server }
        }

        pub fn requests(&self) -> Vec<Result<(), String>> {
            self.expect.lock().unwrap().requests.clone()
        }
    }

    fn check(expect: &Expect, headers: &HeaderMap, form: &HashMap<String, String>) -> Result<(), String> {
        let basic =
            format!("Basic {}", super::base64(format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes(), false));
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(basic.as_str()) {
            return Err("client authentication (HTTP Basic) is wrong".into());
        }
        let field = |k: &str| form.get(k).map(String::as_str);
        if field("grant_type") != Some("authorization_code") {
            return Err(format!("grant_type is {:?}", field("grant_type")));
        }
        if field("code") != Some(CODE) {
            return Err("wrong code".into());
        }
        if field("redirect_uri") != Some(expect.redirect_uri.as_str()) {
            return Err(format!("redirect_uri is {:?}", field("redirect_uri")));
        }
        match (&expect.pkce_challenge, field("code_verifier")) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("a code_verifier without a challenge".into()),
            (Some(_), None) => Err("no code_verifier".into()),
            (Some(challenge), Some(verifier)) => {
                if super::base64(&Sha256::digest(verifier.as_bytes()), true) == *challenge {
                    Ok(())
                } else {
                    Err("the code_verifier does not match the challenge".into())
                }
            }
        }
    }

    async fn token(State(expect): State<Arc<Mutex<Expect>>>, headers: HeaderMap, body: String) -> Response {
        let form: HashMap<String, String> =
            Url::parse(&format!("http://x/?{body}")).unwrap().query_pairs().into_owned().collect();
        let mut expect = expect.lock().unwrap();
        let verdict = check(&expect, &headers, &form);
        expect.requests.push(verdict.clone());
        match verdict {
            Ok(()) => axum::Json(json!({
                "access_token": ACCESS_TOKEN,
                "token_type": "bearer",
                "expires_in": 3600,
                "refresh_token": REFRESH_TOKEN,
                "x_refresh_token_expires_in": 8_726_400,
            }))
            .into_response(),
            Err(why) => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "invalid_grant", "error_description": why})),
            )
                .into_response(),
        }
    }
}

/// The secrets of an auth run that no output may contain.
const AUTH_SECRETS: [&str; 4] = [CLIENT_SECRET, CODE, ACCESS_TOKEN, REFRESH_TOKEN];

/// A redirect URI on a free local port.
fn free_redirect_uri() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}/oauth/callback")
}

/// What one `connectors auth` run did.
struct AuthRun {
    code: Option<i32>,
    /// The authorization URL the command printed.
    url: Url,
    /// The answer to the browser's redirect.
    page_status: u16,
    page: String,
    stdout: String,
    stderr: String,
}

impl AuthRun {
    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` (a `connectors auth`), reads the authorization URL it prints, and plays the
/// browser coming back: GET `<redirect_uri>?<query>` with the query `redirect` makes from the URL.
async fn run_auth(cmd: Command, redirect_uri: &str, redirect: impl FnOnce(&Url) -> String) -> AuthRun {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        stderr_pipe.read_to_string(&mut s).await.unwrap();
        s
    });
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            printed.push_str(&line);
            if line.starts_with("http") {
                return Some(Url::parse(line.trim()).unwrap());
            }
        }
    })
    .await
    .expect("the authorization URL within 60 s");
    let Some(url) = url else {
        let status = child.wait().await.unwrap();
        panic!("no URL printed ({status}): {printed}{}", stderr_task.await.unwrap());
    };

    let query = redirect(&url);
    let client = connector_core::http::reqwest::Client::new();
    let response = client.get(format!("{redirect_uri}?{query}")).send().await.expect("the listener answers");
    let page_status = response.status().as_u16();
    let page = response.text().await.unwrap();

    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("exits").unwrap();
    stdout.read_to_string(&mut printed).await.unwrap();
    AuthRun {
        code: status.code(),
        url,
        page_status,
        page,
        stdout: printed,
        stderr: stderr_task.await.unwrap(),
    }
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn vault_config(vault: &VaultFake) -> String {
    format!(
        "[credentials]\nproviders = [\"vault\", \"env\"]\ncache_ttl_seconds = 30\n[credentials.vault]\n\
         address = \"{}\"\ntoken = \"{}\"\n",
        vault.address(),
        vault.root_token()
    )
}

/// `connectors auth VENDOR` with the client in the Vault fake and the token endpoint faked.
fn auth_command(
    scratch: &Scratch,
    config: &Path,
    vendor: &str,
    redirect_uri: &str,
    token: &TokenFake,
) -> Command {
    let mut cmd =
        scratch.command(config, &["auth", vendor, "--redirect-uri", redirect_uri, "--timeout", "60"]);
    cmd.env("ARAGORA_OAUTH_AUTH_URL", "https://vendor.example/authorize")
        .env("ARAGORA_OAUTH_TOKEN_URL", &token.token_url)
        .env("RUST_LOG", "trace");
    cmd
}

async fn vault_with_client(prefix: &str) -> VaultFake {
    let vault = VaultFake::start().await.unwrap();
    vault.put(&format!("aragora/{prefix}_client_id"), serde_json::json!({ "value": CLIENT_ID }));
    vault.put(&format!("aragora/{prefix}_client_secret"), serde_json::json!({ "value": CLIENT_SECRET }));
    vault
}

fn stored(vault: &VaultFake, key: &str) -> Option<String> {
    vault.get(&format!("aragora/{key}")).map(|v| v["value"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_quickbooks_stores_the_tokens_in_vault() {
    let scratch = Scratch::new();
    let vault = vault_with_client("qbo").await;
    let token = TokenFake::start().await;
    let redirect_uri = free_redirect_uri();
    token.expect.lock().unwrap().redirect_uri = redirect_uri.clone();
    let config = scratch.write_config(&vault_config(&vault));

    let cmd = auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token);
    let run = run_auth(cmd, &redirect_uri, |url| {
        let state = param(url, "state").expect("a state");
        format!("code={CODE}&state={state}&realmId=9130350000000001")
    })
    .await;
    let output = run.output();
    assert_eq!(run.code, Some(0), "{output}");
    assert_eq!(token.requests(), vec![Ok(())], "one exchange, accepted: {output}");

    // The URL the user opens.
    assert!(run.url.as_str().starts_with("https://vendor.example/authorize?"), "{}", run.url);
    assert_eq!(param(&run.url, "client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(param(&run.url, "redirect_uri").as_deref(), Some(redirect_uri.as_str()));
    assert_eq!(param(&run.url, "response_type").as_deref(), Some("code"));
    assert_eq!(param(&run.url, "scope").as_deref(), Some("com.intuit.quickbooks.accounting"));
    assert_eq!(param(&run.url, "code_challenge"), None, "Intuit does not take PKCE");

    // The browser's page, the tokens in Vault, and where the command says they went.
    assert_eq!(run.page_status, 200);
    assert!(run.page.contains("close this tab"), "{}", run.page);
    assert_eq!(stored(&vault, "qbo_refresh_token").as_deref(), Some(REFRESH_TOKEN));
    assert_eq!(stored(&vault, "qbo_access_token").as_deref(), Some(ACCESS_TOKEN));
    let expires = stored(&vault, "qbo_token_expires_at").expect("the expiry");
    let expires = chrono::DateTime::parse_from_rfc3339(&expires).expect("RFC 3339");
    let left = expires.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(left > chrono::TimeDelta::minutes(55) && left <= chrono::TimeDelta::minutes(60), "{left}");
    for key in ["qbo_refresh_token", "qbo_access_token", "qbo_token_expires_at"] {
        let place =
            format!("{key}: field `value` of Vault secret secret/data/aragora/{key} at {}", vault.address());
        assert!(run.stdout.contains(&place), "names where {key} went: {}", run.stdout);
    }
    assert!(run.stdout.contains("9130350000000001"), "prints the realmId: {}", run.stdout);

    // No secret anywhere, even at trace level.
    assert!(output.len() > 1000, "trace logging is on: {output}");
    for secret in AUTH_SECRETS.iter().chain([&vault.root_token()]) {
        assert!(!output.contains(secret), "{secret} leaked: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_xero_sends_the_pkce_verifier_and_the_requested_scopes() {
    let scratch = Scratch::new();
    let vault = vault_with_client("xero").await;
    let token = TokenFake::start().await;
    let redirect_uri = free_redirect_uri();
    token.expect.lock().unwrap().redirect_uri = redirect_uri.clone();
    let config = scratch.write_config(&vault_config(&vault));

    let mut cmd = auth_command(&scratch, &config, "xero", &redirect_uri, &token);
    cmd.args(["--scopes", "offline_access accounting.contacts", "--scopes", "accounting.settings"]);
    let expect = token.expect.clone();
    let run = run_auth(cmd, &redirect_uri, |url| {
        assert_eq!(param(url, "code_challenge_method").as_deref(), Some("S256"));
        expect.lock().unwrap().pkce_challenge = Some(param(url, "code_challenge").expect("a PKCE challenge"));
        format!("code={CODE}&state={}", param(url, "state").unwrap())
    })
    .await;
    let output = run.output();
    assert_eq!(run.code, Some(0), "{output}");
    assert_eq!(token.requests(), vec![Ok(())], "the verifier matches the challenge: {output}");
    assert_eq!(
        param(&run.url, "scope").as_deref(),
        Some("offline_access accounting.contacts accounting.settings")
    );
    assert_eq!(stored(&vault, "xero_refresh_token").as_deref(), Some(REFRESH_TOKEN));
    for secret in AUTH_SECRETS.iter().chain([&vault.root_token()]) {
        assert!(!output.contains(secret), "{secret} leaked: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rejects_a_forged_state_and_a_denied_consent_storing_nothing() {
    let scratch = Scratch::new();
    let vault = vault_with_client("qbo").await;
    let token = TokenFake::start().await;
    let config = scratch.write_config(&vault_config(&vault));

    // A redirect whose state is not the one sent.
    let redirect_uri = free_redirect_uri();
    token.expect.lock().unwrap().redirect_uri = redirect_uri.clone();
    let cmd = auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token);
    let run = run_auth(cmd, &redirect_uri, |_| format!("code={CODE}&state=forged-state-0000")).await;
    let output = run.output();
    assert_eq!(run.code, Some(1), "{output}");
    assert_eq!(run.page_status, 400);
    assert!(run.page.contains("nothing was stored"), "{}", run.page);
    assert!(run.stderr.contains("`state` does not match"), "{output}");
    assert!(token.requests().is_empty(), "no code exchange: {:?}", token.requests());

    // The user declines at the vendor.
    let redirect_uri = free_redirect_uri();
    let cmd = auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token);
    let run = run_auth(cmd, &redirect_uri, |url| {
        format!("error=access_denied&error_description=User+denied&state={}", param(url, "state").unwrap())
    })
    .await;
    let output = run.output();
    assert_eq!(run.code, Some(1), "{output}");
    assert_eq!(run.page_status, 400);
    assert!(run.stderr.contains("access_denied") && run.stderr.contains("declined"), "{output}");
    assert!(token.requests().is_empty());

    // A code the vendor does not accept.
    let redirect_uri = free_redirect_uri();
    token.expect.lock().unwrap().redirect_uri = redirect_uri.clone();
    let cmd = auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token);
    let run = run_auth(cmd, &redirect_uri, |url| {
        format!("code=expired-code-never-print-77&state={}", param(url, "state").unwrap())
    })
    .await;
    let output = run.output();
    assert_eq!(run.code, Some(1), "{output}");
    assert_eq!(run.page_status, 502);
    assert!(run.stderr.contains("authorization code was rejected (invalid_grant"), "{output}");
    assert!(!output.contains("expired-code-never-print-77") && !output.contains(CLIENT_SECRET), "{output}");
    assert_eq!(token.requests(), vec![Err("wrong code".to_owned())]);

    for key in ["qbo_refresh_token", "qbo_access_token", "qbo_token_expires_at"] {
        assert_eq!(stored(&vault, key), None, "{key} was stored");
    }
    assert!(!vault.requests().iter().any(|r| r.method != "GET"), "nothing written to Vault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_environment_credentials_refuses_unless_told_to_print() {
    let scratch = Scratch::new();
    let token = TokenFake::start().await;
    let config = scratch.write_config("[credentials]\nproviders = [\"env\"]\n");
    let redirect_uri = free_redirect_uri();
    token.expect.lock().unwrap().redirect_uri = redirect_uri.clone();
    let with_client = |mut cmd: Command| {
        cmd.env("ARAGORA_QBO_CLIENT_ID", CLIENT_ID).env("ARAGORA_QBO_CLIENT_SECRET", CLIENT_SECRET);
        cmd
    };

    let out =
        with_client(auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token)).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("cannot store") && msg.contains("vault") && msg.contains("--print-tokens"), "{msg}");
    assert!(!msg.contains("https://vendor.example"), "no flow started: {msg}");

    let mut cmd = with_client(auth_command(&scratch, &config, "quickbooks", &redirect_uri, &token));
    cmd.arg("--print-tokens");
    let run =
        run_auth(cmd, &redirect_uri, |url| format!("code={CODE}&state={}", param(url, "state").unwrap()))
            .await;
    assert_eq!(run.code, Some(0), "{}", run.output());
    assert!(
        run.stdout.contains(&format!("export ARAGORA_QBO_REFRESH_TOKEN='{REFRESH_TOKEN}'")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("export ARAGORA_QBO_ACCESS_TOKEN='{ACCESS_TOKEN}'")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("export ARAGORA_QBO_TOKEN_EXPIRES_AT="), "{}", run.stdout);
    assert!(!run.stderr.contains(REFRESH_TOKEN) && !run.output().contains(CLIENT_SECRET), "{}", run.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_the_postgres_password_from_vault_prints_no_secret_at_trace_level() {
    let env = Env::new("e2e_vault").await;
    env.documents_table("documents", 40, 0).await;
    let vault = VaultFake::start().await.unwrap();
    vault.put("aragora/postgres_user", serde_json::json!({ "value": READER }));
    vault.put("aragora/postgres_password", serde_json::json!({ "value": READER_PASSWORD }));
    let connector = env.pg_connector("docs-db", "workspace-1", &["documents"]);
    let config = env.write_config(&format!(
        "[credentials]\nproviders = [\"vault\"]\n[credentials.vault]\naddress = \"{}\"\ntoken = \"{}\"\n\n{connector}",
        vault.address(),
        vault.root_token()
    ));
    let run = |config: &Path, args: &[&str]| {
        let mut cmd = env.command(config, args);
        // Only Vault holds the login.
        cmd.env_remove("ARAGORA_POSTGRES_USER")
            .env_remove("ARAGORA_POSTGRES_PASSWORD")
            .env("RUST_LOG", "trace");
        tokio::process::Command::from(cmd).output()
    };

    let out = run(&config, &["sync", "--json"]).await.unwrap();
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert_eq!(counts(&json_lines(&out)[0]), (40, 0, 0, 0));
    assert!(msg.len() > 1000, "trace logging is on: {} bytes", msg.len());
    assert!(
        vault.requests().iter().any(|r| r.path == "/v1/secret/data/aragora/postgres_password"),
        "the password came from Vault: {:?}",
        vault.requests()
    );
    for secret in [READER_PASSWORD, vault.root_token()] {
        assert!(!msg.contains(secret), "{secret} leaked at trace level");
        for file in walk(&env.home()) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {}",
                file.display()
            );
        }
    }

    // A token Vault refuses: the sync fails naming Vault, not the token.
    let bad = env.write_config(
        &std::fs::read_to_string(&config).unwrap().replace(vault.root_token(), FAKE_VAULT_TOKEN),
    );
    let out = run(&bad, &["sync", "--full"]).await.unwrap();
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("Vault") && msg.contains("denied"), "{msg}");
    assert!(!msg.contains(FAKE_VAULT_TOKEN) && !msg.contains(READER_PASSWORD), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// `connectors run`: the service (scheduler, webhooks, LISTEN/NOTIFY, leases).

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `connectors run` process, its stderr in a file; killed if the test ends early.
struct Service {
    child: std::process::Child,
    log: PathBuf,
    port: u16,
}

impl Service {
    fn start(env: &Env, config: &Path, name: &str, port: u16) -> Service {
        let log = env.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = env
            .command(config, &["run"])
            .env("RUST_LOG", std::env::var("E2E_RUN_LOG").unwrap_or_else(|_| "warn,connectors=info".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting connectors run");
        Service { child, log, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(signal).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its code (None: killed by a signal).
    async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit within {limit:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` on the service's server: (status, body).
    fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }

    async fn wait_listening(&self) {
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not listening on {}; log:\n{}", self.port, self.log());
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` every 10 ms for up to `limit`; how long it took.
async fn within(limit: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if condition().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_notify_changes_within_2_seconds_health_metrics_and_sigterm() {
    use connector_core::reexports::sqlx;
    let env = Env::new("e2e_run_notify").await;
    env.documents_table("documents", 50, 0).await;
    env.sql(connector_testkit::postgres::GUIDE_NOTIFY_TRIGGER).await;
    let port = free_port();
    let config = env.write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{}notify_channel = \"document_changes\"\n\
         [connectors.schedule]\ninterval_hours = 1\n",
        env.pg_connector("docs-db", "workspace-1", &["documents"])
    ));
    let mut service = Service::start(&env, &config, "run", port);
    service.wait_listening().await;

    // The first run happens at start (never synced): a full sync of the 50 rows.
    let db = env.home().join("knowledge.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db).read_only(true);
    let mut pool = None;
    within(Duration::from_secs(30), "the store file", async || {
        if pool.is_none() && db.exists() {
            pool = sqlx::sqlite::SqlitePool::connect_with(options.clone()).await.ok();
        }
        pool.is_some()
    })
    .await;
    let pool = pool.unwrap();
    let content = async |id: &str| -> Option<String> {
        sqlx::query_scalar::<_, String>(
            "SELECT content FROM documents WHERE tenant_id = 'workspace-1' AND connector_id = 'docs-db' AND id = ?",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
    };
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM documents WHERE connector_id = 'docs-db'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    within(Duration::from_secs(30), "the first full sync", async || count().await == 50).await;
    // Let the listener settle (it starts with the service, beside the first sync).
    tokio::time::sleep(Duration::from_millis(300)).await;

    env.sql("INSERT INTO documents (title, body) VALUES ('Fresh', 'pulsar inserted');").await;
    let insert = within(Duration::from_secs(2), "the INSERT", async || {
        content("documents:51").await.is_some_and(|c| c.contains("pulsar"))
    })
    .await;
    env.sql("UPDATE documents SET body = 'quasar nebula' WHERE id = 7;").await;
    let update = within(Duration::from_secs(2), "the UPDATE", async || {
        content("documents:7").await.is_some_and(|c| c.contains("quasar"))
    })
    .await;
    env.sql("DELETE FROM documents WHERE id = 8;").await;
    let delete =
        within(Duration::from_secs(2), "the DELETE", async || content("documents:8").await.is_none()).await;
    eprintln!("NOTIFY to store: insert {insert:?}, update {update:?}, delete {delete:?}");
    assert_eq!(count().await, 50);

    // Health and metrics.
    let (status, body) = service.get("/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = service.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("connectors_syncs_total{") && l.contains("connector_id=\"docs-db\"")),
        "{body}"
    );
    // No webhook secret is configured: the sources are not served.
    let (status, _) = service.get("/api/webhooks/github");
    assert!(status == 404 || status == 405, "{status}");

    pool.close().await;
    let started = Instant::now();
    service.signal("-TERM");
    assert_eq!(service.wait(Duration::from_secs(10)).await, Some(0), "log:\n{}", service.log());
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    let log = service.log();
    assert!(log.contains("reason=\"items\"") || log.contains("reason=items"), "{log}");
    assert!(!log.contains(READER_PASSWORD));
}

/// Each connector's runs, from the state history in PostgreSQL: (started, finished) in
/// seconds since the Unix epoch, oldest first.
async fn runs_by_connector(client: &impl RunsQuery) -> std::collections::BTreeMap<String, Vec<(f64, f64)>> {
    let mut out = std::collections::BTreeMap::new();
    for (connector, state) in client.states().await {
        let state: Value = serde_json::from_str(&state).unwrap();
        let secs = |v: &Value| {
            connector_core::reexports::chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
                .unwrap()
                .timestamp_micros() as f64
                / 1e6
        };
        let mut runs: Vec<(f64, f64)> = state["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (secs(&r["started_at"]), secs(&r["finished_at"])))
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.insert(connector, runs);
    }
    out
}

trait RunsQuery {
    async fn states(&self) -> Vec<(String, String)>;
}

struct StateDb {
    server: &'static PgServer,
    db: String,
}

impl RunsQuery for StateDb {
    async fn states(&self) -> Vec<(String, String)> {
        let client = self.server.client(&self.db).await.unwrap();
        let rows = client.query("SELECT connector_id, state FROM connector_sync_state", &[]).await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn run_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains("connectors::run") && l.contains("outcome=")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_run_processes_share_20_connectors_through_leases_and_survive_kill_9() {
    let env = Env::new("e2e_run_leases").await;
    env.documents_table("documents", 5, 0).await;
    let store_db = env.server.create_database("e2e_run_store").await.unwrap();
    let url = env.server.url(&store_db);
    let mut connectors = String::new();
    for i in 0..20 {
        connectors.push_str(&env.pg_connector(&format!("c{i:02}"), "workspace-1", &["documents"]));
        connectors.push_str("[connectors.schedule]\ninterval_seconds = 2\n");
    }
    let interval = 2.0;
    let (port_a, port_b) = (free_port(), free_port());
    let config = |port: u16| {
        format!(
            "[store]\nurl = \"{url}\"\n[state]\nurl = \"{url}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
             lease_ttl_seconds = 3\n{connectors}"
        )
    };
    let config_a = env.write_config(&config(port_a));
    let config_b = config_a.with_file_name("b.toml");
    std::fs::write(&config_b, config(port_b)).unwrap();
    let mut a = Service::start(&env, &config_a, "a", port_a);
    let mut b = Service::start(&env, &config_b, "b", port_b);
    a.wait_listening().await;
    b.wait_listening().await;
    let started = now_secs();
    tokio::time::sleep(Duration::from_secs(10)).await;

    let db = StateDb { server: env.server, db: store_db.clone() };
    let runs = runs_by_connector(&db).await;
    assert_eq!(runs.len(), 20, "every connector ran: {:?}", runs.keys().collect::<Vec<_>>());
    let mut total = 0;
    let mut min_gap = f64::MAX;
    for (connector, runs) in &runs {
        assert!(runs.len() >= 3, "{connector}: only {} runs in ~10 s: {runs:?}", runs.len());
        let span = now_secs() - started + 2.0;
        assert!(
            runs.len() as f64 <= span / interval + 1.0,
            "{connector}: {} runs in {span:.1} s: some ran twice: {runs:?}",
            runs.len()
        );
        total += runs.len();
        for (i, pair) in runs.windows(2).enumerate() {
            let ((s0, f0), (s1, _)) = (pair[0], pair[1]);
            assert!(s1 >= f0, "{connector}: runs overlap: {runs:?}");
            // Fixed rate: a run that starts late (the first full syncs of 20 connectors, 4 at a
            // time; a busy machine) is followed by one on time, so two runs can be closer than
            // the interval. A slot run by both processes would start when the first run ends
            // (or overlap it): far closer than half an interval. The first gap is skipped.
            if i == 0 {
                continue;
            }
            min_gap = min_gap.min(s1 - s0);
            assert!(
                s1 - s0 >= interval * 0.5,
                "{connector}: runs {:.3} s apart: {runs:?}\na:\n{}\nb:\n{}",
                s1 - s0,
                a.log(),
                b.log()
            );
        }
    }
    let (log_a, log_b) = (a.log(), b.log());
    let (ran_a, ran_b) = (run_lines(&log_a), run_lines(&log_b));
    eprintln!(
        "runs over ~{:.1} s: {total} (a: {ran_a}, b: {ran_b}); smallest gap between runs of a connector: {min_gap:.3} s",
        now_secs() - started
    );
    assert!(ran_a > 0 && ran_b > 0, "both processes worked: a {ran_a}, b {ran_b}\na:\n{log_a}\nb:\n{log_b}");
    // The logs and the history agree, but for runs finishing between the two reads.
    assert!((ran_a + ran_b).abs_diff(total) <= 4, "logged {} runs, history {total}", ran_a + ran_b);

    // kill -9 a: its leases expire after the TTL, and b runs everything.
    a.signal("-KILL");
    assert_eq!(a.wait(Duration::from_secs(5)).await, None);
    let killed = now_secs();
    let limit = Duration::from_secs_f64(3.0 + 2.0 * interval + 1.0);
    let took = within(limit, "every connector running again after the kill", async || {
        runs_by_connector(&db).await.values().all(|runs| runs.iter().any(|(s, _)| *s > killed))
    })
    .await;
    eprintln!("after kill -9: every connector ran again within {took:?} (TTL 3 s, interval 2 s)");
    let runs = runs_by_connector(&db).await;
    for (connector, runs) in &runs {
        for pair in runs.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "{connector}: runs overlap: {runs:?}");
        }
    }
    b.signal("-TERM");
    assert_eq!(b.wait(Duration::from_secs(10)).await, Some(0), "log:\n{}", b.log());
}
