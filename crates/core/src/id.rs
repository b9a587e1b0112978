//! Opaque, time-ordered ids: a short prefix naming the entity, then 26 Crockford base32
//! characters (48 bits of milliseconds, 80 random bits). Sorting ids sorts by creation time,
//! which gives list cursors and "newest first" for free. Backends name every resource they
//! create from these ids, never from a name a user can change.

use rand::RngCore;

/// The kinds of entity that carry an id, and the prefix each id starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Target,
    Project,
    Release,
    Environment,
    Operation,
    Token,
    Subject,
    Backup,
}

impl IdKind {
    pub fn prefix(self) -> &'static str {
        match self {
            IdKind::Target => "tgt",
            IdKind::Project => "prj",
            IdKind::Release => "rel",
            IdKind::Environment => "env",
            IdKind::Operation => "op",
            IdKind::Token => "tok",
            IdKind::Subject => "sys",
            IdKind::Backup => "bak",
        }
    }

    /// Whether `id` has the shape of an id of this kind. A malformed id is simply unknown
    /// (404), so this is a cheap filter, not an error source.
    pub fn matches(self, id: &str) -> bool {
        let Some(rest) = id
            .strip_prefix(self.prefix())
            .and_then(|r| r.strip_prefix('_'))
        else {
            return false;
        };
        rest.len() == 26 && rest.bytes().all(|b| CROCKFORD.contains(&b))
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A new id of `kind`, ordered after every id made earlier at `now_ms`, and after every id
/// this process made before within the same millisecond (the random part counts up, as in
/// monotonic ULIDs): operations queued one after another in one millisecond keep their order.
pub fn new_id(kind: IdKind, now_ms: i64) -> String {
    static LAST: std::sync::Mutex<u128> = std::sync::Mutex::new(0);
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    let time: u128 = (now_ms.max(0) as u128 & ((1 << 48) - 1)) << 80;
    let mut value = time;
    for (i, byte) in random.iter().enumerate() {
        value |= (*byte as u128) << (8 * (9 - i));
    }
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if *last >> 80 == time >> 80 && value <= *last {
            // Leaves room: the random part is 80 bits, so it does not run out in a millisecond.
            value = *last + 1;
        }
        if value > *last {
            *last = value;
        }
    }
    let mut out = String::with_capacity(kind.prefix().len() + 27);
    out.push_str(kind.prefix());
    out.push('_');
    for i in (0..26).rev() {
        let digit = ((value >> (5 * i)) & 31) as usize;
        out.push(CROCKFORD[digit] as char);
    }
    out
}

/// A new installation id: 12 random lower-case letters and digits (60 bits). Short, because
/// it names things on the machine (the nftables table, the per-installation directories of
/// builds and of the `local` target, whose PHP-FPM sockets must stay within 107 bytes), and
/// random rather than time-ordered, so installations made in one millisecond (parallel test
/// servers) still differ.
pub fn new_installation_id() -> String {
    let mut random = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut random);
    random
        .iter()
        .map(|b| CROCKFORD[(*b & 31) as usize] as char)
        .collect()
}

/// Whether `id` has the shape [`new_installation_id`] gives.
pub fn is_installation_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| CROCKFORD.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installation_ids_are_short_and_differ() {
        let (a, b) = (new_installation_id(), new_installation_id());
        assert!(is_installation_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_installation_id("ABCDEFGHJKMN"));
        assert!(!is_installation_id("abc"));
    }

    #[test]
    fn ids_have_their_prefix_and_shape() {
        let id = new_id(IdKind::Operation, 1_700_000_000_000);
        assert!(id.starts_with("op_"), "{id}");
        assert!(IdKind::Operation.matches(&id));
        assert!(!IdKind::Target.matches(&id));
        assert!(!IdKind::Operation.matches("op_short"));
        assert!(!IdKind::Operation.matches("op_ABCDEFGHJKMNPQRSTVWXYZ0123"));
    }

    #[test]
    fn ids_made_in_one_millisecond_keep_their_order() {
        // A time later than any other test uses: ids of older times never reset the sequence.
        let ids: Vec<String> = (0..1000)
            .map(|_| new_id(IdKind::Operation, 1 << 46))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids);
    }

    #[test]
    fn later_ids_sort_after_earlier_ones() {
        let a = new_id(IdKind::Project, 1_000);
        let b = new_id(IdKind::Project, 1_001);
        assert!(a < b);
    }
}
