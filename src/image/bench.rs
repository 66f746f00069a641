//! `nixroll image bench` (hidden): the cost of one `image build` from a store path, on a
//! sparse image made here with Debian's disk tools. Also [`make_disk_image`], which the tests
//! use to build their images the same way.
//!
//! Measured: writing the image into a private Nix store (`nix-store --add`, which, like a
//! substitution, writes every zero), copying it out sparse, writing and verifying a secret,
//! and the allocated size of each copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::run::{self, RunError, Stderr};
use super::secret::{Secret, SecretSpec};
use super::{Source, Ui, copy, gpt};

const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{tool} failed: {message}")]
    Tool { tool: String, message: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error(transparent)]
    Image(#[from] super::ImageError),
}

/// What the root partition of a made image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// ext4 labelled `nixos` (as NixOS's `raw-efi`).
    Ext4,
    /// ext2 labelled `nixos`.
    Ext2,
    /// vfat, in a partition named `nixos`.
    Vfat,
    /// No root partition at all (the ESP only).
    Missing,
}

/// The partitions of a made image.
#[derive(Clone, Debug)]
pub struct Layout {
    pub esp: gpt::Partition,
    pub root: Option<gpt::Partition>,
}

fn tool(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), BenchError> {
    let mut c = Command::new(program);
    c.args(args).env("LC_ALL", "C");
    let input = match stdin {
        Some(text) => {
            let mut f = tempfile::tempfile().map_err(|source| BenchError::Io {
                path: PathBuf::from("(temp)"),
                source,
            })?;
            use std::io::{Seek as _, Write as _};
            f.write_all(text.as_bytes())
                .and_then(|_| f.rewind())
                .map_err(|source| BenchError::Io {
                    path: PathBuf::from("(temp)"),
                    source,
                })?;
            Some(std::process::Stdio::from(f))
        }
        None => None,
    };
    let out = run::run(c, input, Stderr::Capture, TOOL_TIMEOUT)?;
    if !out.success() {
        return Err(BenchError::Tool {
            tool: format!("{program} {}", args.join(" ")),
            message: run::tail(
                &format!("{}\n{}", String::from_utf8_lossy(&out.stdout), out.stderr),
                8,
            ),
        });
    }
    Ok(())
}

/// A sparse image of `size_mib` like NixOS's `raw-efi`: GPT, a 32 MiB vfat `ESP` at 1 MiB,
/// then the root partition (GPT name `primary`, or `nixos` for [`RootKind::Vfat`]) filling
/// the rest. Made with `sfdisk`, `mkfs.fat --offset` and `mkfs.ext4 -E offset=`.
pub fn make_disk_image(path: &Path, size_mib: u64, root: RootKind) -> Result<Layout, BenchError> {
    let io = |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    f.set_len(size_mib << 20).map_err(io)?;
    drop(f);
    let name = if root == RootKind::Vfat {
        "nixos"
    } else {
        "primary"
    };
    let mut table = String::from(
        "label: gpt\nstart=2048, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"ESP\"\n",
    );
    if root != RootKind::Missing {
        table.push_str(&format!(
            "start=67584, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"{name}\"\n"
        ));
    }
    let p = path.to_string_lossy().into_owned();
    tool("sfdisk", &["-q", &p], Some(&table))?;
    let parts = gpt::partitions(path)?;
    let (Some(esp), root_part) = (parts.first().cloned(), parts.get(1).cloned()) else {
        return Err(BenchError::Tool {
            tool: "sfdisk".into(),
            message: "made no partition".into(),
        });
    };
    tool(
        "mkfs.fat",
        &[
            "-F",
            "16",
            "-n",
            "ESP",
            "--offset",
            &(esp.offset / 512).to_string(),
            &p,
            &(esp.size / 1024).to_string(),
        ],
        None,
    )?;
    if let Some(r) = &root_part {
        let kib = format!("{}k", r.size / 1024);
        let offset = format!("offset={}", r.offset);
        match root {
            RootKind::Ext4 => tool(
                "mkfs.ext4",
                &["-q", "-F", "-L", "nixos", "-E", &offset, &p, &kib],
                None,
            )?,
            RootKind::Ext2 => tool(
                "mkfs.ext2",
                &["-q", "-F", "-L", "nixos", "-E", &offset, &p, &kib],
                None,
            )?,
            RootKind::Vfat => tool(
                "mkfs.fat",
                &[
                    "--offset",
                    &(r.offset / 512).to_string(),
                    &p,
                    &(r.size / 1024).to_string(),
                ],
                None,
            )?,
            RootKind::Missing => {}
        }
    }
    Ok(Layout {
        esp,
        root: gpt::partitions(path)?.get(1).cloned(),
    })
}

