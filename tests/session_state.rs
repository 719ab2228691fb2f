//! The durable edit state through the session layer: what is committed reopens identically, an
//! interrupted stream resumes after the last commit, and a state refuses another model or config.

use std::path::Path;

use elder::data::{read_edits, DataFormat, EditRecord};
use elder::elder::capture::CpuSites;
use elder::elder::config::{ElderConfig, ExpertRows, Preset, RelationKey};
use elder::model::checkpoint::StoreDtype;
use elder::model::presets::write_random_checkpoint;
use elder::model::Arch;
use elder::session::{apply_stream, BaseModel, EditSession};

fn records(n: usize) -> Vec<EditRecord> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/geo_facts.jsonl");
    let mut r = read_edits(&data, DataFormat::Auto).unwrap();
    r.truncate(n);
    r
}

/// Texts tokenized as one padded batch: the tokens, the padded length and each prompt's rows.
fn encode_prompts(
    base: &BaseModel,
    texts: &[impl AsRef<str>],
) -> (Vec<Vec<u32>>, usize, Vec<std::ops::Range<usize>>) {
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| base.tokenizer.encode(t.as_ref()).unwrap())
        .collect();
    let seq = prompts.iter().map(Vec::len).max().unwrap();
    let rows = elder::model::runner::prompt_rows(seq, prompts.iter().map(Vec::len));
    (prompts, seq, rows)
}

fn tiny_model(dir: &Path, seed: u64) -> BaseModel {
    write_random_checkpoint(Arch::Llama, "tiny", seed, dir, StoreDtype::F32).unwrap();
    BaseModel::open(dir).unwrap()
}

fn config(base: &BaseModel, centering: bool) -> ElderConfig {
    ElderConfig {
        iterations: 5,
        query_centering: centering,
        ..ElderConfig::preset_for(&base.cfg)
    }
}

/// What a GPU command does before it runs (open the model and the state, stage the weights for
/// the upload) builds no f32 CPU model; the CPU path builds it on first use, once.
#[test]
fn the_cpu_model_is_built_only_when_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 3);
    let session =
        EditSession::open(&base, &tmp.path().join("state"), Some(config(&base, false))).unwrap();
    assert_eq!(
        session.elder.layers.len(),
        config(&base, false).molora_blocks.len()
    );
    let staged = base.weight_source().staged_tensors::<half::bf16>().unwrap();
    assert!(!staged.is_empty());
    assert!(
        !base.cpu_model_built(),
        "opening or staging built the CPU model"
    );
    let first: *const _ = base.model().unwrap();
    assert!(base.cpu_model_built());
    assert!(std::ptr::eq(first, base.model().unwrap()), "built twice");
}

#[test]
fn committed_state_reopens_identically() {
    for centering in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tiny_model(&tmp.path().join("model"), 1);
        let state = tmp.path().join("state");
        let mut s = EditSession::open(&base, &state, Some(config(&base, centering))).unwrap();
        apply_stream(&base, &mut s, &records(3), false, None).unwrap();
        assert_eq!(s.elder.query_mean.is_some(), centering);
        let reopened = EditSession::open(&base, &state, None).unwrap();
        assert!(
            reopened.elder == s.elder,
            "centering={centering}: reopened state differs"
        );
        assert_eq!(reopened.state.applied_ids().len(), 3);
    }
}

#[test]
fn interrupted_stream_resumes_to_the_same_state() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 2);
    let all = records(4);
    // One pass over all four edits...
    let mut straight =
        EditSession::open(&base, &tmp.path().join("a"), Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut straight, &all, false, None).unwrap();
    // ...versus two edits, a "crash" (the session is dropped), and a rerun over the whole file.
    let b = tmp.path().join("b");
    let mut first = EditSession::open(&base, &b, Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut first, &all[..2], false, None).unwrap();
    drop(first);
    let mut resumed = EditSession::open(&base, &b, None).unwrap();
    let summary = apply_stream(&base, &mut resumed, &all, false, None).unwrap();
    assert_eq!((summary.applied, summary.already_applied), (2, 2));
    assert!(
        resumed.elder == straight.elder,
        "resuming did not reproduce the uninterrupted state"
    );
}

#[test]
fn state_refuses_another_model_or_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("m1"), 3);
    let other = tiny_model(&tmp.path().join("m2"), 4);
    let state = tmp.path().join("state");
    let mut s = EditSession::open(&base, &state, Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut s, &records(1), false, None).unwrap();
    let err = EditSession::open(&other, &state, None)
        .err()
        .expect("another model must be refused");
    assert!(format!("{err:#}").contains("another base model"), "{err:#}");
    let changed = ElderConfig {
        num_experts: 8,
        ..config(&base, false)
    };
    let err = EditSession::open(&base, &state, Some(changed))
        .err()
        .expect("another config must be refused");
    assert!(format!("{err:#}").contains("num_experts"), "{err:#}");
}

/// The default preset (key store, stored allocations, fresh experts, prefixed and question
/// copies) on a tiny model, few iterations.
fn default_config(base: &BaseModel) -> ElderConfig {
    ElderConfig {
        iterations: 4,
        // One edit per commit: these tests resume streams cut anywhere (a batch plans its edits
        // together, so only a stream cut at its batch boundaries resumes to the same state).
        batch_size: 1,
        // Off: four iterations on a random model do not teach an edit its answer, so the gate
        // would turn the edit prompts these tests match away (it has a test of its own).
        answer_gate: 0.0,
        ..ElderConfig::preset(Preset::Default, &base.cfg)
    }
}

/// Every file of a state directory, by name (the manifest without its timestamps).
fn state_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(e.path()).unwrap();
            if name.starts_with("manifest") {
                // Every manifest (and so its checksum) carries the time it was written.
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let m = v.as_object_mut().unwrap();
                m.remove("created_unix_s");
                m.remove("updated_unix_s");
                m.remove("manifest_sha256");
                bytes = serde_json::to_vec(&v).unwrap();
            }
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

