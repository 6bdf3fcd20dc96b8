//! The store's write-ahead log: every commit group is one framed, checksummed
//! record appended to a segment file, and a group is acknowledged once that
//! segment is `fdatasync`ed. The backend applies each group to its tree in
//! memory and makes the tree durable only at checkpoints (see
//! `docs/decisions/0001-storage-durability.md`, session 3).
//!
//! A frame is
//!
//! ```text
//! u32 LE  body length
//! u32 LE  CRC-32 (IEEE) of the body
//! body:   u64 LE group number, u32 LE change count, then per change
//!         u8 tag (1 = put, 0 = delete), u32 LE key length, key,
//!         and for a put u32 LE value length, value
//! ```
//!
//! Groups are numbered 1, 2, … without gaps. Segments are named after their
//! first group (`{group:020}.wal`) and only the newest one is ever written to;
//! the previous one is synced before the next is created. Recovery reads the
//! segments in order and stops at the first frame that is short, fails its
//! checksum or breaks the numbering: that frame and everything after it were
//! never acknowledged.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One change of a group: a put (`Some`) or a delete (`None`).
pub(super) type Change = (Vec<u8>, Option<Vec<u8>>);

const HEADER: usize = 8;
const SUFFIX: &str = "wal";

/// The segment being appended to.
pub(super) struct Wal {
    dir: PathBuf,
    /// Shared with whoever syncs it ([`Wal::segment`]).
    file: Arc<File>,
    path: PathBuf,
    /// Bytes written to the current segment.
    written: u64,
    /// The number the next group gets.
    next: u64,
    /// Reused between groups.
    frame: Vec<u8>,
}

/// What recovery found in the log.
pub(super) struct Recovered {
    /// The intact groups, in order.
    pub groups: Vec<(u64, Vec<Change>)>,
    /// The highest group number of any intact frame (0: none).
    pub last: u64,
    /// Every segment file present; all of them can go once the tree is durable.
    pub segments: Vec<PathBuf>,
}

impl Wal {
    /// Starts a new segment whose first group is `next`.
    pub(super) fn create(dir: &Path, next: u64) -> std::io::Result<Self> {
        let path = segment_path(dir, next);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            file: Arc::new(file),
            path,
            written: 0,
            next,
            frame: Vec::new(),
        })
    }

    /// Writes one group (durable once the segment is synced) and returns its
    /// number.
    pub(super) fn append<'a>(
        &mut self,
        changes: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> std::io::Result<u64> {
        let group = self.next;
        let frame = &mut self.frame;
        frame.clear();
        frame.extend_from_slice(&[0; HEADER]);
        frame.extend_from_slice(&group.to_le_bytes());
        frame.extend_from_slice(&len32(changes.len())?.to_le_bytes());
        for (key, value) in changes {
            frame.push(u8::from(value.is_some()));
            frame.extend_from_slice(&len32(key.len())?.to_le_bytes());
            frame.extend_from_slice(key);
            if let Some(value) = value {
                frame.extend_from_slice(&len32(value.len())?.to_le_bytes());
                frame.extend_from_slice(value);
            }
        }
        let body = len32(frame.len() - HEADER)?;
        let crc = crc32fast::hash(&frame[HEADER..]);
        frame[..4].copy_from_slice(&body.to_le_bytes());
        frame[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        (&*self.file).write_all(frame)?;
        self.written += frame.len() as u64;
        self.next += 1;
        Ok(group)
    }

    /// The current segment, for another thread to sync (`sync_data` on it
    /// makes every group appended to it so far durable).
    pub(super) fn segment(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Bytes in the current segment.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Syncs the current segment and starts the next one; returns the
    /// finished segment's path, which may be deleted once the tree holds
    /// every group in it durably, and the number of its last group.
    pub(super) fn rotate(&mut self) -> std::io::Result<(PathBuf, u64)> {
        self.file.sync_data()?;
        let last = self.next - 1;
        let next = Self::create(&self.dir, self.next)?;
        let old = std::mem::replace(self, next);
        Ok((old.path, last))
    }

    /// The directory of the segments.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current segment's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every intact group from the segments in `dir`, oldest first: the
/// contiguous run that starts with the first frame of the oldest segment.
pub(super) fn recover(dir: &Path) -> std::io::Result<Recovered> {
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX)?.strip_suffix('.')?.parse().ok());
        if let Some(first) = first {
            segments.push((first, path));
        }
    }
    segments.sort();
    let mut recovered = Recovered {
        groups: Vec::new(),
        last: 0,
        segments: segments.iter().map(|(_, p)| p.clone()).collect(),
    };
    let mut expected = None;
    'segments: for (_, path) in &segments {
        let bytes = std::fs::read(path)?;
        let mut rest = &bytes[..];
        while let Some((group, changes, tail)) = parse_frame(rest) {
            rest = tail;
            if expected.is_some_and(|expected| group != expected) {
                break 'segments; // a gap: nothing after it was acknowledged
            }
            recovered.last = group;
            recovered.groups.push((group, changes));
            expected = Some(group + 1);
        }
        if !rest.is_empty() {
            tracing::info!(segment = %path.display(), bytes = rest.len(), "store log ends in an unacknowledged partial write; discarded");
            break;
        }
    }
    Ok(recovered)
}

