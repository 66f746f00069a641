//! Secret files (`spec.secrets`) delivered by a real agent (`nixroll::agent::run` over a
//! `--host-root` backend) from Secrets in the embedded Kubernetes API: create, rotate (a reader
//! only ever sees the old or the new content), same-data updates (no write, no restart),
//! missing Secrets (reported by name, files left alone), removal (only files nixroll wrote),
//! an agent killed mid-write, and a scan of every log line, Event, status, the host state file
//! and every process command line for the secret bytes and their hex SHA-256.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::objects::secret_file;
use embedded_apiserver::ApiServer;
use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nixroll::agent::AgentConfig;
use nixroll::agent::host::{Host, HostRoot, RebootHook, SYSTEMCTL_LOG};
use nixroll::agent::node::{HostOptions, NodeAgent};
use nixroll::agent::secrets::{Fetched, SecretsView, WriteCrash};
use nixroll::api::{NixOSNode, SecretFile};
use nixroll::nix::{Nix, NixCli};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const NS: &str = "nixroll-system";

// ------------------------------------------------------------------ log capture

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary (all levels, all crates), from a global subscriber.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let c = Captured::default();
        let w = c.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        c
    })
}

// ------------------------------------------------------------------ helpers

struct Env {
    api: ApiServer,
    /// A second port of the same server that only the agent uses (its requests counted apart).
    agents_api: ApiServer,
    agents_client: kube::Client,
    client: kube::Client,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:System administrator:/root:/bin/sh\nwpa:x:4242:4343::/var/empty:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nwpa:x:4343:\n").unwrap();
    let (api, client) = common::api::start_with_crd().await;
    let (agents_api, agents_client) = common::api::second_server(&api).await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
    )
    .await
    .unwrap();
    Env {
        api,
        agents_api,
        agents_client,
        client,
        root,
        _dir: dir,
    }
}

impl Env {
    fn host(&self) -> Arc<dyn Host> {
        Arc::new(HostRoot::new(&self.root, RebootHook::None))
    }

    fn start_agent(&self) -> tokio::task::JoinHandle<()> {
        let host = self.host();
        let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
        let config = AgentConfig::new(NODE, host, nix);
        let client = self.agents_client.clone();
        tokio::spawn(async move {
            nixroll::agent::run(client, config, std::future::pending::<()>())
                .await
                .unwrap();
        })
    }

