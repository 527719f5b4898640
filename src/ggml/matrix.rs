//! A quantized weight matrix `[rows, cols]` (HF layout: one row per output feature) and its
//! product with f32 activations: activations are quantized once per call (Q8_0 or Q8_K), then
//! every output row is one dot product per token (eight or sixteen rows per pass for Q4_0,
//! Q4_1 and Q8_0, see [`QuantMatrix`]), rows spread over the team's threads. The
//! weights are never dequantized on the hot path.

use super::blocks::{self, X8Layout, Q4_0X8_ROWS, X16_ROWS, Q8_0_BYTES, Q8_K_BYTES, QK, QK_K};
use super::kernels::{Dot4Fn, DotFn, Gemm4x8Fn, Gemm8x16Fn, GemmNx16Fn, Gemv16Fn, Gemv8Fn, Kernels, PairTerm, Tile2x4Fn, Q4_0_PAIR_TERM, Q4_1_PAIR_TERM, Q8_0_PAIR_TERM};
use super::team;
use super::GgmlType;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::fmt;
use std::mem::MaybeUninit;
use std::str::FromStr;

/// The weight types linly-lora quantizes to and runs.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    /// Only in mixes: Q4_K's stand-in for rows that are not a multiple of 256 (as llama.cpp does).
    Q5_0,
    /// Only in mixes: the other stand-in for Q4_K (smaller than Q5_0; chosen per tensor when it
    /// reconstructs the tensor at least as well). Also the grid of the layers of SmolLM2's
    /// published GGUF, which a Q4_1 matrix of them reproduces exactly.
    Q4_1,
    Q4_K,
    /// Only in mixes: the token table and the more sensitive layers of `q4_k` (as Q4_K_M).
    Q6_K,
}

impl QType {
    pub fn ggml(self) -> GgmlType {
        match self {
            QType::Q8_0 => GgmlType::Q8_0,
            QType::Q4_0 => GgmlType::Q4_0,
            QType::Q5_0 => GgmlType::Q5_0,
            QType::Q4_K => GgmlType::Q4_K,
            QType::Q4_1 => GgmlType::Q4_1,
            QType::Q6_K => GgmlType::Q6_K,
        }
    }

    pub fn from_ggml(t: GgmlType) -> Option<QType> {
        Some(match t {
            GgmlType::Q8_0 => QType::Q8_0,
            GgmlType::Q4_0 => QType::Q4_0,
            GgmlType::Q5_0 => QType::Q5_0,
            GgmlType::Q4_K => QType::Q4_K,
            GgmlType::Q4_1 => QType::Q4_1,
            GgmlType::Q6_K => QType::Q6_K,
            _ => return None,
        })
    }

    pub fn block(self) -> usize {
        if self.is_k() { QK_K } else { QK }
    }

    /// Super-blocks of 256 with Q8_K activations.
    pub fn is_k(self) -> bool {
        matches!(self, QType::Q4_K | QType::Q6_K)
    }

