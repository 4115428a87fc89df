//! Progress on stderr. On a terminal: a spinner while the model loads and
//! the backend is set up, with the bytes done of each loading phase (a
//! synthetic model made, weights placed on the device), then a live bar per run with the step, the layer
//! within it, tokens/s so far and elapsed time, and a remaining time only
//! once a step has finished to base it on (indicatif). Otherwise (a log, a
//! pipe, CI): plain lines, one per step start, layer and next token, so a
//! log shows how far a long run got.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use pipeline::{ForwardEvent, LoadMeter};

/// Progress display for `run`.
pub struct Progress {
    enabled: bool,
    steps: usize,
    bar: Option<ProgressBar>,
    started: Instant,
    tokens: usize,
    last_token: Option<u32>,
}

impl Progress {
    /// A display for a run of `steps` steps; `enabled` false prints nothing.
    pub fn new(enabled: bool, steps: usize) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr_with_hz(10));
            bar.set_style(loading_style(None));
            bar.set_message("loading the model");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { enabled, steps, bar, started: Instant::now(), tokens: 0, last_token: None }
    }

    /// Shows `meter`'s bytes done beside the spinner until the first step.
    pub fn loading(&mut self, meter: LoadMeter) {
        if let Some(bar) = &self.bar {
            bar.set_style(loading_style(Some(meter)));
        }
    }

    /// Says what the run is doing before its first step (the spinner's
    /// message on a terminal; nothing in a log, where `line` says it).
    pub fn stage(&mut self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        }
    }

    /// The bar's style: steps, and the remaining time once one is measured.
    fn bar_style(with_eta: bool) -> ProgressStyle {
        let template = if with_eta {
            "{elapsed_precise} [{bar:30}] {msg} (remaining {eta})"
        } else {
            "{elapsed_precise} [{bar:30}] {msg}"
        };
        ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ")
    }

    /// Prints a whole line (above the bar on a terminal).
    pub fn line(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => crate::say!("{text}"),
        }
    }

    /// Shows a forward event.
    pub fn forward(&mut self, event: &ForwardEvent) {
        if !self.enabled {
            return;
        }
        match event {
            ForwardEvent::StepStarted { step, start_position, tokens } => {
                if *step == 0 {
                    self.started = Instant::now();
                }
                self.tokens += tokens;
                match &self.bar {
                    Some(bar) => {
                        if *step == 0 {
                            // Loading is not a step: the estimate starts here.
                            bar.set_style(Self::bar_style(false));
                            bar.reset_eta();
                        }
                        bar.set_message(format!("step {}/{}: {tokens} tokens", step + 1, self.steps));
                    }
                    None => {
                        crate::say!("step {}/{}: {tokens} tokens at position {start_position}", step + 1, self.steps)
                    }
                }
            }
            ForwardEvent::LayerDone { step, layer, layers } => match &self.bar {
                Some(bar) => {
                    let last = self.last_token.map(|t| format!(", last token {t}")).unwrap_or_default();
                    bar.set_message(format!(
                        "step {}/{} layer {}/{layers}, {}{last}",
                        step + 1,
                        self.steps,
                        layer + 1,
                        self.rate()
                    ))
                }
                None => crate::say!("  step {}/{} layer {}/{}", step + 1, self.steps, layer + 1, layers),
            },
            ForwardEvent::StepDone { step, next_token } => match &self.bar {
                // The bar shows the latest token; a line per token would
                // scroll a long run's output away.
                Some(bar) => {
                    self.last_token = *next_token;
                    if *step == 0 {
                        bar.set_style(Self::bar_style(true));
                    }
                    bar.set_position((step + 1) as u64);
                }
                None => {
                    if let Some(t) = next_token {
                        crate::say!("step {}/{}: next token {t}", step + 1, self.steps);
                    }
                }
            },
        }
    }

    /// Tokens per second since the first step began.
    fn rate(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        if secs < 1e-3 { String::new() } else { format!("{:.1} tokens/s", self.tokens as f64 / secs) }
    }

    /// Removes the bar (before the summary is printed).
    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The spinner's style before the first step; with a meter, the current
/// loading phase's bytes while it is unfinished ("generating synthetic
/// weights: 1.2 of 3.4 GB (35%)").
fn loading_style(meter: Option<LoadMeter>) -> ProgressStyle {
    let style = ProgressStyle::with_template("{elapsed_precise} {spinner} {msg}{load}").expect("a valid template");
    style.with_key("load", move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
        if let Some(reading) = meter.as_ref().and_then(LoadMeter::read).filter(|r| r.done < r.total) {
            let _ = write!(w, " ({reading})");
        }
    })
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}
