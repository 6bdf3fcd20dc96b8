use std::sync::Arc;

use prost::Message;
use ring::hmac;

use super::*;
use crate::clock::ManualClock;
use crate::store::{SledStore, StoreOptions};

const T0: u64 = 1_700_000_000_000;
const KEY: [u8; 32] = [0xAB; 32];

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    clock: Arc<ManualClock>,
    log: AuditLog,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&StoreOptions::new(dir.path())).unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let key = SymmetricKey::from_slice(&KEY).unwrap();
    let log = AuditLog::new(store.clone(), clock.clone(), &key);
    Fixture {
        _dir: dir,
        store,
        clock,
        log,
    }
}

fn unseal(i: u64) -> NewRecord {
    NewRecord {
        caller: format!("spiffe://credvault/executor/runner-{}", i % 3),
        rpc: "Unseal".into(),
        tenant: ["acme", "globex"][(i % 2) as usize].into(),
        credential: format!("gmail/user-{}", i % 4),
        version: 1,
        purpose: format!("task-{i}"),
        outcome: if i.is_multiple_of(5) {
            "PERMISSION_DENIED"
        } else {
            "ok"
        }
        .into(),
    }
}

impl Fixture {
    /// Records `n` decisions, 1 s apart, starting at the clock's time.
    async fn fill(&self, n: u64) {
        for i in 0..n {
            self.log.record(unseal(i)).await.unwrap();
            self.clock.advance_ms(1000);
        }
    }

    fn value(&self, seq: u64) -> Vec<u8> {
        self.store.get(&log_key(PREFIX, seq)).unwrap().unwrap()
    }

    /// Writes the store directly, as an attacker with write access could.
    async fn tamper(&self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) {
        let mut batch = Batch::default();
        for (k, v) in puts {
            batch.put(k, v);
        }
        for k in deletes {
            batch.delete(k);
        }
        self.store.commit(batch).await.unwrap();
    }

