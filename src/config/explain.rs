//! Configuration errors in the user's words. Each message names the key,
//! where its value came from (the environment variable the user set, or
//! the settings file), what was expected and what was given; a misspelt
//! key gets the nearest real one suggested. Values are echoed only where a
//! number or a yes/no was expected: secrets are text, and text is always
//! accepted, so a secret never reaches a message.
//!
//! Unknown keys are found here, before deserialising, by walking what the
//! sources gave against the tree of `config/default.toml`, which holds
//! every key. An empty table or a list in the defaults takes any content.

use std::collections::HashMap;

use config::{Map, Value, ValueKind};

use super::ConfigError;

/// The origin the `config` crate gives values from the environment.
const ENVIRONMENT: &str = "the environment";

/// Where each key's value came from, for the keys not left at their
/// defaults.
#[derive(Debug, Default)]
pub(super) struct Origins(HashMap<String, String>);

impl Origins {
    /// Checks `given` (all sources merged) against `schema` (the defaults):
    /// an unknown key is an error; otherwise notes each value's origin.
    pub(super) fn check(
        schema: &Map<String, Value>,
        given: &Map<String, Value>,
    ) -> Result<Self, ConfigError> {
        let mut origins = Self::default();
        origins.walk(schema, given, "")?;
        Ok(origins)
    }

    fn walk(
        &mut self,
        schema: &Map<String, Value>,
        given: &Map<String, Value>,
        path: &str,
    ) -> Result<(), ConfigError> {
        let mut names: Vec<&String> = given.keys().collect();
        names.sort();
        for name in names {
            let value = &given[name];
            let key = join(path, name);
            let Some(expected) = schema.get(name) else {
                return Err(unknown(&key, name, schema, path, value));
            };
            match (&expected.kind, &value.kind) {
                (ValueKind::Table(inner), ValueKind::Table(given)) if !inner.is_empty() => {
                    self.walk(inner, given, &key)?
                }
                (ValueKind::Table(inner), _) if !inner.is_empty() => {
                    return Err(ConfigError(format!(
                        "{}: is a section of settings, not a value; set its keys, like {}",
                        name_from(&key, value.origin()),
                        first_key(&key, inner, value.origin())
                    )));
                }
                (kind, ValueKind::Table(given)) if !matches!(kind, ValueKind::Table(_)) => {
                    // `SMS__AMQP__PREFETCH__X`: no key lies below a value.
                    let mut nested: Vec<&String> = given.keys().collect();
                    nested.sort();
                    let below = nested.first().map(|n| join(&key, n)).unwrap_or(key.clone());
                    let origin = nested.first().and_then(|n| given[*n].origin());
                    return Err(ConfigError(format!(
                        "{}: no such setting ({key} is a single value)",
                        name_from(&below, origin)
                    )));
                }
                _ => {
                    if let Some(origin) = value.origin() {
                        self.0.insert(key, origin.to_owned());
                    }
                }
            }
        }
        Ok(())
    }

    /// `amqp.prefetch (from SMS__AMQP__PREFETCH)`, or the key alone when
    /// it has its default. `http.api_keys[1]` is named after `http.api_keys`.
    pub(super) fn name(&self, key: &str) -> String {
        let base = key.split('[').next().unwrap_or(key);
        match self.0.get(base).map(String::as_str) {
            Some(ENVIRONMENT) => format!("{key} (from {})", env_var(base)),
            origin => name_from(key, origin),
        }
    }

    /// A deserialising error of the `config` crate, reworded.
    pub(super) fn explain(&self, e: config::ConfigError) -> ConfigError {
        use config::ConfigError as E;
        match e {
            E::Type {
                unexpected,
                expected,
                key,
                ..
            } => ConfigError(format!(
                "{}: expected {}, got {}",
                self.name(key.as_deref().unwrap_or_default()),
                expected_words(expected),
                given_words(&unexpected.to_string())
            )),
            E::At { error, key, .. } => {
                let why = match *error {
                    E::Message(message) => message,
                    other => other.to_string(),
                };
                ConfigError(format!(
                    "{}: {why}",
                    self.name(key.as_deref().unwrap_or_default())
                ))
            }
            E::FileParse { uri, cause } => ConfigError(format!(
                "settings file {}: {}",
                uri.as_deref().unwrap_or("(unnamed)"),
                one_line(&cause.to_string())
            )),
            other => ConfigError(other.to_string().replace('\n', " ")),
        }
    }

