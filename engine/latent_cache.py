"""A folder of VAE posteriors, so a later run over the same images (other layers, t or seeds) skips the VAE encoder,
55-60 % of an extraction on a CPU.

An entry holds one image's posterior (mean and std, unscaled, in the VAE's dtype): the latent drawn from it with any
seed, or its mean (vae_sample=False), is computed exactly as without the cache, so features do not change. Its key
is a hash of the pixels entering the VAE (the image's content after the resize policy, so content, resize and size
all count), of the VAE's weights, dtype and config, and of the kind of device it ran on (a GPU's convolutions round
differently from a CPU's). Entries are written atomically (temporary file + os.replace) and checked on every read
(format, key, shapes, dtype and a hash of the values): a corrupt or mismatching entry is recomputed and replaced,
never trusted.

Batches: when every image of a batch has an entry the VAE is skipped; when any is missing the whole batch is encoded
as it would be without the cache (so the features are those of an uncached run) and the missing entries are
written. A cached posterior is that of the batch it was made in: bit-identical features whenever the images are
batched as they were then (always, with batch size 1, the CLI's default).

A write that fails (OSError: a full disk, a read-only folder) loses nothing: the features are still returned, no
entry or temporary file is left, a RuntimeWarning names the folder and `write_errors` counts it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from ..layer_catalog.errors import echo
from . import latent_scaling

FORMAT = "diffusion-feature latent cache"
VERSION = 1
SUFFIX = ".safetensors"


class LatentCache:
    """A latent cache in folder `root` (created on the first write). Counters, for a run's summary: `hits` (images
    whose posterior came from the cache), `misses` (images the VAE encoded), `corrupt` (entries found damaged or
    mismatching, recomputed and replaced; also counted in misses), `write_errors` (entries that could not be
    written)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"latent cache {echo(str(self.root))} is a file: give a folder (it is created if missing)")
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.write_errors = 0
        self._vae_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return (f"LatentCache({str(self.root)!r}, hits={self.hits}, misses={self.misses}, corrupt={self.corrupt}, "
                f"write_errors={self.write_errors})")

    # ---- keys -------------------------------------------------------------------------------------------------
    def vae_digest(self, vae) -> str:
        """A hash of the VAE's weights (every tensor of its state dict, with names, dtypes and shapes) and config,
        computed once per VAE and recomputed only when a tensor is replaced or modified in place."""
        state = vae.state_dict(keep_vars=True)
        signature = tuple((name, t.data_ptr(), t._version, t.dtype, t.device) for name, t in state.items())
        memo = self._vae_digests.get(vae)
        if memo is not None and memo[0] == signature:
            return memo[1]
        h = hashlib.sha256()
        h.update(type(vae).__name__.encode())
        h.update(json.dumps(dict(getattr(vae, "config", {}) or {}), sort_keys=True, default=str).encode())
        for name, t in state.items():
            t = t.detach()
            h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_raw_bytes(t))
        digest = h.hexdigest()
        self._vae_digests[vae] = (signature, digest)
        return digest

    def key(self, vae, pixels: torch.Tensor) -> str:
        """The entry key of one image's pixels (3, H, W) as they enter `vae`."""
        param = next(vae.parameters())
        h = hashlib.sha256()
        h.update(f"{FORMAT} v{VERSION}|{self.vae_digest(vae)}|{param.dtype}|{param.device.type}|"
                 f"{pixels.dtype}|{tuple(pixels.shape)}|".encode())
        h.update(_raw_bytes(pixels.detach()))
        return h.hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    # ---- the one entry point ----------------------------------------------------------------------------------
    def posterior(self, vae, pixels: torch.Tensor, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the batch `pixels` (B, 3, H, W), on the VAE's device and dtype: from the cache when every
        image has a sound entry, else from encode(vae, pixels) for the whole batch, writing the missing entries."""
        param = next(vae.parameters())
        keys = [self.key(vae, p) for p in pixels]
        shape = _latent_shape(vae, pixels.shape[-2:])
        found = [self._read(k, shape) for k in keys]
        if all(entry is not None for entry in found):
            self.hits += len(keys)
            mean = torch.stack([m for m, _ in found]).to(param.device)
            std = torch.stack([s for _, s in found]).to(param.device)
            return mean, std
        mean, std = encode(vae, pixels)
        self.misses += len(keys)
        for i, (key, entry) in enumerate(zip(keys, found)):
            if entry is None:
                self._write(key, mean[i], std[i])
        return mean, std

    # ---- entries ----------------------------------------------------------------------------------------------
    def _read(self, key: str, shape: tuple[int, ...]):
        """The entry's (mean, std) on the CPU, or None when it is absent or unsound (then counted as corrupt)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # a folder where the entry should be, unreadable permissions, ...
            self.corrupt += 1
            return None
        entry = _decode(data, key, shape)
        if entry is None:
            self.corrupt += 1
        return entry

    def _write(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save

        mean, std = (t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for t in (mean, std))
        metadata = {"format": FORMAT, "version": str(VERSION), "key": key, "values": _values_digest(mean, std)}
        path = self.path_for(key)
        tmp = None
        try:
            data = save({"mean": mean, "std": std}, metadata=metadata)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".df-", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic; replaces a corrupt entry
            tmp = None
        except OSError as e:
            self.write_errors += 1
            warnings.warn(f"the latent cache {echo(str(self.root))} could not store an entry ({e.__class__.__name__}: "
                          f"{e}); the features are unaffected and this image will be encoded again next time",
                          RuntimeWarning, stacklevel=3)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor's values (any dtype, any device), in C order."""
    t = t.to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def _values_digest(mean: torch.Tensor, std: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (mean, std):
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _latent_shape(vae, pixel_hw) -> tuple[int, ...]:
    """(C, h, w) of the VAE's posterior for pixels of pixel_hw: latent channels, sides divided by 2**(levels - 1)."""
    factor = latent_scaling.downscale(vae)
    return (latent_scaling.latent_channels(vae), int(pixel_hw[0]) // factor, int(pixel_hw[1]) // factor)


def _decode(data: bytes, key: str, shape: tuple[int, ...]):
    """(mean, std) from an entry's bytes, or None unless everything checks: safetensors format, our metadata, the
    key (which covers the VAE's dtype), both tensors with the expected shape, and the hash of their values, dtypes
    and shapes."""
    from safetensors.torch import load

    try:
        if len(data) < 8:
            return None
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__") or {}
        if (metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION)
                or metadata.get("key") != key):
            return None
        tensors = load(data)
    except Exception:  # noqa: BLE001 - any failure to parse garbage means the entry is not trusted
        return None
    if set(tensors) != {"mean", "std"}:
        return None
    mean, std = tensors["mean"], tensors["std"]
    if any(tuple(t.shape) != tuple(shape) for t in (mean, std)):
        return None
    if metadata.get("values") != _values_digest(mean, std):
        return None
    return mean, std
