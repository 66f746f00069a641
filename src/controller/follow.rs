//! NixOSNodes that follow a source (`spec.sourceRef`): the watches on FlakeSources and (when
//! Flux is installed) GitRepositories, the groups' pins, and the effective spec the rollout
//! works with. The decisions are pure ([`crate::source::follow`]); this is the wiring.
//!
//! The controller calls [`Following::effective`] for the node it reconciles and
//! [`Following::effective_all`] for the admission gate; [`Following::start`] (once per
//! leadership term) starts the source watches and the FlakeSource controller.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::api::{FlakeSource, NixOSNode, SourceKind};
use crate::source::controller::SourceControllerConfig;
use crate::source::follow::{self, Member, Offer, SourceKey, Untrusted};

/// Flux's GitRepository, as nixroll reads it.
pub const FLUX_SOURCE_GROUP: &str = "source.toolkit.fluxcd.io";
pub const FLUX_SOURCE_VERSION: &str = "v1";

/// The name of Flux's GitRepository CRD.
pub const FLUX_GITREPOSITORY_CRD: &str = "gitrepositories.source.toolkit.fluxcd.io";

fn gitrepository_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(FLUX_SOURCE_GROUP, FLUX_SOURCE_VERSION, "GitRepository"),
        "gitrepositories",
    )
}

/// Configuration of following (part of `ControllerConfig`).
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// Run the FlakeSource controller and the source watches.
    pub enabled: bool,
    pub source_controller: SourceControllerConfig,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig {
            enabled: true,
            source_controller: SourceControllerConfig::new(std::env::temp_dir().join("nixroll-sources")),
        }
    }
}

type Offers = Arc<Mutex<HashMap<SourceKey, Result<Offer, Untrusted>>>>;

/// The following side of one leadership term.
pub struct Following {
    /// The client, the offers and the NixOSNodes to wake, shared with the watch tasks.
    feeds: Feeds,
    failure_threshold: u32,
    pins: Mutex<HashMap<SourceKey, Offer>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// A node with nothing to target yet.
#[derive(Debug, thiserror::Error)]
#[error("{node}: nothing to roll out yet: {why}")]
pub struct Unresolved {
    pub node: String,
    pub why: String,
}

impl Following {
    pub fn new(
        client: Client,
        nixosnodes: Store<NixOSNode>,
        wake: mpsc::UnboundedSender<ObjectRef<NixOSNode>>,
        failure_threshold: u32,
    ) -> Self {
        Following {
            feeds: Feeds {
                client,
                offers: Arc::default(),
                nixosnodes,
                wake,
            },
            failure_threshold,
            pins: Mutex::default(),
            tasks: Mutex::default(),
        }
    }

    /// Start the FlakeSource controller and the source watches. The GitRepository watch runs
    /// while the API serves `gitrepositories.source.toolkit.fluxcd.io/v1`: a watch on that one
    /// CRD starts it when Flux is installed (before or after nixroll) and stops it, forgetting
    /// what it offered, when Flux is removed.
    pub fn start(&self, config: &FollowConfig, identity: &str) {
        if !config.enabled {
            return;
        }
        let mut handles = Vec::new();
        let client = self.feeds.client.clone();
        let sc = config.source_controller.clone();
        let identity = identity.to_string();
        handles.push(
            tokio::spawn(async move { crate::source::controller::run(client, sc, &identity).await })
                .abort_handle(),
        );

        let api: Api<FlakeSource> = Api::all(self.feeds.client.clone());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .map(|ev| {
                ev.map(|e| {
                    map_event(e, |fs: FlakeSource| {
                        (
                            key_of(SourceKind::FlakeSource, &fs),
                            follow::flakesource_offer(&fs),
                        )
                    })
                })
            });
        let feeds = self.feeds.clone();
        handles.push(tokio::spawn(feeds.feed(SourceKind::FlakeSource, stream)).abort_handle());
        handles.push(tokio::spawn(feeds.follow_flux()).abort_handle());
        if let Ok(mut t) = self.tasks.lock() {
            t.extend(handles);
        }
    }

    fn latest(&self, key: &SourceKey) -> Result<Offer, Untrusted> {
        self.feeds
            .offers
            .lock()
            .ok()
            .and_then(|o| o.get(key).cloned())
            .unwrap_or(Err(Untrusted::Missing))
    }

