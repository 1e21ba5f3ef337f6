//! Who a peer is, and this process's own identity on disk.
//!
//! A peer's identity is read from the leaf certificate of a verified TLS handshake
//! (`peer_certificates()[0]`) and from nothing else: exactly one `umbra://ORG/ROLE/ID` URI SAN,
//! parsed strictly by [`PeerId::from_uri`]. Further certificates in the presented chain are
//! never consulted for identity.
//!
//! An identity directory holds `key.pem`, `cert.pem` and `ca.pem`; files are written atomically
//! (temporary file, fsync, rename) with mode 0600 in a 0700 directory.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use umbra_proto::PeerId;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::crypto::random_bytes;
use crate::error::PkiError;

/// The identity and validity read from a peer's leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerCert {
    /// Organisation, role and id from the certificate's one `umbra://` URI SAN.
    pub id: PeerId,
    /// Serial number, lowercase hex of its DER content bytes.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Reads the identity from a leaf certificate: exactly one `umbra://` URI SAN (DNS and IP SANs
/// may accompany it); anything else is [`PkiError::Identity`].
///
/// This does not verify the certificate: call it on the leaf of a handshake that did.
pub fn peer_cert(leaf: &CertificateDer<'_>) -> Result<PeerCert, PkiError> {
    let cert = parse_cert(leaf)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::Identity("malformed or duplicate subjectAltName".into()))?
        .ok_or_else(|| PkiError::Identity("no subjectAltName".into()))?;
    let mut uri = None;
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => {
                if uri.replace(*u).is_some() {
                    return Err(PkiError::Identity("more than one URI name".into()));
                }
            }
            GeneralName::DNSName(_) | GeneralName::IPAddress(_) => {}
            _ => return Err(PkiError::Identity("unexpected kind of name".into())),
        }
    }
    let uri = uri.ok_or_else(|| PkiError::Identity("no umbra:// URI name".into()))?;
    let id = PeerId::from_uri(uri).map_err(|e| PkiError::Identity(e.to_string()))?;
    Ok(PeerCert {
        id,
        serial_hex: hex::encode(cert.raw_serial()),
        not_after: to_system_time(cert.validity().not_after.to_datetime())?,
    })
}

/// End of validity of the first certificate in `cert_pem`.
pub fn cert_not_after(cert_pem: &str) -> Result<SystemTime, PkiError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| PkiError::Cert("not a PEM certificate".into()))?;
    let cert = parse_cert(&der)?;
    to_system_time(cert.validity().not_after.to_datetime())
}

/// This process's TLS identity: certificate chain (leaf first), key, the organisation CA it
/// trusts, and its own identity read from the leaf.
pub struct TlsIdentity {
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The organisation CA: the only trust anchor for peers.
    pub ca: CertificateDer<'static>,
    /// Identity from the leaf.
    pub peer: PeerCert,
}

