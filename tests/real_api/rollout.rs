//! The simulated cluster of `nixroll demo` on the real API server: its kubelets, scheduler and
//! ReplicaSets as API clients (the PodDisruptionBudgets' status from the real disruption
//! controller), the real controller under deploy/'s `nixroll-controller` ServiceAccount and one
//! real agent per host under `nixroll-agent` with a token bound to its pod — so RBAC and the
//! agent's admission policy apply exactly as in a cluster. One scenario, because every part of
//! it shares the one server: adoption with a secret file, a kernel rollout (a Force drain on
//! the node whose only pod a PodDisruptionBudget pins), following a FlakeSource with
//! credentials, then the checks on what the run sent: managed fields (no component took
//! another's fields) and the audit log (no 403, and every verb deploy/ grants was used).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use nixroll::api::{DrainPolicy, DrainTimeoutAction, FlakeSource, NixOSNode, Phase, SourceKind, SourceRef};
use nixroll::controller::{ControllerConfig, LeaderElectionConfig};
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::cluster::{App, WORKLOAD_NAMESPACE};
use nixroll::sim::controlplane::ControlPlane;
use nixroll::sim::monitor::Monitor;
use nixroll::sim::steps::StepClock;
use nixroll::sim::world::{AgentConfigFor, ExternalApi, World};
use serde_json::{Value, json};

use crate::common;
use crate::plane::{CLUSTER, ROOT, plane};

const NODES: usize = 3;
const WAIT: Duration = Duration::from_secs(180);
const CONTROLLER_USER: &str = "system:serviceaccount:nixroll-system:nixroll-controller";
const AGENT_USER: &str = "system:serviceaccount:nixroll-system:nixroll-agent";

/// The identities of [`World::start_external`] on `plane`.
pub async fn identities(plane: &'static ControlPlane) -> ExternalApi {
    let controller_token = plane
        .service_account_token("nixroll-system", "nixroll-controller", None)
        .await
        .unwrap();
    let agent: AgentConfigFor = Arc::new(move |node: String| {
        Box::pin(async move {
            let client = plane.admin_client().await.map_err(|e| e.to_string())?;
            let pods: Api<Pod> = Api::namespaced(client, "nixroll-system");
            let pod = pods
                .get(&format!("nixroll-agent-{node}"))
                .await
                .map_err(|e| e.to_string())?;
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let token = plane
                .service_account_token("nixroll-system", "nixroll-agent", Some((&name, &uid)))
                .await
                .map_err(|e| e.to_string())?;
            plane
                .config_with_token(&format!("agent-{node}"), &token)
                .await
                .map_err(|e| e.to_string())
        })
    });
    ExternalApi {
        admin: plane.admin_config().await.unwrap(),
        controller: plane
            .config_with_token("nixroll-controller", &controller_token)
            .await
            .unwrap(),
        agent,
        kubeconfig: plane.admin_kubeconfig(),
    }
}

/// Watch the NixOSNodes until `pred` holds for all [`NODES`] (bounded by [`WAIT`]).
async fn wait_nodes(world: &World, what: &str, pred: impl Fn(&NixOSNode) -> bool) {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let mut seen: BTreeMap<String, NixOSNode> = BTreeMap::new();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let done = tokio::time::timeout(WAIT, async {
        while let Ok(Some(o)) = stream.try_next().await {
            let name = o.metadata.name.clone().unwrap_or_default();
            if world.node(&name).is_none() {
                continue; // another test's object on the shared server
            }
            seen.insert(name, o);
            if seen.len() >= NODES && seen.values().all(&pred) {
                return;
            }
        }
    })
    .await;
    if done.is_err() {
        let table: Vec<String> = seen
            .values()
            .map(|o| {
                let s = o.status.clone().unwrap_or_default();
                format!(
                    "{:?} {:?} {:?} {:?}",
                    o.metadata.name, s.phase, s.revision, s.message
                )
            })
            .collect();
        panic!("timed out waiting for {what}:\n{}", table.join("\n"));
    }
}

fn runs(rev: &str) -> impl Fn(&NixOSNode) -> bool + '_ {
    move |o| {
        let s = o.status.clone().unwrap_or_default();
        s.phase == Some(Phase::UpToDate) && s.revision.as_deref() == Some(rev)
    }
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    let data: BTreeMap<String, String> = data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "nixroll-system"},
        "stringData": data,
    }))
    .unwrap()
}

