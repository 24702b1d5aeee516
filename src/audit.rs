//! The audit log: one entry per call (who, role, centre, method, registry, outcome, time,
//! a count), never an identifier or a clinical value; tamper-evident by a MAC chain that
//! also covers the consent history and the erasure tombstones.
//!
//! Entry `n` carries `mac_n = HMAC-SHA256(K, label ‖ mac_{n-1} ‖ encode(entry_n))`, with
//! `mac_0` all zeros and `encode` an unambiguous length-prefixed encoding of every field,
//! the sequence number included. `K` is derived from the master secret with HKDF (its own
//! label, so it is unrelated to every pseudonym key). Changing, deleting, inserting or
//! reordering entries breaks the chain at the first entry touched; without the master
//! secret nobody can forge a consistent chain.
//!
//! **Versions.** Entries written before migration 0009 (`version` 1) are MACed over ten
//! fields under the label `ern-registry audit v1`; entries of this version (2) over twelve
//! under `ern-registry audit v2`: also `target` (what an admin action acted on) and
//! `rows` ([`Covers`]). Changing an entry's version changes the encoding its MAC is checked
//! against, so that is caught like any other edit.
//!
//! **Rows.** Consent events and erasure tombstones are the proof of what a patient
//! allowed and of what was erased, so an entry also covers the rows its write inserted:
//! `rows` lists each one (`c<id>` for a consent event, `e<id>` for a tombstone) with the
//! first 128 bits of the SHA-256 of its canonical encoding ([`row_hash`]), and each row
//! names its entry (`audit_seq`). The verifier recomputes every hash, so an edited,
//! deleted or inserted row is named, with the entry that wrote it. Rows written before
//! rows were audited are *adopted* by one entry (all of them, one digest) at the first
//! append after the upgrade; an adoption anywhere but before the first entry of this
//! version is itself a sign of tampering.
//!
//! **The head** (last sequence number and MAC) is a row the appends lock. The verifier
//! walks every entry, not only those up to the head, and checks the head both ways: an
//! entry after the head, a head past the last entry and a head with another MAC are all
//! named. What the chain cannot show by itself is a tail deleted *with* a head rewound to
//! match: only a head recorded elsewhere ([`Anchor`], `audit head`, `audit verify
//! --expect-head`) shows that (see `docs/security.md`).
//!
//! Entries are appended by the writer (`store::writer`), in the transaction of the change
//! they record; a read's entry is committed before the read answers.

use std::collections::BTreeMap;

use ring::digest;
use ring::hkdf;
use ring::hmac;
use secrecy::ExposeSecret;

use crate::keys::MasterSecret;

const MAC_LABEL_V1: &[u8] = b"ern-registry audit v1";
const MAC_LABEL_V2: &[u8] = b"ern-registry audit v2";
const KEY_INFO: &[u8] = b"ern-registry audit log key v1";
const ROW_LABEL: &[u8] = b"ern-registry audited row v1";

/// The encoding entries are written with now (see the module documentation).
pub const VERSION: i64 = 2;

/// The method of the entry that adopts the rows written before rows were audited.
pub const ADOPTION_METHOD: &str = "AuditLog/AdoptRows";

/// Most bytes of a text field of an entry (longer values are cut: fields are names and
/// codes the service itself chose, never request text). `rows` is not cut.
pub const MAX_FIELD: usize = 200;

/// What a call did, as audited. Text fields are empty when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Principal id, when the caller authenticated.
    pub principal_id: Option<i64>,
    /// Principal name; for a failed authentication `key:<key id>` when a well-formed key
    /// was presented, else empty; `peer:<address>` for a summary of refused calls;
    /// `admin-cli:<OS user>` for the admin command line.
    pub principal: String,
    pub role: String,
    pub centre: String,
    /// gRPC method, e.g. `CaseService/SubmitCase`; `AdminCli/<Action>` for the CLI.
    pub method: String,
    /// Registry code the call was about, if any.
    pub registry: String,
    /// gRPC status code name, e.g. `OK`, `PERMISSION_DENIED`.
    pub outcome: String,
    /// A count: records written or returned, cells published, items of a bulk call.
    pub items: i64,
    /// What an admin action acted on, e.g. `principal dr-x`, `key 0123…`; else empty.
    pub target: String,
    /// The consent events and tombstones the call's write inserted ([`Covers`]); set by
    /// the store when it appends the entry.
    pub rows: String,
}

/// An entry as stored: with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// The encoding its MAC covers: 1 (before migration 0009) or [`VERSION`].
    pub version: i64,
    pub entry: Entry,
    /// Hex of the chain MAC.
    pub mac: String,
}

