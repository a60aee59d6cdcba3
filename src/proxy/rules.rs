//! Fault-injection rules of the proxy: which message to drop, delay or corrupt, and how.
//!
//! Syntax (one rule per `--inject`):
//!
//! ```text
//! RULE    := ACTION ':' MESSAGE [ ':' ARG ] [ '@' N ]
//! ACTION  := drop | delay | corrupt
//! MESSAGE := NAME [ '.reply' ]
//! ARG     := delay: a duration, `200ms` or `1.5s` (required, at most 60 s)
//!            corrupt: `flags` (default) | `size` | `fds` | `byte=OFFSET`
//! N       := 1-based occurrence of MESSAGE over the proxy's lifetime (all sessions);
//!            without it the rule applies to every occurrence
//! ```
//!
//! NAME is a request name as the spec spells it, with or without `VHOST_USER_`, in any case:
//! a front-end request (`GET_FEATURES`) or a back-end request (`BACKEND_CONFIG_CHANGE_MSG`;
//! the `BACKEND_` prefix may be left out where no front-end request has the same name).
//! `.reply` selects the reply to that request instead of the request itself. A rule matches
//! the header (the request's code on its channel, and the REPLY bit), whichever peer sends it.
//!
//! The corruptions are chosen so that a receiver that follows the spec must notice them:
//! `flags` sets reserved header bit 4 (spec: "Flags ... the rest are reserved and must be 0"),
//! `size` makes the payload one byte shorter (one zero byte longer when it is empty), keeping
//! the header's size field equal to what is sent so the stream stays in step, `fds` closes the
//! fds instead of passing them on, `byte=OFFSET` inverts one payload byte. Not every peer
//! checks: qemu-storage-daemon 7.2 (libvhost-user) acks a SET_VRING_ADDR with reserved flag
//! bits, with a 39-byte payload, and for ring 255 of a one-ring device (measured through the
//! proxy); our back-end refuses all three.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::{BackendRequest, FrontendRequest, Header, Request};

/// Longest delay a rule may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Header bit that `corrupt:...:flags` sets: the lowest reserved one.
const CORRUPT_FLAG: u32 = 1 << 4;

/// A rule that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// Not `ACTION:MESSAGE[:ARG][@N]`.
    #[error("inject rule {rule:?}: {reason} (expected ACTION:MESSAGE[:ARG][@N], e.g. drop:GET_FEATURES)")]
    Syntax {
        /// The rule as given.
        rule: String,
        /// What is wrong.
        reason: String,
    },
}

fn syntax(rule: &str, reason: impl Into<String>) -> RuleError {
    RuleError::Syntax { rule: rule.to_string(), reason: reason.into() }
}

/// How `corrupt` damages a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Set reserved header flag bit 4.
    Flags,
    /// Payload one byte shorter (or one zero byte for an empty payload), header size to match.
    Size,
    /// Close the fds instead of passing them on.
    Fds,
    /// Invert the payload byte at this offset (no change if the payload is shorter).
    Byte(usize),
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Flags => f.write_str("flags"),
            Corruption::Size => f.write_str("size"),
            Corruption::Fds => f.write_str("fds"),
            Corruption::Byte(offset) => write!(f, "byte={offset}"),
        }
    }
}

impl Corruption {
    /// Damages a message about to be relayed. Returns whether anything changed.
    pub fn apply(self, header: &mut Header, payload: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> bool {
        match self {
            Corruption::Flags => {
                header.flags |= CORRUPT_FLAG;
                true
            }
            Corruption::Size => {
                if payload.pop().is_none() {
                    payload.push(0);
                }
                header.size = payload.len() as u32;
                true
            }
            Corruption::Fds => {
                let had = !fds.is_empty();
                fds.clear();
                had
            }
            Corruption::Byte(offset) => match payload.get_mut(offset) {
                Some(byte) => {
                    *byte ^= 0xff;
                    true
                }
                None => false,
            },
        }
    }
}

/// What a rule does to the message it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Do not relay it (its fds are closed).
    Drop,
    /// Relay it this much later; later messages in the same direction wait behind it.
    Delay(Duration),
    /// Relay it damaged.
    Corrupt(Corruption),
}

