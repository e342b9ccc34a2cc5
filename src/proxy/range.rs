//! Builds range answers (206 single or multipart/byteranges, 416) from a stored body or from a full body as it arrives from the origin.
//!
//! Which ranges to send is `policy::select_ranges`; this module only turns that answer into
//! HTTP: headers, exact Content-Length, part framing, and the byte slicing.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::RequestCtx;
use crate::key::VariantKey;
use crate::policy::{self, ByteRange, HeaderList, RangeAnswer};
use crate::store::{Entry, Store, StoreError};

type Chunk = Result<Bytes, std::io::Error>;

/// What a Range request gets instead of the full 200.
pub(crate) enum Reply {
    /// 206 with these parts.
    Partial(Plan),
    /// 416: nothing satisfiable in a body of this many bytes.
    Unsatisfiable(u64),
}

/// The parts of a 206: one bare range, or several framed as multipart/byteranges (RFC 9110 §14.6).
pub(crate) struct Plan {
    total: u64,
    /// Each range with the part header sent before its bytes (empty for a single range).
    parts: Vec<(ByteRange, Bytes)>,
    /// The closing delimiter (empty for a single range).
    epilogue: Bytes,
    boundary: Option<String>,
}

impl Plan {
    fn new(ranges: Vec<ByteRange>, total: u64, representation: &HeaderList) -> Plan {
        if ranges.len() == 1 {
            return Plan {
                total,
                parts: vec![(ranges[0], Bytes::new())],
                epilogue: Bytes::new(),
                boundary: None,
            };
        }
        // Unpredictable per response, so a body cannot forge a delimiter (RFC 2046 §5.1.1).
        let boundary = format!("larder-{}", &crate::key::hex(&rand_bytes())[..32]);
        let content_type = representation.get_str("content-type");
        let parts = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut head = String::new();
                // The CRLF before every delimiter but the first belongs to the delimiter.
                if i > 0 {
                    head.push_str("\r\n");
                }
                head.push_str(&format!("--{boundary}\r\n"));
                if let Some(ct) = content_type {
                    head.push_str(&format!("content-type: {ct}\r\n"));
                }
                head.push_str(&format!(
                    "content-range: {}\r\n\r\n",
                    r.content_range(total)
                ));
                (*r, Bytes::from(head))
            })
            .collect();
        Plan {
            total,
            parts,
            epilogue: Bytes::from(format!("\r\n--{boundary}--\r\n")),
            boundary: Some(boundary),
        }
    }

    /// Exact length of the 206 body.
    fn body_len(&self) -> u64 {
        let parts: u64 = self
            .parts
            .iter()
            .map(|(r, head)| r.len() + head.len() as u64)
            .sum();
        parts + self.epilogue.len() as u64
    }

    fn set_headers(&self, builder: &mut HttpResponseBuilder) {
        builder.status(StatusCode::PARTIAL_CONTENT);
        match &self.boundary {
            None => {
                builder.insert_header(("content-range", self.parts[0].0.content_range(self.total)));
            }
            Some(b) => {
                builder.insert_header((
                    "content-type",
                    format!("multipart/byteranges; boundary={b}"),
                ));
            }
        }
    }
}

/// 32 bytes that differ per response: a process-wide counter hashed under a key drawn once
/// per process (std's hash seed), so a boundary cannot be guessed from another response.
fn rand_bytes() -> [u8; 32] {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let seed = std::collections::hash_map::RandomState::new();
        let mut h = blake3::Hasher::new();
        for i in 0..4u64 {
            h.update(&seed.hash_one(i).to_le_bytes());
        }
        *h.finalize().as_bytes()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    *blake3::keyed_hash(key, &n.to_le_bytes()).as_bytes()
}

