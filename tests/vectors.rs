//! Known-answer vectors for the envelope format (`docs/format.md`), kept as
//! data files in `tests/data/`: every `pass_*.json` must open to its
//! plaintext, every `fail_*.json` must fail to open.
//!
//! The checking test only opens; it never seals, so the files are the
//! format's contract. `regenerate_vectors` rewrites them deterministically
//! (fixed keys and nonces):
//!
//! ```text
//! cargo test --test vectors -- --ignored regenerate_vectors
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use credvault::crypto::SymmetricKey;
use credvault::crypto::envelope::{self, Context, HEADER_LEN, OVERHEAD};
use serde::{Deserialize, Serialize};

/// The context a vector is opened under, as structured fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Ctx {
    Payload {
        tenant: String,
        credential: String,
        credential_version: u32,
        kind: u8,
        dek_version: u32,
    },
    DekWrap {
        tenant: String,
        dek_version: u32,
        kek_version: u32,
    },
    KekWrap {
        kek_version: u32,
    },
    RootCheck,
}

impl Ctx {
    fn to_context(&self) -> Context {
        match self {
            Ctx::Payload {
                tenant,
                credential,
                credential_version,
                kind,
                dek_version,
            } => Context::payload(tenant, credential, *credential_version, *kind, *dek_version),
            Ctx::DekWrap {
                tenant,
                dek_version,
                kek_version,
            } => Context::dek_wrap(tenant, *dek_version, *kek_version),
            Ctx::KekWrap { kek_version } => Context::kek_wrap(*kek_version),
            Ctx::RootCheck => Context::root_check(),
        }
    }

    /// The key version the header must name, where the context says it:
    /// a payload names its DEK version, a DEK wrap its KEK version. KEK wraps
    /// and the root check name the root key version, which no context holds.
    fn header_key_version(&self) -> Option<u32> {
        match self {
            Ctx::Payload { dek_version, .. } => Some(*dek_version),
            Ctx::DekWrap { kek_version, .. } => Some(*kek_version),
            Ctx::KekWrap { .. } | Ctx::RootCheck => None,
        }
    }
}

/// One vector file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    description: String,
    /// The key the ciphertext is opened with (hex, 32 bytes).
    key: String,
    context: Ctx,
    /// The full envelope: format ‖ key version ‖ nonce ‖ ciphertext ‖ tag (hex).
    ciphertext: String,
    /// Pass files: the key version the header names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_version: Option<u32>,
    /// Pass files: the plaintext it opens to (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The vector files: every `*.json` in `tests/data/`, which must be named
/// `pass_*` or `fail_*`. Other files (a README) are not vectors.
fn vector_files() -> Vec<(String, PathBuf)> {
    let mut files: Vec<_> = std::fs::read_dir(data_dir())
        .expect("tests/data exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.starts_with("pass_") || name.starts_with("fail_"),
                "{name}: a vector file must be named pass_*.json or fail_*.json"
            );
            (name, path)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn vectors_open_or_fail_as_named() {
    let (mut passed, mut failed) = (0, 0);
    for (name, path) in vector_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let vector: Vector =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: malformed: {e}"));
        let key = SymmetricKey::from_slice(&hex::decode(&vector.key).unwrap())
            .unwrap_or_else(|| panic!("{name}: key is not 32 bytes"));
        let ciphertext = hex::decode(&vector.ciphertext).unwrap();
        let opened = envelope::open(&key, &vector.context.to_context(), &ciphertext);
        if name.starts_with("pass_") {
            let expected = hex::decode(vector.plaintext.as_deref().unwrap_or_else(|| {
                panic!("{name}: a pass vector needs a plaintext");
            }))
            .unwrap();
            let opened = opened.unwrap_or_else(|_| panic!("{name}: did not open"));
            assert_eq!(opened.as_slice(), expected.as_slice(), "{name}: plaintext");
            assert_eq!(
                ciphertext.len(),
                OVERHEAD + expected.len(),
                "{name}: length"
            );
            let named = envelope::key_version(&ciphertext).unwrap();
            assert_eq!(
                Some(named),
                vector.key_version,
                "{name}: header key version"
            );
            if let Some(version) = vector.context.header_key_version() {
                assert_eq!(named, version, "{name}: header names the wrong key");
            }
            passed += 1;
        } else {
            assert!(opened.is_err(), "{name}: a fail vector opened");
            assert!(
                vector.plaintext.is_none(),
                "{name}: fail vectors have no plaintext"
            );
            failed += 1;
        }
    }
    assert!(passed >= 10, "only {passed} pass vectors");
    assert!(failed >= 15, "only {failed} fail vectors");
}

