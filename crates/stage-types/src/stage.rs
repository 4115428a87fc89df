//! [`SaveTensorStage`]: every named stage of the forward pass, in execution
//! order, with its canonical name, scope, applicability and shape.

use std::fmt;
use std::str::FromStr;

use crate::ParseError;

/// Whether a stage happens once per forward step or once per decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Once per step, outside the decoder layers (embedding, final_norm,
    /// lm_head).
    Model,
    /// Once per decoder layer.
    Layer,
}

/// Which layers or models produce a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Applicability {
    /// Every layer (or, for model stages, every model).
    Always,
    /// Only layers of models whose attention projections carry a bias
    /// (not Qwen3).
    QkvBias,
    /// Only layers whose attention normalises q and k per head before RoPE
    /// (Qwen3; not Mixtral).
    QkNorm,
    /// Only dense (non-MoE) layers.
    DenseOnly,
    /// Only Mixture-of-Experts layers.
    MoeOnly,
    /// Only MoE layers with an always-on shared expert beside the routed
    /// ones (Qwen2-MoE, DeepSeek-V3).
    SharedExpert,
    /// Only MoE layers whose shared expert is weighted by its own sigmoid
    /// gate (Qwen2-MoE).
    SharedExpertGate,
    /// Only layers whose attention projects q, k and v directly (every
    /// family but those with multi-head latent attention).
    NotMla,
    /// Only layers with multi-head latent attention (DeepSeek-V2/V3).
    Mla,
    /// Only MLA layers whose query goes through a compressed rank
    /// (`q_lora_rank` set: DeepSeek-V3; not V2-Lite).
    MlaQLora,
    /// Only MoE layers routed by DeepSeek's grouped router (biased sigmoid
    /// scores choose the experts).
    GroupedRouter,
    /// Every layer of a model whose layers attend through windows of their
    /// own (gpt-oss's `layer_types`: the full layers too, so that one run
    /// with a window is named).
    LayerWindows,
    /// Only layers whose softmax has attention sinks (gpt-oss).
    Sinks,
    /// Only MoE layers whose experts clamp gate and up before the SwiGLU
    /// (gpt-oss's `swiglu_limit`).
    ClampedSwiglu,
    /// Only MoE layers of a run whose experts are split across
    /// expert-parallel ranks (a property of the run, `parallel:`, not of
    /// the model).
    ExpertParallel,
}

impl Applicability {
    /// Canonical short word for tables: `all`, `qkv-bias`, `dense`, `moe`.
    pub fn name(self) -> &'static str {
        match self {
            Applicability::Always => "all",
            Applicability::QkvBias => "qkv-bias",
            Applicability::QkNorm => "qk-norm",
            Applicability::DenseOnly => "dense",
            Applicability::MoeOnly => "moe",
            Applicability::SharedExpert => "shared-expert",
            Applicability::SharedExpertGate => "shared-expert-gate",
            Applicability::NotMla => "not-mla",
            Applicability::Mla => "mla",
            Applicability::MlaQLora => "mla-q-lora",
            Applicability::GroupedRouter => "grouped-router",
            Applicability::LayerWindows => "layer-windows",
            Applicability::Sinks => "sinks",
            Applicability::ClampedSwiglu => "clamped-swiglu",
            Applicability::ExpertParallel => "expert-parallel",
        }
    }
}

