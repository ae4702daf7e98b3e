//! A real PostgreSQL server for tests, started from the binaries installed on this machine.
//!
//! Most tests share one server and isolate themselves with a fresh database each:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use connector_testkit::PgServer;
//!
//! let pg = PgServer::shared().await?;
//! let db = pg.create_database("my_test").await?;
//! pg.execute_batch(&db, "CREATE TABLE t (id bigint PRIMARY KEY)").await?;
//! let url = pg.url(&db); // postgres://postgres:...@127.0.0.1:PORT/my_test_...
//! # Ok(())
//! # }
//! ```
//!
//! `cargo xtask test` starts one server for the whole run and passes it to every test process
//! through [`PORT_ENV`] and [`PASSWORD_ENV`]; without them (a plain `cargo test`), each test
//! process starts its own. Tests that stop or kill the server use [`PgServer::start`] instead,
//! and tests that need other server settings (TLS, for one) [`PgServer::start_with_options`] or
//! [`PgServer::start_with_files`].
//!
//! Every server started here is stopped and its files removed when its owner goes away: by `Drop`,
//! and by a small watchdog process when the owning process exits without running destructors
//! (a panic in a static, `kill -9`, a test timeout).
//!
//! TCP connections authenticate with scram-sha-256 as the superuser `postgres` with
//! [`PgServer::SUPERUSER_PASSWORD`]; the unix socket ([`PgServer::socket_dir`]) trusts everyone.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio::sync::OnceCell;

/// Port of a running server that [`PgServer::shared`] should use instead of starting one.
pub const PORT_ENV: &str = "CONNECTORS_TEST_PG_PORT";
/// Superuser password of the server named by [`PORT_ENV`] (default: [`PgServer::SUPERUSER_PASSWORD`]).
pub const PASSWORD_ENV: &str = "CONNECTORS_TEST_PG_PASSWORD";
/// Host of the server named by [`PORT_ENV`] (default: 127.0.0.1).
pub const HOST_ENV: &str = "CONNECTORS_TEST_PG_HOST";
/// Postmaster PID of the server named by [`PORT_ENV`], if known.
pub const PID_ENV: &str = "CONNECTORS_TEST_PG_PID";
/// Overrides the cache folder of the initdb template and the Python venv (default:
/// `~/.cache/connectors-test`).
pub const CACHE_ENV: &str = "CONNECTORS_TEST_CACHE";

/// Bump when the template's initdb options change, so stale templates are rebuilt.
const TEMPLATE_REVISION: &str = "1";
const HOST: &str = "127.0.0.1";
const START_ATTEMPTS: u32 = 5;

/// Server settings: logical WAL for replication tests, no durability (test data is thrown away).
const SERVER_SETTINGS: &[&str] = &[
    "wal_level=logical",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
    "shared_buffers=128MB",
];

static SHARED: OnceCell<PgServer> = OnceCell::const_new();

/// A running PostgreSQL server: either owned (started by this process, stopped on drop) or one
/// that `cargo xtask test` started and announced through the environment.
#[derive(Debug)]
pub struct PgServer {
    host: String,
    port: u16,
    password: String,
    pid: Option<u32>,
    owned: Option<Owned>,
    next_db: AtomicU64,
}

/// What an owned server needs to be stopped and cleaned up.
#[derive(Debug)]
struct Owned {
    bins: PgBinaries,
    as_postgres: bool,
    run_dir: PathBuf,
    watchdog: Option<Child>,
    /// Extra `-c name=value` settings, after [`SERVER_SETTINGS`].
    settings: Vec<(String, String)>,
}

impl Owned {
    fn data_dir(&self) -> PathBuf {
        self.run_dir.join("data")
    }
    fn socket_dir(&self) -> PathBuf {
        self.run_dir.join("sock")
    }
    fn log_file(&self) -> PathBuf {
        self.run_dir.join("server.log")
    }
    fn pg_ctl(&self) -> Command {
        self.bins.command("pg_ctl", self.as_postgres)
    }
}

