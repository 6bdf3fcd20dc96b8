//! Backups: a consistent copy of the store written while the server runs
//! ([`Vault::backup`]), checked ([`verify`]) and restored offline into a new
//! data directory ([`restore`]). The file format is in `docs/format.md`
//! ("Backup file"); the reasons in `docs/decisions/0008-online-backup.md`.
//!
//! A backup holds the store's records as they are stored (ciphertext and
//! wrapped keys, metadata in the clear), then the records written while it
//! ran, so that restoring it gives the store exactly as it stood when the
//! backup ended. A random key, sealed under the root key in the header, MACs
//! the whole file: a backup opens only with the root key it was made under,
//! and a changed, truncated or reordered byte is refused before anything is
//! restored.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

use super::Vault;
use crate::crypto::SymmetricKey;
use crate::crypto::envelope::{self, Context};
use crate::error::Result;
use crate::store::{
    ExportError, Exported, ImportError, SledStore, StoreError, StoreOptions, layout,
};

/// The backup file's name inside the backup directory.
pub const FILE_NAME: &str = "credvault.backup";
/// Where the file is written until it is complete and durable, locked by the
/// backup writing it.
const PARTIAL_NAME: &str = ".credvault.backup.partial";
const MAGIC: &[u8; 8] = b"CVBACKUP";
const FORMAT: u8 = 1;
/// Frame tags.
const ROW: u8 = 1;
const PUT: u8 = 2;
const DELETE: u8 = 3;
const END: u8 = 0xff;
/// Longest sealed key a header may claim (it is 60 bytes).
const MAX_SEALED_KEY: usize = 1024;
const MAC_LEN: usize = 32;

/// A record as a frame carries it: key and value (`None`: deleted).
type Item = (Vec<u8>, Option<Vec<u8>>);

/// A backup as written or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The backup file.
    pub file: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Records copied by the scan.
    pub rows: u64,
    /// Records written while the scan ran, as they stood at its end.
    pub changes: u64,
    /// The root key it opens with.
    pub root_version: u32,
    /// When it was started (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When its scan ended: the moment whose state it holds.
    pub consistent_at_ms: u64,
}

/// Why a backup or restore failed. Nothing is left behind: a partial file or
/// directory is removed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the backup directory must be an absolute path on the server")]
    RelativeDirectory,
    #[error("{0} exists and is not an empty directory; back up into a new one")]
    DirectoryNotEmpty(PathBuf),
    #[error("another backup of this store is running; try again when it has finished")]
    Busy,
    #[error("the root key was rotated while the backup ran; nothing was kept; run it again")]
    RootRotated,
    #[error("writing the backup in {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("reading the backup {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not an intact credvault backup: {what}; nothing was restored")]
    Damaged { path: PathBuf, what: String },
    #[error(
        "this backup was made under root key v{version}, and the root key given does not open it"
    )]
    WrongRootKey { version: u32 },
    #[error("{0} exists and is not empty; restore into a new data directory")]
    TargetNotEmpty(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupError {
    /// The stable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            BackupError::RelativeDirectory => "INVALID_BACKUP_DIRECTORY",
            BackupError::DirectoryNotEmpty(_) => "BACKUP_DIRECTORY_NOT_EMPTY",
            BackupError::Busy => "BACKUP_IN_PROGRESS",
            BackupError::RootRotated => "ROOT_KEY_ROTATED",
            BackupError::Write { .. } => "BACKUP_WRITE_FAILED",
            BackupError::Read { .. } => "BACKUP_READ_FAILED",
            BackupError::Damaged { .. } => "BACKUP_DAMAGED",
            BackupError::WrongRootKey { .. } => "WRONG_ROOT_KEY",
            BackupError::TargetNotEmpty(_) => "DATA_DIRECTORY_NOT_EMPTY",
            BackupError::Store(_) => "STORAGE",
        }
    }
}

