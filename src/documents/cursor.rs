//! Query cursors (`next_cursor` / `start_after`): opaque to clients, and never a carrier of
//! data the caller may not read.
//!
//! A cursor is sealed with XChaCha20-Poly1305 under a server secret kept in the database (so
//! every node of a deployment opens every other node's cursors), with the query's scope (its
//! collection, its `where`, the caller) and its order as associated data: a client can
//! neither read one nor forge or alter one, and a cursor of one query, or of one caller, is
//! refused by another.
//!
//! What is sealed is one of two things:
//! - **a position**: the `order_by` values and id of the last document *returned* — data the
//!   caller was just shown;
//! - **an anchor**: when a page ends because the per-row rule budget ran out, the scan has to
//!   continue after the last document *examined*, which the caller may not be allowed to read.
//!   Its values are never put in the cursor; only its id and version, padded to a fixed width
//!   so even the cursor's length says nothing about them, plus a fallback position (the last
//!   document returned, or the fallback this query started from). On resume the server reads
//!   the anchor again: unchanged, the scan continues right after it; changed or gone, it
//!   continues from the fallback, re-examining rows rather than skipping any.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::query::{Cursor, Direction, Field, Order};

/// Wide enough for any document id (≤ 128 bytes) and two 64-bit integers, with separators.
const ANCHOR_WIDTH: usize = 176;
const NONCE_LEN: usize = 24;

/// Where a query resumes, as sealed in its cursor.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Right after this position.
    After(Cursor),
    /// Right after the document `id` if it is still the same write of it (`version`, and
    /// `created_micros` to tell a re-created document), else after `fallback` (from the
    /// start when `None`).
    Anchor {
        id: String,
        version: i64,
        created_micros: i64,
        fallback: Option<Cursor>,
    },
}

/// Seals and opens cursors with the deployment's cursor key.
pub struct CursorSeal {
    cipher: XChaCha20Poly1305,
}

impl CursorSeal {
    /// `secret`: at least 32 bytes of key material (the first 32 are used).
    pub fn new(secret: &[u8]) -> anyhow::Result<Self> {
        let key = secret
            .get(..32)
            .ok_or_else(|| anyhow::anyhow!("the cursor secret is shorter than 32 bytes"))?;
        Ok(CursorSeal {
            cipher: XChaCha20Poly1305::new_from_slice(key)
                .map_err(|_| anyhow::anyhow!("the cursor secret is not a valid key"))?,
        })
    }

    pub fn seal(&self, scope: &str, order: &[Order], resume: &Resume) -> String {
        let plain = match resume {
            Resume::After(c) => json!({"p": position_json(c)}),
            Resume::Anchor {
                id,
                version,
                created_micros,
                fallback,
            } => json!({
                "a": format!("{:<ANCHOR_WIDTH$}", format!("{id}|{version}|{created_micros}")),
                "f": fallback.as_ref().map(position_json),
            }),
        }
        .to_string();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated_data(scope, order);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 seals any message that fits in memory");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Seals arbitrary bytes under `scope` (other domains' cursors: storage listings).
    pub fn seal_bytes(&self, scope: &str, plain: &[u8]) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: scope.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 seals any message that fits in memory");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Opens what [`CursorSeal::seal_bytes`] sealed under the same `scope`; `None` for
    /// anything else.
    pub fn open_bytes(&self, raw: &str, scope: &str) -> Option<Vec<u8>> {
        if raw.len() > 64 * 1024 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: scope.as_bytes(),
                },
            )
            .ok()
    }

    pub fn open(&self, raw: &str, scope: &str, order: &[Order]) -> Result<Resume, ApiError> {
        let bad = || {
            ApiError::invalid_with(
                "start_after is not a cursor of this query",
                json!({"field": "start_after"}),
            )
        };
        if raw.len() > 64 * 1024 {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| bad())?;
        let aad = associated_data(scope, order);
        let plain = self
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        let value: Value = serde_json::from_slice(&plain).map_err(|_| bad())?;
        let fields = order.iter().filter(|o| o.field != Field::Id).count();
        if let Some(p) = value.get("p") {
            return position_from(p, fields).map(Resume::After).ok_or_else(bad);
        }
        let anchor = value.get("a").and_then(Value::as_str).ok_or_else(bad)?;
        let mut parts = anchor.trim_end().rsplitn(3, '|');
        let (created, version, id) = (
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
        );
        let fallback = match value.get("f") {
            None | Some(Value::Null) => None,
            Some(f) => Some(position_from(f, fields).ok_or_else(bad)?),
        };
        Ok(Resume::Anchor {
            id: id.to_string(),
            version: version.parse().map_err(|_| bad())?,
            created_micros: created.parse().map_err(|_| bad())?,
            fallback,
        })
    }
}

