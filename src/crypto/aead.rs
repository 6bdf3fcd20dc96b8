//! The one AEAD primitive: AES-256-GCM (RustCrypto `aes-gcm`), 96-bit nonce,
//! 128-bit tag. The envelope builds its format on these two functions; the
//! Wycheproof vectors test them directly.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Nonce, Tag};
use zeroize::Zeroizing;

use super::keys::SymmetricKey;

/// Length of a GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;

/// A ciphertext did not open: wrong key, wrong context, truncated or tampered.
/// Deliberately carries no detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decryption failed")]
pub struct DecryptionFailed;

/// AES-256-GCM(key, nonce, plaintext, aad) = ciphertext ‖ tag.
pub fn encrypt(
    key: &SymmetricKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    let tag = key
        .cipher()
        .encrypt_inout_detached(&Nonce::from(*nonce), aad, out.as_mut_slice().into())
        .expect("AES-GCM accepts any message under 64 GiB");
    out.extend_from_slice(&tag);
    out
}

/// The inverse of [`encrypt`]: the plaintext, or [`DecryptionFailed`].
pub fn decrypt(
    key: &SymmetricKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, DecryptionFailed> {
    let mut buffer = Zeroizing::new(ciphertext_and_tag.to_vec());
    let len = decrypt_in_place(key, nonce, aad, &mut buffer)?;
    buffer.truncate(len);
    Ok(buffer)
}

/// [`decrypt`] in place: `buffer` holds ciphertext ‖ tag and, on success, starts
/// with the plaintext, whose length is returned. On failure the buffer is left
/// as it was (the tag is checked before anything is decrypted).
pub fn decrypt_in_place(
    key: &SymmetricKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buffer: &mut [u8],
) -> Result<usize, DecryptionFailed> {
    let body_len = buffer.len().checked_sub(TAG_LEN).ok_or(DecryptionFailed)?;
    let (body, tag) = buffer.split_at_mut(body_len);
    let tag = Tag::try_from(&*tag).map_err(|_| DecryptionFailed)?;
    key.cipher()
        .decrypt_inout_detached(&Nonce::from(*nonce), aad, body.into(), &tag)
        .map_err(|_| DecryptionFailed)?;
    Ok(body_len)
}
