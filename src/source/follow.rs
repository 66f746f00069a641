//! PURE: which revision a NixOSNode that follows a source targets. No kube client, no clock.
//!
//! * A source *offers* a commit (and, for a FlakeSource, the flake to build it from) only when
//!   its status can be trusted: a FlakeSource whose status describes the current generation; a
//!   Flux GitRepository that is `Ready=True` at the current generation.
//! * The nodes that follow one source form a *group*. The group's **pin** is the commit its
//!   rollout started with. It moves to the source's newest offer only when every member of the
//!   group runs the pinned commit, is Degraded or is suspended, or when the group's rollout is
//!   halted (as many Degraded members as the failure threshold). So a branch that moves while a
//!   rollout is in flight never mixes the fleet: the next commit starts after this one is done.
//! * The pin lives in the controller's memory; after a restart it is recovered from the
//!   members' `status.target` (the commit they are working on), so a restart never starts a
//!   newer commit in the middle of a rollout.

use std::collections::HashMap;

use crate::api::{FlakeSource, NixOSNode, NixOSNodeSpec, Phase, SourceKind, SourceRef};
use crate::source::revision::{CommitId, Revision};
use crate::source::url::{Scheme, SourceUrl};

/// One source, as NixOSNodes name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
}

impl From<&SourceRef> for SourceKey {
    fn from(r: &SourceRef) -> Self {
        SourceKey {
            kind: r.kind,
            namespace: r.namespace().to_owned(),
            name: r.name.clone(),
        }
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A commit a source offers, and the flake to build it from (empty: the node's `spec.flake`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub commit: String,
    pub flake: String,
    /// The full git ref the commit was found on (`refs/heads/dev`, `refs/tags/v1`, `HEAD`):
    /// added as `?ref=` to a git `spec.flake`, because Nix fetches a commit through a ref and,
    /// without one, Nix 2.8 fetches `refs/heads/master` and fails on any other branch.
    pub git_ref: Option<String>,
}

/// Why a source offers nothing (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("the source does not exist (or its watch has not listed it yet)")]
    Missing,
    #[error("the source has no resolved revision yet")]
    NotResolved,
    #[error("the source's status describes generation {observed:?}, not the current {generation:?}")]
    StaleGeneration {
        observed: Option<i64>,
        generation: Option<i64>,
    },
    #[error("the source is not Ready: {0}")]
    NotReady(String),
    #[error("the source's revision cannot be used: {0}")]
    BadRevision(String),
    #[error("the source's URL cannot be turned into a flake: {0}")]
    BadUrl(String),
    #[error(
        "the source requires signed revisions (spec.verify) and Flux does not report this one verified: {0}"
    )]
    NotVerified(String),
}

/// The flake of a FlakeSource URL: `git+<url>?ref=<full ref>` (`git://` URLs stay as they are,
/// which is Nix's plain git scheme). The `ref` lets Nix fetch a commit that is not on the
/// default branch.
pub fn flake_for(url: &str, insecure: bool, full_ref: Option<&str>) -> Result<String, Untrusted> {
    let u = SourceUrl::parse(url, insecure).map_err(|e| Untrusted::BadUrl(e.to_string()))?;
    let mut flake = match u.scheme() {
        Scheme::Git => u.as_git_url(),
        _ => format!("git+{}", u.as_git_url()),
    };
    if let Some(r) = full_ref {
        flake.push_str("?ref=");
        flake.push_str(&query_value(r));
    }
    Ok(flake)
}

