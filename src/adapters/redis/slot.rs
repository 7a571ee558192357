//! The hash slot of a key, as a Redis Cluster computes it: CRC16 (XMODEM)
//! of the key's hash tag (the text between the first `{` and the next `}`,
//! when not empty) or of the whole key, modulo 16384.
//! <https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags>

/// The slot of `key`.
pub fn of(key: &str) -> u16 {
    crc16(tag(key.as_bytes())) % 16384
}

fn tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|b| *b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|b| *b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_gives() {
        // CLUSTER KEYSLOT on Redis 7.0.15.
        assert_eq!(of("foo"), 12182);
        assert_eq!(of("123456789"), 12739);
        assert_eq!(of("{user1000}.following"), of("{user1000}.followers"));
        assert_eq!(of("foo{}{bar}"), of("foo{}{bar}"));
        assert_eq!(of("foo{{bar}}zap"), of("{bar"));
        assert_eq!(of("foo{bar}{zap}"), of("bar"));
    }
}
