//! Consents for account information (AIS) and funds confirmation (CAF), the bank's side of
//! `GET /consent-uris` (docs/belfius.md, "Consents"). A consent is created by the TPP's call,
//! then the PSU grants or refuses it on the bank's page; a grant issues an authorization code
//! bound to the consent's scope (and, for CAF, its account), which `/token` exchanges for a
//! pair of that scope. Like a payment's SCA, a consent the PSU does not act on expires after
//! `Settings::sca_expiry`.

use std::time::Instant;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;

use super::{
    Challenge, DEFAULT_PSU, IssuedCode, ScaState, Scope, Store, digest, random_secret, redirect_url,
};
use crate::domain::model::Brand;

/// A consent request the API handler validated.
#[derive(Debug, Clone)]
pub struct NewConsent {
    pub brand: Brand,
    pub scope: Scope,
    /// CAF: the one account the consent covers.
    pub iban: Option<String>,
    pub redirect_uri: String,
    pub challenge: Challenge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConsentStatus {
    /// Waiting for the PSU on the consent page.
    Pending,
    Granted,
    Refused,
    Expired,
}

impl ConsentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentStatus::Pending => "PENDING",
            ConsentStatus::Granted => "GRANTED",
            ConsentStatus::Refused => "REFUSED",
            ConsentStatus::Expired => "EXPIRED",
        }
    }
}

pub struct Consent {
    pub id: String,
    pub brand: Brand,
    pub scope: Scope,
    pub iban: Option<String>,
    pub redirect_uri: String,
    challenge: Challenge,
    pub status: ConsentStatus,
    /// Who granted it.
    pub psu: Option<String>,
    /// What the grant covers: a CAF consent's IBAN, the accounts an AIS grant chose.
    pub accounts: Vec<String>,
    created: Instant,
}

/// JSON view for the operator API.
#[derive(Debug, Serialize)]
pub struct ConsentView {
    pub id: String,
    pub brand: Brand,
    pub scope: Scope,
    pub iban: Option<String>,
    pub status: ConsentStatus,
    pub psu: Option<String>,
    pub accounts: Vec<String>,
    pub redirect_uri: String,
}

impl Consent {
    pub fn view(&self) -> ConsentView {
        ConsentView {
            id: self.id.clone(),
            brand: self.brand,
            scope: self.scope,
            iban: self.iban.clone(),
            status: self.status,
            psu: self.psu.clone(),
            accounts: self.accounts.clone(),
            redirect_uri: self.redirect_uri.clone(),
        }
    }
}

