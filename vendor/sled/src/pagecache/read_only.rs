//! Larder patch: reads a database that no process has open without building sled's in-memory
//! page table, so that a full scan needs the same memory at any database size.
//!
//! Opening a `Db` loads one page-table entry per page (plus the recovery snapshot and segment
//! bookkeeping), which grows with the database. This reader recovers the same state the same
//! way (the newest snapshot, then the log after it through sled's own `LogIter`, with the rules
//! of `Snapshot::apply`), but writes each page's location list to two scratch files instead of
//! memory, and never writes to the database: no tail shredding, no new snapshot, no blob
//! cleanup. Trees are then read like `Tree::view_for_key` and `Iter` read them, without helping
//! splits or merges along: every state a crash can leave behind is one that sled's own readers
//! see at run time, and a read-only reader can take each of them as it stands (see
//! `ReadOnlyDb::leaf_for_key`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::*;

/// Index nodes kept between lookups: enough for the root and the nodes a scan is passing
/// through, few enough to stay small (an index node holds up to 256 keys; with 256 nodes kept
/// the dump of 1M entries peaked 2.5 MiB higher than that of 100k). Leaves are not kept: a scan
/// reads each once.
const MAX_CACHED_INDEX_NODES: usize = 32;

/// Bound on the steps of one descent, like `Tree::view_for_key`: a cycle in damaged data ends
/// in an error, not a hang.
const MAX_DESCENT_STEPS: usize = 1_000_000;

/// Size of one page's slot in the slot file: the offset (u64) and length (u32) of its
/// serialized `PageState` in the state file, then 4 bytes of padding. Length 0: no page.
const SLOT_LEN: u64 = 16;

/// A database opened for reading only. It holds sled's file lock, like a `Db`, until dropped.
pub struct ReadOnlyDb {
    config: RunningConfig,
    pages: DiskPageTable,
    meta: Meta,
    index_nodes: Mutex<HashMap<PageId, Arc<Node>>>,
    stats: Mutex<ReadStats>,
}

/// What the descents of a [`ReadOnlyDb`] met of tree operations that a crash cut short, so
/// that tests can tell they covered those states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Right-sibling links followed: a split whose parent did not know the new node yet.
    pub sibling_links_followed: u64,
    /// Nodes passed with a merge intention for one of their children.
    pub merge_intentions: u64,
    /// Nodes read that were capped for a merge into their left sibling.
    pub capped_nodes: u64,
}

/// One tree of a [`ReadOnlyDb`].
#[derive(Clone)]
pub struct ReadOnlyTree {
    db: Arc<ReadOnlyDb>,
    root: PageId,
}

/// Forward iterator over a [`ReadOnlyTree`], holding one leaf at a time.
pub struct ReadOnlyIter {
    tree: ReadOnlyTree,
    lo: Bound<IVec>,
    leaf: Option<Node>,
    done: bool,
}

/// Page id → `PageState`, kept in two scratch files: fixed-size slots indexed by page id, and
/// the serialized states they point at (appended; a replaced state leaves its old bytes behind).
struct DiskPageTable {
    slots: File,
    states: File,
    states_len: u64,
    pages: u64,
    replayed: u64,
}

impl ReadOnlyDb {
    /// Recovers the state of the database that `config` has locked, into scratch files made by
    /// `scratch` (see `Config::open_read_only`).
    pub(crate) fn recover(
        config: RunningConfig,
        mut scratch: impl FnMut() -> std::io::Result<File>,
    ) -> Result<Arc<ReadOnlyDb>> {
        let (slots, states) = (scratch()?, scratch()?);
        // The snapshot is streamed in through each file's cursor, everything else goes by
        // offset: both must start empty at offset 0.
        for file in [&slots, &states] {
            file.set_len(0)?;
            let mut cursor: &File = file;
            std::io::Seek::seek(&mut cursor, std::io::SeekFrom::Start(0))?;
        }
        let mut pages = DiskPageTable {
            slots,
            states,
            states_len: 0,
            pages: 0,
            replayed: 0,
        };
        let stable_lsn = pages.load_snapshot(&config)?;
        pages.replay_log(&config, stable_lsn)?;
        let meta = match pages.pull(&config, META_PID)? {
            Some(Update::Meta(meta)) => meta,
            // A database whose first open never got as far as writing its meta page.
            None => Meta::default(),
            Some(_) => return Err(Error::corruption(None)),
        };
        Ok(Arc::new(ReadOnlyDb {
            config,
            pages,
            meta,
            index_nodes: Mutex::new(HashMap::new()),
            stats: Mutex::new(ReadStats::default()),
        }))
    }