impl TlsIdentity {
    /// Builds an identity from PEM. Checks that the key matches the leaf, that the leaf carries
    /// a valid identity and that it is signed by `ca_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, PkiError> {
        let cert_chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| PkiError::Cert("certificate chain is not PEM".into()))?;
        let leaf = cert_chain
            .first()
            .ok_or_else(|| PkiError::Cert("no certificate in certificate PEM".into()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| PkiError::Key("not a PEM private key"))?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|_| PkiError::Cert("CA certificate is not PEM".into()))?;
        let peer = peer_cert(leaf)?;

        let provider = crate::tls::crypto_provider();
        rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider)
            .map_err(|_| PkiError::Key("private key does not match the certificate"))?;
        let leaf_cert = parse_cert(leaf)?;
        let ca_cert = parse_cert(&ca)?;
        leaf_cert
            .verify_signature(Some(ca_cert.public_key()))
            .map_err(|_| PkiError::Cert("certificate is not issued by the given CA".into()))?;

        Ok(TlsIdentity {
            cert_chain,
            key,
            ca,
            peer,
        })
    }

    /// Loads `key.pem`, `cert.pem` and `ca.pem` from `dir`.
    ///
    /// If `key.pem` does not match the certificate but `key.pem.next` does, that key is used:
    /// [`write_identity_dir`] was interrupted between replacing the certificate and moving
    /// its key into place (see there). The directory is left as it is; the next write
    /// completes it.
    ///
    /// A key file that other users can read, or that another user owns, is refused (as
    /// OpenSSH refuses an unprotected private key): copied with the wrong mode, it may
    /// already have been read, and a renewal that would set it right can be hours away.
    pub fn load_dir(dir: &Path) -> Result<Self, PkiError> {
        // A directory others could change fails here, at start, not at the first renewal.
        match check_private_dir(dir) {
            // A missing one is reported by the read of its first file.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(PkiError::io("use directory", dir, e));
            }
            _ => {}
        }
        let read = |name: &str| {
            let path = dir.join(name);
            if name == "key.pem" || name == NEXT_KEY {
                match check_private_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(PkiError::io("use", &path, e));
                    }
                    _ => {}
                }
            }
            fs::read_to_string(&path).map_err(|e| PkiError::io("read", &path, e))
        };
        let (cert, ca) = (read("cert.pem")?, read("ca.pem")?);
        let key = match read("key.pem") {
            Ok(k) => k,
            // A first write interrupted before its key was moved into place.
            Err(e) => {
                return match read(NEXT_KEY) {
                    Ok(next) => Self::from_pem(&cert, &next, &ca).map_err(|_| e),
                    Err(_) => Err(e),
                };
            }
        };
        match Self::from_pem(&cert, &key, &ca) {
            Err(e @ PkiError::Key(_)) => match read(NEXT_KEY) {
                Ok(next) => Self::from_pem(&cert, &next, &ca).map_err(|_| e),
                Err(_) => Err(e),
            },
            r => r,
        }
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            peer: self.peer.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("peer", &self.peer)
            .field("chain_len", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// Where [`write_identity_dir`] puts a new key until its certificate is in place.
const NEXT_KEY: &str = "key.pem.next";

/// Locked while [`write_identity_dir`] writes: two processes renewing one identity (two
/// `umbra agent forward` run from one directory renew at the same moment) would otherwise
/// interleave their steps and leave a certificate with the other's key, which loads nowhere.
const WRITE_LOCK: &str = ".identity.lock";

/// Writes an identity directory: `dir` mode 0700; `key.pem`, `cert.pem`, `ca.pem` mode 0600,
/// each replaced atomically (temporary file, fsync, rename, fsync of the directory).
///
/// A renewal replaces the key and the certificate together, which no single rename can do.
/// When the certificate in the identity directory `dir` was written, by this host's clock:
/// for a certificate written as it arrived, when this host received it.
pub fn cert_written_at(dir: &Path) -> std::io::Result<SystemTime> {
    fs::metadata(dir.join("cert.pem"))?.modified()
}

/// The new key goes to `key.pem.next` first, then the certificate replaces `cert.pem`, then
/// the key is renamed over `key.pem`. A crash at any point leaves a directory that
/// [`TlsIdentity::load_dir`] loads: the old pair, or the new certificate with its key still
/// in `key.pem.next`. Writers take turns on an exclusive lock of `.identity.lock`; readers
/// need none, since every state between the steps loads.
pub fn write_identity_dir(
    dir: &Path,
    key_pem: &str,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<(), PkiError> {
    private_dir_tight(dir).map_err(|e| PkiError::io("use directory", dir, e))?;
    let lock_path = dir.join(WRITE_LOCK);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // Never through a symlink planted in its place.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| PkiError::io("open", &lock_path, e))?;
    // Released when `lock` is dropped, at return.
    lock.lock()
        .map_err(|e| PkiError::io("lock", &lock_path, e))?;
    // An earlier write interrupted before its last step left the certificate's only key in
    // `key.pem.next`, which this write is about to replace: move it into place first.
    finish_interrupted_write(dir)?;
    sweep_temp_files(dir, SystemTime::now());
    // Each file is durable, its directory entry included, before the next step starts.
    write_atomic(dir, "ca.pem", ca_pem)?;
    write_atomic(dir, NEXT_KEY, key_pem)?;
    write_atomic(dir, "cert.pem", cert_pem)?;
    move_key_into_place(dir)
}

/// Held by the one process that runs a role on an identity directory (see
/// [`lock_instance`]).
const INSTANCE_LOCK: &str = ".instance.lock";

/// Takes the exclusive lock of a role's identity directory for as long as the returned file
/// lives: `None` if another process holds it. Two brokers (or connectors) on one identity
/// would take turns on every link (the peer keeps only the newest link per identity) and
/// share one audit spool; the second is refused instead. Agents' commands share a
/// directory by design and take no such lock.
pub fn lock_instance(dir: &Path) -> std::io::Result<Option<fs::File>> {
    try_lock(&dir.join(INSTANCE_LOCK))
}

/// Held while a process renews the certificate of an identity directory (see
/// [`try_lock_renewal`]).
const RENEW_LOCK: &str = ".renew.lock";

/// Takes the lock that serialises renewals of `dir`'s certificate across processes (agent
/// commands share a directory): `None` if another process holds it. Without it, two
/// commands started after a suspend would each get a certificate for the same expired one.
pub fn try_lock_renewal(dir: &Path) -> std::io::Result<Option<fs::File>> {
    try_lock(&dir.join(RENEW_LOCK))
}

/// An exclusive lock on the file at `path` (created 0600 if absent), held for as long as the
/// returned file lives; `None` if another open file holds it.
fn try_lock(path: &Path) -> std::io::Result<Option<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // Never through a symlink planted in its place.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Renames `key.pem.next` over `key.pem`, durably.
fn move_key_into_place(dir: &Path) -> Result<(), PkiError> {
    let (next, key) = (dir.join(NEXT_KEY), dir.join("key.pem"));
    fs::rename(&next, &key).map_err(|e| PkiError::io("rename", &next, e))?;
    sync_dir(dir).map_err(|e| PkiError::io("sync directory", dir, e))
}

/// Renames `key.pem.next` over `key.pem` if it is the key of `cert.pem` (the last step of an
/// interrupted [`write_identity_dir`]); anything else is left for the caller to overwrite.
fn finish_interrupted_write(dir: &Path) -> Result<(), PkiError> {
    let (Ok(next_pem), Ok(cert), Ok(ca)) = (
        fs::read_to_string(dir.join(NEXT_KEY)),
        fs::read_to_string(dir.join("cert.pem")),
        fs::read_to_string(dir.join("ca.pem")),
    ) else {
        return Ok(());
    };
    if TlsIdentity::from_pem(&cert, &next_pem, &ca).is_err() {
        return Ok(());
    }
    move_key_into_place(dir)
}

fn write_atomic(dir: &Path, name: &str, contents: &str) -> Result<(), PkiError> {
    let target = dir.join(name);
    write_private_file(&target, contents.as_bytes()).map_err(|e| PkiError::io("write", &target, e))
}

/// Makes `dir` (and its missing parents) a directory only this process's user can change,
/// where a role keeps its identity or state: a missing one is created with mode 0700; an
/// existing one must pass [`check_private_dir`].
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    check_private_dir(dir)
}

/// Checks that no other local user can change what is in `dir`: a directory another user made
/// first (under /tmp, say) would let them swap its files, read what is written there or point
/// a write at a file of ours. The directory must be owned by this user (the effective uid) or
/// by root; writable by nobody else, except by a group this process is in (a volume shared
/// through a group, as Kubernetes' `fsGroup` makes); and a symlink in its place must be this
/// user's or root's (as systemd's `StateDirectory=` makes). Refused otherwise, naming what is
/// wrong. Where the process's ids cannot be read (no `/proc`), only the mode is checked.
pub fn check_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{}: {why}", dir.display()),
        )
    };
    let ids = process_ids();
    let trusted = |uid: u32| uid == 0 || ids.as_ref().is_none_or(|i| i.uid == uid);
    let link = fs::symlink_metadata(dir)?;
    if link.file_type().is_symlink() && !trusted(link.uid()) {
        return Err(refuse(format!(
            "a symlink owned by uid {}, neither this user nor root; refusing to follow it",
            link.uid()
        )));
    }
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    if !trusted(meta.uid()) {
        return Err(refuse(format!(
            "owned by uid {}, neither this user nor root: its owner could replace what is kept \
             there; use a directory of this user's own",
            meta.uid()
        )));
    }
    let mode = meta.mode();
    // Group write is allowed on root's directories only, to a process that is not root (a
    // volume shared through a group): on one of ours the group bits may be an ACL mask that
    // lets another user in.
    let group_ok = meta.uid() == 0
        && ids
            .as_ref()
            .is_some_and(|i| i.uid != 0 && i.groups.contains(&meta.gid()));
    if mode & 0o002 != 0 || (mode & 0o020 != 0 && !group_ok) {
        return Err(refuse(format!(
            "writable by other users (mode {:o}): anything kept there could be replaced; \
             chmod 700 it, or use another directory",
            mode & 0o7777
        )));
    }
    Ok(())
}

