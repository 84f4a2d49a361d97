//! Loading the QWAC client identity (PEM or PKCS#12).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p12_keystore::{KeyStore, KeyStoreEntry, Pkcs12ImportPolicy};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};

use super::QwacIdentity;

/// Messages never contain the password or key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("qwac: {0}")]
    Invalid(String),
}

/// Converts a PKCS#12 archive (DER) with its password into a PEM identity for rustls.
///
/// The archive must hold exactly one private key with its certificate chain (leaf first). The
/// key comes out as PKCS#8 `PRIVATE KEY` PEM, the chain as concatenated `CERTIFICATE` PEM.
pub fn qwac_from_pkcs12(
    der: &[u8],
    password: &SecretString,
) -> Result<QwacIdentity, IdentityError> {
    let store = KeyStore::from_pkcs12(der, password.expose_secret(), Pkcs12ImportPolicy::Strict)
        .map_err(|e| match e {
            p12_keystore::error::Error::MacError(_) => IdentityError::Invalid(
                "PKCS#12 integrity check failed: wrong password or corrupted archive".into(),
            ),
            // p12-keystore's messages describe the structure, never the password.
            other => IdentityError::Invalid(format!(
                "cannot read the PKCS#12 archive (wrong password or not a PKCS#12 file): {other}"
            )),
        })?;

    let chains: Vec<_> = store
        .entries()
        .filter_map(|(_, entry)| match entry {
            KeyStoreEntry::PrivateKeyChain(chain) => Some(chain),
            _ => None,
        })
        .collect();
    let chain = match chains.as_slice() {
        [chain] => *chain,
        [] => {
            return Err(IdentityError::Invalid(
                "the PKCS#12 archive holds no private key with a matching certificate".into(),
            ));
        }
        more => {
            return Err(IdentityError::Invalid(format!(
                "the PKCS#12 archive holds {} private keys; expected exactly one",
                more.len()
            )));
        }
    };
    if chain.certs().is_empty() {
        return Err(IdentityError::Invalid(
            "the PKCS#12 private key has no certificate".into(),
        ));
    }

    let mut cert_chain_pem = Vec::new();
    for cert in chain.certs() {
        cert_chain_pem.extend_from_slice(pem_encode("CERTIFICATE", cert.as_der()).as_bytes());
    }
    let private_key_pem = pem_encode("PRIVATE KEY", chain.key().as_der());
    Ok(QwacIdentity {
        cert_chain_pem,
        private_key_pem: SecretString::from(private_key_pem.as_str()),
    })
}

