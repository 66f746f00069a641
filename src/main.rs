//! The `nixroll` binary: parse the command line, set up logging, call into the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod cli;
use cli::agent::*;
use cli::controller::*;
use cli::demo::*;
use cli::image::*;
use cli::parse::*;

/// nixroll: roll NixOS flake revisions across k3s nodes, safely, one node at a time.
#[derive(Parser, Debug)]
#[command(name = "nixroll", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print nixroll's CustomResourceDefinitions, NixOSNode, FlakeSource and NixOSPool (the same
    /// as crds/).
    Crd {
        /// Print only this one: `nixosnodes` (crds/nixosnodes.yaml), `flakesources`
        /// (crds/flakesources.yaml) or `nixospools` (crds/nixospools.yaml).
        #[arg(long, value_name = "PLURAL", value_parser = ["nixosnodes", "flakesources", "nixospools"])]
        only: Option<String>,
    },
    /// Run the controller (kubeconfig or in-cluster config).
    Controller(ControllerArgs),
    /// Run the node agent: stage and activate what the controller grants on this node.
    Agent(AgentArgs),
    /// The embedded default: an in-memory Kubernetes API, simulated NixOS hosts, the real
    /// controller and agents; rolls a new revision across the cluster and shows it live.
    Demo(DemoArgs),
    /// Scale benchmark: N simulated nodes and P pods on the embedded API, the controller as
    /// a child process; prints memory, requests per node update, reconcile latency, overhead.
    Bench(BenchArgs),
    /// Show a table of NixOSNodes: node, revision wanted/running, phase, window, last change.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// How long to wait for the API server.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// Keep the table live: redrawn on every change (watch-driven), with a rollout summary
        /// (paused? halted? how many done), time in phase, next window and last error.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Build a bootable disk image from the flake with root-only secret files written into it
    /// (outside the Nix store), or write such files into an existing image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the agent's host logic once on a machine without Kubernetes and print its report
    /// as JSON (the real-bootloader test's guest, docs/bootloader.md).
    #[command(hide = true)]
    HostStep(HostStepArgs),
    /// Print a shell completion script: `nixroll completions bash >
    /// ~/.local/share/bash-completion/completions/nixroll` (zsh: into a directory of $fpath as
    /// `_nixroll`; fish: `~/.config/fish/completions/nixroll.fish`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Logs of the simulation's commands (`demo`, `bench`): errors only unless `RUST_LOG` says
/// more, to stderr, so that stdout holds only the report.
fn init_quiet_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn init_tracing(json: bool) {
    init_tracing_with(json, "info");
}

/// Logs to stderr at `default` unless `RUST_LOG` says otherwise.
fn init_tracing_with(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain: the context (which address, which file) is in the outer errors.
            let error: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("nixroll: {}", nixroll::connect::error_chain(error));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd { only } => {
            let yaml = match only.as_deref() {
                Some("nixosnodes") => nixroll::api::crd_yaml(),
                Some("nixospools") => nixroll::api::nixospool_crd_yaml(),
                Some(_) => nixroll::api::flakesource_crd_yaml(),
                None => nixroll::api::all_crds_yaml(),
            }
            .context("cannot render the CRDs")?;
            // `nixroll crd | head` closes the pipe early: that is the reader's choice, not an
            // error (print! would panic on it).
            use std::io::Write;
            match std::io::stdout().lock().write_all(yaml.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::Error::new(e).context("writing the CRDs to stdout"))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Controller(args) => {
            run_controller(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            run_agent(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => run_demo(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Into memory first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "nixroll", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("writing the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => run_bench(args),
        Command::Image(cmd) => run_image(cmd),
        Command::HostStep(args) => run_host_step(args),
        Command::Status {
            cluster,
            timeout,
            watch,
        } => {
            // The command's own messages say what failed; kube's logs only with RUST_LOG.
            init_tracing_with(false, "off");
            runtime()?.block_on(async {
                let (client, server) = cluster
                    .target()
                    .client(&nixroll::connect::user_agent("status"))
                    .await?;
                if watch {
                    use std::io::IsTerminal as _;
                    let opts = nixroll::report::WatchOptions {
                        timeout,
                        terminal: std::io::stdout().is_terminal(),
                        server,
                    };
                    let mut out = std::io::stdout();
                    nixroll::report::watch(client, &mut out, opts, shutdown_signal()).await?;
                    return Ok(ExitCode::SUCCESS);
                }
                let nodes = nixroll::report::fetch(client, &server, timeout).await?;
                let now = jiff::Timestamp::now();
                print!(
                    "{}",
                    nixroll::report::table(&nodes, now, &nixroll::report::window_text)
                );
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every argument of `cmd` and its subcommands, as `path --flag`.
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            let name = arg
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| arg.get_id().to_string());
            out.push((format!("{path} {name}"), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn all_args() -> Vec<(String, clap::Arg)> {
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut out = Vec::new();
        walk(&cmd, "nixroll", &mut out);
        out
    }

    #[test]
    fn every_flag_of_every_subcommand_has_help_text() {
        let args = all_args();
        assert!(
            args.len() > 50,
            "the walk sees the subcommands' flags: {}",
            args.len()
        );
        let missing: Vec<&str> = args
            .iter()
            .filter(|(_, a)| !a.is_hide_set())
            .filter(|(_, a)| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
            .map(|(p, _)| p.as_str())
            .collect();
        assert!(missing.is_empty(), "flags without help text: {missing:?}");
        let mut cmd = super::Cli::command();
        cmd.build();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
        }
    }

    #[test]
    fn the_pod_commands_take_every_setting_from_the_environment() {
        // controller and agent run as pods: each setting can come from an environment variable
        // (shown as [env: …] in --help); --kubeconfig follows kubectl ($KUBECONFIG, a list)
        // and --context and --leader-election (the default) need none.
        let without: Vec<String> = all_args()
            .into_iter()
            .filter(|(p, _)| p.starts_with("nixroll controller ") || p.starts_with("nixroll agent "))
            .filter(|(p, _)| !p.ends_with(" --help") && !p.ends_with(" --version"))
            .filter(|(p, _)| {
                !p.ends_with(" --kubeconfig")
                    && !p.ends_with(" --context")
                    && !p.ends_with(" --leader-election")
            })
            .filter(|(_, a)| a.get_env().is_none())
            .map(|(p, _)| p)
            .collect();
        assert!(without.is_empty(), "no environment variable: {without:?}");
    }

    #[test]
    fn the_two_activation_timeouts_say_which_is_which() {
        let args = all_args();
        let help = |path: &str| {
            args.iter()
                .find(|(p, _)| p == path)
                .and_then(|(_, a)| a.get_help().map(ToString::to_string))
                .unwrap_or_default()
        };
        let controller = help("nixroll controller --activating-timeout");
        let agent = help("nixroll agent --activation-timeout");
        assert!(
            controller.contains("agent's --activation-timeout"),
            "{controller}"
        );
        assert!(agent.contains("controller's --activating-timeout"), "{agent}");
    }

    #[test]
    fn completions_are_generated_for_bash_zsh_and_fish() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut super::Cli::command(), "nixroll", &mut out);
            let text = String::from_utf8(out).unwrap_or_default();
            assert!(text.contains("activating-timeout"), "{shell}: {text}");
            assert!(text.contains("kubeconfig"), "{shell}");
        }
    }

    #[test]
    fn durations_parse_in_kubernetes_style() {
        assert_eq!(
            super::parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            super::parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert!(super::parse_duration("-5s").is_err());
        assert!(super::parse_duration("soon").is_err());
    }
}