/// [`private_dir`], then set to 0700 if this user owns it (a directory of root's, or shared
/// through a group, is left as its owner made it): for identity directories, which hold keys.
pub fn private_dir_tight(dir: &Path) -> std::io::Result<()> {
    private_dir(dir)?;
    tighten_if_ours(dir)
}

fn tighten_if_ours(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(dir)?.uid();
    if process_ids().is_none_or(|i| i.uid == owner) {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// This process's effective uid, and its effective and supplementary gids.
struct ProcessIds {
    uid: u32,
    groups: Vec<u32>,
}

/// Read from `/proc/self/status` (no `unsafe` call needed). Where there is no `/proc`, the
/// uid is the owner of a file this process creates (in the temporary directory), with no
/// supplementary groups known; `None` only if neither works (then only modes are checked).
fn process_ids() -> Option<ProcessIds> {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        use std::os::unix::fs::MetadataExt;
        let probe =
            std::env::temp_dir().join(format!(".umbra-uid-{}", hex::encode(random_bytes::<8>())));
        let made = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe);
        let ids = made
            .ok()
            .and_then(|f| f.metadata().ok())
            .map(|m| ProcessIds {
                uid: m.uid(),
                groups: vec![m.gid()],
            });
        let _ = fs::remove_file(&probe);
        return ids;
    };
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
    };
    // `Uid:` and `Gid:` list real, effective, saved and filesystem ids.
    let uid = *field("Uid:")?.get(1)?;
    let mut groups = field("Groups:").unwrap_or_default();
    groups.push(*field("Gid:")?.get(1)?);
    Some(ProcessIds { uid, groups })
}

