//! The builder's signing key: Nix's secret-key format (`name:base64(seed ‖ public key)`, as
//! `nix-store --generate-binary-cache-key` writes it), ed25519 via `ring`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{Ed25519KeyPair, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the signing key is not in Nix's name:base64 secret-key format")]
    Format,
    #[error("the signing key {name:?} does not hold a valid ed25519 key pair")]
    Invalid { name: String },
}

/// An ed25519 key that signs narinfos. Its `Debug` shows the name only.
pub struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
    /// The seed, kept (zeroed on drop) only to hand the key to `nix copy` through an
    /// in-memory file ([`SigningKey::nix_secret`], `push.rs`).
    seed: zeroize::Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Parse `name:base64` (64 bytes: the 32-byte seed, then the 32-byte public key). The
    /// error never quotes the input.
    pub fn parse(secret: &str) -> Result<SigningKey, KeyError> {
        let (name, b64) = secret.trim().split_once(':').ok_or(KeyError::Format)?;
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(KeyError::Format);
        }
        let bytes = STANDARD.decode(b64).map_err(|_| KeyError::Format)?;
        if bytes.len() != 64 {
            return Err(KeyError::Format);
        }
        let pair = Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..]).map_err(|_| {
            KeyError::Invalid {
                name: name.to_string(),
            }
        })?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[..32]);
        let bytes = zeroize::Zeroizing::new(bytes);
        drop(bytes);
        Ok(SigningKey {
            name: name.to_string(),
            pair,
            seed,
        })
    }

    /// The key again in Nix's secret-key text (`name:base64(seed ‖ public key)`), for the
    /// in-memory file `nix copy` reads it from; zeroed when dropped. Never log it.
    pub fn nix_secret(&self) -> zeroize::Zeroizing<String> {
        let mut bytes = zeroize::Zeroizing::new(self.seed.to_vec());
        bytes.extend_from_slice(self.pair.public_key().as_ref());
        zeroize::Zeroizing::new(format!("{}:{}", self.name, STANDARD.encode(bytes.as_slice())))
    }

    /// A new key pair named `name`, as Nix's secret-key text (`name:base64(seed ‖ public
    /// key)`, what `nix-store --generate-binary-cache-key` writes): for the demo's Secret.
    pub fn generate_secret(name: &str) -> Result<String, KeyError> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::Invalid {
                name: name.to_string(),
            })?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| KeyError::Invalid {
            name: name.to_string(),
        })?;
        let mut bytes = seed.to_vec();
        bytes.extend_from_slice(pair.public_key().as_ref());
        Ok(format!("{name}:{}", STANDARD.encode(&bytes)))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key as nodes trust it: `name:base64(public key)`.
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.pair.public_key().as_ref())
        )
    }

    /// A narinfo `Sig:` value for `fingerprint`: `name:base64(signature)`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.pair.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_nix_keys_and_signs_verifiably() {
        let seed = [7u8; 32];
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let mut bytes = seed.to_vec();
        bytes.extend_from_slice(pair.public_key().as_ref());
        let secret = format!("cache-1:{}", STANDARD.encode(&bytes));
        let key = SigningKey::parse(&secret).unwrap();
        assert_eq!(key.name(), "cache-1");
        assert_eq!(key.nix_secret().as_str(), secret);
        assert!(!format!("{key:?}").contains(&STANDARD.encode(&bytes)));
        let sig = key.sign("1;/nix/store/x;sha256:0;1;");
        let (name, b64) = sig.split_once(':').unwrap();
        assert_eq!(name, "cache-1");
        let public = key.public_key();
        let pk = STANDARD.decode(public.split_once(':').unwrap().1).unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
            .verify(b"1;/nix/store/x;sha256:0;1;", &STANDARD.decode(b64).unwrap())
            .unwrap();
        // A public key is not a secret key; garbage is refused without being quoted.
        assert!(matches!(SigningKey::parse(&public), Err(KeyError::Format)));
        let err = SigningKey::parse("k:not base64!").unwrap_err().to_string();
        assert!(!err.contains("not base64"), "{err}");
        // Seed and public key that do not belong together.
        let mut wrong = bytes.clone();
        wrong[40] ^= 1;
        assert!(SigningKey::parse(&format!("k:{}", STANDARD.encode(&wrong))).is_err());
    }
}
