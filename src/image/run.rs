//! Running the outside tools (`debugfs`, `e2fsck`, `qemu-img`, `nix`) with a timeout.
//!
//! Arguments never carry secret bytes: secrets reach `debugfs` through its standard input (a
//! memfd, see [`super::ext4`]) and come back through a pipe read here.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cleanup::{self, Running};

/// What a finished tool printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run {program} (is it installed?)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}s and was killed", timeout.as_secs())]
    Timeout { program: String, timeout: Duration },
    #[error("waiting for {program}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the tool's standard error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    /// Captured into [`Output::stderr`].
    Capture,
    /// Passed through to ours (Nix's build log and progress).
    Inherit,
}

/// Run `cmd` to completion with `stdin` (or nothing), capturing stdout; kill it after `timeout`.
pub fn run(
    mut cmd: Command,
    stdin: Option<Stdio>,
    stderr: Stderr,
    timeout: Duration,
) -> Result<Output, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(stdin.unwrap_or_else(Stdio::null));
    cmd.stdout(Stdio::piped());
    cmd.stderr(match stderr {
        Stderr::Capture => Stdio::piped(),
        Stderr::Inherit => Stdio::inherit(),
    });
    let mut stdout = None;
    let mut stderr_pipe = None;
    // Registered with the cleanup owner, so that SIGINT/SIGTERM stops it (see [`cleanup`]).
    let child = cleanup::spawn(&mut cmd, |c| {
        stdout = c.stdout.take();
        stderr_pipe = c.stderr.take();
    })
    .map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    // The command (and with it any stdin fd we handed over) is dropped here, so that our copy
    // of a secret's memfd is closed as soon as the child has its own.
    drop(cmd);
    let out = reader(stdout);
    let err = reader(stderr_pipe);
    cleanup::checkpoint(&format!("running:{program}"));
    let status = wait(&child, &program, timeout)?;
    let stdout = out.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

fn wait(child: &Running, program: &str, timeout: Duration) -> Result<ExitStatus, RunError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(source) => {
                return Err(RunError::Wait {
                    program: program.to_string(),
                    source,
                });
            }
        }
        if Instant::now() >= deadline {
            child.kill();
            return Err(RunError::Timeout {
                program: program.to_string(),
                timeout,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The last `lines` non-empty lines of a tool's output, for error messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
