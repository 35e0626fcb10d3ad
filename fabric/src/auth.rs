//! Bearer tokens, the client's side: what a client presents to a node that
//! authenticates (`[auth]` in the node's settings), and how it travels.
//!
//! A token is sent on every gRPC call as `authorization: Bearer TOKEN`
//! (marked sensitive, so HTTP/2 header compression never indexes it) and
//! in the local path's hello. The node keeps only SHA-256 digests of the
//! tokens it accepts (`kvfabric::server::auth`). Tokens travel in the
//! clear unless the connection is TLS: on an untrusted network, put the
//! node behind a TLS-terminating proxy or use a private network.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// The gRPC metadata key a token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// Shortest token accepted (characters).
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest token accepted (characters).
pub const MAX_TOKEN_LEN: usize = 512;

/// Environment variable the binaries read a token from (`KVFABRIC_TOKEN`);
/// a `--token-file` (or the setting naming one) wins over it.
pub const TOKEN_ENV: &str = "KVFABRIC_TOKEN";

/// A bearer token: 16 to 512 visible ASCII characters (`!` to `~`).
/// `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// Checks `secret` and wraps it.
    pub fn new(secret: impl Into<String>) -> Result<Token, String> {
        let s: String = secret.into();
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&s.len()) {
            return Err(format!(
                "a token is {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters; this one has {}",
                s.len()
            ));
        }
        if !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err("a token is visible ASCII characters only (no spaces or control characters)".into());
        }
        Ok(Token(s.into()))
    }

    /// Reads a token from a file: its whole content, less surrounding
    /// whitespace (a trailing newline is fine).
    pub fn from_file(path: &Path) -> Result<Token, String> {
        let s = std::fs::read_to_string(path).map_err(|e| format!("reading token file {}: {e}", path.display()))?;
        Token::new(s.trim()).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The token from `file` if one is named, else from `$KVFABRIC_TOKEN`
    /// if set and not empty, else none.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Token>, String> {
        if let Some(f) = file {
            return Token::from_file(f).map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(s) if !s.trim().is_empty() => Token::new(s.trim()).map(Some).map_err(|e| format!("${TOKEN_ENV}: {e}")),
            _ => Ok(None),
        }
    }

    /// [`Token::from_file_or_env`] for a process's setting named
    /// `setting` (the file it names): errors say which source was wrong.
    pub fn from_setting(file: Option<&Path>, setting: &str) -> Result<Option<Token>, String> {
        Token::from_file_or_env(file).map_err(|e| match file {
            Some(_) => format!("{setting}: {e}"),
            None => format!("{e} (the fabric token while {setting} is unset)"),
        })
    }

    /// The secret itself.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The `authorization` header value, marked sensitive.
    pub(crate) fn header(&self) -> AsciiMetadataValue {
        let mut v: AsciiMetadataValue = format!("Bearer {}", self.0)
            .parse()
            .expect("a checked token is a valid header value");
        v.set_sensitive(true);
        v
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The bearer token a request carries: `Ok(None)` without an
/// `authorization` header, an error for one that is not `Bearer TOKEN`.
pub fn bearer(md: &MetadataMap) -> Result<Option<&str>, &'static str> {
    let Some(v) = md.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| "the authorization header is not ASCII")?;
    let Some((scheme, token)) = v.split_once(' ') else {
        return Err("the authorization header is not `Bearer TOKEN`");
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the authorization header is not `Bearer TOKEN`");
    }
    Ok(Some(token.trim()))
}

/// Adds a client's token to every call (tonic interceptor).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Sends `token`, or nothing.
    pub fn new(token: Option<&Token>) -> Bearer {
        Bearer(token.map(Token::header))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("a".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert!(Token::new("has a space in the middle").is_err());
        assert!(Token::new("tab\tin-the-middle-of-it").is_err());
        assert!(Token::new("résumé-résumé-résumé").is_err());
        let t = Token::new("kvf_0123456789abcdef").unwrap();
        assert_eq!(t.secret(), "kvf_0123456789abcdef");
        assert!(!format!("{t:?}").contains("0123"));
    }

    #[test]
    fn token_files_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "kvf_0123456789abcdef\n").unwrap();
        assert_eq!(Token::from_file(&p).unwrap().secret(), "kvf_0123456789abcdef");
        std::fs::write(&p, "\n").unwrap();
        assert!(Token::from_file(&p).unwrap_err().contains(&p.display().to_string()));
        assert!(Token::from_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_interceptor_sets_a_sensitive_bearer_header_that_parses_back() {
        let t = Token::new("kvf_0123456789abcdef").unwrap();
        let r = Bearer::new(Some(&t)).call(tonic::Request::new(())).unwrap();
        let v = r.metadata().get(AUTHORIZATION).unwrap();
        assert!(v.is_sensitive());
        assert_eq!(bearer(r.metadata()).unwrap(), Some("kvf_0123456789abcdef"));
        let r = Bearer::new(None).call(tonic::Request::new(())).unwrap();
        assert_eq!(bearer(r.metadata()).unwrap(), None);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let mut md = MetadataMap::new();
        md.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(bearer(&md).is_err());
        md.insert(AUTHORIZATION, "Bearer".parse().unwrap());
        assert!(bearer(&md).is_err());
        md.insert(AUTHORIZATION, "bearer kvf_0123456789abcdef".parse().unwrap());
        assert_eq!(bearer(&md).unwrap(), Some("kvf_0123456789abcdef"));
    }
}
