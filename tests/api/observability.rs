//! The dashboard (deploy/grafana/sms-service.json), the alert rules
//! (deploy/prometheus/alerts.yml) and the compose profile that runs them
//! hold together, and name only metrics the service exports: a service
//! started in-process fails one command over from a provider instance
//! that is down to a wiremock one, takes a delivery report and refuses a
//! forged one, and its `/metrics` page then has every `sms_*` name the
//! dashboard and the rules use. `.ci/run` also runs `promtool` on the
//! rules when it can be installed; this test needs nothing but the repo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sms_service::app;
use sms_service::config::Settings;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yaml_rust2::{Yaml, YamlLoader};

use crate::e2e::free_port;
use crate::helpers::{command, init_logs, post_signed_report, Names, TestApp, TestBroker};

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "observability-s3cret";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn yaml(relative: &str) -> Yaml {
    YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"))
        .remove(0)
}

/// Every `sms_*` identifier in `text` (names of metrics, with their
/// `_bucket`, `_sum` or `_count` suffix if a query names one).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("sms_") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name.trim_end_matches('_').to_owned());
    }
    names
}

/// The metrics a Prometheus page declares (`# TYPE name kind`), by name.
fn exported(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The names in `used` that `page` does not export: neither a metric of
/// its own nor a series of one of its histograms.
fn missing(used: &BTreeSet<String>, page: &str) -> Vec<String> {
    let types = exported(page);
    let is = |name: &str| types.contains_key(name);
    let series_of_histogram = |name: &str| {
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| types.get(base).is_some_and(|k| k == "histogram"))
        })
    };
    used.iter()
        .filter(|name| !is(name) && !series_of_histogram(name))
        .cloned()
        .collect()
}

/// The names the dashboard and the alert rules use, each with the file
/// that names it.
fn names_used() -> BTreeMap<String, &'static str> {
    let mut used = BTreeMap::new();
    for file in [
        "deploy/grafana/sms-service.json",
        "deploy/prometheus/alerts.yml",
    ] {
        for name in metric_names(&read(file)) {
            used.entry(name).or_insert(file);
        }
    }
    used
}

#[test]
fn a_name_the_page_does_not_export_is_missing_and_histogram_series_are_not() {
    let page = "# TYPE sms_sent_total counter\nsms_sent_total 0\n\
                # TYPE sms_provider_request_duration_seconds histogram\n\
                sms_provider_request_duration_seconds_bucket{le=\"0.1\"} 1\n";
    let text = "sum(rate(sms_sent_total[5m])) + sms_no_such_metric \
                + rate(sms_provider_request_duration_seconds_bucket[5m]) + sms_sent_total_count \
                + my_sms_other";
    let used = metric_names(text);
    assert_eq!(
        used.iter().map(String::as_str).collect::<Vec<_>>(),
        [
            "sms_no_such_metric",
            "sms_provider_request_duration_seconds_bucket",
            "sms_sent_total",
            "sms_sent_total_count",
        ]
    );
    // A counter has no _count series; only a histogram's suffixes pass.
    assert_eq!(
        missing(&used, page),
        ["sms_no_such_metric", "sms_sent_total_count"]
    );
}

