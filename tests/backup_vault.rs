//! Backups at the library level, over a real sled store: a backup that a root
//! key rotation overtakes is refused (its records would need the new root key
//! while its header is sealed under the old one), and every backup that is
//! written restores with the root key it names. The partial file a killed
//! backup left is removed by the next backup into its directory; one a live
//! backup holds is never touched.

mod common;

use std::fs::File;
use std::path::Path;
use std::sync::Barrier;
use std::time::Duration;

use credvault::crypto::SymmetricKey;
use credvault::store::StoreOptions;
use credvault::vault::backup;
use credvault::vault::{Kind, Vault, VaultOptions};

use common::{TestVault, key, open_store, open_vault};

/// Where a backup writes until it renames the file into place.
const PARTIAL: &str = ".credvault.backup.partial";

#[test]
fn a_backup_overtaken_by_a_root_rotation_is_refused_and_every_other_restores() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tv = rt.block_on(async {
        let tv = TestVault::new(VaultOptions::default()).await;
        for n in 0..1500 {
            tv.seal(
                &format!("t{}", n % 10),
                &format!("c{n}"),
                Kind::CookieJar,
                &[n as u8; 2048],
            )
            .await;
        }
        tv
    });
    let tmp = tempfile::tempdir().unwrap();
    let mut roots = vec![tv.root];
    let (mut refused, mut written) = (0, 0);
    for attempt in 0..40u64 {
        let new_root = *SymmetricKey::generate().expose_bytes();
        let dir = tmp.path().join(format!("b{attempt}"));
        let vault: &Vault = tv.vault();
        let rotate = || rt.block_on(vault.rotate_root_key(key(&new_root)));
        // Odd attempts rotate once the backup has returned; even ones while
        // its scan runs, a little later each time.
        let (backup, rotated) = match attempt % 2 {
            1 => (vault.backup(&dir), rotate()),
            _ => std::thread::scope(|s| {
                let backup = s.spawn(|| vault.backup(&dir));
                std::thread::sleep(Duration::from_micros(500 * (attempt / 2 % 20)));
                let rotated = rotate();
                (backup.join().unwrap(), rotated)
            }),
        };
        rotated.unwrap();
        roots.push(new_root);
        match backup {
            Ok(summary) => {
                written += 1;
                let root = roots[summary.root_version as usize - 1];
                let target = tmp.path().join(format!("restored{attempt}"));
                backup::restore(&dir, &StoreOptions::new(&target), &key(&root))
                    .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
                let store = open_store(&target);
                let restored = rt
                    .block_on(open_vault(
                        &store,
                        &root,
                        &tv.clock,
                        VaultOptions::default(),
                    ))
                    .unwrap_or_else(|e| panic!("attempt {attempt}: the restored store: {e}"));
                let unsealed = rt.block_on(restored.unseal("t3", "c13", None)).unwrap();
                assert_eq!(unsealed.secret.expose(), &[13u8; 2048][..]);
                drop(restored);
                drop(store);
            }
            Err(error) => {
                assert_eq!(
                    error.reason(),
                    "ROOT_KEY_ROTATED",
                    "attempt {attempt}: {error}"
                );
                refused += 1;
                assert!(!dir.exists(), "a refused backup leaves nothing");
            }
        }
        if refused > 0 && written > 0 && attempt >= 10 {
            break;
        }
    }
    assert!(
        refused > 0,
        "no rotation landed inside a backup in 40 attempts"
    );
    assert!(written > 0, "no backup ran clear of the rotation");
}

/// A vault with a few secrets, made on a runtime of its own (backups block).
fn small_vault() -> TestVault {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tv = TestVault::new(VaultOptions::default()).await;
        for n in 0..5u8 {
            tv.seal("acme", &format!("c{n}"), Kind::ApiKey, &[n; 64])
                .await;
        }
        tv
    })
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A new directory `b` in `tmp` holding only a partial file of `bytes`, unlocked.
fn with_partial(tmp: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let dir = tmp.join("b");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(PARTIAL), bytes).unwrap();
    dir
}

/// The reason a backup into a directory holding another file is refused with.
fn not_empty_reason(tv: &TestVault, tmp: &Path) -> &'static str {
    let used = tmp.join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("other"), b"keep").unwrap();
    tv.vault().backup(&used).expect_err("not empty").reason()
}

