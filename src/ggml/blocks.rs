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
//! it (scale `127 / max|x|`, round half to even), also for Q4_1 (whose offset term takes the
//! block's `Σq` in integers, where llama.cpp's Q8_1 carries `d·Σq` in f16), and
//! Q8_K (`f32 d; i8 qs[256]; i16 bsums[16]`) for the k-quants.
//!
//! Besides the reference quantizers, [`quantize_row_q4_0_rmse`] is ggml's importance-weighted
//! Q4_0 (`quantize_row_q4_0_impl`: a search over 19 scales for the least weighted squared
//! error), used by `quantize` by default; its bytes are ordinary Q4_0.
//!
//! Dequantization is beside it in [`super::dequant`] (ported from ggml's reference); the tests
//! here quantize with these functions and dequantize with that one.

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

/// Rows per interleaved group ([`pack_q4_0x8`], [`pack_q8_0x8`]).
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
    interleave8(src, nb, dst, X8_Q4_0);
}

/// The inverse of [`pack_q4_0x8`]: eight row-major Q4_0 rows from one interleaved group.
pub fn unpack_q4_0x8(src: &[u8], nb: usize, dst: &mut [u8]) {
    deinterleave8(src, nb, dst, X8_Q4_0);
}

/// Bytes of one block column of an interleaved Q4_1 group ([`X8_Q4_1`]): eight blocks.
pub const Q4_1X8_BYTES: usize = Q4_0X8_ROWS * Q4_1_BYTES;

/// Bytes of one block column of an interleaved Q8_0 group ([`pack_q8_0x8`]): eight blocks.
pub const Q8_0X8_BYTES: usize = Q4_0X8_ROWS * Q8_0_BYTES;

/// Interleaves eight Q8_0 rows of `nb` blocks the way [`pack_q4_0x8`] does Q4_0 rows. Block
/// column `b` takes 272 bytes at `272·b`:
///
/// * the eight rows' f16 scales (16 bytes);
/// * eight chunks `t = 0..8` of 32 bytes, chunk `t` holding codes `qs[4t..4t+4]` of rows 0..7
///   in order, each stored as `q ^ 0x80` (= `q + 128` read as an unsigned byte).
///
/// The offset makes the weights the unsigned operand of `vpdpbusd` (the activations are
/// signed), so a lane sums `Σ (q_w + 128)·q_a` and the kernel takes `128·Σq_a` off once per
/// block, as the Q4_0 kernels take `8·Σq_a`. [`unpack_q8_0x8`] undoes the XOR, so the GGUF
/// bytes come back exactly.
pub fn pack_q8_0x8(src: &[u8], nb: usize, dst: &mut [u8]) {
    interleave8(src, nb, dst, X8_Q8_0);
}

/// The inverse of [`pack_q8_0x8`]: eight row-major Q8_0 rows from one interleaved group.
pub fn unpack_q8_0x8(src: &[u8], nb: usize, dst: &mut [u8]) {
    deinterleave8(src, nb, dst, X8_Q8_0);
}

/// How one type's blocks lie in an interleaved group: `block` bytes a block, of which the first
/// `fields` f16 values are per-block numbers (Q4_0, Q8_0: the scale `d`; Q4_1: `d` and the
/// minimum `m`) and the rest are codes, XORed with `xor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X8Layout {
    pub block: usize,
    pub fields: usize,
    pub xor: u8,
}

impl X8Layout {
    /// Where the codes of a block column start: after each field's eight values.
    pub const fn codes_at(self) -> usize {
        16 * self.fields
    }
}

pub const X8_Q4_0: X8Layout = X8Layout { block: Q4_0_BYTES, fields: 1, xor: 0 };
pub const X8_Q8_0: X8Layout = X8Layout { block: Q8_0_BYTES, fields: 1, xor: 0x80 };
/// Q4_1 keeps its codes (0..15, as Q4_0's) and leads each column with the eight scales, then
/// the eight minimums ([`super::kernels`]' Q4_1 group kernels load each as one F16C vector).
pub const X8_Q4_1: X8Layout = X8Layout { block: Q4_1_BYTES, fields: 2, xor: 0 };