    /// A [`super::Settings::validate`] error (`key: why`), with where the
    /// key's value came from.
    pub(super) fn locate(&self, e: ConfigError) -> ConfigError {
        match e.0.split_once(": ") {
            Some((key, why)) if !key.contains(' ') => {
                ConfigError(format!("{}: {why}", self.name(key)))
            }
            _ => e,
        }
    }
}

/// A parser's message (TOML's spans several lines, with a picture of the
/// spot) as one line: its first line and its last.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [first, .., last] => format!("{first}: {last}"),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The environment variable that sets `key`: `SMS__AMQP__PREFETCH`.
pub(super) fn env_var(key: &str) -> String {
    format!("SMS__{}", key.replace('.', "__").to_uppercase())
}

fn name_from(key: &str, origin: Option<&str>) -> String {
    match origin {
        None => key.to_owned(),
        Some(ENVIRONMENT) => format!("{key} (from {})", env_var(key)),
        Some(file) => format!("{key} (from {file})"),
    }
}

/// How the user would write the first key of a section, from the same
/// source as the mistake.
fn first_key(section: &str, inner: &Map<String, Value>, origin: Option<&str>) -> String {
    let mut names: Vec<&String> = inner.keys().collect();
    names.sort();
    let key = join(
        section,
        names.first().map(|n| n.as_str()).unwrap_or_default(),
    );
    match origin {
        Some(ENVIRONMENT) => env_var(&key),
        _ => key,
    }
}

/// An unknown key, with the nearest known one when it is close.
fn unknown(
    key: &str,
    name: &str,
    schema: &Map<String, Value>,
    path: &str,
    value: &Value,
) -> ConfigError {
    let origin = value.origin().or_else(|| nested_origin(value));
    let here = name_from(key, origin);
    let suggestion = suggest(name, schema).map(|s| join(path, &s));
    let hint = match (suggestion, origin) {
        (Some(better), Some(ENVIRONMENT)) => {
            let section = matches!(
                schema.get(&better).map(|v| &v.kind),
                Some(ValueKind::Table(inner)) if !inner.is_empty()
            );
            let var = env_var(&better);
            let var = if section {
                format!("{var}__<KEY>")
            } else {
                var
            };
            format!("did you mean {better} ({var})?")
        }
        (Some(better), _) => format!("did you mean {better}?"),
        (None, _) => {
            let mut known: Vec<&str> = schema.keys().map(String::as_str).collect();
            known.sort();
            let what = if path.is_empty() {
                "the sections are".to_owned()
            } else {
                format!("the keys of {path} are")
            };
            format!("{what} {}", known.join(", "))
        }
    };
    ConfigError(format!("{here}: no such setting; {hint}"))
}

/// A table has no origin of its own: take its first value's.
fn nested_origin(value: &Value) -> Option<&str> {
    match &value.kind {
        ValueKind::Table(table) => {
            let mut names: Vec<&String> = table.keys().collect();
            names.sort();
            let first = &table[*names.first()?];
            first.origin().or_else(|| nested_origin(first))
        }
        _ => None,
    }
}

