//! A parsed upstream base URL, and where a client path below `/v1` goes under it.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

/// A parsed `base_url`: where `/v1/<rest>` is sent.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// The base path without a trailing slash, e.g. `/api/v1`.
    prefix: String,
    /// The URIs of the API's busiest paths, made once: joining one for every request allocated.
    common: Vec<(&'static str, Uri)>,
}

/// The paths most requests take, joined once per base URL.
const COMMON_PATHS: [&str; 5] = [
    "/chat/completions",
    "/responses",
    "/messages",
    "/embeddings",
    "/completions",
];

impl BaseUrl {
    pub fn parse(text: &str) -> Result<BaseUrl, String> {
        let uri: Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("must start with https:// or http://")?;
        if scheme != Scheme::HTTPS && scheme != Scheme::HTTP {
            return Err(format!("scheme must be https or http, got \"{scheme}\""));
        }
        let authority = uri.authority().cloned().ok_or("must name a host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry credentials; use api_key_env or api_key_file".into());
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let mut base = BaseUrl {
            scheme,
            authority,
            prefix,
            common: Vec::new(),
        };
        base.common = COMMON_PATHS
            .iter()
            .filter_map(|path| Some((*path, base.build(path, None).ok()?)))
            .collect();
        Ok(base)
    }

    /// Maps the part of a client path after `/v1` (`rest` starts with `/` or is empty) plus its
    /// query to the upstream URI. `rest` must already have passed [`check_path`].
    pub fn join(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        if query.is_none() {
            if let Some((_, uri)) = self.common.iter().find(|(path, _)| *path == rest) {
                return Ok(uri.clone());
            }
        }
        self.build(rest, query)
    }

    fn build(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut path =
            String::with_capacity(self.prefix.len() + rest.len() + 1 + query.map_or(0, str::len));
        path.push_str(&self.prefix);
        path.push_str(rest);
        if let Some(query) = query {
            path.push('?');
            path.push_str(query);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path)?)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_under_the_base_path() {
        let base = BaseUrl::parse("https://openrouter.ai/api/v1/").unwrap();
        let uri = base.join("/chat/completions", Some("a=1")).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://openrouter.ai/api/v1/chat/completions?a=1"
        );
        let base = BaseUrl::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(
            base.join("/models", None).unwrap().to_string(),
            "http://127.0.0.1:9/models"
        );
        // The paths joined in advance read the same.
        for path in COMMON_PATHS {
            let base = BaseUrl::parse("https://openrouter.ai/api/v1/").unwrap();
            let joined = base.join(path, None).unwrap();
            assert_eq!(joined, base.build(path, None).unwrap());
            assert_eq!(
                joined.to_string(),
                format!("https://openrouter.ai/api/v1{path}")
            );
        }
    }

    #[test]
    fn base_url_errors_are_clear() {
        assert!(BaseUrl::parse("openrouter.ai").is_err());
        assert!(BaseUrl::parse("ftp://x/y").is_err());
        assert!(BaseUrl::parse("https://user:pw@x/y").is_err());
    }
}