/// A ref as a flake URL's query value: characters that would end it or change its meaning
/// (`&`, `#`, `%`, `?`, space, `+` …) percent-encoded; Nix decodes them.
fn query_value(r: &str) -> String {
    let mut out = String::with_capacity(r.len());
    for b in r.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `spec.flake` with the source's ref, when it is a git flake (`git+…`, `git://…`) without a
/// query of its own (the CRD refuses `?` in it): the form Nix fetches the commit through.
/// Other schemes (`github:`, `path:` …) address the commit without a ref and stay as they are.
pub fn with_ref(flake: &str, git_ref: Option<&str>) -> String {
    match git_ref {
        Some(r) if (flake.starts_with("git+") || flake.starts_with("git://")) && !flake.contains('?') => {
            format!("{flake}?ref={}", query_value(r))
        }
        _ => flake.to_owned(),
    }
}

/// The ref Nix must fetch a Flux GitRepository's commit through, from its `spec.ref` the way
/// Flux's source-controller chooses (`commit` > `name` > `semver` > `tag` > `branch`):
/// `branch` gives `refs/heads/B`; `tag` gives `refs/tags/T`; `semver` gives `refs/tags/` and
/// the tag Flux resolved (the revision's pointer, `v1.2.3@sha1:…`); `name` is used as given (a
/// full ref such as `refs/pull/7/head`); `commit` gives the `branch` set with it, else `HEAD`
/// (the remote's default branch: a commit that is only on another branch then fails to stage,
/// Nix saying it cannot find the revision in ref HEAD); no `spec.ref` gives
/// `refs/heads/master`, Flux's default.
pub fn gitrepository_ref(spec_ref: &serde_json::Value, pointer: Option<&str>) -> Result<String, Untrusted> {
    let field = |k: &str| spec_ref[k].as_str().filter(|v| !v.is_empty());
    let branch = field("branch").map(|b| format!("refs/heads/{b}"));
    if field("commit").is_some() {
        return Ok(branch.unwrap_or_else(|| "HEAD".into()));
    }
    if let Some(n) = field("name") {
        return Ok(n.to_owned());
    }
    if field("semver").is_some() {
        return match pointer {
            Some(tag) => Ok(format!("refs/tags/{tag}")),
            None => Err(Untrusted::BadRevision(
                "spec.ref.semver is set but the artifact revision names no tag".into(),
            )),
        };
    }
    if let Some(t) = field("tag") {
        return Ok(format!("refs/tags/{t}"));
    }
    Ok(branch.unwrap_or_else(|| "refs/heads/master".into()))
}

/// What a FlakeSource offers: its accepted commit, trusted when its status describes the current
/// generation. A failed fetch keeps the last accepted commit (and `Ready=False`): that commit is
/// still offered, so nothing changes downstream.
pub fn flakesource_offer(fs: &FlakeSource) -> Result<Offer, Untrusted> {
    let st = fs.status.as_ref().ok_or(Untrusted::NotResolved)?;
    if st.observed_generation != fs.metadata.generation {
        return Err(Untrusted::StaleGeneration {
            observed: st.observed_generation,
            generation: fs.metadata.generation,
        });
    }
    let commit = st.commit.as_deref().ok_or(Untrusted::NotResolved)?;
    let commit = CommitId::parse(commit).map_err(|e| Untrusted::BadRevision(e.to_string()))?;
    let flake = flake_for(&fs.spec.url, fs.spec.insecure, st.full_ref.as_deref())?;
    Ok(Offer {
        commit: commit.to_string(),
        flake,
        git_ref: st.full_ref.clone(),
    })
}

/// What a Flux GitRepository (source.toolkit.fluxcd.io/v1, as JSON) offers:
/// `status.artifact.revision` in any form Flux has written, trusted only when `Ready=True` and
/// `status.observedGeneration == metadata.generation`. `sha256:` is refused.
pub fn gitrepository_offer(obj: &serde_json::Value) -> Result<Offer, Untrusted> {
    let generation = obj["metadata"]["generation"].as_i64();
    let st = &obj["status"];
    let observed = st["observedGeneration"].as_i64();
    let ready = st["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
    match ready {
        Some(c) if c["status"] == "True" => {}
        Some(c) => {
            let reason = c["reason"].as_str().unwrap_or("");
            let message: String = c["message"].as_str().unwrap_or("").chars().take(200).collect();
            return Err(Untrusted::NotReady(format!("{reason}: {message}")));
        }
        None => return Err(Untrusted::NotReady("no Ready condition".into())),
    }
    if observed.is_none() || observed != generation {
        return Err(Untrusted::StaleGeneration { observed, generation });
    }
    let rev = st["artifact"]["revision"]
        .as_str()
        .ok_or(Untrusted::NotResolved)?;
    let r = Revision::parse(rev).map_err(|e| Untrusted::BadRevision(e.to_string()))?;
    if obj["spec"]["verify"].is_object() {
        flux_verified(st, generation, r.commit.as_str())?;
    }
    let git_ref = gitrepository_ref(&obj["spec"]["ref"], r.pointer.as_deref())?;
    Ok(Offer {
        commit: r.commit.to_string(),
        flake: String::new(),
        git_ref: Some(git_ref),
    })
}

/// With `spec.verify` on a GitRepository: Flux's `SourceVerified` condition must be `True`, at
/// the current generation when the condition says which, and when its message names commits
/// (Flux writes `verified signature of - commit 'main@sha1:<sha>'`), one of them must be the
/// artifact's commit: a condition left over from another revision is not trusted.
fn flux_verified(st: &serde_json::Value, generation: Option<i64>, commit: &str) -> Result<(), Untrusted> {
    let c = st["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "SourceVerified"))
        .ok_or_else(|| Untrusted::NotVerified("no SourceVerified condition".into()))?;
    let message = c["message"].as_str().unwrap_or("");
    let short: String = message.chars().take(200).collect();
    if c["status"] != "True" {
        let reason = c["reason"].as_str().unwrap_or("");
        return Err(Untrusted::NotVerified(format!(
            "SourceVerified={}: {reason}: {short}",
            c["status"].as_str().unwrap_or("?")
        )));
    }
    if let Some(g) = c["observedGeneration"].as_i64()
        && Some(g) != generation
    {
        return Err(Untrusted::NotVerified(format!(
            "SourceVerified describes generation {g}, not {generation:?}"
        )));
    }
    let named = hex_runs(message);
    if !named.is_empty() && !named.contains(&commit) {
        return Err(Untrusted::NotVerified(format!(
            "SourceVerified names another commit than the artifact's {commit}: {short}"
        )));
    }
    Ok(())
}

/// The 40-hex runs in `s` (commit ids).
fn hex_runs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices().chain(std::iter::once((s.len(), ' '))) {
        let hex = c.is_ascii_digit() || ('a'..='f').contains(&c);
        match (hex, start) {
            (true, None) => start = Some(i),
            (false, Some(b)) => {
                if i - b == 40 {
                    out.push(&s[b..i]);
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// What the pin needs to know of one member of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member<'a> {
    /// `status.target.revision`: the commit the node is working on.
    pub target: Option<&'a str>,
    /// `status.revision`: the commit the node is proven to run.
    pub running: Option<&'a str>,
    pub degraded: bool,
    pub suspended: bool,
}

impl<'a> Member<'a> {
    pub fn of(o: &'a NixOSNode) -> Self {
        let st = o.status.as_ref();
        Member {
            target: st.and_then(|s| s.target.as_ref()).map(|t| t.revision.as_str()),
            running: st.and_then(|s| s.revision.as_deref()),
            degraded: st.and_then(|s| s.phase) == Some(Phase::Degraded),
            suspended: o.spec.suspend,
        }
    }

    /// Still working towards `commit`: neither runs it, nor failed, nor is held by the user.
    fn busy_with(&self, commit: &str) -> bool {
        !self.suspended && !self.degraded && self.running != Some(commit)
    }
}

/// The commit the members are working on, recovered from their statuses (after a restart): the
/// most common `target` of members that do not run it yet (ties: the greatest, so every replica
/// computes the same).
pub fn in_flight(members: &[Member<'_>]) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in members {
        if let Some(t) = m.target
            && m.busy_with(t)
        {
            *counts.entry(t).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)))
        .map(|(c, _)| c.to_owned())
}

/// The group's pin after this look. `held`: the pin so far (None after a restart: recovered
/// from the members); `latest`: the source's offer now (None while it offers nothing
/// trustworthy: the pin stays).
pub fn pin(
    held: Option<&Offer>,
    latest: Option<&Offer>,
    members: &[Member<'_>],
    failure_threshold: u32,
) -> Option<Offer> {
    let held = held.cloned().or_else(|| {
        in_flight(members).map(|commit| {
            let same = latest.filter(|l| l.commit == commit);
            Offer {
                flake: same.map(|l| l.flake.clone()).unwrap_or_default(),
                git_ref: same.and_then(|l| l.git_ref.clone()),
                commit,
            }
        })
    });
    let Some(p) = held else {
        return latest.cloned();
    };
    let degraded = members.iter().filter(|m| m.degraded).count();
    let halted = degraded >= failure_threshold.max(1) as usize;
    let busy = members.iter().any(|m| m.busy_with(&p.commit));
    if busy && !halted {
        return Some(p);
    }
    match latest {
        Some(l) => Some(l.clone()),
        None => Some(p),
    }
}

/// The flake part of an installable built by [`crate::api::installable`] for `revision`.
pub fn flake_of_installable(installable: &str, revision: &str) -> Option<String> {
    for sep in [
        format!("?rev={revision}#"),
        format!("&rev={revision}#"),
        format!("/{revision}#"),
    ] {
        if let Some(i) = installable.find(&sep) {
            return Some(installable[..i].to_owned());
        }
    }
    None
}

/// The spec the rollout works with for a node that follows a source: `revision` (and `flake`,
/// when omitted) filled in from the group's pin. A node already working on the pinned commit
/// keeps the very installable it stages, so nothing restages. Without a pin the node keeps
/// what it works on or runs. `None`: nothing to target yet (the source never offered a commit
/// and the node runs nothing nixroll knows of).
pub fn effective_spec(o: &NixOSNode, pin: Option<&Offer>) -> Option<NixOSNodeSpec> {
    let st = o.status.as_ref();
    let target = st.and_then(|s| s.target.as_ref());
    let commit = pin
        .map(|p| p.commit.clone())
        .or_else(|| target.map(|t| t.revision.clone()))
        .or_else(|| st.and_then(|s| s.revision.clone()))?;
    let from_target = target
        .filter(|t| t.revision == commit)
        .and_then(|t| flake_of_installable(&t.installable, &commit));
    let flake = match from_target {
        Some(f) => f,
        // The user's flake, with the ref the source found the commit on.
        None if !o.spec.flake.is_empty() => with_ref(
            &o.spec.flake,
            pin.filter(|p| p.commit == commit)
                .and_then(|p| p.git_ref.as_deref()),
        ),
        None => match pin.filter(|p| p.commit == commit && !p.flake.is_empty()) {
            Some(p) => p.flake.clone(),
            // Runs `commit` and has nothing to stage: the flake is not needed.
            None if st.and_then(|s| s.revision.as_deref()) == Some(commit.as_str()) => String::new(),
            None => return None,
        },
    };
    let mut spec = o.spec.clone();
    spec.revision = commit;
    spec.flake = flake;
    Some(spec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::api::{FlakeSourceStatus, NixOSNodeStatus, Target};

    fn sha(c: char) -> String {
        std::iter::repeat_n(c, 40).collect()
    }

    fn offer(c: char) -> Offer {
        Offer {
            git_ref: Some("refs/heads/main".into()),
            commit: sha(c),
            flake: "git+https://h/r?ref=refs/heads/main".into(),
        }
    }

    fn runs(c: &str) -> Member<'_> {
        Member {
            running: Some(c),
            ..Member::default()
        }
    }

    #[test]
    fn flakes_from_urls() {
        assert_eq!(
            flake_for(
                "https://git.example.org/infra.git",
                false,
                Some("refs/heads/main")
            )
            .unwrap(),
            "git+https://git.example.org/infra.git?ref=refs/heads/main"
        );
        assert_eq!(
            flake_for("ssh://git@h:2222/r", false, Some("refs/tags/v1")).unwrap(),
            "git+ssh://git@h:2222/r?ref=refs/tags/v1"
        );
        assert_eq!(
            flake_for("file:///srv/r.git", true, Some("refs/heads/main")).unwrap(),
            "git+file:///srv/r.git?ref=refs/heads/main"
        );
        assert_eq!(flake_for("git://h/r", true, None).unwrap(), "git://h/r");
        assert!(flake_for("http://h/r", false, None).is_err());
    }

    #[test]
    fn flake_of_installable_inverts_installable() {
        let c = sha('a');
        for flake in [
            "git+https://h/r?ref=refs/heads/main",
            "git+file:///x",
            "github:me/infra",
            "path:/p",
        ] {
            let i = crate::api::installable(flake, &c, "n1");
            assert_eq!(flake_of_installable(&i, &c).as_deref(), Some(flake), "{i}");
        }
        assert_eq!(flake_of_installable("git+file:///x?rev=zz#a", &c), None);
    }

    #[test]
    fn pin_starts_at_the_latest_and_holds_while_a_member_is_busy() {
        let (a, b, c) = (sha('a'), sha('b'), sha('c'));
        // Nothing held, nothing in flight: the latest.
        assert_eq!(
            pin(None, Some(&offer('b')), &[runs(&a), runs(&a)], 1),
            Some(offer('b'))
        );
        // b is pinned; one node runs b, one not yet: c waits.
        let members = [runs(&b), runs(&a)];
        assert_eq!(
            pin(Some(&offer('b')), Some(&offer('c')), &members, 1),
            Some(offer('b'))
        );
        // Every member runs b: c starts.
        assert_eq!(
            pin(Some(&offer('b')), Some(&offer('c')), &[runs(&b), runs(&b)], 1),
            Some(offer('c'))
        );
        // A suspended member does not hold the group.
        let held = Member {
            suspended: true,
            ..runs(&a)
        };
        assert_eq!(
            pin(Some(&offer('b')), Some(&offer('c')), &[runs(&b), held], 1),
            Some(offer('c'))
        );
        // The source offers nothing: the pin stays.
        assert_eq!(pin(Some(&offer('b')), None, &[runs(&b)], 1), Some(offer('b')));
        assert_eq!(pin(None, None, &[runs(&b)], 1), None);
        let _ = c;
    }

    #[test]
    fn a_halted_rollout_releases_the_pin() {
        let (a, b) = (sha('a'), sha('b'));
        let failed = Member {
            target: Some(&b),
            running: Some(&a),
            degraded: true,
            suspended: false,
        };
        let waiting = Member {
            target: Some(&b),
            running: Some(&a),
            ..Member::default()
        };
        // Threshold 1: one Degraded member halts the rollout; the fix (c) starts.
        assert_eq!(
            pin(
                Some(&offer('b')),
                Some(&offer('c')),
                &[failed.clone(), waiting.clone()],
                1
            ),
            Some(offer('c'))
        );
        // Threshold 2: the rollout goes on with b.
        assert_eq!(
            pin(Some(&offer('b')), Some(&offer('c')), &[failed, waiting], 2),
            Some(offer('b'))
        );
    }

    #[test]
    fn after_a_restart_the_pin_is_recovered_from_the_targets() {
        let (a, b) = (sha('a'), sha('b'));
        let working = Member {
            target: Some(&b),
            running: Some(&a),
            ..Member::default()
        };
        let members = [working.clone(), working, runs(&a)];
        let got = pin(None, Some(&offer('c')), &members, 1).unwrap();
        assert_eq!(got.commit, b, "the rollout in flight goes on");
        assert_eq!(in_flight(&[runs(&a)]), None);
    }

    fn node(spec_flake: &str, status: Option<NixOSNodeStatus>) -> NixOSNode {
        let mut o = NixOSNode::new("n1", crate::sim::fixtures::following_spec(spec_flake, "infra"));
        o.status = status;
        o
    }

    #[test]
    fn effective_spec_fills_revision_and_flake() {
        let p = offer('b');
        let s = effective_spec(&node("", None), Some(&p)).unwrap();
        assert_eq!(
            (s.revision.as_str(), s.flake.as_str()),
            (p.commit.as_str(), p.flake.as_str())
        );
        // The user's flake wins over the derived one.
        let s = effective_spec(&node("github:me/infra", None), Some(&p)).unwrap();
        assert_eq!(s.flake, "github:me/infra");
        // A git flake of the user's gets the ref the source found the commit on.
        let s = effective_spec(&node("git+https://h/r", None), Some(&p)).unwrap();
        assert_eq!(s.flake, "git+https://h/r?ref=refs/heads/main");
        let s = effective_spec(&node("git://h/r", None), Some(&p)).unwrap();
        assert_eq!(s.flake, "git://h/r?ref=refs/heads/main");
        let s = effective_spec(&node("path:/srv/r", None), Some(&p)).unwrap();
        assert_eq!(s.flake, "path:/srv/r");
        // Nothing offered and nothing run: nothing to target.
        assert_eq!(effective_spec(&node("", None), None), None);
        // A node staging the pinned commit keeps its installable (no restage when the ref moved).
        let old_flake = "git+https://h/r?ref=refs/tags/v1";
        let st = NixOSNodeStatus {
            target: Some(Target {
                revision: p.commit.clone(),
                installable: crate::api::installable(old_flake, &p.commit, "n1"),
                system: None,
                build: None,
            }),
            ..NixOSNodeStatus::default()
        };
        let s = effective_spec(&node("", Some(st)), Some(&p)).unwrap();
        assert_eq!(s.flake, old_flake);
        // Without an offer, a node keeps what it runs.
        let st = NixOSNodeStatus {
            revision: Some(sha('a')),
            ..NixOSNodeStatus::default()
        };
        let s = effective_spec(&node("", Some(st)), None).unwrap();
        assert_eq!(s.revision, sha('a'));
    }

    fn flakesource(status: Option<FlakeSourceStatus>, generation: i64) -> FlakeSource {
        let mut fs = FlakeSource::new(
            "infra",
            crate::sim::fixtures::flake_source_spec("https://git.example.org/infra.git", "main"),
        );
        fs.metadata.generation = Some(generation);
        fs.status = status;
        fs
    }

    #[test]
    fn flakesource_offers_its_commit_at_the_current_generation() {
        assert_eq!(
            flakesource_offer(&flakesource(None, 1)),
            Err(Untrusted::NotResolved)
        );
        let st = FlakeSourceStatus {
            observed_generation: Some(1),
            full_ref: Some("refs/heads/main".into()),
            revision: Some(format!("main@sha1:{}", sha('a'))),
            commit: Some(sha('a')),
            ..FlakeSourceStatus::default()
        };
        let o = flakesource_offer(&flakesource(Some(st.clone()), 1)).unwrap();
        assert_eq!(o.commit, sha('a'));
        assert_eq!(
            o.flake,
            "git+https://git.example.org/infra.git?ref=refs/heads/main"
        );
        assert!(matches!(
            flakesource_offer(&flakesource(Some(st), 2)),
            Err(Untrusted::StaleGeneration { .. })
        ));
    }

    fn gitrepo(ready: &str, generation: i64, observed: i64, revision: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "infra", "namespace": "flux-system", "generation": generation},
            "status": {
                "observedGeneration": observed,
                "conditions": [{"type": "Ready", "status": ready, "reason": "Succeeded", "message": "m"}],
                "artifact": {"revision": revision}
            }
        })
    }

    #[test]
    fn a_gitrepository_offers_the_ref_flux_fetched() {
        let a = sha('a');
        let with = |r: serde_json::Value, revision: &str| {
            let mut o = gitrepo("True", 3, 3, revision);
            o["spec"] = serde_json::json!({"url": "https://h/r", "ref": r});
            gitrepository_offer(&o).map(|o| o.git_ref.unwrap_or_default())
        };
        let rev = format!("dev@sha1:{a}");
        let cases = [
            (serde_json::json!({"branch": "dev"}), "refs/heads/dev"),
            (
                serde_json::json!({"branch": "feature/x y"}),
                "refs/heads/feature/x y",
            ),
            (serde_json::json!({"tag": "v1.0"}), "refs/tags/v1.0"),
            (
                serde_json::json!({"name": "refs/pull/7/head"}),
                "refs/pull/7/head",
            ),
            (
                serde_json::json!({"commit": a, "branch": "dev"}),
                "refs/heads/dev",
            ),
            (serde_json::json!({"commit": a}), "HEAD"),
            // Flux's precedence: commit > name > semver > tag > branch.
            (
                serde_json::json!({"tag": "v1.0", "branch": "dev"}),
                "refs/tags/v1.0",
            ),
            (serde_json::Value::Null, "refs/heads/master"),
        ];
        for (r, want) in cases {
            assert_eq!(with(r.clone(), &rev).as_deref(), Ok(want), "{r}");
        }
        assert_eq!(
            with(
                serde_json::json!({"semver": ">=1.0"}),
                &format!("v1.2.3@sha1:{a}")
            )
            .as_deref(),
            Ok("refs/tags/v1.2.3")
        );
        assert!(matches!(
            with(serde_json::json!({"semver": ">=1.0"}), &a),
            Err(Untrusted::BadRevision(_))
        ));
        // Odd characters are percent-encoded in the flake URL, which Nix decodes.
        assert_eq!(
            with_ref("git+https://h/r", Some("refs/heads/a&b#c d")),
            "git+https://h/r?ref=refs/heads/a%26b%23c%20d"
        );
    }

    #[test]
    fn gitrepository_is_trusted_only_when_ready_at_its_generation() {
        let a = sha('a');
        for form in [
            format!("main@sha1:{a}"),
            format!("sha1:{a}"),
            format!("main/{a}"),
            a.clone(),
        ] {
            assert_eq!(
                gitrepository_offer(&gitrepo("True", 3, 3, &form)).unwrap().commit,
                a,
                "{form}"
            );
        }
        assert!(matches!(
            gitrepository_offer(&gitrepo("False", 3, 3, &a)),
            Err(Untrusted::NotReady(_))
        ));
        assert!(matches!(
            gitrepository_offer(&gitrepo("True", 4, 3, &a)),
            Err(Untrusted::StaleGeneration { .. })
        ));
        let d = "b".repeat(64);
        assert!(matches!(
            gitrepository_offer(&gitrepo("True", 3, 3, &format!("main@sha256:{d}"))),
            Err(Untrusted::BadRevision(_))
        ));
    }

    #[test]
    fn a_verifying_gitrepository_is_trusted_only_when_flux_verified_that_revision() {
        let (a, b) = (sha('a'), sha('b'));
        let with = |verified: Option<(&str, &str, Option<i64>)>| {
            let mut o = gitrepo("True", 3, 3, &format!("main@sha1:{a}"));
            o["spec"] = serde_json::json!({"ref": {"branch": "main"}, "verify": {"mode": "HEAD", "secretRef": {"name": "k"}}});
            if let Some((status, message, generation)) = verified {
                let mut c = serde_json::json!({"type": "SourceVerified", "status": status, "reason": "Succeeded", "message": message});
                if let Some(g) = generation {
                    c["observedGeneration"] = g.into();
                }
                o["status"]["conditions"].as_array_mut().unwrap().push(c);
            }
            gitrepository_offer(&o)
        };
        // Flux's own message form.
        let ok = format!("verified signature of\n\t- commit 'main@sha1:{a}'");
        assert_eq!(with(Some(("True", &ok, Some(3)))).unwrap().commit, a);
        assert_eq!(with(Some(("True", "verified", None))).unwrap().commit, a);
        for bad in [
            None,
            Some(("False", "signature verification of commit failed", Some(3))),
            Some(("True", ok.as_str(), Some(2))),
            Some((
                "True",
                &format!("verified signature of commit 'main@sha1:{b}'") as &str,
                Some(3),
            )),
        ] {
            assert!(matches!(with(bad), Err(Untrusted::NotVerified(_))), "{bad:?}");
        }
        // Without spec.verify, SourceVerified is not needed.
        assert_eq!(gitrepository_offer(&gitrepo("True", 3, 3, &a)).unwrap().commit, a);
    }
}
