//! The kernel sources, one .cu file per family under `kernels/`, embedded
//! at build time; [`source`] prepends `common.cuh` and puts each other
//! header a family includes in place of its `#include` line (NVRTC reads
//! no files).

/// Shared helpers.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// Headers a family may include besides common.cuh: (file name, text).
pub const HEADERS: &[(&str, &str)] = &[("blocks.cuh", include_str!("../kernels/blocks.cuh"))];

/// Every kernel family: (name, source).
pub const FAMILIES: &[(&str, &str)] = &[
    ("attention", include_str!("../kernels/attention.cu")),
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("linear", include_str!("../kernels/linear.cu")),
    ("mla", include_str!("../kernels/mla.cu")),
    ("moe", include_str!("../kernels/moe.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("oss", include_str!("../kernels/oss.cu")),
    ("quant", include_str!("../kernels/quant.cu")),
    ("reference", include_str!("../kernels/reference.cu")),
    ("synthetic", include_str!("../kernels/synthetic.cu")),
];

/// The full translation unit of a family: common.cuh, then the family's
/// source with its `#include "common.cuh"` lines removed and each header
/// of [`HEADERS`] it includes in the include's place (headers include
/// only common.cuh).
pub fn source(family: &str) -> Option<String> {
    FAMILIES
        .iter()
        .find(|(name, _)| *name == family)
        .map(|(_, text)| format!("{}\n{}", COMMON.replace("#pragma once", ""), inline_headers(text)))
}

/// `text` with its includes resolved as [`source`] describes.
fn inline_headers(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let included = line.trim().strip_prefix("#include \"").and_then(|rest| rest.strip_suffix('"'));
        match included {
            Some("common.cuh") => {}
            Some(name) if let Some((_, header)) = HEADERS.iter().find(|(h, _)| *h == name) => {
                out.push_str(&inline_headers(&header.replace("#pragma once", "")));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_its_entry_points_and_the_common_helpers() {
        for (name, _) in FAMILIES {
            let src = source(name).unwrap();
            assert!(src.contains("f32_to_bf16_bits"), "{name}");
            assert!(!src.contains("#include \"common.cuh\""), "{name}");
            assert!(src.contains("extern \"C\" __global__"), "{name}");
        }
        assert!(source("nope").is_none());
        let quant = source("quant").unwrap();
        assert!(quant.contains("struct Raw8") && !quant.contains("#include"), "blocks.cuh inlined");
        assert_eq!(quant.matches("f32_to_bf16_bits(float x)").count(), 1, "common.cuh once");
    }
}
