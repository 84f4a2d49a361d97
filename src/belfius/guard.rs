//! Protection around every bank call: a retry policy per call type, a concurrency limit and a
//! token-bucket rate limit per bank host, and a circuit breaker per host. [`Guard::run`] wraps
//! each HTTP attempt `BelfiusClient` makes and is the one place that records the bank metrics
//! (docs/metrics.md). The policy and its reasons: docs/belfius.md §1.5.
//!
//! * **Retries** (backon, exponential with jitter, bounded by a count and an elapsed time):
//!   idempotent reads (status, details) on any transient failure; token grants and the DELETE
//!   cancellation only when the bank provably did not process the request (not sent, 429, 503);
//!   initiation POSTs never (the state machine's outcome-unknown path owns them). A 429's
//!   `Retry-After` replaces the back-off delay.
//! * **Limits**: at most `max_concurrency` calls in flight per host; a GCRA token bucket
//!   (`rate_per_sec`, `rate_burst`) per host.
//! * **Circuit breaker** per host: opens on a failure ratio over a sliding time window (with a
//!   minimum number of calls) or on a run of consecutive failures (5xx, timeouts, transport).
//!   While it is open, reads fail fast (`circuit_open`; the machine polls again later) and every
//!   other call **waits** inside the guard (`pis_circuit_backlog_commands`): no work is lost or
//!   rejected and no initiation attempt is spent on a call that was not made. After `open_for`
//!   one probe goes through (half-open): success closes the circuit, failure re-opens it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};
use tokio::sync::{Notify, Semaphore};

use super::BankError;
use crate::domain::model::Brand;
use crate::metrics::metrics;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Everything the guard is configured with; the worker's flags are [`GuardArgs`].
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    pub retry: RetryConfig,
    pub limits: HostLimits,
    pub breaker: BreakerConfig,
}

impl Default for GuardConfig {
    /// The worker's defaults (the `PIS_BANK_*` flags of [`GuardArgs`]).
    fn default() -> Self {
        Self {
            retry: RetryConfig {
                min_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(5),
                max_retries: 4,
                max_elapsed: Duration::from_secs(20),
            },
            limits: HostLimits {
                max_concurrency: 64,
                rate_per_sec: 0.0,
                rate_burst: 10,
            },
            breaker: BreakerConfig {
                window: Duration::from_secs(30),
                min_calls: 20,
                failure_percent: 50,
                consecutive_failures: 10,
                open_for: Duration::from_secs(15),
            },
        }
    }
}

impl GuardConfig {
    /// No retries, no limits, no breaker: every call is one HTTP attempt (contract tests).
    pub fn none() -> Self {
        Self {
            retry: RetryConfig {
                max_retries: 0,
                ..GuardConfig::default().retry
            },
            limits: HostLimits {
                max_concurrency: 0,
                rate_per_sec: 0.0,
                rate_burst: 1,
            },
            breaker: BreakerConfig::disabled(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// The first back-off delay; each later one doubles up to `max_delay`, and jitter adds a
    /// random part of up to the same again.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Retries after the first attempt (0: never retry).
    pub max_retries: usize,
    /// No retry is started if it would begin later than this after the first attempt.
    pub max_elapsed: Duration,
}

/// Per bank host (Belfius, Banx), per process.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLimits {
    /// Calls in flight at once (0: unlimited).
    pub max_concurrency: usize,
    /// Sustained calls per second (0: unlimited).
    pub rate_per_sec: f64,
    /// Calls that may go at once after an idle period (at least 1).
    pub rate_burst: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Outcomes older than this are forgotten.
    pub window: Duration,
    /// The failure ratio is judged only over at least this many calls in the window.
    pub min_calls: u32,
    /// Opens when at least this share (percent) of the window's calls failed (0: off).
    pub failure_percent: u32,
    /// Opens after this many failures in a row (0: off).
    pub consecutive_failures: u32,
    /// How long the circuit stays open before a probe is let through.
    pub open_for: Duration,
}

impl BreakerConfig {
    pub fn disabled() -> Self {
        Self {
            window: Duration::from_secs(30),
            min_calls: 1,
            failure_percent: 0,
            consecutive_failures: 0,
            open_for: Duration::from_secs(15),
        }
    }

    /// Whether either trigger is configured.
    pub fn enabled(&self) -> bool {
        self.failure_percent > 0 || self.consecutive_failures > 0
    }
}

/// The worker's flags for the guard (flattened into `pis-worker run`).
#[derive(Debug, Clone, clap::Args)]
pub struct GuardArgs {
    /// First retry delay of retryable bank calls (doubles per retry, with jitter).
    #[arg(long, env = "PIS_BANK_RETRY_MIN_DELAY_MS", default_value_t = 200)]
    pub bank_retry_min_delay_ms: u64,
    /// Largest retry delay.
    #[arg(long, env = "PIS_BANK_RETRY_MAX_DELAY_MS", default_value_t = 5_000)]
    pub bank_retry_max_delay_ms: u64,
    /// Retries per call after the first attempt (0: none). Initiation POSTs are never retried.
    #[arg(long, env = "PIS_BANK_RETRY_MAX_RETRIES", default_value_t = 4)]
    pub bank_retry_max_retries: usize,
    /// No retry starts later than this after the call's first attempt.
    #[arg(long, env = "PIS_BANK_RETRY_MAX_ELAPSED_MS", default_value_t = 20_000)]
    pub bank_retry_max_elapsed_ms: u64,
    /// Bank calls in flight at once, per bank host (0: unlimited).
    #[arg(long, env = "PIS_BANK_MAX_CONCURRENCY", default_value_t = 64)]
    pub bank_max_concurrency: usize,
    /// Bank calls per second, per bank host (token bucket; 0: unlimited).
    #[arg(long, env = "PIS_BANK_RATE_PER_SEC", default_value_t = 0.0)]
    pub bank_rate_per_sec: f64,
    /// Token bucket size: calls that may go at once after an idle period.
    #[arg(long, env = "PIS_BANK_RATE_BURST", default_value_t = 10)]
    pub bank_rate_burst: u32,
    /// Circuit breaker: sliding window of call outcomes.
    #[arg(long, env = "PIS_BANK_CIRCUIT_WINDOW_MS", default_value_t = 30_000)]
    pub bank_circuit_window_ms: u64,
    /// Circuit breaker: calls in the window before the failure ratio counts.
    #[arg(long, env = "PIS_BANK_CIRCUIT_MIN_CALLS", default_value_t = 20)]
    pub bank_circuit_min_calls: u32,
    /// Circuit breaker: opens at this failure share of the window, in percent (0: off).
    #[arg(long, env = "PIS_BANK_CIRCUIT_FAILURE_PERCENT", default_value_t = 50)]
    pub bank_circuit_failure_percent: u32,
    /// Circuit breaker: opens after this many failures in a row (0: off).
    #[arg(
        long,
        env = "PIS_BANK_CIRCUIT_CONSECUTIVE_FAILURES",
        default_value_t = 10
    )]
    pub bank_circuit_consecutive_failures: u32,
    /// Circuit breaker: how long it stays open before one probe call is let through.
    #[arg(long, env = "PIS_BANK_CIRCUIT_OPEN_MS", default_value_t = 15_000)]
    pub bank_circuit_open_ms: u64,
}

