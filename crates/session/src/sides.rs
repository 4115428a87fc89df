//! What bisect and check share: their options, the sides of a lockstep
//! (a forward pass run scope by scope, teacher-forced or not), and host
//! tensors as compare reads them.

use compare::{Elements, Emulated, ExpectedTensors, TensorView, Tolerances};
use pipeline::backend::contract::NumericContract;
use pipeline::{Forward, HostTensor, LoadMeter, ScopeOutputs, StepScope, TensorData};
use stage_types::SaveTensorStage as S;

use crate::error::Result;

/// Options of a bisect run.
#[derive(Debug, Clone, Default)]
pub struct BisectOptions {
    /// rel_l2 tolerances.
    pub tolerances: Tolerances,
    /// Keep going after the first divergence (every step, every stage).
    pub all: bool,
    /// Local mode whatever the config says.
    pub local: bool,
    /// Counts the bytes of each loading phase, for progress.
    pub meter: LoadMeter,
}

/// A host tensor as compare reads it: borrowed, in its own type.
pub(crate) fn view(t: &HostTensor) -> TensorView<'_> {
    let elements = match &t.data {
        TensorData::F32(v) => Elements::F32(v),
        TensorData::I32(v) => Elements::I32(v),
    };
    TensorView::new(&t.shape, elements)
}

/// The expected side's outputs of one scope as a comparison's input, each
/// with the error floor of its precision under `contract`.
pub(crate) fn expected_tensors<'a>(expected: &'a ScopeOutputs, contract: &NumericContract) -> ExpectedTensors<'a> {
    let replicates = contract.emulation_replicates();
    expected
        .iter()
        .filter_map(|(stage, t)| {
            contract.output(*stage).map(|p| (*stage, Emulated { view: view(t), floor: p.error_floor(), replicates }))
        })
        .chain(
            expected
                .get(&S::MoeRouterIndices)
                .map(|t| (S::MoeRouterIndices, Emulated { view: view(t), floor: 0.0, replicates })),
        )
        .collect()
}

/// One side of the lockstep.
pub(crate) struct Side {
    pub(crate) forward: Forward,
    /// Backend name and dtype, for capture manifests.
    pub(crate) name: (&'static str, &'static str),
}

impl Side {
    /// Runs `scope`, forced to `teacher`'s outputs when given, and returns
    /// what each stage computed itself.
    pub(crate) fn run(&mut self, scope: StepScope, teacher: Option<ScopeOutputs>) -> Result<ScopeOutputs> {
        self.forward.set_teacher(true, teacher.unwrap_or_default());
        let ran = self.forward.run_scope(scope);
        let recorded = self.forward.take_recorded();
        ran?;
        Ok(recorded)
    }
}
