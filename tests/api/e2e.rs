//! End to end: the real binary, the real fake provider (another run of the
//! binary), real RabbitMQ and Redis, driven from outside through plain AMQP,
//! the CLI and HTTP.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sms_service::adapters::rabbitmq::RabbitMq;
use sms_service::ports::QueueClient;

use crate::helpers::{command, init_logs, Names, TestBroker};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sms-service");

/// A child process killed when the test ends, however it ends.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn service(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    if std::env::var_os("TEST_LOG").is_none() {
        cmd.stderr(Stdio::null());
    }
    cmd
}

pub(crate) async fn wait_http(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..150 {
        if let Ok(r) = client.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered 200");
}

/// Asserts that the gRPC door accepts connections on `port`.
pub(crate) async fn assert_grpc_listens(port: u16) {
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok(),
        "the gRPC door listens on SMS__GRPC__BIND"
    );
}

pub(crate) fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) async fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn the_binary_sends_valid_commands_once_and_dead_letters_the_rest() {
    init_logs();
    let names = Names::unique();
    let provider_port = free_port();
    let http_port = free_port();
    let provider_url = format!("http://127.0.0.1:{provider_port}");
    let mut env = names.env(&provider_url);
    env.push(("SMS__HTTP__BIND".into(), format!("127.0.0.1:{http_port}")));
    let mut broker = TestBroker::connect(&names).await;

    let _fake = Proc(
        service(
            &env,
            &[
                "fake-provider",
                "--bind",
                &format!("127.0.0.1:{provider_port}"),
            ],
        )
        .spawn()
        .unwrap(),
    );
    wait_http(&format!("{provider_url}/healthz")).await;
    let mut svc = Proc(service(&env, &["run"]).spawn().unwrap());
    let base = format!("http://127.0.0.1:{http_port}");
    wait_http(&format!("{base}/readyz")).await;

    // The CLI publishes one command and prints its key.
    let out: Output = service(
        &env,
        &[
            "send",
            "--to",
            "+254712345678",
            "--text",
            "From the CLI",
            "--sender",
            "MKOPA",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(cli_key.len(), 36, "a UUID key: {cli_key}");

    for i in 0..20 {
        let body = command(
            &format!("e2e-{i}"),
            "+254712345678",
            "Payment received. Thank you!",
        );
        broker.publish_command(&body, Default::default()).await;
        if i % 4 == 0 {
            broker.publish_command(&body, Default::default()).await;
        }
    }
    broker
        .publish_command(&command("e2e-bad-1", "+12", "x"), Default::default())
        .await;
    broker
        .publish_command(
            &command("e2e-bad-2", "+254712345678", "   "),
            Default::default(),
        )
        .await;
    broker
        .publish_command(b"{not json", Default::default())
        .await;

    let sent = broker.sent(21, Duration::from_secs(20)).await;
    assert_eq!(sent.len(), 21);
    let mut keys: Vec<String> = sent
        .iter()
        .map(|e| e.json()["idempotencyKey"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 21, "one SmsSent per key");
    assert!(keys.contains(&cli_key));
    let failed = broker.failed(2, Duration::from_secs(10)).await;
    let mut reasons: Vec<String> = failed
        .iter()
        .map(|e| e.json()["reason"].as_str().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_command", "invalid_phone_number"]);
    assert_eq!(
        broker.dead_letters(3, Duration::from_secs(10)).await.len(),
        3
    );
    assert!(
        broker.sent(1, Duration::from_millis(500)).await.is_empty(),
        "no SmsSent for duplicates"
    );

    let stats: serde_json::Value = reqwest::get(format!("{provider_url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted"], 21, "{stats}");
    assert_eq!(stats["duplicates"], 0, "{stats}");

    let status: serde_json::Value = reqwest::get(format!("{base}/v1/messages/{cli_key}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "sent");

    terminate(&svc.0);
    assert_eq!(
        wait_exit(&mut svc.0, Duration::from_secs(10)).await,
        Some(0),
        "exit 0 on SIGTERM"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_bad_configuration_exits_2_naming_the_key() {
    let names = Names::unique();
    let mut env = names.env("http://127.0.0.1:9");
    env.push(("SMS__AMQP__URL".into(), "definitely not a url".into()));
    let out = service(&env, &["run"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("amqp.url"), "{stderr}");
}

/// The fake provider and a service binary on fresh ports, for the crash tests.
pub(crate) struct Stack {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) provider_url: String,
    base: String,
    _fake: Proc,
}

pub(crate) async fn stack(names: &Names, latency_ms: u64, extra: &[(&str, &str)]) -> Stack {
    let provider_port = free_port();
    let provider_url = format!("http://127.0.0.1:{provider_port}");
    let http_port = free_port();
    let mut env = names.env(&provider_url);
    env.push(("SMS__HTTP__BIND".into(), format!("127.0.0.1:{http_port}")));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // Declare the topology first, so commands published before the service
    // starts wait in their queue.
    let settings = crate::helpers::settings(&env);
    let adapter = RabbitMq::new(&settings.amqp, &settings.retry_tiers());
    adapter.connect().await.unwrap();
    adapter.close().await;
    let fake = Proc(
        service(
            &env,
            &[
                "fake-provider",
                "--bind",
                &format!("127.0.0.1:{provider_port}"),
                "--latency-ms",
                &latency_ms.to_string(),
            ],
        )
        .spawn()
        .unwrap(),
    );
    wait_http(&format!("{provider_url}/healthz")).await;
    Stack {
        env,
        provider_url,
        base: format!("http://127.0.0.1:{http_port}"),
        _fake: fake,
    }
}

impl Stack {
    pub(crate) async fn start_service(&self) -> Proc {
        let svc = Proc(service(&self.env, &["run"]).spawn().unwrap());
        wait_http(&format!("{}/readyz", self.base)).await;
        svc
    }

    /// Another instance beside the first, on an HTTP port of its own: the
    /// process and its HTTP base URL, once it is ready.
    pub(crate) async fn start_instance(&self) -> (Proc, String) {
        let base = format!("http://127.0.0.1:{}", free_port());
        let mut env = self.env.clone();
        env.retain(|(k, _)| k != "SMS__HTTP__BIND");
        env.push(("SMS__HTTP__BIND".into(), base["http://".len()..].to_owned()));
        let svc = Proc(service(&env, &["run"]).spawn().unwrap());
        wait_http(&format!("{base}/readyz")).await;
        (svc, base)
    }

    pub(crate) async fn provider_stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/stats", self.provider_url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

pub(crate) async fn distinct_sent(
    broker: &mut TestBroker,
    n: usize,
    within: Duration,
) -> (usize, usize) {
    let deadline = Instant::now() + within;
    let mut keys = std::collections::HashSet::new();
    let mut events = 0;
    while keys.len() < n && Instant::now() < deadline {
        for event in broker
            .sent(n - keys.len(), Duration::from_millis(500))
            .await
        {
            events += 1;
            keys.insert(event.json()["idempotencyKey"].as_str().unwrap().to_owned());
        }
    }
    (keys.len(), events)
}

#[tokio::test]
async fn killed_twice_with_sigkill_under_load_the_service_loses_no_command_and_recovers_in_seconds()
{
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    // The production lease: a dead holder's keys are taken over once its
    // liveness record (5 s) is gone, not after the lease.
    let stack = stack(
        &names,
        50,
        &[
            ("SMS__REDIS__LEASE_MS", "60000"),
            ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "1000"),
            ("SMS__PROCESSING__MAX_IN_FLIGHT", "32"),
            ("SMS__AMQP__PREFETCH", "32"),
        ],
    )
    .await;
    const N: usize = 1500;
    broker.publish_many("kill-", N).await;
    for round in 0..2 {
        let mut svc = stack.start_service().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        svc.0.kill().unwrap(); // SIGKILL
        svc.0.wait().unwrap();
        eprintln!(
            "killed in round {round}: provider so far {}",
            stack.provider_stats().await
        );
    }
    let last_kill = Instant::now();
    let _svc = stack.start_service().await;
    let (keys, events) = distinct_sent(&mut broker, N, Duration::from_secs(90)).await;
    let recovered = last_kill.elapsed();
    assert_eq!(keys, N, "every command ended in SmsSent");
    let stats = stack.provider_stats().await;
    eprintln!(
        "SIGKILL x2 under load: {N} commands, {events} SmsSent, provider {stats}, \
         last SmsSent {:.1} s after the last kill",
        recovered.as_secs_f64()
    );
    // The target is 15 s; the bound leaves room for a loaded machine and
    // still fails when recovery waits out the 60 s lease.
    assert!(
        recovered < Duration::from_secs(30),
        "recovery took {recovered:?}: the dead holder's leases were waited out"
    );
    assert_eq!(stats["distinctKeys"], N as u64);
    // Duplicate sends are possible only in the documented window (a kill
    // between the provider's answer and Redis recording it): at most the
    // commands in flight at each kill.
    assert!(stats["duplicates"].as_u64().unwrap() <= 2 * 32, "{stats}");
    broker.cleanup().await;
}

#[tokio::test]
async fn sigterm_under_load_exits_0_and_a_restart_finishes_each_command_exactly_once() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let stack = stack(
        &names,
        50,
        &[
            ("SMS__PROCESSING__SHUTDOWN_GRACE_MS", "5000"),
            ("SMS__PROCESSING__MAX_IN_FLIGHT", "20"),
            ("SMS__AMQP__PREFETCH", "20"),
        ],
    )
    .await;
    const N: usize = 400;
    broker.publish_many("term-", N).await;
    let mut svc = stack.start_service().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = stack.provider_stats().await["accepted"].as_u64().unwrap();
    assert!(
        before > 0 && before < N as u64,
        "SIGTERM lands mid-stream: {before}"
    );
    let stopping = Instant::now();
    terminate(&svc.0);
    assert_eq!(
        wait_exit(&mut svc.0, Duration::from_secs(8)).await,
        Some(0),
        "exit 0 on SIGTERM"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(6),
        "within the grace period"
    );
    let _svc = stack.start_service().await;
    let (keys, events) = distinct_sent(&mut broker, N, Duration::from_secs(60)).await;
    assert_eq!(keys, N);
    assert!(broker.sent(1, Duration::from_millis(500)).await.is_empty());
    let stats = stack.provider_stats().await;
    eprintln!("SIGTERM under load: {N} commands, {events} SmsSent, provider {stats}");
    assert_eq!(events, N, "exactly one SmsSent per command");
    assert_eq!(stats["duplicates"], 0, "{stats}");
    assert_eq!(stats["accepted"], N as u64);
    broker.cleanup().await;
}
