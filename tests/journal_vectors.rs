//! Known-answer vectors of the audit journal's frames (docs/format.md, "The
//! audit journal"), checked in under `tests/data/audit_journal/`.
//!
//! Each file holds an audit key, the bytes of a journal (hex) and the frames a
//! reader must take from it, `[id, body]`. In `pass_*` files every frame
//! written is taken and the bytes are exactly what `encode_frame` writes for
//! them; in `fail_*` files the reader must stop before the damaged frame, so it
//! takes fewer. Regenerate with
//! `cargo test --test journal_vectors -- --ignored regenerate`.

use std::path::{Path, PathBuf};

use credvault::audit::journal::{decode_frames, encode_frame};
use ring::hmac;
use serde_json::{Value, json};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/audit_journal")
}

/// The audit key, which MACs the frames.
fn key(hex_text: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &hex::decode(hex_text).unwrap())
}

#[test]
fn journal_vectors_read_as_named() {
    let mut files: Vec<_> = std::fs::read_dir(data_dir())
        .expect("tests/data/audit_journal exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let key = key(v["audit_key"].as_str().unwrap());
        let bytes = hex::decode(v["journal"].as_str().unwrap()).unwrap();
        let taken: Vec<(u64, String)> = decode_frames(&key, &bytes)
            .into_iter()
            .map(|(id, body)| (id, hex::encode(body)))
            .collect();
        let want: Vec<(u64, String)> = v["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f[0].as_u64().unwrap(), f[1].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(taken, want, "{name}");
        let written = v["frames_written"].as_u64().unwrap() as usize;
        if name.starts_with("pass_") {
            assert_eq!(taken.len(), written, "{name}: every frame is taken");
            let mut again = Vec::new();
            for (id, body) in &want {
                encode_frame(&key, *id, &hex::decode(body).unwrap(), &mut again);
            }
            assert_eq!(
                hex::encode(&again),
                hex::encode(&bytes[..again.len()]),
                "{name}: the bytes are what encode_frame writes"
            );
        } else {
            assert!(name.starts_with("fail_"), "{name}");
            assert!(taken.len() < written, "{name}: the damaged frame is taken");
        }
    }
}

fn journal(key: &hmac::Key, frames: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, body) in frames {
        encode_frame(key, *id, body, &mut out);
    }
    out
}

#[test]
#[ignore = "writes tests/data/audit_journal/"]
fn regenerate() {
    let audit_key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let k = key(audit_key);
    let other = key(&"ab".repeat(32));
    // Bodies are audit Records with `mac` empty; any bytes frame the same.
    let a: &[u8] = b"\x08\x80\xd0\x95\xc9\xbb\x31\x12\x04exec\x1a\x06Unseal";
    let b: &[u8] = b"\x1a\x0bGetMetadata";
    let c: &[u8] = b"\x1a\x06Unseal\x22\x04acme";
    let good = journal(&k, &[(7, a), (8, b), (9, c)]);
    let first_two = journal(&k, &[(7, a), (8, b)]);
    let mut zeros_after = good.clone();
    zeros_after.extend_from_slice(&[0; 64]);
    let mut torn = first_two.clone();
    let third = journal(&k, &[(9, c)]);
    torn.extend_from_slice(&third[..third.len() - 3]);
    torn.extend_from_slice(&[0; 3]);
    let mut edited = good.clone();
    let at = first_two.len() + 12; // the third frame's first body byte
    edited[at] ^= 0x01;
    let mut forged = first_two.clone();
    forged.extend(journal(&other, &[(9, c)]));
    let mut gap = first_two.clone();
    gap.extend(journal(&k, &[(10, c)]));
    let mut stale = first_two.clone();
    stale.extend(journal(&k, &[(3, c)]));
    let two = json!([[7, hex::encode(a)], [8, hex::encode(b)]]);
    let three = json!([
        [7, hex::encode(a)],
        [8, hex::encode(b)],
        [9, hex::encode(c)]
    ]);
    let files = [
        ("pass_three_frames.json", &good, &three, 3),
        ("pass_zeros_after_the_newest.json", &zeros_after, &three, 3),
        ("fail_torn_last_frame.json", &torn, &two, 3),
        ("fail_edited_body.json", &edited, &two, 3),
        ("fail_forged_mac.json", &forged, &two, 3),
        ("fail_id_gap.json", &gap, &two, 3),
        ("fail_stale_older_frame.json", &stale, &two, 3),
    ];
    std::fs::create_dir_all(data_dir()).unwrap();
    for (name, bytes, frames, written) in files {
        let v = json!({
            "audit_key": audit_key,
            "journal": hex::encode(bytes),
            "frames": frames,
            "frames_written": written,
        });
        std::fs::write(
            data_dir().join(name),
            serde_json::to_string_pretty(&v).unwrap() + "\n",
        )
        .unwrap();
    }
}