/// The first frame of `bytes`, or `None` if it is short or damaged.
fn parse_frame(bytes: &[u8]) -> Option<(u64, Vec<Change>, &[u8])> {
    let body_len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
    let body = bytes.get(HEADER..HEADER.checked_add(body_len)?)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let mut reader = Reader(body);
    let group = u64::from_le_bytes(reader.take(8)?.try_into().ok()?);
    let count = reader.u32()?;
    let mut changes = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let tag = reader.take(1)?[0];
        let key_len = reader.u32()?;
        let key = reader.take(key_len as usize)?.to_vec();
        let value = match tag {
            0 => None,
            1 => {
                let value_len = reader.u32()?;
                Some(reader.take(value_len as usize)?.to_vec())
            }
            _ => return None,
        };
        changes.push((key, value));
    }
    if !reader.0.is_empty() {
        return None;
    }
    Some((group, changes, &bytes[HEADER + body_len..]))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.{SUFFIX}"))
}

fn len32(n: usize) -> std::io::Result<u32> {
    u32::try_from(n).map_err(|_| std::io::Error::other("store log frame over 4 GiB"))
}

/// Makes the directory's entries (created or removed files) durable.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes finished segments, oldest first (so that what remains after a
/// crash is still a contiguous run), then syncs the directory.
pub(super) fn remove_segments(dir: &Path, segments: &[PathBuf]) -> std::io::Result<()> {
    let mut segments = segments.to_vec();
    segments.sort();
    for segment in &segments {
        match std::fs::remove_file(segment) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Change {
        (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
    }

    fn append(wal: &mut Wal, changes: &[Change]) -> u64 {
        wal.append(changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
            .unwrap()
    }

    #[test]
    fn groups_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        let deleted: Change = (b"gone".to_vec(), None);
        assert_eq!(append(&mut wal, &[put("a", "1"), deleted.clone()]), 1);
        assert_eq!(append(&mut wal, &[put("b", "")]), 2);
        let (first, last) = wal.rotate().unwrap();
        assert_eq!(last, 2);
        assert_eq!(append(&mut wal, &[put("c", "3")]), 3);
        wal.segment().sync_data().unwrap();

        let all = recover(dir.path()).unwrap();
        assert_eq!(all.last, 3);
        assert_eq!(all.segments.len(), 2);
        assert_eq!(
            all.groups,
            vec![
                (1, vec![put("a", "1"), deleted]),
                (2, vec![put("b", "")]),
                (3, vec![put("c", "3")]),
            ]
        );
        remove_segments(dir.path(), &[first]).unwrap();
        let rest = recover(dir.path()).unwrap();
        assert_eq!(rest.groups, vec![(3, vec![put("c", "3")])]);
        assert_eq!(rest.segments, vec![wal.path().to_owned()]);
    }

    #[test]
    fn a_torn_or_corrupt_frame_ends_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        for n in 0..4 {
            append(&mut wal, &[put(&format!("k{n}"), "value")]);
        }
        let path = wal.path().to_owned();
        drop(wal);
        let bytes = std::fs::read(&path).unwrap();
        let frame = bytes.len() / 4;
        // Cut inside the third frame: two groups survive.
        std::fs::write(&path, &bytes[..2 * frame + 5]).unwrap();
        let torn = recover(dir.path()).unwrap();
        assert_eq!(torn.groups.len(), 2);
        assert_eq!(torn.last, 2);
        // A flipped bit in the second frame: only the first survives, even
        // though the frames after it are intact.
        let mut flipped = bytes.clone();
        flipped[frame + HEADER + 3] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(recover(dir.path()).unwrap().groups.len(), 1);
        // Every single-byte truncation point yields a prefix, never an error.
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let got = recover(dir.path()).unwrap();
            assert_eq!(got.groups.len(), cut / frame, "cut at {cut}");
        }
    }

    #[test]
    fn a_gap_in_the_numbering_ends_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        append(&mut wal, &[put("a", "1")]);
        drop(wal);
        // A segment that starts past the next expected group (a lost one in between).
        let mut later = Wal::create(dir.path(), 5).unwrap();
        append(&mut later, &[put("b", "2")]);
        let got = recover(dir.path()).unwrap();
        assert_eq!(got.groups.len(), 1);
        assert_eq!(got.segments.len(), 2);
    }
}