    fn bad_at(&self) -> Option<u64> {
        let v = self.log.verify().unwrap();
        assert_eq!(v.ok, v.first_bad_sequence.is_none(), "{v:?}");
        v.first_bad_sequence
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_are_contiguous_and_verify() {
    let f = fixture();
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let log = f.log.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..10 {
                    seqs.push(log.record_in_store(unseal(t * 10 + i)).await.unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=320).collect::<Vec<u64>>());
    let v = f.log.verify().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(
        (v.records, v.first_sequence, v.last_sequence),
        (320, 1, 320)
    );
}

#[tokio::test]
async fn append_joins_the_batch_and_a_failed_check_appends_nothing() {
    let f = fixture();
    let mut batch = Batch::default();
    batch
        .put(b"x".to_vec(), b"1".to_vec())
        .add(b"n".to_vec(), 3);
    let at = f.log.append(&mut batch, unseal(1));
    assert_eq!(at, 1);
    assert_eq!(f.store.commit(batch).await.unwrap(), [3, 1]);

    let mut batch = Batch::default();
    batch.check(b"x".to_vec(), None);
    f.log.append(&mut batch, unseal(2));
    assert!(matches!(
        f.store.commit(batch).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(f.log.record_in_store(unseal(3)).await.unwrap(), 2);
    let v = f.log.verify().unwrap();
    assert!(v.ok && v.records == 2, "{v:?}");
    let purposes: Vec<_> = f
        .log
        .export(0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.record.purpose)
        .collect();
    assert_eq!(purposes, ["task-1", "task-3"]);
}

#[tokio::test]
async fn an_empty_log_verifies() {
    let f = fixture();
    let v = f.log.verify().unwrap();
    assert!(v.ok && v.records == 0 && v.last_sequence == 0, "{v:?}");
}

#[tokio::test]
async fn verify_names_an_edited_record() {
    let f = fixture();
    f.fill(10).await;
    let original = f.value(4);
    let mut record = Record::decode(original.as_slice()).unwrap();
    record.outcome = "ok".into();
    record.purpose = "nothing to see".into();
    f.tamper(vec![(log_key(PREFIX, 4), record.encode_to_vec())], vec![])
        .await;
    assert_eq!(f.bad_at(), Some(4));

    // Bytes the MAC does not cover (an unknown field) count as an edit too.
    let mut extended = original.clone();
    extended.extend_from_slice(&[0x50, 0x01]); // field 10, varint 1
    f.tamper(vec![(log_key(PREFIX, 4), extended)], vec![]).await;
    assert_eq!(f.bad_at(), Some(4));

    f.tamper(vec![(log_key(PREFIX, 4), original)], vec![]).await;
    assert_eq!(f.bad_at(), None);
    let mut flipped = f.value(9);
    flipped[3] ^= 1;
    f.tamper(vec![(log_key(PREFIX, 9), flipped)], vec![]).await;
    assert_eq!(f.bad_at(), Some(9));
}

#[tokio::test]
async fn verify_names_a_deleted_middle_record() {
    let f = fixture();
    f.fill(10).await;
    f.tamper(vec![], vec![log_key(PREFIX, 5), log_key(PREFIX, 6)])
        .await;
    let v = f.log.verify().unwrap();
    assert_eq!(v.first_bad_sequence, Some(5));
    assert_eq!((v.records, v.last_sequence), (4, 4));
    assert!(v.reason.contains("missing"), "{}", v.reason);
}

#[tokio::test]
async fn verify_names_the_first_of_swapped_records() {
    let f = fixture();
    f.fill(10).await;
    let (three, seven) = (f.value(3), f.value(7));
    f.tamper(
        vec![(log_key(PREFIX, 3), seven), (log_key(PREFIX, 7), three)],
        vec![],
    )
    .await;
    assert_eq!(f.bad_at(), Some(3));
}

#[tokio::test]
async fn verify_names_a_record_forged_without_the_key() {
    let f = fixture();
    f.fill(10).await;
    // Chained correctly to record 10, but under another key.
    let other = hmac::Key::new(hmac::HMAC_SHA256, &[0xCD; 32]);
    let prev = chain::link(&other, Some(&f.value(10)));
    let forged = chain::seal(&other, 11, &prev, Record::default());
    f.tamper(vec![(log_key(PREFIX, 11), forged)], vec![]).await;
    assert_eq!(f.bad_at(), Some(11));
    // Nor can a deleted record be inserted back at another place.
    f.tamper(vec![(log_key(PREFIX, 11), f.value(2))], vec![])
        .await;
    assert_eq!(f.bad_at(), Some(11));
}

#[tokio::test]
async fn verify_names_an_edited_or_rolled_back_anchor() {
    let f = fixture();
    f.fill(12).await;
    let two = f.value(2);
    assert_eq!(f.log.prune(T0 + 3000).await.unwrap(), 3);
    // A pruned record put back.
    f.tamper(vec![(log_key(PREFIX, 2), two)], vec![]).await;
    assert_eq!(f.bad_at(), Some(2));
    f.tamper(vec![], vec![log_key(PREFIX, 2)]).await;
    let first_anchor = f.store.get(ANCHOR).unwrap().unwrap();
    assert_eq!(f.log.prune(T0 + 6000).await.unwrap(), 3);
    let anchor = f.store.get(ANCHOR).unwrap().unwrap();
    assert_eq!(f.bad_at(), None);

    let mut edited = Anchor::decode(anchor.as_slice()).unwrap();
    edited.pruned_before_ms = T0;
    f.tamper(vec![(ANCHOR.to_vec(), edited.encode_to_vec())], vec![])
        .await;
    assert_eq!(f.bad_at(), Some(7));

    // An older genuine anchor: the records it promises are gone.
    f.tamper(vec![(ANCHOR.to_vec(), first_anchor)], vec![])
        .await;
    assert_eq!(f.bad_at(), Some(4));
    // No anchor at all: record 1 is missing.
    f.tamper(vec![], vec![ANCHOR.to_vec()]).await;
    assert_eq!(f.bad_at(), Some(1));
    f.tamper(vec![(ANCHOR.to_vec(), b"junk".to_vec())], vec![])
        .await;
    assert_eq!(f.bad_at(), Some(0));
    f.tamper(vec![(ANCHOR.to_vec(), anchor)], vec![]).await;
    assert_eq!(f.bad_at(), None);
}

#[tokio::test]
async fn prune_keeps_the_newest_and_the_chain_verifiable() {
    let f = fixture();
    f.fill(20).await; // at T0, T0 + 1 s, …, T0 + 19 s
    assert_eq!(f.log.prune(T0).await.unwrap(), 0);
    assert_eq!(f.store.get(ANCHOR).unwrap(), None);

    // 10 records, more than one batch (CHUNK is 7 in tests).
    assert_eq!(f.log.prune(T0 + 10_000).await.unwrap(), 10);
    let v = f.log.verify().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.first_sequence, v.records, v.last_sequence), (11, 10, 20));

    // Everything older than the future: all but the newest; the anchor moves on.
    assert_eq!(f.log.prune(u64::MAX).await.unwrap(), 9);
    let anchor = Anchor::decode(f.store.get(ANCHOR).unwrap().unwrap().as_slice()).unwrap();
    assert_eq!(
        (anchor.first_sequence, anchor.pruned_before_ms),
        (20, u64::MAX)
    );
    assert_eq!(f.log.prune(u64::MAX).await.unwrap(), 0);
    let v = f.log.verify().unwrap();
    assert!(v.ok && v.records == 1 && v.first_sequence == 20, "{v:?}");

    // Appending continues the chain from the kept record.
    assert_eq!(f.log.record_in_store(unseal(99)).await.unwrap(), 21);
    assert_eq!(f.log.prune(u64::MAX).await.unwrap(), 1);
    let v = f.log.verify().unwrap();
    assert!(
        v.ok && v.first_sequence == 21 && v.last_sequence == 21,
        "{v:?}"
    );
}

#[tokio::test]
async fn prune_refuses_to_delete_a_broken_chain() {
    let f = fixture();
    f.fill(10).await;
    let mut flipped = f.value(3);
    flipped[2] ^= 1;
    f.tamper(vec![(log_key(PREFIX, 3), flipped)], vec![]).await;
    let err = f.log.prune(u64::MAX).await.unwrap_err();
    assert!(
        matches!(err, AuditError::ChainBroken { sequence: 3, .. }),
        "{err}"
    );
    assert_eq!(err.reason(), "AUDIT_CHAIN_BROKEN");
    // The batch that would have deleted records 1 and 2 was never committed.
    assert_eq!(f.store.get(ANCHOR).unwrap(), None);
    assert_eq!(f.bad_at(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_prunes_do_not_interleave() {
    let f = fixture();
    f.fill(40).await;
    let (a, b) = (f.log.clone(), f.log.clone());
    let (x, y) = tokio::join!(
        tokio::spawn(async move { a.prune(T0 + 30_000).await }),
        tokio::spawn(async move { b.prune(u64::MAX).await })
    );
    let total = x.unwrap().unwrap() + y.unwrap().unwrap();
    assert_eq!(total, 39);
    let v = f.log.verify().unwrap();
    assert!(v.ok && v.first_sequence == 40 && v.records == 1, "{v:?}");
}

#[tokio::test]
async fn query_filters_and_pages() {
    let f = fixture();
    f.fill(130).await;
    let all = |filter: &AuditFilter, page_size: usize| {
        let mut entries = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = f.log.query(filter, page_size, token.as_deref()).unwrap();
            assert!(page.entries.len() <= page_size);
            entries.extend(page.entries);
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return entries,
            }
        }
    };
    let seqs = |entries: Vec<AuditEntry>| entries.iter().map(|e| e.sequence).collect::<Vec<_>>();
    let expect = |keep: &dyn Fn(u64) -> bool| {
        (0..130)
            .filter(|i| keep(*i))
            .map(|i| i + 1)
            .collect::<Vec<_>>()
    };

    let any = AuditFilter::default();
    assert_eq!(seqs(all(&any, 9)), expect(&|_| true));
    let first = f.log.query(&any, 0, None).unwrap();
    assert_eq!(first.entries.len(), DEFAULT_PAGE_SIZE);
    assert_eq!(first.next_page_token.as_deref(), Some("100"));
    let rest = f.log.query(&any, 0, Some("100")).unwrap();
    assert_eq!(seqs(rest.entries), (101..=130).collect::<Vec<_>>());
    assert_eq!(rest.next_page_token, None);

    let tenant = AuditFilter {
        tenant: Some("globex".into()),
        ..Default::default()
    };
    assert_eq!(seqs(all(&tenant, 4)), expect(&|i| i % 2 == 1));
    let credential = AuditFilter {
        credential: Some("gmail/user-2".into()),
        ..Default::default()
    };
    assert_eq!(seqs(all(&credential, 5)), expect(&|i| i % 4 == 2));
    let caller = AuditFilter {
        caller: Some("spiffe://credvault/executor/runner-0".into()),
        outcome: Some("PERMISSION_DENIED".into()),
        ..Default::default()
    };
    assert_eq!(seqs(all(&caller, 2)), expect(&|i| i % 15 == 0));
    let window = AuditFilter {
        from_ms: Some(T0 + 10_000),
        to_ms: Some(T0 + 20_000),
        tenant: Some("acme".into()),
        ..Default::default()
    };
    assert_eq!(
        seqs(all(&window, 3)),
        expect(&|i| (10..20).contains(&i) && i % 2 == 0)
    );
    let nothing = AuditFilter {
        tenant: Some("initech".into()),
        ..Default::default()
    };
    assert_eq!(f.log.query(&nothing, 10, None).unwrap().entries, []);

    for bad in [
        "",
        "abc",
        "-1",
        "+1",
        "1.0",
        " 1",
        "99999999999999999999999",
    ] {
        let err = f.log.query(&any, 10, Some(bad)).unwrap_err();
        assert_eq!(err.reason(), "INVALID_PAGE_TOKEN", "{bad:?}");
    }
    // A token past the end is simply an empty page.
    assert_eq!(f.log.query(&any, 10, Some("500")).unwrap().entries, []);
}

#[tokio::test]
async fn export_pages_json_lines() {
    let f = fixture();
    f.fill(5).await;
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let entries = f.log.export(after, 2).unwrap();
        let Some(last) = entries.last() else { break };
        after = last.sequence;
        lines.extend(entries.iter().map(|e| e.to_json().to_string()));
    }
    assert_eq!(lines.len(), 5);
    let third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(third["sequence"], 3);
    assert_eq!(third["at_ms"], T0 + 2000);
    assert_eq!(third["rpc"], "Unseal");
    assert_eq!(third["purpose"], "task-2");
    assert_eq!(third["mac"].as_str().unwrap().len(), 64);
    assert!(!lines[2].contains('\n'));
}

#[tokio::test]
async fn an_unseal_record_holds_no_secret() {
    let f = fixture();
    let secret = b"SID=abc123; HSID=def456";
    let mut request = unseal(1);
    request.purpose = "task-42".into();
    f.log.record(request).await.unwrap();
    let rows = f.store.scan(b"", None, usize::MAX).unwrap();
    assert!(!rows.is_empty());
    for (key, value) in rows {
        for bytes in [key, value] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        }
    }
    let entry = &f.log.export(0, 1).unwrap()[0];
    assert_eq!(entry.record.purpose, "task-42");
}

#[tokio::test]
async fn long_fields_are_capped_at_a_char_boundary() {
    let f = fixture();
    let mut request = unseal(1);
    request.tenant = "é".repeat(2000);
    request.purpose = "short".into();
    f.log.record(request).await.unwrap();
    let record = &f.log.export(0, 1).unwrap()[0].record;
    assert!(record.tenant.len() <= MAX_FIELD_BYTES && record.tenant.ends_with('…'));
    assert_eq!(record.purpose, "short");
    assert!(f.log.verify().unwrap().ok);
}

#[test]
fn debug_shows_no_key() {
    let f = fixture();
    let shown = format!("{:?}", f.log);
    assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
}

#[test]
fn an_undecodable_previous_entry_is_linked_by_its_bytes() {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &KEY);
    assert_eq!(chain::link(&key, None), [0; MAC_LEN]);
    let junk = chain::link(&key, Some(b"junk"));
    assert_ne!(junk, [0; MAC_LEN]);
    assert_ne!(junk, chain::link(&key, Some(b"junk2")));
    let sealed = chain::seal(&key, 1, &[0; MAC_LEN], Record::default());
    let mac = Record::decode(sealed.as_slice()).unwrap().mac;
    assert_eq!(chain::link(&key, Some(&sealed)).as_slice(), mac.as_slice());
}

