//! OpenAPI v3 (`/openapi/v3` and one document per group-version), shaped like kube-apiserver's:
//! `paths` with the operations of every served resource (PATCH declares `fieldValidation`, so
//! `kubectl apply` validates on the server) and `components.schemas` named as kube-apiserver
//! names them (`io.k8s.api.core.v1.Pod`, `com.example.v1.Machine`), each kind carrying
//! `x-kubernetes-group-version-kind`: what `kubectl explain` looks up.
//!
//! Built-in kinds get the schemas k8s-openapi ships (the upstream OpenAPI of the Kubernetes
//! version it was generated for); custom resources get their CRD's `openAPIV3Schema` with
//! `apiVersion`, `kind` and `metadata` added, as the CRD handler of kube-apiserver does.
//!
//! PATCH operations carry no `requestBody`: kubectl then computes strategic-merge patches from
//! its compiled-in types (as it would without OpenAPI) rather than from the schema's
//! `x-kubernetes-patch-*` extensions, which k8s-openapi's schemas do not carry.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use schemars::SchemaGenerator;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::resources::{self, ResourceInfo};

/// `#/components/schemas/` + name.
fn reference(name: &str) -> String {
    format!("#/components/schemas/{name}")
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";

fn generator() -> SchemaGenerator {
    SchemaSettings::openapi3()
        .with(|s| s.meta_schema = None)
        .into_generator()
}

/// Add the schema of a built-in kind to the generator; its component name.
fn builtin_schema(generator: &mut SchemaGenerator, group: &str, version: &str, kind: &str) -> Option<String> {
    use k8s_openapi::api::apps::v1 as apps;
    use k8s_openapi::api::coordination::v1 as coordination;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::events::v1 as events;
    use k8s_openapi::api::policy::v1 as policy;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
    let s = match (group, version, kind) {
        ("", "v1", "Namespace") => generator.subschema_for::<core::Namespace>(),
        ("", "v1", "Node") => generator.subschema_for::<core::Node>(),
        ("", "v1", "Pod") => generator.subschema_for::<core::Pod>(),
        ("", "v1", "ConfigMap") => generator.subschema_for::<core::ConfigMap>(),
        ("", "v1", "Secret") => generator.subschema_for::<core::Secret>(),
        ("", "v1", "Event") => generator.subschema_for::<core::Event>(),
        ("events.k8s.io", "v1", "Event") => generator.subschema_for::<events::Event>(),
        ("coordination.k8s.io", "v1", "Lease") => generator.subschema_for::<coordination::Lease>(),
        ("apps", "v1", "DaemonSet") => generator.subschema_for::<apps::DaemonSet>(),
        ("apps", "v1", "ReplicaSet") => generator.subschema_for::<apps::ReplicaSet>(),
        ("apps", "v1", "Deployment") => generator.subschema_for::<apps::Deployment>(),
        ("policy", "v1", "PodDisruptionBudget") => generator.subschema_for::<policy::PodDisruptionBudget>(),
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition") => {
            generator.subschema_for::<apiextensions::CustomResourceDefinition>()
        }
        _ => return None,
    };
    s.get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .map(str::to_owned)
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "kind": kind, "version": version})
}

/// `example.com` → `com.example`: kube-apiserver's component names start with the reversed group.
fn reversed_group(group: &str) -> String {
    group.split('.').rev().collect::<Vec<_>>().join(".")
}

/// The components of a custom resource (its kind and list kind), from the CRD schema.
fn custom_schemas(r: &ResourceInfo, out: &mut Map<String, Value>) {
    let prefix = format!("{}.{}", reversed_group(&r.gvr.group), r.gvr.version);
    let mut schema = r.schema.clone().unwrap_or_else(|| json!({"type": "object"}));
    if !schema["properties"].is_object() {
        schema["properties"] = json!({});
    }
    let props = &mut schema["properties"];
    props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"});
    props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"});
    props["metadata"] = json!({"allOf": [{"$ref": reference(OBJECT_META)}], "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"});
    let (api_version, kind) = (props["apiVersion"].clone(), props["kind"].clone());
    schema["x-kubernetes-group-version-kind"] = json!([gvk(&r.gvr.group, &r.gvr.version, &r.kind)]);
    let name = format!("{prefix}.{}", r.kind);
    let list = json!({
        "description": format!("{}List is a list of {}", r.kind, r.kind),
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": api_version,
            "kind": kind,
            "items": {"type": "array", "items": {"$ref": reference(&name)},
                      "description": format!("List of {}. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md", r.gvr.plural)},
            "metadata": {"allOf": [{"$ref": reference(LIST_META)}], "description": "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"},
        },
        "x-kubernetes-group-version-kind": [gvk(&r.gvr.group, &r.gvr.version, &format!("{}List", r.kind))],
    });
    out.insert(name, schema);
    out.insert(format!("{prefix}.{}List", r.kind), list);
}