/// The layout the interleaved formats share: eight rows of `nb` blocks, block column `b` at
/// `8·block·b` holding each field's eight values in row order (16 bytes a field), then 32-byte
/// chunks, chunk `t` holding code bytes `4t..4t+4` of rows 0..7 in order, each XORed with `xor`.
pub fn interleave8(src: &[u8], nb: usize, dst: &mut [u8], l: X8Layout) {
    let (bb, head) = (l.block, 2 * l.fields);
    let rb = nb * bb;
    assert!(src.len() == Q4_0X8_ROWS * rb && dst.len() == src.len(), "eight rows of {nb} blocks of {bb} bytes");
    for (b, out) in dst.chunks_exact_mut(Q4_0X8_ROWS * bb).enumerate() {
        for r in 0..Q4_0X8_ROWS {
            let blk = &src[r * rb + b * bb..r * rb + (b + 1) * bb];
            for f in 0..l.fields {
                out[16 * f + 2 * r..16 * f + 2 * r + 2].copy_from_slice(&blk[2 * f..2 * f + 2]);
            }
            for t in 0..(bb - head) / 4 {
                for k in 0..4 {
                    out[l.codes_at() + 32 * t + 4 * r + k] = blk[head + 4 * t + k] ^ l.xor;
                }
            }
        }
    }
}

/// Rows per interleaved unit of a [`super::QuantMatrix`]: two groups of eight.
pub const X16_ROWS: usize = 2 * Q4_0X8_ROWS;

/// Sixteen row-major rows as two [`interleave8`] groups whose block columns alternate: column
/// `b` of group `h` (rows `8h..8h + 8`) at `(2b + h)·8·bb`, i.e. each group's columns `2·8·bb`
/// apart. A kernel that reads both groups together (sixteen rows per pass) then reads one
/// ascending stream; reading two groups kept one after the other side by side was slower from
/// memory than reading them one at a time (BENCHMARKS.md, "Where a batched decode step goes").
pub fn interleave16(src: &[u8], nb: usize, dst: &mut [u8], l: X8Layout) {
    let (rb, cb) = (nb * l.block, Q4_0X8_ROWS * l.block);
    assert!(src.len() == X16_ROWS * rb && dst.len() == src.len(), "sixteen rows of {nb} blocks of {} bytes", l.block);
    let mut group = vec![0u8; Q4_0X8_ROWS * rb];
    for h in 0..2 {
        interleave8(&src[h * Q4_0X8_ROWS * rb..(h + 1) * Q4_0X8_ROWS * rb], nb, &mut group, l);
        for (b, col) in group.chunks_exact(cb).enumerate() {
            dst[(2 * b + h) * cb..(2 * b + h + 1) * cb].copy_from_slice(col);
        }
    }
}

/// The inverse of [`interleave16`].
pub fn deinterleave16(src: &[u8], nb: usize, dst: &mut [u8], l: X8Layout) {
    let (rb, cb) = (nb * l.block, Q4_0X8_ROWS * l.block);
    assert!(src.len() == X16_ROWS * rb && dst.len() == src.len(), "sixteen rows of {nb} blocks of {} bytes", l.block);
    let mut group = vec![0u8; Q4_0X8_ROWS * rb];
    for h in 0..2 {
        for (b, col) in group.chunks_exact_mut(cb).enumerate() {
            col.copy_from_slice(&src[(2 * b + h) * cb..(2 * b + h + 1) * cb]);
        }
        deinterleave8(&group, nb, &mut dst[h * Q4_0X8_ROWS * rb..(h + 1) * Q4_0X8_ROWS * rb], l);
    }
}

/// The inverse of [`interleave8`].
pub fn deinterleave8(src: &[u8], nb: usize, dst: &mut [u8], l: X8Layout) {
    let bb = l.block;
    let rb = nb * bb;
    assert!(src.len() == Q4_0X8_ROWS * rb && dst.len() == src.len(), "eight rows of {nb} blocks of {bb} bytes");
    for (b, g) in src.chunks_exact(Q4_0X8_ROWS * bb).enumerate() {
        for r in 0..Q4_0X8_ROWS {
            deinterleave8_block(g, r, &mut dst[r * rb + b * bb..r * rb + (b + 1) * bb], l);
        }
    }
}

/// Row `r`'s block out of one interleaved block column `g`.
pub fn deinterleave8_block(g: &[u8], r: usize, blk: &mut [u8], l: X8Layout) {
    let head = 2 * l.fields;
    for f in 0..l.fields {
        blk[2 * f..2 * f + 2].copy_from_slice(&g[16 * f + 2 * r..16 * f + 2 * r + 2]);
    }
    for t in 0..(l.block - head) / 4 {
        for k in 0..4 {
            blk[head + 4 * t + k] = g[l.codes_at() + 32 * t + 4 * r + k] ^ l.xor;
        }
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

/// The 6-bit scale and min of sub-block `j` from the 12 packed bytes of Q4_K/Q5_K
/// (`get_scale_min_k4`).
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
#[path = "blocks_tests.rs"]
mod tests;