    /// The tree named `name`, if the database has one.
    pub fn tree(self: &Arc<Self>, name: &[u8]) -> Option<ReadOnlyTree> {
        let root = self.meta.get_root(name)?;
        Some(ReadOnlyTree { db: self.clone(), root })
    }

    /// How many log records after the newest snapshot recovery applied: what the next open
    /// has to replay on top of the snapshot.
    pub fn replayed_log_records(&self) -> u64 {
        self.pages.replayed
    }

    /// What the descents so far met (see [`ReadStats`]).
    pub fn stats(&self) -> ReadStats {
        *self.stats.lock().unwrap()
    }

    /// The page `pid` as a node (its base with every fragment applied); `None` if it is free.
    fn node(&self, pid: PageId) -> Result<Option<Arc<Node>>> {
        if let Some(node) = self.index_nodes.lock().unwrap().get(&pid) {
            return Ok(Some(node.clone()));
        }
        let node = match self.pages.pull(&self.config, pid)? {
            None => return Ok(None),
            Some(Update::Node(node)) => Arc::new(node),
            Some(_) => return Err(Error::corruption(None)),
        };
        if node.data.is_index() {
            let mut cached = self.index_nodes.lock().unwrap();
            if cached.len() >= MAX_CACHED_INDEX_NODES {
                cached.clear();
            }
            cached.insert(pid, node.clone());
        }
        Ok(Some(node))
    }

    /// The leaf whose range holds `key`, found from `root` as `Tree::view_for_key` finds it.
    /// Where that function helps an unfinished split or merge to completion (writing), this one
    /// reads the state as it is, which is sound: a split's new right sibling is reached through
    /// the left node's `next` link until its parent knows it (`undershot` below); a child being
    /// merged away stays readable and complete from the merge intention on, because its parent
    /// keeps routing its keys to it until the merge is confirmed, writers help the merge finish
    /// before writing those keys, and the left sibling that absorbs it is only read for them
    /// by a scan, which moves by key and so never returns a key twice.
    fn leaf_for_key(&self, root: PageId, key: &[u8]) -> Result<Node> {
        let mut cursor = root;
        for _ in 0..MAX_DESCENT_STEPS {
            let node = self.node(cursor)?.ok_or_else(|| {
                Error::ReportableBug(format!(
                    "page {} is reachable from a tree root but free",
                    cursor
                ))
            })?;
            if key < node.lo.as_ref() {
                return Err(Error::ReportableBug(format!(
                    "descent reached page {} whose low key is above the key sought",
                    cursor
                )));
            }
            let undershot = !node.hi.is_empty() && key >= node.hi.as_ref();
            {
                let mut stats = self.stats.lock().unwrap();
                stats.sibling_links_followed += u64::from(undershot);
                stats.merge_intentions += u64::from(node.merging_child.is_some());
                stats.capped_nodes += u64::from(node.merging);
            }
            if undershot {
                cursor = node
                    .next
                    .ok_or_else(|| {
                        Error::ReportableBug(format!(
                            "page {} has a high key but no right sibling",
                            cursor
                        ))
                    })?
                    .get();
                continue;
            }
            if node.data.is_index() {
                if node.data.len() == 0 {
                    return Err(Error::corruption(None));
                }
                cursor = node.index_next_node(key).1;
                continue;
            }
            return Ok(Arc::try_unwrap(node).unwrap_or_else(|n| (*n).clone()));
        }
        Err(Error::ReportableBug("descent did not reach a leaf".into()))
    }
}