/// Evaluation data never trains: the same stream with every record's rephrasings and locality
/// probes emptied leaves a bit-identical state, under both presets.
#[test]
fn rephrasings_and_probes_never_reach_training() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 5);
    let full = records(6);
    assert!(full
        .iter()
        .all(|r| !r.rephrases.is_empty() && !r.locality.is_empty()));
    let stripped: Vec<EditRecord> = full
        .iter()
        .map(|r| EditRecord {
            rephrases: Vec::new(),
            locality: Vec::new(),
            ..r.clone()
        })
        .collect();
    let centred_paper = ElderConfig {
        query_centering: true,
        ..config(&base, false)
    };
    // The default preset as shipped plans 8 edits together, and with negatives (an option, off
    // in the preset) they come from each other's templates: neither path may read the test set.
    let default_batched = ElderConfig {
        batch_size: 8,
        ..default_config(&base)
    };
    let batched_negatives = ElderConfig {
        negatives: 4,
        ..default_batched.clone()
    };
    // Reworded negatives are made from the edit prompt alone.
    let reworded = ElderConfig {
        reworded_negatives: 2,
        ..default_config(&base)
    };
    // So are the subject's negatives in other edits' templates.
    let subject_negatives = ElderConfig {
        subject_negatives: 3,
        ..default_config(&base)
    };
    for (name, cfg) in [
        ("default", default_config(&base)),
        ("default, batch of 8", default_batched),
        ("default, batch of 8 with negatives", batched_negatives),
        ("default, reworded negatives", reworded),
        ("default, subject negatives", subject_negatives),
        ("paper", centred_paper),
    ] {
        let (a, b) = (
            tmp.path().join(format!("{name}-a")),
            tmp.path().join(format!("{name}-b")),
        );
        let mut with = EditSession::open(&base, &a, Some(cfg.clone())).unwrap();
        apply_stream(&base, &mut with, &full, false, None).unwrap();
        let mut without = EditSession::open(&base, &b, Some(cfg)).unwrap();
        apply_stream(&base, &mut without, &stripped, false, None).unwrap();
        assert!(
            with.elder == without.elder,
            "{name}: the trained state depends on the test set"
        );
        let (files_a, files_b) = (state_files(&a), state_files(&b));
        let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&files_a),
            names(&files_b),
            "{name}: state file names differ"
        );
        let differing: Vec<&str> = files_a
            .iter()
            .zip(&files_b)
            .filter(|((_, x), (_, y))| x != y)
            .map(|((n, _), _)| n.as_str())
            .collect();
        assert!(
            differing.is_empty(),
            "{name}: state files differ: {differing:?}"
        );
    }
}

/// Rebuilding the key store from the memory (`elder eval --rekey`) under the config it was built
/// with gives back the stored keys bit for bit; under other key options, other keys for as many
/// edits, and leading positions with means of their own.
#[test]
fn key_store_rebuilds_from_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 8);
    let mut s =
        EditSession::open(&base, &tmp.path().join("s"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut s, &records(5), false, None).unwrap();
    let stored = s
        .elder
        .key_store
        .clone()
        .expect("the default preset keeps keys");
    let model = base.model().unwrap();
    let background = base.background_prompts().unwrap();
    let mut same = s.elder.clone();
    same.rebuild_key_store(&mut CpuSites(model), &base.tokenizer, &background)
        .unwrap();
    assert!(same.key_store.as_ref() == Some(&stored));
    assert_eq!(same.scope_threshold(), s.elder.scope_threshold());

    // Other key options: the rebuilt state is the one a fresh stream with them trains (the
    // experts never depend on the keys), and its keys differ from the stored ones.
    let other_cfg = ElderConfig {
        key_position_means: 3,
        key_ceiling_margin: Some(0.1),
        relation_margin: 0.2,
        relation_key: RelationKey::LastToken,
        key_span: 1,
        relation_by_subject: false,
        ..default_config(&base)
    };
    let mut other = s.elder.clone();
    other.cfg = other_cfg.clone();
    other
        .rebuild_key_store(&mut CpuSites(model), &base.tokenizer, &background)
        .unwrap();
    let rebuilt = other.key_store.as_ref().unwrap();
    assert_eq!(rebuilt.len(), stored.len());
    assert_eq!(rebuilt.space.background.leading.len(), 2);
    assert_eq!(
        rebuilt.ceilings.of_keys.len(),
        stored.len() * stored.variants
    );
    // One row per key instead of the default's three (a subject's last three tokens).
    assert_eq!((rebuilt.span, stored.span), (1, 3));
    assert_eq!(rebuilt.keys.len() * 3, stored.keys.len());
    assert!(rebuilt.subject_group.is_empty() && !stored.subject_group.is_empty());
    assert_ne!(rebuilt.keys, stored.keys);
    let (rebuilt_relation, stored_relation) = (
        rebuilt.relation.as_ref().unwrap(),
        stored.relation.as_ref().unwrap(),
    );
    assert_eq!(rebuilt_relation.kind, RelationKey::LastToken);
    assert_eq!(stored_relation.kind, RelationKey::WeightedContext);
    assert_ne!(rebuilt_relation.rows, stored_relation.rows);
    let mut fresh = EditSession::open(&base, &tmp.path().join("f"), Some(other_cfg)).unwrap();
    apply_stream(&base, &mut fresh, &records(5), false, None).unwrap();
    assert!(
        fresh.elder == other,
        "a rebuilt key store must equal a fresh stream's"
    );
    // And the fresh stream's state reloads to the same (ceilings included).
    let reopened = EditSession::open(&base, &tmp.path().join("f"), None).unwrap();
    assert!(reopened.elder == fresh.elder);
}

