//! The install manifests: `kubectl kustomize deploy/` renders; every rendered object parses into
//! its typed Kubernetes struct (k8s-openapi) with no unknown or misspelt field (parse,
//! re-serialise, compare); the CRD in it is exactly `nixroll crd`; the RBAC is what the code
//! uses and no more; the image is the crate version; every example NixOSNode in `examples/`
//! passes the CRD's schema and CEL rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;

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

use common::chart::yaml_docs;

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

/// The builders' cache in `docs` (deploy/ or the chart): the Service `nixroll-cache` selects
/// the builder agents' pods and no other (not the ordinary agent's, not the controller's),
/// forwards `port` to the container port the builder listens on and reports as its URL; a
/// managed Node runs exactly one of the two agents (the builder where labelled
/// `nixroll.io/builder=true`, the ordinary agent elsewhere), and both trust the keys of the
/// ConfigMap `nixroll-builder`.
pub fn check_cache_service(docs: &[Value], port: u16) {
    let svc = find(docs, "Service", "nixroll-cache");
    let selector = svc["spec"]["selector"].as_object().unwrap();
    assert!(!selector.is_empty());
    let selects = |d: &Value| {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        selector.iter().all(|(k, v)| &labels[k] == v)
    };
    let builder = find(docs, "DaemonSet", "nixroll-builder");
    assert!(
        selects(builder),
        "the cache Service does not select the builder's pods"
    );
    for d in docs.iter().filter(|d| d["metadata"]["name"] != "nixroll-builder") {
        if d.pointer("/spec/template/metadata/labels").is_some() {
            assert!(!selects(d), "the cache Service selects {}", d["metadata"]["name"]);
        }
    }
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["port"], port);
    let pod = &builder["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let cport = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == sp["targetPort"])
        .unwrap_or_else(|| panic!("the builder has no port named {}", sp["targetPort"]));
    assert_eq!(cport["containerPort"], port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/nix-cache-info");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["agent", "--builder"]);
    assert!(
        args.contains(&format!("--cache-listen=0.0.0.0:{port}").as_str()),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--cache-url=http://$(POD_IP):{port}").as_str()),
        "{args:?}"
    );
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "POD_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP")
    );
    // One agent per managed Node.
    let agent = &find(docs, "DaemonSet", "nixroll-agent")["spec"]["template"]["spec"];
    let mut want = agent["nodeSelector"].clone();
    want["nixroll.io/builder"] = "true".into();
    assert_eq!(pod["nodeSelector"], want);
    assert_eq!(
        agent["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        serde_json::json!([{"matchExpressions": [
            {"key": "nixroll.io/builder", "operator": "NotIn", "values": ["true"]}]}])
    );
    assert_eq!(pod["serviceAccountName"], agent["serviceAccountName"]);
    for c in [c, &agent["containers"][0]] {
        assert!(
            c["env"].as_array().unwrap().iter().any(|e| e["name"] == "NIXROLL_TRUSTED_PUBLIC_KEYS"
                && e["valueFrom"]["configMapKeyRef"]
                    == serde_json::json!({"name": "nixroll-builder", "key": "trusted-public-keys", "optional": true})),
            "{}",
            c["env"]
        );
    }
}

#[test]
fn deploy_serves_the_builders_cache_behind_a_service() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    check_cache_service(&docs, 5080);
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn generated_crd() -> Value {
    serde_saphyr::from_str(&nixroll::api::crd_yaml().unwrap()).unwrap()
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
        "the CRD in deploy/ is not the generated one (cargo run -- crd --only nixosnodes > crds/nixosnodes.yaml)"
    );
}

