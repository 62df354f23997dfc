//! Standard base64 (RFC 4648, `+/`, `=` padding), as in `data:` URLs, plus a serde adapter that
//! writes bytes as one base64 string instead of a JSON array of numbers.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The number of bytes `text` decodes to (an upper bound when `text` is malformed), without
/// decoding it: size limits are checked before any memory is spent.
pub fn decoded_len(text: &str) -> usize {
    let digits = text.bytes().filter(|b| !b.is_ascii_whitespace() && *b != b'=').count();
    digits * 3 / 4
}

/// Decode standard base64. Whitespace is skipped (MIME-style line breaks); padding is optional;
/// the URL-safe alphabet (`-_`) is accepted too.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(decoded_len(text));
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = false;
    for (i, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                padding = true;
                continue;
            }
            c if c.is_ascii_whitespace() => continue,
            _ => return Err(format!("invalid base64 character at offset {i}")),
        };
        if padding {
            return Err(format!("base64 data continues after padding at offset {i}"));
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("truncated base64 data".into());
    }
    Ok(out)
}

/// `#[serde(with = "crate::wire::base64::serde_bytes")]` on a `Vec<u8>`.
pub mod serde_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length_and_byte() {
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for n in 0..40 {
            let enc = encode(&bytes[..n]);
            assert_eq!(enc.len() % 4, 0);
            assert_eq!(decode(&enc).unwrap(), &bytes[..n], "length {n}");
            assert_eq!(decoded_len(&enc), n);
        }
        assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn known_vectors_and_tolerated_forms() {
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fooba"), "Zm9vYmE=");
        assert_eq!(encode(b"foob"), "Zm9vYg==");
        assert_eq!(decode("Zm9vYg").unwrap(), b"foob", "padding is optional");
        assert_eq!(decode("Zm9v\r\nYmFy").unwrap(), b"foobar", "line breaks are skipped");
        assert_eq!(decode("-_8").unwrap(), decode("+/8").unwrap(), "URL-safe alphabet");
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode("Zm9v!").is_err());
        assert!(decode("Zm9vY").is_err(), "a lone 6-bit digit is not a byte");
        assert!(decode("Zg==Zg==").is_err(), "data after padding");
    }
}
