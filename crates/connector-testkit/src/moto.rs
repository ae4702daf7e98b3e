//! moto, a local stand-in for AWS services (here: Secrets Manager), as a server for tests.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use connector_testkit::MotoServer;
//!
//! let moto = MotoServer::shared().await?;
//! let endpoint = moto.endpoint(); // http://127.0.0.1:PORT, for `endpoint_url`
//! # Ok(())
//! # }
//! ```
//!
//! `moto_server` runs from a Python virtual environment, by default `~/.cache/connectors-test/venv`
//! (see [`venv_dir`]; [`VENV_ENV`] names another). `cargo xtask test` creates it and installs
//! [`MOTO_REQUIREMENT`] when missing, and passes its location to the tests in [`VENV_ENV`].
//!
//! moto keeps all state in memory, accepts any credentials and does not check signatures (use
//! [`MotoServer::ACCESS_KEY_ID`] and [`MotoServer::SECRET_ACCESS_KEY`]); its account id is always
//! [`MotoServer::ACCOUNT_ID`]. Tests that share a server keep apart by their secret names.
//!
//! Every server started here is killed when its owner goes away: by `Drop`, and by a small
//! watchdog process when the owning process exits without running destructors.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::OnceCell;

use crate::postgres::{cache_dir, free_port};

/// The Python virtual environment that holds `moto_server` (default: `venv` in the cache folder,
/// `~/.cache/connectors-test/venv`).
pub const VENV_ENV: &str = "CONNECTORS_TEST_VENV";
/// What `cargo xtask test` installs into the venv with pip.
pub const MOTO_REQUIREMENT: &str = "moto[server]==5.2.5";
/// The file in the venv that records what was installed ([`MOTO_REQUIREMENT`]), written after a
/// successful install.
pub const INSTALLED_STAMP: &str = "connectors-test-installed.txt";

const HOST: &str = "127.0.0.1";
const START_ATTEMPTS: u32 = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

static SHARED: OnceCell<MotoServer> = OnceCell::const_new();

/// The venv with the test servers written in Python: [`VENV_ENV`], else `venv` in the cache
/// folder (`$CONNECTORS_TEST_CACHE`, else `~/.cache/connectors-test`).
pub fn venv_dir() -> PathBuf {
    match std::env::var_os(VENV_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("venv"),
    }
}

/// `moto_server` in `venv`.
pub fn moto_server_path(venv: &Path) -> PathBuf {
    venv.join("bin").join("moto_server")
}

/// Whether `venv` holds `moto_server` installed with [`MOTO_REQUIREMENT`] (per its stamp file).
pub fn moto_installed(venv: &Path) -> bool {
    moto_server_path(venv).is_file()
        && fs::read_to_string(venv.join(INSTALLED_STAMP))
            .is_ok_and(|s| s.lines().any(|l| l == MOTO_REQUIREMENT))
}

/// A running `moto_server`, killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    port: u16,
    endpoint: String,
    child: Option<Child>,
    watchdog: Option<Child>,
    run_dir: PathBuf,
}

impl MotoServer {
    /// An access key id moto accepts (it accepts any).
    pub const ACCESS_KEY_ID: &'static str = "testing";
    /// A secret access key moto accepts (it accepts any, and checks no signature).
    pub const SECRET_ACCESS_KEY: &'static str = "testing";
    /// The region the tests use (moto serves every region, each with its own secrets).
    pub const REGION: &'static str = "us-east-1";
    /// moto's account id, in every ARN it returns.
    pub const ACCOUNT_ID: &'static str = "123456789012";

