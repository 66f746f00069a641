//! The container image. `image_build_runs_nixroll_from_the_image` runs `image/build.sh`: a
//! static release build (minutes on 2 cores, so it is `#[ignore]`d in `cargo test`; run it with
//! `cargo test --test container_image -- --ignored`), buildah, skopeo, umoci and runc. The other test
//! keeps the Containerfile, the build script and the manifests in agreement and runs in CI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn containerfile_is_minimal_multi_arch_non_root_and_labelled() {
    let text = std::fs::read_to_string(format!("{ROOT}/image/Containerfile")).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.starts_with(' '))
        .collect();
    assert_eq!(instructions[0], "FROM scratch", "no base image to pull");
    assert!(instructions.contains(&"ARG TARGETARCH"));
    assert!(
        instructions.iter().all(|i| !i.starts_with("RUN")),
        "nothing runs at build time, so any builder on any architecture builds it"
    );
    for copy in ["nixroll /bin/nixroll", "nsenter /bin/nsenter"] {
        assert!(
            instructions
                .iter()
                .any(|i| i.starts_with("COPY dist/linux/${TARGETARCH}/") && i.ends_with(copy)),
            "COPY of {copy} for TARGETARCH"
        );
    }
    assert!(instructions.contains(&"COPY dist/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt"));
    assert!(instructions.contains(&"USER 65532:65532"));
    assert!(instructions.contains(&"ENTRYPOINT [\"/bin/nixroll\"]"));
    assert!(text.contains(&format!("ARG VERSION={}", env!("CARGO_PKG_VERSION"))));
    for label in [
        "title",
        "description",
        "version",
        "revision",
        "source",
        "licenses",
    ] {
        assert!(
            text.contains(&format!("org.opencontainers.image.{label}=")),
            "label {label}"
        );
    }
    // The controller runs as that user; the agent is root (it enters the host's namespaces).
    let deploy = std::fs::read_to_string(format!("{ROOT}/deploy/controller.yaml")).unwrap();
    assert!(deploy.contains("runAsUser: 65532"));
    let out = Command::new("bash")
        .args(["-n", &format!("{ROOT}/image/build.sh")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "a static release build: minutes; run with --ignored"]
fn image_build_runs_nixroll_from_the_image() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(format!("{ROOT}/image/build.sh"))
        .arg(out_dir.path())
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "image/build.sh failed:\n{log}");
    assert!(
        log.contains(&format!(
            "/bin/nixroll --version: nixroll {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "/bin/nsenter -F /bin/nixroll --version: nixroll {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{log}"
    );
}
