//! Framing of the local control channel (see `proto/kvfabric/v1/local.proto`):
//! a 4-byte little-endian length, then a protobuf message; plus passing the
//! arena memfd as `SCM_RIGHTS` ancillary data with the welcome frame. Shared
//! by the node and the client; every decoder here bounds lengths before
//! allocating.

use crate::proto::MAX_LOCAL_FRAME_BYTES;
use prost::Message;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Encodes `msg` as one frame.
pub(crate) fn frame(msg: &impl Message) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut buf).expect("vec grows");
    buf
}

/// Writes one frame.
pub(crate) async fn write_msg(s: &mut UnixStream, msg: &impl Message) -> io::Result<()> {
    s.write_all(&frame(msg)).await
}

/// Checks a frame length prefix.
pub(crate) fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n > MAX_LOCAL_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes exceeds the {MAX_LOCAL_FRAME_BYTES}-byte limit"),
        ));
    }
    Ok(n)
}

/// Decodes a frame body.
pub(crate) fn decode<M: Message + Default>(body: &[u8]) -> io::Result<M> {
    M::decode(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable frame: {e}")))
}

/// Parses one frame from the front of `buf`: `Ok(None)` when `buf` holds
/// only part of a frame, else the message and the bytes it took. The length
/// is bounded before anything is allocated.
pub fn decode_frame<M: Message + Default>(buf: &[u8]) -> io::Result<Option<(M, usize)>> {
    let Some(prefix) = buf.get(..4) else { return Ok(None) };
    let n = frame_len(prefix.try_into().expect("4 bytes"))?;
    let Some(body) = buf.get(4..4 + n) else { return Ok(None) };
    Ok(Some((decode(body)?, 4 + n)))
}

/// Reads frames off a stream, keeping partial ones across calls, so `next`
/// is cancellation-safe (it can sit in a `select!` beside a timer without
/// losing bytes of a frame that was half read when the timer won).
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: bytes::BytesMut,
}

impl FrameReader {
    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub(crate) async fn next<M: Message + Default>(&mut self, s: &mut UnixStream) -> io::Result<Option<M>> {
        use bytes::Buf;
        loop {
            if let Some((m, used)) = decode_frame::<M>(&self.buf)? {
                self.buf.advance(used);
                return Ok(Some(m));
            }
            self.buf.reserve(64 << 10);
            if s.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-frame",
                    ))
                };
            }
        }
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
/// Not cancellation-safe: for a one-off read (the hello), else use
/// [`FrameReader`].
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) async fn read_msg<M: Message + Default>(s: &mut UnixStream) -> io::Result<Option<M>> {
    let mut prefix = [0u8; 4];
    match s.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = frame_len(prefix)?;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

const CMSG_SPACE: usize = 64;

/// Sends one frame with `fd` attached.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) async fn write_msg_with_fd(s: &UnixStream, msg: &impl Message, fd: BorrowedFd<'_>) -> io::Result<()> {
    let buf = frame(msg);
    let raw = fd.as_raw_fd();
    let mut sent = 0usize;
    // The fd rides on the first sendmsg; the rest of the frame (if the
    // socket buffer took only part) follows as plain writes.
    while sent == 0 {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || send_with_fd(s.as_raw_fd(), &buf, raw)) {
            Ok(n) => sent = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    while sent < buf.len() {
        s.writable().await?;
        match s.try_write(&buf[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
fn send_with_fd(sock: RawFd, buf: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut cmsg = [0u8; CMSG_SPACE];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr/cmsg set up per cmsg(3) over buffers that outlive the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &fd as *const RawFd as *const u8,
            libc::CMSG_DATA(c),
            std::mem::size_of::<RawFd>(),
        );
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Receives one frame that may carry an fd (the welcome carries the arena;
/// a refused hello is answered without one). Returns the frame body.
pub(crate) async fn read_frame_with_fd(s: &mut UnixStream) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut first = vec![0u8; 4096];
    let (n, fd) = loop {
        s.readable().await?;
        match s.try_io(Interest::READABLE, || recv_with_fd(s.as_raw_fd(), &mut first)) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed during the handshake",
        ));
    }
    let mut got = first[..n].to_vec();
    while got.len() < 4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        got.push(b[0]);
    }
    let len = frame_len([got[0], got[1], got[2], got[3]])?;
    if got.len() > 4 + len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "data after the welcome frame",
        ));
    }
    let mut body = got.split_off(4);
    let have = body.len();
    body.resize(len, 0);
    s.read_exact(&mut body[have..]).await?;
    Ok((body, fd))
}

fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg = [0u8; CMSG_SPACE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr/cmsg set up per cmsg(3); received fds are taken into
    // OwnedFd exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cmsg.len() as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fd = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let mut raw: RawFd = -1;
                    std::ptr::copy_nonoverlapping(
                        data.add(i * std::mem::size_of::<RawFd>()),
                        &mut raw as *mut RawFd as *mut u8,
                        std::mem::size_of::<RawFd>(),
                    );
                    let owned = OwnedFd::from_raw_fd(raw);
                    // Keep the first; close any extra a peer sent.
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{LocalRequest, LocalWelcome};

    #[tokio::test]
    async fn frame_reader_survives_cancellation_mid_frame() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let f = frame(&LocalRequest { id: 42, op: None });
        let mut r = FrameReader::default();
        // Half a frame arrives; a read that is cancelled keeps what it got.
        a.write_all(&f[..3]).await.unwrap();
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.next::<LocalRequest>(&mut b)).await;
        assert!(cancelled.is_err(), "no whole frame yet");
        a.write_all(&f[3..]).await.unwrap();
        let got: LocalRequest = r.next(&mut b).await.unwrap().unwrap();
        assert_eq!(got.id, 42);
        drop(a);
        assert!(r.next::<LocalRequest>(&mut b).await.unwrap().is_none());
    }

    #[test]
    fn oversized_length_prefix_is_refused() {
        assert!(frame_len(((MAX_LOCAL_FRAME_BYTES + 1) as u32).to_le_bytes()).is_err());
        assert_eq!(frame_len(16u32.to_le_bytes()).unwrap(), 16);
    }

    #[test]
    fn frames_parse_from_buffers() {
        let req = LocalRequest { id: 9, op: None };
        let f = frame(&req);
        assert_eq!(decode_frame::<LocalRequest>(&f).unwrap(), Some((req, f.len())));
        assert_eq!(decode_frame::<LocalRequest>(&f[..f.len() - 1]).unwrap(), None);
        assert_eq!(decode_frame::<LocalRequest>(&f[..2]).unwrap(), None);
        assert!(decode_frame::<LocalRequest>(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        for body in [&b"\xff\xff\xff"[..], b"\x0a\x05ab", b"\x08"] {
            let _ = decode::<LocalRequest>(body);
        }
    }

    #[tokio::test]
    async fn fd_travels_with_the_frame() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let w = LocalWelcome {
            version: 1,
            node_id: "n".into(),
            arena_bytes: 4096,
            reservation_ttl_ms: 1,
            lease_ttl_ms: 2,
        };
        write_msg_with_fd(&a, &w, file.as_fd()).await.unwrap();
        let (body, fd) = read_frame_with_fd(&mut b).await.unwrap();
        assert_eq!(decode::<LocalWelcome>(&body).unwrap(), w);
        assert!(fd.unwrap().as_raw_fd() >= 0);
    }
}
