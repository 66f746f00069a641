//! Field sets and list semantics shared by server-side apply, `managedFields` bookkeeping and
//! the strategic-merge approximation.
//!
//! A field set is a set of paths; a path element is written as in `fieldsV1`: `f:name` (object
//! field), `k:{"type":"Ready"}` (item of an associative list, by its keys), `v:"x"` (item of a set
//! list). A path in the set is a field the manager owns.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A set of owned field paths.
pub type FieldSet = BTreeSet<Vec<String>>;

/// How a list is merged: by keys, as a set, or replaced as a whole.
#[derive(Clone, Debug, PartialEq)]
pub enum ListKind {
    /// Associative list keyed by these fields.
    Map(Vec<String>),
    /// Set of scalars.
    Set,
    /// Replaced whole.
    Atomic,
}

/// Where in the object we are: inside a CRD schema node, or in a built-in kind (whose list
/// semantics come from a small table of the Kubernetes types' merge keys).
#[derive(Clone, Copy, Debug)]
pub enum Ctx<'a> {
    /// A CRD's OpenAPI schema node (Null: unknown, lists atomic).
    Schema(&'a Value),
    /// A built-in type.
    Builtin,
}

static NULL: Value = Value::Null;

impl<'a> Ctx<'a> {
    /// The context of the top of an object of a resource with this (optional) CRD schema.
    pub fn top(schema: Option<&'a Value>) -> Ctx<'a> {
        schema.map_or(Ctx::Builtin, Ctx::Schema)
    }

    /// The context of field `key` of an object in this context.
    pub fn child(self, key: &str, top: bool) -> Ctx<'a> {
        match self {
            Ctx::Builtin => Ctx::Builtin,
            Ctx::Schema(_) if top && key == "metadata" => Ctx::Builtin,
            Ctx::Schema(s) => {
                if let Some(p) = s["properties"].get(key) {
                    Ctx::Schema(p)
                } else if s["additionalProperties"].is_object() {
                    Ctx::Schema(&s["additionalProperties"])
                } else {
                    Ctx::Schema(&NULL)
                }
            }
        }
    }

    /// The context of the items of a list in this context.
    pub fn items(self) -> Ctx<'a> {
        match self {
            Ctx::Builtin => Ctx::Builtin,
            Ctx::Schema(s) => Ctx::Schema(&s["items"]),
        }
    }

    /// Whether a map in this context is atomic (replaced whole).
    pub fn atomic_map(self) -> bool {
        match self {
            Ctx::Builtin => false,
            Ctx::Schema(s) => s["x-kubernetes-map-type"].as_str() == Some("atomic"),
        }
    }

    /// How a list stored under field `key` (in this context, which is the list's own node)
    /// merges.
    pub fn list_kind(self, key: &str) -> ListKind {
        match self {
            Ctx::Schema(s) => match s["x-kubernetes-list-type"].as_str() {
                Some("map") => ListKind::Map(
                    s["x-kubernetes-list-map-keys"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                        .unwrap_or_default(),
                ),
                Some("set") => ListKind::Set,
                _ => ListKind::Atomic,
            },
            Ctx::Builtin => builtin_list_kind(key),
        }
    }
}

