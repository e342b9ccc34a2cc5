//! `larder dump`: one JSON object (or table row) per stored response, streamed one at a time.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cli::DumpFormat;
use crate::key::VariantKey;
use crate::store::{Entry, StoreError};

/// The shape of one dump line; `GET /entries` on the admin API prints the same.
#[derive(Debug, Serialize)]
pub struct DumpLine<'a> {
    pub url: &'a str,
    pub method: &'static str,
    pub status: u16,
    pub vary: serde_json::Map<String, serde_json::Value>,
    pub etag: Option<&'a str>,
    pub last_modified: Option<&'a str>,
    pub stored_at: u64,
    pub fresh_until: u64,
    pub stale_while_revalidate: u64,
    pub stale_if_error: u64,
    pub state: &'static str,
    pub size: u64,
    pub tags: &'a [String],
    pub body_blake3: String,
    pub body_location: &'static str,
    pub key: String,
}

impl<'a> DumpLine<'a> {
    /// Describes `entry` as of `now`. Times are Unix seconds.
    pub fn new(key: &VariantKey, entry: &'a Entry, now: SystemTime) -> Self {
        let f = &entry.freshness;
        let state = if f.is_fresh(now) {
            "fresh"
        } else if now < f.stale_until() {
            "stale"
        } else {
            "expired"
        };
        DumpLine {
            url: &entry.url,
            method: "GET",
            status: entry.status,
            vary: entry
                .vary
                .iter()
                .map(|(n, v)| {
                    let value = v
                        .clone()
                        .map_or(serde_json::Value::Null, serde_json::Value::String);
                    (n.clone(), value)
                })
                .collect(),
            etag: entry.headers.get_str("etag"),
            last_modified: entry.headers.get_str("last-modified"),
            stored_at: unix_secs(entry.stored_at),
            fresh_until: unix_secs(f.fresh_until()),
            stale_while_revalidate: f.stale_while_revalidate.as_secs(),
            stale_if_error: f.stale_if_error.as_secs(),
            state,
            size: entry.body.len,
            tags: &entry.tags,
            body_blake3: hex(&entry.body.blake3),
            body_location: if entry.body.inline.is_some() {
                "inline"
            } else {
                "file"
            },
            key: hex(key.as_bytes()),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `entries` (a store's matching entries, from [`crate::store::ReadOnlyStore::entries`]) to `out`.
pub fn dump_entries(
    entries: impl Iterator<Item = Result<(VariantKey, Entry), StoreError>>,
    out: &mut impl Write,
    format: DumpFormat,
    limit: Option<u64>,
    now: SystemTime,
) -> Result<u64, DumpError> {
    let (mut written, mut bytes) = (0u64, 0u64);
    if format == DumpFormat::Table {
        write_table_header(out)?;
    }
    for item in entries {
        if limit.is_some_and(|l| written >= l) {
            break;
        }
        let (key, entry) = item?;
        let line = DumpLine::new(&key, &entry, now);
        match format {
            DumpFormat::Jsonl => {
                serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
            }
            DumpFormat::Table => {
                let json = serde_json::to_vec(&line).map_err(std::io::Error::from)?;
                write_json_line(out, format, &json)?;
            }
        }
        written += 1;
        bytes += entry.body.len;
    }
    if format == DumpFormat::Table {
        write_table_totals(out, written, bytes)?;
    }
    out.flush()?;
    Ok(written)
}

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Admin(String),
}

/// Streams `GET /entries` from a running server's admin API to `out` (that server holds the
/// store's lock, which even the read-only reader needs). Table output is rendered from the JSON
/// lines.
pub async fn dump_via_admin(
    admin: std::net::SocketAddr,
    token: Option<&str>,
    out: &mut impl Write,
    format: DumpFormat,
    prefix: Option<&str>,
    tag: Option<&str>,
    limit: Option<u64>,
) -> Result<u64, DumpError> {
    use futures_util::StreamExt;

    #[derive(Serialize)]
    struct Query<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        prefix: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    }
    let client = awc::Client::builder().disable_timeout().finish();
    let mut request = client
        .get(format!("http://{admin}/entries"))
        .query(&Query { prefix, tag, limit })
        .map_err(|e| DumpError::Admin(e.to_string()))?;
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| DumpError::Admin(format!("cannot reach the admin API at {admin}: {e}")))?;
    if !response.status().is_success() {
        let body = response.body().await.unwrap_or_default();
        return Err(DumpError::Admin(format!(
            "admin API at {admin} answered {}: {}",
            response.status(),
            String::from_utf8_lossy(&body).trim()
        )));
    }
    if format == DumpFormat::Table {
        write_table_header(out)?;
    }
    let (mut written, mut bytes) = (0u64, 0u64);
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = response.next().await {
        let chunk = chunk.map_err(|e| DumpError::Admin(format!("entries stream broke: {e}")))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            bytes += write_json_line(out, format, &line)?;
            written += 1;
        }
    }
    if !pending.iter().all(u8::is_ascii_whitespace) {
        bytes += write_json_line(out, format, &pending)?;
        written += 1;
    }
    if format == DumpFormat::Table {
        write_table_totals(out, written, bytes)?;
    }
    out.flush()?;
    Ok(written)
}

