//! `cargo xtask bench scheduler [--seconds N] [--connectors N]`: the scheduler with N connectors
//! (default 10,000) on 1-second intervals against a no-op source, for N seconds (default 60):
//! runs the release build of connector-core's `scheduler_bench` example, which prints runs done,
//! CPU use, peak RSS and the lateness of runs.
//!
//! `cargo xtask bench pg [--rows N]`: how a full and an incremental sync of a PostgreSQL table
//! compare with the fastest possible read of the same rows (`psql \copy ... to /dev/null`), and
//! how much memory the sync needs. Runs at N/10 and N rows (default 1,000,000) to show whether
//! time grows linearly and memory stays flat. Prints a table; records nothing, and removes the
//! store it synced into (gigabytes at a million rows).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use connector_testkit::PgServer;

use crate::demo::{DOCUMENTS_TABLE, connector_toml};
use crate::util::{self, cargo, say};

const DEFAULT_ROWS: u64 = 1_000_000;
/// The columns the connector reads, in the order the incremental query walks them.
const COPY_QUERY: &str = "SELECT id, title, body, summary, author, tags, created_at, updated_at \
                          FROM documents ORDER BY updated_at, id";
/// Fields of `sync --json` that say where the time went, printed when the CLI reports them.
const PHASES: &[&str] = &["read_ms", "write_ms", "index_ms", "state_ms"];

pub fn run(mut args: Vec<String>) -> Result<()> {
    if args.first().map(String::as_str) == Some("webhooks") {
        args.remove(0);
        return webhooks(args);
    }
    if args.first().map(String::as_str) == Some("scheduler") {
        args.remove(0);
        return scheduler(args);
    }
    let rows = match util::take_option(&mut args, "--rows")? {
        Some(n) => util::parse_count(&n)?,
        None => DEFAULT_ROWS,
    };
    match args.first().map(String::as_str) {
        Some("pg") => {
            args.remove(0);
        }
        Some(other) => bail!("unknown benchmark `{other}`; available: pg, scheduler, webhooks"),
        None => bail!("which benchmark? `cargo xtask bench pg [--rows N]` or `cargo xtask bench scheduler`"),
    }
    util::no_more_args("bench pg", &args)?;
    if rows == 0 {
        bail!("--rows must be at least 1");
    }
    let sizes = if rows / 10 >= 1_000 { vec![rows / 10, rows] } else { vec![rows] };

    say("building the CLI (release)");
    util::run(cargo().args(["build", "--release", "-p", "connectors-cli"]))?;
    let cli = util::target_dir().join("release").join("connectors");
    if !cli.is_file() {
        bail!("{} was not built", cli.display());
    }
    let dir = util::target_dir().join("bench").join("pg");

    say("starting PostgreSQL");
    let server = PgServer::start()?;
    let mut results = Vec::new();
    for &n in &sizes {
        match bench_size(&server, &cli, &dir.join(n.to_string()), n) {
            Ok(result) => results.push(result),
            Err(err) => {
                let _ = server.stop();
                return Err(err.context(format!("benchmark with {n} rows")));
            }
        }
    }
    say("stopping PostgreSQL");
    server.stop()?;

    print_table(&results);
    let failed: Vec<String> = results
        .iter()
        .flat_map(|r| [&r.full, &r.incremental])
        .filter(|run| !run.ok)
        .map(|run| run.command.clone())
        .collect();
    if !failed.is_empty() {
        bail!("sync failed: {}", failed.join("; "));
    }
    Ok(())
}

