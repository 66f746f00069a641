//! CEL gates: list the objects a [`CelGate`] selects (any kind, found through API discovery),
//! then evaluate its expression with `objects` (the list) and `object` (the first, or null)
//! bound. Evaluated with the `cel` crate (cel-rust).
//!
//! Cost is bounded three ways: the expression is at most 1,024 characters (the CRD), at most
//! [`MAX_OBJECTS`] objects are listed (more fail the gate), and comprehensions (`all`, `exists`,
//! `exists_one`, `map`, `filter`) may appear at most [`MAX_COMPREHENSIONS`] times, so the
//! work is at most about 1,000² steps; the whole evaluation runs under the gate's timeout.

use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::GroupVersionKind;

use super::{GateError, Verdict};
use crate::api::CelGate;

/// At most this many objects per gate.
pub const MAX_OBJECTS: u32 = 1000;
/// At most this many comprehension macros in one expression.
pub const MAX_COMPREHENSIONS: usize = 2;
/// The default bound of one evaluation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Compile `expression`, refusing the ones whose cost is not bounded.
pub fn compile(expression: &str) -> Result<cel::Program, GateError> {
    let comprehensions = ["all(", "exists(", "exists_one(", "map(", "filter("]
        .iter()
        .map(|m| expression.matches(&format!(".{m}")).count())
        .sum::<usize>();
    if comprehensions > MAX_COMPREHENSIONS {
        return Err(GateError::TooCostly(MAX_COMPREHENSIONS));
    }
    cel::Program::compile(expression).map_err(|e| GateError::Compile(e.to_string()))
}

/// Evaluate `expression` over `objects` (JSON). Pure.
pub fn evaluate(expression: &str, objects: &[serde_json::Value]) -> Result<Verdict, GateError> {
    let program = compile(expression)?;
    let list = cel::to_value(objects).map_err(|e| GateError::Evaluate(e.to_string()))?;
    let first = cel::to_value(objects.first()).map_err(|e| GateError::Evaluate(e.to_string()))?;
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("objects", list);
    ctx.add_variable_from_value("object", first);
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => Ok(Verdict::Pass),
        Ok(cel::Value::Bool(false)) => Ok(Verdict::Block(format!(
            "{expression} is false over {} object(s)",
            objects.len()
        ))),
        Ok(other) => Err(GateError::NotBool(format!("{other:?}"))),
        Err(e) => Err(GateError::Evaluate(e.to_string())),
    }
}

/// The bound of one evaluation of `gate`.
pub fn timeout_of(gate: &CelGate) -> Duration {
    gate.timeout
        .as_deref()
        .and_then(|t| crate::rollout::parse_duration(t).ok())
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// List the objects `gate` selects (managed fields dropped), as JSON.
pub async fn objects(client: &Client, gate: &CelGate) -> Result<Vec<serde_json::Value>, GateError> {
    let (group, version) = match gate.api_version.split_once('/') {
        Some((g, v)) if !g.is_empty() && !v.is_empty() => (g, v),
        None if !gate.api_version.is_empty() => ("", gate.api_version.as_str()),
        _ => return Err(GateError::BadApiVersion(gate.api_version.clone())),
    };
    let gvk = GroupVersionKind::gvk(group, version, &gate.kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|source| GateError::Discovery {
            api_version: gate.api_version.clone(),
            kind: gate.kind.clone(),
            source,
        })?;
    let api: Api<DynamicObject> = match (&gate.namespace, caps.scope) {
        (Some(ns), kube::discovery::Scope::Namespaced) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    let mut lp = ListParams::default().limit(MAX_OBJECTS);
    if let Some(l) = &gate.label_selector {
        lp = lp.labels(l);
    }
    if let Some(n) = &gate.object_name {
        lp = lp.fields(&format!("metadata.name={n}"));
    }
    let list = api.list(&lp).await.map_err(|source| GateError::List {
        kind: gate.kind.clone(),
        source,
    })?;
    if list.metadata.continue_.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(GateError::TooManyObjects {
            kind: gate.kind.clone(),
            limit: MAX_OBJECTS,
        });
    }
    Ok(list
        .items
        .into_iter()
        .map(|mut o| {
            o.metadata.managed_fields = None;
            serde_json::to_value(o).unwrap_or(serde_json::Value::Null)
        })
        .collect())
}

/// One evaluation of `gate`: list, then evaluate, under the gate's timeout. Never an error:
/// whatever fails blocks, with the reason.
pub async fn check(client: &Client, gate: &CelGate) -> Verdict {
    let timeout = timeout_of(gate);
    let run = async {
        let objs = objects(client, gate).await?;
        let expression = gate.expression.clone();
        tokio::task::spawn_blocking(move || evaluate(&expression, &objs))
            .await
            .map_err(|e| GateError::Evaluate(e.to_string()))?
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => Verdict::Block(e.to_string()),
        Err(_) => Verdict::Block(GateError::Timeout(timeout).to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use serde_json::json;

    use super::*;

    fn volumes(states: &[&str]) -> Vec<serde_json::Value> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"metadata": {"name": format!("pvc-{i}")}, "status": {"robustness": s}}))
            .collect()
    }

    #[test]
    fn every_volume_healthy_passes_and_one_degraded_blocks() {
        let e = "objects.all(v, v.status.robustness == 'healthy')";
        assert_eq!(
            evaluate(e, &volumes(&["healthy", "healthy"])).unwrap(),
            Verdict::Pass
        );
        let Verdict::Block(why) = evaluate(e, &volumes(&["healthy", "degraded"])).unwrap() else {
            panic!("a degraded volume must block")
        };
        assert!(why.contains("is false over 2 object(s)"), "{why}");
        // `object`: the first (a CephCluster by name).
        let ceph = vec![json!({"status": {"ceph": {"health": "HEALTH_OK"}}})];
        assert_eq!(
            evaluate("object.status.ceph.health == 'HEALTH_OK'", &ceph).unwrap(),
            Verdict::Pass
        );
    }

    #[test]
    fn bad_expressions_are_errors_not_passes() {
        assert!(matches!(
            evaluate("objects.all(v,", &[]),
            Err(GateError::Compile(_))
        ));
        assert!(matches!(
            evaluate("size(objects)", &volumes(&["x"])),
            Err(GateError::NotBool(_))
        ));
        assert!(matches!(
            evaluate("object.status.missing == 'x'", &[json!({"status": {}})]),
            Err(GateError::Evaluate(_))
        ));
        let deep = "objects.all(a, objects.all(b, objects.all(c, true)))";
        assert!(matches!(compile(deep), Err(GateError::TooCostly(2))));
        assert!(compile("objects.all(a, objects.exists(b, true))").is_ok());
    }
}