/// The optional parts a decoder layer has, which decide the stages it
/// produces ([`SaveTensorStage::applies_to`]); a model family says which
/// of its layers have which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerTraits {
    /// A dense MLP (else routed experts).
    pub dense: bool,
    /// A bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE.
    pub qk_norm: bool,
    /// An always-on shared expert in the MoE block.
    pub shared_expert: bool,
    /// A sigmoid gate weighting the shared expert's output.
    pub shared_expert_gate: bool,
    /// Multi-head latent attention (keys and values from a compressed
    /// latent) instead of q, k and v projections.
    pub mla: bool,
    /// MLA with a compressed query (`q_a_proj`, `q_a_layernorm`,
    /// `q_b_proj`).
    pub mla_q_lora: bool,
    /// MoE routing by DeepSeek's grouped router.
    pub grouped_router: bool,
    /// The model's layers attend through windows of their own.
    pub layer_windows: bool,
    /// Attention sinks join the softmax's denominator.
    pub sinks: bool,
    /// The experts clamp gate and up before the SwiGLU.
    pub clamped_swiglu: bool,
    /// The run splits the experts across expert-parallel ranks: each MoE
    /// layer also produces its per-rank dispatch and combine.
    pub expert_parallel: bool,
    /// With expert-parallel ranks, moe_ffn_out reduces the ranks' partial
    /// sums (moe_combine) in rank order, as engines do; else each token's
    /// slots are summed in slot order, the one-rank sum to the bit.
    pub rank_sum: bool,
}

macro_rules! stages {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $scope:ident, $appl:ident, $shape:literal, $holds:literal; )*) => {
        /// One named stage of the forward pass. The canonical name
        /// ([`SaveTensorStage::name`]) is the capture file name, the CLI word
        /// and the system-set name; [`SaveTensorStage::ALL`] is the execution
        /// order, so "first divergent stage" means first in `ALL`.
        ///
        /// Shapes use T = positions computed this step, P = positions
        /// attended (cache + T), H = hidden, nh/nkv = query/key-value heads,
        /// hd = head_dim, E = experts, k = experts per token, I =
        /// intermediate (dense) or moe_intermediate (MoE), S = the shared
        /// expert's width, V = vocab.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum SaveTensorStage {
            $( $(#[$doc])* $variant, )*
        }

        impl SaveTensorStage {
            /// Every stage, in execution order.
            pub const ALL: &'static [SaveTensorStage] = &[ $( SaveTensorStage::$variant, )* ];

            /// The canonical name: lower snake case, as in capture file names.
            pub const fn name(self) -> &'static str {
                match self { $( SaveTensorStage::$variant => $name, )* }
            }

            /// Model stage (once per step) or layer stage (once per layer).
            pub const fn scope(self) -> Scope {
                match self { $( SaveTensorStage::$variant => Scope::$scope, )* }
            }

            /// Which layers produce this stage.
            pub const fn applicability(self) -> Applicability {
                match self { $( SaveTensorStage::$variant => Applicability::$appl, )* }
            }

            /// The tensor's shape in the DESIGN notation, e.g. `[T,k,I]`.
            pub const fn shape(self) -> &'static str {
                match self { $( SaveTensorStage::$variant => $shape, )* }
            }

            /// One line saying what the tensor holds.
            pub const fn holds(self) -> &'static str {
                match self { $( SaveTensorStage::$variant => $holds, )* }
            }
        }
    };
}

