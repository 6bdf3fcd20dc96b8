//! Backups at the library level, over a real sled store: a backup that a root
//! key rotation overtakes is refused (its records would need the new root key
//! while its header is sealed under the old one), and every backup that is
//! written restores with the root key it names.

mod common;

use std::time::Duration;

use credvault::crypto::SymmetricKey;
use credvault::store::StoreOptions;
use credvault::vault::backup;
use credvault::vault::{Kind, Vault, VaultOptions};

use common::{TestVault, key, open_store, open_vault};

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