/// The known name nearest to `name`, if near enough to be a slip: at most
/// one edit in four characters. A section and key run together with one
/// underscore (`amqp_prefetch`, from `SMS__AMQP_PREFETCH`) is read as the
/// key it names.
fn suggest(name: &str, schema: &Map<String, Value>) -> Option<String> {
    let near = |name: &str, table: &Map<String, Value>| {
        table
            .keys()
            .map(|known| (edit_distance(name, known), known))
            .filter(|(d, known)| *d > 0 && *d <= known.len().max(name.len()).div_ceil(4))
            .min()
            .map(|(_, known)| known.clone())
    };
    if let Some(found) = near(name, schema) {
        return Some(found);
    }
    for (section, value) in schema {
        if let (Some(rest), ValueKind::Table(inner)) = (
            name.strip_prefix(section.as_str())
                .and_then(|r| r.strip_prefix('_')),
            &value.kind,
        ) {
            if inner.contains_key(rest) {
                return Some(format!("{section}.{rest}"));
            }
            if let Some(key) = near(rest, inner) {
                return Some(format!("{section}.{key}"));
            }
        }
    }
    None
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The `config` crate's words for a type, as a user would say them.
fn expected_words(expected: &str) -> String {
    let range = |max: &str| format!("a whole number from 0 to {max}");
    match expected {
        "an integer" => "a whole number".to_owned(),
        "an unsigned 8 bit integer" => range(&u8::MAX.to_string()),
        "an unsigned 16 bit integer" => range(&u16::MAX.to_string()),
        "an unsigned 32 bit integer" => range(&u32::MAX.to_string()),
        "an unsigned u64 bit integer" | "an unsigned 64 bit integer" => {
            range(&u64::MAX.to_string())
        }
        "a boolean" => "true or false".to_owned(),
        "a string" => "text".to_owned(),
        "a map" => "a section of settings".to_owned(),
        other if other.starts_with("struct ") => "a section of settings".to_owned(),
        other => other.to_owned(),
    }
}

/// The `config` crate's description of a value (`string "many"`,
/// ``64-bit unsigned integer `70000` ``, `map`), as the value itself.
fn given_words(unexpected: &str) -> String {
    if let Some(text) = unexpected.strip_prefix("string ") {
        return text.to_owned();
    }
    if let Some((_, rest)) = unexpected.split_once('`') {
        if let Some((value, _)) = rest.split_once('`') {
            return value.to_owned();
        }
    }
    match unexpected {
        "map" => "a section".to_owned(),
        "sequence" => "a list".to_owned(),
        "unit value" => "nothing".to_owned(),
        other => other.to_owned(),
    }
}

/// Deserialises a unit enum from its name, saying which names there are:
/// `expected "text" or "json", got "yaml"` (the `config` crate's own
/// message names the Rust type instead). Use as `deserialize_with`.
pub(super) fn choice<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::{Error as _, IntoDeserializer};
    let raw = <String as serde::Deserialize>::deserialize(d)?;
    let from_name: serde::de::value::StrDeserializer<'_, ChoiceError> =
        raw.as_str().into_deserializer();
    T::deserialize(from_name).map_err(|e| D::Error::custom(e.0))
}

/// As [`choice`], for an optional setting.
pub(super) fn optional_choice<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    choice(d).map(Some)
}

/// The error [`choice`] reads names with: it words an unknown variant.
#[derive(Debug)]
struct ChoiceError(String);

impl std::fmt::Display for ChoiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChoiceError {}

impl serde::de::Error for ChoiceError {
    fn custom<M: std::fmt::Display>(message: M) -> Self {
        Self(message.to_string())
    }

    fn unknown_variant(given: &str, expected: &'static [&'static str]) -> Self {
        let quoted: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
        let list = match quoted.as_slice() {
            [] => "nothing".to_owned(),
            [one] => one.clone(),
            [two @ .., last] if two.len() == 1 => format!("{} or {last}", two[0]),
            [many @ .., last] => format!("one of {} or {last}", many.join(", ")),
        };
        Self(format!("expected {list}, got {given:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_names_are_suggested_and_far_ones_are_not() {
        assert_eq!(edit_distance("prefech", "prefetch"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let schema = config::Config::builder()
            .add_source(config::File::from_str(
                super::super::DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| config::Source::collect(&c))
            .unwrap();
        let amqp = match &schema["amqp"].kind {
            ValueKind::Table(t) => t.clone(),
            _ => unreachable!(),
        };
        assert_eq!(suggest("prefech", &amqp).as_deref(), Some("prefetch"));
        assert_eq!(
            suggest("comand_queue", &amqp).as_deref(),
            Some("command_queue")
        );
        assert_eq!(suggest("banana", &amqp), None);
        assert_eq!(suggest("amqpp", &schema).as_deref(), Some("amqp"));
        assert_eq!(
            suggest("amqp_prefetch", &schema).as_deref(),
            Some("amqp.prefetch")
        );
        assert_eq!(suggest("log_levl", &schema).as_deref(), Some("log.level"));
    }

    #[test]
    fn an_item_of_a_list_is_named_with_the_variable_that_set_the_list() {
        let origins = Origins(HashMap::from([(
            "http.api_keys".to_owned(),
            ENVIRONMENT.to_owned(),
        )]));
        assert_eq!(
            origins.name("http.api_keys[1]"),
            "http.api_keys[1] (from SMS__HTTP__API_KEYS)"
        );
        assert_eq!(origins.name("http.bind"), "http.bind");
    }

    #[test]
    fn values_are_worded_as_written() {
        assert_eq!(given_words("string \"many\""), "\"many\"");
        assert_eq!(given_words("64-bit unsigned integer `70000`"), "70000");
        assert_eq!(given_words("map"), "a section");
        assert_eq!(
            expected_words("an unsigned 16 bit integer"),
            "a whole number from 0 to 65535"
        );
        assert_eq!(
            expected_words("struct AmqpSettings"),
            "a section of settings"
        );
    }
}
