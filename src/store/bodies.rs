//! Body files: content-addressed by blake3 under `bodies/ab/cd/<hex>`, written through a temp file + fsync + rename, streamed back and verified as they are read.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tempfile::TempPath;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio_util::io::ReaderStream;

use super::StoreError;
use crate::key::hex;

/// Read and write chunk size for body files.
pub const CHUNK: usize = 64 * 1024;

/// The body-file directory: `root/ab/cd/<64 hex>` for content, `root/tmp/` for writes in progress.
pub(super) struct Bodies {
    root: PathBuf,
    tmp: PathBuf,
}

impl Bodies {
    /// Creates the directories and removes temp files left by a crashed writer. Cost is the number
    /// of such leftovers, not the number of bodies.
    pub(super) fn open(root: &Path) -> Result<Bodies, StoreError> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(StoreError::io(&tmp))?;
        for item in std::fs::read_dir(&tmp).map_err(StoreError::io(&tmp))? {
            let path = item.map_err(StoreError::io(&tmp))?.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover temp body");
            }
        }
        Ok(Bodies {
            root: root.to_path_buf(),
            tmp,
        })
    }

    /// Where the body with this blake3 lives.
    pub(super) fn path_of(&self, hash: &[u8; 32]) -> PathBuf {
        let h = hex(hash);
        self.root.join(&h[..2]).join(&h[2..4]).join(h)
    }

    /// Starts a temp file for a body that outgrew the inline limit.
    pub(super) fn spill(&self) -> Result<SpillFile, StoreError> {
        let named = tempfile::Builder::new()
            .suffix(".part")
            .tempfile_in(&self.tmp)
            .map_err(StoreError::io(&self.tmp))?;
        let (file, path) = named.into_parts();
        Ok(SpillFile {
            file: BufWriter::with_capacity(CHUNK, tokio::fs::File::from_std(file)),
            path,
        })
    }

    /// Moves a finished (fsynced) temp file to its content address and makes the rename durable.
    /// If the address already holds a file, the fresh copy replaces it atomically: same content by
    /// construction, and it heals a copy that was damaged on disk.
    pub(super) fn install(&self, temp: TempPath, hash: &[u8; 32]) -> Result<(), StoreError> {
        let dest = self.path_of(hash);
        let dir = dest.parent().expect("body path has a parent");
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        temp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        // The index will point at this file once its transaction is flushed; the directory entry
        // must be on disk before then or a crash could leave a record without its body.
        sync_dir(dir)?;
        Ok(())
    }

    /// Deletes the body file of `hash`; a missing file is fine.
    pub(super) fn unlink(&self, hash: &[u8; 32]) -> Result<(), StoreError> {
        let path = self.path_of(hash);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Every file in the content directories, with the hash its name spells (`None` for a name
    /// that is not 64 hex digits), for the orphan sweep.
    pub(super) fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let mut out = Vec::new();
        for a in read_dir_names(&self.root)? {
            let da = self.root.join(&a);
            // Skips tmp/ (writes in progress belong to their writers) and stray files.
            if a.len() != 2 || !da.is_dir() {
                continue;
            }
            for b in read_dir_names(&da)? {
                let db = da.join(&b);
                if !db.is_dir() {
                    continue;
                }
                for name in read_dir_names(&db)? {
                    out.push((parse_hex32(&name), db.join(&name)));
                }
            }
        }
        Ok(out)
    }

    /// Deletes one file found by [`Bodies::list`].
    pub(super) fn remove_path(&self, path: &Path) -> Result<(), StoreError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }
}

/// A file found in the content directories: the hash its name spells, and where it is.
pub(super) type Listed = (Option<[u8; 32]>, PathBuf);

fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for item in std::fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let item = item.map_err(StoreError::io(dir))?;
        if let Ok(name) = item.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

/// A body being written to a temp file. Dropping it deletes the file.
pub(super) struct SpillFile {
    file: BufWriter<tokio::fs::File>,
    path: TempPath,
}

