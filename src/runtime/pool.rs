//! An upstream's endpoints and keys, and the choice among them: endpoints by least in flight of
//! two random choices among those not ejected, keys by weight among those not out. A failing
//! endpoint or a refused key is out for a while, then back in rotation, where its next request
//! is the probe that decides whether it stays.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::config::{BaseUrl, UpstreamConfig};

/// When something taken out of rotation comes back.
#[derive(Debug, Default)]
struct Out(Mutex<Option<Instant>>);

impl Out {
    fn is_out(&self, now: Instant) -> bool {
        let until = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|until| now < until)
    }

    /// Takes it out until `until`; true when it was in rotation before.
    fn take_out(&self, until: Instant, now: Instant) -> bool {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let was_in = slot.is_none_or(|previous| now >= previous);
        *slot = Some(until);
        was_in
    }

    /// Back in rotation; true when it was out (or on probation) before.
    fn put_back(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .is_some()
    }
}

/// One base URL of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL as configured, for logs.
    pub url: Arc<str>,
    pub base: BaseUrl,
    in_flight: AtomicUsize,
    out: Out,
}

impl Endpoint {
    pub fn new(url: &str, base: BaseUrl) -> Endpoint {
        Endpoint {
            url: Arc::from(url),
            base,
            in_flight: AtomicUsize::new(0),
            out: Out::default(),
        }
    }

    /// Ejects it for `cooldown` after a connect failure or a 5xx.
    pub fn eject(&self, cooldown: Duration, upstream: &str) {
        let now = Instant::now();
        if self.out.take_out(now + cooldown, now) {
            tracing::warn!(upstream, endpoint = %self.url, ?cooldown, "endpoint ejected");
        }
    }

    /// It answered: back in rotation if it was out.
    pub fn healthy(&self, upstream: &str) {
        if self.out.put_back() {
            tracing::info!(upstream, endpoint = %self.url, "endpoint answered again");
        }
    }

    /// It answered with `status`: ejected for `cooldown` on a 5xx, back in rotation otherwise.
    pub fn answered(&self, status: u16, cooldown: Duration, upstream: &str) {
        if status >= 500 {
            self.eject(cooldown, upstream);
        } else {
            self.healthy(upstream);
        }
    }
}

/// Keeps a request counted in flight on its endpoint until its answer is over.
pub struct EndpointLoad(Arc<Endpoint>);

impl EndpointLoad {
    pub fn begin(endpoint: Arc<Endpoint>) -> EndpointLoad {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        EndpointLoad(endpoint)
    }
}

impl Drop for EndpointLoad {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One key of an upstream's pool.
#[derive(Debug)]
pub struct Key {
    /// How logs and metrics name it (never its value).
    pub name: Arc<str>,
    /// `Bearer <key>`, marked sensitive; `None` when nothing was found where it is read from.
    pub value: Option<HeaderValue>,
    /// Where it is read from, for operators.
    pub source: String,
    weight: u32,
    out: Out,
    upstream: Arc<str>,
}

impl Key {
    /// The keys of an upstream section: its `keys`, or the single `api_key_env` / `api_key_file`
    /// key (named "default"). Keys are read now; a missing one is not an error (the proxy
    /// starts, reports it, and reads it again on the next reload).
    pub fn pool(upstream: &str, config: &UpstreamConfig) -> Vec<Key> {
        let upstream: Arc<str> = Arc::from(upstream);
        let keys: Vec<Key> = if config.keys.is_empty() {
            let (value, source) = match &config.api_key_file {
                Some(path) => read_file(path),
                None => read_env(config.key_env()),
            };
            vec![Key::new(&upstream, "default", value, source, 1)]
        } else {
            config
                .keys
                .iter()
                .enumerate()
                .map(|(i, entry)| {
                    let name = entry.name.clone().unwrap_or_else(|| i.to_string());
                    let (value, source) = match (&entry.file, &entry.env) {
                        (Some(path), _) => read_file(path),
                        (None, Some(env)) => read_env(env),
                        (None, None) => (None, String::new()),
                    };
                    Key::new(&upstream, &name, value, source, entry.weight)
                })
                .collect()
        };
        for key in &keys {
            key.publish(key.present());
        }
        keys
    }

    fn new(
        upstream: &Arc<str>,
        name: &str,
        value: Option<String>,
        source: String,
        weight: u32,
    ) -> Key {
        let value = value.and_then(|key| bearer(&key, &source));
        Key {
            name: Arc::from(name),
            value,
            source,
            weight,
            out: Out::default(),
            upstream: upstream.clone(),
        }
    }

    pub fn present(&self) -> bool {
        self.value.is_some()
    }

    /// Takes it out of rotation for `for_how_long` (refused, out of credit, or rate limited).
    pub fn take_out(&self, for_how_long: Duration, why: &'static str) {
        let now = Instant::now();
        if self.out.take_out(now + for_how_long, now) {
            tracing::warn!(upstream = %self.upstream, key = %self.name, reason = why, "key taken out of rotation");
            self.publish(false);
        }
    }

    /// It was accepted: back in rotation if it was out.
    pub fn accepted(&self) {
        if self.out.put_back() {
            tracing::info!(upstream = %self.upstream, key = %self.name, "key accepted again");
            self.publish(true);
        }
    }

