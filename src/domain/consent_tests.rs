//! The consent machine, state by state and input by input.

use secrecy::{ExposeSecret as _, SecretString};

use super::*;

const T0: Millis = 1_800_000_000_000;

fn policy() -> ConsentPolicy {
    ConsentPolicy::default()
}

fn request(scope: ConsentScope) -> ConsentRequest {
    ConsentRequest {
        brand: Brand::Belfius,
        scope,
        account_iban: match scope {
            ConsentScope::Caf => Some("BE68539007547034".into()),
            ConsentScope::Ais => None,
        },
        language: Language::Fr,
        redirect_uri: "https://client.example/consent".into(),
    }
}

fn ask(current: Option<&Consent>, command: &str, consent: &str, now: Millis) -> ConsentStep {
    step(
        current,
        ConsentInput::Request {
            command_id: CommandId::new(command),
            consent_id: ConsentId::new(consent),
            psu_id: PsuId::new("psu-1"),
            request: request(ConsentScope::Ais),
            pkce_verifier: SecretString::from("v".repeat(64)),
            sca_state: format!("state-{consent}"),
        },
        &policy(),
        now,
    )
}

fn apply(current: &Consent, input: ConsentInput, now: Millis) -> ConsentStep {
    step(Some(current), input, &policy(), now)
}

fn requested() -> Consent {
    ask(None, "c1", "consent-1", T0)
        .expect("a first request")
        .consent
}

fn pending() -> Consent {
    apply(
        &requested(),
        ConsentInput::UriReceived {
            consent_uri: "https://bank.example/consent/1".into(),
        },
        T0 + 10,
    )
    .expect("uri")
    .consent
}

fn complete(command: &str, outcome: ConsentOutcome, state: Option<&str>) -> ConsentInput {
    ConsentInput::Complete {
        command_id: CommandId::new(command),
        outcome,
        state: state.map(str::to_owned),
    }
}

fn code() -> ConsentOutcome {
    ConsentOutcome::Code(SecretString::from("the-code"))
}

fn granted(valid_until: Option<Millis>) -> Consent {
    apply(
        &pending(),
        ConsentInput::TokensStored { valid_until },
        T0 + 30,
    )
    .expect("granted")
    .consent
}

fn all_states() -> Vec<Consent> {
    let mut refused = pending();
    refused = apply(
        &refused,
        complete(
            "c2",
            ConsentOutcome::Error {
                error: "access_denied".into(),
                description: None,
            },
            Some("state-consent-1"),
        ),
        T0 + 20,
    )
    .expect("refused")
    .consent;
    let expired = apply(
        &pending(),
        ConsentInput::Tick,
        T0 + 10 + policy().sca_timeout_ms,
    )
    .expect("expired")
    .consent;
    let states = vec![requested(), pending(), granted(None), refused, expired];
    let kinds: Vec<ConsentState> = states.iter().map(|c| c.state).collect();
    assert_eq!(kinds, ConsentState::ALL.to_vec(), "one consent per state");
    states
}

#[test]
fn a_request_asks_for_the_uri_and_says_nothing_yet() {
    let t = ask(None, "c1", "consent-1", T0).expect("accepted");
    assert_eq!(t.consent.state, ConsentState::Requested);
    assert_eq!(t.effect, Some(ConsentEffect::FetchUri));
    assert!(t.events.is_empty());
    assert!(t.superseded.is_none());
    assert!(t.consent.pkce_verifier.is_some());
}

#[test]
fn the_uri_makes_it_pending_with_the_uri_on_the_event() {
    let t = apply(
        &requested(),
        ConsentInput::UriReceived {
            consent_uri: "https://bank.example/c".into(),
        },
        T0 + 5,
    )
    .expect("pending");
    assert_eq!(t.consent.state, ConsentState::Pending);
    assert_eq!(t.events.len(), 1);
    let e = &t.events[0];
    assert_eq!(e.state, ConsentState::Pending);
    assert_eq!(e.sequence, 1);
    assert_eq!(e.consent_uri.as_deref(), Some("https://bank.example/c"));
    assert_eq!(
        t.consent.sca_deadline,
        Some(T0 + 5 + policy().sca_timeout_ms)
    );
}

#[test]
fn a_code_is_exchanged_then_the_stored_pair_grants_it() {
    let t = apply(
        &pending(),
        complete("c2", code(), Some("state-consent-1")),
        T0 + 20,
    )
    .expect("exchange");
    assert_eq!(t.effect, Some(ConsentEffect::Exchange));
    assert_eq!(
        t.code.as_ref().map(|c| c.expose_secret().to_owned()),
        Some("the-code".into())
    );
    assert!(t.events.is_empty(), "granted only once the pair is durable");
    let g = apply(
        &t.consent,
        ConsentInput::TokensStored {
            valid_until: Some(T0 + 1_000_000),
        },
        T0 + 30,
    )
    .expect("granted");
    assert_eq!(g.consent.state, ConsentState::Granted);
    assert!(g.consent.pkce_verifier.is_none(), "the verifier is spent");
    assert_eq!(g.events[0].state, ConsentState::Granted);
    assert_eq!(g.events[0].sequence, 2);
    assert_eq!(g.events[0].valid_until, Some(T0 + 1_000_000));
    assert!(g.events[0].consent_uri.is_none());
}

