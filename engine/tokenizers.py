"""Offline tokenizers.

A checkpoint folder's own tokenizer files come first. When there are none (a single-file checkpoint), the CLIP
tokenizer is built from the BPE merges bundled in engine/data (the same file OpenCLIP ships), or taken from ComfyUI's
bundled copy when running inside ComfyUI. Nothing is ever downloaded: a missing tokenizer is a clear error.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from ..layer_catalog.errors import DiffusionFeatureError

BPE_FILE = Path(__file__).resolve().parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, their '</w>' forms, these merges, 2 specials


class TokenizerMissingError(DiffusionFeatureError, ValueError):
    pass


def _no_host(name: str) -> Path | None:
    return None


# Where the host application keeps bundled tokenizer folders (ComfyUI: comfy/text_encoders/t5_tokenizer, ...). The
# engine never imports ComfyUI: the node layer installs ComfyUI's finder when the pack loads there.
host_tokenizer_dir = _no_host


def set_host_tokenizer_dir(finder) -> None:
    """finder(name) -> the host's bundled tokenizer folder of that name, or None."""
    global host_tokenizer_dir
    host_tokenizer_dir = finder or _no_host


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP). Printable bytes map to themselves
    and come first; the others follow in byte order, mapped to code points from 256 up. The order matters: it is
    the order of the vocabulary's first 256 entries."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def _write_clip_files(folder: Path) -> None:
    """vocab.json + merges.txt for CLIPTokenizer, built from the bundled BPE merges."""
    if not BPE_FILE.is_file():
        raise TokenizerMissingError(f"the bundled CLIP vocabulary {BPE_FILE} is missing; reinstall the package")
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:_N_MERGES + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@lru_cache(maxsize=4)
def _cached_clip_tokenizer(pad_token: str):
    """Built once per pad token; its files live in a temporary folder only while they are read (a server
    process must not leave a folder behind in the temp directory)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="df-clip-tokenizer-") as tmp:
        _write_clip_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH,
                                             local_files_only=True)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP BPE tokenizer (77 tokens). SD1.x pads with <|endoftext|>; OpenCLIP encoders (SD2.x, SDXL's second
    encoder) pad with '!'. Each call returns its own copy (a model may change its tokenizer's settings)."""
    import copy

    return copy.deepcopy(_cached_clip_tokenizer(pad_token))


def load_tokenizer(folder: Path):
    """A tokenizer from a diffusers component folder (tokenizer/, tokenizer_2/), offline."""
    from transformers import AutoTokenizer

    if not folder.is_dir() or not any(folder.iterdir()):
        raise TokenizerMissingError(f"no tokenizer files in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