/// Merge keys of the Kubernetes built-in lists nixroll and its simulation touch.
fn builtin_list_kind(key: &str) -> ListKind {
    let keys = |k: &[&str]| ListKind::Map(k.iter().map(|s| (*s).to_owned()).collect());
    match key {
        "conditions" | "addresses" => keys(&["type"]),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => keys(&["name"]),
        "volumeMounts" => keys(&["mountPath"]),
        "ports" => keys(&["containerPort"]),
        "ownerReferences" => keys(&["uid"]),
        "finalizers" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

const META_IGNORED: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "generateName",
];

/// Whether a field is never tracked in managedFields (identity and server-owned metadata).
fn ignored(prefix: &[String], key: &str, top: bool) -> bool {
    (top && (key == "apiVersion" || key == "kind"))
        || (prefix.len() == 1 && prefix[0] == "f:metadata" && META_IGNORED.contains(&key))
}

/// The key element of an item of an associative list.
fn item_key(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    format!("k:{}", Value::Object(m))
}

fn set_key(item: &Value) -> String {
    format!("v:{item}")
}

/// The fields a (partial) object sets, as server-side apply counts them.
pub fn fields_of(v: &Value, ctx: Ctx<'_>) -> FieldSet {
    let mut out = FieldSet::new();
    let mut prefix = Vec::new();
    walk_fields(v, ctx, &mut prefix, &mut out, true);
    out
}

fn walk_fields(v: &Value, ctx: Ctx<'_>, prefix: &mut Vec<String>, out: &mut FieldSet, top: bool) {
    let Some(obj) = v.as_object() else {
        return;
    };
    for (k, child) in obj {
        if child.is_null() || ignored(prefix, k, top) {
            continue;
        }
        let cctx = ctx.child(k, top);
        prefix.push(format!("f:{k}"));
        walk_value(child, k, cctx, prefix, out);
        prefix.pop();
    }
}

fn walk_value(child: &Value, k: &str, cctx: Ctx<'_>, prefix: &mut Vec<String>, out: &mut FieldSet) {
    match child {
        Value::Object(m) if !m.is_empty() && !cctx.atomic_map() => {
            walk_fields(child, cctx, prefix, out, false);
        }
        Value::Array(items) => match cctx.list_kind(k) {
            ListKind::Map(keys) => {
                for item in items {
                    prefix.push(item_key(item, &keys));
                    out.insert(prefix.clone());
                    walk_fields(item, cctx.items(), prefix, out, false);
                    prefix.pop();
                }
                if items.is_empty() {
                    out.insert(prefix.clone());
                }
            }
            ListKind::Set => {
                for item in items {
                    prefix.push(set_key(item));
                    out.insert(prefix.clone());
                    prefix.pop();
                }
                if items.is_empty() {
                    out.insert(prefix.clone());
                }
            }
            ListKind::Atomic => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// Merge an apply configuration into a live object (maps recursively, associative lists by key,
/// sets by union, everything else replaced).
pub fn merge_apply(live: &mut Value, cfg: &Value, ctx: Ctx<'_>, top: bool) {
    let (Some(lm), Some(cm)) = (live.as_object_mut(), cfg.as_object()) else {
        *live = cfg.clone();
        return;
    };
    if ctx.atomic_map() {
        *live = cfg.clone();
        return;
    }
    for (k, cv) in cm {
        if cv.is_null() {
            continue;
        }
        let cctx = ctx.child(k, top);
        match lm.get_mut(k) {
            Some(lv) => merge_value(lv, cv, k, cctx),
            None => {
                lm.insert(k.clone(), cv.clone());
            }
        }
    }
}

fn merge_value(lv: &mut Value, cv: &Value, k: &str, cctx: Ctx<'_>) {
    match (lv.is_object() && cv.is_object(), lv.as_array_mut(), cv.as_array()) {
        (true, _, _) => merge_apply(lv, cv, cctx, false),
        (_, Some(la), Some(ca)) => match cctx.list_kind(k) {
            ListKind::Map(keys) => {
                for item in ca {
                    let key = item_key(item, &keys);
                    if let Some(existing) = la.iter_mut().find(|i| item_key(i, &keys) == key) {
                        merge_apply(existing, item, cctx.items(), false);
                    } else {
                        la.push(item.clone());
                    }
                }
            }
            ListKind::Set => {
                for item in ca {
                    if !la.contains(item) {
                        la.push(item.clone());
                    }
                }
            }
            ListKind::Atomic => *lv = cv.clone(),
        },
        _ => *lv = cv.clone(),
    }
}

/// The value at a field path.
pub fn value_at<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut cur = v;
    for el in path {
        cur = step(cur, el)?;
    }
    Some(cur)
}

fn step<'v>(cur: &'v Value, el: &str) -> Option<&'v Value> {
    if let Some(f) = el.strip_prefix("f:") {
        cur.get(f)
    } else if let Some(k) = el.strip_prefix("k:") {
        let keys: Value = serde_json::from_str(k).ok()?;
        let keys = keys.as_object()?;
        cur.as_array()?.iter().find(|i| {
            keys.iter()
                .all(|(kk, kv)| i.get(kk).unwrap_or(&Value::Null) == kv)
        })
    } else if let Some(v) = el.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        cur.as_array()?.iter().find(|i| **i == want)
    } else {
        None
    }
}