    pub fn block_bytes(self) -> usize {
        self.ggml().type_size() as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q5_0 => "q5_0",
            QType::Q4_K => "q4_k",
            QType::Q4_1 => "q4_1",
            QType::Q6_K => "q6_k",
        }
    }

    /// The type a `cols`-long row actually gets: Q4_K rows that are not whole super-blocks
    /// fall back to Q5_0, as `llama-quantize` does; `None` when even 32 does not divide `cols`.
    pub fn for_row_length(self, cols: usize) -> Option<QType> {
        let t = if self == QType::Q4_K && !cols.is_multiple_of(QK_K) { QType::Q5_0 } else { self };
        cols.is_multiple_of(t.block()).then_some(t)
    }

    fn quantize_row(self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            QType::Q8_0 => blocks::quantize_row_q8_0(x, out),
            QType::Q4_0 => blocks::quantize_row_q4_0(x, out),
            QType::Q5_0 => blocks::quantize_row_q5_0(x, out),
            QType::Q4_K => blocks::quantize_row_q4_k(x, out),
            QType::Q4_1 => blocks::quantize_row_q4_1(x, out),
            QType::Q6_K => blocks::quantize_row_q6_k(x, out),
        }
    }

    fn dot4(self, k: &Kernels) -> Option<Dot4Fn> {
        match self {
            QType::Q8_0 => k.q8_0x4,
            QType::Q4_0 => k.q4_0x4,
            QType::Q5_0 => k.q5_0x4,
            // Q4_1 rows outside interleaved pairs are rare (a matrix's last rows % 16): one
            // token at a time.
            QType::Q4_1 => None,
            QType::Q4_K => k.q4_kx4,
            QType::Q6_K => k.q6_kx4,
        }
    }

    /// The two-rows × four-tokens kernel, for the row-major types that have one.
    fn tile(self, k: &Kernels) -> Option<Tile2x4Fn> {
        match self {
            QType::Q8_0 => k.q8_0t,
            QType::Q4_0 => k.q4_0t,
            QType::Q5_0 => k.q5_0t,
            QType::Q4_1 | QType::Q4_K | QType::Q6_K => None,
        }
    }

    /// Whether [`QuantMatrix`] keeps this type's rows in interleaved pairs of groups of eight.
    fn interleaved(self) -> bool {
        matches!(self, QType::Q4_0 | QType::Q8_0 | QType::Q4_1)
    }

    /// The kernels for interleaved groups (one token, four tokens; a group at a time, then a
    /// whole pair at a time where the set has them).
    fn x8(self, k: &Kernels) -> X8Kernels {
        match self {
            QType::Q8_0 => X8Kernels { g1: k.q8_0x8, g4: k.q8_0x8x4, p1: k.q8_0x16, p8: k.q8_0x16x8, pn: k.q8_0x16xn, term: Q8_0_PAIR_TERM },
            QType::Q4_1 => X8Kernels { g1: k.q4_1x8, g4: k.q4_1x8x4, p1: k.q4_1x16, p8: k.q4_1x16x8, pn: k.q4_1x16xn, term: Q4_1_PAIR_TERM },
            _ => X8Kernels { g1: k.q4_0x8, g4: k.q4_0x8x4, p1: k.q4_0x16, p8: k.q4_0x16x8, pn: k.q4_0x16xn, term: Q4_0_PAIR_TERM },
        }
    }

    /// How the interleaved layout holds this type's blocks ([`blocks::interleave8`]).
    fn x8_layout(self) -> X8Layout {
        match self {
            QType::Q8_0 => blocks::X8_Q8_0,
            QType::Q4_1 => blocks::X8_Q4_1,
            _ => blocks::X8_Q4_0,
        }
    }

    fn dot(self, k: &Kernels) -> DotFn {
        match self {
            QType::Q8_0 => k.q8_0,
            QType::Q4_0 => k.q4_0,
            QType::Q5_0 => k.q5_0,
            QType::Q4_K => k.q4_k,
            QType::Q4_1 => k.q4_1,
            QType::Q6_K => k.q6_k,
        }
    }

    /// The format its kernels read activations in, as llama.cpp pairs them, except Q4_1:
    /// llama.cpp gives it Q8_1 (Q8_0 plus `s = d·Σq` in f16), these kernels read Q8_0 and
    /// take `Σq` in integers, so that Q4_1 rows share the interleaved kernels' activations and
    /// their minimum term is not rounded to f16 on the way.
    fn act(self) -> Act {
        if self.is_k() { Act::Q8_K } else { Act::Q8_0 }
    }
}

/// Quantized activation formats (ggml's names). Matrices that read the same format can share one quantization
/// of their input ([`QuantMatrix::matmul_shared`]).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Q8_0,
    /// Super-blocks of 256 with an f32 scale, for the k-quants.
    Q8_K,
}

impl Act {
    fn block_bytes(self) -> usize {
        match self {
            Act::Q8_0 => Q8_0_BYTES,
            Act::Q8_K => Q8_K_BYTES,
        }
    }

    /// Bytes of one quantized row of `cols` values.
    fn row_bytes(self, cols: usize) -> usize {
        let block = if self == Act::Q8_K { QK_K } else { QK };
        cols / block * self.block_bytes()
    }

    fn quantize(self, x: &[f32], out: &mut [u8], k: &Kernels) {
        match self {
            Act::Q8_0 => (k.act_q8_0)(x, out),
            Act::Q8_K => blocks::quantize_act_q8_k(x, out),
        }
    }
}

impl FromStr for QType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => QType::Q8_0,
            "q4_0" => QType::Q4_0,
            "q4_k" => QType::Q4_K,
            "q5_0" => QType::Q5_0,
            "q4_1" => QType::Q4_1,
            "q6_k" => QType::Q6_K,
            _ => bail!("unknown quantization `{s}`: use q8_0, q4_0 or q4_k"),
        })
    }
}