impl PgServer {
    /// Password of the superuser `postgres` on servers started here.
    pub const SUPERUSER_PASSWORD: &'static str = "testkit-superuser-pw";
    /// The superuser's name.
    pub const SUPERUSER: &'static str = "postgres";

    /// The server shared by all tests of this process.
    ///
    /// Uses the server announced in [`PORT_ENV`] (and [`PASSWORD_ENV`], [`HOST_ENV`],
    /// [`PID_ENV`]) when set, as `cargo xtask test` does; otherwise starts one for this process,
    /// which its watchdog stops when the process exits.
    pub async fn shared() -> Result<&'static PgServer> {
        SHARED
            .get_or_try_init(|| async {
                if let Some(server) = Self::from_env()? {
                    return Ok(server);
                }
                tokio::task::spawn_blocking(Self::start).await.context("starting PostgreSQL panicked")?
            })
            .await
    }

    /// The server announced in the environment by `cargo xtask test`, if any.
    pub fn from_env() -> Result<Option<PgServer>> {
        let Some(port) = std::env::var_os(PORT_ENV) else { return Ok(None) };
        let port = port
            .to_str()
            .and_then(|p| p.parse::<u16>().ok())
            .with_context(|| format!("{PORT_ENV}={port:?} is not a port number"))?;
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(Some(PgServer {
            host: var(HOST_ENV).unwrap_or_else(|| HOST.to_owned()),
            port,
            password: var(PASSWORD_ENV).unwrap_or_else(|| Self::SUPERUSER_PASSWORD.to_owned()),
            pid: var(PID_ENV).and_then(|p| p.parse().ok()),
            owned: None,
            next_db: AtomicU64::new(0),
        }))
    }

    /// Starts a private server on a free port; it stops when the handle is dropped (or with
    /// [`stop`](Self::stop)), and at the latest when this process exits.
    ///
    /// Blocks for about half a second (a few seconds the first time on a machine, to run initdb).
    pub fn start() -> Result<PgServer> {
        Self::start_with_files(&[], &[])
    }

    /// Like [`start`](Self::start), with extra server settings, each passed as
    /// `-c name=value` after the testkit's own (so they win): e.g. `[("ssl", "on"),
    /// ("log_connections", "on")]`.
    pub fn start_with_options(settings: &[(&str, &str)]) -> Result<PgServer> {
        Self::start_with_files(settings, &[])
    }

    /// Like [`start_with_options`](Self::start_with_options), and first writes `files`
    /// (name, contents) into the server's data folder, owned by the user the server runs as and
    /// readable by it alone (mode 0600, as PostgreSQL wants for a TLS key). PostgreSQL resolves
    /// relative paths in settings against the data folder, so settings can name the files
    /// directly:
    ///
    /// ```no_run
    /// # fn example(cert: &[u8], key: &[u8]) -> anyhow::Result<()> {
    /// use connector_testkit::PgServer;
    ///
    /// let tls = PgServer::start_with_files(
    ///     &[("ssl", "on"), ("ssl_cert_file", "server.crt"), ("ssl_key_file", "server.key")],
    ///     &[("server.crt", cert), ("server.key", key)],
    /// )?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The files go away with the server. Names must be plain file names (no `/`).
    pub fn start_with_files(settings: &[(&str, &str)], files: &[(&str, &[u8])]) -> Result<PgServer> {
        for (name, _) in settings {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                bail!("server setting name {name:?}: expected letters, digits, `_` and `.`");
            }
        }
        for (name, _) in files {
            if name.is_empty() || name.contains('/') || *name == "." || *name == ".." {
                bail!("server file name {name:?}: expected a plain file name");
            }
        }
        let settings: Vec<(String, String)> =
            settings.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        let bins = PgBinaries::find()?;
        let as_postgres = running_as_root();
        let template = template(&bins, as_postgres)?;

        // Root runs the server as `postgres`, which cannot enter root's temp folders.
        let base = if as_postgres { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let run_dir = tempfile::Builder::new()
            .prefix("connectors-pg-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a folder for PostgreSQL under {}", base.display()))?
            .keep();
        let mut server = PgServer {
            host: HOST.to_owned(),
            port: 0,
            password: Self::SUPERUSER_PASSWORD.to_owned(),
            pid: None,
            owned: Some(Owned { bins, as_postgres, run_dir, watchdog: None, settings }),
            next_db: AtomicU64::new(0),
        };
        // From here on, an error drops `server`, which removes the folder.
        let owned = server.owned.as_mut().expect("just set");
        owned.watchdog = Some(spawn_watchdog(owned)?);
        run(Command::new("cp").arg("-a").arg(&template).arg(owned.data_dir()), "copying the template")?;
        fs::create_dir(owned.socket_dir())?;
        for (name, contents) in files {
            let path = owned.data_dir().join(name);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(contents).with_context(|| format!("writing {}", path.display()))?;
        }
        if as_postgres {
            chown_postgres(&owned.run_dir)?;
        }

        let mut attempt = 1;
        loop {
            let port = free_port()?;
            match start_postmaster(owned, port) {
                Ok(()) => {
                    server.port = port;
                    break;
                }
                Err(err) if attempt < START_ATTEMPTS && port_taken(owned) => {
                    tracing::debug!("port {port} was taken before PostgreSQL bound it ({err:#}); retrying");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
        server.pid = read_postmaster_pid(&owned.data_dir());
        Ok(server)
    }

    /// Stops an owned server and removes its files. Does nothing for a server from the environment.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(mut owned) = self.owned.take() else { return Ok(()) };
        if let Some(mut watchdog) = owned.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let mut result = Ok(());
        if owned.data_dir().join("postmaster.pid").exists() {
            let mut stop = owned.pg_ctl();
            stop.arg("-D").arg(owned.data_dir()).args(["-m", "fast", "-w", "-t", "60", "stop"]);
            if let Err(err) = run(&mut stop, "stopping PostgreSQL") {
                // A test may have killed the postmaster itself; that is not an error here.
                if self.pid.is_some_and(process_alive) {
                    result = Err(err);
                }
            }
        }
        if let Err(err) = fs::remove_dir_all(&owned.run_dir)
            && result.is_ok()
            && err.kind() != std::io::ErrorKind::NotFound
        {
            result = Err(err).with_context(|| format!("removing {}", owned.run_dir.display()));
        }
        result
    }

    /// `127.0.0.1`, or the host from [`HOST_ENV`].
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The postmaster's process id, when known (always for an owned server).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The unix socket folder of an owned server (connections there need no password).
    pub fn socket_dir(&self) -> Option<PathBuf> {
        self.owned.as_ref().map(Owned::socket_dir)
    }

    /// The data folder of an owned server.
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.owned.as_ref().map(Owned::data_dir)
    }

    /// The server log of an owned server.
    pub fn log_file(&self) -> Option<PathBuf> {
        self.owned.as_ref().map(Owned::log_file)
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}:{}@{}:{}/{db}", Self::SUPERUSER, self.password, self.host, self.port)
    }

    /// The variables that let child processes use this server through [`PgServer::shared`].
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (PORT_ENV, self.port.to_string()),
            (PASSWORD_ENV, self.password.clone()),
            (HOST_ENV, self.host.clone()),
        ];
        if let Some(pid) = self.pid {
            vars.push((PID_ENV, pid.to_string()));
        }
        vars
    }

    /// Creates a database with a name unique to this call, starting with `prefix`, and returns
    /// the name.
    pub async fn create_database(&self, prefix: &str) -> Result<String> {
        let name = self.unique_database_name(prefix);
        let client = self.client("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(name)
    }

    fn unique_database_name(&self, prefix: &str) -> String {
        let mut name: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(32)
            .collect();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            name.insert(0, 'd');
        }
        // Several processes share a server, and process ids get reused within a run.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        format!("{name}_{}_{n}_{nanos:x}", std::process::id())
    }

    /// A connection for test setup, as the superuser; its connection task runs on the current
    /// tokio runtime.
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host(&self.host)
            .port(self.port)
            .user(Self::SUPERUSER)
            .password(&self.password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}:{}/{db}", self.host, self.port))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!("test connection closed: {err}");
            }
        });
        Ok(client)
    }

    /// Runs SQL statements (separated by `;`) in `db`.
    pub async fn execute_batch(&self, db: &str, sql: &str) -> Result<()> {
        self.client(db).await?.batch_execute(sql).await.with_context(|| format!("running SQL in {db}"))
    }

    /// A `psql` command connected to `db` over TCP (`-X -q -v ON_ERROR_STOP=1`, password in
    /// `PGPASSWORD`), to which the caller adds arguments.
    pub fn psql_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(psql_path());
        cmd.env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", Self::SUPERUSER, "-d", db]);
        cmd
    }

    /// Runs `psql` on `db` with `args` (e.g. `["-c", "SELECT 1"]`) and returns its standard output.
    pub fn psql<I, S>(&self, db: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = run(self.psql_command(db).args(args), "psql")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs an SQL script (which may contain `COPY ... FROM STDIN` data) through `psql` on `db`
    /// and returns its standard output.
    pub fn psql_script(&self, db: &str, script: &str) -> Result<String> {
        let mut cmd = self.psql_command(db);
        cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running psql")?;
        let mut stdin = child.stdin.take().expect("piped");
        let script = script.to_owned();
        // Write from another thread: psql may fill its output pipe before reading all input.
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let output = child.wait_with_output().context("running psql")?;
        let written = writer.join().expect("psql stdin writer panicked");
        check_output("psql", &output)?;
        written.context("writing the script to psql")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("connector-testkit: stopping PostgreSQL on port {}: {err:#}", self.port);
        }
    }
}

