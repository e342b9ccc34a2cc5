//! The page-table-free reader behind `larder dump --offline`, against sled itself: after random writes, and after kill -9 at random moments, it must see exactly the state that sled's own recovery rebuilds, and write nothing while it reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder::key::{PrimaryKey, VariantKey};
use larder::store::{ReadOnlyStore, Store, StoreError, StoreOptions};

use crate::support::Rng;

const TREES: [&str; 3] = ["a", "b", "c"];

type Contents = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A key of about 20 000 in each tree, so that the trees get many leaves, index levels,
/// splits and (with the removes) merges.
fn key(rng: &mut Rng) -> Vec<u8> {
    format!("key/{:06}", rng.below(20_000)).into_bytes()
}

/// Mostly small values; one in 300 is 200 KiB, which sled writes to a blob file.
fn value(rng: &mut Rng) -> Vec<u8> {
    let len = if rng.below(300) == 0 {
        200 << 10
    } else {
        rng.index(300)
    };
    let seed = rng.next() as u8;
    (0..len).map(|i| (i as u8).wrapping_add(seed)).collect()
}

/// One random write: an insert, a remove, or a transaction over two trees.
fn random_write(db: &sled::Db, trees: &[sled::Tree], rng: &mut Rng) {
    use sled::Transactional;
    let tree = &trees[rng.index(trees.len())];
    match rng.below(10) {
        0..=5 => {
            tree.insert(key(rng), value(rng)).unwrap();
        }
        6..=8 => {
            tree.remove(key(rng)).unwrap();
        }
        _ => {
            let (k, v) = (key(rng), value(rng));
            (&trees[0], &trees[1])
                .transaction(|(a, b)| {
                    a.insert(k.as_slice(), v.as_slice())?;
                    b.remove(k.as_slice())?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .unwrap();
        }
    }
    let _ = db;
}

/// `open()`, tried again for up to 10 s while it fails as `locked`: sled releases its lock only
/// once its threads let go of a handle dropped in this process.
fn until_unlocked<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(e) if Instant::now() < deadline && locked(&e) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

fn sled_locked(e: &sled::Error) -> bool {
    e.to_string().contains("lock")
}

fn open_sled(dir: &Path) -> sled::Db {
    let config = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(1 << 20);
    until_unlocked(|| config.open(), sled_locked)
        .unwrap_or_else(|e| panic!("sled cannot open {}: {e}", dir.display()))
}

fn open_read_only(dir: &Path) -> Arc<sled::ReadOnlyDb> {
    let config = sled::Config::new().path(dir);
    until_unlocked(|| config.open_read_only(tempfile::tempfile), sled_locked)
        .unwrap_or_else(|e| panic!("the read-only reader cannot open {}: {e}", dir.display()))
        .expect("a database is there")
}

fn sled_contents(db: &sled::Db) -> Contents {
    TREES
        .iter()
        .map(|name| {
            let tree = db.open_tree(name).unwrap();
            let pairs = tree
                .iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect();
            (name.to_string(), pairs)
        })
        .collect()
}

fn read_only_contents(db: &Arc<sled::ReadOnlyDb>) -> Contents {
    TREES
        .iter()
        .map(|name| {
            let pairs = match db.tree(name.as_bytes()) {
                Some(tree) => tree
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.unwrap();
                        (k.to_vec(), v.to_vec())
                    })
                    .collect(),
                None => BTreeMap::new(),
            };
            (name.to_string(), pairs)
        })
        .collect()
}

/// Point reads and prefix scans of the read-only reader agree with `contents`.
fn check_lookups(db: &Arc<sled::ReadOnlyDb>, contents: &Contents, rng: &mut Rng) {
    for name in TREES {
        let Some(tree) = db.tree(name.as_bytes()) else {
            continue;
        };
        let expected = &contents[name];
        for _ in 0..300 {
            let k = key(rng);
            assert_eq!(
                tree.get(&k).unwrap().map(|v| v.to_vec()),
                expected.get(&k).cloned(),
                "get {} in {name}",
                String::from_utf8_lossy(&k)
            );
        }
        for _ in 0..20 {
            let prefix = format!("key/{:04}", rng.below(200)).into_bytes();
            let got: Vec<Vec<u8>> = tree
                .scan_prefix(&prefix)
                .map(|kv| kv.unwrap().0.to_vec())
                .collect();
            let want: Vec<Vec<u8>> = expected
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            assert_eq!(
                got,
                want,
                "scan_prefix {}",
                String::from_utf8_lossy(&prefix)
            );
        }
    }
}

