//! Prometheus metrics and the health endpoints. Label values are bounded: phase names and the
//! fixed error categories, never error text or node names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

/// The webhook receiver's verdict on a request (a fixed set, [`crate::controller::webhook::RESULTS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// A NixOSPool and one of its node counts (`nodes`, `updated`, `ready`, `unavailable`,
/// `degraded`). Pool names are bounded by the pools a cluster has.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabel {
    pub pool: String,
    pub state: &'static str,
}

/// A NixOSPool and one of its health gates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolGateLabel {
    pub pool: String,
    pub gate: String,
}

/// A NixOSPool and the reason of its `Updating` condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

/// All metrics of the controller, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// The `process_*` metrics, without nixroll's prefix (their standard names).
    process_registry: Registry,
    pub nodes: Family<PhaseLabel, Gauge>,
    pub phase_duration: Family<PhaseLabel, Histogram>,
    pub failures: Family<CategoryLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<CategoryLabel, Counter>,
    /// 1 while this replica leads (reconciles), 0 while it stands by.
    pub leader: Gauge,
    /// 1 while the cluster-wide pause ConfigMap exists (as the leader last saw it).
    pub paused: Gauge,
    /// 1 while admissions are halted: at least `--failure-threshold` nodes are Degraded.
    pub halted: Gauge,
    /// Per NixOSPool: node counts by state.
    pub pool_nodes: Family<PoolStateLabel, Gauge>,
    /// Per NixOSPool and health gate: 1 when its last evaluation passed, 0 when it blocked.
    pub gate_passing: Family<PoolGateLabel, Gauge>,
    /// Per NixOSPool (or `(default)`) and health gate: seconds it blocked, counted from each
    /// evaluation that blocked to the next evaluation.
    pub gate_blocked_seconds: Family<PoolGateLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Per NixOSPool: 1 while it admits nothing because it waits (order, soak, pause, invalid).
    pub pool_blocked: Family<PoolLabel, Gauge>,
    /// Webhook requests by result (`accepted`, `unauthorized`, `too_large`, `rate_limited`, …).
    pub webhook: Family<WebhookLabel, Counter>,
    /// This process: resident memory, CPU time, open file descriptors, start time.
    process: ProcessMetrics,
}

