//! The contract as documents: docs/asyncapi.yaml (queues, exchanges and
//! every message) and docs/openapi.json (the HTTP API, served at
//! `GET /openapi.json`) cannot drift from the service:
//!
//! - each is a valid AsyncAPI 3.0.0 / OpenAPI 3.1 document, checked against
//!   the official JSON Schemas of both specifications (kept offline in
//!   tests/fixtures/meta-schemas/, see the README there), every local `$ref`
//!   resolves and every example validates;
//! - they name what the code has: every `EventKind` exchange and type,
//!   every `FailureReason`, `DeliveryStatus` and `Priority`, the limits of
//!   a command, the default queue names, and every route of the router;
//! - the events, dead letters and HTTP answers of a real run (the service
//!   in-process against the real RabbitMQ and Redis, a wiremock provider)
//!   validate against the schemas the documents give them, and an answer
//!   with a status code or content type a route does not document fails.
//!
//! AsyncAPI payloads and headers are AsyncAPI Schema Objects, a superset of
//! JSON Schema draft-07, so they are validated as draft-07; OpenAPI 3.1
//! schemas are JSON Schema 2020-12. Formats (`date-time`) are checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use jsonschema::{Draft, Validator};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};
use sms_service::domain::{
    DeliveryReport, DeliveryStatus, EventKind, FailureReason, Priority, SendSms, SmsFailed,
    SmsSent, MAX_KEY_LEN, MAX_SENDER_LEN, MAX_TEXT_CHARS,
};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::{
    command, post_signed_report, settings, sign_report, spawn_app_with, Received, TestApp,
};

const WAIT: Duration = Duration::from_secs(10);
const API_KEY: &str = "schemas-api-key-0123456789";
const SECRET: &str = "schemas-callback-s3cret";

// ------------------------------------------------------------ documents

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(relative: &str) -> Value {
    let text = std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{relative} is not JSON: {e}"))
}

/// docs/asyncapi.yaml as JSON.
fn asyncapi() -> Value {
    let text = std::fs::read_to_string(root().join("docs/asyncapi.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("docs/asyncapi.yaml is YAML");
    assert_eq!(docs.len(), 1, "docs/asyncapi.yaml holds one document");
    yaml_to_json(&docs[0])
}

/// docs/openapi.json, as the service serves it.
fn openapi() -> Value {
    serde_json::from_str(sms_service::adapters::http::OPENAPI_JSON)
        .expect("docs/openapi.json is JSON")
}

fn yaml_to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => json!(r.parse::<f64>().expect("a YAML real is a number")),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("a YAML key that is not a string: {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        other => panic!("YAML the documents do not use: {other:?}"),
    }
}

/// The value a local `$ref` (`#/a/b`) points to.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// `value`, or what its `$ref` points to (followed to the end).
fn deref<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        value = resolve(doc, reference).unwrap_or_else(|| panic!("{reference} resolves"));
    }
    value
}

/// Every `$ref` in `value`, with where it is.
fn refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push((at.to_owned(), r.to_owned()));
                    }
                } else {
                    refs(v, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Refs that do not resolve inside their document.
fn dangling_refs(doc: &Value) -> Vec<String> {
    let mut all = Vec::new();
    refs(doc, "", &mut all);
    assert!(all.len() > 10, "only {} $refs found", all.len());
    all.into_iter()
        .filter(|(_, r)| resolve(doc, r).is_none())
        .map(|(at, r)| format!("{at}: {r}"))
        .collect()
}

/// A validator for `schema`, a part of `doc` whose `#/components/...` refs
/// point into `doc`.
fn validator(doc: &Value, schema: &Value, draft: Draft) -> Validator {
    let wrapper = json!({"allOf": [schema], "components": doc["components"]});
    jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        .build(&wrapper)
        .unwrap_or_else(|e| panic!("the schema compiles: {e}\n{schema:#}"))
}

/// What is wrong with `instance`, one line each; empty when it is valid.
fn violations(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Asserts that `doc` is a valid `spec` document: it fits the
/// specification's JSON Schema (`meta`, of `draft`), every local `$ref`
/// in it resolves, and its version is the crate's.
fn assert_valid_document(doc: &Value, spec: &str, meta: &str, draft: Draft) {
    let meta = jsonschema::options()
        .with_draft(draft)
        .build(&read_json(meta))
        .expect("the meta-schema compiles");
    let wrong = violations(&meta, doc);
    assert!(wrong.is_empty(), "not {spec}:\n{}", wrong.join("\n"));
    let dangling = dangling_refs(doc);
    assert!(
        dangling.is_empty(),
        "$refs that lead nowhere:\n{}",
        dangling.join("\n")
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
}

// ------------------------------------------------------------ the AsyncAPI document

/// The default settings, for the names the documents show.
fn defaults() -> sms_service::config::Settings {
    settings(&[])
}

/// The channel (from docs/asyncapi.yaml) whose address is `address`.
fn channel<'a>(doc: &'a Value, address: &str) -> &'a Value {
    doc["channels"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["address"] == address)
        .unwrap_or_else(|| panic!("docs/asyncapi.yaml has no channel with address {address}"))
}

/// The one message of the channel at `address`, resolved.
fn only_message<'a>(doc: &'a Value, address: &str) -> &'a Value {
    let messages = channel(doc, address)["messages"].as_object().unwrap();
    assert_eq!(messages.len(), 1, "one message on {address}");
    deref(doc, messages.values().next().unwrap())
}

