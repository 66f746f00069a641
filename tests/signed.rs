//! Signed commits and tags (`FlakeSource.spec.verify`) with real signing: keys made by `gpg`
//! and `ssh-keygen`, commits and tags signed by `git` itself, served by `git daemon` on
//! 127.0.0.1, checked by the resolver in-process (rPGP, ssh-key). The source follows only the
//! good ones. See docs/source.md, "Signed commits".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::signing::{Sign, Signing, allowed_signer, require_signing_tools};
use nixroll::api::VerifyMode;
use nixroll::source::refspec::{RefChoice, ResolvedRef};
use nixroll::source::resolve::{Credentials, Remote, Resolver, Verification, VerifyFailure};
use nixroll::source::url::SourceUrl;
use nixroll::source::verify::{TrustedKeys, VerifyError};

fn remote(url: &str) -> Remote {
    Remote {
        url: SourceUrl::parse(url, true).unwrap(),
        credentials: Credentials::None,
        known_hosts: None,
        timeout: Duration::from_secs(20),
    }
}

fn keys(pairs: &[(&str, &str)]) -> Arc<TrustedKeys> {
    let data: BTreeMap<String, Vec<u8>> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    Arc::new(TrustedKeys::from_secret_data(&data).unwrap())
}

/// Resolve `choice` on the served repository and verify its head.
async fn check(
    res: &Resolver,
    remote: &Remote,
    choice: &RefChoice,
    mode: VerifyMode,
    keys: &Arc<TrustedKeys>,
) -> (ResolvedRef, Result<Vec<String>, VerifyFailure>) {
    let head = res.resolve(remote, choice).await.unwrap();
    let v = Verification {
        mode,
        keys: keys.clone(),
    };
    let out = res.verify(remote, &head, &v, jiff::Timestamp::now()).await;
    (head, out)
}

fn refused(out: Result<Vec<String>, VerifyFailure>) -> (String, VerifyError) {
    match out {
        Err(VerifyFailure::Refused { what, error }) => (what, error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn commits_signed_with_gpg_and_ssh_keys() {
    if !require_signing_tools() {
        return;
    }
    let mut s = Signing::new();
    let alice = s.gpg_key("Alice <alice@example.org>");
    let mallory = s.gpg_key("Mallory <mallory@example.org>");
    let bob = s.ssh_key("bob");
    let eve = s.ssh_key("eve");
    let old = s.expired_gpg_key("Old <old@example.org>");
    let gone = s.gpg_key("Gone <gone@example.org>");
    let carol = s.ssh_key("carol");
    let dave = s.ssh_key("dave");

    let url = s.serve();
    let remote = remote(&url);
    let res = Resolver::new(s.root().join("cache"), 2);
    let main = RefChoice::Branch("main".into());
    // Trusted: alice (OpenPGP), bob and carol (SSH; carol's entry expired), dave (SSH, revoked),
    // old (expired OpenPGP), gone (revoked after signing).
    let gone_commit = s.commit("by gone", Sign::Gpg(&gone));
    let gone_revoked = s.revoke(&gone);
    let trusted = keys(&[
        ("alice.asc", &alice.public),
        ("old.asc", &old.public),
        ("gone.asc", &gone_revoked),
        (
            "allowed_signers",
            &format!(
                "{}\n# carol left\n{}\n{}\n",
                allowed_signer("bob@example.org", "namespaces=\"git\"", &bob),
                allowed_signer("carol@example.org", "valid-before=20250101", &carol),
                allowed_signer("dave@example.org", "", &dave),
            ),
        ),
        ("revoked_signers", &dave.public),
    ]);
    let head_mode = VerifyMode::Head;

    // Revoked OpenPGP key (the commit was signed before the revocation).
    s.push();
    let (h, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), gone_commit);
    let (what, e) = refused(out);
    assert_eq!(what, format!("commit {gone_commit}"));
    assert!(matches!(e, VerifyError::Revoked(_)), "{e}");
    assert!(e.to_string().contains(&gone.fingerprint), "{e}");

    // Good: signed by alice with gpg.
    let a = s.commit("a", Sign::Gpg(&alice));
    s.push();
    let (h, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), a);
    let signers = out.unwrap();
    assert_eq!(signers.len(), 1);
    assert!(
        signers[0].contains(&alice.fingerprint) && signers[0].contains("alice@example.org"),
        "{signers:?}"
    );

    // Good: signed by bob with an SSH key (gpg.format=ssh).
    let b = s.commit("b", Sign::Ssh(&bob));
    s.push();
    let (h, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), b);
    let signers = out.unwrap();
    assert!(
        signers[0].contains("SSH key SHA256:") && signers[0].contains("bob@example.org"),
        "{signers:?}"
    );

    // Unsigned.
    let c = s.commit("c", Sign::No);
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (what, e) = refused(out);
    assert_eq!((what, e), (format!("commit {c}"), VerifyError::Unsigned));

    // Unknown signers: a gpg key and an SSH key that are not trusted.
    s.commit("d", Sign::Gpg(&mallory));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::UnknownSigner(_)), "{e}");
    assert!(e.to_string().contains(&mallory.fingerprint), "names the key: {e}");
    s.commit("e", Sign::Ssh(&eve));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::UnknownSigner(_)), "{e}");

    // Wrongly signed: a trusted key's signature over other content (gpg and SSH).
    let f = s.forged_commit("f", Sign::Gpg(&alice));
    s.push();
    let (h, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), f);
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");
    s.forged_commit("g", Sign::Ssh(&bob));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");

    // Expired: an OpenPGP key past its expiry, an SSH signer past valid-before.
    s.commit("h", Sign::Gpg(&old));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::Expired { .. }), "{e}");
    s.commit("i", Sign::Ssh(&carol));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::Expired { .. }), "{e}");
    // Revoked SSH signer (listed in revoked_signers).
    s.commit("j", Sign::Ssh(&dave));
    s.push();
    let (_, out) = check(&res, &remote, &main, head_mode, &trusted).await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::Revoked(_)), "{e}");

    // The same commit with the signer trusted (rotation: the key added to the Secret).
    s.commit("k", Sign::Gpg(&mallory));
    s.push();
    let rotated = keys(&[("alice.asc", &alice.public), ("mallory.asc", &mallory.public)]);
    let (_, out) = check(&res, &remote, &main, head_mode, &rotated).await;
    assert!(out.unwrap()[0].contains(&mallory.fingerprint));
}

