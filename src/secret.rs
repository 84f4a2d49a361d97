//! The keys of the `payment-state` topic. The broker and anyone reading the topic see only
//! ciphertext; the keys live in the worker's secret configuration.
//!
//! - A [`StateKey`] is 32 random bytes with a short public id (the key id written in every
//!   sealed record, docs/architecture.md "State record format"). Configured as 64 hex
//!   characters (its id is then derived from the key: the first 8 hex characters of
//!   SHA-256("pis-worker state key id" || key)), or as `id:hex` with an explicit id.
//! - A [`StateKeyRing`] is the current key (seals every record written) and any number of
//!   previous keys (only open records written before a rotation).
//!
//! Records of format 2 are sealed whole with XChaCha20-Poly1305 (`kafka::state::v2`). Format 1
//! (read during migration only, `kafka::state::v1`) sealed just the secrets, each with
//! ChaCha20-Poly1305 and a random 96-bit nonce, the record key as associated data: that is
//! [`StateKey::open_v1`], kept to read those records.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, XChaCha20Poly1305};
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::{Deserialize, Serialize};

const VERSION_PREFIX: &str = "v1:";

/// Longest key id accepted (it is written, length-prefixed, in every sealed record).
pub const MAX_KEY_ID_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "state key must be 64 hex characters (32 bytes), optionally prefixed by `id:` (an id of 1-32 characters A-Z a-z 0-9 . _ -)"
    )]
    BadKey,
    #[error("two state keys have the same id {0:?}")]
    DuplicateKeyId(String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open with this key (wrong key, or moved between records)")]
    OpenFailed,
}

/// The public name of a state key, written in the clear in every record it seals.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_KEY_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(SecretError::BadKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One key of the state topic. Its `Debug` shows the id only.
pub struct StateKey {
    id: KeyId,
    /// Format 2: whole records (sealing).
    xchacha: XChaCha20Poly1305,
    /// Format 2, opening: the key itself, for the HChaCha20 step of [`StateKey::open_x`].
    raw: SecretBox<[u8; 32]>,
    /// Format 1: the secrets inside a record (read only).
    chacha: ChaCha20Poly1305,
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateKey({}, ..)", self.id)
    }
}

/// A sealed secret as format 1 stored it: `v1:` + base64(nonce || ciphertext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