impl fmt::Display for QType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantized matrix: `rows` rows of `cols` values, each row `row_bytes` of blocks.
///
/// Q4_0, Q4_1 and Q8_0 matrices keep their rows in interleaved groups of eight
/// ([`blocks::pack_q4_0x8`], [`blocks::pack_q8_0x8`], [`blocks::X8_Q4_1`]), so that one sequential pass of the GEMV
/// kernel makes eight outputs, each lane one row, with one scale product per block for eight
/// rows; the groups go in pairs whose block columns alternate ([`blocks::interleave16`]), so
/// that the AVX-512 kernels make sixteen rows from one ascending stream. The `rows % 16` rows
/// after the last pair stay row-major. A pair takes the bytes of its sixteen rows, so every
/// row outside a pair sits where it would in the row-major matrix, and the size does not
/// change. Everything that hands bytes out ([`Self::bytes`],
/// [`Self::into_bytes`]) or reads single rows gives the GGUF row-major order back. Other
/// types are stored row-major.
#[derive(Clone)]
pub struct QuantMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// Rows `0..packed` are in interleaved pairs of groups of eight
    /// ([`blocks::interleave16`]; a multiple of 16, 0 for the types stored row-major); the
    /// rest are row-major.
    packed: usize,
}

/// The kernels of one interleaved type: a group (eight rows) for one and four tokens, and a
/// whole pair (sixteen rows) where the kernel set has them.
struct X8Kernels {
    g1: Gemv8Fn,
    g4: Option<Gemm4x8Fn>,
    p1: Option<Gemv16Fn>,
    p8: Option<Gemm8x16Fn>,
    pn: Option<GemmNx16Fn>,
    /// What the pair kernels take per activation block in place of `Σq`.
    term: PairTerm,
}

