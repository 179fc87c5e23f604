"""glibc malloc tuning for XLA:CPU, applied when `sandbox` is imported.

Why: XLA:CPU allocates and frees its large temporaries (activations,
gradients, logits: hundreds of KiB to MiB) on every step, from several
threads. glibc serves a request above `M_MMAP_THRESHOLD` with a fresh `mmap`
and gives it back with `munmap` on free, and trims freed memory at the top of
a heap (`sbrk`/`madvise`) once it exceeds `M_TRIM_THRESHOLD`. Either way the
next step gets pages the kernel must zero and fault in again: on the
nanoGPT shakespeare_char recipe that was ~7 million minor faults per 500
steps and a third of the run's CPU time in the kernel (issue 18).

What: four `mallopt` calls, made once and before JAX allocates:

* `M_MMAP_THRESHOLD` = 32 MiB, glibc's maximum on 64-bit (`HEAP_MAX/2`;
  larger values are refused). Requests up to 32 MiB come from the heap, where
  freed chunks are reused by the next step. Setting it also turns off glibc's
  dynamic threshold (which starts at 128 KiB and rises only as mmapped chunks
  are freed, each rise paid for with a round of faults).
* `M_TRIM_THRESHOLD` = 256 MiB: free memory at a heap's top is kept up to
  this much instead of being returned and faulted in again. The cost is that
  the process keeps up to this much freed memory per arena instead of
  returning it: resident memory stays near its peak, which for a training
  process that repeats the same step is where it goes back to anyway.
* `M_TOP_PAD` = 64 MiB: each heap extension asks the kernel for 64 MiB more
  than needed, so growing through the first steps is a few `brk` calls, not
  one per allocation. Untouched pad pages cost no physical memory.

* `M_MMAP_MAX` = 0: no allocation is served by its own `mmap`, however large.
  The threshold above cannot pass 32 MiB, and XLA:CPU takes a step's
  temporaries as one block: 49 MiB for an fp32 shakespeare_char step, 57 MiB
  for bf16. Above the ceiling glibc mapped that block afresh and unmapped it
  on free, so a bf16 step faulted ~5,000 pages in again (1.7 M minor faults
  in 150 steps; 0.28 M with this). Large blocks now come from the heap (a
  thread arena's heap holds up to 64 MiB; beyond that glibc falls back to the
  main heap, and to mmap only if `brk` fails) and stay there for the next
  step, within the trim threshold above.

Switch: `SANDBOX_MALLOC_TUNING=0` turns it off. A parameter the user already
set through glibc's own variables (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`) is left as they set it. On
anything but Linux with glibc (macOS, Windows, musl) this is a no-op: those
allocators have no `mallopt` with these meanings.

`APPLIED` records what was set ({parameter name: value}) for tests and
`scripts/bench_malloc.py`.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_SWITCH = "SANDBOX_MALLOC_TUNING"
MIB = 1 << 20
# (name, mallopt parameter number from glibc's <malloc.h>, value, glibc's own environment variable)
SETTINGS = (
    ("M_MMAP_THRESHOLD", -3, 32 * MIB, "MALLOC_MMAP_THRESHOLD_"),
    ("M_TRIM_THRESHOLD", -1, 256 * MIB, "MALLOC_TRIM_THRESHOLD_"),
    ("M_TOP_PAD", -2, 64 * MIB, "MALLOC_TOP_PAD_"),
    ("M_MMAP_MAX", -4, 0, "MALLOC_MMAP_MAX_"),
)
APPLIED: dict[str, int] = {}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def is_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # no such confstr name: not glibc
        return False


def tune() -> dict[str, int]:
    """Applies SETTINGS once (see the module doc); returns what was set."""
    if APPLIED or not enabled() or not is_glibc():
        return APPLIED
    mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, param, value, glibc_env in SETTINGS:
        if glibc_env not in os.environ and mallopt(param, value) == 1:
            APPLIED[name] = value
    return APPLIED
