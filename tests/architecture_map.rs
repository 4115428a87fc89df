//! ARCHITECTURE.md stays true: every path its code map names exists.

use moetrace_tests::workspace_root;

#[test]
fn every_path_in_architecture_md_exists() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut named = 0;
    for (i, piece) in text.split('`').enumerate() {
        let is_code = i % 2 == 1;
        let looks_like_path =
            piece.contains('/') && !piece.contains(' ') && !piece.contains("..") && !piece.contains('<');
        if is_code && looks_like_path {
            let path = root.join(piece.trim_end_matches('/'));
            assert!(path.exists(), "ARCHITECTURE.md names `{piece}`, which does not exist");
            named += 1;
        }
    }
    assert!(named > 20, "only {named} paths found; did the format change?");
}
