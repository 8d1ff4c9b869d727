"""The memory guard: what a run will need, what this process really has, and a refusal before anything runs.

A ComfyUI server that runs out of memory is killed with all its queued work, so every run estimates up front what
it keeps (every batch's features, every captured step, the final output) and what it needs at its peak (one
denoiser forward, a VAE pass) and refuses with the numbers when that exceeds what is available.

- Available: the least of the host's MemAvailable, the cgroup's limit minus its usage (v2 memory.max or v1
  limit_in_bytes, the reclaimable page cache not counted as used) and the address-space / data rlimits; on CUDA the
  device's free memory plus what torch's caching allocator holds reserved but unused (it hands that out first).
- Needed: measured, not guessed. The module is rebuilt from its config on the meta device (no memory, no weights)
  and one forward runs there with the run's own taps attached, while a dispatch mode counts the bytes of every
  tensor alive at each moment; its maximum is the forward's activation peak. Attention through SDPA is counted as
  the fused kernels CPUs and GPUs run (only the output is allocated): the meta device alone would take the math
  path and count scores that a real run never materialises. Attention maps are computed explicitly from the
  module's q and k by the capture's hooks, so their scores are counted, as they really are allocated.

Only torch and the hook engine below are imported: every part of the pack may use this module.
"""
from __future__ import annotations

import json
import os
import resource
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..layer_catalog.errors import DiffusionFeatureError
from . import latent_scaling

_UNLIMITED = 2 ** 60  # cgroup v1 writes "no limit" as a huge page-aligned number


class FeatureMemoryError(DiffusionFeatureError, ValueError):
    """A run that would not fit in the memory available to this process; raised before anything runs."""