/// The one operation on the channel at `address`.
fn operation_on<'a>(doc: &'a Value, address: &str) -> &'a Value {
    let mut found = doc["operations"].as_object().unwrap().values().filter(|o| {
        let channel = o["channel"]["$ref"].as_str().and_then(|r| resolve(doc, r));
        channel.is_some_and(|c| c["address"] == address)
    });
    let operation = found.next().expect("an operation on the channel");
    assert!(found.next().is_none(), "one operation on {address}");
    operation
}

/// The message of `kind`'s events, found by its default exchange.
fn event_message(doc: &Value, kind: EventKind) -> &Value {
    only_message(doc, defaults().amqp.exchange(kind))
}

/// Validators of a message's payload and headers (draft-07). The
/// published schemas let subscribers ignore fields added later; the
/// service's own messages must have no field the document does not name,
/// so the test adds `additionalProperties: false` itself.
fn message_validators(doc: &Value, message: &Value) -> (Validator, Validator) {
    let part = |name: &str| {
        let mut schema = deref(doc, &message[name]).clone();
        if schema.get("properties").is_some() {
            schema["additionalProperties"] = Value::Bool(false);
        }
        schema
    };
    (
        validator(doc, &part("payload"), Draft::Draft7),
        validator(doc, &part("headers"), Draft::Draft7),
    )
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let found = &doc["components"]["schemas"][name];
    assert!(found.is_object(), "no components.schemas.{name}");
    found
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_asyncapi_document_is_valid_asyncapi_3_0_0_and_its_examples_fit_their_schemas() {
    let doc = asyncapi();
    assert_valid_document(
        &doc,
        "AsyncAPI 3.0.0",
        "tests/fixtures/meta-schemas/asyncapi-3.0.0.json",
        Draft::Draft7,
    );

    // An operation's messages are messages of its own channel (the spec's
    // rule, which its JSON Schema cannot express).
    for (name, operation) in doc["operations"].as_object().unwrap() {
        let channel = operation["channel"]["$ref"].as_str().unwrap();
        for message in operation["messages"].as_array().unwrap() {
            let reference = message["$ref"].as_str().unwrap();
            assert!(
                reference.starts_with(&format!("{channel}/messages/")),
                "operation {name}: {reference} is not a message of {channel}"
            );
        }
    }
    let mut checked = 0;
    for (name, message) in doc["components"]["messages"].as_object().unwrap() {
        let (payload, headers) = message_validators(&doc, message);
        for example in message["examples"].as_array().into_iter().flatten() {
            let mut wrong = violations(&payload, &example["payload"]);
            if let Some(h) = example.get("headers") {
                wrong.extend(violations(&headers, h));
            }
            assert!(wrong.is_empty(), "example of {name}:\n{}", wrong.join("\n"));
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} examples");
}

#[test]
fn the_asyncapi_document_names_every_queue_exchange_reason_status_and_priority_the_code_has() {
    let doc = asyncapi();
    let amqp = defaults().amqp;
    for kind in EventKind::ALL {
        let message = event_message(&doc, kind);
        assert_eq!(message["name"], kind.type_name());
        assert_eq!(message["bindings"]["amqp"]["messageType"], kind.type_name());
        let binding = &channel(&doc, amqp.exchange(kind))["bindings"]["amqp"];
        assert_eq!(binding["exchange"]["type"], "fanout", "{kind:?}");
        assert_eq!(binding["exchange"]["durable"], true, "{kind:?}");
    }
    let high = format!("{}.high", amqp.command_queue);
    for queue in [&amqp.command_queue, &high] {
        assert_eq!(only_message(&doc, queue)["name"], "SendSms", "{queue}");
    }
    assert_eq!(
        only_message(&doc, &amqp.dead_letter_queue)["name"],
        "DeadLetter"
    );
    let addresses: BTreeSet<String> = doc["channels"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["address"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: BTreeSet<String> = EventKind::ALL
        .iter()
        .map(|k| amqp.exchange(*k).clone())
        .collect();
    expected.extend([amqp.command_queue.clone(), high, amqp.dead_letter_queue]);
    assert_eq!(addresses, expected, "channels of docs/asyncapi.yaml");

    let reasons: Vec<&str> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(strings(&schema(&doc, "FailureReason")["enum"]), reasons);
    let error_pattern = schema(&doc, "DeadLetterHeaders")["properties"]["x-sms-error"]["pattern"]
        .as_str()
        .unwrap();
    for reason in &reasons {
        assert!(
            error_pattern.contains(&format!("|{reason}|")),
            "x-sms-error's pattern lacks {reason}"
        );
    }
    let finals: Vec<&str> = DeliveryStatus::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect();
    assert_eq!(
        strings(&schema(&doc, "FinalDeliveryStatus")["enum"]),
        finals
    );

    let send_sms = &schema(&doc, "SendSms")["properties"];
    let mut priorities: Vec<Value> = Priority::ALL.iter().map(|p| json!(p.as_str())).collect();
    priorities.push(Value::Null);
    assert_eq!(send_sms["priority"]["enum"], json!(priorities));
    let key = schema(&doc, "IdempotencyKey");
    assert_eq!(key["maxLength"], MAX_KEY_LEN);
    assert_eq!(send_sms["text"]["maxLength"], MAX_TEXT_CHARS);
    assert_eq!(send_sms["senderId"]["maxLength"], MAX_SENDER_LEN);
}

/// Bodies and whether the service takes them as valid commands. `sendAt`
/// more than 30 days ahead is the one rule the schema cannot say.
fn command_cases() -> Vec<(&'static str, Value)> {
    let base = json!({"idempotencyKey": "k1", "phoneNumber": "+254712345678", "text": "hi"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    vec![
        ("minimal", base.clone()),
        ("unknown fields", with("extra", json!({"a": [1]}))),
        ("sender", with("senderId", json!("MKOPA"))),
        ("null sender", with("senderId", Value::Null)),
        ("sender of 15", with("senderId", json!("A".repeat(15)))),
        ("sender of 16", with("senderId", json!("A".repeat(16)))),
        ("empty sender", with("senderId", json!(""))),
        (
            "sender with a leading space",
            with("senderId", json!(" MKOPA")),
        ),
        ("numeric sender", with("senderId", json!(7))),
        ("no key", without("idempotencyKey")),
        ("empty key", with("idempotencyKey", json!(""))),
        ("key of 128", with("idempotencyKey", json!("!~".repeat(64)))),
        ("key of 129", with("idempotencyKey", json!("k".repeat(129)))),
        (
            "key with a space",
            with("idempotencyKey", json!("has space")),
        ),
        ("key not ASCII", with("idempotencyKey", json!("café"))),
        ("numeric key", with("idempotencyKey", json!(42))),
        ("no phone", without("phoneNumber")),
        ("local phone", with("phoneNumber", json!("0712345678"))),
        ("short phone", with("phoneNumber", json!("+2547123"))),
        (
            "spaced phone",
            with("phoneNumber", json!("+254 712 345 678")),
        ),
        ("leading zero", with("phoneNumber", json!("+0254712345678"))),
        ("15 digits", with("phoneNumber", json!("+123456789012345"))),
        ("16 digits", with("phoneNumber", json!("+1234567890123456"))),
        (
            "numeric phone",
            with("phoneNumber", json!(254712345678_u64)),
        ),
        ("no text", without("text")),
        ("blank text", with("text", json!("  \n\t"))),
        ("no-break space text", with("text", json!("\u{a0}"))),
        ("text of 1600", with("text", json!("é".repeat(1600)))),
        ("text of 1601", with("text", json!("a".repeat(1601)))),
        ("text array", with("text", json!(["hi"]))),
        (
            "expiresAt Z",
            with("expiresAt", json!("2026-12-01T10:00:00Z")),
        ),
        (
            "expiresAt offset",
            with("expiresAt", json!("2026-12-01T13:00:00+03:00")),
        ),
        ("expiresAt date", with("expiresAt", json!("2026-12-01"))),
        ("expiresAt words", with("expiresAt", json!("tomorrow"))),
        ("expiresAt number", with("expiresAt", json!(5))),
        ("null expiresAt", with("expiresAt", Value::Null)),
        ("sendAt", with("sendAt", json!("2020-01-01T00:00:00Z"))),
        ("sendAt words", with("sendAt", json!("later"))),
        ("priority high", with("priority", json!("high"))),
        ("priority bulk", with("priority", json!("bulk"))),
        ("priority urgent", with("priority", json!("urgent"))),
        ("null priority", with("priority", Value::Null)),
        ("an array", json!([1, 2, 3])),
        ("a string", json!("just a string")),
    ]
}

#[test]
fn the_sendsms_schema_accepts_exactly_the_commands_the_service_accepts() {
    let doc = asyncapi();
    let schema = validator(&doc, schema(&doc, "SendSms"), Draft::Draft7);
    let mut disagree = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for (name, body) in command_cases() {
        let parsed = SendSms::from_json(body.to_string().as_bytes());
        let by_schema = schema.is_valid(&body);
        if parsed.is_ok() != by_schema {
            disagree.push(format!(
                "{name}: the service says {}, the schema says {by_schema} ({body})",
                parsed.is_ok()
            ));
        }
        if let Ok(command) = parsed {
            // What the service itself publishes as a command (the gRPC door,
            // the bench) fits the schema too.
            let published: Value = serde_json::from_slice(&command.to_json()).unwrap();
            assert!(schema.is_valid(&published), "{name}: {published}");
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    assert!(
        valid > 10 && invalid > 20,
        "{valid} valid, {invalid} invalid"
    );
    assert!(disagree.is_empty(), "{}", disagree.join("\n"));
}

#[test]
fn the_event_schemas_take_the_events_the_service_builds_and_refuse_a_missing_or_unknown_field() {
    let doc = asyncapi();
    let sent = SmsSent {
        idempotency_key: "pay-8812-reminder".into(),
        phone_number: "+254712345678".into(),
        provider: "generic".into(),
        provider_message_id: "".into(),
        segments: 2,
        attempts: 3,
        sent_at: "2026-11-22T10:00:00Z".into(),
    };
    let failed = SmsFailed {
        idempotency_key: "k1".into(),
        phone_number: "".into(),
        reason: FailureReason::InvalidCommand.as_str().into(),
        detail: "phoneNumber is required".into(),
        attempts: 0,
        failed_at: "2026-11-22T10:00:00Z".into(),
    };
    let report = DeliveryReport {
        idempotency_key: "k1".into(),
        phone_number: "+254712345678".into(),
        provider: "at".into(),
        provider_message_id: "ATXid_1f2e".into(),
        status: DeliveryStatus::Delivered,
        provider_status: "Success".into(),
        error_code: None,
        permanent: false,
        reported_at: "2026-12-01T10:00:03Z".into(),
    };
    let events = [
        (EventKind::Sent, serde_json::to_value(&sent).unwrap()),
        (EventKind::Failed, serde_json::to_value(&failed).unwrap()),
        (EventKind::Delivery, serde_json::to_value(&report).unwrap()),
    ];
    for (kind, event) in events {
        let (payload, _) = message_validators(&doc, event_message(&doc, kind));
        let wrong = violations(&payload, &event);
        assert!(wrong.is_empty(), "{kind:?}: {}", wrong.join("\n"));
        for field in event.as_object().unwrap().keys() {
            let mut less = event.clone();
            less.as_object_mut().unwrap().remove(field);
            assert!(!payload.is_valid(&less), "{kind:?} without {field} passes");
        }
        let mut more = event.clone();
        more["undocumented"] = json!(1);
        assert!(!payload.is_valid(&more), "{kind:?} with a new field passes");
    }
}

// ------------------------------------------------------------ the OpenAPI document

#[test]
fn the_openapi_document_is_valid_openapi_3_1_and_shares_the_sendsms_schema() {
    let doc = openapi();
    let on_disk = read_json("docs/openapi.json");
    assert_eq!(doc, on_disk, "the service serves docs/openapi.json");
    assert_valid_document(
        &doc,
        "OpenAPI 3.1",
        "tests/fixtures/meta-schemas/openapi-3.1.json",
        Draft::Draft202012,
    );

    // Every schema compiles, and its examples fit it.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        let compiled = validator(&doc, schema, Draft::Draft202012);
        for example in schema["examples"].as_array().into_iter().flatten() {
            let wrong = violations(&compiled, example);
            assert!(wrong.is_empty(), "example of {name}:\n{}", wrong.join("\n"));
        }
    }
    // Each path template's parameters are declared, and only those.
    for (template, item) in doc["paths"].as_object().unwrap() {
        let in_template: BTreeSet<String> = template
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(str::to_owned)
            .collect();
        let declared: BTreeSet<String> = item["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| deref(&doc, p))
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(in_template, declared, "{template}");
    }

    // One SendSms for both documents, and the same vocabulary.
    let events = asyncapi();
    let shared = [
        "SendSms",
        "IdempotencyKey",
        "E164",
        "Timestamp",
        "FailureReason",
        "FinalDeliveryStatus",
    ];
    for name in shared {
        assert_eq!(
            schema(&doc, name),
            schema(&events, name),
            "components.schemas.{name} differs between docs/openapi.json and docs/asyncapi.yaml"
        );
    }
    let all: Vec<&str> = DeliveryStatus::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(strings(&schema(&doc, "DeliveryStatus")["enum"]), all);
    let statuses = strings(&schema(&doc, "StatusFields")["properties"]["status"]["enum"]);
    for status in ["processing", "sent", "failed"].iter().chain(&all[1..]) {
        assert!(statuses.contains(&status.to_string()), "status {status}");
    }
}

/// The router's paths, read from its source: every `.route("...")` call.
fn router_paths() -> BTreeSet<String> {
    let source = std::fs::read_to_string(root().join("src/adapters/http/mod.rs")).unwrap();
    let mut paths = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find(".route(") {
        rest = rest[at + ".route(".len()..].trim_start();
        let literal = rest.strip_prefix('"').expect("a route's path is a literal");
        let end = literal.find('"').unwrap();
        paths.insert(literal[..end].to_owned());
        rest = &literal[end..];
    }
    paths
}

/// Documented operations that the router does not serve yet, each added
/// by work in progress elsewhere (CONTRACT.md part 2). The test fails once
/// one is served, so that its entry goes and its answers get checked.
const NOT_YET_SERVED: [(&str, &str); 0] = [];

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// Whether the router serves `method` on `path`: axum answers a path it
/// does not have 404 and a method a path does not take 405, both with an
/// empty body; every handler's refusal has a body. With the API key, as
/// the message routes check it before the method.
async fn served(app: &TestApp, method: &str, path: &str) -> bool {
    let response = request(app, method, path).send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    !(matches!(status, 404 | 405) && body.is_empty())
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes_and_methods_the_router_serves() {
    let doc = openapi();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        router_paths(),
        documented,
        "the paths of src/adapters/http/mod.rs and of docs/openapi.json"
    );
    let app = spawn_app_with(&[("SMS__HTTP__API_KEYS", API_KEY)]).await;
    let mut wrong = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let concrete = template
            .replace("{instance}", "generic")
            .replace("{key}", "no-such-key")
            .replace("{token}", "t");
        for method in METHODS {
            let is_documented = item.get(method.to_lowercase()).is_some();
            let pending = NOT_YET_SERVED.contains(&(method, template.as_str()));
            let is_served = served(&app, method, &concrete).await;
            match (is_documented && !pending, is_served) {
                (true, false) => wrong.push(format!("{method} {template}: documented, not served")),
                (false, true) if pending => wrong.push(format!(
                    "{method} {template}: served now; remove it from NOT_YET_SERVED"
                )),
                (false, true) => wrong.push(format!("{method} {template}: served, not documented")),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    app.cleanup().await;
}

/// HTTP answers checked against docs/openapi.json: each one's status is
/// documented for its route, its content type is one the status
/// documents, its body fits that content's schema, and each documented
/// header fits its schema.
struct Answers {
    doc: Value,
    /// What did not fit, one line each.
    wrong: Vec<String>,
    /// `METHOD template status` of every answer checked.
    seen: BTreeSet<String>,
}

impl Answers {
    fn new(doc: Value) -> Self {
        Self {
            doc,
            wrong: Vec::new(),
            seen: BTreeSet::new(),
        }
    }

    /// Sends `request` and checks its answer as one of `method template`;
    /// the body as JSON (`Null` when it is not JSON).
    async fn check(
        &mut self,
        method: &str,
        template: &str,
        request: reqwest::RequestBuilder,
    ) -> Value {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        self.seen.insert(format!("{method} {template} {status}"));
        let what = format!("{method} {template} -> {status}");
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        let doc = &self.doc;
        let wrong = &mut self.wrong;
        let operation = &doc["paths"][template][method.to_lowercase()];
        let Some(documented) = operation["responses"].get(status.to_string()) else {
            wrong.push(format!("{what}: status not documented"));
            return Value::Null;
        };
        let documented = deref(doc, documented);
        for (name, header) in documented["headers"].as_object().into_iter().flatten() {
            let value = headers.get(name.as_str()).map(|v| v.to_str().unwrap());
            let schema = validator(doc, &header["schema"], Draft::Draft202012);
            match value {
                Some(v) => wrong.extend(
                    violations(&schema, &json!(v))
                        .iter()
                        .map(|e| format!("{what}: header {name}: {e}")),
                ),
                None => wrong.push(format!("{what}: no {name} header")),
            }
        }
        let Some(content) = documented["content"].as_object() else {
            if !body.is_empty() {
                wrong.push(format!("{what}: a body where none is documented"));
            }
            return Value::Null;
        };
        let content_type = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let media = content_type.split(';').next().unwrap().trim();
        let Some(media_type) = content.get(media) else {
            wrong.push(format!(
                "{what}: content type {content_type:?} not documented"
            ));
            return Value::Null;
        };
        let (instance, parsed) = if media == "application/json" {
            match serde_json::from_slice::<Value>(&body) {
                Ok(value) => (value.clone(), value),
                Err(e) => {
                    wrong.push(format!("{what}: not JSON: {e}"));
                    return Value::Null;
                }
            }
        } else {
            (json!(String::from_utf8_lossy(&body)), Value::Null)
        };
        let schema = validator(doc, &media_type["schema"], Draft::Draft202012);
        wrong.extend(
            violations(&schema, &instance)
                .iter()
                .map(|e| format!("{what}: {e}\n  body: {instance}")),
        );
        parsed
    }

    /// Asserts that every answer fitted, and that each of `expected`
    /// (`METHOD template status`) was seen.
    fn assert_fit_and_seen(&self, expected: &[&str]) {
        assert!(
            self.wrong.is_empty(),
            "answers that do not fit docs/openapi.json:\n{}",
            self.wrong.join("\n")
        );
        let missing: Vec<_> = expected
            .iter()
            .filter(|e| !self.seen.contains(**e))
            .collect();
        assert!(
            missing.is_empty(),
            "never seen: {missing:?}\nseen: {:?}",
            self.seen
        );
    }
}

/// A request to the test app with the API key.
fn request(app: &TestApp, method: &str, path: &str) -> reqwest::RequestBuilder {
    app.http
        .request(method.parse().unwrap(), format!("{}{path}", app.base_url))
        .bearer_auth(API_KEY)
}

async fn provider_answers(app: &TestApp, key: &str, answer: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("Idempotency-Key", key))
        .respond_with(answer)
        .expect(1)
        .mount(&app.provider)
        .await;
}

/// Polls the status document of `key` until its `status` is `want`.
async fn wait_for_status(app: &TestApp, key: &str, want: &str) {
    for _ in 0..100 {
        let response = request(app, "GET", &format!("/v1/messages/{key}"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let body: Value = response.json().await.unwrap();
            if body["status"] == want {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} never reached {want}");
}

#[tokio::test]
async fn the_http_answers_of_a_real_run_fit_the_openapi_schemas_of_their_route_and_status() {
    let mut app = spawn_app_with(&[
        ("SMS__HTTP__API_KEYS", API_KEY),
        ("SMS__PROVIDER__CALLBACK_SECRET", SECRET),
        ("SMS__HTTP__MAX_BODY_BYTES", "4096"),
    ])
    .await;
    let ok = |id: &str| ResponseTemplate::new(200).set_body_json(json!({"id": id}));
    provider_answers(&app, "http-sent", ok("http-1")).await;
    let rejected = ResponseTemplate::new(400).set_body_json(json!({"error": "number barred"}));
    provider_answers(&app, "http-rejected", rejected).await;
    let mut answers = Answers::new(openapi());

    let plain = |path: &str| app.http.get(format!("{}{path}", app.base_url));
    answers.check("GET", "/healthz", plain("/healthz")).await;
    answers.check("GET", "/readyz", plain("/readyz")).await;
    answers.check("GET", "/metrics", plain("/metrics")).await;
    let served = answers
        .check("GET", "/openapi.json", plain("/openapi.json"))
        .await;
    assert_eq!(
        served,
        openapi(),
        "GET /openapi.json is docs/openapi.json, without a key"
    );

    let submit = |body: Vec<u8>| {
        request(&app, "POST", "/v1/messages")
            .header("content-type", "application/json")
            .body(body)
    };
    let sent_body = command("http-sent", "+254712345678", "hi");
    answers
        .check("POST", "/v1/messages", submit(sent_body.clone()))
        .await;
    answers
        .check("POST", "/v1/messages", submit(sent_body))
        .await;
    answers
        .check(
            "POST",
            "/v1/messages",
            submit(command("http-rejected", "+254712345678", "hi")),
        )
        .await;
    answers
        .check(
            "POST",
            "/v1/messages",
            submit(command("http-bad", "0712345678", "hi")),
        )
        .await;
    answers
        .check("POST", "/v1/messages", submit(b"not json".to_vec()))
        .await;
    let reused = answers
        .check(
            "POST",
            "/v1/messages",
            submit(command("http-sent", "+254712345678", "other text")),
        )
        .await;
    assert_eq!(reused["error"], "idempotency_key_reused");
    answers
        .check("POST", "/v1/messages", submit(vec![b' '; 5000]))
        .await;
    let unauthenticated = app.http.post(format!("{}/v1/messages", app.base_url));
    answers
        .check(
            "POST",
            "/v1/messages",
            unauthenticated.body(command("x", "+254712345678", "hi")),
        )
        .await;
    let wrong_key = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .bearer_auth("not-the-key-0123456789");
    answers.check("POST", "/v1/messages", wrong_key).await;

    wait_for_status(&app, "http-sent", "sent").await;
    wait_for_status(&app, "http-rejected", "failed").await;
    let status = |key: &str| request(&app, "GET", &format!("/v1/messages/{key}"));
    answers
        .check("GET", "/v1/messages/{key}", status("http-sent"))
        .await;
    let failed = answers
        .check("GET", "/v1/messages/{key}", status("http-rejected"))
        .await;
    assert_eq!(failed["reason"], "provider_rejected");
    answers
        .check("GET", "/v1/messages/{key}", status("never-seen"))
        .await;
    answers
        .check("GET", "/v1/messages/{key}", plain("/v1/messages/http-sent"))
        .await;
    // Not UTF-8 once percent-decoded: axum's own 400, plain text.
    answers
        .check("GET", "/v1/messages/{key}", status("bad%FF"))
        .await;

    // Cancels: a scheduled message, a key not seen yet, one too late, one
    // no command can carry, a path that is not UTF-8, no API key.
    let later = crate::schedule::scheduled("http-later", crate::schedule::in_seconds(60));
    answers.check("POST", "/v1/messages", submit(later)).await;
    wait_for_status(&app, "http-later", "scheduled").await;
    let cancel = |key: &str| request(&app, "DELETE", &format!("/v1/messages/{key}"));
    let cancelled = answers
        .check("DELETE", "/v1/messages/{key}", cancel("http-later"))
        .await;
    assert_eq!(
        (&cancelled["status"], &cancelled["reason"]),
        (&json!("failed"), &json!("cancelled")),
        "{cancelled}"
    );
    answers
        .check("DELETE", "/v1/messages/{key}", cancel("http-not-yet"))
        .await;
    let too_late = answers
        .check("DELETE", "/v1/messages/{key}", cancel("http-sent"))
        .await;
    assert_eq!(too_late["error"], "not_cancellable");
    answers
        .check(
            "DELETE",
            "/v1/messages/{key}",
            cancel(&"k".repeat(MAX_KEY_LEN + 1)),
        )
        .await;
    answers
        .check("DELETE", "/v1/messages/{key}", cancel("bad%FF"))
        .await;
    answers
        .check(
            "DELETE",
            "/v1/messages/{key}",
            app.http
                .delete(format!("{}/v1/messages/http-sent", app.base_url)),
        )
        .await;

    // Delivery reports: signed at /v1/callbacks/generic, and part 1's route.
    let callback = |body: &str, secret: &str| {
        let (timestamp, signature) = sign_report(body, secret);
        app.http
            .post(format!("{}/v1/callbacks/generic", app.base_url))
            .header("content-type", "application/json")
            .header("x-timestamp", timestamp)
            .header("x-signature", signature)
            .body(body.to_owned())
    };
    let delivered = r#"{"id":"http-1","status":"delivered"}"#;
    answers
        .check(
            "POST",
            "/v1/callbacks/{instance}",
            callback(delivered, SECRET),
        )
        .await;
    answers
        .check(
            "POST",
            "/v1/callbacks/{instance}",
            callback(delivered, "another-secret"),
        )
        .await;
    answers
        .check(
            "POST",
            "/v1/callbacks/{instance}",
            callback(r#"{"id":"http-1","status":"lost"}"#, SECRET),
        )
        .await;
    answers
        .check(
            "POST",
            "/v1/callbacks/{instance}",
            app.http
                .post(format!("{}/v1/callbacks/nobody", app.base_url)),
        )
        .await;
    answers
        .check(
            "POST",
            "/v1/callbacks/{instance}",
            callback(&"x".repeat(5000), SECRET),
        )
        .await;
    let unknown = r#"{"id":"no-such-id","status":"delivered"}"#;
    let (timestamp, signature) = sign_report(unknown, SECRET);
    answers
        .check(
            "POST",
            "/v1/delivery-reports",
            app.http
                .post(format!("{}/v1/delivery-reports", app.base_url))
                .header("x-timestamp", timestamp)
                .header("x-signature", signature)
                .body(unknown),
        )
        .await;
    wait_for_status(&app, "http-sent", "delivered").await;
    let document = answers
        .check("GET", "/v1/messages/{key}", status("http-sent"))
        .await;
    assert_eq!(
        document["history"].as_array().map(Vec::len),
        Some(1),
        "{document}"
    );
    assert_eq!(app.broker.deliveries(1, WAIT).await.len(), 1);

    answers.assert_fit_and_seen(&[
        "GET /healthz 200",
        "GET /readyz 200",
        "GET /metrics 200",
        "GET /openapi.json 200",
        "POST /v1/messages 202",
        "POST /v1/messages 400",
        "POST /v1/messages 401",
        "POST /v1/messages 409",
        "POST /v1/messages 413",
        "GET /v1/messages/{key} 200",
        "GET /v1/messages/{key} 401",
        "GET /v1/messages/{key} 404",
        "GET /v1/messages/{key} 400",
        "DELETE /v1/messages/{key} 200",
        "DELETE /v1/messages/{key} 202",
        "DELETE /v1/messages/{key} 400",
        "DELETE /v1/messages/{key} 401",
        "DELETE /v1/messages/{key} 404",
        "DELETE /v1/messages/{key} 409",
        "POST /v1/callbacks/{instance} 204",
        "POST /v1/callbacks/{instance} 400",
        "POST /v1/callbacks/{instance} 401",
        "POST /v1/callbacks/{instance} 404",
        "POST /v1/callbacks/{instance} 413",
        "POST /v1/delivery-reports 404",
    ]);
    app.cleanup().await;
}

#[tokio::test]
async fn callbacks_refused_by_a_path_token_instance_fit_the_openapi_schemas() {
    const TOKEN: &str = "schemas-at-token-0123456789";
    let provider = wiremock::MockServer::start().await;
    let app = spawn_app_with(&[
        ("SMS__PROVIDERS__AT__KIND", "africastalking"),
        ("SMS__PROVIDERS__AT__BASE_URL", &provider.uri()),
        ("SMS__PROVIDERS__AT__USERNAME", "sandbox"),
        ("SMS__PROVIDERS__AT__API_KEY", "atsk_0123456789abcdef"),
        ("SMS__PROVIDERS__AT__CALLBACK_TOKEN", TOKEN),
    ])
    .await;
    let with_token = format!("/v1/callbacks/at/{TOKEN}");
    let cases = [
        ("POST", "/v1/callbacks/at/wrong-token", 403, "wrong_token"),
        ("POST", "/v1/callbacks/at", 403, "wrong_token"),
        ("POST", &with_token, 400, "invalid_report"),
        ("GET", &with_token, 404, "no_callbacks"),
        ("POST", "/v1/callbacks/nobody/t", 404, "unknown_instance"),
        ("POST", "/v1/delivery-reports", 404, "no_generic_provider"),
    ];
    let mut answers = Answers::new(openapi());
    for (method, path, status, error) in cases {
        let template = match path.split('/').count() {
            5 => "/v1/callbacks/{instance}/{token}",
            4 => "/v1/callbacks/{instance}",
            _ => path,
        };
        let request = app
            .http
            .request(method.parse().unwrap(), format!("{}{path}", app.base_url))
            .header("content-type", "application/json")
            .body(r#"{"id":"ATXid_1","status":"Success"}"#);
        let body = answers.check(method, template, request).await;
        assert_eq!(body["error"], error, "{method} {path}");
        let seen = format!("{method} {template} {status}");
        assert!(answers.seen.contains(&seen), "{method} {path}: {body}");
    }
    answers.assert_fit_and_seen(&[]);
    app.cleanup().await;
}

// ------------------------------------------------------------ real events

/// AMQP headers as JSON, as the AsyncAPI header schemas see them.
fn headers_json(properties: &BasicProperties) -> Value {
    properties.headers().as_ref().map_or(json!({}), table_json)
}

fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_json(v)))
            .collect(),
    )
}

fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(amqp_json).collect())
        }
        AMQPValue::FieldTable(table) => table_json(table),
        AMQPValue::ByteArray(bytes) => json!(bytes.as_slice()),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::Void => Value::Null,
    }
}

/// Checks an event as received against its message in docs/asyncapi.yaml:
/// payload, headers, and the AMQP properties the document states.
fn check_event(doc: &Value, kind: EventKind, event: &Received, wrong: &mut Vec<String>) {
    let message = event_message(doc, kind);
    let (payload, headers) = message_validators(doc, message);
    let body = event.json();
    let what = format!("{} {}", kind.type_name(), body["idempotencyKey"]);
    wrong.extend(
        violations(&payload, &body)
            .iter()
            .map(|e| format!("{what}: {e}")),
    );
    let header_values = headers_json(&event.properties);
    wrong.extend(
        violations(&headers, &header_values)
            .iter()
            .map(|e| format!("{what}: header {e}")),
    );
    let property = |p: &Option<lapin::types::ShortString>| p.as_ref().map(|s| s.to_string());
    let expected_type = message["bindings"]["amqp"]["messageType"]
        .as_str()
        .map(str::to_owned);
    if property(event.properties.kind()) != expected_type {
        wrong.push(format!("{what}: type {:?}", event.properties.kind()));
    }
    let content_type = message["contentType"].as_str().map(str::to_owned);
    if property(event.properties.content_type()) != content_type {
        wrong.push(format!(
            "{what}: content_type {:?}",
            event.properties.content_type()
        ));
    }
    let exchange = defaults().amqp.exchange(kind).clone();
    let operation = operation_on(doc, &exchange);
    assert_eq!(operation["action"], "send", "{what}");
    let mode = operation["bindings"]["amqp"]["deliveryMode"].as_u64();
    if event.properties.delivery_mode().map(u64::from) != mode {
        wrong.push(format!(
            "{what}: delivery_mode {:?}",
            event.properties.delivery_mode()
        ));
    }
    if property(event.properties.message_id()).as_deref() != body["idempotencyKey"].as_str() {
        wrong.push(format!(
            "{what}: message_id {:?}",
            event.properties.message_id()
        ));
    }
}

#[tokio::test]
async fn the_events_and_dead_letters_of_a_real_run_fit_the_asyncapi_schemas() {
    let doc = asyncapi();
    let mut app = spawn_app_with(&[("SMS__PROVIDER__CALLBACK_SECRET", SECRET)]).await;
    let ok = ResponseTemplate::new(200).set_body_json(json!({"id": "amqp-1"}));
    provider_answers(&app, "amqp-sent", ok).await;
    let rejected = ResponseTemplate::new(400).set_body_json(json!({"error": "number barred"}));
    provider_answers(&app, "amqp-rejected", rejected).await;

    let traced = FieldTable::from(BTreeMap::from([(
        "traceparent".into(),
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    )]));
    let properties = BasicProperties::default()
        .with_correlation_id("order-8812".into())
        .with_headers(traced);
    let sent_command = command("amqp-sent", "+254712345678", "hi");
    app.broker.publish_command(&sent_command, properties).await;
    let bodies: [&[u8]; 4] = [
        &command("amqp-rejected", "+254712345678", "hi"),
        br#"{"idempotencyKey":"amqp-bad-phone","phoneNumber":"0712345678","text":"hi"}"#,
        br#"{"idempotencyKey":"amqp-no-text","phoneNumber":"+254712345678"}"#,
        b"not json",
    ];
    for body in bodies {
        app.publish(body).await;
    }
    let mut wrong = Vec::new();
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    check_event(&doc, EventKind::Sent, &sent[0], &mut wrong);
    assert_eq!(
        headers_json(&sent[0].properties)["traceparent"]
            .as_str()
            .map(str::len),
        Some(55)
    );

    let failed = app.broker.failed(3, WAIT).await;
    let reasons: BTreeSet<String> = failed
        .iter()
        .map(|f| f.json()["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(
            [
                "provider_rejected",
                "invalid_phone_number",
                "invalid_command"
            ]
            .map(String::from)
        )
    );
    for event in &failed {
        check_event(&doc, EventKind::Failed, event, &mut wrong);
    }

    assert_eq!(
        post_signed_report(&app, "generic", "amqp-1", "undelivered", SECRET).await,
        204
    );
    let reports = app.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1);
    check_event(&doc, EventKind::Delivery, &reports[0], &mut wrong);

    let message = only_message(&doc, &defaults().amqp.dead_letter_queue);
    let (_, headers) = message_validators(&doc, message);
    let letters = app.broker.dead_letters(4, WAIT).await;
    assert_eq!(letters.len(), 4, "four dead letters");
    for letter in &letters {
        assert!(
            bodies.contains(&letter.body.as_slice()),
            "the body is kept byte for byte"
        );
        let values = headers_json(&letter.properties);
        wrong.extend(
            violations(&headers, &values)
                .iter()
                .map(|e| format!("dead letter {values}: {e}")),
        );
    }
    assert!(
        wrong.is_empty(),
        "messages that do not fit docs/asyncapi.yaml:\n{}",
        wrong.join("\n")
    );
    app.cleanup().await;
}
