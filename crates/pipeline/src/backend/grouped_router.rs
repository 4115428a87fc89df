//! DeepSeek-V3's router as a backend capability ([`super::Backend::grouped_router`]):
//! sigmoid scores, the correction bias choosing experts in groups, the
//! chosen experts weighted by their unbiased scores
//! ([`GroupedTopK`], whose CPU arithmetic is the reference). A backend
//! without it is refused before a model that needs it runs.

use stage_types::SaveTensorStage;

use super::Slot;
pub use super::cpu::grouped_routing::GroupedTopK;
use crate::error::Result;
use crate::weights::WeightId;

/// Where the grouped router writes what it decided, one pass for all four
/// (the groups choose the experts, the experts their weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedSlots {
    /// `[T,G]`: each group's score, the sum of its two best biased scores.
    pub group_scores: Slot,
    /// `[T,topk_group]` int32: the groups kept, best group score first.
    pub groups: Slot,
    /// `[T,k]`: the chosen experts' weights, best biased score first.
    pub weights: Slot,
    /// `[T,k]` int32: the chosen experts, in the weights' order.
    pub indices: Slot,
}

impl GroupedSlots {
    /// The stages' own slots: moe_router_group_scores, moe_router_groups,
    /// moe_router, moe_router_indices.
    pub const STAGES: GroupedSlots = GroupedSlots {
        group_scores: SaveTensorStage::MoeRouterGroupScores,
        groups: SaveTensorStage::MoeRouterGroups,
        weights: SaveTensorStage::MoeRouter,
        indices: SaveTensorStage::MoeRouterIndices,
    };
}

/// The grouped router's one operation.
pub trait GroupedRouting {
    /// Routes each row of `logits` (`[T,E]`) with `router` and the
    /// correction `bias` (`[E]`), writing the group scores, the kept
    /// groups, the weights and the expert ids into `out`.
    fn route_grouped(&mut self, logits: Slot, bias: WeightId, router: &GroupedTopK, out: GroupedSlots) -> Result<()>;
}
