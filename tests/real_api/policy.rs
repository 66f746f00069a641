//! The agent's ValidatingAdmissionPolicy (deploy/agent-policy.yaml) on the real server, with
//! service-account tokens bound to agent pods on nodes — the API server, not the test, puts the
//! node into the token's user info. The agent's own write is admitted; every write it must not
//! make is refused, by the policy with its message, or by RBAC before the policy is asked.
//! (The real agent binary's writes through a whole rollout: `rollout.rs`.)

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::plane::{CLUSTER, plane};

fn nixosnodes(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("nixroll.io", "v1alpha1", "NixOSNode");
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

/// `Ok`, or `code: message`.
fn outcome<T>(r: Result<T, kube::Error>) -> Result<(), String> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{}: {}", s.code, s.message)),
        Err(e) => panic!("{e}"),
    }
}

fn apply_status(body: Value) -> (PatchParams, Patch<Value>) {
    (
        PatchParams::apply(nixroll::names::AGENT_MANAGER).force(),
        Patch::Apply(body),
    )
}

fn status_body(name: &str, status: Value) -> Value {
    json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": name}, "status": status})
}

#[tokio::test]
async fn the_agent_policy_admits_only_the_agents_own_status_with_real_node_bound_tokens() {
    let Some(plane) = plane() else { return };
    let _cluster = CLUSTER.lock().await;
    let admin = plane.admin_client().await.unwrap();
    let (a, b) = ("policy-a", "policy-b");
    let nodes: Api<Node> = Api::all(admin.clone());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "nixroll-system");
    let nn = nixosnodes(admin.clone());
    let spec =
        json!({"flake": "github:example/infra", "revision": "0123456789abcdef0123456789abcdef01234567"});
    for name in [a, b] {
        let node: Node =
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
                .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        nn.create(
            &PostParams::default(),
            &object(json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": name}, "spec": spec})),
        )
        .await
        .unwrap();
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("nixroll-agent-{a}"), "namespace": "nixroll-system"},
        "spec": {"nodeName": a, "serviceAccountName": "nixroll-agent", "automountServiceAccountToken": false,
                 "containers": [{"name": "agent", "image": "nixroll"}]}
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let bound = plane
        .service_account_token(
            "nixroll-system",
            "nixroll-agent",
            Some((
                pod.metadata.name.as_deref().unwrap(),
                pod.metadata.uid.as_deref().unwrap(),
            )),
        )
        .await
        .unwrap();
    let agent = Client::try_from(plane.config_with_token("agent-a", &bound).await.unwrap()).unwrap();
    let as_agent = nixosnodes(agent.clone());

    // Its own status.agent, with server-side apply under nixroll-agent: admitted.
    let (pp, patch) = apply_status(status_body(a, json!({"agent": {"bootId": "boot-1"}})));
    outcome(as_agent.patch_status(a, &pp, &patch).await).unwrap();
    let got = nn.get_status(a).await.unwrap();
    assert_eq!(got.data["status"]["agent"]["bootId"], "boot-1");

    let refused_by_policy = |r: Result<(), String>, want: &str| {
        let m = r.expect_err("must be refused");
        assert!(
            m.starts_with("403: ") && m.contains(want),
            "want the policy's {want:?}, got {m}"
        );
    };
    // Another node's NixOSNode.
    let (pp, patch) = apply_status(status_body(b, json!({"agent": {"bootId": "boot-1"}})));
    refused_by_policy(
        outcome(as_agent.patch_status(b, &pp, &patch).await),
        &format!(
            "nixroll-agent on node {a} may not write NixOSNode {b}: an agent writes only the NixOSNode of its own node"
        ),
    );
    // The controller's part of status.
    for (field, value) in [
        ("phase", json!("Draining")),
        ("message", json!("hi")),
        ("revision", json!("x")),
    ] {
        let (pp, patch) = apply_status(status_body(
            a,
            json!({field: value, "agent": {"bootId": "boot-1"}}),
        ));
        refused_by_policy(
            outcome(as_agent.patch_status(a, &pp, &patch).await),
            &format!("nixroll-agent may not change status.{field} of NixOSNode {a}"),
        );
    }
    // Labels through the status subresource: refused by the policy, or dropped by the server;
    // never written.
    let merge = Patch::Merge(json!({"metadata": {"labels": {"stolen": "yes"}}}));
    let r = outcome(as_agent.patch_status(a, &PatchParams::default(), &merge).await);
    if let Err(m) = &r {
        assert!(m.contains("may not change labels"), "{m}");
    }
    assert!(
        !nn.get(a)
            .await
            .unwrap()
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("stolen")
    );
    // Spec, create and delete: RBAC grants none of them, so the server refuses before the policy.
    let rbac = |r: Result<(), String>, verb: &str| {
        let m = r.expect_err("must be refused");
        assert!(
            m.starts_with("403: ") && m.contains(&format!("cannot {verb} resource \"nixosnodes\"")),
            "{verb}: {m}"
        );
    };
    rbac(
        outcome(
            as_agent
                .patch(
                    a,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"suspend": true}})),
                )
                .await,
        ),
        "patch",
    );
    rbac(
        outcome(
            as_agent
                .create(
                    &PostParams::default(),
                    &object(json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": "policy-c"}, "spec": spec})),
                )
                .await,
        ),
        "create",
    );
    rbac(
        outcome(as_agent.delete(a, &DeleteParams::default()).await),
        "delete",
    );

    // A token bound to no pod (so to no node): even its "own" status write is refused.
    let unbound = plane
        .service_account_token("nixroll-system", "nixroll-agent", None)
        .await
        .unwrap();
    let loose = nixosnodes(
        Client::try_from(plane.config_with_token("agent-loose", &unbound).await.unwrap()).unwrap(),
    );
    let (pp, patch) = apply_status(status_body(a, json!({"agent": {"bootId": "boot-2"}})));
    refused_by_policy(
        outcome(loose.patch_status(a, &pp, &patch).await),
        "nixroll-agent's token is not bound to a node",
    );
    assert_eq!(
        nn.get_status(a).await.unwrap().data["status"]["agent"]["bootId"],
        "boot-1"
    );

    for name in [a, b] {
        nn.delete(name, &DeleteParams::default()).await.unwrap();
        nodes.delete(name, &DeleteParams::default()).await.unwrap();
    }
    pods.delete(
        &format!("nixroll-agent-{a}"),
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}
