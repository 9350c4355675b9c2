//! Metric handles kept by label value. Recording a request's metrics is then a few hash lookups
//! under read locks; going through the registry would build, hash and allocate an owned label
//! set for every metric of every request.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::metrics::{
    ACTIVE, CACHE, COST, LATENCY, OVERHEAD, REQUESTS, TIME_TO_FIRST_BYTE, TOKENS, UPSTREAM_ATTEMPTS,
};

/// Handles by one label value taken from requests (a route, a model, an upstream); each is made
/// once through the registry. Model values are bounded by the caller (`model_label`), which is
/// why the fast foldhash serves here, not SipHash: every request looks up several of these.
pub struct ByName<H>(RwLock<HashMap<Arc<str>, H, foldhash::fast::RandomState>>);

impl<H> Default for ByName<H> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<H: Clone> ByName<H> {
    pub fn get(&self, name: &str, make: impl FnOnce(&Arc<str>) -> H) -> H {
        let read = self.0.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = read.get(name) {
            return handle.clone();
        }
        drop(read);
        let mut write = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = write.get(name) {
            return handle.clone();
        }
        let name: Arc<str> = Arc::from(name);
        let handle = make(&name);
        write.insert(name, handle.clone());
        handle
    }
}

/// Handles by a label with a few fixed values (statuses, outcomes, results): a short list,
/// searched in order.
pub struct ByValue<K, H>(RwLock<Vec<(K, H)>>);

impl<K, H> Default for ByValue<K, H> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<K: PartialEq + Copy, H: Clone> ByValue<K, H> {
    pub fn get(&self, key: K, make: impl FnOnce() -> H) -> H {
        let find = |list: &[(K, H)]| {
            list.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, handle)| handle.clone())
        };
        if let Some(handle) = find(&self.0.read().unwrap_or_else(PoisonError::into_inner)) {
            return handle;
        }
        let mut write = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = find(&write) {
            return handle;
        }
        let handle = make();
        write.push((key, handle.clone()));
        handle
    }
}

/// The handles recorded into at the end of a request, for one route and model label. The ones
/// not every request records are made on first use, so that a series appears in `/metrics`
/// only once something was recorded into it.
pub struct Series {
    route: Arc<str>,
    model: Arc<str>,
    pub latency: Histogram,
    pub first_byte: Histogram,
    by_status: ByValue<u16, Counter>,
    overhead: OnceLock<Histogram>,
    tokens: OnceLock<(Counter, Counter)>,
    cost: OnceLock<Gauge>,
    cache: ByValue<(&'static str, &'static str), Counter>,
}

impl Series {
    pub fn requests(&self, status: u16) -> Counter {
        self.by_status.get(status, || {
            counter!(REQUESTS, "route" => self.route.clone(), "model" => self.model.clone(), "status" => status.to_string())
        })
    }

    pub fn overhead(&self) -> &Histogram {
        self.overhead
            .get_or_init(|| histogram!(OVERHEAD, "route" => self.route.clone()))
    }

    /// Prompt and completion tokens.
    pub fn tokens(&self) -> &(Counter, Counter) {
        self.tokens.get_or_init(|| {
            let model = &self.model;
            (
                counter!(TOKENS, "model" => model.clone(), "type" => "prompt"),
                counter!(TOKENS, "model" => model.clone(), "type" => "completion"),
            )
        })
    }

    pub fn cost(&self) -> &Gauge {
        self.cost
            .get_or_init(|| gauge!(COST, "model" => self.model.clone()))
    }

    pub fn cache(&self, result: &'static str, tier: &'static str) -> Counter {
        self.cache.get(
            (result, tier),
            || counter!(CACHE, "route" => self.route.clone(), "result" => result, "tier" => tier),
        )
    }
}

/// The series of `route` and the model label `model`.
pub fn series(route: &str, model: &str) -> Arc<Series> {
    static SERIES: OnceLock<ByName<Arc<ByName<Arc<Series>>>>> = OnceLock::new();
    let by_model = SERIES
        .get_or_init(ByName::default)
        .get(route, |_| Arc::default());
    by_model.get(model, |model| {
        let route: Arc<str> = Arc::from(route);
        let labels = [("route", route.to_string()), ("model", model.to_string())];
        Arc::new(Series {
            latency: histogram!(LATENCY, &labels),
            first_byte: histogram!(TIME_TO_FIRST_BYTE, &labels),
            route,
            model: model.clone(),
            by_status: ByValue::default(),
            overhead: OnceLock::new(),
            tokens: OnceLock::new(),
            cost: OnceLock::new(),
            cache: ByValue::default(),
        })
    })
}

type AttemptsByModel = ByName<Arc<ByValue<&'static str, Counter>>>;

/// The attempts counter of `upstream`, the model label `model` and `outcome`.
pub fn attempts(upstream: &str, model: &str, outcome: &'static str) -> Counter {
    static ATTEMPTS: OnceLock<ByName<Arc<AttemptsByModel>>> = OnceLock::new();
    let by_model = ATTEMPTS
        .get_or_init(ByName::default)
        .get(upstream, |_| Arc::default());
    let by_outcome = by_model.get(model, |_| Arc::default());
    by_outcome.get(outcome, || {
        counter!(UPSTREAM_ATTEMPTS, "upstream" => upstream.to_owned(), "model" => model.to_owned(), "outcome" => outcome)
    })
}

/// The requests-in-flight gauge. Taken after the recorder is installed, so that it is never a
/// handle of the no-op recorder.
pub fn active() -> &'static Gauge {
    static ACTIVE_GAUGE: OnceLock<Gauge> = OnceLock::new();
    ACTIVE_GAUGE.get_or_init(|| {
        super::metrics::handle();
        gauge!(ACTIVE)
    })
}
