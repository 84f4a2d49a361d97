//! QSeal signing through the public API: the files `ensure_test_qseal` writes, signed with
//! `QsealSigner`, checked by `QsealVerifier` and cross-checked by an independent RSA
//! implementation (the `rsa` crate, public-key operation only).

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use pis_worker::belfius::qseal::{self, QsealSigner, QsealVerifier};
use pis_worker::belfius::{QsealConfig, SignatureEncoding, SignatureFormat, SignedOperations};
use rsa::pkcs8::DecodePrivateKey as _;

/// DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

const BODY: &str = r#"{"creditor_account":{"iban":"BE68539007547034"},"creditor_name":"Test","endtoend_identification":"e2e-1","instructed_amount":{"amount":"10.00","currency":"EUR"}}"#;

#[test]
fn generated_files_sign_and_verify_in_both_encodings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let (cert_path, key_path) = qseal::ensure_test_qseal(dir.path()).expect("test qseal");
    eprintln!(
        "ensure_test_qseal generated an RSA-2048 QSeal in {:?}",
        started.elapsed()
    );

    let cert_pem = std::fs::read(&cert_path).expect("cert");
    let key_pem = std::fs::read_to_string(&key_path).expect("key");
    let verifier = QsealVerifier::from_certificate_pem(&cert_pem).expect("verifier");
    let public_key = rsa::RsaPrivateKey::from_pkcs8_pem(&key_pem)
        .expect("pkcs8")
        .to_public_key();

    for (encoding, include_x5c) in [
        (SignatureEncoding::Base64Padded, false),
        (SignatureEncoding::Base64Padded, true),
        (SignatureEncoding::Base64UrlNoPad, false),
        (SignatureEncoding::Base64UrlNoPad, true),
    ] {
        let signer = QsealSigner::new(&QsealConfig {
            private_key_pem: key_pem.clone().into(),
            certificate_pem: Some(cert_pem.clone()),
            format: SignatureFormat {
                encoding,
                include_x5c,
                kid: Some("test-qseal".into()),
            },
            sign: SignedOperations::default(),
        })
        .expect("signer");
        assert_eq!(signer.format().encoding, encoding);
        let header = signer.sign(BODY.as_bytes()).expect("sign");
        verifier.verify(&header, BODY.as_bytes()).expect("verifies");

        // Independent check: RSASSA-PKCS1-v1_5 / SHA-256 over the first two parts.
        let (signing_input, signature) = header.rsplit_once('.').expect("three parts");
        let decode = |part: &str| match encoding {
            SignatureEncoding::Base64Padded => STANDARD.decode(part),
            SignatureEncoding::Base64UrlNoPad => URL_SAFE_NO_PAD.decode(part),
        };
        let signature = decode(signature).expect("signature b64");
        assert_eq!(signature.len(), 256);
        let hashed = ring::digest::digest(&ring::digest::SHA256, signing_input.as_bytes());
        public_key
            .verify(
                rsa::Pkcs1v15Sign {
                    hash_len: Some(32),
                    prefix: SHA256_DIGEST_INFO.into(),
                },
                hashed.as_ref(),
                &signature,
            )
            .expect("rsa crate accepts the signature");
        let payload = signing_input.split('.').nth(1).expect("payload");
        assert_eq!(decode(payload).expect("payload b64"), BODY.as_bytes());

        // The same header does not verify another body.
        assert!(verifier.verify(&header, b"{}").is_err());
    }

    // Reuse: same files, not regenerated.
    let started = Instant::now();
    let again = qseal::ensure_test_qseal(dir.path()).expect("reuse");
    eprintln!(
        "ensure_test_qseal reused the files in {:?}",
        started.elapsed()
    );
    assert_eq!(again, (cert_path.clone(), key_path));
    assert_eq!(std::fs::read(&cert_path).expect("cert"), cert_pem);
}
