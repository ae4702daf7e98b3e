//! Integration tests against a real PostgreSQL server (see `common`): what a user would notice
//! about reading tables, cursors, errors and connection use.

mod common;
mod tls;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use connector_core::reexports::tokio_util::sync::CancellationToken;
use connector_core::store::SqliteKnowledgeStore;
use connector_core::{
    Batch, Change, ChangeHint, Connector, Cursors, Document, ErrorKind, ItemRef, KnowledgeStore,
    MemoryStateStore, ReadMode, ReadRequest, StateStore, StaticCredentialProvider, StoredDocument,
    SyncEngine, SyncOptions,
};
use connector_postgres::{PostgresConfig, PostgresConnector};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

fn request(mode: ReadMode, cursors: Cursors, batch_size: usize) -> ReadRequest {
    ReadRequest { mode, cursors, batch_size, batch_bytes: 64 << 20 }
}

async fn read_all(c: &PostgresConnector, req: ReadRequest) -> connector_core::Result<Vec<Batch>> {
    let mut out = Vec::new();
    let mut stream = c.read(req);
    while let Some(batch) = stream.next().await {
        out.push(batch?);
    }
    Ok(out)
}

fn docs(batches: &[Batch]) -> Vec<&Document> {
    batches
        .iter()
        .flat_map(|b| &b.changes)
        .map(|c| match c {
            Change::Upsert(d) => d,
            Change::Delete { .. } => panic!("unexpected delete"),
        })
        .collect()
}

/// Applies the checkpoints of `batches` as the engine would.
fn advance(cursors: &mut Cursors, batches: &[Batch]) {
    for b in batches {
        if let Some(cp) = &b.checkpoint {
            cursors.insert(cp.stream.clone(), cp.cursor.clone());
        }
    }
}

#[tokio::test]
async fn documents_carry_typed_columns() {
    let server = common::server().await;
    server
        .database(
            "types",
            r#"
        CREATE TYPE mood AS ENUM ('ok', 'sad');
        CREATE DOMAIN short_text AS varchar(20);
        CREATE TABLE documents (
            id bigint PRIMARY KEY,
            title text,
            body text,
            author text,
            price numeric(30, 10),
            ratio real,
            score double precision,
            active boolean,
            small smallint,
            tags text[],
            grid integer[][],
            amounts numeric[],
            data jsonb,
            raw json,
            blob bytea,
            uid uuid,
            day date,
            span interval,
            feeling mood,
            label short_text,
            naive timestamp,
            created_at timestamptz,
            updated_at timestamptz NOT NULL
        );
        INSERT INTO documents VALUES (
            1, 'Hello', 'First line' || chr(10) || 'second', 'ann',
            12345678901234567890.0123456789, 0.1, 2.5, true, -3,
            ARRAY['a', NULL, 'c'], '{{1,2},{3,4}}', '{1.50, 2}',
            '{"k": [1, "x"]}', '{"n": 1e400}', '\x68656c6c6f', '550e8400-e29b-41d4-a716-446655440000',
            '2024-02-29', '1 day 02:00:00', 'sad', 'short', '2024-01-01 10:00:00',
            '2023-12-31 23:00:00-02', '2024-05-01 12:00:00.5+00'
        );
        INSERT INTO documents (id, updated_at) VALUES (2, '2024-05-02 00:00:00+00');
        "#,
        )
        .await;
    let c = PostgresConnector::new(server.config("types", &["documents"]), &common::ctx()).unwrap();
    c.check().await.unwrap();
    let batches = read_all(&c, request(ReadMode::Full, Cursors::new(), 100)).await.unwrap();
    let all = docs(&batches);
    assert_eq!(all.len(), 2);
    let d = all[0];
    assert_eq!(d.id, "documents:1");
    assert_eq!(d.kind, "row");
    assert_eq!(d.title, "Hello");
    assert_eq!(d.author.as_deref(), Some("ann"));
    assert_eq!(
        d.url.as_deref(),
        Some(format!("postgres://127.0.0.1:{}/pgconn_types/public.documents#1", server.port()).as_str())
    );
    assert_eq!(d.created_at.unwrap().to_rfc3339(), "2024-01-01T01:00:00+00:00");
    assert_eq!(d.updated_at.unwrap().to_rfc3339(), "2024-05-01T12:00:00.500+00:00");
    assert!(
        d.content.starts_with(
            "title: Hello\nbody: First line\nsecond\nauthor: ann\nprice: 12345678901234567890.0123456789\n"
        ),
        "{}",
        d.content
    );
    assert!(!d.content.contains("blob"), "bytea is not content by default: {}", d.content);
    let m = &d.metadata;
    let expected = json!({
        "id": 1,
        "price": "12345678901234567890.0123456789",
        "ratio": 0.1, "score": 2.5, "active": true, "small": -3,
        "tags": ["a", null, "c"], "grid": [[1, 2], [3, 4]], "amounts": ["1.50", "2"],
        "data": {"k": [1, "x"]}, "raw": "{\"n\": 1e400}",
        "blob": "aGVsbG8=", "uid": "550e8400-e29b-41d4-a716-446655440000",
        "day": "2024-02-29", "span": "1 day 02:00:00", "feeling": "sad",
        "naive": "2024-01-01T10:00:00Z",
        "created_at": "2024-01-01T01:00:00Z", "updated_at": "2024-05-01T12:00:00.500Z",
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&m[k], v, "metadata[{k}]");
    }
    for text_content in ["title", "body", "author", "label"] {
        assert!(
            m.get(text_content).is_none(),
            "text content column {text_content} is not repeated in metadata"
        );
    }
    assert_eq!(m.as_object().unwrap().len(), 19, "every other column is in metadata");

    // A row of NULLs: title falls back to "{table} {pk}", content is empty.
    let d = all[1];
    assert_eq!(d.title, "documents 2");
    assert_eq!(d.content, "");
    assert_eq!(d.metadata["tags"], json!(null));
    assert_eq!(d.metadata["amounts"], json!(null));
    assert_eq!(d.created_at, None);
}

