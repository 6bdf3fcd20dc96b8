//! Wycheproof AES-GCM vectors through our one AEAD primitive
//! (`crypto::aead::{encrypt, decrypt}`): the groups we use, 256-bit keys,
//! 96-bit nonces, 128-bit tags.

use credvault::crypto::SymmetricKey;
use credvault::crypto::aead::{self, NONCE_LEN, TAG_LEN};
use wycheproof::TestResult;
use wycheproof::aead::{TestName, TestSet};

#[test]
fn aes_256_gcm_wycheproof() {
    let set = TestSet::load(TestName::AesGcm).expect("the Wycheproof AES-GCM set loads");
    let mut exercised = 0usize;
    for group in set
        .test_groups
        .iter()
        .filter(|g| g.key_size == 256 && g.nonce_size == NONCE_LEN * 8 && g.tag_size == TAG_LEN * 8)
    {
        for test in &group.tests {
            let id = test.tc_id;
            let key = SymmetricKey::from_slice(&test.key).expect("a 32-byte key");
            let nonce: [u8; NONCE_LEN] = test.nonce.as_slice().try_into().expect("12-byte nonce");
            let mut ct_and_tag = test.ct.to_vec();
            ct_and_tag.extend_from_slice(&test.tag);
            let opened = aead::decrypt(&key, &nonce, &test.aad, &ct_and_tag);
            match test.result {
                TestResult::Valid => {
                    assert_eq!(
                        aead::encrypt(&key, &nonce, &test.aad, &test.pt),
                        ct_and_tag,
                        "tcId {id}: encrypt"
                    );
                    let opened = opened.unwrap_or_else(|_| panic!("tcId {id}: decrypt failed"));
                    assert_eq!(opened.as_slice(), test.pt.as_slice(), "tcId {id}: decrypt");
                }
                TestResult::Invalid => {
                    assert!(opened.is_err(), "tcId {id}: an invalid vector opened");
                }
                // None in this set today; if one appears, it may open or not,
                // but if it opens it must give the message.
                TestResult::Acceptable => {
                    if let Ok(opened) = opened {
                        assert_eq!(opened.as_slice(), test.pt.as_slice(), "tcId {id}");
                    }
                }
            }
            exercised += 1;
        }
    }
    // A filter that silently matched nothing must fail; 66 vectors in Wycheproof 0.7.
    assert!(exercised > 0, "no Wycheproof vector was exercised");
    assert!(
        exercised >= 60,
        "only {exercised} Wycheproof vectors exercised"
    );
}
