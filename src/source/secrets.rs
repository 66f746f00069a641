//! The Secrets a FlakeSource names: git credentials and known_hosts (`spec.secretRef`, Flux's
//! key names) and the trusted keys of `spec.verify`. Each is read with a bounded `get` (never
//! list or watch) at every resolution, so a rotated Secret counts at the next poll; values stay
//! in memory and errors name keys, never values.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};

use super::known_hosts::KnownHosts;
use super::resolve::{Credentials, Verification};
use super::verify::TrustedKeys;
use crate::api::FlakeSource;

/// Where and how long to read Secrets.
pub(super) struct SecretReader {
    pub client: Client,
    /// Bound of each `get`.
    pub timeout: Duration,
}

/// The Secret's credentials (Flux key names), read with `get`. Errors name keys, never values.
pub(super) async fn read_secret(
    api: &SecretReader,
    fs: &FlakeSource,
) -> Result<(Credentials, Option<KnownHosts>), (&'static str, String)> {
    let Some(r) = &fs.spec.secret_ref else {
        return Ok((Credentials::None, None));
    };
    let ns = fs.namespace().unwrap_or_default();
    let secret = get_secret(api, &ns, &r.name, "").await?;
    credentials_from(&secret).map_err(|m| ("InvalidSecret", format!("Secret {ns}/{}: {m}", r.name)))
}

/// `spec.verify`'s trusted keys, read with `get` on every resolution (a rotated key counts at
/// the next poll). None when verification is off.
pub(super) async fn read_trusted_keys(
    api: &SecretReader,
    fs: &FlakeSource,
) -> Result<Option<Verification>, (&'static str, String)> {
    let Some(v) = &fs.spec.verify else {
        return Ok(None);
    };
    let ns = fs.namespace().unwrap_or_default();
    let secret = get_secret(api, &ns, &v.secret_ref.name, "trusted keys: ").await?;
    let keys = TrustedKeys::from_secret_data(&secret_data(&secret)).map_err(|m| {
        (
            "InvalidTrustedKeys",
            format!("trusted keys: Secret {ns}/{}: {m}", v.secret_ref.name),
        )
    })?;
    Ok(Some(Verification {
        mode: v.mode,
        keys: Arc::new(keys),
    }))
}

/// A Secret's values, `stringData` merged over `data`.
pub fn secret_data(secret: &Secret) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out: std::collections::BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// `get` one Secret, bounded; errors say which (`what` prefixes the message).
async fn get_secret(
    reader: &SecretReader,
    ns: &str,
    name: &str,
    what: &str,
) -> Result<Secret, (&'static str, String)> {
    let api: Api<Secret> = Api::namespaced(reader.client.clone(), ns);
    let got = tokio::time::timeout(reader.timeout, api.get_opt(name)).await;
    match got {
        Err(_) => Err((
            "SecretNotRead",
            format!("{what}reading Secret {ns}/{name} timed out"),
        )),
        Ok(Err(e)) => Err(("SecretNotRead", format!("{what}reading Secret {ns}/{name}: {e}"))),
        Ok(Ok(None)) => Err(("SecretNotFound", format!("{what}Secret {ns}/{name} not found"))),
        Ok(Ok(Some(s))) => Ok(s),
    }
}

/// Flux's key names: `username`/`password` (HTTPS), `identity` (+ `password` as its
/// passphrase) and `known_hosts` (SSH).
pub fn credentials_from(secret: &Secret) -> Result<(Credentials, Option<KnownHosts>), String> {
    let get = |k: &str| -> Result<Option<String>, String> {
        let v = secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|s| s.clone().into_bytes())
            });
        match v {
            None => Ok(None),
            Some(b) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| format!("key {k} is not UTF-8")),
        }
    };
    let known_hosts = match get("known_hosts")? {
        Some(t) => Some(KnownHosts::parse(&t).map_err(|e| format!("key known_hosts: {e}"))?),
        None => None,
    };
    let creds = match (get("identity")?, get("username")?, get("password")?) {
        (Some(identity), _, passphrase) => Credentials::SshKey { identity, passphrase },
        (None, Some(username), Some(password)) => Credentials::Basic { username, password },
        (None, Some(_), None) => return Err("key username without key password".into()),
        (None, None, Some(_)) => return Err("key password without key username or identity".into()),
        (None, None, None) => Credentials::None,
    };
    Ok((creds, known_hosts))
}
