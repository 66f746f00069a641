//! The object store: one global resourceVersion counter (as etcd), collections of JSON objects,
//! bounded change history for watch resumption, and every write path of the API (create,
//! update, patch, server-side apply, delete, eviction) with the real server's semantics.
//! [`Store`] is also the in-process API of simulated kubelets (no HTTP, same semantics).
//!
//! This file holds the objects, the resourceVersion counter, get/list and commits; the write
//! paths are in `writes`, their admission helpers in `admission`, deletion and eviction in
//! `deletion`, commit side effects in `effects`, watches and their fault injection in
//! `watching`, typed (`kube::Resource`) conveniences in `typed`, and call options in `options`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};

use super::convert::{unview, view};
use super::error::{Cause, StoreError};
use super::fields::{
    self, Ctx, FieldSet, ManagedEntry, diff_fields, fields_of, merge_apply, path_string, read_managed,
    remove_at, value_at, write_managed,
};
use super::pdb;
use super::resources::{self, Gvr, ResourceInfo};
use super::selector::{FieldSelector, LabelSelector};
use super::watch::{HistEntry, History, Watchers};

mod admission;
mod deletion;
mod effects;
mod options;
mod typed;
mod watching;
mod writes;

use admission::*;
pub use options::*;

type Key = (String, String);

struct Collection {
    objects: BTreeMap<Key, Arc<Value>>,
    history: History,
    watchers: Watchers,
    order: VecDeque<Key>,
    /// `spec.nodeName` → keys (as the real watch cache indexes pods by node).
    by_node: HashMap<String, std::collections::BTreeSet<Key>>,
}

impl Collection {
    fn new(history: History) -> Collection {
        Collection {
            objects: BTreeMap::new(),
            history,
            watchers: Watchers::default(),
            order: VecDeque::new(),
            by_node: HashMap::new(),
        }
    }

    fn index(&mut self, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        let node = |o: Option<&Value>| {
            o.and_then(|o| o["spec"]["nodeName"].as_str())
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        let (o, n) = (node(old), node(new));
        if o == n {
            return;
        }
        if let Some(o) = o
            && let Some(set) = self.by_node.get_mut(&o)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_node.remove(&o);
            }
        }
        if let Some(n) = n {
            self.by_node.entry(n).or_default().insert(key.clone());
        }
    }
}

/// Which kind of write is in progress: the forms of a `Strict` refusal differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Create,
    Update,
    Patch,
}

/// The write in progress (the lock is held for the whole write).
struct Admission {
    validation: FieldValidation,
    kind: WriteKind,
    warnings: Vec<String>,
}

struct State {
    rv: u64,
    admission: Admission,
    resources: Vec<Arc<ResourceInfo>>,
    colls: HashMap<String, Collection>,
    /// Which pods each PDB selects (kept by `after_commit`).
    pdbs: pdb::PdbIndex,
}

struct Inner {
    state: Mutex<State>,
    opts: StoreOptions,
    next_watch: AtomicU64,
}

/// Handle on the store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Now, as Kubernetes writes `metav1.Time` (RFC 3339, seconds).
pub fn now_string() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn time_plus(secs: i64) -> String {
    let now = jiff::Timestamp::now();
    let later = now
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or(now);
    later.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(CHARS[fastrand::usize(..CHARS.len())]))
        .collect()
}

fn meta_str<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// Whether two versions differ outside metadata and status (what `generation` tracks).
fn spec_changed(old: &Value, new: &Value) -> bool {
    let skip = |k: &String| matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind");
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    let ok: Vec<_> = o.iter().filter(|(k, _)| !skip(k)).collect();
    let nk: Vec<_> = n.iter().filter(|(k, _)| !skip(k)).collect();
    ok != nk
}

fn conflict_modified(info: &ResourceInfo, name: &str) -> StoreError {
    StoreError::Conflict {
        resource: info.gvr.group_resource(),
        name: name.to_owned(),
        message: format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
            info.gvr.group_resource(),
            name
        ),
        causes: Vec::new(),
    }
}

