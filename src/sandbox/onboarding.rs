//! What the simulated bank knows of its TPP from onboarding, and the checks that follow from
//! it: the QWAC registered for the Client-ID, the registered redirect URIs, and the one Base64
//! encoding the bank accepts in QSeal signatures (docs/belfius.md, "Simulator strictness").

use std::collections::HashSet;

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use url::{Host, Url};

use super::store::Digest;
use crate::belfius::SignatureEncoding;
use crate::belfius::client::headers as h;

/// Redirect URIs registered by default: what the tests, the demo and the benchmarks use
/// (`https://client.example/callback` is `pis-worker send`'s default), plus loopback for a TPP
/// run on a developer's machine. `*` at the end makes an entry a prefix.
pub const DEFAULT_REDIRECT_URIS: &[&str] = &[
    "https://client.example/*",
    "https://tpp.example/*",
    "http://127.0.0.1/*",
    "http://localhost/*",
];

/// SHA-256 of the leaf certificate the client presented in the TLS handshake; inserted in
/// every request of the connection. `None`: no certificate (not possible on the bank hosts,
/// which require one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCertificate(pub Option<Digest>);

impl PeerCertificate {
    pub fn of(chain: Option<&[CertificateDer<'_>]>) -> Self {
        Self(chain.and_then(<[_]>::first).map(|leaf| fingerprint(leaf)))
    }
}

pub fn fingerprint(der: &[u8]) -> Digest {
    Sha256::digest(der).into()
}

/// `ab:cd:…` or `abcd…` (64 hex digits, any case) → the digest.
pub fn parse_fingerprint(text: &str) -> Result<Digest, String> {
    let hex_digits: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hex_digits)
        .map_err(|e| format!("certificate fingerprint {text:?} is not hex: {e}"))?;
    Digest::try_from(bytes.as_slice())
        .map_err(|_| format!("certificate fingerprint {text:?} is not 32 bytes (SHA-256)"))
}

/// The onboarding record of the simulator's one TPP.
#[derive(Debug, Clone)]
pub struct Onboarding {
    /// Fingerprints of the QWACs registered for the Client-ID.
    certificates: HashSet<Digest>,
    redirect_uris: Vec<RedirectRule>,
    /// The one encoding accepted in `Signature` headers.
    pub signature_encoding: SignatureEncoding,
}

impl Onboarding {
    pub fn new(
        certificates: impl IntoIterator<Item = Digest>,
        redirect_uris: &[String],
        signature_encoding: SignatureEncoding,
    ) -> Result<Self, String> {
        let certificates: HashSet<Digest> = certificates.into_iter().collect();
        if certificates.is_empty() {
            return Err("no client certificate registered for the Client-ID".into());
        }
        let redirect_uris = redirect_uris
            .iter()
            .map(|text| RedirectRule::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            certificates,
            redirect_uris,
            signature_encoding,
        })
    }

    pub fn certificate_registered(&self, peer: PeerCertificate) -> bool {
        peer.0.is_some_and(|d| self.certificates.contains(&d))
    }

    /// Why `uri` may not be used as a Redirect-URI by this TPP, if it may not.
    pub fn redirect_refusal(&self, uri: &str) -> Option<&'static str> {
        let Ok(url) = Url::parse(uri) else {
            return Some("must be an absolute http(s) URL");
        };
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => return Some("plain http only for a loopback host"),
            _ => return Some("must be an absolute http(s) URL"),
        }
        // RFC 6749 §3.1.2: the redirection endpoint URI must not include a fragment.
        if url.fragment().is_some() {
            return Some("must not have a fragment");
        }
        if self
            .redirect_uris
            .iter()
            .any(|rule| rule.matches(uri, &url))
        {
            None
        } else {
            Some("not registered for this Client-ID")
        }
    }
}

/// One registered redirect URI: the exact text, or with a trailing `*` a prefix.
#[derive(Debug, Clone)]
struct RedirectRule {
    text: String,
    prefix: bool,
    /// RFC 8252 §7.3: a loopback redirect may use any port, chosen when the app starts.
    any_port: bool,
}

