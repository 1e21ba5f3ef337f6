//! The QUIC floor with one task per relay: quinn-proto's state machines (the same ones quinn
//! drives) driven by a single loop that owns the UDP socket, every connection and every TCP
//! socket of its process. quinn runs an endpoint task, a task per connection and the
//! application's tasks, so each packet crosses two or three task hand-offs per relay; here a
//! packet is read, decrypted, relayed, encrypted and sent in one poll.
//!
//! It answers one question for the benchmark: how close to socat can a QUIC relay chain get
//! once quinn's task structure is out of the way? Same shape as the other floors: one QUIC
//! connection (one bidirectional stream) per client connection, mutual TLS with Umbra's
//! configurations, quinn's default transport settings. The UDP socket is quinn-udp's, watched
//! for reads only (as Umbra's `quic_socket.rs` does), one datagram per send.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use quinn::{ClientConfig, Dir, EndpointConfig, ServerConfig, StreamId, VarInt};
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Endpoint, Event, StreamEvent, WriteError,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};

use crate::Error;

/// Which relay of the chain this process is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// TCP in, QUIC out.
    Entry,
    /// QUIC in, QUIC out.
    Mid,
    /// QUIC in, TCP out.
    Exit,
}

/// One side of a flow.
enum End {
    Tcp(TcpStream),
    Quic {
        ch: ConnectionHandle,
        /// Set once the stream is opened (dialing side) or accepted (listening side).
        sid: Option<StreamId>,
    },
}

/// Two ends and the bytes in transit between them: `pending[i]` was read from `ends[i]` and
/// not yet taken by the other end.
struct Flow {
    ends: [End; 2],
    pending: [Option<Bytes>; 2],
    /// End `i` has ended its input, and that end was passed on.
    eof: [bool; 2],
}

struct Relay {
    role: Role,
    next: SocketAddr,
    name: String,
    client: ClientConfig,
    endpoint: Endpoint,
    udp: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    meta: [RecvMeta; BATCH_SIZE],
    /// Datagrams received into `scratch` and `meta`, not yet processed.
    got: usize,
    conns: HashMap<ConnectionHandle, Connection>,
    /// Which flow, and which of its ends, a connection is.
    owner: HashMap<ConnectionHandle, (usize, usize)>,
    flows: Vec<Option<Flow>>,
    scratch: Vec<u8>,
    tx: Vec<u8>,
}

