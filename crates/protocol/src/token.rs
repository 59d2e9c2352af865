//! Join tokens: signed, expiring, room-scoped claims of a site and its role.
//!
//! Wire form: `dc1.<claims>.<mac>`, where `<claims>` is the base64url (no padding) of the
//! claims' JSON and `<mac>` the base64url of HMAC-SHA256(key, "dc1." + `<claims>`). The
//! server both issues and verifies, so a shared secret key is enough; the key file holds 32
//! random bytes, hex-encoded.
//!
//! [`DEV_KEY`] is public on purpose: `diemcau-server --dev` accepts tokens minted with it so
//! that roles can be tried on a laptop. A production server never accepts it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{Role, SiteId};

const PREFIX: &str = "dc1.";

/// The publicly known development key (never valid on a production server).
pub const DEV_KEY: &[u8; 32] = b"diem-cau-dev-key-NOT-A-SECRET!!!";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub site: SiteId,
    pub role: Role,
    /// The room the token admits to; `"*"` admits to any room.
    pub room: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not in the dc1.<claims>.<mac> form")]
    Malformed,
    #[error("token signature does not match (forged, or signed with another key)")]
    BadSignature,
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("token is for room {token_room:?}, not {room:?}")]
    WrongRoom { token_room: String, room: String },
    #[error("token is for site {token_site:?}, not {site:?}")]
    WrongSite { token_site: String, site: String },
}

/// A signing key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn new(bytes: &[u8]) -> Self {
        Key(bytes.to_vec())
    }

    pub fn dev() -> Self {
        Key(DEV_KEY.to_vec())
    }

    /// Parses a key file's text: 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes = (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Key(bytes))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; new_from_slice cannot fail for it.
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(data);
        m
    }

    /// Signs claims into a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let signed = format!("{PREFIX}{body}");
        let tag = URL_SAFE_NO_PAD.encode(self.mac(signed.as_bytes()).finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    /// Checks the signature and expiry of a token (at `now`, Unix seconds) and returns its
    /// claims. Room and site are checked by [`Claims::admits`].
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (signed, tag) = token.trim().rsplit_once('.').ok_or(TokenError::Malformed)?;
        let body = signed.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(signed.as_bytes())
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if now >= claims.exp {
            return Err(TokenError::Expired(now - claims.exp));
        }
        Ok(claims)
    }
}

impl Claims {
    /// Whether these claims admit `site` to `room`.
    pub fn admits(&self, site: &str, room: &str) -> Result<(), TokenError> {
        if self.site != site {
            return Err(TokenError::WrongSite {
                token_site: self.site.clone(),
                site: site.into(),
            });
        }
        if self.room != "*" && self.room != room {
            return Err(TokenError::WrongRoom {
                token_room: self.room.clone(),
                room: room.into(),
            });
        }
        Ok(())
    }
}

/// Reads the claims of a token without checking it (for showing a role in a UI).
pub fn peek(token: &str) -> Option<Claims> {
    let (signed, _) = token.trim().rsplit_once('.')?;
    let body = signed.strip_prefix(PREFIX)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

/// Parses a duration such as `8h`, `30m`, `45s`, `2d` or plain seconds.
pub fn parse_ttl(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'd' => (&s[..s.len() - 1], 86_400),
        'h' => (&s[..s.len() - 1], 3_600),
        'm' => (&s[..s.len() - 1], 60),
        's' => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            site: "nghe-an".into(),
            role: Role::Chair,
            room: "hop-tinh".into(),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn signed_token_verifies_and_admits() {
        let k = Key::from_hex(&"ab".repeat(32)).unwrap();
        let t = k.sign(&claims(1000));
        assert!(t.starts_with("dc1."));
        let c = k.verify(&t, 999).unwrap();
        assert_eq!(c, claims(1000));
        assert!(c.admits("nghe-an", "hop-tinh").is_ok());
        assert_eq!(peek(&t), Some(claims(1000)));
    }

    #[test]
    fn every_kind_of_bad_token_is_told_apart() {
        let k = Key::new(b"server key");
        let t = k.sign(&claims(1000));
        assert_eq!(k.verify(&t, 1000), Err(TokenError::Expired(0)));
        assert_eq!(
            Key::dev().verify(&t, 1),
            Err(TokenError::BadSignature),
            "another key"
        );
        // Forged claims with the old signature.
        let (_, tag) = t.rsplit_once('.').unwrap();
        let mut forged = claims(1000);
        forged.role = Role::Chair;
        forged.site = "tp-vinh".into();
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            k.verify(&format!("dc1.{body}.{tag}"), 1),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "dc1.", "abc", "dc1.x.y", "dc2.eyJ9.AAAA"] {
            assert!(k.verify(junk, 1).is_err(), "{junk:?}");
        }
        let c = k.verify(&t, 1).unwrap();
        assert!(matches!(
            c.admits("nghe-an", "other"),
            Err(TokenError::WrongRoom { .. })
        ));
        assert!(matches!(
            c.admits("tp-vinh", "hop-tinh"),
            Err(TokenError::WrongSite { .. })
        ));
        let mut any = claims(1000);
        any.room = "*".into();
        assert!(any.admits("nghe-an", "whatever").is_ok());
    }

    #[test]
    fn key_hex_round_trip_and_ttl() {
        let k = Key::from_hex(&"0f".repeat(32)).unwrap();
        assert_eq!(k.to_hex(), "0f".repeat(32));
        assert!(Key::from_hex("zz").is_none());
        assert_eq!(parse_ttl("8h"), Some(28_800));
        assert_eq!(parse_ttl("30m"), Some(1_800));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("2d"), Some(172_800));
        assert_eq!(parse_ttl("h"), None);
    }
}
