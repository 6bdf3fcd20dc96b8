//! How the sled backend stores ordered logs ([`Op::Append`](super::Op::Append)):
//! packed into pages of consecutive entries, not one tree record per entry.
//!
//! An insert into sled costs 12–25 µs of CPU whatever its size (measured on
//! the development machine; decision 0001, session 3), and an audited Unseal
//! appends one audit record: one tree record per entry made the audit log cost
//! more than the Unseal. A page holds the entries of up to [`PAGE_BYTES`] and is
//! rewritten whole when a group appends to it, so a group of appends costs one
//! insert.
//!
//! The packing is invisible above the backend: entries keep their keys
//! (`prefix ‖ seq`) for `get`, `scan`, `last`, checks, puts and deletes. Pages
//! live under their own key, `L\0 ‖ prefix ‖ first seq (u64 BE)`, and hold
//! entries in sequence order, each `u64 BE seq ‖ u32 BE length ‖ value`.

/// A page stops taking appends once it holds this many bytes.
pub(super) const PAGE_BYTES: usize = 8 << 10;

const PAGES: &[u8] = b"L\0";
const ENTRY_HEADER: usize = 12;

/// The prefix of every page of the log under `prefix`.
pub(super) fn pages_prefix(prefix: &[u8]) -> Vec<u8> {
    [PAGES, prefix].concat()
}

/// The key of the page of the log under `prefix` whose first entry is `first`.
pub(super) fn page_key(prefix: &[u8], first: u64) -> Vec<u8> {
    [PAGES, prefix, &first.to_be_bytes()].concat()
}

/// The log prefix and sequence number of an entry key, if `key` is one.
pub(super) fn entry_of<'k>(logs: &[&'k [u8]], key: &[u8]) -> Option<(&'k [u8], u64)> {
    logs.iter().find_map(|prefix| {
        let seq = key.strip_prefix(*prefix)?.try_into().ok()?;
        Some((*prefix, u64::from_be_bytes(seq)))
    })
}

/// The entries of a page, in order. A page that does not parse yields the
/// entries before the damage (pages are only written by this module).
pub(super) fn entries(page: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = page;
    std::iter::from_fn(move || {
        let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(rest.get(8..ENTRY_HEADER)?.try_into().ok()?) as usize;
        let value = rest.get(ENTRY_HEADER..ENTRY_HEADER.checked_add(len)?)?;
        rest = &rest[ENTRY_HEADER + len..];
        Some((seq, value))
    })
}

/// Appends an entry to a page.
pub(super) fn push(page: &mut Vec<u8>, seq: u64, value: &[u8]) {
    page.reserve(ENTRY_HEADER + value.len());
    page.extend_from_slice(&seq.to_be_bytes());
    // Values are bounded far below 4 GiB by the group size limit.
    page.extend_from_slice(&(value.len() as u32).to_be_bytes());
    page.extend_from_slice(value);
}

/// The page with entry `seq` set to `value` (`None`: removed), keeping
/// sequence order.
pub(super) fn with_entry(page: &[u8], seq: u64, value: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(page.len() + value.map_or(0, |v| v.len() + ENTRY_HEADER));
    let mut placed = value.is_none();
    for (at, old) in entries(page) {
        if !placed && at > seq {
            push(&mut out, seq, value.unwrap_or_default());
            placed = true;
        }
        if at != seq {
            push(&mut out, at, old);
        } else if let Some(value) = value.filter(|_| !placed) {
            push(&mut out, seq, value);
            placed = true;
        }
    }
    if !placed && let Some(value) = value {
        push(&mut out, seq, value);
    }
    out
}

/// The value of entry `seq` in a page.
pub(super) fn find(page: &[u8], seq: u64) -> Option<&[u8]> {
    entries(page).find(|(at, _)| *at == seq).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(items: &[(u64, &str)]) -> Vec<u8> {
        let mut page = Vec::new();
        for (seq, value) in items {
            push(&mut page, *seq, value.as_bytes());
        }
        page
    }

    fn items(page: &[u8]) -> Vec<(u64, String)> {
        entries(page)
            .map(|(s, v)| (s, String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn entries_round_trip_and_edits_keep_order() {
        let p = page(&[(3, "c"), (4, ""), (6, "f")]);
        assert_eq!(
            items(&p),
            [(3, "c".into()), (4, "".into()), (6, "f".into())]
        );
        assert_eq!(find(&p, 4), Some(&b""[..]));
        assert_eq!(find(&p, 5), None);
        let edited = with_entry(&p, 4, Some(b"d"));
        assert_eq!(
            items(&edited),
            [(3, "c".into()), (4, "d".into()), (6, "f".into())]
        );
        let inserted = with_entry(&p, 5, Some(b"e"));
        assert_eq!(
            items(&inserted).iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        let first = with_entry(&p, 1, Some(b"a"));
        assert_eq!(items(&first)[0], (1, "a".into()));
        let last = with_entry(&p, 9, Some(b"z"));
        assert_eq!(items(&last)[3], (9, "z".into()));
        let removed = with_entry(&p, 3, None);
        assert_eq!(items(&removed), [(4, "".into()), (6, "f".into())]);
        assert_eq!(with_entry(&p, 5, None), p);
    }

    #[test]
    fn a_damaged_page_yields_the_entries_before_the_damage() {
        let p = page(&[(1, "one"), (2, "two")]);
        assert_eq!(items(&p[..p.len() - 1]), [(1, "one".into())]);
        assert!(items(&p[..5]).is_empty());
    }

    #[test]
    fn entry_keys_are_recognised_only_with_a_full_sequence_number() {
        let logs: &[&[u8]] = &[b"a\0", b"e\0"];
        let key = crate::store::log_key(b"a\0", 7);
        assert_eq!(entry_of(logs, &key), Some((&b"a\0"[..], 7)));
        assert_eq!(entry_of(logs, b"a\0short"), None);
        assert_eq!(entry_of(logs, b"x\0\0\0\0\0\0\0\0\x01"), None);
        assert!(page_key(b"a\0", 1) > page_key(b"a\0", 0));
        assert!(page_key(b"a\0", 1).starts_with(&pages_prefix(b"a\0")));
    }
}
