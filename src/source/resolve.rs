//! Resolving a FlakeSource against its remote with git2 (libgit2), every call bounded in time.
//!
//! 1. **List** the remote's refs (`ls-remote`: a detached remote, no repository, no objects)
//!    and pick the ref with [`RefChoice::resolve`].
//! 2. **Ancestry**, only when the head changed: fetch the ref into a cached bare repository
//!    and ask `graph_descendant_of`. A full (not shallow) fetch of the new head brings all its
//!    ancestors, so an old commit still absent afterwards is not one of them.
//!
//! git2 calls block, so each runs in `spawn_blocking` under `tokio::time::timeout`, which
//! bounds the caller's wait. A timed-out thread keeps running, so the work itself is bounded
//! too (docs/source.md, "Timeouts"):
//! - libgit2's socket timeouts ([`super::socket_timeouts`], set once per process before any
//!   git2 network call) end a connect, and any read or write that waits longer than `idle`:
//!   a server that accepts and then sends nothing frees its thread after `idle`;
//! - the transfer and sideband callbacks cancel a fetch after the deadline (a trickling
//!   server);
//! - one thread per remote at a time (a lane), and at most `max_threads` per resolver: a
//!   remote that holds its thread delays only its own next call, and the number of threads
//!   that can be stuck at once is bounded.
//!
//! URLs here never carry credentials ([`SourceUrl`] refuses them), so messages may name them.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use git2::{CertificateCheckStatus, CredentialType, Direction, ErrorClass, ErrorCode, RemoteCallbacks};
use tokio::sync::Semaphore;

use super::known_hosts::{HostKeyCheck, KnownHosts};
use super::refspec::{AdvertisedRef, RefChoice, RefError, ResolvedRef};
use super::revision::CommitId;
use super::socket_timeouts::{self, SocketTimeoutsError};
use super::url::{Scheme, SourceUrl};
use super::verify::{TrustedKeys, VerifyError, split_tag_signature};
use crate::api::VerifyMode;

/// Credentials from the source's Secret (Flux key names). Never printed.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    None,
    /// `username` / `password` (a token goes in `password`).
    Basic { username: String, password: String },
    /// `identity` (an OpenSSH or PEM private key) and its optional `password`.
    SshKey {
        identity: String,
        passphrase: Option<String>,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Basic { .. } => "Basic(<redacted>)",
            Credentials::SshKey { .. } => "SshKey(<redacted>)",
        })
    }
}

/// Everything needed to talk to one remote.
#[derive(Clone, Debug)]
pub struct Remote {
    pub url: SourceUrl,
    pub credentials: Credentials,
    /// Required for `ssh://`.
    pub known_hosts: Option<KnownHosts>,
    /// Bound on each remote operation (FlakeSource `timeout`, default 60s).
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ancestry {
    Same,
    /// The new head descends from the old one.
    FastForward,
    /// The new head does not descend from the old one (force push, reset, other branch).
    NonFastForward,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{url}: SSH without known_hosts is refused (no trust on first use)")]
    NoKnownHosts { url: String },
    #[error("{url}: host key refused: {detail}")]
    HostKeyRejected { url: String, detail: String },
    #[error("{url}: authentication failed: {message}")]
    AuthenticationFailed { url: String, message: String },
    #[error("{url}: fetch failed: {message}")]
    FetchFailed { url: String, message: String },
    #[error(
        "{url}: the server's TLS certificate is not trusted ({message}); a private CA goes into the controller's trust store (SSL_CERT_FILE, docs/source.md)"
    )]
    CertificateRejected { url: String, message: String },
    #[error("{url}: no answer within {after:?}")]
    TimedOut { url: String, after: Duration },
    #[error("{url}: {source}")]
    Ref {
        url: String,
        #[source]
        source: RefError,
    },
    #[error("{url}: {commit} is not on the remote after fetching {full_ref} (the ref moved; retry)")]
    CommitMissing {
        url: String,
        full_ref: String,
        commit: CommitId,
    },
    #[error("source cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("{url}: resolver task failed: {message}")]
    Task { url: String, message: String },
    #[error("{url}: not contacted: {source}")]
    SocketTimeouts {
        url: String,
        #[source]
        source: SocketTimeoutsError,
    },
}

