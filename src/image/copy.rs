//! Sparse copy of an image out of the (read-only) Nix store into a writable file.
//!
//! Holes of the source are found with `SEEK_DATA`/`SEEK_HOLE` and skipped; inside data
//! extents, blocks that are all zeros are skipped too, so an image that lost its holes (a
//! substituted store path: NAR unpacking writes every zero) comes out sparse again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::SeekFrom;

/// Bytes read per step.
const CHUNK: usize = 1 << 20;
/// Granularity of zero detection (the usual filesystem block).
const BLOCK: usize = 4096;
static ZEROS: [u8; BLOCK] = [0; BLOCK];

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a copy did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyStats {
    /// Apparent size of the image.
    pub size: u64,
    /// Bytes of data actually written (non-zero blocks).
    pub written: u64,
}

/// Copy `src` into the new file `dst` (which must not exist), keeping it sparse. `progress`
/// is called with the bytes of the source covered so far.
pub fn sparse_copy(
    src: &Path,
    dst: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats, CopyError> {
    let read_err = |source| CopyError::Read {
        path: src.to_path_buf(),
        source,
    };
    let write_err = |source| CopyError::Write {
        path: dst.to_path_buf(),
        source,
    };
    let input = File::open(src).map_err(read_err)?;
    let size = input.metadata().map_err(read_err)?.len();
    let output = create_private(dst).map_err(write_err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos = 0u64;
    let mut reported = 0u64;
    while pos < size {
        let (data, hole) = match next_data(&input, pos, size).map_err(read_err)? {
            Some(extent) => extent,
            None => break,
        };
        let mut at = data;
        while at < hole {
            let want = usize::try_from((hole - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = super::gpt::read_up_to(&input, &mut buf[..want], at).map_err(read_err)?;
            if n == 0 {
                break; // the file shrank under us; set_len below keeps the size
            }
            written += write_nonzero(&output, &buf[..n], at).map_err(write_err)?;
            at += n as u64;
            reported = at;
            progress(at, size);
        }
        pos = hole;
    }
    output.set_len(size).map_err(write_err)?;
    output.sync_all().map_err(write_err)?;
    if reported < size {
        progress(size, size);
    }
    Ok(CopyStats { size, written })
}

/// A new file readable and writable by its owner only (it will hold secrets).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// The next data extent `[data, hole)` at or after `pos`, or `None` when only a hole is left.
/// Filesystems without `SEEK_DATA` report everything as data.
fn next_data(file: &File, pos: u64, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
        Ok(d) => d,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(Some((pos, size))),
        Err(e) => return Err(e.into()),
    };
    let hole = match rustix::fs::seek(file, SeekFrom::Hole(data)) {
        Ok(h) => h.min(size),
        Err(rustix::io::Errno::NXIO) => size,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((data, hole)))
}

/// Write the runs of non-zero blocks of `buf` (which starts at `offset`); returns the bytes
/// written.
fn write_nonzero(out: &File, buf: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let end = (i + BLOCK).min(buf.len());
        // A slice comparison is a memcmp: fast even in a debug build.
        let zero = buf[i..end] == ZEROS[..end - i];
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_all_at(&buf[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        out.write_all_at(&buf[s..], offset + s as u64)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

/// Bytes the file really occupies on disk.
pub fn allocated(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}
