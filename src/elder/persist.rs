//! Converting ELDER's trainable state to and from the durable edit state's tensors and memory.

use anyhow::{bail, ensure, Context, Result};

use crate::model::layers::Site;
use crate::model::ModelConfig;

use super::codebook::Codebook;
use super::config::{AllocationMode, ElderConfig, KeyKind, RelationKey};
use super::keystore::{Background, KeyCeilings, KeySpace, KeyStore, RelationKeys};
use super::memory;
use super::molora::Elder;
use super::state::{EditState, NamedTensor};

/// Name of the calibrated mean query in the state.
const QUERY_MEAN: &str = "query_mean";
/// Names of the key store's tensors.
const KEYS: &str = "keys.keys";
const RELATION_KEYS: &str = "keys.relation";
/// Each edit's subject length in tokens (read by `relation_key = "context"`).
const RELATION_SUBJECT_TOKENS: &str = "keys.relation_subject_tokens";
const KEY_CEILINGS: &str = "keys.ceiling";
const KEY_BACKGROUND: &str = "keys.background";
const RELATION_BACKGROUND: &str = "keys.relation_background";

fn tensor_name(layer: usize, block: usize, part: &str) -> String {
    format!("molora.{layer}.block{block}.{part}")
}

fn tensor(name: &str, shape: Vec<usize>, data: &[f32]) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        shape,
        data: data.to_vec(),
    }
}

fn background_tensors(prefix: &str, bg: &Background, out: &mut Vec<NamedTensor>) {
    out.push(tensor(
        &format!("{prefix}.first"),
        vec![bg.first.len()],
        &bg.first,
    ));
    out.push(tensor(
        &format!("{prefix}.rest"),
        vec![bg.rest.len()],
        &bg.rest,
    ));
    // Only with `key_position_means > 1`: states without it keep their bytes.
    if !bg.leading.is_empty() {
        out.push(tensor(
            &format!("{prefix}.leading"),
            vec![bg.leading.len(), bg.rest.len()],
            &bg.leading.concat(),
        ));
    }
}

fn read_background(state: &EditState, prefix: &str) -> Result<Option<Background>> {
    let get = |part: &str| {
        state
            .tensor(&format!("{prefix}.{part}"))
            .map(|t| t.data.clone())
    };
    match (get("first"), get("rest")) {
        (Some(first), Some(rest)) if first.len() == rest.len() => {
            let leading = match get("leading") {
                Some(rows) if rows.len() % rest.len().max(1) == 0 => rows
                    .chunks(rest.len().max(1))
                    .map(<[f32]>::to_vec)
                    .collect(),
                Some(_) => bail!(
                    "edit state {}: {prefix}.leading is not a whole number of rows",
                    state.dir().display()
                ),
                None => Vec::new(),
            };
            Ok(Some(Background {
                first,
                leading,
                rest,
            }))
        }
        (None, None) => Ok(None),
        _ => bail!(
            "edit state {}: the key store's {prefix} tensors are incomplete",
            state.dir().display()
        ),
    }
}

