//! Receiving many datagrams in one system call (`recvmmsg`).
//!
//! A busy udp listener has many datagrams queued at once; reading them one
//! `recvfrom` at a time costs a system call each. [`Batch`] takes up to
//! [`BATCH`] per call into fixed buffers, each large enough for the largest
//! UDP payload, so no datagram is cut and nothing is allocated per
//! datagram. The buffers are one zeroed allocation, which the kernel backs
//! with pages only where datagrams were written: DNS-sized traffic costs a
//! page per slot, not 64 KiB.
//!
//! Not quinn-udp: it is built for QUIC and turns on GRO (coalesced
//! datagrams, which need buffers 64 times larger) and the don't-fragment
//! bit, which would make large DNS answers fail on real networks.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams taken per call at most.
pub const BATCH: usize = 16;

/// Room for the largest UDP payload over IPv4 (65 507 bytes) and IPv6
/// without jumbograms (65 527), rounded to 64 KiB.
pub const SLOT: usize = 64 * 1024;

/// Buffers for one batch, and what the last call put in them.
pub struct Batch {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    peers: [SocketAddr; BATCH],
    truncated: [bool; BATCH],
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            buf: vec![0; BATCH * SLOT].into_boxed_slice(),
            lens: [0; BATCH],
            peers: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            truncated: [false; BATCH],
        }
    }
}

impl Batch {
    /// Take the datagrams queued on `socket` now (at least one, at most
    /// [`BATCH`]); `WouldBlock` when none is.
    ///
    /// Fewer than [`BATCH`] means the queue is empty now, so readiness is
    /// cleared right there instead of paying one more call just to hear
    /// EAGAIN (for request/response traffic, half the receive calls). The
    /// clear goes through `try_io`, which keeps the readiness if a new
    /// datagram was signalled meanwhile, so no wake-up is lost.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut drained = None;
        let result = socket.try_io(Interest::READABLE, || {
            let n = self.recvmmsg(socket.as_raw_fd())?;
            if n < BATCH {
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (result, drained) {
            (Ok(n), _) | (Err(_), Some(n)) => Ok(n),
            (Err(e), None) => Err(e),
        }
    }

    /// Datagram `i` of the last call: its sender and payload, or `None`
    /// for one too large for a slot (never, for UDP over IPv4 or IPv6).
    pub fn get(&self, i: usize) -> (SocketAddr, Option<&[u8]>) {
        let start = i * SLOT;
        let data = (!self.truncated[i]).then(|| &self.buf[start..start + self.lens[i]]);
        (self.peers[i], data)
    }

    fn recvmmsg(&mut self, fd: i32) -> io::Result<usize> {
        // SAFETY: every pointer handed to the kernel points into locals or
        // `self.buf` that outlive the call; iovec `i` covers slot `i` only.
        unsafe {
            let mut names: [MaybeUninit<libc::sockaddr_storage>; BATCH] =
                [const { MaybeUninit::zeroed() }; BATCH];
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            let base = self.buf.as_mut_ptr();
            for i in 0..BATCH {
                iovs[i] = libc::iovec {
                    iov_base: base.add(i * SLOT).cast(),
                    iov_len: SLOT,
                };
                let h = &mut hdrs[i].msg_hdr;
                h.msg_name = names[i].as_mut_ptr().cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for i in 0..n {
                self.lens[i] = hdrs[i].msg_len as usize;
                self.truncated[i] = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                self.peers[i] = to_socket_addr(names[i].assume_init_ref());
            }
            Ok(n)
        }
    }
}

/// A sender's address as the kernel wrote it.
fn to_socket_addr(name: &libc::sockaddr_storage) -> SocketAddr {
    match i32::from(name.ss_family) {
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6, which fits.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))
        }
        _ => {
            // SAFETY: a UDP socket's senders are AF_INET or AF_INET6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_every_queued_datagram_whole_with_its_sender() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("[::1]:0").await.unwrap();
        let big = vec![7u8; 65_507];
        a.send_to(b"one", to).await.unwrap();
        a.send_to(&big, to).await.unwrap();
        a.send_to(b"", to).await.unwrap();
        let mut batch = Batch::default();
        let mut got = Vec::new();
        while got.len() < 3 {
            rx.readable().await.unwrap();
            if let Ok(n) = batch.recv(&rx) {
                for i in 0..n {
                    let (peer, data) = batch.get(i);
                    got.push((peer, data.unwrap().to_vec()));
                }
            }
        }
        let from = a.local_addr().unwrap();
        assert_eq!(got[0], (from, b"one".to_vec()));
        assert_eq!(got[1], (from, big));
        assert_eq!(got[2], (from, Vec::new()));
        assert!(matches!(batch.recv(&rx), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        // An IPv6 sender reads back as itself.
        let rx6 = UdpSocket::bind("[::1]:0").await.unwrap();
        b.send_to(b"six", rx6.local_addr().unwrap()).await.unwrap();
        loop {
            rx6.readable().await.unwrap();
            if let Ok(1) = batch.recv(&rx6) {
                break;
            }
        }
        assert_eq!(batch.get(0), (b.local_addr().unwrap(), Some(&b"six"[..])));
    }
}
