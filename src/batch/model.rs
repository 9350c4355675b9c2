//! The objects of the Files and Batches API in OpenAI's exact JSON shapes (`file`, `batch`,
//! `list`), their ids, and the clock they are stamped with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What a batch's timestamps and retry times are read from. Tests move it forward to reach a
/// batch's expiry or the retention period without waiting.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Seconds since the Unix epoch, as OpenAI's `created_at` fields carry them.
pub fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch: the resolution of leases and retry times.
pub fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `1.5s` -> 1500, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A fresh id such as `file-3f2a...` or `batch_9c1e...`: the prefix and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // Unique within this process even without an entropy source: time and a counter.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..].copy_from_slice(&(count as u32).to_le_bytes());
    }
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// A uniformly random fraction in `[0, 1)`, for retry jitter.
pub fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// OpenAI's `file` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub expires_at: Option<u64>,
    pub status_details: Option<String>,
}

impl FileObject {
    /// A file stored whole and ready to use (OpenAI's deprecated `status` is then `processed`).
    pub fn processed(
        id: String,
        filename: String,
        purpose: &str,
        bytes: u64,
        created_at: u64,
    ) -> Self {
        FileObject {
            id,
            object: "file".to_owned(),
            bytes,
            created_at,
            filename,
            purpose: purpose.to_owned(),
            status: "processed".to_owned(),
            expires_at: None,
            status_details: None,
        }
    }
}

/// The status of a batch, as OpenAI names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<BatchStatus> {
        BatchStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// A batch in this status will not change any more (only retention removes it).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// `request_counts`: lines in the batch, and how many ended well or badly so far.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One entry of a failed batch's `errors.data`: what is wrong with which input line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

/// A batch's `errors`: `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<LineError>,
}

/// OpenAI's `batch` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Batch {
    /// A new batch, `validating`, that must end by `expires_at` (Unix seconds).
    pub fn new(
        id: String,
        endpoint: String,
        input_file_id: String,
        created_at: u64,
        expires_at: u64,
    ) -> Batch {
        Batch {
            id,
            object: "batch".to_owned(),
            endpoint,
            errors: None,
            input_file_id,
            completion_window: "24h".to_owned(),
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at,
            in_progress_at: None,
            expires_at: Some(expires_at),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata: None,
        }
    }

    /// Moves the batch to `status` and stamps the matching `*_at` field.
    pub fn enter(&mut self, status: BatchStatus, at: u64) {
        self.status = status;
        let stamp = match status {
            BatchStatus::Validating => return,
            BatchStatus::Failed => &mut self.failed_at,
            BatchStatus::InProgress => &mut self.in_progress_at,
            BatchStatus::Finalizing => &mut self.finalizing_at,
            BatchStatus::Completed => &mut self.completed_at,
            BatchStatus::Expired => &mut self.expired_at,
            BatchStatus::Cancelling => &mut self.cancelling_at,
            BatchStatus::Cancelled => &mut self.cancelled_at,
        };
        *stamp = Some(at);
    }
}

/// OpenAI's list envelope: `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Page<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// `items` holds up to `limit + 1` entries: one more than asked tells that there are more.
    pub fn new(mut items: Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> Page<T> {
        let has_more = items.len() > limit;
        items.truncate(limit);
        Page {
            object: "list",
            first_id: items.first().map(|item| id(item).to_owned()),
            last_id: items.last().map(|item| id(item).to_owned()),
            data: items,
            has_more,
        }
    }
}

/// Which page of a list: newest first unless `ascending`, after the object `after`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: usize,
    pub ascending: bool,
    pub purpose: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_prefix_and_differ() {
        let a = new_id("batch_");
        let b = new_id("batch_");
        assert!(a.starts_with("batch_") && a.len() == 30, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn random_fraction_stays_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }

    #[test]
    fn a_batch_serializes_in_openai_shape() {
        let mut batch = Batch::new(
            "batch_1".into(),
            "/v1/chat/completions".into(),
            "file-1".into(),
            10,
            86_410,
        );
        batch.enter(BatchStatus::InProgress, 11);
        let json = serde_json::to_value(&batch).unwrap();
        assert_eq!(json["status"], "in_progress");
        assert_eq!(json["in_progress_at"], 11);
        assert_eq!(json["completed_at"], serde_json::Value::Null);
        assert_eq!(json["request_counts"]["total"], 0);
    }

    #[test]
    fn a_page_knows_whether_more_follow() {
        let page = Page::new(vec!["a", "b", "c"], 2, |s| s);
        assert!(page.has_more);
        assert_eq!(page.data, ["a", "b"]);
        assert_eq!(page.last_id.as_deref(), Some("b"));
        let page = Page::new(vec!["a"], 2, |s| s);
        assert!(!page.has_more);
    }
}
