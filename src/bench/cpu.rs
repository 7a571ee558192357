//! CPU per message of each process the bench can see on this machine: the
//! service, the broker, Redis, the fake provider and the bench itself.
//!
//! Read from `/proc/<pid>/stat` (fields 14 and 15, `utime` and `stime`, in
//! clock ticks; <https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html>)
//! before and after a measured run; the ticks per second come from
//! `getconf CLK_TCK` (the crate forbids the `unsafe` a `sysconf` call
//! needs), 100 when that fails, as on every common Linux build. Only a
//! process present at both readings counts; one that is absent (another
//! machine, another container, not Linux) is left out of the report.

use std::collections::BTreeMap;

use serde::Serialize;

/// One kind of process the bench watches, and the processes of that kind.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: &'static str,
    pub pids: Vec<u32>,
}

/// CPU time of one kind of process over a run, per message.
#[derive(Debug, Clone, Serialize)]
pub struct CpuPerMessage {
    pub process: String,
    /// Processes of that kind measured (several service instances, say).
    pub processes: usize,
    pub cpu_us_per_msg: f64,
}

/// `utime + stime` of every watched process, in clock ticks.
#[derive(Debug, Clone, Default)]
pub struct Sample(BTreeMap<u32, u64>);

/// `utime + stime` in clock ticks from the text of a `/proc/<pid>/stat`.
/// The command name (field 2) is in parentheses and may itself hold spaces
/// and parentheses, so fields are counted from the last `)`: `state` is the
/// first after it, `utime` the twelfth and `stime` the thirteenth.
pub fn parse_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `utime + stime` of `pid` now, if it runs and this machine has `/proc`.
pub fn ticks(pid: u32) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 if it cannot be read.
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// The processes to watch: `service_pids` if given, else every
/// `sms-service run` on this machine (another user's too: pass
/// `--service-pid` on a shared machine); RabbitMQ's `beam.smp`; the
/// `redis-server` listening on `redis_port` (every one when none says);
/// every `sms-service fake-provider`; and the bench itself.
pub fn find(service_pids: &[u32], redis_port: Option<u16>) -> Vec<Watched> {
    let mut service = Vec::new();
    let mut broker = Vec::new();
    let mut redis = Vec::new();
    let mut fake = Vec::new();
    let me = std::process::id();
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for entry in entries {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match classify(comm.trim(), &args, redis_port) {
            Some("service") => service.push(pid),
            Some("broker") => broker.push(pid),
            Some("redis") => redis.push(pid),
            Some("fake provider") => fake.push(pid),
            _ => {}
        }
    }
    if !service_pids.is_empty() {
        service = service_pids.to_vec();
    }
    [
        ("service", service),
        ("broker", broker),
        ("redis", redis),
        ("fake provider", fake),
        ("bench", vec![me]),
    ]
    .into_iter()
    .map(|(name, pids)| Watched { name, pids })
    .collect()
}

/// Which watched kind a process is, from its `comm` and its arguments.
fn classify(comm: &str, args: &[String], redis_port: Option<u16>) -> Option<&'static str> {
    let program = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    if program.starts_with("sms-service") {
        // The subcommand is the first argument that is no option (a
        // `--config PATH` may come before it).
        let mut rest = args[1..].iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--config" => {
                    rest.next();
                }
                "run" => return Some("service"),
                "fake-provider" => return Some("fake provider"),
                a if a.starts_with('-') => {}
                _ => return None,
            }
        }
        return None;
    }
    // RabbitMQ's Erlang VM: `rabbitmqctl` runs one too, briefly, without
    // booting the `rabbit` application.
    if comm == "beam.smp" && args.iter().any(|a| a == "rabbit") && args.iter().any(|a| a == "boot")
    {
        return Some("broker");
    }
    if comm == "redis-server" {
        let port = redis_port.map(|p| format!(":{p}"));
        let listens = match &port {
            Some(port) => args.iter().any(|a| a.ends_with(port.as_str())),
            None => true,
        };
        // A redis-server started from a config file names no port.
        let named = args.iter().any(|a| a.contains(':'));
        return (listens || !named).then_some("redis");
    }
    None
}