def count(n: int, noun: str) -> str:
    """'1 image', '3 images': for the messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- what is available ---------------------------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None  # "max" (v2 unlimited) and garbage read as no limit


def host_available(root: str | os.PathLike = "/") -> int | None:
    """The host's MemAvailable in bytes (what the kernel can hand out without swapping), None if unreadable."""
    for line in (_read(Path(root) / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _inactive_file(stat_text: str | None, key: str) -> int:
    """Page cache the kernel reclaims before it reaches the limit: not really in use."""
    for line in (stat_text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def cgroup_available(root: str | os.PathLike = "/") -> int | None:
    """Limit minus usage of this process's memory cgroup and its ancestors (the tightest), v2 or v1; None when no
    limit is set. `root` is the filesystem root to read /proc/self/cgroup and /sys/fs/cgroup under (tests)."""
    root = Path(root)
    base = root / "sys/fs/cgroup"
    found: list[int] = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            mount, limit_f, usage_f, stat_key = base, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            mount, limit_f, usage_f, stat_key = base / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", \
                "total_inactive_file"
        else:
            continue
        # Inside a container the cgroup namespace makes its own cgroup the mount's root, whatever the path says.
        folder = mount / rel
        folders = [folder, *folder.parents] if folder.is_dir() else [mount]
        for d in folders:
            if d != mount and mount not in d.parents:
                break
            limit, usage = _int(_read(d / limit_f)), _int(_read(d / usage_f))
            if limit is not None and limit < _UNLIMITED and usage is not None:
                used = max(0, usage - _inactive_file(_read(d / "memory.stat"), stat_key))
                found.append(max(0, limit - used))
            if d == mount:
                break
    return min(found) if found else None


def rlimit_available(root: str | os.PathLike = "/", getrlimit=resource.getrlimit) -> int | None:
    """Room left under RLIMIT_AS (address space) and RLIMIT_DATA (heap), from this process's VmSize / VmData;
    None when neither is set."""
    status = {}
    for line in (_read(Path(root) / "proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            status[key] = int(value.split()[0]) * 1024
    found = []
    for limit_name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        which = getattr(resource, limit_name, None)
        if which is None:
            continue
        soft, _hard = getrlimit(which)
        if soft not in (resource.RLIM_INFINITY, -1) and soft >= 0:
            found.append(max(0, soft - status.get(used_key, 0)))
    return min(found) if found else None


def available_bytes(device, root: str | os.PathLike = "/") -> int | None:
    """Bytes this process can still allocate on `device`; None when unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    known = [v for v in (host_available(root), cgroup_available(root), rlimit_available(root)) if v is not None]
    return min(known) if known else None


# ---- what a forward needs --------------------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created under it on `device_type` and still alive, and the maximum of that
    count (tensors of other devices, e.g. an estimate's meta tensors inside a real run, are not this memory)."""

    def __init__(self, preexisting, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.known = {StorageWeakRef(t.untyped_storage()).cdata for t in preexisting}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.known and ref.cdata not in self.live:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.now += n
        self.peak = max(self.peak, self.now)
        return out


class _FusedAttention(TorchFunctionMode):
    """SDPA as the fused kernels run it (flash / memory-efficient on CUDA, flash on CPU): output and log-sum-exp
    only, never the (Nq, Nk) scores the meta device's math fallback would allocate."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = (*args, *(kwargs.get(k) for k in ("query", "key", "value")[len(args):]))  # diffusers: keywords
            q, _k, v = named[:3]
            q.new_empty(q.shape[:-1], dtype=torch.float32)  # the log-sum-exp, alive only inside the kernel here
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


def traced_peak(module: torch.nn.Module, run) -> int:
    """Peak bytes of the tensors that `run()` allocates beyond `module`'s parameters and buffers (meta device)."""
    tracker = _LiveBytes([*module.parameters(), *module.buffers()])
    with torch.no_grad(), _FusedAttention(), tracker:
        run()
    return tracker.peak


_lock = threading.Lock()  # meta copies are shared: one trace at a time attaches taps to them


def _key(module) -> tuple:
    """(class, config as JSON, dtype): what a module's meta copy and its cached costs are keyed by."""
    return type(module), json.dumps(dict(module.config), sort_keys=True, default=str), next(module.parameters()).dtype


@lru_cache(maxsize=8)
def meta_copy(cls, config_json: str, dtype: torch.dtype) -> torch.nn.Module:
    """A module of `cls` built from its config on the meta device: shapes without memory or weights (cached)."""
    with torch.device("meta"):
        module = cls.from_config(json.loads(config_json))
    return torch.nn.Module.to(module, dtype).eval()  # diffusers' own .to() only adds a warning here


@dataclass
class ForwardCost:
    """One denoiser forward: its activation peak on the compute device and the bytes each tap keeps from it."""

    peak: int
    features: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(self.features.values())


def denoiser_cost(denoiser, taps, batch: int, latent_hw, tokens: int, *, dtype: torch.dtype | None = None,
                  feature_resize: int = 1, rows: slice | None = None, early_exit: bool = False) -> ForwardCost:
    """What one forward of `batch` rows at latent_hw costs with `taps` captured (features kept in `dtype`, pooled
    by feature_resize, only `rows`): measured on a meta copy (see the module docstring). The features are dropped
    as captured, so `peak` is the activations only; `features` is what a run keeps of each tap per forward."""
    key_rows = None if rows is None else (rows.start, rows.stop)
    return _denoiser_cost(*_key(denoiser), tuple(taps), int(batch), tuple(int(v) for v in latent_hw), int(tokens),
                          dtype, int(feature_resize), key_rows, bool(early_exit))


@lru_cache(maxsize=128)
def _denoiser_cost(cls, config_json, model_dtype, taps, batch, latent_hw, tokens, dtype, feature_resize, rows,
                   early_exit) -> ForwardCost:
    from ..layer_catalog import FeatureCapture, dummy_inputs

    meta = meta_copy(cls, config_json, model_dtype)
    kept: dict[str, int] = {}

    def dropped(tap_id, x):  # counted, then let go: where features are kept is the caller's sum
        kept[tap_id] = x.numel() * x.element_size()
        capture.features[tap_id] = x.new_empty(0)

    with _lock:
        capture = FeatureCapture(meta, list(taps), dtype=dtype, feature_resize=feature_resize, early_exit=early_exit,
                                 on_capture=dropped, token_grid=latent_hw)
        capture.rows = None if rows is None else slice(*rows)
        with capture:
            peak = traced_peak(meta, lambda: capture.run(**dummy_inputs(
                meta, latent_hw[0] * 8, latent_hw[1] * 8, batch=batch, text_tokens=tokens)))
    return ForwardCost(peak, {t.id: kept.get(t.id, 0) for t in taps})


def vae_decode_peak(vae, latent_hw) -> int:
    """Peak bytes of decoding one latent of latent_hw (runs decode one image at a time)."""
    return _vae_peak(*_key(vae), "decode", tuple(int(v) for v in latent_hw), 1)


def vae_encode_peak(vae, pixel_hw, batch: int) -> int:
    """Peak bytes of encoding `batch` images of pixel_hw (the posterior's sample included)."""
    return _vae_peak(*_key(vae), "encode", tuple(int(v) for v in pixel_hw), int(batch))


@lru_cache(maxsize=64)
def _vae_peak(cls, config_json, dtype, direction: str, hw: tuple[int, int], batch: int) -> int:
    meta = meta_copy(cls, config_json, dtype)

    def run():
        if direction == "decode":
            return latent_scaling.decode(meta, torch.empty(batch, latent_scaling.latent_channels(meta), *hw,
                                                           device="meta", dtype=dtype))
        mean, std = latent_scaling.encode_posterior(meta, torch.empty(batch, 3, *hw, device="meta", dtype=dtype))
        return mean + std * torch.empty_like(mean)

    with _lock:
        return traced_peak(meta, run)


def largest(fits, low: int, high: int) -> int | None:
    """The largest n in low..high with fits(n), for a fits that holds up to some n and not beyond; None if none."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


# ---- the check -------------------------------------------------------------------------------------------------
@dataclass
class Need:
    """Bytes a run needs on one device at once, as named parts (for the message)."""

    device: torch.device
    parts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)


def add(needs: dict, device, what: str, n: int) -> None:
    """Add `n` bytes named `what` on `device` to a {device: Need} plan (zero parts are left out)."""
    device = torch.device(device)
    if n > 0:
        needs.setdefault(device, Need(device)).parts.append((what, int(n)))


def shortfall(needs: dict, available=available_bytes):
    """The first (Need, available bytes) that does not fit, or None when all fit (or availability is unknown)."""
    for need in needs.values():
        free = available(need.device)
        if free is not None and need.total > free:
            return need, free
    return None


def require(needs: dict, subject: str, advice: str, available=available_bytes) -> None:
    """Raise FeatureMemoryError, before anything runs, when some device's need exceeds what is available."""
    short = shortfall(needs, available)
    if short is None:
        return
    need, free = short
    parts = ", ".join(f"{what} {fmt(n)}" for what, n in need.parts)
    raise FeatureMemoryError(f"{subject} would need {fmt(need.total)} on {need.device} ({parts}) but only "
                             f"{fmt(free)} is free to this process: {advice}")


def smaller_side(fits, height: int, width: int, multiple: int) -> tuple[int, int] | None:
    """The largest (height, width) of about the same aspect, sides multiples of `multiple` and below the request,
    for which fits(h, w) holds; None when even the smallest does not. What fits shrinks as the size grows, so a
    bisection over the longer side's multiples needs about log2(side / multiple) estimates."""
    longer = max(height, width)

    def at(k):
        return (max(multiple, height * k * multiple // longer // multiple * multiple),
                max(multiple, width * k * multiple // longer // multiple * multiple))

    top = max(1, (longer - 1) // multiple)  # strictly smaller than the request
    k = largest(lambda k: fits(*at(k)), 1, top)
    return None if k is None else at(k)
