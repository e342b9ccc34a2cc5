//! Background upkeep of the store: reconciles its counters after start, removes orphaned body files, then removes dead entries in small batches.
//!
//! Runs on its own thread because every store call here is blocking sled / file-system work
//! that must never sit on an actix worker. Eviction for `max_size` is the store's own job (its
//! flusher thread reacts to the commit that crosses the bound); this thread handles time.
//! Serving never waits for it: the server starts this thread once its listeners are bound.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::store::{Entry, ExpiryPosition, Store};

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
    /// Starts the thread: a reconcile of the store's counters and an orphan-file sweep right
    /// away, then an expiry sweep every interval (and another reconcile whenever a record that
    /// no longer decoded left the counters in doubt).
    pub fn start(store: Store, clock: Arc<dyn Clock>, config: SweepConfig) -> Maintenance {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("larder-maintenance".into())
            .spawn(move || {
                let stopped = || *signal.0.lock().unwrap_or_else(|e| e.into_inner());
                reconcile(&store, &config, &stopped);
                // After the reconcile: it may have released files a stale reference kept.
                match store.sweep_orphan_bodies() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(files = n, "removed orphaned body files"),
                    Err(e) => tracing::warn!(error = %e, "orphan body sweep failed"),
                }
                let mut sweep = Sweeper::default();
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
                    let removed = sweep.sweep(&store, clock.now(), &config);
                    if removed > 0 {
                        tracing::debug!(removed, "swept expired entries");
                    }
                    store.refresh_quarantine();
                    if store.reconcile_wanted() {
                        reconcile(&store, &config, &stopped);
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

/// Recounts the store's counters from its records (see [`Store::reconcile`]), in batches, until
/// done or asked to stop.
fn reconcile(store: &Store, config: &SweepConfig, stopped: &dyn Fn() -> bool) {
    let started = std::time::Instant::now();
    match store.reconcile(config.batch * 4, &|| !stopped()) {
        Ok(Some(report)) => tracing::info!(
            records = report.records,
            repaired = report.repaired.len() as u64 + report.refs_repaired,
            took_ms = started.elapsed().as_millis() as u64,
            "store counters reconciled"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "store reconcile failed"),
    }
}

/// The expiry sweep, with where its second pass stopped (see [`Sweeper::sweep`]).
#[derive(Default)]
pub struct Sweeper {
    /// The last dead-but-revalidatable entry an earlier sweep stepped over.
    resume: Option<ExpiryPosition>,
    sweeps: u64,
}

/// Every this many sweeps the second pass starts from the oldest dead entry again: an entry
/// stored already dead (an old `Age`) can sit behind the resume point.
const RESCAN_EVERY: u64 = 16;

impl Sweeper {
    /// One sweep. An entry whose freshness and every stale window have passed is dead: it goes
    /// at once if it has no validators (nothing could revalidate it), or once it has been dead
    /// for `keep_revalidatable` otherwise. Returns the number removed.
    ///
    /// The first pass takes everything dead for longer than the keep time, oldest first, until
    /// none is left. The second walks the rest of the dead entries in batches and removes those
    /// without validators; the revalidatable ones it steps over stay put in the expiry order, so
    /// the walk resumes after the last of them next time instead of reading them all again.
    pub fn sweep(&mut self, store: &Store, now: SystemTime, config: &SweepConfig) -> u64 {
        let mut removed = sweep_long_dead(store, now, config);
        let batch = config.batch.max(1);
        if self.sweeps.is_multiple_of(RESCAN_EVERY) {
            self.resume = None;
        }
        self.sweeps += 1;
        loop {
            let rows = match store.expired_after(self.resume.as_ref(), now, batch) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed");
                    return removed;
                }
            };
            let full = rows.len() == batch;
            let mut progress = false;
            for (at, key) in rows {
                match store.get(&key) {
                    Ok(Some(entry)) if !has_validators(&entry) => {
                        if store
                            .remove_expired(&key, now, has_validators)
                            .unwrap_or(false)
                        {
                            removed += 1;
                            progress = true;
                        }
                    }
                    // Kept for revalidation (or gone): step over it for good.
                    Ok(_) => {
                        self.resume = Some(at);
                        progress = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep failed");
                        return removed;
                    }
                }
            }
            // A batch that changed nothing (removals failing) would come back unchanged.
            if !full || !progress {
                return removed;
            }
        }
    }
}

/// Removes every entry dead for longer than `keep_revalidatable`, validators or not.
fn sweep_long_dead(store: &Store, now: SystemTime, config: &SweepConfig) -> u64 {
    let mut removed = 0;
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
            if store
                .remove_expired(&key, long_dead, |_| false)
                .unwrap_or(false)
            {
                removed += 1;
            }
        }
        // A short batch is the end; a batch that removed nothing (a failing disk) would only
        // come back unchanged, so stop until the next sweep instead of spinning.
        if batch_len < config.batch || removed == before {
            return removed;
        }
    }
}

