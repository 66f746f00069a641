//! A started embedded Kubernetes API server (the `embedded-apiserver` crate) with nixroll's
//! CRD installed, and a client of it.

use embedded_apiserver::ApiServer;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};

/// An API server on a free port of 127.0.0.1 and a client of it; no CRD installed.
pub async fn start() -> (ApiServer, Client) {
    let api = ApiServer::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let client = api.client().await.unwrap();
    (api, client)
}

/// Install nixroll's NixOSNode CRD through `client`.
pub async fn install_crd(client: &Client) {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &nixroll::api::crd())
        .await
        .unwrap();
}

/// [`start`], then [`install_crd`].
pub async fn start_with_crd() -> (ApiServer, Client) {
    let (api, client) = start().await;
    install_crd(&client).await;
    (api, client)
}

/// A second server on a free port over the same store as `api` (a second replica's view).
pub async fn second_server(api: &ApiServer) -> (ApiServer, Client) {
    let other = ApiServer::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), api.store())
        .await
        .unwrap();
    let client = other.client().await.unwrap();
    (other, client)
}
