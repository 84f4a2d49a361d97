//! Sealing of secrets that must survive a restart (PKCE verifiers, authorization codes, tokens)
//! before they go into the `payment-state` topic. The broker and anyone reading the topic see
//! only ciphertext; the key lives in the worker's secret configuration.
//!
//! ChaCha20-Poly1305 with a random 96-bit nonce. The record key is the associated data, so a
//! sealed value copied into another payment's record fails to open.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

const VERSION_PREFIX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("state key must be 64 hex characters (32 bytes)")]
    BadKey,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open with this key (wrong key, or moved between records)")]
    OpenFailed,
}

/// The key that seals secrets in the state topic.
pub struct StateKey {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

/// A sealed secret as stored: `v1:` + base64(nonce || ciphertext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

impl StateKey {
    pub fn from_hex(hex_key: &SecretString) -> Result<Self, SecretError> {
        let bytes = hex::decode(hex_key.expose_secret().trim()).map_err(|_| SecretError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretError::BadKey);
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        })
    }

    /// A fresh random key, as 64 hex characters (for `pis-worker keygen` and tests).
    pub fn generate_hex() -> SecretString {
        SecretString::from(hex::encode(ChaCha20Poly1305::generate_key(&mut OsRng)))
    }

    pub fn seal(&self, secret: &SecretString, record_key: &str) -> Result<Sealed, SecretError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret.expose_secret().as_bytes(),
                    aad: record_key.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Malformed)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        Ok(Sealed(format!(
            "{VERSION_PREFIX}{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, out)
        )))
    }

    pub fn open(&self, sealed: &Sealed, record_key: &str) -> Result<SecretString, SecretError> {
        let body = sealed
            .0
            .strip_prefix(VERSION_PREFIX)
            .ok_or(SecretError::Malformed)?;
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body)
            .map_err(|_| SecretError::Malformed)?;
        if bytes.len() < 12 {
            return Err(SecretError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: record_key.as_bytes(),
                },
            )
            .map_err(|_| SecretError::OpenFailed)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| SecretError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StateKey {
        StateKey::from_hex(&StateKey::generate_hex()).expect("key")
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let k = key();
        let sealed = k
            .seal(&SecretString::from("verifier-123"), "payment/p-1")
            .expect("seal");
        assert!(!sealed.0.contains("verifier-123"));
        let opened = k.open(&sealed, "payment/p-1").expect("open");
        assert_eq!(opened.expose_secret(), "verifier-123");
    }

    #[test]
    fn a_sealed_value_does_not_open_under_another_record_or_key() {
        let k = key();
        let sealed = k
            .seal(&SecretString::from("x"), "payment/p-1")
            .expect("seal");
        assert!(matches!(
            k.open(&sealed, "payment/p-2"),
            Err(SecretError::OpenFailed)
        ));
        assert!(matches!(
            key().open(&sealed, "payment/p-1"),
            Err(SecretError::OpenFailed)
        ));
        assert!(matches!(
            k.open(&Sealed("v1:AAAA".into()), "payment/p-1"),
            Err(SecretError::Malformed)
        ));
    }

    #[test]
    fn rejects_keys_of_the_wrong_size() {
        assert!(StateKey::from_hex(&SecretString::from("abcd")).is_err());
        assert!(StateKey::from_hex(&SecretString::from("zz".repeat(32))).is_err());
    }
}
