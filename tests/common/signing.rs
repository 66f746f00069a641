//! Real signing for the signed-source tests: OpenPGP keys made by Debian's `gpg` (GnuPG) in a
//! private `GNUPGHOME`, SSH keys made by `ssh-keygen`, and commits and tags signed by `git`
//! itself (`commit -S`, `tag -s`, `gpg.format=ssh`), in a repository served by `git daemon`
//! on 127.0.0.1. Also the bad cases: unsigned, signed by an unknown key, a signature copied
//! onto other content, an expired and a revoked key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tools these tests need: `gpg`, `ssh-keygen`, `git` and `git-daemon`. Skips (or fails
/// under `CI=true`) when one is missing.
pub fn require_signing_tools() -> bool {
    super::require(
        "`gpg` (apt-get install gnupg)",
        super::runs("gpg", &["--version"]),
    ) && super::require(
        "`ssh-keygen` (apt-get install openssh-client)",
        super::runs("ssh-keygen", &["-?"]) || Path::new("/usr/bin/ssh-keygen").is_file(),
    ) && super::require("`git` (apt-get install git)", super::runs("git", &["--version"]))
}

/// An OpenPGP key in the fixture's keyring.
#[derive(Clone, Debug)]
pub struct GpgKey {
    pub fingerprint: String,
    /// `gpg --armor --export`.
    pub public: String,
    /// A `gpg.program` that fakes the clock (for a key made in the past), or None.
    program: Option<PathBuf>,
}

/// An SSH key pair on disk.
#[derive(Clone, Debug)]
pub struct SshKey {
    pub private: PathBuf,
    /// `ssh-ed25519 AAAA… comment`.
    pub public: String,
}