impl ReadOnlyTree {
    /// The value stored under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<IVec>> {
        let leaf = self.db.leaf_for_key(self.root, key)?;
        Ok(leaf.leaf_pair_for_key(key).map(|(_, v)| v.clone()))
    }

    /// Every pair in key order.
    pub fn iter(&self) -> ReadOnlyIter {
        self.range_from(Bound::Unbounded)
    }

    /// Every pair from `lo` on, in key order.
    pub fn range_from(&self, lo: Bound<IVec>) -> ReadOnlyIter {
        ReadOnlyIter { tree: self.clone(), lo, leaf: None, done: false }
    }

    /// Every pair whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(IVec, IVec)>> {
        let owned = prefix.to_vec();
        self.range_from(Bound::Included(IVec::from(prefix))).take_while(
            move |item| match item {
                Ok((k, _)) => k.starts_with(&owned),
                Err(_) => true,
            },
        )
    }
}

impl Iterator for ReadOnlyIter {
    type Item = Result<(IVec, IVec)>;

    // Moves by key like `Iter::next_inner`: the next pair after `lo` in the leaf holding `lo`,
    // else on to the leaf holding that leaf's high key.
    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let leaf = match self.leaf.take() {
                Some(leaf) => leaf,
                None => {
                    let key: &[u8] = match &self.lo {
                        Bound::Unbounded => &[],
                        Bound::Included(k) | Bound::Excluded(k) => k,
                    };
                    match self.tree.db.leaf_for_key(self.tree.root, key) {
                        Ok(leaf) => leaf,
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            };
            if let Some((key, value)) = leaf.successor(&self.lo) {
                self.lo = Bound::Excluded(key.clone());
                self.leaf = Some(leaf);
                return Some(Ok((key, value)));
            }
            if leaf.hi.is_empty() {
                self.done = true;
            } else {
                self.lo = Bound::Included(leaf.hi.clone());
            }
        }
        None
    }
}