/// The PostgreSQL server programs of one installation.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    /// The folder holding `initdb`, `pg_ctl` and `postgres`.
    pub dir: PathBuf,
    /// The major version, e.g. 15.
    pub major: u32,
}

impl PgBinaries {
    /// The highest version in `/usr/lib/postgresql/*/bin` (Debian), else `initdb` and `pg_ctl` on
    /// `PATH`.
    pub fn find() -> Result<PgBinaries> {
        let mut best: Option<PgBinaries> = None;
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let Some(major) = entry.file_name().to_str().and_then(|v| v.parse::<u32>().ok()) else {
                    continue;
                };
                let dir = entry.path().join("bin");
                if dir.join("initdb").is_file()
                    && dir.join("pg_ctl").is_file()
                    && best.as_ref().is_none_or(|b| major > b.major)
                {
                    best = Some(PgBinaries { dir, major });
                }
            }
        }
        if let Some(best) = best {
            return Ok(best);
        }
        if let Some(dir) = find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
            && dir.join("pg_ctl").is_file()
        {
            let output = run(Command::new(dir.join("pg_ctl")).arg("--version"), "pg_ctl --version")?;
            // "pg_ctl (PostgreSQL) 15.14"
            let text = String::from_utf8_lossy(&output.stdout);
            let major = text
                .rsplit(' ')
                .next()
                .and_then(|v| v.trim().split(['.', 'b', 'r']).next()?.parse().ok())
                .with_context(|| format!("unexpected `pg_ctl --version` output: {text}"))?;
            return Ok(PgBinaries { dir, major });
        }
        bail!(
            "PostgreSQL server programs (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH; \
             run `cargo xtask test`, which installs them (apt-get install postgresql)"
        )
    }

    /// The path of one program, e.g. `pg_ctl`.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A command running `name`, as the `postgres` user when `as_postgres`.
    fn command(&self, name: &str, as_postgres: bool) -> Command {
        let mut cmd = if as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(self.tool(name));
            cmd
        } else {
            Command::new(self.tool(name))
        };
        // The server programs need a current folder they can enter, and English messages.
        cmd.current_dir("/").env("LC_ALL", "C").env_remove("PGDATA");
        cmd
    }
}

