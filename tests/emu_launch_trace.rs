//! The shape of the GPU's steps, read from the CUDA emulator's trace of what the host asked of the
//! device (`elder_cuda_emu::trace`): which kernels a step launches and how often, and where it
//! synchronises, copies or allocates. Results cannot show these; the speed targets rest on them
//! (`docs/gpu.md`): one launch for the router and one per MoLoRA site, no host round trip
//! inside a forward or an edit iteration, a decode step that is one CUDA-graph replay, and
//! steady-state steps that allocate nothing.
//!
//! Only on the emulator (hence `emu_`, and not among the `gpu_*` tests that tools/gpu_check.sh runs
//! on a GPU machine): with a real CUDA driver these tests print `SKIP` (Nsight Systems shows the same
//! structure there). The trace is per thread, so the tests may run in parallel.

mod common;

use elder::elder::config::ElderConfig;
use elder::elder::molora::Elder;
use elder::elder::trainer::EditExample;
use elder::model::runner::pad_batch;
use elder::model::{Arch, Model};
use elder::runtime::cuda::{Capacity, ElderStep, GpuModel, GpuTrainer};
use std::collections::BTreeMap;

use common::tiny;

/// What the host asked of the device while `f` ran on this thread.
struct Trace(Vec<String>);

impl Trace {
    fn record<R>(f: impl FnOnce() -> R) -> (Trace, R) {
        elder_cuda_emu::trace::start().expect("starting the emulator trace");
        let r = f();
        let events = elder_cuda_emu::trace::stop().expect("reading the emulator trace");
        (Trace(events), r)
    }

    /// Events whose first word is `kind` (`launch`, `gemm`, `htod`, `dtoh`, `sync`, `alloc`, ...),
    /// not counting operations recorded into a graph.
    fn count(&self, kind: &str) -> usize {
        self.0
            .iter()
            .filter(|e| e.split(' ').next() == Some(kind))
            .count()
    }

    /// Eager launches of kernels whose name starts with `prefix`.
    fn launches(&self, prefix: &str) -> usize {
        self.0
            .iter()
            .filter(|e| {
                e.strip_prefix("launch ")
                    .is_some_and(|k| k.starts_with(prefix))
            })
            .count()
    }

    /// Launches recorded into a graph of kernels whose name starts with `prefix`.
    fn captured_launches(&self, prefix: &str) -> usize {
        self.0
            .iter()
            .filter(|e| {
                e.strip_prefix("capture launch ")
                    .is_some_and(|k| k.starts_with(prefix))
            })
            .count()
    }

    /// Position of the first event satisfying `pred`.
    fn position(&self, pred: impl Fn(&str) -> bool) -> Option<usize> {
        self.0.iter().position(|e| pred(e))
    }

    /// Per kernel (dtype suffix dropped) or operation kind: how many times.
    fn histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for e in &self.0 {
            let key = match e.strip_prefix("launch ") {
                Some(k) => k.to_string(),
                None => e.split(' ').next().unwrap_or("").to_string(),
            };
            *h.entry(key).or_insert(0) += 1;
        }
        h
    }
}

fn elder_for(model: &Model, blocks: Vec<usize>) -> Elder {
    let cfg = ElderConfig {
        query_block: 0,
        molora_blocks: blocks,
        num_experts: 4,
        rank: 4,
        top_k: 2,
        iterations: 3,
        ..ElderConfig::preset_for(&model.cfg)
    };
    Elder::new(cfg, &model.cfg).unwrap()
}

fn host_waits(t: &Trace) -> usize {
    t.count("sync") + t.count("dtoh")
}

