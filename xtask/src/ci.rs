//! `cargo xtask ci`: exactly what CI runs (`.ci/run`). Every step runs even after one fails, so
//! one run shows everything that is wrong; a table at the end says what took how long.
//!
//! clippy and the tests use the same features and profile (`--workspace --all-features`, dev), so
//! build scripts and proc macros compile once for both.

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::test::{self, Tally};
use crate::util::{self, cargo, say};

struct Step {
    name: &'static str,
    seconds: f64,
    outcome: Outcome,
}

enum Outcome {
    Ok,
    Failed(String),
    Skipped(&'static str),
}

#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Option<T> {
        say(format!("== {name}"));
        let started = Instant::now();
        let result = f();
        let seconds = started.elapsed().as_secs_f64();
        let (outcome, value) = match result {
            Ok(value) => (Outcome::Ok, Some(value)),
            Err(err) => {
                eprintln!("xtask: {name} failed: {err:#}");
                (Outcome::Failed(format!("{err:#}")), None)
            }
        };
        self.0.push(Step { name, seconds, outcome });
        value
    }

    fn command(&mut self, name: &'static str, mut cmd: Command) {
        self.time(name, || util::run(&mut cmd));
    }

    fn skipped(&mut self, name: &'static str, why: &'static str) {
        self.0.push(Step { name, seconds: 0.0, outcome: Outcome::Skipped(why) });
    }

    fn failed(&self) -> Vec<&'static str> {
        self.0.iter().filter(|s| matches!(s.outcome, Outcome::Failed(_))).map(|s| s.name).collect()
    }

    fn print(&self) {
        let total: f64 = self.0.iter().map(|s| s.seconds).sum();
        println!();
        println!("{:<24} {:>9}  result", "step", "seconds");
        for step in &self.0 {
            let result = match &step.outcome {
                Outcome::Ok => "ok".to_owned(),
                Outcome::Failed(why) => format!("FAILED: {}", why.lines().next().unwrap_or_default()),
                Outcome::Skipped(why) => format!("skipped: {why}"),
            };
            println!("{:<24} {:>9.1}  {result}", step.name, step.seconds);
        }
        println!("{:<24} {:>9.1}", "total", total);
    }
}

pub fn run(args: Vec<String>) -> Result<()> {
    util::no_more_args("ci", &args)?;
    let mut steps = Steps::default();

    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    steps.command("fmt", fmt);

    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"]);
    steps.command("clippy", clippy);

    if steps.time("cargo-deny install", ensure_cargo_deny).is_some() {
        let mut deny = cargo();
        deny.args(["deny", "check", "bans", "licenses", "sources"]);
        steps.command("cargo-deny", deny);
    }
    steps.skipped("cargo-deny advisories", "needs the advisory database from the network");

    let mut tally = Tally::default();
    if let Some(runner) = steps.time("test prerequisites", test::prerequisites)
        && let Some(server) = steps.time("postgres start", test::start_server)
    {
        steps.time("tests", || {
            let t = test::run_tests(&server, runner, &[])?;
            tally = tally.merge(t);
            passed(t)
        });
        steps.time("doc tests", || {
            let t = test::run_doc_tests(&server)?;
            tally = tally.merge(t);
            passed(t)
        });
        steps.time("postgres stop", || server.stop());
    }

    steps.print();
    tally.print();
    let failed = steps.failed();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn passed(tally: Tally) -> Result<()> {
    if !tally.ok {
        bail!("{} passed, {} failed", tally.passed, tally.failed);
    }
    Ok(())
}

fn ensure_cargo_deny() -> Result<()> {
    if util::succeeds(cargo().args(["deny", "--version"])) {
        return Ok(());
    }
    say("cargo-deny not found: installing it (a few minutes)");
    util::run(cargo().args(["install", "cargo-deny", "--locked"]))
}