#[test]
fn a_head_parses_from_and_prints_as_sequence_colon_mac() {
    let head = Head::new(42, &[0xAB; MAC_LEN]).unwrap();
    let text = head.to_string();
    assert_eq!(text, format!("42:{}", "ab".repeat(MAC_LEN)));
    assert_eq!(text.parse::<Head>(), Ok(head));
    assert_eq!(text.to_uppercase().parse::<Head>(), Ok(head));
    let mac = "ab".repeat(MAC_LEN);
    for bad in [
        String::new(),
        "42".into(),
        format!("0:{mac}"),
        format!("-1:{mac}"),
        format!("x:{mac}"),
        format!("42:{}", &mac[2..]),
        format!("42:{mac}00"),
        format!("42:{}zz", &mac[2..]),
        format!("42:{mac}:1"),
    ] {
        assert_eq!(bad.parse::<Head>(), Err(InvalidHead), "{bad:?}");
    }
}

#[tokio::test]
async fn verify_against_a_head_catches_the_newest_records_cut_off() {
    let f = fixture();
    assert_eq!(f.log.head().unwrap(), None);
    f.fill(10).await;
    let head = f.log.head().unwrap().unwrap();
    assert_eq!(head.sequence, 10);
    let v = f.log.verify().unwrap();
    assert_eq!((v.head, v.head_check), (Some(head), HeadCheck::NotGiven));
    let v = f.log.verify_against(Some(head)).unwrap();
    assert!(v.ok && v.head_check == HeadCheck::Matched, "{v:?}");

    // The log grows: an older head still matches, and the new head is reported.
    let older = Head::new(7, &Record::decode(f.value(7).as_slice()).unwrap().mac).unwrap();
    f.fill(3).await;
    let v = f.log.verify_against(Some(older)).unwrap();
    assert!(v.ok && v.head_check == HeadCheck::Matched, "{v:?}");
    assert_eq!(v.head.map(|h| h.sequence), Some(13));

    // Cut records 8..=13: the rest is a valid chain, but not against head 10.
    let cut = (8..=13).map(|seq| log_key(PREFIX, seq)).collect();
    f.tamper(Vec::new(), cut).await;
    let v = f.log.verify().unwrap();
    assert!(
        v.ok && v.last_sequence == 7,
        "the chain alone cannot tell: {v:?}"
    );
    let v = f.log.verify_against(Some(head)).unwrap();
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_sequence, Some(8));
    assert_eq!(v.head_check, HeadCheck::NotGiven);
    assert!(v.reason.contains("cut off"), "{}", v.reason);
    assert!(f.log.verify_against(Some(older)).unwrap().ok);

    // A head with another MAC, or from a log that was never this one.
    let mut other = older;
    other.mac[0] ^= 1;
    let v = f.log.verify_against(Some(other)).unwrap();
    assert_eq!(v.first_bad_sequence, Some(7), "{v:?}");
    let v = fixture().log.verify_against(Some(older)).unwrap();
    assert_eq!(v.first_bad_sequence, Some(1), "an empty log: {v:?}");
}

