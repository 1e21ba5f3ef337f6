//! One stream a broker opened on a link: read the `Dial`, decide, dial the target, relay.
//!
//! The connector is the last line of defence: whatever the broker asks, it dials only a
//! target published for *this* connector, compared as the exact string the controller
//! published ([`decide`]). The same address written another way (IPv4-mapped IPv6, a decimal
//! IPv4, another hostname, another port) is a different string and is refused: normalising
//! here would let a compromised broker reach hosts nobody published through resolver tricks.
//! Every refusal is an audit event (`target: "audit"`) and a counter.
//!
//! What the broker sends first on a stream is classified by [`request`]. Bytes that are not a
//! frame (bad version, unknown kind, a length over the limit, a bad field, a frame cut short)
//! and frames that are not requests are protocol violations: a broker that sends them is
//! broken or hostile, so its whole link is closed (not just the stream), with a warning that
//! names the broker and the frame error; the link task then redials it like any link that
//! went down. No request at all (the stream ended or was reset first, or nothing came within
//! [`DIAL_FRAME_TIMEOUT`]) is not a violation: that stream alone is reset.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::Instrument;
use umbra_link::{Counters, Link, LinkError, Stream};
use umbra_proto::api::PublishedTarget;
use umbra_proto::{DialCode, Flow, Frame};

use crate::sync::PublishedRx;

/// Time a broker has to send its `Dial` after opening a stream.
pub(crate) const DIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to "may this stream be connected to `target`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialDecision {
    /// Published for this service: dial it.
    Allow,
    /// Not published (for this service): refuse and audit.
    NotPublished,
    /// Published, but the flow kind is not served.
    UnsupportedFlow,
}

/// Pure permission check: allowed only if `(service, target)` is exactly, byte for byte, one
/// of the published pairs.
pub(crate) fn decide(
    published: &[PublishedTarget],
    flow: Flow,
    service: &str,
    target: &str,
) -> DialDecision {
    let listed = published
        .iter()
        .any(|p| p.service == service && p.target == target);
    match (listed, flow) {
        (false, _) => DialDecision::NotPublished,
        (true, Flow::Tcp) => DialDecision::Allow,
        (true, Flow::Udp) => DialDecision::UnsupportedFlow,
    }
}