impl fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuantMatrix({} [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl QuantMatrix {
    /// Quantizes a row-major f32 matrix (rows in parallel).
    pub fn quantize(ty: QType, rows: usize, cols: usize, x: &[f32]) -> Result<Self> {
        if x.len() != rows * cols {
            bail!("a {rows}×{cols} matrix needs {} values, got {}", rows * cols, x.len());
        }
        if !cols.is_multiple_of(ty.block()) {
            bail!("{ty} needs rows that are a multiple of {}, got {cols}", ty.block());
        }
        let rb = cols / ty.block() * ty.block_bytes();
        let mut data = vec![0u8; rows * rb];
        data.par_chunks_mut(rb).zip(x.par_chunks(cols)).for_each_init(
            || Vec::with_capacity(rb),
            |buf, (out, row)| {
                buf.clear();
                ty.quantize_row(row, buf);
                out.copy_from_slice(buf);
            },
        );
        Ok(QuantMatrix::new(ty, rows, cols, data))
    }

    /// `x` in `ty` if that reproduces every value bit for bit, `None` otherwise. Weights
    /// dequantized from Q4_1 are held exactly in Q4_1: each block's values are `d·q + m` with
    /// codes 0..15 that reach 0 and 15, so min/max quantization finds the same `d` and `m`.
    /// Costs a quantization and a dequantization.
    pub fn quantize_exact(ty: QType, rows: usize, cols: usize, x: &[f32]) -> Option<Self> {
        let q = Self::quantize(ty, rows, cols, x).ok()?;
        let back = q.dequantize();
        back.iter().zip(x).all(|(a, b)| a.to_bits() == b.to_bits()).then_some(q)
    }

    /// Q4_0 by ggml's error-minimizing search ([`blocks::quantize_row_q4_0_rmse`]); `imp` is a
    /// per-column importance (`cols` values, e.g. mean squared activations), or unit.
    pub fn quantize_q4_0_rmse(rows: usize, cols: usize, x: &[f32], imp: Option<&[f32]>) -> Result<Self> {
        if x.len() != rows * cols || !cols.is_multiple_of(QK) || imp.is_some_and(|w| w.len() != cols) {
            bail!("a {rows}×{cols} Q4_0 matrix needs {} values and rows of whole 32-blocks", rows * cols);
        }
        let rb = cols / QK * QType::Q4_0.block_bytes();
        let mut data = vec![0u8; rows * rb];
        data.par_chunks_mut(rb).zip(x.par_chunks(cols)).for_each_init(
            || Vec::with_capacity(rb),
            |buf, (out, row)| {
                buf.clear();
                blocks::quantize_row_q4_0_rmse(row, imp, buf);
                out.copy_from_slice(buf);
            },
        );
        Ok(QuantMatrix::new(QType::Q4_0, rows, cols, data))
    }

    /// Wraps bytes already in `ty`'s encoding (e.g. from a GGUF file), checking their size.
    pub fn from_bytes(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(ty.block()) {
            bail!("{ty} needs rows that are a multiple of {}, got {cols}", ty.block());
        }
        let want = rows * (cols / ty.block()) * ty.block_bytes();
        if data.len() != want {
            bail!("a {rows}×{cols} {ty} matrix takes {want} bytes, got {}", data.len());
        }
        Ok(QuantMatrix::new(ty, rows, cols, data))
    }

    /// Wraps checked row-major bytes, interleaving Q4_0, Q4_1 and Q8_0 rows in pairs of groups of
    /// eight (in place, pairs in parallel); fewer than sixteen rows left at the end stay
    /// row-major.
    fn new(ty: QType, rows: usize, cols: usize, mut data: Vec<u8>) -> Self {
        let packed = if ty.interleaved() { rows / X16_ROWS * X16_ROWS } else { 0 };
        if packed > 0 {
            let nb = cols / QK;
            let pb = X16_ROWS * nb * ty.block_bytes();
            data[..packed / X16_ROWS * pb].par_chunks_mut(pb).for_each(|p| {
                let rows16 = p.to_vec();
                blocks::interleave16(&rows16, nb, p, ty.x8_layout());
            });
        }
        QuantMatrix { ty, rows, cols, data, packed }
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The bytes in GGUF order (row-major; borrowed unless interleaved groups must be undone).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        if self.packed == 0 {
            return Cow::Borrowed(&self.data);
        }
        Cow::Owned(self.clone().into_bytes())
    }
    /// The bytes in GGUF order (row-major), the interleaved groups undone in place.
    pub fn into_bytes(mut self) -> Vec<u8> {
        if self.packed > 0 {
            let nb = self.cols / QK;
            let rb = self.row_bytes();
            let pb = X16_ROWS * rb;
            let ty = self.ty;
            self.data[..self.packed * rb].par_chunks_mut(pb).for_each(|p| {
                let pair = p.to_vec();
                blocks::deinterleave16(&pair, nb, p, ty.x8_layout());
            });
        }
        self.data
    }
    /// Row `r` in its GGUF bytes.
    fn row(&self, r: usize) -> Cow<'_, [u8]> {
        let rb = self.row_bytes();
        if r >= self.packed {
            return Cow::Borrowed(&self.data[r * rb..(r + 1) * rb]);
        }
        // Pair p, group h of it, row j of the group; the group's columns alternate with the
        // other group's.
        let (p, h, j) = (r / X16_ROWS, r % X16_ROWS / Q4_0X8_ROWS, r % Q4_0X8_ROWS);
        let pair = &self.data[p * X16_ROWS * rb..(p + 1) * X16_ROWS * rb];
        let mut out = vec![0u8; rb];
        let bb = self.ty.block_bytes();
        for (cols, blk) in pair.chunks_exact(X16_ROWS * bb).zip(out.chunks_exact_mut(bb)) {
            blocks::deinterleave8_block(&cols[h * Q4_0X8_ROWS * bb..(h + 1) * Q4_0X8_ROWS * bb], j, blk, self.ty.x8_layout());
        }
        Cow::Owned(out)
    }
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block() * self.ty.block_bytes()
    }

    /// The whole matrix in f32 (for export and tests, not for inference).
    pub fn dequantize(&self) -> Vec<f32> {
        super::dequant::dequantize(self.ty.ggml(), &self.bytes(), self.rows * self.cols).expect("sizes checked at construction")
    }

    /// The listed rows in f32, `[ids.len(), cols]`: an embedding lookup.
    pub fn dequantize_rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            if id >= self.rows {
                bail!("row {id} is outside a matrix of {} rows", self.rows);
            }
            super::dequant::dequantize_into(self.ty.ggml(), &self.row(id), o)?;
        }
        Ok(out)
    }

    /// `x · Wᵀ` for `x` `[n, cols]` row-major: returns `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_with(x, n, Kernels::best())
    }

    /// [`Self::matmul`] with the given kernels (tests compare scalar and SIMD).
    pub fn matmul_with(&self, x: &[f32], n: usize, k: &Kernels) -> Vec<f32> {
        Self::matmul_shared_with(&[self], x, n, k).pop().expect("one matrix, one product")
    }

    /// `x · Wᵢᵀ` for several matrices that read the same input (Q/K/V, gate/up): `x` is
    /// quantized once and all their rows go out to the threads in one dispatch, instead of one
    /// quantization and one fan-out per matrix. Matrices whose activations differ (another row
    /// length or activation format) fall back to one product each.
    pub fn matmul_shared(ms: &[&QuantMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        Self::matmul_shared_with(ms, x, n, Kernels::best())
    }

    /// [`Self::matmul_shared`] with the given kernels.
    pub fn matmul_shared_with(ms: &[&QuantMatrix], x: &[f32], n: usize, k: &Kernels) -> Vec<Vec<f32>> {
        Self::products(ms, x, n, k, None)
    }

    /// [`Self::matmul_shared_with`], or with `glu` [`Self::matmul_glu`]'s one output.
    fn products(ms: &[&QuantMatrix], x: &[f32], n: usize, k: &Kernels, glu: Option<&GluFn>) -> Vec<Vec<f32>> {
        let Some(first) = ms.first() else { return Vec::new() };
        let (ty, cols) = (first.ty, first.cols);
        if ms.iter().any(|m| m.cols != cols || m.ty.act() != ty.act()) {
            return ms.iter().map(|m| m.matmul_with(x, n, k)).collect();
        }
        assert_eq!(x.len(), n * cols, "activation shape");
        let act_ty = ty.act();
        let ab = act_ty.row_bytes(cols);
        // The last product's buffer, reused: zeroing a fresh one took ~2 % of a batched decode
        // step on the calling thread. Its old bytes never show, since the quantizers write
        // every byte of every row (`activation_quantizers_write_every_byte`).
        let mut acts = ACTS.take();
        acts.resize(n * ab, 0);
        let out = Self::products_into(ms, x, n, k, glu, &mut acts, ab);
        if acts.capacity() <= ACTS_KEEP {
            ACTS.set(acts);
        }
        out
    }

    /// [`Self::products`] with the activations quantized into `acts` (`n · ab` bytes).
    #[allow(clippy::too_many_arguments)]
    fn products_into(ms: &[&QuantMatrix], x: &[f32], n: usize, k: &Kernels, glu: Option<&GluFn>, acts: &mut [u8], ab: usize) -> Vec<Vec<f32>> {
        let (first, cols) = (ms[0], ms[0].cols);
        let act_ty = first.ty.act();
        // A few rows (decoding, a batched decode step) are quantized here: handing them to
        // rayon wakes a worker for microseconds of work, once per product.
        if n >= 32 {
            acts.par_chunks_mut(ab).zip(x.par_chunks(cols)).for_each(|(a, r)| act_ty.quantize(r, a, k));
        } else {
            acts.chunks_mut(ab).zip(x.chunks(cols)).for_each(|(a, r)| act_ty.quantize(r, a, k));
        }
        let act = |t: usize| &acts[t * ab..(t + 1) * ab];
        let nb_act = ab / act_ty.block_bytes();
        // f32 copies of the Q8_0 activation scales, for the many-token and the pair
        // kernels (a Q8_K block carries its own f32 scale); one float per 32 values.
        let scales: Vec<f32> = if act_ty != Act::Q8_K {
            acts.chunks_exact(act_ty.block_bytes()).map(|b| blocks::f16_at(b, 0)).collect()
        } else {
            Vec::new()
        };
        let sc = |t: usize| if scales.is_empty() { &[][..] } else { &scales[t * nb_act..(t + 1) * nb_act] };
        // Σq per activation block, for the interleaved kernels' offsets.
        let sums: Vec<i32> = if ms.iter().any(|m| m.packed > 0) {
            let mut v = vec![0i32; acts.len() / Q8_0_BYTES];
            (k.q8_0_sums)(acts, &mut v);
            v
        } else {
            Vec::new()
        };
        let sum = |t: usize| &sums[t * nb_act..(t + 1) * nb_act];
        // The pair kernels' per-block terms (see `PairTerm`), one array for each kind among
        // the matrices.
        let mut terms: Vec<(PairTerm, Vec<i32>)> = Vec::new();
        for m in ms.iter().filter(|m| m.packed > 0) {
            let f = m.ty.x8(k).term;
            if !terms.iter().any(|(g, _)| *g == f) {
                terms.push((f, sums.iter().zip(&scales).map(|(&s, &d)| f.of(s, d)).collect()));
            }
        }
        // Tokens per block: their quantized activations (≈ 20 KB for 576-wide rows) stay in L1/L2.
        const TB: usize = 32;
        // Enough tasks per thread to balance, few enough that dispatch stays cheap; when a task
        // passes over several token blocks, also few enough rows that its weights stay in L2
        // meanwhile. Not for one block (decode, a batched decode step, a short prompt chunk):
        // there 64-row tasks made a Q4_0 product of 8 or 16 tokens 14–22 % slower than a
        // quarter of a thread's rows each (BENCHMARKS.md, "Where the serving ratio goes").
        // (A gated product's task makes its rows of both matrices: its rows count once.)
        let total: usize = if glu.is_some() { first.rows } else { ms.iter().map(|m| m.rows).sum() };
        let threads = rayon::current_num_threads();
        let mut per_task = total.div_ceil(threads * 4).max(4);
        if n > TB {
            per_task = per_task.min(64);
        }
        // Whole pairs of groups, so that every task starts on an interleaved pair.
        let per_task = per_task.next_multiple_of(X16_ROWS);
        // The outputs are [n, rows]; a task owns rows r0..r0 + count of one matrix, i.e. one
        // slice of each token's output row. The interleaved kernels make eight or sixteen rows
        // of one token, which go straight there; the row-major ones make each row's tokens side by
        // side, so those rows are computed as [rows, n] and scattered at the end: a
        // transposition inside L1/L2 instead of one over the whole output (the LM head's is
        // 25 MB for a 128-token prompt, and took 8–10 % of the prompt's time).
        // Left uninitialised: every value is written once by the task that owns its rows, and
        // zeroing them first took ~0.7 ms of an eight-sequence decode step in a profile (~6 MB
        // of outputs, on the calling thread while the helpers waited).
        // (matrix, first row, row count, its slice of each token's output)
        type Task<'a> = (usize, usize, usize, Vec<&'a mut [MaybeUninit<f32>]>);
        let body = |(mi, r0, count, mut dst): Task| {
            let m = ms[mi];
            let (dot, dot4, tile, rb, nb) = (m.ty.dot(k), m.ty.dot4(k), m.ty.tile(k), m.row_bytes(), m.cols / m.ty.block());
            let x8 = m.ty.x8(k);
            let row = |r: usize| &m.data[r * rb..(r + 1) * rb];
            let pair_terms: &[i32] = terms.iter().find(|(f, _)| *f == x8.term).map_or(&[], |(_, v)| v);
            let term = |t: usize| &pair_terms[t * nb_act..(t + 1) * nb_act];
            // Rows r0..r1 of this task in interleaved pairs, eight or sixteen outputs per pass,
            // written straight into each token's output row (consecutive values); the rest one
            // row at a time into `o`, `[rows, n]`, scattered at the end.
            let r1 = m.packed.clamp(r0, r0 + count);
            debug_assert!(r1 == r0 || r0.is_multiple_of(X16_ROWS), "tasks start on a pair");
            let ng = r1 - r0;
            // Whole pairs: the pair loops below write every row of `0..ng`, which the final
            // `assume_init` relies on.
            assert!(ng.is_multiple_of(X16_ROWS), "a task's interleaved rows are whole pairs");
            // Each token's slice: the pairs' outputs first, then the row-major rows'.
            // (No allocation when every row is in pairs, as in all of SmolLM2's products.)
            let mut rest: Vec<&mut [MaybeUninit<f32>]> = if count > ng { Vec::with_capacity(n) } else { Vec::new() };
            for d in dst.iter_mut() {
                let (g, r) = std::mem::take(d).split_at_mut(ng);
                *d = g;
                if count > ng {
                    rest.push(r);
                }
            }
            let mut local = vec![0f32; (count - ng) * n];
            let o: &mut [f32] = &mut local;
            for t0 in (0..n).step_by(TB) {
                let t1 = (t0 + TB).min(n);
                // A pair (sixteen rows, one stream) at a time: through the pair kernels where
                // the set has them, else group by group with the groups' columns two apart.
                let bb = m.ty.block_bytes();
                // The pair kernels' arguments for this block's tokens, made once for all the
                // task's pairs and handed over as references. Made per pair and passed by value
                // (three arrays of eight slices per call), they were ~2.4 % of an eight-sequence
                // decode step's profile samples.
                let mut aa: [&[u8]; TB] = [&[]; TB];
                let mut ss: [&[i32]; TB] = [&[]; TB];
                let mut dd: [&[f32]; TB] = [&[]; TB];
                if ng > 0 && x8.p1.is_some() {
                    for t in t0..t1 {
                        (aa[t - t0], ss[t - t0], dd[t - t0]) = (act(t), term(t), sc(t));
                    }
                }
                for pi in 0..ng / X16_ROWS {
                    let (r, j0) = (r0 + pi * X16_ROWS, pi * X16_ROWS);
                    let w = &m.data[r * rb..(r + X16_ROWS) * rb];
                    if let (Some(p1), Some(p8), Some(pn)) = (x8.p1, x8.p8, x8.pn) {
                        let mut t = t0;
                        while t + 8 <= t1 {
                            let k = t - t0..t - t0 + 8;
                            let y = p8(w, arr(&aa[k.clone()]), arr(&ss[k.clone()]), arr(&dd[k]), nb);
                            for (u, yu) in y.iter().enumerate() {
                                put(&mut dst[t + u][j0..j0 + X16_ROWS], yu);
                            }
                            t += 8;
                        }
                        // The rest in one pass: a lone token (one sequence decoding) through the
                        // one-token kernel as it is, two to seven through the any-count one.
                        if t + 1 == t1 {
                            put(&mut dst[t][j0..j0 + X16_ROWS], &p1(w, act(t), term(t), sc(t), nb));
                        } else if t < t1 {
                            let k = t - t0..t1 - t0;
                            let mut y = [[0f32; X16_ROWS]; 8];
                            pn(w, &aa[k.clone()], &ss[k.clone()], &dd[k], nb, &mut y);
                            for (u, yu) in y[..t1 - t].iter().enumerate() {
                                put(&mut dst[t + u][j0..j0 + X16_ROWS], yu);
                            }
                        }
                        continue;
                    }
                    let stride = X16_ROWS * bb;
                    for h in 0..2 {
                        let (w, j0) = (&w[h * Q4_0X8_ROWS * bb..], j0 + h * Q4_0X8_ROWS);
                        let mut t = t0;
                        if let Some(g4) = x8.g4 {
                            while t + 4 <= t1 {
                                let y = g4(w, stride, [act(t), act(t + 1), act(t + 2), act(t + 3)], [sum(t), sum(t + 1), sum(t + 2), sum(t + 3)], nb);
                                for (u, yu) in y.iter().enumerate() {
                                    put(&mut dst[t + u][j0..j0 + Q4_0X8_ROWS], yu);
                                }
                                t += 4;
                            }
                        }
                        for (u, d) in dst.iter_mut().enumerate().take(t1).skip(t) {
                            put(&mut d[j0..j0 + Q4_0X8_ROWS], &(x8.g1)(w, stride, act(u), sum(u), nb));
                        }
                    }
                }
                // Row-major rows two at a time through the tile kernel, four tokens per pass;
                // the rows and tokens left over one at a time.
                let mut i0 = 0;
                if let (Some(t2), true) = (tile, n >= 4) {
                    while i0 + 2 <= o.len() / n {
                        let w = [row(r1 + i0), row(r1 + i0 + 1)];
                        let mut t = t0;
                        while t + 4 <= t1 {
                            let y = t2(w, [act(t), act(t + 1), act(t + 2), act(t + 3)], [sc(t), sc(t + 1), sc(t + 2), sc(t + 3)], nb);
                            for (j, yj) in y.iter().enumerate() {
                                o[(i0 + j) * n + t..(i0 + j) * n + t + 4].copy_from_slice(yj);
                            }
                            t += 4;
                        }
                        for u in t..t1 {
                            for (j, wj) in w.iter().enumerate() {
                                o[(i0 + j) * n + u] = dot(wj, act(u), nb);
                            }
                        }
                        i0 += 2;
                    }
                }
                for (i, orow) in o.chunks_exact_mut(n).enumerate().skip(i0) {
                    let w = row(r1 + i);
                    let mut t = t0;
                    if let (Some(d4), true) = (dot4, n >= 4) {
                        while t + 4 <= t1 {
                            let a = [act(t), act(t + 1), act(t + 2), act(t + 3)];
                            orow[t..t + 4].copy_from_slice(&d4(w, a, [sc(t), sc(t + 1), sc(t + 2), sc(t + 3)], nb));
                            t += 4;
                        }
                    }
                    for (u, y) in orow.iter_mut().enumerate().take(t1).skip(t) {
                        *y = dot(w, act(u), nb);
                    }
                }
            }
            // Token-major, so that the writes run along one output row (the tokens' rows lie
            // 4·rows bytes apart: one page each for the LM head).
            for (t, d) in rest.iter_mut().enumerate() {
                for (i, v) in d.iter_mut().enumerate() {
                    v.write(local[i * n + t]);
                }
            }
        };
        if let Some(f) = glu {
            // One output: each task makes its rows of both matrices, then `f` of the two.
            let mut out = uninit(first.rows * n);
            team::for_each(threads, row_tasks(&mut out, first.rows, per_task), |(r0, count, dst)| {
                let (mut g, mut u) = (uninit(count * n), uninit(count * n));
                body((0, r0, count, g.chunks_mut(count).collect()));
                body((1, r0, count, u.chunks_mut(count).collect()));
                // SAFETY: `body` writes every row of its task for every token (see below).
                let (g, u) = unsafe { (assume_init(g), assume_init(u)) };
                let mut h = vec![0f32; count];
                for (t, d) in dst.into_iter().enumerate() {
                    f(&mut h, &g[t * count..(t + 1) * count], &u[t * count..(t + 1) * count]);
                    put(d, &h);
                }
            });
            // SAFETY: the tasks split the rows, and each wrote its rows of every token.
            return vec![unsafe { assume_init(out) }];
        }
        let mut outs: Vec<Vec<MaybeUninit<f32>>> = ms.iter().map(|m| uninit(m.rows * n)).collect();
        let mut tasks: Vec<Task> = Vec::new();
        for (mi, o) in outs.iter_mut().enumerate() {
            tasks.extend(row_tasks(o, ms[mi].rows, per_task).into_iter().map(|(r0, count, dst)| (mi, r0, count, dst)));
        }
        // The spinning team (see `team`), or rayon when another thread is using it.
        team::for_each(threads, tasks, body);
        // SAFETY: the tasks split every matrix's rows among them, and a task writes its rows of
        // every token: the pairs `r0..r1` through `put` (`r1 − r0` is whole pairs, since tasks
        // start on a pair and `packed` ends on one), the rest through `local`'s scatter.
        outs.into_iter().map(|v| unsafe { assume_init(v) }).collect()
    }

    /// `f(x·Aᵀ, x·Bᵀ)` for two matrices of the same shape that read the same input (gate and
    /// up): each task makes its rows of both and applies `f` (element-wise, on one token's
    /// slice of each) before writing the one output `[n, rows]`, so a gated feed-forward takes
    /// one dispatch and never stores the two halves whole. `None` where the two do not pair
    /// (another shape or activation format).
    pub fn matmul_glu(a: &QuantMatrix, b: &QuantMatrix, x: &[f32], n: usize, f: &GluFn) -> Option<Vec<f32>> {
        (a.rows == b.rows && a.cols == b.cols && a.ty.act() == b.ty.act()).then(|| Self::products(&[a, b], x, n, Kernels::best(), Some(f)).pop().expect("one output"))
    }

    /// Moves whole rows: output row `i` is input row `perm[i]`. Rows are independent blocks,
    /// so this is how llama.cpp's Q/K row order is undone without dequantizing.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Self> {
        if perm.len() != self.rows {
            bail!("row permutation of length {} for {} rows", perm.len(), self.rows);
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &p in perm {
            if p >= self.rows {
                bail!("row permutation index {p} out of range");
            }
            data.extend_from_slice(&self.row(p));
        }
        Ok(QuantMatrix::new(self.ty, self.rows, self.cols, data))
    }
}

