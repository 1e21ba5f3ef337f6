//! The client side of enrollment and certificate renewal, shared by agents, connectors and
//! brokers.
//!
//! Owns the identity directory's life after creation: redeeming an enrollment token
//! ([`enroll`]), renewing the certificate before it expires ([`renew`], [`spawn_renewal`]) and
//! `controller.json`, the note of where the controller is and which brokers it last named
//! ([`ControllerRef`]). The private key is generated here, on the device, and never leaves it:
//! only a CSR goes to the controller.
//!
//! Trust starts from the enrollment token: it carries the SHA-256 of the CA certificate, so
//! the first contact with the controller is pinned before anything it says is believed.
//!
//! It does not own the files' formats (`umbra_pki::write_identity_dir` writes the key,
//! certificate and CA atomically) nor the HTTPS client ([`ControllerClient`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use umbra_pki::TlsIdentity;
use umbra_proto::Role;
use umbra_proto::api::{BrokerInfo, EnrollRequest, EnrollToken, IssuedCert, RenewRequest};

use crate::backoff::{Backoff, random_unit};
use crate::{ControllerClient, LinkError, fetch_pinned_ca};

/// Name of the file, next to the identity, that says where the controller is.
pub const CONTROLLER_FILE: &str = "controller.json";

/// Why enrollment or renewal failed.
///
/// Kept apart by whose fault it is: the operator's input ([`EnrollError::Token`]), the
/// network or the controller's refusal ([`EnrollError::Link`], e.g. `LinkError::Api` for a used
/// token or a revoked device, `LinkError::PinMismatch`), an answer that does not check out
/// ([`EnrollError::BadAnswer`]), and local key or file trouble ([`EnrollError::Pki`]).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("malformed enrollment token (expected umb1.<ca hash>.<secret>)")]
    Token,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("controller answer rejected: {0}")]
    BadAnswer(&'static str),
    /// The certificate the controller issued cannot be used by this host's clock: one of
    /// the two clocks is wrong (the message estimates by how much). An enrollment's identity
    /// is written all the same (its token is spent), and works once the clock is set right.
    #[error("{0}")]
    Clock(String),
    #[error(transparent)]
    Pki(#[from] umbra_pki::PkiError),
}

/// What a role keeps next to its identity: written at enrollment as `<dir>/controller.json`
/// (mode 0600), brokers refreshed by the roles as they learn newer lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerRef {
    /// Base URL of the controller's API, e.g. `https://controller.example:7443`.
    pub url: String,
    /// This device's identity, `umbra://ORG/ROLE/ID`.
    pub identity: String,
    /// For agents: the user the device is bound to.
    #[serde(default)]
    pub user: Option<String>,
    /// The brokers the controller named last.
    #[serde(default)]
    pub brokers: Vec<BrokerInfo>,
}

/// Redeems an enrollment token for a `role` identity: pins the controller's CA from the
/// token, generates a key on this device, sends a CSR to `POST /v1/enroll`, and writes the
/// identity directory and `controller.json` into `dir`. The controller refuses a token of
/// another role without spending it.
///
/// Nothing is written unless the controller's answer checks out (same CA as pinned, a
/// certificate for the key generated here).
pub async fn enroll(
    controller_url: &str,
    token: &str,
    dir: &Path,
    role: Role,
) -> Result<IssuedCert, EnrollError> {
    let token = EnrollToken::parse(token).map_err(|_| EnrollError::Token)?;
    let base = controller_url.trim_end_matches('/');
    let ca = fetch_pinned_ca(base, &token.ca_sha256).await?;
    let key_pem = umbra_pki::generate_key_pem()?;
    let csr_pem = umbra_pki::make_csr(&key_pem)?;
    let client = ControllerClient::new(base, &ca, None)?;
    let issued: IssuedCert = client
        .post(
            "/v1/enroll",
            &EnrollRequest {
                token: token.secret.clone(),
                csr_pem,
                role: Some(role.as_str().to_owned()),
            },
        )
        .await?;

    let issued_ca = pem_cert(&issued.ca_pem)?;
    if !umbra_pki::ct_eq(&umbra_pki::sha256(&issued_ca), &token.ca_sha256) {
        return Err(EnrollError::BadAnswer(
            "the controller answered with a CA other than the token's",
        ));
    }
    check_issued(&issued, &key_pem)?;
    // The controller reference first: a crash between the two writes then leaves no
    // identity (enroll again), not an identity that cannot find its controller and that
    // every later enrollment refuses to replace. The directory is made as the identity's
    // own writer makes it (private to this user).
    umbra_pki::private_dir_tight(dir).map_err(|e| local_io("use directory", dir, e))?;
    save_controller_ref(
        dir,
        &ControllerRef {
            url: base.to_owned(),
            identity: issued.identity.clone(),
            user: issued.user.clone(),
            brokers: issued.brokers.clone(),
        },
    )?;
    umbra_pki::write_identity_dir(dir, &key_pem, &issued.cert_pem, &issued.ca_pem)?;
    tracing::info!(identity = %issued.identity, serial = %issued.serial, not_after = issued.not_after, "enrolled");
    let issued_der = pem_cert(&issued.cert_pem)?;
    let validity = cert_validity(&issued_der)?;
    let now = SystemTime::now();
    let skew = clock_note(validity, now);
    if let Some(why) = unusable_here(validity, now) {
        // Written all the same: the token is spent, and the certificate is good by the
        // controller's clock; this host's clock is what must change.
        return Err(EnrollError::Clock(format!(
            "enrolled as {}, but {}: {why}. Set this host's clock right (NTP); the identity \
             is written to {} and works once it is",
            issued.identity,
            skew.as_deref()
                .unwrap_or("this host's clock disagrees with the controller's"),
            dir.display()
        )));
    }
    if let Some(note) = skew {
        tracing::warn!(clock = %note, "this host's clock disagrees with the controller's; certificates may be refused until it is set right");
    }
    Ok(issued)
}