impl GuardArgs {
    pub fn config(&self) -> GuardConfig {
        GuardConfig {
            retry: RetryConfig {
                min_delay: Duration::from_millis(self.bank_retry_min_delay_ms),
                max_delay: Duration::from_millis(
                    self.bank_retry_max_delay_ms
                        .max(self.bank_retry_min_delay_ms),
                ),
                max_retries: self.bank_retry_max_retries,
                max_elapsed: Duration::from_millis(self.bank_retry_max_elapsed_ms),
            },
            limits: HostLimits {
                max_concurrency: self.bank_max_concurrency,
                rate_per_sec: if self.bank_rate_per_sec.is_finite() {
                    self.bank_rate_per_sec.max(0.0)
                } else {
                    0.0
                },
                rate_burst: self.bank_rate_burst.max(1),
            },
            breaker: BreakerConfig {
                window: Duration::from_millis(self.bank_circuit_window_ms),
                min_calls: self.bank_circuit_min_calls.max(1),
                failure_percent: self.bank_circuit_failure_percent.min(100),
                consecutive_failures: self.bank_circuit_consecutive_failures,
                open_for: Duration::from_millis(self.bank_circuit_open_ms),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Call types and their policy
// ---------------------------------------------------------------------------------------------

/// What a call does, which decides its retry policy and what it does while a circuit is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Initiate,
    InitiatePeriodic,
    InitiateBulk,
    Status,
    Details,
    Cancel,
    TokenExchange,
    TokenRefresh,
    /// `GET /consent-uris` (AIS or CAF consent).
    ConsentUris,
    /// `POST /funds-confirmations` (CAF).
    FundsConfirmation,
    /// `GET /accounts` (AIS).
    Accounts,
    /// `GET /accounts/{id}/transactions` (AIS).
    Transactions,
}

/// When a failed call may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Never: the initiation POST (outcome unknown is the machine's business).
    Never,
    /// On any transient failure: a read changes nothing at the bank.
    Idempotent,
    /// Only when the bank provably did not process it ([`provably_unprocessed`]): a single-use
    /// code, a rotating refresh token, a DELETE whose repeat would be refused.
    OnlyIfUnprocessed,
}

/// What a call does while its host's circuit is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileOpen {
    /// Waits in the guard until the circuit lets it through (counted in the backlog gauge).
    Hold,
    /// Fails at once with a `circuit_open` error (`BankError::NotSent`); its caller asks again.
    FailFast,
}

impl Call {
    pub const ALL: [Call; 12] = [
        Call::Initiate,
        Call::InitiatePeriodic,
        Call::InitiateBulk,
        Call::Status,
        Call::Details,
        Call::Cancel,
        Call::TokenExchange,
        Call::TokenRefresh,
        Call::ConsentUris,
        Call::FundsConfirmation,
        Call::Accounts,
        Call::Transactions,
    ];

    /// Whether this call creates a payment (its answer may be a redirect, docs/belfius.md).
    pub fn is_initiation(self) -> bool {
        match self {
            Call::Initiate | Call::InitiatePeriodic | Call::InitiateBulk => true,
            Call::Status
            | Call::Details
            | Call::Cancel
            | Call::TokenExchange
            | Call::TokenRefresh
            | Call::ConsentUris
            | Call::FundsConfirmation
            | Call::Accounts
            | Call::Transactions => false,
        }
    }

