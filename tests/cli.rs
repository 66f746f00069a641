//! The first commands a new user types: what the docs and the demo tell them to run, the
//! `--help` of every subcommand, and what the binary says when it cannot start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

/// README.md and every docs/*.md file.
fn documentation() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

#[test]
fn the_checker_finds_a_watch_over_two_types() {
    assert_eq!(
        common::multi_type_watches("run `kubectl --kubeconfig k get nixosnodes,nodes -w` now"),
        ["kubectl --kubeconfig k get nixosnodes,nodes -w"]
    );
    assert_eq!(
        common::multi_type_watches("  kubectl get flakesources,nixosnodes -A -w"),
        ["kubectl get flakesources,nixosnodes -A -w"]
    );
    assert!(common::multi_type_watches("kubectl get nixosnodes,nodes").is_empty());
    assert!(common::multi_type_watches("kubectl -n x get nixosnodes -w").is_empty());
}

#[test]
fn every_documented_kubectl_watch_names_one_resource_type() {
    let mut bad = Vec::new();
    let mut seen = 0;
    for (file, text) in documentation() {
        seen += text
            .lines()
            .filter(|l| common::watched_types(l).is_some())
            .count();
        for cmd in common::multi_type_watches(&text) {
            bad.push(format!("{file}: {cmd}"));
        }
    }
    assert!(
        bad.is_empty(),
        "kubectl refuses -w with several types:\n{}",
        bad.join("\n")
    );
    assert!(seen > 0, "the docs show at least one kubectl watch");
}

