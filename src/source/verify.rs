//! Signed commits and tags (`FlakeSource.spec.verify`): the trusted keys of a Secret and the
//! in-process check of a git signature against them. No `gpg` or `ssh-keygen` runs: OpenPGP
//! signatures are checked with rPGP (`pgp`), SSH signatures (git's `gpg.format=ssh`, SSHSIG
//! with namespace `git`) with RustCrypto's `ssh-key`.
//!
//! PURE apart from the clock, which the caller passes in (`now`). The git side (which bytes a
//! commit or tag signed, extracted with git2) is in [`super::resolve`].
//!
//! Trust model (docs/source.md, "Signed commits"): a signature counts when it verifies against
//! a key of the Secret and that key is usable *now*: an OpenPGP key (or its signing subkey) that
//! is neither revoked nor expired, whose self-signatures verify; an SSH key listed in the
//! allowed signers with namespace `git` (or no namespace restriction), inside its
//! `valid-after`/`valid-before` window, and not listed under `revoked_signers`.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::packet::{Signature, SignatureType};
use pgp::types::KeyDetails;

/// The SSHSIG namespace git signs with.
pub const SSH_NAMESPACE: &str = "git";
/// The Secret key whose lines are SSH public keys that are refused even when allowed.
pub const REVOKED_SIGNERS_KEY: &str = "revoked_signers";

/// Why a commit or tag does not count as signed. Messages name the signer's key (fingerprint)
/// and never print the signature or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("it is not signed")]
    Unsigned,
    #[error("its signature is {0}, which nixroll does not check (OpenPGP and SSH only)")]
    UnsupportedFormat(&'static str),
    #[error("its signature cannot be read: {0}")]
    Malformed(String),
    #[error("it is signed by {0}, which is not among the trusted keys")]
    UnknownSigner(String),
    #[error("its signature by {0} does not match its content")]
    BadSignature(String),
    #[error("it is signed by {signer}, which expired at {at}")]
    Expired { signer: String, at: Timestamp },
    #[error("it is signed by {signer}, which is not valid before {at}")]
    NotYetValid { signer: String, at: Timestamp },
    #[error("it is signed by {0}, which is revoked")]
    Revoked(String),
    #[error("it is signed by {signer} for namespace {namespace:?}, not {expected:?}")]
    WrongNamespace {
        signer: String,
        namespace: String,
        expected: &'static str,
    },
    #[error("{0}")]
    NotATag(String),
}

/// Who signed, for status and Events: `OpenPGP key <fingerprint> (<user id>)` or
/// `SSH key SHA256:… (<principals>)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer(pub String);

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of an SSH allowed-signers file (`ssh-keygen(1)`, ALLOWED SIGNERS).
#[derive(Debug, Clone)]
struct AllowedSigner {
    principals: String,
    namespaces: Option<Vec<String>>,
    valid_after: Option<Timestamp>,
    valid_before: Option<Timestamp>,
    key: ssh_key::PublicKey,
}

/// An OpenPGP certificate and the Secret key it came from.
#[derive(Debug, Clone)]
struct PgpCert {
    cert: SignedPublicKey,
}

/// The trusted keys of a FlakeSource (`spec.verify.secretRef`).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    pgp: Vec<PgpCert>,
    ssh: Vec<AllowedSigner>,
    revoked_ssh: Vec<ssh_key::PublicKey>,
}