/// The `paths` of one resource: item and collection operations.
fn resource_paths(r: &ResourceInfo, base: &str, paths: &mut Map<String, Value>) {
    let item = if r.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.gvr.plural)
    } else {
        format!("{base}/{}/{{name}}", r.gvr.plural)
    };
    let gvk = gvk(&r.gvr.group, &r.gvr.version, &r.kind);
    let params = json!([
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
    ]);
    let op = |action: &str| {
        json!({
            "operationId": format!("{action}{}", r.kind),
            "parameters": params,
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
        })
    };
    paths.insert(
        item,
        json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
    );
    let coll = if r.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", r.gvr.plural)
    } else {
        format!("{base}/{}", r.gvr.plural)
    };
    paths.insert(coll, json!({"post": op("post"), "get": op("list")}));
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The document of one group-version over the given resources (all of that group-version).
fn document(mine: &[&Arc<ResourceInfo>], group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let base = format!("/{}", gv_path(group, version));
    let mut generator = generator();
    let mut kinds = Vec::new();
    let mut custom = Map::new();
    for r in mine {
        resource_paths(r, &base, &mut paths);
        if r.custom {
            custom_schemas(r, &mut custom);
        } else if let Some(name) = builtin_schema(&mut generator, group, version, &r.kind) {
            kinds.push((name, r.kind.clone()));
        }
    }
    if !custom.is_empty() {
        generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>();
        generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>();
    }
    let mut schemas = generator.take_definitions(true);
    for (name, kind) in kinds {
        if let Some(s) = schemas.get_mut(&name) {
            s["x-kubernetes-group-version-kind"] = json!([gvk(group, version, &kind)]);
        }
    }
    schemas.extend(custom);
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// A document and the hash clients see in its URL (changes when the document does).
#[derive(Clone)]
struct Doc {
    value: Arc<Value>,
    hash: String,
    /// Kind → name of its schema in `components.schemas` (built-in documents).
    kinds: Arc<BTreeMap<String, String>>,
}

fn doc(value: Value) -> Doc {
    // FNV-1a over the serialized document: stable, and different when the content is.
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Doc {
        value: Arc::new(value),
        hash: format!("{h:016X}"),
        kinds: Arc::new(BTreeMap::new()),
    }
}

/// The documents of the built-in group-versions, computed once.
static BUILTIN: LazyLock<BTreeMap<(String, String), Doc>> = LazyLock::new(|| {
    let all = resources::builtins();
    let mut gvs: Vec<(String, String)> = all
        .iter()
        .map(|r| (r.gvr.group.clone(), r.gvr.version.clone()))
        .collect();
    gvs.sort();
    gvs.dedup();
    gvs.into_iter()
        .map(|(g, v)| {
            let mine: Vec<&Arc<ResourceInfo>> = all
                .iter()
                .filter(|r| r.gvr.group == g && r.gvr.version == v)
                .collect();
            let mut d = doc(document(&mine, &g, &v));
            d.kinds = Arc::new(
                mine.iter()
                    .filter_map(|r| {
                        let mut scratch = generator();
                        builtin_schema(&mut scratch, &g, &v, &r.kind).map(|n| (r.kind.clone(), n))
                    })
                    .collect(),
            );
            ((g, v), d)
        })
        .collect()
});

/// The OpenAPI document of a built-in kind's group-version and the name of the kind's schema
/// in its `components.schemas` (for pruning unknown fields as kube-apiserver's decoder does).
pub(crate) fn builtin_kind(info: &ResourceInfo) -> Option<(Arc<Value>, String)> {
    if info.custom {
        return None;
    }
    let d = BUILTIN.get(&(info.gvr.group.clone(), info.gvr.version.clone()))?;
    let name = d.kinds.get(&info.kind)?;
    Some((d.value.clone(), name.clone()))
}

fn gv_doc(resources: &[Arc<ResourceInfo>], group: &str, version: &str) -> Option<Doc> {
    let mine = crate::resources::in_group_version(resources, group, version);
    if mine.is_empty() {
        return None;
    }
    if mine.iter().all(|r| !r.custom)
        && let Some(d) = BUILTIN.get(&(group.to_owned(), version.to_owned()))
    {
        return Some(d.clone());
    }
    Some(doc(document(&mine, group, version)))
}

/// `/openapi/v3`: the index of group-version documents.
pub fn v3_root(resources: &[Arc<ResourceInfo>]) -> Value {
    let mut gvs: Vec<(String, String)> = resources
        .iter()
        .map(|r| (r.gvr.group.clone(), r.gvr.version.clone()))
        .collect();
    gvs.sort();
    gvs.dedup();
    let mut paths = Map::new();
    for (g, v) in gvs {
        if let Some(d) = gv_doc(resources, &g, &v) {
            let p = gv_path(&g, &v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", d.hash)}),
            );
        }
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1|apis/g/v}`.
pub fn v3_gv(resources: &[Arc<ResourceInfo>], group: &str, version: &str) -> Option<Arc<Value>> {
    gv_doc(resources, group, version).map(|d| d.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_and_custom_kinds_carry_their_gvk() {
        let mut all = resources::builtins();
        let crd: Value =
            serde_saphyr::from_str(include_str!("../tests/fixtures/machine-crd.yaml")).unwrap_or_default();
        all.extend(resources::from_crd(&crd));
        let core = v3_gv(&all, "", "v1").unwrap_or_default();
        let pod = &core["components"]["schemas"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(
            pod["x-kubernetes-group-version-kind"],
            json!([{"group": "", "kind": "Pod", "version": "v1"}])
        );
        let spec_ref = pod["properties"]["spec"]["allOf"][0]["$ref"]
            .as_str()
            .unwrap_or("");
        assert_eq!(spec_ref, "#/components/schemas/io.k8s.api.core.v1.PodSpec");
        assert!(core["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());

        let nx = v3_gv(&all, "example.com", "v1").unwrap_or_default();
        let s = &nx["components"]["schemas"];
        let node = &s["com.example.v1.Machine"];
        assert_eq!(
            node["x-kubernetes-group-version-kind"],
            json!([{"group": "example.com", "kind": "Machine", "version": "v1"}])
        );
        assert!(node["properties"]["spec"]["properties"]["revision"].is_object());
        assert!(s[OBJECT_META].is_object() && s[LIST_META].is_object());

        let root = v3_root(&all);
        let url = root["paths"]["apis/example.com/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap_or("");
        assert!(url.starts_with("/openapi/v3/apis/example.com/v1?hash="), "{root}");
    }
}
