//! Snippets for search hits, cut from the stored content.
//!
//! The search index is contentless (it keeps no copy of the text), so FTS5's `snippet()` is not
//! available; this cuts the same kind of fragment: the window of `max_words` words with the
//! most query terms, the terms in `[` `]`, `…` where text was left out.

/// A word of the content: its byte range and its folded form.
struct Word {
    start: usize,
    end: usize,
    folded: String,
}

/// Lower case without diacritics (close to FTS5's `unicode61 remove_diacritics 2` for the
/// Latin scripts; other scripts are only lower-cased).
fn fold(word: &str) -> String {
    word.chars().flat_map(char::to_lowercase).map(strip_diacritic).collect()
}

fn strip_diacritic(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
        'ď' | 'đ' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' => 'i',
        'ñ' | 'ń' | 'ņ' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
        'ś' | 'ŝ' | 'ş' | 'š' => 's',
        'ţ' | 'ť' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
        'ý' | 'ÿ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        other => other,
    }
}

fn words(text: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(Word { start: s, end: i, folded: fold(&text[s..i]) });
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(Word { start: s, end: text.len(), folded: fold(&text[s..]) });
    }
    out
}

/// Cuts a fragment of `content` of at most `max_words` words around the query `terms`.
pub(super) fn cut(content: &str, terms: &[String], max_words: usize) -> String {
    let wanted: Vec<String> = terms.iter().flat_map(|t| words(t)).map(|w| w.folded).collect();
    let words = words(content);
    if words.is_empty() || max_words == 0 {
        return String::new();
    }
    let hit: Vec<bool> = words.iter().map(|w| wanted.contains(&w.folded)).collect();
    // The window with the most hits; ties go to the earliest.
    let n = max_words.min(words.len());
    let mut in_window = hit[..n].iter().filter(|h| **h).count();
    let (mut best, mut best_start) = (in_window, 0);
    for start in 1..=words.len() - n {
        in_window += usize::from(hit[start + n - 1]);
        in_window -= usize::from(hit[start - 1]);
        if in_window > best {
            (best, best_start) = (in_window, start);
        }
    }
    // Show a few words before the first hit when that keeps every hit of the window.
    if best > 0 {
        let first = (best_start..best_start + n).find(|i| hit[*i]).unwrap_or(best_start);
        let last = (best_start..best_start + n).rev().find(|i| hit[*i]).unwrap_or(first);
        let shifted = (first - (n / 4).min(first)).min(words.len() - n);
        if last < shifted + n {
            best_start = shifted;
        }
    }
    let window = &words[best_start..best_start + n];
    let mut out = String::new();
    if best_start > 0 {
        out.push('…');
    }
    let mut pos = window[0].start;
    for (offset, w) in window.iter().enumerate() {
        out.push_str(&content[pos..w.start]);
        if hit[best_start + offset] {
            out.push('[');
            out.push_str(&content[w.start..w.end]);
            out.push(']');
        } else {
            out.push_str(&content[w.start..w.end]);
        }
        pos = w.end;
    }
    if best_start + n < words.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cut;

    fn terms(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn marks_terms_in_the_densest_window() {
        let text = "one two three four five six seven Rust eight nine rust ten eleven twelve";
        assert_eq!(cut(text, &terms(&["rust"]), 5), "…seven [Rust] eight nine [rust]…");
        assert_eq!(
            cut(text, &terms(&["RUST"]), 100),
            text.replace("Rust", "[Rust]").replace(" rust", " [rust]")
        );
    }

    #[test]
    fn folds_case_and_diacritics_and_splits_terms_like_the_index() {
        assert_eq!(cut("Le café est fermé.", &terms(&["cafe"]), 10), "Le [café] est fermé");
        assert_eq!(cut("an e-mail address", &terms(&["e-mail"]), 10), "an [e]-[mail] address");
    }

    #[test]
    fn without_a_hit_the_start_is_shown() {
        assert_eq!(cut("alpha beta gamma delta", &terms(&["zeta"]), 2), "alpha beta…");
        assert_eq!(cut("", &terms(&["zeta"]), 2), "");
        assert_eq!(cut("   ", &terms(&["zeta"]), 2), "");
    }
}
