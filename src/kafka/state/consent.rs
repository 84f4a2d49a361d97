//! Consent records, `consent/{brand}/{scope}/{psu_id}`: a PSU's AIS or CAF consent at one brand
//! with the scope's token pair and the consent events this change emits (the outbox, as for
//! payments). The PSU id, the free-form part, comes last.
//!
//! Storage types of their own, like `v2::Stored*`: named in format 2 (JSON), positional in
//! format 3 (postcard), so field and variant order are frozen (append only).

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::PsuTokens;
use super::v2::{StoredBrand, StoredLanguage, StoredPsuTokens, StoredReason, StoredSecret};
use crate::domain::consent::{Consent, ConsentEvent, ConsentRequest, ConsentScope, ConsentState};
use crate::domain::machine::Millis;
use crate::domain::model::{Brand, CommandId, ConsentId, PsuId};

/// Which consent entity: one per brand, PSU and scope (the bank keeps one grant per scope).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsentKey {
    pub brand: Brand,
    pub scope: ConsentScope,
    pub psu_id: PsuId,
}

impl ConsentKey {
    pub fn of(consent: &Consent) -> Self {
        Self {
            brand: consent.request.brand,
            scope: consent.request.scope,
            psu_id: consent.psu_id.clone(),
        }
    }

    /// The state record key.
    pub fn record_key(&self) -> String {
        format!(
            "{PREFIX}{}/{}/{}",
            self.brand.as_str(),
            self.scope.symbol(),
            self.psu_id
        )
    }

    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(PREFIX)?;
        let (brand, rest) = rest.split_once('/')?;
        let (scope, psu) = rest.split_once('/')?;
        Some(Self {
            brand: Brand::parse(brand)?,
            scope: ConsentScope::parse(scope)?,
            psu_id: PsuId::new(psu),
        })
    }
}

impl std::fmt::Display for ConsentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.record_key())
    }
}

pub const PREFIX: &str = "consent/";

