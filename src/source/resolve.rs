//! Resolving a FlakeSource against its remote with git2 (libgit2), every call bounded in time.
//!
//! 1. **List** the remote's refs (`ls-remote`: a detached remote, no repository, no objects)
//!    and pick the ref with [`RefChoice::resolve`].
//! 2. **Ancestry**, only when the head changed: fetch the ref into a cached bare repository
//!    and ask `graph_descendant_of`. A full (not shallow) fetch of the new head brings all its
//!    ancestors, so an old commit still absent afterwards is not one of them.
//!
//! git2 calls block, so each runs in `spawn_blocking` under `tokio::time::timeout`. A timed-out
//! thread keeps running, so the work also stops itself where libgit2 lets it: the transfer and
//! sideband callbacks cancel after the deadline, and a semaphore permit held by the thread caps
//! how many can be stuck at once. libgit2's global socket timeouts
//! (`git2::opts::set_server_timeout_in_milliseconds`) are `unsafe` and this crate forbids
//! `unsafe_code`, so a silent server (no bytes at all) leaves its thread blocked until the
//! socket dies: see docs/source.md.
//!
//! URLs here never carry credentials ([`SourceUrl`] refuses them), so messages may name them.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use git2::{CertificateCheckStatus, CredentialType, Direction, ErrorCode, RemoteCallbacks};
use tokio::sync::Semaphore;

use super::known_hosts::{HostKeyCheck, KnownHosts};
use super::refspec::{AdvertisedRef, RefChoice, RefError, ResolvedRef};
use super::revision::CommitId;
use super::url::{Scheme, SourceUrl};

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
}

impl ResolveError {
    /// The Flux-like condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::NoKnownHosts { .. } => "KnownHostsMissing",
            ResolveError::HostKeyRejected { .. } => "HostKeyRejected",
            ResolveError::AuthenticationFailed { .. } => "AuthenticationFailed",
            ResolveError::TimedOut { .. } => "Timeout",
            ResolveError::Ref { .. } | ResolveError::CommitMissing { .. } => "RefNotResolved",
            ResolveError::FetchFailed { .. } | ResolveError::Cache { .. } | ResolveError::Task { .. } => {
                "GitOperationFailed"
            }
        }
    }
}

/// Resolves sources; one per controller. Holds the cache of bare repositories and the cap on
/// concurrent (and possibly stuck) git threads.
#[derive(Clone, Debug)]
pub struct Resolver {
    cache_dir: PathBuf,
    threads: Arc<Semaphore>,
}

impl Resolver {
    pub fn new(cache_dir: impl Into<PathBuf>, max_threads: usize) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            threads: Arc::new(Semaphore::new(max_threads.max(1))),
        }
    }

    /// `git ls-remote`: the refs the remote advertises (empty for an empty repository).
    pub async fn list_refs(&self, remote: &Remote) -> Result<Vec<AdvertisedRef>, ResolveError> {
        let r = remote.clone();
        self.bounded(remote, move |deadline| list_blocking(&r, deadline))
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
        self.bounded(remote, move |deadline| {
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

    async fn bounded<T: Send + 'static>(
        &self,
        remote: &Remote,
        work: impl FnOnce(Instant) -> Result<T, ResolveError> + Send + 'static,
    ) -> Result<T, ResolveError> {
        let timed_out = || ResolveError::TimedOut {
            url: remote.url.redacted(),
            after: remote.timeout,
        };
        let deadline = Instant::now() + remote.timeout;
        let run = async {
            // The permit moves into the thread: it is released when the thread really ends.
            let permit = self
                .threads
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| ResolveError::Task {
                    url: remote.url.redacted(),
                    message: e.to_string(),
                })?;
            tokio::task::spawn_blocking(move || {
                let out = work(deadline);
                drop(permit);
                out
            })
            .await
            .map_err(|e| ResolveError::Task {
                url: remote.url.redacted(),
                message: e.to_string(),
            })?
        };
        tokio::time::timeout(remote.timeout, run)
            .await
            .map_err(|_| timed_out())?
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
    auth_attempts: Cell<u32>,
    host_key: Cell<Option<HostKeyCheck>>,
    timed_out: Cell<bool>,
}

fn callbacks<'a>(remote: &'a Remote, deadline: Instant, seen: &'a Seen) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    cb.credentials(move |_url, user_from_url, allowed| {
        let n = seen.auth_attempts.get() + 1;
        seen.auth_attempts.set(n);
        // libgit2 calls again after each rejection: one try per kind is enough.
        if n > 2 {
            return Err(git2::Error::from_str("credentials rejected"));
        }
        match &remote.credentials {
            Credentials::Basic { username, password }
                if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
            {
                git2::Cred::userpass_plaintext(username, password)
            }
            Credentials::SshKey { identity, passphrase } => {
                let user = user_from_url.or(remote.url.user()).unwrap_or("git");
                if allowed.contains(CredentialType::USERNAME) {
                    git2::Cred::username(user)
                } else if allowed.contains(CredentialType::SSH_KEY)
                    || allowed.contains(CredentialType::SSH_MEMORY)
                {
                    git2::Cred::ssh_key_from_memory(user, None, identity, passphrase.as_deref())
                } else {
                    Err(git2::Error::from_str("the server wants no SSH key"))
                }
            }
            _ => Err(git2::Error::from_str(
                "the server asks for credentials and the source has none of the kind it accepts",
            )),
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

fn classify(remote: &Remote, seen: &Seen, e: &git2::Error) -> ResolveError {
    let url = remote.url.redacted();
    let message = e.message().chars().take(500).collect::<String>();
    if seen.timed_out.get() {
        return ResolveError::TimedOut {
            url,
            after: remote.timeout,
        };
    }
    if let Some(HostKeyCheck::Mismatch | HostKeyCheck::Unknown) = seen.host_key.get() {
        return ResolveError::HostKeyRejected { url, detail: message };
    }
    if e.code() == ErrorCode::Auth || seen.auth_attempts.get() > 0 {
        return ResolveError::AuthenticationFailed { url, message };
    }
    ResolveError::FetchFailed { url, message }
}

fn precheck(remote: &Remote) -> Result<(), ResolveError> {
    if remote.url.scheme() == Scheme::Ssh && remote.known_hosts.is_none() {
        return Err(ResolveError::NoKnownHosts {
            url: remote.url.redacted(),
        });
    }
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
        .map_err(|e| classify(remote, &seen, &e))?;
    let heads = conn.list().map_err(|e| classify(remote, &seen, &e))?;
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
    let repo = match git2::Repository::open_bare(path) {
        Ok(r) => r,
        Err(_) => git2::Repository::init_bare(path).map_err(cache_err)?,
    };
    let oid = |c: &CommitId| git2::Oid::from_str(c.as_str()).map_err(cache_err);
    let (old_oid, new_oid) = (oid(old)?, oid(new)?);
    let has = |o| repo.find_commit(o).is_ok();
    if !has(new_oid) {
        let seen = Seen::default();
        let mut r = repo
            .remote_anonymous(&remote.url.as_git_url())
            .map_err(cache_err)?;
        let mut opts = git2::FetchOptions::new();
        opts.remote_callbacks(callbacks(remote, deadline, &seen))
            .proxy_options(git2::ProxyOptions::new())
            .download_tags(git2::AutotagOption::None);
        // Keep what was fetched reachable under our own namespace, so gc never drops it.
        let spec = format!(
            "+{full_ref}:refs/nixroll/{}",
            full_ref.trim_start_matches("refs/")
        );
        r.fetch(&[spec.as_str()], Some(&mut opts), None)
            .map_err(|e| classify(remote, &seen, &e))?;
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