impl TrustedKeys {
    /// Reads every value of the Secret: a value holding `-----BEGIN PGP PUBLIC KEY BLOCK-----`
    /// is one or more armored OpenPGP certificates; `revoked_signers` holds SSH public keys
    /// (one a line) that are refused; any other value is SSH allowed-signers lines. Errors name
    /// the Secret key and line, never a value.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, String> {
        let mut keys = TrustedKeys::default();
        for (name, value) in data {
            let text = std::str::from_utf8(value).map_err(|_| format!("key {name} is not UTF-8"))?;
            if name == REVOKED_SIGNERS_KEY {
                for (n, line) in lines(text) {
                    let key = parse_ssh_public_key(line).map_err(|e| format!("key {name} line {n}: {e}"))?;
                    keys.revoked_ssh.push(key);
                }
            } else if text.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----") {
                let (certs, _) = SignedPublicKey::from_armor_many(text.as_bytes())
                    .map_err(|e| format!("key {name}: not an OpenPGP public key: {e}"))?;
                let before = keys.pgp.len();
                for cert in certs {
                    let cert = cert.map_err(|e| format!("key {name}: not an OpenPGP public key: {e}"))?;
                    keys.pgp.push(PgpCert { cert });
                }
                if keys.pgp.len() == before {
                    return Err(format!("key {name}: no OpenPGP public key in it"));
                }
            } else if text.contains("PRIVATE KEY") {
                return Err(format!(
                    "key {name} holds a private key: put public keys only in the trusted keys"
                ));
            } else {
                for (n, line) in lines(text) {
                    let signer =
                        parse_allowed_signer(line).map_err(|e| format!("key {name} line {n}: {e}"))?;
                    keys.ssh.push(signer);
                }
            }
        }
        if keys.pgp.is_empty() && keys.ssh.is_empty() {
            return Err("holds no OpenPGP public key and no SSH allowed-signers line".into());
        }
        Ok(keys)
    }

    /// How many keys are trusted (OpenPGP certificates, SSH allowed signers).
    pub fn counts(&self) -> (usize, usize) {
        (self.pgp.len(), self.ssh.len())
    }

    /// Checks `signature` (the armored text git stores) over `signed` (the object without its
    /// signature). `now` decides expiry.
    pub fn verify(&self, signature: &[u8], signed: &[u8], now: Timestamp) -> Result<Signer, VerifyError> {
        let text = std::str::from_utf8(signature)
            .map_err(|_| VerifyError::Malformed("the signature is not text".into()))?;
        let start = text.trim_start();
        if start.starts_with("-----BEGIN PGP SIGNATURE-----") {
            self.verify_pgp(start, signed, now)
        } else if start.starts_with("-----BEGIN SSH SIGNATURE-----") {
            self.verify_ssh(start, signed, now)
        } else if start.starts_with("-----BEGIN SIGNED MESSAGE-----") {
            Err(VerifyError::UnsupportedFormat("X.509 (gpgsm)"))
        } else if start.is_empty() {
            Err(VerifyError::Unsigned)
        } else {
            Err(VerifyError::UnsupportedFormat("of an unknown kind"))
        }
    }

    fn verify_pgp(&self, armored: &str, signed: &[u8], now: Timestamp) -> Result<Signer, VerifyError> {
        let (sig, _) = DetachedSignature::from_armor_single(armored.as_bytes())
            .map_err(|e| VerifyError::Malformed(format!("OpenPGP: {e}")))?;
        let sig = sig.signature;
        let issuer = issuer_display(&sig);
        for PgpCert { cert } in &self.pgp {
            let primary = &cert.primary_key;
            let name = pgp_name(cert);
            // The primary key, then each subkey: the one the signature names.
            if issues(&sig, primary) {
                let signer = format!("OpenPGP key {:X}{name}", primary.fingerprint());
                sig.verify(primary, signed)
                    .map_err(|_| VerifyError::BadSignature(signer.clone()))?;
                check_primary(cert, &signer, &sig, now)?;
                return Ok(Signer(signer));
            }
            for sub in &cert.public_subkeys {
                if !issues(&sig, &sub.key) {
                    continue;
                }
                let signer = format!(
                    "OpenPGP key {:X} (subkey {:X}){name}",
                    primary.fingerprint(),
                    sub.key.fingerprint()
                );
                sig.verify(&sub.key, signed)
                    .map_err(|_| VerifyError::BadSignature(signer.clone()))?;
                check_primary(cert, &signer, &sig, now)?;
                check_subkey(cert, sub, &signer, &sig, now)?;
                return Ok(Signer(signer));
            }
        }
        Err(VerifyError::UnknownSigner(format!("OpenPGP key {issuer}")))
    }

    fn verify_ssh(&self, armored: &str, signed: &[u8], now: Timestamp) -> Result<Signer, VerifyError> {
        let sig = ssh_key::SshSig::from_pem(armored.trim())
            .map_err(|e| VerifyError::Malformed(format!("SSH: {e}")))?;
        let key_data = sig.public_key();
        let fingerprint = ssh_key::PublicKey::from(key_data.clone()).fingerprint(ssh_key::HashAlg::Sha256);
        let known = self.ssh.iter().find(|s| s.key.key_data() == key_data);
        let Some(allowed) = known else {
            return Err(VerifyError::UnknownSigner(format!("SSH key {fingerprint}")));
        };
        let signer = format!("SSH key {fingerprint} ({})", allowed.principals);
        if sig.namespace() != SSH_NAMESPACE {
            return Err(VerifyError::WrongNamespace {
                signer,
                namespace: sig.namespace().chars().take(64).collect(),
                expected: SSH_NAMESPACE,
            });
        }
        allowed
            .key
            .verify(SSH_NAMESPACE, signed, &sig)
            .map_err(|_| VerifyError::BadSignature(signer.clone()))?;
        if self.revoked_ssh.iter().any(|k| k.key_data() == key_data) {
            return Err(VerifyError::Revoked(signer));
        }
        if let Some(ns) = &allowed.namespaces
            && !ns.iter().any(|n| n == SSH_NAMESPACE)
        {
            return Err(VerifyError::WrongNamespace {
                signer,
                namespace: ns.join(","),
                expected: SSH_NAMESPACE,
            });
        }
        if let Some(at) = allowed.valid_before
            && now >= at
        {
            return Err(VerifyError::Expired { signer, at });
        }
        if let Some(at) = allowed.valid_after
            && now < at
        {
            return Err(VerifyError::NotYetValid { signer, at });
        }
        Ok(Signer(signer))
    }
}

