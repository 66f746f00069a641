//! Watchers: registration per collection (indexed by an equality field selector on
//! `metadata.name` or `spec.nodeName`, so that 1,000 field-selected agents cost nothing for
//! events about other nodes), per-event selector evaluation with the real server's semantics
//! (an object that stops matching yields DELETED), and bounded per-watcher channels (a watcher
//! that falls behind is closed with a 410 `Expired` error and must relist).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector, field_value};

/// One watch event as sent on the wire.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// The object was created, or started matching the watch.
    Added(Arc<Value>),
    /// The object changed.
    Modified(Arc<Value>),
    /// The object was deleted, or stopped matching the watch (its last state).
    Deleted(Arc<Value>),
    /// Progress notification: everything up to this resourceVersion was sent. `initial_end`
    /// marks the end of the initial events of a streaming list.
    Bookmark {
        /// resourceVersion.
        resource_version: u64,
        /// Annotated `k8s.io/initial-events-end: "true"`.
        initial_end: bool,
    },
    /// An error `Status` (410 when the resourceVersion is too old or the watcher fell behind).
    Error(Value),
}

impl WatchEvent {
    /// `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`.
    pub fn type_name(&self) -> &'static str {
        match self {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark { .. } => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        }
    }

    /// resourceVersion carried by the event (0 for errors).
    pub fn resource_version(&self) -> u64 {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            }
            WatchEvent::Bookmark { resource_version, .. } => *resource_version,
            WatchEvent::Error(_) => 0,
        }
    }
}

/// The fields watchers may be indexed by.
const INDEXED_FIELDS: &[&str] = &["metadata.name", "spec.nodeName"];

/// A registered watcher.
pub struct WatcherEntry {
    pub(crate) id: u64,
    pub(crate) info: Arc<ResourceInfo>,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
    pub(crate) tx: mpsc::Sender<WatchEvent>,
    pub(crate) overflow: Arc<AtomicBool>,
    index: Option<(&'static str, String)>,
}

impl WatcherEntry {
    pub(crate) fn new(
        id: u64,
        info: Arc<ResourceInfo>,
        namespace: Option<String>,
        labels: LabelSelector,
        fields: FieldSelector,
        tx: mpsc::Sender<WatchEvent>,
        overflow: Arc<AtomicBool>,
    ) -> WatcherEntry {
        let index = INDEXED_FIELDS
            .iter()
            .find_map(|f| fields.equality_on(f).map(|v| (*f, v.to_owned())));
        WatcherEntry {
            id,
            info,
            namespace,
            labels,
            fields,
            tx,
            overflow,
            index,
        }
    }

    /// Whether an object (in this watcher's view) passes namespace and selectors.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event this watcher sees for a change from `old` to `new` (views, `rv` already set on
    /// `new`; for deletions `new` is None and `old` carries the deletion rv).
    pub(crate) fn event_for(
        &self,
        old: Option<&Arc<Value>>,
        new: Option<&Arc<Value>>,
        rv: u64,
    ) -> Option<WatchEvent> {
        let om = old.is_some_and(|o| self.matches(o));
        let nm = new.is_some_and(|n| self.matches(n));
        match (old, new, om, nm) {
            (_, Some(n), false, true) => Some(WatchEvent::Added(n.clone())),
            (_, Some(n), true, true) => Some(WatchEvent::Modified(n.clone())),
            (Some(o), Some(_), true, false) => {
                let mut last = (**o).clone();
                last["metadata"]["resourceVersion"] = json!(rv.to_string());
                Some(WatchEvent::Deleted(Arc::new(last)))
            }
            (Some(o), None, true, _) => Some(WatchEvent::Deleted(o.clone())),
            _ => None,
        }
    }
}

/// All watchers of one collection.
#[derive(Default)]
pub struct Watchers {
    general: Vec<Arc<WatcherEntry>>,
    by_field: HashMap<(&'static str, String), Vec<Arc<WatcherEntry>>>,
}

impl Watchers {
    pub(crate) fn add(&mut self, w: Arc<WatcherEntry>) {
        match &w.index {
            Some((f, v)) => self.by_field.entry((f, v.clone())).or_default().push(w),
            None => self.general.push(w),
        }
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.general.retain(|w| w.id != id);
        self.by_field.retain(|_, ws| {
            ws.retain(|w| w.id != id);
            !ws.is_empty()
        });
    }

