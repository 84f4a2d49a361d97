//! HTTP message signatures as in draft-cavage-http-signatures-10, `rsa-sha256` only, and the
//! RFC 3230 `Digest` header: what the Belfius fallback interface asks of its first call
//! (docs/belfius-facts.md §8, §13; docs/belfius.md "Fallback interface").
//!
//! Pure functions and types: no I/O, no clock. The client (`belfius::fallback`) signs with the
//! QSeal key, the simulator (`sandbox::fallback`) verifies with the registered QSeal
//! certificate. Signing and verification use ring, like `belfius::qseal`.
//!
//! * signing string: one line per covered header, in the order of the `headers` parameter,
//!   `name: value` with lower-case names, joined by `\n` (no trailing newline); the virtual
//!   header `(request-target)` is `<lower-case method> <path>[?<query>]`;
//! * `Signature: keyId="…",algorithm="rsa-sha256",headers="(request-target) date digest",signature="<Base64>"`;
//! * `rsa-sha256` = RSASSA-PKCS1-v1_5 with SHA-256 [I for Belfius: the portal page was cut
//!   before the algorithm, §8]; the signature in standard Base64 with padding.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

use super::qseal::{self, QsealVerifier};

/// The only algorithm produced and accepted.
pub const ALGORITHM: &str = "rsa-sha256";
/// The virtual header naming method and path.
pub const REQUEST_TARGET: &str = "(request-target)";
/// What the fallback's first call covers: the portal names `(request-target)`, `Date` and
/// `Digest` [P §8]. The order is ours [I]: the `headers` parameter carries it, so a verifier
/// following the draft rebuilds the string in whatever order is listed.
pub const FALLBACK_HEADERS: &[&str] = &[REQUEST_TARGET, "date", "digest"];
/// The draft's default when `headers` is absent.
const DEFAULT_HEADERS: &[&str] = &["date"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpSigError {
    #[error("malformed Signature header: {0}")]
    Malformed(String),
    #[error("unsupported signature algorithm {0:?} (only rsa-sha256)")]
    UnsupportedAlgorithm(String),
    #[error("the signature must cover {0}")]
    NotCovered(String),
    #[error("signed header {0} is missing from the request")]
    MissingHeader(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("malformed Digest header: {0}")]
    DigestMalformed(String),
    #[error("Digest does not match the body")]
    DigestMismatch,
    /// Never carries key material.
    #[error("signing key: {0}")]
    Key(String),
}

// ---------------------------------------------------------------------------------------------
// Digest (RFC 3230)

/// How the `Digest` algorithm is spelt. RFC 5843 registers `SHA-256`; the Belfius portal
/// writes `SHA256=` [P §8]. The signer sends [`DigestLabel::Rfc5843`] unless configured
/// otherwise; [`check_digest`] accepts both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestLabel {
    #[default]
    Rfc5843,
    Portal,
}

impl DigestLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rfc5843 => "SHA-256",
            Self::Portal => "SHA256",
        }
    }
}

/// `SHA-256=<Base64 of SHA-256(body)>` (or `SHA256=…`).
pub fn digest_header(body: &[u8], label: DigestLabel) -> String {
    format!(
        "{}={}",
        label.as_str(),
        STANDARD.encode(Sha256::digest(body))
    )
}

