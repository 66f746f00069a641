//! Options and result types of the store's calls: store tunables, write/delete/list/watch
//! options, patches, field validation, warnings and list results.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::error::StoreError;

/// Tunables of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Changes kept per collection for watch resumption; older resourceVersions get 410.
    pub history_per_collection: usize,
    /// Events buffered per watcher before it is closed with 410.
    pub watch_channel_capacity: usize,
    /// Events (core/v1 and events.k8s.io/v1 share storage) kept; the oldest are deleted.
    pub event_limit: usize,
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_per_collection: 10_000,
            watch_channel_capacity: 4_096,
            event_limit: 10_000,
            bookmark_interval: Duration::from_secs(60),
        }
    }
}

/// Which endpoint a write goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    /// The object itself (ignores `.status` when the kind has a status subresource).
    Main,
    /// `/status` (changes only `.status`).
    Status,
}

impl Subresource {
    pub(super) fn name(self) -> &'static str {
        match self {
            Subresource::Main => "",
            Subresource::Status => "status",
        }
    }
}

/// A patch body by content type.
#[derive(Clone, Debug)]
pub enum Patch {
    /// `application/merge-patch+json` (RFC 7386).
    Merge(Value),
    /// `application/json-patch+json` (RFC 6902).
    Json(Value),
    /// `application/strategic-merge-patch+json` (approximated, see `fields::strategic_merge`).
    Strategic(Value),
    /// `application/apply-patch+yaml`: server-side apply.
    Apply(Value),
}

/// `fieldValidation`: what a write does with fields the schema does not declare. They are
/// always dropped (structural pruning); `Warn` (the default, as in kube-apiserver) also answers
/// with a `Warning` header per field, `Strict` refuses the write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop unknown fields silently.
    Ignore,
    /// Drop them and warn (`unknown field "spec.x"`).
    #[default]
    Warn,
    /// Refuse the write: 400 for create and update, 422 for patches (as kube-apiserver).
    Strict,
}

impl FieldValidation {
    /// The query parameter's value (absent or empty: `Warn`).
    pub fn parse(v: Option<&str>) -> Result<FieldValidation, StoreError> {
        match v.unwrap_or("") {
            "" | "Warn" => Ok(FieldValidation::Warn),
            "Ignore" => Ok(FieldValidation::Ignore),
            "Strict" => Ok(FieldValidation::Strict),
            other => Err(StoreError::BadRequest {
                message: format!(
                    "fieldValidation: Unsupported value: {other:?}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
                ),
            }),
        }
    }
}

/// Where the warnings of a write go (the HTTP layer turns them into `Warning` headers).
#[derive(Clone, Debug, Default)]
pub struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// The warnings so far, emptied.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn extend(&self, w: Vec<String>) {
        if !w.is_empty() {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(w);
        }
    }
}

/// Options of a write.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// `fieldManager` (required for apply; defaults to `unknown` otherwise).
    pub field_manager: Option<String>,
    /// `force` (apply only): take ownership of conflicting fields.
    pub force: bool,
    /// `fieldValidation`: what happens to fields the kind's schema does not declare.
    pub field_validation: FieldValidation,
    /// Receives the write's warnings (`unknown field ...`).
    pub warnings: Warnings,
}

impl WriteOptions {
    /// Options with a field manager.
    pub fn manager(name: &str) -> WriteOptions {
        WriteOptions {
            field_manager: Some(name.to_owned()),
            ..WriteOptions::default()
        }
    }
}

/// Options of a delete (`DeleteOptions`).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    /// Grace period; for pods defaults to `spec.terminationGracePeriodSeconds` (30).
    pub grace_period_seconds: Option<i64>,
    /// Precondition: the object's uid.
    pub uid: Option<String>,
    /// Precondition: the object's resourceVersion.
    pub resource_version: Option<String>,
}

/// Outcome of a delete.
#[derive(Clone, Debug)]
pub enum Deleted {
    /// The object is gone (its last state).
    Gone(Value),
    /// The object lingers with `deletionTimestamp` (grace period or finalizers).
    Pending(Value),
}

/// Selectors of a list or watch.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Label selector (query-string syntax).
    pub label_selector: Option<String>,
    /// Field selector (query-string syntax).
    pub field_selector: Option<String>,
}

/// Options of a watch.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// Selectors.
    pub list: ListOptions,
    /// Start after this resourceVersion; `None`/`"0"`: send the current objects first.
    pub resource_version: Option<String>,
    /// `sendInitialEvents`: `Some(true)`: current objects, then a BOOKMARK marking their end;
    /// `Some(false)`: no initial events; `None`: initial events only for resourceVersion ""/"0".
    pub send_initial_events: Option<bool>,
}

/// A list result.
#[derive(Clone, Debug)]
pub struct ObjectList {
    /// The collection's resourceVersion (the global counter) at the time of the list.
    pub resource_version: u64,
    /// The objects, sorted by namespace and name.
    pub items: Vec<Arc<Value>>,
}
