#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets (fuzz/seeds/<target>/).

Usage: tools/fuzz_seeds.py [MODEL_DIR...] [--state STATE_DIR...]

Seeds built here: small safetensors files, GGUF files (a tiny Llama that imports, a
SentencePiece vocabulary, every metadata type, quantized tensors from tests/fixtures/gguf),
one block run per GGML type for the dequantizers, and the edit readers' fixtures. The files of
each MODEL_DIR (`elder init-random --preset tiny`: config.json, tokenizer.json) and of each
STATE_DIR (an edit state written by `elder edit`: manifest, codebook, experts, memory) are
copied in too. Only the standard library is needed. Files over 64 KiB are skipped.

tools/fuzz.sh gives libFuzzer these folders next to the corpora it grows and minimises
(fuzz/corpus/<target>/); tests/fuzz_corpora.rs replays both.
"""

import json
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
FIXTURES = ROOT / "tests" / "fixtures"
MAX_BYTES = 64 * 1024


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_BYTES:
        print(f"skip {target}/{name}: {len(data)} bytes")
        return
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


# --- safetensors ---------------------------------------------------------------------------

def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)]"""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32s(values):
    return b"".join(struct.pack("<f", v) for v in values)


def seed_safetensors():
    rng = random.Random(7)
    mixed = safetensors(
        [
            ("a.weight", "F32", [2, 3], f32s([rng.uniform(-1, 1) for _ in range(6)])),
            ("b.bias", "F16", [4], struct.pack("<4e", 1.0, -2.0, 0.5, 65504.0)),
            ("c", "BF16", [2, 2], bytes([0x80, 0x3F, 0x00, 0xC0, 0x00, 0x00, 0x80, 0x7F])),
            ("ids", "I64", [2], struct.pack("<2q", 1, -1)),
            ("scalar", "F32", [], f32s([3.0])),
            ("empty", "F32", [0, 4], b""),
        ],
        metadata={"format": "pt"},
    )
    put("safetensors", "mixed.safetensors", mixed)
    put("safetensors", "empty.safetensors", safetensors([]))
    experts = safetensors(
        [("layer0.A", "F32", [2, 4], f32s(range(8))), ("layer0.B", "F32", [4, 2], f32s(range(8)))],
        metadata={"generation": "1"},
    )
    put("safetensors", "experts.safetensors", experts)
    put("state_experts", "small.safetensors", experts)
    put("state_experts", "f16.safetensors", safetensors([("x", "F16", [2], struct.pack("<2e", 1, 2))]))
    # A format-4 segment: rows appended to a tensor (`NAME@FIRST_ROW`), one that does not continue
    # it, one with no row number.
    segment = safetensors(
        [
            ("layer0.A", "F32", [2, 4], f32s(range(8))),
            ("layer0.A@2", "F32", [1, 4], f32s(range(4))),
            ("layer0.B@3", "F32", [1, 2], f32s(range(2))),
            ("keys@x", "F32", [1], f32s([1.0])),
        ],
        metadata={"format": "elder-edit-state generation 2"},
    )
    put("state_experts", "segment.safetensors", segment)


# --- GGUF ----------------------------------------------------------------------------------

TAGS = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7,
        "str": 8, "arr": 9, "u64": 10, "i64": 11, "f64": 12}
FMT = {"u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I", "i32": "<i", "f32": "<f",
       "bool": "<?", "u64": "<Q", "i64": "<q", "f64": "<d"}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gvalue(kind, v):
    if kind == "str":
        return gstr(v)
    if kind == "arr":
        inner, items = v
        return struct.pack("<IQ", TAGS[inner], len(items)) + b"".join(gvalue(inner, x) for x in items)
    return struct.pack(FMT[kind], v)


