use super::*;
use crate::store::ChangeOutcome;

fn scope(connector: &str, generation: i64, full: bool) -> WriteScope {
    WriteScope {
        tenant_id: TenantId::new("acme").unwrap(),
        connector_id: ConnectorId::new(connector).unwrap(),
        generation,
        touch_unchanged: full,
    }
}

fn doc(id: &str, content: &str) -> Change {
    Change::Upsert(Document::new(id, "note", format!("title of {id}"), content))
}

async fn hits(store: &SqliteKnowledgeStore, query: &str) -> Vec<String> {
    let tenant = TenantId::new("acme").unwrap();
    store.search(&tenant, query, 100).await.unwrap().into_iter().map(|h| h.id).collect()
}

#[tokio::test]
async fn search_follows_inserts_updates_deletes_and_sweeps() {
    let store = SqliteKnowledgeStore::in_memory().await.unwrap();
    let s1 = scope("notes", 1, true);
    let out = store
        .apply(&s1, &[doc("a", "apples and pears"), doc("b", "pears only"), doc("c", "cherries")])
        .await
        .unwrap();
    assert_eq!(out.outcomes, [ChangeOutcome::Inserted; 3]);
    store.flush_index().await.unwrap();
    assert_eq!(hits(&store, "pears").await, ["b", "a"]);

    // An update replaces the old words; an unchanged document is not rewritten.
    let s2 = scope("notes", 2, true);
    let out = store.apply(&s2, &[doc("a", "apples and plums"), doc("b", "pears only")]).await.unwrap();
    assert_eq!(out.outcomes, [ChangeOutcome::Updated, ChangeOutcome::Unchanged]);
    store.flush_index().await.unwrap();
    assert_eq!(hits(&store, "pears").await, ["b"]);
    assert_eq!(hits(&store, "plums").await, ["a"]);

    // The sweep removes what generation 2 did not see, from the documents and the index.
    assert_eq!(store.sweep(&s2.tenant_id, &s2.connector_id, 2).await.unwrap(), 1);
    store.flush_index().await.unwrap();
    assert!(hits(&store, "cherries").await.is_empty());

    let out = store
        .apply(&s2, &[Change::Delete { id: "b".into() }, Change::Delete { id: "zz".into() }])
        .await
        .unwrap();
    assert_eq!(out.outcomes, [ChangeOutcome::Deleted, ChangeOutcome::DeleteMissing]);
    store.flush_index().await.unwrap();
    assert!(hits(&store, "pears").await.is_empty());
    assert_eq!(store.count(&s2.tenant_id, None).await.unwrap(), 1);

    // A document inserted and deleted before the index saw it leaves nothing behind.
    store.apply(&s2, &[doc("d", "dates")]).await.unwrap();
    store.apply(&s2, &[Change::Delete { id: "d".into() }]).await.unwrap();
    store.flush_index().await.unwrap();
    assert!(hits(&store, "dates").await.is_empty());
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM search.documents_fts")
        .fetch_one(&store.inner.search_pool)
        .await
        .unwrap();
    assert_eq!(entries, 1, "one entry per live document");
    // Applied deletes are pruned by later writes.
    store.apply(&s2, &[doc("e", "elderberries")]).await.unwrap();
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM index_deletes").fetch_one(store.pool()).await.unwrap();
    assert!(pending <= 1, "{pending} applied deletes kept");
}

#[tokio::test]
async fn snippets_mark_the_words_and_hits_stay_in_their_tenant() {
    let store = SqliteKnowledgeStore::in_memory().await.unwrap();
    let long = format!("{} the failover runbook {}", "filler ".repeat(40), "tail ".repeat(40));
    store.apply(&scope("wiki", 1, false), &[doc("runbook", &long)]).await.unwrap();
    let other = WriteScope { tenant_id: TenantId::new("other").unwrap(), ..scope("wiki", 1, false) };
    store.apply(&other, &[doc("secret", "failover for another tenant")]).await.unwrap();
    store.flush_index().await.unwrap();
    let found = store.search(&TenantId::new("acme").unwrap(), "Failover", 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].snippet.starts_with('…') && found[0].snippet.ends_with('…'), "{}", found[0].snippet);
    assert!(found[0].snippet.contains("the [failover] runbook"), "{}", found[0].snippet);
    assert!(found[0].score > 0.0);
}

