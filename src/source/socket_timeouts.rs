//! libgit2's process-wide socket timeouts: the one place in this crate that uses `unsafe`.
//!
//! git2 calls block, and a thread that `tokio::time::timeout` gave up on keeps running. Only
//! libgit2 itself can end a read on a socket that never delivers a byte, and it does so when
//! its global socket timeouts are set: `connect` bounds the TCP connect, `idle` bounds every
//! single wait for the socket to become readable or writable (`poll` in
//! `streams/socket.c`; for SSH, `libssh2_session_set_timeout`). git2 exposes the setters as
//! `unsafe fn` because they write two C `int`s without synchronisation.
//!
//! Why the call below is sound: those two ints are read only when libgit2 opens a network
//! stream (socket or SSH session). In this process, every git2 network operation runs in
//! [`super::resolve`], and each one first calls [`in_force`], which goes through the same
//! [`OnceLock`] as the setter. `OnceLock` runs the setter at most once and makes its write
//! happen-before every later return of `get_or_init`, so no read of the ints can race the
//! write and no second write exists. `tests::git2_is_used_only_in_src_source` keeps git2 out
//! of the rest of the crate, and `cargo tree -i libgit2-sys` shows no other crate linking
//! libgit2. The crate lint is `unsafe_code = "deny"` (not `forbid`, which cannot be lifted
//! locally) and `tests::one_audited_unsafe` checks that this file holds the crate's only
//! `unsafe`.

use std::sync::OnceLock;
use std::time::Duration;

/// The two libgit2 socket timeouts (process-wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketTimeouts {
    /// Bound on the TCP connect.
    pub connect: Duration,
    /// Bound on each wait for the socket to become readable or writable. A server that
    /// sends nothing ends the thread after this long; one that trickles bytes is cut by the
    /// transfer callbacks (fetch) or held to one thread per remote (see `resolve.rs`).
    pub idle: Duration,
}

impl SocketTimeouts {
    /// Used when nothing set them before the first resolver: generous enough for a
    /// pack being computed on a big server (git sends keepalives every 5s meanwhile).
    pub const DEFAULT: SocketTimeouts = SocketTimeouts {
        connect: Duration::from_secs(10),
        idle: Duration::from_secs(30),
    };
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SocketTimeoutsError {
    #[error("git socket timeouts must be between 1ms and {max:?}, got connect {connect:?}, idle {idle:?}")]
    OutOfRange {
        connect: Duration,
        idle: Duration,
        max: Duration,
    },
    #[error("libgit2 refused the socket timeouts: {0}")]
    Libgit2(String),
}

static IN_FORCE: OnceLock<Result<SocketTimeouts, SocketTimeoutsError>> = OnceLock::new();

/// Sets libgit2's socket timeouts if nothing has yet, and returns the ones in force (the
/// first caller wins; a controller calls this at startup with its configuration).
pub fn set(wanted: SocketTimeouts) -> Result<SocketTimeouts, SocketTimeoutsError> {
    IN_FORCE.get_or_init(|| apply(wanted)).clone()
}

/// The timeouts in force, setting [`SocketTimeouts::DEFAULT`] if none were set. Every git2
/// network operation calls this first; an error means "do not touch the network".
pub fn in_force() -> Result<SocketTimeouts, SocketTimeoutsError> {
    set(SocketTimeouts::DEFAULT)
}

fn millis(d: Duration) -> Option<i32> {
    i32::try_from(d.as_millis()).ok().filter(|ms| *ms > 0)
}

fn apply(t: SocketTimeouts) -> Result<SocketTimeouts, SocketTimeoutsError> {
    let (Some(connect), Some(idle)) = (millis(t.connect), millis(t.idle)) else {
        return Err(SocketTimeoutsError::OutOfRange {
            connect: t.connect,
            idle: t.idle,
            max: Duration::from_millis(u64::from(i32::MAX.unsigned_abs())),
        });
    };
    set_libgit2(connect, idle).map_err(|e| SocketTimeoutsError::Libgit2(e.message().to_owned()))?;
    Ok(t)
}

#[allow(unsafe_code)]
fn set_libgit2(connect_ms: i32, idle_ms: i32) -> Result<(), git2::Error> {
    // SAFETY: called only from `apply`, which only `IN_FORCE.get_or_init` runs: once per
    // process, and before any git2 network operation of this process (each calls `in_force`
    // first, see the module documentation), so nothing reads the two ints concurrently.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(connect_ms)?;
        git2::opts::set_server_timeout_in_milliseconds(idle_ms)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    fn sources() -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect()
    }

    #[test]
    fn one_audited_unsafe() {
        // Spelled in pieces so that these lines do not match themselves.
        let kw = concat!("un", "safe");
        let patterns = [
            format!("{kw} {{"),
            format!("{kw} fn"),
            format!("{kw} impl"),
            format!("{kw} extern"),
            format!("allow({kw}_code)"),
        ];
        let mut found = Vec::new();
        for (p, text) in sources() {
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if patterns.iter().any(|pat| code.contains(pat.as_str())) {
                    found.push(format!("{}:{}", p.display(), i + 1));
                }
            }
        }
        let here = found.iter().filter(|f| f.contains("socket_timeouts.rs")).count();
        assert_eq!(here, 2, "allow + block here: {found:#?}");
        assert_eq!(found.len(), 2, "outside socket_timeouts.rs: {found:#?}");
    }

    #[test]
    fn git2_is_used_only_in_src_source() {
        for (p, text) in sources() {
            if text.contains("git2::") {
                assert!(
                    p.components().any(|c| c.as_os_str() == "source"),
                    "{} uses git2 outside src/source/: its network calls must go through the resolver, \
                     which sets libgit2's socket timeouts first",
                    p.display()
                );
            }
        }
    }

    #[test]
    fn rejects_zero_and_huge() {
        use super::*;
        let zero = SocketTimeouts {
            connect: Duration::ZERO,
            idle: Duration::from_secs(1),
        };
        assert!(matches!(apply(zero), Err(SocketTimeoutsError::OutOfRange { .. })));
        let huge = SocketTimeouts {
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(u64::MAX / 4),
        };
        assert!(matches!(apply(huge), Err(SocketTimeoutsError::OutOfRange { .. })));
    }
}