/// The key of the chain, derived from the master secret.
///
/// A ring key, not a `secrecy` box: ring gives no way to read its bytes back and its
/// `Debug` names only the algorithm; it is not wiped on drop, but lives as long as the
/// process. The bytes it is made from are wiped (`Zeroizing`).
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
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"ern-registry").extract(master.expose_secret());
        let okm = prk
            .expand(&[KEY_INFO], Len32)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        okm.fill(bytes.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        AuditKey(hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref()))
    }

    /// The MAC of entry `seq` at `at` following `previous` (hex; empty for the first), in
    /// the encoding of this version.
    pub fn mac(&self, previous: &str, seq: i64, at: i64, entry: &Entry) -> String {
        self.mac_of(VERSION, previous, seq, at, entry)
            .expect("the current version has an encoding")
    }

    /// The MAC in the encoding of `version`; `None` for a version that never existed.
    fn mac_of(
        &self,
        version: i64,
        previous: &str,
        seq: i64,
        at: i64,
        entry: &Entry,
    ) -> Option<String> {
        let mut ctx = hmac::Context::with_key(&self.0);
        let prev = decode_hex(previous).unwrap_or_else(|| vec![0u8; 32]);
        let mut sign = |label: &[u8], fields: &[Vec<u8>]| {
            ctx.update(label);
            ctx.update(&prev);
            for field in fields {
                ctx.update(&(field.len() as u64).to_be_bytes());
                ctx.update(field);
            }
        };
        match version {
            1 => sign(MAC_LABEL_V1, &encode_v1(seq, at, entry)),
            2 => sign(MAC_LABEL_V2, &encode_v2(seq, at, entry)),
            _ => return None,
        }
        Some(hex(ctx.sign().as_ref()))
    }

    /// Whether `stored.mac` is the MAC of the entry after `previous`, in the encoding of
    /// its version. (Verification runs offline over stored data, so a timing difference
    /// tells nobody anything.)
    pub fn verify(&self, previous: &str, stored: &Stored) -> bool {
        self.mac_of(
            stored.version,
            previous,
            stored.seq,
            stored.at,
            &stored.entry,
        )
        .is_some_and(|mac| mac == stored.mac)
    }
}

fn encode_v1(seq: i64, at: i64, e: &Entry) -> [Vec<u8>; 10] {
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

fn encode_v2(seq: i64, at: i64, e: &Entry) -> [Vec<u8>; 12] {
    let [a, b, c, d, f, g, h, i, j, k] = encode_v1(seq, at, e);
    [
        a,
        b,
        c,
        d,
        f,
        g,
        h,
        i,
        j,
        k,
        e.target.as_bytes().to_vec(),
        e.rows.as_bytes().to_vec(),
    ]
}

/// The tables whose rows entries cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    ConsentEvents,
    Erasures,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::ConsentEvents, Table::Erasures];

    /// The table's name in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            Table::ConsentEvents => "consent_events",
            Table::Erasures => "erasures",
        }
    }

    fn tag(self) -> char {
        match self {
            Table::ConsentEvents => 'c',
            Table::Erasures => 'e',
        }
    }

    fn from_tag(tag: char) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.tag() == tag)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Table::ConsentEvents => "consent event",
            Table::Erasures => "erasure tombstone",
        })
    }
}

/// A column value of an audited row, for its canonical encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    Null,
    Text(&'a str),
}

