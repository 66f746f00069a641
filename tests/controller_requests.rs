//! Request-level tests of the controller's Kubernetes side against a mock API
//! (`tower_test::mock::pair`): every expected request is asserted in order (method, path, query,
//! content type, body), and no unexpected request is made.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher;
use nixroll::api::{AgentStatus, DrainPolicy, NixOSNode, NixOSNodeSpec, NixOSNodeStatus, Phase, Slot};
use nixroll::controller::leader::LeaderError;
use nixroll::controller::{
    Context, ControllerConfig, LeaderElectionConfig, LeaderElector, LeaseOutcome, Metrics, Stores, Synced,
};
use nixroll::drain;
use nixroll::rollout::{Action, Decision, Note};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// One request as the verifier saw it.
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Value,
    respond: Responder,
}

impl Seen {
    /// Answer with the request body (what the API server does for creates).
    fn echo(self, code: u16) {
        let body = self.body.clone();
        self.reply(code, body);
    }

    fn reply(self, code: u16, body: Value) {
        let resp = Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.respond.send_response(resp);
    }
}

async fn next(handle: &mut Handle) -> Seen {
    let (req, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("expected a request, none came")
        .expect("client dropped");
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req
        .uri()
        .query()
        .map(|q| url_pairs(q).into_iter().collect::<BTreeMap<String, String>>())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Seen {
        method,
        path,
        query,
        content_type,
        body,
        respond,
    }
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The next request that is not from the draining node's pod watch (its paged list or its
/// watch: `limit` / `watch` in the query); those are kept unanswered in `watch`.
async fn next_besides_pod_watch(handle: &mut Handle, watch: &mut Vec<Seen>) -> Seen {
    loop {
        let s = next(handle).await;
        if s.path == "/api/v1/pods" && (s.query.contains_key("limit") || s.query.contains_key("watch")) {
            assert_eq!(
                s.query.get("fieldSelector").map(String::as_str),
                Some("spec.nodeName=n1")
            );
            watch.push(s);
            continue;
        }
        return s;
    }
}

/// Assert that no request arrives within a short while.
async fn expect_silence(handle: &mut Handle) {
    if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
    {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

fn contains_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(contains_null),
        Value::Object(o) => o.values().any(contains_null),
        _ => false,
    }
}

fn contains_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Array(a) => a.iter().any(|x| contains_key(x, key)),
        Value::Object(o) => o.contains_key(key) || o.values().any(|x| contains_key(x, key)),
        _ => false,
    }
}

fn nixosnode(name: &str, drain: Option<DrainPolicy>) -> NixOSNode {
    let mut n = NixOSNode::new(
        name,
        NixOSNodeSpec {
            drain,
            ..nixroll::sim::fixtures::spec("github:me/infra", &"a".repeat(40))
        },
    );
    n.metadata.uid = Some("uid-1".into());
    n.metadata.generation = Some(3);
    n
}

fn ready_stores() -> Stores {
    let (nxn, mut w1) = reflector::store::<NixOSNode>();
    let (nodes, mut w2) = reflector::store();
    let (pause, mut w3) = reflector::store();
    w1.apply_watcher_event(&watcher::Event::InitDone);
    w2.apply_watcher_event(&watcher::Event::InitDone);
    w3.apply_watcher_event(&watcher::Event::InitDone);
    Stores {
        nixosnodes: nxn,
        nodes,
        pause,
        pools: kube::runtime::reflector::store().0,
        synced: Synced::ready(),
    }
}

/// A controller context on the mock, and the NixOSNode n1 (no drain policy).
fn context_for_n1() -> (Arc<Context>, Handle, NixOSNode) {
    let (client, handle) = mock();
    (context(client), handle, nixosnode("n1", None))
}

fn context(client: Client) -> Arc<Context> {
    let mut config = ControllerConfig::new("test-replica");
    config.api_timeout = Duration::from_secs(2);
    config.drain_pass_backoff = (Duration::from_secs(30), Duration::from_secs(60));
    let (ctx, _wake) = Context::new(
        client,
        config,
        ready_stores(),
        Arc::new(Metrics::new()),
        Arc::new(AtomicBool::new(true)),
    );
    ctx
}