#[test]
fn the_flakesource_crd_in_deploy_is_generated() {
    let Some(docs) = kustomize(&format!("{ROOT}/deploy")) else {
        return;
    };
    let crd = find(&docs, "CustomResourceDefinition", "flakesources.nixroll.io");
    let generated: Value = serde_saphyr::from_str(&nixroll::api::flakesource_crd_yaml().unwrap()).unwrap();
    assert!(
        numbers_as_f64(crd) == numbers_as_f64(&generated),
        "the FlakeSource CRD in deploy/ is not the generated one (cargo run -- crd --only flakesources > crds/flakesources.yaml)"
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
            ("flakesources", "list"),
            ("flakesources", "watch"),
            ("flakesources", "patch"),
            ("flakesources/status", "patch"),
            ("gitrepositories", "list"),
            ("gitrepositories", "watch"),
            ("customresourcedefinitions", "list"),
            ("customresourcedefinitions", "watch"),
            ("nixospools", "list"),
            ("nixospools", "watch"),
            ("nixospools/status", "patch"),
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
            ("configmaps", "get"),
            ("configmaps", "list"),
            ("configmaps", "watch"),
            ("secrets", "get"),
            ("events", "create"),
            ("events", "patch"),
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

/// The NixOSNodes under `dir`: a folder with a kustomization.yaml is rendered with `kubectl
/// kustomize` (its files may be partial, completed by replacements), others are read as they are.
fn example_nodes(dir: &Path, out: &mut Vec<(PathBuf, Value)>) {
    if dir.join("kustomization.yaml").exists() {
        let Some(docs) = kustomize(dir.to_str().unwrap()) else {
            return;
        };
        out.extend(
            docs.into_iter()
                .filter(|d| d["kind"] == "NixOSNode")
                .map(|d| (dir.to_path_buf(), d)),
        );
        return;
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            example_nodes(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.extend(
                yaml_docs(&text)
                    .into_iter()
                    .filter(|d| d["kind"] == "NixOSNode")
                    .map(|d| (p.clone(), d)),
            );
        }
    }
}

/// Every NixOSNode under examples/ passes the CRD's CEL rules (kube-cel, after the schema's
/// defaults; types, patterns, enums and required fields are not checked here) and parses into
/// the NixOSNode type.
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
    let mut nodes = Vec::new();
    example_nodes(Path::new(&format!("{ROOT}/examples")), &mut nodes);
    for (file, doc) in &nodes {
        if let Err(errs) = kube_cel::Validator::new().validate(&schema, doc, None) {
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
        let _: nixroll::api::NixOSNode = serde_json::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("{}: does not parse as a NixOSNode: {e}", file.display()));
    }
    assert!(
        nodes.iter().any(|(f, _)| f.ends_with("examples/nixosnode.yaml")),
        "examples/nixosnode.yaml not checked"
    );
    if std::env::var_os("CI").is_some()
        || Command::new("kubectl")
            .arg("version")
            .arg("--client")
            .output()
            .is_ok()
    {
        let flux: Vec<&Value> = nodes
            .iter()
            .filter(|(f, _)| f.ends_with("examples/flux/nodes"))
            .map(|(_, d)| d)
            .collect();
        let names: Vec<&str> = flux
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["agent-1", "agent-2", "server-1"]);
        // One place decides the revision of all three.
        let revision: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(format!("{ROOT}/examples/flux/nodes/revision.yaml")).unwrap(),
        )
        .unwrap();
        for d in flux {
            assert_eq!(d["spec"]["revision"], revision["data"]["revision"]);
            assert_eq!(d["spec"]["flake"], revision["data"]["flake"]);
        }
    }
}

/// The Renovate regex manager of the fleet repository finds the revision line it must bump,
/// with the named groups Renovate needs (regex syntax shared by Renovate's RE2 and this crate).
#[test]
fn renovate_finds_the_revision_to_bump() {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/examples/flux/renovate.json")).unwrap(),
    )
    .unwrap();
    let manager = &config["customManagers"][0];
    let text = std::fs::read_to_string(format!("{ROOT}/examples/flux/nodes/revision.yaml")).unwrap();
    let pattern = manager["managerFilePatterns"][0].as_str().unwrap();
    let file_re = regex::Regex::new(pattern.trim_matches('/')).unwrap();
    assert!(file_re.is_match("nodes/revision.yaml"));
    assert!(!file_re.is_match("nodes/server-1.yaml"));
    let re = regex::Regex::new(manager["matchStrings"][0].as_str().unwrap()).unwrap();
    let caps = re.captures(&text).expect("the revision line is found");
    assert_eq!(&caps["datasource"], "git-refs");
    assert_eq!(&caps["currentValue"], "main");
    assert_eq!(&caps["packageName"], "https://git.example.org/homelab/nixos.git");
    let revision: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(
        &caps["currentDigest"],
        revision["data"]["revision"].as_str().unwrap()
    );
    let nixos: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/examples/flux/nixos-repo/renovate.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(nixos["nix"]["enabled"], true);
    assert_eq!(nixos["lockFileMaintenance"]["enabled"], true);
    assert_ne!(
        config["packageRules"][0]["automerge"], true,
        "a rollout is never automerged"
    );
}

/// charts/nixroll, rendered by `common::chart` (gtmpl with Helm's functions; no `helm` binary
/// can be installed here).
mod chart {
    use std::collections::HashMap;

    use serde_json::{Value, json};

    use super::{ROOT, assert_typed, kustomize, numbers_as_f64};
    use crate::common::chart::{self, Release, notes, render, try_render};

    /// The labels only Helm adds (deploy/ has no release, version or manager to name).
    const HELM_LABELS: [&str; 4] = [
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
        "helm.sh/chart",
    ];

    /// `d` without the Helm-only labels, on the object and on its pod template.
    fn without_helm_labels(d: &Value) -> Value {
        let mut d = d.clone();
        for path in ["/metadata/labels", "/spec/template/metadata/labels"] {
            if let Some(labels) = d.pointer_mut(path).and_then(Value::as_object_mut) {
                for l in HELM_LABELS {
                    labels.remove(l);
                }
            }
        }
        d
    }

    /// The message of a render that must fail.
    fn render_error(release: &Release, overrides: Value) -> String {
        match try_render(release, overrides.clone()) {
            Ok(r) => panic!(
                "{overrides} in {} rendered {} objects instead of failing",
                release.namespace,
                r.docs.len()
            ),
            Err(e) => e,
        }
    }