/// 2^20 seals under one key: no nonce repeats.
#[test]
fn random_nonces_do_not_repeat() {
    const SEALS: usize = 1 << 20;
    let key = SymmetricKey::from_slice(&[0x42; 32]).unwrap();
    let context = Context::root_check();
    let mut nonces = HashSet::with_capacity(SEALS);
    for _ in 0..SEALS {
        let ciphertext = envelope::seal(&key, 1, &context, b"");
        let nonce: [u8; 12] = ciphertext[5..HEADER_LEN].try_into().unwrap();
        assert!(
            nonces.insert(nonce),
            "nonce {} repeated",
            hex::encode(nonce)
        );
    }
    assert_eq!(nonces.len(), SEALS);
}

// ---------------------------------------------------------------------------
// Generation (ignored: run on purpose, then review and check in the diff).

/// The key hierarchy of the vectors: the root key wraps the KEK, which wraps
/// the DEK, which seals the payloads.
const ROOT_KEY: [u8; 32] = pattern(0x00);
const KEK: [u8; 32] = pattern(0x20);
const DEK: [u8; 32] = pattern(0x40);
/// A key that sealed nothing.
const WRONG_KEY: [u8; 32] = pattern(0x60);

const ROOT_VERSION: u32 = 1;
const KEK_VERSION: u32 = 1;
const DEK_VERSION: u32 = 2;

/// `start, start+1, …, start+31`.
const fn pattern(start: u8) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = start + i as u8;
        i += 1;
    }
    out
}

/// A distinct fixed nonce per vector: `f0e1d2c3b4a59687 ‖ n:u32be`.
fn nonce(n: u32) -> [u8; 12] {
    let mut out = [0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, 0, 0, 0, 0];
    out[8..].copy_from_slice(&n.to_be_bytes());
    out
}

fn payload(tenant: &str, credential: &str, version: u32, kind: u8, dek_version: u32) -> Ctx {
    Ctx::Payload {
        tenant: tenant.into(),
        credential: credential.into(),
        credential_version: version,
        kind,
        dek_version,
    }
}

fn dek_wrap(tenant: &str, dek_version: u32, kek_version: u32) -> Ctx {
    Ctx::DekWrap {
        tenant: tenant.into(),
        dek_version,
        kek_version,
    }
}

/// A sealed vector that passes, kept to derive fail vectors from.
struct Sealed {
    key: [u8; 32],
    context: Ctx,
    ciphertext: Vec<u8>,
}

#[derive(Default)]
struct Generator {
    files: Vec<(String, Vector)>,
    next_nonce: u32,
}

impl Generator {
    fn pass(
        &mut self,
        name: &str,
        description: &str,
        key: [u8; 32],
        key_version: u32,
        context: Ctx,
        plaintext: &[u8],
    ) -> Sealed {
        self.next_nonce += 1;
        let sealing_key = SymmetricKey::from_slice(&key).unwrap();
        let ciphertext = envelope::insecure_seal_with_nonce(
            &sealing_key,
            key_version,
            &context.to_context(),
            plaintext,
            nonce(self.next_nonce),
        );
        self.files.push((
            format!("pass_{name}.json"),
            Vector {
                description: description.into(),
                key: hex::encode(key),
                context: context.clone(),
                ciphertext: hex::encode(&ciphertext),
                key_version: Some(key_version),
                plaintext: Some(hex::encode(plaintext)),
            },
        ));
        Sealed {
            key,
            context,
            ciphertext,
        }
    }

    /// `base`'s ciphertext, changed by `mutate`, opened under `key` and `context`.
    fn fail(
        &mut self,
        name: &str,
        description: &str,
        base: &Sealed,
        key: Option<[u8; 32]>,
        context: Option<Ctx>,
        mutate: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut ciphertext = base.ciphertext.clone();
        mutate(&mut ciphertext);
        self.files.push((
            format!("fail_{name}.json"),
            Vector {
                description: description.into(),
                key: hex::encode(key.unwrap_or(base.key)),
                context: context.unwrap_or_else(|| base.context.clone()),
                ciphertext: hex::encode(&ciphertext),
                key_version: None,
                plaintext: None,
            },
        ));
    }
}

