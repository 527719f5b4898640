//! The run's plots from metrics.jsonl, drawn with `plotters` into an RGB buffer and written as
//! PNG through [`crate::io::atomic::write`]:
//!
//! - `loss.png`: training loss per `[[data]]` source (`loss_by_source`), smoothed with a
//!   debiased EMA over the steps where that source appeared, on top of the raw all-source loss
//!   (faint): a mixed batch's loss jumps with the mix, each source's curve shows its trend;
//! - `eval.png` (only when metrics.jsonl has eval lines): held-out bits/char per `[[eval]]`
//!   entry;
//! - `loss_scale.png`: log2 of the loss scale, skipped steps marked.
//!
//! Text uses DejaVu Sans, embedded (see `fonts/README.md`), so a fresh machine needs no system
//! fonts or C libraries. The font has no CJK glyphs: a label it cannot draw is replaced by its
//! position (`[[data]] #2`, `[[eval]] #1`), keeping an ASCII `lang` where there is one.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// Pixel size of every plot.
pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 560;

static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
/// plotters' default family for captions, ticks and legends; registering the embedded font
/// under it makes every text element use it.
const FAMILY: &str = "sans-serif";

/// matplotlib's tab10: distinct at a glance and in grey scale.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    // `register_font`'s error type has no Debug/Display; it only fails on a corrupt font file.
    let ok = *DONE.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the embedded plot font src/train/fonts/DejaVuSans.ttf does not parse: restore it from git");
    }
    Ok(())
}

/// Whether the embedded font has a glyph for every character of `s`.
fn drawable(s: &str) -> bool {
    use ab_glyph::Font;
    static F: OnceLock<Option<ab_glyph::FontRef<'static>>> = OnceLock::new();
    match F.get_or_init(|| ab_glyph::FontRef::try_from_slice(FONT).ok()) {
        Some(f) => s.chars().all(|c| c.is_whitespace() || f.glyph_id(c).0 != 0),
        None => s.is_ascii(),
    }
}

/// `label` if the font can draw it, else `{section} #{index}` plus the drawable `lang`.
fn legend_label(label: &str, section: &str, index: usize, lang: Option<&str>) -> String {
    if drawable(label) {
        return label.to_string();
    }
    match lang.filter(|l| drawable(l)) {
        Some(l) => format!("{section} #{index} ({l})"),
        None => format!("{section} #{index}"),
    }
}

/// One step line of metrics.jsonl, as far as the plots need it.
#[derive(Debug, Default, Clone)]
struct StepLine {
    step: f64,
    loss: Option<f64>,
    loss_scale: Option<f64>,
    skipped: bool,
    by_source: Vec<(String, f64)>,
}

/// One `[[eval]]` entry's (name, lang) and its (step, bits/char) points.
type EvalCurve = ((String, Option<String>), Vec<(f64, f64)>);

#[derive(Debug, Default)]
struct Parsed {
    steps: Vec<StepLine>,
    /// Eval entries by (name, lang) in first-seen order: (step, bits/char) points.
    evals: Vec<EvalCurve>,
}

fn parse(text: &str, path: &Path) -> Result<Parsed> {
    let mut p = Parsed::default();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).with_context(|| format!("{}:{}: not a JSON line; metrics.jsonl is written by `train`, rerun it or remove the line", path.display(), i + 1))?;
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(ev) = v["eval"].as_array() {
            for e in ev {
                let (Some(name), Some(bpc)) = (e["name"].as_str(), e["bits_per_char"].as_f64()) else { continue };
                let key = (name.to_string(), e["lang"].as_str().map(String::from));
                match p.evals.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, pts)) => pts.push((step, bpc)),
                    None => p.evals.push((key, vec![(step, bpc)])),
                }
            }
            continue;
        }
        let by_source = v["loss_by_source"].as_object().map(|m| m.iter().filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect()).unwrap_or_default();
        p.steps.push(StepLine { step, loss: v["loss"].as_f64(), loss_scale: v["loss_scale"].as_f64(), skipped: v["skipped"].as_bool().unwrap_or(false), by_source });
    }
    Ok(p)
}

/// Debiased exponential moving average (as TensorBoard smooths), so the first points are not
/// pulled towards 0; `span` is the number of points that carry most of the weight.
pub fn ema(values: &[(f64, f64)], span: f64) -> Vec<(f64, f64)> {
    let beta = 1.0 - 1.0 / span.max(1.0);
    let (mut s, mut w) = (0.0, 0.0);
    values
        .iter()
        .map(|&(x, y)| {
            s = beta * s + (1.0 - beta) * y;
            w = beta * w + (1.0 - beta);
            (x, s / w)
        })
        .collect()
}

/// A span that smooths the step-to-step noise of `n` points but keeps the shape of the curve.
fn span_for(n: usize) -> f64 {
    (n as f64 / 20.0).clamp(1.0, 50.0).round()
}

