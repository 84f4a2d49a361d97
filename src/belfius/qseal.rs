//! QSeal request signing (JWS RS256 over the request body) and its verification (sandbox).
//!
//! The `Signature` header is a compact JWS (docs/belfius-facts.md §1.3 (a)):
//! `B64(header) "." B64(body) "." B64(RSASSA-PKCS1-v1_5-SHA256(B64(header) "." B64(body)))`
//! with header `{"typ":"JWT","alg":"RS256"}` (+ `kid`, `x5c` when configured). `B64` is standard
//! Base64 with padding (what Tink sent to Belfius [C]) or base64url without padding (RFC 7515),
//! per [`SignatureEncoding`]. Signing and verification use ring (constant time); the `rsa` crate
//! only generates test keys.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use ring::rand::SystemRandom;
use ring::signature::{
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair, UnparsedPublicKey,
};
use rustls_pemfile::Item;
use secrecy::ExposeSecret as _;
use serde::Serialize;

use super::{QsealConfig, SignatureEncoding, SignatureFormat};

/// File name of the test QSeal certificate written by [`ensure_test_qseal`].
pub const TEST_QSEAL_CERT_FILE: &str = "qseal.pem";
/// File name of the test QSeal private key (PKCS#8 PEM) written by [`ensure_test_qseal`].
pub const TEST_QSEAL_KEY_FILE: &str = "qseal-key.pem";
/// Subject CN of the generated test certificate.
pub const TEST_QSEAL_CN: &str = "pis-worker test QSeal";

/// The only JWS algorithm produced and accepted.
const ALG: &str = "RS256";

/// Messages are stable and distinct per failure class:
/// * `malformed signature header: …`
/// * `unsupported JWS algorithm …`
/// * `JWS payload does not match the request body`
/// * `signature does not verify against the QSeal certificate`
///
/// They never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum QsealError {
    #[error("qseal: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> QsealError {
    QsealError::Invalid(message.into())
}

#[derive(Serialize)]
struct JwsHeader<'a> {
    typ: &'a str,
    alg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

fn encode(encoding: SignatureEncoding, data: &[u8]) -> String {
    match encoding {
        SignatureEncoding::Base64Padded => STANDARD.encode(data),
        SignatureEncoding::Base64UrlNoPad => URL_SAFE_NO_PAD.encode(data),
    }
}

/// Signs request bodies with the QSeal private key. Cheap to share (`&self` signing).
pub struct QsealSigner {
    format: SignatureFormat,
    key: RsaKeyPair,
    rng: SystemRandom,
    /// `B64(header)`: fixed for a given configuration, so computed once.
    encoded_header: String,
}

impl std::fmt::Debug for QsealSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QsealSigner")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl QsealSigner {
    pub fn new(config: &QsealConfig) -> Result<Self, QsealError> {
        let key = parse_rsa_private_key(config.private_key_pem.expose_secret().as_bytes())?;
        let format = config.format.clone();

        // A configured certificate must belong to the signing key (checked even without x5c:
        // a mismatch means every signature would be rejected by whoever holds that certificate).
        let chain = match config.certificate_pem.as_deref() {
            Some(pem) => {
                let chain = parse_certificates(pem)?;
                let leaf = rsa_public_key_from_certificate(&chain[0])?;
                if leaf != key.public().as_ref() {
                    return Err(invalid(
                        "the QSeal certificate does not match the QSeal private key",
                    ));
                }
                Some(chain)
            }
            None => None,
        };
        let x5c = match (format.include_x5c, chain) {
            (false, _) => None,
            (true, Some(chain)) => Some(chain.iter().map(|der| STANDARD.encode(der)).collect()),
            (true, None) => {
                return Err(invalid(
                    "include_x5c is set but no QSeal certificate is configured",
                ));
            }
        };

        let header = JwsHeader {
            typ: "JWT",
            alg: ALG,
            kid: format.kid.as_deref(),
            x5c,
        };
        let header_json = serde_json::to_vec(&header)
            .map_err(|e| invalid(format!("cannot serialise the JWS header: {e}")))?;
        let encoded_header = encode(format.encoding, &header_json);
        Ok(Self {
            format,
            key,
            rng: SystemRandom::new(),
            encoded_header,
        })
    }

    /// The `Signature` header value for this request body.
    pub fn sign(&self, body: &[u8]) -> Result<String, QsealError> {
        let mut jws = String::with_capacity(
            self.encoded_header.len() + body.len() * 4 / 3 + self.key.public().modulus_len() * 2,
        );
        jws.push_str(&self.encoded_header);
        jws.push('.');
        jws.push_str(&encode(self.format.encoding, body));

        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, jws.as_bytes(), &mut signature)
            .map_err(|_| invalid("RSA signing failed"))?;

        jws.push('.');
        jws.push_str(&encode(self.format.encoding, &signature));
        Ok(jws)
    }

    pub fn format(&self) -> &SignatureFormat {
        &self.format
    }
}