#[test]
fn an_error_redirect_refuses_it() {
    let t = apply(
        &pending(),
        complete(
            "c2",
            ConsentOutcome::Error {
                error: "access_denied".into(),
                description: Some("no".into()),
            },
            Some("state-consent-1"),
        ),
        T0 + 20,
    )
    .expect("refused");
    assert_eq!(t.consent.state, ConsentState::Refused);
    let reason = t.events[0].reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::ScaFailed);
    assert!(reason.message.contains("access_denied"));
}

#[test]
fn a_redirect_with_another_state_is_dead_lettered_and_changes_nothing() {
    for state in [None, Some("forged")] {
        let r = apply(&pending(), complete("c2", code(), state), T0 + 20);
        match r {
            Err(ConsentRefusal::DeadLetter { class, .. }) => assert_eq!(class, "STATE_MISMATCH"),
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }
}

#[test]
fn a_redirect_for_no_consent_is_dead_lettered() {
    let r = step(None, complete("c2", code(), Some("s")), &policy(), T0);
    assert!(matches!(
        r,
        Err(ConsentRefusal::DeadLetter {
            class: "UNKNOWN_CONSENT",
            ..
        })
    ));
}

#[test]
fn a_redirect_is_dead_lettered_in_every_state_but_pending() {
    for c in all_states() {
        let r = apply(&c, complete("c9", code(), Some("state-consent-1")), T0 + 50);
        match c.state {
            ConsentState::Pending => assert!(r.is_ok()),
            ConsentState::Requested
            | ConsentState::Granted
            | ConsentState::Refused
            | ConsentState::Expired => assert!(
                matches!(
                    r,
                    Err(ConsentRefusal::DeadLetter {
                        class: "INVALID_TRANSITION",
                        ..
                    })
                ),
                "{:?}: {r:?}",
                c.state
            ),
        }
    }
}

#[test]
fn a_redelivered_command_is_a_duplicate() {
    let p = pending();
    let t = apply(&p, complete("c2", code(), Some("state-consent-1")), T0 + 20).expect("ok");
    assert_eq!(
        apply(
            &t.consent,
            complete("c2", code(), Some("state-consent-1")),
            T0 + 21
        )
        .err(),
        Some(ConsentRefusal::Duplicate)
    );
    assert_eq!(
        ask(Some(&p), "c1", "consent-1", T0 + 22).err(),
        Some(ConsentRefusal::Duplicate)
    );
}

#[test]
fn a_new_request_supersedes_a_live_consent_and_replaces_a_final_one() {
    for c in all_states() {
        let t = ask(Some(&c), "c5", "consent-2", T0 + 100).expect("accepted");
        assert_eq!(t.consent.consent_id.as_str(), "consent-2");
        assert_eq!(t.consent.state, ConsentState::Requested);
        match c.state {
            ConsentState::Requested | ConsentState::Pending | ConsentState::Granted => {
                let old = t.superseded.expect("the live one ends");
                assert_eq!(old.consent.consent_id.as_str(), "consent-1");
                assert_eq!(old.consent.state, ConsentState::Expired);
                assert_eq!(old.events.len(), 1);
                assert_eq!(old.events[0].sequence, c.sequence + 1);
                assert_eq!(
                    old.events[0].reason.as_ref().map(|r| r.code),
                    Some(ReasonCode::ConsentSuperseded)
                );
            }
            ConsentState::Refused | ConsentState::Expired => assert!(t.superseded.is_none()),
        }
    }
}

/// Found by `pis-chaos --consents`: a PSU asked twice (consent-1, then consent-2, which
/// superseded it); the owner died before the commands' offsets were committed, and its
/// successor read both again. Consent-1's request must be a duplicate, not a new request that
/// supersedes consent-2 and starts consent-1's event sequence over (two different events under
/// one `(psu, consent, sequence)`); the same goes for consent-2's own commands.
#[test]
fn commands_of_a_superseded_consent_read_again_are_duplicates() {
    for first in all_states() {
        let second = ask(Some(&first), "c5", "consent-2", T0 + 100).expect("accepted");
        let mut second = second.consent;
        second = apply(
            &second,
            ConsentInput::UriReceived {
                consent_uri: "https://bank.example/consent/2".into(),
            },
            T0 + 110,
        )
        .expect("uri")
        .consent;
        for command in first.seen_commands.iter().chain([&CommandId::new("c5")]) {
            assert_eq!(
                ask(Some(&second), command.as_str(), "consent-1", T0 + 120).err(),
                Some(ConsentRefusal::Duplicate),
                "{command} after a {} consent-1",
                first.state.symbol()
            );
        }
        // A new command still asks anew.
        assert!(ask(Some(&second), "c6", "consent-3", T0 + 130).is_ok());
    }
    // The memory stays bounded across many requests.
    let mut c = requested();
    for n in 0..100 {
        c = ask(Some(&c), &format!("r{n}"), &format!("consent-r{n}"), T0 + n)
            .expect("accepted")
            .consent;
    }
    assert_eq!(c.seen_commands.len(), policy().remembered_commands);
    assert_eq!(c.seen_commands.last().map(CommandId::as_str), Some("r99"));
}

/// A new owner restores the consent: a URI call in flight is made again at once (another
/// attempt); an exchange in flight refuses it (the code is gone); nothing else changes.
#[test]
fn a_restored_consent_recovers_the_call_its_owner_had_in_flight() {
    let t = apply(&requested(), ConsentInput::Restored, T0 + 50).expect("asked again");
    assert_eq!(t.consent.state, ConsentState::Requested);
    assert_eq!(t.effect, Some(ConsentEffect::FetchUri));
    assert_eq!(t.consent.attempts, requested().attempts + 1);
    assert!(t.events.is_empty());
    // Waiting for its retry already: the timer does it.
    let mut waiting = requested();
    waiting.retry_at = Some(T0 + 100);
    assert_eq!(
        apply(&waiting, ConsentInput::Restored, T0 + 60).err(),
        Some(ConsentRefusal::Ignored)
    );
    // The last attempt lost: refused as unanswered.
    let mut last = requested();
    last.attempts = policy().max_attempts;
    let t = apply(&last, ConsentInput::Restored, T0 + 50).expect("refused");
    assert_eq!(t.consent.state, ConsentState::Refused);
    assert_eq!(
        t.consent.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankUnavailable)
    );

    let exchanging = apply(
        &pending(),
        complete("c2", code(), Some("state-consent-1")),
        T0 + 20,
    )
    .expect("exchange")
    .consent;
    let t = apply(&exchanging, ConsentInput::Restored, T0 + 50).expect("refused");
    assert_eq!(t.consent.state, ConsentState::Refused);
    assert_eq!(
        t.consent.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankUnavailable)
    );
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].causation_id, "worker:restore");
    // A pending consent waiting for its PSU, and every other state: nothing to recover.
    for c in all_states() {
        assert_eq!(
            apply(&c, ConsentInput::Restored, T0 + 50).err(),
            (c.state != ConsentState::Requested).then_some(ConsentRefusal::Ignored),
            "{:?}",
            c.state
        );
    }
}