impl ResolveError {
    /// The Flux-like condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::NoKnownHosts { .. } => "KnownHostsMissing",
            ResolveError::HostKeyRejected { .. } => "HostKeyRejected",
            ResolveError::CertificateRejected { .. } => "CertificateRejected",
            ResolveError::AuthenticationFailed { .. } => "AuthenticationFailed",
            ResolveError::TimedOut { .. } => "Timeout",
            ResolveError::Ref { .. } | ResolveError::CommitMissing { .. } => "RefNotResolved",
            ResolveError::FetchFailed { .. }
            | ResolveError::Cache { .. }
            | ResolveError::Task { .. }
            | ResolveError::SocketTimeouts { .. } => "GitOperationFailed",
        }
    }
}

/// Resolves sources; one per controller process. Holds the cache of bare repositories, the
/// cap on concurrent (and possibly stuck) git threads, and one lane per remote.
#[derive(Clone, Debug)]
pub struct Resolver {
    cache_dir: PathBuf,
    max_threads: usize,
    threads: Arc<Semaphore>,
    /// One permit per remote URL: a remote never has two threads at once.
    lanes: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl Resolver {
    pub fn new(cache_dir: impl Into<PathBuf>, max_threads: usize) -> Self {
        let max_threads = max_threads.max(1);
        Self {
            cache_dir: cache_dir.into(),
            max_threads,
            threads: Arc::new(Semaphore::new(max_threads)),
            lanes: Arc::default(),
        }
    }

    /// git threads running now, including ones whose caller already timed out.
    pub fn running_threads(&self) -> usize {
        self.max_threads - self.threads.available_permits()
    }

    /// `git ls-remote`: the refs the remote advertises (empty for an empty repository).
    pub async fn list_refs(&self, remote: &Remote) -> Result<Vec<AdvertisedRef>, ResolveError> {
        let r = remote.clone();
        self.bounded(remote, "list", move |deadline| list_blocking(&r, deadline))
            .await
    }

    /// Lists the refs and resolves `choice` to a commit.
    pub async fn resolve(&self, remote: &Remote, choice: &RefChoice) -> Result<ResolvedRef, ResolveError> {
        let refs = self.list_refs(remote).await?;
        choice.resolve(&refs).map_err(|source| ResolveError::Ref {
            url: remote.url.redacted(),
            source,
        })
    }

    /// Whether `new` (the head of `full_ref`) descends from `old`. Fetches `full_ref` into the
    /// cache only when `new` is not there yet.
    pub async fn ancestry(
        &self,
        remote: &Remote,
        full_ref: &str,
        old: &CommitId,
        new: &CommitId,
    ) -> Result<Ancestry, ResolveError> {
        if old == new {
            return Ok(Ancestry::Same);
        }
        let (r, full_ref, old, new) = (remote.clone(), full_ref.to_owned(), old.clone(), new.clone());
        let path = self.cache_path(remote);
        self.bounded(remote, "fetch", move |deadline| {
            ancestry_blocking(&r, &path, &full_ref, &old, &new, deadline)
        })
        .await
    }

    /// One poll: resolve, and decide against the last accepted revision. Never moves
    /// backwards unless `allow_non_fast_forward`, and a failure keeps `last`.
    pub async fn poll(
        &self,
        remote: &Remote,
        choice: &RefChoice,
        last: Option<&ResolvedRef>,
        allow_non_fast_forward: bool,
    ) -> Poll {
        let head = match self.resolve(remote, choice).await {
            Ok(h) => h,
            Err(error) => {
                return Poll::Failed {
                    kept: last.cloned(),
                    error,
                };
            }
        };
        let Some(last) = last else {
            return Poll::Advanced(head);
        };
        if last.revision.commit == head.revision.commit {
            return Poll::Unchanged(head);
        }
        if allow_non_fast_forward {
            return Poll::Advanced(head);
        }
        match self
            .ancestry(
                remote,
                &head.full_name,
                &last.revision.commit,
                &head.revision.commit,
            )
            .await
        {
            Ok(Ancestry::FastForward | Ancestry::Same) => Poll::Advanced(head),
            Ok(Ancestry::NonFastForward) => Poll::NonFastForward {
                kept: last.clone(),
                refused: head,
            },
            Err(error) => Poll::Failed {
                kept: Some(last.clone()),
                error,
            },
        }
    }

    fn cache_path(&self, remote: &Remote) -> PathBuf {
        let d = ring::digest::digest(&ring::digest::SHA256, remote.url.as_git_url().as_bytes());
        let hex: String = d.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.cache_dir.join(format!("{hex}.git"))
    }

    fn lane(&self, remote: &Remote) -> Arc<Semaphore> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        // Forget idle lanes of remotes nobody asks for any more.
        lanes.retain(|_, l| Arc::strong_count(l) > 1);
        lanes
            .entry(remote.url.as_git_url())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone()
    }