    fn key(d: &Value) -> String {
        format!(
            "{}/{}/{}",
            d["kind"].as_str().unwrap_or_default(),
            d["metadata"]["namespace"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default()
        )
    }

    fn by_key(docs: &[Value]) -> HashMap<String, Value> {
        docs.iter()
            .map(|d| (key(d), numbers_as_f64(&without_helm_labels(d))))
            .collect()
    }

    fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind} missing"))
    }

    fn strings(v: &Value) -> Vec<&str> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    fn assert_same_objects(got: &[Value], want: &[Value]) {
        let (want, got) = (by_key(want), by_key(got));
        let mut want_keys: Vec<&String> = want.keys().collect();
        let mut got_keys: Vec<&String> = got.keys().collect();
        want_keys.sort();
        got_keys.sort();
        assert_eq!(
            got_keys, want_keys,
            "the chart and deploy/ render different objects"
        );
        for (k, w) in &want {
            assert_eq!(
                &got[k],
                w,
                "{k} differs between the chart and deploy/:\nchart:  {}\ndeploy: {}",
                serde_json::to_string(&got[k]).unwrap(),
                serde_json::to_string(w).unwrap()
            );
        }
    }

    /// The defaults are deploy/ (without its Namespace, which `helm install --create-namespace`
    /// creates, and the CRDs, which Helm installs from crds/) plus Helm's standard labels on
    /// every object and pod.
    #[test]
    fn chart_defaults_render_what_kustomize_renders() {
        let Some(kustomized) = kustomize(&format!("{ROOT}/deploy")) else {
            return;
        };
        let rendered = render(json!({}));
        assert_typed(&rendered);
        let want: Vec<Value> = kustomized
            .iter()
            .filter(|d| d["kind"] != "CustomResourceDefinition" && d["kind"] != "Namespace")
            .cloned()
            .collect();
        assert_same_objects(&rendered, &want);
        let version = env!("CARGO_PKG_VERSION");
        for d in &rendered {
            let labels = &d["metadata"]["labels"];
            let standard = json!({
                "name": labels["app.kubernetes.io/name"],
                "instance": labels["app.kubernetes.io/instance"],
                "version": labels["app.kubernetes.io/version"],
                "managed-by": labels["app.kubernetes.io/managed-by"],
                "chart": labels["helm.sh/chart"],
            });
            let component = if key(d).contains("builder") || key(d).contains("cache") {
                "nixroll-builder"
            } else if key(d).contains("agent") {
                "nixroll-agent"
            } else {
                "nixroll-controller"
            };
            assert_eq!(
                standard,
                json!({"name": component, "instance": "nixroll", "version": version,
                       "managed-by": "Helm", "chart": format!("nixroll-{version}")}),
                "{}",
                key(d)
            );
            if let Some(pod) = d.pointer("/spec/template/metadata/labels") {
                assert_eq!(pod["app.kubernetes.io/instance"], "nixroll", "{}", key(d));
            }
        }
        // The one Namespace, when the chart is asked to create it, is deploy/'s.
        let with_ns = render(json!({"namespace": {"create": true}}));
        let ns: Vec<Value> = with_ns.into_iter().filter(|d| d["kind"] == "Namespace").collect();
        let want_ns: Vec<Value> = kustomized
            .into_iter()
            .filter(|d| d["kind"] == "Namespace")
            .collect();
        assert_same_objects(&ns, &want_ns);
        assert_typed(&ns);
    }

    /// The namespace is nixroll's fixed contract (the code reads its Lease, pause switch and
    /// Secrets there): every namespaced object is in the release namespace, and a release
    /// anywhere else fails to render, saying how to install.
    #[test]
    fn the_chart_installs_only_into_nixroll_system() {
        for d in render(json!({"metrics": {"serviceMonitor": {"enabled": true}}})) {
            let ns = d["metadata"]["namespace"].as_str();
            if d["metadata"]["name"] == "nixroll-controller-events" {
                // Events about cluster-scoped objects are recorded in default.
                assert_eq!(ns, Some("default"));
            } else if d["kind"].as_str().unwrap().starts_with("Cluster")
                || d["kind"]
                    .as_str()
                    .unwrap()
                    .starts_with("ValidatingAdmissionPolicy")
            {
                assert_eq!(ns, None, "{}", key(&d));
            } else {
                assert_eq!(ns, Some("nixroll-system"), "{}", key(&d));
            }
        }
        let other = Release {
            name: "nixroll".into(),
            namespace: "default".into(),
        };
        let err = render_error(&other, json!({}));
        for part in ["nixroll-system", "not default", "--create-namespace"] {
            assert!(err.contains(part), "{part:?} not in: {err}");
        }
        // The release name is free (it only labels the objects).
        let named = Release {
            name: "ops".into(),
            namespace: "nixroll-system".into(),
        };
        let docs = try_render(&named, json!({})).unwrap().docs;
        assert_eq!(
            find(&docs, "DaemonSet")["metadata"]["labels"]["app.kubernetes.io/instance"],
            "ops"
        );
    }

    #[test]
    fn the_chart_crd_is_nixroll_crd_and_its_version_the_crate_version() {
        let text = std::fs::read_to_string(format!("{ROOT}/charts/nixroll/crds/nixosnodes.yaml")).unwrap();
        let crd: Value = serde_saphyr::from_str(&text).unwrap();
        assert!(
            numbers_as_f64(&crd) == numbers_as_f64(&super::generated_crd()),
            "charts/nixroll/crds/nixosnodes.yaml is not `nixroll crd` (copy crds/nixosnodes.yaml)"
        );
        let chart: Value = serde_saphyr::from_str(
            &std::fs::read_to_string(format!("{ROOT}/charts/nixroll/Chart.yaml")).unwrap(),
        )
        .unwrap();
        assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
        assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn chart_values_reach_the_manifests() {
        let docs = render(json!({
            "image": {"repository": "registry.example.org/nixroll", "tag": "dev"},
            "controller": {
                "maxUnavailable": "10%",
                "failureThreshold": 3,
                "timeouts": {"draining": "45m"},
                "resources": {"limits": {"memory": "256Mi"}},
                "nodeSelector": {"node-role.kubernetes.io/control-plane": "true"},
                "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
                "gitCABundle": {"configMap": "forge-ca"},
            },
            "agent": {
                "nodeSelector": {"example.org/nixos": "yes"},
                "tolerations": [],
                "extraHostMounts": [{"name": "srv", "hostPath": "/srv/nix", "mountPath": "/srv/nix", "readOnly": true}],
                "admissionPolicy": {"enabled": false},
            },
            "metrics": {"service": {"enabled": false}},
            "builder": {"enabled": false},
        }));
        for absent in [
            "Namespace",
            "Service",
            "ServiceMonitor",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert!(docs.iter().all(|d| d["kind"] != absent), "{absent} should be off");
        }
        let ctl = &find(&docs, "Deployment")["spec"]["template"]["spec"];
        let c = &ctl["containers"][0];
        assert_eq!(c["image"], "registry.example.org/nixroll:dev");
        let args = strings(&c["args"]);
        for a in [
            "--max-unavailable=10%",
            "--failure-threshold=3",
            "--draining-timeout=45m",
            "--staging-timeout=60m",
        ] {
            assert!(args.contains(&a), "{a} missing from {args:?}");
        }
        assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
        assert_eq!(
            c["resources"]["requests"]["memory"], "64Mi",
            "values merge like Helm's"
        );
        assert_eq!(
            ctl["nodeSelector"]["node-role.kubernetes.io/control-plane"],
            "true"
        );
        assert_eq!(ctl["tolerations"][0]["operator"], "Exists");
        // A private CA for git over HTTPS: the ConfigMap mounted, OpenSSL pointed at it.
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "SSL_CERT_FILE", "value": "/etc/nixroll/git-ca/ca-bundle.crt"})),
            "{}",
            c["env"]
        );
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "git-ca", "mountPath": "/etc/nixroll/git-ca", "readOnly": true})),
            "{}",
            c["volumeMounts"]
        );
        assert!(
            ctl["volumes"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "git-ca", "configMap": {"name": "forge-ca"}})),
            "{}",
            ctl["volumes"]
        );
        let agent = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(
            agent["nodeSelector"],
            json!({"example.org/nixos": "yes", "kubernetes.io/os": "linux", "nixroll.io/managed": "true"})
        );
        assert!(agent.get("tolerations").is_none());
        assert_eq!(
            agent["containers"][0]["volumeMounts"][1],
            json!({"name": "srv", "mountPath": "/srv/nix", "readOnly": true})
        );
        assert_eq!(
            agent["volumes"][1],
            json!({"name": "srv", "hostPath": {"path": "/srv/nix"}})
        );
        assert_typed(&docs);
    }

    /// The builders' cache: on by default (it runs nowhere until a Node is labelled a
    /// builder); its port reaches the Service, the pod and the builder's flags; off, neither
    /// the builder nor its Service nor the agent's affinity is rendered; the agent's own node
    /// affinity cannot be combined with it.
    #[test]
    fn builder_and_cache_service_follow_their_values() {
        super::check_cache_service(&render(json!({})), 5080);
        super::check_cache_service(&render(json!({"builder": {"port": 6080}})), 6080);
        let docs = render(json!({"builder": {"enabled": false}}));
        assert!(
            docs.iter()
                .all(|d| !key(d).contains("builder") && !key(d).contains("cache"))
        );
        let agent = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
        assert!(agent.get("affinity").is_none(), "{}", agent["affinity"]);
        assert!(
            !serde_json::to_string(agent)
                .unwrap()
                .contains("TRUSTED_PUBLIC_KEYS")
        );
        let podaff = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"x": "y"}}}]}});
        let docs = render(json!({"agent": {"affinity": podaff}}));
        let agent = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(agent["affinity"]["podAntiAffinity"], podaff["podAntiAffinity"]);
        assert!(agent["affinity"]["nodeAffinity"].is_object());
        let err = render_error(
            &Release::default(),
            json!({"agent": {"affinity": {"nodeAffinity": {"x": 1}}}}),
        );
        assert!(err.contains("builder.enabled"), "{err}");
        let args = strings(
            &find(
                &render(json!({"builder": {"extraArgs": ["--builder-key-secret=k2"]}})),
                "DaemonSet",
            )["spec"]["template"]["spec"]["containers"][0]["args"],
        )
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
        assert!(
            !args.contains(&"--builder-key-secret=k2".to_string()),
            "only the builder gets builder.extraArgs"
        );
        let b = render(json!({"builder": {"extraArgs": ["--builder-key-secret=k2"]}}));
        let b = b
            .iter()
            .find(|d| d["metadata"]["name"] == "nixroll-builder" && d["kind"] == "DaemonSet")
            .unwrap();
        assert_eq!(
            strings(&b["spec"]["template"]["spec"]["containers"][0]["args"]).last(),
            Some(&"--builder-key-secret=k2")
        );
        assert_typed(&docs);
    }

    /// The push webhook receiver: off by default (no Service, no flag, no port); enabled, the
    /// controller gets `--webhook-addr` and a `webhook` port, and the Service selects it.
    #[test]
    fn webhook_receiver_is_off_by_default_and_has_its_service() {
        let named = |docs: &[Value], name: &str| {
            docs.iter()
                .any(|d| d["kind"] == "Service" && d["metadata"]["name"] == name)
        };
        let docs = render(json!({}));
        assert!(!named(&docs, "nixroll-controller-webhook"));
        assert!(
            !serde_json::to_string(find(&docs, "Deployment"))
                .unwrap()
                .contains("webhook")
        );
        let docs = render(
            json!({"controller": {"webhook": {"enabled": true, "port": 9393, "secretName": "hooks"}}}),
        );
        let svc = docs
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "nixroll-controller-webhook")
            .unwrap();
        assert_eq!(svc["spec"]["ports"][0]["port"], 9393);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "webhook");
        let c = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            args.contains(&"--webhook-addr=0.0.0.0:9393") && args.contains(&"--webhook-secret=hooks"),
            "{args:?}"
        );
        assert!(
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "webhook" && p["containerPort"] == 9393)
        );
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &find(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"][k],
                v
            );
        }
    }

    /// Each knob users expect of an operator's chart appears where it should when set.
    #[test]
    fn every_knob_lands_where_it_should() {
        let pull = json!([{"name": "regcred"}]);
        let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}});
        let tol = json!([{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}]);
        let env = json!([{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]);
        let component = |extra_arg: &str, sa: &str| {
            json!({
                "affinity": affinity,
                "tolerations": tol,
                "nodeSelector": {"zone": "a"},
                "priorityClassName": "ops-critical",
                "podAnnotations": {"example.org/scrape": "yes"},
                "podLabels": {"team": "ops"},
                "extraArgs": [extra_arg],
                "extraEnv": env,
                "serviceAccount": {"name": sa, "annotations": {"example.org/role": "x"}},
            })
        };
        let mut ctl = component("--log-json", "ctl-sa");
        ctl["podSecurityContext"] = json!({"runAsUser": 1000, "fsGroup": 1000});
        ctl["securityContext"] = json!({"readOnlyRootFilesystem": false});
        let mut agent = component("--poll-interval=30s", "agent-sa");
        agent["updateStrategy"] = json!({"type": "OnDelete", "rollingUpdate": null});
        agent["securityContext"] = json!({"runAsUser": null});
        let docs = render(json!({
            "imagePullSecrets": pull,
            "controller": ctl,
            "agent": agent,
            // The agent's own node affinity replaces the builder's exclusion only without
            // builders (builder_and_cache_service_follow_their_values).
            "builder": {"enabled": false},
            "metrics": {"serviceMonitor": {
                "enabled": true, "namespace": "monitoring", "interval": "15s", "scrapeTimeout": "10s",
                "labels": {"release": "kube-prometheus"},
                "relabelings": [{"action": "replace", "targetLabel": "cluster", "replacement": "home"}],
                "metricRelabelings": [{"action": "drop", "regex": "go_.*", "sourceLabels": ["__name__"]}],
            }},
        }));
        for (kind, sa, arg) in [
            ("Deployment", "ctl-sa", "--log-json"),
            ("DaemonSet", "agent-sa", "--poll-interval=30s"),
        ] {
            let d = find(&docs, kind);
            let tmpl = &d["spec"]["template"];
            let pod = &tmpl["spec"];
            assert_eq!(pod["imagePullSecrets"], pull, "{kind}");
            assert_eq!(pod["affinity"], affinity, "{kind}: affinity replaces the default");
            assert_eq!(pod["priorityClassName"], "ops-critical", "{kind}");
            assert_eq!(pod["nodeSelector"]["zone"], "a", "{kind}");
            assert!(pod["tolerations"].as_array().unwrap().contains(&tol[0]), "{kind}");
            assert_eq!(pod["serviceAccountName"], sa, "{kind}");
            assert_eq!(
                tmpl["metadata"]["annotations"]["example.org/scrape"], "yes",
                "{kind}"
            );
            assert_eq!(tmpl["metadata"]["labels"]["team"], "ops", "{kind}");
            assert_eq!(
                d["spec"]["selector"]["matchLabels"].as_object().unwrap().len(),
                1,
                "{kind}: pod labels never reach the immutable selector"
            );
            let c = &pod["containers"][0];
            assert_eq!(
                strings(&c["args"]).last(),
                Some(&arg),
                "{kind}: extra args come last"
            );
            assert!(c["env"].as_array().unwrap().contains(&env[0]), "{kind}");
            let account = docs
                .iter()
                .find(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == sa)
                .unwrap_or_else(|| panic!("ServiceAccount {sa} missing"));
            assert_eq!(account["metadata"]["annotations"]["example.org/role"], "x");
            // Every binding names the account the pods run as.
            for b in docs.iter().filter(|o| o.get("subjects").is_some()) {
                if b["metadata"]["labels"]["app.kubernetes.io/name"] == d["metadata"]["name"] {
                    assert_eq!(b["subjects"][0]["name"], sa, "{}", key(b));
                }
            }
        }
        // Security contexts: a key overridden, the secure rest kept; null deletes a default.
        let ctl = &find(&docs, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(
            ctl["securityContext"],
            json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 65532, "fsGroup": 1000,
                   "seccompProfile": {"type": "RuntimeDefault"}})
        );
        assert_eq!(
            ctl["containers"][0]["securityContext"],
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false, "capabilities": {"drop": ["ALL"]}})
        );
        let ds = find(&docs, "DaemonSet");
        assert_eq!(ds["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
        assert_eq!(
            ds["spec"]["template"]["spec"]["containers"][0]["securityContext"],
            json!({"privileged": true})
        );
        // The admission policy confines the agent's account, whatever it is called.
        assert_eq!(
            find(&docs, "ValidatingAdmissionPolicy")["spec"]["matchConditions"][0]["expression"],
            "request.userInfo.username == 'system:serviceaccount:nixroll-system:agent-sa'"
        );
        let sm = find(&docs, "ServiceMonitor");
        assert_eq!(sm["metadata"]["namespace"], "monitoring");
        assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus");
        assert_eq!(
            sm["metadata"]["labels"]["app.kubernetes.io/name"],
            "nixroll-controller"
        );
        assert_eq!(
            sm["spec"]["namespaceSelector"],
            json!({"matchNames": ["nixroll-system"]})
        );
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/name": "nixroll-controller"})
        );
        let ep = &sm["spec"]["endpoints"][0];
        assert_eq!(ep["port"], "metrics");
        assert_eq!(ep["interval"], "15s");
        assert_eq!(ep["scrapeTimeout"], "10s");
        assert_eq!(ep["relabelings"][0]["targetLabel"], "cluster");
        assert_eq!(ep["metricRelabelings"][0]["regex"], "go_.*");
        let typed: Vec<Value> = docs
            .iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .cloned()
            .collect();
        assert_typed(&typed);

        // Defaults: the agent is node-critical, the controller has no priority class and
        // spreads its replicas; the ServiceMonitor sits beside its Service.
        let docs = render(json!({"metrics": {"serviceMonitor": {"enabled": true}}}));
        let agent = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(agent["priorityClassName"], "system-node-critical");
        let ctl = &find(&docs, "Deployment")["spec"]["template"]["spec"];
        assert!(ctl.get("priorityClassName").is_none());
        assert!(ctl["affinity"]["podAntiAffinity"].is_object());
        let sm = find(&docs, "ServiceMonitor");
        assert_eq!(sm["metadata"]["namespace"], "nixroll-system");
        assert!(sm["spec"].get("namespaceSelector").is_none());
        assert!(sm["spec"]["endpoints"][0].get("scrapeTimeout").is_none());
    }

    /// serviceAccount.create and rbac.create off: the chart renders neither, and the pods
    /// still run as the named (or default) accounts.
    #[test]
    fn service_accounts_and_rbac_can_be_brought_by_the_user() {
        let docs = render(json!({
            "rbac": {"create": false},
            "controller": {"serviceAccount": {"create": false, "name": "mine"}},
            "agent": {"serviceAccount": {"create": false}},
        }));
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for absent in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ] {
            assert!(!kinds.contains(&absent), "{absent} rendered: {kinds:?}");
        }
        assert_eq!(
            find(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
            "mine"
        );
        assert_eq!(
            find(&docs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"],
            "nixroll-agent"
        );
        assert_typed(&docs);
    }

    /// A ServiceMonitor without the Service it scrapes would be silently empty: refused.
    #[test]
    fn a_service_monitor_without_its_service_is_refused() {
        let err = render_error(
            &Release::default(),
            json!({"metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true}}}),
        );
        assert!(err.contains("metrics.service.enabled"), "{err}");
        let err = render_error(&Release::default(), json!({"image": {"repository": ""}}));
        assert!(err.contains("image.repository is required"), "{err}");
    }

    #[test]
    fn notes_say_what_to_do_next() {
        let text = notes(json!({}));
        for part in [
            "kubectl get nixosnodes",
            "NixOSNode",
            "kubectl -n nixroll-system create configmap nixroll-pause",
            "pod-security.kubernetes.io/enforce=privileged",
        ] {
            assert!(text.contains(part), "{part:?} missing from NOTES.txt:\n{text}");
        }
        assert!(!text.contains("WARNING"), "{text}");
        let text =
            notes(json!({"namespace": {"create": true}, "agent": {"admissionPolicy": {"enabled": false}}}));
        assert!(!text.contains("kubectl label namespace"), "{text}");
        assert!(
            text.contains("WARNING: agent.admissionPolicy.enabled is false"),
            "{text}"
        );
    }

    fn schema() -> (boon::Schemas, boon::SchemaIndex) {
        let text = std::fs::read_to_string(format!("{ROOT}/charts/nixroll/values.schema.json")).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        compiler.add_resource("values.schema.json", doc).unwrap();
        let index = compiler.compile("values.schema.json", &mut schemas).unwrap();
        (schemas, index)
    }

    /// values.yaml validates against values.schema.json (what `helm install` and `helm lint`
    /// check), values a user may write pass, and wrong ones are refused.
    #[test]
    fn values_validate_against_the_schema_and_wrong_values_are_refused() {
        let (schemas, index) = schema();
        let check = |overrides: Value| {
            schemas
                .validate(&chart::values(&overrides), index)
                .map_err(|e| format!("{e:#}"))
        };
        check(json!({})).unwrap_or_else(|e| panic!("values.yaml does not validate: {e}"));
        for good in [
            json!({"controller": {"maxUnavailable": 2}}),
            json!({"controller": {"maxUnavailable": "25%", "timeouts": {"draining": "1h30m", "verifying": "90s"}}}),
            json!({"imagePullSecrets": [{"name": "regcred"}], "image": {"tag": "0.2.0"}}),
            json!({"agent": {"updateStrategy": {"type": "OnDelete"}, "extraArgs": ["--x=1"]}}),
            json!({"metrics": {"serviceMonitor": {"enabled": true, "scrapeTimeout": "10s"}}}),
            json!({"global": {"imageRegistry": "x"}}),
        ] {
            check(good.clone()).unwrap_or_else(|e| panic!("{good} refused: {e}"));
        }
        for (bad, why) in [
            (json!({"controler": {"replicas": 1}}), "controler"),
            (json!({"controller": {"replicas": "two"}}), "/controller/replicas"),
            (
                json!({"controller": {"maxUnavailable": "ten"}}),
                "/controller/maxUnavailable",
            ),
            (
                json!({"controller": {"timeouts": {"draining": "15 minutes please"}}}),
                "/controller/timeouts/draining",
            ),
            (json!({"image": {"pullPolicy": "Sometimes"}}), "/image/pullPolicy"),
            (
                json!({"agent": {"tolerations": {"key": "x"}}}),
                "/agent/tolerations",
            ),
            (
                json!({"agent": {"updateStrategy": {"type": "Recreate"}}}),
                "/agent/updateStrategy/type",
            ),
            (json!({"imagePullSecrets": ["regcred"]}), "/imagePullSecrets/0"),
            (
                json!({"controller": {"extraEnv": [{"value": "no name"}]}}),
                "/controller/extraEnv/0",
            ),
            (
                json!({"metrics": {"serviceMonitor": {"interval": 30}}}),
                "/metrics/serviceMonitor/interval",
            ),
        ] {
            let err = check(bad.clone()).expect_err(&format!("{bad} accepted"));
            assert!(
                err.contains(why),
                "{bad}: the error does not point at {why}: {err}"
            );
        }
    }

    /// The schema's duration pattern accepts what the controller's flags parse (jiff) and
    /// refuses what they refuse, on the forms a user is likely to write.
    #[test]
    fn the_schema_takes_the_durations_the_controller_takes() {
        let (schemas, index) = schema();
        for d in [
            "15m",
            "60m",
            "1h",
            "1h30m",
            "90s",
            "2h 30m",
            "45 minutes",
            "1 hour",
            "fifteen",
            "15",
            "m",
            "-5m",
        ] {
            let jiff_ok = d.parse::<jiff::SignedDuration>().is_ok_and(|d| d.is_positive());
            let values = chart::values(&json!({"controller": {"timeouts": {"staging": d}}}));
            let schema_ok = schemas.validate(&values, index).is_ok();
            assert_eq!(
                schema_ok, jiff_ok,
                "{d:?}: schema {schema_ok}, controller {jiff_ok}"
            );
        }
    }

    /// Every value of the schema (a leaf: anything but an object with declared properties) has
    /// a row in the chart's README, and a scalar's row shows its default as values.yaml has it.
    #[test]
    fn the_chart_readme_lists_every_value_with_its_default() {
        let readme = std::fs::read_to_string(format!("{ROOT}/charts/nixroll/README.md")).unwrap();
        let schema: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{ROOT}/charts/nixroll/values.schema.json")).unwrap(),
        )
        .unwrap();
        let values = chart::values(&json!({}));
        let mut leaves = Vec::new();
        fn walk(schema: &Value, path: String, out: &mut Vec<String>) {
            match schema["properties"].as_object() {
                Some(props) if !props.is_empty() => {
                    for (k, s) in props {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        walk(s, p, out);
                    }
                }
                _ => out.push(path),
            }
        }
        walk(&schema, String::new(), &mut leaves);
        assert!(leaves.len() > 40, "{leaves:?}");
        for leaf in leaves {
            if leaf == "global" {
                continue;
            }
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{leaf}` |")))
                .unwrap_or_else(|| panic!("charts/nixroll/README.md has no row for `{leaf}`"));
            let default = leaf.split('.').fold(&values, |v, k| &v[k]);
            let cell = row.split('|').nth(2).unwrap().trim();
            match default {
                Value::Object(_) | Value::Array(_)
                    if !default.as_array().is_some_and(|a| a.is_empty())
                        && !default.as_object().is_some_and(|o| o.is_empty()) => {}
                v => assert_eq!(cell, format!("`{v}`"), "the default of {leaf} in README.md"),
            }
        }
    }
}

/// The chart's optional PrometheusRule: off by default; on, Prometheus' own `promtool` accepts
/// its rules and, in a rule unit test over synthetic series, each alert fires after its `for`
/// (a pool blocked for over an hour, a gate failing, a halted rollout, a Degraded node) and not
/// while the metrics are healthy.
#[test]
fn the_prometheus_rule_is_valid_and_its_alerts_fire_when_they_should() {
    use serde_json::json;
    let off = common::chart::render(json!({}));
    assert!(!off.iter().any(|d| d["kind"] == "PrometheusRule"));
    let docs = common::chart::render(
        json!({"metrics": {"prometheusRule": {"enabled": true, "labels": {"release": "kps"}}}}),
    );
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let have = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !common::require("`promtool` (apt-get install prometheus)", have) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    std::fs::write(
        &rules,
        serde_json::to_string(&json!({"groups": rule["spec"]["groups"]})).unwrap(),
    )
    .unwrap();
    let check = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let test = json!({
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": "nixroll_pool_blocked{pool=\"zone-a\",instance=\"a\"}", "values": "1x120"},
                {"series": "nixroll_pool_blocked{pool=\"zone-a\",instance=\"b\"}", "values": "0x120"},
                {"series": "nixroll_pool_blocked{pool=\"zone-b\",instance=\"a\"}", "values": "0x120"},
                {"series": "nixroll_gate_passing{pool=\"zone-a\",gate=\"storage\",instance=\"a\"}", "values": "0x120"},
                {"series": "nixroll_halted{instance=\"a\"}", "values": "0 0 0 1x20"},
                {"series": "nixroll_nodes{phase=\"Degraded\",instance=\"a\"}", "values": "0x120"}
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "NixrollPoolBlocked", "exp_alerts": []},
                {"eval_time": "90m", "alertname": "NixrollPoolBlocked",
                 "exp_alerts": [{"exp_labels": {"pool": "zone-a", "severity": "warning"}}]},
                {"eval_time": "90m", "alertname": "NixrollHealthGateFailing",
                 "exp_alerts": [{"exp_labels": {"pool": "zone-a", "gate": "storage", "severity": "warning"}}]},
                {"eval_time": "5m", "alertname": "NixrollRolloutHalted", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "NixrollRolloutHalted", "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
                {"eval_time": "90m", "alertname": "NixrollNodeDegraded", "exp_alerts": []}
            ]
        }]
    });
    // promtool compares the annotations too: take them from the rendered rule.
    let mut test = test;
    for t in test["tests"][0]["alert_rule_test"].as_array_mut().unwrap() {
        let name = t["alertname"].clone();
        let annotations = rule["spec"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["alert"] == name)
            .map(|r| r["annotations"].clone())
            .unwrap();
        for a in t["exp_alerts"].as_array_mut().unwrap() {
            a["exp_annotations"] = annotations.clone();
        }
    }
    let tests = dir.path().join("tests.yml");
    std::fs::write(&tests, serde_json::to_string(&test).unwrap()).unwrap();
    let out = Command::new("promtool")
        .current_dir(dir.path())
        .arg("test")
        .arg("rules")
        .arg(&tests)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Grafana dashboard: the chart's ConfigMap (off by default) carries exactly
/// deploy/grafana-dashboard.json, which is valid JSON, and every `nixroll_*` metric its panels
/// query is one the controller serves.
#[test]
fn the_grafana_dashboard_is_the_same_in_the_chart_and_deploy_and_queries_real_metrics() {
    use serde_json::json;
    let file = std::fs::read_to_string(format!("{ROOT}/deploy/grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&file).unwrap();
    assert!(
        !common::chart::render(json!({}))
            .iter()
            .any(|d| d["metadata"]["name"] == "nixroll-grafana-dashboard")
    );
    let docs = common::chart::render(json!({"metrics": {"grafanaDashboard": {"enabled": true}}}));
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "nixroll-grafana-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let in_chart: Value = serde_json::from_str(cm["data"]["nixroll.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        in_chart, dash,
        "the chart's dashboard differs from deploy/grafana-dashboard.json"
    );
    // What the controller serves (a fresh registry encodes every family, even empty ones).
    let metrics = nixroll::controller::Metrics::new();
    metrics.set_gate("p", "g", true);
    metrics.set_pool("p", &nixroll::api::NixOSPoolStatus::default());
    let served = metrics.encode().unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 10);
    let names = regex::Regex::new(r"nixroll_[a-z_]+").unwrap();
    for e in &exprs {
        for m in names.find_iter(e) {
            let name = m.as_str();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_total");
            assert!(
                served
                    .lines()
                    .any(|l| l.starts_with(name) || l.starts_with(&format!("# TYPE {base} "))),
                "the dashboard queries {name}, which the controller does not serve"
            );
        }
    }
}
