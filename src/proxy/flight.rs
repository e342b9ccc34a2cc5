//! Single-flight origin fetches: one fetch per variant at a time, its response shared by every request that arrives meanwhile.
//!
//! The fetch runs in its own task (see `fetch::lead`), so it finishes and is stored even if
//! the client that started it goes away. Its head and body chunks are published here; each
//! client, on any worker, reads them through its own [`Reader`] at its own pace and is woken
//! the moment something new arrives (a `watch` channel, no polling).
//!
//! Memory: while a response is shared "from the start", every chunk since byte 0 is kept so
//! that a request joining late can still read the whole body; that is bounded per flight
//! (`max_body`) and for all flights together (the budget). A flight past either bound, or one
//! whose response is not shared, keeps only the chunks its slowest reader has not read yet
//! (at most [`STREAM_WINDOW`] before the fetch waits for that reader): its readers still get
//! every byte, nobody new can start reading it, and a request arriving then waits for the
//! store instead. A sharing limit never cuts a client's response.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{Notify, watch};

use crate::config::CoalesceConfig;
use crate::key::{PrimaryKey, VariantKey};
use crate::policy::HeaderList;

use super::respond::CacheStatus;

/// Bytes a flight that no longer keeps its body from the start may hold unread by its slowest
/// reader before the fetch waits for that reader (the same backpressure a lone client gives).
pub(crate) const STREAM_WINDOW: u64 = 1 << 20;

/// Longest the fetch waits, unless told otherwise ([`Flights::with_reader_stall`]), for a
/// reader that reads nothing while it lags a full window behind. Past it that reader's response
/// is cut: one client that stopped reading must not hold the fetch (the store's copy and every
/// other client) hostage.
const READER_STALL_LIMIT: Duration = Duration::from_secs(30);

/// Longest a response head waits for the first body bytes to go out with it (see
/// [`Reader::wait_for_data`]): short enough that a stalling body never hides the status.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(25);

/// Most marks each memory (uncacheable, range-forward, Vary) keeps at once.
const MAX_MARKS: usize = 10_000;

/// How long the Vary fields a URL answered with are remembered, so requests are coalesced per
/// variant from their first arrival. Forgetting only costs one split herd.
const VARY_MEMORY: Duration = Duration::from_secs(600);

/// What a flight is registered under: the URL while its Vary is unknown, else the variant.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum FlightKey {
    Url([u8; 32]),
    Variant(VariantKey),
}

impl FlightKey {
    fn primary_hash(&self) -> &[u8; 32] {
        match self {
            FlightKey::Url(hash) => hash,
            FlightKey::Variant(key) => key.primary_hash(),
        }
    }
}

/// Every fetch in flight, and what recent fetches taught about their URLs.
pub struct Flights {
    running: Mutex<HashMap<FlightKey, Arc<Flight>>>,
    /// URLs that just answered something not storable (Varnish's hit-for-miss).
    uncacheable: Marks<()>,
    /// URLs too large for a Range miss to fill: their Range misses go to the origin as sent.
    range_forward: Marks<()>,
    /// The Vary fields each URL answered with last.
    vary: Marks<Vec<String>>,
    /// How long an uncacheable (or too-large-to-fill) answer is remembered.
    pub remember_uncacheable: Duration,
    /// Longest a waiter waits for the leader's response head (or, for a body too large to
    /// buffer, for it to be stored) before fetching on its own.
    pub wait_timeout: Duration,
    /// Longest the leader's fetch waits for the origin's response head.
    pub leader_timeout: Duration,
    /// Largest body kept whole in memory for requests that join late.
    pub max_body: u64,
    /// See [`READER_STALL_LIMIT`].
    reader_stall: Duration,
    budget: Arc<Budget>,
}

