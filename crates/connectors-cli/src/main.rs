//! `connectors`: sync enterprise sources into a tenant-namespaced knowledge store.
//!
//! Exit codes: 0 success; 1 a sync (or check) failed; 2 bad usage or configuration.

mod auth;
mod commands;
mod config;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    /// Bad usage or configuration (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self { code: 2, message: message.into() }
    }
    /// A failed operation (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Self { code: 1, message: message.into() }
    }
    /// Maps a core error: configuration problems are usage errors, the rest failures.
    pub fn from_core(context: &str, e: connector_core::Error) -> Self {
        let message = format!("{context}: {e}");
        if e.kind() == connector_core::ErrorKind::Config {
            Self::usage(message)
        } else {
            Self::failed(message)
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "connectors",
    version,
    about = "Incrementally sync enterprise sources into a knowledge store"
)]
struct Cli {
    /// Configuration file (default: $ARAGORA_CONFIG, else ./connectors.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sync connectors into the store.
    Sync(commands::SyncArgs),
    /// Show each connector's status.
    Status(commands::StatusArgs),
    /// Show past sync runs, newest first.
    History(commands::HistoryArgs),
    /// Full-text search within a tenant.
    Search(commands::SearchArgs),
    /// Export a tenant's documents as JSON Lines.
    Export(commands::ExportArgs),
    /// Show or reset a connector's sync state.
    State {
        #[command(subcommand)]
        action: commands::StateAction,
    },
    /// Check configuration, credentials and connectivity.
    Check(commands::CheckArgs),
    /// Authorize an OAuth2 vendor (gdrive, quickbooks, gusto, xero) and store its tokens.
    Auth(auth::AuthArgs),
    /// Run the service: schedules, webhooks, real-time feeds (until SIGINT/SIGTERM).
    Run(run::RunArgs),
}

/// Logs to stderr. `RUST_LOG` wins; else `ARAGORA_DEBUG` means debug; else warnings, plus
/// `connectors run`'s own info lines (one per run).
fn init_tracing(service: bool) {
    use tracing_subscriber::EnvFilter;
    let debug = std::env::var("ARAGORA_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0");
    let default = match (debug, service) {
        (true, _) => "debug",
        (false, true) => "warn,connectors=info",
        (false, false) => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(matches!(cli.command, Command::Run(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config_path = config::resolve_path(cli.config.as_deref());
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Sync(args) => commands::sync(&config_path, args).await,
            Command::Status(args) => commands::status(&config_path, args).await,
            Command::History(args) => commands::history(&config_path, args).await,
            Command::Search(args) => commands::search(&config_path, args).await,
            Command::Export(args) => commands::export(&config_path, args).await,
            Command::State { action } => commands::state(&config_path, action).await,
            Command::Check(args) => commands::check(&config_path, args).await,
            Command::Auth(args) => auth::auth(&config_path, args).await,
            Command::Run(args) => run::run(&config_path, args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