#[test]
fn default_preset_state_reopens_and_resumes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 6);
    let all = records(5);
    let mut straight =
        EditSession::open(&base, &tmp.path().join("a"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut straight, &all, false, None).unwrap();
    let store = straight.elder.key_store.as_ref().expect("a key store");
    assert_eq!(store.len(), 5);
    assert_eq!(straight.elder.memory.len(), 5);
    // One fresh expert per layer per edit, none shared.
    assert_eq!(straight.elder.layers[0].experts(straight.elder.cfg.rank), 5);
    let reopened = EditSession::open(&base, &tmp.path().join("a"), None).unwrap();
    assert!(
        reopened.elder == straight.elder,
        "the reopened state differs"
    );

    let b = tmp.path().join("b");
    let mut first = EditSession::open(&base, &b, Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut first, &all[..3], false, None).unwrap();
    drop(first);
    let mut resumed = EditSession::open(&base, &b, None).unwrap();
    apply_stream(&base, &mut resumed, &all, false, None).unwrap();
    assert!(
        resumed.elder == straight.elder,
        "resuming did not reproduce the state"
    );
}

/// A reloaded state re-derives the background rows its `weighted_context` relation keys are
/// weighted against (they are not stored), so its queries get the same answers, relation
/// similarities included, as the state that trained them.
#[test]
fn weighted_relation_keys_answer_the_same_after_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 8);
    let all = records(5);
    // Every edit within the margin (and every key counting): the relation key decides every
    // match.
    let cfg = ElderConfig {
        relation_margin: 2.0,
        key_ceiling_margin: None,
        ..default_config(&base)
    };
    assert_eq!(cfg.relation_key, RelationKey::WeightedContext);
    let dir = tmp.path().join("s");
    let mut trained = EditSession::open(&base, &dir, Some(cfg)).unwrap();
    apply_stream(&base, &mut trained, &all, false, None).unwrap();
    assert!(!trained.elder.queries_need_background());
    let reopened = EditSession::open(&base, &dir, None).unwrap();
    assert!(!reopened.elder.queries_need_background());
    let texts: Vec<(Vec<u32>, Vec<u32>)> = all
        .iter()
        .flat_map(|r| {
            std::iter::once(&r.prompt)
                .chain(&r.rephrases)
                .map(|p| base.encode_pair(p, &r.target_new).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = texts.iter().map(|(p, t)| (&p[..], &t[..])).collect();
    let model = base.model().unwrap();
    let before = elder::eval::score_pairs(model, Some(&trained.elder), &pairs).unwrap();
    let after = elder::eval::score_pairs(model, Some(&reopened.elder), &pairs).unwrap();
    assert_eq!(before, after);
    // An edit prompt always matches its own keys, so the relation key decided it.
    let mut at = 0;
    for r in &all {
        assert!(before[at].relation_similarity.is_some(), "{}", r.prompt);
        at += 1 + r.rephrases.len();
    }
}

/// Relation words (`relation_words`): among one subject's edits, a prompt picks the edit whose
/// prompt shares its rarest word, the same after reopening the state (the session derives the
/// words again); edit prompts keep matching their own edits.
#[test]
fn relation_words_pick_the_edit_that_shares_the_prompt_s_word() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 9);
    // Ecuador's capital, city, country and currency edits.
    let all = one_subject_records(4, 3);
    let cfg = default_config(&base);
    assert!(cfg.relation_words > 0.0 && cfg.relation_by_subject);
    let dir = tmp.path().join("s");
    let mut trained = EditSession::open(&base, &dir, Some(cfg)).unwrap();
    apply_stream(&base, &mut trained, &all, false, None).unwrap();
    let reopened = EditSession::open(&base, &dir, None).unwrap();
    assert!(reopened.elder.memory.iter().all(|e| !e.words.is_empty()));
    // Each query names one edit's relation word in another sentence (the tiny tokenizer splits
    // "currency" into pieces common in the generic text, so "official" stands for that edit).
    let queries = [
        ("Tell me, for Ecuador, the capital", &all[0].id),
        ("Tell me, for Ecuador, the city", &all[1].id),
        ("Tell me, for Ecuador, the country", &all[2].id),
        ("Tell me, for Ecuador, the official", &all[3].id),
        ("So Ecuador: official", &all[3].id),
        ("So Ecuador: country", &all[2].id),
        ("So Ecuador: capital", &all[0].id),
        ("So Ecuador: city", &all[1].id),
    ];
    let texts: Vec<(Vec<u32>, Vec<u32>)> = queries
        .iter()
        .map(|(q, _)| base.encode_pair(q, "Quito").unwrap())
        .chain(
            all.iter()
                .map(|r| base.encode_pair(&r.prompt, &r.target_new).unwrap()),
        )
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = texts.iter().map(|(p, t)| (&p[..], &t[..])).collect();
    let model = base.model().unwrap();
    let matched = |session: &EditSession| -> Vec<Option<String>> {
        elder::eval::score_pairs(model, Some(&session.elder), &pairs)
            .unwrap()
            .into_iter()
            .map(|s| s.matched_edit)
            .collect()
    };
    let expected: Vec<Option<String>> = queries
        .iter()
        .map(|(_, id)| Some(id.to_string()))
        .chain(all.iter().map(|r| Some(r.id.clone())))
        .collect();
    assert_eq!(matched(&trained), expected);
    assert_eq!(matched(&reopened), expected);
    // The relation key alone (weight 0) picks another edit for some of the queries here: the
    // words decided them.
    let mut off = reopened;
    off.elder.cfg.relation_words = 0.0;
    base.derive_relation_words(&mut off.elder).unwrap();
    assert!(off.elder.key_store.as_ref().unwrap().words.0.is_none());
    assert_ne!(matched(&off), expected);
}

