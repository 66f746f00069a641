//! The FlakeSource controller: resolves each source's ref to a commit with git2 (one
//! resolution per source, however many nodes follow it) and writes `status` under
//! `nixroll-controller`. Run by the leading `nixroll controller` beside the NixOSNode controller.
//!
//! Watch-driven: a reconcile runs when a FlakeSource's spec changes (generation) and again
//! `interval` (+ up to 10% jitter) after the last one; no other loop. Every remote call is
//! bounded by the source's `timeout` ([`Resolver`]); the Secret is read with `get` (never list
//! or watch) and its values stay in memory. URLs in logs and status never carry credentials
//! ([`SourceUrl`] refuses them).
//!
//! Events (`kubectl describe flakesource`) are derived from status changes
//! ([`status_notes`]): a new revision, a failure of a new kind, a recovery. The same failure
//! polled again stays silent (the status says it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::refspec::{RefChoice, ResolvedRef};
use super::resolve::{Poll, Remote, Resolver, Verification, VerifyFailure};
use super::url::SourceUrl;
use crate::api::{FlakeSource, FlakeSourceRef, FlakeSourceSpec, FlakeSourceStatus};
use crate::controller::events::EventWriter;
use crate::names::CONTROLLER_MANAGER;

use super::secrets::{SecretReader, read_secret, read_trusted_keys};
pub use super::secrets::{credentials_from, secret_data};
pub use super::status::{Outcome, last_accepted, next_status, status_notes};

/// Shortest interval accepted; shorter ones are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Used when `interval` cannot be parsed (the CRD's pattern makes that rare).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// Used when `timeout` cannot be parsed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How the FlakeSource controller runs.
#[derive(Clone, Debug)]
pub struct SourceControllerConfig {
    /// Cached bare repositories for the ancestry check (an emptyDir in the Deployment).
    pub cache_dir: PathBuf,
    /// git threads at once (a timed-out thread keeps its permit until it really ends).
    pub max_git_threads: usize,
    /// Bound of each Kubernetes API request.
    pub api_timeout: Duration,
    /// Lower bound of `interval` (30s; tests lower it).
    pub min_interval: Duration,
}

impl SourceControllerConfig {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        SourceControllerConfig {
            cache_dir: cache_dir.into(),
            max_git_threads: 4,
            api_timeout: Duration::from_secs(10),
            min_interval: MIN_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("writing the status of FlakeSource {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of FlakeSource {namespace}/{name} timed out after {after:?}")]
    Timeout {
        namespace: String,
        name: String,
        after: Duration,
    },
}

struct Ctx {
    client: Client,
    secrets: SecretReader,
    resolver: Resolver,
    config: SourceControllerConfig,
    events: EventWriter,
}

/// Run until the future is dropped (the leader's term ends); Events are reported as
/// `identity` (the controller's, as for NixOSNodes).
pub async fn run(client: Client, config: SourceControllerConfig, identity: &str) {
    let resolver = Resolver::new(&config.cache_dir, config.max_git_threads);
    let api: Api<FlakeSource> = Api::all(client.clone());
    let (reader, writer) = reflector::store::<FlakeSource>();
    // Only spec changes and a new `nixroll.io/requested-at` trigger (our own status writes do
    // not); the interval requeues.
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_request, Default::default());
    let ctx = Arc::new(Ctx {
        events: EventWriter::new(client.clone(), CONTROLLER_MANAGER, identity),
        secrets: SecretReader {
            client: client.clone(),
            timeout: config.api_timeout,
        },
        client,
        resolver,
        config,
    });
    Controller::for_stream(stream, reader)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(e) = res {
                debug!(error = %e, "flakesource controller stream");
            }
            std::future::ready(())
        })
        .await;
}

/// What triggers a resolution: the spec's generation and the `nixroll.io/requested-at`
/// annotation (any new value, like Flux's `reconcile.fluxcd.io/requestedAt`).
pub fn spec_or_request(fs: &FlakeSource) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    predicates::generation(fs).hash(&mut h);
    requested_at(fs).hash(&mut h);
    Some(h.finish())
}

