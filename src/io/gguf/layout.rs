//! Where GGUF and HF disagree about LLaMA weights: tensor names, and the row order of the Q and
//! K projections.
//!
//! llama.cpp's `convert_hf_to_gguf.py` stores `q_proj`/`k_proj` with the rows of each head
//! interleaved (its `permute`): HF's rotary embedding rotates the two *halves* of a head
//! (`rotate_half`), ggml's rotates adjacent *pairs*, and permuting the rows makes the two agree.
//! Importing must undo it ([`unpermute_qk_rows`]); exporting must redo it ([`permute_qk_rows`]).

use anyhow::{bail, Result};

/// Per-layer GGUF suffix → HF module path inside `model.layers.N.`.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Whole-model GGUF name → HF name.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A GGUF tensor name understood as a LLaMA weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaTensorName {
    /// The HF (`LlamaForCausalLM`) name.
    pub hf_name: String,
    /// The layer index for `blk.N.*` tensors.
    pub layer: Option<usize>,
    /// The GGUF per-layer suffix (`attn_q`, `ffn_down`, ...) or the global name.
    pub kind: &'static str,
}

/// Maps a GGUF LLaMA tensor name to its HF name, or `None` for names that are not LLaMA weights.
pub fn gguf_to_hf_name(name: &str) -> Option<LlamaTensorName> {
    if let Some(&(g, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some(LlamaTensorName { hf_name: hf.to_string(), layer: None, kind: g });
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Reject "+1", "01" and the like so that names map one-to-one.
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let suffix = rest.strip_suffix(".weight")?;
    let &(kind, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(LlamaTensorName { hf_name: format!("model.layers.{layer}.{hf}.weight"), layer: Some(layer), kind })
}

/// Maps an HF LLaMA tensor name to its GGUF name (the inverse of [`gguf_to_hf_name`]).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, hf)| *hf == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let module = rest.strip_suffix(".weight")?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

fn check_heads(rows: usize, cols: usize, n_head: usize, len: usize) -> Result<usize> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot (un)permute {rows} rows over {n_head} heads: rows must be a multiple of 2 × heads");
    }
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(rows / n_head / 2),
        _ => bail!("a {rows}×{cols} matrix cannot hold {len} values"),
    }
}

/// Undoes llama.cpp's Q/K permutation on a row-major `rows × cols` matrix.
///
/// llama.cpp stores HF row `h·2·half + s·half + i` (head h, half s ∈ {0,1}, index i) at row
/// `h·2·half + 2·i + s`, i.e. `reshape(n_head, 2, half, cols).swapaxes(1, 2)`. `n_head` is the
/// number of attention heads for `attn_q` and of KV heads for `attn_k`.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    move_qk_rows(data, rows, cols, n_head, true)
}

/// Applies llama.cpp's Q/K permutation (HF layout → GGUF layout); the inverse of
/// [`unpermute_qk_rows`].
pub fn permute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    move_qk_rows(data, rows, cols, n_head, false)
}

/// Moves rows between the two layouts: GGUF row `h·2·half + 2·i + s` ↔ HF row `h·2·half + s·half + i`.
fn move_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize, to_hf: bool) -> Result<Vec<f32>> {
    let half = check_heads(rows, cols, n_head, data.len())?;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * 2 * half + s * half + i;
                let gguf_row = h * 2 * half + 2 * i + s;
                let (dst, src) = if to_hf { (hf_row, gguf_row) } else { (gguf_row, hf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
            ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
            ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
            ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
            ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
            ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ];
        for (g, hf) in cases {
            assert_eq!(gguf_to_hf_name(g).unwrap().hf_name, hf);
            assert_eq!(hf_to_gguf_name(hf).unwrap(), g);
        }
        assert_eq!(gguf_to_hf_name("blk.7.attn_q.weight").unwrap().layer, Some(7));
        for bad in [
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_q.bias",
            "blk..attn_q.weight",
            "rope_freqs.weight",
            "blk.1.ffn_gate_exps.weight",
        ] {
            assert_eq!(gguf_to_hf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn worked_example() {
        // One head of dim 4, two columns. HF rows r0..r3 = [0,1], [10,11], [20,21], [30,31].
        // llama.cpp's permute reshapes to (1 head, 2 halves, 2, cols) and swaps the middle axes,
        // so the stored order is r0, r2, r1, r3.
        let hf = [0., 1., 10., 11., 20., 21., 30., 31.];
        let gguf = [0., 1., 20., 21., 10., 11., 30., 31.];
        assert_eq!(permute_qk_rows(&hf, 4, 2, 1).unwrap(), gguf);
        assert_eq!(unpermute_qk_rows(&gguf, 4, 2, 1).unwrap(), hf);
        // Two heads of dim 4, one column: each head is permuted on its own.
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(permute_qk_rows(&hf, 8, 1, 2).unwrap(), [0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn round_trip_is_identity() {
        for (rows, cols, heads) in [(576, 3, 9), (192, 2, 3), (64, 5, 1), (8, 1, 4)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let p = permute_qk_rows(&x, rows, cols, heads).unwrap();
            if rows / heads > 2 {
                assert_ne!(p, x);
            }
            assert_eq!(unpermute_qk_rows(&p, rows, cols, heads).unwrap(), x);
            assert_eq!(
                permute_qk_rows(&unpermute_qk_rows(&x, rows, cols, heads).unwrap(), rows, cols, heads).unwrap(),
                x
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(unpermute_qk_rows(&[0.; 6], 6, 1, 2).is_err()); // 6 rows, 2 heads: odd head dim
        assert!(unpermute_qk_rows(&[0.; 8], 8, 1, 0).is_err());
        assert!(unpermute_qk_rows(&[0.; 7], 8, 1, 2).is_err());
    }
}
