//! `nixroll bench`: the scale benchmark. A simulated cluster of N nodes and P pods on the
//! embedded API (real agents with the simulated store, simulated kubelets), the REAL
//! controller binary as a child process (so its memory is its own) talking to its own port of
//! the same API server (so its requests are counted apart), one rollout of a new kernel.
//!
//! Reports: controller resident memory (peak and end), controller API requests per node update
//! by verb and resource, reconcile latency p50/p99 (from the controller's own
//! `nixroll_reconcile_duration_seconds` histogram), orchestration overhead per node (time in
//! disruptive phases minus the simulated reboot and pod termination), total rollout time.
//!
//! With `kube_assets` (`nixroll bench --kube-assets DIR`) the same runs on a REAL control plane
//! ([`crate::sim::controlplane`]: etcd, kube-apiserver, kube-controller-manager) instead of
//! the embedded API: every part as the admin (no RBAC, no agent admission policy — a
//! benchmark, not a check), the per-step breakdown from kube watches through the API server
//! ([`StepClock::watching`]), no request counts (the embedded API counts them; a real one
//! does not). Use a modest node count there: etcd and the API server share the machine.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::api::NixOSNode;
use crate::sim::agent_memory::{self, AgentMemory};
use crate::sim::cluster::{App, Timing};
use crate::sim::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::sim::progress::Progress;
use crate::sim::steps::StepClock;
use crate::sim::steps::StepStats;
use crate::sim::world::{NixMode, World, WorldError, WorldOptions};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub nodes: usize,
    pub pods: usize,
    /// `--max-unavailable` of the controller.
    pub max_unavailable: String,
    pub timing: Timing,
    pub timeout: Duration,
    /// Stop after the NixOSNodes are adopted (no rollout): measures the controller at full
    /// cluster size without the drain churn.
    pub adopt_only: bool,
    /// Run on a real control plane started from this directory of binaries (envtest's
    /// layout, see [`crate::sim::controlplane`]) instead of the embedded API.
    pub kube_assets: Option<PathBuf>,
    /// After the rollout (and its measurements), revert every node to the revision before
    /// and measure until all are `UpToDate` on it again, counting the agents' `nix build`s.
    pub revert: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            nodes: 1000,
            pods: 30_000,
            max_unavailable: "10".into(),
            timing: Timing {
                pod_termination: Duration::from_millis(100),
                pod_startup: Duration::from_millis(200),
                reboot: Duration::from_millis(1000),
                request_timeout: Duration::from_secs(30),
            },
            timeout: Duration::from_secs(1800),
            adopt_only: false,
            kube_assets: None,
            revert: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    World(#[from] WorldError),
    #[error("starting the controller ({0}): {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{0} did not finish within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the controller process exited early: {0}")]
    ControllerExited(String),
    #[error("the real control plane: {0}")]
    ControlPlane(#[from] crate::sim::controlplane::ControlPlaneError),
}

/// One node's disruption window (nixroll's cordon to its uncordon, as the step clock saw them).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeWindow {
    pub window_s: f64,
    /// The window minus the simulated reboot (shutdown and boot) and pod termination.
    pub overhead_s: f64,
}

