//! The reference model's byte-level tokenizer: token ids 0 to 255 are the
//! bytes of UTF-8 text, 256 is BOS and 257 is EOS (vocabulary 258).

/// Beginning-of-sequence token id.
pub const BOS_TOKEN: u32 = 256;
/// End-of-sequence token id: generation stops when it is sampled.
pub const EOS_TOKEN: u32 = 257;
/// Vocabulary of the byte tokenizer: 256 bytes plus BOS and EOS.
pub const BYTE_VOCAB_SIZE: usize = 258;

/// Token ids of `text`: its UTF-8 bytes, after a BOS token when `add_bos`.
pub fn encode(text: &str, add_bos: bool) -> Vec<u32> {
    let mut ids = Vec::with_capacity(text.len() + usize::from(add_bos));
    if add_bos {
        ids.push(BOS_TOKEN);
    }
    ids.extend(text.bytes().map(u32::from));
    ids
}

/// Text of `ids`: byte tokens decoded as UTF-8 (invalid sequences become
/// U+FFFD); BOS, EOS and any other id above 255 are skipped.
pub fn decode(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_specials() {
        let text = "héllo, wörld ✓";
        let ids = encode(text, true);
        assert_eq!(ids[0], BOS_TOKEN);
        assert_eq!(ids.len(), text.len() + 1);
        assert_eq!(decode(&ids), text);
        assert_eq!(decode(&[104, 105, EOS_TOKEN, 999]), "hi");
        assert_eq!(decode(&[0xff, 104]), "\u{fffd}h");
        assert!(encode("", false).is_empty());
    }
}
