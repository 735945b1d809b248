//! Training-mode dropout that can be made reproducible. candle's CPU random generator cannot be seeded,
//! so a trainer that wants the same masks for the same step (`--seed`, exact resume) sets a seed here
//! for the current thread; unseeded, masks come from candle's generator.

use std::cell::Cell;

use candle_core::{Result, Tensor};

thread_local! {
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Seeds (or with `None` unseeds) the dropout masks drawn on this thread. Each mask draw advances the
/// state, so re-seeding before a forward pass reproduces that pass's masks.
pub fn seed_dropout(seed: Option<u64>) {
    SEED.with(|s| s.set(seed));
}

/// splitmix64: a small, well-mixed generator; enough for Bernoulli masks.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Zeroes each element with probability `rate` and scales the others by 1 / (1 - rate).
pub fn dropout(x: &Tensor, rate: f32) -> Result<Tensor> {
    let Some(mut state) = SEED.with(Cell::get) else {
        return candle_nn::ops::dropout(x, rate);
    };
    let keep = 1.0 - rate;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
            if u < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    SEED.with(|s| s.set(Some(state)));
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}