#[tokio::test]
async fn shared_timestamps_are_neither_skipped_nor_repeated() {
    let server = common::server().await;
    let admin = server
        .database(
            "keyset",
            "CREATE TABLE items (id int PRIMARY KEY, body text, updated_at timestamptz NOT NULL);
             INSERT INTO items SELECT g, 'item ' || g, '2024-01-01 00:00:00+00' FROM generate_series(1, 2500) g;",
        )
        .await;
    let c = PostgresConnector::new(server.config("keyset", &["items"]), &common::ctx()).unwrap();

    // Read one batch, stop, resume from its checkpoint: the engine's crash-and-resume.
    let mut stream = c.read(request(ReadMode::Full, Cursors::new(), 1000));
    let first = stream.next().await.unwrap().unwrap();
    drop(stream);
    assert_eq!(first.changes.len(), 1000);
    let cp = first.checkpoint.clone().unwrap();
    assert_eq!(cp.stream, "public.items");
    assert_eq!(cp.cursor, json!({"ts": "2024-01-01 00:00:00+00", "pk": "1000"}));
    let mut cursors = Cursors::new();
    advance(&mut cursors, std::slice::from_ref(&first));
    let rest = read_all(&c, request(ReadMode::Full, cursors.clone(), 1000)).await.unwrap();
    assert_eq!(rest.iter().map(|b| b.changes.len()).collect::<Vec<_>>(), [1000, 500]);
    let mut ids: Vec<&str> = docs(std::slice::from_ref(&first)).iter().map(|d| d.id.as_str()).collect();
    ids.extend(docs(&rest).iter().map(|d| d.id.as_str()));
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!((ids.len(), unique.len()), (2500, 2500));
    advance(&mut cursors, &rest);
    assert_eq!(cursors["public.items"], json!({"ts": "2024-01-01 00:00:00+00", "pk": "2500"}));

    // Nothing changed: nothing read, cursor unchanged.
    assert!(read_all(&c, request(ReadMode::Incremental, cursors.clone(), 1000)).await.unwrap().is_empty());

    // Changes (same new timestamp for several rows, and an insert) are read once each.
    admin
        .batch_execute(
            "UPDATE items SET body = 'changed', updated_at = '2024-01-02 00:00:00.25+00' WHERE id IN (7, 1500, 2);
             INSERT INTO items VALUES (2501, 'new', '2024-01-02 00:00:00.25+00');",
        )
        .await
        .unwrap();
    let changed = read_all(&c, request(ReadMode::Incremental, cursors.clone(), 1000)).await.unwrap();
    let ids: Vec<&str> = docs(&changed).iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["items:2", "items:7", "items:1500", "items:2501"]);
    advance(&mut cursors, &changed);
    assert_eq!(cursors["public.items"], json!({"ts": "2024-01-02 00:00:00.25+00", "pk": "2501"}));
}

