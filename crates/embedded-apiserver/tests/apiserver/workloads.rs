//! Pods, Nodes and Leases as a kubelet, `kubectl drain` and the controller see them: graceful
//! deletion, evictions against PodDisruptionBudgets, cordon and Lease conflicts.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};

use serde_json::json;

use super::common::*;

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
    let nodes = create_node(&client, "n1").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_typed_clients_send_protobuf_and_drain_uses_evictions() {
    let Some(kubectl) = kubectl_or_skip("kubectl_typed_clients_send_protobuf_and_drain_uses_evictions")
    else {
        return;
    };
    let (srv, client) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&kc).unwrap();
    let nodes = create_node(&client, "n1").await;
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
