//! Provider instances and routes (`[providers.<name>]`, `[[routes]]`):
//! what each instance is, its credentials, its own timeouts, rate limit
//! and breaker, and which instances serve which destinations. The single
//! `[provider]` section of the first version stays valid: with no
//! `[providers.*]` it is one instance, named after its kind, on a route
//! for every number.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{check_url, ConfigError, ProviderKind, ProviderSettings};

/// One `[providers.<name>]` table. Every setting but the credentials has a
/// default: the `[provider]` section's value, or the provider's own (its
/// public API host for `base_url`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSettings {
    /// The provider; defaults to the instance's name when that names one
    /// (`[providers.twilio]`).
    #[serde(default, deserialize_with = "super::explain::optional_choice")]
    pub kind: Option<ProviderKind>,
    pub base_url: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub max_idle_connections: Option<usize>,
    /// HTTP/2 to this provider: by ALPN over https, prior knowledge over
    /// http (`http::Http2`).
    pub http2: Option<bool>,
    pub max_sends_per_second: Option<u32>,
    pub breaker_threshold: Option<u32>,
    pub breaker_cool_down_ms: Option<u64>,
    /// generic: bearer token.
    pub token: Option<SecretString>,
    /// generic: HMAC secret of its delivery reports.
    pub callback_secret: Option<SecretString>,
    /// twilio
    pub account_sid: Option<String>,
    pub auth_token: Option<SecretString>,
    pub messaging_service_sid: Option<String>,
    /// twilio, africastalking, vonage, infobip: the sender.
    pub from: Option<String>,
    /// africastalking
    pub username: Option<String>,
    /// africastalking, vonage, infobip
    pub api_key: Option<SecretString>,
    /// africastalking, infobip (and vonage, optionally): the secret path
    /// token of their callbacks.
    pub callback_token: Option<SecretString>,
    /// vonage
    pub api_secret: Option<SecretString>,
    /// vonage: checks signed delivery receipts when set.
    pub signature_secret: Option<SecretString>,
    /// vonage: the dashboard's signature method (`md5hash`, the default,
    /// `md5`, `sha1`, `sha256` or `sha512`).
    pub signature_method: Option<String>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// E.164 prefixes (`+254`); `+` matches every number.
    pub prefixes: Vec<String>,
    /// Instance names, in order of preference.
    pub providers: Vec<String>,
}

/// An instance with every default filled in.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_idle_connections: usize,
    pub http2: bool,
    pub max_sends_per_second: u32,
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
    pub settings: InstanceSettings,
    /// Where the provider is to post this instance's delivery reports,
    /// for the adapters that pass a callback URL with each message: under
    /// `http.public_url`, with the path token where the instance has one.
    /// A secret when it holds the token: never logged. `None` without
    /// `http.public_url`.
    pub callback_url: Option<String>,
}

impl Instance {
    /// `{public_url}/v1/callbacks/{name}`, plus `/{callback_token}` when set.
    pub fn callback_url_under(&self, public_url: &str) -> String {
        let mut url = format!(
            "{}/v1/callbacks/{}",
            public_url.trim_end_matches('/'),
            self.name
        );
        if let Some(token) = self
            .settings
            .callback_token
            .as_ref()
            .map(|t| t.expose_secret())
            .filter(|t| !t.is_empty())
        {
            url.push('/');
            url.push_str(token);
        }
        url
    }

    /// `providers.<name>.<key>`, for errors.
    pub fn key(&self, key: &str) -> String {
        format!("providers.{}.{key}", self.name)
    }

    /// A required text setting, or an error naming it.
    pub fn required<'a>(&self, key: &str, value: &'a Option<String>) -> Result<&'a str, String> {
        value
            .as_deref()
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "{}: required for kind {}",
                    self.key(key),
                    self.kind.as_str()
                )
            })
    }

    /// A required secret, or an error naming it (never its value).
    pub fn secret<'a>(
        &self,
        key: &str,
        value: &'a Option<SecretString>,
    ) -> Result<&'a str, String> {
        value
            .as_ref()
            .map(|v| v.expose_secret())
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "{}: required for kind {} (a secret: set it through SMS__PROVIDERS__{}__{})",
                    self.key(key),
                    self.kind.as_str(),
                    self.name.to_uppercase(),
                    key.to_uppercase()
                )
            })
    }
}

