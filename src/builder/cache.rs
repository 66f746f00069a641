//! The builder's binary cache over HTTP: the protocol Nix substitutes from.
//!
//! * `GET /nix-cache-info`: `StoreDir: /nix/store`.
//! * `GET /<hash>.narinfo`: the path's narinfo, signed with the builder's key when it was
//!   published (kept in memory: a few hundred bytes per path of the published closures).
//! * `GET /nar/<hash>.nar`: the path's NAR, uncompressed, written from the store's files as
//!   it is sent, in 64 KiB chunks through a queue of 4: the memory per download is bounded,
//!   whatever the closure's size, and at most `max_concurrent_nars` are written at once
//!   (others wait up to `queue_timeout`, then get 503 and Nix tries again later).
//!
//! Only published closures are served, never the rest of the builder's store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{NarInfo, SigningKey, write_nar};
use crate::agent::host::Host;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot describe {path} for the cache: {message}")]
    Describe { path: String, message: String },
    #[error("pushing {path} to file://{dir}: {message}")]
    Push {
        path: String,
        dir: String,
        message: String,
    },
}

/// Tunables of the cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// NARs written at once; more requests wait.
    pub max_concurrent_nars: usize,
    /// How long a NAR request waits for its turn before 503.
    pub queue_timeout: Duration,
    /// How long one chunk may wait for a client that does not read before the download is
    /// dropped.
    pub stall_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            max_concurrent_nars: 8,
            queue_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: NarInfo,
    narinfo: String,
}

/// Counters of what the cache served (tests, benchmark).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub narinfos: AtomicU64,
    pub nars: AtomicU64,
    pub nar_bytes: AtomicU64,
    /// NARs being written now, and the most at once so far.
    pub nars_now: AtomicU64,
    pub nars_peak: AtomicU64,
    pub busy: AtomicU64,
}

/// A binary cache over the closures the builder published. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct BinaryCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: Arc<dyn Host>,
    key: SigningKey,
    options: CacheOptions,
    index: std::sync::RwLock<HashMap<String, Arc<Entry>>>,
    permits: Arc<tokio::sync::Semaphore>,
    stats: CacheStats,
}

impl BinaryCache {
    /// Files are read through `host` (the store as this process sees it).
    pub fn new(host: Arc<dyn Host>, key: SigningKey, options: CacheOptions) -> BinaryCache {
        let permits = Arc::new(tokio::sync::Semaphore::new(options.max_concurrent_nars.max(1)));
        BinaryCache {
            inner: Arc::new(Inner {
                host,
                key,
                options,
                index: Default::default(),
                permits,
                stats: CacheStats::default(),
            }),
        }
    }

    /// The key nodes must trust (`name:base64`).
    pub fn public_key(&self) -> String {
        self.inner.key.public_key()
    }

    /// The signing key (for `nix copy` pushes: `push.rs`).
    pub(crate) fn key(&self) -> &SigningKey {
        &self.inner.key
    }

    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    /// Serve these paths (a closure, as `nix path-info --json -r` describes it), each signed.
    pub fn publish(&self, closure: &[NarInfo]) -> Result<usize, CacheError> {
        let mut signed = Vec::with_capacity(closure.len());
        for info in closure {
            let narinfo = info.render(&self.inner.key).ok_or_else(|| CacheError::Describe {
                path: info.path.clone(),
                message: format!("unknown NAR hash form {:?}", info.nar_hash),
            })?;
            signed.push((
                info.hash_part().to_string(),
                Arc::new(Entry {
                    info: info.clone(),
                    narinfo,
                }),
            ));
        }
        let n = signed.len();
        if let Ok(mut index) = self.inner.index.write() {
            index.extend(signed);
        }
        Ok(n)
    }

