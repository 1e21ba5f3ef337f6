//! `umbra admin`: the controller's REST API from a shell. Every command prints a table for a
//! person, or the API's JSON with `-o json` for scripts.

use std::path::PathBuf;

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use umbra_proto::api;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// TOML file with `controller`, `token_file` (or `token`) and `ca_file`; written by
    /// `umbra quickstart` as DATA_DIR/admin.toml.
    #[arg(long, env = "UMBRA_ADMIN_CONFIG")]
    config: Option<PathBuf>,
    /// Controller URL, e.g. https://127.0.0.1:7400.
    #[arg(long, env = "UMBRA_CONTROLLER")]
    controller: Option<String>,
    /// Admin bearer token (printed once at the controller's first start). A command line is
    /// visible to other users of the host: prefer --token-file. [env: UMBRA_ADMIN_TOKEN]
    #[arg(long)]
    token: Option<String>,
    /// File holding the admin token. [env: UMBRA_ADMIN_TOKEN_FILE]
    ///
    /// Flags win over the environment, and the environment over --config: a token left in
    /// UMBRA_ADMIN_TOKEN does not override a --token-file given on the command line.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The organisation CA certificate (PEM) to verify the controller with.
    #[arg(long, env = "UMBRA_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short = 'o', long, global = true, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    /// After a change brokers enforce (users, groups, services, policies, revocations), wait
    /// at most TIME (e.g. 10s) until every broker heard from lately has it in force (streams
    /// it ends, ended), and say so on stderr. Exit status 3 if that is not confirmed: the
    /// change is made, but a broker is behind at the end of the wait, or silent (not heard
    /// from in 30 s: not waited for), or the controller could not be reached to ask. With
    /// `rollout`, its wait.
    #[arg(long, global = true, value_name = "TIME", value_parser = wait_time)]
    wait: Option<std::time::Duration>,
    #[command(subcommand)]
    cmd: Cmd,
}

impl Args {
    /// `-o json`: results, and errors, as JSON.
    pub(crate) fn json_output(&self) -> bool {
        self.output == "json"
    }

    /// A command line clap accepts that is still not a command (exit status 2, as clap's own
    /// refusals): `--wait` where nothing is waited for.
    pub(crate) fn usage_problem(&self) -> Option<&'static str> {
        (self.wait.is_some()
            && !self.cmd.changes_enforcement()
            && !matches!(self.cmd, Cmd::Rollout { .. }))
        .then_some(
            "--wait follows a change that brokers enforce (users, groups, services, policies, \
             revocations); `umbra admin rollout --wait TIME` waits without one",
        )
    }
}

/// Longest `--wait`.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// `--wait TIME`: a duration from 1 s to an hour.
fn wait_time(s: &str) -> Result<std::time::Duration, String> {
    let d = crate::load::parse_duration(s)?;
    if d.is_zero() || d > MAX_WAIT {
        return Err(format!("{s:?}: give 1s to 1h"));
    }
    Ok(d)
}

impl Cmd {
    /// Whether the command changes what brokers enforce (what `--wait` waits for). Dry runs,
    /// listings and enrollment or admin tokens do not.
    fn changes_enforcement(&self) -> bool {
        match self {
            Cmd::User(c) => !matches!(c, UserCmd::List),
            Cmd::Group(c) => !matches!(c, GroupCmd::List),
            Cmd::Service(c) => !matches!(c, ServiceCmd::List),
            Cmd::Policy(c) => match c {
                PolicyCmd::Add { dry_run, .. }
                | PolicyCmd::Set { dry_run, .. }
                | PolicyCmd::Rm { dry_run, .. } => !dry_run,
                PolicyCmd::List => false,
            },
            Cmd::Device(c) => matches!(c, DeviceCmd::Revoke { .. }),
            Cmd::Connector(c) => matches!(c, ConnectorCmd::Revoke { .. }),
            Cmd::Broker(c) => matches!(c, BrokerCmd::Revoke { .. }),
            Cmd::Token(_)
            | Cmd::AdminToken(_)
            | Cmd::Stream(_)
            | Cmd::Access { .. }
            | Cmd::Audit { .. }
            | Cmd::Rollout { .. } => false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    controller: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Users (identified by e-mail address).
    #[command(subcommand)]
    User(UserCmd),
    /// Groups of users.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Services: a name, the target host:port as the connector sees it, and the connectors
    /// that may serve it.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Access policies in the Cedar language (default deny: no policy, no access).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// One-time enrollment tokens for agents, connectors and brokers.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Enrolled connectors.
    #[command(subcommand)]
    Connector(ConnectorCmd),
    /// Brokers known to the controller.
    #[command(subcommand)]
    Broker(BrokerCmd),
    /// Streams live on the brokers now.
    #[command(subcommand)]
    Stream(StreamCmd),
    /// The admin token itself.
    #[command(subcommand)]
    AdminToken(AdminTokenCmd),
    /// Whether every broker enforces the controller's current state (or snapshot --snapshot):
    /// each broker applied, behind, or silent (not heard from in 30 s). With --wait, waits
    /// until none is behind (exit status 3 if one still is, or one is silent).
    Rollout {
        /// The snapshot version to ask about (default: the controller's current one).
        #[arg(long, value_name = "VERSION")]
        snapshot: Option<u64>,
    },
    /// What the policy decides now, and why: may this user reach this service (or which
    /// services may they reach)? Decided as a broker decides, on the controller's current
    /// state; changes nothing.
    Access {
        /// The user (e-mail address); the owner of --device when omitted.
        #[arg(long, required_unless_present = "device")]
        user: Option<String>,
        /// One device of the user (its id); default: a device of theirs in good standing that
        /// no policy names (as a newly enrolled one).
        #[arg(long)]
        device: Option<String>,
        /// One service; default: every published service.
        #[arg(long)]
        service: Option<String>,
        /// The link transport to decide for (policies may test `context.transport`).
        #[arg(long, default_value = "quic", value_parser = ["quic", "tcp"])]
        transport: String,
    },
    /// The audit log (`audit` and `audit list` are the same), oldest first.
    Audit {
        #[command(subcommand)]
        list: Option<AuditCmd>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0, global = true,
              value_parser = clap::value_parser!(i64).range(0..))]
        after: i64,
        /// The oldest events, at most this many (default 100, at most 1000).
        #[arg(long, global = true, conflicts_with = "last",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// The newest events instead, this many (at most 1000): what just happened.
        #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=1000))]
        last: Option<u32>,
        /// Only events by this actor, e.g. `admin` or `umbra://default/agent/d-...`.
        #[arg(long, global = true)]
        actor: Option<String>,
        /// Only events of this action, e.g. `stream.open`, `link.open`, `enroll`, `revoke`.
        #[arg(long, global = true)]
        action: Option<String>,
        /// Only events about this target, e.g. a service, user or identity URI.
        #[arg(long, global = true)]
        target: Option<String>,
        /// Only events with this result: `allow` or `deny` (decisions), `ok` or `error`.
        #[arg(long, global = true, value_parser = ["allow", "deny", "ok", "error"])]
        result: Option<String>,
        /// Keep printing new events as they are recorded, one per line (with `-o json`, one
        /// JSON object per line), until Ctrl-C. Starts with the newest 10 unless `--last`,
        /// `--limit` or `--after` says otherwise.
        #[arg(long, short = 'f', global = true)]
        follow: bool,
    },
}

