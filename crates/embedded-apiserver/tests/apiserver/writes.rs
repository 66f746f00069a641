//! Write paths over HTTP: create/update/delete conflicts, merge/JSON/strategic patches,
//! server-side apply with two managers, the status subresource, and the typed in-process API.

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

use serde_json::{Value, json};

use super::common::*;

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

    // Apply without fieldManager is refused, as kube-apiserver does: 422 Invalid
    // (nixroll's tests/real_api/differential.rs compares the two).
    let e = api_err(
        api.patch("n1", &PatchParams::default(), &Patch::Apply(machine("n1")))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
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