/// Checks a received `Digest` value against the body. RFC 3230 allows a comma-separated list
/// of digests: every SHA-256 entry (either spelling, any case) must match, and there must be
/// one; entries of other algorithms are ignored.
pub fn check_digest(value: &str, body: &[u8]) -> Result<(), HttpSigError> {
    let expected = Sha256::digest(body);
    let mut found = false;
    for entry in value.split(',') {
        let entry = entry.trim();
        let (algorithm, encoded) = entry
            .split_once('=')
            .ok_or_else(|| HttpSigError::DigestMalformed("expected algorithm=value".into()))?;
        let algorithm = algorithm.trim();
        if !(algorithm.eq_ignore_ascii_case("SHA-256") || algorithm.eq_ignore_ascii_case("SHA256"))
        {
            continue;
        }
        let decoded = STANDARD
            .decode(encoded.trim())
            .map_err(|_| HttpSigError::DigestMalformed("SHA-256 value is not Base64".into()))?;
        if decoded.as_slice() != expected.as_slice() {
            return Err(HttpSigError::DigestMismatch);
        }
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(HttpSigError::DigestMalformed("no SHA-256 digest".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Signing string

/// The string that is signed. `lookup` gives a header's value by lower-case name (several
/// occurrences joined with `", "`, as the draft says); values are trimmed.
pub fn signing_string(
    method: &str,
    target: &str,
    headers: &[impl AsRef<str>],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, HttpSigError> {
    let mut lines = Vec::with_capacity(headers.len());
    for name in headers {
        let name = name.as_ref().to_ascii_lowercase();
        let value = if name == REQUEST_TARGET {
            format!("{} {target}", method.to_ascii_lowercase())
        } else {
            lookup(&name)
                .ok_or_else(|| HttpSigError::MissingHeader(name.clone()))?
                .trim()
                .to_owned()
        };
        // A line break inside a value would let one header forge another line.
        if value.contains(['\n', '\r']) {
            return Err(HttpSigError::Malformed(format!(
                "the value of {name} contains a line break"
            )));
        }
        lines.push(format!("{name}: {value}"));
    }
    if lines.is_empty() {
        return Err(HttpSigError::Malformed("no header to sign".into()));
    }
    Ok(lines.join("\n"))
}

// ---------------------------------------------------------------------------------------------
// The Signature header

/// A parsed (or to be sent) `Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    pub key_id: String,
    pub algorithm: String,
    /// Lower-case names, in signing order.
    pub headers: Vec<String>,
    pub signature: Vec<u8>,
}

impl SignatureHeader {
    /// `keyId="…",algorithm="…",headers="…",signature="…"`.
    pub fn to_header_value(&self) -> String {
        format!(
            "keyId=\"{}\",algorithm=\"{}\",headers=\"{}\",signature=\"{}\"",
            self.key_id,
            self.algorithm,
            self.headers.join(" "),
            STANDARD.encode(&self.signature)
        )
    }

    /// Strict: only the draft-10 parameters `keyId`, `algorithm`, `headers`, `signature`, each
    /// at most once, each a double-quoted string without escapes, separated by commas
    /// (optional spaces around them). `keyId`, `algorithm` and `signature` are required,
    /// `headers` defaults to `date`; header names must be lower-case and distinct; the only
    /// algorithm is `rsa-sha256`; the signature is standard Base64.
    pub fn parse(value: &str) -> Result<Self, HttpSigError> {
        let malformed = |why: &str| HttpSigError::Malformed(why.to_owned());
        let (mut key_id, mut algorithm, mut headers, mut signature) = (None, None, None, None);
        let mut rest = value.trim();
        if rest.is_empty() {
            return Err(malformed("empty"));
        }
        loop {
            let (name, after) = rest
                .split_once('=')
                .ok_or_else(|| malformed("expected name=\"value\""))?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(malformed("bad parameter name"));
            }
            let after = after
                .strip_prefix('"')
                .ok_or_else(|| malformed("parameter values must be quoted"))?;
            let (quoted, after) = after
                .split_once('"')
                .ok_or_else(|| malformed("unterminated quoted value"))?;
            if quoted.contains('\\') {
                return Err(malformed("escapes in quoted values are not accepted"));
            }
            let slot = match name {
                "keyId" => &mut key_id,
                "algorithm" => &mut algorithm,
                "headers" => &mut headers,
                "signature" => &mut signature,
                _ => {
                    let shown: String = name.chars().take(32).collect();
                    return Err(HttpSigError::Malformed(format!(
                        "unknown parameter {shown:?}"
                    )));
                }
            };
            if slot.replace(quoted).is_some() {
                return Err(HttpSigError::Malformed(format!(
                    "duplicate parameter {name}"
                )));
            }
            let after = after.trim_start();
            if after.is_empty() {
                break;
            }
            rest = after
                .strip_prefix(',')
                .ok_or_else(|| malformed("parameters must be separated by commas"))?
                .trim_start();
            if rest.is_empty() {
                return Err(malformed("trailing comma"));
            }
        }

        let key_id = key_id
            .filter(|k| !k.is_empty())
            .ok_or_else(|| malformed("keyId is required"))?;
        let algorithm = algorithm.ok_or_else(|| malformed("algorithm is required"))?;
        if algorithm != ALGORITHM {
            let shown: String = algorithm.chars().take(32).collect();
            return Err(HttpSigError::UnsupportedAlgorithm(shown));
        }
        let headers: Vec<String> = match headers {
            None => DEFAULT_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
            Some(list) => {
                let names: Vec<&str> = list.split(' ').collect();
                if names.iter().any(|n| n.is_empty()) {
                    return Err(malformed(
                        "headers must be names separated by single spaces",
                    ));
                }
                if names
                    .iter()
                    .any(|n| n.bytes().any(|b| b.is_ascii_uppercase()))
                {
                    return Err(malformed("header names must be lower-case"));
                }
                for (index, name) in names.iter().enumerate() {
                    if names[..index].contains(name) {
                        return Err(HttpSigError::Malformed(format!(
                            "header {name} listed twice"
                        )));
                    }
                }
                names.into_iter().map(str::to_owned).collect()
            }
        };
        let signature = signature
            .filter(|s| !s.is_empty())
            .ok_or_else(|| malformed("signature is required"))?;
        let signature = STANDARD
            .decode(signature)
            .map_err(|_| malformed("signature is not standard Base64"))?;
        Ok(Self {
            key_id: key_id.to_owned(),
            algorithm: algorithm.to_owned(),
            headers,
            signature,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

/// An RSA public key that checks RSASSA-PKCS1-v1_5/SHA-256 signatures.
pub trait RsaSha256Key {
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool;
}

impl RsaSha256Key for QsealVerifier {
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.verify_rsa_sha256(message, signature).is_ok()
    }
}

/// Checks a parsed `Signature` against the request: every name of `required` must be covered,
/// every covered header present, and the signature valid under `key`. The `Digest` value
/// itself is checked against the body by [`check_digest`], separately.
pub fn verify(
    signature: &SignatureHeader,
    method: &str,
    target: &str,
    required: &[&str],
    lookup: impl Fn(&str) -> Option<String>,
    key: &impl RsaSha256Key,
) -> Result<(), HttpSigError> {
    if signature.algorithm != ALGORITHM {
        return Err(HttpSigError::UnsupportedAlgorithm(
            signature.algorithm.chars().take(32).collect(),
        ));
    }
    for name in required {
        if !signature.headers.iter().any(|h| h == name) {
            return Err(HttpSigError::NotCovered((*name).to_owned()));
        }
    }
    let text = signing_string(method, target, &signature.headers, lookup)?;
    if key.verifies(text.as_bytes(), &signature.signature) {
        Ok(())
    } else {
        Err(HttpSigError::BadSignature)
    }
}

// ---------------------------------------------------------------------------------------------
// Signing

/// Signs requests with the QSeal private key. The key never shows in Debug output.
pub struct HttpSigner {
    key: RsaKeyPair,
    key_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for HttpSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl HttpSigner {
    /// `private_key_pem`: PKCS#8 or PKCS#1 RSA key (the QSeal key, loaded as `belfius::qseal`
    /// does). `key_id` goes verbatim into `keyId`, so it may not hold quotes or backslashes.
    pub fn from_pem(
        private_key_pem: &SecretString,
        key_id: impl Into<String>,
    ) -> Result<Self, HttpSigError> {
        let key_id = key_id.into();
        if key_id.is_empty()
            || key_id
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(HttpSigError::Key(
                "keyId must be non-empty, without quotes, backslashes or control characters".into(),
            ));
        }
        let key = qseal::parse_rsa_private_key(private_key_pem.expose_secret().as_bytes())
            .map_err(|e| HttpSigError::Key(e.to_string()))?;
        Ok(Self {
            key,
            key_id,
            rng: SystemRandom::new(),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The `Signature` header covering `headers` (in that order) of this request.
    pub fn sign(
        &self,
        method: &str,
        target: &str,
        headers: &[impl AsRef<str>],
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<SignatureHeader, HttpSigError> {
        let text = signing_string(method, target, headers, lookup)?;
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                text.as_bytes(),
                &mut signature,
            )
            .map_err(|_| HttpSigError::Key("RSA signing failed".into()))?;
        Ok(SignatureHeader {
            key_id: self.key_id.clone(),
            algorithm: ALGORITHM.to_owned(),
            headers: headers
                .iter()
                .map(|h| h.as_ref().to_ascii_lowercase())
                .collect(),
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};

    use super::*;

    // ---- draft-cavage-http-signatures-10, Appendix C -----------------------------------------
    //
    // The request of Appendix C:
    //   POST /foo?param=value&pet=dog HTTP/1.1
    //   Host: example.com
    //   Date: Sun, 05 Jan 2014 21:31:40 GMT
    //   Content-Type: application/json
    //   Digest: SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=
    //   Content-Length: 18
    //
    //   {"hello": "world"}
    //
    // The draft's own text could not be retrieved here, so the expected signatures were
    // computed independently with OpenSSL 3.0 from the draft's 1024-bit test key "Test"
    // (its PKCS#1 PEM as printed in the draft, saved as test-key.pem):
    //   printf '%s' 'date: Sun, 05 Jan 2014 21:31:40 GMT' > default.txt
    //   printf '%s\n%s\n%s\n%s\n%s\n%s' '(request-target): post /foo?param=value&pet=dog' \
    //     'host: example.com' 'date: Sun, 05 Jan 2014 21:31:40 GMT' \
    //     'content-type: application/json' \
    //     'digest: SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=' \
    //     'content-length: 18' > all.txt
    //   openssl dgst -sha256 -sign test-key.pem default.txt | base64 -w0
    //   openssl dgst -sha256 -sign test-key.pem all.txt | base64 -w0
    //   printf '%s' '{"hello": "world"}' | openssl dgst -sha256 -binary | base64
    //   openssl rsa -in test-key.pem -RSAPublicKey_out -outform DER | base64 -w0
    // Both signatures equal the values that several public implementations quote as the
    // draft's "Default Test" and "All Headers Test".

    const C_BODY: &[u8] = br#"{"hello": "world"}"#;
    const C_DIGEST: &str = "SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=";
    /// The test key "Test" (RSA-1024), public half, PKCS#1 DER in Base64.
    const C_PUBLIC_KEY: &str = "MIGJAoGBAMIUQ0bDffIaKHL3akONlCGXQLfqs8mP4K99ILz6rbyHEDXrVAU1R3XfC4JNRyrRB3aqwF7/aEXJzYMIkmDSHUvvz7pnhQxHsQ5yl91QT0d/eb+Gz4VRHjm4El4MrUdIUcPxscoPqS/wU8Z8lOi1z7bGMnChiL7WGqnV8h6RrGzJAgMBAAE=";
    const C_DEFAULT_SIGNATURE: &str = "SjWJWbWN7i0wzBvtPl8rbASWz5xQW6mcJmn+ibttBqtifLN7Sazz6m79cNfwwb8DMJ5cou1s7uEGKKCs+FLEEaDV5lp7q25WqS+lavg7T8hc0GppauB6hbgEKTwblDHYGEtbGmtdHgVCk9SuS13F0hZ8FD0k/5OxEPXe5WozsbM=";
    const C_ALL_SIGNATURE: &str = "vSdrb+dS3EceC9bcwHSo4MlyKS59iFIrhgYkz8+oVLEEzmYZZvRs8rgOp+63LEM3v+MFHB32NfpB2bEKBIvB1q52LaEUHFv120V01IL+TAD48XaERZFukWgHoBTLMhYS2Gb51gWxpeIq8knRmPnYePbF5MOkR0Zkly4zKH7s1dE=";
    const C_ALL_HEADERS: &str = "(request-target) host date content-type digest content-length";

    /// The draft's key is 1024 bits: ring verifies such keys only with its legacy algorithm,
    /// which production code never uses (the QSeal path requires 2048 bits or more).
    struct Legacy1024(Vec<u8>);

    impl RsaSha256Key for Legacy1024 {
        fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
            UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &self.0)
                .verify(message, signature)
                .is_ok()
        }
    }

    fn test_key() -> Legacy1024 {
        Legacy1024(STANDARD.decode(C_PUBLIC_KEY).unwrap())
    }

    fn lookup_in(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            let values: Vec<&str> = pairs
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            (!values.is_empty()).then(|| values.join(", "))
        }
    }

    fn c_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Host", "example.com"),
            ("Date", "Sun, 05 Jan 2014 21:31:40 GMT"),
            ("Content-Type", "application/json"),
            ("Digest", C_DIGEST),
            ("Content-Length", "18"),
        ]
    }

    const C_METHOD: &str = "POST";
    const C_TARGET: &str = "/foo?param=value&pet=dog";

    #[test]
    fn appendix_c_default_test() {
        let header = SignatureHeader::parse(&format!(
            r#"keyId="Test",algorithm="rsa-sha256",signature="{C_DEFAULT_SIGNATURE}""#
        ))
        .unwrap();
        assert_eq!(header.key_id, "Test");
        assert_eq!(header.headers, ["date"], "the draft's default list");
        assert_eq!(
            signing_string(C_METHOD, C_TARGET, &header.headers, lookup_in(&c_headers())).unwrap(),
            "date: Sun, 05 Jan 2014 21:31:40 GMT"
        );
        verify(
            &header,
            C_METHOD,
            C_TARGET,
            &["date"],
            lookup_in(&c_headers()),
            &test_key(),
        )
        .unwrap();
    }

    #[test]
    fn appendix_c_all_headers_test() {
        let value = format!(
            r#"keyId="Test",algorithm="rsa-sha256",headers="{C_ALL_HEADERS}",signature="{C_ALL_SIGNATURE}""#
        );
        let header = SignatureHeader::parse(&value).unwrap();
        assert_eq!(
            header.to_header_value(),
            value,
            "parse and print round-trip"
        );
        assert_eq!(
            signing_string(C_METHOD, C_TARGET, &header.headers, lookup_in(&c_headers())).unwrap(),
            "(request-target): post /foo?param=value&pet=dog\n\
             host: example.com\n\
             date: Sun, 05 Jan 2014 21:31:40 GMT\n\
             content-type: application/json\n\
             digest: SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=\n\
             content-length: 18"
        );
        verify(
            &header,
            C_METHOD,
            C_TARGET,
            &["(request-target)", "date", "digest"],
            lookup_in(&c_headers()),
            &test_key(),
        )
        .unwrap();
        check_digest(C_DIGEST, C_BODY).unwrap();
        assert_eq!(digest_header(C_BODY, DigestLabel::Rfc5843), C_DIGEST);
    }

    fn all_headers_signature() -> SignatureHeader {
        SignatureHeader::parse(&format!(
            r#"keyId="Test",algorithm="rsa-sha256",headers="{C_ALL_HEADERS}",signature="{C_ALL_SIGNATURE}""#
        ))
        .unwrap()
    }

    fn verify_c(
        header: &SignatureHeader,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), HttpSigError> {
        verify(
            header,
            method,
            target,
            &["(request-target)", "date", "digest"],
            lookup_in(headers),
            &test_key(),
        )
    }

    #[test]
    fn tampered_requests_fail() {
        let header = all_headers_signature();
        verify_c(&header, C_METHOD, C_TARGET, &c_headers()).unwrap();

        // Another body: the signature still holds (it covers the Digest header), the digest not.
        assert_eq!(
            check_digest(C_DIGEST, br#"{"hello": "World"}"#),
            Err(HttpSigError::DigestMismatch)
        );
        // A Digest rewritten for another body breaks the signature.
        let forged = digest_header(br#"{"hello": "World"}"#, DigestLabel::Rfc5843);
        let mut headers: Vec<(&str, &str)> = c_headers();
        headers[3].1 = &forged;
        assert_eq!(
            verify_c(&header, C_METHOD, C_TARGET, &headers),
            Err(HttpSigError::BadSignature)
        );

        // Another date.
        let mut headers = c_headers();
        headers[1].1 = "Sun, 05 Jan 2014 21:31:41 GMT";
        assert_eq!(
            verify_c(&header, C_METHOD, C_TARGET, &headers),
            Err(HttpSigError::BadSignature)
        );

        // Another method, another path or query.
        for (method, target) in [
            ("PUT", C_TARGET),
            (C_METHOD, "/foo?param=value&pet=cat"),
            (C_METHOD, "/foo"),
        ] {
            assert_eq!(
                verify_c(&header, method, target, &c_headers()),
                Err(HttpSigError::BadSignature),
                "{method} {target}"
            );
        }

        // The method is lower-cased, the target kept as sent.
        verify_c(&header, "post", C_TARGET, &c_headers()).unwrap();
    }

    #[test]
    fn header_order_is_the_listed_one() {
        let mut header = all_headers_signature();
        header.headers.swap(1, 2); // date before host
        let text =
            signing_string(C_METHOD, C_TARGET, &header.headers, lookup_in(&c_headers())).unwrap();
        assert!(text.starts_with(
            "(request-target): post /foo?param=value&pet=dog\ndate: Sun, 05 Jan 2014 21:31:40 GMT\nhost: example.com\n"
        ));
        assert_eq!(
            verify_c(&header, C_METHOD, C_TARGET, &c_headers()),
            Err(HttpSigError::BadSignature)
        );
        // The order of the request's own headers does not matter.
        let mut shuffled = c_headers();
        shuffled.reverse();
        verify_c(&all_headers_signature(), C_METHOD, C_TARGET, &shuffled).unwrap();
    }

    #[test]
    fn missing_and_uncovered_headers_fail() {
        let header = all_headers_signature();
        let without_length: Vec<_> = c_headers()
            .into_iter()
            .filter(|(name, _)| *name != "Content-Length")
            .collect();
        assert_eq!(
            verify_c(&header, C_METHOD, C_TARGET, &without_length),
            Err(HttpSigError::MissingHeader("content-length".into()))
        );

        // The Default Test signature is valid, but covers only the date.
        let default = SignatureHeader::parse(&format!(
            r#"keyId="Test",algorithm="rsa-sha256",signature="{C_DEFAULT_SIGNATURE}""#
        ))
        .unwrap();
        assert_eq!(
            verify_c(&default, C_METHOD, C_TARGET, &c_headers()),
            Err(HttpSigError::NotCovered("(request-target)".into()))
        );
        let mut no_digest = all_headers_signature();
        no_digest.headers.retain(|h| h != "digest");
        assert_eq!(
            verify_c(&no_digest, C_METHOD, C_TARGET, &c_headers()),
            Err(HttpSigError::NotCovered("digest".into()))
        );
    }

    #[test]
    fn unknown_algorithms_fail() {
        for algorithm in ["hmac-sha256", "rsa-sha1", "hs2019", "RSA-SHA256", ""] {
            let value = format!(
                r#"keyId="Test",algorithm="{algorithm}",headers="date",signature="{C_DEFAULT_SIGNATURE}""#
            );
            assert_eq!(
                SignatureHeader::parse(&value),
                Err(HttpSigError::UnsupportedAlgorithm(algorithm.into())),
                "{algorithm}"
            );
        }
        let mut header = all_headers_signature();
        header.algorithm = "hmac-sha256".into();
        assert!(matches!(
            verify_c(&header, C_METHOD, C_TARGET, &c_headers()),
            Err(HttpSigError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn malformed_signature_headers_fail() {
        let s = C_DEFAULT_SIGNATURE;
        for bad in [
            String::new(),
            "keyId=Test,algorithm=\"rsa-sha256\",signature=\"AAAA\"".to_owned(),
            format!(r#"keyId="Test",keyId="Other",algorithm="rsa-sha256",signature="{s}""#),
            format!(r#"keyId="Test",algorithm="rsa-sha256",created="1",signature="{s}""#),
            format!(r#"keyId="Test",algorithm="rsa-sha256",headers="",signature="{s}""#),
            format!(
                r#"keyId="Test",algorithm="rsa-sha256",headers="date  digest",signature="{s}""#
            ),
            format!(r#"keyId="Test",algorithm="rsa-sha256",headers="Date",signature="{s}""#),
            format!(r#"keyId="Test",algorithm="rsa-sha256",headers="date date",signature="{s}""#),
            format!(r#"algorithm="rsa-sha256",signature="{s}""#),
            format!(r#"keyId="",algorithm="rsa-sha256",signature="{s}""#),
            r#"keyId="Test",algorithm="rsa-sha256""#.to_owned(),
            r#"keyId="Test",algorithm="rsa-sha256",signature="not base64!""#.to_owned(),
            format!(r#"keyId="Test",signature="{s}""#),
            format!(r#"keyId="Test",algorithm="rsa-sha256",signature="{s}","#),
            format!(r#"keyId="Test" algorithm="rsa-sha256",signature="{s}""#),
            format!(r#"keyId="Te\"st",algorithm="rsa-sha256",signature="{s}""#),
            format!(r#"keyId="Test",algorithm="rsa-sha256",signature="{s}"#),
        ] {
            assert!(SignatureHeader::parse(&bad).is_err(), "accepted: {bad}");
        }
        // Spaces around commas are tolerated.
        SignatureHeader::parse(&format!(
            r#" keyId="Test", algorithm="rsa-sha256" , signature="{s}" "#
        ))
        .unwrap();
    }

    #[test]
    fn digest_spellings_and_lists() {
        let portal = digest_header(C_BODY, DigestLabel::Portal);
        assert_eq!(
            portal,
            "SHA256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="
        );
        check_digest(&portal, C_BODY).unwrap();
        check_digest(
            "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
            C_BODY,
        )
        .unwrap();
        check_digest(&format!("MD5=Sd/dVLAcvNLSq16eXua5uQ==, {C_DIGEST}"), C_BODY).unwrap();
        assert!(matches!(
            check_digest("MD5=Sd/dVLAcvNLSq16eXua5uQ==", C_BODY),
            Err(HttpSigError::DigestMalformed(_))
        ));
        assert!(matches!(
            check_digest("SHA-256=%%%", C_BODY),
            Err(HttpSigError::DigestMalformed(_))
        ));
        assert!(matches!(
            check_digest("X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE", C_BODY),
            Err(HttpSigError::DigestMalformed(_))
        ));
        assert_eq!(
            check_digest(&format!("{C_DIGEST},SHA256=AAAA"), C_BODY),
            Err(HttpSigError::DigestMismatch),
            "every SHA-256 entry must match"
        );
    }

    // ---- The fallback's own shape, with a 2048-bit key --------------------------------------
    //
    // tests/fixtures/httpsig/ holds key-a.pem / cert-a.pem and cert-b.pem (another key), made by
    //   openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out key-a.pem
    //   openssl req -x509 -new -key key-a.pem -subj "/CN=httpsig test key a" -days 36500 -sha256 -out cert-a.pem
    // (the same for b). The expected values were computed with OpenSSL 3.0:
    //   BODY='{"data":{"type":"sample-token","attributes":{"appReference":"12345"}}}'
    //   printf '%s' "$BODY" | openssl dgst -sha256 -binary | base64 -w0
    //   printf '%s\n%s\n%s' '(request-target): post /fallback/session' \
    //     'date: 2018-08-04T12:23:34Z' "digest: SHA-256=$DIGEST" > fb.txt
    //   openssl dgst -sha256 -sign key-a.pem fb.txt | base64 -w0

    const KEY_A: &str = include_str!("../../tests/fixtures/httpsig/key-a.pem");
    const CERT_A: &str = include_str!("../../tests/fixtures/httpsig/cert-a.pem");
    const CERT_B: &str = include_str!("../../tests/fixtures/httpsig/cert-b.pem");
    const FB_BODY: &[u8] =
        br#"{"data":{"type":"sample-token","attributes":{"appReference":"12345"}}}"#;
    const FB_DIGEST: &str = "SHA-256=blZ+xHYremNwmbY2RBsqkdX/OyQuohxDdlabow5aekw=";
    const FB_DATE: &str = "2018-08-04T12:23:34Z";
    const FB_SIGNATURE: &str = "F73yxUw/hdp29DlRTjuNLqsmNnYNRofLVGkz3kvX2zCpzc21cohzBwE3s7kuuLjUrARtyBFPDXZXEK7DU8wZ4AfmXoTMcVPGvlRbMIkE1XUP2xUfLJTxBvzswoGGYMB3PqsHx7ARbN5UTuYwaoPf6LJqmGV8CbdlqoVGoUVgLWMqyzdUAyWc3ke3LlTRgcFEAGVYDqDY6kE1fhxtJqP6PtThFd0OjIhQH7NT7gkwmyZuUofQgnC9ZQMiOZrAIQgE0lFIZk+qiqTpLAM6m+rQOpFkuYpVq3YDTpeIbp7yOc6JzEiQSkVeFyP64nlv0y8VXuRPwvkbN/BYkicCHI1Nbg==";

    fn fallback_headers(digest: &str) -> Vec<(&'static str, String)> {
        vec![("Date", FB_DATE.to_owned()), ("Digest", digest.to_owned())]
    }

    fn lookup_owned(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        }
    }

    fn signer() -> HttpSigner {
        HttpSigner::from_pem(&SecretString::from(KEY_A), "SN=1,CA=test").unwrap()
    }

    #[test]
    fn signer_matches_openssl() {
        let digest = digest_header(FB_BODY, DigestLabel::Rfc5843);
        assert_eq!(digest, FB_DIGEST);
        let header = signer()
            .sign(
                "POST",
                "/fallback/session",
                FALLBACK_HEADERS,
                lookup_owned(fallback_headers(&digest)),
            )
            .unwrap();
        assert_eq!(
            header.to_header_value(),
            format!(
                r#"keyId="SN=1,CA=test",algorithm="rsa-sha256",headers="(request-target) date digest",signature="{FB_SIGNATURE}""#
            )
        );

        let cert_a = QsealVerifier::from_certificate_pem(CERT_A.as_bytes()).unwrap();
        let parsed = SignatureHeader::parse(&header.to_header_value()).unwrap();
        assert_eq!(parsed, header);
        verify(
            &parsed,
            "POST",
            "/fallback/session",
            FALLBACK_HEADERS,
            lookup_owned(fallback_headers(FB_DIGEST)),
            &cert_a,
        )
        .unwrap();
        check_digest(FB_DIGEST, FB_BODY).unwrap();
    }

    #[test]
    fn wrong_key_fails() {
        let header = signer()
            .sign(
                "POST",
                "/fallback/session",
                FALLBACK_HEADERS,
                lookup_owned(fallback_headers(FB_DIGEST)),
            )
            .unwrap();
        let cert_b = QsealVerifier::from_certificate_pem(CERT_B.as_bytes()).unwrap();
        assert_eq!(
            verify(
                &header,
                "POST",
                "/fallback/session",
                FALLBACK_HEADERS,
                lookup_owned(fallback_headers(FB_DIGEST)),
                &cert_b,
            ),
            Err(HttpSigError::BadSignature)
        );
        // And the draft's Appendix C signature is not one of key a's.
        let cert_a = QsealVerifier::from_certificate_pem(CERT_A.as_bytes()).unwrap();
        assert_eq!(
            verify(
                &all_headers_signature(),
                C_METHOD,
                C_TARGET,
                &["date"],
                lookup_in(&c_headers()),
                &cert_a,
            ),
            Err(HttpSigError::BadSignature)
        );
    }

    #[test]
    fn bad_key_ids_and_keys_are_refused() {
        for key_id in ["", "a\"b", "a\\b", "a\nb"] {
            assert!(matches!(
                HttpSigner::from_pem(&SecretString::from(KEY_A), key_id),
                Err(HttpSigError::Key(_))
            ));
        }
        assert!(matches!(
            HttpSigner::from_pem(&SecretString::from("not a key"), "k"),
            Err(HttpSigError::Key(_))
        ));
        let shown = format!("{:?}", signer());
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(!shown.contains(&KEY_A[40..80]), "{shown}");
    }

    #[test]
    fn signing_string_refuses_line_breaks_and_empty_lists() {
        let none: &[&str] = &[];
        assert!(signing_string("GET", "/", none, |_| None).is_err());
        assert_eq!(
            signing_string("GET", "/", &["date"], |_| Some("a\nb".into())),
            Err(HttpSigError::Malformed(
                "the value of date contains a line break".into()
            ))
        );
        assert_eq!(
            signing_string("GET", "/x", &["(request-target)", "date"], |_| Some(
                "  padded  ".into()
            ))
            .unwrap(),
            "(request-target): get /x\ndate: padded"
        );
    }
}
