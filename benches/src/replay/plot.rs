//! The PNG of TTFT CDFs, one line per policy, TTFT on a log axis.
//!
//! Drawn with plotters into an RGB buffer and encoded with `png` (no image
//! codec stack). Text needs a TrueType font loaded at run time (plotters'
//! `ab_glyph` feature embeds none): `--font`, by default DejaVu Sans from
//! Debian's `fonts-dejavu-core`. Without a readable font the plot is still
//! drawn, without captions, tick labels or legend, and the caller is told.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::Outcome;

/// Debian's `fonts-dejavu-core` (installed by `scripts/install-test-deps.sh`).
pub(crate) const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const SIZE: (u32, u32) = (1100, 700);
const COLORS: [RGBColor; 6] = [
    RGBColor(200, 60, 50),
    RGBColor(230, 150, 30),
    RGBColor(60, 110, 200),
    RGBColor(30, 150, 80),
    RGBColor(120, 60, 160),
    RGBColor(90, 90, 90),
];
/// Points per CDF line at most.
const POINTS: usize = 2000;

/// Registers `font` as plotters' sans-serif once; whether text can be drawn.
fn load_font(font: &Path) -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(font).map_err(|e| format!("{}: {e}", font.display()))?;
            // plotters keeps fonts for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", font.display()))
        })
        .clone()
}

/// The empirical CDF of `v` as at most [`POINTS`] (x, fraction) points.
pub(crate) fn cdf(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(POINTS).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (s[i], (i + 1) as f64 / n as f64))
        .collect();
    if pts.last().is_some_and(|p| p.1 < 1.0) {
        pts.push((s[n - 1], 1.0));
    }
    pts
}

/// Writes the plot to `path`; the `Ok` string is a note for the user (empty,
/// or why there is no text).
pub(crate) fn ttft_cdf(path: &Path, o: &Outcome, font: &Path) -> anyhow::Result<String> {
    let text = load_font(font);
    let lines: Vec<(&str, Vec<(f64, f64)>)> = o.runs.iter().map(|r| (r.policy.name(), cdf(&r.ttft_ms))).collect();
    let all = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let lo = all.clone().filter(|&x| x > 0.0).fold(f64::INFINITY, f64::min);
    let hi = all.fold(0.0f64, f64::max);
    if !lo.is_finite() || hi <= 0.0 {
        return Err(anyhow!("no positive TTFT to plot"));
    }
    let (lo, hi) = (lo / 1.2, (hi * 1.2).max(lo * 10.0));
    let mut buf = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut b = ChartBuilder::on(&root);
        b.margin(20);
        if text.is_ok() {
            b.caption(
                format!(
                    "TTFT CDF, {} requests, time scale {:.4}",
                    o.runs.first().map_or(0, |r| r.ttft_ms.len()),
                    o.time_scale
                ),
                ("sans-serif", 24),
            )
            .x_label_area_size(50)
            .y_label_area_size(60);
        }
        let mut chart = b
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
            .map_err(|e| anyhow!("{e}"))?;
        let mut mesh = chart.configure_mesh();
        if text.is_ok() {
            mesh.x_desc("TTFT (ms, log)").y_desc("fraction of requests");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| anyhow!("{e}"))?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let series = chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?;
            if text.is_ok() {
                series
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if text.is_ok() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    write_png(path, &buf).with_context(|| format!("writing {}", path.display()))?;
    Ok(match text {
        Ok(()) => String::new(),
        Err(e) => {
            let names: Vec<String> = lines
                .iter()
                .enumerate()
                .map(|(i, (n, _))| {
                    let c = COLORS[i % COLORS.len()];
                    format!("{n} = rgb({},{},{})", c.0, c.1, c.2)
                })
                .collect();
            format!(" (no text: font {e}; lines: {})", names.join(", "))
        }
    })
}

fn write_png(path: &Path, rgb: &[u8]) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_monotone_and_ends_at_one() {
        let v: Vec<f64> = (0..5000).rev().map(f64::from).collect();
        let c = cdf(&v);
        assert!(c.len() <= POINTS + 1);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(c.last(), Some(&(4999.0, 1.0)));
        assert!(cdf(&[]).is_empty());
    }
}
