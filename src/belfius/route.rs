//! Which interface carries a brand's payment calls: the dedicated API or the fallback
//! (contingency) interface of PSD2 RTS art. 33 (docs/belfius.md §7.5, docs/architecture.md
//! "Fallback switch-over").
//!
//! A brand goes to the fallback when the dedicated host's circuit breaker (`belfius::guard`)
//! has not been closed for [`RouteConfig::after`], and comes back once it has been closed again
//! for [`RouteConfig::back_after`]. The decision is pure ([`BrandRoute::observe`], time passed
//! in); [`Router`] holds one per brand for the whole process, shared by every partition owner,
//! and publishes the route metrics. The engine side (which calls follow the route, the probes
//! that let the breaker see a recovery) is `engine::route`.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::fallback::{FallbackClient, FallbackEndpoints};
use super::guard::{BreakerState, GuardConfig, host_label};
use super::httpsig::DigestLabel;
use crate::domain::model::{BankPaymentId, Brand, PaymentKind, PaymentProduct};
use crate::metrics::metrics;

/// Where a brand's initiations and status polls go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Dedicated,
    Fallback,
}

impl Interface {
    pub const ALL: [Interface; 2] = [Interface::Dedicated, Interface::Fallback];

    /// The `interface` label of `pis_bank_route` and the `to` label of
    /// `pis_bank_route_switches_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Dedicated => "dedicated",
            Interface::Fallback => "fallback",
        }
    }

    fn other(self) -> Self {
        match self {
            Interface::Dedicated => Interface::Fallback,
            Interface::Fallback => Interface::Dedicated,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteConfig {
    /// How long the dedicated circuit must have been not closed (open or half-open) before the
    /// brand goes to the fallback.
    pub after: Duration,
    /// How long it must have been closed again before the brand comes back: a single lucky
    /// probe during a flapping outage does not move the traffic.
    pub back_after: Duration,
}

/// One brand's route. Starts on the dedicated interface (a process knows nothing of an outage
/// before its own breaker has seen it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrandRoute {
    interface: Interface,
    /// Since when the condition for leaving the current interface has held without a break.
    since: Option<Instant>,
}

impl Default for BrandRoute {
    fn default() -> Self {
        Self::new()
    }
}

impl BrandRoute {
    pub fn new() -> Self {
        Self {
            interface: Interface::Dedicated,
            since: None,
        }
    }

    pub fn interface(&self) -> Interface {
        self.interface
    }

    /// Takes in whether the dedicated host's circuit is closed at `now`; returns the new
    /// interface when the route switched. Any observation that breaks the condition starts its
    /// clock again: the delays are about an uninterrupted state, not a total.
    pub fn observe(
        &mut self,
        dedicated_closed: bool,
        now: Instant,
        config: &RouteConfig,
    ) -> Option<Interface> {
        let (leaving, delay) = match self.interface {
            Interface::Dedicated => (!dedicated_closed, config.after),
            Interface::Fallback => (dedicated_closed, config.back_after),
        };
        if !leaving {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) < delay {
            return None;
        }
        self.interface = self.interface.other();
        self.since = None;
        Some(self.interface)
    }
}

/// A payment the bank knows, whose status read is a real, harmless request to send the
/// dedicated host as its breaker's probe (`engine::route`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub kind: PaymentKind,
    pub product: PaymentProduct,
    pub id: BankPaymentId,
}

#[derive(Debug, Default)]
struct PerBrand<T> {
    belfius: T,
    banx: T,
}

impl<T> PerBrand<T> {
    fn get_mut(&mut self, brand: Brand) -> &mut T {
        match brand {
            Brand::Belfius => &mut self.belfius,
            Brand::Banx => &mut self.banx,
        }
    }

