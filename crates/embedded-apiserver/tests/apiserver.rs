//! The embedded API server, driven through the real `kube::Client` over HTTP (and `kubectl`).
//! Custom resources are the `Machine` of `fixtures/machine-crd.yaml`, registered at run time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use std::path::Path;

use embedded_apiserver::kubectl::Kubectl;
use embedded_apiserver::{ApiServer, Gvr, StoreOptions, WatchEvent as StoreEvent, WatchOptions};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// The typed view of `fixtures/machine-crd.yaml` (its schema is the fixture's, not derived).
#[derive(kube::CustomResource, serde::Deserialize, serde::Serialize, Clone, Debug)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "Machine",
    status = "MachineStatus",
    schema = "disabled"
)]
pub struct MachineSpec {
    pub image: String,
    pub revision: String,
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub suspend: bool,
}

#[derive(serde::Deserialize, serde::Serialize, Clone, Debug, Default)]
pub struct MachineStatus {
    pub phase: Option<String>,
    pub message: Option<String>,
    pub wanted: Option<String>,
    pub agent: Option<AgentStatus>,
}

#[derive(serde::Deserialize, serde::Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub boot_id: Option<String>,
}

async fn start() -> (ApiServer, Client) {
    start_with(StoreOptions::default()).await
}

async fn start_with(opts: StoreOptions) -> (ApiServer, Client) {
    let srv = ApiServer::start_with("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let client = srv.client().await.unwrap();
    (srv, client)
}

async fn install_crd(client: &Client) {
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(include_str!("fixtures/machine-crd.yaml")).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
}

fn machine(name: &str) -> Value {
    json!({
        "apiVersion": "example.com/v1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {"image": "registry.example.com/os", "revision": "0123456789abcdef0123456789abcdef01234567"}
    })
}

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"}
    }))
    .unwrap()
}

fn pod(name: &str, node: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap()
}

