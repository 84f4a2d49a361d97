//! Runs the machine's bank effects and turns each answer into the machine's next input. The
//! classification here decides retry versus outcome-unknown, so it is explicit per error.

use secrecy::ExposeSecret;

use crate::belfius::status::TransactionStatus;
use crate::belfius::{BankError, BelfiusClient, TokenPair, pkce};
use crate::domain::machine::{InitiationFailure, Input, Payment};
use crate::domain::reason::{Reason, ReasonCode};

/// What a failed initiation call tells us about the bank's side.
pub fn classify_initiation_error(error: &BankError) -> InitiationFailure {
    match error {
        BankError::NotSent(message) => InitiationFailure::NotProcessed {
            message: message.clone(),
        },
        BankError::RateLimited { .. } => InitiationFailure::NotProcessed {
            message: "rate limited by the bank (HTTP 429)".into(),
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
        BankError::Refused { status, body } => InitiationFailure::Refused(Reason::new(
            ReasonCode::BankRejected,
            format!(
                "bank refused the initiation: HTTP {status} {} {}: {}",
                body.error, body.error_code, body.error_description
            ),
        )),
    }
}

/// POST the initiation of the payment's current attempt.
pub async fn initiate(bank: &BelfiusClient, payment: &Payment) -> Input {
    let (Some(order), Some(verifier)) = (&payment.order, &payment.pkce_verifier) else {
        return Input::InitiationFailed(InitiationFailure::Refused(Reason::new(
            ReasonCode::BankRejected,
            "internal: initiation without order or PKCE verifier",
        )));
    };
    let challenge = pkce::challenge_for(verifier.expose_secret());
    match bank.initiate_payment(order, &challenge, None).await {
        Ok(initiated) => Input::BankInitiated {
            bank_payment_id: initiated.bank_payment_id,
            sca_redirect_url: initiated.sca_redirect_url,
            bank_status: initiated.bank_status,
        },
        Err(error) => Input::InitiationFailed(classify_initiation_error(&error)),
    }
}

/// GET the payment status (no token needed).
pub async fn check_status(bank: &BelfiusClient, payment: &Payment) -> Input {
    let (Some(order), Some(bank_id)) = (&payment.order, &payment.bank_payment_id) else {
        return Input::StatusCheckFailed {
            message: "internal: no bank payment id to look up".into(),
        };
    };
    match bank
        .payment_status(order.brand, order.product, bank_id)
        .await
    {
        Ok(code) => match TransactionStatus::parse(&code) {
            Some(status) => Input::StatusObserved {
                progress: status.progress(),
                bank_status: status.as_str().to_owned(),
            },
            None => Input::StatusCheckFailed {
                message: format!("unknown bank status code {code:?}"),
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
    bank.exchange_code(order.brand, code, verifier, &order.redirect_uri)
        .await
        .map_err(|e| e.to_string())
}