/// Under the key store every edit prompt finds its own edit (similarity 1 at its subject) and is
/// answered with that edit's experts; the base model without a state matches nothing.
#[test]
fn edit_prompts_find_their_own_edit_in_the_key_store() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 7);
    let all = records(6);
    let mut s =
        EditSession::open(&base, &tmp.path().join("s"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut s, &all, false, None).unwrap();
    let prompts: Vec<(Vec<u32>, Vec<u32>)> = all
        .iter()
        .map(|r| base.encode_pair(&r.prompt, &r.target_new).unwrap())
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = prompts.iter().map(|(p, t)| (&p[..], &t[..])).collect();
    let scored = elder::eval::score_pairs(base.model().unwrap(), Some(&s.elder), &pairs).unwrap();
    for (r, sc) in all.iter().zip(&scored) {
        assert_eq!(sc.matched_edit.as_deref(), Some(r.id.as_str()), "{sc:?}");
        assert!(sc.in_scope, "{}: {sc:?}", r.id);
        assert!((sc.similarity.unwrap() - 1.0).abs() < 1e-4, "{sc:?}");
    }
    let unedited = elder::eval::score_pairs(base.model().unwrap(), None, &pairs).unwrap();
    assert!(unedited
        .iter()
        .all(|u| !u.in_scope && u.matched_edit.is_none()));
}

