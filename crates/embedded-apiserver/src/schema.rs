//! Admission for custom resources from their CRD's `openAPIV3Schema`, as the real server does
//! it: structural defaulting (`default`), then validation (`type`, `nullable`, `required`,
//! `enum`, `minLength`/`maxLength`, `minimum`/`maximum`, `minItems`/`maxItems`, `pattern`) and
//! the subset of CEL `x-kubernetes-validations` rules nixroll uses: `self.matches('re')` and
//! `self.a != self.b` / `self.a == self.b`. Other CEL rules are not evaluated (accepted).

use serde_json::Value;

/// Follow `$ref` (and a lone `allOf: [{$ref}]`, the shape of a described reference) into
/// `defs` (`components.schemas`); schemas without references come back unchanged.
fn resolve<'s>(mut schema: &'s Value, defs: &'s Value) -> &'s Value {
    for _ in 0..16 {
        if let Some(r) = schema["$ref"].as_str() {
            schema = &defs[r.rsplit('/').next().unwrap_or(r)];
        } else if let Some([one]) = schema["allOf"].as_array().map(Vec::as_slice)
            && schema["properties"].is_null()
        {
            schema = one;
        } else {
            break;
        }
    }
    schema
}

/// Drop fields the schema does not declare (structural pruning), recording their paths.
/// `defs` resolves `$ref`s (the built-in kinds' OpenAPI); `Value::Null` for CRD schemas.
/// Objects whose schema declares neither `properties` nor `additionalProperties` are kept
/// whole, as is anything under `x-kubernetes-preserve-unknown-fields`.
pub fn prune(v: &mut Value, schema: &Value, defs: &Value, path: &str, pruned: &mut Vec<String>) {
    let schema = resolve(schema, defs);
    let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
    match v {
        Value::Object(m) => {
            if let Some(props) = schema["properties"].as_object() {
                if !preserve {
                    let unknown: Vec<String> =
                        m.keys().filter(|k| !props.contains_key(*k)).cloned().collect();
                    for k in unknown {
                        m.remove(&k);
                        pruned.push(join(path, &k));
                    }
                }
                for (k, child) in m.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(child, s, defs, &join(path, k), pruned);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for (k, child) in m.iter_mut() {
                    prune(
                        child,
                        &schema["additionalProperties"],
                        defs,
                        &join(path, k),
                        pruned,
                    );
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                prune(item, &schema["items"], defs, &format!("{path}[{i}]"), pruned);
            }
        }
        _ => {}
    }
}

/// Fill in schema defaults where a field is absent (recursively, into present values). As in
/// kube-apiserver, a `null` in a field that is not `nullable: true` is dropped first (and then
/// defaulted, if the field has a default); a nullable field keeps its `null`.
pub fn apply_defaults(v: &mut Value, schema: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if m.get(k).is_some_and(Value::is_null) && s["nullable"].as_bool() != Some(true) {
                        m.remove(k);
                    }
                    if !m.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        m.insert(k.clone(), d.clone());
                    }
                    if let Some(child) = m.get_mut(k) {
                        apply_defaults(child, s);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for child in m.values_mut() {
                    apply_defaults(child, &schema["additionalProperties"]);
                }
            }
        }
        Value::Array(items) => {
            for i in items {
                apply_defaults(i, &schema["items"]);
            }
        }
        _ => {}
    }
}

/// One validation failure: field path and message (as the real server words them).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// Path like `spec.revision`.
    pub field: String,
    /// `Invalid value: ...`, `Required value`, ...
    pub message: String,
}