async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let st = if ready { "True" } else { "False" };
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": st}]}}),
        ),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn crud_conflicts_and_not_found() {
    let (_srv, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();

    // Create of an existing name: 409 AlreadyExists.
    let e = api_err(
        cms.create(&PostParams::default(), &cm("a", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    // Update with the current rv works and bumps the global rv.
    let mut fresh = cms.get("a").await.unwrap();
    fresh.data = Some([("k".to_owned(), "w".to_owned())].into());
    let updated = cms.replace("a", &PostParams::default(), &fresh).await.unwrap();
    let rv2: u64 = updated.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);

    // Update with the stale rv: 409 Conflict with a real Status body.
    let e = api_err(
        cms.replace("a", &PostParams::default(), &fresh)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );

    // Invalid names: 422.
    let e = api_err(
        cms.create(&PostParams::default(), &cm("Not_Valid", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains("metadata.name: Invalid value"),
        "{}",
        e.message
    );

    // Missing: 404 NotFound.
    let e = api_err(cms.get("missing").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "configmaps \"missing\" not found");

    // List carries the global resourceVersion.
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv >= rv2);

    // Pagination: pages cut from one snapshot, continue token, all items once.
    for n in ["b", "c", "d"] {
        cms.create(&PostParams::default(), &cm(n, json!({})))
            .await
            .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    let token = first.metadata.continue_.clone().unwrap();
    cms.create(&PostParams::default(), &cm("e", json!({})))
        .await
        .unwrap();
    let second = cms
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        second.items.len(),
        1,
        "the snapshot does not see the later object"
    );
    assert_eq!(second.metadata.continue_, None);
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    let e = api_err(
        cms.list(&ListParams::default().limit(3).continue_token("bogus/3"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 410);
    for n in ["b", "c", "d", "e"] {
        cms.delete(n, &DeleteParams::default()).await.unwrap();
    }

    // No-op update: no new resourceVersion (as etcd: nothing written).
    let same = cms.replace("a", &PostParams::default(), &updated).await.unwrap();
    assert_eq!(same.resource_version(), updated.resource_version());

    // Namespace must exist.
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let e = api_err(
        other
            .create(&PostParams::default(), &cm("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let (_srv, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("p", json!({"a": "1"})))
        .await
        .unwrap();
    let p = cms
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": null, "b": "2"}}, "data": {"x": "y"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.labels().get("b").map(String::as_str), Some("2"));
    assert!(!p.labels().contains_key("a"));
    assert_eq!(p.data.as_ref().unwrap().len(), 2);

    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/k", "value": "v"},
        {"op": "replace", "path": "/data/k", "value": "patched"},
        {"op": "remove", "path": "/data/x"}
    ]))
    .unwrap();
    let p = cms
        .patch("p", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(p.data.as_ref().unwrap().get("k").unwrap(), "patched");
    assert!(!p.data.as_ref().unwrap().contains_key("x"));

    // A failing JSON patch test op is rejected and changes nothing.
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/k", "value": "nope"}])).unwrap();
    let e = api_err(
        cms.patch("p", &PatchParams::default(), &Patch::<()>::Json(bad))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);

    // Strategic merge keeps other conditions (merge key `type`).
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let n = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    let conds = n.status.unwrap().conditions.unwrap();
    assert_eq!(conds.len(), 2);
    assert!(conds.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
}

#[tokio::test]
async fn server_side_apply_two_managers() {
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<Machine> = Api::all(client.clone());
    // Apply to a non-existent object creates it.
    api.patch("n1", &PatchParams::apply("flux"), &Patch::Apply(machine("n1")))
        .await
        .unwrap();

    let agent = PatchParams::apply("node-agent");
    let controller = PatchParams::apply("rollout-controller");
    let status = |s: Value| json!({"apiVersion": "example.com/v1", "kind": "Machine", "metadata": {"name": "n1"}, "status": s});
    api.patch_status(
        "n1",
        &agent,
        &Patch::Apply(status(json!({"agent": {"bootId": "b1"}}))),
    )
    .await
    .unwrap();
    api.patch_status(
        "n1",
        &controller,
        &Patch::Apply(status(json!({"phase": "Staging", "message": "staging"}))),
    )
    .await
    .unwrap();
    let o = api.get_status("n1").await.unwrap();
    let s = o.status.clone().unwrap();
    assert_eq!(s.agent.as_ref().unwrap().boot_id.as_deref(), Some("b1"));
    assert_eq!(s.message.as_deref(), Some("staging"));

    // The agent re-applies its part: the controller's fields stay.
    api.patch_status(
        "n1",
        &agent,
        &Patch::Apply(status(json!({"agent": {"bootId": "b2"}}))),
    )
    .await
    .unwrap();
    // The controller stops applying `message`: it is removed; the agent's part stays.
    let o = api
        .patch_status(
            "n1",
            &controller,
            &Patch::Apply(status(json!({"phase": "Waiting"}))),
        )
        .await
        .unwrap();
    let s = o.status.clone().unwrap();
    assert_eq!(s.agent.as_ref().unwrap().boot_id.as_deref(), Some("b2"));
    assert_eq!(s.message, None);
    assert_eq!(s.phase.map(|p| p.to_string()).as_deref(), Some("Waiting"));

    // managedFields: one entry per manager (flux on the main resource, the others on status).
    let mf = o.metadata.managed_fields.clone().unwrap();
    let managers: Vec<(String, Option<String>)> = mf
        .iter()
        .map(|m| (m.manager.clone().unwrap(), m.subresource.clone()))
        .collect();
    assert!(managers.contains(&("flux".into(), None)), "{managers:?}");
    assert!(managers.contains(&("node-agent".into(), Some("status".into()))));
    assert!(managers.contains(&("rollout-controller".into(), Some("status".into()))));
    let agent_fields = serde_json::to_value(
        &mf.iter()
            .find(|m| m.manager.as_deref() == Some("node-agent"))
            .unwrap()
            .fields_v1,
    )
    .unwrap();
    assert_eq!(agent_fields, json!({"f:status": {"f:agent": {"f:bootId": {}}}}));

    // The agent applying the controller's field with another value: 409 conflict, unforced.
    let e = api_err(
        api.patch_status(
            "n1",
            &agent,
            &Patch::Apply(status(json!({"agent": {"bootId": "b2"}, "phase": "Degraded"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(e.message.contains("rollout-controller"), "{}", e.message);
    assert!(e.message.contains(".status.phase"), "{}", e.message);
    // The same value is no conflict (shared ownership).
    api.patch_status(
        "n1",
        &agent,
        &Patch::Apply(status(json!({"agent": {"bootId": "b2"}, "phase": "Waiting"}))),
    )
    .await
    .unwrap();
    // Force takes ownership.
    let o = api
        .patch_status(
            "n1",
            &agent.clone().force(),
            &Patch::Apply(status(json!({"agent": {"bootId": "b2"}, "phase": "Degraded"}))),
        )
        .await
        .unwrap();
    let mf = o.metadata.managed_fields.unwrap();
    let owns_phase = |m: &str| {
        mf.iter()
            .find(|e| e.manager.as_deref() == Some(m))
            .map(|e| {
                serde_json::to_value(&e.fields_v1).unwrap()["f:status"]
                    .get("f:phase")
                    .is_some()
            })
            .unwrap_or(false)
    };
    assert!(owns_phase("node-agent"));
    assert!(!owns_phase("rollout-controller"));

    // Apply without fieldManager is refused.
    let e = api_err(
        api.patch("n1", &PatchParams::default(), &Patch::Apply(machine("n1")))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
}

#[tokio::test]
async fn status_subresource_isolation_and_generation() {
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<Machine> = Api::all(client.clone());
    let mut obj: Value = machine("g");
    obj["status"] = json!({"phase": "Staging"});
    let created = api
        .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
        .await
        .unwrap();
    // Status is dropped on create and has generation 1.
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none());

    // The status endpoint changes only status, without bumping generation.
    let o = api
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Staging"}, "spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    assert_eq!(o.metadata.generation, Some(1));
    assert!(!o.spec.suspend);
    assert!(o.status.is_some());

    // The main endpoint ignores status, and bumps generation on spec changes.
    let o = api
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Degraded"}, "spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    assert_eq!(o.metadata.generation, Some(2));
    assert!(o.spec.suspend);
    assert_eq!(
        o.status
            .as_ref()
            .unwrap()
            .phase
            .clone()
            .map(|p| p.to_string())
            .as_deref(),
        Some("Staging")
    );
    // Metadata-only change: no generation bump.
    let o = api
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(o.metadata.generation, Some(2));
    // PUT without resourceVersion on a custom resource is invalid.
    let mut no_rv = o.clone();
    no_rv.metadata.resource_version = None;
    let e = api_err(
        api.replace("g", &PostParams::default(), &no_rv)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
}

#[tokio::test]
async fn label_and_field_selectors() {
    let (_srv, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for (n, l) in [
        ("a", json!({"app": "web", "tier": "fe"})),
        ("b", json!({"app": "db"})),
        ("c", json!({})),
    ] {
        cms.create(&PostParams::default(), &cm(n, l)).await.unwrap();
    }
    let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        l.items.iter().map(|c| c.name_any()).collect()
    };
    for (sel, want) in [
        ("app=web", vec!["a"]),
        ("app==web", vec!["a"]),
        ("app!=web", vec!["b", "c"]),
        ("app in (web,db)", vec!["a", "b"]),
        ("app notin (web)", vec!["b", "c"]),
        ("tier", vec!["a"]),
        ("!app", vec!["c"]),
    ] {
        let l = cms.list(&ListParams::default().labels(sel)).await.unwrap();
        assert_eq!(names(l), want, "{sel}");
    }
    // deletecollection honours the selector.
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=nothing"),
    )
    .await
    .unwrap();
    assert_eq!(cms.list(&ListParams::default()).await.unwrap().items.len(), 3);
    let l = cms
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(names(l), vec!["b"]);
    let l = cms
        .list(&ListParams::default().fields("metadata.name!=b,metadata.namespace=default"))
        .await
        .unwrap();
    assert_eq!(names(l), vec!["a", "c"]);

    cms.delete_collection(&DeleteParams::default(), &ListParams::default().labels("app=db"))
        .await
        .unwrap();
    assert_eq!(
        names(cms.list(&ListParams::default()).await.unwrap()),
        vec!["a", "c"]
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("p1", "n1", json!({})))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("p2", "n2", json!({})))
        .await
        .unwrap();
    let all: Api<Pod> = Api::all(client.clone());
    let l = all
        .list(&ListParams::default().fields("spec.nodeName=n2"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].name_any(), "p2");
    let l = all
        .list(&ListParams::default().fields("status.phase=Pending"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 2);
}

async fn next_event<S>(s: &mut S) -> watcher::Event<ConfigMap>
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(T, s.next())
            .await
            .expect("watch event in time")
        {
            Some(Ok(ev)) => return ev,
            Some(Err(_)) => continue, // the watcher reports errors and recovers by itself
            None => panic!("watch stream ended"),
        }
    }
}

fn describe(ev: &watcher::Event<ConfigMap>) -> String {
    match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply {}", o.name_any()),
        watcher::Event::Delete(o) => format!("Delete {}", o.name_any()),
    }
}

async fn watcher_flow(streaming: bool) {
    let (srv, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let mut cfg = watcher::Config::default().timeout(60);
    if streaming {
        cfg = cfg.streaming_lists();
    }
    let mut s = watcher(cms.clone(), cfg).boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_event(&mut s).await));
    }
    assert_eq!(seen, vec!["Init", "InitApply a", "InitDone"]);
    cms.create(&PostParams::default(), &cm("b", json!({})))
        .await
        .unwrap();
    assert_eq!(describe(&next_event(&mut s).await), "Apply b");
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(describe(&next_event(&mut s).await), "Delete a");

    // Server restart-like drop of all watches, changes meanwhile, then compaction: the watcher's
    // resume gets 410 Gone and it relists.
    srv.store().drop_watches();
    cms.create(&PostParams::default(), &cm("c", json!({})))
        .await
        .unwrap();
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    srv.store().compact();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_event(&mut s).await));
    }
    assert_eq!(seen, vec!["Init", "InitApply c", "InitDone"]);
    cms.create(&PostParams::default(), &cm("d", json!({})))
        .await
        .unwrap();
    assert_eq!(describe(&next_event(&mut s).await), "Apply d");
    assert!(srv.request_counts().get("watch", "configmaps") >= 2);
}

#[tokio::test]
async fn watcher_list_watch_and_resume_after_gone() {
    watcher_flow(false).await;
}

#[tokio::test]
async fn watcher_streaming_list_and_resume_after_gone() {
    watcher_flow(true).await;
}

#[tokio::test]
async fn raw_watch_bookmarks_and_selector_semantics() {
    let (srv, client) = start_with(StoreOptions {
        bookmark_interval: Duration::from_millis(200),
        ..StoreOptions::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("a", json!({"app": "web"})))
        .await
        .unwrap();
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = cms
        .watch(&WatchParams::default().labels("app=web").timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    // A bookmark arrives although nothing changes.
    let ev = tokio::time::timeout(T, w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WatchEvent::Bookmark(b) = ev else {
        panic!("expected a bookmark, got {ev:?}");
    };
    assert_eq!(b.metadata.resource_version, rv);
    // Relabel: the object stops matching, the watcher sees DELETED; matching again: ADDED.
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while kinds.is_empty() {
        match tokio::time::timeout(T, w.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Deleted(o) => kinds.push(format!("Deleted {}", o.name_any())),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    while kinds.len() < 2 {
        match tokio::time::timeout(T, w.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(o) => kinds.push(format!("Added {}", o.name_any())),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, vec!["Deleted a", "Added a"]);

    // A watch from a compacted resourceVersion gets an ERROR event with 410.
    srv.store().compact();
    let mut w = cms.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match tokio::time::timeout(T, w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn slow_watcher_is_closed_with_gone() {
    let (srv, client) = start_with(StoreOptions {
        watch_channel_capacity: 4,
        ..StoreOptions::default()
    })
    .await;
    let store = srv.store();
    let mut w = store
        .watch(
            &Gvr::new("", "v1", "configmaps"),
            Some("default"),
            &WatchOptions {
                resource_version: Some(store.resource_version().to_string()),
                ..WatchOptions::default()
            },
        )
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut added = 0;
    let last = loop {
        match w.next().await {
            Some(StoreEvent::Added(_)) => added += 1,
            Some(other) => break other,
            None => panic!("ended without error"),
        }
    };
    assert_eq!(added, 4);
    let StoreEvent::Error(status) = last else {
        panic!("expected 410, got {last:?}");
    };
    assert_eq!(status["code"], 410);
    assert!(w.next().await.is_none());
    assert_eq!(store.watcher_count(), 0);
}

#[tokio::test]
async fn pod_graceful_deletion_lingers_until_kubelet_removes_it() {
    let (srv, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1", json!({})))
        .await
        .unwrap();
    let r = pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(r.is_left(), "a graceful delete returns the object");
    let p = pods.get("p").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    // The simulated kubelet finishes it.
    srv.store().finish_pod_deletion("default", "p").unwrap();
    assert_eq!(api_err(pods.get("p").await.unwrap_err()).code, 404);

    // gracePeriodSeconds=0 deletes at once.
    pods.create(&PostParams::default(), &pod("q", "n1", json!({})))
        .await
        .unwrap();
    pods.delete(
        "q",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(api_err(pods.get("q").await.unwrap_err()).code, 404);

    // Finalizers hold an object until they are removed.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut c = cm("f", json!({}));
    c.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &c).await.unwrap();
    cms.delete("f", &DeleteParams::default()).await.unwrap();
    let held = cms.get("f").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    cms.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_err(cms.get("f").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn eviction_respects_pod_disruption_budgets() {
    let (srv, _) = start().await;
    // kube's default client retries 429 internally for minutes; a drain handles 429 itself.
    let mut config = srv.config().await.unwrap();
    config.default_retry = false;
    let client = Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    pdbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "web-pdb"},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}}))
        .unwrap(),
    )
    .await
    .unwrap();
    for n in ["w1", "w2", "w3"] {
        pods.create(&PostParams::default(), &pod(n, "n1", json!({"app": "web"})))
            .await
            .unwrap();
    }
    set_ready(&pods, "w1", true).await;
    set_ready(&pods, "w2", true).await;
    let st = pdbs.get("web-pdb").await.unwrap().status.unwrap();
    assert_eq!(
        (
            st.current_healthy,
            st.desired_healthy,
            st.disruptions_allowed,
            st.expected_pods
        ),
        (2, 2, 0, 3)
    );

    let e = api_err(pods.evict("w1", &EvictParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (429, "TooManyRequests"));
    assert_eq!(
        e.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let cause = &e.details.as_ref().unwrap().causes[0];
    assert!(cause.message.contains("web-pdb"), "{}", cause.message);
    assert!(
        pods.get("w1")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    // A missing pod: 404.
    assert_eq!(
        api_err(pods.evict("nope", &EvictParams::default()).await.unwrap_err()).code,
        404
    );

    // Another pod becomes ready: one disruption allowed, the eviction succeeds.
    set_ready(&pods, "w3", true).await;
    assert_eq!(
        pdbs.get("web-pdb")
            .await
            .unwrap()
            .status
            .unwrap()
            .disruptions_allowed,
        1
    );
    pods.evict("w1", &EvictParams::default()).await.unwrap();
    let evicted = pods.get("w1").await.unwrap();
    assert!(
        evicted.metadata.deletion_timestamp.is_some(),
        "evicted pods terminate gracefully"
    );
    let st = pdbs.get("web-pdb").await.unwrap().status.unwrap();
    assert_eq!((st.current_healthy, st.disruptions_allowed), (2, 0));
    // Budget used up again: the next eviction is refused; an already terminating pod evicts.
    assert_eq!(
        api_err(pods.evict("w2", &EvictParams::default()).await.unwrap_err()).code,
        429
    );
    pods.evict("w1", &EvictParams::default()).await.unwrap();
}

#[tokio::test]
async fn cordon_uncordon_and_lease_conflicts() {
    let (_srv, client) = start().await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    let n = nodes.cordon("n1").await.unwrap();
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    let n = nodes.uncordon("n1").await.unwrap();
    assert_eq!(n.spec.unwrap().unschedulable, Some(false));

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let l: Lease = serde_json::from_value(json!({"metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))
    .unwrap();
    let created = leases.create(&PostParams::default(), &l).await.unwrap();
    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    // A competitor with the old resourceVersion loses.
    let mut theirs = created;
    theirs.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let e = api_err(
        leases
            .replace("leader", &PostParams::default(), &theirs)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    assert_eq!(
        leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn events_in_both_apis_share_storage() {
    let (_srv, client) = start().await;
    let ev: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    ev.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
            "reason": "Drained", "note": "drained n1", "type": "Normal", "action": "Drain",
            "reportingController": "example.com/controller", "reportingInstance": "c-1",
            "regarding": {"kind": "Machine", "name": "n1", "apiVersion": "example.com/v1"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let l = core
        .list(&ListParams::default().fields("involvedObject.name=n1,involvedObject.kind=Machine"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].message.as_deref(), Some("drained n1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_typed_clients_send_protobuf_and_drain_uses_evictions() {
    let Some(kubectl) = kubectl() else {
        eprintln!("SKIPPED: kubectl not installed");
        return;
    };
    let (srv, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&kc).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for n in ["w1", "w2"] {
        pods.create(&PostParams::default(), &pod(n, "n1", json!({"app": "web"})))
            .await
            .unwrap();
        set_ready(&pods, n, true).await;
    }
    let k = kubectl.clone();
    let kc2 = kc.clone();
    let (drain_ok, drain_out) = tokio::task::spawn_blocking(move || {
        // The pause switch of DESIGN.md: typed kubectl commands send protobuf bodies.
        run(&k, &kc2, &["create", "namespace", "ops-system"], None);
        run(
            &k,
            &kc2,
            &["-n", "ops-system", "create", "configmap", "ops-pause"],
            None,
        );
        run(
            &k,
            &kc2,
            &["create", "pdb", "web", "--selector=app=web", "--min-available=1"],
            None,
        );
        run_status(&k, &kc2, &["drain", "n1", "--force", "--timeout=4s"], None)
    })
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ops-system");
    assert!(cms.get("ops-pause").await.is_ok());
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let pdb = pdbs.get("web").await.unwrap();
    assert_eq!(pdb.status.unwrap().expected_pods, 2);
    // One pod evicted (terminating, the kubelet never finishes it here), the other refused.
    assert!(!drain_ok, "{drain_out}");
    assert!(drain_out.contains("disruption budget"), "{drain_out}");
    let terminating = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    assert_eq!(terminating, 1);
    assert!(nodes.get("n1").await.unwrap().spec.unwrap().unschedulable == Some(true));
    assert!(srv.request_counts().get("evict", "pods") >= 2);
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// 1,000 nodes, 30 pods each, one controller watching everything and 1,000 agents each
/// watching its own Node (field-selected), all over HTTP. Sizes scale with NIXROLL_SCALE_NODES.
async fn scale(nodes_n: usize, pods_per_node: usize) {
    use embedded_apiserver::{Patch as SPatch, Subresource, WriteOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    let (srv, client) = start().await;
    let store = srv.store();
    let nodes_gvr = Gvr::new("", "v1", "nodes");
    let pods_gvr = Gvr::new("", "v1", "pods");
    let w = WriteOptions::manager("sim");
    let t = Instant::now();
    for i in 0..nodes_n {
        store
            .create(&nodes_gvr, None, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}")},
                "status": {"conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"bootID": "b0"}}}), &w)
            .unwrap();
        for j in 0..pods_per_node {
            store
                .create(
                    &pods_gvr,
                    Some("default"),
                    json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p-{i}-{j}"), "labels": {"app": format!("a{j}")}},
                    "spec": {"nodeName": format!("node-{i}"), "containers": [{"name": "c", "image": "x"}]}}),
                    &w,
                )
                .unwrap();
        }
    }
    eprintln!(
        "created {nodes_n} nodes + {} pods in-process: {:?}, RSS {} MiB",
        nodes_n * pods_per_node,
        t.elapsed(),
        rss_mib()
    );

    // 1,000 field-selected agent watches over HTTP.
    let rv = store.resource_version().to_string();
    let agent_events = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut streams = Vec::new();
    let nodes_api: Api<Node> = Api::all(client.clone());
    for i in 0..nodes_n {
        let name = format!("node-{i}");
        let s = nodes_api
            .watch(
                &WatchParams::default()
                    .fields(&format!("metadata.name={name}"))
                    .timeout(290),
                &rv,
            )
            .await
            .unwrap();
        let (ev, wr) = (agent_events.clone(), wrong.clone());
        streams.push(tokio::spawn(async move {
            let mut s = s.boxed();
            while let Ok(Some(e)) = s.try_next().await {
                if let WatchEvent::Modified(n) = e {
                    if n.name_any() == name {
                        ev.fetch_add(1, Ordering::SeqCst);
                    } else {
                        wr.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    eprintln!("opened {nodes_n} agent watches: {:?}", t.elapsed());
    // The controller: watchers on all nodes and all pods.
    let pod_events = Arc::new(AtomicUsize::new(0));
    let pe = pod_events.clone();
    let t = Instant::now();
    let pods_api: Api<Pod> = Api::all(client.clone());
    let (init_tx, init_rx) = tokio::sync::oneshot::channel();
    let ctrl = tokio::spawn(async move {
        let mut init_tx = Some(init_tx);
        let mut s = watcher(pods_api, watcher::Config::default()).boxed();
        while let Some(Ok(e)) = s.next().await {
            match e {
                watcher::Event::InitDone => {
                    if let Some(tx) = init_tx.take() {
                        let _ = tx.send(());
                    }
                }
                watcher::Event::Apply(_) => {
                    pe.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(120), init_rx)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "controller pod watcher initial list of {} pods: {:?}, RSS {} MiB",
        nodes_n * pods_per_node,
        t.elapsed(),
        rss_mib()
    );

    // Every node heartbeats once; each agent must see exactly its own node.
    let t = Instant::now();
    for i in 0..nodes_n {
        store
            .patch(
                &nodes_gvr,
                None,
                &format!("node-{i}"),
                &SPatch::Merge(json!({"status": {"nodeInfo": {"bootID": "b1"}}})),
                Subresource::Status,
                &w,
            )
            .unwrap();
    }
    let write = t.elapsed();
    tokio::time::timeout(Duration::from_secs(120), async {
        while agent_events.load(Ordering::SeqCst) < nodes_n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    eprintln!(
        "{nodes_n} node status writes: {write:?}; all agents notified after {:?}",
        t.elapsed()
    );
    assert_eq!(wrong.load(Ordering::SeqCst), 0);

    // Every pod's status changes once; the controller sees them all.
    let t = Instant::now();
    for i in 0..nodes_n {
        for j in 0..pods_per_node {
            store
                .patch(
                    &pods_gvr,
                    Some("default"),
                    &format!("p-{i}-{j}"),
                    &SPatch::Merge(json!({"status": {"phase": "Running"}})),
                    Subresource::Status,
                    &w,
                )
                .unwrap();
        }
    }
    let write = t.elapsed();
    tokio::time::timeout(Duration::from_secs(300), async {
        while pod_events.load(Ordering::SeqCst) < nodes_n * pods_per_node {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    eprintln!(
        "{} pod status writes: {write:?}; controller saw all after {:?}, RSS {} MiB",
        nodes_n * pods_per_node,
        t.elapsed(),
        rss_mib()
    );

    // Pods of one node, as a drain lists them.
    let t = Instant::now();
    let l = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-7"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), pods_per_node);
    eprintln!("field-selected pod list over HTTP: {:?}", t.elapsed());
    assert_eq!(agent_events.load(Ordering::SeqCst), nodes_n);
    ctrl.abort();
    for s in streams {
        s.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_small() {
    scale(50, 30).await;
}

/// Full size: `cargo test --release --test apiserver scale_full -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn scale_full() {
    scale(1000, 30).await;
}

#[tokio::test]
async fn restart_keeps_state_and_watchers_recover() {
    let (srv, client) = start().await;
    let addr = srv.addr();
    let store = srv.store();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let mut s = watcher(cms.clone(), watcher::Config::default()).boxed();
    for _ in 0..3 {
        next_event(&mut s).await;
    }
    srv.shutdown().await;
    // Down: requests fail (connection refused), not hang.
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.default_retry = false;
    let down: Api<ConfigMap> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    assert!(tokio::time::timeout(T, down.get("a")).await.unwrap().is_err());
    // Changed behind its back, then back on the same port with the same store.
    store
        .create(
            &Gvr::new("", "v1", "configmaps"),
            Some("default"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}),
            &Default::default(),
        )
        .unwrap();
    let _srv2 = ApiServer::start_on(addr, store).await.unwrap();
    assert_eq!(describe(&next_event(&mut s).await), "Apply b");
    assert!(cms.get("a").await.is_ok());
}

#[tokio::test]
async fn events_are_bounded() {
    let (_srv, client) = start_with(StoreOptions {
        event_limit: 3,
        ..StoreOptions::default()
    })
    .await;
    let ev: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        ev.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("e{i}")},
                "involvedObject": {"kind": "Node", "name": "n1"}, "reason": "R", "message": "m"}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    let names: Vec<String> = ev
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| e.name_any())
        .collect();
    assert_eq!(names, vec!["e2", "e3", "e4"]);
}

#[tokio::test]
async fn metadata_only_get_list_and_watch() {
    let (_srv, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("m", "n1", json!({"app": "x"})))
        .await
        .unwrap();
    let meta = pods.get_metadata("m").await.unwrap();
    assert_eq!(meta.metadata.labels.unwrap().get("app").unwrap(), "x");
    let list = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let meta_api: Api<kube::core::PartialObjectMeta<Pod>> = Api::namespaced(client.clone(), "default");
    let mut s = watcher(meta_api, watcher::Config::default()).boxed();
    let mut names = Vec::new();
    while names.len() < 2 {
        match tokio::time::timeout(T, s.next()).await.unwrap().unwrap().unwrap() {
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => names.push(o.name_any()),
            watcher::Event::InitDone => {
                pods.create(&PostParams::default(), &pod("n", "n1", json!({})))
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    assert_eq!(names, vec!["m", "n"]);
}

#[tokio::test]
async fn kube_event_recorder_creates_then_patches_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<Machine> = Api::all(client.clone());
    let o = api
        .patch("n1", &PatchParams::apply("flux"), &Patch::Apply(machine("n1")))
        .await
        .unwrap();
    let rec = Recorder::new(
        client.clone(),
        Reporter {
            controller: "rollout-controller".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Cordoned".into(),
        note: Some("cordoned n1".into()),
        action: "Cordon".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&o, &());
    rec.publish(&ev, &reference).await.unwrap();
    rec.publish(&ev, &reference).await.unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let l = core
        .list(&ListParams::default().fields("involvedObject.name=n1"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1, "the second publish patches the first event");
    assert_eq!(l.items[0].reason.as_deref(), Some("Cordoned"));
    assert_eq!(l.items[0].series.as_ref().and_then(|s| s.count), Some(2));
}

#[tokio::test]
async fn secret_string_data_is_folded_into_data() {
    let (_srv, client) = start().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "default");
    let s = secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"token": "hello"}}))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(s.string_data.is_none());
    assert_eq!(s.data.unwrap().get("token").unwrap().0, b"hello".to_vec());
}

#[tokio::test]
async fn typed_in_process_store_api_matches_http() {
    use embedded_apiserver::{ListOptions, Patch as SPatch, Subresource, WriteOptions};
    let (srv, client) = start().await;
    let store = srv.store();
    let w = WriteOptions::manager("kubelet");
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
    let created = store.create_as(&node, &w).unwrap();
    assert!(created.metadata.uid.is_some());
    let mut n = store.get_as::<Node>(None, "n1").unwrap();
    n.status = Some(serde_json::from_value(json!({"nodeInfo": {"bootID": "b1", "machineID": "", "systemUUID": "",
        "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "", "kubeProxyVersion": "",
        "operatingSystem": "linux", "architecture": "amd64"}})).unwrap());
    store.update_as(&n, Subresource::Status, &w).unwrap();
    // Stale update through the store: 409 as over HTTP.
    let e = store.update_as(&n, Subresource::Status, &w).unwrap_err();
    assert_eq!(e.code(), 409);
    let patched: Node = store
        .patch_as(
            None,
            "n1",
            &SPatch::Merge(json!({"spec": {"unschedulable": true}})),
            Subresource::Main,
            &w,
        )
        .unwrap();
    assert_eq!(patched.spec.unwrap().unschedulable, Some(true));
    // Seen over HTTP too.
    let nodes: Api<Node> = Api::all(client.clone());
    let over_http = nodes.get("n1").await.unwrap();
    assert_eq!(over_http.status.unwrap().node_info.unwrap().boot_id, "b1");
    assert_eq!(
        store
            .list_as::<Node>(None, &ListOptions::default())
            .unwrap()
            .len(),
        1
    );
    assert_eq!(srv.request_counts().get("get", "nodes"), 1);
}

fn kubectl() -> Option<String> {
    Kubectl::find().map(|p| p.display().to_string())
}

fn run(kubectl: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out) = run_status(kubectl, kubeconfig, args, stdin);
    assert!(ok, "kubectl {args:?} failed:\n{out}");
    out
}

fn run_status(kubectl: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let out = Kubectl::new(kubectl, kubeconfig).run(args, stdin).unwrap();
    (
        out.ok,
        if out.ok {
            out.stdout.clone()
        } else {
            out.combined()
        },
    )
}
