//! Where spans go and which service they describe: `[otel]` merged with the standard `OTEL_*`
//! variables, which win when set and not empty (OpenTelemetry documents environment variables as
//! overriding equivalent configuration in code).

use super::names::{SERVICE_NAME, SERVICE_VERSION};
use opentelemetry::KeyValue;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::Resource;
use percent_encoding::percent_decode_str;

use crate::config::{BaseUrl, OtelConfig};

pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
pub const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// The OTLP/HTTP path of traces under a base endpoint.
const TRACES_PATH: &str = "v1/traces";

/// What the exporter is built from.
#[derive(Debug)]
pub struct Settings {
    /// The URL spans are POSTed to.
    pub traces_url: String,
    pub resource: Resource,
}

impl Settings {
    /// Resolves `config` against `env` (a variable's value by name). An endpoint that is not an
    /// http(s) URL is an error naming its source, never its value; malformed resource attributes
    /// are ignored with a warning, as the specification asks.
    pub fn resolve(
        config: &OtelConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, String> {
        let var = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let traces_url = match (var(TRACES_ENDPOINT), var(ENDPOINT)) {
            (Some(url), _) => checked(url.trim(), TRACES_ENDPOINT)?.to_owned(),
            (None, Some(base)) => traces_under(checked(base.trim(), ENDPOINT)?),
            (None, None) => traces_under(checked(&config.endpoint, "otel.endpoint")?),
        };
        let attributes = match var(RESOURCE_ATTRIBUTES).map(|text| parse_attributes(&text)) {
            Some(Ok(attributes)) => attributes,
            Some(Err(reason)) => {
                tracing::warn!(variable = RESOURCE_ATTRIBUTES, %reason, "ignored");
                Vec::new()
            }
            None => Vec::new(),
        };
        let from_attributes = attributes
            .iter()
            .find(|kv| kv.key.as_str() == SERVICE_NAME)
            .map(|kv| kv.value.to_string());
        let service_name = var(SERVICE_NAME_VAR)
            .or(from_attributes)
            .unwrap_or_else(|| config.service_name.clone());
        let resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attribute(KeyValue::new(SERVICE_VERSION, env!("CARGO_PKG_VERSION")))
            .with_attributes(attributes)
            .with_service_name(service_name)
            .build();
        Ok(Settings {
            traces_url,
            resource,
        })
    }
}

fn checked<'a>(url: &'a str, source: &str) -> Result<&'a str, String> {
    if url.contains('@') {
        return Err(format!(
            "{source}: must not carry credentials; send them with OTEL_EXPORTER_OTLP_HEADERS"
        ));
    }
    BaseUrl::parse(url).map_err(|reason| format!("{source}: {reason}"))?;
    Ok(url)
}

/// `http://collector:4318` and `http://collector:4318/` both give `.../v1/traces`; a base path
/// is kept (`http://gateway/otlp` gives `http://gateway/otlp/v1/traces`).
fn traces_under(base: &str) -> String {
    format!("{}/{TRACES_PATH}", base.trim_end_matches('/'))
}

/// `key1=value1,key2=value2` with percent-encoded values (W3C Baggage octets). Any malformed
/// entry rejects the whole list.
fn parse_attributes(text: &str) -> Result<Vec<KeyValue>, String> {
    let mut attributes = Vec::new();
    for (i, entry) in text.split(',').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("entry {} is not key=value", i + 1));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("entry {} has an empty key", i + 1));
        }
        let value = percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|_| format!("entry {} is not UTF-8 once decoded", i + 1))?;
        attributes.push(KeyValue::new(key.to_owned(), value.into_owned()));
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(config: &OtelConfig, vars: &[(&str, &str)]) -> Result<Settings, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::resolve(config, &|name| vars.get(name).cloned())
    }

    fn attribute(settings: &Settings, key: &str) -> Option<String> {
        settings
            .resource
            .get(&opentelemetry::Key::new(key.to_owned()))
            .map(|value| value.to_string())
    }

    /// Resolves and checks the URL and service name; returns the settings for more checks.
    fn expect(config: &OtelConfig, vars: &[(&str, &str)], url: &str, name: &str) -> Settings {
        let settings = resolve(config, vars).unwrap();
        assert_eq!(settings.traces_url, url, "{vars:?}");
        assert_eq!(attribute(&settings, SERVICE_NAME).as_deref(), Some(name));
        settings
    }

    #[test]
    fn config_alone_gives_its_endpoint_and_name() {
        let config = OtelConfig {
            endpoint: "http://otel-collector:4318/".into(),
            service_name: "gateway".into(),
            ..OtelConfig::default()
        };
        let url = "http://otel-collector:4318/v1/traces";
        let settings = expect(&config, &[], url, "gateway");
        assert!(attribute(&settings, "telemetry.sdk.name").is_some());
        assert!(attribute(&settings, SERVICE_VERSION).is_some());
    }

    #[test]
    fn environment_wins_over_config() {
        let config = OtelConfig {
            endpoint: "http://from-config:4318".into(),
            ..OtelConfig::default()
        };
        let vars = [
            (ENDPOINT, "https://from-env:4318/otlp"),
            (SERVICE_NAME_VAR, "env-name"),
            (
                RESOURCE_ATTRIBUTES,
                "service.name=attr-name,team=ml%20platform",
            ),
        ];
        let url = "https://from-env:4318/otlp/v1/traces";
        let settings = expect(&config, &vars, url, "env-name");
        assert_eq!(attribute(&settings, "team").as_deref(), Some("ml platform"));

        let vars = [
            (ENDPOINT, "http://ignored:4318"),
            (TRACES_ENDPOINT, "http://traces:9999/custom/path"),
            (RESOURCE_ATTRIBUTES, "service.name=attr-name"),
        ];
        expect(
            &config,
            &vars,
            "http://traces:9999/custom/path",
            "attr-name",
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let vars = [
            (ENDPOINT, " "),
            (SERVICE_NAME_VAR, ""),
            (TRACES_ENDPOINT, ""),
        ];
        let url = "http://localhost:4318/v1/traces";
        expect(&OtelConfig::default(), &vars, url, "openrouter-proxy");
    }

    #[test]
    fn bad_endpoints_name_their_source_not_their_value() {
        for (var, value) in [
            (ENDPOINT, "collector:4318"),
            (TRACES_ENDPOINT, "ftp://collector/v1/traces"),
            (ENDPOINT, "https://user:hunter2@collector"),
        ] {
            let err = resolve(&OtelConfig::default(), &[(var, value)]).unwrap_err();
            assert!(err.starts_with(var), "{err}");
            assert!(!err.contains("hunter2") && !err.contains("ftp://"), "{err}");
        }
    }

    #[test]
    fn malformed_resource_attributes_are_ignored_whole() {
        let settings = resolve(
            &OtelConfig::default(),
            &[(RESOURCE_ATTRIBUTES, "team=ml,broken,service.name=x")],
        )
        .unwrap();
        assert_eq!(attribute(&settings, "team"), None);
        assert_eq!(
            attribute(&settings, SERVICE_NAME).as_deref(),
            Some("openrouter-proxy")
        );
        assert_eq!(
            parse_attributes("a=%FF").unwrap_err(),
            "entry 1 is not UTF-8 once decoded"
        );
        assert_eq!(parse_attributes("a=1,,b=2").unwrap().len(), 2);
    }
}
