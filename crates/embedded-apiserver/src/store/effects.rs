//! Side effects of committed writes: CRDs served from CRD objects, a deleted namespace's
//! contents purged, Events bounded to `event_limit`, PodDisruptionBudget status refreshed.

use super::*;

impl State {
    pub(super) fn sync_crd(&mut self, old: Option<&Value>, new: Option<&Value>) {
        if let Some(o) = old {
            let gone: Vec<Gvr> = resources::from_crd(o).iter().map(|r| r.gvr.clone()).collect();
            self.resources.retain(|r| !gone.contains(&r.gvr));
        }
        if let Some(n) = new
            && n["metadata"]["deletionTimestamp"].is_null()
        {
            for r in resources::from_crd(n) {
                self.colls
                    .entry(r.storage_key.clone())
                    .or_insert_with(|| Collection::new(History::new(10_000, self.rv)));
                self.resources.push(r);
            }
            return;
        }
        // The CRD is gone (or going): its objects go with it.
        if let Some(o) = old.or(new)
            && let Some(r) = resources::from_crd(o).first()
            && new.is_none()
        {
            self.colls.remove(&r.storage_key);
        }
    }

    pub(super) fn purge_namespace(&mut self, opts: &StoreOptions, ns: &str) -> Result<(), StoreError> {
        let infos: Vec<Arc<ResourceInfo>> = self.resources.iter().filter(|r| r.namespaced).cloned().collect();
        let mut seen = Vec::new();
        for info in infos {
            if seen.contains(&info.storage_key) {
                continue;
            }
            seen.push(info.storage_key.clone());
            let keys: Vec<Key> = self
                .coll(&info)?
                .objects
                .keys()
                .filter(|k| k.0 == ns)
                .cloned()
                .collect();
            for k in keys {
                self.commit(opts, &info, &k, None)?;
            }
        }
        Ok(())
    }

    pub(super) fn expire_events(
        &mut self,
        opts: &StoreOptions,
        info: &ResourceInfo,
    ) -> Result<(), StoreError> {
        loop {
            let coll = self.coll_mut(info)?;
            if coll.objects.len() <= opts.event_limit {
                return Ok(());
            }
            let Some(k) = coll.order.pop_front() else {
                return Ok(());
            };
            if coll.objects.contains_key(&k) {
                self.commit(opts, info, &k, None)?;
            }
        }
    }

    /// Recompute the status of the given PDBs from the pods they select (the disruption
    /// controller, run synchronously on every pod or PDB change).
    pub(super) fn refresh_pdbs(&mut self, opts: &StoreOptions, pdbs: Vec<Key>) -> Result<(), StoreError> {
        if pdbs.is_empty() {
            return Ok(());
        }
        let pdb_info = self.find(&Gvr::new("policy", "v1", "poddisruptionbudgets"))?;
        let pods_info = self.find(&Gvr::new("", "v1", "pods"))?;
        for k in pdbs {
            let Some(p) = self.stored(&pdb_info, &k) else {
                continue;
            };
            let status = {
                let pods = self.coll(&pods_info)?;
                let members = self
                    .pdbs
                    .members(&k)
                    .filter_map(|name| pods.objects.get(&(k.0.clone(), name.to_owned())))
                    .map(|v| v.as_ref());
                pdb::compute_status(&p, members)
            };
            if p["status"] != status {
                let mut n = (*p).clone();
                n["status"] = status;
                self.commit(opts, &pdb_info, &k, Some(n))?;
            }
        }
        Ok(())
    }
}
