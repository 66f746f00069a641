//! Discovery documents (`/api`, `/apis`, `/apis/{group}/{version}`, `/version`) and the minimal
//! OpenAPI v3 that lets `kubectl apply` validate on the server (`fieldValidation`) instead of
//! downloading schemas.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::resources::ResourceInfo;

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0+nixroll",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn groups_of(resources: &[Arc<ResourceInfo>]) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in resources.iter().filter(|r| !r.gvr.group.is_empty()) {
        let vs = groups.entry(r.gvr.group.clone()).or_default();
        if !vs.contains(&r.gvr.version) {
            vs.push(r.gvr.version.clone());
        }
    }
    groups
}

fn group_json(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = vs.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": vs, "preferredVersion": preferred})
}

/// `/apis`.
pub fn group_list(resources: &[Arc<ResourceInfo>]) -> Value {
    let groups: Vec<Value> = groups_of(resources)
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`.
pub fn group(resources: &[Arc<ResourceInfo>], group: &str) -> Option<Value> {
    let groups = groups_of(resources);
    let vs = groups.get(group)?;
    let mut g = group_json(group, vs);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

/// `/api/v1` or `/apis/{group}/{version}`.
pub fn resource_list(resources: &[Arc<ResourceInfo>], group: &str, version: &str) -> Option<Value> {
    let mine: Vec<&Arc<ResourceInfo>> = resources
        .iter()
        .filter(|r| r.gvr.group == group && r.gvr.version == version)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for r in mine {
        let mut e = json!({
            "name": r.gvr.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
        });
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        out.push(e);
        if r.status_subresource {
            out.push(json!({
                "name": format!("{}/status", r.gvr.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        for (sub, kind, verbs) in &r.extra_subresources {
            let mut e = json!({
                "name": format!("{}/{sub}", r.gvr.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if *sub == "eviction" {
                e["group"] = json!("policy");
                e["version"] = json!("v1");
            }
            out.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_v3_root(resources: &[Arc<ResourceInfo>], generation: u64) -> Value {
    let mut paths = serde_json::Map::new();
    for r in resources {
        let p = gv_path(&r.gvr.group, &r.gvr.version);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={generation:016X}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1|apis/g/v}`: for each kind, PATCH operations that declare the
/// `fieldValidation` parameter (what kubectl checks before validating on the server). Schemas
/// are not served (kubectl falls back to merge patches for kinds it does not know).
pub fn openapi_v3_gv(resources: &[Arc<ResourceInfo>], group: &str, version: &str) -> Option<Value> {
    let mine: Vec<&Arc<ResourceInfo>> = resources
        .iter()
        .filter(|r| r.gvr.group == group && r.gvr.version == version)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let base = format!("/{}", gv_path(group, version));
    for r in mine {
        let item = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.gvr.plural)
        } else {
            format!("{base}/{}/{{name}}", r.gvr.plural)
        };
        let gvk = json!({"group": group, "version": version, "kind": r.kind});
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
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
