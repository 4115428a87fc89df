//! The one place that owns stage order: builds the prologue, layer and
//! epilogue schedules, registers each stage's system in its
//! [`StageSet`], and chains the sets (with their hook sets: amenders,
//! observers, teacher forcing) in [`SaveTensorStage::ALL`] order.
//!
//! Adding a stage: a variant in stage-types, a system in `stages/`, one
//! line in [`add_stage_system`].

use bevy_ecs::prelude::*;
use bevy_ecs::schedule::ScheduleLabel;
use stage_types::SaveTensorStage as S;

use crate::ecs::{ForwardSchedule, HookCtx, ScopeObservers, StageHookSystems, StageSet, layer_has, observers_enabled};
use crate::stages::{attention, ffn, mla, model, moe, oss, shared_expert};
use crate::teacher::{Teacher, teach_stage};

/// The three schedules of a forward step, and their scope observers'.
pub struct ForwardSchedules {
    /// embedding.
    pub prologue: Schedule,
    /// Every layer stage; run once per layer.
    pub layer: Schedule,
    /// final_norm, lm_head.
    pub epilogue: Schedule,
    /// Each scope's observers (prologue, layer, epilogue): see
    /// [`ScopeObservers`].
    pub observers: [Schedule; 3],
}

impl ForwardSchedules {
    /// The schedule with this label.
    pub fn get_mut(&mut self, label: ForwardSchedule) -> &mut Schedule {
        match label {
            ForwardSchedule::Prologue => &mut self.prologue,
            ForwardSchedule::Layer => &mut self.layer,
            ForwardSchedule::Epilogue => &mut self.epilogue,
        }
    }

    /// The observers' schedule of the scope with this label.
    pub fn observers_mut(&mut self, label: ForwardSchedule) -> &mut Schedule {
        &mut self.observers[label as usize]
    }
}

/// Builds the schedules with every stage system and the ordering of stage
/// and hook sets.
pub fn build_schedules() -> ForwardSchedules {
    let mut schedules = ForwardSchedules {
        prologue: new_schedule(ForwardSchedule::Prologue),
        layer: new_schedule(ForwardSchedule::Layer),
        epilogue: new_schedule(ForwardSchedule::Epilogue),
        observers: [ForwardSchedule::Prologue, ForwardSchedule::Layer, ForwardSchedule::Epilogue]
            .map(|scope| new_schedule(ScopeObservers(scope))),
    };
    for &stage in S::ALL {
        let schedule = schedules.get_mut(ForwardSchedule::of(stage));
        add_stage_system(schedule, stage);
        if stage.is_layer_stage() {
            // A layer runs the stages its parts have (the stage's
            // applicability against the layer's traits), for every family.
            schedule.configure_sets(StageSet(stage).run_if(layer_has(stage)));
        }
        schedule.configure_sets(StageHookSystems::Amend(stage).after(StageSet(stage)));
        schedule.configure_sets(
            StageHookSystems::Observe(stage).after(StageHookSystems::Amend(stage)).run_if(observers_enabled),
        );
        schedule.configure_sets(StageHookSystems::Teach(stage).after(StageHookSystems::Observe(stage)));
        schedule.add_systems(
            (move |ctx: HookCtx, teacher: ResMut<Teacher>| teach_stage(stage, ctx, teacher))
                .in_set(StageHookSystems::Teach(stage)),
        );
        if let Some(next) = stage.next().filter(|n| ForwardSchedule::of(*n) == ForwardSchedule::of(stage)) {
            schedule.configure_sets(StageSet(next).after(StageHookSystems::Teach(stage)));
        }
    }
    schedules
}

fn new_schedule(label: impl ScheduleLabel) -> Schedule {
    // The default executor without bevy's multi_threaded feature runs one
    // system at a time, in the order the sets define; parallelism lives
    // inside the backend's operations.
    Schedule::new(label)
}