/// Binds a cursor to its scope and order: `scope|field:dir,…`.
fn associated_data(scope: &str, order: &[Order]) -> String {
    let order: Vec<String> = order
        .iter()
        .map(|o| {
            let dir = match o.direction {
                Direction::Asc => "asc",
                Direction::Desc => "desc",
            };
            format!("{}:{dir}", o.field.name())
        })
        .collect();
    format!("basalt-cursor-1|{scope}|{}", order.join(","))
}

/// `{"v": [[value] | [] per order field], "id": id}`; `[]` stands for a missing field.
fn position_json(c: &Cursor) -> Value {
    let values: Vec<Value> = c
        .values
        .iter()
        .map(|v| match v {
            Some(v) => json!([v]),
            None => json!([]),
        })
        .collect();
    json!({"v": values, "id": c.id})
}

fn position_from(v: &Value, fields: usize) -> Option<Cursor> {
    let id = v.get("id")?.as_str()?.to_string();
    let list = v.get("v")?.as_array()?;
    if list.len() != fields {
        return None;
    }
    let values = list
        .iter()
        .map(|entry| match entry.as_array().map(Vec::as_slice) {
            Some([]) => Some(None),
            Some([v]) => Some(Some(v.clone())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Cursor { values, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(fields: &[&str]) -> Vec<Order> {
        fields
            .iter()
            .map(|f| Order {
                field: Field::parse(f).unwrap(),
                direction: Direction::Asc,
            })
            .chain([Order {
                field: Field::Id,
                direction: Direction::Asc,
            }])
            .collect()
    }

    #[test]
    fn cursors_round_trip_and_show_nothing() {
        let seal = CursorSeal::new(&[7u8; 32]).unwrap();
        let o = order(&["secret"]);
        let at = Cursor {
            values: vec![Some(json!("hunter2"))],
            id: "doc-1".into(),
        };
        let token = seal.seal("c", &o, &Resume::After(at.clone()));
        assert!(
            !String::from_utf8_lossy(&URL_SAFE_NO_PAD.decode(&token).unwrap()).contains("hunter2")
        );
        assert_eq!(seal.open(&token, "c", &o).unwrap(), Resume::After(at));
        // Another collection, another order, another key, a flipped bit: refused.
        assert!(seal.open(&token, "d", &o).is_err());
        assert!(seal.open(&token, "c", &order(&["other"])).is_err());
        assert!(CursorSeal::new(&[8u8; 32])
            .unwrap()
            .open(&token, "c", &o)
            .is_err());
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(seal.open(&URL_SAFE_NO_PAD.encode(bytes), "c", &o).is_err());
    }

    #[test]
    fn anchors_have_one_length_whatever_the_anchor() {
        let seal = CursorSeal::new(&[7u8; 32]).unwrap();
        let o = order(&["n"]);
        let len = |id: &str, version: i64| {
            seal.seal(
                "c",
                &o,
                &Resume::Anchor {
                    id: id.into(),
                    version,
                    created_micros: version,
                    fallback: None,
                },
            )
            .len()
        };
        assert_eq!(len("a", 1), len(&"z".repeat(128), i64::MIN));
        let anchor = Resume::Anchor {
            id: "x".repeat(128),
            version: 42,
            created_micros: 1_700_000_000_000_000,
            fallback: Some(Cursor {
                values: vec![None],
                id: "y".into(),
            }),
        };
        let token = seal.seal("c", &o, &anchor);
        assert_eq!(seal.open(&token, "c", &o).unwrap(), anchor);
    }
}
