//! Heap allocations the proxy makes per proxied request, and the memory it keeps, counted on the
//! proxy's own thread: the proxy runs on a current-thread runtime of a thread of its own, and the
//! requests of a window are served inside `allocation_counter::measure`, which counts that
//! thread's allocations only (the client and the mock upstream run on the test's runtime, on
//! another thread). Every allocation is a malloc and a free on the hot path; the bound keeps the
//! ones removed from coming back unnoticed. What is still allocated at the end of the window must
//! not grow with the number of requests: the metrics exporter once kept every histogram sample
//! until `/metrics` was scraped (50 bytes per request, for ever when nothing scrapes).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::mpsc;
use std::thread;

use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;

const WARM_UP: usize = 50;
const MEASURED: usize = 2000;

/// What the client tells the proxy's thread: the warm-up is over, the measured requests are over.
struct Signals {
    warmed: oneshot::Receiver<()>,
    measured: oneshot::Receiver<()>,
}

/// Runs the proxy with `config` on a current-thread runtime of its own thread: sends its address,
/// serves the warm-up, then serves until `measured` inside the count, and sends the count.
fn proxy_thread(
    config: String,
    signals: Signals,
    addr: mpsc::Sender<std::net::SocketAddr>,
) -> thread::JoinHandle<allocation_counter::AllocationInfo> {
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let proxy = runtime.block_on(TestProxy::start_with_config(&config));
        addr.send(proxy.addr).unwrap();
        runtime.block_on(signals.warmed).unwrap();
        let info = allocation_counter::measure(|| {
            runtime.block_on(signals.measured).unwrap();
        });
        runtime.block_on(proxy.stop()).unwrap();
        info
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_proxied_request_costs_a_bounded_number_of_allocations() {
    let upstream = MockUpstream::openai_like().await;
    let extra = "[[routes]]\nname = \"fast\"\nmatch = { model = \"fast\" }\n\
                 model = \"openai/gpt-4o-mini\"\nfallbacks = [\"anthropic/claude-3.5-haiku\"]\n";
    let config = std::fs::read_to_string(proxy_config_file(&upstream.url(), extra)).unwrap();
    let (warmed_tx, warmed) = oneshot::channel();
    let (measured_tx, measured) = oneshot::channel();
    let (addr_tx, addr_rx) = mpsc::channel();
    let proxy = proxy_thread(config, Signals { warmed, measured }, addr_tx);
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv().unwrap())
        .await
        .unwrap();

    // One keep-alive connection, as an SDK client keeps one.
    let client = client();
    let url = format!("http://{addr}/v1/chat/completions");
    let body = r#"{"model":"fast","messages":[{"role":"user","content":"hello"}]}"#;
    let chat = || async {
        let request = Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-proxy-upstream"], "default");
        response.into_body().collect().await.unwrap();
    };
    for _ in 0..WARM_UP {
        chat().await;
    }
    warmed_tx.send(()).unwrap();
    for _ in 0..MEASURED {
        chat().await;
    }
    measured_tx.send(()).unwrap();
    let info = tokio::task::spawn_blocking(move || proxy.join().unwrap())
        .await
        .unwrap();
    assert_eq!(upstream.request_count(), WARM_UP + MEASURED);

    let per_request = info.count_total as f64 / MEASURED as f64;
    let kept = info.bytes_current as f64 / MEASURED as f64;
    println!("{per_request:.1} allocations per proxied request, {kept:.1} bytes kept per request");
    assert!(
        per_request > 10.0,
        "the count did not run: {per_request:.1}"
    );
    // 65 before the hot path was trimmed, 48 after.
    assert!(
        per_request <= 55.0,
        "{per_request:.1} allocations per proxied request"
    );
    // About 10 (what the last few hundred requests left, the same for any number of them); 50
    // while the exporter kept every sample.
    assert!(kept < 25.0, "{kept:.1} bytes kept per proxied request");
}