/// Registers the system computing `stage` (which layers run it is the
/// set's condition, from the stage's applicability).
fn add_stage_system(schedule: &mut Schedule, stage: S) {
    let set = StageSet(stage);
    match stage {
        S::Embedding => schedule.add_systems(model::embedding.in_set(set)),
        S::AttnNorm => schedule.add_systems(attention::attn_norm.in_set(set)),
        S::MlaQA => schedule.add_systems(mla::mla_q_a.in_set(set)),
        S::MlaQANorm => schedule.add_systems(mla::mla_q_a_norm.in_set(set)),
        S::MlaQ => schedule.add_systems(mla::mla_q.in_set(set)),
        S::MlaKvA => schedule.add_systems(mla::mla_kv_a.in_set(set)),
        S::MlaKvANorm => schedule.add_systems(mla::mla_kv_a_norm.in_set(set)),
        S::MlaKvB => schedule.add_systems(mla::mla_kv_b.in_set(set)),
        S::QkvMatmul => schedule.add_systems(attention::qkv_matmul.in_set(set)),
        S::QkvBias => schedule.add_systems(attention::qkv_bias.in_set(set)),
        S::QkNorm => schedule.add_systems(attention::qk_norm.in_set(set)),
        S::QPostRope => schedule.add_systems(attention::q_post_rope.in_set(set)),
        S::KPostRope => schedule.add_systems(attention::k_post_rope.in_set(set)),
        S::AttnWindow => schedule.add_systems(oss::attn_window.in_set(set)),
        S::AttnScores => schedule.add_systems(attention::attn_scores.in_set(set)),
        S::AttnSink => schedule.add_systems(oss::attn_sink.in_set(set)),
        S::AttnSoftmax => schedule.add_systems(attention::attn_softmax.in_set(set)),
        S::Attention => schedule.add_systems(attention::attention.in_set(set)),
        S::AttnOut => schedule.add_systems(attention::attn_out.in_set(set)),
        S::PostAttnResidual => schedule.add_systems(attention::post_attn_residual.in_set(set)),
        S::FfnNorm => schedule.add_systems(ffn::ffn_norm.in_set(set)),
        S::FfnGate => schedule.add_systems(ffn::ffn_gate.in_set(set)),
        S::FfnUp => schedule.add_systems(ffn::ffn_up.in_set(set)),
        S::FfnSilu => schedule.add_systems(ffn::ffn_silu.in_set(set)),
        S::FfnSwigl => schedule.add_systems(ffn::ffn_swigl.in_set(set)),
        S::FfnOut => schedule.add_systems(ffn::ffn_out.in_set(set)),
        S::MoeRouterLogits => schedule.add_systems(moe::moe_router_logits.in_set(set)),
        S::MoeRouterChoice => schedule.add_systems(moe::moe_router_choice.in_set(set)),
        S::MoeRouterGroupScores => schedule.add_systems(moe::moe_router_group_scores.in_set(set)),
        S::MoeRouterGroups => schedule.add_systems(moe::moe_router_groups.in_set(set)),
        S::MoeRouter => schedule.add_systems(moe::moe_router.in_set(set)),
        S::MoeRouterIndices => schedule.add_systems(moe::moe_router_indices.in_set(set)),
        S::MoeExpertMap => schedule.add_systems(moe::moe_expert_map.in_set(set)),
        S::MoeDispatch => schedule.add_systems(moe::moe_dispatch.in_set(set)),
        S::MoeExpertGate => schedule.add_systems(moe::moe_expert_gate.in_set(set)),
        S::MoeExpertUp => schedule.add_systems(moe::moe_expert_up.in_set(set)),
        S::MoeExpertClamp => schedule.add_systems(oss::moe_expert_clamp.in_set(set)),
        S::MoeExpertSwigl => schedule.add_systems(moe::moe_expert_swigl.in_set(set)),
        S::MoeExpertOut => schedule.add_systems(moe::moe_expert_out.in_set(set)),
        S::MoeSharedGate => schedule.add_systems(shared_expert::moe_shared_gate.in_set(set)),
        S::MoeSharedUp => schedule.add_systems(shared_expert::moe_shared_up.in_set(set)),
        S::MoeSharedSwigl => schedule.add_systems(shared_expert::moe_shared_swigl.in_set(set)),
        S::MoeSharedOut => schedule.add_systems(shared_expert::moe_shared_out.in_set(set)),
        S::MoeSharedLogit => schedule.add_systems(shared_expert::moe_shared_logit.in_set(set)),
        S::MoeSharedWeight => schedule.add_systems(shared_expert::moe_shared_weight.in_set(set)),
        S::MoeCombine => schedule.add_systems(moe::moe_combine.in_set(set)),
        S::MoeFfnOut => schedule.add_systems(moe::moe_ffn_out.in_set(set)),
        S::PostFfnResidual => schedule.add_systems(ffn::post_ffn_residual.in_set(set)),
        S::FinalNorm => schedule.add_systems(model::final_norm.in_set(set)),
        S::LmHead => schedule.add_systems(model::lm_head.in_set(set)),
    };
}
