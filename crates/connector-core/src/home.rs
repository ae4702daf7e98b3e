//! `ARAGORA_HOME`: where the embedded store and the state files live by default.

use std::path::PathBuf;

/// `$ARAGORA_HOME`, or `~/.aragora` when unset.
pub fn aragora_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("ARAGORA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".aragora")
}

/// The default state directory: `$ARAGORA_HOME/sync_state`.
pub fn default_state_dir() -> PathBuf {
    aragora_home().join("sync_state")
}

/// The default embedded knowledge store: `$ARAGORA_HOME/knowledge.db`.
pub fn default_store_path() -> PathBuf {
    aragora_home().join("knowledge.db")
}
