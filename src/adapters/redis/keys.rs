//! Every key name of the store, in one place.
//!
//! Standalone and sentinel: `{prefix}:msg:{idempotencyKey}`,
//! `{prefix}:hist:{idempotencyKey}`, `{prefix}:pid:{provider}:{id}`,
//! `{prefix}:park:{provider}:{id}` (the braces here only mark the parts;
//! these names never change, so a deployment keeps its records across an
//! upgrade).
//!
//! Cluster: a script may touch only keys of one hash slot, and a key's
//! slot is that of its *hash tag*, the text between its first `{` and the
//! first `}` after it, when not empty
//! (<https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags>).
//! So the keys of one message share a tag, `{prefix}:msg:{<tag>}` and
//! `{prefix}:hist:{<tag>}`, and so do the provider-id and park keys of
//! one provider id, `{prefix}:pid:{<tag>}` and `{prefix}:park:{<tag>}`
//! (tag of `provider:id`). A tag is its text escaped ([`tag`]) so that it
//! holds no `}` and is never empty; the prefix has no braces in cluster
//! mode (the configuration refuses them), so the tag is the first braces
//! of the name. The liveness, recipient and health keys and the
//! `dlr:unpublished` index are single keys, each in a slot of its own,
//! named as elsewhere.

/// The names of one store's keys.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    cluster: bool,
}

/// `text` made a hash tag: `%` → `%25`, `}` → `%7D` (so no `}` ends it
/// early, and two texts never share an escape), and the empty text `%`
/// (no escape is a lone `%`), so the tag is never empty.
pub(super) fn tag(text: &str) -> String {
    if text.is_empty() {
        return "%".to_owned();
    }
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Self {
        Self {
            prefix: prefix.to_owned(),
            cluster,
        }
    }

    pub fn cluster(&self) -> bool {
        self.cluster
    }

    /// A message's hash (the record).
    pub fn msg(&self, key: &str) -> String {
        self.of_message("msg", key)
    }

    /// A message's delivery-report history; same slot as [`Keys::msg`].
    pub fn hist(&self, key: &str) -> String {
        self.of_message("hist", key)
    }

    /// A provider id's idempotency key.
    pub fn pid(&self, provider: &str, provider_message_id: &str) -> String {
        self.of_provider_id("pid", provider, provider_message_id)
    }

    /// Reports parked for a provider id; same slot as [`Keys::pid`].
    pub fn park(&self, provider: &str, provider_message_id: &str) -> String {
        self.of_provider_id("park", provider, provider_message_id)
    }

    /// The keys whose SmsDeliveryReport is not confirmed yet, by when
    /// their final status was set.
    pub fn unpublished(&self) -> String {
        format!("{}:dlr:unpublished", self.prefix)
    }

    /// A recipient's per-recipient-limit record (one key, so a cluster
    /// keeps it in one slot).
    pub fn recipient(&self, recipient: &str) -> String {
        format!("{}:rcpt:{recipient}", self.prefix)
    }

    /// An instance's liveness record.
    pub fn alive(&self, instance: &str) -> String {
        format!("{}:alive:{instance}", self.prefix)
    }

    /// What `/readyz` writes.
    pub fn health(&self) -> String {
        format!("{}:health", self.prefix)
    }

    fn of_message(&self, kind: &str, key: &str) -> String {
        if self.cluster {
            format!("{}:{kind}:{{{}}}", self.prefix, tag(key))
        } else {
            format!("{}:{kind}:{key}", self.prefix)
        }
    }

    fn of_provider_id(&self, kind: &str, provider: &str, id: &str) -> String {
        if self.cluster {
            format!(
                "{}:{kind}:{{{}}}",
                self.prefix,
                tag(&format!("{provider}:{id}"))
            )
        } else {
            format!("{}:{kind}:{provider}:{id}", self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;

    fn slot(key: &str) -> Slot {
        Slot::for_key(key)
    }

    const AWKWARD: [&str; 12] = [
        "k1",
        "}",
        "}{",
        "{",
        "{}",
        "}abc{def}",
        "%",
        "%7D",
        "a}b",
        "{a}",
        "x%25}y{z}",
        "!~}}}{{{%%%",
    ];

    #[test]
    fn a_message_keeps_its_keys_in_one_slot_whatever_its_key() {
        let keys = Keys::new("sms", true);
        for key in AWKWARD {
            assert_eq!(
                slot(&keys.msg(key)),
                slot(&keys.hist(key)),
                "{key}: {} {}",
                keys.msg(key),
                keys.hist(key)
            );
        }
        // Every printable character, alone and around a brace.
        for b in b'!'..=b'~' {
            let c = b as char;
            for key in [format!("{c}"), format!("}}{c}"), format!("{c}}}{{{c}")] {
                assert_eq!(slot(&keys.msg(&key)), slot(&keys.hist(&key)), "{key}");
            }
        }
    }

    #[test]
    fn a_provider_id_keeps_its_keys_in_one_slot() {
        let keys = Keys::new("sms", true);
        for id in AWKWARD.into_iter().chain([""]) {
            for provider in ["fake", "a}b", ""] {
                assert_eq!(
                    slot(&keys.pid(provider, id)),
                    slot(&keys.park(provider, id)),
                    "{provider} {id}"
                );
            }
        }
    }

    #[test]
    fn the_tag_is_the_escaped_text_and_never_empty() {
        assert_eq!(tag("a}b%c{d"), "a%7Db%25c{d");
        assert_eq!(tag(""), "%");
        // Distinct texts, distinct tags (the escape is reversible).
        assert_ne!(tag("}"), tag("%7D"));
        assert_ne!(tag("%"), tag(""));
        let keys = Keys::new("sms", true);
        assert_eq!(keys.msg("}x"), "sms:msg:{%7Dx}");
        assert_eq!(keys.pid("fake", "m-1"), "sms:pid:{fake:m-1}");
        // The tag decides the slot: a message's keys are spread over the
        // slots by their idempotency key, not all in one.
        let slots: std::collections::HashSet<Slot> =
            (0..50).map(|i| slot(&keys.msg(&format!("k{i}")))).collect();
        assert!(slots.len() > 40, "{slots:?}");
    }

    #[test]
    fn standalone_names_are_unchanged() {
        let keys = Keys::new("{sms}", false);
        assert_eq!(keys.msg("a}b"), "{sms}:msg:a}b");
        assert_eq!(keys.hist("k"), "{sms}:hist:k");
        assert_eq!(keys.pid("fake", "m-1"), "{sms}:pid:fake:m-1");
        assert_eq!(keys.park("fake", "m-1"), "{sms}:park:fake:m-1");
        assert_eq!(keys.unpublished(), "{sms}:dlr:unpublished");
        assert_eq!(keys.alive("i1"), "{sms}:alive:i1");
        assert_eq!(keys.recipient("+1"), "{sms}:rcpt:+1");
        assert_eq!(keys.health(), "{sms}:health");
    }

    /// Without the tags, a message's keys fall in different slots, which
    /// a cluster refuses in one script (CROSSSLOT).
    #[test]
    fn untagged_names_would_split_a_message() {
        let keys = Keys::new("sms", false);
        assert_ne!(slot(&keys.msg("k1")), slot(&keys.hist("k1")));
    }
}
