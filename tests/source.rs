//! The git2 resolver against real git servers on this machine, all on 127.0.0.1 and started
//! by the tests: `file://` bare repositories, `git daemon` (killed mid-test), a small HTTP
//! server running `git-http-backend` as CGI behind basic auth, Debian's `sshd` with deploy
//! keys, and servers that accept and never answer (git, HTTP and SSH).
//!
//! A missing binary fails the test in CI (`CI=true`) and skips it with a printed reason
//! elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nixroll::source::known_hosts::KnownHosts;
use nixroll::source::refspec::RefChoice;
use nixroll::source::resolve::{Ancestry, Credentials, Poll, Remote, ResolveError, Resolver};
use nixroll::source::revision::CommitId;
use nixroll::source::socket_timeouts::{self, SocketTimeouts};
use nixroll::source::url::SourceUrl;

/// libgit2's socket timeouts for this test process: short, so that a thread stuck on a
/// silent server ends within seconds. `idle` is longer than the 2s caller timeouts below,
/// to show that a thread outlives its caller and then ends by itself.
const SOCKET: SocketTimeouts = SocketTimeouts {
    connect: Duration::from_secs(2),
    idle: Duration::from_secs(3),
};

/// Everything the resolver logged in this process (its `tracing` events), to check that no
/// secret ever reaches a log.
static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sets the socket timeouts and the log capture once per process; every test calls it first.
fn init() {
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(w.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        assert_eq!(socket_timeouts::set(SOCKET).unwrap(), SOCKET);
        buf
    });
}

fn log_text() -> String {
    String::from_utf8_lossy(&LOG.get().unwrap().lock().unwrap()).into_owned()
}