/// What a stream handler needs, shared by all streams of all links.
pub(crate) struct ServeCtx {
    pub(crate) published: PublishedRx,
    pub(crate) dial_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// What the first read on a broker-opened stream asks of the connector. See the module docs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Connect this stream to `target`.
    Dial {
        flow: Flow,
        stream_id: u64,
        service: String,
        target: String,
        principal: String,
    },
    /// Answer with a `Pong` (brokers may measure the link).
    Ping { nonce: u64 },
    /// The broker broke the protocol: bytes that are not a frame, or a frame that is not a
    /// request. Its link is closed.
    Malformed(String),
    /// No request: the stream ended or failed first, or nothing came in time (`None` read).
    /// This stream is reset; the link stays up. `label` is the `result` counted.
    Missing { why: String, label: &'static str },
}

/// Classifies the first read on a stream; `None` when nothing came within
/// [`DIAL_FRAME_TIMEOUT`]. Pure.
pub(crate) fn request(read: Option<Result<Frame, LinkError>>) -> Request {
    match read {
        None => Request::Missing {
            why: "no request in time".into(),
            label: "timeout",
        },
        Some(Err(e @ LinkError::Frame(_))) => Request::Malformed(e.to_string()),
        Some(Err(e)) => Request::Missing {
            why: e.to_string(),
            label: "no_request",
        },
        Some(Ok(Frame::Dial {
            flow,
            stream_id,
            service,
            target,
            principal,
        })) => Request::Dial {
            flow,
            stream_id,
            service,
            target,
            principal,
        },
        Some(Ok(Frame::Ping { nonce })) => Request::Ping { nonce },
        Some(Ok(other)) => Request::Malformed(format!("unexpected frame {other:?}")),
    }
}

/// Serves one broker-opened stream of `link` to its end. Never panics on what the broker
/// sends; a malformed request closes `link`, a missing one resets this stream (module docs).
pub(crate) async fn handle_stream(
    mut stream: Stream,
    link: Link,
    ctx: Arc<ServeCtx>,
    broker: Arc<str>,
) {
    let read = tokio::time::timeout(DIAL_FRAME_TIMEOUT, stream.read_frame())
        .await
        .ok();
    let (flow, stream_id, service, target, principal) = match request(read) {
        Request::Dial {
            flow,
            stream_id,
            service,
            target,
            principal,
        } => (flow, stream_id, service, target, principal),
        Request::Ping { nonce } => {
            if stream.write_frame(&Frame::Pong { nonce }).await.is_ok() {
                let _ = stream.finish().await;
            }
            return;
        }
        Request::Malformed(error) => {
            tracing::warn!(
                %broker,
                peer = %link.peer().id,
                stream = stream.id(),
                %error,
                "malformed request frame from broker; closing its link"
            );
            count("bad_frame");
            link.close();
            return;
        }
        Request::Missing { why, label } => {
            tracing::warn!(%broker, stream = stream.id(), reason = %why, "broker opened a stream but sent no request; stream reset");
            count(label);
            stream.reset();
            return;
        }
    };
    // Only the request phase may close the link; the relay does not keep it alive.
    drop(link);

    // `service` and `principal` are the broker's words: recorded as values (quoted, control
    // characters escaped), never displayed raw, so that they cannot forge log lines.
    let span = tracing::info_span!("dial", %broker, stream_id, service, principal);
    // The span is entered while dialing, not while relaying: the relay is polled for every
    // chunk, and its end is reported in the span explicitly.
    let Some((tcp, stream)) =
        serve_dial(stream, &ctx, &broker, flow, &service, &target, &principal)
            .instrument(span.clone())
            .await
    else {
        return;
    };
    let counters = Counters::default();
    let result = tokio::select! {
        // A target unpublished (or moved to another service or connector) ends its live
        // streams here too, whatever the broker does: the broker ends them on the same
        // change, but one that is stale or compromised would not.
        biased;
        () = until_unpublished(ctx.published.clone(), &service, &target) => {
            tracing::warn!(
                target: "audit",
                parent: &span,
                event = "connector.stream_ended",
                %broker,
                principal,
                service,
                requested_target = target,
                reason = "not_published",
                "ended a live stream: its target is no longer published for this connector"
            );
            count("unpublished_live");
            // Dropping the relay resets the stream and closes the connection to the target.
            return;
        }
        r = umbra_link::relay_tcp(tcp, stream, umbra_link::TcpEnd::Service, ctx.idle_timeout, &counters) => r,
    };
    let up = counters.up.load(std::sync::atomic::Ordering::Relaxed);
    let down = counters.down.load(std::sync::atomic::Ordering::Relaxed);
    match result {
        Ok(()) => tracing::debug!(
            parent: &span,
            bytes_to_target = up,
            bytes_from_target = down,
            "stream ended"
        ),
        Err(e) => {
            tracing::debug!(parent: &span, bytes_to_target = up, bytes_from_target = down, error = %e, "stream ended with an error")
        }
    }
}

/// Checks and dials the target; on success the stream and the connection come back, the
/// `DialReply{Ok}` sent.
async fn serve_dial(
    mut stream: Stream,
    ctx: &ServeCtx,
    broker: &str,
    flow: Flow,
    service: &str,
    target: &str,
    principal: &str,
) -> Option<(TcpStream, Stream)> {
    let decision = {
        let published = ctx.published.borrow();
        decide(&published.targets, flow, service, target)
    };
    match decision {
        DialDecision::Allow => {}
        DialDecision::NotPublished => {
            tracing::warn!(
                target: "audit",
                event = "connector.dial_refused",
                broker,
                principal,
                service,
                requested_target = target,
                flow = flow.as_str(),
                reason = "not_published",
                "refused a dial to a target not published for this connector"
            );
            metrics::counter!("umbra_connector_refused_total").increment(1);
            count(DialCode::NotPublished.as_str());
            reply_and_finish(&mut stream, DialCode::NotPublished).await;
            return None;
        }
        DialDecision::UnsupportedFlow => {
            tracing::info!(flow = flow.as_str(), "flow kind not served");
            count(DialCode::UnsupportedFlow.as_str());
            reply_and_finish(&mut stream, DialCode::UnsupportedFlow).await;
            return None;
        }
    }

    let tcp = match tokio::time::timeout(ctx.dial_timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "published target refused the connection");
            count(DialCode::Unreachable.as_str());
            reply_and_finish(&mut stream, DialCode::Unreachable).await;
            return None;
        }
        Err(_) => {
            tracing::info!(
                timeout_ms = ctx.dial_timeout.as_millis() as u64,
                "published target did not answer in time"
            );
            count(DialCode::Unreachable.as_str());
            reply_and_finish(&mut stream, DialCode::Unreachable).await;
            return None;
        }
    };
    // Interactive protocols (SSH, databases) suffer from Nagle on top of the link's own batching.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = stream
        .write_frame(&Frame::DialReply { code: DialCode::Ok })
        .await
    {
        tracing::debug!(error = %e, "broker went away before the reply");
        count("broker_gone");
        return None;
    }
    count(DialCode::Ok.as_str());
    tracing::debug!("connected; relaying");
    Some((tcp, stream))
}