#[test]
fn an_unanswered_uri_call_is_retried_then_refused() {
    let mut c = requested();
    let mut now = T0;
    for attempt in 1..policy().max_attempts {
        let t = apply(
            &c,
            ConsentInput::UriFailed {
                definite: false,
                message: "timeout".into(),
            },
            now,
        )
        .expect("retry");
        assert!(t.events.is_empty());
        assert_eq!(t.consent.retry_at, Some(now + policy().retry_ms));
        assert_eq!(next_wake(&t.consent), t.consent.retry_at);
        assert_eq!(
            apply(&t.consent, ConsentInput::Tick, now + 1).err(),
            Some(ConsentRefusal::Ignored),
            "not before its time"
        );
        now += policy().retry_ms;
        let again = apply(&t.consent, ConsentInput::Tick, now).expect("tick");
        assert_eq!(again.effect, Some(ConsentEffect::FetchUri));
        assert_eq!(again.consent.attempts, attempt + 1);
        c = again.consent;
    }
    let t = apply(
        &c,
        ConsentInput::UriFailed {
            definite: false,
            message: "timeout".into(),
        },
        now,
    )
    .expect("refused");
    assert_eq!(t.consent.state, ConsentState::Refused);
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankUnavailable)
    );
}

#[test]
fn a_refused_uri_call_refuses_at_once() {
    let t = apply(
        &requested(),
        ConsentInput::UriFailed {
            definite: true,
            message: "406".into(),
        },
        T0,
    )
    .expect("refused");
    assert_eq!(t.consent.state, ConsentState::Refused);
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankRejected)
    );
}