/// Runs initdb once per version and user into the cache folder, under a file lock so parallel
/// test processes don't race, and returns the template data folder to copy.
fn template(bins: &PgBinaries, as_postgres: bool) -> Result<PathBuf> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let name = format!("pg-template-{}", bins.major);
    let template = cache.join(&name);
    let stamp_file = cache.join(format!("{name}.stamp"));
    let stamp = format!("revision {TEMPLATE_REVISION}; {}\n", bins.dir.display());

    let lock_path = cache.join(format!("{name}.lock"));
    let lock = File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;

    if template.join("PG_VERSION").is_file() && fs::read_to_string(&stamp_file).ok() == Some(stamp.clone()) {
        return Ok(template);
    }
    let _ = fs::remove_file(&stamp_file);
    if template.exists() {
        fs::remove_dir_all(&template).with_context(|| format!("removing {}", template.display()))?;
    }

    let started = Instant::now();
    // `postgres` cannot write into root's home: run initdb under /tmp, then copy.
    let staging_base = if as_postgres { PathBuf::from("/tmp") } else { cache.clone() };
    let staging = tempfile::Builder::new()
        .prefix("connectors-pg-initdb-")
        .tempdir_in(&staging_base)
        .with_context(|| format!("creating a folder under {}", staging_base.display()))?;
    let pwfile = staging.path().join("pwfile");
    fs::write(&pwfile, format!("{}\n", PgServer::SUPERUSER_PASSWORD))?;
    let data = staging.path().join("data");
    if as_postgres {
        chown_postgres(staging.path())?;
    }
    let mut initdb = bins.command("initdb", as_postgres);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", PgServer::SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()));
    run(&mut initdb, "initdb")?;

    let partial = cache.join(format!("{name}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("cp").arg("-a").arg(&data).arg(&partial), "copying the new template")?;
    fs::rename(&partial, &template).with_context(|| format!("renaming to {}", template.display()))?;
    fs::write(&stamp_file, stamp)?;
    tracing::info!("initdb template {} made in {:.1?}", template.display(), started.elapsed());
    Ok(template)
}

/// The cache folder: [`CACHE_ENV`], else `~/.cache/connectors-test`.
pub(crate) fn cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var(CACHE_ENV) {
        return dir;
    }
    let base = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|home| home.join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("connectors-test")
}

