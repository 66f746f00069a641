//! The docs quote only what was measured, with when and how: in README.md and
//! docs/benchmarks.md every block of text (paragraph, list item group, table, code block) that
//! states a measured figure — a number with a unit of time or memory (`0.7 s`, `78 ms`,
//! `2.4 µs`, `45 MiB`, `20 MB`) — carries `measured YYYY-MM-DD with `COMMAND`` itself, or, for a
//! table, a list or a code block, in the block just before it. A block that only states settings (a
//! simulated 1 s reboot, a timeout) says so with `<!-- settings, not measurements -->`.
//! The rule is described in docs/testing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHECKED: &[&str] = &["README.md", "docs/benchmarks.md"];
const SETTINGS: &str = "<!-- settings, not measurements -->";

/// Text blocks separated by blank lines; a fenced code block is one block.
fn blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if line.trim().is_empty() && !fenced {
            if !cur.is_empty() {
                out.push((start, std::mem::take(&mut cur)));
            }
            continue;
        }
        if cur.is_empty() {
            start = i + 1;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.is_empty() {
        out.push((start, cur));
    }
    out
}

/// A number followed by a unit of time or memory.
fn figures(block: &str) -> Vec<String> {
    let units = [
        "µs", "us", "ms", "s", "MiB", "KiB", "GiB", "MB", "KB", "kB", "kiB",
    ];
    let chars: Vec<char> = block.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_number = chars[i].is_ascii_digit() && (i == 0 || !chars[i - 1].is_alphanumeric());
        if !starts_number {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.' || chars[j] == ',') {
            j += 1;
        }
        let number: String = chars[i..j].iter().collect();
        let mut k = j;
        if k < chars.len() && chars[k] == ' ' {
            k += 1;
        }
        let rest: String = chars[k..chars.len().min(k + 4)].iter().collect();
        for u in units {
            if let Some(after) = rest.strip_prefix(u) {
                let ends = after.chars().next().is_none_or(|c| !c.is_alphanumeric());
                if ends {
                    found.push(format!("{number} {u}"));
                    break;
                }
            }
        }
        i = j.max(i + 1);
    }
    found
}

/// `measured YYYY-MM-DD with `command`` somewhere in the block.
fn has_provenance(block: &str) -> bool {
    let flat = block.replace('\n', " ").to_lowercase();
    let mut rest = flat.as_str();
    while let Some(at) = rest.find("measured ") {
        let after = &rest[at + "measured ".len()..];
        let date: Vec<char> = after.chars().take(10).collect();
        let is_date = date.len() == 10
            && date.iter().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    *c == '-'
                } else {
                    c.is_ascii_digit()
                }
            });
        if is_date && let Some(with) = after[10..].find(" with `") {
            let cmd = &after[10 + with + " with `".len()..];
            if cmd.find('`').is_some_and(|end| end > 0) {
                return true;
            }
        }
        rest = after;
    }
    false
}

/// The blocks of `text` that state figures without saying when and how they were measured.
fn unsourced(text: &str) -> Vec<String> {
    let bs = blocks(text);
    let mut bad = Vec::new();
    for (n, (line, b)) in bs.iter().enumerate() {
        let found = figures(b);
        if found.is_empty() || b.contains(SETTINGS) || has_provenance(b) {
            continue;
        }
        let table_list_or_code = b.starts_with('|')
            || b.starts_with("- ")
            || b.starts_with("* ")
            || b.trim_start().starts_with("```");
        if table_list_or_code && n > 0 && has_provenance(&bs[n - 1].1) {
            continue;
        }
        bad.push(format!(
            "line {line}: {found:?} in: {}",
            b.lines().next().unwrap_or("")
        ));
    }
    bad
}

#[test]
fn every_figure_in_the_readme_and_benchmarks_says_when_and_how_it_was_measured() {
    let mut bad = Vec::new();
    for f in CHECKED {
        let text = std::fs::read_to_string(format!("{ROOT}/{f}")).unwrap();
        for b in unsourced(&text) {
            bad.push(format!("{f} {b}"));
        }
    }
    assert!(
        bad.is_empty(),
        "figures without `measured YYYY-MM-DD with `command`` (rule: docs/testing.md):\n{}",
        bad.join("\n")
    );
}

/// The check itself can fail: a figure alone, a table whose heading has no date, a date with no
/// command are all caught; a sourced paragraph and a settings block pass.
#[test]
fn the_check_catches_unsourced_figures() {
    assert_eq!(unsourced("Overhead 0.27 s per node.\n").len(), 1);
    assert_eq!(unsourced("RSS 45 MiB, measured 2026-12-07.\n").len(), 1);
    assert_eq!(
        unsourced("measured 2026-12-07 with `x`:\n\n| a | 3 ms |\n").len(),
        0
    );
    assert_eq!(unsourced("The bench:\n\n| a | 3 ms |\n").len(), 1);
    assert_eq!(unsourced("Found:\n\n- a 3 ms step\n").len(), 1);
    assert_eq!(
        unsourced("Measured 2026-12-07 with `x`:\n\n- a 3 ms step\n").len(),
        0
    );
    assert_eq!(
        unsourced("Overhead 0.27 s (measured 2026-12-07 with `nixroll bench`).\n").len(),
        0
    );
    assert_eq!(unsourced(&format!("A 1 s reboot. {SETTINGS}\n")).len(), 0);
    assert_eq!(unsourced("Kubernetes 1.32, 1,000 nodes, 2 cores.\n").len(), 0);
    assert_eq!(
        figures("p99 0.61s, 2.4 µs and 37.6 MiB; 3 steps"),
        ["0.61 s", "2.4 µs", "37.6 MiB"]
    );
}
