//! `nixroll image`: a bootable disk image from the flake, with root-only secret files written
//! into its ext4 root outside the Nix store. No mount, no loop device, no root privileges.
//!
//! The pipeline (see docs/image.md for the why of each step):
//! 1. read every secret source into memory and check every destination ([`secret`]);
//! 2. make a private (0700) work directory next to the output: nothing is written anywhere
//!    else, and the output appears only by a final `rename` ([`WorkDir`]);
//! 3. build the image with Nix or take a built one ([`nixbuild`]);
//! 4. copy it sparse and writable into the work directory ([`copy`]; qcow2 via [`qcow2`]);
//! 5. find the ext4 root from the GPT ([`gpt`]) and write the secrets with `debugfs`
//!    ([`ext4`]), then read everything back and run `e2fsck -fn` ([`verify`]);
//! 6. convert to qcow2 if asked (checked with `qemu-img compare`), rename into place.

pub mod bench;
pub mod cleanup;
pub mod copy;
pub mod ext4;
pub mod gpt;
pub mod nixbuild;
pub mod qcow2;
pub mod run;
pub mod secret;
pub mod verify;

use std::cell::Cell;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use self::ext4::{Ext4Image, Node};
use self::secret::{DIR_MODE, Secret};

/// Image file formats nixroll reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    #[error("copying the image: {0}")]
    Copy(#[from] copy::CopyError),
    #[error(transparent)]
    Qemu(#[from] qcow2::QemuError),
    #[error(transparent)]
    Nix(#[from] nixbuild::NixBuildError),
    #[error("output {path}: {detail}")]
    Output { path: PathBuf, detail: String },
    #[error("input {path}: {detail}")]
    Input { path: PathBuf, detail: String },
    #[error(
        "{dest}: {via} is a symlink in the image; nixroll does not write through symlinks \
         (it could leave the root filesystem or land in the Nix store)"
    )]
    Symlink { dest: String, via: String },
    #[error("{dest}: {at} exists in the image and is not a directory")]
    NotADirectory { dest: String, at: String },
    #[error("{dest} exists in the image as {what}, not a regular file; nixroll replaces only files")]
    NotAFile { dest: String, what: String },
    #[error("verifying {dest}: {detail}")]
    Verify { dest: String, detail: String },
    #[error("nothing to inject: give --secret DEST=SRC or --secrets-dir DIR")]
    NothingToInject,
}

/// What was written, for the terminal and `--json`. Never holds content nor a hash of it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub format: Format,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes allocated on disk (the image is sparse).
    pub allocated: u64,
    /// The image it was made from (a store path for `build`).
    pub source: PathBuf,
    pub root: RootReport,
    pub files: Vec<FileReport>,
    /// Directories nixroll created (0700, root).
    pub directories: Vec<String>,
    /// `e2fsck -fn` of the root filesystem after writing.
    pub fsck: &'static str,
    /// `qemu-img compare` of the qcow2 output with the raw image it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_compare: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RootReport {
    pub partition: u32,
    pub name: String,
    pub label: String,
    pub offset: u64,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileReport {
    pub path: String,
    /// Octal, e.g. `0400`.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// A file was already there (its old blocks were zeroed before it was removed).
    pub replaced: bool,
}