    /// The pin of `key`'s group after looking at `all` (every NixOSNode); wakes the group when
    /// the pin moved.
    fn pin_for(&self, key: &SourceKey, all: &[Arc<NixOSNode>]) -> (Option<Offer>, Result<Offer, Untrusted>) {
        let group: Vec<&Arc<NixOSNode>> = all
            .iter()
            .filter(|o| o.spec.source_ref.as_ref().map(SourceKey::from).as_ref() == Some(key))
            .collect();
        let members: Vec<Member<'_>> = group.iter().map(|o| Member::of(o)).collect();
        let latest = self.latest(key);
        let Ok(mut pins) = self.pins.lock() else {
            return (None, latest);
        };
        let held = pins.get(key).cloned();
        let next = follow::pin(
            held.as_ref(),
            latest.as_ref().ok(),
            &members,
            self.failure_threshold,
        );
        if next != held {
            match &next {
                Some(p) => {
                    info!(source = %key, commit = %p.commit, nodes = group.len(), "rollout of the source's revision starts");
                    pins.insert(key.clone(), p.clone());
                }
                None => {
                    pins.remove(key);
                }
            }
            drop(pins);
            for o in &group {
                let _ = self.feeds.wake.send(ObjectRef::new(&o.name_any()));
            }
        }
        (next, latest)
    }

    /// The object the rollout works with: unchanged without `sourceRef`, else with the group's
    /// pinned revision (and the source's flake when `spec.flake` is omitted).
    pub fn effective(&self, obj: Arc<NixOSNode>) -> Result<Arc<NixOSNode>, Unresolved> {
        let Some(sr) = obj.spec.source_ref.as_ref() else {
            if obj.spec.revision.is_empty() {
                // Neither revision nor sourceRef: the CRD's CEL rule refuses it on a real API
                // server; never stage an empty revision.
                return Err(Unresolved {
                    node: obj.name_any(),
                    why: "neither spec.revision nor spec.sourceRef is set".into(),
                });
            }
            return Ok(obj);
        };
        let key = SourceKey::from(sr);
        let all = self.feeds.nixosnodes.state();
        let (pin, latest) = self.pin_for(&key, &all);
        match follow::effective_spec(&obj, pin.as_ref()) {
            Some(spec) => {
                let mut o = (*obj).clone();
                o.spec = spec;
                Ok(Arc::new(o))
            }
            None => {
                let why = match latest {
                    Err(u) => format!("{key}: {u}"),
                    Ok(_) => format!("{key}: the flake is unknown; set spec.flake"),
                };
                Err(Unresolved {
                    node: obj.name_any(),
                    why,
                })
            }
        }
    }

