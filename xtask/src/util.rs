//! Small helpers shared by the tasks: paths, running commands, arguments.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// The workspace root (the folder above `xtask/`).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Cargo's target folder: `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}

/// `cargo` (the one that runs xtask), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// One short line about what xtask is doing.
pub fn say(message: impl std::fmt::Display) {
    println!("xtask: {message}");
}

/// A command as a person would type it.
pub fn display(cmd: &Command) -> String {
    // `cargo` rather than the toolchain path in $CARGO.
    let program = match std::env::var_os("CARGO") {
        Some(cargo) if cargo == cmd.get_program() => OsStr::new("cargo"),
        _ => cmd.get_program(),
    };
    let mut words = vec![quote(program)];
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain =
        !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { word.into_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Prints the command, runs it with this process's terminal and returns how it ended.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    println!("$ {}", display(cmd));
    cmd.status().with_context(|| format!("could not run `{}`", display(cmd)))
}

/// Like [`status`], failing unless the command succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Whether a command runs and succeeds; prints nothing.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Removes and returns the value of `--name VALUE` or `--name=VALUE`.
pub fn take_option(args: &mut Vec<String>, name: &str) -> Result<Option<String>> {
    let prefix = format!("{name}=");
    if let Some(i) = args.iter().position(|a| a.starts_with(&prefix)) {
        return Ok(Some(args.remove(i)[prefix.len()..].to_owned()));
    }
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(None) };
    if i + 1 >= args.len() {
        bail!("{name} needs a value");
    }
    args.remove(i);
    Ok(Some(args.remove(i)))
}

/// Removes `--name` and says whether it was there.
pub fn take_flag(args: &mut Vec<String>, name: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != name);
    args.len() != before
}

/// Fails on arguments a task did not use.
pub fn no_more_args(task: &str, args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("unexpected argument `{arg}` for `cargo xtask {task}` (see `cargo xtask --help`)");
    }
    Ok(())
}

/// A count such as `1000000`, `1_000_000`, `1,000,000`, `100k` or `1m`.
pub fn parse_count(text: &str) -> Result<u64> {
    let clean: String = text.chars().filter(|c| !matches!(c, '_' | ',')).collect::<String>().to_lowercase();
    let (digits, factor) = match clean.strip_suffix('k') {
        Some(d) => (d, 1_000),
        None => match clean.strip_suffix('m') {
            Some(d) => (d, 1_000_000),
            None => (clean.as_str(), 1),
        },
    };
    digits.parse::<u64>().map(|n| n * factor).with_context(|| format!("`{text}` is not a count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(parse_count("1,000,000").unwrap(), 1_000_000);
        assert_eq!(parse_count("100k").unwrap(), 100_000);
        assert_eq!(parse_count("2M").unwrap(), 2_000_000);
        assert!(parse_count("lots").is_err());
    }

    #[test]
    fn options() {
        let mut args: Vec<String> = ["--rows", "5", "--keep", "--x=1"].map(String::from).to_vec();
        assert_eq!(take_option(&mut args, "--rows").unwrap().as_deref(), Some("5"));
        assert_eq!(take_option(&mut args, "--x").unwrap().as_deref(), Some("1"));
        assert!(take_flag(&mut args, "--keep"));
        assert!(args.is_empty());
        assert!(take_option(&mut vec!["--rows".into()], "--rows").is_err());
    }

    #[test]
    fn commands_display_with_quotes() {
        let mut cmd = Command::new("connectors");
        cmd.args(["search", "two words", "--tenant", "demo"]);
        assert_eq!(display(&cmd), "connectors search 'two words' --tenant demo");
    }
}