fn type_ok(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn cel_string(lit: &str) -> String {
    let mut out = String::new();
    let mut chars = lit.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Evaluate the supported CEL subset; `None` for rules outside it.
fn cel(rule: &str, v: &Value) -> Option<bool> {
    let r = rule.trim();
    if let Some(arg) = r
        .strip_prefix("self.matches('")
        .and_then(|a| a.strip_suffix("')"))
    {
        let re = regex::Regex::new(&cel_string(arg)).ok()?;
        return Some(v.as_str().is_some_and(|s| re.is_match(s)));
    }
    for (op, eq) in [("!=", false), ("==", true)] {
        if let Some((a, b)) = r.split_once(op) {
            let a = a.trim().strip_prefix("self.")?;
            let b = b.trim().strip_prefix("self.")?;
            if !a.chars().all(|c| c.is_alphanumeric() || c == '_')
                || !b.chars().all(|c| c.is_alphanumeric() || c == '_')
            {
                return None;
            }
            return Some((v.get(a) == v.get(b)) == eq);
        }
    }
    None
}

/// Validate a value against a schema node.
pub fn validate(v: &Value, schema: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let mut fail = |message: String| {
        errs.push(FieldError {
            field: path.to_owned(),
            message,
        })
    };
    if v.is_null() {
        if schema["nullable"].as_bool() != Some(true) && !schema["type"].is_null() {
            fail(format!(
                "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    if let Some(t) = schema["type"].as_str()
        && !type_ok(v, t)
    {
        let actual = match v {
            Value::Object(_) => "object",
            Value::Array(_) => "array",
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Bool(_) => "boolean",
            Value::Null => "null",
        };
        fail(format!(
            "Invalid value: \"{actual}\": {path} in body must be of type {t}: \"{actual}\""
        ));
        return;
    }
    if let Some(en) = schema["enum"].as_array()
        && !en.contains(v)
    {
        let allowed: Vec<String> = en.iter().map(show).collect();
        fail(format!(
            "Unsupported value: {}: supported values: {}",
            show(v),
            allowed.join(", ")
        ));
    }
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as u64;
        if let Some(max) = schema["maxLength"].as_u64().filter(|m| n > *m) {
            fail(format!("Too long: may not be more than {max} bytes"));
        }
        if let Some(min) = schema["minLength"].as_u64().filter(|m| n < *m) {
            fail(format!(
                "Invalid value: {}: {path} in body should be at least {min} chars long",
                show(v)
            ));
        }
        if let Some(p) = schema["pattern"].as_str()
            && let Ok(re) = regex::Regex::new(p)
            && !re.is_match(s)
        {
            fail(format!(
                "Invalid value: {}: {path} in body should match '{p}'",
                show(v)
            ));
        }
    }
    if let Some(x) = v.as_f64() {
        if let Some(max) = schema["maximum"].as_f64().filter(|m| x > *m) {
            fail(format!(
                "Invalid value: {v}: {path} in body should be less than or equal to {max}"
            ));
        }
        if let Some(min) = schema["minimum"].as_f64().filter(|m| x < *m) {
            fail(format!(
                "Invalid value: {v}: {path} in body should be greater than or equal to {min}"
            ));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(max) = schema["maxItems"].as_u64().filter(|m| n > *m) {
            fail(format!("Too many: {n}: must have at most {max} items"));
        }
        if let Some(min) = schema["minItems"].as_u64().filter(|m| n < *m) {
            fail(format!(
                "Invalid value: {n}: {path} in body should have at least {min} items"
            ));
        }
        for (i, item) in items.iter().enumerate() {
            validate(item, &schema["items"], &format!("{path}[{i}]"), errs);
        }
        // `x-kubernetes-list-type: map`: the key fields identify an item; a second item with
        // the same keys is a `Duplicate value` (`set`: the same for whole items).
        let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
            .as_array()
            .map(|ks| ks.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let identity = |item: &Value| -> Option<Value> {
            match schema["x-kubernetes-list-type"].as_str() {
                Some("map") => Some(Value::Object(
                    keys.iter().map(|k| ((*k).to_owned(), item[*k].clone())).collect(),
                )),
                Some("set") => Some(item.clone()),
                _ => None,
            }
        };
        let mut seen = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(id) = identity(item) {
                if seen.contains(&id) {
                    errs.push(FieldError {
                        field: format!("{path}[{i}]"),
                        message: format!("Duplicate value: {id}"),
                    });
                } else {
                    seen.push(id);
                }
            }
        }
    }
    if let Some(m) = v.as_object() {
        for r in schema["required"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(k) = r.as_str()
                && !m.contains_key(k)
            {
                errs.push(FieldError {
                    field: join(path, k),
                    message: "Required value".into(),
                });
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, child) in m {
                if let Some(s) = props.get(k) {
                    validate(child, s, &join(path, k), errs);
                }
            }
        } else if schema["additionalProperties"].is_object() {
            for (k, child) in m {
                validate(child, &schema["additionalProperties"], &join(path, k), errs);
            }
        }
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let Some(expr) = rule["rule"].as_str() else {
            continue;
        };
        if cel(expr, v) == Some(false) {
            let msg = rule["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("failed rule: {expr}"));
            let shown = match v {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => show(v),
                _ => "\"object\"".into(),
            };
            errs.push(FieldError {
                field: path.to_owned(),
                message: format!("Invalid value: {shown}: {msg}"),
            });
        }
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_owned()
    } else {
        format!("{path}.{k}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn custom_resource_schema_defaults_and_rules() {
        let crd: Value =
            serde_saphyr::from_str(include_str!("../tests/fixtures/machine-crd.yaml")).unwrap_or_default();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut ok = json!({"spec": {"image": "registry.example.com/os", "revision": "0123456789abcdef0123456789abcdef01234567"}});
        apply_defaults(&mut ok, schema);
        assert_eq!(ok["spec"]["restart"], "IfNeeded");
        assert_eq!(ok["spec"]["suspend"], false);
        // A null in a non-nullable field is dropped, then defaulted (kube-apiserver's rule).
        let mut nulled =
            json!({"spec": {"image": "registry.example.com/os", "restart": null, "suspend": null}});
        apply_defaults(&mut nulled, schema);
        assert_eq!(nulled["spec"]["restart"], "IfNeeded");
        assert_eq!(nulled["spec"]["suspend"], false);
        let mut errs = Vec::new();
        validate(&ok, schema, "", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");

        let bad = json!({"spec": {"image": "Registry:tag", "revision": "main", "restart": "Sometimes"}});
        let mut errs = Vec::new();
        validate(&bad, schema, "", &mut errs);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"spec.image"), "{errs:?}");
        assert!(fields.contains(&"spec.revision"), "{errs:?}");
        assert!(fields.contains(&"spec.restart"), "{errs:?}");
    }
}