/// The memory every flight's buffer draws from, so that many large concurrent misses cannot
/// add up past one bound.
struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Flights {
    /// Coalescing with the configured bounds.
    pub fn new(cfg: &CoalesceConfig) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            uncacheable: Marks::default(),
            range_forward: Marks::default(),
            vary: Marks::default(),
            remember_uncacheable: cfg.remember_uncacheable,
            wait_timeout: cfg.timeout,
            leader_timeout: cfg.leader_timeout,
            max_body: cfg.max_body,
            reader_stall: READER_STALL_LIMIT,
            budget: Arc::new(Budget {
                used: AtomicU64::new(0),
                limit: cfg.total_memory,
            }),
        }
    }

    /// Sets how long a reader may take nothing while the fetch waits for it. The server uses
    /// the origin's `body_timeout`: a client that stalls is given what a stalling origin gets.
    pub fn with_reader_stall(mut self, stall: Duration) -> Self {
        self.reader_stall = stall;
        self
    }

    /// A flight nobody else can join (a request fetching on its own).
    pub(crate) fn unshared(&self) -> Arc<Flight> {
        Arc::new(self.new_flight())
    }

    fn new_flight(&self) -> Flight {
        Flight::new(self.budget.clone(), self.max_body, self.reader_stall)
    }

    /// Bytes currently held in flight buffers.
    pub fn shared_bytes(&self) -> u64 {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// Joins the fetch running under `key`, or registers a new one; true = the caller leads it.
    pub(crate) fn join(&self, key: FlightKey) -> (Arc<Flight>, bool) {
        let mut running = lock(&self.running);
        if let Some(flight) = running.get(&key) {
            return (flight.clone(), false);
        }
        let flight = Arc::new(self.new_flight());
        lock(&flight.keys).push(key);
        running.insert(key, flight.clone());
        (flight, true)
    }

    /// Also registers `flight` under `key` (its variant, once the response says which), unless
    /// another flight already runs there.
    pub(crate) fn settle(&self, flight: &Arc<Flight>, key: FlightKey) {
        let mut running = lock(&self.running);
        let mut keys = lock(&flight.keys);
        if keys.is_empty() || keys.contains(&key) || running.contains_key(&key) {
            // (An unshared flight stays unshared.)
            return;
        }
        keys.push(key);
        running.insert(key, flight.clone());
    }

    /// The flight is over (or no longer shareable): later requests must not join it, and it
    /// need no longer keep its body from the start.
    pub(crate) fn detach(&self, flight: &Arc<Flight>) {
        {
            let mut running = lock(&self.running);
            for key in lock(&flight.keys).drain(..) {
                if running.get(&key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                    running.remove(&key);
                }
            }
        }
        flight.stop_keeping_from_start();
    }

    /// Detaches every flight, so that nothing fetched before a purge is handed to a request
    /// that arrives after it (their results are also refused by the store).
    pub fn detach_all(&self) {
        let flights: Vec<Arc<Flight>> = lock(&self.running).drain().map(|(_, f)| f).collect();
        for flight in flights {
            lock(&flight.keys).clear();
            flight.stop_keeping_from_start();
        }
    }

    /// Detaches the flights of one URL (every variant), as `detach_all` does for all: after an
    /// unsafe method changed it, no later request is handed what was fetched before.
    pub fn detach_url(&self, primary: &[u8; 32]) {
        let flights: Vec<Arc<Flight>> = {
            let mut running = lock(&self.running);
            let keys: Vec<FlightKey> = running
                .keys()
                .filter(|k| k.primary_hash() == primary)
                .copied()
                .collect();
            keys.iter().filter_map(|k| running.remove(k)).collect()
        };
        for flight in flights {
            lock(&flight.keys).clear();
            flight.stop_keeping_from_start();
        }
    }

    /// Remembers that `primary` answered with something not storable.
    pub(crate) fn mark_uncacheable(&self, primary: &PrimaryKey, now: SystemTime) {
        if !self.remember_uncacheable.is_zero() {
            let until = now + self.remember_uncacheable;
            self.uncacheable.insert(primary, until, (), now);
        }
    }

    /// True while `primary` is remembered as uncacheable.
    pub(crate) fn recently_uncacheable(&self, primary: &PrimaryKey, now: SystemTime) -> bool {
        self.uncacheable.get(primary, now).is_some()
    }

    /// Forgets the uncacheable mark (the URL was just stored after all).
    pub(crate) fn clear_uncacheable(&self, primary: &PrimaryKey) {
        self.uncacheable.remove(primary);
        self.range_forward.remove(primary);
    }

    /// Remembers that `primary` is too large (or of unknown length) for a Range miss to fill.
    pub(crate) fn mark_range_forward(&self, primary: &PrimaryKey, now: SystemTime) {
        if !self.remember_uncacheable.is_zero() {
            let until = now + self.remember_uncacheable;
            self.range_forward.insert(primary, until, (), now);
        }
    }

    /// True while a Range miss on `primary` should go to the origin as sent.
    pub(crate) fn range_forward(&self, primary: &PrimaryKey, now: SystemTime) -> bool {
        self.range_forward.get(primary, now).is_some()
    }

    /// Remembers the Vary fields `primary` answered with.
    pub(crate) fn learn_vary(&self, primary: &PrimaryKey, fields: &[String], now: SystemTime) {
        if self.vary.get(primary, now).as_deref() != Some(fields) {
            self.vary
                .insert(primary, now + VARY_MEMORY, fields.to_vec(), now);
        }
    }

    /// The Vary fields `primary` answered with recently, if known.
    pub(crate) fn vary_fields(&self, primary: &PrimaryKey, now: SystemTime) -> Option<Vec<String>> {
        self.vary.get(primary, now)
    }
}