fn generate() -> Vec<(String, Vector)> {
    let mut g = Generator::default();
    let v = DEK_VERSION;

    // Payloads, one per kind (1 cookie jar, 2 API key, 3 OAuth token, 4 generic).
    let cookie = g.pass(
        "payload_cookie_jar",
        "payload, kind 1 (cookie jar), sealed by DEK v2",
        DEK,
        v,
        payload("acme", "mail.example.com", 3, 1, v),
        br#"[{"name":"SID","value":"31d4d96e407aad42","domain":".example.com"}]"#,
    );
    g.pass(
        "payload_api_key",
        "payload, kind 2 (API key), sealed by DEK v2",
        DEK,
        v,
        payload("acme", "openai", 1, 2, v),
        b"sk-test-0123456789",
    );
    g.pass(
        "payload_oauth_token",
        "payload, kind 3 (OAuth token), sealed by DEK v2",
        DEK,
        v,
        payload("acme", "github/oauth", 7, 3, v),
        br#"{"access_token":"gho_16C7e42F292c6912E7710c838347Ae178B4a","token_type":"bearer"}"#,
    );
    g.pass(
        "payload_generic",
        "payload, kind 4 (generic), sealed by DEK v2",
        DEK,
        v,
        payload("acme", "db:password@prod", 2, 4, v),
        b"correct horse battery staple",
    );
    g.pass(
        "payload_empty",
        "payload with an empty plaintext: the envelope is header and tag only",
        DEK,
        v,
        payload("acme", "empty", 1, 4, v),
        b"",
    );
    let large: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
    g.pass(
        "payload_2kib",
        "payload of 2 KiB (a cookie jar), bytes (7*i mod 251)",
        DEK,
        v,
        payload("acme", "shop.example.com", 12, 1, v),
        &large,
    );
    g.pass(
        "payload_big_endian",
        "payload whose versions use all four bytes (big-endian encoding), DEK v0x0a0b0c0d",
        DEK,
        0x0a0b_0c0d,
        payload("tenant_9-Z", "a.b:c/d@e-f", 0x0102_0304, 2, 0x0a0b_0c0d),
        b"big-endian",
    );
    g.pass(
        "payload_longest_ids",
        "payload with the longest ids allowed (64-byte tenant, 256-byte credential)",
        DEK,
        v,
        payload(&"t".repeat(64), &"c".repeat(256), 1, 2, v),
        b"long ids",
    );

    // The key hierarchy: DEK wrapped by the KEK, KEK by the root key, root check.
    let dek = g.pass(
        "dek_wrap",
        "DEK v2 of tenant acme wrapped by KEK v1 (plaintext: the DEK of the payload vectors)",
        KEK,
        KEK_VERSION,
        dek_wrap("acme", v, KEK_VERSION),
        &DEK,
    );
    g.pass(
        "dek_wrap_rotated",
        "DEK v5 of tenant acme wrapped by KEK v3 (after rotations)",
        KEK,
        3,
        dek_wrap("acme", 5, 3),
        &DEK,
    );
    let kek = g.pass(
        "kek_wrap",
        "KEK v1 wrapped by root key v1 (plaintext: the KEK of the DEK wrap vectors)",
        ROOT_KEY,
        ROOT_VERSION,
        Ctx::KekWrap {
            kek_version: KEK_VERSION,
        },
        &KEK,
    );
    g.pass(
        "kek_wrap_root_v2",
        "KEK v4 wrapped by root key v2",
        ROOT_KEY,
        2,
        Ctx::KekWrap { kek_version: 4 },
        &KEK,
    );
    let root = g.pass(
        "root_check",
        "root key check value: root key v1 seals \"credvault root key check v1\"",
        ROOT_KEY,
        ROOT_VERSION,
        Ctx::RootCheck,
        envelope::ROOT_CHECK_PLAINTEXT,
    );

    // Single-field mutations of the cookie-jar payload's bytes.
    let last = cookie.ciphertext.len() - 1;
    g.fail(
        "format_byte",
        "pass_payload_cookie_jar with format byte 0x02",
        &cookie,
        None,
        None,
        |c| c[0] = 0x02,
    );
    g.fail(
        "key_version",
        "pass_payload_cookie_jar with header key version 3 instead of 2",
        &cookie,
        None,
        None,
        |c| c[4] = 0x03,
    );
    g.fail(
        "key_version_high_byte",
        "pass_payload_cookie_jar with the high bit of the header key version set",
        &cookie,
        None,
        None,
        |c| c[1] ^= 0x80,
    );
    g.fail(
        "nonce",
        "pass_payload_cookie_jar with the last nonce bit flipped",
        &cookie,
        None,
        None,
        |c| c[HEADER_LEN - 1] ^= 0x01,
    );
    g.fail(
        "ciphertext",
        "pass_payload_cookie_jar with the first ciphertext bit flipped",
        &cookie,
        None,
        None,
        |c| c[HEADER_LEN] ^= 0x80,
    );
    g.fail(
        "tag",
        "pass_payload_cookie_jar with the last tag bit flipped",
        &cookie,
        None,
        None,
        |c| c[last] ^= 0x01,
    );
    g.fail(
        "truncated",
        "pass_payload_cookie_jar without its last byte",
        &cookie,
        None,
        None,
        |c| c.truncate(last),
    );
    g.fail(
        "truncated_to_header",
        "pass_payload_cookie_jar cut to its 17-byte header",
        &cookie,
        None,
        None,
        |c| c.truncate(HEADER_LEN),
    );
    g.fail(
        "extended",
        "pass_payload_cookie_jar with a zero byte appended",
        &cookie,
        None,
        None,
        |c| c.push(0),
    );

    // The right cookie-jar payload opened under a wrong context or key.
    for (name, description, context) in [
        (
            "payload_other_tenant",
            "pass_payload_cookie_jar opened as tenant acme2",
            payload("acme2", "mail.example.com", 3, 1, v),
        ),
        (
            "payload_other_credential",
            "pass_payload_cookie_jar opened as credential mail.example.org",
            payload("acme", "mail.example.org", 3, 1, v),
        ),
        (
            "payload_other_credential_version",
            "pass_payload_cookie_jar opened as credential version 4",
            payload("acme", "mail.example.com", 4, 1, v),
        ),
        (
            "payload_other_kind",
            "pass_payload_cookie_jar opened as kind 4 (generic)",
            payload("acme", "mail.example.com", 3, 4, v),
        ),
        (
            "payload_other_dek_version",
            "pass_payload_cookie_jar opened with DEK version 1 in the context",
            payload("acme", "mail.example.com", 3, 1, 1),
        ),
        (
            "payload_shifted_ids",
            "pass_payload_cookie_jar opened as tenant acmemail. / credential example.com \
             (same concatenation; the length prefixes differ)",
            payload("acmemail.", "example.com", 3, 1, v),
        ),
        (
            "payload_as_dek_wrap",
            "pass_payload_cookie_jar opened as a DEK wrap (other label)",
            dek_wrap("acme", 3, v),
        ),
    ] {
        g.fail(name, description, &cookie, None, Some(context), |_| {});
    }
    g.fail(
        "payload_wrong_key",
        "pass_payload_cookie_jar opened with another key",
        &cookie,
        Some(WRONG_KEY),
        None,
        |_| {},
    );

    // Wrapped keys and the root check opened under a wrong context or key.
    g.fail(
        "dek_wrap_other_tenant",
        "pass_dek_wrap opened for tenant acme2",
        &dek,
        None,
        Some(dek_wrap("acme2", v, KEK_VERSION)),
        |_| {},
    );
    g.fail(
        "dek_wrap_other_dek_version",
        "pass_dek_wrap opened as DEK version 3",
        &dek,
        None,
        Some(dek_wrap("acme", 3, KEK_VERSION)),
        |_| {},
    );
    g.fail(
        "dek_wrap_other_kek_version",
        "pass_dek_wrap opened with KEK version 2 in the context",
        &dek,
        None,
        Some(dek_wrap("acme", v, 2)),
        |_| {},
    );
    g.fail(
        "dek_wrap_wrong_key",
        "pass_dek_wrap opened with another key",
        &dek,
        Some(WRONG_KEY),
        None,
        |_| {},
    );
    g.fail(
        "kek_wrap_other_kek_version",
        "pass_kek_wrap opened as KEK version 2",
        &kek,
        None,
        Some(Ctx::KekWrap { kek_version: 2 }),
        |_| {},
    );
    g.fail(
        "kek_wrap_as_root_check",
        "pass_kek_wrap opened as a root check (other label)",
        &kek,
        None,
        Some(Ctx::RootCheck),
        |_| {},
    );
    g.fail(
        "root_check_wrong_key",
        "pass_root_check opened with another root key",
        &root,
        Some(WRONG_KEY),
        None,
        |_| {},
    );
    g.files
}

#[test]
#[ignore = "rewrites tests/data/; run on purpose and review the diff"]
fn regenerate_vectors() {
    let dir = data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (_, path) in vector_files() {
        std::fs::remove_file(path).unwrap();
    }
    for (name, vector) in generate() {
        let mut text = serde_json::to_string_pretty(&vector).unwrap();
        text.push('\n');
        std::fs::write(dir.join(name), text).unwrap();
    }
    vectors_open_or_fail_as_named();
}
