//! Shared set-up of the integration tests: what a test needs before its scenario starts.
//! Each test target takes it with `mod common;` and uses only a part of it.
#![allow(dead_code)]

pub mod api;
pub mod host;
pub mod objects;

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

/// `true` when `present`; otherwise fails under CI and, elsewhere, prints why `test` is
/// skipped and returns `false` (the caller returns).
pub fn require(test: &str, what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(!in_ci(), "{test}: {what} is not installed (CI must have it)");
    eprintln!("SKIPPED {test}: {what} is not installed");
    false
}

/// Real Nix (`nix --version` runs): Debian's nix-bin.
pub fn require_nix(test: &str) -> bool {
    require(
        test,
        "`nix` (apt-get install nix-bin)",
        runs("nix", &["--version"]),
    )
}

/// kubectl (`kubectl version --client` runs).
pub fn require_kubectl(test: &str) -> bool {
    require(test, "kubectl", runs("kubectl", &["version", "--client"]))
}

/// An API server's answer: status `code` with the JSON `body`.
pub fn json_response(code: u16, body: &serde_json::Value) -> http::Response<kube::client::Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}
