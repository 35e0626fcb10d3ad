//! [`EtcdTarget`]: where the cluster registry's etcd is and how to reach
//! it, parsed from the one URL every kvfabric process takes (`--cluster`):
//!
//! ```text
//! etcd://HOST:PORT[,HOST:PORT...][?PARAMS]     plain HTTP/2
//! etcds://HOST:PORT[,HOST:PORT...]?ca=PATH...  TLS
//! ```
//!
//! Parameters (`&`-separated `name=value`; a path may not contain `&`):
//!
//! - `ca=PATH`: PEM certificates the servers' chain must lead to (required
//!   with `etcds://`; there are no built-in roots);
//! - `cert=PATH`, `key=PATH`: a PEM client certificate and its key, for
//!   etcd's `--client-cert-auth` (both or neither; TLS only);
//! - `user=NAME`, `password-file=PATH`: etcd's own authentication (both or
//!   neither); the password is the file's first line. It never appears in
//!   the URL, so it stays out of process lists, logs and settings files.
//!   Over `etcd://` it crosses the network in clear, as etcd's own clients
//!   send it: use `etcds://` where the network is not trusted.
//!
//! Every file is read when the URL is parsed, so a missing or unreadable
//! one fails at load with its path, not at the first reconnect.

use std::fmt;
use std::path::Path;

/// A parsed etcd URL: endpoints plus TLS and credentials (see the module
/// doc). `Debug` and `Display` never show the key or the password.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    auth: Option<(String, String)>,
}

#[derive(Clone, PartialEq, Eq)]
struct Tls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTarget {
    /// Plain-HTTP endpoints (`http://HOST:PORT`), no credentials.
    pub fn plain(endpoints: Vec<String>) -> EtcdTarget {
        EtcdTarget {
            endpoints,
            tls: None,
            auth: None,
        }
    }

    /// The client endpoint URLs (`http://` or `https://HOST:PORT`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The etcd user, if it authenticates as one.
    pub fn user(&self) -> Option<&str> {
        self.auth.as_ref().map(|(u, _)| u.as_str())
    }

    /// The client's connect options: timeouts, TLS and credentials.
    pub(crate) fn connect_options(&self) -> etcd_client::ConnectOptions {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(2))
            .with_keep_alive(std::time::Duration::from_secs(2), std::time::Duration::from_secs(2))
            // A member cut off from its quorum keeps streams open but sends
            // no events; with this its answers fail instead, so watches
            // move to a member that has a leader rather than freeze.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &self.auth {
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        opts
    }

    /// Parses an etcd URL (see the module doc), reading the files it names.
    pub fn parse(url: &str) -> Result<EtcdTarget, String> {
        let form = "etcd://HOST:PORT[,HOST:PORT...][?PARAMS] or etcds://...";
        let (scheme, rest) = if let Some(r) = url.strip_prefix("etcd://") {
            ("http", r)
        } else if let Some(r) = url.strip_prefix("etcds://") {
            ("https", r)
        } else {
            return Err(format!("cluster endpoint {:?} must look like {form}", redact(url)));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        let mut endpoints = Vec::new();
        for part in hosts.split(',') {
            let part = part.trim();
            let bad = || format!("cluster endpoint {:?}: {part:?} is not HOST:PORT", redact(url));
            let (host, port) = part.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || host.contains('/') || host.contains('@') || !port.parse::<u16>().is_ok_and(|p| p != 0)
            {
                return Err(bad());
            }
            endpoints.push(format!("{scheme}://{part}"));
        }
        let mut p = Params::default();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("cluster endpoint parameter {kv:?} is not NAME=VALUE"))?;
            if v.is_empty() {
                return Err(format!("cluster endpoint parameter {k:?} is empty"));
            }
            let slot = match k {
                "ca" => &mut p.ca,
                "cert" => &mut p.cert,
                "key" => &mut p.key,
                "user" => &mut p.user,
                "password-file" => &mut p.password_file,
                "password" => {
                    return Err(
                        "cluster endpoint: a password may not be written in the URL; name a file with password-file=PATH"
                            .into(),
                    );
                }
                other => {
                    return Err(format!(
                        "cluster endpoint: unknown parameter {other:?} (known: ca, cert, key, user, password-file)"
                    ));
                }
            };
            if slot.replace(v.to_string()).is_some() {
                return Err(format!("cluster endpoint parameter {k:?} given twice"));
            }
        }
        let tls = if scheme == "https" {
            let ca = p
                .ca
                .ok_or("cluster endpoint: etcds:// needs ca=PATH (the PEM certificates that sign the etcd servers')")?;
            let identity = match (p.cert, p.key) {
                (Some(c), Some(k)) => Some((read("cert", &c)?, read("key", &k)?)),
                (None, None) => None,
                _ => return Err("cluster endpoint: cert=PATH and key=PATH go together".into()),
            };
            Some(Tls {
                ca_pem: read("ca", &ca)?,
                identity,
            })
        } else {
            if p.ca.is_some() || p.cert.is_some() || p.key.is_some() {
                return Err("cluster endpoint: ca, cert and key need TLS: write etcds://".into());
            }
            None
        };
        let auth = match (p.user, p.password_file) {
            (Some(u), Some(f)) => {
                let raw = read("password-file", &f)?;
                let text = String::from_utf8(raw)
                    .map_err(|_| format!("cluster endpoint: password-file {f:?} is not UTF-8"))?;
                let password = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
                if password.is_empty() {
                    return Err(format!("cluster endpoint: password-file {f:?} is empty"));
                }
                Some((u, password))
            }
            (None, None) => None,
            _ => return Err("cluster endpoint: user=NAME and password-file=PATH go together".into()),
        };
        Ok(EtcdTarget { endpoints, tls, auth })
    }
}

