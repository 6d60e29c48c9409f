"""A CLIP tokenizer built in memory: byte-level vocabulary, no merges, nothing downloaded.

Random-weight presets need a tokenizer that produces CLIP's 77-token input; real
weights folders bring their own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

__all__ = ["byte_level_clip_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character map.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_level_clip_tokenizer(max_length: int = 77):
    """A working `CLIPTokenizer` whose vocabulary is the 256 bytes (+ word ends, BOS, EOS)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate([*symbols, *(s + "</w>" for s in symbols), BOS, EOS])}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
