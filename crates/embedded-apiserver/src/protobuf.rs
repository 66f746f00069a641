//! Just enough of the Kubernetes protobuf encoding to read the request bodies `kubectl`'s typed
//! clients send (`Content-Type: application/vnd.kubernetes.protobuf`): `kubectl create
//! configmap|secret|namespace|pdb` and `kubectl drain`'s Evictions (and DeleteOptions). Answers
//! are always JSON (kubectl accepts it). Other kinds get 415.

use serde_json::{Map, Value, json};

use super::error::StoreError;

const MAGIC: &[u8] = b"k8s\0";

fn err(what: &str) -> StoreError {
    StoreError::BadRequest {
        message: format!("error decoding protobuf body: {what}"),
    }
}

/// One decoded field: number and value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, StoreError> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(|| err("truncated varint"))?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(err("varint too long"))
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, StoreError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (num, wt) = (key >> 3, key & 7);
        match wt {
            0 => out.push((num, Field::Varint(varint(buf, &mut pos)?))),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| err("length"))?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len());
                let end = end.ok_or_else(|| err("truncated field"))?;
                out.push((num, Field::Bytes(&buf[pos..end])));
                pos = end;
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return Err(err("unsupported wire type")),
        }
    }
    Ok(out)
}

fn string(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// Standard base64 (with padding), as JSON carries `[]byte`.
pub fn base64(b: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A `map<string, string|bytes>` entry list.
fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), StoreError> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => k = String::from_utf8_lossy(x).into_owned(),
            (2, Field::Bytes(x)) if bytes_value => v = json!(base64(x)),
            (2, Field::Bytes(x)) => v = string(x),
            _ => {}
        }
    }
    Ok((k, v))
}

fn object_meta(b: &[u8]) -> Result<Value, StoreError> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut finalizers = Vec::new();
    let mut owners = Vec::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => drop(m.insert("name".into(), string(x))),
            (2, Field::Bytes(x)) => drop(m.insert("generateName".into(), string(x))),
            (3, Field::Bytes(x)) => drop(m.insert("namespace".into(), string(x))),
            (5, Field::Bytes(x)) => drop(m.insert("uid".into(), string(x))),
            (6, Field::Bytes(x)) => drop(m.insert("resourceVersion".into(), string(x))),
            (11, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                labels.insert(k, v);
            }
            (12, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                annotations.insert(k, v);
            }
            (13, Field::Bytes(x)) => {
                let mut o = Map::new();
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(y)) => drop(o.insert("kind".into(), string(y))),
                        (3, Field::Bytes(y)) => drop(o.insert("name".into(), string(y))),
                        (4, Field::Bytes(y)) => drop(o.insert("uid".into(), string(y))),
                        (5, Field::Bytes(y)) => drop(o.insert("apiVersion".into(), string(y))),
                        (6, Field::Varint(v)) => drop(o.insert("controller".into(), json!(v != 0))),
                        (7, Field::Varint(v)) => drop(o.insert("blockOwnerDeletion".into(), json!(v != 0))),
                        _ => {}
                    }
                }
                owners.push(Value::Object(o));
            }
            (14, Field::Bytes(x)) => finalizers.push(string(x)),
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    if !owners.is_empty() {
        m.insert("ownerReferences".into(), Value::Array(owners));
    }
    Ok(Value::Object(m))
}

fn int_or_string(b: &[u8]) -> Result<Value, StoreError> {
    let (mut ty, mut i, mut s) = (0u64, 0i64, Value::Null);
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Varint(v)) => ty = v,
            (2, Field::Varint(v)) => i = v as i64,
            (3, Field::Bytes(x)) => s = string(x),
            _ => {}
        }
    }
    Ok(if ty == 1 { s } else { json!(i) })
}

fn label_selector(b: &[u8]) -> Result<Value, StoreError> {
    let mut ml = Map::new();
    let mut exprs = Vec::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, false)?;
                ml.insert(k, v);
            }
            (2, Field::Bytes(x)) => {
                let mut e = json!({"values": []});
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(y)) => e["key"] = string(y),
                        (2, Field::Bytes(y)) => e["operator"] = string(y),
                        (3, Field::Bytes(y)) => {
                            if let Some(a) = e["values"].as_array_mut() {
                                a.push(string(y));
                            }
                        }
                        _ => {}
                    }
                }
                exprs.push(e);
            }
            _ => {}
        }
    }
    let mut out = json!({});
    if !ml.is_empty() {
        out["matchLabels"] = Value::Object(ml);
    }
    if !exprs.is_empty() {
        out["matchExpressions"] = Value::Array(exprs);
    }
    Ok(out)
}

