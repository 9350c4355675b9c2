//! Compiled routing rules: the facts of a request in, the route that plans its attempts out.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Midstream, RouteConfig};
use crate::pattern::Pattern;

pub use crate::config::DEFAULT_ROUTE;

/// One routing rule, compiled: matchers ready to run, headers parsed once.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    model_pattern: Option<Pattern>,
    path_pattern: Option<Pattern>,
    header_patterns: Vec<(HeaderName, Pattern)>,
    /// The model sent upstream; `None` keeps the requested one untouched.
    pub model: Option<String>,
    pub fallbacks: Vec<String>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    /// `None` when answers on this route are not cached.
    pub cache_ttl: Option<Duration>,
    pub first_byte_timeout: Duration,
    pub on_midstream: Midstream,
    pub max_concurrent: Option<usize>,
    pub requests_per_minute: Option<u32>,
}

impl Route {
    fn compile(
        index: usize,
        config: &RouteConfig,
        default_timeout: Duration,
    ) -> Result<Route, String> {
        let at = format!("routes[{index}] (\"{}\")", config.name);
        let header_name = |name: &str, key: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{at}.{key}: \"{name}\" is not a valid header name"))
        };
        let header_patterns = config
            .matcher
            .headers
            .iter()
            .map(|(name, value)| Ok((header_name(name, "match.headers")?, Pattern::new(value))))
            .collect::<Result<_, String>>()?;
        let set_headers = config
            .set_headers
            .iter()
            .map(|(name, value)| {
                let value = HeaderValue::from_str(value).map_err(|_| {
                    format!("{at}.set_headers.\"{name}\": not a valid header value")
                })?;
                Ok((header_name(name, "set_headers")?, value))
            })
            .collect::<Result<_, String>>()?;
        let remove_headers = config
            .remove_headers
            .iter()
            .map(|name| header_name(name, "remove_headers"))
            .collect::<Result<_, String>>()?;
        Ok(Route {
            name: Arc::from(config.name.as_str()),
            model_pattern: config.matcher.model.as_deref().map(Pattern::new),
            path_pattern: config.matcher.path.as_deref().map(Pattern::new),
            header_patterns,
            model: config.model.clone(),
            fallbacks: config.fallbacks.clone(),
            set_headers,
            remove_headers,
            cache_ttl: config.cache_ttl.filter(|ttl| !ttl.is_zero()),
            first_byte_timeout: config.first_byte_timeout.unwrap_or(default_timeout),
            on_midstream: config.on_midstream,
            max_concurrent: config.max_concurrent,
            requests_per_minute: config.requests_per_minute,
        })
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

    /// The models to try, in order: the route's model and its fallbacks, or a single `None`
    /// ("send the requested model as it is") for a route that does not rewrite.
    pub fn chain(&self) -> Vec<Option<&str>> {
        match &self.model {
            Some(model) => std::iter::once(model.as_str())
                .chain(self.fallbacks.iter().map(String::as_str))
                .map(Some)
                .collect(),
            None => vec![None],
        }
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
    pub fn compile(config: &Config) -> Result<Router, String> {
        let timeout = config.upstream.first_byte_timeout;
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| Route::compile(index, route, timeout))
            .collect::<Result<_, _>>()?;
        let default = Route {
            name: Arc::from(DEFAULT_ROUTE),
            model_pattern: None,
            path_pattern: None,
            header_patterns: Vec::new(),
            model: None,
            fallbacks: Vec::new(),
            set_headers: Vec::new(),
            remove_headers: Vec::new(),
            cache_ttl: None,
            first_byte_timeout: timeout,
            on_midstream: Midstream::Error,
            max_concurrent: None,
            requests_per_minute: None,
        };
        Ok(Router { routes, default })
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
        Router::compile(&Config::parse(text).unwrap()).unwrap()
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
            fast.chain(),
            vec![
                Some("openai/gpt-4o-mini"),
                Some("anthropic/claude-3.5-haiku")
            ]
        );
        let other = router.route(&facts(Some("mistral/x"), &none));
        assert_eq!(other.name.as_ref(), DEFAULT_ROUTE);
        assert_eq!(other.chain(), vec![None]);
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
