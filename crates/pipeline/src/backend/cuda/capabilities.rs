//! The CUDA backend's optional capabilities: recording decode steps as
//! graphs with the observers' reads gathered on the device (graph.rs,
//! taps.rs, eager_reads.rs do the work), and preparing the device before a
//! run (memory check, cuBLAS warm-up, pinned capture buffers).

use super::{CudaBackend, kernel_error};
use crate::backend::{DeviceSetup, Slot, StepGraph, StepRecorder};
use crate::error::{PipelineError, Result};

impl StepRecorder for CudaBackend {
    fn allow_step_graph(&mut self) {
        self.graphs.allow_next();
    }

    fn step_graph(&self) -> StepGraph {
        self.graphs.plan
    }

    fn begin_graph_capture(&mut self) -> Result<()> {
        self.begin_graph_capture_on_device()
    }

    fn end_graph_capture(&mut self, failure: Option<String>) -> Result<bool> {
        let flushed = self.flush_deferred().and_then(|()| self.launch_queued_gathers());
        let failure = failure.or_else(|| flushed.err().map(|e| e.to_string()));
        let ended = self.end_graph_capture_on_device(failure);
        self.release_gather_holds();
        ended
    }

    fn replay_step(&mut self) -> Result<()> {
        self.replay_step_on_device()
    }

    fn set_step_reads(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<StepGraph> {
        self.set_step_reads_on_device(reads)
    }

    fn can_gather_reads(&self) -> bool {
        self.can_gather_reads()
    }

    fn gathers_reads(&self) -> bool {
        self.graphs.plan != StepGraph::Eager || self.taps.eager_reads.is_some()
    }

    fn record_scope_reads(&mut self, scope: usize) -> Result<()> {
        self.record_scope_reads_on_device(scope)
    }

    fn observe_step_reads(&mut self) -> Result<()> {
        self.observe_step_reads_on_device()
    }

    fn end_step_reads(&mut self) -> Result<()> {
        self.end_step_reads_on_device()
    }

    fn keep_replay(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<bool> {
        self.keep_replay_on_device(reads)
    }

    fn graph_replays(&self) -> usize {
        self.graphs.replays
    }
}

impl DeviceSetup for CudaBackend {
    fn setup_note(&self) -> Option<String> {
        Some(format!(
            "kernels compiled for {} in {:.2} s",
            self.device.arch(),
            self.device.compile_time().as_secs_f64()
        ))
    }

    fn warm_up(&mut self, prompt_tokens: usize) -> Result<()> {
        self.warm_up_projections(prompt_tokens)
    }

    fn reserve_capture(&mut self, elements: &[usize]) -> Result<()> {
        let ctx = self.device.context().clone();
        self.taps.staging.pool.reserve(&ctx, elements)
    }

    fn fuses_attention(&self, rows: usize, head_dim: usize) -> bool {
        self.fuses_attention_of(rows, head_dim)
    }

    fn check_run_memory(&self, bytes: f64) -> Result<()> {
        let (free, total) = self.device.memory().map_err(kernel_error)?;
        // The weights are resident already; cuBLAS and the staging pool
        // want some room too.
        if bytes > free as f64 * 0.9 {
            return Err(PipelineError::GpuOutOfMemory {
                action: "checking this run's KV caches and activations".into(),
                detail: format!(
                    ": they need about {:.1} GB but {} has {:.1} GB free of {:.1} GB after the weights",
                    bytes / 1e9,
                    self.device.name(),
                    free as f64 / 1e9,
                    total as f64 / 1e9
                ),
            });
        }
        Ok(())
    }
}