impl DiskPageTable {
    fn get(&self, pid: PageId) -> Result<Option<PageState>> {
        if pid >= self.pages {
            return Ok(None);
        }
        let mut slot = [0u8; SLOT_LEN as usize];
        // Past the end of the slot file: a page id that a skipped fragment raised `pages` to
        // (see `replay_log`), never written.
        if pread_exact_or_eof(&self.slots, &mut slot, pid * SLOT_LEN)? < slot.len() {
            return Ok(None);
        }
        let (offset, len) = decode_slot(&slot);
        if len == 0 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; len as usize];
        pread_exact(&self.states, &mut bytes, offset)?;
        PageState::deserialize(&mut bytes.as_slice()).map(Some)
    }

    fn set(&mut self, pid: PageId, state: &PageState) -> Result<()> {
        let bytes = state.serialize();
        pwrite_all(&self.states, &bytes, self.states_len)?;
        let slot = encode_slot(self.states_len, bytes.len());
        pwrite_all(&self.slots, &slot, pid * SLOT_LEN)?;
        self.states_len += bytes.len() as u64;
        self.pages = self.pages.max(pid + 1);
        Ok(())
    }

    /// Streams the newest snapshot file (as `read_snapshot` reads it whole) into the scratch
    /// files; returns its `stable_lsn`.
    fn load_snapshot(&mut self, config: &RunningConfig) -> Result<Option<Lsn>> {
        let mut candidates = config.get_snapshot_files()?;
        candidates.sort();
        let path = match candidates.pop() {
            Some(path) => path,
            None => return Ok(None),
        };
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        if len <= 12 {
            return Err(Error::corruption(None));
        }
        let body_len = len - 12;
        let mut trailer = [0u8; 12];
        pread_exact(&file, &mut trailer, body_len)?;
        let crc_expected = arr_to_u32(&trailer[8..]);
        // Checked before anything is parsed, as `read_snapshot` does: sled's decoders index
        // past the end of damaged input instead of failing.
        let mut crc = crc32fast::Hasher::new();
        let mut chunk = vec![0u8; 64 << 10];
        let mut at = 0;
        while at < body_len {
            let n = usize::try_from((body_len - at).min(chunk.len() as u64)).unwrap();
            pread_exact(&file, &mut chunk[..n], at)?;
            crc.update(&chunk[..n]);
            at += n as u64;
        }
        if crc.finalize() != crc_expected {
            return Err(Error::corruption(None));
        }

        let mut reader = ChunkReader::new(file.take(body_len));
        let stable_lsn: Option<Lsn> = reader.decode()?;
        let _active_segment: Option<LogOffset> = reader.decode()?;

        let mut slots = BufWriter::new(&self.slots);
        let mut states = BufWriter::new(&self.states);
        let mut pid: PageId = 0;
        loop {
            // One PageState is at most 1 + 256 * 35 bytes.
            let window = reader.window(16 << 10)?;
            if window.is_empty() {
                break;
            }
            // Decoded only to find where it ends (and that it is well formed): the bytes are
            // stored as they are.
            let mut rest = window;
            PageState::deserialize(&mut rest)?;
            let used = window.len() - rest.len();
            let bytes = &window[..used];
            states.write_all(bytes)?;
            slots.write_all(&encode_slot(self.states_len, used))?;
            self.states_len += used as u64;
            reader.consume(used);
            pid += 1;
        }
        slots.flush()?;
        states.flush()?;
        drop((slots, states));
        self.pages = pid;
        Ok(stable_lsn)
    }

    /// Applies the log after the snapshot, as `advance_snapshot` and `Snapshot::apply` do.
    fn replay_log(
        &mut self,
        config: &RunningConfig,
        stable_lsn: Option<Lsn>,
    ) -> Result<()> {
        let mut iter = segment_iter_from(stable_lsn.unwrap_or(0), config, false)?;
        while let Some((kind, pid, lsn, ptr, sz)) = iter.next() {
            if lsn < stable_lsn.unwrap_or(-1) {
                continue;
            }
            if lsn >= iter.max_lsn.unwrap() {
                return Err(Error::corruption(None));
            }
            self.replayed += 1;
            match kind {
                LogKind::Replace => self.set(
                    pid,
                    &PageState::Present { base: (lsn, ptr, sz), frags: vec![] },
                )?,
                LogKind::Link => {
                    if let Some(PageState::Present { base, mut frags }) =
                        self.get(pid)?
                    {
                        if frags.last().map_or(base.0, |f| f.0) < lsn {
                            frags.push((lsn, ptr, sz));
                            self.set(pid, &PageState::Present { base, frags })?;
                        }
                    } else {
                        // `Snapshot::apply` grows its table to the pid and shrinks it by one:
                        // the pages in between stay uninitialized (a gap, caught below).
                        self.pages = self.pages.max(pid);
                    }
                }
                LogKind::Free => self.set(pid, &PageState::Free(lsn, ptr))?,
                LogKind::Corrupted | LogKind::Skip => {
                    return Err(Error::corruption(None));
                }
            }
        }
        self.check_recovered(&iter, config, stable_lsn)
    }

    /// The checks `advance_snapshot` and `load_snapshot` make of the recovered state, which
    /// fail sled's open as corrupt (or panic it) where a reader would otherwise go on.
    fn check_recovered(
        &self,
        iter: &LogIter,
        config: &RunningConfig,
        stable_lsn: Option<Lsn>,
    ) -> Result<()> {
        let no_recovery_progress = iter.cur_lsn.is_none()
            || iter.cur_lsn.unwrap() <= stable_lsn.unwrap_or(0);
        if no_recovery_progress && stable_lsn.is_none() {
            if self.pages > 0 {
                return Err(Error::corruption(None));
            }
        } else if let Some(iterated_lsn) = iter.cur_lsn {
            let segment_size = config.segment_size as Lsn;
            let progress = iterated_lsn % segment_size;
            let monotonic = progress >= SEG_HEADER_LEN as Lsn
                || (progress == 0 && iter.segment_base.is_none());
            if !monotonic {
                return Err(Error::corruption(None));
            }
            let recovered_lsn =
                if progress + MAX_MSG_HEADER_LEN as Lsn >= segment_size {
                    config.normalize(iterated_lsn) + segment_size
                } else {
                    iterated_lsn
                };
            if recovered_lsn < stable_lsn.unwrap_or(0) {
                return Err(Error::corruption(None));
            }
        }
        let mut chunk = vec![0u8; 64 << 10];
        let mut read = 0;
        for pid in 0..self.pages {
            let at = usize::try_from(pid * SLOT_LEN).unwrap() % chunk.len();
            if at == 0 {
                read = pread_exact_or_eof(&self.slots, &mut chunk, pid * SLOT_LEN)?;
            }
            let slot = &chunk[at..at + SLOT_LEN as usize];
            let present = at + (SLOT_LEN as usize) <= read && decode_slot(slot).1 != 0;
            if !present {
                return Err(Error::ReportableBug(format!(
                    "page {} is uninitialized in the recovered page table",
                    pid
                )));
            }
        }
        Ok(())
    }

    /// Reads page `pid` off the log as `PageCache::get` and `pull` do; `None` if it is free or
    /// was never written.
    fn pull(&self, config: &RunningConfig, pid: PageId) -> Result<Option<Update>> {
        let (base, frags) = match self.get(pid)? {
            Some(PageState::Present { base, frags }) => (base, frags),
            _ => return Ok(None),
        };
        let mut update = read_update(config, pid, base.0, base.1)?;
        for (lsn, ptr, _) in frags {
            let link = match read_update(config, pid, lsn, ptr)? {
                Update::Link(link) => link,
                _ => return Err(Error::corruption(Some(ptr))),
            };
            match &mut update {
                Update::Node(node) if !node.merging => node.apply(&link),
                _ => return Err(Error::corruption(Some(ptr))),
            }
        }
        Ok(Some(update))
    }
}

