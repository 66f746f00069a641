//! The push webhook receiver: a push to the flake's repository resolves the FlakeSources that
//! follow it at once, instead of at their next `interval`.
//!
//! Off by default (`nixroll controller --webhook-addr`), on its own port (and its own Service
//! in the chart), served by every replica: accepting needs no leader. An accepted push sets
//! `nixroll.io/requested-at` on each matching FlakeSource; the leader's FlakeSource controller
//! resolves it (and verifies it, with `spec.verify`) as for any other request.
//!
//! `POST /hook/github` (`X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>`),
//! `/hook/gitlab` (`X-Gitlab-Token`), `/hook/gitea` (Gitea's and Forgejo's
//! `X-Gitea-Signature`/`X-Forgejo-Signature`: hex HMAC-SHA256), `/hook/generic`
//! (`X-Nixroll-Signature: sha256=<hex>` over `{"url": …, "ref": …}`). The key is `token` of
//! the Secret `--webhook-secret` (and `previousToken` while rotating), read with `get` and kept
//! for 10 s. Anything else is refused with a bare status code (no detail) and counted in
//! `nixroll_webhook_requests_total{result}`. Requests are rate-limited (a token bucket over all
//! callers, checked before the body is read), bodies are bounded (`--webhook-max-body`) and must
//! arrive within 10 s. Nothing of a request (headers, body, signature) is logged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::post;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tracing::{debug, info};

use crate::api::FlakeSource;
use crate::controller::metrics::{Metrics, WebhookLabel};
use crate::names::REQUESTED_AT_ANNOTATION;
use crate::source::controller::secret_data;

/// Every `result` label value.
pub const RESULTS: [&str; 8] = [
    "accepted",
    "no_match",
    "ignored_event",
    "unauthorized",
    "bad_request",
    "too_large",
    "rate_limited",
    "unavailable",
];

/// How the receiver runs.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    /// Secret (in `namespace`) with `token` and, while rotating, `previousToken`.
    pub secret_name: String,
    pub namespace: String,
    /// Largest body accepted (bytes); larger ones get 413.
    pub max_body: usize,
    /// Requests per second over all callers, and the burst.
    pub rate_per_second: f64,
    pub burst: f64,
    /// Bound of each API request (the Secret, listing and annotating FlakeSources).
    pub api_timeout: Duration,
}

impl WebhookConfig {
    pub fn new(addr: SocketAddr) -> Self {
        WebhookConfig {
            addr,
            secret_name: "nixroll-webhook".into(),
            namespace: crate::names::NAMESPACE.into(),
            max_body: 1024 * 1024,
            rate_per_second: 5.0,
            burst: 20.0,
            api_timeout: Duration::from_secs(10),
        }
    }
}

/// The forges the receiver speaks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    GitLab,
    Gitea,
    Generic,
}

impl Forge {
    pub fn from_path(p: &str) -> Option<Forge> {
        Some(match p {
            "github" => Forge::GitHub,
            "gitlab" => Forge::GitLab,
            "gitea" | "forgejo" => Forge::Gitea,
            "generic" => Forge::Generic,
            _ => return None,
        })
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether the request carries a valid signature or token for one of `keys` (PURE; every
/// comparison constant-time through ring's HMAC verification).
pub fn authenticate(forge: Forge, headers: &HeaderMap, body: &[u8], keys: &[Vec<u8>]) -> bool {
    let hmac_ok = |hex_sig: Option<&str>| {
        let Some(tag) = hex_sig.and_then(unhex) else {
            return false;
        };
        keys.iter().any(|k| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
            ring::hmac::verify(&key, body, &tag).is_ok()
        })
    };
    match forge {
        Forge::GitHub => {
            hmac_ok(header(headers, "x-hub-signature-256").and_then(|v| v.strip_prefix("sha256=")))
        }
        Forge::Generic => {
            hmac_ok(header(headers, "x-nixroll-signature").and_then(|v| v.strip_prefix("sha256=")))
        }
        Forge::Gitea => {
            hmac_ok(header(headers, "x-gitea-signature").or_else(|| header(headers, "x-forgejo-signature")))
        }
        Forge::GitLab => {
            let Some(given) = header(headers, "x-gitlab-token") else {
                return false;
            };
            // Compare through an HMAC under a random key: constant time, whatever the lengths.
            let rng = ring::rand::SystemRandom::new();
            let Ok(k) = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng) else {
                return false;
            };
            let tag = ring::hmac::sign(&k, given.as_bytes());
            keys.iter()
                .any(|want| ring::hmac::verify(&k, want, tag.as_ref()).is_ok())
        }
    }
}

/// What a push says: the repository's URLs and the ref pushed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Push {
    pub urls: Vec<String>,
    pub git_ref: Option<String>,
}

