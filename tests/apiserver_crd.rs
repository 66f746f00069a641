//! nixroll's CRD as the embedded API server serves it, through the real `kube::Client` and
//! `kubectl`: defaults, validation messages, unknown fields pruned or refused, printer columns,
//! `kubectl explain`, and the simulated cluster's pods and events as kubectl prints them. The
//! server's own behaviour is tested in `crates/embedded-apiserver/tests/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nixroll::api::NixOSNode;
use std::path::Path;

use embedded_apiserver::kubectl::Kubectl;
use embedded_apiserver::{ApiServer, StoreOptions};
use serde_json::{Value, json};

async fn start() -> (ApiServer, Client) {
    start_with(StoreOptions::default()).await
}

async fn start_with(opts: StoreOptions) -> (ApiServer, Client) {
    let srv = ApiServer::start_with("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let client = srv.client().await.unwrap();
    (srv, client)
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &nixroll::api::crd())
        .await
        .unwrap();
}

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn nxn(name: &str) -> Value {
    json!({
        "apiVersion": "nixroll.io/v1alpha1",
        "kind": "NixOSNode",
        "metadata": {"name": name},
        "spec": {"flake": "github:example/infra", "revision": "0123456789abcdef0123456789abcdef01234567"}
    })
}

fn kubectl() -> Option<String> {
    Kubectl::find().map(|p| p.display().to_string())
}

fn run(kubectl: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out) = run_status(kubectl, kubeconfig, args, stdin);
    assert!(ok, "kubectl {args:?} failed:\n{out}");
    out
}

fn run_status(kubectl: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let out = Kubectl::new(kubectl, kubeconfig).run(args, stdin).unwrap();
    (out.ok, out.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_it() {
    let Some(kubectl) = kubectl_for("kubectl_works_against_it") else {
        return;
    };
    let (srv, client) = start().await;
    install_crd(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&kc).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-1",
                "labels": {"node-role.kubernetes.io/control-plane": "true"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}],
                           "nodeInfo": {"bootID": "b1", "kubeletVersion": "v1.33.1+k3s1",
                             "machineID": "m", "systemUUID": "s", "kernelVersion": "6.6", "osImage": "NixOS",
                             "containerRuntimeVersion": "containerd://2", "kubeProxyVersion": "v1.33.1",
                             "operatingSystem": "linux", "architecture": "amd64"}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let k = kubectl.clone();
    let kc2 = kc.clone();
    let manifest = "apiVersion: nixroll.io/v1alpha1\nkind: NixOSNode\nmetadata:\n  name: node-1\nspec:\n  flake: github:example/infra\n  revision: 0123456789abcdef0123456789abcdef01234567\n";
    let outputs = tokio::task::spawn_blocking(move || {
        let apply = run(&k, &kc2, &["apply", "-f", "-"], Some(manifest));
        let apply2 = run(&k, &kc2, &["apply", "-f", "-"], Some(manifest));
        let get_nodes = run(&k, &kc2, &["get", "nodes"], None);
        let bad = manifest.replace("0123456789abcdef0123456789abcdef01234567", "main");
        let (bad_ok, bad_out) = run_status(&k, &kc2, &["apply", "-f", "-"], Some(&bad));
        assert!(!bad_ok, "{bad_out}");
        let typo = manifest.replace("spec:\n", "spec:\n  bogus: 1\n");
        let (typo_ok, typo_out) = run_status(&k, &kc2, &["apply", "-f", "-"], Some(&typo));
        assert!(!typo_ok, "{typo_out}");
        assert!(typo_out.contains("unknown field \"spec.bogus\""), "{typo_out}");
        assert!(
            bad_out.contains("spec.revision: Invalid value: \"main\": revision must be a full 40-character"),
            "{bad_out}"
        );
        (apply, apply2, get_nodes)
    })
    .await
    .unwrap();
    assert!(
        outputs.0.contains("nixosnode.nixroll.io/node-1 created"),
        "{}",
        outputs.0
    );
    assert!(outputs.1.contains("unchanged"), "{}", outputs.1);
    assert!(outputs.2.contains("node-1"), "{}", outputs.2);
    assert!(outputs.2.contains("Ready"), "{}", outputs.2);
    assert!(outputs.2.contains("control-plane"), "{}", outputs.2);
    assert!(outputs.2.contains("v1.33.1+k3s1"), "{}", outputs.2);

    let api: Api<NixOSNode> = Api::all(client.clone());
    api.patch_status(
        "node-1",
        &PatchParams::apply("nixroll-controller"),
        &Patch::Apply(json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
            "metadata": {"name": "node-1"}, "status": {"phase": "Waiting", "wanted": "0123456"}})),
    )
    .await
    .unwrap();
    let k = kubectl.clone();
    let (get, yaml, describe) = tokio::task::spawn_blocking(move || {
        (
            run(&k, &kc, &["get", "nixosnodes"], None),
            run(&k, &kc, &["get", "nxn", "node-1", "-o", "yaml"], None),
            run(&k, &kc, &["describe", "nixosnode", "node-1"], None),
        )
    })
    .await
    .unwrap();
    let header = get.lines().next().unwrap();
    for col in ["NAME", "WANTED", "RUNNING", "PHASE", "AGE"] {
        assert!(header.contains(col), "{get}");
    }
    assert!(get.contains("Waiting") && get.contains("0123456"), "{get}");
    assert!(
        yaml.contains("revision: 0123456789abcdef0123456789abcdef01234567"),
        "{yaml}"
    );
    assert!(yaml.contains("phase: Waiting"), "{yaml}");
    assert!(
        yaml.contains("reboot: IfNeeded"),
        "schema default applied: {yaml}"
    );
    assert!(
        describe.contains("Name:") && describe.contains("node-1"),
        "{describe}"
    );
    assert!(describe.contains("Waiting"), "{describe}");
}