/// Every file under `dir` with its length and a hash of its bytes.
fn fingerprint(dir: &Path) -> BTreeMap<String, (u64, blake3::Hash)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for item in std::fs::read_dir(&d).unwrap() {
            let path = item.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(name, (bytes.len() as u64, blake3::hash(&bytes)));
            }
        }
    }
    out
}

// After writes with run-time snapshots and a log tail after the last one, the reader sees what
// the writer wrote and what sled reopens, and a lookup finds the same as a scan.
#[test]
fn the_reader_sees_what_was_written_and_what_sled_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded();
    eprintln!("read-only reader test: seed {:#x}", rng.0);
    let written = {
        let db = open_sled(dir.path());
        let trees: Vec<sled::Tree> = TREES.iter().map(|n| db.open_tree(n).unwrap()).collect();
        for i in 0..12_000 {
            random_write(&db, &trees, &mut rng);
            if i % 3_000 == 2_999 {
                db.flush().unwrap();
                db.write_recovery_snapshot().unwrap();
            }
        }
        // A tail after the last snapshot, which the reader must replay.
        for _ in 0..1_500 {
            random_write(&db, &trees, &mut rng);
        }
        db.flush().unwrap();
        sled_contents(&db)
    };
    let pairs: usize = written.values().map(BTreeMap::len).sum();
    assert!(
        pairs > 5_000,
        "the trees are big enough to have many leaves: {pairs}"
    );

    let before = fingerprint(dir.path());
    let reader = open_read_only(dir.path());
    assert_eq!(read_only_contents(&reader), written);
    check_lookups(&reader, &written, &mut rng);
    drop(reader);
    assert_eq!(
        fingerprint(dir.path()),
        before,
        "the reader wrote to the database"
    );

    let reopened = open_sled(dir.path());
    assert_eq!(
        sled_contents(&reopened),
        written,
        "sled itself reopens the same"
    );
}

const CHILD_DIR_ENV: &str = "LARDER_READ_ONLY_CHILD_DIR";

/// Writes at random until killed, flushing every 40 writes and writing a recovery snapshot
/// every 700. Run by the crash test below.
#[test]
#[ignore = "run by the_reader_agrees_with_sled_recovery_after_kill_9"]
fn read_only_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let db = open_sled(Path::new(&dir));
    let trees: Vec<sled::Tree> = TREES.iter().map(|n| db.open_tree(n).unwrap()).collect();
    let mut rng = Rng::seeded();
    for i in 0u64.. {
        random_write(&db, &trees, &mut rng);
        if i % 40 == 39 {
            db.flush().unwrap();
        }
        if i % 700 == 699 {
            db.write_recovery_snapshot().unwrap();
        }
    }
}

// kill -9 a writer at a random moment: before sled's recovery touches the files, the reader
// must see exactly the state that recovery then rebuilds (the newest snapshot plus the valid
// log after it, torn batches cut), must leave every file as it was, and must agree again once
// sled has recovered and written its own snapshot.
#[test]
fn the_reader_agrees_with_sled_recovery_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded();
    eprintln!("read-only crash test: seed {:#x}", rng.0);
    let mut pairs = 0;
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "read_only::read_only_child",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(400 + rng.below(900)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the writer died on its own"
        );
        child.kill().unwrap();
        child.wait().unwrap();

        let before = fingerprint(dir.path());
        let reader = open_read_only(dir.path());
        let seen = read_only_contents(&reader);
        drop(reader);
        assert_eq!(
            fingerprint(dir.path()),
            before,
            "round {round}: the reader wrote to the database"
        );

        let db = open_sled(dir.path());
        let recovered = sled_contents(&db);
        drop(db);
        assert_eq!(
            seen, recovered,
            "round {round}: the reader and sled's recovery disagree"
        );
        let reader = open_read_only(dir.path());
        assert_eq!(
            read_only_contents(&reader),
            recovered,
            "round {round}: the reader disagrees after sled's recovery"
        );
        check_lookups(&reader, &recovered, &mut rng);
        pairs = recovered.values().map(BTreeMap::len).sum();
        eprintln!("round {round}: {pairs} pairs agree");
    }
    assert!(pairs > 1_000, "the writer got enough to disk: {pairs}");
}

