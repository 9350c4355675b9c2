//! Per-route and per-token concurrency and request-rate limits. Their state outlives reloads; the
//! limits themselves are read from the running config on every request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The counters behind one limited scope (a route or a token).
#[derive(Debug)]
struct Scope {
    in_flight: AtomicUsize,
    bucket: Mutex<Bucket>,
}

/// A token bucket holding up to one minute's worth of requests.
#[derive(Debug)]
struct Bucket {
    available: f64,
    updated: Instant,
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    Concurrency {
        limit: usize,
    },
    Rate {
        per_minute: u32,
        retry_after: Duration,
    },
}

/// Held while a request runs; releases its concurrency slot when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Scope>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
pub struct Limits {
    scopes: Mutex<HashMap<String, Arc<Scope>>>,
}

impl Limits {
    /// Admits one request into `scope`, or says why not. `None` limits admit everything (and keep
    /// no state).
    pub fn admit(
        &self,
        scope: &str,
        max_concurrent: Option<usize>,
        per_minute: Option<u32>,
        now: Instant,
    ) -> Result<Option<Permit>, Rejection> {
        if max_concurrent.is_none() && per_minute.is_none() {
            return Ok(None);
        }
        let state = {
            let Ok(mut scopes) = self.scopes.lock() else {
                return Ok(None);
            };
            match scopes.get(scope) {
                Some(state) => state.clone(),
                None => {
                    let state = Arc::new(Scope {
                        in_flight: AtomicUsize::new(0),
                        bucket: Mutex::new(Bucket {
                            available: f64::from(per_minute.unwrap_or(0)),
                            updated: now,
                        }),
                    });
                    scopes.insert(scope.to_owned(), state.clone());
                    state
                }
            }
        };
        let running = state.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(state.clone());
        if let Some(limit) = max_concurrent {
            if running >= limit {
                return Err(Rejection::Concurrency { limit });
            }
        }
        if let Some(per_minute) = per_minute {
            let Ok(mut bucket) = state.bucket.lock() else {
                return Ok(Some(permit));
            };
            let rate = f64::from(per_minute) / 60.0;
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.available = (bucket.available + elapsed * rate).min(f64::from(per_minute));
            bucket.updated = now;
            if bucket.available < 1.0 {
                let retry_after = Duration::from_secs_f64((1.0 - bucket.available) / rate);
                return Err(Rejection::Rate {
                    per_minute,
                    retry_after,
                });
            }
            bucket.available -= 1.0;
        }
        Ok(Some(permit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_slots_come_back() {
        let limits = Limits::default();
        let now = Instant::now();
        let first = limits.admit("r", Some(2), None, now).unwrap();
        let second = limits.admit("r", Some(2), None, now).unwrap();
        assert_eq!(
            limits.admit("r", Some(2), None, now).unwrap_err(),
            Rejection::Concurrency { limit: 2 }
        );
        drop(first);
        assert!(limits.admit("r", Some(2), None, now).is_ok());
        drop(second);
        assert!(
            limits.admit("other", Some(1), None, now).is_ok(),
            "scopes are separate"
        );
    }

    #[test]
    fn rate_refills_over_time() {
        let limits = Limits::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limits.admit("t", None, Some(3), t0).is_ok());
        }
        match limits.admit("t", None, Some(3), t0) {
            Err(Rejection::Rate { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(20))
            }
            other => panic!("{other:?}"),
        }
        assert!(limits
            .admit("t", None, Some(3), t0 + Duration::from_secs(20))
            .is_ok());
        assert!(limits
            .admit("t", None, Some(3), t0 + Duration::from_secs(20))
            .is_err());
    }
}
