//! The docker-compose stack as docker-compose.yml and config/compose.toml
//! define it, run on loopback (there is no Docker engine here): the two
//! fakes with their commands, the service with its environment and
//! settings file, only host names and ports swapped for loopback ones and
//! queue names for this test's. A command sent goes out through the
//! primary fake, and its delivery report comes back signed.

use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use crate::e2e::{assert_grpc_listens, free_port, service, wait_http, Proc, BIN};
use crate::helpers::{command, init_logs, Names, TestBroker};

const WAIT: Duration = Duration::from_secs(15);

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A service's command (a list) with its loopback substitutions.
fn command_of(compose: &Yaml, name: &str, swap: &dyn Fn(&str) -> String) -> Vec<String> {
    compose["services"][name]["command"]
        .as_vec()
        .unwrap_or_else(|| panic!("{name}: command is a list"))
        .iter()
        .map(|arg| swap(arg.as_str().expect("command arguments are strings")))
        .collect()
}

#[tokio::test]
async fn the_compose_stack_sends_and_reports_delivery() {
    init_logs();
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let compose = &YamlLoader::load_from_str(&text).unwrap()[0];
    let (fake_1, fake_2, http, grpc) = (free_port(), free_port(), free_port(), free_port());
    let swap = |value: &str| {
        value
            .replace("rabbitmq:5672", "127.0.0.1:5672")
            .replace("redis://redis:6379", "redis://127.0.0.1:6379")
            .replace(
                "http://sms-service:8080",
                &format!("http://127.0.0.1:{http}"),
            )
            .replace("0.0.0.0:8080", &format!("127.0.0.1:{http}"))
            .replace("0.0.0.0:50051", &format!("127.0.0.1:{grpc}"))
            // No collector: the service must not notice.
            .replace("http://jaeger:4318", "http://127.0.0.1:9")
            .replace(
                "http://fake-provider-2:9000",
                &format!("http://127.0.0.1:{fake_2}"),
            )
            .replace(
                "http://fake-provider:9000",
                &format!("http://127.0.0.1:{fake_1}"),
            )
    };
    let names = Names::unique();
    let mut env: Vec<(String, String)> = compose["services"]["sms-service"]["environment"]
        .as_hash()
        .expect("sms-service: environment is a map")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), swap(v.as_str().unwrap())))
        .collect();
    // This test's own queues, exchanges and keys.
    env.extend(names.env("http://unused:1").into_iter().filter(|(k, _)| {
        k.starts_with("SMS__AMQP__") && k != "SMS__AMQP__URL" || k == "SMS__REDIS__KEY_PREFIX"
    }));
    let mut broker = TestBroker::connect(&names).await;

    let settings = std::fs::read_to_string(root().join("config/compose.toml")).unwrap();
    let settings_file = std::env::temp_dir().join(format!(
        "compose-{}.toml",
        names.key_prefix.replace(':', "-")
    ));
    std::fs::write(&settings_file, swap(&settings)).unwrap();

    let mut fakes = Vec::new();
    for (name, port) in [("fake-provider", fake_1), ("fake-provider-2", fake_2)] {
        let args = command_of(compose, name, &|a: &str| {
            swap(a).replace("0.0.0.0:9000", &format!("127.0.0.1:{port}"))
        });
        fakes.push(Proc(
            service(&[], &args.iter().map(String::as_str).collect::<Vec<_>>())
                .spawn()
                .unwrap(),
        ));
        wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    }
    let args = command_of(compose, "sms-service", &|a: &str| {
        a.replace(
            "/etc/sms-service/compose.toml",
            settings_file.to_str().unwrap(),
        )
    });
    assert!(std::path::Path::new(BIN).exists());
    let _svc = Proc(
        service(&env, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .spawn()
            .unwrap(),
    );
    wait_http(&format!("http://127.0.0.1:{http}/readyz")).await;
    assert_grpc_listens(grpc).await;

    broker
        .publish_command(
            &command("compose-1", "+254712345678", "hello"),
            Default::default(),
        )
        .await;
    let sent = broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["provider"], "primary");
    let reports = broker.deliveries(1, WAIT).await;
    assert_eq!(
        reports.len(),
        1,
        "the fake's signed delivery report came back"
    );
    let report = reports[0].json();
    assert_eq!(report["idempotencyKey"], "compose-1");
    assert!(
        ["delivered", "undelivered"].contains(&report["status"].as_str().unwrap()),
        "{report}"
    );
    let _ = std::fs::remove_file(settings_file);
    broker.cleanup().await;
}
