//! `nixroll demo --follow`: the demo's nodes follow a branch of the demo's flake repository
//! through a FlakeSource (`file://`, `insecure: true`). Nobody touches a NixOSNode: the demo
//! commits twice to the branch (a new kernel, then a service change) and both rollouts start
//! by themselves.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};

use super::demo::{DemoError, DemoOptions, LiveView};
use crate::api::{FlakeSource, SourceKind, SourceRef};
use crate::controller::ControllerConfig;
use crate::sim::world::{NixMode, World, WorldError};

/// Name (in `nixroll-system`) of the demo's FlakeSource.
pub const SOURCE: &str = "demo-flake";

/// What the follow demo did.
#[derive(Clone, Debug)]
pub struct FollowSummary {
    pub nodes: usize,
    /// The commits made while running, in order, and how long each took to be everywhere
    /// (from the commit, including the source's poll).
    pub rollouts: Vec<(String, Duration)>,
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
    let (repo, branch) = world.follow_in_git()?;
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

    let sources: Api<FlakeSource> = Api::namespaced(world.client.clone(), crate::names::NAMESPACE);
    let fs: FlakeSource = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": SOURCE, "namespace": crate::names::NAMESPACE},
        "spec": {"url": format!("file://{}", repo.display()), "ref": {"branch": branch},
                 "interval": "1s", "timeout": "10s", "insecure": true}
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
    let controller = world.start_controller(config).await?;

    let mut view = LiveView::new(&world.client, opts.json, tty, opts.timeout);

    let n = opts.world.nodes;
    // The revision every node must reach next, and when it was committed.
    let mut waiting_for = (world.head().to_string(), Instant::now());
    let mut rollouts: Vec<(String, Duration)> = Vec::new();
    let mut commits = 0;
    loop {
        if let Err(e) = view.next(&mut out).await {
            controller.stop().await;
            return Err(e);
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