/// SHA-256 of a row's canonical encoding: a label, the table, then every value in column
/// order (the id first), each tagged with its type and text length-prefixed.
pub fn row_hash(table: Table, values: &[Value<'_>]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(ROW_LABEL);
    ctx.update(&[table.tag() as u8]);
    for value in values {
        match value {
            Value::Int(n) => {
                ctx.update(b"i");
                ctx.update(&n.to_be_bytes());
            }
            Value::Null => ctx.update(b"n"),
            Value::Text(s) => {
                ctx.update(b"t");
                ctx.update(&(s.len() as u64).to_be_bytes());
                ctx.update(s.as_bytes());
            }
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A row an entry covers: the first 128 bits of its [`row_hash`], in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoveredRow {
    pub table: Table,
    pub id: i64,
    pub hash: String,
}

impl CoveredRow {
    pub fn new(table: Table, id: i64, hash: &[u8; 32]) -> CoveredRow {
        CoveredRow {
            table,
            id,
            hash: hex(&hash[..16]),
        }
    }
}

/// What an entry's `rows` field covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Covers {
    /// The rows the entry's write inserted (often none): `c12:<hash> e4:<hash>`.
    Rows(Vec<CoveredRow>),
    /// Every row written before rows were audited, adopted at once: `adopted c=<n> e=<n>
    /// <SHA-256 over their row hashes, consent events then tombstones, each by id>`.
    Adopted {
        consent_events: i64,
        erasures: i64,
        digest: String,
    },
}

impl Covers {
    pub fn format_rows(rows: &[CoveredRow]) -> String {
        rows.iter()
            .map(|r| format!("{}{}:{}", r.table.tag(), r.id, r.hash))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn format_adopted(consent_events: i64, erasures: i64, digest: &[u8]) -> String {
        format!("adopted c={consent_events} e={erasures} {}", hex(digest))
    }

    /// `None` when the text is not one the store writes.
    pub fn parse(text: &str) -> Option<Covers> {
        if let Some(rest) = text.strip_prefix("adopted ") {
            let mut parts = rest.split(' ');
            let consent_events = parts.next()?.strip_prefix("c=")?.parse().ok()?;
            let erasures = parts.next()?.strip_prefix("e=")?.parse().ok()?;
            let digest = parts.next()?.to_string();
            return (parts.next().is_none() && decode_hex(&digest).is_some()).then_some(
                Covers::Adopted {
                    consent_events,
                    erasures,
                    digest,
                },
            );
        }
        text.split(' ')
            .filter(|t| !t.is_empty())
            .map(|token| -> Option<CoveredRow> {
                let mut chars = token.chars();
                let table = Table::from_tag(chars.next()?)?;
                let (id, hash) = chars.as_str().split_once(':')?;
                let valid = hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit());
                if !valid {
                    return None;
                }
                Some(CoveredRow {
                    table,
                    id: id.parse().ok()?,
                    hash: hash.to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .map(Covers::Rows)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// 32 bytes from 64 hex digits; anything else is `None`.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let mut out = vec![0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Cuts a field to [`MAX_FIELD`] bytes at a character boundary.
pub fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// What is wrong with the log, naming the entry (or row) concerned. Every message starts
/// with `entry <seq>:`, `<table row> <id>:` or `the head:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(
        "entry {seq}: its MAC does not match its content and the entry before it (modified, moved, or an entry before it removed)"
    )]
    Mac { seq: i64 },
    #[error("entry {expected}: missing (the next entry found is {found})")]
    Missing { expected: i64, found: i64 },
    #[error(
        "entry {seq}: numbered before entry {expected}, which the chain expects next (inserted or duplicated)"
    )]
    Stray { seq: i64, expected: i64 },
    #[error("entry {seq}: its {column} is not readable as stored (type changed)")]
    Unreadable { seq: i64, column: &'static str },
    #[error(
        "entry {seq}: its time holds a part of a millisecond, which the service never writes (changed outside the service)"
    )]
    PartOfAMillisecond { seq: i64 },
    #[error("the head: {problem}")]
    HeadUnreadable { problem: String },
    #[error(
        "entry {seq}: lies after the head, which records entry {head} (the head was moved back or reset, or the entry was added outside the service)"
    )]
    AfterHead { seq: i64, head: i64 },
    #[error(
        "entry {missing}: missing: the head records entry {head} but the log ends at entry {last} (entries deleted from the end)"
    )]
    HeadAhead { missing: i64, head: i64, last: i64 },
    #[error("entry {seq}: the head's MAC is not this last entry's (the head was rewritten)")]
    HeadMac { seq: i64 },
    #[error(
        "entry {seq}: the anchored head, but the log ends at entry {last} (entries deleted from the end, head and all)"
    )]
    AnchorBeyond { seq: i64, last: i64 },
    #[error(
        "entry {seq}: its MAC is not the anchored one (the log was rewritten with the master secret, or the anchor is not this log's)"
    )]
    AnchorMac { seq: i64 },
    #[error("{table} {id}: changed since entry {seq} recorded it")]
    RowChanged { table: Table, id: i64, seq: i64 },
    #[error(
        "{table} {id}: written with entry {seq} but missing (deleted, or its id or entry changed)"
    )]
    RowMissing { table: Table, id: i64, seq: i64 },
    #[error(
        "{table} {id}: refers to entry {seq}, which did not write it (inserted outside the service, or moved)"
    )]
    RowForeign { table: Table, id: i64, seq: i64 },
    #[error("{table} {id}: covered by no entry (inserted outside the service)")]
    RowUncovered { table: Table, id: i64 },
    #[error(
        "{row}: filed under a patient number that is not its pseudonym's (its number or the patient keys were changed)"
    )]
    RowMisfiled {
        /// The row, as "consent event 7", "case 5", "decision in force of consent event
        /// 7" or "research row of case 5".
        row: String,
    },
    #[error(
        "patient keys: a pseudonym of registry {registry_id} has {count} numbers (the keys' unique constraint was removed)"
    )]
    KeyDuplicated { registry_id: i64, count: i64 },
    #[error("{table} {id}: its {column} is not readable as stored (type changed)")]
    RowUnreadable {
        table: Table,
        id: i64,
        column: &'static str,
    },
    #[error(
        "entry {seq}: the rows it adopted (written before rows were audited) were changed, deleted or added to"
    )]
    AdoptedChanged { seq: i64 },
    #[error(
        "entry {seq}: adopts unaudited rows after entries of this version were written (rows were inserted outside the service and the head's flag reset)"
    )]
    LateAdoption { seq: i64 },
    #[error("entry {seq}: its list of rows is not one the service writes")]
    RowsField { seq: i64 },
    #[error(
        "entry {seq}: a version-1 entry (its MAC covers neither target nor rows) names a target or rows (written outside the service)"
    )]
    UnsignedFields { seq: i64 },
}

