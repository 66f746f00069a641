//! Deletion and eviction: graceful deletion of pods, finalizers, cascading namespace deletion,
//! and the Eviction subresource guarded by PodDisruptionBudgets.

use super::*;

impl State {
    pub(super) fn delete(
        &mut self,
        opts: &StoreOptions,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
        dopts: &DeleteOptions,
    ) -> Result<Deleted, StoreError> {
        let key = self.key(info, ns, name);
        let Some(stored) = self.stored(info, &key) else {
            return Err(not_found(info, name));
        };
        let old = view(info, &stored);
        if let Some(uid) = dopts.uid.as_deref().filter(|u| !u.is_empty())
            && uid != meta_str(&old, "uid")
        {
            return Err(StoreError::Conflict {
                resource: info.gvr.group_resource(),
                name: name.to_owned(),
                message: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
                causes: Vec::new(),
            });
        }
        if let Some(rv) = dopts.resource_version.as_deref().filter(|r| !r.is_empty())
            && rv != meta_str(&old, "resourceVersion")
        {
            return Err(StoreError::Conflict {
                resource: info.gvr.group_resource(),
                name: name.to_owned(),
                message: format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion")
                ),
                causes: Vec::new(),
            });
        }
        let is_pod = info.gvr.group.is_empty() && info.gvr.plural == "pods";
        let mut grace = 0i64;
        if is_pod {
            let existing = old["metadata"]["deletionGracePeriodSeconds"].as_i64();
            grace = dopts
                .grace_period_seconds
                .or(existing)
                .or(old["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(0);
            let phase = old["status"]["phase"].as_str().unwrap_or("");
            let unscheduled = old["spec"]["nodeName"].as_str().unwrap_or("").is_empty();
            if unscheduled || phase == "Succeeded" || phase == "Failed" {
                grace = 0;
            }
            if let Some(e) = existing {
                grace = grace.min(e);
            }
        }
        let has_finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if grace == 0 && !has_finalizers {
            let last = self.commit(opts, info, &key, None)?;
            return Ok(Deleted::Gone((*view(info, &last)).clone()));
        }
        let mut new = (*old).clone();
        let terminating = !old["metadata"]["deletionTimestamp"].is_null();
        let existing_grace = old["metadata"]["deletionGracePeriodSeconds"].as_i64();
        if terminating && existing_grace == Some(grace) {
            return Ok(Deleted::Pending((*old).clone()));
        }
        new["metadata"]["deletionTimestamp"] = json!(time_plus(grace));
        new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        let out = self.commit(opts, info, &key, Some(unview(info, new)))?;
        Ok(Deleted::Pending((*view(info, &out)).clone()))
    }

    pub(super) fn evict(
        &mut self,
        opts: &StoreOptions,
        ns: &str,
        name: &str,
        eviction: &Value,
    ) -> Result<(), StoreError> {
        let pods = self.find(&Gvr::new("", "v1", "pods"))?;
        let key = (ns.to_owned(), name.to_owned());
        let Some(pod) = self.stored(&pods, &key) else {
            return Err(not_found(&pods, name));
        };
        let dopts = &eviction["deleteOptions"];
        let del = DeleteOptions {
            grace_period_seconds: dopts["gracePeriodSeconds"].as_i64(),
            uid: dopts["preconditions"]["uid"].as_str().map(str::to_owned),
            resource_version: dopts["preconditions"]["resourceVersion"]
                .as_str()
                .map(str::to_owned),
        };
        let phase = pod["status"]["phase"].as_str().unwrap_or("");
        let ignore_pdb = matches!(phase, "Succeeded" | "Failed" | "Pending")
            || !pod["metadata"]["deletionTimestamp"].is_null();
        if !ignore_pdb {
            let pdb_info = self.find(&Gvr::new("policy", "v1", "poddisruptionbudgets"))?;
            let matching: Vec<(Key, Arc<Value>)> = self
                .pdbs
                .selecting(ns, &pod)
                .into_iter()
                .filter_map(|k| self.stored(&pdb_info, &k).map(|p| (k, p)))
                .collect();
            if matching.len() > 1 {
                return Err(StoreError::Internal {
                    message: "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.".into(),
                });
            }
            if let Some((pkey, p)) = matching.into_iter().next() {
                let st = &p["status"];
                let allowed = st["disruptionsAllowed"].as_i64().unwrap_or(0);
                let healthy = st["currentHealthy"].as_i64().unwrap_or(0);
                let desired = st["desiredHealthy"].as_i64().unwrap_or(0);
                let pdb_name = meta_str(&p, "name").to_owned();
                let unhealthy_ok = !pdb::pod_healthy(&pod) && healthy >= desired;
                if allowed < 0 {
                    return Err(StoreError::Forbidden {
                        message: "pdb disruptions allowed is negative".into(),
                    });
                }
                if allowed == 0 && !unhealthy_ok {
                    return Err(StoreError::TooManyRequests {
                        message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                        causes: vec![Cause {
                            reason: "DisruptionBudget".into(),
                            message: format!(
                                "The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently"
                            ),
                            field: String::new(),
                        }],
                    });
                }
                if !unhealthy_ok {
                    // Record the disruption before deleting, as the eviction REST handler does.
                    let mut n = (*p).clone();
                    n["status"]["disruptionsAllowed"] = json!(allowed - 1);
                    n["status"]["disruptedPods"][name] = json!(now_string());
                    self.commit(opts, &pdb_info, &pkey, Some(n))?;
                }
            }
        }
        self.delete(opts, &pods, Some(ns), name, &del)?;
        Ok(())
    }
}
