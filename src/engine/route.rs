//! The engine side of the fallback switch-over (docs/architecture.md, "Fallback switch-over"):
//! which of an owner's bank calls follow the brand's route (`belfius::route::Router`), and the
//! keeper task that keeps the routes current and lets the dedicated host's breaker see a
//! recovery. Without a router (the fallback is off, the default) every call goes to
//! `engine::bank` unchanged.
//!
//! * A single payment's initiation and status poll follow the route: the fallback has nothing
//!   else (no periodic or bulk payments, no token endpoint, no cancellation), so those stay on
//!   the dedicated API and its guard holds or fails them while its circuit is open, as without
//!   a fallback.
//! * One call, one interface: a call is never repeated on the other interface, and both
//!   interfaces' results go through the same classification (`bank::initiation_answer`,
//!   `bank::status_input`), so a switch-over cannot initiate a payment twice.
//! * An initiation on the dedicated route waits here, not in the guard, while the dedicated
//!   circuit is not closed: it then leaves for whichever comes first, the circuit closing or
//!   the route switching to the fallback. Nothing has been sent while it waits, so the wait can
//!   be abandoned at any time (a revoke drops it). It never becomes the breaker's probe.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::bank;
use super::core::{BankAnswer, BankCall};
use crate::belfius::BelfiusClient;
use crate::belfius::guard::{BreakerState, host_label};
use crate::belfius::route::{Interface, ProbeTarget, Router};
use crate::domain::machine::{Input, Payment};
use crate::domain::model::{Brand, Order, PaymentKind, PaymentOrder};

/// How often the keeper looks at the breakers, and a waiting initiation at its route: the
/// resolution of the switch-over delays.
pub const TICK: Duration = Duration::from_millis(250);

/// Runs one bank call of an owner's core on the interface its brand's route says.
pub async fn run_call(
    bank: &BelfiusClient,
    router: Option<&Router>,
    payment: &Payment,
    call: BankCall,
) -> BankAnswer {
    let Some(router) = router else {
        return bank::run_call(bank, payment, call).await;
    };
    let single = match &payment.order {
        Some(Order::Single(order)) => Some(order),
        Some(Order::Standing(_) | Order::Bulk(_)) | None => None,
    };
    match (call, single) {
        (BankCall::Initiate { access_token }, Some(order)) => {
            match initiation_interface(bank, router, order.brand).await {
                Interface::Fallback => initiate_via_fallback(router, order).await,
                Interface::Dedicated => bank::initiate(bank, payment, access_token.as_ref()).await,
            }
        }
        (BankCall::Status, Some(order)) => {
            let interface = current(bank, router, order.brand);
            if let Some(id) = &payment.bank_payment_id {
                router.remember(
                    order.brand,
                    ProbeTarget {
                        kind: PaymentKind::Single,
                        product: order.product,
                        id: id.clone(),
                    },
                );
            }
            match interface {
                Interface::Fallback => BankAnswer::Input(Box::new(
                    status_via_fallback(bank, router, payment, order).await,
                )),
                Interface::Dedicated => {
                    BankAnswer::Input(Box::new(bank::check_status(bank, payment).await))
                }
            }
        }
        (
            call @ (BankCall::Initiate { .. }
            | BankCall::Status
            | BankCall::Exchange
            | BankCall::Cancel { .. }
            | BankCall::Refresh { .. }),
            _,
        ) => bank::run_call(bank, payment, call).await,
    }
}

fn current(bank: &BelfiusClient, router: &Router, brand: Brand) -> Interface {
    router.observe(brand, bank.guard().breaker_state(brand), Instant::now())
}

/// One unit of `pis_circuit_backlog_commands` while an initiation waits for its route.
struct Waiting;

impl Waiting {
    fn new() -> Self {
        crate::metrics::metrics().circuit_backlog.inc();
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        crate::metrics::metrics().circuit_backlog.dec();
    }
}

/// Where an initiation goes: the fallback when the route says so; the dedicated API once its
/// circuit is closed; until either, it waits (module doc).
async fn initiation_interface(bank: &BelfiusClient, router: &Router, brand: Brand) -> Interface {
    let mut waiting = None;
    loop {
        let breaker = bank.guard().breaker_state(brand);
        match router.observe(brand, breaker, Instant::now()) {
            Interface::Fallback => return Interface::Fallback,
            Interface::Dedicated if breaker == BreakerState::Closed => {
                return Interface::Dedicated;
            }
            Interface::Dedicated => {}
        }
        if waiting.is_none() {
            tracing::info!(
                brand = host_label(brand),
                after_secs = router.config().after.as_secs(),
                "initiation waits: the dedicated circuit is open; it goes to the fallback if it stays open"
            );
            waiting = Some(Waiting::new());
        }
        tokio::time::sleep(TICK).await;
    }
}

async fn initiate_via_fallback(router: &Router, order: &PaymentOrder) -> BankAnswer {
    let result = router.fallback().initiate(order).await;
    if let Ok(initiated) = &result {
        router.remember(
            order.brand,
            ProbeTarget {
                kind: PaymentKind::Single,
                product: order.product,
                id: initiated.bank_payment_id.clone(),
            },
        );
    }
    // The fallback never carries the PSU's token: no refusal can be the token's.
    bank::initiation_answer(result, false)
}

