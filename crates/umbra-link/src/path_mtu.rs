//! How far QUIC's path MTU discovery may search on a path: no further than the first hop
//! carries.
//!
//! Why it matters: quinn sends an MTU probe without asking the congestion controller, but
//! counts it in flight until it is acknowledged or declared lost, and sends no data while
//! bytes in flight plus one packet reach the congestion window. A probe of tens of KiB on a
//! 1500-byte path is lost by construction, and until quinn declares it lost (about one
//! round trip plus its 25 ms ACK delay allowance) the new link moves nothing. With a fixed
//! 64 KiB bound the search tried several such probes on every link: measured over a veth pair
//! (MTU 1500, no delay), the first six pings on a new link took 30–90 ms each instead of
//! 0.1 ms. The first hop's MTU is known locally for free (the kernel's route to the peer), and
//! no path is wider than its first hop, so the search stops there: on Ethernet it probes
//! 1200..=1472 bytes, which never blocks a window; on loopback (64 KiB) it still reaches the
//! large packets that make QUIC cheap per byte.
//!
//! On loopback there is no search at all ([`initial`]): the first hop is the whole path, so
//! its MTU is the path's, and a link starts with it. Searching there cost the first pings of
//! every link milliseconds (quinn paces the packets after a probe as if the probe's 16-64 KiB
//! were data, on a window of a dozen KiB): a new loopback link measured 1-5 ms instead of
//! 0.1 ms, which `umbra agent status` in the quickstart showed, and which could rank brokers
//! on one host in the wrong order.

use std::net::SocketAddr;

/// Smallest UDP payload QUIC may use (RFC 9000, section 14).
const QUIC_MIN_PAYLOAD: u16 = 1200;
/// quinn's own bound, for when the first hop is unknown: a 1500-byte Ethernet path under IPv6.
const UNKNOWN_BOUND: u16 = 1452;
/// IPv4 and UDP headers.
const V4_OVERHEAD: u32 = 20 + 8;
/// IPv6 and UDP headers.
const V6_OVERHEAD: u32 = 40 + 8;

/// The upper bound for path MTU discovery towards `remote`, at most `max` (the largest UDP
/// payload this endpoint accepts).
pub(crate) fn search_bound(remote: SocketAddr, max: u16) -> u16 {
    // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
    let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    bound_for(first_hop_mtu(remote), remote.is_ipv6(), max)
}

/// The UDP payload size a link to `remote` starts with, given the search `bound` from
/// [`search_bound`]: the bound itself where the whole path is the loopback interface (it is
/// then the path's MTU, so nothing is left to discover), else QUIC's minimum, which discovery
/// raises towards the bound.
pub(crate) fn initial(remote: SocketAddr, bound: u16) -> u16 {
    if remote.ip().to_canonical().is_loopback() {
        bound
    } else {
        QUIC_MIN_PAYLOAD
    }
}

/// The congestion window a link starting with packets of `initial` bytes starts with: RFC 9002
/// (section 7.2), ten packets but at most `max(14720, 2 * initial)` bytes. quinn's default is
/// fixed at 14720 bytes, and quinn sends nothing while a whole packet does not fit in the
/// window, so a link starting with 64 KiB packets on that default could not even finish its
/// handshake.
pub(crate) fn initial_window(initial: u16) -> u64 {
    let mtu = u64::from(initial);
    (10 * mtu).min(14_720.max(2 * mtu))
}

/// Pure part of [`search_bound`]: the largest UDP payload that fits the first hop's MTU
/// (`None`: unknown), kept within QUIC's minimum and `max`.
pub(crate) fn bound_for(first_hop_mtu: Option<u32>, ipv6: bool, max: u16) -> u16 {
    let overhead = if ipv6 { V6_OVERHEAD } else { V4_OVERHEAD };
    let fits = match first_hop_mtu {
        Some(mtu) => u16::try_from(mtu.saturating_sub(overhead)).unwrap_or(u16::MAX),
        None => UNKNOWN_BOUND,
    };
    fits.min(max).max(QUIC_MIN_PAYLOAD)
}