/// How far this host's clock is ahead of the controller's, in seconds (negative: behind),
/// judged at `now` from a certificate the controller has just issued: Umbra's CA starts a
/// certificate [`umbra_pki::BACKDATE`] before its time of issue. Good to within the request's
/// round trip.
pub fn clock_offset((not_before, not_after): (SystemTime, SystemTime), now: SystemTime) -> i64 {
    let issued = issue_time(not_before, not_after);
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    match now.duration_since(issued) {
        Ok(ahead) => secs(ahead),
        Err(behind) => -secs(behind.duration()),
    }
}

/// "this host's clock is about 2 d ahead of the controller's", when the clocks differ by more
/// than [`SKEW_ALLOWED`] (judged as [`clock_offset`] judges); `None` within it.
pub fn clock_note(validity: (SystemTime, SystemTime), now: SystemTime) -> Option<String> {
    let offset = clock_offset(validity, now);
    let by = Duration::from_secs(offset.unsigned_abs());
    (by > SKEW_ALLOWED).then(|| {
        let side = if offset > 0 { "ahead of" } else { "behind" };
        format!(
            "this host's clock is about {} {side} the controller's",
            rough(by)
        )
    })
}

/// A duration as a person says it, to its largest unit: `2 d`, `5 h`, `12 min`, `40 s`.
fn rough(d: Duration) -> String {
    // Each unit from where the next smaller one would round up to it (23 h 59 min is 1 d).
    let s = d.as_secs();
    match s {
        84_600.. => format!("{} d", (s + 43_200) / 86_400),
        3_570.. => format!("{} h", (s + 1_800) / 3_600),
        60.. => format!("{} min", (s + 30) / 60),
        _ => format!("{s} s"),
    }
}

/// Why a certificate valid from `not_before` to `not_after` cannot be used at `now` by this
/// host's clock: it has expired, or starts more than [`SKEW_ALLOWED`] from now.
fn unusable_here(
    (not_before, not_after): (SystemTime, SystemTime),
    now: SystemTime,
) -> Option<&'static str> {
    if not_after <= now {
        Some("the certificate has already expired by this host's clock")
    } else if not_before > now + SKEW_ALLOWED {
        Some("the certificate is not valid yet by this host's clock")
    } else {
        None
    }
}

/// Renews the certificate in `dir`, `held` being the identity the caller uses: a new key and
/// CSR, `POST /v1/renew` authenticated with the current certificate, then the identity files
/// are replaced atomically. The identity must stay the same, and so must the CA.
///
/// Renewals of one directory take turns across processes (agent commands share one). A
/// renewal that waited for another's and finds `held` already replaced by a fresher
/// certificate asks the controller for nothing and answers `None`: the new identity is on
/// disk. Two commands started together after a suspend get one certificate, not one each.
/// A lock held longer than [`RENEW_LOCK_WAIT`] (a process stopped mid-renewal) is not
/// waited for further.
pub async fn renew(dir: &Path, held: &TlsIdentity) -> Result<Option<IssuedCert>, EnrollError> {
    let _turn = renewal_turn(dir).await;
    if let Some(on_disk) = renewed_elsewhere(dir, held, SystemTime::now()) {
        tracing::info!(serial = %on_disk.peer.serial_hex, "another process renewed the certificate");
        return Ok(None);
    }
    renew_now(dir).await.map(Some)
}

/// How long [`renew`] waits for another process's renewal of the same directory (callers
/// that bound a renewal add it to their bound).
pub const RENEW_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Waits (in steps, so that a caller's timeout can end the wait) for the renewal lock of
/// `dir`, at most [`RENEW_LOCK_WAIT`]; `None` if it could not be had (then the renewal goes
/// ahead without it: at worst two certificates for one).
async fn renewal_turn(dir: &Path) -> Option<std::fs::File> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match umbra_pki::try_lock_renewal(dir) {
            Ok(Some(f)) => return Some(f),
            Ok(None) if start.elapsed() < RENEW_LOCK_WAIT => {
                if !said && start.elapsed() >= Duration::from_secs(1) {
                    said = true;
                    tracing::info!(dir = %dir.display(), "waiting for another process renewing this certificate");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None) => {
                tracing::warn!(dir = %dir.display(), "another process has been renewing this certificate for long; renewing anyway");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot take the renewal lock; renewing anyway");
                return None;
            }
        }
    }
}

