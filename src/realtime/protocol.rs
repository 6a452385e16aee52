//! The wire protocol of `GET /v1/realtime` (API.md § Realtime, docs/realtime.md): JSON text
//! frames, one message each, with a `type`. Client messages are parsed strictly (an unknown
//! type or field is an error naming it); server messages are built here, the documents in
//! them already serialised once for every subscriber.

use serde::Deserialize;
use serde_json::{json, Value};

use super::window::Change;
use crate::error::ApiError;

/// Longest subscription id a client may choose (it is echoed in every message).
const MAX_SUB_ID: usize = 128;
/// Longest channel name.
const MAX_CHANNEL: usize = 128;
/// Longest broadcast event name.
const MAX_EVENT: usize = 128;
/// Largest presence state, in bytes of JSON: everyone who joins receives everyone's.
pub(crate) const MAX_PRESENCE_BYTES: usize = 1024;

#[derive(Debug)]
pub(crate) enum ClientMessage {
    Auth {
        token: String,
    },
    Subscribe(Subscribe),
    Unsubscribe {
        id: String,
    },
    Ping,
    Join {
        channel: String,
        presence: Value,
    },
    Leave {
        channel: String,
    },
    Broadcast {
        channel: String,
        event: String,
        payload: Value,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Subscribe {
    pub(crate) id: String,
    pub(crate) collection: String,
    #[serde(default)]
    pub(crate) doc: Option<String>,
    #[serde(default)]
    pub(crate) query: Option<Value>,
    #[serde(default)]
    pub(crate) resume: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unsubscribe {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Join {
    channel: String,
    #[serde(default)]
    presence: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Leave {
    channel: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast {
    channel: String,
    event: String,
    #[serde(default)]
    payload: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// A message that could not be understood: the error to answer, and the subscription id when
/// one could be read (so the client knows which request failed).
#[derive(Debug)]
pub(crate) struct Malformed {
    pub(crate) id: Option<String>,
    /// The channel the message was about, when it names a valid one.
    pub(crate) channel: Option<String>,
    pub(crate) error: ApiError,
}

fn invalid(id: Option<String>, message: String) -> Malformed {
    Malformed {
        id,
        channel: None,
        error: ApiError::invalid(message),
    }
}

fn fields<T: serde::de::DeserializeOwned>(
    kind: &str,
    value: Value,
    id: Option<String>,
) -> Result<T, Malformed> {
    serde_json::from_value(value).map_err(|e| invalid(id, format!("`{kind}` message: {e}")))
}

impl ClientMessage {
    pub(crate) fn parse(text: &str) -> Result<ClientMessage, Malformed> {
        let mut value: Value = serde_json::from_str(text)
            .map_err(|e| invalid(None, format!("not a JSON message: {e}")))?;
        let Some(object) = value.as_object_mut() else {
            return Err(invalid(None, "a message is a JSON object".into()));
        };
        let kind = match object.remove("type") {
            Some(Value::String(kind)) => kind,
            _ => return Err(invalid(None, "a message needs a string `type`".into())),
        };
        // The id, when there is a usable one, goes with any error about this message.
        let id = object
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| valid_sub_id(id))
            .map(str::to_string);
        let channel = object
            .get("channel")
            .and_then(Value::as_str)
            .filter(|c| check_channel(c).is_ok())
            .map(str::to_string);
        let message = Self::parse_kind(&kind, value, id).map_err(|mut bad| {
            bad.channel = bad.channel.or(channel);
            bad
        })?;
        Ok(message)
    }

    fn parse_kind(
        kind: &str,
        value: Value,
        id: Option<String>,
    ) -> Result<ClientMessage, Malformed> {
        let message = match kind {
            "auth" => ClientMessage::Auth {
                token: fields::<Auth>("auth", value, None)?.token,
            },
            "subscribe" => {
                let sub: Subscribe = fields("subscribe", value, id.clone())?;
                if !valid_sub_id(&sub.id) {
                    return Err(invalid(
                        None,
                        format!("`id`: 1 to {MAX_SUB_ID} printable characters"),
                    ));
                }
                if sub.doc.is_some() == sub.query.is_some() {
                    return Err(invalid(
                        id,
                        "`subscribe` needs either `doc` (a document id) or `query`".into(),
                    ));
                }
                ClientMessage::Subscribe(sub)
            }
            "unsubscribe" => ClientMessage::Unsubscribe {
                id: fields::<Unsubscribe>("unsubscribe", value, id)?.id,
            },
            "ping" => {
                fields::<Empty>("ping", value, None)?;
                ClientMessage::Ping
            }
            "join" => {
                let j: Join = fields("join", value, None)?;
                check_channel(&j.channel)?;
                let presence = j.presence.unwrap_or_else(|| json!({}));
                if !presence.is_object() {
                    return Err(invalid(None, "`presence`: a JSON object".into()));
                }
                if presence.to_string().len() > MAX_PRESENCE_BYTES {
                    return Err(invalid(
                        None,
                        format!("`presence`: at most {MAX_PRESENCE_BYTES} bytes of JSON"),
                    ));
                }
                ClientMessage::Join {
                    channel: j.channel,
                    presence,
                }
            }
            "leave" => {
                let l: Leave = fields("leave", value, None)?;
                check_channel(&l.channel)?;
                ClientMessage::Leave { channel: l.channel }
            }
            "broadcast" => {
                let b: Broadcast = fields("broadcast", value, None)?;
                check_channel(&b.channel)?;
                if b.event.is_empty()
                    || b.event.len() > MAX_EVENT
                    || b.event.chars().any(char::is_control)
                {
                    return Err(invalid(
                        None,
                        format!("`event`: 1 to {MAX_EVENT} characters, no control characters"),
                    ));
                }
                ClientMessage::Broadcast {
                    channel: b.channel,
                    event: b.event,
                    payload: b.payload.unwrap_or(Value::Null),
                }
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(invalid(
                    None,
                    format!(
                        "unknown message type `{shown}`: auth, subscribe, unsubscribe, ping, join, leave or broadcast"
                    ),
                ));
            }
        };
        Ok(message)
    }
}

fn valid_sub_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_SUB_ID && !id.chars().any(char::is_control)
}

/// Channel names: 1–128 of `A-Z a-z 0-9 _ - . : /`.
fn check_channel(channel: &str) -> Result<(), Malformed> {
    let ok = !channel.is_empty()
        && channel.len() <= MAX_CHANNEL
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            None,
            format!("`channel`: 1 to {MAX_CHANNEL} of A-Z a-z 0-9 _ - . : /"),
        ))
    }
}

// ---------------------------------------------------------------------- server messages

fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

pub(crate) fn snapshot(id: &str, documents_json: &str, cursor: &str, reset: bool) -> String {
    format!(
        r#"{{"type":"snapshot","id":{},"documents":{},"cursor":{}{}}}"#,
        quoted(id),
        documents_json,
        quoted(cursor),
        if reset { r#","reset":true"# } else { "" }
    )
}

/// Appends `s` as a JSON string (what `quoted` makes, without its allocations).
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// A `changes` message, built in one allocation of the right size: one is made per
/// subscriber per change, the hottest path of realtime.
pub(crate) fn changes(id: &str, changes: &[Change], cursor: &str) -> String {
    let size =
        64 + id.len() + cursor.len() + changes.iter().map(|c| c.json().len() + 32).sum::<usize>();
    let mut out = String::with_capacity(size);
    out.push_str(r#"{"type":"changes","id":"#);
    push_quoted(&mut out, id);
    out.push_str(r#","changes":["#);
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"type":""#);
        out.push_str(c.kind());
        out.push_str(r#"","document":"#);
        out.push_str(c.json());
        out.push('}');
    }
    out.push_str(r#"],"cursor":"#);
    push_quoted(&mut out, cursor);
    out.push('}');
    out
}

pub(crate) fn error(id: Option<&str>, channel: Option<&str>, err: &ApiError) -> String {
    if let ApiError::Internal(inner) = err {
        tracing::error!(error = ?inner, "internal error on a realtime connection");
    }
    let mut msg = json!({
        "type": "error",
        "error": {"code": err.code(), "message": err.to_string()},
    });
    match err {
        ApiError::InvalidArgument {
            details: Some(details),
            ..
        }
        | ApiError::CursorExpired { details, .. } => msg["error"]["details"] = details.clone(),
        _ => {}
    }
    if let Some(id) = id {
        msg["id"] = json!(id);
    }
    if let Some(channel) = channel {
        msg["channel"] = json!(channel);
    }
    msg.to_string()
}

pub(crate) fn pong() -> String {
    r#"{"type":"pong"}"#.to_string()
}

/// `expires_at` in Unix seconds, as `session.expires_at` of the HTTP API.
pub(crate) fn authenticated(role: &str, uid: Option<&str>, expires_at: Option<i64>) -> String {
    json!({
        "type": "authenticated",
        "role": role,
        "uid": uid,
        "expires_at": expires_at,
    })
    .to_string()
}

pub(crate) fn unsubscribed(id: &str) -> String {
    json!({"type": "unsubscribed", "id": id}).to_string()
}

pub(crate) fn left(channel: &str) -> String {
    json!({"type": "left", "channel": channel}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_are_parsed_strictly() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        ));
        let bad = [
            "not json",
            "[1]",
            r#"{"type":1}"#,
            r#"{"type":"dance"}"#,
            r#"{"type":"ping","x":1}"#,
            r#"{"type":"subscribe","id":"s","collection":"c"}"#,
            r#"{"type":"subscribe","id":"s","collection":"c","doc":"a","query":{}}"#,
            r#"{"type":"subscribe","id":"","collection":"c","doc":"a"}"#,
            r#"{"type":"join","channel":"bad channel"}"#,
            r#"{"type":"join","channel":"ok","presence":[1]}"#,
            r#"{"type":"broadcast","channel":"ok","event":""}"#,
        ];
        for text in bad {
            assert!(ClientMessage::parse(text).is_err(), "{text} was accepted");
        }
        let err =
            ClientMessage::parse(r#"{"type":"subscribe","id":"s1","collection":"c"}"#).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("s1"));
    }

    #[test]
    fn ids_are_quoted_as_json_strings() {
        for id in [
            "s1",
            "a\"b\\c",
            "tab\there",
            "\u{1}x\u{1f}\u{8}\u{c}",
            "é✓ \u{7f}",
        ] {
            let mut out = String::new();
            push_quoted(&mut out, id);
            assert_eq!(out, quoted(id));
            let msg: Value = serde_json::from_str(&changes(id, &[], id)).unwrap();
            assert_eq!(msg["id"], id);
            assert_eq!(msg["cursor"], id);
        }
    }
}