/// A process that stops the server and removes its folder once this process is gone, however it
/// ended. It runs in its own process group so Ctrl-C and test-runner timeouts don't take it along.
fn spawn_watchdog(owned: &Owned) -> Result<Child> {
    const SCRIPT: &str = r#"
        parent=$1 run=$2 pg_ctl=$3 as_postgres=$4
        while kill -0 "$parent" 2>/dev/null; do sleep 1; done
        if [ "$as_postgres" = 1 ]; then
            runuser -u postgres -- "$pg_ctl" -D "$run/data" -m immediate stop
        else
            "$pg_ctl" -D "$run/data" -m immediate stop
        fi >/dev/null 2>&1
        rm -rf "$run"
    "#;
    let pg_ctl = owned.bins.tool("pg_ctl");
    let args = [
        owned.run_dir.as_os_str(),
        pg_ctl.as_os_str(),
        OsStr::new(if owned.as_postgres { "1" } else { "0" }),
    ];
    run_watchdog("connectors-pg-watchdog", SCRIPT, &args).context("spawning the PostgreSQL watchdog (sh)")
}

/// Runs a watchdog `script` with `sh -c`: `$1` is this process's pid, then `args`. Detached
/// from the test process (own process group, no stdio, working directory `/`).
pub(crate) fn run_watchdog(name: &str, script: &str, args: &[&OsStr]) -> std::io::Result<Child> {
    Command::new("sh")
        .args(["-c", script, name])
        .arg(std::process::id().to_string())
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

fn start_postmaster(owned: &Owned, port: u16) -> Result<()> {
    let _ = fs::remove_file(owned.log_file());
    let mut options = format!("-c listen_addresses={HOST} -p {port} -k '{}'", owned.socket_dir().display());
    for setting in SERVER_SETTINGS {
        options.push_str(" -c ");
        options.push_str(setting);
    }
    // pg_ctl hands the options to a shell: quote each extra setting as one word.
    for (name, value) in &owned.settings {
        options.push_str(" -c ");
        options.push_str(&shell_quote(&format!("{name}={value}")));
    }
    let mut start = owned.pg_ctl();
    start
        .arg("-D")
        .arg(owned.data_dir())
        .arg("-l")
        .arg(owned.log_file())
        .args(["-w", "-t", "60", "-o", &options, "start"]);
    run(&mut start, "starting PostgreSQL (pg_ctl start)").map(drop).map_err(|err| {
        let log = fs::read_to_string(owned.log_file()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        err.context(format!("server log {}:\n{}", owned.log_file().display(), tail.join("\n")))
    })
}

/// `text` as one single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn port_taken(owned: &Owned) -> bool {
    let log = fs::read_to_string(owned.log_file()).unwrap_or_default();
    log.contains("could not bind") || log.contains("Address already in use")
}

pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(data_dir.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

/// Running and not a zombie (PID 1 of a container may not reap orphans).
fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// Whether this process runs as root (then the server runs as the `postgres` user).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user; `id -u` where there is no /proc.
    match fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0"),
    }
}

