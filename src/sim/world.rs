//! A whole simulated cluster on one machine: the embedded API server, N simulated NixOS hosts
//! each with a REAL agent (`crate::agent::run` over a `--host-root` backend), simulated
//! kubelets and workloads with PodDisruptionBudgets, and any number of REAL controller
//! replicas (`crate::controller::run`). `nixroll demo` and the end-to-end tests build on it.
//!
//! A host "reboot" (the agent calls its reboot hook) kills that node's agent like a real
//! reboot kills the agent pod, turns the Node NotReady, runs the simulated bootloader
//! ([`SimHost::reboot`]), reports the new boot id with Ready, and starts a fresh agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agent::host::{Host, HostRoot, RebootHook};
use crate::api::{NixOSNode, NixOSNodeSpec};
use crate::controller::ControllerConfig;
use crate::nix::{Nix, NixCli};
use crate::sim::cluster::{App, SimCluster, Timing};
use crate::sim::flake::{FlakeError, SystemSpec, TestFlake};
use crate::sim::host::{HoldPoint, SimHost, SimHostError, SimNix};
use embedded_apiserver::ApiServer;

/// How long a simulated host keeps running after its agent asked for the reboot (the agent
/// pod dies with the machine, as with `systemctl reboot`): part of the simulated reboot, like
/// [`Timing::reboot`](crate::sim::cluster::Timing::reboot) itself.
pub const SHUTDOWN: Duration = Duration::from_millis(50);

/// Field manager used for spec writes that stand in for Flux applying git.
pub const GITOPS_MANAGER: &str = "flux";

/// Which Nix the simulated hosts use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NixMode {
    /// Real Nix when `nix` runs on this machine, else simulated.
    Auto,
    /// Real Nix (`nix build` of a test flake in a git repository, private stores).
    Real,
    /// The built-in simulated store (`crate::sim::store`).
    Simulated,
}

