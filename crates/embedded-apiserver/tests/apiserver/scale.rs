//! The server at scale: nodes, pods and field-selected watches (`scale_full` is opt-in).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher;

use embedded_apiserver::Gvr;
use serde_json::json;

use super::common::*;

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
