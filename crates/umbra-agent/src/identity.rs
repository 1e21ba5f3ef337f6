//! The agent's identity directory as read at start, and the broker list refresh.

use std::path::Path;
use std::sync::Arc;

use umbra_link::ControllerClient;
use umbra_link::enroll::{ControllerRef, load_controller_ref, save_controller_ref};
use umbra_pki::TlsIdentity;
use umbra_proto::Role;
use umbra_proto::api::BrokerList;

use crate::AgentError;
use crate::config::AgentConfig;

/// Loads the identity and `controller.json`; the identity must be an agent's.
pub(crate) fn load(dir: &Path) -> Result<(TlsIdentity, ControllerRef), AgentError> {
    let id = TlsIdentity::load_dir(dir).map_err(AgentError::Identity)?;
    if id.peer.id.role != Role::Agent {
        return Err(AgentError::WrongRole(id.peer.id.role));
    }
    let cref = load_controller_ref(dir).map_err(AgentError::ControllerRef)?;
    Ok((id, cref))
}

/// Asks the controller for the current broker list (bounded by twice the connect timeout) and
/// remembers a changed list in `controller.json`. When the controller cannot be reached the
/// last known list is kept: brokers work without the controller.
pub(crate) async fn refresh_brokers(
    cfg: &AgentConfig,
    id: &Arc<TlsIdentity>,
    mut cref: ControllerRef,
) -> ControllerRef {
    let fetch = async {
        let client = ControllerClient::new(&cref.url, &id.ca, Some(id))?;
        client.get::<BrokerList>("/v1/brokers").await
    };
    match tokio::time::timeout(cfg.connect_timeout() * 2, fetch).await {
        Ok(Ok(list)) if list.brokers != cref.brokers => {
            tracing::info!(brokers = list.brokers.len(), "broker list updated");
            cref.brokers = list.brokers;
            if let Err(e) = save_controller_ref(&cfg.identity_dir, &cref) {
                tracing::warn!(error = %e, "cannot remember the broker list");
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot refresh the broker list; using the last known one")
        }
        Err(_) => {
            tracing::debug!("controller did not answer in time; using the last known broker list")
        }
    }
    cref
}
