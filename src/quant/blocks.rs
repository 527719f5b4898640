//! Block quantizers with ggml's layouts and reference semantics (`quantize_row_*_ref` in
//! ggml-quants.c), so that our bytes are GGUF bytes and llama.cpp reads them unchanged.
//!
//! Weight formats (one row of a matrix is a whole number of blocks, so rows can be moved as
//! byte ranges):
//!
//! | type | block | bytes | layout |
//! | --- | --- | --- | --- |
//! | Q8_0 | 32 | 34 | `f16 d; i8 qs[32]`, `x ≈ d·q`, `d = max|x| / 127` |
//! | Q4_0 | 32 | 18 | `f16 d; u8 qs[16]`, `x ≈ d·(q − 8)`, element j in the low nibble of byte j, element j+16 in its high nibble |
//! | Q5_0 | 32 | 22 | `f16 d; u32 qh; u8 qs[16]`, as Q4_0 with a fifth bit in `qh` (bit j for element j), offset 16 |
//! | Q4_1 | 32 | 20 | `f16 d, m; u8 qs[16]`, `x ≈ d·q + m`, nibble order as Q4_0 |
//! | Q4_K | 256 | 144 | `f16 d, dmin; u8 scales[12]; u8 qs[128]`, 8 sub-blocks of 32 with 6-bit scale/min |
//! | Q6_K | 256 | 210 | `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`, 16 sub-blocks of 16, `x ≈ d·sc·(q − 32)` |
//!
//! Activation formats (quantized per call, never stored): Q8_0 as llama.cpp's x86 path computes
//! it (scale `127 / max|x|`, round half to even), Q8_1 (Q8_0 plus `d·Σq`, for Q4_1's offset) and
//! Q8_K (`f32 d; i8 qs[256]; i16 bsums[16]`) for the k-quants.
//!
//! Besides the reference quantizers, [`quantize_row_q4_0_rmse`] is ggml's importance-weighted
//! Q4_0 (`quantize_row_q4_0_impl`: a search over 19 scales for the least weighted squared
//! error), used by `quantize` by default; its bytes are ordinary Q4_0.
//!
//! Dequantization lives in [`crate::io::gguf::dequant`] (ported from ggml's reference); the
//! tests here quantize with these functions and dequantize with that one.

use half::f16;

pub const QK: usize = 32;
pub const QK_K: usize = 256;
pub const Q8_0_BYTES: usize = 34;
pub const Q4_0_BYTES: usize = 18;
pub const Q5_0_BYTES: usize = 22;
pub const Q4_K_BYTES: usize = 144;
pub const Q4_1_BYTES: usize = 20;
/// `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`.
pub const Q6_K_BYTES: usize = 210;
/// `f16 d; f16 s; i8 qs[32]` with `s = d·Σq` (ggml's block_q8_1, the activations of Q4_1).
pub const Q8_1_BYTES: usize = 36;
/// `f32 d; i8 qs[256]; i16 bsums[16]`.
pub const Q8_K_BYTES: usize = 4 + QK_K + 2 * QK_K / 16;

#[inline]
pub fn f16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// ggml's `nearest_int`: round half to even by adding 1.5·2²³, which leaves the rounded
/// integer in the low mantissa bits (valid for |x| ≤ 2²²). Bit-identical to
/// `round_ties_even`, without a libm call in the hot loops.
#[inline]
fn nearest_int(x: f32) -> i32 {
    debug_assert!(x.abs() <= 4194303.0);
    let v = x + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The value and index-order maximum by magnitude (first wins ties), as the legacy quantizers
/// pick the signed extreme.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

/// `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = roundf(x / d)` (half away from zero).
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "Q8_0 rows are whole blocks of 32");
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bits(d));
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
}

