//! Runs the machine's bank effects and turns each answer into the machine's next input. The
//! classification here decides retry versus outcome-unknown, so it is explicit per error.

use secrecy::{ExposeSecret, SecretString};

use super::core::{BankAnswer, BankCall, RefreshFailure};
use crate::belfius::errors::BelfiusErrorCode;
use crate::belfius::status::TransactionStatus;
use crate::belfius::{BankError, BelfiusClient, TokenPair, pkce};
use crate::domain::bank::BankProgress;
use crate::domain::machine::{InitiationFailure, Input, Payment};
use crate::domain::model::{Order, PaymentKind};
use crate::domain::reason::{Reason, ReasonCode};

/// The reason code for a definite refusal, from the bank's typed error code.
fn refusal_reason(status: u16, body: &crate::belfius::ErrorBody, what: &str) -> Reason {
    let code = crate::belfius::errors::classify(status, body);
    Reason::new(
        code.reason(),
        format!(
            "bank refused the {what}: HTTP {status} {} {}: {}",
            body.error, body.error_code, body.error_description
        ),
    )
}

/// What a failed initiation call tells us about the bank's side.
pub fn classify_initiation_error(error: &BankError) -> InitiationFailure {
    match error {
        BankError::NotSent(message) => InitiationFailure::NotProcessed {
            message: message.clone(),
            retry_after_ms: None,
        },
        // The next attempt waits as long as the bank asked (Retry-After), if it said.
        BankError::RateLimited { retry_after } => InitiationFailure::NotProcessed {
            message: match retry_after {
                Some(after) => format!(
                    "rate limited by the bank (HTTP 429, Retry-After {} s)",
                    after.as_secs()
                ),
                None => "rate limited by the bank (HTTP 429)".into(),
            },
            retry_after_ms: retry_after.map(|after| after.as_millis().min(i64::MAX as u128) as i64),
        },
        // The bank may have created the payment before failing or before the answer was lost.
        BankError::NoResponse(message) => InitiationFailure::Unknown {
            message: format!("no response to the initiation: {message}"),
        },
        BankError::Unavailable { status, .. } => InitiationFailure::Unknown {
            message: format!("bank answered HTTP {status} to the initiation"),
        },
        BankError::Protocol(message) => InitiationFailure::Unknown {
            message: format!("unreadable initiation response: {message}"),
        },
        BankError::Refused { status, body } => {
            InitiationFailure::Refused(refusal_reason(*status, body, "initiation"))
        }
        // The bank answered, but not in a shape the worker can read: the PSU never sees a
        // link, so whatever the bank holds cannot be signed and expires there. A re-initiation
        // could create a second payment; ending it, with the mismatch named, cannot.
        BankError::Unrecognized(message) => InitiationFailure::Refused(Reason::new(
            ReasonCode::BankAnswerUnrecognized,
            message.clone(),
        )),
    }
}

/// POST the initiation of the payment's current attempt: with its PKCE verifier's challenge,
/// or, for an attempt without a verifier, with the PSU's access token (a returning PSU). A
/// refusal of that token itself is `AccessTokenRejected`: a 401 creates nothing at the bank,
/// so the core can send the same attempt again with PKCE.
pub async fn initiate(
    bank: &BelfiusClient,
    payment: &Payment,
    access_token: Option<&SecretString>,
) -> BankAnswer {
    let Some(order) = &payment.order else {
        return internal_refusal("internal: initiation without an order");
    };
    let challenge = match (&payment.pkce_verifier, access_token) {
        (Some(verifier), _) => pkce::challenge_for(verifier.expose_secret()),
        // The client sends no PKCE headers when it has a token.
        (None, Some(_)) => String::new(),
        (None, None) => {
            return internal_refusal("internal: initiation without PKCE verifier or token");
        }
    };
    // A PKCE attempt never presents a token, even one at hand.
    let token = payment
        .pkce_verifier
        .is_none()
        .then_some(access_token)
        .flatten();
    let result = match order {
        Order::Single(single) => bank.initiate_payment(single, &challenge, token).await,
        Order::Standing(standing) => bank.initiate_periodic(standing, &challenge, token).await,
        Order::Bulk(bulk) => bank.initiate_bulk(bulk, &challenge, token).await,
    };
    initiation_answer(result, token.is_some())
}

/// The machine's input for an initiation's result, whichever interface carried it (the
/// fallback's too, `engine::route`): retry versus outcome unknown must not depend on the
/// interface, or a switch-over could initiate a payment twice. `token_presented`: the call
/// carried the PSU's access token.
pub fn initiation_answer(
    result: Result<crate::belfius::Initiated, BankError>,
    token_presented: bool,
) -> BankAnswer {
    match result {
        Ok(initiated) => BankAnswer::Input(Box::new(Input::BankInitiated {
            bank_payment_id: initiated.bank_payment_id,
            sca_redirect_url: initiated.sca_redirect_url,
            bank_status: initiated.bank_status,
        })),
        Err(BankError::Refused { status, body })
            if token_presented && access_token_rejected(status, &body) =>
        {
            BankAnswer::AccessTokenRejected {
                message: refusal_reason(status, &body, "initiation").message,
            }
        }
        Err(error) => BankAnswer::Input(Box::new(Input::InitiationFailed(
            classify_initiation_error(&error),
        ))),
    }
}