/// Completes once the published targets no longer allow `(service, target)`; never if they
/// go on allowing it. A receiver cloned from the one the dial was decided on also sees a
/// change made between that decision and the clone.
async fn until_unpublished(mut rx: PublishedRx, service: &str, target: &str) {
    loop {
        if rx.changed().await.is_err() {
            // The sender is gone (shutting down): nothing will change any more.
            return std::future::pending().await;
        }
        let allowed = decide(&rx.borrow_and_update().targets, Flow::Tcp, service, target);
        if allowed != DialDecision::Allow {
            return;
        }
    }
}

async fn reply_and_finish(stream: &mut Stream, code: DialCode) {
    if stream.write_frame(&Frame::DialReply { code }).await.is_ok() {
        let _ = stream.finish().await;
    }
}

fn count(result: &'static str) {
    metrics::counter!("umbra_connector_streams_total", "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> Vec<PublishedTarget> {
        [
            ("web", "127.0.0.1:8080"),
            ("db", "db.internal:5432"),
            ("v6", "[2001:db8::1]:443"),
        ]
        .into_iter()
        .map(|(s, t)| PublishedTarget {
            service: s.into(),
            target: t.into(),
        })
        .collect()
    }

    /// A live stream's target: unpublished ends it; a change that keeps it does not; a
    /// change made before the stream's receiver was cloned is seen too.
    #[tokio::test]
    async fn a_live_stream_ends_when_its_target_is_unpublished() {
        use umbra_proto::api::ConnectorConfig as Published;
        let config = |version, targets: Vec<PublishedTarget>| {
            Arc::new(Published {
                connector_id: "c".into(),
                version,
                targets,
            })
        };
        let (tx, rx) = tokio::sync::watch::channel(config(1, published()));
        fn pending<F: Future<Output = ()>>(f: &mut std::pin::Pin<Box<F>>) -> bool {
            use std::task::{Context, Poll, Waker};
            f.as_mut().poll(&mut Context::from_waker(Waker::noop())) == Poll::Pending
        }
        let mut web = Box::pin(until_unpublished(rx.clone(), "web", "127.0.0.1:8080"));
        let mut db = Box::pin(until_unpublished(rx.clone(), "db", "db.internal:5432"));
        assert!(pending(&mut web) && pending(&mut db));
        // A newer version that keeps both pairs (another target added).
        let mut more = published();
        more.push(PublishedTarget {
            service: "wiki".into(),
            target: "10.0.0.9:80".into(),
        });
        tx.send_replace(config(2, more.clone()));
        assert!(pending(&mut web) && pending(&mut db));
        // web moves to another port: its stream ends, db's does not.
        more[0].target = "127.0.0.1:8081".into();
        tx.send_replace(config(3, more.clone()));
        assert!(
            !pending(&mut web),
            "a stream to an unpublished target runs on"
        );
        assert!(pending(&mut db));
        // Cloned after a change that already removed db: seen at once.
        more.retain(|t| t.service != "db");
        tx.send_replace(config(4, more));
        let mut late = Box::pin(until_unpublished(rx.clone(), "db", "db.internal:5432"));
        assert!(!pending(&mut late));
        assert!(!pending(&mut db));
        // The sender gone (shutdown): nothing ends because of it.
        let mut v6 = Box::pin(until_unpublished(rx, "v6", "[2001:db8::1]:443"));
        drop(tx);
        assert!(pending(&mut v6));
    }

    #[test]
    fn dial_permission_table() {
        use DialDecision::*;
        let p = published();
        let cases: &[(Flow, &str, &str, DialDecision)] = &[
            // Exactly as published.
            (Flow::Tcp, "web", "127.0.0.1:8080", Allow),
            (Flow::Tcp, "db", "db.internal:5432", Allow),
            (Flow::Tcp, "v6", "[2001:db8::1]:443", Allow),
            // The same address written differently is another string: refused.
            (Flow::Tcp, "web", "[::ffff:127.0.0.1]:8080", NotPublished),
            (Flow::Tcp, "web", "[::ffff:7f00:1]:8080", NotPublished),
            (Flow::Tcp, "web", "2130706433:8080", NotPublished),
            (Flow::Tcp, "web", "0x7f000001:8080", NotPublished),
            (Flow::Tcp, "web", "127.1:8080", NotPublished),
            (Flow::Tcp, "web", "localhost:8080", NotPublished),
            (Flow::Tcp, "web", "127.0.0.1:08080", NotPublished),
            (Flow::Tcp, "web", "127.0.0.1:8080 ", NotPublished),
            (Flow::Tcp, "web", " 127.0.0.1:8080", NotPublished),
            (Flow::Tcp, "web", "127.0.0.1:8080.", NotPublished),
            (Flow::Tcp, "db", "DB.internal:5432", NotPublished),
            (Flow::Tcp, "db", "db.internal.:5432", NotPublished),
            (Flow::Tcp, "v6", "[2001:0db8::1]:443", NotPublished),
            (Flow::Tcp, "v6", "[2001:DB8::1]:443", NotPublished),
            // Another port of a published host.
            (Flow::Tcp, "web", "127.0.0.1:8081", NotPublished),
            (Flow::Tcp, "web", "127.0.0.1", NotPublished),
            // A published target under another service's name.
            (Flow::Tcp, "db", "127.0.0.1:8080", NotPublished),
            (Flow::Tcp, "nosuch", "127.0.0.1:8080", NotPublished),
            (Flow::Tcp, "WEB", "127.0.0.1:8080", NotPublished),
            (Flow::Tcp, "", "", NotPublished),
            // Flow kinds: publication is checked first.
            (Flow::Udp, "web", "127.0.0.1:8080", UnsupportedFlow),
            (Flow::Udp, "web", "127.0.0.1:9999", NotPublished),
        ];
        for (flow, service, target, want) in cases {
            assert_eq!(
                decide(&p, *flow, service, target),
                *want,
                "{flow:?} {service} {target}"
            );
        }
    }

    #[test]
    fn request_table() {
        use umbra_proto::frame::FrameError;
        let dial = Frame::Dial {
            flow: Flow::Tcp,
            stream_id: 3,
            service: "web".into(),
            target: "127.0.0.1:8080".into(),
            principal: "p".into(),
        };
        assert_eq!(
            request(Some(Ok(dial))),
            Request::Dial {
                flow: Flow::Tcp,
                stream_id: 3,
                service: "web".into(),
                target: "127.0.0.1:8080".into(),
                principal: "p".into(),
            }
        );
        assert_eq!(
            request(Some(Ok(Frame::Ping { nonce: 9 }))),
            Request::Ping { nonce: 9 }
        );
        // Malformed input and frames that are not requests: the link is closed.
        let malformed = [
            LinkError::Frame(FrameError::Version(2)),
            LinkError::Frame(FrameError::UnknownKind(0x7f)),
            LinkError::Frame(FrameError::TooLong(0xffff)),
            LinkError::Frame(FrameError::Truncated),
            LinkError::Frame(FrameError::BadValue("flow")),
        ];
        for e in malformed {
            let want = e.to_string();
            assert_eq!(request(Some(Err(e))), Request::Malformed(want));
        }
        for f in [
            Frame::DialReply { code: DialCode::Ok },
            Frame::Pong { nonce: 1 },
            Frame::ListServices,
            Frame::Open {
                flow: Flow::Tcp,
                service: "web".into(),
                credential: vec![],
            },
        ] {
            assert!(
                matches!(request(Some(Ok(f.clone()))), Request::Malformed(_)),
                "{f:?}"
            );
        }
        // No request: this stream only.
        let missing = |r| match request(r) {
            Request::Missing { label, .. } => label,
            other => panic!("{other:?}"),
        };
        assert_eq!(missing(None), "timeout");
        assert_eq!(missing(Some(Err(LinkError::StreamEnded))), "no_request");
        assert_eq!(missing(Some(Err(LinkError::StreamReset(0)))), "no_request");
        assert_eq!(missing(Some(Err(LinkError::Closed))), "no_request");
    }

    #[test]
    fn nothing_published_allows_nothing() {
        assert_eq!(
            decide(&[], Flow::Tcp, "web", "127.0.0.1:8080"),
            DialDecision::NotPublished
        );
    }
}