/// A bounded per-URL memory whose marks expire.
struct Marks<V> {
    map: Mutex<HashMap<[u8; 32], (SystemTime, V)>>,
}

impl<V> Default for Marks<V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> Marks<V> {
    fn insert(&self, primary: &PrimaryKey, until: SystemTime, value: V, now: SystemTime) {
        let mut map = lock(&self.map);
        // Bounded: drop expired marks when the map is full, and if most are live, start over
        // (forgetting a mark only costs one coalesced fetch), so no insert scans twice.
        if map.len() >= MAX_MARKS {
            map.retain(|_, (until, _)| *until > now);
            if map.len() >= MAX_MARKS / 2 {
                map.clear();
            }
        }
        map.insert(*primary.hash(), (until, value));
    }

    fn get(&self, primary: &PrimaryKey, now: SystemTime) -> Option<V> {
        let mut map = lock(&self.map);
        match map.get(primary.hash()) {
            Some((until, v)) if *until > now => Some(v.clone()),
            Some(_) => {
                map.remove(primary.hash());
                None
            }
            None => None,
        }
    }

    fn remove(&self, primary: &PrimaryKey) {
        lock(&self.map).remove(primary.hash());
    }
}

/// Finishes and detaches its flight when dropped: the lead task holds one, so that a fetch
/// that returns early, is cancelled or panics never leaves its waiters (or its URL) stuck.
pub(crate) struct LeadGuard {
    pub flights: Arc<Flights>,
    pub flight: Arc<Flight>,
}

impl LeadGuard {
    pub(crate) fn new(flights: &Arc<Flights>, flight: &Arc<Flight>) -> LeadGuard {
        LeadGuard {
            flights: flights.clone(),
            flight: flight.clone(),
        }
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        self.flights.detach(&self.flight);
        self.flight.finish(Err("origin fetch abandoned".into()));
    }
}

/// What the leader's fetch came to.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// A response whose body streams through the flight.
    Response(Arc<SharedHead>),
    /// A 304 freshened this stored entry: read it from the store.
    Revalidated(VariantKey),
    /// Another fetch stored the response between this one's lookup and its start: nothing
    /// was fetched, the store has the answer.
    Stored,
    /// The origin failed before sending a head.
    Failed {
        status: u16,
        message: String,
        detail: &'static str,
    },
}

/// Who besides the leader may use a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// Every request whose Vary'd fields match: it is stored (so meant for sharing), or an
    /// origin error that nothing but its status keeps from being stored.
    Everyone,
    /// Nobody: not storable (private, no-store, Set-Cookie, Vary: *...). Others fetch alone.
    Uncacheable,
    /// Nobody: a Range miss led this fetch and the object is too large to fill for it. The
    /// others start a fetch of their own (a full request stores the object).
    NotFilled,
}