/// An edited prompt forward: the router runs once, after the query site and before the first
/// MoLoRA site; every MoLoRA site is one launch; nothing comes back to the host and nothing is
/// allocated in between. The base forward launches neither.
#[test]
fn edited_forward_routes_in_one_launch_and_each_molora_site_is_one_launch() {
    let Some(dev) = common::traced_device(
        "edited_forward_routes_in_one_launch_and_each_molora_site_is_one_launch",
    ) else {
        return;
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch, 11);
        let elder = elder_for(&model, vec![1, 2, 3]);
        let prompts: Vec<Vec<u32>> = vec![vec![3, 9, 4, 1], vec![7, 2], vec![5, 5, 6]];
        let cap = Capacity { batch: 3, seq: 8 };
        let mut gpu = GpuModel::<f32>::new(dev.clone(), &model, cap).unwrap();
        gpu.set_elder(Some(&elder)).unwrap();
        let (ids, shape) = pad_batch(&prompts, &[0, 0, 0]);
        let rows: Vec<usize> = (0..3)
            .map(|b| b * shape.seq + prompts[b].len() - 1)
            .collect();
        let allocations = gpu.allocations();

        let (edited, r) =
            Trace::record(|| gpu.forward(&ids, &shape, ElderStep::Prompt(&rows, &ids)));
        r.unwrap();
        let tag = format!("{arch:?} edited forward");
        eprintln!("{tag}: {:?}", edited.histogram());
        assert_eq!(
            edited.launches("router_fused_"),
            1,
            "{tag}: router launches"
        );
        assert_eq!(
            edited.launches("lora_"),
            3,
            "{tag}: one launch per MoLoRA site (3 sites)"
        );
        assert_eq!(edited.launches("lora_forward_"), 3, "{tag}");
        assert_eq!(host_waits(&edited), 0, "{tag}: waited for the device");
        assert_eq!(edited.count("alloc"), 0, "{tag}: allocated");
        let router = edited
            .position(|e| e.starts_with("launch router_fused_"))
            .unwrap();
        let first_site = edited
            .position(|e| e.starts_with("launch lora_forward_"))
            .unwrap();
        assert!(
            router < first_site,
            "{tag}: a MoLoRA site ran before routing"
        );
        // Only the request's query rows go up before routing: the router needs nothing else
        // from the host.
        assert!(
            edited.0[router..].iter().all(|e| !e.starts_with("htod")),
            "{tag}: host data written after routing: {:?}",
            &edited.0[router..]
        );

        let (base, r) = Trace::record(|| gpu.forward(&ids, &shape, ElderStep::Off));
        r.unwrap();
        assert_eq!(base.launches("router_"), 0, "{arch:?} base forward routes");
        assert_eq!(
            base.launches("lora_"),
            0,
            "{arch:?} base forward runs MoLoRA"
        );
        assert_eq!(host_waits(&base), 0, "{arch:?} base forward waited");
        // The edited forward is the base forward plus the router and the sites, and the query
        // gather (no other extra work).
        let extra = edited.count("launch") - base.count("launch");
        assert!(
            (4..=5).contains(&extra),
            "{tag}: {extra} more launches than the base forward"
        );
        assert_eq!(gpu.allocations(), allocations);
    }
}

/// A decode step after the first is one graph replay: the inputs go up, one `graph_launch`, the
/// logits come down; no eager launch, no allocation. The captured graph holds every MoLoRA site
/// (one launch each) and no router: decode keeps the prompt's routing.
#[test]
fn decode_step_is_one_graph_replay_with_one_launch_per_molora_site() {
    let Some(dev) =
        common::traced_device("decode_step_is_one_graph_replay_with_one_launch_per_molora_site")
    else {
        return;
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch, 12);
        let elder = elder_for(&model, vec![1, 2]);
        let cap = Capacity { batch: 2, seq: 12 };
        let mut gpu = GpuModel::<f32>::new(dev.clone(), &model, cap).unwrap();
        gpu.set_elder(Some(&elder)).unwrap();
        gpu.set_decode_graphs(true);
        let prompts: Vec<Vec<u32>> = vec![vec![3, 9, 4], vec![7, 2]];
        let (ids, shape) = pad_batch(&prompts, &[0, 0]);
        let rows: Vec<usize> = (0..2)
            .map(|b| b * shape.seq + prompts[b].len() - 1)
            .collect();
        gpu.forward(&ids, &shape, ElderStep::Prompt(&rows, &ids))
            .unwrap();
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut step = |gpu: &mut GpuModel<f32>, token: u32| {
            let next = vec![vec![token], vec![token + 1]];
            let (ids, shape) = pad_batch(&next, &lens);
            lens.iter_mut().for_each(|l| *l += 1);
            Trace::record(|| gpu.decode_step(&ids, &shape, true).unwrap()).0
        };
        let tag = format!("{arch:?} decode");

        let capture = step(&mut gpu, 5);
        assert_eq!(
            capture.count("graph_launch"),
            1,
            "{tag}: capture then launch"
        );
        assert_eq!(
            capture.captured_launches("lora_forward_"),
            2,
            "{tag}: one captured launch per MoLoRA site"
        );
        assert_eq!(capture.captured_launches("lora_"), 2, "{tag}");
        assert_eq!(
            capture.captured_launches("router_"),
            0,
            "{tag}: decode re-routed"
        );
        assert_eq!(
            capture.launches(""),
            0,
            "{tag}: eager launches beside the graph"
        );

        let allocations = gpu.allocations();
        for token in [6, 7] {
            let replay = step(&mut gpu, token);
            eprintln!("{tag} replay: {:?}", replay.0);
            assert_eq!(replay.count("graph_launch"), 1, "{tag}: {:?}", replay.0);
            assert_eq!(replay.count("launch"), 0, "{tag}: eager launches");
            assert_eq!(replay.count("gemm"), 0, "{tag}: eager GEMMs");
            assert_eq!(replay.count("alloc"), 0, "{tag}: allocated");
            assert_eq!(replay.count("dtoh"), 1, "{tag}: one download, the logits");
            let launch = replay.position(|e| e.starts_with("graph_launch")).unwrap();
            let download = replay.position(|e| e.starts_with("dtoh")).unwrap();
            assert!(launch < download, "{tag}");
            assert!(
                replay.0[..launch].iter().all(|e| e.starts_with("htod")),
                "{tag}: only input writes before the replay: {:?}",
                &replay.0[..launch]
            );
        }
        assert_eq!(gpu.allocations(), allocations);
        assert_eq!(gpu.decode_graph_count(), 1);
    }
}

