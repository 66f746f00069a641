//! An embedded, in-memory Kubernetes API server for tests and demos of Kubernetes controllers.
//!
//! The unchanged `kube` client and `kubectl` talk to it over HTTP through a kubeconfig. It knows
//! no custom resource of its own: CRDs are registered at run time by creating
//! CustomResourceDefinition objects, as on a real cluster. It is faithful to kube-apiserver on
//! what a controller relies on: one global resourceVersion, 409 on
//! stale updates, server-side apply with field ownership (`managedFields`), status subresources,
//! `generation`, watches (resume, 410 Gone, bookmarks, streaming lists, selector semantics),
//! graceful pod deletion and finalizers, the Eviction subresource with PodDisruptionBudgets,
//! discovery and Table output for kubectl, and CRDs served from their CRD objects.
//!
//! What it does like kube-apiserver, and where it still differs, is listed in
//! this crate's `README.md` (a table per area; keep it current when behaviour changes). In short:
//! strategic-merge patch and server-side apply of built-in kinds use a table of merge keys;
//! built-in kinds are not validated beyond names; only a few CEL rules are evaluated; lists
//! serve the latest state; `dryRun` is refused; no controllers besides a synchronous
//! disruption controller; answers are always JSON; OpenAPI is v3 only.
//!
//! Client-side facts worth knowing (the real server behaves the same): kube 5's default client
//! retries 429 responses internally (up to 15 times with exponential backoff), so an eviction
//! refused by a PDB surfaces only after minutes unless `Config::default_retry` is false; and
//! `Api::evict` sends its delete options as `delete_options`, which the server ignores, so
//! `EvictParams`' grace period does not apply (the pod's own grace period does).
//!
//! Map: [`store`] (objects, resourceVersion, get/list/watch; its files: `options` (option and
//! result types), `writes` (create/update/patch/apply), `admission` (pruning, defaults,
//! validation), `deletion` (graceful deletion, finalizers, eviction), `effects` (CRD
//! registration, namespace purge, event bounding, PDB status)), [`watch`] (watchers, history),
//! [`fields`] (server-side apply field sets, merge/strategic patches), [`selector`],
//! [`pdb`] (disruption arithmetic), [`resources`] (what is served), [`convert`] (version
//! views), [`http`] (routes), [`discovery`], [`openapi`], [`table`], [`schema`] (CRD admission).

pub mod convert;
pub mod discovery;
pub mod error;
pub mod fields;
pub mod http;
pub mod kubectl;
pub mod openapi;
pub mod pdb;
pub mod protobuf;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod store;
pub mod table;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use error::{ApiServerError, Cause, StoreError};
pub use resources::Gvr;
pub use store::{
    DeleteOptions, Deleted, FieldValidation, ListOptions, ObjectList, Patch, Store, StoreOptions,
    Subresource, Warnings, WatchOptions, WriteOptions,
};
pub use watch::{Watch, WatchEvent};

/// Name of the kubeconfig context (and cluster and user) [`ApiServer::kubeconfig_yaml`] writes.
pub const KUBECONFIG_CONTEXT: &str = "embedded-apiserver";

/// Per (verb, resource) request counters of the HTTP API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestCounts {
    /// (verb, resource) → count. Verbs: get, list, watch, create, update, patch, delete,
    /// deletecollection, evict (counted on `pods`). Resources as group-resource, with `/status` for the subresource: `pods`,
    /// `nixosnodes.nixroll.io/status`.
    pub counts: BTreeMap<(String, String), u64>,
}

impl RequestCounts {
    /// Requests of one verb on one resource.
    pub fn get(&self, verb: &str, resource: &str) -> u64 {
        self.counts
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests of one verb on all resources.
    pub fn verb(&self, verb: &str) -> u64 {
        self.counts
            .iter()
            .filter(|((v, _), _)| v == verb)
            .map(|(_, n)| *n)
            .sum()
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

#[derive(Clone, Default)]
pub(crate) struct Counters(Arc<Mutex<BTreeMap<(String, String), u64>>>);

impl Counters {
    pub(crate) fn bump(&self, verb: &str, resource: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((verb.to_owned(), resource.to_owned())).or_insert(0) += 1;
    }

    fn snapshot(&self) -> RequestCounts {
        RequestCounts {
            counts: self.0.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// A running embedded API server. Dropping it (or [`ApiServer::shutdown`]) stops it.
pub struct ApiServer {
    addr: SocketAddr,
    store: Store,
    counters: Counters,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ApiServer {
    /// Start on `addr` (port 0 picks a free port) with default options.
    pub async fn start(addr: SocketAddr) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_with(addr, StoreOptions::default()).await
    }

    /// Start with explicit store options (history length, watch buffer, bookmark interval).
    pub async fn start_with(addr: SocketAddr, opts: StoreOptions) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_on(addr, Store::new(opts)).await
    }

    /// Serve an existing store (e.g. to restart the server on the same port after
    /// [`ApiServer::shutdown`], as an API server restart: state kept, watches dropped).
    pub async fn start_on(addr: SocketAddr, store: Store) -> Result<ApiServer, ApiServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiServerError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind { addr, source })?;
        let counters = Counters::default();
        let srv = Arc::new(http::Srv {
            store: store.clone(),
            counters: counters.clone(),
            address: local.to_string(),
            pages: std::sync::Mutex::new(std::collections::VecDeque::new()),
        });
        let app = axum::Router::new().fallback(http::handle).with_state(srv);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "embedded API server stopped");
            }
        });
        tracing::debug!(%local, "embedded API server listening");
        Ok(ApiServer {
            addr: local,
            store,
            counters,
            task: Some(task),
            stop: Some(stop_tx),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server: context, cluster and user [`KUBECONFIG_CONTEXT`], no auth.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: {url}\ncontexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {c}\ncurrent-context: {c}\nusers:\n- name: {c}\n  user: {{}}\npreferences: {{}}\n",
            c = KUBECONFIG_CONTEXT,
            url = self.url()
        )
    }

    /// Write [`ApiServer::kubeconfig_yaml`] to a file.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// The `kube::Config` the kubeconfig yields (to adjust before building a client).
    ///
    /// Note: kube 5's default config retries 429/503/504 responses inside the client (up to 15
    /// times, exponential backoff from 5 ms), so an `evict` refused by a PodDisruptionBudget
    /// only returns its 429 after minutes. Callers that handle 429 themselves (a drain with its
    /// own backoff and timeout) want `default_retry = false`.
    pub async fn config(&self) -> Result<kube::Config, ApiServerError> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())
            .map_err(|source| ApiServerError::Kubeconfig { source })?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|source| ApiServerError::Kubeconfig { source })
    }

    /// A `kube::Client` built from the kubeconfig with kube's defaults (the real HTTP path).
    pub async fn client(&self) -> Result<kube::Client, ApiServerError> {
        let config = self.config().await?;
        kube::Client::try_from(config).map_err(|source| ApiServerError::Client { source })
    }

    /// The in-process store (same semantics as the HTTP API, no HTTP).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Request counters of the HTTP API so far.
    pub fn request_counts(&self) -> RequestCounts {
        self.counters.snapshot()
    }

    /// Stop serving and wait (at most 5 s) until the port is free: the listener closes, open
    /// watches end, idle connections close. The store stays usable ([`ApiServer::start_on`]).
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.store.drop_watches();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
