//! `nixroll demo --follow`: the demo's nodes follow a branch of the demo's flake repository
//! through a FlakeSource (`file://`, `insecure: true`). Nobody touches a NixOSNode: the demo
//! commits twice to the branch (a new kernel, then a service change) and both rollouts start
//! by themselves.
//!
//! With verification on: every commit is signed with an SSH key made for the run (as
//! `git -c gpg.format=ssh commit -S` would), the FlakeSource trusts only that key
//! (`spec.verify`), and each commit is announced by a signed push webhook to the controller's
//! receiver (real HTTP on 127.0.0.1): the demo reports how long from the push to the first
//! node `Draining`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};

use super::demo::{DemoError, DemoOptions, LiveView};
use k8s_openapi::api::core::v1::Secret;

use crate::api::{FlakeSource, SourceKind, SourceRef};
use crate::controller::ControllerConfig;
use crate::controller::webhook::WebhookConfig;
use crate::sim::flake::CommitSigner;
use crate::sim::world::{NixMode, World, WorldError};

/// Name (in `nixroll-system`) of the demo's FlakeSource.
pub const SOURCE: &str = "demo-flake";

/// The Secret of the trusted (commit-signing) key.
pub const TRUSTED_KEYS: &str = "flake-source-trusted-keys";
/// The Secret of the webhook key.
pub const WEBHOOK_SECRET: &str = "nixroll-webhook";

async fn create<K>(api: &Api<K>, obj: &K, what: &str) -> Result<(), DemoError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    tokio::time::timeout(Duration::from_secs(30), api.create(&PostParams::default(), obj))
        .await
        .map_err(|_| WorldError::Timeout {
            operation: what.into(),
        })?
        .map_err(|source| WorldError::Api {
            operation: what.into(),
            source,
        })?;
    Ok(())
}

/// 32 random bytes, hex.
fn random_token() -> Result<String, DemoError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| DemoError::Watch("no system randomness".into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// POST a generic push (`{"url", "ref"}`, HMAC-SHA256 in `X-Nixroll-Signature`) to the
/// receiver, as a forge would; returns the HTTP status.
async fn push_webhook(
    addr: std::net::SocketAddr,
    token: &str,
    url: &str,
    branch: &str,
) -> Result<u16, DemoError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_vec(&serde_json::json!({"url": url, "ref": format!("refs/heads/{branch}")}))
        .map_err(|e| DemoError::Watch(e.to_string()))?;
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes()),
        &body,
    );
    let sig: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let req = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST /hook/generic HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nX-Nixroll-Signature: sha256={sig}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(&body).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), req)
        .await
        .map_err(|_| DemoError::Watch("the webhook request timed out".into()))??;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// What the follow demo did.
#[derive(Clone, Debug)]
pub struct FollowSummary {
    pub nodes: usize,
    /// The commits made while running, in order, and how long each took to be everywhere
    /// (from the commit, including the source's poll).
    pub rollouts: Vec<(String, Duration)>,
    /// For each push: how long from the webhook request to the first node in a disruptive
    /// phase, and that phase (`Draining`).
    pub first_disruption: Vec<(Duration, crate::api::Phase)>,
    pub nix: NixMode,
}

