//! The ASP.NET Core SignalR JSON hub protocol, version 1 (sans-io: pure
//! functions over text), so that SignalR apps connect unchanged.
//!
//! Written from the specifications in `dotnet/aspnetcore`,
//! `src/SignalR/docs/specs/HubProtocol.md` and `TransportProtocols.md`:
//! every record is a JSON object followed by the record separator 0x1E;
//! the connection opens with a handshake request
//! (`{"protocol":"json","version":1}`) answered by `{}` or
//! `{"error":"..."}`; then invocations (type 1), completions (3), pings (6)
//! and close messages (7) flow. Over WebSockets each text message holds one
//! or more whole records: a message that does not end with 0x1E is refused
//! (we never buffer a partial record across messages).
//!
//! The hub methods are the raw API's client frames under other names:
//! `Ack(id)`, `AckMany(ids)`, `Block(from)`, `Unblock(from)`; deliveries are
//! `ReceiveMessage(message)` with the raw frame's object as the argument.

use serde::Deserialize;
use serde_json::Value;

use super::session::{ClientAction, ACK_IDS_MAX};

/// The record separator that ends every record.
pub const RS: char = '\u{1e}';

/// Bytes a `ReceiveMessage` invocation adds around a delivery frame:
/// `{"type":1,"target":"ReceiveMessage","arguments":[` + `]}` + RS.
pub const INVOCATION_ENVELOPE_BYTES: usize = RECEIVE_MESSAGE_HEAD.len() + RECEIVE_MESSAGE_TAIL.len();

pub const RECEIVE_MESSAGE_HEAD: &str = "{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[";
pub const RECEIVE_MESSAGE_TAIL: &str = "]}\u{1e}";

/// The handshake response that accepts the connection.
pub const HANDSHAKE_OK: &str = "{}\u{1e}";

/// A ping record (type 6), sent at the keep-alive interval.
pub const PING: &str = "{\"type\":6}\u{1e}";

/// Hub method names (the `target` of a client invocation).
pub const METHOD_ACK: &str = "Ack";
pub const METHOD_ACK_MANY: &str = "AckMany";
pub const METHOD_BLOCK: &str = "Block";
pub const METHOD_UNBLOCK: &str = "Unblock";

/// Why the hub refuses a client: the text of the close message's (or
/// handshake response's) `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubError(pub String);

impl HubError {
    fn new(s: impl Into<String>) -> Self {
        HubError(s.into())
    }
}

#[derive(Deserialize)]
struct HandshakeRequest {
    protocol: String,
    version: u64,
}

/// Parses the first text message of a connection: the handshake request.
/// Returns what follows the handshake record in the same message (further
/// records, usually nothing).
pub fn parse_handshake(text: &str) -> Result<&str, HubError> {
    let Some((record, rest)) = text.split_once(RS) else {
        return Err(HubError::new("malformed handshake: the record separator (0x1E) is missing"));
    };
    let req: HandshakeRequest = serde_json::from_str(record).map_err(|e| {
        HubError(format!("malformed handshake: expected {{\"protocol\":\"json\",\"version\":1}} ({e})"))
    })?;
    if req.protocol != "json" {
        return Err(HubError(format!(
            "The protocol '{}' is not supported; this hub speaks the 'json' protocol only",
            truncated(&req.protocol)
        )));
    }
    if req.version != 1 {
        return Err(HubError(format!("version {} of the json protocol is not supported (only 1)", req.version)));
    }
    Ok(rest)
}

/// The handshake response that refuses the connection.
pub fn handshake_error(error: &str) -> String {
    let mut out = String::with_capacity(error.len() + 16);
    out.push_str("{\"error\":");
    push_json_string(&mut out, error);
    out.push('}');
    out.push(RS);
    out
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "type")]
    kind: Option<Value>,
    #[serde(rename = "invocationId")]
    invocation_id: Option<Value>,
    target: Option<Value>,
    arguments: Option<Value>,
}

/// Parses one text message of records. Each record yields one request, in
/// order; a malformed record refuses the whole connection.
pub fn parse_records(text: &str, out: &mut Vec<ClientAction>) -> Result<(), HubError> {
    let Some(body) = text.strip_suffix(RS) else {
        return Err(HubError::new("the message does not end with the record separator (0x1E)"));
    };
    for record in body.split(RS) {
        out.push(parse_record(record)?);
    }
    Ok(())
}