/// One parsed `--inject` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// What to do.
    pub action: Action,
    /// The request the rule is about.
    pub request: Request,
    /// Whether the rule matches the reply to `request` rather than the request itself.
    pub reply: bool,
    /// Only this occurrence (1-based, counted over the proxy's lifetime); `None`: every one.
    pub nth: Option<u64>,
    text: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn lookup(name: &str) -> Option<Request> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("VHOST_USER_").unwrap_or(&upper);
    if let Some(rest) = bare.strip_prefix("BACKEND_") {
        if let Some(r) = BackendRequest::ALL.iter().find(|r| r.name() == rest) {
            return Some(Request::Backend(*r));
        }
    }
    if let Some(r) = FrontendRequest::ALL.iter().find(|r| r.name() == bare) {
        return Some(Request::Frontend(*r));
    }
    BackendRequest::ALL.iter().find(|r| r.name() == bare).map(|r| Request::Backend(*r))
}

fn parse_duration(rule: &str, text: &str) -> Result<Duration, RuleError> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(syntax(rule, format!("delay {text:?} needs a unit: ms or s (e.g. 200ms, 1.5s)")));
    };
    let value: f64 = number.parse().map_err(|_| syntax(rule, format!("delay {text:?} is not a number")))?;
    let seconds = value * scale;
    if !seconds.is_finite() || seconds < 0.0 || seconds > MAX_DELAY.as_secs_f64() {
        return Err(syntax(rule, format!("delay {text:?} must be between 0 and {} s", MAX_DELAY.as_secs())));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_corruption(rule: &str, text: Option<&str>) -> Result<Corruption, RuleError> {
    match text {
        None | Some("flags") => Ok(Corruption::Flags),
        Some("size") => Ok(Corruption::Size),
        Some("fds") => Ok(Corruption::Fds),
        Some(other) => match other.strip_prefix("byte=") {
            Some(offset) => offset
                .parse()
                .map(Corruption::Byte)
                .map_err(|_| syntax(rule, format!("byte offset {offset:?} is not a number"))),
            None => Err(syntax(rule, format!("unknown corruption {other:?} (flags, size, fds or byte=OFFSET)"))),
        },
    }
}

impl Rule {
    /// Parses one rule (see the module documentation for the syntax).
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let rule = text.trim();
        let (body, nth) = match rule.rsplit_once('@') {
            Some((body, n)) => {
                let n: u64 = n.parse().map_err(|_| syntax(rule, format!("occurrence {n:?} is not a number")))?;
                if n == 0 {
                    return Err(syntax(rule, "occurrences count from 1"));
                }
                (body, Some(n))
            }
            None => (rule, None),
        };
        let mut parts = body.split(':');
        let action = parts.next().unwrap_or_default();
        let message = parts.next().ok_or_else(|| syntax(rule, "no message named"))?;
        let arg = parts.next();
        if parts.next().is_some() {
            return Err(syntax(rule, "too many ':'"));
        }
        let (name, reply) = match message.strip_suffix(".reply") {
            Some(name) => (name, true),
            None => (message, false),
        };
        let request = lookup(name).ok_or_else(|| syntax(rule, format!("unknown request {name:?}")))?;
        let action = match action {
            "drop" if arg.is_none() => Action::Drop,
            "drop" => return Err(syntax(rule, "drop takes no argument")),
            "delay" => Action::Delay(parse_duration(rule, arg.ok_or_else(|| syntax(rule, "delay needs a duration"))?)?),
            "corrupt" => Action::Corrupt(parse_corruption(rule, arg)?),
            other => return Err(syntax(rule, format!("unknown action {other:?} (drop, delay or corrupt)"))),
        };
        Ok(Rule { action, request, reply, nth, text: rule.to_string() })
    }

    fn matches(&self, request: Request, reply: bool) -> bool {
        self.request == request && self.reply == reply
    }
}