stages! {
    /// Token embedding rows.
    Embedding = "embedding", Model, Always, "[T,H]", "token embedding rows";
    /// Input RMSNorm: x * rsqrt(mean(x²) + eps) * weight.
    AttnNorm = "attn_norm", Layer, Always, "[T,H]", "input RMSNorm output";
    /// MLA's compressed query: attn_norm · q_a_projᵀ.
    MlaQA = "mla_q_a", Layer, MlaQLora, "[T,Rq]", "MLA compressed query (q_a_proj)";
    /// RMSNorm of the compressed query (q_a_layernorm).
    MlaQANorm = "mla_q_a_norm", Layer, MlaQLora, "[T,Rq]", "MLA compressed query after q_a_layernorm";
    /// MLA's query per head, nope then rope columns, before rotation.
    MlaQ = "mla_q", Layer, Mla, "[T,nh*dqk]", "MLA query (q_b_proj or q_proj), before RoPE";
    /// kv_a_proj_with_mqa: the latent, then the shared key's rope columns.
    MlaKvA = "mla_kv_a", Layer, Mla, "[T,Rkv+dr]", "MLA latent and shared rope key (kv_a_proj_with_mqa)";
    /// RMSNorm of the latent (kv_a_layernorm): what the cache keeps.
    MlaKvANorm = "mla_kv_a_norm", Layer, Mla, "[T,Rkv]", "MLA latent after kv_a_layernorm";
    /// kv_b_proj of the latent: per head k_nope then the value.
    MlaKvB = "mla_kv_b", Layer, Mla, "[T,nh*(dn+dv)]", "MLA per-head k_nope and value (kv_b_proj)";
    /// q, k, v projections concatenated along features.
    QkvMatmul = "qkv_matmul", Layer, NotMla, "[T,(nh+2nkv)*hd]", "q, k, v projections concatenated along features";
    /// qkv_matmul + bias (models with a QKV bias only).
    QkvBias = "qkv_bias", Layer, QkvBias, "[T,(nh+2nkv)*hd]", "after bias add; only for models with a QKV bias";
    /// Per-head RMSNorm of q then k over hd, before RoPE (Qwen3 QK-norm).
    QkNorm = "qk_norm", Layer, QkNorm, "[T,(nh+nkv)*hd]", "per-head RMSNorm of q then k, before RoPE";
    /// q after NeoX split-half RoPE.
    QPostRope = "q_post_rope", Layer, Always, "[T,nh*hd]", "q after RoPE";
    /// k after NeoX split-half RoPE.
    KPostRope = "k_post_rope", Layer, Always, "[T,nkv*hd]", "k after RoPE";
    /// The first and last key position each query row sees (int32): its
    /// own position and up to window - 1 before it, or all before it.
    AttnWindow = "attn_window", Layer, LayerWindows, "[T,2] int32", "first and last key position each query sees";
    /// q·kᵀ/sqrt(hd); masked (future) entries written as 0.
    AttnScores = "attn_scores", Layer, Always, "[nh,T,P]", "q·kᵀ/sqrt(hd); masked entries written as 0";
    /// The sink's share of each softmax row: exp(sink) over the row's
    /// denominator (its positions' and the sink's), per head and query.
    AttnSink = "attn_sink", Layer, Sinks, "[nh,T]", "the sink's share of the softmax denominator";
    /// Causal softmax of the scores.
    AttnSoftmax = "attn_softmax", Layer, Always, "[nh,T,P]", "softmax with causal mask";
    /// softmax·v, before o_proj.
    Attention = "attention", Layer, Always, "[T,nh*hd]", "softmax·v, before o_proj";
    /// o_proj output.
    AttnOut = "attn_out", Layer, Always, "[T,H]", "o_proj output";
    /// residual + attn_out.
    PostAttnResidual = "post_attn_residual", Layer, Always, "[T,H]", "residual + attn_out";
    /// Post-attention RMSNorm.
    FfnNorm = "ffn_norm", Layer, Always, "[T,H]", "post-attention RMSNorm output";
    /// Dense gate projection.
    FfnGate = "ffn_gate", Layer, DenseOnly, "[T,I]", "dense gate projection";
    /// Dense up projection.
    FfnUp = "ffn_up", Layer, DenseOnly, "[T,I]", "dense up projection";
    /// silu(gate).
    FfnSilu = "ffn_silu", Layer, DenseOnly, "[T,I]", "silu(gate)";
    /// silu(gate) * up.
    FfnSwigl = "ffn_swigl", Layer, DenseOnly, "[T,I]", "silu(gate)*up";
    /// Dense down projection.
    FfnOut = "ffn_out", Layer, DenseOnly, "[T,H]", "dense down projection";
    /// Router (gate) logits over all experts.
    MoeRouterLogits = "moe_router_logits", Layer, MoeOnly, "[T,E]", "router (gate) logits";
    /// DeepSeek's choice scores: sigmoid(logits) + the correction bias,
    /// what the grouped router chooses experts (and groups) by.
    MoeRouterChoice = "moe_router_choice", Layer, GroupedRouter, "[T,E]", "sigmoid(logits) + correction bias: what chooses";
    /// DeepSeek's group scores: per group of consecutive experts, the sum
    /// of its two best choice scores (what chooses the groups).
    MoeRouterGroupScores = "moe_router_group_scores", Layer, GroupedRouter, "[T,G]", "per group: sum of its two best choice scores";
    /// The groups kept (int32), best group score first; experts of the
    /// other groups cannot be chosen.
    MoeRouterGroups = "moe_router_groups", Layer, GroupedRouter, "[T,topk_group] int32", "groups kept, best group score first";
    /// Top-k weights after softmax, top-k and renormalise; descending.
    MoeRouter = "moe_router", Layer, MoeOnly, "[T,k]", "top-k weights after softmax, top-k, renormalise; descending";
    /// Expert ids (int32), same order as moe_router.
    MoeRouterIndices = "moe_router_indices", Layer, MoeOnly, "[T,k] int32", "expert ids, same order as moe_router";
    /// Per expert-parallel rank R: the rank that serves each logical
    /// expert in R's view (a replica's rank where the expert has copies);
    /// the ranks must agree (int32).
    MoeExpertMap = "moe_expert_map", Layer, ExpertParallel, "[R,E] int32", "per rank: the rank serving each expert in its view";
    /// Per expert-parallel rank R: where each slot (token, choice) landed
    /// in that rank's receive buffer, -1 where its expert is not the
    /// rank's (int32).
    MoeDispatch = "moe_dispatch", Layer, ExpertParallel, "[R,T,k] int32", "per rank: each slot's row in its receive buffer, -1 if not its";
    /// Per selected expert gate projection, top-k order.
    MoeExpertGate = "moe_expert_gate", Layer, MoeOnly, "[T,k,I]", "per selected expert gate projection, top-k order";
    /// Per selected expert up projection, top-k order.
    MoeExpertUp = "moe_expert_up", Layer, MoeOnly, "[T,k,I]", "per selected expert up projection, top-k order";
    /// Gate clamped above at the limit, then up clamped to +-limit, per
    /// selected expert (gpt-oss).
    MoeExpertClamp = "moe_expert_clamp", Layer, ClampedSwiglu, "[T,k,2I]", "gate then up, clamped, per selected expert";
    /// silu(gate) * up per selected expert.
    MoeExpertSwigl = "moe_expert_swigl", Layer, MoeOnly, "[T,k,I]", "silu(gate)*up per selected expert";
    /// Expert down projection, before weighting.
    MoeExpertOut = "moe_expert_out", Layer, MoeOnly, "[T,k,H]", "expert down projection, before weighting";
    /// The shared expert's gate projection.
    MoeSharedGate = "moe_shared_gate", Layer, SharedExpert, "[T,S]", "shared expert gate projection";
    /// The shared expert's up projection.
    MoeSharedUp = "moe_shared_up", Layer, SharedExpert, "[T,S]", "shared expert up projection";
    /// silu(gate) * up of the shared expert.
    MoeSharedSwigl = "moe_shared_swigl", Layer, SharedExpert, "[T,S]", "silu(gate)*up of the shared expert";
    /// The shared expert's down projection, before its gate weights it.
    MoeSharedOut = "moe_shared_out", Layer, SharedExpert, "[T,H]", "shared expert down projection, before its weight";
    /// The shared expert gate's logit: ffn_norm · shared_expert_gateᵀ.
    MoeSharedLogit = "moe_shared_logit", Layer, SharedExpertGate, "[T,1]", "shared expert gate logit";
    /// sigmoid(moe_shared_logit): the shared expert's weight in the sum.
    MoeSharedWeight = "moe_shared_weight", Layer, SharedExpertGate, "[T,1]", "sigmoid of the logit: the shared expert's weight";
    /// Per expert-parallel rank R: the weighted sum of the rank's own slots
    /// of each token, before the ranks' partial sums are reduced (0 for a
    /// token none of whose experts is the rank's).
    MoeCombine = "moe_combine", Layer, ExpertParallel, "[R,T,H]", "per rank: its slots' weighted sum, before the reduction";
    /// Sum over k of weight * expert output, plus the (weighted) shared
    /// expert's output where the layer has one.
    MoeFfnOut = "moe_ffn_out", Layer, MoeOnly, "[T,H]", "sum over k of weight * expert output (+ weighted shared expert)";
    /// residual + FFN output (alias layer_output).
    PostFfnResidual = "post_ffn_residual", Layer, Always, "[T,H]", "residual + FFN output (alias layer_output)";
    /// Final RMSNorm.
    FinalNorm = "final_norm", Model, Always, "[T,H]", "final RMSNorm";
    /// Logits.
    LmHead = "lm_head", Model, Always, "[T,V]", "logits";
}

