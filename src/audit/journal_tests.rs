use super::*;
use crate::audit::{AuditFilter, AuditLog, NewRecord};
use crate::clock::ManualClock;
use crate::crypto::SymmetricKey;
use crate::store::{SledStore, StoreOptions};

const T0: u64 = 1_700_000_000_000;
const KEY: [u8; 32] = [0x5A; 32];

fn audit_key() -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &KEY)
}

fn open_store(dir: &Path) -> Arc<SledStore> {
    Arc::new(SledStore::open(&StoreOptions::new(dir)).unwrap())
}

async fn open_log(store: Arc<dyn Store>) -> AuditLog {
    let key = SymmetricKey::from_slice(&KEY).unwrap();
    AuditLog::open(store, Arc::new(ManualClock::new(T0)), &key, LINGER)
        .await
        .unwrap()
}

fn record(purpose: &str) -> NewRecord {
    NewRecord {
        caller: "spiffe://credvault/executor/runner-1".into(),
        rpc: "Unseal".into(),
        tenant: "acme".into(),
        credential: "gmail/alice".into(),
        version: 1,
        purpose: purpose.into(),
        outcome: "ok".into(),
    }
}

/// The purposes of every record in the log, in log order.
fn purposes(log: &AuditLog) -> Vec<String> {
    log.query(&AuditFilter::default(), MAX_PAGE, None)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.record.purpose)
        .collect()
}
const MAX_PAGE: usize = crate::audit::MAX_PAGE_SIZE;

/// Writes frames after the valid ones at the start of the journal in `dir`,
/// as a server killed after making them durable would have left them.
fn append_frames(dir: &Path, frames: &[u8]) {
    let path = dir.join(FILE_NAME);
    let bytes = std::fs::read(&path).unwrap();
    let end: usize = decode_frames(&audit_key(), &bytes)
        .iter()
        .map(|(_, body)| HEADER + body.len() + MAC)
        .sum();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(frames, end as u64).unwrap();
}

fn frame(key: &hmac::Key, id: u64, purpose: &str) -> Vec<u8> {
    let body = Record {
        at_ms: T0,
        purpose: purpose.into(),
        rpc: "Unseal".into(),
        ..Record::default()
    }
    .encode_to_vec();
    let mut out = Vec::new();
    encode_frame(key, id, &body, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_reach_the_log_once_each_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let log = open_log(store.clone()).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(record(&format!("p{i}"))).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // A read of the log sees every record acknowledged before it.
    let mut seen = purposes(&log);
    seen.sort();
    let mut want: Vec<String> = (0..64).map(|i| format!("p{i}")).collect();
    want.sort();
    assert_eq!(seen, want);
    assert!(log.verify().unwrap().ok);
    assert_eq!(store.get(FED).unwrap(), Some(64u64.to_be_bytes().to_vec()));
}

#[tokio::test]
async fn closing_feeds_every_record_into_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let log = open_log(store.clone()).await;
    for i in 0..5 {
        log.record(record(&format!("p{i}"))).await.unwrap();
    }
    drop(log);
    // The store alone, without a journal, holds them all.
    let key = SymmetricKey::from_slice(&KEY).unwrap();
    let plain = AuditLog::new(store, Arc::new(ManualClock::new(T0)), &key);
    assert_eq!(purposes(&plain), ["p0", "p1", "p2", "p3", "p4"]);
}

#[tokio::test]
async fn frames_a_crash_left_are_appended_once_when_the_log_opens() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(open_store(dir.path())).await;
    for i in 1..=3 {
        log.record(record(&format!("p{i}"))).await.unwrap();
    }
    drop(log);
    let key = audit_key();
    append_frames(
        dir.path(),
        &[frame(&key, 4, "crash-4"), frame(&key, 5, "crash-5")].concat(),
    );

    let log = open_log(open_store(dir.path())).await;
    assert_eq!(purposes(&log), ["p1", "p2", "p3", "crash-4", "crash-5"]);
    assert!(log.verify().unwrap().ok);
    // Ids go on past them; opening again appends nothing twice.
    log.record(record("p6")).await.unwrap();
    drop(log);
    let log = open_log(open_store(dir.path())).await;
    assert_eq!(
        purposes(&log),
        ["p1", "p2", "p3", "crash-4", "crash-5", "p6"]
    );
    assert!(log.verify().unwrap().ok);
}

#[tokio::test]
async fn frames_that_do_not_open_or_do_not_follow_on_are_not_appended() {
    let key = audit_key();
    let forger = hmac::Key::new(hmac::HMAC_SHA256, &[0x11; 32]);
    let good = frame(&key, 4, "after");
    let mut torn = frame(&key, 4, "torn");
    torn.truncate(torn.len() - 5);
    let cases: [(&str, Vec<u8>); 4] = [
        // Someone with write access to the files but not the audit key.
        (
            "forged",
            [frame(&forger, 4, "forged"), good.clone()].concat(),
        ),
        // A write the kill cut short (zeros follow in the preallocated file).
        ("torn", torn),
        // A frame that does not follow the last one: stale, or moved.
        (
            "gap",
            [frame(&key, 6, "gap"), frame(&key, 7, "gap")].concat(),
        ),
        // An old frame (its id is in the log already) is never appended again.
        ("old", frame(&key, 2, "old")),
    ];
    for (case, frames) in cases {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(open_store(dir.path())).await;
        for i in 1..=3 {
            log.record(record(&format!("p{i}"))).await.unwrap();
        }
        drop(log);
        append_frames(dir.path(), &frames);
        let log = open_log(open_store(dir.path())).await;
        assert_eq!(purposes(&log), ["p1", "p2", "p3"], "{case}");
        assert!(log.verify().unwrap().ok, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_rewritten_from_its_start_and_nothing_is_appended_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(open_store(dir.path())).await;
    // About 150 bytes a frame: several times the 64 KiB file of test builds.
    let total = 1500;
    for chunk in 0..total / 100 {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(
                    async move { log.record(record(&format!("p{}", chunk * 100 + i))).await },
                )
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    }
    let size = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
    assert_eq!(size, FILE_BYTES, "the journal stays its preallocated size");
    drop(log);
    let log = open_log(open_store(dir.path())).await;
    let verification = log.verify().unwrap();
    assert!(verification.ok);
    assert_eq!(verification.records, total);
    let export = log.export(0, usize::MAX).unwrap();
    let mut seen: Vec<String> = export.into_iter().map(|e| e.record.purpose).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, total);
}