/// Run the follow demo; `shutdown` ends `--hold`.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<FollowSummary, DemoError> {
    let mut err = std::io::stderr();
    let mut out = std::io::stdout();
    let tty = !opts.json && out.is_terminal();
    let mut world = World::start(opts.world.clone()).await?;
    let signer = CommitSigner::generate().map_err(WorldError::from)?;
    let (repo, branch) = world.follow_in_signed_git(Some(signer.clone()))?;
    let flake = format!("git+file://{}?ref=refs/heads/{branch}", repo.display());
    world.publish_flake(&flake);
    let kubeconfig = world.kubeconfig.display().to_string();
    writeln!(
        err,
        "nixroll demo --follow: {} simulated NixOS nodes follow branch {branch} of {} ({} Nix)",
        opts.world.nodes,
        repo.display(),
        match world.nix_mode {
            NixMode::Real => "real",
            _ => "simulated",
        },
    )?;
    for line in crate::sim::demo::watch_hints(&kubeconfig, &["flakesources -A", "nixosnodes"]) {
        writeln!(err, "{line}")?;
    }

    // The trusted key and the webhook key, as a team would keep them in Secrets.
    let token = random_token()?;
    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), crate::names::NAMESPACE);
    for (name, key, value) in [
        (
            TRUSTED_KEYS,
            "allowed_signers",
            format!("{}\n", signer.allowed_signer()),
        ),
        (WEBHOOK_SECRET, "token", token.clone()),
    ] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": crate::names::NAMESPACE},
            "stringData": {key: value}
        }))
        .map_err(|e| DemoError::Watch(e.to_string()))?;
        create(&secrets, &secret, "create a Secret").await?;
    }
    let sources: Api<FlakeSource> = Api::namespaced(world.client.clone(), crate::names::NAMESPACE);
    let url = format!("file://{}", repo.display());
    // Pushes arrive by webhook; the interval is only the safety net.
    let fs: FlakeSource = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": SOURCE, "namespace": crate::names::NAMESPACE},
        "spec": {"url": url, "ref": {"branch": branch},
                 "interval": "1m", "timeout": "10s", "insecure": true,
                 "verify": {"mode": "HEAD", "secretRef": {"name": TRUSTED_KEYS}}}
    }))
    .map_err(|e| DemoError::Watch(e.to_string()))?;
    tokio::time::timeout(
        Duration::from_secs(30),
        sources.create(&PostParams::default(), &fs),
    )
    .await
    .map_err(|_| WorldError::Timeout {
        operation: "create the FlakeSource".into(),
    })?
    .map_err(|source| WorldError::Api {
        operation: "create the FlakeSource".into(),
        source,
    })?;
    let mut spec = world.spec("");
    spec.flake = String::new();
    spec.source_ref = Some(SourceRef {
        kind: SourceKind::FlakeSource,
        name: SOURCE.into(),
        namespace: None,
    });
    world.apply_all(&spec).await?;

    let cache = tempfile::Builder::new()
        .prefix("nixroll-demo-sources-")
        .tempdir()?;
    let mut config = ControllerConfig::new("nixroll-demo-controller");
    config.policy.max_unavailable = opts.max_unavailable;
    config.drain_pass_backoff = (Duration::from_millis(200), Duration::from_secs(2));
    config.follow.source_controller.cache_dir = cache.path().to_path_buf();
    config.follow.source_controller.min_interval = Duration::from_millis(500);
    let mut webhook = WebhookConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    webhook.secret_name = WEBHOOK_SECRET.into();
    config.webhook = Some(webhook);
    let webhook_bound = config.webhook_bound.clone();
    let controller = world.start_controller(config).await?;
    let Some(hook) = super::demo::wait_for_bound(&webhook_bound).await else {
        controller.stop().await;
        return Err(DemoError::Watch("the webhook receiver did not start".into()));
    };
    writeln!(
        err,
        "nixroll demo --follow: commits are signed (SSH key {}), the source verifies them; pushes are announced to the webhook receiver at http://{hook}/hook/generic",
        signer.fingerprint(),
    )?;

    let mut view = LiveView::new(&world.client, opts.json, tty, opts.timeout);

    let n = opts.world.nodes;
    // The revision every node must reach next, and when it was committed.
    let mut waiting_for = (world.head().to_string(), Instant::now());
    let mut rollouts: Vec<(String, Duration)> = Vec::new();
    let mut first_disruption: Vec<(Duration, crate::api::Phase)> = Vec::new();
    // The last push, until a node is disrupted for it.
    let mut pushed: Option<Instant> = None;
    let mut commits = 0;
    loop {
        if let Err(e) = view.next(&mut out).await {
            controller.stop().await;
            return Err(e);
        }
        if let Some(at) = pushed {
            let disrupted = view
                .progress
                .nodes
                .values()
                .map(|n| n.phase)
                .find(|p| p.is_disruptive());
            if let Some(phase) = disrupted {
                first_disruption.push((at.elapsed(), phase));
                pushed = None;
            }
        }
        if !view.progress.converged(&waiting_for.0, n) {
            continue;
        }
        let (done, since) = waiting_for.clone();
        if commits > 0 {
            rollouts.push((done.clone(), since.elapsed()));
        }
        let (message, what): (&str, fn(&mut crate::sim::flake::SystemSpec)) = match commits {
            0 => ("linux: bump kernel", |s| {
                s.kernel.push_str("-1");
                s.kernel_modules.push_str("-1");
            }),
            1 => ("wireguard: new peer", |s| s.service.push_str("-peer")),
            _ => break,
        };
        commits += 1;
        let next = world.commit(message, what)?;
        let at = Instant::now();
        let code = push_webhook(hook, &token, &url, &branch).await?;
        if code != 202 {
            controller.stop().await;
            return Err(DemoError::Watch(format!("the webhook receiver answered {code}")));
        }
        pushed = Some(at);
        if !opts.json {
            view.renderer.clear(&mut out)?;
            writeln!(
                err,
                "\nnixroll demo --follow: all nodes run {}; `git commit -m {message:?}` on {branch} made {}; no NixOSNode is edited\n",
                crate::api::short_revision(&done),
                crate::api::short_revision(&next),
            )?;
        }
        waiting_for = (next, Instant::now());
    }
    view.redraw(&mut out)?;
    let summary = FollowSummary {
        nodes: n,
        rollouts,
        first_disruption,
        nix: world.nix_mode,
    };
    writeln!(err)?;
    for (i, (rev, took)) in summary.rollouts.iter().enumerate() {
        writeln!(
            err,
            "nixroll demo --follow: commit {} ({}) reached all {} nodes {:.1}s after it was made, by itself",
            i + 1,
            crate::api::short_revision(rev),
            n,
            took.as_secs_f64()
        )?;
    }
    for (i, (took, phase)) in summary.first_disruption.iter().enumerate() {
        writeln!(
            err,
            "nixroll demo --follow: push {} (signed webhook) → first node {phase:?} after {:.2}s",
            i + 1,
            took.as_secs_f64()
        )?;
    }
    if opts.hold {
        writeln!(
            err,
            "nixroll demo --follow: holding (Ctrl-C to stop); kubectl --kubeconfig {kubeconfig} get flakesources -A"
        )?;
        shutdown.await;
    }
    controller.stop().await;
    Ok(summary)
}