#[test]
fn the_demos_print_one_resource_type_per_kubectl_watch() {
    for resources in [
        &["nixosnodes", "nodes"][..],
        &["flakesources -A", "nixosnodes"][..],
    ] {
        let lines = nixroll::sim::demo::watch_hints("/tmp/k", resources);
        assert_eq!(lines.len(), resources.len());
        let text = lines.join("\n");
        assert!(common::multi_type_watches(&text).is_empty(), "{text}");
        for line in &lines {
            assert_eq!(common::watched_types(line).map(|t| t.len()), Some(1), "{line}");
        }
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_nixroll");
const WALL: Duration = Duration::from_secs(60);

use std::time::Duration;

/// Run the binary to its end (bounded by [`WALL`]): exit success, stdout, stderr.
async fn nixroll(args: &[&str]) -> (bool, String, String) {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WALL, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("nixroll {args:?} still running after {WALL:?}"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A kubeconfig with two contexts: `dead` (current; a port nothing listens on) and `live`
/// (`server`).
fn two_context_kubeconfig(dir: &Path, dead: &str, live: &str) -> String {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: dead\nclusters:\n\
         - name: dead\n  cluster: {{server: \"{dead}\"}}\n\
         - name: live\n  cluster: {{server: \"{live}\"}}\n\
         contexts:\n\
         - name: dead\n  context: {{cluster: dead, user: u}}\n\
         - name: live\n  context: {{cluster: live, user: u}}\n\
         users:\n- name: u\n  user: {{}}\n"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// A local port nothing listens on (bound, then closed).
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_takes_kubeconfig_and_context_and_says_which_failure_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let (with_crd, client) = common::api::start_with_crd().await;
    drop(client);
    let dead = dead_url();
    let kubeconfig = two_context_kubeconfig(dir.path(), &dead, &with_crd.url());

    // The current context's server is down: said so, with its URL, and no log line.
    let (ok, _, err) = nixroll(&["status", "--kubeconfig", &kubeconfig]).await;
    assert!(!ok);
    assert!(
        err.starts_with(&format!(
            "nixroll: could not reach the Kubernetes API server at {dead}"
        )),
        "{err}"
    );
    assert!(
        !err.contains("CRD"),
        "an unreachable server is not a missing CRD: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line, no raw log line: {err}");
    let (ok, _, err) = nixroll(&["status", "-w", "--timeout", "20s", "--kubeconfig", &kubeconfig]).await;
    assert!(!ok);
    assert!(
        err.contains(&format!("could not reach the Kubernetes API server at {dead}")),
        "{err}"
    );

    // --context picks the live server.
    let (ok, out, err) = nixroll(&["status", "--kubeconfig", &kubeconfig, "--context", "live"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("NODE"), "{out}");

    // A server without nixroll's CRD: said so, with its URL.
    let (bare, client) = common::api::start().await;
    drop(client);
    let kubeconfig = two_context_kubeconfig(dir.path(), &dead, &bare.url());
    let (ok, _, err) = nixroll(&["status", "--kubeconfig", &kubeconfig, "--context", "live"]).await;
    assert!(!ok);
    assert!(
        err.contains(&format!("the API server at {} has no NixOSNode CRD", bare.url())),
        "{err}"
    );
    assert!(!err.contains("could not reach"), "{err}");

    // An unknown context is named.
    let (ok, _, err) = nixroll(&["status", "--kubeconfig", &kubeconfig, "--context", "nope"]).await;
    assert!(!ok);
    assert!(err.contains("context nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (api, client) = common::api::start_with_crd().await;
    drop(client);
    let kubeconfig = two_context_kubeconfig(dir.path(), &api.url(), &api.url());
    let (ok, _, err) = nixroll(&[
        "controller",
        "--kubeconfig",
        &kubeconfig,
        "--no-leader-election",
        "--metrics-addr",
        &addr,
    ])
    .await;
    assert!(!ok);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("nixroll: controller: "), "{err}");
    assert!(
        last.contains(&format!("serving metrics on {addr}")),
        "the address: {err}"
    );
    assert!(last.contains("Address already in use"), "the cause: {err}");
}

/// The User-Agent of the first request `nixroll args…` sends to a listener standing in for
/// the API server (it answers nothing; the process is killed once the request is read).
async fn first_user_agent(args: &[&str], dir: &Path) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let kubeconfig = two_context_kubeconfig(dir, &url, &url);
    let mut child = tokio::process::Command::new(BIN)
        .args(args)
        .args(["--kubeconfig", &kubeconfig])
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut conn, _) = tokio::time::timeout(WALL, listener.accept())
        .await
        .unwrap_or_else(|_| panic!("nixroll {args:?} sent no request"))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WALL, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before the request's head");
        head.extend_from_slice(&buf[..n]);
    }
    child.kill().await.unwrap();
    let head = String::from_utf8_lossy(&head).to_string();
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("user-agent")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no User-Agent in:\n{head}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_agent_and_status_send_their_user_agent() {
    let version = env!("CARGO_PKG_VERSION");
    let dir = tempfile::tempdir().unwrap();
    let controller = first_user_agent(
        &[
            "controller",
            "--no-leader-election",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        dir.path(),
    )
    .await;
    assert_eq!(controller, format!("nixroll-controller/{version}"));
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    let agent = first_user_agent(
        &["agent", "--node", "node-1", "--host-root", host.to_str().unwrap()],
        dir.path(),
    )
    .await;
    assert_eq!(agent, format!("nixroll-agent/{version}"));
    let status = first_user_agent(&["status"], dir.path()).await;
    assert_eq!(status, format!("nixroll-status/{version}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_the_controllers_metrics_at_the_url_it_prints() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--nodes", "1", "--nix", "simulated", "--json", "--hold"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = tokio::time::timeout(WALL, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if let Some(url) = line.trim().strip_prefix("metrics:  curl ") {
                return url.to_string();
            }
        }
        panic!(
            "the demo ended without printing its metrics URL:\n{}",
            seen.join("\n")
        );
    })
    .await
    .unwrap_or_else(|_| panic!("no metrics URL within {WALL:?}:\n{}", seen.join("\n")));
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    assert_eq!(path, "metrics");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(WALL, conn.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    child.kill().await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\nnixroll_leader 1\n"), "{text}");
    assert!(text.contains("nixroll_build_info{version="), "{text}");
    assert!(text.contains("\nnixroll_nodes{phase="), "{text}");
}

/// `nixroll crd | head -n 1`: the reader closes the pipe early; nixroll stops quietly with 0
/// (it panicked with "failed printing to stdout: Broken pipe" and a backtrace).
#[test]
fn crd_into_a_pipe_closed_early_exits_cleanly() {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nixroll"))
        .arg("crd")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The read end is dropped here: the rest of the output meets a closed pipe.
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
