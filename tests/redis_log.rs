//! The log of Redis going away and coming back: one line per change of state, never one per
//! call, and never the password of the URL. Its own test binary: the log subscriber is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::redis::{wait_up, RedisServer};
use openrouter_proxy::redis::SharedLimiter;

/// `op_timeout` long enough that a stall of the loaded test machine is not taken for an outage.
const STEADY: &str = "5s";

/// Collects what the process logs.
#[derive(Clone, Default)]
struct Logged(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

#[tokio::test]
async fn each_change_of_state_is_logged_once_not_each_call() {
    openrouter_proxy::record::metrics::handle();
    let logged = Logged::default();
    let writer = logged.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let password = "s3cret-from-the-url";
    let mut server = RedisServer::start_with(Some(password)).await;
    let redis = server.handle(STEADY).await;
    let limiter = SharedLimiter::default();
    server.kill();
    for _ in 0..50 {
        let _ = limiter.admit(Some(&redis), "route:logged", 1000).await;
    }
    assert!(!redis.is_up());
    server.restart().await;
    wait_up(&redis).await;
    for _ in 0..50 {
        let _ = limiter.admit(Some(&redis), "route:logged", 1000).await;
    }
    assert_eq!(logged.count("redis is unavailable"), 1);
    assert_eq!(
        logged.count("redis is available"),
        2,
        "at start and after the restart"
    );
    let shown = String::from_utf8_lossy(&logged.0.lock().unwrap()).into_owned();
    assert!(!shown.contains(password), "{shown}");
}
