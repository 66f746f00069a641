//! `.narinfo`: what a binary cache says of one store path, and the fingerprint its signature
//! covers (`1;<store path>;<NAR hash, nix base32>;<NAR size>;<references, comma-separated>`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::SigningKey;

/// One store path as `nix path-info --json` describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NarInfo {
    pub path: String,
    /// As Nix prints it (`sha256-<base64>` in Nix ≥ 2.4, or `sha256:<base32>`).
    pub nar_hash: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
    #[serde(default)]
    pub deriver: Option<String>,
    #[serde(default)]
    pub ca: Option<String>,
}

/// Nix's base32 alphabet (no e, o, t, u).
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base32 encoding (as in `nix-hash --to-base32`): the last 5 bits come first.
pub fn nix_base32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = u16::from(bytes[i]) >> j;
        let hi = bytes.get(i + 1).map_or(0, |&x| u16::from(x) << (8 - j));
        out.push(char::from(NIX32[usize::from((lo | hi) & 0x1f)]));
    }
    out
}

/// `sha256-<base64>` → `sha256:<nix base32>`; `sha256:<base32>` stays as it is.
pub fn sri_to_nix32(hash: &str) -> Option<String> {
    if let Some(rest) = hash.strip_prefix("sha256:") {
        return (rest.len() == 52).then(|| hash.to_string());
    }
    let b64 = hash.strip_prefix("sha256-")?;
    let bytes = STANDARD.decode(b64).ok()?;
    (bytes.len() == 32).then(|| format!("sha256:{}", nix_base32(&bytes)))
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl NarInfo {
    /// The first 32 characters of the path's name: what a `.narinfo` is looked up by.
    pub fn hash_part(&self) -> &str {
        let b = base(&self.path);
        b.get(..32).unwrap_or(b)
    }

    /// The NAR hash in the form the fingerprint needs.
    pub fn nar_hash_nix32(&self) -> Option<String> {
        sri_to_nix32(&self.nar_hash)
    }

    /// What is signed.
    pub fn fingerprint(&self) -> Option<String> {
        let mut refs: Vec<&str> = self.references.iter().map(String::as_str).collect();
        refs.sort_unstable();
        Some(format!(
            "1;{};{};{};{}",
            self.path,
            self.nar_hash_nix32()?,
            self.nar_size,
            refs.join(",")
        ))
    }

    /// The `.narinfo` text, signed with `key`, pointing at an uncompressed `nar/<hash>.nar`.
    pub fn render(&self, key: &SigningKey) -> Option<String> {
        let mut refs: Vec<&str> = self.references.iter().map(|r| base(r)).collect();
        refs.sort_unstable();
        let mut s = format!(
            "StorePath: {}\nURL: nar/{}.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            self.path,
            self.hash_part(),
            self.nar_hash_nix32()?,
            self.nar_size,
            refs.join(" ")
        );
        if let Some(d) = &self.deriver {
            s.push_str(&format!("Deriver: {}\n", base(d)));
        }
        s.push_str(&format!("Sig: {}\n", key.sign(&self.fingerprint()?)));
        if let Some(ca) = &self.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base32_matches_nix() {
        // From the experiment in docs/builder.md: Nix printed both forms of one NAR hash.
        assert_eq!(
            sri_to_nix32("sha256-geYfr+v5FIdzIeyrHpfUzNtnienENT8lPZiK8cTSyYs=").unwrap(),
            "sha256:12y9sb2g32lq7ljkydf4x64ngnycsjbixazc45rqf57rxfpizrl1"
        );
        assert_eq!(
            sri_to_nix32("sha256:12y9sb2g32lq7ljkydf4x64ngnycsjbixazc45rqf57rxfpizrl1").unwrap(),
            "sha256:12y9sb2g32lq7ljkydf4x64ngnycsjbixazc45rqf57rxfpizrl1"
        );
        assert!(sri_to_nix32("md5-abc").is_none());
    }

    #[test]
    fn fingerprint_lists_full_reference_paths() {
        let i = NarInfo {
            path: "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep".into(),
            nar_hash: "sha256-geYfr+v5FIdzIeyrHpfUzNtnienENT8lPZiK8cTSyYs=".into(),
            nar_size: 584,
            references: vec![
                "/nix/store/7d2ch0vw00r36i3qh5n06rj7wx8iacj0-manifest.nix".into(),
                "/nix/store/hgms58ixaf7p0rcf53k8pd1dxbb9jqxh-dsrc".into(),
            ],
            deriver: None,
            ca: None,
        };
        assert_eq!(i.hash_part(), "snwk4inds1ls7q83128vqfxsjigdbl0q");
        assert_eq!(
            i.fingerprint().unwrap(),
            "1;/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-dep;sha256:12y9sb2g32lq7ljkydf4x64ngnycsjbixazc45rqf57rxfpizrl1;584;/nix/store/7d2ch0vw00r36i3qh5n06rj7wx8iacj0-manifest.nix,/nix/store/hgms58ixaf7p0rcf53k8pd1dxbb9jqxh-dsrc"
        );
    }
}
