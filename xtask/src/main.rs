//! `cargo xtask <task>`: the project's automation, in Rust. This file only dispatches; each task
//! lives in its own module.

mod bench;
mod ci;
mod demo;
mod servers;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  test [-- NEXTEST-ARGS]   install what tests need (PostgreSQL, moto in ~/.cache/connectors-test/venv,
                           cargo-nextest), start one PostgreSQL for the run, run all tests (nextest)
                           and doc tests
  ci                       what CI runs (.ci/run): fmt, clippy, cargo-deny, then `test`
  demo [--rows N] [--keep] sync a generated documents table into the embedded store with the CLI
  bench pg [--rows N]      time a full and an incremental sync of N rows (default 1,000,000)
                           against `psql \\copy`, with peak memory
  bench scheduler [--seconds N] [--connectors N]
                           N connectors (default 10,000) on 1-second intervals for N seconds
                           (default 60): runs done, CPU, peak memory, lateness of runs
  bench webhooks [--seconds N] [--connections N]
                           signed GitHub deliveries to the webhook server on loopback for N seconds
                           (default 10, 32 connections): deliveries/s, latency, CPU
  servers pg|moto          start a PostgreSQL, or moto (a local AWS Secrets Manager), for manual
                           work; Enter or Ctrl-C stops it
";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let task = if args.is_empty() { String::new() } else { args.remove(0) };
    let result = match task.as_str() {
        "test" => test::run(args),
        "ci" => ci::run(args),
        "demo" => demo::run(args),
        "bench" => bench::run(args),
        "servers" => servers::run(args),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "" => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
        other => {
            eprint!("xtask: unknown task `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
