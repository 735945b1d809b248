//! Minimal `.npy` (NumPy format 1.0/2.0) reading and writing for little-endian float32 C-order arrays,
//! the format of `np.save(path, x.astype(np.float32))`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// Reads a float32 array of any rank.
pub fn read_f32(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a float32 .npy array", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Tensor> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("missing the \\x93NUMPY magic");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("unsupported .npy version {v}"),
    };
    let header = bytes
        .get(start..start + header_len)
        .context("header is truncated")?;
    let header = std::str::from_utf8(header).context("header is not text")?;
    let field = |name: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{name}'"))
            .with_context(|| format!("header has no '{name}'"))?;
        Ok(header[at + name.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    if !field("descr")?.starts_with("'<f4'") {
        bail!("dtype must be '<f4' (float32), header: {header}");
    }
    if !field("fortran_order")?.starts_with("False") {
        bail!("Fortran-ordered arrays are not supported");
    }
    let shape_text = field("shape")?;
    let shape_text = &shape_text[1..shape_text.find(')').context("malformed shape")?];
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad dimension `{s}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    if data.len() != count * 4 {
        bail!(
            "shape {shape:?} needs {} bytes of data, the file has {}",
            count * 4,
            data.len()
        );
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Writes a float32 tensor atomically (temporary file, then rename).
pub fn write_f32(path: &Path, tensor: &Tensor) -> Result<()> {
    let shape = tensor.dims();
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Pad so that the data starts on a 64-byte boundary, newline-terminated, as NumPy does.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let values = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    mobileone::checkpoint::write_atomic(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3, 4))
            .unwrap();
        let path = std::env::temp_dir().join(format!("npy-roundtrip-{}.npy", std::process::id()));
        write_f32(&path, &t).unwrap();
        let back = read_f32(&path).unwrap();
        assert_eq!(back.dims(), &[1, 2, 3, 4]);
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn rejects_other_dtypes_and_truncation() {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }\n";
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        assert!(parse(&bytes).unwrap_err().to_string().contains("float32"));
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 8]);
        assert!(parse(&bytes)
            .unwrap_err()
            .to_string()
            .contains("needs 24 bytes"));
        assert!(parse(b"garbage").is_err());
    }
}
