//! The CRD's admission rules (`x-kubernetes-validations`, CEL) evaluated with kube's CEL engine
//! (`kube-cel`, a dev-dependency only) against good and bad manifests: bad input must be
//! rejected with a message that says what to fix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kube_cel::Validator;
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = nixroll::api::crd();
    let v = &crd.spec.versions[0];
    serde_json::to_value(v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn example() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/nixosnode.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn errors(obj: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), obj, None) {
        Ok(()) => Vec::new(),
        Err(errs) => errs
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn with(path: &[&str], value: Value) -> Value {
    let mut obj = example();
    let mut cur = &mut obj;
    for p in &path[..path.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    cur[path[path.len() - 1]] = value;
    obj
}

#[test]
fn the_example_manifest_is_valid() {
    assert_eq!(errors(&example()), Vec::<String>::new());
    // And it deserialises into the typed API.
    let _: nixroll::api::NixOSNode = serde_json::from_value(example()).unwrap();
}

#[test]
fn bad_fields_are_rejected_with_a_message_that_says_what_to_fix() {
    let cases: Vec<(Value, &str)> = vec![
        (with(&["spec", "revision"], json!("main")), "40-character"),
        (with(&["spec", "revision"], json!("0123456")), "40-character"),
        (
            with(
                &["spec", "revision"],
                json!("0123456789ABCDEF0123456789ABCDEF01234567"),
            ),
            "lowercase hex",
        ),
        (
            with(&["spec", "flake"], json!("git+https://example.org/x.git?rev=abc")),
            "without revision",
        ),
        (
            with(&["spec", "flake"], json!("https://example.org/x.git")),
            "flake reference",
        ),
        (
            with(&["spec", "flake"], json!("github:me/infra#host")),
            "without revision or fragment",
        ),
        (with(&["spec", "configuration"], json!("a b")), "attribute name"),
        (
            with(&["spec", "maintenanceWindows", "0", "start"], json!("25:00")),
            "HH:MM",
        ),
        (
            with(&["spec", "maintenanceWindows", "0", "end"], json!("5am")),
            "HH:MM",
        ),
        (
            with(&["spec", "maintenanceWindows", "0", "end"], json!("22:00")),
            "start != end",
        ),
        (
            with(&["spec", "maintenanceWindows", "0", "timeZone"], json!("CEST+2")),
            "IANA",
        ),
        (
            with(&["spec", "drain", "timeout"], json!("ten minutes")),
            "duration",
        ),
    ];
    for (obj, want) in cases {
        let errs = errors(&obj);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "expected an error containing {want:?} for {}, got {errs:?}",
            obj["spec"]
        );
    }
}

#[test]
fn good_variants_are_accepted() {
    for flake in [
        "github:owner/repo",
        "git+ssh://git@example.org/infra.git",
        "git+file:///srv/infra",
        "path:/tmp/flake",
    ] {
        let errs = errors(&with(&["spec", "flake"], json!(flake)));
        assert!(errs.is_empty(), "{flake}: {errs:?}");
    }
    for tz in [
        "UTC",
        "Europe/Berlin",
        "America/Argentina/Buenos_Aires",
        "Etc/GMT+2",
    ] {
        let errs = errors(&with(&["spec", "maintenanceWindows", "0", "timeZone"], json!(tz)));
        assert!(errs.is_empty(), "{tz}: {errs:?}");
    }
    let errs = errors(&with(&["spec", "drain", "timeout"], json!("1h30m")));
    assert!(errs.is_empty(), "{errs:?}");
}

fn with_secrets(secrets: Value) -> Value {
    with(&["spec", "secrets"], secrets)
}

fn secret(path: &str) -> Value {
    json!({"secretRef": {"name": "k3s-token", "key": "token"}, "path": path})
}

#[test]
fn secrets_are_validated_with_clear_messages() {
    // A good list (defaults filled in by the typed API).
    let good = with_secrets(json!([
        secret("/var/lib/rancher/k3s/server/token"),
        {"secretRef": {"name": "wifi.home", "key": "psk"}, "path": "/etc/wpa/psk", "mode": "0640",
         "owner": "root:wheel", "restartUnits": ["wpa_supplicant.service", "systemd-networkd"]},
        {"secretRef": {"name": "git", "key": "netrc"}, "path": "/root/.netrc", "owner": "0:0", "mode": "600"},
    ]));
    assert_eq!(errors(&good), Vec::<String>::new());
    let node: nixroll::api::NixOSNode = serde_json::from_value(good).unwrap();
    assert_eq!(node.spec.secrets[0].mode, "0400");
    assert_eq!(node.spec.secrets[0].owner, "root:root");

    let cases: Vec<(Value, &str)> = vec![
        (with_secrets(json!([secret("relative/path")])), "absolute"),
        (with_secrets(json!([secret("/etc/../root/x")])), "`..`"),
        (with_secrets(json!([secret("/etc/./x")])), "`..` or `.`"),
        (
            with_secrets(json!([secret("/nix/store/abc-secret")])),
            "outside /nix",
        ),
        (with_secrets(json!([secret("/nix")])), "outside /nix"),
        (with_secrets(json!([secret("//nix/var/x")])), "outside /nix"),
        (with_secrets(json!([secret("/etc/secrets/")])), "must name a file"),
        (
            with_secrets(
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "mode": "0644x"}]),
            ),
            "octal",
        ),
        (
            with_secrets(json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "mode": "0800"}])),
            "octal",
        ),
        (
            with_secrets(json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "mode": "4755"}])),
            "octal",
        ),
        (
            with_secrets(
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "owner": "root"}]),
            ),
            "USER:GROUP",
        ),
        (
            with_secrets(
                json!([{"secretRef": {"name": "s", "key": "k"}, "path": "/etc/x", "restartUnits": ["--now"]}]),
            ),
            "unit names",
        ),
        (
            with_secrets(json!([{"secretRef": {"name": "Bad_Name", "key": "k"}, "path": "/etc/x"}])),
            "secretRef.name",
        ),
        (
            with_secrets(json!([{"secretRef": {"name": "s", "key": "a/b"}, "path": "/etc/x"}])),
            "secretRef.key",
        ),
    ];
    for (obj, want) in cases {
        let errs = errors(&obj);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "expected an error containing {want:?} for {}, got {errs:?}",
            obj["spec"]["secrets"]
        );
    }
    // A path appears once: the list is keyed by it (the API server answers a duplicate with
    // `Duplicate value`; tests/real_api/crds.rs sends one to a real server).
    let secrets = &schema()["properties"]["spec"]["properties"]["secrets"];
    assert_eq!(secrets["x-kubernetes-list-type"], json!("map"));
    assert_eq!(secrets["x-kubernetes-list-map-keys"], json!(["path"]));
}