fn waiting_status() -> NixOSNodeStatus {
    NixOSNodeStatus {
        phase: Some(Phase::Waiting),
        wanted: Some("aaaaaaaa".into()),
        agent: Some(AgentStatus {
            boot_id: Some("boot-1".into()),
            ..AgentStatus::default()
        }),
        ..NixOSNodeStatus::default()
    }
}

fn draining_status(cordoned_by_nixroll: bool) -> NixOSNodeStatus {
    NixOSNodeStatus {
        phase: Some(Phase::Draining),
        wanted: Some("aaaaaaaa".into()),
        slot: Some(Slot {
            granted_at: Time("2026-11-26T06:00:00Z".parse().unwrap()),
            was_unschedulable: false,
            cordoned_by_nixroll,
            drain_started_at: None,
            forced: false,
            verified_at: None,
        }),
        // What a stub decision might carry over; the executor must never send it.
        agent: Some(AgentStatus {
            boot_id: Some("boot-1".into()),
            ..AgentStatus::default()
        }),
        ..NixOSNodeStatus::default()
    }
}

/// The decision to write `status` and take `actions`: no notes, no requeue.
fn decision_to(status: NixOSNodeStatus, actions: Vec<Action>) -> Decision {
    Decision {
        status,
        actions,
        notes: vec![],
        requeue_after: None,
        rows: Vec::new(),
    }
}

fn assert_status_apply(seen: &Seen, node: &str) {
    assert_eq!(seen.method, "PATCH");
    assert_eq!(
        seen.path,
        format!("/apis/nixroll.io/v1alpha1/nixosnodes/{node}/status")
    );
    assert_eq!(
        seen.query.get("fieldManager").map(String::as_str),
        Some("nixroll-controller")
    );
    assert_eq!(seen.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert_eq!(seen.body["apiVersion"], "nixroll.io/v1alpha1");
    assert_eq!(seen.body["kind"], "NixOSNode");
    assert!(!contains_null(&seen.body), "null in apply body: {}", seen.body);
    assert!(
        !contains_key(&seen.body, "agent"),
        "agent in apply body: {}",
        seen.body
    );
}

/// Expect the status apply of `node`, answer it as the API would, and return the next request,
/// which must be a PATCH of the Node.
async fn status_then_node_patch(handle: &mut Handle, node: &str) -> Seen {
    let s = next(handle).await;
    assert_status_apply(&s, node);
    let status = s.body["status"].clone();
    s.reply(200, object_reply(node, &status));
    let s = next(handle).await;
    let path = format!("/api/v1/nodes/{node}");
    assert_eq!((s.method.as_str(), s.path.as_str()), ("PATCH", path.as_str()));
    s
}

fn object_reply(node: &str, status: &Value) -> Value {
    json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
        "metadata": {"name": node, "resourceVersion": "2"},
        "spec": {"flake": "github:me/infra", "revision": "a".repeat(40)},
        "status": status})
}

fn node_reply(node: &str, unschedulable: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "spec": {"unschedulable": unschedulable}})
}

fn assert_event(seen: &Seen, regarding_kind: &str, reason: &str) {
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/apis/events.k8s.io/v1/namespaces/default/events");
    assert_eq!(seen.body["regarding"]["kind"], regarding_kind);
    assert_eq!(seen.body["reason"], reason);
    assert_eq!(seen.body["reportingController"], "nixroll-controller");
}