    async fn bounded<T: Send + 'static>(
        &self,
        remote: &Remote,
        op: &'static str,
        work: impl FnOnce(Instant) -> Result<T, ResolveError> + Send + 'static,
    ) -> Result<T, ResolveError> {
        let url = remote.url.redacted();
        let task_err = |message: String| ResolveError::Task {
            url: url.clone(),
            message,
        };
        let started = Instant::now();
        let deadline = started + remote.timeout;
        let (lane, threads) = (self.lane(remote), self.threads.clone());
        let run = async {
            // Both permits move into the thread: they are released when it really ends,
            // not when the caller stops waiting.
            let lane = lane.acquire_owned().await.map_err(|e| task_err(e.to_string()))?;
            let thread = threads
                .acquire_owned()
                .await
                .map_err(|e| task_err(e.to_string()))?;
            tokio::task::spawn_blocking(move || {
                let out = work(deadline);
                drop((thread, lane));
                out
            })
            .await
            .map_err(|e| task_err(e.to_string()))?
        };
        let out = match tokio::time::timeout(remote.timeout, run).await {
            Ok(out) => out,
            Err(_) => Err(ResolveError::TimedOut {
                url: url.clone(),
                after: remote.timeout,
            }),
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The URL carries no credentials (SourceUrl refuses them), nor do the errors.
        match &out {
            Ok(_) => tracing::debug!(url = %url, op, elapsed_ms, "git remote call done"),
            Err(e) => {
                tracing::debug!(url = %url, op, elapsed_ms, reason = e.reason(), error = %e, "git remote call failed")
            }
        }
        out
    }
}

/// The outcome of [`Resolver::poll`].
#[derive(Debug)]
pub enum Poll {
    /// Same commit as before.
    Unchanged(ResolvedRef),
    /// First resolution, a fast-forward, or an allowed non-fast-forward.
    Advanced(ResolvedRef),
    /// The head moved to a commit that does not descend from the last one: not followed.
    NonFastForward { kept: ResolvedRef, refused: ResolvedRef },
    /// The remote could not be read: the last revision stays, nothing new starts.
    Failed {
        kept: Option<ResolvedRef>,
        error: ResolveError,
    },
}

impl Poll {
    /// The revision to follow after this poll.
    pub fn current(&self) -> Option<&ResolvedRef> {
        match self {
            Poll::Unchanged(r) | Poll::Advanced(r) => Some(r),
            Poll::NonFastForward { kept, .. } => Some(kept),
            Poll::Failed { kept, .. } => kept.as_ref(),
        }
    }
}

/// What the callbacks saw, to tell auth and host-key failures from the rest.
#[derive(Default)]
struct Seen {
    credential_calls: Cell<u32>,
    key_offers: Cell<u32>,
    /// Our credentials callback gave up: the server refused what the Secret holds.
    auth_refused: Cell<bool>,
    host_key: Cell<Option<HostKeyCheck>>,
    timed_out: Cell<bool>,
}

