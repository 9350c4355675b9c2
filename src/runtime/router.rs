//! Compiled routing rules: the facts of a request in, the route that plans its attempts out.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Midstream, RouteConfig};
use crate::pattern::Pattern;

pub use super::policy::BodyPolicy;
use super::upstreams::{Upstreams, DEFAULT_UPSTREAM};

pub use crate::config::DEFAULT_ROUTE;

/// One routing rule, compiled: matchers ready to run, headers parsed once, the attempts resolved
/// to upstreams of the registry.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    model_pattern: Option<Pattern>,
    path_pattern: Option<Pattern>,
    header_patterns: Vec<(HeaderName, Pattern)>,
    /// The model sent upstream; `None` keeps the requested one untouched.
    pub model: Option<String>,
    /// The attempts in order: the route's model, then its fallbacks.
    steps: Vec<Step>,
    /// Edits of the JSON body (`set_body`, `default_body`, `unset_body`).
    pub body_policy: Option<Arc<BodyPolicy>>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    /// `None` when answers on this route are not cached.
    pub cache_ttl: Option<Duration>,
    /// Overrides the upstreams' `first_byte_timeout` for this route.
    pub first_byte_timeout: Option<Duration>,
    pub on_midstream: Midstream,
    pub max_concurrent: Option<usize>,
    pub requests_per_minute: Option<u32>,
    /// What the route's limits are called in errors and shared counters: `route "<name>"`.
    pub limit_scope: String,
    /// Spend per UTC day and month.
    pub budget: Option<crate::config::BudgetConfig>,
}

/// A compiled attempt: an upstream of the registry, by position, and the model sent there.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    upstream: usize,
    model: Option<String>,
}

/// One planned attempt: which upstream, and the model sent there (`None`: the requested model, as
/// it is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt<'a> {
    /// The upstream's position in the runtime's registry.
    pub upstream: usize,
    pub model: Option<&'a str>,
}

/// What routing decided for one request: its route (header edits, cache policy, timeouts, limits)
/// and its attempts in order.
pub struct Plan<'a> {
    pub route: &'a Route,
    pub attempts: Vec<Attempt<'a>>,
}

impl Route {
    /// Compiles a rule the config has validated (header names, values and upstreams among it).
    fn compile(config: &RouteConfig, upstreams: &Upstreams) -> Route {
        let header_patterns = config
            .matcher
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    Pattern::new(value),
                ))
            })
            .collect();
        let set_headers = config
            .set_headers
            .iter()
            .filter_map(|(name, value)| {
                let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                Some((name, HeaderValue::from_str(value).ok()?))
            })
            .collect();
        let remove_headers = config
            .remove_headers
            .iter()
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        let index = |name: Option<&str>| {
            let name = name
                .or(config.upstream.as_deref())
                .unwrap_or(DEFAULT_UPSTREAM);
            upstreams.index(name).unwrap_or(0)
        };
        let first = Step {
            upstream: index(None),
            model: config.model.clone(),
        };
        let steps = std::iter::once(first)
            .chain(config.fallbacks.iter().map(|fallback| Step {
                upstream: index(fallback.upstream()),
                model: Some(fallback.model().to_owned()),
            }))
            .collect();
        Route {
            name: Arc::from(config.name.as_str()),
            model_pattern: config.matcher.model.as_deref().map(Pattern::new),
            path_pattern: config.matcher.path.as_deref().map(Pattern::new),
            header_patterns,
            model: config.model.clone(),
            steps,
            body_policy: BodyPolicy::compile(config).map(Arc::new),
            set_headers,
            remove_headers,
            cache_ttl: config.cache_ttl.filter(|ttl| !ttl.is_zero()),
            first_byte_timeout: config.first_byte_timeout,
            on_midstream: config.on_midstream,
            max_concurrent: config.max_concurrent,
            requests_per_minute: config.requests_per_minute,
            limit_scope: format!("route \"{}\"", config.name),
            budget: config.budget,
        }
    }

    /// The attempts of this route, in order.
    pub fn attempts(&self) -> Vec<Attempt<'_>> {
        self.steps
            .iter()
            .map(|step| Attempt {
                upstream: step.upstream,
                model: step.model.as_deref(),
            })
            .collect()
    }

    fn matches(&self, request: &RequestFacts<'_>) -> bool {
        if let Some(pattern) = &self.model_pattern {
            match request.model {
                Some(model) if pattern.matches(model) => {}
                _ => return false,
            }
        }
        if let Some(pattern) = &self.path_pattern {
            if !pattern.matches(request.path) {
                return false;
            }
        }
        self.header_patterns.iter().all(|(name, pattern)| {
            request
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| pattern.matches(value))
        })
    }
}

