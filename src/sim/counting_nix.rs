//! The agents' Nix in the simulated cluster, counting what costs an evaluation or a download:
//! every `realise` (`nix build`: evaluate the flake, build or substitute) and every
//! `substitute` (fetch a builder's closure). The demo's `--revert` reports the count (expected
//! 0: the previous system stays pinned on every node, docs/agent.md "Quick rollback").

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use crate::nix::{Nix, NixError, Substitution};

/// `inner`, with every `realise` and `substitute` counted in `count`.
#[derive(Debug)]
pub struct CountingNix {
    inner: Arc<dyn Nix>,
    count: Arc<AtomicUsize>,
}

impl CountingNix {
    pub fn new(inner: Arc<dyn Nix>, count: Arc<AtomicUsize>) -> CountingNix {
        CountingNix { inner, count }
    }
}

impl Nix for CountingNix {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.realise(installable, gc_root)
    }

    fn substitute<'a>(
        &'a self,
        path: &'a str,
        from: &'a Substitution,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.substitute(path, from, gc_root)
    }

    fn closure_info<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::builder::NarInfo>, NixError>> {
        self.inner.closure_info(path)
    }

    fn closure_bytes<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, NixError>> {
        self.inner.closure_bytes(path)
    }

    fn set_profile<'a>(&'a self, profile: &'a Path, system: &'a str) -> BoxFuture<'a, Result<(), NixError>> {
        self.inner.set_profile(profile, system)
    }

    fn rollback_profile<'a>(&'a self, profile: &'a Path) -> BoxFuture<'a, Result<(), NixError>> {
        self.inner.rollback_profile(profile)
    }

    fn switch_generation<'a>(
        &'a self,
        profile: &'a Path,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        self.inner.switch_generation(profile, generation)
    }
}