fn callbacks<'a>(remote: &'a Remote, deadline: Instant, seen: &'a Seen) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    cb.credentials(move |_url, user_from_url, allowed| {
        let n = seen.credential_calls.get() + 1;
        seen.credential_calls.set(n);
        let refuse = |message: &str| {
            seen.auth_refused.set(true);
            Err(git2::Error::new(ErrorCode::Auth, ErrorClass::Callback, message))
        };
        // libgit2 calls again after each rejection. The Secret holds one credential, so a
        // second call for it means the server refused it: offering the same secret again
        // only hammers the server (and its lockout counters).
        match &remote.credentials {
            Credentials::Basic { username, password }
                if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
            {
                if n > 1 {
                    return refuse("the server refused the username and password");
                }
                git2::Cred::userpass_plaintext(username, password)
            }
            Credentials::SshKey { identity, passphrase } => {
                let user = user_from_url.or(remote.url.user()).unwrap_or("git");
                if n > 3 || seen.key_offers.get() > 0 {
                    refuse("the server refused the SSH key")
                } else if allowed.contains(CredentialType::USERNAME) {
                    git2::Cred::username(user)
                } else if allowed.contains(CredentialType::SSH_KEY)
                    || allowed.contains(CredentialType::SSH_MEMORY)
                {
                    seen.key_offers.set(1);
                    git2::Cred::ssh_key_from_memory(user, None, identity, passphrase.as_deref())
                } else {
                    refuse("the server accepts no SSH key")
                }
            }
            _ => refuse("the server asks for credentials and the source has none of the kind it accepts"),
        }
    });
    cb.certificate_check(move |cert, host| {
        let Some(hk) = cert.as_hostkey() else {
            // TLS: libgit2 verifies against the system CAs.
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let verdict = match (&remote.known_hosts, hk.hostkey(), hk.hostkey_type()) {
            (Some(kh), Some(key), Some(ty)) => {
                // libgit2 gives the host without the port; take it from the URL, and check the
                // host named there too (Flux source-controller #288).
                let port = remote.url.port().unwrap_or(22);
                if host.eq_ignore_ascii_case(remote.url.host()) {
                    kh.check(remote.url.host(), port, ty.name(), key)
                } else {
                    HostKeyCheck::Unknown
                }
            }
            _ => HostKeyCheck::Unknown,
        };
        seen.host_key.set(Some(verdict));
        match verdict {
            HostKeyCheck::Match => Ok(CertificateCheckStatus::CertificateOk),
            HostKeyCheck::Mismatch => Err(git2::Error::from_str(
                "the host key differs from the one in known_hosts",
            )),
            HostKeyCheck::Unknown => Err(git2::Error::from_str("the host is not in known_hosts")),
        }
    });
    cb.transfer_progress(move |_| {
        let go = Instant::now() < deadline;
        seen.timed_out.set(!go);
        go
    });
    cb.sideband_progress(move |_| {
        let go = Instant::now() < deadline;
        seen.timed_out.set(!go);
        go
    });
    cb
}

fn classify(remote: &Remote, seen: &Seen, deadline: Instant, e: &git2::Error) -> ResolveError {
    let url = remote.url.redacted();
    let message = e.message().chars().take(500).collect::<String>();
    let lower = message.to_ascii_lowercase();
    // libgit2's socket timeouts (`could not read from socket: timed out`), libssh2's
    // (`Timed out waiting on socket`, `API timeout expired`), or our callbacks' deadline.
    if seen.timed_out.get()
        || e.code() == ErrorCode::Timeout
        || lower.contains("timed out")
        || lower.contains("timeout expired")
    {
        // libgit2's idle timeout may trip before the source's own: say how long it was.
        let waited = remote
            .timeout
            .saturating_sub(deadline.saturating_duration_since(Instant::now()));
        return ResolveError::TimedOut {
            url,
            after: Duration::from_millis(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)),
        };
    }
    // libgit2 replaces our callback's message with a generic one: say it ourselves.
    match seen.host_key.get() {
        Some(HostKeyCheck::Mismatch) => {
            return ResolveError::HostKeyRejected {
                url,
                detail: "the server's key differs from the one known_hosts pins for it".to_owned(),
            };
        }
        Some(HostKeyCheck::Unknown) => {
            return ResolveError::HostKeyRejected {
                url,
                detail: "the host (with this port) is not in known_hosts".to_owned(),
            };
        }
        Some(HostKeyCheck::Match) | None => {}
    }
    if e.code() == ErrorCode::Auth || seen.auth_refused.get() {
        return ResolveError::AuthenticationFailed { url, message };
    }
    if e.code() == ErrorCode::Certificate || e.class() == ErrorClass::Ssl {
        return ResolveError::CertificateRejected { url, message };
    }
    ResolveError::FetchFailed { url, message }
}

/// Runs before any git2 call of a blocking operation: refuses SSH without known_hosts before
/// connecting, and makes sure libgit2's socket timeouts are in force.
fn precheck(remote: &Remote) -> Result<(), ResolveError> {
    if remote.url.scheme() == Scheme::Ssh && remote.known_hosts.is_none() {
        return Err(ResolveError::NoKnownHosts {
            url: remote.url.redacted(),
        });
    }
    socket_timeouts::in_force().map_err(|source| ResolveError::SocketTimeouts {
        url: remote.url.redacted(),
        source,
    })?;
    Ok(())
}

