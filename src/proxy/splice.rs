//! Moving bulk bytes between two sockets without copying them through user
//! space: `splice(2)` from the source socket into a pipe, and from the pipe
//! into the destination socket. The kernel moves page references; the
//! relay only counts.
//!
//! Pipes come from a per-thread pool and are held only while bytes are in
//! them, like the copy path's buffers: an idle connection holds none. A
//! pipe that still holds bytes is never given back (those bytes belong to
//! its connection); an emptied one is.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a pipe is asked to hold: one splice moves at most a pipe's worth,
/// and on loopback 512 KiB moves a bulk stream at 0.85–0.95 × a direct
/// connection where Linux's default 64 KiB (and the copy path) manage
/// about 0.55. The kernel may grant less (a user over
/// `pipe-user-pages-soft`); such a pipe just moves less per splice.
pub const PIPE_BYTES: usize = 512 * 1024;

/// Pipes kept per worker thread between uses.
const POOL_KEEP: usize = 16;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe's two ends.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded; each descriptor is ours alone, and the
        // fcntl only sizes it (best effort: a smaller pipe moves less per
        // splice, nothing else).
        unsafe {
            libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int);
            Ok(Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            })
        }
    }

    /// Give an empty pipe back to this thread's pool.
    pub fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_KEEP {
                p.push(self);
            }
        });
    }

    /// Move what fits from socket `src` into the (empty) pipe. `Ok(0)` is
    /// the end of `src`'s stream.
    pub fn fill_from(&self, src: RawFd) -> io::Result<usize> {
        splice(src, self.write.as_raw_fd(), PIPE_BYTES)
    }

    /// Read the `len` bytes the pipe holds into memory (a live upgrade
    /// carries them to the new process). The pipe is not reused after.
    pub fn read_out(self, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0; len];
        let mut at = 0;
        while at < len {
            match rustix::io::read(&self.read, &mut out[at..])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => at += n,
            }
        }
        Ok(out)
    }

    /// Move up to `len` bytes from the pipe into socket `dst`.
    pub fn drain_into(&self, dst: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), dst, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (both are sockets or pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
