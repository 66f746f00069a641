//! A simulated host root with its own Nix store, a test flake in a git repository, and the
//! agent's host logic over them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nixroll::agent::host::Host;
use nixroll::agent::node::{HostOptions, NodeAgent};
use nixroll::api::{ActivationAction, ActivationGrant, AgentStatus, Target};
use nixroll::nix::{Nix, NixCli};
use nixroll::sim::flake::TestFlake;
use nixroll::sim::host::{SimHost, SimNix};

/// A host root (`sim`) in a temporary directory, the flake `flake` that configures `node`, and
/// real Nix (offline) whose store lives in that root.
pub struct HostRoot {
    pub tmp: tempfile::TempDir,
    pub node: String,
    pub flake: TestFlake,
    pub sim: Arc<SimHost>,
    pub host: Arc<dyn Host>,
    pub nix: Arc<dyn Nix>,
}

impl HostRoot {
    pub fn new(node: &str) -> HostRoot {
        let tmp = tempfile::tempdir().unwrap();
        let flake = TestFlake::create(tmp.path().join("flake"), &[node]).unwrap();
        let sim = SimHost::create(tmp.path().join("host")).unwrap();
        let host: Arc<dyn Host> = Arc::new(sim.host_root());
        let nix: Arc<dyn Nix> = Arc::new(NixCli::new(host.clone()).offline());
        HostRoot {
            tmp,
            node: node.to_string(),
            flake,
            sim,
            host,
            nix,
        }
    }

    /// The agent's host logic with short polls and `options`' other fields.
    pub fn agent_with(&self, options: HostOptions) -> NodeAgent {
        NodeAgent::new(self.host.clone(), self.nix.clone(), options)
    }

    /// The agent's host logic: activation timeout 30 s, result poll 10 ms.
    pub fn agent(&self) -> NodeAgent {
        self.agent_with(HostOptions {
            activation_timeout: Duration::from_secs(30),
            result_poll: Duration::from_millis(10),
            ..Default::default()
        })
    }

    /// The target of the flake's revision `rev` for this node.
    pub fn target(&self, rev: &str) -> Target {
        Target {
            revision: rev.to_string(),
            installable: self.flake.installable(rev, &self.node),
            system: None,
            build: None,
        }
    }

    /// Stage the flake's first commit and install it as the running system; returns its path.
    pub async fn installed(&self) -> String {
        let rev0 = self.flake.head().to_string();
        let system = stage(&mut self.agent(), &self.target(&rev0)).await;
        self.sim.install(&system).unwrap();
        system
    }

    pub fn root(&self) -> &Path {
        self.sim.root()
    }
}

/// A host root (`sim`) in a temporary directory with the simulated Nix (`simnix`): what the
/// demo runs, needing no Nix. Systems are published with `simnix.publish`.
pub struct SimNixHost {
    pub tmp: tempfile::TempDir,
    pub sim: Arc<SimHost>,
    pub simnix: Arc<SimNix>,
    pub host: Arc<dyn Host>,
    pub nix: Arc<dyn Nix>,
}

impl SimNixHost {
    pub fn new() -> SimNixHost {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimHost::create(tmp.path().join("host")).unwrap();
        let simnix = Arc::new(SimNix::new(&sim));
        let host: Arc<dyn Host> = Arc::new(sim.host_root());
        let nix: Arc<dyn Nix> = simnix.clone();
        SimNixHost {
            tmp,
            sim,
            simnix,
            host,
            nix,
        }
    }

    /// The agent's host logic with a result poll of 10 ms.
    pub fn agent(&self) -> NodeAgent {
        let options = HostOptions {
            result_poll: Duration::from_millis(10),
            ..Default::default()
        };
        NodeAgent::new(self.host.clone(), self.nix.clone(), options)
    }
}

/// `agent` stages `target` (no grant); returns the staged system's store path.
pub async fn stage(agent: &mut NodeAgent, target: &Target) -> String {
    let st = agent.reconcile(Some(target), None).await.unwrap();
    match st.staged {
        Some(s) => s.system,
        None => panic!("not staged: {:?}", st.last_error),
    }
}

/// `agent` carries out the grant `id` (`action` of `system`) for `target`; returns its report.
pub async fn activate(
    agent: &mut NodeAgent,
    target: &Target,
    id: &str,
    action: ActivationAction,
    system: &str,
) -> AgentStatus {
    let g = grant(id, action, system);
    agent.reconcile(Some(target), Some(&g)).await.unwrap()
}

/// The grant `id`: `action` of `system`, granted at the epoch.
pub fn grant(id: &str, action: ActivationAction, system: &str) -> ActivationGrant {
    ActivationGrant {
        id: id.to_string(),
        action,
        system: system.to_string(),
        granted_at: Time(Timestamp::UNIX_EPOCH),
        boot_id_before: None,
    }
}

/// Real Nix is required (see [`super::require_nix`]); a host root for `node` whose flake's
/// first commit is installed as the running system, and that system's path. `None`: skipped
/// outside CI.
pub async fn installed_host(node: &str) -> Option<(HostRoot, String)> {
    if !super::require_nix() {
        return None;
    }
    let host = HostRoot::new(node);
    let system = host.installed().await;
    Some((host, system))
}