/// The engine handle answers as the CPU model does with the state's adapter: generation, scoring
/// (with the scope decision) and the final protocol's metrics; without a state, the base model.
#[test]
fn the_engine_on_the_cpu_answers_as_the_model_does() {
    use elder::engine::{Device, DeviceChoice, Engine};
    use elder::eval::Evaluator;

    let tmp = tempfile::tempdir().unwrap();
    let all = records(3);
    let base = tiny_model(&tmp.path().join("model"), 9);
    let mut session =
        EditSession::open(&base, &tmp.path().join("s"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut session, &all, false, None).unwrap();
    let expected = elder::session::evaluate_final(&base, &session.elder, &all, false).unwrap();
    let (prompt, target) = base
        .encode_pair(&all[0].prompt, &all[0].target_new)
        .unwrap();
    let model = base.model().unwrap();
    let mut adapter = elder::elder::molora::ElderAdapter::single(&session.elder, prompt.len());
    let scored = model.score(&prompt, &target, &mut adapter);
    let scope = adapter.in_scope.first().copied();
    let base_scored = model.score(&prompt, &target, &mut elder::model::NoAdapter);
    let eos = base.cfg.eos_token_id.or(base.tokenizer.eos_id());
    let mut adapter = elder::elder::molora::ElderAdapter::single(&session.elder, prompt.len());
    let generated = model.generate(std::slice::from_ref(&prompt), 2, eos, &mut adapter);

    let device = DeviceChoice::cpu()
        .resolve(Some(&session.elder.cfg))
        .unwrap();
    assert!(matches!(device, Device::Cpu));
    let mut engine = Engine::new(base, device);
    assert_eq!(engine.device_name(), "cpu");
    assert_eq!(
        engine
            .score(Some(&session.elder), &prompt, &target)
            .unwrap(),
        (scored, scope)
    );
    assert_eq!(scope, Some(true), "an edit prompt is in scope");
    assert_eq!(
        engine.score(None, &prompt, &target).unwrap(),
        (base_scored, None)
    );
    let (tokens, in_scope) = engine.generate(Some(&session.elder), &prompt, 2).unwrap();
    assert_eq!((tokens, in_scope), (generated[0].clone(), Some(true)));
    let metrics = engine.evaluate(&session.elder, &all, false).unwrap();
    assert_eq!(
        serde_json::to_value(&metrics).unwrap(),
        serde_json::to_value(&expected).unwrap()
    );
    let mut ev = Evaluator::default().keep_details();
    engine
        .score_records(&session.elder, &all, false, &mut ev)
        .unwrap();
    assert_eq!(
        ev.details().len(),
        all.iter()
            .map(|r| 1 + r.rephrases.len() + r.locality.len())
            .sum::<usize>()
    );
    // Empty prompts and prompts past the model's positions are refused before any work.
    assert!(engine.score(None, &[], &target).is_err());
    let long = vec![prompt[0]; engine.base.cfg.max_positions + 1];
    let err = engine.generate(None, &long, 1).unwrap_err().to_string();
    assert!(
        err.contains("positions") || err.contains("context"),
        "{err}"
    );
}

/// What a server does with concurrent requests: one batch of prompts (different lengths, some
/// in scope, some not, greedy and sampled) answers exactly as each prompt alone, with the same
/// scope; batched scores equal single ones.
#[test]
fn batched_requests_answer_as_single_ones() {
    use elder::engine::{Device, Engine};
    use elder::model::runner::Sampling;

    let tmp = tempfile::tempdir().unwrap();
    let all = records(3);
    let base = tiny_model(&tmp.path().join("model"), 12);
    let mut session =
        EditSession::open(&base, &tmp.path().join("s"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut session, &all, false, None).unwrap();
    let mut engine = Engine::new(base, Device::Cpu);
    let texts = [
        all[0].prompt.as_str(),
        "The weather today is",
        all[2].prompt.as_str(),
        "A",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| engine.base.tokenizer.encode(t).unwrap())
        .collect();
    let sampling: Vec<Sampling> = (0..prompts.len())
        .map(|i| Sampling {
            max_new: 2 + i,
            temperature: if i == 1 { 0.8 } else { 0.0 },
            seed: 40 + i as u64,
        })
        .collect();
    let elder = Some(&session.elder);
    let heard = std::sync::Arc::new(std::sync::Mutex::new(vec![Vec::new(); prompts.len()]));
    let sink = heard.clone();
    let (batched, scopes) = engine
        .generate_batch(
            elder,
            &prompts,
            &sampling,
            Some(Box::new(move |row, tok| {
                sink.lock().unwrap()[row].push(tok)
            })),
        )
        .unwrap();
    assert_eq!(
        *heard.lock().unwrap(),
        batched,
        "the listener hears every kept token"
    );
    assert_eq!(scopes[0], Some(true));
    assert_eq!(scopes[2], Some(true));
    for (i, prompt) in prompts.iter().enumerate() {
        let (alone, scope) = engine
            .generate_batch(elder, std::slice::from_ref(prompt), &sampling[i..=i], None)
            .unwrap();
        assert_eq!(alone[0], batched[i], "prompt {i}");
        assert!(alone[0].len() <= sampling[i].max_new);
        assert_eq!(scope[0], scopes[i], "prompt {i}");
    }
    let target = engine.base.tokenizer.encode_continuation(" Paris").unwrap();
    let pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .map(|p| (p.as_slice(), target.as_slice()))
        .collect();
    let scored = engine.score_batch(elder, &pairs).unwrap();
    for (i, (p, t)) in pairs.iter().enumerate() {
        let (single, scope) = engine.score(elder, p, t).unwrap();
        assert_eq!(scored[i].argmax, single.argmax, "pair {i}");
        assert_eq!(Some(scored[i].in_scope), scope, "pair {i}");
        for (a, b) in scored[i].logprobs.iter().zip(&single.logprobs) {
            assert!((a - b).abs() < 1e-4, "pair {i}: {a} vs {b}");
        }
    }
}

/// Rolling an edit back leaves the key store exactly as a stream without that edit would have
/// it, zeroes the edit's own experts, commits a generation without its id, and reopens as it was
/// left; the paper preset refuses by name.
#[test]
fn a_rolled_back_edit_leaves_no_key_and_no_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let all = records(4);
    let base = tiny_model(&tmp.path().join("model"), 13);
    let dir = tmp.path().join("s");
    let mut session = EditSession::open(&base, &dir, Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut session, &all, false, None).unwrap();
    let gone = session.elder.memory[1].clone();
    assert!(!gone.allocation.is_empty());
    let generation = session.state.generation();
    session.forget(&all[1].id).unwrap();
    assert_eq!(session.state.generation(), generation + 1);
    let ids: Vec<&str> = session
        .state
        .applied_ids()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ids,
        [&all[0].id, &all[2].id, &all[3].id].map(String::as_str)
    );
    assert!(session.elder.memory.iter().all(|e| e.id != gone.id));

    // The key store equals one rebuilt from the remaining memory.
    let mut rebuilt = session.elder.clone();
    rebuilt
        .rebuild_key_store(
            &mut CpuSites(base.model().unwrap()),
            &base.tokenizer,
            &base.background_prompts().unwrap(),
        )
        .unwrap();
    assert!(rebuilt.key_store == session.elder.key_store);
    assert_eq!(rebuilt.scope_threshold(), session.elder.scope_threshold());
    // Its experts are zero; the others' are not.
    let rank = session.elder.cfg.rank;
    for (layer, chosen) in session.elder.layers.iter().zip(&gone.allocation) {
        let a = layer.d_in * rank;
        for &x in chosen {
            let x = x as usize;
            assert!(layer.a[x * a..(x + 1) * a].iter().all(|&v| v == 0.0));
        }
    }
    let kept = &session.elder.memory[0].allocation[0];
    let layer = &session.elder.layers[0];
    let a = layer.d_in * rank;
    assert!(layer.a[kept[0] as usize * a..(kept[0] as usize + 1) * a]
        .iter()
        .any(|&v| v != 0.0));
    let reopened = EditSession::open(&base, &dir, None).unwrap();
    assert!(reopened.elder == session.elder);
    assert!(session.forget(&gone.id).is_err(), "forgot an edit twice");

    let paper_dir = tmp.path().join("p");
    let paper = ElderConfig {
        iterations: 2,
        ..ElderConfig::preset(Preset::Paper, &base.cfg)
    };
    let mut p = EditSession::open(&base, &paper_dir, Some(paper)).unwrap();
    apply_stream(&base, &mut p, &all[..1], false, None).unwrap();
    let err = p.forget(&all[0].id).unwrap_err().to_string();
    assert!(err.contains("paper preset cannot roll"), "{err}");
    assert_eq!(
        p.state.applied_ids().len(),
        1,
        "a refused rollback changed the state"
    );
}

