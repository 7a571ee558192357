//! The provider instances the core sends through, each with its own
//! breaker and rate limit ([`ProviderGuard`]) and metrics, and the routes
//! that pick them by the destination's longest E.164 prefix.

use std::sync::Arc;

use super::guard::ProviderGuard;
use crate::breaker::CircuitBreaker;
use crate::ports::SmsService;

/// One provider instance.
pub struct ProviderInstance {
    pub sms: Arc<dyn SmsService>,
    pub guard: ProviderGuard,
    pub(super) meters: ProviderMeters,
}

/// The metric handles of one instance, registered (at 0) when it is built.
pub(super) struct ProviderMeters {
    accepted: metrics::Counter,
    transient: metrics::Counter,
    ambiguous: metrics::Counter,
    route_refused: metrics::Counter,
    rejected: metrics::Counter,
    account: metrics::Counter,
    pub(super) accepted_messages: metrics::Counter,
    pub(super) ambiguous_answers: metrics::Counter,
    pub(super) seconds: metrics::Histogram,
}

impl ProviderMeters {
    fn new(provider: &str) -> Self {
        let requests = |outcome: &'static str| {
            let counter = metrics::counter!("sms_provider_requests_total", "provider" => provider.to_owned(), "outcome" => outcome);
            counter.increment(0);
            counter
        };
        let accepted_messages =
            metrics::counter!("sms_provider_accepted_total", "provider" => provider.to_owned());
        accepted_messages.increment(0);
        let ambiguous_answers =
            metrics::counter!("sms_provider_ambiguous_total", "provider" => provider.to_owned());
        ambiguous_answers.increment(0);
        Self {
            accepted: requests("accepted"),
            transient: requests("transient"),
            ambiguous: requests("ambiguous"),
            route_refused: requests("route_refused"),
            rejected: requests("rejected"),
            account: requests("account"),
            accepted_messages,
            ambiguous_answers,
            seconds: metrics::histogram!("sms_provider_request_duration_seconds", "provider" => provider.to_owned()),
        }
    }

    /// Counts one call by its class.
    pub(super) fn outcome(&self, class: &str) {
        match class {
            "accepted" => &self.accepted,
            "transient" => &self.transient,
            "ambiguous" => &self.ambiguous,
            "route_refused" => &self.route_refused,
            "rejected" => &self.rejected,
            _ => &self.account,
        }
        .increment(1);
    }
}

/// The instances and the routes over them.
pub struct Providers {
    instances: Vec<ProviderInstance>,
    /// (prefix, instance indices in order of preference), longest prefix
    /// first.
    routes: Vec<(String, Vec<usize>)>,
}

impl Providers {
    /// `instances` with `routes` of (prefixes, instance names). Every name
    /// must be an instance's, and a `+` prefix must cover every number.
    pub fn new(
        instances: Vec<(Arc<dyn SmsService>, ProviderGuard)>,
        routes: &[(Vec<String>, Vec<String>)],
    ) -> Result<Self, String> {
        let instances: Vec<ProviderInstance> = instances
            .into_iter()
            .map(|(sms, guard)| ProviderInstance {
                meters: ProviderMeters::new(sms.name()),
                sms,
                guard,
            })
            .collect();
        let mut table = Vec::new();
        for (prefixes, names) in routes {
            let indices = names
                .iter()
                .map(|name| {
                    instances
                        .iter()
                        .position(|i| i.sms.name() == name)
                        .ok_or_else(|| format!("route names an unknown provider {name:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            for prefix in prefixes {
                table.push((prefix.clone(), indices.clone()));
            }
        }
        if !table.iter().any(|(prefix, _)| prefix == "+") {
            return Err("no route covers every number (+)".into());
        }
        table.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Self {
            instances,
            routes: table,
        })
    }

    /// One instance serving every number.
    pub fn single(sms: Arc<dyn SmsService>, guard: ProviderGuard) -> Self {
        let name = sms.name().to_owned();
        Self::new(vec![(sms, guard)], &[(vec!["+".into()], vec![name])]).expect("one instance on +")
    }

    /// The instances for `number`, in order of preference: the route of
    /// the longest matching prefix.
    pub fn route(&self, number: &str) -> &[usize] {
        self.routes
            .iter()
            .find(|(prefix, _)| number.starts_with(prefix.as_str()))
            .map(|(_, indices)| indices.as_slice())
            .unwrap_or(&[])
    }

    pub fn get(&self, index: usize) -> &ProviderInstance {
        &self.instances[index]
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.instances.iter().position(|i| i.sms.name() == name)
    }

    /// Every instance's breaker, for the processing loop: it takes work
    /// while any of them admits it.
    pub fn breakers(&self) -> Vec<Arc<CircuitBreaker>> {
        self.instances
            .iter()
            .map(|i| i.guard.breaker.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ScriptedProvider;

    fn named(name: &str) -> (Arc<dyn SmsService>, ProviderGuard) {
        (
            ScriptedProvider::named(name, vec![]),
            ProviderGuard::unlimited(),
        )
    }

    #[test]
    fn the_longest_matching_prefix_picks_the_route() {
        let routes = [
            (
                vec!["+254".into(), "+256".into()],
                vec!["at".into(), "tw".into()],
            ),
            (vec!["+2547".into()], vec!["safaricom".into()]),
            (vec!["+".into()], vec!["tw".into()]),
        ];
        let p =
            Providers::new(vec![named("at"), named("tw"), named("safaricom")], &routes).unwrap();
        let names = |number: &str| -> Vec<&str> {
            p.route(number)
                .iter()
                .map(|i| p.get(*i).sms.name())
                .collect()
        };
        assert_eq!(names("+254712345678"), ["safaricom"]);
        assert_eq!(names("+254112345678"), ["at", "tw"]);
        assert_eq!(names("+256712345678"), ["at", "tw"]);
        assert_eq!(names("+447700900123"), ["tw"]);
        assert_eq!(p.index_of("tw"), Some(1));
    }

    #[test]
    fn routes_must_name_known_instances_and_cover_every_number() {
        let unknown = [(vec!["+".into()], vec!["nobody".into()])];
        assert!(Providers::new(vec![named("a")], &unknown).is_err());
        let partial = [(vec!["+254".into()], vec!["a".into()])];
        assert!(Providers::new(vec![named("a")], &partial).is_err());
    }
}

#[cfg(test)]
mod metric_tests {
    use super::*;
    use crate::testing::ScriptedProvider;

    #[test]
    fn each_instance_exports_its_counters_at_zero_from_the_start() {
        let text_before = crate::telemetry::metrics().render();
        assert!(!text_before.contains("provider=\"zero-check\""));
        let sms: Arc<dyn SmsService> = ScriptedProvider::named("zero-check", vec![]);
        let _p = Providers::single(sms, ProviderGuard::unlimited());
        let text = crate::telemetry::metrics().render();
        for class in [
            "accepted",
            "transient",
            "ambiguous",
            "route_refused",
            "rejected",
            "account",
        ] {
            let series = format!(
                "sms_provider_requests_total{{provider=\"zero-check\",outcome=\"{class}\"}} 0"
            );
            assert!(text.contains(&series), "{series} missing");
        }
        assert!(text.contains("sms_provider_accepted_total{provider=\"zero-check\"} 0"));
        assert!(text.contains("sms_provider_ambiguous_total{provider=\"zero-check\"} 0"));
    }
}
