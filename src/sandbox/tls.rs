//! Test PKI of the simulator: one CA that signs the bank's server certificate, the TPP's
//! client certificate (a stand-in for the eIDAS QWAC, docs/belfius-facts.md §1.2) and a second
//! TPP's, which the handshake accepts but which is not registered for the simulator's Client-ID.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use secrecy::{ExposeSecret as _, SecretString};

pub const CA_FILE: &str = "ca.pem";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const CLIENT_CERT_FILE: &str = "client.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// Another TPP's QWAC stand-in, from the same test CA: for tests of the Client-ID binding.
pub const OTHER_CLIENT_CERT_FILE: &str = "other-tpp.pem";
pub const OTHER_CLIENT_KEY_FILE: &str = "other-tpp-key.pem";

/// A directory missing any of these (one written before the other TPP existed, say) is
/// generated afresh.
const ALL_FILES: [&str; 7] = [
    CA_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    OTHER_CLIENT_CERT_FILE,
    OTHER_CLIENT_KEY_FILE,
];

/// The PEM files in `tls_dir`. Private keys stay in secret boxes.
pub struct TlsMaterial {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: SecretString,
    pub client_cert_pem: String,
    pub client_key_pem: SecretString,
    pub other_client_cert_pem: String,
    pub other_client_key_pem: SecretString,
}

/// Reuses the files of a previous run when all are present, so a restarted simulator keeps
/// trusting the same worker certificate; otherwise generates and writes a fresh set.
pub fn load_or_create(dir: &Path) -> anyhow::Result<TlsMaterial> {
    fs::create_dir_all(dir).with_context(|| format!("creating TLS dir {}", dir.display()))?;
    if ALL_FILES.iter().all(|f| dir.join(f).is_file()) {
        return load(dir);
    }
    let material = generate()?;
    write_file(&dir.join(CA_FILE), material.ca_pem.as_bytes(), false)?;
    write_file(
        &dir.join(SERVER_CERT_FILE),
        material.server_cert_pem.as_bytes(),
        false,
    )?;
    write_file(
        &dir.join(SERVER_KEY_FILE),
        material.server_key_pem.expose_secret().as_bytes(),
        true,
    )?;
    write_file(
        &dir.join(CLIENT_CERT_FILE),
        material.client_cert_pem.as_bytes(),
        false,
    )?;
    write_file(
        &dir.join(CLIENT_KEY_FILE),
        material.client_key_pem.expose_secret().as_bytes(),
        true,
    )?;
    write_file(
        &dir.join(OTHER_CLIENT_CERT_FILE),
        material.other_client_cert_pem.as_bytes(),
        false,
    )?;
    write_file(
        &dir.join(OTHER_CLIENT_KEY_FILE),
        material.other_client_key_pem.expose_secret().as_bytes(),
        true,
    )?;
    Ok(material)
}

fn load(dir: &Path) -> anyhow::Result<TlsMaterial> {
    let read = |name: &str| -> anyhow::Result<String> {
        let path = dir.join(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(TlsMaterial {
        ca_pem: read(CA_FILE)?,
        server_cert_pem: read(SERVER_CERT_FILE)?,
        server_key_pem: read(SERVER_KEY_FILE)?.into(),
        client_cert_pem: read(CLIENT_CERT_FILE)?,
        client_key_pem: read(CLIENT_KEY_FILE)?.into(),
        other_client_cert_pem: read(OTHER_CLIENT_CERT_FILE)?,
        other_client_key_pem: read(OTHER_CLIENT_KEY_FILE)?.into(),
    })
}

fn generate() -> anyhow::Result<TlsMaterial> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("pis-worker sandbox test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    server_params.distinguished_name = name("Belfius PSD2 sandbox simulator");
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &ca_cert, &ca_key)?;

    let client = |common_name: &str| -> anyhow::Result<(String, SecretString)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem().into()))
    };
    let (client_cert_pem, client_key_pem) = client("pis-worker sandbox TPP (QWAC stand-in)")?;
    let (other_client_cert_pem, other_client_key_pem) =
        client("another TPP (QWAC stand-in, not registered)")?;

    // The CA key is dropped here on purpose: nothing else can be issued under this CA.
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem().into(),
        client_cert_pem,
        client_key_pem,
        other_client_cert_pem,
        other_client_key_pem,
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes through a temporary file and a rename so a crash never leaves half a PEM behind;
/// private keys are readable by the owner only.
fn write_file(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("pem.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Server side of mutual TLS: a client certificate signed by the test CA is REQUIRED
/// (docs/belfius-facts.md §1.2, "all our API's are secured by the MTLS protocol").
pub fn server_config(material: &TlsMaterial) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut roots = RootCertStore::empty();
    for ca in certs(&material.ca_pem)? {
        roots
            .add(ca)
            .context("adding the test CA to the trust store")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client certificate verifier")?;

    let chain = certs(&material.server_cert_pem)?;
    let key = private_key(&material.server_key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("selecting TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("loading the server certificate")?;
    // The simulator speaks HTTP/1.1 only; advertising it keeps ALPN honest.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of the first certificate of `pem` (the leaf): how the simulator recognises the
/// registered client certificate.
pub fn leaf_fingerprint(pem: &str) -> anyhow::Result<super::store::Digest> {
    let chain = certs(pem)?;
    let leaf = chain.first().context("no certificate in PEM")?;
    Ok(super::onboarding::fingerprint(leaf))
}

fn certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing certificate PEM")?;
    if certs.is_empty() {
        bail!("no certificate in PEM");
    }
    Ok(certs)
}

fn private_key(pem: &SecretString) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.expose_secret().as_bytes())
        .context("parsing private key PEM")?
        .context("no private key in PEM")
}
