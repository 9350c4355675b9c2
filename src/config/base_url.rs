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
}

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
        Ok(BaseUrl {
            scheme,
            authority,
            prefix,
        })
    }

    /// Maps the part of a client path after `/v1` (`rest` starts with `/` or is empty) plus its
    /// query to the upstream URI. `rest` must already have passed [`check_path`].
    pub fn join(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
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
    }

    #[test]
    fn base_url_errors_are_clear() {
        assert!(BaseUrl::parse("openrouter.ai").is_err());
        assert!(BaseUrl::parse("ftp://x/y").is_err());
        assert!(BaseUrl::parse("https://user:pw@x/y").is_err());
    }
}