#[tokio::test]
async fn grant_persists_status_first_then_cordons_then_records_events() {
    let (ctx, mut handle, obj) = context_for_n1();
    let decision = Decision {
        status: draining_status(true),
        actions: vec![Action::Cordon],
        notes: vec![Note {
            reason: "SlotGranted".into(),
            message: "admitted".into(),
            warning: false,
        }],
        requeue_after: None,
        rows: Vec::new(),
    };
    let current = waiting_status();
    let task =
        tokio::spawn(async move { nixroll::controller::execute(&ctx, &obj, &current, decision).await });

    let s = next(&mut handle).await;
    assert_status_apply(&s, "n1");
    assert_eq!(s.body["status"]["phase"], "Draining");
    assert_eq!(s.body["status"]["slot"]["cordonedByNixroll"], true);
    let status = s.body["status"].clone();
    s.reply(200, object_reply("n1", &status));

    let s = next(&mut handle).await;
    assert_eq!(s.method, "PATCH");
    assert_eq!(s.path, "/api/v1/nodes/n1");
    // The cordon and nixroll's mark in one merge patch (no Node in the cache here, so no
    // resourceVersion precondition).
    assert_eq!(s.content_type, "application/merge-patch+json");
    assert_eq!(
        s.body,
        json!({"metadata": {"annotations": {"nixroll.io/cordoned": "true"}}, "spec": {"unschedulable": true}})
    );
    s.reply(200, node_reply("n1", true));

    let s = next(&mut handle).await;
    assert_event(&s, "Node", "Cordoned");
    s.echo(201);
    let s = next(&mut handle).await;
    assert_event(&s, "NixOSNode", "SlotGranted");
    assert_eq!(s.body["regarding"]["name"], "n1");
    s.echo(201);

    let requeue = task.await.unwrap().unwrap();
    assert_eq!(requeue, kube::runtime::controller::Action::await_change());
    expect_silence(&mut handle).await;
}

#[tokio::test]
async fn uncordon_happens_only_when_the_decision_says_so() {
    let (ctx, mut handle, obj) = context_for_n1();

    // A status change without an Uncordon action: the status write and nothing else.
    let current = draining_status(false);
    let mut next_status = draining_status(false);
    next_status.phase = Some(Phase::UpToDate);
    next_status.slot = None;
    let decision = decision_to(next_status.clone(), vec![]);
    let c2 = ctx.clone();
    let o2 = obj.clone();
    let task = tokio::spawn(async move { nixroll::controller::execute(&c2, &o2, &current, decision).await });
    let s = next(&mut handle).await;
    assert_status_apply(&s, "n1");
    assert_eq!(s.body["status"]["phase"], "UpToDate");
    assert!(
        s.body["status"].get("slot").is_none(),
        "released slot must be omitted"
    );
    let status = s.body["status"].clone();
    s.reply(200, object_reply("n1", &status));
    task.await.unwrap().unwrap();
    expect_silence(&mut handle).await;

    // The decision says Uncordon: exactly one merge patch setting unschedulable=false and
    // removing the mark.
    let current = draining_status(true);
    let decision = decision_to(next_status, vec![Action::Uncordon]);
    let task =
        tokio::spawn(async move { nixroll::controller::execute(&ctx, &obj, &current, decision).await });
    let s = status_then_node_patch(&mut handle, "n1").await;
    assert_eq!(s.content_type, "application/merge-patch+json");
    assert_eq!(
        s.body,
        json!({"metadata": {"annotations": {"nixroll.io/cordoned": null}}, "spec": {"unschedulable": false}})
    );
    s.reply(200, node_reply("n1", false));
    let s = next(&mut handle).await;
    assert_event(&s, "Node", "Uncordoned");
    s.echo(201);
    task.await.unwrap().unwrap();
    expect_silence(&mut handle).await;
}

#[tokio::test]
async fn unchanged_status_and_no_actions_send_nothing() {
    let (ctx, mut handle, obj) = context_for_n1();
    let current = draining_status(true);
    // The decision repeats the current status (the agent part differs and is ignored).
    let mut same = current.clone();
    same.agent = None;
    let decision = Decision {
        requeue_after: Some(jiff::SignedDuration::from_secs(30)),
        ..decision_to(same, vec![])
    };
    let requeue = nixroll::controller::execute(&ctx, &obj, &current, decision)
        .await
        .unwrap();
    assert_eq!(
        requeue,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );
    expect_silence(&mut handle).await;
}

fn pod(name: &str, owner_kind: Option<&str>, extra: Value) -> Value {
    let mut meta = json!({"name": name, "namespace": "apps", "uid": format!("uid-{name}")});
    if let Some(kind) = owner_kind {
        meta["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": kind, "name": "owner", "uid": "o", "controller": true}]);
    }
    if let Some(m) = extra.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            meta[k] = v.clone();
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}})
}