fn edit_batch(model: &Model) -> Vec<EditExample> {
    let v = model.cfg.vocab_size as u32;
    (0..3)
        .map(|i| EditExample {
            prompt: (0..3 + i as u32)
                .map(|t| (7 * t + 3 * i as u32 + 1) % v)
                .collect(),
            target: vec![(11 * i as u32 + 2) % v, (5 * i as u32 + 9) % v],
            knowledge_id: format!("fact-{i}"),
        })
        .collect()
}

/// An edit iteration (route, forward, cross-entropy, backward, router backward, Adam) is queued
/// with no host round trip: the difference between a 3-iteration and a 1-iteration eager batch
/// holds launches, one upload (the iteration's Adam step sizes) and one device copy (its losses),
/// with one router launch and one forward launch per MoLoRA site. The batch around the iterations
/// waits for the device a fixed number of times, and allocates nothing once the buffers fit.
/// With iteration graphs, iteration 1 is captured and later iterations are one replay each: the
/// graph holds exactly an eager iteration's work, and the host launches nothing else.
#[test]
fn edit_iterations_launch_work_and_never_wait_for_the_host() {
    let Some(dev) =
        common::traced_device("edit_iterations_launch_work_and_never_wait_for_the_host")
    else {
        return;
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch, 13);
        let mut elder = elder_for(&model, vec![1, 2]);
        let batch = edit_batch(&model);
        let mut gpu =
            GpuTrainer::<f32>::new(dev.clone(), &model, Capacity { batch: 1, seq: 1 }).unwrap();
        // Sizes the buffers (for up to 5 iterations' losses).
        elder.cfg.iterations = 5;
        gpu.edit_batch(&mut elder, &batch, |_, _| {}).unwrap();
        gpu.set_iteration_graphs(false);
        let allocations = gpu.allocations();
        let traced = |iterations: usize, gpu: &mut GpuTrainer<f32>, elder: &mut Elder| {
            elder.cfg.iterations = iterations;
            let (t, r) = Trace::record(|| gpu.edit_batch(elder, &batch, |_, _| {}));
            r.unwrap();
            t
        };
        let one = traced(1, &mut gpu, &mut elder);
        let three = traced(3, &mut gpu, &mut elder);
        let tag = format!("{arch:?} edit");
        let (h1, h3) = (one.histogram(), three.histogram());
        // What two more iterations added, per iteration.
        let mut per_iteration = BTreeMap::new();
        for (k, &n3) in &h3 {
            let n1 = h1.get(k).copied().unwrap_or(0);
            assert_eq!(
                (n3 - n1) % 2,
                0,
                "{tag}: {k} is not the same in every iteration"
            );
            if n3 > n1 {
                per_iteration.insert(k.clone(), (n3 - n1) / 2);
            }
        }
        assert!(h1.keys().all(|k| h3.contains_key(k)), "{tag}");
        let launches: usize = per_iteration
            .iter()
            .filter(|(k, _)| k.as_str() != "gemm")
            .map(|(_, n)| n)
            .sum();
        eprintln!(
            "{tag}: per iteration {launches} kernel launches + {} GEMMs: {per_iteration:?}",
            per_iteration.get("gemm").copied().unwrap_or(0)
        );
        eprintln!("{tag}: around the iterations (1-iteration batch): {h1:?}");
        for kind in ["sync", "dtoh", "alloc", "free", "graph_launch"] {
            assert!(
                !per_iteration.contains_key(kind),
                "{tag}: an iteration does {kind} ({per_iteration:?})"
            );
        }
        assert_eq!(
            per_iteration.get("htod"),
            Some(&1),
            "{tag}: the Adam schedule"
        );
        assert_eq!(per_iteration.get("dtod"), Some(&1), "{tag}: the losses");
        assert_eq!(
            three.0.iter().filter(|e| *e == "htod 32").count()
                - one.0.iter().filter(|e| *e == "htod 32").count(),
            2,
            "{tag}: [step size, bias correction] of 4 tensors per iteration"
        );
        let count = |prefix: &str| -> usize {
            per_iteration
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, n)| n)
                .sum()
        };
        assert_eq!(count("router_fused_"), 1, "{tag}: routing per iteration");
        assert_eq!(
            count("lora_forward_"),
            2,
            "{tag}: one launch per MoLoRA site"
        );
        assert_eq!(count("router_backward_"), 1, "{tag}");
        assert_eq!(
            count("adam_"),
            4,
            "{tag}: A, B, router weights, router biases"
        );
        // The batch as a whole: a fixed number of waits however many iterations it runs.
        assert_eq!(host_waits(&one), host_waits(&three), "{tag}");
        assert_eq!(one.count("alloc"), 0, "{tag}: allocated");
        assert_eq!(three.count("alloc"), 0, "{tag}: allocated");
        assert_eq!(gpu.allocations(), allocations);

        // The same batch with iteration graphs: 5 iterations = 1 eager + 1 captured + 3 replays.
        gpu.set_iteration_graphs(true);
        let graphed = traced(5, &mut gpu, &mut elder);
        let tag = format!("{arch:?} edit with iteration graphs");
        assert_eq!(graphed.count("graph_launch"), 4, "{tag}");
        let per_iteration_work: usize = per_iteration
            .iter()
            .filter(|(k, _)| !["htod", "dtod"].contains(&k.as_str()))
            .map(|(_, n)| n)
            .sum();
        let captured = graphed
            .0
            .iter()
            .filter(|e| e.starts_with("capture "))
            .count();
        assert_eq!(
            captured, per_iteration_work,
            "{tag}: the graph holds one eager iteration's launches, GEMMs and memsets"
        );
        for kind in ["launch", "gemm", "memset"] {
            assert_eq!(
                graphed.count(kind),
                one.count(kind),
                "{tag}: eager {kind}s beyond the first iteration and the batch around it"
            );
        }
        assert_eq!(graphed.count("htod"), one.count("htod") + 4, "{tag}");
        assert_eq!(graphed.count("dtod"), one.count("dtod") + 4, "{tag}");
        assert_eq!(host_waits(&graphed), host_waits(&one), "{tag}");
        assert_eq!(graphed.count("alloc"), 0, "{tag}");
        eprintln!(
            "{arch:?} edit: 5 iterations with graphs: {} host-side launches/GEMMs/memsets, without: {}",
            ["launch", "gemm", "memset", "graph_launch"].iter().map(|k| graphed.count(k)).sum::<usize>(),
            ["launch", "gemm", "memset"].iter().map(|k| one.count(k)).sum::<usize>() + 4 * per_iteration_work,
        );
    }
}