/// The `nixroll.io/requested-at` annotation, if set.
pub fn requested_at(fs: &FlakeSource) -> Option<&str> {
    fs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::names::REQUESTED_AT_ANNOTATION))
        .map(String::as_str)
}

fn error_policy(fs: Arc<FlakeSource>, err: &SourceError, _ctx: Arc<Ctx>) -> Action {
    warn!(source = %key(&fs), error = %err, "flakesource reconcile failed");
    Action::requeue(Duration::from_secs(10) + Duration::from_millis(fastrand::u64(0..2000)))
}

fn key(fs: &FlakeSource) -> String {
    format!("{}/{}", fs.namespace().unwrap_or_default(), fs.name_any())
}

/// `5m`, `30s`, `1h30m` as a std duration.
fn duration(s: &str) -> Option<Duration> {
    crate::rollout::parse_duration(s)
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
}

/// `interval` with up to 10% jitter added, at least `min`.
pub fn next_interval(spec: &FlakeSourceSpec, min: Duration) -> Duration {
    let base = duration(&spec.interval).unwrap_or(DEFAULT_INTERVAL).max(min);
    let jitter_ms = (base.as_millis() / 10).min(u128::from(u64::MAX)) as u64;
    base + Duration::from_millis(fastrand::u64(0..=jitter_ms))
}

/// The ref choice of a spec (exactly one field set; the CRD enforces it too).
pub fn ref_choice(r: &FlakeSourceRef) -> Result<RefChoice, String> {
    let choice = match (&r.branch, &r.tag, &r.semver, &r.name) {
        (Some(b), None, None, None) => RefChoice::Branch(b.clone()),
        (None, Some(t), None, None) => RefChoice::Tag(t.clone()),
        (None, None, Some(s), None) => RefChoice::Semver(s.clone()),
        (None, None, None, Some(n)) => RefChoice::Name(n.clone()),
        _ => return Err("ref must set exactly one of branch, tag, semver and name".into()),
    };
    choice.validate().map_err(|e| e.to_string())?;
    Ok(choice)
}

