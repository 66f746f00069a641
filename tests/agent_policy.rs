//! The ValidatingAdmissionPolicy that confines each agent to its own node
//! (`deploy/agent-policy.yaml`), evaluated the way the API server evaluates it: match
//! conditions, then variables, then every validation, with `object`, `oldObject` and `request`
//! bound (including `request.userInfo.extra`, which carries the node a projected token is bound
//! to). The CEL engine is the `cel` crate re-exported by `kube-cel`, with the Kubernetes
//! extension functions registered. The agent's own status write must pass; every other write
//! of the agent's service account must be refused with a message naming what was refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use kube_cel::KubeCelExt;
use kube_cel::cel::objects::{Key, Map};
use kube_cel::cel::{Context, Program, Value as CelValue};
use serde_json::{Value, json};

const AGENT: &str = "system:serviceaccount:nixroll-system:nixroll-agent";
const CONTROLLER: &str = "system:serviceaccount:nixroll-system:nixroll-controller";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

fn policy() -> ValidatingAdmissionPolicy {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/agent-policy.yaml")).unwrap();
    let value = serde_saphyr::from_multiple::<Value>(&text).unwrap().remove(0);
    serde_json::from_value(value).unwrap()
}

#[derive(Debug, PartialEq)]
enum Decision {
    /// The policy does not apply to this request (match conditions false).
    NotMatched,
    Allowed,
    /// Denied, with the message of every failed validation.
    Denied(Vec<String>),
}

impl Decision {
    fn denied_with(&self, fragment: &str) -> bool {
        matches!(self, Decision::Denied(m) if m.iter().any(|m| m.contains(fragment)))
    }
}

fn cel(v: &Value) -> CelValue {
    kube_cel::cel::to_value(v).unwrap()
}

fn run(ctx: &Context<'_>, expression: &str) -> Result<CelValue, String> {
    let program = Program::compile(expression).map_err(|e| format!("compile {expression:?}: {e}"))?;
    program.execute(ctx).map_err(|e| format!("{e}"))
}

/// Evaluate the policy for one request, as the API server does with failurePolicy Fail: an
/// expression that errors denies.
fn admit(request: &Value, object: &Value, old_object: &Value) -> Decision {
    let spec = policy().spec.unwrap();
    let mut ctx = Context::default();
    ctx.register_all();
    ctx.add_variable_from_value("object", cel(object));
    ctx.add_variable_from_value("oldObject", cel(old_object));
    ctx.add_variable_from_value("request", cel(request));
    for mc in spec.match_conditions.unwrap_or_default() {
        match run(&ctx, &mc.expression) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => return Decision::NotMatched,
            other => return Decision::Denied(vec![format!("match condition {}: {other:?}", mc.name)]),
        }
    }
    // Variables may refer to earlier ones: rebind `variables` after each.
    let mut vars: HashMap<Key, CelValue> = HashMap::new();
    for var in spec.variables.unwrap_or_default() {
        let value = run(&ctx, &var.expression)
            .unwrap_or_else(|e| panic!("variable {} failed to evaluate: {e}", var.name));
        vars.insert(Key::String(Arc::new(var.name.clone())), value);
        ctx.add_variable_from_value(
            "variables",
            CelValue::Map(Map {
                map: Arc::new(vars.clone()),
            }),
        );
    }
    let mut denied = Vec::new();
    for v in spec.validations.unwrap_or_default() {
        match run(&ctx, &v.expression) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => {
                let message = match v.message_expression.as_deref().map(|m| run(&ctx, m)) {
                    Some(Ok(CelValue::String(s))) => s.to_string(),
                    Some(other) => panic!("messageExpression of {:?} gave {other:?}", v.expression),
                    None => v.message.clone().unwrap_or_default(),
                };
                assert_eq!(v.reason.as_deref(), Some("Forbidden"));
                denied.push(message);
            }
            other => denied.push(format!("expression {:?} failed: {other:?}", v.expression)),
        }
    }
    if denied.is_empty() {
        Decision::Allowed
    } else {
        Decision::Denied(denied)
    }
}