/// Reads every watched process now.
pub fn sample(watched: &[Watched]) -> Sample {
    Sample(
        watched
            .iter()
            .flat_map(|w| &w.pids)
            .filter_map(|&pid| Some((pid, ticks(pid)?)))
            .collect(),
    )
}

/// CPU per message of each watched kind between `before` and `after`, for
/// `messages` messages; kinds with no process present at both are left out.
pub fn per_message(
    watched: &[Watched],
    before: &Sample,
    after: &Sample,
    messages: usize,
    ticks_per_second: u64,
) -> Vec<CpuPerMessage> {
    watched
        .iter()
        .filter_map(|w| {
            let spent: Vec<u64> = w
                .pids
                .iter()
                .filter_map(|pid| {
                    let (b, a) = (before.0.get(pid)?, after.0.get(pid)?);
                    Some(a.saturating_sub(*b))
                })
                .collect();
            if spent.is_empty() {
                return None;
            }
            let ticks: u64 = spent.iter().sum();
            let seconds = ticks as f64 / ticks_per_second.max(1) as f64;
            Some(CpuPerMessage {
                process: w.name.to_owned(),
                processes: spent.len(),
                cpu_us_per_msg: seconds * 1e6 / messages.max(1) as f64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_from_this_process_own_stat() {
        let text = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
        let before = parse_stat(&text).expect("utime and stime");
        // Burn some CPU; the reading moves with it (by whole ticks).
        let hz = ticks_per_second();
        assert!((10..=10_000).contains(&hz), "{hz}");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = ticks(std::process::id()).unwrap();
        assert!(after > before, "{before} -> {after}");
        // At most the wall time passed, on however many threads this test
        // binary runs meanwhile: a sanity bound, not a measurement.
        assert!(after - before < hz * 60, "{before} -> {after}");

        let watched = [Watched {
            name: "bench",
            pids: vec![std::process::id()],
        }];
        let mut b = Sample::default();
        b.0.insert(std::process::id(), before);
        let a = sample(&watched);
        let per = per_message(&watched, &b, &a, 1000, hz);
        assert_eq!(per.len(), 1);
        assert_eq!((per[0].process.as_str(), per[0].processes), ("bench", 1));
        assert!(per[0].cpu_us_per_msg > 0.0, "{per:?}");
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(stat), Some(10));
        assert_eq!(parse_stat("42 (x) S 1"), None);
    }

    #[test]
    fn the_processes_are_told_apart_by_name_and_arguments() {
        let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let port = Some(6379);
        assert_eq!(
            classify("sms-service", &args("target/release/sms-service run"), port),
            Some("service")
        );
        assert_eq!(
            classify(
                "sms-service",
                &args("/b/sms-service --config x.toml run"),
                port
            ),
            Some("service")
        );
        assert_eq!(
            classify(
                "sms-service",
                &args("sms-service fake-provider --bind a"),
                port
            ),
            Some("fake provider")
        );
        assert_eq!(
            classify("sms-service", &args("sms-service bench -n 5"), port),
            None
        );
        assert_eq!(
            classify(
                "beam.smp",
                &args("beam.smp -- -s rabbit boot -noshell"),
                port
            ),
            Some("broker")
        );
        assert_eq!(
            classify("beam.smp", &args("beam.smp -- -s rabbit_ctl"), port),
            None
        );
        assert_eq!(
            classify("redis-server", &args("redis-server 127.0.0.1:6379"), port),
            Some("redis")
        );
        assert_eq!(
            classify("redis-server", &args("redis-server 127.0.0.1:6380"), port),
            None
        );
        assert_eq!(
            classify("redis-server", &args("redis-server"), port),
            Some("redis")
        );
    }
}