/// What routing looks at.
pub struct RequestFacts<'a> {
    pub model: Option<&'a str>,
    /// The full client path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The routing table: rules in file order, then the pass-through default.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    default: Route,
}

impl Router {
    /// Compiles the rules of a validated config against its upstream registry.
    pub fn compile(config: &Config, upstreams: &Upstreams) -> Router {
        let routes = config
            .routes
            .iter()
            .map(|route| Route::compile(route, upstreams))
            .collect();
        let pass_through = RouteConfig {
            name: DEFAULT_ROUTE.to_owned(),
            matcher: Default::default(),
            model: None,
            upstream: None,
            fallbacks: Vec::new(),
            set_body: None,
            default_body: None,
            unset_body: Vec::new(),
            cache_ttl: None,
            first_byte_timeout: None,
            set_headers: Default::default(),
            remove_headers: Vec::new(),
            on_midstream: Midstream::Error,
            max_concurrent: None,
            requests_per_minute: None,
            budget: None,
        };
        let default = Route::compile(&pass_through, upstreams);
        Router { routes, default }
    }

    /// The first rule that matches, else the default pass-through route.
    pub fn route(&self, request: &RequestFacts<'_>) -> &Route {
        self.routes
            .iter()
            .find(|route| route.matches(request))
            .unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(text: &str) -> Router {
        let config = Config::parse(text).unwrap();
        Router::compile(&config, &Upstreams::build(&config, None).unwrap())
    }

    fn models(route: &Route) -> Vec<Option<&str>> {
        route.attempts().iter().map(|a| a.model).collect()
    }

    fn facts<'a>(model: Option<&'a str>, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            model,
            path: "/v1/chat/completions",
            headers,
        }
    }

    #[test]
    fn first_match_wins_and_unmatched_passes_through() {
        let router = router(
            r#"
            [[routes]]
            name = "team-a"
            match = { model = "openai/*", headers = { "x-team" = "a" } }
            model = "openai/gpt-4o"
            [[routes]]
            name = "openai"
            match = { model = "openai/*" }
            [[routes]]
            name = "fast"
            match = { model = "fast" }
            model = "openai/gpt-4o-mini"
            fallbacks = ["anthropic/claude-3.5-haiku"]
            "#,
        );
        let none = HeaderMap::new();
        let mut team = HeaderMap::new();
        team.insert("x-team", HeaderValue::from_static("a"));
        assert_eq!(
            router.route(&facts(Some("openai/o1"), &team)).name.as_ref(),
            "team-a"
        );
        assert_eq!(
            router.route(&facts(Some("openai/o1"), &none)).name.as_ref(),
            "openai"
        );
        let fast = router.route(&facts(Some("fast"), &none));
        assert_eq!(
            models(fast),
            vec![
                Some("openai/gpt-4o-mini"),
                Some("anthropic/claude-3.5-haiku")
            ]
        );
        let other = router.route(&facts(Some("mistral/x"), &none));
        assert_eq!(other.name.as_ref(), DEFAULT_ROUTE);
        assert_eq!(models(other), vec![None]);
        assert_eq!(
            router.route(&facts(None, &none)).name.as_ref(),
            DEFAULT_ROUTE
        );
    }

    #[test]
    fn path_match() {
        let router = router(
            "[[routes]]\nname = \"emb\"\nmatch = { path = \"/v1/embeddings\" }\nmodel = \"e\"\n",
        );
        let none = HeaderMap::new();
        let mut request = facts(Some("x"), &none);
        assert_eq!(router.route(&request).name.as_ref(), DEFAULT_ROUTE);
        request.path = "/v1/embeddings";
        assert_eq!(router.route(&request).name.as_ref(), "emb");
    }
}
