//! The Python package's stage table (python/moetrace_capture/stages.py) is
//! stage-types' own, generated from `SaveTensorStage::ALL`: this test
//! fails when they drift and writes what the file should hold to
//! target/stages.py.expected (copy it over the file).

use stage_types::{SaveTensorStage, Scope};

fn expected() -> String {
    let mut out = String::from(
        "\"\"\"moetrace's stages, in execution order: (name, scope, applies to, shape,\n\
         element type). Generated from stage-types (tests/python_stages.rs checks\n\
         it); do not edit by hand.\"\"\"\n\nSTAGES = (\n",
    );
    for s in SaveTensorStage::ALL {
        let scope = match s.scope() {
            Scope::Model => "model",
            Scope::Layer => "layer",
        };
        let shape = s.shape().split(' ').next().unwrap_or("");
        out += &format!(
            "    ({:?}, {:?}, {:?}, {:?}, {:?}),\n",
            s.name(),
            scope,
            s.applicability().name(),
            shape,
            s.element_type()
        );
    }
    out += ")\n";
    out
}

#[test]
fn the_python_stage_table_is_stage_types_own() {
    let root = moetrace_tests::workspace_root();
    let path = root.join("python/moetrace_capture/stages.py");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    let want = expected();
    if have != want {
        let dump = root.join("target/stages.py.expected");
        let _ = std::fs::create_dir_all(root.join("target"));
        std::fs::write(&dump, &want).unwrap();
        panic!("{} differs from stage-types; the expected file is at {}", path.display(), dump.display());
    }
}
