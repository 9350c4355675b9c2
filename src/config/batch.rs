//! The `[batch]` table: where the Batch API keeps its files and batches, and how its workers run
//! lines (bounds, concurrency, backoff, retention). Absent, `/v1/files` and `/v1/batches` are
//! forwarded upstream like any other path.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::{Invalid, KeyPath};

/// `[batch]`: the OpenAI Files and Batches API served by the proxy itself.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Directory of the embedded store (the database and the files' contents). It must survive a
    /// restart for batches to resume: a volume, not the container's own filesystem.
    pub store: PathBuf,
    /// An uploaded file above this size is refused with 413 while it arrives.
    pub max_file_bytes: u64,
    /// A batch input file with more lines is refused with 400.
    pub max_lines: u64,
    /// Lines in flight at once on this replica, over all batches.
    pub concurrency: usize,
    /// Batch work pauses while more live requests than this are in flight.
    pub yield_above: usize,
    /// The n-th retry of a line waits between half of and the whole of `retry_base` x 2^(n-1),
    /// unless the upstream asked for a `Retry-After`.
    #[serde(with = "super::humantime_serde")]
    pub retry_base: Duration,
    /// Retries of one line after its first attempt; the last failure is then written to the
    /// batch's error file.
    pub max_retries: u32,
    /// Files, and batches that finished, are removed this long after they were created or
    /// finished.
    #[serde(with = "super::humantime_serde")]
    pub retention: Duration,
    /// A line held longer than this by a worker is given up by it and may be taken again (by
    /// another replica, with a shared store).
    #[serde(with = "super::humantime_serde")]
    pub claim_after: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            store: PathBuf::from("/var/lib/openrouter-proxy/batches"),
            max_file_bytes: 200 * 1024 * 1024,
            max_lines: 50_000,
            concurrency: 8,
            yield_above: 64,
            retry_base: Duration::from_secs(2),
            max_retries: 3,
            retention: Duration::from_secs(7 * 24 * 3600),
            claim_after: Duration::from_secs(5 * 60),
        }
    }
}

impl BatchConfig {
    /// Checks ranges that the types alone do not express; each failure names its key under
    /// `batch.`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let at = |key: &str| KeyPath::new("batch").key(key);
        if self.store.as_os_str().is_empty() {
            return Err(Invalid::new(at("store"), "must not be empty"));
        }
        if self.max_file_bytes == 0 {
            return Err(Invalid::new(at("max_file_bytes"), "must be greater than 0"));
        }
        if self.max_lines == 0 {
            return Err(Invalid::new(at("max_lines"), "must be greater than 0"));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(Invalid::new(
                at("concurrency"),
                format!("must be between 1 and 1024, got {}", self.concurrency),
            ));
        }
        // 2^20 x the base is already weeks for any sensible base; more only overflows.
        if self.max_retries > 20 {
            return Err(Invalid::new(
                at("max_retries"),
                format!("must be at most 20, got {}", self.max_retries),
            ));
        }
        Invalid::if_zero(
            "batch",
            &[
                ("retry_base", self.retry_base),
                ("retention", self.retention),
                ("claim_after", self.claim_after),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn absent_table_means_no_batch_api() {
        assert_eq!(Config::parse("").unwrap().batch, None);
    }

    #[test]
    fn empty_table_gives_the_documented_defaults() {
        let batch = Config::parse("[batch]\n").unwrap().batch.unwrap();
        assert_eq!(
            batch.store.to_str(),
            Some("/var/lib/openrouter-proxy/batches")
        );
        assert_eq!(batch.max_file_bytes, 200 * 1024 * 1024);
        assert_eq!(batch.max_lines, 50_000);
        assert_eq!((batch.concurrency, batch.yield_above), (8, 64));
        assert_eq!(batch.retry_base.as_secs(), 2);
        assert_eq!(batch.max_retries, 3);
        assert_eq!(batch.retention.as_secs(), 7 * 24 * 3600);
        assert_eq!(batch.claim_after.as_secs(), 300);
    }

    #[test]
    fn durations_and_bounds_are_read() {
        let text = "[batch]\nstore = \"/tmp/b\"\nretry_base = \"50ms\"\nretention = \"1h\"\nconcurrency = 64\n";
        let batch = Config::parse(text).unwrap().batch.unwrap();
        assert_eq!(batch.retry_base.as_millis(), 50);
        assert_eq!(batch.retention.as_secs(), 3600);
        assert_eq!(batch.concurrency, 64);
    }

    #[test]
    fn bad_values_name_their_key_and_line() {
        let cases = [
            ("[batch]\nconcurrency = 0\n", "batch.concurrency", 2),
            ("[batch]\n\nmax_lines = 0\n", "batch.max_lines", 3),
            ("[batch]\nretry_base = \"0s\"\n", "batch.retry_base", 2),
            ("[batch]\nmax_retries = 99\n", "batch.max_retries", 2),
            ("[batch]\nstore = \"\"\n", "batch.store", 2),
            ("[batch]\nclaim_after = \"soon\"\n", "batch.claim_after", 2),
            ("[batch]\nworkers = 3\n", "batch.workers", 2),
        ];
        for (text, key, line) in cases {
            let err = Config::parse(text).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{text:?}: {err}");
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
        }
    }
}
