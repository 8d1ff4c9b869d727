"""What a run shows while it works and when it ends.

One tqdm bar per process (images/s and ETA from tqdm; the failures so far as its postfix), labelled with the rank
and placed on its own line (position=rank) when several processes share a terminal. At the end the first process
prints one summary line for the whole run, then each failure with its reason.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class RunStats:
    """One process's counts for this attempt (summed over processes for the summary)."""

    written: int = 0        # images whose features were written
    files: int = 0          # files written
    skipped: int = 0        # images already complete (--resume)
    failures: list = field(default_factory=list)   # [relative name, source, reason]
    stopped: str | None = None   # why this process stopped early (None: it did its whole share)
    interrupted: bool = False
    cache: dict = field(default_factory=dict)      # latent cache counters
    damaged: list = field(default_factory=list)    # [relative name, why]: done before, outputs changed since
    unhashed: int = 0       # skipped images whose records (older version) have no hashes: checked by size only

    @property
    def failed(self) -> int:
        return len(self.failures)


class Progress:
    def __init__(self, total: int, rank: int, world: int, skipped: int, enabled: bool = True):
        from tqdm import tqdm

        label = "extract" if world == 1 else f"rank {rank}/{world}"
        if skipped:
            label += f" ({skipped} done before)"
        self.bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr, position=rank if world > 1 else None,
                        dynamic_ncols=True, disable=not enabled, smoothing=0.1)
        self.failed = 0

    def advance(self, images: int, failed: int = 0) -> None:
        if failed:
            self.failed += failed
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


def merge(stats: list[RunStats]) -> RunStats:
    total = RunStats()
    for s in stats:
        total.written += s.written
        total.files += s.files
        total.skipped += s.skipped
        total.failures += s.failures
        total.stopped = total.stopped or s.stopped
        total.interrupted = total.interrupted or s.interrupted
        total.damaged += s.damaged
        total.unhashed += s.unhashed
        for k, v in s.cache.items():
            total.cache[k] = total.cache.get(k, 0) + v
    return total


def summary_line(total: RunStats, seconds: float, out, processes: int, reported: int | None = None) -> str:
    """reported: how many of the processes' counts are in `total` (fewer than all when some are gone)."""
    rate = total.written / seconds if seconds > 0 else 0.0
    line = (f"extract: {total.written} written ({total.files} files), {total.skipped} skipped (already done), "
            f"{total.failed} failed in {seconds:.1f} s ({rate:.2f} img/s")
    if processes > 1:
        line += f", {processes} processes" + (f", counts of {reported} only" if reported not in (None, processes)
                                              else "") + ")"
    else:
        line += ")"
    if total.damaged:
        line += f"; {len(total.damaged)} done again (outputs changed since they were written)"
    if total.unhashed:
        line += (f"; {total.unhashed} complete images checked by size only (their index records, of an older "
                 "version, have no content hashes)")
    if total.cache:
        line += (f"; latent cache: {total.cache.get('hits', 0)} hits, {total.cache.get('misses', 0)} misses"
                 + (f", {total.cache['corrupt']} corrupt entries recomputed" if total.cache.get("corrupt") else ""))
    line += f"; index: {out}/df_index"
    if total.interrupted:
        line += "; interrupted (--resume continues)"
    elif total.stopped:
        line += f"; stopped: {total.stopped} (--resume continues)"
    return line