fn range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = vals.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    let pad = if hi - lo < 1e-9 { 0.5 } else { (hi - lo) * 0.05 };
    Some((lo - pad, hi + pad))
}

fn x_range(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo < 1.0 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// Draws into an RGB buffer with `draw`, then writes it as PNG to `path` atomically.
fn render(path: &Path, draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<()> {
    register_font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        draw(root.clone())?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&buf)?;
    }
    crate::io::atomic::write(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// plotters' errors carry the backend's error type; this keeps `?` usable in the draw closures.
fn de<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

fn legend<'a, DB: DrawingBackend + 'a>(chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FAMILY, 15))
        .draw()
        .map_err(de)
}

/// `loss.png`: per-source EMA of `loss_by_source` over the raw all-source loss. `sources` is
/// the recipe's source order (legend order, and the `#N` of undrawable names); sources in the
/// file but not in it follow in first-seen order.
fn loss_plot(path: &Path, p: &Parsed, sources: &[String]) -> Result<()> {
    let raw: Vec<(f64, f64)> = p.steps.iter().filter_map(|s| Some((s.step, s.loss.filter(|l| l.is_finite())?))).collect();
    let mut order: Vec<String> = sources.to_vec();
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &p.steps {
        for (name, l) in &s.by_source {
            if !order.contains(name) {
                order.push(name.clone());
            }
            if l.is_finite() {
                by.entry(name.clone()).or_default().push((s.step, *l));
            }
        }
    }
    // Files written before per-source logging: smooth the one mixed series instead.
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    if by.is_empty() {
        let span = span_for(raw.len());
        curves.push((format!("all sources (EMA, span {span})"), ema(&raw, span)));
    } else {
        for (i, name) in order.iter().enumerate() {
            let Some(pts) = by.get(name) else { continue };
            let span = span_for(pts.len());
            curves.push((format!("{} (EMA, span {span})", legend_label(name, "[[data]]", i + 1, name.split(':').next().filter(|_| name.contains(':')))), ema(pts, span)));
        }
    }
    let (x0, x1) = x_range(raw.iter().map(|p| p.0).chain(curves.iter().flat_map(|c| c.1.iter().map(|p| p.0))));
    let (y0, y1) = range(raw.iter().map(|p| p.1).chain(curves.iter().flat_map(|c| c.1.iter().map(|p| p.1)))).unwrap_or((0.0, 1.0));
    render(path, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Training loss by data source", (FAMILY, 24))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(de)?;
        chart.configure_mesh().x_desc("step").y_desc("loss (nats/token)").label_style((FAMILY, 14)).axis_desc_style((FAMILY, 16)).light_line_style(WHITE.mix(0.0)).draw().map_err(de)?;
        let faint = RGBColor(150, 150, 150).mix(0.45);
        chart.draw_series(LineSeries::new(raw.iter().copied(), faint.stroke_width(1))).map_err(de)?.label("all sources, raw").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], faint.stroke_width(2)));
        for (i, (label, pts)) in curves.iter().enumerate() {
            let c = color(i);
            chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2))).map_err(de)?.label(label.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)));
        }
        legend(&mut chart)
    })
}

/// `eval.png`: bits/char of each `[[eval]]` entry at each eval.
fn eval_plot(path: &Path, p: &Parsed) -> Result<()> {
    let (x0, x1) = x_range(p.evals.iter().flat_map(|e| e.1.iter().map(|p| p.0)));
    let (y0, y1) = range(p.evals.iter().flat_map(|e| e.1.iter().map(|p| p.1))).unwrap_or((0.0, 1.0));
    render(path, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Held-out bits per character", (FAMILY, 24))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(de)?;
        chart.configure_mesh().x_desc("step").y_desc("bits/char").label_style((FAMILY, 14)).axis_desc_style((FAMILY, 16)).light_line_style(WHITE.mix(0.0)).draw().map_err(de)?;
        for (i, ((name, lang), pts)) in p.evals.iter().enumerate() {
            let c = color(i);
            let mut label = legend_label(name, "[[eval]]", i + 1, lang.as_deref());
            if let Some(l) = lang.as_deref().filter(|l| drawable(l) && !label.ends_with(&format!("({l})"))) {
                label = format!("{label} ({l})");
            }
            chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2))).map_err(de)?.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)));
            chart.draw_series(pts.iter().map(|&pt| Circle::new(pt, 4, c.filled()))).map_err(de)?;
        }
        legend(&mut chart)
    })
}

