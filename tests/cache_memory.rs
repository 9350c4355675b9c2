//! The cache's byte bound holds for the process's memory, not only for its own gauge: the real
//! binary, filled with far more distinct answers than fit, stays within 1.25 x `cache.max_bytes`
//! + 16 MiB above its baseline.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;

use common::*;

const MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Sends `count` distinct cacheable prompts, `concurrency` at a time.
async fn fill(api: &str, from: usize, count: usize, concurrency: usize) {
    let url = Arc::new(format!("http://{api}/v1/chat/completions"));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (url, next) = (url.clone(), next.clone());
        workers.spawn(async move {
            let client = client();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= from + count {
                    return;
                }
                let body = format!(
                    r#"{{"model":"cached","messages":[{{"role":"user","content":"prompt {n}"}}]}}"#
                );
                let request = http::Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                let (status, _, _) = read_all(response).await;
                assert_eq!(status, 200);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
}

#[tokio::test]
async fn resident_memory_stays_within_the_cache_bound() {
    // About 0.9 KB per answer, each distinct.
    let upstream = KillableUpstream::start(|request| {
        let prompt = request.json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        let content = format!("{prompt}: {}", "x".repeat(800));
        Reply::Json(200, chat_completion("m", &content))
    })
    .await;
    let config = proxy_config_file(
        &upstream.url(),
        &format!(
            "[cache]\nmax_bytes = {MAX_BYTES}\n\
             [[routes]]\nname = \"cached\"\nmatch = {{ model = \"cached\" }}\nmodel = \"m\"\ncache_ttl = \"1h\"\n"
        ),
    );
    let proxy = BinaryProxy::spawn(&config, &["--no-watch"]).await;
    let pid = proxy.child.id().unwrap();
    let count = env_number("CACHE_MEMORY_PROMPTS", 50_000) as usize;
    // Warm up connections, buffers and the allocator before the baseline.
    fill(&proxy.api, 0, 2_000, 16).await;
    let baseline = rss_of(pid);
    fill(&proxy.api, 2_000, count, 16).await;
    let grown = rss_of(pid).saturating_sub(baseline);
    let bound = MAX_BYTES + MAX_BYTES / 4 + 16 * 1024 * 1024;
    let metrics = read_all(send("GET", &format!("http://{}/metrics", proxy.admin), &[], "").await)
        .await
        .2;
    let metrics = String::from_utf8_lossy(&metrics);
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap()
    };
    eprintln!(
        "{count} distinct answers: resident memory grew by {} KiB (bound {} KiB); the cache holds {} entries, {} KiB by its weights",
        grown / 1024,
        bound / 1024,
        gauge("openrouter_cache_entries"),
        gauge("openrouter_cache_bytes") / 1024.0
    );
    assert!(grown <= bound, "grew by {grown} bytes, bound {bound}");
    assert_eq!(upstream.request_count(), 2_000 + count);
    proxy.signal("TERM").await;
    let (status, _) = proxy.wait().await;
    assert!(status.success());
}