/// What the PSU does on the consent page.
#[derive(Debug, Clone)]
pub enum ConsentAction {
    Grant {
        psu: String,
        state: Option<ScaState>,
        /// AIS: the accounts the PSU ticks on the page; empty: every account the PSU holds
        /// in the ledger. Ignored for CAF, whose consent names its account.
        accounts: Vec<String>,
    },
    Refuse {
        state: Option<ScaState>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error("no such consent")]
    NotFound,
    #[error("consent is {0}, the PSU cannot act on it any more")]
    Conflict(&'static str),
}

/// Where the PSU's browser goes after acting on a consent.
#[derive(Serialize)]
pub struct ConsentOutcome {
    pub consent_id: String,
    pub status: ConsentStatus,
    /// Holds the authorization code of a grant.
    #[serde(skip)]
    pub redirect_url: SecretString,
}

impl std::fmt::Debug for ConsentOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentOutcome")
            .field("consent_id", &self.consent_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// [C Yolt, quoting the bank] "Four unattended calls can be perform on AIS APIs per 24 hours":
/// calls the PSU is not present for (`psu_involved=false`), per account.
pub const UNATTENDED_PER_DAY: usize = 4;
const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Store {
    /// Counts one unattended AIS call on `iban`; `Err(wait)` when the day's calls are used
    /// up, with the time until the oldest of them leaves the 24 h window.
    pub fn count_unattended(
        &mut self,
        iban: &str,
        now: Instant,
    ) -> Result<(), std::time::Duration> {
        let calls = self.unattended.entry(iban.to_owned()).or_default();
        while calls
            .front()
            .is_some_and(|first| now.saturating_duration_since(*first) >= DAY)
        {
            calls.pop_front();
        }
        if calls.len() >= UNATTENDED_PER_DAY {
            let oldest = calls.front().copied().unwrap_or(now);
            return Err(DAY.saturating_sub(now.saturating_duration_since(oldest)));
        }
        calls.push_back(now);
        Ok(())
    }

    pub fn insert_consent(&mut self, new: NewConsent, now: Instant) -> &Consent {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let NewConsent {
            brand,
            scope,
            iban,
            redirect_uri,
            challenge,
        } = new;
        self.consents.entry(id.clone()).or_insert(Consent {
            id,
            brand,
            scope,
            iban,
            redirect_uri,
            challenge,
            status: ConsentStatus::Pending,
            psu: None,
            accounts: Vec::new(),
            created: now,
        })
    }

    /// The consent, expired first if its time has passed.
    pub fn consent(&mut self, id: &str, now: Instant) -> Option<&Consent> {
        let expiry = self.settings.sca_expiry;
        let consent = self.consents.get_mut(id)?;
        if consent.status == ConsentStatus::Pending && consent.created + expiry <= now {
            consent.status = ConsentStatus::Expired;
        }
        Some(consent)
    }

    pub fn consents(&mut self, now: Instant) -> Vec<ConsentView> {
        let ids: Vec<String> = self.consents.keys().cloned().collect();
        let mut views: Vec<ConsentView> = ids
            .iter()
            .filter_map(|id| self.consent(id, now).map(Consent::view))
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// The PSU grants or refuses a pending consent. A grant issues a single-use code of the
    /// consent's scope, bound to the PSU, the redirect URI and the PKCE challenge; a refusal
    /// sends the browser back with `error=access_denied` (RFC 6749 §4.1.2.1 [I]).
    pub fn act_on_consent(
        &mut self,
        id: &str,
        action: ConsentAction,
        now: Instant,
    ) -> Result<ConsentOutcome, ConsentError> {
        let status = self.consent(id, now).ok_or(ConsentError::NotFound)?.status;
        match status {
            ConsentStatus::Pending => {}
            ConsentStatus::Granted | ConsentStatus::Refused | ConsentStatus::Expired => {
                return Err(ConsentError::Conflict(status.as_str()));
            }
        }
        let consent = self.consents.get_mut(id).ok_or(ConsentError::NotFound)?;
        let redirect = match action {
            ConsentAction::Grant {
                psu,
                state,
                accounts,
            } => {
                let psu = if psu.is_empty() {
                    DEFAULT_PSU.to_owned()
                } else {
                    psu
                };
                consent.accounts = match consent.scope {
                    Scope::Caf => consent.iban.iter().cloned().collect(),
                    Scope::Ais if accounts.is_empty() => self.ledger.accounts_of(&psu),
                    Scope::Ais => accounts,
                    Scope::Pis => Vec::new(),
                };
                consent.status = ConsentStatus::Granted;
                consent.psu = Some(psu.clone());
                let code = random_secret();
                self.codes.insert(
                    digest(code.expose_secret()),
                    IssuedCode {
                        payment_id: consent.id.clone(),
                        scope: consent.scope,
                        accounts: consent.accounts.clone(),
                        brand: consent.brand,
                        psu,
                        redirect_uri: consent.redirect_uri.clone(),
                        challenge: consent.challenge.clone(),
                        issued: now,
                        used: false,
                        grant: None,
                    },
                );
                redirect_url(
                    &consent.redirect_uri,
                    &[("code", code.expose_secret())],
                    state.as_ref(),
                )
            }
            ConsentAction::Refuse { state } => {
                consent.status = ConsentStatus::Refused;
                redirect_url(
                    &consent.redirect_uri,
                    &[
                        ("error", "access_denied"),
                        ("error_description", "PSU refused the consent"),
                    ],
                    state.as_ref(),
                )
            }
        };
        Ok(ConsentOutcome {
            consent_id: consent.id.clone(),
            status: consent.status,
            redirect_url: redirect.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::belfius::pkce::challenge_for;
    use crate::sandbox::store::{
        ChallengeMethod, DEFAULT_ACCESS_TOKEN_LIFETIME, DEFAULT_REFRESH_TOKEN_LIFETIME, GrantError,
        Settings, TokenCheck,
    };

    const VERIFIER: &str = "consent-verifier-0123456789-0123456789-0123456789";
    const REDIRECT: &str = "https://tpp.example/consent";

    fn settings() -> Settings {
        Settings {
            auto_sign_after: None,
            settle_after: Duration::from_secs(1),
            sca_expiry: Duration::from_secs(60),
            access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
            refresh_token_lifetime: DEFAULT_REFRESH_TOKEN_LIFETIME,
            verify_signatures: false,
            cancel_status: 204,
            orphans_signable: false,
        }
    }

    fn new_consent(scope: Scope, iban: Option<&str>) -> NewConsent {
        NewConsent {
            brand: Brand::Belfius,
            scope,
            iban: iban.map(str::to_owned),
            redirect_uri: REDIRECT.into(),
            challenge: Challenge {
                value: challenge_for(VERIFIER),
                method: ChallengeMethod::S256,
            },
        }
    }

    fn code_of(outcome: &ConsentOutcome) -> String {
        url::Url::parse(outcome.redirect_url.expose_secret())
            .ok()
            .and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "code")
                    .map(|(_, v)| v.into_owned())
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_granted_consent_gives_a_pair_of_its_scope_only() {
        let t0 = Instant::now();
        let mut store = Store::new(settings());
        let id = store
            .insert_consent(new_consent(Scope::Caf, Some("BE71096123456769")), t0)
            .id
            .clone();
        let outcome = store
            .act_on_consent(
                &id,
                ConsentAction::Grant {
                    psu: "alice".into(),
                    state: None,
                    accounts: Vec::new(),
                },
                t0,
            )
            .unwrap();
        assert_eq!(outcome.status, ConsentStatus::Granted);
        let pair = store
            .redeem_code(&code_of(&outcome), VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap();
        assert_eq!(pair.scope, Scope::Caf);
        let access = pair.access_token.expose_secret();
        assert_eq!(
            store.check_access_token(access, Brand::Belfius, Scope::Caf, t0),
            TokenCheck::Valid {
                psu: "alice".into(),
                accounts: vec!["BE71096123456769".to_owned()]
            }
        );
        // Not a PIS or AIS token.
        for other in [Scope::Pis, Scope::Ais] {
            assert_eq!(
                store.check_access_token(access, Brand::Belfius, other, t0),
                TokenCheck::Unknown
            );
        }
        // Acting again is a conflict; the code is single use.
        assert_eq!(
            store
                .act_on_consent(&id, ConsentAction::Refuse { state: None }, t0)
                .err(),
            Some(ConsentError::Conflict("GRANTED"))
        );
        assert_eq!(
            store
                .redeem_code(&code_of(&outcome), VERIFIER, REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::CodeUsed)
        );
    }

    #[test]
    fn one_pair_per_scope_a_consent_does_not_replace_the_pis_pair() {
        let t0 = Instant::now();
        let mut store = Store::new(settings());
        let mut pairs = Vec::new();
        for scope in [Scope::Ais, Scope::Ais, Scope::Caf] {
            let id = store
                .insert_consent(new_consent(scope, None), t0)
                .id
                .clone();
            let outcome = store
                .act_on_consent(
                    &id,
                    ConsentAction::Grant {
                        psu: "bob".into(),
                        state: None,
                        accounts: Vec::new(),
                    },
                    t0,
                )
                .unwrap();
            pairs.push(
                store
                    .redeem_code(&code_of(&outcome), VERIFIER, REDIRECT, Brand::Belfius, t0)
                    .unwrap(),
            );
        }
        let check = |store: &mut Store, i: usize, scope| {
            store.check_access_token(
                pairs[i].access_token.expose_secret(),
                Brand::Belfius,
                scope,
                t0,
            )
        };
        // The second AIS pair replaced the first; the CAF pair lives beside it.
        assert_eq!(check(&mut store, 0, Scope::Ais), TokenCheck::Invalidated);
        assert!(matches!(
            check(&mut store, 1, Scope::Ais),
            TokenCheck::Valid { .. }
        ));
        assert!(matches!(
            check(&mut store, 2, Scope::Caf),
            TokenCheck::Valid { .. }
        ));
    }

    #[test]
    fn four_unattended_calls_per_account_and_day() {
        let t0 = Instant::now();
        let mut store = Store::new(settings());
        for i in 0..UNATTENDED_PER_DAY {
            let at = t0 + Duration::from_secs(i as u64 * 3600);
            assert_eq!(store.count_unattended("BE71096123456769", at), Ok(()));
        }
        // The fifth within the day waits until the first call is a day old.
        let fifth = t0 + Duration::from_secs(10 * 3600);
        assert_eq!(
            store.count_unattended("BE71096123456769", fifth),
            Err(Duration::from_secs(14 * 3600))
        );
        // Another account has its own budget; a day after the first call, one more.
        assert_eq!(store.count_unattended("BE41063012345610", fifth), Ok(()));
        assert_eq!(store.count_unattended("BE71096123456769", t0 + DAY), Ok(()));
    }

    #[test]
    fn refused_and_expired_consents_issue_no_code() {
        let t0 = Instant::now();
        let mut store = Store::new(settings());
        let refused = store
            .insert_consent(new_consent(Scope::Ais, None), t0)
            .id
            .clone();
        let outcome = store
            .act_on_consent(&refused, ConsentAction::Refuse { state: None }, t0)
            .unwrap();
        assert_eq!(outcome.status, ConsentStatus::Refused);
        assert!(code_of(&outcome).is_empty());
        assert!(
            outcome
                .redirect_url
                .expose_secret()
                .contains("error=access_denied")
        );
        let late = store
            .insert_consent(new_consent(Scope::Ais, None), t0)
            .id
            .clone();
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            store.consent(&late, later).map(|c| c.status),
            Some(ConsentStatus::Expired)
        );
        assert_eq!(
            store
                .act_on_consent(
                    &late,
                    ConsentAction::Grant {
                        psu: "bob".into(),
                        state: None,
                        accounts: Vec::new(),
                    },
                    later
                )
                .err(),
            Some(ConsentError::Conflict("EXPIRED"))
        );
        assert_eq!(
            store
                .act_on_consent("nope", ConsentAction::Refuse { state: None }, t0)
                .err(),
            Some(ConsentError::NotFound)
        );
    }
}
