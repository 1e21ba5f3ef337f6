//! Test fixtures shared by the unit tests: an organisation CA and identities issued by it.

use std::time::{Duration, SystemTime};

use umbra_proto::{PeerId, Role};

use crate::{Ca, DEFAULT_LIFETIME, TlsIdentity, broker_server_name};

pub(crate) struct Org {
    pub(crate) ca: Ca,
}

/// A certificate and key as PEM, before loading.
pub(crate) struct Pems {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Org {
    pub(crate) fn new(org: &str) -> Org {
        Org {
            ca: Ca::generate(org, SystemTime::now()).unwrap(),
        }
    }

    pub(crate) fn pid(&self, role: Role, id: &str) -> PeerId {
        PeerId::new(self.ca.org(), role, id).unwrap()
    }

    /// Issues a certificate for `role`/`id`, valid from `now` for `lifetime`. Brokers get
    /// their DNS server name.
    pub(crate) fn pems_at(
        &self,
        role: Role,
        id: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Pems {
        let dns_names = match role {
            Role::Broker => vec![broker_server_name(id)],
            _ => vec![],
        };
        let issued =
            crate::test_util::issue_pems(&self.ca, self.pid(role, id), dns_names, now, lifetime)
                .unwrap();
        Pems {
            cert: issued.cert_pem,
            key: issued.key_pem,
        }
    }

    pub(crate) fn pems(&self, role: Role, id: &str) -> Pems {
        self.pems_at(role, id, SystemTime::now(), DEFAULT_LIFETIME)
    }

    pub(crate) fn load(&self, p: &Pems) -> TlsIdentity {
        TlsIdentity::from_pem(&p.cert, &p.key, self.ca.cert_pem()).unwrap()
    }

    pub(crate) fn identity(&self, role: Role, id: &str) -> TlsIdentity {
        self.load(&self.pems(role, id))
    }
}