/// An element-wise combination of two products (a gate and its input): `out[i] = f(a[i], b[i])`.
pub type GluFn = dyn Fn(&mut [f32], &[f32], &[f32]) + Sync;

thread_local! {
    /// The quantized activations of this thread's last product, kept for the next one.
    static ACTS: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest activation buffer a thread keeps between products (a 512-token prompt chunk of
/// 1,536-wide rows needs 0.8 MB).
const ACTS_KEEP: usize = 1 << 20;

/// A task's rows of an output: its first row, row count and its slice of every token's row.
type RowTask<'a> = (usize, usize, Vec<&'a mut [MaybeUninit<f32>]>);

/// `out` (`[n, rows]`, token-major) cut into tasks of `per` rows.
fn row_tasks(out: &mut [MaybeUninit<f32>], rows: usize, per: usize) -> Vec<RowTask<'_>> {
    let mut tasks: Vec<RowTask> = Vec::new();
    for (t, ot) in out.chunks_mut(rows).enumerate() {
        for (c, oc) in ot.chunks_mut(per).enumerate() {
            if t == 0 {
                tasks.push((c * per, oc.len(), Vec::new()));
            }
            tasks[c].2.push(oc);
        }
    }
    tasks
}

/// `len` values to be written before they are read.
fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// A slice of known length as an array reference.
#[inline]
fn arr<T, const N: usize>(s: &[T]) -> &[T; N] {
    s.try_into().expect("a run of whole tokens")
}

/// Writes `src` over the start of `dst`.
#[inline]
fn put(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// The values of `v`, every one of them written.
///
/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout and length; the caller vouches for the contents.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

#[cfg(test)]
#[path = "matrix_tests.rs"]
mod tests;
