//! The durable edit state through its public API: round trips, refusals, crash leftovers.

use std::fs;
use std::path::Path;

use elder::elder::codebook::Codebook;
use elder::elder::state::{self, EditState, NamedTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

fn config() -> Value {
    json!({"experts": 4, "top_k": 2, "rank": 8, "layers": [10, 11, 12], "threshold": 12})
}

fn random_tensors(rng: &mut ChaCha8Rng) -> Vec<NamedTensor> {
    [
        ("layer10.router.w", vec![4, 16]),
        ("layer10.expert0.a", vec![8, 16]),
        ("layer10.router.b", vec![4]),
    ]
    .into_iter()
    .map(|(name, shape)| {
        let n = shape.iter().product();
        NamedTensor {
            name: name.to_string(),
            shape,
            data: (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        }
    })
    .collect()
}

fn random_codebook(rng: &mut ChaCha8Rng, base: Option<&Codebook>, extra: usize) -> Codebook {
    let mut book = base.cloned().unwrap_or_else(|| Codebook::new(100).unwrap());
    for _ in 0..extra {
        let bits: Vec<bool> = (0..100).map(|_| rng.gen_bool(0.2)).collect();
        book.push_bits(&bits).unwrap();
    }
    book
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sorted(mut tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

#[test]
fn commits_round_trip_and_resume_after_applied_ids() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let mut state = EditState::create(&state_dir, config(), "gpt2:abc").unwrap();
    assert!(state.applied_ids().is_empty() && state.codebook().is_none());

    let fresh = EditState::open(&state_dir, &config(), "gpt2:abc").unwrap();
    assert_eq!(fresh.generation(), 0);
    assert!(fresh.tensors().is_empty());

    let tensors1 = random_tensors(&mut rng);
    let book1 = random_codebook(&mut rng, None, 2);
    state
        .commit(&tensors1, &book1, b"edits", &ids(&["a", "b"]))
        .unwrap();
    let tensors2 = random_tensors(&mut rng);
    let book2 = random_codebook(&mut rng, Some(&book1), 1);
    state
        .commit(&tensors2, &book2, b"edits", &ids(&["c"]))
        .unwrap();

    let reopened = EditState::open(&state_dir, &config(), "gpt2:abc").unwrap();
    assert_eq!(reopened.generation(), 2);
    assert_eq!(reopened.applied_ids(), ids(&["a", "b", "c"]).as_slice());
    assert_eq!(reopened.tensors(), sorted(tensors2.clone()).as_slice());
    assert_eq!(
        reopened.tensor("layer10.router.b"),
        tensors2.iter().find(|t| t.name == "layer10.router.b")
    );
    assert_eq!(reopened.codebook(), Some(&book2));
    assert_eq!(reopened.manifest().codebook_entries, 3);
    assert_eq!(reopened.manifest().method_config, config());
    assert!(reopened.manifest().updated_unix_s >= reopened.manifest().created_unix_s);

    // Only the current generation's files and the previous one's (to roll back to) remain.
    assert_eq!(
        file_names(&state_dir),
        [
            "codebook-000001.bin",
            "codebook-000002.bin",
            "experts-000001.safetensors",
            "experts-000002.safetensors",
            "manifest-000001.json",
            "manifest-000002.json",
            "manifest.json",
            "memory-000001.jsonl",
            "memory-000002.jsonl"
        ]
    );
}

#[test]
fn refuses_another_base_model_or_config() {
    let dir = tempfile::tempdir().unwrap();
    EditState::create(dir.path(), config(), "gpt2:abc").unwrap();

    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "llama:xyz").unwrap_err()
    );
    assert!(err.contains("another base model"), "{err}");
    assert!(
        err.contains("gpt2:abc") && err.contains("llama:xyz"),
        "{err}"
    );

    let mut other = config();
    other["rank"] = json!(16);
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &other, "gpt2:abc").unwrap_err()
    );
    assert!(err.contains("incompatible method config"), "{err}");
    assert!(err.contains("rank: state has 8, requested 16"), "{err}");

    let err = format!(
        "{:#}",
        EditState::create(dir.path(), config(), "gpt2:abc").unwrap_err()
    );
    assert!(err.contains("already exists"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        EditState::open(empty.path(), &config(), "gpt2:abc").unwrap_err()
    );
    assert!(err.contains("no edit state"), "{err}");
}

