//! The install manifests and the CRDs on the real server: accepted, established, with margin
//! under the CEL cost budget; bad manifests refused with the message a user reads; every
//! example accepted.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::plane::{ROOT, kubectl, kubectl_ok, plane};

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

/// `kubectl apply -k deploy/` is accepted in full (the plane's install did it; applying it
/// again changes nothing), both CRDs are Established, and every other copy of the CRDs —
/// `crds/`, the chart's `crds/`, and what `nixroll crd` prints — is accepted too.
#[tokio::test]
async fn deploy_is_accepted_in_full_and_every_crd_copy_with_it() {
    let Some(plane) = plane() else { return };
    let again = kubectl_ok(plane, &["apply", "-k", "deploy/"]);
    for line in again.lines() {
        assert!(
            line.ends_with(" unchanged") || line.ends_with(" configured"),
            "a second `kubectl apply -k deploy/` must change nothing, got: {line}"
        );
    }
    let crds: Api<CustomResourceDefinition> = Api::all(plane.admin_client().await.unwrap());
    for name in ["nixosnodes.nixroll.io", "flakesources.nixroll.io"] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
    for dir in ["crds/", "charts/nixroll/crds/"] {
        kubectl_ok(plane, &["apply", "--dry-run=server", "-f", dir]);
    }
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_nixroll"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(printed.status.success());
    let file = plane.dir().join("nixroll-crd.yaml");
    std::fs::write(&file, &printed.stdout).unwrap();
    kubectl_ok(
        plane,
        &["apply", "--dry-run=server", "-f", file.to_str().unwrap()],
    );
}

/// Multiply every `maxItems`, `maxLength` and `maxProperties` by `k`.
fn scale_bounds(v: &mut Value, k: u64) {
    match v {
        Value::Object(m) => {
            for key in ["maxItems", "maxLength", "maxProperties"] {
                if let Some(n) = m.get(key).and_then(Value::as_u64) {
                    m.insert(key.into(), json!(n.saturating_mul(k)));
                }
            }
            m.values_mut().for_each(|c| scale_bounds(c, k));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| scale_bounds(c, k)),
        _ => {}
    }
}

/// `crd` under another group (so it does not collide with the installed one) with its bounds
/// multiplied by `k`; `Ok` when the server accepts it (dry run), else its message.
async fn accepted_scaled(
    crds: &Api<CustomResourceDefinition>,
    crd: &CustomResourceDefinition,
    k: u64,
) -> Result<(), String> {
    let mut v = serde_json::to_value(crd).unwrap();
    let group = format!("margin{k}.nixroll.io");
    let plural = v["spec"]["names"]["plural"].as_str().unwrap().to_owned();
    v["metadata"] = json!({"name": format!("{plural}.{group}")});
    v["spec"]["group"] = json!(group);
    scale_bounds(&mut v["spec"]["versions"], k);
    let scaled: CustomResourceDefinition = serde_json::from_value(v).unwrap();
    match crds.create(&dry_run(), &scaled).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s.message),
        Err(e) => panic!("{e}"),
    }
}

/// Each CRD's estimated CEL cost stays well under kube-apiserver's budget: the server still
/// accepts it with every bound (`maxItems`, `maxLength`, `maxProperties`) doubled. A rule's
/// estimate grows with the product of the bounds it sits under (the costliest,
/// `spec.secrets[].restartUnits`, under three: 64 files × 16 units × 256 characters), so
/// doubling them all multiplies it by up to 8: today's estimate is at most an eighth of the
/// budget, and the next field will not tip it over. The margin found is printed
/// (`--nocapture`).
#[tokio::test]
async fn crds_are_accepted_with_margin_under_the_cel_cost_budget() {
    let Some(plane) = plane() else { return };
    let crds: Api<CustomResourceDefinition> = Api::all(plane.admin_client().await.unwrap());
    for crd in [
        nixroll::api::crd(),
        nixroll::api::flakesource_crd(),
        nixroll::api::nixospool_crd(),
    ] {
        let name = crd.metadata.name.clone().unwrap();
        let mut largest = None;
        let mut refused = None;
        for k in [1u64, 2, 4, 8, 16, 32, 64, 128] {
            match accepted_scaled(&crds, &crd, k).await {
                Ok(()) => largest = Some(k),
                Err(m) => {
                    refused = Some((k, m));
                    break;
                }
            }
        }
        eprintln!(
            "{name}: accepted with bounds x{}, {}",
            largest.unwrap_or(0),
            match &refused {
                Some((k, m)) => format!("refused at x{k}: {}", m.chars().take(200).collect::<String>()),
                None => "never refused up to x128".into(),
            }
        );
        assert!(
            largest >= Some(2),
            "{name}: too little CEL cost margin: {refused:?}"
        );
    }
}

