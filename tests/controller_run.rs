//! `controller::run` against a small fake API (mock transport): a standby replica only reads the
//! Lease; a leader lists NixOSNodes, Nodes and the pause ConfigMap (never pods), and a clean
//! shutdown releases the Lease.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use nixroll::controller::{ControllerConfig, LeaderElectionConfig};
use serde_json::{Value, json};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/nixroll-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/nixroll-system/leases/nixroll-controller";

#[derive(Default)]
struct FakeApi {
    lease: Option<Value>,
    rv: u64,
    /// "METHOD path?query" of every request.
    log: Vec<String>,
    /// Another replica holds the Lease and keeps renewing it.
    other_holds: bool,
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    common::json_response(code, body)
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "message": reason, "code": code})
}

/// Serve requests until the client goes away. Watches are held open (never answered).
fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    api: Arc<Mutex<FakeApi>>,
    keep_other_holder_fresh: bool,
) -> tokio::task::JoinHandle<()> {
    api.lock().unwrap().other_holds = keep_other_holder_fresh;
    tokio::spawn(async move {
        let mut open_watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let mut api = api.lock().unwrap();
            api.log.push(format!("{method} {path}?{query}"));
            if query.contains("watch=true") {
                open_watches.push(send);
                continue;
            }
            let resp = match (method.as_str(), path.as_str()) {
                ("GET", LEASE) => {
                    if api.other_holds {
                        api.rv += 1;
                        let now = jiff::Timestamp::now().to_string();
                        api.lease = Some(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                            "metadata": {"name": "nixroll-controller", "namespace": "nixroll-system", "resourceVersion": api.rv.to_string()},
                            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": now, "acquireTime": now}}));
                    }
                    match &api.lease {
                        Some(l) => respond(200, l),
                        None => respond(404, &status(404, "NotFound")),
                    }
                }
                ("POST", LEASES) => {
                    if api.lease.is_some() {
                        respond(409, &status(409, "AlreadyExists"))
                    } else {
                        api.rv += 1;
                        let mut l = body.clone();
                        l["metadata"]["resourceVersion"] = json!(api.rv.to_string());
                        api.lease = Some(l.clone());
                        respond(201, &l)
                    }
                }
                ("PUT", LEASE) => {
                    let current_rv = api
                        .lease
                        .as_ref()
                        .and_then(|l| l["metadata"]["resourceVersion"].as_str().map(String::from));
                    if body["metadata"]["resourceVersion"].as_str().map(String::from) != current_rv {
                        respond(409, &status(409, "Conflict"))
                    } else {
                        api.rv += 1;
                        let mut l = body.clone();
                        l["metadata"]["resourceVersion"] = json!(api.rv.to_string());
                        api.lease = Some(l.clone());
                        respond(200, &l)
                    }
                }
                ("GET", _) => {
                    let kind = if path.ends_with("/nodes") {
                        "NodeList"
                    } else if path.ends_with("/configmaps") {
                        "ConfigMapList"
                    } else {
                        "NixOSNodeList"
                    };
                    respond(
                        200,
                        &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []}),
                    )
                }
                _ => respond(405, &status(405, "MethodNotAllowed")),
            };
            send.send_response(resp);
        }
    })
}

fn config(identity: &str) -> ControllerConfig {
    let mut c = ControllerConfig::new(identity);
    let mut le = LeaderElectionConfig::new("nixroll-system", "nixroll-controller", identity);
    le.renew_period = Duration::from_millis(50);
    c.leader_election = Some(le);
    c.api_timeout = Duration::from_secs(2);
    c
}

/// One controller replica running against the fake API.
struct Replica {
    api: Arc<Mutex<FakeApi>>,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<(), nixroll::controller::ControllerError>>,
}

impl Replica {
    /// Start it and let it run for `settle`. `other_holds_lease`: another replica keeps the
    /// Lease fresh, so this one stays standby.
    async fn start(identity: &str, other_holds_lease: bool, settle: Duration) -> Replica {
        Replica::start_with_metrics(identity, other_holds_lease, settle, None).await
    }

