//! `meta.k8s.io/v1 Table` output, for `kubectl get`: CRDs from their printer columns, nodes and
//! pods like the real server's printers, everything else NAME/AGE.

use std::sync::Arc;

use serde_json::{Value, json};

use super::resources::{PrinterColumn, ResourceInfo};

/// Kubernetes' short human duration (`HumanDuration`).
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 730 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(ts: &Value) -> String {
    let Some(s) = ts.as_str() else {
        return "<unknown>".into();
    };
    match s.parse::<jiff::Timestamp>() {
        Ok(t) => human_duration(jiff::Timestamp::now().as_second() - t.as_second()),
        Err(_) => "<invalid>".into(),
    }
}

/// Evaluate a simple JSONPath (`.a.b`, `.a[0].b`, `.a[?(@.type=="Ready")].status`).
pub fn json_path<'v>(obj: &'v Value, path: &str) -> Option<&'v Value> {
    let p = path.trim().trim_start_matches('{').trim_end_matches('}');
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut cur = obj;
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            cur = cur.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            // A filter may contain "]" only inside quotes; keep it simple.
            if let Some(f) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = f.split_once("==")?;
                let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|i| i.get(k.trim()).and_then(Value::as_str) == Some(v))?;
            } else {
                let idx: usize = inner.trim().parse().ok()?;
                cur = cur.get(idx)?;
            }
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(cur)
}

fn col(name: &str, type_: &str, format: &str, priority: i64, description: &str) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn name_col() -> Value {
    col(
        "Name",
        "string",
        "name",
        0,
        "Name must be unique within a namespace.",
    )
}

fn age_col() -> Value {
    col(
        "Age",
        "string",
        "",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    )
}

fn custom_cell(c: &PrinterColumn, obj: &Value) -> Value {
    let v = json_path(obj, &c.json_path);
    match (c.type_.as_str(), v) {
        (_, None) | (_, Some(Value::Null)) => Value::Null,
        ("date", Some(t)) => json!(age(t)),
        ("integer" | "number" | "boolean", Some(x)) => x.clone(),
        (_, Some(Value::String(s))) => json!(s),
        (_, Some(x)) => json!(x.to_string()),
    }
}