impl SpillFile {
    /// Appends bytes.
    pub(super) async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(chunk)
            .await
            .map_err(StoreError::io(&*self.path))
    }

    /// Flushes and fsyncs the data, returning the still-temporary path for [`Bodies::install`].
    pub(super) async fn finish(mut self) -> Result<TempPath, StoreError> {
        let path = &*self.path;
        self.file.flush().await.map_err(StoreError::io(path))?;
        self.file
            .get_mut()
            .sync_all()
            .await
            .map_err(StoreError::io(path))?;
        Ok(self.path)
    }
}

/// Called once when a stream finds its body damaged, to drop the entry.
pub(super) type OnDamage = Box<dyn FnOnce() + Send + Sync>;

/// Called once with the whole body when a stream that keeps a copy has verified its last byte.
pub(super) type OnVerified = Box<dyn FnOnce(Bytes) + Send + Sync>;

/// A stored body as a stream of chunks, verified against its length and blake3.
///
/// A file body withholds its last chunk until the whole file has been hashed: on a mismatch, a
/// short file or an over-long one, the stream ends with an `Err` (kind `InvalidData`) instead of
/// that chunk, so a damaged body is never delivered complete. Implements
/// `Stream<Item = Result<Bytes, io::Error>> + Send + Unpin + 'static`.
pub struct BodyStream {
    state: State,
}

enum State {
    Inline(Option<Bytes>),
    File(Box<FileRead>),
    Slice(Box<SliceRead>),
    Done,
}

/// A byte range of a body file whose whole content was verified against its blake3 (see
/// [`Verified`]); it only checks that the file still holds every byte of the range.
struct SliceRead {
    reader: ReaderStream<tokio::io::Take<tokio::fs::File>>,
    left: u64,
    what: String,
}

struct FileRead {
    reader: ReaderStream<tokio::fs::File>,
    hasher: blake3::Hasher,
    seen: u64,
    len: u64,
    blake3: [u8; 32],
    held: Option<Bytes>,
    on_damage: Option<OnDamage>,
    /// A copy of what has streamed so far, handed over once it verified (see `keeping`).
    keep: Option<(bytes::BytesMut, OnVerified)>,
    what: String,
}

impl BodyStream {
    /// A body that has already been verified in memory.
    pub(super) fn inline(body: Bytes) -> BodyStream {
        BodyStream {
            state: State::Inline(Some(body).filter(|b| !b.is_empty())),
        }
    }

    /// A body file, checked against `len` and `blake3` as it streams; `what` names it in errors.
    pub(super) fn file(
        file: tokio::fs::File,
        len: u64,
        blake3: [u8; 32],
        what: String,
        on_damage: OnDamage,
    ) -> BodyStream {
        BodyStream {
            state: State::File(Box::new(FileRead {
                reader: ReaderStream::with_capacity(file, CHUNK),
                hasher: blake3::Hasher::new(),
                seen: 0,
                len,
                blake3,
                held: None,
                on_damage: Some(on_damage),
                keep: None,
                what,
            })),
        }
    }

    /// Makes a file body stream keep a copy of what it streams and hand it to `on_verified` if,
    /// and only if, the whole body matched its hash. No effect on other bodies.
    pub(super) fn keeping(mut self, on_verified: OnVerified) -> BodyStream {
        if let State::File(read) = &mut self.state {
            let capacity = usize::try_from(read.len).unwrap_or(0);
            read.keep = Some((bytes::BytesMut::with_capacity(capacity), on_verified));
        }
        self
    }
}

impl BodyStream {
    /// `len` bytes of a verified body file, read from the file's current position (the caller
    /// has seeked to the range's start).
    pub(super) fn file_slice(file: tokio::fs::File, len: u64, what: String) -> BodyStream {
        use tokio::io::AsyncReadExt;
        BodyStream {
            state: State::Slice(Box::new(SliceRead {
                reader: ReaderStream::with_capacity(file.take(len), CHUNK),
                left: len,
                what,
            })),
        }
    }
}

/// What identifies one on-disk body file as the very file we verified: any write to it, a
/// `touch` back to an old mtime (which moves ctime), or a replacement (new inode) changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    pub(super) fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Body files this process has hashed whole and found intact, by content hash, with the stamp
/// the file had then. A range read of a file whose stamp is unchanged seeks straight to its
/// bytes; any other range read hashes the whole file first. Bounded: cleared when full.
#[derive(Default)]
pub(super) struct Verified {
    files: std::sync::Mutex<std::collections::HashMap<[u8; 32], FileStamp>>,
}

