//! The run loop: serve metrics, stand by or lead (the Lease in [`super::leader`]), and while
//! leading run kube-runtime's `Controller` over the watches (NixOSNodes, Nodes filtered to what
//! the rollout observes, the pause ConfigMap), the targeted wake-ups and the admission sweep;
//! stop cleanly on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerRuntimeConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Context, ControllerConfig, ControllerError, Health, LeaderElector, LeaseOutcome, Metrics, Stores, Synced,
    SyncedSetter, error_policy, metrics, observe, reconcile,
};
use crate::api::{NixOSNode, NixOSPool};
use crate::names::PAUSE_CONFIGMAP;
use crate::rollout::NodeObservation;

type StopSignal = Shared<BoxFuture<'static, ()>>;

fn stop_signal(rx: &watch::Receiver<bool>) -> StopSignal {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
    .boxed()
    .shared()
}

/// An `inspect` callback counting a watch as listed at its first `InitDone`.
fn counts_listing<K>(set: SyncedSetter) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    let mut done = false;
    move |ev| {
        if !done && matches!(ev, Ok(watcher::Event::InitDone)) {
            done = true;
            set.listed();
        }
    }
}

/// Like [`counts_listing`], but a kind the API server does not serve (the NixOSPool CRD not
/// installed: 404 on the initial list) counts as listed and empty; the watch keeps retrying
/// and fills the cache once the CRD appears.
fn counts_listing_or_absent<K>(set: SyncedSetter) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    let mut done = false;
    move |ev| {
        let listed = match ev {
            Ok(watcher::Event::InitDone) => true,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) => s.code == 404,
            _ => false,
        };
        if !done && listed {
            done = true;
            set.listed();
        }
    }
}

