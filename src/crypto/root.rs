//! Where the root key comes from: a key file or an environment variable.
//!
//! The root key is the operator's: credvault never stores it, only a check
//! value made with it (see `vault::keyring`). A key file holds 32 raw bytes or
//! their base64 text; a key file that its group or others can read is refused.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::keys::{KEY_LEN, SymmetricKey};

/// Why a root key could not be loaded. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// The key file is readable by its group or others.
    #[error(
        "root key file {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The file or variable does not hold 32 raw bytes or their base64.
    #[error("root key from {source_name} is not 32 raw bytes or their base64 encoding")]
    Malformed { source_name: String },
    /// The environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The key file could not be read or written.
    #[error("root key file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Loads the root key from a file: 32 raw bytes, or base64 text of 32 bytes.
pub fn load_file(path: &Path) -> Result<SymmetricKey, RootKeyError> {
    let io = |error| RootKeyError::Io {
        path: path.to_owned(),
        error,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(RootKeyError::Permissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    let contents = Zeroizing::new(std::fs::read(path).map_err(io)?);
    parse(&contents).ok_or_else(|| RootKeyError::Malformed {
        source_name: path.display().to_string(),
    })
}

/// Loads the root key from an environment variable holding its base64 text.
pub fn load_env(var: &str) -> Result<SymmetricKey, RootKeyError> {
    let value =
        Zeroizing::new(std::env::var(var).map_err(|_| RootKeyError::MissingEnv(var.to_owned()))?);
    parse(value.as_bytes()).ok_or_else(|| RootKeyError::Malformed {
        source_name: format!("${var}"),
    })
}

fn parse(contents: &[u8]) -> Option<SymmetricKey> {
    if contents.len() == KEY_LEN {
        return SymmetricKey::from_slice(contents);
    }
    let text = contents.trim_ascii();
    let mut decoded = Zeroizing::new([0u8; KEY_LEN + 3]);
    let len = STANDARD.decode_slice(text, decoded.as_mut_slice()).ok()?;
    (len == KEY_LEN)
        .then(|| SymmetricKey::from_slice(&decoded[..KEY_LEN]))
        .flatten()
}

/// Writes a new random root key as base64 to `path` with mode 0600. Refuses to
/// overwrite an existing file.
pub fn generate_file(path: &Path) -> Result<(), RootKeyError> {
    let io = |error| RootKeyError::Io {
        path: path.to_owned(),
        error,
    };
    let key = SymmetricKey::generate();
    let mut text = Zeroizing::new(STANDARD.encode(key.expose_bytes()));
    text.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_file_loads_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        generate_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = load_file(&path).unwrap();
        assert_ne!(key.expose_bytes(), &[0; 32]);
        assert!(
            matches!(generate_file(&path), Err(RootKeyError::Io { .. })),
            "no overwrite"
        );
    }

    #[test]
    fn raw_and_base64_agree() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let b64 = dir.path().join("b64");
        for (path, contents) in [
            (&raw, vec![9u8; 32]),
            (&b64, STANDARD.encode([9u8; 32]).into_bytes()),
        ] {
            std::fs::write(path, contents).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        assert_eq!(
            load_file(&raw).unwrap().expose_bytes(),
            load_file(&b64).unwrap().expose_bytes()
        );
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        generate_file(&path).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_file(&path).unwrap_err();
            assert!(matches!(err, RootKeyError::Permissions { .. }));
            assert!(
                err.to_string()
                    .contains("must not be readable by group or others"),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_is_refused_without_echo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        std::fs::write(&path, "c2hvcnQ=\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("not 32 raw bytes"), "{err}");
        assert!(!err.contains("c2hvcnQ"), "{err}");
    }
}
