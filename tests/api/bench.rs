//! The bench's own machinery on the real broker and Redis with the fake
//! provider: the minimal pipeline (`--baseline minimal`), `--duration`, and
//! the CPU figures. Smoke runs with small N: no thresholds on speed, which
//! the bench's reports give, not timed tests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use sms_service::bench::minimal::Minimal;
use sms_service::config::ProviderKind;
use sms_service::fake_provider::{self, FakeSettings};
use tokio_util::sync::CancellationToken;

use crate::helpers::{command, redis_connection, settings, Names, TestBroker, AMQP_URL};
use crate::ops::run_binary;

/// A generic fake provider on a free loopback port: its URL and its stop.
async fn fake_provider() -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let settings = FakeSettings {
        kind: ProviderKind::Generic,
        ..FakeSettings::default()
    };
    tokio::spawn(fake_provider::serve(listener, settings, stop.clone()));
    (url, stop)
}

async fn provider_stats(url: &str) -> Value {
    reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn keys_under(prefix: &str) -> Vec<String> {
    let mut redis = redis_connection().await;
    let mut cursor: u64 = 0;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .unwrap();
        all.extend(keys);
        if next == 0 {
            return all;
        }
        cursor = next;
    }
}

#[tokio::test]
async fn the_minimal_pipeline_sends_each_key_once_publishes_its_event_and_cleans_up() {
    let (provider, stop) = fake_provider().await;
    let names = Names::unique();
    let settings = settings(&names.env(&provider));
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let pipeline = Minimal::start(&connection, &run_id, &settings)
        .await
        .unwrap();
    let (queue, exchange, prefix) = (
        pipeline.queue.clone(),
        pipeline.exchange.clone(),
        pipeline.key_prefix.clone(),
    );

    // Subscribe to its events, then publish 40 keys, 10 of them twice.
    let events = connection.create_channel().await.unwrap();
    let private = events
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    events
        .queue_bind(
            private.name().clone(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = events
        .basic_consume(
            private.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let key = |i: usize| format!("min-{run_id}-{i}");
    for i in (0..40).chain(0..10) {
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &command(&key(i), "+254712345678", "hello"),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 40 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(
            delivery.properties.kind().as_ref().map(|k| k.as_str()),
            Some("SmsSent")
        );
        assert!(!event["providerMessageId"].as_str().unwrap().is_empty());
        assert!(seen.insert(event["idempotencyKey"].as_str().unwrap().to_owned()));
    }
    // The duplicates were published last: once their acks are in, nothing
    // more can come. Give them a moment, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = provider_stats(&provider).await;
    assert_eq!(stats["accepted"], 40, "{stats}");
    assert_eq!(stats["distinctKeys"], 40, "{stats}");

    // One record per key, marked sent, under its own prefix.
    let records = keys_under(&prefix).await;
    assert_eq!(records.len(), 40, "{records:?}");
    let mut redis = redis_connection().await;
    let one: String = redis::cmd("GET")
        .arg(format!("{prefix}:msg:{}", key(3)))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(one.starts_with("sent:"), "{one}");

    let stopped = pipeline.stop(&connection).await;
    assert_eq!(
        (stopped.sent, stopped.duplicates, stopped.errors),
        (40, 10, 0)
    );
    assert_eq!(stopped.keys_deleted, 40);
    assert!(keys_under(&prefix).await.is_empty());
    // Its queue is gone: a passive declare fails.
    let check = connection.create_channel().await.unwrap();
    let gone = check
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "{queue} still exists");
    let _ = connection.close(200, "done".into()).await;
    stop.cancel();
}

/// `sms-service ARGS` with `env` (a bench with `--json`): its one JSON
/// report, once it has exited successfully within 20 s.
async fn bench_json(env: Vec<(String, String)>, args: &[&str]) -> Value {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&env, &args)
    })
    .await
    .unwrap()
    .expect("the bench finishes within 20 s");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `bench --rate R --duration S --baseline minimal` from the command line:
