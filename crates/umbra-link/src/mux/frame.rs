//! The multiplexer's wire format: fixed 12-byte frame headers, a payload only on DATA.
//!
//! ```text
//! 0       1       2       3       4               8               12
//! | kind  | flags | ver/0 |   0   | stream (u32)  | value (u32)   | payload (DATA: value bytes)
//! ```
//!
//! All integers are big-endian. `value` is the payload length of DATA, the credit of CREDIT,
//! the code of RESET and GOAWAY, the opaque number of PING and PONG, and the sender's stream
//! window in HELLO (whose `stream` field carries the most streams the sender accepts at once,
//! and byte 2 the version). Everything is checked from the header alone, before any payload
//! is read, so a bad peer costs at most one header of buffering.

use bytes::{Buf, Bytes, BytesMut};

/// Bytes in a frame header.
pub(crate) const HEADER_LEN: usize = 12;
/// Largest DATA payload: one relay chunk.
pub(crate) const MAX_DATA: u32 = 64 * 1024;
/// The one version of this format.
pub(crate) const VERSION: u8 = 1;
/// Smallest and largest stream window a HELLO may announce (as `LinkConfig` accepts).
pub(crate) const MIN_WINDOW: u32 = 16 * 1024;
pub(crate) const MAX_WINDOW: u32 = 16 * 1024 * 1024;

const DATA: u8 = 0;
const CREDIT: u8 = 1;
const RESET: u8 = 2;
const PING: u8 = 3;
const PONG: u8 = 4;
const GOAWAY: u8 = 5;
const HELLO: u8 = 6;

const OPEN: u8 = 0x1;
const FIN: u8 = 0x2;

/// One frame header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// First frame on a link, each way: the sender's stream window and how many streams it
    /// accepts at once (0 on the side that opens them).
    Hello {
        window: u32,
        max_streams: u32,
    },
    /// `len` bytes of a stream. `open` announces the stream (the opener's first frame for it),
    /// `fin` ends the sender's half. At least one of `len`, `open`, `fin` is non-zero.
    Data {
        stream: u32,
        open: bool,
        fin: bool,
        len: u32,
    },
    /// The receiver of `stream` read `bytes` more: the sender may send that much more.
    Credit {
        stream: u32,
        bytes: u32,
    },
    /// Abort `stream` both ways with `code`.
    Reset {
        stream: u32,
        code: u32,
    },
    Ping {
        opaque: u32,
    },
    Pong {
        opaque: u32,
    },
    /// The sender closes the link, for the reason `code` (a [`crate::Refusal`] code, or one
    /// of [`super::code`]).
    GoAway {
        code: u32,
    },
}

/// Why a header was refused. Each is the peer breaking the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MuxFrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown flags {flags:#x} on frame kind {kind}")]
    Flags { kind: u8, flags: u8 },
    #[error("reserved header bits set")]
    Reserved,
    #[error("stream 0 on a stream frame, or a stream on a link frame")]
    StreamField,
    #[error("DATA of {0} bytes (at most 65536)")]
    TooLong(u32),
    #[error("empty frame")]
    Empty,
    #[error("unsupported multiplexer version {0}")]
    Version(u8),
    #[error("stream window {0} out of range")]
    Window(u32),
}