/// The key store's match at the scale: 10^5 stored keys (three per edit) against a batch
/// of prompts is one launch, with only a clear of its output before it, no host wait and no
/// allocation.
#[test]
fn matching_a_hundred_thousand_stored_keys_is_one_launch() {
    use elder::backend::cuda::keystore::{self, KeyMatchOutputs, KeyMatchShape, StoredKeys};
    let Some(dev) = common::traced_device("matching_a_hundred_thousand_stored_keys_is_one_launch")
    else {
        return;
    };
    let s = KeyMatchShape {
        batch: 2,
        seq: 3,
        dim: 8,
        entries: 33_334,
        variants: 3,
        span: 1,
    };
    let keys = dev
        .upload(&vec![0.125f32; s.entries * s.variants * s.span * s.dim])
        .unwrap();
    let key_rows = dev.upload(&vec![1u8; s.entries * s.variants]).unwrap();
    let queries = dev.upload(&vec![0.25f32; s.batch * s.seq * s.dim]).unwrap();
    let lens = dev.upload(&[3i32, 2]).unwrap();
    let mut out = KeyMatchOutputs::alloc(&dev, s.batch, s.entries).unwrap();
    let stored = StoredKeys {
        keys: &keys,
        key_rows: &key_rows,
        ceilings: None,
    };
    let (trace, r) =
        Trace::record(|| keystore::key_match(&dev, &s, &queries, &lens, &stored, &mut out));
    r.unwrap();
    eprintln!("key match: {:?}", trace.histogram());
    assert_eq!(trace.launches("key_match_"), 1);
    assert_eq!(trace.count("launch"), 1, "one launch in all");
    assert_eq!(host_waits(&trace), 0);
    assert_eq!(trace.count("alloc"), 0);
    // Every key scores the same: the newest edit wins, as on the CPU.
    let top = keystore::unpack_top(&dev.download(&out.top).unwrap());
    assert_eq!(top[0].map(|(_, e)| e), Some(s.entries - 1));
    assert_eq!(top[1].map(|(_, e)| e), Some(s.entries - 1));
}