async fn reconcile(fs: Arc<FlakeSource>, ctx: Arc<Ctx>) -> Result<Action, SourceError> {
    let now = Timestamp::now();
    let prev = fs.status.clone().unwrap_or_default();
    let spec = &fs.spec;
    let generation = fs.metadata.generation;
    let url = SourceUrl::parse(&spec.url, spec.insecure);
    let url_ok = url.as_ref().ok();
    let (outcome, requeue) = if spec.suspend {
        (Outcome::Suspended, None)
    } else {
        match (&url, ref_choice(&spec.git_ref)) {
            (Err(e), _) => (
                Outcome::Refused {
                    reason: "InvalidSpec",
                    message: e.to_string(),
                },
                None,
            ),
            (_, Err(m)) => (
                Outcome::Refused {
                    reason: "InvalidSpec",
                    message: m,
                },
                None,
            ),
            (Ok(u), Ok(choice)) => {
                let every = Some(next_interval(spec, ctx.config.min_interval));
                let secrets = match read_secret(&ctx.secrets, &fs).await {
                    Ok(c) => read_trusted_keys(&ctx.secrets, &fs).await.map(|v| (c, v)),
                    Err(e) => Err(e),
                };
                match secrets {
                    Err((reason, message)) => (Outcome::Refused { reason, message }, every),
                    Ok(((credentials, known_hosts), verification)) => {
                        let remote = Remote {
                            url: u.clone(),
                            credentials,
                            known_hosts,
                            timeout: duration(&spec.timeout).unwrap_or(DEFAULT_TIMEOUT),
                        };
                        let last = last_accepted(&prev, u, spec);
                        let poll = ctx
                            .resolver
                            .poll(&remote, &choice, last.as_ref(), spec.allow_non_fast_forward)
                            .await;
                        let outcome = match verification {
                            None => Outcome::Polled(poll),
                            Some(v) => verified(&ctx.resolver, &remote, &v, poll, last).await,
                        };
                        (outcome, every)
                    }
                }
            }
        }
    };
    log_outcome(&fs, &prev, &outcome);
    let mut status = next_status(&prev, spec, generation, url_ok, &outcome, now);
    status.last_handled_requested_at = requested_at(&fs).map(|v| v.chars().take(256).collect());
    if status != prev {
        write_status(&ctx, &fs, &status).await?;
        let regarding = fs.object_ref(&());
        for note in status_notes(&prev, &status) {
            // An Event is a courtesy: the status already says it; never fail the reconcile.
            let published =
                tokio::time::timeout(ctx.config.api_timeout, ctx.events.publish(&note, &regarding)).await;
            if !matches!(published, Ok(Ok(()))) {
                debug!(source = %key(&fs), reason = note.reason, "event not published");
            }
        }
    }
    Ok(match requeue {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// The outcome of a poll with `spec.verify`: a head that was accepted (new or unchanged) is
/// checked; anything else stays as polled.
async fn verified(
    resolver: &Resolver,
    remote: &Remote,
    v: &Verification,
    poll: Poll,
    last: Option<ResolvedRef>,
) -> Outcome {
    let head = match &poll {
        Poll::Advanced(h) | Poll::Unchanged(h) => h.clone(),
        _ => return Outcome::Polled(poll),
    };
    match resolver.verify(remote, &head, v, Timestamp::now()).await {
        Ok(signers) => Outcome::Verified { poll, signers },
        Err(VerifyFailure::Fetch(error)) => Outcome::Polled(Poll::Failed { kept: last, error }),
        Err(VerifyFailure::Refused { what, error }) => Outcome::Unverified {
            kept: last,
            refused: head,
            what,
            error,
        },
    }
}

fn log_outcome(fs: &FlakeSource, prev: &FlakeSourceStatus, outcome: &Outcome) {
    let source = key(fs);
    match outcome {
        Outcome::Unverified {
            refused, what, error, ..
        } => {
            warn!(%source, refused = %refused.revision, %what, %error, "head not signed by a trusted key: not followed");
        }
        Outcome::Polled(Poll::Advanced(r))
            if prev.revision.as_deref() != Some(&r.revision.flux_display()) =>
        {
            info!(%source, revision = %r.revision, "new revision accepted");
        }
        Outcome::Polled(Poll::NonFastForward { refused, .. }) => {
            warn!(%source, refused = %refused.revision, "head does not descend from the last revision: not followed");
        }
        Outcome::Polled(Poll::Failed { error, .. }) => {
            warn!(%source, reason = error.reason(), error = %error, "fetch failed; the last revision stays");
        }
        Outcome::Refused { reason, message } => warn!(%source, reason, message, "source refused"),
        _ => debug!(%source, "source polled"),
    }
}

async fn write_status(ctx: &Ctx, fs: &FlakeSource, status: &FlakeSourceStatus) -> Result<(), SourceError> {
    let namespace = fs.namespace().unwrap_or_default();
    let name = fs.name_any();
    let api: Api<FlakeSource> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = serde_json::json!({
        "apiVersion": FlakeSource::api_version(&()),
        "kind": FlakeSource::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(CONTROLLER_MANAGER).force();
    match tokio::time::timeout(
        ctx.config.api_timeout,
        api.patch_status(&name, &pp, &Patch::Apply(&body)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(SourceError::WriteStatus {
            namespace,
            name,
            source,
        }),
        Err(_) => Err(SourceError::Timeout {
            namespace,
            name,
            after: ctx.config.api_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::source::resolve::{Credentials, ResolveError};
    use crate::source::revision::CommitId;
    use crate::source::revision::Revision;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use std::collections::BTreeMap;

    fn spec() -> FlakeSourceSpec {
        crate::sim::fixtures::flake_source_spec("https://git.example.org/infra.git", "main")
    }

    fn resolved(c: char) -> ResolvedRef {
        ResolvedRef {
            full_name: "refs/heads/main".into(),
            revision: Revision {
                pointer: Some("main".into()),
                commit: CommitId::parse(&std::iter::repeat_n(c, 40).collect::<String>()).unwrap(),
            },
        }
    }

    /// The status after one poll of `s` at `t`, from `prev`.
    fn polled(
        prev: &FlakeSourceStatus,
        s: &FlakeSourceSpec,
        u: &SourceUrl,
        poll: Poll,
        t: Timestamp,
    ) -> FlakeSourceStatus {
        next_status(prev, s, Some(1), Some(u), &Outcome::Polled(poll), t)
    }

    /// A time of the tests: `n` seconds after a fixed start.
    fn at(n: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + n).unwrap()
    }

    /// The source of [`spec`], its URL, and its status after a first poll at `at(0)`.
    fn first(poll: Poll) -> (FlakeSourceSpec, SourceUrl, FlakeSourceStatus) {
        let s = spec();
        let u = SourceUrl::parse(&s.url, false).unwrap();
        let st = polled(&FlakeSourceStatus::default(), &s, &u, poll, at(0));
        (s, u, st)
    }

    fn cond<'a>(st: &'a FlakeSourceStatus, t: &str) -> Option<&'a Condition> {
        st.conditions.iter().find(|c| c.type_ == t)
    }

    #[test]
    fn accepted_then_failed_keeps_the_revision_and_says_why() {
        let (s, u, st) = first(Poll::Advanced(resolved('a')));
        assert_eq!(
            st.revision.as_deref(),
            Some(format!("main@sha1:{}", "a".repeat(40)).as_str())
        );
        assert_eq!(st.commit.as_deref(), Some("a".repeat(40).as_str()));
        assert_eq!(st.git_ref.as_deref(), Some("branch main"));
        assert_eq!(cond(&st, "Ready").unwrap().status, "True");
        assert!(cond(&st, "FetchFailed").is_none());
        assert_eq!(last_accepted(&st, &u, &s), Some(resolved('a')));

        let t1 = at(300);
        let failed = Outcome::Polled(Poll::Failed {
            kept: Some(resolved('a')),
            error: ResolveError::TimedOut {
                url: u.redacted(),
                after: Duration::from_secs(60),
            },
        });
        let st2 = next_status(&st, &s, Some(1), Some(&u), &failed, t1);
        assert_eq!(st2.commit, st.commit, "the last revision stays");
        let ff = cond(&st2, "FetchFailed").unwrap();
        assert_eq!((ff.status.as_str(), ff.reason.as_str()), ("True", "Timeout"));
        assert_eq!(cond(&st2, "Ready").unwrap().status, "False");
        assert_eq!(st2.last_fetch_time, Some(Time(t1)));

        // Recovery: Ready again, its transition time is the recovery's.
        let t2 = at(600);
        let st3 = polled(&st2, &s, &u, Poll::Unchanged(resolved('a')), t2);
        assert_eq!(cond(&st3, "Ready").unwrap().last_transition_time, Time(t2));
        assert!(cond(&st3, "FetchFailed").is_none());
        // And unchanged after that keeps the transition time.
        let st4 = polled(&st3, &s, &u, Poll::Unchanged(resolved('a')), t2);
        assert_eq!(cond(&st4, "Ready").unwrap().last_transition_time, Time(t2));
    }

    #[test]
    fn non_fast_forward_is_refused_and_reported() {
        let (_, _, st) = first(Poll::NonFastForward {
            kept: resolved('a'),
            refused: resolved('b'),
        });
        assert_eq!(st.commit.as_deref(), Some("a".repeat(40).as_str()));
        assert!(st.refused_revision.as_deref().unwrap().contains(&"b".repeat(40)));
        assert_eq!(cond(&st, "NonFastForward").unwrap().status, "True");
        assert!(
            cond(&st, "Ready")
                .unwrap()
                .message
                .contains("allowNonFastForward")
        );
    }

    #[test]
    fn a_changed_ref_starts_afresh() {
        let (_, u, st) = first(Poll::Advanced(resolved('a')));
        let t = at(0);
        let mut other = spec();
        other.git_ref.branch = Some("release".into());
        assert_eq!(last_accepted(&st, &u, &other), None);
        // A failure on the new ref does not keep the old ref's revision.
        let failed = Outcome::Refused {
            reason: "SecretNotFound",
            message: "Secret x/y not found".into(),
        };
        let st2 = next_status(&st, &other, Some(2), Some(&u), &failed, t);
        assert_eq!(st2.commit, None);
        assert_eq!(st2.git_ref.as_deref(), Some("branch release"));
    }

    #[test]
    fn events_follow_status_changes_not_polls() {
        let s = spec();
        let u = SourceUrl::parse(&s.url, false).unwrap();
        let reasons = |prev: &FlakeSourceStatus, next: &FlakeSourceStatus| -> Vec<(String, bool)> {
            status_notes(prev, next)
                .into_iter()
                .map(|n| (n.reason.to_string(), n.warning))
                .collect()
        };
        let empty = FlakeSourceStatus::default();
        let a = polled(&empty, &s, &u, Poll::Advanced(resolved('a')), at(0));
        assert_eq!(reasons(&empty, &a), [("NewRevision".to_string(), false)]);
        let notes = status_notes(&empty, &a);
        assert!(notes[0].note.contains(&"a".repeat(40)), "{}", notes[0].note);
        // Polled again, nothing new: no Event (only lastFetchTime moved).
        let a2 = polled(&a, &s, &u, Poll::Unchanged(resolved('a')), at(300));
        assert!(reasons(&a, &a2).is_empty());
        // A timeout: one Warning; the same timeout again: silent.
        let timeout = || Poll::Failed {
            kept: Some(resolved('a')),
            error: ResolveError::TimedOut {
                url: u.redacted(),
                after: Duration::from_secs(60),
            },
        };
        let f = polled(&a2, &s, &u, timeout(), at(600));
        assert_eq!(reasons(&a2, &f), [("Timeout".to_string(), true)]);
        let f2 = polled(&f, &s, &u, timeout(), at(900));
        assert!(reasons(&f, &f2).is_empty());
        // Recovery on the same revision: one Normal Event.
        let ok = polled(&f2, &s, &u, Poll::Unchanged(resolved('a')), at(1200));
        assert_eq!(reasons(&f2, &ok), [("Succeeded".to_string(), false)]);
        // Recovery with a new revision: only NewRevision, naming the old one.
        let b = polled(&f2, &s, &u, Poll::Advanced(resolved('b')), at(1200));
        let notes = status_notes(&f2, &b);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].reason, "NewRevision");
        assert!(
            notes[0]
                .note
                .contains(&format!("was main@sha1:{}", "a".repeat(40))),
            "{}",
            notes[0].note
        );
        // A force push refused: a Warning NonFastForward.
        let nff = polled(
            &b,
            &s,
            &u,
            Poll::NonFastForward {
                kept: resolved('b'),
                refused: resolved('c'),
            },
            at(1500),
        );
        assert_eq!(reasons(&b, &nff), [("NonFastForward".to_string(), true)]);
        // Suspended is Normal.
        let sus = next_status(&nff, &s, Some(2), Some(&u), &Outcome::Suspended, at(1800));
        assert_eq!(reasons(&nff, &sus), [("Suspended".to_string(), false)]);
    }

    #[test]
    fn intervals_have_a_floor_and_bounded_jitter() {
        let mut s = spec();
        s.interval = "1s".into();
        assert!(next_interval(&s, MIN_INTERVAL) >= MIN_INTERVAL);
        s.interval = "10m".into();
        for _ in 0..50 {
            let d = next_interval(&s, MIN_INTERVAL);
            assert!(
                d >= Duration::from_secs(600) && d <= Duration::from_secs(660),
                "{d:?}"
            );
        }
    }

    #[test]
    fn secrets_use_flux_key_names_and_never_show_values() {
        let mk = |pairs: &[(&str, &str)]| Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        };
        let (c, kh) = credentials_from(&mk(&[("username", "bot"), ("password", "s3cret")])).unwrap();
        assert!(matches!(c, Credentials::Basic { .. }));
        assert!(kh.is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
        let (c, _) = credentials_from(&mk(&[("identity", "KEY"), ("password", "pp")])).unwrap();
        assert!(matches!(
            c,
            Credentials::SshKey {
                passphrase: Some(_),
                ..
            }
        ));
        let e = credentials_from(&mk(&[("username", "bot")])).unwrap_err();
        assert!(e.contains("password"));
        let e = credentials_from(&mk(&[("known_hosts", "garbage s3cret")])).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(matches!(credentials_from(&mk(&[])).unwrap().0, Credentials::None));
    }
}