fn internal_refusal(message: &'static str) -> BankAnswer {
    BankAnswer::Input(Box::new(Input::InitiationFailed(
        InitiationFailure::Refused(Reason::new(ReasonCode::BankRejected, message)),
    )))
}

/// The machine's view of a bank status for this kind of order: for a bulk, ISO `PART` means
/// some transfers were rejected, not a missing signature.
pub fn progress_for(kind: PaymentKind, status: TransactionStatus) -> BankProgress {
    match (kind, status) {
        (PaymentKind::Bulk, TransactionStatus::Part) => BankProgress::PartiallyAccepted,
        (PaymentKind::Single | PaymentKind::Periodic | PaymentKind::Bulk, other) => {
            other.progress()
        }
    }
}

/// GET the payment status (no token needed).
pub async fn check_status(bank: &BelfiusClient, payment: &Payment) -> Input {
    let (Some(order), Some(bank_id)) = (&payment.order, &payment.bank_payment_id) else {
        return Input::StatusCheckFailed {
            message: "internal: no bank payment id to look up".into(),
        };
    };
    let result = bank
        .payment_status(order.kind(), order.brand(), order.product(), bank_id)
        .await;
    status_input(&bank.config().status_map, payment, order.kind(), result)
}

/// The machine's input for a status read's result, whichever interface carried it.
pub fn status_input(
    status_map: &crate::belfius::status::StatusMap,
    payment: &Payment,
    kind: PaymentKind,
    result: Result<String, BankError>,
) -> Input {
    match result {
        Ok(code) => match TransactionStatus::parse(&code) {
            Some(status) => Input::StatusObserved {
                progress: progress_for(kind, status),
                bank_status: status.as_str().to_owned(),
            },
            None => match status_map.interpret(&code) {
                Some((code, progress)) => Input::StatusObserved {
                    progress,
                    bank_status: code,
                },
                // Polled on, at the slow rate after the first few, and alerted
                // (PisBankStatusUnrecognized): an operator maps the code
                // (PIS_BANK_STATUS_MAP) and the next poll follows it. Giving up instead could
                // report a payment that moves money as ended.
                None => {
                    crate::metrics::metrics().bank_status_unrecognized.inc();
                    tracing::warn!(
                        payment_id = %payment.payment_id,
                        code = code.chars().take(16).collect::<String>(),
                        "the bank answered a status this worker cannot interpret (PIS_BANK_STATUS_MAP)"
                    );
                    Input::StatusCheckFailed {
                        message: format!("unrecognized bank status code {code:?}"),
                    }
                }
            },
        },
        Err(error) => Input::StatusCheckFailed {
            message: error.to_string(),
        },
    }
}

/// Exchanges the stored authorization code for a token pair.
pub async fn exchange_code(bank: &BelfiusClient, payment: &Payment) -> Result<TokenPair, String> {
    let (Some(order), Some(code), Some(verifier)) = (
        &payment.order,
        &payment.authorization_code,
        &payment.pkce_verifier,
    ) else {
        return Err("internal: no code or verifier to exchange".into());
    };
    bank.exchange_code(order.brand(), code, verifier, order.redirect_uri())
        .await
        .map_err(|e| e.to_string())
}

/// DELETE the payment at the bank with the PSU's access token. A refusal of the token itself
/// (replaced or revoked at the bank, e.g. by a code exchange whose answer never reached this
/// worker) is `AccessTokenRejected`: the core refreshes or forgets the pair instead of
/// presenting the dead token again.
pub async fn cancel(
    bank: &BelfiusClient,
    payment: &Payment,
    access_token: &SecretString,
) -> BankAnswer {
    let (Some(order), Some(bank_id)) = (&payment.order, &payment.bank_payment_id) else {
        return BankAnswer::Input(Box::new(Input::CancelRefused(Reason::new(
            ReasonCode::CancelRefused,
            "internal: no bank payment id to cancel",
        ))));
    };
    match bank
        .cancel_payment(
            order.kind(),
            order.brand(),
            order.product(),
            bank_id,
            access_token,
        )
        .await
    {
        Err(BankError::Refused { status, body }) if access_token_rejected(status, &body) => {
            BankAnswer::AccessTokenRejected {
                message: refusal_reason(status, &body, "cancellation").message,
            }
        }
        result => BankAnswer::Input(Box::new(cancel_input(result))),
    }
}

