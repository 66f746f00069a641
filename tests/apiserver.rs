//! The embedded API server, driven through the real `kube::Client` over HTTP (and `kubectl`).
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
use nixroll::api::NixOSNode;
use nixroll::sim::apiserver::{ApiServer, Gvr, StoreOptions, WatchEvent as StoreEvent, WatchOptions};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

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
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &nixroll::api::crd())
        .await
        .unwrap();
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

fn nxn(name: &str) -> Value {
    json!({
        "apiVersion": "nixroll.io/v1alpha1",
        "kind": "NixOSNode",
        "metadata": {"name": name},
        "spec": {"flake": "github:example/infra", "revision": "0123456789abcdef0123456789abcdef01234567"}
    })
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
    let api: Api<NixOSNode> = Api::all(client.clone());
    // Apply to a non-existent object creates it.
    api.patch("n1", &PatchParams::apply("flux"), &Patch::Apply(nxn("n1")))
        .await
        .unwrap();

    let agent = PatchParams::apply("nixroll-agent");
    let controller = PatchParams::apply("nixroll-controller");
    let status = |s: Value| json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": "n1"}, "status": s});
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
    assert!(managers.contains(&("nixroll-agent".into(), Some("status".into()))));
    assert!(managers.contains(&("nixroll-controller".into(), Some("status".into()))));
    let agent_fields = serde_json::to_value(
        &mf.iter()
            .find(|m| m.manager.as_deref() == Some("nixroll-agent"))
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
    assert!(e.message.contains("nixroll-controller"), "{}", e.message);
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
    assert!(owns_phase("nixroll-agent"));
    assert!(!owns_phase("nixroll-controller"));

    // Apply without fieldManager is refused.
    let e = api_err(
        api.patch("n1", &PatchParams::default(), &Patch::Apply(nxn("n1")))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
}

#[tokio::test]
async fn status_subresource_isolation_and_generation() {
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<NixOSNode> = Api::all(client.clone());
    let mut obj: Value = nxn("g");
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
        o.status.as_ref().unwrap().phase.map(|p| p.to_string()).as_deref(),
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
            "reportingController": "nixroll.io/controller", "reportingInstance": "c-1",
            "regarding": {"kind": "NixOSNode", "name": "n1", "apiVersion": "nixroll.io/v1alpha1"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let l = core
        .list(&ListParams::default().fields("involvedObject.name=n1,involvedObject.kind=NixOSNode"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].message.as_deref(), Some("drained n1"));
}

fn kubectl() -> Option<String> {
    for p in ["/usr/bin/kubectl", "/usr/local/bin/kubectl"] {
        if std::path::Path::new(p).exists() {
            return Some(p.into());
        }
    }
    None
}

fn run(kubectl: &str, kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out) = run_status(kubectl, kubeconfig, args, stdin);
    assert!(ok, "kubectl {args:?} failed:\n{out}");
    out
}

fn run_status(
    kubectl: &str,
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String) {
    let (ok, stdout, stderr) = kubectl_run(kubectl, kubeconfig, args, stdin);
    if ok {
        (true, stdout)
    } else {
        (false, format!("{stdout}\n{stderr}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_it() {
    let Some(kubectl) = kubectl() else {
        eprintln!("SKIPPED: kubectl not installed");
        return;
    };
    let (srv, client) = start().await;
    install_crd(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&kc).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-1",
                "labels": {"node-role.kubernetes.io/control-plane": "true"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}],
                           "nodeInfo": {"bootID": "b1", "kubeletVersion": "v1.33.1+k3s1",
                             "machineID": "m", "systemUUID": "s", "kernelVersion": "6.6", "osImage": "NixOS",
                             "containerRuntimeVersion": "containerd://2", "kubeProxyVersion": "v1.33.1",
                             "operatingSystem": "linux", "architecture": "amd64"}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let k = kubectl.clone();
    let kc2 = kc.clone();
    let manifest = "apiVersion: nixroll.io/v1alpha1\nkind: NixOSNode\nmetadata:\n  name: node-1\nspec:\n  flake: github:example/infra\n  revision: 0123456789abcdef0123456789abcdef01234567\n";
    let outputs = tokio::task::spawn_blocking(move || {
        let apply = run(&k, &kc2, &["apply", "-f", "-"], Some(manifest));
        let apply2 = run(&k, &kc2, &["apply", "-f", "-"], Some(manifest));
        let get_nodes = run(&k, &kc2, &["get", "nodes"], None);
        let bad = manifest.replace("0123456789abcdef0123456789abcdef01234567", "main");
        let (bad_ok, bad_out) = run_status(&k, &kc2, &["apply", "-f", "-"], Some(&bad));
        assert!(!bad_ok, "{bad_out}");
        let typo = manifest.replace("spec:\n", "spec:\n  bogus: 1\n");
        let (typo_ok, typo_out) = run_status(&k, &kc2, &["apply", "-f", "-"], Some(&typo));
        assert!(!typo_ok, "{typo_out}");
        assert!(typo_out.contains("unknown field \"spec.bogus\""), "{typo_out}");
        assert!(
            bad_out.contains("spec.revision: Invalid value: \"main\": revision must be a full 40-character"),
            "{bad_out}"
        );
        (apply, apply2, get_nodes)
    })
    .await
    .unwrap();
    assert!(
        outputs.0.contains("nixosnode.nixroll.io/node-1 created"),
        "{}",
        outputs.0
    );
    assert!(outputs.1.contains("unchanged"), "{}", outputs.1);
    assert!(outputs.2.contains("node-1"), "{}", outputs.2);
    assert!(outputs.2.contains("Ready"), "{}", outputs.2);
    assert!(outputs.2.contains("control-plane"), "{}", outputs.2);
    assert!(outputs.2.contains("v1.33.1+k3s1"), "{}", outputs.2);

    let api: Api<NixOSNode> = Api::all(client.clone());
    api.patch_status(
        "node-1",
        &PatchParams::apply("nixroll-controller"),
        &Patch::Apply(json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
            "metadata": {"name": "node-1"}, "status": {"phase": "Waiting", "wanted": "0123456"}})),
    )
    .await
    .unwrap();
    let k = kubectl.clone();
    let (get, yaml, describe) = tokio::task::spawn_blocking(move || {
        (
            run(&k, &kc, &["get", "nixosnodes"], None),
            run(&k, &kc, &["get", "nxn", "node-1", "-o", "yaml"], None),
            run(&k, &kc, &["describe", "nixosnode", "node-1"], None),
        )
    })
    .await
    .unwrap();
    let header = get.lines().next().unwrap();
    for col in ["NAME", "WANTED", "RUNNING", "PHASE", "AGE"] {
        assert!(header.contains(col), "{get}");
    }
    assert!(get.contains("Waiting") && get.contains("0123456"), "{get}");
    assert!(
        yaml.contains("revision: 0123456789abcdef0123456789abcdef01234567"),
        "{yaml}"
    );
    assert!(yaml.contains("phase: Waiting"), "{yaml}");
    assert!(
        yaml.contains("reboot: IfNeeded"),
        "schema default applied: {yaml}"
    );
    assert!(
        describe.contains("Name:") && describe.contains("node-1"),
        "{describe}"
    );
    assert!(describe.contains("Waiting"), "{describe}");
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
        run(&k, &kc2, &["create", "namespace", "nixroll-system"], None);
        run(
            &k,
            &kc2,
            &["-n", "nixroll-system", "create", "configmap", "nixroll-pause"],
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
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "nixroll-system");
    assert!(cms.get("nixroll-pause").await.is_ok());
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
    use nixroll::sim::apiserver::{Patch as SPatch, Subresource, WriteOptions};
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
async fn custom_resources_are_defaulted_and_validated_from_the_crd_schema() {
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<NixOSNode> = Api::all(client.clone());
    let dynamic: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kube::api::ApiResource::erase::<NixOSNode>(&()));
    let mut bad = nxn("v");
    bad["spec"]["flake"] = json!("github:o/r?rev=abc");
    bad["spec"]["reboot"] = json!("Sometimes");
    let e = api_err(
        dynamic
            .create(&PostParams::default(), &serde_json::from_value(bad).unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.starts_with("NixOSNode.nixroll.io \"v\" is invalid: ["),
        "{}",
        e.message
    );
    assert!(e.message.contains("spec.flake"), "{}", e.message);
    assert!(
        e.message
            .contains("spec.reboot: Unsupported value: \"Sometimes\""),
        "{}",
        e.message
    );
    let ok = api
        .patch("v", &PatchParams::apply("flux"), &Patch::Apply(nxn("v")))
        .await
        .unwrap();
    let raw = serde_json::to_value(&ok).unwrap();
    assert_eq!(raw["spec"]["reboot"], "IfNeeded");
    // Unknown fields are pruned (kubectl's fieldValidation=Strict makes them an error, below).
    let mut extra = nxn("w");
    extra["spec"]["bogus"] = json!(1);
    extra["status"] = json!({"phase": "Waiting", "agent": {"nope": true}});
    let created = dynamic
        .create(&PostParams::default(), &serde_json::from_value(extra).unwrap())
        .await
        .unwrap();
    assert!(created.data["spec"].get("bogus").is_none(), "{:?}", created.data);
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
    let api: Api<NixOSNode> = Api::all(client.clone());
    let o = api
        .patch("n1", &PatchParams::apply("flux"), &Patch::Apply(nxn("n1")))
        .await
        .unwrap();
    let rec = Recorder::new(
        client.clone(),
        Reporter {
            controller: "nixroll-controller".into(),
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
    use nixroll::sim::apiserver::{ListOptions, Patch as SPatch, Subresource, WriteOptions};
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

/// kubectl for the tests of what a kubectl user sees: absent in CI is a failure, elsewhere a
/// skip with the reason printed.
fn kubectl_for(test: &str) -> Option<String> {
    let k = kubectl();
    if k.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: kubectl is not installed (CI must have it)"
        );
        eprintln!("SKIPPED {test}: kubectl not installed");
    }
    k
}

/// kubectl's exit status, stdout and stderr (warnings go to stderr).
fn kubectl_run(
    kubectl: &str,
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new(kubectl);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.env("HOME", kubeconfig.parent().unwrap());
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn kubectl_setup(test: &str) -> Option<(ApiServer, Client, String, tempfile::TempDir)> {
    let kubectl = kubectl_for(test)?;
    let (srv, client) = start().await;
    install_crd(&client).await;
    let dir = tempfile::tempdir().unwrap();
    srv.write_kubeconfig(&dir.path().join("kubeconfig")).unwrap();
    Some((srv, client, kubectl, dir))
}

/// `kubectl explain` reads the served OpenAPI v3: the CRD's schema as
/// `io.nixroll.v1alpha1.NixOSNode` and the built-in kinds' schemas, each with its
/// `x-kubernetes-group-version-kind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_reads_the_served_openapi_schemas() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("kubectl_explain_reads_the_served_openapi_schemas").await
    else {
        return;
    };
    // The documents themselves, as kube-apiserver shapes them.
    let root: Value = serde_json::from_str(
        &client
            .request_text(http::Request::get("/openapi/v3").body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let url = root["paths"]["apis/nixroll.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(url.contains("?hash="), "{root}");
    let doc: Value = serde_json::from_str(
        &client
            .request_text(http::Request::get(&url).body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let node = &doc["components"]["schemas"]["io.nixroll.v1alpha1.NixOSNode"];
    assert_eq!(
        node["x-kubernetes-group-version-kind"],
        json!([{"group": "nixroll.io", "kind": "NixOSNode", "version": "v1alpha1"}]),
        "{node}"
    );
    assert_eq!(
        node["properties"]["metadata"]["allOf"][0]["$ref"],
        "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    );

    let kc = dir.path().join("kubeconfig");
    let out = tokio::task::spawn_blocking(move || {
        [
            kubectl_run(&k, &kc, &["explain", "nixosnode.spec"], None),
            kubectl_run(&k, &kc, &["explain", "nxn.status.backoff.attempts"], None),
            kubectl_run(&k, &kc, &["explain", "nixosnode.spec.maintenanceWindow"], None),
            kubectl_run(&k, &kc, &["explain", "pods.spec.containers"], None),
        ]
    })
    .await
    .unwrap();
    let [
        (ok, spec, err),
        (ok2, attempts, err2),
        (typo_ok, _, typo_err),
        (ok4, pods, err4),
    ] = out;
    assert!(ok, "{spec}{err}");
    assert!(spec.contains("GROUP:      nixroll.io"), "{spec}");
    assert!(spec.contains("KIND:       NixOSNode"), "{spec}");
    assert!(spec.contains("FIELD: spec <Object>"), "{spec}");
    assert!(spec.contains("revision\t<string> -required-"), "{spec}");
    assert!(spec.contains("maintenanceWindows\t<[]Object>"), "{spec}");
    assert!(spec.contains("enum: IfNeeded, Always, Never"), "{spec}");
    assert!(ok2, "{attempts}{err2}");
    assert!(attempts.contains("FIELD: attempts <integer>"), "{attempts}");
    assert!(!typo_ok);
    assert!(
        typo_err.contains("field \"maintenanceWindow\" does not exist"),
        "{typo_err}"
    );
    assert!(ok4, "{pods}{err4}");
    assert!(pods.contains("KIND:       Pod"), "{pods}");
    assert!(pods.contains("FIELD: containers <[]Container>"), "{pods}");
}

/// `kubectl get events` prints kube-apiserver's event columns, and `kubectl get pods` counts
/// the containers the simulated kubelets report ready and running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_events_and_pods_print_like_kube_apiserver() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("kubectl_get_events_and_pods_print_like_kube_apiserver").await
    else {
        return;
    };
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    events
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "node-1.1"},
                "involvedObject": {"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "name": "node-1"},
                "reason": "BootedWrongSystem", "type": "Warning",
                "message": "booted 0123456 instead of 89abcde",
                "source": {"component": "nixroll-controller"},
                "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
                "count": 3,
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    // Pods as the simulated kubelets run them.
    let cluster =
        nixroll::sim::cluster::SimCluster::new(client.clone(), nixroll::sim::cluster::Timing::default());
    cluster
        .create_nodes(&[("n1".to_owned(), false, "b1".to_owned())])
        .await
        .unwrap();
    let apps = [nixroll::sim::cluster::App {
        name: "web".into(),
        replicas: 2,
        min_available: None,
    }];
    let created = cluster.create_workloads(&["n1".to_owned()], &apps).await.unwrap();
    assert!(created >= 2);

    let kc = dir.path().join("kubeconfig");
    let out = tokio::task::spawn_blocking(move || {
        [
            kubectl_run(&k, &kc, &["get", "events"], None),
            kubectl_run(&k, &kc, &["get", "events", "-o", "wide"], None),
            kubectl_run(&k, &kc, &["get", "events.v1.events.k8s.io"], None),
            kubectl_run(&k, &kc, &["get", "pods", "-A"], None),
        ]
    })
    .await
    .unwrap();
    let [(ok, ev, e1), (ok2, wide, e2), (ok3, ev_v1, e3), (ok4, pods, e4)] = out;
    assert!(ok && ok2 && ok3 && ok4, "{e1}{e2}{e3}{e4}");
    for table in [&ev, &ev_v1] {
        let cols: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            cols,
            ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            "{table}"
        );
        let row = table.lines().nth(1).unwrap();
        for cell in [
            "Warning",
            "BootedWrongSystem",
            "nixosnode/node-1",
            "booted 0123456 instead of 89abcde",
        ] {
            assert!(row.contains(cell), "{table}");
        }
    }
    let header = wide.lines().next().unwrap();
    for col in ["SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"] {
        assert!(header.contains(col), "{wide}");
    }
    assert!(
        wide.contains("nixroll-controller") && wide.contains("node-1.1"),
        "{wide}"
    );

    let web: Vec<&str> = pods.lines().filter(|l| l.contains("web-")).collect();
    assert_eq!(web.len(), 2, "{pods}");
    for l in web.iter().chain(
        pods.lines()
            .filter(|l| l.contains("nixroll-agent"))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let cells: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(&cells[2..4], ["1/1", "Running"], "{pods}");
    }
}

/// A misspelled field, as kube-apiserver treats it: dropped from the object, a `Warning`
/// header per field with the default `fieldValidation` (Warn), a refusal with `Strict` (400 on
/// create and update, 422 on patches), silence with `Ignore`; server-side apply cannot build
/// the typed object (500); custom resources take no strategic merge patch (415).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_pruned_with_warnings_or_refused_like_kube_apiserver() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("unknown_fields_are_pruned_with_warnings_or_refused_like_kube_apiserver").await
    else {
        return;
    };
    let api: Api<NixOSNode> = Api::all(client.clone());
    let dynamic: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kube::api::ApiResource::erase::<NixOSNode>(&()));
    dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(nxn("node-2")).unwrap(),
        )
        .await
        .unwrap();
    let before = api.get("node-2").await.unwrap();

    // Strict patches (what `kubectl apply` sends): 422, the object untouched.
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let e = api_err(
        api.patch(
            "node-2",
            &strict,
            &Patch::Merge(json!({"spec": {"maintenanceWindow": {}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{e:?}");
    assert!(
        e.message
            .starts_with(" \"\" is invalid: patch: Invalid value: \"{")
            && e.message
                .ends_with("strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{}",
        e.message
    );

    let manifest = |meta: &str| {
        format!(
            "apiVersion: nixroll.io/v1alpha1\nkind: NixOSNode\nmetadata:\n  {meta}\nspec:\n  flake: github:example/infra\n  revision: 0123456789abcdef0123456789abcdef01234567\n  maintenanceWindow: {{}}\n"
        )
    };
    // Updates of custom resources name the resourceVersion they replace.
    let rv = before.metadata.resource_version.clone().unwrap();
    let (m2, m3, m4) = (
        manifest(&format!("name: node-2\n  resourceVersion: \"{rv}\"")),
        manifest("name: node-3"),
        manifest("name: node-4"),
    );
    let m2_stale = manifest("name: node-2\n  resourceVersion: \"1\"");
    let kc = dir.path().join("kubeconfig");
    let (k2, kc2) = (k.clone(), kc.clone());
    let out = tokio::task::spawn_blocking(move || {
        let patch = [
            "patch",
            "nixosnode",
            "node-2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"maintenanceWindow":{}}}"#,
        ];
        [
            // The issue's command: Warn by default.
            kubectl_run(&k, &kc, &patch, None),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "nixosnode",
                    "node-2",
                    "--type",
                    "json",
                    "-p",
                    r#"[{"op":"add","path":"/spec/maintenanceWindow","value":{}}]"#,
                ],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "nixosnode",
                    "node-2",
                    "--type",
                    "strategic",
                    "-p",
                    r#"{"spec":{"maintenanceWindow":{}}}"#,
                ],
                None,
            ),
            // Create: Strict (kubectl's default), Warn, Ignore.
            kubectl_run(&k, &kc, &["create", "-f", "-"], Some(&m3)),
            kubectl_run(&k, &kc, &["create", "--validate=warn", "-f", "-"], Some(&m3)),
            kubectl_run(&k, &kc, &["create", "--validate=false", "-f", "-"], Some(&m4)),
            // Update (PUT): Strict and Warn.
            kubectl_run(&k, &kc, &["replace", "-f", "-"], Some(&m2)),
            kubectl_run(&k, &kc, &["replace", "--validate=warn", "-f", "-"], Some(&m2)),
            // Decoding comes before the resourceVersion precondition.
            kubectl_run(&k, &kc, &["replace", "-f", "-"], Some(&m2_stale)),
            // Server-side apply.
            kubectl_run(&k, &kc, &["apply", "--server-side", "-f", "-"], Some(&m2)),
            // Built-in kinds: unknown metadata fields.
            kubectl_run(&k, &kc, &["create", "configmap", "c"], None),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "configmap",
                    "c",
                    "-p",
                    r#"{"metadata":{"labls":{"a":"b"}}}"#,
                ],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &["patch", "configmap", "c", "-p", r#"{"dat":{"a":"b"}}"#],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &["create", "-f", "-"],
                Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: d\ndat:\n  a: b\n"),
            ),
        ]
    })
    .await
    .unwrap();
    let [
        merge,
        json_p,
        strategic,
        create_strict,
        create_warn,
        create_ignore,
        replace_strict,
        replace_warn,
        replace_stale,
        ssa,
        _cm,
        cm_patch,
        cm_patch2,
        cm_strict,
    ] = out;
    let warning = "Warning: unknown field \"spec.maintenanceWindow\"";
    for (name, (ok, stdout, stderr)) in [("merge", &merge), ("json", &json_p)] {
        assert!(ok, "{name}: {stdout}{stderr}");
        assert_eq!(
            stdout.trim(),
            "nixosnode.nixroll.io/node-2 patched (no change)",
            "{name}: {stderr}"
        );
        assert!(stderr.contains(warning), "{name}: {stderr}");
    }
    assert!(!strategic.0, "{strategic:?}");
    assert!(
        strategic
            .2
            .contains("application/strategic-merge-patch+json is not supported by nixroll.io/v1alpha1, Kind=NixOSNode: the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"),
        "{strategic:?}"
    );
    assert!(!create_strict.0, "{create_strict:?}");
    assert!(
        create_strict.2.contains("Error from server (BadRequest): error when creating \"STDIN\": NixOSNode in version \"v1alpha1\" cannot be handled as a NixOSNode: strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{create_strict:?}"
    );
    assert!(
        create_warn.0 && create_warn.2.contains(warning),
        "{create_warn:?}"
    );
    assert!(
        create_ignore.0 && !create_ignore.2.contains("Warning"),
        "{create_ignore:?}"
    );
    assert!(!replace_strict.0, "{replace_strict:?}");
    assert!(
        replace_strict
            .2
            .contains("strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{replace_strict:?}"
    );
    assert!(
        replace_warn.0 && replace_warn.2.contains(warning),
        "{replace_warn:?}"
    );
    assert!(
        !replace_stale.0 && replace_stale.2.contains("strict decoding error"),
        "{replace_stale:?}"
    );
    assert!(!ssa.0, "{ssa:?}");
    assert!(
        ssa.2.contains("failed to create typed patch object (/node-2; nixroll.io/v1alpha1, Kind=NixOSNode): .spec.maintenanceWindow: field not declared in schema"),
        "{ssa:?}"
    );
    assert!(
        cm_patch.0 && cm_patch.2.contains("Warning: unknown field \"metadata.labls\""),
        "{cm_patch:?}"
    );
    assert!(
        cm_patch2.0 && cm_patch2.2.contains("Warning: unknown field \"dat\""),
        "{cm_patch2:?}"
    );
    assert!(
        cm_strict.2.contains("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: unknown field \"dat\""),
        "{cm_strict:?}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    assert_eq!(cms.get("c").await.unwrap().metadata.labels, None);

    // Nothing of it was stored, and the patches that changed nothing did not bump the generation.
    for name in ["node-2", "node-3", "node-4"] {
        let raw = dynamic.get(name).await.unwrap();
        assert!(
            raw.data["spec"].get("maintenanceWindow").is_none(),
            "{name}: {:?}",
            raw.data
        );
    }
    let after = api.get("node-2").await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);

    // What nixroll itself installs passes Strict validation untouched (the CRD is pruned by
    // the built-in CustomResourceDefinition schema like any other object).
    let crd_yaml = nixroll::api::crd_yaml().unwrap();
    let (_, _, crd_strict) = tokio::task::spawn_blocking(move || {
        (
            kubectl_run(&k2, &kc2, &["delete", "crd", "nixosnodes.nixroll.io"], None),
            kubectl_run(&k2, &kc2, &["create", "-f", "-"], Some(&crd_yaml)),
            kubectl_run(
                &k2,
                &kc2,
                &["get", "crd", "nixosnodes.nixroll.io", "-o", "json"],
                None,
            ),
        )
    })
    .await
    .unwrap();
    assert!(
        crd_strict.0 && !crd_strict.2.contains("Warning"),
        "{crd_strict:?}"
    );
    let stored: CustomResourceDefinition = serde_json::from_str(&crd_strict.1).unwrap();
    assert_eq!(stored.spec, nixroll::api::crd().spec);
}
