//! The worker's Prometheus metrics (docs/metrics.md). One process-wide registry: the edges record
//! into it, `/metrics` renders it. Labels are bounded sets (never a payment or PSU id).

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub commands_consumed: IntCounterVec,
    pub state_transitions: IntCounterVec,
    pub consent_transitions: IntCounterVec,
    pub funds_checks: IntCounterVec,
    pub settlement_checks: IntCounterVec,
    pub payments: IntGaugeVec,
    pub oldest_payment_age: IntGaugeVec,
    pub sca_pending_duration: Histogram,
    pub bank_requests: IntCounterVec,
    pub bank_request_duration: HistogramVec,
    pub bank_retries: IntCounterVec,
    pub circuit_breaker_state: IntGaugeVec,
    pub circuit_backlog: IntGauge,
    pub bank_route: IntGaugeVec,
    pub bank_route_switches: IntCounterVec,
    pub fallback_requests: IntCounterVec,
    pub outcome_unknown: IntGauge,
    pub dlq_records: IntCounterVec,
    pub token_refreshes: IntCounterVec,
    pub token_exchanges: IntCounterVec,
    pub bank_answers_unrecognized: IntCounterVec,
    pub bank_status_unrecognized: prometheus::IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub restore_duration: Histogram,
    pub restore_last_duration: prometheus::Gauge,
    pub restores_in_progress: IntGauge,
    pub producer_queue_depth: IntGauge,
    pub broker_reachable: IntGauge,
    pub fenced_owners: prometheus::IntCounter,
    pub token_refresh_refusals: IntCounterVec,
    pub initiation_calls: IntCounterVec,
    pub token_initiation_fallbacks: IntCounterVec,
    pub state_quarantined_records: IntGauge,
    pub orphans_suspected: IntCounterVec,
    pub payments_retired: prometheus::IntCounter,
    pub retired_ids: IntGauge,
    pub snapshot_age: IntGaugeVec,
    pub restore_backlog: IntGaugeVec,
    pub snapshots: IntCounterVec,
    pub restores: IntCounterVec,
    pub restore_last_records: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, name, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, name, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, name, metric)
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    metric: M,
) -> M {
    // Names are constants of this module: a clash is a programming error caught by the tests.
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("registering {name}: {e}"));
    metric
}