/// An edited prompt forward of a key-store state (the default preset, its gate off): the prompt's
/// keys are embedded once and matched once, before the first MoLoRA site; the host waits exactly
/// twice (the relation site's rows, then the match's scores: the decision still runs there) and
/// writes the decision up once; each MoLoRA site is one launch; nothing is allocated.
#[test]
fn a_key_store_forward_matches_once_and_waits_for_the_host_twice() {
    use elder::data::EditRecord;
    use elder::elder::config::Preset;
    use elder::model::checkpoint::StoreDtype;
    use elder::model::presets::write_random_checkpoint;
    use elder::session::{apply_stream, BaseModel, EditSession};

    let name = "a_key_store_forward_matches_once_and_waits_for_the_host_twice";
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_random_checkpoint(Arch::Llama, "tiny", 5, &dir, StoreDtype::F32).unwrap();
    let base = BaseModel::open(&dir).unwrap();
    let cfg = ElderConfig {
        iterations: 3,
        batch_size: 1,
        answer_gate: 0.0,
        ..ElderConfig::preset(Preset::Default, &base.cfg)
    };
    let records: Vec<EditRecord> = ["Zorbia", "Plimsoll"]
        .iter()
        .map(|s| EditRecord {
            id: s.to_string(),
            knowledge_id: s.to_string(),
            prompt: format!("The capital of {s} is"),
            target_new: " Quell".into(),
            target_true: None,
            subject: Some(s.to_string()),
            rephrases: Vec::new(),
            locality: Vec::new(),
        })
        .collect();
    let mut session = EditSession::open(&base, &tmp.path().join("state"), Some(cfg)).unwrap();
    apply_stream(&base, &mut session, &records, false, None).unwrap();
    let Some(dev) = common::traced_device(name) else {
        return;
    };
    let prompts: Vec<Vec<u32>> = ["The capital of Zorbia is", "My favourite colour is"]
        .iter()
        .map(|t| base.tokenizer.encode(t).unwrap())
        .collect();
    let (ids, shape) = pad_batch(&prompts, &[0, 0]);
    let rows: Vec<usize> = (0..2)
        .map(|b| b * shape.seq + prompts[b].len() - 1)
        .collect();
    let cap = Capacity {
        batch: 2,
        seq: shape.seq,
    };
    let model = base.model().unwrap();
    let mut gpu = GpuModel::<f32>::new(dev.clone(), model, cap).unwrap();
    gpu.set_elder(Some(&session.elder)).unwrap();
    let allocations = gpu.allocations();
    let (t, r) = Trace::record(|| gpu.forward(&ids, &shape, ElderStep::Prompt(&rows, &ids)));
    r.unwrap();
    eprintln!("key-store forward: {:?}", t.histogram());
    assert_eq!(t.launches("key_embed_"), 1);
    assert_eq!(t.launches("key_match_"), 1);
    let sites = session.elder.cfg.molora_blocks.len();
    assert_eq!(
        t.launches("lora_forward_"),
        sites,
        "one launch per MoLoRA site"
    );
    assert_eq!(t.count("dtoh"), 2, "the relation rows and the scores");
    assert_eq!(t.count("alloc"), 0);
    let matched = t.position(|e| e.starts_with("launch key_match_")).unwrap();
    let first_site = t
        .position(|e| e.starts_with("launch lora_forward_"))
        .unwrap();
    assert!(matched < first_site, "a MoLoRA site ran before the match");
    assert_eq!(gpu.allocations(), allocations);
    let report = gpu.elder_report().unwrap();
    assert_eq!(report.in_scope, vec![true, false]);
}

