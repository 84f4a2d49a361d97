//! Loading the QWAC client identity (PEM or PKCS#12). API fixed here; implementation in progress.

use secrecy::SecretString;

use super::QwacIdentity;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("qwac: {0}")]
    Invalid(String),
}

/// Converts a PKCS#12 archive (DER) with its password into a PEM identity for rustls.
pub fn qwac_from_pkcs12(der: &[u8], password: &SecretString) -> Result<QwacIdentity, IdentityError> {
    let _ = (der, password);
    Err(IdentityError::Invalid("not implemented yet".into()))
}
