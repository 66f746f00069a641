//! The install manifests: `kubectl kustomize deploy/` renders; every rendered object parses into
//! its typed Kubernetes struct (k8s-openapi) with no unknown or misspelt field (parse,
//! re-serialise, compare); the CRD in it is exactly `nixroll crd`; the RBAC is what the code
//! uses and no more; the image is the crate version; every example NixOSNode in `examples/`
//! passes the CRD's schema and CEL rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `kubectl kustomize DIR` as JSON documents; `None` (skip) only outside CI without kubectl.
pub fn kustomize(dir: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl").args(["kustomize", dir]).output() {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl is required in CI (kubectl kustomize): {e}"
            );
            eprintln!("kubectl is not installed: skipping the kustomize render check");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(yaml_docs(&String::from_utf8(out.stdout).unwrap()))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// kustomize re-renders `86400.0` as `86400`; compare numbers by value.
fn numbers_as_f64(v: &Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.iter().map(numbers_as_f64).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), numbers_as_f64(v))).collect()),
        other => other.clone(),
    }
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {} does not parse: {e}", doc["kind"], doc["metadata"]["name"]));
    serde_json::to_value(typed).unwrap()
}

/// Parse `doc` into the k8s-openapi type of its kind and serialise it again: a field the type
/// does not know (a typo, a wrong level of indentation) is dropped and shows up as a
/// difference. Kinds without a k8s-openapi type are returned as `None`.
pub fn typed_roundtrip(doc: &Value) -> Option<Value> {
    use k8s_openapi::api::{admissionregistration, apps, core, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    Some(match (api_version, kind) {
        ("v1", "Namespace") => roundtrip::<core::v1::Namespace>(doc),
        ("v1", "ServiceAccount") => roundtrip::<core::v1::ServiceAccount>(doc),
        ("v1", "Service") => roundtrip::<core::v1::Service>(doc),
        ("v1", "ConfigMap") => roundtrip::<core::v1::ConfigMap>(doc),
        ("apps/v1", "Deployment") => roundtrip::<apps::v1::Deployment>(doc),
        ("apps/v1", "DaemonSet") => roundtrip::<apps::v1::DaemonSet>(doc),
        ("policy/v1", "PodDisruptionBudget") => roundtrip::<policy::v1::PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<rbac::v1::ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            roundtrip::<rbac::v1::ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<rbac::v1::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => roundtrip::<rbac::v1::RoleBinding>(doc),
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            roundtrip::<admissionregistration::v1::ValidatingAdmissionPolicy>(doc)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            roundtrip::<admissionregistration::v1::ValidatingAdmissionPolicyBinding>(doc)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => roundtrip::<CustomResourceDefinition>(doc),
        _ => return None,
    })
}

/// Every object parses into its typed struct with nothing lost; unknown kinds fail.
pub fn assert_typed(docs: &[Value]) {
    for doc in docs {
        let id = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
        let back = typed_roundtrip(doc).unwrap_or_else(|| panic!("{id}: no typed struct for this kind"));
        let (want, got) = (numbers_as_f64(doc), numbers_as_f64(&back));
        if want != got {
            panic!(
                "{id} has fields its type does not know (or wrong types):\nwritten: {}\nparsed:  {}",
                serde_json::to_string(&want).unwrap(),
                serde_json::to_string(&got).unwrap()
            );
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn generated_crd() -> Value {
    serde_yaml::from_str(&nixroll::api::crd_yaml().unwrap()).unwrap()
}

#[test]
fn kustomize_renders_typed_manifests_with_no_unknown_fields() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    assert_typed(&docs);
    // And the check bites: a misspelt field is caught.
    let mut bad = find(&docs, "Deployment", "nixroll-controller").clone();
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = serde_json::json!({});
    assert!(std::panic::catch_unwind(|| assert_typed(&[bad])).is_err());
}

#[test]
fn the_crd_in_deploy_is_nixroll_crd() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    let crd = find(&docs, "CustomResourceDefinition", "nixosnodes.nixroll.io");
    assert!(
        numbers_as_f64(crd) == numbers_as_f64(&generated_crd()),
        "the CRD in deploy/ is not the generated one (cargo run -- crd > crds/nixosnodes.yaml)"
    );
}

#[test]
fn deploy_has_the_controller_the_agent_and_their_safety_settings() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    let image = format!("ghcr.io/nixroll/nixroll:{}", env!("CARGO_PKG_VERSION"));
    find(&docs, "Namespace", "nixroll-system");

    let ctl = find(&docs, "Deployment", "nixroll-controller");
    assert_eq!(ctl["metadata"]["namespace"], "nixroll-system");
    assert_eq!(ctl["spec"]["replicas"], 2);
    let pod = &ctl["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], image.as_str());
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "controller");
    assert!(
        !args.contains(&"--no-leader-election"),
        "two replicas need leader election"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    let pdb = find(&docs, "PodDisruptionBudget", "nixroll-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        ctl["spec"]["selector"]["matchLabels"]
    );

    let ds = find(&docs, "DaemonSet", "nixroll-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["nodeSelector"]["nixroll.io/managed"], "true");
    assert_eq!(pod["containers"][0]["image"], image.as_str());
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
    let tolerated: Vec<&str> = pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    for key in [
        "node-role.kubernetes.io/control-plane",
        "node.kubernetes.io/unschedulable",
    ] {
        assert!(tolerated.contains(&key), "the agent must tolerate {key}");
    }
    find(&docs, "ValidatingAdmissionPolicy", "nixroll-agent-own-node");
    find(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "nixroll-agent-own-node",
    );
}

/// The rules granted, as (resource, verb) pairs.
fn grants(role: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for r in rule["resources"].as_array().unwrap() {
            for v in rule["verbs"].as_array().unwrap() {
                out.push((r.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()));
            }
        }
    }
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list.iter().map(|(r, v)| (r.to_string(), v.to_string())).collect();
    v.sort();
    v
}

/// Exactly what the code uses (see the reasons in deploy/*-rbac.yaml): a missing verb breaks
/// the controller on a real cluster (the embedded API does not enforce RBAC), an extra one is
/// privilege nobody needs.
#[test]
fn rbac_is_exactly_what_the_code_uses() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    assert_eq!(
        grants(find(&docs, "ClusterRole", "nixroll-controller")),
        pairs(&[
            ("nixosnodes", "list"),
            ("nixosnodes", "watch"),
            ("nixosnodes/status", "patch"),
            ("nodes", "list"),
            ("nodes", "watch"),
            ("nodes", "patch"),
            ("pods", "list"),
            ("pods", "watch"),
            ("pods", "delete"),
            ("pods/eviction", "create"),
            ("poddisruptionbudgets", "list"),
            ("poddisruptionbudgets", "watch"),
        ])
    );
    let role = find(&docs, "Role", "nixroll-controller");
    assert_eq!(role["metadata"]["namespace"], "nixroll-system");
    assert_eq!(
        grants(role),
        pairs(&[
            ("leases", "create"),
            ("leases", "get"),
            ("leases", "update"),
            ("configmaps", "list"),
            ("configmaps", "watch"),
        ])
    );
    let events = find(&docs, "Role", "nixroll-controller-events");
    assert_eq!(events["metadata"]["namespace"], "default");
    assert_eq!(
        grants(events),
        pairs(&[("events", "create"), ("events", "patch")])
    );
    assert_eq!(
        grants(find(&docs, "ClusterRole", "nixroll-agent")),
        pairs(&[
            ("nixosnodes", "list"),
            ("nixosnodes", "watch"),
            ("nixosnodes/status", "patch"),
        ])
    );
    // Every verb has its reason written beside it.
    for file in ["controller-rbac.yaml", "agent-rbac.yaml"] {
        let text = std::fs::read_to_string(format!("{ROOT}/deploy/{file}")).unwrap();
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("- ") && line.starts_with("      - ") && !t.contains('[') {
                assert!(t.contains('#'), "{file}: verb without a reason: {line}");
            }
        }
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

/// Every NixOSNode under examples/ passes the CRD's OpenAPI schema and CEL rules.
#[test]
fn every_example_nixosnode_passes_the_crd_schema_and_rules() {
    let crd = nixroll::api::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let mut files = Vec::new();
    yaml_files(Path::new(&format!("{ROOT}/examples")), &mut files);
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in yaml_docs(&text) {
            if doc["kind"] != "NixOSNode" {
                continue;
            }
            if let Err(errs) = kube_cel::Validator::new().validate(&schema, &doc, None) {
                let errs: Vec<String> = errs
                    .into_vec()
                    .into_iter()
                    .map(|e| format!("{}: {}", e.field_path, e.message))
                    .collect();
                panic!(
                    "{}: {} is invalid: {errs:?}",
                    file.display(),
                    doc["metadata"]["name"]
                );
            }
            let _: nixroll::api::NixOSNode = serde_json::from_value(doc)
                .unwrap_or_else(|e| panic!("{}: does not parse as a NixOSNode: {e}", file.display()));
            checked += 1;
        }
    }
    assert!(checked >= 1, "no example NixOSNode found");
}