/// A slot: where a page's serialized state starts in the state file, and its length.
fn encode_slot(offset: u64, len: usize) -> [u8; SLOT_LEN as usize] {
    let mut slot = [0u8; SLOT_LEN as usize];
    slot[..8].copy_from_slice(&offset.to_le_bytes());
    slot[8..12].copy_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> (u64, u32) {
    (
        u64::from_le_bytes(slot[..8].try_into().unwrap()),
        u32::from_le_bytes(slot[8..12].try_into().unwrap()),
    )
}

/// One record of page `pid`, checked against what the page table expects of it.
fn read_update(
    config: &RunningConfig,
    pid: PageId,
    lsn: Lsn,
    ptr: DiskPtr,
) -> Result<Update> {
    use MessageKind::*;
    let segment = SegmentNumber(
        u64::try_from(lsn).unwrap()
            / u64::try_from(config.segment_size).unwrap(),
    );
    let (kind, bytes) = if ptr.is_inline() {
        match read_message(&*config.file, ptr.lid(), segment, config)? {
            LogRead::Inline(header, bytes, _)
                if header.pid == pid && header.segment_number == segment =>
            {
                (header.kind, bytes)
            }
            _ => return Err(Error::corruption(Some(ptr))),
        }
    } else {
        read_blob(ptr.blob().1, config)?
    };
    let buf = &mut bytes.as_slice();
    match kind {
        Counter => u64::deserialize(buf).map(Update::Counter),
        BlobMeta | InlineMeta => Meta::deserialize(buf).map(Update::Meta),
        BlobLink | InlineLink => Link::deserialize(buf).map(Update::Link),
        BlobNode | InlineNode => Node::deserialize(buf).map(Update::Node),
        _ => Err(Error::corruption(Some(ptr))),
    }
}

/// A buffered reader that hands out a window of unread bytes.
struct ChunkReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: Read> ChunkReader<R> {
    fn new(inner: R) -> Self {
        ChunkReader {
            inner,
            buf: Vec::with_capacity(256 << 10),
            start: 0,
            eof: false,
        }
    }

    /// At least `want` unread bytes, or all that are left.
    fn window(&mut self, want: usize) -> Result<&[u8]> {
        if self.buf.len() - self.start < want && !self.eof {
            self.buf.drain(..self.start);
            self.start = 0;
            let mut chunk = [0u8; 64 << 10];
            while self.buf.len() < want.max(128 << 10) && !self.eof {
                let n = self.inner.read(&mut chunk)?;
                if n == 0 {
                    self.eof = true;
                } else {
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        Ok(&self.buf[self.start..])
    }

    /// Decodes one value from the unread bytes and consumes it.
    fn decode<T: Serialize>(&mut self) -> Result<T> {
        let window = self.window(64)?;
        let mut rest = window;
        let value = T::deserialize(&mut rest)?;
        let used = window.len() - rest.len();
        self.consume(used);
        Ok(value)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }
}