fn not_found(info: &ResourceInfo, name: &str) -> StoreError {
    StoreError::NotFound {
        resource: info.gvr.group_resource(),
        name: name.to_owned(),
    }
}

enum Managed {
    Update(String),
    Set(Vec<ManagedEntry>),
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave a half-written object behind (every write is
    // computed before it is committed), so a poisoned lock is safe to reuse.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// An empty store with the built-in kinds and the namespaces a fresh cluster has.
    pub fn new(opts: StoreOptions) -> Store {
        let mut colls = HashMap::new();
        let resources = resources::builtins();
        for r in &resources {
            colls
                .entry(r.storage_key.clone())
                .or_insert_with(|| Collection::new(History::new(opts.history_per_collection, 0)));
        }
        let store = Store {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rv: 1,
                    admission: Admission {
                        validation: FieldValidation::Warn,
                        kind: WriteKind::Create,
                        warnings: Vec::new(),
                    },
                    resources,
                    colls,
                    pdbs: pdb::PdbIndex::default(),
                }),
                opts,
                next_watch: AtomicU64::new(1),
            }),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = store.create(
                &Gvr::new("", "v1", "namespaces"),
                None,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                &WriteOptions::manager("kube-apiserver"),
            );
        }
        store
    }

    /// The store's options.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner).rv
    }

    /// Every served resource (built-ins and those of established CRDs).
    pub fn resources(&self) -> Vec<Arc<ResourceInfo>> {
        lock(&self.inner).resources.clone()
    }

    /// The served resource at `gvr`.
    pub fn resource(&self, gvr: &Gvr) -> Result<Arc<ResourceInfo>, StoreError> {
        lock(&self.inner).find(gvr)
    }

    /// Get one object.
    pub fn get(&self, gvr: &Gvr, ns: Option<&str>, name: &str) -> Result<Value, StoreError> {
        let st = lock(&self.inner);
        let info = st.find(gvr)?;
        let key = st.key(&info, ns, name);
        st.coll(&info)?
            .objects
            .get(&key)
            .map(|o| (*view(&info, o)).clone())
            .ok_or_else(|| not_found(&info, name))
    }

    /// List objects (all namespaces when `ns` is None).
    pub fn list(&self, gvr: &Gvr, ns: Option<&str>, opts: &ListOptions) -> Result<ObjectList, StoreError> {
        let labels = LabelSelector::parse(opts.label_selector.as_deref().unwrap_or(""))?;
        let fields = FieldSelector::parse(opts.field_selector.as_deref().unwrap_or(""))?;
        let st = lock(&self.inner);
        let info = st.find(gvr)?;
        let coll = st.coll(&info)?;
        let keep = |o: &Arc<Value>| labels.matches(o) && fields.matches(o);
        let in_ns = |k: &Key| ns.is_none_or(|n| n == k.0);
        let items = match fields.equality_on("spec.nodeName").filter(|n| !n.is_empty()) {
            Some(node) => coll
                .by_node
                .get(node)
                .map(|keys| {
                    keys.iter()
                        .filter(|k| in_ns(k))
                        .filter_map(|k| coll.objects.get(k))
                        .map(|o| view(&info, o))
                        .filter(keep)
                        .collect()
                })
                .unwrap_or_default(),
            None => coll
                .objects
                .iter()
                .filter(|(k, _)| in_ns(k))
                .map(|(_, o)| view(&info, o))
                .filter(keep)
                .collect(),
        };
        Ok(ObjectList {
            resource_version: st.rv,
            items,
        })
    }

    /// Create an object (POST).
    pub fn create(
        &self,
        gvr: &Gvr,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, StoreError> {
        let mut obj = obj;
        let mut st = lock(&self.inner);
        let info = st.find(gvr)?;
        decode_body(&info, &mut obj, opts, WriteKind::Create)?;
        let manager = opts.field_manager.clone().unwrap_or_else(|| "unknown".into());
        st.begin(opts, WriteKind::Create);
        let r = st.create(&self.inner.opts, &info, ns, obj, Managed::Update(manager));
        opts.warnings.extend(std::mem::take(&mut st.admission.warnings));
        r
    }

    /// Replace an object (PUT), on the main endpoint or `/status`.
    pub fn update(
        &self,
        gvr: &Gvr,
        ns: Option<&str>,
        obj: Value,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> Result<Value, StoreError> {
        let mut obj = obj;
        let mut st = lock(&self.inner);
        let info = st.find(gvr)?;
        decode_body(&info, &mut obj, opts, WriteKind::Update)?;
        let manager = opts.field_manager.clone().unwrap_or_else(|| "unknown".into());
        st.begin(opts, WriteKind::Update);
        let r = st.update(&self.inner.opts, &info, ns, obj, sub, &manager);
        opts.warnings.extend(std::mem::take(&mut st.admission.warnings));
        r
    }

    /// Patch an object (PATCH), including server-side apply.
    pub fn patch(
        &self,
        gvr: &Gvr,
        ns: Option<&str>,
        name: &str,
        patch: &Patch,
        sub: Subresource,
        opts: &WriteOptions,
    ) -> Result<Value, StoreError> {
        let mut st = lock(&self.inner);
        let info = st.find(gvr)?;
        st.begin(opts, WriteKind::Patch);
        let r = st.patch(&self.inner.opts, &info, ns, name, patch, sub, opts);
        opts.warnings.extend(std::mem::take(&mut st.admission.warnings));
        r
    }

    /// Delete an object (DELETE). Pods with a grace period and objects with finalizers linger
    /// with `deletionTimestamp`.
    pub fn delete(
        &self,
        gvr: &Gvr,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Deleted, StoreError> {
        let mut st = lock(&self.inner);
        let info = st.find(gvr)?;
        st.delete(&self.inner.opts, &info, ns, name, opts)
    }

    /// The kubelet's last word on a terminating pod: remove it now (a delete with grace period
    /// 0; finalizers still hold it until they are removed).
    pub fn finish_pod_deletion(&self, ns: &str, name: &str) -> Result<Deleted, StoreError> {
        self.delete(
            &Gvr::new("", "v1", "pods"),
            Some(ns),
            name,
            &DeleteOptions {
                grace_period_seconds: Some(0),
                ..DeleteOptions::default()
            },
        )
    }

    /// `POST .../pods/{name}/eviction`: evict unless a PodDisruptionBudget forbids it (429).
    pub fn evict(&self, ns: &str, name: &str, eviction: &Value) -> Result<(), StoreError> {
        let mut st = lock(&self.inner);
        st.evict(&self.inner.opts, ns, name, eviction)
    }
}

impl State {
    fn begin(&mut self, opts: &WriteOptions, kind: WriteKind) {
        self.admission = Admission {
            validation: opts.field_validation,
            kind,
            warnings: Vec::new(),
        };
    }

    fn find(&self, gvr: &Gvr) -> Result<Arc<ResourceInfo>, StoreError> {
        self.resources
            .iter()
            .find(|r| r.gvr == *gvr)
            .cloned()
            .ok_or_else(|| StoreError::UnknownResource {
                path: format!("{}/{}", gvr.api_version(), gvr.plural),
            })
    }

    fn key(&self, info: &ResourceInfo, ns: Option<&str>, name: &str) -> Key {
        let ns = if info.namespaced {
            ns.unwrap_or("").to_owned()
        } else {
            String::new()
        };
        (ns, name.to_owned())
    }

    fn coll(&self, info: &ResourceInfo) -> Result<&Collection, StoreError> {
        self.colls
            .get(&info.storage_key)
            .ok_or_else(|| StoreError::UnknownResource {
                path: info.storage_key.clone(),
            })
    }

    fn coll_mut(&mut self, info: &ResourceInfo) -> Result<&mut Collection, StoreError> {
        self.colls
            .get_mut(&info.storage_key)
            .ok_or_else(|| StoreError::UnknownResource {
                path: info.storage_key.clone(),
            })
    }

    fn stored(&self, info: &ResourceInfo, key: &Key) -> Option<Arc<Value>> {
        self.colls
            .get(&info.storage_key)
            .and_then(|c| c.objects.get(key))
            .cloned()
    }

    /// Commit a change: bump the resourceVersion, store or remove, record history, notify
    /// watchers, then run the side effects of the change (PDB status, CRD registration, event
    /// expiry).
    fn commit(
        &mut self,
        opts: &super::store::StoreOptions,
        info: &ResourceInfo,
        key: &Key,
        new: Option<Value>,
    ) -> Result<Arc<Value>, StoreError> {
        self.rv += 1;
        let rv = self.rv;
        let coll = self
            .colls
            .get_mut(&info.storage_key)
            .ok_or_else(|| StoreError::UnknownResource {
                path: info.storage_key.clone(),
            })?;
        let old = coll.objects.get(key).cloned();
        coll.index(key, old.as_deref(), new.as_ref());
        let (old_h, new_h, result) = match new {
            Some(mut n) => {
                n["metadata"]["resourceVersion"] = json!(rv.to_string());
                let n = Arc::new(n);
                if old.is_none() {
                    coll.order.push_back(key.clone());
                }
                coll.objects.insert(key.clone(), n.clone());
                (old, Some(n.clone()), n)
            }
            None => {
                coll.objects.remove(key);
                let mut last = old.as_deref().cloned().unwrap_or(Value::Null);
                last["metadata"]["resourceVersion"] = json!(rv.to_string());
                let last = Arc::new(last);
                (Some(last.clone()), None, last)
            }
        };
        coll.watchers
            .dispatch(old_h.as_ref(), new_h.as_ref(), rv, &|i, o| view(i, o));
        coll.history.push(HistEntry {
            rv,
            old: old_h.clone(),
            new: new_h.clone(),
        });
        self.after_commit(opts, info, key, old_h.as_deref(), new_h.as_deref())?;
        Ok(result)
    }

    fn after_commit(
        &mut self,
        opts: &StoreOptions,
        info: &ResourceInfo,
        key: &Key,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), StoreError> {
        match (info.gvr.group.as_str(), info.gvr.plural.as_str()) {
            ("", "pods") => {
                let touched = self.pdbs.pod_changed(&key.0, &key.1, old, new);
                self.refresh_pdbs(opts, touched)?;
            }
            ("policy", "poddisruptionbudgets") => match new {
                None => self.pdbs.remove(key),
                Some(new) => {
                    let spec_changed = old.map(|o| &o["spec"]) != Some(&new["spec"]);
                    if spec_changed {
                        let pods_info = self.find(&Gvr::new("", "v1", "pods"))?;
                        // Disjoint borrows of two fields: the pods and the index.
                        let pods = self
                            .colls
                            .get(&pods_info.storage_key)
                            .into_iter()
                            .flat_map(|c| c.objects.range((key.0.clone(), String::new())..))
                            .take_while(|(k, _)| k.0 == key.0)
                            .map(|(_, v)| v.as_ref());
                        self.pdbs.set(key, new, pods);
                        self.refresh_pdbs(opts, vec![key.clone()])?;
                    }
                }
            },
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                self.sync_crd(old, new);
            }
            ("", "namespaces") if new.is_none() => {
                self.purge_namespace(opts, &key.1)?;
            }
            (_, "events") if new.is_some() && old.is_none() => {
                self.expire_events(opts, info)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn check_namespace(&self, info: &ResourceInfo, ns: &str) -> Result<(), StoreError> {
        if !info.namespaced {
            return Ok(());
        }
        let exists = self
            .colls
            .get("namespaces")
            .is_some_and(|c| c.objects.contains_key(&(String::new(), ns.to_owned())));
        if exists {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                resource: "namespaces".into(),
                name: ns.to_owned(),
            })
        }
    }
}
