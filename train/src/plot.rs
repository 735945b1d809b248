//! Training curves as a PNG drawn with plotters: the training loss per epoch (left) and the validation
//! metrics per epoch (right). Text is rendered with an embedded font (IBM Plex Sans, SIL OFL 1.1,
//! `train/assets/`), so no system fonts are needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
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

/// plotters 0.3.7 draws ab_glyph text without the glyphs' side bearings, which swallows most of a
/// plain space ("training loss" reads "trainingloss", plotters-rs/plotters#576); an en space survives.
fn spaced(text: &str) -> String {
    text.replace(' ', "\u{2002}")
}

/// The corner of the validation chart (x in 0..epochs, y in 0..1) whose legend-sized region holds the
/// fewest curve points, so the legend hides as little of the curves as it can.
fn legend_corner(points: &[(f64, f64)], epochs: f64) -> SeriesLabelPosition {
    let (width, height) = (0.3 * epochs, 0.25);
    let corners = [
        (SeriesLabelPosition::UpperLeft, 0.0, 1.0 - height),
        (
            SeriesLabelPosition::UpperRight,
            epochs - width,
            1.0 - height,
        ),
        (SeriesLabelPosition::LowerRight, epochs - width, 0.0),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.0),
    ];
    let covered = |x0: f64, y0: f64| {
        points
            .iter()
            .filter(|&&(x, y)| (x0..=x0 + width).contains(&x) && (y0..=y0 + height).contains(&y))
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, x0, y0)| covered(x0, y0))
        .map(|(corner, _, _)| corner)
        .expect("four corners")
}

fn plot_err<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Plot(e.to_string())
}

/// One of the two charts on `area`: epochs 0..=`last_epoch` along x with whole-number labels,
/// 0..`y_max` up, its mesh drawn.
fn epoch_chart<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    caption: &str,
    last_epoch: usize,
    y_max: f64,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(area)
        .caption(spaced(caption), (FAMILY, 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..last_epoch as f64, 0.0..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        // At most one label per epoch, so whole-number labels never repeat.
        .x_labels((last_epoch + 1).min(11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FAMILY, 13))
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// Draws `curves.png`-style charts of `history` into an RGB buffer of `WIDTH` x `HEIGHT`.
pub fn render(history: &[EpochRecord], title: &str) -> Result<image::RgbImage> {
    register_font()?;
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root
            .titled(&spaced(title), (FAMILY, 20))
            .map_err(plot_err)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let last_epoch = history.last().map_or(1, |r| r.epoch).max(1);

        let losses: Vec<(f64, f64)> = history
            .iter()
            .filter(|r| r.train_loss.is_finite())
            .map(|r| (r.epoch as f64, r.train_loss))
            .collect();
        let max_loss = losses.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-6) * 1.05;
        let mut chart = epoch_chart(&left, "training loss", last_epoch, max_loss)?;
        chart
            .draw_series(LineSeries::new(
                losses.iter().copied(),
                BLUE.stroke_width(2),
            ))
            .map_err(plot_err)?;
        chart
            .draw_series(losses.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(plot_err)?;

        let mut chart = epoch_chart(&right, "validation", last_epoch, 1.0)?;
        let names: Vec<String> = history
            .iter()
            .find_map(|r| r.validation.as_ref())
            .map(|v| v.values.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let colors = [RED, GREEN, MAGENTA, CYAN];
        let mut all_points = Vec::new();
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
                .label(spaced(name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
            all_points.extend(points);
        }
        if !names.is_empty() {
            chart
                .configure_series_labels()
                .position(legend_corner(&all_points, last_epoch as f64))
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
        error: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Validation;

    fn record(epoch: usize, loss: f64, map: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            step: epoch as u64 * 10,
            lr: 1e-3,
            train_loss: loss,
            images_per_s: 8.0,
            seconds: 60.0,
            wall_seconds: 65.0 * epoch as f64,
            validation: Some(Validation {
                values: vec![("mAP".into(), map), ("mAP50".into(), 2.0 * map)],
            }),
        }
    }

    #[test]
    fn the_legend_avoids_the_curves() {
        // Rising metrics that stay low: the lower corners are taken, the upper left is free.
        let low_rising: Vec<(f64, f64)> = (1..=10).map(|e| (e as f64, 0.01 * e as f64)).collect();
        assert!(matches!(
            legend_corner(&low_rising, 10.0),
            SeriesLabelPosition::UpperLeft
        ));
        // Metrics near 1 from the start: a lower corner.
        let high: Vec<(f64, f64)> = (1..=10).map(|e| (e as f64, 0.9)).collect();
        assert!(matches!(
            legend_corner(&high, 10.0),
            SeriesLabelPosition::LowerRight
        ));
    }

    #[test]
    fn renders_both_charts() {
        let history: Vec<EpochRecord> = (1..=10)
            .map(|e| record(e, 8.0 / e as f64, 0.005 * e as f64))
            .collect();
        let image = render(&history, "SSDLite s0 on Synth, 160 px, batch 32").unwrap();
        assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
        let colored = |pick: fn(&image::Rgb<u8>) -> bool, x0: u32, x1: u32| {
            (x0..x1)
                .flat_map(|x| (0..HEIGHT).map(move |y| (x, y)))
                .filter(|&(x, y)| pick(image.get_pixel(x, y)))
                .count()
        };
        // The blue loss curve on the left half, the red and green metric curves on the right.
        assert!(colored(|p| p.0 == [0, 0, 255], 0, WIDTH / 2) > 100);
        assert!(colored(|p| p.0 == [255, 0, 0], WIDTH / 2, WIDTH) > 100);
        assert!(colored(|p| p.0 == [0, 255, 0], WIDTH / 2, WIDTH) > 100);
    }
}