/// A backup killed mid-write leaves its partial file (and no lock on it): the
/// next backup into that directory removes it and writes an intact backup.
#[test]
fn a_partial_file_left_by_a_killed_backup_is_replaced_by_the_next_backup() {
    let tv = small_vault();
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_partial(tmp.path(), b"CVBACKUP\x01 cut short by a kill");

    let written = tv.vault().backup(&dir).expect("backup over a leftover");
    assert_eq!(names(&dir), [backup::FILE_NAME]);
    let checked = backup::verify(&dir, &key(&tv.root)).expect("the backup verifies");
    assert_eq!(
        (checked.rows, checked.changes, checked.bytes),
        (written.rows, written.changes, written.bytes)
    );
    assert!(written.rows > 0, "{written:?}");
}

/// A partial file whose lock is held belongs to a backup still writing it:
/// refused as any used directory is, and the file is left as it was.
#[test]
fn a_partial_file_a_live_backup_holds_is_left_and_the_directory_refused() {
    let tv = small_vault();
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_partial(tmp.path(), b"being written");
    let partial = dir.join(PARTIAL);
    let writer = File::open(&partial).unwrap();
    writer.lock().unwrap();

    let error = tv
        .vault()
        .backup(&dir)
        .expect_err("another backup is writing");
    assert_eq!(error.reason(), not_empty_reason(&tv, tmp.path()), "{error}");
    assert_eq!(error.reason(), "BACKUP_DIRECTORY_NOT_EMPTY");
    assert_eq!(names(&dir), [PARTIAL]);
    assert_eq!(std::fs::read(&partial).unwrap(), b"being written");

    // Once its writer is gone, it is a leftover.
    drop(writer);
    tv.vault()
        .backup(&dir)
        .expect("backup once the lock is released");
    assert_eq!(names(&dir), [backup::FILE_NAME]);
}

/// Only a partial file alone is taken for a leftover: beside anything else
/// the directory is refused and nothing in it changes.
#[test]
fn a_partial_file_beside_another_file_is_left_and_the_directory_refused() {
    let tv = small_vault();
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_partial(tmp.path(), b"left");
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();

    let error = tv.vault().backup(&dir).expect_err("not empty");
    assert_eq!(error.reason(), "BACKUP_DIRECTORY_NOT_EMPTY", "{error}");
    assert_eq!(names(&dir), [PARTIAL, "notes.txt"]);
    assert_eq!(std::fs::read(dir.join(PARTIAL)).unwrap(), b"left");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
}

/// Two stores backed up into one directory at the same moment (two servers
/// given the same path): one backup is written, the other refused, and the
/// loser never removes the winner's partial file (which would fail both).
#[test]
fn of_two_backups_racing_into_one_directory_one_is_written_intact() {
    let vaults = [small_vault(), small_vault()];
    let tmp = tempfile::tempdir().unwrap();
    for attempt in 0..20 {
        let dir = tmp.path().join(format!("b{attempt}"));
        std::fs::create_dir(&dir).unwrap();
        let start = Barrier::new(2);
        let outcomes: Vec<_> = std::thread::scope(|s| {
            let backups: Vec<_> = vaults
                .iter()
                .map(|tv| {
                    let (dir, start) = (&dir, &start);
                    s.spawn(move || {
                        start.wait();
                        tv.vault().backup(dir)
                    })
                })
                .collect();
            backups.into_iter().map(|b| b.join().unwrap()).collect()
        });
        let written: Vec<usize> = (0..2).filter(|&i| outcomes[i].is_ok()).collect();
        assert_eq!(
            written.len(),
            1,
            "attempt {attempt}: {:?}",
            outcomes
                .iter()
                .map(|o| o.as_ref().map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        );
        let loser = outcomes[1 - written[0]].as_ref().unwrap_err();
        assert_eq!(loser.reason(), "BACKUP_DIRECTORY_NOT_EMPTY", "{loser}");
        assert_eq!(names(&dir), [backup::FILE_NAME]);
        backup::verify(&dir, &key(&vaults[written[0]].root))
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
    }
}