/// `answer_gate`: a prompt in scope keeps its matched edit's experts only when they give that
/// edit's answer token at least the gate's probability at the last prompt token. A prompt turned
/// away is answered exactly as the base model answers it (its scores, and its generation through
/// the KV cache, whose rows the blocks from the first MoLoRA layer wrote again), in a batch beside
/// prompts that keep their experts, which answer exactly as without the gate.
#[test]
fn the_answer_gate_answers_turned_away_prompts_with_the_base_model() {
    use elder::elder::molora::ElderAdapter;
    use elder::model::NoAdapter;

    let tmp = tempfile::tempdir().unwrap();
    let mut all = records(4);
    // An answer written after a whitespace-only token (as a tokenizer that splits digits writes
    // " 44": " ", "4", "4"): the gate reads it through a side step past the prompt.
    all[1].target_new = " Nairobi".into();
    let base = tiny_model(&tmp.path().join("model"), 14);
    let mut session =
        EditSession::open(&base, &tmp.path().join("s"), Some(default_config(&base))).unwrap();
    apply_stream(&base, &mut session, &all, false, None).unwrap();
    let answers: Vec<usize> = session
        .elder
        .memory
        .iter()
        .map(|e| e.answer.len())
        .collect();
    assert!(answers.iter().all(|&n| n >= 1), "{answers:?}");
    assert!(answers.iter().any(|&n| n > 1), "{answers:?}");
    // Prompts about the edited subjects: the edit prompts, rephrasings, same-subject probes.
    let texts: Vec<&str> = all
        .iter()
        .flat_map(|r| {
            let same_subject = r
                .locality
                .iter()
                .find(|l| l.kind.as_deref() == Some("same_subject"));
            [r.prompt.as_str(), r.rephrases[0].as_str()]
                .into_iter()
                .chain(same_subject.map(|l| l.prompt.as_str()))
        })
        .collect();
    let (prompts, _, rows) = encode_prompts(&base, &texts);
    let model = base.model().unwrap();
    // Without the gate: each in-scope prompt's probability of its matched edit's answer, by
    // teacher forcing the answer after the prompt (one forward, no side step).
    let matched = elder::eval::score_pairs(
        model,
        Some(&session.elder),
        &prompts
            .iter()
            .map(|p| (&p[..], &p[..1]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let probability: Vec<Option<f32>> = prompts
        .iter()
        .zip(&matched)
        .map(|(p, m)| {
            let id = m.matched_edit.as_deref().filter(|_| m.in_scope)?;
            let edit = session.elder.memory.iter().find(|e| e.id == id).unwrap();
            let answer =
                elder::eval::score_pairs(model, Some(&session.elder), &[(p, &edit.answer)])
                    .unwrap();
            assert_eq!(answer[0].matched_edit.as_deref(), Some(id));
            Some(answer[0].logprobs.iter().sum::<f32>().exp())
        })
        .collect();
    assert!(
        (0..prompts.len()).any(|i| probability[i].is_some()
            && matched[i].matched_edit.as_deref() == Some(all[1].id.as_str())),
        "no prompt in scope asks the edit whose answer starts with whitespace"
    );
    // A gate between the in-scope prompts' probabilities, so some keep and some lose the experts.
    let mut sorted: Vec<f32> = probability.iter().flatten().copied().collect();
    sorted.sort_by(f32::total_cmp);
    assert!(
        sorted.len() >= 4,
        "too few prompts in scope: {probability:?}"
    );
    let mid = sorted.len() / 2;
    assert!(sorted[mid - 1] < sorted[mid], "{sorted:?}");
    let gate = (sorted[mid - 1] + sorted[mid]) / 2.0;

    let target = base.tokenizer.encode_continuation(" Paris").unwrap();
    let pairs: Vec<(&[u32], &[u32])> = prompts.iter().map(|p| (&p[..], &target[..])).collect();
    let edited = elder::eval::score_pairs(model, Some(&session.elder), &pairs).unwrap();
    let unedited = elder::eval::score_pairs(model, None, &pairs).unwrap();
    let generate =
        |adapter: &mut dyn elder::model::Adapter| model.generate(&prompts, 3, None, adapter);
    let edited_text = generate(&mut ElderAdapter::inference(&session.elder, rows.clone()));
    let base_text = generate(&mut NoAdapter);
    session.elder.cfg.answer_gate = gate;
    // What the gate read is the answer's probability (the side step past the prompt included).
    let mut adapter = ElderAdapter::inference(&session.elder, rows.clone());
    model.logits(&prompts, &mut adapter);
    for (i, p) in probability.iter().enumerate() {
        let read = adapter.answer_logprobs[i].map(f32::exp);
        assert_eq!(read.is_some(), p.is_some(), "prompt {i}");
        if let (Some(read), Some(p)) = (read, p) {
            assert!(
                (read - p).abs() < 1e-4 * p.max(1e-3),
                "prompt {i}: {read} vs {p}"
            );
        }
    }
    let gated = elder::eval::score_pairs(model, Some(&session.elder), &pairs).unwrap();
    let gated_text = generate(&mut ElderAdapter::inference(&session.elder, rows.clone()));
    let mut turned_away = 0;
    for (i, p) in probability.iter().enumerate() {
        let away = p.is_some_and(|p| p < gate);
        let g = &gated[i];
        assert_eq!(g.gated, away, "prompt {i} ({:?}), p {p:?}", texts[i]);
        if away {
            turned_away += 1;
            assert!(!g.in_scope, "prompt {i}");
            assert_eq!(g.argmax, unedited[i].argmax, "prompt {i}");
            assert_eq!(g.logprobs, unedited[i].logprobs, "prompt {i}");
            assert_eq!(gated_text[i], base_text[i], "prompt {i}");
        } else {
            assert_eq!(g.in_scope, edited[i].in_scope, "prompt {i}");
            assert_eq!(g.argmax, edited[i].argmax, "prompt {i}");
            assert_eq!(g.logprobs, edited[i].logprobs, "prompt {i}");
            assert_eq!(gated_text[i], edited_text[i], "prompt {i}");
        }
    }
    assert!(turned_away > 0 && turned_away < sorted.len());
    // The experts did change what the turned-away prompts would have said.
    assert!(
        (0..prompts.len()).any(|i| gated[i].gated && edited[i].logprobs != unedited[i].logprobs),
        "no turned-away prompt had been changed by its experts"
    );
}

/// `answer_gate_fallback`: a prompt whose matched edit the gate turns away is answered by the
/// edit its relation key ranked next when that edit's experts give its own answer at least the
/// gate, else by the base model; a prompt kept by the gate is answered as without the fallback.
/// Checked against forward passes with each sequence's experts forced.
#[test]
fn the_answer_gate_falls_back_to_the_runner_up_edit() {
    use elder::elder::molora::ElderAdapter;

    let tmp = tempfile::tempdir().unwrap();
    // Two edits about one subject (record 1's relation moved to record 0's subject) and one other.
    let all = one_subject_records(3, 1);
    let (base, session) = edited_tiny_model(tmp.path(), 21, &all);
    let texts = prompts_and_rephrases(&all[..2]);
    let (prompts, _, rows) = encode_prompts(&base, &texts);
    let model = base.model().unwrap();
    let elder = &session.elder;
    let answer_logprob = |i: usize, e: usize| forced_answer_logprob(model, elder, &prompts[i], e);
    // Each prompt's match and runner-up (the gate off).
    let mut plain = ElderAdapter::inference(elder, rows.clone());
    model.logits(&prompts, &mut plain);
    let threshold = elder.scope_threshold();
    let mut cases = Vec::new();
    for (i, m) in plain.key_matches.iter().enumerate() {
        let m = m.expect("every prompt matches an edit");
        assert!(plain.in_scope[i], "prompt {i} ({}) out of scope", texts[i]);
        let next = m
            .runner_up()
            .expect("the subject's other edit is the runner-up");
        assert_eq!(
            elder.memory[m.entry].subject,
            elder.memory[next.entry].subject
        );
        assert!(next.score >= threshold);
        cases.push((
            m.entry,
            next.entry,
            answer_logprob(i, m.entry),
            answer_logprob(i, next.entry),
        ));
    }
    // A gate that turns some picks away whose runner-up it keeps.
    let mut levels: Vec<f32> = cases.iter().flat_map(|c| [c.2, c.3]).collect();
    levels.sort_by(f32::total_cmp);
    let gates: Vec<f32> = levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let falls_back = |g: f32| cases.iter().filter(|c| c.2 < g && c.3 >= g).count();
    let log_gate = gates
        .iter()
        .copied()
        .max_by_key(|&g| falls_back(g))
        .unwrap();
    assert!(
        falls_back(log_gate) > 0,
        "no gate makes a runner-up answer: {cases:?}"
    );
    let mut gated = session.elder.clone();
    gated.cfg.answer_gate = log_gate.exp();
    gated.cfg.answer_gate_fallback = true;
    gated.cfg.validate(&base.cfg).unwrap();
    let mut adapter = ElderAdapter::inference(&gated, rows.clone());
    let (logits, _) = model.logits(&prompts, &mut adapter);
    let expected: Vec<Option<usize>> = cases
        .iter()
        .map(|&(pick, next, lp_pick, lp_next)| {
            if lp_pick >= log_gate {
                Some(pick)
            } else if lp_next >= log_gate {
                Some(next)
            } else {
                None
            }
        })
        .collect();
    assert_answered_as_forced(model, elder, &adapter, &logits, &prompts, &texts, &expected);
    // Without the fallback the same gate sends those prompts to the base model.
    gated.cfg.answer_gate_fallback = false;
    let mut without = ElderAdapter::inference(&gated, rows.clone());
    model.logits(&prompts, &mut without);
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(without.gated[i], c.2 < log_gate, "prompt {i}");
    }
}

/// `answer_gate_candidates`: a prompt is answered by the candidate edit (of the key store's
/// ranking, the first N in scope) whose experts give their own answer the highest probability,
/// when that reaches the gate, else by the base model; the relation key's first choice is not
/// kept because it came first. Checked against forward passes with each sequence's experts
/// forced and against each candidate's answer log-probability by teacher forcing.
#[test]
fn the_answer_gate_keeps_the_candidate_whose_experts_answer_best() {
    use elder::elder::molora::ElderAdapter;

    let tmp = tempfile::tempdir().unwrap();
    // Three edits about one subject (records 1 and 2 moved to record 0's subject) and one other.
    let all = one_subject_records(4, 2);
    let (base, session) = edited_tiny_model(tmp.path(), 23, &all);
    let texts = prompts_and_rephrases(&all[..3]);
    let (prompts, _, rows) = encode_prompts(&base, &texts);
    let model = base.model().unwrap();
    let elder = &session.elder;
    let answer_logprob = |i: usize, e: usize| forced_answer_logprob(model, elder, &prompts[i], e);
    // Each prompt's ranked candidates (the gate off) and their answers' log-probabilities.
    let mut plain = ElderAdapter::inference(elder, rows.clone());
    model.logits(&prompts, &mut plain);
    let threshold = elder.scope_threshold();
    let asked = 3;
    let cases: Vec<Vec<(usize, f32)>> = plain
        .candidates()
        .iter()
        .enumerate()
        .map(|(i, ranked)| {
            assert!(plain.in_scope[i], "prompt {i} ({}) out of scope", texts[i]);
            ranked
                .iter()
                .filter(|m| m.score >= threshold)
                .take(asked)
                .map(|m| (m.entry, answer_logprob(i, m.entry)))
                .collect()
        })
        .collect();
    assert!(
        cases.iter().all(|c| c.len() >= 2) && cases.iter().any(|c| c.len() == 3),
        "the prompts have their subject's edits as candidates: {cases:?}"
    );
    // The best candidate of each prompt (the first among equals) and a gate between the best
    // log-probabilities, so that some prompts are kept and some turned away.
    let best: Vec<(usize, f32)> = cases
        .iter()
        .map(|c| {
            c.iter()
                .copied()
                .fold(c[0], |b, x| if x.1 > b.1 { x } else { b })
        })
        .collect();
    let mut levels: Vec<f32> = best.iter().map(|b| b.1).collect();
    levels.sort_by(f32::total_cmp);
    let log_gate = (levels[levels.len() / 2 - 1] + levels[levels.len() / 2]) / 2.0;
    assert!(
        best.iter()
            .zip(&cases)
            .any(|(b, c)| b.1 >= log_gate && b.0 != c[0].0),
        "no kept prompt moved off the relation key's first choice: {cases:?}"
    );
    let mut gated = session.elder.clone();
    gated.cfg.answer_gate = log_gate.exp();
    gated.cfg.answer_gate_candidates = asked;
    gated.cfg.validate(&base.cfg).unwrap();
    let mut adapter = ElderAdapter::inference(&gated, rows.clone());
    let (logits, _) = model.logits(&prompts, &mut adapter);
    let expected: Vec<Option<usize>> = best
        .iter()
        .map(|&(e, lp)| (lp >= log_gate).then_some(e))
        .collect();
    assert_answered_as_forced(model, elder, &adapter, &logits, &prompts, &texts, &expected);
    for (i, b) in best.iter().enumerate() {
        let reported = adapter.answer_logprobs[i].unwrap();
        assert!(
            (reported - b.1).abs() < 1e-3,
            "prompt {i}: {reported} vs {best:?}"
        );
    }
}

/// Logits `[seq * vocab]` of each sequence with the experts of `edits[i]` forced on it (None:
/// the base model); each sequence's prompt is its first `prompt_lens[i]` tokens (under
/// `expert_rows = "answer"` the experts change it from its last prompt token on).
fn forced_logits(
    model: &elder::model::Model,
    elder: &elder::elder::molora::Elder,
    seqs: &[Vec<u32>],
    prompt_lens: &[usize],
    edits: &[Option<usize>],
) -> Vec<Vec<f32>> {
    use elder::elder::molora::ElderAdapter;
    use elder::model::runner::prompt_rows;

    let seq = seqs.iter().map(Vec::len).max().unwrap();
    let mut adapter = ElderAdapter::inference(elder, prompt_rows(seq, seqs.iter().map(Vec::len)));
    adapter.routing = Some(elder.stored_routing(edits));
    adapter.in_scope = edits.iter().map(Option::is_some).collect();
    adapter.answer_from = (elder.cfg.expert_rows == ExpertRows::Answer)
        .then(|| prompt_lens.iter().map(|l| l - 1).collect());
    let (logits, _) = model.logits(seqs, &mut adapter);
    let vocab = model.cfg.vocab_size;
    logits.chunks(seq * vocab).map(<[f32]>::to_vec).collect()
}

/// log P(edit `e`'s answer | `prompt`) under e's experts, by teacher forcing.
fn forced_answer_logprob(
    model: &elder::model::Model,
    elder: &elder::elder::molora::Elder,
    prompt: &[u32],
    e: usize,
) -> f32 {
    let vocab = model.cfg.vocab_size;
    let answer = &elder.memory[e].answer;
    let seq = [prompt, &answer[..]].concat();
    let logits = &forced_logits(model, elder, &[seq], &[prompt.len()], &[Some(e)])[0];
    answer
        .iter()
        .enumerate()
        .map(|(k, &t)| {
            let row = &logits[(prompt.len() - 1 + k) * vocab..][..vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            row[t as usize] - lse
        })
        .sum()
}

/// A gated forward (`adapter`, its `logits` of the padded batch) answered each prompt as the
/// `expected` edit's experts forced on it would (None: the base model, turned away by the gate),
/// and says so in its decisions.
fn assert_answered_as_forced(
    model: &elder::model::Model,
    elder: &elder::elder::molora::Elder,
    adapter: &elder::elder::molora::ElderAdapter,
    logits: &[f32],
    prompts: &[Vec<u32>],
    texts: &[String],
    expected: &[Option<usize>],
) {
    let vocab = model.cfg.vocab_size;
    let seq = prompts.iter().map(Vec::len).max().unwrap();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let want = forced_logits(model, elder, prompts, &lens, expected);
    for (i, e) in expected.iter().enumerate() {
        let got = &logits[i * seq * vocab..(i + 1) * seq * vocab];
        let rows = prompts[i].len() * vocab;
        let worst = got[..rows]
            .iter()
            .zip(&want[i][..rows])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "prompt {i} ({}): {worst}", texts[i]);
        assert_eq!(adapter.in_scope[i], e.is_some(), "prompt {i}");
        assert_eq!(adapter.gated[i], e.is_none(), "prompt {i}");
        if let Some(e) = e {
            assert_eq!(adapter.key_matches[i].unwrap().entry, *e, "prompt {i}");
        }
    }
}

/// `n` records, the relations of records `1..=moved` moved to record 0's subject (so that many
/// edits are about one subject).
fn one_subject_records(n: usize, moved: usize) -> Vec<EditRecord> {
    let mut all = records(n);
    let subject = all[0].subject.clone().unwrap();
    for r in &mut all[1..=moved] {
        let other = r.subject.clone().unwrap();
        let moved = |t: &str| t.replace(&other, &subject);
        r.prompt = moved(&r.prompt);
        r.rephrases = r.rephrases.iter().map(|t| moved(t)).collect();
        r.subject = Some(subject.clone());
        r.knowledge_id = format!("{}-moved", r.knowledge_id);
    }
    all
}

/// A tiny Llama (seeded) with `records` applied by the default preset (12 iterations).
fn edited_tiny_model(dir: &Path, seed: u64, records: &[EditRecord]) -> (BaseModel, EditSession) {
    let base = tiny_model(&dir.join("model"), seed);
    let mut session = EditSession::open(
        &base,
        &dir.join("s"),
        Some(ElderConfig {
            iterations: 12,
            ..default_config(&base)
        }),
    )
    .unwrap();
    apply_stream(&base, &mut session, records, false, None).unwrap();
    (base, session)
}

/// Each record's prompt followed by its rephrasings.
fn prompts_and_rephrases(records: &[EditRecord]) -> Vec<String> {
    records
        .iter()
        .flat_map(|r| std::iter::once(r.prompt.clone()).chain(r.rephrases.iter().cloned()))
        .collect()
}