/// Verifies `Signature` headers against a QSeal certificate (the sandbox's side).
pub struct QsealVerifier {
    /// PKCS#1 `RSAPublicKey` DER (the SubjectPublicKeyInfo BIT STRING content).
    public_key: Vec<u8>,
}

impl std::fmt::Debug for QsealVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QsealVerifier").finish_non_exhaustive()
    }
}

/// Decoding engines for verification: each alphabet, padding optional.
const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

impl QsealVerifier {
    /// Uses the first certificate of `pem` (the QSeal leaf); its key must be RSA.
    pub fn from_certificate_pem(pem: &[u8]) -> Result<Self, QsealError> {
        let chain = parse_certificates(pem)?;
        let public_key = rsa_public_key_from_certificate(&chain[0])?;
        Ok(Self { public_key })
    }

    /// Accepts both standard-padded and url-safe encodings; checks that the JWS payload is
    /// exactly `body`.
    pub fn verify(&self, signature_header: &str, body: &[u8]) -> Result<(), QsealError> {
        let jws = signature_header.trim();
        let mut parts = jws.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three dot-separated parts"));
        };

        let has_standard = jws.contains(['+', '/', '=']);
        let has_url_safe = jws.contains(['-', '_']);
        let engine = match (has_standard, has_url_safe) {
            (true, true) => {
                return Err(malformed("mixes standard and url-safe base64 alphabets"));
            }
            (false, true) => &URL_SAFE_LENIENT,
            // Without any alphabet-specific character both alphabets decode alike.
            _ => &STANDARD_LENIENT,
        };
        let decode = |part: &str, what: &str| {
            engine
                .decode(part)
                .map_err(|e| malformed(&format!("{what} is not valid base64: {e}")))
        };

        let header_json = decode(header_b64, "header")?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header_json)
                .map_err(|_| malformed("header is not a JSON object"))?;
        match header.get("alg") {
            Some(serde_json::Value::String(alg)) if alg == ALG => {}
            Some(serde_json::Value::String(alg)) => {
                let shown: String = alg.chars().take(32).collect();
                return Err(invalid(format!(
                    "unsupported JWS algorithm {shown:?} (expected {ALG})"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "unsupported JWS algorithm: alg missing (expected {ALG})"
                )));
            }
        }
        if header.contains_key("crit") {
            return Err(malformed(
                "critical header parameters (crit) are not supported",
            ));
        }

        let payload = decode(payload_b64, "payload")?;
        if payload != body {
            return Err(invalid("JWS payload does not match the request body"));
        }

        let signature = decode(signature_b64, "signature")?;
        // The signing input is the first two parts exactly as sent.
        let signing_input = &jws[..header_b64.len() + 1 + payload_b64.len()];
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &self.public_key)
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| invalid("signature does not verify against the QSeal certificate"))
    }
}

impl QsealVerifier {
    /// RSASSA-PKCS1-v1_5 with SHA-256 over arbitrary bytes: the fallback interface signs an
    /// HTTP signing string with the QSeal key, not a JWS (`belfius::httpsig`).
    pub fn verify_rsa_sha256(&self, message: &[u8], signature: &[u8]) -> Result<(), QsealError> {
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &self.public_key)
            .verify(message, signature)
            .map_err(|_| invalid("signature does not verify against the QSeal certificate"))
    }
}

