//! COCO run-length encoded masks, ported from pycocotools' `maskApi.c` so that areas, polygon
//! rasterisation and the compressed string format are bit-identical to pycocotools.
//!
//! Runs are column-major (pixel index `x * height + y`) and alternate background/foreground,
//! starting with background.

/// A binary mask of `height` x `width` pixels stored as alternating run lengths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rle {
    pub height: u32,
    pub width: u32,
    pub counts: Vec<u32>,
}

impl Rle {
    /// Encodes a row-major 0/1 (or 0/non-zero) mask.
    pub fn from_mask(mask: &[u8], width: u32, height: u32) -> Self {
        let (w, h) = (width as usize, height as usize);
        assert_eq!(mask.len(), w * h, "mask buffer does not match its size");
        let mut counts = Vec::new();
        let mut current = false;
        let mut run = 0u32;
        for x in 0..w {
            for y in 0..h {
                let on = mask[y * w + x] != 0;
                if on != current {
                    counts.push(run);
                    run = 0;
                    current = on;
                }
                run += 1;
            }
        }
        counts.push(run);
        Self {
            height,
            width,
            counts,
        }
    }

    /// Decodes to a row-major mask of 0/1 bytes.
    pub fn to_mask(&self) -> Vec<u8> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut mask = vec![0u8; w * h];
        let mut index = 0usize;
        for (i, &count) in self.counts.iter().enumerate() {
            let end = (index + count as usize).min(w * h);
            if i % 2 == 1 {
                for column_major in index..end {
                    let (x, y) = (column_major / h, column_major % h);
                    mask[y * w + x] = 1;
                }
            }
            index = end;
        }
        mask
    }

    /// Number of foreground pixels (pycocotools `area`).
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// Tight box `[x, y, w, h]` of the foreground (pycocotools `toBbox`); zeros when empty.
    pub fn bbox(&self) -> [f64; 4] {
        let h = self.height as u64;
        let (mut xs, mut ys, mut xe, mut ye) = (u64::MAX, u64::MAX, 0u64, 0u64);
        let mut index = 0u64;
        let mut any = false;
        for (i, &count) in self.counts.iter().enumerate() {
            if i % 2 == 1 && count > 0 {
                let (start, end) = (index, index + count as u64 - 1);
                let (x0, y0) = (start / h, start % h);
                let (x1, y1) = (end / h, end % h);
                xs = xs.min(x0);
                xe = xe.max(x1);
                // A run that wraps to the next column covers the whole column height.
                if x1 > x0 {
                    ys = 0;
                    ye = h - 1;
                } else {
                    ys = ys.min(y0);
                    ye = ye.max(y1);
                }
                any = true;
            }
            index += count as u64;
        }
        if !any {
            return [0.0; 4];
        }
        [
            xs as f64,
            ys as f64,
            (xe - xs + 1) as f64,
            (ye - ys + 1) as f64,
        ]
    }

    /// Rasterises one polygon `[x0, y0, x1, y1, ...]` exactly as pycocotools' `rleFrPoly`.
    pub fn from_polygon(xy: &[f64], height: u32, width: u32) -> Self {
        let k = xy.len() / 2;
        let (h, w) = (height as i64, width as i64);
        let scale = 5.0f64;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i64).collect();
        let mut y: Vec<i64> = (0..k)
            .map(|j| (scale * xy[2 * j + 1] + 0.5) as i64)
            .collect();
        if k == 0 {
            return Self {
                height,
                width,
                counts: vec![(h * w) as u32],
            };
        }
        x.push(x[0]);
        y.push(y[0]);
        // Dense points along the upsampled boundary.
        let (mut u, mut v) = (Vec::new(), Vec::new());
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            if dx >= dy {
                let s = if dx == 0 {
                    0.0
                } else {
                    (ye - ys) as f64 / dx as f64
                };
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push((ys as f64 + s * t as f64 + 0.5) as i64);
                }
            } else {
                let s = (xe - xs) as f64 / dy as f64;
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push((xs as f64 + s * t as f64 + 0.5) as i64);
                }
            }
        }
        // Points on the y-boundary, downsampled.
        let mut boundary: Vec<u64> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
            let xd = (xd + 0.5) / scale - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let yd = if v[j] < v[j - 1] { v[j] } else { v[j - 1] } as f64;
            let mut yd = (yd + 0.5) / scale - 0.5;
            if yd < 0.0 {
                yd = 0.0;
            } else if yd > h as f64 {
                yd = h as f64;
            }
            let yd = yd.ceil();
            boundary.push((xd as i64 * h + yd as i64) as u64);
        }
        boundary.push((h * w) as u64);
        boundary.sort_unstable();
        let mut previous = 0u64;
        for a in boundary.iter_mut() {
            let t = *a;
            *a -= previous;
            previous = t;
        }
        let mut counts: Vec<u32> = Vec::with_capacity(boundary.len());
        let mut j = 0;
        counts.push(boundary[j] as u32);
        j += 1;
        while j < boundary.len() {
            if boundary[j] > 0 {
                counts.push(boundary[j] as u32);
                j += 1;
            } else {
                j += 1;
                if j < boundary.len() {
                    *counts.last_mut().unwrap() += boundary[j] as u32;
                    j += 1;
                }
            }
        }
        Self {
            height,
            width,
            counts,
        }
    }

    /// Union of several masks of the same size (pycocotools `merge` with `intersect=0`).
    pub fn union(masks: &[Rle]) -> Option<Self> {
        let first = masks.first()?;
        let mut combined = first.to_mask();
        for other in &masks[1..] {
            for (a, b) in combined.iter_mut().zip(other.to_mask()) {
                *a |= b;
            }
        }
        Some(Self::from_mask(&combined, first.width, first.height))
    }

    /// The compressed COCO string form (pycocotools `rleToString`).
    pub fn to_compressed(&self) -> String {
        let mut s = Vec::with_capacity(self.counts.len() * 2);
        for i in 0..self.counts.len() {
            let mut x = self.counts[i] as i64;
            // pycocotools deltas from the count two back only after index 2.
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            let mut more = true;
            while more {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push(c + 48);
            }
        }
        String::from_utf8(s).expect("compressed RLE is ASCII")
    }

    /// Parses the compressed COCO string form (pycocotools `rleFrString`).
    pub fn from_compressed(text: &str, height: u32, width: u32) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0;
        while p < bytes.len() {
            let mut x: i64 = 0;
            let mut k = 0;
            loop {
                let byte = bytes[p];
                if !(48..48 + 64).contains(&byte) || k > 12 {
                    return Err(format!("invalid character in compressed RLE at offset {p}"));
                }
                let c = (byte - 48) as i64;
                x |= (c & 0x1f) << (5 * k);
                let more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
                if p >= bytes.len() {
                    return Err("compressed RLE ends inside a number".into());
                }
            }
            if counts.len() > 2 {
                x += counts[counts.len() - 2] as i64;
            }
            if x < 0 || x > u32::MAX as i64 {
                return Err(format!("compressed RLE decodes to an invalid run {x}"));
            }
            counts.push(x as u32);
        }
        let rle = Self {
            height,
            width,
            counts,
        };
        rle.check()?;
        Ok(rle)
    }

    /// Checks that the runs cover exactly `height * width` pixels.
    pub fn check(&self) -> Result<(), String> {
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        let expected = self.height as u64 * self.width as u64;
        if total != expected {
            return Err(format!(
                "RLE runs cover {total} pixels but the mask is {}x{} = {expected}",
                self.width, self.height
            ));
        }
        Ok(())
    }
}