fn example() -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("examples/nixosnode.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn set(mut obj: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut obj;
    for p in &path[..path.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    cur[path[path.len() - 1]] = value;
    obj
}

fn secret(path: &str) -> Value {
    json!({"secretRef": {"name": "k3s-token", "key": "token"}, "path": path})
}

fn api_for(client: kube::Client, kind: &str, namespaced: bool) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("nixroll.io", "v1alpha1", kind);
    let ar = ApiResource::from_gvk(&gvk);
    if namespaced {
        Api::namespaced_with(client, "nixroll-system", &ar)
    } else {
        Api::all_with(client, &ar)
    }
}

/// What the server answers to creating `obj` (dry run): `Ok`, or the message.
async fn create(api: &Api<DynamicObject>, obj: &Value) -> Result<(), String> {
    let o: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    match api.create(&dry_run(), &o).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}: {}", s.code, s.reason, s.message)),
        Err(e) => panic!("{e}"),
    }
}

/// Every invalid NixOSNode and FlakeSource the CRDs should refuse is refused by the real
/// server (422 Invalid), with the message that says what to fix.
#[tokio::test]
async fn bad_manifests_are_refused_with_the_message_users_read() {
    let Some(plane) = plane() else { return };
    let client = plane.admin_client().await.unwrap();
    let nodes = api_for(client.clone(), "NixOSNode", false);
    let mut following = example();
    following["spec"].as_object_mut().unwrap().remove("revision");
    following["spec"]["sourceRef"] =
        json!({"kind": "GitRepository", "name": "infra", "namespace": "flux-system"});
    let mut no_flake = following.clone();
    no_flake["spec"].as_object_mut().unwrap().remove("flake");
    let mut neither = example();
    neither["spec"].as_object_mut().unwrap().remove("revision");
    let e = example;
    let cases: Vec<(Value, &str)> = vec![
        (set(e(), &["spec", "revision"], json!("main")), "40-character"),
        (
            set(
                e(),
                &["spec", "revision"],
                json!("0123456789ABCDEF0123456789ABCDEF01234567"),
            ),
            "lowercase hex",
        ),
        (
            set(
                e(),
                &["spec", "flake"],
                json!("git+https://example.org/x.git?rev=abc"),
            ),
            "without revision",
        ),
        (
            set(e(), &["spec", "flake"], json!("https://example.org/x.git")),
            "flake reference",
        ),
        (
            set(e(), &["spec", "configuration"], json!("a b")),
            "attribute name",
        ),
        (
            set(e(), &["spec", "maintenanceWindows", "0", "start"], json!("25:00")),
            "HH:MM",
        ),
        (
            set(e(), &["spec", "maintenanceWindows", "0", "end"], json!("22:00")),
            "start != end",
        ),
        (
            set(
                e(),
                &["spec", "maintenanceWindows", "0", "timeZone"],
                json!("CEST+2"),
            ),
            "IANA",
        ),
        (
            set(e(), &["spec", "drain", "timeout"], json!("ten minutes")),
            "duration",
        ),
        (
            set(e(), &["spec", "reboot"], json!("Sometimes")),
            "Unsupported value",
        ),
        (
            set(e(), &["spec", "secrets"], json!([secret("relative/path")])),
            "absolute",
        ),
        (
            set(e(), &["spec", "secrets"], json!([secret("/etc/../root/x")])),
            "`..`",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([secret("/nix/store/abc-secret")]),
            ),
            "outside /nix",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([secret("/etc/a"), secret("/etc/a")]),
            ),
            "Duplicate value",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "mode": "0800"}]),
            ),
            "octal",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "owner": "root"}]),
            ),
            "USER:GROUP",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "restartUnits": ["--now"]}]),
            ),
            "unit names",
        ),
        (
            set(
                e(),
                &["spec", "secrets"],
                json!([{"secretRef": {"name": "Bad_Name", "key": "k"}, "path": "/etc/x"}]),
            ),
            "secretRef.name",
        ),
        (
            set(
                following.clone(),
                &["spec", "revision"],
                json!("0123456789abcdef0123456789abcdef01234567"),
            ),
            "exactly one of revision",
        ),
        (neither, "exactly one of revision"),
        (no_flake, "flake is required"),
    ];
    for (obj, want) in cases {
        let got = create(&nodes, &obj).await;
        match got {
            Err(m) => assert!(
                m.starts_with("422 Invalid") && m.contains(want),
                "want a 422 containing {want:?} for {}, got {m}",
                obj["spec"]
            ),
            Ok(()) => panic!("accepted, but should be refused with {want:?}: {}", obj["spec"]),
        }
    }

    let sources = api_for(client, "FlakeSource", true);
    let source = |spec: Value| {
        json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
               "metadata": {"name": "infra", "namespace": "nixroll-system"}, "spec": spec})
    };
    let cases = [
        (
            json!({"url": "http://h/r", "ref": {"branch": "main"}}),
            "insecure: true",
        ),
        (
            json!({"url": "https://bot:tok@h/r", "ref": {"branch": "main"}}),
            "password or token",
        ),
        (
            json!({"url": "git@h:r.git", "ref": {"branch": "main"}}),
            "ssh://user@host/path",
        ),
        (
            json!({"url": "https://h/r", "ref": {"branch": "a", "tag": "b"}}),
            "exactly one of branch",
        ),
        (
            json!({"url": "https://h/r", "ref": {"name": "main"}}),
            "starting with refs/",
        ),
        (
            json!({"url": "https://h/r", "ref": {"branch": "main"}, "interval": "10s"}),
            "at least 30s",
        ),
    ];
    for (spec, want) in cases {
        match create(&sources, &source(spec.clone())).await {
            Err(m) => assert!(
                m.starts_with("422 Invalid") && m.contains(want),
                "{spec}: want {want:?}, got {m}"
            ),
            Ok(()) => panic!("{spec}: accepted, should be refused with {want:?}"),
        }
    }
}