fn delete_options(b: &[u8]) -> Result<Value, StoreError> {
    let mut o = json!({});
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Varint(v)) => o["gracePeriodSeconds"] = json!(v as i64),
            (2, Field::Bytes(x)) => {
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(y)) => o["preconditions"]["uid"] = string(y),
                        (2, Field::Bytes(y)) => o["preconditions"]["resourceVersion"] = string(y),
                        _ => {}
                    }
                }
            }
            (4, Field::Bytes(x)) => o["propagationPolicy"] = string(x),
            _ => {}
        }
    }
    Ok(o)
}

/// Decode a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, StoreError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| err("missing k8s protobuf magic"))?;
    let (mut api_version, mut kind, mut raw): (String, String, &[u8]) = (String::new(), String::new(), &[]);
    for (n, f) in fields(rest)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (n, f) in fields(tm)? {
                    match (n, f) {
                        (1, Field::Bytes(x)) => api_version = String::from_utf8_lossy(x).into(),
                        (2, Field::Bytes(x)) => kind = String::from_utf8_lossy(x).into(),
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    match kind.as_str() {
        "DeleteOptions" => return delete_options(raw),
        "ConfigMap" | "Secret" | "Namespace" | "PodDisruptionBudget" | "Eviction" => {}
        other => {
            return Err(StoreError::UnsupportedMediaType {
                message: format!(
                    "the embedded API server reads protobuf only for ConfigMap, Secret, Namespace, PodDisruptionBudget, Eviction and DeleteOptions, not {other}; send JSON"
                ),
            });
        }
    }
    for (n, f) in fields(raw)? {
        let Field::Bytes(x) = f else {
            if let (4 | 5, Field::Varint(v)) = (n, &f)
                && (kind == "ConfigMap" && n == 4 || kind == "Secret" && n == 5)
            {
                obj["immutable"] = json!(*v != 0);
            }
            continue;
        };
        match (kind.as_str(), n) {
            (_, 1) => obj["metadata"] = object_meta(x)?,
            ("ConfigMap", 2) | ("Secret", 4) => {
                let field = if kind == "Secret" { "stringData" } else { "data" };
                let (k, v) = map_entry(x, false)?;
                obj[field][k] = v;
            }
            ("ConfigMap", 3) | ("Secret", 2) => {
                let field = if kind == "Secret" { "data" } else { "binaryData" };
                let (k, v) = map_entry(x, true)?;
                obj[field][k] = v;
            }
            ("Secret", 3) => obj["type"] = string(x),
            ("PodDisruptionBudget", 2) => {
                let mut spec = json!({});
                for (n, f) in fields(x)? {
                    match (n, f) {
                        (1, Field::Bytes(y)) => spec["minAvailable"] = int_or_string(y)?,
                        (2, Field::Bytes(y)) => spec["selector"] = label_selector(y)?,
                        (3, Field::Bytes(y)) => spec["maxUnavailable"] = int_or_string(y)?,
                        (4, Field::Bytes(y)) => spec["unhealthyPodEvictionPolicy"] = string(y),
                        _ => {}
                    }
                }
                obj["spec"] = spec;
            }
            ("Eviction", 2) => obj["deleteOptions"] = delete_options(x)?,
            _ => {}
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, u8::try_from(payload.len()).unwrap()];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_configmap() {
        let meta = [ld(1, b"ops-pause"), ld(3, b"ops-system")].concat();
        let entry = [ld(1, b"k"), ld(2, b"v")].concat();
        let cm = [ld(1, &meta), ld(2, &entry)].concat();
        let tm = [ld(1, b"v1"), ld(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), ld(1, &tm), ld(2, &cm)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "ops-pause", "namespace": "ops-system"},
                   "data": {"k": "v"}})
        );
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }
}
