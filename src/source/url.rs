//! FlakeSource URLs: which schemes are allowed, and no credentials, ever, in the URL.
//!
//! `https://` and `ssh://` are accepted; `http://`, `git://` and `file://` only with
//! `insecure: true`. The scp-like `git@host:path` form is refused with a hint to write
//! `ssh://git@host/path`: it has no port syntax and is easy to confuse with a local path.
//! Credentials belong in the source's Secret: a password or token in the userinfo, a userinfo
//! on anything but `ssh://` (a bare `https://TOKEN@host` is how tokens are usually pasted),
//! and any query string or fragment are refused. Errors and [`SourceUrl::redacted`] never
//! show them.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Ssh,
    Http,
    Git,
    File,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Ssh => "ssh",
            Scheme::Http => "http",
            Scheme::Git => "git",
            Scheme::File => "file",
        }
    }

    /// Whether the scheme needs `insecure: true` (no transport authentication).
    pub fn is_insecure(self) -> bool {
        matches!(self, Scheme::Http | Scheme::Git | Scheme::File)
    }
}

/// A validated source URL, free of credentials by construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUrl {
    scheme: Scheme,
    user: Option<String>,
    host: String,
    port: Option<u16>,
    path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("source URL is empty")]
    Empty,
    #[error(
        "source URL {url} carries credentials; put them in the Secret named by secretRef (username/password or identity/known_hosts)"
    )]
    Credentials { url: String },
    #[error(
        "source URL {url} has a query string or fragment; credentials and options belong in the Secret and the spec"
    )]
    QueryOrFragment { url: String },
    #[error("source URL {url} uses {scheme}://, which is unauthenticated: set insecure: true to allow it")]
    InsecureScheme { url: String, scheme: &'static str },
    #[error("source URL {url}: scheme {scheme:?} is not supported (use https:// or ssh://)")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("source URL {url} uses the scp-like form; write ssh://user@host/path instead")]
    ScpLike { url: String },
    #[error("source URL {url} has no host")]
    MissingHost { url: String },
    #[error("source URL {url} has an invalid port")]
    BadPort { url: String },
    #[error("source URL {url} has no repository path")]
    MissingPath { url: String },
    #[error("source URL {url} contains whitespace or control characters")]
    BadCharacters { url: String },
}

