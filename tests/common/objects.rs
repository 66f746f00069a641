//! Small builders of API objects that several test targets write out by hand.

use nixroll::api::{SecretFile, SecretKeyRef};

/// The file `path` from key `key` of the Secret `secret`: mode 0400, owned by root, no units
/// to restart (set `restart_units` on the result for those).
pub fn secret_file(secret: &str, key: &str, path: &str) -> SecretFile {
    SecretFile {
        secret_ref: SecretKeyRef {
            name: secret.into(),
            key: key.into(),
        },
        path: path.into(),
        mode: "0400".into(),
        owner: "root:root".into(),
        restart_units: vec![],
    }
}