/// Remove the field at a path (no-op when absent).
pub fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for el in parents {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            let probe = step(cur, el).cloned();
            match (probe, cur.as_array_mut()) {
                (Some(p), Some(arr)) => arr.iter_mut().find(|i| **i == p),
                _ => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(p) = step(cur, last).cloned()
        && let Some(arr) = cur.as_array_mut()
    {
        arr.retain(|i| *i != p);
    }
}

/// After removing the field at `path`, remove the maps on its path that became empty (they
/// existed only to hold it), as structured-merge-diff does; top-level fields stay.
pub fn prune_empty_parents(v: &mut Value, path: &[String]) {
    for depth in (2..path.len()).rev() {
        let parent = &path[..depth];
        let empty = value_at(v, parent).is_some_and(|p| p.as_object().is_some_and(|m| m.is_empty()));
        if !empty || !parent.iter().all(|el| el.starts_with("f:")) {
            return;
        }
        remove_at(v, parent);
    }
}

/// Fields whose value differs between two versions of an object: `changed` holds fields present
/// in `new` with a new or different value, `removed` fields only present in `old`.
pub fn diff_fields(old: &Value, new: &Value, ctx: Ctx<'_>) -> (FieldSet, FieldSet) {
    let mut changed = FieldSet::new();
    let mut removed = FieldSet::new();
    let mut prefix = Vec::new();
    diff_walk(old, new, ctx, &mut prefix, &mut changed, &mut removed, true);
    (changed, removed)
}

fn diff_walk(
    old: &Value,
    new: &Value,
    ctx: Ctx<'_>,
    prefix: &mut Vec<String>,
    changed: &mut FieldSet,
    removed: &mut FieldSet,
    top: bool,
) {
    let empty = Map::new();
    let om = old.as_object().unwrap_or(&empty);
    let nm = new.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = om.keys().chain(nm.keys()).collect();
    for k in keys {
        if ignored(prefix, k, top) {
            continue;
        }
        let cctx = ctx.child(k, top);
        let (ov, nv) = (
            om.get(k).filter(|v| !v.is_null()),
            nm.get(k).filter(|v| !v.is_null()),
        );
        prefix.push(format!("f:{k}"));
        match (ov, nv) {
            (None, None) => {}
            (Some(_), None) => {
                removed.insert(prefix.clone());
            }
            (None, Some(n)) => walk_value(n, k, cctx, prefix, changed),
            (Some(o), Some(n)) if o == n => {}
            (Some(o), Some(n)) => match (o, n) {
                (Value::Object(_), Value::Object(m)) if !m.is_empty() && !cctx.atomic_map() => {
                    diff_walk(o, n, cctx, prefix, changed, removed, false);
                }
                (Value::Array(oa), Value::Array(na)) => match cctx.list_kind(k) {
                    ListKind::Map(keys) => {
                        for item in na {
                            let key = item_key(item, &keys);
                            prefix.push(key.clone());
                            match oa.iter().find(|i| item_key(i, &keys) == key) {
                                Some(oi) => {
                                    diff_walk(oi, item, cctx.items(), prefix, changed, removed, false)
                                }
                                None => {
                                    changed.insert(prefix.clone());
                                    walk_fields(item, cctx.items(), prefix, changed, false);
                                }
                            }
                            prefix.pop();
                        }
                        for item in oa {
                            let key = item_key(item, &keys);
                            if !na.iter().any(|i| item_key(i, &keys) == key) {
                                prefix.push(key);
                                removed.insert(prefix.clone());
                                prefix.pop();
                            }
                        }
                    }
                    ListKind::Set => {
                        for item in na.iter().filter(|i| !oa.contains(i)) {
                            prefix.push(set_key(item));
                            changed.insert(prefix.clone());
                            prefix.pop();
                        }
                        for item in oa.iter().filter(|i| !na.contains(i)) {
                            prefix.push(set_key(item));
                            removed.insert(prefix.clone());
                            prefix.pop();
                        }
                    }
                    ListKind::Atomic => {
                        changed.insert(prefix.clone());
                    }
                },
                _ => {
                    changed.insert(prefix.clone());
                }
            },
        }
        prefix.pop();
    }
}

/// A field set in `fieldsV1` form.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Node {
        own: bool,
        children: std::collections::BTreeMap<String, Node>,
    }
    fn render(n: &Node) -> Value {
        let mut m = Map::new();
        if n.own && !n.children.is_empty() {
            m.insert(".".to_owned(), json!({}));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), render(c));
        }
        Value::Object(m)
    }
    let mut root = Node::default();
    for path in set {
        let mut cur = &mut root;
        for el in path {
            cur = cur.children.entry(el.clone()).or_default();
        }
        cur.own = true;
    }
    render(&root)
}

