//! Include/exclude filters shared by every document connector.
//!
//! Patterns are gitignore-style and match a path relative to the connector's root (an S3
//! prefix, a repository root, a Drive folder):
//! - a pattern without `/` matches the file name at any depth (`*.md`, `*.min.js`);
//! - a pattern with `/` matches from the root (`archive/**`, `docs/*.md`); a leading `/` is
//!   allowed and ignored;
//! - `**` matches any number of directories.
//!
//! A path is kept when it matches some include pattern (or there are none) and no exclude
//! pattern.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::{Error, Result};

/// A compiled set of include and exclude patterns.
#[derive(Debug, Clone)]
pub struct PathFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

fn compile(option: &str, patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let trimmed = p.trim();
        if trimmed.is_empty() {
            return Err(Error::config(format!("{option}: empty pattern")));
        }
        let anchored = trimmed.contains('/');
        let body = trimmed.trim_start_matches('/');
        let body = body.strip_suffix('/').map(|d| format!("{d}/**")).unwrap_or_else(|| body.to_owned());
        let full = if anchored { body } else { format!("**/{body}") };
        let glob: Glob = GlobBuilder::new(&full)
            .literal_separator(true)
            .build()
            .map_err(|e| Error::config(format!("{option}: invalid pattern {p:?}: {e}")))?;
        b.add(glob);
    }
    b.build().map_err(|e| Error::config(format!("{option}: {e}")))
}

impl PathFilter {
    /// Compiles the patterns; errors name the option and the bad pattern.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self> {
        Ok(Self {
            include: if include.is_empty() { None } else { Some(compile("include_patterns", include)?) },
            exclude: compile("exclude_patterns", exclude)?,
        })
    }

    /// A filter that keeps everything.
    pub fn allow_all() -> Self {
        Self { include: None, exclude: GlobSet::empty() }
    }

    /// Whether `path` (relative, `/`-separated) is kept.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        if self.exclude.is_match(path) {
            return false;
        }
        self.include.as_ref().is_none_or(|inc| inc.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(inc: &[&str], exc: &[&str]) -> PathFilter {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        PathFilter::new(&s(inc), &s(exc)).unwrap()
    }

    #[test]
    fn gitignore_style_matching() {
        let filter = f(&["*.py", "*.md", "docs/*.txt"], &["node_modules/**", "*.min.js", "archive/**"]);
        let cases = [
            ("main.py", true),
            ("src/deep/mod.py", true),
            ("README.md", true),
            ("docs/a.txt", true),
            ("other/docs/a.txt", false),
            ("docs/sub/a.txt", false),
            ("node_modules/x/y.md", false),
            ("archive/old.md", false),
            ("src/archive/old.md", true),
            ("app.min.js", false),
            ("app.js", false),
        ];
        for (path, want) in cases {
            assert_eq!(filter.matches(path), want, "{path}");
        }
    }

    #[test]
    fn no_include_means_everything_but_excludes() {
        let filter = f(&[], &["*.tmp"]);
        assert!(filter.matches("a/b/c.pdf"));
        assert!(!filter.matches("a/b/c.tmp"));
    }

    #[test]
    fn bad_pattern_names_option() {
        let err = PathFilter::new(&["a[".into()], &[]).unwrap_err().to_string();
        assert!(err.starts_with("include_patterns: invalid pattern \"a[\""), "{err}");
    }
}