fn put_entry(url: &str, tags: &[&str]) -> (VariantKey, larder::store::Entry) {
    let primary = PrimaryKey::new("http", "example.com", url);
    let key = VariantKey::new(&primary, &[]);
    let mut e = crate::store::entry(&format!("http://example.com{url}"), tags);
    e.url = primary.url().to_string();
    (key, e)
}

// The store-level reader (what `larder dump --offline` uses) lists the same entries, in the same
// order, as the open store does, for all, a URL prefix and a tag.
#[tokio::test]
async fn the_read_only_store_lists_what_the_store_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for i in 0..600 {
        let tags: &[&str] = if i % 3 == 0 { &["three"] } else { &["other"] };
        let (key, e) = put_entry(&format!("/p{}/{i}", i % 7), tags);
        crate::store::put(&store, key, e, b"body").await;
    }
    let listed = |prefix: Option<&str>, tag: Option<&str>| -> Vec<String> {
        store
            .entries(prefix, tag)
            .map(|item| item.unwrap().1.url)
            .collect()
    };
    let want = [
        listed(None, None),
        listed(Some("http://example.com/p3/"), None),
        listed(None, Some("three")),
        listed(Some("http://example.com/p1"), Some("three")),
    ];
    assert_eq!(want[0].len(), 600);
    assert!(want.iter().all(|w| !w.is_empty()));
    store.flush().await.unwrap();
    drop(store);

    let reader = ReadOnlyStore::open(dir.path()).unwrap().unwrap();
    let got = |prefix: Option<&str>, tag: Option<&str>| -> Vec<String> {
        reader
            .entries(prefix, tag)
            .map(|item| item.unwrap().1.url)
            .collect()
    };
    assert_eq!(got(None, None), want[0]);
    assert_eq!(got(Some("http://example.com/p3/"), None), want[1]);
    assert_eq!(got(None, Some("three")), want[2]);
    assert_eq!(got(Some("http://example.com/p1"), Some("three")), want[3]);
    assert!(
        ReadOnlyStore::open(&dir.path().join("none"))
            .unwrap()
            .is_none()
    );
}

// Closing the store writes a recovery snapshot, so that the next start replays (next to)
// nothing, however much was written since the last one. The reader counts what a start would
// replay: here 2 000 entries with run-time snapshots off, thousands of records without it.
#[tokio::test]
async fn closing_the_store_leaves_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        recovery_snapshot_every: None,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), options).unwrap();
    for i in 0..2_000 {
        let (key, e) = put_entry(&format!("/close/{i}"), &["t"]);
        crate::store::put(&store, key, e, b"body").await;
    }
    store.flush().await.unwrap();
    let db = dir.path().join("db");
    // A clone of the database's files while the store still runs: what a crash now would leave.
    let crashed = tempfile::tempdir().unwrap();
    crate::store::copy_dir(&db, crashed.path());
    drop(store);

    let replay = |path: &Path| open_read_only(path).replayed_log_records();
    let without_close = replay(crashed.path());
    let after_close = replay(&db);
    eprintln!("records to replay: {without_close} after a crash, {after_close} after close");
    assert!(
        without_close > 2_000,
        "the crash copy has the writes to replay: {without_close}"
    );
    assert!(
        after_close <= 16,
        "closing left {after_close} records to replay"
    );
}

/// A small database of one tree, closed.
fn small_database(dir: &Path) {
    let db = open_sled(dir);
    let tree = db.open_tree("a").unwrap();
    for i in 0..500u32 {
        tree.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
    }
    db.flush().unwrap();
    db.write_recovery_snapshot().unwrap();
}

