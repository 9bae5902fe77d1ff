//! Authentication: a long-lived token (a JWT whose `exp` is its expiry), or OAuth 2 with a
//! single-use refresh token.
//!
//! The OAuth pair lives in the ledger (`amocrm_tokens`), sealed with ChaCha20-Poly1305
//! under a key derived (HKDF-SHA256) from the client secret, which itself is never stored:
//! a copy of the database alone does not give access to the CRM. The database is the one
//! source of the current pair; refreshes are serialised (see `Client::refresh`) because two
//! racing refreshes lock the integration out until a person re-authorises.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// Refresh this long before the access token expires.
pub const REFRESH_AHEAD_SECONDS: i64 = 15 * 60;
/// Refresh at least this often, so the 3-month refresh token never lapses on a quiet account.
pub const REFRESH_AT_LEAST_EVERY_DAYS: i64 = 30;
/// Warn this long before a long-lived token expires.
pub const WARN_AHEAD_DAYS: i64 = 14;
/// A refresh token lives this long (AmoCRM: 3 months).
pub const REFRESH_TOKEN_LIFETIME_DAYS: i64 = 90;

/// The command an operator runs after a refused refresh.
pub const REAUTH_COMMAND: &str = "kopilka amocrm auth --code CODE";

/// The current OAuth pair, unsealed (in memory only).
#[derive(Clone, Debug)]
pub struct Pair {
    pub access: Secret,
    pub refresh: Secret,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Pair {
    /// Whether to refresh now: the access token is about to expire, or the pair is old
    /// enough that a quiet month must not pass without renewing the refresh token.
    pub fn due(&self, now: DateTime<Utc>) -> bool {
        self.access_expires_at - now < Duration::seconds(REFRESH_AHEAD_SECONDS)
            || now - self.updated_at > Duration::days(REFRESH_AT_LEAST_EVERY_DAYS)
    }
}

#[derive(Serialize, Deserialize)]
struct SealedText {
    access: String,
    refresh: String,
}

/// The sealing key for an account: HKDF-SHA256 over the client secret, bound to the
/// account so a pair cannot be moved between accounts.
pub fn seal_key(client_secret: &Secret, account: &str) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(
        Some(b"kopilka/amocrm/tokens/v1"),
        client_secret.expose().as_bytes(),
    );
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail here
    let _ = hk.expand(account.as_bytes(), &mut key);
    key
}

/// Seals a pair: a random 12-byte nonce followed by the ciphertext; the account is the
/// associated data.
pub fn seal(key: &[u8; 32], account: &str, access: &Secret, refresh: &Secret) -> Result<Vec<u8>, String> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let text = serde_json::to_vec(&SealedText {
        access: access.expose().to_string(),
        refresh: refresh.expose().to_string(),
    })
    .map_err(|e| format!("cannot serialise the token pair: {e}"))?;
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &text,
                aad: account.as_bytes(),
            },
        )
        .map_err(|_| "cannot seal the token pair".to_string())?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a sealed pair. Fails when the client secret changed (the key differs) or the
/// stored bytes were altered.
pub fn unseal(key: &[u8; 32], account: &str, sealed: &[u8]) -> Result<(Secret, Secret), String> {
    if sealed.len() < 12 + 16 {
        return Err("the stored token pair is too short to be sealed data".into());
    }
    let (nonce, body) = sealed.split_at(12);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let text = cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad: account.as_bytes() })
        .map_err(|_| {
            "the stored token pair cannot be opened (the client secret changed?); run `kopilka amocrm auth --code CODE`"
                .to_string()
        })?;
    let t: SealedText =
        serde_json::from_slice(&text).map_err(|e| format!("the stored token pair is not readable: {e}"))?;
    Ok((Secret::new(t.access), Secret::new(t.refresh)))
}

/// The `exp` claim of a JWT (the long-lived token's expiry), without checking the
/// signature: kopilka only needs to know when to warn.
pub fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v.get("exp")?;
    let secs = exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))?;
    Utc.timestamp_opt(secs, 0).single()
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Encodes bytes as base64url without padding (for tests and the simulator's tokens).
pub fn base64url_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// How kopilka authenticates to one account.
pub enum Auth {
    LongLived {
        token: Secret,
        expires_at: Option<DateTime<Utc>>,
    },
    OAuth(Box<OAuth>),
}

pub struct OAuth {
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: String,
    pub account: String,
    pub key: [u8; 32],
    /// The pair as last read from or written to the ledger.
    pub(crate) cache: std::sync::Mutex<Option<Pair>>,
    /// One refresh in flight per account.
    pub(crate) refresh_lock: tokio::sync::Mutex<()>,
    /// Refresh calls made to the token endpoint (for health and tests).
    pub(crate) refreshes: std::sync::atomic::AtomicU64,
}

impl OAuth {
    pub fn new(client_id: String, client_secret: Secret, redirect_uri: String, account: String) -> OAuth {
        let key = seal_key(&client_secret, &account);
        OAuth {
            client_id,
            client_secret,
            redirect_uri,
            account,
            key,
            cache: std::sync::Mutex::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
            refreshes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn cached(&self) -> Option<Pair> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_cached(&self, p: Option<Pair>) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_pairs_open_only_with_the_same_secret_and_account() {
        let k = seal_key(&Secret::new("client-secret"), "https://shop.amocrm.ru");
        let sealed = seal(
            &k,
            "https://shop.amocrm.ru",
            &Secret::new("acc"),
            &Secret::new("ref"),
        )
        .unwrap();
        assert!(!sealed.windows(3).any(|w| w == b"acc" || w == b"ref"));
        let (a, r) = unseal(&k, "https://shop.amocrm.ru", &sealed).unwrap();
        assert_eq!((a.expose(), r.expose()), ("acc", "ref"));
        let other = seal_key(&Secret::new("another secret"), "https://shop.amocrm.ru");
        assert!(unseal(&other, "https://shop.amocrm.ru", &sealed).is_err());
        assert!(unseal(&k, "https://other.amocrm.ru", &sealed).is_err());
        assert!(unseal(&k, "https://shop.amocrm.ru", &sealed[..10]).is_err());
    }

    #[test]
    fn jwt_expiry_is_read_from_the_payload() {
        let payload = base64url_encode(br#"{"aud":"x","exp":1893456000}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        assert_eq!(jwt_expiry(&token), Utc.timestamp_opt(1_893_456_000, 0).single());
        assert_eq!(jwt_expiry("not a jwt"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry(&format!("a.{}.c", base64url_encode(b"[1,2]"))), None);
    }
}
