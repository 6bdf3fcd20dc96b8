//! The revocation event log: every revocation, tenant deletion, restore and
//! shred appends an event in the same atomic batch as the change itself, so
//! an event exists exactly when its change does, numbered in commit order
//! without gaps ([`Op::Append`](crate::store::Op::Append)). Watchers read the
//! log from a sequence number and wait on [`Vault::subscribe_events`] for more.

use prost::Message;

use crate::error::{Error, Result};
use crate::store::records::{self, EventKind, EventRecord};
use crate::store::{Batch, Store, StoreError, layout, log_key};

use super::{Vault, validate};

/// An event as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sequence: u64,
    pub kind: EventKind,
    pub tenant: String,
    /// `None` for tenant-wide events.
    pub credential: Option<String>,
    pub at_ms: u64,
}

/// Events read from the log, and how far the read got (so a watcher whose
/// filter matched nothing still moves on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The sequence number of the last entry read (the `after` given when none).
    pub read_to: u64,
}

/// Adds an event to `batch` (its sequence number is the batch's last counter
/// when it is the batch's last op).
pub(crate) fn append(
    batch: &mut Batch,
    kind: EventKind,
    tenant: &str,
    credential: &str,
    at_ms: u64,
) {
    let record = EventRecord {
        kind: kind as i32,
        tenant: tenant.to_owned(),
        credential: credential.to_owned(),
        at_ms,
    }
    .encode_to_vec();
    batch.append(layout::EVENTS.to_vec(), move |_, _| record.clone());
}

/// The sequence number of the newest event (0: none yet).
pub(crate) fn last_sequence(store: &dyn Store) -> Result<u64> {
    Ok(match store.last(layout::EVENTS)? {
        Some((key, _)) => sequence_of(&key)?,
        None => 0,
    })
}

fn sequence_of(key: &[u8]) -> Result<u64> {
    key.get(layout::EVENTS.len()..)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Corrupt("malformed event key".into()))
}

impl Vault {
    /// Tells watchers that events up to `sequence` are durable.
    pub(crate) fn events_committed(&self, sequence: Option<u64>) {
        if let Some(sequence) = sequence {
            self.events.send_if_modified(|newest| {
                let newer = sequence > *newest;
                if newer {
                    *newest = sequence;
                }
                newer
            });
        }
    }

    /// A receiver whose value is the newest event's sequence number; it
    /// changes after each committed event.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// The newest event's sequence number (0: none yet).
    pub fn last_event_sequence(&self) -> u64 {
        *self.events.borrow()
    }

    /// Up to `limit` events after sequence `after`, only `tenant`'s if given.
    /// [`Error::EventsPruned`] if events after `after` have been pruned.
    pub fn events_after(
        &self,
        after: u64,
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<EventPage> {
        if let Some(tenant) = tenant {
            validate::tenant_id(tenant)?;
        }
        let rows = self.store.scan(
            layout::EVENTS,
            Some(&log_key(layout::EVENTS, after)),
            limit.max(1),
        )?;
        if let Some((key, _)) = rows.first() {
            let first = sequence_of(key)?;
            if first > after + 1 {
                return Err(Error::EventsPruned {
                    after,
                    oldest: first,
                });
            }
        }
        let mut page = EventPage {
            events: Vec::new(),
            read_to: after,
        };
        for (key, bytes) in rows {
            let sequence = sequence_of(&key)?;
            page.read_to = sequence;
            let record: EventRecord = records::decode(&bytes)?;
            if tenant.is_some_and(|t| t != record.tenant) {
                continue;
            }
            page.events.push(Event {
                sequence,
                kind: record.kind(),
                credential: (!record.credential.is_empty()).then_some(record.credential),
                tenant: record.tenant,
                at_ms: record.at_ms,
            });
        }
        Ok(page)
    }

    /// Deletes events older than `older_than_ms`, in batches, but never the
    /// newest (the log's numbering continues from it). Returns how many.
    pub async fn prune_events(&self, older_than_ms: u64) -> Result<u64> {
        let mut pruned = 0;
        loop {
            let newest = last_sequence(&*self.store)?;
            let mut batch = Batch::default();
            for (key, bytes) in self.store.scan(layout::EVENTS, None, 1024)? {
                let record: EventRecord = records::decode(&bytes)?;
                if record.at_ms >= older_than_ms || sequence_of(&key)? >= newest {
                    break;
                }
                batch.check(key.clone(), Some(bytes)).delete(key);
            }
            if batch.ops.is_empty() {
                return Ok(pruned);
            }
            let n = batch.ops.len() as u64;
            match self.store.commit(batch).await {
                Ok(_) => pruned += n,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
