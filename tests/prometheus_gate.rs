//! The Prometheus alert gate against a real Prometheus (Debian's `prometheus` package), started
//! by the test on loopback with its own configuration: it scrapes a metric the test serves
//! (`nixroll_test_broken`, 0 or 1) every second and evaluates two rules every second,
//! `StorageBroken` (`nixroll_test_broken > 0`, fires at once) and `StorageSlow` (same
//! expression, `for: 1h`, so it stays pending). The gate blocks while `StorageBroken` fires and
//! passes once it resolves; pending alerts block unless ignored; a Prometheus that is gone
//! blocks unless `failOpen`.
//!
//! Needs `prometheus` (`.ci/run` installs it); elsewhere it skips, and with `CI=true` it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nixroll::api::PrometheusGate;
use nixroll::gates::Verdict;
use nixroll::gates::prometheus::check;

/// Ends the Prometheus process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RULES: &str = r#"groups:
  - name: storage
    interval: 1s
    rules:
      - alert: StorageBroken
        expr: nixroll_test_broken > 0
        labels: {severity: critical}
      - alert: StorageSlow
        expr: nixroll_test_broken > 0
        for: 1h
        labels: {severity: critical}
      - alert: Watchdog
        expr: vector(1)
        labels: {severity: none}
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gate(url: &str) -> PrometheusGate {
    PrometheusGate {
        name: "alerts".into(),
        url: url.into(),
        alert_names: vec![],
        ignore_alert_names: vec!["StorageSlow".into()],
        match_labels: BTreeMap::from([("severity".to_owned(), "critical".to_owned())]),
        ignore_pending: false,
        fail_open: false,
        timeout: Some("5s".into()),
        post_timeout: None,
    }
}

/// Poll the gate (bounded) until `want(verdict)`.
async fn until(g: &PrometheusGate, what: &str, want: impl Fn(&Verdict) -> bool) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = check(g).await;
        if want(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last verdict {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_blocks_while_an_alert_fires_and_passes_when_it_resolves() {
    let have = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !common::require("`prometheus` (apt-get install prometheus)", have) {
        return;
    }
    // The metric the test controls, served on loopback.
    let broken = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let state = broken.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let v = u8::from(state.load(Ordering::SeqCst));
            async move { format!("# TYPE nixroll_test_broken gauge\nnixroll_test_broken {v}\n") }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), RULES).unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: test\n    static_configs: [{{targets: ['{target}']}}]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let prom = Running(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let g = gate(&url);
    let log_path = dir.path().join("prometheus.log");
    // Up and scraping: nothing critical fires (Watchdog fires, but not with severity critical).
    let up = tokio::time::timeout(
        Duration::from_secs(50),
        until(&g, "Prometheus up with no critical alert", |v| {
            *v == Verdict::Pass
        }),
    )
    .await;
    assert!(
        up.is_ok(),
        "Prometheus did not come up: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    broken.store(true, Ordering::SeqCst);
    let v = until(&g, "StorageBroken firing", |v| matches!(v, Verdict::Block(_))).await;
    let Verdict::Block(why) = v else { unreachable!() };
    assert!(why.contains("StorageBroken (firing)"), "{why}");
    // StorageSlow is pending (for: 1h): it blocks when pending alerts count and its name is
    // not ignored, not otherwise.
    let mut pending = g.clone();
    pending.ignore_alert_names.clear();
    pending.alert_names = vec!["StorageSlow".into()];
    let v = until(&pending, "StorageSlow pending", |v| {
        matches!(v, Verdict::Block(_))
    })
    .await;
    assert!(
        matches!(&v, Verdict::Block(w) if w.contains("StorageSlow (pending)")),
        "{v:?}"
    );
    pending.ignore_pending = true;
    assert_eq!(check(&pending).await, Verdict::Pass);

    broken.store(false, Ordering::SeqCst);
    until(&g, "StorageBroken resolved", |v| *v == Verdict::Pass).await;

    // Prometheus gone: fail closed, unless failOpen.
    drop(prom);
    let v = until(&g, "blocking with Prometheus gone", |v| {
        matches!(v, Verdict::Block(_))
    })
    .await;
    assert!(
        matches!(&v, Verdict::Block(w) if w.contains("fail closed")),
        "{v:?}"
    );
    let mut open = g.clone();
    open.fail_open = true;
    assert_eq!(check(&open).await, Verdict::Pass);
    server.abort();
}
