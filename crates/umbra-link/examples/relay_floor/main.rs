//! Benchmark companion (never shipped): the floor of a relay chain built from the libraries
//! Umbra's data path uses, with none of Umbra's own work. One TLS (tokio-rustls) or QUIC
//! (quinn) connection per client connection, no multiplexing, no framing, no policy: the shape
//! of socat's b2 chain. A third chain drives quinn's protocol crate (quinn-proto) from one task
//! per relay (`proto.rs`): what QUIC costs without quinn's task structure. `benches/bench.py`
//! measures them beside Umbra and socat, so a gap between Umbra and socat can be split into
//! what the libraries cost and what Umbra adds.
//!
//! ```text
//! relay_floor setup DIR                          CA and two identities into DIR
//! relay_floor entry|mid|exit DIR LISTEN NEXT     TLS chain: entry takes TCP, exit gives TCP
//! relay_floor qentry|qmid|qexit DIR LISTEN NEXT  the same with QUIC
//! relay_floor pentry|pmid|pexit DIR LISTEN NEXT  QUIC again, one task per relay (`proto.rs`)
//! ```
//!
//! Both hops use mutual TLS 1.3 with Umbra's own configurations (`umbra_pki`): X25519MLKEM768
//! first, no resumption. The relays copy with one 64 KiB buffer per direction.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use umbra_pki::{Ca, ClientAuth, TlsIdentity};
use umbra_proto::{PeerId, Role};

mod proto;

type Error = Box<dyn std::error::Error + Send + Sync>;

const ALPN: &[u8] = b"floor";
const ORG: &str = "floor";

fn main() -> Result<(), Error> {
    umbra_pki::install_crypto_provider();
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: relay_floor setup DIR | ROLE DIR LISTEN NEXT";
    let (role, dir) = match (a.get(1), a.get(2)) {
        (Some(r), Some(d)) => (r.as_str(), Path::new(d)),
        _ => return Err(usage.into()),
    };
    if role == "setup" {
        return setup(dir);
    }
    let (Some(listen), Some(next)) = (a.get(3), a.get(4)) else {
        return Err(usage.into());
    };
    let (listen, next): (SocketAddr, SocketAddr) = (listen.parse()?, next.parse()?);
    let server = load(dir, "server")?;
    let client = load(dir, "client")?;
    let server_tls = umbra_pki::server_config(&server, ClientAuth::Required, &[ALPN], false)?;
    let client_tls = umbra_pki::client_config(&server.ca, Some(&client), &[ALPN], false)?;
    let name = umbra_pki::broker_server_name("floor");
    let quic = |server_tls, client_tls| -> Result<_, Error> {
        Ok((
            quinn::ServerConfig::with_crypto(Arc::new(
                quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
            )),
            quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
                client_tls,
            )?)),
        ))
    };
    if let Some(p) = role.strip_prefix('p') {
        let role = match p {
            "entry" => proto::Role::Entry,
            "mid" => proto::Role::Mid,
            "exit" => proto::Role::Exit,
            _ => return Err(usage.into()),
        };
        // One thread, one task: the point of this chain.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (sq, cq) = quic(server_tls, client_tls)?;
        return rt.block_on(proto::run(role, listen, next, sq, cq, name));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match role {
        "entry" | "mid" | "exit" => rt.block_on(tls_chain(
            role.to_owned(),
            listen,
            next,
            TlsAcceptor::from(Arc::new(server_tls)),
            TlsConnector::from(Arc::new(client_tls)),
            name,
        )),
        "qentry" | "qmid" | "qexit" => {
            let (sq, cq) = quic(server_tls, client_tls)?;
            rt.block_on(quic_chain(role.to_owned(), listen, next, sq, cq, name))
        }
        _ => Err(usage.into()),
    }
}

fn setup(dir: &Path) -> Result<(), Error> {
    let now = SystemTime::now();
    let ca = Ca::generate(ORG, now)?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    for (file, role, dns) in [
        (
            "server",
            Role::Broker,
            vec![umbra_pki::broker_server_name("floor")],
        ),
        ("client", Role::Agent, vec![]),
    ] {
        let id = PeerId::new(ORG, role, file).map_err(|e| e.to_string())?;
        let p =
            umbra_pki::test_util::issue_pems(&ca, id, dns, now, Duration::from_secs(7 * 86_400))?;
        std::fs::write(dir.join(format!("{file}.crt")), p.cert_pem)?;
        std::fs::write(dir.join(format!("{file}.key")), p.key_pem)?;
    }
    Ok(())
}

