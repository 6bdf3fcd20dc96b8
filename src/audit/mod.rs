//! The audit log: every RPC decision, allowed or denied, chained by HMAC so that
//! tampering with the stored log is evident. Never secret bytes.
//!
//! Records live at `a\0{seq:u64}` (big-endian, numbered by the store in commit
//! order without gaps); the anchor that lets old records be pruned lives at
//! `m\0audit.anchor`. Each record's MAC covers its sequence number, its body and
//! the previous record's MAC (see [`chain`] for the exact bytes), under an
//! audit key that the store holds only wrapped.
//!
//! # What [`AuditLog::verify`] detects
//!
//! Someone who can write the store but does not hold the audit key cannot edit
//! a record (any byte), delete one from the middle, reorder or swap records,
//! insert or append a forged one, put back a pruned one, or edit, roll back or
//! delete the anchor without `verify` failing and naming the first bad
//! sequence number.
//!
//! It cannot detect on its own the newest records being cut off: what is left
//! is a valid chain. That takes something outside the store: a [`Head`] (the
//! sequence number and MAC of a record once at the head of the log, which the
//! server logs as it grows) given to [`AuditLog::verify_against`], or an
//! exported copy (`export` with each record's MAC). Nor does it
//! bind a record to the moment it was written: `at_ms` is what the server's
//! clock said, and someone holding the audit key can rewrite the whole log.

mod chain;
pub mod journal;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use prost::Message;
use ring::hmac;

use crate::clock::Clock;
use crate::crypto::SymmetricKey;
use crate::store::{Batch, Op, Store, StoreError, log_key};

pub use chain::{Anchor, MAC_LEN, Record};
use chain::{Broken, Walk, sequence_of};

/// Prefix of every audit record's key.
pub const PREFIX: &[u8] = crate::store::layout::AUDIT;
/// Key of the anchor.
pub const ANCHOR: &[u8] = b"m\0audit.anchor";
/// Page size when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest text field kept, in bytes; longer ones (say, the id in a denied,
/// oversize request) are cut at a character boundary and marked with `…`.
pub const MAX_FIELD_BYTES: usize = 1024;
/// Records read per store scan (and deleted per prune batch).
const CHUNK: usize = if cfg!(test) { 7 } else { 512 };
/// `verify` runs again when it fails, before reporting: a scan is not a
/// snapshot, so a concurrent prune can look like a gap. Tampering persists.
const VERIFY_ATTEMPTS: usize = 3;

/// A failure of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The page token is not one [`AuditLog::query`] handed out.
    #[error("page token is malformed")]
    InvalidPageToken,
    /// A stored record does not decode (tampering or a bug); `verify` says more.
    #[error("audit record {sequence} does not decode")]
    Corrupt { sequence: u64 },
    /// `prune` found the chain broken and deleted nothing more: deleting would
    /// hide the evidence.
    #[error("the audit chain is broken at sequence {sequence} ({reason}); nothing more was pruned")]
    ChainBroken { sequence: u64, reason: String },
    /// The store failed; a record that was being written is not durable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit journal failed (or is closing); a record that was being
    /// written is not durable.
    #[error("audit journal: {0}")]
    Journal(String),
}

impl AuditError {
    /// The stable, machine-readable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            AuditError::InvalidPageToken => "INVALID_PAGE_TOKEN",
            AuditError::Corrupt { .. } => "CORRUPT",
            AuditError::ChainBroken { .. } => "AUDIT_CHAIN_BROKEN",
            AuditError::Store(_) | AuditError::Journal(_) => "STORAGE",
        }
    }
}

impl From<Broken> for AuditError {
    fn from(b: Broken) -> Self {
        AuditError::ChainBroken {
            sequence: b.sequence,
            reason: b.reason,
        }
    }
}

