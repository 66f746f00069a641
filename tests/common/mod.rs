//! Shared set-up of the integration tests: what a test needs before its scenario starts.
//! Each test target takes it with `mod common;` and uses only a part of it.
#![allow(dead_code)]

pub mod api;
pub mod chart;
pub mod following;
pub mod host;
pub mod objects;
pub mod signing;
pub mod webhook;
pub mod world;

/// Whether `program args…` runs and exits 0.
pub fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether CI is running the tests (`CI=true`): a missing tool is then a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current().name().unwrap_or("this test").to_string()
}

/// `true` when `present`; otherwise fails under CI and, elsewhere, prints why the running test
/// is skipped and returns `false` (the caller returns).
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    let test = current_test();
    assert!(!in_ci(), "{test}: {what} is not installed (CI must have it)");
    eprintln!("SKIPPED {test}: {what} is not installed");
    false
}

/// Real Nix (`nix --version` runs): Debian's nix-bin.
pub fn require_nix() -> bool {
    require("`nix` (apt-get install nix-bin)", runs("nix", &["--version"]))
}

/// An API server's answer: status `code` with the JSON `body`.
pub fn json_response(code: u16, body: &serde_json::Value) -> http::Response<kube::client::Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// The `kubectl … get … -w` commands in `text` (a Markdown file, a program's output) that name
/// more than one resource type: a real kubectl refuses them ("you may only specify a single
/// resource type"). Commands are taken from inline code spans and, outside them, whole lines.
pub fn multi_type_watches(text: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for line in text.lines() {
        let pieces: Vec<&str> = if line.contains('`') {
            line.split('`').skip(1).step_by(2).collect()
        } else {
            vec![line]
        };
        for cmd in pieces.into_iter().filter(|p| p.contains("kubectl")) {
            if watched_types(cmd).is_some_and(|types| types.len() != 1) {
                bad.push(cmd.trim().to_string());
            }
        }
    }
    bad
}

/// For a `kubectl get … -w` command: the resource types it names (`a,b` → two). `None` when
/// the command is not a watching `get`.
pub fn watched_types(cmd: &str) -> Option<Vec<String>> {
    // Flags of kubectl that take the next word as their value.
    const VALUED: &[&str] = &[
        "--kubeconfig",
        "--context",
        "-n",
        "--namespace",
        "-o",
        "--output",
        "-l",
        "--selector",
        "--field-selector",
        "--sort-by",
        "--server",
        "--user",
        "--cluster",
    ];
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let start = words.iter().position(|w| *w == "kubectl")?;
    let words = &words[start + 1..];
    let watch = words
        .iter()
        .any(|w| matches!(*w, "-w" | "--watch" | "--watch-only") || w.starts_with("--watch="));
    if !watch {
        return None;
    }
    let mut positional = Vec::new();
    let mut skip = false;
    for w in words {
        if skip {
            skip = false;
        } else if VALUED.contains(w) {
            skip = true;
        } else if !w.starts_with('-') {
            positional.push(*w);
        }
    }
    if positional.first() != Some(&"get") {
        return None;
    }
    let types = positional.get(1).map_or_else(Vec::new, |t| {
        t.split(',')
            .map(|t| t.split('/').next().unwrap_or(t).to_string())
            .collect()
    });
    Some(types)
}