/// The MTU of the route to `remote`, as the kernel knows it (the outgoing interface's, or the
/// route's own, or a smaller one already learnt for that destination). Linux only; `None`
/// elsewhere or when there is no route.
#[cfg(target_os = "linux")]
pub(crate) fn first_hop_mtu(remote: SocketAddr) -> Option<u32> {
    use std::net::{Ipv4Addr, Ipv6Addr};

    let bind: SocketAddr = if remote.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    // Connecting a UDP socket only looks the route up; nothing is sent.
    socket.connect(remote).ok()?;
    let (level, name) = if remote.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mtu = getsockopt_int(&socket, level, name)?;
    u32::try_from(mtu).ok().filter(|&m| m > 0)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn first_hop_mtu(_remote: SocketAddr) -> Option<u32> {
    None
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn getsockopt_int(
    socket: &std::net::UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: the descriptor belongs to `socket`, which is open for the whole call; `value` and `len`
    // are live locals, and `len` holds the size of `value`, so the kernel writes within it.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (r == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u16 = 65_527;

    #[test]
    fn bound_is_the_first_hop_less_headers_within_quic_limits() {
        // (first hop MTU, IPv6, bound)
        let cases = [
            (Some(1500), false, 1472),
            (Some(1500), true, 1452),
            (Some(9000), false, 8972),
            (Some(1280), true, 1232),
            // loopback
            (Some(65_536), false, 65_508),
            (Some(65_536), true, 65_488),
            // below QUIC's minimum: QUIC cannot go lower anyway
            (Some(576), false, QUIC_MIN_PAYLOAD),
            (Some(0), true, QUIC_MIN_PAYLOAD),
            // absurd values from the kernel cannot overflow
            (Some(u32::MAX), false, MAX),
            // capped by what this endpoint accepts
            (Some(70_000), false, MAX),
            // unknown: quinn's default
            (None, false, UNKNOWN_BOUND),
            (None, true, UNKNOWN_BOUND),
        ];
        for (mtu, v6, want) in cases {
            assert_eq!(bound_for(mtu, v6, MAX), want, "mtu {mtu:?} ipv6 {v6}");
        }
        assert_eq!(bound_for(Some(9000), false, 4000), 4000, "max wins");
    }

    #[test]
    fn only_loopback_links_start_at_the_bound() {
        for (remote, start) in [
            ("127.0.0.1:9", 65_508),
            ("127.3.2.1:9", 65_508),
            ("[::1]:9", 65_508),
            ("[::ffff:127.0.0.1]:9", 65_508),
            // anything else starts at QUIC's minimum and searches up to the bound
            ("10.0.0.1:9", QUIC_MIN_PAYLOAD),
            ("192.168.1.1:9", QUIC_MIN_PAYLOAD),
            ("[fe80::1]:9", QUIC_MIN_PAYLOAD),
            ("[::ffff:10.0.0.1]:9", QUIC_MIN_PAYLOAD),
        ] {
            assert_eq!(initial(remote.parse().unwrap(), 65_508), start, "{remote}");
        }
    }

    #[test]
    fn initial_window_follows_rfc_9002() {
        // QUIC's minimum packet: quinn's own default.
        assert_eq!(initial_window(QUIC_MIN_PAYLOAD), 12_000);
        assert_eq!(initial_window(1472), 14_720);
        // Loopback: two packets, so that the first one fits.
        assert_eq!(initial_window(65_508), 131_016);
        assert_eq!(initial_window(u16::MAX), 2 * u64::from(u16::MAX));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_first_hop_is_the_loopback_interface() {
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("read the loopback MTU")
            .trim()
            .parse()
            .expect("a number");
        // An IPv4 packet is at most 65535 bytes, whatever the interface says.
        let lo = lo.min(65_535);
        assert_eq!(first_hop_mtu("127.0.0.1:9".parse().unwrap()), Some(lo));
        let want = bound_for(Some(lo), false, MAX);
        assert_eq!(search_bound("127.0.0.1:9".parse().unwrap(), MAX), want);
        // as a dual-stack listener sees an IPv4 peer
        assert_eq!(
            search_bound("[::ffff:127.0.0.1]:9".parse().unwrap(), MAX),
            want
        );
    }
}
