//! Unit tests of the spill directory.

use futures::TryStreamExt as _;

use super::*;

fn addr(n: u8) -> CAddr {
    CAddr::from_bytes([n; 32])
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Flips one content byte (after the header) of the file of `a`.
fn damage(dir: &Path, a: &CAddr, at: usize) {
    let path = dir.join(a.to_hex());
    let mut bytes = fs::read(&path).unwrap();
    bytes[HEADER_LEN + at] ^= 0x01;
    fs::write(&path, bytes).unwrap();
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn put_get_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SpillStore::open(tmp.path(), 1 << 20).unwrap();
    assert_eq!(store.budget(), 1 << 20);
    let bytes = data(1000, 7);
    assert!(store.put(addr(1), &bytes).unwrap());
    assert!(store.contains(&addr(1)));
    assert_eq!(store.get(&addr(1)).unwrap().unwrap(), bytes);
    assert_eq!(store.get(&addr(2)).unwrap(), None);

    // The file layout: the address's hex, a BLAKE3 header, then the content.
    assert_eq!(file_names(tmp.path()), vec![addr(1).to_hex()]);
    let raw = fs::read(tmp.path().join(addr(1).to_hex())).unwrap();
    assert_eq!(&raw[..HEADER_LEN], CAddr::for_leaf(&bytes).as_bytes());
    assert_eq!(&raw[HEADER_LEN..], &bytes[..]);

    let s = store.stats();
    assert_eq!((s.hits(), s.misses(), s.writes()), (1, 1, 1));
    assert_eq!((s.bytes(), s.entries(), s.evictions()), (1000, 1, 0));

    // A put replaces the entry, and the accounting follows.
    let other = data(300, 9);
    assert!(store.put(addr(1), &other).unwrap());
    assert_eq!(store.get(&addr(1)).unwrap().unwrap(), other);
    assert_eq!((s.bytes(), s.entries(), s.writes()), (300, 1, 2));

    // An empty output is an entry too.
    assert!(store.put(addr(3), b"").unwrap());
    assert_eq!(store.get(&addr(3)).unwrap().unwrap(), Bytes::new());
}

#[test]
fn evicts_least_recently_used_by_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SpillStore::open(tmp.path(), 300).unwrap();
    for n in 1..=3 {
        assert!(store.put(addr(n), &data(100, n)).unwrap());
    }
    let s = store.stats();
    assert_eq!((s.bytes(), s.entries(), s.evictions()), (300, 3, 0));

    // Reading 1 makes 2 the least recently used.
    store.get(&addr(1)).unwrap().unwrap();
    assert!(store.put(addr(4), &data(100, 4)).unwrap());
    assert!(store.contains(&addr(1)));
    assert!(!store.contains(&addr(2)));
    assert!(store.contains(&addr(3)));
    assert!(store.contains(&addr(4)));
    assert_eq!((s.bytes(), s.entries(), s.evictions()), (300, 3, 1));

    // A big one pushes out as many as it needs, oldest first: 3, then 1.
    assert!(store.put(addr(5), &data(150, 5)).unwrap());
    assert!(!store.contains(&addr(3)));
    assert!(!store.contains(&addr(1)));
    assert!(store.contains(&addr(4)));
    assert!(store.contains(&addr(5)));
    assert_eq!((s.bytes(), s.entries(), s.evictions()), (250, 2, 3));
    assert_eq!(s.writes(), 5);

    let mut expected = vec![addr(4).to_hex(), addr(5).to_hex()];
    expected.sort();
    assert_eq!(file_names(tmp.path()), expected, "evicted files are gone");
}

#[test]
fn refuses_data_larger_than_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SpillStore::open(tmp.path(), 100).unwrap();
    assert!(store.put(addr(1), &data(60, 1)).unwrap());
    assert!(!store.put(addr(2), &data(101, 2)).unwrap());
    assert!(!store.contains(&addr(2)));
    assert!(store.contains(&addr(1)), "a refused put evicts nothing");
    let s = store.stats();
    assert_eq!(
        (s.bytes(), s.entries(), s.writes(), s.evictions()),
        (60, 1, 1, 0)
    );
    assert_eq!(file_names(tmp.path()), vec![addr(1).to_hex()]);
    // Exactly the budget fits.
    assert!(store.put(addr(3), &data(100, 3)).unwrap());
    assert_eq!((s.bytes(), s.entries()), (100, 1));
}