#[test]
fn the_dashboard_the_rules_and_the_compose_profile_hold_together() {
    // The dashboard: JSON, every panel on the Prometheus variable, every
    // query non-empty, panel ids unique.
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/sms-service.json"))
        .expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 39);
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(variable["name"], "DS_PROMETHEUS");
    assert_eq!(variable["query"], "prometheus");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            assert!(!target["expr"].as_str().unwrap().trim().is_empty());
            queries += 1;
        }
    }
    assert!(queries >= 15, "{queries} queries");

    // The rules: each alert has an expression, a severity and a summary.
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(rule["expr"].as_str().is_some(), "{name}: expr");
            assert!(
                ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}: severity"
            );
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
        }
    }
    for alert in [
        "SmsCircuitBreakerOpen",
        "SmsDeadLettersGrowing",
        "SmsDeliveryRatioLow",
        "SmsCommandsNotConsumed",
        "SmsServiceNotReady",
        "SmsServiceDown",
    ] {
        assert!(alerts.contains(alert), "{alert} missing: {alerts:?}");
    }

    // Prometheus loads the rules and scrapes the job the rules name.
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(prometheus["rule_files"][0].as_str(), Some("alerts.yml"));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"].as_str(), Some("sms-service"));
    assert!(read("deploy/prometheus/alerts.yml").contains("up{job=\"sms-service\"}"));
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some("sms-service:8080")
    );

    // Compose: the profile's services and nothing else carry a profile;
    // they publish on loopback and mount files that exist.
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_hash().unwrap();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let profiles = service["profiles"].as_vec();
        let observability = ["prometheus", "grafana", "jaeger"].contains(&name);
        if !observability {
            assert!(profiles.is_none(), "{name} must start without a profile");
            continue;
        }
        assert_eq!(
            profiles.map(|p| p.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>()),
            Some(vec!["observability"]),
            "{name}"
        );
        for port in service["ports"].as_vec().unwrap() {
            assert!(port.as_str().unwrap().starts_with("127.0.0.1:"), "{name}");
        }
        for volume in service["volumes"].as_vec().into_iter().flatten() {
            let host = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(root().join(host).exists(), "{name} mounts {host}");
        }
    }
    let grafana = &compose["services"]["grafana"];
    let provisioned = grafana["volumes"].as_vec().unwrap();
    for file in [
        "deploy/grafana/provisioning:",
        "deploy/grafana/sms-service.json:",
    ] {
        assert!(
            provisioned
                .iter()
                .any(|v| v.as_str().unwrap().starts_with(&format!("./{file}"))),
            "grafana mounts {file}"
        );
    }
}

/// A service whose route tries instance `a` (down) then `b` (wiremock,
/// accepting as `provider-id`, signing reports with [`SECRET`]).
async fn failing_over_app(provider_id: &str) -> TestApp {
    init_logs();
    let names = Names::unique();
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": provider_id})))
        .mount(&provider)
        .await;
    let broker = TestBroker::connect(&names).await;
    let file = std::env::temp_dir().join(format!(
        "sms-observability-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(
        &file,
        format!(
            r#"
[[routes]]
prefixes = ["+"]
providers = ["a", "b"]

[providers.a]
kind = "generic"
base_url = "http://127.0.0.1:{down}"

[providers.b]
kind = "generic"
base_url = "{b}"
"#,
            down = free_port(),
            b = provider.uri()
        ),
    )
    .unwrap();
    let mut env = names.env(&provider.uri());
    env.push(("SMS__PROVIDERS__B__CALLBACK_SECRET".into(), SECRET.into()));
    let source = sms_service::config::environment().source(Some(env.into_iter().collect()));
    let settings = Settings::load_from(Some(&file), source).expect("the settings are valid");
    let _ = std::fs::remove_file(&file);
    let running = app::start(settings).await.expect("the service starts");
    let test_app = TestApp {
        names,
        provider,
        base_url: format!("http://{}", running.http_addr),
        app: Some(running),
        http: reqwest::Client::new(),
        broker,
    };
    test_app.wait_ready().await;
    test_app
}

/// Posts a generic delivery report to instance `b`, signed with `secret`.
async fn report(app: &TestApp, id: &str, secret: &str) -> u16 {
    post_signed_report(app, "b", id, "delivered", secret).await
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_one_the_service_exports() {
    let used = names_used();
    // The scan finds the names (a broken scan would find none, and pass).
    for name in [
        "sms_sent_total",
        "sms_provider_request_duration_seconds_bucket",
        "sms_circuit_state",
        "sms_ready",
    ] {
        assert!(used.contains_key(name), "{name} not found in {used:?}");
    }

    let mut app = failing_over_app("obs-1").await;
    app.publish(&command("obs-key", "+254712345678", "hello"))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "the command was sent");
    assert_eq!(sent[0].json()["provider"], "b", "after failing over from a");
    assert_eq!(report(&app, "obs-1", SECRET).await, 204);
    assert_eq!(report(&app, "obs-1", "forged").await, 401);

    // The queue gauges come with their first reading, every 5 s.
    let names: BTreeSet<String> = used.keys().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = app.metrics_text().await;
        let absent = missing(&names, &page);
        if absent.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let absent: Vec<String> = absent
                .iter()
                .map(|name| format!("{name} (in {})", used[name]))
                .collect();
            panic!(
                "named but not exported by the service: {absent:?}\n\
                 (the names it exports: telemetry::METRICS)\n{page}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    app.cleanup().await;
}