async fn renew_now(dir: &Path) -> Result<IssuedCert, EnrollError> {
    let current = TlsIdentity::load_dir(dir)?;
    let mut cref = load_controller_ref(dir)?;
    let key_pem = umbra_pki::generate_key_pem()?;
    let csr_pem = umbra_pki::make_csr(&key_pem)?;
    let client = ControllerClient::new(&cref.url, &current.ca, Some(&current))?;
    let issued: IssuedCert = client.post("/v1/renew", &RenewRequest { csr_pem }).await?;

    if pem_cert(&issued.ca_pem)?.as_ref() != current.ca.as_ref() {
        return Err(EnrollError::BadAnswer(
            "the controller renewed under a different CA",
        ));
    }
    let fresh = check_issued(&issued, &key_pem)?;
    if fresh.peer.id != current.peer.id {
        return Err(EnrollError::BadAnswer(
            "the renewed certificate names another identity",
        ));
    }
    let now = SystemTime::now();
    let leaf = fresh
        .cert_chain
        .first()
        .ok_or(EnrollError::BadAnswer("no certificate in the answer"))?;
    let (not_before, not_after) = cert_validity(leaf)?;
    if let Some(why) = renewal_unusable((not_before, not_after), current.peer.not_after, now) {
        // Keeping the held certificate: one the controller's clock made unusable here would
        // replace it and lock this identity out.
        let skew = clock_note((not_before, not_after), now)
            .unwrap_or_else(|| "the controller's or this host's clock is wrong".to_owned());
        tracing::warn!(
            not_before = %umbra_pki::rfc3339(not_before),
            not_after = %umbra_pki::rfc3339(not_after),
            now = %umbra_pki::rfc3339(now),
            clock = %skew,
            "the renewed certificate is not valid by this host's clock; keeping the current one"
        );
        return Err(EnrollError::Clock(format!(
            "{why} ({skew}): the current certificate is kept; set the wrong clock right"
        )));
    }
    umbra_pki::write_identity_dir(dir, &key_pem, &issued.cert_pem, &issued.ca_pem)?;
    if !issued.brokers.is_empty() && issued.brokers != cref.brokers {
        cref.brokers = issued.brokers.clone();
        save_controller_ref(dir, &cref)?;
    }
    tracing::info!(identity = %issued.identity, serial = %issued.serial, not_after = issued.not_after, "certificate renewed");
    if let Some(note) = clock_note((not_before, not_after), now) {
        tracing::warn!(clock = %note, "this host's clock disagrees with the controller's; peers judge certificates by their own clocks, and renewals follow the controller's");
    }
    Ok(issued)
}

/// Reads `<dir>/controller.json`.
pub fn load_controller_ref(dir: &Path) -> Result<ControllerRef, LinkError> {
    let path = dir.join(CONTROLLER_FILE);
    let bytes = fs::read(&path).map_err(|e| local_io("read", &path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        local_io(
            "parse",
            &path,
            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        )
    })
}

/// Writes `<dir>/controller.json` atomically (temporary file, then rename), mode 0600.
pub fn save_controller_ref(dir: &Path, cref: &ControllerRef) -> Result<(), LinkError> {
    let path = dir.join(CONTROLLER_FILE);
    let bytes = serde_json::to_vec_pretty(cref).map_err(|e| {
        local_io(
            "encode",
            &path,
            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    umbra_pki::write_private_file(&path, &bytes).map_err(|e| local_io("write", &path, e))
}

/// When to renew: at two thirds of the certificate's lifetime, so that a renewal that fails
/// (controller away) still has a third of the lifetime to be retried in. The lifetime is the
/// one granted, from the issue: Umbra's CA starts a certificate [`umbra_pki::BACKDATE`] before
/// it issues it, for clocks that are behind, and counting that from the start would renew
/// short certificates at once. A window no longer than that (not one of Umbra's) counts whole.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let issued = issue_time(not_before, not_after);
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    issued + (lifetime - lifetime / 3)
}

/// When the controller issued a certificate valid from `not_before` to `not_after`, by its
/// clock: Umbra's CA starts one [`umbra_pki::BACKDATE`] before. A window no longer than that
/// (not one of Umbra's) starts at its issue.
fn issue_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    match not_after.duration_since(not_before) {
        Ok(window) if window > umbra_pki::BACKDATE => not_before + umbra_pki::BACKDATE,
        _ => not_before,
    }
}

/// When to renew the certificate in `dir` (`id`'s), by this host's clock: [`renew_at`],
/// moved by how far this host's clock was from the controller's when the certificate arrived
/// (its file's time of writing, against the issue time the certificate carries; see
/// [`clock_offset`]). A host 3 minutes behind then renews 3 minutes earlier by its clock,
/// not after a short certificate has expired; a host ahead renews later by its clock, not at
/// once after every renewal. Never later than a twelfth of the lifetime before the expiry
/// (a file copied long after its issue says nothing of the clock), nor before the start.
pub fn renew_due(dir: &Path, id: &TlsIdentity) -> SystemTime {
    let Some(Ok((not_before, not_after))) = id.cert_chain.first().map(cert_validity) else {
        return id.peer.not_after;
    };
    let due = renew_at(not_before, not_after);
    let Ok(written) = umbra_pki::cert_written_at(dir) else {
        return due;
    };
    let offset = Duration::from_secs(clock_offset((not_before, not_after), written).unsigned_abs());
    let moved = if written >= issue_time(not_before, not_after) {
        due + offset
    } else {
        due.checked_sub(offset).unwrap_or(not_before)
    };
    let lifetime = not_after
        .duration_since(issue_time(not_before, not_after))
        .unwrap_or_default();
    let latest = not_after.checked_sub(lifetime / 12).unwrap_or(not_before);
    moved.clamp(not_before, latest.max(not_before))
}

/// Why a renewed certificate valid from `not_before` to `not_after` must not replace the held
/// one (valid until `held_not_after`) at `now`, by this host's clock: it has already expired
/// (a controller whose clock is behind), or it starts more than [`SKEW_ALLOWED`] from now
/// while the held one is still valid for more than [`LAST_CHANCE`] (a controller whose clock is ahead: brokers with a right
/// clock would refuse it, and new links would fail until it starts; retried, the controller's
/// clock may have been set right). In its last minutes the held certificate can renew no more
/// once it expires, so a certificate that starts later is the better of the two. `None`: use
/// it.
pub fn renewal_unusable(
    (not_before, not_after): (SystemTime, SystemTime),
    held_not_after: SystemTime,
    now: SystemTime,
) -> Option<&'static str> {
    let why = unusable_here((not_before, not_after), now)?;
    let held_left = held_not_after.duration_since(now).unwrap_or(Duration::ZERO);
    (not_after <= now || held_left > LAST_CHANCE).then_some(why)
}

