//! gpt-oss's experts as its Hugging Face checkpoint stacks them, unpacked
//! into moetrace's per-expert tensors (`mlp.experts.{e}.gate_proj.weight`
//! and `.bias`, `up_proj`, `down_proj`). Per layer the checkpoint holds
//! `mlp.experts.gate_up_proj` and `down_proj` either as MXFP4, as the hub
//! ships them (`*_blocks` u8 `[E, rows, G, 16]`, `*_scales` e8m0 u8
//! `[E, rows, G]`; a row is one output over G * 32 inputs), or plain,
//! transposed (`gate_up_proj` `[E, H, 2I]`, `down_proj` `[E, I, H]`); and
//! `gate_up_proj_bias` `[E, 2I]`, `down_proj_bias` `[E, H]`. Gate and up
//! are interleaved: output 2j is gate j, 2j + 1 is up j (transformers'
//! `gate_up[..., ::2]`, `[..., 1::2]`). MXFP4 rows become GGUF MXFP4 rows
//! (the same codes: `quant_legacy::repack_hf_mxfp4`); plain weights keep
//! their element type; biases become f32.

use std::path::Path;

use super::gguf::GgmlType;
use super::quant_legacy::{MXFP4_BLOCK_BYTES, repack_hf_mxfp4};
use super::{WeightDtype, WeightStore, WeightTensor};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};

/// Values per MXFP4 block.
const MXFP4_VALUES: usize = 32;

/// Replaces every layer's stacked experts in `store` by per-expert
/// tensors. A layer with no stacked experts is left as it is (a
/// checkpoint already per expert); a stacked tensor of the wrong shape,
/// scales that do not match their blocks, or a half-present pair are
/// errors naming the tensor.
pub fn unpack(store: WeightStore, config: &ModelConfig, path: &Path) -> Result<WeightStore> {
    let bad = |message: String| PipelineError::BadSafetensors { path: path.to_path_buf(), message };
    let (e_count, h, i) = (config.num_experts, config.hidden_size, config.moe_intermediate_size);
    let (mut made, mut consumed) = (Vec::new(), std::collections::HashSet::new());
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}.mlp.experts.");
        let find = |name: &str| store.id(&format!("{p}{name}")).map(|id| store.get(id));
        // (projection, rows per expert, inputs per row)
        for (proj, rows, inputs) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
            let rows_of = match (find(&format!("{proj}_blocks")), find(&format!("{proj}_scales")), find(proj)) {
                (Some(blocks), Some(scales), _) => mxfp4_rows(blocks, scales, e_count, rows, inputs).map_err(bad)?,
                (None, None, Some(plain)) => plain_rows(plain, e_count, rows, inputs).map_err(bad)?,
                (None, None, None) => continue,
                (b, _, _) => {
                    let missing = if b.is_some() { "_scales" } else { "_blocks" };
                    return Err(bad(format!("`{p}{proj}{missing}` is missing: MXFP4 needs blocks and scales")));
                }
            };
            let bias = find(&format!("{proj}_bias"))
                .ok_or_else(|| bad(format!("`{p}{proj}_bias` is missing: gpt-oss's experts have biases")))?;
            if bias.shape != [e_count, rows] {
                return Err(bad(format!("`{}` is {:?}, not [{e_count}, {rows}]", bias.describe(), bias.shape)));
            }
            let bias = bias.to_f32_vec();
            consumed.extend(["", "_blocks", "_scales", "_bias"].map(|suffix| format!("{p}{proj}{suffix}")));
            for e in 0..e_count {
                // (canonical projection, the checkpoint rows it takes)
                let parts: Vec<(&str, Vec<usize>)> = if proj == "gate_up_proj" {
                    vec![
                        ("gate_proj", (0..i).map(|j| 2 * j).collect()),
                        ("up_proj", (0..i).map(|j| 2 * j + 1).collect()),
                    ]
                } else {
                    vec![("down_proj", (0..h).collect())]
                };
                for (name, take) in parts {
                    let (dtype, bytes) = rows_of.gather(e, &take);
                    let shape = vec![take.len(), inputs];
                    made.push(WeightTensor::owned(format!("{p}{e}.{name}.weight"), dtype, shape, bytes));
                    let b: Vec<u8> = take.iter().flat_map(|&r| bias[e * rows + r].to_le_bytes()).collect();
                    made.push(WeightTensor::owned(
                        format!("{p}{e}.{name}.bias"),
                        WeightDtype::F32,
                        vec![take.len()],
                        b,
                    ));
                }
            }
        }
    }
    if made.is_empty() {
        return Ok(store);
    }
    let mut out = store.retain(|t| !consumed.contains(&t.name));
    for t in made {
        out.insert(t);
    }
    Ok(out)
}

