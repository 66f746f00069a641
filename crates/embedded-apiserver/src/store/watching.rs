//! Watches on the store: registration with initial events or history replay from a
//! resourceVersion (410 Gone when it was compacted), and the fault injections that act on
//! watches (compaction, an API server restart).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::super::convert::view;
use super::super::error::StoreError;
use super::super::resources::Gvr;
use super::super::selector::{FieldSelector, LabelSelector};
use super::super::watch::{Watch, WatchEvent, WatchGuard, WatcherEntry};
use super::{Store, WatchOptions, lock};

impl Store {
    /// Start a watch. Events are delivered in resourceVersion order; see [`Watch::next`].
    pub fn watch(&self, gvr: &Gvr, ns: Option<&str>, opts: &WatchOptions) -> Result<Watch, StoreError> {
        let labels = LabelSelector::parse(opts.list.label_selector.as_deref().unwrap_or(""))?;
        let fields = FieldSelector::parse(opts.list.field_selector.as_deref().unwrap_or(""))?;
        let id = self.inner.next_watch.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(self.inner.opts.watch_channel_capacity.max(1));
        let overflow = Arc::new(AtomicBool::new(false));
        let mut st = lock(&self.inner);
        let info = st.find(gvr)?;
        let entry = WatcherEntry::new(
            id,
            info.clone(),
            ns.map(str::to_owned),
            labels,
            fields,
            tx,
            overflow.clone(),
        );
        let rv_param = opts.resource_version.as_deref().unwrap_or("");
        let current = st.rv;
        let coll = st.coll_mut(&info)?;
        let mut initial = VecDeque::new();
        let mut register = true;
        let unset = rv_param.is_empty() || rv_param == "0";
        if opts.send_initial_events == Some(false) && unset {
            // Start at the most recent state, without initial events.
        } else if opts.send_initial_events.unwrap_or(unset) {
            for o in coll.objects.values() {
                let v = view(&info, o);
                if entry.matches(&v) {
                    initial.push_back(WatchEvent::Added(v));
                }
            }
            if opts.send_initial_events == Some(true) {
                initial.push_back(WatchEvent::Bookmark {
                    resource_version: current,
                    initial_end: true,
                });
            }
        } else {
            let from: u64 = rv_param.parse().map_err(|_| StoreError::BadRequest {
                message: format!("invalid resource version: {rv_param:?}"),
            })?;
            if from < coll.history.compacted_rv {
                initial.push_back(WatchEvent::Error(super::super::watch::gone_status(&format!(
                    "too old resource version: {from} ({})",
                    coll.history.compacted_rv
                ))));
                register = false;
            } else {
                for h in coll.history.entries.iter().filter(|h| h.rv > from) {
                    let o = h.old.as_ref().map(|o| view(&info, o));
                    let n = h.new.as_ref().map(|n| view(&info, n));
                    if let Some(ev) = entry.event_for(o.as_ref(), n.as_ref(), h.rv) {
                        initial.push_back(ev);
                    }
                }
            }
        }
        let ended = !register;
        if register {
            coll.watchers.add(Arc::new(entry));
        }
        drop(st);
        Ok(Watch {
            initial,
            rx,
            overflow,
            ended,
            guard: WatchGuard {
                id,
                storage_key: info.storage_key.clone(),
                store: self.clone(),
            },
        })
    }

    pub(crate) fn unregister_watcher(&self, storage_key: &str, id: u64) {
        let mut st = lock(&self.inner);
        if let Some(c) = st.colls.get_mut(storage_key) {
            c.watchers.remove(id);
        }
    }

    /// Number of open watches (all collections).
    pub fn watcher_count(&self) -> usize {
        lock(&self.inner).colls.values().map(|c| c.watchers.len()).sum()
    }

    /// Fault injection, as an etcd compaction: forget all history, so that a watch resuming
    /// from any earlier resourceVersion gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut st = lock(&self.inner);
        let rv = st.rv;
        for c in st.colls.values_mut() {
            c.history.compact(rv);
        }
    }

    /// Fault injection, as an API server restart: end every open watch (clients re-watch).
    pub fn drop_watches(&self) {
        let mut st = lock(&self.inner);
        for c in st.colls.values_mut() {
            c.watchers.clear();
        }
    }
}
