//! Build once, fetch everywhere, with REAL Nix: a builder host and node hosts with separate
//! chroot stores (store paths `/nix/store/…` as on real machines, each store in its own
//! directory), a binary cache served over HTTP on loopback, and the agent realising the built
//! system by store path with signatures required. Skips when `nix` is not installed (fails
//! under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixroll::agent::host::{Host, resolve};
use nixroll::agent::node::{HostOptions, NodeAgent};
use nixroll::api::{AgentStatus, HostOperation, Target, TargetBuild};
use nixroll::nix::{Nix, NixCli, Substitution};
use nixroll::sim::flake::TestFlake;
use nixroll::sim::host::SimHost;

/// A host that counts the evaluations run on it: `nix build` calls naming an installable that
/// is not a store path (a store path is realised or fetched, never evaluated).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Host>,
    evaluations: std::sync::atomic::AtomicUsize,
}

impl Counting {
    fn evaluations(&self) -> usize {
        self.evaluations.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Host for Counting {
    fn fs_path(&self, p: &Path) -> PathBuf {
        self.inner.fs_path(p)
    }
    fn cmd_path(&self, p: &Path) -> PathBuf {
        self.inner.cmd_path(p)
    }
    fn host_path(&self, p: &Path) -> Option<PathBuf> {
        self.inner.host_path(p)
    }
    fn display_path(&self, p: &Path) -> PathBuf {
        self.inner.display_path(p)
    }
    fn run(
        &self,
        cmd: nixroll::agent::host::HostCommand,
    ) -> futures::future::BoxFuture<
        '_,
        Result<nixroll::agent::host::CommandOutput, nixroll::agent::host::HostError>,
    > {
        let args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if cmd.program == "nix"
            && args.iter().any(|a| a == "build")
            && args.iter().any(|a| a.contains("#nixosConfigurations."))
        {
            self.evaluations.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.run(cmd)
    }
    fn spawn_detached(
        &self,
        job: nixroll::agent::host::DetachedJob,
    ) -> futures::future::BoxFuture<'_, Result<(), nixroll::agent::host::HostError>> {
        self.inner.spawn_detached(job)
    }
    fn reboot(&self) -> futures::future::BoxFuture<'_, Result<(), nixroll::agent::host::HostError>> {
        self.inner.reboot()
    }
}

/// A host with a chroot store in `dir`, real Nix on it (offline: only what a target names).
struct ChrootHost {
    sim: Arc<SimHost>,
    host: Arc<dyn Host>,
    nix: Arc<dyn Nix>,
}

impl ChrootHost {
    fn new(dir: PathBuf) -> ChrootHost {
        let sim = SimHost::create(dir).unwrap();
        let host: Arc<dyn Host> = Arc::new(sim.host_root_chroot());
        let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
        ChrootHost { sim, host, nix }
    }

    fn root(&self) -> &Path {
        self.sim.root()
    }

    fn agent(&self, trusted: &[&str]) -> NodeAgent {
        NodeAgent::new(
            self.host.clone(),
            self.nix.clone(),
            HostOptions {
                activation_timeout: Duration::from_secs(30),
                result_poll: Duration::from_millis(10),
                substitution: Substitution {
                    substituters: Vec::new(),
                    trusted_public_keys: trusted.iter().map(|k| k.to_string()).collect(),
                },
                ..Default::default()
            },
        )
    }

    /// `nix …` (or another Nix program) on this host's store.
    fn nix_cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let mut store = std::ffi::OsString::from("local?root=");
        store.push(self.root());
        c.env("NIX_REMOTE", store)
            .env("NIX_CONF_DIR", self.root().join("etc/nix"))
            .env("HOME", self.root().join("root"));
        c
    }

    /// Whether `path` is a valid path of this host's store (a failed import may leave its
    /// directory behind, never registered).
    fn has(&self, path: &str) -> bool {
        let mut c = self.nix_cmd("nix-store");
        c.args(["--check-validity", path]);
        c.output().unwrap().status.success()
    }

