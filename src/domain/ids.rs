//! Identifiers. Request, event and order ids are at most [`ID_LEN_MAX`] bytes and
//! are stored inline ([`Id`] is `Copy`), so a command carries no heap allocation
//! from ingress through the queue, the journal and the state machine.

use std::fmt;

/// Longest request_id, event_id, order_id or reason accepted at the edge, in bytes.
pub const ID_LEN_MAX: usize = 64;

/// An account number: strictly positive.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct AccountId(pub i64);

impl AccountId {
    pub fn new(value: i64) -> Option<AccountId> {
        (value > 0).then_some(AccountId(value))
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a text is not an [`Id`]. The messages complete "`<field>` ...".
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {ID_LEN_MAX} bytes")]
    TooLong,
    /// Ids end up in PostgreSQL `text`, Kafka headers and log lines.
    #[error("must not contain control characters (U+0000-U+001F, U+007F)")]
    ControlCharacter,
}

/// U+0000-U+001F and U+007F. In UTF-8 these are single bytes that never occur
/// inside a multi-byte sequence, so a byte scan is exact.
fn has_control_character(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b < 0x20 || b == 0x7f)
}

/// An opaque UTF-8 identifier of 1..=64 bytes without control characters, stored inline. Bytes past `len`
/// are always zero, so the derived `Hash`/`Ord` are correct, and equality
/// compares only the 8-byte words that hold the id (ids are mostly short:
/// the state compares one on every lookup of a key or a reservation).
#[derive(Clone, Copy, Eq, PartialOrd, Ord)]
pub struct Id {
    len: u8,
    bytes: [u8; ID_LEN_MAX],
}

impl PartialEq for Id {
    #[inline]
    fn eq(&self, other: &Id) -> bool {
        let words = usize::from(self.len).div_ceil(8);
        self.len == other.len
            && self
                .bytes
                .chunks_exact(8)
                .zip(other.bytes.chunks_exact(8))
                .take(words)
                .all(|(a, b)| word(a) == word(b))
    }
}

/// As derived: consistent with `eq`, which decides what the whole arrays would.
impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.len.hash(state);
        self.bytes.hash(state);
    }
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_ne_bytes(bytes.try_into().expect("chunks of 8"))
}

impl Default for Id {
    /// The empty id (only valid where the field is optional).
    fn default() -> Id {
        Id::EMPTY
    }
}

impl Id {
    /// The empty id (only valid where the field is optional).
    pub const EMPTY: Id = Id {
        len: 0,
        bytes: [0; ID_LEN_MAX],
    };

    /// An id from a compile-time text known to fit (event reasons).
    pub fn literal(value: &'static str) -> Id {
        debug_assert!(value.len() <= ID_LEN_MAX);
        Self::from_bytes_allow_empty(value.as_bytes()).unwrap_or_default()
    }

    pub fn new(value: &str) -> Result<Id, IdError> {
        Self::from_bytes_allow_empty(value.as_bytes()).and_then(|id| {
            if id.len == 0 {
                Err(IdError::Empty)
            } else {
                Ok(id)
            }
        })
    }

    /// Like [`Id::new`] but accepts the empty string (used for optional text such
    /// as a status-change reason).
    pub fn new_allow_empty(value: &str) -> Result<Id, IdError> {
        Self::from_bytes_allow_empty(value.as_bytes())
    }

    /// Decodes bytes that were produced by [`Id::as_str`]; `None` if they are not
    /// valid UTF-8, too long or hold a control character (a corrupt journal record).
    pub fn from_utf8(bytes: &[u8]) -> Option<Id> {
        std::str::from_utf8(bytes).ok()?;
        Self::from_bytes_allow_empty(bytes).ok()
    }

    fn from_bytes_allow_empty(bytes: &[u8]) -> Result<Id, IdError> {
        if bytes.len() > ID_LEN_MAX {
            return Err(IdError::TooLong);
        }
        if has_control_character(bytes) {
            return Err(IdError::ControlCharacter);
        }
        let mut id = Id {
            len: bytes.len() as u8,
            bytes: [0; ID_LEN_MAX],
        };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(id)
    }

    pub fn as_str(&self) -> &str {
        // Constructed only from &str or validated UTF-8.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As its bytes (the state's own serialization, design 7's raft snapshots);
/// read back with the checks of [`Id::from_utf8`].
impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_str().as_bytes())
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Id, D::Error> {
        let bytes = deserializer.deserialize_bytes(crate::domain::BytesVisitor)?;
        Id::from_utf8(&bytes).ok_or_else(|| {
            serde::de::Error::custom("not an id: too long, not UTF-8 or a control character")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_limits() {
        assert_eq!(Id::new(""), Err(IdError::Empty));
        assert_eq!(Id::new(&"x".repeat(65)), Err(IdError::TooLong));
        let id = Id::new(&"é".repeat(32)).unwrap();
        assert_eq!(id.as_str(), "é".repeat(32));
        assert_eq!(Id::new("a").unwrap(), Id::new("a").unwrap());
        assert_ne!(Id::new("a").unwrap(), Id::new("ab").unwrap());
        // Equal up to the last word, or only in a later one.
        let long = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(Id::new(long).unwrap(), Id::new(long).unwrap());
        let other = long.replace('f', "g");
        assert_ne!(Id::new(long).unwrap(), Id::new(&other).unwrap());
        assert_ne!(Id::new("abcdefgh1").unwrap(), Id::new("abcdefgh2").unwrap());
        assert!(Id::from_utf8(&[0xff]).is_none());
    }

    #[test]
    fn control_characters_are_refused_everywhere() {
        for bad in ["a\u{0}b", "\t", "line\n", "\u{1f}", "del\u{7f}", "\r"] {
            assert_eq!(Id::new(bad), Err(IdError::ControlCharacter), "{bad:?}");
            assert_eq!(Id::new_allow_empty(bad), Err(IdError::ControlCharacter));
            assert!(Id::from_utf8(bad.as_bytes()).is_none());
        }
        // Space, non-ASCII letters and C1 code points (U+0080..) are not in the rule.
        for good in ["a b", "ordre-é", "\u{80}", "~", "\u{20}"] {
            assert!(Id::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn account_id_positive() {
        assert!(AccountId::new(0).is_none());
        assert!(AccountId::new(-1).is_none());
        assert_eq!(AccountId::new(7), Some(AccountId(7)));
    }
}