#[tokio::test]
async fn custom_resources_are_defaulted_and_validated_from_the_crd_schema() {
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<NixOSNode> = Api::all(client.clone());
    let dynamic: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kube::api::ApiResource::erase::<NixOSNode>(&()));
    let mut bad = nxn("v");
    bad["spec"]["flake"] = json!("github:o/r?rev=abc");
    bad["spec"]["reboot"] = json!("Sometimes");
    let e = api_err(
        dynamic
            .create(&PostParams::default(), &serde_json::from_value(bad).unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.starts_with("NixOSNode.nixroll.io \"v\" is invalid: ["),
        "{}",
        e.message
    );
    assert!(e.message.contains("spec.flake"), "{}", e.message);
    assert!(
        e.message
            .contains("spec.reboot: Unsupported value: \"Sometimes\""),
        "{}",
        e.message
    );
    let ok = api
        .patch("v", &PatchParams::apply("flux"), &Patch::Apply(nxn("v")))
        .await
        .unwrap();
    let raw = serde_json::to_value(&ok).unwrap();
    assert_eq!(raw["spec"]["reboot"], "IfNeeded");
    // Unknown fields are pruned (kubectl's fieldValidation=Strict makes them an error, below).
    let mut extra = nxn("w");
    extra["spec"]["bogus"] = json!(1);
    extra["status"] = json!({"phase": "Waiting", "agent": {"nope": true}});
    let created = dynamic
        .create(&PostParams::default(), &serde_json::from_value(extra).unwrap())
        .await
        .unwrap();
    assert!(created.data["spec"].get("bogus").is_none(), "{:?}", created.data);
}

/// kubectl for the tests of what a kubectl user sees: absent in CI is a failure, elsewhere a
/// skip with the reason printed.
fn kubectl_for(test: &str) -> Option<String> {
    let k = kubectl();
    if k.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: kubectl is not installed (CI must have it)"
        );
        eprintln!("SKIPPED {test}: kubectl not installed");
    }
    k
}

/// kubectl's exit status, stdout and stderr (warnings go to stderr).
fn kubectl_run(
    kubectl: &str,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let out = Kubectl::new(kubectl, kubeconfig).run(args, stdin).unwrap();
    (out.ok, out.stdout, out.stderr)
}

async fn kubectl_setup(test: &str) -> Option<(ApiServer, Client, String, tempfile::TempDir)> {
    let kubectl = kubectl_for(test)?;
    let (srv, client) = start().await;
    install_crd(&client).await;
    let dir = tempfile::tempdir().unwrap();
    srv.write_kubeconfig(&dir.path().join("kubeconfig")).unwrap();
    Some((srv, client, kubectl, dir))
}

