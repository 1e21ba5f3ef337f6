//! Link admission: who is on the other end of a link, and may they hold one at all.
//!
//! Identity comes only from the leaf certificate the handshake proved (the transport already
//! checked the chain to this organisation's CA and its validity period). Here, against the
//! current snapshot: right organisation, a role that may dial a broker, a serial that is not
//! revoked, and an enrolled, non-revoked device or connector. Pure: facts in, answer out.

use umbra_pki::PeerCert;
use umbra_proto::Role;

use crate::authority::Authority;

/// An admitted peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkPeer {
    Agent { device: String },
    Connector { id: String },
}

/// Why a link is refused. Logged and audited; the peer only learns that it was refused
/// ([`umbra_link::Link::refuse`]), not which of these it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    WrongOrg,
    WrongRole,
    RevokedCertificate,
    UnknownDevice,
    RevokedDevice,
    UnknownConnector,
    RevokedConnector,
}

impl Refusal {
    /// Whether every broker would refuse the same: `false` for an identity this broker does
    /// not know, since its snapshot may predate the enrollment (a device linking a moment
    /// after it enrolled, or a broker with no snapshot yet). Such a link is closed, not
    /// refused, so that the peer tries again or another broker instead of giving up.
    pub(crate) fn is_final(self) -> bool {
        !matches!(self, Refusal::UnknownDevice | Refusal::UnknownConnector)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::WrongOrg => "wrong_org",
            Refusal::WrongRole => "wrong_role",
            Refusal::RevokedCertificate => "revoked_certificate",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::RevokedDevice => "revoked_device",
            Refusal::UnknownConnector => "unknown_connector",
            Refusal::RevokedConnector => "revoked_connector",
        }
    }
}

/// Decides whether `peer` may hold a link to this broker under `a`.
pub(crate) fn admit(peer: &PeerCert, a: &Authority, org: &str) -> Result<LinkPeer, Refusal> {
    if peer.id.org != org {
        return Err(Refusal::WrongOrg);
    }
    if a.serial_revoked(&peer.serial_hex) {
        return Err(Refusal::RevokedCertificate);
    }
    let id = &peer.id.id;
    match peer.id.role {
        Role::Agent => match a.device_revoked(id) {
            None => Err(Refusal::UnknownDevice),
            Some(true) => Err(Refusal::RevokedDevice),
            Some(false) => Ok(LinkPeer::Agent { device: id.clone() }),
        },
        Role::Connector => match a.connector_revoked(id) {
            None => Err(Refusal::UnknownConnector),
            Some(true) => Err(Refusal::RevokedConnector),
            Some(false) => Ok(LinkPeer::Connector { id: id.clone() }),
        },
        Role::Broker | Role::Controller => Err(Refusal::WrongRole),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use umbra_proto::snapshot::{ConnectorFacts, DeviceFacts};
    use umbra_proto::{PeerId, Snapshot};

    use super::*;

    fn cert(role: Role, id: &str, serial: &str) -> PeerCert {
        PeerCert {
            id: PeerId::new("default", role, id).unwrap(),
            serial_hex: serial.into(),
            not_after: UNIX_EPOCH,
        }
    }

    fn authority() -> Authority {
        Authority::new(
            Snapshot {
                version: 1,
                org: "default".into(),
                devices: vec![
                    DeviceFacts {
                        id: "d1".into(),
                        user: "u@example.test".into(),
                        revoked: false,
                    },
                    DeviceFacts {
                        id: "d2".into(),
                        user: "u@example.test".into(),
                        revoked: true,
                    },
                ],
                connectors: vec![
                    ConnectorFacts {
                        id: "c1".into(),
                        name: "c".into(),
                        revoked: false,
                    },
                    ConnectorFacts {
                        id: "c2".into(),
                        name: "d".into(),
                        revoked: true,
                    },
                ],
                revoked_serials: vec!["bad".into()],
                ..Snapshot::default()
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn table() {
        let a = authority();
        let cases = [
            (
                cert(Role::Agent, "d1", "1"),
                Ok(LinkPeer::Agent {
                    device: "d1".into(),
                }),
            ),
            (
                cert(Role::Agent, "d1", "bad"),
                Err(Refusal::RevokedCertificate),
            ),
            (cert(Role::Agent, "d2", "2"), Err(Refusal::RevokedDevice)),
            (cert(Role::Agent, "d9", "3"), Err(Refusal::UnknownDevice)),
            (
                cert(Role::Connector, "c1", "4"),
                Ok(LinkPeer::Connector { id: "c1".into() }),
            ),
            (
                cert(Role::Connector, "c2", "5"),
                Err(Refusal::RevokedConnector),
            ),
            (
                cert(Role::Connector, "d1", "6"),
                Err(Refusal::UnknownConnector),
            ),
            (cert(Role::Broker, "b1", "7"), Err(Refusal::WrongRole)),
            (cert(Role::Controller, "x", "8"), Err(Refusal::WrongRole)),
        ];
        for (c, want) in cases {
            assert_eq!(admit(&c, &a, "default"), want, "{c:?}");
        }
        assert_eq!(
            admit(&cert(Role::Agent, "d1", "1"), &a, "other"),
            Err(Refusal::WrongOrg)
        );
    }

    /// Only "not known here" may be this broker's ignorance; everything else every broker
    /// would say.
    #[test]
    fn which_refusals_are_final() {
        use Refusal::*;
        for r in [
            WrongOrg,
            WrongRole,
            RevokedCertificate,
            RevokedDevice,
            RevokedConnector,
        ] {
            assert!(r.is_final(), "{r:?}");
        }
        for r in [UnknownDevice, UnknownConnector] {
            assert!(!r.is_final(), "{r:?}");
        }
    }
}
