//! Which GGUF type each 2-D weight gets for a quantized export: llama.cpp's choices
//! (`llama_tensor_get_type` in llama-quant.cpp), so that `q4_0` and `q4_k` mean what
//! llama.cpp users know as Q4_0 and Q4_K_M:
//!
//! * the LM head (the token table when it is tied) in Q6_K, or Q8_0 when its rows are not
//!   whole 256-blocks (576 for SmolLM2), for every 4-bit format;
//! * `q4_k` (Q4_K_M): `attn_v` and `ffn_down` in Q6_K in the first and last eighth of the layers
//!   and every third layer between (`use_more_bits`), Q4_K elsewhere;
//! * `q4_0` with an importance matrix: `ffn_down` in Q4_1 in the first eighth of the layers
//!   (llama.cpp's "guard against craziness in the first few ffn_down layers", which it applies
//!   only with an imatrix so that a plain Q4_0 stays what it always was);
//! * rows that are not whole 256-blocks cannot hold a k-quant: Q6_K falls back to Q8_0 and
//!   Q4_K to Q5_0 (llama.cpp) or Q4_1, whichever reconstructs the tensor better (Q4_1 is
//!   5.0 bits/weight against Q5_0's 5.5 and wins ties; on a source that already lies on a Q4_1
//!   grid, like SmolLM2's GGUF, it is exact).
//!
//! `pure` (llama-quantize's `--pure`) turns the mix off: every weight in the format, with the
//! Q5_0 fallback only.

use crate::ggml::QType;

/// The role of a 2-D weight, from its GGUF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    TokenTable { tied: bool },
    Output,
    AttnV,
    FfnDown,
    Other,
}