// A damaged snapshot is an error, as it is to sled (which checks its checksum before parsing;
// the reader used to parse first, and sled's decoders index past the end of damaged bytes).
#[test]
fn a_damaged_snapshot_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    small_database(dir.path());
    assert_eq!(
        read_only_contents(&open_read_only(dir.path()))["a"].len(),
        500
    );

    let newest = crate::store::snapshot_files(dir.path());
    let snapshot = dir.path().join(newest.last().expect("a snapshot file"));
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let last_body_byte = bytes.len() - 13;
    bytes[last_body_byte] = 0xff;
    std::fs::write(&snapshot, &bytes).unwrap();
    let damaged = sled::Config::new()
        .path(dir.path())
        .open_read_only(tempfile::tempfile);
    assert!(
        matches!(damaged, Err(sled::Error::Corruption { .. })),
        "{:?}",
        damaged.map(|d| d.is_some())
    );
}

const CRASH_POINT_DIR_ENV: &str = "LARDER_CRASH_POINT_CHILD_DIR";

/// Grows and shrinks one tree in turns (fills of 4 000 keys, then removes of most of them), so
/// that leaves split and merge all the time, until a sled crash point aborts the process.
#[test]
#[ignore = "run by the_reader_agrees_with_sled_after_crashes_inside_splits_and_merges"]
fn crash_point_child() {
    let Some(dir) = std::env::var_os(CRASH_POINT_DIR_ENV) else {
        return;
    };
    let db = open_sled(Path::new(&dir));
    let tree = db.open_tree("a").unwrap();
    let mut rng = Rng::seeded();
    loop {
        for _ in 0..4_000 {
            tree.insert(format!("{:05}", rng.below(6_000)), &b"value"[..])
                .unwrap();
        }
        for _ in 0..5_000 {
            tree.remove(format!("{:05}", rng.below(6_000))).unwrap();
        }
        db.flush().unwrap();
    }
}

// A crash inside a split or a merge, at each step where sled's own readers would help the
// operation along: the reader, which only reads, must see exactly what sled's recovery then
// rebuilds. The reader's counters show that the cut states were really met (a split's new node
// reached only through its left sibling, a parent with a merge intention, a capped child).
#[test]
fn the_reader_agrees_with_sled_after_crashes_inside_splits_and_merges() {
    let exe = std::env::current_exe().unwrap();
    let mut met = sled::ReadStats::default();
    for point in [
        "split_child",
        "split_root",
        "hoist_alloc",
        "merge_intent",
        "merge_cap",
        "merge_left",
        "merge_confirm",
    ] {
        // The root splits once or twice per database; the others happen all the time.
        let (one_in, rounds) = if point.starts_with("split_root") || point == "hoist_alloc" {
            (1, 2)
        } else {
            (40, 3)
        };
        for round in 0..rounds {
            let dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let status = Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "read_only::crash_point_child",
                    "--test-threads=1",
                ])
                .env(CRASH_POINT_DIR_ENV, dir.path())
                .env("SLED_CRASH_POINT", format!("{point}:{one_in}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
                .wait_timeout_or_kill(Duration::from_secs(60));
            assert!(
                status.is_some_and(|s| !s.success()),
                "{point} round {round}: the writer did not abort at the crash point within {:?}",
                started.elapsed()
            );
            let reader = open_read_only(dir.path());
            let seen = read_only_contents(&reader);
            let stats = reader.stats();
            drop(reader);
            let db = open_sled(dir.path());
            assert_eq!(
                seen,
                sled_contents(&db),
                "{point} round {round}: the reader and sled's recovery disagree"
            );
            met.sibling_links_followed += stats.sibling_links_followed;
            met.merge_intentions += stats.merge_intentions;
            met.capped_nodes += stats.capped_nodes;
            eprintln!(
                "{point} round {round}: {} pairs agree, {stats:?}",
                seen["a"].len()
            );
        }
    }
    assert!(
        met.sibling_links_followed > 0,
        "no half-done split was met: {met:?}"
    );
    assert!(
        met.merge_intentions > 0,
        "no merge intention was met: {met:?}"
    );
    assert!(met.capped_nodes > 0, "no capped child was met: {met:?}");
}

