//! Member capabilities: any serde value, stored as msgpack exactly as Python tooz
//! stores it (maps with named keys, `bin` for bytes, `nil` for "no capabilities").

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, ToozError};

/// The largest partitioner weight honoured (a member claiming more gets this much).
pub const MAX_WEIGHT: u32 = 65_535;

/// The deepest msgpack nesting decoded (arrays/maps inside each other), the same as
/// `serde_json`'s recursion limit for [`Capabilities::from_json_str`].
///
/// Bytes another client wrote can nest arbitrarily deep in a few hundred bytes; the
/// decoders recurse per level, so without this bound such a member would overflow the
/// stack (an abort, not an error) of every client reading it.
pub const MAX_DEPTH: usize = 128;

/// Decodes one msgpack value from the front of `bytes`, nested at most
/// [`MAX_DEPTH`] deep, never reserving more memory than the input could hold.
/// Drivers use it for every msgpack record another client wrote.
///
/// # Errors
/// rmpv's decode error for malformed, truncated or too deeply nested input.
pub fn read_msgpack(bytes: &mut &[u8]) -> std::result::Result<rmpv::Value, rmpv::decode::Error> {
    // rmpv spends two units of depth per container level.
    rmpv::decode::read_value_with_max_depth(bytes, 2 * MAX_DEPTH + 2)
}

/// The capabilities of a member, as the msgpack bytes stored in the backend.
///
/// ```
/// use tooz_core::Capabilities;
/// use std::collections::BTreeMap;
///
/// let caps = Capabilities::encode(&BTreeMap::from([("weight", 5)])).unwrap();
/// assert_eq!(caps.as_msgpack(), b"\x81\xa6weight\x05");
/// assert_eq!(caps.weight(), 5);
/// let back: BTreeMap<String, u32> = caps.decode().unwrap();
/// assert_eq!(back["weight"], 5);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Capabilities(Vec<u8>);

impl Capabilities {
    /// No capabilities (msgpack `nil`, Python `None`).
    pub fn none() -> Self {
        Capabilities(vec![0xc0])
    }

    /// Encodes a value as Python tooz does (structs become maps with named keys).
    ///
    /// # Errors
    /// [`ToozError::Serialization`] when the value cannot be encoded.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        rmp_serde::to_vec_named(value)
            .map(Capabilities)
            .map_err(|e| ToozError::serialization("cannot encode capabilities", e))
    }

    /// Wraps msgpack bytes read from a backend. Empty input means `nil`.
    pub fn from_msgpack(bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Capabilities::none()
        } else {
            Capabilities(bytes)
        }
    }

    /// Parses JSON text into capabilities (for command lines and config files).
    ///
    /// # Errors
    /// [`ToozError::Serialization`] when the text is not JSON.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ToozError::serialization("capabilities are not valid JSON", e))?;
        Capabilities::encode(&v)
    }

    /// The stored msgpack bytes.
    pub fn as_msgpack(&self) -> &[u8] {
        &self.0
    }

    /// Whether these are "no capabilities" (`nil`).
    pub fn is_none(&self) -> bool {
        self.0 == [0xc0]
    }

    /// Decodes into any deserializable type.
    ///
    /// # Errors
    /// [`ToozError::Serialization`] when the bytes do not match `T` or nest deeper
    /// than [`MAX_DEPTH`].
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        let mut de = rmp_serde::Deserializer::from_read_ref(&self.0);
        de.set_max_depth(MAX_DEPTH);
        T::deserialize(&mut de)
            .map_err(|e| ToozError::serialization("cannot decode capabilities", e))
    }

    /// Decodes into a dynamic msgpack value (keeps extension types such as
    /// Python datetimes as `Ext`).
    ///
    /// # Errors
    /// [`ToozError::Serialization`] when the bytes are not msgpack or nest deeper
    /// than [`MAX_DEPTH`].
    pub fn to_value(&self) -> Result<rmpv::Value> {
        read_msgpack(&mut &self.0[..])
            .map_err(|e| ToozError::serialization("capabilities are not msgpack", e))
    }

    /// Converts to JSON for display: byte strings become UTF-8 text when they are
    /// valid UTF-8 (else arrays of numbers), extension values become
    /// `{"ext": type, "data": [...]}`.
    ///
    /// # Errors
    /// [`ToozError::Serialization`] when the bytes are not msgpack.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        Ok(value_to_json(&self.to_value()?))
    }

    /// The partitioner weight: the integer under key `weight` of a map, else 1,
    /// capped at [`MAX_WEIGHT`] so one member cannot make every partitioner of the
    /// group build billions of ring points.
    pub fn weight(&self) -> u32 {
        self.raw_weight().min(MAX_WEIGHT)
    }

    fn raw_weight(&self) -> u32 {
        let Ok(rmpv::Value::Map(entries)) = self.to_value() else {
            return 1;
        };
        for (k, v) in entries {
            let key_is_weight = match &k {
                rmpv::Value::String(s) => s.as_bytes() == b"weight",
                rmpv::Value::Binary(b) => b == b"weight",
                _ => false,
            };
            if key_is_weight {
                return v
                    .as_u64()
                    .and_then(|w| u32::try_from(w).ok())
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u32))
                    .unwrap_or(1);
            }
        }
        1
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities::none()
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_json() {
            Ok(v) => write!(f, "Capabilities({v})"),
            Err(_) => write!(f, "Capabilities({:02x?})", self.0),
        }
    }
}