    /// Create or update a Secret; returns its new resourceVersion.
    async fn put_secret(&self, name: &str, data: &[(&str, &[u8])]) -> String {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.to_vec())))
                .collect(),
        );
        api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s))
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap()
    }

    async fn apply_spec(&self, secrets: Value) {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let obj = json!({
            "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
            "metadata": {"name": NODE},
            "spec": {
                "flake": "path:/nonexistent",
                "revision": "0123456789abcdef0123456789abcdef01234567",
                "secrets": secrets,
            },
        });
        api.patch(NODE, &PatchParams::apply("flux").force(), &Patch::Apply(&obj))
            .await
            .unwrap();
    }

    async fn node(&self) -> NixOSNode {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        api.get(NODE).await.unwrap()
    }

    /// Wait (bounded) until `pred` holds for the NixOSNode's `status.agent` (as JSON).
    async fn wait_agent(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let o = serde_json::to_value(self.node().await).unwrap();
            let agent = o["status"]["agent"].clone();
            if pred(&agent) {
                return agent;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {agent:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn file(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    fn restarts(&self) -> Vec<String> {
        std::fs::read_to_string(self.file(SYSTEMCTL_LOG))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    async fn wait_file(&self, host_path: &str, want: &[u8]) {
        let p = self.file(host_path);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while std::fs::read(&p).ok().as_deref() != Some(want) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{host_path} never got the new content"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn rv_of(agent: &Value, path: &str) -> Option<String> {
    agent["secrets"]
        .as_array()?
        .iter()
        .find(|s| s["path"] == path)
        .and_then(|s| s["resourceVersion"].as_str().map(str::to_string))
}

fn sha256_hex(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The needles a leak check looks for: the value, its base64 (as in the Secret's JSON) and
/// hex SHA-256.
fn needles(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    vec![
        value.to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(value)
            .into_bytes(),
        sha256_hex(value).into_bytes(),
    ]
}

fn is_root() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, "").unwrap();
    std::fs::metadata(&p).unwrap().uid() == 0
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_are_created_rotated_atomically_and_removed_without_leaking() {
    // Files are owned by root and by `wpa` (uid 4242 from the host root's /etc/passwd): only
    // root can make them. Not root: skipped with the reason, a failure under CI=true.
    if !common::require(
        "root (to chown files to other users the test must run as root)",
        is_root(),
    ) {
        return;
    }
    let e = env().await;
    let token1: &[u8] = b"k3s-token-v1-9f8e7d6c5b4a";
    // Large enough that a non-atomic writer would be caught mid-write by the reader.
    let token2: Vec<u8> = (0..512 * 1024)
        .map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[i % 32])
        .collect();
    let psk: &[u8] = b"wifi-psk-correct-horse-battery";
    let psk2: &[u8] = b"wifi-psk-rotated-staple-42";
    let owner = "wpa:wpa";
    e.put_secret("k3s", &[("token", token1), ("ca", b"ca-v1")]).await;
    e.put_secret("wifi", &[("psk", psk), ("ssid", b"home")]).await;
    // A file the image put there, for a Secret that does not exist yet.
    std::fs::create_dir_all(e.file("/etc/nixroll-image")).unwrap();
    std::fs::write(e.file("/etc/nixroll-image/vpn.key"), "from-the-image").unwrap();
    e.apply_spec(json!([
        {"secretRef": {"name": "k3s", "key": "token"}, "path": "/var/lib/rancher/k3s/token",
         "restartUnits": ["k3s.service"]},
        {"secretRef": {"name": "k3s", "key": "ca"}, "path": "/var/lib/rancher/k3s/ca.crt", "mode": "0444"},
        {"secretRef": {"name": "wifi", "key": "psk"}, "path": "/etc/wpa/psk", "mode": "0440", "owner": owner},
        {"secretRef": {"name": "vpn", "key": "key"}, "path": "/etc/nixroll-image/vpn.key"},
    ]))
    .await;
    // Every process command line, sampled all through the run (not only at the end).
    let all_values: Vec<Vec<u8>> = [token1, &token2[..64], psk, psk2, b"vpn-private-key-0xdeadbeef"]
        .iter()
        .flat_map(|v| needles(v))
        .collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, all_values) = (sampling.clone(), all_values.clone());
        std::thread::spawn(move || {
            let (mut samples, mut hits) = (0usize, Vec::new());
            while sampling.load(Ordering::Relaxed) {
                for p in std::fs::read_dir("/proc").unwrap().flatten() {
                    if let Ok(c) = std::fs::read(p.path().join("cmdline"))
                        && all_values.iter().any(|n| contains(&c, n))
                    {
                        hits.push(String::from_utf8_lossy(&c).into_owned());
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (samples, hits)
        })
    };
    let agent_task = e.start_agent();

    // Created: content, mode, owner; status names files and sources, and what is missing.
    let agent = e
        .wait_agent("three files written, one missing", |a| {
            a["secrets"].as_array().is_some_and(|s| s.len() == 3)
                && a["secretsMissing"].as_array().is_some_and(|m| m.len() == 1)
        })
        .await;
    assert_eq!(
        std::fs::read(e.file("/var/lib/rancher/k3s/token")).unwrap(),
        token1
    );
    let m = std::fs::metadata(e.file("/var/lib/rancher/k3s/token")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o400, 0, 0));
    assert_eq!(std::fs::read(e.file("/etc/wpa/psk")).unwrap(), psk);
    let m = std::fs::metadata(e.file("/etc/wpa/psk")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o440);
    assert_eq!(
        (m.uid(), m.gid()),
        (4242, 4343),
        "owner wpa:wpa from the host's /etc/passwd"
    );
    let missing = &agent["secretsMissing"][0];
    assert_eq!(missing["path"], "/etc/nixroll-image/vpn.key");
    assert_eq!(missing["reason"], "SecretNotFound");
    assert!(missing["message"].as_str().unwrap().contains("vpn"), "{missing}");
    // The image's file stays as it is while its Secret is missing.
    assert_eq!(
        std::fs::read(e.file("/etc/nixroll-image/vpn.key")).unwrap(),
        b"from-the-image"
    );
    let s0 = &agent["secrets"][0];
    assert_eq!(s0["path"], "/etc/wpa/psk");
    assert_eq!(s0["secretRef"], json!({"name": "wifi", "key": "psk"}));
    assert!(s0["resourceVersion"].as_str().is_some() && s0["writtenAt"].as_str().is_some());
    assert_eq!(e.restarts(), vec!["try-restart k3s.service"]);

    // Rotate while a reader loops: it sees the old or the new content, never anything else.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads) = (stop.clone(), reads.clone());
        let p = e.file("/var/lib/rancher/k3s/token");
        let (old, new) = (token1.to_vec(), token2.clone());
        std::thread::spawn(move || {
            let mut bad = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let b = std::fs::read(&p).unwrap();
                if b != old && b != new {
                    bad += 1;
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            bad
        })
    };
    e.put_secret("k3s", &[("token", &token2), ("ca", b"ca-v1")]).await;
    e.wait_file("/var/lib/rancher/k3s/token", &token2).await;
    // ... and back and forth a few times.
    let mut last_rv = String::new();
    for v in [token1.to_vec(), token2.clone(), token1.to_vec(), token2.clone()] {
        last_rv = e.put_secret("k3s", &[("token", &v), ("ca", b"ca-v1")]).await;
        e.wait_file("/var/lib/rancher/k3s/token", &v).await;
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(reader.join().unwrap(), 0, "a reader saw a partial file");
    assert!(reads.load(Ordering::Relaxed) > 10, "the reader ran");
    let mut dir_entries: Vec<String> = std::fs::read_dir(e.file("/var/lib/rancher/k3s"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dir_entries.sort();
    assert_eq!(dir_entries, vec!["ca.crt", "token"], "no temporary file left");
    // One restart per change.
    let agent = e
        .wait_agent("last rotation reported", |a| {
            rv_of(a, "/var/lib/rancher/k3s/token").as_deref() == Some(last_rv.as_str())
        })
        .await;
    assert_eq!(e.restarts(), vec!["try-restart k3s.service"; 6]);
    let token_rv = rv_of(&agent, "/var/lib/rancher/k3s/token").unwrap();

    // Same data, new resourceVersion (a label, then another key of the same Secret): no write
    // of the token, no restart. The other key's file (no units) changing proves the agent has
    // processed both updates (one watch delivers them in order).
    let api: Api<Secret> = Api::namespaced(e.client.clone(), NS);
    let before = std::fs::metadata(e.file("/var/lib/rancher/k3s/token"))
        .unwrap()
        .ino();
    api.patch(
        "k3s",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .unwrap();
    let ca_rv = e.put_secret("k3s", &[("token", &token2), ("ca", b"ca-v2")]).await;
    e.wait_agent("ca rotated", |a| {
        rv_of(a, "/var/lib/rancher/k3s/ca.crt").as_deref() == Some(ca_rv.as_str())
    })
    .await;
    assert_eq!(
        std::fs::read(e.file("/var/lib/rancher/k3s/ca.crt")).unwrap(),
        b"ca-v2"
    );
    let wifi_rv = rv_of(&agent, "/etc/wpa/psk").unwrap();
    e.put_secret("wifi", &[("psk", psk2), ("ssid", b"home")]).await;
    let agent = e
        .wait_agent("psk rotated", |a| {
            rv_of(a, "/etc/wpa/psk").is_some_and(|r| r != wifi_rv)
        })
        .await;
    assert_eq!(std::fs::read(e.file("/etc/wpa/psk")).unwrap(), psk2);
    assert_eq!(
        std::fs::metadata(e.file("/var/lib/rancher/k3s/token"))
            .unwrap()
            .ino(),
        before,
        "same data: the file was not rewritten"
    );
    assert_eq!(rv_of(&agent, "/var/lib/rancher/k3s/token"), Some(token_rv));
    assert_eq!(e.restarts().len(), 6, "same data: no restart");

    // The missing Secret appears: written, no longer missing.
    let vpn: &[u8] = b"vpn-private-key-0xdeadbeef";
    e.put_secret("vpn", &[("key", vpn)]).await;
    e.wait_agent("vpn written", |a| a.get("secretsMissing").is_none())
        .await;
    assert_eq!(std::fs::read(e.file("/etc/nixroll-image/vpn.key")).unwrap(), vpn);

    // A key that vanishes: reported, the file stays.
    e.put_secret("wifi", &[("ssid", b"home")]).await;
    let agent = e
        .wait_agent("psk key missing", |a| {
            a["secretsMissing"].as_array().is_some_and(|m| !m.is_empty())
        })
        .await;
    assert_eq!(agent["secretsMissing"][0]["reason"], "KeyNotFound");
    assert_eq!(std::fs::read(e.file("/etc/wpa/psk")).unwrap(), psk2);

    // Removed from the list: files nixroll wrote are removed; the list shrinks.
    std::fs::write(e.file("/etc/wpa/not-ours"), "x").unwrap();
    e.apply_spec(json!([
        {"secretRef": {"name": "k3s", "key": "token"}, "path": "/var/lib/rancher/k3s/token",
         "restartUnits": ["k3s.service"]},
    ]))
    .await;
    e.wait_agent("three files removed", |a| {
        a["secrets"].as_array().is_some_and(|s| s.len() == 1) && a.get("secretsMissing").is_none()
    })
    .await;
    assert!(!e.file("/etc/wpa/psk").exists());
    assert!(!e.file("/var/lib/rancher/k3s/ca.crt").exists());
    assert!(!e.file("/etc/nixroll-image/vpn.key").exists());
    assert!(e.file("/etc/wpa/not-ours").exists());

    // A Secret deleted: reported missing, the file stays.
    api.delete("k3s", &DeleteParams::default()).await.unwrap();
    let agent = e
        .wait_agent("k3s missing", |a| {
            a["secretsMissing"].as_array().is_some_and(|m| !m.is_empty())
        })
        .await;
    assert_eq!(agent["secretsMissing"][0]["reason"], "SecretNotFound");
    assert!(e.file("/var/lib/rancher/k3s/token").exists());

    // Leak scan: logs, Events, every object's status, the host state file, command lines.
    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    haystacks.push(("logs".into(), logs().0.lock().unwrap().clone()));
    let events: Api<Event> = Api::all(e.client.clone());
    haystacks.push((
        "events".into(),
        serde_json::to_vec(&events.list(&Default::default()).await.unwrap()).unwrap(),
    ));
    haystacks.push(("nixosnode".into(), serde_json::to_vec(&e.node().await).unwrap()));
    haystacks.push((
        "state.json".into(),
        std::fs::read(e.file("/var/lib/nixroll/state.json")).unwrap(),
    ));
    haystacks.push((
        "systemctl log".into(),
        std::fs::read(e.file(SYSTEMCTL_LOG)).unwrap(),
    ));
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
            haystacks.push((format!("{}/cmdline", p.path().display()), c));
        }
    }
    sampling.store(false, Ordering::Relaxed);
    let (samples, hits) = sampler.join().unwrap();
    assert!(samples > 5, "command lines were sampled during the run");
    assert!(
        hits.is_empty(),
        "a command line carried a secret: {} hit(s)",
        hits.len()
    );
    assert!(logs().0.lock().unwrap().len() > 1000, "logs were captured");
    // Positive controls: the scan finds what is there (the Secret object holds the base64,
    // the logs hold the paths, this process's command line is readable).
    let vpn_secret = serde_json::to_vec(&api.get("vpn").await.unwrap()).unwrap();
    assert!(contains(&vpn_secret, &needles(vpn)[1]));
    assert!(contains(&haystacks[0].1, b"/etc/nixroll-image/vpn.key"));
    let own = format!("/proc/{}/cmdline", std::process::id());
    assert!(
        haystacks
            .iter()
            .any(|(w, h)| *w == own && contains(h, b"secrets"))
    );
    for value in [token1, &token2[..64], psk, psk2, vpn] {
        for needle in needles(value) {
            for (what, hay) in &haystacks {
                assert!(
                    !contains(hay, &needle),
                    "{what} contains a secret (or its encoding or hash): {}",
                    String::from_utf8_lossy(&needle[..needle.len().min(16)])
                );
            }
        }
    }
    // Least privilege in practice: the agent read Secrets only with get and watch (by name),
    // never list; and touched nothing but its NixOSNode and Secrets.
    let counts = e.agents_api.request_counts();
    let on_secrets: Vec<&(String, String)> = counts.counts.keys().filter(|(_, r)| r == "secrets").collect();
    assert!(
        counts.get("get", "secrets") > 0 && counts.get("watch", "secrets") > 0,
        "{counts:?}"
    );
    assert!(
        on_secrets.iter().all(|(v, _)| v == "get" || v == "watch"),
        "{on_secrets:?}"
    );
    assert!(
        counts
            .counts
            .keys()
            .all(|(_, r)| r == "secrets" || r.starts_with("nixosnodes.nixroll.io")),
        "{counts:?}"
    );
    agent_task.abort();
}

/// An agent killed mid-write (a temporary file with half the new content) and restarted: the
/// file holds the old content until the new one is complete, and no temporary file remains.
#[tokio::test]
async fn an_agent_killed_mid_write_leaves_the_old_or_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let host: Arc<dyn Host> = Arc::new(HostRoot::new(dir.path(), RebootHook::None));
    let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
    let spec = vec![SecretFile {
        restart_units: vec!["svc.service".into()],
        ..secret_file("s", "k", "/run/keys/token")
    }];
    let view = |rv: &str, v: &[u8]| -> SecretsView {
        [(
            "s".to_string(),
            Fetched::Found {
                resource_version: rv.into(),
                data: [("k".to_string(), v.to_vec())].into(),
            },
        )]
        .into()
    };
    let file = dir.path().join("run/keys/token");
    let keys = dir.path().join("run/keys");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    let mut a = NodeAgent::new(host.clone(), nix.clone(), HostOptions::default());
    a.sync_secrets(&spec, &view("1", b"old-value")).await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"old-value");
    assert!(!a.secrets_blocked());

    // Killed halfway through writing the new value.
    let mut a = NodeAgent::new(host.clone(), nix.clone(), HostOptions::default())
        .crash_secret_write(WriteCrash::MidWrite);
    assert!(
        a.sync_secrets(&spec, &view("2", b"new-value-longer"))
            .await
            .is_err()
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"old-value", "old file intact");
    assert_eq!(
        names(&keys).len(),
        2,
        "a temporary file was left: {:?}",
        names(&keys)
    );
    drop(a);

    // Restarted: the temporary file is gone, the new content is complete.
    let mut a = NodeAgent::new(host.clone(), nix.clone(), HostOptions::default());
    a.sync_secrets(&spec, &view("2", b"new-value-longer"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"new-value-longer");
    assert_eq!(names(&keys), vec!["token"]);
    let st = a.observe().unwrap();
    assert!(st.secrets_missing.is_empty());
    assert_eq!(st.secrets[0].resource_version, "2");
    // The restart recorded before the crashed write ran with the next successful one, once.
    let log = std::fs::read_to_string(dir.path().join(SYSTEMCTL_LOG.trim_start_matches('/'))).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec!["try-restart svc.service"; 2]
    );

    // Nothing changed: nothing written, nothing restarted.
    a.sync_secrets(&spec, &view("3", b"new-value-longer"))
        .await
        .unwrap();
    let log2 = std::fs::read_to_string(dir.path().join(SYSTEMCTL_LOG.trim_start_matches('/'))).unwrap();
    assert_eq!(log2, log);

    // A parent directory that is an absolute symlink on the host is followed inside the
    // host (as NixOS links /etc into the store), not in the agent's own filesystem.
    std::fs::create_dir_all(dir.path().join("etc/static/ssh")).unwrap();
    std::os::unix::fs::symlink("/etc/static/ssh", dir.path().join("etc/ssh")).unwrap();
    let mut linked = spec.clone();
    linked[0].path = "/etc/ssh/new/host_key".into();
    linked[0].restart_units.clear();
    a.sync_secrets(&linked, &view("3", b"new-value-longer"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("etc/static/ssh/new/host_key")).unwrap(),
        b"new-value-longer"
    );
    assert!(!file.exists(), "the old path left the list and was removed");
    a.sync_secrets(&spec, &view("3", b"new-value-longer"))
        .await
        .unwrap();

    // Too large and unknown owner: clear errors, file untouched.
    let big = vec![b'x'; 1024 * 1024 + 1];
    a.sync_secrets(&spec, &view("4", &big)).await.unwrap();
    let st = a.observe().unwrap();
    assert_eq!(st.secrets_missing[0].reason, "TooLarge");
    assert!(
        st.secrets_missing[0].message.contains("1048577"),
        "{}",
        st.secrets_missing[0].message
    );
    let mut spec2 = spec.clone();
    spec2[0].owner = "nosuchuser:root".into();
    a.sync_secrets(&spec2, &view("5", b"v5")).await.unwrap();
    let st = a.observe().unwrap();
    assert_eq!(st.secrets_missing[0].reason, "UnknownOwner");
    assert!(st.secrets_missing[0].message.contains("nosuchuser"));
    assert_eq!(std::fs::read(&file).unwrap(), b"new-value-longer");
}

/// The whole system (embedded API, real controller, real agents, simulated hosts): a node
/// whose Secret is missing is not admitted (condition SecretsMissing names it) while the others
/// roll out; creating the Secret writes the file and the node follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_blocks_activation_until_it_is_created() {
    use nixroll::api::Phase;
    use nixroll::sim::cluster::Timing;
    use nixroll::sim::world::{NixMode, World, WorldOptions};

    let opts = WorldOptions {
        nodes: 2,
        control_planes: 0,
        nix: NixMode::Simulated,
        timing: Timing {
            pod_termination: Duration::from_millis(50),
            pod_startup: Duration::from_millis(100),
            reboot: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
        },
        pods_per_node: 1,
        apps: None,
    };
    let mut world = World::start(opts).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let mut config = nixroll::controller::ControllerConfig::new(&format!("test-{}", fastrand::u32(..)));
    config.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
    let controller = world.start_controller(config).await.unwrap();
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    type Pred = Box<dyn Fn(&[NixOSNode]) -> bool + Send>;
    let wait = |what: &'static str, pred: Pred| {
        let api = api.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let list = api.list(&Default::default()).await.unwrap().items;
                if pred(&list) {
                    return list;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for {what}: {:#?}",
                    list.iter().map(|o| &o.status).collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let on = |rev: String| {
        move |l: &[NixOSNode]| {
            l.len() == 2
                && l.iter().all(|o| {
                    o.status.as_ref().is_some_and(|s| {
                        s.phase == Some(Phase::UpToDate) && s.revision.as_deref() == Some(rev.as_str())
                    })
                })
        }
    };
    wait("adoption", Box::new(on(first.clone()))).await;

    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    let mut spec2 = world.spec(&next);
    spec2.secrets = vec![secret_file("node-2-token", "token", "/var/lib/secrets/token")];
    world.apply("node-1", &world.spec(&next)).await.unwrap();
    world.apply("node-2", &spec2).await.unwrap();

    // node-1 rolls out; node-2 stays on the first revision, blocked, and says why.
    let next_c = next.clone();
    let first_c = first.clone();
    wait(
        "node-1 updated, node-2 blocked by its missing Secret",
        Box::new(move |l: &[NixOSNode]| {
            let by = |n: &str| {
                l.iter()
                    .find(|o| o.metadata.name.as_deref() == Some(n))
                    .and_then(|o| o.status.clone())
            };
            let (Some(a), Some(b)) = (by("node-1"), by("node-2")) else {
                return false;
            };
            a.phase == Some(Phase::UpToDate)
                && a.revision.as_deref() == Some(next_c.as_str())
                && b.phase == Some(Phase::Waiting)
                && b.revision.as_deref() == Some(first_c.as_str())
                && b.conditions.iter().any(|c| {
                    c.type_ == "SecretsMissing"
                        && c.status == "True"
                        && c.message.contains("node-2-token")
                        && c.message.contains("/var/lib/secrets/token")
                })
        }),
    )
    .await;
    // A negative check needs a window: the slot has been free since node-1 finished.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n2 = api.get("node-2").await.unwrap().status.unwrap();
    assert_eq!(n2.phase, Some(Phase::Waiting), "{:?}", n2.message);
    assert!(n2.activation.is_none() && n2.slot.is_none());
    let host2 = world.node("node-2").unwrap().host.clone();
    assert_eq!(host2.reboot_count(), 0, "node-2 was not activated");
    let file = host2.root().join("var/lib/secrets/token");
    assert!(!file.exists());

    // The Secret appears: the file is written and node-2 follows.
    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), NS);
    let mut s = Secret::default();
    s.metadata.name = Some("node-2-token".into());
    s.data = Some([("token".to_string(), k8s_openapi::ByteString(b"tok-2".to_vec()))].into());
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let done = wait("node-2 updated", Box::new(on(next.clone()))).await;
    assert_eq!(std::fs::read(&file).unwrap(), b"tok-2");
    assert_eq!(host2.reboot_count(), 1);
    let st = done
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some("node-2"))
        .and_then(|o| o.status.clone())
        .unwrap();
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "SecretsMissing")
        .unwrap();
    assert_eq!(c.status, "False");
    // A warning Event said why; no Event or status carries the value, its base64 or hash.
    let events: Api<Event> = Api::all(world.client.clone());
    let events = events.list(&Default::default()).await.unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|ev| ev.reason.as_deref() == Some("SecretsMissing")
                && ev.message.as_deref().is_some_and(|m| m.contains("node-2-token"))),
        "no SecretsMissing Event"
    );
    let hay = [
        serde_json::to_vec(&events).unwrap(),
        serde_json::to_vec(&api.list(&Default::default()).await.unwrap()).unwrap(),
    ];
    for needle in needles(b"tok-2") {
        assert!(hay.iter().all(|h| !contains(h, &needle)));
    }
    controller.stop().await;
}

