//! OpenSSH `known_hosts` as given in a FlakeSource Secret, and the host-key check.
//!
//! Supported: plain host names, `[host]:port`, comma-separated lists, hashed `|1|salt|hash`
//! entries (HMAC-SHA1, via `ring`, already in the dependency tree through rustls), comments and
//! blank lines. Refused with an error (the whole file, so a typo never silently weakens the
//! pin): `@cert-authority` and `@revoked` markers, wildcard (`*`, `?`) and negated (`!`)
//! patterns, keys whose base64 blob does not encode the type written before it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

#[derive(Clone, Debug)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    hosts: Vec<HostPattern>,
    key_type: String,
    key: Vec<u8>,
}

#[derive(Clone, Debug)]
enum HostPattern {
    /// Lowercased, as written: `host` or `[host]:port`.
    Plain(String),
    Hashed {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KnownHostsError {
    #[error("known_hosts has no entries: SSH without known_hosts is refused (no trust on first use)")]
    Empty,
    #[error("known_hosts line {line}: marker {marker} is not supported")]
    Marker { line: usize, marker: String },
    #[error("known_hosts line {line}: expected `hosts key-type base64-key [comment]`")]
    Malformed { line: usize },
    #[error(
        "known_hosts line {line}: host pattern {pattern:?} uses wildcards or negation, which are not supported"
    )]
    Pattern { line: usize, pattern: String },
    #[error("known_hosts line {line}: hashed host entry is malformed")]
    BadHash { line: usize },
    #[error("known_hosts line {line}: key is not valid base64")]
    BadBase64 { line: usize },
    #[error("known_hosts line {line}: key blob is of type {found:?}, not {written:?}")]
    TypeMismatch {
        line: usize,
        written: String,
        found: String,
    },
}

/// The outcome of checking a presented host key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// An entry for this host has exactly this key.
    Match,
    /// The host is listed, but with other keys: refuse (possible interception).
    Mismatch,
    /// The host is not listed at all: refuse (no trust on first use).
    Unknown,
}

impl KnownHosts {
    pub fn parse(text: &str) -> Result<Self, KnownHostsError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut fields = l.split_whitespace();
            let first = fields.next().ok_or(KnownHostsError::Malformed { line })?;
            if first.starts_with('@') {
                return Err(KnownHostsError::Marker {
                    line,
                    marker: first.chars().take(32).collect(),
                });
            }
            let (Some(key_type), Some(b64)) = (fields.next(), fields.next()) else {
                return Err(KnownHostsError::Malformed { line });
            };
            let key = B64.decode(b64).map_err(|_| KnownHostsError::BadBase64 { line })?;
            let found = blob_type(&key).ok_or(KnownHostsError::Malformed { line })?;
            if found != key_type {
                return Err(KnownHostsError::TypeMismatch {
                    line,
                    written: key_type.chars().take(64).collect(),
                    found: found.chars().take(64).collect(),
                });
            }
            let mut hosts = Vec::new();
            for pat in first.split(',') {
                hosts.push(parse_pattern(pat, line)?);
            }
            entries.push(Entry {
                hosts,
                key_type: key_type.to_owned(),
                key,
            });
        }
        if entries.is_empty() {
            return Err(KnownHostsError::Empty);
        }
        Ok(Self { entries })
    }

    /// Checks the key a server presented. `port` 22 is looked up as `host`, any other as
    /// `[host]:port`, like OpenSSH. `key_type` is the SSH name (`ssh-ed25519`, `ssh-rsa`, …);
    /// `key` is the raw public key blob.
    pub fn check(&self, host: &str, port: u16, key_type: &str, key: &[u8]) -> HostKeyCheck {
        let name = host_name(host, port);
        let mut listed = false;
        for e in &self.entries {
            if e.hosts.iter().any(|p| p.matches(&name)) {
                listed = true;
                if e.key_type == key_type && e.key == key {
                    return HostKeyCheck::Match;
                }
            }
        }
        if listed {
            HostKeyCheck::Mismatch
        } else {
            HostKeyCheck::Unknown
        }
    }
}