fn write_table_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<6} {:<8} {:>10} {:<7} URL",
        "STATUS", "STATE", "SIZE", "WHERE"
    )
}

/// The last line of a table: how many entries were listed and their body bytes.
fn write_table_totals(out: &mut impl Write, entries: u64, bytes: u64) -> std::io::Result<()> {
    writeln!(out, "TOTAL {entries} entries, {bytes} bytes")
}

/// Writes one entry line; returns its body size (table format only, else 0).
fn write_json_line(
    out: &mut impl Write,
    format: DumpFormat,
    line: &[u8],
) -> Result<u64, DumpError> {
    match format {
        DumpFormat::Jsonl => {
            out.write_all(line)?;
            Ok(0)
        }
        DumpFormat::Table => {
            let v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| DumpError::Admin(format!("bad entry line from admin API: {e}")))?;
            // Plain strings and integers: serde_json::Value's Display ignores width and fill.
            let number = |field: &str| v[field].as_u64().map_or("?".to_string(), |n| n.to_string());
            writeln!(
                out,
                "{:<6} {:<8} {:>10} {:<7} {}",
                number("status"),
                v["state"].as_str().unwrap_or("?"),
                number("size"),
                v["body_location"].as_str().unwrap_or("?"),
                v["url"].as_str().unwrap_or("?")
            )?;
            Ok(v["size"].as_u64().unwrap_or(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column start offsets of a table line: where each of the first five columns begins
    /// (SIZE is right-aligned, so its *end* is what lines up; see `aligned`).
    fn columns(line: &str) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut prev_space = true;
        for (i, c) in line.char_indices() {
            if c != ' ' && prev_space {
                starts.push(i);
            }
            prev_space = c == ' ';
        }
        starts
    }

    #[test]
    fn table_columns_line_up() {
        let mut out = Vec::new();
        write_table_header(&mut out).unwrap();
        for (status, state, size, location) in [
            (200, "fresh", 3, "inline"),
            (404, "expired", 1_234_567, "file"),
            (301, "stale", 42, "inline"),
        ] {
            let line = serde_json::json!({
                "status": status, "state": state, "size": size,
                "body_location": location, "url": "http://h/p",
            });
            write_json_line(&mut out, DumpFormat::Table, line.to_string().as_bytes()).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let header = columns(lines[0]);
        let size_end = lines[0].find("SIZE").unwrap() + 4;
        for line in &lines[1..] {
            let cols = columns(line);
            assert_eq!(cols.len(), 5, "{line:?}");
            // STATUS, STATE, WHERE and URL start where their headings do.
            for i in [0, 1, 3, 4] {
                assert_eq!(cols[i], header[i], "column {i} of {line:?}\n{text}");
            }
            // SIZE ends where its heading does.
            let size_text = &line[cols[2]..];
            let size_len = size_text.find(' ').unwrap();
            assert_eq!(cols[2] + size_len, size_end, "{line:?}\n{text}");
        }
    }
}