/// An admission request's `request` as a VAP sees it.
fn request(user: &str, bound_node: Option<&str>, operation: &str, name: &str, sub: Option<&str>) -> Value {
    let mut extra = serde_json::Map::new();
    if let Some(node) = bound_node {
        extra.insert(NODE_NAME_EXTRA.into(), json!([node]));
        extra.insert("authentication.kubernetes.io/node-uid".into(), json!(["0c9b7a"]));
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!(["nixroll-agent-x7k2p"]),
        );
    }
    let mut r = json!({
        "operation": operation,
        "name": name,
        "namespace": "",
        "dryRun": false,
        "kind": {"group": "nixroll.io", "version": "v1alpha1", "kind": "NixOSNode"},
        "resource": {"group": "nixroll.io", "version": "v1alpha1", "resource": "nixosnodes"},
        "userInfo": {
            "username": user,
            "uid": "6d1c0b4e",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:nixroll-system", "system:authenticated"],
        },
    });
    if !extra.is_empty() {
        r["userInfo"]["extra"] = Value::Object(extra);
    }
    if let Some(sub) = sub {
        r["subResource"] = json!(sub);
    }
    r
}

fn agent_update(node: &str, name: &str, sub: Option<&str>) -> Value {
    request(AGENT, Some(node), "UPDATE", name, sub)
}

/// A NixOSNode mid-rollout: the controller's part of status and the agent's.
fn stored(name: &str) -> Value {
    json!({
        "apiVersion": "nixroll.io/v1alpha1",
        "kind": "NixOSNode",
        "metadata": {
            "name": name,
            "uid": "d0b7",
            "resourceVersion": "41",
            "generation": 3,
            "labels": {"nixroll.io/pool": "workers"},
            "annotations": {"nixroll.io/retry": "1"},
        },
        "spec": {
            "flake": "git+https://git.example.org/homelab/nixos.git",
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "reboot": "IfNeeded",
        },
        "status": {
            "phase": "Activating",
            "message": "switching",
            "observedGeneration": 3,
            "wanted": "01234567",
            "revision": "89abcdef89abcdef89abcdef89abcdef89abcdef",
            "target": {"revision": "0123456789abcdef0123456789abcdef01234567", "installable": "x"},
            "slot": {"grantedAt": "2026-11-26T10:00:00Z", "wasUnschedulable": false, "cordonedByNixroll": true},
            "activation": {"id": "a1", "mode": "Boot"},
            "conditions": [{"type": "Ready", "status": "False", "reason": "Activating", "message": "", "lastTransitionTime": "2026-11-26T10:00:00Z"}],
            "lastTransitionTime": "2026-11-26T10:00:00Z",
            "agent": {"bootId": "b1", "currentSystem": "/nix/store/aaaa-nixos-system"},
        },
    })
}

/// The agent's own write: only status.agent changes.
fn with_agent_report(old: &Value) -> Value {
    let mut new = old.clone();
    new["status"]["agent"] = json!({
        "bootId": "b1",
        "currentSystem": "/nix/store/aaaa-nixos-system",
        "staged": {"revision": "0123456789abcdef0123456789abcdef01234567", "installable": "x", "system": "/nix/store/bbbb-nixos-system", "rebootRequired": true},
    });
    new
}