fn cancel_input(result: Result<crate::belfius::client::Cancelled, BankError>) -> Input {
    match result {
        Ok(cancelled) => Input::CancelConfirmed {
            bank_status: cancelled.transaction_status,
        },
        Err(BankError::Refused { status, body }) => {
            let mut reason = refusal_reason(status, &body, "cancellation");
            reason.code = ReasonCode::CancelRefused;
            Input::CancelRefused(reason)
        }
        // Not sent or rate-limited: nothing happened at the bank, but the status check that
        // follows settles it either way, so all non-refusals go the same way.
        Err(
            error @ (BankError::NotSent(_)
            | BankError::RateLimited { .. }
            | BankError::NoResponse(_)
            | BankError::Unavailable { .. }
            | BankError::Protocol(_)
            | BankError::Unrecognized(_)),
        ) => Input::CancelUnconfirmed {
            message: error.to_string(),
        },
    }
}

/// Runs one bank call of the owner's core and classifies its result for it.
pub async fn run_call(bank: &BelfiusClient, payment: &Payment, call: BankCall) -> BankAnswer {
    match call {
        BankCall::Initiate { access_token } => initiate(bank, payment, access_token.as_ref()).await,
        BankCall::Status => BankAnswer::Input(Box::new(check_status(bank, payment).await)),
        BankCall::Exchange => match exchange_code(bank, payment).await {
            Ok(pair) => BankAnswer::Tokens(pair),
            Err(message) => BankAnswer::Input(Box::new(Input::TokenExchangeFailed { message })),
        },
        BankCall::Cancel { access_token } => cancel(bank, payment, &access_token).await,
        BankCall::Refresh {
            brand,
            refresh_token,
        } => match bank.refresh_token(brand, &refresh_token).await {
            Ok(pair) => BankAnswer::Tokens(pair),
            Err(error) => BankAnswer::RefreshFailed(classify_refresh_error(&error)),
        },
    }
}

/// The PSU's access token itself was refused (invalid, replaced or revoked), not the request.
fn access_token_rejected(status: u16, body: &crate::belfius::ErrorBody) -> bool {
    matches!(
        crate::belfius::errors::classify(status, body),
        BelfiusErrorCode::InvalidAccessToken | BelfiusErrorCode::LegacyInvalidAccessToken
    )
}

/// Only a definitive refusal of the grant itself (Belfius' invalid refresh token, RFC 6749
/// `invalid_grant`) means the pair is dead. Any other refusal, such as a rotated client secret
/// (`invalid_client`), says nothing about the PSU's pair: deleting every pair then would lock
/// every PSU out.
pub fn classify_refresh_error(error: &BankError) -> RefreshFailure {
    let message = error.to_string();
    match error {
        BankError::Refused { status, body } => {
            let revoked = matches!(
                crate::belfius::errors::classify(*status, body),
                BelfiusErrorCode::InvalidRefreshToken | BelfiusErrorCode::LegacyInvalidGrant
            ) || body.error.eq_ignore_ascii_case("invalid_grant");
            if revoked {
                RefreshFailure::Revoked { message }
            } else {
                RefreshFailure::Refused { message }
            }
        }
        BankError::NotSent(_)
        | BankError::NoResponse(_)
        | BankError::RateLimited { .. }
        | BankError::Unavailable { .. }
        | BankError::Protocol(_)
        | BankError::Unrecognized(_) => RefreshFailure::Transient { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::belfius::ErrorBody;

    fn refused(status: u16, error: &str, code: &str) -> BankError {
        BankError::Refused {
            status,
            body: ErrorBody {
                error: error.into(),
                error_code: code.into(),
                error_description: String::new(),
            },
        }
    }

    /// Only the PSU's token itself makes a cancellation refusal an `AccessTokenRejected`; a
    /// refusal of our credentials or of the request is an ordinary refusal.
    #[test]
    fn a_refused_access_token_is_told_apart_from_other_refusals() {
        let body = |e: BankError| match e {
            BankError::Refused { status, body } => (status, body),
            other => unreachable!("{other}"),
        };
        let (status, b) = body(refused(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100003",
        ));
        assert!(access_token_rejected(status, &b));
        for other in [
            refused(401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100009"),
            refused(401, "invalid_client", ""),
            refused(400, "CANCELLATION_NOT_ALLOWED", "BNZZ-0000-0000"),
        ] {
            let (status, b) = body(other);
            assert!(!access_token_rejected(status, &b), "{b:?}");
        }
    }

    /// Defect d: any 4xx on a refresh deleted the pair, so a rotated client secret wiped every
    /// PSU's tokens as cancellations were tried.
    #[test]
    fn only_a_dead_grant_deletes_the_pair() {
        let revoked = [
            refused(401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100004"),
            refused(400, "invalid_grant", "10006"),
            refused(400, "invalid_grant", ""),
        ];
        for e in &revoked {
            assert!(
                matches!(classify_refresh_error(e), RefreshFailure::Revoked { .. }),
                "{e}"
            );
        }
        let kept = [
            refused(401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100009"),
            refused(401, "invalid_client", ""),
            refused(403, "INVALID_TPP", "B14663ZZ-2100-000000"),
        ];
        for e in &kept {
            assert!(
                matches!(classify_refresh_error(e), RefreshFailure::Refused { .. }),
                "{e}"
            );
        }
        assert!(matches!(
            classify_refresh_error(&BankError::NoResponse("reset".into())),
            RefreshFailure::Transient { .. }
        ));
    }
}
