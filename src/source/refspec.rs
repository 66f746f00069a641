//! Which ref a FlakeSource follows, and its resolution against the refs a remote advertises.
//!
//! Matching is exact: branch `main` is `refs/heads/main` and nothing else (never
//! `refs/heads/main-old`, never a tag called `main`). For tags, the peeled entry
//! `refs/tags/X^{}` (the commit an annotated tag points at) wins over the tag object's id.

use super::revision::{CommitId, Revision};

/// The `ref` field of a FlakeSource: exactly one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefChoice {
    /// A branch name, e.g. `main` or `release/2026`.
    Branch(String),
    /// A tag name, e.g. `v1.2.0`.
    Tag(String),
    /// A semver range over the tags, e.g. `>=1.0, <2` (a leading `v` on tags is ignored);
    /// the highest matching tag wins.
    Semver(String),
    /// A full ref name, e.g. `refs/pull/420/head`.
    Name(String),
}

/// One ref as listed by the remote (`git ls-remote`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedRef {
    pub name: String,
    /// Hex object id.
    pub oid: String,
}

/// What a [`RefChoice`] resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRef {
    /// The full ref that matched, e.g. `refs/heads/main` or `refs/tags/v1.2.0`.
    pub full_name: String,
    pub revision: Revision,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("ref name {name:?} is invalid: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("semver range {range:?} is invalid: {message}")]
    InvalidSemver { range: String, message: String },
    #[error("{what} {name:?} not found on the remote")]
    NotFound { what: &'static str, name: String },
    #[error("no tag on the remote matches semver range {range:?}")]
    NoSemverMatch { range: String },
    #[error("remote advertised ref {name:?} with an id that is not a sha1 commit")]
    BadOid { name: String },
}

impl RefChoice {
    /// Checks the name's syntax (a subset of `git check-ref-format`), before any network call.
    pub fn validate(&self) -> Result<(), RefError> {
        match self {
            RefChoice::Branch(n) | RefChoice::Tag(n) => {
                check_name(n)?;
                if n.starts_with("refs/") {
                    return Err(RefError::InvalidName {
                        name: n.clone(),
                        why: "give the short name (use `name` for a full ref)",
                    });
                }
                Ok(())
            }
            RefChoice::Name(n) => {
                check_name(n)?;
                if !n.starts_with("refs/") {
                    return Err(RefError::InvalidName {
                        name: n.clone(),
                        why: "a full ref name starts with refs/",
                    });
                }
                Ok(())
            }
            RefChoice::Semver(r) => {
                semver::VersionReq::parse(r)
                    .map(|_| ())
                    .map_err(|e| RefError::InvalidSemver {
                        range: r.clone(),
                        message: e.to_string(),
                    })
            }
        }
    }

    /// Resolves the choice against the remote's advertised refs.
    pub fn resolve(&self, refs: &[AdvertisedRef]) -> Result<ResolvedRef, RefError> {
        self.validate()?;
        match self {
            RefChoice::Branch(b) => {
                let full = format!("refs/heads/{b}");
                let oid = find(refs, &full).ok_or_else(|| RefError::NotFound {
                    what: "branch",
                    name: b.clone(),
                })?;
                resolved(full, b.clone(), oid)
            }
            RefChoice::Tag(t) => resolve_tag(refs, t).ok_or_else(|| RefError::NotFound {
                what: "tag",
                name: t.clone(),
            })?,
            RefChoice::Semver(range) => {
                let req = semver::VersionReq::parse(range).map_err(|e| RefError::InvalidSemver {
                    range: range.clone(),
                    message: e.to_string(),
                })?;
                let best = refs
                    .iter()
                    .filter_map(|r| r.name.strip_prefix("refs/tags/"))
                    .filter(|t| !t.ends_with("^{}"))
                    .filter_map(|t| {
                        let v = semver::Version::parse(t.strip_prefix('v').unwrap_or(t)).ok()?;
                        req.matches(&v).then_some((v, t))
                    })
                    // Highest version; on equal versions (`1.0.0` and `v1.0.0`) the name
                    // decides, so the choice never depends on the server's order.
                    .max_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                let (_, tag) = best.ok_or_else(|| RefError::NoSemverMatch { range: range.clone() })?;
                resolve_tag(refs, tag).ok_or_else(|| RefError::NotFound {
                    what: "tag",
                    name: tag.to_owned(),
                })?
            }
            RefChoice::Name(n) => {
                let oid = find(refs, &format!("{n}^{{}}"))
                    .or_else(|| find(refs, n))
                    .ok_or_else(|| RefError::NotFound {
                        what: "ref",
                        name: n.clone(),
                    })?;
                resolved(n.clone(), n.clone(), oid)
            }
        }
    }
}

fn find<'a>(refs: &'a [AdvertisedRef], name: &str) -> Option<&'a str> {
    refs.iter().find(|r| r.name == name).map(|r| r.oid.as_str())
}