/// Least privilege in the install manifests: the agent may `get` and `watch` Secrets only in
/// nixroll-system (a namespaced Role, never `list`, nothing cluster-wide); the controller may
/// only `get` the Secrets FlakeSources name (by name), no other.
#[test]
fn rbac_gives_the_agent_get_and_watch_on_secrets_in_nixroll_system_only() {
    let read = |f: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(format!("{}/deploy/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_saphyr::from_multiple(&text).unwrap()
    };
    let agent = read("agent-rbac.yaml");
    let grants_secrets = |d: &Value| {
        d["rules"].as_array().into_iter().flatten().any(|r| {
            r["resources"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|x| x == "secrets"))
        })
    };
    let roles: Vec<&Value> = agent.iter().filter(|d| grants_secrets(d)).collect();
    assert_eq!(roles.len(), 1, "one rule set grants the agent Secrets");
    assert_eq!(roles[0]["kind"], "Role");
    assert_eq!(roles[0]["metadata"]["namespace"], NS);
    let verbs = &roles[0]["rules"][0]["verbs"];
    assert_eq!(verbs, &json!(["get", "watch"]));
    let binding = agent
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["roleRef"]["name"] == roles[0]["metadata"]["name"])
        .unwrap();
    assert_eq!(binding["subjects"][0]["name"], "nixroll-agent");
    // The controller reads no node secret: only `get` on the Secrets FlakeSources name
    // (issue 14), limited by name, in nixroll-system.
    for d in read("controller-rbac.yaml") {
        if !grants_secrets(&d) {
            continue;
        }
        assert_eq!(d["kind"], "Role", "{d}");
        assert_eq!(d["metadata"]["namespace"], NS, "{d}");
        for r in d["rules"].as_array().unwrap() {
            if r["resources"].as_array().unwrap().iter().any(|x| x == "secrets") {
                assert_eq!(r["verbs"], json!(["get"]), "{d}");
                assert!(
                    r["resourceNames"].as_array().is_some_and(|n| !n.is_empty()),
                    "the controller's Secret access must be limited by name: {d}"
                );
            }
        }
    }
}

