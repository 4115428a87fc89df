//! `diff`: compare two capture folders (ours, the oracle fixtures, or the
//! upstream APRT format) stage by stage.

use std::collections::BTreeSet;
use std::path::Path;

use stage_types::SaveTensorStage;

use crate::aprt::AprtDir;
use crate::error::{CompareError, Result};
use crate::npy::NpyArray;
use crate::reader::CaptureDir;
use crate::scope::ExpertIds;
use crate::{Report, ScopeTensors, Tolerances, compare_scope};

/// Whether two captures' model configs (config.json, as their manifests
/// record it) compute the same thing; Err says why one cannot be read.
/// Supplied by whoever knows model configs (the CLI: pipeline's
/// `ModelConfig::same_computation_json`), so this crate keeps no copy of
/// their key spellings.
pub type SameModel = fn(&serde_json::Value, &serde_json::Value) -> Result<bool, String>;

/// Options of a diff.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// rel_l2 tolerances.
    pub tolerances: Tolerances,
    /// Compare even if prompts or model configs differ.
    pub force: bool,
    /// How to tell whether the two model configs are one computation;
    /// None: not checked (a note says so).
    pub same_model: Option<SameModel>,
}

/// One side of a diff.
enum Source {
    Capture(Box<CaptureDir>),
    Aprt(AprtDir),
}

impl Source {
    fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CompareError::Io {
                action: "cannot open capture",
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            });
        }
        if dir.join("manifest.json").is_file() || !AprtDir::detect(dir) {
            Ok(Source::Capture(Box::new(CaptureDir::open(dir)?)))
        } else {
            Ok(Source::Aprt(AprtDir::open(dir)?))
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Capture(c) => format!(
                "{} ({} {}, {} tensors)",
                c.dir.display(),
                c.manifest.backend,
                c.manifest.dtype,
                c.manifest.tensors.len()
            ),
            Source::Aprt(a) => format!("{} (APRT, step 0 only)", a.dir.display()),
        }
    }

    fn dtype(&self) -> String {
        match self {
            Source::Capture(c) => c.manifest.dtype.clone(),
            Source::Aprt(_) => "f32".into(),
        }
    }

    /// Stage names this version does not know (APRT files of unknown
    /// stages are listed by their file stems).
    fn unknown_stages(&self) -> Vec<String> {
        match self {
            Source::Capture(c) => c.unknown_stages(),
            Source::Aprt(a) => a.unknown_stages().to_vec(),
        }
    }

    fn keys(&self) -> Vec<(usize, Option<usize>, SaveTensorStage)> {
        match self {
            Source::Capture(c) => c.keys(),
            Source::Aprt(a) => a.keys().into_iter().map(|(l, s)| (0, l, s)).collect(),
        }
    }

    fn load(&self, key: (usize, Option<usize>, SaveTensorStage)) -> Result<Option<NpyArray>> {
        match self {
            Source::Capture(c) => c.load(key.0, key.1, key.2),
            Source::Aprt(a) => a.load(key.1, key.2),
        }
    }
}