#[derive(Clone, Debug)]
pub struct WorldOptions {
    pub nodes: usize,
    /// The first `control_planes` nodes are k3s servers.
    pub control_planes: usize,
    pub nix: NixMode,
    pub timing: Timing,
    /// Workload pods per node (ReplicaSet `web`, PDB allows one disruption); ignored when
    /// `apps` is set.
    pub pods_per_node: usize,
    /// The workloads, instead of the one `web` app.
    pub apps: Option<Vec<App>>,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            nodes: 5,
            control_planes: 1,
            nix: NixMode::Auto,
            timing: Timing::default(),
            pods_per_node: 2,
            apps: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("embedded API server: {0}")]
    ApiServer(#[from] embedded_apiserver::ApiServerError),
    #[error("simulated host: {0}")]
    Host(#[from] SimHostError),
    #[error("test flake: {0}")]
    Flake(#[from] FlakeError),
    #[error("simulated cluster: {0}")]
    Cluster(#[from] crate::sim::cluster::SimError),
    #[error("{operation}: {source}")]
    Api {
        operation: String,
        #[source]
        source: kube::Error,
    },
    #[error("{operation} timed out")]
    Timeout { operation: String },
    #[error("building the initial system of {node}: {message}")]
    InitialSystem { node: String, message: String },
    #[error("working directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("Nix was requested but `nix --version` does not run on this machine")]
    NoNix,
    #[error("a builder needs real Nix (the simulated store cannot serve a binary cache)")]
    BuilderNeedsNix,
    #[error("the builder's signing key: {0}")]
    BuilderKey(String),
    #[error("{0} needs the embedded API server")]
    NotEmbedded(&'static str),
}

pub(crate) async fn call<T>(
    operation: impl Into<String>,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, WorldError> {
    let operation = operation.into();
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(WorldError::Api { operation, source }),
        Err(_) => Err(WorldError::Timeout { operation }),
    }
}

/// Where revisions come from.
enum Source {
    Real(TestFlake),
    /// Each host's simulated Nix knows every committed revision of its configuration.
    Simulated {
        nixes: BTreeMap<String, Arc<SimNix>>,
        spec: SystemSpec,
        head: String,
        seq: u64,
        /// Set by [`World::follow_in_git`]: revisions are commits of this repository.
        git: Option<Box<TestFlake>>,
    },
}

/// One simulated machine.
pub struct SimNode {
    pub name: String,
    pub control_plane: bool,
    pub host: Arc<SimHost>,
    /// Stops the current agent (as a crash would) and starts a new one.
    restart: mpsc::UnboundedSender<()>,
    supervisor: JoinHandle<()>,
}

impl SimNode {
    /// Kill this node's agent at once (it is started again right away).
    pub fn restart_agent(&self) {
        let _ = self.restart.send(());
    }
}

/// A running controller replica.
pub struct ControllerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ControllerHandle {
    /// Ask it to shut down gracefully (release the Lease) and wait (bounded).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }

    /// Kill it without any cleanup (a crashed pod).
    pub fn kill(self) {
        self.task.abort();
    }
}

/// An API server the world does not start (a real kube-apiserver in the real-API tests), and
/// the identities its parts use there: the simulated cluster (kubelets, scheduler, the GitOps
/// tool) as `admin`, each controller replica and each node's agent as given (service-account
/// tokens, so that RBAC and admission policies apply as in a cluster).
#[derive(Clone)]
pub struct ExternalApi {
    pub admin: kube::Config,
    pub controller: kube::Config,
    /// The agent's configuration for a node, asked once the node's agent pod exists (a token
    /// bound to that pod).
    pub agent: AgentConfigFor,
    /// A kubeconfig file for people and `kubectl` (the admin's).
    pub kubeconfig: PathBuf,
}

/// The agent's client configuration for the node named by its argument.
pub type AgentConfigFor = Arc<
    dyn Fn(
            String,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<kube::Config, String>> + Send>>
        + Send
        + Sync,
>;

/// Which API server the world's parts talk to.
pub enum WorldApi {
    /// The embedded API server, started by the world: `api` for everyone but the agents,
    /// `agents_api` (a second port on the same store) for the agents, so that their requests
    /// are counted apart ([`ApiServer::request_counts`]).
    Embedded {
        api: ApiServer,
        agents_api: ApiServer,
    },
    External(Box<ExternalApi>),
}

/// The simulated cluster.
pub struct World {
    pub backend: WorldApi,
    /// The agents' client on the embedded API (on an external one each agent has its own).
    agents_client: Option<Client>,
    pub client: Client,
    pub cluster: SimCluster,
    pub nodes: Vec<SimNode>,
    /// With a builder: its role's settings (node-1) and the key every agent trusts.
    builder: Option<(crate::agent::building::BuilderConfig, String)>,
    pub nix_mode: NixMode,
    pub kubeconfig: PathBuf,
    source: Source,
    flake_url: String,
    /// More flake URLs the simulated Nix knows every revision under (a FlakeSource's flake).
    extra_flakes: Vec<String>,
    kubelets: JoinHandle<()>,
    dir: tempfile::TempDir,
}

/// Whether `nix --version` runs here.
pub fn nix_available() -> bool {
    std::process::Command::new("nix")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl World {
    /// Start the API server, install the CRD, lay out the hosts (booted on the first
    /// revision), create Nodes and workloads, and start one agent per node.
    /// No NixOSNode objects and no controller yet: see [`World::apply_all`] and
    /// [`World::start_controller`].
    pub async fn start(opts: WorldOptions) -> Result<World, WorldError> {
        World::start_embedded(opts, false).await
    }

    /// [`World::start`] with node-1 a builder (docs/builder.md): labelled
    /// `nixroll.io/builder=true`, its agent run with the builder role (key from a Secret of the
    /// API, made in memory; cache on a loopback port), every agent trusting its key. Real Nix
    /// only: the hosts get chroot stores (store paths `/nix/store/…` on every host, as on real
    /// machines, so one cache serves them all).
    pub async fn start_with_a_builder(opts: WorldOptions) -> Result<World, WorldError> {
        World::start_embedded(opts, true).await
    }

    async fn start_embedded(opts: WorldOptions, builder: bool) -> Result<World, WorldError> {
        let dir = tempfile::Builder::new().prefix("nixroll-sim-").tempdir()?;
        let api = ApiServer::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let client = api.client().await?;
        let agents_api =
            ApiServer::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), api.store()).await?;
        let agents_client = agents_api.client().await?;

        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        call(
            "install the NixOSNode CRD",
            crds.create(&PostParams::default(), &crate::api::crd()),
        )
        .await?;
        call(
            "install the FlakeSource CRD",
            crds.create(&PostParams::default(), &crate::api::flakesource_crd()),
        )
        .await?;
        call(
            "install the NixOSPool CRD",
            crds.create(&PostParams::default(), &crate::api::nixospool_crd()),
        )
        .await?;
        let backend = WorldApi::Embedded { api, agents_api };
        World::start_with(
            opts,
            builder,
            dir,
            backend,
            client,
            Some(agents_client),
            kubeconfig,
        )
        .await
    }

    /// [`World::start`] on an API server that is already running, with nixroll installed
    /// there (CRDs, namespace, RBAC, the agent's ServiceAccount: `kubectl apply -k deploy/`).
    pub async fn start_external(opts: WorldOptions, external: ExternalApi) -> Result<World, WorldError> {
        let dir = tempfile::Builder::new().prefix("nixroll-sim-").tempdir()?;
        let client = crate::connect::kube_client(external.admin.clone())
            .map_err(|source| WorldError::ApiServer(embedded_apiserver::ApiServerError::Client { source }))?;
        let kubeconfig = external.kubeconfig.clone();
        World::start_with(
            opts,
            false,
            dir,
            WorldApi::External(Box::new(external)),
            client,
            None,
            kubeconfig,
        )
        .await
    }

    async fn start_with(
        opts: WorldOptions,
        builder: bool,
        dir: tempfile::TempDir,
        backend: WorldApi,
        client: Client,
        agents_client: Option<Client>,
        kubeconfig: PathBuf,
    ) -> Result<World, WorldError> {
        let nix_mode = match opts.nix {
            NixMode::Auto if nix_available() => NixMode::Real,
            NixMode::Auto => NixMode::Simulated,
            NixMode::Real if !nix_available() => return Err(WorldError::NoNix),
            m => m,
        };
        if builder && nix_mode != NixMode::Real {
            return Err(WorldError::BuilderNeedsNix);
        }
        let names: Vec<String> = (1..=opts.nodes).map(|i| format!("node-{i}")).collect();
        let (source, flake_url) = match nix_mode {
            NixMode::Real => {
                let hosts: Vec<&str> = names.iter().map(String::as_str).collect();
                let flake = TestFlake::create(dir.path().join("flake"), &hosts)?;
                let url = flake.url();
                (Source::Real(flake), url)
            }
            _ => {
                let url = format!("path:{}", dir.path().join("flake").display());
                (
                    Source::Simulated {
                        nixes: BTreeMap::new(),
                        spec: SystemSpec::default(),
                        head: fake_revision(0),
                        seq: 0,
                        git: None,
                    },
                    url,
                )
            }
        };

        let cluster = SimCluster::new(client.clone(), opts.timing.clone());
        let kubelets = tokio::spawn(cluster.clone().run(std::future::pending::<()>()));
        let mut world = World {
            backend,
            agents_client,
            client,
            cluster,
            nodes: Vec::new(),
            builder: None,
            nix_mode,
            kubeconfig,
            source,
            flake_url,
            extra_flakes: Vec::new(),
            kubelets,
            dir,
        };

        // Hosts booted on the first revision.
        let head = world.head().to_string();
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let host = SimHost::create(world.dir.path().join("hosts").join(name))?;
            let host_root: Arc<dyn Host> = if builder {
                Arc::new(host.host_root_chroot())
            } else {
                Arc::new(host.host_root())
            };
            let url = world.flake_url.clone();
            if let Source::Simulated {
                nixes, spec, head, ..
            } = &mut world.source
            {
                let sim = Arc::new(SimNix::new(&host));
                sim.publish(&crate::api::installable(&url, head, name), spec.clone());
                nixes.insert(name.clone(), sim);
            }
            let nix = world.nix_for(host_root.clone(), name);
            let installable = crate::api::installable(&world.flake_url, &head, name);
            let path = nix
                .realise(&installable, Path::new("/var/lib/nixroll/gcroots/installed"))
                .await
                .map_err(|e| WorldError::InitialSystem {
                    node: name.clone(),
                    message: e.report(),
                })?;
            host.install(&path)?;
            hosts.push((name.clone(), i < opts.control_planes, host));
        }
        let node_specs: Vec<(String, bool, String)> = hosts
            .iter()
            .map(|(n, cp, h)| (n.clone(), *cp, h.boot_id()))
            .collect();
        world.cluster.create_nodes(&node_specs).await?;
        if builder {
            world.builder = Some(world.make_builder("node-1").await?);
        }
        let apps = opts.apps.clone().unwrap_or_else(|| {
            vec![App {
                name: "web".into(),
                replicas: opts.nodes * opts.pods_per_node,
                min_available: Some((opts.nodes * opts.pods_per_node).saturating_sub(1) as i32),
            }]
        });
        world.cluster.create_workloads(&names, &apps).await?;
        for (name, control_plane, host) in hosts {
            let node = world.spawn_node(name, control_plane, host);
            world.nodes.push(node);
        }
        Ok(world)
    }

    fn nix_for(&self, host_root: Arc<dyn Host>, node: &str) -> Arc<dyn Nix> {
        if let Source::Simulated { nixes, .. } = &self.source
            && let Some(sim) = nixes.get(node)
        {
            return sim.clone();
        }
        Arc::new(NixCli::new(host_root).offline())
    }

    /// `node` as the builder: its Node labelled, the signing key in the Secret its role reads
    /// (made here, in memory), its cache on a free loopback port.
    async fn make_builder(
        &self,
        node: &str,
    ) -> Result<(crate::agent::building::BuilderConfig, String), WorldError> {
        use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
        let secret = crate::builder::SigningKey::generate_secret("nixroll-demo-builder-1")
            .map_err(|e| WorldError::BuilderKey(e.to_string()))?;
        let public = crate::builder::SigningKey::parse(&secret)
            .map_err(|e| WorldError::BuilderKey(e.to_string()))?
            .public_key();
        let ns: Api<Namespace> = Api::all(self.client.clone());
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(crate::names::NAMESPACE.into());
        if let Err(e) = ns.create(&PostParams::default(), &namespace).await {
            tracing::debug!(error = %e, "namespace (may exist)");
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), crate::names::NAMESPACE);
        let mut s = Secret::default();
        s.metadata.name = Some("nixroll-builder-key".into());
        s.string_data = Some([("secret-key".to_string(), secret)].into());
        call(
            "create the builder's key Secret",
            secrets.create(&PostParams::default(), &s),
        )
        .await?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        call(
            "label the builder",
            nodes.patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"metadata": {"labels": {crate::names::BUILDER_LABEL: "true"}}}),
                ),
            ),
        )
        .await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = crate::agent::building::BuilderConfig {
            key_secret: "nixroll-builder-key".into(),
            key_field: "secret-key".into(),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            url: format!("http://127.0.0.1:{port}"),
            cache: crate::builder::CacheOptions::default(),
            push_to: None,
        };
        Ok((config, public))
    }

    fn spawn_node(&self, name: String, control_plane: bool, host: Arc<SimHost>) -> SimNode {
        let (restart_tx, mut restart_rx) = mpsc::unbounded_channel::<()>();
        let (reboot_tx, mut reboot_rx) = mpsc::unbounded_channel::<()>();
        let bare = HostRoot::new(
            host.root(),
            RebootHook::Callback(Arc::new(move || {
                let _ = reboot_tx.send(());
            })),
        );
        let host_root: Arc<dyn Host> = Arc::new(if self.builder.is_some() {
            bare.with_chroot_nix_store()
        } else {
            bare.with_private_nix_store()
        });
        let builder = self.builder.clone();
        let nix = self.nix_for(host_root.clone(), &name);
        let shared_client = self.agents_client.clone();
        let agent_config = match &self.backend {
            WorldApi::External(ext) => Some(ext.agent.clone()),
            WorldApi::Embedded { .. } => None,
        };
        let cluster = self.cluster.clone();
        let node_name = name.clone();
        let sim_host = host.clone();
        let supervisor = tokio::spawn(async move {
            loop {
                sim_host.pass(HoldPoint::AgentStart).await;
                // Like a new agent pod: its own client (on an external API server, a fresh
                // token bound to its pod).
                let client = match (&shared_client, &agent_config) {
                    (Some(c), _) => c.clone(),
                    (None, Some(make)) => {
                        match make(node_name.clone()).await.map(crate::connect::kube_client) {
                            Ok(Ok(c)) => c,
                            Ok(Err(e)) => {
                                tracing::warn!(node = %node_name, error = %e, "agent client; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(node = %node_name, error = %e, "agent credentials; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                continue;
                            }
                        }
                    }
                    (None, None) => return,
                };
                let mut config =
                    crate::agent::AgentConfig::new(node_name.clone(), host_root.clone(), nix.clone());
                if let Some((role, key)) = &builder {
                    config.options.substitution.trusted_public_keys = vec![key.clone()];
                    if node_name == "node-1" {
                        config.builder = Some(role.clone());
                    }
                }
                // The agent's own defaults: the demo and the benchmark time the path a real
                // node takes.
                let mut agent = Box::pin(crate::agent::run(
                    client.clone(),
                    config,
                    std::future::pending::<()>(),
                ));
                tokio::select! {
                    res = &mut agent => {
                        if let Err(e) = res {
                            tracing::warn!(node = %node_name, error = %e, "agent stopped; restarting it");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Some(()) = restart_rx.recv() => {
                        tracing::info!(node = %node_name, "agent killed (simulated crash); restarting it");
                    }
                    Some(()) = reboot_rx.recv() => {
                        // Like `systemctl reboot`: the agent pod dies with the machine.
                        tokio::time::sleep(SHUTDOWN).await;
                        drop(agent);
                        sim_host.pass(HoldPoint::Reboot).await;
                        let old = sim_host.boot_id();
                        let h = sim_host.clone();
                        let res = cluster
                            .reboot(&node_name, &old, move || {
                                if let Err(e) = h.reboot() {
                                    tracing::warn!(error = %e, "simulated bootloader failed");
                                }
                                h.boot_id()
                            })
                            .await;
                        if let Err(e) = res {
                            tracing::warn!(node = %node_name, error = %e, "simulated reboot could not update the Node");
                        }
                    }
                }
            }
        });
        SimNode {
            name,
            control_plane,
            host,
            restart: restart_tx,
            supervisor,
        }
    }

    /// The newest revision (what git HEAD would be).
    pub fn head(&self) -> &str {
        match &self.source {
            Source::Real(f) => f.head(),
            Source::Simulated { head, .. } => head,
        }
    }

    /// `git+file:///…` of the test flake (or a `path:` stand-in in simulated mode).
    pub fn flake_url(&self) -> &str {
        &self.flake_url
    }

    /// Commit a change of the system (for every host); returns the new revision.
    pub fn commit(
        &mut self,
        message: &str,
        change: impl FnOnce(&mut SystemSpec),
    ) -> Result<String, WorldError> {
        match &mut self.source {
            Source::Real(f) => Ok(f.commit(message, change)?),
            Source::Simulated {
                nixes,
                spec,
                head,
                seq,
                git,
            } => {
                change(spec);
                *seq += 1;
                *head = match git {
                    Some(f) => {
                        let s = spec.clone();
                        f.commit(message, move |g| *g = s)?
                    }
                    None => fake_revision(*seq),
                };
                for (node, nix) in nixes.iter() {
                    for flake in std::iter::once(&self.flake_url).chain(&self.extra_flakes) {
                        nix.publish(&crate::api::installable(flake, head, node), spec.clone());
                    }
                }
                Ok(head.clone())
            }
        }
    }

    /// Sign later commits of the git repository of [`World::follow_in_git`] (None: unsigned).
    pub fn sign_commits(&mut self, signer: Option<crate::sim::flake::CommitSigner>) {
        match &mut self.source {
            Source::Real(f) => f.sign_commits(signer),
            Source::Simulated { git: Some(f), .. } => f.sign_commits(signer),
            Source::Simulated { git: None, .. } => {}
        }
    }

    /// Make revisions commits of a real git repository and return its directory and branch:
    /// with real Nix the test flake already is one; with simulated Nix a repository is
    /// created (its first commit is the current system) and every later [`World::commit`]
    /// commits there too. A FlakeSource with `url: file://<dir>` (and `insecure: true`) follows it.
    pub fn follow_in_git(&mut self) -> Result<(PathBuf, String), WorldError> {
        self.follow_in_signed_git(None)
    }

    /// [`World::follow_in_git`] with every commit, from the first one the nodes run, signed by
    /// `signer` (with simulated Nix; with real Nix the flake's earlier commits stay unsigned).
    pub fn follow_in_signed_git(
        &mut self,
        signer: Option<crate::sim::flake::CommitSigner>,
    ) -> Result<(PathBuf, String), WorldError> {
        if let Source::Real(f) = &mut self.source
            && signer.is_some()
        {
            // The flake's first commit is unsigned: the nodes start on a signed commit of the
            // same system (as with simulated Nix below).
            f.sign_commits(signer.clone());
            f.commit("the running system", |_| {})?;
        }
        let dir = self.dir.path().join("flake-git");
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        match &mut self.source {
            Source::Real(f) => Ok((f.dir().to_path_buf(), f.branch()?)),
            Source::Simulated {
                nixes,
                spec,
                head,
                git,
                ..
            } => {
                if let Some(f) = git {
                    return Ok((f.dir().to_path_buf(), f.branch()?));
                }
                let hosts: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut f = TestFlake::create(&dir, &hosts)?;
                f.sign_commits(signer);
                let s = spec.clone();
                *head = f.commit("the running system", move |g| *g = s)?;
                for (node, nix) in nixes.iter() {
                    for flake in std::iter::once(&self.flake_url).chain(&self.extra_flakes) {
                        nix.publish(&crate::api::installable(flake, head, node), spec.clone());
                    }
                }
                let out = (f.dir().to_path_buf(), f.branch()?);
                *git = Some(Box::new(f));
                Ok(out)
            }
        }
    }

    /// Let the simulated Nix build every revision (past and future) also from `flake`, e.g.
    /// the flake a FlakeSource derives (`git+file://…?ref=refs/heads/…`). Real Nix builds any.
    pub fn publish_flake(&mut self, flake: &str) {
        if let Source::Simulated {
            nixes, spec, head, ..
        } = &self.source
        {
            for (node, nix) in nixes.iter() {
                nix.publish(&crate::api::installable(flake, head, node), spec.clone());
            }
        }
        self.extra_flakes.push(flake.to_owned());
    }

    /// The spec every NixOSNode gets for `revision` (customise before applying).
    pub fn spec(&self, revision: &str) -> NixOSNodeSpec {
        super::fixtures::spec(&self.flake_url, revision)
    }

    /// Apply (server-side, as the GitOps tool would) a NixOSNode for every node.
    pub async fn apply_all(&self, spec: &NixOSNodeSpec) -> Result<(), WorldError> {
        for n in &self.nodes {
            self.apply(&n.name, spec).await?;
        }
        Ok(())
    }

    /// Apply one NixOSNode's spec with field manager [`GITOPS_MANAGER`].
    pub async fn apply(&self, node: &str, spec: &NixOSNodeSpec) -> Result<(), WorldError> {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let obj = serde_json::json!({
            "apiVersion": "nixroll.io/v1alpha1",
            "kind": "NixOSNode",
            "metadata": {"name": node},
            "spec": spec,
        });
        call(
            format!("apply NixOSNode {node}"),
            api.patch(
                node,
                &PatchParams::apply(GITOPS_MANAGER).force(),
                &Patch::Apply(&obj),
            ),
        )
        .await?;
        Ok(())
    }

    /// Start a controller replica with `config` (its own client, as a separate pod would have).
    pub async fn start_controller(&self, config: ControllerConfig) -> Result<ControllerHandle, WorldError> {
        let mut config_k = match &self.backend {
            WorldApi::Embedded { api, .. } => api.config().await?,
            WorldApi::External(ext) => ext.controller.clone(),
        };
        config_k.default_retry = false; // as `nixroll controller` does: the drain handles 429
        let client = crate::connect::kube_client(config_k)
            .map_err(|source| WorldError::ApiServer(embedded_apiserver::ApiServerError::Client { source }))?;
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            if let Err(e) = crate::controller::run(client, config, shutdown).await {
                tracing::error!(error = %e, "controller replica stopped with an error");
            }
        });
        Ok(ControllerHandle { stop, task })
    }

    /// The NixOSNodes by name.
    pub async fn nixosnodes(&self) -> Result<BTreeMap<String, NixOSNode>, WorldError> {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let list = call("list NixOSNodes", api.list(&Default::default())).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name.clone().map(|n| (n, o)))
            .collect())
    }

    /// The embedded API server; an error naming `what` needs it when the world runs on
    /// another.
    pub fn embedded(&self, what: &'static str) -> Result<&ApiServer, WorldError> {
        match &self.backend {
            WorldApi::Embedded { api, .. } => Ok(api),
            WorldApi::External(_) => Err(WorldError::NotEmbedded(what)),
        }
    }

    /// The embedded API server's agents-only port (see [`WorldApi::Embedded`]).
    pub fn embedded_agents(&self, what: &'static str) -> Result<&ApiServer, WorldError> {
        match &self.backend {
            WorldApi::Embedded { agents_api, .. } => Ok(agents_api),
            WorldApi::External(_) => Err(WorldError::NotEmbedded(what)),
        }
    }

    pub fn node(&self, name: &str) -> Option<&SimNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kubelets.abort();
        for n in &self.nodes {
            n.supervisor.abort();
        }
    }
}

/// A deterministic 40-hex "commit" for simulated mode.
fn fake_revision(seq: u64) -> String {
    let mut out = String::new();
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6e69_786f_6c6c_0000;
    while out.len() < 40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!("{x:016x}"));
    }
    out.truncate(40);
    out
}