fn following(source_ref: Value) -> Value {
    let mut obj = example();
    obj["spec"].as_object_mut().unwrap().remove("revision");
    obj["spec"]["sourceRef"] = source_ref;
    obj
}

#[test]
fn exactly_one_of_revision_and_source_ref() {
    // sourceRef instead of revision: valid, and with a FlakeSource the flake may be omitted.
    let ok = following(json!({"kind": "FlakeSource", "name": "infra"}));
    assert_eq!(errors(&ok), Vec::<String>::new());
    let mut no_flake = ok.clone();
    no_flake["spec"].as_object_mut().unwrap().remove("flake");
    assert_eq!(errors(&no_flake), Vec::<String>::new());
    let node: nixroll::api::NixOSNode = serde_json::from_value(no_flake).unwrap();
    assert_eq!(node.spec.revision, "");
    assert_eq!(node.spec.source_ref.unwrap().namespace(), "nixroll-system");
    // A GitRepository gives no flake: it stays required.
    let mut flux = following(json!({"kind": "GitRepository", "name": "infra", "namespace": "flux-system"}));
    assert_eq!(errors(&flux), Vec::<String>::new());
    flux["spec"].as_object_mut().unwrap().remove("flake");
    assert!(
        errors(&flux).iter().any(|e| e.contains("flake is required")),
        "{:?}",
        errors(&flux)
    );
    // Both, or neither.
    let mut both = ok.clone();
    both["spec"]["revision"] = json!("0123456789abcdef0123456789abcdef01234567");
    assert!(
        errors(&both)
            .iter()
            .any(|e| e.contains("exactly one of revision")),
        "{:?}",
        errors(&both)
    );
    let mut neither = example();
    neither["spec"].as_object_mut().unwrap().remove("revision");
    assert!(
        errors(&neither)
            .iter()
            .any(|e| e.contains("exactly one of revision"))
    );
    // Only the two kinds (an enum: checked by the schema, not by CEL).
    let kinds = &schema()["properties"]["spec"]["properties"]["sourceRef"]["properties"]["kind"]["enum"];
    assert_eq!(kinds, &json!(["FlakeSource", "GitRepository"]));
}

