//! `cargo xtask demo [--rows N] [--keep]`: the main job on the embedded default. Starts
//! PostgreSQL, fills a `documents` table with generated engineering documents, and drives the
//! `connectors` CLI through a full sync, status, search, a change at the source and an
//! incremental sync. Everything lives in `target/demo/`.

mod corpus;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use connector_testkit::PgServer;

use crate::util::{self, cargo, say};

const DEFAULT_ROWS: u64 = 3_000;
const SEED: u64 = 0x5eed_d0c5;
/// A word only the documents added in the second round contain.
const NEW_WORD: &str = "zeppelin";

/// The demo's table; the bench uses the same shape.
pub const DOCUMENTS_TABLE: &str = "
CREATE TABLE documents (
    id          bigserial PRIMARY KEY,
    title       text NOT NULL,
    body        text,
    summary     text,
    author      text,
    tags        text[],
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX documents_updated_at_id ON documents (updated_at, id);
";

pub fn run(mut args: Vec<String>) -> Result<()> {
    let rows = match util::take_option(&mut args, "--rows")? {
        Some(n) => util::parse_count(&n)?,
        None => DEFAULT_ROWS,
    };
    let keep = util::take_flag(&mut args, "--keep");
    util::no_more_args("demo", &args)?;

    let dir = util::target_dir().join("demo");
    let home = dir.join("home");
    // A fresh store and state each time, so the first sync is a full one.
    if home.exists() {
        fs::remove_dir_all(&home).with_context(|| format!("removing {}", home.display()))?;
    }
    fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;

    say("starting PostgreSQL");
    let server = PgServer::start()?;
    say(format!("PostgreSQL listens on {}:{}", server.host(), server.port()));

    say(format!("creating database `demo` with {rows} documents"));
    server.psql("postgres", ["-c", "CREATE DATABASE demo"])?;
    server.psql_script("demo", DOCUMENTS_TABLE)?;
    let docs = corpus::documents(rows as usize, SEED);
    server.psql_script("demo", &copy_script(&docs))?;
    server.psql("demo", ["-c", "ANALYZE documents"])?;

    let config = dir.join("connectors.toml");
    fs::write(&config, config_toml(&server)).with_context(|| format!("writing {}", config.display()))?;
    say(format!("wrote {}", config.display()));
    say(format!(
        "environment: ARAGORA_HOME={} ARAGORA_POSTGRES_USER={} ARAGORA_POSTGRES_PASSWORD=<the server's>",
        home.display(),
        PgServer::SUPERUSER
    ));

    let cli = Cli { config: &config, home: &home, server: &server };
    cli.run(&["sync"])?;
    cli.run(&["status"])?;
    cli.run(&["search", corpus::COMMON_WORD, "--tenant", "demo", "--limit", "5"])?;

    say("changing the source: 3 new documents, 10 edited");
    server.psql_script("demo", &change_script(rows))?;
    cli.run(&["sync"])?;
    cli.run(&["search", NEW_WORD, "--tenant", "demo", "--limit", "5"])?;
    cli.run(&["status"])?;

    if keep {
        say(format!(
            "PostgreSQL stays up at {}; press Enter to stop it",
            redact(&server, &server.url("demo"))
        ));
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    say("stopping PostgreSQL");
    server.stop()
}

/// Runs the CLI through `cargo run`, printing each command first.
struct Cli<'a> {
    config: &'a Path,
    home: &'a Path,
    server: &'a PgServer,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Result<()> {
        let mut cmd = cargo();
        cmd.args(["run", "-q", "-p", "connectors-cli", "--", "--config"]).arg(self.config).args(args);
        self.env(&mut cmd);
        util::run(&mut cmd).with_context(|| format!("`connectors {}` failed", args.join(" ")))
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("ARAGORA_HOME", self.home)
            .env("ARAGORA_POSTGRES_USER", PgServer::SUPERUSER)
            .env("ARAGORA_POSTGRES_PASSWORD", self.server.password())
            .env_remove("ARAGORA_CONFIG");
    }
}