fn resolve_tag(refs: &[AdvertisedRef], tag: &str) -> Option<Result<ResolvedRef, RefError>> {
    let full = format!("refs/tags/{tag}");
    let oid = find(refs, &format!("{full}^{{}}")).or_else(|| find(refs, &full))?;
    Some(resolved(full, tag.to_owned(), oid))
}

fn resolved(full_name: String, pointer: String, oid: &str) -> Result<ResolvedRef, RefError> {
    let commit = CommitId::parse(oid).map_err(|_| RefError::BadOid {
        name: full_name.clone(),
    })?;
    Ok(ResolvedRef {
        full_name,
        revision: Revision {
            pointer: Some(pointer),
            commit,
        },
    })
}

fn check_name(n: &str) -> Result<(), RefError> {
    let bad = |why| {
        Err(RefError::InvalidName {
            name: n.chars().take(100).collect(),
            why,
        })
    };
    if n.is_empty() {
        return bad("empty");
    }
    if n.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if n.chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return bad("contains a space, control character or one of ~ ^ : ? * [ \\");
    }
    if n.contains("..") || n.contains("@{") || n.contains("//") {
        return bad("contains `..`, `@{` or `//`");
    }
    if n.starts_with(['/', '-', '.']) || n.ends_with(['/', '.']) || n.ends_with(".lock") {
        return bad("starts with / - . or ends with / . .lock");
    }
    if n.split('/').any(|c| c.starts_with('.')) {
        return bad("a component starts with a dot");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn sha(c: char) -> String {
        std::iter::repeat_n(c, 40).collect()
    }

    fn remote() -> Vec<AdvertisedRef> {
        [
            ("HEAD", 'a'),
            ("refs/heads/main-old", '1'),
            ("refs/heads/main", 'a'),
            ("refs/heads/feature/main", '2'),
            ("refs/heads/release/2026", '3'),
            ("refs/tags/main", '4'),
            ("refs/tags/v1.0.0", '5'),
            ("refs/tags/v1.2.0", 'b'),
            ("refs/tags/v1.2.0^{}", 'c'),
            ("refs/tags/1.10.0", 'd'),
            ("refs/tags/v2.0.0-rc.1", 'e'),
            ("refs/tags/not-a-version", 'f'),
            ("refs/pull/420/head", '6'),
        ]
        .into_iter()
        .map(|(n, c)| AdvertisedRef {
            name: n.to_owned(),
            oid: sha(c),
        })
        .collect()
    }

    fn res(c: RefChoice) -> ResolvedRef {
        c.resolve(&remote()).unwrap()
    }

    #[test]
    fn branch_is_exact() {
        let r = res(RefChoice::Branch("main".into()));
        assert_eq!(r.full_name, "refs/heads/main");
        assert_eq!(r.revision.commit.as_str(), sha('a'));
        assert_eq!(r.revision.to_string(), format!("main@sha1:{}", sha('a')));
        let r = res(RefChoice::Branch("release/2026".into()));
        assert_eq!(r.revision.commit.as_str(), sha('3'));
        // `mai` is not a prefix match of main or main-old, and `old` is no suffix match.
        for b in ["mai", "old", "main-", "heads/main"] {
            assert_eq!(
                RefChoice::Branch(b.into()).resolve(&remote()),
                Err(RefError::NotFound {
                    what: "branch",
                    name: b.into()
                }),
                "{b}"
            );
        }
        // Only main-old exists: `main` must not match it.
        let only_old = vec![AdvertisedRef {
            name: "refs/heads/main-old".into(),
            oid: sha('1'),
        }];
        assert!(RefChoice::Branch("main".into()).resolve(&only_old).is_err());
    }

    #[test]
    fn tags_prefer_the_peeled_commit() {
        // Annotated: the tag object is b, the commit it points at is c.
        let r = res(RefChoice::Tag("v1.2.0".into()));
        assert_eq!(r.full_name, "refs/tags/v1.2.0");
        assert_eq!(r.revision.commit.as_str(), sha('c'));
        // Lightweight.
        assert_eq!(
            res(RefChoice::Tag("v1.0.0".into())).revision.commit.as_str(),
            sha('5')
        );
        // A tag named like a branch is the tag, and the branch is the branch.
        assert_eq!(
            res(RefChoice::Tag("main".into())).revision.commit.as_str(),
            sha('4')
        );
        assert!(RefChoice::Tag("v1.2".into()).resolve(&remote()).is_err());
    }

    #[test]
    fn semver_picks_the_highest_match() {
        let pick = |r: &str| res(RefChoice::Semver(r.into()));
        let r = pick(">=1.0.0");
        assert_eq!(r.full_name, "refs/tags/1.10.0");
        assert_eq!(r.revision.commit.as_str(), sha('d'));
        // Peeled for an annotated tag.
        let r = pick("~1.2");
        assert_eq!(r.full_name, "refs/tags/v1.2.0");
        assert_eq!(r.revision.commit.as_str(), sha('c'));
        assert_eq!(r.revision.pointer.as_deref(), Some("v1.2.0"));
        assert_eq!(pick("<1.2").full_name, "refs/tags/v1.0.0");
        // Pre-releases only when the range asks for them.
        assert_eq!(pick(">=2.0.0-rc.0").full_name, "refs/tags/v2.0.0-rc.1");
        assert_eq!(
            RefChoice::Semver(">=2".into()).resolve(&remote()),
            Err(RefError::NoSemverMatch { range: ">=2".into() })
        );
        assert!(matches!(
            RefChoice::Semver("not a range".into()).resolve(&remote()),
            Err(RefError::InvalidSemver { .. })
        ));
    }

    #[test]
    fn semver_ties_do_not_depend_on_order() {
        let mut refs = vec![
            AdvertisedRef {
                name: "refs/tags/v1.0.0".into(),
                oid: sha('1'),
            },
            AdvertisedRef {
                name: "refs/tags/1.0.0".into(),
                oid: sha('2'),
            },
        ];
        let a = RefChoice::Semver("1".into()).resolve(&refs).unwrap();
        refs.reverse();
        let b = RefChoice::Semver("1".into()).resolve(&refs).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn name_is_a_full_ref() {
        let r = res(RefChoice::Name("refs/pull/420/head".into()));
        assert_eq!(r.revision.commit.as_str(), sha('6'));
        assert_eq!(
            r.revision.to_string(),
            format!("refs/pull/420/head@sha1:{}", sha('6'))
        );
        assert_eq!(
            res(RefChoice::Name("refs/tags/v1.2.0".into()))
                .revision
                .commit
                .as_str(),
            sha('c')
        );
        assert!(
            RefChoice::Name("refs/pull/42/head".into())
                .resolve(&remote())
                .is_err()
        );
        assert!(matches!(
            RefChoice::Name("pull/420/head".into()).validate(),
            Err(RefError::InvalidName { .. })
        ));
    }

    #[test]
    fn invalid_names() {
        for n in [
            "", "a b", "a..b", "a~1", "a^", "a:b", "a*", "-x", ".x", "x/", "x.lock", "a//b", "a/.b", "x@{1}",
        ] {
            assert!(
                matches!(
                    RefChoice::Branch(n.into()).validate(),
                    Err(RefError::InvalidName { .. })
                ),
                "{n:?}"
            );
        }
        assert!(RefChoice::Branch("refs/heads/main".into()).validate().is_err());
        assert!(RefChoice::Branch("feature/x-1.2".into()).validate().is_ok());
    }

    #[test]
    fn bad_remote_oid() {
        let refs = vec![AdvertisedRef {
            name: "refs/heads/main".into(),
            oid: "abc".into(),
        }];
        assert_eq!(
            RefChoice::Branch("main".into()).resolve(&refs),
            Err(RefError::BadOid {
                name: "refs/heads/main".into()
            })
        );
    }
}