/// The range answer this request wants from a complete `status` response with `headers` and
/// a body of `len` bytes (`None` = send the full response).
pub(crate) fn select(
    ctx: &RequestCtx,
    status: u16,
    headers: &HeaderList,
    len: Option<u64>,
) -> Option<Reply> {
    if !ctx.headers.contains("range") {
        return None;
    }
    // Without a length we cannot resolve suffix ranges or write Content-Range: send it whole.
    let len = len?;
    match policy::select_ranges(&ctx.method, &ctx.headers, status, headers, len) {
        RangeAnswer::Full => None,
        RangeAnswer::Partial(ranges) => {
            let plan = Plan::new(ranges, len, headers);
            // RFC 9110 §14.2: many small parts whose framing outweighs the representation
            // itself are answered with the whole 200, which is smaller and cheaper to send.
            if plan.boundary.is_some() && plan.body_len() >= len {
                return None;
            }
            Some(Reply::Partial(plan))
        }
        RangeAnswer::Unsatisfiable => Some(Reply::Unsatisfiable(len)),
    }
}

impl Reply {
    /// How many bytes from the start of the body this answer needs (0 for a 416).
    pub(crate) fn reads_up_to(&self) -> u64 {
        match self {
            Reply::Unsatisfiable(_) => 0,
            Reply::Partial(plan) => plan
                .parts
                .iter()
                .map(|(r, _)| r.last + 1)
                .max()
                .unwrap_or(0),
        }
    }
}

/// Finishes `builder` (already carrying the 200's headers) as the 206 or 416 for `reply`, the
/// bytes taken from `body`, the full representation from its first byte as it arrives.
pub(crate) fn from_full_stream(
    mut builder: HttpResponseBuilder,
    reply: Reply,
    is_head: bool,
    body: impl Stream<Item = Chunk> + Unpin + 'static,
) -> HttpResponse {
    match reply {
        Reply::Unsatisfiable(total) => unsatisfiable(builder, total),
        Reply::Partial(plan) => {
            plan.set_headers(&mut builder);
            let len = plan.body_len();
            if is_head {
                return builder.no_chunking(len).streaming(stream::empty::<Chunk>());
            }
            builder.no_chunking(len).streaming(Slicer::new(body, plan))
        }
    }
}

/// Finishes `builder` as the 206 or 416 for `reply` from a stored body: each range is read
/// on its own (file bodies by seeking, see `Store::open_body_range`). Every range is opened,
/// and so verified, before the head is sent: a damaged body yields `Err` and no response.
pub(crate) async fn from_store(
    mut builder: HttpResponseBuilder,
    reply: Reply,
    is_head: bool,
    store: &Store,
    key: &VariantKey,
    entry: &Entry,
) -> Result<HttpResponse, StoreError> {
    let plan = match reply {
        Reply::Unsatisfiable(total) => return Ok(unsatisfiable(builder, total)),
        Reply::Partial(plan) => plan,
    };
    plan.set_headers(&mut builder);
    let len = plan.body_len();
    if is_head {
        return Ok(builder.no_chunking(len).streaming(stream::empty::<Chunk>()));
    }
    let mut pieces: Vec<BoxStream<'static, Chunk>> = Vec::with_capacity(plan.parts.len() * 2 + 1);
    for (r, head) in &plan.parts {
        let part = store.open_body_range(key, entry, r.first, r.len()).await?;
        if !head.is_empty() {
            pieces.push(stream::once(std::future::ready(Ok(head.clone()))).boxed());
        }
        pieces.push(part.boxed());
    }
    if !plan.epilogue.is_empty() {
        pieces.push(stream::once(std::future::ready(Ok(plan.epilogue.clone()))).boxed());
    }
    Ok(builder
        .no_chunking(len)
        .streaming(stream::iter(pieces).flatten()))
}

