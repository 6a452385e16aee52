//! Realtime cursors: a change-log position, sealed. The position counts every write of every
//! collection, so shown in the clear — or even compared for equality — it would tell a
//! subscriber whether anything was written where it cannot read. A cursor is a randomised
//! authenticated encryption of the position: a fresh random salt, the position masked with a
//! key stream drawn from the salt (HMAC-SHA256), and a tag over both, so two cursors for the
//! same position differ, no two can be compared, and a forged or altered one is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SALT_BYTES: usize = 8;
const TAG_BYTES: usize = 12;

pub(crate) struct PositionSeal {
    tag_key: Vec<u8>,
    mask_key: Vec<u8>,
}

fn mac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

impl PositionSeal {
    pub(crate) fn new(secret: &[u8]) -> PositionSeal {
        PositionSeal {
            tag_key: mac(secret, b"realtime cursor tag").to_vec(),
            mask_key: mac(secret, b"realtime cursor mask").to_vec(),
        }
    }

    pub(crate) fn seal(&self, position: i64) -> String {
        let salt: [u8; SALT_BYTES] = rand::random();
        let mask = mac(&self.mask_key, &salt);
        let mut out = Vec::with_capacity(SALT_BYTES + 8 + TAG_BYTES);
        out.extend_from_slice(&salt);
        out.extend(
            position
                .to_le_bytes()
                .iter()
                .zip(mask.iter())
                .map(|(p, m)| p ^ m),
        );
        let tag = mac(&self.tag_key, &out);
        out.extend_from_slice(&tag[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The position of a cursor this server sealed; `None` for anything else.
    pub(crate) fn open(&self, cursor: &str) -> Option<i64> {
        if cursor.len() > 64 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        if raw.len() != SALT_BYTES + 8 + TAG_BYTES {
            return None;
        }
        let (body, tag) = raw.split_at(SALT_BYTES + 8);
        if &mac(&self.tag_key, body)[..TAG_BYTES] != tag {
            return None;
        }
        let (salt, masked) = body.split_at(SALT_BYTES);
        let mask = mac(&self.mask_key, salt);
        let mut plain = [0u8; 8];
        for (i, (c, m)) in masked.iter().zip(mask.iter()).enumerate() {
            plain[i] = c ^ m;
        }
        Some(i64::from_le_bytes(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let seal = PositionSeal::new(b"secret");
        let c = seal.seal(12345);
        assert_eq!(seal.open(&c), Some(12345));
        assert_ne!(
            seal.seal(12345),
            c,
            "randomised: equal positions do not compare"
        );
        assert_eq!(seal.open(&seal.seal(12345)), Some(12345));
        assert!(!c.contains("12345"));
        let mut bytes = URL_SAFE_NO_PAD.decode(&c).unwrap();
        bytes[15] ^= 1;
        assert_eq!(seal.open(&URL_SAFE_NO_PAD.encode(bytes)), None);
        assert_eq!(PositionSeal::new(b"other").open(&c), None);
        assert_eq!(seal.open("not a cursor"), None);
    }
}