/// The head row: the last sequence number and its MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub mac: String,
}

/// A head recorded outside the database (`ID:MAC`), to check a later log against: the
/// entry must still be there, with that MAC. `0:` followed by 64 zeros is the empty log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    pub mac: String,
}

impl Anchor {
    /// The MAC printed for an empty log (the chain's `mac_0`).
    pub const GENESIS_MAC: &'static str =
        "0000000000000000000000000000000000000000000000000000000000000000";
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.mac)
    }
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(s: &str) -> Result<Anchor, String> {
        let bad = || format!("{s:?} is not a head: expected ID:MAC (as `audit head` prints it)");
        let (seq, mac) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let mac = mac.to_ascii_lowercase();
        if seq < 0 || decode_hex(&mac).is_none() {
            return Err(bad());
        }
        Ok(Anchor { seq, mac })
    }
}

/// Walks a chain entry by entry (in sequence order), checking every link, then its end
/// against the head and, if given, an anchor.
#[derive(Debug)]
pub struct Verifier<'k> {
    key: &'k AuditKey,
    previous: String,
    next_seq: i64,
    pub checked: u64,
    /// Whether an entry of this version was seen (then no adoption may follow).
    current_seen: bool,
    anchor: Option<Anchor>,
    anchor_found: Option<String>,
}

impl<'k> Verifier<'k> {
    pub fn new(key: &'k AuditKey) -> Self {
        Verifier {
            key,
            previous: String::new(),
            next_seq: 1,
            checked: 0,
            current_seen: false,
            anchor: None,
            anchor_found: None,
        }
    }

    /// Also requires `anchor` to be an entry of the chain.
    pub fn with_anchor(mut self, anchor: Option<Anchor>) -> Self {
        self.anchor = anchor;
        self
    }

    /// The sequence number the next entry must have.
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// Whether an entry of this version has been checked (legacy rows must have been
    /// adopted by then).
    pub fn current_seen(&self) -> bool {
        self.current_seen
    }

    /// Checks the next stored entry.
    pub fn check(&mut self, stored: &Stored) -> Result<(), Broken> {
        if stored.seq < self.next_seq {
            return Err(Broken::Stray {
                seq: stored.seq,
                expected: self.next_seq,
            });
        }
        if stored.seq > self.next_seq {
            return Err(Broken::Missing {
                expected: self.next_seq,
                found: stored.seq,
            });
        }
        if !self.key.verify(&self.previous, stored) {
            return Err(Broken::Mac { seq: stored.seq });
        }
        // A version-1 MAC covers neither the target nor the rows: the service never wrote
        // them with that version, so values there were put in by hand, and the rows they
        // would vouch for are not vouched for by any MAC.
        if stored.version == 1 && !(stored.entry.target.is_empty() && stored.entry.rows.is_empty())
        {
            return Err(Broken::UnsignedFields { seq: stored.seq });
        }
        if matches!(
            Covers::parse(&stored.entry.rows),
            Some(Covers::Adopted { .. })
        ) && self.current_seen
        {
            return Err(Broken::LateAdoption { seq: stored.seq });
        }
        if stored.version >= VERSION {
            self.current_seen = true;
        }
        if self.anchor.as_ref().is_some_and(|a| a.seq == stored.seq) {
            self.anchor_found = Some(stored.mac.clone());
        }
        self.previous = stored.mac.clone();
        self.next_seq += 1;
        self.checked += 1;
        Ok(())
    }