/// `bench scheduler`: the example does the work; it is built in release mode only here.
fn scheduler(mut args: Vec<String>) -> Result<()> {
    let seconds = util::take_option(&mut args, "--seconds")?.map(|s| util::parse_count(&s)).transpose()?;
    let connectors =
        util::take_option(&mut args, "--connectors")?.map(|s| util::parse_count(&s)).transpose()?;
    util::no_more_args("bench scheduler", &args)?;
    let (seconds, connectors) = (seconds.unwrap_or(60), connectors.unwrap_or(10_000));
    if seconds == 0 || connectors == 0 {
        bail!("--seconds and --connectors must be at least 1");
    }
    say(format!(
        "{connectors} connectors on 1-second intervals for {seconds} s (building the example in release mode)"
    ));
    util::run(
        cargo()
            .args(["run", "--release", "-q", "-p", "connector-core", "--example", "scheduler_bench", "--"])
            .args(["--seconds", &seconds.to_string(), "--connectors", &connectors.to_string()]),
    )
}

/// `bench webhooks`: the example serves and loads the webhook endpoint; release build.
fn webhooks(mut args: Vec<String>) -> Result<()> {
    let seconds = util::take_option(&mut args, "--seconds")?.map(|s| util::parse_count(&s)).transpose()?;
    let connections =
        util::take_option(&mut args, "--connections")?.map(|s| util::parse_count(&s)).transpose()?;
    util::no_more_args("bench webhooks", &args)?;
    let (seconds, connections) = (seconds.unwrap_or(10), connections.unwrap_or(32));
    if seconds == 0 || connections == 0 {
        bail!("--seconds and --connections must be at least 1");
    }
    say(format!(
        "webhook receiver for {seconds} s over {connections} connections (building the example in release mode)"
    ));
    util::run(
        cargo()
            .args(["run", "--release", "-q", "-p", "connector-core", "--example", "webhook_bench", "--"])
            .args(["--seconds", &seconds.to_string(), "--connections", &connections.to_string()]),
    )
}

struct SizeResult {
    rows: u64,
    load_s: f64,
    copy_s: f64,
    full: SyncRun,
    incremental: SyncRun,
    changed: u64,
}

struct SyncRun {
    command: String,
    ok: bool,
    seconds: f64,
    peak_rss_kb: Option<u64>,
    json: Option<String>,
}

impl SyncRun {
    fn field(&self, key: &str) -> Option<f64> {
        json_number(self.json.as_deref()?, key)
    }
}

fn bench_size(server: &PgServer, cli: &Path, dir: &Path, rows: u64) -> Result<SizeResult> {
    let db = format!("bench_{rows}");
    say(format!("{rows} rows: creating database {db} and generating the rows in PostgreSQL"));
    server.psql(
        "postgres",
        ["-c", &format!("DROP DATABASE IF EXISTS {db}"), "-c", &format!("CREATE DATABASE {db}")],
    )?;
    server.psql_script(&db, DOCUMENTS_TABLE)?;
    let started = Instant::now();
    server.psql_script(&db, &fill_sql(rows))?;
    // Sets hint bits and reads the table once, so neither measurement pays for that.
    server.psql(&db, ["-c", "VACUUM (ANALYZE) documents"])?;
    let load_s = started.elapsed().as_secs_f64();
    let size =
        server.psql(&db, ["-At", "-c", "SELECT pg_size_pretty(pg_total_relation_size('documents'))"])?;
    say(format!("{rows} rows: loaded in {load_s:.1} s; table with indexes: {}", size.trim()));

    let copy = format!("\\copy ({COPY_QUERY}) to /dev/null");
    println!("$ psql -c \"{copy}\"");
    let started = Instant::now();
    server.psql(&db, ["-c", &copy])?;
    let copy_s = started.elapsed().as_secs_f64();

    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let home = dir.join("home");
    fs::create_dir_all(&home)?;
    let config = dir.join("connectors.toml");
    fs::write(&config, connector_toml("bench", "bench", server, &db))?;

    let full = sync(cli, &config, &home, server)?;
    let changed = rows / 100;
    say(format!("{rows} rows: updating 1% ({changed} rows)"));
    server.psql(
        &db,
        ["-c", "UPDATE documents SET updated_at = now(), body = body || ' edited' WHERE id % 100 = 0"],
    )?;
    let incremental = sync(cli, &config, &home, server)?;
    // The store holds a copy of the table plus its index: gigabytes at a million rows.
    fs::remove_dir_all(&home).with_context(|| format!("removing {}", home.display()))?;
    server.psql("postgres", ["-c", &format!("DROP DATABASE {db}")])?;
    Ok(SizeResult { rows, load_s, copy_s, full, incremental, changed })
}

