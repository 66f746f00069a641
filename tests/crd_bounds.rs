//! A lint over every CRD nixroll generates, without an API server: what kube-apiserver's CEL
//! cost estimate needs to accept a schema.
//!
//! kube-apiserver estimates each `x-kubernetes-validations` rule's worst case from the schema's
//! bounds: a rule under a list is paid once per item, a rule over a string once per character.
//! A list without `maxItems` (or a map without `maxProperties`, a string without `maxLength`)
//! is sized from the 3 MiB request limit, and the rule's estimate then exceeds the budget by a
//! factor of 50–100 (this is how the NixOSNode CRD was refused by a real server while the
//! embedded one, which estimates nothing, took it). The real-server check is
//! `tests/real_api/crds.rs` (`crds_are_accepted_with_margin_under_the_cel_cost_budget`); this one
//! runs in milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;

/// Every CRD nixroll ships, by name.
fn crds() -> Vec<(String, Value)> {
    [
        nixroll::api::crd(),
        nixroll::api::flakesource_crd(),
        nixroll::api::nixospool_crd(),
    ]
    .into_iter()
    .map(|c| {
        let name = c.metadata.name.clone().unwrap_or_default();
        (name, serde_json::to_value(c).unwrap())
    })
    .collect()
}

/// The `openAPIV3Schema` of each version.
fn schemas(crd: &Value) -> Vec<(String, &Value)> {
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                &v["schema"]["openAPIV3Schema"],
            )
        })
        .collect()
}

/// The schema's children: (path step, schema, whether the step is into a list item or map
/// value, i.e. a step that multiplies a rule's cost).
fn children(s: &Value) -> Vec<(String, &Value, bool)> {
    let mut out = Vec::new();
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            out.push((format!(".{k}"), v, false));
        }
    }
    if let Some(items) = s.get("items") {
        out.push(("[]".to_owned(), items, true));
    }
    if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
        out.push(("{}".to_owned(), ap, true));
    }
    out
}

fn rules(s: &Value) -> Vec<&str> {
    s.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .map(|rs| rs.iter().filter_map(|r| r["rule"].as_str()).collect())
        .unwrap_or_default()
}

/// What bound a node of this type needs, if it has none: `None` when it is bounded.
fn missing_bound(s: &Value) -> Option<&'static str> {
    let has = |k: &str| s.get(k).is_some();
    match s.get("type").and_then(Value::as_str) {
        Some("string") if !has("maxLength") && !has("enum") && !has("format") => Some("maxLength"),
        Some("array") if !has("maxItems") => Some("maxItems"),
        Some("object")
            if s.get("additionalProperties").is_some_and(Value::is_object) && !has("maxProperties") =>
        {
            Some("maxProperties")
        }
        _ => None,
    }
}

/// Every unbounded list, map or string in `s`'s subtree.
fn unbounded_in(s: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(b) = missing_bound(s) {
        out.push(format!("{path} has no {b}"));
    }
    for (step, child, _) in children(s) {
        unbounded_in(child, &format!("{path}{step}"), out);
    }
}