/// The response head the leader got, as clients will see it.
pub(crate) struct SharedHead {
    pub status: u16,
    pub headers: HeaderList,
    pub content_length: Option<u64>,
    pub cache_status: CacheStatus,
    pub share: Share,
    /// Which requests it answers (RFC 9111 §4.1).
    pub vary_fields: Vec<String>,
    pub vary_values: Vec<(String, Option<String>)>,
}

struct State {
    outcome: Option<Outcome>,
    /// The chunks not yet released, `chunks[0]` being chunk number `base` of the body.
    chunks: VecDeque<Bytes>,
    base: usize,
    buffered: u64,
    end: Option<Result<(), String>>,
    /// Every chunk since the first is still held, so a new reader can start from byte 0.
    from_start: bool,
    /// How many readers stand at each chunk number (the next one each will read).
    cursors: BTreeMap<usize, usize>,
    readers: usize,
}

/// One fetch in progress.
pub(crate) struct Flight {
    state: Mutex<State>,
    /// Bumped on every change readers and waiters care about.
    version: watch::Sender<u64>,
    /// Wakes the fetch waiting for its slowest reader.
    room: Notify,
    budget: Arc<Budget>,
    max_body: u64,
    reader_stall: Duration,
    /// The keys it is registered under in `Flights` (empty once detached, or if unshared).
    keys: Mutex<Vec<FlightKey>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let held = lock(&self.state).buffered;
        self.budget.used.fetch_sub(held, Ordering::Relaxed);
    }
}