/// See [`renewal_unusable`]: twice the longest wait between two renewal attempts.
const LAST_CHANCE: Duration = Duration::from_secs(120);
/// How far this host's clock may be behind the controller's before a renewed certificate
/// counts as not valid yet: brokers with a right clock take a certificate this host sees
/// start a few minutes ahead (a laptop without time sync drifts), and refusing it would
/// spend the renewal rate limit on certificates thrown away.
const SKEW_ALLOWED: Duration = Duration::from_secs(600);

/// The validity window of a certificate, DER.
pub fn cert_validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), EnrollError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| EnrollError::BadAnswer("unparsable certificate"))?;
    let v = parsed.validity();
    Ok((
        unix_to_system(v.not_before.timestamp()),
        unix_to_system(v.not_after.timestamp()),
    ))
}

/// First delay between failed renewal attempts, and the longest.
const RENEW_RETRY_BASE: Duration = Duration::from_secs(5);
const RENEW_RETRY_CAP: Duration = Duration::from_secs(300);
/// Longest single sleep while waiting for the renewal time or between retries: wall-clock
/// time jumps (a suspend, during which tokio's timer stands still; clock corrections) are
/// noticed at least this often. A laptop that wakes close to its certificate's expiry must
/// renew at once, not after a sleep begun before the suspend has run out.
const RENEW_WAKE_INTERVAL: Duration = Duration::from_secs(15);
/// Usual least time between two successful renewals. Certificates start a minute before they
/// are issued (clock skew), so with a lifetime under a minute and a half the renewal time of a
/// fresh certificate is already past: without a gap such a peer would renew in a tight loop.
/// See [`renew_gap`].
const MIN_RENEW_GAP: Duration = Duration::from_secs(30);
/// The gap is never shorter than this, whatever the lifetime.
const RENEW_GAP_FLOOR: Duration = Duration::from_secs(2);

/// Starts a background task that renews the identity in `dir` at [`renew_at`] (retrying with
/// backoff on failure) and publishes each new identity on the returned channel, which starts
/// with `current`. The task ends when every receiver is dropped.
///
/// Holders of long-lived connections keep them; new connections should use the latest
/// identity from the channel.
///
/// Once the certificate has expired unrenewed, renewal goes on for [`AFTER_EXPIRY_FOR`] (the
/// controller renews within its grace), or until the controller refuses, then stops and the
/// channel closes: a forward waiting in [`until_expired`] stops and says so (started again,
/// it renews first).
pub fn spawn_renewal(dir: PathBuf, current: Arc<TlsIdentity>) -> watch::Receiver<Arc<TlsIdentity>> {
    spawn(dir, current, AfterExpiry::GiveUp)
}

/// [`spawn_renewal`] for a holder that runs on past its certificate's expiry (a broker, a
/// connector: unattended, they recover by themselves when the controller is back): after
/// expiry it keeps trying, at most [`RENEW_WAKE_INTERVAL`] apart, until the controller renews
/// or refuses for good (revoked, or expired beyond its grace); then the channel closes.
pub fn spawn_renewal_until_refused(
    dir: PathBuf,
    current: Arc<TlsIdentity>,
) -> watch::Receiver<Arc<TlsIdentity>> {
    spawn(dir, current, AfterExpiry::UntilRefused)
}

/// What renewal does once the held certificate has expired unrenewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterExpiry {
    /// Attempts for [`AFTER_EXPIRY_FOR`], then it stops.
    GiveUp,
    /// Attempts at most [`RENEW_WAKE_INTERVAL`] apart until a refusal for good.
    UntilRefused,
}