/// Only forward Node events that change what the rollout observes (heartbeats do not).
fn node_triggers(
    stream: impl futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<Node, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<String, NodeObservation> = HashMap::new();
    stream.flat_map(move |ev| {
        let out: Vec<Result<Node, watcher::Error>> = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                let obs = observe::observe_node(Some(&n));
                let name = n.name_any();
                if seen.get(&name) == Some(&obs) {
                    Vec::new()
                } else {
                    seen.insert(name, obs);
                    vec![Ok(n)]
                }
            }
            Ok(watcher::Event::Delete(n)) => {
                seen.remove(&n.name_any());
                vec![Ok(n)]
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => Vec::new(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(out)
    })
}

/// Ends a task when dropped (also when the leading future is dropped rather than finished).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lead: run the kube-runtime Controller until `stop` (graceful) or until dropped (forceful).
async fn lead(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    leading: Arc<AtomicBool>,
    stop: StopSignal,
) {
    // Readiness comes from the watch streams themselves: each counts once when its first
    // list is in the store (the `InitDone` after `reflect`).
    let (set_synced, synced) = Synced::new(4);
    let (nxn_reader, nxn_writer) = reflector::store::<NixOSNode>();
    let nxn_stream = watcher(Api::<NixOSNode>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(observe::trim_nixosnode)
        .reflect(nxn_writer)
        .inspect(counts_listing(set_synced.clone()))
        .applied_objects();

    let (node_reader, node_writer) = reflector::store::<Node>();
    let node_stream = node_triggers(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(observe::trim_node)
            .reflect(node_writer)
            .inspect(counts_listing(set_synced.clone())),
    );

    let (pause_reader, pause_writer) = reflector::store::<ConfigMap>();
    let pause_stream = watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &config.pause_namespace),
        watcher::Config::default().fields(&format!("metadata.name={PAUSE_CONFIGMAP}")),
    )
    .default_backoff()
    .modify(|cm: &mut ConfigMap| {
        cm.metadata.managed_fields = None;
        cm.data = None;
        cm.binary_data = None;
    })
    .reflect(pause_writer)
    .inspect(counts_listing(set_synced.clone()))
    .touched_objects()
    .filter_map(|r| std::future::ready(r.ok().map(|_| ())));

    // NixOSPools: a spec change (pause, budget, order) re-runs every NixOSNode's reconcile; the
    // pools' own status writes (no generation change) trigger nothing.
    let (pool_reader, pool_writer) = reflector::store::<NixOSPool>();
    let pool_stream = watcher(Api::<NixOSPool>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|p: &mut NixOSPool| p.metadata.managed_fields = None)
        .reflect(pool_writer)
        .inspect(counts_listing_or_absent(set_synced.clone()))
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default())
        .filter_map(|r| std::future::ready(r.ok().map(|_| ())));

    let concurrency = config.concurrency;
    let stores = Stores {
        nixosnodes: nxn_reader,
        nodes: node_reader,
        pause: pause_reader,
        pools: pool_reader,
        synced: synced.clone(),
    };
    let (ctx, wake_rx) = Context::new(client, config, stores, metrics, leading);
    ctx.watch_disruption_budgets();
    ctx.follow.start(&ctx.config.follow, &ctx.config.identity);
    let wake_stream =
        futures::stream::unfold(wake_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });

    // Triggers that arrive while the caches are still filling (the initial list) find nothing
    // in the store and are dropped by kube-runtime; so once the caches are synced, every
    // NixOSNode is reconciled once.
    let (resync_tx, resync_rx) = tokio::sync::oneshot::channel::<()>();
    let synced = {
        let health = health.clone();
        async move {
            if synced.wait().await {
                info!("watch caches synced");
                health.synced.store(true, Ordering::SeqCst);
                let _ = resync_tx.send(());
            }
        }
    };
    let resync_stream = futures::stream::once(resync_rx).filter_map(|r| std::future::ready(r.ok()));
    let pause_stream =
        futures::stream::select(futures::stream::select(pause_stream, resync_stream), pool_stream);

    // The safety net: however a wake-up got lost, an admissible node waits one sweep at most.
    let sweep_stream = {
        let ctx = ctx.clone();
        let mut every = tokio::time::interval(ctx.config.admission_sweep.max(Duration::from_millis(100)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        futures::stream::unfold((every, ctx), |(mut every, ctx)| async move {
            every.tick().await;
            let refs = ctx.sweep().await;
            ctx.pool_status_pass().await;
            Some((futures::stream::iter(refs), (every, ctx)))
        })
        .flatten()
    };

    // Health gates: evaluated on their own task (each under its own timeout), so a slow gate
    // never delays the sweep; ended with this leadership term.
    let gates = {
        let ctx = ctx.clone();
        // Until the first gate pass has read them, the cluster-default gates block (fail closed).
        if let Ok(mut d) = ctx.default_gates.lock() {
            *d = super::pools::DefaultGates::NotReadYet;
        }
        let period = ctx.config.admission_sweep.max(Duration::from_millis(100));
        AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                ctx.gate_pass().await;
            }
        }))
    };

    let controller = Controller::for_stream(nxn_stream, ctx.nixosnodes.clone())
        .watches_stream(node_stream, |n: Node| {
            Some(ObjectRef::<NixOSNode>::new(&n.name_any()))
        })
        .reconcile_all_on(pause_stream)
        .reconcile_on(wake_stream)
        .reconcile_on(sweep_stream)
        .with_config(ControllerRuntimeConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(e) = res {
                debug!(error = %e, "controller stream");
            }
            std::future::ready(())
        });
    futures::future::join(controller, synced).await;
    drop(gates);
    health.synced.store(false, Ordering::SeqCst);
}

/// Keep renewing; return when leadership is lost (held by another, or no renewal succeeded
/// within the renew deadline).
async fn keep_lease(elector: &mut LeaderElector) {
    let cfg = elector.config().clone();
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_period).await;
        let left = cfg.renew_deadline.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(left.max(Duration::from_millis(1)), elector.try_acquire_or_renew()).await {
            Ok(Ok(LeaseOutcome::Renewed | LeaseOutcome::Acquired)) => last_ok = Instant::now(),
            Ok(Ok(LeaseOutcome::HeldByOther { holder, .. })) => {
                warn!(holder, "lease taken by another replica");
                return;
            }
            Ok(Ok(LeaseOutcome::LostRace)) => debug!("lease renewal conflicted; retrying"),
            Ok(Err(e)) => warn!(category = e.category(), error = %e, "lease renewal failed"),
            Err(_) => debug!("lease renewal timed out"),
        }
        if last_ok.elapsed() >= cfg.renew_deadline {
            warn!("no lease renewal within the deadline");
            return;
        }
    }
}