    /// Checks the end of the log against the head, both ways, and the anchor.
    pub fn finish(&self, head: &Head) -> Result<(), Broken> {
        let last = self.next_seq - 1;
        if head.seq < last {
            return Err(Broken::AfterHead {
                seq: head.seq.max(0) + 1,
                head: head.seq,
            });
        }
        if head.seq > last {
            return Err(Broken::HeadAhead {
                missing: last + 1,
                head: head.seq,
                last,
            });
        }
        if last > 0 && head.mac != self.previous {
            return Err(Broken::HeadMac { seq: last });
        }
        if let Some(anchor) = &self.anchor {
            if anchor.seq > last {
                return Err(Broken::AnchorBeyond {
                    seq: anchor.seq,
                    last,
                });
            }
            let found = match anchor.seq {
                0 => Some(Anchor::GENESIS_MAC),
                _ => self.anchor_found.as_deref(),
            };
            if found != Some(anchor.mac.as_str()) {
                return Err(Broken::AnchorMac { seq: anchor.seq });
            }
        }
        Ok(())
    }

    /// The MAC of the last entry checked (the head), hex; empty for an empty log.
    pub fn head_mac(&self) -> &str {
        &self.previous
    }
}

/// What the entries of a stretch of the chain say they wrote, checked against the rows
/// that name them. Fed the rows table by table, each in (entry, id) order.
#[derive(Default)]
pub struct RowCheck {
    expected: BTreeMap<i64, Expected>,
}

enum Expected {
    /// Hash of each row, and whether it was found.
    Rows(BTreeMap<(Table, i64), (String, bool)>),
    /// The entry's `rows` text, and the digest of the rows found.
    Adopted {
        want: String,
        got: Box<AdoptionDigest>,
    },
}

impl RowCheck {
    /// Notes what a (verified) entry covers.
    pub fn expect(&mut self, stored: &Stored) -> Result<(), Broken> {
        let covers =
            Covers::parse(&stored.entry.rows).ok_or(Broken::RowsField { seq: stored.seq })?;
        let expected = match covers {
            Covers::Rows(rows) => Expected::Rows(
                rows.into_iter()
                    .map(|r| ((r.table, r.id), (r.hash, false)))
                    .collect(),
            ),
            Covers::Adopted { .. } => Expected::Adopted {
                want: stored.entry.rows.clone(),
                got: Box::default(),
            },
        };
        self.expected.insert(stored.seq, expected);
        Ok(())
    }

    /// A row of `table` that names entry `seq`, with its [`row_hash`]. `seq` must be an
    /// entry passed to [`RowCheck::expect`].
    pub fn row(&mut self, table: Table, seq: i64, id: i64, hash: &[u8; 32]) -> Result<(), Broken> {
        match self.expected.get_mut(&seq) {
            None => Err(Broken::RowForeign { table, id, seq }),
            Some(Expected::Rows(rows)) => match rows.get_mut(&(table, id)) {
                None => Err(Broken::RowForeign { table, id, seq }),
                Some((want, seen)) => {
                    if *want != hex(&hash[..16]) {
                        return Err(Broken::RowChanged { table, id, seq });
                    }
                    *seen = true;
                    Ok(())
                }
            },
            Some(Expected::Adopted { got, .. }) => {
                got.add(table, hash);
                Ok(())
            }
        }
    }

