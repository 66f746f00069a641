//! The embedded API server held to the real one: the same scripted requests — create, get,
//! list with selectors, merge/JSON/strategic/apply patches, the status subresource, unknown
//! fields, CEL failures, defaulting, optimistic concurrency, eviction against a
//! PodDisruptionBudget, watch, and their 404/409/415/422/429 answers — sent to both, the
//! answers compared (status code, reason, and the fields nixroll, the demo and kubectl read).
//! Every difference fails the test unless it is listed in [`KNOWN`] with what it means for
//! nixroll; that list is also in crates/embedded-apiserver/README.md.

use std::collections::BTreeMap;

use kube::Client;
use serde_json::{Value, json};

use crate::plane::{CLUSTER, plane};

/// Differences the embedded API keeps, by step, with why they do not matter to nixroll, the
/// demo or kubectl. (Empty: every difference found was fixed or is listed here.)
const KNOWN: &[(&str, &str)] = &[
    ("delete the pruned one", "the same as `delete`"),
    (
        "delete",
        "kube-apiserver answers a DELETE that removes a custom resource at once with a Status \
     (`Success`), the embedded one with the deleted object; kube's `Api::delete` returns \
     `Either<K, Status>` for exactly this, and kubectl prints `deleted` for both",
    ),
];

/// One request: name, method, path, content type, body.
struct Step {
    name: &'static str,
    method: &'static str,
    path: String,
    content_type: &'static str,
    body: Option<Value>,
    /// JSON pointers of the answer's fields to compare (besides code and reason).
    fields: &'static [&'static str],
}

fn step(name: &'static str, method: &'static str, path: &str) -> Step {
    Step {
        name,
        method,
        path: path.to_owned(),
        content_type: "application/json",
        body: None,
        fields: &[],
    }
}

impl Step {
    fn body(mut self, content_type: &'static str, body: Value) -> Step {
        self.content_type = content_type;
        self.body = Some(body);
        self
    }
    fn compare(mut self, fields: &'static [&'static str]) -> Step {
        self.fields = fields;
        self
    }
}

const NN: &str = "/apis/nixroll.io/v1alpha1/nixosnodes";
const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn node(name: &str, extra: Value) -> Value {
    let mut spec = json!({"flake": "github:example/infra", "revision": REV});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": name, "labels": {"pool": "a"}}, "spec": spec})
}

fn script() -> Vec<Step> {
    let cm = "/api/v1/namespaces/diff/configmaps";
    vec![
        step("create namespace", "POST", "/api/v1/namespaces")
            .body("application/json", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "diff"}})),
        step("create", "POST", NN)
            .body("application/json", node("diff-1", json!({})))
            .compare(&["/spec", "/metadata/name", "/metadata/generation"]),
        step("create again", "POST", NN).body("application/json", node("diff-1", json!({}))),
        step("get", "GET", &format!("{NN}/diff-1")).compare(&["/spec", "/metadata/labels"]),
        step("get missing", "GET", &format!("{NN}/nope")),
        step("CEL failure", "POST", NN).body("application/json", node("diff-2", json!({"revision": "main"}))),
        step("enum failure", "POST", NN).body("application/json", node("diff-2", json!({"reboot": "Sometimes"}))),
        step("list-map duplicate", "POST", NN).body(
            "application/json",
            node(
                "diff-2",
                json!({"secrets": [{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/a"},
                                   {"secretRef": {"name": "s", "key": "k"}, "path": "/etc/a"}]}),
            ),
        ),
        step("unknown field, strict", "POST", &format!("{NN}?fieldValidation=Strict"))
            .body("application/json", node("diff-3", json!({"colour": "blue"}))),
        step("unknown field, pruned", "POST", &format!("{NN}?fieldValidation=Ignore"))
            .body("application/json", node("diff-3", json!({"colour": "blue"})))
            .compare(&["/spec"]),
        step("list by label", "GET", &format!("{NN}?labelSelector=pool%3Da")).compare(&["/kind"]),
        step("list by name", "GET", &format!("{NN}?fieldSelector=metadata.name%3Ddiff-1")).compare(&["/kind"]),
        step("merge patch", "PATCH", &format!("{NN}/diff-1"))
            .body("application/merge-patch+json", json!({"spec": {"suspend": true}}))
            .compare(&["/spec/suspend", "/metadata/generation"]),
        step("json patch", "PATCH", &format!("{NN}/diff-1"))
            .body("application/json-patch+json", json!([{"op": "replace", "path": "/spec/suspend", "value": false}]))
            .compare(&["/spec/suspend"]),
        step("json patch test fails", "PATCH", &format!("{NN}/diff-1"))
            .body("application/json-patch+json", json!([{"op": "test", "path": "/spec/suspend", "value": true}])),
        step("strategic patch of a custom resource", "PATCH", &format!("{NN}/diff-1"))
            .body("application/strategic-merge-patch+json", json!({"spec": {"suspend": true}})),
        step("apply", "PATCH", &format!("{NN}/diff-1?fieldManager=gitops&force=true"))
            .body("application/apply-patch+yaml", node("diff-1", json!({"configuration": "host-a"})))
            .compare(&["/spec/configuration"]),
        step("apply conflict", "PATCH", &format!("{NN}/diff-1?fieldManager=other"))
            .body("application/apply-patch+yaml", node("diff-1", json!({"configuration": "host-b"}))),
        step("apply without field manager", "PATCH", &format!("{NN}/diff-1"))
            .body("application/apply-patch+yaml", node("diff-1", json!({}))),
        step("status apply", "PATCH", &format!("{NN}/diff-1/status?fieldManager=nixroll-controller&force=true"))
            .body(
                "application/apply-patch+yaml",
                json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": "diff-1"},
                       "spec": {"suspend": true}, "status": {"phase": "Waiting"}}),
            )
            .compare(&["/status/phase", "/spec/suspend"]),
        step("stale update", "PUT", &format!("{NN}/diff-1"))
            .body("application/json", {
                let mut n = node("diff-1", json!({}));
                n["metadata"]["resourceVersion"] = json!("1");
                n
            }),
        step("configmap", "POST", cm).body(
            "application/json",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}),
        ),
        step("strategic patch of a configmap", "PATCH", &format!("{cm}/c"))
            .body("application/strategic-merge-patch+json", json!({"data": {"b": "2"}}))
            .compare(&["/data"]),
        step("pod", "POST", "/api/v1/namespaces/diff/pods").body(
            "application/json",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"app": "p"}},
                   "spec": {"containers": [{"name": "c", "image": "c"}]}}),
        ),
        step("pdb", "POST", "/apis/policy/v1/namespaces/diff/poddisruptionbudgets").body(
            "application/json",
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "p"},
                   "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "p"}}}}),
        ),
        step("pod running and ready", "PATCH", "/api/v1/namespaces/diff/pods/p/status").body(
            "application/merge-patch+json",
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
        step("eviction refused by the budget", "POST", "/api/v1/namespaces/diff/pods/p/eviction").body(
            "application/json",
            json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p", "namespace": "diff"}}),
        ),
        step("eviction of a missing pod", "POST", "/api/v1/namespaces/diff/pods/q/eviction").body(
            "application/json",
            json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "q", "namespace": "diff"}}),
        ),
        step("watch", "GET", &format!("{NN}?watch=true&fieldSelector=metadata.name%3Ddiff-1&timeoutSeconds=1")),
        step("delete", "DELETE", &format!("{NN}/diff-1")).compare(&["/metadata/name"]),
        step("delete again", "DELETE", &format!("{NN}/diff-1")),
        step("delete the pruned one", "DELETE", &format!("{NN}/diff-3")),
        step("delete namespace", "DELETE", "/api/v1/namespaces/diff"),
    ]
}