/// RFC 9110 §15.5.17: 416 with `Content-Range: bytes */len` and no body. The representation's
/// own content fields describe a body we do not send, so they go.
fn unsatisfiable(mut builder: HttpResponseBuilder, total: u64) -> HttpResponse {
    builder.status(StatusCode::RANGE_NOT_SATISFIABLE);
    builder.insert_header(("content-range", format!("bytes */{total}")));
    let mut resp = builder.finish();
    for name in ["content-type", "content-encoding", "content-md5"] {
        resp.headers_mut().remove(name);
    }
    resp
}

/// Cuts the parts of `plan` out of a full body stream read forward once: skips to each range,
/// adds the part headers, and stops reading after the last range. A body that ends early is
/// an error, never a short 206 that looks complete.
struct Slicer<S> {
    inner: S,
    parts: Vec<(ByteRange, Bytes)>,
    next: usize,
    started: bool,
    offset: u64,
    pending: VecDeque<Bytes>,
    epilogue: Option<Bytes>,
    done: bool,
}

impl<S> Slicer<S> {
    fn new(inner: S, plan: Plan) -> Self {
        Slicer {
            inner,
            parts: plan.parts,
            next: 0,
            started: false,
            offset: 0,
            pending: VecDeque::new(),
            epilogue: Some(plan.epilogue).filter(|e| !e.is_empty()),
            done: false,
        }
    }

    /// Queues what of `chunk` (at `self.offset`) falls into the remaining parts.
    fn take(&mut self, chunk: &Bytes) {
        let (start, end) = (self.offset, self.offset + chunk.len() as u64);
        self.offset = end;
        while let Some((r, head)) = self.parts.get(self.next) {
            if r.first >= end {
                break;
            }
            if !self.started {
                if !head.is_empty() {
                    self.pending.push_back(head.clone());
                }
                self.started = true;
            }
            let from = r.first.max(start) - start;
            let to = (r.last + 1).min(end) - start;
            if to > from {
                self.pending
                    .push_back(chunk.slice(from as usize..to as usize));
            }
            if r.last + 1 > end {
                break;
            }
            self.next += 1;
            self.started = false;
        }
    }
}

impl<S: Stream<Item = Chunk> + Unpin> Stream for Slicer<S> {
    type Item = Chunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.next >= this.parts.len() {
                // Every range sent: stop reading the body (the store's copy continues elsewhere).
                this.done = true;
                return Poll::Ready(this.epilogue.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => this.take(&chunk),
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "body ended before the requested range",
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(plan: Plan, body: &'static [u8], chunk: usize) -> Vec<u8> {
        let chunks: Vec<Chunk> = body
            .chunks(chunk)
            .map(|c| Ok(Bytes::from_static(c)))
            .collect();
        let slicer = Slicer::new(stream::iter(chunks), plan);
        let out: Vec<Chunk> = slicer.collect().await;
        out.into_iter().flat_map(|c| c.unwrap().to_vec()).collect()
    }

    #[tokio::test]
    async fn slices_ranges_across_chunk_boundaries() {
        let body: &'static [u8] = b"0123456789abcdefghij";
        for chunk in [1, 3, 7, 20] {
            let single = Plan::new(
                vec![ByteRange { first: 5, last: 12 }],
                20,
                &HeaderList::new(),
            );
            assert_eq!(
                collect(single, body, chunk).await,
                b"56789abc",
                "chunk {chunk}"
            );
            let ranges = vec![
                ByteRange { first: 0, last: 1 },
                ByteRange {
                    first: 18,
                    last: 19,
                },
            ];
            let plan = Plan::new(ranges, 20, &HeaderList::new());
            let len = plan.body_len();
            let b = plan.boundary.clone().unwrap();
            let out = collect(plan, body, chunk).await;
            let want = format!(
                "--{b}\r\ncontent-range: bytes 0-1/20\r\n\r\n01\r\n--{b}\r\ncontent-range: bytes 18-19/20\r\n\r\nij\r\n--{b}--\r\n"
            );
            assert_eq!(String::from_utf8(out).unwrap(), want, "chunk {chunk}");
            assert_eq!(len, want.len() as u64);
        }
    }
}
