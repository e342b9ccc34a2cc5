//! The byte layout of one stored entry record (version byte + bincode 2 of `RecordV1`); the ONLY file that uses bincode.
//!
//! bincode keeps no field metadata, so the layout of a version is frozen once shipped: a change is a
//! new `RecordVn` and a new version byte, never an edited struct (see `migrations/README.md`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bincode::config::{Config, standard};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{BodyInfo, Entry};
use crate::policy::{Freshness, HeaderList};

/// The version byte in front of every v1 record.
pub const RECORD_V1: u8 = 1;

/// Largest inline body a store may be configured with; keeps every record under [`RECORD_LIMIT`].
pub const MAX_INLINE_MAX: usize = 1024 * 1024;

/// Upper bound on an encoded record (1 MiB of metadata + the largest inline body). Decoding with this
/// limit means a corrupt length prefix fails fast instead of allocating gigabytes.
pub const RECORD_LIMIT: usize = 1024 * 1024 + MAX_INLINE_MAX;

fn config() -> impl Config {
    standard().with_limit::<RECORD_LIMIT>()
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The record is empty (no version byte).
    #[error("empty record")]
    Empty,
    /// The version byte is not one this code knows.
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    /// bincode rejected the bytes (truncated, bad varint, limit exceeded, invalid UTF-8, …).
    #[error("record does not decode: {0}")]
    Decode(String),
    /// The bytes decoded but did not use all of the record.
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    /// The entry is too big to be a record (headers over ~1 MiB).
    #[error("record too large to encode: {0}")]
    Encode(String),
}

/// A byte string that bincode writes as length + raw bytes. Same layout as a `Vec<u8>` sequence,
/// but decoded in one copy instead of one serde call per byte.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Blob(Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Schema v1 of an entry record. Field order IS the layout; see `migrations/0001-initial.md`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RecordV1 {
    url: String,
    status: u16,
    headers: Vec<(String, Blob)>,
    vary: Vec<(String, Option<String>)>,
    request_time_ms: u64,
    response_time_ms: u64,
    corrected_initial_age_ms: u64,
    lifetime_ms: u64,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    must_revalidate: bool,
    no_cache: bool,
    tags: Vec<String>,
    stored_at_ms: u64,
    body_len: u64,
    body_blake3: [u8; 32],
    inline_body: Option<Blob>,
}

/// Unix milliseconds, saturating: times before 1970 become 0, absurd future times u64::MAX.
pub fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

fn dur_to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RecordV1 {
    fn from_entry(e: &Entry) -> RecordV1 {
        let f = &e.freshness;
        RecordV1 {
            url: e.url.clone(),
            status: e.status,
            headers: e
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), Blob(v.to_vec())))
                .collect(),
            vary: e.vary.clone(),
            request_time_ms: time_to_ms(f.request_time),
            response_time_ms: time_to_ms(f.response_time),
            corrected_initial_age_ms: dur_to_ms(f.corrected_initial_age),
            lifetime_ms: dur_to_ms(f.lifetime),
            stale_while_revalidate_ms: dur_to_ms(f.stale_while_revalidate),
            stale_if_error_ms: dur_to_ms(f.stale_if_error),
            must_revalidate: f.must_revalidate,
            no_cache: f.no_cache,
            tags: e.tags.clone(),
            stored_at_ms: time_to_ms(e.stored_at),
            body_len: e.body.len,
            body_blake3: e.body.blake3,
            inline_body: e.body.inline.as_ref().map(|b| Blob(b.to_vec())),
        }
    }

    fn into_entry(self) -> Entry {
        Entry {
            url: self.url,
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .map(|(n, v)| (n, v.0))
                .collect::<HeaderList>(),
            vary: self.vary,
            freshness: Freshness {
                request_time: ms_to_time(self.request_time_ms),
                response_time: ms_to_time(self.response_time_ms),
                corrected_initial_age: Duration::from_millis(self.corrected_initial_age_ms),
                lifetime: Duration::from_millis(self.lifetime_ms),
                stale_while_revalidate: Duration::from_millis(self.stale_while_revalidate_ms),
                stale_if_error: Duration::from_millis(self.stale_if_error_ms),
                must_revalidate: self.must_revalidate,
                no_cache: self.no_cache,
            },
            tags: self.tags,
            stored_at: ms_to_time(self.stored_at_ms),
            body: BodyInfo {
                len: self.body_len,
                blake3: self.body_blake3,
                inline: self.inline_body.map(|b| bytes::Bytes::from(b.0)),
            },
        }
    }
}

/// Encodes an entry as the current record version. Times and durations are kept to the millisecond.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, FormatError> {
    let record = RecordV1::from_entry(entry);
    let mut out = Vec::with_capacity(256 + entry.body.inline.as_ref().map_or(0, |b| b.len()));
    out.push(RECORD_V1);
    bincode::serde::encode_into_std_write(&record, &mut out, config())
        .map_err(|e| FormatError::Encode(e.to_string()))?;
    // The limit is only enforced on decode; refuse here what could never be read back.
    if out.len() > RECORD_LIMIT {
        return Err(FormatError::Encode(format!("{} bytes", out.len())));
    }
    Ok(out)
}

