//! Cryptography: key types, the root key source, and the AES-256-GCM envelope.
//!
//! Nothing here touches storage; the vault decides which key seals what.

pub mod aead;
pub mod envelope;
pub mod keys;
pub mod root;

pub use envelope::{Context, DecryptionFailed};
pub use keys::{Dek, Kek, RootKey, SymmetricKey};