#[tokio::test]
async fn tags_signed_lightweight_and_unsigned() {
    if !require_signing_tools() {
        return;
    }
    let mut s = Signing::new();
    let alice = s.gpg_key("Alice <alice@example.org>");
    let bob = s.ssh_key("bob");
    let trusted = keys(&[
        ("alice.asc", &alice.public),
        ("allowed_signers", &allowed_signer("bob@example.org", "", &bob)),
    ]);
    let url = s.serve();
    let remote = remote(&url);
    let res = Resolver::new(s.root().join("cache"), 2);
    let tag = |t: &str| RefChoice::Tag(t.to_owned());

    // v1: an unsigned commit under a gpg-signed tag.
    let c1 = s.commit("one", Sign::No);
    s.tag("v1", true, Sign::Gpg(&alice));
    // v2: an SSH-signed commit under an SSH-signed tag.
    let c2 = s.commit("two", Sign::Ssh(&bob));
    s.tag("v2", true, Sign::Ssh(&bob));
    // v3: annotated, unsigned; v4: lightweight.
    s.commit("three", Sign::Gpg(&alice));
    s.tag("v3", true, Sign::No);
    s.tag("v4", false, Sign::No);
    s.push();

    let (h, out) = check(&res, &remote, &tag("v1"), VerifyMode::Tag, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), c1, "the tag is peeled to its commit");
    let signers = out.unwrap();
    assert!(
        signers[0].starts_with("tag v1 (of commit") && signers[0].contains(&alice.fingerprint),
        "{signers:?}"
    );
    // TagAndHEAD also needs the commit signed: v1's is not.
    let (_, out) = check(&res, &remote, &tag("v1"), VerifyMode::TagAndHead, &trusted).await;
    assert_eq!(refused(out), (format!("commit {c1}"), VerifyError::Unsigned));

    let (h, out) = check(&res, &remote, &tag("v2"), VerifyMode::TagAndHead, &trusted).await;
    assert_eq!(h.revision.commit.as_str(), c2);
    assert_eq!(out.unwrap().len(), 2, "tag and commit");

    let (_, out) = check(&res, &remote, &tag("v3"), VerifyMode::Tag, &trusted).await;
    let (what, e) = refused(out);
    assert!(what.starts_with("tag v3"), "{what}");
    assert_eq!(e, VerifyError::Unsigned);
    let (_, out) = check(&res, &remote, &tag("v4"), VerifyMode::Tag, &trusted).await;
    let (_, e) = refused(out);
    assert!(
        matches!(&e, VerifyError::NotATag(m) if m.contains("lightweight")),
        "{e}"
    );
    // HEAD mode on a tag ref checks the commit only: v3's commit is signed by alice.
    let (_, out) = check(&res, &remote, &tag("v3"), VerifyMode::Head, &trusted).await;
    assert!(out.unwrap()[0].starts_with("commit "));
    // Tag mode on a branch: refused before any fetch.
    let (_, out) = check(
        &res,
        &remote,
        &RefChoice::Branch("main".into()),
        VerifyMode::Tag,
        &trusted,
    )
    .await;
    let (_, e) = refused(out);
    assert!(matches!(e, VerifyError::NotATag(_)), "{e}");
}

// ---- End to end: a FlakeSource with `verify` on the embedded API, the real controller and
// agents. Commits signed in-process with an SSH key (`CommitSigner`, as the demo does).

mod e2e {
    use super::*;
    use crate::common::following::{
        commit_of, condition as cond, follow_config, follow_source, runs, simulated, source_spec,
        wait_all_on, wait_nodes, wait_source,
    };
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    use nixroll::api::Phase;
    use nixroll::sim::flake::CommitSigner;
    use nixroll::sim::world::World;
    use serde_json::json;

    const NODES: usize = 3;

