//! Rendering of trace records: one human-readable line, or one JSON object per line.
//!
//! Payload fields carry the names of `vhostuser_rs/messages.py` (the `decode --json` names):
//! JSON has every integer as a number and byte strings as hex; the text line shows addresses,
//! sizes and masks in hex.

use std::fmt::Write as _;
use std::time::UNIX_EPOCH;

use super::record::{Event, Record, Traced};
use crate::protocol::{FrontendRequest, MemoryRegion, Payload, ProtocolFeatures, Request, VirtioFeatures, NEED_REPLY};

/// A payload field value.
enum Value {
    Dec(u64),
    Hex(u64),
    Int(i64),
    Bool(bool),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Object(Vec<(&'static str, Value)>),
}

fn region(r: &MemoryRegion) -> Value {
    let mut fields = vec![
        ("guest_addr", Value::Hex(r.guest_addr)),
        ("size", Value::Hex(r.size)),
        ("user_addr", Value::Hex(r.user_addr)),
        ("mmap_offset", Value::Hex(r.mmap_offset)),
    ];
    if let Some(x) = r.xen {
        fields.push((
            "xen",
            Value::Object(vec![("flags", Value::Hex(x.flags.into())), ("domid", Value::Dec(x.domid.into()))]),
        ));
    }
    Value::Object(fields)
}

fn payload_value(payload: &Payload) -> Option<Value> {
    use Value::*;
    Some(match payload {
        Payload::Empty => return None,
        Payload::U64(v) => Hex(*v),
        Payload::VringState(s) => Object(vec![("index", Dec(s.index.into())), ("num", Dec(s.num.into()))]),
        Payload::VringAddr(a) => Object(vec![
            ("index", Dec(a.index.into())),
            ("flags", Hex(a.flags.into())),
            ("desc_user_addr", Hex(a.desc_user_addr)),
            ("used_user_addr", Hex(a.used_user_addr)),
            ("avail_user_addr", Hex(a.avail_user_addr)),
            ("log_guest_addr", Hex(a.log_guest_addr)),
        ]),
        Payload::VringFd(f) => Object(vec![("index", Dec(f.index.into())), ("nofd", Bool(f.nofd))]),
        Payload::MemoryTable(regions) => Object(vec![("regions", List(regions.iter().map(region).collect()))]),
        Payload::SingleRegion(r) => region(r),
        Payload::LogBase { mmap_size, mmap_offset } => {
            Object(vec![("mmap_size", Hex(*mmap_size)), ("mmap_offset", Hex(*mmap_offset))])
        }
        Payload::Iotlb(m) => Object(vec![
            ("iova", Hex(m.iova)),
            ("size", Hex(m.size)),
            ("uaddr", Hex(m.uaddr)),
            ("perm", Dec(m.perm.into())),
            ("type", Dec(m.kind.into())),
        ]),
        Payload::Config(c) => Object(vec![
            ("offset", Dec(c.offset.into())),
            ("data", Bytes(c.data.clone())),
            ("flags", Hex(c.flags.into())),
        ]),
        Payload::VringArea(a) => Object(vec![
            ("index", Dec(a.index.into())),
            ("size", Hex(a.size)),
            ("offset", Hex(a.offset)),
            ("nofd", Bool(a.nofd)),
        ]),
        Payload::Inflight(d) => Object(vec![
            ("mmap_size", Hex(d.mmap_size)),
            ("mmap_offset", Hex(d.mmap_offset)),
            ("num_queues", Dec(d.num_queues.into())),
            ("queue_size", Dec(d.queue_size.into())),
        ]),
        Payload::Shared(uuid) => Object(vec![("uuid", Bytes(uuid.to_vec()))]),
        Payload::DeviceStateParams(p) => {
            Object(vec![("direction", Dec(p.direction.into())), ("phase", Dec(p.phase.into()))])
        }
        Payload::Mmap(m) => Object(vec![
            ("shmid", Dec(m.shmid.into())),
            ("fd_offset", Hex(m.fd_offset)),
            ("shm_offset", Hex(m.shm_offset)),
            ("len", Hex(m.len)),
            ("flags", Hex(m.flags)),
        ]),
        Payload::ShmemConfig(c) => {
            Object(vec![("memory_sizes", List(c.memory_sizes.iter().map(|s| Hex(*s)).collect()))])
        }
        Payload::CryptoSession(c) => Object(vec![
            ("op_code", Dec(c.op_code)),
            ("params", Bytes(c.params.clone())),
            ("session_id", Int(c.session_id)),
        ]),
        Payload::Raw(b) => Bytes(b.clone()),
    })
}

/// Names of the feature bits of a GET/SET_(PROTOCOL_)FEATURES value.
fn feature_names(request: Request, payload: &Payload) -> Option<Vec<String>> {
    let Payload::U64(v) = payload else { return None };
    match request {
        Request::Frontend(FrontendRequest::GET_FEATURES | FrontendRequest::SET_FEATURES) => {
            Some(VirtioFeatures(*v).names())
        }
        Request::Frontend(FrontendRequest::GET_PROTOCOL_FEATURES | FrontendRequest::SET_PROTOCOL_FEATURES) => {
            Some(ProtocolFeatures(*v).names())
        }
        _ => None,
    }
}

fn request_name(request: Request) -> String {
    match request {
        Request::Frontend(r) => r.name().to_string(),
        Request::Backend(r) => format!("BACKEND_{}", r.name()),
        Request::Unknown(_, code) => format!("UNKNOWN_{code}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---- text ----

fn text_value(out: &mut String, value: &Value) {
    match value {
        Value::Dec(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Hex(v) => {
            let _ = write!(out, "{v:#x}");
        }
        Value::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Bytes(b) => out.push_str(&hex(b)),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                text_value(out, item);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            text_fields(out, fields);
            out.push('}');
        }
    }
}

fn text_fields(out: &mut String, fields: &[(&'static str, Value)]) {
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(key);
        out.push('=');
        text_value(out, value);
    }
}

fn text_message(out: &mut String, t: &Traced) {
    let request = t.request();
    let kind = if t.header.is_reply() { " reply" } else { "" };
    let channel = match t.channel {
        crate::protocol::Channel::Main => "main",
        crate::protocol::Channel::Backend => "chan",
    };
    let name = format!("{}{kind}", request_name(request));
    let _ = write!(out, "{channel} {} {name:<32} flags={:#x}", t.from.arrow(), t.header.flags);
    if t.header.flags & NEED_REPLY != 0 {
        out.push_str("(NEED_REPLY)");
    }
    let _ = write!(out, " size={} fds={}", t.header.size, t.num_fds);
    match &t.decoded {
        Ok(message) => {
            if let Some(value) = payload_value(&message.payload) {
                out.push_str("  ");
                match &value {
                    Value::Object(fields) => text_fields(out, fields),
                    other => {
                        out.push_str("payload=");
                        text_value(out, other);
                    }
                }
            }
            if let Some(names) = feature_names(request, &message.payload) {
                let _ = write!(out, " ({})", if names.is_empty() { "none".to_string() } else { names.join("|") });
            }
        }
        Err(e) => {
            let _ = write!(out, "  ! {e}; bytes={}", hex(&t.payload));
        }
    }
    if t.substituted {
        out.push_str("  [fd replaced by the proxy's channel]");
    }
    if t.dropped {
        out.push_str("  [DROPPED]");
    }
    if !t.injected.is_empty() {
        let _ = write!(out, "  [inject {}]", t.injected.join(", "));
    }
}

/// The record as one line of text (no newline).
pub fn text(record: &Record) -> String {
    let mut out = format!("{:>11.6} #{} ", record.elapsed.as_secs_f64(), record.session);
    match &record.event {
        Event::Connected => out.push_str("session open: front-end connected, back-end reached"),
        Event::Message(t) => text_message(&mut out, t),
        Event::Note(note) => {
            let _ = write!(out, "note: {note}");
        }
        Event::Closed { reason, clean } => {
            let _ = write!(out, "session closed{}: {reason}", if *clean { "" } else { " on an error" });
        }
    }
    out
}

// ---- JSON ----

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_value(out: &mut String, value: &Value) {
    match value {
        Value::Dec(v) | Value::Hex(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Bytes(b) => json_string(out, &hex(b)),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_value(out, item);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (key, value)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_string(out, key);
                out.push(':');
                json_value(out, value);
            }
            out.push('}');
        }
    }
}

fn json_strings(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, item);
    }
    out.push(']');
}

/// Appends `,"key":` to an object being written.
fn key(out: &mut String, name: &str) {
    out.push(',');
    json_string(out, name);
    out.push(':');
}

fn json_message(out: &mut String, t: &Traced) {
    let request = t.request();
    key(out, "channel");
    json_string(
        out,
        match t.channel {
            crate::protocol::Channel::Main => "main",
            crate::protocol::Channel::Backend => "backend",
        },
    );
    key(out, "direction");
    json_string(out, t.from.arrow());
    key(out, "request");
    json_string(out, &request_name(request));
    let _ = write!(
        out,
        ",\"code\":{},\"reply\":{},\"need_reply\":{},\"flags\":{},\"size\":{},\"fds\":{}",
        request.code(),
        t.header.is_reply(),
        t.header.flags & NEED_REPLY != 0,
        t.header.flags,
        t.header.size,
        t.num_fds
    );
    key(out, "payload");
    match &t.decoded {
        Ok(message) => {
            match payload_value(&message.payload) {
                Some(value) => json_value(out, &value),
                None => out.push_str("null"),
            }
            if let Some(names) = feature_names(request, &message.payload) {
                key(out, "names");
                json_strings(out, &names);
            }
        }
        Err(e) => {
            out.push_str("null");
            key(out, "error");
            json_string(out, &e.to_string());
            key(out, "raw");
            json_string(out, &hex(&t.payload));
        }
    }
    key(out, "action");
    json_string(out, if t.dropped { "dropped" } else { "relayed" });
    if !t.injected.is_empty() {
        key(out, "inject");
        json_strings(out, &t.injected);
    }
    if t.substituted {
        out.push_str(",\"substituted\":true");
    }
}

/// The record as one JSON object (no newline).
pub fn json(record: &Record) -> String {
    let time = record.time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let mut out =
        format!("{{\"time\":{time:.6},\"elapsed\":{:.6},\"session\":{}", record.elapsed.as_secs_f64(), record.session);
    key(&mut out, "event");
    match &record.event {
        Event::Connected => json_string(&mut out, "connected"),
        Event::Message(t) => {
            json_string(&mut out, "message");
            json_message(&mut out, t);
        }
        Event::Note(note) => {
            json_string(&mut out, "note");
            key(&mut out, "detail");
            json_string(&mut out, note);
        }
        Event::Closed { reason, clean } => {
            json_string(&mut out, "closed");
            key(&mut out, "reason");
            json_string(&mut out, reason);
            let _ = write!(out, ",\"clean\":{clean}");
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::super::record::{Side, Traced};
    use super::*;
    use crate::protocol::{Channel, Header, Message, Payload, VringAddr};

    fn record(event: Event) -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            elapsed: Duration::from_micros(1500),
            session: 3,
            event,
        }
    }

    fn traced(channel: Channel, from: Side, message: &Message, num_fds: usize) -> Traced {
        let bytes = message.encode();
        let header = Header::parse(&bytes).unwrap();
        Traced::new(channel, from, header, &bytes[12..], num_fds)
    }

    #[test]
    fn text_line_of_a_request_and_a_reply() {
        let addr = VringAddr {
            index: 1,
            flags: 0,
            desc_user_addr: 0x1000,
            used_user_addr: 0x2000,
            avail_user_addr: 0x3000,
            log_guest_addr: 0,
        };
        let m = Message::request(FrontendRequest::SET_VRING_ADDR, Payload::VringAddr(addr)).with_need_reply();
        let line = text(&record(Event::Message(Box::new(traced(Channel::Main, Side::Frontend, &m, 0)))));
        assert!(line.starts_with("   0.001500 #3 main F>B SET_VRING_ADDR"), "{line}");
        assert!(
            line.contains("flags=0x9(NEED_REPLY) size=40 fds=0  index=1 flags=0x0 desc_user_addr=0x1000"),
            "{line}"
        );
        let r = Message::reply(FrontendRequest::GET_FEATURES, Payload::U64((1 << 32) | (1 << 30)));
        let line = text(&record(Event::Message(Box::new(traced(Channel::Main, Side::Backend, &r, 0)))));
        assert!(line.contains("B>F GET_FEATURES reply"), "{line}");
        assert!(line.contains("payload=0x140000000 (PROTOCOL_FEATURES|VERSION_1)"), "{line}");
    }

    #[test]
    fn json_line_carries_the_fields() {
        let m = Message::request(crate::protocol::BackendRequest::CONFIG_CHANGE_MSG, Payload::Empty).with_need_reply();
        let mut t = traced(Channel::Backend, Side::Backend, &m, 0);
        t.injected.push("delay:CONFIG_CHANGE_MSG:1ms".into());
        let line = json(&record(Event::Message(Box::new(t))));
        assert_eq!(
            line,
            "{\"time\":1.000000,\"elapsed\":0.001500,\"session\":3,\"event\":\"message\",\"channel\":\"backend\",\
             \"direction\":\"B>F\",\"request\":\"BACKEND_CONFIG_CHANGE_MSG\",\"code\":2,\"reply\":false,\
             \"need_reply\":true,\"flags\":9,\"size\":0,\"fds\":0,\"payload\":null,\"action\":\"relayed\",\
             \"inject\":[\"delay:CONFIG_CHANGE_MSG:1ms\"]}"
        );
        let f = Message::request(FrontendRequest::SET_PROTOCOL_FEATURES, Payload::U64(0b1001));
        let line = json(&record(Event::Message(Box::new(traced(Channel::Main, Side::Frontend, &f, 0)))));
        assert!(line.contains("\"payload\":9,\"names\":[\"MQ\",\"REPLY_ACK\"],\"action\""), "{line}");
    }

    #[test]
    fn undecodable_messages_show_the_error_and_bytes() {
        let header = Header { code: 9, flags: 1, size: 3 };
        let t = Traced::new(Channel::Main, Side::Frontend, header, &[1, 2, 3], 0);
        let line = json(&record(Event::Message(Box::new(t.clone()))));
        assert!(line.contains("\"payload\":null,\"error\":\"SET_VRING_ADDR: payload is 3 bytes"), "{line}");
        assert!(line.contains("\"raw\":\"010203\""), "{line}");
        assert!(text(&record(Event::Message(Box::new(t)))).contains("! SET_VRING_ADDR: payload is 3 bytes"));
        let unknown = Traced::new(Channel::Main, Side::Frontend, Header { code: 99, flags: 1, size: 0 }, &[], 0);
        assert!(json(&record(Event::Message(Box::new(unknown)))).contains("\"request\":\"UNKNOWN_99\",\"code\":99"));
    }

    #[test]
    fn session_events_and_escaping() {
        let line = json(&record(Event::Closed { reason: "a \"quoted\"\nreason".into(), clean: false }));
        assert!(
            line.ends_with("\"event\":\"closed\",\"reason\":\"a \\\"quoted\\\"\\nreason\",\"clean\":false}"),
            "{line}"
        );
        assert!(text(&record(Event::Connected)).contains("session open"));
        assert!(json(&record(Event::Note("x".into()))).contains("\"event\":\"note\",\"detail\":\"x\""));
    }
}
