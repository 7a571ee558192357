//! The pod that deploy/kubernetes/ describes, run on loopback (there is no
//! cluster here): the container's arguments, the ConfigMap's settings file
//! where `--config` names it, and the container's environment with each
//! `secretKeyRef` taken from the Secret template. Only the broker and
//! Redis URLs, the listen addresses, the providers' hosts and this test's
//! queue and key names are swapped. scripts/check-kubernetes checks the
//! manifests' schemas and how they refer to each other; this checks that
//! the service accepts what they give it and answers their probes.

use std::time::{Duration, Instant};

use yaml_rust2::{Yaml, YamlLoader};

use crate::e2e::{assert_grpc_listens, free_port, service, terminate, wait_exit, wait_http, Proc};
use crate::helpers::{command, init_logs, Names, TestBroker, AMQP_URL, REDIS_URL};

const WAIT: Duration = Duration::from_secs(15);

fn manifest(name: &str) -> Yaml {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn text(value: &Yaml, what: &str) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string"))
        .to_owned()
}

/// The container's environment as the kubelet would set it, with the
/// values a pod on loopback needs in place of the cluster's.
fn container_env(container: &Yaml, secret: &Yaml, http: u16, grpc: u16) -> Vec<(String, String)> {
    container["env"]
        .as_vec()
        .expect("the container has env")
        .iter()
        .map(|var| {
            let name = text(&var["name"], "env name");
            let value = match &var["valueFrom"]["secretKeyRef"] {
                Yaml::BadValue => text(&var["value"], &name),
                reference => {
                    let key = text(&reference["key"], &name);
                    text(&secret["stringData"][key.as_str()], &key)
                }
            };
            let value = match name.as_str() {
                "SMS__AMQP__URL" => AMQP_URL.to_owned(),
                "SMS__REDIS__URL" => REDIS_URL.to_owned(),
                "SMS__HTTP__BIND" => format!("127.0.0.1:{http}"),
                "SMS__GRPC__BIND" => format!("127.0.0.1:{grpc}"),
                _ => value,
            };
            (name, value)
        })
        .collect()
}

#[tokio::test]
async fn the_kubernetes_pod_starts_with_its_config_map_and_secret_sends_through_both_routes_and_drains_within_its_grace_period(
) {
    init_logs();
    let deployment = manifest("deployment.yaml");
    let secret = manifest("secret.example.yaml");
    let config_map = manifest("configmap.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let (http, grpc) = (free_port(), free_port());
    let secret_of = |key: &str| text(&secret["stringData"][key], key);

    // The ConfigMap's file, where the container's --config expects it.
    let mut args: Vec<String> = container["args"]
        .as_vec()
        .expect("the container has args")
        .iter()
        .map(|arg| text(arg, "an argument"))
        .collect();
    assert_eq!(args[0], "--config");
    let file_name = args[1].rsplit('/').next().unwrap().to_owned();
    let names = Names::unique();
    let settings_file = std::env::temp_dir().join(format!(
        "kubernetes-{}.toml",
        names.key_prefix.replace(':', "-")
    ));
    std::fs::write(
        &settings_file,
        text(&config_map["data"][file_name.as_str()], "the settings file"),
    )
    .unwrap();
    args[1] = settings_file.to_str().unwrap().to_owned();

    // A fake of each provider instance, expecting the Secret's credential.
    let (at_port, twilio_port) = (free_port(), free_port());
    let mut fakes = Vec::new();
    for (kind, port, credential) in [
        (
            "africastalking",
            at_port,
            format!("api_key={}", secret_of("at-api-key")),
        ),
        (
            "twilio",
            twilio_port,
            format!("auth_token={}", secret_of("twilio-auth-token")),
        ),
    ] {
        let bind = format!("127.0.0.1:{port}");
        let fake_args = [
            "fake-provider",
            "--kind",
            kind,
            "--bind",
            &bind,
            "--credential",
            &credential,
        ];
        fakes.push(Proc(service(&[], &fake_args).spawn().unwrap()));
        wait_http(&format!("http://{bind}/healthz")).await;
    }

    let mut env = container_env(container, &secret, http, grpc);
    env.push((
        "SMS__PROVIDERS__AT__BASE_URL".into(),
        format!("http://127.0.0.1:{at_port}"),
    ));
    env.push((
        "SMS__PROVIDERS__TWILIO__BASE_URL".into(),
        format!("http://127.0.0.1:{twilio_port}"),
    ));
    // This test's own queues, exchanges and keys.
    env.extend(names.env("http://unused:1").into_iter().filter(|(k, _)| {
        k.starts_with("SMS__AMQP__") && k != "SMS__AMQP__URL" || k == "SMS__REDIS__KEY_PREFIX"
    }));
    let mut broker = TestBroker::connect(&names).await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut svc = Proc(service(&env, &args).spawn().unwrap());

    // The probes, on the paths the manifest gives them.
    let base = format!("http://127.0.0.1:{http}");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("http"));
        let path = text(&container[probe]["httpGet"]["path"], probe);
        wait_http(&format!("{base}{path}")).await;
    }
    assert_grpc_listens(grpc).await;

    // One number on each route: Africa's Talking for +254, Twilio for the rest.
    for (key, phone) in [("k8s-ke", "+254712345678"), ("k8s-us", "+14155550100")] {
        broker
            .publish_command(&command(key, phone, "hello"), Default::default())
            .await;
    }
    let mut providers: Vec<(String, String)> = broker
        .sent(2, WAIT)
        .await
        .iter()
        .map(|event| {
            let json = event.json();
            (
                json["idempotencyKey"].as_str().unwrap().to_owned(),
                json["provider"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    providers.sort();
    assert_eq!(
        providers,
        [
            ("k8s-ke".into(), "at".into()),
            ("k8s-us".into(), "twilio".into())
        ]
    );

    // The Secret's API key opens the message routes.
    let api_key = secret_of("api-keys");
    let status = reqwest::Client::new()
        .get(format!("{base}/v1/messages/k8s-ke"))
        .bearer_auth(api_key.split(',').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);

    // SIGTERM drains and exits 0 well inside the grace period (less the
    // preStop sleep, which the kubelet runs before it).
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64;
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .map_or(0, |s| s.parse::<u64>().unwrap());
    let stopping = Instant::now();
    terminate(&svc.0);
    assert_eq!(
        wait_exit(&mut svc.0, Duration::from_secs(grace - pre_stop)).await,
        Some(0),
        "exit 0 on SIGTERM within terminationGracePeriodSeconds"
    );
    eprintln!("drained and exited in {:?}", stopping.elapsed());
    let _ = std::fs::remove_file(settings_file);
    broker.cleanup().await;
}
