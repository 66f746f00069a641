//! `nixroll demo`: the embedded default. Starts a simulated cluster ([`World`]), the real
//! controller and one real agent per node, creates the NixOSNodes on the first revision,
//! commits a new revision with a new kernel (every node must reboot), bumps `spec.revision`
//! as Flux would, and follows the rollout live until every node runs it.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::api::NixOSNode;
use crate::controller::ControllerConfig;
use crate::rollout::MaxUnavailable;
use crate::sim::progress::{Progress, Renderer};
use crate::sim::steps::{StepClock, StepStats};
use crate::sim::world::{NixMode, World, WorldError, WorldOptions};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub world: WorldOptions,
    pub max_unavailable: MaxUnavailable,
    /// One JSON object per phase change instead of the table.
    pub json: bool,
    /// Keep everything running after convergence until Ctrl-C.
    pub hold: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// NixOSPools: a canary, then two concurrent pools, one behind a health gate
    /// ([`crate::sim::demo_pools`]).
    pub pools: bool,
    /// node-1 is a builder and the other nodes fetch from it ([`World::start_with_a_builder`]).
    pub builder: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            world: WorldOptions::default(),
            max_unavailable: MaxUnavailable::Count(1),
            json: false,
            hold: false,
            timeout: Duration::from_secs(180),
            pools: false,
            builder: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    World(#[from] WorldError),
    #[error(
        "the rollout did not converge within {0:?}; see the table above (kubectl describe nixosnode NAME tells why)"
    )]
    NotConverged(Duration),
    #[error("watching NixOSNodes failed: {0}")]
    Watch(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// The `kubectl … -w` lines the demos print: one command per resource type, because kubectl
/// refuses `-w` with more than one ("you may only specify a single resource type").
pub fn watch_hints(kubeconfig: &str, resources: &[&str]) -> Vec<String> {
    resources
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let label = if i == 0 { "watch:" } else { "" };
            format!("  {label:<9} kubectl --kubeconfig {kubeconfig} get {r} -w")
        })
        .collect()
}

/// The metrics server's address once the controller bound it (at most 5 s; `None` if it
/// did not, e.g. it failed to start: the demo goes on without it).
pub async fn wait_for_bound(
    bound: &std::sync::OnceLock<std::net::SocketAddr>,
) -> Option<std::net::SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(addr) = bound.get() {
            return Some(*addr);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub nodes: usize,
    pub total: Duration,
    /// Per node: time in disruptive phases.
    pub disruption: Vec<(String, Duration)>,
    /// Per node: disruption minus the simulated reboot and pod-termination time.
    pub overhead: Vec<(String, Duration)>,
    /// Where the disruption time went, per step (mean and p99 over the nodes).
    pub steps: std::collections::BTreeMap<&'static str, StepStats>,
    pub nix: NixMode,
}