fn parse_record(record: &str) -> Result<ClientAction, HubError> {
    let r: Record = serde_json::from_str(record).map_err(|e| HubError(format!("malformed record: {e}")))?;
    let Some(kind) = r.kind.as_ref().and_then(Value::as_u64) else {
        return Err(HubError::new("malformed record: `type` must be a message type number"));
    };
    let call = match r.invocation_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(HubError::new("malformed record: `invocationId` must be a string")),
    };
    match kind {
        1 => {
            let Some(Value::String(target)) = r.target else {
                return Err(HubError::new("malformed invocation: `target` must be a string"));
            };
            let args = match r.arguments {
                Some(Value::Array(a)) => a,
                _ => return Err(HubError::new("malformed invocation: `arguments` must be an array")),
            };
            invocation(&target, args, call)
        }
        4 => Ok(match call {
            Some(call) => ClientAction::Refuse { call, error: "streaming invocations are not supported".into() },
            None => ClientAction::Nothing,
        }),
        7 => Ok(ClientAction::Close),
        _ => Ok(ClientAction::Nothing), // 2, 3, 5, 6, 8, 9 and later types: nothing to do
    }
}

fn invocation(target: &str, args: Vec<Value>, call: Option<String>) -> Result<ClientAction, HubError> {
    match target {
        METHOD_ACK => {
            let Ok([Value::String(id)]) = <[Value; 1]>::try_from(args) else {
                return Err(HubError::new("Ack takes one argument: a message id (string)"));
            };
            Ok(ClientAction::Ack { ids: vec![id], call })
        }
        METHOD_ACK_MANY => {
            let ids = match <[Value; 1]>::try_from(args) {
                Ok([Value::Array(ids)]) => ids,
                _ => return Err(HubError::new("AckMany takes one argument: an array of message ids (strings)")),
            };
            if ids.len() > ACK_IDS_MAX {
                return Err(HubError(format!("AckMany takes at most {ACK_IDS_MAX} ids")));
            }
            let ids = ids
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(HubError::new("AckMany takes one argument: an array of message ids (strings)")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ClientAction::Ack { ids, call })
        }
        METHOD_BLOCK | METHOD_UNBLOCK => {
            let blocked = target == METHOD_BLOCK;
            match <[Value; 1]>::try_from(args) {
                Ok([Value::String(from)]) if !from.is_empty() => Ok(ClientAction::Block { from, blocked, call }),
                _ => Err(HubError(format!("{target} takes one argument: a business client id (non-empty string)"))),
            }
        }
        _ => Ok(match call {
            Some(call) => ClientAction::Refuse {
                call,
                error: format!(
                    "Unknown hub method '{}'; this hub has Ack, AckMany, Block and Unblock",
                    truncated(target)
                ),
            },
            None => ClientAction::Nothing,
        }),
    }
}

/// The `ReceiveMessage` invocation that delivers one message; `frame` is
/// the raw API's JSON frame of it (`crate::delivery::encode_frame`).
pub fn receive_message(frame: &str) -> String {
    let mut out = String::with_capacity(frame.len() + INVOCATION_ENVELOPE_BYTES);
    out.push_str(RECEIVE_MESSAGE_HEAD);
    out.push_str(frame);
    out.push_str(RECEIVE_MESSAGE_TAIL);
    out
}

/// A completion (type 3): with a `result` (raw JSON) or, if `None`, void.
pub fn completion(call: &str, result_json: Option<&str>) -> String {
    let mut out = String::with_capacity(48 + call.len() + result_json.map_or(0, str::len));
    out.push_str("{\"type\":3,\"invocationId\":");
    push_json_string(&mut out, call);
    if let Some(result) = result_json {
        out.push_str(",\"result\":");
        out.push_str(result);
    }
    out.push('}');
    out.push(RS);
    out
}

/// A completion (type 3) with an `error`.
pub fn completion_error(call: &str, error: &str) -> String {
    let mut out = String::with_capacity(48 + call.len() + error.len());
    out.push_str("{\"type\":3,\"invocationId\":");
    push_json_string(&mut out, call);
    out.push_str(",\"error\":");
    push_json_string(&mut out, error);
    out.push('}');
    out.push(RS);
    out
}

/// A close message (type 7): with an `error` when the server ends the
/// connection for a reason; `allow_reconnect` tells a client with automatic
/// reconnect that it should (a shutdown), rather than give up (a refusal).
pub fn close(error: Option<&str>, allow_reconnect: bool) -> String {
    let mut out = String::from("{\"type\":7");
    if let Some(error) = error {
        out.push_str(",\"error\":");
        push_json_string(&mut out, error);
    }
    if allow_reconnect {
        out.push_str(",\"allowReconnect\":true");
    }
    out.push('}');
    out.push(RS);
    out
}

