//! The envelope: AES-256-GCM sealing with a self-describing header and
//! length-prefixed associated data that binds every ciphertext to its place.
//!
//! ```text
//! seal[key](plaintext, ctx) = 0x01 ‖ key_version:u32be ‖ nonce:12 ‖ AES-256-GCM(key, nonce, plaintext, aad) ‖ tag:16
//! aad                       = 0x01 ‖ key_version:u32be ‖ lp(label) ‖ lp(field₁) ‖ … ‖ lp(fieldₙ)
//! lp(x)                     = len(x):u32be ‖ x
//! ```
//!
//! The header is authenticated too, so flipping the format byte or the key id
//! fails just like flipping a ciphertext bit. Every failure to open is the same
//! opaque [`DecryptionFailed`]; the caller never learns which check failed.
//! `docs/format.md` documents the layout byte by byte.

use rand::Rng;
use zeroize::Zeroizing;

pub use super::aead::DecryptionFailed;
use super::aead::{self, NONCE_LEN, TAG_LEN};
use super::keys::SymmetricKey;

/// The only ciphertext format this version writes and reads.
pub const FORMAT_V1: u8 = 0x01;
/// format byte + key version.
const PREFIX_LEN: usize = 1 + 4;
/// format byte + key version + nonce.
pub const HEADER_LEN: usize = PREFIX_LEN + NONCE_LEN;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Domain-separation labels, one per kind of ciphertext.
pub const PAYLOAD_LABEL: &[u8] = b"credvault/v1/payload";
pub const DEK_WRAP_LABEL: &[u8] = b"credvault/v1/dek";
pub const KEK_WRAP_LABEL: &[u8] = b"credvault/v1/kek";
pub const ROOT_CHECK_LABEL: &[u8] = b"credvault/v1/root-check";
pub const AUDIT_KEY_LABEL: &[u8] = b"credvault/v1/audit-key";
pub const BACKUP_KEY_LABEL: &[u8] = b"credvault/v1/backup-key";
/// The plaintext of the root key's check value.
pub const ROOT_CHECK_PLAINTEXT: &[u8] = b"credvault root key check v1";

/// The context a ciphertext is bound to: a label and length-prefixed fields.
///
/// Built with the constructors below so that every ciphertext of a kind binds
/// the same fields in the same order.
#[derive(Clone, PartialEq, Eq)]
pub struct Context(Vec<u8>);

impl Context {
    fn new(label: &[u8]) -> Self {
        Self(Vec::with_capacity(96)).field(label)
    }

    fn field(mut self, bytes: &[u8]) -> Self {
        let len = u32::try_from(bytes.len()).expect("context field under 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    fn u32(self, value: u32) -> Self {
        self.field(&value.to_be_bytes())
    }

    /// A credential payload: tenant, credential id, credential version, kind, DEK version.
    pub fn payload(
        tenant: &str,
        credential: &str,
        credential_version: u32,
        kind: u8,
        dek_version: u32,
    ) -> Self {
        Self::new(PAYLOAD_LABEL)
            .field(tenant.as_bytes())
            .field(credential.as_bytes())
            .u32(credential_version)
            .field(&[kind])
            .u32(dek_version)
    }

    /// A tenant DEK wrapped by a KEK: tenant, DEK version, KEK version.
    pub fn dek_wrap(tenant: &str, dek_version: u32, kek_version: u32) -> Self {
        Self::new(DEK_WRAP_LABEL)
            .field(tenant.as_bytes())
            .u32(dek_version)
            .u32(kek_version)
    }

    /// A KEK wrapped by the root key: KEK version.
    pub fn kek_wrap(kek_version: u32) -> Self {
        Self::new(KEK_WRAP_LABEL).u32(kek_version)
    }

    /// The root key's check value.
    pub fn root_check() -> Self {
        Self::new(ROOT_CHECK_LABEL)
    }

    /// The audit log's HMAC key, wrapped by the root key.
    pub fn audit_key() -> Self {
        Self::new(AUDIT_KEY_LABEL)
    }

    /// A backup file's MAC key, wrapped by the root key.
    pub fn backup_key() -> Self {
        Self::new(BACKUP_KEY_LABEL)
    }

    /// The encoded fields (without the header prefix), as documented in `docs/format.md`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Context").field(&self.0.len()).finish()
    }
}

fn aad(prefix: &[u8], context: &Context) -> Vec<u8> {
    let mut aad = Vec::with_capacity(prefix.len() + context.0.len());
    aad.extend_from_slice(prefix);
    aad.extend_from_slice(&context.0);
    aad
}

/// seal[key](plaintext, context) — AES-256-GCM with a fresh random 96-bit nonce.
pub fn seal(key: &SymmetricKey, key_version: u32, context: &Context, plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    insecure_seal_with_nonce(key, key_version, context, plaintext, nonce)
}

