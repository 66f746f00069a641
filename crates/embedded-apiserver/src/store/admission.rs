//! Admission helpers of the write paths: name checks, pruning and reporting of unknown fields,
//! body decoding, defaults and validation (`admit`), subresource merges and finalization.

use super::*;

/// Why a name is not a valid RFC 1123 subdomain (or, for namespaces, label); None when valid.
pub(super) fn name_problem(name: &str, label: bool) -> Option<String> {
    let max = if label { 63 } else { 253 };
    if name.len() > max {
        return Some(format!("must be no more than {max} characters"));
    }
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    let ok = if label {
        part_ok(name)
    } else {
        name.split('.').all(part_ok)
    };
    if ok {
        None
    } else if label {
        Some("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into())
    } else {
        Some("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into())
    }
}

/// Secrets: `stringData` is write-only; the server merges it into `data` (base64).
pub(super) fn fold_string_data(info: &ResourceInfo, obj: &mut Value) {
    if !(info.gvr.group.is_empty() && info.gvr.plural == "secrets") {
        return;
    }
    let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    if let Some(sd) = sd.as_object() {
        for (k, v) in sd {
            let text = v.as_str().unwrap_or("");
            obj["data"][k] = json!(crate::protobuf::base64(text.as_bytes()));
        }
    }
}

/// The fields of `metadata` (`ObjectMeta`); others are unknown.
pub(super) const OBJECT_META_FIELDS: &[&str] = &[
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

/// Remove the fields the kind does not declare, returning their paths (`spec.x`,
/// `metadata.y`), as kube-apiserver's decoder drops them: custom resources by their CRD's
/// structural schema (`x-kubernetes-preserve-unknown-fields` keeps them), built-in kinds by
/// their OpenAPI schema (the one `/openapi/v3` serves), and `metadata` of every kind by
/// `ObjectMeta`.
pub(super) fn prune_unknown(info: &ResourceInfo, obj: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    if let Some(meta) = obj["metadata"].as_object_mut() {
        let unknown: Vec<String> = meta
            .keys()
            .filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            meta.remove(&k);
            pruned.push(format!("metadata.{k}"));
        }
    }
    let builtin = crate::openapi::builtin_kind(info);
    let (schema, defs) = match (&info.schema, &builtin) {
        (Some(s), _) => (s, &Value::Null),
        (None, Some((doc, name))) => (
            &doc["components"]["schemas"][name.as_str()],
            &doc["components"]["schemas"],
        ),
        (None, None) => return pruned,
    };
    let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
    if let Some(m) = obj.as_object_mut() {
        for (k, v) in m.iter_mut() {
            if k != "metadata" && k != "apiVersion" && k != "kind" {
                crate::schema::prune(v, &schema["properties"][k.as_str()], defs, k, &mut pruned);
            }
        }
        let props = schema["properties"].as_object();
        let unknown: Vec<String> = m
            .keys()
            .filter(|k| {
                !preserve
                    && !matches!(k.as_str(), "metadata" | "apiVersion" | "kind")
                    && props.is_some_and(|p| !p.contains_key(*k))
            })
            .cloned()
            .collect();
        for k in unknown {
            m.remove(&k);
            pruned.push(k);
        }
    }
    pruned
}

/// Server-side apply of a configuration with fields the schema does not declare fails before
/// anything else, whatever `fieldValidation` says: kube-apiserver cannot build the typed
/// object and answers 500 (kubernetes/kubernetes#122480, #139253).
pub(super) fn undeclared_in_apply(info: &ResourceInfo, cfg: &Value, name: &str) -> Result<(), StoreError> {
    let mut copy = cfg.clone();
    let unknown = prune_unknown(info, &mut copy);
    if unknown.is_empty() {
        return Ok(());
    }
    let ns = meta_str(cfg, "namespace");
    let errs: Vec<String> = unknown
        .iter()
        .map(|p| format!(".{p}: field not declared in schema"))
        .collect();
    Err(StoreError::Internal {
        message: format!(
            "failed to create typed patch object ({ns}/{name}; {}, Kind={}): {}",
            info.gvr.api_version(),
            info.kind,
            errs.join("\n")
        ),
    })
}

/// Decode as kube-apiserver does (drop unknown fields, warn or refuse per `fieldValidation`),
/// then for custom resources schema defaults and schema validation (422 Invalid).
/// Report the unknown fields a decode dropped, per `fieldValidation`: nothing (`Ignore`), a
/// warning each (`Warn`), or a refusal (`Strict`) in the form kube-apiserver gives it for the
/// kind of write (`obj` is what the refusal of a patch shows).
pub(super) fn report_unknown(
    info: &ResourceInfo,
    obj: &Value,
    pruned: &[String],
    validation: FieldValidation,
    kind: WriteKind,
    warnings: &mut Vec<String>,
) -> Result<(), StoreError> {
    if pruned.is_empty() {
        return Ok(());
    }
    let each: Vec<String> = pruned.iter().map(|p| format!("unknown field \"{p}\"")).collect();
    match (validation, kind) {
        (FieldValidation::Ignore, _) => Ok(()),
        (FieldValidation::Warn, _) => {
            warnings.extend(each);
            Ok(())
        }
        (FieldValidation::Strict, WriteKind::Create | WriteKind::Update) => Err(StoreError::BadRequest {
            message: format!(
                "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                each.join(", "),
                kind = info.kind,
                version = info.gvr.version,
            ),
        }),
        (FieldValidation::Strict, WriteKind::Patch) => {
            let detail = format!(
                "Invalid value: {:?}: strict decoding error: {}",
                obj.to_string(),
                each.join(", ")
            );
            Err(StoreError::Invalid {
                resource: String::new(),
                name: String::new(),
                message: format!(" \"\" is invalid: patch: {detail}"),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: detail,
                    field: "patch".into(),
                }],
            })
        }
    }
}