#[test]
fn damaged_file_gives_corrupted_from_get_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SpillStore::open(tmp.path(), 1 << 20).unwrap();
    assert!(store.put(addr(1), &data(500, 1)).unwrap());
    damage(tmp.path(), &addr(1), 250);
    match store.get(&addr(1)) {
        Err(DerivaError::Corrupted { addr: a, detail }) => {
            assert_eq!(a, addr(1), "the recipe address, not the content hash");
            let dir = tmp.path().display().to_string();
            assert!(
                detail.contains("the spill file") && !detail.contains(&dir),
                "names the spill file, not its path: {detail}"
            );
            assert!(detail.contains("500 bytes"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!store.contains(&addr(1)));
    assert_eq!((store.stats().bytes(), store.stats().entries()), (0, 0));
    assert!(file_names(tmp.path()).is_empty());
    assert_eq!(store.get(&addr(1)).unwrap(), None);
}

#[tokio::test]
async fn damaged_file_ends_the_stream_with_corrupted_after_the_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SpillStore::open(tmp.path(), 1 << 20).unwrap());
    assert!(store.put(addr(1), &data(1000, 1)).unwrap());
    damage(tmp.path(), &addr(1), 999);
    let items: Vec<Result<Bytes>> = store
        .stream(addr(1), 256)
        .await
        .unwrap()
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 5, "4 chunks, then the error: {items:?}");
    let lens: Vec<usize> = items[..4]
        .iter()
        .map(|c| c.as_ref().unwrap().len())
        .collect();
    assert_eq!(lens, vec![256, 256, 256, 232]);
    match &items[4] {
        Err(DerivaError::Corrupted { addr: a, detail }) => {
            assert_eq!(*a, addr(1));
            let dir = tmp.path().display().to_string();
            assert!(
                detail.contains("the spill file") && !detail.contains(&dir),
                "names the spill file, not its path: {detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!store.contains(&addr(1)), "the corrupted entry is removed");
    assert_eq!(store.stats().bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_yields_chunks_of_the_requested_size() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SpillStore::open(tmp.path(), 1 << 20).unwrap());
    let bytes = data(10_000, 3);
    assert!(store.put(addr(1), &bytes).unwrap());

    let chunks: Vec<Bytes> = store
        .stream(addr(1), 4096)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
    assert_eq!(lens, vec![4096, 4096, 1808]);
    assert_eq!(chunks.concat(), bytes);

    // An exact multiple, and a chunk larger than the whole.
    let chunks: Vec<Bytes> = store
        .stream(addr(1), 2500)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks.concat(), bytes);
    let chunks: Vec<Bytes> = store
        .stream(addr(1), 1 << 20)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks.concat(), bytes);

    // Absent: no stream, a miss.
    assert!(store.stream(addr(2), 4096).await.unwrap().is_none());
    let s = store.stats();
    assert_eq!((s.hits(), s.misses()), (3, 1));

    // An empty output is one empty chunk.
    assert!(store.put(addr(3), b"").unwrap());
    let chunks: Vec<Bytes> = store
        .stream(addr(3), 4096)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(chunks, vec![Bytes::new()]);
}

#[tokio::test]
async fn stream_survives_removal_of_its_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SpillStore::open(tmp.path(), 1 << 20).unwrap());
    let bytes = data(3000, 4);
    assert!(store.put(addr(1), &bytes).unwrap());
    let mut stream = store.stream(addr(1), 1000).await.unwrap().unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(store.remove(&addr(1)));
    assert!(file_names(tmp.path()).is_empty());
    let rest: Vec<Bytes> = stream.try_collect().await.unwrap();
    assert_eq!([vec![first], rest].concat().concat(), bytes);
}

#[tokio::test]
async fn stream_touches_lru() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SpillStore::open(tmp.path(), 200).unwrap());
    assert!(store.put(addr(1), &data(100, 1)).unwrap());
    assert!(store.put(addr(2), &data(100, 2)).unwrap());
    drop(store.stream(addr(1), 64).await.unwrap().unwrap());
    assert!(store.put(addr(3), &data(100, 3)).unwrap());
    assert!(store.contains(&addr(1)));
    assert!(!store.contains(&addr(2)));
}

#[test]
fn open_empties_a_dir_with_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spill");
    {
        let store = SpillStore::open(&dir, 1 << 20).unwrap();
        assert!(store.put(addr(1), &data(100, 1)).unwrap());
    }
    fs::write(dir.join(format!("{}.7.tmp", addr(2).to_hex())), b"partial").unwrap();
    fs::write(dir.join("stray"), b"x").unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    fs::write(dir.join("sub").join("f"), b"y").unwrap();
    assert_eq!(file_names(&dir).len(), 4);

    let store = SpillStore::open(&dir, 1 << 20).unwrap();
    assert!(file_names(&dir).is_empty());
    assert!(!store.contains(&addr(1)));
    assert_eq!(store.get(&addr(1)).unwrap(), None);
    assert_eq!((store.stats().bytes(), store.stats().entries()), (0, 0));
}

#[test]
fn remove_and_clear_update_the_accounting() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SpillStore::open(tmp.path(), 1 << 20).unwrap();
    for n in 1..=4 {
        assert!(store.put(addr(n), &data(100 * n as usize, n)).unwrap());
    }
    let s = store.stats();
    assert_eq!((s.bytes(), s.entries()), (1000, 4));

    assert!(store.remove(&addr(2)));
    assert!(!store.remove(&addr(2)));
    assert!(!store.contains(&addr(2)));
    assert_eq!((s.bytes(), s.entries()), (800, 3));
    assert_eq!(file_names(tmp.path()).len(), 3);

    assert_eq!(store.clear(), 3);
    assert_eq!((s.bytes(), s.entries()), (0, 0));
    assert!(file_names(tmp.path()).is_empty());
    assert_eq!(store.clear(), 0);
    assert_eq!(s.evictions(), 0, "removals are not evictions");
}

#[test]
fn concurrent_puts_and_removes_keep_the_accounting_right() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SpillStore::open(tmp.path(), 2000).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let a = addr(i % 8);
                    match (i + t) % 3 {
                        0 => {
                            store.remove(&a);
                        }
                        _ => {
                            store.put(a, &data(100 + usize::from(t) * 10, i)).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let on_disk: u64 = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len() - HEADER_LEN as u64)
        .sum();
    let s = store.stats();
    assert_eq!(s.bytes(), on_disk);
    assert_eq!(s.entries() as usize, file_names(tmp.path()).len());
    assert!(s.bytes() <= store.budget());
}
