//! Argument checks shared by the client (fail fast) and the server (never
//! trust the client): tenant and namespace names, keys, batch sizes.

use kvfabric_proto::MAX_KEY_BYTES;

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