/// Flux's GitRepository CRD, reduced to what nixroll reads, so that the controller's
/// GitRepository watch runs (its RBAC is granted for it).
fn flux_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gitrepositories.source.toolkit.fluxcd.io"},
        "spec": {"group": "source.toolkit.fluxcd.io", "scope": "Namespaced",
            "names": {"plural": "gitrepositories", "singular": "gitrepository", "kind": "GitRepository"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_secrets_and_following_under_deploy_rbac() {
    let Some(plane) = plane() else { return };
    if !common::require_nix() {
        return;
    }
    let _cluster = CLUSTER.lock().await;
    let audit_from = std::fs::metadata(plane.audit_log()).map(|m| m.len()).unwrap_or(0);
    let admin = plane.admin_client().await.unwrap();
    Api::<CustomResourceDefinition>::all(admin.clone())
        .create(&PostParams::default(), &flux_crd())
        .await
        .unwrap();
    // A NixOSPool that selects no node: it changes nothing in the rollout, and the controller
    // lists, watches and writes the status of NixOSPools under deploy/'s RBAC.
    let pool: nixroll::api::NixOSPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSPool",
        "metadata": {"name": "empty"},
        "spec": {"selector": {"matchLabels": {"nixroll.io/pool": "none"}}}
    }))
    .unwrap();
    Api::<nixroll::api::NixOSPool>::all(admin.clone())
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();

    let mut opts = common::world::fast_world(NODES, 2);
    opts.nix = nixroll::sim::world::NixMode::Real;
    // `web` on every node (its PDB allows one disruption); `db`, one pod a PDB pins.
    opts.apps = Some(vec![
        App {
            name: "web".into(),
            replicas: NODES * 2,
            min_available: Some((NODES * 2 - 1) as i32),
        },
        App {
            name: "db".into(),
            replicas: 1,
            min_available: Some(1),
        },
    ]);
    let mut world = World::start_external(opts, identities(plane).await)
        .await
        .unwrap();
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), WORKLOAD_NAMESPACE);
    let db_node = pods.get("db-0").await.unwrap().spec.unwrap().node_name.unwrap();

    // Adoption, with a secret file on node-1.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "nixroll-system");
    secrets
        .create(
            &PostParams::default(),
            &secret("node-1-token", &[("token", "real-api-secret-value")]),
        )
        .await
        .unwrap();
    let head = world.head().to_string();
    let spec_for = |world: &World, node: &str, rev: &str| {
        let mut spec = world.spec(rev);
        if node == "node-1" {
            spec.secrets = vec![common::objects::secret_file(
                "node-1-token",
                "token",
                "/etc/nixroll-test/token",
            )];
        }
        if node == db_node {
            spec.drain = Some(DrainPolicy {
                timeout: Some("3s".into()),
                on_timeout: DrainTimeoutAction::Force,
                ..spec.drain.clone().unwrap_or_default()
            });
        }
        spec
    };
    for n in &world.nodes {
        world
            .apply(&n.name, &spec_for(&world, &n.name, &head))
            .await
            .unwrap();
    }
    let mut config = ControllerConfig::new(&format!("real-{}", fastrand::u32(..)));
    config.policy.max_unavailable = MaxUnavailable::Count(1);
    config.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
    let cache = tempfile::tempdir().unwrap();
    config.follow.source_controller.cache_dir = cache.path().to_path_buf();
    // Leader-elected like the Deployment's replicas (the Lease in nixroll-system), renewing
    // often enough that a renewal happens within the run.
    let mut election =
        LeaderElectionConfig::new("nixroll-system", nixroll::names::LEADER_LEASE, "real-api-1");
    election.renew_period = Duration::from_secs(1);
    config.leader_election = Some(election);
    // The push webhook receiver, so that deploy/'s grants for it (the webhook Secret, patching
    // FlakeSources) are used below.
    config.webhook = Some(nixroll::controller::webhook::WebhookConfig::new(
        "127.0.0.1:0".parse().unwrap(),
    ));
    let webhook_bound = config.webhook_bound.clone();
    let controller = world.start_controller(config).await.unwrap();
    wait_nodes(&world, "adoption", runs(&head)).await;
    let file = world
        .node("node-1")
        .unwrap()
        .host
        .root()
        .join("etc/nixroll-test/token");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "real-api-secret-value");

    // The per-step clock from kube watches through this API server (`nixroll bench
    // --kube-assets` reports from it): it must see every step of every node's disruption.
    let clock = StepClock::watching(admin.clone());
    // A kernel rollout: every node drained (one a Force drain), rebooted once, verified.
    let boots: Vec<String> = world.nodes.iter().map(|n| n.host.boot_id()).collect();
    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    for n in &world.nodes {
        world
            .apply(&n.name, &spec_for(&world, &n.name, &next))
            .await
            .unwrap();
    }
    wait_nodes(&world, "the kernel rollout", runs(&next)).await;
    for (n, before) in world.nodes.iter().zip(&boots) {
        assert_ne!(&n.host.boot_id(), before, "{} did not reboot", n.name);
    }
    clock.wait_finished(NODES, Duration::from_secs(30)).await;
    let seen: Vec<(String, usize)> = clock
        .finished()
        .iter()
        .filter(|(n, _)| world.node(n).is_some())
        .map(|(n, d)| (n.clone(), d.steps().len()))
        .collect();
    assert_eq!(seen.len(), NODES, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(_, steps)| *steps == nixroll::sim::steps::STEPS.len()),
        "every step of every disruption: {seen:?}"
    );
    drop(clock);

    // The db pod moved to another node, where its PodDisruptionBudget would block the drain
    // for good: it has served its purpose.
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(admin.clone(), WORKLOAD_NAMESPACE);
    pdbs.delete("db", &Default::default()).await.unwrap();

    // Following a FlakeSource (with credentials) whose branch has moved on.
    let (repo, branch) = world.follow_in_git().unwrap();
    let followed = world
        .commit("a service change", |s| s.service.push_str("-svc"))
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &secret(
                "flake-source-credentials",
                &[("username", "git"), ("password", "real-api-token")],
            ),
        )
        .await
        .unwrap();
    let sources: Api<FlakeSource> = Api::namespaced(admin.clone(), "nixroll-system");
    let fs: FlakeSource = serde_json::from_value(json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": "infra", "namespace": "nixroll-system"},
        "spec": {"url": format!("file://{}", repo.display()), "ref": {"branch": branch},
                 "interval": "30s", "insecure": true, "secretRef": {"name": "flake-source-credentials"}}
    }))
    .unwrap();
    sources.create(&PostParams::default(), &fs).await.unwrap();
    for n in &world.nodes {
        let mut spec = spec_for(&world, &n.name, "");
        spec.revision = String::new();
        spec.flake = String::new();
        spec.source_ref = Some(SourceRef {
            kind: SourceKind::FlakeSource,
            name: "infra".into(),
            namespace: None,
        });
        world.apply(&n.name, &spec).await.unwrap();
    }
    wait_nodes(&world, "following the branch", runs(&followed)).await;

    // A push announced by a signed GitHub webhook: the receiver (under deploy/'s role) reads
    // its Secret, annotates the FlakeSource, and the source resolves at once (its interval is
    // 30 s).
    let token = "real-api-webhook-token";
    secrets
        .create(
            &PostParams::default(),
            &secret("nixroll-webhook", &[("token", token)]),
        )
        .await
        .unwrap();
    let pushed = world
        .commit("a pushed change", |s| s.service.push_str("-push"))
        .unwrap();
    let addr = *webhook_bound.get().unwrap();
    let body = serde_json::to_vec(&json!({"ref": format!("refs/heads/{branch}"),
        "repository": {"clone_url": format!("file://{}", repo.display())}}))
    .unwrap();
    let headers = vec![
        ("X-GitHub-Event", "push".to_string()),
        (
            "X-Hub-Signature-256",
            format!("sha256={}", crate::common::webhook::hmac_hex(token, &body)),
        ),
    ];
    let (code, _) = tokio::task::spawn_blocking(move || {
        crate::common::webhook::http(addr, "POST", "/hook/github", &headers, &body)
    })
    .await
    .unwrap();
    assert!((200..300).contains(&code), "webhook answered {code}");
    wait_nodes(&world, "the pushed commit", runs(&pushed)).await;

    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    controller.stop().await;

    check_managed_fields(&admin).await;
    check_rbac_against_audit(plane, audit_from);
}

