//! Join tokens (kubeadm-style): one copy-pasteable line holding an id, a secret, an expiry and
//! the cluster CA certificate's SHA-256; parsing that names what is wrong; verification against
//! the stored hash of the secret on the host that made it.
//!
//! Text form: `fnlet1.<id>.<secret>.<ca-sha256>.<expires>`
//!
//! - `fnlet1`: the format's name and version;
//! - `id`: 8 lowercase hex digits (4 random bytes), names the token in the CA host's store;
//! - `secret`: 32 lowercase hex digits (16 random bytes, 128 bits);
//! - `ca-sha256`: 64 lowercase hex digits, SHA-256 of the cluster CA certificate's DER bytes: the
//!   joining host pins the CA by it before sending anything;
//! - `expires`: Unix seconds, decimal; the token is refused from that second on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::Sha256Hash;

/// The text form's first part.
pub const PREFIX: &str = "fnlet1";

/// Random bytes a token is made from: 4 for the id, 16 for the secret.
pub const RANDOM_LEN: usize = 20;

/// A token's secret. Never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(String);

impl TokenSecret {
    /// The secret's text (32 hex digits).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

/// A join token, as the operator copies it to a new host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 8 lowercase hex digits.
    pub id: String,
    /// 32 lowercase hex digits.
    pub secret: TokenSecret,
    /// SHA-256 of the cluster CA certificate (DER).
    pub ca_sha256: Sha256Hash,
    /// Unix seconds from which the token is refused.
    pub expires_at: u64,
}

/// What the CA host keeps of a token: the secret only as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredToken {
    /// The token's id.
    pub id: String,
    /// SHA-256 of the secret's text.
    pub secret_sha256: Sha256Hash,
    /// Unix seconds from which the token is refused.
    pub expires_at: u64,
}

/// A token could not be read, or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It does not start with `fnlet1.`.
    #[error("a join token starts with \"fnlet1.\"; this one starts with {found:?}")]
    Prefix {
        /// Its first part (at most 16 characters).
        found: String,
    },
    /// It does not have five dot-separated parts.
    #[error(
        "a join token has 5 parts separated by dots (fnlet1.ID.SECRET.CA-SHA256.EXPIRY); this one has {found}"
    )]
    Parts {
        /// How many it has.
        found: usize,
    },
    /// One part is malformed.
    #[error("join token {part}: {reason}")]
    Part {
        /// `id`, `secret`, `CA sha256` or `expiry`.
        part: &'static str,
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// It has expired.
    #[error(
        "the join token expired at {expired_at} (Unix seconds; now is {now}); make a new one with `fnlet cluster token`"
    )]
    Expired {
        /// When it expired.
        expired_at: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// Its id is not the stored token's.
    #[error("join token {given:?} is not token {stored:?}")]
    WrongId {
        /// The id given.
        given: String,
        /// The stored token's id.
        stored: String,
    },
    /// Its secret is wrong.
    #[error("the join token's secret is wrong")]
    WrongSecret,
    /// The CA presented is not the one the token pins.
    #[error("the cluster CA certificate's sha256 is {found}, but the join token pins {expected}")]
    CaMismatch {
        /// The hash in the token.
        expected: Sha256Hash,
        /// The presented CA certificate's hash.
        found: Sha256Hash,
    },
}

fn hex_part(part: &'static str, text: &str, digits: usize) -> Result<(), TokenError> {
    if text.len() != digits {
        return Err(TokenError::Part {
            part,
            reason: format!("must be {digits} lowercase hex digits, not {}", text.len()),
        });
    }
    if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(TokenError::Part {
            part,
            reason: format!("must be {digits} lowercase hex digits (0-9, a-f)"),
        });
    }
    Ok(())
}