impl Elder {
    /// Every trainable tensor, named `molora.{layer}.block{block}.{lora_a|lora_b|router_w|router_b}`,
    /// the calibrated mean query, and the key store (`keys.*`).
    pub fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (i, (layer, &block)) in self.layers.iter().zip(&self.cfg.molora_blocks).enumerate() {
            for (part, shape, data) in layer.tensors(&self.cfg) {
                out.push(tensor(&tensor_name(i, block, part), shape, data));
            }
        }
        if let Some(mean) = &self.query_mean {
            out.push(tensor(QUERY_MEAN, vec![mean.len()], mean));
        }
        if let Some(store) = &self.key_store {
            background_tensors(KEY_BACKGROUND, &store.space.background, &mut out);
            let n = store.len();
            if n > 0 {
                out.push(tensor(
                    KEYS,
                    vec![n, store.variants * store.span, store.space.dim],
                    &store.keys,
                ));
            }
            if n > 0 && store.ceilings.is_on() {
                out.push(tensor(
                    KEY_CEILINGS,
                    vec![n, store.variants],
                    &store.ceilings.of_keys,
                ));
            }
            if let Some(keys) = &store.relation {
                background_tensors(RELATION_BACKGROUND, &keys.space.background, &mut out);
                if n > 0 {
                    out.push(tensor(RELATION_KEYS, vec![n, keys.space.dim], &keys.rows));
                }
                // Only `context` keys read them; kept for both kinds so a reloaded store equals
                // the one that wrote it.
                if n > 0 {
                    let counts: Vec<f32> = keys.subject_tokens.iter().map(|&t| t as f32).collect();
                    out.push(tensor(RELATION_SUBJECT_TOKENS, vec![n], &counts));
                }
            }
        }
        out
    }

    /// The state's memory of applied edits, as the bytes the state keeps.
    pub fn memory_bytes(&self) -> Result<Vec<u8>> {
        memory::to_jsonl(&self.memory)
    }

    /// Rebuilds ELDER from a committed state (fresh initialisation when nothing was committed yet).
    pub fn from_state(cfg: ElderConfig, model: &ModelConfig, state: &EditState) -> Result<Self> {
        Self::from_state_after(cfg, model, state, None)
    }

    /// [`Elder::from_state`] for a state that grew from `previous` (a replica installing the
    /// next generation): the key store's impostor scores of the edits both have are taken from
    /// `previous` when its keys, ceilings and subjects are a prefix of this state's, and only
    /// the new edits are scored (the same scores as from scratch: each is a max over the same
    /// pairs). Why: scoring every pair again is quadratic in the edits, 1.2 of the 1.9 s a
    /// SmolLM2 state of 1000 edits took to open.
    pub fn from_state_after(
        cfg: ElderConfig,
        model: &ModelConfig,
        state: &EditState,
        previous: Option<&Elder>,
    ) -> Result<Self> {
        let mut elder = Elder::new(cfg, model)?;
        let Some(codebook) = state.codebook() else {
            return Ok(elder);
        };
        if codebook.bits_per_code() != elder.cfg.code_bits() {
            bail!(
                "edit state {} has {}-bit codes, the config needs {}",
                state.dir().display(),
                codebook.bits_per_code(),
                elder.cfg.code_bits()
            );
        }
        let cfg = elder.cfg.clone();
        let grows = cfg.allocation == AllocationMode::Fresh;
        for (i, layer) in elder.layers.iter_mut().enumerate() {
            let block = cfg.molora_blocks[i];
            let fresh = layer.clone();
            // A growing pool has as many experts as the state made; a fixed one its initial count.
            let experts = match state.tensor(&tensor_name(i, block, "lora_a")) {
                Some(t) if grows => t.shape.first().copied().unwrap_or(0),
                _ => fresh.experts(cfg.rank),
            };
            for ((part, mut shape, _), dst) in
                fresh.tensors(&cfg).into_iter().zip(layer.tensors_mut())
            {
                if grows && (part == "lora_a" || part == "lora_b") {
                    shape[0] = experts;
                }
                let name = tensor_name(i, block, part);
                let t = state.tensor(&name).with_context(|| {
                    format!("edit state {} has no tensor {name}", state.dir().display())
                })?;
                if t.shape != shape {
                    bail!(
                        "edit state tensor {name} has shape {:?}, expected {shape:?}",
                        t.shape
                    );
                }
                dst.clone_from(&t.data);
            }
        }
        elder.query_mean = state.tensor(QUERY_MEAN).map(|t| t.data.clone());
        elder.codebook =
            Codebook::from_words(codebook.bits_per_code(), codebook.entries().to_vec())?;
        elder.memory = memory::from_jsonl(state.memory())
            .with_context(|| format!("edit state {}: memory", state.dir().display()))?;
        elder.key_store = read_key_store(&elder.cfg, state)?;
        if let Some(store) = &elder.key_store {
            ensure!(
                store.len() == elder.memory.len(),
                "edit state {}: {} edits in memory but {} in the key store",
                state.dir().display(),
                elder.memory.len(),
                store.len()
            );
        }
        if let Some(previous) = previous.filter(|p| p.cfg == elder.cfg) {
            let same_subjects = previous.memory.len() <= elder.memory.len()
                && previous
                    .memory
                    .iter()
                    .zip(&elder.memory)
                    .all(|(a, b)| a.subject == b.subject);
            if let (Some(mine), Some(theirs), true) =
                (&mut elder.key_store, &previous.key_store, same_subjects)
            {
                mine.adopt_impostors(theirs);
            }
        }
        elder.refresh_scope_calibration();
        Ok(elder)
    }
}

