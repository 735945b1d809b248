//! Training curves as a PNG drawn with plotters: the training loss per epoch (left) and the validation
//! metrics per epoch (right). Text is rendered with an embedded font (IBM Plex Sans, SIL OFL 1.1,
//! `train/assets/`), so no system fonts are needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Result, TrainError};
use crate::metrics::EpochRecord;

const FONT: &[u8] = include_bytes!("../assets/IBMPlexSans-Regular.ttf");
const FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 400;

fn register_font() -> Result<()> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| TrainError::Plot("the embedded font does not parse".into()));
    });
    result
}

fn plot_err<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Plot(e.to_string())
}

/// Draws `curves.png`-style charts of `history` into an RGB buffer of `WIDTH` x `HEIGHT`.
pub fn render(history: &[EpochRecord], title: &str) -> Result<image::RgbImage> {
    register_font()?;
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, (FAMILY, 20)).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let epochs = history.last().map_or(1, |r| r.epoch).max(1) as f64;

        let losses: Vec<(f64, f64)> = history
            .iter()
            .filter(|r| r.train_loss.is_finite())
            .map(|r| (r.epoch as f64, r.train_loss))
            .collect();
        let max_loss = losses.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-6) * 1.05;
        let mut chart = ChartBuilder::on(&left)
            .caption("training loss", (FAMILY, 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..epochs, 0.0..max_loss)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style((FAMILY, 13))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(
                losses.iter().copied(),
                BLUE.stroke_width(2),
            ))
            .map_err(plot_err)?;
        chart
            .draw_series(losses.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(plot_err)?;

        let mut chart = ChartBuilder::on(&right)
            .caption("validation", (FAMILY, 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..epochs, 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style((FAMILY, 13))
            .draw()
            .map_err(plot_err)?;
        let names: Vec<String> = history
            .iter()
            .find_map(|r| r.validation.as_ref())
            .map(|v| v.values.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let colors = [RED, GREEN, MAGENTA, CYAN];
        for (i, name) in names.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter_map(|r| {
                    let v = r.validation.as_ref()?;
                    let value = v.values.iter().find(|(n, _)| n == name)?.1;
                    Some((r.epoch as f64, value))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
        }
        if !names.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FAMILY, 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(image::RgbImage::from_raw(WIDTH, HEIGHT, buffer).expect("buffer has WIDTH x HEIGHT pixels"))
}

/// Renders the curves and writes them as a PNG, atomically.
pub fn write_curves(path: &Path, history: &[EpochRecord], title: &str) -> Result<()> {
    let image = render(history, title)?;
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(plot_err)?;
    mobileone::checkpoint::write_atomic(path, &png).map_err(|source| TrainError::Io {
        path: path.into(),
        source,
    })
}
