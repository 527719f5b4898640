//! Loss and loss-scale curves as PNG, drawn directly (a tiny rasteriser with a 5×7 bitmap
//! font) so that plots need no system fonts or C libraries on a fresh machine.

use anyhow::{Context, Result};
use std::path::Path;

const W: usize = 800;
const H: usize = 420;
const L: usize = 80; // left margin (y labels)
const B: usize = 40; // bottom margin
const T: usize = 30; // top margin (title)
const R: usize = 20;

/// 5×7 glyphs, one row per byte (low 5 bits), for the characters the plots use.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '^' => [4, 10, 17, 0, 0, 0, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        's' => [0, 0, 15, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        _ => [0; 7],
    }
}

struct Canvas(Vec<u8>);

impl Canvas {
    fn new() -> Self {
        Canvas(vec![255; W * H * 3])
    }
    fn px(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < W && y < H {
            self.0[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            if x >= 0.0 && y >= 0.0 {
                self.px(x.round() as usize, y.round() as usize, c);
            }
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.px(x + (i * 6 + col) * scale + dx, y + row * scale + dy, [0, 0, 0]);
                            }
                        }
                    }
                }
            }
        }
    }
    fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header()?.write_image_data(&self.0)?;
        }
        crate::io::atomic::write(path, &bytes)
    }
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws `series` (x, y) as a line plot; `log_y` plots log2(y) (for the loss scale).
pub fn line_plot(path: &Path, title: &str, series: &[(f64, f64)], log_y: bool) -> Result<()> {
    let pts: Vec<(f64, f64)> = series.iter().filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0)).map(|&(x, y)| (x, if log_y { y.log2() } else { y })).collect();
    let mut c = Canvas::new();
    c.text(L, 8, title, 2);
    let (pw, ph) = ((W - L - R) as f64, (H - T - B) as f64);
    c.line((L as f64, T as f64), (L as f64, (H - B) as f64), [0, 0, 0]);
    c.line((L as f64, (H - B) as f64), ((W - R) as f64, (H - B) as f64), [0, 0, 0]);
    if pts.is_empty() {
        return c.save(path);
    }
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut ymin, mut ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if ymax - ymin < 1e-9 {
        ymin -= 1.0;
        ymax += 1.0;
    }
    let xr = (xmax - xmin).max(1e-9);
    let to = |(x, y): (f64, f64)| (L as f64 + (x - xmin) / xr * pw, T as f64 + (ymax - y) / (ymax - ymin) * ph);
    for k in 0..=4 {
        let y = ymin + (ymax - ymin) * k as f64 / 4.0;
        let (_, py) = to((xmin, y));
        c.line((L as f64, py), ((W - R) as f64, py), [225, 225, 225]);
        let label = if log_y { format!("2^{}", y.round()) } else { fmt(y) };
        c.text(4, py as usize - 3, &label, 1);
        let x = xmin + xr * k as f64 / 4.0;
        let (px, _) = to((x, ymin));
        c.text(px as usize, H - B + 8, &format!("{}", x.round()), 1);
    }
    c.text(W / 2 - 12, H - 14, "step", 1);
    for w in pts.windows(2) {
        c.line(to(w[0]), to(w[1]), [31, 119, 180]);
    }
    c.save(path)
}

/// `loss.png` and `loss_scale.png` from a run's metrics.jsonl.
pub fn plot_metrics(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let (mut loss, mut scale) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        let (Some(step), Some(lo)) = (v["step"].as_f64(), v["loss"].as_f64()) else { continue };
        loss.push((step, lo));
        if let Some(s) = v["loss_scale"].as_f64() {
            scale.push((step, s));
        }
    }
    line_plot(&out.join("loss.png"), "loss", &loss, false)?;
    line_plot(&out.join("loss_scale.png"), "loss scale (log2)", &scale, true)
}