    /// The `endpoint` label of the bank metrics.
    pub fn endpoint(self) -> &'static str {
        match self {
            Call::Initiate => "initiate",
            Call::InitiatePeriodic => "periodic",
            Call::InitiateBulk => "bulk",
            Call::Status => "status",
            Call::Details => "details",
            Call::Cancel => "cancel",
            Call::TokenExchange | Call::TokenRefresh => "token",
            Call::ConsentUris => "consent_uris",
            Call::FundsConfirmation => "funds_confirmation",
            Call::Accounts => "accounts",
            Call::Transactions => "transactions",
        }
    }

    pub fn retry_class(self) -> RetryClass {
        match self {
            Call::Initiate | Call::InitiatePeriodic | Call::InitiateBulk => RetryClass::Never,
            // A repeated consent request only leaves one more pending consent to expire.
            // Reads. An unattended AIS read retried after a lost answer may spend one more of
            // the day's four calls: the caller's budget counts attempts, not successes.
            Call::Status
            | Call::Details
            | Call::ConsentUris
            | Call::FundsConfirmation
            | Call::Accounts
            | Call::Transactions => RetryClass::Idempotent,
            Call::Cancel | Call::TokenExchange | Call::TokenRefresh => {
                RetryClass::OnlyIfUnprocessed
            }
        }
    }

    pub fn while_open(self) -> WhileOpen {
        match self {
            // The machine re-schedules a failed poll; a details read is an operator's lookup.
            Call::Status | Call::Details => WhileOpen::FailFast,
            // A funds check never holds a payment up (docs/belfius.md, "Funds confirmation");
            // a consent request is answered to its client at once, either way.
            Call::ConsentUris | Call::FundsConfirmation | Call::Accounts | Call::Transactions => {
                WhileOpen::FailFast
            }
            // Failing these would spend an initiation attempt, drop a PSU's authorization code
            // or turn a client's cancellation into a refusal: they wait instead.
            Call::Initiate
            | Call::InitiatePeriodic
            | Call::InitiateBulk
            | Call::Cancel
            | Call::TokenExchange
            | Call::TokenRefresh => WhileOpen::Hold,
        }
    }
}

/// Whether the bank provably did not act on the request: it never left this process, or the
/// bank turned it away before processing (429; 503, "unable to handle the request", RFC 9110
/// §15.6.4 [I]: 500/502/504 may come after the work was done).
pub fn provably_unprocessed(error: &BankError) -> bool {
    match error {
        BankError::NotSent(_) | BankError::RateLimited { .. } => true,
        BankError::Unavailable { status, .. } => *status == 503,
        BankError::NoResponse(_)
        | BankError::Refused { .. }
        | BankError::Protocol(_)
        | BankError::Unrecognized(_) => false,
    }
}

/// Whether `error` from `call` may be retried by the guard.
pub fn should_retry(call: Call, error: &BankError) -> bool {
    match call.retry_class() {
        RetryClass::Never => false,
        RetryClass::Idempotent => match error {
            BankError::NotSent(_)
            | BankError::NoResponse(_)
            | BankError::RateLimited { .. }
            | BankError::Unavailable { .. } => true,
            BankError::Refused { .. } | BankError::Protocol(_) | BankError::Unrecognized(_) => {
                false
            }
        },
        RetryClass::OnlyIfUnprocessed => provably_unprocessed(error),
    }
}

/// The `status_class` label of `pis_bank_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    ClientError,
    TooManyRequests,
    ServerError,
    Timeout,
    Transport,
    CircuitOpen,
}

