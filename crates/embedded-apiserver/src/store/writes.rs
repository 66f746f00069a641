//! The write paths of the store: create, update, patch and server-side apply, with admission
//! (identity, defaults, validation, generation, managedFields).

use super::*;

impl State {
    pub(super) fn create(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        obj: Value,
        managed: Managed,
    ) -> Result<Value, StoreError> {
        let mut obj = self.prepare_identity(info, ns, obj)?;
        if !meta_str(&obj, "resourceVersion").is_empty() {
            return Err(StoreError::BadRequest {
                message: "resourceVersion should not be set on objects to be created".into(),
            });
        }
        if meta_str(&obj, "name").is_empty() {
            let prefix = meta_str(&obj, "generateName").to_owned();
            if prefix.is_empty() {
                return Err(StoreError::Invalid {
                    resource: info.gvr.group_resource(),
                    name: String::new(),
                    message: format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        info.kind
                    ),
                    causes: Vec::new(),
                });
            }
            obj["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()));
        }
        let name = meta_str(&obj, "name").to_owned();
        let nsv = meta_str(&obj, "namespace").to_owned();
        self.check_namespace(info, &nsv)?;
        let key = self.key(info, Some(&nsv), &name);
        if self.stored(info, &key).is_some() {
            return Err(StoreError::AlreadyExists {
                resource: info.gvr.group_resource(),
                name,
            });
        }
        self.validate(info, &obj)?;
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now_string());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
            m.remove("generation");
        }
        if info.generation {
            obj["metadata"]["generation"] = json!(1);
        }
        self.defaults_on_create(info, &mut obj);
        admit(info, &mut obj, &mut self.admission)?;
        let stored = unview(info, obj);
        let finished = finalize(info, None, stored, Subresource::Main, managed)?;
        let Some(finished) = finished else {
            return Err(StoreError::Internal {
                message: "create produced no object".into(),
            });
        };
        let out = self.commit(opts, info, &key, Some(finished))?;
        Ok((*view(info, &out)).clone())
    }

    /// Check apiVersion/kind, set them, and settle the namespace.
    pub(super) fn prepare_identity(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, StoreError> {
        if !obj.is_object() {
            return Err(StoreError::BadRequest {
                message: "the body of the request was not a JSON object".into(),
            });
        }
        let av = info.gvr.api_version();
        if let Some(a) = obj["apiVersion"].as_str()
            && a != av
        {
            return Err(StoreError::BadRequest {
                message: format!(
                    "the API version in the data ({a}) does not match the expected API version ({av})"
                ),
            });
        }
        if let Some(k) = obj["kind"].as_str()
            && k != info.kind
        {
            return Err(StoreError::BadRequest {
                message: format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    info.kind
                ),
            });
        }
        obj["apiVersion"] = json!(av);
        obj["kind"] = json!(info.kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if info.namespaced {
            let path_ns = ns.unwrap_or("");
            let body_ns = meta_str(&obj, "namespace").to_owned();
            if !body_ns.is_empty() && !path_ns.is_empty() && body_ns != path_ns {
                return Err(StoreError::BadRequest {
                    message: "the namespace of the provided object does not match the namespace sent on the request".into(),
                });
            }
            let ns = if path_ns.is_empty() {
                body_ns
            } else {
                path_ns.to_owned()
            };
            if ns.is_empty() {
                return Err(StoreError::BadRequest {
                    message: "the server could not find the requested resource: a namespace is required"
                        .into(),
                });
            }
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        Ok(obj)
    }

    pub(super) fn validate(&self, info: &ResourceInfo, obj: &Value) -> Result<(), StoreError> {
        let name = meta_str(obj, "name");
        if let Some(problem) = name_problem(name, info.gvr.plural == "namespaces") {
            return Err(StoreError::Invalid {
                resource: format!("{}.{}", info.kind, info.gvr.group)
                    .trim_end_matches('.')
                    .to_owned(),
                name: name.to_owned(),
                message: format!(
                    "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": {problem}",
                    info.kind
                ),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: \"{name}\": {problem}"),
                    field: "metadata.name".into(),
                }],
            });
        }
        if info.gvr.plural == "customresourcedefinitions" {
            let spec = &obj["spec"];
            let want = format!(
                "{}.{}",
                spec["names"]["plural"].as_str().unwrap_or(""),
                spec["group"].as_str().unwrap_or("")
            );
            if meta_str(obj, "name") != want {
                return Err(StoreError::Invalid {
                    resource: info.gvr.group_resource(),
                    name: meta_str(obj, "name").to_owned(),
                    message: format!(
                        "CustomResourceDefinition.apiextensions.k8s.io \"{}\" is invalid: metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({want})",
                        meta_str(obj, "name")
                    ),
                    causes: Vec::new(),
                });
            }
        }
        Ok(())
    }

    pub(super) fn defaults_on_create(&self, info: &ResourceInfo, obj: &mut Value) {
        match (info.gvr.group.as_str(), info.gvr.plural.as_str()) {
            ("", "pods") => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
                if obj["spec"]["terminationGracePeriodSeconds"].is_null() {
                    obj["spec"]["terminationGracePeriodSeconds"] = json!(30);
                }
            }
            ("", "namespaces") => {
                obj["status"] = json!({"phase": "Active"});
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let now = now_string();
                obj["status"] = json!({
                    "acceptedNames": obj["spec"]["names"].clone(),
                    "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter()
                        .filter(|v| v["storage"].as_bool() == Some(true))
                        .map(|v| v["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now},
                    ],
                });
            }
            _ if info.reset_status_on_create => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
            }
            _ => {}
        }
    }

    pub(super) fn update(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        obj: Value,
        sub: Subresource,
        manager: &str,
    ) -> Result<Value, StoreError> {
        let obj = self.prepare_identity(info, ns, obj)?;
        let name = meta_str(&obj, "name").to_owned();
        let key = self.key(info, Some(meta_str(&obj, "namespace")), &name);
        let Some(old_stored) = self.stored(info, &key) else {
            if info.gvr.plural == "events" && sub == Subresource::Main {
                let mut obj = obj;
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                return self.create(opts, info, ns, obj, Managed::Update(manager.to_owned()));
            }
            return Err(not_found(info, &name));
        };
        let old = view(info, &old_stored);
        let body_rv = meta_str(&obj, "resourceVersion");
        if body_rv.is_empty() {
            if !info.allow_unconditional_update {
                return Err(StoreError::Invalid {
                    resource: info.gvr.group_resource(),
                    name: name.clone(),
                    message: format!(
                        "{}.{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                        info.kind, info.gvr.group
                    ),
                    causes: Vec::new(),
                });
            }
        } else if body_rv != meta_str(&old, "resourceVersion") {
            return Err(conflict_modified(info, &name));
        }
        let body_uid = meta_str(&obj, "uid");
        if !body_uid.is_empty() && body_uid != meta_str(&old, "uid") {
            return Err(StoreError::Conflict {
                resource: info.gvr.group_resource(),
                name: name.clone(),
                message: format!(
                    "Precondition failed: UID in precondition: {body_uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
                causes: Vec::new(),
            });
        }
        let new = merge_for_subresource(info, &old, obj, sub);
        self.write(
            opts,
            info,
            &key,
            &old,
            new,
            sub,
            Managed::Update(manager.to_owned()),
        )
    }

    /// Common tail of update/patch/apply: server-owned metadata, generation, managed fields,
    /// no-op detection, deletion when the last finalizer went away.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        key: &Key,
        old: &Value,
        mut new: Value,
        sub: Subresource,
        managed: Managed,
    ) -> Result<Value, StoreError> {
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "name",
            "namespace",
            "resourceVersion",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        new["apiVersion"] = old["apiVersion"].clone();
        new["kind"] = old["kind"].clone();
        // Decoding (pruning, defaults) comes first: a write that only adds unknown fields
        // changes nothing, not even the generation.
        admit(info, &mut new, &mut self.admission)?;
        if info.generation && spec_changed(old, &new) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(g);
        }
        let Some(new) = finalize(info, Some(old), new, sub, managed)? else {
            return Ok(old.clone());
        };
        if new == *old {
            return Ok(old.clone());
        }
        let gone = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && new["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                == 0;
        let stored = unview(info, new);
        let out = self.commit(opts, info, key, if gone { None } else { Some(stored) })?;
        Ok((*view(info, &out)).clone())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn patch(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
        patch: &Patch,
        sub: Subresource,
        wopts: &WriteOptions,
    ) -> Result<Value, StoreError> {
        if let Patch::Apply(cfg) = patch {
            return self.apply(opts, info, ns, name, cfg, sub, wopts);
        }
        let manager = wopts.field_manager.clone().unwrap_or_else(|| "unknown".into());
        let key = self.key(info, ns, name);
        let Some(old_stored) = self.stored(info, &key) else {
            return Err(not_found(info, name));
        };
        let old = view(info, &old_stored);
        let mut patched = (*old).clone();
        match patch {
            Patch::Merge(p) => fields::merge_patch(&mut patched, p),
            Patch::Strategic(p) => {
                fields::strategic_merge(&mut patched, p, Ctx::top(info.schema.as_ref()), true)
            }
            Patch::Json(p) => {
                let ops: json_patch::Patch =
                    serde_json::from_value(p.clone()).map_err(|e| StoreError::BadRequest {
                        message: format!("invalid JSON patch: {e}"),
                    })?;
                json_patch::patch(&mut patched, &ops).map_err(|e| StoreError::Invalid {
                    resource: info.gvr.group_resource(),
                    name: name.to_owned(),
                    message: format!("the JSON patch could not be applied: {e}"),
                    causes: Vec::new(),
                })?;
            }
            Patch::Apply(_) => {}
        }
        let prv = meta_str(&patched, "resourceVersion");
        if !prv.is_empty() && prv != meta_str(&old, "resourceVersion") {
            return Err(conflict_modified(info, name));
        }
        if meta_str(&patched, "name") != name {
            return Err(StoreError::BadRequest {
                message: "the name of the object in the patch does not match the name in the URL".into(),
            });
        }
        let new = merge_for_subresource(info, &old, patched, sub);
        self.write(opts, info, &key, &old, new, sub, Managed::Update(manager))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
        cfg: &Value,
        sub: Subresource,
        wopts: &WriteOptions,
    ) -> Result<Value, StoreError> {
        let Some(manager) = wopts.field_manager.clone().filter(|m| !m.is_empty()) else {
            // kube-apiserver answers 422 Invalid here (tests/real_api/differential.rs).
            let detail = "is required for apply patch".to_owned();
            return Err(StoreError::Invalid {
                resource: String::new(),
                name: String::new(),
                message: format!("fieldManager: Required value: {detail}"),
                causes: vec![crate::error::Cause {
                    reason: "FieldValueRequired".into(),
                    message: format!("Required value: {detail}"),
                    field: "fieldManager".into(),
                }],
            });
        };
        if cfg["apiVersion"].as_str() != Some(info.gvr.api_version().as_str())
            || cfg["kind"].as_str() != Some(info.kind.as_str())
        {
            return Err(StoreError::BadRequest {
                message: format!(
                    "apply configuration must set apiVersion {} and kind {}",
                    info.gvr.api_version(),
                    info.kind
                ),
            });
        }
        let cfg_name = cfg["metadata"]["name"].as_str().unwrap_or(name);
        if cfg_name != name {
            return Err(StoreError::BadRequest {
                message:
                    "the name of the object in the apply configuration does not match the name in the URL"
                        .into(),
            });
        }
        let mut cfg = self.prepare_identity(info, ns, cfg.clone())?;
        cfg["metadata"]["name"] = json!(name);
        // The endpoint decides which part of the configuration counts.
        match sub {
            Subresource::Main if info.status_subresource => {
                if let Some(m) = cfg.as_object_mut() {
                    m.remove("status");
                }
            }
            Subresource::Status => {
                let status = cfg["status"].clone();
                let meta = json!({"name": name, "namespace": cfg["metadata"]["namespace"]});
                cfg = json!({"apiVersion": cfg["apiVersion"], "kind": cfg["kind"], "metadata": meta});
                if !status.is_null() {
                    cfg["status"] = status;
                }
            }
            Subresource::Main => {}
        }
        let key = self.key(info, Some(meta_str(&cfg, "namespace")), name);
        undeclared_in_apply(info, &cfg, name)?;
        let old = self.stored(info, &key).map(|o| view(info, &o));
        if old.is_none() && sub == Subresource::Status {
            return Err(not_found(info, name));
        }
        let crv = meta_str(&cfg, "resourceVersion");
        if !crv.is_empty() && old.as_ref().is_none_or(|o| meta_str(o, "resourceVersion") != crv) {
            return Err(conflict_modified(info, name));
        }
        if let Some(m) = cfg["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let ctx = Ctx::top(info.schema.as_ref());
        let live: Value = match &old {
            Some(o) => (**o).clone(),
            None => {
                json!({"apiVersion": cfg["apiVersion"], "kind": cfg["kind"], "metadata": cfg["metadata"].clone()})
            }
        };
        let new_set = fields_of(&cfg, ctx);
        let mut entries = read_managed(&live);
        let mut merged = live.clone();
        merge_apply(&mut merged, &cfg, ctx, true);

        // Conflicts: fields another manager owns whose value this apply would change.
        let mut conflicts: Vec<(usize, Vec<String>)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.manager == manager {
                continue;
            }
            for p in e.fields.intersection(&new_set) {
                if value_at(&merged, p) != value_at(&live, p) {
                    conflicts.push((i, p.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !wopts.force {
                let causes: Vec<Cause> = conflicts
                    .iter()
                    .map(|(i, p)| {
                        let e = &entries[*i];
                        let using = if e.operation == "Update" {
                            format!(" using {}", e.api_version)
                        } else {
                            String::new()
                        };
                        Cause {
                            reason: "FieldManagerConflict".into(),
                            message: format!("conflict with \"{}\"{using}", e.manager),
                            field: path_string(p),
                        }
                    })
                    .collect();
                let n = causes.len();
                let lines: Vec<String> = causes
                    .iter()
                    .map(|c| format!("{}: {}", c.message, c.field))
                    .collect();
                return Err(StoreError::Conflict {
                    resource: info.gvr.group_resource(),
                    name: name.to_owned(),
                    message: format!(
                        "Apply failed with {n} conflict{}: {}",
                        if n == 1 { "" } else { "s" },
                        lines.join("\n")
                    ),
                    causes,
                });
            }
            for (i, p) in &conflicts {
                entries[*i].fields.remove(p);
            }
        }

        // Fields this manager applied before but no longer does, and nobody else owns, go.
        let mine = entries
            .iter()
            .position(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub.name());
        if let Some(mi) = mine {
            let dropped: Vec<Vec<String>> = entries[mi].fields.difference(&new_set).cloned().collect();
            for p in dropped {
                let owned_elsewhere = entries
                    .iter()
                    .enumerate()
                    .any(|(j, e)| j != mi && e.fields.iter().any(|q| q.starts_with(&p)));
                if !owned_elsewhere {
                    remove_at(&mut merged, &p);
                    crate::fields::prune_empty_parents(&mut merged, &p);
                }
            }
        }
        let now = now_string();
        let entry = ManagedEntry {
            manager: manager.clone(),
            operation: "Apply".into(),
            api_version: info.gvr.api_version(),
            time: now,
            subresource: sub.name().to_owned(),
            fields: new_set,
        };
        match mine {
            Some(mi) => {
                if entries[mi].fields == entry.fields {
                    entries[mi].api_version = entry.api_version;
                } else {
                    entries[mi] = entry;
                }
            }
            None => entries.push(entry),
        }
        match old {
            None => {
                write_managed(&mut merged, &entries);
                self.create(opts, info, ns, merged, Managed::Set(entries))
            }
            Some(old) => {
                let new = merge_for_subresource(info, &old, merged, sub);
                self.write(opts, info, &key, &old, new, sub, Managed::Set(entries))
            }
        }
    }
}
