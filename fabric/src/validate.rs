//! Argument checks shared by the client (fail fast) and the server (never
//! trust the client): tenant and namespace names, keys, batch sizes, and
//! the base URLs settings name (HTTP, gRPC, ZMQ).

use kvfabric_proto::MAX_KEY_BYTES;

/// Checks a plain-HTTP base URL, `http://HOST:PORT` with an optional
/// trailing `/` and nothing else: a host, a port in 1..=65535, no path.
/// (The `http` crate falls back to port 80 for a port it cannot read, so a
/// typo would silently dial the wrong service.) `what` names the setting.
pub fn http_base_url(what: &str, url: &str) -> Result<(), String> {
    let form = || format!("{what} {url:?} must be http://host:port");
    let rest = url.strip_prefix("http://").ok_or_else(form)?;
    host_port(what, url, rest, form)
}

/// Checks a block-service (gRPC) base URL: `http://HOST:PORT` (plain) or
/// `https://HOST:PORT` (TLS, for nodes with `[tls]`), with the host and
/// port rules of [`http_base_url`]. `what` names the setting.
pub fn grpc_base_url(what: &str, url: &str) -> Result<(), String> {
    let form = || format!("{what} {url:?} must be http://host:port or https://host:port");
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(form)?;
    host_port(what, url, rest, form)
}

/// The part of a base URL after its scheme: `HOST:PORT`, optionally `/`.
fn host_port(what: &str, url: &str, rest: &str, form: impl Fn() -> String) -> Result<(), String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(format!("{what} {url:?} must be a base URL without a path"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(&form)?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let bad_host = host.is_empty()
        || host.chars().any(|c| c.is_whitespace() || matches!(c, '@' | '?' | '#'))
        || (host.contains(':') && !bracketed);
    let port_ok =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
    if bad_host || !port_ok {
        return Err(form());
    }
    Ok(())
}

/// Checks a ZMQ TCP endpoint, `tcp://HOST:PORT` (the host and port rules
/// of [`http_base_url`]). `what` names the setting.
pub fn tcp_endpoint(what: &str, endpoint: &str) -> Result<(), String> {
    let ok = endpoint
        .strip_prefix("tcp://")
        .is_some_and(|r| http_base_url(what, &format!("http://{r}")).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {endpoint:?} must be tcp://HOST:PORT"))
    }
}

/// Longest tenant or namespace name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a tenant or namespace name: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Checks one key (1 to 64 bytes); `index` is its position in the request.
pub fn key(index: usize, key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("key {index} is empty; keys are 1 to {MAX_KEY_BYTES} bytes"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key {index} is {} bytes; keys are 1 to {MAX_KEY_BYTES} bytes",
            key.len()
        ));
    }
    Ok(())
}

/// Checks a batch of keys: non-empty, at most `max`, each valid.
pub fn keys<K: AsRef<[u8]>>(keys: &[K], max: usize) -> Result<(), String> {
    if keys.is_empty() {
        return Err("no keys given".into());
    }
    if keys.len() > max {
        return Err(format!("{} keys in one request; the limit is {max}", keys.len()));
    }
    keys.iter().enumerate().try_for_each(|(i, k)| key(i, k.as_ref()))
}

#[cfg(test)]
mod tests {

    #[test]
    fn http_base_urls() {
        for ok in [
            "http://a:1",
            "http://10.0.0.1:8000/",
            "http://[::1]:50051",
            "http://h.example:65535",
        ] {
            http_base_url("u", ok).unwrap();
        }
        for bad in [
            "http://",
            "http://host",
            "http://host:",
            "http://host:0",
            "http://host:500511",
            "http://a b:1",
            "http://h:1/v1",
            "https://h:1",
            "h:1",
            "http://::1:5",
            "http://u@h:1",
        ] {
            assert!(http_base_url("u", bad).is_err(), "{bad}");
        }
        tcp_endpoint("e", "tcp://10.0.0.1:5557").unwrap();
        for bad in ["tcp://", "tcp://h", "http://h:1", "tcp://h:1/x"] {
            assert!(tcp_endpoint("e", bad).unwrap_err().contains("tcp://HOST:PORT"), "{bad}");
        }
    }

    #[test]
    fn grpc_base_urls() {
        for ok in [
            "http://a:1",
            "https://a:1",
            "https://10.0.0.1:50051/",
            "https://[::1]:50051",
            "http://h.example:65535",
        ] {
            grpc_base_url("u", ok).unwrap();
        }
        for bad in [
            "https://",
            "https://host",
            "https://host:",
            "https://host:0",
            "https://host:500511",
            "https://a b:1",
            "https://h:1/v1",
            "https://::1:5",
            "https://u@h:1",
            "grpc://h:1",
            "HTTPS://h:1",
            "h:1",
        ] {
            let e = grpc_base_url("fabric", bad).unwrap_err();
            assert!(e.starts_with(&format!("fabric {bad:?} must be")), "{bad}: {e}");
        }
        assert!(
            grpc_base_url("f", "tcp://h:1")
                .unwrap_err()
                .contains("http://host:port or https://host:port")
        );
        assert!(
            grpc_base_url("f", "https://h:1/x")
                .unwrap_err()
                .contains("without a path")
        );
        // Plain-HTTP settings still refuse https://.
        assert!(http_base_url("u", "https://h:1").is_err());
    }

    use super::*;

    #[test]
    fn names_and_keys() {
        assert!(name("namespace", "a.b-c_1").is_ok());
        assert!(name("namespace", "").unwrap_err().contains("empty"));
        assert!(name("namespace", "a/b").unwrap_err().contains("'/'"));
        assert!(name("namespace", &"x".repeat(129)).unwrap_err().contains("limit"));
        assert!(key(0, &[]).is_err());
        assert!(key(3, &[0; 65]).unwrap_err().contains("key 3 is 65 bytes"));
        assert!(keys::<&[u8]>(&[], 10).is_err());
        assert!(keys(&[[1u8]; 11], 10).unwrap_err().contains("limit is 10"));
    }
}