impl StateKey {
    /// `hex` (the id derived from the key) or `id:hex`.
    pub fn parse(text: &SecretString) -> Result<Self, SecretError> {
        let text = text.expose_secret().trim();
        let (id, hex_key) = match text.split_once(':') {
            Some((id, hex_key)) => (Some(KeyId::parse(id.trim())?), hex_key.trim()),
            None => (None, text),
        };
        let bytes = hex::decode(hex_key).map_err(|_| SecretError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretError::BadKey);
        }
        let id = match id {
            Some(id) => id,
            None => derived_id(&bytes),
        };
        let mut raw = Box::new([0u8; 32]);
        raw.copy_from_slice(&bytes);
        let mut bytes = bytes;
        let key = Ok(Self {
            id,
            xchacha: XChaCha20Poly1305::new(Key::from_slice(&bytes)),
            raw: SecretBox::new(raw),
            chacha: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        });
        bytes.zeroize();
        key
    }

    /// Same as [`StateKey::parse`] (the name older callers know).
    pub fn from_hex(hex_key: &SecretString) -> Result<Self, SecretError> {
        Self::parse(hex_key)
    }

    /// A fresh random key, as 64 hex characters (for `pis-worker keygen` and tests).
    pub fn generate_hex() -> SecretString {
        SecretString::from(hex::encode(XChaCha20Poly1305::generate_key(&mut OsRng)))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Seals `plain` with a fresh random 192-bit nonce: returns (nonce, ciphertext || tag).
    pub(crate) fn seal_x(
        &self,
        plain: &[u8],
        aad: &[u8],
    ) -> Result<([u8; 24], Vec<u8>), SecretError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .xchacha
            .encrypt(&nonce, Payload { msg: plain, aad })
            .map_err(|_| SecretError::Malformed)?;
        let mut out = [0u8; 24];
        out.copy_from_slice(&nonce);
        Ok((out, ciphertext))
    }

    /// Opens what [`StateKey::seal_x`] sealed: XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha).
    ///
    /// Computed as the construction is defined, with ring's ChaCha20-Poly1305 (about 4x faster
    /// than the RustCrypto one on the restore path, where every record is opened): HChaCha20
    /// derives a subkey from the key and the first 16 bytes of the nonce, then ChaCha20-Poly1305
    /// (RFC 8439) opens under that subkey with the nonce `0u32 || nonce[16..24]`. The bytes
    /// accepted are exactly those `XChaCha20Poly1305::decrypt` accepts (tests cross-check).
    pub(crate) fn open_x(
        &self,
        nonce: &[u8; 24],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SecretError> {
        use chacha20::cipher::consts::U10;
        use chacha20::cipher::generic_array::GenericArray;
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce as RingNonce, UnboundKey};

        let (hchacha_input, tail) = nonce.split_at(16);
        let mut subkey = chacha20::hchacha::<U10>(
            GenericArray::from_slice(self.raw.expose_secret()),
            GenericArray::from_slice(hchacha_input),
        );
        let key = UnboundKey::new(&CHACHA20_POLY1305, &subkey);
        subkey.as_mut_slice().zeroize();
        let key = LessSafeKey::new(key.map_err(|_| SecretError::Malformed)?);
        let mut ietf_nonce = [0u8; 12];
        ietf_nonce[4..].copy_from_slice(tail);
        let mut buffer = ciphertext.to_vec();
        let plain_len = key
            .open_in_place(
                RingNonce::assume_unique_for_key(ietf_nonce),
                Aad::from(aad),
                &mut buffer,
            )
            .map_err(|_| SecretError::OpenFailed)?
            .len();
        buffer.truncate(plain_len);
        Ok(buffer)
    }

    /// Format 1's sealing of one secret. Only tests write format 1 now (fixtures, migration).
    pub fn seal_v1(&self, secret: &SecretString, record_key: &str) -> Result<Sealed, SecretError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .chacha
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

    /// Opens a secret of a format 1 record.
    pub fn open_v1(&self, sealed: &Sealed, record_key: &str) -> Result<SecretString, SecretError> {
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
            .chacha
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

/// The id of a key configured without one. Public by design (it is in every record), and it
/// reveals nothing usable about the key: a 32-bit prefix of a domain-separated SHA-256.
fn derived_id(key: &[u8]) -> KeyId {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"pis-worker state key id\0");
    hasher.update(key);
    KeyId(hex::encode(&hasher.finalize()[..4]))
}

/// The keys of the state topic: the current one seals, every one opens.
pub struct StateKeyRing {
    current: StateKey,
    previous: Vec<StateKey>,
    /// Whether format 1 records (secrets sealed, the rest in the clear) are still read:
    /// true until the operator has finished the migration (docs/runbooks.md).
    accept_v1: bool,
    /// The format new records are written in (all formats are read).
    write_format: StateFormat,
}

/// The format of the state records a worker writes (docs/architecture.md, "State record
/// format"). Every worker reads both; `V2` is for a rolling upgrade from a version that reads
/// only format 2: write 2 until every replica runs this version, then 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFormat {
    /// Format 2: the sealed body is JSON.
    V2,
    /// Format 3: the sealed body is binary (postcard), about half the bytes, several times
    /// faster to read.
    #[default]
    V3,
}

impl std::str::FromStr for StateFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "2" => Ok(Self::V2),
            "3" => Ok(Self::V3),
            other => Err(format!("state format must be 2 or 3, not {other:?}")),
        }
    }
}

impl std::fmt::Debug for StateKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateKeyRing")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .field("accept_v1", &self.accept_v1)
            .field("write_format", &self.write_format)
            .finish()
    }
}

impl StateKeyRing {
    pub fn new(current: StateKey, previous: Vec<StateKey>) -> Result<Self, SecretError> {
        let mut seen = std::collections::HashSet::new();
        for key in std::iter::once(&current).chain(&previous) {
            if !seen.insert(key.id.clone()) {
                return Err(SecretError::DuplicateKeyId(key.id.0.clone()));
            }
        }
        Ok(Self {
            current,
            previous,
            accept_v1: true,
            write_format: StateFormat::default(),
        })
    }