/// Checks that the file at `path` (a private key, a key-encryption key) is this user's (or
/// root's) and that no other user can read or write it; refused otherwise, saying how to set
/// it right.
pub fn check_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    if let Some(ids) = process_ids()
        && meta.uid() != ids.uid
        && meta.uid() != 0
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, neither this user (uid {}) nor root",
                meta.uid(),
                ids.uid
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "other users may read it (mode {:o}): if they could, treat the key as leaked; \
                 chmod 600 {}",
                meta.mode() & 0o7777,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Replaces `path` atomically with `bytes`, readable by everyone (mode 0644), as
/// [`write_private_file`] does: for public files (a CA certificate). A symlink at `path` is
/// replaced, never followed.
pub fn write_public_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    put_file(path, bytes, 0o644, |tmp| fs::rename(tmp, path))
}

/// Replaces `path` atomically with `bytes`, readable by the owner only (mode 0600): a
/// temporary file beside it, fsync, rename, fsync of the directory. A crash leaves the old
/// content or the new one, never a mix, and once this returns the new one survives a power
/// cut; on error the temporary file is removed. For keys, identities and every state file a
/// role keeps (snapshot cache, published targets, tokens).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    put_file(path, bytes, 0o600, |tmp| fs::rename(tmp, path))
}

/// [`write_private_file`] for a cache that must not outlive a failed update (a snapshot, a
/// list of published targets): when the write fails, the copy at `path` is removed, so that
/// a restart finds none rather than an older one. `Err` holds the failure and whether no
/// copy is left. Removing a file works even on a full disk.
pub fn write_private_file_or_remove(
    path: &Path,
    bytes: &[u8],
) -> Result<(), (std::io::Error, bool)> {
    write_private_file(path, bytes).map_err(|e| {
        let gone = match fs::remove_file(path) {
            Ok(()) => true,
            Err(r) => r.kind() == std::io::ErrorKind::NotFound,
        };
        (e, gone)
    })
}

/// Creates `path` with `bytes`, mode 0600, failing with `AlreadyExists` if it exists; like
/// [`write_private_file`], a crash leaves no file or the whole one (never an empty or torn
/// one, which a later start would take for the real thing).
pub fn create_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    put_file(path, bytes, 0o600, |tmp| {
        // A hard link fails if `path` exists, where a rename would replace it.
        fs::hard_link(tmp, path)?;
        fs::remove_file(tmp)
    })
}

/// How old a temporary file of [`put_file`] must be before [`sweep_temp_files`] takes it for
/// one a crash left behind: a write takes milliseconds, so one this old has no writer.
const TEMP_FILE_ORPHANED: Duration = Duration::from_secs(600);