/// What one server answered to one step.
#[derive(Debug, PartialEq)]
struct Answer {
    code: u16,
    reason: String,
    fields: BTreeMap<String, Value>,
}

async fn send(client: &Client, s: &Step) -> Answer {
    let body = s
        .body
        .as_ref()
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let req = http::Request::builder()
        .method(s.method)
        .uri(&s.path)
        .header("content-type", s.content_type)
        .body(body)
        .unwrap();
    match client.request_text(req).await {
        Ok(text) => {
            let v: Value = if s.path.contains("watch=true") {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::Null)
            };
            Answer {
                code: 200,
                reason: String::new(),
                fields: s
                    .fields
                    .iter()
                    .map(|p| (p.to_string(), v.pointer(p).cloned().unwrap_or(Value::Null)))
                    .collect(),
            }
        }
        Err(kube::Error::Api(st)) => Answer {
            code: st.code,
            reason: st.reason.clone(),
            fields: BTreeMap::new(),
        },
        Err(e) => panic!("{}: {e}", s.name),
    }
}

/// Wait (bounded) until the PodDisruptionBudget's status counts the ready pod: on the real
/// server the disruption controller computes it, asynchronously.
async fn budget_observed(client: &Client) {
    let api: kube::Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        kube::Api::namespaced(client.clone(), "diff");
    for _ in 0..150 {
        let pdb = api.get("p").await.unwrap();
        let st = pdb.status.unwrap_or_default();
        if st.observed_generation == pdb.metadata.generation && st.current_healthy == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the PodDisruptionBudget's status never counted the ready pod");
}

async fn run(client: &Client) -> Vec<Answer> {
    let mut out = Vec::new();
    for s in script() {
        if s.name == "eviction refused by the budget" {
            budget_observed(client).await;
        }
        out.push(send(client, &s).await);
    }
    out
}

#[tokio::test]
async fn the_embedded_api_answers_like_kube_apiserver() {
    let Some(plane) = plane() else { return };
    let _cluster = CLUSTER.lock().await;
    let mut real_config = plane.admin_config().await.unwrap();
    real_config.default_retry = false;
    let real = run(&Client::try_from(real_config).unwrap()).await;

    let (api, _) = crate::common::api::start().await;
    let mut config = api.config().await.unwrap();
    config.default_retry = false;
    let embedded_client = Client::try_from(config).unwrap();
    crate::common::api::install_crd(&embedded_client).await;
    let embedded = run(&embedded_client).await;

    let mut differences = Vec::new();
    for ((s, r), e) in script().iter().zip(&real).zip(&embedded) {
        let line = format!(
            "{:<40} real {} {:<22} embedded {} {}",
            s.name, r.code, r.reason, e.code, e.reason
        );
        eprintln!("{line}");
        if r != e {
            let known = KNOWN.iter().any(|(n, _)| *n == s.name);
            eprintln!(
                "  DIFFERENT{}: real {:?} embedded {:?}",
                if known { " (known)" } else { "" },
                r.fields,
                e.fields
            );
            if !known {
                differences.push(format!("{}: real {r:?}, embedded {e:?}", s.name));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the embedded API answers differently from kube-apiserver:\n{}",
        differences.join("\n")
    );
}
