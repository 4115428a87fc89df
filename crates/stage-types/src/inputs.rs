//! What each stage reads: [`SaveTensorStage::inputs`]. A tool that checks
//! one stage of another engine's capture (re-running it on the captured
//! inputs) needs to know which captured tensors those inputs are; a stage
//! whose inputs were not captured cannot be checked on its own. The
//! pipeline's stage systems read exactly these (a pipeline test records
//! every backend read of a forward pass and compares).

use crate::{LayerTraits, SaveTensorStage};

/// One input of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageInput {
    /// A stage of the same step and scope.
    Stage(SaveTensorStage),
    /// The scope's input: the embedding for layer 0, the previous layer's
    /// post_ffn_residual for the others and for final_norm.
    ScopeInput,
    /// The keys and values of the earlier steps' positions (the KV cache:
    /// their k_post_rope and the v columns of their qkv source).
    EarlierKeysAndValues,
}

impl SaveTensorStage {
    /// The stage the v columns and the RoPE input come from in a layer with
    /// `layer`'s parts: qkv_bias with a bias, else qkv_matmul.
    pub fn qkv_source(layer: LayerTraits) -> SaveTensorStage {
        if layer.mla {
            // MLA's values are kv_b's columns after each head's k_nope.
            SaveTensorStage::MlaKvB
        } else if layer.qkv_bias {
            SaveTensorStage::QkvBias
        } else {
            SaveTensorStage::QkvMatmul
        }
    }

    /// The stage RoPE reads q (and, but in MLA, k) from: qk_norm where
    /// the layer has it, MLA's query, else the projections
    /// ([`Self::qkv_source`]).
    pub fn rope_source(layer: LayerTraits) -> SaveTensorStage {
        if layer.qk_norm {
            SaveTensorStage::QkNorm
        } else if layer.mla {
            SaveTensorStage::MlaQ
        } else {
            Self::qkv_source(layer)
        }
    }

