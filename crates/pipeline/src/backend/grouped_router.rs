//! DeepSeek-V3's router as a backend capability ([`super::Backend::grouped_router`]):
//! sigmoid scores, the correction bias choosing experts in groups, the
//! chosen experts weighted by their unbiased scores
//! ([`GroupedTopK`], whose CPU arithmetic is the reference). A backend
//! without it is refused before a model that needs it runs.

use super::Slot;
pub use super::cpu::grouped_routing::GroupedTopK;
use crate::error::Result;
use crate::weights::WeightId;

/// The grouped router's one operation.
pub trait GroupedRouting {
    /// Routes each row of `logits` (`[T,E]`) with `router` and the
    /// correction `bias` (`[E]`): weights `[T,k]` (best biased score
    /// first) into `weights_out`, expert ids `[T,k]` int32 into
    /// `indices_out`.
    fn route_grouped(
        &mut self,
        logits: Slot,
        bias: WeightId,
        router: &GroupedTopK,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()>;
}
