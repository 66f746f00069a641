//! One real control plane for the whole test binary, with nixroll installed by
//! `kubectl apply -k deploy/` exactly as the README says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use nixroll::sim::controlplane::{ControlPlane, ControlPlaneOptions};

use crate::common;

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

static PLANE: OnceLock<ControlPlane> = OnceLock::new();
/// Tests that make Nodes, pods and NixOSNodes of the simulated cluster take this, one at a
/// time: they share the one API server.
pub static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn assets() -> Option<PathBuf> {
    ControlPlane::assets_dir(&Path::new(ROOT).join("target/kube-bin"))
}

/// The shared control plane, started (and nixroll installed) by the first test that asks.
/// `None`: no kube-apiserver here, and not in CI (the test returns).
pub fn plane() -> Option<&'static ControlPlane> {
    let found = assets();
    if !common::require(
        "a real kube-apiserver (KUBEBUILDER_ASSETS or target/kube-bin; docs/testing.md)",
        found.is_some(),
    ) {
        return None;
    }
    let assets = found?;
    Some(PLANE.get_or_init(move || {
        // Its own thread and runtime: the control plane outlives every test's runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let plane = rt
                .block_on(ControlPlane::start(&ControlPlaneOptions {
                    assets,
                    controller_manager: true,
                }))
                .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
            install(&plane);
            plane
        })
        .join()
        .unwrap()
    }))
}

/// `kubectl --kubeconfig <admin> args…`.
pub fn kubectl(plane: &ControlPlane, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap()
}

/// `kubectl …` must succeed; its stdout.
pub fn kubectl_ok(plane: &ControlPlane, args: &[&str]) -> String {
    let out = kubectl(plane, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's install: `kubectl apply -k deploy/`, then wait for the CRDs.
fn install(plane: &ControlPlane) {
    let out = kubectl_ok(plane, &["apply", "-k", "deploy/"]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/nixosnodes.nixroll.io created"),
        "{out}"
    );
    kubectl_ok(
        plane,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/nixosnodes.nixroll.io",
            "crd/flakesources.nixroll.io",
        ],
    );
}