#[tokio::test]
async fn any_key_type_and_nullable_timestamps_resume_exactly() {
    let server = common::server().await;
    server
        .database(
            "keys",
            r#"
        CREATE TABLE by_uuid (id uuid PRIMARY KEY, name text, updated_at timestamp);
        INSERT INTO by_uuid SELECT md5(g::text)::uuid, 'u' || g,
            CASE WHEN g % 3 = 0 THEN NULL ELSE '2024-01-01'::timestamp + (g % 5) * interval '1 second' END
        FROM generate_series(1, 200) g;
        CREATE TABLE by_text (code text COLLATE "C" PRIMARY KEY, name text, changed date NOT NULL);
        INSERT INTO by_text SELECT 'K' || g, 't' || g, '2024-01-01'::date + (g % 4) FROM generate_series(1, 150) g;
        CREATE TABLE by_numeric (id numeric PRIMARY KEY, v text, version bigint NOT NULL);
        INSERT INTO by_numeric SELECT g / 10.0, 'n', g % 7 FROM generate_series(1, 120) g;
        "#,
        )
        .await;
    for (table, ts, pk, total) in [
        ("by_uuid", "updated_at", "id", 200),
        ("by_text", "changed", "code", 150),
        ("by_numeric", "version", "id", 120),
    ] {
        let cfg = PostgresConfig {
            timestamp_column: ts.into(),
            primary_key_column: pk.into(),
            ..server.config("keys", &[table])
        };
        let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
        c.check().await.unwrap();
        // Resume after every batch of 7: each resume must continue exactly.
        let mut cursors = Cursors::new();
        let mut seen = Vec::new();
        loop {
            let mut stream = c.read(request(ReadMode::Incremental, cursors.clone(), 7));
            let Some(batch) = stream.next().await else { break };
            let batch = batch.unwrap();
            seen.extend(docs(std::slice::from_ref(&batch)).iter().map(|d| d.id.clone()));
            advance(&mut cursors, std::slice::from_ref(&batch));
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!((seen.len(), unique.len()), (total, total), "{table}");
    }
}

#[tokio::test]
async fn hostile_names_are_quoted() {
    let server = common::server().await;
    let admin = server
        .database(
            "names",
            r#"
        CREATE SCHEMA "Odd ""Schema""";
        CREATE TABLE x (id int);
        CREATE TABLE "Odd ""Schema"""."we""ird; DROP TABLE x" (
            "I d" int PRIMARY KEY, "bo""dy" text, "up; --" timestamptz NOT NULL
        );
        INSERT INTO "Odd ""Schema"""."we""ird; DROP TABLE x" VALUES (1, 'safe', now());
        "#,
        )
        .await;
    let cfg = PostgresConfig {
        schema: "Odd \"Schema\"".into(),
        timestamp_column: "up; --".into(),
        primary_key_column: "I d".into(),
        ..server.config("names", &["we\"ird; DROP TABLE x"])
    };
    let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
    c.check().await.unwrap();
    let batches = read_all(&c, request(ReadMode::Full, Cursors::new(), 10)).await.unwrap();
    let d = docs(&batches)[0];
    assert_eq!(d.id, "Odd \"Schema\".we\"ird; DROP TABLE x:1");
    assert_eq!(d.content, "safe");
    assert_eq!(batches[0].checkpoint.as_ref().unwrap().stream, "Odd \"Schema\".we\"ird; DROP TABLE x");
    admin.query_one("SELECT count(*) FROM x", &[]).await.expect("table x still exists");
}

#[tokio::test]
async fn check_names_what_is_wrong() {
    let server = common::server().await;
    let admin = server
        .database(
            "checks",
            r#"CREATE TABLE "Docs" (id int PRIMARY KEY, body text, updated_at timestamptz);
               CREATE TABLE faq (id int PRIMARY KEY, question text);
               CREATE TABLE secret (id int PRIMARY KEY, updated_at timestamptz);"#,
        )
        .await;
    let c = PostgresConnector::new(server.config("checks", &["docs", "faq"]), &common::ctx()).unwrap();
    let err = c.check().await.unwrap_err();
    let text = err.to_string();
    eprintln!("check: {text}");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{text}");
    assert!(text.starts_with("2 problems: "), "{text}");
    assert!(text.contains("table public.docs not found") && text.contains("found public.Docs"), "{text}");
    assert!(text.contains("table public.faq: timestamp_column \"updated_at\" is not a column"), "{text}");

    // Reading reports the same problems as errors of the table's stream.
    let err = read_all(&c, request(ReadMode::Full, Cursors::new(), 10)).await.unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::NotFound | ErrorKind::Config), "{err}");

    let cfg =
        PostgresConfig { content_columns: vec!["summary".into()], ..server.config("checks", &["Docs"]) };
    let err = PostgresConnector::new(cfg, &common::ctx()).unwrap().check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("content_columns[0] \"summary\""), "{err}");

    let c = PostgresConnector::new(server.config("no_such_db", &["docs"]), &common::ctx()).unwrap();
    let err = c.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("database \"pgconn_no_such_db\" does not exist"), "{err}");

    let cfg = PostgresConfig { schema: "nope".into(), ..server.config("checks", &["faq"]) };
    let err = PostgresConnector::new(cfg, &common::ctx()).unwrap().check().await.unwrap_err();
    assert!(err.to_string().contains("schema \"nope\" does not exist"), "{err}");

    // A role without SELECT.
    admin
        .batch_execute("DROP ROLE IF EXISTS nosel; CREATE ROLE nosel LOGIN PASSWORD 'nosel-pw'")
        .await
        .unwrap();
    let ctx = common::ctx_with(
        StaticCredentialProvider::new().with("postgres_user", "nosel").with("postgres_password", "nosel-pw"),
    );
    let c = PostgresConnector::new(server.config("checks", &["secret"]), &ctx).unwrap();
    let err = c.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("GRANT SELECT ON \"public\".\"secret\" TO \"nosel\""), "{err}");
    let err = read_all(&c, request(ReadMode::Full, Cursors::new(), 10)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
}