fn value_to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as V;
    use serde_json::Value as J;
    match v {
        V::Nil => J::Null,
        V::Boolean(b) => J::Bool(*b),
        V::Integer(i) => {
            if let Some(u) = i.as_u64() {
                J::from(u)
            } else {
                J::from(i.as_i64().unwrap_or_default())
            }
        }
        V::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        V::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        V::String(s) => match s.as_str() {
            Some(t) => J::String(t.to_string()),
            None => J::Array(s.as_bytes().iter().map(|b| J::from(*b)).collect()),
        },
        V::Binary(b) => match std::str::from_utf8(b) {
            Ok(t) => J::String(t.to_string()),
            Err(_) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        },
        V::Array(a) => J::Array(a.iter().map(value_to_json).collect()),
        V::Map(m) => {
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                let key = match value_to_json(k) {
                    J::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(key, value_to_json(val));
            }
            J::Object(out)
        }
        V::Ext(t, data) => serde_json::json!({"ext": t, "data": data}),
    }
}

/// What `get_member_info` returns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MemberInfo {
    /// The member's capabilities.
    pub capabilities: Capabilities,
    /// When the member joined, where the backend records it.
    pub created_at: Option<SystemTime>,
    /// When the member's record last changed (join, capability update, heartbeat).
    pub updated_at: Option<SystemTime>,
}

impl MemberInfo {
    /// Builds a member info record.
    pub fn new(
        capabilities: Capabilities,
        created_at: Option<SystemTime>,
        updated_at: Option<SystemTime>,
    ) -> Self {
        MemberInfo {
            capabilities,
            created_at,
            updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn python_compatible_bytes() {
        let a = Capabilities::encode(&BTreeMap::from([("a", 1)])).unwrap();
        assert_eq!(a.as_msgpack(), [0x81, 0xa1, b'a', 0x01]);
        assert_eq!(Capabilities::encode(&()).unwrap().as_msgpack(), [0xc0]);
        assert!(Capabilities::encode(&Option::<u8>::None).unwrap().is_none());
        let b = Capabilities::encode(serde_bytes::Bytes::new(b"")).unwrap();
        assert_eq!(b.as_msgpack(), [0xc4, 0x00]);
        #[derive(Serialize)]
        struct S {
            weight: u8,
        }
        assert_eq!(
            Capabilities::encode(&S { weight: 5 }).unwrap().as_msgpack(),
            b"\x81\xa6weight\x05"
        );
    }

    #[test]
    fn json_round_trip_and_weight() {
        let c =
            Capabilities::from_json_str(r#"{"host":"10.0.0.1","port":8080,"weight":3}"#).unwrap();
        assert_eq!(c.weight(), 3);
        assert_eq!(
            c.to_json().unwrap(),
            serde_json::json!({"host":"10.0.0.1","port":8080,"weight":3})
        );
        assert_eq!(Capabilities::none().weight(), 1);
        let huge = Capabilities::from_json_str(r#"{"weight":4000000000}"#).unwrap();
        assert_eq!(huge.weight(), MAX_WEIGHT);
        let inf = Capabilities::encode(&BTreeMap::from([("weight", f64::INFINITY)])).unwrap();
        assert_eq!(inf.weight(), MAX_WEIGHT);
        assert!(Capabilities::from_json_str("{").is_err());
    }
}