impl Vault {
    /// Writes a backup of the whole store into `directory` (absolute; created
    /// if missing, else it must be empty but for the partial file of a backup
    /// that was interrupted, which is removed) while calls go on, and returns
    /// once the file and its directory entry are durable. Blocking: run it off
    /// the async workers. One backup at a time.
    pub fn backup(&self, directory: &Path) -> Result<BackupSummary> {
        if !directory.is_absolute() {
            return Err(BackupError::RelativeDirectory.into());
        }
        let created = prepare_directory(directory)?;
        let written = self.write_backup(directory);
        if written.is_err() && created {
            let _ = std::fs::remove_dir(directory);
        }
        Ok(written?)
    }

    /// Writes the backup into the partial file and renames it into place. On
    /// an error the partial file is removed if this call created it, and only
    /// then: another backup's is left alone.
    fn write_backup(&self, directory: &Path) -> Result<BackupSummary, BackupError> {
        let write_error = |error| BackupError::Write {
            path: directory.to_owned(),
            error,
        };
        let partial = Partial::create(directory)?;
        // Every audit record acknowledged before the backup, in it.
        if let Some(log) = &self.audit
            && let Err(error) = log.settled_blocking()
        {
            tracing::warn!(%error, "the backup may lack the newest audit records");
        }
        let (root, check) = self.keys.root();
        let created_at_ms = self.clock.now_ms();
        let key = SymmetricKey::generate();
        let sealed = envelope::seal(
            root.key(),
            root.version(),
            &Context::backup_key(),
            key.expose_bytes(),
        );
        let mut out = MacWriter {
            out: BufWriter::with_capacity(1 << 20, &partial.file),
            mac: hmac::Context::with_key(&mac_key(&key)),
            bytes: 0,
        };
        out.header(created_at_ms, &sealed).map_err(write_error)?;
        // The root check value as the backup ends: it must be the one the
        // header's key is sealed under.
        let mut root_check: Option<Vec<u8>> = None;
        let counts = self
            .store
            .export(&mut |item| match item {
                Exported::Row(key, value) => {
                    if key == layout::ROOT_CHECK {
                        root_check = Some(value.to_vec());
                    }
                    out.frame(ROW, key, Some(value))
                }
                Exported::Change(key, value) => {
                    if key == layout::ROOT_CHECK {
                        root_check = value.map(<[u8]>::to_vec);
                    }
                    out.frame(if value.is_some() { PUT } else { DELETE }, key, value)
                }
            })
            .map_err(|e| match e {
                ExportError::Busy => BackupError::Busy,
                ExportError::Store(e) => BackupError::Store(e),
                ExportError::Sink(e) => write_error(e),
            })?;
        let consistent_at_ms = self.clock.now_ms();
        if root_check.as_deref() != Some(check.as_slice()) {
            return Err(BackupError::RootRotated);
        }
        let file = out
            .finish(counts.rows, counts.changes, consistent_at_ms)
            .map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        let bytes = file.metadata().map_err(write_error)?.len();
        let target = directory.join(FILE_NAME);
        partial.rename(&target).map_err(write_error)?;
        sync_dir(directory).map_err(write_error)?;
        if let Some(parent) = directory.parent() {
            sync_dir(parent).map_err(write_error)?;
        }
        tracing::info!(
            file = %target.display(),
            bytes,
            rows = counts.rows,
            changes = counts.changes,
            root_version = root.version(),
            "backup written"
        );
        Ok(BackupSummary {
            file: target,
            bytes,
            rows: counts.rows,
            changes: counts.changes,
            root_version: root.version(),
            created_at_ms,
            consistent_at_ms,
        })
    }
}

/// The partial file a backup is writing, locked from just after its creation
/// until it is renamed into place, so that [`prepare_directory`] can tell it
/// from one left by a backup that died (whose lock went with it). Dropped
/// before the rename, it is removed while the lock is still held.
struct Partial {
    path: PathBuf,
    file: File,
    renamed: bool,
}

