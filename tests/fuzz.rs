//! Fuzzing on stable Rust, in CI, in a fixed time: every parser of user
//! input is fed its committed corpus (tests/fuzz-corpus/<target>/, each
//! file a plain test case) and then thousands of structure-aware mutations
//! of it (proptest: byte flips, splices of the format's own tokens, extreme
//! numbers, truncations, duplications). For every input: no panic, and no
//! single allocation larger than a bound proportional to the input (1 MiB
//! plus 16 bytes per input byte), checked by a counting global allocator.
//!
//! `MOETRACE_FUZZ_CASES` (default 100 000 per target) and
//! `MOETRACE_FUZZ_SEED` (a number; default fixed, so CI is reproducible)
//! tune a longer hunt: `MOETRACE_FUZZ_CASES=200000 MOETRACE_FUZZ_SEED=$RANDOM
//! cargo test --release -p moetrace-tests --test fuzz`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// The system allocator, noting the largest single request made on each
/// thread while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest single allocation a parser may make for `len` input bytes.
fn allocation_bound(len: usize) -> usize {
    (1 << 20) + 16 * len
}

/// Runs `target` on `input` and checks the allocation bound.
fn check(target: fn(&[u8]) -> bool, input: &[u8]) -> Result<bool, String> {
    check_within(target, input, 0)
}

