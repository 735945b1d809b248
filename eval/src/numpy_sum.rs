//! Floating-point sums in numpy's order, so means agree with `np.mean` / `np.nanmean` to the bit.

/// Below this length numpy adds serially.
const PW_UNROLL: usize = 8;
/// Up to this length numpy adds with eight interleaved accumulators; above it, it splits in two.
const PW_BLOCKSIZE: usize = 128;

/// `np.add.reduce` over a contiguous f64 array: numpy's `pairwise_sum` (loops_utils.h.src).
pub(crate) fn pairwise_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < PW_UNROLL {
        values.iter().fold(0.0, |s, &v| s + v)
    } else if n <= PW_BLOCKSIZE {
        let mut r = [0.0f64; PW_UNROLL];
        r.copy_from_slice(&values[..PW_UNROLL]);
        let blocks_end = n - n % PW_UNROLL;
        for block in values[PW_UNROLL..blocks_end].chunks_exact(PW_UNROLL) {
            for (acc, &v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        values[blocks_end..].iter().fold(head, |s, &v| s + v)
    } else {
        let half = n / 2;
        let split = half - half % PW_UNROLL;
        pairwise_sum(&values[..split]) + pairwise_sum(&values[split..])
    }
}

#[cfg(test)]
mod tests {
    use super::pairwise_sum;

    #[test]
    fn pairwise_order_differs_from_serial_where_numpy_does() {
        // np.sum([1e16] + [1.0] * 16) == 1.0000000000000016e16; a serial sum gives 1e16.
        let mut v = vec![1e16];
        v.extend(std::iter::repeat_n(1.0, 16));
        assert_eq!(pairwise_sum(&v), 1.0000000000000016e16);
        assert_eq!(pairwise_sum(&[]), 0.0);
    }
}