    /// What this stage reads in a layer with `layer`'s parts (model stages
    /// ignore `layer`). Weights are not listed: they are the model's.
    pub fn inputs(self, layer: LayerTraits) -> Vec<StageInput> {
        use SaveTensorStage as S;
        use StageInput::{EarlierKeysAndValues as Kv, ScopeInput as Scope, Stage};
        let qkv = Stage(Self::qkv_source(layer));
        let rope = Stage(Self::rope_source(layer));
        match self {
            S::Embedding => vec![],
            S::AttnNorm | S::FinalNorm => vec![Scope],
            S::QkvMatmul | S::MlaQA | S::MlaKvA => vec![Stage(S::AttnNorm)],
            S::MlaQANorm => vec![Stage(S::MlaQA)],
            S::MlaQ => vec![Stage(if layer.mla_q_lora { S::MlaQANorm } else { S::AttnNorm })],
            S::MlaKvANorm => vec![Stage(S::MlaKvA)],
            S::MlaKvB => vec![Stage(S::MlaKvANorm)],
            // MLA's keys: each head's k_nope from kv_b, the rope columns
            // of kv_a rotated once and shared.
            S::KPostRope if layer.mla => vec![Stage(S::MlaKvA), Stage(S::MlaKvB)],
            S::QkvBias => vec![Stage(S::QkvMatmul)],
            S::QkNorm => vec![qkv],
            S::QPostRope | S::KPostRope => vec![rope],
            S::AttnScores => vec![Stage(S::QPostRope), Stage(S::KPostRope), Kv],
            S::AttnWindow => vec![Scope],
            S::AttnSoftmax | S::AttnSink => vec![Stage(S::AttnScores)],
            S::Attention => vec![Stage(S::AttnSoftmax), qkv, Kv],
            S::AttnOut => vec![Stage(S::Attention)],
            S::PostAttnResidual => vec![Scope, Stage(S::AttnOut)],
            S::FfnNorm => vec![Stage(S::PostAttnResidual)],
            S::FfnGate | S::FfnUp | S::MoeRouterLogits | S::MoeSharedGate | S::MoeSharedUp | S::MoeSharedLogit => {
                vec![Stage(S::FfnNorm)]
            }
            S::FfnSilu => vec![Stage(S::FfnGate)],
            S::FfnSwigl => vec![Stage(S::FfnSilu), Stage(S::FfnUp)],
            S::FfnOut => vec![Stage(S::FfnSwigl)],
            S::MoeRouter | S::MoeRouterChoice | S::MoeRouterGroupScores | S::MoeRouterGroups => {
                vec![Stage(S::MoeRouterLogits)]
            }
            S::MoeRouterIndices => vec![Stage(S::MoeRouterLogits)],
            // The map is the run's layout (and, per rank, its view of it).
            S::MoeExpertMap => vec![],
            S::MoeDispatch => vec![Stage(S::MoeRouterIndices), Stage(S::MoeExpertMap)],
            S::MoeCombine => vec![Stage(S::MoeExpertOut), Stage(S::MoeRouter), Stage(S::MoeDispatch)],
            S::MoeExpertGate | S::MoeExpertUp => vec![Stage(S::FfnNorm), Stage(S::MoeRouterIndices)],
            S::MoeExpertClamp => vec![Stage(S::MoeExpertGate), Stage(S::MoeExpertUp)],
            S::MoeExpertSwigl if layer.clamped_swiglu => vec![Stage(S::MoeExpertClamp)],
            S::MoeExpertSwigl => vec![Stage(S::MoeExpertGate), Stage(S::MoeExpertUp)],
            S::MoeExpertOut => vec![Stage(S::MoeExpertSwigl), Stage(S::MoeRouterIndices)],
            S::MoeSharedSwigl => vec![Stage(S::MoeSharedGate), Stage(S::MoeSharedUp)],
            S::MoeSharedOut => vec![Stage(S::MoeSharedSwigl)],
            S::MoeSharedWeight => vec![Stage(S::MoeSharedLogit)],
            S::MoeFfnOut => {
                let mut inputs = match (layer.expert_parallel, layer.rank_sum) {
                    (false, _) => vec![Stage(S::MoeExpertOut), Stage(S::MoeRouter)],
                    (true, false) => vec![Stage(S::MoeExpertOut), Stage(S::MoeRouter), Stage(S::MoeDispatch)],
                    (true, true) => {
                        vec![Stage(S::MoeExpertOut), Stage(S::MoeRouter), Stage(S::MoeDispatch), Stage(S::MoeCombine)]
                    }
                };
                if layer.shared_expert {
                    inputs.push(Stage(S::MoeSharedOut));
                    if layer.shared_expert_gate {
                        inputs.push(Stage(S::MoeSharedWeight));
                    }
                }
                inputs
            }
            S::PostFfnResidual => {
                vec![Stage(S::PostAttnResidual), Stage(if layer.dense { S::FfnOut } else { S::MoeFfnOut })]
            }
            S::LmHead => vec![Stage(S::FinalNorm)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_comes_before_its_stage_and_applies_where_the_stage_does() {
        let layers = [
            LayerTraits { dense: true, ..LayerTraits::default() },
            LayerTraits {
                dense: false,
                qkv_bias: true,
                qk_norm: false,
                shared_expert: true,
                shared_expert_gate: true,
                ..LayerTraits::default()
            },
            LayerTraits { dense: false, qk_norm: true, ..LayerTraits::default() },
            LayerTraits { dense: true, mla: true, mla_q_lora: true, ..LayerTraits::default() },
            LayerTraits {
                dense: false,
                mla: true,
                shared_expert: true,
                grouped_router: true,
                ..LayerTraits::default()
            },
            LayerTraits { dense: false, shared_expert: true, expert_parallel: true, ..LayerTraits::default() },
            LayerTraits { dense: false, expert_parallel: true, rank_sum: true, ..LayerTraits::default() },
        ];
        for layer in layers {
            for &stage in SaveTensorStage::ALL.iter().filter(|s| s.applies_to(layer)) {
                for input in stage.inputs(layer) {
                    if let StageInput::Stage(s) = input {
                        assert!(s < stage, "{stage} reads {s}, which comes after it");
                        assert!(s.applies_to(layer), "{stage} reads {s}, which {layer:?} lacks");
                        assert_eq!(s.scope(), stage.scope(), "{stage} reads {s} of another scope");
                    }
                }
            }
        }
        let qwen2 = layers[1];
        assert_eq!(SaveTensorStage::rope_source(qwen2), SaveTensorStage::QkvBias);
        assert!(
            SaveTensorStage::MoeFfnOut.inputs(qwen2).contains(&StageInput::Stage(SaveTensorStage::MoeSharedWeight))
        );
        // Expert-parallel ranks: the dispatch and combine apply; the sum
        // reads the partials only when it reduces the ranks'.
        let (slot_order, rank_sum) = (layers[5], layers[6]);
        assert!(
            SaveTensorStage::MoeCombine.applies_to(slot_order) && SaveTensorStage::MoeDispatch.applies_to(rank_sum)
        );
        assert!(!SaveTensorStage::MoeCombine.applies_to(layers[2]));
        assert!(SaveTensorStage::MoeFfnOut.inputs(rank_sum).contains(&StageInput::Stage(SaveTensorStage::MoeCombine)));
        assert!(
            !SaveTensorStage::MoeFfnOut.inputs(slot_order).contains(&StageInput::Stage(SaveTensorStage::MoeCombine))
        );
    }
}