/// A decision to record; the time comes from the log's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// The caller's certificate identity.
    pub caller: String,
    /// The RPC, e.g. `Unseal`.
    pub rpc: String,
    pub tenant: String,
    pub credential: String,
    /// The credential version (0: none).
    pub version: u32,
    /// The caller's stated purpose.
    pub purpose: String,
    /// `ok`, or the stable reason code of the failure.
    pub outcome: String,
}

/// Which records [`AuditLog::query`] returns (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub tenant: Option<String>,
    pub credential: Option<String>,
    pub caller: Option<String>,
    /// At or after (ms since the Unix epoch).
    pub from_ms: Option<u64>,
    /// Strictly before.
    pub to_ms: Option<u64>,
    pub outcome: Option<String>,
}

impl AuditFilter {
    pub fn matches(&self, r: &Record) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.tenant, &r.tenant)
            && eq(&self.credential, &r.credential)
            && eq(&self.caller, &r.caller)
            && eq(&self.outcome, &r.outcome)
            && self.from_ms.is_none_or(|from| r.at_ms >= from)
            && self.to_ms.is_none_or(|to| r.at_ms < to)
    }
}

/// A stored record and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub sequence: u64,
    pub record: Record,
}

impl AuditEntry {
    /// One JSON object (print it with `{}` for a JSON line), the MAC in hex.
    pub fn to_json(&self) -> serde_json::Value {
        let r = &self.record;
        let mac: String = r.mac.iter().map(|b| format!("{b:02x}")).collect();
        serde_json::json!({
            "sequence": self.sequence,
            "at_ms": r.at_ms,
            "caller": r.caller,
            "rpc": r.rpc,
            "tenant_id": r.tenant,
            "credential_id": r.credential,
            "version": r.version,
            "purpose": r.purpose,
            "outcome": r.outcome,
            "mac": mac,
        })
    }
}

/// A page of [`AuditLog::query`], oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Present when later records remain (the next page may still hold no match).
    pub next_page_token: Option<String>,
}

/// A record seen at the head of the log, kept somewhere the store's writers
/// cannot reach: the server logs one as "audit head" every background round
/// the log has grown, and `verify` reports the one it reached. Verifying
/// against it later ([`AuditLog::verify_against`]) detects the newest records
/// being cut off, which the chain alone cannot. Written `SEQUENCE:MAC` (the
/// MAC in hex); neither part is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub mac: [u8; MAC_LEN],
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.sequence, hex::encode(self.mac))
    }
}

impl std::str::FromStr for Head {
    type Err = InvalidHead;

    fn from_str(text: &str) -> Result<Self, InvalidHead> {
        let (sequence, mac) = text.split_once(':').ok_or(InvalidHead)?;
        Self::new(
            sequence.parse().map_err(|_| InvalidHead)?,
            &hex::decode(mac).map_err(|_| InvalidHead)?,
        )
    }
}

impl Head {
    /// A head from its parts: sequence 1 or more, a MAC of 32 bytes.
    pub fn new(sequence: u64, mac: &[u8]) -> Result<Self, InvalidHead> {
        let mac = mac.try_into().map_err(|_| InvalidHead)?;
        if sequence == 0 {
            return Err(InvalidHead);
        }
        Ok(Self { sequence, mac })
    }
}

/// A head that is not `SEQUENCE:MAC` with a sequence number from 1 and a MAC
/// of 32 bytes (64 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an audit head is SEQUENCE:MAC, a sequence number from 1 and a 32-byte MAC in hex")]
pub struct InvalidHead;

/// What [`AuditLog::verify_against`] made of the head it was given. A log
/// that does not hold it fails: `ok` false, `first_bad_sequence` says where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadCheck {
    /// None was given.
    NotGiven,
    /// The log holds that record with that MAC (or, for the record just
    /// before the oldest kept, the anchor chains to that MAC).
    Matched,
    /// The record was pruned since, and so was the one after it: its MAC
    /// cannot be compared, but the log reaches past it.
    Pruned,
}

