//! The hash chain: the stored record and anchor formats, their MACs, and the
//! walk that checks them in sequence order.
//!
//! ```text
//! mac(seq)     = HMAC-SHA256[audit key](RECORD_LABEL ‖ seq:u64 ‖ prev_mac ‖ body)
//! body         = protobuf of the Record with `mac` empty
//! prev_mac     = mac(seq - 1); 32 zero bytes for seq 1, the anchor's prev_mac after a prune
//! anchor.mac   = HMAC-SHA256[audit key](ANCHOR_LABEL ‖ first_sequence:u64 ‖ prev_mac ‖ pruned_before_ms:u64)
//! ```
//!
//! The labels and `prev_mac` have fixed lengths, so the body is whatever is left:
//! no two inputs concatenate to the same bytes.

use prost::Message;
use ring::hmac;

use super::PREFIX;

/// Domain label of a record's MAC.
pub const RECORD_LABEL: &[u8] = b"credvault-audit-v1";
/// Domain label of the anchor's MAC.
pub const ANCHOR_LABEL: &[u8] = b"credvault-audit-anchor-v1";
/// Domain label of the link to a previous entry that does not decode (see [`link`]).
const UNDECODABLE_LABEL: &[u8] = b"credvault-audit-undecodable-v1";
/// Length of every MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// What record 1 chains to.
const GENESIS: [u8; MAC_LEN] = [0; MAC_LEN];

/// One audit record, stored at `a\0{seq:u64}`. Tags are stable; fields may be
/// added, never renumbered. There is deliberately no field that could hold a
/// secret or key: only names, numbers and outcomes.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Record {
    /// When the decision was made (ms since the Unix epoch, the caller's clock).
    #[prost(uint64, tag = "1")]
    pub at_ms: u64,
    /// The caller's certificate identity (URI SAN, DNS SAN or CN).
    #[prost(string, tag = "2")]
    pub caller: String,
    /// The RPC, e.g. `Unseal`.
    #[prost(string, tag = "3")]
    pub rpc: String,
    #[prost(string, tag = "4")]
    pub tenant: String,
    #[prost(string, tag = "5")]
    pub credential: String,
    /// The credential version (0: none or not known).
    #[prost(uint32, tag = "6")]
    pub version: u32,
    /// The caller's stated purpose (free text, e.g. a task id).
    #[prost(string, tag = "7")]
    pub purpose: String,
    /// `ok`, or the stable reason code of the failure (`PERMISSION_DENIED`, `REVOKED`, …).
    #[prost(string, tag = "8")]
    pub outcome: String,
    /// mac(seq), 32 bytes (see the module doc).
    #[prost(bytes = "vec", tag = "9")]
    pub mac: Vec<u8>,
}

/// Where the chain starts once old records are pruned (`m\0audit.anchor`).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Anchor {
    /// The oldest record kept.
    #[prost(uint64, tag = "1")]
    pub first_sequence: u64,
    /// The MAC of record `first_sequence - 1` (pruned), which that record chains to.
    #[prost(bytes = "vec", tag = "2")]
    pub prev_mac: Vec<u8>,
    /// The highest cutoff any prune was asked for (ms since the Unix epoch);
    /// every pruned record was older. Kept records may be older too: pruning
    /// stops at the newest record and at the first record that is not older.
    #[prost(uint64, tag = "3")]
    pub pruned_before_ms: u64,
    /// anchor.mac (see the module doc).
    #[prost(bytes = "vec", tag = "4")]
    pub mac: Vec<u8>,
}

impl Anchor {
    /// A signed anchor.
    pub fn new(
        key: &hmac::Key,
        first_sequence: u64,
        prev_mac: [u8; MAC_LEN],
        pruned_before_ms: u64,
    ) -> Self {
        let input = anchor_input(first_sequence, &prev_mac, pruned_before_ms);
        Self {
            first_sequence,
            prev_mac: prev_mac.to_vec(),
            pruned_before_ms,
            mac: hmac::sign(key, &input).as_ref().to_vec(),
        }
    }
}

fn anchor_input(first_sequence: u64, prev_mac: &[u8], pruned_before_ms: u64) -> Vec<u8> {
    [
        ANCHOR_LABEL,
        &first_sequence.to_be_bytes(),
        prev_mac,
        &pruned_before_ms.to_be_bytes(),
    ]
    .concat()
}

fn record_input(seq: u64, prev_mac: &[u8; MAC_LEN], body: &[u8]) -> Vec<u8> {
    [RECORD_LABEL, &seq.to_be_bytes(), prev_mac, body].concat()
}

/// The stored bytes of `record` (whose `mac` is ignored) as entry `seq`, chained to `prev_mac`.
pub fn seal(key: &hmac::Key, seq: u64, prev_mac: &[u8; MAC_LEN], mut record: Record) -> Vec<u8> {
    record.mac.clear();
    seal_body(key, seq, prev_mac, &record.encode_to_vec())
}