    async fn events(world: &World) -> Vec<(String, String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(world.client.clone(), "nixroll-system");
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.name.as_deref() == Some("infra"))
            })
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Signed commits roll out; an unsigned one and one signed by an unknown key change
    /// nothing downstream (the source keeps its revision, `Ready=False` with reason
    /// `VerificationFailed` naming the commit, a Warning Event, no node disrupted).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_follow_only_signed_commits() {
        let mut world = World::start(simulated(NODES)).await.unwrap();
        let (repo, branch) = world.follow_in_git().unwrap();
        world.publish_flake(&format!("git+file://{}?ref=refs/heads/{branch}", repo.display()));
        let team = CommitSigner::generate().unwrap();
        let stranger = CommitSigner::generate().unwrap();
        world.sign_commits(Some(team.clone()));
        let head0 = world.commit("signed docs", |_| {}).unwrap();

        let secrets: Api<Secret> = Api::namespaced(world.client.clone(), "nixroll-system");
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "trusted-keys", "namespace": "nixroll-system"},
            "stringData": {"allowed_signers": format!("{}\n", team.allowed_signer())}
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &secret).await.unwrap();
        let verify = json!({"verify": {"mode": "HEAD", "secretRef": {"name": "trusted-keys"}}});
        let sources = follow_source(&world, source_spec(&repo, &branch, "1s", verify)).await;
        let cache = tempfile::tempdir().unwrap();
        let c = world
            .start_controller(follow_config("signed", cache.path()))
            .await
            .unwrap();

        let fs = wait_source(&sources, "the signed head", |fs| {
            commit_of(fs) == Some(head0.as_str())
        })
        .await;
        let (status, reason, message) = cond(&fs, "SourceVerified").unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Succeeded"));
        assert!(
            message.contains(&head0) && message.contains("demo@nixroll.invalid"),
            "{message}"
        );
        wait_all_on(&world, "adoption", &head0).await;
        let boots: Vec<String> = world.nodes.iter().map(|n| n.host.boot_id()).collect();

        // An unsigned commit (a new kernel) and then one signed by an unknown key: refused.
        world.sign_commits(None);
        let unsigned = world
            .commit("unsigned kernel", |s| {
                s.kernel.push_str("-evil");
                s.kernel_modules.push_str("-evil");
            })
            .unwrap();
        let fs = wait_source(&sources, "the unsigned head refused", |fs| {
            cond(fs, "Ready").is_some_and(|c| c.1 == "VerificationFailed" && c.2.contains(&unsigned))
        })
        .await;
        let st = fs.status.clone().unwrap();
        assert_eq!(st.commit.as_deref(), Some(head0.as_str()), "the revision stays");
        assert!(st.refused_revision.unwrap().contains(&unsigned));
        let (_, _, m) = cond(&fs, "Ready").unwrap();
        assert!(
            m.contains("is not signed")
                && m.contains(&format!("the last revision {branch}@sha1:{head0} stays")),
            "{m}"
        );
        assert_eq!(cond(&fs, "SourceVerified").unwrap().0, "False");

        world.sign_commits(Some(stranger.clone()));
        let foreign = world.commit("foreign service", |s| s.service.push('!')).unwrap();
        let fs = wait_source(&sources, "the stranger's head refused", |fs| {
            cond(fs, "Ready").is_some_and(|c| c.2.contains(&foreign))
        })
        .await;
        let (_, reason, m) = cond(&fs, "Ready").unwrap();
        assert_eq!(reason, "VerificationFailed");
        assert!(m.contains("not among the trusted keys"), "{m}");
        assert_eq!(commit_of(&fs), Some(head0.as_str()));
        let ev = events(&world).await;
        assert!(
            ev.iter()
                .any(|(r, t, n)| r == "VerificationFailed" && t == "Warning" && n.contains(&unsigned)),
            "{ev:?}"
        );
        // Nothing rolled: every node still runs head0, never disrupted, never rebooted.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for o in world.nixosnodes().await.unwrap().values() {
            let s = o.status.clone().unwrap_or_default();
            assert_eq!(s.revision.as_deref(), Some(head0.as_str()));
            assert!(!s.phase.is_some_and(Phase::is_disruptive), "{s:?}");
            assert!(
                s.target.as_ref().is_none_or(|t| t.revision == head0),
                "{:?}",
                s.target
            );
        }
        let now: Vec<String> = world.nodes.iter().map(|n| n.host.boot_id()).collect();
        assert_eq!(now, boots);

        // The team signs again: the new head (descending from the refused ones) rolls out.
        world.sign_commits(Some(team));
        let good = world
            .commit("signed kernel", |s| s.kernel.push_str("-good"))
            .unwrap();
        wait_nodes(
            &world,
            "the signed commit everywhere",
            |m| m.values().all(|o| runs(o, &good)),
            |m| {
                for o in m.values() {
                    let s = o.status.clone().unwrap_or_default();
                    for bad in [&unsigned, &foreign] {
                        assert!(s.target.as_ref().is_none_or(|t| &t.revision != bad), "{s:?}");
                    }
                }
            },
        )
        .await;
        c.stop().await;
    }
}
