//! Realising a store path by substitution only: which caches, which keys, the Nix settings
//! that say so, and what a refusal means in words.
//!
//! A node with a builder never evaluates its flake: it realises exactly the store path the
//! builder built, from binary caches, with `require-sigs = true` and only the public keys the
//! agent was configured with. Every setting goes to Nix as `--option NAME VALUE` (URLs and
//! public keys only; nothing secret reaches the command line).

use super::{NixError, bounded_tail, mask_credentials, trim_nix_error};

/// Where a store path may come from and whose signatures make it acceptable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Substitution {
    /// Binary cache URLs, tried in order (`http://…`, `https://…`, `file://…`, `s3://…`).
    pub substituters: Vec<String>,
    /// Public keys in Nix's `name:base64` form. A closure must carry a signature by one of
    /// them; with none configured nothing is fetched.
    pub trusted_public_keys: Vec<String>,
}

impl Substitution {
    /// The same, with `cache` (the builder's) tried first.
    pub fn with_cache_first(&self, cache: Option<&str>) -> Substitution {
        let mut s = self.clone();
        if let Some(c) = cache.filter(|c| !c.is_empty())
            && !s.substituters.iter().any(|x| x == c)
        {
            s.substituters.insert(0, c.to_string());
        }
        s
    }

    /// Refuse before running Nix: `path` must be a store path, there must be a cache and a
    /// key, and no value may hold whitespace (Nix splits these settings on it) or start with
    /// `-` (it would read as a flag).
    pub fn check(&self, path: &str) -> Result<(), NixError> {
        let refuse = |reason: String| NixError::Refused {
            path: path.to_string(),
            reason: format!("{reason}; nothing changed on the node"),
        };
        if !is_store_path(path) {
            return Err(refuse(
                "not a store path (/…/store/<32-character hash>-<name>)".into(),
            ));
        }
        if self.trusted_public_keys.is_empty() {
            return Err(refuse(
                "no trusted public key is configured (agent --trusted-public-key); nothing is fetched unsigned".into(),
            ));
        }
        if self.substituters.is_empty() {
            return Err(refuse(
                "no binary cache is configured (agent --substituter)".into(),
            ));
        }
        for v in self.substituters.iter().chain(&self.trusted_public_keys) {
            if v.is_empty() || v.starts_with('-') || v.chars().any(char::is_whitespace) {
                return Err(refuse(format!(
                    "invalid cache URL or key {:?}",
                    mask_credentials(v)
                )));
            }
        }
        for k in &self.trusted_public_keys {
            if !k.contains(':') {
                return Err(refuse(format!(
                    "public key {k:?} is not in Nix's name:base64 form"
                )));
            }
        }
        Ok(())
    }

    /// The `--option` arguments: exactly these caches and keys, signatures required, no
    /// remote builders, no local build, and no remembered lookups: a node that asked before
    /// the builder finished sees the path as soon as it is there, and what a cache serves
    /// now (re-signed after a key rotation, or taken away) is what counts.
    pub fn options(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut opt = |name: &str, value: String| {
            args.push("--option".to_string());
            args.push(name.to_string());
            args.push(value);
        };
        opt("substituters", self.substituters.join(" "));
        opt("trusted-public-keys", self.trusted_public_keys.join(" "));
        opt("require-sigs", "true".into());
        opt("narinfo-cache-negative-ttl", "0".into());
        opt("narinfo-cache-positive-ttl", "0".into());
        opt("builders", String::new());
        opt("max-jobs", "0".into());
        args
    }

