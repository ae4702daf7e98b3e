//! Read throughput against `psql \copy` of the same rows. Ignored by default; run with
//! `cargo test --release -p connector-postgres --test bench -- --ignored --nocapture`
//! (`BENCH_ROWS` sets the row count, default 1,000,000).

mod common;

use std::process::Command;
use std::time::Instant;

use connector_core::{Connector, Cursors, ReadMode, ReadRequest};
use connector_postgres::{PostgresConfig, PostgresConnector};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly in release mode"]
async fn read_throughput_against_psql_copy() {
    let server = require_server!();
    let rows: u64 = std::env::var("BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let setup = Instant::now();
    server
        .database(
            "bench",
            &format!(
                "CREATE TABLE documents (
                    id bigint PRIMARY KEY, title text NOT NULL, body text, author text, views integer,
                    price numeric(12, 2), tags text[], created_at timestamptz NOT NULL,
                    updated_at timestamptz NOT NULL);
                 INSERT INTO documents
                 SELECT g, 'Document ' || g, repeat(md5(g::text), 6), 'user' || (g % 100), g % 1000,
                        (g % 10000) / 100.0, ARRAY['tag' || (g % 7), 'x'],
                        '2024-01-01'::timestamptz + g * interval '1 second',
                        '2024-06-01'::timestamptz + (g / 10) * interval '1 second'
                 FROM generate_series(1, {rows}) g;
                 CREATE INDEX ON documents (updated_at, id);
                 VACUUM ANALYZE documents;"
            ),
        )
        .await;
    eprintln!("setup: {rows} rows in {:.1?}", setup.elapsed());

    let psql = Instant::now();
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "-U", "postgres", "-d", "bench", "-c"])
        .arg("\\copy (SELECT * FROM documents ORDER BY updated_at, id) TO '/dev/null'")
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let psql = psql.elapsed();

    let cfg = PostgresConfig {
        content_columns: vec!["title".into(), "body".into()],
        ..server.config("bench", &["documents"])
    };
    let c = PostgresConnector::new(cfg, &common::ctx()).unwrap();
    let started = Instant::now();
    let request = ReadRequest { mode: ReadMode::Full, cursors: Cursors::new(), batch_size: 1000, batch_bytes: 4 << 20 };
    let mut stream = c.read(request);
    let (mut docs, mut batches, mut content_bytes) = (0u64, 0u64, 0usize);
    while let Some(batch) = stream.next().await {
        let batch = batch.unwrap();
        batches += 1;
        for change in &batch.changes {
            if let connector_core::Change::Upsert(d) = change {
                docs += 1;
                content_bytes += d.content.len();
            }
        }
    }
    let ours = started.elapsed();
    assert_eq!(docs, rows);
    eprintln!(
        "psql \\copy: {psql:.2?}; connector read: {ours:.2?} ({:.0} rows/s, {batches} batches, {} MB content); ratio {:.2}",
        rows as f64 / ours.as_secs_f64(),
        content_bytes >> 20,
        ours.as_secs_f64() / psql.as_secs_f64()
    );
}