/// The outcome of [`AuditLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    /// Records that verified (all of them when `ok`).
    pub records: u64,
    /// The oldest record kept (the anchor's, else 1).
    pub first_sequence: u64,
    /// The newest record that verified (0: none). Compare with the last
    /// sequence number you saw to detect the newest records being cut off.
    pub last_sequence: u64,
    /// The first bad sequence number: an edited or forged record's own, a
    /// deleted record's, the first position of a reordering, the anchor's
    /// `first_sequence` (0 if the anchor does not even decode).
    pub first_bad_sequence: Option<u64>,
    /// Why not `ok` (empty when it is).
    pub reason: String,
    /// The newest record that verified, with its MAC: keep it outside the
    /// store and verify against it later.
    pub head: Option<Head>,
    /// What became of the head verified against (`NotGiven` when not `ok`).
    pub head_check: HeadCheck,
}

/// The audit log over a store. Cheap to clone; `Debug` shows no key.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    key: Arc<hmac::Key>,
    /// Where records that belong to no change become durable first (see
    /// [`journal`]); `None` over a store without a local directory, where
    /// every record is a store commit of its own.
    journal: Option<Arc<journal::Journal>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The log in `store`, chained under `key` (HMAC-SHA256), timed by `clock`.
    /// Every record is then its own store commit (no journal).
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, key: &SymmetricKey) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose_bytes());
        Self {
            store,
            clock,
            key: Arc::new(key),
            journal: None,
        }
    }

    /// [`Self::new`] with the audit journal in the store's local directory,
    /// when it has one: the records it holds that the log lacks (acknowledged
    /// before a crash) are appended first. One per store and process.
    pub async fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        key: &SymmetricKey,
        linger: std::time::Duration,
    ) -> Result<Self, AuditError> {
        let mut log = Self::new(store, clock, key);
        if let Some(dir) = log.store.local_dir() {
            let dir = dir.to_owned();
            let journal =
                journal::Journal::open(&dir, log.store.clone(), log.key.clone(), linger).await?;
            log.journal = Some(Arc::new(journal));
        }
        Ok(log)
    }

    /// Resolves once every record written through the journal before this
    /// call is in the store's log (at once without a journal). Reads of the
    /// log do this first, so they see every record acknowledged before them.
    pub async fn settled(&self) -> Result<(), AuditError> {
        match &self.journal {
            Some(journal) => journal.settled().await,
            None => Ok(()),
        }
    }

    /// [`Self::settled`] for synchronous callers (it needs no runtime).
    pub fn settled_blocking(&self) -> Result<(), AuditError> {
        match &self.journal {
            Some(journal) => journal.settled_blocking(),
            None => Ok(()),
        }
    }

    /// Why the log refuses records, if it does: its journal failed (a write,
    /// sync or feed into the store), and every record is refused until a
    /// restart.
    pub fn failure(&self) -> Option<String> {
        self.journal.as_ref().and_then(|journal| journal.failure())
    }

    /// The record of `record`, stamped with the log's clock, fields capped.
    fn stamp(&self, record: NewRecord) -> Record {
        Record {
            at_ms: self.clock.now_ms(),
            caller: capped(record.caller),
            rpc: capped(record.rpc),
            tenant: capped(record.tenant),
            credential: capped(record.credential),
            version: record.version,
            purpose: capped(record.purpose),
            outcome: capped(record.outcome),
            mac: Vec::new(),
        }
    }

    /// Adds `record` to `batch`, so that it is written atomically with the
    /// batch's other changes (or not at all, if a check fails). Returns the
    /// index of its sequence number in what [`Store::commit`] resolves to.
    pub fn append(&self, batch: &mut Batch, record: NewRecord) -> usize {
        let index = batch
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Add(..) | Op::Sub(..) | Op::Append(..)))
            .count();
        let record = self.stamp(record);
        let key = self.key.clone();
        // Runs in the store's committer thread: two HMACs and an encode, no I/O.
        batch.append(PREFIX.to_vec(), move |seq, previous| {
            chain::seal(&key, seq, &chain::link(&key, previous), record.clone())
        });
        index
    }

    /// Writes `record` durably on its own: through the journal when there is
    /// one, else as a store commit. For Unseals, reads and denials: an
    /// `Unseal` returns its secret only after this succeeds (fail closed).
    pub async fn record(&self, record: NewRecord) -> Result<(), AuditError> {
        match &self.journal {
            Some(journal) => journal.append(self.stamp(record)).await,
            None => self.record_in_store(record).await.map(|_| ()),
        }
    }

    /// Writes `record` durably as a store commit of its own, past any
    /// journal; returns its sequence number.
    pub async fn record_in_store(&self, record: NewRecord) -> Result<u64, AuditError> {
        let mut batch = Batch::default();
        let index = self.append(&mut batch, record);
        let seqs = self.store.commit(batch).await?;
        Ok(seqs[index])
    }

    /// Records matching `filter`, oldest first, `page_size` at most (0: 100,
    /// capped at 1000), after `page_token` (the last sequence number of the
    /// previous page). Reads the log in chunks, so a selective filter costs
    /// time, not memory. Does not check MACs: that is [`Self::verify`].
    pub fn query(
        &self,
        filter: &AuditFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<AuditPage, AuditError> {
        let after = page_token.map(parse_token).transpose()?;
        self.settled_blocking()?;
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut cursor = after.map(|seq| log_key(PREFIX, seq));
        let mut entries = Vec::new();
        loop {
            let rows = self.store.scan(PREFIX, cursor.as_deref(), CHUNK)?;
            let exhausted = rows.len() < CHUNK;
            for (key, value) in rows {
                let entry = decode_entry(&key, &value)?;
                cursor = Some(key);
                if filter.matches(&entry.record) {
                    entries.push(entry);
                    if entries.len() == page_size {
                        let more = !self.store.scan(PREFIX, cursor.as_deref(), 1)?.is_empty();
                        let token = more.then(|| entries[page_size - 1].sequence.to_string());
                        return Ok(AuditPage {
                            entries,
                            next_page_token: token,
                        });
                    }
                }
            }
            if exhausted {
                return Ok(AuditPage {
                    entries,
                    next_page_token: None,
                });
            }
        }
    }

    /// Up to `limit` records with a sequence number above `after`, oldest
    /// first, for `audit export` (JSON lines through [`AuditEntry::to_json`]):
    /// call again with the last sequence number until it returns none.
    pub fn export(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
        self.settled_blocking()?;
        self.store
            .scan(PREFIX, Some(&log_key(PREFIX, after)), limit)?
            .iter()
            .map(|(key, value)| decode_entry(key, value))
            .collect()
    }

    /// Walks the whole chain from the anchor (or record 1): the anchor's MAC,
    /// every record's MAC, and that sequence numbers are contiguous. See the
    /// module doc for what this can and cannot detect.
    pub fn verify(&self) -> Result<Verification, AuditError> {
        self.verify_against(None)
    }

    /// [`Self::verify`], and also that the log still holds `seen`, a head
    /// taken earlier: a log cut back to before it, or holding another record
    /// in its place, fails at the first sequence number that differs.
    pub fn verify_against(&self, seen: Option<Head>) -> Result<Verification, AuditError> {
        self.settled_blocking()?;
        let mut result = self.verify_once(seen)?;
        for _ in 1..VERIFY_ATTEMPTS {
            if result.ok {
                break;
            }
            result = self.verify_once(seen)?;
        }
        Ok(result)
    }

    fn verify_once(&self, seen: Option<Head>) -> Result<Verification, AuditError> {
        let anchor = self.store.get(ANCHOR)?;
        let mut walk = match Walk::start(&self.key, anchor.as_deref()) {
            Ok(walk) => walk,
            Err(b) => return Ok(Verification::broken(0, 0, b)),
        };
        let first = walk.next;
        // The walk stands just after record `first - 1`, whose MAC the anchor holds.
        let mut check = SeenCheck::new(seen, first);
        if let Err(b) = check.at(first - 1, &walk.prev_mac) {
            return Ok(Verification::broken(first, first, b));
        }
        let mut cursor = None;
        loop {
            let rows = self.store.scan(PREFIX, cursor.as_deref(), CHUNK)?;
            let exhausted = rows.len() < CHUNK;
            for (key, value) in rows {
                if let Err(b) = walk.step(&key, &value) {
                    return Ok(Verification::broken(first, walk.next, b));
                }
                if let Err(b) = check.at(walk.next - 1, &walk.prev_mac) {
                    return Ok(Verification::broken(first, walk.next - 1, b));
                }
                cursor = Some(key);
            }
            if exhausted {
                break;
            }
        }
        if anchor.is_some() && walk.next == first {
            // Pruning keeps the newest record, so an anchor is never alone.
            let b = Broken {
                sequence: first,
                reason: format!("record {first} is missing"),
            };
            return Ok(Verification::broken(first, first, b));
        }
        let last = walk.next - 1;
        let head_check = match check.end(last) {
            Ok(head_check) => head_check,
            Err(b) => return Ok(Verification::broken(first, walk.next, b)),
        };
        Ok(Verification {
            ok: true,
            records: walk.next - first,
            first_sequence: first,
            last_sequence: last,
            first_bad_sequence: None,
            reason: String::new(),
            head: (last > 0).then_some(Head {
                sequence: last,
                mac: walk.prev_mac,
            }),
            head_check,
        })
    }

    /// The newest record's sequence number and MAC, as stored (not verified);
    /// `None` while the log is empty. Once the journal has failed (before this
    /// call or while it waits for the journal), the head the store holds: the
    /// records the journal made durable but did not hand on are appended at
    /// the next start, after it (so the status and the published heads still
    /// answer, and a head published now is still reached later).
    pub fn head(&self) -> Result<Option<Head>, AuditError> {
        match self.settled_blocking() {
            Err(_) if self.failure().is_some() => {}
            settled => settled?,
        }
        let Some((key, value)) = self.store.last(PREFIX)? else {
            return Ok(None);
        };
        let entry = decode_entry(&key, &value)?;
        let corrupt = AuditError::Corrupt {
            sequence: entry.sequence,
        };
        Head::new(entry.sequence, &entry.record.mac)
            .map(Some)
            .map_err(|_| corrupt)
    }

    /// Deletes the records older than `before_ms` (ms since the Unix epoch)
    /// from the start of the log, never the newest one, in batches that each
    /// also write the new anchor and require the old one to be unchanged (so
    /// concurrent prunes cannot interleave). Every record deleted is verified
    /// first: a broken chain is an error, not something pruning hides. Stops at
    /// the first record that is not older, since the kept log must be
    /// contiguous (timestamps come from the clock and may step back). Returns
    /// how many records were deleted.
    pub async fn prune(&self, before_ms: u64) -> Result<u64, AuditError> {
        self.settled().await?;
        let mut deleted = 0;
        'again: loop {
            let anchor = self.store.get(ANCHOR)?;
            let mut walk = Walk::start(&self.key, anchor.as_deref())?;
            let newest = match self.store.last(PREFIX)? {
                Some((key, _)) => sequence_of(&key).ok_or(AuditError::Corrupt { sequence: 0 })?,
                None => return Ok(deleted),
            };
            let pruned_before_ms = walk.pruned_before_ms.max(before_ms);
            let mut batch = Batch::default();
            batch.check(ANCHOR.to_vec(), anchor.clone());
            let mut last = None;
            for (key, value) in self.store.scan(PREFIX, None, CHUNK)? {
                let record = match walk.step(&key, &value) {
                    Ok(record) => record,
                    // The anchor and the records are not read as one snapshot:
                    // a concurrent prune that moved the anchor in between looks
                    // like a gap. Only a break under an unchanged anchor is real.
                    Err(_) if self.store.get(ANCHOR)? != anchor => continue 'again,
                    Err(broken) => return Err(broken.into()),
                };
                if walk.next > newest || record.at_ms >= before_ms {
                    break;
                }
                batch.delete(key);
                last = Some((walk.next, walk.prev_mac));
            }
            let Some((first_sequence, prev_mac)) = last else {
                return Ok(deleted);
            };
            let anchor = Anchor::new(&self.key, first_sequence, prev_mac, pruned_before_ms);
            let count = batch.ops.len() as u64;
            batch.put(ANCHOR.to_vec(), anchor.encode_to_vec());
            match self.store.commit(batch).await {
                Ok(_) => deleted += count,
                Err(StoreError::Conflict) => {} // another prune moved the anchor: start over
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Verification {
    /// Broken at `b`, after the records from `first` up to (not including) `next` verified.
    fn broken(first: u64, next: u64, b: Broken) -> Self {
        Self {
            ok: false,
            records: next.saturating_sub(first),
            first_sequence: first,
            last_sequence: if next > first { next - 1 } else { 0 },
            first_bad_sequence: Some(b.sequence),
            reason: b.reason,
            head: None,
            head_check: HeadCheck::NotGiven,
        }
    }
}

/// A head being looked for along a walk.
struct SeenCheck {
    seen: Option<Head>,
    /// Whether its record was reached (with its MAC).
    found: bool,
    /// The oldest record kept.
    first: u64,
}

impl SeenCheck {
    fn new(seen: Option<Head>, first: u64) -> Self {
        Self {
            seen,
            found: false,
            first,
        }
    }

    /// The walk has reached record `sequence`, whose MAC is `mac`: if it is
    /// the head's, it must carry the head's MAC.
    fn at(&mut self, sequence: u64, mac: &[u8; MAC_LEN]) -> Result<(), Broken> {
        match self.seen {
            // Both MACs are public (the chain's check is the HMAC itself).
            Some(seen) if seen.sequence == sequence && seen.mac != *mac => Err(Broken {
                sequence,
                reason: format!("record {sequence} is not the one seen at the head (another MAC)"),
            }),
            Some(seen) if seen.sequence == sequence => {
                self.found = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The walk ended at record `last` (0: an empty log).
    fn end(self, last: u64) -> Result<HeadCheck, Broken> {
        let Some(seen) = self.seen else {
            return Ok(HeadCheck::NotGiven);
        };
        if self.found {
            Ok(HeadCheck::Matched)
        } else if seen.sequence > last {
            Err(Broken {
                sequence: last + 1,
                reason: format!(
                    "the log ends at record {last}, but record {} was seen at its head: \
                     the newest records were cut off",
                    seen.sequence
                ),
            })
        } else {
            // Before `first - 1`: pruned along with its successor.
            debug_assert!(seen.sequence + 1 < self.first);
            Ok(HeadCheck::Pruned)
        }
    }
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<AuditEntry, AuditError> {
    let sequence = sequence_of(key).ok_or(AuditError::Corrupt { sequence: 0 })?;
    let record = Record::decode(value).map_err(|_| AuditError::Corrupt { sequence })?;
    Ok(AuditEntry { sequence, record })
}

/// A page token: the decimal sequence number of the last record returned.
fn parse_token(token: &str) -> Result<u64, AuditError> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuditError::InvalidPageToken);
    }
    token.parse().map_err(|_| AuditError::InvalidPageToken)
}

/// `field`, cut to at most [`MAX_FIELD_BYTES`] at a character boundary.
fn capped(mut field: String) -> String {
    if field.len() > MAX_FIELD_BYTES {
        let mut end = MAX_FIELD_BYTES - '…'.len_utf8();
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        field.truncate(end);
        field.push('…');
    }
    field
}