/// The name OpenSSH writes into known_hosts for a host and port.
pub fn host_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

impl HostPattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Plain(p) => p == name,
            HostPattern::Hashed { salt, hash } => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
                ring::hmac::verify(&k, name.as_bytes(), hash).is_ok()
            }
        }
    }
}

fn parse_pattern(pat: &str, line: usize) -> Result<HostPattern, KnownHostsError> {
    if let Some(rest) = pat.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|').ok_or(KnownHostsError::BadHash { line })?;
        let salt = B64.decode(salt).map_err(|_| KnownHostsError::BadHash { line })?;
        let hash = B64.decode(hash).map_err(|_| KnownHostsError::BadHash { line })?;
        if hash.len() != 20 || salt.is_empty() {
            return Err(KnownHostsError::BadHash { line });
        }
        return Ok(HostPattern::Hashed { salt, hash });
    }
    if pat.is_empty() || pat.starts_with('|') || pat.contains(['*', '?', '!']) {
        return Err(KnownHostsError::Pattern {
            line,
            pattern: pat.chars().take(64).collect(),
        });
    }
    Ok(HostPattern::Plain(pat.to_ascii_lowercase()))
}

/// The key type encoded at the start of an SSH public key blob (a length-prefixed string).
fn blob_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4usize.checked_add(len)?)?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A syntactically valid key blob of `ty` with payload `tag`.
    fn blob(ty: &str, tag: u8) -> Vec<u8> {
        let mut b = (ty.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(ty.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 32]);
        b.extend_from_slice(&[tag; 32]);
        b
    }

    fn line(hosts: &str, ty: &str, tag: u8) -> String {
        format!("{hosts} {ty} {} comment here", B64.encode(blob(ty, tag)))
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&k, name.as_bytes());
        format!("|1|{}|{}", B64.encode(salt), B64.encode(tag.as_ref()))
    }

    const ED: &str = "ssh-ed25519";
    const RSA: &str = "ssh-rsa";

    #[test]
    fn plain_port_and_lists() {
        let kh = KnownHosts::parse(&format!(
            "# pins\n\n{}\n{}\n{}\n",
            line("git.example.com,10.0.0.1", ED, 1),
            line("[127.0.0.1]:2222", ED, 2),
            line("Git.Example.com", RSA, 3),
        ))
        .unwrap();
        let ed1 = blob(ED, 1);
        assert_eq!(kh.check("git.example.com", 22, ED, &ed1), HostKeyCheck::Match);
        assert_eq!(kh.check("GIT.example.com", 22, ED, &ed1), HostKeyCheck::Match);
        assert_eq!(kh.check("10.0.0.1", 22, ED, &ed1), HostKeyCheck::Match);
        // Second key type for the same host (OpenSSH allows several).
        assert_eq!(
            kh.check("git.example.com", 22, RSA, &blob(RSA, 3)),
            HostKeyCheck::Match
        );
        // Same host, other key, or a key of the right bytes under another type.
        assert_eq!(
            kh.check("git.example.com", 22, ED, &blob(ED, 9)),
            HostKeyCheck::Mismatch
        );
        assert_eq!(kh.check("git.example.com", 22, RSA, &ed1), HostKeyCheck::Mismatch);
        // Port matters: the [host]:port entry is not the port-22 entry and vice versa.
        assert_eq!(kh.check("127.0.0.1", 2222, ED, &blob(ED, 2)), HostKeyCheck::Match);
        assert_eq!(kh.check("127.0.0.1", 22, ED, &blob(ED, 2)), HostKeyCheck::Unknown);
        assert_eq!(kh.check("git.example.com", 2222, ED, &ed1), HostKeyCheck::Unknown);
        assert_eq!(kh.check("other", 22, ED, &ed1), HostKeyCheck::Unknown);
        // No prefix matching.
        assert_eq!(kh.check("git.example.co", 22, ED, &ed1), HostKeyCheck::Unknown);
    }

    #[test]
    fn hashed_entries() {
        let kh = KnownHosts::parse(&format!(
            "{}\n{}\n",
            line(&hashed("git.example.com", b"salt-one-20-bytes!!!"), ED, 1),
            line(&hashed("[127.0.0.1]:2222", b"another salt"), ED, 2),
        ))
        .unwrap();
        assert_eq!(
            kh.check("git.example.com", 22, ED, &blob(ED, 1)),
            HostKeyCheck::Match
        );
        assert_eq!(
            kh.check("git.example.com", 22, ED, &blob(ED, 5)),
            HostKeyCheck::Mismatch
        );
        assert_eq!(kh.check("127.0.0.1", 2222, ED, &blob(ED, 2)), HostKeyCheck::Match);
        assert_eq!(
            kh.check("git.example.org", 22, ED, &blob(ED, 1)),
            HostKeyCheck::Unknown
        );
    }

    /// A line hashed by OpenSSH's own `ssh-keygen -H` (host `github.com`, a real ed25519 key).
    #[test]
    fn hashed_entry_from_openssh() {
        let kh = KnownHosts::parse(
            "|1|EFbgEfKb7uvt5TLIXZgUjz7Zyoc=|7ojk1jOgHVQtZuPip0jrQJSjHNg= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFnoIpkcAjK+w6jtsdVWjntb5gYIEHYDHTL45ETNtDsh",
        )
        .unwrap();
        let key = B64
            .decode("AAAAC3NzaC1lZDI1NTE5AAAAIFnoIpkcAjK+w6jtsdVWjntb5gYIEHYDHTL45ETNtDsh")
            .unwrap();
        assert_eq!(kh.check("github.com", 22, ED, &key), HostKeyCheck::Match);
        assert_eq!(kh.check("gitlab.com", 22, ED, &key), HostKeyCheck::Unknown);
    }

    #[test]
    fn refusals() {
        let ok = line("h", ED, 1);
        assert_eq!(KnownHosts::parse("").unwrap_err(), KnownHostsError::Empty);
        assert_eq!(
            KnownHosts::parse("# only a comment\n\n").unwrap_err(),
            KnownHostsError::Empty
        );
        assert!(
            KnownHosts::parse("")
                .unwrap_err()
                .to_string()
                .contains("no trust on first use")
        );
        assert!(matches!(
            KnownHosts::parse(&format!("{ok}\n@cert-authority {ok}")),
            Err(KnownHostsError::Marker { line: 2, .. })
        ));
        assert!(matches!(
            KnownHosts::parse(&format!("@revoked {ok}")),
            Err(KnownHostsError::Marker { line: 1, .. })
        ));
        for pat in ["*.example.com", "h?", "!h,g"] {
            assert!(
                matches!(
                    KnownHosts::parse(&line(pat, ED, 1)),
                    Err(KnownHostsError::Pattern { .. })
                ),
                "{pat}"
            );
        }
        assert!(matches!(
            KnownHosts::parse("h ssh-ed25519"),
            Err(KnownHostsError::Malformed { .. })
        ));
        assert!(matches!(
            KnownHosts::parse("h ssh-ed25519 !!notbase64"),
            Err(KnownHostsError::BadBase64 { .. })
        ));
        assert!(matches!(
            KnownHosts::parse(&format!("h {RSA} {}", B64.encode(blob(ED, 1)))),
            Err(KnownHostsError::TypeMismatch { .. })
        ));
        assert!(matches!(
            KnownHosts::parse(&format!("|1|xx {ED} {}", B64.encode(blob(ED, 1)))),
            Err(KnownHostsError::BadHash { .. })
        ));
        assert!(matches!(
            KnownHosts::parse(&format!("|1|AAAA|AAAA {ED} {}", B64.encode(blob(ED, 1)))),
            Err(KnownHostsError::BadHash { .. })
        ));
    }
}