impl SourceUrl {
    /// Validates `input`; `insecure` is the FlakeSource's `insecure` field.
    pub fn parse(input: &str, insecure: bool) -> Result<Self, UrlError> {
        let url = || redact(input);
        if input.is_empty() {
            return Err(UrlError::Empty);
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::BadCharacters { url: url() });
        }
        let Some((scheme_str, rest)) = input.split_once("://") else {
            if looks_scp_like(input) {
                return Err(UrlError::ScpLike { url: url() });
            }
            return Err(UrlError::UnsupportedScheme {
                url: url(),
                scheme: String::new(),
            });
        };
        let scheme = match scheme_str.to_ascii_lowercase().as_str() {
            "https" => Scheme::Https,
            "ssh" => Scheme::Ssh,
            "http" => Scheme::Http,
            "git" => Scheme::Git,
            "file" => Scheme::File,
            other => {
                return Err(UrlError::UnsupportedScheme {
                    url: url(),
                    scheme: other.chars().take(20).collect(),
                });
            }
        };
        let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        // Credentials first: this must win over every other complaint.
        let user = match userinfo {
            None => None,
            Some(u) if scheme == Scheme::Ssh && !u.is_empty() && !u.contains(':') => Some(u.to_owned()),
            Some(_) => return Err(UrlError::Credentials { url: url() }),
        };
        if path.contains(['?', '#']) {
            return Err(UrlError::QueryOrFragment { url: url() });
        }
        if scheme.is_insecure() && !insecure {
            return Err(UrlError::InsecureScheme {
                url: url(),
                scheme: scheme.as_str(),
            });
        }
        let (host, port) = split_host_port(hostport).ok_or_else(|| UrlError::BadPort { url: url() })?;
        if scheme == Scheme::File {
            if !host.is_empty() && host != "localhost" {
                return Err(UrlError::UnsupportedScheme {
                    url: url(),
                    scheme: "file (remote host)".to_owned(),
                });
            }
        } else if host.is_empty() {
            return Err(UrlError::MissingHost { url: url() });
        }
        if path.trim_matches('/').is_empty() {
            return Err(UrlError::MissingPath { url: url() });
        }
        Ok(Self {
            scheme,
            user,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The SSH user named in the URL, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Host as written (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The URL handed to libgit2 (it has no credentials, so it is also safe to log).
    pub fn as_git_url(&self) -> String {
        let mut s = format!("{}://", self.scheme.as_str());
        if let Some(u) = &self.user {
            s.push_str(u);
            s.push('@');
        }
        if self.host.contains(':') {
            s.push('[');
            s.push_str(&self.host);
            s.push(']');
        } else {
            s.push_str(&self.host);
        }
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(&self.path);
        s
    }

    /// Display form for logs, status and events.
    pub fn redacted(&self) -> String {
        self.as_git_url()
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Redacts any string that might be a URL: the userinfo becomes `***@` (an SSH user without a
/// password is kept), and a query or fragment becomes `?***`. Used for error messages about
/// input that failed validation.
pub fn redact(input: &str) -> String {
    let mut out = String::new();
    let (head, rest) = match input.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            (scheme, rest)
        }
        None => ("", input),
    };
    let slash = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(slash);
    match authority.rfind('@') {
        Some(i) => {
            let user = &authority[..i];
            let keep = head.eq_ignore_ascii_case("ssh")
                && !user.contains(':')
                && !user.is_empty()
                && user.len() <= 32;
            if keep {
                out.push_str(user);
            } else {
                out.push_str("***");
            }
            out.push('@');
            out.push_str(&authority[i + 1..]);
        }
        None => out.push_str(authority),
    }
    match path.find(['?', '#']) {
        Some(i) => {
            out.push_str(&path[..i]);
            out.push_str("?***");
        }
        None => out.push_str(path),
    }
    out.chars().filter(|c| !c.is_control()).take(300).collect()
}

fn split_host_port(hostport: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(parse_port(p.strip_prefix(':')?)?))),
        };
    }
    match hostport.rsplit_once(':') {
        Some((host, p)) => Some((host, Some(parse_port(p)?))),
        None => Some((hostport, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

fn looks_scp_like(s: &str) -> bool {
    // `[user@]host:path`, where host has no '/' before the ':'.
    match s.split_once(':') {
        Some((before, _)) => !before.is_empty() && !before.contains('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn ok(s: &str) -> SourceUrl {
        SourceUrl::parse(s, false).unwrap()
    }

    #[test]
    fn secure_schemes_accepted() {
        let u = ok("https://git.example.com/infra/nixos-config.git");
        assert_eq!(u.scheme(), Scheme::Https);
        assert_eq!(u.host(), "git.example.com");
        assert_eq!(u.port(), None);
        assert_eq!(u.as_git_url(), "https://git.example.com/infra/nixos-config.git");
        let u = ok("ssh://git@git.example.com:2222/infra/cfg.git");
        assert_eq!(u.user(), Some("git"));
        assert_eq!(u.port(), Some(2222));
        assert_eq!(u.as_git_url(), "ssh://git@git.example.com:2222/infra/cfg.git");
        let u = ok("ssh://[::1]:22/repo");
        assert_eq!(u.host(), "::1");
        assert_eq!(u.as_git_url(), "ssh://[::1]:22/repo");
        assert_eq!(ok("HTTPS://h/r").scheme(), Scheme::Https);
    }

    #[test]
    fn insecure_schemes_need_the_flag() {
        for (s, scheme) in [
            ("http://h/r", "http"),
            ("git://127.0.0.1:9418/r", "git"),
            ("file:///srv/git/r.git", "file"),
        ] {
            let e = SourceUrl::parse(s, false).unwrap_err();
            assert_eq!(
                e,
                UrlError::InsecureScheme {
                    url: s.to_owned(),
                    scheme
                }
            );
            assert!(e.to_string().contains("insecure: true"), "{e}");
            assert_eq!(SourceUrl::parse(s, true).unwrap().as_git_url(), s);
        }
        assert!(SourceUrl::parse("file://otherhost/r", true).is_err());
        assert!(SourceUrl::parse("file://localhost/r", true).is_ok());
    }

    #[test]
    fn credentials_refused_and_never_echoed() {
        for s in [
            "https://bot:s3cret@git.example.com/r",
            "https://s3cret@git.example.com/r",
            "http://bot:s3cret@h/r",
            "ssh://git:s3cret@h/r",
            "git://s3cret@h/r",
            "https://:s3cret@h/r",
        ] {
            for insecure in [false, true] {
                let e = SourceUrl::parse(s, insecure).unwrap_err();
                assert!(matches!(e, UrlError::Credentials { .. }), "{s}: {e}");
                let msg = e.to_string();
                assert!(!msg.contains("s3cret"), "{msg}");
                assert!(msg.contains("secretRef"), "{msg}");
            }
        }
        for s in [
            "https://h/r?access_token=s3cret",
            "https://h/r#s3cret",
            "https://h?token=s3cret",
        ] {
            let e = SourceUrl::parse(s, false).unwrap_err();
            assert!(matches!(e, UrlError::QueryOrFragment { .. }), "{s}: {e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn other_refusals() {
        let e = SourceUrl::parse("git@github.com:org/repo.git", false).unwrap_err();
        assert!(matches!(e, UrlError::ScpLike { .. }));
        assert!(e.to_string().contains("ssh://"), "{e}");
        assert!(matches!(
            SourceUrl::parse("ftp://h/r", true),
            Err(UrlError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            SourceUrl::parse("/srv/git/r", true),
            Err(UrlError::UnsupportedScheme { .. })
        ));
        assert_eq!(SourceUrl::parse("", false), Err(UrlError::Empty));
        assert!(matches!(
            SourceUrl::parse("https:///r", false),
            Err(UrlError::MissingHost { .. })
        ));
        assert!(matches!(
            SourceUrl::parse("https://h", false),
            Err(UrlError::MissingPath { .. })
        ));
        for s in [
            "https://h:0/r",
            "https://h:99999/r",
            "https://h:x/r",
            "https://h:/r",
        ] {
            assert!(
                matches!(SourceUrl::parse(s, false), Err(UrlError::BadPort { .. })),
                "{s}"
            );
        }
        assert!(matches!(
            SourceUrl::parse("https://h/r\nx", false),
            Err(UrlError::BadCharacters { .. })
        ));
    }

    #[test]
    fn redact_hides_credentials() {
        assert_eq!(redact("https://bot:s3cret@h/r"), "https://***@h/r");
        assert_eq!(redact("https://s3cret@h/r"), "https://***@h/r");
        assert_eq!(redact("ssh://git@h/r"), "ssh://git@h/r");
        assert_eq!(redact("ssh://git:s3cret@h/r"), "ssh://***@h/r");
        assert_eq!(redact("https://h/r?token=s3cret"), "https://h/r?***");
        assert_eq!(redact("git@h:r"), "***@h:r");
        assert_eq!(ok("ssh://git@h/r").redacted(), "ssh://git@h/r");
    }
}