/// How to sign a commit or tag.
#[derive(Clone, Copy, Debug)]
pub enum Sign<'a> {
    No,
    Gpg(&'a GpgKey),
    Ssh(&'a SshKey),
}

/// A scratch directory with a GnuPG home, SSH keys, a bare repository served by `git daemon`
/// and a working clone that pushes to it.
pub struct Signing {
    tmp: tempfile::TempDir,
    pub gnupghome: PathBuf,
    pub bare: PathBuf,
    pub work: PathBuf,
    daemon: Option<Child>,
    pub port: u16,
}

impl Drop for Signing {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        // gpg started an agent for this home: end it (it would outlive the test).
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .env("GNUPGHOME", &self.gnupghome)
            .output();
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Signing {
    pub fn new() -> Self {
        // Short paths: gpg-agent's socket lives under GNUPGHOME (at most 107 bytes).
        let tmp = tempfile::Builder::new().prefix("sg").tempdir_in("/tmp").unwrap();
        let root = tmp.path().to_owned();
        let gnupghome = root.join("g");
        std::fs::create_dir_all(&gnupghome).unwrap();
        std::fs::set_permissions(&gnupghome, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let bare = root.join("srv/repo.git");
        std::fs::create_dir_all(&bare).unwrap();
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let s = Signing {
            tmp,
            gnupghome,
            bare,
            work,
            daemon: None,
            port: 0,
        };
        s.git_in(&s.bare.clone(), &["init", "-q", "--bare"]);
        s.git(&["init", "-q"]);
        let bare = s.bare.display().to_string();
        s.git(&["remote", "add", "origin", &bare]);
        s
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// `git daemon` serving the bare repository on a free port of 127.0.0.1:
    /// `git://127.0.0.1:PORT/repo.git`.
    pub fn serve(&mut self) -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exec = run(Command::new("git").arg("--exec-path"), "git --exec-path");
        let base = self.root().join("srv");
        let child = Command::new(Path::new(&exec).join("git-daemon"))
            .args([
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", base.display()),
                &base.display().to_string(),
            ])
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let until = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "git daemon did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.port = port;
        format!("git://127.0.0.1:{port}/repo.git")
    }

    fn gpg(&self, args: &[&str]) -> String {
        run(
            Command::new("gpg")
                .args([
                    "--batch",
                    "--quiet",
                    "--pinentry-mode",
                    "loopback",
                    "--passphrase",
                    "",
                ])
                .args(args)
                .env("GNUPGHOME", &self.gnupghome),
            &format!("gpg {args:?}"),
        )
    }

    fn export(&self, fingerprint: &str) -> String {
        self.gpg(&["--armor", "--export", fingerprint])
    }

    fn fingerprint_of(&self, uid: &str) -> String {
        let out = self.gpg(&["--with-colons", "--list-keys", uid]);
        out.lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .unwrap()
            .to_owned()
    }

    /// A new ed25519 signing key that never expires.
    pub fn gpg_key(&self, uid: &str) -> GpgKey {
        self.gpg(&["--quick-gen-key", uid, "ed25519", "sign", "never"]);
        let fingerprint = self.fingerprint_of(uid);
        GpgKey {
            public: self.export(&fingerprint),
            fingerprint,
            program: None,
        }
    }

    /// A key made on 2020-01-01 that expired a day later; it signs with the clock faked to
    /// that day (its `gpg.program` is a wrapper), so the signature itself is well made.
    pub fn expired_gpg_key(&self, uid: &str) -> GpgKey {
        let faked = "--faked-system-time=20200101T060000";
        self.gpg(&[faked, "--quick-gen-key", uid, "ed25519", "sign", "1d"]);
        let fingerprint = self.fingerprint_of(uid);
        let program = self.root().join("gpg-2020");
        std::fs::write(&program, format!("#!/bin/sh\nexec gpg {faked} \"$@\"\n")).unwrap();
        std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        GpgKey {
            public: self.export(&fingerprint),
            fingerprint,
            program: Some(program),
        }
    }

    /// Revokes `key` with the revocation certificate gpg made with it; returns the public key
    /// as exported afterwards (with the revocation).
    pub fn revoke(&self, key: &GpgKey) -> String {
        let cert = self
            .gnupghome
            .join("openpgp-revocs.d")
            .join(format!("{}.rev", key.fingerprint));
        let text = std::fs::read_to_string(&cert).unwrap();
        // gpg prefixes the block with ':' so that it is not imported by mistake.
        let armored = text.replace(
            ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
            "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        );
        let path = self.root().join("revoke.asc");
        std::fs::write(&path, armored).unwrap();
        self.gpg(&["--import", path.to_str().unwrap()]);
        self.export(&key.fingerprint)
    }

    /// A new ed25519 SSH key without a passphrase.
    pub fn ssh_key(&self, name: &str) -> SshKey {
        let private = self.root().join(format!("ssh-{name}"));
        run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(&private),
            "ssh-keygen",
        );
        let public = std::fs::read_to_string(private.with_extension("pub"))
            .or_else(|_| std::fs::read_to_string(format!("{}.pub", private.display())))
            .unwrap()
            .trim()
            .to_owned();
        SshKey { private, public }
    }

    fn git_in(&self, dir: &Path, args: &[&str]) -> String {
        run(
            Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", self.root())
                .env("GNUPGHOME", &self.gnupghome),
            &format!("git {args:?}"),
        )
    }

    pub fn git(&self, args: &[&str]) -> String {
        self.git_in(&self.work.clone(), args)
    }

    /// `-c` options that make git sign with `sign`.
    fn sign_opts(sign: Sign<'_>) -> Vec<String> {
        match sign {
            Sign::No => vec![],
            Sign::Gpg(k) => {
                let mut o = vec![
                    "-c".into(),
                    "gpg.format=openpgp".into(),
                    "-c".into(),
                    format!("user.signingkey={}", k.fingerprint),
                ];
                if let Some(p) = &k.program {
                    o.extend(["-c".into(), format!("gpg.program={}", p.display())]);
                }
                o
            }
            Sign::Ssh(k) => vec![
                "-c".into(),
                "gpg.format=ssh".into(),
                "-c".into(),
                format!("user.signingkey={}", k.private.display()),
            ],
        }
    }

    /// A commit changing `flake.nix` to `content`, signed as asked; returns its id.
    pub fn commit(&self, content: &str, sign: Sign<'_>) -> String {
        std::fs::write(self.work.join("flake.nix"), content).unwrap();
        self.git(&["add", "-A"]);
        let mut args: Vec<String> = Self::sign_opts(sign);
        args.extend(["commit".into(), "-q".into(), "-m".into(), content.into()]);
        if !matches!(sign, Sign::No) {
            args.push("-S".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git(&args);
        self.git(&["rev-parse", "HEAD"])
    }

    /// A commit whose signature was made for other content: `sign` signs a commit, whose
    /// message is then changed with its signature kept (a forged or damaged commit). It
    /// descends from the current head; `main` is moved to it.
    pub fn forged_commit(&self, content: &str, sign: Sign<'_>) -> String {
        let good = self.commit(content, sign);
        let raw = self.git(&["cat-file", "commit", &good]);
        assert!(raw.contains("gpgsig "), "the commit is signed: {raw}");
        let forged = raw.replacen(&format!("\n\n{content}"), &format!("\n\n{content} (changed)"), 1);
        assert_ne!(raw, forged);
        let path = self.root().join("forged");
        std::fs::write(&path, format!("{forged}\n")).unwrap();
        let id = self.git(&["hash-object", "-t", "commit", "-w", path.to_str().unwrap()]);
        self.git(&["reset", "-q", "--hard", &id]);
        id
    }

    /// An annotated tag (signed as asked) or, with `annotated: false`, a lightweight one.
    pub fn tag(&self, name: &str, annotated: bool, sign: Sign<'_>) {
        if !annotated {
            self.git(&["tag", name]);
            return;
        }
        let mut args: Vec<String> = Self::sign_opts(sign);
        args.extend(["tag".into(), "-m".into(), format!("release {name}")]);
        args.push(if matches!(sign, Sign::No) { "-a" } else { "-s" }.into());
        args.push(name.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git(&args);
    }

    /// `git push --force origin main --tags`.
    pub fn push(&self) {
        self.git(&["push", "-q", "--force", "origin", "main", "--tags"]);
    }
}

/// An allowed-signers line for `key` (principal `who`), with extra options (`namespaces="git"`,
/// `valid-before=…`) when given.
pub fn allowed_signer(who: &str, options: &str, key: &SshKey) -> String {
    let key_only: Vec<&str> = key.public.split_whitespace().take(2).collect();
    if options.is_empty() {
        format!("{who} {}", key_only.join(" "))
    } else {
        format!("{who} {options} {}", key_only.join(" "))
    }
}