    fn get(&self, brand: Brand) -> &T {
        match brand {
            Brand::Belfius => &self.belfius,
            Brand::Banx => &self.banx,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The routes of both brands, for the whole process, and the fallback client they lead to.
pub struct Router {
    config: RouteConfig,
    fallback: FallbackClient,
    routes: Mutex<PerBrand<BrandRoute>>,
    targets: Mutex<PerBrand<Option<ProbeTarget>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Both brands on the dedicated interface; the route gauges exist only from here on, so a
    /// worker without the fallback exports none (a 0 on both would read as "no route").
    pub fn new(fallback: FallbackClient, config: RouteConfig) -> Self {
        let m = metrics();
        for brand in Brand::ALL {
            let label = host_label(brand);
            for interface in Interface::ALL {
                m.bank_route
                    .with_label_values(&[label, interface.as_str()])
                    .set(i64::from(interface == Interface::Dedicated));
                m.bank_route_switches
                    .with_label_values(&[label, interface.as_str()]);
            }
        }
        Self {
            config,
            fallback,
            routes: Mutex::new(PerBrand::default()),
            targets: Mutex::new(PerBrand::default()),
        }
    }

    pub fn config(&self) -> &RouteConfig {
        &self.config
    }

    pub fn fallback(&self) -> &FallbackClient {
        &self.fallback
    }

    /// The route of `brand` after taking in its dedicated breaker's state at `now`.
    pub fn observe(&self, brand: Brand, breaker: BreakerState, now: Instant) -> Interface {
        let closed = breaker == BreakerState::Closed;
        let (switched, interface) = {
            let mut routes = lock(&self.routes);
            let route = routes.get_mut(brand);
            let switched = route.observe(closed, now, &self.config);
            (switched, route.interface())
        };
        if let Some(to) = switched {
            self.publish(brand, to);
        }
        interface
    }

    /// The route as last decided, without taking anything in.
    pub fn interface(&self, brand: Brand) -> Interface {
        lock(&self.routes).get(brand).interface()
    }

    fn publish(&self, brand: Brand, to: Interface) {
        let label = host_label(brand);
        let m = metrics();
        for interface in Interface::ALL {
            m.bank_route
                .with_label_values(&[label, interface.as_str()])
                .set(i64::from(interface == to));
        }
        m.bank_route_switches
            .with_label_values(&[label, to.as_str()])
            .inc();
        match to {
            Interface::Fallback => tracing::warn!(
                brand = label,
                after_secs = self.config.after.as_secs(),
                "bank route switched to the FALLBACK interface: the dedicated API's circuit stayed open; initiations and status polls go to the fallback"
            ),
            Interface::Dedicated => tracing::info!(
                brand = label,
                back_after_secs = self.config.back_after.as_secs(),
                "bank route switched back to the dedicated API: its circuit has stayed closed"
            ),
        }
    }

    /// Remembers a payment of `brand` the bank knows, for the dedicated host's probes.
    pub fn remember(&self, brand: Brand, target: ProbeTarget) {
        *lock(&self.targets).get_mut(brand) = Some(target);
    }

    pub fn probe_target(&self, brand: Brand) -> Option<ProbeTarget> {
        lock(&self.targets).get(brand).clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// Everything the worker needs to switch to the fallback interface.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackSetup {
    pub endpoints: FallbackEndpoints,
    pub route: RouteConfig,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FallbackConfigError {
    #[error(
        "the fallback interface is enabled (PIS_FALLBACK_ENABLED) but not configured: set {0}. Its endpoints are not public and come from onboarding (docs/belfius.md §7.2)"
    )]
    Missing(String),
    #[error(
        "the fallback interface is enabled (PIS_FALLBACK_ENABLED) but the circuit breaker is off (PIS_BANK_CIRCUIT_FAILURE_PERCENT and PIS_BANK_CIRCUIT_CONSECUTIVE_FAILURES both 0): the switch-over follows the breaker, so it would never happen"
    )]
    BreakerDisabled,
}

/// The worker's flags for the fallback interface (flattened into `pis-worker run`). Off by
/// default: the endpoints must come from onboarding.
#[derive(Debug, Clone, clap::Args)]
pub struct FallbackArgs {
    /// Switch a brand to the fallback interface while its dedicated API is down
    /// (docs/belfius.md §7.5). Needs the PIS_FALLBACK_* endpoints below and the QSeal key.
    #[arg(long, env = "PIS_FALLBACK_ENABLED")]
    pub fallback_enabled: bool,
    /// Fallback base URL of the Belfius brand's host (from onboarding; a base path is kept).
    #[arg(long, env = "PIS_FALLBACK_BELFIUS_URL")]
    pub fallback_belfius_url: Option<url::Url>,
    /// Fallback base URL of the Banx brand's host (from onboarding).
    #[arg(long, env = "PIS_FALLBACK_BANX_URL")]
    pub fallback_banx_url: Option<url::Url>,
    /// Path of the signed first call that opens a session, e.g. /fallback/session.
    #[arg(long, env = "PIS_FALLBACK_SESSION_PATH")]
    pub fallback_session_path: Option<String>,
    /// Path of the payments resource: POST {path}/{product}, GET {path}/{product}/{id}/status.
    #[arg(long, env = "PIS_FALLBACK_PAYMENTS_PATH")]
    pub fallback_payments_path: Option<String>,
    /// `keyId` of the session call's HTTP signature, e.g. SN=<QSeal serial>,CA=<issuer DN>.
    #[arg(long, env = "PIS_FALLBACK_KEY_ID")]
    pub fallback_key_id: Option<String>,
    /// `data.type` of the session request.
    #[arg(
        long,
        env = "PIS_FALLBACK_SESSION_TYPE",
        default_value = "sample-token"
    )]
    pub fallback_session_type: String,
    /// `data.attributes.appReference` of the session request.
    #[arg(long, env = "PIS_FALLBACK_APP_REFERENCE", default_value = "12345")]
    pub fallback_app_reference: String,
    /// How `Digest` is spelt: SHA-256 (RFC 5843) or SHA256 (as the portal writes it).
    #[arg(long, env = "PIS_FALLBACK_DIGEST", default_value = "SHA-256", value_parser = ["SHA-256", "SHA256"])]
    pub fallback_digest: String,
    /// Switch a brand to the fallback once its dedicated circuit has not closed for this long.
    #[arg(long, env = "PIS_FALLBACK_AFTER_SECS", default_value_t = 120)]
    pub fallback_after_secs: u64,
    /// Switch back once the dedicated circuit has stayed closed for this long.
    #[arg(long, env = "PIS_FALLBACK_BACK_AFTER_SECS", default_value_t = 30)]
    pub fallback_back_after_secs: u64,
}