#[tokio::test]
async fn a_lost_or_foreign_index_is_rebuilt_from_the_documents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    {
        let store = SqliteKnowledgeStore::open(&path).await.unwrap();
        let docs: Vec<Change> = (0..50).map(|i| doc(&format!("d{i}"), &format!("word{i} common"))).collect();
        store.apply(&scope("notes", 1, false), &docs).await.unwrap();
        store.flush_index().await.unwrap();
        assert_eq!(store.search_path(), dir.path().join("knowledge.search.db"));
    }
    // Deleted: a reader catches up before it answers.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("knowledge.search.db{suffix}")));
    }
    let store = SqliteKnowledgeStore::open(&path).await.unwrap();
    assert_eq!(hits(&store, "word7").await, ["d7"]);
    assert_eq!(hits(&store, "common").await.len(), 50);
    drop(store);

    // The index of another documents file (same rowids, other text) is dropped, not trusted.
    let other = tempfile::tempdir().unwrap();
    {
        let store = SqliteKnowledgeStore::open(other.path().join("knowledge.db")).await.unwrap();
        let docs: Vec<Change> = (0..50).map(|i| doc(&format!("x{i}"), "stranger")).collect();
        store.apply(&scope("notes", 1, false), &docs).await.unwrap();
        store.flush_index().await.unwrap();
    }
    for suffix in ["", "-wal", "-shm"] {
        let from = other.path().join(format!("knowledge.search.db{suffix}"));
        if from.exists() {
            std::fs::copy(from, dir.path().join(format!("knowledge.search.db{suffix}"))).unwrap();
        }
    }
    let store = SqliteKnowledgeStore::open(&path).await.unwrap();
    assert!(hits(&store, "stranger").await.is_empty());
    assert_eq!(hits(&store, "word7").await, ["d7"]);
}

// Multi-threaded: writes run in place (`block_in_place`) rather than on the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_store_index_each_document_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    let a = SqliteKnowledgeStore::open(&path).await.unwrap();
    let b = SqliteKnowledgeStore::open(&path).await.unwrap();
    let write = |store: SqliteKnowledgeStore, connector: &'static str| async move {
        for batch in 0..20 {
            let docs: Vec<Change> = (0..50)
                .map(|i| doc(&format!("{batch}-{i}"), &format!("shared {connector}{batch}x{i}")))
                .collect();
            store.apply(&scope(connector, 1, false), &docs).await.unwrap();
        }
        store.flush_index().await.unwrap();
    };
    tokio::join!(write(a.clone(), "left"), write(b.clone(), "right"));
    a.flush_index().await.unwrap();
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM search.documents_fts")
        .fetch_one(&a.inner.search_pool)
        .await
        .unwrap();
    assert_eq!(entries, 2000);
    assert_eq!(hits(&a, "left7x3").await, ["7-3"]);
    assert_eq!(hits(&b, "right19x49").await, ["19-49"]);
}

#[tokio::test]
async fn a_version_1_store_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE documents (rowid INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, connector_id TEXT NOT NULL,
               id TEXT NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL, content TEXT NOT NULL, url TEXT, author TEXT,
               created_at TEXT, updated_at TEXT, metadata TEXT NOT NULL, content_hash TEXT NOT NULL,
               sync_gen INTEGER NOT NULL, synced_at TEXT NOT NULL, UNIQUE (tenant_id, connector_id, id));
             CREATE VIRTUAL TABLE documents_fts USING fts5(title, content, content='documents', content_rowid='rowid');
             CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO store_meta VALUES ('schema_version', '1');
             INSERT INTO documents VALUES (7, 'acme', 'notes', 'old', 'note', 'Old note', 'kept across the upgrade',
               NULL, NULL, NULL, NULL, '{}', 'h', 3, '2026-01-01T00:00:00Z');",
        )
        .unwrap();
    }
    let store = SqliteKnowledgeStore::open(&path).await.unwrap();
    assert_eq!(hits(&store, "upgrade").await, ["old"]);
    let tenant = TenantId::new("acme").unwrap();
    let kept = store.get(&tenant, &ConnectorId::new("notes").unwrap(), "old").await.unwrap().unwrap();
    assert_eq!(kept.document.content, "kept across the upgrade");
    // The migrated table hands out fresh rowids from here on.
    store.apply(&scope("notes", 4, false), &[doc("new", "fresh")]).await.unwrap();
    store.flush_index().await.unwrap();
    assert_eq!(hits(&store, "fresh").await, ["new"]);
}

#[tokio::test]
async fn a_future_schema_is_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knowledge.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO store_meta VALUES ('schema_version', '9');")
        .unwrap();
    let err = SqliteKnowledgeStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("knowledge.db") && err.contains("version 9"), "{err}");
}