/// Decode a create or update body as kube-apiserver does before anything else: drop unknown
/// fields and report them (so a `Strict` refusal comes before preconditions, and fields that
/// the endpoint then ignores, such as `status` on the main endpoint, are reported too).
pub(super) fn decode_body(
    info: &ResourceInfo,
    obj: &mut Value,
    opts: &WriteOptions,
    kind: WriteKind,
) -> Result<(), StoreError> {
    let pruned = prune_unknown(info, obj);
    let mut warnings = Vec::new();
    report_unknown(info, obj, &pruned, opts.field_validation, kind, &mut warnings)?;
    opts.warnings.extend(warnings);
    Ok(())
}

/// Decode as kube-apiserver does (drop unknown fields; for patches, which are decoded after
/// they are applied, warn or refuse per `fieldValidation`), then for custom resources schema
/// defaults and schema validation (422 Invalid).
pub(super) fn admit(info: &ResourceInfo, obj: &mut Value, adm: &mut Admission) -> Result<(), StoreError> {
    fold_string_data(info, obj);
    let pruned = prune_unknown(info, obj);
    if adm.kind == WriteKind::Patch {
        report_unknown(info, obj, &pruned, adm.validation, adm.kind, &mut adm.warnings)?;
    }
    let Some(schema) = info.schema.as_ref() else {
        return Ok(());
    };
    crate::schema::apply_defaults(obj, schema);
    let mut errs = Vec::new();
    for part in ["spec", "status"] {
        if let Some(v) = obj.get(part) {
            crate::schema::validate(v, &schema["properties"][part], part, &mut errs);
        }
    }
    if errs.is_empty() {
        return Ok(());
    }
    let name = meta_str(obj, "name").to_owned();
    let list: Vec<String> = errs
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    let joined = if list.len() == 1 {
        list.join("")
    } else {
        format!("[{}]", list.join(", "))
    };
    let causes = errs
        .iter()
        .map(|e| Cause {
            reason: if e.message.starts_with("Required") {
                "FieldValueRequired"
            } else if e.message.starts_with("Unsupported") {
                "FieldValueNotSupported"
            } else if e.message.starts_with("Too long") {
                "FieldValueTooLong"
            } else if e.message.starts_with("Too many") {
                "FieldValueTooMany"
            } else {
                "FieldValueInvalid"
            }
            .into(),
            message: e.message.clone(),
            field: e.field.clone(),
        })
        .collect();
    Err(StoreError::Invalid {
        resource: format!("{}.{}", info.kind, info.gvr.group),
        message: format!("{}.{} \"{name}\" is invalid: {joined}", info.kind, info.gvr.group),
        name,
        causes,
    })
}

/// The object a write on `sub` produces from `old` and the client's `new`.
pub(super) fn merge_for_subresource(
    info: &ResourceInfo,
    old: &Value,
    mut new: Value,
    sub: Subresource,
) -> Value {
    match sub {
        Subresource::Main if info.status_subresource => {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            new
        }
        Subresource::Main => new,
        Subresource::Status => {
            let mut out = old.clone();
            match new.get("status") {
                Some(s) if !s.is_null() => out["status"] = s.clone(),
                _ => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            out
        }
    }
}

/// Update `metadata.managedFields` of `new`. Returns None when nothing changed at all.
pub(super) fn finalize(
    info: &ResourceInfo,
    old: Option<&Value>,
    mut new: Value,
    sub: Subresource,
    managed: Managed,
) -> Result<Option<Value>, StoreError> {
    let ctx = Ctx::top(info.schema.as_ref());
    let old_entries = old.map(read_managed).unwrap_or_default();
    let mut entries = match managed {
        Managed::Set(e) => e,
        Managed::Update(manager) => {
            let (changed, removed): (FieldSet, FieldSet) = match old {
                Some(o) => diff_fields(o, &new, ctx),
                None => (fields_of(&new, ctx), FieldSet::new()),
            };
            let mut entries = old_entries.clone();
            for e in &mut entries {
                e.fields
                    .retain(|p| !removed.iter().any(|r| p.starts_with(r)) && !changed.contains(p));
            }
            if !changed.is_empty() {
                let pos = entries.iter().position(|e| {
                    e.manager == manager && e.operation == "Update" && e.subresource == sub.name()
                });
                let idx = match pos {
                    Some(i) => i,
                    None => {
                        entries.push(ManagedEntry {
                            manager: manager.clone(),
                            operation: "Update".into(),
                            api_version: info.gvr.api_version(),
                            time: String::new(),
                            subresource: sub.name().to_owned(),
                            fields: FieldSet::new(),
                        });
                        entries.len() - 1
                    }
                };
                entries[idx].fields.extend(changed);
            }
            entries
        }
    };
    // Keep the time of entries whose fields did not change (so no-op writes stay no-ops).
    let now = now_string();
    for e in &mut entries {
        let prev = old_entries
            .iter()
            .find(|o| o.manager == e.manager && o.operation == e.operation && o.subresource == e.subresource);
        match prev {
            Some(p) if p.fields == e.fields => e.time = p.time.clone(),
            _ => e.time = now.clone(),
        }
    }
    write_managed(&mut new, &entries);
    if old.is_some_and(|o| *o == new) {
        return Ok(None);
    }
    Ok(Some(new))
}