    /// Write the published closure `paths` into the binary cache directory `dir` (a `file://`
    /// cache on shared storage): `nix-cache-info`, each path's signed `.narinfo` and its NAR
    /// (uncompressed, written from the store's files as for a download, to a temporary file
    /// then renamed, the narinfo last), so a reader never sees a narinfo without its NAR. Paths
    /// already there are skipped. The key stays in memory: nothing but signatures is written.
    pub fn export(&self, paths: &[NarInfo], dir: &Path) -> Result<usize, CacheError> {
        let err = |path: &str, message: String| CacheError::Push {
            path: path.to_string(),
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir.join("nar")).map_err(|e| err("nar/", e.to_string()))?;
        let info = dir.join("nix-cache-info");
        if !info.exists() {
            std::fs::write(&info, "StoreDir: /nix/store\n")
                .map_err(|e| err("nix-cache-info", e.to_string()))?;
        }
        let mut written = 0;
        for p in paths {
            let Some(entry) = self.lookup(p.hash_part()).filter(|e| e.info.path == p.path) else {
                return Err(err(&p.path, "not published".into()));
            };
            let narinfo = dir.join(format!("{}.narinfo", p.hash_part()));
            if narinfo.exists() {
                continue;
            }
            let nar = dir.join(format!("nar/{}.nar", p.hash_part()));
            let tmp = dir.join(format!("nar/.{}.nar.tmp", p.hash_part()));
            let local = self.inner.host.fs_path(Path::new(&p.path));
            let size = std::fs::File::create(&tmp)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    let mut w = std::io::BufWriter::new(f);
                    let n = write_nar(&local, &mut w).map_err(|e| e.to_string())?;
                    std::io::Write::flush(&mut w).map_err(|e| e.to_string())?;
                    Ok(n)
                })
                .map_err(|m| err(&p.path, m))?;
            if size != entry.info.nar_size {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(
                    &p.path,
                    format!(
                        "its NAR is {size} bytes, not the {} Nix recorded",
                        entry.info.nar_size
                    ),
                ));
            }
            std::fs::rename(&tmp, &nar).map_err(|e| err(&p.path, e.to_string()))?;
            let tmp = dir.join(format!(".{}.narinfo.tmp", p.hash_part()));
            std::fs::write(&tmp, &entry.narinfo)
                .and_then(|()| std::fs::rename(&tmp, &narinfo))
                .map_err(|e| err(&p.path, e.to_string()))?;
            written += 1;
        }
        Ok(written)
    }

    /// Whether `path` is published.
    pub fn has(&self, path: &str) -> bool {
        let hash = path
            .rsplit('/')
            .next()
            .and_then(|b| b.get(..32))
            .unwrap_or_default();
        self.lookup(hash).is_some_and(|e| e.info.path == path)
    }

    fn lookup(&self, hash: &str) -> Option<Arc<Entry>> {
        self.inner.index.read().ok()?.get(hash).cloned()
    }

    /// The HTTP routes.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/nix-cache-info", axum::routing::get(cache_info))
            .route("/nar/{file}", axum::routing::get(nar))
            .route("/{file}", axum::routing::get(narinfo))
            .with_state(self.clone())
    }

    /// Serve on `listener` until the future is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

async fn cache_info() -> &'static str {
    "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
}

async fn narinfo(State(cache): State<BinaryCache>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(entry) = file.strip_suffix(".narinfo").and_then(|h| cache.lookup(h)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    cache.inner.stats.narinfos.fetch_add(1, Ordering::Relaxed);
    (
        [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
        entry.narinfo.clone(),
    )
        .into_response()
}

async fn nar(State(cache): State<BinaryCache>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(entry) = file.strip_suffix(".nar").and_then(|h| cache.lookup(h)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let inner = &cache.inner;
    let permit = match tokio::time::timeout(
        inner.options.queue_timeout,
        inner.permits.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        _ => {
            inner.stats.busy.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many downloads at once",
            )
                .into_response();
        }
    };
    let now = inner.stats.nars_now.fetch_add(1, Ordering::SeqCst) + 1;
    inner.stats.nars_peak.fetch_max(now, Ordering::SeqCst);
    inner.stats.nars.fetch_add(1, Ordering::Relaxed);
    let local = inner.host.fs_path(Path::new(&entry.info.path));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let stall = inner.options.stall_timeout;
    let handle = tokio::runtime::Handle::current();
    let producer = cache.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut w = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
            handle,
            stall,
        };
        let res = write_nar(&local, &mut w).and_then(|n| {
            std::io::Write::flush(&mut w).map_err(super::NarError::Write)?;
            Ok(n)
        });
        let stats = &producer.inner.stats;
        match res {
            Ok(n) => {
                stats.nar_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(path = %local.display(), error = %e, "NAR download ended early");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
        stats.nars_now.fetch_sub(1, Ordering::SeqCst);
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    (
        [
            (header::CONTENT_TYPE, "application/x-nix-nar".to_string()),
            (header::CONTENT_LENGTH, entry.info.nar_size.to_string()),
        ],
        body,
    )
        .into_response()
}

const CHUNK: usize = 64 * 1024;

/// Sends what is written in chunks of [`CHUNK`] bytes; fails when the client is gone or has
/// not taken a chunk for `stall`.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    handle: tokio::runtime::Handle,
    stall: Duration,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let tx = self.tx.clone();
        let stall = self.stall;
        self.handle
            .block_on(async move { tx.send_timeout(Ok(chunk), stall).await })
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone or stalled"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}
