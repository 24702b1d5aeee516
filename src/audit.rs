//! The audit log: one entry per call (who, role, centre, method, registry, outcome, time,
//! a count), never an identifier or a clinical value; tamper-evident by a MAC chain.
//!
//! Entry `n` carries `mac_n = HMAC-SHA256(K, "ern-registry audit v1" ‖ mac_{n-1} ‖
//! encode(entry_n))`, with `mac_0` all zeros and `encode` an unambiguous length-prefixed
//! encoding of every field, the sequence number included. `K` is derived from the master
//! secret with HKDF (its own label, so it is unrelated to every pseudonym key). Changing,
//! deleting, inserting or reordering entries breaks the chain at the first entry touched;
//! without the master secret nobody can forge a consistent chain. Deleting entries *at the
//! end* leaves a shorter valid chain: `audit verify` prints the head (sequence and MAC) so
//! that operators can record it elsewhere and compare (see `docs/security.md`).
//!
//! Entries are appended by the writer (`store::writer`), in the transaction of the change
//! they record; a read's entry is committed before the read answers.

use ring::hkdf;
use ring::hmac;

use crate::keys::MasterSecret;

const MAC_LABEL: &[u8] = b"ern-registry audit v1";
const KEY_INFO: &[u8] = b"ern-registry audit log key v1";

/// Most bytes of a text field of an entry (longer values are cut: fields are names and
/// codes the service itself chose, never request text).
pub const MAX_FIELD: usize = 200;

/// What a call did, as audited. Text fields are empty when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Principal id, when the caller authenticated.
    pub principal_id: Option<i64>,
    /// Principal name; for a failed authentication `key:<key id>` when a well-formed key
    /// was presented, else empty.
    pub principal: String,
    pub role: String,
    pub centre: String,
    /// gRPC method, e.g. `CaseService/SubmitCase`.
    pub method: String,
    /// Registry code the call was about, if any.
    pub registry: String,
    /// gRPC status code name, e.g. `OK`, `PERMISSION_DENIED`.
    pub outcome: String,
    /// A count: records written or returned, cells published, items of a bulk call.
    pub items: i64,
}

/// An entry as stored: with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub entry: Entry,
    /// Hex of the chain MAC.
    pub mac: String,
}

/// The key of the chain, derived from the master secret.
pub struct AuditKey(hmac::Key);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl AuditKey {
    pub fn derive(master: &MasterSecret) -> AuditKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ern-registry").extract(master.expose());
        let okm = prk
            .expand(&[KEY_INFO], Len32)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        okm.fill(bytes.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        AuditKey(hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref()))
    }

    /// The MAC of entry `seq` at `at` following `previous` (hex; empty for the first).
    pub fn mac(&self, previous: &str, seq: i64, at: i64, entry: &Entry) -> String {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(MAC_LABEL);
        let prev = decode_hex(previous).unwrap_or_else(|| vec![0u8; 32]);
        ctx.update(&prev);
        for field in encode(seq, at, entry) {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(&field);
        }
        hex(ctx.sign().as_ref())
    }

    /// Whether `mac` is the MAC of the entry. (Verification runs offline over stored
    /// data, so a timing difference tells nobody anything.)
    fn verify(&self, previous: &str, stored: &Stored) -> bool {
        self.mac(previous, stored.seq, stored.at, &stored.entry) == stored.mac
    }
}

fn encode(seq: i64, at: i64, e: &Entry) -> [Vec<u8>; 10] {
    let principal_id = e
        .principal_id
        .map_or_else(Vec::new, |id| id.to_be_bytes().to_vec());
    [
        seq.to_be_bytes().to_vec(),
        at.to_be_bytes().to_vec(),
        principal_id,
        e.principal.as_bytes().to_vec(),
        e.role.as_bytes().to_vec(),
        e.centre.as_bytes().to_vec(),
        e.method.as_bytes().to_vec(),
        e.registry.as_bytes().to_vec(),
        e.outcome.as_bytes().to_vec(),
        e.items.to_be_bytes().to_vec(),
    ]
}

/// The canonical name of a gRPC status code, as recorded in entries.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..32)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Cuts a field to [`MAX_FIELD`] bytes at a character boundary.
pub fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Why the chain is broken, at which entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(
        "entry {seq}: its MAC does not match its content and the entry before it (modified, moved, or an entry before it removed)"
    )]
    Mac { seq: i64 },
    #[error("entry {expected} is missing (the next entry found is {found})")]
    Missing { expected: i64, found: i64 },
    #[error("the head records entry {head} but the log ends at entry {last}")]
    Head { head: i64, last: i64 },
}

/// Walks a chain entry by entry (in sequence order), checking every link.
#[derive(Debug)]
pub struct Verifier<'k> {
    key: &'k AuditKey,
    previous: String,
    next_seq: i64,
    pub checked: u64,
}