impl Header {
    /// Checks and decodes one header.
    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, MuxFrameError> {
        let [kind, flags, ver, reserved, s0, s1, s2, s3, v0, v1, v2, v3] = *b;
        let stream = u32::from_be_bytes([s0, s1, s2, s3]);
        let value = u32::from_be_bytes([v0, v1, v2, v3]);
        if reserved != 0 || (ver != 0 && kind != HELLO) {
            return Err(MuxFrameError::Reserved);
        }
        let allowed = if kind == DATA { OPEN | FIN } else { 0 };
        if flags & !allowed != 0 {
            return Err(MuxFrameError::Flags { kind, flags });
        }
        let on_stream = matches!(kind, DATA | CREDIT | RESET);
        if on_stream && stream == 0 || matches!(kind, PING | PONG | GOAWAY) && stream != 0 {
            return Err(MuxFrameError::StreamField);
        }
        Ok(match kind {
            DATA => {
                if value > MAX_DATA {
                    return Err(MuxFrameError::TooLong(value));
                }
                if value == 0 && flags == 0 {
                    return Err(MuxFrameError::Empty);
                }
                Header::Data {
                    stream,
                    open: flags & OPEN != 0,
                    fin: flags & FIN != 0,
                    len: value,
                }
            }
            CREDIT if value == 0 => return Err(MuxFrameError::Empty),
            CREDIT => Header::Credit {
                stream,
                bytes: value,
            },
            RESET => Header::Reset {
                stream,
                code: value,
            },
            PING => Header::Ping { opaque: value },
            PONG => Header::Pong { opaque: value },
            GOAWAY => Header::GoAway { code: value },
            HELLO => {
                if ver != VERSION {
                    return Err(MuxFrameError::Version(ver));
                }
                if !(MIN_WINDOW..=MAX_WINDOW).contains(&value) {
                    return Err(MuxFrameError::Window(value));
                }
                Header::Hello {
                    window: value,
                    max_streams: stream,
                }
            }
            other => return Err(MuxFrameError::UnknownKind(other)),
        })
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let (kind, flags, ver, stream, value) = match *self {
            Header::Hello {
                window,
                max_streams,
            } => (HELLO, 0, VERSION, max_streams, window),
            Header::Data {
                stream,
                open,
                fin,
                len,
            } => {
                let flags = if open { OPEN } else { 0 } | if fin { FIN } else { 0 };
                (DATA, flags, 0, stream, len)
            }
            Header::Credit { stream, bytes } => (CREDIT, 0, 0, stream, bytes),
            Header::Reset { stream, code } => (RESET, 0, 0, stream, code),
            Header::Ping { opaque } => (PING, 0, 0, 0, opaque),
            Header::Pong { opaque } => (PONG, 0, 0, 0, opaque),
            Header::GoAway { code } => (GOAWAY, 0, 0, 0, code),
        };
        let [s0, s1, s2, s3] = stream.to_be_bytes();
        let [v0, v1, v2, v3] = value.to_be_bytes();
        [kind, flags, ver, 0, s0, s1, s2, s3, v0, v1, v2, v3]
    }

    /// Payload bytes that follow this header.
    fn payload_len(&self) -> usize {
        match *self {
            Header::Data { len, .. } => len as usize,
            _ => 0,
        }
    }
}

