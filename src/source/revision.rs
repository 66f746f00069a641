//! Git revisions as Flux writes them, parsed into a commit id plus the ref that named it.
//!
//! Flux has used `main/<sha>`, `<sha>` (before flux2 v0.40) and `main@sha1:<sha>`,
//! `sha1:<sha>` (since). The pointer part may itself contain `/` and `@`, so the digest is
//! taken after the last `@` (Flux RFC-0005). `sha256:` digests name OCI or SHA-256 git objects,
//! which cannot be a commit of a SHA-1 repository here: they are refused, never truncated.

use std::fmt;

/// A 40-hex SHA-1 commit id, stored lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(String);

impl CommitId {
    /// Parses 40 hex digits (either case; stored lowercase).
    pub fn parse(hex: &str) -> Result<Self, RevisionError> {
        if hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(hex.to_ascii_lowercase()))
        } else {
            Err(RevisionError::NotASha1 { found: shorten(hex) })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A resolved revision: the commit and, when known, the branch or tag that pointed at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// Short ref name such as `main`, `feature/x` or `v1.0`; `None` for a bare commit.
    pub pointer: Option<String>,
    pub commit: CommitId,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevisionError {
    #[error("revision is empty")]
    Empty,
    #[error(
        "revision uses a sha256 digest, which cannot name a git commit here (only sha1 commits are supported)"
    )]
    Sha256Unsupported,
    #[error("revision digest algorithm {algo:?} is not supported (expected sha1)")]
    UnknownAlgorithm { algo: String },
    #[error("{found:?} is not a 40-hex-digit sha1 commit id")]
    NotASha1 { found: String },
}

impl Revision {
    /// Parses every form Flux has used: `main@sha1:<sha>`, `feature/x@sha1:<sha>`,
    /// `sha1:<sha>`, `main/<sha>`, `feature/x/<sha>` and a bare `<sha>`.
    pub fn parse(input: &str) -> Result<Self, RevisionError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(RevisionError::Empty);
        }
        // New form: [<pointer>@]<algo>:<digest>, digest after the last '@'.
        let (pointer, digest) = match s.rfind('@') {
            Some(at) => (Some(&s[..at]), &s[at + 1..]),
            None => (None, s),
        };
        if let Some((algo, hex)) = digest.split_once(':') {
            return match algo {
                "sha1" => Ok(Self {
                    pointer: pointer.filter(|p| !p.is_empty()).map(str::to_owned),
                    commit: CommitId::parse(hex)?,
                }),
                "sha256" => Err(RevisionError::Sha256Unsupported),
                other => Err(RevisionError::UnknownAlgorithm { algo: shorten(other) }),
            };
        }
        if pointer.is_some() {
            // `main@<sha>` without an algorithm is no form Flux ever wrote.
            return Err(RevisionError::NotASha1 {
                found: shorten(digest),
            });
        }
        // Legacy form: [<pointer>/]<sha>, sha after the last '/'.
        match s.rsplit_once('/') {
            Some((p, hex)) => Ok(Self {
                pointer: (!p.is_empty()).then(|| p.to_owned()),
                commit: CommitId::parse(hex)?,
            }),
            None => Ok(Self {
                pointer: None,
                commit: CommitId::parse(s)?,
            }),
        }
    }

    /// The Flux (v0.40+) form: `main@sha1:<sha>`, or `sha1:<sha>` without a pointer.
    pub fn flux_display(&self) -> String {
        match &self.pointer {
            Some(p) => format!("{p}@sha1:{}", self.commit),
            None => format!("sha1:{}", self.commit),
        }
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.flux_display())
    }
}

/// Caps echoed input so an error message stays short.
fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn p(s: &str) -> Revision {
        Revision::parse(s).unwrap()
    }

    #[test]
    fn every_flux_form() {
        let with = |ptr: &str| Revision {
            pointer: Some(ptr.to_owned()),
            commit: CommitId::parse(SHA).unwrap(),
        };
        let bare = Revision {
            pointer: None,
            commit: CommitId::parse(SHA).unwrap(),
        };
        assert_eq!(p(&format!("main@sha1:{SHA}")), with("main"));
        assert_eq!(p(&format!("feature/branch@sha1:{SHA}")), with("feature/branch"));
        assert_eq!(p(&format!("sha1:{SHA}")), bare);
        assert_eq!(p(&format!("main/{SHA}")), with("main"));
        assert_eq!(p(&format!("feature/branch/{SHA}")), with("feature/branch"));
        assert_eq!(p(SHA), bare);
        // A pointer containing '@' takes the digest after the last '@'.
        assert_eq!(p(&format!("we@ird@sha1:{SHA}")), with("we@ird"));
        // Tags look like branches.
        assert_eq!(p(&format!("v1.0/{SHA}")), with("v1.0"));
    }

    #[test]
    fn uppercase_is_normalised_and_whitespace_trimmed() {
        let r = p(&format!("  main@sha1:{}\n", SHA.to_uppercase()));
        assert_eq!(r.commit.as_str(), SHA);
    }

    #[test]
    fn flux_display_round_trips() {
        for s in [format!("main@sha1:{SHA}"), format!("sha1:{SHA}")] {
            assert_eq!(p(&s).flux_display(), s);
            assert_eq!(p(&p(&s).to_string()), p(&s));
        }
        assert_eq!(p(&format!("main/{SHA}")).to_string(), format!("main@sha1:{SHA}"));
        assert_eq!(p(SHA).to_string(), format!("sha1:{SHA}"));
    }

    #[test]
    fn sha256_is_refused_not_truncated() {
        let d = "a".repeat(64);
        for s in [format!("main@sha256:{d}"), format!("sha256:{d}")] {
            let e = Revision::parse(&s).unwrap_err();
            assert_eq!(e, RevisionError::Sha256Unsupported);
            assert!(e.to_string().contains("sha256"), "{e}");
        }
        // A 64-hex legacy digest is not silently cut to 40.
        assert!(matches!(
            Revision::parse(&format!("main/{d}")),
            Err(RevisionError::NotASha1 { .. })
        ));
    }

    #[test]
    fn malformed_inputs() {
        assert_eq!(Revision::parse("").unwrap_err(), RevisionError::Empty);
        assert_eq!(Revision::parse("  ").unwrap_err(), RevisionError::Empty);
        assert!(matches!(
            Revision::parse(&format!("main@md5:{SHA}")),
            Err(RevisionError::UnknownAlgorithm { .. })
        ));
        for bad in [
            "main",
            &SHA[..39],
            &format!("{SHA}0"),
            &format!("main@{SHA}"),
            &format!("main@sha1:{}", &SHA[..12]),
            &format!("main/{}g", &SHA[..39]),
            "sha1:",
        ] {
            assert!(
                matches!(Revision::parse(bad), Err(RevisionError::NotASha1 { .. })),
                "{bad}"
            );
        }
    }
}