fn pod_list(pods: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": pods})
}

fn assert_pod_list(s: &Seen) {
    assert_eq!(s.method, "GET");
    assert_eq!(s.path, "/api/v1/pods");
    assert_eq!(
        s.query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=n1")
    );
}

fn status_failure(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

#[tokio::test]
async fn eviction_skips_daemonset_and_mirror_pods_and_retries_after_429() {
    let (client, mut handle) = mock();
    let policy = DrainPolicy {
        grace_period_seconds: Some(45),
        ..DrainPolicy::default()
    };
    let pods = || {
        pod_list(vec![
            pod("agent", Some("DaemonSet"), json!({})),
            pod(
                "kube-proxy",
                None,
                json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}}}),
            ),
            pod("web-1", Some("ReplicaSet"), json!({})),
            pod(
                "web-0",
                Some("ReplicaSet"),
                json!({"metadata": {"deletionTimestamp": "2026-11-26T06:00:00Z"}}),
            ),
            pod("bare", None, json!({})),
        ])
    };

    // Pass 1: the PDB refuses (429).
    let c = client.clone();
    let p = policy.clone();
    let pass = tokio::spawn(async move { drain::evict_pass(&c, "n1", &p, Duration::from_secs(2)).await });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(200, pods());
    let s = next(&mut handle).await;
    assert_eq!(s.method, "POST");
    assert_eq!(s.path, "/api/v1/namespaces/apps/pods/web-1/eviction");
    assert_eq!(s.content_type, "application/json");
    assert_eq!(s.body["apiVersion"], "policy/v1");
    assert_eq!(s.body["kind"], "Eviction");
    assert_eq!(s.body["metadata"]["name"], "web-1");
    assert_eq!(s.body["deleteOptions"]["gracePeriodSeconds"], 45);
    s.reply(429, status_failure(429, "TooManyRequests"));
    let progress = pass.await.unwrap().unwrap();
    assert_eq!(progress.blocked_by_pdb, 1);
    // web-1 (blocked), web-0 (terminating), bare (refused); agent and kube-proxy skipped.
    assert_eq!(progress.remaining, 3);
    assert_eq!(progress.refused.len(), 1);
    assert!(progress.refused[0].starts_with("apps/bare"));
    expect_silence(&mut handle).await;

    // Pass 2: the eviction is accepted.
    let c = client.clone();
    let p = policy.clone();
    let pass = tokio::spawn(async move { drain::evict_pass(&c, "n1", &p, Duration::from_secs(2)).await });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(200, pods());
    let s = next(&mut handle).await;
    assert_eq!(s.path, "/api/v1/namespaces/apps/pods/web-1/eviction");
    s.reply(
        201,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}),
    );
    let progress = pass.await.unwrap().unwrap();
    assert_eq!(progress.blocked_by_pdb, 0);
    assert_eq!(progress.remaining, 3);

    // Pass 3: only DaemonSet and mirror pods are left; a pod already gone (404) does not count.
    let c = client.clone();
    let p = DrainPolicy {
        delete_unmanaged_pods: true,
        ..policy.clone()
    };
    let pass = tokio::spawn(async move { drain::evict_pass(&c, "n1", &p, Duration::from_secs(2)).await });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(
        200,
        pod_list(vec![
            pod("agent", Some("DaemonSet"), json!({})),
            pod("bare", None, json!({})),
        ]),
    );
    let s = next(&mut handle).await;
    assert_eq!(s.path, "/api/v1/namespaces/apps/pods/bare/eviction");
    s.reply(404, status_failure(404, "NotFound"));
    let progress = pass.await.unwrap().unwrap();
    assert_eq!(progress, nixroll::rollout::DrainProgress::default());
    expect_silence(&mut handle).await;
}