#[tokio::test]
async fn credential_errors_are_clear_and_never_show_the_password() {
    let server = common::server().await;
    let admin = server.admin("postgres").await;
    admin
        .batch_execute("DROP ROLE IF EXISTS pwuser; CREATE ROLE pwuser LOGIN PASSWORD 'right-password-123'")
        .await
        .unwrap();
    let db = server
        .database("creds", "CREATE TABLE t (id int PRIMARY KEY, updated_at timestamptz NOT NULL)")
        .await;
    db.batch_execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO pwuser").await.unwrap();
    let cfg = server.config("creds", &["t"]);
    let password = "wrong-Pa55word-!@#";
    let provider =
        StaticCredentialProvider::new().with("postgres_user", "pwuser").with("postgres_password", password);
    let c = PostgresConnector::new(cfg.clone(), &common::ctx_with(provider)).unwrap();
    let err = c.check().await.unwrap_err();
    let shown = format!("{err} {err:?} {c:?}");
    eprintln!("wrong password: {shown}");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "authentication failed for user \"pwuser\" on 127.0.0.1:{}/pgconn_creds",
            server.port()
        )),
        "{err}"
    );
    assert!(!shown.contains(password), "password leaked: {shown}");
    let err = read_all(&c, request(ReadMode::Full, Cursors::new(), 10)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(!format!("{err:?}").contains(password));

    // The server wants a password and the provider has none.
    let c = PostgresConnector::new(
        cfg.clone(),
        &common::ctx_with(StaticCredentialProvider::new().with("postgres_user", "pwuser")),
    )
    .unwrap();
    let err = c.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(
        err.to_string().contains(
            "requires a password for user \"pwuser\": set postgres_password in in-memory credentials"
        ),
        "{err}"
    );

    // No user at all.
    let c = PostgresConnector::new(cfg.clone(), &common::ctx_with(StaticCredentialProvider::new())).unwrap();
    let err = c.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(err.to_string().contains("missing credential `postgres_user`"), "{err}");

    // The right password works.
    let provider = StaticCredentialProvider::new()
        .with("postgres_user", "pwuser")
        .with("postgres_password", "right-password-123");
    PostgresConnector::new(cfg, &common::ctx_with(provider)).unwrap().check().await.unwrap();
}