impl SaveTensorStage {
    /// Aliases accepted by [`FromStr`] besides the canonical names.
    pub const ALIASES: &'static [(&'static str, SaveTensorStage)] =
        &[("layer_output", SaveTensorStage::PostFfnResidual)];

    /// Number of dimensions of the stage's tensor (from [`Self::shape`]):
    /// 2 for `[T,H]`, 3 for `[T,k,I]` and `[nh,T,P]`.
    pub fn rank(self) -> usize {
        let dims = self.shape().split(']').next().unwrap_or_default();
        dims.matches(',').count() + 1
    }

    /// Position in [`SaveTensorStage::ALL`] (execution order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stage that follows this one in execution order, if any.
    pub fn next(self) -> Option<SaveTensorStage> {
        Self::ALL.get(self.index() + 1).copied()
    }

    /// True for stages computed once per decoder layer.
    pub fn is_layer_stage(self) -> bool {
        self.scope() == Scope::Layer
    }

    /// Whether a layer with these traits produces this stage. Model stages
    /// always return true.
    pub fn applies_to(self, layer: LayerTraits) -> bool {
        match self.applicability() {
            Applicability::Always => true,
            Applicability::QkvBias => layer.qkv_bias,
            Applicability::QkNorm => layer.qk_norm,
            Applicability::DenseOnly => layer.dense,
            Applicability::MoeOnly => !layer.dense,
            Applicability::SharedExpert => !layer.dense && layer.shared_expert,
            Applicability::SharedExpertGate => !layer.dense && layer.shared_expert && layer.shared_expert_gate,
            Applicability::NotMla => !layer.mla,
            Applicability::Mla => layer.mla,
            Applicability::MlaQLora => layer.mla && layer.mla_q_lora,
            Applicability::GroupedRouter => !layer.dense && layer.grouped_router,
            Applicability::LayerWindows => layer.layer_windows,
            Applicability::Sinks => layer.sinks,
            Applicability::ClampedSwiglu => !layer.dense && layer.clamped_swiglu,
            Applicability::ExpertParallel => !layer.dense && layer.expert_parallel,
        }
    }

    /// The element type of the tensor: `int32` for the ids
    /// (moe_router_indices, moe_router_groups) and attn_window's
    /// positions, `float32` otherwise (the numpy `dtype.name`).
    pub fn element_type(self) -> &'static str {
        if self.is_integer() { "int32" } else { "float32" }
    }

    /// True for the stages that hold ids (experts, groups) rather than
    /// values: compared as sets per token, never rounded or scaled.
    pub fn holds_ids(self) -> bool {
        matches!(self, SaveTensorStage::MoeRouterIndices | SaveTensorStage::MoeRouterGroups)
    }

    /// True for the stages of int32 elements: the ids, and attn_window's
    /// positions (compared as values, never rounded or scaled).
    pub fn is_integer(self) -> bool {
        self.holds_ids()
            || matches!(
                self,
                SaveTensorStage::AttnWindow | SaveTensorStage::MoeExpertMap | SaveTensorStage::MoeDispatch
            )
    }
}