/// Removes the temporary files (`.NAME.HEX16.tmp`) that a kill or a power cut in the middle
/// of [`put_file`] left in `dir`: earlier keys among them, which a renewal meant to discard.
/// Only files last written [`TEMP_FILE_ORPHANED`] before `now`, so another process's write
/// in progress is never touched. Best effort (a directory that cannot be read is left as it
/// is); the count removed.
pub fn sweep_temp_files(dir: &Path, now: SystemTime) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if !is_temp_file_name(&name.to_string_lossy()) {
            continue;
        }
        // Not through a symlink, and only plain files.
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= TEMP_FILE_ORPHANED);
        if meta.is_file() && old && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The name of a temporary file [`put_file`] writes for `name`.
fn temp_name(name: &str) -> String {
    format!(".{name}.{}.tmp", hex::encode(random_bytes::<8>()))
}

/// Whether `name` is one [`put_file`] gives its temporary files.
fn is_temp_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    let Some((target, hex)) = stem.rsplit_once('.') else {
        return false;
    };
    !target.is_empty() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes `bytes` to a temporary file (of `mode`) beside `path`, syncs it, has `place` put it
/// at `path`, and syncs the directory.
fn put_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    place: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(temp_name(&name));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask can only remove bits from the mode; set it exactly anyway.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        place(&tmp)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // The rename itself is durable only once the directory is.
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => sync_dir(d),
        _ => sync_dir(Path::new(".")),
    }
}

/// Makes the entries of `dir` (a rename, a new file) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, PkiError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| PkiError::Cert("malformed certificate".into()))?;
    if !rest.is_empty() {
        return Err(PkiError::Cert("trailing data after certificate".into()));
    }
    Ok(cert)
}

pub(crate) fn to_system_time(t: OffsetDateTime) -> Result<SystemTime, PkiError> {
    u64::try_from(t.unix_timestamp())
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .ok_or_else(|| PkiError::Cert("validity time out of range".into()))
}