#[tokio::test]
async fn unreachable_server_is_transient_and_names_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = PostgresConfig {
        host: "127.0.0.1".into(),
        port,
        ..PostgresConfig::new(connector_core::TenantId::new("t").unwrap(), "db", vec!["t".into()])
    };
    let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
    let err = c.check().await.unwrap_err();
    eprintln!("unreachable: {err}");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(
        err.to_string().starts_with(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn connections_are_bounded_by_pool_size_and_closed_on_drop() {
    let server = common::server().await;
    let admin = server
        .database(
            "pool",
            "CREATE TABLE a (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE b (LIKE a INCLUDING ALL); CREATE TABLE c (LIKE a INCLUDING ALL);
             INSERT INTO a (id, v) SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;
             INSERT INTO b SELECT * FROM a; INSERT INTO c SELECT * FROM a;",
        )
        .await;
    let sessions = || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'pgconn_pool' AND application_name = 'enterprise-connectors'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let cfg = PostgresConfig { pool_size: 2, ..server.config("pool", &["a", "b", "c"]) };
    let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
    let mut stream = c.read(request(ReadMode::Full, Cursors::new(), 100));
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.changes.len(), 100);
    // Both permitted readers are now connected and held back by the unread stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sessions().await, 2);
    drop(stream);
    let mut left = sessions().await;
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = sessions().await;
    }
    assert_eq!(left, 0, "dropping the stream closes its connections");

    // Read to the end: every row of every table, each stream ends with its last row's cursor.
    let batches = read_all(&c, request(ReadMode::Full, Cursors::new(), 1000)).await.unwrap();
    assert_eq!(docs(&batches).len(), 60_000);
    let mut cursors = Cursors::new();
    advance(&mut cursors, &batches);
    assert_eq!(cursors.len(), 3);
    for s in ["public.a", "public.b", "public.c"] {
        assert_eq!(cursors[s]["pk"], json!("20000"), "{s}");
    }
}

#[tokio::test]
async fn a_killed_connection_is_a_transient_error() {
    let server = common::server().await;
    let admin = server
        .database(
            "killed",
            "CREATE TABLE t (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO t (id, v) SELECT g, repeat('y', 200) FROM generate_series(1, 50000) g;",
        )
        .await;
    let c = PostgresConnector::new(server.config("killed", &["t"]), &common::ctx()).unwrap();
    let mut stream = c.read(request(ReadMode::Full, Cursors::new(), 100));
    stream.next().await.unwrap().unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'pgconn_killed' AND application_name = 'enterprise-connectors'",
        )
        .await
        .unwrap();
    let err = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended quietly after its connection was killed"),
        }
    };
    eprintln!("killed connection: {err}");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(err.to_string().contains("public.t"), "{err}");
}

#[tokio::test]
async fn estimates_count_rows_for_progress() {
    let server = common::server().await;
    let admin = server
        .database(
            "estimate",
            "CREATE TABLE small (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO small (id) SELECT generate_series(1, 123);
             CREATE TABLE big (LIKE small INCLUDING ALL);
             INSERT INTO big (id) SELECT generate_series(1, 200000);",
        )
        .await;
    admin.batch_execute("ANALYZE big").await.unwrap();
    let c = PostgresConnector::new(server.config("estimate", &["small", "big"]), &common::ctx()).unwrap();
    let total = c.estimate_total(&request(ReadMode::Full, Cursors::new(), 10)).await.unwrap().unwrap();
    assert!((190_000..=210_123).contains(&total), "{total}");
    let mut cursors = Cursors::new();
    cursors.insert("public.small".into(), json!({"ts": "2024-01-01 00:00:00+00", "pk": "1"}));
    assert_eq!(c.estimate_total(&request(ReadMode::Incremental, cursors, 10)).await.unwrap(), None);
    let c = PostgresConnector::new(server.config("estimate", &["small"]), &common::ctx()).unwrap();
    assert_eq!(c.estimate_total(&request(ReadMode::Full, Cursors::new(), 10)).await.unwrap(), Some(123));
}

// ---------------------------------------------------------------------------------------------
// Real time: LISTEN/NOTIFY and fetching single rows.

use connector_testkit::postgres::GUIDE_NOTIFY_TRIGGER as GUIDE_TRIGGER;

/// The `application_name` of the feed's connection.
const LISTENER: &str = "enterprise-connectors-listener";
const HINT_TIMEOUT: Duration = Duration::from_secs(15);

fn item(stream: &str, key: &str) -> ItemRef {
    ItemRef::new(stream, key)
}

/// A running change feed.
struct Feed {
    hints: mpsc::Receiver<ChangeHint>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<connector_core::Result<()>>,
}

impl Feed {
    fn start(c: &PostgresConnector) -> Feed {
        let feed = c.change_feed().expect("notify_channel is set");
        let (tx, hints) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(feed.run(tx, stop.clone()));
        Feed { hints, stop, task }
    }

    async fn next(&mut self) -> ChangeHint {
        tokio::time::timeout(HINT_TIMEOUT, self.hints.recv())
            .await
            .expect("a hint in time")
            .expect("the feed is running")
    }