fn spawn(
    dir: PathBuf,
    current: Arc<TlsIdentity>,
    after: AfterExpiry,
) -> watch::Receiver<Arc<TlsIdentity>> {
    let (tx, rx) = watch::channel(current);
    tokio::spawn(async move {
        tokio::select! {
            () = renewal_loop(&dir, &tx, after) => {}
            () = tx.closed() => {}
        }
    });
    rx
}

/// The identity in `dir` if it is another certificate of `held`'s peer, valid at `now` and
/// ending no earlier than `held` (another process sharing the directory renewed it: the
/// controller then refuses a renewal with the older one). Certificate times are whole
/// seconds: a renewal made within a second of `held`'s issue ends when it does.
pub fn renewed_elsewhere(dir: &Path, held: &TlsIdentity, now: SystemTime) -> Option<TlsIdentity> {
    let on_disk = TlsIdentity::load_dir(dir).ok()?;
    (on_disk.peer.id == held.peer.id
        && on_disk.peer.serial_hex != held.peer.serial_hex
        && on_disk.peer.not_after > now
        && on_disk.peer.not_after >= held.peer.not_after)
        .then_some(on_disk)
}

async fn renewal_loop(dir: &Path, tx: &watch::Sender<Arc<TlsIdentity>>, after: AfterExpiry) {
    loop {
        let current = tx.borrow().clone();
        let Some(leaf) = current.cert_chain.first() else {
            tracing::warn!(dir = %dir.display(), "identity has no certificate; not renewing");
            return;
        };
        if let Err(e) = cert_validity(leaf) {
            tracing::warn!(error = %e, "cannot read the certificate's validity; not renewing");
            return;
        }
        // By the controller's time as this host's clock stood when the certificate came: a
        // host ahead by more than a third of the lifetime would otherwise find each new
        // certificate due at once, and renew in a loop until the controller refuses it.
        let due = renew_due(dir, &current);
        // Sleep in bounded steps against the wall clock: the deadline is a wall-clock time.
        loop {
            let left = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(RENEW_WAKE_INTERVAL)).await;
        }

        let mut backoff = Backoff::new(RENEW_RETRY_BASE, RENEW_RETRY_CAP);
        let held_not_after = current.peer.not_after;
        // Attempts made once the held certificate had expired (the controller renews one
        // within its grace: a suspend past the expiry), and when the first of them started.
        let mut after_expiry = 0;
        let mut first_after_expiry: Option<std::time::Instant> = None;
        let fresh = loop {
            let expired = SystemTime::now() >= held_not_after;
            after_expiry += u32::from(expired);
            if expired && first_after_expiry.is_none() {
                first_after_expiry = Some(std::time::Instant::now());
            }
            let refused = match renew(dir, &current).await {
                Ok(_) => match TlsIdentity::load_dir(dir) {
                    Ok(id) => break Arc::new(id),
                    Err(e) => {
                        tracing::warn!(error = %e, "renewed, but cannot reload the identity");
                        false
                    }
                },
                Err(e) => {
                    // Another process sharing the directory may have renewed it first (the
                    // controller then refuses this one's older certificate).
                    if let Some(id) = renewed_elsewhere(dir, &current, SystemTime::now()) {
                        tracing::info!(serial = %id.peer.serial_hex, "using the certificate another process renewed");
                        break Arc::new(id);
                    }
                    tracing::warn!(error = %e, "certificate renewal failed; will retry");
                    e.is_refusal()
                }
            };
            let now = SystemTime::now();
            let Ok(left) = held_not_after.duration_since(now) else {
                if after == AfterExpiry::UntilRefused && !(expired && refused) {
                    if after_expiry == 1 {
                        tracing::error!(
                            not_after = %umbra_pki::rfc3339(held_not_after),
                            "the certificate expired before it could be renewed; renewal goes on (the controller renews for a while after expiry)"
                        );
                    }
                    let delay = backoff
                        .next_delay(random_unit())
                        .clamp(RENEW_RETRY_BASE, RENEW_WAKE_INTERVAL);
                    tokio::time::sleep(delay).await;
                    continue;
                }
                let window_spent =
                    first_after_expiry.is_some_and(|t| t.elapsed() >= AFTER_EXPIRY_FOR);
                if window_spent || (expired && refused) {
                    // Whoever waits on this identity learns that no renewal comes (the
                    // channel closes): a forward or connector stops and says to enroll again.
                    tracing::error!(
                        not_after = %umbra_pki::rfc3339(held_not_after),
                        "the certificate expired and the controller did not renew it; renewal stops. Start again to retry, or enroll again with a new token from the administrator"
                    );
                    return;
                }
                // The first attempt after expiry comes at once, the next ones after growing
                // pauses (a network coming back after a resume), for AFTER_EXPIRY_FOR.
                if after_expiry > 0 {
                    let delay = backoff
                        .next_delay(random_unit())
                        .clamp(RENEW_RETRY_BASE, RENEW_WAKE_INTERVAL);
                    tokio::time::sleep(delay).await;
                }
                continue;
            };
            // At least one base interval, so a persistent failure never spins; at most a
            // quarter of what is left, so the last tries come before expiry, not after it;
            // and never past the expiry, when one more attempt is due at once.
            let delay = retry_delay(backoff.next_delay(random_unit()), left);
            tokio::time::sleep(delay.min(left)).await;
        };
        let gap = match fresh.cert_chain.first().map(cert_validity) {
            Some(Ok((_, not_after))) => renew_gap(SystemTime::now(), not_after),
            _ => MIN_RENEW_GAP,
        };
        if tx.send(fresh).is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
}

