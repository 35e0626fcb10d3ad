//! Authentication on the node: which tokens it accepts (`[auth]`), what
//! each one may do, and the tokens file's format and reloading.
//!
//! The node keeps SHA-256 digests, never tokens: a token is looked up by
//! its digest, so neither the file nor the node's memory holds anything a
//! client could present. Three kinds of caller:
//!
//! - a **tenant** token acts for its one tenant (every request it sends
//!   must name that tenant, or none when it is `default`); `admin` adds
//!   node operations (Drain, every namespace in Stats); `local` allows the
//!   zero-copy local path, whose shared arena exposes every tenant's
//!   host-tier bytes to the process that maps it;
//! - the **node** token (`auth.node-token-file`, one per cluster) is what
//!   nodes present to each other: any tenant, forwarded requests (which
//!   skip placement and keep an object's age), everything else;
//! - with authentication off (no `auth.tokens-file`, the default) every
//!   caller is **open**: trusted like a node, as before tokens existed.

use super::config::AuthSettings;
use crate::auth::Token;
use crate::validate;
use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// SHA-256 of a token.
type Digest256 = [u8; 32];

/// Tenant tokens by digest.
type Grants = HashMap<Digest256, Arc<Grant>>;

fn digest(token: &str) -> Digest256 {
    Sha256::digest(token.as_bytes()).into()
}

/// The SHA-256 of `token`, lower-case hex, as the tokens file wants it.
pub fn token_sha256(token: &Token) -> String {
    hex(&digest(token.secret()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new random token: `kvf_` and 64 hex digits, 256 bits from the
/// operating system's random source. Panics if that source fails (a
/// token from anything weaker must not be made).
pub fn new_token() -> Token {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    Token::new(format!("kvf_{}", hex(&b))).expect("a generated token is valid")
}

/// Who a caller is, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off: trusted.
    Open,
    /// Another node of the cluster.
    Node,
    /// A client acting for one tenant.
    Tenant(Arc<Grant>),
}

/// What one tenant token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The tenant it acts for.
    pub tenant: String,
    /// A label for logs (the file's `name`, else `tenant`).
    pub name: String,
    /// Node operations: Drain, and every namespace in Stats.
    pub admin: bool,
    /// The zero-copy local path.
    pub local: bool,
    /// The token's digest: what a reload looks it up by again.
    digest: Digest256,
}

impl Principal {
    /// Whether this caller may act for `tenant` (already defaulted and checked).
    pub fn may_act_for(&self, tenant: &str) -> bool {
        match self {
            Principal::Open | Principal::Node => true,
            Principal::Tenant(g) => g.tenant == tenant,
        }
    }

    /// Whether this caller may send requests other nodes forwarded.
    pub fn is_node(&self) -> bool {
        matches!(self, Principal::Open | Principal::Node)
    }

    /// Whether this caller may run node operations.
    pub fn is_admin(&self) -> bool {
        match self {
            Principal::Open | Principal::Node => true,
            Principal::Tenant(g) => g.admin,
        }
    }

    /// Whether this caller may use the local path.
    pub fn may_use_local(&self) -> bool {
        match self {
            Principal::Open | Principal::Node => true,
            Principal::Tenant(g) => g.local,
        }
    }

    /// The tenant a restricted caller is confined to (`None` for open and node).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Tenant(g) => Some(&g.tenant),
            _ => None,
        }
    }
}

/// Why a caller was not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token.
    Missing,
    /// A token the node does not know, or a malformed header.
    Unknown,
}

impl AuthFailure {
    /// Label for the failure metric.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Unknown => "unknown",
        }
    }

    /// The message a caller gets.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => {
                "this node authenticates callers: send a token (`authorization: Bearer TOKEN`; \
                 the CLI reads --token-file or $KVFABRIC_TOKEN)"
            }
            AuthFailure::Unknown => "the token is not one this node accepts",
        }
    }
}

/// One `[[token]]` table of the tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TokenEntry {
    tenant: String,
    sha256: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    local: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Parses a tokens file's text into digest -> grant.
