//! Writing into an ext4 filesystem inside an image file with Debian's e2fsprogs: `debugfs -w`
//! on `IMAGE?offset=BYTES` (no mount, no loop device, no root), `e2fsck -fn` to check.
//!
//! Traps handled here (see docs/image.md):
//! - `debugfs` exits 0 when a request fails: its stderr is read, and everything is verified
//!   by reading back.
//! - A failed `mkdir` on an existing directory leaves an orphaned inode behind (found by
//!   `e2fsck`): every path is looked up first, so only requests that must succeed are sent.
//! - `write` copies the source's mode bits and owner: mode, uid and gid are always set.
//! - `write` from a pipe creates an empty file: the secret is handed over in a memfd on
//!   debugfs's standard input and written from `/proc/self/fd/0` (never a file on disk,
//!   never a command-line argument).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::run::{self, Output, RunError, Stderr};

/// How long one debugfs request may take (they touch a few blocks).
const DEBUGFS_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `e2fsck -fn` may take (reads all metadata of the filesystem).
const FSCK_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("debugfs {request}: {message}")]
    Debugfs { request: String, message: String },
    #[error("debugfs printed something unexpected for `stat {path}`: {detail}")]
    Parse { path: String, detail: String },
    #[error("cannot read or write the image {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pass a secret to debugfs through a memfd")]
    Memfd(#[source] std::io::Error),
    #[error(
        "the root filesystem was not cleanly unmounted (its journal needs recovery); \
         nixroll will not write into it. Check it with `e2fsck` first"
    )]
    NeedsRecovery,
    #[error("e2fsck -fn found problems in the root filesystem (exit {code}):\n{output}")]
    FsckFailed { code: i32, output: String },
}

/// What a path is in the image (`debugfs stat`, which does not follow a final symlink).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Missing,
    Directory {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Regular {
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        /// Hard links to the inode.
        links: u32,
    },
    Symlink,
    Other(String),
}

/// An ext4 filesystem at `offset` inside the image file `dir/name`. Tools run with `dir` as
/// their working directory and get only the file name, so that no odd character of the
/// output path (such as `?`, the option separator of e2fsprogs) reaches them.
#[derive(Debug)]
pub struct Ext4Image {
    dir: PathBuf,
    name: OsString,
    offset: u64,
    /// A private (0700) directory for debugfs request files.
    work: PathBuf,
    block_size: u64,
}

impl Ext4Image {
    /// `image` must be a file in `work`'s parent or elsewhere; `work` a private directory.
    pub fn open(image: &Path, offset: u64, work: &Path) -> Result<Ext4Image, Ext4Error> {
        let io = |source| Ext4Error::Io {
            path: image.to_path_buf(),
            source,
        };
        let file = File::open(image).map_err(io)?;
        let mut sb = [0u8; 0x68];
        file.read_exact_at(&mut sb, offset + 1024).map_err(io)?;
        let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
        const RECOVER: u32 = 0x4;
        if incompat & RECOVER != 0 {
            return Err(Ext4Error::NeedsRecovery);
        }
        let log = u32::from_le_bytes([sb[0x18], sb[0x19], sb[0x1A], sb[0x1B]]).min(6);
        let (dir, name) = match (image.parent(), image.file_name()) {
            (Some(d), Some(n)) => (
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_path_buf()
                },
                n.to_os_string(),
            ),
            _ => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a file path",
                )));
            }
        };
        Ok(Ext4Image {
            dir,
            name,
            offset,
            work: work.to_path_buf(),
            block_size: 1024u64 << log,
        })
    }

    fn device(&self) -> OsString {
        let mut s = OsString::from("./");
        s.push(&self.name);
        s.push(format!("?offset={}", self.offset));
        s
    }

    fn tool(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.dir)
            .env("DEBUGFS_PAGER", "__none__")
            .env("PAGER", "__none__")
            .env("LC_ALL", "C");
        c
    }

    /// One read-only request (`-R`); returns its output. Requests hold paths only.
    fn request(&self, request: &str) -> Result<Output, Ext4Error> {
        let mut c = self.tool("debugfs");
        c.arg("-R").arg(request).arg(self.device());
        Ok(run::run(c, None, Stderr::Capture, DEBUGFS_TIMEOUT)?)
    }

    /// What `path` is, without following a final symlink.
    pub fn stat(&self, path: &str) -> Result<Node, Ext4Error> {
        let out = self.request(&format!("stat {path}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let errors = unexpected_stderr(&out.stderr);
        if stdout.trim().is_empty() {
            if errors.contains("File not found by ext2_lookup") {
                return Ok(Node::Missing);
            }
            return Err(Ext4Error::Debugfs {
                request: format!("stat {path}"),
                message: if errors.is_empty() {
                    format!("printed nothing (exit {:?})", out.status.code())
                } else {
                    errors
                },
            });
        }
        parse_stat(path, &stdout)
    }

    /// Physical blocks of the file at `path` (to wipe an old secret before it is replaced).
    pub fn blocks(&self, path: &str) -> Result<Vec<u64>, Ext4Error> {
        let out = self.request(&format!("blocks {path}"))?;
        let errors = unexpected_stderr(&out.stderr);
        if !errors.is_empty() {
            return Err(Ext4Error::Debugfs {
                request: format!("blocks {path}"),
                message: errors,
            });
        }
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|b| {
                b.parse::<u64>().map_err(|_| Ext4Error::Parse {
                    path: path.to_string(),
                    detail: format!("block number {b:?}"),
                })
            })
            .collect()
    }

    /// Overwrite filesystem blocks with zeros, directly in the image file.
    pub fn zero_blocks(&self, blocks: &[u64]) -> Result<(), Ext4Error> {
        let path = self.dir.join(&self.name);
        let io = |source| Ext4Error::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
        let zeros = vec![0u8; usize::try_from(self.block_size).unwrap_or(4096)];
        for &b in blocks {
            file.write_all_at(&zeros, self.offset + b * self.block_size)
                .map_err(io)?;
        }
        file.sync_all().map_err(io)
    }

    /// The content of the regular file at `path`, read back through a pipe.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Ext4Error> {
        let out = self.request(&format!("cat {path}"))?;
        let errors = unexpected_stderr(&out.stderr);
        if !errors.is_empty() {
            return Err(Ext4Error::Debugfs {
                request: format!("cat {path}"),
                message: errors,
            });
        }
        Ok(out.stdout)
    }

    /// Run `requests` in one `debugfs -w` session. `content`, when given, is readable by the
    /// requests as `/proc/self/fd/0` (a memfd: never on disk, never on a command line).
    /// Any error debugfs prints fails the session.
    pub fn write_session(&self, requests: &[String], content: Option<&[u8]>) -> Result<(), Ext4Error> {
        let script = self.work.join("debugfs-requests");
        let io = |source| Ext4Error::Io {
            path: script.clone(),
            source,
        };
        let mut text = requests.join("\n");
        text.push('\n');
        // Paths only, but private like everything in the work directory: created 0600.
        let _ = std::fs::remove_file(&script);
        super::copy::create_private(&script)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(io)?;
        let stdin = match content {
            Some(bytes) => Some(Stdio::from(memfd_with(bytes)?)),
            None => None,
        };
        let mut c = self.tool("debugfs");
        c.arg("-w").arg("-f").arg(&script).arg(self.device());
        let out = run::run(c, stdin, Stderr::Capture, DEBUGFS_TIMEOUT)?;
        let _ = std::fs::remove_file(&script);
        let errors = unexpected_stderr(&out.stderr);
        if !errors.is_empty() || !out.success() {
            return Err(Ext4Error::Debugfs {
                request: requests.first().cloned().unwrap_or_default(),
                message: if errors.is_empty() {
                    format!("exit {:?}", out.status.code())
                } else {
                    errors
                },
            });
        }
        Ok(())
    }

    /// `e2fsck -fn`: a forced, read-only check. Clean or an error with e2fsck's findings.
    pub fn fsck(&self) -> Result<(), Ext4Error> {
        let mut c = self.tool("e2fsck");
        c.arg("-fn").arg(self.device());
        let out = run::run(c, None, Stderr::Capture, FSCK_TIMEOUT)?;
        if out.success() {
            return Ok(());
        }
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), out.stderr);
        Err(Ext4Error::FsckFailed {
            code: out.status.code().unwrap_or(-1),
            output: run::tail(&text, 20),
        })
    }
}

