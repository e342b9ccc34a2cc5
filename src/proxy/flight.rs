//! Single-flight origin fetches: one fetch per URL at a time, its response shared by every request that arrives meanwhile.
//!
//! The fetch runs in its own task (see `fetch::lead`), so it finishes and is stored even if
//! the client that started it goes away. Its head and body chunks are published here; each
//! client, on any worker, reads them at its own pace and is woken the moment something new
//! arrives (a `watch` channel, no polling). Chunks are kept in memory only while the response
//! is shared, and never past `max_body` bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use crate::key::{PrimaryKey, VariantKey};
use crate::policy::HeaderList;

use super::respond::CacheStatus;

/// Every fetch in flight, and the URLs recently found uncacheable.
pub struct Flights {
    running: Mutex<HashMap<[u8; 32], Arc<Flight>>>,
    uncacheable: Mutex<HashMap<[u8; 32], SystemTime>>,
    /// How long an uncacheable answer keeps a URL out of coalescing (Varnish's hit-for-miss).
    pub remember_uncacheable: Duration,
    /// Longest a waiter waits for the leader's response head before fetching on its own.
    pub wait_timeout: Duration,
    /// Largest body shared through memory; larger responses are not shared.
    pub max_body: u64,
    /// Bytes held by all shared buffers together, against their common limit.
    budget: Arc<Budget>,
}

/// The memory every flight's shared buffer draws from, so that many large concurrent misses
/// cannot add up past one bound.
struct Budget {
    used: AtomicU64,
    limit: u64,
}

/// Most uncacheable marks remembered at once.
const MAX_UNCACHEABLE_MARKS: usize = 10_000;

impl Flights {
    /// Coalescing with these bounds; `total_memory` caps all shared buffers together.
    pub fn new(
        remember_uncacheable: Duration,
        wait_timeout: Duration,
        max_body: u64,
        total_memory: u64,
    ) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            uncacheable: Mutex::new(HashMap::new()),
            remember_uncacheable,
            wait_timeout,
            max_body,
            budget: Arc::new(Budget {
                used: AtomicU64::new(0),
                limit: total_memory,
            }),
        }
    }

    /// A flight nobody else can join (a request fetching on its own).
    pub(crate) fn unshared(&self) -> Arc<Flight> {
        Arc::new(Flight::new(self.budget.clone()))
    }

    /// Bytes currently held in shared buffers.
    pub fn shared_bytes(&self) -> u64 {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// Joins the fetch running for `primary`, or starts a new one; true = the caller leads it.
    pub(crate) fn join(&self, primary: &PrimaryKey) -> (Arc<Flight>, bool) {
        let mut running = lock(&self.running);
        if let Some(flight) = running.get(primary.hash()) {
            return (flight.clone(), false);
        }
        let flight = Arc::new(Flight::new(self.budget.clone()));
        running.insert(*primary.hash(), flight.clone());
        (flight, true)
    }

    /// The flight is over (or no longer shareable): later requests must not join it.
    pub(crate) fn detach(&self, primary: &PrimaryKey, flight: &Arc<Flight>) {
        let mut running = lock(&self.running);
        if running
            .get(primary.hash())
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            running.remove(primary.hash());
        }
    }

    /// Detaches every flight, so that nothing fetched before a purge is handed to a request
    /// that arrives after it (their results are also refused by the store).
    pub fn detach_all(&self) {
        lock(&self.running).clear();
    }

    /// Remembers that `primary` answered with something not storable.
    pub(crate) fn mark_uncacheable(&self, primary: &PrimaryKey, now: SystemTime) {
        if self.remember_uncacheable.is_zero() {
            return;
        }
        let mut map = lock(&self.uncacheable);
        // Bounded: drop expired marks when the map is full, and if all are live, start over
        // (forgetting a mark only costs one coalesced fetch), so no insert scans twice.
        if map.len() >= MAX_UNCACHEABLE_MARKS {
            map.retain(|_, until| *until > now);
            if map.len() >= MAX_UNCACHEABLE_MARKS / 2 {
                map.clear();
            }
        }
        map.insert(*primary.hash(), now + self.remember_uncacheable);
    }

    /// True while `primary` is remembered as uncacheable.
    pub(crate) fn recently_uncacheable(&self, primary: &PrimaryKey, now: SystemTime) -> bool {
        let mut map = lock(&self.uncacheable);
        match map.get(primary.hash()) {
            Some(until) if *until > now => true,
            Some(_) => {
                map.remove(primary.hash());
                false
            }
            None => false,
        }
    }

    /// Forgets the uncacheable mark (the URL was just stored after all).
    pub(crate) fn clear_uncacheable(&self, primary: &PrimaryKey) {
        lock(&self.uncacheable).remove(primary.hash());
    }
}

/// What the leader's fetch came to.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// A response whose body streams through the flight.
    Response(Arc<SharedHead>),
    /// A 304 freshened this stored entry: read it from the store.
    Revalidated(VariantKey),
    /// The origin failed before sending a head.
    Failed {
        status: u16,
        message: String,
        detail: &'static str,
    },
}

/// The response head the leader got, as clients will see it.
pub(crate) struct SharedHead {
    pub status: u16,
    pub headers: HeaderList,
    pub content_length: Option<u64>,
    pub cache_status: CacheStatus,
    /// Whether waiters may use this response: it is stored (so it is meant for sharing) and
    /// small enough to pass through memory. `vary` says which requests it answers.
    pub shareable: bool,
    pub vary_fields: Vec<String>,
    pub vary_values: Vec<(String, Option<String>)>,
}