/// Parse a `fieldsV1` value.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, prefix: &mut Vec<String>, out: &mut FieldSet) {
        let Some(m) = v.as_object() else {
            return;
        };
        if (m.is_empty() || m.contains_key(".")) && !prefix.is_empty() {
            out.insert(prefix.clone());
        }
        for (k, c) in m {
            if k == "." {
                continue;
            }
            prefix.push(k.clone());
            walk(c, prefix, out);
            prefix.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Render a path for a conflict message: `.status.phase`, `.status.conditions[type="Ready"]`.
pub fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let inner = serde_json::from_str::<Value>(k)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .map(|m| {
                    m.iter()
                        .map(|(a, b)| format!("{a}={b}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            s.push_str(&format!("[{inner}]"));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedEntry {
    /// Field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion the manager used.
    pub api_version: String,
    /// RFC 3339 time of the last change.
    pub time: String,
    /// `status` for the status subresource, else empty.
    pub subresource: String,
    /// Owned fields.
    pub fields: FieldSet,
}

/// Read `metadata.managedFields` of an object.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| ManagedEntry {
                    manager: e["manager"].as_str().unwrap_or("").to_owned(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
                    api_version: e["apiVersion"].as_str().unwrap_or("").to_owned(),
                    time: e["time"].as_str().unwrap_or("").to_owned(),
                    subresource: e["subresource"].as_str().unwrap_or("").to_owned(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Write `metadata.managedFields` (entries without fields are dropped).
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let arr: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if arr.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".to_owned(), Value::Array(arr));
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(tm) = target.as_object_mut() {
        for (k, v) in pm {
            if v.is_null() {
                tm.remove(k);
            } else {
                merge_patch(tm.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Strategic merge patch, approximated: a JSON merge patch, except that lists with a known merge
/// key (conditions by `type`, containers by `name`, ...) merge item by item (`$patch: delete`
/// removes an item), `finalizers` merge as a set, `$deleteFromPrimitiveList/<field>` removes
/// values, `$patch: replace` replaces a map, and `$setElementOrder/...` is ignored.
pub fn strategic_merge(target: &mut Value, patch: &Value, ctx: Ctx<'_>, top: bool) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = patch.clone();
        if let Some(m) = p.as_object_mut() {
            m.remove("$patch");
        }
        *target = p;
        return;
    }
    if !target.is_object() {
        *target = json!({});
    }
    let Some(tm) = target.as_object_mut() else {
        return;
    };
    for (k, v) in pm {
        if k.starts_with("$setElementOrder/") || k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(arr), Some(del)) = (tm.get_mut(field).and_then(Value::as_array_mut), v.as_array()) {
                arr.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            tm.remove(k);
            continue;
        }
        let cctx = ctx.child(k, top);
        match (v, tm.get_mut(k)) {
            (Value::Array(pa), Some(Value::Array(ta))) => match cctx.list_kind(k) {
                ListKind::Map(keys) => {
                    for item in pa {
                        let key = item_key(item, &keys);
                        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                        let pos = ta.iter().position(|i| item_key(i, &keys) == key);
                        match (delete, pos) {
                            (true, Some(p)) => {
                                ta.remove(p);
                            }
                            (true, None) => {}
                            (false, Some(p)) => strategic_merge(&mut ta[p], item, cctx.items(), false),
                            (false, None) => ta.push(item.clone()),
                        }
                    }
                }
                ListKind::Set => {
                    for item in pa {
                        if !ta.contains(item) {
                            ta.push(item.clone());
                        }
                    }
                }
                ListKind::Atomic => *tm.entry(k.clone()).or_insert(Value::Null) = v.clone(),
            },
            (Value::Object(_), Some(t)) if t.is_object() => strategic_merge(t, v, cctx, false),
            _ => {
                let mut fresh = Value::Null;
                if v.is_object() {
                    strategic_merge(&mut fresh, v, cctx, false);
                } else {
                    fresh = v.clone();
                }
                tm.insert(k.clone(), fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fields_v1_round_trip_and_shape() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n", "labels": {"a": "b"}, "finalizers": ["x"]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "phase": "P"}
        });
        let set = fields_of(&obj, Ctx::Builtin);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({
                "f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"x\"": {}}},
                "f:status": {
                    "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}}},
                    "f:phase": {}
                }
            })
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn diff_and_remove() {
        let old = json!({"spec": {"a": 1, "b": 2, "conditions": [{"type": "X", "v": 1}]}});
        let new = json!({"spec": {"a": 1, "b": 3, "conditions": [{"type": "X", "v": 2}], "c": 4}});
        let (changed, removed) = diff_fields(&old, &new, Ctx::Builtin);
        assert!(removed.is_empty());
        let strs: Vec<String> = changed.iter().map(|p| path_string(p)).collect();
        assert_eq!(strs, vec![".spec.b", ".spec.c", ".spec.conditions[type=\"X\"].v"]);
        let mut v = new.clone();
        remove_at(&mut v, &["f:spec".into(), "f:b".into()]);
        assert_eq!(v["spec"].get("b"), None);
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut t = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "X", "status": "True"}]}});
        strategic_merge(
            &mut t,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            Ctx::Builtin,
            true,
        );
        assert_eq!(t["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(t["status"]["conditions"][0]["status"], "True");
    }
}