/// Whether the event is a push (a ping or another event is acknowledged and ignored).
pub fn is_push(forge: Forge, headers: &HeaderMap) -> bool {
    match forge {
        Forge::GitHub => header(headers, "x-github-event") == Some("push"),
        Forge::GitLab => matches!(
            header(headers, "x-gitlab-event"),
            Some("Push Hook" | "Tag Push Hook")
        ),
        Forge::Gitea => {
            let e = header(headers, "x-gitea-event").or_else(|| header(headers, "x-forgejo-event"));
            matches!(e, Some("push" | "create"))
        }
        Forge::Generic => true,
    }
}

/// The push's repository URLs and ref (PURE).
pub fn push_of(forge: Forge, body: &[u8]) -> Option<Push> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let strs = |o: &serde_json::Value, keys: &[&str]| -> Vec<String> {
        keys.iter()
            .filter_map(|k| o[*k].as_str().map(str::to_owned))
            .collect()
    };
    let urls = match forge {
        Forge::GitHub | Forge::Gitea => strs(
            &v["repository"],
            &["clone_url", "ssh_url", "git_url", "html_url", "url"],
        ),
        Forge::GitLab => strs(
            &v["project"],
            &["git_http_url", "git_ssh_url", "web_url", "http_url", "ssh_url"],
        ),
        Forge::Generic => strs(&v, &["url"]),
    };
    if urls.is_empty() {
        return None;
    }
    Some(Push {
        urls,
        git_ref: v["ref"].as_str().map(str::to_owned),
    })
}

/// A repository URL reduced to `host/path` (lowercase host, no scheme, user, port, `.git` or
/// trailing slash), so that a push's `https://…` matches a source's `ssh://git@…:2222/….git`.
pub fn normalize_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    // scp-like `git@host:path`
    let rest = if !url.contains("://") {
        rest.replacen(':', "/", 1)
    } else {
        rest.to_owned()
    };
    let rest = rest.rsplit_once('@').map_or(rest.as_str(), |(_, r)| r).to_owned();
    let (host, path) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
    let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{host}/{path}")
}

/// Whether a push concerns a FlakeSource: same repository, and for a branch source the same
/// branch (a tag push matches tag and semver sources; a `name` source matches its own ref).
pub fn matches(fs: &FlakeSource, push: &Push) -> bool {
    let mine = normalize_url(&fs.spec.url);
    if !push.urls.iter().any(|u| normalize_url(u) == mine) {
        return false;
    }
    let r = &fs.spec.git_ref;
    match push.git_ref.as_deref() {
        None => true,
        Some(pushed) => match (&r.branch, &r.name) {
            (Some(b), _) => pushed == format!("refs/heads/{b}") || pushed == b,
            (_, Some(n)) => pushed == n,
            _ => pushed.starts_with("refs/tags/") || !pushed.starts_with("refs/heads/"),
        },
    }
}

/// A token bucket over all callers.
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Keys {
    values: Vec<Vec<u8>>,
    read: Instant,
}

struct Receiver {
    client: Client,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    bucket: Mutex<Bucket>,
    keys: tokio::sync::Mutex<Option<Keys>>,
}