/// The CLI configuration for one `documents` table in `database` of the server.
pub fn connector_toml(id: &str, tenant: &str, server: &PgServer, database: &str) -> String {
    format!(
        r#"[[connectors]]
type = "postgres"
id = "{id}"
tenant_id = "{tenant}"
host = "{host}"
port = {port}
database = "{database}"
schema = "public"
tables = ["documents"]
timestamp_column = "updated_at"
primary_key_column = "id"
content_columns = ["title", "body", "summary"]
"#,
        host = server.host(),
        port = server.port(),
    )
}

fn config_toml(server: &PgServer) -> String {
    let mut text = String::from(
        "# Written by `cargo xtask demo`. Credentials come from ARAGORA_POSTGRES_USER / \
         ARAGORA_POSTGRES_PASSWORD;\n# the store and state default to $ARAGORA_HOME (target/demo/home).\n\n",
    );
    text.push_str(&connector_toml("demo-docs", "demo", server, "demo"));
    text
}

/// A psql script loading the documents with `COPY ... FROM STDIN` (text format).
fn copy_script(docs: &[corpus::Doc]) -> String {
    let mut sql = String::with_capacity(docs.len() * 1200);
    sql.push_str("COPY documents (title, body, summary, author, tags, created_at, updated_at) FROM STDIN;\n");
    for doc in docs {
        let tags = format!("{{{}}}", doc.tags.join(","));
        let fields =
            [&doc.title, &doc.body, &doc.summary, doc.author, &tags, &doc.created_at, &doc.updated_at];
        let line: Vec<String> = fields.iter().map(|f| copy_escape(f)).collect();
        sql.push_str(&line.join("\t"));
        sql.push('\n');
    }
    sql.push_str("\\.\n");
    sql
}

fn copy_escape(field: &str) -> String {
    field.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r")
}

fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// New rows with a word the first round never had, and edits to existing rows.
fn change_script(rows: u64) -> String {
    let mut rng = corpus::Rng::new(SEED ^ 0xfeed);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        as i64;
    let mut sql = String::from("BEGIN;\n");
    for i in 0..3 {
        let mut doc = corpus::document(&mut rng, now - 3600 + i, now);
        doc.title = format!("Runbook: warming the {NEW_WORD} cache after a failover ({})", i + 1);
        doc.body.push_str(&format!("\n\nThe {NEW_WORD} cache must be warm before traffic returns."));
        let _ = writeln!(
            sql,
            "INSERT INTO documents (title, body, summary, author, tags, created_at, updated_at) \
             VALUES ({}, {}, {}, {}, ARRAY[{}], now(), now());",
            sql_string(&doc.title),
            sql_string(&doc.body),
            sql_string(&doc.summary),
            sql_string(doc.author),
            doc.tags.iter().map(|t| sql_string(t)).collect::<Vec<_>>().join(", "),
        );
    }
    let edited: Vec<String> = (0..10).map(|i| (1 + i * rows.max(10) / 10).to_string()).collect();
    let _ = writeln!(
        sql,
        "UPDATE documents SET body = body || E'\\n\\nUpdated: reviewed by the owning team.', updated_at = now() \
         WHERE id IN ({});",
        edited.join(", ")
    );
    sql.push_str("COMMIT;\n");
    sql
}

fn redact(server: &PgServer, text: &str) -> String {
    text.replace(server.password(), "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_are_escaped() {
        assert_eq!(copy_escape("a\tb\nc\\d"), "a\\tb\\nc\\\\d");
        let docs = corpus::documents(20, 1);
        let script = copy_script(&docs);
        // One line per document between the COPY command and the end marker.
        assert_eq!(script.lines().count(), docs.len() + 2);
        assert!(script.lines().skip(1).take(docs.len()).all(|l| l.split('\t').count() == 7));
    }

    #[test]
    fn sql_strings_are_quoted() {
        assert_eq!(sql_string("Sam O'Neill"), "'Sam O''Neill'");
        let script = change_script(3000);
        assert_eq!(script.matches("INSERT INTO").count(), 3);
        assert!(script.contains("WHERE id IN (1, 301, "), "{script}");
    }
}
