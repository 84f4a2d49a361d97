//! PKCE (RFC 7636) with method `S256`: Belfius requires `Code-Challenge` and
//! `Code-Challenge-Method` on an initiation made without an access token
//! (docs/belfius-facts.md §2.2).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};

/// The only method this client sends; `plain` gives no protection against code interception.
pub const METHOD_S256: &str = "S256";

/// A fresh verifier (kept secret until the /token call) and the challenge sent to the bank.
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl std::fmt::Debug for Pkce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The verifier is a secret: whoever holds it and the code gets the PSU's tokens.
        f.debug_struct("Pkce")
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl Pkce {
    /// 32 random bytes, base64url without padding: a 43-character verifier (RFC 7636 §4.1).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let verifier = URL_SAFE_NO_PAD.encode(bytes);
        let challenge = challenge_for(&verifier);
        Self {
            verifier: SecretString::from(verifier),
            challenge,
        }
    }
}

/// `BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))` (RFC 7636 §4.2, method S256).
pub fn challenge_for(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn rfc7636_appendix_b_vector() {
        assert_eq!(
            challenge_for("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn generated_pair_is_consistent_and_well_formed() {
        let pkce = Pkce::generate();
        let verifier = pkce.verifier.expose_secret();
        assert_eq!(verifier.len(), 43);
        assert!(
            verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(pkce.challenge, challenge_for(verifier));
        assert_ne!(Pkce::generate().challenge, pkce.challenge);
    }

    #[test]
    fn debug_hides_the_verifier() {
        let pkce = Pkce::generate();
        let shown = format!("{pkce:?}");
        assert!(!shown.contains(pkce.verifier.expose_secret()));
        assert!(shown.contains(&pkce.challenge));
    }
}
