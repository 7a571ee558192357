//! The service on a three-node RabbitMQ cluster with quorum queues, losing
//! the node that leads the command queue under load (SIGKILL of its beam).
//! Needs the cluster `scripts/rabbitmq-cluster start DIR` makes, so it runs
//! from `scripts/test-cluster` (which starts one and sets
//! `SMS_TEST_RABBITMQ_CLUSTER=DIR`); without that variable it says so and
//! passes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::e2e::stack;
use crate::helpers::{init_logs, Names, TestBroker};

/// The cluster's first AMQP port (`RABBITMQ_CLUSTER_PORT` of the script).
fn first_port() -> u16 {
    std::env::var("RABBITMQ_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5681)
}

fn node_url(n: usize) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        first_port() + n as u16 - 1
    )
}

/// `rabbitmqctl` against node `n` of the cluster in `dir`.
fn ctl(dir: &Path, n: usize, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
    let out = Command::new(script)
        .arg("ctl")
        .arg(dir)
        .arg(n.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node (1 to 3) leading quorum queue `queue`, asked of node `ask`.
fn leader(dir: &Path, ask: usize, queue: &str) -> usize {
    let listing = ctl(dir, ask, &["-q", "list_queues", "name", "leader"]);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} not listed: {listing}"));
    let node = line.split_whitespace().nth(1).unwrap_or_default();
    (1..=3)
        .find(|n| node == format!("smsc{n}@localhost"))
        .unwrap_or_else(|| panic!("no leader in {line:?}"))
}

async fn provider_accepted(stats: &serde_json::Value) -> u64 {
    stats["accepted"].as_u64().unwrap_or_default()
}

#[tokio::test]
async fn losing_the_node_that_leads_the_command_queue_under_load_loses_nothing_and_sends_no_key_twice(
) {
    let Some(dir) = std::env::var_os("SMS_TEST_RABBITMQ_CLUSTER").map(PathBuf::from) else {
        eprintln!("skipped: no cluster (run scripts/test-cluster)");
        return;
    };
    init_logs();
    let names = Names::unique();
    const IN_FLIGHT: u64 = 32;
    let urls = (1..=3).map(node_url).collect::<Vec<_>>().join(",");
    let stack = stack(
        &names,
        50,
        &[
            ("SMS__AMQP__URLS", &urls),
            ("SMS__AMQP__QUEUE_TYPE", "quorum"),
            ("SMS__AMQP__CONFIRM_TIMEOUT_MS", "5000"),
            ("SMS__AMQP__CONNECT_TIMEOUT_MS", "5000"),
            ("SMS__REDIS__LEASE_MS", "60000"),
            ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "1000"),
            ("SMS__PROCESSING__MAX_IN_FLIGHT", "32"),
            ("SMS__AMQP__PREFETCH", "32"),
        ],
    )
    .await;
    // The topology is declared: find who leads the command queue, and
    // watch the events from a node that will survive.
    let doomed = leader(&dir, 1, &names.command_queue);
    let watcher = (1..=3).find(|n| *n != doomed).unwrap();
    let mut broker = TestBroker::connect_at(&names, &node_url(watcher)).await;
    const N: usize = 1000;
    broker.publish_many("cluster-", N).await;
    let (_service, _base) = stack.start_instance().await;
    // Under load: some sent, most not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while provider_accepted(&stack.provider_stats().await).await < 50 {
        assert!(Instant::now() < deadline, "the service never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = provider_accepted(&stack.provider_stats().await).await;
    assert!(before < N as u64 / 2, "the kill lands mid-stream: {before}");
    let pid = std::fs::read_to_string(dir.join(format!("node{doomed}/pid"))).unwrap();
    let killed_at = Instant::now();
    let status = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success());
    eprintln!(
        "SIGKILLed smsc{doomed}@localhost (leader of the command queue) after {before} sends"
    );
    // Recovered: sends resume past what was in flight or prefetched at
    // the kill (32 each).
    let resumed_from = provider_accepted(&stack.provider_stats().await).await + 2 * IN_FLIGHT;
    let deadline = Instant::now() + Duration::from_secs(120);
    while provider_accepted(&stack.provider_stats().await).await < resumed_from {
        assert!(
            Instant::now() < deadline,
            "sends never resumed after the node loss"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = killed_at.elapsed();
    let new_leader = leader(&dir, watcher, &names.command_queue);
    assert_ne!(new_leader, doomed);

    // Every command has one outcome, SmsSent; a repeat of an event whose
    // confirm was lost with the node is allowed (consumers dedupe on
    // message_id), a second kind of outcome is not.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    while outcomes.len() < N && Instant::now() < deadline {
        for event in broker
            .sent(N - outcomes.len(), Duration::from_millis(500))
            .await
        {
            let key = event.json()["idempotencyKey"].as_str().unwrap().to_owned();
            *outcomes.entry(key).or_default() += 1;
        }
    }
    let drained = killed_at.elapsed();
    // Late repeats.
    for event in broker.sent(N, Duration::from_millis(1000)).await {
        let key = event.json()["idempotencyKey"].as_str().unwrap().to_owned();
        *outcomes.entry(key).or_default() += 1;
    }
    let failed = broker.failed(1, Duration::from_millis(300)).await;
    let stats = stack.provider_stats().await;
    let repeats: usize = outcomes.values().map(|n| n - 1).sum();
    eprintln!(
        "3-node cluster, quorum queues, leader smsc{doomed} SIGKILLed under load: {N} commands, \
         {} keys with SmsSent ({repeats} repeated events), provider {stats}; \
         sends resumed {:.1} s after the kill (new leader smsc{new_leader}), \
         last SmsSent {:.1} s after it",
        outcomes.len(),
        recovered.as_secs_f64(),
        drained.as_secs_f64()
    );
    assert_eq!(outcomes.len(), N, "every command ended in SmsSent");
    assert!(failed.is_empty(), "no command failed");
    assert_eq!(stats["distinctKeys"], N as u64);
    // The documented window: at most what was in flight when the node died.
    assert!(
        stats["duplicates"].as_u64().unwrap() <= IN_FLIGHT,
        "{stats}"
    );
    assert!(repeats as u64 <= IN_FLIGHT, "{repeats} repeated events");
    assert!(
        recovered < Duration::from_secs(60),
        "recovery took {recovered:?}"
    );
    broker.cleanup().await;
}