/// The key store of a state (`None` when it has none yet).
fn read_key_store(cfg: &ElderConfig, state: &EditState) -> Result<Option<KeyStore>> {
    let Some(background) = read_background(state, KEY_BACKGROUND)? else {
        return Ok(None);
    };
    let site = Site {
        block: cfg.key_block,
        proj: cfg.key_proj,
    };
    let width = background.rest.len();
    let centred = !matches!(cfg.key, KeyKind::LastToken | KeyKind::PromptMean);
    let space = KeySpace::new(site, width, centred, background, cfg.key_dim, cfg.seed);
    let variants = KeyStore::variants_for(cfg);
    // Each key's rows follow one another (`key_span` of them).
    let rows = variants * cfg.key_span;
    let keys = match state.tensor(KEYS) {
        Some(t) => {
            ensure!(
                t.shape.len() == 3 && t.shape[1] == rows && t.shape[2] == space.dim,
                "edit state tensor {KEYS} has shape {:?}, expected [edits, {rows}, {}]",
                t.shape,
                space.dim
            );
            t.data.clone()
        }
        None => Vec::new(),
    };
    let relation = match read_background(state, RELATION_BACKGROUND)? {
        Some(bg) => {
            let site = Site {
                block: cfg.relation_block,
                proj: cfg.relation_proj,
            };
            let width = bg.rest.len();
            let space = KeySpace::new(site, width, true, bg, 0, cfg.seed);
            let mut keys = RelationKeys::new(cfg.relation_key, space);
            keys.rows = state
                .tensor(RELATION_KEYS)
                .map(|t| t.data.clone())
                .unwrap_or_default();
            let edits = keys.rows.len() / keys.space.dim.max(1);
            keys.subject_tokens = match state.tensor(RELATION_SUBJECT_TOKENS) {
                Some(t) => t.data.iter().map(|&x| x as u32).collect(),
                // States written before subject lengths were kept (last-token keys never read them).
                None if cfg.relation_key == RelationKey::LastToken => vec![1; edits],
                None if edits == 0 => Vec::new(),
                None => bail!(
                    "edit state {}: context relation keys without {RELATION_SUBJECT_TOKENS}",
                    state.dir().display()
                ),
            };
            ensure!(
                keys.subject_tokens.len() == edits,
                "edit state {}: {edits} relation keys but {} subject lengths",
                state.dir().display(),
                keys.subject_tokens.len()
            );
            Some(keys)
        }
        None => None,
    };
    let mut ceilings = KeyCeilings::off();
    if let Some(margin) = cfg.key_ceiling_margin {
        ceilings.margin = Some(margin);
        ceilings.of_keys = state
            .tensor(KEY_CEILINGS)
            .map(|t| t.data.clone())
            .unwrap_or_default();
        ensure!(
            ceilings.of_keys.len() * cfg.key_span * space.dim == keys.len(),
            "edit state {}: {} keys but {} key ceilings",
            state.dir().display(),
            keys.len() / (cfg.key_span * space.dim).max(1),
            ceilings.of_keys.len()
        );
    }
    let mut store = KeyStore::new(cfg.key, variants, cfg.key_span, space, relation, ceilings);
    store.set_keys(keys);
    if let Some(keys) = &store.relation {
        ensure!(
            keys.rows.len() == store.len() * keys.space.dim,
            "edit state {}: {} edits have keys but {} relation keys",
            state.dir().display(),
            store.len(),
            keys.rows.len() / keys.space.dim.max(1)
        );
    }
    Ok(Some(store))
}