/// A consent with its scope's token pair (`None` until granted).
#[derive(Debug, Clone)]
pub struct ConsentRecord {
    pub consent: Consent,
    pub tokens: Option<PsuTokens>,
    /// Unattended AIS reads made under this entity's pairs (account IBAN, when), kept for
    /// 24 hours: the bank allows a few per account and day.
    pub unattended_reads: Vec<(String, Millis)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredConsentScope {
    Ais,
    Caf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredConsentState {
    Requested,
    Pending,
    Granted,
    Refused,
    Expired,
}

/// A consent record's body. Field order is frozen (format 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredConsent {
    pub consent_id: String,
    pub psu_id: String,
    pub brand: StoredBrand,
    pub scope: StoredConsentScope,
    pub account_iban: Option<String>,
    pub language: StoredLanguage,
    pub redirect_uri: String,
    pub state: StoredConsentState,
    pub sequence: u64,
    pub consent_uri: Option<String>,
    pub sca_state: String,
    pub pkce_verifier: Option<StoredSecret>,
    pub sca_deadline: Option<Millis>,
    pub valid_until: Option<Millis>,
    pub attempts: u32,
    pub retry_at: Option<Millis>,
    pub reason: Option<StoredReason>,
    pub seen_commands: Vec<String>,
    pub requested_at: Millis,
    pub updated_at: Millis,
    pub tokens: Option<StoredPsuTokens>,
    pub unattended_reads: Vec<StoredRead>,
    pub exchanging: bool,
    pub events: Vec<StoredConsentEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRead {
    pub account: String,
    pub at: Millis,
}

/// An event of the change; the consent's identity comes from the record it is in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredConsentEvent {
    pub sequence: u64,
    pub state: StoredConsentState,
    pub consent_uri: Option<String>,
    pub valid_until: Option<Millis>,
    pub reason: Option<StoredReason>,
    pub causation_id: String,
    pub occurred_at: Millis,
}

fn scope_out(scope: ConsentScope) -> StoredConsentScope {
    match scope {
        ConsentScope::Ais => StoredConsentScope::Ais,
        ConsentScope::Caf => StoredConsentScope::Caf,
    }
}

fn scope_in(scope: StoredConsentScope) -> ConsentScope {
    match scope {
        StoredConsentScope::Ais => ConsentScope::Ais,
        StoredConsentScope::Caf => ConsentScope::Caf,
    }
}

fn state_out(state: ConsentState) -> StoredConsentState {
    match state {
        ConsentState::Requested => StoredConsentState::Requested,
        ConsentState::Pending => StoredConsentState::Pending,
        ConsentState::Granted => StoredConsentState::Granted,
        ConsentState::Refused => StoredConsentState::Refused,
        ConsentState::Expired => StoredConsentState::Expired,
    }
}

fn state_in(state: StoredConsentState) -> ConsentState {
    match state {
        StoredConsentState::Requested => ConsentState::Requested,
        StoredConsentState::Pending => ConsentState::Pending,
        StoredConsentState::Granted => ConsentState::Granted,
        StoredConsentState::Refused => ConsentState::Refused,
        StoredConsentState::Expired => ConsentState::Expired,
    }
}

impl StoredConsent {
    pub fn of(record: &ConsentRecord, events: &[ConsentEvent]) -> Self {
        let c = &record.consent;
        Self {
            consent_id: c.consent_id.as_str().to_owned(),
            psu_id: c.psu_id.as_str().to_owned(),
            brand: c.request.brand.into(),
            scope: scope_out(c.request.scope),
            account_iban: c.request.account_iban.clone(),
            language: c.request.language.into(),
            redirect_uri: c.request.redirect_uri.clone(),
            state: state_out(c.state),
            sequence: c.sequence,
            consent_uri: c.consent_uri.clone(),
            sca_state: c.sca_state.clone(),
            pkce_verifier: c.pkce_verifier.as_ref().map(Into::into),
            sca_deadline: c.sca_deadline,
            valid_until: c.valid_until,
            attempts: c.attempts,
            retry_at: c.retry_at,
            reason: c.reason.as_ref().map(Into::into),
            seen_commands: c
                .seen_commands
                .iter()
                .map(|id| id.as_str().to_owned())
                .collect(),
            requested_at: c.requested_at,
            updated_at: c.updated_at,
            tokens: record.tokens.as_ref().map(Into::into),
            unattended_reads: record
                .unattended_reads
                .iter()
                .map(|(account, at)| StoredRead {
                    account: account.clone(),
                    at: *at,
                })
                .collect(),
            exchanging: c.exchanging,
            events: events
                .iter()
                .map(|e| StoredConsentEvent {
                    sequence: e.sequence,
                    state: state_out(e.state),
                    consent_uri: e.consent_uri.clone(),
                    valid_until: e.valid_until,
                    reason: e.reason.as_ref().map(Into::into),
                    causation_id: e.causation_id.clone(),
                    occurred_at: e.occurred_at,
                })
                .collect(),
        }
    }

