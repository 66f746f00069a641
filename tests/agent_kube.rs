//! The agent's Kubernetes loop against a minimal fake API server (list + watch of NixOSNodes,
//! status PATCH), with real Nix underneath: it reacts to `status.target` and
//! `status.activation`, writes only `status.agent` by server-side apply as `nixroll-agent`,
//! and makes no request at all while idle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::host::HostRoot;
use nixroll::agent::AgentConfig;
use nixroll::agent::node::HostOptions;
use serde_json::{Value, json};

const NODE: &str = "node-1";
const COLLECTION: &str = "/apis/nixroll.io/v1alpha1/nixosnodes";

#[derive(Clone, Debug)]
struct Request {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

struct Inner {
    obj: Value,
    rv: u64,
    requests: Vec<Request>,
}

#[derive(Clone)]
struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    events: tokio::sync::broadcast::Sender<Value>,
}

impl FakeApi {
    /// Serve this fake API on a free port of 127.0.0.1; returns the address.
    async fn serve(&self) -> std::net::SocketAddr {
        let api = self.clone();
        let app = axum::Router::new().fallback(move |m: Method, u: Uri, h: HeaderMap, b: Bytes| {
            let api = api.clone();
            async move { api.handle(m, u, h, b).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    fn new(obj: Value) -> FakeApi {
        let (events, _) = tokio::sync::broadcast::channel(64);
        let api = FakeApi {
            inner: Arc::new(Mutex::new(Inner {
                obj,
                rv: 0,
                requests: Vec::new(),
            })),
            events,
        };
        api.update(|_| {});
        api
    }

    fn update(&self, f: impl FnOnce(&mut Value)) {
        let obj = {
            let mut inner = self.inner.lock().unwrap();
            f(&mut inner.obj);
            inner.rv += 1;
            let rv = inner.rv.to_string();
            inner.obj["metadata"]["resourceVersion"] = json!(rv);
            inner.obj.clone()
        };
        let _ = self.events.send(obj);
    }

    fn obj(&self) -> Value {
        self.inner.lock().unwrap().obj.clone()
    }

    fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    async fn handle(self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        self.inner.lock().unwrap().requests.push(Request {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type,
            body: body_json.clone(),
        });
        let selector_ok = query.contains(&format!("fieldSelector=metadata.name%3D{NODE}"));
        if method == Method::GET && path == COLLECTION && query.contains("watch=true") {
            assert!(selector_ok, "watch without the node's field selector: {query}");
            let rx = self.events.subscribe();
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(obj) => {
                            let line = format!("{}\n", json!({"type": "MODIFIED", "object": obj}));
                            return Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            });
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        if method == Method::GET && path == COLLECTION {
            assert!(selector_ok, "list without the node's field selector: {query}");
            let inner = self.inner.lock().unwrap();
            let list = json!({
                "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNodeList",
                "metadata": {"resourceVersion": inner.rv.to_string()},
                "items": [inner.obj.clone()],
            });
            return axum::Json(list).into_response();
        }
        if method == Method::PATCH && path == format!("{COLLECTION}/{NODE}/status") {
            // Server-side apply by the agent, who owns all of status.agent.
            let agent = body_json["status"]["agent"].clone();
            self.update(|o| o["status"]["agent"] = agent);
            return axum::Json(self.obj()).into_response();
        }
        (StatusCode::NOT_FOUND, axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": path}))).into_response()
    }
}

async fn wait_for(api: &FakeApi, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let obj = api.obj();
        if pred(&obj) {
            return obj;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {obj:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the agent reports `rev` staged; returns the staged system's path.
async fn staged_system(api: &FakeApi, what: &str, rev: &str) -> String {
    let obj = wait_for(api, what, |o| {
        o["status"]["agent"]["staged"]["revision"] == json!(rev)
    })
    .await;
    obj["status"]["agent"]["staged"]["system"]
        .as_str()
        .unwrap()
        .to_string()
}

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_loop_stages_activates_reports_and_idles() {
    if !common::require_nix() {
        return;
    }
    let HostRoot {
        tmp: _tmp,
        mut flake,
        sim,
        host,
        nix,
        ..
    } = HostRoot::new(NODE);
    let rev0 = flake.head().to_string();

    let obj = json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
        "metadata": {"name": NODE, "uid": "u-1", "generation": 1},
        "spec": {"flake": flake.url(), "revision": rev0},
        "status": {"phase": "Staging", "target": {"revision": rev0, "installable": flake.installable(&rev0, NODE)}},
    });
    let api = FakeApi::new(obj);
    let addr = api.serve().await;

    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let mut agent_config = AgentConfig::new(NODE, host.clone(), nix.clone());
    agent_config.options = HostOptions {
        activation_timeout: Duration::from_secs(30),
        result_poll: Duration::from_millis(10),
        report_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(nixroll::agent::run(client, agent_config, async {
        let _ = stop_rx.await;
    }));

    // 1. Stages the target and reports it.
    let sys0 = staged_system(&api, "staged rev0", &rev0).await;
    sim.install(&sys0).unwrap();

    // 2. A new target (service change) → staged, no reboot needed; facts of the booted host.
    let rev1 = flake.commit_service_change().unwrap();
    let inst1 = flake.installable(&rev1, NODE);
    api.update(|o| o["status"]["target"] = json!({"revision": rev1, "installable": inst1}));
    let obj = wait_for(&api, "staged rev1", |o| {
        o["status"]["agent"]["staged"]["revision"] == json!(rev1)
    })
    .await;
    let agent_status = &obj["status"]["agent"];
    assert_eq!(agent_status["staged"]["rebootRequired"], json!(false));
    assert_eq!(agent_status["bootedSystem"], json!(sys0));
    assert_eq!(agent_status["bootId"], json!(sim.boot_id()));
    assert_eq!(agent_status["profileGeneration"], json!(1));
    let sys1 = agent_status["staged"]["system"].as_str().unwrap().to_string();

    // 3. The controller grants a Switch → Switched, current system is the new one.
    api.update(|o| {
        o["status"]["phase"] = json!("Activating");
        o["status"]["activation"] =
            json!({"id": "grant-1", "action": "Switch", "system": sys1, "grantedAt": "2026-01-01T00:00:00Z"});
    });
    let obj = wait_for(&api, "switched", |o| {
        o["status"]["agent"]["activation"]["state"] == json!("Switched")
    })
    .await;
    assert_eq!(obj["status"]["agent"]["currentSystem"], json!(sys1));
    assert_eq!(obj["status"]["agent"]["profileGeneration"], json!(2));
    assert_eq!(sim.switch_log().len(), 1);

    // 4. Idle: no request at all for 3 s (the watch stays open), even when the controller
    //    writes its own fields (one event → the agent re-checks, finds nothing new).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = api.requests().len();
    api.update(|o| o["status"]["phase"] = json!("Verifying"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<_> = api.requests()[before..].to_vec();
    assert!(idle.is_empty(), "requests while idle: {idle:#?}");

    // Every write: status subresource, server-side apply as nixroll-agent, only status.agent,
    // no nulls; the spec and the controller's fields were never touched.
    let reqs = api.requests();
    for r in &reqs {
        eprintln!("{} {}?{}", r.method, r.path, r.query);
    }
    let patches: Vec<_> = reqs.iter().filter(|r| r.method != Method::GET).collect();
    assert!(
        patches.len() >= 3 && patches.len() <= 8,
        "{} writes",
        patches.len()
    );
    for p in &patches {
        assert_eq!(p.method, Method::PATCH);
        assert_eq!(p.path, format!("{COLLECTION}/{NODE}/status"));
        assert!(
            p.content_type.starts_with("application/apply-patch"),
            "{}",
            p.content_type
        );
        assert!(p.query.contains("fieldManager=nixroll-agent"), "{}", p.query);
        assert!(p.query.contains("force=true"), "{}", p.query);
        let keys: Vec<_> = p.body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["apiVersion", "kind", "status"]);
        let status_keys: Vec<_> = p.body["status"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(status_keys, vec!["agent"]);
        assert!(!has_null(&p.body), "null in {:#}", p.body);
    }
    let obj = api.obj();
    assert_eq!(obj["spec"]["revision"], json!(rev0));
    assert_eq!(obj["status"]["phase"], json!("Verifying"));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn kubeconfig(dir: &std::path::Path, addr: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

/// Stands in for `systemctl reboot` on a host root: counts, new boot id, boots the one-shot
/// entry (and removes it) or else the default.
const REBOOT_SCRIPT: &str = r#"r="$NIXROLL_HOST_ROOT"
n=$(cat "$r/var/lib/sim/reboots" 2>/dev/null || echo 0)
echo $((n + 1)) >"$r/var/lib/sim/reboots"
cat /proc/sys/kernel/random/uuid >"$r/proc/sys/kernel/random/boot_id"
t=$(readlink "$r/boot/oneshot-system" || readlink "$r/boot/default-system")
rm -f "$r/boot/oneshot-system"
ln -sfn "$t" "$r/run/booted-system"
ln -sfn "$t" "$r/run/current-system"
"#;

fn spawn_agent(
    kubeconfig: &std::path::Path,
    root: &std::path::Path,
    log: &std::path::Path,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_nixroll"))
        .args(["agent", "--node", NODE, "--offline", "--host-root"])
        .arg(root)
        .arg("--reboot-command")
        .arg(format!("/bin/sh {}", root.join("reboot.sh").display()))
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// (user+system CPU ticks, VmRSS kB) of a process.
fn usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    (ticks, rss)
}

/// The real binary, killed with SIGKILL while `switch-to-configuration boot` runs: the switch
/// finishes on its own, the restarted agent picks up its result, reboots exactly once and
/// reports `Rebooted`; then it sits idle without a single request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_binary_resumes_without_repeating() {
    if !common::require_nix() {
        return;
    }
    let HostRoot {
        tmp, mut flake, sim, ..
    } = HostRoot::new(NODE);
    let root = sim.root().to_path_buf();
    std::fs::write(root.join("reboot.sh"), REBOOT_SCRIPT).unwrap();
    let rev0 = flake.head().to_string();
    let api = FakeApi::new(json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
        "metadata": {"name": NODE, "uid": "u-1", "generation": 1},
        "spec": {"flake": flake.url(), "revision": rev0},
        "status": {"target": {"revision": rev0, "installable": flake.installable(&rev0, NODE)}},
    }));
    let addr = api.serve().await;
    let kc = kubeconfig(tmp.path(), addr);
    let log = tmp.path().join("agent.log");

    let mut agent = spawn_agent(&kc, &root, &log);
    let sys0 = staged_system(&api, "staged rev0", &rev0).await;
    sim.install(&sys0).unwrap();
    let boot_id = sim.boot_id();

    let rev1 = flake
        .commit("new kernel, slow switch", |s| {
            s.kernel.push('+');
            s.switch_delay = Some("2".into());
        })
        .unwrap();
    let inst1 = flake.installable(&rev1, NODE);
    api.update(|o| o["status"]["target"] = json!({"revision": rev1, "installable": inst1}));
    let obj = wait_for(&api, "staged rev1", |o| {
        o["status"]["agent"]["staged"]["revision"] == json!(rev1)
    })
    .await;
    assert_eq!(
        obj["status"]["agent"]["staged"]["rebootReasons"],
        json!(["kernel"])
    );
    let sys1 = obj["status"]["agent"]["staged"]["system"]
        .as_str()
        .unwrap()
        .to_string();

    api.update(|o| {
        o["status"]["activation"] =
            json!({"id": "boot-1", "action": "Boot", "system": sys1, "grantedAt": "2026-01-01T00:00:00Z"})
    });
    let started = root.join("var/lib/nixroll/activation/boot-1.started");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(tokio::time::Instant::now() < deadline, "switch never launched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(&api, "Running reported", |o| {
        o["status"]["agent"]["activation"]["state"] == json!("Running")
    })
    .await;
    agent.kill().await.unwrap(); // SIGKILL, mid-switch
    assert!(
        !root.join("var/lib/nixroll/activation/boot-1.result").exists(),
        "switch ended before the kill"
    );

    let mut agent = spawn_agent(&kc, &root, &log);
    let obj = wait_for(&api, "Rebooted", |o| {
        o["status"]["agent"]["activation"]["state"] == json!("Rebooted")
    })
    .await;
    let a = &obj["status"]["agent"];
    assert_eq!(a["bootedSystem"], json!(sys1));
    assert_eq!(a["activation"]["bootIdBefore"], json!(boot_id));
    assert_ne!(a["bootId"], json!(boot_id));
    // Booted once; the old system is still the default (profile generation 1) until a bless.
    assert_eq!(a["profileGeneration"], json!(1));
    assert!(a["activation"]["bootOnce"].is_string(), "{a}");
    assert_ne!(a["defaultSystem"], json!(sys1));
    assert_eq!(
        std::fs::read_to_string(root.join("var/lib/sim/reboots"))
            .unwrap()
            .trim(),
        "1"
    );
    // The new system's `boot` once (not repeated after the kill), then the old one's.
    let log = sim.switch_log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0], format!("boot {sys1}"));

    // Idle footprint of the real binary.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = agent.id().unwrap();
    let (t0, _) = usage(pid);
    let before = api.requests().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (t1, rss) = usage(pid);
    let idle = api.requests().len() - before;
    eprintln!(
        "agent idle: {idle} requests in 5 s, {} CPU ticks (1/100 s) in 5 s, VmRSS {rss} kB",
        t1 - t0
    );
    assert_eq!(idle, 0);
    assert!(t1 - t0 <= 5, "{} ticks of CPU while idle", t1 - t0);
    agent.kill().await.unwrap();
}
