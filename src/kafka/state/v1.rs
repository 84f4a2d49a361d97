//! Format 1 of the `payment-state` records, read only: what the worker wrote before format 2.
//! Read so that existing topics restore (migration); never written (docs/runbooks.md,
//! "Rotating the state key" and "Finishing the format 2 migration").
//!
//! A JSON object tagged by `type`, with `v: 1`; the payment body is the JSON the domain's serde
//! derive wrote at the time, which `v2`'s frozen storage types reproduce (so it is read with
//! them, not with the domain types). Only the PKCE verifier, the authorization code and the
//! tokens are sealed (ChaCha20-Poly1305, `secret::StateKey::open_v1`), the record key as
//! associated data; the rest is neither secret nor authenticated, which is why format 2
//! replaced it. Format 1 keys had no id: each key of the ring is tried.

use serde::Deserialize;

use super::v2::{StoredBrand, StoredPayment, StoredStatusEvent};
use super::{DecodedRecord, NO_EPOCH, PsuTokens, StateRecordError};
use crate::domain::machine::{Millis, Payment};
use crate::secret::{Sealed, StateKeyRing};

fn no_epoch() -> i64 {
    NO_EPOCH
}

#[derive(Deserialize)]
struct PaymentSecrets {
    pkce_verifier: Option<Sealed>,
    authorization_code: Option<Sealed>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Record {
    Payment {
        #[serde(default = "no_epoch")]
        epoch: i64,
        payment: Box<StoredPayment>,
        secrets: PaymentSecrets,
        events: Vec<StoredStatusEvent>,
    },
    Psu {
        #[serde(default = "no_epoch")]
        epoch: i64,
        psu_id: String,
        brand: StoredBrand,
        access_token: Sealed,
        refresh_token: Option<Sealed>,
        expires_at: Option<Millis>,
        updated_at: Millis,
    },
    OutboxCheckpoint {
        #[serde(default = "no_epoch")]
        epoch: i64,
        published_through: i64,
    },
    RestoreMarker {},
}

/// Decodes a format 1 record: (record, epoch, id of the key that opened its secrets if any).
pub fn decode(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &[u8],
) -> Result<(DecodedRecord, i64, Option<String>), StateRecordError> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| {
        StateRecordError::Malformed(format!("format 1 record: {}", super::json_error(&e)))
    })?;
    // Every secret of one record was sealed with the same key: remember which opened the first.
    let mut opened_with: Option<String> = None;
    let mut open = |sealed: &Sealed| {
        let keys: Vec<_> = match &opened_with {
            Some(id) => ring.get(id).into_iter().collect(),
            None => ring.keys().collect(),
        };
        for key in keys {
            if let Ok(secret) = key.open_v1(sealed, record_key) {
                opened_with = Some(key.id().as_str().to_owned());
                return Ok(secret);
            }
        }
        Err(StateRecordError::V1SecretUnopened)
    };
    match record {
        Record::Payment {
            epoch,
            payment,
            secrets,
            events,
        } => {
            let mut payment: Payment = (*payment)
                .try_into()
                .map_err(|e| StateRecordError::Body(format!("format 1 payment: {e}")))?;
            payment.pkce_verifier = secrets.pkce_verifier.as_ref().map(&mut open).transpose()?;
            payment.authorization_code = secrets
                .authorization_code
                .as_ref()
                .map(&mut open)
                .transpose()?;
            Ok((
                DecodedRecord::Payment {
                    payment: Box::new(payment),
                    events: events.into_iter().map(Into::into).collect(),
                },
                epoch,
                opened_with,
            ))
        }
        Record::Psu {
            epoch,
            psu_id,
            brand,
            access_token,
            refresh_token,
            expires_at,
            updated_at,
        } => {
            let access_token = open(&access_token)?;
            let refresh_token = refresh_token.as_ref().map(&mut open).transpose()?;
            let tokens = PsuTokens {
                psu_id: crate::domain::model::PsuId::new(psu_id),
                brand: brand.into(),
                access_token,
                refresh_token,
                expires_at,
                updated_at,
            };
            Ok((DecodedRecord::Psu(tokens), epoch, opened_with))
        }
        Record::OutboxCheckpoint {
            epoch,
            published_through,
        } => Ok((DecodedRecord::Checkpoint(published_through), epoch, None)),
        Record::RestoreMarker {} => Ok((DecodedRecord::RestoreMarker, NO_EPOCH, None)),
    }
}

/// Writes a record exactly as format 1 did (the domain's serde derive for the payment): for the
/// fixtures and the migration tests only. The worker never writes format 1.
#[cfg(test)]
pub mod write {
    use serde::Serialize;

    use crate::domain::machine::{Payment, StatusEvent};
    use crate::domain::model::{Brand, PsuId};
    use crate::secret::{Sealed, StateKey};

    use super::super::{PsuTokens, TokenKey, payment_key, psu_key};

    #[derive(Serialize)]
    struct PaymentSecrets {
        pkce_verifier: Option<Sealed>,
        authorization_code: Option<Sealed>,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Record {
        Payment {
            v: u32,
            epoch: i64,
            payment: Box<Payment>,
            secrets: PaymentSecrets,
            events: Vec<StatusEvent>,
        },
        Psu {
            v: u32,
            epoch: i64,
            psu_id: PsuId,
            brand: Brand,
            access_token: Sealed,
            refresh_token: Option<Sealed>,
            expires_at: Option<i64>,
            updated_at: i64,
        },
        OutboxCheckpoint {
            v: u32,
            epoch: i64,
            published_through: i64,
        },
    }

    pub fn payment(
        key: &StateKey,
        epoch: i64,
        p: &Payment,
        events: &[StatusEvent],
    ) -> (String, Vec<u8>) {
        let record_key = payment_key(&p.payment_id);
        let seal = |s: &Option<secrecy::SecretString>| {
            s.as_ref()
                .map(|s| key.seal_v1(s, &record_key).expect("seal"))
        };
        let record = Record::Payment {
            v: 1,
            epoch,
            payment: Box::new(p.clone()),
            secrets: PaymentSecrets {
                pkce_verifier: seal(&p.pkce_verifier),
                authorization_code: seal(&p.authorization_code),
            },
            events: events.to_vec(),
        };
        let bytes = serde_json::to_vec(&record).expect("json");
        (record_key, bytes)
    }

    pub fn psu(key: &StateKey, epoch: i64, t: &PsuTokens) -> (String, Vec<u8>) {
        let record_key = psu_key(&TokenKey::new(t.brand, t.psu_id.clone()));
        let record = Record::Psu {
            v: 1,
            epoch,
            psu_id: t.psu_id.clone(),
            brand: t.brand,
            access_token: key.seal_v1(&t.access_token, &record_key).expect("seal"),
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|s| key.seal_v1(s, &record_key).expect("seal")),
            expires_at: t.expires_at,
            updated_at: t.updated_at,
        };
        (record_key, serde_json::to_vec(&record).expect("json"))
    }

    pub fn checkpoint(partition: i32, epoch: i64, through: i64) -> (String, Vec<u8>) {
        let record = Record::OutboxCheckpoint {
            v: 1,
            epoch,
            published_through: through,
        };
        (
            super::super::checkpoint_key(partition),
            serde_json::to_vec(&record).expect("json"),
        )
    }
}