/// One stacked projection's rows, by expert, in the form they are kept.
struct StackedRows {
    dtype: WeightDtype,
    /// Bytes of every row, expert-major.
    bytes: Vec<u8>,
    rows: usize,
    row_bytes: usize,
}

impl StackedRows {
    /// Expert `e`'s rows `take`, concatenated.
    fn gather(&self, e: usize, take: &[usize]) -> (WeightDtype, Vec<u8>) {
        let mut out = Vec::with_capacity(take.len() * self.row_bytes);
        for &r in take {
            let at = (e * self.rows + r) * self.row_bytes;
            out.extend_from_slice(&self.bytes[at..at + self.row_bytes]);
        }
        (self.dtype, out)
    }
}

/// MXFP4 blocks and scales as GGUF MXFP4 rows of `inputs` values.
fn mxfp4_rows(
    blocks: &WeightTensor,
    scales: &WeightTensor,
    experts: usize,
    rows: usize,
    inputs: usize,
) -> std::result::Result<StackedRows, String> {
    let groups = inputs.div_ceil(MXFP4_VALUES);
    if blocks.dtype != WeightDtype::U8
        || blocks.shape != [experts, rows, groups, 16]
        || !inputs.is_multiple_of(MXFP4_VALUES)
    {
        return Err(format!(
            "`{}` is {} {:?}: MXFP4 blocks of this model are U8 [{experts}, {rows}, {groups}, 16] ({inputs} inputs a row in blocks of {MXFP4_VALUES})",
            blocks.describe(),
            blocks.dtype.name(),
            blocks.shape
        ));
    }
    if scales.dtype != WeightDtype::U8 || scales.shape != blocks.shape[..3] {
        return Err(format!(
            "`{}` is {} {:?}, which does not match its blocks {:?}: MXFP4 has one U8 (e8m0) scale per block, [{experts}, {rows}, {groups}]",
            scales.describe(),
            scales.dtype.name(),
            scales.shape,
            blocks.shape
        ));
    }
    let (b, s) = (blocks.bytes(), scales.bytes());
    let mut bytes = Vec::with_capacity(experts * rows * groups * MXFP4_BLOCK_BYTES);
    for r in 0..experts * rows {
        repack_hf_mxfp4(&b[r * groups * 16..(r + 1) * groups * 16], &s[r * groups..(r + 1) * groups], &mut bytes);
    }
    Ok(StackedRows { dtype: WeightDtype::Quant(GgmlType::MXFP4), bytes, rows, row_bytes: groups * MXFP4_BLOCK_BYTES })
}

/// A plain stacked projection, `[E, inputs, rows]` (transposed, as
/// transformers keeps it), as rows of `inputs` values.
fn plain_rows(
    t: &WeightTensor,
    experts: usize,
    rows: usize,
    inputs: usize,
) -> std::result::Result<StackedRows, String> {
    let size = match t.dtype {
        WeightDtype::Bf16 | WeightDtype::F16 => 2,
        WeightDtype::F32 => 4,
        other => return Err(format!("`{}` is {}: plain experts are BF16, F16 or F32", t.describe(), other.name())),
    };
    if t.shape != [experts, inputs, rows] {
        return Err(format!("`{}` is {:?}, not [{experts}, {inputs}, {rows}]", t.describe(), t.shape));
    }
    let src = t.bytes();
    let mut bytes = vec![0u8; src.len()];
    for e in 0..experts {
        for x in 0..inputs {
            for r in 0..rows {
                let from = ((e * inputs + x) * rows + r) * size;
                let to = ((e * rows + r) * inputs + x) * size;
                bytes[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
    }
    Ok(StackedRows { dtype: t.dtype, bytes, rows, row_bytes: inputs * size })
}

/// `store` with one MXFP4 scale byte of `name` off by one (its first
/// block's exponent plus one: that block's values doubled); the same ids.
/// For [`crate::backend::cpu::known_bugs::KnownBug::Mxfp4ScaleOffByOne`].
pub fn with_scale_off_by_one(store: &WeightStore, name: &str) -> std::result::Result<WeightStore, String> {
    let id = store.id(name).ok_or_else(|| format!("the model has no tensor `{name}`"))?;
    let t = store.get(id);
    if t.dtype != WeightDtype::Quant(GgmlType::MXFP4) {
        return Err(format!("`{}` is {}, not MXFP4", t.describe(), t.dtype.name()));
    }
    let mut bytes = t.bytes().into_owned();
    bytes[0] = bytes[0].wrapping_add(1);
    let mut out = WeightStore::default();
    for (i, other) in store.tensors().iter().enumerate() {
        out.insert(if i == id.0 as usize {
            WeightTensor::owned(t.name.clone(), t.dtype, t.shape.clone(), bytes.clone())
        } else {
            other.clone()
        });
    }
    Ok(out)
}
