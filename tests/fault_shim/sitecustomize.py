"""Faults for the kill tests, injected from outside the product: a subprocess started with PYTHONPATH=tests/fault_shim
runs this at start-up, and the product carries no test switch of its own.

DF_TEST_FAULT=kill:N   SIGKILL the process inside the N-th feature file write, after its temporary file is written
                       and before it is linked into place (the middle of a write)
DF_TEST_FAULT=sigint:N send SIGINT (Ctrl-C) to the process inside the N-th feature file write
DF_TEST_FAULT_RANK=R   only in the process whose RANK is R (torchrun sets RANK; the launcher itself has none)

Feature files are those written through features_io.write_atomic outside the index folder df_index/.
"""
import os

_spec = os.environ.get("DF_TEST_FAULT")
_rank = os.environ.get("DF_TEST_FAULT_RANK")
if _spec and (_rank is None or os.environ.get("RANK") == _rank):
    import signal

    from diffusion_feature.engine import features_io

    _kind, _n = _spec.split(":")
    _n = int(_n)
    if _kind == "sigint":  # Ctrl-C as a terminal gives it, even when this test run was started in the background
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job inherits SIGINT ignored)
    _real = features_io.write_atomic
    _count = [0]

    def write_atomic(final, write):
        if "df_index" in final.parts:
            return _real(final, write)
        _count[0] += 1
        if _count[0] != _n:
            return _real(final, write)
        if _kind == "kill":
            def killed(tmp):
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(final, killed)
        if _kind == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            return _real(final, write)
        raise ValueError(f"unknown DF_TEST_FAULT {_spec!r}")

    features_io.write_atomic = write_atomic