/// R x S commands, both runs' percentiles up to p99.9, the ratio to the
/// minimal pipeline, and CPU per message for the processes it sees (the
/// service runs inside this test process, named by `--service-pid`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_a_duration_publishes_rate_times_seconds_and_reports_the_tail_and_cpu() {
    let (provider, stop) = fake_provider().await;
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let env = names.env(&provider);
    let app = sms_service::app::start(settings(&env)).await.unwrap();
    let ready = format!("http://{}/readyz", app.http_addr);
    for _ in 0..100 {
        if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = std::process::id().to_string();
    let report = bench_json(
        env,
        &[
            "bench",
            "--rate",
            "200",
            "--duration",
            "1",
            "--baseline",
            "minimal",
            "--service-pid",
            &pid,
            "--json",
        ],
    )
    .await;
    assert!(report["baseline"].is_null(), "no relay asked for: {report}");
    for run in ["minimal", "service"] {
        let r = &report[run];
        assert_eq!(r["commands"], 200, "{run}: {r}");
        assert_eq!(r["distinct_keys"], 200, "{run}: {r}");
        let p = |name: &str| r[name].as_f64().unwrap();
        assert!(p("latency_ms_p50") > 0.0, "{run}: {r}");
        assert!(p("latency_ms_p50") <= p("latency_ms_p95"), "{run}: {r}");
        assert!(p("latency_ms_p95") <= p("latency_ms_p99"), "{run}: {r}");
        assert!(p("latency_ms_p99") <= p("latency_ms_p999"), "{run}: {r}");
        assert!(p("latency_ms_p999") <= p("latency_ms_max"), "{run}: {r}");
        // Steady 200/s for one second: about a second of publishing.
        assert!(p("publish_rate_per_s") < 400.0, "{run}: {r}");
        let cpu: Vec<&str> = r["cpu"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["process"].as_str().unwrap())
            .collect();
        assert!(cpu.contains(&"bench"), "{run}: {cpu:?}");
        assert_eq!(cpu.contains(&"service"), run == "service", "{run}: {cpu:?}");
    }
    assert!(report["ratio_minimal"].as_f64().unwrap() > 0.0, "{report}");
    // 200 through the minimal pipeline and 200 through the service.
    let stats = provider_stats(&provider).await;
    assert_eq!(stats["accepted"], 400, "{stats}");
    app.stop().await;
    broker.cleanup().await;
    crate::helpers::delete_redis_keys(&names.key_prefix).await;
    stop.cancel();
}

/// `bench --compare A --compare B --pairs 1`: each build's service started
/// in turn on scratch names with a fake provider of its own, measured,
/// stopped, and its names deleted.
#[tokio::test]
async fn compare_runs_each_build_in_turn_on_scratch_names_and_leaves_nothing_behind() {
    let names = Names::unique();
    // Only the broker and Redis of these settings are used: every run
    // starts its own fake provider and service.
    let env = names.env("http://127.0.0.1:9");
    let bin = env!("CARGO_BIN_EXE_sms-service");
    let report = bench_json(
        env,
        &[
            "bench",
            "--compare",
            bin,
            "--compare",
            bin,
            "--pairs",
            "1",
            "-n",
            "200",
            "--baseline",
            "minimal",
            "--json",
        ],
    )
    .await;
    let runs = report["runs"].as_array().unwrap();
    let builds: Vec<&str> = runs.iter().map(|r| r["build"].as_str().unwrap()).collect();
    assert_eq!(builds, ["A", "B"]);
    for run in runs {
        let service = &run["report"]["service"];
        assert_eq!(service["distinct_keys"], 200, "{run}");
        assert!(run["report"]["ratio_minimal"].as_f64().unwrap() > 0.0);
        // Its own service, named to the CPU reading.
        let cpu = service["cpu"].as_array().unwrap();
        let svc = cpu
            .iter()
            .find(|c| c["process"] == "service")
            .expect("service CPU");
        assert_eq!(svc["processes"], 1, "{cpu:?}");
    }
    assert!(report["ratio_b_to_a"].as_f64().unwrap() > 0.0, "{report}");
    // Nothing left: no scratch queue, no scratch key.
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    for run in runs {
        let id = run["scratch_id"].as_str().unwrap();
        assert!(keys_under(&format!("bench-{id}")).await.is_empty(), "{id}");
        for queue in ["sms.send", "sms.send.dead", "sms.send.high"] {
            let channel = connection.create_channel().await.unwrap();
            let found = channel
                .queue_declare(
                    format!("bench.{id}.{queue}").as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            assert!(found.is_err(), "bench.{id}.{queue} left behind");
        }
    }
    let _ = connection.close(200, "done".into()).await;
}