    /// A ring of one key.
    pub fn single(current: StateKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
            accept_v1: true,
            write_format: StateFormat::default(),
        }
    }

    /// From configuration: the current key and a list of previous keys, each `hex` or `id:hex`,
    /// separated by commas or new lines (a file's content or `PIS_STATE_KEYS_PREVIOUS`).
    pub fn from_config(
        current: &SecretString,
        previous: Option<&SecretString>,
    ) -> Result<Self, SecretError> {
        let current = StateKey::parse(current)?;
        let previous = match previous {
            Some(list) => list
                .expose_secret()
                .split([',', '\n'])
                .map(str::trim)
                .filter(|item| !item.is_empty() && !item.starts_with('#'))
                .map(|item| StateKey::parse(&SecretString::from(item)))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        Self::new(current, previous)
    }

    /// A ring with a fresh random key (tests, benches).
    pub fn generate() -> Self {
        match StateKey::parse(&StateKey::generate_hex()) {
            Ok(key) => Self::single(key),
            // 64 hex characters of a fresh key always parse.
            Err(e) => unreachable!("a generated key does not parse: {e}"),
        }
    }

    /// Whether format 1 records are read (true unless turned off once migration is done).
    pub fn with_accept_v1(mut self, accept: bool) -> Self {
        self.accept_v1 = accept;
        self
    }

    /// The format new records are written in.
    pub fn with_write_format(mut self, format: StateFormat) -> Self {
        self.write_format = format;
        self
    }

    pub fn write_format(&self) -> StateFormat {
        self.write_format
    }

    pub fn accepts_v1(&self) -> bool {
        self.accept_v1
    }

    pub fn current(&self) -> &StateKey {
        &self.current
    }

    /// The key with this id, current or previous.
    pub fn get(&self, id: &str) -> Option<&StateKey> {
        self.keys().find(|k| k.id.0 == id)
    }

    /// Current first.
    pub fn keys(&self) -> impl Iterator<Item = &StateKey> {
        std::iter::once(&self.current).chain(&self.previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StateKey {
        StateKey::from_hex(&StateKey::generate_hex()).expect("key")
    }

    /// `open_x` computes XChaCha20-Poly1305 itself (HChaCha20, then ring's ChaCha20-Poly1305):
    /// the test vector of draft-irtf-cfrg-xchacha (section A.3.1) opens.
    #[test]
    fn open_x_opens_the_xchacha20_poly1305_test_vector() {
        let k = StateKey::parse(&SecretString::from(
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        ))
        .expect("key");
        let nonce: [u8; 24] = hex::decode("404142434445464748494a4b4c4d4e4f5051525354555657")
            .expect("hex")
            .try_into()
            .expect("24 bytes");
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").expect("hex");
        let sealed = hex::decode(concat!(
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb",
            "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452",
            "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9",
            "21f9664c97637da9768812f615c68b13b52e",
            "c0875924c1c7987947deafd8780acf49"
        ))
        .expect("hex");
        let plain = k.open_x(&nonce, &sealed, &aad).expect("opens");
        assert_eq!(
            plain,
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for \
              the future, sunscreen would be it."
                .to_vec()
        );
    }

    /// What `seal_x` (RustCrypto's XChaCha20-Poly1305) seals, `open_x` opens, at every length
    /// around the block sizes; any altered byte, associated data or key is refused.
    #[test]
    fn open_x_agrees_with_seal_x_and_refuses_anything_altered() {
        let k = key();
        for len in (0..300).chain([1000, 1204, 4096, 65_537]) {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let aad = format!("header|payment/p-{len}");
            let (nonce, sealed) = k.seal_x(&plain, aad.as_bytes()).expect("seal");
            assert_eq!(
                k.open_x(&nonce, &sealed, aad.as_bytes()).expect("open"),
                plain
            );
            for at in [0, sealed.len() / 2, sealed.len() - 1] {
                let mut altered = sealed.clone();
                altered[at] ^= 1;
                assert!(matches!(
                    k.open_x(&nonce, &altered, aad.as_bytes()),
                    Err(SecretError::OpenFailed)
                ));
            }
            let mut other_nonce = nonce;
            other_nonce[len % 24] ^= 1;
            assert!(k.open_x(&other_nonce, &sealed, aad.as_bytes()).is_err());
            assert!(k.open_x(&nonce, &sealed, b"header|payment/p-x").is_err());
            assert!(key().open_x(&nonce, &sealed, aad.as_bytes()).is_err());
        }
        assert!(matches!(
            k.open_x(&[0; 24], &[0; 15], b""),
            Err(SecretError::OpenFailed)
        ));
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let k = key();
        let sealed = k
            .seal_v1(&SecretString::from("verifier-123"), "payment/p-1")
            .expect("seal");
        assert!(!sealed.0.contains("verifier-123"));
        let opened = k.open_v1(&sealed, "payment/p-1").expect("open");
        assert_eq!(opened.expose_secret(), "verifier-123");
    }

    #[test]
    fn a_sealed_value_does_not_open_under_another_record_or_key() {
        let k = key();
        let sealed = k
            .seal_v1(&SecretString::from("x"), "payment/p-1")
            .expect("seal");
        assert!(matches!(
            k.open_v1(&sealed, "payment/p-2"),
            Err(SecretError::OpenFailed)
        ));
        assert!(matches!(
            key().open_v1(&sealed, "payment/p-1"),
            Err(SecretError::OpenFailed)
        ));
        assert!(matches!(
            k.open_v1(&Sealed("v1:AAAA".into()), "payment/p-1"),
            Err(SecretError::Malformed)
        ));
    }

    #[test]
    fn rejects_keys_of_the_wrong_size() {
        assert!(StateKey::from_hex(&SecretString::from("abcd")).is_err());
        assert!(StateKey::from_hex(&SecretString::from("zz".repeat(32))).is_err());
        assert!(StateKey::parse(&SecretString::from(format!(":{}", "00".repeat(32)))).is_err());
        assert!(
            StateKey::parse(&SecretString::from(format!("bad id:{}", "00".repeat(32)))).is_err()
        );
    }

    #[test]
    fn key_ids_are_derived_or_explicit() {
        let hex = "11".repeat(32);
        let derived = StateKey::parse(&SecretString::from(hex.clone())).expect("key");
        assert_eq!(derived.id().as_str().len(), 8);
        let again = StateKey::parse(&SecretString::from(format!(" {hex}\n"))).expect("key");
        assert_eq!(derived.id(), again.id());
        let named = StateKey::parse(&SecretString::from(format!("2026-q1:{hex}"))).expect("key");
        assert_eq!(named.id().as_str(), "2026-q1");
    }

    #[test]
    fn a_ring_parses_previous_keys_and_refuses_duplicate_ids() {
        let current = SecretString::from(format!("b:{}", "22".repeat(32)));
        let previous = SecretString::from(format!("a:{}, {}\n", "11".repeat(32), "33".repeat(32)));
        let ring = StateKeyRing::from_config(&current, Some(&previous)).expect("ring");
        assert_eq!(ring.current().id().as_str(), "b");
        assert!(ring.get("a").is_some());
        assert_eq!(ring.keys().count(), 3);
        let dup = SecretString::from(format!("b:{}", "11".repeat(32)));
        assert!(matches!(
            StateKeyRing::from_config(&current, Some(&dup)),
            Err(SecretError::DuplicateKeyId(_))
        ));
    }

    #[test]
    fn debug_output_shows_key_ids_only() {
        let hex = "ab".repeat(32);
        let ring = StateKeyRing::from_config(
            &SecretString::from(format!("cur:{hex}")),
            Some(&SecretString::from(format!("old:{}", "cd".repeat(32)))),
        )
        .expect("ring");
        let shown = format!("{ring:?} {:?}", ring.current());
        assert!(shown.contains("cur") && shown.contains("old"));
        assert!(!shown.contains("abab") && !shown.contains("cdcd"));
    }
}