#[test]
fn a_failed_exchange_refuses_it_because_a_code_is_single_use() {
    for definite in [true, false] {
        let t = apply(
            &pending(),
            ConsentInput::ExchangeFailed {
                definite,
                message: "x".into(),
            },
            T0 + 40,
        )
        .expect("refused");
        assert_eq!(t.consent.state, ConsentState::Refused);
        assert!(t.effect.is_none());
    }
}

#[test]
fn pending_expires_at_the_sca_deadline_and_granted_at_its_end() {
    let p = pending();
    let deadline = p.sca_deadline.expect("deadline");
    assert_eq!(
        apply(&p, ConsentInput::Tick, deadline - 1).err(),
        Some(ConsentRefusal::Ignored)
    );
    let t = apply(&p, ConsentInput::Tick, deadline).expect("expired");
    assert_eq!(t.consent.state, ConsentState::Expired);
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaExpired)
    );

    let g = granted(Some(T0 + 500));
    assert!(usable(&g, T0 + 499));
    assert!(!usable(&g, T0 + 500));
    let t = apply(&g, ConsentInput::Tick, T0 + 500).expect("expired");
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ConsentExpired)
    );
    let forever = granted(None);
    assert!(usable(&forever, i64::MAX));
    assert_eq!(next_wake(&forever), None);
}

#[test]
fn a_revoked_grant_expires() {
    let t = apply(
        &granted(None),
        ConsentInput::Revoked {
            message: "invalid_grant".into(),
        },
        T0 + 60,
    )
    .expect("expired");
    assert_eq!(t.consent.state, ConsentState::Expired);
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankConsentRevoked)
    );
}

/// Every engine input in every state: late answers and timers never move a consent out of
/// its state except along the diagram, and final consents never change.
#[test]
fn every_engine_input_in_every_state() {
    let inputs = || {
        vec![
            ConsentInput::UriReceived {
                consent_uri: "u".into(),
            },
            ConsentInput::UriFailed {
                definite: true,
                message: "m".into(),
            },
            ConsentInput::TokensStored { valid_until: None },
            ConsentInput::ExchangeFailed {
                definite: true,
                message: "m".into(),
            },
            ConsentInput::Revoked {
                message: "m".into(),
            },
        ]
    };
    for c in all_states() {
        for input in inputs() {
            let name = format!("{input:?}");
            let r = apply(&c, input, T0 + 100);
            let allowed = match (c.state, name.split_whitespace().next().unwrap_or("")) {
                (ConsentState::Requested, "UriReceived" | "UriFailed") => true,
                (ConsentState::Pending, "TokensStored" | "ExchangeFailed") => true,
                (ConsentState::Granted, "Revoked") => true,
                (
                    ConsentState::Requested
                    | ConsentState::Pending
                    | ConsentState::Granted
                    | ConsentState::Refused
                    | ConsentState::Expired,
                    _,
                ) => false,
            };
            match r {
                Ok(t) => {
                    assert!(allowed, "{:?} moved on {name}", c.state);
                    assert!(t.consent.sequence >= c.sequence);
                    assert_eq!(t.consent.sequence, c.sequence + t.events.len() as u64);
                }
                Err(e) => {
                    assert!(!allowed, "{:?} refused {name}: {e:?}", c.state);
                    assert_eq!(e, ConsentRefusal::Ignored);
                }
            }
        }
        if c.state.is_final() {
            assert_eq!(
                apply(&c, ConsentInput::Tick, i64::MAX).err(),
                Some(ConsentRefusal::Ignored)
            );
            assert_eq!(next_wake(&c), None);
        }
    }
}

#[test]
fn events_never_carry_the_verifier_or_the_code() {
    let t = apply(
        &pending(),
        complete("c2", code(), Some("state-consent-1")),
        T0 + 20,
    )
    .expect("exchange");
    let g = apply(
        &t.consent,
        ConsentInput::TokensStored { valid_until: None },
        T0 + 30,
    )
    .expect("granted");
    let debug = format!("{:?} {:?}", g.events, t.consent);
    assert!(!debug.contains("the-code"));
    assert!(!debug.contains(&"v".repeat(64)));
}

#[test]
fn event_ids_are_deterministic_and_distinct() {
    let p = pending();
    let t = apply(&p, ConsentInput::Tick, T0 + 10 + policy().sca_timeout_ms).expect("expired");
    let first = apply(
        &requested(),
        ConsentInput::UriReceived {
            consent_uri: "https://bank.example/consent/1".into(),
        },
        T0 + 10,
    )
    .expect("again");
    assert_eq!(
        first.events[0].event_id(),
        first.events[0].clone().event_id()
    );
    assert_ne!(first.events[0].event_id(), t.events[0].event_id());
    assert_eq!(ConsentScope::parse("CAF"), Some(ConsentScope::Caf));
    for s in ConsentScope::ALL {
        assert_eq!(ConsentScope::parse(s.symbol()), Some(s));
    }
}
