//! Link flags for the release binary (issue 20 §5, docs/benchmarks.md "Agent memory").
//!
//! A release build for glibc, dynamically linked, gets `-z pack-relative-relocs` (DT_RELR,
//! GNU ld ≥ 2.38, glibc ≥ 2.36): the table of relative relocations the loader reads at every
//! start shrinks from ~1.7 MB to a few KB, and with it the idle agent's resident memory. Debug
//! builds (the tests) and static builds (the container image) are linked as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let gnu = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "gnu");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux");
    let static_crt =
        std::env::var("CARGO_CFG_TARGET_FEATURE").is_ok_and(|f| f.split(',').any(|x| x == "crt-static"));
    if release && gnu && linux && !static_crt {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
