//! Shared fixtures: a started server and client, the `Machine` CRD, objects and kubectl.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::path::Path;

use embedded_apiserver::kubectl::Kubectl;
use embedded_apiserver::{ApiServer, StoreOptions};
use serde_json::{Value, json};

pub(crate) const T: Duration = Duration::from_secs(10);

/// The typed view of `fixtures/machine-crd.yaml` (its schema is the fixture's, not derived).
#[derive(kube::CustomResource, serde::Deserialize, serde::Serialize, Clone, Debug)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "Machine",
    status = "MachineStatus",
    schema = "disabled"
)]
pub struct MachineSpec {
    pub image: String,
    pub revision: String,
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub suspend: bool,
}

#[derive(serde::Deserialize, serde::Serialize, Clone, Debug, Default)]
pub struct MachineStatus {
    pub phase: Option<String>,
    pub message: Option<String>,
    pub wanted: Option<String>,
    pub agent: Option<AgentStatus>,
}

#[derive(serde::Deserialize, serde::Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub boot_id: Option<String>,
}

pub(crate) async fn start() -> (ApiServer, Client) {
    start_with(StoreOptions::default()).await
}

pub(crate) async fn start_with(opts: StoreOptions) -> (ApiServer, Client) {
    let srv = ApiServer::start_with("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let client = srv.client().await.unwrap();
    (srv, client)
}

pub(crate) async fn install_crd(client: &Client) {
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(include_str!("../fixtures/machine-crd.yaml")).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
}

pub(crate) fn machine(name: &str) -> Value {
    json!({
        "apiVersion": "example.com/v1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {"image": "registry.example.com/os", "revision": "0123456789abcdef0123456789abcdef01234567"}
    })
}

pub(crate) fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Creates a bare Node `name` and returns the Nodes API.
pub(crate) async fn create_node(client: &Client, name: &str) -> Api<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
    nodes
}

pub(crate) fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"}
    }))
    .unwrap()
}

pub(crate) fn pod(name: &str, node: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap()
}

pub(crate) async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let st = if ready { "True" } else { "False" };
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": st}]}}),
        ),
    )
    .await
    .unwrap();
}

pub(crate) fn kubectl() -> Option<String> {
    Kubectl::find().map(|p| p.display().to_string())
}

/// kubectl for `test`: absent under `CI=true` fails the test, elsewhere it is skipped with the
/// reason printed (like `tests/common/mod.rs` `require` in the nixroll package).
pub(crate) fn kubectl_or_skip(test: &str) -> Option<String> {
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

pub(crate) fn run(kubectl: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out) = run_status(kubectl, kubeconfig, args, stdin);
    assert!(ok, "kubectl {args:?} failed:\n{out}");
    out
}

pub(crate) fn run_status(
    kubectl: &str,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String) {
    let out = Kubectl::new(kubectl, kubeconfig).run(args, stdin).unwrap();
    (out.ok, out.text())
}