/// Every NixOSNode, FlakeSource and NixOSPool under examples/ (kustomize-rendered where a
/// kustomization.yaml says so) is accepted by the real server, with no warning.
#[tokio::test]
async fn every_example_is_accepted() {
    let Some(plane) = plane() else { return };
    let mut docs: Vec<(String, Value)> = Vec::new();
    collect_examples(plane, &Path::new(ROOT).join("examples"), &mut docs);
    let client = plane.admin_client().await.unwrap();
    let mut checked = 0;
    for (from, doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        if kind != "NixOSNode" && kind != "FlakeSource" && kind != "NixOSPool" {
            continue;
        }
        let api = api_for(client.clone(), &kind, kind == "FlakeSource");
        create(&api, &doc)
            .await
            .unwrap_or_else(|m| panic!("{from}: {kind} {} refused: {m}", doc["metadata"]["name"]));
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} examples found");
    // kubectl shows warnings (unknown fields, deprecated APIs) on stderr.
    let out = kubectl(
        plane,
        &[
            "apply",
            "--dry-run=server",
            "-f",
            "examples/nixosnode.yaml",
            "-f",
            "examples/following.yaml",
            "-f",
            "examples/pools.yaml",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("Warning:") && !l.contains("version difference"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

fn collect_examples(
    plane: &nixroll::sim::controlplane::ControlPlane,
    dir: &Path,
    out: &mut Vec<(String, Value)>,
) {
    if dir.join("kustomization.yaml").exists() {
        let text = kubectl_ok(plane, &["kustomize", dir.to_str().unwrap()]);
        out.extend(
            yaml_docs(&text)
                .into_iter()
                .map(|d| (dir.display().to_string(), d)),
        );
        return;
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            collect_examples(plane, &p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.extend(yaml_docs(&text).into_iter().map(|d| (p.display().to_string(), d)));
        }
    }
}

fn yaml_docs(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter_map(|d| serde_saphyr::from_str::<Value>(d).ok())
        .filter(|d| d.is_object())
        .collect()
}