/// A finding for each rule-bearing node whose cost kube-apiserver cannot bound: an unbounded
/// list or map above it, or an unbounded list, map or string at or below it.
fn lint(s: &Value, path: &str, ancestors: &mut Vec<(String, &'static str)>, out: &mut Vec<String>) {
    if !rules(s).is_empty() {
        for (a, b) in ancestors.iter() {
            out.push(format!("{path} carries a rule under {a}, which has no {b}"));
        }
        let mut inner = Vec::new();
        unbounded_in(s, path, &mut inner);
        for i in inner {
            out.push(format!("{path} carries a rule and {i}"));
        }
    }
    for (step, child, multiplies) in children(s) {
        let missing = if multiplies { missing_bound(s) } else { None };
        if let Some(b) = missing {
            ancestors.push((path.to_owned(), b));
        }
        lint(child, &format!("{path}{step}"), ancestors, out);
        if missing.is_some() {
            ancestors.pop();
        }
    }
}

#[test]
fn every_rule_bearing_list_map_and_string_is_bounded() {
    for (name, crd) in crds() {
        for (version, schema) in schemas(&crd) {
            let mut findings = Vec::new();
            lint(schema, "", &mut Vec::new(), &mut findings);
            assert!(
                findings.is_empty(),
                "{name} {version}: kube-apiserver cannot bound these rules' CEL cost (add maxItems, \
                 maxProperties or maxLength):\n  {}",
                findings.join("\n  ")
            );
        }
    }
}

/// Every rule with the schema it applies to, and how many times the rule can run per object
/// at most (the product of the `maxItems`/`maxProperties` above it).
fn rule_sites<'a>(s: &'a Value, path: &str, cardinality: u64, out: &mut Vec<(String, &'a Value, u64)>) {
    if !rules(s).is_empty() {
        out.push((path.to_owned(), s, cardinality));
    }
    for (step, child, multiplies) in children(s) {
        let factor = if multiplies {
            s.get("maxItems")
                .or_else(|| s.get("maxProperties"))
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX / 4)
        } else {
            1
        };
        rule_sites(
            child,
            &format!("{path}{step}"),
            cardinality.saturating_mul(factor),
            out,
        );
    }
}

/// kube-cel's estimate (`estimate_rule_cost`, a coarse model of the apiserver's) finds nothing
/// for any rule, and no rule runs more than 1,024 times per object: the apiserver's per-rule
/// estimate is the rule's cost times that cardinality, so this keeps each rule far below its
/// budget (the real server's verdict and margin: `tests/real_api.rs`).
#[test]
fn kube_cel_estimates_every_rule_within_budget() {
    let mut checked = 0;
    for (name, crd) in crds() {
        for (version, schema) in schemas(&crd) {
            let mut sites = Vec::new();
            rule_sites(schema, "", 1, &mut sites);
            for (path, s, cardinality) in sites {
                let compiled = kube_cel::compile_schema(s);
                for rule in rules(s) {
                    let warnings = kube_cel::estimate_rule_cost(rule, &compiled);
                    assert!(
                        warnings.is_empty(),
                        "{name} {version} {path}: `{rule}`: {warnings:?}"
                    );
                    assert!(
                        cardinality <= 1024,
                        "{name} {version} {path}: `{rule}` may run {cardinality} times per object"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} rules found: the walk is broken");
}

/// Status is written only by nixroll's controller and agent, from a spec the server already
/// validated: rules there would check no user input, cost budget, and could make the server
/// refuse nixroll's own status writes. (A rule on a status field was what broke the CRD.)
#[test]
fn status_carries_no_cel_rules() {
    for (name, crd) in crds() {
        for (version, schema) in schemas(&crd) {
            let mut sites = Vec::new();
            rule_sites(&schema["properties"]["status"], ".status", 1, &mut sites);
            let paths: Vec<_> = sites.iter().map(|(p, _, _)| p.as_str()).collect();
            assert!(paths.is_empty(), "{name} {version}: rules in status at {paths:?}");
        }
    }
}

/// The schema's `maxItems` for status.history is the number of entries the controller keeps.
#[test]
fn history_bound_is_the_controllers_limit() {
    let crd = serde_json::to_value(nixroll::api::crd()).unwrap();
    let history = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["history"];
    assert_eq!(
        history["maxItems"].as_u64(),
        Some(nixroll::rollout::HISTORY_LIMIT as u64)
    );
}

/// The lint finds what it is for: a rule-bearing string inside an unbounded list (the shape
/// that was refused).
#[test]
fn lint_catches_a_rule_under_an_unbounded_list() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {
                    "type": "string", "maxLength": 253,
                    "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}]
                }}}
            },
            "free": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]}
        }
    });
    let mut findings = Vec::new();
    lint(&schema, "", &mut Vec::new(), &mut findings);
    assert_eq!(
        findings,
        vec![
            ".free carries a rule and .free has no maxLength".to_owned(),
            ".items[].name carries a rule under .items, which has no maxItems".to_owned(),
        ]
    );
}