fn parse_tokens(text: &str) -> Result<Grants, String> {
    // The error's message and line only: its default rendering quotes the
    // source line, which may be a token pasted under the wrong key.
    let f: TokensFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|sp| text[..sp.start.min(text.len())].lines().count().max(1));
        match line {
            Some(l) => format!("line {l}: {}", e.message()),
            None => e.message().to_string(),
        }
    })?;
    let mut out = HashMap::with_capacity(f.token.len());
    for (i, t) in f.token.into_iter().enumerate() {
        let at = format!("[[token]] #{}", i + 1);
        validate::name("tenant", &t.tenant).map_err(|e| format!("{at}: {e}"))?;
        let d = parse_digest(&t.sha256).ok_or_else(|| {
            format!("{at}: sha256 must be 64 hex digits (the SHA-256 of the token; `kvfabric auth hash` prints it)")
        })?;
        let name = t.name.unwrap_or_else(|| t.tenant.clone());
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!("{at}: name must be 1 to 64 visible ASCII characters"));
        }
        let g = Grant {
            tenant: t.tenant,
            name,
            admin: t.admin,
            local: t.local,
            digest: d,
        };
        if out.insert(d, Arc::new(g)).is_some() {
            return Err(format!("{at}: the same sha256 is listed twice"));
        }
    }
    Ok(out)
}

fn parse_digest(s: &str) -> Option<Digest256> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

/// The node tokens a `node-token-file` holds: one per line (blank lines
/// ignored). The first is the one this node sends its peers; every one is
/// accepted from them, so a new token can be rolled out (added as a
/// second line everywhere, then moved first node by node, then the old
/// line removed).
#[derive(Debug)]
pub struct NodeTokens {
    /// What this node sends.
    pub send: Token,
    accept: Vec<Digest256>,
}

impl NodeTokens {
    /// Parses a node-token file's text.
    fn parse(text: &str) -> Result<NodeTokens, String> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            tokens.push(Token::new(line).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        let Some(send) = tokens.first().cloned() else {
            return Err("holds no token".into());
        };
        Ok(NodeTokens {
            send,
            accept: tokens.iter().map(|t| digest(t.secret())).collect(),
        })
    }

    /// Reads `auth.node-token-file` at start (warning when other users
    /// may read it; reloads do not repeat the warning).
    pub fn read(path: &Path) -> Result<NodeTokens, String> {
        warn_if_shared(path);
        Self::read_text(path).map(|(t, _)| t)
    }

    /// The file's tokens, and its bytes' digest (for reloads).
    fn read_text(path: &Path) -> Result<(NodeTokens, Digest256), String> {
        let at = |e: &dyn std::fmt::Display| format!("auth.node-token-file {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
        let tokens = NodeTokens::parse(&text).map_err(|e| at(&e))?;
        Ok((tokens, digest(&text)))
    }
}

/// Logs a warning when a secret file can be read by other users.
pub(crate) fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
            "a secret file (token or private key) other users can read or write: chmod 600 it");
    }
}

/// What the node accepts, swapped whole on a reload.
#[derive(Debug)]
struct Accepted {
    tenants: Grants,
    nodes: Vec<Digest256>,
}

/// The tokens a node accepts. Built from `[auth]` at start
/// ([`Authenticator::from_settings`]: `None` when authentication is off)
/// and reloaded when the tokens file or the node-token file changes.
#[derive(Debug)]
pub struct Authenticator {
    path: PathBuf,
    node_path: Option<PathBuf>,
    accepted: RwLock<Arc<Accepted>>,
    /// Digest of both files' bytes when last loaded: a reload reads them
    /// and swaps only when that changed (modification times miss a copy
    /// that keeps them, and two writes within their granularity).
    loaded: parking_lot::Mutex<Digest256>,
    /// Bumped on every reload that changed what is accepted, so that
    /// long-lived sessions (Subscribe and Put streams, local-path
    /// connections) check their token again ([`Self::still_valid`]).
    generation: tokio::sync::watch::Sender<u64>,
}

impl Authenticator {
    /// The authenticator `[auth]` describes, or `None` when it is off.
    /// Errors name the file and what is wrong with it.
    pub fn from_settings(a: &AuthSettings) -> Result<Option<Arc<Authenticator>>, String> {
        let Some(path) = &a.tokens_file else {
            return Ok(None);
        };
        let (accepted, d) = Self::read(path, a.node_token_file.as_deref())?;
        Ok(Some(Arc::new(Authenticator {
            path: path.clone(),
            node_path: a.node_token_file.clone(),
            accepted: RwLock::new(Arc::new(accepted)),
            loaded: parking_lot::Mutex::new(d),
            generation: tokio::sync::watch::Sender::new(0),
        })))
    }

