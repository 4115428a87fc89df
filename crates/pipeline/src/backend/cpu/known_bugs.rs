//! [`KnownBug`]: the bugs engines shipped in DeepSeek's MoE block and FP8
//! weights and in gpt-oss's attention, router, SwiGLU and MXFP4 experts,
//! which a CPU target reproduces (`backend: CpuWithBug(...)`,
//! `CpuBackend::with_bug`) so that tests and users can check moetrace
//! finds each at its stage. Each is reproduced where its operation runs:
//! grouped_routing.rs, oss.rs, mod.rs (the shared expert, the weights),
//! expert_parallel.rs (the ranks' dispatch and reduction),
//! tensor_parallel.rs (the row-split projections' bias).

/// Bugs engines shipped in DeepSeek's and gpt-oss's forward passes, as a
/// CPU target can reproduce them (`backend: CpuWithBug(...)`): what
/// moetrace must find and place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KnownBug {
    /// The correction bias leaks into the combine weights (vLLM #12002):
    /// the chosen experts weighted by their biased scores.
    BiasInCombineWeights,
    /// Masked groups filled with 0 instead of -inf (SGLang #3705): with
    /// negative biased scores, experts of masked groups win.
    MaskedGroupsAtZero,
    /// routed_scaling_factor dropped (SGLang #8333's FP4 path).
    RoutedScalingDropped,
    /// The shared experts' output left out of the MoE sum.
    SharedExpertDropped,
    /// One FP8 block's scale read from the neighbouring block (the class
    /// of flashinfer #2356's block-scale errors): in layer N's
    /// kv_a_proj_with_mqa, whose rows end in a partial block (DeepSeek-V3:
    /// 576 = 4.5 blocks of 128), the last block takes the scale of the
    /// block before it (`weights::fp8::with_neighbour_scale`).
    Fp8NeighbourScale(usize),
    /// gpt-oss: the SwiGLU's clamp dropped (SGLang #39939, vLLM #42855).
    ClampDropped,
    /// gpt-oss: the SwiGLU's alpha (1.702) replaced by 1 (SGLang #16972).
    AlphaOne,
    /// gpt-oss: the attention sinks left out of the softmax.
    SinksDropped,
    /// gpt-oss: each sliding window one position too wide.
    WindowOffByOne,
    /// gpt-oss: the full-attention layers run with a window of this size
    /// (SGLang #11634's class).
    FullLayerWindowed(usize),
    /// gpt-oss: the router's bias left out of its logits.
    RouterBiasDropped,
    /// gpt-oss: one MXFP4 scale byte off by one (the block's values
    /// doubled): in layer L, expert E's gate_proj, the first block of its
    /// first row (`weights::oss_experts::with_scale_off_by_one`).
    Mxfp4ScaleOffByOne(usize, usize),
    /// Expert-parallel ranks (`parallel:`): token T's first slot never
    /// dispatched to the rank holding its expert, in every MoE layer (a
    /// dispatch that drops tokens, SGLang #14382's class): found at
    /// moe_dispatch, at that rank and token.
    DispatchDropped(usize),
    /// Expert-parallel ranks reduced in rank order: rank R's partial sum
    /// added twice (SGLang #32962's outcome: some outputs summed twice):
    /// found at moe_ffn_out, the rank named by what the error equals.
    PartialAddedTwice(usize),
    /// Expert-parallel ranks: rank R multiplies its experts' inputs by the
    /// routing weight instead of their outputs (VeOmni #1199: the weight
    /// applied on the other side of the experts under expert parallelism;
    /// the SwiGLU is not linear in it): found at moe_expert_gate on that
    /// rank's experts, and at its moe_combine.
    WeightBeforeExperts(usize),
    /// Expert-parallel ranks with replicas: rank R's view sends a
    /// replicated expert's tokens to its home rank while the others send
    /// them to the copy (SGLang #32962: replicas chosen differently on one
    /// rank; outputs summed twice or never): found at moe_expert_map, on
    /// that rank.
    ReplicaMismatch(usize),
    /// Tensor-parallel ranks (`parallel: (tensor: T)`): a row-split
    /// projection's bias added on every rank before the all-reduce, so the
    /// sum holds it T times (TGI #1036, nano-vllm #99, slapo #10: the bias
    /// of a row-parallel linear inside each rank's partial): gpt-oss's
    /// o_proj, found at attn_out.
    BiasOnEveryRank,
}

impl KnownBug {
    /// gpt-oss's bugs, for tests (windows of 128, the MXFP4 scale in layer
    /// 1's expert 0).
    pub const GPT_OSS: [KnownBug; 7] = [
        KnownBug::ClampDropped,
        KnownBug::AlphaOne,
        KnownBug::SinksDropped,
        KnownBug::WindowOffByOne,
        KnownBug::FullLayerWindowed(128),
        KnownBug::RouterBiasDropped,
        KnownBug::Mxfp4ScaleOffByOne(1, 0),
    ];

    /// The bugs of expert-parallel ranks, for tests (token 3, rank 1).
    pub const RANKS: [KnownBug; 4] = [
        KnownBug::DispatchDropped(3),
        KnownBug::PartialAddedTwice(1),
        KnownBug::WeightBeforeExperts(2),
        KnownBug::ReplicaMismatch(1),
    ];

    /// DeepSeek's bugs, for messages and tests (the FP8 one in layer 1).
    pub const ALL: [KnownBug; 5] = [
        KnownBug::BiasInCombineWeights,
        KnownBug::MaskedGroupsAtZero,
        KnownBug::RoutedScalingDropped,
        KnownBug::SharedExpertDropped,
        KnownBug::Fp8NeighbourScale(1),
    ];
}