impl JoinToken {
    /// A token from `random` bytes (from the OS: the caller draws them), pinning the CA whose
    /// certificate hashes to `ca_sha256`, valid until `expires_at` (Unix seconds).
    pub fn new(random: [u8; RANDOM_LEN], ca_sha256: Sha256Hash, expires_at: u64) -> Self {
        JoinToken {
            id: hex::encode(&random[..4]),
            secret: TokenSecret(hex::encode(&random[4..])),
            ca_sha256,
            expires_at,
        }
    }

    /// What the CA host stores of it.
    pub fn stored(&self) -> StoredToken {
        StoredToken {
            id: self.id.clone(),
            secret_sha256: Sha256Hash::of(self.secret.0.as_bytes()),
            expires_at: self.expires_at,
        }
    }

    /// Whether it has expired at `now` (Unix seconds): checked by the joining host first, for
    /// a clear message.
    pub fn check_expiry(&self, now: u64) -> Result<(), TokenError> {
        expiry(self.expires_at, now)
    }

    /// Whether `ca_cert_der` is the CA the token pins (the joining host checks the peer's CA
    /// before it sends the secret).
    pub fn check_ca(&self, ca_cert_der: &[u8]) -> Result<(), TokenError> {
        let found = Sha256Hash::of(ca_cert_der);
        if found == self.ca_sha256 {
            Ok(())
        } else {
            Err(TokenError::CaMismatch {
                expected: self.ca_sha256,
                found,
            })
        }
    }
}

fn expiry(expires_at: u64, now: u64) -> Result<(), TokenError> {
    if now >= expires_at {
        Err(TokenError::Expired {
            expired_at: expires_at,
            now,
        })
    } else {
        Ok(())
    }
}

impl StoredToken {
    /// Checks a presented token id and secret at `now` (Unix seconds). The secret is compared
    /// by its SHA-256 in constant time.
    pub fn verify(&self, id: &str, secret: &str, now: u64) -> Result<(), TokenError> {
        if id != self.id {
            return Err(TokenError::WrongId {
                given: id.chars().take(16).collect(),
                stored: self.id.clone(),
            });
        }
        let given = Sha256Hash::of(secret.as_bytes());
        if !bool::from(given.0.ct_eq(&self.secret_sha256.0)) {
            return Err(TokenError::WrongSecret);
        }
        expiry(self.expires_at, now)
    }
}

/// The one-line text form.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}.{}",
            self.id, self.secret.0, self.ca_sha256, self.expires_at
        )
    }
}

