//! A real Kubernetes control plane on this machine: etcd, kube-apiserver and (optionally)
//! kube-controller-manager, started from a directory of binaries in the envtest convention
//! (`KUBEBUILDER_ASSETS`: `kube-apiserver`, `kube-controller-manager`, and `etcd` unless it is
//! on `PATH`). The real-API tests and `nixroll bench --kube-assets` use it; the demo and the
//! fast tests keep the embedded API.
//!
//! Everything listens on free ports of 127.0.0.1 and lives in one temporary directory: an
//! ECDSA service-account signing key made with `ring`, a static admin token in
//! `system:masters`, the API server's self-signed serving certificate (`--cert-dir`), and an
//! audit log of every request at `Metadata` level (who did which verb on which resource, and
//! the answer's code) — what the RBAC check reads.
//!
//! Each process runs under a small `sh` guard that holds the read end of a pipe whose write end
//! is this process's: when this process exits, however it exits, the guard kills its child
//! and the last guard removes the directory. So a control plane kept for a whole test binary
//! (in a `static`) never outlives it.

use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The environment variable naming the directory of binaries (envtest's).
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";

const ADMIN_TOKEN_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{what} not found: {path} (unpack ../shared/kube/*.xz there, see docs/testing.md)")]
    MissingBinary { what: &'static str, path: PathBuf },
    #[error("etcd is neither in {assets} nor on PATH (apt-get install etcd-server)")]
    NoEtcd { assets: PathBuf },
    #[error("{operation}: {source}")]
    Io {
        operation: String,
        #[source]
        source: std::io::Error,
    },
    #[error("making the service-account signing key failed")]
    Key,
    #[error("{what} did not become ready within {secs} s; the end of its log ({log}):\n{tail}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("{operation}: {source}")]
    Kube {
        operation: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("the token request for {namespace}/{name} returned no token")]
    NoToken { namespace: String, name: String },
}

fn io(operation: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let operation = operation.into();
    move |source| ControlPlaneError::Io { operation, source }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// The directory of binaries.
    pub assets: PathBuf,
    /// Also run kube-controller-manager with the controllers the simulated cluster needs from a
    /// real one: PodDisruptionBudget status (`disruption`), garbage collection, namespace
    /// deletion and each namespace's `default` ServiceAccount. Not the ReplicaSet, DaemonSet
    /// or node-lifecycle controllers: the simulated cluster plays those (and the kubelets).
    pub controller_manager: bool,
}

/// A running control plane; dropping it stops every process and removes its directory.
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    dir: PathBuf,
    admin_token: String,
    /// The write ends of the guards' pipes: dropped, they end the processes.
    guards: Vec<ChildStdin>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A free TCP port of 127.0.0.1 (bound and released; the window to a reuse is tiny).
fn free_port() -> Result<u16, ControlPlaneError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("find a free port"))?;
    Ok(l.local_addr().map_err(io("find a free port"))?.port())
}

/// Start `program args…` under a guard (see the module docs), its output to `log`. `cleanup`:
/// a directory the guard removes after its child ended.
fn spawn_guarded(
    program: &Path,
    args: &[String],
    log: &Path,
    cleanup: Option<&Path>,
) -> Result<ChildStdin, ControlPlaneError> {
    const GUARD: &str = r#"log="$1"; clean="$2"; shift 2
"$@" >"$log" 2>&1 </dev/null &
child=$!
read -r _ || true
kill "$child" 2>/dev/null
wait "$child" 2>/dev/null
if [ -n "$clean" ]; then sleep 1; rm -rf "$clean"; fi
"#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(GUARD)
        .arg("nixroll-guard")
        .arg(log)
        .arg(cleanup.map(Path::as_os_str).unwrap_or_default())
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(io(format!("start {}", program.display())))?;
    // The guard is reaped by nobody: it ends with this process (its pipe closes then).
    child.stdin.take().ok_or_else(|| ControlPlaneError::Io {
        operation: format!("start {}", program.display()),
        source: std::io::Error::other("no stdin pipe"),
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo (algorithm id-ecPublicKey with the curve
/// prime256v1, then the BIT STRING header) before the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// An ECDSA P-256 key made with ring: the private key as PKCS#8 PEM (kube-apiserver signs
/// service-account tokens with it, kube-controller-manager too) and the public key as
/// SubjectPublicKeyInfo PEM (the API server verifies tokens with it).
fn signing_key_pems() -> Result<(String, String), ControlPlaneError> {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| ControlPlaneError::Key)?;
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng)
        .map_err(|_| ControlPlaneError::Key)?;
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    Ok((pem("PRIVATE KEY", doc.as_ref()), pem("PUBLIC KEY", &spki)))
}

fn random_token() -> Result<String, ControlPlaneError> {
    let mut bytes = [0u8; ADMIN_TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ControlPlaneError::Key)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A kubeconfig for `url` with a bearer token (the serving certificate is self-signed, so TLS
/// verification is off: this is a throw-away server on loopback).
fn kubeconfig_text(url: &str, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: real\n  context:\n    cluster: real\n    user: {user}\ncurrent-context: real\n"
    )
}

async fn wait_until<F, Fut>(
    what: &'static str,
    log: &Path,
    limit: Duration,
    mut ready: F,
) -> Result<(), ControlPlaneError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ControlPlaneError::NotReady {
        what,
        secs: limit.as_secs(),
        log: log.to_path_buf(),
        tail: tail(log),
    })
}

impl ControlPlane {
    /// The assets directory from [`ASSETS_ENV`], or `fallback` when that is unset and
    /// `fallback` holds a `kube-apiserver`.
    pub fn assets_dir(fallback: &Path) -> Option<PathBuf> {
        match std::env::var_os(ASSETS_ENV) {
            Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
            _ => fallback
                .join("kube-apiserver")
                .is_file()
                .then(|| fallback.to_path_buf()),
        }
    }

    /// Start etcd and kube-apiserver (and kube-controller-manager when asked) and wait until
    /// they serve (bounded: 60 s for the API server, 30 s for the controller manager).
    pub async fn start(opts: &ControlPlaneOptions) -> Result<ControlPlane, ControlPlaneError> {
        let apiserver = opts.assets.join("kube-apiserver");
        if !apiserver.is_file() {
            return Err(ControlPlaneError::MissingBinary {
                what: "kube-apiserver",
                path: apiserver,
            });
        }
        let kcm = opts.assets.join("kube-controller-manager");
        if opts.controller_manager && !kcm.is_file() {
            return Err(ControlPlaneError::MissingBinary {
                what: "kube-controller-manager",
                path: kcm,
            });
        }
        let etcd = [opts.assets.join("etcd"), PathBuf::from("/usr/bin/etcd")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| ControlPlaneError::NoEtcd {
                assets: opts.assets.clone(),
            })?;

        let dir = tempfile::Builder::new()
            .prefix("nixroll-kube-")
            .tempdir()
            .map_err(io("make the control plane's directory"))?
            .keep();
        let mut guards = Vec::new();
        // The directory's own guard: removes it when this process ends.
        guards.push(spawn_guarded(
            Path::new("true"),
            &[],
            &dir.join("guard.log"),
            Some(&dir),
        )?);

        let key = dir.join("sa.key");
        let public = dir.join("sa.pub");
        let (private_pem, public_pem) = signing_key_pems()?;
        std::fs::write(&key, private_pem).map_err(io("write the signing key"))?;
        std::fs::write(&public, public_pem).map_err(io("write the signing key"))?;
        let admin_token = random_token()?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},admin,admin,\"system:masters\"\n"),
        )
        .map_err(io("write the token file"))?;
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .map_err(io("write the audit policy"))?;

        let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_log = dir.join("etcd.log");
        guards.push(spawn_guarded(
            &etcd,
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{client_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &etcd_log,
            None,
        )?);
        let api_log = dir.join("kube-apiserver.log");
        let url = format!("https://127.0.0.1:{api_port}");
        guards.push(spawn_guarded(
            &apiserver,
            &[
                format!("--etcd-servers=http://127.0.0.1:{client_port}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", public.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                format!("--cert-dir={}", dir.join("certs").display()),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // As k3s and kubeadm clusters run it: the agent DaemonSet is privileged.
                "--allow-privileged=true".into(),
                format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                format!("--audit-policy-file={}", dir.join("audit-policy.yaml").display()),
                format!("--audit-log-path={}", dir.join("audit.log").display()),
                "--audit-log-mode=blocking".into(),
                "--audit-log-format=json".into(),
            ],
            &api_log,
            None,
        )?);
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(&admin_kubeconfig, kubeconfig_text(&url, "admin", &admin_token))
            .map_err(io("write the admin kubeconfig"))?;

        let plane = ControlPlane {
            url,
            dir,
            admin_token,
            guards,
        };
        let client = plane.admin_client().await?;
        wait_until("kube-apiserver", &api_log, Duration::from_secs(60), || {
            let client = client.clone();
            // Refused connections and 500s are expected until the server is up: kept out of
            // the log (kube's client logs every failed request as an error).
            use tracing::instrument::WithSubscriber;
            async move {
                let req = http::Request::get("/readyz").body(Vec::new());
                match req {
                    Ok(req) => client.request_text(req).await.is_ok_and(|t| t.trim() == "ok"),
                    Err(_) => false,
                }
            }
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
        })
        .await?;

        let mut plane = plane;
        if opts.controller_manager {
            let kcm_log = plane.dir.join("kube-controller-manager.log");
            let guard = spawn_guarded(
                &kcm,
                &[
                    format!("--kubeconfig={}", admin_kubeconfig.display()),
                    format!("--service-account-private-key-file={}", key.display()),
                    format!("--root-ca-file={}", plane.dir.join("certs/apiserver.crt").display()),
                    "--controllers=disruption-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,root-ca-certificate-publisher-controller".into(),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                ],
                &kcm_log,
                None,
            )?;
            plane.guards.push(guard);
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            wait_until(
                "kube-controller-manager",
                &kcm_log,
                Duration::from_secs(30),
                || {
                    let sas = sas.clone();
                    async move { sas.get_opt("default").await.is_ok_and(|s| s.is_some()) }
                },
            )
            .await?;
        }
        Ok(plane)
    }

    /// The control plane's directory (logs, audit log, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The audit log (JSON lines, one per request, `Metadata` level).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// The admin's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A client configuration with `token`.
    pub async fn config_with_token(&self, user: &str, token: &str) -> Result<Config, ControlPlaneError> {
        let kc = Kubeconfig::from_yaml(&kubeconfig_text(&self.url, user, token))?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    /// The admin's client configuration.
    pub async fn admin_config(&self) -> Result<Config, ControlPlaneError> {
        self.config_with_token("admin", &self.admin_token).await
    }

    /// A client as the admin.
    pub async fn admin_client(&self) -> Result<Client, ControlPlaneError> {
        let config = self.admin_config().await?;
        crate::connect::kube_client(config).map_err(|source| ControlPlaneError::Kube {
            operation: "build the admin client".into(),
            source,
        })
    }

    /// A token of ServiceAccount `namespace/name` (TokenRequest, one hour), bound to the Pod
    /// `(name, uid)` (in `namespace`) when given: the API server then puts the pod's node in the token's user
    /// info (`authentication.kubernetes.io/node-name`), as for a real DaemonSet pod.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<String, ControlPlaneError> {
        let client = self.admin_client().await?;
        let mut spec = serde_json::json!({"expirationSeconds": 3600});
        if let Some((pod_name, pod_uid)) = pod {
            spec["boundObjectRef"] =
                serde_json::json!({"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid});
        }
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec
        }))
        .map_err(|e| ControlPlaneError::Kube {
            operation: "build a token request".into(),
            source: kube::Error::SerdeError(e),
        })?;
        let sas: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let answer = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|source| ControlPlaneError::Kube {
                operation: format!("request a token for {namespace}/{name}"),
                source,
            })?;
        answer
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ControlPlaneError::NoToken {
                namespace: namespace.into(),
                name: name.into(),
            })
    }

    /// What a benchmark needs installed, without `kubectl` or deploy/: the NixOSNode and
    /// FlakeSource CRDs (waited for until Established, bounded), the `nixroll-system`
    /// namespace and the agent's ServiceAccount (the simulated agent pods name it). No RBAC
    /// and no admission policy: use it with [`ControlPlane::admin_identities`].
    pub async fn install_for_bench(&self) -> Result<(), ControlPlaneError> {
        use k8s_openapi::api::core::v1::Namespace;
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let client = self.admin_client().await?;
        let kube_err = |operation: &str| {
            let operation = operation.to_owned();
            move |source| ControlPlaneError::Kube { operation, source }
        };
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut names = Vec::new();
        for crd in [
            crate::api::crd(),
            crate::api::flakesource_crd(),
            crate::api::nixospool_crd(),
        ] {
            names.push(crd.metadata.name.clone().unwrap_or_default());
            crds.create(&PostParams::default(), &crd)
                .await
                .map_err(kube_err("create a CRD"))?;
        }
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": crate::names::NAMESPACE}
        }))
        .map_err(|e| kube_err("build the namespace")(kube::Error::SerdeError(e)))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .map_err(kube_err("create the namespace"))?;
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": crate::names::AGENT_SERVICE_ACCOUNT, "namespace": crate::names::NAMESPACE}
        }))
        .map_err(|e| kube_err("build the ServiceAccount")(kube::Error::SerdeError(e)))?;
        Api::<ServiceAccount>::namespaced(client.clone(), crate::names::NAMESPACE)
            .create(&PostParams::default(), &sa)
            .await
            .map_err(kube_err("create the agent's ServiceAccount"))?;
        let log = self.dir.join("kube-apiserver.log");
        wait_until("the CRDs (Established)", &log, Duration::from_secs(30), || {
            let (crds, names) = (crds.clone(), names.clone());
            async move {
                for name in &names {
                    let established = crds.get(name).await.ok().and_then(|c| c.status).is_some_and(|s| {
                        s.conditions
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                    if !established {
                        return false;
                    }
                }
                true
            }
        })
        .await
    }

    /// Every part of the simulated cluster as the admin (`system:masters`): the controller,
    /// each agent and the simulation. Fine for a benchmark, not for checking RBAC or the
    /// agent's admission policy (the real-API tests use ServiceAccount tokens for that).
    pub async fn admin_identities(&self) -> Result<crate::sim::world::ExternalApi, ControlPlaneError> {
        let admin = self.admin_config().await?;
        let for_agents = admin.clone();
        let agent: crate::sim::world::AgentConfigFor = std::sync::Arc::new(move |_node: String| {
            let config = for_agents.clone();
            Box::pin(async move { Ok(config) })
        });
        Ok(crate::sim::world::ExternalApi {
            admin: admin.clone(),
            controller: admin,
            agent,
            kubeconfig: self.admin_kubeconfig(),
        })
    }

    /// Write a kubeconfig for `user` with `token` into the control plane's directory.
    pub fn write_kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf, ControlPlaneError> {
        let path = self
            .dir
            .join(format!("{user}.kubeconfig").replace([':', '/'], "_"));
        std::fs::write(&path, kubeconfig_text(&self.url, user, token)).map_err(io("write a kubeconfig"))?;
        Ok(path)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing the pipes ends the guards, which stop their processes and remove the directory.
        self.guards.clear();
    }
}
