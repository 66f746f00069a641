//! PodDisruptionBudget arithmetic, as the disruption controller computes it.
//!
//! Simplification: `expectedPods` is the number of pods the selector matches (the real
//! controller uses the replicas of the pods' controllers for percentages and `maxUnavailable`;
//! with no workload controllers in the simulation these coincide when every replica exists).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::selector::LabelSelector;

/// (namespace, name).
type Key = (String, String);

/// Which pods each PodDisruptionBudget selects, kept up to date on every write, so that a pod
/// change costs a selector match per PDB of its namespace plus a recount of the PDBs that
/// select it — not a scan of the namespace (the disruption controller's informer index does
/// the same job in a real cluster).
#[derive(Default)]
pub struct PdbIndex {
    entries: BTreeMap<Key, Entry>,
}

struct Entry {
    selector: LabelSelector,
    /// Names of the selected pods (same namespace).
    members: BTreeSet<String>,
}

impl PdbIndex {
    /// A PDB was created or its selector may have changed: re-select among `pods` (the pods of
    /// its namespace).
    pub fn set<'a>(&mut self, key: &Key, pdb: &Value, pods: impl Iterator<Item = &'a Value>) {
        let selector = LabelSelector::from_object(&pdb["spec"]["selector"]);
        let members = pods
            .filter(|p| selector.matches(p))
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        self.entries.insert(key.clone(), Entry { selector, members });
    }

    pub fn remove(&mut self, key: &Key) {
        self.entries.remove(key);
    }

    /// A pod of namespace `ns` changed (`old`/`new`: its versions, `None` for absent): update
    /// the memberships and return the PDBs whose status may have changed.
    pub fn pod_changed(
        &mut self,
        ns: &str,
        name: &str,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Vec<Key> {
        let mut touched = Vec::new();
        for (k, e) in self
            .entries
            .range_mut((ns.to_owned(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
        {
            let was = old.is_some_and(|o| e.selector.matches(o));
            let is = new.is_some_and(|n| e.selector.matches(n));
            if is {
                e.members.insert(name.to_owned());
            } else if was {
                e.members.remove(name);
            }
            if was || is {
                touched.push(k.clone());
            }
        }
        touched
    }

    /// The names of the pods a PDB selects.
    pub fn members(&self, key: &Key) -> impl Iterator<Item = &str> {
        self.entries
            .get(key)
            .into_iter()
            .flat_map(|e| e.members.iter().map(String::as_str))
    }

    /// The PDBs of `ns` that select `pod`.
    pub fn selecting(&self, ns: &str, pod: &Value) -> Vec<Key> {
        self.entries
            .range((ns.to_owned(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
            .filter(|(_, e)| e.selector.matches(pod))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Whether a pod counts as healthy: Ready condition True and not terminating.
pub fn pod_healthy(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// An int-or-string value scaled against `total` (percentages round up, as the controller does).
fn scaled(v: &Value, total: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let pct: i64 = s.strip_suffix('%')?.trim().parse().ok()?;
            Some((pct * total + 99) / 100)
        }
        _ => None,
    }
}

/// The status a PDB should have given the pods it selects (see [`PdbIndex::members`]).
pub fn compute_status<'a>(pdb: &Value, selected: impl Iterator<Item = &'a Value>) -> Value {
    let mut expected = 0i64;
    let mut healthy = 0i64;
    for pod in selected {
        let phase = pod["status"]["phase"].as_str().unwrap_or("");
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        expected += 1;
        if pod_healthy(pod) {
            healthy += 1;
        }
    }
    let spec = &pdb["spec"];
    let desired = if let Some(min) = spec.get("minAvailable").filter(|v| !v.is_null()) {
        scaled(min, expected).unwrap_or(0)
    } else if let Some(max) = spec.get("maxUnavailable").filter(|v| !v.is_null()) {
        (expected - scaled(max, expected).unwrap_or(0)).max(0)
    } else {
        // Neither set: the API defaults minAvailable to 1.
        1
    };
    let allowed = if expected <= 0 {
        0
    } else {
        (healthy - desired).max(0)
    };
    let prev_cond = pdb["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "DisruptionAllowed"))
        .cloned();
    let (cstatus, reason, message) = if allowed > 0 {
        ("True", "SufficientPods", "")
    } else {
        ("False", "InsufficientPods", "")
    };
    let transition = prev_cond
        .as_ref()
        .filter(|c| c["status"] == cstatus)
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or_else(|| json!(super::store::now_string()));
    json!({
        "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
        "disruptionsAllowed": allowed,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "conditions": [{
            "type": "DisruptionAllowed",
            "status": cstatus,
            "reason": reason,
            "message": message,
            "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
            "lastTransitionTime": transition,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Value {
        json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "w"}},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
    }

    #[test]
    fn min_available_and_max_unavailable() {
        let pods = [pod("a", true), pod("b", true), pod("c", false)];
        let min = json!({"metadata": {"namespace": "d", "generation": 1},
                          "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "w"}}}});
        let s = compute_status(&min, pods.iter());
        assert_eq!(s["disruptionsAllowed"], 0);
        assert_eq!(s["currentHealthy"], 2);
        assert_eq!(s["expectedPods"], 3);
        let max = json!({"metadata": {"namespace": "d", "generation": 1},
                          "spec": {"maxUnavailable": "34%", "selector": {"matchLabels": {"app": "w"}}}});
        let s = compute_status(&max, pods.iter());
        // 34% of 3 rounds up to 2 unavailable → desired 1 → 1 disruption allowed.
        assert_eq!(s["desiredHealthy"], 1);
        assert_eq!(s["disruptionsAllowed"], 1);
    }

    #[test]
    fn index_follows_label_changes_and_deletes() {
        let pdb = json!({"metadata": {"namespace": "d", "name": "p"},
                          "spec": {"selector": {"matchLabels": {"app": "w"}}}});
        let key = ("d".to_string(), "p".to_string());
        let (a, b) = (pod("a", true), pod("b", true));
        let mut idx = PdbIndex::default();
        idx.set(&key, &pdb, [&a].into_iter());
        assert_eq!(idx.members(&key).collect::<Vec<_>>(), ["a"]);
        // A new matching pod joins; the PDB is reported as touched.
        assert_eq!(idx.pod_changed("d", "b", None, Some(&b)), vec![key.clone()]);
        // Relabelled away: it leaves, and the PDB is touched once more.
        let mut b2 = b.clone();
        b2["metadata"]["labels"]["app"] = json!("other");
        assert_eq!(idx.pod_changed("d", "b", Some(&b), Some(&b2)), vec![key.clone()]);
        assert_eq!(idx.members(&key).collect::<Vec<_>>(), ["a"]);
        // Changes of unselected pods and of other namespaces touch nothing.
        assert!(idx.pod_changed("d", "b", Some(&b2), None).is_empty());
        assert!(idx.pod_changed("e", "a", None, Some(&a)).is_empty());
        idx.pod_changed("d", "a", Some(&a), None);
        assert_eq!(idx.members(&key).count(), 0);
        assert!(idx.selecting("d", &a).contains(&key));
        idx.remove(&key);
        assert!(idx.selecting("d", &a).is_empty());
    }
}