fn list_blocking(remote: &Remote, deadline: Instant) -> Result<Vec<AdvertisedRef>, ResolveError> {
    precheck(remote)?;
    let seen = Seen::default();
    let mut r =
        git2::Remote::create_detached(remote.url.as_git_url()).map_err(|e| ResolveError::FetchFailed {
            url: remote.url.redacted(),
            message: e.message().to_owned(),
        })?;
    let conn = r
        .connect_auth(
            Direction::Fetch,
            Some(callbacks(remote, deadline, &seen)),
            Some(git2::ProxyOptions::new()),
        )
        .map_err(|e| classify(remote, &seen, deadline, &e))?;
    let heads = conn.list().map_err(|e| classify(remote, &seen, deadline, &e))?;
    Ok(heads
        .iter()
        .map(|h| AdvertisedRef {
            name: h.name().to_owned(),
            oid: h.oid().to_string(),
        })
        .collect())
}

fn ancestry_blocking(
    remote: &Remote,
    path: &Path,
    full_ref: &str,
    old: &CommitId,
    new: &CommitId,
    deadline: Instant,
) -> Result<Ancestry, ResolveError> {
    precheck(remote)?;
    let cache_err = |e: git2::Error| ResolveError::Cache {
        path: path.to_owned(),
        message: e.message().to_owned(),
    };
    let repo = open_cache(path)?;
    let oid = |c: &CommitId| git2::Oid::from_str(c.as_str()).map_err(cache_err);
    let (old_oid, new_oid) = (oid(old)?, oid(new)?);
    let has = |o| repo.find_commit(o).is_ok();
    if !has(new_oid) {
        fetch_ref(&repo, path, remote, full_ref, deadline)?;
        if !has(new_oid) {
            return Err(ResolveError::CommitMissing {
                url: remote.url.redacted(),
                full_ref: full_ref.to_owned(),
                commit: new.clone(),
            });
        }
    }
    if !has(old_oid) {
        // A full fetch of `new` brought every ancestor of it: `old` is not one.
        return Ok(Ancestry::NonFastForward);
    }
    let descends = repo.graph_descendant_of(new_oid, old_oid).map_err(cache_err)?;
    Ok(if descends {
        Ancestry::FastForward
    } else {
        Ancestry::NonFastForward
    })
}

/// The cached bare repository of a remote, created when missing.
fn open_cache(path: &Path) -> Result<git2::Repository, ResolveError> {
    match git2::Repository::open_bare(path) {
        Ok(r) => Ok(r),
        Err(_) => git2::Repository::init_bare(path).map_err(|e| ResolveError::Cache {
            path: path.to_owned(),
            message: e.message().to_owned(),
        }),
    }
}

/// Where the cache keeps `full_ref`: under our own namespace, so gc never drops it.
fn cached_ref(full_ref: &str) -> String {
    format!("refs/nixroll/{}", full_ref.trim_start_matches("refs/"))
}