    /// [`Following::effective`] for every object (the admission gate); a following node with
    /// nothing to target stays as it is (its empty revision matches no target, so it is never
    /// admitted).
    pub fn effective_all(&self, objs: Vec<Arc<NixOSNode>>) -> Vec<Arc<NixOSNode>> {
        if objs.iter().all(|o| o.spec.source_ref.is_none()) {
            return objs;
        }
        let mut pins: HashMap<SourceKey, Option<Offer>> = HashMap::new();
        objs.iter()
            .map(|o| {
                let Some(sr) = o.spec.source_ref.as_ref() else {
                    return o.clone();
                };
                let key = SourceKey::from(sr);
                let pin = pins
                    .entry(key.clone())
                    .or_insert_with(|| self.pin_for(&key, &objs).0)
                    .clone();
                match follow::effective_spec(o, pin.as_ref()) {
                    Some(spec) => {
                        let mut e = (**o).clone();
                        e.spec = spec;
                        Arc::new(e)
                    }
                    None => o.clone(),
                }
            })
            .collect()
    }
}

fn key_of<K: ResourceExt>(kind: SourceKind, o: &K) -> SourceKey {
    SourceKey {
        kind,
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
}

fn map_event<K, T>(ev: watcher::Event<K>, f: impl FnOnce(K) -> T) -> watcher::Event<T> {
    match ev {
        watcher::Event::Apply(k) => watcher::Event::Apply(f(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(f(k)),
        watcher::Event::InitApply(k) => watcher::Event::InitApply(f(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// What a source watch needs to keep the offers and wake followers; cloned into the watch tasks.
#[derive(Clone)]
struct Feeds {
    client: Client,
    offers: Offers,
    nixosnodes: Store<NixOSNode>,
    wake: mpsc::UnboundedSender<ObjectRef<NixOSNode>>,
}

impl Feeds {
    /// Keep `offers` in step with a source watch; wake the followers of a source whose offer
    /// changed.
    fn feed<S>(&self, kind: SourceKind, stream: S) -> impl Future<Output = ()> + Send + 'static
    where
        S: futures::Stream<
                Item = Result<watcher::Event<(SourceKey, Result<Offer, Untrusted>)>, watcher::Error>,
            > + Send
            + 'static,
    {
        let offers = self.offers.clone();
        let feeds = self.clone();
        async move {
            futures::pin_mut!(stream);
            let mut listed: BTreeSet<SourceKey> = BTreeSet::new();
            while let Some(ev) = stream.next().await {
                let changed: Vec<SourceKey> = {
                    let Ok(mut offers) = offers.lock() else { return };
                    match ev {
                        Ok(watcher::Event::Apply((k, o)) | watcher::Event::InitApply((k, o))) => {
                            listed.insert(k.clone());
                            if offers.get(&k) != Some(&o) {
                                offers.insert(k.clone(), o);
                                vec![k]
                            } else {
                                vec![]
                            }
                        }
                        Ok(watcher::Event::Delete((k, _))) => {
                            offers.remove(&k);
                            vec![k]
                        }
                        Ok(watcher::Event::Init) => {
                            listed.clear();
                            vec![]
                        }
                        Ok(watcher::Event::InitDone) => {
                            let gone: Vec<SourceKey> = offers
                                .keys()
                                .filter(|k| k.kind == kind && !listed.contains(*k))
                                .cloned()
                                .collect();
                            for k in &gone {
                                offers.remove(k);
                            }
                            gone
                        }
                        Err(e) => {
                            debug!(error = %e, "source watch");
                            vec![]
                        }
                    }
                };
                if !feeds.wake_followers(&changed) {
                    return;
                }
            }
        }
    }

    /// Wake the NixOSNodes that follow one of `keys`; `false` once the controller is gone.
    fn wake_followers(&self, keys: &[SourceKey]) -> bool {
        for k in keys {
            for o in self.nixosnodes.state() {
                if o.spec.source_ref.as_ref().map(SourceKey::from).as_ref() == Some(k)
                    && self.wake.send(ObjectRef::new(&o.name_any())).is_err()
                {
                    return false;
                }
            }
        }
        true
    }

    /// The GitRepository watch, feeding the offers.
    fn gitrepositories(&self) -> impl Future<Output = ()> + Send + 'static {
        let ar = gitrepository_resource();
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .map(|ev| {
                ev.map(|e| {
                    map_event(e, |o: DynamicObject| {
                        let offer = serde_json::to_value(&o)
                            .map_err(|e| Untrusted::BadRevision(e.to_string()))
                            .and_then(|v| follow::gitrepository_offer(&v));
                        (key_of(SourceKind::GitRepository, &o), offer)
                    })
                })
            });
        self.feed(SourceKind::GitRepository, stream)
    }

    /// Forget every GitRepository offer (Flux was removed) and wake their followers, whose
    /// status then says the source is missing.
    fn forget_gitrepositories(&self) {
        let gone: Vec<SourceKey> = match self.offers.lock() {
            Ok(mut offers) => {
                let gone: Vec<SourceKey> = offers
                    .keys()
                    .filter(|k| k.kind == SourceKind::GitRepository)
                    .cloned()
                    .collect();
                for k in &gone {
                    offers.remove(k);
                }
                gone
            }
            Err(_) => return,
        };
        self.wake_followers(&gone);
    }

    /// Watch Flux's GitRepository CRD (by name) and run the GitRepository watch while the CRD
    /// is established and serves `v1`.
    async fn follow_flux(self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let by_name = watcher::Config::default().fields(&format!("metadata.name={FLUX_GITREPOSITORY_CRD}"));
        let events = watcher(crds, by_name).default_backoff();
        futures::pin_mut!(events);
        let mut running: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        let mut listed = false;
        loop {
            let serves = tokio::select! {
                ev = events.next() => match ev {
                    None => return,
                    Some(Ok(watcher::Event::Apply(crd) | watcher::Event::InitApply(crd))) => {
                        listed = true;
                        serves_gitrepository_v1(&crd)
                    }
                    Some(Ok(watcher::Event::Delete(_))) => false,
                    Some(Ok(watcher::Event::Init)) => {
                        listed = false;
                        continue;
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        if listed {
                            continue;
                        }
                        false
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "watch of Flux's GitRepository CRD");
                        continue;
                    }
                },
                // The GitRepository watch never ends by itself; if it does, start it again
                // at the next CRD event.
                () = async {
                    match running.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    running = None;
                    continue;
                }
            };
            match (serves, running.is_some()) {
                (true, false) => {
                    info!("Flux GitRepository served: NixOSNodes may follow one");
                    running = Some(Box::pin(self.gitrepositories()));
                }
                (false, true) => {
                    info!("Flux GitRepository no longer served: its offers are forgotten");
                    running = None;
                    self.forget_gitrepositories();
                }
                _ => {}
            }
        }
    }
}

/// Flux's GitRepository CRD serves `v1` and is established.
fn serves_gitrepository_v1(crd: &CustomResourceDefinition) -> bool {
    let served = crd
        .spec
        .versions
        .iter()
        .any(|v| v.name == FLUX_SOURCE_VERSION && v.served);
    let established = crd.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True")
    });
    served && established
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::api::{NixOSNodeStatus, Phase};
    use kube::runtime::reflector;

    fn following(name: &str, running: &str) -> NixOSNode {
        let mut o = NixOSNode::new(name, crate::sim::fixtures::following_spec("", "infra"));
        o.status = Some(NixOSNodeStatus {
            phase: Some(Phase::UpToDate),
            revision: Some(running.to_owned()),
            ..NixOSNodeStatus::default()
        });
        o
    }

    /// The effective specs of 1,000 nodes following one source: one pin for the group, the
    /// new commit and the derived flake for all, woken once when the pin moved; cheap.
    #[tokio::test]
    async fn a_thousand_followers_share_one_pin() {
        let (svc, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let client = Client::new(svc, "default");
        let (store, mut w) = reflector::store::<NixOSNode>();
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        w.apply_watcher_event(&watcher::Event::Init);
        for i in 0..1000 {
            w.apply_watcher_event(&watcher::Event::InitApply(following(&format!("n{i:04}"), &a)));
        }
        w.apply_watcher_event(&watcher::Event::InitDone);
        let (wake, mut woken) = mpsc::unbounded_channel();
        let f = Following::new(client, store.clone(), wake, 1);
        let key = SourceKey {
            kind: SourceKind::FlakeSource,
            namespace: crate::names::NAMESPACE.into(),
            name: "infra".into(),
        };
        let flake = "git+https://h/r?ref=refs/heads/main".to_owned();
        f.feeds.offers.lock().unwrap().insert(
            key.clone(),
            Ok(Offer {
                commit: b.clone(),
                flake: flake.clone(),
                git_ref: Some("refs/heads/main".into()),
            }),
        );
        let started = std::time::Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            let eff = f.effective_all(store.state());
            assert!(eff.iter().all(|o| o.spec.revision == b && o.spec.flake == flake));
        }
        let per = started.elapsed() / rounds;
        eprintln!("effective specs of 1000 followers: {per:?} per admission decision (debug build)");
        assert!(per < std::time::Duration::from_millis(100), "{per:?}");
        // The pin moved once (nothing → b): every member woken once.
        let mut n = 0;
        while woken.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 1000);
        // A node with nothing offered and nothing run has nothing to target.
        f.feeds
            .offers
            .lock()
            .unwrap()
            .insert(key, Err(Untrusted::NotResolved));
        let mut fresh = following("new", &a);
        fresh.status = None;
        f.pins.lock().unwrap().clear();
        let e = f.effective(Arc::new(fresh)).unwrap_err();
        assert!(e.to_string().contains("no resolved revision"), "{e}");
    }
}