impl Flight {
    fn new(budget: Arc<Budget>, max_body: u64, reader_stall: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                outcome: None,
                chunks: VecDeque::new(),
                base: 0,
                buffered: 0,
                end: None,
                from_start: true,
                cursors: BTreeMap::new(),
                readers: 0,
            }),
            version: watch::Sender::new(0),
            room: Notify::new(),
            budget,
            max_body,
            reader_stall,
            keys: Mutex::new(Vec::new()),
        }
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A reader of the body from its first byte; `None` once the flight no longer keeps it
    /// from the start (the caller then waits for the store, or fetches on its own).
    pub(crate) fn reader(self: &Arc<Self>) -> Option<Reader> {
        let mut state = lock(&self.state);
        if !state.from_start {
            return None;
        }
        state.readers += 1;
        *state.cursors.entry(0).or_default() += 1;
        drop(state);
        Some(Reader {
            flight: self.clone(),
            rx: self.version.subscribe(),
            next: 0,
            done: false,
        })
    }

    /// Publishes the head (or failure); wakes every waiter.
    pub(crate) fn publish(&self, outcome: Outcome) {
        lock(&self.state).outcome = Some(outcome);
        self.changed();
    }

    /// From now on keep only what the current readers have not read yet.
    pub(crate) fn stop_keeping_from_start(&self) {
        let mut state = lock(&self.state);
        state.from_start = false;
        self.release_read(&mut state);
    }

    /// Appends a body chunk for the readers, waiting while the slowest one lags more than
    /// [`STREAM_WINDOW`] behind (unless the body is still kept from the start; a reader that
    /// reads nothing for [`READER_STALL_LIMIT`] meanwhile is cut off). False once nobody reads
    /// or can start reading any more.
    pub(crate) async fn push(&self, chunk: Bytes) -> bool {
        let add = chunk.len() as u64;
        {
            let mut state = lock(&self.state);
            if state.from_start
                && (state.buffered + add > self.max_body
                    || self.budget.used.load(Ordering::Relaxed) + add > self.budget.limit)
            {
                // Too much to keep for late joiners: the readers there are still get it all.
                state.from_start = false;
            }
            if !state.from_start && state.readers == 0 {
                self.release_read(&mut state);
                return false;
            }
            state.chunks.push_back(chunk);
            state.buffered += add;
            self.budget.used.fetch_add(add, Ordering::Relaxed);
            if !state.from_start {
                self.release_read(&mut state);
            }
        }
        self.changed();
        loop {
            let room = self.room.notified();
            {
                let state = lock(&self.state);
                if state.from_start || state.readers == 0 || state.buffered <= STREAM_WINDOW {
                    return state.from_start || state.readers > 0;
                }
            }
            if tokio::time::timeout(self.reader_stall, room).await.is_err() {
                self.cut_slowest();
            }
        }
    }

    /// Cuts off the readers furthest behind: their next read is an error.
    fn cut_slowest(&self) {
        {
            let mut state = lock(&self.state);
            let Some((&at, &n)) = state.cursors.iter().next() else {
                return;
            };
            tracing::debug!(readers = n, "cutting off clients that stopped reading");
            state.cursors.remove(&at);
            state.readers -= n;
            // Releases chunk `at` and beyond what the others need: a cut reader is the one
            // whose next chunk lies below `base`.
            self.release_read(&mut state);
        }
        self.changed();
    }

    /// Drops the chunks every reader has passed (all of them if nobody reads).
    fn release_read(&self, state: &mut State) {
        if state.from_start {
            return;
        }
        let upto = match state.cursors.keys().next() {
            Some(&min) => min,
            None => state.base + state.chunks.len(),
        };
        let mut freed = 0;
        while state.base < upto {
            let Some(chunk) = state.chunks.pop_front() else {
                break;
            };
            freed += chunk.len() as u64;
            state.base += 1;
        }
        state.buffered -= freed;
        self.budget.used.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Ends the body: cleanly, or with an error that cuts every reader's connection.
    pub(crate) fn finish(&self, result: Result<(), String>) {
        {
            let mut state = lock(&self.state);
            if state.end.is_none() {
                state.end = Some(result);
            }
            if state.outcome.is_none() {
                state.outcome = Some(Outcome::Failed {
                    status: 502,
                    message: "origin fetch ended without a response".into(),
                    detail: "origin-error",
                });
            }
        }
        self.changed();
    }

    /// Waits for the head; `None` if `limit` passes first.
    pub(crate) async fn outcome(&self, limit: Duration) -> Option<Outcome> {
        self.wait_for(limit, |s| s.outcome.clone()).await
    }

    /// The outcome if it is already published.
    pub(crate) fn published(&self) -> Option<Outcome> {
        lock(&self.state).outcome.clone()
    }

    /// Waits for the end of the body; `None` if `limit` passes first.
    pub(crate) async fn ended(&self, limit: Duration) -> Option<Result<(), String>> {
        self.wait_for(limit, |s| s.end.clone()).await
    }

    async fn wait_for<T>(&self, limit: Duration, get: impl Fn(&State) -> Option<T>) -> Option<T> {
        let mut rx = self.version.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(v) = get(&lock(&self.state)) {
                    return Some(v);
                }
                if rx.changed().await.is_err() {
                    // Unreachable while we hold the flight (the sender lives in it).
                    return None;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }
}

/// One client's place in a flight's body. Dropping it lets the fetch go on without it.
pub(crate) struct Reader {
    flight: Arc<Flight>,
    rx: watch::Receiver<u64>,
    /// The next chunk number to read.
    next: usize,
    done: bool,
}

impl Reader {
    /// The next chunk, `None` at the clean end, an error if the fetch failed.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.done {
            return None;
        }
        loop {
            self.rx.borrow_and_update();
            {
                let mut state = lock(&self.flight.state);
                if self.next < state.base {
                    self.done = true;
                    return Some(Err(std::io::Error::other(
                        "client stopped reading a shared response",
                    )));
                }
                if let Some(chunk) = self
                    .next
                    .checked_sub(state.base)
                    .and_then(|i| state.chunks.get(i))
                    .cloned()
                {
                    move_cursor(&mut state.cursors, self.next, self.next + 1);
                    self.next += 1;
                    self.flight.release_read(&mut state);
                    drop(state);
                    self.flight.room.notify_one();
                    return Some(Ok(chunk));
                }
                match &state.end {
                    Some(Ok(())) => {
                        self.done = true;
                        return None;
                    }
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(std::io::Error::other(e.clone())));
                    }
                    None => {}
                }
            }
            if self.rx.changed().await.is_err() {
                self.done = true;
                return None;
            }
        }
    }

    /// Waits until the next chunk (or the end) is there, without taking it, for at most
    /// [`FIRST_BYTES_WAIT`]. Sending the head together with the first bytes makes one write
    /// (one segment, one syscall) instead of two; the client sockets have TCP_NODELAY, so this
    /// saves a packet rather than a delayed-ACK stall. The bound keeps a body that stalls (or
    /// fails) from holding back the head: the client still sees the status before any cut.
    pub(crate) async fn wait_for_data(&mut self) {
        let _ = tokio::time::timeout(FIRST_BYTES_WAIT, self.data_ready()).await;
    }

    async fn data_ready(&mut self) {
        loop {
            self.rx.borrow_and_update();
            {
                let state = lock(&self.flight.state);
                let have = self.next < state.base
                    || self.next - state.base < state.chunks.len()
                    || state.end.is_some();
                if have {
                    return;
                }
            }
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The body from this reader's position, as it arrives.
    pub(crate) fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::unfold(self, |mut reader| async move {
            let item = reader.next_chunk().await?;
            Some((item, reader))
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.flight.state);
            // (A reader that was cut off is no longer counted.)
            if self.next >= state.base {
                if let Some(n) = state.cursors.get_mut(&self.next) {
                    *n -= 1;
                    if *n == 0 {
                        state.cursors.remove(&self.next);
                    }
                }
                state.readers -= 1;
                self.flight.release_read(&mut state);
            }
        }
        self.flight.room.notify_one();
    }
}

