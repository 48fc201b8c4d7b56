//! The handover socket's framing: messages with descriptors attached.
//!
//! A frame is a 12-byte head (JSON length, payload length, descriptor
//! count, little-endian u32s) sent with its descriptors (`SCM_RIGHTS`),
//! then the JSON message and the raw payload (a connection's carried
//! bytes). The head goes in its own `sendmsg`, so the descriptors arrive
//! with the head's first byte, and the receiver reads exactly the head
//! first. Blocking I/O on a Unix stream socket: each side runs it on a
//! thread of its own ([`Link`]).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

/// Descriptors one frame may carry (a connection's two sockets).
const MAX_FDS: usize = 4;
/// A message or payload larger than this is a broken peer, not a state.
const MAX_LEN: u32 = 64 << 20;
const HEAD: usize = 12;

/// One message, its payload and descriptors.
#[derive(Debug)]
pub struct Frame<M> {
    pub msg: M,
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl<M> Frame<M> {
    pub fn new(msg: M) -> Frame<M> {
        Frame {
            msg,
            data: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// Write one frame.
pub fn send<M: Serialize>(sock: &mut UnixStream, frame: &Frame<M>) -> io::Result<()> {
    let json = serde_json::to_vec(&frame.msg)?;
    assert!(
        frame.fds.len() <= MAX_FDS,
        "a frame carries at most {MAX_FDS} descriptors"
    );
    let mut head = [0u8; HEAD];
    head[0..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    head[4..8].copy_from_slice(&(frame.data.len() as u32).to_le_bytes());
    head[8..12].copy_from_slice(&(frame.fds.len() as u32).to_le_bytes());
    let fds: Vec<BorrowedFd<'_>> = frame.fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let sent = rustix::net::sendmsg(
        &*sock,
        &[IoSlice::new(&head)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest is plain.
    sock.write_all(&head[sent..])?;
    sock.write_all(&json)?;
    sock.write_all(&frame.data)?;
    Ok(())
}

/// Read one frame; `Ok(None)` when the peer closed between frames.
pub fn recv<M: DeserializeOwned>(sock: &mut UnixStream) -> io::Result<Option<Frame<M>>> {
    let mut head = [0u8; HEAD];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HEAD {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = rustix::net::recvmsg(
            &*sock,
            &mut [IoSliceMut::new(&mut head[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        if r.bytes == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
        got += r.bytes;
    }
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let (json_len, data_len, nfds) = (word(0), word(4), word(8));
    if json_len > MAX_LEN || data_len > MAX_LEN || nfds as usize != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bad frame: {json_len} + {data_len} bytes, {} of {nfds} descriptors",
                fds.len()
            ),
        ));
    }
    let mut json = vec![0; json_len as usize];
    sock.read_exact(&mut json)?;
    let mut data = vec![0; data_len as usize];
    sock.read_exact(&mut data)?;
    let msg = serde_json::from_slice(&json)?;
    Ok(Some(Frame { msg, data, fds }))
}

/// Both directions of a handover socket, each on a thread of its own, so
/// the async side never blocks on the peer: frames to send go into `tx`,
/// frames received come out of `rx` (which ends when the peer closes or
/// the socket fails).
pub struct Link<Out, In> {
    pub tx: mpsc::UnboundedSender<Frame<Out>>,
    pub rx: mpsc::UnboundedReceiver<io::Result<Frame<In>>>,
}

impl<Out, In> Link<Out, In>
where
    Out: Serialize + Send + 'static,
    In: DeserializeOwned + Send + 'static,
{
    pub fn new(sock: UnixStream) -> io::Result<Link<Out, In>> {
        let mut reader = sock.try_clone()?;
        let mut writer = sock;
        let (tx, mut outgoing) = mpsc::unbounded_channel::<Frame<Out>>();
        let (incoming, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("upgrade-send".into())
            .spawn(move || {
                while let Some(frame) = outgoing.blocking_recv() {
                    if send(&mut writer, &frame).is_err() {
                        break;
                    }
                }
                // Everything queued is out: tell the peer no more comes.
                let _ = writer.shutdown(std::net::Shutdown::Write);
            })?;
        std::thread::Builder::new()
            .name("upgrade-recv".into())
            .spawn(move || {
                loop {
                    match recv(&mut reader) {
                        Ok(Some(frame)) => {
                            if incoming.send(Ok(frame)).is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = incoming.send(Err(e));
                            break;
                        }
                    }
                }
            })?;
        Ok(Link { tx, rx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn frames_carry_messages_payloads_and_descriptors_in_order() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (p, _q) = UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sender = std::thread::spawn(move || {
            for i in 0..3u32 {
                let frame = Frame {
                    msg: format!("m{i}"),
                    data: payload.clone(),
                    fds: (0..i)
                        .map(|_| p.as_fd().try_clone_to_owned().unwrap())
                        .collect(),
                };
                send(&mut a, &frame).unwrap();
            }
            payload
        });
        let mut got = Vec::new();
        while let Some(f) = recv::<String>(&mut b).unwrap() {
            got.push(f);
        }
        let payload = sender.join().unwrap();
        assert_eq!(got.len(), 3);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f.msg, format!("m{i}"));
            assert_eq!(f.data, payload);
            assert_eq!(f.fds.len(), i);
            assert!(f.fds.iter().all(|fd| fd.as_raw_fd() >= 0));
        }
    }
}