#[tokio::test]
async fn evict_action_backs_off_between_passes() {
    let (ctx, mut handle, obj) = context_for_n1();
    let current = draining_status(true);
    let mut status = current.clone();
    status.agent = None;
    let decision = Decision {
        requeue_after: Some(jiff::SignedDuration::from_mins(10)),
        ..decision_to(status, vec![Action::Evict])
    };
    let (c2, o2, cur2, d2) = (ctx.clone(), obj.clone(), current.clone(), decision.clone());
    let task = tokio::spawn(async move { nixroll::controller::execute(&c2, &o2, &cur2, d2).await });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(200, pod_list(vec![pod("web-1", Some("ReplicaSet"), json!({}))]));
    let s = next(&mut handle).await;
    assert_eq!(s.path, "/api/v1/namespaces/apps/pods/web-1/eviction");
    s.reply(429, status_failure(429, "TooManyRequests"));
    // Pods are left: the controller starts watching this node's pods (and only these).
    let mut pod_watch = Vec::new();
    let s = next_besides_pod_watch(&mut handle, &mut pod_watch).await;
    assert_event(&s, "Node", "EvictionBlocked");
    s.echo(201);
    let requeue = task.await.unwrap().unwrap();
    // Next pass after the drain backoff (30 s here), sooner than the decision's 10 min.
    assert_eq!(
        requeue,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );

    // Reconciled again right away (e.g. a Node event): no new pass inside the backoff.
    let requeue = nixroll::controller::execute(&ctx, &obj, &current, decision)
        .await
        .unwrap();
    if pod_watch.is_empty() {
        // The watch's list may come only now.
        let s = next(&mut handle).await;
        assert!(
            s.query.contains_key("limit"),
            "the pod watch's list, got {} {:?}",
            s.path,
            s.query
        );
        pod_watch.push(s);
    }
    expect_silence(&mut handle).await;
    assert_ne!(requeue, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn force_delete_deletes_remaining_pods_with_the_grace_period() {
    let (client, mut handle) = mock();
    let policy = DrainPolicy {
        grace_period_seconds: Some(5),
        ..DrainPolicy::default()
    };
    let c = client.clone();
    let pass =
        tokio::spawn(
            async move { drain::force_delete_pass(&c, "n1", &policy, Duration::from_secs(2)).await },
        );
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(
        200,
        pod_list(vec![
            pod("agent", Some("DaemonSet"), json!({})),
            pod("web-1", Some("ReplicaSet"), json!({})),
        ]),
    );
    let s = next(&mut handle).await;
    assert_eq!(s.method, "DELETE");
    assert_eq!(s.path, "/api/v1/namespaces/apps/pods/web-1");
    assert_eq!(s.body["gracePeriodSeconds"], 5);
    s.reply(200, pod("web-1", Some("ReplicaSet"), json!({})));
    let progress = pass.await.unwrap().unwrap();
    assert_eq!(progress.remaining, 1);
    expect_silence(&mut handle).await;
}

// ---------------------------------------------------------------- leader election

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/nixroll-system/leases/nixroll-controller";

fn elector(client: Client) -> LeaderElector {
    let cfg = LeaderElectionConfig::new("nixroll-system", "nixroll-controller", "me-abc");
    LeaderElector::new(client, cfg, Duration::from_secs(2))
}

/// One step of a leader elector started against the mock, and its first request (the Lease's
/// GET), not yet answered.
async fn lease_step() -> (JoinHandle<Result<LeaseOutcome, LeaderError>>, Handle, Seen) {
    let (client, mut handle) = mock();
    let mut e = elector(client);
    let step = tokio::spawn(async move { e.try_acquire_or_renew().await });
    let s = next(&mut handle).await;
    (step, handle, s)
}

fn lease(holder: &str, renew: jiff::Timestamp, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "nixroll-controller", "namespace": "nixroll-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
            "acquireTime": renew.to_string(), "renewTime": renew.to_string(), "leaseTransitions": 2}})
}

#[tokio::test]
async fn lease_is_acquired_when_free() {
    let (step, mut handle, s) = lease_step().await;
    assert_eq!((s.method.as_str(), s.path.as_str()), ("GET", LEASE_PATH));
    s.reply(404, status_failure(404, "NotFound"));
    let s = next(&mut handle).await;
    assert_eq!(s.method, "POST");
    assert_eq!(
        s.path,
        "/apis/coordination.k8s.io/v1/namespaces/nixroll-system/leases"
    );
    assert_eq!(s.body["spec"]["holderIdentity"], "me-abc");
    assert_eq!(s.body["spec"]["leaseDurationSeconds"], 15);
    let body = s.body.clone();
    s.reply(201, body);
    assert_eq!(step.await.unwrap().unwrap(), LeaseOutcome::Acquired);
}

