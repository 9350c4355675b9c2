//! `openrouter-proxy explain`: the plan a request would get under a config, printed without
//! serving anything, so rules can be checked offline (like `nginx -T`).

use std::fmt::Write;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;
use crate::runtime::router::{Plan, RequestFacts};
use crate::runtime::Runtime;

/// The request an explanation is asked for.
pub struct Question {
    pub model: Option<String>,
    pub path: String,
    /// `name=value` pairs.
    pub headers: Vec<(String, String)>,
}

/// The plan `question` gets under `config`, as text. Header values and keys are never printed.
pub fn explain(config: Config, question: &Question) -> Result<String, String> {
    let runtime = Runtime::plan_only(config)?;
    let mut headers = HeaderMap::new();
    for (name, value) in &question.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("--header: \"{name}\" is not a header name"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("--header {name}: not a valid header value"))?;
        headers.insert(name, value);
    }
    let plan = runtime.plan(&RequestFacts {
        model: question.model.as_deref(),
        path: &question.path,
        headers: &headers,
    });
    let route = plan.route;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request: POST {} model={}",
        question.path,
        question.model.as_deref().unwrap_or("(none)")
    );
    let rule = runtime
        .config
        .routes
        .iter()
        .position(|r| r.name == *route.name);
    let _ = match rule {
        Some(i) => writeln!(
            out,
            "route: {} (rule {} of {})",
            route.name,
            i + 1,
            runtime.config.routes.len()
        ),
        None => writeln!(
            out,
            "route: {} (no rule matched: passed through unchanged)",
            route.name
        ),
    };
    write_attempts(&mut out, &runtime, &plan, question.model.as_deref());
    let names = |list: Vec<&str>| {
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    let set: Vec<&str> = route.set_headers.iter().map(|(n, _)| n.as_str()).collect();
    let removed: Vec<&str> = route
        .remove_headers
        .iter()
        .map(HeaderName::as_str)
        .collect();
    let _ = writeln!(out, "headers set: {}", names(set));
    let _ = writeln!(out, "headers removed: {}", names(removed));
    let _ = match &route.body_policy {
        Some(policy) => writeln!(out, "body: {}", policy.describe()),
        None => writeln!(out, "body: unchanged but for the model"),
    };
    let _ = match route.cache_ttl {
        Some(ttl) => writeln!(out, "cache: {}", humantime::format_duration(ttl)),
        None => writeln!(out, "cache: off"),
    };
    let limit = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
    let _ = writeln!(
        out,
        "limits: {} in flight, {} per minute",
        limit(route.max_concurrent.map(|n| n.to_string())),
        limit(route.requests_per_minute.map(|n| n.to_string()))
    );
    Ok(out)
}

fn write_attempts(out: &mut String, runtime: &Runtime, plan: &Plan<'_>, requested: Option<&str>) {
    let route = plan.route;
    let _ = writeln!(out, "attempts:");
    for (i, attempt) in plan.attempts.iter().enumerate() {
        let upstream = runtime.upstreams.at(attempt.upstream);
        let model = attempt
            .model
            .or(requested)
            .unwrap_or("(the requested model)");
        let urls: Vec<&str> = upstream.endpoints.iter().map(|e| &*e.url).collect();
        let keys: Vec<&str> = upstream.keys.iter().map(|k| &*k.name).collect();
        let timeout = route
            .first_byte_timeout
            .unwrap_or(upstream.first_byte_timeout);
        let _ = writeln!(
            out,
            "  {}. {} / {}  [{}; keys: {}; first byte within {}]",
            i + 1,
            upstream.name,
            model,
            urls.join(", "),
            if keys.is_empty() {
                "none".to_owned()
            } else {
                keys.join(", ")
            },
            humantime::format_duration(timeout)
        );
    }
}