/// Run the demo; `shutdown` ends `--hold`.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<DemoSummary, DemoError> {
    let mut err = std::io::stderr();
    let mut out = std::io::stdout();
    let tty = !opts.json && out.is_terminal();
    let started = Instant::now();
    let mut world = if opts.builder {
        World::start_with_a_builder(opts.world.clone()).await?
    } else {
        World::start(opts.world.clone()).await?
    };
    let kubeconfig = world.kubeconfig.display().to_string();
    writeln!(
        err,
        "nixroll demo: {} simulated NixOS nodes ({} control plane), {} Nix, embedded API at {}",
        opts.world.nodes,
        opts.world.control_planes.min(opts.world.nodes),
        match world.nix_mode {
            NixMode::Real => "real",
            _ => "simulated (no nix on this machine)",
        },
        world.embedded("the demo")?.url()
    )?;
    let watched: &[&str] = if opts.pools {
        &["nixosnodes", "nodes", "nixospools"]
    } else {
        &["nixosnodes", "nodes"]
    };
    if opts.builder {
        writeln!(
            err,
            "  builder:  node-1 (nixroll.io/builder=true) evaluates and builds every node's system once, signs it and serves it; node-2…node-{} fetch it, signatures required",
            opts.world.nodes
        )?;
    }
    for line in watch_hints(&kubeconfig, watched) {
        writeln!(err, "{line}")?;
    }
    writeln!(
        err,
        "  inspect:  kubectl --kubeconfig {kubeconfig} describe nixosnode node-1"
    )?;

    // The NixOSNodes on the revision the hosts run; then the controller adopts them. The
    // first node also gets a secret file from a Secret, rotated while the rollout runs.
    let first = world.head().to_string();
    let secret_node = world.nodes.first().map(|n| n.name.clone());
    if let Some(node) = &secret_node {
        put_demo_secret(&world, node, b"demo-vpn-key-generation-1").await?;
    }
    apply_specs(&world, &first, secret_node.as_deref()).await?;
    if opts.pools {
        writeln!(err, "nixroll demo --pools:")?;
        for line in crate::sim::demo_pools::set_up(&world).await? {
            writeln!(err, "{line}")?;
        }
    }
    let mut config = ControllerConfig::new("nixroll-demo-controller");
    config.policy.max_unavailable = opts.max_unavailable;
    config.drain_pass_backoff = (Duration::from_millis(200), Duration::from_secs(2));
    // The controller's /metrics on a free local port, for the user to try.
    config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = config.metrics_bound.clone();
    let controller = world.start_controller(config).await?;
    if let Some(addr) = wait_for_bound(&bound).await {
        writeln!(err, "  metrics:  curl http://{addr}/metrics")?;
    }
    let clock = StepClock::start(&world.embedded("the demo's step clock")?.store());

    let mut view = LiveView::new(&world.client, opts.json, tty, opts.timeout);

    let n = opts.world.nodes;
    let mut target: Option<String> = None;
    let mut rollout_started = Instant::now();
    let mut secret_rv: Option<String> = None;
    let mut evaluated_before = BTreeMap::new();
    // Everything the builder reported over the rollout (it drops a build from its report once
    // no node wants it any more).
    let mut builds_seen: BTreeMap<String, Vec<crate::api::BuildReport>> = BTreeMap::new();
    loop {
        let obj = match view.next(&mut out).await {
            Ok(obj) => obj,
            Err(e) => {
                controller.stop().await;
                return Err(e);
            }
        };
        if let Some(line) =
            secret_rotation_line(&obj, secret_node.as_deref(), &mut secret_rv, target.is_some())
        {
            view.renderer.clear(&mut out)?;
            writeln!(err, "{line}")?;
        }
        if let Some(a) = obj.status.as_ref().and_then(|s| s.agent.as_ref())
            && !a.builds.is_empty()
        {
            let seen = builds_seen
                .entry(obj.metadata.name.clone().unwrap_or_default())
                .or_default();
            for r in &a.builds {
                match seen.iter_mut().find(|x| x.installable == r.installable) {
                    Some(x) => *x = r.clone(),
                    None => seen.push(r.clone()),
                }
            }
        }
        let progress = &mut view.progress;
        match &target {
            None if progress.converged(&first, n) => {
                // Everyone adopted; now "merge the pull request": a new kernel.
                let next = world.commit("linux: bump kernel", |s| {
                    s.kernel.push_str("-1");
                    s.kernel_modules.push_str("-1");
                })?;
                if !opts.json {
                    view.renderer.clear(&mut out)?;
                    writeln!(
                        err,
                        "\nnixroll demo: all nodes run {}; rolling out {} (new kernel: every node reboots)\n",
                        crate::api::short_revision(&first),
                        crate::api::short_revision(&next)
                    )?;
                }
                evaluated_before = evaluations(&world);
                builds_seen.clear();
                apply_specs(&world, &next, secret_node.as_deref()).await?;
                if opts.pools {
                    writeln!(
                        err,
                        "nixroll demo: the storage health gate of pool zone-b blocks for {:?}, then passes",
                        crate::sim::demo_pools::GATE_BLOCKS_FOR
                    )?;
                    let _healer = crate::sim::demo_pools::heal_storage_later(&world);
                }
                if let Some(node) = &secret_node {
                    // The password manager rotated the key: only the file changes, live.
                    put_demo_secret(&world, node, b"demo-vpn-key-generation-2").await?;
                }
                clock.reset();
                for p in progress.nodes.values_mut() {
                    p.disrupted_for = Duration::ZERO;
                }
                rollout_started = Instant::now();
                target = Some(next);
            }
            Some(t) if progress.converged(t, n) => break,
            _ => {}
        }
    }
    let total = rollout_started.elapsed();
    view.redraw(&mut out)?;
    let progress = view.progress;
    // The last uncordon follows the last UpToDate write: let the clock see it (bounded).
    clock.wait_finished(n, Duration::from_secs(5)).await;

    let t = &opts.world.timing;
    let simulated = t.reboot + t.pod_termination;
    let summary = DemoSummary {
        nodes: n,
        total,
        disruption: progress
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), v.disrupted_for))
            .collect(),
        overhead: progress
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), v.disrupted_for.saturating_sub(simulated)))
            .collect(),
        steps: clock.stats(),
        nix: world.nix_mode,
    };
    // On stderr, so that `--json`'s standard output stays one phase change per line.
    print_summary(&mut err, &summary, simulated, started.elapsed())?;
    if opts.builder {
        let rev = target.clone().unwrap_or_default();
        let this_rollout: BTreeMap<String, Vec<crate::api::BuildReport>> = builds_seen
            .into_iter()
            .map(|(b, rs)| {
                let rs = rs.into_iter().filter(|r| r.installable.contains(&rev)).collect();
                (b, rs)
            })
            .collect();
        for line in who_built(&world, &evaluated_before, &this_rollout).await? {
            writeln!(err, "{line}")?;
        }
    }
    if opts.hold {
        writeln!(
            err,
            "nixroll demo: holding (Ctrl-C to stop); kubectl --kubeconfig {kubeconfig} get nixosnodes"
        )?;
        shutdown.await;
    }
    controller.stop().await;
    Ok(summary)
}