    /// Takes `Items` hints until each of `expected` arrived; any other hint or item fails.
    async fn expect_items(&mut self, expected: &[ItemRef]) {
        let expected: BTreeSet<&ItemRef> = expected.iter().collect();
        let mut missing = expected.clone();
        while !missing.is_empty() {
            match self.next().await {
                ChangeHint::Items(items) => {
                    for i in &items {
                        assert!(
                            expected.contains(i),
                            "unexpected {i:?} in {items:?}, waiting for {missing:?}"
                        );
                        missing.remove(i);
                    }
                }
                ChangeHint::CatchUp => panic!("catch-up while waiting for {missing:?}"),
            }
        }
    }

    async fn expect_catch_up(&mut self) {
        match self.next().await {
            ChangeHint::CatchUp => {}
            other => panic!("expected a catch-up, got {other:?}"),
        }
    }

    /// Cancels the feed: it ends at once, without an error.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the feed stops promptly")
            .unwrap()
            .expect("a stopped feed ends without an error");
    }
}

/// Waits until the feed's connection to `db` has run its LISTEN; returns its backend's pid.
async fn wait_listening(admin: &tokio_postgres::Client, db: &str) -> i32 {
    for _ in 0..200 {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 \
                 AND query LIKE 'LISTEN%' AND state = 'idle'",
                &[&db, &LISTENER],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the feed never listened on {db}");
}

async fn listeners(admin: &tokio_postgres::Client, db: &str) -> i64 {
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&db, &LISTENER],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn notify_feed_hints_inserts_updates_and_deletes() {
    let server = common::server().await;
    let admin = server
        .database(
            "notify",
            &format!(
                "CREATE TABLE documents (id bigint PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT now());
                 CREATE TABLE other (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
                 INSERT INTO documents (id, body) VALUES (1, 'one'), (2, 'two');
                 {GUIDE_TRIGGER}
                 CREATE TRIGGER other_notify_trigger AFTER INSERT OR UPDATE OR DELETE ON other
                 FOR EACH ROW EXECUTE FUNCTION notify_document_changes();"
            ),
        )
        .await;
    let plain = PostgresConnector::new(server.config("notify", &["documents"]), &common::ctx()).unwrap();
    assert!(!plain.capabilities().realtime);
    assert!(plain.change_feed().is_none());
    let cfg = PostgresConfig {
        notify_channel: Some("document_changes".into()),
        ..server.config("notify", &["documents"])
    };
    let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
    assert!(c.capabilities().realtime);
    let mut feed = Feed::start(&c);
    wait_listening(&admin, "pgconn_notify").await;
    let doc = |key: &str| item("public.documents", key);

    admin.batch_execute("INSERT INTO documents (id, body) VALUES (3, 'three')").await.unwrap();
    feed.expect_items(&[doc("3")]).await;
    admin.batch_execute("UPDATE documents SET body = 'uno', updated_at = now() WHERE id = 1").await.unwrap();
    feed.expect_items(&[doc("1")]).await;
    admin.batch_execute("DELETE FROM documents WHERE id = 2").await.unwrap();
    feed.expect_items(&[doc("2")]).await;

    // One statement, many rows: every row is named (in as few hints as arrive together).
    admin
        .batch_execute(
            "INSERT INTO documents (id, body) SELECT g, 'bulk' FROM generate_series(100, 149) g;
             UPDATE documents SET body = 'both', updated_at = now() WHERE id IN (1, 3);",
        )
        .await
        .unwrap();
    let mut bulk: Vec<ItemRef> = (100..150).map(|k| doc(&k.to_string())).collect();
    bulk.extend([doc("1"), doc("3")]);
    feed.expect_items(&bulk).await;

    // Tables that are not configured are ignored: the next hint names only the document.
    admin.batch_execute("INSERT INTO other (id) VALUES (1)").await.unwrap();
    admin.batch_execute("INSERT INTO documents (id, body) VALUES (4, 'four')").await.unwrap();
    assert_eq!(feed.next().await, ChangeHint::Items(vec![doc("4")]));

    // The schema-qualified payload of the docs' variant, with a string id.
    admin
        .batch_execute(
            r#"SELECT pg_notify('document_changes', '{"schema": "public", "table": "documents", "operation": "UPDATE", "id": "5"}');
               SELECT pg_notify('document_changes', '{"schema": "elsewhere", "table": "documents", "operation": "UPDATE", "id": 6}');
               SELECT pg_notify('document_changes', '{"table": "documents", "operation": "INSERT", "id": 7}');"#,
        )
        .await
        .unwrap();
    feed.expect_items(&[doc("5"), doc("7")]).await;

    // Not the guide's payload: a catch-up sync instead.
    admin.batch_execute("NOTIFY document_changes, 'not json'").await.unwrap();
    feed.expect_catch_up().await;
    admin.batch_execute(&format!("NOTIFY document_changes, '{}'", "x".repeat(7000))).await.unwrap();
    feed.expect_catch_up().await;
    admin.batch_execute("DELETE FROM documents WHERE id = 4").await.unwrap();
    feed.expect_items(&[doc("4")]).await;

    feed.stop().await;
    for _ in 0..50 {
        if listeners(&admin, "pgconn_notify").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listeners(&admin, "pgconn_notify").await, 0, "a stopped feed closes its connection");
}

#[tokio::test]
async fn notify_feed_reconnects_and_asks_for_a_catch_up() {
    let server = common::server().await;
    // A channel name that needs quoting (and would break unquoted SQL).
    let channel = "Odd \"chan\"; 1";
    let admin = server
        .database(
            "notify_reconnect",
            &GUIDE_TRIGGER.replace("'document_changes'", "'Odd \"chan\"; 1'").replace(
                "CREATE TRIGGER",
                "CREATE TABLE documents (id text PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now());
                 CREATE TRIGGER",
            ),
        )
        .await;
    let cfg = PostgresConfig {
        notify_channel: Some(channel.into()),
        ..server.config("notify_reconnect", &["documents"])
    };
    let c = PostgresConnector::new(cfg.clone(), &common::ctx()).unwrap();
    let mut feed = Feed::start(&c);
    let first_pid = wait_listening(&admin, "pgconn_notify_reconnect").await;
    let doc = |key: &str| item("public.documents", key);

    admin.batch_execute("INSERT INTO documents (id) VALUES ('a b''c')").await.unwrap();
    feed.expect_items(&[doc("a b'c")]).await;
    admin.batch_execute(r#"NOTIFY "Odd ""chan""; 1", 'not json'"#).await.unwrap();
    feed.expect_catch_up().await;

    // The feed's backend is killed: it reconnects, listens again and asks for a catch-up.
    for _ in 0..2 {
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = 'pgconn_notify_reconnect' AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1);
        feed.expect_catch_up().await;
        let pid = wait_listening(&admin, "pgconn_notify_reconnect").await;
        assert_ne!(pid, first_pid, "a new connection");
        admin.batch_execute("UPDATE documents SET updated_at = now()").await.unwrap();
        feed.expect_items(&[doc("a b'c")]).await;
    }
    feed.stop().await;

    // A feed whose hints nobody receives any more ends by itself.
    let Feed { hints, stop: _stop, task } = Feed::start(&c);
    wait_listening(&admin, "pgconn_notify_reconnect").await;
    drop(hints);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the feed ends when its receiver is gone")
        .unwrap()
        .unwrap();

    // Credentials that are refused are not retried: the feed ends with the error.
    let provider = StaticCredentialProvider::new()
        .with("postgres_user", "postgres")
        .with("postgres_password", "not-the-password");
    let c = PostgresConnector::new(cfg, &common::ctx_with(provider)).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = tokio::time::timeout(HINT_TIMEOUT, c.change_feed().unwrap().run(tx, CancellationToken::new()))
        .await
        .expect("a refused login ends the feed")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("change feed on channel"), "{err}");
}

/// The store's documents by id.
async fn stored(store: &SqliteKnowledgeStore) -> HashMap<String, StoredDocument> {
    let tenant = connector_core::TenantId::new("t1").unwrap();
    store.export(&tenant, None).map(|d| d.unwrap()).map(|d| (d.document.id.clone(), d)).collect().await
}

#[tokio::test]
async fn fetch_reads_named_rows_like_a_sync() {
    let server = common::server().await;
    let admin = server
        .database(
            "fetch",
            r#"
        CREATE TABLE documents (
            id bigint PRIMARY KEY, title text, body text, tags text[], price numeric(10, 2),
            data jsonb, created_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO documents (id, title, body, tags, price, data, created_at)
        SELECT g, 'Doc ' || g, 'body of ' || g, ARRAY['t' || g, NULL], g * 1.5, jsonb_build_object('n', g),
               '2024-01-01'::timestamptz + g * interval '1 minute'
        FROM generate_series(1, 2500) g;
        CREATE TABLE notes (id uuid PRIMARY KEY, body text, updated_at timestamptz);
        INSERT INTO notes VALUES ('550e8400-e29b-41d4-a716-446655440000', 'a note', NULL);
        "#,
        )
        .await;
    let c = Arc::new(
        PostgresConnector::new(server.config("fetch", &["documents", "notes"]), &common::ctx()).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteKnowledgeStore::open(dir.path().join("k.db")).await.unwrap());
    let state = Arc::new(MemoryStateStore::new());
    let engine = SyncEngine::new(c.clone(), store.clone(), state.clone());
    let options = || SyncOptions { retry_delay: Duration::from_millis(10), ..Default::default() };

    // Before a first sync, hints are no use: the caller runs a sync.
    assert!(engine.sync_items(&[item("public.documents", "1")]).await.is_none());
    let result = engine.sync(options()).await;
    assert!(result.success, "{:?}", result.errors);
    assert_eq!(result.items_synced, 2501);
    let synced = stored(&store).await;

    // Every key (chunks of 1,000), keys without rows, other spellings of keys, keys that no
    // row can have (not a number, out of bigint's range, not a uuid: left out), and streams
    // that are not configured.
    let mut items: Vec<ItemRef> = (1..=2600).map(|k| item("public.documents", &k.to_string())).collect();
    items.extend([
        item("public.documents", "0005"),
        item("public.documents", " 6"),
        item("public.documents", "abc"),
        item("public.documents", "99999999999999999999999"),
        item("public.notes", "550E8400-E29B-41D4-A716-446655440000"),
        item("public.notes", "00000000-0000-0000-0000-000000000000"),
        item("public.notes", "not-a-uuid"),
        item("public.other", "1"),
        item("elsewhere.documents", "1"),
    ]);
    let batch = c.fetch(&items).await.unwrap().expect("postgres fetches items");
    assert!(batch.failures.is_empty(), "{:?}", batch.failures);
    assert!(batch.checkpoint.is_none(), "fetching never moves cursors");
    let mut upserts = 0;
    let mut deletes = BTreeSet::new();
    let mut ids = HashSet::new();
    for change in &batch.changes {
        assert!(ids.insert(change.id().to_string()), "{} twice", change.id());
        match change {
            Change::Upsert(d) => {
                upserts += 1;
                let s = &synced[&d.id];
                assert_eq!(d, &s.document, "fetched and synced documents are the same");
                assert_eq!(d.content_hash(), s.content_hash, "{}", d.id);
            }
            Change::Delete { id } => {
                deletes.insert(id.clone());
            }
        }
    }
    assert_eq!(upserts, 2501);
    let mut expected: BTreeSet<String> = (2501..=2600).map(|k| format!("documents:{k}")).collect();
    expected.insert("notes:00000000-0000-0000-0000-000000000000".into());
    assert_eq!(deletes, expected);
    assert!(ids.contains("notes:550e8400-e29b-41d4-a716-446655440000"));
    assert!(c.fetch(&[item("public.other", "1")]).await.unwrap().unwrap().changes.is_empty());

    // End to end: hints write inserts, updates and deletes, and leave the cursors alone.
    let cid = c.connector_id().clone();
    let tenant = c.tenant_id().clone();
    let cursors = state.load(&cid, &tenant).await.unwrap().unwrap().cursors;
    admin
        .batch_execute(
            "UPDATE documents SET body = 'changed by a hint', updated_at = now() WHERE id = 1;
             DELETE FROM documents WHERE id = 2;
             INSERT INTO documents (id, title, body) VALUES (3000, 'New', 'inserted row');",
        )
        .await
        .unwrap();
    let hinted =
        [item("public.documents", "1"), item("public.documents", "2"), item("public.documents", "3000")];
    let result = engine.sync_items(&hinted).await.expect("a synced connector takes hints");
    assert!(result.success, "{:?}", result.errors);
    assert_eq!((result.items_synced, result.items_deleted), (2, 1));
    let now = stored(&store).await;
    assert_eq!(now.len(), 2501);
    assert!(now["documents:1"].document.content.contains("changed by a hint"));
    assert!(!now.contains_key("documents:2"));
    assert_eq!(now["documents:3000"].document.title, "New");
    let hits = store.search(&tenant, "hint", 5).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["documents:1"]);
    let after = state.load(&cid, &tenant).await.unwrap().unwrap();
    assert_eq!(after.cursors, cursors, "hints never move cursors");

    // The next incremental sync reads both rows again and finds them written already.
    let result = engine.sync(options()).await;
    assert!(result.success, "{:?}", result.errors);
    assert_eq!((result.items_synced, result.items_unchanged), (0, 2));
}