/// The stored bytes of a record given as its body (the protobuf of a
/// [`Record`] with `mac` empty, as `encode_to_vec` writes it), as entry `seq`
/// chained to `prev_mac`: the body, then the MAC as field 9, the last field,
/// which is how prost encodes the record with its `mac` set.
pub fn seal_body(key: &hmac::Key, seq: u64, prev_mac: &[u8; MAC_LEN], body: &[u8]) -> Vec<u8> {
    let tag = hmac::sign(key, &record_input(seq, prev_mac, body));
    let mut stored = Vec::with_capacity(body.len() + 2 + MAC_LEN);
    stored.extend_from_slice(body);
    stored.extend_from_slice(&[MAC_FIELD_KEY, MAC_LEN as u8]);
    stored.extend_from_slice(tag.as_ref());
    stored
}

/// The key byte of field 9 (`mac`), length-delimited: (9 << 3) | 2.
const MAC_FIELD_KEY: u8 = 0x4A;

/// What the entry after `previous` (a stored value; `None`: there is none)
/// chains to: its MAC. A previous value that does not decode (tampering or a
/// bug) is linked by a keyed hash of its raw bytes instead, so the new record
/// stays bound to exactly what was there. `verify` stops at the undecodable
/// entry and names it; putting other bytes there later still breaks the chain.
pub fn link(key: &hmac::Key, previous: Option<&[u8]>) -> [u8; MAC_LEN] {
    let Some(bytes) = previous else {
        return GENESIS;
    };
    match Record::decode(bytes).map(|r| <[u8; MAC_LEN]>::try_from(r.mac.as_slice())) {
        Ok(Ok(mac)) => mac,
        _ => to_array(hmac::sign(key, &[UNDECODABLE_LABEL, bytes].concat()).as_ref()),
    }
}

fn to_array(bytes: &[u8]) -> [u8; MAC_LEN] {
    bytes.try_into().expect("HMAC-SHA256 is 32 bytes")
}

/// The sequence number in a record's key, if it is one.
pub fn sequence_of(key: &[u8]) -> Option<u64> {
    key.strip_prefix(PREFIX)?
        .try_into()
        .ok()
        .map(u64::from_be_bytes)
}

/// Where and why the chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The first bad sequence number (0: the anchor does not decode).
    pub sequence: u64,
    pub reason: String,
}

fn broken(sequence: u64, reason: impl Into<String>) -> Broken {
    Broken {
        sequence,
        reason: reason.into(),
    }
}

/// A walk along the chain, from the anchor (or record 1), one stored entry at a time.
pub struct Walk<'k> {
    key: &'k hmac::Key,
    /// The sequence number the next entry must have.
    pub next: u64,
    /// The MAC the next entry must chain to.
    pub prev_mac: [u8; MAC_LEN],
    /// The anchor's `pruned_before_ms` (0 without one).
    pub pruned_before_ms: u64,
}

impl<'k> Walk<'k> {
    /// Starts at the anchor, given as stored, after checking its MAC; at record 1 without one.
    pub fn start(key: &'k hmac::Key, anchor: Option<&[u8]>) -> Result<Self, Broken> {
        let Some(bytes) = anchor else {
            return Ok(Self {
                key,
                next: 1,
                prev_mac: GENESIS,
                pruned_before_ms: 0,
            });
        };
        let anchor = Anchor::decode(bytes).map_err(|_| broken(0, "the anchor does not decode"))?;
        let bad = || broken(anchor.first_sequence, "the anchor's MAC does not verify");
        let prev_mac: [u8; MAC_LEN] = anchor.prev_mac.as_slice().try_into().map_err(|_| bad())?;
        let input = anchor_input(anchor.first_sequence, &prev_mac, anchor.pruned_before_ms);
        hmac::verify(key, &input, &anchor.mac).map_err(|_| bad())?;
        if anchor.encode_to_vec() != bytes {
            return Err(bad());
        }
        Ok(Self {
            key,
            next: anchor.first_sequence,
            prev_mac,
            pruned_before_ms: anchor.pruned_before_ms,
        })
    }

    /// Checks the entry stored at `key` with `value`: it must be the next
    /// sequence number, decode, carry the MAC chained to the one before, and be
    /// encoded exactly as credvault encodes it (no bytes an attacker could add
    /// without touching the MAC). Advances past it and returns it.
    pub fn step(&mut self, key: &[u8], value: &[u8]) -> Result<Record, Broken> {
        let seq = match sequence_of(key) {
            None => return Err(broken(self.next, "a malformed key is in the audit log")),
            Some(seq) if seq < self.next => {
                return Err(broken(
                    seq,
                    format!("record {seq} should not exist before record {}", self.next),
                ));
            }
            Some(seq) if seq > self.next => {
                return Err(broken(
                    self.next,
                    format!("record {} is missing", self.next),
                ));
            }
            Some(seq) => seq,
        };
        let mut record = Record::decode(value)
            .map_err(|_| broken(seq, format!("record {seq} does not decode")))?;
        let mac = std::mem::take(&mut record.mac);
        let input = record_input(seq, &self.prev_mac, &record.encode_to_vec());
        let bad = || broken(seq, format!("record {seq}'s MAC does not verify"));
        hmac::verify(self.key, &input, &mac).map_err(|_| bad())?;
        record.mac = mac;
        if record.encode_to_vec() != value {
            return Err(broken(
                seq,
                format!("record {seq} holds bytes its MAC does not cover"),
            ));
        }
        self.prev_mac = to_array(&record.mac);
        self.next = seq + 1;
        Ok(record)
    }
}