impl Role {
    /// From a GGUF tensor name (`token_embd.weight`, `blk.N.attn_v.weight`, ...).
    pub fn of(gguf_name: &str, tied: bool) -> Role {
        match gguf_name {
            "token_embd.weight" => Role::TokenTable { tied },
            "output.weight" => Role::Output,
            n if n.ends_with(".attn_v.weight") => Role::AttnV,
            n if n.ends_with(".ffn_down.weight") => Role::FfnDown,
            _ => Role::Other,
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// in between get more bits in the `_M` mixes.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (l, n) = (layer as i64, n_layers as i64);
    l < n / 8 || l >= 7 * n / 8 || (l - n / 8).rem_euclid(3) == 2
}

/// The types a weight may take, best first: one, or two when the choice is made by
/// reconstruction error (the caller measures both and keeps the first on a tie). `None`: no
/// quantized type fits the row length (the caller stores F16).
pub fn candidates(format: QType, pure: bool, imatrix: bool, role: Role, layer: usize, n_layers: usize, cols: usize) -> Option<Vec<QType>> {
    let want = if pure {
        format
    } else {
        match (format, role) {
            (QType::Q8_0, _) => QType::Q8_0,
            (_, Role::Output | Role::TokenTable { tied: true }) => QType::Q6_K,
            (QType::Q4_K, Role::AttnV | Role::FfnDown) if use_more_bits(layer, n_layers) => QType::Q6_K,
            (QType::Q4_0, Role::FfnDown) if imatrix && layer < n_layers / 8 => QType::Q4_1,
            (f, _) => f,
        }
    };
    let fits = |t: QType| cols.is_multiple_of(t.block());
    let list = match want {
        t if fits(t) => vec![t],
        QType::Q6_K => vec![QType::Q8_0],
        QType::Q4_K if pure => vec![QType::Q5_0],
        QType::Q4_K => vec![QType::Q4_1, QType::Q5_0],
        _ => vec![],
    };
    let list: Vec<QType> = list.into_iter().filter(|&t| fits(t)).collect();
    (!list.is_empty()).then_some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // n = 30: n/8 = 3, 7n/8 = 26; between, (i − 3) % 3 == 2 → 5, 8, ..., 23.
        let got: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(got, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        let got: Vec<usize> = (0..8).filter(|&i| use_more_bits(i, 8)).collect();
        assert_eq!(got, vec![0, 3, 6, 7]);
    }

    #[test]
    fn smollm2_mixes() {
        let c = |f, pure, role, layer, cols| candidates(f, pure, false, role, layer, 30, cols);
        let tied = Role::TokenTable { tied: true };
        // q4_k (Q4_K_M) on SmolLM2-135M's shapes: 576-wide rows cannot hold k-quants.
        assert_eq!(c(QType::Q4_K, false, tied, 0, 576), Some(vec![QType::Q8_0]));
        assert_eq!(c(QType::Q4_K, false, Role::AttnV, 0, 576), Some(vec![QType::Q8_0]));
        assert_eq!(c(QType::Q4_K, false, Role::AttnV, 3, 576), Some(vec![QType::Q4_1, QType::Q5_0]));
        assert_eq!(c(QType::Q4_K, false, Role::FfnDown, 5, 1536), Some(vec![QType::Q6_K]));
        assert_eq!(c(QType::Q4_K, false, Role::FfnDown, 4, 1536), Some(vec![QType::Q4_K]));
        assert_eq!(c(QType::Q4_K, false, Role::Other, 4, 576), Some(vec![QType::Q4_1, QType::Q5_0]));
        assert_eq!(c(QType::Q4_K, false, Role::Other, 4, 1024), Some(vec![QType::Q4_K]));
        // An untied token table keeps the format; the LM head gets Q6_K.
        assert_eq!(c(QType::Q4_K, false, Role::TokenTable { tied: false }, 0, 1024), Some(vec![QType::Q4_K]));
        assert_eq!(c(QType::Q4_K, false, Role::Output, 0, 1024), Some(vec![QType::Q6_K]));
        // q4_0: the head in Q6_K/Q8_0, the rest Q4_0.
        assert_eq!(c(QType::Q4_0, false, tied, 0, 576), Some(vec![QType::Q8_0]));
        assert_eq!(c(QType::Q4_0, false, Role::FfnDown, 0, 1536), Some(vec![QType::Q4_0]));
        // q4_0 with an importance matrix: ffn_down of layers 0..n/8 (0, 1, 2 of 30) in Q4_1,
        // as llama.cpp does; the rest unchanged.
        let with_imatrix = |role, layer| candidates(QType::Q4_0, false, true, role, layer, 30, 1536);
        let q41: Vec<usize> = (0..30).filter(|&l| with_imatrix(Role::FfnDown, l) == Some(vec![QType::Q4_1])).collect();
        assert_eq!(q41, vec![0, 1, 2]);
        assert_eq!(with_imatrix(Role::FfnDown, 3), Some(vec![QType::Q4_0]));
        assert_eq!(with_imatrix(Role::AttnV, 0), Some(vec![QType::Q4_0]));
        assert_eq!(candidates(QType::Q4_0, true, true, Role::FfnDown, 0, 30, 1536), Some(vec![QType::Q4_0]), "--pure");
        // q8_0 is Q8_0 throughout.
        assert_eq!(c(QType::Q8_0, false, tied, 0, 576), Some(vec![QType::Q8_0]));
        // --pure: the format everywhere, llama.cpp's Q5_0 fallback only.
        assert_eq!(c(QType::Q4_K, true, tied, 0, 576), Some(vec![QType::Q5_0]));
        assert_eq!(c(QType::Q4_0, true, tied, 0, 576), Some(vec![QType::Q4_0]));
        // No type fits.
        assert_eq!(c(QType::Q4_0, false, Role::Other, 0, 100), None);
        assert_eq!(Role::of("blk.3.attn_v.weight", true), Role::AttnV);
        assert_eq!(Role::of("blk.3.ffn_down.weight", true), Role::FfnDown);
        assert_eq!(Role::of("blk.3.attn_q.weight", true), Role::Other);
    }
}