/// `kubectl explain` reads the served OpenAPI v3: the CRD's schema as
/// `io.nixroll.v1alpha1.NixOSNode` and the built-in kinds' schemas, each with its
/// `x-kubernetes-group-version-kind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_reads_the_served_openapi_schemas() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("kubectl_explain_reads_the_served_openapi_schemas").await
    else {
        return;
    };
    // The documents themselves, as kube-apiserver shapes them.
    let root: Value = serde_json::from_str(
        &client
            .request_text(http::Request::get("/openapi/v3").body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let url = root["paths"]["apis/nixroll.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(url.contains("?hash="), "{root}");
    let doc: Value = serde_json::from_str(
        &client
            .request_text(http::Request::get(&url).body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let node = &doc["components"]["schemas"]["io.nixroll.v1alpha1.NixOSNode"];
    assert_eq!(
        node["x-kubernetes-group-version-kind"],
        json!([{"group": "nixroll.io", "kind": "NixOSNode", "version": "v1alpha1"}]),
        "{node}"
    );
    assert_eq!(
        node["properties"]["metadata"]["allOf"][0]["$ref"],
        "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    );

    let kc = dir.path().join("kubeconfig");
    let out = tokio::task::spawn_blocking(move || {
        [
            kubectl_run(&k, &kc, &["explain", "nixosnode.spec"], None),
            kubectl_run(&k, &kc, &["explain", "nxn.status.backoff.attempts"], None),
            kubectl_run(&k, &kc, &["explain", "nixosnode.spec.maintenanceWindow"], None),
            kubectl_run(&k, &kc, &["explain", "pods.spec.containers"], None),
        ]
    })
    .await
    .unwrap();
    let [
        (ok, spec, err),
        (ok2, attempts, err2),
        (typo_ok, _, typo_err),
        (ok4, pods, err4),
    ] = out;
    assert!(ok, "{spec}{err}");
    assert!(spec.contains("GROUP:      nixroll.io"), "{spec}");
    assert!(spec.contains("KIND:       NixOSNode"), "{spec}");
    assert!(spec.contains("FIELD: spec <Object>"), "{spec}");
    assert!(spec.contains("revision\t<string>\n"), "{spec}");
    assert!(spec.contains("sourceRef\t<Object>"), "{spec}");
    assert!(spec.contains("maintenanceWindows\t<[]Object>"), "{spec}");
    assert!(spec.contains("enum: IfNeeded, Always, Never"), "{spec}");
    assert!(ok2, "{attempts}{err2}");
    assert!(attempts.contains("FIELD: attempts <integer>"), "{attempts}");
    assert!(!typo_ok);
    assert!(
        typo_err.contains("field \"maintenanceWindow\" does not exist"),
        "{typo_err}"
    );
    assert!(ok4, "{pods}{err4}");
    assert!(pods.contains("KIND:       Pod"), "{pods}");
    assert!(pods.contains("FIELD: containers <[]Container>"), "{pods}");
}

/// `kubectl get events` prints kube-apiserver's event columns, and `kubectl get pods` counts
/// the containers the simulated kubelets report ready and running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_events_and_pods_print_like_kube_apiserver() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("kubectl_get_events_and_pods_print_like_kube_apiserver").await
    else {
        return;
    };
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    events
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "node-1.1"},
                "involvedObject": {"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "name": "node-1"},
                "reason": "BootedWrongSystem", "type": "Warning",
                "message": "booted 0123456 instead of 89abcde",
                "source": {"component": "nixroll-controller"},
                "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
                "count": 3,
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    // Pods as the simulated kubelets run them.
    let cluster =
        nixroll::sim::cluster::SimCluster::new(client.clone(), nixroll::sim::cluster::Timing::default());
    cluster
        .create_nodes(&[("n1".to_owned(), false, "b1".to_owned())])
        .await
        .unwrap();
    let apps = [nixroll::sim::cluster::App {
        name: "web".into(),
        replicas: 2,
        min_available: None,
    }];
    let created = cluster.create_workloads(&["n1".to_owned()], &apps).await.unwrap();
    assert!(created >= 2);

    let kc = dir.path().join("kubeconfig");
    let out = tokio::task::spawn_blocking(move || {
        [
            kubectl_run(&k, &kc, &["get", "events"], None),
            kubectl_run(&k, &kc, &["get", "events", "-o", "wide"], None),
            kubectl_run(&k, &kc, &["get", "events.v1.events.k8s.io"], None),
            kubectl_run(&k, &kc, &["get", "pods", "-A"], None),
        ]
    })
    .await
    .unwrap();
    let [(ok, ev, e1), (ok2, wide, e2), (ok3, ev_v1, e3), (ok4, pods, e4)] = out;
    assert!(ok && ok2 && ok3 && ok4, "{e1}{e2}{e3}{e4}");
    for table in [&ev, &ev_v1] {
        let cols: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            cols,
            ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            "{table}"
        );
        let row = table.lines().nth(1).unwrap();
        for cell in [
            "Warning",
            "BootedWrongSystem",
            "nixosnode/node-1",
            "booted 0123456 instead of 89abcde",
        ] {
            assert!(row.contains(cell), "{table}");
        }
    }
    let header = wide.lines().next().unwrap();
    for col in ["SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"] {
        assert!(header.contains(col), "{wide}");
    }
    assert!(
        wide.contains("nixroll-controller") && wide.contains("node-1.1"),
        "{wide}"
    );

    let web: Vec<&str> = pods.lines().filter(|l| l.contains("web-")).collect();
    assert_eq!(web.len(), 2, "{pods}");
    for l in web.iter().chain(
        pods.lines()
            .filter(|l| l.contains("nixroll-agent"))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let cells: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(&cells[2..4], ["1/1", "Running"], "{pods}");
    }
}

/// A misspelled field, as kube-apiserver treats it: dropped from the object, a `Warning`
/// header per field with the default `fieldValidation` (Warn), a refusal with `Strict` (400 on
/// create and update, 422 on patches), silence with `Ignore`; server-side apply cannot build
/// the typed object (500); custom resources take no strategic merge patch (415).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_pruned_with_warnings_or_refused_like_kube_apiserver() {
    let Some((_srv, client, k, dir)) =
        kubectl_setup("unknown_fields_are_pruned_with_warnings_or_refused_like_kube_apiserver").await
    else {
        return;
    };
    let api: Api<NixOSNode> = Api::all(client.clone());
    let dynamic: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kube::api::ApiResource::erase::<NixOSNode>(&()));
    dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(nxn("node-2")).unwrap(),
        )
        .await
        .unwrap();
    let before = api.get("node-2").await.unwrap();

    // Strict patches (what `kubectl apply` sends): 422, the object untouched.
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let e = api_err(
        api.patch(
            "node-2",
            &strict,
            &Patch::Merge(json!({"spec": {"maintenanceWindow": {}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{e:?}");
    assert!(
        e.message
            .starts_with(" \"\" is invalid: patch: Invalid value: \"{")
            && e.message
                .ends_with("strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{}",
        e.message
    );

    let manifest = |meta: &str| {
        format!(
            "apiVersion: nixroll.io/v1alpha1\nkind: NixOSNode\nmetadata:\n  {meta}\nspec:\n  flake: github:example/infra\n  revision: 0123456789abcdef0123456789abcdef01234567\n  maintenanceWindow: {{}}\n"
        )
    };
    // Updates of custom resources name the resourceVersion they replace.
    let rv = before.metadata.resource_version.clone().unwrap();
    let (m2, m3, m4) = (
        manifest(&format!("name: node-2\n  resourceVersion: \"{rv}\"")),
        manifest("name: node-3"),
        manifest("name: node-4"),
    );
    let m2_stale = manifest("name: node-2\n  resourceVersion: \"1\"");
    let kc = dir.path().join("kubeconfig");
    let (k2, kc2) = (k.clone(), kc.clone());
    let out = tokio::task::spawn_blocking(move || {
        let patch = [
            "patch",
            "nixosnode",
            "node-2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"maintenanceWindow":{}}}"#,
        ];
        [
            // The issue's command: Warn by default.
            kubectl_run(&k, &kc, &patch, None),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "nixosnode",
                    "node-2",
                    "--type",
                    "json",
                    "-p",
                    r#"[{"op":"add","path":"/spec/maintenanceWindow","value":{}}]"#,
                ],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "nixosnode",
                    "node-2",
                    "--type",
                    "strategic",
                    "-p",
                    r#"{"spec":{"maintenanceWindow":{}}}"#,
                ],
                None,
            ),
            // Create: Strict (kubectl's default), Warn, Ignore.
            kubectl_run(&k, &kc, &["create", "-f", "-"], Some(&m3)),
            kubectl_run(&k, &kc, &["create", "--validate=warn", "-f", "-"], Some(&m3)),
            kubectl_run(&k, &kc, &["create", "--validate=false", "-f", "-"], Some(&m4)),
            // Update (PUT): Strict and Warn.
            kubectl_run(&k, &kc, &["replace", "-f", "-"], Some(&m2)),
            kubectl_run(&k, &kc, &["replace", "--validate=warn", "-f", "-"], Some(&m2)),
            // Decoding comes before the resourceVersion precondition.
            kubectl_run(&k, &kc, &["replace", "-f", "-"], Some(&m2_stale)),
            // Server-side apply.
            kubectl_run(&k, &kc, &["apply", "--server-side", "-f", "-"], Some(&m2)),
            // Built-in kinds: unknown metadata fields.
            kubectl_run(&k, &kc, &["create", "configmap", "c"], None),
            kubectl_run(
                &k,
                &kc,
                &[
                    "patch",
                    "configmap",
                    "c",
                    "-p",
                    r#"{"metadata":{"labls":{"a":"b"}}}"#,
                ],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &["patch", "configmap", "c", "-p", r#"{"dat":{"a":"b"}}"#],
                None,
            ),
            kubectl_run(
                &k,
                &kc,
                &["create", "-f", "-"],
                Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: d\ndat:\n  a: b\n"),
            ),
        ]
    })
    .await
    .unwrap();
    let [
        merge,
        json_p,
        strategic,
        create_strict,
        create_warn,
        create_ignore,
        replace_strict,
        replace_warn,
        replace_stale,
        ssa,
        _cm,
        cm_patch,
        cm_patch2,
        cm_strict,
    ] = out;
    let warning = "Warning: unknown field \"spec.maintenanceWindow\"";
    for (name, (ok, stdout, stderr)) in [("merge", &merge), ("json", &json_p)] {
        assert!(ok, "{name}: {stdout}{stderr}");
        assert_eq!(
            stdout.trim(),
            "nixosnode.nixroll.io/node-2 patched (no change)",
            "{name}: {stderr}"
        );
        assert!(stderr.contains(warning), "{name}: {stderr}");
    }
    assert!(!strategic.0, "{strategic:?}");
    assert!(
        strategic
            .2
            .contains("application/strategic-merge-patch+json is not supported by nixroll.io/v1alpha1, Kind=NixOSNode: the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"),
        "{strategic:?}"
    );
    assert!(!create_strict.0, "{create_strict:?}");
    assert!(
        create_strict.2.contains("Error from server (BadRequest): error when creating \"STDIN\": NixOSNode in version \"v1alpha1\" cannot be handled as a NixOSNode: strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{create_strict:?}"
    );
    assert!(
        create_warn.0 && create_warn.2.contains(warning),
        "{create_warn:?}"
    );
    assert!(
        create_ignore.0 && !create_ignore.2.contains("Warning"),
        "{create_ignore:?}"
    );
    assert!(!replace_strict.0, "{replace_strict:?}");
    assert!(
        replace_strict
            .2
            .contains("strict decoding error: unknown field \"spec.maintenanceWindow\""),
        "{replace_strict:?}"
    );
    assert!(
        replace_warn.0 && replace_warn.2.contains(warning),
        "{replace_warn:?}"
    );
    assert!(
        !replace_stale.0 && replace_stale.2.contains("strict decoding error"),
        "{replace_stale:?}"
    );
    assert!(!ssa.0, "{ssa:?}");
    assert!(
        ssa.2.contains("failed to create typed patch object (/node-2; nixroll.io/v1alpha1, Kind=NixOSNode): .spec.maintenanceWindow: field not declared in schema"),
        "{ssa:?}"
    );
    assert!(
        cm_patch.0 && cm_patch.2.contains("Warning: unknown field \"metadata.labls\""),
        "{cm_patch:?}"
    );
    assert!(
        cm_patch2.0 && cm_patch2.2.contains("Warning: unknown field \"dat\""),
        "{cm_patch2:?}"
    );
    assert!(
        cm_strict.2.contains("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: unknown field \"dat\""),
        "{cm_strict:?}"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    assert_eq!(cms.get("c").await.unwrap().metadata.labels, None);

    // Nothing of it was stored, and the patches that changed nothing did not bump the generation.
    for name in ["node-2", "node-3", "node-4"] {
        let raw = dynamic.get(name).await.unwrap();
        assert!(
            raw.data["spec"].get("maintenanceWindow").is_none(),
            "{name}: {:?}",
            raw.data
        );
    }
    let after = api.get("node-2").await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);

    // What nixroll itself installs passes Strict validation untouched (the CRD is pruned by
    // the built-in CustomResourceDefinition schema like any other object).
    let crd_yaml = nixroll::api::crd_yaml().unwrap();
    let (_, _, crd_strict) = tokio::task::spawn_blocking(move || {
        (
            kubectl_run(&k2, &kc2, &["delete", "crd", "nixosnodes.nixroll.io"], None),
            kubectl_run(&k2, &kc2, &["create", "-f", "-"], Some(&crd_yaml)),
            kubectl_run(
                &k2,
                &kc2,
                &["get", "crd", "nixosnodes.nixroll.io", "-o", "json"],
                None,
            ),
        )
    })
    .await
    .unwrap();
    assert!(
        crd_strict.0 && !crd_strict.2.contains("Warning"),
        "{crd_strict:?}"
    );
    let stored: CustomResourceDefinition = serde_json::from_str(&crd_strict.1).unwrap();
    assert_eq!(stored.spec, nixroll::api::crd().spec);
}