    /// [`Replica::start`], serving /metrics on `metrics`.
    async fn start_with_metrics(
        identity: &str,
        other_holds_lease: bool,
        settle: Duration,
        metrics: Option<std::net::SocketAddr>,
    ) -> Replica {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Arc::new(Mutex::new(FakeApi::default()));
        let server = serve(handle, api.clone(), other_holds_lease);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = config(identity);
        config.metrics_addr = metrics;
        let run = tokio::spawn(nixroll::controller::run(
            Client::new(svc, "default"),
            config,
            async move {
                let _ = rx.await;
            },
        ));
        tokio::time::sleep(settle).await;
        Replica {
            api,
            server,
            stop,
            run,
        }
    }

    /// Ask it to stop; it must, within 5 s and without error.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.run)
            .await
            .expect("run did not stop")
            .unwrap()
            .unwrap();
        self.server.abort();
    }
}

#[tokio::test]
async fn standby_only_reads_the_lease_and_stops_cleanly() {
    let replica = Replica::start("standby-1", true, Duration::from_millis(400)).await;
    let api = replica.api.clone();
    replica.stop().await;
    let log = api.lock().unwrap().log.clone();
    assert!(log.len() >= 3, "a standby re-checks the lease: {log:?}");
    for line in &log {
        assert!(line.starts_with(&format!("GET {LEASE}?")), "standby made {line}");
    }
}

/// A free port of 127.0.0.1 (bound, then closed).
fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The body of GET /metrics.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The value of the sample `name` (with its labels, as exposed) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn standby_serves_metrics_as_not_leader_with_its_process_metrics() {
    let addr = free_addr();
    let replica =
        Replica::start_with_metrics("standby-2", true, Duration::from_millis(400), Some(addr)).await;
    let text = scrape(addr).await;
    replica.stop().await;
    assert_eq!(sample(&text, "nixroll_leader"), Some(0.0), "{text}");
    assert!(
        sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(sample(&text, "process_cpu_seconds_total").is_some(), "{text}");
    assert!(
        sample(&text, "process_open_fds").is_some_and(|v| v > 0.0),
        "{text}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(&text, &format!("nixroll_build_info{{version=\"{version}\"}}")),
        Some(1.0),
        "{text}"
    );
    for category in nixroll::rollout::reason::FAILURES {
        let name = format!("nixroll_failures_total{{category=\"{category}\"}}");
        assert_eq!(sample(&text, &name), Some(0.0), "{name} from the start: {text}");
    }
    assert_eq!(sample(&text, "nixroll_paused"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "nixroll_halted"), Some(0.0), "{text}");
}

#[tokio::test]
async fn the_leader_says_so_in_its_metrics() {
    let addr = free_addr();
    let replica =
        Replica::start_with_metrics("leader-2", false, Duration::from_millis(400), Some(addr)).await;
    let text = scrape(addr).await;
    replica.stop().await;
    assert_eq!(sample(&text, "nixroll_leader"), Some(1.0), "{text}");
}

#[tokio::test]
async fn leader_watches_nodes_and_pause_but_never_pods_and_releases_on_shutdown() {
    let replica = Replica::start("leader-1", false, Duration::from_millis(400)).await;
    let api = replica.api.clone();
    {
        let api = api.lock().unwrap();
        let holder = api.lease.as_ref().unwrap()["spec"]["holderIdentity"].clone();
        assert_eq!(holder, "leader-1");
    }
    replica.stop().await;
    let api = api.lock().unwrap();
    let log = &api.log;
    let has = |prefix: &str| log.iter().any(|l| l.starts_with(prefix));
    assert!(has(&format!("POST {LEASES}?")), "{log:?}");
    assert!(has("GET /apis/nixroll.io/v1alpha1/nixosnodes?"), "{log:?}");
    assert!(has("GET /api/v1/nodes?"), "{log:?}");
    assert!(
        log.iter().any(
            |l| l.starts_with("GET /api/v1/namespaces/nixroll-system/configmaps?")
                && l.contains("fieldSelector=metadata.name%3Dnixroll-pause")
        ),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("/pods")),
        "pods must not be watched: {log:?}"
    );
    // Renewed while leading, then released: holder cleared.
    assert!(
        log.iter()
            .filter(|l| l.starts_with(&format!("PUT {LEASE}")))
            .count()
            >= 2,
        "{log:?}"
    );
    let spec = &api.lease.as_ref().unwrap()["spec"];
    assert!(
        spec.get("holderIdentity").is_none_or(Value::is_null),
        "lease not released: {spec}"
    );
}

