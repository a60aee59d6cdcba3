//! The TAP bridge: a vhost-user-net port backed by a Linux TAP device, the user-space
//! counterpart of the kernel's vhost-net. Each queue pair has its own TAP queue fd
//! (IFF_MULTI_QUEUE with several pairs); the virtio-net header passes through unchanged
//! (IFF_VNET_HDR with the negotiated header size), so checksum and segmentation offloads are
//! the kernel's work (TUNSETOFFLOAD follows the offloads the driver accepted). TX chains are
//! written to the TAP with one writev straight from guest memory; frames read from the TAP
//! fill the kept RX buffers of the pair, merged when MRG_RXBUF is on. The TAP fd is watched by
//! the worker that runs the pair, next to the kicks.

use std::cell::RefCell;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{check_tx, deliver, Delivery, NetCore, NetOptions, NetPort};
use crate::backend::{DeviceRequest, RingHandle, Rings};
use crate::virtio::net::{self as vnet, feature, NetHeader};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

// <linux/if_tun.h> and <linux/if.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Frames read from the TAP per wake-up of a pair (then other rings get their turn).
const RX_BURST: usize = 64;

thread_local! {
    static FRAME: RefCell<Vec<u8>> = RefCell::new(vec![0u8; vnet::HDR_LEN + vnet::MAX_FRAME_LEN]);
}

/// `struct ifreq` with the name and a short/int in the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let bytes = c.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ || bytes.len() < 2 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], value: 0, _pad: [0; 20] };
        for (d, &s) in r.name.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
        Ok(r)
    }
}

fn ioctl(fd: RawFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: the callers pass a request and an argument of the size that request takes.
    if unsafe { libc::ioctl(fd, request as _, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the interface up and sets its MTU (for a TAP this device created).
fn configure_link(name: &str, mtu: Option<u16>) -> io::Result<()> {
    // SAFETY: a plain socket used for interface ioctls only.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    if let Some(mtu) = mtu {
        let mut r = IfReq::new(name)?;
        r.value = libc::c_int::from(mtu);
        ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, (&mut r as *mut IfReq).cast())?;
    }
    let mut r = IfReq::new(name)?;
    ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, (&mut r as *mut IfReq).cast())?;
    r.value |= libc::IFF_UP;
    ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, (&mut r as *mut IfReq).cast())
}

/// The TAP bridge device.
#[derive(Debug)]
pub struct TapNet {
    core: NetCore,
    name: String,
    /// One TAP queue per pair.
    queues: Vec<OwnedFd>,
    created: bool,
}

impl TapNet {
    /// Attaches to TAP `name` (one queue per pair; IFF_MULTI_QUEUE with several pairs, so an
    /// existing TAP must have been created with `multi_queue` then), or creates it — brought
    /// up, with `options.mtu` — if it does not exist; a TAP this device created disappears
    /// with it.
    pub fn open(name: &str, options: NetOptions) -> io::Result<TapNet> {
        let core = NetCore::new(options);
        let pairs = core.queue_pairs();
        let exists = std::path::Path::new("/sys/class/net").join(name).exists();
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if pairs > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut queues = Vec::with_capacity(usize::from(pairs));
        for _ in 0..pairs {
            // SAFETY: open of a fixed path; the result is a new descriptor we own.
            let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: open returned a new descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut r = IfReq::new(name)?;
            r.value = libc::c_int::from(flags);
            ioctl(fd.as_raw_fd(), TUNSETIFF, (&mut r as *mut IfReq).cast()).map_err(|e| {
                io::Error::new(e.kind(), format!("TAP {name}: TUNSETIFF: {e} (an existing TAP must match multi_queue)"))
            })?;
            let mut size: libc::c_int = vnet::HDR_LEN as libc::c_int;
            ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, (&mut size as *mut libc::c_int).cast())?;
            queues.push(fd);
        }
        if !exists {
            configure_link(name, core.net_config_mtu())?;
        }
        let tap = TapNet { core, name: name.to_owned(), queues, created: !exists };
        // Nothing negotiated yet: no offloads towards the driver.
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// The TAP's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared net state.
    pub fn core(&self) -> &NetCore {
        &self.core
    }

