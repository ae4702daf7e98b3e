//! RFC 8288 `Link` header parsing, for APIs that paginate with `rel="next"` (GitHub).

use reqwest::Url;
use reqwest::header::{HeaderMap, LINK};

/// The `rel="next"` target of the response's `Link` headers, when it is an absolute URL.
///
/// ```
/// # use connector_core::http::{next_link, HeaderMap, HeaderValue};
/// let mut headers = HeaderMap::new();
/// headers.insert("link", HeaderValue::from_static(
///     r#"<https://api.github.com/repos/o/r/issues?page=3>; rel="next", <https://api.github.com/repos/o/r/issues?page=9>; rel="last""#,
/// ));
/// assert_eq!(next_link(&headers).unwrap().as_str(), "https://api.github.com/repos/o/r/issues?page=3");
/// ```
pub fn next_link(headers: &HeaderMap) -> Option<Url> {
    find_link(headers, "next", None)
}

/// The first link with relation type `rel` (case-insensitive) in the `Link` headers.
///
/// Handles several header lines, several links per line, quoted and unquoted parameters,
/// commas and semicolons inside `<...>` and inside quoted strings, and multi-valued `rel`
/// (`rel="next last"`). A relative target is resolved against `base`; without a base only
/// absolute targets are returned.
pub fn find_link(headers: &HeaderMap, rel: &str, base: Option<&Url>) -> Option<Url> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(parse_link_header)
        .find(|link| link.rels.split_ascii_whitespace().any(|r| r.eq_ignore_ascii_case(rel)))
        .and_then(|link| match base {
            Some(base) => base.join(link.target).ok(),
            None => Url::parse(link.target).ok(),
        })
}

struct Link<'a> {
    target: &'a str,
    rels: String,
}

/// Parses one `Link` header value into its links. Malformed parts are skipped.
fn parse_link_header(value: &str) -> Vec<Link<'_>> {
    let mut links = Vec::new();
    let mut rest = value;
    // Skip separators (and anything malformed) up to the next `<`.
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        let Some(end) = rest.find('>') else { break };
        let target = rest[..end].trim();
        rest = &rest[end + 1..];
        let mut rels = String::new();
        // Parameters: `; name=value` or `; name="quoted, value"` or `; name`.
        loop {
            rest = rest.trim_start();
            let Some(after) = rest.strip_prefix(';') else { break };
            let after = after.trim_start();
            let name_end = after.find(['=', ';', ',']).unwrap_or(after.len());
            let name = after[..name_end].trim();
            rest = &after[name_end..];
            let mut param_value = String::new();
            if let Some(after_eq) = rest.strip_prefix('=') {
                let after_eq = after_eq.trim_start();
                if let Some(quoted) = after_eq.strip_prefix('"') {
                    let mut chars = quoted.char_indices();
                    let mut consumed = quoted.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, escaped)) = chars.next() {
                                    param_value.push(escaped);
                                }
                            }
                            '"' => {
                                consumed = i + 1;
                                break;
                            }
                            c => param_value.push(c),
                        }
                    }
                    rest = &quoted[consumed..];
                } else {
                    let token_end = after_eq.find([';', ',']).unwrap_or(after_eq.len());
                    param_value.push_str(after_eq[..token_end].trim());
                    rest = &after_eq[token_end..];
                }
            }
            // RFC 8288: only the first occurrence of `rel` counts.
            if name.eq_ignore_ascii_case("rel") && rels.is_empty() {
                rels = param_value;
            }
        }
        links.push(Link { target, rels });
        // Move past the separator to the next link, if any.
        match rest.find(',') {
            Some(comma) => rest = &rest[comma + 1..],
            None => break,
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn github_style_link_headers() {
        // As sent by GitHub on a middle page (the order of rels varies).
        let middle = headers(&[concat!(
            r#"<https://api.github.com/repositories/1300192/issues?page=2>; rel="prev", "#,
            r#"<https://api.github.com/repositories/1300192/issues?page=4>; rel="next", "#,
            r#"<https://api.github.com/repositories/1300192/issues?page=515>; rel="last", "#,
            r#"<https://api.github.com/repositories/1300192/issues?page=1>; rel="first""#
        )]);
        assert_eq!(
            next_link(&middle).unwrap().as_str(),
            "https://api.github.com/repositories/1300192/issues?page=4"
        );
        assert_eq!(find_link(&middle, "last", None).unwrap().query(), Some("page=515"));
        assert_eq!(find_link(&middle, "PREV", None).unwrap().query(), Some("page=2"));

        // The last page has no next.
        let last = headers(&[concat!(
            r#"<https://api.github.com/repositories/1300192/issues?page=514>; rel="prev", "#,
            r#"<https://api.github.com/repositories/1300192/issues?page=1>; rel="first""#
        )]);
        assert_eq!(next_link(&last), None);
        assert_eq!(next_link(&HeaderMap::new()), None);

        // Cursor pagination (GitHub's newer endpoints) with `after=` cursors holding `=`/`%`.
        let cursor = headers(&[
            r#"<https://api.github.com/orgs/o/audit-log?per_page=100&after=MS42OTk%3D&before=>; rel="next""#,
        ]);
        assert_eq!(next_link(&cursor).unwrap().query(), Some("per_page=100&after=MS42OTk%3D&before="));
    }

    #[test]
    fn tricky_link_syntax() {
        let h = headers(&[
            r#"<https://x.test/a?labels=bug,help>; title="a; b, c"; rel=prev"#,
            r#"<https://x.test/b?labels=bug,help&page=2>;rel="next last" ; title*=UTF-8'de'n%c3%a4chstes"#,
        ]);
        assert_eq!(next_link(&h).unwrap().as_str(), "https://x.test/b?labels=bug,help&page=2");
        assert_eq!(find_link(&h, "last", None).unwrap().as_str(), "https://x.test/b?labels=bug,help&page=2");
        assert_eq!(find_link(&h, "prev", None).unwrap().as_str(), "https://x.test/a?labels=bug,help");
        // `title` containing `rel="next"` text must not count as a rel.
        let tricky =
            headers(&[r#"<https://x.test/no>; title="rel=\"next\"", <https://x.test/yes>; rel="next""#]);
        assert_eq!(next_link(&tricky).unwrap().as_str(), "https://x.test/yes");
        // Only the first rel parameter counts.
        let double = headers(&[r#"<https://x.test/p>; rel="prev"; rel="next""#]);
        assert_eq!(next_link(&double), None);
    }

    #[test]
    fn relative_targets_need_a_base() {
        let h = headers(&[r#"</api/items?cursor=abc>; rel="next""#]);
        assert_eq!(next_link(&h), None);
        let base = Url::parse("https://x.test/api/items?cursor=start").unwrap();
        assert_eq!(
            find_link(&h, "next", Some(&base)).unwrap().as_str(),
            "https://x.test/api/items?cursor=abc"
        );
    }

    #[test]
    fn malformed_values_do_not_panic() {
        for v in ["", "garbage", "<", "<https://x.test/a", r#"<https://x.test/a>; rel="next"#, ";;;,,,<>"] {
            let h = headers(&[v]);
            let _ = next_link(&h);
        }
        // An unterminated quote still yields the value seen so far.
        let h = headers(&[r#"<https://x.test/a>; rel="next"#]);
        assert_eq!(next_link(&h).unwrap().as_str(), "https://x.test/a");
    }
}