/// Latency buckets for bank calls and restores, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Time a PSU takes to sign: seconds to an hour.
const SCA_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let sca_pending_duration = register(
            r,
            "pis_sca_pending_duration_seconds",
            Histogram::with_opts(
                HistogramOpts::new(
                    "pis_sca_pending_duration_seconds",
                    "Time from SCA_PENDING to the next state",
                )
                .buckets(SCA_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let bank_request_duration = register(
            r,
            "pis_bank_request_duration_seconds",
            HistogramVec::new(
                HistogramOpts::new(
                    "pis_bank_request_duration_seconds",
                    "Bank call latency, retries not included",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint"],
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let restore_duration = register(
            r,
            "pis_restore_duration_seconds",
            Histogram::with_opts(
                HistogramOpts::new(
                    "pis_restore_duration_seconds",
                    "Time to restore one partition's state",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let restore_last_duration = register(
            r,
            "pis_restore_last_duration_seconds",
            prometheus::Gauge::new(
                "pis_restore_last_duration_seconds",
                "The last partition restore's duration",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let fenced_owners = register(
            r,
            "pis_fenced_owners_total",
            prometheus::IntCounter::new(
                "pis_fenced_owners_total",
                "Partition owners that stopped because a newer owner claimed the partition",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let payments_retired = register(
            r,
            "pis_payments_retired_total",
            prometheus::IntCounter::new(
                "pis_payments_retired_total",
                "Final payments that left memory and the state topic after the retention horizon (their ids are remembered as retired)",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
        );
        let build_info = gauge_vec(r, "pis_build_info", "Always 1", &["version"]);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            commands_consumed: counter(
                r,
                "pis_commands_consumed_total",
                "Commands read and what became of them",
                &["type", "outcome"],
            ),
            state_transitions: counter(
                r,
                "pis_state_transitions_total",
                "Persisted state changes",
                &["from", "to"],
            ),
            consent_transitions: counter(
                r,
                "pis_consent_transitions_total",
                "Persisted consent state changes",
                &["scope", "to"],
            ),
            funds_checks: counter(
                r,
                "pis_funds_checks_total",
                "Funds checks asked for on initiations, by outcome",
                &["outcome"],
            ),
            settlement_checks: counter(
                r,
                "pis_settlement_checks_total",
                "Settlements looked for in the debtor's history, by outcome",
                &["outcome"],
            ),
            payments: gauge_vec(
                r,
                "pis_payments",
                "Payments per state in the partitions this worker owns",
                &["state"],
            ),
            oldest_payment_age: gauge_vec(
                r,
                "pis_oldest_payment_age_seconds",
                "Age in that state of the oldest payment in it, in owned partitions",
                &["state"],
            ),
            sca_pending_duration,
            bank_requests: counter(
                r,
                "pis_bank_requests_total",
                "Bank calls and how they ended",
                &["endpoint", "status_class"],
            ),
            bank_request_duration,
            bank_retries: counter(
                r,
                "pis_bank_retries_total",
                "Retries of idempotent bank calls",
                &["endpoint"],
            ),
            circuit_breaker_state: gauge_vec(
                r,
                "pis_circuit_breaker_state",
                "0 closed, 1 half-open, 2 open",
                &["host"],
            ),
            circuit_backlog: gauge(
                r,
                "pis_circuit_backlog_commands",
                "Bank work held while a circuit is open",
            ),
            bank_route: gauge_vec(
                r,
                "pis_bank_route",
                "1 on the interface a brand's initiations and status polls go to (only with the fallback enabled)",
                &["brand", "interface"],
            ),
            bank_route_switches: counter(
                r,
                "pis_bank_route_switches_total",
                "Switches of a brand's route between the dedicated API and the fallback interface",
                &["brand", "to"],
            ),
            fallback_requests: counter(
                r,
                "pis_bank_fallback_requests_total",
                "Requests to the fallback interface and how they ended",
                &["endpoint", "status_class"],
            ),
            outcome_unknown: gauge(
                r,
                "pis_outcome_unknown_payments",
                "Payments in OUTCOME_UNKNOWN in owned partitions",
            ),
            dlq_records: counter(
                r,
                "pis_dlq_records_total",
                "Records dead-lettered, by error class",
                &["class"],
            ),
            token_refreshes: counter(
                r,
                "pis_token_refreshes_total",
                "refresh_token grants",
                &["result"],
            ),
            token_exchanges: counter(
                r,
                "pis_token_exchanges_total",
                "authorization_code grants",
                &["result"],
            ),
            bank_answers_unrecognized: counter(
                r,
                "pis_bank_answers_unrecognized_total",
                "initiation answers that match no known dialect (the payment ends REJECTED, BANK_ANSWER_UNRECOGNIZED)",
                &["endpoint"],
            ),
            bank_status_unrecognized: register(
                r,
                "pis_bank_status_unrecognized_total",
                prometheus::IntCounter::new(
                    "pis_bank_status_unrecognized_total",
                    "Status answers with a transaction status the worker cannot interpret (the payment is polled at the slow rate until mapped)",
                )
                .unwrap_or_else(|e| panic!("metric: {e}")),
            ),
            consumer_lag: gauge_vec(
                r,
                "pis_consumer_lag",
                "Consumer lag from librdkafka statistics",
                &["topic", "partition"],
            ),
            assigned_partitions: gauge(r, "pis_assigned_partitions", "Partitions this worker owns"),
            restore_duration,
            restore_last_duration,
            restores_in_progress: gauge(
                r,
                "pis_restores_in_progress",
                "Partitions assigned but not yet restored",
            ),
            producer_queue_depth: gauge(
                r,
                "pis_producer_queue_depth",
                "Messages in the producer queue",
            ),
            broker_reachable: gauge(
                r,
                "pis_broker_reachable",
                "1 when the broker answered a metadata request in the last 30 s",
            ),
            fenced_owners,
            token_refresh_refusals: counter(
                r,
                "pis_token_refresh_refusals_total",
                "Token refreshes the bank refused: revoked (the grant is dead, the pair is deleted) or other (the pair is kept; check the worker's credentials)",
                &["kind"],
            ),
            initiation_calls: counter(
                r,
                "pis_initiation_calls_total",
                "Initiation calls sent to the bank, by how they authorize: token (a returning PSU's access token) or pkce",
                &["auth"],
            ),
            token_initiation_fallbacks: counter(
                r,
                "pis_token_initiation_fallbacks_total",
                "Attempts meant for the PSU's access token that went with PKCE instead: refused (the bank refused the token), refresh_failed, no_token (the pair was gone or unusable when its turn came)",
                &["why"],
            ),
            state_quarantined_records: gauge(
                r,
                "pis_state_quarantined_records",
                "State records of owned partitions that could not be read; the payments they name are held",
            ),
            orphans_suspected: counter(
                r,
                "pis_initiations_unanswered_total",
                "Initiation attempts that got no answer (a bank-side payment may exist), by what the worker did next",
                &["policy"],
            ),
            payments_retired,
            retired_ids: gauge(
                r,
                "pis_retired_ids",
                "Retired payment ids of owned partitions still remembered (a command for one is dead-lettered PAYMENT_RETIRED)",
            ),
            snapshot_age: gauge_vec(
                r,
                "pis_state_snapshot_age_seconds",
                "Seconds since the newest snapshot of an owned state partition was recorded (where its next restore starts); since its owner started if none was yet",
                &["partition"],
            ),
            restore_backlog: gauge_vec(
                r,
                "pis_restore_backlog_records",
                "State records a restore of an owned partition would read now (from its newest snapshot)",
                &["partition"],
            ),
            snapshots: counter(
                r,
                "pis_state_snapshots_total",
                "Snapshots of state partitions by outcome: committed (restores start there), superseded (a newer one was recorded), failed",
                &["outcome"],
            ),
            restores: counter(
                r,
                "pis_restores_total",
                "Partition restores by where they started: snapshot, or beginning (no usable snapshot)",
                &["from"],
            ),
            restore_last_records: gauge(
                r,
                "pis_restore_last_records",
                "State records the last partition restore read",
            ),
            registry,
        }
    }

    /// Creates the series of the known label values at zero, so that `rate()` and
    /// `increase()` see the first event of each (a series born at 1 has no increase).
    fn with_known_series(self) -> Self {
        const STATUS_CLASSES: [&str; 7] = [
            "2xx",
            "4xx",
            "429",
            "5xx",
            "timeout",
            "transport",
            "circuit_open",
        ];
        const COMMAND_TYPES: [&str; 10] = [
            "initiate",
            "initiate_periodic",
            "initiate_bulk",
            "complete_sca",
            "cancel",
            "refresh",
            "resolve",
            "request_consent",
            "complete_consent",
            "unknown",
        ];
        const OUTCOMES: [&str; 4] = ["accepted", "duplicate", "rejected", "dead_lettered"];
        for endpoint in crate::belfius::guard::Call::ALL.map(crate::belfius::guard::Call::endpoint)
        {
            self.bank_retries.with_label_values(&[endpoint]);
            for class in STATUS_CLASSES {
                self.bank_requests.with_label_values(&[endpoint, class]);
            }
        }
        for kind in COMMAND_TYPES {
            for outcome in OUTCOMES {
                self.commands_consumed.with_label_values(&[kind, outcome]);
            }
        }
        for outcome in ["committed", "superseded", "failed"] {
            self.snapshots.with_label_values(&[outcome]);
        }
        for from in ["snapshot", "beginning"] {
            self.restores.with_label_values(&[from]);
        }
        for endpoint in ["initiate", "periodic", "bulk"] {
            self.bank_answers_unrecognized
                .with_label_values(&[endpoint]);
        }
        for result in ["ok", "failed"] {
            self.token_refreshes.with_label_values(&[result]);
            self.token_exchanges.with_label_values(&[result]);
        }
        for host in ["belfius", "banx"] {
            self.circuit_breaker_state.with_label_values(&[host]);
        }
        for endpoint in crate::belfius::fallback::FallbackCall::ALL
            .map(crate::belfius::fallback::FallbackCall::endpoint)
        {
            // circuit_open never happens there: the fallback has no breaker.
            for class in &STATUS_CLASSES[..6] {
                self.fallback_requests.with_label_values(&[endpoint, class]);
            }
        }
        for kind in ["revoked", "other"] {
            self.token_refresh_refusals.with_label_values(&[kind]);
        }
        for auth in ["token", "pkce"] {
            self.initiation_calls.with_label_values(&[auth]);
        }
        for why in FALLBACK_REASONS {
            self.token_initiation_fallbacks.with_label_values(&[why]);
        }
        for policy in ["hold", "reinitiate"] {
            self.orphans_suspected.with_label_values(&[policy]);
        }
        self
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which the typed API prevents.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Why an attempt meant for the PSU's token went with PKCE (`pis_token_initiation_fallbacks_total`).
pub const FALLBACK_REASONS: [&str; 3] = ["refused", "refresh_failed", "no_token"];

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().with_known_series())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders_with_its_documented_name() {
        let m = metrics();
        m.commands_consumed
            .with_label_values(&["initiate", "accepted"])
            .inc();
        m.bank_request_duration
            .with_label_values(&["status"])
            .observe(0.02);
        let text = m.render();
        let documented = include_str!("../docs/metrics.md");
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                documented.contains(&format!("`{name}`")),
                "{name} is exported but not documented in docs/metrics.md"
            );
        }
        // Other tests of this process count commands too: at least this one.
        let counted = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "pis_commands_consumed_total{outcome=\"accepted\",type=\"initiate\"} ",
                )
            })
            .and_then(|v| v.parse::<f64>().ok());
        assert!(counted.is_some_and(|n| n >= 1.0), "{counted:?}");
    }
}
