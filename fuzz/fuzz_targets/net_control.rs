//! virtio-net control-queue commands from an untrusted driver: any bytes give OK or ERR, never
//! a panic, and VQ_PAIRS_SET never leaves the device's range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhostuser_rs::devices::net::{NetCore, NetOptions};
use vhostuser_rs::virtio::net::ctrl;

fuzz_target!(|data: &[u8]| {
    let Some((&pairs, cmd)) = data.split_first() else { return };
    let core = NetCore::new(NetOptions { queue_pairs: u16::from(pairs % 8) + 1, ..NetOptions::default() });
    core.features_acked(core.features());
    let status = core.handle_command(cmd, &|_, _, _| None);
    assert!(status == ctrl::OK || status == ctrl::ERR);
    assert!((1..=core.queue_pairs()).contains(&core.active_pairs()));
    let _ = core.config();
});