/// The stored allocation's iterations (`StoredSteps` on the device): no router anywhere, one
/// LoRA launch per MoLoRA site and an Adam launch for A and B only (a fixed pool has no routers);
/// after the first two iterations each one is two graph replays (forward-backward, Adam), one
/// upload (Adam's step sizes) and the row losses and argmaxes read back (the early stop decides
/// on them before the Adam step, as on the CPU): nothing launched eagerly, nothing allocated.
#[test]
fn stored_iterations_replay_two_graphs_and_read_their_losses_once() {
    use elder::elder::train_stored::{StoredBatch, StoredSteps};
    let Some(dev) =
        common::traced_device("stored_iterations_replay_two_graphs_and_read_their_losses_once")
    else {
        return;
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let tag = format!("{arch:?} stored");
        let model = tiny(arch, 17);
        let cfg = ElderConfig {
            molora_blocks: vec![1, 2],
            ..ElderConfig::default_preset_for(&model.cfg)
        };
        let mut work = Elder::new(cfg, &model.cfg).unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        for layer in &mut work.layers {
            layer.push_experts(4, 3, &mut rng);
        }
        let examples = edit_batch(&model);
        let rows: usize = examples.iter().map(|e| e.target.len()).sum();
        let batch = StoredBatch {
            weights: vec![0.5; rows],
            allocations: (0..3).map(|s| vec![vec![s as u32]; 2]).collect(),
            subject_rows: vec![0; 3],
            positive: vec![true; 3],
            examples,
        };
        let mut gpu =
            GpuTrainer::<f32>::new(dev.clone(), &model, Capacity { batch: 1, seq: 1 }).unwrap();
        gpu.set_iteration_graphs(true);
        let (first, r) = Trace::record(|| -> anyhow::Result<()> {
            gpu.prepare(work.clone(), &batch)?;
            gpu.losses()?;
            gpu.step(0)
        });
        r.unwrap();
        assert_eq!(first.launches("router_"), 0, "{tag}: a router ran");
        assert_eq!(first.launches("lora_forward_"), 2, "{tag}: one per site");
        assert_eq!(first.launches("adam_"), 2, "{tag}: A and B");
        assert_eq!(first.launches("cross_entropy_"), 1, "{tag}");
        let (capture, r) = Trace::record(|| -> anyhow::Result<()> {
            gpu.losses()?;
            gpu.step(1)
        });
        r.unwrap();
        assert_eq!(
            capture.count("graph_launch"),
            2,
            "{tag}: captured and launched"
        );
        assert_eq!(capture.captured_launches("router_"), 0, "{tag}");
        let allocations = gpu.allocations();
        let (later, r) = Trace::record(|| -> anyhow::Result<()> {
            for it in 2..5 {
                gpu.losses()?;
                gpu.step(it)?;
            }
            Ok(())
        });
        r.unwrap();
        eprintln!("{tag}: three later iterations: {:?}", later.histogram());
        assert_eq!(later.count("graph_launch"), 6, "{tag}: two replays each");
        for kind in ["launch", "gemm", "memset", "alloc", "free", "sync"] {
            assert_eq!(later.count(kind), 0, "{tag}: eager {kind}");
        }
        assert_eq!(later.count("htod"), 3, "{tag}: the Adam schedule");
        assert_eq!(later.count("dtoh"), 6, "{tag}: row losses and argmaxes");
        assert_eq!(gpu.allocations(), allocations);
    }
}
