//! Pseudo-random count tables of rare-disease shapes, shared by the suppression tests
//! and the suppression bench.

/// Pseudo-random counts: weights (out of 100) of 0, 1..=4, 5..=40 and 41..=2000.
pub fn generated_cells(n: usize, [w0, w1, w2, _]: [u64; 4], seed: u64) -> Vec<u64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let r = next() % 100;
            let x = next();
            if r < w0 {
                0
            } else if r < w0 + w1 {
                1 + x % 4
            } else if r < w0 + w1 + w2 {
                5 + x % 36
            } else {
                41 + x % 1960
            }
        })
        .collect()
}