#[test]
fn crash_leftovers_do_not_change_the_committed_state() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let dir = tempfile::tempdir().unwrap();
    let mut state = EditState::create(dir.path(), config(), "fp").unwrap();
    let tensors = random_tensors(&mut rng);
    let book = random_codebook(&mut rng, None, 1);
    state
        .commit(&tensors, &book, b"edits", &ids(&["e1"]))
        .unwrap();

    // What a crash mid-commit can leave: the next generation's files, possibly truncated, and a
    // temp file of an unfinished manifest write.
    fs::write(dir.path().join("experts-000002.safetensors"), b"truncated").unwrap();
    fs::write(dir.path().join("codebook-000002.bin"), b"ELDCODE1").unwrap();
    fs::write(
        dir.path().join(".tmp-999-0-manifest.json"),
        b"{\"format_ver",
    )
    .unwrap();

    let mut reopened = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(reopened.generation(), 1);
    assert_eq!(reopened.applied_ids(), ids(&["e1"]).as_slice());
    assert_eq!(reopened.tensors(), sorted(tensors).as_slice());
    assert_eq!(reopened.codebook(), Some(&book));

    // Resuming commits over the leftovers and cleans them up.
    let tensors2 = random_tensors(&mut rng);
    let book2 = random_codebook(&mut rng, Some(&book), 1);
    reopened
        .commit(&tensors2, &book2, b"edits", &ids(&["e2"]))
        .unwrap();
    assert_eq!(
        file_names(dir.path()),
        [
            "codebook-000001.bin",
            "codebook-000002.bin",
            "experts-000001.safetensors",
            "experts-000002.safetensors",
            "manifest-000001.json",
            "manifest-000002.json",
            "manifest.json",
            "memory-000001.jsonl",
            "memory-000002.jsonl"
        ]
    );
    let last = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(last.tensors(), sorted(tensors2).as_slice());
    assert_eq!(last.applied_ids(), ids(&["e1", "e2"]).as_slice());
}

#[test]
fn damaged_files_are_detected() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let dir = tempfile::tempdir().unwrap();
    let mut state = EditState::create(dir.path(), config(), "fp").unwrap();
    state
        .commit(
            &random_tensors(&mut rng),
            &random_codebook(&mut rng, None, 2),
            b"edits",
            &ids(&["x"]),
        )
        .unwrap();
    // The memory of applied edits is checked too.
    let memory = dir.path().join("memory-000001.jsonl");
    let good = fs::read(&memory).unwrap();
    fs::write(&memory, b"edit!").unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(err.contains("memory-000001.jsonl is damaged"), "{err}");
    fs::write(&memory, good).unwrap();

    let experts = dir.path().join("experts-000001.safetensors");
    let mut bytes = fs::read(&experts).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&experts, &bytes).unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(
        err.contains("experts-000001.safetensors is damaged"),
        "{err}"
    );

    fs::remove_file(&experts).unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(err.contains("experts-000001.safetensors"), "{err}");

    fs::write(
        dir.path().join("manifest.json"),
        b"{\"format_version\": 99}",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(err.contains("format_version Some(99)"), "{err}");
}

#[test]
fn bad_commits_are_refused_and_change_nothing() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let dir = tempfile::tempdir().unwrap();
    let mut state = EditState::create(dir.path(), config(), "fp").unwrap();
    let tensors = random_tensors(&mut rng);
    let book = random_codebook(&mut rng, None, 2);
    state
        .commit(&tensors, &book, b"edits", &ids(&["a"]))
        .unwrap();

    let err = format!(
        "{:#}",
        state
            .commit(&tensors, &book, b"edits", &ids(&["a"]))
            .unwrap_err()
    );
    assert!(err.contains("\"a\" is already applied"), "{err}");
    let err = format!(
        "{:#}",
        state
            .commit(&tensors, &book, b"edits", &ids(&["b", "b"]))
            .unwrap_err()
    );
    assert!(err.contains("\"b\""), "{err}");

    let rewritten = random_codebook(&mut rng, None, 3);
    let err = format!(
        "{:#}",
        state
            .commit(&tensors, &rewritten, b"edits", &ids(&["b"]))
            .unwrap_err()
    );
    assert!(err.contains("append-only"), "{err}");

    let mut wrong_shape = tensors.clone();
    wrong_shape[0].shape = vec![3, 3];
    let err = format!(
        "{:#}",
        state
            .commit(&wrong_shape, &book, b"edits", &ids(&["b"]))
            .unwrap_err()
    );
    assert!(
        err.contains("layer10.router.w") && err.contains("[3, 3]"),
        "{err}"
    );

    let reopened = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(reopened.generation(), 1);
    assert_eq!(reopened.applied_ids(), ids(&["a"]).as_slice());
}