    /// Both files, checked, and the digest of their bytes.
    fn read(path: &Path, node_path: Option<&Path>) -> Result<(Accepted, Digest256), String> {
        let at = |e: &dyn std::fmt::Display| format!("auth.tokens-file {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
        let tenants = parse_tokens(&text).map_err(|e| at(&e))?;
        let mut h = Sha256::new();
        h.update(text.as_bytes());
        let nodes = match node_path {
            Some(p) => {
                let (t, d) = NodeTokens::read_text(p)?;
                h.update(d);
                t.accept
            }
            None => Vec::new(),
        };
        if nodes.iter().any(|n| tenants.contains_key(n)) {
            return Err(at(
                &"lists a node token as a tenant token: nodes and tenants need different tokens",
            ));
        }
        Ok((Accepted { tenants, nodes }, h.finalize().into()))
    }

    /// Tenant tokens loaded.
    pub fn len(&self) -> usize {
        self.accepted.read().tenants.len()
    }

    /// Whether no tenant token is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Who presents `token` (the bearer token of a call, if any).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthFailure> {
        let token = token.ok_or(AuthFailure::Missing)?;
        let d = digest(token);
        let a = self.accepted.read();
        if a.nodes.contains(&d) {
            return Ok(Principal::Node);
        }
        match a.tenants.get(&d) {
            Some(g) => Ok(Principal::Tenant(g.clone())),
            None => Err(AuthFailure::Unknown),
        }
    }

    /// The reload count, to watch for (see [`Self::still_valid`]).
    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether `p`, authenticated earlier, would still be with the tokens
    /// in use now: its token is still listed with the same grant. Nodes
    /// and open callers always are (a node token is revoked by restarting
    /// the nodes without it).
    pub fn still_valid(&self, p: &Principal) -> bool {
        match p {
            Principal::Tenant(g) => self.accepted.read().tenants.get(&g.digest).is_some_and(|now| now == g),
            _ => true,
        }
    }