/// What both demos show: a watch of every NixOSNode, the progress it feeds, and the renderer
/// that draws it (redrawn every 250 ms for the elapsed times), up to a deadline.
pub(super) struct LiveView {
    stream: futures::stream::BoxStream<'static, Result<NixOSNode, watcher::Error>>,
    pub(super) progress: Progress,
    pub(super) renderer: Renderer,
    tick: tokio::time::Interval,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl LiveView {
    pub(super) fn new(client: &kube::Client, json: bool, tty: bool, timeout: Duration) -> LiveView {
        let api: Api<NixOSNode> = Api::all(client.clone());
        LiveView {
            stream: watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed(),
            progress: Progress::default(),
            renderer: Renderer::new(json, tty),
            tick: tokio::time::interval(Duration::from_millis(250)),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }

    /// The next NixOSNode change, already recorded and drawn. Fails when the deadline passes
    /// (`NotConverged`) or the watch ends; an interrupted watch re-lists and resumes by itself.
    pub(super) async fn next(&mut self, out: &mut impl Write) -> Result<NixOSNode, DemoError> {
        loop {
            tokio::select! {
                _ = &mut self.deadline => return Err(DemoError::NotConverged(self.timeout)),
                _ = self.tick.tick() => self.redraw(out)?,
                next = self.stream.try_next() => match next {
                    Ok(Some(obj)) => {
                        if let Some(change) = self.progress.observe(&obj, Instant::now()) {
                            self.renderer.change(out, &change)?;
                            self.redraw(out)?;
                        }
                        return Ok(obj);
                    }
                    Ok(None) => return Err(DemoError::Watch("the watch ended".into())),
                    Err(e) => tracing::warn!(error = %e, "NixOSNode watch interrupted; resuming"),
                },
            }
        }
    }

    pub(super) fn redraw(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.renderer.redraw(out, &self.progress, Instant::now())
    }
}

/// Host path of the demo's secret file.
const DEMO_SECRET_PATH: &str = "/etc/wireguard/wg0.key";

fn demo_secret_name(node: &str) -> String {
    format!("{node}-vpn")
}

/// Create or update the demo's Secret (server-side apply, as an external secrets operator would).
async fn put_demo_secret(world: &World, node: &str, value: &[u8]) -> Result<(), WorldError> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    let api: Api<Secret> = Api::namespaced(world.client.clone(), crate::api::SECRETS_NAMESPACE);
    let name = demo_secret_name(node);
    let mut s = Secret::default();
    s.metadata.name = Some(name.clone());
    s.data = Some([("key".to_string(), k8s_openapi::ByteString(value.to_vec()))].into());
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        api.patch(
            &name,
            &PatchParams::apply("external-secrets").force(),
            &Patch::Apply(&s),
        ),
    )
    .await;
    match res {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(WorldError::Api {
            operation: format!("apply Secret {name}"),
            source,
        }),
        Err(_) => Err(WorldError::Timeout {
            operation: format!("apply Secret {name}"),
        }),
    }
}

/// Every node's spec for `revision`; `secret_node` also gets the demo's secret file.
async fn apply_specs(world: &World, revision: &str, secret_node: Option<&str>) -> Result<(), WorldError> {
    for n in &world.nodes {
        let mut spec = world.spec(revision);
        if secret_node == Some(n.name.as_str()) {
            spec.secrets = vec![crate::api::SecretFile {
                secret_ref: crate::api::SecretKeyRef {
                    name: demo_secret_name(&n.name),
                    key: "key".into(),
                },
                path: DEMO_SECRET_PATH.into(),
                mode: "0400".into(),
                owner: "root:root".into(),
                restart_units: vec!["wireguard-wg0.service".into()],
            }];
        }
        world.apply(&n.name, &spec).await?;
    }
    Ok(())
}