#[derive(clap::Subcommand)]
enum UserCmd {
    /// Add a user.
    Add {
        /// The user's id: their e-mail address (stored lowercased).
        id: String,
        /// Groups to put the user in (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List users.
    List,
    /// Remove a user.
    Rm {
        /// The user's id (e-mail address).
        id: String,
    },
    /// Disable a user: their devices are denied every stream (live ones end within a second
    /// or so) and get no new certificates; the user, their groups and devices stay.
    Disable {
        /// The user's id (e-mail address).
        id: String,
    },
    /// Enable a disabled user again: their devices whose certificates have not expired work
    /// again at once; an expired one renews within the controller's renew grace (past it,
    /// it enrolls again).
    Enable {
        /// The user's id (e-mail address).
        id: String,
    },
}

#[derive(clap::Subcommand)]
enum GroupCmd {
    /// Add a group.
    Add {
        /// Group name: 1-63 lowercase letters, digits, `-`, `_` or `.`.
        name: String,
    },
    /// List groups and members.
    List,
    /// Put a user in a group.
    AddMember {
        /// Group name.
        group: String,
        /// User id (e-mail address).
        user: String,
    },
    /// Take a user out of a group.
    RmMember {
        /// Group name.
        group: String,
        /// User id (e-mail address).
        user: String,
    },
    /// Remove a group (its members stay; policies naming it stop matching anyone).
    Rm {
        /// Group name.
        name: String,
    },
}

#[derive(clap::Subcommand)]
enum ServiceCmd {
    /// Publish a service.
    Add {
        /// Service name: what agents ask for (`umbra agent forward NAME`) and policies name.
        name: String,
        /// host:port as the connector sees it.
        #[arg(long)]
        target: String,
        /// Connector name that may serve it (repeatable).
        #[arg(long = "connector", required = true)]
        connectors: Vec<String>,
    },
    /// Change a service's target, its connectors, or both, in one change (live streams on
    /// the old route end; new ones take the new route).
    #[command(group(
        clap::ArgGroup::new("change").args(["target", "connectors"]).required(true).multiple(true)
    ))]
    Set {
        /// Service name.
        name: String,
        /// New host:port as the connector sees it.
        #[arg(long)]
        target: Option<String>,
        /// Connector that may serve it (repeatable; the list replaces the old one).
        #[arg(long = "connector")]
        connectors: Vec<String>,
    },
    /// List services.
    List,
    /// Remove a service.
    Rm {
        /// Service name.
        name: String,
    },
}

#[derive(clap::Subcommand)]
enum PolicyCmd {
    /// Add a policy: Cedar text from --file or --text, or a generated permit from
    /// --allow-user/--allow-group/--allow-everyone with --service.
    Add {
        /// Policy name, unique in the organisation.
        name: String,
        #[command(flatten)]
        source: PolicySource,
        /// Change nothing: list the live streams this change would end.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace a policy's text, in one change: streams the new text still allows go on (a
    /// remove and add would cut them). Same sources as `add`; an invalid text changes nothing.
    Set {
        /// Name of an existing policy.
        name: String,
        #[command(flatten)]
        source: PolicySource,
        /// Change nothing: list the live streams this change would end.
        #[arg(long)]
        dry_run: bool,
    },
    /// List policies.
    List,
    /// Remove a policy.
    Rm {
        /// Policy name.
        name: String,
        /// Change nothing: list the live streams this change would end.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Where a policy's text comes from.
#[derive(clap::Args)]
struct PolicySource {
    /// File with the policy in the Cedar language.
    #[arg(long, conflicts_with_all = ["text", "allow_user", "allow_group", "allow_everyone"])]
    file: Option<PathBuf>,
    /// The policy in the Cedar language, inline.
    #[arg(long, conflicts_with_all = ["allow_user", "allow_group", "allow_everyone"])]
    text: Option<String>,
    /// Permit this user (e-mail address) to connect to --service.
    #[arg(long, requires = "service")]
    allow_user: Option<String>,
    /// Permit members of this group to connect to --service.
    #[arg(long, requires = "service")]
    allow_group: Option<String>,
    /// Permit every user of the organisation to connect to --service.
    #[arg(long, requires = "service")]
    allow_everyone: bool,
    /// The service a generated permit is for.
    #[arg(long)]
    service: Option<String>,
}

impl PolicySource {
    fn text(&self) -> anyhow::Result<String> {
        use umbra_policy::{PolicySubject, allow_policy};
        Ok(
            match (
                &self.file,
                &self.text,
                &self.allow_user,
                &self.allow_group,
                self.allow_everyone,
                &self.service,
            ) {
                (Some(f), ..) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, Some(t), ..) => t.clone(),
                (None, None, Some(u), None, false, Some(s)) => {
                    // As the controller stores user ids (lowercased); anything else goes as
                    // typed, and the controller says why it cannot be stored.
                    let id = umbra_proto::user_id(u).unwrap_or_else(|| u.clone());
                    allow_policy(&PolicySubject::User(id), s)
                }
                (None, None, None, Some(g), false, Some(s)) => {
                    allow_policy(&PolicySubject::Group(g.clone()), s)
                }
                (None, None, None, None, true, Some(s)) => {
                    allow_policy(&PolicySubject::Everyone, s)
                }
                _ => bail!(
                    "give the policy as --file, --text, or one of --allow-user/--allow-group/--allow-everyone with --service"
                ),
            },
        )
    }
}

#[derive(clap::Subcommand)]
enum TokenCmd {
    /// Create a token (shown once).
    Create {
        /// agent, connector or broker.
        #[arg(long, value_parser = ["agent", "connector", "broker"])]
        role: String,
        /// Agent tokens: the user the device will belong to.
        #[arg(long)]
        user: Option<String>,
        /// Connector and broker tokens: its name.
        #[arg(long)]
        name: Option<String>,
        /// Token lifetime (default: the controller's `token_ttl_secs`, 1h unless configured; at
        /// most 7d).
        #[arg(long, value_parser = crate::load::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List tokens: role, for whom, expiry, and who redeemed them (never the secret).
    List,
    /// Remove a token: unused, it can no longer be redeemed.
    Rm {
        /// Token id (t-..., from `umbra admin token list` or `token create`).
        id: String,
    },
}

#[derive(clap::Subcommand)]
enum DeviceCmd {
    /// List devices, in enrollment order (to the second; those enrolled within one second in
    /// id order).
    List {
        /// Only this user's devices (e.g. to find and revoke a lost laptop's).
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a device: its certificates stop working and its live streams are closed.
    Revoke {
        /// Device id (from `umbra admin device list`).
        id: String,
    },
}

#[derive(clap::Subcommand)]
enum ConnectorCmd {
    /// List connectors, in enrollment order (to the second; then by id).
    List {
        /// Only the instances carrying this name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a connector (id or name).
    Revoke {
        /// Connector id or name (from `umbra admin connector list`).
        id: String,
    },
}

/// One page of a long listing. Without `--limit` every entry is listed (fetched 1000 at a
/// time).
#[derive(clap::Args)]
struct PageArgs {
    /// At most this many entries (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Start after this id: the last one of the page before.
    #[arg(long)]
    after: Option<String>,
}

#[derive(clap::Subcommand)]
enum BrokerCmd {
    /// List brokers.
    List,
    /// Revoke a broker (id or name): the controller stops serving it and takes it out of the
    /// broker lists; connectors and forwarding agents drop their links to it within about a
    /// second.
    Revoke {
        /// Broker id or name (from `umbra admin broker list`).
        id: String,
    },
}

#[derive(clap::Subcommand)]
enum AuditCmd {
    /// List audit events, oldest first (as `umbra admin audit`, like every other `list`).
    List,
}

#[derive(clap::Subcommand)]
enum AdminTokenCmd {
    /// Replace every admin token, this one included, with a new one (printed once). If this
    /// command read its token from a file (`--token-file`, or `token_file` in `--config`), the
    /// new token is written there. Lost the token? `umbra controller --reset-admin-token`.
    Rotate,
}

#[derive(clap::Subcommand)]
enum StreamCmd {
    /// List live streams.
    List,
}

/// Checks that the controller URL is `https://` with a host: the admin token is a bearer
/// credential for the whole organisation, so it is never sent where TLS would not carry it.
fn https_url(base: &str) -> anyhow::Result<()> {
    let u = reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("{base:?} is not a URL: {e}"))?;
    if u.scheme() != "https" || u.host_str().is_none_or(str::is_empty) {
        bail!(
            "{base:?} must be an https:// URL of the controller (the admin token is never sent in clear)"
        );
    }
    Ok(())
}

/// Where the admin token comes from.
#[derive(Debug, PartialEq)]
enum TokenSource {
    Given(String),
    File(PathBuf),
}

/// The admin token's source: a flag (`--token`, then `--token-file`), else the environment
/// (`UMBRA_ADMIN_TOKEN`, then `UMBRA_ADMIN_TOKEN_FILE`), else `--config` (`token_file`, then
/// `token`). A more deliberate place wins: a token exported for the shell must not override a
/// `--token-file` on the command line (a rotation would then not rewrite that file). Pure.
fn token_source(
    a: &Args,
    env_token: Option<String>,
    env_file: Option<PathBuf>,
    config_token: Option<String>,
    config_file: Option<PathBuf>,
) -> anyhow::Result<TokenSource> {
    Ok(if let Some(t) = &a.token {
        TokenSource::Given(t.clone())
    } else if let Some(p) = &a.token_file {
        TokenSource::File(p.clone())
    } else if let Some(t) = env_token {
        TokenSource::Given(t)
    } else if let Some(p) = env_file.or(config_file) {
        TokenSource::File(p)
    } else if let Some(t) = config_token {
        TokenSource::Given(t)
    } else {
        bail!(
            "no admin token: pass --token-file (or --token, UMBRA_ADMIN_TOKEN_FILE, UMBRA_ADMIN_TOKEN, or --config)"
        )
    })
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Where the token was read from, if from a file.
    token_file: Option<PathBuf>,
}

impl Client {
    fn new(a: &Args) -> anyhow::Result<Client> {
        // As the role configs are read: an error names the key and its line.
        let file: AdminFile = crate::load::file_or_default(a.config.as_deref())?;
        let base =
            a.controller.clone().or(file.controller).context(
                "no controller: pass --controller URL (or UMBRA_CONTROLLER, or --config)",
            )?;
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let source = token_source(
            a,
            env("UMBRA_ADMIN_TOKEN").map(|v| v.to_string_lossy().into_owned()),
            env("UMBRA_ADMIN_TOKEN_FILE").map(PathBuf::from),
            file.token,
            file.token_file,
        )?;
        let mut token_file = None;
        let token = match source {
            TokenSource::Given(t) => t,
            TokenSource::File(p) => {
                let t = crate::load::secret_file(&p, "token file")?;
                token_file = Some(p);
                t
            }
        };
        let ca_file = a.ca_file.clone().or(file.ca_file).context(
            "no CA: pass --ca-file with the organisation CA (or UMBRA_CA_FILE, or --config)",
        )?;
        let ca_pem = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("cannot read {}", ca_file.display()))?;
        let ca = rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{} holds no certificate: {e}", ca_file.display()))?;
        let mut c = Client::connect(&base, token, &ca)?;
        c.token_file = token_file;
        Ok(c)
    }

    /// A client for `base`, trusting only the organisation CA `ca`.
    pub(crate) fn connect(
        base: &str,
        token: String,
        ca: &rustls_pki_types::CertificateDer<'static>,
    ) -> anyhow::Result<Client> {
        https_url(base)
            .context("the controller URL (--controller, UMBRA_CONTROLLER or --config)")?;
        let tls = umbra_pki::client_config(ca, None, &[b"h2", b"http/1.1"], false)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            // The bearer token goes only over TLS, also after a redirect.
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
            token_file: None,
        })
    }

    /// `POST /v1/KIND/ID/revoke` (devices, connectors, brokers): the API's answer.
    pub(crate) async fn revoke(&self, kind: &str, id: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/v1/{kind}/{}/revoke", seg(id));
        self.post(&path, &serde_json::json!({})).await
    }

    /// Creates an object unless the list at `path` already holds one whose `key` field is
    /// `id` (and treats "already exists", 409, as done too): for idempotent setup, without a
    /// refused write in the audit log at every run.
    pub(crate) async fn ensure(
        &self,
        path: &str,
        key: &str,
        id: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<()> {
        let listed: serde_json::Value = self.get(path).await?;
        if listed
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o[key] == id))
        {
            return Ok(());
        }
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        bail!("controller refused {path} ({status}): {text}")
    }