impl Partial {
    /// Creates and locks the partial file in `directory`. One that exists
    /// belongs to another backup: the directory is refused, the file left.
    fn create(directory: &Path) -> Result<Self, BackupError> {
        let not_empty = || BackupError::DirectoryNotEmpty(directory.to_owned());
        let write_error = |error| BackupError::Write {
            path: directory.to_owned(),
            error,
        };
        let path = directory.join(PARTIAL_NAME);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => not_empty(),
                _ => write_error(e),
            })?;
        match file.try_lock() {
            Ok(()) => {}
            // Another backup took it for a leftover between the two calls and
            // is removing it.
            Err(std::fs::TryLockError::WouldBlock) => return Err(not_empty()),
            // A file system without locks: written unlocked, and never taken
            // for a leftover (that needs the lock).
            Err(std::fs::TryLockError::Error(_)) => {}
        }
        // Still the file created: not removed (and made again) in between.
        if !is_file_at(&file, &path).map_err(write_error)? {
            return Err(not_empty());
        }
        let partial = Self {
            path,
            file,
            renamed: false,
        };
        // A backup that finished since the directory was found empty left its
        // file, which the rename would replace. From here on no other backup
        // can start (this name is taken) or finish unseen.
        let entries = std::fs::read_dir(directory).map_err(write_error)?.count();
        if entries != 1 {
            return Err(not_empty()); // dropped: removed
        }
        Ok(partial)
    }

    fn rename(mut self, target: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, target)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` names the regular file `file` has open (`false` if nothing
/// is there).
fn is_file_at(file: &File, path: &Path) -> std::io::Result<bool> {
    let named = match std::fs::symlink_metadata(path) {
        Ok(named) => named,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let open = file.metadata()?;
    Ok(named.is_file() && (named.dev(), named.ino()) == (open.dev(), open.ino()))
}

/// Creates `directory` (owner only) or checks that it is an empty directory,
/// after removing the partial file of an interrupted backup if that is all it
/// holds; returns whether it was created.
fn prepare_directory(directory: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(directory) {
        Ok(entries) => {
            let mut entries = entries.take(2);
            match (entries.next(), entries.next()) {
                (None, _) => Ok(false),
                (Some(Ok(only)), None)
                    if only.file_name() == PARTIAL_NAME
                        && only.file_type().is_ok_and(|t| t.is_file()) =>
                {
                    remove_leftover(directory)?;
                    Ok(false)
                }
                _ => Err(BackupError::DirectoryNotEmpty(directory.to_owned())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(directory)
                .map_err(|error| BackupError::Write {
                    path: directory.to_owned(),
                    error,
                })?;
            Ok(true)
        }
        Err(_) if directory.exists() => Err(BackupError::DirectoryNotEmpty(directory.to_owned())),
        Err(error) => Err(BackupError::Write {
            path: directory.to_owned(),
            error,
        }),
    }
}

/// Removes the partial file in `directory` if no backup holds its lock: the
/// backup that wrote it died (killed, or the host went down) before it was
/// complete. A live backup's file is left and the directory refused.
fn remove_leftover(directory: &Path) -> Result<(), BackupError> {
    let not_empty = || BackupError::DirectoryNotEmpty(directory.to_owned());
    let path = directory.join(PARTIAL_NAME);
    let file = File::open(&path).map_err(|_| not_empty())?;
    if file.try_lock().is_err() {
        return Err(not_empty());
    }
    // Removed by path, so only while the locked file is still the one there:
    // another backup may have removed it meanwhile and started its own.
    if !is_file_at(&file, &path).unwrap_or(false) {
        return Err(not_empty());
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(BackupError::Write {
                path: directory.to_owned(),
                error,
            });
        }
    }
    tracing::warn!(
        file = %path.display(),
        "removed the partial backup file an interrupted backup left"
    );
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn mac_key(key: &SymmetricKey) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, key.expose_bytes())
}

/// Writes the file, feeding every byte to the MAC.
struct MacWriter<'a> {
    out: BufWriter<&'a File>,
    mac: hmac::Context,
    bytes: u64,
}

impl<'a> MacWriter<'a> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.mac.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn header(&mut self, created_at_ms: u64, sealed_key: &[u8]) -> std::io::Result<()> {
        self.put(MAGIC)?;
        self.put(&[FORMAT])?;
        self.put(&created_at_ms.to_be_bytes())?;
        self.put(&len32(sealed_key.len())?.to_be_bytes())?;
        self.put(sealed_key)
    }

    fn frame(&mut self, tag: u8, key: &[u8], value: Option<&[u8]>) -> std::io::Result<()> {
        self.put(&[tag])?;
        self.put(&len32(key.len())?.to_be_bytes())?;
        self.put(key)?;
        if let Some(value) = value {
            self.put(&len32(value.len())?.to_be_bytes())?;
            self.put(value)?;
        }
        Ok(())
    }

    /// The end frame and the MAC; returns the flushed file.
    fn finish(
        mut self,
        rows: u64,
        changes: u64,
        consistent_at_ms: u64,
    ) -> std::io::Result<&'a File> {
        self.put(&[END])?;
        self.put(&rows.to_be_bytes())?;
        self.put(&changes.to_be_bytes())?;
        self.put(&consistent_at_ms.to_be_bytes())?;
        let tag = self.mac.clone().sign();
        self.out.write_all(tag.as_ref())?;
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

fn len32(n: usize) -> std::io::Result<u32> {
    u32::try_from(n).map_err(|_| std::io::Error::other("a record longer than 4 GiB"))
}

/// The backup file in `path`: the file itself, or `credvault.backup` in the
/// directory.
fn backup_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_owned()
    }
}

/// Reads a backup file: the header, then one item per frame, checking the
/// counts and the MAC at the end. The first problem ends it and is kept in
/// `failed`.
struct MacReader {
    path: PathBuf,
    input: BufReader<File>,
    key: hmac::Key,
    mac: hmac::Context,
    bytes: u64,
    rows: u64,
    changes: u64,
    /// The end frame was read and everything checked.
    ended: bool,
    failed: Option<BackupError>,
    root_version: u32,
    created_at_ms: u64,
    consistent_at_ms: u64,
}

impl MacReader {
    fn open(path: &Path, root: &SymmetricKey) -> Result<Self, BackupError> {
        let path = backup_file(path);
        let file = File::open(&path).map_err(|error| BackupError::Read {
            path: path.clone(),
            error,
        })?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let damaged = |what: &str| BackupError::Damaged {
            path: path.clone(),
            what: what.into(),
        };
        let mut head = [0u8; 8 + 1 + 8 + 4];
        input
            .read_exact(&mut head)
            .map_err(|_| damaged("shorter than a header"))?;
        if &head[..8] != MAGIC {
            return Err(damaged("it does not start with CVBACKUP"));
        }
        if head[8] != FORMAT {
            return Err(damaged(&format!(
                "format version {} is not one this build reads ({FORMAT})",
                head[8]
            )));
        }
        let created_at_ms = u64::from_be_bytes(head[9..17].try_into().expect("8 bytes"));
        let sealed_len = u32::from_be_bytes(head[17..21].try_into().expect("4 bytes")) as usize;
        if sealed_len > MAX_SEALED_KEY {
            return Err(damaged("its header claims an oversized key"));
        }
        let mut sealed = vec![0u8; sealed_len];
        input
            .read_exact(&mut sealed)
            .map_err(|_| damaged("its header is cut short"))?;
        let root_version =
            envelope::key_version(&sealed).map_err(|_| damaged("its sealed key is malformed"))?;
        let key = envelope::open(root, &Context::backup_key(), &sealed)
            .ok()
            .and_then(|bytes| SymmetricKey::from_slice(&bytes))
            .ok_or(BackupError::WrongRootKey {
                version: root_version,
            })?;
        let key = mac_key(&key);
        let mut mac = hmac::Context::with_key(&key);
        mac.update(&head);
        mac.update(&sealed);
        Ok(Self {
            key,
            bytes: (head.len() + sealed.len()) as u64,
            path,
            input,
            mac,
            rows: 0,
            changes: 0,
            ended: false,
            failed: None,
            root_version,
            created_at_ms,
            consistent_at_ms: 0,
        })
    }

    fn take(&mut self, n: usize) -> std::result::Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        (&mut self.input)
            .take(n as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("read error: {e}"))?;
        if bytes.len() != n {
            return Err("it is cut short".into());
        }
        self.mac.update(&bytes);
        self.bytes += n as u64;
        Ok(bytes)
    }

    fn u32(&mut self) -> std::result::Result<usize, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes(bytes[..].try_into().expect("4 bytes")) as usize)
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        let bytes = self.take(8)?;
        Ok(u64::from_be_bytes(bytes[..].try_into().expect("8 bytes")))
    }

    /// The next frame's change, `None` after the end frame.
    fn next_frame(&mut self) -> std::result::Result<Option<Item>, String> {
        let tag = self.take(1)?[0];
        match tag {
            ROW | PUT | DELETE => {
                if tag == ROW && self.changes > 0 {
                    return Err("a record follows the changes".into());
                }
                let len = self.u32()?;
                let key = self.take(len)?;
                let value = match tag {
                    DELETE => None,
                    _ => {
                        let len = self.u32()?;
                        Some(self.take(len)?)
                    }
                };
                match tag {
                    ROW => self.rows += 1,
                    _ => self.changes += 1,
                }
                Ok(Some((key, value)))
            }
            END => {
                let (rows, changes) = (self.u64()?, self.u64()?);
                if (rows, changes) != (self.rows, self.changes) {
                    return Err("its counts do not match its records".into());
                }
                self.consistent_at_ms = self.u64()?;
                let mut tag = [0u8; MAC_LEN];
                self.input
                    .read_exact(&mut tag)
                    .map_err(|_| "its MAC is cut short".to_string())?;
                self.bytes += MAC_LEN as u64;
                let expected = self.mac.clone().sign();
                // Compared in constant time: the MACs of the two tags under the same key.
                let key = &self.key;
                if hmac::verify(key, &tag, hmac::sign(key, expected.as_ref()).as_ref()).is_err() {
                    return Err("its MAC does not match (changed or reordered bytes)".into());
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest).map_err(|e| e.to_string())? != 0 {
                    return Err("bytes follow its end".into());
                }
                self.ended = true;
                Ok(None)
            }
            other => Err(format!("unknown frame tag {other:#04x}")),
        }
    }

    fn summary(&self) -> BackupSummary {
        BackupSummary {
            file: self.path.clone(),
            bytes: self.bytes,
            rows: self.rows,
            changes: self.changes,
            root_version: self.root_version,
            created_at_ms: self.created_at_ms,
            consistent_at_ms: self.consistent_at_ms,
        }
    }
}

impl Iterator for MacReader {
    type Item = std::io::Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended || self.failed.is_some() {
            return None;
        }
        match self.next_frame() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => None,
            Err(what) => {
                self.failed = Some(BackupError::Damaged {
                    path: self.path.clone(),
                    what,
                });
                Some(Err(std::io::Error::other("the backup is damaged")))
            }
        }
    }
}

/// Reads the whole backup at `path` (a backup directory or file) and checks
/// it opens under `root` and is intact, without restoring anything.
pub fn verify(path: &Path, root: &SymmetricKey) -> Result<BackupSummary> {
    let mut reader = MacReader::open(path, root)?;
    for item in reader.by_ref() {
        if item.is_err() {
            break;
        }
    }
    finished(reader)
}

/// The reader's summary once it reached its end intact.
fn finished(mut reader: MacReader) -> Result<BackupSummary> {
    if let Some(failed) = reader.failed.take() {
        return Err(failed.into());
    }
    if !reader.ended {
        return Err(BackupError::Damaged {
            path: reader.path.clone(),
            what: "it has no end frame".into(),
        }
        .into());
    }
    Ok(reader.summary())
}

/// Restores the backup at `path` into a new data directory (`store.path`,
/// which must not exist or be empty), offline. The records are written into
/// a sibling directory first, which becomes the data directory only once the
/// whole file checked out and the new store is durable; on any failure it is
/// removed and nothing is left behind.
pub fn restore(path: &Path, store: &StoreOptions, root: &SymmetricKey) -> Result<BackupSummary> {
    let target = &store.path;
    let not_empty = || BackupError::TargetNotEmpty(target.clone());
    if std::fs::read_dir(target).is_ok_and(|mut entries| entries.next().is_some())
        || (target.exists() && !target.is_dir())
    {
        return Err(not_empty().into());
    }
    let mut reader = MacReader::open(path, root)?;
    let name = target
        .file_name()
        .ok_or_else(|| BackupError::TargetNotEmpty(target.clone()))?;
    let mut staging_name = std::ffi::OsString::from(".");
    staging_name.push(name);
    staging_name.push(".restoring");
    let staging = target.with_file_name(staging_name);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|error| BackupError::Write {
            path: staging.clone(),
            error,
        })?;
    }
    let options = StoreOptions {
        path: staging.clone(),
        ..store.clone()
    };
    let imported = SledStore::import(&options, reader.by_ref());
    let outcome = match imported {
        Ok(_) => finished(reader),
        Err(ImportError::Source(_)) => finished(reader).and(Err(BackupError::Damaged {
            path: path.to_owned(),
            what: "it could not be read".into(),
        }
        .into())),
        Err(ImportError::NotEmpty(_)) => Err(not_empty().into()),
        Err(ImportError::Store(e)) => Err(BackupError::Store(e).into()),
    }
    .and_then(|summary| {
        let move_into_place = || -> std::io::Result<()> {
            if target.exists() {
                std::fs::remove_dir(target)?; // empty, checked above
            }
            std::fs::rename(&staging, target)?;
            let parent = target.parent().filter(|p| !p.as_os_str().is_empty());
            sync_dir(parent.unwrap_or(Path::new(".")))
        };
        move_into_place().map_err(|error| BackupError::Write {
            path: target.clone(),
            error,
        })?;
        Ok(summary)
    });
    if outcome.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup that found the directory empty, then another backup's partial
    /// file there when it came to create its own (the other started in
    /// between): it is refused as a used directory, and the other's file is
    /// left as it was.
    #[tokio::test]
    async fn a_backup_leaves_a_partial_file_it_did_not_create() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::open_for_test(&tmp.path().join("store")).await;
        let dir = tmp.path().join("backup");
        std::fs::create_dir(&dir).unwrap();
        let partial = dir.join(PARTIAL_NAME);
        std::fs::write(&partial, b"another backup's").unwrap();
        let other = File::open(&partial).unwrap();
        other.lock().unwrap();

        let error = vault
            .write_backup(&dir)
            .expect_err("the partial file exists");
        assert!(
            matches!(error, BackupError::DirectoryNotEmpty(_)),
            "{error}"
        );
        assert_eq!(std::fs::read(&partial).unwrap(), b"another backup's");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    /// A backup that found the directory empty, then another backup's finished
    /// file there once it had made its own partial file (the other ran whole
    /// in between): refused, and the other's backup is not replaced.
    #[tokio::test]
    async fn a_backup_never_renames_over_a_backup_finished_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::open_for_test(&tmp.path().join("store")).await;
        let dir = tmp.path().join("backup");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), b"another backup").unwrap();

        let error = vault.write_backup(&dir).expect_err("a backup is there");
        assert!(
            matches!(error, BackupError::DirectoryNotEmpty(_)),
            "{error}"
        );
        assert_eq!(
            std::fs::read(dir.join(FILE_NAME)).unwrap(),
            b"another backup"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "its partial file went"
        );
    }
}
