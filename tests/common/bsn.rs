//! Valid Dutch BSNs for tests and benchmarks of the real `NL` path, shared by the
//! integration tests and the submission bench. Test data only: synthetic patients (`demo`)
//! use the synthetic issuer instead (`ern_registry::synthetic::identifier`).

/// A valid BSN for `seed`: the first 8-digit prefix from `10,000,000 + 10 · seed` on that
/// has a check digit, and that digit. Each seed owns ten prefixes, at most one without
/// a check digit, so distinct seeds below 9,000,000 give distinct BSNs.
pub fn bsn(seed: u32) -> String {
    let first = 10_000_000 + (seed % 9_000_000) * 10;
    (first..first + 10)
        .flat_map(|prefix| (0..10).map(move |check| format!("{prefix}{check}")))
        .find_map(|digits| ern_registry::pseudonym::check_bsn(&digits))
        .expect("one of ten prefixes has a check digit")
}
