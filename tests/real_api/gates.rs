//! CEL health gates against real objects on the real API server: a Longhorn-like `Volume`
//! custom resource (its CRD created here, as Longhorn's would be), found through discovery,
//! listed by namespace, label selector and name, and judged by `nixroll::gates::cel::check`
//! exactly as the controller's gate pass does.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use nixroll::api::CelGate;
use nixroll::gates::Verdict;
use nixroll::gates::cel::check;
use serde_json::json;

use crate::plane::plane;

fn gate(expression: &str) -> CelGate {
    CelGate {
        name: "volumes-healthy".into(),
        api_version: "longhorn.io/v1beta2".into(),
        kind: "Volume".into(),
        namespace: Some("longhorn-system".into()),
        object_name: None,
        label_selector: None,
        expression: expression.into(),
        timeout: Some("10s".into()),
        post_timeout: None,
    }
}

fn blocks(v: &Verdict, why: &str) -> bool {
    matches!(v, Verdict::Block(w) if w.contains(why))
}

#[tokio::test]
async fn cel_gates_judge_real_objects_found_through_discovery() {
    let Some(plane) = plane() else { return };
    let client = plane.admin_client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "volumes.longhorn.io"},
        "spec": {"group": "longhorn.io", "scope": "Namespaced",
            "names": {"kind": "Volume", "plural": "volumes", "singular": "volume"},
            "versions": [{"name": "v1beta2", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "longhorn-system"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("longhorn.io", "v1beta2", "Volume"),
        "volumes",
    );
    let volumes: Api<DynamicObject> = Api::namespaced_with(client.clone(), "longhorn-system", &ar);
    // The CRD is served a moment after it is created.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for (name, app) in [("pvc-db", "db"), ("pvc-web", "web")] {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "longhorn.io/v1beta2", "kind": "Volume",
            "metadata": {"name": name, "labels": {"app": app}},
            "status": {"robustness": "healthy", "state": "attached"}
        }))
        .unwrap();
        loop {
            match volumes.create(&PostParams::default(), &obj).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("waiting for the Volume CRD: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let all_healthy = gate("objects.all(v, v.status.robustness == 'healthy')");
    assert_eq!(check(&client, &all_healthy).await, Verdict::Pass);
    let two = gate("size(objects) == 2");
    assert_eq!(check(&client, &two).await, Verdict::Pass);

    // One volume rebuilding: the gate blocks, and says which expression failed.
    volumes
        .patch(
            "pvc-db",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"robustness": "degraded"}})),
        )
        .await
        .unwrap();
    let v = check(&client, &all_healthy).await;
    assert!(blocks(&v, "is false over 2 object(s)"), "{v:?}");
    // A label selector and an object name narrow what the expression sees.
    let mut web = all_healthy.clone();
    web.label_selector = Some("app=web".into());
    assert_eq!(check(&client, &web).await, Verdict::Pass);
    let mut db = gate("object.status.robustness == 'degraded' && size(objects) == 1");
    db.object_name = Some("pvc-db".into());
    assert_eq!(check(&client, &db).await, Verdict::Pass);
    // Rebuilt: the gate passes again.
    volumes
        .patch(
            "pvc-db",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"robustness": "healthy"}})),
        )
        .await
        .unwrap();
    assert_eq!(check(&client, &all_healthy).await, Verdict::Pass);

    // Fail closed: a kind the server does not serve, a bad expression, a non-bool result.
    let mut ceph = gate("object.status.ceph.health == 'HEALTH_OK'");
    ceph.api_version = "ceph.rook.io/v1".into();
    ceph.kind = "CephCluster".into();
    let v = check(&client, &ceph).await;
    assert!(blocks(&v, "is not served by the API server"), "{v:?}");
    assert!(blocks(
        &check(&client, &gate("objects.all(v,")).await,
        "does not compile"
    ));
    assert!(blocks(
        &check(&client, &gate("size(objects)")).await,
        "not a bool"
    ));
    // Core kinds work the same way (apiVersion `v1`): the cluster's namespaces.
    let mut namespaces = gate("objects.exists(n, n.metadata.name == 'longhorn-system')");
    namespaces.api_version = "v1".into();
    namespaces.kind = "Namespace".into();
    namespaces.namespace = None;
    assert_eq!(check(&client, &namespaces).await, Verdict::Pass);
}
