//! Finding the root filesystem of a disk image: read the GPT, then look at what each
//! partition holds.
//!
//! The GPT is parsed by hand (about a hundred lines, no dependency): we only ever read the
//! primary header and its entry array, check both CRC32s, and need four fields per entry.
//! A GPT crate (`gptman`, `gpt`) would bring writing, device ioctls and a serializer we do
//! not use.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One partition of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as `sfdisk` and Linux number them.
    pub number: u32,
    /// GPT partition name (`ESP`, `primary`, …).
    pub name: String,
    /// Byte offset of the partition in the image.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the partition holds.
    pub fs: FsKind,
}

/// A filesystem recognised from its superblock (enough for a clear error message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext { version: ExtVersion, label: String },
    Vfat { label: String },
    Xfs { label: String },
    Btrfs { label: String },
    Swap,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtVersion {
    Ext2,
    Ext3,
    Ext4,
}

impl FsKind {
    pub fn label(&self) -> Option<&str> {
        match self {
            FsKind::Ext { label, .. }
            | FsKind::Vfat { label }
            | FsKind::Xfs { label }
            | FsKind::Btrfs { label } => Some(label),
            FsKind::Swap | FsKind::Unknown => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            FsKind::Ext {
                version: ExtVersion::Ext2,
                ..
            } => "ext2",
            FsKind::Ext {
                version: ExtVersion::Ext3,
                ..
            } => "ext3",
            FsKind::Ext {
                version: ExtVersion::Ext4,
                ..
            } => "ext4",
            FsKind::Vfat { .. } => "vfat",
            FsKind::Xfs { .. } => "xfs",
            FsKind::Btrfs { .. } => "btrfs",
            FsKind::Swap => "swap",
            FsKind::Unknown => "no filesystem nixroll recognises",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a disk image with a GPT partition table (no \"EFI PART\" header at sector 1); \
         nixroll image works on raw GPT images such as NixOS's raw-efi"
    )]
    NoGpt { path: PathBuf },
    #[error("{path}: the GPT is damaged: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path}: no partition named or labelled {label:?} (partitions: {found}); choose the root with --root-label"
    )]
    NoRoot {
        path: PathBuf,
        label: String,
        found: String,
    },
    #[error("{path}: several partitions match {label:?}: {found}; choose one with --root-label")]
    AmbiguousRoot {
        path: PathBuf,
        label: String,
        found: String,
    },
    #[error(
        "{path}: the root partition {number} ({label:?}) holds {fs}, not ext4; nixroll writes only into ext4 roots"
    )]
    NotExt4 {
        path: PathBuf,
        number: u32,
        label: String,
        fs: &'static str,
    },
}

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Upper bound on the entry array we read (128 entries × 128 bytes is the norm).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;

