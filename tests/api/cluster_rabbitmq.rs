//! The service on a three-node RabbitMQ cluster with quorum queues: losing
//! the node that leads the command queue under load (SIGKILL of its beam),
//! with the service connected to that node and with it connected to
//! another one; and the README's steps for changing `amqp.queue_type`
//! (classic queues on one virtual host, shovelled into quorum queues on
//! another). Needs the cluster `scripts/rabbitmq-cluster start DIR` makes,
//! so it runs from `scripts/test-cluster` (which starts one and sets
//! `SMS_TEST_RABBITMQ_CLUSTER=DIR`); without that variable it says so and
//! passes. Each test finds the cluster whole and leaves it whole (a killed
//! node is started again), so they run in any order, one at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use crate::e2e::{stack, terminate, wait_exit};
use crate::helpers::{command, init_logs, Names, TestBroker};

/// The cluster's first AMQP port (`RABBITMQ_CLUSTER_PORT` of the script).
fn first_port() -> u16 {
    std::env::var("RABBITMQ_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5681)
}

fn node_port(n: usize) -> u16 {
    first_port() + n as u16 - 1
}

fn node_url(n: usize) -> String {
    vhost_url(n, "%2f")
}

/// Node `n`'s URL on virtual host `vhost` (percent-encoded).
fn vhost_url(n: usize, vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", node_port(n))
}

/// The cluster of `scripts/rabbitmq-cluster start DIR`.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// The cluster of `SMS_TEST_RABBITMQ_CLUSTER`, made whole: a node an
    /// earlier test killed is started again.
    fn whole() -> Option<Self> {
        let dir = std::env::var_os("SMS_TEST_RABBITMQ_CLUSTER").map(PathBuf::from)?;
        let cluster = Self { dir };
        cluster.heal();
        Some(cluster)
    }

    /// `scripts/rabbitmq-cluster VERB DIR ARGS...`; its output.
    fn script(&self, verb: &str, args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
        let out = Command::new(script)
            .arg(verb)
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmq-cluster {verb} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rabbitmqctl` against node `n`.
    fn ctl(&self, n: usize, args: &[&str]) -> String {
        let mut all = vec![n.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.script("ctl", &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `rabbitmq-plugins` against node `n`.
    fn plugins(&self, n: usize, args: &[&str]) -> String {
        let mut all = vec![n.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.script(
            "plugins",
            &all.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// Every node running and in the cluster (`restart` leaves a running
    /// node alone).
    fn heal(&self) {
        for n in 1..=3 {
            self.script("restart", &[&n.to_string()]);
        }
    }

    /// SIGKILLs node `n`'s beam.
    fn kill(&self, n: usize) {
        let pid = std::fs::read_to_string(self.dir.join(format!("node{n}/pid"))).unwrap();
        let status = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The node (1 to 3) leading quorum queue `queue` of `/`, asked of
    /// node `ask`.
    fn leader(&self, ask: usize, queue: &str) -> usize {
        let listing = self.ctl(ask, &["-q", "list_queues", "name", "leader"]);
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .unwrap_or_else(|| panic!("{queue} not listed: {listing}"));
        let node = line.split_whitespace().nth(1).unwrap_or_default();
        (1..=3)
            .find(|n| node == format!("smsc{n}@localhost"))
            .unwrap_or_else(|| panic!("no leader in {line:?}"))
    }

    /// The server ports of the client connections, asked of node `ask`.
    fn connected_ports(&self, ask: usize) -> Vec<u16> {
        // A connection's name is "client -> server" (host:port each).
        self.ctl(ask, &["-q", "list_connections", "name"])
            .lines()
            .filter_map(|l| l.rsplit(':').next()?.trim().parse().ok())
            .collect()
    }
}

/// Starts the nodes a test killed, however the test ends.
struct Heal<'a>(&'a Cluster);

impl Drop for Heal<'_> {
    fn drop(&mut self) {
        self.0.heal();
    }
}

async fn provider_accepted(stats: &serde_json::Value) -> u64 {
    stats["accepted"].as_u64().unwrap_or_default()
}

#[tokio::test]
async fn losing_the_node_that_leads_the_command_queue_under_load_loses_nothing_and_sends_no_key_twice(
) {
    let Some(cluster) = Cluster::whole() else {
        eprintln!("skipped: no cluster (run scripts/test-cluster)");
        return;
    };
    leader_killed_under_load(&cluster, Connected::ToTheLeader).await;
}

#[tokio::test]
async fn losing_the_command_queue_leader_while_connected_to_another_node_loses_nothing_and_sends_no_key_twice(
) {
    let Some(cluster) = Cluster::whole() else {
        eprintln!("skipped: no cluster (run scripts/test-cluster)");
        return;
    };
    leader_killed_under_load(&cluster, Connected::Elsewhere).await;
}

/// Where the service is connected when the leader dies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Connected {
    /// To the node leading the command queue: it loses its connection.
    ToTheLeader,
    /// To another node: its connection stays, the queue's leader moves.
    Elsewhere,
}

/// 1,000 commands through the fake provider (50 ms), the node leading the
/// command queue SIGKILLed once 50 are sent: every command ends in one
/// `SmsSent`, no key is sent twice, and sends resume within a minute.
async fn leader_killed_under_load(cluster: &Cluster, connected: Connected) {
    let _heal = Heal(cluster);
    init_logs();
    let names = Names::unique();
    const IN_FLIGHT: u64 = 16;
    // Declared through node 1 alone: a quorum queue's leader is placed on
    // the node of the connection that declares it (`x-queue-leader-locator`
    // defaults to `client-local`,
    // https://www.rabbitmq.com/docs/3.13/quorum-queues#leader-placement);
    // asked below rather than assumed.
    let mut stack = stack(
        &names,
        50,
        &[
            ("SMS__AMQP__URLS", &node_url(1)),
            ("SMS__AMQP__QUEUE_TYPE", "quorum"),
            ("SMS__AMQP__CONFIRM_TIMEOUT_MS", "5000"),
            ("SMS__AMQP__CONNECT_TIMEOUT_MS", "5000"),
            ("SMS__REDIS__LEASE_MS", "60000"),
            ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "1000"),
            ("SMS__PROCESSING__MAX_IN_FLIGHT", "16"),
            ("SMS__AMQP__PREFETCH", "16"),
        ],
    )
    .await;
    let doomed = cluster.leader(1, &names.command_queue);
    let others: Vec<usize> = (1..=3).filter(|n| *n != doomed).collect();
    // The service's nodes: the leader first (the others to fail over to),
    // or only the others.
    let nodes: Vec<usize> = match connected {
        Connected::ToTheLeader => std::iter::once(doomed).chain(others.clone()).collect(),
        Connected::Elsewhere => others.clone(),
    };
    let urls = nodes
        .iter()
        .map(|n| node_url(*n))
        .collect::<Vec<_>>()
        .join(",");
    stack.env.retain(|(k, _)| k != "SMS__AMQP__URLS");
    stack.env.push(("SMS__AMQP__URLS".into(), urls));
    // Events are watched from a node that survives.
    let watcher = others[0];
    let mut broker = TestBroker::connect_at(&names, &node_url(watcher)).await;
    const N: usize = 1000;
    broker.publish_many("cluster-", N).await;
    let (_service, _base) = stack.start_instance().await;
    let on_doomed = cluster
        .connected_ports(watcher)
        .contains(&node_port(doomed));
    assert_eq!(
        on_doomed,
        connected == Connected::ToTheLeader,
        "a connection to smsc{doomed}: {:?}",
        cluster.connected_ports(watcher)
    );
    // Under load: some sent, most not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while provider_accepted(&stack.provider_stats().await).await < 50 {
        assert!(Instant::now() < deadline, "the service never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = provider_accepted(&stack.provider_stats().await).await;
    assert!(before < N as u64 / 2, "the kill lands mid-stream: {before}");
    let killed_at = Instant::now();
    cluster.kill(doomed);
    eprintln!(
        "SIGKILLed smsc{doomed}@localhost (leader of the command queue, service {connected:?}) after {before} sends"
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
    let new_leader = cluster.leader(watcher, &names.command_queue);
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
        "3-node cluster, quorum queues, leader smsc{doomed} SIGKILLed under load, service \
         connected {connected:?} (smsc{}): {N} commands, {} keys with SmsSent ({repeats} \
         repeated events), provider {stats}; sends resumed {:.1} s after the kill (new leader \
         smsc{new_leader}), last SmsSent {:.1} s after it",
        nodes[0],
        outcomes.len(),
        recovered.as_secs_f64(),
        drained.as_secs_f64()
    );
    assert_eq!(outcomes.len(), N, "every command ended in SmsSent");
    assert!(failed.is_empty(), "no command failed");
    assert_eq!(stats["distinctKeys"], N as u64);
    if connected == Connected::Elsewhere {
        // Its connection and channels live on: no delivery is given to
        // another consumer, no confirm is lost.
        assert_eq!(stats["duplicates"], 0, "{stats}");
        assert_eq!(repeats, 0, "exactly one SmsSent per command");
    }
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

/// The README's "Changing amqp.queue_type", step by step: classic queues
/// on one virtual host with commands waiting in them (the command and high
/// queues, a dead letter, a command held in a hold queue), the service
/// stopped there and started on a new virtual host with quorum queues, the
/// shovels set as the README says; every command gets exactly one
/// `SmsSent` there, the dead letter arrives in the new dead-letter queue,
/// and once the old queues are empty the shovels and the old virtual host
/// go.
#[tokio::test]
async fn the_readme_steps_for_changing_amqp_queue_type_move_every_command_to_quorum_queues_on_a_new_vhost(
) {
    let Some(cluster) = Cluster::whole() else {
        eprintln!("skipped: no cluster (run scripts/test-cluster)");
        return;
    };
    init_logs();
    let names = Names::unique();
    let id = names.command_queue.split('.').nth(1).unwrap().to_owned();
    let (old, new) = (format!("sms-c-{id}"), format!("sms-q-{id}"));
    // The old installation: classic queues on a virtual host of its own
    // (the README's "/"), which this test may delete.
    cluster.ctl(1, &["-q", "add_vhost", &old]);
    cluster.ctl(
        1,
        &[
            "-q",
            "set_permissions",
            "-p",
            &old,
            "guest",
            ".*",
            ".*",
            ".*",
        ],
    );
    let mut stack = stack(
        &names,
        20,
        &[
            ("SMS__AMQP__URLS", &vhost_url(1, &old)),
            ("SMS__AMQP__QUEUE_TYPE", "classic"),
        ],
    )
    .await;
    let mut old_broker = TestBroker::connect_at(&names, &vhost_url(1, &old)).await;
    let (mut old_service, _) = stack.start_instance().await;
    // While the old service runs: a command it holds until its sendAt, and
    // one it dead-letters.
    // Far enough ahead that it is still held when the shovels start.
    let due = crate::schedule::in_seconds(20);
    old_broker
        .publish_command(
            &crate::schedule::scheduled("mig-held", due),
            Default::default(),
        )
        .await;
    old_broker
        .publish_command(&command("mig-bad", "+12", "x"), Default::default())
        .await;
    let holds = crate::helpers::hold_queues(&names.command_queue);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut held = 0;
        for queue in &holds {
            held += old_broker.waiting_in(queue).await;
        }
        let dead = old_broker.waiting_in(&names.dead_letter_queue).await;
        if held == 1 && dead == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old service never held and dead-lettered: {held} held, {dead} dead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&old_service.0);
    assert_eq!(
        wait_exit(&mut old_service.0, Duration::from_secs(10)).await,
        Some(0)
    );
    // The service stopped, commands keep coming into the old queues.
    const N: usize = 300;
    const HIGH: usize = 30;
    old_broker.publish_many("mig-", N).await;
    for i in 0..HIGH {
        old_broker
            .publish_high(&command(&format!("mig-high-{i}"), "+254712345678", "hi"))
            .await;
    }

    // 1. The new virtual host.
    cluster.ctl(1, &["-q", "add_vhost", &new]);
    cluster.ctl(
        1,
        &[
            "-q",
            "set_permissions",
            "-p",
            &new,
            "guest",
            ".*",
            ".*",
            ".*",
        ],
    );
    // 2. The new instance on it, quorum queues; the event consumers bound
    // to its exchanges.
    let mut broker = TestBroker::connect_at(&names, &vhost_url(2, &new)).await;
    stack
        .env
        .retain(|(k, _)| k != "SMS__AMQP__URLS" && k != "SMS__AMQP__QUEUE_TYPE");
    let urls = [2, 3, 1].map(|n| vhost_url(n, &new)).join(",");
    stack.env.push(("SMS__AMQP__URLS".into(), urls));
    stack
        .env
        .push(("SMS__AMQP__QUEUE_TYPE".into(), "quorum".into()));
    let (_service, _) = stack.start_instance().await;
    // 3. The shovel plugin, and a shovel per old command, high and
    // dead-letter queue into the new one.
    for n in 1..=3 {
        cluster.plugins(n, &["-q", "enable", "rabbitmq_shovel"]);
    }
    let shovelled = [
        names.command_queue.clone(),
        names.high_queue(),
        names.dead_letter_queue.clone(),
    ];
    let migrating = Instant::now();
    for (i, queue) in shovelled.iter().enumerate() {
        let definition = serde_json::json!({
            "src-uri": format!("amqp:///{old}"),
            "src-queue": queue,
            "dest-uri": format!("amqp:///{new}"),
            "dest-queue": queue,
        });
        cluster.ctl(
            1,
            &[
                "-q",
                "set_parameter",
                "-p",
                &old,
                "shovel",
                &format!("sms-{i}"),
                &definition.to_string(),
            ],
        );
    }
    // Producers not moved yet: their commands follow over the shovel.
    const LATE: usize = 20;
    old_broker.publish_many("mig-late-", LATE).await;
    // 4. The producers on the new virtual host.
    broker.publish_many("mig-new-", LATE).await;
    // The held command, back from its old hold queue, came over and is
    // held again in the new hold queues.
    loop {
        let mut held = 0;
        for queue in &holds {
            held += broker.waiting_in(queue).await;
        }
        if held == 1 {
            break;
        }
        assert!(
            SystemTime::now() < due,
            "mig-held was never held in the new hold queues"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let all = N + HIGH + 2 * LATE + 1;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut held_sent_at = None;
    while outcomes.len() < all && Instant::now() < deadline {
        for event in broker
            .sent(all - outcomes.len(), Duration::from_millis(500))
            .await
        {
            let key = event.json()["idempotencyKey"].as_str().unwrap().to_owned();
            if key == "mig-held" {
                held_sent_at = Some(SystemTime::now());
            }
            *outcomes.entry(key).or_default() += 1;
        }
    }
    let moved = migrating.elapsed();
    for event in broker.sent(all, Duration::from_millis(1000)).await {
        let key = event.json()["idempotencyKey"].as_str().unwrap().to_owned();
        *outcomes.entry(key).or_default() += 1;
    }
    let repeats: usize = outcomes.values().map(|n| n - 1).sum();
    let stats = stack.provider_stats().await;
    let dead_letters = broker.dead_letters(1, Duration::from_secs(10)).await;
    eprintln!(
        "classic on {old} to quorum on {new} over shovels: {all} commands, {} keys with \
         SmsSent ({repeats} repeated) {:.1} s after the shovels were set, provider {stats}",
        outcomes.len(),
        moved.as_secs_f64()
    );
    assert_eq!(outcomes.len(), all, "every command ended in SmsSent");
    assert_eq!(repeats, 0, "exactly one SmsSent per command");
    // Out of the old hold queue into the old command queue, over the
    // shovel, and not sent before its sendAt.
    assert!(
        held_sent_at.is_some_and(|at| at >= due),
        "mig-held sent at its sendAt"
    );
    assert_eq!(stats["distinctKeys"], all as u64, "{stats}");
    assert_eq!(stats["duplicates"], 0, "{stats}");
    assert!(
        broker
            .failed(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "no command failed on the new virtual host"
    );
    assert_eq!(dead_letters.len(), 1, "the dead letter moved over");
    assert!(
        old_broker
            .sent(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing was sent by the old instance"
    );

    // 5. Every old queue empty: the shovels and the old virtual host go.
    for queue in shovelled.iter().chain(&holds) {
        assert_eq!(old_broker.waiting_in(queue).await, 0, "{queue} is empty");
    }
    for i in 0..shovelled.len() {
        cluster.ctl(
            1,
            &[
                "-q",
                "clear_parameter",
                "-p",
                &old,
                "shovel",
                &format!("sms-{i}"),
            ],
        );
    }
    old_broker.cleanup().await;
    cluster.ctl(1, &["-q", "delete_vhost", &old]);
    broker.cleanup().await;
    cluster.ctl(1, &["-q", "delete_vhost", &new]);
}