/// `quantize_row_q4_0_ref`: `d = max / −8` with `max` the signed extreme, so the extreme maps to
/// the code 0 and the other side gets 15 levels; `q = min(15, trunc(x/d + 8.5))`.
pub fn quantize_row_q4_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "Q4_0 rows are whole blocks of 32");
    for b in x.chunks_exact(QK) {
        let (_, max) = signed_absmax(b);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bits(d));
        for j in 0..QK / 2 {
            let q0 = ((b[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((b[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
}

/// `quantize_row_q5_0_ref`: as Q4_0 with 32 levels, `d = max / −16`, the fifth bit of element j
/// in bit j of `qh`.
pub fn quantize_row_q5_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "Q5_0 rows are whole blocks of 32");
    for b in x.chunks_exact(QK) {
        let (_, max) = signed_absmax(b);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bits(d));
        let mut qh = 0u32;
        let mut qs = [0u8; QK / 2];
        for j in 0..QK / 2 {
            let q0 = ((b[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((b[j + QK / 2] * id + 16.5) as i8).min(31) as u8;
            qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        out.extend(qh.to_le_bytes());
        out.extend(qs);
    }
}

/// `quantize_row_q4_1_ref`: `d = (max − min) / 15`, `m = min`, `q = min(15, trunc((x − min)/d + 0.5))`.
pub fn quantize_row_q4_1(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "Q4_1 rows are whole blocks of 32");
    for b in x.chunks_exact(QK) {
        let min = b.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
        let max = b.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bits(d));
        out.extend(f16_bits(min));
        for j in 0..QK / 2 {
            let q0 = (((b[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((b[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
}

const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qx_quants`: a symmetric scale for `x` with codes in `[−nmax, nmax)` (stored as
/// `l + nmax` in `codes`), searched over 19 candidate scales around `nmax / max` for the least
/// weighted squared error. Weights are `qw` when given, else `x²` (`rmse_type` 1, the only
/// type used here).
fn make_qx_quants(nmax: i32, x: &[f32], codes: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        codes.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let w = |i: usize| qw.map_or(x[i] * x[i], |q| q[i]);
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..x.len() {
        let l = code(iscale, x[i]);
        codes[i] = (l + nmax) as i8;
        sumlx += w(i) * x[i] * l as f32;
        suml2 += w(i) * (l * l) as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = code(iscale, v);
            sumlx += w(i) * v * l as f32;
            suml2 += w(i) * (l * l) as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (code(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q4_0_impl` (ggml's Q4_0 with an importance matrix): per block, weights
/// `imp[j]·sqrt(σ² + x_j²)` (σ² the row's mean square) and the scale from `make_qx_quants`.
/// `imp = None` is a unit importance, which is how `quantize` runs without `--imatrix`:
/// the reference quantizer maps the extreme exactly and spends the other 15 levels on whatever
/// is left, this one minimizes the (weighted) error of the whole block.
pub fn quantize_row_q4_0_rmse(x: &[f32], imp: Option<&[f32]>, out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "Q4_0 rows are whole blocks of 32");
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let mut w = [0f32; QK];
    let mut l = [0i8; QK];
    for (ib, b) in x.chunks_exact(QK).enumerate() {
        for j in 0..QK {
            w[j] = imp.map_or(1.0, |q| q[QK * ib + j]) * (sigma2 + b[j] * b[j]).sqrt();
        }
        let d = make_qx_quants(8, b, &mut l, Some(&w));
        out.extend(f16_bits(d));
        for j in 0..QK / 2 {
            out.push(l[j] as u8 | ((l[j + QK / 2] as u8) << 4));
        }
    }
}

/// The scale ggml's importance-weighted Q4_0 search picks for one block `x` with per-value
/// weights `qw` (as [`quantize_row_q4_0_rmse`] computes them); 0 for an all-zero block.
pub fn q4_0_block_scale(x: &[f32], qw: &[f32]) -> f32 {
    let mut l = [0i8; QK];
    make_qx_quants(8, x, &mut l, Some(qw))
}

/// Rows per interleaved Q4_0 group ([`pack_q4_0x8`]).
pub const Q4_0X8_ROWS: usize = 8;
/// Bytes of one block column of an interleaved group: the same as eight Q4_0 blocks.
pub const Q4_0X8_BYTES: usize = Q4_0X8_ROWS * Q4_0_BYTES;

/// Interleaves eight Q4_0 rows of `nb` blocks (`src`, row-major, `8·nb·18` bytes) so that a
/// GEMV reads them as one sequential stream and produces eight outputs per pass (llama.cpp's
/// `CPU_REPACK` idea, in a layout of our own). Block column `b` takes 144 bytes at `144·b`:
///
/// * the eight rows' f16 scales `d[0..8]` (16 bytes), loaded as one F16C vector;
/// * four chunks `t = 0..4` of 32 bytes, chunk `t` holding bytes `qs[4t..4t+4]` of rows 0..7
///   in order. Byte `i` of a Q4_0 block holds element `i` (low nibble) and `i + 16` (high), so
///   a chunk's low nibbles are elements `4t..4t+4` of every row and its high nibbles elements
///   `16+4t..20+4t`: each 32-bit lane is one row, which `maddubs` + `madd` sum per lane
///   against the activation's matching four bytes broadcast to all lanes.
///
/// The codes are not changed (no XOR), so [`unpack_q4_0x8`] restores the GGUF bytes exactly.
pub fn pack_q4_0x8(src: &[u8], nb: usize, dst: &mut [u8]) {
    let rb = nb * Q4_0_BYTES;
    assert!(src.len() == Q4_0X8_ROWS * rb && dst.len() == src.len(), "eight Q4_0 rows of {nb} blocks");
    for (b, out) in dst.chunks_exact_mut(Q4_0X8_BYTES).enumerate() {
        for r in 0..Q4_0X8_ROWS {
            let blk = &src[r * rb + b * Q4_0_BYTES..r * rb + (b + 1) * Q4_0_BYTES];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
            for t in 0..4 {
                let o = 16 + 32 * t + 4 * r;
                out[o..o + 4].copy_from_slice(&blk[2 + 4 * t..6 + 4 * t]);
            }
        }
    }
}

/// The inverse of [`pack_q4_0x8`]: eight row-major Q4_0 rows from one interleaved group.
pub fn unpack_q4_0x8(src: &[u8], nb: usize, dst: &mut [u8]) {
    let rb = nb * Q4_0_BYTES;
    assert!(src.len() == Q4_0X8_ROWS * rb && dst.len() == src.len(), "eight Q4_0 rows of {nb} blocks");
    for (b, g) in src.chunks_exact(Q4_0X8_BYTES).enumerate() {
        for r in 0..Q4_0X8_ROWS {
            let blk = &mut dst[r * rb + b * Q4_0_BYTES..r * rb + (b + 1) * Q4_0_BYTES];
            unpack_q4_0x8_block(g, r, blk);
        }
    }
}

/// Row `r`'s Q4_0 block (18 bytes) out of one interleaved block column `g` (144 bytes).
pub fn unpack_q4_0x8_block(g: &[u8], r: usize, blk: &mut [u8]) {
    blk[..2].copy_from_slice(&g[2 * r..2 * r + 2]);
    for t in 0..4 {
        let o = 16 + 32 * t + 4 * r;
        blk[2 + 4 * t..6 + 4 * t].copy_from_slice(&g[o..o + 4]);
    }
}

/// `quantize_row_q6_K_ref`: per sub-block of 16 a scale from `make_qx_quants` (32 levels,
/// weights x²), the 16 scales quantized to i8 against `d = max_scale / −128`, then the 6-bit
/// codes recomputed with the rounded scales and split into low nibbles (`ql`) and high 2 bits
/// (`qh`) in ggml's interleaved order.
pub fn quantize_row_q6_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK_K), "Q6_K rows are whole super-blocks of 256");
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..QK_K / 16 {
            let s = make_qx_quants(32, &xb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16], None);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        let mut block = [0u8; Q6_K_BYTES];
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend(block);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d16 = f16_bits(1.0 / iscale);
        let d = f16_at(&d16, 0);
        let mut sc = [0i8; QK_K / 16];
        for ib in 0..QK_K / 16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            let dj = d * sc[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
            }
        }
        let l = l.map(|v| v as u8);
        let (ql, rest) = block.split_at_mut(128);
        let (qh, rest) = rest.split_at_mut(64);
        for (n, j) in (0..QK_K).step_by(128).enumerate() {
            let (ql, qh) = (&mut ql[64 * n..64 * n + 64], &mut qh[32 * n..32 * n + 32]);
            for i in 0..32 {
                let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
                ql[i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        for (o, s) in rest[..16].iter_mut().zip(sc) {
            *o = s as u8;
        }
        rest[16..18].copy_from_slice(&d16);
        out.extend(block);
    }
}

/// ggml's `make_qkx2_quants`: a scale and a (non-positive) minimum for `x` with weights `w`,
/// searched over `nstep + 1` candidate scales by weighted least squares. Returns
/// `(scale, -min)` and leaves the codes in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * diff * diff;
    }
    let mut laux = [0u8; QK];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * diff * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scale and min of sub-block `j` from Q4_K's 12 packed bytes (`get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `quantize_row_q4_K_ref` (no importance matrix): per sub-block of 32, weights
/// `sqrt(mean x²) + |x|`, a scale and min from `make_qkx2_quants`; the 8 scales and 8 mins are
/// then quantized to 6 bits against the super-block's `d` and `dmin`, and the codes recomputed
/// with the rounded scales.
pub fn quantize_row_q4_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK_K), "Q4_K rows are whole super-blocks of 256");
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &xb[32 * j..32 * j + 32];
            let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
            let av_x = (sum_x2 / 32.0).sqrt();
            let w: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
            let (s, m) = make_qkx2_quants(15, xs, &w, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
            scales[j] = s;
            mins[j] = m;
            max_scale = max_scale.max(s);
            max_min = max_min.max(m);
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut packed = [0u8; 12];
        for j in 0..8 {
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        let d16 = f16_bits(max_scale / 63.0);
        let dmin16 = f16_bits(max_min / 63.0);
        let d = f16_at(&d16, 0);
        let dmin = f16_at(&dmin16, 0);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &packed);
            let dj = d * sc as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin * m as f32;
            for i in 0..32 {
                l[32 * j + i] = nearest_int((xb[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        out.extend(d16);
        out.extend(dmin16);
        out.extend(packed);
        for c in 0..4 {
            for i in 0..32 {
                out.push(l[64 * c + i] | (l[64 * c + 32 + i] << 4));
            }
        }
    }
}

/// Activations to Q8_0 as llama.cpp's x86 `quantize_row_q8_0` does: `d = max|x| / 127` stored
/// as f16, codes `round_half_even(x · 127 / max|x|)`.
pub fn quantize_act_q8_0(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        o[..2].copy_from_slice(&f16_bits(amax / 127.0));
        for (q, &v) in o[2..].iter_mut().zip(b) {
            *q = nearest_int(v * id) as i8 as u8;
        }
    }
}

/// Activations to Q8_1 (llama.cpp's x86 `quantize_row_q8_1`): Q8_0's codes plus
/// `s = d · Σq` in f16, which carries a Q4_1 weight's offset `m` through the dot product.
pub fn quantize_act_q8_1(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_1_BYTES)) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in o[4..].iter_mut().zip(b) {
            let c = nearest_int(v * id);
            sum += c;
            *q = c as i8 as u8;
        }
        o[..2].copy_from_slice(&f16_bits(d));
        o[2..4].copy_from_slice(&f16_bits(sum as f32 * d));
    }
}

/// `quantize_row_q8_K_ref`: `iscale = −127 / max` (signed extreme), codes capped at 127, the
/// scale stored as f32 `1 / iscale`, and the sums of each 16 codes (used for the mins of Q4_K).
pub fn quantize_act_q8_k(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8_K_BYTES)) {
        let (amax, max) = signed_absmax(b);
        if amax == 0.0 {
            o.iter_mut().for_each(|v| *v = 0);
            continue;
        }
        let iscale = -127.0 / max;
        let (head, rest) = o.split_at_mut(4);
        let (qs, bsums) = rest.split_at_mut(QK_K);
        for (q, &v) in qs.iter_mut().zip(b) {
            *q = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for j in 0..QK_K / 16 {
            let s: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| q as i8 as i32).sum();
            bsums[2 * j..2 * j + 2].copy_from_slice(&(s as i16).to_le_bytes());
        }
        head.copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::io::gguf::{dequantize, GgmlType};

    fn deq(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
        dequantize(ty, b, n).unwrap()
    }

    /// A smooth, sign-changing test row with a few outliers.
    fn row(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 * 0.37 + seed as f32;
                let v = t.sin() * 0.8 + (t * 2.3).cos() * 0.3;
                if (i as u32 + seed).is_multiple_of(97) { v * 6.0 } else { v }
            })
            .collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (126.6, 127), (-127.4, -127), (3.49, 3)] {
            assert_eq!(nearest_int(x), want, "{x}");
        }
        for i in -5000..5000 {
            let x = i as f32 * 0.137;
            assert_eq!(nearest_int(x), x.round_ties_even() as i32);
        }
    }

    #[test]
    fn q8_0_block_by_hand() {
        // x = j − 16 for j in 0..32: max|x| = 16, d = 16/127, codes round(x·127/16).
        let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
        let mut b = Vec::new();
        quantize_row_q8_0(&x, &mut b);
        assert_eq!(b.len(), 34);
        assert_eq!(&b[..2], &f16_bits(16.0 / 127.0));
        assert_eq!(b[2] as i8, -127); // −16 → −127
        assert_eq!(b[2 + 16] as i8, 0); // 0 → 0
        assert_eq!(b[2 + 17] as i8, 8); // 1·127/16 = 7.94 → 8
        assert_eq!(b[2 + 24] as i8, 64); // 8·127/16 = 63.5 → 64 (half away from zero, like roundf)
        assert_eq!(b[2 + 8] as i8, -64); // −8 → −63.5 → −64
    }

    #[test]
    fn q4_0_block_by_hand() {
        // x = j/2 − 4 for j in 0..32, except x[0] = −16 (the extreme by magnitude, so the signed
        // max) and x[31] = 15.5: d = −16 / −8 = 2, codes trunc(x/2 + 8.5) capped at 15.
        let mut x: Vec<f32> = (0..32).map(|j| j as f32 / 2.0 - 4.0).collect();
        x[0] = -16.0;
        x[31] = 15.5;
        let mut b = Vec::new();
        quantize_row_q4_0(&x, &mut b);
        assert_eq!(b.len(), 18);
        assert_eq!(&b[..2], &f16_bits(2.0));
        // element 0: −8 + 8.5 → 0 (low nibble); element 16: x = 4, 2 + 8.5 → 10 (high) = 0xA0.
        assert_eq!(b[2], 0xA0);
        // element 1: x = −3.5 → 6.75 → 6; element 17: x = 4.5 → 10.75 → 10: 0xA6.
        assert_eq!(b[3], 0xA6);
        // element 15: x = 3.5 → 10.25 → 10; element 31: 7.75 + 8.5 = 16.25 → capped 15: 0xFA.
        assert_eq!(b[17], 0xFA);
        let y = deq(GgmlType::Q4_0, &b, 32);
        assert_eq!(y[0], -16.0);
        assert_eq!(y[31], 14.0);
    }

    #[test]
    fn q5_0_block_by_hand() {
        // x = j for j in 0..32, x[31] = 31 is the extreme: d = 31 / −16 = −1.9375, so codes are
        // trunc(−x/1.9375 + 16.5): element 0 → 16 (0x10: nibble 0, high bit 1), element 31 → 0.
        let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
        let mut b = Vec::new();
        quantize_row_q5_0(&x, &mut b);
        assert_eq!(b.len(), 22);
        assert_eq!(&b[..2], &f16_bits(-1.9375));
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        // element 0 → 16 (bit 0 set); element 16: −8.26 + 16.5 = 8.24 → 8 (bit 16 clear).
        assert_eq!(qh & 1, 1);
        assert_eq!((qh >> 16) & 1, 0);
        assert_eq!(b[6], 0x80); // low nibble 16 & 15 = 0, high nibble 8
        let y = deq(GgmlType::Q5_0, &b, 32);
        for (a, v) in x.iter().zip(&y) {
            assert!((a - v).abs() <= 1.9375 / 2.0 + 1e-3, "{a} vs {v}");
        }
    }

    #[test]
    fn q4_k_block_by_hand() {
        // Each sub-block j is the ramp m_j + s_j·l for l = 0..15 (twice): exactly representable
        // with 16 levels, so make_qkx2_quants finds scale s_j, min −m_j... up to the 6-bit
        // rounding of scales against d = max scale / 63.
        let mut x = vec![0f32; 256];
        for j in 0..8 {
            for i in 0..32 {
                x[32 * j + i] = (j as f32 + 1.0) * 0.5 * (i % 16) as f32 - (j as f32);
            }
        }
        let mut b = Vec::new();
        quantize_row_q4_k(&x, &mut b);
        assert_eq!(b.len(), 144);
        // Largest scale 4.0 (sub-block 7): d = 4/63. Largest min 7: dmin = 7/63.
        assert_eq!(&b[..2], &f16_bits(4.0 / 63.0));
        assert_eq!(&b[2..4], &f16_bits(7.0 / 63.0));
        // Sub-block 7's 6-bit scale and min are both 63; sub-block 0: scale 0.5·63/4 = 7.875 → 8,
        // min 0 → 0.
        assert_eq!(scale_min_k4(7, &b[4..16]), (63, 63));
        assert_eq!(scale_min_k4(0, &b[4..16]), (8, 0));
        // Byte 0 of qs: element 0 (code 0) low, element 32 (sub-block 1, code 0) high.
        assert_eq!(b[16], 0x00);
        // Byte 15 of the last 32-byte group: element 207 (sub-block 6, l = 15) and 239 (7, 15).
        assert_eq!(b[16 + 96 + 15], 0xFF);
        let y = deq(GgmlType::Q4_K, &b, 256);
        // The codes are exact for the unrounded scales; what is left is the 6-bit rounding of
        // each scale (at most d/2 per level, 15 levels) and of each min (dmin/2).
        let bound = 15.0 * (4.0 / 63.0) / 2.0 + (7.0 / 63.0) / 2.0 + 1e-3;
        let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= bound, "max error {err} > {bound}");
    }

    #[test]
    fn q4_1_block_by_hand() {
        // x = −2 + 0.5·(j mod 16): min −2, max 5.5, d = 7.5/15 = 0.5, codes j mod 16, except
        // x[1] = −1.3 (trunc(0.7·2 + 0.5) = 1) and x[2] = −0.7 (trunc(1.3·2 + 0.5) = 3).
        let mut x: Vec<f32> = (0..32).map(|j| -2.0 + 0.5 * (j % 16) as f32).collect();
        x[1] = -1.3;
        x[2] = -0.7;
        let mut b = Vec::new();
        quantize_row_q4_1(&x, &mut b);
        assert_eq!(b.len(), Q4_1_BYTES);
        assert_eq!(&b[..2], &f16_bits(0.5));
        assert_eq!(&b[2..4], &f16_bits(-2.0));
        // byte j: element j low, element j + 16 high.
        assert_eq!(b[4], 0x00);
        assert_eq!(b[5], 0x11);
        assert_eq!(b[6], 0x23);
        assert_eq!(b[4 + 15], 0xFF);
        // A block already on a Q4_1 grid comes back exactly: the re-quantization a Q4_1-sourced
        // model (SmolLM2's GGUF) gets is lossless.
        let y = deq(GgmlType::Q4_1, &b, 32);
        let mut b2 = Vec::new();
        quantize_row_q4_1(&y, &mut b2);
        assert_eq!(b2, b);
    }

    #[test]
    fn q6_k_block_by_hand() {
        // Sub-block ib is s_ib·(4i − 32), s_ib = 0.01·(ib + 1): the extreme −32·s_ib is negative,
        // so make_qx_quants' scale is s_ib with codes 4i − 32 exactly. The largest, 0.16, sets
        // d = 0.16 / −128 and the i8 scales round(−800·s_ib) = −8·(ib + 1); the stored codes
        // are 4i (offset 32), i.e. c = 4·(l mod 16) for every element, in all four quarters.
        let x: Vec<f32> = (0..256).map(|e| 0.01 * (e / 16 + 1) as f32 * (4 * (e % 16)) as f32 - 0.01 * (e / 16 + 1) as f32 * 32.0).collect();
        let mut b = Vec::new();
        quantize_row_q6_k(&x, &mut b);
        assert_eq!(b.len(), Q6_K_BYTES);
        for ib in 0..16 {
            assert_eq!(b[192 + ib] as i8, -8 * (ib as i8 + 1), "scale {ib}");
        }
        assert!((f16_at(&b, 208) + 0.00125).abs() < 1e-6, "d = {}", f16_at(&b, 208));
        for n in 0..2 {
            for l in 0..32 {
                let c = 4 * (l % 16) as u8;
                let lo = (c & 15) | ((c & 15) << 4);
                assert_eq!(b[64 * n + l], lo, "ql[{n}][{l}]");
                assert_eq!(b[64 * n + 32 + l], lo, "ql[{n}][{}]", l + 32);
                assert_eq!(b[128 + 32 * n + l], (c >> 4) * 0x55, "qh[{n}][{l}]");
            }
        }
        // Spot values: l = 5 → c = 20: nibble 4, high bits 1 → 0x44 / 0x55; l = 15 → 60: 0xCC / 0xFF.
        assert_eq!((b[5], b[128 + 5]), (0x44, 0x55));
        assert_eq!((b[15], b[128 + 15]), (0xCC, 0xFF));
        let y = deq(GgmlType::Q6_K, &b, 256);
        for (a, v) in x.iter().zip(&y) {
            assert!((a - v).abs() < 1e-3 * 0.16 * 32.0, "{a} vs {v}");
        }
    }

    /// The error-minimizing Q4_0 is still Q4_0 (dequantized by the ordinary rule) and never
    /// worse than the reference quantizer in its own weighted error, block by block.
    #[test]
    fn q4_0_rmse_beats_reference() {
        let x = row(4096, 7);
        let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        quantize_row_q4_0(&x, &mut a);
        quantize_row_q4_0_rmse(&x, None, &mut b);
        let (ya, yb) = (deq(GgmlType::Q4_0, &a, 4096), deq(GgmlType::Q4_0, &b, 4096));
        let werr = |y: &[f32], k: usize| -> f64 {
            (32 * k..32 * k + 32).map(|i| ((sigma2 + x[i] * x[i]).sqrt() * (x[i] - y[i]).powi(2)) as f64).sum()
        };
        let (mut ta, mut tb) = (0f64, 0f64);
        for k in 0..128 {
            // f16 rounding of the chosen scale allows a hair of slack.
            assert!(werr(&yb, k) <= werr(&ya, k) * 1.001 + 1e-9, "block {k}");
            ta += werr(&ya, k);
            tb += werr(&yb, k);
        }
        assert!(tb < 0.97 * ta, "search gained too little: {tb} vs {ta}");
        // An importance of zero on a column lets the search ignore it.
        let mut imp = vec![1f32; 4096];
        imp[0] = 0.0;
        let mut c = Vec::new();
        quantize_row_q4_0_rmse(&x, Some(&imp), &mut c);
        assert_eq!(c.len(), a.len());
    }

    /// make_qx_quants' scale follows the weights. x = (−8, 3.5), 16 levels: weight on x₀ alone
    /// keeps the start scale −8/max → codes (−8, 4), scale Σwxl/Σwl² = 64/64 = 1 (x₀ exact);
    /// weight on x₁ alone gives the same codes but scale 3.5·4/16 = 0.875 (x₁ exact). No other
    /// candidate beats either strictly (for one weighted element every code gives the same
    /// Σwxl²/Σwl² = w·x²), so these are the answers, in exact binary arithmetic.
    #[test]
    fn importance_moves_the_q4_0_scale_by_hand() {
        let x = [-8.0f32, 3.5];
        let mut l = [0i8; 2];
        assert_eq!(make_qx_quants(8, &x, &mut l, Some(&[1.0, 0.0])), 1.0);
        assert_eq!(l, [0, 12]); // −8 + 8, 4 + 8
        assert_eq!(make_qx_quants(8, &x, &mut l, Some(&[0.0, 1.0])), 0.875);
        assert_eq!(l, [0, 12]);
        // Through quantize_row_q4_0_impl: a 32-block (−8, 3.5, 0, ...); importance on column 0 or
        // on column 1 (weights imp·sqrt(σ² + x²), so the other column weighs nothing). The first
        // stores d = 1 and reconstructs x₀; the second d = 0.875 and reconstructs x₁.
        let mut row = vec![0f32; 32];
        row[0] = -8.0;
        row[1] = 3.5;
        let (mut e0, mut e1) = (vec![0f32; 32], vec![0f32; 32]);
        e0[0] = 1.0;
        e1[1] = 1.0;
        let (mut b0, mut b1) = (Vec::new(), Vec::new());
        quantize_row_q4_0_rmse(&row, Some(&e0), &mut b0);
        quantize_row_q4_0_rmse(&row, Some(&e1), &mut b1);
        // Here the weight sqrt(σ² + x²) is not a power of two, so the exact ties above can fall
        // either way by a rounding: x₀'s side may pick codes −7 and d = 8/7 (f16 1.1426), which
        // reconstructs x₀ as well; what the importance decides is which column comes out exact.
        let (y0, y1) = (deq(GgmlType::Q4_0, &b0, 32), deq(GgmlType::Q4_0, &b1, 32));
        assert!((y0[0] + 8.0).abs() < 2e-3, "{:?}", &y0[..2]);
        assert!((y1[1] - 3.5).abs() < 2e-3 && (y1[0] + 8.0).abs() > 0.5, "{:?}", &y1[..2]);
        // Unit importance weighs both by sqrt(σ² + x²): x₀ dominates and the scale is neither.
        let mut bu = Vec::new();
        quantize_row_q4_0_rmse(&row, None, &mut bu);
        assert_ne!(&bu[..2], &b1[..2]);
    }

    #[test]
    fn round_trip_error_bounds() {
        let n = 4096;
        let x = row(n, 3);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
        type Quantizer = fn(&[f32], &mut Vec<u8>);
        let cases: [(GgmlType, Quantizer, f32); 6] = [
            (GgmlType::Q8_0, quantize_row_q8_0, 0.01),
            (GgmlType::Q6_K, quantize_row_q6_k, 0.03),
            (GgmlType::Q4_1, quantize_row_q4_1, 0.10),
            (GgmlType::Q5_0, quantize_row_q5_0, 0.07),
            (GgmlType::Q4_0, quantize_row_q4_0, 0.14),
            (GgmlType::Q4_K, quantize_row_q4_k, 0.10),
        ];
        for (ty, q, rel) in cases {
            let mut b = Vec::new();
            q(&x, &mut b);
            assert_eq!(b.len() as u64, ty.bytes_for(n as u64).unwrap());
            let y = deq(ty, &b, n);
            // Per block, the largest error an element can have (`bound` steps):
            // Q8_0 half a step; Q4_0/Q5_0 map the signed extreme to the lowest code, so the other
            // side has one level less and clips there by up to a whole step; Q4_K adds the
            // 6-bit rounding of its scales and mins to the half step.
            let bs = ty.block_size() as usize;
            for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (step, bound) = match ty {
                    GgmlType::Q8_0 => (amax / 127.0, 0.5),
                    GgmlType::Q5_0 => (amax / 16.0, 1.0),
                    GgmlType::Q4_0 => (amax / 8.0, 1.0),
                    // Q4_1: half of (max − min)/15 ≤ 2·amax/15 / 2; Q6_K: a sixteenth-block's
                    // half step plus its i8 scale rounding, within amax/32.
                    GgmlType::Q4_1 => (2.0 * amax / 15.0, 0.5),
                    GgmlType::Q6_K => (amax / 32.0, 1.0),
                    _ => (2.0 * amax / 15.0, 1.0),
                };
                for (a, v) in xb.iter().zip(yb) {
                    assert!((a - v).abs() <= step * bound + amax * 2e-3 + 1e-6, "{ty}: {a} vs {v} (step {step})");
                }
            }
            let e = (x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / n as f32).sqrt();
            assert!(e / rms < rel, "{ty}: rms error {} of rms {rms}", e);
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; 256];
        for q in [quantize_row_q8_0, quantize_row_q4_0, quantize_row_q5_0, quantize_row_q4_k, quantize_row_q4_1, quantize_row_q6_k] {
            let mut b = Vec::new();
            q(&x, &mut b);
            assert!(b.len() >= 34);
        }
        let mut b = Vec::new();
        quantize_row_q4_k(&x, &mut b);
        assert_eq!(deq(GgmlType::Q4_K, &b, 256), x);
    }

    #[test]
    fn activation_quantizers() {
        let x = row(512, 1);
        let mut a = vec![0u8; 16 * Q8_0_BYTES];
        quantize_act_q8_0(&x, &mut a);
        let y = deq(GgmlType::Q8_0, &a, 512);
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (u, v) in xb.iter().zip(yb) {
                assert!((u - v).abs() <= amax / 254.0 + amax * 1e-3);
            }
        }
        // Q8_1: the same codes as Q8_0 after a 4-byte head, and s = d·Σq.
        let mut a1 = vec![0u8; 16 * Q8_1_BYTES];
        quantize_act_q8_1(&x, &mut a1);
        for ((b0, b1), xb) in a.chunks(Q8_0_BYTES).zip(a1.chunks(Q8_1_BYTES)).zip(x.chunks(32)) {
            assert_eq!(&b0[..2], &b1[..2]);
            assert_eq!(&b0[2..], &b1[4..]);
            let sum: i32 = b1[4..].iter().map(|&q| q as i8 as i32).sum();
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0; // unrounded, as ggml
            assert_eq!(&b1[2..4], &f16_bits(d * sum as f32));
        }
        let mut k = vec![0u8; 2 * Q8_K_BYTES];
        quantize_act_q8_k(&x, &mut k);
        for (xb, kb) in x.chunks(256).zip(k.chunks(Q8_K_BYTES)) {
            let d = f32::from_le_bytes([kb[0], kb[1], kb[2], kb[3]]);
            for i in 0..256 {
                assert!((xb[i] - d * (kb[4 + i] as i8) as f32).abs() <= d.abs() * 0.5 + 1e-6);
            }
            for j in 0..16 {
                let s: i32 = (0..16).map(|i| kb[4 + 16 * j + i] as i8 as i32).sum();
                assert_eq!(i16::from_le_bytes([kb[260 + 2 * j], kb[261 + 2 * j]]) as i32, s);
            }
        }
    }

    #[test]
    fn q4_0x8_packing_places_each_byte_and_round_trips() {
        // Eight rows of three blocks, every byte distinct by (row, block, position).
        let nb = 3;
        let byte = |r: usize, b: usize, i: usize| (r * 61 + b * 23 + i * 7) as u8;
        let src: Vec<u8> = (0..8).flat_map(|r| (0..nb).flat_map(move |b| (0..Q4_0_BYTES).map(move |i| byte(r, b, i)))).collect();
        let mut packed = vec![0u8; src.len()];
        pack_q4_0x8(&src, nb, &mut packed);
        // By the layout's definition: column b at 144·b; scale of row r at 2r; qs[4t + k] of
        // row r at 16 + 32t + 4r + k.
        for b in 0..nb {
            let g = &packed[b * Q4_0X8_BYTES..];
            for r in 0..8 {
                assert_eq!([g[2 * r], g[2 * r + 1]], [byte(r, b, 0), byte(r, b, 1)]);
                for t in 0..4 {
                    for k in 0..4 {
                        assert_eq!(g[16 + 32 * t + 4 * r + k], byte(r, b, 2 + 4 * t + k), "b{b} r{r} t{t} k{k}");
                    }
                }
            }
        }
        let mut back = vec![0u8; src.len()];
        unpack_q4_0x8(&packed, nb, &mut back);
        assert_eq!(back, src);
    }
}