async fn status_via_fallback(
    bank: &BelfiusClient,
    router: &Router,
    payment: &Payment,
    order: &PaymentOrder,
) -> Input {
    let Some(id) = &payment.bank_payment_id else {
        return Input::StatusCheckFailed {
            message: "internal: no bank payment id to look up".into(),
        };
    };
    let result = router
        .fallback()
        .status(order.brand, order.product, id)
        .await;
    bank::status_input(
        &bank.config().status_map,
        payment,
        PaymentKind::Single,
        result,
    )
}

/// Whether the breaker would let a probe through now (what a fail-fast read is admitted as).
fn probe_due(state: BreakerState, now: Instant) -> bool {
    match state {
        BreakerState::Open { until } => now >= until,
        BreakerState::HalfOpen { probing } => !probing,
        BreakerState::Closed => false,
    }
}

/// Keeps both brands' routes current every [`TICK`], so a route switches (and its gauge
/// moves) without waiting for traffic, and sends the dedicated host's breaker its probes: when
/// a probe is due, a status read of a payment the bank knows (`Router::probe_target`) goes
/// through the guard like any poll. Without it nothing would probe while the polls go to the
/// fallback, and the route would never come back; it also spares waiting initiations from
/// ever being the probe. Runs until the process ends.
pub fn spawn_keeper(bank: BelfiusClient, router: Arc<Router>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let probing: [Arc<AtomicBool>; 2] = Default::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (brand, in_flight) in Brand::ALL.into_iter().zip(&probing) {
                let now = Instant::now();
                let state = bank.guard().breaker_state(brand);
                router.observe(brand, state, now);
                if !probe_due(state, now) {
                    continue;
                }
                let Some(target) = router.probe_target(brand) else {
                    continue;
                };
                if in_flight.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (bank, in_flight) = (bank.clone(), in_flight.clone());
                tokio::spawn(async move {
                    // The guard records the outcome in the breaker; the answer itself is not
                    // needed.
                    let outcome = bank
                        .payment_status(target.kind, brand, target.product, &target.id)
                        .await;
                    tracing::debug!(
                        brand = host_label(brand),
                        ok = outcome.is_ok(),
                        "dedicated API probed"
                    );
                    in_flight.store(false, Ordering::Release);
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::belfius::{BankError, ErrorBody};
    use crate::domain::machine::InitiationFailure;

    fn every_error() -> Vec<BankError> {
        vec![
            BankError::NotSent("x".into()),
            BankError::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
            },
            BankError::RateLimited { retry_after: None },
            BankError::NoResponse("timeout".into()),
            BankError::Unavailable {
                status: 503,
                body: None,
            },
            BankError::Unavailable {
                status: 500,
                body: None,
            },
            BankError::Protocol("x".into()),
            BankError::Refused {
                status: 401,
                body: ErrorBody {
                    error: "FAILED_SECURITY_VALIDATION".into(),
                    error_code: "GEN-1203-100003".into(),
                    error_description: String::new(),
                },
            },
            BankError::Refused {
                status: 400,
                body: ErrorBody {
                    error: "INVALID_FIELD".into(),
                    error_code: "GEN-1202-100002".into(),
                    error_description: String::new(),
                },
            },
            BankError::Unrecognized("x".into()),
        ]
    }

    fn failure(answer: BankAnswer) -> InitiationFailure {
        match answer {
            BankAnswer::Input(input) => match *input {
                Input::InitiationFailed(failure) => failure,
                other => unreachable!("{other:?}"),
            },
            other => unreachable!("{other:?}"),
        }
    }

    /// The fallback's result goes through the classification of a PKCE initiation on the
    /// dedicated API: an unanswered attempt is unknown, a refused one ends, an unsent one is
    /// retried, on either interface alike.
    #[test]
    fn an_initiation_is_classified_alike_on_both_interfaces() {
        for error in every_error() {
            let expected = bank::classify_initiation_error(&error);
            let via_fallback = failure(bank::initiation_answer(Err(error.clone()), false));
            assert_eq!(via_fallback, expected, "{error:?}");
            let unknown = matches!(
                error,
                BankError::NoResponse(_) | BankError::Unavailable { .. } | BankError::Protocol(_)
            );
            assert_eq!(
                matches!(via_fallback, InitiationFailure::Unknown { .. }),
                unknown,
                "{error:?}"
            );
        }
    }

    #[test]
    fn a_probe_is_due_when_a_read_would_be_admitted_as_one() {
        let now = Instant::now();
        assert!(!probe_due(BreakerState::Closed, now));
        assert!(!probe_due(
            BreakerState::Open {
                until: now + Duration::from_secs(1)
            },
            now
        ));
        assert!(probe_due(BreakerState::Open { until: now }, now));
        assert!(probe_due(BreakerState::HalfOpen { probing: false }, now));
        assert!(!probe_due(BreakerState::HalfOpen { probing: true }, now));
    }
}
