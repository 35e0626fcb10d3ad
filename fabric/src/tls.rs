//! TLS, the client's side: the CA a client verifies `https://` nodes
//! with, and the certificate it presents to nodes that require one
//! (`[tls] client-ca-file` on the node). PEM files, read and checked when
//! loaded, so a wrong path stops a process at start. rustls on aws-lc-rs
//! (tonic's `tls-aws-lc`), already in the tree for etcd and S3; no public
//! roots are trusted: nodes are private infrastructure.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate chain and its private key, PEM.
type Pem = (Arc<[u8]>, Arc<[u8]>);

/// What a client needs to reach `https://` nodes.
#[derive(Clone)]
pub struct ClientTls {
    ca: Arc<[u8]>,
    identity: Option<Pem>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads a PEM file and checks it holds a block of `kind` (`CERTIFICATE`,
/// `PRIVATE KEY`); `what` names the setting in errors.
pub fn read_pem(path: &Path, kind: &str, what: &str) -> Result<Vec<u8>, String> {
    let b = std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&b);
    let found = text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("-----BEGIN ") && l.ends_with("-----") && l.contains(kind)
    });
    if !found {
        return Err(format!("{what} {}: no PEM {kind} block in it", path.display()));
    }
    Ok(b)
}

impl ClientTls {
    /// Trusts the CA in the PEM file `ca` (its certificates sign the
    /// nodes'), and presents `cert` + `key` when both are given.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<ClientTls, String> {
        Self::from_settings(Some(ca), cert, key, ["CA file", "client certificate", "client key"])
            .map(|t| t.expect("a CA was given"))
    }

    /// What a process's settings name: none without a CA; a certificate
    /// and its key go together and need the CA. `names` are the settings'
    /// names (CA, certificate, key), for the messages.
    pub fn from_settings(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        names: [&str; 3],
    ) -> Result<Option<ClientTls>, String> {
        let [ca_name, cert_name, key_name] = names;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read_pem(c, "CERTIFICATE", cert_name)?.into(),
                read_pem(k, "PRIVATE KEY", key_name)?.into(),
            )),
            (None, None) => None,
            _ => return Err(format!("{cert_name} and {key_name} go together: set both or neither")),
        };
        let Some(ca) = ca else {
            return match identity {
                Some(_) => Err(format!(
                    "{cert_name} needs {ca_name}, the CA the nodes are verified with"
                )),
                None => Ok(None),
            };
        };
        Ok(Some(ClientTls {
            ca: read_pem(ca, "CERTIFICATE", ca_name)?.into(),
            identity,
        }))
    }

    /// From PEM bytes already read (`ca`, and a certificate + key).
    pub fn from_pem(ca: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>) -> ClientTls {
        ClientTls {
            ca: ca.into(),
            identity: identity.map(|(c, k)| (c.into(), k.into())),
        }
    }

    /// Whether a certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca[..]));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(&cert[..], &key[..]));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_are_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n").unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nMII\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(!ClientTls::from_files(&ca, None, None).unwrap().has_identity());
        assert!(
            ClientTls::from_files(&ca, Some(&ca), Some(&key))
                .unwrap()
                .has_identity()
        );
        let e = ClientTls::from_files(&key, None, None).unwrap_err();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        let e = ClientTls::from_files(&ca, Some(&ca), None).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = ClientTls::from_files(&dir.path().join("missing"), None, None).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        assert!(!format!("{:?}", ClientTls::from_files(&ca, None, None).unwrap()).contains("MII"));
    }
}
