//! Privacy everywhere, not only in the service's own log lines: the real
//! binary, its stderr captured, driven down the paths where someone else's
//! text carries a phone number (a message the broker returns, a provider's
//! error body), then every log line, event, dead-letter header and status
//! answer is searched for the full number.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::e2e::{free_port, wait_http};
use crate::helpers::{command, init_logs, Names, TestBroker};

const BIN: &str = env!("CARGO_BIN_EXE_sms-service");

/// The numbers, without their `+`: found in whatever form they leak.
const RETURNED_TO: &str = "254711122233";
const REJECTED_TO: &str = "254798765432";

/// The service's process, its stderr collected as it runs; killed on drop.
struct Service {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    fn start(env: &[(String, String)]) -> Self {
        let mut child = Command::new(BIN)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let reader = std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                let mut chunk = [0; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&chunk[..n]);
                    stderr.lock().unwrap().push_str(&text);
                }
            }
        });
        Self {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn logged(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn wait_logged(&self, what: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.logged().matches(what).count() < times {
            assert!(
                Instant::now() < deadline,
                "never logged {times}x {what:?}:\n{}",
                self.logged()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it with SIGTERM and returns everything it logged.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.logged()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails if `text` holds either number, as text or as the byte list a
/// `{:?}` of a body prints (lapin's dump of a returned message does that).
fn assert_no_number(place: &str, text: &str) {
    for number in [RETURNED_TO, REJECTED_TO] {
        let bytes = format!("{:?}", number.as_bytes());
        let bytes = bytes.trim_matches(|c| c == '[' || c == ']');
        assert!(
            !text.contains(number) && !text.contains(bytes),
            "{place} holds the full number {number}:\n{text}"
        );
    }
}

#[tokio::test]
async fn no_full_phone_number_reaches_logs_events_dead_letters_or_the_status_api() {
    init_logs();
    let names = Names::unique();
    let provider = MockServer::start().await;
    let mut broker = TestBroker::connect(&names).await;
    // As in the quick start: nobody subscribes to SmsSent yet, so the broker
    // returns every SmsSent the service publishes.
    broker
        .channel
        .queue_delete(
            format!("{}.subscriber", names.sent_exchange)
                .as_str()
                .into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("Idempotency-Key", "privacy-returned"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "ok"})))
        .mount(&provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("Idempotency-Key", "privacy-rejected"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "message": format!("The 'To' number +{REJECTED_TO} is not a valid phone number"),
            "to": REJECTED_TO,
        })))
        .mount(&provider)
        .await;
    let http = format!("127.0.0.1:{}", free_port());
    let mut env = names.env(&provider.uri());
    env.push(("SMS__HTTP__BIND".into(), http.clone()));
    // What someone debugging would set; it must not bring dumps back.
    env.push(("RUST_LOG".into(), "debug".into()));
    let service = Service::start(&env);
    wait_http(&format!("http://{http}/readyz")).await;

    let returned = command("privacy-returned", &format!("+{RETURNED_TO}"), "hi");
    let rejected = command("privacy-rejected", &format!("+{REJECTED_TO}"), "hi");
    broker.publish_command(&returned, Default::default()).await;
    broker.publish_command(&rejected, Default::default()).await;

    // (a) SmsSent returned, again on each trip back from a delay tier.
    service.wait_logged("returned unroutable", 3).await;
    // (b) The provider's refusal quotes the number.
    let failed = broker.failed(1, Duration::from_secs(20)).await;
    assert_eq!(failed.len(), 1);
    let mut event: Value = failed[0].json();
    assert_eq!(event["reason"], "provider_rejected");
    assert!(
        event["detail"].as_str().unwrap().contains("+********5432"),
        "{event}"
    );
    // `phoneNumber` is the event's own field, in full by contract.
    event.as_object_mut().unwrap().remove("phoneNumber");
    assert_no_number("the SmsFailed event", &event.to_string());
    let dead = broker.dead_letters(1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    // The body is the command, unchanged by contract; the headers are ours.
    assert_no_number(
        "the dead letter's headers",
        &format!("{:?}", dead[0].properties.headers()),
    );
    let status = reqwest::get(format!("http://{http}/v1/messages/privacy-rejected"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.contains("failed"), "{status}");
    assert_no_number("the status API", &status);

    let logged = service.stop();
    assert!(logged.contains("provider rejected the message"), "{logged}");
    assert_no_number("the logs", &logged);
    broker.cleanup().await;
}