/// The numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub nodes: usize,
    pub pods: usize,
    pub max_unavailable: String,
    pub setup_seconds: f64,
    pub adoption_seconds: f64,
    pub rollout_seconds: f64,
    pub controller_rss_peak_mib: f64,
    pub controller_rss_end_mib: f64,
    /// One real `nixroll agent` process (this executable) idle on an up-to-date node, 5 s
    /// after it started: see [`crate::sim::agent_memory`]. Zero with `--adopt-only`.
    pub agent_idle: AgentMemory,
    /// Controller requests during the rollout per updated node, by "verb resource".
    pub requests_per_node: BTreeMap<String, f64>,
    pub requests_total: u64,
    /// All agents' requests during the rollout per updated node, by "verb resource".
    pub agent_requests_per_node: BTreeMap<String, f64>,
    pub reconcile_p50_ms: f64,
    pub reconcile_p99_ms: f64,
    pub reconciles: u64,
    pub overhead_p50_s: f64,
    pub overhead_p99_s: f64,
    pub overhead_mean_s: f64,
    pub disruption_mean_s: f64,
    /// "embedded" or "kube-apiserver".
    pub api: &'static str,
    /// Per node: the cordon-to-uncordon window and its overhead.
    pub windows: BTreeMap<String, NodeWindow>,
    /// Mean overhead of those windows.
    pub window_overhead_mean_s: f64,
    /// Where the disruption time went: mean and p99 per step (see [`crate::sim::steps`]).
    pub steps: BTreeMap<&'static str, StepStats>,
    /// With `revert`: the revert to the revision before, after the rollout was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revert: Option<BenchRevert>,
}

/// `nixroll bench --revert`: every node back to the revision before the rollout.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRevert {
    /// From setting every `spec.revision` back to every node `UpToDate` on it.
    pub seconds: f64,
    /// The agents' `nix build`s and substitutions for the revert (0: the previous system
    /// stays pinned).
    pub realisations: usize,
    /// … and for the rollout before it.
    pub forward_realisations: usize,
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// GET /metrics from the controller (plain HTTP/1.0, bounded).
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Quantile from a Prometheus histogram's cumulative buckets (linear within a bucket).
pub fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<(f64, u64)> {
    let prefix = format!("{metric}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for &(le, n) in &buckets {
        if n as f64 >= rank {
            if le.is_infinite() {
                return Some((prev.0, total));
            }
            let span = (n - prev.1) as f64;
            let frac = if span > 0.0 {
                (rank - prev.1 as f64) / span
            } else {
                1.0
            };
            return Some((prev.0 + (le - prev.0) * frac, total));
        }
        prev = (le, n);
    }
    Some((prev.0, total))
}

/// p50 and p99 (seconds) and count of the controller's reconcile-duration histogram.
fn reconcile_latency(metrics: &str) -> (f64, f64, u64) {
    let hist = "nixroll_reconcile_duration_seconds";
    let (p50, n) = histogram_quantile(metrics, hist, 0.5).unwrap_or((0.0, 0));
    let (p99, _) = histogram_quantile(metrics, hist, 0.99).unwrap_or((0.0, 0));
    (p50, p99, n)
}