impl fmt::Display for SaveTensorStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SaveTensorStage {
    type Err = ParseError;

    /// Case-insensitive, whitespace-trimmed; accepts the canonical names and
    /// [`SaveTensorStage::ALIASES`]. `all` is a [`crate::StageList`], not a
    /// stage.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let token = s.trim();
        let lower = token.to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|stage| stage.name() == lower)
            .or_else(|| Self::ALIASES.iter().find(|(alias, _)| *alias == lower).map(|(_, stage)| *stage))
            .ok_or_else(|| ParseError::UnknownStage { token: token.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for &stage in SaveTensorStage::ALL {
            assert_eq!(stage.name().parse::<SaveTensorStage>(), Ok(stage));
            assert_eq!(stage.to_string(), stage.name());
        }
    }

    #[test]
    fn parsing_ignores_case_and_surrounding_whitespace() {
        assert_eq!(" MoE_Router ".parse(), Ok(SaveTensorStage::MoeRouter));
        assert_eq!("LM_HEAD\n".parse(), Ok(SaveTensorStage::LmHead));
    }

    #[test]
    fn layer_output_is_an_alias_of_post_ffn_residual() {
        assert_eq!("layer_output".parse(), Ok(SaveTensorStage::PostFfnResidual));
        assert_eq!("Layer_Output".parse(), Ok(SaveTensorStage::PostFfnResidual));
    }

    #[test]
    fn unknown_stage_names_the_token_and_lists_the_valid_names() {
        let err = "moe_routr".parse::<SaveTensorStage>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`moe_routr`"), "{msg}");
        for stage in SaveTensorStage::ALL {
            assert!(msg.contains(stage.name()), "{msg} lacks {stage}");
        }
        assert!(msg.contains("layer_output"));
    }

    #[test]
    fn all_is_in_design_execution_order() {
        let names: Vec<_> = SaveTensorStage::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "embedding",
                "attn_norm",
                "mla_q_a",
                "mla_q_a_norm",
                "mla_q",
                "mla_kv_a",
                "mla_kv_a_norm",
                "mla_kv_b",
                "qkv_matmul",
                "qkv_bias",
                "qk_norm",
                "q_post_rope",
                "k_post_rope",
                "attn_window",
                "attn_scores",
                "attn_sink",
                "attn_softmax",
                "attention",
                "attn_out",
                "post_attn_residual",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_silu",
                "ffn_swigl",
                "ffn_out",
                "moe_router_logits",
                "moe_router_choice",
                "moe_router_group_scores",
                "moe_router_groups",
                "moe_router",
                "moe_router_indices",
                "moe_expert_map",
                "moe_dispatch",
                "moe_expert_gate",
                "moe_expert_up",
                "moe_expert_clamp",
                "moe_expert_swigl",
                "moe_expert_out",
                "moe_shared_gate",
                "moe_shared_up",
                "moe_shared_swigl",
                "moe_shared_out",
                "moe_shared_logit",
                "moe_shared_weight",
                "moe_combine",
                "moe_ffn_out",
                "post_ffn_residual",
                "final_norm",
                "lm_head",
            ]
        );
        for (i, stage) in SaveTensorStage::ALL.iter().enumerate() {
            assert_eq!(stage.index(), i);
        }
        assert_eq!(SaveTensorStage::LmHead.next(), None);
        assert_eq!(SaveTensorStage::Embedding.next(), Some(SaveTensorStage::AttnNorm));
    }

    #[test]
    fn model_stages_are_embedding_final_norm_and_lm_head() {
        let model: Vec<_> = SaveTensorStage::ALL.iter().filter(|s| s.scope() == Scope::Model).copied().collect();
        assert_eq!(model, [SaveTensorStage::Embedding, SaveTensorStage::FinalNorm, SaveTensorStage::LmHead]);
        assert!(SaveTensorStage::AttnNorm.is_layer_stage());
    }

    #[test]
    fn dense_and_moe_stages_apply_only_to_their_layer_kind() {
        use SaveTensorStage as S;
        for &stage in S::ALL {
            let name = stage.name();
            let dense_only = name.starts_with("ffn_") && stage != S::FfnNorm;
            let moe_only = name.starts_with("moe_");
            let shared = name.starts_with("moe_shared_");
            let mla = name.starts_with("mla_");
            let grouped_only = matches!(stage, S::MoeRouterChoice | S::MoeRouterGroupScores | S::MoeRouterGroups);
            let oss = matches!(stage, S::AttnWindow | S::AttnSink | S::MoeExpertClamp);
            let ranks = matches!(stage, S::MoeExpertMap | S::MoeDispatch | S::MoeCombine);
            let optional = matches!(stage, S::QkvBias | S::QkNorm) || grouped_only || shared || mla || oss || ranks;
            let layer = |dense| LayerTraits { dense, ..LayerTraits::default() };
            assert_eq!(stage.applies_to(layer(true)), !moe_only && !optional, "{name}");
            assert_eq!(stage.applies_to(layer(false)), !dense_only && !optional, "{name}");
            let all = LayerTraits {
                dense: false,
                qkv_bias: true,
                qk_norm: true,
                shared_expert: true,
                shared_expert_gate: true,
                ..LayerTraits::default()
            };
            let choice = grouped_only || oss || ranks;
            assert_eq!(stage.applies_to(all), !dense_only && !mla && !choice, "{name}");
            let ungated = LayerTraits { shared_expert_gate: false, ..all };
            assert_eq!(
                stage.applies_to(ungated),
                !dense_only && !mla && !choice && !matches!(stage, S::MoeSharedLogit | S::MoeSharedWeight),
                "{name}"
            );
            let grouped = LayerTraits { grouped_router: true, ..all };
            assert_eq!(stage.applies_to(grouped), !dense_only && !mla && !oss && !ranks, "{name}");
            let gpt_oss = LayerTraits { layer_windows: true, sinks: true, clamped_swiglu: true, ..all };
            assert_eq!(stage.applies_to(gpt_oss), !dense_only && !mla && !grouped_only && !ranks, "{name}");
            let parallel = LayerTraits { expert_parallel: true, ..all };
            assert_eq!(stage.applies_to(parallel), !dense_only && !mla && !grouped_only && !oss, "{name}");
            // A dense layer has no shared expert, whatever the model has.
            assert!(!(shared && stage.applies_to(LayerTraits { dense: true, ..all })), "{name}");
        }
        assert_eq!(S::MoeRouterIndices.element_type(), "int32");
        assert_eq!(S::MoeRouterGroups.element_type(), "int32");
        assert_eq!(S::AttnWindow.element_type(), "int32");
        assert!(!S::AttnWindow.holds_ids() && S::AttnWindow.is_integer());
        assert_eq!(S::MoeRouter.element_type(), "float32");
    }

    #[test]
    fn mla_layers_replace_the_qkv_projections_with_the_latent_stages() {
        use SaveTensorStage as S;
        let mla = LayerTraits { mla: true, mla_q_lora: true, ..LayerTraits::default() };
        let plain_query = LayerTraits { mla_q_lora: false, ..mla };
        for stage in [S::MlaQ, S::MlaKvA, S::MlaKvANorm, S::MlaKvB] {
            assert!(stage.applies_to(mla) && stage.applies_to(plain_query), "{stage}");
            assert!(!stage.applies_to(LayerTraits::default()), "{stage}");
        }
        for stage in [S::MlaQA, S::MlaQANorm] {
            assert!(stage.applies_to(mla) && !stage.applies_to(plain_query), "{stage}");
        }
        assert!(!S::QkvMatmul.applies_to(mla) && S::QkvMatmul.applies_to(LayerTraits::default()));
        assert!(S::QPostRope.applies_to(mla) && S::AttnScores.applies_to(mla));
    }
}