/// Wait until this replica holds the Lease. `Ok(false)`: stopped first.
async fn acquire(elector: &mut LeaderElector, stop: StopSignal) -> bool {
    let retry = elector.config().renew_period;
    loop {
        let step = tokio::select! {
            _ = stop.clone() => return false,
            r = elector.try_acquire_or_renew() => r,
        };
        let wait = match step {
            Ok(LeaseOutcome::Acquired | LeaseOutcome::Renewed) => return true,
            Ok(LeaseOutcome::HeldByOther { holder, retry_in }) => {
                debug!(holder, ?retry_in, "standing by");
                retry_in
            }
            Ok(LeaseOutcome::LostRace) => Duration::from_millis(fastrand::u64(100..500)),
            Err(e) => {
                warn!(category = e.category(), error = %e, "lease acquisition failed");
                retry
            }
        };
        tokio::select! {
            _ = stop.clone() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Run the controller until `shutdown` resolves: serve metrics, take part in leader election
/// (when configured) and reconcile while leading. Returns after a clean shutdown (in-flight
/// reconciles finished, Lease released).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let main = run_until_stopped(client, config, stop_rx);
    tokio::pin!(main);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut main => return r,
        _ = &mut shutdown => {
            info!("shutting down");
            let _ = stop_tx.send(true);
        }
    }
    main.await
}

async fn run_until_stopped(
    client: Client,
    config: ControllerConfig,
    stop_rx: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    if let Some(addr) = config.metrics_addr {
        let (local, _server) = metrics::serve(addr, metrics.clone(), health.clone(), stop_signal(&stop_rx))
            .await
            .map_err(|source| ControllerError::MetricsServer { addr, source })?;
        info!(%local, "serving metrics");
        let _ = config.metrics_bound.set(local);
    }
    // Every replica accepts pushes (no leader needed); the leader resolves.
    if let Some(wh) = config.webhook.clone() {
        let addr = wh.addr;
        let (local, _server) =
            super::webhook::serve(client.clone(), wh, metrics.clone(), stop_signal(&stop_rx))
                .await
                .map_err(|source| ControllerError::WebhookServer { addr, source })?;
        info!(%local, "serving the push webhook receiver");
        let _ = config.webhook_bound.set(local);
    }
    let leading = Arc::new(AtomicBool::new(false));
    let Some(le) = config.leader_election.clone() else {
        leading.store(true, Ordering::SeqCst);
        metrics.leader.set(1);
        lead(client, config, metrics, health, leading, stop_signal(&stop_rx)).await;
        return Ok(());
    };
    let mut elector = LeaderElector::new(client.clone(), le, config.api_timeout);
    loop {
        health.standby.store(true, Ordering::SeqCst);
        if !acquire(&mut elector, stop_signal(&stop_rx)).await {
            return Ok(());
        }
        health.standby.store(false, Ordering::SeqCst);
        leading.store(true, Ordering::SeqCst);
        metrics.leader.set(1);
        info!(identity = %config.identity, "leading");
        let controller = lead(
            client.clone(),
            config.clone(),
            metrics.clone(),
            health.clone(),
            leading.clone(),
            stop_signal(&stop_rx),
        );
        let lost = tokio::select! {
            _ = controller => false,
            _ = keep_lease(&mut elector) => true,
        };
        leading.store(false, Ordering::SeqCst);
        metrics.leader.set(0);
        health.synced.store(false, Ordering::SeqCst);
        if !lost {
            if let Err(e) = elector.release().await {
                warn!(category = e.category(), error = %e, "could not release the lease");
            }
            return Ok(());
        }
        warn!("lost leadership; stopped reconciling, standing by");
        if *stop_rx.borrow() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Every task waiting for the caches is woken (kube-runtime's `wait_until_ready` wakes only
    /// the last one to poll), and readiness needs the first list of all three watches.
    #[tokio::test]
    async fn synced_wakes_every_waiter_once_all_watches_listed() {
        let (set, synced) = Synced::new(4);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let s = synced.clone();
                tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(5), s.wait()).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let mut nxn = counts_listing::<NixOSNode>(set.clone());
        let mut nodes = counts_listing::<Node>(set.clone());
        let mut pause = counts_listing::<ConfigMap>(set.clone());
        nxn(&Ok(watcher::Event::InitDone));
        nxn(&Ok(watcher::Event::InitDone)); // a relist does not count twice
        nodes(&Ok(watcher::Event::Init));
        nodes(&Ok(watcher::Event::InitDone));
        assert!(!synced.is_synced(), "the pause watch has not listed yet");
        pause(&Ok(watcher::Event::InitDone));
        assert!(!synced.is_synced(), "the pool watch has not listed yet");
        // The NixOSPool CRD is not installed: its 404 counts as an empty list.
        let mut pools = counts_listing_or_absent::<NixOSPool>(set.clone());
        let not_found = kube::Error::Api(Box::new(
            kube::core::Status::failure("not found", "NotFound").with_code(404),
        ));
        pools(&Err(watcher::Error::InitialListFailed(not_found)));
        assert!(synced.is_synced());
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(true), "a waiter was not woken");
        }
    }
}
