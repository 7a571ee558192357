//! The operator's commands, mostly through the real binary: `events`,
//! `send`, `dead-letters`, `forget`, `status`, `fake-provider`, and what a bare
//! `sms-service` does.

use std::io::{BufRead, BufReader, Read};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use sms_service::dead_letters::{self, FailedRecords, Reset};
use sms_service::domain::IdempotencyKey;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::e2e::{free_port, service, stack, terminate, wait_exit, wait_http, Proc};
use crate::helpers::{
    command, init_logs, redis_connection, settings, spawn_app, Leftovers, Names, TestApp,
    TestBroker, AMQP_URL,
};

const WAIT: Duration = Duration::from_secs(15);

/// A child's pipe, read line by line on a thread of its own.
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line that contains `needle`, waiting up to `within`.
async fn line_with(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        match rx.try_recv() {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => {}
            Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    None
}

/// Runs the binary to completion with `env`, capturing stdout and stderr.
fn run(env: &[(String, String)], args: &[&str]) -> Output {
    service(env, args).stderr(Stdio::piped()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The environment of one-shot commands next to an in-process service.
fn env_of(app: &TestApp) -> Vec<(String, String)> {
    app.names.env(&app.provider.uri())
}

async fn channel() -> (Connection, Channel) {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Whether a queue exists (a passive declare, on a channel of its own since
/// a 404 closes the channel).
async fn queue_exists(name: &str) -> Option<u32> {
    let (connection, channel) = channel().await;
    let found = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = connection.close(200, "bye".into()).await;
    found
}

async fn exchange_exists(name: &str) -> bool {
    let (connection, channel) = channel().await;
    let found = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "bye".into()).await;
    found
}

/// Waits until `n` dead letters are listed.
async fn wait_dead_letters(app: &TestApp, n: usize) {
    let settings = settings(&env_of(app));
    for _ in 0..150 {
        if dead_letters::list(&settings, 100).await.unwrap().len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never saw {n} dead letters");
}

async fn record_status(app: &TestApp, key: &str) -> Option<String> {
    let mut redis = redis_connection().await;
    redis::cmd("HGET")
        .arg(format!("{}:msg:{key}", app.names.key_prefix))
        .arg("status")
        .query_async(&mut redis)
        .await
        .unwrap()
}

#[tokio::test]
async fn events_prints_each_event_as_a_masked_line_or_json_and_stops_after_count_or_sigterm() {
    init_logs();
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let stack = stack(&names, 0, &[]).await;
    let _svc = stack.start_service().await;

    let watch = |args: &[&str]| {
        let mut child = service(&stack.env, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        (Proc(child), out, err)
    };
    let (mut one, one_out, one_err) = watch(&["events", "--count", "1"]);
    let (mut json, json_out, json_err) = watch(&["events", "--json", "--count", "1"]);
    let (mut endless, _endless_out, endless_err) = watch(&["events"]);
    for err in [&one_err, &json_err, &endless_err] {
        assert!(
            line_with(err, "listening for events", WAIT).await.is_some(),
            "events never said it was listening"
        );
    }

    let sent = run(
        &stack.env,
        &[
            "send",
            "--to",
            "+254712345678",
            "--text",
            "hi",
            "--key",
            "events-1",
        ],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));

    let line = line_with(&one_out, "SmsSent", WAIT)
        .await
        .expect("events printed the SmsSent");
    assert!(
        line.starts_with("SmsSent key=events-1 to=+********5678 providerMessageId=fake-"),
        "{line}"
    );
    assert!(
        !line.contains("254712345678"),
        "full number printed: {line}"
    );
    assert_eq!(
        wait_exit(&mut one.0, WAIT).await,
        Some(0),
        "--count 1 exits"
    );

    let line = line_with(&json_out, "events-1", WAIT)
        .await
        .expect("events --json printed the SmsSent");
    assert!(
        !line.contains("254712345678"),
        "full number printed: {line}"
    );
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "SmsSent");
    assert_eq!(event["idempotencyKey"], "events-1");
    assert_eq!(event["phoneNumber"], "+********5678");
    assert_eq!(event["attempts"], 1);
    assert_eq!(wait_exit(&mut json.0, WAIT).await, Some(0));

    terminate(&endless.0);
    assert_eq!(
        wait_exit(&mut endless.0, WAIT).await,
        Some(0),
        "SIGTERM ends events with exit 0"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn the_bare_binary_prints_usage_and_exits_2_instead_of_consuming() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let env = names.env("http://127.0.0.1:9");
    let mut child = service(&env, &[]).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = lines(child.stderr.take().unwrap());
    let mut child = Proc(child);
    let code = wait_exit(&mut child.0, Duration::from_secs(10)).await;
    assert_eq!(code, Some(2), "a bare sms-service exits 2 at once");
    let usage = tokio::task::spawn_blocking(move || stderr.iter().collect::<Vec<_>>().join("\n"))
        .await
        .unwrap();
    assert!(usage.contains("Usage:"), "{usage}");
    assert!(usage.contains("  run "), "lists the subcommands: {usage}");
    assert_eq!(
        queue_exists(&names.command_queue).await,
        None,
        "it never connected"
    );
}

#[tokio::test]
async fn replay_moves_each_dead_letter_at_most_once_per_run_while_the_service_runs() {
    let mut app = spawn_app().await;
    for i in 0..5 {
        app.publish(&command(&format!("once-{i}"), "+12", "hi"))
            .await;
    }
    assert_eq!(app.broker.failed(5, WAIT).await.len(), 5);
    wait_dead_letters(&app, 5).await;

    // The service keeps running: each replayed command fails again at once
    // and goes back to the dead-letter queue while the replay goes on.
    let settings = settings(&env_of(&app));
    let replayed = dead_letters::replay(&settings, 50, false).await.unwrap();
    assert_eq!(replayed.len(), 5, "each letter replayed once");
    let mut keys: Vec<_> = replayed
        .iter()
        .map(|r| r.letter.idempotency_key.clone().unwrap())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5);
    // Their keys already had their one SmsFailed: the replayed copies are
    // duplicates, back in the dead-letter queue once each, with no event.
    assert!(
        app.broker
            .failed(50, Duration::from_secs(3))
            .await
            .is_empty(),
        "a second SmsFailed for one key"
    );
    wait_dead_letters(&app, 5).await;
    app.cleanup().await;
}

#[tokio::test]
async fn replay_with_reset_sends_a_rejected_command_afresh() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "blocked"})))
        .up_to_n_times(1)
        .mount(&app.provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "after-reset"})))
        .mount(&app.provider)
        .await;
    app.publish(&command("reset-me", "+254712345678", "hi"))
        .await;
    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed[0].json()["reason"], "provider_rejected");
    wait_dead_letters(&app, 1).await;

    let out = run(&env_of(&app), &["dead-letters", "replay", "--reset"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("reset 1 reset-me: failed record cleared"),
        "{stdout}"
    );
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "the replayed command was sent");
    assert_eq!(sent[0].json()["providerMessageId"], "after-reset");
    assert_eq!(app.provider.received_requests().await.unwrap().len(), 2);
    assert_eq!(
        record_status(&app, "reset-me").await.as_deref(),
        Some("sent")
    );
    app.cleanup().await;
}