/// The top-level keys a managed-fields entry owns under `f:status` (or every top-level `f:`
/// key when `status` is false).
fn owned(entry: &Value, under_status: bool) -> BTreeSet<String> {
    let fields = &entry["fieldsV1"];
    let map = if under_status { &fields["f:status"] } else { fields };
    map.as_object()
        .map(|m| m.keys().filter(|k| k.starts_with("f:")).cloned().collect())
        .unwrap_or_default()
}

/// Server-side apply kept the owners apart: the GitOps tool owns spec, `nixroll-controller`
/// the rollout part of status and never `status.agent`, `nixroll-agent` only `status.agent`;
/// nixroll made no non-apply write (an `Update` entry) to a NixOSNode.
async fn check_managed_fields(admin: &kube::Client) {
    let api: Api<NixOSNode> = Api::all(admin.clone());
    for o in api.list(&ListParams::default()).await.unwrap() {
        let name = o.metadata.name.clone().unwrap_or_default();
        let entries: Vec<Value> = o
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| serde_json::to_value(m).unwrap())
            .collect();
        let of = |manager: &str| {
            entries
                .iter()
                .filter(|e| e["manager"] == manager)
                .collect::<Vec<_>>()
        };
        for e in &entries {
            let manager = e["manager"].as_str().unwrap_or_default();
            assert!(
                ["flux", "nixroll-controller", "nixroll-agent"].contains(&manager),
                "{name}: unexpected field manager {manager}: {e}"
            );
            assert_eq!(
                e["operation"], "Apply",
                "{name}: {manager} wrote without server-side apply: {e}"
            );
        }
        let controller = of("nixroll-controller");
        assert_eq!(controller.len(), 1, "{name}: {entries:?}");
        assert_eq!(controller[0]["subresource"], "status");
        let c = owned(controller[0], true);
        assert!(
            c.contains("f:phase") && !c.contains("f:agent"),
            "{name}: controller owns {c:?}"
        );
        let agent = of("nixroll-agent");
        assert_eq!(agent.len(), 1, "{name}: {entries:?}");
        assert_eq!(agent[0]["subresource"], "status");
        assert_eq!(
            owned(agent[0], true),
            BTreeSet::from(["f:agent".to_owned()]),
            "{name}"
        );
        let flux = of("flux");
        assert_eq!(flux.len(), 1);
        assert!(owned(flux[0], false).contains("f:spec"), "{name}");
        assert!(!owned(flux[0], false).contains("f:status"), "{name}");
    }
}

