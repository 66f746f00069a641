//! One owner at a time for what `nixroll image` leaves on disk: the work directories and the
//! tools running in them.
//!
//! Everything goes through one lock. The main thread creates a work directory, spawns a tool,
//! reaps it and removes the directory while holding it; on SIGINT/SIGTERM the signal thread
//! takes it, stops every running tool (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and waits
//! for it, removes every work directory, and keeps the lock until the process exits. So a
//! directory is never created, nor a tool started, after the signal thread cleaned up, and the
//! two threads never remove the same directory at once (the race that left a work directory
//! holding a secret behind in half the tries of issue 20).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a tool gets to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct State {
    dirs: Vec<PathBuf>,
    children: Vec<(u64, Child)>,
    next_id: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    dirs: Vec::new(),
    children: Vec::new(),
    next_id: 0,
});

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Create a directory with `create` and register it, under the lock.
pub fn create_dir(create: impl FnOnce() -> std::io::Result<PathBuf>) -> std::io::Result<PathBuf> {
    let mut st = lock();
    let dir = create()?;
    st.dirs.push(dir.clone());
    Ok(dir)
}

/// Remove a registered directory (and everything in it), under the lock.
pub fn remove_dir(dir: &Path) {
    let mut st = lock();
    if let Some(i) = st.dirs.iter().position(|d| d == dir) {
        st.dirs.swap_remove(i);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A running tool, registered so that a signal can stop it.
#[derive(Debug)]
pub struct Running {
    id: u64,
}

/// Spawn `cmd` under the lock; `take` gets the child first (to take its pipes).
pub fn spawn(cmd: &mut Command, take: impl FnOnce(&mut Child)) -> std::io::Result<Running> {
    let mut st = lock();
    let mut child = cmd.spawn()?;
    take(&mut child);
    st.next_id += 1;
    let id = st.next_id;
    st.children.push((id, child));
    Ok(Running { id })
}

impl Running {
    /// `Child::try_wait`; a finished child is forgotten.
    pub fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        let mut st = lock();
        let Some(i) = st.children.iter().position(|(id, _)| *id == self.id) else {
            return Err(std::io::Error::other("the tool is no longer registered"));
        };
        let res = st.children[i].1.try_wait();
        if !matches!(res, Ok(None)) {
            st.children.swap_remove(i);
        }
        res
    }

    /// Kill (SIGKILL) and reap the child.
    pub fn kill(&self) {
        let mut st = lock();
        if let Some(i) = st.children.iter().position(|(id, _)| *id == self.id) {
            let (_, mut child) = st.children.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Never leave a tool running unowned (an early return from a wait loop).
        self.kill();
    }
}

/// Proof that the signal thread cleaned up: hold it until the process exits, so the main
/// thread can neither create a work directory nor start a tool any more.
#[must_use = "keep it until the process exits"]
#[derive(Debug)]
pub struct CleanedUp {
    _guard: MutexGuard<'static, State>,
    /// Tools that were stopped.
    pub stopped: usize,
    /// Work directories that were removed.
    pub removed: usize,
}

/// For the SIGINT/SIGTERM handler: stop every running tool (SIGTERM, up to [`STOP_GRACE`],
/// then SIGKILL) and wait for it, then remove every work directory.
pub fn stop_all_and_remove() -> CleanedUp {
    let mut st = lock();
    let children = std::mem::take(&mut st.children);
    let stopped = children.len();
    for (_, mut child) in children {
        stop(&mut child);
    }
    let dirs = std::mem::take(&mut st.dirs);
    let removed = dirs.len();
    for d in dirs {
        let _ = std::fs::remove_dir_all(&d);
    }
    CleanedUp {
        _guard: st,
        stopped,
        removed,
    }
}

fn stop(child: &mut Child) {
    // Not reaped yet (try_wait says None), so its pid cannot have been reused.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The step named by `NIXROLL_TEST_PAUSE_AT`, for tests that interrupt `nixroll image` at a
/// known point: the first time the step is reached, print `nixroll: paused at STEP` on stderr
/// and sleep [`PAUSE`] (a signal ends the pause), then go on. Steps: `workdir`, `built`,
/// `copied`, `written`, `verified`, `converted`, `synced`, `renamed`, `removing` (the work
/// directory, after success or failure), and `running:TOOL` just
/// after TOOL (`nix`, `qemu-img`, `debugfs`, `e2fsck`) was started.
pub fn checkpoint(step: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PAUSED: AtomicBool = AtomicBool::new(false);
    if std::env::var_os("NIXROLL_TEST_PAUSE_AT").is_some_and(|s| s == step)
        && !PAUSED.swap(true, Ordering::SeqCst)
    {
        eprintln!("nixroll: paused at {step}");
        std::thread::sleep(PAUSE);
    }
}

/// How long [`checkpoint`] pauses.
pub const PAUSE: Duration = Duration::from_secs(30);