/// Takes the next whole frame off the front of `buf`: `Ok(None)` until it has arrived. A bad
/// header is an error as soon as its 12 bytes are in, whatever follows. The payload is a
/// slice of `buf`'s memory, not a copy.
pub(crate) fn next_frame(buf: &mut BytesMut) -> Result<Option<(Header, Bytes)>, MuxFrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = Header::decode(head)?;
    let len = h.payload_len();
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = if len == 0 {
        Bytes::new()
    } else {
        buf.split_to(len).freeze()
    };
    Ok(Some((h, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Header> {
        vec![
            Header::Hello {
                window: MIN_WINDOW,
                max_streams: 0,
            },
            Header::Hello {
                window: MAX_WINDOW,
                max_streams: u32::MAX,
            },
            Header::Data {
                stream: 1,
                open: true,
                fin: false,
                len: 0,
            },
            Header::Data {
                stream: u32::MAX,
                open: false,
                fin: true,
                len: MAX_DATA,
            },
            Header::Data {
                stream: 7,
                open: true,
                fin: true,
                len: 3,
            },
            Header::Credit {
                stream: 2,
                bytes: u32::MAX,
            },
            Header::Reset { stream: 3, code: 0 },
            Header::Ping { opaque: 9 },
            Header::Pong { opaque: 9 },
            Header::GoAway { code: 0x554d_0001 },
        ]
    }

    #[test]
    fn every_header_round_trips() {
        for h in all() {
            assert_eq!(Header::decode(&h.encode()), Ok(h), "{h:?}");
        }
    }

    #[test]
    fn bad_headers_are_refused_by_name() {
        let data = Header::Data {
            stream: 1,
            open: false,
            fin: false,
            len: 5,
        }
        .encode();
        let with = |i: usize, v: u8| {
            let mut b = data;
            b[i] = v;
            b
        };
        assert_eq!(
            Header::decode(&with(0, 7)),
            Err(MuxFrameError::UnknownKind(7))
        );
        assert_eq!(
            Header::decode(&with(1, 4)),
            Err(MuxFrameError::Flags { kind: 0, flags: 4 })
        );
        assert_eq!(Header::decode(&with(2, 1)), Err(MuxFrameError::Reserved));
        assert_eq!(Header::decode(&with(3, 1)), Err(MuxFrameError::Reserved));
        let mut zero_stream = data;
        zero_stream[4..8].fill(0);
        assert_eq!(
            Header::decode(&zero_stream),
            Err(MuxFrameError::StreamField)
        );
        let mut long = data;
        long[8..12].copy_from_slice(&(MAX_DATA + 1).to_be_bytes());
        assert_eq!(
            Header::decode(&long),
            Err(MuxFrameError::TooLong(MAX_DATA + 1))
        );
        let mut empty = data;
        empty[8..12].fill(0);
        assert_eq!(Header::decode(&empty), Err(MuxFrameError::Empty));
        let zero_credit = Header::Credit {
            stream: 1,
            bytes: 1,
        }
        .encode();
        let mut z = zero_credit;
        z[8..12].fill(0);
        assert_eq!(Header::decode(&z), Err(MuxFrameError::Empty));
        // Flags only on DATA; link frames name no stream.
        let mut ping = Header::Ping { opaque: 1 }.encode();
        ping[1] = OPEN;
        assert!(matches!(
            Header::decode(&ping),
            Err(MuxFrameError::Flags { .. })
        ));
        let mut ping = Header::Ping { opaque: 1 }.encode();
        ping[7] = 1;
        assert_eq!(Header::decode(&ping), Err(MuxFrameError::StreamField));
        // HELLO: the version and a window in range.
        let hello = Header::Hello {
            window: MIN_WINDOW,
            max_streams: 1,
        }
        .encode();
        let mut v2 = hello;
        v2[2] = 2;
        assert_eq!(Header::decode(&v2), Err(MuxFrameError::Version(2)));
        for w in [0, MIN_WINDOW - 1, MAX_WINDOW + 1, u32::MAX] {
            let mut b = hello;
            b[8..12].copy_from_slice(&w.to_be_bytes());
            assert_eq!(Header::decode(&b), Err(MuxFrameError::Window(w)));
        }
    }

    #[test]
    fn frames_are_taken_whole_and_bad_ones_early() {
        let mut buf = BytesMut::new();
        let h = Header::Data {
            stream: 1,
            open: true,
            fin: false,
            len: 3,
        };
        buf.extend_from_slice(&h.encode());
        buf.extend_from_slice(b"ab");
        assert_eq!(next_frame(&mut buf), Ok(None), "payload not complete");
        buf.extend_from_slice(b"c");
        buf.extend_from_slice(&Header::Ping { opaque: 4 }.encode()[..5]);
        let (got, payload) = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!((got, &payload[..]), (h, &b"abc"[..]));
        assert_eq!(next_frame(&mut buf), Ok(None), "half a header");
        buf.extend_from_slice(&Header::Ping { opaque: 4 }.encode()[5..]);
        assert_eq!(
            next_frame(&mut buf),
            Ok(Some((Header::Ping { opaque: 4 }, Bytes::new())))
        );
        assert!(buf.is_empty());
        // A header announcing too much is refused before any of its payload.
        let mut long = Header::Data {
            stream: 1,
            open: false,
            fin: false,
            len: 1,
        }
        .encode();
        long[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        buf.extend_from_slice(&long);
        assert_eq!(next_frame(&mut buf), Err(MuxFrameError::TooLong(u32::MAX)));
    }
}