/// `loss_scale.png`: log2 of the scale per step; skipped steps as red crosses on the line.
fn scale_plot(path: &Path, p: &Parsed) -> Result<()> {
    let pts: Vec<(f64, f64, bool)> = p.steps.iter().filter_map(|s| s.loss_scale.filter(|v| *v > 0.0 && v.is_finite()).map(|v| (s.step, v.log2(), s.skipped))).collect();
    let (x0, x1) = x_range(pts.iter().map(|p| p.0));
    let (y0, y1) = range(pts.iter().map(|p| p.1)).unwrap_or((-0.5, 0.5));
    let skipped = pts.iter().filter(|p| p.2).count();
    render(path, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss scale", (FAMILY, 24))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(de)?;
        chart.configure_mesh().x_desc("step").y_desc("log2(loss scale)").label_style((FAMILY, 14)).axis_desc_style((FAMILY, 16)).light_line_style(WHITE.mix(0.0)).draw().map_err(de)?;
        let c = color(0);
        chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), c.stroke_width(2))).map_err(de)?.label("log2 scale").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3)));
        let red = color(3);
        chart
            .draw_series(pts.iter().filter(|p| p.2).map(|p| Cross::new((p.0, p.1), 6, red.stroke_width(2))))
            .map_err(de)?
            .label(format!("skipped step ({skipped})"))
            .legend(move |(x, y)| Cross::new((x + 11, y), 6, red.stroke_width(2)));
        legend(&mut chart)
    })
}

/// The run's plots from `metrics` into `out`: `loss.png`, `loss_scale.png`, and `eval.png`
/// when there are eval lines. `sources` are the `[[data]]` names in recipe order (see
/// [`super::metrics::source_labels`]); an empty list takes the file's order.
pub fn plot_metrics(metrics: &Path, out: &Path, sources: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let p = parse(&text, metrics)?;
    loss_plot(&out.join("loss.png"), &p, sources)?;
    if !p.evals.is_empty() {
        eval_plot(&out.join("eval.png"), &p)?;
    }
    scale_plot(&out.join("loss_scale.png"), &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let d = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let r = d.read_info().unwrap();
        (r.info().width, r.info().height)
    }

    #[test]
    fn plots_a_small_run_with_two_sources_an_eval_and_a_skipped_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for step in 1..=12u32 {
            let zh = 9.0 - 0.4 * step as f64;
            let en = 2.5 - 0.02 * step as f64;
            let skipped = step == 5;
            let by = if step % 3 == 0 { serde_json::json!({"zh:wiki": zh}) } else { serde_json::json!({"zh:wiki": zh, "英文": en}) };
            lines.push(serde_json::json!({"step": step, "stage": "stage1", "loss": (zh + en) / 2.0, "loss_scale": if step < 5 { 65536.0 } else { 32768.0 },
                "skipped": skipped, "loss_by_source": by, "tokens_by_source": {}}).to_string());
            if step % 6 == 0 {
                lines.push(serde_json::json!({"step": step, "eval": [{"name": "held-out zh", "lang": "zh", "bits_per_char": 3.0 - step as f64 / 10.0, "mean_nll": 1.0, "tokens": 10}]}).to_string());
            }
        }
        let m = dir.path().join("metrics.jsonl");
        std::fs::write(&m, lines.join("\n") + "\n").unwrap();
        plot_metrics(&m, dir.path(), &["zh:wiki".into(), "英文".into()]).unwrap();
        for f in ["loss.png", "eval.png", "loss_scale.png"] {
            assert_eq!(png_size(&dir.path().join(f)), (WIDTH, HEIGHT), "{f}");
        }
    }

    #[test]
    fn no_eval_plot_without_eval_lines_and_old_files_still_plot() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        std::fs::write(&m, "{\"step\": 1, \"loss\": 3.0, \"loss_scale\": 1.0, \"skipped\": false}\n{\"step\": 2, \"loss\": null, \"loss_scale\": 1.0, \"skipped\": true}\n").unwrap();
        plot_metrics(&m, dir.path(), &[]).unwrap();
        assert_eq!(png_size(&dir.path().join("loss.png")), (WIDTH, HEIGHT));
        assert_eq!(png_size(&dir.path().join("loss_scale.png")), (WIDTH, HEIGHT));
        assert!(!dir.path().join("eval.png").exists());
    }

    #[test]
    fn labels_the_font_cannot_draw_fall_back_to_their_position() {
        assert_eq!(legend_label("zh:wiki", "[[data]]", 1, None), "zh:wiki");
        assert_eq!(legend_label("维基", "[[data]]", 2, Some("zh")), "[[data]] #2 (zh)");
        assert_eq!(legend_label("维基", "[[eval]]", 3, None), "[[eval]] #3");
    }

    #[test]
    fn ema_is_debiased() {
        let s = ema(&[(1.0, 4.0), (2.0, 4.0), (3.0, 4.0)], 10.0);
        assert!(s.iter().all(|p| (p.1 - 4.0).abs() < 1e-12));
    }
}