    /// After every row: rows an entry wrote that were not found, and adoptions whose rows
    /// differ.
    pub fn finish(self) -> Result<(), Broken> {
        for (seq, expected) in self.expected {
            match expected {
                Expected::Rows(rows) => {
                    if let Some(((table, id), _)) = rows.into_iter().find(|(_, (_, seen))| !seen) {
                        return Err(Broken::RowMissing { table, id, seq });
                    }
                }
                Expected::Adopted { want, got } => {
                    if got.finish() != want {
                        return Err(Broken::AdoptedChanged { seq });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The digest an adoption entry records, over the row hashes in the order
/// [`RowCheck::row`] receives them.
pub struct AdoptionDigest {
    counts: (i64, i64),
    digest: digest::Context,
}

impl Default for AdoptionDigest {
    fn default() -> Self {
        AdoptionDigest {
            counts: (0, 0),
            digest: digest::Context::new(&digest::SHA256),
        }
    }
}

impl AdoptionDigest {
    pub fn add(&mut self, table: Table, hash: &[u8; 32]) {
        match table {
            Table::ConsentEvents => self.counts.0 += 1,
            Table::Erasures => self.counts.1 += 1,
        }
        self.digest.update(hash);
    }

    /// Rows added.
    pub fn rows(&self) -> i64 {
        self.counts.0 + self.counts.1
    }

    /// The `rows` field of the adoption entry.
    pub fn finish(self) -> String {
        Covers::format_adopted(self.counts.0, self.counts.1, self.digest.finish().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::derive(&MasterSecret::from_bytes([7; 32]))
    }

    fn entry(seq: i64) -> Entry {
        Entry {
            principal_id: Some(seq),
            principal: format!("p{seq}"),
            role: "physician".into(),
            centre: "NL-AMC".into(),
            method: "CaseService/SubmitCase".into(),
            registry: "ERN-LUNG".into(),
            outcome: "OK".into(),
            items: 1,
            ..Entry::default()
        }
    }

    /// A chain of `versions.len()` entries, entry `i + 1` of version `versions[i]`.
    fn chain_of(key: &AuditKey, versions: &[i64]) -> Vec<Stored> {
        let mut previous = String::new();
        versions
            .iter()
            .enumerate()
            .map(|(i, &version)| {
                let seq = i as i64 + 1;
                let entry = entry(seq);
                let mac = key
                    .mac_of(version, &previous, seq, 1000 + seq, &entry)
                    .unwrap();
                previous = mac.clone();
                Stored {
                    seq,
                    at: 1000 + seq,
                    version,
                    entry,
                    mac,
                }
            })
            .collect()
    }

    fn chain(key: &AuditKey, n: i64) -> Vec<Stored> {
        chain_of(key, &vec![VERSION; n as usize])
    }

    fn head_of(entries: &[Stored]) -> Head {
        entries.last().map_or(
            Head {
                seq: 0,
                mac: String::new(),
            },
            |e| Head {
                seq: e.seq,
                mac: e.mac.clone(),
            },
        )
    }

    fn verify_with(
        key: &AuditKey,
        entries: &[Stored],
        head: &Head,
        anchor: Option<Anchor>,
    ) -> Result<(), Broken> {
        let mut v = Verifier::new(key).with_anchor(anchor);
        for e in entries {
            v.check(e)?;
        }
        v.finish(head)
    }

    fn verify(key: &AuditKey, entries: &[Stored]) -> Result<(), Broken> {
        verify_with(key, entries, &head_of(entries), None)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let k = key();
        assert_eq!(verify(&k, &chain(&k, 5)), Ok(()));
        assert_eq!(verify(&k, &[]), Ok(()));
        // Entries of an earlier version followed by entries of this one.
        assert_eq!(verify(&k, &chain_of(&k, &[1, 1, 2, 2])), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_chain_at_that_entry() {
        let k = key();
        let good = chain(&k, 5);
        type Edit = Box<dyn Fn(&mut Stored)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.at += 1),
            Box::new(|e| e.version = 1),
            Box::new(|e| e.version = 3),
            Box::new(|e| e.entry.principal_id = None),
            Box::new(|e| e.entry.principal.push('x')),
            Box::new(|e| e.entry.role = "admin".into()),
            Box::new(|e| e.entry.centre.clear()),
            Box::new(|e| e.entry.method = "CaseService/GetCase".into()),
            Box::new(|e| e.entry.registry = "ERN-EYE".into()),
            Box::new(|e| e.entry.outcome = "PERMISSION_DENIED".into()),
            Box::new(|e| e.entry.items += 1),
            Box::new(|e| e.entry.target = "key 0".into()),
            Box::new(|e| e.entry.rows = "c1:00000000000000000000000000000000".into()),
            Box::new(|e| e.mac.replace_range(0..1, "f")),
        ];
        for edit in &edits {
            let mut bad = good.clone();
            edit(&mut bad[2]);
            if bad[2] == good[2] {
                continue;
            }
            assert_eq!(
                verify(&k, &bad),
                Err(Broken::Mac { seq: 3 }),
                "{:?}",
                bad[2]
            );
        }
        // A legacy entry claimed to be of this version, and the other way round.
        let mut legacy = chain_of(&k, &[1, 1, 2]);
        legacy[1].version = 2;
        assert_eq!(verify(&k, &legacy), Err(Broken::Mac { seq: 2 }));
    }

    /// A version-1 MAC does not cover `target` and `rows`: an entry of that version that
    /// names either was edited outside the service (for example to vouch for a consent
    /// event inserted by hand), and is refused although its MAC still holds.
    #[test]
    fn a_version_1_entry_naming_a_target_or_rows_is_refused() {
        let k = key();
        type Edit = Box<dyn Fn(&mut Stored)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.entry.target = "key 0".into()),
            Box::new(|e| e.entry.rows = "c1:00000000000000000000000000000000".into()),
            Box::new(|e| e.entry.rows = "adopted c=1 e=0 00".into()),
        ];
        for edit in &edits {
            let mut legacy = chain_of(&k, &[1, 1, 2]);
            edit(&mut legacy[1]);
            assert!(k.verify(&legacy[0].mac, &legacy[1]), "the MAC still holds");
            assert_eq!(
                verify(&k, &legacy),
                Err(Broken::UnsignedFields { seq: 2 }),
                "{:?}",
                legacy[1].entry
            );
        }
        assert_eq!(verify(&k, &chain_of(&k, &[1, 1, 2])), Ok(()));
    }

    #[test]
    fn deletion_insertion_and_reordering_are_found() {
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
        // A row numbered before the first.
        let mut stray = good.clone();
        stray.insert(
            0,
            Stored {
                seq: 0,
                ..good[0].clone()
            },
        );
        assert_eq!(
            verify(&k, &stray),
            Err(Broken::Stray {
                seq: 0,
                expected: 1
            })
        );
    }

    #[test]
    fn the_head_is_checked_both_ways() {
        let k = key();
        let good = chain(&k, 5);
        let at = |seq: i64| Head {
            seq,
            mac: if seq == 0 {
                String::new()
            } else {
                good[seq as usize - 1].mac.clone()
            },
        };
        // Moved back, or reset: the first entry after it is named.
        assert_eq!(
            verify_with(&k, &good, &at(3), None),
            Err(Broken::AfterHead { seq: 4, head: 3 })
        );
        assert_eq!(
            verify_with(&k, &good, &at(0), None),
            Err(Broken::AfterHead { seq: 1, head: 0 })
        );
        // Ahead of the log: the first missing entry is named.
        assert_eq!(
            verify_with(&k, &good[..3], &at(5), None),
            Err(Broken::HeadAhead {
                missing: 4,
                head: 5,
                last: 3
            })
        );
        // The right number with another MAC.
        let wrong = Head {
            seq: 5,
            mac: good[3].mac.clone(),
        };
        assert_eq!(
            verify_with(&k, &good, &wrong, None),
            Err(Broken::HeadMac { seq: 5 })
        );
    }

    #[test]
    fn an_anchor_finds_a_truncated_or_rewritten_log() {
        let k = key();
        let good = chain(&k, 5);
        let anchor = |seq: usize| Anchor {
            seq: seq as i64,
            mac: good[seq - 1].mac.clone(),
        };
        assert_eq!(
            verify_with(&k, &good, &head_of(&good), Some(anchor(5))),
            Ok(())
        );
        assert_eq!(
            verify_with(&k, &good, &head_of(&good), Some(anchor(3))),
            Ok(())
        );
        let genesis: Anchor = format!("0:{}", Anchor::GENESIS_MAC).parse().unwrap();
        assert_eq!(
            verify_with(&k, &good, &head_of(&good), Some(genesis)),
            Ok(())
        );
        // Truncated to 3 entries, head and all: only the anchor shows it.
        let short = &good[..3];
        assert_eq!(verify(&k, short), Ok(()));
        assert_eq!(
            verify_with(&k, short, &head_of(short), Some(anchor(5))),
            Err(Broken::AnchorBeyond { seq: 5, last: 3 })
        );
        // Rewritten from entry 2 on (as only the master secret allows): another MAC.
        let other = chain_of(&k, &[2, 1, 2, 2, 2]);
        assert_eq!(
            verify_with(&k, &other, &head_of(&other), Some(anchor(4))),
            Err(Broken::AnchorMac { seq: 4 })
        );
        // Parsing: what `audit head` prints, and nothing else.
        let printed = anchor(5).to_string();
        assert_eq!(printed.parse::<Anchor>(), Ok(anchor(5)));
        for bad in [
            "",
            "5",
            "five:00",
            "5:abc",
            "-1:00",
            &format!("5:{}x", &good[4].mac),
        ] {
            assert!(bad.parse::<Anchor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn another_master_secret_cannot_forge_the_chain() {
        let forged = chain(&AuditKey::derive(&MasterSecret::from_bytes([8; 32])), 2);
        assert_eq!(verify(&key(), &forged), Err(Broken::Mac { seq: 1 }));
    }

    fn hash(id: i64, text: &str) -> [u8; 32] {
        row_hash(
            Table::ConsentEvents,
            &[Value::Int(id), Value::Text(text), Value::Null],
        )
    }

    fn covering(seq: i64, rows: &[CoveredRow]) -> Stored {
        Stored {
            seq,
            at: 0,
            version: VERSION,
            entry: Entry {
                rows: Covers::format_rows(rows),
                ..Entry::default()
            },
            mac: String::new(),
        }
    }

    #[test]
    fn rows_are_encoded_without_ambiguity() {
        assert_ne!(hash(1, "a"), hash(1, "b"));
        let text_five = row_hash(Table::ConsentEvents, &[Value::Text("5")]);
        let int_five = row_hash(Table::ConsentEvents, &[Value::Int(5)]);
        assert_ne!(text_five, int_five);
        assert_ne!(
            row_hash(Table::ConsentEvents, &[Value::Int(1)]),
            row_hash(Table::Erasures, &[Value::Int(1)])
        );
        assert_ne!(
            row_hash(Table::ConsentEvents, &[Value::Text("ab"), Value::Text("")]),
            row_hash(Table::ConsentEvents, &[Value::Text("a"), Value::Text("b")])
        );
        let rows = vec![
            CoveredRow::new(Table::ConsentEvents, 12, &hash(12, "x")),
            CoveredRow::new(Table::Erasures, 4, &hash(4, "y")),
        ];
        let text = Covers::format_rows(&rows);
        assert_eq!(Covers::parse(&text), Some(Covers::Rows(rows)));
        assert_eq!(Covers::parse(""), Some(Covers::Rows(vec![])));
        let adopted = Covers::format_adopted(3, 1, &[9; 32]);
        assert!(matches!(
            Covers::parse(&adopted),
            Some(Covers::Adopted {
                consent_events: 3,
                erasures: 1,
                ..
            })
        ));
        for bad in [
            "x1:00",
            "c1",
            "cX:00000000000000000000000000000000",
            "adopted c=1",
        ] {
            assert_eq!(Covers::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_row_change_is_named() {
        let rows = [
            CoveredRow::new(Table::ConsentEvents, 12, &hash(12, "granted")),
            CoveredRow::new(Table::ConsentEvents, 13, &hash(13, "granted")),
        ];
        let check = |feed: &[(i64, i64, [u8; 32])]| {
            let mut c = RowCheck::default();
            c.expect(&covering(7, &rows))?;
            c.expect(&covering(8, &[]))?;
            for (seq, id, h) in feed {
                c.row(Table::ConsentEvents, *seq, *id, h)?;
            }
            c.finish()
        };
        let intact = [(7, 12, hash(12, "granted")), (7, 13, hash(13, "granted"))];
        assert_eq!(check(&intact), Ok(()));
        let ce = Table::ConsentEvents;
        assert_eq!(
            check(&[(7, 12, hash(12, "withdrawn")), intact[1]]),
            Err(Broken::RowChanged {
                table: ce,
                id: 12,
                seq: 7
            })
        );
        assert_eq!(
            check(&intact[..1]),
            Err(Broken::RowMissing {
                table: ce,
                id: 13,
                seq: 7
            })
        );
        assert_eq!(
            check(&[intact[0], intact[1], (7, 14, hash(14, "granted"))]),
            Err(Broken::RowForeign {
                table: ce,
                id: 14,
                seq: 7
            })
        );
        assert_eq!(
            check(&[intact[0], intact[1], (8, 15, hash(15, "granted"))]),
            Err(Broken::RowForeign {
                table: ce,
                id: 15,
                seq: 8
            })
        );
    }

    #[test]
    fn adopted_rows_are_checked_as_a_whole() {
        let rows = [hash(1, "a"), hash(2, "b")];
        let mut adoption = AdoptionDigest::default();
        for h in &rows {
            adoption.add(Table::ConsentEvents, h);
        }
        let entry = Stored {
            seq: 1,
            at: 0,
            version: VERSION,
            entry: Entry {
                rows: adoption.finish(),
                ..Entry::default()
            },
            mac: String::new(),
        };
        let check = |feed: &[[u8; 32]]| {
            let mut c = RowCheck::default();
            c.expect(&entry)?;
            for (i, h) in feed.iter().enumerate() {
                c.row(Table::ConsentEvents, 1, i as i64 + 1, h)?;
            }
            c.finish()
        };
        assert_eq!(check(&rows), Ok(()));
        assert_eq!(check(&rows[..1]), Err(Broken::AdoptedChanged { seq: 1 }));
        assert_eq!(
            check(&[rows[0], hash(2, "c")]),
            Err(Broken::AdoptedChanged { seq: 1 })
        );
    }

    #[test]
    fn an_adoption_after_entries_of_this_version_is_refused() {
        let k = key();
        let adopt = |versions: &[i64], at: usize| {
            let mut previous = String::new();
            let mut out = Vec::new();
            for (i, &version) in versions.iter().enumerate() {
                let seq = i as i64 + 1;
                let mut e = entry(seq);
                if i == at {
                    e.rows = Covers::format_adopted(1, 0, &[0; 32]);
                }
                let mac = k.mac_of(version, &previous, seq, 0, &e).unwrap();
                previous = mac.clone();
                out.push(Stored {
                    seq,
                    at: 0,
                    version,
                    entry: e,
                    mac,
                });
            }
            verify(&k, &out)
        };
        assert_eq!(adopt(&[1, 1, 2, 2], 2), Ok(()));
        assert_eq!(adopt(&[2, 2, 2], 0), Ok(()));
        assert_eq!(adopt(&[1, 2, 2], 2), Err(Broken::LateAdoption { seq: 3 }));
    }
}