#[tokio::test]
async fn forget_clears_a_failed_key_but_neither_forget_nor_reset_clears_a_sent_one() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("idempotency-key", "will-fail"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "blocked"})))
        .mount(&app.provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sent-once"})))
        .mount(&app.provider)
        .await;
    app.publish(&command("will-fail", "+254712345678", "hi"))
        .await;
    app.publish(&command("was-sent", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.failed(1, WAIT).await.len(), 1);
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    wait_dead_letters(&app, 1).await;
    // Drain the provider_rejected letter; then an invalid copy of the sent
    // command: dead-lettered with no event, its key still `sent`.
    assert_eq!(app.broker.dead_letters(1, WAIT).await.len(), 1);
    app.publish(&command("was-sent", "+12", "hi")).await;
    wait_dead_letters(&app, 1).await;
    let env = env_of(&app);

    let refused = run(&env, &["forget", "was-sent"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("status sent") && stderr.contains("second SMS"),
        "{stderr}"
    );
    let out = run(&env, &["dead-letters", "replay", "--reset"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("reset 1 was-sent: the key was sent (status sent)"),
        "{stdout}"
    );
    wait_dead_letters(&app, 1).await; // the invalid copy, back again
    assert_eq!(
        record_status(&app, "was-sent").await.as_deref(),
        Some("sent")
    );

    let forgot = run(&env, &["forget", "will-fail"]);
    assert!(forgot.status.success(), "{}", text(&forgot.stderr));
    assert_eq!(record_status(&app, "will-fail").await, None);
    let unknown = run(&env, &["forget", "will-fail"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("no record"));

    assert!(app
        .broker
        .sent(1, Duration::from_millis(500))
        .await
        .is_empty());
    assert_eq!(
        app.provider.received_requests().await.unwrap().len(),
        2,
        "no second send of the sent key"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn clearing_a_failed_record_leaves_sent_and_in_progress_records_alone() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let settings = settings(&names.env("http://127.0.0.1:9"));
    let mut redis = redis_connection().await;
    for (key, status) in [
        ("k-failed", "failed"),
        ("k-sent", "sent"),
        ("k-delivered", "delivered"),
        ("k-processing", "processing"),
        ("k-retrying", "retrying"),
    ] {
        let _: () = redis::cmd("HSET")
            .arg(format!("{}:msg:{key}", names.key_prefix))
            .arg("status")
            .arg(status)
            .arg("attempts")
            .arg("1")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let mut records = FailedRecords::connect(&settings).await.unwrap();
    let key = |k: &str| IdempotencyKey::parse(k).unwrap();
    assert_eq!(
        records.clear(&key("k-failed")).await.unwrap(),
        Reset::Cleared
    );
    assert_eq!(
        records.clear(&key("k-failed")).await.unwrap(),
        Reset::Unknown
    );
    for (k, status) in [
        ("k-sent", "sent"),
        ("k-delivered", "delivered"),
        ("k-processing", "processing"),
        ("k-retrying", "retrying"),
    ] {
        assert_eq!(
            records.clear(&key(k)).await.unwrap(),
            Reset::Kept(status.into())
        );
        let still: Option<String> = redis::cmd("HGET")
            .arg(format!("{}:msg:{k}", names.key_prefix))
            .arg("status")
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(still.as_deref(), Some(status), "{k} kept");
    }
}

/// In sentinel mode `redis.url` holds only the master's password and
/// database: clearing goes through the Sentinels (none answer here), never
/// to the server `redis.url` names, which may be a stale master.
#[tokio::test]
async fn clearing_a_failed_record_in_sentinel_mode_goes_through_the_sentinels_not_redis_url() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let mut env = names.env("http://127.0.0.1:9");
    for (k, v) in [
        ("SMS__REDIS__MODE", "sentinel"),
        ("SMS__REDIS__SENTINELS", "127.0.0.1:9"),
        ("SMS__REDIS__MASTER_NAME", "nobody"),
        ("SMS__REDIS__TIMEOUT_MS", "300"),
    ] {
        env.push((k.into(), v.into()));
    }
    let settings = settings(&env);
    let mut redis = redis_connection().await;
    let record = format!("{}:msg:k-failed", names.key_prefix);
    let _: () = redis::cmd("HSET")
        .arg(&record)
        .arg("status")
        .arg("failed")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut records = FailedRecords::connect(&settings).await.unwrap();
    let err = records
        .clear(&IdempotencyKey::parse("k-failed").unwrap())
        .await
        .map(|_| ())
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("sentinel"), "{err}");
    let still: Option<String> = redis::cmd("HGET")
        .arg(&record)
        .arg("status")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(still.as_deref(), Some("failed"), "redis.url not used");
}

#[tokio::test]
async fn dead_letters_list_json_uses_the_contract_names_and_says_when_each_was_dead_lettered() {
    let mut app = spawn_app().await;
    let before = SystemTime::now() - Duration::from_secs(2);
    app.publish(&command("listed-1", "+1234567", "hi")).await;
    assert_eq!(app.broker.failed(1, WAIT).await.len(), 1);
    wait_dead_letters(&app, 1).await;

    let out = run(&env_of(&app), &["dead-letters", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let letter: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(letter["idempotencyKey"], "listed-1", "{letter}");
    assert_eq!(letter["phoneNumber"], "+***4567", "{letter}");
    assert!(letter["reason"]
        .as_str()
        .unwrap()
        .starts_with("invalid_phone_number"));
    assert!(letter["bytes"].as_u64().unwrap() > 0);
    let at = humantime::parse_rfc3339(letter["deadLetteredAt"].as_str().unwrap()).unwrap();
    assert!(
        at >= before && at <= SystemTime::now() + Duration::from_secs(2),
        "{letter}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn send_refuses_a_command_queue_that_does_not_exist_unless_told_to_declare() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let env = names.env("http://127.0.0.1:9");
    let args = ["send", "--to", "+254712345678", "--text", "hi"];

    let refused = service(&env, &args)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains(&names.command_queue) && stderr.contains("--declare"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert_eq!(
        queue_exists(&names.command_queue).await,
        None,
        "nothing created"
    );

    let declared = run(&env, &[&args[..], &["--declare"]].concat());
    assert!(declared.status.success(), "{}", text(&declared.stderr));
    assert_eq!(queue_exists(&names.command_queue).await, Some(1));
    assert!(queue_exists(&names.dead_letter_queue).await.is_some());
    assert!(exchange_exists(&names.sent_exchange).await);
}

#[tokio::test]
async fn send_declares_nothing_it_does_not_publish_to_and_logs_nothing_at_info() {
    let names = Names::unique();
    let _leftovers = Leftovers(names.clone());
    let (connection, channel) = channel().await;
    channel
        .queue_declare(
            names.command_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;

    let out = service(
        &names.env("http://127.0.0.1:9"),
        &[
            "send",
            "--to",
            "+254712345678",
            "--text",
            "hi",
            "--key",
            "quiet-1",
        ],
    )
    .env_remove("RUST_LOG")
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "quiet-1");
    assert_eq!(
        text(&out.stderr),
        "",
        "nothing on stderr at the default level"
    );
    assert_eq!(queue_exists(&names.command_queue).await, Some(1));
    assert_eq!(queue_exists(&names.dead_letter_queue).await, None);
    assert!(!exchange_exists(&names.sent_exchange).await);
}

async fn fake(args: &[&str]) -> (Proc, String) {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut argv = vec!["fake-provider", "--bind", &bind];
    argv.extend_from_slice(args);
    let proc = Proc(service(&[], &argv).spawn().unwrap());
    let url = format!("http://{bind}");
    wait_http(&format!("{url}/healthz")).await;
    (proc, url)
}

async fn post_message(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/messages"))
        .header("idempotency-key", "k1")
        .json(&json!({"to": "+254712345678", "text": "hi"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_fake_provider_rejects_with_400_and_throttles_with_429_and_retry_after_on_request() {
    let (_rejecting, url) = fake(&["--reject-rate", "1"]).await;
    assert_eq!(post_message(&url).await.status(), 400);
    let stats: Value = reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["rejected"], 1, "{stats}");
    assert_eq!(stats["accepted"], 0, "{stats}");

    let (_throttling, url) = fake(&["--throttle-rate", "1"]).await;
    let answer = post_message(&url).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "1");

    let too_much = run(
        &[],
        &[
            "fake-provider",
            "--fail-rate",
            "0.5",
            "--reject-rate",
            "0.6",
        ],
    );
    assert_eq!(too_much.status.code(), Some(1));
    assert!(text(&too_much.stderr).contains("more than 1"));
}

#[tokio::test]
async fn the_fake_provider_gives_new_message_ids_after_a_restart() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let url = format!("http://{bind}");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut fake = Proc(
            service(&[], &["fake-provider", "--bind", &bind])
                .spawn()
                .unwrap(),
        );
        wait_http(&format!("{url}/healthz")).await;
        let answer: Value = post_message(&url).await.json().await.unwrap();
        ids.push(answer["id"].as_str().unwrap().to_owned());
        terminate(&fake.0);
        assert_eq!(wait_exit(&mut fake.0, WAIT).await, Some(0));
    }
    assert_ne!(ids[0], ids[1], "{ids:?}");
}

#[tokio::test]
async fn the_fake_provider_on_a_busy_port_says_which_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap().to_string();
    let out = run(&[], &["fake-provider", "--bind", &address]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&address), "{stderr}");
}

#[tokio::test]
async fn status_prints_the_status_document_and_exits_1_for_an_unknown_key() {
    const API_KEY: &str = "test-status-api-key-0123456789";
    let mut app = crate::helpers::spawn_app_with(&[("SMS__HTTP__API_KEYS", API_KEY)]).await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "status-msg-1"})))
        .mount(&app.provider)
        .await;
    app.publish(&command("status-1", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let env = env_of(&app);
    let url = app.base_url.clone();
    // The binary asks the in-process service: off the runtime's thread.
    let status = |args: Vec<String>, key: Option<&'static str>| {
        let mut env = env.clone();
        env.extend(key.map(|k| ("SMS_API_KEY".to_owned(), k.to_owned())));
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&env, &args)
        })
    };
    let args = |key: &str| vec!["status".into(), key.into(), "--url".into(), url.clone()];

    let found = status(args("status-1"), Some(API_KEY)).await.unwrap();
    assert!(found.status.success(), "{}", text(&found.stderr));
    let document: Value = serde_json::from_slice(&found.stdout).expect("stdout is JSON");
    assert_eq!(document["idempotencyKey"], "status-1");
    assert_eq!(document["status"], "sent");
    assert_eq!(document["providerMessageId"], "status-msg-1");

    let with_flag = [args("status-1"), vec!["--api-key".into(), API_KEY.into()]].concat();
    assert!(status(with_flag, None).await.unwrap().status.success());

    let unknown = status(args("status-never-seen"), Some(API_KEY))
        .await
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("status-never-seen: no message with this key"),
        "{}",
        text(&unknown.stderr)
    );
    let refused = status(args("status-1"), None).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("SMS_API_KEY"),
        "{}",
        text(&refused.stderr)
    );
    let usage = status(vec!["status".into()], None).await.unwrap();
    assert_eq!(usage.status.code(), Some(2), "no KEY is a usage error");
    app.cleanup().await;
}
