//! Kubernetes Events (`events.k8s.io/v1`) with series aggregation and a bounded cache.
//!
//! Written by hand instead of kube-runtime's `Recorder`, on purpose: the Recorder keeps every
//! Event object it published for six minutes in a hash map whose entries are ~3 KB each
//! (a whole `Event` plus its key). During a 1,000-node rollout that map held ~7,000 entries
//! and was 35 MiB of the controller's 67 MiB peak, and it is scanned on every publish. Here a
//! repeat costs ~300 bytes of cache (the key and the Event's name and count) and the cache is
//! capped, so memory no longer grows with the cluster.
//!
//! On the wire: the first occurrence is created; a repeat of the same (object, reason, action,
//! type, note) within six minutes patches the existing Event's `series` (count and last
//! observed time). Unlike kube's Recorder, the note is part of the key: a series means "this
//! exact Event, N times", so `Updated (x2)` never hides a different first message.

use std::collections::HashMap;
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// How long a repeat joins the previous Event's series (client-go and kube use 6 minutes).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);
/// Series remembered at most; the oldest are forgotten first (a forgotten series only means
/// the next repeat creates a new Event).
const CACHE_CAP: usize = 4096;

/// One Event to publish.
#[derive(Clone, Debug)]
pub struct Note<'a> {
    pub reason: &'a str,
    pub action: &'a str,
    pub note: String,
    pub warning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    kind: String,
    namespace: String,
    name: String,
    reason: String,
    action: String,
    note: String,
    warning: bool,
}

#[derive(Clone, Debug)]
struct Series {
    /// Name of the Event object carrying the series.
    event: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events as `controller`/`instance`.
pub struct EventWriter {
    client: Client,
    controller: String,
    instance: String,
    cache: Mutex<HashMap<Key, Series>>,
}

impl EventWriter {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        EventWriter {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Series currently remembered.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Create the Event, or extend its series when it repeats.
    pub async fn publish(&self, ev: &Note<'_>, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let key = Key {
            kind: regarding.kind.clone().unwrap_or_default(),
            namespace: namespace.clone(),
            name: regarding.name.clone().unwrap_or_default(),
            reason: ev.reason.to_string(),
            action: ev.action.to_string(),
            note: ev.note.clone(),
            warning: ev.warning,
        };
        let repeat = self
            .lock()
            .get(&key)
            .filter(|s| s.last + SERIES_TTL > now)
            .cloned();
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(prev) = repeat {
            let count = prev.count + 1;
            let patch = serde_json::json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            match api
                .patch(&prev.event, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(
                        key,
                        Series {
                            event: prev.event,
                            count,
                            last: now,
                        },
                    );
                    return Ok(());
                }
                // The API server expired the Event: start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            action: Some(ev.action.to_string()),
            reason: Some(ev.reason.to_string()),
            note: Some(ev.note.clone()),
            type_: Some(if ev.warning { "Warning" } else { "Normal" }.to_string()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        };
        api.create(&PostParams::default(), &event).await?;
        self.remember(
            key,
            Series {
                event: name,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Series>> {
        // The map holds no invariant a panic could break; keep using it.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, key: Key, series: Series) {
        let now = series.last;
        let mut cache = self.lock();
        cache.insert(key, series);
        if cache.len() > CACHE_CAP {
            cache.retain(|_, s| s.last + SERIES_TTL > now);
        }
        while cache.len() > CACHE_CAP {
            let oldest = cache.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => cache.remove(&k),
                None => break,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    fn node_ref(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        }
    }

    async fn body(req: Request<Body>) -> serde_json::Value {
        let bytes = req.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn repeats_extend_a_series_and_the_cache_stays_bounded() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let writer = std::sync::Arc::new(EventWriter::new(Client::new(svc, "default"), "c", "c-1"));
        let note = |n: &str| Note {
            reason: "Draining",
            action: "Drain",
            note: n.to_string(),
            warning: false,
        };
        let w = writer.clone();
        let task = tokio::spawn(async move {
            w.publish(&note("3 left"), &node_ref("n1")).await.unwrap();
            w.publish(&note("3 left"), &node_ref("n1")).await.unwrap();
            w.publish(&note("1 left"), &node_ref("n1")).await.unwrap();
        });
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/default/events"
        );
        let created = body(req).await;
        assert_eq!(created["note"], "3 left");
        assert_eq!(created["reportingController"], "c");
        assert_eq!(created["regarding"]["name"], "n1");
        let name = created["metadata"]["name"].as_str().unwrap().to_string();
        send.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(serde_json::to_vec(&created).unwrap()))
                .unwrap(),
        );
        // The same reason and note again: the series of the first Event.
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), "PATCH");
        assert_eq!(
            req.uri().path(),
            format!("/apis/events.k8s.io/v1/namespaces/default/events/{name}")
        );
        let patch = body(req).await;
        assert_eq!(patch["series"]["count"], 2);
        assert_eq!(patch.get("note"), None, "the note stays what it was");
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&created).unwrap()))
                .unwrap(),
        );
        // The same reason with another note: a new Event, not `(x3)` showing only the last note.
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), "POST", "a different message is a new Event");
        let second = body(req).await;
        assert_eq!(second["note"], "1 left");
        assert_eq!(second["reason"], "Draining");
        assert_ne!(second["metadata"]["name"], created["metadata"]["name"]);
        send.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(serde_json::to_vec(&second).unwrap()))
                .unwrap(),
        );
        task.await.unwrap();
        assert_eq!(writer.cached(), 2);

        // Far more distinct series than the cap: the cache holds at most the cap.
        for i in 0..(CACHE_CAP + 10) {
            let key = Key {
                kind: "Node".into(),
                namespace: "default".into(),
                name: format!("n{i}"),
                reason: "Draining".into(),
                action: "Drain".into(),
                note: "3 left".into(),
                warning: false,
            };
            writer.remember(
                key,
                Series {
                    event: format!("e{i}"),
                    count: 1,
                    last: Timestamp::now(),
                },
            );
        }
        assert_eq!(writer.cached(), CACHE_CAP);
    }
}