    async fn send<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<T> {
        Ok(self.send_with_headers(rb).await?.0)
    }

    /// [`Client::send`], and the answer's headers.
    async fn send_with_headers<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> anyhow::Result<(T, reqwest::header::HeaderMap)> {
        let resp = rb
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            return Err(Refused::from_body(status, &bytes).into());
        }
        if bytes.is_empty() {
            return Ok((serde_json::from_value(serde_json::Value::Null)?, headers));
        }
        Ok((serde_json::from_slice(&bytes)?, headers))
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        self.with_body(reqwest::Method::POST, path, body).await
    }
    async fn with_body<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.request(method, url).json(body)).await
    }
    /// Deletes what `path` names (the controller answers 204, no body).
    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .send(self.http.delete(format!("{}{path}", self.base)))
            .await?;
        Ok(())
    }
}

/// What `-o json` prints for a deletion, which the controller answers with no body: the
/// kind of object and the name or id it was asked to remove.
fn removed(kind: &str, id: &str) -> serde_json::Value {
    serde_json::json!({ "removed": kind, "id": id })
}

/// The controller's answer to a request it refused: its status, message and the request
/// field it names. `-o json` prints the three as they came, for scripts.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: reqwest::StatusCode,
    pub(crate) error: String,
    pub(crate) field: Option<String>,
}

impl Refused {
    fn from_body(status: reqwest::StatusCode, body: &[u8]) -> Refused {
        match serde_json::from_slice::<api::ApiError>(body) {
            Ok(e) => Refused {
                status,
                error: e.error,
                field: e.field,
            },
            // Not the API's error body (a proxy in the way, say): its text, bounded.
            Err(_) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
                Refused {
                    status,
                    error: text.trim().to_owned(),
                    field: None,
                }
            }
        }
    }

    /// `{"error", "field", "status"}`, as `-o json` prints it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.error,
            "field": self.field,
            "status": self.status.as_u16(),
        })
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "controller refused ({}): {}", self.status, self.error)?;
        match self.field.as_deref() {
            // Named as the command line names it, where that is another word than the API's.
            Some(field) => match flag_of(field) {
                Some(flag) => write!(f, " ({flag})"),
                None => write!(f, " (field {field})"),
            },
            None => Ok(()),
        }
    }
}

/// The option of `umbra admin` that sets a request field whose name is not the option's.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "ttl_secs" => "--ttl",
        "groups" => "--group",
        "connectors" => "--connector",
        _ => return None,
    })
}

impl std::error::Error for Refused {}

/// Path segment escaping for ids such as e-mail addresses.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    // Cells hold what peers reported (audit records, live streams): a newline or a terminal
    // escape in one must not forge or rewrite a line.
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| umbra_proto::escape_controls(&c).into_owned())
                .collect()
        })
        .collect();
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn ts(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    // A time a broker reported may be anything: shown as the number if no date holds it.
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(unix)) {
        Some(d) if unix < 253_402_300_800 => umbra_pki::rfc3339(d),
        _ => unix.to_string(),
    }
}

/// Farthest an audit record's own time may be from when the controller stored it before the
/// listing says both: a broker's clock that far off is worth a look (10 min, the skew the
/// roles tolerate elsewhere).
const AUDIT_CLOCK_NOTE_MS: u64 = 10 * 60 * 1000;

/// An audit record's time for people: its source's, and the controller's time of storing it
/// too when the two are far apart (a broker whose clock is wrong).
fn at(e: &api::AuditEntry) -> String {
    let own = ts(e.record.at_ms / 1000);
    if e.received_ms != 0 && e.received_ms.abs_diff(e.record.at_ms) > AUDIT_CLOCK_NOTE_MS {
        format!("{own} (stored {})", ts(e.received_ms / 1000))
    } else {
        own
    }
}

/// A listed certificate's state for people: the controller's word for it, or `revoked` from
/// an older controller that says no more.
fn state(s: api::CredentialState, revoked: bool) -> String {
    match s {
        api::CredentialState::Unknown if revoked => "revoked",
        api::CredentialState::Unknown => "-",
        // Said so that nobody waits for it to come back on its own.
        api::CredentialState::Lapsed => "lapsed (enroll again)",
        api::CredentialState::UserDisabled => "user disabled",
        s => s.as_str(),
    }
    .to_owned()
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let c = Client::new(&a)?;
    let started = std::time::Instant::now();
    command(&a, &c).await?;
    if let Some(wait) = a.wait
        && a.cmd.changes_enforcement()
    {
        // The change is made: whatever keeps it from being confirmed is status 3, not a
        // failure a script would read as "nothing changed".
        let r = rollout(&c, None, wait, true).await.map_err(|e| {
            Unconfirmed(format!(
                "the change is made, but it could not be confirmed at the brokers: {e:#}"
            ))
        })?;
        let verdict = Verdict::of(&r);
        match &verdict {
            Verdict::Confirmed => eprintln!(
                "in force at every broker ({}) after {:.1} s (snapshot {})",
                r.applied,
                started.elapsed().as_secs_f64(),
                r.version
            ),
            Verdict::NoBroker => eprintln!("no broker to confirm it: none is enrolled"),
            Verdict::Unconfirmed(_) => {}
        }
        verdict.into_result(&r, wait)?;
    }
    Ok(())
}