impl StatusClass {
    /// By HTTP status; 1xx/3xx (redirects are never followed) count with the refusals.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => StatusClass::Success,
            429 => StatusClass::TooManyRequests,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::ClientError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Success => "2xx",
            StatusClass::ClientError => "4xx",
            StatusClass::TooManyRequests => "429",
            StatusClass::ServerError => "5xx",
            StatusClass::Timeout => "timeout",
            StatusClass::Transport => "transport",
            StatusClass::CircuitOpen => "circuit_open",
        }
    }

    /// For the breaker: did the host answer? Any HTTP answer below 500 (a refusal or a 429
    /// included) shows a working host; 5xx, timeouts and transport failures do not.
    pub fn host_healthy(self) -> bool {
        match self {
            StatusClass::Success
            | StatusClass::ClientError
            | StatusClass::TooManyRequests
            | StatusClass::CircuitOpen => true,
            StatusClass::ServerError | StatusClass::Timeout | StatusClass::Transport => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker (pure: time is passed in)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing`: the one probe call is under way.
    HalfOpen {
        probing: bool,
    },
}

impl BreakerState {
    /// The value of `pis_circuit_breaker_state`.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Make the call; `probe`: it is the half-open probe whose outcome decides the state.
    Go { probe: bool },
    /// Not now: until the given instant, or (`None`) until the probe under way has ended.
    Wait { until: Option<Instant> },
}

/// Outcomes beyond this many are dropped from the window (oldest first).
const MAX_WINDOW_ENTRIES: usize = 10_000;

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// (when, host healthy) of recent calls, oldest first.
    window: VecDeque<(Instant, bool)>,
    consecutive_failures: u32,
    /// (calls, failures) in the window when it last opened from closed; `None` after a failed
    /// probe re-opened it.
    opened_by: Option<(usize, usize)>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            window: VecDeque::new(),
            consecutive_failures: 0,
            opened_by: None,
        }
    }

    /// Why it last opened: `Some((calls, failures))` in the window, `None` for a failed probe.
    pub fn opened_by(&self) -> Option<(usize, usize)> {
        self.opened_by
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        self.state == BreakerState::Closed
    }

    /// May a call go now? A held call (`hold`) leaves the probe to a fail-fast read for half a
    /// cool-down more, so a status poll rather than an initiation or a token grant tests the
    /// bank first; without reads, a held call probes.
    pub fn admit(&mut self, hold: bool, now: Instant) -> Admission {
        if !self.config.enabled() {
            return Admission::Go { probe: false };
        }
        match self.state {
            BreakerState::Closed => Admission::Go { probe: false },
            BreakerState::Open { until } => {
                let ready = if hold {
                    until + self.config.open_for / 2
                } else {
                    until
                };
                if now >= ready {
                    self.state = BreakerState::HalfOpen { probing: true };
                    Admission::Go { probe: true }
                } else {
                    Admission::Wait { until: Some(ready) }
                }
            }
            BreakerState::HalfOpen { probing: true } => Admission::Wait { until: None },
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                Admission::Go { probe: true }
            }
        }
    }

    /// Records a call's outcome; returns the new state when it changed.
    pub fn record(&mut self, probe: bool, healthy: bool, now: Instant) -> Option<BreakerState> {
        if !self.config.enabled() {
            return None;
        }
        if probe {
            self.state = if healthy {
                self.window.clear();
                self.consecutive_failures = 0;
                BreakerState::Closed
            } else {
                self.opened_by = None;
                BreakerState::Open {
                    until: now + self.config.open_for,
                }
            };
            return Some(self.state);
        }
        if !self.is_closed() {
            // Admitted before the circuit opened: the probe decides from here on.
            return None;
        }
        self.window.push_back((now, healthy));
        self.forget_before(now);
        if healthy {
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        if self.should_open() {
            self.opened_by = Some(self.window_counts());
            // Only a probe closes it again; what came before says nothing about then.
            self.window.clear();
            self.consecutive_failures = 0;
            self.state = BreakerState::Open {
                until: now + self.config.open_for,
            };
            return Some(self.state);
        }
        None
    }

    /// The probe ended without an outcome (its caller went away): the next call probes.
    pub fn abandon_probe(&mut self) -> Option<BreakerState> {
        match self.state {
            BreakerState::HalfOpen { probing: true } => {
                self.state = BreakerState::HalfOpen { probing: false };
                Some(self.state)
            }
            BreakerState::Closed
            | BreakerState::Open { .. }
            | BreakerState::HalfOpen { probing: false } => None,
        }
    }

    /// (calls, failures) in the window.
    pub fn window_counts(&self) -> (usize, usize) {
        let failures = self.window.iter().filter(|(_, ok)| !ok).count();
        (self.window.len(), failures)
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some((at, _)) = self.window.front() {
            if now.saturating_duration_since(*at) > self.config.window
                || self.window.len() > MAX_WINDOW_ENTRIES
            {
                self.window.pop_front();
            } else {
                break;
            }
        }
    }

    fn should_open(&self) -> bool {
        let (calls, failures) = self.window_counts();
        let ratio = self.config.failure_percent > 0
            && calls >= self.config.min_calls.max(1) as usize
            && failures * 100 >= self.config.failure_percent as usize * calls;
        let streak = self.config.consecutive_failures > 0
            && self.consecutive_failures >= self.config.consecutive_failures;
        ratio || streak
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limit: GCRA (a token bucket without a refill task)
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct RateLimiter {
    /// Time per call at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained schedule a burst may run: (burst - 1) intervals.
    tolerance: Duration,
    /// Theoretical arrival time of the next call.
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    fn new(rate_per_sec: f64, burst: u32) -> Option<Self> {
        if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / rate_per_sec);
        Some(Self {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            next: Mutex::new(None),
        })
    }

    /// Reserves the next slot; the instant at which it may be used.
    fn reserve(&self, now: Instant) -> Instant {
        let mut next = lock(&self.next);
        let theoretical = next.map_or(now, |at| at.max(now));
        *next = Some(theoretical + self.interval);
        theoretical
            .checked_sub(self.tolerance)
            .map_or(now, |at| at.max(now))
    }

    async fn acquire(&self) {
        let at = self.reserve(Instant::now());
        if at > Instant::now() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Per-host guard
// ---------------------------------------------------------------------------------------------

/// Why an attempt did not produce an answer, as the retry loop sees it.
#[derive(Debug)]
enum Failure {
    Bank(BankError),
    /// A fail-fast call found the circuit open: it was not made.
    CircuitOpen {
        host: &'static str,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Bank(error) => error.fmt(f),
            Failure::CircuitOpen { host } => write!(f, "circuit breaker open for {host}"),
        }
    }
}

impl Failure {
    fn retryable(&self, call: Call) -> bool {
        match self {
            Failure::Bank(error) => should_retry(call, error),
            Failure::CircuitOpen { .. } => false,
        }
    }

    fn into_bank_error(self) -> BankError {
        match self {
            Failure::Bank(error) => error,
            // Nothing left the process: a retry is safe, exactly NotSent's meaning.
            Failure::CircuitOpen { host } => BankError::NotSent(format!(
                "{CIRCUIT_OPEN_PREFIX} for the {host} host: the call was not made"
            )),
        }
    }
}

/// How the `NotSent` message of a call refused by an open circuit starts.
pub const CIRCUIT_OPEN_PREFIX: &str = "circuit breaker open";

/// One unit of `pis_circuit_backlog_commands` while alive.
struct Held;

impl Held {
    fn new() -> Self {
        metrics().circuit_backlog.inc();
        Held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics().circuit_backlog.dec();
    }
}

struct HostGuard {
    label: &'static str,
    breaker: Mutex<Breaker>,
    /// Woken when the breaker leaves half-open (closed, re-opened or probe abandoned).
    changed: Notify,
    permits: Option<Arc<Semaphore>>,
    rate: Option<RateLimiter>,
}

/// The right to make one call; a probe that ends without an outcome hands the probe on.
struct Ticket<'a> {
    host: &'a HostGuard,
    probe: bool,
    done: bool,
}

impl Ticket<'_> {
    fn finish(mut self, healthy: bool) {
        self.done = true;
        let changed = lock(&self.host.breaker).record(self.probe, healthy, Instant::now());
        self.host.publish(changed);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.done {
            let changed = lock(&self.host.breaker).abandon_probe();
            self.host.publish(changed);
        }
    }
}

impl HostGuard {
    fn new(label: &'static str, config: &GuardConfig) -> Self {
        metrics()
            .circuit_breaker_state
            .with_label_values(&[label])
            .set(0);
        Self {
            label,
            breaker: Mutex::new(Breaker::new(config.breaker.clone())),
            changed: Notify::new(),
            permits: (config.limits.max_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(config.limits.max_concurrency))),
            rate: RateLimiter::new(config.limits.rate_per_sec, config.limits.rate_burst),
        }
    }

    /// Gauge, log and wake-up for a state change.
    fn publish(&self, changed: Option<BreakerState>) {
        let Some(state) = changed else { return };
        metrics()
            .circuit_breaker_state
            .with_label_values(&[self.label])
            .set(state.gauge());
        match state {
            BreakerState::Open { until } => {
                let open_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
                match lock(&self.breaker).opened_by() {
                    Some((calls, failures)) => tracing::warn!(
                        host = self.label,
                        calls,
                        failures,
                        open_ms,
                        "circuit breaker open: bank calls are held (reads fail fast) until a probe succeeds"
                    ),
                    None => tracing::info!(
                        host = self.label,
                        open_ms,
                        "circuit breaker probe failed: open again"
                    ),
                }
            }
            BreakerState::HalfOpen { probing } => {
                tracing::info!(host = self.label, probing, "circuit breaker half-open");
            }
            BreakerState::Closed => {
                tracing::info!(host = self.label, "circuit breaker closed");
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits (held calls) or refuses (fail-fast calls) while the circuit is not closed.
    async fn admit(&self, call: Call, held: &mut Option<Held>) -> Option<Ticket<'_>> {
        let hold = call.while_open() == WhileOpen::Hold;
        loop {
            // Registered before the state is read, so a change in between is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (admission, changed) = {
                let mut breaker = lock(&self.breaker);
                let before = breaker.state();
                let admission = breaker.admit(hold, Instant::now());
                let after = breaker.state();
                (admission, (after != before).then_some(after))
            };
            self.publish(changed);
            match admission {
                Admission::Go { probe } => {
                    return Some(Ticket {
                        host: self,
                        probe,
                        done: false,
                    });
                }
                Admission::Wait { until } => {
                    if !hold {
                        return None;
                    }
                    if held.is_none() {
                        tracing::info!(
                            host = self.label,
                            endpoint = call.endpoint(),
                            "bank call held: circuit breaker open"
                        );
                        *held = Some(Held::new());
                    }
                    match until {
                        Some(at) => {
                            tokio::select! {
                                _ = &mut notified => {}
                                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                            }
                        }
                        None => notified.await,
                    }
                }
            }
        }
    }

    /// One HTTP attempt under the breaker, the rate limit and the concurrency limit.
    async fn attempt<T, F, Fut>(&self, call: Call, attempt: &F) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = (Result<T, BankError>, StatusClass)>,
    {
        let endpoint = call.endpoint();
        let circuit_open = || {
            metrics()
                .bank_requests
                .with_label_values(&[endpoint, StatusClass::CircuitOpen.as_str()])
                .inc();
            Failure::CircuitOpen { host: self.label }
        };
        let mut held = None;
        loop {
            let Some(ticket) = self.admit(call, &mut held).await else {
                return Err(circuit_open());
            };
            if let Some(rate) = &self.rate {
                rate.acquire().await;
            }
            let permit = match &self.permits {
                Some(permits) => Some(permits.clone().acquire_owned().await.map_err(|_| {
                    Failure::Bank(BankError::NotSent("bank call limiter closed".into()))
                })?),
                None => None,
            };
            if !ticket.probe && !lock(&self.breaker).is_closed() {
                // The circuit opened while this call waited for its turn.
                drop(permit);
                drop(ticket);
                match call.while_open() {
                    WhileOpen::FailFast => return Err(circuit_open()),
                    WhileOpen::Hold => continue,
                }
            }
            drop(held.take());
            let sent = Instant::now();
            let (result, class) = attempt().await;
            let m = metrics();
            m.bank_requests
                .with_label_values(&[endpoint, class.as_str()])
                .inc();
            m.bank_request_duration
                .with_label_values(&[endpoint])
                .observe(sent.elapsed().as_secs_f64());
            ticket.finish(class.host_healthy());
            drop(permit);
            return result.map_err(Failure::Bank);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

/// One per client (shared by its clones): a [`HostGuard`] per brand host.
pub struct Guard {
    config: GuardConfig,
    belfius: HostGuard,
    banx: HostGuard,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub fn new(config: GuardConfig) -> Self {
        Self {
            belfius: HostGuard::new(host_label(Brand::Belfius), &config),
            banx: HostGuard::new(host_label(Brand::Banx), &config),
            config,
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    /// The breaker state of a brand's host.
    pub fn breaker_state(&self, brand: Brand) -> BreakerState {
        lock(&self.host(brand).breaker).state()
    }

    fn host(&self, brand: Brand) -> &HostGuard {
        match brand {
            Brand::Belfius => &self.belfius,
            Brand::Banx => &self.banx,
        }
    }

    /// Runs `attempt` (one HTTP exchange, returning its result and status class) under the
    /// guard of `brand`'s host, retrying as `call`'s policy allows.
    pub async fn run<T, F, Fut>(&self, call: Call, brand: Brand, attempt: F) -> Result<T, BankError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = (Result<T, BankError>, StatusClass)>,
    {
        let host = self.host(brand);
        let retry = &self.config.retry;
        let started = Instant::now();
        let endpoint = call.endpoint();
        let backoff = ExponentialBuilder::new()
            .with_jitter()
            .with_factor(2.0)
            .with_min_delay(retry.min_delay)
            .with_max_delay(retry.max_delay.max(retry.min_delay))
            .with_max_times(retry.max_retries);
        let attempt = &attempt;
        let outcome = (move || host.attempt(call, attempt))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|failure: &Failure| failure.retryable(call))
            .adjust(|failure: &Failure, next: Option<Duration>| {
                // `None`: the retries are used up.
                let next = next?;
                let delay = match failure {
                    Failure::Bank(BankError::RateLimited {
                        retry_after: Some(after),
                    }) => *after,
                    Failure::Bank(_) | Failure::CircuitOpen { .. } => next,
                };
                (started.elapsed() + delay <= retry.max_elapsed).then_some(delay)
            })
            .notify(|failure: &Failure, delay: Duration| {
                metrics().bank_retries.with_label_values(&[endpoint]).inc();
                tracing::info!(
                    host = host.label,
                    endpoint,
                    error = %failure,
                    delay_ms = delay.as_millis() as u64,
                    "retrying bank call"
                );
            })
            .await;
        outcome.map_err(Failure::into_bank_error)
    }
}

/// The `host` label of `pis_circuit_breaker_state`.
pub fn host_label(brand: Brand) -> &'static str {
    match brand {
        Brand::Belfius => "belfius",
        Brand::Banx => "banx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::belfius::ErrorBody;

    fn breaker(min_calls: u32, percent: u32, streak: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            window: Duration::from_secs(10),
            min_calls,
            failure_percent: percent,
            consecutive_failures: streak,
            open_for: Duration::from_secs(4),
        })
    }

    fn unavailable(status: u16) -> BankError {
        BankError::Unavailable { status, body: None }
    }

    fn every_error() -> Vec<BankError> {
        vec![
            BankError::NotSent("connect".into()),
            BankError::NoResponse("timeout".into()),
            BankError::RateLimited {
                retry_after: Some(Duration::from_secs(1)),
            },
            unavailable(500),
            unavailable(502),
            unavailable(503),
            unavailable(504),
            BankError::Refused {
                status: 400,
                body: ErrorBody::default(),
            },
            BankError::Protocol("garbled".into()),
        ]
    }

    #[test]
    fn initiations_are_never_retried() {
        for call in [Call::Initiate, Call::InitiatePeriodic, Call::InitiateBulk] {
            for error in every_error() {
                assert!(!should_retry(call, &error), "{call:?} {error:?}");
            }
            assert_eq!(call.while_open(), WhileOpen::Hold);
        }
    }

    #[test]
    fn reads_are_retried_on_every_transient_failure() {
        for call in [Call::Status, Call::Details] {
            for error in every_error() {
                let expected = !matches!(error, BankError::Refused { .. } | BankError::Protocol(_));
                assert_eq!(should_retry(call, &error), expected, "{call:?} {error:?}");
            }
            assert_eq!(call.while_open(), WhileOpen::FailFast);
        }
    }

    #[test]
    fn grants_and_cancellations_are_retried_only_when_provably_unprocessed() {
        for call in [Call::TokenExchange, Call::TokenRefresh, Call::Cancel] {
            for error in every_error() {
                let expected = matches!(
                    error,
                    BankError::NotSent(_)
                        | BankError::RateLimited { .. }
                        | BankError::Unavailable { status: 503, .. }
                );
                assert_eq!(should_retry(call, &error), expected, "{call:?} {error:?}");
            }
            assert_eq!(call.while_open(), WhileOpen::Hold);
        }
    }

    #[test]
    fn endpoint_labels_are_the_documented_ones() {
        let documented = include_str!("../../docs/metrics.md");
        for call in Call::ALL {
            assert!(documented.contains(call.endpoint()), "{call:?}");
        }
        for class in [
            StatusClass::Success,
            StatusClass::ClientError,
            StatusClass::TooManyRequests,
            StatusClass::ServerError,
            StatusClass::Timeout,
            StatusClass::Transport,
            StatusClass::CircuitOpen,
        ] {
            assert!(documented.contains(class.as_str()), "{class:?}");
        }
        assert_eq!(StatusClass::of_status(201), StatusClass::Success);
        assert_eq!(StatusClass::of_status(302), StatusClass::ClientError);
        assert_eq!(StatusClass::of_status(404), StatusClass::ClientError);
        assert_eq!(StatusClass::of_status(429), StatusClass::TooManyRequests);
        assert_eq!(StatusClass::of_status(503), StatusClass::ServerError);
    }

    #[test]
    fn breaker_opens_on_the_failure_ratio_once_enough_calls_were_seen() {
        let mut b = breaker(4, 50, 0);
        let t = Instant::now();
        assert_eq!(b.record(false, false, t), None);
        assert_eq!(b.record(false, false, t), None);
        assert_eq!(b.record(false, true, t), None);
        // 4 calls, 3 failures: 75 % ≥ 50 %.
        let opened = b.record(false, false, t);
        assert!(
            matches!(opened, Some(BreakerState::Open { .. })),
            "{opened:?}"
        );
        assert_eq!(b.state().gauge(), 2);
        assert_eq!(b.opened_by(), Some((4, 3)));
    }

    #[test]
    fn breaker_stays_closed_below_the_ratio_and_forgets_old_outcomes() {
        let mut b = breaker(4, 50, 0);
        let t = Instant::now();
        for _ in 0..3 {
            b.record(false, false, t);
        }
        // Older than the window by the time the next calls come.
        let later = t + Duration::from_secs(11);
        for _ in 0..3 {
            assert_eq!(b.record(false, true, later), None);
        }
        assert_eq!(b.record(false, false, later), None);
        assert_eq!(b.window_counts(), (4, 1));
        assert!(b.is_closed());
    }

    #[test]
    fn breaker_opens_on_consecutive_failures() {
        let mut b = breaker(100, 0, 3);
        let t = Instant::now();
        b.record(false, false, t);
        b.record(false, false, t);
        b.record(false, true, t);
        b.record(false, false, t);
        b.record(false, false, t);
        assert!(b.is_closed());
        assert!(b.record(false, false, t).is_some());
        assert!(!b.is_closed());
    }

    #[test]
    fn open_breaker_probes_after_the_cool_down_and_closes_or_reopens() {
        let mut b = breaker(1, 50, 0);
        let t = Instant::now();
        b.record(false, false, t);
        let until = t + Duration::from_secs(4);
        assert_eq!(b.state(), BreakerState::Open { until });
        // Reads fail fast, held calls wait, until the cool-down is over.
        assert_eq!(
            b.admit(false, t + Duration::from_secs(1)),
            Admission::Wait { until: Some(until) }
        );
        // A held call leaves the probe to a read for another half cool-down.
        assert_eq!(
            b.admit(true, until),
            Admission::Wait {
                until: Some(until + Duration::from_secs(2))
            }
        );
        assert_eq!(b.admit(false, until), Admission::Go { probe: true });
        assert_eq!(b.state().gauge(), 1);
        // Only one probe at a time.
        assert_eq!(b.admit(false, until), Admission::Wait { until: None });
        assert_eq!(b.admit(true, until), Admission::Wait { until: None });
        // The probe fails: open again for a full cool-down.
        let reopened = until + Duration::from_secs(1);
        assert_eq!(
            b.record(true, false, reopened),
            Some(BreakerState::Open {
                until: reopened + Duration::from_secs(4)
            })
        );
        assert_eq!(b.opened_by(), None);
        // Without reads, a held call probes; it succeeds: closed, window cleared.
        let late = reopened + Duration::from_secs(6);
        assert_eq!(b.admit(true, late), Admission::Go { probe: true });
        assert_eq!(b.record(true, true, late), Some(BreakerState::Closed));
        assert_eq!(b.window_counts(), (0, 0));
        assert_eq!(b.admit(true, late), Admission::Go { probe: false });
    }

    #[test]
    fn abandoned_probe_hands_the_probe_to_the_next_call() {
        let mut b = breaker(1, 50, 0);
        let t = Instant::now();
        b.record(false, false, t);
        let later = t + Duration::from_secs(5);
        assert_eq!(b.admit(false, later), Admission::Go { probe: true });
        assert_eq!(
            b.abandon_probe(),
            Some(BreakerState::HalfOpen { probing: false })
        );
        assert_eq!(b.admit(true, later), Admission::Go { probe: true });
        // Outcomes of calls admitted before the circuit opened do not count while it is open.
        assert_eq!(b.record(false, false, later), None);
    }

    #[test]
    fn disabled_breaker_never_opens() {
        let mut b = Breaker::new(BreakerConfig::disabled());
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.record(false, false, t), None);
        }
        assert_eq!(b.admit(true, t), Admission::Go { probe: false });
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(10.0, 3).expect("limited");
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.reserve(t), t);
        }
        assert_eq!(limiter.reserve(t), t + Duration::from_millis(100));
        assert_eq!(limiter.reserve(t), t + Duration::from_millis(200));
        // After an idle second the burst is available again.
        let later = t + Duration::from_secs(2);
        assert_eq!(limiter.reserve(later), later);
        assert!(RateLimiter::new(0.0, 5).is_none());
        assert!(RateLimiter::new(f64::NAN, 5).is_none());
    }

    #[test]
    fn flags_default_to_the_documented_defaults() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            guard: GuardArgs,
        }
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(cli.guard.config(), GuardConfig::default());
        let docs = include_str!("../../docs/belfius.md");
        for flag in [
            "PIS_BANK_RETRY_MIN_DELAY_MS",
            "PIS_BANK_RETRY_MAX_DELAY_MS",
            "PIS_BANK_RETRY_MAX_RETRIES",
            "PIS_BANK_RETRY_MAX_ELAPSED_MS",
            "PIS_BANK_MAX_CONCURRENCY",
            "PIS_BANK_RATE_PER_SEC",
            "PIS_BANK_RATE_BURST",
            "PIS_BANK_CIRCUIT_WINDOW_MS",
            "PIS_BANK_CIRCUIT_MIN_CALLS",
            "PIS_BANK_CIRCUIT_FAILURE_PERCENT",
            "PIS_BANK_CIRCUIT_CONSECUTIVE_FAILURES",
            "PIS_BANK_CIRCUIT_OPEN_MS",
            "PIS_BANK_CONNECT_TIMEOUT_MS",
            "PIS_BANK_REQUEST_TIMEOUT_MS",
        ] {
            assert!(
                docs.contains(flag),
                "{flag} is not documented in docs/belfius.md"
            );
        }
    }

    /// One scripted answer of a fake attempt.
    type Answer = (Result<u32, BankError>, StatusClass);

    fn fast_config(max_retries: usize) -> GuardConfig {
        GuardConfig {
            retry: RetryConfig {
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
                max_retries,
                max_elapsed: Duration::from_secs(5),
            },
            ..GuardConfig::none()
        }
    }

    async fn run_script(
        guard: &Guard,
        call: Call,
        script: Vec<Answer>,
    ) -> (Result<u32, BankError>, usize) {
        let answers = Arc::new(Mutex::new(VecDeque::from(script)));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let result = guard
            .run(call, Brand::Belfius, || {
                let answers = answers.clone();
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    lock(&answers)
                        .pop_front()
                        .unwrap_or((Ok(0), StatusClass::Success))
                }
            })
            .await;
        (result, calls.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn run_retries_a_read_until_it_succeeds_and_never_an_initiation() {
        let guard = Guard::new(fast_config(3));
        let (result, calls) = run_script(
            &guard,
            Call::Status,
            vec![
                (Err(unavailable(503)), StatusClass::ServerError),
                (
                    Err(BankError::NoResponse("reset".into())),
                    StatusClass::Transport,
                ),
                (Ok(7), StatusClass::Success),
            ],
        )
        .await;
        assert_eq!(result.expect("third attempt answers"), 7);
        assert_eq!(calls, 3);

        let (result, calls) = run_script(
            &guard,
            Call::Initiate,
            vec![(Err(unavailable(503)), StatusClass::ServerError)],
        )
        .await;
        assert!(matches!(result, Err(BankError::Unavailable { .. })));
        assert_eq!(calls, 1);

        // A refresh whose answer was lost is not sent again; one turned away by a 503 is.
        let (result, calls) = run_script(
            &guard,
            Call::TokenRefresh,
            vec![(
                Err(BankError::NoResponse("timeout".into())),
                StatusClass::Timeout,
            )],
        )
        .await;
        assert!(matches!(result, Err(BankError::NoResponse(_))));
        assert_eq!(calls, 1);
        let (result, calls) = run_script(
            &guard,
            Call::TokenRefresh,
            vec![
                (Err(unavailable(503)), StatusClass::ServerError),
                (Ok(1), StatusClass::Success),
            ],
        )
        .await;
        assert_eq!(result.expect("retried"), 1);
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn run_gives_up_after_max_retries_and_when_retry_after_exceeds_the_budget() {
        let guard = Guard::new(fast_config(2));
        let (result, calls) = run_script(
            &guard,
            Call::Details,
            vec![
                (Err(unavailable(500)), StatusClass::ServerError),
                (Err(unavailable(500)), StatusClass::ServerError),
                (Err(unavailable(500)), StatusClass::ServerError),
                (Ok(1), StatusClass::Success),
            ],
        )
        .await;
        assert!(matches!(
            result,
            Err(BankError::Unavailable { status: 500, .. })
        ));
        assert_eq!(calls, 3);

        let (result, calls) = run_script(
            &guard,
            Call::Status,
            vec![(
                Err(BankError::RateLimited {
                    retry_after: Some(Duration::from_secs(60)),
                }),
                StatusClass::TooManyRequests,
            )],
        )
        .await;
        assert!(matches!(result, Err(BankError::RateLimited { .. })));
        assert_eq!(
            calls, 1,
            "a Retry-After beyond the elapsed budget ends the call"
        );
    }

    #[tokio::test]
    async fn open_circuit_fails_reads_fast_and_holds_other_calls_until_a_probe_succeeds() {
        let config = GuardConfig {
            breaker: BreakerConfig {
                window: Duration::from_secs(10),
                min_calls: 2,
                failure_percent: 50,
                consecutive_failures: 0,
                open_for: Duration::from_millis(200),
            },
            ..fast_config(0)
        };
        let guard = Arc::new(Guard::new(config));
        for _ in 0..2 {
            let (result, _) = run_script(
                &guard,
                Call::Status,
                vec![(Err(unavailable(503)), StatusClass::ServerError)],
            )
            .await;
            assert!(result.is_err());
        }
        assert!(matches!(
            guard.breaker_state(Brand::Belfius),
            BreakerState::Open { .. }
        ));
        assert!(guard.breaker_state(Brand::Banx) == BreakerState::Closed);
        // A read fails fast without calling.
        let (result, calls) = run_script(&guard, Call::Status, vec![]).await;
        match result {
            Err(BankError::NotSent(message)) => {
                assert!(message.starts_with(CIRCUIT_OPEN_PREFIX), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls, 0);
        // A cancellation waits, then is the probe (no reads come), succeeds and closes.
        let (result, calls) = run_script(&guard, Call::Cancel, vec![]).await;
        assert_eq!(result.expect("held, then made"), 0);
        assert_eq!(calls, 1);
        assert_eq!(guard.breaker_state(Brand::Belfius), BreakerState::Closed);
    }
}
