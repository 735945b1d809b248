//! Label PNGs are read as raw indices at every bit depth a palette PNG can have.

use mobileone_datasets::io::{encode_label_png, read_label_png, voc_palette, LabelMap};

fn write_packed(path: &std::path::Path, bits: u8, values: &[u8], width: u32, height: u32) {
    let depth = match bits {
        1 => png::BitDepth::One,
        2 => png::BitDepth::Two,
        _ => png::BitDepth::Four,
    };
    let per_byte = 8 / bits as usize;
    let stride = (width as usize).div_ceil(per_byte);
    let mut packed = vec![0u8; stride * height as usize];
    for y in 0..height as usize {
        for x in 0..width as usize {
            let shift = 8 - bits as usize * (x % per_byte + 1);
            packed[y * stride + x / per_byte] |= values[y * width as usize + x] << shift;
        }
    }
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(depth);
    encoder.set_palette(
        voc_palette()[..1 << bits]
            .iter()
            .flatten()
            .copied()
            .collect::<Vec<u8>>(),
    );
    encoder
        .write_header()
        .unwrap()
        .write_image_data(&packed)
        .unwrap();
}

#[test]
fn sub_byte_palette_pngs_give_indices() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height) = (13, 5);
    for bits in [1u8, 2, 4] {
        let values: Vec<u8> = (0..width * height)
            .map(|i| (i * 7 % (1 << bits)) as u8)
            .collect();
        let path = dir.path().join(format!("mask{bits}.png"));
        write_packed(&path, bits, &values, width, height);
        let map = read_label_png(&path).unwrap();
        assert_eq!((map.width, map.height), (width, height));
        assert_eq!(map.data, values, "{bits}-bit");
    }
}

#[test]
fn eight_bit_palette_and_grey_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut map = LabelMap::new(7, 3, 0);
    map.data
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i * 37 % 256) as u8);
    for (name, palette) in [("p.png", Some(voc_palette())), ("g.png", None)] {
        let path = dir.path().join(name);
        std::fs::write(&path, encode_label_png(&map, palette.as_deref()).unwrap()).unwrap();
        assert_eq!(read_label_png(&path).unwrap(), map, "{name}");
    }
}

#[test]
fn colour_pngs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgb.png");
    image::RgbImage::new(4, 4).save(&path).unwrap();
    let message = read_label_png(&path).unwrap_err().to_string();
    assert!(
        message.contains("rgb.png") && message.contains("Rgb"),
        "{message}"
    );
}