#[tokio::test]
async fn lease_held_and_unexpired_is_not_taken() {
    let (step, mut handle, s) = lease_step().await;
    assert_eq!(s.path, LEASE_PATH);
    s.reply(200, lease("other-xyz", jiff::Timestamp::now(), "7"));
    match step.await.unwrap().unwrap() {
        LeaseOutcome::HeldByOther { holder, retry_in } => {
            assert_eq!(holder, "other-xyz");
            assert!(retry_in <= Duration::from_secs(5));
        }
        other => panic!("took a held lease: {other:?}"),
    }
    expect_silence(&mut handle).await;
}

#[tokio::test]
async fn expired_lease_is_taken_over_with_its_resource_version() {
    let (step, mut handle, s) = lease_step().await;
    let old = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    s.reply(200, lease("other-xyz", old, "7"));
    let s = next(&mut handle).await;
    assert_eq!((s.method.as_str(), s.path.as_str()), ("PUT", LEASE_PATH));
    assert_eq!(s.body["metadata"]["resourceVersion"], "7");
    assert_eq!(s.body["spec"]["holderIdentity"], "me-abc");
    assert_eq!(s.body["spec"]["leaseTransitions"], 3);
    let body = s.body.clone();
    s.reply(200, body);
    assert_eq!(step.await.unwrap().unwrap(), LeaseOutcome::Acquired);
}

#[tokio::test]
async fn conflict_on_takeover_is_a_lost_race() {
    let (step, mut handle, s) = lease_step().await;
    let old = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    s.reply(200, lease("other-xyz", old, "7"));
    let s = next(&mut handle).await;
    assert_eq!(s.method, "PUT");
    s.reply(409, status_failure(409, "Conflict"));
    assert_eq!(step.await.unwrap().unwrap(), LeaseOutcome::LostRace);
}

#[tokio::test]
async fn holder_renews_its_own_lease() {
    let (step, mut handle, s) = lease_step().await;
    let earlier = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(5);
    s.reply(200, lease("me-abc", earlier, "9"));
    let s = next(&mut handle).await;
    assert_eq!(s.method, "PUT");
    assert_eq!(s.body["metadata"]["resourceVersion"], "9");
    assert_eq!(s.body["spec"]["leaseTransitions"], 2);
    let renewed: jiff::Timestamp = s.body["spec"]["renewTime"].as_str().unwrap().parse().unwrap();
    assert!(renewed > earlier);
    let body = s.body.clone();
    s.reply(200, body);
    assert_eq!(step.await.unwrap().unwrap(), LeaseOutcome::Renewed);
}

/// Cordon and uncordon are conditional on the Node the decision saw: the patch carries that
/// resourceVersion, and a 409 (the Node changed since, e.g. an admin cordoned it) is not an
/// error: nothing else is done on the node and the decision is taken again shortly.
#[tokio::test]
async fn cordon_is_conditional_on_the_node_the_decision_saw() {
    let (client, mut handle) = mock();
    let mut stores = ready_stores();
    let (nodes, mut w) = reflector::store::<Node>();
    w.apply_watcher_event(&watcher::Event::Init);
    let mut node: Node = serde_json::from_value(node_reply("n1", false)).unwrap();
    node.metadata.resource_version = Some("41".into());
    w.apply_watcher_event(&watcher::Event::InitApply(node));
    w.apply_watcher_event(&watcher::Event::InitDone);
    stores.nodes = nodes;
    let (ctx, _wake) = Context::new(
        client,
        ControllerConfig::new("test-replica"),
        stores,
        Arc::new(Metrics::new()),
        Arc::new(AtomicBool::new(true)),
    );
    let obj = nixosnode("n1", None);
    let decision = decision_to(draining_status(true), vec![Action::Cordon, Action::Evict]);
    let current = waiting_status();
    let task =
        tokio::spawn(async move { nixroll::controller::execute(&ctx, &obj, &current, decision).await });
    let s = status_then_node_patch(&mut handle, "n1").await;
    assert_eq!(s.body["metadata"]["resourceVersion"], "41");
    assert_eq!(s.body["metadata"]["annotations"]["nixroll.io/cordoned"], "true");
    s.reply(
        409,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
               "message": "Operation cannot be fulfilled on nodes \"n1\": the object has been modified"}),
    );
    let requeue = task.await.unwrap().expect("a changed Node is not an error");
    assert_eq!(
        requeue,
        kube::runtime::controller::Action::requeue(Duration::from_secs(1))
    );
    // No eviction on a node that is not cordoned, no Cordoned event.
    expect_silence(&mut handle).await;
}