/// What the rules decided for one message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Do not relay it.
    pub drop: bool,
    /// Hold it back this long (the sum of every delay that fired).
    pub delay: Duration,
    /// Corruptions to apply, in rule order.
    pub corrupt: Vec<Corruption>,
    /// The rules that fired, as written.
    pub fired: Vec<String>,
}

/// The rules of one proxy with their occurrence counters (shared by its sessions).
#[derive(Debug, Default)]
pub struct Injector {
    rules: Vec<Rule>,
    seen: Vec<AtomicU64>,
}

impl Injector {
    /// An injector applying `rules` in order.
    pub fn new(rules: Vec<Rule>) -> Injector {
        let seen = rules.iter().map(|_| AtomicU64::new(0)).collect();
        Injector { rules, seen }
    }

    /// Whether there are no rules (every message is relayed unchanged).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Counts a message (`request`, and whether it is a reply) against every rule that names
    /// it, and returns what the rules that fire ask for. Every matching rule counts the message,
    /// so `@N` means "the N-th such message", whatever other rules did to earlier ones.
    pub fn verdict(&self, request: Request, reply: bool) -> Verdict {
        let mut verdict = Verdict::default();
        for (rule, seen) in self.rules.iter().zip(&self.seen) {
            if !rule.matches(request, reply) {
                continue;
            }
            let count = seen.fetch_add(1, Ordering::Relaxed) + 1;
            if rule.nth.is_some_and(|n| n != count) {
                continue;
            }
            verdict.fired.push(rule.text.clone());
            match rule.action {
                Action::Drop => verdict.drop = true,
                Action::Delay(d) => verdict.delay = verdict.delay.saturating_add(d),
                Action::Corrupt(c) => verdict.corrupt.push(c),
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Channel;

    #[test]
    fn parses_each_action() {
        let r = Rule::parse("drop:GET_FEATURES").unwrap();
        assert_eq!(
            (r.action, r.request, r.reply, r.nth),
            (Action::Drop, FrontendRequest::GET_FEATURES.into(), false, None)
        );
        let r = Rule::parse("delay:SET_MEM_TABLE:200ms").unwrap();
        assert_eq!(r.action, Action::Delay(Duration::from_millis(200)));
        let r = Rule::parse("delay:vhost_user_set_mem_table:1.5s@2").unwrap();
        assert_eq!((r.action, r.nth), (Action::Delay(Duration::from_millis(1500)), Some(2)));
        assert_eq!(r.request, FrontendRequest::SET_MEM_TABLE.into());
        assert_eq!(Rule::parse("corrupt:SET_VRING_ADDR").unwrap().action, Action::Corrupt(Corruption::Flags));
        assert_eq!(Rule::parse("corrupt:SET_VRING_ADDR:size").unwrap().action, Action::Corrupt(Corruption::Size));
        assert_eq!(Rule::parse("corrupt:SET_VRING_KICK:fds").unwrap().action, Action::Corrupt(Corruption::Fds));
        assert_eq!(
            Rule::parse("corrupt:SET_VRING_ADDR:byte=8@1").unwrap().action,
            Action::Corrupt(Corruption::Byte(8))
        );
        let r = Rule::parse("drop:GET_FEATURES.reply@1").unwrap();
        assert!(r.reply);
        assert_eq!(r.to_string(), "drop:GET_FEATURES.reply@1");
    }

    #[test]
    fn backend_request_names() {
        let r = Rule::parse("drop:BACKEND_CONFIG_CHANGE_MSG").unwrap();
        assert_eq!(r.request, BackendRequest::CONFIG_CHANGE_MSG.into());
        // Without the prefix when the name is not a front-end request too.
        assert_eq!(Rule::parse("drop:CONFIG_CHANGE_MSG").unwrap().request, BackendRequest::CONFIG_CHANGE_MSG.into());
        // IOTLB_MSG exists on both channels: the bare name is the front-end's.
        assert_eq!(Rule::parse("drop:IOTLB_MSG").unwrap().request, FrontendRequest::IOTLB_MSG.into());
        assert_eq!(Rule::parse("drop:VHOST_USER_BACKEND_IOTLB_MSG").unwrap().request, BackendRequest::IOTLB_MSG.into());
        assert_eq!(Rule::parse("drop:BACKEND_IOTLB_MSG").unwrap().request.channel(), Channel::Backend);
    }

    #[test]
    fn bad_rules_say_why() {
        for (text, why) in [
            ("", "no message"),
            ("drop", "no message"),
            ("drop:NO_SUCH", "unknown request"),
            ("explode:GET_FEATURES", "unknown action"),
            ("drop:GET_FEATURES:1s", "no argument"),
            ("delay:GET_FEATURES", "needs a duration"),
            ("delay:GET_FEATURES:200", "unit"),
            ("delay:GET_FEATURES:xms", "not a number"),
            ("delay:GET_FEATURES:61s", "between"),
            ("delay:GET_FEATURES:-1s", "between"),
            ("delay:GET_FEATURES:NaNs", "between"),
            ("corrupt:GET_FEATURES:bits", "unknown corruption"),
            ("corrupt:GET_FEATURES:byte=-1", "not a number"),
            ("drop:GET_FEATURES@0", "from 1"),
            ("drop:GET_FEATURES@x", "not a number"),
            ("drop:GET_FEATURES:a:b", "too many"),
        ] {
            let err = Rule::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn occurrences_are_counted_per_rule() {
        let inj = Injector::new(vec![
            Rule::parse("drop:GET_FEATURES@2").unwrap(),
            Rule::parse("delay:GET_FEATURES:10ms").unwrap(),
            Rule::parse("corrupt:GET_FEATURES.reply:size@1").unwrap(),
        ]);
        let req = Request::Frontend(FrontendRequest::GET_FEATURES);
        let first = inj.verdict(req, false);
        assert!(!first.drop);
        assert_eq!(first.delay, Duration::from_millis(10));
        assert_eq!(first.fired, vec!["delay:GET_FEATURES:10ms"]);
        let second = inj.verdict(req, false);
        assert!(second.drop);
        assert_eq!(second.fired.len(), 2);
        assert!(!inj.verdict(req, false).drop);
        assert_eq!(inj.verdict(req, true).corrupt, vec![Corruption::Size]);
        assert!(inj.verdict(req, true).corrupt.is_empty());
        assert_eq!(inj.verdict(Request::Frontend(FrontendRequest::SET_OWNER), false), Verdict::default());
    }

    #[test]
    fn corruptions_change_what_they_say() {
        let mut header = Header { code: 9, flags: 1, size: 3 };
        let mut payload = vec![1, 2, 3];
        let mut fds = Vec::new();
        assert!(Corruption::Flags.apply(&mut header, &mut payload, &mut fds));
        assert_eq!(header.flags, 0x11);
        assert!(Corruption::Size.apply(&mut header, &mut payload, &mut fds));
        assert_eq!((header.size, payload.as_slice()), (2, &[1u8, 2][..]));
        assert!(Corruption::Byte(1).apply(&mut header, &mut payload, &mut fds));
        assert_eq!(payload, vec![1, 0xfd]);
        assert!(!Corruption::Byte(2).apply(&mut header, &mut payload, &mut fds));
        assert!(!Corruption::Fds.apply(&mut header, &mut payload, &mut fds));
        let mut empty = Vec::new();
        let mut h = Header { code: 1, flags: 1, size: 0 };
        assert!(Corruption::Size.apply(&mut h, &mut empty, &mut fds));
        assert_eq!((h.size, empty.len()), (1, 1));
    }
}