#[tokio::test]
async fn leader_that_loses_the_lease_stops_writing_and_stands_by() {
    let replica = Replica::start("leader-2", false, Duration::from_millis(300)).await;
    let api = replica.api.clone();
    {
        // It led before the Lease is taken away: it holds the Lease and started the
        // leader's watches (otherwise "stands by" below would say nothing).
        let api = api.lock().unwrap();
        let holder = api.lease.as_ref().unwrap()["spec"]["holderIdentity"].clone();
        assert_eq!(holder, "leader-2", "{:?}", api.log);
        assert!(
            api.log.iter().any(|l| l.starts_with("GET /api/v1/nodes?")),
            "the leader watches Nodes: {:?}",
            api.log
        );
    }
    // Someone else takes the Lease over (e.g. we were partitioned past its expiry).
    api.lock().unwrap().other_holds = true;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = api.lock().unwrap().log.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    replica.stop().await;
    let api = api.lock().unwrap();
    let later = &api.log[seen..];
    assert!(!later.is_empty(), "the standby keeps checking the lease");
    for line in later {
        assert!(
            line.starts_with(&format!("GET {LEASE}?")),
            "after losing the lease: {line}"
        );
    }
    assert_eq!(api.lease.as_ref().unwrap()["spec"]["holderIdentity"], "other");
}

// ------------------------------------------------ the whole loop, with fake decision functions

use nixroll::api::{Phase, Slot};
use nixroll::controller::RolloutFns;
use nixroll::rollout::{Action, ClusterState, Decision, DrainProgress, NodeView, Note, Policy};