impl<'k> Verifier<'k> {
    pub fn new(key: &'k AuditKey) -> Self {
        Verifier {
            key,
            previous: String::new(),
            next_seq: 1,
            checked: 0,
        }
    }

    /// Checks the next stored entry.
    pub fn check(&mut self, stored: &Stored) -> Result<(), Broken> {
        if stored.seq != self.next_seq {
            return Err(Broken::Missing {
                expected: self.next_seq,
                found: stored.seq,
            });
        }
        if !self.key.verify(&self.previous, stored) {
            return Err(Broken::Mac { seq: stored.seq });
        }
        self.previous = stored.mac.clone();
        self.next_seq += 1;
        self.checked += 1;
        Ok(())
    }

    /// Checks the end of the log against the recorded head (sequence, MAC).
    pub fn finish(&self, head_seq: i64, head_mac: &str) -> Result<(), Broken> {
        let last = self.next_seq - 1;
        if head_seq != last || (last > 0 && head_mac != self.previous) {
            return Err(Broken::Head {
                head: head_seq,
                last,
            });
        }
        Ok(())
    }

    /// The MAC of the last entry checked (the head), hex.
    pub fn head_mac(&self) -> &str {
        &self.previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::derive(&MasterSecret::from_bytes([7; 32]))
    }

    fn chain(key: &AuditKey, n: i64) -> Vec<Stored> {
        let mut previous = String::new();
        (1..=n)
            .map(|seq| {
                let entry = Entry {
                    principal_id: Some(seq),
                    principal: format!("p{seq}"),
                    role: "physician".into(),
                    centre: "NL-AMC".into(),
                    method: "CaseService/SubmitCase".into(),
                    registry: "ERN-LUNG".into(),
                    outcome: "OK".into(),
                    items: 1,
                };
                let mac = key.mac(&previous, seq, 1000 + seq, &entry);
                previous = mac.clone();
                Stored {
                    seq,
                    at: 1000 + seq,
                    entry,
                    mac,
                }
            })
            .collect()
    }

    fn verify(key: &AuditKey, entries: &[Stored]) -> Result<(), Broken> {
        let mut v = Verifier::new(key);
        for e in entries {
            v.check(e)?;
        }
        let last = entries
            .last()
            .map_or((0, String::new()), |e| (e.seq, e.mac.clone()));
        v.finish(last.0, &last.1)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let k = key();
        assert_eq!(verify(&k, &chain(&k, 5)), Ok(()));
        assert_eq!(verify(&k, &[]), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_chain_at_that_entry() {
        let k = key();
        let good = chain(&k, 5);
        type Edit = Box<dyn Fn(&mut Stored)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.at += 1),
            Box::new(|e| e.entry.principal_id = None),
            Box::new(|e| e.entry.principal.push('x')),
            Box::new(|e| e.entry.role = "admin".into()),
            Box::new(|e| e.entry.centre.clear()),
            Box::new(|e| e.entry.method = "CaseService/GetCase".into()),
            Box::new(|e| e.entry.registry = "ERN-EYE".into()),
            Box::new(|e| e.entry.outcome = "PERMISSION_DENIED".into()),
            Box::new(|e| e.entry.items += 1),
            Box::new(|e| e.mac.replace_range(0..1, "f")),
        ];
        for edit in &edits {
            let mut bad = good.clone();
            edit(&mut bad[2]);
            if bad[2] == good[2] {
                continue;
            }
            assert_eq!(verify(&k, &bad), Err(Broken::Mac { seq: 3 }));
        }
    }

    #[test]
    fn deletion_and_reordering_are_found() {
        let k = key();
        let good = chain(&k, 5);
        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(
            verify(&k, &deleted),
            Err(Broken::Missing {
                expected: 2,
                found: 3
            })
        );
        // Swapped contents, sequence numbers left in place.
        let mut swapped = good.clone();
        let (a, b) = (swapped[1].clone(), swapped[2].clone());
        swapped[1] = Stored { seq: 2, ..b };
        swapped[2] = Stored { seq: 3, ..a };
        assert_eq!(verify(&k, &swapped), Err(Broken::Mac { seq: 2 }));
        // A truncated tail against the recorded head.
        let mut v = Verifier::new(&k);
        for e in &good[..3] {
            v.check(e).unwrap();
        }
        assert_eq!(
            v.finish(5, &good[4].mac),
            Err(Broken::Head { head: 5, last: 3 })
        );
    }

    #[test]
    fn another_master_secret_cannot_forge_the_chain() {
        let forged = chain(&AuditKey::derive(&MasterSecret::from_bytes([8; 32])), 2);
        assert_eq!(verify(&key(), &forged), Err(Broken::Mac { seq: 1 }));
    }
}
