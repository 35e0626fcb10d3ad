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
use std::time::SystemTime;

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
    let f: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
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

/// The tokens a node accepts. Built from `[auth]` at start
/// ([`Authenticator::from_settings`]: `None` when authentication is off)
/// and reloaded from its file when that changes.
#[derive(Debug)]
pub struct Authenticator {
    path: PathBuf,
    tokens: RwLock<Arc<Grants>>,
    /// The tokens file's modification time when last loaded.
    loaded: parking_lot::Mutex<Option<SystemTime>>,
    node: Option<Digest256>,
    node_token: Option<Token>,
}

impl Authenticator {
    /// The authenticator `[auth]` describes, or `None` when it is off.
    /// Errors name the file and what is wrong with it.
    pub fn from_settings(a: &AuthSettings) -> Result<Option<Arc<Authenticator>>, String> {
        let Some(path) = &a.tokens_file else {
            return Ok(None);
        };
        let node_token = match &a.node_token_file {
            Some(p) => Some(Token::from_file(p).map_err(|e| format!("auth.node-token-file: {e}"))?),
            None => None,
        };
        let (tokens, mtime) = Self::read(path)?;
        if let Some(t) = &node_token
            && tokens.contains_key(&digest(t.secret()))
        {
            return Err(format!(
                "auth.tokens-file {} lists the node token as a tenant token: nodes and tenants need different tokens",
                path.display()
            ));
        }
        Ok(Some(Arc::new(Authenticator {
            path: path.clone(),
            tokens: RwLock::new(Arc::new(tokens)),
            loaded: parking_lot::Mutex::new(mtime),
            node: node_token.as_ref().map(|t| digest(t.secret())),
            node_token,
        })))
    }

    fn read(path: &Path) -> Result<(Grants, Option<SystemTime>), String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("auth.tokens-file {}: {e}", path.display()))?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("auth.tokens-file {}: {e}", path.display()))?;
        let tokens = parse_tokens(&text).map_err(|e| format!("auth.tokens-file {}: {e}", path.display()))?;
        Ok((tokens, meta.modified().ok()))
    }

    /// The node token, which this node presents to its peers.
    pub fn node_token(&self) -> Option<&Token> {
        self.node_token.as_ref()
    }

    /// Tenant tokens loaded.
    pub fn len(&self) -> usize {
        self.tokens.read().len()
    }

    /// Whether no tenant token is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Who presents `token` (the bearer token of a call, if any).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthFailure> {
        let token = token.ok_or(AuthFailure::Missing)?;
        let d = digest(token);
        if self.node == Some(d) {
            return Ok(Principal::Node);
        }
        match self.tokens.read().get(&d) {
            Some(g) => Ok(Principal::Tenant(g.clone())),
            None => Err(AuthFailure::Unknown),
        }
    }

    /// Reloads the tokens file if its modification time changed. `Ok(true)`
    /// when it was reloaded; on an error the tokens in use stay.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let mtime = std::fs::metadata(&self.path)
            .map_err(|e| format!("auth.tokens-file {}: {e}", self.path.display()))?
            .modified()
            .ok();
        if mtime.is_some() && *self.loaded.lock() == mtime {
            return Ok(false);
        }
        let (tokens, mtime) = Self::read(&self.path)?;
        if let Some(n) = self.node
            && tokens.contains_key(&n)
        {
            return Err(format!(
                "auth.tokens-file {} lists the node token as a tenant token; keeping the tokens in use",
                self.path.display()
            ));
        }
        *self.tokens.write() = Arc::new(tokens);
        *self.loaded.lock() = mtime;
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
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_tokens_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (new_token(), new_token());
        let f = write(dir.path(), "t.toml", &entry("acme", &a, ""));
        let auth = Authenticator::from_settings(&AuthSettings {
            tokens_file: Some(f.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(auth.reload_if_changed(), Ok(false));
        // Rotate: b in, a out. Set the time explicitly: two writes within
        // the file system's timestamp granularity look unchanged.
        std::fs::write(&f, entry("acme", &b, "")).unwrap();
        let later = std::fs::metadata(&f).unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(auth.reload_if_changed(), Ok(true));
        assert!(auth.authenticate(Some(b.secret())).is_ok());
        assert_eq!(auth.authenticate(Some(a.secret())), Err(AuthFailure::Unknown));
        // A broken file keeps b.
        std::fs::write(&f, "[[token]]\n").unwrap();
        let later = later + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(auth.reload_if_changed().is_err());
        assert!(auth.authenticate(Some(b.secret())).is_ok());
    }

    #[test]
    fn generated_tokens_are_distinct_and_valid() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.secret().starts_with("kvf_") && a.secret().len() == 68);
        assert_eq!(token_sha256(&a).len(), 64);
    }
}