/// Reads the text form; surrounding whitespace (a pasted newline) is ignored.
impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        if parts[0] != PREFIX {
            return Err(TokenError::Prefix {
                found: parts[0].chars().take(16).collect(),
            });
        }
        let [_, id, secret, ca, expires] = parts[..] else {
            return Err(TokenError::Parts { found: parts.len() });
        };
        hex_part("id", id, 8)?;
        hex_part("secret", secret, 32)?;
        hex_part("CA sha256", ca, 64)?;
        let ca_sha256 = ca.parse().map_err(|e: crate::BadSha256| TokenError::Part {
            part: "CA sha256",
            reason: e.to_string(),
        })?;
        if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TokenError::Part {
                part: "expiry",
                reason: format!("must be Unix seconds (digits), not {expires:?}"),
            });
        }
        let expires_at = expires.parse().map_err(|_| TokenError::Part {
            part: "expiry",
            reason: format!("{expires} is too large"),
        })?;
        Ok(JoinToken {
            id: id.to_owned(),
            secret: TokenSecret(secret.to_owned()),
            ca_sha256,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn token() -> JoinToken {
        let mut random = [0u8; RANDOM_LEN];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(17);
        }
        JoinToken::new(random, Sha256Hash::of(b"ca certificate der"), 1_767_312_000)
    }

    #[test]
    fn the_text_form_round_trips() {
        let t = token();
        let text = t.to_string();
        assert_eq!(
            text,
            format!(
                "fnlet1.00112233.445566778899aabbccddeeff10213243.{}.1767312000",
                Sha256Hash::of(b"ca certificate der")
            )
        );
        assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        assert_eq!(format!("  {text}\n").parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(t.secret.expose()), "{t:?}");
    }

    #[test]
    fn parse_errors_name_the_part() {
        let good = token().to_string();
        let parts: Vec<&str> = good.split('.').collect();
        let with = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            p.join(".")
        };
        let cases = [
            ("kubeadm.abc".to_owned(), "starts with \"kubeadm\""),
            (String::new(), "starts with \"\""),
            (format!("{good}.x"), "has 6"),
            (parts[..4].join("."), "has 4"),
            (
                with(1, "0011223"),
                "id: must be 8 lowercase hex digits, not 7",
            ),
            (
                with(1, "0011223G"),
                "id: must be 8 lowercase hex digits (0-9, a-f)",
            ),
            (with(2, "zz"), "secret: must be 32"),
            (
                with(3, &parts[3].to_uppercase()),
                "CA sha256: must be 64 lowercase hex digits",
            ),
            (with(4, "soon"), "expiry: must be Unix seconds"),
            (with(4, ""), "expiry: must be Unix seconds"),
            (
                with(4, "99999999999999999999999"),
                "expiry: 99999999999999999999999 is too large",
            ),
        ];
        for (text, want) in cases {
            let e = text.parse::<JoinToken>().unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        // The secret never appears in an error.
        let e = with(2, "445566778899aabbccddeeff0011223")
            .parse::<JoinToken>()
            .unwrap_err();
        assert!(!e.to_string().contains("4455667788"), "{e}");
    }

    #[test]
    fn the_ca_host_verifies_id_secret_and_expiry() {
        let t = token();
        let stored = t.stored();
        assert_ne!(stored.secret_sha256.to_string(), t.secret.expose());
        stored
            .verify(&t.id, t.secret.expose(), 1_767_311_999)
            .unwrap();
        assert_eq!(
            stored.verify(&t.id, t.secret.expose(), 1_767_312_000),
            Err(TokenError::Expired {
                expired_at: 1_767_312_000,
                now: 1_767_312_000
            })
        );
        let mut wrong = t.secret.expose().to_owned();
        wrong.replace_range(31.., "0");
        assert_eq!(
            stored.verify(&t.id, &wrong, 0),
            Err(TokenError::WrongSecret)
        );
        assert!(matches!(
            stored.verify("ffffffff", t.secret.expose(), 0),
            Err(TokenError::WrongId { .. })
        ));
        // A wrong secret is refused before the expiry is looked at.
        assert_eq!(
            stored.verify(&t.id, &wrong, u64::MAX),
            Err(TokenError::WrongSecret)
        );
        let json = serde_json::to_string(&stored).unwrap();
        assert!(!json.contains(t.secret.expose()));
        assert_eq!(serde_json::from_str::<StoredToken>(&json).unwrap(), stored);
    }

    #[test]
    fn the_joining_host_pins_the_ca_and_checks_expiry() {
        let t = token();
        t.check_ca(b"ca certificate der").unwrap();
        let e = t.check_ca(b"another ca").unwrap_err();
        assert!(e.to_string().contains("pins"), "{e}");
        t.check_expiry(1_767_311_999).unwrap();
        let e = t.check_expiry(1_767_400_000).unwrap_err();
        assert!(e.to_string().contains("fnlet cluster token"), "{e}");
    }

    proptest! {
        #[test]
        fn any_token_round_trips(random in any::<[u8; RANDOM_LEN]>(), ca in any::<[u8; 32]>(), expires_at in any::<u64>()) {
            let t = JoinToken::new(random, Sha256Hash(ca), expires_at);
            prop_assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t.clone());
            prop_assert!(t.stored().verify(&t.id, t.secret.expose(), expires_at.saturating_sub(1)).is_ok() || expires_at == 0);
        }

        #[test]
        fn any_text_parses_or_says_why(text in ".{0,200}", prefixed in any::<bool>()) {
            let text = if prefixed { format!("fnlet1.{text}") } else { text };
            if let Err(e) = text.parse::<JoinToken>() {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
