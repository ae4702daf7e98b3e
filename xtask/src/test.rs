//! `cargo xtask test [-- NEXTEST-ARGS]`: install what the tests need, start one PostgreSQL for the
//! whole run, run every test with nextest (or `cargo test` without it), then the doc tests.
//!
//! Test servers written in Python (moto) live in one venv in the cache folder
//! (`~/.cache/connectors-test/venv`): created and filled once, reused by later runs, and passed to
//! the tests in `CONNECTORS_TEST_VENV`.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use connector_testkit::PgServer;
use connector_testkit::moto::{self, MOTO_REQUIREMENT};
use connector_testkit::postgres::{PgBinaries, running_as_root};

use crate::util::{self, cargo, say};

pub fn run(mut args: Vec<String>) -> Result<()> {
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    let runner = prerequisites()?;
    let server = start_server()?;
    let tests = run_tests(&server, runner, &args);
    let docs = run_doc_tests(&server);
    say("stopping PostgreSQL");
    let stopped = server.stop();
    let total = tests?.merge(docs?);
    total.print();
    stopped.context("stopping PostgreSQL")?;
    if !total.ok {
        bail!("tests failed");
    }
    Ok(())
}

/// How the tests run: nextest when it is installed or installable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    Nextest,
    CargoTest,
}

/// PostgreSQL's server programs, moto and cargo-nextest, installed when missing.
pub fn prerequisites() -> Result<Runner> {
    ensure_postgres()?;
    ensure_moto()?;
    Ok(ensure_nextest())
}

/// Installs PostgreSQL with apt-get when no server programs are found.
pub fn ensure_postgres() -> Result<()> {
    if let Ok(bins) = PgBinaries::find() {
        say(format!("PostgreSQL {} found in {}", bins.major, bins.dir.display()));
        return Ok(());
    }
    say("PostgreSQL not found: installing it with apt-get");
    if running_as_root() {
        // The package would create and start a cluster on port 5432 that nothing here uses.
        let conf = std::path::Path::new("/etc/postgresql-common/createcluster.conf");
        if !conf.exists() {
            std::fs::create_dir_all(conf.parent().unwrap())?;
            std::fs::write(conf, "create_main_cluster = false\n")?;
        }
    }
    apt_install(&["postgresql"])?;
    let bins = PgBinaries::find().context("apt-get installed postgresql, but its programs are not found")?;
    say(format!("PostgreSQL {} installed in {}", bins.major, bins.dir.display()));
    Ok(())
}