trait WaitTimeout {
    /// Waits up to `limit` for the child to exit; kills it after that. `None` if it was killed.
    fn wait_timeout_or_kill(self, limit: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for std::process::Child {
    fn wait_timeout_or_kill(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.kill();
        let _ = self.wait();
        None
    }
}

// A log whose old segments sled has cleaned and reused, with no snapshot since the database was
// made: replaying it from the start meets fragments of pages whose base record was moved to a
// later segment (sled skips such a "dangling" fragment), also for page ids past the end of the
// table so far and between such ids. The reader read past the end of its slot file there and
// failed to open a database that sled opens.
#[test]
fn the_reader_skips_fragments_of_pages_whose_base_moved_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded();
    eprintln!("dangling fragments test: seed {:#x}", rng.0);
    let written = {
        let db = open_sled(dir.path());
        let tree = db.open_tree("a").unwrap();
        for i in 0..80_000u32 {
            let key = format!("{:05}", rng.below(5_000));
            tree.insert(key, vec![(i % 251) as u8; 100]).unwrap();
        }
        db.flush().unwrap();
        sled_contents(&db)
    };
    let snapshots = crate::store::snapshot_files(dir.path()).len();
    assert_eq!(snapshots, 0, "the whole log is replayed");
    let reader = open_read_only(dir.path());
    assert_eq!(read_only_contents(&reader), written);
    assert!(reader.replayed_log_records() > 10_000);
}

/// [`ReadOnlyStore::open`], waiting for a lock that a handle dropped in this process still holds.
fn read_only_store(dir: &Path) -> Result<Option<ReadOnlyStore>, StoreError> {
    until_unlocked(
        || ReadOnlyStore::open(dir),
        |e| matches!(e, StoreError::Locked(_)),
    )
}

/// What all, a prefix, a tag and both list: (variant key, url) each.
fn listings(
    entries: impl Fn(Option<&str>, Option<&str>) -> Vec<(String, String)>,
) -> [Vec<(String, String)>; 4] {
    [
        entries(None, None),
        entries(Some("http://example.com/p3/"), None),
        entries(None, Some("three")),
        entries(Some("http://example.com/p1"), Some("three")),
    ]
}

// Index rows that point nowhere, at another URL's entry, at an entry without the tag, at an
// undecodable record, or are too short, and records under malformed keys: the reader lists
// what the open store lists (which heals them), and removes nothing itself.
#[tokio::test]
async fn stale_and_malformed_rows_are_skipped_as_the_store_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut keys = Vec::new();
    for i in 0..60 {
        let tags: &[&str] = if i % 3 == 0 { &["three"] } else { &["other"] };
        let (key, e) = put_entry(&format!("/p{}/{i}", i % 7), tags);
        keys.push(key);
        crate::store::put(&store, key, e, b"body").await;
    }
    store.flush().await.unwrap();
    drop(store);
    {
        let db = open_sled(&dir.path().join("db"));
        let (urls, tags, entries) = (
            db.open_tree("urls").unwrap(),
            db.open_tree("tags").unwrap(),
            db.open_tree("entries").unwrap(),
        );
        let row = |head: &[u8], tail: &[u8]| [head, tail].concat();
        let tag_three = [&3u32.to_be_bytes()[..], b"three"].concat();
        let undecodable = [5u8; 64];
        urls.insert(row(b"http://example.com/p3/ghost", &[9; 64]), &[][..])
            .unwrap();
        urls.insert(&b"http://example.com/p3/x"[..], &[][..])
            .unwrap();
        urls.insert(
            row(b"http://example.com/p3/wrong", keys[0].as_bytes()),
            &[][..],
        )
        .unwrap();
        urls.insert(row(b"http://example.com/p3/bad", &undecodable), &[][..])
            .unwrap();
        tags.insert(row(&tag_three, keys[1].as_bytes()), &[][..])
            .unwrap();
        tags.insert(row(&tag_three, &[7; 10]), &[][..]).unwrap();
        tags.insert(row(&tag_three, &undecodable), &[][..]).unwrap();
        entries.insert(&undecodable[..], &b"garbage"[..]).unwrap();
        entries.insert(&b"short"[..], &b"x"[..]).unwrap();
        db.flush().unwrap();
    }
    let hex = |item: Result<(VariantKey, larder::store::Entry), StoreError>| {
        let (k, e) = item.unwrap();
        (k.to_hex(), e.url)
    };
    let seen = {
        let reader = read_only_store(dir.path()).unwrap().unwrap();
        listings(|p, t| reader.entries(p, t).map(hex).collect())
    };
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let listed = listings(|p, t| store.entries(p, t).map(hex).collect());
    assert_eq!(seen, listed);
    assert_eq!(seen[0].len(), 60);
    assert!(seen.iter().all(|l| !l.is_empty()));
}