/// The standard `process_*` metrics of this process, read from /proc at each scrape (so a
/// standby replica, which reconciles nothing, still shows its memory and CPU).
#[derive(Default)]
struct ProcessMetrics {
    resident_memory_bytes: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    open_fds: Gauge,
    start_time_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessMetrics {
    fn register(&self, registry: &mut Registry) {
        let process = registry.sub_registry_with_prefix("process");
        // (`registry` has no prefix: the names are the standard `process_*`.)
        process.register(
            "resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_memory_bytes.clone(),
        );
        process.register(
            "cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.cpu_seconds.clone(),
        );
        process.register(
            "open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
        process.register(
            "start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time_seconds.clone(),
        );
    }

    /// Read /proc/self (Linux); values that cannot be read keep their last value.
    fn refresh(&self) {
        const PAGE: i64 = 4096;
        const TICKS: f64 = 100.0; // USER_HZ on Linux
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
            && let Some(rss) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<i64>().ok())
        {
            self.resident_memory_bytes.set(rss * PAGE);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, after)) = stat.rsplit_once(')')
        {
            // Fields after the command name, from field 3 (state): utime is 14, stime 15,
            // starttime 22 (1-based over the whole line).
            let fields: Vec<&str> = after.split_whitespace().collect();
            let num = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (num(14), num(15)) {
                // A counter: add what was spent since the last scrape.
                let spent = (u + s) / TICKS - self.cpu_seconds.get();
                if spent > 0.0 {
                    self.cpu_seconds.inc_by(spent);
                }
            }
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            });
            if let (Some(start), Some(boot)) = (num(22), boot) {
                self.start_time_seconds.set(boot + start / TICKS);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(dir.count()).unwrap_or(i64::MAX));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nixroll");
        let nodes = Family::<PhaseLabel, Gauge>::default();
        let phase_duration = Family::<PhaseLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        let failures = Family::<CategoryLabel, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let reconcile_errors = Family::<CategoryLabel, Counter>::default();
        // Every failure category exists from the start at 0, so `rate()` and alerts work before
        // the first failure.
        for category in crate::rollout::reason::FAILURES {
            failures.get_or_create(&CategoryLabel { category }).inc_by(0);
        }
        for phase in Phase::ALL {
            nodes
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(0);
        }
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "nixroll's version (always 1)", build_info);
        let (leader, paused, halted) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "leader",
            "1 while this replica leads, 0 while it stands by",
            leader.clone(),
        );
        registry.register(
            "paused",
            "1 while the nixroll-pause ConfigMap pauses every new disruptive step",
            paused.clone(),
        );
        registry.register(
            "halted",
            "1 while admissions are halted because at least --failure-threshold nodes are Degraded",
            halted.clone(),
        );
        let process = ProcessMetrics::default();
        let mut process_registry = Registry::default();
        process.register(&mut process_registry);
        registry.register("nodes", "NixOSNodes per rollout phase", nodes.clone());
        registry.register(
            "phase_duration_seconds",
            "Time spent in each finished phase",
            phase_duration.clone(),
        );
        registry.register(
            "failures",
            "Rollout failures by reason category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by category",
            reconcile_errors.clone(),
        );
        let pool_nodes = Family::<PoolStateLabel, Gauge>::default();
        let pool_blocked = Family::<PoolLabel, Gauge>::default();
        let gate_passing = Family::<PoolGateLabel, Gauge>::default();
        registry.register(
            "gate_passing",
            "1 when the last evaluation of a NixOSPool's health gate passed, 0 when it blocked",
            gate_passing.clone(),
        );
        let gate_blocked_seconds =
            Family::<PoolGateLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "gate_blocked_seconds",
            "Seconds a health gate blocked (from each evaluation that blocked to the next), per NixOSPool or (default) and gate",
            gate_blocked_seconds.clone(),
        );
        registry.register(
            "pool_nodes",
            "NixOSNodes per NixOSPool and state (nodes, updated, ready, unavailable, degraded)",
            pool_nodes.clone(),
        );
        registry.register(
            "pool_blocked",
            "1 while a NixOSPool admits nothing because it waits for its order, a soak, its pause or a fix of its spec",
            pool_blocked.clone(),
        );
        let webhook = Family::<WebhookLabel, Counter>::default();
        for result in crate::controller::webhook::RESULTS {
            webhook.get_or_create(&WebhookLabel { result }).inc_by(0);
        }
        registry.register(
            "webhook_requests",
            "Push webhook requests by result",
            webhook.clone(),
        );
        Metrics {
            registry,
            process_registry,
            pool_nodes,
            pool_blocked,
            gate_passing,
            gate_blocked_seconds,
            nodes,
            phase_duration,
            failures,
            reconcile_duration,
            reconcile_errors,
            webhook,
            leader,
            paused,
            halted,
            process,
        }
    }

    /// Record the last verdict of a pool's health gate.
    pub fn set_gate(&self, pool: &str, gate: &str, passing: bool) {
        self.gate_passing
            .get_or_create(&PoolGateLabel {
                pool: pool.to_owned(),
                gate: gate.to_owned(),
            })
            .set(i64::from(passing));
    }

    /// Count `seconds` more that a pool's health gate blocked.
    pub fn gate_blocked_for(&self, pool: &str, gate: &str, seconds: f64) {
        self.gate_blocked_seconds
            .get_or_create(&PoolGateLabel {
                pool: pool.to_owned(),
                gate: gate.to_owned(),
            })
            .inc_by(seconds.max(0.0));
    }

    /// Set one NixOSPool's gauges from its status.
    pub fn set_pool(&self, pool: &str, st: &crate::api::NixOSPoolStatus) {
        for (state, n) in [
            ("nodes", st.nodes),
            ("updated", st.updated),
            ("ready", st.ready),
            ("unavailable", st.unavailable),
            ("degraded", st.degraded),
        ] {
            self.pool_nodes
                .get_or_create(&PoolStateLabel {
                    pool: pool.to_owned(),
                    state,
                })
                .set(i64::from(n));
        }
        let blocked = st.conditions.iter().any(|c| {
            c.type_ == crate::api::pool_condition::UPDATING
                && c.status == "True"
                && crate::rollout::pools::pool_reason::BLOCKING.contains(&c.reason.as_str())
        });
        self.pool_blocked
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .set(i64::from(blocked));
    }

    /// Set the per-phase node gauge from a full count.
    pub fn set_phase_counts(&self, counts: &[(Phase, i64)]) {
        for (phase, n) in counts {
            self.nodes
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(*n);
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        self.process.refresh();
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &self.process_registry)?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// Process health as `/healthz` and `/readyz` report it.
#[derive(Default)]
pub struct Health {
    /// This replica is leading and its stores are synced.
    pub synced: AtomicBool,
    /// This replica is a healthy standby (waiting for the Lease).
    pub standby: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) || self.standby.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_handler(
    State(s): State<ServerState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let ct = [(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    match s.metrics.encode() {
        Ok(body) => (StatusCode::OK, ct, body),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, ct, String::new()),
    }
}

async fn readyz(State(s): State<ServerState>) -> StatusCode {
    if s.health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The router serving `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .with_state(ServerState { metrics, health })
}

/// Bind `addr` (bind errors are returned at once) and serve until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(metrics, health);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok((local, handle))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exposes_the_documented_metric_names() {
        let m = Metrics::new();
        m.set_phase_counts(&[(Phase::Draining, 2)]);
        m.failures
            .get_or_create(&CategoryLabel {
                category: "DrainTimeout",
            })
            .inc();
        m.reconcile_duration.observe(0.01);
        m.phase_duration
            .get_or_create(&PhaseLabel { phase: "Draining" })
            .observe(3.0);
        let text = m.encode().unwrap();
        assert!(text.contains("nixroll_nodes{phase=\"Draining\"} 2"), "{text}");
        assert!(
            text.contains("nixroll_failures_total{category=\"DrainTimeout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nixroll_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("nixroll_phase_duration_seconds_count{phase=\"Draining\"} 1"),
            "{text}"
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        (code, out)
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = serve(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            health.clone(),
            async move {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503, "not synced, not standby");
        health.standby.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        health.standby.store(false, Ordering::SeqCst);
        health.synced.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        metrics.set_phase_counts(&[(Phase::Waiting, 3)]);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("nixroll_nodes{phase=\"Waiting\"} 3"), "{body}");
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