/// The agent's own safety net: a Switch grant that arrives while a secret file is missing is
/// not executed; once the Secret is there the file is written first, then the grant runs.
#[tokio::test]
async fn the_agent_does_not_activate_while_a_secret_file_is_missing() {
    use common::host::{SimNixHost, grant, stage};
    use nixroll::api::{ActivationAction, ActivationState, Target};
    use nixroll::sim::flake::SystemSpec;

    let h = SimNixHost::new();
    let (sim, simnix) = (&h.sim, &h.simnix);
    let target = |rev: &str| Target {
        revision: rev.into(),
        installable: nixroll::api::installable("git+https://example.org/infra.git", rev, "n1"),
        system: None,
        build: None,
    };
    let (r0, r1) = ("a".repeat(40), "b".repeat(40));
    simnix.publish(&target(&r0).installable, SystemSpec::default());
    simnix.publish(
        &target(&r1).installable,
        SystemSpec {
            service: "svc-2".into(),
            ..SystemSpec::default()
        },
    );
    let mut a = h.agent();
    let sys0 = stage(&mut a, &target(&r0)).await;
    sim.install(&sys0).unwrap();
    let sys1 = stage(&mut a, &target(&r1)).await;

    let spec = vec![secret_file("s", "k", "/run/keys/token")];
    let grant = grant("g1", ActivationAction::Switch, &sys1);
    let missing: SecretsView = [("s".to_string(), Fetched::NotFound)].into();
    a.sync_secrets(&spec, &missing).await.unwrap();
    let st = a.reconcile(Some(&target(&r1)), Some(&grant)).await.unwrap();
    assert!(st.activation.is_none(), "{:?}", st.activation);
    assert_eq!(st.current_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(st.secrets_missing[0].reason, "SecretNotFound");

    let present: SecretsView = [(
        "s".to_string(),
        Fetched::Found {
            resource_version: "9".into(),
            data: [("k".to_string(), b"v".to_vec())].into(),
        },
    )]
    .into();
    a.sync_secrets(&spec, &present).await.unwrap();
    let st = a.reconcile(Some(&target(&r1)), Some(&grant)).await.unwrap();
    assert_eq!(st.activation.unwrap().state, ActivationState::Switched);
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(std::fs::read(sim.root().join("run/keys/token")).unwrap(), b"v");
}

/// The real binary (`nixroll agent --host-root`) killed with SIGKILL at random moments while
/// a 1,000,000-byte Secret is rotated: after every kill the file holds the old or the new value
/// in full; restarted, the agent removes the temporary files and writes the newest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_killed_during_rotations_leaves_old_or_new_and_cleans_up() {
    let e = env().await;
    let kubeconfig = e.root.parent().unwrap().join("kubeconfig");
    e.api.write_kubeconfig(&kubeconfig).unwrap();
    let log = e.root.parent().unwrap().join("agent.log");
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nixroll"))
            .args(["agent", "--node", NODE, "--offline", "--host-root"])
            .arg(&e.root)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let values: Vec<Vec<u8>> = (0..2u8)
        .map(|i| {
            (0..1_000_000usize)
                .map(|j| b'a' + ((j + i as usize * 7) % 26) as u8)
                .collect()
        })
        .collect();
    e.put_secret("big", &[("v", &values[0])]).await;
    e.apply_spec(json!([{"secretRef": {"name": "big", "key": "v"}, "path": "/var/lib/big/value"}]))
        .await;
    let dir = e.file("/var/lib/big");
    let temps = || {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|x| x.file_name().to_string_lossy().starts_with(".nixroll-tmp."))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut current = 0usize;
    let mut killed_mid_write = 0;
    for round in 0..8 {
        let mut agent = spawn();
        e.wait_file("/var/lib/big/value", &values[current]).await;
        assert_eq!(
            temps(),
            0,
            "round {round}: the restarted agent removed temporary files"
        );
        // Check the command line of the live agent too.
        let pid = agent.id().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!contains(&cmdline, &values[current][..32]));
        let next = 1 - current;
        e.put_secret("big", &[("v", &values[next])]).await;
        if round % 2 == 0 {
            // Kill as soon as the temporary file shows up (mid-write), or after 2 s.
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while temps() == 0 && std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        } else {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..20_000))).await;
        }
        agent.start_kill().unwrap();
        agent.wait().await.unwrap();
        let now = std::fs::read(e.file("/var/lib/big/value")).unwrap();
        assert!(
            now == values[current] || now == values[next],
            "round {round}: a partial file ({} bytes) after SIGKILL",
            now.len()
        );
        if temps() > 0 {
            killed_mid_write += 1;
        }
        current = next;
    }
    let mut agent = spawn();
    e.wait_file("/var/lib/big/value", &values[current]).await;
    assert_eq!(temps(), 0);
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    eprintln!("kills that left a temporary file: {killed_mid_write} of 8");
    assert!(
        killed_mid_write > 0,
        "no kill landed mid-write: the cleanup was not exercised"
    );
    let log = std::fs::read(&log).unwrap();
    assert!(
        contains(&log, b"wrote secret file"),
        "the agent logged its writes"
    );
    for v in &values {
        for n in needles(&v[..64]) {
            assert!(!contains(&log, &n), "the agent's log holds secret bytes");
        }
    }
}

