//! Currencies and symbols, stored inline (`Copy`, 13 bytes).

use std::fmt;

/// Longest symbol, in bytes.
pub const SYMBOL_LEN_MAX: usize = 12;

/// A cash currency (3 upper-case ASCII letters) or a security symbol
/// (1-12 of `A-Z 0-9 . -`). Which one it is follows from where it is used.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asset {
    len: u8,
    bytes: [u8; SYMBOL_LEN_MAX],
}

/// A currency is an [`Asset`] that passed [`Asset::currency`].
pub type Currency = Asset;
/// A symbol is an [`Asset`] that passed [`Asset::symbol`].
pub type Symbol = Asset;

impl Asset {
    /// A currency code: exactly 3 upper-case ASCII letters.
    pub fn currency(value: &str) -> Option<Currency> {
        let b = value.as_bytes();
        (b.len() == 3 && b.iter().all(u8::is_ascii_uppercase)).then(|| Self::raw(b))
    }

    /// A symbol: 1-12 of `A-Z 0-9 . -`.
    pub fn symbol(value: &str) -> Option<Symbol> {
        let b = value.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= SYMBOL_LEN_MAX
            && b.iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-');
        ok.then(|| Self::raw(b))
    }

    /// Either form: used when decoding the journal, where the kind is known from context.
    pub fn from_bytes(b: &[u8]) -> Option<Asset> {
        let s = std::str::from_utf8(b).ok()?;
        Self::symbol(s)
    }

    fn raw(b: &[u8]) -> Asset {
        debug_assert!(!b.is_empty() && b.len() <= SYMBOL_LEN_MAX);
        let mut a = Asset {
            len: b.len() as u8,
            bytes: [0; SYMBOL_LEN_MAX],
        };
        a.bytes[..b.len()].copy_from_slice(b);
        a
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// A number in the texts' byte order: bytes past `len` are zero and no
    /// currency or symbol byte is, so comparing these compares the texts
    /// (one integer comparison instead of a `memcmp`).
    pub fn order_key(&self) -> u128 {
        let mut be = [0u8; 16];
        be[..SYMBOL_LEN_MAX].copy_from_slice(&self.bytes);
        u128::from_be_bytes(be)
    }
}

impl fmt::Debug for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As its bytes (the state's own serialization); read back with the checks of
/// [`Asset::from_bytes`].
impl serde::Serialize for Asset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_bytes())
    }
}

impl<'de> serde::Deserialize<'de> for Asset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Asset, D::Error> {
        let bytes = deserializer.deserialize_bytes(crate::domain::BytesVisitor)?;
        Asset::from_bytes(&bytes)
            .ok_or_else(|| serde::de::Error::custom("not a currency or symbol"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_as_the_texts() {
        let texts = [
            "A",
            "AB",
            "ABC",
            "AB.C",
            "AB-",
            "Z",
            "ZZZZZZZZZZZZ",
            "0",
            "9A",
            "BRK.B",
        ];
        let mut by_key: Vec<Asset> = texts.iter().map(|t| Asset::symbol(t).unwrap()).collect();
        let mut by_text = by_key.clone();
        by_key.sort_by_key(Asset::order_key);
        by_text.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(by_key, by_text);
    }

    #[test]
    fn currency_rules() {
        assert!(Asset::currency("USD").is_some());
        for bad in ["usd", "US", "USDT", "U1D", "", "ÜSD"] {
            assert!(Asset::currency(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn symbol_rules() {
        for good in ["A", "BRK.B", "RDS-A", "ABCDEFGHIJKL", "7203"] {
            assert_eq!(Asset::symbol(good).unwrap().as_str(), good);
        }
        for bad in ["", "abc", "ABCDEFGHIJKLM", "A B", "A_B"] {
            assert!(Asset::symbol(bad).is_none(), "{bad}");
        }
    }
}
