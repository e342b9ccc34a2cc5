//! Unit tests of the store facade that need its internals (raw records, counters).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::index::tests::put_raw;
use super::*;
use crate::key::{PrimaryKey, VariantKey};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn entry(url: &str) -> Entry {
    Entry {
        url: url.to_string(),
        status: 200,
        headers: HeaderList::new(),
        vary: Vec::new(),
        freshness: Freshness {
            request_time: at(1000),
            response_time: at(1000),
            corrected_initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            no_cache: false,
        },
        tags: vec!["t".into()],
        stored_at: at(1000),
        body: BodyInfo::default(),
    }
}

fn vary(v: &str) -> Vec<(String, Option<String>)> {
    vec![("accept".into(), Some(v.into()))]
}

#[tokio::test]
async fn an_undecodable_record_is_dropped_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let good = VariantKey::new(&p, &vary("a"));
    let bad = VariantKey::new(&p, &vary("b"));
    let mut w = store.begin_write(good, entry(p.url()));
    w.write(b"hello").await.unwrap();
    w.commit(None).await.unwrap();
    put_raw(&store.shared().index, &bad, &[1, 0xff, 0xff]);

    let found = store.variants(&p).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, good);
    assert_eq!(store.get(&bad).unwrap(), None);
    assert_eq!(store.stats().dropped_records, 1);
    // An unknown version byte is dropped the same way, through get().
    put_raw(&store.shared().index, &bad, &[99, 0]);
    assert_eq!(store.get(&bad).unwrap(), None);
    assert_eq!(store.variants(&p).unwrap().len(), 1);
}

#[tokio::test]
async fn a_damaged_inline_body_is_refused_before_any_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let key = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(key, entry(p.url()));
    w.write(b"hello").await.unwrap();
    let mut stored = w.commit(Some(5)).await.unwrap();
    // Same length and hash, different bytes: as if the record's body bytes rotted.
    stored.body.inline = Some(bytes::Bytes::from_static(b"jello"));
    put_raw(
        &store.shared().index,
        &key,
        &format::encode_entry(&stored).unwrap(),
    );

    let got = store.get(&key).unwrap().unwrap();
    let err = store.open_body(&key, &got).await.err().unwrap();
    assert!(matches!(err, StoreError::BodyCorrupt { .. }), "{err}");
    assert_eq!(store.get(&key).unwrap(), None);
    assert_eq!(store.stats().damaged_bodies, 1);
}

#[tokio::test]
async fn inline_max_is_the_last_inline_size() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        inline_max: 10,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).unwrap();
    for (n, inline) in [(10, true), (11, false)] {
        let p = PrimaryKey::new("http", "x", &format!("/{n}"));
        let key = VariantKey::new(&p, &[]);
        let mut w = store.begin_write(key, entry(p.url()));
        // In two chunks, so the spill happens mid-body.
        w.write(&[b'a'; 6]).await.unwrap();
        w.write(&vec![b'b'; n - 6]).await.unwrap();
        let e = w.commit(Some(n as u64)).await.unwrap();
        assert_eq!(e.body.inline.is_some(), inline, "{n} bytes");
        let mut want = vec![b'a'; 6];
        want.extend(vec![b'b'; n - 6]);
        assert_eq!(store.read_body_to_vec(&key, &e).await.unwrap(), want);
    }
}

#[test]
fn options_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        inline_max: MAX_INLINE_MAX + 1,
        ..StoreOptions::default()
    };
    assert!(matches!(
        Store::open(dir.path(), opts),
        Err(StoreError::InvalidOptions(_))
    ));
}

fn is_send<T: Send>(_: &T) {}

#[tokio::test]
async fn handles_and_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn stream<
        T: futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
    >() {
    }
    send_sync::<Store>();
    stream::<BodyStream>();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/");
    let key = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(key, entry(p.url()));
    is_send(&w);
    let write = w.write(b"x");
    is_send(&write);
    write.await.unwrap();
    let commit = w.commit(None);
    is_send(&commit);
    let e = commit.await.unwrap();
    let open = store.open_body(&key, &e);
    is_send(&open);
    let flush = store.flush();
    is_send(&flush);
    open.await.unwrap();
    flush.await.unwrap();
}

async fn collect_range(
    store: &Store,
    k: &VariantKey,
    e: &Entry,
    start: u64,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    let mut s = store.open_body_range(k, e, start, len).await?;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.map_err(|e| StoreError::Io {
            path: PathBuf::new(),
            source: e,
        })?);
    }
    Ok(out)
}

#[tokio::test]
async fn open_body_range_slices_inline_and_file_bodies_and_rejects_bad_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for (i, len) in [1000usize, 300_000].into_iter().enumerate() {
        let p = PrimaryKey::new("http", "x", &format!("/{i}"));
        let k = VariantKey::new(&p, &[]);
        let body: Vec<u8> = (0..len).map(|j| (j * 13 % 251) as u8).collect();
        let mut w = store.begin_write(k, entry(p.url()));
        w.write(&body).await.unwrap();
        let e = w.commit(None).await.unwrap();
        assert_eq!(e.body.inline.is_some(), len < 16 * 1024);
        for (start, n) in [
            (0, 1),
            (10, 100),
            (len as u64 - 70_000.min(len as u64 - 1), 5),
        ] {
            let got = collect_range(&store, &k, &e, start, n).await.unwrap();
            assert_eq!(
                got,
                body[start as usize..(start + n) as usize],
                "{len}: {start}+{n}"
            );
        }
        // Twice: the second read takes the verified-file path.
        let tail = collect_range(&store, &k, &e, len as u64 - 10, 10)
            .await
            .unwrap();
        assert_eq!(tail, body[len - 10..]);
        assert!(matches!(
            store.open_body_range(&k, &e, len as u64 - 1, 2).await,
            Err(StoreError::InvalidOptions(_))
        ));
        assert!(store.open_body_range(&k, &e, u64::MAX, 2).await.is_err());
    }
}

#[tokio::test]
async fn open_body_range_rehashes_a_file_changed_after_verification() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/f");
    let k = VariantKey::new(&p, &[]);
    let body = vec![7u8; 200_000];
    let mut w = store.begin_write(k, entry(p.url()));
    w.write(&body).await.unwrap();
    let e = w.commit(None).await.unwrap();
    assert_eq!(
        collect_range(&store, &k, &e, 0, 10).await.unwrap(),
        vec![7u8; 10]
    );
    // Damage far from the range asked: only a whole-file check can see it.
    let path = store.shared().bodies.path_of(&e.body.blake3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150_000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        store.open_body_range(&k, &e, 0, 10).await,
        Err(StoreError::BodyCorrupt { .. })
    ));
    assert_eq!(store.get(&k).unwrap(), None, "the damaged entry is dropped");
    assert_eq!(store.stats().damaged_bodies, 1);
}

#[tokio::test]
async fn a_committed_body_file_counts_as_verified_for_range_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let p = PrimaryKey::new("http", "x", "/v");
    let k = VariantKey::new(&p, &[]);
    let mut w = store.begin_write(k, entry(p.url()));
    w.write(&vec![3u8; 200_000]).await.unwrap();
    let e = w.commit(None).await.unwrap();
    // The writer hashed it: the first range read seeks without hashing the file again.
    let path = store.shared().bodies.path_of(&e.body.blake3);
    let stamp = bodies::FileStamp::of(&std::fs::metadata(&path).unwrap());
    assert!(store.shared().verified.is_verified(&e.body.blake3, &stamp));
    assert_eq!(
        collect_range(&store, &k, &e, 199_990, 10).await.unwrap(),
        vec![3u8; 10]
    );
}