/// Evictions of one pass are in flight together (as with `kubectl drain`): all three requests
/// arrive before any is answered, and the answers are tallied per pod.
#[tokio::test]
async fn one_pass_sends_its_evictions_concurrently() {
    let (client, mut handle) = mock();
    let pass = tokio::spawn(async move {
        drain::evict_pass(&client, "n1", &DrainPolicy::default(), Duration::from_secs(2)).await
    });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(
        200,
        pod_list(
            ["a", "b", "c"]
                .iter()
                .map(|n| pod(n, Some("ReplicaSet"), json!({})))
                .collect(),
        ),
    );
    let mut pending = Vec::new();
    for _ in 0..3 {
        let s = next(&mut handle).await;
        assert!(s.path.ends_with("/eviction"), "{}", s.path);
        pending.push(s);
    }
    for s in pending {
        if s.path.contains("/b/") {
            s.reply(429, status_failure(429, "TooManyRequests"));
        } else {
            s.reply(
                201,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}),
            );
        }
    }
    let progress = pass.await.unwrap().unwrap();
    assert_eq!((progress.remaining, progress.blocked_by_pdb), (3, 1));
    expect_silence(&mut handle).await;
}

/// The pods one PodDisruptionBudget covers are evicted one after another (concurrent evictions
/// against one budget conflict inside kube-apiserver and cost the loser ~500 ms); pods of
/// other budgets, or of none, go at once. After a 429 the rest of that budget's group is not
/// asked (it would be refused too) but counted as blocked.
#[tokio::test]
async fn evictions_under_one_budget_go_one_after_another_and_stop_at_its_first_429() {
    let budget: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "minAvailable": 1},
    }))
    .unwrap();
    let budgets = vec![std::sync::Arc::new(budget)];
    let web = |n: &str| {
        pod(
            n,
            Some("ReplicaSet"),
            json!({"metadata": {"labels": {"app": "web"}}}),
        )
    };
    let pods = || {
        pod_list(vec![
            web("a"),
            web("b"),
            web("c"),
            pod("d", Some("ReplicaSet"), json!({})),
        ])
    };
    let ok = json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201});

    // 1. The budget allows one: a goes, b is refused, c is never asked; d goes alongside a.
    let (client, mut handle) = mock();
    let b2 = budgets.clone();
    let pass = tokio::spawn(async move {
        drain::evict_pass_with(
            &client,
            "n1",
            &DrainPolicy::default(),
            &b2,
            None,
            Duration::from_secs(2),
        )
        .await
    });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(200, pods());
    let first = next(&mut handle).await;
    let second = next(&mut handle).await;
    let mut names: Vec<&str> = [&first, &second]
        .iter()
        .map(|s| s.path.split('/').nth(6).unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "d"],
        "the first of the budget's pods and the uncovered pod, together"
    );
    expect_silence(&mut handle).await;
    for s in [first, second] {
        s.reply(201, ok.clone());
    }
    let s = next(&mut handle).await;
    assert!(s.path.ends_with("/pods/b/eviction"), "{}", s.path);
    s.reply(429, status_failure(429, "TooManyRequests"));
    let progress = pass.await.unwrap().unwrap();
    assert_eq!((progress.remaining, progress.blocked_by_pdb), (4, 2));
    expect_silence(&mut handle).await;

    // 2. Without the budget known, all four go at once (as before).
    let (client, mut handle) = mock();
    let pass = tokio::spawn(async move {
        drain::evict_pass_with(
            &client,
            "n1",
            &DrainPolicy::default(),
            &[],
            None,
            Duration::from_secs(2),
        )
        .await
    });
    next(&mut handle).await.reply(200, pods());
    let mut pending = Vec::new();
    for _ in 0..4 {
        pending.push(next(&mut handle).await);
    }
    for s in pending {
        s.reply(201, ok.clone());
    }
    assert_eq!(pass.await.unwrap().unwrap().remaining, 4);
}

