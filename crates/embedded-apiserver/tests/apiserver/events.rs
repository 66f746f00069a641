//! Events in `v1` and `events.k8s.io/v1`, their bound, and kube-runtime's `Recorder` series.

use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use embedded_apiserver::StoreOptions;
use serde_json::json;

use super::common::*;

#[tokio::test]
async fn events_in_both_apis_share_storage() {
    let (_srv, client) = start().await;
    let ev: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    ev.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
            "reason": "Drained", "note": "drained n1", "type": "Normal", "action": "Drain",
            "reportingController": "example.com/controller", "reportingInstance": "c-1",
            "regarding": {"kind": "Machine", "name": "n1", "apiVersion": "example.com/v1"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let l = core
        .list(&ListParams::default().fields("involvedObject.name=n1,involvedObject.kind=Machine"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].message.as_deref(), Some("drained n1"));
}

#[tokio::test]
async fn events_are_bounded() {
    let (_srv, client) = start_with(StoreOptions {
        event_limit: 3,
        ..StoreOptions::default()
    })
    .await;
    let ev: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        ev.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("e{i}")},
                "involvedObject": {"kind": "Node", "name": "n1"}, "reason": "R", "message": "m"}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    let names: Vec<String> = ev
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| e.name_any())
        .collect();
    assert_eq!(names, vec!["e2", "e3", "e4"]);
}

#[tokio::test]
async fn kube_event_recorder_creates_then_patches_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (_srv, client) = start().await;
    install_crd(&client).await;
    let api: Api<Machine> = Api::all(client.clone());
    let o = api
        .patch("n1", &PatchParams::apply("flux"), &Patch::Apply(machine("n1")))
        .await
        .unwrap();
    let rec = Recorder::new(
        client.clone(),
        Reporter {
            controller: "rollout-controller".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Cordoned".into(),
        note: Some("cordoned n1".into()),
        action: "Cordon".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&o, &());
    rec.publish(&ev, &reference).await.unwrap();
    rec.publish(&ev, &reference).await.unwrap();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let l = core
        .list(&ListParams::default().fields("involvedObject.name=n1"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1, "the second publish patches the first event");
    assert_eq!(l.items[0].reason.as_deref(), Some("Cordoned"));
    assert_eq!(l.items[0].series.as_ref().and_then(|s| s.count), Some(2));
}