/// Entries kept before the verified-file map is cleared (one 1 GiB re-hash per file, at worst).
const VERIFIED_MAX: usize = 65_536;

impl Verified {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], FileStamp>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_verified(&self, hash: &[u8; 32], stamp: &FileStamp) -> bool {
        self.lock().get(hash) == Some(stamp)
    }

    pub(super) fn insert(&self, hash: [u8; 32], stamp: FileStamp) {
        let mut files = self.lock();
        if files.len() >= VERIFIED_MAX {
            files.clear();
        }
        files.insert(hash, stamp);
    }

    pub(super) fn forget(&self, hash: &[u8; 32]) {
        self.lock().remove(hash);
    }
}

/// Hashes a whole body file (blocking; run it off the async workers). True if it is `len`
/// bytes with this blake3.
pub(super) fn file_matches(
    file: &mut std::fs::File,
    len: u64,
    blake3: &[u8; 32],
) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut seen: u64 = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen += n as u64;
        if seen > len {
            return Ok(false);
        }
        hasher.update(&buf[..n]);
    }
    Ok(seen == len && hasher.finalize().as_bytes() == blake3)
}

impl FileRead {
    fn damaged(&mut self, why: &str) -> io::Error {
        if let Some(drop_entry) = self.on_damage.take() {
            drop_entry();
        }
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stored body of {} is damaged: {why}", self.what),
        )
    }
}

impl Stream for BodyStream {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let read = match &mut this.state {
            State::Done => return Poll::Ready(None),
            State::Inline(body) => {
                // Handed out in CHUNK slices (no copy): the connection then asks for more only
                // as the socket drains, instead of buffering a whole large body per client.
                let out = match body.take() {
                    Some(mut rest) if rest.len() > CHUNK => {
                        let first = rest.split_to(CHUNK);
                        *body = Some(rest);
                        Some(first)
                    }
                    last => {
                        this.state = State::Done;
                        last
                    }
                };
                return Poll::Ready(out.map(Ok));
            }
            State::File(read) => read,
            State::Slice(slice) => {
                return match Pin::new(&mut slice.reader).poll_next(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(chunk))) => {
                        slice.left = slice.left.saturating_sub(chunk.len() as u64);
                        Poll::Ready(Some(Ok(chunk)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.state = State::Done;
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        // The file shrank since it was verified: never end a range short cleanly.
                        let short = slice.left > 0;
                        let err = io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("stored body of {} is shorter than recorded", slice.what),
                        );
                        this.state = State::Done;
                        Poll::Ready(short.then_some(Err(err)))
                    }
                };
            }
        };
        loop {
            match Pin::new(&mut read.reader).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    read.seen += chunk.len() as u64;
                    if read.seen > read.len {
                        let err = read.damaged("file is longer than recorded");
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(err)));
                    }
                    read.hasher.update(&chunk);
                    if let Some((copy, _)) = &mut read.keep {
                        copy.extend_from_slice(&chunk);
                    }
                    // Hold one chunk back: it is released only once the next one (or a verified
                    // end of file) shows that it is not the last of a damaged body.
                    if let Some(prev) = read.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(prev)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    // A read error is not proof of damage (it may be transient): fail this
                    // response, keep the entry.
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let result = if read.seen != read.len {
                        Err(read.damaged("file is shorter than recorded"))
                    } else if *read.hasher.finalize().as_bytes() != read.blake3 {
                        Err(read.damaged("blake3 mismatch"))
                    } else {
                        if let Some((copy, on_verified)) = read.keep.take() {
                            on_verified(copy.freeze());
                        }
                        Ok(read.held.take())
                    };
                    this.state = State::Done;
                    return Poll::Ready(match result {
                        Ok(last) => last.map(Ok),
                        Err(e) => Some(Err(e)),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_names_round_trip() {
        let h = [0xab; 32];
        assert_eq!(parse_hex32(&hex(&h)), Some(h));
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }
}