fn fake_admit(nodes: &[NodeView<'_>], _: &ClusterState, _: &Policy, _: jiff::Timestamp) -> Vec<String> {
    let busy = nodes.iter().any(|v| v.status.slot.is_some());
    if busy {
        return Vec::new();
    }
    nodes
        .iter()
        .filter(|v| v.status.phase == Some(Phase::Waiting) && v.node.ready)
        .take(1)
        .map(|v| v.name.to_string())
        .collect()
}

fn fake_decide(
    view: &NodeView<'_>,
    admitted: bool,
    _: Option<&DrainProgress>,
    _: &Policy,
    now: jiff::Timestamp,
) -> Decision {
    let mut status = view.status.clone();
    status.agent = None;
    if !admitted {
        return Decision {
            status,
            actions: vec![],
            notes: vec![],
            requeue_after: None,
            rows: Vec::new(),
        };
    }
    status.phase = Some(Phase::Draining);
    status.slot = Some(Slot {
        granted_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        was_unschedulable: view.node.unschedulable,
        cordoned_by_nixroll: !view.node.unschedulable,
        drain_started_at: None,
        forced: false,
        verified_at: None,
    });
    Decision {
        status,
        actions: vec![Action::Cordon],
        notes: vec![Note {
            reason: "Admitted".into(),
            message: "slot granted".into(),
            warning: false,
        }],
        requeue_after: None,
        rows: Vec::new(),
    }
}

#[tokio::test]
async fn leader_loop_observes_admits_writes_status_then_cordons() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = Arc::new(Mutex::new(Vec::<(String, String, String, Value)>::new()));
    let l = log.clone();
    let server = tokio::spawn(async move {
        let mut open_watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let ct = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if query.contains("watch=true") {
                open_watches.push(send);
                continue;
            }
            l.lock()
                .unwrap()
                .push((method.clone(), path.clone(), ct, body.clone()));
            let resp = match (method.as_str(), path.as_str()) {
                ("GET", "/apis/nixroll.io/v1alpha1/nixosnodes") => respond(
                    200,
                    &json!({
                    "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNodeList", "metadata": {"resourceVersion": "5"},
                    "items": [{"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
                        "metadata": {"name": "n1", "uid": "u1", "resourceVersion": "4", "generation": 1,
                            "managedFields": [{"manager": "flux"}], "annotations": {"kustomize.toolkit.fluxcd.io/checksum": "x"}},
                        "spec": {"flake": "github:me/infra", "revision": "d".repeat(40)},
                        "status": {"phase": "Waiting", "agent": {"bootId": "b1"}}}]}),
                ),
                ("GET", "/api/v1/nodes") => respond(
                    200,
                    &json!({
                    "apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "5"},
                    "items": [{"metadata": {"name": "n1", "uid": "nu1"},
                        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                            "nodeInfo": {"bootID": "b1", "architecture": "", "containerRuntimeVersion": "", "kernelVersion": "",
                                "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "", "osImage": "", "systemUUID": ""}}}]}),
                ),
                ("GET", _) => respond(
                    200,
                    &json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "5"}, "items": []}),
                ),
                ("PATCH", "/apis/nixroll.io/v1alpha1/nixosnodes/n1/status") => {
                    let mut obj = body.clone();
                    obj["metadata"] = json!({"name": "n1", "resourceVersion": "6"});
                    obj["spec"] = json!({"flake": "github:me/infra", "revision": "d".repeat(40)});
                    respond(200, &obj)
                }
                ("PATCH", "/api/v1/nodes/n1") => respond(
                    200,
                    &json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "n1"}, "spec": {"unschedulable": true}}),
                ),
                ("POST", _) => respond(201, &body),
                _ => respond(405, &status(405, "MethodNotAllowed")),
            };
            send.send_response(resp);
        }
    });
    let mut config = ControllerConfig::new("solo");
    config.rollout = RolloutFns {
        decide: fake_decide,
        admit: fake_admit,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(nixroll::controller::run(
        Client::new(svc, "default"),
        config,
        async move {
            let _ = rx.await;
        },
    ));
    // Wait for the cordon (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if log
            .lock()
            .unwrap()
            .iter()
            .any(|(m, p, _, _)| m == "PATCH" && p == "/api/v1/nodes/n1")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cordon: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run did not stop")
        .unwrap()
        .unwrap();
    server.abort();

    let log = log.lock().unwrap();
    let writes: Vec<&(String, String, String, Value)> =
        log.iter().filter(|(m, _, _, _)| m != "GET").collect();
    let status_at = writes
        .iter()
        .position(|(m, p, _, _)| m == "PATCH" && p.ends_with("/nixosnodes/n1/status"))
        .expect("status write");
    let cordon_at = writes
        .iter()
        .position(|(m, p, _, _)| m == "PATCH" && p == "/api/v1/nodes/n1")
        .unwrap();
    assert!(
        status_at < cordon_at,
        "intent must be persisted before the cordon: {writes:?}"
    );
    let (_, _, ct, body) = writes[status_at];
    assert_eq!(ct, "application/apply-patch+yaml");
    assert_eq!(body["status"]["phase"], "Draining");
    assert_eq!(body["status"]["slot"]["cordonedByNixroll"], true);
    assert!(body["status"].get("agent").is_none());
    assert_eq!(
        writes
            .iter()
            .filter(|(m, p, _, _)| m == "PATCH" && p.ends_with("/status"))
            .count(),
        1,
        "one grant: {writes:?}"
    );
    assert!(
        writes
            .iter()
            .any(|(m, p, _, b)| m == "POST" && p.ends_with("/events") && b["reason"] == "Admitted")
    );
    assert!(!log.iter().any(|(_, p, _, _)| p.contains("/pods")));
}