#[test]
fn the_agent_may_write_status_agent_of_its_own_node() {
    let old = stored("node-1");
    let new = with_agent_report(&old);
    let d = admit(&agent_update("node-1", "node-1", Some("status")), &new, &old);
    assert_eq!(d, Decision::Allowed);

    // Its first report, before the controller wrote any status.
    let mut old = stored("node-1");
    old.as_object_mut().unwrap().remove("status");
    let mut new = old.clone();
    new["status"] = json!({"agent": {"bootId": "b1"}});
    assert_eq!(
        admit(&agent_update("node-1", "node-1", Some("status")), &new, &old),
        Decision::Allowed
    );

    // Status without an agent part yet.
    let mut old = stored("node-1");
    old["status"].as_object_mut().unwrap().remove("agent");
    let new = with_agent_report(&old);
    assert_eq!(
        admit(&agent_update("node-1", "node-1", Some("status")), &new, &old),
        Decision::Allowed
    );
}

#[test]
fn another_nodes_object_is_refused() {
    let old = stored("node-2");
    let new = with_agent_report(&old);
    let d = admit(&agent_update("node-1", "node-2", Some("status")), &new, &old);
    assert!(
        d.denied_with("nixroll-agent on node node-1 may not write NixOSNode node-2"),
        "{d:?}"
    );
}

#[test]
fn a_token_not_bound_to_a_node_is_refused() {
    let old = stored("node-1");
    let new = with_agent_report(&old);
    let d = admit(
        &request(AGENT, None, "UPDATE", "node-1", Some("status")),
        &new,
        &old,
    );
    assert!(d.denied_with("not bound to a node"), "{d:?}");
    // An empty list is no binding either.
    let mut req = agent_update("node-1", "node-1", Some("status"));
    req["userInfo"]["extra"][NODE_NAME_EXTRA] = json!([]);
    assert!(admit(&req, &new, &old).denied_with("not bound to a node"));
}

#[test]
fn spec_is_refused_through_the_object_and_through_status() {
    let old = stored("node-1");
    let mut new = old.clone();
    new["spec"]["revision"] = json!("fedcba9876543210fedcba9876543210fedcba98");
    let d = admit(&agent_update("node-1", "node-1", None), &new, &old);
    assert!(d.denied_with("itself (spec, metadata)"), "{d:?}");
    assert!(d.denied_with("may not change spec of NixOSNode node-1"), "{d:?}");
    // The status subresource ignores spec changes on a real server; refused here all the same.
    let d = admit(&agent_update("node-1", "node-1", Some("status")), &new, &old);
    assert!(d.denied_with("may not change spec"), "{d:?}");
    // suspend added where it was absent.
    let mut new = old.clone();
    new["spec"]["suspend"] = json!(true);
    let d = admit(&agent_update("node-1", "node-1", Some("status")), &new, &old);
    assert!(d.denied_with("may not change spec"), "{d:?}");
}

/// A change made to the object under test.
type Edit = Box<dyn Fn(&mut Value)>;