/// Put `mib` MiB of pseudo-random data into `/data.bin` of the ext4 at `offset` (so the
/// image has something to copy besides metadata).
pub fn fill(path: &Path, offset: u64, mib: u64, work: &Path) -> Result<(), BenchError> {
    let data = work.join("data.bin");
    let io = |source| BenchError::Io {
        path: data.clone(),
        source,
    };
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data).map_err(io)?);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill(&mut buf);
            f.write_all(&buf).map_err(io)?;
        }
        f.flush().map_err(io)?;
    }
    let dev = format!("{}?offset={offset}", path.display());
    let req = format!("write {} /data.bin", data.display());
    tool("debugfs", &["-w", "-R", &req, &dev], None)?;
    std::fs::remove_file(&data).map_err(io)?;
    Ok(())
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub size_mib: u64,
    pub data_mib: u64,
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub command: String,
    pub image_apparent_bytes: u64,
    pub data_mib: u64,
    /// The image as made (sparse).
    pub source_allocated_bytes: u64,
    /// The same image once added to a private Nix store (`null` without Nix).
    pub store_allocated_bytes: Option<u64>,
    pub store_add_seconds: Option<f64>,
    /// The sparse copy alone, out of the store copy.
    pub copy_seconds: f64,
    pub copy_data_bytes: u64,
    /// `image build --image STORE_PATH` with one secret: copy, write, read back, e2fsck.
    pub build_seconds: f64,
    pub output_allocated_bytes: u64,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

pub fn run(opts: &BenchOptions, ui: &Ui) -> Result<BenchReport, BenchError> {
    let base = match &opts.dir {
        Some(d) => d.clone(),
        None => PathBuf::from("/var/tmp"),
    };
    let tmp = tempfile::Builder::new()
        .prefix("nixroll-image-bench-")
        .tempdir_in(&base)
        .map_err(|source| BenchError::Io {
            path: base.clone(),
            source,
        })?;
    let dir = tmp.path();
    let src = dir.join("src").join("nixos.img");
    let io = |source| BenchError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir.join("src")).map_err(io)?;
    ui.step(&format!(
        "making a {} MiB image with {} MiB of data",
        opts.size_mib, opts.data_mib
    ));
    let layout = make_disk_image(&src, opts.size_mib, RootKind::Ext4)?;
    let root = layout.root.ok_or_else(|| BenchError::Tool {
        tool: "sfdisk".into(),
        message: "no root partition".into(),
    })?;
    if opts.data_mib > 0 {
        fill(&src, root.offset, opts.data_mib, dir)?;
    }
    let source_allocated = copy::allocated(&src).map_err(io)?;

    // Into a private Nix store, as a build or a substitution leaves it.
    let (image, store_allocated, store_add) = match store_add(dir, &src) {
        Ok((path, took)) => {
            let alloc = copy::allocated(&path).map_err(io)?;
            (path, Some(alloc), Some(secs(took)))
        }
        Err(e) => {
            ui.step(&format!(
                "no private Nix store ({e}); copying from the made image"
            ));
            (src.clone(), None, None)
        }
    };

    ui.step("sparse copy alone");
    let scratch = dir.join("scratch.img");
    let t = Instant::now();
    let stats = copy::sparse_copy(&image, &scratch, |d, n| ui.progress("copying", d, n))
        .map_err(|e| BenchError::Image(e.into()))?;
    let copy_took = t.elapsed();
    std::fs::remove_file(&scratch).map_err(io)?;

    let mut token = vec![0u8; 32];
    fastrand::Rng::new().fill(&mut token);
    let secrets = [Secret {
        spec: SecretSpec {
            dest: "/etc/k3s/token".into(),
            source: PathBuf::from("(generated)"),
            mode: 0o400,
            uid: 0,
            gid: 0,
        },
        content: token,
    }];
    let out = dir.join("out.img");
    ui.step("image build --image STORE_PATH with one secret");
    let t = Instant::now();
    let report = super::build(
        &Source::Path(image.clone()),
        &out,
        super::Format::Raw,
        "nixos",
        &secrets,
        ui,
    )?;
    let build_took = t.elapsed();
    let result = BenchReport {
        command: format!(
            "nixroll image bench --size-mib {} --data-mib {}",
            opts.size_mib, opts.data_mib
        ),
        image_apparent_bytes: stats.size,
        data_mib: opts.data_mib,
        source_allocated_bytes: source_allocated,
        store_allocated_bytes: store_allocated,
        store_add_seconds: store_add,
        copy_seconds: secs(copy_took),
        copy_data_bytes: stats.written,
        build_seconds: secs(build_took),
        output_allocated_bytes: report.allocated,
    };
    make_writable(dir);
    Ok(result)
}

/// `nix-store --add` into a private store under `dir`; the store path and how long it took.
fn store_add(dir: &Path, file: &Path) -> Result<(PathBuf, Duration), BenchError> {
    let mut c = Command::new("nix-store");
    c.env("NIX_STORE_DIR", dir.join("nix/store"))
        .env("NIX_STATE_DIR", dir.join("nix/var/nix"))
        .env("NIX_LOG_DIR", dir.join("nix/var/log/nix"))
        .env("NIX_CONF_DIR", dir.join("etc/nix"))
        .env("HOME", dir.join("home"))
        .arg("--add")
        .arg(file);
    let t = Instant::now();
    let out = run::run(c, None, Stderr::Capture, TOOL_TIMEOUT)?;
    let took = t.elapsed();
    if !out.success() {
        return Err(BenchError::Tool {
            tool: "nix-store --add".into(),
            message: run::tail(&out.stderr, 5),
        });
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((PathBuf::from(path), took))
}

/// Store paths are read-only; make them removable.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    for e in entries.flatten() {
        let p = e.path();
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            make_writable(&p);
        }
    }
}