/// How long a wait that cannot reach the controller pauses before it asks again.
const ROLLOUT_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits up to `wait` until no broker heard from lately is behind on `version` (default:
/// the controller's current version when first asked), asking the controller to hold each
/// request for up to 20 s (its own limit is 25). With `retry`, a controller that cannot be
/// reached (restarting, say) is asked again until the wait ends.
async fn rollout(
    c: &Client,
    version: Option<u64>,
    wait: std::time::Duration,
    retry: bool,
) -> anyhow::Result<api::Rollout> {
    let deadline = std::time::Instant::now() + wait;
    let mut version = version;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Whole seconds, rounded up: the controller's wait is in seconds.
        let secs = (left.as_millis().div_ceil(1000) as u64).min(20);
        let mut query = vec![("wait", secs.to_string())];
        query.extend(version.map(|v| ("version", v.to_string())));
        let r: api::Rollout = match c.get(&path_with_query("/v1/rollout", &query)?).await {
            Ok(r) => r,
            // Not reached (the HTTP layer failed): a controller restarting answers again
            // soon, and the version asked about stays (a start only raises it).
            Err(e)
                if retry
                    && e.chain().any(|c| c.is::<reqwest::Error>())
                    && std::time::Instant::now() + ROLLOUT_RETRY < deadline =>
            {
                tracing::debug!(error = %e, "cannot reach the controller; asking again");
                tokio::time::sleep(ROLLOUT_RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if r.behind == 0 || std::time::Instant::now() >= deadline {
            return Ok(r);
        }
        version = Some(r.version);
    }
}

/// What a rollout says of a change: in force at every broker, or not (yet) confirmed.
#[derive(Debug, PartialEq)]
enum Verdict {
    Confirmed,
    /// No broker is enrolled: nothing enforces anything, so nothing is behind either.
    NoBroker,
    /// Each broker behind or silent, said for a person.
    Unconfirmed(Vec<String>),
}

impl Verdict {
    /// Pure.
    fn of(r: &api::Rollout) -> Verdict {
        if r.brokers.is_empty() {
            return Verdict::NoBroker;
        }
        let missing: Vec<String> = r
            .brokers
            .iter()
            .filter_map(|b| match b.state {
                api::RolloutState::Applied => None,
                api::RolloutState::Behind => Some(format!(
                    "broker {} is behind (it has {} in force)",
                    b.name, b.snapshot_version
                )),
                api::RolloutState::Silent if b.last_seen == 0 => {
                    Some(format!("broker {} has never been heard from", b.name))
                }
                api::RolloutState::Silent => Some(format!(
                    "broker {} is silent since {} (it enforces what it holds until its \
                     staleness limit, then denies every stream; revoke it if it is gone for good)",
                    b.name,
                    ts(b.last_seen)
                )),
            })
            .collect();
        if missing.is_empty() {
            Verdict::Confirmed
        } else {
            Verdict::Unconfirmed(missing)
        }
    }

    /// Status 3 when not confirmed. "Within" the wait only when a broker was behind at its
    /// end: silent brokers are not waited for (nothing says they will be back), so a wait
    /// with only those left ends at once.
    fn into_result(self, r: &api::Rollout, wait: std::time::Duration) -> Result<(), Unconfirmed> {
        match self {
            Verdict::Unconfirmed(missing) if r.behind > 0 => Err(Unconfirmed(format!(
                "not confirmed within {} s: {}",
                wait.as_secs(),
                missing.join("; ")
            ))),
            Verdict::Unconfirmed(missing) => Err(Unconfirmed(format!(
                "not confirmed: {}",
                missing.join("; ")
            ))),
            _ => Ok(()),
        }
    }
}

/// A change made (or a rollout asked about) that not every broker confirmed in time: the
/// command exits with status 3, apart from its failures (1) and usage errors (2).
#[derive(Debug)]
pub(crate) struct Unconfirmed(String);

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unconfirmed {}

async fn command(a: &Args, c: &Client) -> anyhow::Result<()> {
    let json = a.output == "json";
    macro_rules! out {
        ($v:expr, $human:expr) => {{
            let v = $v;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                #[allow(clippy::redundant_closure_call)]
                ($human)(v);
            }
        }};
    }
    match &a.cmd {
        Cmd::User(UserCmd::Add { id, groups }) => {
            let u: api::User = c
                .post(
                    "/v1/users",
                    &api::CreateUser {
                        id: id.clone(),
                        groups: groups.clone(),
                    },
                )
                .await?;
            out!(u, |u: api::User| outln!("user {} added", u.id));
        }
        Cmd::User(UserCmd::List) => {
            let v: Vec<api::User> = c.get("/v1/users").await?;
            out!(v, |v: Vec<api::User>| table(
                &["id", "groups", "disabled", "created"],
                v.into_iter()
                    .map(|u| vec![
                        u.id,
                        u.groups.join(","),
                        u.disabled.to_string(),
                        ts(u.created_at)
                    ])
                    .collect()
            ));
        }
        Cmd::User(UserCmd::Rm { id }) => {
            c.delete(&format!("/v1/users/{}", seg(id))).await?;
            out!(removed("user", id), |_| outln!("user {id} removed"));
        }
        Cmd::User(UserCmd::Disable { id } | UserCmd::Enable { id }) => {
            let disabled = matches!(a.cmd, Cmd::User(UserCmd::Disable { .. }));
            let u: api::User = c
                .with_body(
                    reqwest::Method::PATCH,
                    &format!("/v1/users/{}", seg(id)),
                    &api::UpdateUser {
                        disabled: Some(disabled),
                    },
                )
                .await?;
            out!(u, |u: api::User| outln!(
                "user {} {}",
                u.id,
                if u.disabled { "disabled" } else { "enabled" }
            ));
        }
        Cmd::Access {
            user,
            device,
            service,
            transport,
        } => {
            let mut query = vec![("transport", transport.clone())];
            query.extend(user.clone().map(|u| ("user", u)));
            query.extend(device.clone().map(|d| ("device", d)));
            query.extend(service.clone().map(|s| ("service", s)));
            let v: api::Access = c.get(&path_with_query("/v1/access", &query)?).await?;
            out!(v, |v: api::Access| {
                outln!(
                    "{} on {}, over {} (snapshot {}):",
                    v.user,
                    v.device.as_deref().map_or_else(
                        || "a new device in good standing".to_owned(),
                        |d| format!("device {d}")
                    ),
                    v.transport,
                    v.snapshot_version
                );
                table(
                    &["service", "decision", "reason", "policies"],
                    v.decisions
                        .into_iter()
                        .map(|d| {
                            vec![
                                d.service,
                                if d.allow { "allow" } else { "deny" }.to_owned(),
                                match d.error {
                                    Some(e) => format!("{}: {e}", d.reason),
                                    None => d.reason,
                                },
                                d.policies.join(","),
                            ]
                        })
                        .collect(),
                );
            });
        }
        Cmd::Group(GroupCmd::Add { name }) => {
            let g: api::Group = c
                .post("/v1/groups", &api::CreateGroup { name: name.clone() })
                .await?;
            out!(g, |g: api::Group| outln!("group {} added", g.name));
        }
        Cmd::Group(GroupCmd::List) => {
            let v: Vec<api::Group> = c.get("/v1/groups").await?;
            out!(v, |v: Vec<api::Group>| table(
                &["name", "members"],
                v.into_iter()
                    .map(|g| vec![g.name, g.members.join(",")])
                    .collect()
            ));
        }
        Cmd::Group(GroupCmd::AddMember { group, user }) => {
            let v: serde_json::Value = c
                .post(
                    &format!("/v1/groups/{}/members", seg(group)),
                    &serde_json::json!({ "user": user }),
                )
                .await?;
            out!(v, |_| outln!("{user} added to {group}"));
        }
        Cmd::Group(GroupCmd::RmMember { group, user }) => {
            c.delete(&format!("/v1/groups/{}/members/{}", seg(group), seg(user)))
                .await?;
            let v = serde_json::json!({ "removed": "member", "group": group, "user": user });
            out!(v, |_| outln!("{user} removed from {group}"));
        }
        Cmd::Group(GroupCmd::Rm { name }) => {
            c.delete(&format!("/v1/groups/{}", seg(name))).await?;
            out!(removed("group", name), |_| outln!("group {name} removed"));
        }
        Cmd::Service(ServiceCmd::Add {
            name,
            target,
            connectors,
        }) => {
            let s: api::Service = c
                .post(
                    "/v1/services",
                    &api::CreateService {
                        name: name.clone(),
                        target: target.clone(),
                        connectors: connectors.clone(),
                    },
                )
                .await?;
            out!(s, print_service);
        }
        Cmd::Service(ServiceCmd::Set {
            name,
            target,
            connectors,
        }) => {
            let s: api::Service = c
                .with_body(
                    reqwest::Method::PATCH,
                    &format!("/v1/services/{}", seg(name)),
                    &api::UpdateService {
                        target: target.clone(),
                        connectors: (!connectors.is_empty()).then(|| connectors.clone()),
                    },
                )
                .await?;
            out!(s, print_service);
        }
        Cmd::Service(ServiceCmd::List) => {
            let v: Vec<api::Service> = c.get("/v1/services").await?;
            out!(v, |v: Vec<api::Service>| table(
                &["name", "target", "connectors"],
                v.into_iter()
                    .map(|s| vec![s.name, s.target, s.connectors.join(",")])
                    .collect()
            ));
        }
        Cmd::Service(ServiceCmd::Rm { name }) => {
            c.delete(&format!("/v1/services/{}", seg(name))).await?;
            out!(removed("service", name), |_| outln!(
                "service {name} removed"
            ));
        }
        Cmd::Policy(
            PolicyCmd::Add {
                name,
                source,
                dry_run: true,
            }
            | PolicyCmd::Set {
                name,
                source,
                dry_run: true,
            },
        ) => {
            let body = api::PolicyCheck {
                text: Some(source.text()?),
            };
            let expect = if matches!(a.cmd, Cmd::Policy(PolicyCmd::Add { .. })) {
                "add"
            } else {
                "replace"
            };
            check_policy(c, name, &body, expect, json).await?;
        }
        Cmd::Policy(PolicyCmd::Rm {
            name,
            dry_run: true,
        }) => {
            check_policy(c, name, &api::PolicyCheck::default(), "remove", json).await?;
        }
        Cmd::Policy(PolicyCmd::Add { name, source, .. }) => {
            let text = source.text()?;
            let p: api::Policy = c
                .post(
                    "/v1/policies",
                    &api::CreatePolicy {
                        name: name.clone(),
                        text,
                    },
                )
                .await?;
            let unknown = p.unknown.clone();
            out!(p, |p: api::Policy| outln!("policy {} added", p.name));
            warn_unknown(name, &unknown);
        }
        Cmd::Policy(PolicyCmd::Set { name, source, .. }) => {
            let p: api::Policy = c
                .with_body(
                    reqwest::Method::PUT,
                    &format!("/v1/policies/{}", seg(name)),
                    &api::ReplacePolicy {
                        text: source.text()?,
                    },
                )
                .await?;
            let unknown = p.unknown.clone();
            out!(p, |p: api::Policy| outln!("policy {} replaced", p.name));
            warn_unknown(name, &unknown);
        }
        Cmd::Policy(PolicyCmd::List) => {
            let v: Vec<api::Policy> = c.get("/v1/policies").await?;
            out!(v, |v: Vec<api::Policy>| for p in v {
                outln!("# {}", p.name);
                for u in &p.unknown {
                    outln!("# (names {u}, which does not exist: grants nothing through it)");
                }
                outln!("{}\n", p.text.trim_end());
            });
        }
        Cmd::Policy(PolicyCmd::Rm { name, .. }) => {
            c.delete(&format!("/v1/policies/{}", seg(name))).await?;
            out!(removed("policy", name), |_| outln!("policy {name} removed"));
        }
        Cmd::Token(TokenCmd::Create {
            role,
            user,
            name,
            ttl,
        }) => {
            let t: api::EnrollTokenCreated = c
                .post(
                    "/v1/enrollment-tokens",
                    &api::CreateEnrollToken {
                        role: role.clone(),
                        user: user.clone(),
                        name: name.clone(),
                        ttl_secs: ttl.map(|d| d.as_secs()),
                    },
                )
                .await?;
            out!(
                serde_json::json!({
                    "id": t.id, "token": t.token, "role": t.role, "expires_at": t.expires_at,
                    "user": t.user, "name": t.name,
                }),
                |_| {
                    outln!("{}", t.token);
                    eprintln!(
                        "{} token {} for {} (expires {}; shown once)",
                        t.role,
                        t.id,
                        t.user.as_deref().or(t.name.as_deref()).unwrap_or("-"),
                        ts(t.expires_at)
                    );
                }
            );
        }
        Cmd::Token(TokenCmd::List) => {
            let v: Vec<api::EnrollTokenInfo> = c.get("/v1/enrollment-tokens").await?;
            out!(v, |v: Vec<api::EnrollTokenInfo>| table(
                &["id", "role", "for", "expires", "used by"],
                v.into_iter()
                    .map(|t| vec![
                        t.id,
                        t.role,
                        t.user.or(t.name).unwrap_or_default(),
                        ts(t.expires_at),
                        match (t.used_by, t.used_at) {
                            (Some(by), Some(at)) => format!("{by} at {}", ts(at)),
                            (Some(by), None) => by,
                            _ => "-".to_owned(),
                        },
                    ])
                    .collect()
            ));
        }
        Cmd::Token(TokenCmd::Rm { id }) => {
            c.delete(&format!("/v1/enrollment-tokens/{}", seg(id)))
                .await?;
            out!(removed("enrollment_token", id), |_| outln!(
                "enrollment token {id} removed"
            ));
        }
        Cmd::Device(DeviceCmd::List { user, page }) => {
            let filter: Vec<_> = user.iter().map(|u| ("user", u.clone())).collect();
            let v: Vec<api::Device> =
                list_pages(c, "/v1/devices", &filter, page, |d: &api::Device| &d.id).await?;
            // An older controller ignores the filter: never show another user's devices as
            // this user's.
            if let Some(u) = user {
                let want = u.trim().to_ascii_lowercase();
                if v.iter().any(|d| d.user != want) {
                    bail!(
                        "the controller does not filter devices by user (is it older than this command?); upgrade it"
                    );
                }
            }
            out!(v, |v: Vec<api::Device>| table(
                &[
                    "id",
                    "user",
                    "state",
                    "cert expires",
                    "renews until",
                    "serial"
                ],
                v.into_iter()
                    .map(|d| vec![
                        d.id,
                        d.user,
                        state(d.cert_state, d.revoked),
                        ts(d.cert_not_after),
                        d.renew_until.map_or_else(|| "-".to_owned(), ts),
                        d.cert_serial
                    ])
                    .collect()
            ));
        }
        Cmd::Device(DeviceCmd::Revoke { id }) => {
            let v = c.revoke("devices", id).await?;
            out!(v, |_| outln!("device {id} revoked"));
        }
        Cmd::Connector(ConnectorCmd::List { name, page }) => {
            let filter: Vec<_> = name.iter().map(|n| ("name", n.clone())).collect();
            let v: Vec<api::Connector> =
                list_pages(c, "/v1/connectors", &filter, page, |x: &api::Connector| {
                    &x.id
                })
                .await?;
            if let Some(n) = name
                && v.iter().any(|x| &x.name != n)
            {
                bail!(
                    "the controller does not filter connectors by name (is it older than this command?); upgrade it"
                );
            }
            out!(v, |v: Vec<api::Connector>| table(
                &[
                    "id",
                    "name",
                    "state",
                    "cert expires",
                    "renews until",
                    "version"
                ],
                v.into_iter()
                    .map(|x| vec![
                        x.id,
                        x.name,
                        state(x.cert_state, x.revoked),
                        ts(x.cert_not_after),
                        x.renew_until.map_or_else(|| "-".to_owned(), ts),
                        x.version.unwrap_or_else(|| "-".to_owned()),
                    ])
                    .collect()
            ));
        }
        Cmd::Connector(ConnectorCmd::Revoke { id }) => {
            let v = c.revoke("connectors", id).await?;
            out!(v, |_| outln!("connector {id} revoked"));
        }
        Cmd::Broker(BrokerCmd::List) => {
            let v: Vec<api::Broker> = c.get("/v1/brokers/all").await?;
            out!(v, |v: Vec<api::Broker>| table(
                &[
                    "id",
                    "name",
                    "quic",
                    "tcp",
                    "snapshot",
                    "last seen",
                    "state",
                    "cert expires",
                    "renews until",
                    "version"
                ],
                v.into_iter()
                    .map(|b| vec![
                        b.id,
                        b.name,
                        b.quic_addr.unwrap_or_default(),
                        b.tcp_addr.unwrap_or_default(),
                        b.snapshot_version.to_string(),
                        ts(b.last_seen),
                        state(b.cert_state, false),
                        ts(b.cert_not_after),
                        b.renew_until.map_or_else(|| "-".to_owned(), ts),
                        b.version.unwrap_or_else(|| "-".to_owned()),
                    ])
                    .collect()
            ));
        }
        Cmd::Broker(BrokerCmd::Revoke { id }) => {
            let v = c.revoke("brokers", id).await?;
            out!(v, |_| outln!("broker {id} revoked"));
        }
        Cmd::AdminToken(AdminTokenCmd::Rotate) => {
            let t: api::AdminTokenCreated = c
                .post("/v1/admin-token/rotate", &serde_json::json!({}))
                .await?;
            // The old token is dead now: the new one is printed whatever happens to the file.
            let saved = c.token_file.as_ref().map(|p| {
                // A symlink (to a secrets mount, a shared copy) is written through: replacing
                // the link would leave the file it points to, which others read, with the
                // dead token.
                let target = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                // Its readers keep their access: the file is replaced with the mode it had
                // (new files are 0600).
                let mode = std::fs::metadata(&target).ok().map(|m| m.permissions());
                umbra_pki::write_private_file(&target, format!("{}\n", t.token).as_bytes())
                    .and_then(|()| match mode {
                        Some(m) => std::fs::set_permissions(&target, m),
                        None => Ok(()),
                    })
                    .map(|()| p.clone())
                    .map_err(|e| format!("cannot write {}: {e}", target.display()))
            });
            out!(
                serde_json::json!({
                    "id": t.id,
                    "token": t.token,
                    "replaced": t.replaced,
                    "token_file": saved.as_ref().and_then(|r| r.as_ref().ok()),
                    "token_file_error": saved.as_ref().and_then(|r| r.as_ref().err()),
                }),
                |_| {
                    outln!("{}", t.token);
                    eprintln!(
                        "admin token {} replaces {} token(s), which no longer work",
                        t.id, t.replaced
                    );
                }
            );
            match saved {
                Some(Ok(p)) => eprintln!("new token written to {}", p.display()),
                // A failure: a script checking only the exit status would go on with the
                // dead token in its file.
                Some(Err(e)) => anyhow::bail!(
                    "the token was rotated, but {e}: store the new token printed above now"
                ),
                None => eprintln!("shown once: store it now"),
            }
        }
        Cmd::Stream(StreamCmd::List) => {
            let (v, headers): (Vec<api::LiveStream>, _) = c
                .send_with_headers(c.http.get(format!("{}/v1/streams", c.base)))
                .await?;
            // Said on stderr (stdout stays the list): brokers left out may carry streams.
            let count = |name: &str| {
                headers
                    .get(name)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let silent = count("x-umbra-brokers-silent");
            if silent > 0 {
                eprintln!(
                    "note: {silent} broker(s) not heard from in the last 30 s are left out; \
                     streams they carry are not listed (see `umbra admin broker list`)"
                );
            }
            let omitted = count("x-umbra-streams-omitted");
            if omitted > 0 {
                eprintln!(
                    "note: {omitted} more live stream(s) are not listed: a broker lists at most \
                     16384 of its streams, the oldest"
                );
            }
            let names = if json {
                PeerNames::default()
            } else {
                PeerNames::fetch(c).await?
            };
            let broker = |id: String| names.broker(id);
            let connector = |id: String| names.connector(id);
            out!(v, |v: Vec<api::LiveStream>| table(
                &[
                    "id",
                    "broker",
                    "user",
                    "service",
                    "connector",
                    "transport",
                    "up",
                    "down",
                    "since"
                ],
                v.into_iter()
                    .map(|s| vec![
                        s.id.to_string(),
                        broker(s.broker),
                        s.user,
                        s.service,
                        connector(s.connector),
                        s.transport,
                        s.bytes_up.to_string(),
                        s.bytes_down.to_string(),
                        ts(s.started_at)
                    ])
                    .collect()
            ));
        }
        Cmd::Rollout { snapshot } => {
            let r = match a.wait {
                Some(wait) => rollout(c, *snapshot, wait, false).await?,
                None => {
                    let query: Vec<_> = snapshot
                        .iter()
                        .map(|v| ("version", v.to_string()))
                        .collect();
                    c.get(&path_with_query("/v1/rollout", &query)?).await?
                }
            };
            // Judged before the report is printed (printing takes it); said after.
            let judged = a.wait.map(|wait| Verdict::of(&r).into_result(&r, wait));
            out!(r, |r: api::Rollout| {
                outln!(
                    "snapshot {} (the controller's current: {}): applied at {} of {} broker(s), {} behind, {} silent",
                    r.version,
                    r.current,
                    r.applied,
                    r.brokers.len(),
                    r.behind,
                    r.silent
                );
                table(
                    &["name", "id", "state", "snapshot", "last seen"],
                    r.brokers
                        .into_iter()
                        .map(|b| {
                            vec![
                                b.name,
                                b.id,
                                b.state.as_str().to_owned(),
                                b.snapshot_version.to_string(),
                                ts(b.last_seen),
                            ]
                        })
                        .collect(),
                );
            });
            if let Some(judged) = judged {
                judged?;
            }
        }
        Cmd::Audit {
            after,
            limit,
            last,
            actor,
            action,
            target,
            result,
            follow,
            ..
        } => {
            let mut filters = Vec::new();
            for (name, value) in [
                ("actor", actor),
                ("action", action),
                ("target", target),
                ("result", result),
            ] {
                filters.extend(value.clone().map(|v| (name, v)));
            }
            // `--follow` alone starts like `tail -f`: with the newest few.
            let last = match (follow, limit, last, after) {
                (true, None, None, 0) => Some(10),
                _ => *last,
            };
            let mut query = vec![("after", after.to_string())];
            query.extend(limit.map(|n| ("limit", n.to_string())));
            query.extend(last.map(|n| ("last", n.to_string())));
            query.extend(filters.iter().cloned());
            let v: Vec<api::AuditEntry> = c.get(&audit_path(&query)?).await?;
            if *follow {
                return follow_audit(c, v, *after, &filters, json).await;
            }
            // A full page of the oldest events is not the whole log: say how to go on, on
            // stderr (a script reading stdout gets the page as it was).
            let page = limit.map_or(AUDIT_PAGE, |n| n as usize);
            if let Some(end) = v.last().filter(|_| last.is_none() && v.len() >= page) {
                eprintln!(
                    "{} events shown, oldest first; more may follow: --after {} for the next \
                     page, --last N for the newest",
                    v.len(),
                    end.seq
                );
            }
            out!(v, |v: Vec<api::AuditEntry>| table(
                &[
                    "seq", "at", "actor", "action", "target", "result", "source", "detail"
                ],
                v.into_iter()
                    .map(|e| vec![
                        e.seq.to_string(),
                        at(&e),
                        e.record.actor,
                        e.record.action,
                        e.record.target,
                        e.record.result,
                        e.source,
                        e.record.detail.to_string()
                    ])
                    .collect()
            ));
        }
    }
    Ok(())
}

/// Says on stderr what a policy just written names that does not exist (a typo, or a group
/// since removed): Cedar accepts it, and it grants nothing through it.
fn warn_unknown(policy: &str, unknown: &[String]) {
    for u in unknown {
        eprintln!(
            "warning: policy {policy} names {u}, which does not exist: it grants nothing \
             through it until one of that name is made"
        );
    }
}

/// The events `/v1/audit` answers without `limit` or `last`.
const AUDIT_PAGE: usize = 100;

/// How often `audit --follow` asks for new events.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `umbra admin audit --follow`: prints `first`, then every newer event matching `filters`
/// as it is recorded, until Ctrl-C. A controller that cannot be reached (restarting, say) is
/// said once and asked again; a refusal (the admin token rotated) ends the command.
async fn follow_audit(
    c: &Client,
    first: Vec<api::AuditEntry>,
    after: i64,
    filters: &[(&str, String)],
    json: bool,
) -> anyhow::Result<()> {
    let mut seen = first.last().map_or(after, |e| e.seq);
    let mut page = first;
    let mut unreachable = false;
    loop {
        // Line by line through `outln!`: a reader that goes away (`| head`) ends the command
        // quietly, by SIGPIPE, as it ends every other one.
        for e in &page {
            if json {
                outln!("{}", serde_json::to_string(e)?);
            } else {
                let r = &e.record;
                outln!(
                    "{}  {}  {}  {}  {}  {}  {}  {}",
                    e.seq,
                    at(e),
                    r.actor,
                    r.action,
                    r.target,
                    r.result,
                    e.source,
                    r.detail
                );
            }
        }
        let full = page.len() >= 1000;
        if !full {
            tokio::select! {
                r = tokio::signal::ctrl_c() => return r.map_err(Into::into),
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
        }
        let mut query = vec![("after", seen.to_string()), ("limit", "1000".to_owned())];
        query.extend(filters.iter().cloned());
        page = match c.get::<Vec<api::AuditEntry>>(&audit_path(&query)?).await {
            Ok(p) => {
                if std::mem::take(&mut unreachable) {
                    eprintln!("controller reachable again");
                }
                p
            }
            // Not reached (the HTTP layer failed): try again. Answered with a refusal: stop.
            Err(e) if e.chain().any(|c| c.is::<reqwest::Error>()) => {
                if !std::mem::replace(&mut unreachable, true) {
                    eprintln!("{e:#}; trying again every second");
                }
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        seen = page.last().map_or(seen, |e| e.seq);
    }
}

/// A listing that pages (`/v1/devices`, `/v1/connectors`): the page `page` asks for, or, without
/// `--limit`, every entry, fetched a page at a time after the last id of the one before. A
/// controller that ignores the paging (one older than this command) is an error, not an
/// endless loop: a page longer than asked for, or one that repeats an id.
async fn list_pages<T: DeserializeOwned>(
    c: &Client,
    path: &str,
    filter: &[(&str, String)],
    page: &PageArgs,
    id: impl Fn(&T) -> &String,
) -> anyhow::Result<Vec<T>> {
    const PAGE: u32 = 1000;
    let limit = page.limit.unwrap_or(PAGE);
    let mut all = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut after = page.after.clone();
    loop {
        let mut query = filter.to_vec();
        query.push(("limit", limit.to_string()));
        query.extend(after.take().map(|a| ("after", a)));
        let v: Vec<T> = c.get(&path_with_query(path, &query)?).await?;
        if v.len() > limit as usize || !v.iter().all(|x| seen.insert(id(x).clone())) {
            bail!(
                "the controller does not page {path} (is it older than this command?); \
                 upgrade it, or list without --user, --limit and --after"
            );
        }
        let full = v.len() == limit as usize;
        after = v.last().map(|x| id(x).clone());
        all.extend(v);
        if page.limit.is_some() || !full {
            return Ok(all);
        }
    }
}

/// `/v1/audit` with `query`, each value percent-encoded (an identity URI or an e-mail address
/// is a valid filter).
fn audit_path(query: &[(&str, String)]) -> anyhow::Result<String> {
    path_with_query("/v1/audit", query)
}

/// `policy add|set|rm --dry-run`: the live streams the change would end. `expect` is the
/// change the command makes; a dry run of a command that would be refused (`add` of a name
/// in use, `set` of a name not in use) fails as the command would.
async fn check_policy(
    c: &Client,
    name: &str,
    body: &api::PolicyCheck,
    expect: &str,
    json: bool,
) -> anyhow::Result<()> {
    let r: api::PolicyCheckResult = c
        .post(&format!("/v1/policies/{}/check", seg(name)), body)
        .await?;
    // Refused as the command itself would be (status, message and field), so that a script
    // reads a dry run's refusal as it reads the real one's.
    let refused = |status, error: String| Refused {
        status,
        error,
        field: Some("name".to_owned()),
    };
    match (expect, r.change.as_str()) {
        (e, got) if e == got => {}
        ("add", _) => {
            let error = format!("policy {name} already exists");
            return Err(refused(reqwest::StatusCode::CONFLICT, error).into());
        }
        _ => {
            let error = format!("no policy {name}");
            return Err(refused(reqwest::StatusCode::NOT_FOUND, error).into());
        }
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    outln!(
        "dry run, nothing changed: to {} policy {name} would end {} of {} live streams",
        r.change,
        r.ends.len(),
        r.live
    );
    if r.brokers_silent > 0 {
        outln!(
            "({} brokers not heard from lately are not counted; they apply the change too)",
            r.brokers_silent
        );
    }
    if r.streams_omitted > 0 {
        outln!(
            "({} live streams the brokers do not list are not counted; the change applies to \
             them too)",
            r.streams_omitted
        );
    }
    if !r.ends.is_empty() {
        let names = PeerNames::fetch(c).await?;
        table(
            &[
                "id", "broker", "user", "device", "service", "since", "reason",
            ],
            r.ends
                .into_iter()
                .map(|e| {
                    vec![
                        e.stream.id.to_string(),
                        names.broker(e.stream.broker),
                        e.stream.user,
                        e.stream.device,
                        e.stream.service,
                        ts(e.stream.started_at),
                        e.reason,
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

/// Brokers' and connectors' names by id. Live streams name them by id (what a certificate
/// proves); the tables people read name them. An id with no name (a broker revoked since) is
/// shown as the id.
#[derive(Default)]
struct PeerNames {
    brokers: std::collections::HashMap<String, String>,
    connectors: std::collections::HashMap<String, String>,
}

impl PeerNames {
    async fn fetch(c: &Client) -> anyhow::Result<PeerNames> {
        let brokers = c.get::<Vec<api::Broker>>("/v1/brokers/all").await?;
        let connectors = c.get::<Vec<api::Connector>>("/v1/connectors").await?;
        Ok(PeerNames {
            brokers: brokers.into_iter().map(|b| (b.id, b.name)).collect(),
            connectors: connectors.into_iter().map(|x| (x.id, x.name)).collect(),
        })
    }

    fn broker(&self, id: String) -> String {
        self.brokers.get(&id).cloned().unwrap_or(id)
    }

    fn connector(&self, id: String) -> String {
        self.connectors.get(&id).cloned().unwrap_or(id)
    }
}

fn print_service(s: api::Service) {
    outln!(
        "service {} -> {} via {}",
        s.name,
        s.target,
        s.connectors.join(",")
    );
}

/// `path?query`, the query's values percent-encoded.
fn path_with_query(path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse("https://controller")?.join(path)?;
    url.query_pairs_mut()
        .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    Ok(match url.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}", url.path()),
        _ => url.path().to_owned(),
    })
}

#[cfg(test)]
mod rollout_tests {
    use super::{Cmd, Verdict, api};
    use clap::Parser;

    fn broker(name: &str, state: api::RolloutState, held: u64, seen: u64) -> api::RolloutBroker {
        api::RolloutBroker {
            id: format!("id-{name}"),
            name: name.to_owned(),
            snapshot_version: held,
            last_seen: seen,
            state,
        }
    }

    fn report(brokers: Vec<api::RolloutBroker>) -> api::Rollout {
        let n = |s| brokers.iter().filter(|b| b.state == s).count() as u64;
        api::Rollout {
            version: 9,
            current: 9,
            applied: n(api::RolloutState::Applied),
            behind: n(api::RolloutState::Behind),
            silent: n(api::RolloutState::Silent),
            brokers,
        }
    }

    #[test]
    fn a_change_is_confirmed_only_where_every_broker_applied_it() {
        use api::RolloutState::{Applied, Behind, Silent};
        assert_eq!(
            Verdict::of(&report(vec![
                broker("a", Applied, 9, 5),
                broker("b", Applied, 12, 5)
            ])),
            Verdict::Confirmed
        );
        assert_eq!(Verdict::of(&report(vec![])), Verdict::NoBroker);
        let Verdict::Unconfirmed(why) = Verdict::of(&report(vec![
            broker("a", Applied, 9, 5),
            broker("b", Behind, 8, 5),
            broker("c", Silent, 9, 5),
            broker("d", Silent, 0, 0),
        ])) else {
            panic!("confirmed with brokers behind and silent");
        };
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(
            why[0].contains("broker b is behind (it has 8 in force)"),
            "{why:?}"
        );
        assert!(
            why[1].contains("broker c is silent since 1970-01-01T00:00:05Z"),
            "{why:?}"
        );
        assert!(
            why[2].contains("broker d has never been heard from"),
            "{why:?}"
        );
        let behind = report(vec![broker("b", Behind, 8, 5)]);
        let e = Verdict::Unconfirmed(why.clone())
            .into_result(&behind, std::time::Duration::from_secs(7))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("not confirmed within 7 s: broker b"),
            "{e}"
        );
        // Only silent brokers left: the wait did not run out, and is not said to have.
        let silent = report(vec![broker("c", Silent, 9, 5)]);
        let e = Verdict::Unconfirmed(why)
            .into_result(&silent, std::time::Duration::from_secs(7))
            .unwrap_err();
        assert!(e.to_string().starts_with("not confirmed: broker b"), "{e}");
    }

    /// `--wait` is for what brokers enforce: every such command, and nothing else.
    #[test]
    fn wait_follows_changes_brokers_enforce() {
        let cmd = |line: &str| -> Cmd {
            let mut args = vec!["umbra", "admin"];
            args.extend(line.split(' '));
            match crate::Cli::try_parse_from(args).unwrap().command {
                crate::Command::Admin(a) => a.cmd,
                _ => unreachable!(),
            }
        };
        for line in [
            "user add a@b.c",
            "user rm a@b.c",
            "user disable a@b.c",
            "user enable a@b.c",
            "group add g",
            "group add-member g a@b.c",
            "group rm-member g a@b.c",
            "group rm g",
            "service add s --target h:1 --connector c",
            "service set s --target h:1",
            "service rm s",
            "policy add p --allow-user a@b.c --service s",
            "policy set p --text x",
            "policy rm p",
            "device revoke d",
            "connector revoke c",
            "broker revoke b",
        ] {
            assert!(cmd(line).changes_enforcement(), "{line}");
        }
        for line in [
            "user list",
            "group list",
            "service list",
            "policy list",
            "policy add p --text x --dry-run",
            "policy rm p --dry-run",
            "token create --role agent --user a@b.c",
            "token rm t",
            "admin-token rotate",
            "device list",
            "connector list",
            "broker list",
            "stream list",
            "access --user a@b.c",
            "audit",
            "rollout",
        ] {
            assert!(!cmd(line).changes_enforcement(), "{line}");
        }
    }

    /// A record whose source's clock is far from the controller's shows both times.
    #[test]
    fn audit_times_far_from_their_storing_show_both() {
        let entry = |at_ms: u64, received_ms: u64| api::AuditEntry {
            seq: 1,
            record: api::AuditRecord {
                at_ms,
                actor: "a".into(),
                action: "stream.open".into(),
                target: "t".into(),
                result: "allow".into(),
                detail: serde_json::Value::Null,
            },
            source: "umbra://default/broker/b".into(),
            received_ms,
        };
        let day = 86_400_000;
        assert_eq!(super::at(&entry(day, day + 60_000)), "1970-01-02T00:00:00Z");
        assert_eq!(
            super::at(&entry(day, 0)),
            "1970-01-02T00:00:00Z",
            "older controller"
        );
        assert_eq!(
            super::at(&entry(1_000, day)),
            "1970-01-01T00:00:01Z (stored 1970-01-02T00:00:00Z)"
        );
        assert_eq!(
            super::at(&entry(2 * day, day)),
            "1970-01-03T00:00:00Z (stored 1970-01-02T00:00:00Z)"
        );
    }

    #[test]
    fn a_wait_is_a_second_to_an_hour() {
        assert!(super::wait_time("0s").is_err());
        assert!(super::wait_time("61m").is_err());
        assert!(super::wait_time("soon").is_err());
        assert_eq!(
            super::wait_time("1h"),
            Ok(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            super::wait_time("10"),
            Ok(std::time::Duration::from_secs(10))
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{TokenSource, token_source};

    /// A stream's start time comes from a broker: any number is shown, none panics.
    #[test]
    fn any_reported_time_is_shown() {
        assert_eq!(super::ts(0), "-");
        assert_eq!(super::ts(86_400), "1970-01-02T00:00:00Z");
        assert_eq!(super::ts(u64::MAX), u64::MAX.to_string());
        assert_eq!(super::ts(253_402_300_800), "253402300800");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: super::Args,
    }

    fn args(flags: &[&str]) -> super::Args {
        let mut argv = vec!["umbra"];
        argv.extend_from_slice(flags);
        argv.extend_from_slice(&["user", "list"]);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().a
    }

    /// Flags, then the environment, then the config file: a token exported for the shell
    /// does not override a `--token-file` on the command line.
    #[test]
    fn the_admin_token_comes_from_the_most_deliberate_place() {
        let env = Some("from-env".to_owned());
        let f = |p: &str| TokenSource::File(PathBuf::from(p));
        let src = |a: &super::Args, env: Option<String>| {
            token_source(
                a,
                env,
                Some(PathBuf::from("/env-file")),
                Some("from-config".into()),
                Some(PathBuf::from("/config-file")),
            )
            .unwrap()
        };
        assert_eq!(
            src(&args(&["--token-file", "/flag-file"]), env.clone()),
            f("/flag-file")
        );
        assert_eq!(
            src(&args(&["--token", "t", "--token-file", "/x"]), env.clone()),
            TokenSource::Given("t".into())
        );
        assert_eq!(src(&args(&[]), env), TokenSource::Given("from-env".into()));
        assert_eq!(src(&args(&[]), None), f("/env-file"));
        let none = args(&[]);
        assert_eq!(
            token_source(
                &none,
                None,
                None,
                Some("c".into()),
                Some("/config-file".into())
            )
            .unwrap(),
            f("/config-file")
        );
        assert_eq!(
            token_source(&none, None, None, Some("c".into()), None).unwrap(),
            TokenSource::Given("c".into())
        );
        assert!(token_source(&none, None, None, None, None).is_err());
    }

    #[test]
    fn audit_filters_are_encoded() {
        let q = [
            ("after", "0".to_owned()),
            ("actor", "umbra://default/agent/d-1".to_owned()),
            ("target", "a b&c=d@example.com".to_owned()),
        ];
        assert_eq!(
            super::audit_path(&q).unwrap(),
            "/v1/audit?after=0&actor=umbra%3A%2F%2Fdefault%2Fagent%2Fd-1\
             &target=a+b%26c%3Dd%40example.com"
        );
        assert_eq!(super::audit_path(&[]).unwrap(), "/v1/audit");
    }

    #[test]
    fn dates() {
        assert_eq!(super::ts(0), "-");
        assert_eq!(super::ts(1_000_000_000), "2001-09-09T01:46:40Z");
        assert_eq!(super::ts(1_795_000_000), "2026-11-18T11:06:40Z");
        // A leap day.
        assert_eq!(super::ts(951_868_799), "2000-02-29T23:59:59Z");
    }

    #[test]
    fn path_segments() {
        assert_eq!(super::seg("demo@example.test"), "demo@example.test");
        assert_eq!(super::seg("a/b c"), "a%2Fb%20c");
    }
}