/// Non-empty, non-comment lines with their 1-based numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn parse_ssh_public_key(line: &str) -> Result<ssh_key::PublicKey, String> {
    ssh_key::PublicKey::from_openssh(line).map_err(|e| format!("not an SSH public key ({e})"))
}

/// `principals [options] keytype base64 [comment]`. Options: `namespaces="a,b"`,
/// `valid-after=`/`valid-before=` (`YYYYMMDD[HHMM[SS]][Z]`, UTC here). `cert-authority` is
/// refused (nixroll trusts keys, not SSH certificates).
fn parse_allowed_signer(line: &str) -> Result<AllowedSigner, String> {
    let (principals, rest) = split_field(line);
    if principals.is_empty() || rest.is_empty() {
        return Err("expected `principals [options] key-type key`".into());
    }
    let mut rest = rest;
    let (mut namespaces, mut valid_after, mut valid_before) = (None, None, None);
    // Options come before the key type; a key type starts with ssh-, ecdsa- or sk-.
    loop {
        let (field, after) = split_field(rest);
        let is_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| field.starts_with(p));
        if is_key || field.is_empty() {
            break;
        }
        for opt in split_options(field) {
            let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
            let v = v.trim_matches('"');
            match k.to_ascii_lowercase().as_str() {
                "namespaces" => namespaces = Some(v.split(',').map(|s| s.trim().to_owned()).collect()),
                "valid-after" => valid_after = Some(parse_ssh_time(v)?),
                "valid-before" => valid_before = Some(parse_ssh_time(v)?),
                "cert-authority" => {
                    return Err("cert-authority is not supported: list the signers' keys".into());
                }
                _ => {
                    return Err(format!(
                        "unknown option {:?}",
                        k.chars().take(40).collect::<String>()
                    ));
                }
            }
        }
        rest = after;
    }
    let key = parse_ssh_public_key(rest)?;
    Ok(AllowedSigner {
        principals: principals.chars().take(200).collect(),
        namespaces,
        valid_after,
        valid_before,
        key,
    })
}

/// The first whitespace-separated field (quotes keep spaces) and the rest.
fn split_field(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return (&s[..i], s[i..].trim_start()),
            _ => {}
        }
    }
    (s, "")
}

