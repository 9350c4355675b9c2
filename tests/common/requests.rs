//! Small helpers over what the mock received, and request bodies the tests build.

use std::io::Write;

use super::MockUpstream;

/// The `model` of every request the mock received, in order (empty for a body without one).
pub fn models_sent(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// `bytes`, gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The value of one exact series (name and labels as written) in Prometheus text, 0 when it is
/// absent (a counter not yet incremented).
pub fn series_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}
