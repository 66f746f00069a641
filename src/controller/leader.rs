//! Leader election over a `coordination.k8s.io/v1` Lease, written by hand: kube 5 has none, and
//! the crates that offer one (`kube-lease-manager`, `kube-leader-election`) track older kube
//! releases.
//!
//! Protocol (the client-go one, simplified):
//! * free (no Lease, or empty holder) → create/replace it with us as holder;
//! * held by us → replace with a new `renewTime` (renew);
//! * held by another and not expired → wait; expired → replace (take over).
//!
//! Every write is a create or a replace carrying the `resourceVersion` that was read, so two
//! candidates racing for the same Lease cannot both win: the loser gets `409 Conflict`
//! ([`LeaseOutcome::LostRace`]). A Lease counts as expired when its `renewTime` plus
//! `leaseDurationSeconds` lies in the past by our clock, or when we have watched it stay
//! unchanged for a full lease duration (the client-go rule, immune to clock skew).

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// `holderIdentity` written into the Lease.
    pub identity: String,
    /// `leaseDurationSeconds` (15 s by default).
    pub lease_duration: Duration,
    /// How often the leader renews and a standby re-checks (5 s).
    pub renew_period: Duration,
    /// The leader steps down when no renewal succeeded for this long (10 s; less than the lease
    /// duration, so it stops before anyone may take over).
    pub renew_deadline: Duration,
}

impl LeaderElectionConfig {
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        LeaderElectionConfig {
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading lease {lease}: {source}")]
    GetLease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing lease {lease}: {source}")]
    WriteLease {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease request timed out after {0:?}")]
    Timeout(Duration),
}

impl LeaderError {
    pub fn category(&self) -> &'static str {
        match self {
            LeaderError::GetLease { .. } => "LeaseReadFailed",
            LeaderError::WriteLease { .. } => "LeaseWriteFailed",
            LeaderError::Timeout(_) => "LeaseTimeout",
        }
    }
}

/// Result of one election step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// We became the holder.
    Acquired,
    /// We were the holder and renewed.
    Renewed,
    /// Someone else holds an unexpired lease; look again after `retry_in`.
    HeldByOther { holder: String, retry_in: Duration },
    /// Our write lost against a concurrent writer (409).
    LostRace,
}

/// One candidate.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    api_timeout: Duration,
    /// `resourceVersion` last seen and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderElectionConfig, api_timeout: Duration) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            api_timeout,
            observed: None,
        }
    }

    pub fn config(&self) -> &LeaderElectionConfig {
        &self.config
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(15),
            ),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, LeaderError> {
        tokio::time::timeout(self.api_timeout, fut)
            .await
            .map_err(|_| LeaderError::Timeout(self.api_timeout))
    }

    /// The Lease as the API has it now (`None`: absent).
    async fn get(&self, name: &str) -> Result<Option<Lease>, LeaderError> {
        self.timed(self.api.get_opt(name))
            .await?
            .map_err(|source| LeaderError::GetLease {
                lease: name.to_string(),
                source,
            })
    }

    fn write_result(
        &self,
        r: Result<Lease, kube::Error>,
        ok: LeaseOutcome,
    ) -> Result<LeaseOutcome, LeaderError> {
        match r {
            Ok(_) => Ok(ok),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(LeaseOutcome::LostRace),
            Err(source) => Err(LeaderError::WriteLease {
                lease: self.config.lease_name.clone(),
                source,
            }),
        }
    }

    /// One step: acquire, renew, or report who holds the Lease.
    pub async fn try_acquire_or_renew(&mut self) -> Result<LeaseOutcome, LeaderError> {
        let name = self.config.lease_name.clone();
        let now = Timestamp::now();
        let current = self.get(&name).await?;
        let Some(lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            let r = self
                .timed(self.api.create(&PostParams::default(), &lease))
                .await?;
            return self.write_result(r, LeaseOutcome::Acquired);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);

        if holder == self.config.identity {
            let mut next = lease.clone();
            next.spec = Some(self.spec(now, spec.acquire_time.clone(), transitions));
            let r = self
                .timed(self.api.replace(&name, &PostParams::default(), &next))
                .await?;
            return self.write_result(r, LeaseOutcome::Renewed);
        }

        if !holder.is_empty() {
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15).max(1)).unwrap_or(15),
            );
            // Watched unchanged for a full duration?
            let seen_since = match &self.observed {
                Some((seen_rv, at)) if *seen_rv == rv => *at,
                _ => {
                    let at = Instant::now();
                    self.observed = Some((rv.clone(), at));
                    at
                }
            };
            let unchanged_for = seen_since.elapsed();
            let by_clock_left = spec
                .renew_time
                .as_ref()
                .map(|t| {
                    let expiry = t.0 + jiff::SignedDuration::try_from(duration).unwrap_or_default();
                    Duration::try_from(expiry.duration_since(now)).unwrap_or(Duration::ZERO)
                })
                .unwrap_or(Duration::ZERO);
            let expired = by_clock_left.is_zero() || unchanged_for >= duration;
            if !expired {
                let by_observation_left = duration.saturating_sub(unchanged_for);
                let retry_in = by_clock_left
                    .min(by_observation_left)
                    .min(self.config.renew_period)
                    .max(Duration::from_millis(100));
                return Ok(LeaseOutcome::HeldByOther { holder, retry_in });
            }
        }
        // Free or expired: take over, guarded by the resourceVersion we read.
        let mut next = lease.clone();
        next.metadata.resource_version = Some(rv);
        next.spec = Some(self.spec(now, None, transitions + 1));
        let r = self
            .timed(self.api.replace(&name, &PostParams::default(), &next))
            .await?;
        self.write_result(r, LeaseOutcome::Acquired)
    }

    /// Give the Lease up on a clean shutdown so a standby takes over at once. Only clears it
    /// while we still hold it (guarded by `resourceVersion`).
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        let name = self.config.lease_name.clone();
        let current = self.get(&name).await?;
        let Some(mut lease) = current else {
            return Ok(());
        };
        let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
            == Some(self.config.identity.as_str());
        if !ours {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        let r = self
            .timed(self.api.replace(&name, &PostParams::default(), &lease))
            .await?;
        self.write_result(r, LeaseOutcome::Renewed).map(|_| ())
    }
}