/// `Some(path)` if the binary exists; in CI a missing one fails the test.
fn need(bin: &Path) -> Option<PathBuf> {
    if bin.is_file() {
        return Some(bin.to_owned());
    }
    let why = format!(
        "{} is missing (Debian packages git, openssh-server, openssh-client, socat, openssl; see .ci/run)",
        bin.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Where the `git` on PATH keeps git-daemon, git-http-backend and git-upload-pack.
fn git_exec_path() -> PathBuf {
    PathBuf::from(git(Path::new("/"), &["--exec-path"]))
}

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
    init();
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
    init();
    let repo = Repo::new();
    let (res, remote) = (repo.resolver(), repo.file_remote());
    assert!(res.list_refs(&remote).await.unwrap().is_empty());
    let e = res.resolve(&remote, &branch("main")).await.unwrap_err();
    assert!(e.to_string().contains("branch \"main\" not found"), "{e}");
}

#[tokio::test]
async fn file_fast_forward_followed_force_push_blocked() {
    init();
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

/// A child process (server) killed and reaped on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Kills the server process itself and waits until it is gone.
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `git-daemon` on 127.0.0.1:`port`, serving `base`. It is started directly, not as
/// `git daemon`: the `git` wrapper runs git-daemon as its child, so killing the wrapper
/// leaves the daemon serving (the reason the first version of the test below failed).
fn git_daemon(base: &Path, port: u16) -> Option<Server> {
    let bin = need(&git_exec_path().join("git-daemon"))?;
    let mut child = Command::new(bin);
    child
        .args([
            "--export-all",
            "--reuseaddr",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", base.display()),
            &base.display().to_string(),
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", base);
    Some(serve(child, port, "git daemon"))
}

/// Start a quiet server process and wait until it listens on 127.0.0.1:`port`.
fn serve(mut cmd: Command, port: u16, what: &str) -> Server {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_listening(port, what);
    server
}

#[tokio::test]
async fn git_daemon_killed_keeps_the_last_revision() {
    init();
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let port = free_port();
    let Some(mut daemon) = git_daemon(&repo.root.join("srv"), port) else {
        return;
    };
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
    daemon.kill();
    let c = repo.commit("c");
    repo.push(&["main"]);
    let started = Instant::now();
    let p = res.poll(&remote, &branch("main"), Some(&rb), false).await;
    assert!(started.elapsed() < Duration::from_secs(5));
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
    let msg = error.to_string();
    assert!(
        msg.contains(&format!("git://127.0.0.1:{port}/repo.git")) && msg.contains("connect"),
        "names the remote and what failed: {msg}"
    );
    assert_eq!(p.current().unwrap().revision.commit, b);
    // Without any previous revision there is nothing to follow.
    let p = res.poll(&remote, &branch("main"), None, false).await;
    assert!(p.current().is_none(), "{p:?}");

    // The server comes back on the same port: the next poll follows the commit it missed.
    let Some(_daemon) = git_daemon(&repo.root.join("srv"), port) else {
        return;
    };
    let p = res.poll(&remote, &branch("main"), Some(&rb), false).await;
    let Poll::Advanced(rc) = p else { panic!("{p:?}") };
    assert_eq!(rc.revision.commit, c);
}

/// Accepts connections and never writes a byte. Counts connections, the most open at once,
/// and the ones the client closed (read returns end-of-file).
struct Silent {
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    closed_by_client: Arc<AtomicUsize>,
}

fn silent_server() -> Silent {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = Silent {
        port: listener.local_addr().unwrap().port(),
        accepted: Arc::default(),
        open: Arc::default(),
        max_open: Arc::default(),
        closed_by_client: Arc::default(),
    };
    let (accepted, open, max_open, closed) = (
        s.accepted.clone(),
        s.open.clone(),
        s.max_open.clone(),
        s.closed_by_client.clone(),
    );
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            accepted.fetch_add(1, Ordering::SeqCst);
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            max_open.fetch_max(now, Ordering::SeqCst);
            let (open, closed) = (open.clone(), closed.clone());
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut buf = [0u8; 4096];
                // Swallow whatever the client sends, answer nothing.
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            closed.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    s
}

/// Waits until the resolver's threads have all ended, and returns how long that took.
async fn threads_end(res: &Resolver, within: Duration) -> Duration {
    let started = Instant::now();
    while res.running_threads() > 0 {
        assert!(
            started.elapsed() < within,
            "{} git thread(s) still running after {within:?}",
            res.running_threads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

const CALLER_TIMEOUT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_millis(1500);

/// One resolve against a silent server: times out for the caller in bound, and then the
/// git thread ends by itself (libgit2's idle timeout) and closes its socket.
async fn silent_case(res: &Resolver, remote: &Remote, srv: &Silent) {
    let started = Instant::now();
    let e = res.resolve(remote, &branch("main")).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, ResolveError::TimedOut { .. }), "{e}");
    assert_eq!(e.reason(), "Timeout");
    assert!(
        took >= CALLER_TIMEOUT && took < CALLER_TIMEOUT + SLACK,
        "{took:?}"
    );
    // The caller gave up, but its thread is still blocked inside libgit2…
    assert_eq!(res.running_threads(), 1);
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 1);
    // …until the idle timeout ends it.
    threads_end(res, SOCKET.idle + SLACK).await;
    let total = started.elapsed();
    assert!(total < SOCKET.connect + SOCKET.idle + SLACK, "{total:?}");
    let until = Instant::now() + Duration::from_secs(2);
    while srv.closed_by_client.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < until, "the git thread did not close its socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn silent_server_trips_the_timeout() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let resolver = |n: usize| Resolver::new(tmp.path().join(n.to_string()), 2);
    // The cases run side by side, each with its own resolver, to keep the test short.
    let one = |scheme: &'static str, n: usize| {
        let res = resolver(n);
        async move {
            let srv = silent_server();
            let r = remote(
                &format!("{scheme}://127.0.0.1:{}/repo.git", srv.port),
                CALLER_TIMEOUT,
            );
            silent_case(&res, &r, &srv).await;
        }
    };
    tokio::join!(
        one("git", 0),
        one("http", 1),
        silent_ssh(resolver(2)),
        cap(resolver(3)),
        lane(resolver(4))
    );
}

/// A silent SSH server (no banner): the caller times out, and libssh2's timeout (libgit2
/// passes its idle timeout on) ends the thread.
async fn silent_ssh(res: Resolver) {
    let srv = silent_server();
    // Any host key will do: the server never gets as far as showing one.
    let known = format!(
        "[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC5Mh9MshY41R8bg40fYmGn+YyoXRRKruCtGGxzAxn4B\n",
        srv.port
    );
    let r = Remote {
        url: SourceUrl::parse(&format!("ssh://git@127.0.0.1:{}/repo.git", srv.port), false).unwrap(),
        credentials: Credentials::SshKey {
            identity: "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-needed\n-----END OPENSSH PRIVATE KEY-----\n"
                .to_owned(),
            passphrase: None,
        },
        known_hosts: Some(KnownHosts::parse(&known).unwrap()),
        timeout: CALLER_TIMEOUT,
    };
    silent_case(&res, &r, &srv).await;
}

/// Three silent remotes at once with a cap of 2 threads: every caller times out in bound,
/// and never more than 2 threads (2 connections) exist.
async fn cap(res: Resolver) {
    let servers: Vec<Silent> = (0..3).map(|_| silent_server()).collect();
    let remotes: Vec<Remote> = servers
        .iter()
        .map(|s| remote(&format!("git://127.0.0.1:{}/repo.git", s.port), CALLER_TIMEOUT))
        .collect();
    let main = branch("main");
    let started = Instant::now();
    let (r0, r1, r2) = tokio::join!(
        res.resolve(&remotes[0], &main),
        res.resolve(&remotes[1], &main),
        res.resolve(&remotes[2], &main),
    );
    assert!(started.elapsed() < CALLER_TIMEOUT + SLACK);
    for r in [r0, r1, r2] {
        assert!(matches!(r, Err(ResolveError::TimedOut { .. })), "{r:?}");
    }
    assert_eq!(res.running_threads(), 2);
    let connections: usize = servers.iter().map(|s| s.accepted.load(Ordering::SeqCst)).sum();
    assert_eq!(connections, 2, "the third call waited for a thread and gave up");
    threads_end(&res, SOCKET.idle + SLACK).await;
}

/// Two calls to one silent remote: one lane per remote, so only one thread (one
/// connection) at a time; the other caller waits and times out in bound.
async fn lane(res: Resolver) {
    let srv = silent_server();
    let r = remote(&format!("git://127.0.0.1:{}/repo.git", srv.port), CALLER_TIMEOUT);
    let main = branch("main");
    let started = Instant::now();
    let (x, y) = tokio::join!(res.resolve(&r, &main), res.resolve(&r, &main));
    assert!(started.elapsed() < CALLER_TIMEOUT + SLACK);
    assert!(matches!(x, Err(ResolveError::TimedOut { .. })), "{x:?}");
    assert!(matches!(y, Err(ResolveError::TimedOut { .. })), "{y:?}");
    assert_eq!(res.running_threads(), 1);
    threads_end(&res, SOCKET.idle + SLACK).await;
    assert_eq!(srv.max_open.load(Ordering::SeqCst), 1);
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 1);
}

/// A minimal HTTP/1.1 server (one request per connection) that requires basic auth and
/// runs `git-http-backend` as a CGI program, like a web server in front of git would.
struct HttpGit {
    port: u16,
    /// `METHOD target auth` per request, auth being `none`, `ok` or `bad`.
    requests: Arc<Mutex<Vec<String>>>,
}

fn http_git(project_root: &Path, user: &str, password: &str) -> Option<HttpGit> {
    let backend = need(&git_exec_path().join("git-http-backend"))?;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    let requests: Arc<Mutex<Vec<String>>> = Arc::default();
    let (log, root) = (requests.clone(), project_root.to_owned());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (backend, root, expected, log) =
                (backend.clone(), root.clone(), expected.clone(), log.clone());
            std::thread::spawn(move || {
                if let Err(e) = serve_cgi(stream, &backend, &root, &expected, &log) {
                    eprintln!("test HTTP server: {e}");
                }
            });
        }
    });
    Some(HttpGit { port, requests })
}