def gguf(kvs, tensors, version=3, align=32):
    """kvs: [(key, kind, value)]; tensors: [(name, ne, type id, raw bytes)]"""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, kind, value in kvs:
        out += gstr(key) + struct.pack("<I", TAGS[kind]) + gvalue(kind, value)
    offset, offsets = 0, []
    for name, ne, ty, raw in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ty, offset)
        offsets.append(offset)
        offset = -(-(offset + len(raw)) // align) * align
    start = -(-len(out) // align) * align
    out += b"\0" * (start - len(out))
    for (_, _, _, raw), off in zip(tensors, offsets):
        out += b"\0" * (start + off - len(out)) + raw
    return out


def seed_gguf():
    rng = random.Random(11)
    rand = lambda n: f32s([rng.uniform(-1, 1) for _ in range(n)])
    d, heads, kv, hd, ffn, layers = 8, 2, 1, 4, 12, 2
    tokens = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120ab"]
    kvs = [
        ("general.architecture", "str", "llama"),
        ("llama.context_length", "u32", 128),
        ("llama.embedding_length", "u32", d),
        ("llama.block_count", "u32", layers),
        ("llama.feed_forward_length", "u32", ffn),
        ("llama.attention.head_count", "u32", heads),
        ("llama.attention.head_count_kv", "u32", kv),
        ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5),
        ("llama.rope.freq_base", "f32", 10000.0),
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.pre", "str", "smollm"),
        ("tokenizer.ggml.tokens", "arr", ("str", tokens)),
        ("tokenizer.ggml.token_type", "arr", ("i32", [3, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.merges", "arr", ("str", ["a b", "\u0120 ab"])),
        ("tokenizer.ggml.bos_token_id", "u32", 0),
        ("tokenizer.ggml.eos_token_id", "u32", 0),
    ]
    tensors = [("token_embd.weight", [d, len(tokens)], 0, rand(d * len(tokens)))]
    for layer in range(layers):
        p = lambda n: f"blk.{layer}.{n}.weight"
        tensors += [
            (p("attn_norm"), [d], 0, rand(d)),
            (p("attn_q"), [d, d], 0, rand(d * d)),
            (p("attn_k"), [d, kv * hd], 0, rand(d * kv * hd)),
            (p("attn_v"), [d, kv * hd], 0, rand(d * kv * hd)),
            (p("attn_output"), [d, d], 0, rand(d * d)),
            (p("ffn_norm"), [d], 1, struct.pack(f"<{d}e", *([1.0] * d))),
            (p("ffn_gate"), [d, ffn], 0, rand(d * ffn)),
            (p("ffn_up"), [d, ffn], 0, rand(d * ffn)),
            (p("ffn_down"), [ffn, d], 0, rand(d * ffn)),
        ]
    tensors.append(("output_norm.weight", [d], 0, rand(d)))
    put("gguf", "tiny-llama.gguf", gguf(kvs, tensors))

    spm = [
        ("tokenizer.ggml.model", "str", "llama"),
        ("tokenizer.ggml.tokens", "arr", ("str", ["<unk>", "<s>", "</s>", "<0x63>", "\u2581", "a", "b", "ab", "\u2581ab", "ba"])),
        ("tokenizer.ggml.token_type", "arr", ("i32", [2, 3, 3, 6, 1, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.scores", "arr", ("f32", [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -9.0])),
        ("tokenizer.ggml.bos_token_id", "u32", 1),
        ("tokenizer.ggml.unknown_token_id", "u32", 0),
    ]
    put("gguf", "spm-vocab.gguf", gguf([("general.architecture", "str", "llama")] + spm, []))

    every = [
        ("general.architecture", "str", "llama"), ("u8", "u8", 200), ("i8", "i8", -5),
        ("u16", "u16", 60000), ("i16", "i16", -30000), ("u32", "u32", 4_000_000_000),
        ("i32", "i32", -7), ("u64", "u64", 1 << 40), ("i64", "i64", -(1 << 40)),
        ("f32", "f32", 1.5), ("f64", "f64", -2.25), ("bool", "bool", True),
        ("str", "str", "h\u00e9llo"), ("arr", "arr", ("str", ["a", "", "c"])),
        ("general.alignment", "u32", 64),
    ]
    quant = []
    for ty, name in [(12, "q4_k"), (13, "q5_k"), (14, "q6_k")]:
        raw = (FIXTURES / "gguf" / f"{name}.raw").read_bytes()
        quant.append((name, [256, 3], ty, raw))
    quant.append(("q8_0", [32, 2], 8, (struct.pack("<e", 0.5) + bytes(range(32))) * 2))
    put("gguf", "every-type.gguf", gguf(every, quant, align=64))
    put("gguf", "v2-empty.gguf", gguf([], [], version=2))

    # gguf_dequant: type id byte, element count (u32 LE), raw data.
    rng = random.Random(5)
    layouts = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22),
               7: (32, 24), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210),
               15: (256, 292)}
    for ty, (block, nbytes) in layouts.items():
        blocks = 2 if block > 1 else 16
        raw = bytes(rng.randrange(256) for _ in range(blocks * nbytes))
        put("gguf_dequant", f"type{ty}", bytes([ty]) + struct.pack("<I", blocks * block) + raw)
    for ty, name in [(12, "q4_k"), (13, "q5_k"), (14, "q6_k")]:
        raw = (FIXTURES / "gguf" / f"{name}.raw").read_bytes()
        put("gguf_dequant", f"fixture-{name}", bytes([ty]) + struct.pack("<I", 768) + raw)


# --- text formats --------------------------------------------------------------------------

def seed_text():
    data = FIXTURES / "data"
    for name, selector in [("edits.jsonl", 0), ("bad_edits.jsonl", 0), ("zsre.json", 1),
                           ("bad_zsre.json", 1), ("counterfact.json", 2),
                           ("bad_counterfact.json", 2), ("jsonl_with_json_extension.json", 3),
                           ("unknown_array.json", 3), ("zsre.json", 3), ("counterfact.json", 3),
                           ("edits.jsonl", 4)]:
        put("edits", f"{selector}-{name}", bytes([selector]) + (data / name).read_bytes())
    lines = (ROOT / "data" / "geo_facts.jsonl").read_text().splitlines()[:4]
    put("edits", "0-geo_facts.jsonl", b"\0" + "\n".join(lines).encode() + b"\n")

    put("elder_toml", "iterations.toml", "iterations = 2\n")
    put("elder_toml", "paper.toml", 'preset = "paper"\niterations = 2\n')
    put("elder_toml", "empty.toml", "")
    put("elder_toml", "tables.toml", 'preset = "default"\nlr = 0.01\nlayers = [1]\n[extra]\nx = [1, 2]\n')

    # Codebooks: MAGIC, bits per code, count, words.
    codebook = lambda bits, words: b"ELDCODE1" + struct.pack(f"<QQ{len(words)}Q", bits, len(words) // -(-bits // 64), *words)
    put("state_codebook", "empty.bin", codebook(16, []))
    put("state_codebook", "two-16bit.bin", codebook(16, [0x00FF, 0x0F0F]))
    put("state_codebook", "one-100bit.bin", codebook(100, [2**64 - 1, 0xF_FFFF_FFFF]))

    memory = [{"id": "e1", "knowledge_id": "k", "prompt": "The capital of France is", "target": "Rome",
               "subject": "France", "allocation": [[0, 3], [1]]},
              {"id": "e2", "knowledge_id": "k2", "prompt": "p", "target": "t", "allocation": [[9]]}]
    put("state_memory", "hand.jsonl", "\n".join(json.dumps(m) for m in memory) + "\n\n")

    # Server request bodies: a route byte (0 completions, 1 edits, 2 score), then the body.
    body = lambda route, v: bytes([route]) + json.dumps(v).encode()
    put("serve_bodies", "0-completion.json", body(0, {"model": "model", "prompt": "The capital of France is",
                                                       "max_tokens": 4, "temperature": 0, "stop": ["\n"]}))
    put("serve_bodies", "0-list.json", body(0, {"prompt": ["a", "b"], "temperature": 0.7, "seed": 3,
                                                "min_generation": 2, "n": 1}))
    put("serve_bodies", "0-stream.json", body(0, {"prompt": "x", "stream": True, "stop": "y"}))
    put("serve_bodies", "1-edits.json", body(1, {"edits": [json.loads(l) for l in lines[:2]]}))
    put("serve_bodies", "2-score.json", body(2, {"prompt": "The sky is", "target": " blue"}))
    put("serve_bodies", "0-bad.json", body(0, {"prompt": 7, "max_tokens": "many"}))


def copy_model(model):
    model = Path(model)
    tag = model.name
    for name, target in [("config.json", "config_json"), ("tokenizer.json", "tokenizer_json")]:
        if (model / name).exists():
            put(target, f"{tag}-{name}", (model / name).read_bytes())


def copy_state(state):
    state = Path(state)
    tag = state.name
    for path in sorted(state.iterdir()):
        name = path.name
        target = ("state_manifest" if name.startswith("manifest")
                  else "state_codebook" if name.startswith("codebook")
                  else "state_experts" if name.startswith("experts")
                  else "state_memory" if name.startswith("memory") else None)
        if target:
            put(target, f"{tag}-{name}", path.read_bytes())


def main(argv):
    seed_safetensors()
    seed_gguf()
    seed_text()
    states = False
    for arg in argv:
        if arg == "--state":
            states = True
        elif states:
            copy_state(arg)
        else:
            copy_model(arg)


if __name__ == "__main__":
    main(sys.argv[1:])