    /// Number of registered watchers.
    pub fn len(&self) -> usize {
        self.general.len() + self.by_field.values().map(Vec::len).sum::<usize>()
    }

    /// Whether no watcher is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn clear(&mut self) {
        self.general.clear();
        self.by_field.clear();
    }

    /// Deliver a change to every watcher it concerns; `view` turns a stored object into a
    /// watcher's version. Watchers whose channel is full are closed (410 on their stream).
    pub(crate) fn dispatch(
        &mut self,
        old: Option<&Arc<Value>>,
        new: Option<&Arc<Value>>,
        rv: u64,
        view: &dyn Fn(&ResourceInfo, &Arc<Value>) -> Arc<Value>,
    ) {
        if self.is_empty() {
            return;
        }
        let mut candidates: Vec<Arc<WatcherEntry>> = self.general.clone();
        for field in INDEXED_FIELDS {
            let mut vals: Vec<String> = Vec::new();
            for o in [old, new].into_iter().flatten() {
                let v = field_value(o, field);
                if !vals.contains(&v) {
                    vals.push(v);
                }
            }
            for v in vals {
                if let Some(ws) = self.by_field.get(&(*field, v)) {
                    candidates.extend(ws.iter().cloned());
                }
            }
        }
        let mut dead = Vec::new();
        for w in candidates {
            let o = old.map(|o| view(&w.info, o));
            let n = new.map(|n| view(&w.info, n));
            let Some(ev) = w.event_for(o.as_ref(), n.as_ref(), rv) else {
                continue;
            };
            match w.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.overflow.store(true, Ordering::SeqCst);
                    dead.push(w.id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => dead.push(w.id),
            }
        }
        for id in dead {
            self.remove(id);
        }
    }
}

/// A change kept for watch resumption.
pub(crate) struct HistEntry {
    pub rv: u64,
    pub old: Option<Arc<Value>>,
    pub new: Option<Arc<Value>>,
}

/// Bounded history of a collection's changes.
pub(crate) struct History {
    pub entries: VecDeque<HistEntry>,
    /// Changes at or below this resourceVersion are no longer available.
    pub compacted_rv: u64,
    pub capacity: usize,
}

impl History {
    pub(crate) fn new(capacity: usize, start_rv: u64) -> History {
        History {
            entries: VecDeque::new(),
            compacted_rv: start_rv,
            capacity,
        }
    }

    pub(crate) fn push(&mut self, e: HistEntry) {
        self.entries.push_back(e);
        while self.entries.len() > self.capacity {
            if let Some(old) = self.entries.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
    }

    pub(crate) fn compact(&mut self, rv: u64) {
        self.entries.clear();
        self.compacted_rv = rv;
    }
}

/// The `Status` of a 410 watch error.
pub fn gone_status(message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    })
}

/// The consuming end of a watch (in-process; the HTTP layer streams it).
pub struct Watch {
    pub(crate) initial: VecDeque<WatchEvent>,
    pub(crate) rx: mpsc::Receiver<WatchEvent>,
    pub(crate) overflow: Arc<AtomicBool>,
    pub(crate) ended: bool,
    pub(crate) guard: WatchGuard,
}

/// Unregisters a watcher when the watch is dropped.
pub(crate) struct WatchGuard {
    pub(crate) id: u64,
    pub(crate) storage_key: String,
    pub(crate) store: super::store::Store,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.store.unregister_watcher(&self.storage_key, self.id);
    }
}

impl Watch {
    /// The next event; `None` when the watch ended (server side). A watcher that fell behind
    /// receives one `Error` event with a 410 Status, then `None`.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if let Some(ev) = self.initial.pop_front() {
            return Some(ev);
        }
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(ev) => Some(ev),
            None => self.end(),
        }
    }

    /// An event if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        if let Some(ev) = self.initial.pop_front() {
            return Some(ev);
        }
        if self.ended {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => Some(ev),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => self.end(),
        }
    }

    fn end(&mut self) -> Option<WatchEvent> {
        self.ended = true;
        if self.overflow.load(Ordering::SeqCst) {
            Some(WatchEvent::Error(gone_status(
                "too old resource version: the watcher fell behind and was closed; relist",
            )))
        } else {
            None
        }
    }

    /// The storage key of the watched collection.
    pub fn storage_key(&self) -> &str {
        &self.guard.storage_key
    }

    /// Whether the watch has ended (server side).
    pub fn is_ended(&self) -> bool {
        self.ended
    }
}