#[test]
fn open_or_create_creates_then_opens() {
    let dir = tempfile::tempdir().unwrap();
    let created = EditState::open_or_create(dir.path(), &config(), "fp").unwrap();
    assert_eq!(created.generation(), 0);
    let opened = EditState::open_or_create(dir.path(), &config(), "fp").unwrap();
    assert_eq!(opened.manifest(), created.manifest());
    assert!(EditState::open_or_create(dir.path(), &config(), "other").is_err());
}

/// A state of three generations (the last two kept), committed from random tensors.
fn three_generations(dir: &Path, rng: &mut ChaCha8Rng) -> Vec<Vec<NamedTensor>> {
    let mut state = EditState::create(dir, config(), "fp").unwrap();
    let mut book = random_codebook(rng, None, 1);
    let mut committed = Vec::new();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        if i > 0 {
            book = random_codebook(rng, Some(&book), 1);
        }
        let tensors = random_tensors(rng);
        state
            .commit(&tensors, &book, format!("{id}\n").as_bytes(), &ids(&[id]))
            .unwrap();
        committed.push(tensors);
    }
    committed
}

/// Every file of a state is covered: a byte flipped anywhere in the files the current generation
/// opens (manifest.json included, its whitespace too) is refused by the file's name, and one
/// flipped in any kept file shows in `verify` against that file's generation.
#[test]
fn a_flipped_byte_anywhere_is_found_by_name() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let dir = tempfile::tempdir().unwrap();
    three_generations(dir.path(), &mut rng);
    let clean = state::verify(dir.path()).unwrap();
    assert!(clean.current_intact(), "{clean:?}");
    assert_eq!(
        clean
            .generations
            .iter()
            .map(|g| (g.generation, g.current, g.problems.len()))
            .collect::<Vec<_>>(),
        [(3, true, 0), (2, false, 0)]
    );
    let files = file_names(dir.path());
    let mut flips = 0;
    for name in &files {
        let path = dir.path().join(name);
        let good = fs::read(&path).unwrap();
        // Every byte of the manifest; a spread of positions (first, last, random) elsewhere.
        let positions: Vec<usize> = if name == "manifest.json" {
            (0..good.len()).collect()
        } else {
            let mut p = vec![0, good.len() - 1];
            p.extend((0..24).map(|_| rng.gen_range(0..good.len())));
            p
        };
        for at in positions {
            let mut bad = good.clone();
            bad[at] ^= 1 << rng.gen_range(0..8);
            fs::write(&path, &bad).unwrap();
            flips += 1;
            let report = state::verify(dir.path()).unwrap();
            let opened_by_current = name == "manifest.json" || name.contains("000003");
            if opened_by_current && name != "manifest-000003.json" {
                let err = format!(
                    "{:#}",
                    EditState::open(dir.path(), &config(), "fp").unwrap_err()
                );
                assert!(err.contains(name.as_str()), "{name} byte {at}: {err}");
                assert!(!report.current_intact(), "{name} byte {at}");
            } else {
                // A kept copy or the previous generation: the current one still opens.
                EditState::open(dir.path(), &config(), "fp").unwrap();
                assert!(report.current_intact(), "{name} byte {at}: {report:?}");
            }
            let named = report
                .manifest_problem
                .iter()
                .any(|p| p.contains(name.as_str()))
                || report
                    .generations
                    .iter()
                    .any(|g| g.problems.iter().any(|p| p.contains(name.as_str())));
            assert!(
                named,
                "{name} byte {at}: verify did not name it: {report:?}"
            );
            fs::write(&path, &good).unwrap();
        }
    }
    assert!(flips > 1000, "{flips}");
    assert!(state::verify(dir.path()).unwrap().current_intact());
}