#[derive(Default)]
struct State {
    outcome: Option<Outcome>,
    chunks: Vec<Bytes>,
    buffered: u64,
    end: Option<Result<(), String>>,
    /// The body outgrew the shared buffer and the readers were cut.
    overflowed: bool,
}

/// One fetch in progress.
pub(crate) struct Flight {
    state: Mutex<State>,
    version: watch::Sender<u64>,
    budget: Arc<Budget>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let held = lock(&self.state).buffered;
        self.budget.used.fetch_sub(held, Ordering::Relaxed);
    }
}

impl Flight {
    fn new(budget: Arc<Budget>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            version: watch::Sender::new(0),
            budget,
        }
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Publishes the head (or failure); wakes every waiter.
    pub(crate) fn publish(&self, outcome: Outcome) {
        lock(&self.state).outcome = Some(outcome);
        self.changed();
    }

    /// Appends a body chunk for the readers. False if the buffer would pass `max_body`, or all
    /// shared buffers together their memory limit: the flight then ends in an error for its
    /// readers and gives its memory back.
    pub(crate) fn push(&self, chunk: Bytes, max_body: u64) -> bool {
        let ok = {
            let mut state = lock(&self.state);
            let add = chunk.len() as u64;
            let total = self.budget.used.fetch_add(add, Ordering::Relaxed) + add;
            state.buffered += add;
            if state.buffered > max_body || total > self.budget.limit {
                self.budget
                    .used
                    .fetch_sub(state.buffered, Ordering::Relaxed);
                state.buffered = 0;
                state.overflowed = true;
                state.chunks.clear();
                state.end = Some(Err("response too large to share".into()));
                false
            } else {
                state.chunks.push(chunk);
                true
            }
        };
        self.changed();
        ok
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

    /// True if the body outgrew the shared buffer (its readers were cut).
    pub(crate) fn overflowed(&self) -> bool {
        lock(&self.state).overflowed
    }

    /// Waits for the head; `None` if `limit` passes first.
    pub(crate) async fn outcome(&self, limit: Duration) -> Option<Outcome> {
        let mut rx = self.version.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(outcome) = lock(&self.state).outcome.clone() {
                    return outcome;
                }
                if rx.changed().await.is_err() {
                    // Unreachable while we hold the flight (the sender lives in it).
                    return Outcome::Failed {
                        status: 502,
                        message: "origin fetch vanished".into(),
                        detail: "origin-error",
                    };
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok()
    }

    /// The body from its first byte, as it arrives.
    pub(crate) fn body(self: Arc<Self>) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        let rx = self.version.subscribe();
        futures_util::stream::unfold(
            (self, 0usize, rx, false),
            |(flight, next, mut rx, done)| async move {
                if done {
                    return None;
                }
                loop {
                    rx.borrow_and_update();
                    {
                        let state = lock(&flight.state);
                        if let Some(chunk) = state.chunks.get(next) {
                            let chunk = chunk.clone();
                            drop(state);
                            return Some((Ok(chunk), (flight, next + 1, rx, false)));
                        }
                        match &state.end {
                            Some(Ok(())) => return None,
                            Some(Err(e)) => {
                                let err = std::io::Error::other(e.clone());
                                drop(state);
                                return Some((Err(err), (flight, next, rx, true)));
                            }
                            None => {}
                        }
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later request on this lock.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flights(total: u64) -> Flights {
        Flights::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
            1 << 20,
            total,
        )
    }

    #[test]
    fn shared_buffers_draw_from_one_memory_budget() {
        let flights = flights(100);
        let (a, _) = flights.join(&PrimaryKey::new("http", "h", "/a"));
        let (b, _) = flights.join(&PrimaryKey::new("http", "h", "/b"));
        assert!(a.push(Bytes::from(vec![0u8; 60]), 1 << 20));
        assert_eq!(flights.shared_bytes(), 60);
        // Together they would pass the budget: the second flight overflows and gives back its bytes.
        assert!(!b.push(Bytes::from(vec![0u8; 60]), 1 << 20));
        assert!(b.overflowed());
        assert_eq!(flights.shared_bytes(), 60);
        // A finished flight returns its memory when the last reader lets go.
        flights.detach(&PrimaryKey::new("http", "h", "/a"), &a);
        drop(a);
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[test]
    fn one_flight_may_not_pass_max_body() {
        let flights = flights(1 << 30);
        let f = flights.unshared();
        assert!(f.push(Bytes::from(vec![0u8; 10]), 15));
        assert!(!f.push(Bytes::from(vec![0u8; 10]), 15));
        assert!(f.overflowed());
        assert_eq!(flights.shared_bytes(), 0);
    }

    #[test]
    fn uncacheable_marks_stay_bounded() {
        let flights = flights(1 << 20);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..(MAX_UNCACHEABLE_MARKS * 3) {
            flights.mark_uncacheable(&PrimaryKey::new("http", "h", &format!("/{i}")), now);
        }
        assert!(lock(&flights.uncacheable).len() <= MAX_UNCACHEABLE_MARKS);
        let last = PrimaryKey::new("http", "h", &format!("/{}", MAX_UNCACHEABLE_MARKS * 3 - 1));
        assert!(flights.recently_uncacheable(&last, now));
    }
}
