//! qcow2 in and out through `qemu-img` (file paths only on its command line).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::run::{self, RunError, Stderr};

const QEMU_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("qemu-img {operation} failed: {message}")]
    Failed {
        operation: &'static str,
        message: String,
    },
    #[error("the qcow2 image differs from the raw image it was converted from: {0}")]
    Differs(String),
    #[error("cannot create {path} (mode 0600) for qemu-img to write into")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "qemu-img replaced {path} instead of writing into the private file nixroll created \
         (it would have been created with the process umask; refusing)"
    )]
    Replaced { path: std::path::PathBuf },
}

/// Whether the file starts with the qcow2 magic (`QFI\xfb`).
pub fn is_qcow2(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(n == 4 && magic == *b"QFI\xfb")
}

fn qemu_img(operation: &'static str, args: &[&std::ffi::OsStr]) -> Result<String, QemuError> {
    let mut c = Command::new("qemu-img");
    c.args(args).env("LC_ALL", "C");
    let out = run::run(c, None, Stderr::Capture, QEMU_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.success() {
        let text = format!("{stdout}\n{}", out.stderr);
        return Err(if operation == "compare" && out.status.code() == Some(1) {
            QemuError::Differs(run::tail(&text, 5))
        } else {
            QemuError::Failed {
                operation,
                message: run::tail(&text, 10),
            }
        });
    }
    Ok(stdout)
}

/// Run `convert` with nixroll's own output file: created here, empty, mode 0600 (and
/// `create_new`), before qemu-img opens it, so the secrets are never in a file others can read.
/// qemu-img opens an existing file with `O_CREAT` without `O_EXCL` and keeps its mode; if it
/// ever replaced the file (another inode), the result is refused.
fn convert_into_private(
    out: &Path,
    convert: impl FnOnce() -> Result<(), QemuError>,
) -> Result<(), QemuError> {
    use std::os::unix::fs::MetadataExt;
    let created = super::copy::create_private(out).map_err(|source| QemuError::Create {
        path: out.to_path_buf(),
        source,
    })?;
    let ino = created.metadata().map(|m| m.ino()).ok();
    drop(created);
    convert()?;
    let after = std::fs::symlink_metadata(out).ok();
    if after.as_ref().map(|m| m.ino()) != ino || after.is_none_or(|m| m.mode() & 0o077 != 0) {
        let _ = std::fs::remove_file(out);
        return Err(QemuError::Replaced {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

/// `qemu-img convert -f qcow2 -O raw` (the output is sparse) into a new 0600 file.
pub fn to_raw(qcow2: &Path, raw: &Path) -> Result<(), QemuError> {
    convert_into_private(raw, || {
        qemu_img(
            "convert",
            &[
                "convert".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                qcow2.as_ref(),
                raw.as_ref(),
            ],
        )
        .map(|_| ())
    })
}

/// `qemu-img convert -f raw -O qcow2` into a new 0600 file, then `qemu-img compare` of the two.
pub fn from_raw_verified(raw: &Path, qcow2: &Path) -> Result<(), QemuError> {
    convert_into_private(qcow2, || {
        qemu_img(
            "convert",
            &[
                "convert".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                raw.as_ref(),
                qcow2.as_ref(),
            ],
        )
        .map(|_| ())
    })?;
    qemu_img(
        "compare",
        &[
            "compare".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            raw.as_ref(),
            qcow2.as_ref(),
        ],
    )?;
    Ok(())
}