    /// The record and its events.
    pub fn open(self) -> (ConsentRecord, Vec<ConsentEvent>) {
        let request = ConsentRequest {
            brand: self.brand.into(),
            scope: scope_in(self.scope),
            account_iban: self.account_iban,
            language: self.language.into(),
            redirect_uri: self.redirect_uri,
        };
        let consent = Consent {
            consent_id: ConsentId::new(self.consent_id),
            psu_id: PsuId::new(self.psu_id),
            request,
            state: state_in(self.state),
            sequence: self.sequence,
            consent_uri: self.consent_uri,
            sca_state: self.sca_state,
            pkce_verifier: self.pkce_verifier.map(SecretString::from),
            sca_deadline: self.sca_deadline,
            valid_until: self.valid_until,
            attempts: self.attempts,
            retry_at: self.retry_at,
            exchanging: self.exchanging,
            reason: self.reason.map(Into::into),
            seen_commands: self.seen_commands.into_iter().map(CommandId::new).collect(),
            requested_at: self.requested_at,
            updated_at: self.updated_at,
        };
        let events = self
            .events
            .into_iter()
            .map(|e| ConsentEvent {
                consent_id: consent.consent_id.clone(),
                psu_id: consent.psu_id.clone(),
                brand: consent.request.brand,
                scope: consent.request.scope,
                account_iban: consent.request.account_iban.clone(),
                sequence: e.sequence,
                state: state_in(e.state),
                consent_uri: e.consent_uri,
                valid_until: e.valid_until,
                reason: e.reason.map(Into::into),
                causation_id: e.causation_id,
                occurred_at: e.occurred_at,
            })
            .collect();
        let tokens = self.tokens.map(Into::into);
        let unattended_reads = self
            .unattended_reads
            .into_iter()
            .map(|r| (r.account, r.at))
            .collect();
        (
            ConsentRecord {
                consent,
                tokens,
                unattended_reads,
            },
            events,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Language;
    use crate::domain::reason::{Reason, ReasonCode};
    use secrecy::ExposeSecret as _;

    fn record() -> (ConsentRecord, Vec<ConsentEvent>) {
        let consent = Consent {
            consent_id: ConsentId::new("consent-1"),
            psu_id: PsuId::new("psu-1"),
            request: ConsentRequest {
                brand: Brand::Banx,
                scope: ConsentScope::Caf,
                account_iban: Some("BE68539007547034".into()),
                language: Language::Nl,
                redirect_uri: "https://client.example/back".into(),
            },
            state: ConsentState::Granted,
            sequence: 2,
            consent_uri: Some("https://bank/consent".into()),
            sca_state: "st".into(),
            pkce_verifier: Some(SecretString::from("verifier")),
            sca_deadline: Some(5),
            valid_until: Some(6),
            attempts: 3,
            retry_at: Some(7),
            exchanging: true,
            reason: Some(Reason::new(ReasonCode::ConsentExpired, "m")),
            seen_commands: vec![CommandId::new("c1"), CommandId::new("c2")],
            requested_at: 1,
            updated_at: 2,
        };
        let tokens = PsuTokens {
            psu_id: PsuId::new("psu-1"),
            brand: Brand::Banx,
            access_token: SecretString::from("access"),
            refresh_token: Some(SecretString::from("refresh")),
            expires_at: Some(9),
            updated_at: 8,
        };
        let event = ConsentEvent {
            consent_id: consent.consent_id.clone(),
            psu_id: consent.psu_id.clone(),
            brand: Brand::Banx,
            scope: ConsentScope::Caf,
            account_iban: consent.request.account_iban.clone(),
            sequence: 2,
            state: ConsentState::Granted,
            consent_uri: None,
            valid_until: Some(6),
            reason: None,
            causation_id: "bank".into(),
            occurred_at: 2,
        };
        (
            ConsentRecord {
                consent,
                tokens: Some(tokens),
                unattended_reads: vec![("BE68539007547034".into(), 4)],
            },
            vec![event],
        )
    }

    #[test]
    fn a_consent_record_round_trips_through_both_formats() {
        let (rec, events) = record();
        let stored = StoredConsent::of(&rec, &events);
        let json = serde_json::to_vec(&stored).unwrap_or_default();
        let binary = postcard::to_allocvec(&stored).unwrap_or_default();
        let from_json: StoredConsent = serde_json::from_slice(&json).expect("json");
        let from_binary: StoredConsent = postcard::from_bytes(&binary).expect("postcard");
        for back in [from_json, from_binary] {
            let (r, e) = back.open();
            assert_eq!(e, events);
            assert_eq!(r.consent.consent_id, rec.consent.consent_id);
            assert_eq!(r.consent.request, rec.consent.request);
            assert_eq!(r.consent.state, ConsentState::Granted);
            assert_eq!(r.consent.seen_commands, rec.consent.seen_commands);
            assert_eq!(r.consent.reason, rec.consent.reason);
            assert_eq!(
                (
                    r.consent.sca_deadline,
                    r.consent.valid_until,
                    r.consent.retry_at
                ),
                (Some(5), Some(6), Some(7))
            );
            assert_eq!(
                r.consent
                    .pkce_verifier
                    .map(|v| v.expose_secret().to_owned()),
                Some("verifier".into())
            );
            let t = r.tokens.expect("tokens");
            assert_eq!(t.access_token.expose_secret(), "access");
            assert_eq!(t.expires_at, Some(9));
            assert_eq!(r.unattended_reads, rec.unattended_reads);
            assert!(r.consent.exchanging);
        }
    }

    #[test]
    fn keys_round_trip_and_refuse_what_is_not_a_consent() {
        let key = ConsentKey {
            brand: Brand::Belfius,
            scope: ConsentScope::Ais,
            psu_id: PsuId::new("psu.1@x"),
        };
        assert_eq!(key.record_key(), "consent/BELFIUS/AIS/psu.1@x");
        assert_eq!(ConsentKey::parse(&key.record_key()), Some(key));
        for bad in [
            "consent/",
            "consent/BELFIUS/PIS/p",
            "consent/OTHER/AIS/p",
            "psu/BELFIUS/p",
        ] {
            assert_eq!(ConsentKey::parse(bad), None, "{bad}");
        }
    }
}