    fn publish(&self, up: bool) {
        crate::record::metrics::key_up(&self.upstream, &self.name, up);
    }
}

/// What one try of an attempt uses.
pub struct Pick<'a> {
    pub endpoint: usize,
    /// The pool key, in inject mode.
    pub key: Option<&'a Key>,
    /// The `Authorization` value to send, if any.
    pub credentials: Option<HeaderValue>,
}

/// Least in flight of two random choices among the endpoints not ejected and not tried; when
/// every one is out, the one whose ejection ends first is tried anyway.
pub fn choose_endpoint(endpoints: &[Arc<Endpoint>], tried: &[usize], now: Instant) -> usize {
    if endpoints.len() <= 1 {
        return 0;
    }
    let usable: Vec<usize> = (0..endpoints.len())
        .filter(|i| !tried.contains(i) && !endpoints[*i].out.is_out(now))
        .collect();
    let candidates: Vec<usize> = if usable.is_empty() {
        (0..endpoints.len())
            .filter(|i| !tried.contains(i))
            .collect()
    } else {
        usable
    };
    match candidates.len() {
        0 => fastrand::usize(..endpoints.len()),
        1 => candidates[0],
        n => {
            let a = candidates[fastrand::usize(..n)];
            let mut b = candidates[fastrand::usize(..n - 1)];
            if b == a {
                b = candidates[n - 1];
            }
            let load = |i: usize| endpoints[i].in_flight.load(Ordering::Relaxed);
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
    }
}

/// A key by weight among those present, not out and not tried; `None` when none is left.
pub fn choose_key<'a>(keys: &'a [Key], tried: &[usize], now: Instant) -> Option<&'a Key> {
    // Two passes over the keys rather than a list of the usable ones made for every request.
    let usable = || {
        keys.iter()
            .enumerate()
            .filter(move |(i, k)| k.present() && !tried.contains(i) && !k.out.is_out(now))
            .map(|(_, k)| k)
    };
    let total: u64 = usable().map(|k| u64::from(k.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(..total);
    let mut last = None;
    for key in usable() {
        let weight = u64::from(key.weight);
        if point < weight {
            return Some(key);
        }
        point -= weight;
        last = Some(key);
    }
    // A key was marked out between the passes: the last one still usable.
    last
}

/// The position of `key` in `keys`.
pub fn position(keys: &[Key], key: &Key) -> Option<usize> {
    keys.iter().position(|k| std::ptr::eq(k, key))
}

fn read_file(path: &std::path::Path) -> (Option<String>, String) {
    let source = format!("file {}", path.display());
    match std::fs::read_to_string(path) {
        Ok(text) => (Some(text), source),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "cannot read the API key file");
            (None, source)
        }
    }
}

fn read_env(name: &str) -> (Option<String>, String) {
    (
        std::env::var(name).ok(),
        format!("environment variable {name}"),
    )
}

/// `Bearer <key>`, marked sensitive so it never shows in debug output.
fn bearer(key: &str, source: &str) -> Option<HeaderValue> {
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    match HeaderValue::from_str(&format!("Bearer {key}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            tracing::warn!(
                source,
                "the API key contains characters not allowed in a header"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(weights: &[u32]) -> Vec<Key> {
        let upstream: Arc<str> = Arc::from("u");
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Key::new(
                    &upstream,
                    &i.to_string(),
                    Some(format!("k{i}")),
                    String::new(),
                    *w,
                )
            })
            .collect()
    }

    #[test]
    fn keys_are_chosen_by_weight_and_skipped_when_out_or_tried() {
        let pool = keys(&[3, 1]);
        let now = Instant::now();
        let first = (0..4000)
            .filter(|_| &*choose_key(&pool, &[], now).unwrap().name == "0")
            .count();
        assert!((2600..3400).contains(&first), "{first} of 4000");
        assert_eq!(&*choose_key(&pool, &[0], now).unwrap().name, "1");
        pool[1].out.take_out(now + Duration::from_secs(30), now);
        assert!(choose_key(&pool, &[0], now).is_none());
        assert_eq!(
            &*choose_key(&pool, &[0], now + Duration::from_secs(31))
                .unwrap()
                .name,
            "1"
        );
    }

    #[test]
    fn endpoints_prefer_the_less_busy_and_skip_the_ejected() {
        let endpoints: Vec<Arc<Endpoint>> = (0..2)
            .map(|i| {
                let url = format!("http://127.0.0.1:{}", 1000 + i);
                Arc::new(Endpoint::new(&url, BaseUrl::parse(&url).unwrap()))
            })
            .collect();
        let now = Instant::now();
        let _busy = EndpointLoad::begin(endpoints[0].clone());
        for _ in 0..50 {
            assert_eq!(choose_endpoint(&endpoints, &[], now), 1);
        }
        endpoints[1]
            .out
            .take_out(now + Duration::from_secs(30), now);
        assert_eq!(choose_endpoint(&endpoints, &[], now), 0);
        assert_eq!(
            choose_endpoint(&endpoints, &[0], now),
            1,
            "all out: tried anyway"
        );
    }
}