/// Rows of about 450 bytes of text drawn from a 4,000-word vocabulary with a skewed (Zipf-like)
/// distribution, like prose; a thousand rows share each `updated_at`, so a cursor must break
/// ties on the primary key.
fn fill_sql(rows: u64) -> String {
    let vocab: Vec<String> = vocabulary(4000).into_iter().map(|w| format!("'{w}'")).collect();
    let words = |n: &str| {
        format!(
            "(SELECT string_agg(v[1 + floor(4000 * power(random(), 2))::int + 0 * k], ' ') \
              FROM generate_series(1, {n}) AS k WHERE g > 0)"
        )
    };
    format!(
        "SELECT setseed(0.42);
WITH vocab AS (SELECT ARRAY[{vocab}]::text[] AS v)
INSERT INTO documents (title, body, summary, author, tags, created_at, updated_at)
SELECT 'Document ' || g || ': ' || {title},
       {body},
       {summary},
       'author' || (g % 97),
       ARRAY['team' || (g % 7), 'topic' || (g % 13)],
       timestamptz '2024-01-01 00:00:00+00' + (g / 1000) * interval '1 second' - interval '1 day',
       timestamptz '2024-01-01 00:00:00+00' + (g / 1000) * interval '1 second'
FROM generate_series(1, {rows}) AS g, vocab;
",
        vocab = vocab.join(","),
        title = words("5"),
        body = words("45 + g % 10"),
        summary = words("10"),
    )
}

/// `n` distinct pronounceable words, the same every run.
fn vocabulary(n: usize) -> Vec<String> {
    const ONSETS: &[&str] =
        &["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "pl"];
    const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "ou"];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut words = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let syllables = 1 + next() % 3;
        let mut w = String::new();
        for _ in 0..syllables {
            w.push_str(ONSETS[(next() % ONSETS.len() as u64) as usize]);
            w.push_str(VOWELS[(next() % VOWELS.len() as u64) as usize]);
        }
        if next() % 2 == 0 {
            w.push_str(ONSETS[(next() % ONSETS.len() as u64) as usize]);
        }
        if words.insert(w.clone()) {
            out.push(w);
        }
    }
    out
}