/// How long renewal goes on failing after the held certificate expired before it gives up
/// ([`spawn_renewal`]): long enough for a network to come back after a resume.
const AFTER_EXPIRY_FOR: Duration = Duration::from_secs(30);

impl EnrollError {
    /// Whether this was the controller's refusal rather than a failure to reach it: an API
    /// error that says this identity may not (401, 403: revoked, disabled, expired beyond the
    /// grace, renewed before and the renewal in use), or a TLS alert its handshake sent (a
    /// certificate it does not accept, e.g. expired with no grace left). Retrying those
    /// changes nothing.
    pub fn is_refusal(&self) -> bool {
        match self {
            EnrollError::Link(LinkError::Api { status, .. }) => matches!(status, 401 | 403),
            EnrollError::Link(LinkError::Tls(rustls::Error::AlertReceived(_))) => true,
            EnrollError::Link(LinkError::Http(e)) => matches!(
                crate::error::tls_cause(e),
                Some(rustls::Error::AlertReceived(_))
            ),
            _ => false,
        }
    }
}

/// The wait before retrying a failed renewal: the backoff's `delay`, but no more than a
/// quarter of the `left` validity of the held certificate nor [`RENEW_WAKE_INTERVAL`], and
/// never under [`RENEW_RETRY_BASE`].
fn retry_delay(delay: Duration, left: Duration) -> Duration {
    delay
        .min(left / 4)
        .min(RENEW_WAKE_INTERVAL)
        .max(RENEW_RETRY_BASE)
}

/// Waits until the certificate last published on `identity` has expired, by the wall clock
/// (checked every [`RENEW_WAKE_INTERVAL`]: tokio's timer stands still across a suspend), and the
/// renewal's attempts after expiry (within the controller's grace) have failed too; returns
/// its expiry. Never returns while renewals keep up.
pub async fn until_expired(mut identity: watch::Receiver<Arc<TlsIdentity>>) -> SystemTime {
    loop {
        let not_after = identity.borrow_and_update().peer.not_after;
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            r = identity.changed() => {
                if r.is_err() {
                    // No more renewals: only the wall clock can still end the certificate.
                    return wall_clock_reaches(not_after).await;
                }
                continue;
            }
            () = tokio::time::sleep(left.min(RENEW_WAKE_INTERVAL)) => {}
        }
        if SystemTime::now() < not_after {
            continue;
        }
        // Expired: the renewal either renews after all or gives up (the channel closes). Its
        // attempts may start a wake interval late after a resume; bounded all the same.
        match tokio::time::timeout(EXPIRED_VERDICT_WAIT, identity.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return not_after,
        }
    }
}

/// Waits until renewal has ended for good on `identity` (the channel closed: the controller
/// refused, see [`spawn_renewal_until_refused`]) with the certificate last published expired;
/// returns its expiry. Never returns while renewal goes on, even past the expiry.
pub async fn until_renewal_ends(mut identity: watch::Receiver<Arc<TlsIdentity>>) -> SystemTime {
    while identity.changed().await.is_ok() {}
    let not_after = identity.borrow().peer.not_after;
    wall_clock_reaches(not_after).await
}

/// How long [`until_expired`] waits, once the certificate expired, for the renewal's attempts
/// after expiry: a wake-up, [`AFTER_EXPIRY_FOR`] and the requests of its last attempt.
const EXPIRED_VERDICT_WAIT: Duration = Duration::from_secs(120);

/// Returns `at` once the wall clock has reached it (checked every [`RENEW_WAKE_INTERVAL`]).
async fn wall_clock_reaches(at: SystemTime) -> SystemTime {
    loop {
        match at.duration_since(SystemTime::now()) {
            Ok(left) if !left.is_zero() => {
                tokio::time::sleep(left.min(RENEW_WAKE_INTERVAL)).await;
            }
            _ => return at,
        }
    }
}

/// How long to wait after a successful renewal, at `now`, of a certificate valid until
/// `not_after`, before the next renewal may start: [`MIN_RENEW_GAP`], but no more than two
/// thirds of what is left of the new certificate, so that a lifetime shorter than the gap does
/// not lapse before the next renewal (an expired certificate cannot authenticate a renewal: the
/// holder would be locked out for good); and never under [`RENEW_GAP_FLOOR`], so that no
/// lifetime makes it spin.
fn renew_gap(now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    (left * 2 / 3).clamp(RENEW_GAP_FLOOR, MIN_RENEW_GAP)
}

/// Checks that the issued certificate fits the key generated here and carries an identity.
fn check_issued(issued: &IssuedCert, key_pem: &str) -> Result<TlsIdentity, EnrollError> {
    let id = TlsIdentity::from_pem(&issued.cert_pem, key_pem, &issued.ca_pem)?;
    if id.peer.id.to_uri() != issued.identity {
        return Err(EnrollError::BadAnswer(
            "the certificate's identity differs from the one the controller reported",
        ));
    }
    let not_after = id
        .peer
        .not_after
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if not_after != issued.not_after {
        return Err(EnrollError::BadAnswer(
            "the certificate's expiry differs from the one the controller reported",
        ));
    }
    Ok(id)
}