/// The agent checks `spec.secrets[].path` itself (an old CRD or another API server may not
/// have): nothing anywhere under /nix, also not through a symlinked parent (NixOS links much of
/// /etc into the store), and no `..`. Each is reported as `InvalidPath`, and nothing is written.
#[tokio::test]
async fn the_agent_refuses_paths_in_nix_itself() {
    let dir = tempfile::tempdir().unwrap();
    let host: Arc<dyn Host> = Arc::new(HostRoot::new(dir.path(), RebootHook::None));
    let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
    let view: SecretsView = [(
        "s".to_string(),
        Fetched::Found {
            resource_version: "1".into(),
            data: [("k".to_string(), b"in-nix-value".to_vec())].into(),
        },
    )]
    .into();
    std::fs::create_dir_all(dir.path().join("nix/var/nix")).unwrap();
    std::fs::create_dir_all(dir.path().join("nix/store/abc-etc/etc")).unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("/nix/store/abc-etc/etc", dir.path().join("etc/static")).unwrap();
    let mut a = NodeAgent::new(host.clone(), nix.clone(), HostOptions::default());
    for path in [
        "/nix/var/nix/token",
        "/nix/store/abc-secret",
        "//nix/var/x",
        "/etc/static/token",
        "/etc/../nix/var/x",
    ] {
        let spec = vec![secret_file("s", "k", path)];
        a.sync_secrets(&spec, &view).await.unwrap();
        let st = a.observe().unwrap();
        assert_eq!(
            st.secrets_missing.len(),
            1,
            "{path} accepted: {:?} {:?}",
            st.secrets_missing,
            st.secrets
        );
        assert_eq!(st.secrets_missing[0].reason, "InvalidPath", "{path}");
        assert!(
            st.secrets_missing[0].message.contains("/nix"),
            "{}",
            st.secrets_missing[0].message
        );
    }
    let written = std::process::Command::new("grep")
        .args(["-rl", "in-nix-value"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        written.stdout.is_empty(),
        "written: {}",
        String::from_utf8_lossy(&written.stdout)
    );
    // A path outside /nix is still written.
    a.sync_secrets(&[secret_file("s", "k", "/nixos/token")], &view)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("nixos/token")).unwrap(),
        b"in-nix-value"
    );
}