    /// Store paths of derivations: a node that evaluated or built anything has some.
    fn derivations(&self) -> Vec<String> {
        std::fs::read_dir(self.root().join("nix/store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".drv"))
            .collect()
    }
}

fn run(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A key pair in Nix's format, made by Nix: (secret key file, public key).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sk, pk) = (dir.join(format!("{name}.sk")), dir.join(format!("{name}.pk")));
    run({
        let mut c = Command::new("nix-store");
        c.arg("--generate-binary-cache-key").arg(name).arg(&sk).arg(&pk);
        c
    });
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
}

/// A directory served over HTTP on 127.0.0.1 (a stand-in binary cache: what is in the
/// directory when a request comes is what is served).
async fn serve_dir(dir: PathBuf) -> String {
    use axum::http::{StatusCode, Uri};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let dir = dir.clone();
        async move {
            let rel = uri.path().trim_start_matches('/');
            if rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(StatusCode::NOT_FOUND);
            }
            tokio::fs::read(dir.join(rel))
                .await
                .map_err(|_| StatusCode::NOT_FOUND)
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// The builder builds `host`'s system at `rev` in its own store and copies its closure,
/// signed with `sk`, into the file cache `cache` (uncompressed NARs, so tests can tamper).
async fn build_and_publish(
    builder: &ChrootHost,
    flake: &TestFlake,
    rev: &str,
    host: &str,
    sk: &Path,
    cache: &Path,
) -> String {
    let gc = PathBuf::from(format!("/var/lib/nixroll/gcroots/build-{host}-{rev}"));
    let system = builder
        .nix
        .realise(&flake.installable(rev, host), &gc)
        .await
        .unwrap();
    assert!(system.starts_with("/nix/store/"), "{system}");
    run({
        let mut c = builder.nix_cmd("nix");
        c.args(["--extra-experimental-features", "nix-command", "copy", "--to"])
            .arg(format!(
                "file://{}?compression=none&secret-key={}",
                cache.display(),
                sk.display()
            ))
            .arg(&system);
        c
    });
    system
}

fn fetch_target(flake: &TestFlake, rev: &str, host: &str, system: &str, cache: &str) -> Target {
    Target {
        revision: rev.to_string(),
        installable: flake.installable(rev, host),
        system: None,
        build: Some(TargetBuild {
            system: system.to_string(),
            builder: Some("builder".into()),
            cache: Some(cache.to_string()),
            progress: None,
            built_at: None,
        }),
    }
}

fn narinfo(cache: &Path, system: &str) -> PathBuf {
    let base = Path::new(system).file_name().unwrap().to_string_lossy();
    cache.join(format!("{}.narinfo", &base[..32]))
}

fn assert_refused(st: &AgentStatus, node: &ChrootHost, system: &str, before: &str, expected: &str) {
    let err = st.last_error.as_ref().expect("lastError reported");
    assert_eq!(err.operation, HostOperation::Stage);
    assert!(err.message.contains(expected), "{:?}", err.message);
    assert!(
        err.message.contains("nothing changed on the node"),
        "{:?}",
        err.message
    );
    assert!(err.message.contains(system), "{:?}", err.message);
    // Nothing changed: the old system is still staged, booted, running and the boot default,
    // the new one is not in the node's store.
    assert_eq!(st.staged.as_ref().unwrap().system, before);
    assert_eq!(node.sim.profile_system().as_deref(), Some(before));
    assert_eq!(node.sim.boot_default().as_deref(), Some(before));
    assert_eq!(node.sim.current_system().as_deref(), Some(before));
    assert!(!node.has(system), "{system} entered the node's store");
}

#[tokio::test]
async fn nodes_fetch_the_signed_build_and_refuse_unsigned_wrongly_signed_or_tampered_closures() {
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut flake = TestFlake::create(tmp.path().join("flake"), &["n1", "n2"]).unwrap();
    let builder = ChrootHost::new(tmp.path().join("builder"));
    let cache = tmp.path().join("cache");
    let (sk, pk) = keypair(tmp.path(), "builder-1");
    let (_, other_pk) = keypair(tmp.path(), "other-1");
    let url = serve_dir(cache.clone()).await;

    // The first system, built once, fetched and installed on a node that never evaluates.
    let rev0 = flake.head().to_string();
    let sys0 = build_and_publish(&builder, &flake, &rev0, "n1", &sk, &cache).await;
    let node = ChrootHost::new(tmp.path().join("n1"));
    let mut agent = node.agent(&[&pk]);
    let st = agent
        .reconcile(Some(&fetch_target(&flake, &rev0, "n1", &sys0, &url)), None)
        .await
        .unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    let staged = st.staged.unwrap();
    assert_eq!(
        staged.system, sys0,
        "the node staged exactly the builder's store path"
    );
    assert!(node.has(&sys0));
    let switch = Path::new(&sys0).join("bin/switch-to-configuration");
    assert!(
        resolve(node.host.as_ref(), &switch).is_some(),
        "{switch:?} not in the node's store"
    );
    assert!(staged.closure_bytes.unwrap() > 0);
    assert!(
        node.derivations().is_empty(),
        "the node evaluated: {:?}",
        node.derivations()
    );
    let root = node.root().join(format!("var/lib/nixroll/gcroots/system-{rev0}"));
    assert_eq!(std::fs::read_link(&root).unwrap(), Path::new(&sys0));
    node.sim.install(&sys0).unwrap();

    // A new kernel, built and signed once.
    let rev1 = flake.commit_kernel_change().unwrap();
    let sys1 = build_and_publish(&builder, &flake, &rev1, "n1", &sk, &cache).await;
    let target1 = fetch_target(&flake, &rev1, "n1", &sys1, &url);
    let info = narinfo(&cache, &sys1);
    let good = std::fs::read_to_string(&info).unwrap();
    assert!(good.contains("Sig: builder-1:"), "{good}");

    // A node that trusts another key only.
    let st = node
        .agent(&[&other_pk])
        .reconcile(Some(&target1), None)
        .await
        .unwrap();
    assert_refused(&st, &node, &sys1, &sys0, "not signed by a trusted key (other-1)");

    // No key at all: nothing is even asked for.
    let st = node.agent(&[]).reconcile(Some(&target1), None).await.unwrap();
    assert_refused(&st, &node, &sys1, &sys0, "no trusted public key");

    // Unsigned.
    let unsigned: String = good
        .lines()
        .filter(|l| !l.starts_with("Sig:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&info, unsigned).unwrap();
    let st = node.agent(&[&pk]).reconcile(Some(&target1), None).await.unwrap();
    assert_refused(
        &st,
        &node,
        &sys1,
        &sys0,
        "not signed by a trusted key (builder-1)",
    );

    // A tampered .narinfo (another NAR hash and size: the signature no longer matches).
    let nar_line = good.lines().find(|l| l.starts_with("NarSize: ")).unwrap();
    let size: u64 = nar_line["NarSize: ".len()..].parse().unwrap();
    std::fs::write(&info, good.replace(nar_line, &format!("NarSize: {}", size + 1))).unwrap();
    let st = node.agent(&[&pk]).reconcile(Some(&target1), None).await.unwrap();
    assert_refused(
        &st,
        &node,
        &sys1,
        &sys0,
        "not signed by a trusted key (builder-1)",
    );
    std::fs::write(&info, &good).unwrap();

    // A tampered NAR under an intact, signed .narinfo.
    let url_line = good.lines().find(|l| l.starts_with("URL: ")).unwrap();
    let nar = cache.join(&url_line["URL: ".len()..]);
    let original = std::fs::read(&nar).unwrap();
    // The toplevel is symlinks into other store paths: point one elsewhere (same length,
    // still a well-formed NAR).
    let mut evil = original.clone();
    let at = evil
        .windows(11)
        .position(|w| w == b"/nix/store/")
        .expect("a store path in the NAR")
        + 11;
    evil[at] = if evil[at] == b'a' { b'b' } else { b'a' };
    std::fs::write(&nar, &evil).unwrap();
    let st = node.agent(&[&pk]).reconcile(Some(&target1), None).await.unwrap();
    assert_refused(&st, &node, &sys1, &sys0, "do not match the signed hash");
    std::fs::write(&nar, &original).unwrap();

    // Not in the cache (yet): said so, and fetched as soon as it is there.
    std::fs::rename(&info, info.with_extension("away")).unwrap();
    let mut agent = node.agent(&[&pk]);
    let st = agent.reconcile(Some(&target1), None).await.unwrap();
    assert_refused(&st, &node, &sys1, &sys0, "no configured cache has it");
    std::fs::rename(info.with_extension("away"), &info).unwrap();

    // Intact and signed: fetched, staged, and the boot default is still the old system.
    let st = node.agent(&[&pk]).reconcile(Some(&target1), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    let staged = st.staged.unwrap();
    assert_eq!(staged.system, sys1);
    assert_eq!(staged.revision, rev1);
    assert!(staged.reboot_required);
    assert_eq!(staged.reboot_reasons, vec!["kernel", "kernel-modules"]);
    assert_eq!(node.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(node.sim.profile_system().as_deref(), Some(sys0.as_str()));
    assert!(
        node.derivations().is_empty(),
        "the node evaluated: {:?}",
        node.derivations()
    );

    // A second node fetches the same build: its store gets exactly the builder's path.
    let node2 = ChrootHost::new(tmp.path().join("n1-twin"));
    let st = node2.agent(&[&pk]).reconcile(Some(&target1), None).await.unwrap();
    assert_eq!(st.staged.unwrap().system, sys1);
    assert!(node2.derivations().is_empty());
}

/// The builder's own cache: signed in Rust with a key that only lives in memory, NARs written
/// by nixroll from the store's files, three nodes fetching one build at once through a cache
/// that writes one NAR at a time.
#[tokio::test]
async fn the_builders_cache_serves_one_build_to_three_nodes_signed_in_rust() {
    use nixroll::builder::{BinaryCache, CacheOptions, SigningKey, write_nar};
    use std::sync::atomic::Ordering;
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flake = TestFlake::create(tmp.path().join("flake"), &["worker"]).unwrap();
    let builder = ChrootHost::new(tmp.path().join("builder"));
    // Nix makes the key (so its format is Nix's); the cache gets its text, never the file.
    let (sk_file, pk) = keypair(tmp.path(), "cluster-1");
    let key = SigningKey::parse(&std::fs::read_to_string(&sk_file).unwrap()).unwrap();
    assert_eq!(key.public_key(), pk, "the public key derived in Rust is Nix's");
    let (_, other_pk) = keypair(tmp.path(), "other-1");

    let rev = flake.head().to_string();
    let gc = PathBuf::from("/var/lib/nixroll/gcroots/build-worker");
    let system = builder
        .nix
        .realise(&flake.installable(&rev, "worker"), &gc)
        .await
        .unwrap();
    let closure = builder.nix.closure_info(&system).await.unwrap();
    assert!(closure.iter().any(|i| i.path == system));
    assert!(closure.len() > 3, "{closure:?}");

    // Each NAR nixroll writes is byte for byte what Nix dumps.
    for info in &closure {
        let mut ours = Vec::new();
        write_nar(&builder.host.fs_path(Path::new(&info.path)), &mut ours).unwrap();
        let nix = {
            let mut c = builder.nix_cmd("nix");
            c.args([
                "--extra-experimental-features",
                "nix-command",
                "store",
                "dump-path",
                &info.path,
            ]);
            c.output().unwrap()
        };
        assert!(nix.status.success());
        assert_eq!(ours.len() as u64, info.nar_size, "{}", info.path);
        assert!(
            ours == nix.stdout,
            "{}: NAR differs from nix store dump-path",
            info.path
        );
    }

    let cache = BinaryCache::new(
        builder.host.clone(),
        key,
        CacheOptions {
            max_concurrent_nars: 1,
            ..Default::default()
        },
    );
    assert_eq!(cache.publish(&closure).unwrap(), closure.len());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cache.clone().serve(listener));

    let target = fetch_target(&flake, &rev, "worker", &system, &url);
    let nodes: Vec<ChrootHost> = (1..=3)
        .map(|i| ChrootHost::new(tmp.path().join(format!("node-{i}"))))
        .collect();
    let mut agents: Vec<NodeAgent> = nodes.iter().map(|n| n.agent(&[&pk])).collect();
    let results =
        futures::future::join_all(agents.iter_mut().map(|a| a.reconcile(Some(&target), None))).await;
    for (node, st) in nodes.iter().zip(results) {
        let st = st.unwrap();
        assert!(st.last_error.is_none(), "{:?}", st.last_error);
        assert_eq!(st.staged.unwrap().system, system);
        assert!(node.has(&system));
        assert!(
            node.derivations().is_empty(),
            "a node evaluated: {:?}",
            node.derivations()
        );
    }
    let stats = cache.stats();
    assert_eq!(stats.nars.load(Ordering::SeqCst), 3 * closure.len() as u64);
    assert_eq!(
        stats.nars_peak.load(Ordering::SeqCst),
        1,
        "more NARs at once than allowed"
    );
    assert_eq!(stats.busy.load(Ordering::SeqCst), 0);

    // Trusting another key: the Rust signature is refused like Nix's own.
    let stranger = ChrootHost::new(tmp.path().join("stranger"));
    let st = stranger
        .agent(&[&other_pk])
        .reconcile(Some(&target), None)
        .await
        .unwrap();
    let err = st.last_error.unwrap();
    assert!(
        err.message.contains("not signed by a trusted key (other-1)"),
        "{}",
        err.message
    );
    assert!(!stranger.has(&system));

    // Only what was published is served: the builder's other store paths are not.
    let source = std::fs::read_dir(builder.root().join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with("-source"))
        .expect("the flake's source in the builder's store");
    let unpublished = format!("/nix/store/{source}");
    assert!(builder.has(&unpublished));
    assert!(!cache.has(&unpublished));
    let other = fetch_target(&flake, &rev, "worker", &unpublished, &url);
    let st = stranger
        .agent(&[&pk])
        .reconcile(Some(&other), None)
        .await
        .unwrap();
    let err = st.last_error.unwrap();
    assert!(
        err.message.contains("no configured cache has it"),
        "{}",
        err.message
    );
}

/// The builder role end to end without Kubernetes: the plan asks one build per distinct
/// system, the builder builds it once (again and after a restart: no second build), serves
/// it, the nodes' targets point at it and they fetch it; a broken revision fails once, on the
/// builder, and every node that wants it gets that one failure.
#[tokio::test]
async fn the_builder_builds_each_distinct_system_once_and_nodes_fetch_it() {
    use nixroll::api::BuildState;
    use nixroll::builder::{BinaryCache, Builder, CacheOptions, SigningKey};
    use nixroll::rollout::build::{BuilderInfo, Fetch, Wanted, fetch_for, plan};
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut flake = TestFlake::create(tmp.path().join("flake"), &["worker", "edge"]).unwrap();
    let bhost = ChrootHost::new(tmp.path().join("builder"));
    let (sk_file, pk) = keypair(tmp.path(), "cluster-1");
    let key = || SigningKey::parse(&std::fs::read_to_string(&sk_file).unwrap()).unwrap();
    let cache = BinaryCache::new(bhost.host.clone(), key(), CacheOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cache.clone().serve(listener));
    // The builder's Nix runs through a host that counts evaluations.
    let counting = Arc::new(Counting {
        inner: bhost.host.clone(),
        evaluations: Default::default(),
    });
    let counted: Arc<dyn Nix> = Arc::new(NixCli::new(counting.clone()).offline());
    let mut builder = Builder::new(bhost.host.clone(), counted.clone(), cache);

    // Four nodes: three workers and one edge node, all of the builder's Nix system.
    let rev = flake.head().to_string();
    let names = ["w1", "w2", "w3", "e1"];
    let installables: Vec<String> = names
        .iter()
        .map(|n| flake.installable(&rev, if n.starts_with('w') { "worker" } else { "edge" }))
        .collect();
    let sys = "x86_64-linux";
    let wanted: Vec<Wanted<'_>> = names
        .iter()
        .zip(&installables)
        .map(|(n, i)| Wanted {
            node: n,
            nix_system: Some(sys),
            installable: i,
            retry: None,
        })
        .collect();
    let info = |reports| BuilderInfo {
        name: "builder",
        nix_system: sys,
        cache: Some(&url),
        reports,
        available: true,
    };
    let requests = plan(&[info(&[])], wanted.iter().copied())
        .remove("builder")
        .unwrap();
    assert_eq!(requests.len(), 2, "one build per distinct system: {requests:?}");
    assert_eq!(requests.iter().map(|r| r.nodes).sum::<u32>(), 4);

    let reports = builder.run(&requests).await;
    assert!(
        reports.iter().all(|r| r.state == BuildState::Built),
        "{reports:?}"
    );
    assert_eq!(builder.builds_started(), 2);
    let built = reports.clone();
    // Both configurations in one evaluation: one `nix build` with two installables.
    assert_eq!(builder.evaluations(), 1);
    assert_eq!(
        counting.evaluations(),
        1,
        "one nix build process for both configurations"
    );
    for r in &reports {
        let root = bhost.host.fs_path(
            &Path::new(nixroll::builder::BUILDS_DIR).join(nixroll::builder::root_name(&r.installable)),
        );
        let target = std::fs::read_link(&root).unwrap();
        assert_eq!(
            bhost.host.display_path(&target).to_string_lossy(),
            r.system.as_deref().unwrap(),
            "{} pins its own system",
            root.display()
        );
    }
    let roots: Vec<String> = std::fs::read_dir(bhost.host.fs_path(Path::new(nixroll::builder::BUILDS_DIR)))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(roots.len(), 2, "only the two roots stay: {roots:?}");
    // Asked again (every node's reconcile asks): nothing is built again.
    assert_eq!(builder.run(&requests).await, reports);
    assert_eq!(builder.builds_started(), 2);
    assert_eq!(counting.evaluations(), 1);

    // A restarted builder: the same systems, found in the store, not built again.
    let registered = |path: &str| {
        let mut c = bhost.nix_cmd("nix");
        c.args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            path,
        ]);
        let v: serde_json::Value = serde_json::from_str(&run(c)).unwrap();
        v[0]["registrationTime"].as_u64().unwrap()
    };
    let before: Vec<u64> = reports
        .iter()
        .map(|r| registered(r.system.as_deref().unwrap()))
        .collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cache2 = BinaryCache::new(bhost.host.clone(), key(), CacheOptions::default());
    let again = Builder::new(bhost.host.clone(), bhost.nix.clone(), cache2)
        .run(&requests)
        .await;
    let systems = |rs: &[nixroll::api::BuildReport]| rs.iter().map(|r| r.system.clone()).collect::<Vec<_>>();
    assert_eq!(systems(&again), systems(&reports));
    let after: Vec<u64> = reports
        .iter()
        .map(|r| registered(r.system.as_deref().unwrap()))
        .collect();
    assert_eq!(before, after, "the restarted builder built again");

    // Every node's target points at the build of its system; each fetches it, none evaluates.
    let builders = [info(&reports)];
    for (w, n) in wanted.iter().zip(names) {
        let Fetch::Ready(build) = fetch_for(w, &builders) else {
            panic!("{n} cannot fetch");
        };
        let node = ChrootHost::new(tmp.path().join(n));
        let target = Target {
            revision: rev.clone(),
            installable: w.installable.to_string(),
            system: None,
            build: Some(build.clone()),
        };
        let st = node.agent(&[&pk]).reconcile(Some(&target), None).await.unwrap();
        assert!(st.last_error.is_none(), "{n}: {:?}", st.last_error);
        assert_eq!(st.staged.unwrap().system, build.system);
        assert!(node.derivations().is_empty(), "{n} evaluated");
    }

    // A revision that does not build: one failure on the builder, shared by all its nodes.
    let broken = flake.commit_broken_build().unwrap();
    let bad = flake.installable(&broken, "worker");
    let bad_wanted: Vec<Wanted<'_>> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| Wanted {
            node: n,
            nix_system: Some(sys),
            installable: &bad,
            retry: None,
        })
        .collect();
    let requests = plan(&[info(&[])], bad_wanted.iter().copied())
        .remove("builder")
        .unwrap();
    assert_eq!(requests.len(), 1);
    let started = builder.builds_started();
    let reports = builder.run(&requests).await;
    assert_eq!(reports[0].state, BuildState::Failed);
    assert!(
        reports[0]
            .message
            .as_deref()
            .unwrap()
            .contains("have the same priority"),
        "{reports:?}"
    );
    assert_eq!(
        builder.run(&requests).await,
        reports,
        "a failure is reported once, not rebuilt"
    );
    assert_eq!(builder.builds_started(), started + 1);
    let builders = [info(&reports)];
    for w in &bad_wanted {
        match fetch_for(w, &builders) {
            Fetch::Failed { builder, message } => {
                assert_eq!(builder, "builder");
                assert!(message.contains("have the same priority"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    // Not remembered forever: a node retried (nixroll.io/retry=1) asks again; the builder
    // builds once more under that token, and not again for the same token.
    let mut retried = requests.clone();
    retried[0].retry = Some("1".into());
    let again = builder.run(&retried).await;
    assert_eq!(builder.builds_started(), started + 2, "the retry builds again");
    assert_eq!(again[0].state, BuildState::Failed);
    assert_eq!(again[0].retry.as_deref(), Some("1"));
    assert_eq!(builder.run(&retried).await, again);
    assert_eq!(builder.builds_started(), started + 2, "once per retry");

    // A batch with a broken configuration: the one evaluation fails, then each builds alone:
    // the good one is built, the failure is reported on the broken one only.
    let edge = built
        .iter()
        .find(|r| r.installable.contains("\"edge\"") || r.installable.contains(".edge."))
        .unwrap()
        .clone();
    let mut broken_again = retried[0].clone();
    broken_again.retry = Some("2".into());
    let edge_ok = nixroll::api::BuildRequest {
        installable: edge.installable.clone(),
        nodes: 1,
        retry: None,
    };
    let before = counting.evaluations();
    let mixed = builder.run(&[broken_again, edge_ok]).await;
    assert_eq!(mixed[0].state, BuildState::Failed, "{mixed:?}");
    assert_eq!(mixed[1].state, BuildState::Built, "{mixed:?}");
    assert_eq!(mixed[1].system, edge.system);
    assert_eq!(
        counting.evaluations(),
        before + 3,
        "one evaluation for both, then each alone"
    );
}

/// The builder agent's role as `nixroll agent --builder` runs it: the key read from a Secret
/// of the (embedded) API, the cache served on the address it was given, the requests of
/// `status.builds` built and reported, and a node fetching from the URL it reports.
#[tokio::test]
async fn the_builder_agent_reads_its_key_from_a_secret_builds_and_serves() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    use nixroll::agent::building::{BuilderConfig, load_key, run as run_builder};
    use nixroll::api::{BuildRequest, BuildState};
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flake = TestFlake::create(tmp.path().join("flake"), &["worker"]).unwrap();
    let bhost = ChrootHost::new(tmp.path().join("builder"));
    let (sk_file, pk) = keypair(tmp.path(), "cluster-1");
    let secret_text = std::fs::read_to_string(&sk_file).unwrap();
    std::fs::remove_file(&sk_file).unwrap();
    let (_server, client) = common::api::start().await;
    let mut ns = k8s_openapi::api::core::v1::Namespace::default();
    ns.metadata.name = Some("nixroll-system".into());
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "nixroll-system");
    let mut s = Secret::default();
    s.metadata.name = Some("nixroll-builder-key".into());
    s.data = Some(
        [(
            "secret-key".to_string(),
            ByteString(secret_text.clone().into_bytes()),
        )]
        .into(),
    );
    secrets.create(&PostParams::default(), &s).await.unwrap();

    // Errors name the Secret and key, never the value.
    let t = Duration::from_secs(10);
    let e = load_key(&secrets, "missing", "secret-key", t).await.unwrap_err();
    assert!(e.contains("cannot read Secret missing"), "{e}");
    let e = load_key(&secrets, "nixroll-builder-key", "other", t)
        .await
        .unwrap_err();
    assert!(e.contains("has no key other"), "{e}");
    let key = load_key(&secrets, "nixroll-builder-key", "secret-key", t)
        .await
        .unwrap();
    assert_eq!(key.public_key(), pk);
    let b64 = secret_text.trim().split_once(':').unwrap().1.to_string();
    assert!(!format!("{key:?}").contains(&b64));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let config = BuilderConfig {
        key_secret: "nixroll-builder-key".into(),
        key_field: "secret-key".into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        url: url.clone(),
        cache: Default::default(),
        push_to: None,
    };
    let rev = flake.head().to_string();
    let installable = flake.installable(&rev, "worker");
    let (req_tx, req_rx) = tokio::sync::watch::channel(Vec::new());
    let (rep_tx, mut rep_rx) = tokio::sync::watch::channel(Vec::new());
    let task = tokio::spawn(run_builder(
        config,
        bhost.host.clone(),
        bhost.nix.clone(),
        secrets.clone(),
        t,
        req_rx,
        rep_tx,
    ));
    req_tx
        .send(vec![BuildRequest {
            installable: installable.clone(),
            nodes: 3,
            retry: None,
        }])
        .unwrap();
    let reports = tokio::time::timeout(
        Duration::from_secs(60),
        rep_rx.wait_for(|r| r.iter().any(|x| x.state != BuildState::Building)),
    )
    .await
    .expect("the builder reported within 60 s")
    .unwrap()
    .clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].state, BuildState::Built, "{reports:?}");
    let system = reports[0].system.clone().unwrap();

    let node = ChrootHost::new(tmp.path().join("node"));
    let target = fetch_target(&flake, &rev, "worker", &system, &url);
    let st = node.agent(&[&pk]).reconcile(Some(&target), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    assert_eq!(st.staged.unwrap().system, system);
    task.abort();
}

/// Processes started by this test (descendants of this process) whose command line mentions
/// `marker`.
fn descendants_mentioning(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if pid == me || !String::from_utf8_lossy(&cmd).contains(marker) {
            continue;
        }
        let mut p = parent(pid);
        while let Some(q) = p {
            if q == me {
                out.push(pid);
                break;
            }
            if q <= 1 {
                break;
            }
            p = parent(q);
        }
    }
    out
}

/// A builder whose build is killed halfway (its process killed, as when its unit is stopped)
/// builds it again, once: the build ran to the end once, the store path is valid, the report is
/// `Built`. A build that fails on its own is not run again.
#[tokio::test]
async fn a_build_killed_halfway_is_built_again_once() {
    use nixroll::api::{BuildRequest, BuildState};
    use nixroll::builder::{BinaryCache, Builder, CacheOptions, SigningKey};
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let mut flake = TestFlake::create(tmp.path().join("flake"), &["worker"]).unwrap();
    let script = format!(
        "echo x >>{m}/started; /bin/sleep 3; echo x >>{m}/finished; /bin/mkdir -p $out/slow",
        m = marks.display()
    );
    let rev = flake
        .commit("a slow build", |s| s.slow_build = Some(script))
        .unwrap();
    // A private store (no sandbox: a chroot store would build in one, away from `marks`).
    let sim = SimHost::create(tmp.path().join("builder")).unwrap();
    let host: Arc<dyn Host> = Arc::new(sim.host_root());
    let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
    let (sk_file, _pk) = keypair(tmp.path(), "cluster-1");
    let key = SigningKey::parse(&std::fs::read_to_string(&sk_file).unwrap()).unwrap();
    let cache = BinaryCache::new(host.clone(), key, CacheOptions::default());
    let mut builder = Builder::new(host.clone(), nix.clone(), cache);
    let request = BuildRequest {
        installable: flake.installable(&rev, "worker"),
        nodes: 3,
        retry: None,
    };
    let lines = |f: &str| {
        std::fs::read_to_string(marks.join(f))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let marker = marks.to_string_lossy().into_owned();
    let builder_root = sim.root().to_string_lossy().into_owned();
    let killer = tokio::spawn(async move {
        // Once the build runs: kill it (the builder's shell and the nix that runs it).
        let t0 = std::time::Instant::now();
        while lines_in(&marker, "started") == 0 {
            assert!(t0.elapsed() < Duration::from_secs(60), "the build never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut pids = descendants_mentioning(&marker);
        pids.extend(descendants_mentioning(&builder_root));
        assert!(!pids.is_empty(), "no build process found");
        for pid in &pids {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        pids.len()
    });
    let reports = tokio::time::timeout(Duration::from_secs(120), builder.run(&[request]))
        .await
        .expect("the builder reported within 120 s");
    assert!(killer.await.unwrap() >= 1);
    assert_eq!(reports[0].state, BuildState::Built, "{reports:?}");
    assert_eq!(lines("started"), 2, "killed once, then built again");
    assert_eq!(lines("finished"), 1, "the build ran to its end once");
    assert_eq!(builder.evaluations(), 2);
    let system = reports[0].system.clone().unwrap();
    assert!(
        std::path::Path::new(&system).join("slow").is_dir(),
        "{system} has no slow/"
    );
    let mut verify = Command::new("nix-store");
    verify
        .args(["--verify-path", &system])
        .env("NIX_STORE_DIR", sim.root().join("nix/store"))
        .env("NIX_STATE_DIR", sim.root().join("nix/var/nix"))
        .env("NIX_LOG_DIR", sim.root().join("nix/var/log/nix"))
        .env("NIX_CONF_DIR", sim.root().join("etc/nix"))
        .env("HOME", sim.root().join("root"));
    run(verify);
    // Asked again: nothing runs.
    builder
        .run(&[reports[0].clone()].map(|r| BuildRequest {
            installable: r.installable,
            nodes: 3,
            retry: None,
        }))
        .await;
    assert_eq!(lines("started"), 2);
    assert_eq!(builder.evaluations(), 2);

    // A build that fails by itself is reported, not run again.
    let broken = flake.commit_broken_build().unwrap();
    let before = builder.evaluations();
    let reports = builder
        .run(&[BuildRequest {
            installable: flake.installable(&broken, "worker"),
            nodes: 1,
            retry: None,
        }])
        .await;
    assert_eq!(reports[0].state, BuildState::Failed);
    assert_eq!(builder.evaluations(), before + 1);
}

fn lines_in(dir: &str, file: &str) -> usize {
    std::fs::read_to_string(Path::new(dir).join(file))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Push mode to a cache on shared storage (`--builder-push-to file:///DIR`): the builder writes
/// each built closure into the directory, signed with the key it holds in memory (the key is not
/// in any file there); a node whose only substituter is that directory (no builder cache)
/// fetches the system, signatures required, and evaluates nothing; a node trusting another key
/// refuses it and stages nothing.
#[tokio::test]
async fn the_builder_pushes_signed_closures_to_a_file_cache() {
    use nixroll::api::{BuildRequest, BuildState};
    use nixroll::builder::{BinaryCache, Builder, CacheOptions, PushTo, SigningKey};
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flake = TestFlake::create(tmp.path().join("flake"), &["worker"]).unwrap();
    let bhost = ChrootHost::new(tmp.path().join("builder"));
    let (sk_file, pk) = keypair(tmp.path(), "cluster-1");
    let (_, other_pk) = keypair(tmp.path(), "other-1");
    let secret = std::fs::read_to_string(&sk_file).unwrap();
    let key = SigningKey::parse(&secret).unwrap();
    let cache = BinaryCache::new(bhost.host.clone(), key, CacheOptions::default());
    let shared = tmp.path().join("shared-cache");
    let mut builder = Builder::new(bhost.host.clone(), bhost.nix.clone(), cache)
        .with_push_to(Some(PushTo::Dir(shared.clone())));
    let rev = flake.head().to_string();
    let reports = builder
        .run(&[BuildRequest {
            installable: flake.installable(&rev, "worker"),
            nodes: 1,
            retry: None,
        }])
        .await;
    assert_eq!(reports[0].state, BuildState::Built, "{reports:?}");
    let system = reports[0].system.clone().unwrap();
    assert!(
        std::fs::read_to_string(shared.join("nix-cache-info"))
            .unwrap()
            .contains("StoreDir: /nix/store")
    );
    assert!(narinfo(&shared, &system).exists());
    let secret_b64 = secret.trim().split_once(':').unwrap().1;
    for e in std::fs::read_dir(&shared).unwrap().flatten() {
        if e.path().is_file() {
            let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
            assert!(
                !text.contains(secret_b64),
                "the secret key is in {}",
                e.path().display()
            );
        }
    }

    let target = Target {
        revision: rev.clone(),
        installable: flake.installable(&rev, "worker"),
        system: None,
        build: Some(TargetBuild {
            system: system.clone(),
            builder: Some("builder".into()),
            cache: None,
            progress: None,
            built_at: None,
        }),
    };
    let node_with = |dir: &str, trusted: &str| {
        let node = ChrootHost::new(tmp.path().join(dir));
        let agent = NodeAgent::new(
            node.host.clone(),
            node.nix.clone(),
            HostOptions {
                activation_timeout: Duration::from_secs(30),
                result_poll: Duration::from_millis(10),
                substitution: Substitution {
                    substituters: vec![format!("file://{}", shared.display())],
                    trusted_public_keys: vec![trusted.to_string()],
                },
                ..Default::default()
            },
        );
        (node, agent)
    };
    let (node, mut agent) = node_with("node", &pk);
    let st = agent.reconcile(Some(&target), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    assert_eq!(st.staged.unwrap().system, system);
    assert!(node.derivations().is_empty(), "the node evaluated");

    let (other, mut agent) = node_with("other", &other_pk);
    let st = agent.reconcile(Some(&target), None).await.unwrap();
    let err = st.last_error.expect("refused");
    assert!(err.message.contains("refused to fetch"), "{}", err.message);
    assert!(!other.has(&system), "{system} entered the node's store");
}

/// Records the command lines of [`Host::run_with_stdin`] (the `nix copy` of a push) and passes
/// everything on.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn Host>,
    argv: std::sync::Mutex<Vec<String>>,
}

impl Host for Recording {
    fn fs_path(&self, p: &Path) -> PathBuf {
        self.inner.fs_path(p)
    }
    fn cmd_path(&self, p: &Path) -> PathBuf {
        self.inner.cmd_path(p)
    }
    fn host_path(&self, p: &Path) -> Option<PathBuf> {
        self.inner.host_path(p)
    }
    fn display_path(&self, p: &Path) -> PathBuf {
        self.inner.display_path(p)
    }
    fn run(
        &self,
        cmd: nixroll::agent::host::HostCommand,
    ) -> futures::future::BoxFuture<
        '_,
        Result<nixroll::agent::host::CommandOutput, nixroll::agent::host::HostError>,
    > {
        self.inner.run(cmd)
    }
    fn run_with_stdin(
        &self,
        cmd: nixroll::agent::host::HostCommand,
        stdin: std::fs::File,
    ) -> futures::future::BoxFuture<
        '_,
        Result<nixroll::agent::host::CommandOutput, nixroll::agent::host::HostError>,
    > {
        let mut line = vec![cmd.program.to_string_lossy().into_owned()];
        line.extend(cmd.args.iter().map(|a| a.to_string_lossy().into_owned()));
        self.argv.lock().unwrap().push(line.join(" "));
        self.inner.run_with_stdin(cmd, stdin)
    }
    fn spawn_detached(
        &self,
        job: nixroll::agent::host::DetachedJob,
    ) -> futures::future::BoxFuture<'_, Result<(), nixroll::agent::host::HostError>> {
        self.inner.spawn_detached(job)
    }
    fn reboot(&self) -> futures::future::BoxFuture<'_, Result<(), nixroll::agent::host::HostError>> {
        self.inner.reboot()
    }
}

/// A tiny HTTP binary cache on 127.0.0.1 that Nix can upload to: `PUT` stores a file (Nix's
/// http binary cache store uploads `nix-cache-info`, `*.narinfo` and `nar/*` with PUT), `GET`
/// and `HEAD` serve it. Files are kept in memory.
async fn serve_upload_cache() -> (
    String,
    Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
) {
    use axum::http::{Method, StatusCode, Uri};
    let files: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = files.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: axum::body::Bytes| {
        let store = store.clone();
        async move {
            let key = uri.path().trim_start_matches('/').to_string();
            let mut files = store.lock().unwrap();
            if method == Method::PUT {
                files.insert(key, body.to_vec());
                return Ok(Vec::new());
            }
            match files.get(&key) {
                Some(_) if method == Method::HEAD => Ok(Vec::new()),
                Some(b) => Ok(b.clone()),
                None => Err(StatusCode::NOT_FOUND),
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), files)
}

/// Every file under `dir` (recursively, symlinks not followed).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// Push mode with `nix copy --to` (`--builder-push-to http://…`, and `file:///DIR?…`): the key
/// reaches Nix as a sealed in-memory file (`secret-key=/proc/self/fd/0`), never in a file nor on
/// a command line; Nix signs every narinfo it uploads; a node whose only substituter is that
/// cache fetches the system with signatures required and evaluates nothing; a node trusting
/// another key refuses it.
#[tokio::test]
async fn the_builder_pushes_with_nix_copy_to_file_and_http_caches_the_key_in_memory_only() {
    use nixroll::api::{BuildRequest, BuildState};
    use nixroll::builder::{BinaryCache, Builder, CacheOptions, PushTo, SigningKey};
    if !common::require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flake = TestFlake::create(tmp.path().join("flake"), &["worker"]).unwrap();
    let bhost = ChrootHost::new(tmp.path().join("builder"));
    // The key is made in memory: no file of this test ever holds it.
    let secret = SigningKey::generate_secret("cluster-push-1").unwrap();
    let secret_b64 = secret.split_once(':').unwrap().1.to_string();
    let other_pk = SigningKey::parse(&SigningKey::generate_secret("other-1").unwrap())
        .unwrap()
        .public_key();
    let (http_url, uploaded) = serve_upload_cache().await;
    let file_cache = tmp.path().join("file-cache");
    let rev = flake.head().to_string();

    // Watch every process's command line while the pushes run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let needle = secret_b64.clone();
        std::thread::spawn(move || {
            let mut seen: Vec<String> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for e in std::fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(b) = std::fs::read(e.path().join("cmdline")) {
                        let line = String::from_utf8_lossy(&b).replace('\0', " ");
                        if line.contains("copy") || line.contains(&needle) {
                            seen.push(line);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut argvs = Vec::new();
    let mut systems = Vec::new();
    for to in [
        PushTo::NixCopy(format!("file://{}?compression=none", file_cache.display())),
        PushTo::NixCopy(http_url.clone()),
    ] {
        let rec = Arc::new(Recording {
            inner: bhost.host.clone(),
            argv: Default::default(),
        });
        let key = SigningKey::parse(&secret).unwrap();
        let cache = BinaryCache::new(rec.clone(), key, CacheOptions::default());
        let mut builder = Builder::new(rec.clone(), bhost.nix.clone(), cache).with_push_to(Some(to.clone()));
        let reports = builder
            .run(&[BuildRequest {
                installable: flake.installable(&rev, "worker"),
                nodes: 1,
                retry: None,
            }])
            .await;
        assert_eq!(reports[0].state, BuildState::Built, "{to:?}: {reports:?}");
        systems.push(reports[0].system.clone().unwrap());
        let argv = rec.argv.lock().unwrap().clone();
        assert_eq!(argv.len(), 1, "one nix copy: {argv:?}");
        assert!(argv[0].contains(" copy --to "), "{argv:?}");
        assert!(argv[0].contains("secret-key=/proc/self/fd/0"), "{argv:?}");
        argvs.extend(argv);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    let system = systems[0].clone();
    assert_eq!(systems[1], system);
    for line in argvs.iter().chain(&seen) {
        assert!(
            !line.contains(&secret_b64),
            "the secret key on a command line: {line}"
        );
    }

    // Nix signed what it wrote, with the builder's key; the key is in no file.
    let base = Path::new(&system)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let narinfo_name = format!("{}.narinfo", &base[..32]);
    let file_narinfo = std::fs::read_to_string(file_cache.join(&narinfo_name)).unwrap();
    assert!(file_narinfo.contains("Sig: cluster-push-1:"), "{file_narinfo}");
    {
        let files = uploaded.lock().unwrap();
        let http_narinfo =
            String::from_utf8_lossy(files.get(&narinfo_name).expect("narinfo uploaded")).into_owned();
        assert!(http_narinfo.contains("Sig: cluster-push-1:"), "{http_narinfo}");
        assert!(files.keys().any(|k| k.starts_with("nar/")), "{:?}", files.keys());
        for (name, body) in files.iter() {
            assert!(
                !String::from_utf8_lossy(body).contains(&secret_b64),
                "the secret key was uploaded in {name}"
            );
        }
    }
    let mut all = Vec::new();
    files_under(tmp.path(), &mut all);
    assert!(all.len() > 10, "{all:?}");
    for f in &all {
        let bytes = std::fs::read(f).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret_b64),
            "the secret key is in {}",
            f.display()
        );
    }

    let pk = SigningKey::parse(&secret).unwrap().public_key();
    let target = Target {
        revision: rev.clone(),
        installable: flake.installable(&rev, "worker"),
        system: None,
        build: Some(TargetBuild {
            system: system.clone(),
            builder: Some("builder".into()),
            cache: None,
            progress: None,
            built_at: None,
        }),
    };
    let node_with = |dir: &str, substituter: String, trusted: &str| {
        let node = ChrootHost::new(tmp.path().join(dir));
        let agent = NodeAgent::new(
            node.host.clone(),
            node.nix.clone(),
            HostOptions {
                activation_timeout: Duration::from_secs(30),
                result_poll: Duration::from_millis(10),
                substitution: Substitution {
                    substituters: vec![substituter],
                    trusted_public_keys: vec![trusted.to_string()],
                },
                ..Default::default()
            },
        );
        (node, agent)
    };
    for (dir, url) in [
        ("node-file", format!("file://{}", file_cache.display())),
        ("node-http", http_url.clone()),
    ] {
        let (node, mut agent) = node_with(dir, url.clone(), &pk);
        let st = agent.reconcile(Some(&target), None).await.unwrap();
        assert!(st.last_error.is_none(), "{url}: {:?}", st.last_error);
        assert_eq!(st.staged.unwrap().system, system);
        assert!(node.derivations().is_empty(), "the node evaluated");
    }
    let (other, mut agent) = node_with("other", http_url.clone(), &other_pk);
    let st = agent.reconcile(Some(&target), None).await.unwrap();
    let err = st.last_error.expect("refused");
    assert!(err.message.contains("refused to fetch"), "{}", err.message);
    assert!(!other.has(&system), "{system} entered the node's store");
}