fn node_cells(o: &Value) -> Vec<Value> {
    let conds = o["status"]["conditions"].as_array();
    let ready = conds
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| match c["status"].as_str() {
            Some("True") => "Ready",
            Some("False") => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_owned();
    if o["spec"]["unschedulable"].as_bool() == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = o["metadata"]["labels"]
        .as_object()
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    let roles = if roles.is_empty() {
        "<none>".to_owned()
    } else {
        roles.join(",")
    };
    let addr = |t: &str| {
        o["status"]["addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["type"] == t))
            .and_then(|x| x["address"].as_str())
            .unwrap_or("<none>")
            .to_owned()
    };
    let info = &o["status"]["nodeInfo"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    vec![
        json!(status),
        json!(roles),
        json!(age(&o["metadata"]["creationTimestamp"])),
        json!(s(&info["kubeletVersion"])),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(s(&info["osImage"])),
        json!(s(&info["kernelVersion"])),
        json!(s(&info["containerRuntimeVersion"])),
    ]
}

/// The pod printer of kube-apiserver: READY counts containers that are ready *and* running;
/// STATUS is the pod's reason or phase, overridden by a container that is waiting or
/// terminated with a reason, and by `Terminating`.
fn pod_cells(o: &Value) -> Vec<Value> {
    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
    let statuses = o["status"]["containerStatuses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut status = o["status"]["reason"]
        .as_str()
        .or(o["status"]["phase"].as_str())
        .unwrap_or("Unknown")
        .to_owned();
    let mut ready = 0;
    let mut restarts = 0;
    let mut running = false;
    for c in statuses.iter().rev() {
        restarts += c["restartCount"].as_i64().unwrap_or(0);
        let state = &c["state"];
        if let Some(r) = state["waiting"]["reason"].as_str().filter(|r| !r.is_empty()) {
            status = r.to_owned();
        } else if let Some(r) = state["terminated"]["reason"].as_str().filter(|r| !r.is_empty()) {
            status = r.to_owned();
        } else if state["terminated"].is_object() {
            let t = &state["terminated"];
            status = match t["signal"].as_i64().filter(|s| *s != 0) {
                Some(sig) => format!("Signal:{sig}"),
                None => format!("ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
            };
        } else if c["ready"] == true && state["running"].is_object() {
            running = true;
            ready += 1;
        }
    }
    if status == "Completed" && running {
        status = if o["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        {
            "Running".into()
        } else {
            "NotReady".into()
        };
    }
    if !o["metadata"]["deletionTimestamp"].is_null() {
        status = if o["status"]["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    vec![
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts),
        json!(age(&o["metadata"]["creationTimestamp"])),
        json!(o["status"]["podIP"].as_str().unwrap_or("<none>")),
        json!(o["spec"]["nodeName"].as_str().unwrap_or("<none>")),
    ]
}

/// The event printer of kube-apiserver (`printEvent`), for core/v1 and events.k8s.io/v1 alike
/// (the latter is read through its core/v1 storage form).
fn event_cells(o: &Value) -> Vec<Value> {
    let since = |t: &Value| match t.as_str().filter(|s| !s.is_empty()) {
        Some(_) => age(t),
        None => "<unknown>".to_owned(),
    };
    let mut first = since(&o["firstTimestamp"]);
    if o["firstTimestamp"].as_str().is_none_or(str::is_empty) {
        first = since(&o["eventTime"]);
    }
    let mut last = if o["lastTimestamp"].as_str().is_none_or(str::is_empty) {
        first.clone()
    } else {
        since(&o["lastTimestamp"])
    };
    let mut count = o["count"].as_i64().unwrap_or(0);
    if o["series"].is_object() {
        last = since(&o["series"]["lastObservedTime"]);
        count = o["series"]["count"].as_i64().unwrap_or(0);
    } else if count == 0 {
        count = 1;
    }
    let inv = &o["involvedObject"];
    let kind = inv["kind"].as_str().unwrap_or("").to_lowercase();
    let target = match inv["name"].as_str().filter(|n| !n.is_empty()) {
        Some(n) => format!("{kind}/{n}"),
        None => kind,
    };
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let component = o["source"]["component"]
        .as_str()
        .filter(|c| !c.is_empty())
        .or(o["reportingComponent"].as_str().filter(|c| !c.is_empty()));
    let host = o["source"]["host"]
        .as_str()
        .filter(|h| !h.is_empty())
        .or(o["reportingInstance"].as_str().filter(|h| !h.is_empty()));
    let source = match (component, host) {
        (Some(c), Some(h)) => format!("{c}, {h}"),
        (Some(c), None) => c.to_owned(),
        (None, _) => String::new(),
    };
    vec![
        json!(last),
        json!(s(&o["type"])),
        json!(s(&o["reason"])),
        json!(target),
        json!(s(&inv["fieldPath"])),
        json!(source),
        json!(s(&o["message"]).trim()),
        json!(first),
        json!(count),
        json!(s(&o["metadata"]["name"])),
    ]
}

/// Column definitions of a resource's table.
pub fn columns(info: &ResourceInfo) -> Vec<Value> {
    if info.custom && !info.printer_columns.is_empty() {
        let mut cols = vec![name_col()];
        for c in &info.printer_columns {
            let (t, f) = match c.type_.as_str() {
                "date" => ("date", ""),
                other => (other, ""),
            };
            cols.push(col(&c.name, t, f, c.priority, &c.description));
        }
        return cols;
    }
    match (info.gvr.group.as_str(), info.gvr.plural.as_str()) {
        ("", "nodes") => vec![
            name_col(),
            col("Status", "string", "", 0, "The status of the node"),
            col("Roles", "string", "", 0, "The roles of the node"),
            age_col(),
            col(
                "Version",
                "string",
                "",
                0,
                "Kubelet Version reported by the node.",
            ),
            col("Internal-IP", "string", "", 1, "List of internal IPs."),
            col("External-IP", "string", "", 1, "List of external IPs."),
            col("OS-Image", "string", "", 1, "OS Image reported by the node."),
            col(
                "Kernel-Version",
                "string",
                "",
                1,
                "Kernel Version reported by the node.",
            ),
            col(
                "Container-Runtime",
                "string",
                "",
                1,
                "Container Runtime Version reported by the node.",
            ),
        ],
        ("", "pods") => vec![
            name_col(),
            col(
                "Ready",
                "string",
                "",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                "",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                "",
                0,
                "The number of times the containers in this pod have been restarted.",
            ),
            age_col(),
            col("IP", "string", "", 1, "IP address allocated to the pod."),
            col(
                "Node",
                "string",
                "",
                1,
                "Name of the node this pod is running on.",
            ),
        ],
        (_, "events") => vec![
            col(
                "Last Seen",
                "string",
                "",
                0,
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                "",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future",
            ),
            col(
                "Reason",
                "string",
                "",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col("Object", "string", "", 0, "The object that this event is about."),
            col(
                "Subobject",
                "string",
                "",
                1,
                "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2].",
            ),
            col(
                "Source",
                "string",
                "",
                1,
                "The component reporting this event. Should be a short machine understandable string.",
            ),
            col(
                "Message",
                "string",
                "",
                0,
                "A human-readable description of the status of this operation.",
            ),
            col(
                "First Seen",
                "string",
                "",
                1,
                "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
            ),
            col(
                "Count",
                "string",
                "",
                1,
                "The number of times this event has occurred.",
            ),
            col(
                "Name",
                "string",
                "name",
                1,
                "Name must be unique within a namespace.",
            ),
        ],
        _ => vec![name_col(), age_col()],
    }
}

fn cells(info: &ResourceInfo, o: &Value) -> Vec<Value> {
    if info.gvr.plural == "events" && !info.custom {
        if info.gvr.group.is_empty() {
            return event_cells(o);
        }
        return event_cells(&super::convert::unview(info, o.clone()));
    }
    let mut out = vec![json!(o["metadata"]["name"].as_str().unwrap_or(""))];
    if info.custom && !info.printer_columns.is_empty() {
        out.extend(info.printer_columns.iter().map(|c| custom_cell(c, o)));
        return out;
    }
    match (info.gvr.group.as_str(), info.gvr.plural.as_str()) {
        ("", "nodes") => out.extend(node_cells(o)),
        ("", "pods") => out.extend(pod_cells(o)),
        _ => out.push(json!(age(&o["metadata"]["creationTimestamp"]))),
    }
    out
}

/// A Table of objects (`headers` false: no columnDefinitions, as in watch events after the
/// first).
pub fn table(
    info: &ResourceInfo,
    objs: &[Arc<Value>],
    headers: bool,
    resource_version: Option<u64>,
) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            json!({
                "cells": cells(info, o),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            })
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": if headers { Value::Array(columns(info)) } else { json!([]) },
        "rows": rows,
    });
    if let Some(rv) = resource_version {
        t["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_and_durations() {
        let o = json!({"status": {"phase": "Up", "conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(json_path(&o, ".status.phase"), Some(&json!("Up")));
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&o, ".status.conditions[0].type"), Some(&json!("Ready")));
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(300), "5m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
    }

    #[test]
    fn pod_printer_counts_ready_running_containers_and_shows_container_reasons() {
        let pod = |statuses: Value, extra: Value| {
            let mut p = json!({
                "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
                "status": {"phase": "Running", "containerStatuses": statuses},
            });
            if let (Some(m), Some(e)) = (p["metadata"].as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
            pod_cells(&p)
        };
        let running = json!({"ready": true, "restartCount": 1, "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}});
        let c = pod(json!([running, running]), json!({}));
        assert_eq!(
            (&c[0], &c[1], &c[2]),
            (&json!("2/2"), &json!("Running"), &json!(2))
        );
        // Ready but not running does not count; a waiting reason becomes the status.
        let waiting =
            json!({"ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}});
        let c = pod(json!([running, waiting]), json!({}));
        assert_eq!((&c[0], &c[1]), (&json!("1/2"), &json!("CrashLoopBackOff")));
        let no_state = json!({"ready": true, "restartCount": 0, "state": {}});
        assert_eq!(pod(json!([no_state, running]), json!({}))[0], json!("1/2"));
        let c = pod(
            json!([running, running]),
            json!({"deletionTimestamp": "2026-01-01T00:01:00Z"}),
        );
        assert_eq!(c[1], json!("Terminating"));
    }

    #[test]
    fn event_printer_reads_both_event_apis_forms() {
        let core = json!({
            "metadata": {"name": "n.1"},
            "involvedObject": {"kind": "Node", "name": "n1", "fieldPath": "spec"},
            "reason": "Cordoned", "type": "Normal", "message": " cordoned n1 ",
            "source": {"component": "nixroll", "host": "h"},
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
        });
        let c = event_cells(&core);
        assert_eq!(
            c.len(),
            crate::resources::builtins()
                .iter()
                .find(|r| r.gvr.plural == "events" && r.gvr.group.is_empty())
                .map_or(0, |r| columns(r).len())
        );
        assert_eq!(
            &c[1..7],
            &[
                json!("Normal"),
                json!("Cordoned"),
                json!("node/n1"),
                json!("spec"),
                json!("nixroll, h"),
                json!("cordoned n1")
            ]
        );
        assert_eq!((&c[8], &c[9]), (&json!(1), &json!("n.1")));
        // A series (events.k8s.io) counts its occurrences; no timestamps at all is <unknown>.
        let series = json!({"metadata": {"name": "s"}, "involvedObject": {"kind": "Pod"},
            "series": {"count": 7, "lastObservedTime": "2026-01-01T00:00:00.000000Z"}});
        let c = event_cells(&series);
        assert_eq!(
            (&c[3], &c[7], &c[8]),
            (&json!("pod"), &json!("<unknown>"), &json!(7))
        );
    }
}