/// Read the partition table of the image at `path`.
pub fn partitions(path: &Path) -> Result<Vec<Partition>, GptError> {
    let file = File::open(path).map_err(|source| GptError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let read = |offset: u64, len: usize| -> Result<Vec<u8>, GptError> {
        let mut buf = vec![0u8; len];
        let n = read_up_to(&file, &mut buf, offset).map_err(|source| GptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        buf.truncate(n);
        Ok(buf)
    };
    let corrupt = |detail: String| GptError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // The logical sector size is not recorded anywhere: try 512, then 4096.
    let (sector, header) = [512u64, 4096]
        .into_iter()
        .map(|s| Ok((s, read(s, 512)?)))
        .collect::<Result<Vec<_>, GptError>>()?
        .into_iter()
        .find(|(_, h)| h.len() >= 92 && &h[..8] == SIGNATURE)
        .ok_or_else(|| GptError::NoGpt {
            path: path.to_path_buf(),
        })?;
    let header_size = le32(&header, 12) as usize;
    if !(92..=header.len()).contains(&header_size) {
        return Err(corrupt(format!("header size {header_size}")));
    }
    let mut h = header[..header_size].to_vec();
    let stored_crc = le32(&h, 16);
    h[16..20].fill(0);
    if crc32(&h) != stored_crc {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let entries_lba = le64(&header, 72);
    let count = u64::from(le32(&header, 80));
    let entry_size = u64::from(le32(&header, 84));
    let entries_crc = le32(&header, 88);
    if entry_size < 128 || count.saturating_mul(entry_size) > MAX_ENTRIES_BYTES {
        return Err(corrupt(format!("{count} entries of {entry_size} bytes")));
    }
    let table_len =
        usize::try_from(count * entry_size).map_err(|_| corrupt("entry array too large".into()))?;
    let table = read(entries_lba.saturating_mul(sector), table_len)?;
    if table.len() != table_len {
        return Err(corrupt("the partition entry array is cut off".into()));
    }
    if crc32(&table) != entries_crc {
        return Err(corrupt("partition entry array checksum mismatch".into()));
    }
    let mut parts = Vec::new();
    for (i, entry) in table.chunks(entry_size as usize).enumerate() {
        if entry[..16].iter().all(|&b| b == 0) {
            continue; // unused entry
        }
        let first = le64(entry, 32);
        let last = le64(entry, 40);
        if last < first {
            return Err(corrupt(format!("partition {} ends before it starts", i + 1)));
        }
        let name_units: Vec<u16> = entry[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let offset = first.saturating_mul(sector);
        let size = (last - first + 1).saturating_mul(sector);
        let fs = probe(&file, offset).map_err(|source| GptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parts.push(Partition {
            number: u32::try_from(i + 1).unwrap_or(u32::MAX),
            name: String::from_utf16_lossy(&name_units),
            offset,
            size,
            fs,
        });
    }
    Ok(parts)
}

/// The ext4 root: the one partition whose GPT name or filesystem label is `label`.
pub fn find_root(path: &Path, label: &str) -> Result<Partition, GptError> {
    let parts = partitions(path)?;
    let matching: Vec<&Partition> = parts
        .iter()
        .filter(|p| p.name == label || p.fs.label() == Some(label))
        .collect();
    let describe = |ps: &[&Partition]| {
        ps.iter()
            .map(|p| {
                let fs_label = p.fs.label().map(|l| format!(" label {l:?}")).unwrap_or_default();
                format!("{} name {:?} {}{}", p.number, p.name, p.fs.name(), fs_label)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    match matching.as_slice() {
        [] => Err(GptError::NoRoot {
            path: path.to_path_buf(),
            label: label.to_string(),
            found: if parts.is_empty() {
                "none".into()
            } else {
                describe(&parts.iter().collect::<Vec<_>>())
            },
        }),
        [one] => match one.fs {
            FsKind::Ext {
                version: ExtVersion::Ext4,
                ..
            } => Ok((*one).clone()),
            ref other => Err(GptError::NotExt4 {
                path: path.to_path_buf(),
                number: one.number,
                label: label.to_string(),
                fs: other.name(),
            }),
        },
        many => Err(GptError::AmbiguousRoot {
            path: path.to_path_buf(),
            label: label.to_string(),
            found: describe(many),
        }),
    }
}

/// Recognise the filesystem starting at `offset` from its superblock.
fn probe(file: &File, offset: u64) -> std::io::Result<FsKind> {
    let mut sb = vec![0u8; 4096];
    let n = read_up_to(file, &mut sb, offset)?;
    sb.truncate(n);
    // ext2/3/4: superblock at +1024, magic 0xEF53 at +0x38.
    if sb.len() >= 1024 + 0x88 && le16(&sb, 1024 + 0x38) == 0xEF53 {
        let s = &sb[1024..];
        let compat = le32(s, 0x5C);
        let incompat = le32(s, 0x60);
        const HAS_JOURNAL: u32 = 0x4;
        const EXTENTS: u32 = 0x40;
        const BIT64: u32 = 0x80;
        const FLEX_BG: u32 = 0x200;
        let version = if incompat & (EXTENTS | BIT64 | FLEX_BG) != 0 {
            ExtVersion::Ext4
        } else if compat & HAS_JOURNAL != 0 {
            ExtVersion::Ext3
        } else {
            ExtVersion::Ext2
        };
        return Ok(FsKind::Ext {
            version,
            label: c_string(&s[0x78..0x88]),
        });
    }
    if sb.len() >= 512 && &sb[..4] == b"XFSB" {
        return Ok(FsKind::Xfs {
            label: c_string(&sb[0x6C..0x78]),
        });
    }
    if sb.len() >= 512 && sb[0x1FE] == 0x55 && sb[0x1FF] == 0xAA {
        if &sb[0x52..0x57] == b"FAT32" {
            return Ok(FsKind::Vfat {
                label: c_string(&sb[0x47..0x52]).trim_end().to_string(),
            });
        }
        if &sb[0x36..0x39] == b"FAT" {
            return Ok(FsKind::Vfat {
                label: c_string(&sb[0x2B..0x36]).trim_end().to_string(),
            });
        }
    }
    if sb.len() >= 4096 && &sb[4086..4096] == b"SWAPSPACE2" {
        return Ok(FsKind::Swap);
    }
    let mut btrfs = vec![0u8; 0x12B + 256];
    if read_up_to(file, &mut btrfs, offset.saturating_add(0x10000))? == btrfs.len()
        && &btrfs[0x40..0x48] == b"_BHRfS_M"
    {
        return Ok(FsKind::Btrfs {
            label: c_string(&btrfs[0x12B..]),
        });
    }
    Ok(FsKind::Unknown)
}

/// Read as much of `buf` as the file has at `offset` (short at the end of the file).
pub(crate) fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// CRC-32 (IEEE 802.3, reflected), as the GPT uses. Bitwise: it only ever sees a header and
/// a 16 KiB entry array.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