/// Requests between two snapshots, per node, by "verb resource".
fn requests_per_node(
    before: &embedded_apiserver::RequestCounts,
    after: &embedded_apiserver::RequestCounts,
    nodes: usize,
) -> BTreeMap<String, f64> {
    after
        .counts
        .iter()
        .filter_map(|((verb, res), n)| {
            let was = before.get(verb, res);
            (*n > was).then(|| (format!("{verb} {res}"), (*n - was) as f64 / nodes.max(1) as f64))
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Run the benchmark; progress goes to stderr.
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let t0 = Instant::now();
    let per_node = opts.pods / opts.nodes.max(1);
    // Apps of 30 replicas whose PDBs allow 3 disruptions each.
    let apps: Vec<App> = (0..opts.pods.div_ceil(30))
        .map(|i| App {
            name: format!("svc-{i}"),
            replicas: 30.min(opts.pods - i * 30),
            min_available: Some(27.min(opts.pods - i * 30).saturating_sub(3) as i32),
        })
        .collect();
    eprintln!(
        "nixroll bench: starting {} nodes, {} pods ({per_node} per node) ...",
        opts.nodes, opts.pods
    );
    let world_opts = WorldOptions {
        nodes: opts.nodes,
        control_planes: 3.min(opts.nodes),
        nix: NixMode::Simulated,
        timing: opts.timing.clone(),
        pods_per_node: per_node,
        apps: Some(apps),
    };
    let plane = match &opts.kube_assets {
        Some(assets) => {
            let plane = ControlPlane::start(&ControlPlaneOptions {
                assets: assets.clone(),
                controller_manager: true,
            })
            .await?;
            plane.install_for_bench().await?;
            eprintln!(
                "nixroll bench: real control plane at {} ({})",
                plane.url,
                plane.dir().display()
            );
            Some(plane)
        }
        None => None,
    };
    let mut world = match &plane {
        Some(plane) => World::start_external(world_opts, plane.admin_identities().await?).await?,
        None => World::start(world_opts).await?,
    };
    let setup = t0.elapsed();
    eprintln!(
        "nixroll bench: set up in {:.1}s; kubectl --kubeconfig {} get nixosnodes",
        setup.as_secs_f64(),
        world.kubeconfig.display()
    );

    // The controller: the real binary, its own port of the embedded API (or the admin's
    // kubeconfig of the real one).
    let (listener, kubeconfig) = match &plane {
        Some(plane) => (None, plane.admin_kubeconfig()),
        None => {
            let listener = embedded_apiserver::ApiServer::start_on(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                world.embedded("the bench")?.store(),
            )
            .await
            .map_err(WorldError::from)?;
            let kubeconfig = world.kubeconfig.with_file_name("controller-kubeconfig");
            listener
                .write_kubeconfig(&kubeconfig)
                .map_err(|e| BenchError::Spawn("kubeconfig".into(), e))?;
            (Some(listener), kubeconfig)
        }
    };
    let counts = |l: &Option<embedded_apiserver::ApiServer>| {
        l.as_ref().map(|l| l.request_counts()).unwrap_or_default()
    };
    // The step clock follows from before adoption, so its watches are in sync when the
    // rollout starts; adoption disrupts nothing, and what it saw is reset below.
    let clock = match &plane {
        Some(_) => StepClock::watching(world.client.clone()),
        None => StepClock::start(&world.embedded("the bench's step clock")?.store()),
    };
    let metrics_port = free_port().map_err(|e| BenchError::Spawn("port".into(), e))?;
    let exe = std::env::current_exe().map_err(|e| BenchError::Spawn("current exe".into(), e))?;
    // NIXROLL_BENCH_CONTROLLER_WRAP (e.g. "heaptrack -o /tmp/controller"): run the controller
    // under a profiler. Its memory is then the profiler's process, so only for profiling.
    let wrap: Vec<String> = std::env::var("NIXROLL_BENCH_CONTROLLER_WRAP")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => tokio::process::Command::new(&exe),
    };
    let mut child = command
        .args([
            "controller",
            "--no-leader-election",
            "--max-unavailable",
            &opts.max_unavailable,
        ])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env("KUBECONFIG", &kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("NIXROLL_BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Spawn(exe.display().to_string(), e))?;
    let pid = child.id().unwrap_or(0);

    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await?;
    let t_adopt = Instant::now();
    let mut progress = Progress::default();
    follow(
        &world,
        &mut progress,
        &first,
        opts.nodes,
        opts.timeout,
        &mut child,
        pid,
        &mut 0,
    )
    .await?;
    let adoption = t_adopt.elapsed();
    eprintln!(
        "nixroll bench: {} nodes adopted in {:.1}s",
        opts.nodes,
        adoption.as_secs_f64()
    );

    if opts.adopt_only {
        let counts = counts(&listener);
        let (rss_end, hwm) = rss_kib(pid).unwrap_or((0, 0));
        let metrics = scrape(metrics_port).unwrap_or_default();
        let (p50, p99, n) = reconcile_latency(&metrics);
        let _ = child.kill().await;
        return Ok(BenchReport {
            nodes: opts.nodes,
            pods: opts.pods,
            max_unavailable: opts.max_unavailable.clone(),
            setup_seconds: setup.as_secs_f64(),
            adoption_seconds: adoption.as_secs_f64(),
            rollout_seconds: 0.0,
            controller_rss_peak_mib: hwm as f64 / 1024.0,
            controller_rss_end_mib: rss_end as f64 / 1024.0,
            agent_idle: AgentMemory::default(),
            requests_per_node: requests_per_node(&Default::default(), &counts, opts.nodes),
            requests_total: counts.total(),
            agent_requests_per_node: BTreeMap::new(),
            reconcile_p50_ms: p50 * 1000.0,
            reconcile_p99_ms: p99 * 1000.0,
            reconciles: n,
            overhead_p50_s: 0.0,
            overhead_p99_s: 0.0,
            overhead_mean_s: 0.0,
            disruption_mean_s: 0.0,
            api: if plane.is_some() {
                "kube-apiserver"
            } else {
                "embedded"
            },
            windows: BTreeMap::new(),
            window_overhead_mean_s: 0.0,
            steps: BTreeMap::new(),
            revert: None,
        });
    }
    let before = counts(&listener);
    let agents_before = world
        .embedded_agents("the bench")
        .map(|a| a.request_counts())
        .unwrap_or_default();
    let metrics_before = scrape(metrics_port).unwrap_or_default();
    let next = world.commit("new kernel", |s| {
        s.kernel.push_str("-next");
        s.kernel_modules.push_str("-next");
    })?;
    clock.reset();
    let forward_from = world.realisations();
    world.apply_all(&world.spec(&next)).await?;
    for p in progress.nodes.values_mut() {
        p.disrupted_for = Duration::ZERO;
    }
    let t_roll = Instant::now();
    let mut peak = 0u64;
    follow(
        &world,
        &mut progress,
        &next,
        opts.nodes,
        opts.timeout,
        &mut child,
        pid,
        &mut peak,
    )
    .await?;
    let rollout = t_roll.elapsed();
    clock.wait_finished(opts.nodes, Duration::from_secs(10)).await;
    let after = counts(&listener);
    let agents_after = world
        .embedded_agents("the bench")
        .map(|a| a.request_counts())
        .unwrap_or_default();
    let metrics = scrape(metrics_port).unwrap_or_default();
    let (rss_end, hwm) = rss_kib(pid).unwrap_or((0, 0));
    peak = peak.max(hwm);
    // The rollout's per-node windows and steps, before a revert adds its own.
    let finished = clock.finished();
    let steps = clock.stats();
    let revert = if opts.revert {
        let before = world.realisations();
        let t_revert = Instant::now();
        world.apply_all(&world.spec(&first)).await?;
        let mut revert_progress = Progress::default();
        let mut revert_peak = 0u64;
        follow(
            &world,
            &mut revert_progress,
            &first,
            opts.nodes,
            opts.timeout,
            &mut child,
            pid,
            &mut revert_peak,
        )
        .await?;
        Some(BenchRevert {
            seconds: t_revert.elapsed().as_secs_f64(),
            realisations: world.realisations().saturating_sub(before),
            forward_realisations: before.saturating_sub(forward_from),
        })
    } else {
        None
    };
    let _ = child.kill().await;
    let agent_idle = match world.nodes.first() {
        Some(n) => {
            agent_memory::idle_agent_memory(&exe, &kubeconfig, &n.name, n.host.root(), Duration::from_secs(5))
                .await
                .map_err(|e| BenchError::Spawn("the idle agent".into(), e))?
        }
        None => AgentMemory::default(),
    };

    let per_node_requests = requests_per_node(&before, &after, opts.nodes);
    let agent_requests_per_node = requests_per_node(&agents_before, &agents_after, opts.nodes);
    let (p50, p99, n_after) = reconcile_latency(&metrics);
    let (_, _, n_before) = reconcile_latency(&metrics_before);
    let simulated = opts.timing.reboot + crate::sim::world::SHUTDOWN + opts.timing.pod_termination;
    let mut overheads: Vec<f64> = progress
        .nodes
        .values()
        .map(|p| p.disrupted_for.saturating_sub(simulated).as_secs_f64())
        .collect();
    overheads.sort_by(f64::total_cmp);
    let disruption_mean = progress
        .nodes
        .values()
        .map(|p| p.disrupted_for.as_secs_f64())
        .sum::<f64>()
        / opts.nodes.max(1) as f64;
    let windows: BTreeMap<String, NodeWindow> = finished
        .into_iter()
        .filter_map(|(node, d)| {
            let window = d.uncordoned?.saturating_duration_since(d.cordoned?);
            Some((
                node,
                NodeWindow {
                    window_s: window.as_secs_f64(),
                    overhead_s: window.saturating_sub(simulated).as_secs_f64(),
                },
            ))
        })
        .collect();
    let window_overhead_mean_s =
        windows.values().map(|w| w.overhead_s).sum::<f64>() / windows.len().max(1) as f64;
    drop(world);
    drop(plane);
    Ok(BenchReport {
        nodes: opts.nodes,
        pods: opts.pods,
        max_unavailable: opts.max_unavailable.clone(),
        setup_seconds: setup.as_secs_f64(),
        adoption_seconds: adoption.as_secs_f64(),
        rollout_seconds: rollout.as_secs_f64(),
        controller_rss_peak_mib: peak as f64 / 1024.0,
        controller_rss_end_mib: rss_end as f64 / 1024.0,
        agent_idle,
        requests_total: after.total() - before.total(),
        requests_per_node: per_node_requests,
        agent_requests_per_node,
        reconcile_p50_ms: p50 * 1000.0,
        reconcile_p99_ms: p99 * 1000.0,
        reconciles: n_after.saturating_sub(n_before),
        overhead_p50_s: percentile(&overheads, 0.5),
        overhead_p99_s: percentile(&overheads, 0.99),
        overhead_mean_s: overheads.iter().sum::<f64>() / overheads.len().max(1) as f64,
        disruption_mean_s: disruption_mean,
        api: if opts.kube_assets.is_some() {
            "kube-apiserver"
        } else {
            "embedded"
        },
        windows,
        window_overhead_mean_s,
        steps,
        revert,
    })
}

/// Watch NixOSNodes until all run `rev`, sampling the controller's memory once a second.
#[allow(clippy::too_many_arguments)]
async fn follow(
    world: &World,
    progress: &mut Progress,
    rev: &str,
    n: usize,
    limit: Duration,
    child: &mut tokio::process::Child,
    pid: u32,
    peak: &mut u64,
) -> Result<(), BenchError> {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = &mut deadline => return Err(BenchError::Timeout("the rollout", limit)),
            status = child.wait() => {
                return Err(BenchError::ControllerExited(format!("{status:?}")));
            }
            _ = sample.tick() => {
                if let Some((rss, _)) = rss_kib(pid) {
                    *peak = (*peak).max(rss);
                }
                if last_report.elapsed() >= Duration::from_secs(10) {
                    last_report = Instant::now();
                    let done = progress.nodes.values().filter(|p| p.revision.as_deref() == Some(rev) && p.phase == crate::api::Phase::UpToDate).count();
                    eprintln!("nixroll bench: {done}/{n} nodes on {}", crate::api::short_revision(rev));
                }
            }
            next = stream.try_next() => {
                if let Ok(Some(o)) = next {
                    progress.observe(&o, Instant::now());
                    if progress.converged(rev, n) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let text = "x_bucket{le=\"0.01\"} 50\nx_bucket{le=\"0.1\"} 90\nx_bucket{le=\"1.0\"} 100\nx_bucket{le=\"+Inf\"} 100\n";
        let (p50, n) = histogram_quantile(text, "x", 0.5).unwrap();
        assert_eq!(n, 100);
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let (p95, _) = histogram_quantile(text, "x", 0.95).unwrap();
        assert!((p95 - 0.55).abs() < 1e-9, "{p95}");
        assert!(histogram_quantile("", "x", 0.5).is_none());
    }
}