/// A certificate time as RFC 3339 in UTC, to the second (`2026-11-26T01:02:03Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => format!("unix time {secs}"),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};
    use umbra_proto::Role;

    use super::*;
    use crate::testutil::Org;

    #[test]
    fn rfc3339_in_utc() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(rfc3339(t(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(t(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(t(1_795_654_923)), "2026-11-26T01:02:03Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    fn cert_with(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn leaf_with_one_umbra_uri_is_an_identity() {
        let c = cert_with(vec![
            uri("umbra://acme/broker/b1"),
            SanType::DnsName("b1.broker.umbra.internal".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ]);
        let p = peer_cert(&c).unwrap();
        assert_eq!(p.id, PeerId::new("acme", Role::Broker, "b1").unwrap());
    }

    #[test]
    fn anything_but_exactly_one_umbra_uri_is_refused() {
        let cases = [
            vec![],
            vec![SanType::DnsName("x.example".try_into().unwrap())],
            vec![uri("umbra://acme/agent/a"), uri("umbra://acme/agent/b")],
            vec![uri("umbra://acme/agent/a"), uri("umbra://acme/agent/a")],
            vec![uri("https://acme/agent/a")],
            vec![uri("umbra://acme/admin/a")],
            vec![uri("umbra://acme/agent/a/b")],
            vec![
                uri("umbra://acme/agent/a"),
                SanType::Rfc822Name("a@example.com".try_into().unwrap()),
            ],
        ];
        for sans in cases {
            let desc = format!("{sans:?}");
            let err = peer_cert(&cert_with(sans)).unwrap_err();
            assert!(matches!(err, PkiError::Identity(_)), "{desc}: {err}");
        }
        // A certificate without any SAN extension, and garbage.
        let mut p = CertificateParams::default();
        p.subject_alt_names.clear();
        let c = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        assert!(peer_cert(c.der()).is_err());
        assert!(matches!(
            peer_cert(&CertificateDer::from(vec![0x30, 0x00])),
            Err(PkiError::Cert(_))
        ));
    }

    /// One process per role directory: a second lock is refused while the first is held,
    /// and taken once it is released.
    /// Orphaned temporary files go (a leftover key among them); fresh ones, whose writer may
    /// be at work, stay, and so do other files, directories and symlinks whatever their
    /// names or ages.
    #[test]
    fn orphaned_temp_files_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let now = SystemTime::now();
        let old = now - TEMP_FILE_ORPHANED - Duration::from_secs(1);
        let put = |name: &str, at: SystemTime| {
            let f = fs::File::create(d.join(name)).unwrap();
            f.set_modified(at).unwrap();
        };
        put(".key.pem.next.0123456789abcdef.tmp", old);
        put(".published.json.fedcba9876543210.tmp", old);
        put(".cert.pem.00112233445566aa.tmp", now);
        put("cert.pem", old);
        put(".cert.pem.notsixteenhex.tmp", old);
        put(".0123456789abcdef.tmp", old);
        put("key.pem.0123456789abcdef.tmp", old);
        fs::create_dir(d.join(".dir.0123456789abcdef.tmp")).unwrap();
        std::os::unix::fs::symlink("cert.pem", d.join(".ln.0123456789abcdef.tmp")).unwrap();
        assert_eq!(sweep_temp_files(d, now), 2);
        let mut left: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".0123456789abcdef.tmp",
                ".cert.pem.00112233445566aa.tmp",
                ".cert.pem.notsixteenhex.tmp",
                ".dir.0123456789abcdef.tmp",
                ".ln.0123456789abcdef.tmp",
                "cert.pem",
                "key.pem.0123456789abcdef.tmp",
            ]
        );
        // The names put_file gives are the ones swept.
        assert!(is_temp_file_name(&temp_name("key.pem.next")));
        assert!(is_temp_file_name(&temp_name("x")));
    }

    #[test]
    fn one_instance_per_identity_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_instance(dir.path()).unwrap().expect("first");
        assert!(lock_instance(dir.path()).unwrap().is_none(), "second taken");
        drop(first);
        assert!(lock_instance(dir.path()).unwrap().is_some(), "not released");
    }

    #[test]
    fn not_after_is_read() {
        let org = Org::new("acme");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let p = org.pems_at(Role::Agent, "d", now, Duration::from_secs(3600));
        assert_eq!(
            cert_not_after(&p.cert).unwrap(),
            now + Duration::from_secs(3600)
        );
        assert!(cert_not_after("nope").is_err());
    }

    #[test]
    fn from_pem_checks_key_and_issuer() {
        let org = Org::new("acme");
        let a = org.pems(Role::Agent, "a");
        let b = org.pems(Role::Agent, "b");
        let id = TlsIdentity::from_pem(&a.cert, &a.key, org.ca.cert_pem()).unwrap();
        assert_eq!(id.peer.id, org.pid(Role::Agent, "a"));
        assert_eq!(id.cert_chain.len(), 1);
        // Key of another certificate.
        assert!(matches!(
            TlsIdentity::from_pem(&a.cert, &b.key, org.ca.cert_pem()),
            Err(PkiError::Key(_))
        ));
        // CA that did not issue it.
        let other = Org::new("acme");
        assert!(matches!(
            TlsIdentity::from_pem(&a.cert, &a.key, other.ca.cert_pem()),
            Err(PkiError::Cert(_))
        ));
        assert!(TlsIdentity::from_pem("", &a.key, org.ca.cert_pem()).is_err());
        assert!(TlsIdentity::from_pem(&a.cert, "", org.ca.cert_pem()).is_err());
        // Debug shows the identity, not the key.
        let d = format!("{id:?}");
        assert!(d.contains("umbra") || d.contains("acme"), "{d}");
        assert!(!d.contains("PRIVATE") && !d.contains("key"), "{d}");
    }

    /// A directory another user could write to, or that another user owns, is refused by
    /// name; a missing one is made private; one of ours that is merely readable is tightened.
    #[test]
    fn private_dirs_are_ours_alone() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        // Missing: created, parents too, 0700.
        let new = tmp.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        // Ours and readable: accepted as it is, tightened for keys.
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o755);
        private_dir_tight(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        // Ours and writable by our group: refused (the group bits may be an ACL mask letting
        // another user in).
        let shared_ours = tmp.path().join("group-ours");
        fs::create_dir(&shared_ours).unwrap();
        fs::set_permissions(&shared_ours, fs::Permissions::from_mode(0o2770)).unwrap();
        assert!(private_dir(&shared_ours).is_err());
        // Writable by others (a shared dir, or one made with umask 0): refused, unchanged.
        for m in [0o777, 0o707, 0o1777] {
            let shared = tmp.path().join(format!("shared-{m:o}"));
            fs::create_dir(&shared).unwrap();
            fs::set_permissions(&shared, fs::Permissions::from_mode(m)).unwrap();
            let e = private_dir(&shared).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("writable by other users"), "{e}");
            assert!(e.to_string().contains(&shared.display().to_string()), "{e}");
            assert_eq!(mode(&shared), m);
        }
        // A file in its place.
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(private_dir(&file).is_err());
        // Our own symlink to our own directory is fine.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        private_dir(&link).unwrap();
        // Another user's directory (needs root to make one): refused; so is one writable by a
        // group this process is not in, and another user's symlink. Root's are trusted.
        if process_ids().unwrap().uid == 0 {
            let other_group = tmp.path().join("group-theirs");
            fs::create_dir(&other_group).unwrap();
            std::os::unix::fs::chown(&other_group, None, Some(65534)).unwrap();
            fs::set_permissions(&other_group, fs::Permissions::from_mode(0o770)).unwrap();
            let e = private_dir(&other_group).unwrap_err();
            assert!(e.to_string().contains("writable by other users"), "{e}");

            let theirs = tmp.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
            let e = private_dir(&theirs).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
            assert_eq!(fs::metadata(&theirs).unwrap().uid(), 65534);
            // And another user's symlink to our directory.
            let their_link = tmp.path().join("their-link");
            std::os::unix::fs::symlink(&new, &their_link).unwrap();
            std::os::unix::fs::lchown(&their_link, Some(65534), Some(65534)).unwrap();
            let e = private_dir(&their_link).unwrap_err();
            assert!(e.to_string().contains("symlink owned by uid 65534"), "{e}");
        }
    }

    /// An identity whose key other users can read is refused at load, saying how to fix it;
    /// the same identity with the key 0600 loads.
    #[test]
    fn a_key_others_can_read_is_refused() {
        let org = Org::new("acme");
        let p = org.pems(Role::Agent, "d1");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("id");
        write_identity_dir(&dir, &p.key, &p.cert, org.ca.cert_pem()).unwrap();
        let key = dir.join("key.pem");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = TlsIdentity::load_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("other users may read it") && e.contains("chmod 600"),
            "{e}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        TlsIdentity::load_dir(&dir).unwrap();
    }

    #[test]
    fn identity_dir_is_private_and_atomic() {
        let org = Org::new("acme");
        let p = org.pems(Role::Connector, "c1");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("id");
        // Pre-existing, too open directory and file: both get tightened.
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("key.pem"), "old").unwrap();
        fs::set_permissions(dir.join("key.pem"), fs::Permissions::from_mode(0o644)).unwrap();

        write_identity_dir(&dir, &p.key, &p.cert, org.ca.cert_pem()).unwrap();

        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in ["key.pem", "cert.pem", "ca.pem"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // Only the three files remain: no temporary leftovers.
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [WRITE_LOCK, "ca.pem", "cert.pem", "key.pem"]);
        assert_eq!(mode(&dir.join(WRITE_LOCK)), 0o600);

        let id = TlsIdentity::load_dir(&dir).unwrap();
        assert_eq!(id.peer.id, org.pid(Role::Connector, "c1"));

        // Renewal overwrites in place.
        let p2 = org.pems(Role::Connector, "c1");
        write_identity_dir(&dir, &p2.key, &p2.cert, org.ca.cert_pem()).unwrap();
        let id2 = TlsIdentity::load_dir(&dir).unwrap();
        assert_ne!(id2.peer.serial_hex, id.peer.serial_hex);
        assert_eq!(mode(&dir.join("key.pem")), 0o600);

        // A missing directory is a readable I/O error naming the file.
        let err = TlsIdentity::load_dir(&tmp.path().join("none")).unwrap_err();
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }

    /// Two processes renewing one identity at once (threads here, each with its own new
    /// pair, as two processes would be): the directory always ends with a pair that loads.
    #[test]
    fn concurrent_renewals_leave_a_pair_that_loads() {
        let org = Org::new("acme");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("id");
        let ca = org.ca.cert_pem().to_owned();
        let pairs = [org.pems(Role::Agent, "d1"), org.pems(Role::Agent, "d1")];
        let serials: Vec<String> = pairs.iter().map(|p| org.load(p).peer.serial_hex).collect();
        write_identity_dir(&dir, &pairs[0].key, &pairs[0].cert, &ca).unwrap();
        for round in 0..20 {
            std::thread::scope(|s| {
                for p in &pairs {
                    let (dir, ca) = (&dir, &ca);
                    s.spawn(move || {
                        for _ in 0..5 {
                            write_identity_dir(dir, &p.key, &p.cert, ca).unwrap();
                        }
                    });
                }
            });
            let id = TlsIdentity::load_dir(&dir)
                .unwrap_or_else(|e| panic!("round {round}: the directory does not load: {e}"));
            assert!(serials.contains(&id.peer.serial_hex), "round {round}");
            assert!(!dir.join(NEXT_KEY).exists(), "round {round}");
        }
    }

    /// Every state a crash can leave a renewal in loads, as the old identity or the new one;
    /// a key that matches nothing still fails.
    #[test]
    fn interrupted_renewal_still_loads() {
        let org = Org::new("acme");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("id");
        let old = org.pems(Role::Agent, "d1");
        let new = org.pems(Role::Agent, "d1");
        let ca = org.ca.cert_pem();
        let serial = |p: &crate::testutil::Pems| org.load(p).peer.serial_hex;
        let state = |cert: &str, key: &str, next: Option<&str>| {
            write_identity_dir(&dir, key, cert, ca).unwrap();
            match next {
                Some(k) => write_private_file(&dir.join(NEXT_KEY), k.as_bytes()).unwrap(),
                None => {
                    let _ = fs::remove_file(dir.join(NEXT_KEY));
                }
            }
        };

        // Crash after the new key went to key.pem.next: the old pair is intact.
        state(&old.cert, &old.key, Some(&new.key));
        assert_eq!(
            TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex,
            serial(&old)
        );
        // Crash after the certificate was replaced, before the key was moved: the new pair.
        fs::write(dir.join("cert.pem"), &new.cert).unwrap();
        assert_eq!(
            TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex,
            serial(&new)
        );
        // Finished: the new pair, no key.pem.next left.
        write_identity_dir(&dir, &new.key, &new.cert, ca).unwrap();
        assert!(!dir.join(NEXT_KEY).exists());
        assert_eq!(
            TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex,
            serial(&new)
        );

        // The twin: a certificate whose key is nowhere is still refused, naming the key.
        let stranger = org.pems(Role::Agent, "d1");
        state(&stranger.cert, &old.key, Some(&new.key));
        let err = TlsIdentity::load_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        // A first write interrupted before the key was moved: no key.pem at all.
        state(&new.cert, &new.key, Some(&new.key));
        fs::remove_file(dir.join("key.pem")).unwrap();
        assert_eq!(
            TlsIdentity::load_dir(&dir).unwrap().peer.serial_hex,
            serial(&new)
        );
    }

    /// A write that follows an interrupted one first moves the certificate's key out of
    /// `key.pem.next`, which it is about to overwrite: a crash in the new write then still
    /// leaves a pair that loads. A leftover key that belongs to no certificate is left to
    /// be overwritten.
    #[test]
    fn a_write_after_an_interrupted_one_keeps_the_certificates_key() {
        let org = Org::new("acme");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("id");
        let old = org.pems(Role::Agent, "d1");
        let new = org.pems(Role::Agent, "d1");
        let ca = org.ca.cert_pem();
        write_identity_dir(&dir, &old.key, &new.cert, ca).unwrap();
        write_private_file(&dir.join(NEXT_KEY), new.key.as_bytes()).unwrap();
        finish_interrupted_write(&dir).unwrap();
        assert!(!dir.join(NEXT_KEY).exists());
        assert_eq!(fs::read_to_string(dir.join("key.pem")).unwrap(), new.key);
        assert!(TlsIdentity::load_dir(&dir).is_ok());
        // The twin: a key.pem.next of no certificate here stays where it is.
        let stray = org.pems(Role::Agent, "d1");
        write_private_file(&dir.join(NEXT_KEY), stray.key.as_bytes()).unwrap();
        finish_interrupted_write(&dir).unwrap();
        assert_eq!(fs::read_to_string(dir.join("key.pem")).unwrap(), new.key);
        assert!(dir.join(NEXT_KEY).exists());
    }

    #[test]
    fn a_cache_that_cannot_be_replaced_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let fine = dir.path().join("cache.json");
        write_private_file_or_remove(&fine, b"one").unwrap();
        write_private_file_or_remove(&fine, b"two").unwrap();
        assert_eq!(fs::read(&fine).unwrap(), b"two");
        // The file's own name fits; the temporary file's beside it is too long to create.
        let doomed = dir.path().join("c".repeat(250));
        fs::write(&doomed, b"older").unwrap();
        let (e, gone) = write_private_file_or_remove(&doomed, b"newer").unwrap_err();
        assert!(gone && !doomed.exists(), "{e}");
        // Nothing there to begin with: nothing left either.
        let (_, gone) = write_private_file_or_remove(&doomed, b"newer").unwrap_err();
        assert!(gone);
    }

    #[test]
    fn a_created_private_file_is_whole_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        create_private_file(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = create_private_file(&path, b"second").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        // No temporary file left behind either way.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
