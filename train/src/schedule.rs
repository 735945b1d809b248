//! Learning-rate and weight-decay schedules, as functions of the global step so that a resumed run
//! continues on the same curve.

/// Linear warm-up from `warmup_start_factor`·lr to lr over `warmup_steps`, then cosine decay to
/// `min_lr_factor`·lr at `total_steps` (timm's `CosineLRScheduler` with per-step updates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub warmup_start_factor: f64,
    pub min_lr_factor: f64,
}

impl CosineSchedule {
    pub fn new(base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self {
            base_lr,
            warmup_steps,
            total_steps: total_steps.max(1),
            warmup_start_factor: 0.001,
            min_lr_factor: 0.0,
        }
    }

    /// Learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            return self.base_lr
                * (self.warmup_start_factor + (1.0 - self.warmup_start_factor) * t);
        }
        self.base_lr
            * cosine(
                step - self.warmup_steps,
                self.total_steps.saturating_sub(self.warmup_steps),
                self.min_lr_factor,
            )
    }
}

/// 1 → `floor` along half a cosine over `span` steps.
fn cosine(step: u64, span: u64, floor: f64) -> f64 {
    let t = (step as f64 / span.max(1) as f64).min(1.0);
    floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Weight decay annealed along a cosine from `start` to `end` over the run (the MobileOne paper
/// anneals 1e-4 → 1e-5); constant when both are equal.
pub fn annealed_weight_decay(start: f64, end: f64, step: u64, total_steps: u64) -> f64 {
    end + (start - end) * cosine(step, total_steps, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule::new(0.1, 10, 110);
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!(s.lr(5) > s.lr(1) && s.lr(5) < 0.1);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-9);
        assert!(s.lr(110).abs() < 1e-12);
        assert!((annealed_weight_decay(1e-4, 1e-5, 0, 100) - 1e-4).abs() < 1e-15);
        assert!((annealed_weight_decay(1e-4, 1e-5, 100, 100) - 1e-5).abs() < 1e-15);
    }
}