/// Between two evictions under one budget, the drain waits until the budget's controller has
/// taken in the first (the budget as watched changed and no longer lists the evicted pod in
/// `status.disruptedPods`) and the budget then stayed unchanged for the quiet time. Sent at
/// once instead, the second eviction runs into that controller's status writes inside
/// kube-apiserver, which retries it after ~500 ms (measured with `nixroll bench
/// --kube-assets`, docs/benchmarks.md).
#[tokio::test]
async fn the_next_eviction_under_a_budget_waits_until_the_budget_took_in_the_last_and_went_quiet() {
    let budget = |version: &str, disrupted: &[&str]| -> PodDisruptionBudget {
        let pods: serde_json::Map<String, Value> = disrupted
            .iter()
            .map(|p| (p.to_string(), json!("2026-12-07T00:00:00Z")))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "apps", "resourceVersion": version},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "minAvailable": 1},
            "status": {"disruptionsAllowed": 2, "currentHealthy": 3, "desiredHealthy": 1,
                       "expectedPods": 3, "disruptedPods": pods},
        }))
        .unwrap()
    };
    let (store, mut writer) = reflector::store::<PodDisruptionBudget>();
    writer.apply_watcher_event(&watcher::Event::Apply(budget("1", &[])));
    let (changed, rx) = tokio::sync::watch::channel(());
    let watch = drain::BudgetWatch {
        store,
        changed: rx,
        quiet: Duration::from_millis(400),
        settle_limit: Duration::from_secs(30),
    };
    let web = |n: &str| {
        pod(
            n,
            Some("ReplicaSet"),
            json!({"metadata": {"labels": {"app": "web"}}}),
        )
    };
    let ok = json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201});
    let (client, mut handle) = mock();
    let budgets = vec![Arc::new(budget("1", &[]))];
    let pass = tokio::spawn(async move {
        drain::evict_pass_with(
            &client,
            "n1",
            &DrainPolicy::default(),
            &budgets,
            Some(watch),
            Duration::from_secs(2),
        )
        .await
    });
    let s = next(&mut handle).await;
    assert_pod_list(&s);
    s.reply(200, pod_list(vec![web("a"), web("b")]));
    let first = next(&mut handle).await;
    assert!(first.path.ends_with("/pods/a/eviction"), "{}", first.path);
    first.reply(201, ok.clone());
    // b waits while the budget is unchanged ...
    expect_silence(&mut handle).await;
    // ... and while it holds only the eviction's own write (a listed as disrupted) ...
    writer.apply_watcher_event(&watcher::Event::Apply(budget("2", &["a"])));
    changed.send_replace(());
    expect_silence(&mut handle).await;
    // ... and once the budget's controller has seen a terminating, while it keeps writing
    // (a change of another budget does not count) ...
    writer.apply_watcher_event(&watcher::Event::Apply(budget("3", &[])));
    changed.send_replace(());
    expect_silence(&mut handle).await;
    writer.apply_watcher_event(&watcher::Event::Apply(budget("4", &[])));
    changed.send_replace(());
    let last_change = tokio::time::Instant::now();
    expect_silence(&mut handle).await;
    changed.send_replace(());
    // ... and goes once the budget stayed unchanged for the quiet time.
    let second = next(&mut handle).await;
    let waited = last_change.elapsed();
    assert!(second.path.ends_with("/pods/b/eviction"), "{}", second.path);
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "evicted {waited:?} after the budget's last change"
    );
    second.reply(201, ok);
    assert_eq!(pass.await.unwrap().unwrap().remaining, 2);
    expect_silence(&mut handle).await;
}