/// When the newest generation is damaged, the one before it is opened explicitly by rolling back
/// to it; the next commit continues from there.
#[test]
fn a_damaged_newest_generation_rolls_back_to_the_previous_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let dir = tempfile::tempdir().unwrap();
    let committed = three_generations(dir.path(), &mut rng);
    let experts = dir.path().join("experts-000003.safetensors");
    let mut bytes = fs::read(&experts).unwrap();
    bytes[100] ^= 0x10;
    fs::write(&experts, &bytes).unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(
        err.contains("experts-000003.safetensors is damaged") && err.contains("state verify"),
        "{err}"
    );
    let report = state::verify(dir.path()).unwrap();
    assert!(!report.current_intact());
    assert_eq!(report.newest_intact(), Some(2));

    // The damaged generation cannot be rolled back to; one not kept is named as such.
    assert!(state::rollback(dir.path(), 3).is_err());
    let err = format!("{:#}", state::rollback(dir.path(), 1).unwrap_err());
    assert!(
        err.contains("keeps no generation 1") && err.contains("[3, 2]"),
        "{err}"
    );

    state::rollback(dir.path(), 2).unwrap();
    let mut back = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(back.generation(), 2);
    assert_eq!(back.applied_ids(), ids(&["a", "b"]).as_slice());
    assert_eq!(back.tensors(), sorted(committed[1].clone()).as_slice());
    assert_eq!(back.memory(), b"b\n");

    let book = random_codebook(&mut rng, back.codebook(), 1);
    let tensors = random_tensors(&mut rng);
    back.commit(&tensors, &book, b"c2\n", &ids(&["c"])).unwrap();
    let again = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(again.generation(), 3);
    assert_eq!(again.applied_ids(), ids(&["a", "b", "c"]).as_slice());
    assert_eq!(again.tensors(), sorted(tensors).as_slice());
    assert!(state::verify(dir.path()).unwrap().current_intact());
}

