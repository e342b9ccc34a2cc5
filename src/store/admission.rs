//! Which entries deserve the space when the store is full: a TinyLFU frequency sketch of recent lookups (count-min, four rows of 4-bit counters, halved periodically) and the two rules eviction applies with it.
//!
//! Plain LRU lets one scan of one-hit URLs (a crawler, a bulk export) push out every entry that
//! is used all the time. TinyLFU keeps a compact, approximate count of how often each URL was
//! looked up lately; a new entry only takes the place of the LRU victim if it is used more often
//! than that victim (`benches/eviction.rs` measures both on a skewed workload with scans). The
//! sketch lives in memory only: it costs a few atomic adds per lookup, never a disk write, and
//! after a restart it relearns within one aging period.

use std::sync::atomic::{AtomicU64, Ordering};

/// The largest value a 4-bit counter holds; TinyLFU needs no more to tell hot from cold.
const COUNTER_MAX: u64 = 15;
/// Rows of the count-min sketch: the estimate is the minimum over them.
const ROWS: usize = 4;
/// Each u64 word packs 16 counters of 4 bits.
const PER_WORD: usize = 16;

/// An approximate, aging count of how often each key was seen. Thread-safe without locks; races
/// between concurrent updates lose an increment now and then, which only blurs an estimate.
pub struct FrequencySketch {
    words: Box<[AtomicU64]>,
    /// Counters per row minus one (a power of two minus one).
    mask: u64,
    words_per_row: usize,
    additions: AtomicU64,
    /// After this many additions every counter is halved, so old popularity fades.
    sample: u64,
}

impl FrequencySketch {
    /// A sketch sized for about `expected_keys` distinct keys in use (rounded up to a power of
    /// two, at least 64): 2 bytes of memory per key. The counters age every 10 × that many
    /// additions, TinyLFU's usual sample size.
    pub fn new(expected_keys: usize) -> FrequencySketch {
        let width = expected_keys.clamp(64, 1 << 26).next_power_of_two();
        let words_per_row = width / PER_WORD;
        FrequencySketch {
            words: (0..words_per_row * ROWS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            mask: width as u64 - 1,
            words_per_row,
            additions: AtomicU64::new(0),
            sample: 10 * width as u64,
        }
    }

    /// Where `hash`'s counter sits in each row: (word index, bit shift).
    fn slots(&self, hash: &[u8; 32]) -> [(usize, u32); ROWS] {
        // The key is already a blake3 hash: its four 64-bit words are independent row hashes.
        std::array::from_fn(|row| {
            let bytes: [u8; 8] = hash[row * 8..row * 8 + 8].try_into().expect("8 bytes");
            let at = u64::from_le_bytes(bytes) & self.mask;
            let word = row * self.words_per_row + (at as usize / PER_WORD);
            (word, (at as u32 % PER_WORD as u32) * 4)
        })
    }

    fn counter(&self, (word, shift): (usize, u32)) -> u64 {
        (self.words[word].load(Ordering::Relaxed) >> shift) & COUNTER_MAX
    }

    /// Counts one use of `hash` (conservative update: only the counters at the minimum grow).
    pub fn record(&self, hash: &[u8; 32]) {
        let slots = self.slots(hash);
        let min = slots.iter().map(|&s| self.counter(s)).min().unwrap_or(0);
        if min < COUNTER_MAX {
            for (word, shift) in slots {
                let _ = self.words[word].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    ((w >> shift) & COUNTER_MAX == min).then(|| w + (1 << shift))
                });
            }
        }
        if self.additions.fetch_add(1, Ordering::Relaxed) + 1 == self.sample {
            self.age();
        }
    }

    /// How often `hash` was seen lately (an over-estimate at worst, never an under-estimate
    /// except through aging), 0..=15.
    pub fn estimate(&self, hash: &[u8; 32]) -> u8 {
        let min = self.slots(hash).iter().map(|&s| self.counter(s)).min();
        min.unwrap_or(0) as u8
    }

    /// Halves every counter. Runs in the thread whose addition completed the sample: one pass over
    /// the table (at most a few MiB) every `sample` lookups.
    fn age(&self) {
        for w in self.words.iter() {
            let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some((v >> 1) & 0x7777_7777_7777_7777)
            });
        }
        self.additions.fetch_sub(self.sample / 2, Ordering::Relaxed);
    }
}

/// TinyLFU's admission test, applied when storing `candidate` would push the store over its
/// bound: it may take the LRU victim's place unless the victim was used more often. (Textbook
/// TinyLFU keeps the victim on a tie too; with the store's batched eviction, letting ties in
/// scored higher in `benches/eviction.rs`, and it keeps a cache of one-hit entries LRU.)
pub fn admits(candidate: u8, victim: u8) -> bool {
    candidate >= victim
}

/// Eviction's guard: while evicting to make room for entries seen `pressure` times, an LRU
/// victim used more often than that is spared (moved to the recent end) instead of evicted, so
/// the batch that frees room down to the low-water mark does not take the hot set with it.
pub fn spares(victim: u8, pressure: u8) -> bool {
    victim > pressure
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> [u8; 32] {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    #[test]
    fn estimates_follow_counts_and_saturate() {
        let s = FrequencySketch::new(1024);
        for i in 0..200u64 {
            for _ in 0..(i % 8) {
                s.record(&h(i));
            }
        }
        // Count-min never under-estimates (no aging happened: 200 * 3.5 < 10 * 1024).
        let exact = (0..200u64).filter(|&i| s.estimate(&h(i)) == (i % 8) as u8);
        assert!(
            exact.count() >= 190,
            "too many collisions in a sparse sketch"
        );
        assert!((0..200u64).all(|i| s.estimate(&h(i)) >= (i % 8) as u8));
        for _ in 0..100 {
            s.record(&h(999));
        }
        assert_eq!(s.estimate(&h(999)), 15);
        assert_eq!(s.estimate(&h(123_456)), 0);
    }

    #[test]
    fn counters_halve_after_the_sample() {
        let s = FrequencySketch::new(64);
        // One key, 639 times: it saturates at 15 and the sample (10 × 64) is not yet complete.
        for _ in 0..639 {
            s.record(&h(1));
        }
        assert_eq!(s.estimate(&h(1)), 15);
        s.record(&h(1));
        assert_eq!(
            s.estimate(&h(1)),
            7,
            "the 640th addition halves every counter"
        );
        assert_eq!(s.additions.load(Ordering::Relaxed), 320);
    }

    #[test]
    fn admission_and_sparing_prefer_what_is_used_more() {
        assert!(admits(3, 2));
        assert!(
            admits(2, 2),
            "a tie lets the newcomer in: among equals the order is LRU"
        );
        assert!(!admits(1, 5));
        assert!(spares(5, 1));
        assert!(!spares(1, 1));
    }
}