fn malformed(detail: &str) -> QsealError {
    invalid(format!("malformed signature header: {detail}"))
}

/// Creates (or reuses) a test QSeal key and certificate in `dir`:
/// returns (`qseal.pem`, `qseal-key.pem`).
///
/// Existing files are reused when they form a working pair; otherwise a fresh RSA-2048 key and a
/// self-signed certificate (CN [`TEST_QSEAL_CN`]) replace them. Callers sharing one directory
/// from several processes at once should serialise their calls.
pub fn ensure_test_qseal(dir: &Path) -> Result<(PathBuf, PathBuf), QsealError> {
    let cert_path = dir.join(TEST_QSEAL_CERT_FILE);
    let key_path = dir.join(TEST_QSEAL_KEY_FILE);
    if cert_path.is_file() && key_path.is_file() && existing_pair_works(&cert_path, &key_path) {
        return Ok((cert_path, key_path));
    }

    fs::create_dir_all(dir)
        .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
    let (cert_pem, key_pem) = generate_test_qseal()?;
    write_file(&key_path, key_pem.expose_secret().as_bytes(), true)?;
    write_file(&cert_path, cert_pem.as_bytes(), false)?;
    tracing::info!(path = %cert_path.display(), "generated test QSeal certificate");
    Ok((cert_path, key_path))
}

/// A fresh RSA-2048 key (PKCS#8 PEM) and its self-signed certificate (PEM):
/// `(certificate_pem, private_key_pem)`.
pub fn generate_test_qseal() -> Result<(String, secrecy::SecretString), QsealError> {
    use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};

    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)
        .map_err(|e| invalid(format!("RSA key generation failed: {e}")))?;
    let key_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| invalid(format!("cannot encode the test QSeal key: {e}")))?;
    let key_pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| invalid(format!("rcgen rejected the test QSeal key: {e}")))?;

    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| invalid(format!("certificate parameters: {e}")))?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, TEST_QSEAL_CN);
    params.distinguished_name = name;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::ContentCommitment,
    ];
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| invalid(format!("cannot self-sign the test QSeal certificate: {e}")))?;
    Ok((cert.pem(), key_pem.as_str().to_owned().into()))
}

fn existing_pair_works(cert_path: &Path, key_path: &Path) -> bool {
    let (Ok(cert), Ok(key)) = (fs::read(cert_path), fs::read_to_string(key_path)) else {
        return false;
    };
    let key = secrecy::zeroize::Zeroizing::new(key);
    let config = QsealConfig {
        private_key_pem: key.as_str().to_owned().into(),
        certificate_pem: Some(cert),
        format: SignatureFormat {
            include_x5c: true,
            ..SignatureFormat::default()
        },
        sign: super::SignedOperations::default(),
    };
    // new() with x5c checks that the certificate carries the key's public half.
    QsealSigner::new(&config).is_ok()
}

/// Writes via a temporary file and a rename, so readers never see half a file.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), QsealError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid(format!("bad file name {}", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let io_error = |e: std::io::Error| invalid(format!("cannot write {}: {e}", path.display()));

    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;

    let result = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let result = result.and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        // Best effort: the temporary file may not even exist.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_error)
}

/// PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY` PEM into a ring key pair. Also the key of
/// the fallback interface's HTTP signatures (`belfius::httpsig`).
pub(crate) fn parse_rsa_private_key(pem: &[u8]) -> Result<RsaKeyPair, QsealError> {
    let mut reader = pem;
    loop {
        match rustls_pemfile::read_one(&mut reader) {
            Ok(Some(Item::Pkcs8Key(key))) => {
                return RsaKeyPair::from_pkcs8(key.secret_pkcs8_der())
                    .map_err(|e| invalid(format!("QSeal private key rejected: {e}")));
            }
            Ok(Some(Item::Pkcs1Key(key))) => {
                return RsaKeyPair::from_der(key.secret_pkcs1_der())
                    .map_err(|e| invalid(format!("QSeal private key rejected: {e}")));
            }
            Ok(Some(Item::Sec1Key(_))) => {
                return Err(invalid(
                    "QSeal private key is an EC key; RS256 needs an RSA key",
                ));
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(invalid(
                    "no PRIVATE KEY or RSA PRIVATE KEY block in the QSeal key PEM",
                ));
            }
            Err(_) => return Err(invalid("QSeal private key PEM is malformed")),
        }
    }
}