#[derive(Default)]
struct Params {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
}

fn read(param: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("cluster endpoint: cannot read {param}={path}: {e}"))
}

/// The URL without its parameters (paths can say more than an error
/// message should).
fn redact(url: &str) -> &str {
    url.split_once('?').map_or(url, |(h, _)| h)
}

impl fmt::Display for EtcdTarget {
    /// The endpoints, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.endpoints.join(","))
    }
}

impl fmt::Debug for EtcdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTarget")
            .field("endpoints", &self.endpoints)
            .field(
                "tls",
                &self.tls.as_ref().map(|t| {
                    if t.identity.is_some() {
                        "client-cert"
                    } else {
                        "server-only"
                    }
                }),
            )
            .field("user", &self.user())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls() {
        let t = EtcdTarget::parse("etcd://127.0.0.1:2379,etcd-b:2379").unwrap();
        assert_eq!(t.endpoints(), ["http://127.0.0.1:2379", "http://etcd-b:2379"]);
        assert!(!t.is_tls() && t.user().is_none());
        assert_eq!(t.to_string(), "http://127.0.0.1:2379,http://etcd-b:2379");
        assert_eq!(
            EtcdTarget::parse("etcd://[::1]:2379/").unwrap().endpoints(),
            ["http://[::1]:2379"]
        );
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,,b:2",
            "etcd://:1",
            "etcd://u@a:1",
            "etcd://a:1?ca",
            "etcd://a:1?ca=",
            "etcd://a:1?bogus=1",
        ] {
            assert!(EtcdTarget::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tls_and_credentials_are_read_and_checked_at_parse() {
        let d = tempfile::tempdir().unwrap();
        let f = |name: &str, body: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            p.display().to_string()
        };
        let (ca, cert, key, pw) = (
            f("ca.pem", "CA"),
            f("c.pem", "C"),
            f("k.pem", "K"),
            f("pw", "s3cret\nrest\n"),
        );
        let t = EtcdTarget::parse(&format!(
            "etcds://e:2379?ca={ca}&cert={cert}&key={key}&user=kv&password-file={pw}"
        ))
        .unwrap();
        assert_eq!(t.endpoints(), ["https://e:2379"]);
        assert!(t.is_tls());
        assert_eq!(t.user(), Some("kv"));
        assert_eq!(t.auth.as_ref().unwrap().1, "s3cret", "the first line");
        let shown = format!("{t:?} {t}");
        assert!(!shown.contains("s3cret") && !shown.contains('K'), "{shown}");

        let err = |url: String| EtcdTarget::parse(&url).unwrap_err();
        assert!(err("etcds://e:1".into()).contains("ca=PATH"));
        assert!(err(format!("etcd://e:1?ca={ca}")).contains("etcds://"));
        assert!(err(format!("etcds://e:1?ca={ca}&cert={cert}")).contains("go together"));
        assert!(err("etcd://e:1?user=kv".into()).contains("go together"));
        assert!(err("etcd://e:1?user=kv&password=x".into()).contains("password-file"));
        assert!(err(format!("etcd://e:1?user=a&user=b&password-file={pw}")).contains("twice"));
        let missing = d.path().join("nope").display().to_string();
        let e = err(format!("etcds://e:1?ca={missing}"));
        assert!(e.contains("ca=") && e.contains("nope"), "{e}");
        let empty = f("empty", "\n");
        assert!(err(format!("etcd://e:1?user=kv&password-file={empty}")).contains("empty"));
    }
}