    /// The server shared by all tests of this process, started on first use; the watchdog kills
    /// it when the process exits.
    pub async fn shared() -> Result<&'static MotoServer> {
        SHARED
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(Self::start).await.context("starting moto panicked")?
            })
            .await
    }

    /// Starts a private server on a free port and waits until it answers (about a second, a few
    /// on a busy machine). It is killed when the handle is dropped, and at the latest when this
    /// process exits.
    pub fn start() -> Result<MotoServer> {
        let venv = venv_dir();
        let program = moto_server_path(&venv);
        if !program.is_file() {
            bail!(
                "moto_server not found at {}: run `cargo xtask test`, which installs it \
                 (or by hand: python3 -m venv {venv} && {venv}/bin/pip install '{MOTO_REQUIREMENT}'); \
                 {VENV_ENV} names another venv",
                program.display(),
                venv = venv.display(),
            );
        }
        let run_dir = tempfile::Builder::new()
            .prefix("connectors-moto-")
            .tempdir()
            .context("creating a folder for moto")?
            .keep();
        let mut server =
            MotoServer { port: 0, endpoint: String::new(), child: None, watchdog: None, run_dir };
        // From here on, an error drops `server`, which kills what was started and removes the folder.
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            match server.spawn(&program, port) {
                Ok(()) => break,
                Err(err) if attempt < START_ATTEMPTS && server.log().contains("Address already in use") => {
                    tracing::debug!("port {port} was taken before moto bound it ({err:#}); retrying");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(server)
    }

    fn spawn(&mut self, program: &Path, port: u16) -> Result<()> {
        self.kill();
        let log_path = self.log_file();
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(program)
            .args(["-H", HOST, "-p", &port.to_string()])
            .current_dir(&self.run_dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {}", program.display()))?;
        let pid = child.id();
        self.child = Some(child);
        self.watchdog = Some(spawn_watchdog(pid, &self.run_dir)?);
        self.port = port;
        self.endpoint = format!("http://{HOST}:{port}");

        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("just set").try_wait()? {
                bail!(
                    "moto_server exited ({status}) before it answered; log {}:\n{}",
                    log_path.display(),
                    self.log_tail()
                );
            }
            if answers(port) {
                tracing::debug!("moto ready on port {port} in {:.1?}", started.elapsed());
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "moto_server did not answer on port {port} within {READY_TIMEOUT:?}; log {}:\n{}",
                    log_path.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`, the `endpoint_url` of SDK clients.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's output (one line per request).
    pub fn log_file(&self) -> PathBuf {
        self.run_dir.join("moto.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the server and removes its folder.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn kill(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn shutdown(&mut self) {
        self.kill();
        if let Err(err) = fs::remove_dir_all(&self.run_dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("connector-testkit: removing {}: {err}", self.run_dir.display());
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether an HTTP server answers on `port`.
fn answers(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /moto-api/ HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// A process that kills the server and removes its folder once this process is gone, however it
/// ended. It runs in its own process group so Ctrl-C and test-runner timeouts don't take it along.
fn spawn_watchdog(server_pid: u32, run_dir: &Path) -> Result<Child> {
    const SCRIPT: &str = r#"
        parent=$1 server=$2 run=$3
        while kill -0 "$parent" 2>/dev/null; do sleep 1; done
        kill -9 "$server" 2>/dev/null
        rm -rf "$run"
    "#;
    let pid = server_pid.to_string();
    crate::postgres::run_watchdog(
        "connectors-moto-watchdog",
        SCRIPT,
        &[OsStr::new(&pid), run_dir.as_os_str()],
    )
    .context("spawning the moto watchdog (sh)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_without_moto_is_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!moto_installed(dir.path()));
        fs::create_dir(dir.path().join("bin")).unwrap();
        fs::write(moto_server_path(dir.path()), "").unwrap();
        assert!(!moto_installed(dir.path()), "no stamp");
        fs::write(dir.path().join(INSTALLED_STAMP), "moto[server]==1.0\n").unwrap();
        assert!(!moto_installed(dir.path()), "another version");
        fs::write(dir.path().join(INSTALLED_STAMP), format!("{MOTO_REQUIREMENT}\n")).unwrap();
        assert!(moto_installed(dir.path()));
    }
}