/// The instances and routes the settings describe, checked: every route
/// names known instances, some route covers every number (`+`), every
/// prefix is `+` and digits, and each instance has its kind's credentials.
pub fn resolve(
    legacy: &ProviderSettings,
    providers: &BTreeMap<String, InstanceSettings>,
    routes: &[RouteSettings],
) -> Result<(Vec<Instance>, Vec<RouteSettings>), ConfigError> {
    let bad = |key: String, why: &str| ConfigError(format!("{key}: {why}"));
    if providers.is_empty() {
        if legacy.kind != ProviderKind::Generic {
            let kind = legacy.kind.as_str();
            return Err(bad(
                "provider.kind".into(),
                &format!(
                    "{kind} needs credentials: configure it as [providers.{kind}] \
                     (for example SMS__PROVIDERS__{}__...)",
                    kind.to_uppercase()
                ),
            ));
        }
        let settings = InstanceSettings {
            kind: Some(legacy.kind),
            base_url: Some(legacy.base_url.clone()),
            token: Some(legacy.token.clone()),
            callback_secret: Some(legacy.callback_secret.clone()),
            ..InstanceSettings::default()
        };
        let instance = fill(legacy.kind.as_str(), legacy.kind, &settings, legacy);
        let route = RouteSettings {
            prefixes: vec!["+".into()],
            providers: vec![instance.name.clone()],
        };
        if !routes.is_empty() {
            return Err(bad(
                "routes".into(),
                "routes need named instances: configure [providers.<name>]",
            ));
        }
        return Ok((vec![instance], vec![route]));
    }
    let mut instances = Vec::new();
    for (name, settings) in providers {
        let key = format!("providers.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(bad(
                key,
                "instance names are lower-case letters, digits and _",
            ));
        }
        let kind = settings
            .kind
            .or_else(|| ProviderKind::parse(name))
            .ok_or_else(|| {
                bad(
                    format!("{key}.kind"),
                    "required (generic, twilio, africastalking, vonage or infobip)",
                )
            })?;
        let instance = fill(name, kind, settings, legacy);
        check_url(
            &instance.key("base_url"),
            &instance.base_url,
            &["http", "https"],
        )?;
        for (field, value) in [
            ("request_timeout_ms", instance.request_timeout.as_millis()),
            ("connect_timeout_ms", instance.connect_timeout.as_millis()),
            (
                "breaker_cool_down_ms",
                instance.breaker_cool_down.as_millis(),
            ),
        ] {
            if value == 0 || value > 86_400_000 {
                return Err(bad(instance.key(field), "must be 1 ms to 24 h"));
            }
        }
        if let Some(token) = settings.callback_token.as_ref().map(|t| t.expose_secret()) {
            // A path segment, and a secret a guess must not find.
            let safe = |c: char| c.is_ascii_alphanumeric() || "-_.~".contains(c);
            if !token.is_empty() && (token.len() < 16 || !token.chars().all(safe)) {
                return Err(bad(
                    instance.key("callback_token"),
                    "must be 16 or more letters, digits, -, _, . or ~",
                ));
            }
        }
        instances.push(instance);
    }
    let routes = if routes.is_empty() && instances.len() == 1 {
        vec![RouteSettings {
            prefixes: vec!["+".into()],
            providers: vec![instances[0].name.clone()],
        }]
    } else {
        routes.to_vec()
    };
    let mut covers_all = false;
    for (i, route) in routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if route.prefixes.is_empty() || route.providers.is_empty() {
            return Err(bad(key, "needs prefixes and providers"));
        }
        for prefix in &route.prefixes {
            let digits = prefix.strip_prefix('+').unwrap_or("x");
            if !digits.chars().all(|c| c.is_ascii_digit()) || digits.len() > 15 {
                return Err(bad(
                    format!("{key}.prefixes"),
                    &format!("{prefix:?} is not + followed by up to 15 digits"),
                ));
            }
            covers_all |= prefix == "+";
        }
        for name in &route.providers {
            if !instances.iter().any(|i| &i.name == name) {
                return Err(bad(
                    format!("{key}.providers"),
                    &format!("{name:?} is no configured instance ([providers.{name}])"),
                ));
            }
        }
    }
    if !covers_all {
        return Err(bad(
            "routes".into(),
            "no route covers every number: add one with prefixes = [\"+\"]",
        ));
    }
    Ok((instances, routes))
}