    /// TUNSETOFFLOAD from the offloads the driver accepts on receive, so the kernel hands us
    /// only frames the driver can take.
    fn set_offloads(&self, acked: u64) -> io::Result<()> {
        let mut off: libc::c_uint = 0;
        if acked & feature::GUEST_CSUM != 0 {
            off |= TUN_F_CSUM;
            if acked & feature::GUEST_TSO4 != 0 {
                off |= TUN_F_TSO4;
            }
            if acked & feature::GUEST_TSO6 != 0 {
                off |= TUN_F_TSO6;
            }
            if acked & feature::GUEST_ECN != 0 && off & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                off |= TUN_F_TSO_ECN;
            }
        }
        let Some(fd) = self.queues.first() else { return Ok(()) };
        ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, off as usize as *mut libc::c_void)
    }

    /// TX chains of `pair`, each written to the pair's TAP queue with one writev.
    fn write_out(&self, pair: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        let header_len = self.core.header_len();
        let fd = self.queues[usize::from(pair)].as_raw_fd();
        let (mut frames, mut bytes, mut errors) = (0u64, 0u64, 0u64);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(8);
        for chain in batch.chains() {
            match check_tx(chain, header_len) {
                Ok(len) => {
                    iov.clear();
                    iov.extend(
                        batch
                            .readable(chain)
                            .iter()
                            .map(|s| libc::iovec { iov_base: s.host.cast(), iov_len: s.len as usize }),
                    );
                    // SAFETY: the iovecs describe device-readable guest buffers inside live
                    // mappings; the kernel copies them (a driver changing them meanwhile only
                    // changes what is sent).
                    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
                    if n < 0 {
                        errors += 1;
                    } else {
                        frames += 1;
                        bytes += len as u64;
                    }
                }
                Err(_) => errors += 1,
            }
            queue.complete(batch, chain, 0)?;
        }
        if let Some(c) = self.core.counters(pair) {
            c.count_tx(frames, bytes, errors);
        }
        Ok(())
    }

    /// Moves frames from the TAP into the RX ring; false when the ring ran out of buffers
    /// (stop watching the TAP until the driver adds some and kicks).
    fn receive(&self, pair: u16, rx: &mut RingHandle<'_>) -> Result<bool, VirtqueueError> {
        let header_len = self.core.header_len();
        let mrg = self.core.mrg_rxbuf();
        let fd = self.queues[usize::from(pair)].as_raw_fd();
        let (mut frames, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let result = FRAME.with(|buf| -> Result<bool, VirtqueueError> {
            let mut buf = buf.borrow_mut();
            for _ in 0..RX_BURST {
                if rx.kept().is_empty() && rx.refill(64) == 0 {
                    // Wait for buffers: re-arm the driver's kicks, unless some came meanwhile.
                    if !rx.arm()? || rx.refill(64) == 0 {
                        return Ok(false);
                    }
                }
                // SAFETY: reading into a buffer we own, of its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    // EAGAIN: drained. Anything else (the TAP was deleted): stop watching it
                    // until the next kick instead of spinning on its error.
                    return Ok(e.kind() == io::ErrorKind::WouldBlock);
                }
                let n = n as usize;
                if n < header_len {
                    continue;
                }
                let hdr = NetHeader::from_bytes(&buf[..header_len]);
                match deliver(rx, hdr, header_len, mrg, &[&buf[header_len..n]])? {
                    Delivery::Delivered => {
                        frames += 1;
                        bytes += (n - header_len) as u64;
                    }
                    Delivery::NoBuffers | Delivery::TooLarge => dropped += 1,
                }
            }
            Ok(true)
        });
        if let Some(c) = self.core.counters(pair) {
            c.count_rx(frames, bytes, dropped);
        }
        result
    }
}

impl NetCore {
    fn net_config_mtu(&self) -> Option<u16> {
        (self.features() & feature::MTU != 0).then(|| self.mtu())
    }
}

impl NetPort for TapNet {
    fn core(&self) -> &NetCore {
        &self.core
    }
    fn transmit(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        _others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        self.write_out(pair, queue, batch)
    }
    fn features_acked(&self, features: u64) {
        let size = vnet::header_len(features) as libc::c_int;
        for q in &self.queues {
            let mut s = size;
            let _ = ioctl(q.as_raw_fd(), TUNSETVNETHDRSZ, (&mut s as *mut libc::c_int).cast());
        }
        let _ = self.set_offloads(features);
    }
    fn device_request(&self, request: DeviceRequest) -> Result<(), String> {
        match request {
            DeviceRequest::SendRarp(mac) => {
                let header_len = self.core.header_len();
                let frame = vnet::rarp_frame(mac);
                let hdr = [0u8; vnet::HDR_LEN];
                let iov = [
                    libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: header_len },
                    libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() },
                ];
                let fd = self.queues.first().map(|q| q.as_raw_fd()).ok_or("no TAP queue")?;
                // SAFETY: two iovecs over local buffers.
                if unsafe { libc::writev(fd, iov.as_ptr(), 2) } < 0 {
                    return Err(format!("writing the RARP frame: {}", io::Error::last_os_error()));
                }
                Ok(())
            }
            DeviceRequest::NetSetMtu(_) => {
                self.core.set_mtu(request)?;
                if self.created {
                    configure_link(&self.name, Some(self.core.mtu())).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }
    fn rx_fds(&self, pair: u16) -> Vec<RawFd> {
        vec![self.queues[usize::from(pair)].as_raw_fd()]
    }
    fn rx_event(
        &self,
        pair: u16,
        _fd: RawFd,
        rx: &mut RingHandle<'_>,
        _others: &mut Rings<'_>,
    ) -> Result<bool, VirtqueueError> {
        self.receive(pair, rx)
    }
}