/// `(apiGroup, resource[/subresource], verb)` of a request or a grant.
type Access = (String, String, String);

/// What deploy/'s Roles and ClusterRoles grant the ServiceAccount `sa`, with the reason a
/// grant may go unused in this run (none today).
fn granted(sa: &str) -> BTreeSet<Access> {
    let mut docs = Vec::new();
    for f in ["deploy/controller-rbac.yaml", "deploy/agent-rbac.yaml"] {
        let text = std::fs::read_to_string(std::path::Path::new(ROOT).join(f)).unwrap();
        docs.extend(
            text.split("\n---")
                .filter_map(|d| serde_saphyr::from_str::<Value>(d).ok())
                .filter(Value::is_object),
        );
    }
    let bound_roles: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        .filter(|d| {
            d["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == sa)
        })
        .map(|d| {
            (
                d["roleRef"]["kind"].as_str().unwrap_or_default().to_owned(),
                d["roleRef"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut out = BTreeSet::new();
    for d in &docs {
        let key = (
            d["kind"].as_str().unwrap_or_default().to_owned(),
            d["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        );
        if !bound_roles.contains(&key) {
            continue;
        }
        for rule in d["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for v in rule["verbs"].as_array().into_iter().flatten() {
                        out.insert((
                            g.as_str().unwrap_or_default().to_owned(),
                            r.as_str().unwrap_or_default().to_owned(),
                            v.as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The audit log since `from` (bytes): no request of nixroll's ServiceAccounts was refused, and
/// every verb deploy/ grants them was used by this run — RBAC is exactly what the code sends.
fn check_rbac_against_audit(plane: &ControlPlane, from: u64) {
    let text = std::fs::read_to_string(plane.audit_log()).unwrap();
    let text = &text[usize::try_from(from).unwrap().min(text.len())..];
    let mut used: BTreeMap<&str, BTreeSet<Access>> = BTreeMap::new();
    let mut refused = Vec::new();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let user = ev["user"]["username"].as_str().unwrap_or_default();
        let who = match user {
            CONTROLLER_USER => "nixroll-controller",
            AGENT_USER => "nixroll-agent",
            _ => continue,
        };
        let o = &ev["objectRef"];
        let mut resource = o["resource"].as_str().unwrap_or_default().to_owned();
        if let Some(sub) = o["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let access = (
            o["apiGroup"].as_str().unwrap_or_default().to_owned(),
            resource,
            ev["verb"].as_str().unwrap_or_default().to_owned(),
        );
        if ev["responseStatus"]["code"] == 403 {
            refused.push(format!("{who}: {access:?} {}", ev["responseStatus"]["message"]));
        }
        used.entry(who).or_default().insert(access);
    }
    assert!(
        refused.is_empty(),
        "nixroll's own requests were refused:\n{}",
        refused.join("\n")
    );
    for sa in ["nixroll-controller", "nixroll-agent"] {
        let grants = granted(sa);
        let used = used.get(sa).cloned().unwrap_or_default();
        let unused: Vec<&Access> = grants.iter().filter(|g| !used.contains(*g)).collect();
        assert!(
            unused.is_empty(),
            "{sa}: deploy/ grants what the run never used (remove it, or exercise it here): {unused:?}\nused: {used:?}"
        );
        eprintln!(
            "{sa}: {} grants, all used; requests used {} kinds of access",
            grants.len(),
            used.len()
        );
    }
}