fn pem_cert(pem: &str) -> Result<CertificateDer<'static>, EnrollError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| EnrollError::BadAnswer("the controller's CA certificate is not valid PEM"))
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn local_io(op: &'static str, path: &Path, e: io::Error) -> LinkError {
    LinkError::Io(io::Error::new(
        e.kind(),
        format!("{op} {}: {e}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// What the controller reports about a certificate must be what the certificate says:
    /// the caller prints and schedules by it.
    #[test]
    fn an_answer_must_report_the_certificate_as_it_is() {
        umbra_pki::install_crypto_provider();
        let ca = umbra_pki::Ca::generate("default", SystemTime::now()).unwrap();
        let id = umbra_proto::PeerId::new("default", umbra_proto::Role::Agent, "d1").unwrap();
        let p = umbra_pki::test_util::issue_pems(
            &ca,
            id.clone(),
            vec![],
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let held = TlsIdentity::from_pem(&p.cert_pem, &p.key_pem, ca.cert_pem()).unwrap();
        let not_after = held
            .peer
            .not_after
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let issued = |identity: String, not_after: u64| IssuedCert {
            identity,
            cert_pem: p.cert_pem.clone(),
            ca_pem: ca.cert_pem().to_owned(),
            serial: String::new(),
            not_after,
            user: None,
            brokers: vec![],
        };
        assert!(check_issued(&issued(id.to_uri(), not_after), &p.key_pem).is_ok());
        for bad in [not_after + 1, u64::MAX] {
            let e = check_issued(&issued(id.to_uri(), bad), &p.key_pem).unwrap_err();
            assert!(e.to_string().contains("expiry"), "{e}");
        }
        let other = "umbra://default/agent/d2".to_owned();
        assert!(check_issued(&issued(other, not_after), &p.key_pem).is_err());
    }

    /// A renewed certificate that has already expired here, or that is not valid yet while
    /// the held one still is, never replaces the held one; the twins are used.
    #[test]
    fn renewals_this_clock_cannot_use_are_refused() {
        let now = t(1_000_000);
        let h = Duration::from_secs(3600);
        let held = now + 8 * h;
        // The controller's clock two days behind: expired on arrival.
        let behind = (now - 50 * h, now - 26 * h);
        assert!(renewal_unusable(behind, held, now).is_some());
        // A day ahead: not valid yet, while the held one is for 8 more hours.
        let ahead = (now + 24 * h, now + 48 * h);
        assert!(renewal_unusable(ahead, held, now).is_some());
        // ... but in the held one's last minutes, it is the better of the two.
        assert_eq!(
            renewal_unusable(ahead, now + Duration::from_secs(90), now),
            None
        );
        assert!(renewal_unusable(ahead, now + Duration::from_secs(180), now).is_some());
        // In step (backdated a minute), or a few minutes ahead (this host's clock a little
        // slow): used; more than ten minutes ahead: not.
        let minute = Duration::from_secs(60);
        assert_eq!(
            renewal_unusable((now - minute, now + 24 * h), held, now),
            None
        );
        assert_eq!(renewal_unusable((now, now + 24 * h), held, now), None);
        assert_eq!(
            renewal_unusable((now + 5 * minute, now + 24 * h), held, now),
            None
        );
        assert!(renewal_unusable((now + 11 * minute, now + 24 * h), held, now).is_some());
    }

    /// Retries come at least every base interval, at most every wake interval, and more often as
    /// expiry nears.
    #[test]
    fn retries_quicken_near_expiry() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(300), s(86_400)), RENEW_WAKE_INTERVAL);
        assert_eq!(retry_delay(s(300), s(40)), s(10));
        assert_eq!(retry_delay(s(300), s(4)), RENEW_RETRY_BASE);
        assert_eq!(retry_delay(s(1), s(86_400)), RENEW_RETRY_BASE);
    }

    #[test]
    fn renew_at_two_thirds() {
        let back = umbra_pki::BACKDATE;
        // 24 h certificate issued at t=1000, started BACKDATE earlier by the CA: two thirds
        // of the 24 h granted.
        assert_eq!(renew_at(t(1000) - back, t(1000 + 86_400)), t(1000 + 57_600));
        // A 3 s certificate renews 2 s after its issue, not at once.
        assert_eq!(renew_at(t(1000) - back, t(1003)), t(1002));
        // A window without the CA's early start (not one of Umbra's) counts whole.
        assert_eq!(renew_at(t(0), t(3)), t(2));
        assert_eq!(renew_at(t(10), t(10)), t(10));
        // Sub-second precision does not drift.
        let nb = t(100);
        let na = nb + Duration::from_millis(3001);
        let at = renew_at(nb, na);
        assert!(at > nb + Duration::from_millis(2000) && at < nb + Duration::from_millis(2001));
    }

    #[test]
    fn the_clock_offset_is_read_from_a_fresh_certificate() {
        let back = umbra_pki::BACKDATE;
        let day = Duration::from_secs(86_400);
        // Issued at t=100 000 by the controller's clock: started BACKDATE before.
        let issued = t(100_000);
        let cert = (issued - back, issued + day);
        assert_eq!(clock_offset(cert, issued), 0);
        assert_eq!(
            clock_offset(cert, issued + Duration::from_secs(7_200)),
            7_200
        );
        assert_eq!(clock_offset(cert, issued - Duration::from_secs(90)), -90);
        // Within what is allowed: nothing to say.
        assert_eq!(clock_note(cert, issued + back), None);
        assert_eq!(clock_note(cert, issued - back), None);
        assert_eq!(
            clock_note(cert, issued + 2 * day).as_deref(),
            Some("this host's clock is about 2 d ahead of the controller's")
        );
        assert_eq!(
            clock_note(cert, issued - Duration::from_secs(5 * 3600 + 100)).as_deref(),
            Some("this host's clock is about 5 h behind the controller's")
        );
        assert_eq!(
            clock_note(cert, issued + Duration::from_secs(12 * 60 + 10)).as_deref(),
            Some("this host's clock is about 12 min ahead of the controller's")
        );
        // A window without the CA's early start counts from its start.
        assert_eq!(clock_offset((t(10), t(13)), t(12)), 2);
        for (secs, said) in [
            (86_399, "1 d"),
            (84_600, "1 d"),
            (84_599, "23 h"),
            (3_599, "1 h"),
            (3_569, "59 min"),
            (59, "59 s"),
        ] {
            assert_eq!(rough(Duration::from_secs(secs)), said);
        }
    }

    #[test]
    fn renew_at_inverted_window_is_now_due() {
        assert_eq!(renew_at(t(100), t(50)), t(100));
    }

    #[test]
    fn renew_at_is_inside_the_window() {
        let back = umbra_pki::BACKDATE.as_secs();
        for (nb, life) in [
            (0u64, 1u64),
            (5, 7),
            (1_700_000_000, 604_800),
            (42, 86_400),
            (42, back),
            (42, back + 1),
            (42, back + 3),
        ] {
            let at = renew_at(t(nb), t(nb + life));
            assert!(at >= t(nb) && at <= t(nb + life));
            // Of the lifetime granted (from the issue, BACKDATE after the start when the window
            // is longer than that), more than half is used and at least a quarter remains.
            let granted = if life > back { life - back } else { life };
            let issued = t(nb + life - granted);
            let used = at.duration_since(issued).unwrap_or_default();
            assert!(used * 2 >= Duration::from_secs(granted), "{nb} {life}");
            let left = t(nb + life).duration_since(at).unwrap_or_default();
            assert!(left * 4 >= Duration::from_secs(granted), "{nb} {life}");
        }
    }

    #[test]
    fn renew_gap_stays_inside_short_lifetimes() {
        let now = t(1_000);
        // Long lifetimes: the usual gap (the renewal point then lies far beyond it anyway).
        assert_eq!(
            renew_gap(now, now + Duration::from_secs(86_400)),
            MIN_RENEW_GAP
        );
        assert_eq!(renew_gap(now, now + Duration::from_secs(45)), MIN_RENEW_GAP);
        // Shorter than the gap: two thirds of what is left, so the next renewal comes first.
        assert_eq!(
            renew_gap(now, now + Duration::from_secs(20)),
            Duration::from_secs(40) / 3
        );
        assert_eq!(
            renew_gap(now, now + Duration::from_secs(6)),
            Duration::from_secs(4)
        );
        // Never a tight loop, also for what has (nearly) expired.
        assert_eq!(
            renew_gap(now, now + Duration::from_secs(1)),
            RENEW_GAP_FLOOR
        );
        assert_eq!(renew_gap(now, now), RENEW_GAP_FLOOR);
        assert_eq!(renew_gap(now, t(10)), RENEW_GAP_FLOOR);
        for life in [1u64, 3, 20, 29, 30, 31, 44, 60, 600, 86_400] {
            let g = renew_gap(now, now + Duration::from_secs(life));
            assert!(g >= RENEW_GAP_FLOOR && g <= MIN_RENEW_GAP, "{life}: {g:?}");
            if life >= 3 {
                assert!(g < Duration::from_secs(life), "{life}: {g:?} outlives it");
            }
        }
    }

    #[test]
    fn controller_ref_round_trip_and_mode() {
        let dir = std::env::temp_dir().join(format!(
            "umbra-enroll-test-{}",
            u64::from_le_bytes(umbra_pki::random_bytes::<8>())
        ));
        fs::create_dir_all(&dir).unwrap();
        let r = ControllerRef {
            url: "https://127.0.0.1:7443".into(),
            identity: "umbra://default/agent/d-1".into(),
            user: Some("alice@example.test".into()),
            brokers: vec![BrokerInfo {
                id: "b-1".into(),
                name: "eu".into(),
                quic_addr: Some("127.0.0.1:4433".into()),
                tcp_addr: None,
                server_name: "b-1.broker.umbra.internal".into(),
            }],
        };
        save_controller_ref(&dir, &r).unwrap();
        assert_eq!(load_controller_ref(&dir).unwrap(), r);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(CONTROLLER_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_controller_ref_is_an_error() {
        assert!(load_controller_ref(Path::new("/nonexistent/umbra")).is_err());
    }
}