pub(crate) async fn run(
    role: Role,
    listen: SocketAddr,
    next: SocketAddr,
    server: ServerConfig,
    client: ClientConfig,
    name: String,
) -> Result<(), Error> {
    let (udp_addr, tcp) = match role {
        Role::Entry => (
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(TcpListener::bind(listen).await?),
        ),
        Role::Mid | Role::Exit => (listen, None),
    };
    let server = (role != Role::Entry).then(|| Arc::new(server));
    let socket = std::net::UdpSocket::bind(udp_addr)?;
    socket.set_nonblocking(true)?;
    let state = UdpSocketState::new((&socket).into())?;
    // Deprecated as unsound for types that could hand out another descriptor later; a
    // `std::net::UdpSocket` owns its descriptor for life (as in Umbra's `quic_socket.rs`).
    #[allow(deprecated)]
    let udp = AsyncFd::with_interest(socket, Interest::READABLE)?;
    let mut r = Relay {
        role,
        next,
        name,
        client,
        endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
        udp,
        state,
        meta: [RecvMeta::default(); BATCH_SIZE],
        got: 0,
        conns: HashMap::new(),
        owner: HashMap::new(),
        flows: Vec::new(),
        scratch: vec![0; 64 * 1024 * BATCH_SIZE],
        tx: Vec::with_capacity(64 * 1024),
    };
    let mut timer = pin!(tokio::time::sleep(Duration::from_secs(3600)));
    loop {
        let now = Instant::now();
        r.receive(now)?;
        for c in r.conns.values_mut() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        // Events and data until nothing moves (a relayed chunk can free a window, and so on).
        for _ in 0..8 {
            let mut moved = r.events(now);
            for i in 0..r.flows.len() {
                moved |= r.pump(i, 0) | r.pump(i, 1);
            }
            if !moved {
                break;
            }
        }
        r.transmit(now);
        let deadline = r.conns.values_mut().filter_map(|c| c.poll_timeout()).min();
        let deadline = deadline.unwrap_or(now + Duration::from_secs(3600));
        timer.as_mut().reset(deadline.into());
        // Wait for a datagram, a client, a TCP socket that has input for a stream with room,
        // or the next timer.
        let accepted = poll_fn(|cx| {
            let mut ready = false;
            match r.poll_recv(cx) {
                Poll::Ready(Ok(n)) => {
                    r.got = n;
                    ready = true;
                }
                Poll::Ready(Err(e)) => {
                    // An ICMP error reported on the socket, say: QUIC recovers or times out.
                    eprintln!("relay_floor: UDP receive: {e}");
                    ready = true;
                }
                Poll::Pending => {}
            }
            if let Some(l) = &tcp
                && let Poll::Ready(a) = l.poll_accept(cx)
            {
                return Poll::Ready(Some(a));
            }
            for f in r.flows.iter().flatten() {
                for (i, end) in f.ends.iter().enumerate() {
                    if let End::Tcp(s) = end {
                        if f.pending[i].is_none() && !f.eof[i] {
                            ready |= s.poll_read_ready(cx).is_ready();
                        }
                        if f.pending[1 - i].is_some() {
                            ready |= s.poll_write_ready(cx).is_ready();
                        }
                    }
                }
            }
            ready |= timer.as_mut().poll(cx).is_ready();
            if ready {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Some(a) = accepted {
            let (s, _) = a?;
            s.set_nodelay(true)?;
            let ch = r.dial(Instant::now())?;
            r.add_flow([End::Tcp(s), End::Quic { ch, sid: None }]);
        }
    }
}

impl Relay {
    fn add_flow(&mut self, ends: [End; 2]) {
        let i = self.flows.len();
        for (e, end) in ends.iter().enumerate() {
            if let End::Quic { ch, .. } = end {
                self.owner.insert(*ch, (i, e));
            }
        }
        self.flows.push(Some(Flow {
            ends,
            pending: [None, None],
            eof: [false, false],
        }));
    }

    fn dial(&mut self, now: Instant) -> Result<ConnectionHandle, Error> {
        let (ch, c) = self
            .endpoint
            .connect(now, self.client.clone(), self.next, &self.name)?;
        self.conns.insert(ch, c);
        Ok(ch)
    }

    fn send(&self, t: &quinn::Transmit, buf: &[u8]) {
        send(&self.udp, &self.state, t, buf);
    }

    /// Receives a batch of datagrams into `scratch` and `meta`. Readiness is cleared with the
    /// guard taken before the receive, so a datagram arriving meanwhile is not missed.
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let mut g = std::task::ready!(self.udp.poll_read_ready(cx))?;
            let mut bufs: Vec<IoSliceMut<'_>> = self
                .scratch
                .chunks_mut(64 * 1024)
                .map(IoSliceMut::new)
                .collect();
            match self
                .state
                .recv(self.udp.get_ref().into(), &mut bufs, &mut self.meta)
            {
                Ok(n) => {
                    if n < BATCH_SIZE {
                        // Fewer than asked for: the queue is empty, no need to hear EAGAIN.
                        g.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => g.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The datagrams `poll_recv` got, into the endpoint and its connections.
    fn receive(&mut self, now: Instant) -> Result<(), Error> {
        let n = std::mem::take(&mut self.got);
        let got: Vec<(SocketAddr, BytesMut)> = self
            .scratch
            .chunks(64 * 1024)
            .zip(&self.meta[..n])
            .flat_map(|(b, m)| {
                b[..m.len]
                    .chunks(m.stride.max(1))
                    .map(|d| (m.addr, BytesMut::from(d)))
            })
            .collect();
        for (from, data) in got {
            self.datagram(now, from, data)?;
        }
        Ok(())
    }

    fn datagram(&mut self, now: Instant, from: SocketAddr, data: BytesMut) -> Result<(), Error> {
        self.tx.clear();
        match self
            .endpoint
            .handle(now, from, None, None, data, &mut self.tx)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.handle_event(ev);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                match self.endpoint.accept(incoming, now, &mut self.tx, None) {
                    Ok((ch, c)) => {
                        self.conns.insert(ch, c);
                        let other = match self.role {
                            Role::Mid => End::Quic {
                                ch: self.dial(now)?,
                                sid: None,
                            },
                            _ => {
                                // Blocking, in the loop: the app is on loopback.
                                let s = std::net::TcpStream::connect(self.next)?;
                                s.set_nodelay(true)?;
                                s.set_nonblocking(true)?;
                                End::Tcp(TcpStream::from_std(s)?)
                            }
                        };
                        self.add_flow([End::Quic { ch, sid: None }, other]);
                    }
                    Err(e) => {
                        if let Some(t) = e.response {
                            self.send(&t, &self.tx);
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => self.send(&t, &self.tx),
            None => {}
        }
        Ok(())
    }

    /// Endpoint and application events of every connection. Whether any arrived.
    fn events(&mut self, now: Instant) -> bool {
        let mut any = false;
        let mut lost = Vec::new();
        let mut drained = Vec::new();
        for (&ch, c) in &mut self.conns {
            while let Some(ev) = c.poll_endpoint_events() {
                if ev.is_drained() {
                    drained.push(ch);
                }
                if let Some(back) = self.endpoint.handle_event(ch, ev) {
                    c.handle_event(back);
                }
            }
            let Some(&(fi, e)) = self.owner.get(&ch) else {
                continue;
            };
            while let Some(ev) = c.poll() {
                any = true;
                let sid = match ev {
                    // The dialing side opens the flow's stream once connected.
                    Event::Connected if c.side().is_client() => c.streams().open(Dir::Bi),
                    Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                        c.streams().accept(Dir::Bi)
                    }
                    Event::ConnectionLost { .. } => {
                        lost.push(fi);
                        None
                    }
                    _ => None,
                };
                if let (Some(id), Some(Some(f))) = (sid, self.flows.get_mut(fi))
                    && let End::Quic { sid, .. } = &mut f.ends[e]
                {
                    *sid = Some(id);
                }
            }
        }
        for ch in drained {
            self.conns.remove(&ch);
            self.owner.remove(&ch);
        }
        for fi in lost {
            self.end_flow(fi, now);
        }
        any
    }

    /// Closes both ends of a flow: TCP sockets are dropped, connections closed (and removed
    /// once drained).
    fn end_flow(&mut self, fi: usize, now: Instant) {
        let Some(f) = self.flows.get_mut(fi).and_then(Option::take) else {
            return;
        };
        for end in f.ends {
            if let End::Quic { ch, .. } = end {
                self.owner.remove(&ch);
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.close(now, VarInt::from_u32(0), Bytes::new());
                }
            }
        }
    }

    /// Moves what end `from` of flow `fi` has to its other end. Whether anything moved.
    fn pump(&mut self, fi: usize, from: usize) -> bool {
        let to = 1 - from;
        let Some(Some(f)) = self.flows.get_mut(fi) else {
            return false;
        };
        let mut moved = false;
        loop {
            if let Some(mut p) = f.pending[from].take() {
                let n = write(&mut self.conns, &f.ends[to], &p);
                moved |= n > 0;
                if n < p.len() {
                    f.pending[from] = Some(p.split_off(n));
                    return moved;
                }
            }
            if f.eof[from] {
                return moved;
            }
            match read(&mut self.conns, &f.ends[from], &mut self.scratch) {
                Read::Data(b) => {
                    moved = true;
                    f.pending[from] = Some(b);
                }
                Read::Nothing => return moved,
                Read::End => {
                    f.eof[from] = true;
                    finish(&mut self.conns, &f.ends[to]);
                    return true;
                }
            }
        }
    }

    /// Every connection's datagrams, one per syscall.
    fn transmit(&mut self, now: Instant) {
        for c in self.conns.values_mut() {
            loop {
                self.tx.clear();
                let Some(t) = c.poll_transmit(now, 1, &mut self.tx) else {
                    break;
                };
                send(&self.udp, &self.state, &t, &self.tx);
            }
        }
    }
}

fn send(
    udp: &AsyncFd<std::net::UdpSocket>,
    state: &UdpSocketState,
    t: &quinn::Transmit,
    buf: &[u8],
) {
    let t = quinn::udp::Transmit {
        destination: t.destination,
        ecn: None,
        contents: &buf[..t.size],
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    };
    // A datagram the kernel cannot take now is a loss QUIC recovers from.
    let _ = state.send(udp.get_ref().into(), &t);
}

enum Read {
    Data(Bytes),
    Nothing,
    End,
}

fn read(conns: &mut HashMap<ConnectionHandle, Connection>, end: &End, scratch: &mut [u8]) -> Read {
    match end {
        End::Tcp(s) => match s.try_read(scratch) {
            Ok(0) => Read::End,
            Ok(n) => Read::Data(Bytes::copy_from_slice(&scratch[..n])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::Nothing,
            Err(_) => Read::End,
        },
        End::Quic { ch, sid: Some(id) } => {
            let Some(c) = conns.get_mut(ch) else {
                return Read::End;
            };
            let mut rs = c.recv_stream(*id);
            let Ok(mut chunks) = rs.read(true) else {
                return Read::End;
            };
            let r = match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => Read::Data(chunk.bytes),
                Ok(None) => Read::End,
                Err(quinn_proto::ReadError::Blocked) => Read::Nothing,
                Err(_) => Read::End,
            };
            let _ = chunks.finalize();
            r
        }
        End::Quic { sid: None, .. } => Read::Nothing,
    }
}

fn write(conns: &mut HashMap<ConnectionHandle, Connection>, end: &End, b: &Bytes) -> usize {
    match end {
        End::Tcp(s) => s.try_write(b).unwrap_or(0),
        End::Quic { ch, sid: Some(id) } => match conns.get_mut(ch) {
            Some(c) => match c.send_stream(*id).write(b) {
                Ok(n) => n,
                Err(WriteError::Blocked) => 0,
                // The stream is gone; drop what it would have carried.
                Err(_) => b.len(),
            },
            None => b.len(),
        },
        End::Quic { sid: None, .. } => 0,
    }
}

fn finish(conns: &mut HashMap<ConnectionHandle, Connection>, end: &End) {
    match end {
        End::Tcp(s) => {
            let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
        }
        End::Quic { ch, sid: Some(id) } => {
            if let Some(c) = conns.get_mut(ch) {
                let _ = c.send_stream(*id).finish();
            }
        }
        End::Quic { sid: None, .. } => {}
    }
}