fn move_cursor(cursors: &mut BTreeMap<usize, usize>, from: usize, to: usize) {
    if let Some(n) = cursors.get_mut(&from) {
        *n -= 1;
        if *n == 0 {
            cursors.remove(&from);
        }
    }
    *cursors.entry(to).or_default() += 1;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later request on this lock.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn flights(max_body: u64, total: u64) -> Arc<Flights> {
        Arc::new(Flights::new(&CoalesceConfig {
            timeout: Duration::from_secs(30),
            leader_timeout: Duration::from_secs(30),
            max_body,
            total_memory: total,
            remember_uncacheable: Duration::from_secs(30),
            range_fill_max: 1 << 20,
            max_background_refreshes: 32,
        }))
    }

    fn url(path: &str) -> FlightKey {
        FlightKey::Url(*PrimaryKey::new("http", "h", path).hash())
    }

    fn bytes(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    #[tokio::test]
    async fn a_body_past_max_body_still_reaches_every_reader() {
        let flights = flights(15, 1 << 30);
        let (f, leader) = flights.join(url("/a"));
        assert!(leader);
        let (r1, r2) = (f.reader().unwrap(), f.reader().unwrap());
        let producer = {
            let f = f.clone();
            async move {
                for i in 0..10u8 {
                    assert!(f.push(bytes(10, i)).await, "readers are still there");
                }
                f.finish(Ok(()));
            }
        };
        let read = |r: Reader| async move {
            let parts: Vec<_> = r.into_stream().collect().await;
            parts
                .into_iter()
                .flat_map(|c| c.unwrap().to_vec())
                .collect::<Vec<u8>>()
        };
        let ((), a, b) = tokio::join!(producer, read(r1), read(r2));
        let want: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 10]).collect();
        assert_eq!(a, want);
        assert_eq!(b, want);
        // Past max_body nobody new can start reading from byte 0...
        assert!(f.reader().is_none());
        // ...and nothing the readers passed is still held.
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[tokio::test]
    async fn a_full_budget_stops_keeping_from_start_instead_of_cutting() {
        let flights = flights(1 << 20, 100);
        let (a, _) = flights.join(url("/a"));
        let (b, _) = flights.join(url("/b"));
        let _ra = a.reader().unwrap();
        let rb = b.reader().unwrap();
        assert!(a.push(bytes(60, 1)).await);
        assert_eq!(flights.shared_bytes(), 60);
        // Together they would pass the budget: b stops keeping its body for late joiners,
        // but its reader still gets the chunk.
        assert!(b.push(bytes(60, 2)).await);
        assert!(b.reader().is_none());
        b.finish(Ok(()));
        let got: Vec<_> = rb.into_stream().collect().await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap(), &bytes(60, 2));
        assert_eq!(flights.shared_bytes(), 60);
        // A finished flight returns its memory when the last holder lets go.
        flights.detach(&a);
        drop((a, _ra));
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[tokio::test]
    async fn a_streaming_fetch_waits_for_its_slowest_reader() {
        let flights = flights(0, 1 << 30);
        let f = flights.unshared();
        let mut slow = f.reader().unwrap();
        let chunk = (STREAM_WINDOW / 2) as usize;
        // Two chunks fit in the window; the third has to wait for the reader.
        assert!(f.push(bytes(chunk, 0)).await);
        assert!(f.push(bytes(chunk, 1)).await);
        let third = f.push(bytes(chunk, 2));
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err(),
            "the fetch ran ahead of its reader"
        );
        assert_eq!(slow.next_chunk().await.unwrap().unwrap()[0], 0);
        assert!(third.await);
        // When the last reader leaves, the fetch is told nobody reads.
        drop(slow);
        assert!(!f.push(bytes(1, 3)).await);
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_is_cut_off_not_the_others() {
        let mut flights = flights(0, 1 << 30);
        Arc::get_mut(&mut flights).unwrap().reader_stall = Duration::from_millis(50);
        let f = flights.unshared();
        let stalled = f.reader().unwrap();
        let reader = f.reader().unwrap();
        let chunk = (STREAM_WINDOW / 2) as usize;
        let producer = {
            let f = f.clone();
            async move {
                for i in 0..6u8 {
                    assert!(f.push(bytes(chunk, i)).await);
                }
                f.finish(Ok(()));
            }
        };
        let read = async move {
            let got: Vec<_> = reader.into_stream().collect().await;
            got.into_iter().map(|c| c.unwrap()[0]).collect::<Vec<u8>>()
        };
        let started = std::time::Instant::now();
        let ((), got) = tokio::join!(producer, read);
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 4, 5],
            "the reading client got everything"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let cut: Vec<_> = stalled.into_stream().collect().await;
        assert!(
            cut.last().unwrap().is_err(),
            "the stalled client must see its cut"
        );
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[tokio::test]
    async fn a_panicking_lead_task_finishes_and_detaches_its_flight() {
        let flights = flights(1 << 20, 1 << 30);
        let (f, leader) = flights.join(url("/p"));
        assert!(leader);
        let guard = LeadGuard::new(&flights, &f);
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("lead task bug");
        });
        assert!(task.await.is_err());
        let outcome = f.outcome(Duration::from_secs(1)).await;
        assert!(matches!(outcome, Some(Outcome::Failed { status: 502, .. })));
        assert!(f.ended(Duration::from_secs(1)).await.unwrap().is_err());
        // The URL is free: the next request leads a new fetch.
        assert!(flights.join(url("/p")).1);
    }

    #[test]
    fn a_settled_flight_is_joined_by_its_variant_and_detached_from_both_keys() {
        let flights = flights(1 << 20, 1 << 30);
        let primary = PrimaryKey::new("http", "h", "/v");
        let (f, _) = flights.join(FlightKey::Url(*primary.hash()));
        let gzip = FlightKey::Variant(VariantKey::new(
            &primary,
            &[("accept-encoding".into(), Some("gzip".into()))],
        ));
        flights.settle(&f, gzip);
        let (same, leader) = flights.join(gzip);
        assert!(!leader && Arc::ptr_eq(&same, &f));
        flights.detach(&f);
        assert!(flights.join(gzip).1);
        assert!(flights.join(FlightKey::Url(*primary.hash())).1);
    }

    #[test]
    fn marks_stay_bounded() {
        let flights = flights(1 << 20, 1 << 20);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..(MAX_MARKS * 3) {
            flights.mark_uncacheable(&PrimaryKey::new("http", "h", &format!("/{i}")), now);
        }
        assert!(lock(&flights.uncacheable.map).len() <= MAX_MARKS);
        let last = PrimaryKey::new("http", "h", &format!("/{}", MAX_MARKS * 3 - 1));
        assert!(flights.recently_uncacheable(&last, now));
        assert!(!flights.recently_uncacheable(&last, now + Duration::from_secs(31)));
    }
}