/// A sealed-off copy of `bytes` in anonymous memory, as a file to hand to a child.
fn memfd_with(bytes: &[u8]) -> Result<File, Ext4Error> {
    let fd = rustix::fs::memfd_create("nixroll-secret", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| Ext4Error::Memfd(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(Ext4Error::Memfd)?;
    Ok(file)
}

/// debugfs's stderr without its version banner (`debugfs 1.47.0 (5-Feb-2023)`).
fn unexpected_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs "))
        .collect::<Vec<_>>()
        .join("; ")
}

fn parse_stat(path: &str, text: &str) -> Result<Node, Ext4Error> {
    let bad = |detail: &str| Ext4Error::Parse {
        path: path.to_string(),
        detail: detail.to_string(),
    };
    let after = |key: &str| -> Option<&str> {
        let i = text.find(key)?;
        text[i + key.len()..].split_whitespace().next()
    };
    // "Type: regular    Mode:  0400" (the type may be two words: "character special").
    let ty = text
        .find("Type: ")
        .and_then(|i| text[i + 6..].split("Mode:").next())
        .map(str::trim)
        .ok_or_else(|| bad("no Type"))?;
    let mode = after("Mode:")
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .ok_or_else(|| bad("no Mode"))?;
    let uid = after("User:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no User"))?;
    let gid = after("Group:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no Group"))?;
    let size = after("Size:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no Size"))?;
    Ok(match ty {
        "regular" => Node::Regular {
            mode,
            uid,
            gid,
            size,
            links: after("Links:")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("no Links"))?,
        },
        "directory" => Node::Directory { mode, uid, gid },
        "symlink" => Node::Symlink,
        other => Node::Other(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_output_is_parsed() {
        let text = "Inode: 14   Type: regular    Mode:  0400   Flags: 0x80000\n\
                    Generation: 0    Version: 0x00000000:00000000\n\
                    User: 100000   Group:     0   Project:     0   Size: 12\n\
                    File ACL: 0\n\
                    Links: 1   Blockcount: 8\n";
        assert_eq!(
            parse_stat("/x", text).unwrap(),
            Node::Regular {
                mode: 0o400,
                uid: 100000,
                gid: 0,
                size: 12,
                links: 1
            }
        );
        let dir = "Inode: 2   Type: directory    Mode:  0755   Flags: 0x80000\nUser:     0   Group:     0   Project:     0   Size: 1024\n";
        assert_eq!(
            parse_stat("/", dir).unwrap(),
            Node::Directory {
                mode: 0o755,
                uid: 0,
                gid: 0
            }
        );
        let chr = "Inode: 20   Type: character special    Mode:  0644   Flags: 0x0\nUser:     0   Group:     0   Size: 0\n";
        assert_eq!(
            parse_stat("/dev/x", chr).unwrap(),
            Node::Other("character special".into())
        );
    }
}
