//! Operating safety: settings that would only fail later stop start-up, the
//! bench refuses a real provider, and the Redis eviction policy is read
//! from the real server.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sms_service::adapters::redis_durability::{eviction_policy, eviction_warning, NO_EVICTION};

use crate::helpers::{redis_connection, settings, Leftovers, Names};

const BIN: &str = env!("CARGO_BIN_EXE_sms-service");

/// Runs the binary with `env` over a clean environment, capturing its
/// output; `None` if it is still running after 20 s (then it is killed).
pub fn run_binary(env: &[(String, String)], args: &[&str]) -> Option<Output> {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

#[test]
fn settings_that_would_fail_later_or_overflow_stop_start_up_with_exit_2_naming_the_key() {
    let names = Names::unique();
    // Nothing is declared when start-up stops, but should a case start the
    // service after all, its queues go when the test ends.
    let _leftovers = Leftovers(names.clone());
    let u64_max = u64::MAX.to_string();
    let u32_max = u32::MAX.to_string();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", "600"),
                ("SMS__RETRY__MAX_AGE_SECS", "601"),
            ],
            "retry.max_age_secs",
        ),
        (&[("SMS__PROVIDER__TOKEN", "s3cret\n")], "provider.token"),
        (
            &[("SMS__REDIS__IDEMPOTENCY_TTL_SECS", &u64_max)],
            "redis.idempotency_ttl_secs",
        ),
        (
            &[("SMS__PROCESSING__SHUTDOWN_GRACE_MS", &u64_max)],
            "processing.shutdown_grace_ms",
        ),
        (
            &[("SMS__RETRY__IN_PROCESS_ATTEMPTS", &u32_max)],
            "redis.lease_ms",
        ),
    ];
    for (vars, key) in cases {
        let mut env = names.env("http://127.0.0.1:9");
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let out = run_binary(&env, &["run"]).expect("exits at once");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{vars:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}

/// The bench never connects before the check: a listener stands in for the
/// broker and must see no connection. With `--i-mean-it` it does.
#[test]
fn the_bench_refuses_a_provider_off_loopback_before_connecting_anywhere() {
    let names = Names::unique();
    let broker = TcpListener::bind("127.0.0.1:0").unwrap();
    broker.set_nonblocking(true).unwrap();
    let port = broker.local_addr().unwrap().port();
    let mut env = names.env("https://api.sms-provider.example");
    env.push((
        "SMS__AMQP__URL".into(),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
    ));

    let out = run_binary(&env, &["bench", "-n", "10"]).expect("refuses at once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("provider.base_url"), "{stderr}");
    assert!(stderr.contains("api.sms-provider.example"), "{stderr}");
    assert!(stderr.contains("--i-mean-it"), "{stderr}");
    assert!(out.stdout.is_empty(), "no report");
    assert_eq!(
        broker.accept().map(|_| ()).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "nothing connected to the broker"
    );

    // Told otherwise, it goes on to the broker (here a silent listener).
    let mut child = Command::new(BIN)
        .args(["bench", "-n", "10", "--i-mean-it"])
        .env_clear()
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let connected = loop {
        match broker.accept() {
            Ok(_) => break true,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        connected,
        "with --i-mean-it the bench connects to the broker"
    );
}

#[tokio::test]
async fn the_eviction_policy_read_at_start_is_the_real_servers() {
    let names = Names::unique();
    let redis = settings(&names.env("http://127.0.0.1:9")).redis;
    let (_, actual): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut redis_connection().await)
        .await
        .unwrap();
    assert_eq!(
        eviction_policy(&redis).await.as_deref(),
        Some(actual.as_str())
    );
    let warning = eviction_warning(&redis).await;
    assert_eq!(warning.is_some(), actual != NO_EVICTION, "{warning:?}");
    if let Some(warning) = warning {
        assert!(warning.contains("127.0.0.1:6379"), "{warning}");
    }
}

/// A server that takes the connection and never answers: the check gives
/// up within its bound and says nothing.
#[tokio::test]
async fn a_redis_that_does_not_answer_gives_no_eviction_warning_within_three_timeouts() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let names = Names::unique();
    let mut env = names.env("http://127.0.0.1:9");
    env.push((
        "SMS__REDIS__URL".into(),
        format!("redis://127.0.0.1:{port}"),
    ));
    env.push(("SMS__REDIS__TIMEOUT_MS".into(), "300".into()));
    let redis = settings(&env).redis;
    let started = Instant::now();
    assert_eq!(eviction_warning(&redis).await, None);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}