fn load(dir: &Path, file: &str) -> Result<TlsIdentity, Error> {
    let read = |f: String| std::fs::read_to_string(dir.join(f));
    Ok(TlsIdentity::from_pem(
        &read(format!("{file}.crt"))?,
        &read(format!("{file}.key"))?,
        &read("ca.pem".to_owned())?,
    )?)
}

/// One relay of the TLS chain: each accepted connection gets its own connection onward.
async fn tls_chain(
    role: String,
    listen: SocketAddr,
    next: SocketAddr,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    name: String,
) -> Result<(), Error> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = l.accept().await?;
        let (acceptor, connector, role) = (acceptor.clone(), connector.clone(), role.clone());
        let name = rustls_pki_types::ServerName::try_from(name.clone())?;
        tokio::spawn(async move {
            let r: Result<(), Error> = async {
                tcp.set_nodelay(true)?;
                let out = TcpStream::connect(next).await?;
                out.set_nodelay(true)?;
                match role.as_str() {
                    "entry" => relay(tcp, connector.connect(name, out).await?).await,
                    "mid" => {
                        let inbound = acceptor.accept(tcp).await?;
                        relay(inbound, connector.connect(name, out).await?).await
                    }
                    _ => relay(acceptor.accept(tcp).await?, out).await,
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                eprintln!("relay_floor {role}: {e}");
            }
        });
    }
}

/// One relay of the QUIC chain: one QUIC connection (one bidirectional stream) onward per
/// connection accepted.
async fn quic_chain(
    role: String,
    listen: SocketAddr,
    next: SocketAddr,
    sq: quinn::ServerConfig,
    cq: quinn::ClientConfig,
    name: String,
) -> Result<(), Error> {
    let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    client.set_default_client_config(cq);
    let dial = move |client: quinn::Endpoint, name: String| async move {
        let c = client.connect(next, &name)?.await?;
        let (send, recv) = c.open_bi().await?;
        Ok::<_, Error>((c, send, recv))
    };
    if role == "qentry" {
        let l = TcpListener::bind(listen).await?;
        loop {
            let (tcp, _) = l.accept().await?;
            let (client, name) = (client.clone(), name.clone());
            tokio::spawn(async move {
                let r: Result<(), Error> = async {
                    tcp.set_nodelay(true)?;
                    let (conn, mut send, mut recv) = dial(client, name).await?;
                    let (mut tr, mut tw) = tcp.into_split();
                    tokio::join!(pump(&mut tr, &mut send), pump(&mut recv, &mut tw));
                    conn.close(0u32.into(), b"");
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    eprintln!("relay_floor qentry: {e}");
                }
            });
        }
    }
    let server = quinn::Endpoint::server(sq, listen)?;
    while let Some(incoming) = server.accept().await {
        let (client, name, role) = (client.clone(), name.clone(), role.clone());
        tokio::spawn(async move {
            let r: Result<(), Error> = async {
                let conn = incoming.await?;
                let (mut is, mut ir) = conn.accept_bi().await?;
                if role == "qmid" {
                    let (out, mut send, mut recv) = dial(client, name).await?;
                    tokio::join!(pump(&mut ir, &mut send), pump(&mut recv, &mut is));
                    out.close(0u32.into(), b"");
                } else {
                    let tcp = TcpStream::connect(next).await?;
                    tcp.set_nodelay(true)?;
                    let (mut tr, mut tw) = tcp.into_split();
                    tokio::join!(pump(&mut ir, &mut tw), pump(&mut tr, &mut is));
                }
                conn.closed().await;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                eprintln!("relay_floor {role}: {e}");
            }
        });
    }
    Ok(())
}

async fn relay<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::join!(pump(&mut ar, &mut bw), pump(&mut br, &mut aw));
}

/// Copies until end of input or an error, then shuts the write side down (half-close).
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}