/// The tensors of an edit stream mostly grow by rows: a commit writes only what changed (a
/// segment on the files before it, state format 4), the state opens whole at every generation,
/// the chain restarts with a whole file as its segments outgrow it, and exactly the files the
/// current and previous generations read are kept.
#[test]
fn growing_tensors_commit_as_segments() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let dir = tempfile::tempdir().unwrap();
    let mut state = EditState::create(dir.path(), config(), "fp").unwrap();
    let random = |rng: &mut ChaCha8Rng, name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        NamedTensor {
            name: name.to_string(),
            shape,
            data: (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        }
    };
    let mut tensors = vec![
        random(&mut rng, "experts", vec![1, 256]),
        random(&mut rng, "mean", vec![16]),
        random(&mut rng, "router", vec![4, 16]),
    ];
    let mut book = random_codebook(&mut rng, None, 1);
    let mut committed = Vec::new();
    let mut experts_bytes = Vec::new();
    let mut chain_lengths = Vec::new();
    for generation in 1..=20u64 {
        if generation > 1 {
            let row = random(&mut rng, "row", vec![1, 256]);
            tensors[0].shape[0] += 1;
            tensors[0].data.extend(row.data);
            if generation % 5 == 0 {
                tensors[1] = random(&mut rng, "mean", vec![16]);
            }
            book = random_codebook(&mut rng, Some(&book), 1);
        }
        let id = format!("e{generation}");
        state
            .commit(&tensors, &book, id.as_bytes(), &ids(&[&id]))
            .unwrap();
        committed.push(sorted(tensors.clone()));
        let reopened = EditState::open(dir.path(), &config(), "fp").unwrap();
        assert_eq!(reopened.tensors(), committed.last().unwrap().as_slice());
        let files = reopened.manifest().files.clone().unwrap();
        experts_bytes.push(fs::metadata(dir.path().join(&files.experts)).unwrap().len());
        chain_lengths.push(files.earlier_experts.len());

        // Kept: what generation N and N - 1 read, and nothing else.
        let mut needed = vec!["manifest.json".to_string()];
        let mut kept = vec![reopened.manifest().clone()];
        let copy = format!("manifest-{:06}.json", generation - 1);
        let text = fs::read_to_string(dir.path().join(copy)).unwrap();
        kept.push(state::parse_manifest_text(&text).unwrap());
        for m in &kept {
            needed.push(format!("manifest-{:06}.json", m.generation));
            let Some(f) = m.files.as_ref() else { continue };
            needed.extend(f.earlier_experts.iter().map(|e| e.name.clone()));
            needed.extend([f.experts.clone(), f.codebook.clone()]);
            needed.extend(f.memory.clone());
        }
        needed.sort();
        needed.dedup();
        assert_eq!(file_names(dir.path()), needed, "generation {generation}");
    }
    eprintln!("experts file bytes {experts_bytes:?}, earlier files {chain_lengths:?}");
    // One row is 1 KiB: a segment holds about that, a whole file every row so far.
    let whole = |g: usize| 64 + 1024 * g as u64 + 64 * 4;
    for (i, (&bytes, &earlier)) in experts_bytes.iter().zip(&chain_lengths).enumerate() {
        if earlier == 0 {
            assert!(bytes >= whole(i + 1) - 64, "generation {}: {bytes}", i + 1);
        } else {
            let mean_changed = (i + 1) % 5 == 0;
            assert!(
                bytes < 1024 + 512 + if mean_changed { 128 } else { 0 },
                "generation {}: a segment of {bytes} bytes",
                i + 1
            );
        }
    }
    // The chain restarts as its segments outgrow its first file: whole files at generations 1,
    // 3, 7 and 14 (the first file about doubles each time; a segment's header of about 140
    // bytes brings the fourth one commit early).
    let restarts: Vec<usize> = chain_lengths
        .iter()
        .enumerate()
        .filter(|(_, &n)| n == 0)
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(restarts, [1, 3, 7, 14], "{chain_lengths:?}");

    // A flipped byte in the chain's first file (a generation written long ago) is refused by
    // name, by opening and by verify; rolling back to the previous generation (which shares it)
    // is refused too, and restoring the byte opens again.
    let first = state.manifest().files.as_ref().unwrap().earlier_experts[0]
        .name
        .clone();
    assert_eq!(first, "experts-000014.safetensors");
    let path = dir.path().join(&first);
    let good = fs::read(&path).unwrap();
    let mut bad = good.clone();
    let at = good.len() - 3;
    bad[at] ^= 4;
    fs::write(&path, &bad).unwrap();
    let err = format!(
        "{:#}",
        EditState::open(dir.path(), &config(), "fp").unwrap_err()
    );
    assert!(err.contains(&format!("{first} is damaged")), "{err}");
    let report = state::verify(dir.path()).unwrap();
    assert!(!report.current_intact());
    assert_eq!(report.newest_intact(), None, "{report:?}");
    assert!(state::rollback(dir.path(), 19).is_err());
    fs::write(&path, &good).unwrap();

    // Rolling back to the previous generation opens its tensors; the next commit goes on.
    state::rollback(dir.path(), 19).unwrap();
    let mut back = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(back.tensors(), committed[18].as_slice());
    let book = random_codebook(&mut rng, back.codebook(), 1);
    back.commit(&tensors, &book, b"again", &ids(&["e20b"]))
        .unwrap();
    let again = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert_eq!(again.tensors(), committed[19].as_slice());
    assert!(state::verify(dir.path()).unwrap().current_intact());
    // Exported whole: one file any safetensors reader opens, equal to the committed tensors.
    let out = dir.path().join("export").join("all.safetensors");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    assert_eq!(state::export(dir.path(), &out).unwrap(), (20, 3));
    let exported = state::parse_experts(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(exported, committed[19]);

    // A commit that drops a tensor starts a new chain (a segment cannot remove one).
    let mut back = again;
    let book = random_codebook(&mut rng, back.codebook(), 1);
    back.commit(&tensors[..2], &book, b"fewer", &ids(&["e21"]))
        .unwrap();
    let fewer = EditState::open(dir.path(), &config(), "fp").unwrap();
    assert!(fewer
        .manifest()
        .files
        .as_ref()
        .unwrap()
        .earlier_experts
        .is_empty());
    assert_eq!(fewer.tensors(), sorted(tensors[..2].to_vec()).as_slice());
}