/// All `CERTIFICATE` blocks of a PEM, in order; at least one.
fn parse_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, QsealError> {
    let mut reader = pem;
    let chain = rustls_pemfile::certs(&mut reader)
        .map(|cert| cert.map(|der| der.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("QSeal certificate PEM is malformed: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("no CERTIFICATE block in the QSeal certificate PEM"));
    }
    Ok(chain)
}

/// DER of OID 1.2.840.113549.1.1.1 (rsaEncryption).
const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_VERSION: u8 = 0xa0;

/// The PKCS#1 `RSAPublicKey` of an X.509 certificate (DER), checked to be a 2048..=8192-bit
/// RSA key. A minimal DER walk: Certificate → tbsCertificate → subjectPublicKeyInfo.
fn rsa_public_key_from_certificate(der: &[u8]) -> Result<Vec<u8>, QsealError> {
    let bad = |what: &str| invalid(format!("QSeal certificate: {what}"));
    let (certificate, _) =
        der_expect(der, TAG_SEQUENCE).ok_or_else(|| bad("not a DER certificate"))?;
    let (tbs, _) = der_expect(certificate, TAG_SEQUENCE).ok_or_else(|| bad("no tbsCertificate"))?;

    let mut rest = tbs;
    if rest.first() == Some(&TAG_VERSION) {
        rest = der_next(rest).ok_or_else(|| bad("bad version"))?.2;
    }
    let (_, rest) = der_expect(rest, TAG_INTEGER).ok_or_else(|| bad("no serial number"))?;
    // signature algorithm, issuer, validity, subject
    let mut rest = rest;
    for what in ["signature algorithm", "issuer", "validity", "subject"] {
        rest = der_expect(rest, TAG_SEQUENCE)
            .ok_or_else(|| bad(&format!("no {what}")))?
            .1;
    }
    let (spki, _) = der_expect(rest, TAG_SEQUENCE).ok_or_else(|| bad("no subjectPublicKeyInfo"))?;
    let (algorithm, rest) =
        der_expect(spki, TAG_SEQUENCE).ok_or_else(|| bad("no key algorithm"))?;
    let (oid, _) = der_expect(algorithm, TAG_OID).ok_or_else(|| bad("no key algorithm OID"))?;
    if oid != RSA_ENCRYPTION_OID {
        return Err(bad("the public key is not an RSA key (RS256 needs RSA)"));
    }
    let (bits, _) = der_expect(rest, TAG_BIT_STRING).ok_or_else(|| bad("no public key bits"))?;
    let Some((&0, public_key)) = bits.split_first() else {
        return Err(bad("bad public key BIT STRING"));
    };

    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let (rsa_key, _) =
        der_expect(public_key, TAG_SEQUENCE).ok_or_else(|| bad("bad RSA public key"))?;
    let (modulus, rest) = der_expect(rsa_key, TAG_INTEGER).ok_or_else(|| bad("bad RSA modulus"))?;
    der_expect(rest, TAG_INTEGER).ok_or_else(|| bad("bad RSA exponent"))?;
    let modulus_bytes = modulus.iter().skip_while(|&&b| b == 0).count();
    if !(256..=1024).contains(&modulus_bytes) {
        return Err(bad("RSA key must have 2048 to 8192 bits"));
    }
    Ok(public_key.to_vec())
}

/// The next TLV with the given tag: `(content, rest)`.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, content, rest) = der_next(input)?;
    (found == tag).then_some((content, rest))
}

/// One DER TLV (single-byte tags, definite lengths): `(tag, content, rest)`.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = input.split_at_checked(count)?;
        input = rest;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    let (content, rest) = input.split_at_checked(length)?;
    Some((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Instant;

    use super::*;
    use crate::belfius::SignedOperations;

    /// (certificate PEM, key PEM); RSA generation is the slow part, so once per key.
    fn test_key(slot: usize) -> &'static (String, String) {
        static KEYS: [OnceLock<(String, String)>; 2] = [OnceLock::new(), OnceLock::new()];
        KEYS[slot].get_or_init(|| {
            let started = Instant::now();
            let (cert, key) = generate_test_qseal().expect("generate");
            eprintln!("RSA-2048 test QSeal generated in {:?}", started.elapsed());
            (cert, key.expose_secret().to_owned())
        })
    }

    fn config(encoding: SignatureEncoding, include_x5c: bool, kid: Option<&str>) -> QsealConfig {
        let (cert, key) = test_key(0);
        QsealConfig {
            private_key_pem: key.clone().into(),
            certificate_pem: Some(cert.clone().into_bytes()),
            format: SignatureFormat {
                encoding,
                include_x5c,
                kid: kid.map(str::to_owned),
            },
            sign: SignedOperations::default(),
        }
    }

    fn verifier(slot: usize) -> QsealVerifier {
        QsealVerifier::from_certificate_pem(test_key(slot).0.as_bytes()).expect("verifier")
    }

    fn message(result: Result<(), QsealError>) -> String {
        match result {
            Ok(()) => panic!("expected a verification failure"),
            Err(QsealError::Invalid(message)) => message,
        }
    }

    const BODY: &[u8] = r#"{"creditor_name":"Élise Dupré ?>?","instructed_amount":{"amount":"12.30","currency":"EUR"}}"#.as_bytes();

    #[test]
    fn round_trip_in_every_format() {
        for encoding in [
            SignatureEncoding::Base64Padded,
            SignatureEncoding::Base64UrlNoPad,
        ] {
            for include_x5c in [false, true] {
                for kid in [None, Some("qseal-2025")] {
                    let signer =
                        QsealSigner::new(&config(encoding, include_x5c, kid)).expect("signer");
                    let jws = signer.sign(BODY).expect("sign");
                    verifier(0).verify(&jws, BODY).expect("verifies");

                    let header_b64 = jws.split('.').next().expect("header");
                    let header: serde_json::Value = serde_json::from_slice(
                        &STANDARD_LENIENT
                            .decode(header_b64)
                            .or_else(|_| URL_SAFE_LENIENT.decode(header_b64))
                            .expect("b64"),
                    )
                    .expect("json");
                    assert_eq!(header["typ"], "JWT");
                    assert_eq!(header["alg"], "RS256");
                    assert_eq!(header.get("kid").and_then(|k| k.as_str()), kid);
                    assert_eq!(header.get("x5c").is_some(), include_x5c);
                    if include_x5c {
                        let x5c = header["x5c"][0].as_str().expect("x5c string");
                        let der = STANDARD.decode(x5c).expect("x5c is standard base64");
                        assert_eq!(
                            der,
                            parse_certificates(test_key(0).0.as_bytes()).expect("pem")[0]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn header_without_options_is_exactly_tinks() {
        let signer = QsealSigner::new(&config(SignatureEncoding::Base64Padded, false, None))
            .expect("signer");
        let jws = signer.sign(b"{}").expect("sign");
        let header = STANDARD
            .decode(jws.split('.').next().expect("part"))
            .expect("b64");
        assert_eq!(header, br#"{"typ":"JWT","alg":"RS256"}"#);
    }

    #[test]
    fn empty_body_round_trips() {
        let signer = QsealSigner::new(&config(SignatureEncoding::Base64UrlNoPad, false, None))
            .expect("signer");
        let jws = signer.sign(b"").expect("sign");
        verifier(0).verify(&jws, b"").expect("verifies");
        assert!(message(verifier(0).verify(&jws, b"x")).contains("payload does not match"));
    }

    #[test]
    fn encodings_really_differ() {
        // 0xfb 0xff -> "+/8=" in standard, "-_8" in url-safe.
        let body: &[u8] = &[0xfb, 0xff];
        let padded = QsealSigner::new(&config(SignatureEncoding::Base64Padded, false, None))
            .expect("signer")
            .sign(body)
            .expect("sign");
        let url = QsealSigner::new(&config(SignatureEncoding::Base64UrlNoPad, false, None))
            .expect("signer")
            .sign(body)
            .expect("sign");

        let parts: Vec<&str> = padded.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], "+/8=");
        for part in &parts {
            // '=' only as trailing padding, length a multiple of 4.
            let trimmed = part.trim_end_matches('=');
            assert!(!trimmed.contains('='), "{part}");
            assert!(part.len() - trimmed.len() <= 2);
            assert_eq!(part.len() % 4, 0, "{part}");
            assert!(!part.contains(['-', '_']), "{part}");
            assert!(
                part.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
            );
        }
        let header_padded = STANDARD.encode(br#"{"typ":"JWT","alg":"RS256"}"#);
        assert_eq!(parts[0], header_padded);

        let parts: Vec<&str> = url.split('.').collect();
        assert_eq!(parts[1], "-_8");
        for part in &parts {
            assert!(!part.contains(['+', '/', '=']), "{part}");
        }
        verifier(0).verify(&padded, body).expect("padded verifies");
        verifier(0).verify(&url, body).expect("url verifies");
    }

    #[test]
    fn tampering_fails_with_distinct_messages() {
        for encoding in [
            SignatureEncoding::Base64Padded,
            SignatureEncoding::Base64UrlNoPad,
        ] {
            let signer = QsealSigner::new(&config(encoding, true, Some("k"))).expect("signer");
            let jws = signer.sign(BODY).expect("sign");

            // A flipped body byte.
            let mut body = BODY.to_vec();
            body[5] ^= 0x01;
            assert!(message(verifier(0).verify(&jws, &body)).contains("payload does not match"));

            // A flipped signature byte (decoded, flipped, re-encoded in the same alphabet).
            let (input, signature_b64) = jws.rsplit_once('.').expect("parts");
            let mut signature = match encoding {
                SignatureEncoding::Base64Padded => STANDARD.decode(signature_b64),
                SignatureEncoding::Base64UrlNoPad => URL_SAFE_NO_PAD.decode(signature_b64),
            }
            .expect("b64");
            signature[17] ^= 0x80;
            let forged = format!("{input}.{}", encode(encoding, &signature));
            assert!(message(verifier(0).verify(&forged, BODY)).contains("does not verify"));

            // A different key's certificate.
            assert!(message(verifier(1).verify(&jws, BODY)).contains("does not verify"));

            // A substituted payload keeps the old signature.
            let mut parts: Vec<String> = jws.split('.').map(str::to_owned).collect();
            parts[1] = encode(encoding, b"{}");
            let swapped = parts.join(".");
            assert!(message(verifier(0).verify(&swapped, b"{}")).contains("does not verify"));
        }
    }

    #[test]
    fn alg_none_and_other_algs_fail() {
        let signer = QsealSigner::new(&config(SignatureEncoding::Base64UrlNoPad, false, None))
            .expect("signer");
        let jws = signer.sign(BODY).expect("sign");
        let payload = jws.split('.').nth(1).expect("payload");
        for header in [
            r#"{"typ":"JWT","alg":"none"}"#,
            r#"{"typ":"JWT","alg":"HS256"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            let encoded = URL_SAFE_NO_PAD.encode(header);
            for forged in [
                format!("{encoded}.{payload}."),
                format!("{encoded}.{payload}.AAAA"),
            ] {
                let error = message(verifier(0).verify(&forged, BODY));
                assert!(error.contains("unsupported JWS algorithm"), "{error}");
            }
        }
    }

    #[test]
    fn malformed_headers_fail() {
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "e30.e30.+-",
            "!!!.e30.AAAA",
            "bnVsbA.e30.AAAA",
        ] {
            let error = message(verifier(0).verify(bad, b"{}"));
            assert!(
                error.contains("malformed signature header"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn pkcs1_keys_are_accepted() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::DecodePrivateKey as _;

        let (cert, key) = test_key(0);
        let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(key)
            .expect("pkcs8")
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pkcs1");
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let config = QsealConfig {
            private_key_pem: pkcs1.as_str().to_owned().into(),
            certificate_pem: Some(cert.clone().into_bytes()),
            format: SignatureFormat::default(),
            sign: SignedOperations::default(),
        };
        let jws = QsealSigner::new(&config)
            .expect("signer")
            .sign(BODY)
            .expect("sign");
        verifier(0).verify(&jws, BODY).expect("verifies");
    }

    #[test]
    fn bad_configurations_are_rejected() {
        let mut config = config(SignatureEncoding::Base64Padded, true, None);
        config.certificate_pem = None;
        assert!(QsealSigner::new(&config).is_err());

        // x5c with a certificate of another key.
        config.certificate_pem = Some(test_key(1).0.clone().into_bytes());
        let Err(QsealError::Invalid(error)) = QsealSigner::new(&config) else {
            panic!("mismatched certificate accepted");
        };
        assert!(error.contains("does not match"), "{error}");
        config.format.include_x5c = false;
        assert!(
            QsealSigner::new(&config).is_err(),
            "checked without x5c too"
        );
        config.certificate_pem = None;
        assert!(
            QsealSigner::new(&config).is_ok(),
            "no certificate needed without x5c"
        );

        config.private_key_pem = "not a pem".to_owned().into();
        assert!(QsealSigner::new(&config).is_err());

        // An EC certificate cannot verify RS256.
        let ec = rcgen::KeyPair::generate().expect("ec key");
        let ec_cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&ec)
            .expect("cert");
        assert!(QsealVerifier::from_certificate_pem(ec_cert.pem().as_bytes()).is_err());
        assert!(QsealVerifier::from_certificate_pem(b"garbage").is_err());
    }

    #[test]
    fn debug_output_hides_the_key() {
        let config = config(SignatureEncoding::Base64Padded, false, None);
        let signer = QsealSigner::new(&config).expect("signer");
        for shown in [format!("{signer:?}"), format!("{config:?}")] {
            assert!(!shown.contains("PRIVATE"), "{shown}");
            assert!(!shown.contains(&test_key(0).1[40..80]), "{shown}");
        }
    }

    #[test]
    fn ensure_test_qseal_creates_then_reuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("pki");
        let started = Instant::now();
        let (cert_path, key_path) = ensure_test_qseal(&target).expect("create");
        eprintln!("ensure_test_qseal (generate) took {:?}", started.elapsed());
        assert_eq!(cert_path, target.join(TEST_QSEAL_CERT_FILE));
        assert_eq!(key_path, target.join(TEST_QSEAL_KEY_FILE));
        let cert = fs::read(&cert_path).expect("cert");
        let key = fs::read_to_string(&key_path).expect("key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&key_path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let started = Instant::now();
        ensure_test_qseal(&target).expect("reuse");
        eprintln!("ensure_test_qseal (reuse) took {:?}", started.elapsed());
        assert_eq!(
            fs::read(&cert_path).expect("cert"),
            cert,
            "reused, not regenerated"
        );
        assert_eq!(fs::read_to_string(&key_path).expect("key"), key);

        let config = QsealConfig {
            private_key_pem: key.into(),
            certificate_pem: Some(cert.clone()),
            format: SignatureFormat::default(),
            sign: SignedOperations::default(),
        };
        let jws = QsealSigner::new(&config)
            .expect("signer")
            .sign(BODY)
            .expect("sign");
        QsealVerifier::from_certificate_pem(&cert)
            .expect("verifier")
            .verify(&jws, BODY)
            .expect("verifies");

        // A broken pair is replaced.
        fs::write(&cert_path, test_key(1).0.as_bytes()).expect("overwrite");
        ensure_test_qseal(&target).expect("regenerate");
        assert_ne!(
            fs::read(&cert_path).expect("cert"),
            test_key(1).0.as_bytes()
        );
    }
}