/// The body of the negotiate response (negotiate version 1): WebSockets
/// with text frames only. The connection token is not remembered: the
/// access token is checked again on the WebSocket request.
pub fn negotiate_response(connection_id: &str, connection_token: &str) -> String {
    format!(
        "{{\"negotiateVersion\":1,\"connectionId\":\"{connection_id}\",\"connectionToken\":\"{connection_token}\",\
         \"availableTransports\":[{{\"transport\":\"WebSockets\",\"transferFormats\":[\"Text\"]}}]}}"
    )
}

/// A fresh random id for negotiate: 22 URL-safe characters (128 bits).
pub fn random_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..22).map(|_| ALPHABET[fastrand::usize(..64)] as char).collect()
}

fn push_json_string(out: &mut String, s: &str) {
    let mut b = Vec::with_capacity(s.len() + 2);
    crate::http::json_string(&mut b, s);
    out.push_str(&String::from_utf8_lossy(&b));
}

/// A client-chosen name, cut to 64 characters for an error message.
fn truncated(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ClientAction>, HubError> {
        let mut out = Vec::new();
        parse_records(text, &mut out).map(|()| out)
    }

    fn json(record: &str) -> Value {
        serde_json::from_str(record.strip_suffix(RS).expect("ends with RS")).unwrap()
    }

    #[test]
    fn handshake_accepts_json_v1_and_keeps_what_follows() {
        assert_eq!(parse_handshake("{\"protocol\":\"json\",\"version\":1}\u{1e}"), Ok(""));
        let rest = parse_handshake("{\"protocol\":\"json\",\"version\":1}\u{1e}{\"type\":6}\u{1e}").unwrap();
        assert_eq!(parse(rest).unwrap(), vec![ClientAction::Nothing]);
    }

    #[test]
    fn handshake_refusals_say_why() {
        let e = parse_handshake("{\"protocol\":\"messagepack\",\"version\":1}\u{1e}").unwrap_err();
        assert!(e.0.contains("'messagepack' is not supported"), "{e:?}");
        let e = parse_handshake("{\"protocol\":\"json\",\"version\":1}").unwrap_err();
        assert!(e.0.contains("record separator"), "{e:?}");
        let e = parse_handshake("{\"protocol\":\"json\"\u{1e}").unwrap_err();
        assert!(e.0.starts_with("malformed handshake"), "{e:?}");
        let e = parse_handshake("{\"protocol\":\"json\",\"version\":2}\u{1e}").unwrap_err();
        assert!(e.0.contains("version 2"), "{e:?}");
        assert_eq!(json(&handshake_error("no \"x\"")), serde_json::json!({"error": "no \"x\""}));
    }

    #[test]
    fn hub_methods_decode_to_requests() {
        let text = "{\"type\":1,\"invocationId\":\"1\",\"target\":\"Ack\",\"arguments\":[\"A\"]}\u{1e}\
                    {\"type\":1,\"target\":\"AckMany\",\"arguments\":[[\"B\",\"C\"]]}\u{1e}\
                    {\"type\":1,\"invocationId\":\"2\",\"target\":\"Block\",\"arguments\":[\"acme\"]}\u{1e}\
                    {\"type\":1,\"target\":\"Unblock\",\"arguments\":[\"acme\"],\"headers\":{}}\u{1e}\
                    {\"type\":6}\u{1e}{\"type\":7}\u{1e}";
        assert_eq!(
            parse(text).unwrap(),
            vec![
                ClientAction::Ack { ids: vec!["A".into()], call: Some("1".into()) },
                ClientAction::Ack { ids: vec!["B".into(), "C".into()], call: None },
                ClientAction::Block { from: "acme".into(), blocked: true, call: Some("2".into()) },
                ClientAction::Block { from: "acme".into(), blocked: false, call: None },
                ClientAction::Nothing,
                ClientAction::Close,
            ]
        );
    }

    #[test]
    fn unknown_methods_and_streams_get_an_error_completion() {
        let r = parse("{\"type\":1,\"invocationId\":\"9\",\"target\":\"Frobnicate\",\"arguments\":[]}\u{1e}").unwrap();
        let [ClientAction::Refuse { call, error }] = &r[..] else { panic!("{r:?}") };
        assert_eq!(call, "9");
        assert!(error.contains("Unknown hub method 'Frobnicate'"));
        let r = parse("{\"type\":4,\"invocationId\":\"3\",\"target\":\"Ack\",\"arguments\":[]}\u{1e}").unwrap();
        assert!(matches!(&r[..], [ClientAction::Refuse { .. }]));
        // Without an invocation id nobody waits: nothing to answer.
        assert_eq!(
            parse("{\"type\":1,\"target\":\"Nope\",\"arguments\":[]}\u{1e}").unwrap(),
            vec![ClientAction::Nothing]
        );
    }

    #[test]
    fn wrong_argument_types_refuse_the_connection() {
        for (text, want) in [
            ("{\"type\":1,\"target\":\"Ack\",\"arguments\":[5]}", "Ack takes one argument"),
            ("{\"type\":1,\"target\":\"Ack\",\"arguments\":[\"a\",\"b\"]}", "Ack takes one argument"),
            ("{\"type\":1,\"target\":\"AckMany\",\"arguments\":[\"a\"]}", "AckMany takes one argument"),
            ("{\"type\":1,\"target\":\"AckMany\",\"arguments\":[[1]]}", "AckMany takes one argument"),
            ("{\"type\":1,\"target\":\"Block\",\"arguments\":[\"\"]}", "Block takes one argument"),
            ("{\"type\":1,\"target\":\"Unblock\",\"arguments\":[null]}", "Unblock takes one argument"),
            ("{\"type\":1,\"target\":\"Ack\",\"arguments\":\"a\"}", "`arguments` must be an array"),
            ("{\"type\":1,\"arguments\":[]}", "`target` must be a string"),
            ("{\"type\":\"1\"}", "`type` must be"),
            ("{\"type\":1,\"invocationId\":1,\"target\":\"Ack\",\"arguments\":[\"a\"]}", "`invocationId`"),
            ("not json", "malformed record"),
        ] {
            let e = parse(&format!("{text}\u{1e}")).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e:?}");
        }
        let many: Vec<String> = (0..=ACK_IDS_MAX).map(|i| i.to_string()).collect();
        let text = serde_json::json!({"type": 1, "target": "AckMany", "arguments": [many]}).to_string() + "\u{1e}";
        assert!(parse(&text).unwrap_err().0.contains("at most 1000"));
    }

    #[test]
    fn a_message_must_end_with_the_separator() {
        let e = parse("{\"type\":6}").unwrap_err();
        assert!(e.0.contains("record separator"), "{e:?}");
        let e = parse("{\"type\":6}\u{1e}{\"type\":6}").unwrap_err();
        assert!(e.0.contains("record separator"), "{e:?}");
        assert!(parse("\u{1e}").is_err(), "an empty record is malformed");
    }

    #[test]
    fn server_records_are_valid_json() {
        let frame =
            r#"{"type":"message","id":"000g000000000000","from":"acme","body":"hi","priority":"high","accepted_at":1}"#;
        let inv = receive_message(frame);
        assert_eq!(inv.len(), frame.len() + INVOCATION_ENVELOPE_BYTES);
        let v = json(&inv);
        assert_eq!(v["type"], 1);
        assert_eq!(v["target"], "ReceiveMessage");
        assert_eq!(v["arguments"][0]["body"], "hi");
        assert!(v.get("invocationId").is_none(), "a non-blocking invocation");
        assert_eq!(json(&completion("7", None)), serde_json::json!({"type": 3, "invocationId": "7"}));
        assert_eq!(json(&completion("7", Some("{\"a\":1}")))["result"]["a"], 1);
        assert_eq!(json(&completion_error("\"q", "bad"))["invocationId"], "\"q");
        assert_eq!(json(&completion_error("1", "bad"))["error"], "bad");
        assert_eq!(json(PING), serde_json::json!({"type": 6}));
        assert_eq!(json(HANDSHAKE_OK), serde_json::json!({}));
        assert_eq!(json(&close(Some("x"), false)), serde_json::json!({"type": 7, "error": "x"}));
        assert_eq!(json(&close(None, true)), serde_json::json!({"type": 7, "allowReconnect": true}));
        let n: Value = serde_json::from_str(&negotiate_response("abc", "def")).unwrap();
        assert_eq!(n["negotiateVersion"], 1);
        assert_eq!(n["connectionToken"], "def");
        assert_eq!(n["availableTransports"][0]["transport"], "WebSockets");
        assert_eq!(n["availableTransports"][0]["transferFormats"], serde_json::json!(["Text"]));
        let id = random_id();
        assert_eq!(id.len(), 22);
        assert_ne!(id, random_id());
    }
}
