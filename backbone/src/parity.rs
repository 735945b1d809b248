//! The parity measure used across the project's tests and reference tools.
use candle_core::{DType, Result, Tensor};

/// max |actual − reference| / max |reference|, in f32.
pub fn max_relative_error(actual: &Tensor, reference: &Tensor) -> Result<f32> {
    if actual.dims() != reference.dims() {
        candle_core::bail!(
            "shapes differ: {:?} vs reference {:?}",
            actual.dims(),
            reference.dims()
        );
    }
    let max_abs = |t: &Tensor| -> Result<f32> {
        t.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()
    };
    Ok(max_abs(&(actual - reference)?)? / max_abs(reference)?.max(f32::MIN_POSITIVE))
}