/// Fetch `full_ref` (all of its history, and for a tag its tag object) into the cache.
fn fetch_ref(
    repo: &git2::Repository,
    path: &Path,
    remote: &Remote,
    full_ref: &str,
    deadline: Instant,
) -> Result<(), ResolveError> {
    let seen = Seen::default();
    let mut r = repo
        .remote_anonymous(&remote.url.as_git_url())
        .map_err(|e| ResolveError::Cache {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
    let mut opts = git2::FetchOptions::new();
    opts.remote_callbacks(callbacks(remote, deadline, &seen))
        .proxy_options(git2::ProxyOptions::new())
        .download_tags(git2::AutotagOption::None);
    let spec = format!("+{full_ref}:{}", cached_ref(full_ref));
    r.fetch(&[spec.as_str()], Some(&mut opts), None)
        .map_err(|e| classify(remote, &seen, deadline, &e))
}

/// Why [`Resolver::verify`] did not accept a head.
#[derive(Debug)]
pub enum VerifyFailure {
    /// The objects could not be fetched or read: a fetch failure, not a verdict.
    Fetch(ResolveError),
    /// The commit or tag (`what`) is not signed by a trusted key.
    Refused { what: String, error: VerifyError },
}

/// What must be signed, and the keys to trust (from `spec.verify`).
#[derive(Clone, Debug)]
pub struct Verification {
    pub mode: VerifyMode,
    pub keys: Arc<TrustedKeys>,
}

impl Resolver {
    /// Checks the signatures `verification` asks for on `head` (its commit, its tag object or
    /// both), fetching the ref into the cache when the objects are not there yet. Returns who
    /// signed what (`commit … signed by …`).
    pub async fn verify(
        &self,
        remote: &Remote,
        head: &ResolvedRef,
        verification: &Verification,
        now: jiff::Timestamp,
    ) -> Result<Vec<String>, VerifyFailure> {
        let (r, head2, v) = (remote.clone(), head.clone(), verification.clone());
        let path = self.cache_path(remote);
        let out = self
            .bounded(remote, "verify", move |deadline| {
                Ok(verify_blocking(&r, &path, &head2, &v, now, deadline))
            })
            .await;
        match out {
            Ok(verdict) => verdict,
            Err(e) => Err(VerifyFailure::Fetch(e)),
        }
    }
}

fn verify_blocking(
    remote: &Remote,
    path: &Path,
    head: &ResolvedRef,
    v: &Verification,
    now: jiff::Timestamp,
    deadline: Instant,
) -> Result<Vec<String>, VerifyFailure> {
    let fetch = VerifyFailure::Fetch;
    let cache_err = |e: git2::Error| {
        VerifyFailure::Fetch(ResolveError::Cache {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
    };
    let commit = head.revision.commit.clone();
    let full_ref = head.full_name.as_str();
    let commit_what = format!("commit {commit}");
    if v.mode.tag() && !full_ref.starts_with("refs/tags/") {
        return Err(VerifyFailure::Refused {
            what: commit_what,
            error: VerifyError::NotATag(format!(
                "verify.mode {:?} needs a tag, and {full_ref} is not one",
                v.mode
            )),
        });
    }
    precheck(remote).map_err(fetch)?;
    let repo = open_cache(path).map_err(fetch)?;
    let commit_oid = git2::Oid::from_str(commit.as_str()).map_err(cache_err)?;
    let local = cached_ref(full_ref);
    let tag_target = |repo: &git2::Repository| -> Option<git2::Oid> {
        let target = repo.find_reference(&local).ok()?.target()?;
        let peeled = repo.find_object(target, None).ok()?.peel_to_commit().ok()?.id();
        (peeled == commit_oid).then_some(target)
    };
    let has_commit = |repo: &git2::Repository| repo.find_commit(commit_oid).is_ok();
    if !has_commit(&repo) || (v.mode.tag() && tag_target(&repo).is_none()) {
        fetch_ref(&repo, path, remote, full_ref, deadline).map_err(fetch)?;
    }
    if !has_commit(&repo) || (v.mode.tag() && tag_target(&repo).is_none()) {
        return Err(fetch(ResolveError::CommitMissing {
            url: remote.url.redacted(),
            full_ref: full_ref.to_owned(),
            commit,
        }));
    }
    let mut signers = Vec::new();
    if v.mode.tag() {
        let tag_name = full_ref.trim_start_matches("refs/tags/");
        let what = format!("tag {tag_name} (of commit {commit})");
        let target = tag_target(&repo).ok_or_else(|| {
            fetch(ResolveError::CommitMissing {
                url: remote.url.redacted(),
                full_ref: full_ref.to_owned(),
                commit: commit.clone(),
            })
        })?;
        if target == commit_oid {
            return Err(VerifyFailure::Refused {
                what,
                error: VerifyError::NotATag(
                    "it is a lightweight tag: there is no tag object to sign (git tag -s makes one)".into(),
                ),
            });
        }
        let odb = repo.odb().map_err(cache_err)?;
        let obj = odb.read(target).map_err(cache_err)?;
        let Some((sig, signed)) = split_tag_signature(obj.data()) else {
            return Err(VerifyFailure::Refused {
                what,
                error: VerifyError::Unsigned,
            });
        };
        match v.keys.verify(sig, signed, now) {
            Ok(s) => signers.push(format!("{what} signed by {s}")),
            Err(error) => return Err(VerifyFailure::Refused { what, error }),
        }
    }
    if v.mode.head() {
        let (sig, signed) = match repo.extract_signature(&commit_oid, None) {
            Ok(pair) => pair,
            Err(e) if e.code() == ErrorCode::NotFound => {
                return Err(VerifyFailure::Refused {
                    what: commit_what,
                    error: VerifyError::Unsigned,
                });
            }
            Err(e) => return Err(cache_err(e)),
        };
        match v.keys.verify(&sig, &signed, now) {
            Ok(s) => signers.push(format!("{commit_what} signed by {s}")),
            Err(error) => {
                return Err(VerifyFailure::Refused {
                    what: commit_what,
                    error,
                });
            }
        }
    }
    Ok(signers)
}
