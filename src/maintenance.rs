//! Background upkeep of the store: removes dead entries in small batches, and orphaned body files once after start.
//!
//! Runs on its own thread because every store call here is blocking sled / file-system work
//! that must never sit on an actix worker. Eviction for `max_size` is the store's own job (its
//! flusher thread reacts to the commit that crosses the bound); this thread handles time.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::store::{Entry, Store};

/// How the sweeper runs.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Time between sweeps.
    pub interval: Duration,
    /// How long an entry past every stale window is kept when it has validators, so that the
    /// next request can still revalidate it (a 304) instead of fetching the body again.
    pub keep_revalidatable: Duration,
    /// Entries removed per batch (each batch is its own short store call).
    pub batch: usize,
}

/// The running maintenance thread; dropping it stops the thread.
pub struct Maintenance {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Maintenance {
    /// Starts the thread: an orphan-file sweep right away, then an expiry sweep every interval.
    pub fn start(store: Store, clock: Arc<dyn Clock>, config: SweepConfig) -> Maintenance {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("larder-maintenance".into())
            .spawn(move || {
                match store.sweep_orphan_bodies() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(files = n, "removed orphaned body files"),
                    Err(e) => tracing::warn!(error = %e, "orphan body sweep failed"),
                }
                loop {
                    {
                        let (stopped, wake) = &*signal;
                        let guard = stopped.lock().unwrap_or_else(|e| e.into_inner());
                        let (guard, _) = wake
                            .wait_timeout_while(guard, config.interval, |s| !*s)
                            .unwrap_or_else(|e| e.into_inner());
                        if *guard {
                            return;
                        }
                    }
                    let removed = sweep_expired(&store, clock.now(), &config);
                    if removed > 0 {
                        tracing::debug!(removed, "swept expired entries");
                    }
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the maintenance thread"))
            .ok();
        Maintenance { stop, thread }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One sweep. An entry whose freshness and every stale window have passed is dead: it goes
/// at once if it has no validators (nothing could revalidate it), or once it has been dead
/// for `keep_revalidatable` otherwise. Returns the number removed.
pub fn sweep_expired(store: &Store, now: SystemTime, config: &SweepConfig) -> u64 {
    let mut removed = 0;
    // Dead for longer than the keep time: every one goes, validators or not.
    let long_dead = now
        .checked_sub(config.keep_revalidatable)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    loop {
        let keys = match store.expired(long_dead, config.batch) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep failed");
                return removed;
            }
        };
        let batch_len = keys.len();
        let before = removed;
        for key in keys {
            if store.remove(&key).unwrap_or(false) {
                removed += 1;
            }
        }
        // A short batch is the end; a batch that removed nothing (a failing disk) would only
        // come back unchanged, so stop until the next sweep instead of spinning.
        if batch_len < config.batch || removed == before {
            break;
        }
    }
    // Dead more recently: only those without validators. Revalidatable ones ahead of them in
    // the expiry order are skipped; a window of 4 batches bounds the work per sweep.
    if let Ok(keys) = store.expired(now, config.batch * 4) {
        for key in keys {
            if let Ok(Some(entry)) = store.get(&key)
                && !has_validators(&entry)
                && store.remove(&key).unwrap_or(false)
            {
                removed += 1;
            }
        }
    }
    removed
}

fn has_validators(entry: &Entry) -> bool {
    entry.headers.contains("etag") || entry.headers.contains("last-modified")
}