fn chown_postgres(path: &Path) -> Result<()> {
    run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path), "chown to the postgres user")
        .map(drop)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

fn psql_path() -> PathBuf {
    PgBinaries::find()
        .map(|bins| bins.tool("psql"))
        .ok()
        .filter(|p| p.is_file())
        .or_else(|| find_on_path("psql"))
        .unwrap_or_else(|| PathBuf::from("psql"))
}

/// Runs a command to completion, failing with its output when it exits non-zero.
fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not run {:?}", cmd.get_program()))?;
    check_output(what, &output)?;
    Ok(output)
}

fn check_output(what: &str, output: &Output) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    bail!("{what} failed ({}):\n{}{}", output.status, stderr.trim_end(), stdout.trim_end())
}

/// The setup guide's notification function and trigger ("LISTEN/NOTIFY Setup"), verbatim: the
/// `documents` table notifies channel `document_changes` with `{table, operation, id}`.
pub const GUIDE_NOTIFY_TRIGGER: &str = r#"
CREATE OR REPLACE FUNCTION notify_document_changes()
RETURNS TRIGGER AS $$
BEGIN
  PERFORM pg_notify(
    'document_changes',
    json_build_object(
      'table', TG_TABLE_NAME,
      'operation', TG_OP,
      'id', COALESCE(NEW.id, OLD.id)
    )::text
  );
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER documents_notify_trigger
AFTER INSERT OR UPDATE OR DELETE ON documents
FOR EACH ROW EXECUTE FUNCTION notify_document_changes();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_unique_and_valid() {
        let server = PgServer {
            host: HOST.into(),
            port: 1,
            password: String::new(),
            pid: None,
            owned: None,
            next_db: AtomicU64::new(0),
        };
        let a = server.unique_database_name("My Test-Case");
        let b = server.unique_database_name("My Test-Case");
        assert_ne!(a, b);
        assert!(a.starts_with("my_test_case_"), "{a}");
        let long = server.unique_database_name(&"x".repeat(200));
        assert!(long.len() <= 63, "{long} is longer than PostgreSQL's 63-byte limit");
        assert!(server.unique_database_name("9lives").starts_with("d9lives_"));
    }

    #[test]
    fn settings_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("ssl=on"), "'ssl=on'");
        assert_eq!(shell_quote("cluster_name=it's"), r"'cluster_name=it'\''s'");
        let out = Command::new("sh")
            .args(["-c", &format!("printf %s {}", shell_quote("a b'c$HOME\"d"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b'c$HOME\"d");
    }
}
