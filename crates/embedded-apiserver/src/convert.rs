//! Version views of stored objects. Events are stored once, in core/v1 form, and served as
//! events.k8s.io/v1 too (as the real server does); other kinds only get their `apiVersion`
//! adjusted to the version asked for.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::resources::ResourceInfo;

/// (core/v1 field, events.k8s.io/v1 field) pairs that differ in name.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn is_events_v1(info: &ResourceInfo) -> bool {
    info.gvr.group == "events.k8s.io" && info.gvr.plural == "events"
}

fn rename(obj: &Value, to_events: bool, api_version: &str) -> Value {
    let mut out = Map::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            let renamed = EVENT_FIELDS.iter().find_map(|(core, ev)| {
                if to_events && k == core {
                    Some(*ev)
                } else if !to_events && k == ev {
                    Some(*core)
                } else {
                    None
                }
            });
            out.insert(renamed.unwrap_or(k).to_owned(), v.clone());
        }
    }
    out.insert("apiVersion".to_owned(), Value::String(api_version.to_owned()));
    out.insert("kind".to_owned(), Value::String("Event".to_owned()));
    Value::Object(out)
}

/// The stored object as a client of `info`'s version sees it.
pub fn view(info: &ResourceInfo, stored: &Arc<Value>) -> Arc<Value> {
    let want = info.gvr.api_version();
    if stored["apiVersion"].as_str() == Some(want.as_str()) {
        return stored.clone();
    }
    if is_events_v1(info) {
        return Arc::new(rename(stored, true, &want));
    }
    let mut v = (**stored).clone();
    v["apiVersion"] = Value::String(want);
    Arc::new(v)
}

/// The storage form of an object written through `info`'s version.
pub fn unview(info: &ResourceInfo, obj: Value) -> Value {
    if is_events_v1(info) {
        return rename(&obj, false, "v1");
    }
    obj
}