#[tokio::test]
async fn a_pruned_head_is_checked_against_the_anchor_or_passed() {
    let f = fixture();
    f.fill(20).await; // at T0, T0 + 1 s, …
    let head_at =
        |seq| Head::new(seq, &Record::decode(f.value(seq).as_slice()).unwrap().mac).unwrap();
    let (h5, h10) = (head_at(5), head_at(10));
    assert_eq!(f.log.prune(T0 + 10_000).await.unwrap(), 10); // records 1..=10 go

    // Record 10 is gone, but the anchor holds its MAC.
    let v = f.log.verify_against(Some(h10)).unwrap();
    assert!(v.ok && v.first_sequence == 11, "{v:?}");
    assert_eq!(v.head_check, HeadCheck::Matched);
    let mut other = h10;
    other.mac[31] ^= 0x80;
    assert_eq!(
        f.log
            .verify_against(Some(other))
            .unwrap()
            .first_bad_sequence,
        Some(10)
    );

    // Record 5 and its successor are gone: nothing to compare, the log reaches past it.
    let v = f.log.verify_against(Some(h5)).unwrap();
    assert!(v.ok && v.head_check == HeadCheck::Pruned, "{v:?}");
}

#[test]
fn a_sealed_record_is_its_protobuf_with_the_mac_and_walks() {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &KEY);
    let mut walk = chain::Walk::start(&key, None).unwrap();
    for i in [0u64, 1, 5, 12] {
        let n = unseal(i);
        let record = Record {
            at_ms: T0 + i,
            caller: n.caller,
            rpc: n.rpc,
            tenant: n.tenant,
            credential: n.credential,
            version: n.version,
            purpose: "p".repeat(i as usize * 40),
            outcome: n.outcome,
            mac: Vec::new(),
        };
        let seq = walk.next;
        let stored = chain::seal(&key, seq, &walk.prev_mac, record.clone());
        // What prost writes for the record with its MAC set.
        let mac = stored[stored.len() - MAC_LEN..].to_vec();
        let with_mac = Record { mac, ..record };
        assert_eq!(stored, with_mac.encode_to_vec(), "record {i}");
        assert_eq!(
            walk.step(&log_key(PREFIX, seq), &stored),
            Ok(with_mac),
            "record {i}"
        );
    }
}
