//! Shared set-up of the integration tests: what a test needs before its scenario starts.
//! Each test target takes it with `mod common;` and uses only a part of it.
#![allow(dead_code)]

pub mod api;
pub mod chart;
pub mod host;
pub mod objects;
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