impl RedirectRule {
    fn parse(entry: &str) -> Result<Self, String> {
        let (text, prefix) = match entry.strip_suffix('*') {
            Some(text) => (text, true),
            None => (entry, false),
        };
        let url = Url::parse(text)
            .map_err(|e| format!("redirect URI {entry:?} is not an absolute URL: {e}"))?;
        let loopback = is_loopback(&url);
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(format!(
                    "redirect URI {entry:?}: plain http only for loopback"
                ));
            }
            _ => return Err(format!("redirect URI {entry:?}: http(s) only")),
        }
        // A prefix ends inside the path, else `https://tpp.example*` would also match
        // `https://tpp.example.evil.com/`.
        let after_scheme = text.split_once("://").map_or("", |(_, rest)| rest);
        if prefix && !after_scheme.contains('/') {
            return Err(format!(
                "redirect URI prefix {entry:?} must include the path (at least the '/' after the host)"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            prefix,
            any_port: loopback && url.port().is_none(),
        })
    }

    fn matches(&self, raw: &str, url: &Url) -> bool {
        let compare = |candidate: &str, registered: &str| {
            if self.prefix {
                candidate.starts_with(registered)
            } else {
                candidate == registered
            }
        };
        if compare(raw, &self.text) {
            return true;
        }
        if !self.any_port || url.port().is_none() || !is_loopback(url) {
            return false;
        }
        // Compared without the port, both in the URL parser's serialisation.
        let mut portless = url.clone();
        if portless.set_port(None).is_err() {
            return false;
        }
        // The registered text parsed when the rule was made, so this cannot fail.
        Url::parse(&self.text)
            .is_ok_and(|registered| compare(portless.as_str(), registered.as_str()))
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Whether a request names `client_id`: in its `Client-ID` header, or (at /token) as the user
/// of its HTTP Basic credentials.
pub fn names_client_id(headers: &HeaderMap, client_id: &str) -> bool {
    let header = headers
        .get(h::CLIENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    header == Some(client_id) || basic_user(headers).as_deref() == Some(client_id)
}

fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    decoded.split_once(':').map(|(id, _)| id.to_owned())
}

/// Whether every part of a compact JWS is in `encoding`: standard Base64 with its padding, or
/// base64url without padding. An RSA signature always shows which (256 bytes need padding),
/// so a JWS in the other encoding never passes.
pub fn jws_encoded_as(jws: &str, encoding: SignatureEncoding) -> bool {
    let parts: Vec<&str> = jws.trim().split('.').collect();
    parts.len() == 3
        && parts.iter().all(|part| match encoding {
            SignatureEncoding::Base64Padded => STANDARD.decode(part).is_ok(),
            SignatureEncoding::Base64UrlNoPad => URL_SAFE_NO_PAD.decode(part).is_ok(),
        })
}

pub fn encoding_name(encoding: SignatureEncoding) -> &'static str {
    match encoding {
        SignatureEncoding::Base64Padded => "standard Base64 with padding",
        SignatureEncoding::Base64UrlNoPad => "base64url without padding",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onboarding(uris: &[&str]) -> Onboarding {
        let uris: Vec<String> = uris.iter().map(|u| (*u).to_owned()).collect();
        Onboarding::new([[7; 32]], &uris, SignatureEncoding::Base64Padded).expect("valid")
    }

    #[test]
    fn redirect_uris_exact_prefix_and_loopback() {
        let o = onboarding(&[
            "https://tpp.example/callback",
            "https://client.example/app/*",
            "http://127.0.0.1/cb",
            "http://localhost/*",
        ]);
        for ok in [
            "https://tpp.example/callback",
            "https://client.example/app/",
            "https://client.example/app/return?x=1",
            "http://127.0.0.1/cb",
            // RFC 8252 §7.3: any port on loopback.
            "http://127.0.0.1:53111/cb",
            "http://localhost:8080/anything",
        ] {
            assert_eq!(o.redirect_refusal(ok), None, "{ok}");
        }
        for (refused, why) in [
            ("https://tpp.example/callback2", "not registered"),
            ("https://tpp.example/callback?x=1", "not registered"),
            ("https://TPP.example/callback", "not registered"),
            ("https://client.example/ap", "not registered"),
            ("https://client.example.evil.com/app/", "not registered"),
            ("https://tpp.example/callback#frag", "fragment"),
            ("http://tpp.example/callback", "loopback"),
            ("http://127.0.0.1/other", "not registered"),
            ("ftp://tpp.example/callback", "http(s)"),
            ("/callback", "absolute"),
        ] {
            let refusal = o.redirect_refusal(refused);
            assert!(
                refusal.is_some_and(|r| r.contains(why)),
                "{refused}: {refusal:?}"
            );
        }
    }

    #[test]
    fn registration_rules_are_checked() {
        let with = |uri: &str| {
            Onboarding::new(
                [[7; 32]],
                &[uri.to_owned()],
                SignatureEncoding::Base64Padded,
            )
        };
        assert!(with("http://tpp.example/cb").is_err());
        assert!(with("https://tpp.example*").is_err());
        assert!(with("not a url").is_err());
        assert!(with("https://tpp.example/*").is_ok());
        assert!(Onboarding::new([], &[], SignatureEncoding::Base64Padded).is_err());
        for default in DEFAULT_REDIRECT_URIS {
            assert!(with(default).is_ok(), "{default}");
        }
    }

    #[test]
    fn fingerprints_and_the_named_client_id() {
        let digest = fingerprint(b"certificate");
        let hex_text = hex::encode(digest);
        assert_eq!(parse_fingerprint(&hex_text), Ok(digest));
        let colons: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Ok(digest));
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint("zz").is_err());

        let mut headers = HeaderMap::new();
        assert!(!names_client_id(&headers, "tpp-1"));
        let basic = format!("Basic {}", STANDARD.encode("tpp-1:secret"));
        headers.insert(header::AUTHORIZATION, basic.parse().expect("header"));
        assert!(names_client_id(&headers, "tpp-1"));
        // Either place counts: naming another id in the header does not hide the Basic user.
        headers.insert(h::CLIENT_ID, "tpp-2".parse().expect("header"));
        assert!(names_client_id(&headers, "tpp-1"));
        assert!(names_client_id(&headers, "tpp-2"));
        assert!(!names_client_id(&headers, "tpp-3"));
    }

    #[test]
    fn one_base64_encoding_per_signature() {
        // 256 signature bytes: padded standard Base64 ends with "==", base64url has none.
        let signature = [0xfb_u8; 256];
        let padded = format!(
            "{}.{}.{}",
            STANDARD.encode(b"{\"alg\":\"RS256\"}"),
            STANDARD.encode(b"{}"),
            STANDARD.encode(signature)
        );
        let url = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(b"{\"alg\":\"RS256\"}"),
            URL_SAFE_NO_PAD.encode(b"{}"),
            URL_SAFE_NO_PAD.encode(signature)
        );
        assert!(jws_encoded_as(&padded, SignatureEncoding::Base64Padded));
        assert!(!jws_encoded_as(&padded, SignatureEncoding::Base64UrlNoPad));
        assert!(jws_encoded_as(&url, SignatureEncoding::Base64UrlNoPad));
        assert!(!jws_encoded_as(&url, SignatureEncoding::Base64Padded));
        assert!(!jws_encoded_as("a.b", SignatureEncoding::Base64Padded));
    }
}