/// [`check`] allowing `extra` bytes beyond the bound (a chat template's
/// rendered text may grow to its own bound, whatever the input's size).
fn check_within(target: fn(&[u8]) -> bool, input: &[u8], extra: usize) -> Result<bool, String> {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let parsed = target(input);
    ARMED.with(|a| a.set(false));
    let largest = LARGEST.with(Cell::get);
    if largest > allocation_bound(input.len()) + extra {
        return Err(format!(
            "an allocation of {largest} bytes for {} input bytes (bound {})",
            input.len(),
            allocation_bound(input.len())
        ));
    }
    Ok(parsed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---- the targets: each parses, and where it succeeds, uses the result;
// each says whether the input parsed ----

fn run_config(bytes: &[u8]) -> bool {
    let Ok(c) = session::RunConfig::parse(&text(bytes), Path::new("fuzz/run.ron")) else { return false };
    let _ = (c.prompt_tokens().len(), c.step_count(), format!("{:?}", c.session.faults));
    true
}

fn bisect_config(bytes: &[u8]) -> bool {
    session::bisect::BisectConfig::parse(&text(bytes), Path::new("fuzz/bisect.ron")).is_ok()
}

fn fault_spec(bytes: &[u8]) -> bool {
    let t = text(bytes);
    let Ok(f) = t.parse::<session::faults::FaultSpec>() else { return false };
    // What it prints parses back to the same fault.
    let again: session::faults::FaultSpec = f.to_string().parse().expect("a printed fault parses");
    assert_eq!(again, f, "`{t}` printed as `{f}`");
    true
}

fn ranges(bytes: &[u8]) -> bool {
    let t = text(bytes);
    let set = stage_types::IndexSet::parse_layers(&t);
    if let Ok(set) = &set {
        let again = stage_types::IndexSet::parse_layers(&set.to_string()).expect("a printed range parses");
        assert_eq!(&again, set);
        let _ = (set.contains(0), set.contains(usize::MAX), set.check_within(48, "layer"));
    }
    let list = t.parse::<stage_types::StageList>();
    if let Ok(list) = list {
        assert_eq!(list.to_string().parse::<stage_types::StageList>().expect("a printed list parses"), list);
    }
    set.is_ok() || list.is_ok()
}

fn npy(bytes: &[u8]) -> bool {
    let Ok(a) = compare::npy::parse_npy(bytes) else { return false };
    assert_eq!(a.values().len(), a.shape.iter().product::<usize>());
    true
}

fn safetensors(bytes: &[u8]) -> bool {
    let Ok(tensors) = pipeline::weights::index_safetensors(bytes) else { return false };
    for t in tensors {
        assert!(t.start <= t.end && t.end <= bytes.len(), "{t:?} outside {} bytes", bytes.len());
    }
    true
}

fn gguf(bytes: &[u8]) -> bool {
    let Ok(h) = pipeline::weights::gguf::GgufHeader::parse(bytes, Path::new("fuzz.gguf")) else { return false };
    for t in &h.tensors {
        assert!(t.offset >= h.data_offset && t.offset + t.byte_len <= bytes.len() as u64, "{t:?} outside the file");
    }
    true
}

fn config_json(bytes: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) else { return false };
    let Ok(c) = pipeline::ModelConfig::from_json(json, Path::new("fuzz/config.json")) else { return false };
    let moe_layers = (0..c.num_layers).filter(|&l| c.is_moe_layer(l)).count();
    let _ = (c.qkv_width(), c.forward_bytes(1 << 20, 1 << 24, true), moe_layers);
    true
}

fn manifest(bytes: &[u8]) -> bool {
    let Ok(m) = compare::Manifest::parse(&text(bytes), Path::new("fuzz/manifest.json")) else { return false };
    let _ = pipeline::ModelConfig::same_computation_json(&m.model.config, &m.model.config);
    true
}

fn aprt(bytes: &[u8]) -> bool {
    let mut parsed = false;
    for layer in [0, 0xFFFF_FFFF] {
        if let Ok(values) = compare::aprt::parse_aprt(bytes, layer) {
            assert_eq!(values.len() * 4 + 12, bytes.len());
            parsed = true;
        }
    }
    parsed
}

fn report(bytes: &[u8]) -> bool {
    let Ok(r) = compare::Report::from_json(&text(bytes), Path::new("fuzz/report.json")) else { return false };
    let _ = (r.findings(), r.first_divergence(), r.to_json(), compare::html::render_html(&[&r]));
    true
}

/// A minimal tokenizer.json (a word-level vocabulary), for the chat
/// template target.
const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hi":1,"user":2},"unk_token":"[UNK]"}}"#;

/// tokenizer_config.json: its chat template parsed and rendered (with less
/// fuel than a run's, so a looping mutation ends quickly) and encoded.
fn chat_template(bytes: &[u8]) -> bool {
    let path = Path::new("fuzz/tokenizer.json");
    let Ok(tok) = session::prompt::PromptTokenizer::from_parts(path, TINY_TOKENIZER.as_bytes(), Some(&text(bytes)))
    else {
        return false;
    };
    let messages = [session::prompt::ChatMessage { role: "user".into(), content: "hi".into() }];
    let Ok(rendered) = tok.render_chat_with_fuel(&messages, 20_000) else { return false };
    let _ = tok.encode_text(&rendered);
    true
}

/// A routing capture's manifest.json (beside valid routing files), opened
/// by routing replay against the tiny-moe model and read at step 0.
fn replay(bytes: &[u8]) -> bool {
    let dir = REPLAY_DIR.get().expect("made before fuzzing");
    {
        std::fs::write(dir.join("manifest.json"), bytes).unwrap();
        let model = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap().config(Some(2)).unwrap();
        let Ok(r) = session::replay::Replay::open(dir, &model, &[1, 17, 423], 2, Path::new("fuzz/replay.ron")) else {
            return false;
        };
        let _ = r.step_tokens(2);
        true
    }
}

/// The replay target's folder, made before the allocator is armed.
static REPLAY_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A routing capture of tiny-moe (2 layers, prompt [1, 17, 423], 2 steps)
/// to mutate the manifest of: its manifest is the corpus seed.
fn replay_folder() -> PathBuf {
    let dir = moetrace_tests::scratch("fuzz-replay");
    let config = dir.join("make.ron");
    std::fs::write(
        &config,
        "(model: Synthetic(preset: \"tiny-moe\", seed: 1, layers: 2), prompt: Tokens([1, 17, 423]), generate: 2, capture: (stages: \"moe_router,moe_router_indices\", out_dir: \"capture\"))",
    )
    .unwrap();
    let run = session::RunConfig::load(&config).unwrap();
    session::run(&run, &config, &mut |_| {}).unwrap();
    dir.join("capture")
}

/// Tokens of the formats, spliced in by mutations.
const TOKENS: &[&[u8]] = &[
    b"(",
    b")",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b"\"",
    b"'",
    b"..",
    b"@",
    b"#",
    b"=",
    b".",
    b"Some(",
    b"None",
    b"all",
    "\u{feff}".as_bytes(),
    b"-1",
    b"0",
    b"1.5",
    b"1e308",
    b"NaN",
    b"inf",
    b"18446744073709551615",
    b"18446744073709551616",
    b"4294967296",
    b"9999999999999999999999",
    b"true",
    b"null",
    b"\\u0000",
    b"\x00",
    "\u{1F600}".as_bytes(),
    b"layers: 0",
    b"shape",
    b"data_offsets",
    b"APRT",
    b"\x93NUMPY",
    b"moe_router",
    b"layer_output",
    b"Cuda(device: 0, dtype: Bf16)",
    b"Replay(\"\")",
    b"Path(\"\")",
];

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip { at: usize, bit: u8 },
    Byte { at: usize, value: u8 },
    Token { at: usize, token: usize },
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize },
    Truncate { at: usize },
    LeNumber { at: usize, value: u64 },
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let extreme =
        prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 32), Just(1 << 62), Just(u32::MAX as u64), any::<u64>()];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Edit::Byte { at, value }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Edit::Token { at, token }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 1usize..256).prop_map(|(at, len)| Edit::Duplicate { at, len }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
        (any::<usize>(), extreme).prop_map(|(at, value)| Edit::LeNumber { at, value }),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let pos = |at: usize, b: &Vec<u8>| if b.is_empty() { 0 } else { at % (b.len() + 1) };
        match *e {
            Edit::Flip { at, bit } if !b.is_empty() => {
                let i = at % b.len();
                b[i] ^= 1 << bit;
            }
            Edit::Byte { at, value } if !b.is_empty() => {
                let i = at % b.len();
                b[i] = value;
            }
            Edit::Token { at, token } => {
                let i = pos(at, &b);
                b.splice(i..i, TOKENS[token].iter().copied());
            }
            Edit::Delete { at, len } => {
                let i = pos(at, &b);
                b.drain(i..(i + len).min(b.len()));
            }
            Edit::Duplicate { at, len } => {
                let i = pos(at, &b);
                let copy: Vec<u8> = b[i..(i + len).min(b.len())].to_vec();
                b.splice(i..i, copy);
            }
            Edit::Truncate { at } => b.truncate(pos(at, &b)),
            Edit::LeNumber { at, value } if b.len() >= 8 => {
                let i = at % (b.len() - 7);
                b[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn cases() -> u32 {
    std::env::var("MOETRACE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn seed() -> u64 {
    std::env::var("MOETRACE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6d6f_6574_7261_6365)
}

/// The corpus as plain tests, then the mutations.
fn fuzz(name: &str, target: fn(&[u8]) -> bool) {
    let extra = if name == "chat_template" { 2 * session::prompt::TEMPLATE_MAX_OUTPUT } else { 0 };
    let check = |target, input: &[u8]| check_within(target, input, extra);
    if name == "replay" {
        REPLAY_DIR.get_or_init(replay_folder);
    }
    let seeds = corpus(name);
    for (path, bytes) in &seeds {
        let parsed = check(target, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(parsed, "corpus file {} does not parse: a seed must be a valid input", path.display());
    }
    let config = Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let strategy = (0..seeds.len(), proptest::collection::vec(edit_strategy(), 1..8));
    let mut runner = TestRunner::new(config);
    let (tried, parsed) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&strategy, |(which, edits)| {
        let input = apply(&seeds[which].1, &edits);
        tried.set(tried.get() + 1);
        parsed.set(parsed.get() + u32::from(check(target, &input).map_err(TestCaseError::fail)?));
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    eprintln!("fuzz target {name}: {} mutated inputs, {} of them parsed", tried.get(), parsed.get());
    assert!(tried.get() >= cases(), "{name}: only {} cases ran", tried.get());
    // Mutations that keep an input valid reach past the first checks.
    assert!(parsed.get() > 0, "{name}: no mutated input parsed; the mutations reach nothing deep");
}

macro_rules! fuzz_targets {
    ($($name:ident),* $(,)?) => {
        mod fuzz_targets {
            $(
                #[test]
                fn $name() {
                    super::fuzz(stringify!($name), super::$name);
                }
            )*
        }
    };
}

fuzz_targets!(
    run_config,
    bisect_config,
    fault_spec,
    ranges,
    npy,
    safetensors,
    gguf,
    config_json,
    manifest,
    aprt,
    report,
    chat_template,
    replay
);

#[test]
fn the_allocation_bound_catches_a_large_allocation() {
    fn greedy(bytes: &[u8]) -> bool {
        let v = vec![0u8; allocation_bound(bytes.len()) + 1];
        std::hint::black_box(v);
        true
    }
    assert!(check(greedy, b"x").is_err());
    assert!(check(npy, b"x").is_ok());
}
