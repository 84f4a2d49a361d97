//! QSeal request signing (JWS RS256 over the request body) and its verification (sandbox).
//! API fixed here; implementation in progress.

use std::path::{Path, PathBuf};

use super::{QsealConfig, SignatureFormat};

#[derive(Debug, thiserror::Error)]
pub enum QsealError {
    #[error("qseal: {0}")]
    Invalid(String),
}

pub struct QsealSigner {
    format: SignatureFormat,
}

impl QsealSigner {
    pub fn new(config: &QsealConfig) -> Result<Self, QsealError> {
        let _ = config;
        Err(QsealError::Invalid("not implemented yet".into()))
    }

    /// The `Signature` header value for this request body.
    pub fn sign(&self, body: &[u8]) -> Result<String, QsealError> {
        let _ = body;
        Err(QsealError::Invalid("not implemented yet".into()))
    }

    pub fn format(&self) -> &SignatureFormat {
        &self.format
    }
}

/// Verifies `Signature` headers against a QSeal certificate (the sandbox's side).
pub struct QsealVerifier;

impl QsealVerifier {
    pub fn from_certificate_pem(pem: &[u8]) -> Result<Self, QsealError> {
        let _ = pem;
        Err(QsealError::Invalid("not implemented yet".into()))
    }

    /// Accepts both standard-padded and url-safe encodings; checks that the JWS payload is
    /// exactly `body`.
    pub fn verify(&self, signature_header: &str, body: &[u8]) -> Result<(), QsealError> {
        let _ = (signature_header, body);
        Err(QsealError::Invalid("not implemented yet".into()))
    }
}

/// Creates (or reuses) a test QSeal key and certificate in `dir`:
/// returns (`qseal.pem`, `qseal-key.pem`).
pub fn ensure_test_qseal(dir: &Path) -> Result<(PathBuf, PathBuf), QsealError> {
    let _ = dir;
    Err(QsealError::Invalid("not implemented yet".into()))
}
