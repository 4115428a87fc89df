//! The kernel sources, one .cu file per family under `kernels/`, embedded
//! at build time; [`source`] prepends `common.cuh` (NVRTC reads no files).

/// Shared helpers.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel family: (name, source).
pub const FAMILIES: &[(&str, &str)] = &[
    ("attention", include_str!("../kernels/attention.cu")),
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("linear", include_str!("../kernels/linear.cu")),
    ("moe", include_str!("../kernels/moe.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("quant", include_str!("../kernels/quant.cu")),
    ("synthetic", include_str!("../kernels/synthetic.cu")),
];

/// The full translation unit of a family: common.cuh, then the family's
/// source with its `#include "common.cuh"` line removed.
pub fn source(family: &str) -> Option<String> {
    FAMILIES.iter().find(|(name, _)| *name == family).map(|(_, text)| {
        let body: String =
            text.lines().filter(|l| l.trim() != "#include \"common.cuh\"").map(|l| format!("{l}\n")).collect();
        format!("{}\n{body}", COMMON.replace("#pragma once", ""))
    })
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
    }
}