/// Runs `connectors sync --json`, timing it and sampling its peak RSS (VmHWM) every 50 ms.
fn sync(cli: &Path, config: &Path, home: &Path, server: &PgServer) -> Result<SyncRun> {
    // BENCH_PERF=PREFIX records each sync with `perf record -g` into PREFIX.<millis>.
    let mut cmd = if let Ok(prefix) = std::env::var("BENCH_PERF") {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut c = Command::new("perf");
        c.args(["record", "-g", "-o", &format!("{prefix}.{}", stamp.as_millis()), "--"]).arg(cli);
        c
    } else {
        Command::new(cli)
    };
    cmd.arg("--config")
        .arg(config)
        .args(["sync", "--json"])
        .env("ARAGORA_HOME", home)
        .env("ARAGORA_POSTGRES_USER", PgServer::SUPERUSER)
        .env("ARAGORA_POSTGRES_PASSWORD", server.password())
        .env_remove("ARAGORA_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let command = util::display(&cmd);
    println!("$ {command}");
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("could not run {}", cli.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let pid = child.id();
    let mut peak_rss_kb = None;
    let status = loop {
        // VmHWM only grows, so the last sample before exit is the peak up to 50 ms before the end.
        if let Some(kb) = vm_hwm_kb(pid) {
            peak_rss_kb = Some(kb.max(peak_rss_kb.unwrap_or(0)));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = started.elapsed().as_secs_f64();
    let output = reader.join().expect("stdout reader panicked");
    let json = output.lines().rev().find(|l| l.trim_start().starts_with('{')).map(str::to_owned);
    match &json {
        Some(line) => println!("{line}"),
        None => say("the CLI printed no JSON line"),
    }
    let ok = status.success() && json.as_deref().and_then(|j| json_bool(j, "success")).unwrap_or(true);
    Ok(SyncRun { command, ok, seconds, peak_rss_kb, json })
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status"))).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The number after `"key":` in a flat JSON object (the CLI's `--json` lines).
fn json_number(json: &str, key: &str) -> Option<f64> {
    let value = json_value(json, key)?;
    let end = value.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(value.len());
    value[..end].parse().ok()
}

fn json_bool(json: &str, key: &str) -> Option<bool> {
    let value = json_value(json, key)?;
    if value.starts_with("true") {
        Some(true)
    } else if value.starts_with("false") {
        Some(false)
    } else {
        None
    }
}

fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let after = &json[json.find(&quoted)? + quoted.len()..];
    Some(after.trim_start().strip_prefix(':')?.trim_start())
}

fn print_table(results: &[SizeResult]) {
    let cell = |v: Option<f64>, precision: usize| match v {
        Some(v) => format!("{v:.precision$}"),
        None => "-".to_owned(),
    };
    println!();
    println!(
        "{:>10} {:>8} {:>8} {:>8} {:>9} {:>10} {:>12} {:>8} {:>10}",
        "rows", "load s", "copy s", "sync s", "sync/copy", "rows/s", "peak RSS MB", "incr s", "incr rows"
    );
    for r in results {
        let synced = r.full.field("items_synced").or(r.full.ok.then_some(r.rows as f64));
        println!(
            "{:>10} {:>8.1} {:>8.2} {:>8.2} {:>9} {:>10} {:>12} {:>8.2} {:>10}",
            r.rows,
            r.load_s,
            r.copy_s,
            r.full.seconds,
            cell(Some(r.full.seconds / r.copy_s.max(1e-9)), 1),
            cell(synced.map(|n| n / r.full.seconds.max(1e-9)), 0),
            cell(r.full.peak_rss_kb.map(|kb| kb as f64 / 1024.0), 1),
            r.incremental.seconds,
            cell(r.incremental.field("items_synced").or(Some(r.changed as f64)), 0),
        );
    }
    let phases: Vec<String> = results
        .iter()
        .flat_map(|r| [("full", r.rows, &r.full), ("incremental", r.rows, &r.incremental)])
        .filter_map(|(kind, rows, run)| {
            let parts: Vec<String> = PHASES
                .iter()
                .filter_map(|p| {
                    Some(format!("{} {:.2} s", p.trim_end_matches("_ms"), run.field(p)? / 1000.0))
                })
                .collect();
            (!parts.is_empty()).then(|| format!("  {kind} sync of {rows} rows: {}", parts.join(", ")))
        })
        .collect();
    if !phases.is_empty() {
        println!("where the time went (as the CLI reports it):");
        for line in phases {
            println!("{line}");
        }
    }
    println!(
        "copy = psql \\copy of the same columns ordered by (updated_at, id) to /dev/null; \
         peak RSS = the CLI's VmHWM; incr = sync after updating 1% of the rows"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_of_a_json_line() {
        let line = r#"{"connector_id":"bench","success":true,"items_synced":100000,"duration_ms": 1234.5,"errors":[]}"#;
        assert_eq!(json_number(line, "items_synced"), Some(100_000.0));
        assert_eq!(json_number(line, "duration_ms"), Some(1234.5));
        assert_eq!(json_bool(line, "success"), Some(true));
        assert_eq!(json_number(line, "read_ms"), None);
    }

    #[test]
    fn generated_rows_have_the_intended_shape() {
        let sql = fill_sql(10);
        assert!(sql.contains("generate_series(1, 10)"));
        assert_eq!(vocabulary(4000).len(), 4000);
        assert_eq!(vocabulary(50), vocabulary(50), "deterministic");
        assert!(sql.contains("(g / 1000)"));
    }
}