impl Receiver {
    fn count(&self, result: &'static str) -> &'static str {
        self.metrics.webhook.get_or_create(&WebhookLabel { result }).inc();
        result
    }

    fn take_token(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * self.config.rate_per_second;
        b.tokens = (b.tokens + refill).min(self.config.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// `token` and `previousToken` of the Secret, read at most every 10 s.
    async fn keys(&self) -> Option<Vec<Vec<u8>>> {
        let mut cached = self.keys.lock().await;
        if let Some(k) = cached.as_ref()
            && k.read.elapsed() < Duration::from_secs(10)
        {
            return Some(k.values.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let got = tokio::time::timeout(self.config.api_timeout, api.get_opt(&self.config.secret_name)).await;
        let secret = match got {
            Ok(Ok(Some(s))) => s,
            _ => {
                debug!(secret = %self.config.secret_name, "webhook Secret not readable");
                return None;
            }
        };
        let data = secret_data(&secret);
        let values: Vec<Vec<u8>> = ["token", "previousToken"]
            .iter()
            .filter_map(|k| data.get(*k).cloned())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return None;
        }
        *cached = Some(Keys {
            values: values.clone(),
            read: Instant::now(),
        });
        Some(values)
    }

    /// Annotate every matching FlakeSource; returns how many.
    async fn request_resolution(&self, push: &Push) -> Result<usize, ()> {
        let api: Api<FlakeSource> = Api::all(self.client.clone());
        let list = tokio::time::timeout(self.config.api_timeout, api.list(&Default::default()))
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
        let now = jiff::Timestamp::now().to_string();
        let mut n = 0;
        for fs in list.items.iter().filter(|fs| matches(fs, push)) {
            let ns = fs.namespace().unwrap_or_default();
            let api: Api<FlakeSource> = Api::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({"metadata": {"annotations": {REQUESTED_AT_ANNOTATION: now}}});
            let done = tokio::time::timeout(
                self.config.api_timeout,
                api.patch(&fs.name_any(), &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
            if matches!(done, Ok(Ok(_))) {
                n += 1;
                info!(source = %format!("{ns}/{}", fs.name_any()), "push received: resolution requested");
            }
        }
        Ok(n)
    }
}

async fn hook(
    State(rx): State<Arc<Receiver>>,
    Path(forge): Path<String>,
    req: Request<Body>,
) -> (StatusCode, &'static str) {
    let result = handle(&rx, &forge, req).await;
    let code = match result {
        "accepted" | "no_match" | "ignored_event" => StatusCode::ACCEPTED,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "bad_request" => StatusCode::BAD_REQUEST,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    debug!(result, "webhook request");
    // The body says the result only for an authenticated caller.
    let body = match result {
        "accepted" | "no_match" | "ignored_event" => result,
        _ => "",
    };
    (code, body)
}

async fn handle(rx: &Receiver, forge: &str, req: Request<Body>) -> &'static str {
    if !rx.take_token() {
        return rx.count("rate_limited");
    }
    let Some(forge) = Forge::from_path(forge) else {
        return rx.count("unauthorized");
    };
    let (parts, body) = req.into_parts();
    let too_large = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > rx.config.max_body);
    if too_large {
        return rx.count("too_large");
    }
    let body = match tokio::time::timeout(
        Duration::from_secs(10),
        axum::body::to_bytes(body, rx.config.max_body),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return rx.count("too_large"),
        Err(_) => return rx.count("bad_request"),
    };
    let Some(keys) = rx.keys().await else {
        return rx.count("unavailable");
    };
    if !authenticate(forge, &parts.headers, &body, &keys) {
        return rx.count("unauthorized");
    }
    if !is_push(forge, &parts.headers) {
        return rx.count("ignored_event");
    }
    let Some(push) = push_of(forge, &body) else {
        return rx.count("bad_request");
    };
    match rx.request_resolution(&push).await {
        Ok(0) => rx.count("no_match"),
        Ok(_) => rx.count("accepted"),
        Err(()) => rx.count("unavailable"),
    }
}

/// Serve the receiver until `shutdown`; returns the bound address.
pub async fn serve(
    client: Client,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let local = listener.local_addr()?;
    let rx = Arc::new(Receiver {
        client,
        bucket: Mutex::new(Bucket {
            tokens: config.burst,
            at: Instant::now(),
        }),
        config,
        metrics,
        keys: tokio::sync::Mutex::new(None),
    });
    let app = Router::new()
        .route("/hook/{forge}", post(hook))
        .with_state(rx)
        // No request body reaches a handler unbounded (to_bytes bounds it again).
        .layer(axum::extract::DefaultBodyLimit::disable());
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "webhook server stopped");
        }
    });
    Ok((local, handle))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn urls_match_across_schemes() {
        for (a, b) in [
            ("https://GitHub.com/me/infra.git", "ssh://git@github.com/me/infra"),
            ("git@github.com:me/infra.git", "https://github.com/me/infra/"),
            (
                "ssh://git@git.example.org:2222/homelab/nixos.git",
                "https://git.example.org/homelab/nixos",
            ),
        ] {
            assert_eq!(normalize_url(a), normalize_url(b), "{a} {b}");
        }
        assert_ne!(
            normalize_url("https://h/me/infra"),
            normalize_url("https://h/me/infra2")
        );
    }

    #[test]
    fn signatures_and_tokens() {
        let key = b"s3cret".to_vec();
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), body);
        let hex: String = sig.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut h = HeaderMap::new();
        h.insert("x-hub-signature-256", format!("sha256={hex}").parse().unwrap());
        assert!(authenticate(Forge::GitHub, &h, body, std::slice::from_ref(&key)));
        assert!(!authenticate(
            Forge::GitHub,
            &h,
            b"other",
            std::slice::from_ref(&key)
        ));
        assert!(!authenticate(Forge::GitHub, &h, body, &[b"wrong".to_vec()]));
        // Rotation: the previous key still works.
        assert!(authenticate(
            Forge::GitHub,
            &h,
            body,
            &[b"new".to_vec(), key.clone()]
        ));
        let mut g = HeaderMap::new();
        g.insert("x-gitea-signature", hex.parse().unwrap());
        assert!(authenticate(Forge::Gitea, &g, body, std::slice::from_ref(&key)));
        let mut l = HeaderMap::new();
        l.insert("x-gitlab-token", "s3cret".parse().unwrap());
        assert!(authenticate(Forge::GitLab, &l, body, std::slice::from_ref(&key)));
        l.insert("x-gitlab-token", "s3cre".parse().unwrap());
        assert!(!authenticate(Forge::GitLab, &l, body, std::slice::from_ref(&key)));
        assert!(!authenticate(Forge::Generic, &HeaderMap::new(), body, &[key]));
    }

    #[test]
    fn pushes_match_their_sources() {
        let mut fs = FlakeSource::new(
            "infra",
            crate::sim::fixtures::flake_source_spec("ssh://git@github.com/me/infra.git", "main"),
        );
        let push = |r: &str| Push {
            urls: vec!["https://github.com/me/infra.git".into()],
            git_ref: Some(r.into()),
        };
        assert!(matches(&fs, &push("refs/heads/main")));
        assert!(!matches(&fs, &push("refs/heads/dev")));
        fs.spec.git_ref = crate::api::FlakeSourceRef {
            semver: Some(">=1".into()),
            ..Default::default()
        };
        assert!(matches(&fs, &push("refs/tags/v1.2.0")));
        assert!(!matches(&fs, &push("refs/heads/main")));
        let gh = br#"{"ref":"refs/heads/main","repository":{"clone_url":"https://github.com/me/infra.git","ssh_url":"git@github.com:me/infra.git"}}"#;
        let p = push_of(Forge::GitHub, gh).unwrap();
        assert_eq!(p.urls.len(), 2);
        assert_eq!(p.git_ref.as_deref(), Some("refs/heads/main"));
        let gl = br#"{"ref":"refs/heads/main","project":{"git_http_url":"https://gitlab.com/me/infra.git"}}"#;
        assert_eq!(
            push_of(Forge::GitLab, gl).unwrap().urls,
            ["https://gitlab.com/me/infra.git"]
        );
        assert!(push_of(Forge::GitHub, b"not json").is_none());
    }
}
