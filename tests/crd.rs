//! The committed CRD must be exactly what `nixroll crd` prints (regenerate with
//! `cargo run -- crd --only nixosnodes > crds/nixosnodes.yaml`).

#[test]
fn committed_crd_matches_generated() {
    let generated = nixroll::api::crd_yaml().unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/nixosnodes.yaml")).unwrap();
    assert!(
        generated == committed,
        "crds/nixosnodes.yaml is stale: run `cargo run -- crd --only nixosnodes > crds/nixosnodes.yaml` and commit"
    );
}

#[test]
fn crd_has_names_scope_and_status_subresource() {
    let crd = nixroll::api::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("nixosnodes.nixroll.io"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names, Some(vec!["nxn".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    for want in ["Wanted", "Running", "Phase", "Age"] {
        assert!(cols.contains(&want), "missing printer column {want}: {cols:?}");
    }
}

/// Every `format` in the schema, with the `type` beside it and its path.
fn formats(v: &serde_json::Value, path: &str, out: &mut Vec<(String, String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(f) = m.get("format").and_then(|f| f.as_str()) {
                let t = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
                out.push((path.to_owned(), t.to_owned(), f.to_owned()));
            }
            for (k, child) in m {
                formats(child, &format!("{path}.{k}"), out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                formats(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// kube-apiserver warns `unrecognized format "uint32"` on every apply of a CRD whose schema
/// carries a format it does not know (Flux repeats it on every reconcile). The known ones: the
/// list in the apiextensions reference (`JSONSchemaProps.format`), `date-time`, and the OpenAPI
/// numeric formats for their types.
#[test]
fn crd_uses_only_formats_kubernetes_knows() {
    const STRING: &[&str] = &[
        "bsonobjectid",
        "uri",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "isbn",
        "isbn10",
        "isbn13",
        "creditcard",
        "ssn",
        "hexcolor",
        "rgbcolor",
        "byte",
        "password",
        "date",
        "duration",
        "datetime",
        "date-time",
    ];
    for (name, crd) in [
        ("generated", serde_json::to_value(nixroll::api::crd()).unwrap()),
        (
            "crds/nixosnodes.yaml",
            serde_saphyr::from_str(
                &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/nixosnodes.yaml"))
                    .unwrap(),
            )
            .unwrap(),
        ),
    ] {
        let mut found = Vec::new();
        formats(&crd["spec"]["versions"], "spec.versions", &mut found);
        assert!(!found.is_empty(), "{name}: no formats at all? the walk is broken");
        let bad: Vec<_> = found
            .iter()
            .filter(|(_, t, f)| match t.as_str() {
                "integer" => !["int32", "int64"].contains(&f.as_str()),
                "number" => !["float", "double"].contains(&f.as_str()),
                "string" => !STRING.contains(&f.as_str()),
                _ => true,
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: formats Kubernetes does not know: {bad:#?}"
        );
    }
    // The counter that drew the warning is still an unsigned integer.
    let crd = serde_json::to_value(nixroll::api::crd()).unwrap();
    let attempts = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["backoff"]["properties"]["attempts"];
    assert_eq!(attempts["type"], "integer", "{attempts}");
    assert_eq!(attempts["format"], "int64", "{attempts}");
    assert_eq!(attempts["minimum"], 0.0, "{attempts}");
}

/// The FlakeSource CRD: committed (crds/ and the chart) exactly as generated
/// (`cargo run -- crd --only flakesources > crds/flakesources.yaml`), namespaced, with the
/// columns `kubectl get flakesources` shows; `nixroll crd` prints both CRDs.
#[test]
fn flakesource_crd_is_committed_namespaced_and_has_its_columns() {
    let generated = nixroll::api::flakesource_crd_yaml().unwrap();
    for path in ["crds/flakesources.yaml", "charts/nixroll/crds/flakesources.yaml"] {
        let committed = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            generated == committed,
            "{path} is stale: run `cargo run -- crd --only flakesources > {path}` and commit"
        );
    }
    let crd = nixroll::api::flakesource_crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("flakesources.nixroll.io"));
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(cols, ["URL", "REF", "REVISION", "READY", "AGE"]);
    let all = nixroll::api::all_crds_yaml().unwrap();
    assert!(
        all.contains("name: nixosnodes.nixroll.io")
            && all.contains("name: flakesources.nixroll.io")
            && all.contains("name: nixospools.nixroll.io")
    );
    let docs: Vec<serde_json::Value> = all
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
}

/// The NixOSPool CRD: committed (crds/ and the chart) exactly as generated
/// (`cargo run -- crd --only nixospools > crds/nixospools.yaml`), cluster-scoped with the short
/// name `nxp`, a status subresource and the columns `kubectl get nixospools` shows.
#[test]
fn nixospool_crd_is_committed_cluster_scoped_and_has_its_columns() {
    let generated = nixroll::api::nixospool_crd_yaml().unwrap();
    for path in ["crds/nixospools.yaml", "charts/nixroll/crds/nixospools.yaml"] {
        let committed = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            generated == committed,
            "{path} is stale: run `cargo run -- crd --only nixospools > {path}` and commit"
        );
    }
    let kustomization =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/Kustomization")).unwrap();
    assert!(kustomization.contains("nixospools.yaml"));
    let crd = nixroll::api::nixospool_crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("nixospools.nixroll.io"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["nxp".to_owned()][..])
    );
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        cols,
        [
            "NODES",
            "UPDATED",
            "READY",
            "UNAVAILABLE",
            "DEGRADED",
            "REVISION",
            "AGE"
        ]
    );
}

/// Every `description` in `v` (schema properties and printer columns) with its path, and every
/// schema property that has none.
fn descriptions(
    v: &serde_json::Value,
    path: &str,
    found: &mut Vec<(String, String)>,
    missing: &mut Vec<String>,
) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(props) = m.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    if prop.get("description").is_none() {
                        missing.push(format!("{path}.{name}"));
                    }
                }
            }
            for (k, child) in m {
                match (k.as_str(), child) {
                    ("description", serde_json::Value::String(d)) => found.push((path.to_owned(), d.clone())),
                    _ => descriptions(child, &format!("{path}.{k}"), found, missing),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                descriptions(child, &format!("{path}[{i}]"), found, missing);
            }
        }
        _ => {}
    }
}

/// What `kubectl explain` shows must read as text: every type and field described, in whole
/// sentences. A sentence ends with `.` (possibly inside a closing parenthesis or quote); a line
/// break is only a paragraph break (a blank line), never the source's wrapping, which cut
/// sentences in the middle; no "Auto-generated derived type" placeholder.
#[test]
fn every_description_is_whole_sentences() {
    for crd in [
        nixroll::api::crd(),
        nixroll::api::flakesource_crd(),
        nixroll::api::nixospool_crd(),
    ] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let v = serde_json::to_value(&crd).unwrap();
        let (mut found, mut missing) = (Vec::new(), Vec::new());
        descriptions(&v["spec"], "spec", &mut found, &mut missing);
        assert!(
            missing.is_empty(),
            "{name}: properties without a description: {missing:#?}"
        );
        assert!(
            found.len() > 30,
            "{name}: the walk sees the descriptions ({})",
            found.len()
        );
        let top = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"];
        assert!(
            top.as_str().is_some_and(|d| d.contains("nixroll")),
            "{name}: top-level: {top}"
        );
        let mut bad = Vec::new();
        for (path, d) in &found {
            let unwrapped = d.replace("\n\n", " ");
            let ending = d.trim_end_matches([')', '`', '"', '\'']);
            if d.contains("Auto-generated") {
                bad.push(format!("{path}: placeholder: {d:?}"));
            } else if unwrapped.contains('\n') {
                bad.push(format!("{path}: broken mid-sentence: {d:?}"));
            } else if !ending.ends_with('.') {
                bad.push(format!("{path}: does not end a sentence: {d:?}"));
            } else if d.trim() != d {
                bad.push(format!("{path}: surrounding white space: {d:?}"));
            }
        }
        assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
    }
}