/// RFC 7468 PEM: 64-character base64 lines between BEGIN/END lines. The intermediate buffers are
/// wiped on drop since this also encodes private keys.
pub fn pem_encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let encoded = Zeroizing::new(STANDARD.encode(der));
    let mut pem = Zeroizing::new(String::with_capacity(
        encoded.len() + encoded.len() / 64 + 2 * label.len() + 40,
    ));
    pem.push_str("-----BEGIN ");
    pem.push_str(label);
    pem.push_str("-----\n");
    // base64 output is ASCII, so byte chunks are valid UTF-8 boundaries.
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END ");
    pem.push_str(label);
    pem.push_str("-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use p12_keystore::{Certificate, PrivateKey, PrivateKeyChain};

    use super::*;

    struct Fixture {
        ca_der: Vec<u8>,
        leaf_der: Vec<u8>,
        leaf_key_der: Vec<u8>,
    }

    /// An ECDSA P-256 CA and a client leaf signed by it.
    fn fixture() -> Fixture {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test QWAC CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");

        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["tpp.example".to_owned()]).expect("params");
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test QWAC");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf");
        Fixture {
            ca_der: ca.der().to_vec(),
            leaf_der: leaf.der().to_vec(),
            leaf_key_der: leaf_key.serialize_der(),
        }
    }

    fn pkcs12(fixture: &Fixture, password: &str) -> Vec<u8> {
        let chain = PrivateKeyChain::new(
            b"qwac-key-1".as_slice(),
            PrivateKey::from_der(&fixture.leaf_key_der).expect("key"),
            [
                Certificate::from_der(&fixture.leaf_der).expect("leaf"),
                Certificate::from_der(&fixture.ca_der).expect("ca"),
            ],
        );
        let mut store = KeyStore::new();
        store.add_entry("qwac", KeyStoreEntry::PrivateKeyChain(chain));
        // Low iteration counts keep the debug-build test fast; the format is the same.
        store
            .writer(password)
            .encryption_iterations(1000)
            .mac_iterations(1000)
            .write()
            .expect("write p12")
    }

    fn pem_blocks(pem: &[u8]) -> Vec<Vec<u8>> {
        rustls_pemfile::certs(&mut &pem[..])
            .map(|c| c.expect("pem").as_ref().to_vec())
            .collect()
    }

    #[test]
    fn pkcs12_round_trips_to_pem() {
        let fixture = fixture();
        let p12 = pkcs12(&fixture, "s3cret-pass");
        let identity =
            qwac_from_pkcs12(&p12, &SecretString::from("s3cret-pass")).expect("identity");

        assert_eq!(
            pem_blocks(&identity.cert_chain_pem),
            vec![fixture.leaf_der.clone(), fixture.ca_der.clone()]
        );
        let key_pem = identity.private_key_pem.expose_secret();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(key_pem.ends_with("-----END PRIVATE KEY-----\n"));
        assert!(key_pem.lines().all(|line| line.len() <= 64));
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .expect("pem")
            .expect("a key");
        assert_eq!(key.secret_der(), fixture.leaf_key_der.as_slice());

        let mut combined = identity.cert_chain_pem.clone();
        combined.extend_from_slice(key_pem.as_bytes());
        let reqwest_identity = reqwest::Identity::from_pem(&combined).expect("reqwest identity");
        reqwest::Client::builder()
            .use_rustls_tls()
            .identity(reqwest_identity)
            .build()
            .expect("client with the identity");

        assert_eq!(format!("{identity:?}"), "QwacIdentity { .. }");
    }

    #[test]
    fn wrong_password_fails_without_echoing_it() {
        let fixture = fixture();
        let p12 = pkcs12(&fixture, "right-password");
        let Err(IdentityError::Invalid(message)) =
            qwac_from_pkcs12(&p12, &SecretString::from("wrong-password"))
        else {
            panic!("wrong password accepted");
        };
        assert!(message.contains("wrong password"), "{message}");
        assert!(!message.contains("wrong-password"), "{message}");
        assert!(!message.contains("right-password"), "{message}");
    }

    #[test]
    fn archive_without_key_fails() {
        let fixture = fixture();
        let mut store = KeyStore::new();
        store.add_entry(
            "ca",
            KeyStoreEntry::Certificate(Certificate::from_der(&fixture.ca_der).expect("ca")),
        );
        let p12 = store
            .writer("pw")
            .encryption_iterations(1000)
            .mac_iterations(1000)
            .write()
            .expect("write");
        let Err(IdentityError::Invalid(message)) =
            qwac_from_pkcs12(&p12, &SecretString::from("pw"))
        else {
            panic!("archive without a key accepted");
        };
        assert!(message.contains("no private key"), "{message}");
    }

    #[test]
    fn garbage_fails() {
        assert!(qwac_from_pkcs12(b"not a pkcs12", &SecretString::from("pw")).is_err());
    }

    #[test]
    fn pem_encoding_wraps_at_64() {
        let pem = pem_encode("CERTIFICATE", &[0u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        // 100 bytes -> 136 base64 characters -> 64 + 64 + 8.
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 64);
        assert_eq!(lines[3].len(), 8);
        assert_eq!(lines[4], "-----END CERTIFICATE-----");
        assert_eq!(lines.len(), 5);
    }
}