fn flakesource_schema() -> Value {
    let crd = nixroll::api::flakesource_crd();
    let v = &crd.spec.versions[0];
    serde_json::to_value(v.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn flakesource_errors(spec: Value) -> Vec<String> {
    let obj = json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": "infra", "namespace": "nixroll-system"}, "spec": spec});
    match Validator::new().validate(&flakesource_schema(), &obj, None) {
        Ok(()) => Vec::new(),
        Err(errs) => errs
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

#[test]
fn flakesource_rules_say_what_to_fix() {
    let good = json!({"url": "https://git.example.org/infra.git", "ref": {"branch": "main"}});
    assert_eq!(flakesource_errors(good.clone()), Vec::<String>::new());
    let fs: nixroll::api::FlakeSource = serde_json::from_value(json!({"apiVersion": "nixroll.io/v1alpha1",
        "kind": "FlakeSource", "metadata": {"name": "x"}, "spec": good}))
    .unwrap();
    assert_eq!(
        (fs.spec.interval.as_str(), fs.spec.timeout.as_str()),
        ("5m", "60s")
    );
    for spec in [
        json!({"url": "ssh://git@git.example.org:2222/infra.git", "ref": {"tag": "v1"}}),
        json!({"url": "file:///srv/infra.git", "insecure": true, "ref": {"semver": ">=1.0"}}),
        json!({"url": "https://h/r", "ref": {"name": "refs/pull/1/head"}, "interval": "30s",
               "secretRef": {"name": "git-creds"}, "allowNonFastForward": true}),
        json!({"url": "https://h/r", "ref": {"branch": "main"},
               "verify": {"secretRef": {"name": "trusted-keys"}}}),
        json!({"url": "https://h/r", "ref": {"semver": ">=1"},
               "verify": {"mode": "TagAndHEAD", "secretRef": {"name": "trusted-keys"}}}),
        json!({"url": "https://h/r", "ref": {"name": "refs/tags/v1"},
               "verify": {"mode": "Tag", "secretRef": {"name": "trusted-keys"}}}),
    ] {
        assert_eq!(flakesource_errors(spec.clone()), Vec::<String>::new(), "{spec}");
    }
    let cases = [
        (
            json!({"url": "http://h/r", "ref": {"branch": "main"}}),
            "insecure: true",
        ),
        (
            json!({"url": "file:///r", "ref": {"branch": "main"}}),
            "insecure: true",
        ),
        (
            json!({"url": "https://bot:tok@h/r", "ref": {"branch": "main"}}),
            "password or token",
        ),
        (
            json!({"url": "https://tok@h/r", "ref": {"branch": "main"}}),
            "only ssh:// may name a user",
        ),
        (
            json!({"url": "git@h:r.git", "ref": {"branch": "main"}}),
            "ssh://user@host/path",
        ),
        (
            json!({"url": "https://h/r?private_token=x", "ref": {"branch": "main"}}),
            "query",
        ),
        (json!({"url": "https://h/r", "ref": {}}), "exactly one of branch"),
        (
            json!({"url": "https://h/r", "ref": {"branch": "a", "tag": "b"}}),
            "exactly one of branch",
        ),
        (
            json!({"url": "https://h/r", "ref": {"name": "main"}}),
            "starting with refs/",
        ),
        (
            json!({"url": "https://h/r", "ref": {"branch": "main"}, "interval": "5 minutes"}),
            "duration",
        ),
        (
            json!({"url": "https://h/r", "ref": {"branch": "main"}, "interval": "10s"}),
            "at least 30s",
        ),
        (
            json!({"url": "https://h/r", "ref": {"branch": "main"},
                   "verify": {"mode": "Tag", "secretRef": {"name": "trusted-keys"}}}),
            "need a tag to verify",
        ),
        (
            json!({"url": "https://h/r", "ref": {"name": "refs/heads/main"},
                   "verify": {"mode": "TagAndHEAD", "secretRef": {"name": "trusted-keys"}}}),
            "need a tag to verify",
        ),
    ];
    for (spec, want) in cases {
        let errs = flakesource_errors(spec.clone());
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{spec}: want {want:?}, got {errs:?}"
        );
    }
}

/// examples/following.yaml: its FlakeSource passes the FlakeSource CRD's schema rules and
/// parses; its NixOSNode is checked with every other example (tests/deploy.rs).
#[test]
fn the_following_example_is_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/following.yaml")).unwrap();
    let docs: Vec<Value> = text
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let fs = docs.iter().find(|d| d["kind"] == "FlakeSource").unwrap();
    assert_eq!(flakesource_errors(fs["spec"].clone()), Vec::<String>::new());
    let _: nixroll::api::FlakeSource = serde_json::from_value(fs.clone()).unwrap();
    let node = docs.iter().find(|d| d["kind"] == "NixOSNode").unwrap();
    assert_eq!(errors(node), Vec::<String>::new());
}