fn serve_cgi(
    mut stream: TcpStream,
    backend: &Path,
    root: &Path,
    expected_auth: &str,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if let Some(n) = header("content-length") {
        body.resize(n.parse().unwrap_or(0), 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let auth = match header("authorization") {
        None => "none",
        Some(a) if a == expected_auth => "ok",
        Some(_) => "bad",
    };
    log.lock().unwrap().push(format!("{method} {target} {auth}"));
    if auth != "ok" {
        stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let mut child = Command::new(backend)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root)
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or(""))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "bot")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("HTTP_GIT_PROTOCOL", header("git-protocol").unwrap_or(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let cgi = out.stdout;
    let (head, content) = match cgi.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&cgi[..i], &cgi[i + 4..]),
        None => match cgi.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&cgi[..i], &cgi[i + 2..]),
            None => (&cgi[..0], &cgi[..]),
        },
    };
    let mut status = "200 OK".to_owned();
    let mut response_headers = String::new();
    for l in String::from_utf8_lossy(head).lines() {
        match l.strip_prefix("Status:") {
            Some(s) => status = s.trim().to_owned(),
            None => response_headers.push_str(&format!("{l}\r\n")),
        }
    }
    stream.write_all(
        format!(
            "HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            content.len()
        )
        .as_bytes(),
    )?;
    stream.write_all(content)?;
    Ok(())
}

