//! The committed CRD must be exactly what `nixroll crd` prints (regenerate with
//! `cargo run -- crd > crds/nixosnodes.yaml`).

#[test]
fn committed_crd_matches_generated() {
    let generated = nixroll::api::crd_yaml().unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/nixosnodes.yaml")).unwrap();
    assert!(
        generated == committed,
        "crds/nixosnodes.yaml is stale: run `cargo run -- crd > crds/nixosnodes.yaml` and commit"
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