    /// Re-reads the tokens file and the node-token file, and swaps in what
    /// they hold if their bytes changed. `Ok(true)` when it did; on an
    /// error the tokens in use stay (a file deleted or half-written is an
    /// error, or fewer tokens, until it is whole: replace it by renaming a
    /// complete file over it).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let (accepted, d) = Self::read(&self.path, self.node_path.as_deref())?;
        let mut loaded = self.loaded.lock();
        if *loaded == d {
            return Ok(false);
        }
        *self.accepted.write() = Arc::new(accepted);
        self.generation.send_modify(|g| *g += 1);
        *loaded = d;
        Ok(true)
    }

    /// Reloads the tokens file every `every` until `stop` is set (logging
    /// what happened; metrics through `on_reload(ok)`).
    pub(crate) fn spawn_reloader(
        self: &Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
        on_reload: impl Fn(bool) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let m = me.clone();
                match tokio::task::spawn_blocking(move || m.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(file = %me.path.display(), tokens = me.len(), "auth: tokens file reloaded");
                        on_reload(true);
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "auth: tokens file not reloaded");
                        on_reload(false);
                    }
                    Err(e) => tracing::error!(error = %e, "auth: reload task failed"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn entry(tenant: &str, token: &Token, extra: &str) -> String {
        format!(
            "[[token]]\ntenant = {tenant:?}\nsha256 = {:?}\n{extra}\n",
            token_sha256(token)
        )
    }

    #[test]
    fn tokens_map_to_their_grants_and_nothing_else_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, n) = (new_token(), new_token(), new_token());
        let file = write(
            dir.path(),
            "tokens.toml",
            &(entry("acme", &a, "") + &entry("ops", &b, "admin = true\nname = \"ops-cli\"")),
        );
        let node = write(dir.path(), "node", &format!("{}\n", n.secret()));
        let auth = Authenticator::from_settings(&AuthSettings {
            tokens_file: Some(file),
            node_token_file: Some(node),
            reload_interval_s: 0,
        })
        .unwrap()
        .unwrap();
        let Principal::Tenant(g) = auth.authenticate(Some(a.secret())).unwrap() else {
            panic!("a tenant token")
        };
        assert_eq!(
            (g.tenant.as_str(), g.name.as_str(), g.admin, g.local),
            ("acme", "acme", false, false)
        );
        let p = auth.authenticate(Some(b.secret())).unwrap();
        assert!(p.is_admin() && !p.is_node() && p.may_act_for("ops") && !p.may_act_for("acme"));
        assert_eq!(auth.authenticate(Some(n.secret())), Ok(Principal::Node));
        assert_eq!(auth.authenticate(None), Err(AuthFailure::Missing));
        assert_eq!(auth.authenticate(Some(new_token().secret())), Err(AuthFailure::Unknown));
        // The digest, not the token, is what the file holds.
        assert_eq!(auth.authenticate(Some(&token_sha256(&a))), Err(AuthFailure::Unknown));
    }

    #[test]
    fn off_without_a_tokens_file() {
        assert!(
            Authenticator::from_settings(&AuthSettings::default())
                .unwrap()
                .is_none()
        );
        assert!(Principal::Open.is_node() && Principal::Open.is_admin() && Principal::Open.may_act_for("x"));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let t = new_token();
        for (text, want) in [
            (
                "[[token]]\ntenant = \"a\"\nsha256 = \"abc\"\n".to_string(),
                "64 hex digits",
            ),
            (entry("bad tenant", &t, ""), "tenant"),
            (entry("a", &t, "") + &entry("b", &t, ""), "twice"),
            (entry("a", &t, "colour = \"red\""), "unknown field"),
            (entry("a", &t, "name = \"\""), "name"),
            ("[token]\ntenant = \"a\"\n".to_string(), "invalid type"),
        ] {
            let f = write(dir.path(), "t.toml", &text);
            let e = Authenticator::from_settings(&AuthSettings {
                tokens_file: Some(f.clone()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                e.contains(want) && e.contains(&f.display().to_string()),
                "{text:?}: {e}"
            );
        }
        let missing = AuthSettings {
            tokens_file: Some(dir.path().join("nope")),
            ..Default::default()
        };
        assert!(Authenticator::from_settings(&missing).unwrap_err().contains("nope"));
        // The node token listed as a tenant's.
        let f = write(dir.path(), "t.toml", &entry("a", &t, ""));
        let n = write(dir.path(), "n", t.secret());
        let e = Authenticator::from_settings(&AuthSettings {
            tokens_file: Some(f),
            node_token_file: Some(n),
            reload_interval_s: 0,
        })
        .unwrap_err();
        assert!(e.contains("node token"), "{e}");
    }

    #[test]
    fn changed_files_are_reloaded_and_broken_ones_keep_the_tokens_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, n1, n2) = (new_token(), new_token(), new_token(), new_token());
        let f = write(dir.path(), "t.toml", &entry("acme", &a, ""));
        let n = write(dir.path(), "node", &format!("{}\n", n1.secret()));
        let auth = Authenticator::from_settings(&AuthSettings {
            tokens_file: Some(f.clone()),
            node_token_file: Some(n.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(auth.reload_if_changed(), Ok(false));
        // Rotate: b in, a out. The same modification time (`cp -p`, or
        // two writes within its granularity) is no obstacle: the bytes
        // are compared.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, entry("acme", &b, "")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(auth.reload_if_changed(), Ok(true));
        assert!(auth.authenticate(Some(b.secret())).is_ok());
        assert_eq!(auth.authenticate(Some(a.secret())), Err(AuthFailure::Unknown));
        // A second node token is accepted once added.
        assert_eq!(auth.authenticate(Some(n2.secret())), Err(AuthFailure::Unknown));
        std::fs::write(&n, format!("{}\n\n{}\n", n1.secret(), n2.secret())).unwrap();
        assert_eq!(auth.reload_if_changed(), Ok(true));
        assert_eq!(auth.authenticate(Some(n2.secret())), Ok(Principal::Node));
        assert_eq!(auth.authenticate(Some(n1.secret())), Ok(Principal::Node));
        // Broken files keep what is in use.
        std::fs::write(&f, "[[token]]\n").unwrap();
        assert!(auth.reload_if_changed().is_err());
        std::fs::write(&f, entry("acme", &b, "")).unwrap();
        std::fs::write(&n, "\n").unwrap();
        assert!(auth.reload_if_changed().unwrap_err().contains("holds no token"));
        std::fs::remove_file(&f).unwrap();
        assert!(auth.reload_if_changed().is_err());
        assert!(auth.authenticate(Some(b.secret())).is_ok());
        assert_eq!(auth.authenticate(Some(n2.secret())), Ok(Principal::Node));
    }

    #[test]
    fn node_token_files_send_the_first_and_accept_all() {
        let (n1, n2) = (new_token(), new_token());
        let t = NodeTokens::parse(&format!("\n  {}  \n{}\n", n1.secret(), n2.secret())).unwrap();
        assert_eq!(t.send, n1);
        assert_eq!(t.accept, vec![digest(n1.secret()), digest(n2.secret())]);
        assert!(NodeTokens::parse("").is_err());
        let e = NodeTokens::parse(&format!("{}\nshort\n", n1.secret())).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn parse_errors_never_quote_the_file() {
        // A token pasted under a wrong key must not reach the log.
        let secret = new_token();
        let text = format!("[[token]]\ntenant = \"a\"\ntoken = \"{}\"\n", secret.secret());
        let e = parse_tokens(&text).unwrap_err();
        assert!(!e.contains(secret.secret()), "{e}");
        assert!(e.contains("line"), "{e}");
        let e = parse_tokens(&format!("tenant = {}\n", secret.secret())).unwrap_err();
        assert!(!e.contains(secret.secret()), "{e}");
    }

    #[test]
    fn generated_tokens_are_distinct_and_valid() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.secret().starts_with("kvf_") && a.secret().len() == 68);
        assert_eq!(token_sha256(&a).len(), 64);
    }
}
