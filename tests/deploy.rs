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
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
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
            ("flakesources/status", "patch"),
            ("gitrepositories", "list"),
            ("gitrepositories", "watch"),
            ("customresourcedefinitions", "list"),
            ("customresourcedefinitions", "watch"),
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

/// charts/nixroll rendered without Helm (none can be installed here): every file of
/// `templates/` goes through `gtmpl`, a Go text/template engine, with the context Helm gives
/// (`.Values` from values.yaml merged with overrides, `.Chart`, `.Release`) and the two Helm
/// functions the templates use, `toYaml` and `nindent`, written here after Helm's definitions.
mod chart {
    use std::collections::HashMap;

    use gtmpl::{Context, FuncError, Template, Value as G};
    use serde_json::{Value, json};

    use super::{ROOT, assert_typed, kustomize, numbers_as_f64, yaml_docs};

    fn to_g(v: &Value) -> G {
        match v {
            Value::Null => G::Nil,
            Value::Bool(b) => G::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => G::from(i),
                None => G::from(n.as_f64().unwrap_or_default()),
            },
            Value::String(s) => G::String(s.clone()),
            Value::Array(a) => G::Array(a.iter().map(to_g).collect()),
            Value::Object(o) => G::Map(o.iter().map(|(k, v)| (k.clone(), to_g(v))).collect()),
        }
    }

    fn from_g(v: &G) -> Result<Value, FuncError> {
        Ok(match v {
            G::Nil | G::NoValue => Value::Null,
            G::Bool(b) => json!(b),
            G::String(s) => json!(s),
            G::Number(n) => match n.as_i64() {
                Some(i) => json!(i),
                None => json!(n.as_f64()),
            },
            G::Array(a) => Value::Array(a.iter().map(from_g).collect::<Result<_, _>>()?),
            G::Map(m) | G::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), from_g(v)?)))
                    .collect::<Result<_, FuncError>>()?,
            ),
            G::Function(_) => return Err(FuncError::Generic("toYaml of a function".into())),
        })
    }

    /// Helm: `toYaml` marshals to YAML (keys sorted) and trims the trailing newline.
    fn to_yaml(args: &[G]) -> Result<G, FuncError> {
        let [v] = args else {
            return Err(FuncError::ExactlyXArgs("toYaml".into(), 1));
        };
        let text = serde_saphyr::to_string(&from_g(v)?).map_err(|e| FuncError::Generic(e.to_string()))?;
        Ok(G::String(text.trim_end_matches('\n').to_string()))
    }

    /// Helm: `nindent N s` = "\n" + every line of s prefixed with N spaces.
    fn nindent(args: &[G]) -> Result<G, FuncError> {
        let [G::Number(n), G::String(s)] = args else {
            return Err(FuncError::Generic(format!("nindent N STRING, got {args:?}")));
        };
        let pad = " ".repeat(n.as_u64().unwrap_or(0) as usize);
        Ok(G::String(format!(
            "\n{pad}{}",
            s.replace('\n', &format!("\n{pad}"))
        )))
    }

    fn merge(base: &mut Value, over: &Value) {
        match (base, over) {
            (Value::Object(b), Value::Object(o)) => {
                for (k, v) in o {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (b, o) => *b = o.clone(),
        }
    }

    /// Render the chart's templates with values.yaml merged with `overrides`.
    pub fn render(overrides: Value) -> Vec<Value> {
        let dir = format!("{ROOT}/charts/nixroll");
        let chart: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(format!("{dir}/Chart.yaml")).unwrap()).unwrap();
        let mut values: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(format!("{dir}/values.yaml")).unwrap()).unwrap();
        merge(&mut values, &overrides);
        let context = json!({
            "Values": values,
            "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
            "Release": {"Name": "nixroll", "Namespace": "nixroll-system", "Service": "Helm"},
        });
        let mut files: Vec<_> = std::fs::read_dir(format!("{dir}/templates"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('_') || !name.ends_with(".yaml") {
                continue;
            }
            let mut t = Template::default();
            t.add_func("toYaml", to_yaml);
            t.add_func("nindent", nindent);
            t.parse(std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let out = t
                .render(&Context::from(to_g(&context)))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                !out.contains("<no value>"),
                "{name} used a value that is not set:\n{out}"
            );
            docs.extend(yaml_docs(&out));
        }
        docs
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
        docs.iter().map(|d| (key(d), numbers_as_f64(d))).collect()
    }

    #[test]
    fn chart_defaults_render_what_kustomize_renders() {
        let Some(kustomized) = kustomize(&format!("{ROOT}/deploy")) else {
            return;
        };
        let rendered = render(json!({}));
        assert_typed(&rendered);
        let want = by_key(
            &kustomized
                .into_iter()
                .filter(|d| d["kind"] != "CustomResourceDefinition")
                .collect::<Vec<_>>(),
        );
        let got = by_key(&rendered);
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
            "namespace": {"create": false},
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
            "metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "kube-prometheus"}}},
        }));
        let find = |kind: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind)
                .unwrap_or_else(|| panic!("{kind} missing"))
        };
        for absent in [
            "Namespace",
            "Service",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert!(docs.iter().all(|d| d["kind"] != absent), "{absent} should be off");
        }
        let ctl = &find("Deployment")["spec"]["template"]["spec"];
        let c = &ctl["containers"][0];
        assert_eq!(c["image"], "registry.example.org/nixroll:dev");
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
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
        let agent = &find("DaemonSet")["spec"]["template"]["spec"];
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
        let sm = find("ServiceMonitor");
        assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus");
        assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
        let typed: Vec<Value> = docs
            .iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .cloned()
            .collect();
        assert_typed(&typed);
    }
}