/// A status line when the demo node's secret file was rewritten during the rollout (seen as a
/// new resourceVersion in `status.agent.secrets`; the content is never shown).
fn secret_rotation_line(
    obj: &NixOSNode,
    node: Option<&str>,
    last: &mut Option<String>,
    rolling: bool,
) -> Option<String> {
    if node.is_none() || obj.metadata.name.as_deref() != node {
        return None;
    }
    let file = obj
        .status
        .as_ref()?
        .agent
        .as_ref()?
        .secrets
        .iter()
        .find(|s| s.path == DEMO_SECRET_PATH)?;
    let before = last.replace(file.resource_version.clone());
    match before {
        Some(b) if b != file.resource_version && rolling => Some(format!(
            "nixroll demo: {} secret {} rewritten from Secret {} (resourceVersion {b} → {}) while the rollout runs; wireguard-wg0.service restarted, no reboot for it",
            node.unwrap_or_default(),
            file.path,
            file.secret_ref,
            file.resource_version
        )),
        _ => None,
    }
}

fn print_summary(
    out: &mut impl Write,
    s: &DemoSummary,
    simulated: Duration,
    wall: Duration,
) -> std::io::Result<()> {
    let secs = |d: Duration| d.as_secs_f64();
    writeln!(out)?;
    writeln!(
        out,
        "nixroll demo: {} nodes rolled out in {:.1}s ({:.1}s including set-up)",
        s.nodes,
        secs(s.total),
        secs(wall)
    )?;
    writeln!(
        out,
        "  per node: disruption (cordon → uncordon) and orchestration overhead (disruption − {:.2}s simulated reboot and pod termination)",
        secs(simulated)
    )?;
    for ((node, d), (_, o)) in s.disruption.iter().zip(s.overhead.iter()) {
        writeln!(
            out,
            "  {node:<10} disruption {:>5.2}s   overhead {:>5.2}s",
            secs(*d),
            secs(*o)
        )?;
    }
    let mean = s.overhead.iter().map(|(_, o)| secs(*o)).sum::<f64>() / s.overhead.len().max(1) as f64;
    writeln!(out, "  mean overhead per node: {mean:.2}s")?;
    writeln!(
        out,
        "  where the disruption time went (cordon → uncordon, per step):"
    )?;
    for line in crate::sim::steps::render(&s.steps) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Evaluations so far per host: the `nixos-system-*.drv` files in its store (a node that
/// fetches its system never instantiates one).
fn evaluations(world: &World) -> BTreeMap<String, usize> {
    world
        .nodes
        .iter()
        .map(|n| {
            let drvs = std::fs::read_dir(n.host.root().join("nix/store"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| {
                    let f = e.file_name();
                    let f = f.to_string_lossy();
                    f.contains("-nixos-system-") && f.ends_with(".drv")
                })
                .count();
            (n.name.clone(), drvs)
        })
        .collect()
}

/// Who built and who fetched in the rollout of `--builder`: the builder's reports, and for
/// each node the system it runs, where it came from and (for the others) how many systems it
/// evaluated during the rollout.
async fn who_built(
    world: &World,
    before: &BTreeMap<String, usize>,
    builds_seen: &BTreeMap<String, Vec<crate::api::BuildReport>>,
) -> Result<Vec<String>, DemoError> {
    let api: kube::Api<crate::api::NixOSNode> = kube::Api::all(world.client.clone());
    let objs = crate::sim::world::call("list the NixOSNodes", api.list(&Default::default())).await?;
    let after = evaluations(world);
    let builder_reports: Vec<(String, Vec<crate::api::BuildReport>)> =
        builds_seen.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut lines = vec!["  who built and who fetched (this rollout):".to_string()];
    for (b, reports) in &builder_reports {
        let built = reports
            .iter()
            .filter(|r| r.state == crate::api::BuildState::Built)
            .count();
        lines.push(format!(
            "  {b:<10} builder: built {built} systems for {} nodes, signed, served from its cache",
            objs.items.len()
        ));
    }
    for o in &objs.items {
        let name = o.metadata.name.clone().unwrap_or_default();
        let Some(st) = o.status.as_ref() else { continue };
        let system = st.system.clone().unwrap_or_default();
        let from = builder_reports.iter().find_map(|(b, rs)| {
            rs.iter()
                .any(|r| r.system.as_deref() == Some(system.as_str()))
                .then_some(b.as_str())
        });
        let evaluated = after
            .get(&name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(&name).copied().unwrap_or(0));
        let how = match from {
            Some(b) if b == name => "built it (the builder)".to_string(),
            Some(b) => format!("fetched it from {b}; systems it evaluated: {evaluated}"),
            None => format!("built it itself (no builder); systems it evaluated: {evaluated}"),
        };
        lines.push(format!(
            "  {name:<10} runs {} — {how}",
            crate::api::short_system(&system)
        ));
    }
    Ok(lines)
}
