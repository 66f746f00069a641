//! Run the real `kubectl` against an [`ApiServer`](crate::ApiServer), for tests and demos of
//! what a kubectl user sees.
//!
//! Every run has a deadline: kubectl's output pipes are read on two threads, and a run whose
//! pipes are still open at the deadline is killed and reported as [`KubectlError::Timeout`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where kubectl is looked for.
const PLACES: [&str; 2] = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"];

/// Default deadline of one kubectl run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("kubectl {args:?}: cannot run {bin}: {source}")]
    Spawn {
        bin: String,
        args: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("kubectl {args:?} did not finish within {timeout:?} and was killed")]
    Timeout { args: Vec<String>, timeout: Duration },
}

/// What one run printed.
#[derive(Clone, Debug)]
pub struct KubectlOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    /// stdout, then stderr: what a user sees in a terminal.
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// What a caller reports: stdout when kubectl succeeded (the answer), both streams when it
    /// failed (the error is on stderr, context may be on stdout).
    pub fn text(&self) -> String {
        if self.ok {
            self.stdout.clone()
        } else {
            self.combined()
        }
    }
}

/// A kubectl bound to one kubeconfig; `HOME` is the kubeconfig's directory, so no cache or
/// config of the machine's user is read or written.
#[derive(Clone, Debug)]
pub struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    timeout: Duration,
}

impl Kubectl {
    /// The installed kubectl, if any.
    pub fn find() -> Option<PathBuf> {
        PLACES.iter().map(PathBuf::from).find(|p| p.exists())
    }

    /// kubectl at `bin` with `--kubeconfig kubeconfig`.
    pub fn new(bin: impl Into<PathBuf>, kubeconfig: impl Into<PathBuf>) -> Kubectl {
        Kubectl {
            bin: bin.into(),
            kubeconfig: kubeconfig.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Another deadline per run.
    pub fn with_timeout(mut self, timeout: Duration) -> Kubectl {
        self.timeout = timeout;
        self
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Run `kubectl --kubeconfig … ARGS`, with `stdin` fed and closed.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<KubectlOutput, KubectlError> {
        let owned = || args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        if let Some(home) = self.kubeconfig.parent() {
            cmd.env("HOME", home);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| KubectlError::Spawn {
            bin: self.bin.display().to_string(),
            args: owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel::<(bool, String)>();
        if let Some(out) = child.stdout.take() {
            read_all(out, true, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            read_all(err, false, tx.clone());
        }
        drop(tx);
        if let Some(mut input) = child.stdin.take() {
            // A kubectl that exits without reading its input closes the pipe: not an error here.
            let _ = input.write_all(stdin.unwrap_or("").as_bytes());
        }
        let deadline = Instant::now() + self.timeout;
        let (mut stdout, mut stderr) = (String::new(), String::new());
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((true, s)) => stdout = s,
                Ok((false, s)) => stderr = s,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(KubectlError::Timeout {
                        args: owned(),
                        timeout: self.timeout,
                    });
                }
            }
        }
        // Both pipes are closed: kubectl has exited or is exiting.
        let ok = child.wait().map(|s| s.success()).unwrap_or(false);
        Ok(KubectlOutput { ok, stdout, stderr })
    }
}

fn read_all(mut pipe: impl Read + Send + 'static, is_stdout: bool, tx: mpsc::Sender<(bool, String)>) {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send((is_stdout, String::from_utf8_lossy(&buf).into_owned()));
    });
}
