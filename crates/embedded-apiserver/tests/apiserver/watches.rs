//! Selectors, watches and kube-runtime watchers: list-watch and streaming lists, resume after
//! 410 Gone, bookmarks, slow watchers, restarts and metadata-only requests.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use embedded_apiserver::{ApiServer, Gvr, StoreOptions, WatchEvent as StoreEvent, WatchOptions};
use serde_json::json;

use super::common::*;

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

/// A watch on one CRD by name (as an operator waiting for another project's CRD does) sees it
/// created, established and deleted.
#[tokio::test]
async fn a_field_selected_crd_watch_sees_it_come_and_go() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let (_srv, client) = start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let by_name = watcher::Config::default().fields("metadata.name=machines.example.com");
    let mut events = watcher(crds.clone(), by_name).boxed();
    assert!(matches!(next_crd_event(&mut events).await, watcher::Event::Init));
    assert!(matches!(
        next_crd_event(&mut events).await,
        watcher::Event::InitDone
    ));
    install_crd(&client).await;
    match next_crd_event(&mut events).await {
        watcher::Event::Apply(crd) => assert_eq!(crd.name_any(), "machines.example.com"),
        other => panic!("expected the CRD applied: {other:?}"),
    }
    crds.delete("machines.example.com", &DeleteParams::default())
        .await
        .unwrap();
    loop {
        match next_crd_event(&mut events).await {
            watcher::Event::Delete(crd) => {
                assert_eq!(crd.name_any(), "machines.example.com");
                break;
            }
            // Status updates (Established) may come first.
            watcher::Event::Apply(_) => {}
            other => panic!("expected the CRD deleted: {other:?}"),
        }
    }
}

async fn next_crd_event<S, K>(s: &mut S) -> watcher::Event<K>
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(T, s.next())
        .await
        .expect("a CRD watch event within the timeout")
        .expect("the watch goes on")
        .expect("no watch error")
}
