//! Key types: 256-bit AES-256-GCM keys as zeroize-on-drop newtypes.
//!
//! Every key is a [`SymmetricKey`] wrapped in a type that says which layer of the
//! hierarchy it belongs to (root key → KEK → DEK). None of them is `Clone`, their
//! `Debug` shows a version and never a byte, and their bytes are wiped on drop.
//! Reading the raw bytes is an explicit call to [`SymmetricKey::expose_bytes`],
//! which only the envelope code uses, to wrap a key under the layer above.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::KeyInit;
use rand::TryRng;
use zeroize::Zeroizing;

/// Length of every key in the hierarchy, in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// 256 bits of key material with its expanded AES-256-GCM cipher.
///
/// The bytes live in one heap allocation that is wiped on drop; the cipher's key
/// schedule is wiped on drop too (aes-gcm's `zeroize` feature).
pub struct SymmetricKey {
    bytes: Box<Zeroizing<[u8; KEY_LEN]>>,
    cipher: Aes256Gcm,
}

impl SymmetricKey {
    /// A fresh key from the operating system's CSPRNG (`getrandom`).
    ///
    /// # Panics
    /// If the operating system cannot provide randomness; no key can be made safely then.
    pub fn generate() -> Self {
        let mut bytes = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        rand::rngs::SysRng
            .try_fill_bytes(bytes.as_mut_slice())
            .expect("the OS random number generator failed");
        Self::from_boxed(bytes)
    }

    /// Takes ownership of key bytes (for example unwrapped from the layer above).
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self::from_boxed(Box::new(bytes))
    }

    /// Copies key bytes from a slice of exactly [`KEY_LEN`] bytes; `None` otherwise.
    pub fn from_slice(slice: &[u8]) -> Option<Self> {
        let mut bytes = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        bytes.as_mut_slice().copy_from_slice(slice.get(..KEY_LEN)?);
        (slice.len() == KEY_LEN).then(|| Self::from_boxed(bytes))
    }

    fn from_boxed(bytes: Box<Zeroizing<[u8; KEY_LEN]>>) -> Self {
        let cipher = Aes256Gcm::new(bytes.as_slice().try_into().expect("32-byte key"));
        Self { bytes, cipher }
    }

    /// The raw key bytes. Used only to wrap this key under the layer above.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymmetricKey").finish_non_exhaustive()
    }
}

macro_rules! layer_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name {
            version: u32,
            key: SymmetricKey,
        }

        impl $name {
            /// Wraps key material as this layer's key at `version`.
            pub fn new(version: u32, key: SymmetricKey) -> Self {
                Self { version, key }
            }

            /// The key version (the id stored in every ciphertext it seals).
            pub fn version(&self) -> u32 {
                self.version
            }

            /// The key material, for the envelope functions.
            pub fn key(&self) -> &SymmetricKey {
                &self.key
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("version", &self.version)
                    .finish_non_exhaustive()
            }
        }
    };
}

layer_key!(
    /// The operator-held root key; wraps the KEK ring. Never stored by credvault.
    RootKey
);
layer_key!(
    /// A key-encryption key; wraps tenant data keys.
    Kek
);
layer_key!(
    /// A tenant data key; seals credential payloads.
    Dek
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let key = SymmetricKey::from_slice(&[0xAB; KEY_LEN]).unwrap();
        let dek = Dek::new(7, key);
        let shown = format!("{dek:?} {:?}", dek.key());
        assert!(shown.contains("version: 7"));
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn from_slice_requires_exact_length() {
        assert!(SymmetricKey::from_slice(&[1; 31]).is_none());
        assert!(SymmetricKey::from_slice(&[1; 33]).is_none());
        assert!(SymmetricKey::from_slice(&[1; 32]).is_some());
    }

    #[test]
    fn generated_keys_differ() {
        let a = SymmetricKey::generate();
        let b = SymmetricKey::generate();
        assert_ne!(a.expose_bytes(), b.expose_bytes());
        assert_ne!(a.expose_bytes(), &[0u8; KEY_LEN]);
    }
}