/// Compares two capture folders.
pub fn diff(reference: &Path, target: &Path, options: &DiffOptions) -> Result<Report> {
    let (r, t) = (Source::open(reference)?, Source::open(target)?);
    let mut report = Report { reference: r.describe(), target: t.describe(), ..Report::default() };
    let mut skip_steps = BTreeSet::new();
    if let (Source::Capture(rc), Source::Capture(tc)) = (&r, &t) {
        let mismatch = |what: String| CompareError::NotComparable {
            path: target.to_path_buf(),
            message: format!("{what}; these captures are not of the same computation (pass --force to compare anyway)"),
        };
        if rc.manifest.prompt != tc.manifest.prompt {
            let message =
                format!("prompts differ: reference {:?}, target {:?}", rc.manifest.prompt, tc.manifest.prompt);
            if !options.force {
                return Err(mismatch(message));
            }
            report.notes.push(format!("forced: {message}"));
        }
        let (rm, tm) = (&rc.manifest.model.config, &tc.manifest.model.config);
        match options.same_model.map(|same| same(rm, tm)) {
            Some(Ok(true)) => {}
            Some(Ok(false)) => {
                let message = "model configs differ".to_string();
                if !options.force {
                    return Err(mismatch(message));
                }
                report.notes.push(format!("forced: {message}"));
            }
            Some(Err(why)) => report.notes.push(format!("model configs not compared: {why}")),
            None => report.notes.push("model configs not compared".to_string()),
        }
        for rs in &rc.manifest.steps {
            if let Some(ts) = tc.manifest.steps.iter().find(|s| s.step == rs.step)
                && (ts.tokens != rs.tokens || ts.start_position != rs.start_position)
                && !options.force
            {
                skip_steps.insert(rs.step);
                report.notes.push(format!(
                    "step {} not compared: it fed different tokens (reference {:?}, target {:?}), a consequence of an earlier divergence",
                    rs.step, rs.tokens, ts.tokens
                ));
            }
        }
    }
    // APRT holds step 0 only: the other side's later steps are not in that
    // capture, which is not a divergence.
    if matches!(r, Source::Aprt(_)) || matches!(t, Source::Aprt(_)) {
        let later: BTreeSet<usize> = r.keys().into_iter().chain(t.keys()).map(|k| k.0).filter(|&s| s > 0).collect();
        if let (Some(first), Some(last)) = (later.first(), later.last()) {
            report.notes.push(format!(
                "steps {first}..={last} not compared: not in this capture (an APRT export holds step 0 only)"
            ));
        }
        skip_steps.extend(later);
    }
    for (side, source) in [("reference", &r), ("target", &t)] {
        if let Source::Capture(c) = source
            && let Some(forced) = &c.manifest.teacher_forced
        {
            report.notes.push(format!(
                "{side}: a teacher-forced capture ({forced}): each tensor is that stage's own output on forced inputs, so errors do not accumulate along it"
            ));
        }
        let unknown = source.unknown_stages();
        if !unknown.is_empty() {
            report.notes.push(format!(
                "{side}: tensors of unknown stage names ignored: {} (`moetrace stages` lists the known ones)",
                unknown.join(", ")
            ));
        }
    }
    let mut keys: Vec<_> = r.keys().into_iter().chain(t.keys()).filter(|k| !skip_steps.contains(&k.0)).collect();
    keys.sort_by_key(|&(step, layer, stage)| (step, scope_rank(layer, stage), stage));
    keys.dedup();
    let (r_dtype, t_dtype) = (r.dtype(), t.dtype());
    let dtype = Tolerances::coarser_dtype(&r_dtype, &t_dtype).to_string();
    let mut one_sided = 0;
    let mut i = 0;
    while i < keys.len() {
        let (step, layer) = (keys[i].0, keys[i].1);
        let scope_rank_now = scope_rank(layer, keys[i].2);
        // The scope's arrays, read once; the comparison borrows them.
        let mut loaded = Vec::new();
        while i < keys.len()
            && keys[i].0 == step
            && keys[i].1 == layer
            && scope_rank(keys[i].1, keys[i].2) == scope_rank_now
        {
            let key = keys[i];
            let (mut a, mut b) = (r.load(key)?, t.load(key)?);
            // APRT files carry no shape: take it from the other side.
            if let (Some(x), Some(y)) = (&mut a, &mut b) {
                if matches!(r, Source::Aprt(_)) && x.len() == y.len() {
                    x.shape = y.shape.clone();
                } else if matches!(t, Source::Aprt(_)) && x.len() == y.len() {
                    y.shape = x.shape.clone();
                }
            }
            one_sided += usize::from(a.is_none() != b.is_none());
            loaded.push((key.2, a, b));
            i += 1;
        }
        let scope: ScopeTensors<'_> = loaded
            .iter()
            .map(|(stage, a, b)| (*stage, (a.as_ref().map(NpyArray::view), b.as_ref().map(NpyArray::view))))
            .collect();
        report.rows.extend(compare_scope(step, layer, &scope, &options.tolerances, &dtype, ExpertIds::EachSide, None));
    }
    if one_sided > 0 {
        report.notes.push(format!("{one_sided} tensors were captured on one side only (rows marked missing)"));
    }
    if let Source::Capture(rc) = &r {
        let starts: Vec<(usize, usize)> = rc.manifest.steps.iter().map(|s| (s.step, s.start_position)).collect();
        report.name_tokens(&rc.manifest.token_texts, &starts);
    }
    if report.rows.iter().all(|row| matches!(row.verdict, crate::Verdict::Missing { .. })) {
        let mut message = format!(
            "nothing to compare: no (step, layer, stage) was captured on both sides (reference {} tensors of known stages, target {})",
            r.keys().len(),
            t.keys().len()
        );
        for note in &report.notes {
            message.push_str("; ");
            message.push_str(note);
        }
        return Err(CompareError::NotComparable { path: target.to_path_buf(), message });
    }
    Ok(report)
}

/// Orders prologue model stages first, then layers, then the epilogue.
fn scope_rank(layer: Option<usize>, stage: SaveTensorStage) -> (u8, usize) {
    match layer {
        Some(l) => (1, l),
        None if stage < SaveTensorStage::AttnNorm => (0, 0),
        None => (2, 0),
    }
}
