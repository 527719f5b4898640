//! The LLaMA architecture: one definition used by training, merge checks and inference alike.
//!
//! Tensors carry their backend in their device (burn 0.22), so the same module runs on flex
//! (CPU) and libtorch (GPU), in f32, f16 or bf16, with or without autodiff. LoRA branches and
//! trainable new vocabulary rows are parts of this same module (see [`linear::Linear`] and
//! [`embedding::TokenTable`]); there is no second model for training.

pub mod attention;
pub mod cache;
pub mod embedding;
pub mod gguf_weights;
pub mod linear;
pub mod load;
pub mod lora_branch;
pub mod mlp;
pub mod norm;
pub mod rope;

use crate::config::LlamaConfig;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

pub use attention::{Attention, Positions};
pub use cache::{KvCache, KvType};
pub use embedding::TokenTable;
pub use linear::Linear;
pub use lora_branch::LoraBranch;
pub use mlp::Mlp;
pub use norm::RmsNorm;

/// One transformer block: pre-norm attention and pre-norm SwiGLU MLP, both residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The seven projections in PEFT's target order, with their paths inside the layer. The one
    /// place that lists them: adapters, injection and the optimizer all walk this.
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    pub fn forward(&self, x: Tensor<3>, rope: &rope::RopeTables, cache: Option<&mut cache::LayerCache>) -> Tensor<3> {
        self.forward_at(x, Positions::One(rope, cache))
    }

    /// [`Self::forward`] with the rows placed by `pos` (see [`Positions`]).
    pub fn forward_at(&self, x: Tensor<3>, pos: Positions<'_>) -> Tensor<3> {
        let h = x.clone() + self.self_attn.forward_at(self.input_layernorm.forward(x), pos);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: TokenTable,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<TokenTable>,
    #[module(skip)]
    pub config: LlamaConfig,
    /// Activation dtype; frozen weights are stored in it, trainable masters stay f32.
    #[module(skip)]
    pub dtype: crate::io::safetensors::FloatType,
}

impl Llama {
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.rows()
    }

    /// Final hidden states `[B, T, hidden]` for `ids` `[B, T]`. With a cache, positions continue
    /// after what the cache holds and the new keys/values are appended to it.
    pub fn hidden(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.hidden_from_embeddings(self.embed_tokens.embed(ids), cache)
    }

    /// [`Self::hidden`] from already embedded tokens `[B, T, hidden]`. A caller that detaches
    /// them (a teacher pass with every branch off) gets a forward that records no graph.
    pub fn hidden_from_embeddings(&self, x: Tensor<3>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.hidden_tapped(x, cache, None).0
    }

    /// [`Self::hidden_from_embeddings`] that also returns the residual stream after the first
    /// `tap` layers (`1..=num_layers`; before the final norm), where the hidden-state
    /// distillation term compares the model with the base (`[[data]] hidden_distill`).
    pub fn hidden_tapped(&self, x: Tensor<3>, mut cache: Option<&mut KvCache>, tap: Option<usize>) -> (Tensor<3>, Option<Tensor<3>>) {
        let [_, t, _] = x.dims();
        let start = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut x = x.cast(self.dtype.burn_float());
        let rope = rope::RopeTables::new(&self.config, start, t, &x.device(), x.dtype());
        let mut tapped = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| c.layer(i));
            x = layer.forward(x, &rope, lc);
            if tap == Some(i + 1) {
                tapped = Some(x.clone());
            }
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        (self.norm.forward(x), tapped)
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).project(hidden)
    }

    /// Logits `[B, T, vocab]` for `ids` `[B, T]`.
    pub fn forward(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.hidden(ids, cache))
    }

    /// Logits of the last position only, `[B, 1, vocab]`: what generation needs after reading a
    /// prompt. The LM head is about a fifth of a small model's multiply-adds per position, so a
    /// prompt costs that much less than with [`Self::forward`] (and `llama-bench`'s `pp` is
    /// measured this way too).
    pub fn forward_last(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let h = self.hidden(ids, cache);
        let [b, t, d] = h.dims();
        self.logits(h.slice([0..b, t - 1..t, 0..d]))
    }

    /// One forward pass over several sequences at once, each continuing its own cache at its
    /// own position: `seqs[i].ids` are fed to sequence `i` (at least one id each). Their rows
    /// go through every projection together, one product per weight for the whole batch;
    /// attention runs per sequence over its own cache. Returns the logits `[1, S, vocab]` of
    /// the last fed position of each sequence that asks for them (`logits`), in order, or
    /// `None` when none does.
    ///
    /// Every operation on the shared rows (embedding, RMSNorm, the projections, SwiGLU, the
    /// residual adds, the LM head) computes each row on its own, so with the quantized kernels
    /// a sequence gets bit for bit what [`Self::forward`] gives it alone (`generate`), whatever
    /// else is in the batch. Dense f32 projections go through the `gemm` crate, whose
    /// summation order depends on the number of rows: there a batched row may differ from
    /// the solo one in the last bits.
    pub fn forward_batch(&self, seqs: &mut [BatchSeq<'_>], device: &Device) -> Option<Tensor<3>> {
        assert!(seqs.iter().all(|s| !s.ids.is_empty()), "every sequence of a batch feeds at least one id");
        let all: Vec<i64> = seqs.iter().flat_map(|s| s.ids.iter().map(|&i| i as i64)).collect();
        let n = all.len();
        let mut x = self.embed_tokens.embed(Tensor::from_data(TensorData::new(all, [1, n]), device)).cast(self.dtype.burn_float());
        let ropes: Vec<rope::RopeTables> = seqs.iter().map(|s| rope::RopeTables::new(&self.config, s.cache.len(), s.ids.len(), &x.device(), x.dtype())).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let segs = seqs.iter_mut().zip(&ropes).map(|(s, r)| (s.ids.len(), r, s.cache.layer(i))).collect();
            x = layer.forward_at(x, Positions::Ragged(segs));
        }
        let mut last = Vec::new();
        let mut off = 0;
        for s in seqs.iter_mut() {
            s.cache.advance(s.ids.len());
            off += s.ids.len();
            if s.logits {
                last.push(off as i64 - 1);
            }
        }
        if last.is_empty() {
            return None;
        }
        let k = last.len();
        let x = x.select(1, Tensor::<1, Int>::from_data(TensorData::new(last, [k]), device));
        Some(self.logits(self.norm.forward(x)))
    }

    /// An empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers, self.config.max_position_embeddings)
    }

    /// An empty cache whose host form stores `ty` (see [`KvType`]).
    pub fn new_cache_of(&self, ty: KvType) -> KvCache {
        KvCache::of(ty, self.config.num_layers, self.config.max_position_embeddings)
    }
}

/// One sequence of [`Llama::forward_batch`].
pub struct BatchSeq<'a> {
    /// The ids fed now, continuing after what `cache` holds.
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether the logits of the last fed position are wanted (a prompt fed in chunks needs
    /// none until its last chunk).
    pub logits: bool,
}
