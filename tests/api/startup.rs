//! The first hour, as a new user or an on-call operator meets it: the real
//! binary started with a clean environment and its stderr read line by
//! line. A bad setting exits 2 naming the key and the variable set; a
//! Redis that is away, or a broker that refuses the login, is said at
//! start naming its `host:port`; `/metrics` is complete from the first
//! scrape.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;

use crate::helpers::{Leftovers, Names, TestBroker};

const BIN: &str = env!("CARGO_BIN_EXE_sms-service");

/// The binary running with `env` over a clean environment; its stderr
/// lines are collected as they come. Killed when dropped.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

impl Running {
    fn start(env: &[(String, String)]) -> Self {
        let mut child = Command::new(BIN)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            lines,
            http: reqwest::Client::new(),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line that `matches`, waiting up to `within` for it.
    async fn line(&self, within: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| matches(l)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://<address>` of the API, read from the "HTTP API listening"
    /// log line.
    async fn base_url(&self) -> String {
        let line = self
            .line(Duration::from_secs(20), |l| {
                l.contains("HTTP API listening")
            })
            .await
            .unwrap_or_else(|| panic!("the API never listened: {:?}", self.lines()));
        let address = line
            .split("http_addr")
            .nth(1)
            .and_then(|rest| {
                rest.trim_start_matches(['=', '"', ':'])
                    .split(['"', ' ', ','])
                    .next()
            })
            .unwrap_or_else(|| panic!("no address in {line}"));
        format!("http://{address}")
    }

    async fn get(&self, url: &str) -> (u16, String) {
        let response = self.http.get(url).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Waits for `GET url` to answer `status`, returning the body.
    async fn wait_for_status(&self, url: &str, status: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (got, body) = self.get(url).await;
            if got == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{url} answered {got}, not {status}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL on drop if it hangs).
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with(mut env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

#[test]
fn a_level_that_hides_every_log_or_a_misworded_setting_exits_2_naming_what_the_user_set() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    /// The variables set, and what the one line on stderr says.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("SMS__LOG__LEVEL", "verbose")],
            &["log.level (from SMS__LOG__LEVEL)", "\"verbose\" is not a level"],
        ),
        (&[("RUST_LOG", "nonsense===")], &["RUST_LOG", "nonsense==="]),
        (
            &[("RUST_LOG", "verbose")],
            &["RUST_LOG", "\"verbose\" is not a level"],
        ),
        (
            &[("SMS__LOG__FORMAT", "yaml")],
            &[r#"log.format (from SMS__LOG__FORMAT): expected "text" or "json", got "yaml""#],
        ),
        (
            &[("SMS__AMQP__PREFETCH", "many")],
            &[r#"amqp.prefetch (from SMS__AMQP__PREFETCH): expected a whole number, got "many""#],
        ),
        (
            &[("SMS__AMQP__PREFECH", "5")],
            &["amqp.prefech (from SMS__AMQP__PREFECH): no such setting; did you mean amqp.prefetch (SMS__AMQP__PREFETCH)?"],
        ),
    ];
    for (vars, says) in cases {
        let mut env = names.env("http://127.0.0.1:9");
        env.push(("RUST_LOG".into(), "info".into()));
        let env = with(env, vars);
        let out = crate::ops::run_binary(&env, &["run"])
            .unwrap_or_else(|| panic!("{vars:?}: still running after 20 s instead of exiting 2"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("error: invalid configuration: "),
            "{stderr}"
        );
        for said in *says {
            assert!(stderr.contains(said), "{vars:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_named_at_start_and_readyz_says_503_naming_it() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    // A port nothing listens on.
    let port = crate::e2e::free_port();
    let redis = format!("127.0.0.1:{port}");
    let env = with(
        names.env("http://127.0.0.1:9"),
        &[
            ("SMS__REDIS__URL", &format!("redis://:hunter2@{redis}")),
            ("SMS__REDIS__TIMEOUT_MS", "300"),
            ("SMS__LOG__FORMAT", "json"),
        ],
    );
    let service = Running::start(&env);
    let base = service.base_url().await;

    let warning = service
        .line(Duration::from_secs(10), |l| {
            l.contains("\"WARN\"") && l.contains(&format!("Redis at {redis} does not answer"))
        })
        .await
        .unwrap_or_else(|| panic!("no warning naming {redis}: {:?}", service.lines()));
    let warning: serde_json::Value = serde_json::from_str(&warning).unwrap();
    assert!(warning["message"].as_str().unwrap().contains("/readyz"));

    let (status, body) = service.get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("Redis at {redis}")), "{reason}");

    // Still away a while later: no word of a recovery, no password.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = service.lines();
    assert!(
        !lines.iter().any(|l| l.contains("answers")),
        "a recovery that did not happen: {lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("hunter2")), "{lines:?}");
    service.stop().await;
}

#[tokio::test]
async fn a_refused_broker_login_is_logged_once_per_retry_naming_host_and_reason() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let retry_ms = 500;
    let env = with(
        names.env("http://127.0.0.1:9"),
        &[
            (
                "SMS__AMQP__URL",
                "amqp://guest:wrongpw-s3cret@127.0.0.1:5672/%2f",
            ),
            ("SMS__AMQP__RECONNECT_DELAY_MS", &retry_ms.to_string()),
        ],
    );
    let service = Running::start(&env);
    service.base_url().await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let elapsed = started.elapsed();
    let lines = service.lines();
    service.stop().await;

    let problems: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let refusals = problems
        .iter()
        .filter(|l| l.contains("ACCESS_REFUSED") && l.contains("127.0.0.1:5672"))
        .count();
    assert!(refusals >= 2, "refusals naming the broker: {lines:#?}");
    // One line per retry, plus the ones before the clock started.
    let bound = (elapsed.as_millis() / retry_ms) as usize + 3;
    assert!(
        problems.len() <= bound,
        "{} warnings and errors in {elapsed:?} (at most {bound}): {lines:#?}",
        problems.len()
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("backoff attempts exhausted")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("wrongpw-s3cret")),
        "{lines:#?}"
    );
    // stderr is a pipe, not a terminal: no colour codes.
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "{lines:#?}");
}

#[tokio::test]
async fn metrics_are_complete_from_the_first_scrape_and_queue_depths_follow_the_queues() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let env = with(
        names.env("http://127.0.0.1:9"),
        &[("SMS__LOG__FORMAT", "json")],
    );
    let service = Running::start(&env);
    let base = service.base_url().await;
    service
        .wait_for_status(&format!("{base}/readyz"), 200, Duration::from_secs(20))
        .await;
    assert!(
        service
            .line(Duration::from_secs(5), |l| l
                .contains("Redis at 127.0.0.1:6379 answers"))
            .await
            .is_some(),
        "{:?}",
        service.lines()
    );

    let (_, text) = service.get(&format!("{base}/metrics")).await;
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(typed.len() > 20, "{text}");
    for name in &typed {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no # HELP:\n{text}"
        );
    }
    for series in [
        "sms_failed_total{reason=\"invalid_command\"} 0",
        "sms_failed_total{reason=\"invalid_phone_number\"} 0",
        "sms_failed_total{reason=\"provider_rejected\"} 0",
        "sms_failed_total{reason=\"retries_exhausted\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"accepted\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"transient\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"ambiguous\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"route_refused\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"rejected\"} 0",
        "sms_provider_requests_total{provider=\"generic\",outcome=\"account\"} 0",
        "sms_provider_accepted_total{provider=\"generic\"} 0",
        "sms_provider_ambiguous_total{provider=\"generic\"} 0",
        "sms_sent_total 0",
        "sms_dead_lettered_total 0",
        "sms_delivery_reports_total{provider=\"generic\",status=\"delivered\"} 0",
        "sms_delivery_reports_total{provider=\"generic\",status=\"unmatched\"} 0",
        concat!(
            "sms_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1"
        ),
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "{series} missing:\n{text}"
        );
    }
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.parse().unwrap())
    };
    assert!(
        value(&text, "process_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    assert!(
        value(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );

    // A malformed command is dead-lettered: the dead-letter gauge follows
    // within a refresh.
    broker
        .publish_command(b"hello", BasicProperties::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = service.get(&format!("{base}/metrics")).await;
        let dead = value(&text, "sms_dead_letter_queue_messages");
        let commands = value(&text, "sms_command_queue_messages");
        if dead == Some(1.0) && commands == Some(0.0) {
            assert_eq!(value(&text, "sms_dead_lettered_total"), Some(1.0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue gauges: dead letters {dead:?}, commands {commands:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    service.stop().await;
    broker.cleanup().await;
}
