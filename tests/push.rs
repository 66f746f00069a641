//! A push applies in seconds: the `nixroll.io/requested-at` annotation on a FlakeSource resolves
//! it at once, whatever its interval; over the embedded API with the real controller and a
//! real git repository (`file://`). See docs/source.md, "A push applies in seconds".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixroll::api::FlakeSource;
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::world::World;
use serde_json::json;

mod common;
use common::following::{commit_of, follow_source, simulated, source_spec, wait_source};
use common::webhook::{hmac_hex, http};

async fn request(api: &Api<FlakeSource>, value: &str) {
    let patch = json!({"metadata": {"annotations": {"nixroll.io/requested-at": value}}});
    api.patch("infra", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// With `interval: 1h`, a new commit is not seen until the annotation gets a new value; then
/// it is resolved at once (well under a second here), and the value handled is in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requested_at_resolves_at_once() {
    let mut world = World::start(simulated(2)).await.unwrap();
    let (repo, branch) = world.follow_in_git().unwrap();
    world.publish_flake(&format!("git+file://{}?ref=refs/heads/{branch}", repo.display()));
    let head0 = world.head().to_string();
    let sources = follow_source(&world, source_spec(&repo, &branch, "1h", json!({}))).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = ControllerConfig::new(&format!("push-{}", fastrand::u32(..)));
    config.policy.max_unavailable = MaxUnavailable::Count(1);
    config.follow.source_controller.cache_dir = cache.path().to_path_buf();
    let c = world.start_controller(config).await.unwrap();
    wait_source(&sources, "the first resolution", |fs| {
        commit_of(fs) == Some(head0.as_str())
    })
    .await;

    for (i, value) in ["2026-12-07T08:00:00Z", "2026-12-07T08:00:01Z"]
        .iter()
        .enumerate()
    {
        let next = world
            .commit(&format!("push {i}"), |s| s.service.push('+'))
            .unwrap();
        // The interval is an hour: nothing resolves the new commit by itself.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let fs = sources.get("infra").await.unwrap();
        assert_ne!(commit_of(&fs), Some(next.as_str()), "resolved without a request");
        let asked = Instant::now();
        request(&sources, value).await;
        let fs = wait_source(&sources, "the requested resolution", |fs| {
            commit_of(fs) == Some(next.as_str())
        })
        .await;
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(
            fs.status.unwrap().last_handled_requested_at.as_deref(),
            Some(*value)
        );
        eprintln!(
            "push {i}: requested-at → resolved in {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
    }
    c.stop().await;
}

// ---- The webhook receiver, with real HTTP requests.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every `tracing` event of this process at TRACE, to check that nothing of a request leaks.
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(w.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
    .clone()
}

/// A signed GitHub push resolves at once; GitLab's token and Gitea's signature too; a wrong
/// HMAC, an oversized body and too many requests are refused without detail and counted; a
/// ping and a push of another repository change nothing; nothing of a request is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_pushes_resolve_at_once() {
    let logs = capture_logs();
    let mut world = World::start(simulated(2)).await.unwrap();
    let (repo, branch) = world.follow_in_git().unwrap();
    world.publish_flake(&format!("git+file://{}?ref=refs/heads/{branch}", repo.display()));
    let head0 = world.head().to_string();
    let url = format!("file://{}", repo.display());
    let token = "wh-5ecret-Zq81";
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(world.client.clone(), "nixroll-system");
    let secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "nixroll-webhook", "namespace": "nixroll-system"},
        "stringData": {"token": token}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let sources = follow_source(&world, source_spec(&repo, &branch, "1h", json!({}))).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = ControllerConfig::new(&format!("webhook-{}", fastrand::u32(..)));
    config.follow.source_controller.cache_dir = cache.path().to_path_buf();
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let mut wh = nixroll::controller::webhook::WebhookConfig::new("127.0.0.1:0".parse().unwrap());
    wh.max_body = 64 * 1024;
    wh.burst = 12.0;
    wh.rate_per_second = 0.1;
    config.webhook = Some(wh);
    let (bound, metrics_bound) = (config.webhook_bound.clone(), config.metrics_bound.clone());
    let c = world.start_controller(config).await.unwrap();
    wait_source(&sources, "the first resolution", |fs| {
        commit_of(fs) == Some(head0.as_str())
    })
    .await;
    let addr = *bound.get().unwrap();
    let post = |path: &'static str, headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        tokio::task::spawn_blocking(move || http(addr, "POST", path, &headers, &body))
    };
    let github = |event: &str, repo_url: &str| {
        let body = serde_json::to_vec(&json!({"ref": format!("refs/heads/{branch}"),
            "repository": {"clone_url": repo_url, "html_url": "https://example.invalid/x"}}))
        .unwrap();
        let sig = format!("sha256={}", hmac_hex(token, &body));
        (
            vec![
                ("X-GitHub-Event", event.to_string()),
                ("X-Hub-Signature-256", sig),
            ],
            body,
        )
    };

    // A wrong HMAC: 401, no detail, nothing resolved.
    let c1 = world.commit("push 1", |s| s.service.push('+')).unwrap();
    let (mut h, body) = github("push", &url);
    h[1].1 = format!("sha256={}", hmac_hex("not-the-token", &body));
    let (code, text) = post("/hook/github", h, body).await.unwrap();
    assert_eq!((code, text.as_str()), (401, ""));
    // An oversized body (over 64 KiB), correctly signed: 413.
    let big = vec![b' '; 100 * 1024];
    let sig = format!("sha256={}", hmac_hex(token, &big));
    let (code, _) = post(
        "/hook/github",
        vec![("X-GitHub-Event", "push".into()), ("X-Hub-Signature-256", sig)],
        big,
    )
    .await
    .unwrap();
    assert_eq!(code, 413);
    // Unknown forge path, and a GET: refused.
    assert_eq!(
        post("/hook/bitbucket", vec![], b"{}".to_vec()).await.unwrap().0,
        401
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        commit_of(&sources.get("infra").await.unwrap()),
        Some(head0.as_str())
    );

    // A signed GitHub push: accepted, resolved at once.
    let (h, body) = github("push", &url);
    let sent = Instant::now();
    let (code, text) = post("/hook/github", h, body).await.unwrap();
    assert_eq!((code, text.as_str()), (202, "accepted"));
    wait_source(&sources, "the GitHub push", |fs| {
        commit_of(fs) == Some(c1.as_str())
    })
    .await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    eprintln!("GitHub push → resolved in {:.0} ms", took.as_secs_f64() * 1000.0);

    // GitLab's token.
    let c2 = world.commit("push 2", |s| s.service.push('+')).unwrap();
    let body =
        serde_json::to_vec(&json!({"ref": format!("refs/heads/{branch}"), "project": {"git_http_url": url}}))
            .unwrap();
    let (code, _) = post(
        "/hook/gitlab",
        vec![
            ("X-Gitlab-Event", "Push Hook".into()),
            ("X-Gitlab-Token", token.into()),
        ],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(code, 202);
    wait_source(&sources, "the GitLab push", |fs| {
        commit_of(fs) == Some(c2.as_str())
    })
    .await;
    let (code, _) = post(
        "/hook/gitlab",
        vec![
            ("X-Gitlab-Event", "Push Hook".into()),
            ("X-Gitlab-Token", "wrong".into()),
        ],
        body,
    )
    .await
    .unwrap();
    assert_eq!(code, 401);

    // Gitea/Forgejo's signature.
    let c3 = world.commit("push 3", |s| s.service.push('+')).unwrap();
    let body =
        serde_json::to_vec(&json!({"ref": format!("refs/heads/{branch}"), "repository": {"clone_url": url}}))
            .unwrap();
    let (code, _) = post(
        "/hook/gitea",
        vec![
            ("X-Gitea-Event", "push".into()),
            ("X-Gitea-Signature", hmac_hex(token, &body)),
        ],
        body,
    )
    .await
    .unwrap();
    assert_eq!(code, 202);
    wait_source(&sources, "the Gitea push", |fs| {
        commit_of(fs) == Some(c3.as_str())
    })
    .await;

    // A ping and another repository's push: acknowledged, nothing requested.
    let (h, body) = github("ping", &url);
    assert_eq!(
        post("/hook/github", h, body).await.unwrap(),
        (202, "ignored_event".into())
    );
    let (h, body) = github("push", "https://example.invalid/other.git");
    assert_eq!(
        post("/hook/github", h, body).await.unwrap(),
        (202, "no_match".into())
    );

    // Too many requests: refused with 429 (the bucket holds 12 and refills slowly).
    let mut limited = false;
    for _ in 0..20 {
        if post("/hook/generic", vec![], b"{}".to_vec()).await.unwrap().0 == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "no request was rate-limited");

    // Counted in the metrics.
    let maddr = *metrics_bound.get().unwrap();
    let (_, metrics) = tokio::task::spawn_blocking(move || http(maddr, "GET", "/metrics", &[], b""))
        .await
        .unwrap();
    for (result, at_least) in [
        ("accepted", 3),
        ("unauthorized", 3),
        ("too_large", 1),
        ("rate_limited", 1),
        ("no_match", 1),
        ("ignored_event", 1),
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("nixroll_webhook_requests_total{{result=\"{result}\"}}")))
            .unwrap_or_else(|| panic!("no counter for {result}: {metrics}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= at_least, "{line}");
    }
    c.stop().await;

    // Nothing of a request in any log line: the token, a signature, a body.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("push received"), "the accepted push is logged");
    for secret in [
        token.to_string(),
        hmac_hex(token, b"{}"),
        "X-Hub-Signature".into(),
        "clone_url".into(),
    ] {
        assert!(!text.contains(&secret), "the log shows {secret}");
    }
}