impl Report {
    /// The human-readable form.
    pub fn text(&self) -> String {
        let mut s = format!(
            "wrote {} ({}, {} apparent, {} allocated) from {}\n",
            self.image.display(),
            match self.format {
                Format::Raw => "raw",
                Format::Qcow2 => "qcow2",
            },
            human(self.size),
            human(self.allocated),
            self.source.display(),
        );
        s.push_str(&format!(
            "root filesystem: partition {} (name {:?}, label {:?}) at byte {}, {}\n",
            self.root.partition,
            self.root.name,
            self.root.label,
            self.root.offset,
            human(self.root.size)
        ));
        for d in &self.directories {
            s.push_str(&format!("  created {d}/  0700 0:0\n"));
        }
        for f in &self.files {
            s.push_str(&format!(
                "  {} {}  {} {}:{}  {} bytes\n",
                if f.replaced { "replaced" } else { "wrote   " },
                f.path,
                f.mode,
                f.uid,
                f.gid,
                f.size
            ));
        }
        s.push_str(&format!("e2fsck -fn: {}\n", self.fsck));
        if let Some(c) = self.qcow2_compare {
            s.push_str(&format!("qemu-img compare with the raw image: {c}\n"));
        }
        s
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Progress on a terminal (a line redrawn in place), plain log lines otherwise.
#[derive(Debug)]
pub struct Ui {
    terminal: bool,
    last: Cell<Option<Instant>>,
}

impl Ui {
    /// Progress lines when stderr is a terminal.
    pub fn detect() -> Ui {
        Ui {
            terminal: std::io::stderr().is_terminal(),
            last: Cell::new(None),
        }
    }

    /// Log lines only.
    pub fn plain() -> Ui {
        Ui {
            terminal: false,
            last: Cell::new(None),
        }
    }

    pub fn terminal(&self) -> bool {
        self.terminal
    }

    fn step(&self, msg: &str) {
        tracing::info!("{msg}");
    }

    fn progress(&self, label: &str, done: u64, total: u64) {
        if !self.terminal {
            return;
        }
        let now = Instant::now();
        let finished = done >= total;
        if !finished
            && self
                .last
                .get()
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last.set(Some(now));
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{label}: {} / {} ({pct}%)\x1b[K",
            human(done),
            human(total)
        );
        if finished {
            let _ = writeln!(err);
            self.last.set(None);
        }
        let _ = err.flush();
    }
}

/// A private (0700 from the moment it exists) directory next to the output, where the image
/// is assembled; removed on drop. Created before anything slow happens, so an unwritable output
/// directory fails first. Created and removed through [`cleanup`], which also removes it on
/// SIGINT/SIGTERM.
#[derive(Debug)]
pub struct WorkDir {
    dir: PathBuf,
    out: PathBuf,
}

/// Mode of the work directory: it holds copies of the image with the secrets.
pub const WORK_DIR_MODE: u32 = 0o700;

impl WorkDir {
    pub fn next_to(out: &Path) -> Result<WorkDir, ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |detail: String| ImageError::Output {
            path: out.to_path_buf(),
            detail,
        };
        if out.as_os_str().is_empty() {
            return Err(err("empty path".into()));
        }
        if std::fs::metadata(out).is_ok_and(|m| m.is_dir()) {
            return Err(err("is a directory; give a file name".into()));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(err(format!("the directory {} does not exist", parent.display())));
        }
        // mkdir(2) with mode 0700: private from the moment it exists (tempfile applies no mode
        // unless asked, and a chmod afterwards would leave a window).
        let dir = cleanup::create_dir(|| {
            Ok(tempfile::Builder::new()
                .prefix(".nixroll-image-")
                .permissions(std::fs::Permissions::from_mode(WORK_DIR_MODE))
                .tempdir_in(&parent)?
                .keep())
        })
        .map_err(|e| {
            err(format!(
                "the directory {} is not writable (cannot create a work directory there: {e})",
                parent.display()
            ))
        })?;
        Ok(WorkDir {
            dir,
            out: out.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        cleanup::checkpoint("removing");
        cleanup::remove_dir(&self.dir);
    }
}

/// Where the image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `nix build` of `FLAKE#nixosConfigurations.HOST.config.system.build.images.VARIANT`.
    Flake {
        flake: String,
        host: String,
        variant: String,
        offline: bool,
        timeout: Duration,
    },
    /// A built image: a store path (a file, or a directory holding one image) or any image file.
    Path(PathBuf),
}

/// `nixroll image build`.
pub fn build(
    source: &Source,
    out: &Path,
    format: Format,
    root_label: &str,
    secrets: &[Secret],
    ui: &Ui,
) -> Result<Report, ImageError> {
    let work = WorkDir::next_to(out)?;
    cleanup::checkpoint("workdir");
    let built = match source {
        Source::Flake {
            flake,
            host,
            variant,
            offline,
            timeout,
        } => {
            nixbuild::check_name("variant", variant)?;
            let installable = nixbuild::installable(flake, host, variant);
            ui.step(&format!(
                "building {}",
                crate::nix::mask_credentials(&installable)
            ));
            let path = nixbuild::build(&installable, *offline, *timeout)?;
            ui.step(&format!("built {}", path.display()));
            path
        }
        Source::Path(p) => p.clone(),
    };
    cleanup::checkpoint("built");
    let image = nixbuild::find_image(&built)?;
    assemble(&work, &image, Some(format), root_label, secrets, ui)
}

/// `nixroll image inject`: the same writing into an existing image (raw or qcow2), replacing
/// it (or writing `out`) atomically.
pub fn inject(
    image: &Path,
    out: Option<&Path>,
    format: Option<Format>,
    root_label: &str,
    secrets: &[Secret],
    ui: &Ui,
) -> Result<Report, ImageError> {
    if secrets.is_empty() {
        return Err(ImageError::NothingToInject);
    }
    if !std::fs::metadata(image).is_ok_and(|m| m.is_file()) {
        return Err(ImageError::Input {
            path: image.to_path_buf(),
            detail: "no such image file".into(),
        });
    }
    // Replacing FILE through a symlink replaces the file it points to, not the link.
    let target = match out {
        Some(o) => o.to_path_buf(),
        None => std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf()),
    };
    let work = WorkDir::next_to(&target)?;
    cleanup::checkpoint("workdir");
    assemble(&work, image, format, root_label, secrets, ui)
}

/// Copy `image` into `work`, write and verify the secrets, convert, rename into place.
/// `format: None` keeps the input's format.
pub fn assemble(
    work: &WorkDir,
    image: &Path,
    format: Option<Format>,
    root_label: &str,
    secrets: &[Secret],
    ui: &Ui,
) -> Result<Report, ImageError> {
    let input_err = |detail: String| ImageError::Input {
        path: image.to_path_buf(),
        detail,
    };
    let input_format = if qcow2::is_qcow2(image).map_err(|e| input_err(e.to_string()))? {
        Format::Qcow2
    } else {
        Format::Raw
    };
    let raw = work.path().join("image.raw");
    match input_format {
        Format::Raw => {
            // Refuse a non-image before spending time on a copy.
            gpt::find_root(image, root_label)?;
            ui.step(&format!("copying {} (sparse)", image.display()));
            let stats = copy::sparse_copy(image, &raw, |done, total| ui.progress("copying", done, total))?;
            ui.step(&format!(
                "copied {} ({} of data)",
                human(stats.size),
                human(stats.written)
            ));
        }
        Format::Qcow2 => {
            ui.step(&format!("converting {} from qcow2 to raw", image.display()));
            qcow2::to_raw(image, &raw)?;
        }
    }
    cleanup::checkpoint("copied");
    let root = gpt::find_root(&raw, root_label)?;
    ui.step(&format!(
        "root filesystem: partition {} (name {:?}) at byte {}",
        root.number, root.name, root.offset
    ));
    let ext = Ext4Image::open(&raw, root.offset, work.path())?;
    let mut files = Vec::new();
    let mut directories = Vec::new();
    for s in secrets {
        let (file, dirs) = write_secret(&ext, s)?;
        ui.step(&format!(
            "{} {} ({} {}:{}, {} bytes)",
            if file.replaced { "replaced" } else { "wrote" },
            file.path,
            file.mode,
            file.uid,
            file.gid,
            file.size
        ));
        files.push(file);
        directories.extend(dirs);
    }
    cleanup::checkpoint("written");
    verify::written(&ext, secrets, &directories)?;
    ui.step("read back: modes, owners and contents match; running e2fsck -fn");
    ext.fsck()?;
    cleanup::checkpoint("verified");
    let format = format.unwrap_or(input_format);
    let (fin, qcow2_compare) = match format {
        Format::Raw => (raw.clone(), None),
        Format::Qcow2 => {
            ui.step("converting to qcow2");
            let q = work.path().join("image.qcow2");
            qcow2::from_raw_verified(&raw, &q)?;
            cleanup::checkpoint("converted");
            (q, Some("identical"))
        }
    };
    let out = work.out.clone();
    let out_err = |detail: String| ImageError::Output {
        path: out.clone(),
        detail,
    };
    {
        // Created 0600 (by nixroll, or by nixroll before qemu-img wrote into it).
        let f = std::fs::File::open(&fin).map_err(|e| out_err(e.to_string()))?;
        check_private(&f).map_err(out_err)?;
        f.sync_all().map_err(|e| out_err(e.to_string()))?;
    }
    cleanup::checkpoint("synced");
    let size = std::fs::metadata(&fin).map_err(|e| out_err(e.to_string()))?.len();
    let allocated = copy::allocated(&fin).map_err(|e| out_err(e.to_string()))?;
    std::fs::rename(&fin, &out)
        .map_err(|e| out_err(format!("cannot move the finished image into place: {e}")))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    cleanup::checkpoint("renamed");
    ui.step(&format!("wrote {}", out.display()));
    Ok(Report {
        image: out,
        format,
        size,
        allocated,
        source: image.to_path_buf(),
        root: RootReport {
            partition: root.number,
            name: root.name.clone(),
            label: root.fs.label().unwrap_or_default().to_string(),
            offset: root.offset,
            size: root.size,
        },
        files,
        directories,
        fsck: "clean",
        qcow2_compare,
    })
}

/// The image file is readable and writable by its owner only: it was created without any
/// group or other bit (checked, not set: a chmod now would come too late), and is 0600.
fn check_private(f: &std::fs::File) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = f.metadata().map_err(|e| e.to_string())?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the finished image has mode {mode:04o}: readable by others, and it holds the secrets"
        ));
    }
    if mode != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Write one secret: look up every component of its path first (no symlink, parents are
/// directories or missing), then one debugfs session creates the missing parents (0700
/// root), removes a previous file (its blocks zeroed first), writes the content and sets
/// mode and owner.
fn write_secret(ext: &Ext4Image, s: &Secret) -> Result<(FileReport, Vec<String>), ImageError> {
    let dest = &s.spec.dest;
    let parts: Vec<&str> = dest[1..].split('/').collect();
    let mut prefix = String::new();
    let mut missing = Vec::new();
    for part in &parts[..parts.len().saturating_sub(1)] {
        prefix.push('/');
        prefix.push_str(part);
        if !missing.is_empty() {
            missing.push(prefix.clone());
            continue;
        }
        match ext.stat(&prefix)? {
            Node::Directory { .. } => {}
            Node::Missing => missing.push(prefix.clone()),
            Node::Symlink => {
                return Err(ImageError::Symlink {
                    dest: dest.clone(),
                    via: prefix,
                });
            }
            Node::Regular { .. } | Node::Other(_) => {
                return Err(ImageError::NotADirectory {
                    dest: dest.clone(),
                    at: prefix,
                });
            }
        }
    }
    let replaced = if missing.is_empty() {
        match ext.stat(dest)? {
            Node::Missing => false,
            Node::Regular { links, .. } if links > 1 => {
                return Err(ImageError::NotAFile {
                    dest: dest.clone(),
                    what: format!(
                        "a file with {links} hard links (its blocks, which nixroll wipes before \
                         replacing it, are shared with another name)"
                    ),
                });
            }
            Node::Regular { .. } => true,
            Node::Symlink => {
                return Err(ImageError::Symlink {
                    dest: dest.clone(),
                    via: dest.clone(),
                });
            }
            Node::Directory { .. } => {
                return Err(ImageError::NotAFile {
                    dest: dest.clone(),
                    what: "a directory".into(),
                });
            }
            Node::Other(t) => {
                return Err(ImageError::NotAFile {
                    dest: dest.clone(),
                    what: format!("a {t}"),
                });
            }
        }
    } else {
        false
    };
    let mut requests = Vec::new();
    for d in &missing {
        requests.push(format!("mkdir {d}"));
        requests.push(format!("set_inode_field {d} mode 0{:o}", 0o040000 | DIR_MODE));
        requests.push(format!("set_inode_field {d} uid 0"));
        requests.push(format!("set_inode_field {d} gid 0"));
    }
    if replaced {
        // The old secret must not survive in free blocks of the image.
        let blocks = ext.blocks(dest)?;
        ext.zero_blocks(&blocks)?;
        requests.push(format!("rm {dest}"));
    }
    requests.push(format!("write /proc/self/fd/0 {dest}"));
    requests.push(format!(
        "set_inode_field {dest} mode 0{:o}",
        0o100000 | s.spec.mode
    ));
    requests.push(format!("set_inode_field {dest} uid {}", s.spec.uid));
    requests.push(format!("set_inode_field {dest} gid {}", s.spec.gid));
    ext.write_session(&requests, Some(&s.content))?;
    Ok((
        FileReport {
            path: dest.clone(),
            mode: format!("{:04o}", s.spec.mode),
            uid: s.spec.uid,
            gid: s.spec.gid,
            size: s.content.len() as u64,
            replaced,
        },
        missing,
    ))
}