/// An instance's settings with the defaults filled in.
fn fill(
    name: &str,
    kind: ProviderKind,
    s: &InstanceSettings,
    legacy: &ProviderSettings,
) -> Instance {
    let ms = Duration::from_millis;
    Instance {
        name: name.to_owned(),
        kind,
        base_url: s.base_url.clone().unwrap_or_else(|| {
            kind.default_base_url()
                .unwrap_or(&legacy.base_url)
                .to_owned()
        }),
        connect_timeout: ms(s.connect_timeout_ms.unwrap_or(legacy.connect_timeout_ms)),
        request_timeout: ms(s.request_timeout_ms.unwrap_or(legacy.request_timeout_ms)),
        max_idle_connections: s
            .max_idle_connections
            .unwrap_or(legacy.max_idle_connections),
        http2: s.http2.unwrap_or(legacy.http2),
        max_sends_per_second: s
            .max_sends_per_second
            .unwrap_or(legacy.max_sends_per_second),
        callback_url: None,
        breaker_threshold: s.breaker_threshold.unwrap_or(legacy.breaker_threshold),
        breaker_cool_down: ms(s
            .breaker_cool_down_ms
            .unwrap_or(legacy.breaker_cool_down_ms)),
        settings: s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{environment, Settings};

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, String> {
        let map = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let path = file.map(|text| {
            let path = std::env::temp_dir().join(format!(
                "sms-providers-{}.toml",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, text).unwrap();
            path
        });
        let loaded = Settings::load_from(path.as_deref(), environment().source(Some(map)))
            .map_err(|e| e.to_string());
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
        loaded
    }

    #[test]
    fn the_single_provider_section_is_one_instance_named_after_its_kind_on_every_number() {
        let s = load(None, &[]).unwrap();
        let (instances, routes) = s.instances().unwrap();
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].name, "generic");
        assert_eq!(instances[0].base_url, "http://127.0.0.1:9000");
        assert_eq!(routes[0].prefixes, ["+"]);
        assert_eq!(routes[0].providers, ["generic"]);
    }

    #[test]
    fn the_compose_stack_settings_load_with_two_instances_and_a_failover_route() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/compose.toml"))
                .unwrap();
        let s = load(Some(&text), &[]).unwrap();
        let (instances, routes) = s.instances().unwrap();
        let names: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["backup", "primary"]);
        assert_eq!(routes[0].providers, ["primary", "backup"]);
    }

    #[test]
    fn instances_take_their_secrets_from_the_environment_and_defaults_from_the_provider_section() {
        let s = load(
            None,
            &[
                ("SMS__PROVIDERS__BACKUP__KIND", "generic"),
                ("SMS__PROVIDERS__BACKUP__BASE_URL", "http://b:9000"),
                ("SMS__PROVIDERS__BACKUP__TOKEN", "007"),
                ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "1234"),
            ],
        )
        .unwrap();
        let (instances, routes) = s.instances().unwrap();
        assert_eq!(instances[0].name, "backup");
        assert_eq!(instances[0].request_timeout.as_millis(), 1234);
        use secrecy::ExposeSecret;
        let token = instances[0].settings.token.as_ref().unwrap();
        assert_eq!(token.expose_secret(), "007", "a secret is never reparsed");
        assert_eq!(
            routes[0].providers,
            ["backup"],
            "one instance: every number"
        );
    }

    #[test]
    fn bad_provider_or_route_settings_exit_2_naming_the_key() {
        let two = r#"
[providers.a]
kind = "generic"
base_url = "http://a:9000"
[providers.b]
kind = "generic"
base_url = "http://b:9000"
"#;
        for (file, env, key) in [
            (Some(two), vec![], "routes"),
            (
                Some(&*format!(
                    "{two}\n[[routes]]\nprefixes = [\"+\"]\nproviders = [\"a\", \"c\"]\n"
                )),
                vec![],
                "routes[0].providers",
            ),
            (
                Some(&*format!(
                    "{two}\n[[routes]]\nprefixes = [\"+254\"]\nproviders = [\"a\"]\n"
                )),
                vec![],
                "routes",
            ),
            (
                Some(&*format!(
                    "{two}\n[[routes]]\nprefixes = [\"254\"]\nproviders = [\"a\"]\n"
                )),
                vec![],
                "routes[0].prefixes",
            ),
            (
                None,
                vec![("SMS__PROVIDERS__X__BASE_URL", "http://x")],
                "providers.x.kind",
            ),
            (
                None,
                vec![
                    ("SMS__PROVIDERS__A__KIND", "generic"),
                    ("SMS__PROVIDERS__A__BASE_URL", "ftp://a"),
                ],
                "providers.a.base_url",
            ),
            (
                None,
                vec![("SMS__PROVIDER__KIND", "twilio")],
                "provider.kind",
            ),
        ] {
            let err = load(file, &env)
                .err()
                .unwrap_or_else(|| panic!("accepted: {key}"));
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