/// Comma-separated options, commas inside quotes kept.
fn split_options(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, with an optional `Z`; read as UTC.
fn parse_ssh_time(v: &str) -> Result<Timestamp, String> {
    let digits = v.strip_suffix(['Z', 'z']).unwrap_or(v);
    let bad = || {
        format!(
            "time {:?} is not YYYYMMDD[HHMM[SS]]",
            v.chars().take(20).collect::<String>()
        )
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let padded = match digits.len() {
        8 => format!("{digits}000000"),
        12 => format!("{digits}00"),
        14 => digits.to_owned(),
        _ => return Err(bad()),
    };
    let n = |r: std::ops::Range<usize>| padded[r].parse::<i16>().map_err(|_| bad());
    let dt = jiff::civil::DateTime::new(
        n(0..4)?,
        i8::try_from(n(4..6)?).map_err(|_| bad())?,
        i8::try_from(n(6..8)?).map_err(|_| bad())?,
        i8::try_from(n(8..10)?).map_err(|_| bad())?,
        i8::try_from(n(10..12)?).map_err(|_| bad())?,
        i8::try_from(n(12..14)?).map_err(|_| bad())?,
        0,
    )
    .map_err(|_| bad())?;
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp())
        .map_err(|_| bad())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// The issuer a signature names (fingerprint, else key id).
fn issuer_display(sig: &Signature) -> String {
    if let Some(fp) = sig.issuer_fingerprint().first() {
        return format!("{fp:X}");
    }
    match sig.issuer_key_id().first() {
        Some(id) => hex(id.as_ref()),
        None => "(no issuer named)".into(),
    }
}

/// Whether `sig` names `key` as its issuer (a signature naming no issuer names none: git's
/// signatures always carry one).
fn issues(sig: &Signature, key: &impl KeyDetails) -> bool {
    sig.issuer_fingerprint()
        .iter()
        .any(|fp| **fp == key.fingerprint())
        || sig.issuer_key_id().iter().any(|id| **id == key.legacy_key_id())
}

/// ` (<first user id>)`, or empty.
fn pgp_name(cert: &SignedPublicKey) -> String {
    cert.details
        .users
        .first()
        .and_then(|u| u.id.as_str())
        .map(|s| format!(" ({})", s.chars().take(100).collect::<String>()))
        .unwrap_or_default()
}

fn ts(t: pgp::types::Timestamp) -> Timestamp {
    Timestamp::from_second(i64::from(t.as_secs())).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn created(sig: &Signature) -> Timestamp {
    sig.created().map(ts).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `key_created + expiration` of the newest of `sigs` (None: never expires).
fn expiry(key_created: pgp::types::Timestamp, sigs: &[&Signature]) -> Option<Timestamp> {
    let newest = sigs.iter().max_by_key(|s| created(s))?;
    let secs = i64::from(newest.key_expiration_time()?.as_secs());
    if secs == 0 {
        return None;
    }
    ts(key_created)
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()
}

/// The primary key: not revoked (a revocation that verifies), its self-signatures verify, and
/// not expired now nor when the signature was made.
fn check_primary(
    cert: &SignedPublicKey,
    signer: &str,
    sig: &Signature,
    now: Timestamp,
) -> Result<(), VerifyError> {
    let primary = &cert.primary_key;
    if cert
        .details
        .revocation_signatures
        .iter()
        .any(|r| r.verify_key(primary).is_ok())
    {
        return Err(VerifyError::Revoked(signer.to_owned()));
    }
    let mut selfsigs: Vec<&Signature> = Vec::new();
    for u in &cert.details.users {
        for s in &u.signatures {
            if issues(s, primary)
                && s.verify_certification(primary, pgp::types::Tag::UserId, &u.id)
                    .is_ok()
            {
                selfsigs.push(s);
            }
        }
    }
    for s in &cert.details.direct_signatures {
        if s.verify_key(primary).is_ok() {
            selfsigs.push(s);
        }
    }
    if selfsigs.is_empty() {
        return Err(VerifyError::Malformed(format!(
            "{signer} has no valid self-signature"
        )));
    }
    if let Some(at) = expiry(primary.created_at(), &selfsigs)
        && (now >= at || created(sig) >= at)
    {
        return Err(VerifyError::Expired {
            signer: signer.to_owned(),
            at,
        });
    }
    Ok(())
}

/// A signing subkey: bound by a binding signature that verifies and allows signing, not
/// revoked, not expired.
fn check_subkey(
    cert: &SignedPublicKey,
    sub: &pgp::composed::SignedPublicSubKey,
    signer: &str,
    sig: &Signature,
    now: Timestamp,
) -> Result<(), VerifyError> {
    let primary = &cert.primary_key;
    let valid = |s: &&Signature| s.verify_subkey_binding(primary, &sub.key).is_ok();
    let revoked = sub
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
        .any(|s| valid(&s));
    if revoked {
        return Err(VerifyError::Revoked(signer.to_owned()));
    }
    let bindings: Vec<&Signature> = sub
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
        .filter(valid)
        .collect();
    let Some(newest) = bindings.iter().max_by_key(|s| created(s)) else {
        return Err(VerifyError::Malformed(format!(
            "{signer}: the subkey is not bound to its key"
        )));
    };
    if !newest.key_flags().sign() {
        return Err(VerifyError::Malformed(format!(
            "{signer}: the subkey may not sign"
        )));
    }
    if let Some(at) = expiry(sub.key.created_at(), &bindings)
        && (now >= at || created(sig) >= at)
    {
        return Err(VerifyError::Expired {
            signer: signer.to_owned(),
            at,
        });
    }
    Ok(())
}

/// A git tag object's signature: the lines from the first `-----BEGIN … SIGNATURE-----` (or
/// `SIGNED MESSAGE`) line of its message to the end. Returns (signature, signed content), or
/// None when the tag carries no signature.
pub fn split_tag_signature(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    const STARTS: [&[u8]; 4] = [
        b"-----BEGIN PGP SIGNATURE-----",
        b"-----BEGIN PGP MESSAGE-----",
        b"-----BEGIN SSH SIGNATURE-----",
        b"-----BEGIN SIGNED MESSAGE-----",
    ];
    let mut at = 0;
    while at < raw.len() {
        let line = &raw[at..];
        if STARTS.iter().any(|s| line.starts_with(s)) {
            return Some((&raw[at..], &raw[..at]));
        }
        match raw[at..].iter().position(|b| *b == b'\n') {
            Some(i) => at += i + 1,
            None => break,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn allowed_signers_lines() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINmA1Sb5TzE5T0/9DMa+CYvpyoyv78MnECZjffZHlkBf";
        let s = parse_allowed_signer(&format!("alice@example.org {key} laptop")).unwrap();
        assert_eq!(s.principals, "alice@example.org");
        assert!(s.namespaces.is_none());
        let s = parse_allowed_signer(&format!(
            "a@x,b@x namespaces=\"git,file\",valid-after=20260101,valid-before=\"20270101Z\" {key}"
        ))
        .unwrap();
        assert_eq!(
            s.namespaces.as_deref(),
            Some(&["git".to_owned(), "file".to_owned()][..])
        );
        assert_eq!(s.valid_after.unwrap().to_string(), "2026-01-01T00:00:00Z");
        assert_eq!(s.valid_before.unwrap().to_string(), "2027-01-01T00:00:00Z");
        assert!(parse_allowed_signer(&format!("a@x cert-authority {key}")).is_err());
        assert!(parse_allowed_signer("a@x").is_err());
        assert!(parse_allowed_signer("a@x ssh-ed25519 AAAAnot-base64").is_err());
        assert!(parse_ssh_time("2026010").is_err());
        assert_eq!(
            parse_ssh_time("202601021530").unwrap().to_string(),
            "2026-01-02T15:30:00Z"
        );
    }

    #[test]
    fn secrets_without_keys_or_with_private_keys_are_refused() {
        let mk = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.as_bytes().to_vec())]);
        assert!(TrustedKeys::from_secret_data(&BTreeMap::new()).is_err());
        assert!(TrustedKeys::from_secret_data(&mk("allowed_signers", "# nothing\n")).is_err());
        let e = TrustedKeys::from_secret_data(&mk(
            "id",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAsecretbytes\n-----END OPENSSH PRIVATE KEY-----\n",
        ))
        .unwrap_err();
        assert!(e.contains("private key") && !e.contains("secretbytes"), "{e}");
        let e = TrustedKeys::from_secret_data(&mk(
            "team.asc",
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot base64 at all\n-----END PGP PUBLIC KEY BLOCK-----\n",
        ))
        .unwrap_err();
        assert!(e.starts_with("key team.asc"), "{e}");
    }

    #[test]
    fn tag_signatures_are_split_at_the_first_signature_line() {
        let raw = b"object 1\ntype commit\ntag v1\ntagger a <a> 1 +0000\n\nrelease\n-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n";
        let (sig, signed) = split_tag_signature(raw).unwrap();
        assert!(sig.starts_with(b"-----BEGIN SSH SIGNATURE-----"));
        assert!(signed.ends_with(b"release\n"));
        assert!(split_tag_signature(b"object 1\n\nno signature\n").is_none());
        let keys = TrustedKeys::default();
        assert_eq!(
            keys.verify(b"", b"x", Timestamp::UNIX_EPOCH),
            Err(VerifyError::Unsigned)
        );
        assert!(matches!(
            keys.verify(b"-----BEGIN SIGNED MESSAGE-----\n", b"x", Timestamp::UNIX_EPOCH),
            Err(VerifyError::UnsupportedFormat(_))
        ));
    }
}