/// Decodes a record of any known version into an [`Entry`]. Never panics on bad bytes.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, FormatError> {
    let (&version, rest) = bytes.split_first().ok_or(FormatError::Empty)?;
    match version {
        RECORD_V1 => {
            let (record, used): (RecordV1, usize) =
                bincode::serde::decode_from_slice(rest, config())
                    .map_err(|e| FormatError::Decode(e.to_string()))?;
            if used != rest.len() {
                return Err(FormatError::Trailing(rest.len() - used));
            }
            Ok(record.into_entry())
        }
        other => Err(FormatError::UnknownVersion(other)),
    }
}

/// The entry exactly as it will read back after a round trip through a record (times truncated to
/// whole milliseconds), so that what `commit` returns equals what `get` returns later.
pub fn normalize(entry: Entry) -> Entry {
    RecordV1::from_entry(&entry).into_entry()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(inline: Option<&'static [u8]>) -> Entry {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        Entry {
            url: "http://x/a?b".into(),
            status: 200,
            headers: [
                ("content-type", &b"text/plain"[..]),
                ("x-raw", &[0xff, 0x00][..]),
            ]
            .into_iter()
            .collect(),
            vary: vec![
                ("accept-encoding".into(), Some("gzip".into())),
                ("cookie".into(), None),
            ],
            freshness: Freshness {
                request_time: t,
                response_time: t + Duration::from_millis(5),
                corrected_initial_age: Duration::from_secs(2),
                lifetime: Duration::from_secs(60),
                stale_while_revalidate: Duration::from_secs(30),
                stale_if_error: Duration::ZERO,
                must_revalidate: true,
                no_cache: false,
            },
            tags: vec!["t1".into(), "t2".into()],
            stored_at: t + Duration::from_millis(6),
            body: BodyInfo {
                len: inline.map_or(100_000, |b| b.len() as u64),
                blake3: [7; 32],
                inline: inline.map(bytes::Bytes::from_static),
            },
        }
    }

    /// The v1 layout, frozen: if this changes, old stores no longer read. Make a V2 instead.
    /// Read as: version 1; url; status 200 (varint); 2 headers; 2 vary values (Some/None);
    /// request, response times (u64 varints); age 2 s, lifetime 60 s, swr 30 s, sie 0 (ms);
    /// must_revalidate, no_cache; 2 tags; stored_at; body_len 3; blake3; inline Some("hi!").
    const GOLDEN_V1: &str = "\
        01 0c687474703a2f2f782f613f62 c8\
        02 0c636f6e74656e742d74797065 0a746578742f706c61696e 05782d726177 02ff00\
        02 0f6163636570742d656e636f64696e67 01 04677a6970 06636f6f6b6965 00\
        fd7b68e5cf8b010000 fd8068e5cf8b010000 fbd007 fb60ea fb3075 00\
        01 00 02 027431 027432 fd8168e5cf8b010000 03\
        0707070707070707070707070707070707070707070707070707070707070707\
        01 03686921";

    fn golden() -> Vec<u8> {
        let hex: String = GOLDEN_V1.chars().filter(|c| !c.is_whitespace()).collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn golden_entry() -> Entry {
        let mut e = sample(Some(b"hi!"));
        e.body.len = 3;
        e
    }

    #[test]
    fn v1_encoding_matches_golden_bytes() {
        let bytes = encode_entry(&golden_entry()).unwrap();
        assert_eq!(crate::key::hex(&bytes), crate::key::hex(&golden()));
    }

    #[test]
    fn golden_bytes_decode_to_the_entry() {
        assert_eq!(decode_entry(&golden()).unwrap(), golden_entry());
    }

    #[test]
    fn round_trip_inline_and_file() {
        for e in [sample(Some(b"body")), sample(None)] {
            let bytes = encode_entry(&e).unwrap();
            assert_eq!(decode_entry(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn times_are_kept_to_the_millisecond() {
        let mut e = sample(None);
        e.stored_at += Duration::from_nanos(999_999);
        let back = decode_entry(&encode_entry(&e).unwrap()).unwrap();
        assert_ne!(back, e);
        assert_eq!(back, normalize(e));
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let good = encode_entry(&sample(Some(b"body"))).unwrap();
        assert!(matches!(decode_entry(&[]), Err(FormatError::Empty)));
        assert!(matches!(
            decode_entry(&[9, 1, 2]),
            Err(FormatError::UnknownVersion(9))
        ));
        // Every truncation fails cleanly.
        for cut in 1..good.len() {
            assert!(decode_entry(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode_entry(&long), Err(FormatError::Trailing(1))));
        // A length prefix claiming ~2^62 bytes must not allocate.
        let huge = [RECORD_V1, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x40, b'h'];
        assert!(decode_entry(&huge).is_err());
        // Every single-byte flip either fails or decodes to *something*, never panics.
        for i in 1..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xa5;
            let _ = decode_entry(&b);
        }
    }
}