/// The venv with moto (`moto_server`, a local AWS Secrets Manager): reused when it holds the pinned
/// version, else created with `python3 -m venv` (if needed) and filled with pip.
pub fn ensure_moto() -> Result<()> {
    let venv = moto::venv_dir();
    if moto::moto_installed(&venv) {
        say(format!("moto found in {} ({MOTO_REQUIREMENT})", venv.display()));
        return Ok(());
    }
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        say(format!("creating a Python venv for the test servers in {}", venv.display()));
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv);
        if !util::on_path("python3") || !util::status(&mut create).is_ok_and(|s| s.success()) {
            // Debian's python3 comes without the venv module.
            say("python3 or its venv module is missing: installing them with apt-get");
            apt_install(&["python3", "python3-venv"])?;
            let _ = std::fs::remove_dir_all(&venv);
            util::run(&mut create)?;
        }
    }
    say(format!("installing {MOTO_REQUIREMENT} into {} (a few minutes the first time)", venv.display()));
    util::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(MOTO_REQUIREMENT),
    )
    .with_context(|| format!("if the venv is broken, remove {} and run again", venv.display()))?;
    if !moto::moto_server_path(&venv).is_file() {
        bail!("pip installed {MOTO_REQUIREMENT}, but {} is missing", moto::moto_server_path(&venv).display());
    }
    let stamp = venv.join(moto::INSTALLED_STAMP);
    std::fs::write(&stamp, format!("{MOTO_REQUIREMENT}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    say(format!("moto installed in {}", venv.display()));
    Ok(())
}

/// `apt-get install` as root, or through sudo.
fn apt_install(packages: &[&str]) -> Result<()> {
    let sudo = if running_as_root() {
        false
    } else if util::on_path("sudo") {
        true
    } else {
        bail!("this user cannot install packages: run `apt-get install {}` as root", packages.join(" "));
    };
    let apt = |args: &[&str]| {
        let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    util::run(&mut apt(&["update", "-q"]))?;
    util::run(apt(&["install", "-y", "-q"]).args(packages))
}

/// Whether cargo-nextest is there, installing it when missing.
pub fn ensure_nextest() -> Runner {
    if util::succeeds(cargo().args(["nextest", "--version"])) {
        return Runner::Nextest;
    }
    say("cargo-nextest not found: installing it");
    match util::status(cargo().args(["install", "cargo-nextest", "--locked"])) {
        Ok(status) if status.success() => Runner::Nextest,
        _ => {
            say("could not install cargo-nextest: falling back to `cargo test`");
            Runner::CargoTest
        }
    }
}

/// The PostgreSQL shared by every test process of the run.
pub fn start_server() -> Result<PgServer> {
    say("starting PostgreSQL for the test run");
    let server = PgServer::start().context("starting PostgreSQL")?;
    say(format!(
        "PostgreSQL listens on {}:{} (pid {})",
        server.host(),
        server.port(),
        server.pid().unwrap_or(0)
    ));
    Ok(server)
}

/// Unit and integration tests of the whole workspace.
pub fn run_tests(server: &PgServer, runner: Runner, extra: &[String]) -> Result<Tally> {
    let mut cmd = cargo();
    match runner {
        Runner::Nextest => cmd.args(["nextest", "run", "--workspace", "--all-features", "--no-fail-fast"]),
        Runner::CargoTest => cmd.args(["test", "--workspace", "--all-features", "--no-fail-fast"]),
    };
    cmd.args(extra);
    run_tallied(cmd, server)
}

/// Doc tests (nextest does not run them).
pub fn run_doc_tests(server: &PgServer) -> Result<Tally> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-features", "--doc"]);
    run_tallied(cmd, server)
}

/// Runs a test command with the server in its environment, passing its output through while
/// counting what the runner reports.
fn run_tallied(mut cmd: Command, server: &PgServer) -> Result<Tally> {
    cmd.envs(server.env_vars());
    // The venv `ensure_moto` filled (the same path unless the variable was set already).
    cmd.env(moto::VENV_ENV, moto::venv_dir());
    if std::io::stderr().is_terminal() {
        // Output goes through a pipe; keep the colours a terminal would get.
        cmd.env("CARGO_TERM_COLOR", "always");
    }
    println!("$ {}", util::display(&cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not run `{}`", util::display(&cmd)))?;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let from_stderr = std::thread::spawn(move || pass_through(err, std::io::stderr()));
    let mut tally = pass_through(out, std::io::stdout());
    tally = tally.merge(from_stderr.join().expect("output thread panicked"));
    let status = child.wait()?;
    tally.ok = status.success();
    Ok(tally)
}

fn pass_through(from: impl Read, mut to: impl Write) -> Tally {
    let mut tally = Tally { ok: true, ..Tally::default() };
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        let _ = to.write_all(&line);
        let _ = to.flush();
        tally.count_line(&String::from_utf8_lossy(&line));
        line.clear();
    }
    tally
}

/// Test counts as the runners report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub ok: bool,
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Tally {
    /// Adds the counts of a runner's closing line: nextest's `Summary [..] 5 tests run: 4 passed,
    /// 1 failed, 2 skipped` or libtest's `test result: ok. 4 passed; 0 failed; 1 ignored; ...`.
    fn count_line(&mut self, line: &str) {
        let line = strip_ansi(line);
        let line = line.trim_start();
        if !(line.starts_with("Summary [") || line.starts_with("test result:")) {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let Ok(n) = pair[0].parse::<u64>() else { continue };
            match pair[1].trim_end_matches([',', ';']) {
                "passed" => self.passed += n,
                "failed" | "timed" => self.failed += n,
                "skipped" | "ignored" => self.skipped += n,
                _ => {}
            }
        }
    }

    pub fn merge(self, other: Tally) -> Tally {
        Tally {
            ok: self.ok && other.ok,
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            skipped: self.skipped + other.skipped,
        }
    }

    /// The closing line, in the plain form any CI reader understands.
    pub fn print(&self) {
        println!("tests: {} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped);
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences: ESC [ parameters final-byte
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(lines: &[&str]) -> Tally {
        let mut t = Tally::default();
        for line in lines {
            t.count_line(line);
        }
        t
    }

    #[test]
    fn counts_nextest_and_libtest_closing_lines() {
        let t = tally(&[
            "     Summary [   3.123s] 12 tests run: 10 passed (1 slow), 1 failed, 1 timed out, 3 skipped",
            "test result: ok. 4 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            "        PASS [   0.010s] connector-core tests::passed",
            "running 3 tests",
        ]);
        assert_eq!((t.passed, t.failed, t.skipped), (15, 4, 5));
    }

    #[test]
    fn ignores_colours() {
        let t = tally(&[
            "\u{1b}[32;1m     Summary\u{1b}[0m [   0.5s] 1 test run: \u{1b}[32;1m1 passed\u{1b}[0m, 0 skipped",
        ]);
        assert_eq!((t.passed, t.failed), (1, 0));
    }
}