/// [`seal`] with a caller-chosen nonce. INSECURE outside known-answer test
/// vectors: a repeated nonce under one key breaks GCM. The vault never calls it
/// except through [`seal`].
#[doc(hidden)]
pub fn insecure_seal_with_nonce(
    key: &SymmetricKey,
    key_version: u32,
    context: &Context,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = aad(&out[..PREFIX_LEN], context);
    out.extend_from_slice(&aead::encrypt(key, &nonce, &aad, plaintext));
    out
}

/// The key version a ciphertext names in its header, so the caller can pick the key.
pub fn key_version(ciphertext: &[u8]) -> Result<u32, DecryptionFailed> {
    if ciphertext.len() < OVERHEAD || ciphertext[0] != FORMAT_V1 {
        return Err(DecryptionFailed);
    }
    Ok(u32::from_be_bytes(
        ciphertext[1..PREFIX_LEN].try_into().expect("4 bytes"),
    ))
}

/// open[key](ciphertext, context) — the plaintext, or [`DecryptionFailed`] for
/// any wrong key, wrong context, wrong header, truncation or tampering.
pub fn open(
    key: &SymmetricKey,
    context: &Context,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, DecryptionFailed> {
    open_owned(key, context, ciphertext.to_vec())
}

/// [`open`] that decrypts in the ciphertext's own buffer (no copy).
pub fn open_owned(
    key: &SymmetricKey,
    context: &Context,
    ciphertext: Vec<u8>,
) -> Result<Zeroizing<Vec<u8>>, DecryptionFailed> {
    key_version(&ciphertext)?;
    let mut buffer = Zeroizing::new(ciphertext);
    let (header, body) = buffer.split_at_mut(HEADER_LEN);
    let nonce: &[u8; NONCE_LEN] = header[PREFIX_LEN..]
        .try_into()
        .map_err(|_| DecryptionFailed)?;
    let len = aead::decrypt_in_place(key, nonce, &aad(&header[..PREFIX_LEN], context), body)?;
    buffer.copy_within(HEADER_LEN..HEADER_LEN + len, 0);
    buffer.truncate(len);
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SymmetricKey {
        SymmetricKey::from_slice(&[7; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_header() {
        let ctx = Context::payload("acme", "gmail", 3, 1, 2);
        let ct = seal(&key(), 2, &ctx, b"cookie");
        assert_eq!(ct.len(), OVERHEAD + 6);
        assert_eq!(ct[0], FORMAT_V1);
        assert_eq!(key_version(&ct), Ok(2));
        assert_eq!(open(&key(), &ctx, &ct).unwrap().as_slice(), b"cookie");
    }

    #[test]
    fn every_bit_flip_fails() {
        let ctx = Context::payload("acme", "gmail", 3, 1, 2);
        let ct = seal(&key(), 2, &ctx, b"a cookie jar of some length");
        for bit in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                open(&key(), &ctx, &bad).unwrap_err(),
                DecryptionFailed,
                "bit {bit}"
            );
        }
    }

    #[test]
    fn truncation_fails() {
        let ctx = Context::kek_wrap(1);
        let ct = seal(&key(), 1, &ctx, &[1; 32]);
        for len in 0..ct.len() {
            assert!(open(&key(), &ctx, &ct[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn contexts_are_unambiguous() {
        // Without length prefixes these two would concatenate to the same bytes.
        let a = Context::payload("ab", "c", 1, 1, 1);
        let b = Context::payload("a", "bc", 1, 1, 1);
        assert_ne!(a, b);
        let ct = seal(&key(), 1, &a, b"x");
        assert!(open(&key(), &b, &ct).is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let ctx = Context::root_check();
        let a = seal(&key(), 1, &ctx, b"same");
        let b = seal(&key(), 1, &ctx, b"same");
        assert_ne!(a[5..HEADER_LEN], b[5..HEADER_LEN]);
    }

    proptest! {
        #[test]
        fn wrong_context_fails(
            tenant in "[a-z]{1,8}", cred in "[a-z]{1,8}", v in 1u32..5, kind in 1u8..5, dek in 1u32..5,
            which in 0usize..5,
        ) {
            let ctx = Context::payload(&tenant, &cred, v, kind, dek);
            let ct = seal(&key(), dek, &ctx, b"secret");
            let other = match which {
                0 => Context::payload(&format!("{tenant}x"), &cred, v, kind, dek),
                1 => Context::payload(&tenant, &format!("{cred}x"), v, kind, dek),
                2 => Context::payload(&tenant, &cred, v + 1, kind, dek),
                3 => Context::payload(&tenant, &cred, v, kind + 1, dek),
                _ => Context::payload(&tenant, &cred, v, kind, dek + 1),
            };
            prop_assert_eq!(open(&key(), &other, &ct).unwrap_err(), DecryptionFailed);
        }
    }
}