/// Asserts that no form of a secret shows in `text`.
fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for s in secrets {
        assert!(
            !s.is_empty() && !text.contains(s),
            "{what} shows a secret: {text}"
        );
    }
}

#[tokio::test]
async fn http_basic_auth_through_git_http_backend() {
    init();
    const USER: &str = "bot";
    const PASSWORD: &str = "s3cret-Pa55word";
    const WRONG: &str = "wr0ng-Pa55word";
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let Some(srv) = http_git(&repo.root.join("srv"), USER, PASSWORD) else {
        return;
    };
    let url = format!("http://127.0.0.1:{}/repo.git", srv.port);
    // Plain http is unauthenticated transport: the URL policy wants `insecure: true`.
    assert!(SourceUrl::parse(&url, false).is_err());
    let res = repo.resolver();
    let with = |username: &str, password: &str| Remote {
        url: SourceUrl::parse(&url, true).unwrap(),
        credentials: Credentials::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        },
        known_hosts: None,
        timeout: Duration::from_secs(20),
    };
    let requests = |srv: &HttpGit| std::mem::take(&mut *srv.requests.lock().unwrap());

    // No credentials at all.
    let e = res
        .resolve(&remote(&url, Duration::from_secs(20)), &branch("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::AuthenticationFailed { .. }), "{e}");
    requests(&srv);

    // The right password: listed, and a fast-forward fetched through the same auth.
    let good = with(USER, PASSWORD);
    let p = res.poll(&good, &branch("main"), None, false).await;
    let Poll::Advanced(ra) = p else { panic!("{p:?}") };
    assert_eq!(ra.revision.commit, a);
    let b = repo.commit("b");
    repo.push(&["main"]);
    let p = res.poll(&good, &branch("main"), Some(&ra), false).await;
    let Poll::Advanced(rb) = p else { panic!("{p:?}") };
    assert_eq!(rb.revision.commit, b);
    let seen = requests(&srv);
    assert!(
        seen.iter()
            .any(|r| r.starts_with("POST /repo.git/git-upload-pack ok")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|r| r.ends_with(" bad")), "{seen:?}");

    // A wrong password: an authentication error that names no secret, after one try.
    let e = res
        .resolve(&with(USER, WRONG), &branch("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::AuthenticationFailed { .. }), "{e}");
    assert_eq!(e.reason(), "AuthenticationFailed");
    let msg = e.to_string();
    assert!(msg.contains(&url), "{msg}");
    let b64 = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{p}"));
    let (b64_right, b64_wrong) = (b64(PASSWORD), b64(WRONG));
    let secrets = [PASSWORD, WRONG, b64_right.as_str(), b64_wrong.as_str()];
    assert_no_secret(&msg, &secrets, "the error");
    assert_no_secret(&format!("{e:?}"), &secrets, "the error's Debug");
    let seen = requests(&srv);
    assert_eq!(
        seen.iter().filter(|r| r.ends_with(" bad")).count(),
        1,
        "the same rejected password is not retried: {seen:?}"
    );
    // A failed poll keeps the last revision.
    let p = res
        .poll(&with(USER, WRONG), &branch("main"), Some(&rb), false)
        .await;
    assert_eq!(p.current(), Some(&rb));

    // The resolver logged these calls (so the capture works), and no secret.
    let log = log_text();
    assert!(
        log.contains("git remote call failed") && log.contains("AuthenticationFailed"),
        "{log}"
    );
    assert_no_secret(&log, &secrets, "the log");
}

/// Runs `ssh-keygen` to make a key pair in `dir`; returns (private key text, public key line).
fn keygen(ssh_keygen: &Path, dir: &Path, name: &str, ty: &[&str]) -> (String, String) {
    let path = dir.join(name);
    let out = Command::new(ssh_keygen)
        .args(["-q", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .args(ty)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (
        std::fs::read_to_string(&path).unwrap(),
        std::fs::read_to_string(path.with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned(),
    )
}

/// Debian's sshd on 127.0.0.1, run by the test as the current user, with a temporary host
/// key and authorized_keys; `git-upload-pack` from PATH serves the repositories.
struct Sshd {
    _server: Server,
    port: u16,
    log: PathBuf,
    host_pub: String,
}

impl Sshd {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn connections(&self) -> usize {
        self.log().matches("Connection from 127.0.0.1").count()
    }
}

fn sshd(dir: &Path, ssh_keygen: &Path, authorized: &[&str]) -> Option<Sshd> {
    let bin = need(Path::new("/usr/sbin/sshd"))?;
    let (_, host_pub) = keygen(ssh_keygen, dir, "host_ed25519", &["-t", "ed25519"]);
    let keys: String = authorized.iter().map(|k| format!("restrict {k}\n")).collect();
    std::fs::write(dir.join("authorized_keys"), keys).unwrap();
    let port = free_port();
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nUsePAM no\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding no\nX11Forwarding no\n\
             PermitTTY no\nLogLevel VERBOSE\n"
        ),
    )
    .unwrap();
    // As root, sshd wants its privilege separation directory (Debian's unit creates it).
    if Command::new("id").arg("-u").output().unwrap().stdout == b"0\n" {
        std::fs::create_dir_all("/run/sshd").unwrap();
    }
    let log = dir.join("sshd.log");
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Server(child);
    // Ready when it says so (a probe connection would show in the log).
    let until = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Server listening on 127.0.0.1")
    {
        assert!(
            Instant::now() < until,
            "sshd did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Sshd {
        _server: server,
        port,
        log,
        host_pub,
    })
}

#[tokio::test]
async fn ssh_deploy_keys_and_host_key_pinning() {
    init();
    let Some(ssh_keygen) = need(Path::new("/usr/bin/ssh-keygen")) else {
        return;
    };
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let keys = repo.root.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (ed_key, ed_pub) = keygen(&ssh_keygen, &keys, "deploy_ed25519", &["-t", "ed25519"]);
    let (rsa_key, rsa_pub) = keygen(&ssh_keygen, &keys, "deploy_rsa", &["-t", "rsa", "-b", "3072"]);
    let (stranger_key, _) = keygen(&ssh_keygen, &keys, "stranger", &["-t", "ed25519"]);
    let (_, impostor_pub) = keygen(&ssh_keygen, &keys, "impostor_host", &["-t", "ed25519"]);
    let Some(sshd) = sshd(&keys, &ssh_keygen, &[&ed_pub, &rsa_pub]) else {
        return;
    };
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        user.trim(),
        sshd.port,
        repo.bare.display()
    );
    let key_of = |pub_line: &str| pub_line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let known = |pub_line: &str| {
        KnownHosts::parse(&format!("[127.0.0.1]:{} {}\n", sshd.port, key_of(pub_line))).unwrap()
    };
    let with = |identity: &str, known_hosts: Option<KnownHosts>, timeout: Duration| Remote {
        url: SourceUrl::parse(&url, false).unwrap(),
        credentials: Credentials::SshKey {
            identity: identity.to_owned(),
            passphrase: None,
        },
        known_hosts,
        timeout,
    };
    let t = Duration::from_secs(20);
    let res = repo.resolver();

    // ed25519 deploy key: listed, then a fast-forward fetched over SSH.
    let ed = with(&ed_key, Some(known(&sshd.host_pub)), t);
    let p = res.poll(&ed, &branch("main"), None, false).await;
    let Poll::Advanced(ra) = p else {
        panic!("{p:?}\n{}", sshd.log())
    };
    assert_eq!(ra.revision.commit, a);
    let b = repo.commit("b");
    repo.push(&["main"]);
    let p = res.poll(&ed, &branch("main"), Some(&ra), false).await;
    let Poll::Advanced(rb) = p else { panic!("{p:?}") };
    assert_eq!(rb.revision.commit, b);
    assert!(sshd.log().contains("Accepted publickey"), "{}", sshd.log());

    // RSA deploy key (OpenSSH format, as ssh-keygen writes it).
    let rsa = with(&rsa_key, Some(known(&sshd.host_pub)), t);
    let r = res.resolve(&rsa, &branch("main")).await;
    assert_eq!(r.map(|r| r.revision.commit).unwrap(), b);
    assert!(sshd.log().contains("Accepted publickey for") && sshd.log().contains(": RSA SHA256:"));

    // A key the server does not know: an authentication error that shows no key material,
    // after one offer.
    let failed_before = sshd.log().matches("Failed publickey").count();
    let e = res
        .resolve(
            &with(&stranger_key, Some(known(&sshd.host_pub)), t),
            &branch("main"),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::AuthenticationFailed { .. }), "{e}");
    let key_lines: Vec<&str> = [&ed_key, &rsa_key, &stranger_key]
        .iter()
        .flat_map(|k| k.lines().filter(|l| !l.starts_with("-----")))
        .collect();
    assert_no_secret(&e.to_string(), &key_lines, "the error");
    assert_eq!(
        sshd.log().matches("Failed publickey").count() - failed_before,
        1,
        "{}",
        sshd.log()
    );

    // A wrong host key in known_hosts: refused, and no key was offered to that host.
    let accepted_before = sshd.log().matches("Accepted publickey").count();
    let postponed_before = sshd.log().matches("Postponed publickey").count();
    let e = res
        .resolve(&with(&ed_key, Some(known(&impostor_pub)), t), &branch("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::HostKeyRejected { .. }), "{e}");
    assert_eq!(e.reason(), "HostKeyRejected");
    assert!(e.to_string().contains("differs"), "{e}");
    assert!(
        !e.to_string()
            .contains(key_of(&impostor_pub).split_whitespace().nth(1).unwrap())
    );
    // The host pinned under another port only: unknown, refused as well.
    let elsewhere = KnownHosts::parse(&format!("[127.0.0.1]:1 {}\n", key_of(&sshd.host_pub))).unwrap();
    let e = res
        .resolve(&with(&ed_key, Some(elsewhere), t), &branch("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::HostKeyRejected { .. }), "{e}");
    assert_eq!(sshd.log().matches("Accepted publickey").count(), accepted_before);
    assert_eq!(
        sshd.log().matches("Postponed publickey").count(),
        postponed_before
    );

    // No known_hosts: refused before connecting (the server sees no connection).
    let before = sshd.connections();
    let e = res
        .resolve(&with(&ed_key, None, t), &branch("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, ResolveError::NoKnownHosts { .. }), "{e}");
    assert!(e.to_string().contains("no trust on first use"), "{e}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sshd.connections(), before, "{}", sshd.log());

    let log = log_text();
    assert_no_secret(&log, &key_lines, "the log");
}

#[tokio::test]
async fn ssh_without_known_hosts_is_refused_before_connecting() {
    init();
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

/// Runs openssl with `args` in `dir`.
fn openssl(bin: &Path, dir: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS in front of 127.0.0.1:`backend` on a free port, with `cert`/`key` (socat, one process
/// per connection).
fn tls_proxy(socat: &Path, cert: &Path, key: &Path, backend: u16) -> (Server, u16) {
    let port = free_port();
    let mut proxy = Command::new(socat);
    proxy
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            cert.display(),
            key.display()
        ))
        .arg(format!("TCP:127.0.0.1:{backend}"));
    (serve(proxy, port, "socat TLS proxy"), port)
}

/// HTTPS, as a self-hosted forge with a private CA serves it: the controller (the real binary,
/// as its Deployment runs it) trusts that CA through OpenSSL's `SSL_CERT_FILE` and resolves the
/// branch with basic auth; a server whose certificate that CA did not sign is refused
/// (`FetchFailed`), so TLS is verified, never skipped. No credential reaches the status or the
/// controller's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_through_ssl_cert_file() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    use nixroll::api::FlakeSource;

    const USER: &str = "bot";
    const PASSWORD: &str = "tls-s3cret-Pa55word";
    let (Some(openssl_bin), Some(socat)) = (
        need(Path::new("/usr/bin/openssl")),
        need(Path::new("/usr/bin/socat")),
    ) else {
        return;
    };
    let repo = Repo::new();
    let a = repo.commit("a");
    repo.push(&["main"]);
    let Some(srv) = http_git(&repo.root.join("srv"), USER, PASSWORD) else {
        return;
    };

    // A private CA, a server certificate it signs for localhost, and a self-signed impostor.
    let pki = repo.root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=nixroll test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&openssl_bin, &pki, &ca);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ];
    csr.extend(ec);
    csr.extend(["-keyout", "srv.key", "-out", "srv.csr"]);
    openssl(&openssl_bin, &pki, &csr);
    openssl(
        &openssl_bin,
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-copy_extensions",
            "copyall",
            "-out",
            "srv.pem",
        ],
    );
    let mut rogue = vec!["req", "-x509", "-days", "2", "-subj", "/CN=localhost"];
    rogue.extend(["-addext", "subjectAltName=DNS:localhost"]);
    rogue.extend(ec);
    rogue.extend(["-keyout", "rogue.key", "-out", "rogue.pem"]);
    openssl(&openssl_bin, &pki, &rogue);
    let (_good, good_port) = tls_proxy(&socat, &pki.join("srv.pem"), &pki.join("srv.key"), srv.port);
    let (_bad, bad_port) = tls_proxy(&socat, &pki.join("rogue.pem"), &pki.join("rogue.key"), srv.port);

    // The embedded API with nixroll's CRDs, the credentials, and the controller binary.
    let (api, client) = common::api::start_with_crd().await;
    Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(
        client.clone(),
    )
    .create(&PostParams::default(), &nixroll::api::flakesource_crd())
    .await
    .unwrap();
    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "nixroll-system"}})).unwrap();
    Api::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "nixroll-system");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "flake-source-credentials", "namespace": "nixroll-system"},
        "stringData": {"username": USER, "password": PASSWORD}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let kubeconfig = repo.root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let log_path = repo.root.join("controller.log");
    let child = Command::new(env!("CARGO_BIN_EXE_nixroll"))
        .args([
            "controller",
            "--no-leader-election",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--source-cache")
        .arg(repo.root.join("cache"))
        .env("KUBECONFIG", &kubeconfig)
        .env("SSL_CERT_FILE", pki.join("ca.pem"))
        .env("RUST_LOG", "nixroll=debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(repo.root.join("controller.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let _controller = Server(child);

    let sources: Api<FlakeSource> = Api::namespaced(client.clone(), "nixroll-system");
    for (name, port) in [("trusted", good_port), ("impostor", bad_port)] {
        let fs: FlakeSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
            "metadata": {"name": name, "namespace": "nixroll-system"},
            "spec": {"url": format!("https://localhost:{port}/repo.git"), "ref": {"branch": "main"},
                     "timeout": "20s", "secretRef": {"name": "flake-source-credentials"}}
        }))
        .unwrap();
        sources.create(&PostParams::default(), &fs).await.unwrap();
    }
    let until = Instant::now() + Duration::from_secs(60);
    let (trusted, impostor) = loop {
        let t = sources.get("trusted").await.unwrap().status.unwrap_or_default();
        let i = sources.get("impostor").await.unwrap().status.unwrap_or_default();
        if t.last_fetch_time.is_some() && i.conditions.iter().any(|c| c.type_ == "FetchFailed") {
            break (t, i);
        }
        assert!(Instant::now() < until, "no verdict:\n{t:?}\n{i:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        trusted.commit.as_deref(),
        Some(a.to_string().as_str()),
        "{trusted:?}"
    );
    assert!(
        trusted
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{trusted:?}"
    );
    assert_eq!(impostor.commit, None, "{impostor:?}");
    let failed = impostor
        .conditions
        .iter()
        .find(|c| c.type_ == "FetchFailed")
        .unwrap();
    assert_eq!(failed.reason, "CertificateRejected", "{failed:?}");
    assert!(
        failed.message.contains("TLS certificate is not trusted") && failed.message.contains("SSL_CERT_FILE"),
        "the refusal says it is the certificate and what to do: {}",
        failed.message
    );
    let seen: Vec<String> = srv.requests.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /repo.git/info/refs?service=git-upload-pack ok")),
        "the trusted source listed the refs over TLS with the password: {seen:?}"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let status_text = format!("{trusted:?}{impostor:?}");
    assert_no_secret(&status_text, &[PASSWORD, &b64], "the status");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default()
        + &std::fs::read_to_string(repo.root.join("controller.err")).unwrap_or_default();
    assert!(
        log.contains("impostor"),
        "the controller logged the refusal: {log}"
    );
    assert_no_secret(&log, &[PASSWORD, &b64], "the controller's log");
}