#[test]
fn metadata_is_refused() {
    let old = stored("node-1");
    let edits: Vec<(&str, Edit)> = vec![
        (
            "label changed",
            Box::new(|o| o["metadata"]["labels"]["nixroll.io/pool"] = json!("x")),
        ),
        (
            "label added",
            Box::new(|o| o["metadata"]["labels"]["evil"] = json!("1")),
        ),
        (
            "labels removed",
            Box::new(|o| {
                o["metadata"].as_object_mut().unwrap().remove("labels");
            }),
        ),
        (
            "retry annotation",
            Box::new(|o| o["metadata"]["annotations"]["nixroll.io/retry"] = json!("2")),
        ),
        (
            "finalizer",
            Box::new(|o| o["metadata"]["finalizers"] = json!(["x"])),
        ),
        (
            "owner",
            Box::new(|o| {
                o["metadata"]["ownerReferences"] =
                    json!([{"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "u"}])
            }),
        ),
    ];
    for (what, edit) in edits {
        for sub in [None, Some("status")] {
            let mut new = with_agent_report(&old);
            edit(&mut new);
            let d = admit(&agent_update("node-1", "node-1", sub), &new, &old);
            assert!(
                d.denied_with(
                    "may not change labels, annotations, finalizers or owner references of NixOSNode node-1"
                ),
                "{what} ({sub:?}): {d:?}"
            );
        }
    }
}

/// Every property of status in the CRD except `agent` is the controller's, and the policy
/// guards each one: adding a status field without guarding it here fails this test.
#[test]
fn the_controllers_part_of_status_is_refused_field_by_field() {
    let crd = serde_json::to_value(nixroll::api::crd()).unwrap();
    let props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        .as_object()
        .unwrap();
    let controller_fields: Vec<&String> = props.keys().filter(|k| *k != "agent").collect();
    assert!(controller_fields.len() >= 10, "{controller_fields:?}");
    let old = stored("node-1");
    for field in controller_fields {
        let mut variants = vec![("set", {
            let mut n = with_agent_report(&old);
            n["status"][field.as_str()] = json!("written-by-an-agent");
            n
        })];
        if old["status"].get(field.as_str()).is_some() {
            let mut n = with_agent_report(&old);
            n["status"].as_object_mut().unwrap().remove(field.as_str());
            variants.push(("removed", n));
        }
        for (how, new) in variants {
            let d = admit(&agent_update("node-1", "node-1", Some("status")), &new, &old);
            let want = format!("may not change status.{field} of NixOSNode node-1");
            assert!(
                d.denied_with(&want),
                "status.{field} {how}: expected {want:?} (guard the field in deploy/agent-policy.yaml), got {d:?}"
            );
        }
    }
    // The whole status replaced by the agent's part alone.
    let mut new = with_agent_report(&old);
    new["status"] = json!({"agent": new["status"]["agent"].clone()});
    let d = admit(&agent_update("node-1", "node-1", Some("status")), &new, &old);
    assert!(d.denied_with("may not change status.phase"), "{d:?}");
}

#[test]
fn create_and_delete_are_refused() {
    let obj = stored("node-1");
    let d = admit(
        &request(AGENT, Some("node-1"), "CREATE", "node-1", None),
        &obj,
        &Value::Null,
    );
    assert!(
        d.denied_with("nixroll-agent may not create NixOSNode node-1"),
        "{d:?}"
    );
    let d = admit(
        &request(AGENT, Some("node-1"), "DELETE", "node-1", None),
        &Value::Null,
        &obj,
    );
    assert!(
        d.denied_with("nixroll-agent may not delete NixOSNode node-1"),
        "{d:?}"
    );
}

#[test]
fn other_users_are_not_matched() {
    let old = stored("node-2");
    let mut new = with_agent_report(&old);
    new["status"]["phase"] = json!("Draining");
    new["spec"]["suspend"] = json!(true);
    for user in [
        CONTROLLER,
        "kubernetes-admin",
        "system:serviceaccount:flux-system:kustomize-controller",
    ] {
        let req = request(user, Some("node-1"), "UPDATE", "node-2", Some("status"));
        assert_eq!(admit(&req, &new, &old), Decision::NotMatched, "{user}");
    }
}

#[test]
fn the_binding_denies_and_the_policy_fails_closed() {
    let p = policy();
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec
        .match_constraints
        .as_ref()
        .unwrap()
        .resource_rules
        .as_ref()
        .unwrap();
    let resources: Vec<&String> = rules.iter().flat_map(|r| r.resources.iter().flatten()).collect();
    assert!(resources.iter().any(|r| *r == "nixosnodes/status"));
    assert!(resources.iter().any(|r| *r == "nixosnodes"));
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/agent-policy.yaml")).unwrap();
    let binding: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding = {
        let v = serde_saphyr::from_multiple::<Value>(&text).unwrap().remove(1);
        serde_json::from_value(v).unwrap()
    };
    let bspec = binding.spec.unwrap();
    assert_eq!(bspec.policy_name.as_deref(), p.metadata.name.as_deref());
    assert_eq!(bspec.validation_actions, Some(vec!["Deny".to_string()]));
}