// A store of a newer schema is refused, one with records but no version is refused, one with
// no version and no record (not even an undecodable one) reads as empty, and a store held by
// another handle is `Locked`, as `Store::open` has it.
#[tokio::test]
async fn schema_versions_and_the_lock_are_read_as_the_store_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let locked = ReadOnlyStore::open(dir.path());
    assert!(
        matches!(locked, Err(StoreError::Locked(_))),
        "{:?}",
        locked.err()
    );
    let (key, e) = put_entry("/a", &[]);
    crate::store::put(&store, key, e, b"body").await;
    store.flush().await.unwrap();
    drop(store);

    let set_version = |version: Option<u32>| {
        let db = open_sled(&dir.path().join("db"));
        let meta = db.open_tree("meta").unwrap();
        match version {
            Some(v) => meta
                .insert(b"schema_version", &v.to_be_bytes()[..])
                .unwrap(),
            None => meta.remove(b"schema_version").unwrap(),
        };
        db.flush().unwrap();
    };
    set_version(Some(99));
    let newer = read_only_store(dir.path());
    assert!(
        matches!(newer, Err(StoreError::NewerSchema { found: 99, .. })),
        "{:?}",
        newer.err()
    );
    set_version(None);
    let unversioned = read_only_store(dir.path());
    assert!(
        matches!(
            unversioned,
            Err(StoreError::UnsupportedSchema { found: 0, .. })
        ),
        "{:?}",
        unversioned.err()
    );

    let only_garbage = tempfile::tempdir().unwrap();
    {
        let db = open_sled(&only_garbage.path().join("db"));
        let entries = db.open_tree("entries").unwrap();
        entries.insert(&[5u8; 64][..], &b"garbage"[..]).unwrap();
        db.flush().unwrap();
    }
    let garbage = read_only_store(only_garbage.path());
    assert!(
        matches!(garbage, Err(StoreError::UnsupportedSchema { found: 0, .. })),
        "a record that does not decode is still a record: {:?}",
        garbage.map(|s| s.is_some())
    );
    let empty = tempfile::tempdir().unwrap();
    drop(open_sled(&empty.path().join("db")));
    let reader = read_only_store(empty.path()).unwrap().unwrap();
    assert_eq!(reader.entries(None, None).count(), 0);
}

// A damaged store is reported as damaged, with what to do about it, not as a sled bug; the
// read moves nothing aside (a server's open would).
#[tokio::test]
async fn a_damaged_store_is_reported_as_damaged_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (key, e) = put_entry("/damaged", &[]);
    crate::store::put(&store, key, e, b"body").await;
    drop(store);
    let db = dir.path().join("db");
    let written = crate::store::snapshot_files(&db);
    let snapshot = db.join(written.first().expect("close wrote a snapshot"));
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes[2] ^= 0xff;
    std::fs::write(&snapshot, &bytes).unwrap();
    let before = fingerprint(&db);

    let err = read_only_store(dir.path())
        .err()
        .expect("a damaged store is an error");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("is damaged") && message.contains("larder serve"),
        "{message}"
    );
    assert_eq!(fingerprint(&db), before, "the read changed the database");
}
