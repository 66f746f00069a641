//! `nixroll image`: build a disk image with secrets written into it, or write them into an existing one.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::*;

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCommand {
    /// Build `nixosConfigurations.HOST.config.system.build.images.VARIANT`, copy it out of the
    /// store, write the secrets into its ext4 root, verify, convert if asked.
    Build(ImageBuildArgs),
    /// Write secrets into an existing image (re-imaging, rotation), replacing it atomically.
    Inject(ImageInjectArgs),
    /// Benchmark: write a secret into a sparse image copied out of a private Nix store.
    #[command(hide = true)]
    Bench(ImageBenchArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImageSecretArgs {
    /// Write the file SRC to DEST in the image's root filesystem (mode 0400, owner 0:0 unless
    /// given; owners are numeric). SRC is read once, so `<(command)` works. Repeatable.
    #[arg(long = "secret", value_name = "DEST=SRC[,mode=0400][,owner=UID:GID]")]
    pub(crate) secrets: Vec<String>,
    /// Write every file DIR/REL to /REL (DIR/etc/k3s/token → /etc/k3s/token), mode 0400, root.
    #[arg(long, value_name = "DIR")]
    pub(crate) secrets_dir: Option<std::path::PathBuf>,
    /// The root filesystem: the GPT partition name or filesystem label to look for.
    #[arg(long, value_name = "NAME", default_value = "nixos")]
    pub(crate) root_label: String,
    /// Print what was written as JSON (paths, modes, owners, sizes; never contents).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImageBuildArgs {
    /// The flake and host: REF#HOST (e.g. `.#node1`, `github:me/infra#node1`).
    #[arg(
        long,
        value_name = "REF#HOST",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub(crate) flake: Option<String>,
    /// Use an image that is already built instead: a store path (as `nix build` printed it)
    /// or an image file.
    #[arg(long, value_name = "PATH")]
    pub(crate) image: Option<std::path::PathBuf>,
    /// The image file to write (replaced atomically; mode 0600).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: std::path::PathBuf,
    /// Which of `config.system.build.images` to build.
    #[arg(long, default_value = "raw-efi")]
    pub(crate) variant: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "raw")]
    pub(crate) format: ImageFormat,
    /// Never use binary caches.
    #[arg(long)]
    pub(crate) offline: bool,
    /// Give up on `nix build` after this long.
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    pub(crate) build_timeout: Duration,
    #[command(flatten)]
    pub(crate) secrets: ImageSecretArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImageInjectArgs {
    /// The image (raw or qcow2) to write into.
    pub(crate) file: std::path::PathBuf,
    /// Write the result here instead of replacing FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<std::path::PathBuf>,
    /// Output format (default: the input's).
    #[arg(long, value_enum)]
    pub(crate) format: Option<ImageFormat>,
    #[command(flatten)]
    pub(crate) secrets: ImageSecretArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImageBenchArgs {
    /// Apparent size of the image in MiB.
    #[arg(long, default_value_t = 4096)]
    pub(crate) size_mib: u64,
    /// MiB of file data to put into the root filesystem first.
    #[arg(long, default_value_t = 256)]
    pub(crate) data_mib: u64,
    /// Work here (default: a temporary directory under /var/tmp).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<std::path::PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum ImageFormat {
    Raw,
    Qcow2,
}

impl From<ImageFormat> for nixroll::image::Format {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Raw => nixroll::image::Format::Raw,
            ImageFormat::Qcow2 => nixroll::image::Format::Qcow2,
        }
    }
}

pub(crate) fn run_image(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    use nixroll::image;
    init_tracing(false);
    let load = |a: &ImageSecretArgs| -> anyhow::Result<Vec<image::secret::Secret>> {
        let mut specs = a
            .secrets
            .iter()
            .map(|s| image::secret::parse_spec(s))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(dir) = &a.secrets_dir {
            specs.extend(image::secret::specs_from_dir(dir)?);
        }
        Ok(image::secret::load(specs)?)
    };
    let print = |report: &image::Report, json: bool| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            print!("{}", report.text());
        }
        Ok(())
    };
    let ui = image::Ui::detect();
    // On Ctrl-C or SIGTERM: stop the running tool, remove the work directory (it may hold a
    // copy with the secrets) and exit; destructors do not run when a signal ends the process.
    // The handlers are installed before anything is created.
    image_signal_handler()?;
    match cmd {
        ImageCommand::Build(args) => {
            let secrets = load(&args.secrets)?;
            let source = match (&args.flake, &args.image) {
                (Some(f), _) => {
                    let (flake, host) = image::nixbuild::split_flake(f)?;
                    image::Source::Flake {
                        flake,
                        host,
                        variant: args.variant.clone(),
                        offline: args.offline,
                        timeout: args.build_timeout,
                    }
                }
                (None, Some(p)) => image::Source::Path(p.clone()),
                (None, None) => anyhow::bail!("give --flake REF#HOST or --image PATH"),
            };
            let report = image::build(
                &source,
                &args.out,
                args.format.into(),
                &args.secrets.root_label,
                &secrets,
                &ui,
            )?;
            print(&report, args.secrets.json)?;
        }
        ImageCommand::Inject(args) => {
            let secrets = load(&args.secrets)?;
            let report = image::inject(
                &args.file,
                args.out.as_deref(),
                args.format.map(Into::into),
                &args.secrets.root_label,
                &secrets,
                &ui,
            )?;
            print(&report, args.secrets.json)?;
        }
        ImageCommand::Bench(args) => {
            let opts = image::bench::BenchOptions {
                size_mib: args.size_mib,
                data_mib: args.data_mib,
                dir: args.dir,
            };
            let report = image::bench::run(&opts, &ui)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Install the SIGINT/SIGTERM handler of `nixroll image` and return once it is installed.
pub(crate) fn image_signal_handler() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            {
                (Ok(t), Ok(i)) => (t, i),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let done = nixroll::image::cleanup::stop_all_and_remove();
        eprintln!(
            "nixroll: interrupted; work directory removed ({} running tool(s) stopped)",
            done.stopped
        );
        std::process::exit(130);
    });
    match ready_rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("cannot install the SIGINT/SIGTERM handler: {e}"),
        Err(e) => anyhow::bail!("the SIGINT/SIGTERM handler did not start: {e}"),
    }
}
