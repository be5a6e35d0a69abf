//! An fnlet function in Rust (exec mode): reads the request body from stdin and answers with
//! its counts as JSON on stdout. No dependencies: a function is just a program.
//!
//! `scripts/build-examples.sh` builds it and copies the binary into `bundle/` as `bootstrap`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

/// What the function answers.
#[derive(Debug, PartialEq)]
struct Counts {
    lines: usize,
    words: usize,
    chars: usize,
    bytes: usize,
    /// The most frequent words (lowercased), most frequent first, ties alphabetical.
    top: Vec<(String, usize)>,
}

fn count(text: &str, top_n: usize) -> Counts {
    let mut freq: HashMap<String, usize> = HashMap::new();
    let mut words = 0;
    for w in text.split_whitespace() {
        words += 1;
        let w: String = w
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if !w.is_empty() {
            *freq.entry(w).or_default() += 1;
        }
    }
    let mut top: Vec<(String, usize)> = freq.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(top_n);
    Counts {
        lines: text.lines().count(),
        words,
        chars: text.chars().count(),
        bytes: text.len(),
        top,
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn to_json(c: &Counts) -> String {
    let top: Vec<String> = c
        .top
        .iter()
        .map(|(w, n)| format!("{{\"word\":{},\"count\":{n}}}", json_str(w)))
        .collect();
    format!(
        "{{\"lines\":{},\"words\":{},\"chars\":{},\"bytes\":{},\"top\":[{}]}}",
        c.lines,
        c.words,
        c.chars,
        c.bytes,
        top.join(",")
    )
}

fn main() -> ExitCode {
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut raw) {
        // stderr goes to the function's log; a nonzero exit is a 502 function_error.
        eprintln!("reading the request: {e}");
        return ExitCode::FAILURE;
    }
    let text = String::from_utf8_lossy(&raw);
    let top_n = std::env::var("WORDCOUNT_TOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let counts = count(&text, top_n);
    eprintln!(
        "counted {} words for request {}",
        counts.words,
        std::env::var("FNLET_REQUEST_ID").unwrap_or_default()
    );
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", to_json(&counts)).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_wc() {
        let c = count("the cat\nsat on the mat.\n", 2);
        assert_eq!((c.lines, c.words, c.chars, c.bytes), (2, 6, 24, 24));
        assert_eq!(c.top, vec![("the".to_string(), 2), ("cat".to_string(), 1)]);
    }

    #[test]
    fn empty_input() {
        let c = count("", 3);
        assert_eq!(
            to_json(&c),
            r#"{"lines":0,"words":0,"chars":0,"bytes":0,"top":[]}"#
        );
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\u{1}"), r#""a\"b\\c\u0001""#);
        let c = count("héllo \"héllo\"", 1);
        assert_eq!(c.chars, 13);
        assert_eq!(
            to_json(&c),
            r#"{"lines":1,"words":2,"chars":13,"bytes":15,"top":[{"word":"héllo","count":2}]}"#
        );
    }
}
