//! A store path serialised as a NAR (Nix ARchive), read straight from the store's files.
//!
//! The format (Nix's `dumpPath`): every string is its length as a little-endian u64, its bytes,
//! and zero padding to a multiple of 8; a node is `( type regular [executable ""] contents
//! <bytes> )`, `( type symlink target <target> )` or `( type directory { entry ( name <name>
//! node <node> ) }… )` with entries in byte order of their names. Only the permission bit
//! Nix keeps (owner-executable) is kept. Checked byte for byte against `nix store dump-path`
//! (tests/builder_nix.rs), and every node checks it against the signed NAR hash anyway.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the NAR: {0}")]
    Write(#[source] std::io::Error),
    #[error("{path} is neither a file, a directory nor a symlink")]
    Unsupported { path: PathBuf },
}

/// Write the NAR of `path` (a local path: the store path as this process sees it) to `out`.
/// Returns the number of bytes written.
pub fn write_nar(path: &Path, out: &mut impl Write) -> Result<u64, NarError> {
    let mut w = Counter { out, n: 0 };
    w.str(b"nix-archive-1")?;
    node(path, &mut w)?;
    Ok(w.n)
}

struct Counter<'a, W: Write> {
    out: &'a mut W,
    n: u64,
}

impl<W: Write> Counter<'_, W> {
    fn raw(&mut self, b: &[u8]) -> Result<(), NarError> {
        self.out.write_all(b).map_err(NarError::Write)?;
        self.n += b.len() as u64;
        Ok(())
    }

    fn len(&mut self, n: u64) -> Result<(), NarError> {
        self.raw(&n.to_le_bytes())
    }

    fn pad(&mut self, n: u64) -> Result<(), NarError> {
        let rest = (8 - n % 8) % 8;
        self.raw(&[0u8; 8][..rest as usize])
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.len(s.len() as u64)?;
        self.raw(s)?;
        self.pad(s.len() as u64)
    }
}

fn node<W: Write>(path: &Path, w: &mut Counter<'_, W>) -> Result<(), NarError> {
    let read = |source| NarError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(read)?;
    w.str(b"(")?;
    w.str(b"type")?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        w.str(b"symlink")?;
        w.str(b"target")?;
        let target = std::fs::read_link(path).map_err(read)?;
        w.str(target.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        w.str(b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            w.str(b"executable")?;
            w.str(b"")?;
        }
        w.str(b"contents")?;
        let mut f = std::fs::File::open(path).map_err(read)?;
        let size = meta.len();
        w.len(size)?;
        // Exactly `size` bytes: a file that changed under us fails rather than corrupting.
        let mut left = size;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
            let got = f.read(&mut buf[..want]).map_err(read)?;
            if got == 0 {
                return Err(read(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while being read",
                )));
            }
            w.raw(&buf[..got])?;
            left -= got as u64;
        }
        w.pad(size)?;
    } else if ft.is_dir() {
        w.str(b"directory")?;
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(path)
            .map_err(read)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            w.str(b"entry")?;
            w.str(b"(")?;
            w.str(b"name")?;
            w.str(name.as_bytes())?;
            w.str(b"node")?;
            node(&path.join(&name), w)?;
            w.str(b")")?;
        }
    } else {
        return Err(NarError::Unsupported {
            path: path.to_path_buf(),
        });
    }
    w.str(b")")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_file_is_padded_strings() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let mut out = Vec::new();
        let n = write_nar(&f, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(out.len() % 8, 0);
        let mut want = Vec::new();
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello",
            b")",
        ] {
            want.extend_from_slice(&(s.len() as u64).to_le_bytes());
            want.extend_from_slice(s);
            want.resize(want.len().div_ceil(8) * 8, 0);
        }
        assert_eq!(out, want);
    }
}
