//! Fuzzes `protocol::decode`: any bytes with any fd count on either channel must decode or fail
//! with a `ProtocolError`, never panic; whatever decodes re-encodes to a message that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::protocol::{decode, Channel};

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else { return };
    let num_fds = usize::from(control & 0x0f);
    let channel = if control & 0x80 != 0 { Channel::Backend } else { Channel::Main };
    if let Ok(msg) = decode(channel, bytes, num_fds) {
        let again = decode(channel, &msg.encode(), num_fds).expect("a decoded message re-encodes validly");
        assert_eq!(again, msg);
    }
});