impl FallbackArgs {
    /// `None` when the fallback is off; an error when it is on without its endpoints or without
    /// a circuit breaker to follow.
    pub fn setup(&self, guard: &GuardConfig) -> Result<Option<FallbackSetup>, FallbackConfigError> {
        if !self.fallback_enabled {
            return Ok(None);
        }
        let (
            Some(belfius_url),
            Some(banx_url),
            Some(session_path),
            Some(payments_path),
            Some(key_id),
        ) = (
            &self.fallback_belfius_url,
            &self.fallback_banx_url,
            &self.fallback_session_path,
            &self.fallback_payments_path,
            &self.fallback_key_id,
        )
        else {
            let missing: Vec<&str> = [
                (
                    self.fallback_belfius_url.is_none(),
                    "PIS_FALLBACK_BELFIUS_URL",
                ),
                (self.fallback_banx_url.is_none(), "PIS_FALLBACK_BANX_URL"),
                (
                    self.fallback_session_path.is_none(),
                    "PIS_FALLBACK_SESSION_PATH",
                ),
                (
                    self.fallback_payments_path.is_none(),
                    "PIS_FALLBACK_PAYMENTS_PATH",
                ),
                (self.fallback_key_id.is_none(), "PIS_FALLBACK_KEY_ID"),
            ]
            .into_iter()
            .filter_map(|(absent, name)| absent.then_some(name))
            .collect();
            return Err(FallbackConfigError::Missing(missing.join(", ")));
        };
        if !guard.breaker.enabled() {
            return Err(FallbackConfigError::BreakerDisabled);
        }
        let mut endpoints = FallbackEndpoints::new(
            belfius_url.clone(),
            banx_url.clone(),
            session_path.clone(),
            payments_path.clone(),
            key_id.clone(),
        );
        endpoints.session_type = self.fallback_session_type.clone();
        endpoints.app_reference = self.fallback_app_reference.clone();
        endpoints.digest_label = if self.fallback_digest == DigestLabel::Portal.as_str() {
            DigestLabel::Portal
        } else {
            DigestLabel::Rfc5843
        };
        Ok(Some(FallbackSetup {
            endpoints,
            route: RouteConfig {
                after: Duration::from_secs(self.fallback_after_secs),
                back_after: Duration::from_secs(self.fallback_back_after_secs),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    const CONFIG: RouteConfig = RouteConfig {
        after: Duration::from_secs(120),
        back_after: Duration::from_secs(30),
    };

    fn secs(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    #[test]
    fn goes_to_the_fallback_once_the_circuit_stayed_open_for_the_delay() {
        let t0 = Instant::now();
        let mut route = BrandRoute::new();
        assert_eq!(route.observe(true, t0, &CONFIG), None);
        assert_eq!(route.observe(false, secs(t0, 10), &CONFIG), None);
        assert_eq!(route.observe(false, secs(t0, 129), &CONFIG), None);
        assert_eq!(route.interface(), Interface::Dedicated);
        assert_eq!(
            route.observe(false, secs(t0, 130), &CONFIG),
            Some(Interface::Fallback)
        );
        assert_eq!(route.interface(), Interface::Fallback);
        // Still open: stays, no second switch.
        assert_eq!(route.observe(false, secs(t0, 500), &CONFIG), None);
        assert_eq!(route.interface(), Interface::Fallback);
    }

    #[test]
    fn a_circuit_that_closes_in_between_starts_the_delay_again() {
        let t0 = Instant::now();
        let mut route = BrandRoute::new();
        route.observe(false, t0, &CONFIG);
        route.observe(false, secs(t0, 100), &CONFIG);
        // A probe succeeded: closed for a moment, then open again.
        route.observe(true, secs(t0, 101), &CONFIG);
        assert_eq!(route.observe(false, secs(t0, 102), &CONFIG), None);
        assert_eq!(route.observe(false, secs(t0, 221), &CONFIG), None);
        assert_eq!(
            route.observe(false, secs(t0, 222), &CONFIG),
            Some(Interface::Fallback)
        );
    }

    #[test]
    fn comes_back_after_the_circuit_stayed_closed_for_the_hold() {
        let t0 = Instant::now();
        let mut route = BrandRoute::new();
        route.observe(false, t0, &CONFIG);
        route.observe(false, secs(t0, 120), &CONFIG);
        assert_eq!(route.interface(), Interface::Fallback);
        // Flapping: closed 20 s, open again, closed again.
        assert_eq!(route.observe(true, secs(t0, 200), &CONFIG), None);
        assert_eq!(route.observe(true, secs(t0, 220), &CONFIG), None);
        assert_eq!(route.observe(false, secs(t0, 221), &CONFIG), None);
        assert_eq!(route.observe(true, secs(t0, 240), &CONFIG), None);
        assert_eq!(route.observe(true, secs(t0, 269), &CONFIG), None);
        assert_eq!(route.interface(), Interface::Fallback);
        assert_eq!(
            route.observe(true, secs(t0, 270), &CONFIG),
            Some(Interface::Dedicated)
        );
        // And the next outage needs the full delay again.
        assert_eq!(route.observe(false, secs(t0, 271), &CONFIG), None);
        assert_eq!(route.observe(false, secs(t0, 390), &CONFIG), None);
        assert_eq!(
            route.observe(false, secs(t0, 391), &CONFIG),
            Some(Interface::Fallback)
        );
    }

    #[test]
    fn zero_delays_switch_at_the_first_observation() {
        let now = Instant::now();
        let config = RouteConfig {
            after: Duration::ZERO,
            back_after: Duration::ZERO,
        };
        let mut route = BrandRoute::new();
        assert_eq!(route.observe(true, now, &config), None);
        assert_eq!(
            route.observe(false, now, &config),
            Some(Interface::Fallback)
        );
        assert_eq!(
            route.observe(true, now, &config),
            Some(Interface::Dedicated)
        );
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        fallback: FallbackArgs,
    }

    fn parse(args: &[&str]) -> FallbackArgs {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").fallback
    }

    const ENDPOINTS: [&str; 10] = [
        "--fallback-belfius-url",
        "https://fallback.belfius.example/psd2",
        "--fallback-banx-url",
        "https://fallback.banx.example",
        "--fallback-session-path",
        "/fallback/session",
        "--fallback-payments-path",
        "/fallback/payments",
        "--fallback-key-id",
        "SN=1,CA=test",
    ];

    #[test]
    fn off_by_default_even_with_endpoints() {
        let guard = GuardConfig::default();
        assert_eq!(parse(&[]).setup(&guard), Ok(None));
        assert_eq!(parse(&ENDPOINTS).setup(&guard), Ok(None));
    }

    #[test]
    fn enabled_without_endpoints_names_what_is_missing() {
        let guard = GuardConfig::default();
        let error = parse(&["--fallback-enabled"])
            .setup(&guard)
            .expect_err("refused");
        let text = error.to_string();
        for name in [
            "PIS_FALLBACK_BELFIUS_URL",
            "PIS_FALLBACK_BANX_URL",
            "PIS_FALLBACK_SESSION_PATH",
            "PIS_FALLBACK_PAYMENTS_PATH",
            "PIS_FALLBACK_KEY_ID",
        ] {
            assert!(text.contains(name), "{text}");
        }
        let error = parse(&[
            "--fallback-enabled",
            "--fallback-belfius-url",
            "https://a.example",
            "--fallback-banx-url",
            "https://b.example",
        ])
        .setup(&guard)
        .expect_err("refused");
        assert_eq!(
            error,
            FallbackConfigError::Missing(
                "PIS_FALLBACK_SESSION_PATH, PIS_FALLBACK_PAYMENTS_PATH, PIS_FALLBACK_KEY_ID".into()
            )
        );
    }

    #[test]
    fn enabled_without_a_circuit_breaker_is_refused() {
        let mut args = vec!["--fallback-enabled"];
        args.extend_from_slice(&ENDPOINTS);
        assert_eq!(
            parse(&args).setup(&GuardConfig::none()),
            Err(FallbackConfigError::BreakerDisabled)
        );
    }

    #[test]
    fn enabled_with_endpoints_gives_the_setup() {
        let mut args = vec![
            "--fallback-enabled",
            "--fallback-after-secs",
            "45",
            "--fallback-digest",
            "SHA256",
        ];
        args.extend_from_slice(&ENDPOINTS);
        let setup = parse(&args)
            .setup(&GuardConfig::default())
            .expect("valid")
            .expect("enabled");
        assert_eq!(
            setup.route,
            RouteConfig {
                after: Duration::from_secs(45),
                back_after: Duration::from_secs(30),
            }
        );
        let e = &setup.endpoints;
        assert_eq!(
            e.belfius_base_url.as_str(),
            "https://fallback.belfius.example/psd2"
        );
        assert_eq!(e.banx_base_url.as_str(), "https://fallback.banx.example/");
        assert_eq!(e.session_path, "/fallback/session");
        assert_eq!(e.payments_path, "/fallback/payments");
        assert_eq!(e.key_id, "SN=1,CA=test");
        assert_eq!(e.digest_label, DigestLabel::Portal);
        assert_eq!(e.session_type, "sample-token");
        assert_eq!(e.app_reference, "12345");
    }
}