    fn key_names(&self) -> String {
        self.trusted_public_keys
            .iter()
            .map(|k| key_name(k))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The name part of a `name:base64` key.
pub fn key_name(key: &str) -> &str {
    key.split(':').next().unwrap_or(key)
}

/// `/…/store/<32 nix-base32 characters>-<name>`: an absolute path whose last component is a
/// store path name, with nothing after it.
pub fn is_store_path(path: &str) -> bool {
    let Some((dir, base)) = path.rsplit_once('/') else {
        return false;
    };
    let name_ok = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    path.starts_with('/')
        && dir.ends_with("/store")
        && !dir.contains("//")
        && !dir.split('/').any(|c| c == "..")
        && base.len() > 33
        && base.as_bytes().get(32) == Some(&b'-')
        && base[..32]
            .chars()
            .all(|c| c.is_ascii_digit() || (c.is_ascii_lowercase() && !"eotu".contains(c)))
        && base[33..].chars().all(name_ok)
}

/// What a failed substitution means, from Nix's stderr: an unsigned or wrongly signed
/// closure (a tampered `.narinfo` breaks its signature), contents that do not match the signed
/// hash (a tampered NAR), or a path no cache has. Nix reports the first two as warnings
/// before its generic "no substituter can build it", which [`trim_nix_error`] would drop.
pub fn substitution_failure(path: &str, from: &Substitution, stderr: &str) -> NixError {
    let refused = |reason: String| NixError::Refused {
        path: path.to_string(),
        reason: bounded_tail(&reason, super::ERROR_MAX_CHARS),
    };
    let unsigned: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("is not signed by any of the keys"))
        .collect();
    if let Some(line) = unsigned.last() {
        let what = line.trim().trim_start_matches("warning: ");
        return refused(format!(
            "not signed by a trusted key ({}): unsigned, wrongly signed or tampered ({}); nothing changed on the node",
            from.key_names(),
            mask_credentials(what)
        ));
    }
    if stderr.contains("hash mismatch importing path") {
        return refused(format!(
            "its contents do not match the signed hash (a tampered or corrupt NAR): {}; nothing changed on the node",
            trim_nix_error(stderr)
        ));
    }
    if stderr.contains("there is no substituter that can build it") {
        let unreachable: Vec<String> = stderr
            .lines()
            .filter(|l| l.contains("unable to download") || l.contains("Couldn't connect"))
            .map(|l| mask_credentials(l.trim().trim_start_matches("warning: ")))
            .collect();
        let detail = match unreachable.last() {
            Some(l) => format!(" ({l})"),
            None => String::new(),
        };
        return refused(format!(
            "no configured cache has it ({}){detail}: has the builder finished? nothing changed on the node",
            mask_credentials(&from.substituters.join(" "))
        ));
    }
    let mut message = trim_nix_error(stderr);
    if message.is_empty() {
        message = "nix exited with an error and printed nothing".into();
    }
    refused(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const P: &str = "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-nixos-system-n1-24.05";

    fn subst() -> Substitution {
        Substitution {
            substituters: vec!["http://10.0.0.1:8080".into()],
            trusted_public_keys: vec!["builder-1:z1chbrWP+58+OnRsFrYGOfhic+aKbs/Qv5tU6nAIyJg=".into()],
        }
    }

    #[test]
    fn store_paths_are_recognised() {
        assert!(is_store_path(P));
        assert!(is_store_path(
            "/tmp/x/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep"
        ));
        for bad in [
            "nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep",
            "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q",
            "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep/bin",
            "/nix/store/SNWK4inds1ls7q83128vqfxsjigdbl0q-dep",
            "/nix/store/enwk4inds1ls7q83128vqfxsjigdbl0q-dep",
            "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-a b",
            "/nix/../store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep",
            "/etc/snwk4inds1ls7q83128vqfxsjigdbl0q-dep",
            "--store=x",
        ] {
            assert!(!is_store_path(bad), "{bad}");
        }
    }

    #[test]
    fn nothing_is_fetched_without_a_key_a_cache_or_a_store_path() {
        assert!(subst().check(P).is_ok());
        let no_key = Substitution {
            trusted_public_keys: vec![],
            ..subst()
        };
        let e = no_key.check(P).unwrap_err().report();
        assert!(e.contains("no trusted public key"), "{e}");
        let no_cache = Substitution {
            substituters: vec![],
            ..subst()
        };
        assert!(
            no_cache
                .check(P)
                .unwrap_err()
                .report()
                .contains("no binary cache")
        );
        let flag = Substitution {
            substituters: vec!["--option".into()],
            ..subst()
        };
        assert!(flag.check(P).is_err());
        let space = Substitution {
            trusted_public_keys: vec!["a:b c:d".into()],
            ..subst()
        };
        assert!(space.check(P).is_err());
        assert!(
            subst()
                .check("/etc/passwd")
                .unwrap_err()
                .report()
                .contains("not a store path")
        );
    }

    #[test]
    fn options_require_signatures_and_name_exactly_the_caches_and_keys() {
        let s = subst().with_cache_first(Some("http://builder:5000"));
        let o = s.options();
        let pairs: Vec<(&str, &str)> = o
            .chunks(3)
            .map(|c| {
                assert_eq!(c[0], "--option");
                (c[1].as_str(), c[2].as_str())
            })
            .collect();
        assert!(pairs.contains(&("require-sigs", "true")));
        assert!(pairs.contains(&("substituters", "http://builder:5000 http://10.0.0.1:8080")));
        assert!(pairs.contains(&("trusted-public-keys", subst().trusted_public_keys[0].as_str())));
        assert!(pairs.contains(&("narinfo-cache-negative-ttl", "0")));
        assert!(pairs.contains(&("max-jobs", "0")));
        // the builder's cache is not added twice
        assert_eq!(s.with_cache_first(Some("http://builder:5000")), s);
    }

    #[test]
    fn failures_say_what_was_refused() {
        let unsigned = "warning: the substitute for '/nix/store/x-dep' from 'http://u:pw@c:1' is not signed by any of the keys in 'trusted-public-keys'\nerror: path '/nix/store/x-dep' is required, but there is no substituter that can build it\n";
        let m = substitution_failure(P, &subst(), unsigned).report();
        assert!(m.contains("not signed by a trusted key (builder-1)"), "{m}");
        assert!(m.contains("nothing changed on the node"), "{m}");
        assert!(!m.contains("pw@"), "{m}");
        let nar = "copying path '/nix/store/x-dep' from 'http://c'...\nerror: hash mismatch importing path '/nix/store/x-dep';\n  specified: sha256:1\n  got:       sha256:2\nerror: path '/nix/store/x-dep' is required, but there is no substituter that can build it\n";
        let m = substitution_failure(P, &subst(), nar).report();
        assert!(m.contains("do not match the signed hash"), "{m}");
        let missing =
            "error: path '/nix/store/x' is required, but there is no substituter that can build it\n";
        let m = substitution_failure(P, &subst(), missing).report();
        assert!(
            m.contains("no configured cache has it (http://10.0.0.1:8080)"),
            "{m}"
        );
        assert!(m.starts_with(&format!("refused to fetch {P}")), "{m}");
    }
}
