//! `cargo xtask servers pg|moto`: a PostgreSQL, or moto (a local AWS Secrets Manager), for manual
//! work. Prints how to reach it and stops it on Enter; on Ctrl-C (or if xtask is killed) the
//! server's watchdog stops it within a second.

use anyhow::{Result, bail};
use connector_testkit::{MotoServer, PgServer};

use crate::util::{self, say};

pub fn run(mut args: Vec<String>) -> Result<()> {
    let server = match args.first().map(String::as_str) {
        Some(name @ ("pg" | "moto")) => name.to_owned(),
        Some(other) => bail!("unknown server `{other}`; available: pg, moto"),
        None => bail!("which server? `cargo xtask servers pg` or `cargo xtask servers moto`"),
    };
    args.remove(0);
    util::no_more_args(&format!("servers {server}"), &args)?;
    if server == "moto" {
        return moto();
    }

    say("starting PostgreSQL");
    let server = PgServer::start()?;
    let (host, port, password) = (server.host(), server.port(), server.password());
    println!();
    println!("PostgreSQL on {host}:{port} (pid {})", server.pid().unwrap_or(0));
    println!("  url:    {}", server.url("postgres"));
    println!("  psql:   PGPASSWORD={password} psql -h {host} -p {port} -U postgres postgres");
    if let Some(socket) = server.socket_dir() {
        println!("  socket: psql -h {} -p {port} -U postgres postgres   (no password)", socket.display());
    }
    if let Some(log) = server.log_file() {
        println!("  log:    {}", log.display());
    }
    println!();
    println!("# tests use it instead of starting their own:");
    let exports: Vec<String> = server.env_vars().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("export {}", exports.join(" "));
    println!("# the connectors CLI:");
    println!("export ARAGORA_POSTGRES_USER=postgres ARAGORA_POSTGRES_PASSWORD={password}");
    println!();
    wait_for_enter();
    say("stopping PostgreSQL");
    server.stop()
}

fn moto() -> Result<()> {
    crate::test::ensure_moto()?;
    say("starting moto");
    let server = MotoServer::start()?;
    let endpoint = server.endpoint();
    println!();
    println!("moto on {endpoint} (pid {})", server.pid().unwrap_or(0));
    println!("  log: {}", server.log_file().display());
    println!();
    println!("# the AWS CLI and SDKs (moto accepts any credentials):");
    println!(
        "export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_REGION={} AWS_ENDPOINT_URL_SECRETS_MANAGER={endpoint}",
        MotoServer::ACCESS_KEY_ID,
        MotoServer::SECRET_ACCESS_KEY,
        MotoServer::REGION
    );
    println!();
    wait_for_enter();
    say("stopping moto");
    server.stop();
    Ok(())
}

fn wait_for_enter() {
    say("press Enter (or Ctrl-C) to stop it");
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
        // No terminal (e.g. started in the background): run until killed; the watchdog cleans up.
        loop {
            std::thread::park();
        }
    }
}