fn has_validators(entry: &Entry) -> bool {
    entry.headers.contains("etag") || entry.headers.contains("last-modified")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{PrimaryKey, VariantKey};
    use crate::policy::{Freshness, HeaderList};
    use crate::store::{BodyInfo, StoreOptions};
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Stores an entry dead from `dead_at` on, with an ETag if `validators`.
    async fn put(store: &Store, path: &str, dead_at: u64, validators: bool) -> VariantKey {
        let p = PrimaryKey::new("http", "sweep.test", path);
        let key = VariantKey::new(&p, &[]);
        let mut headers = HeaderList::new();
        if validators {
            headers.push("etag", "\"v\"");
        }
        let entry = Entry {
            url: p.url().to_string(),
            status: 200,
            headers,
            vary: Vec::new(),
            freshness: Freshness {
                request_time: at(dead_at - 10),
                response_time: at(dead_at - 10),
                corrected_initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(10),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
                no_cache: false,
            },
            tags: Vec::new(),
            stored_at: at(dead_at - 10),
            body: BodyInfo::default(),
        };
        let mut w = store.begin_write(key, entry);
        w.write(b"body").await.unwrap();
        w.commit(None).await.unwrap();
        key
    }

    // A dead entry without validators goes at the first sweep even behind many dead ones that
    // are kept for revalidation (more than any fixed window of batches); the kept ones stay until
    // keep_revalidatable has passed.
    #[tokio::test]
    async fn dead_entries_without_validators_go_even_behind_many_revalidatable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let mut kept = Vec::new();
        for i in 0..30 {
            kept.push(put(&store, &format!("/etag/{i}"), 1_000 + i, true).await);
        }
        let doomed = put(&store, "/plain", 2_000, false).await;
        let config = SweepConfig {
            interval: Duration::from_secs(60),
            keep_revalidatable: Duration::from_secs(86_400),
            batch: 2,
        };
        let mut sweeper = Sweeper::default();
        assert_eq!(sweeper.sweep(&store, at(1_500), &config), 0);
        assert_eq!(sweeper.sweep(&store, at(3_000), &config), 1);
        assert!(store.get(&doomed).unwrap().is_none());
        assert!(kept.iter().all(|k| store.get(k).unwrap().is_some()));
        // The next sweep resumes after the kept ones and still finds newly dead entries.
        let later = put(&store, "/later", 3_500, false).await;
        assert_eq!(sweeper.sweep(&store, at(4_000), &config), 1);
        assert!(store.get(&later).unwrap().is_none());
        // Past the keep time every dead entry goes.
        let removed = sweeper.sweep(&store, at(1_000 + 86_400 + 100), &config);
        assert_eq!(removed, 30);
        assert_eq!(store.stats().entries, 0);
    }

    // The sweep reads the expiry index, then removes: an entry a fetch replaced in between
    // (fresh again, or now revalidatable) is not the dead one the index listed, so it stays.
    #[tokio::test]
    async fn an_entry_replaced_after_the_sweep_listed_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let key = put(&store, "/busy", 1_000, false).await;
        let listed = store.expired(at(2_000), 10).unwrap();
        assert_eq!(listed, vec![key]);
        put(&store, "/busy", 5_000, false).await;
        assert!(!store.remove_expired(&key, at(2_000), |_| false).unwrap());
        assert!(store.get(&key).unwrap().is_some(), "the fresh copy stays");

        let listed = store.expired_after(None, at(6_000), 10).unwrap();
        assert_eq!(listed.len(), 1);
        put(&store, "/busy", 5_500, true).await;
        assert!(
            !store
                .remove_expired(&key, at(6_000), has_validators)
                .unwrap()
        );
        assert!(
            store.get(&key).unwrap().is_some(),
            "the revalidatable copy stays"
        );
        assert!(store.remove_expired(&key, at(6_000), |_| false).unwrap());
        assert!(store.get(&key).unwrap().is_none());
    }
}
