"""What this project asks of the C allocator: glibc's malloc on Linux (elsewhere nothing happens).

PyTorch's CPU tensors come from malloc. glibc serves a large block (from 128 KB, a threshold it raises to
the largest block freed so far, up to 32 MB) from a memory mapping of its own, given back when freed;
smaller ones from its heap, where a freed block between live ones stays resident for the next
allocation. Two moments in this project free a lot at once and then allocate differently:
- loading converts and frees tensor after tensor (returning_freed_memory, around load_model);
- encoding frees its activations, and the decoder cache that comes next is two large blocks of their own
  mappings (pegasus.DecoderCache calls give_back_freed_memory before the first, and again between the two,
  once the key/value projections written into the first are freed).
Decoding's steps then allocate and free the same tensors over and over, in the heap's gaps: before each
step the cache looks at how much the process has grown (give_back_when_grown).
"""

import ctypes
import os
import threading
from contextlib import contextmanager

import torch


def _glibc():
    """(mallopt, malloc_trim) of this process's glibc, or stand-ins that do nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return (lambda *args: None), (lambda *args: None)


_RETURNING = 0  # how many returning_freed_memory blocks are open (they nest: generate.load wraps load_model)


@contextmanager
def returning_freed_memory():
    """Inside the block, glibc's malloc gives every large freed block straight back to the system.
    Loading without mmap allocates a float tensor, converts it (int8, or oneDNN's packed copy) and
    frees it, hundreds of times. By default glibc raises its mmap threshold to the size of the largest
    block freed so far (up to 32 MB), after which such blocks come from the heap, where freed ones
    between live ones are kept, not returned: measured at pegasus-xsum shape, the int8 load then ended
    at 1.75 GB resident instead of 0.85 GB. A fixed threshold (M_MMAP_THRESHOLD, option -3) of 1 MB
    gives each large tensor its own mapping, released when it is freed.

    After the block the thresholds go to the ceilings glibc's own rule reaches (mmap 32 MB, trim
    64 MB; a fixed setting cannot be undone): left at 1 MB, every activation over 1 MB that
    decoding allocates would be a fresh mapping, zero-filled a page at a time (measured on this
    project's AVX2 EPYC, 2 threads: the PEGASUS-X encoder at 4,096 tokens in int8, ~6.1 s -> ~5.2 s).
    Then malloc_trim(0) gives back what the heap still keeps of the blocks freed between live ones
    (int8 at pegasus-xsum shape: 0.87 -> 0.81 GiB resident after loading; Zen 4)."""
    global _RETURNING
    mallopt, malloc_trim = _glibc()
    if _RETURNING == 0:
        mallopt(-3, 1 << 20)
    _RETURNING += 1
    try:
        yield
    finally:
        _RETURNING -= 1
        if _RETURNING == 0:
            mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
            mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
            malloc_trim(0)  # the small blocks freed while loading, kept in the heap between live ones: back too


_MARK = 0  # resident bytes after give_back_freed_memory, then after the loop's first iteration (give_back_when_grown)
_CHECKS = 0  # give_back_when_grown's calls since give_back_freed_memory


def resident_bytes() -> int:
    """This process's resident memory now, from /proc/self/statm (~10 us); 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def give_back_freed_memory():
    """Give the system the heap's free pages (malloc_trim(0): whole free pages anywhere in the heap,
    not only at its top; ~5 ms). After encoding, glibc keeps the encoder's freed activations (each under
    its 32 MB threshold) resident for reuse, and building the decoder cache frees each layer's key/value
    projections there too, but the cache's two blocks are mappings of their own and the decoding steps
    need far less: without this, that memory stays resident beside the cache through the whole search,
    at the process's peak."""
    global _MARK, _CHECKS
    _glibc()[1](0)
    _MARK, _CHECKS = resident_bytes(), 0


def give_back_when_grown(slack: int = 4 << 20):
    """For a loop whose iterations allocate and free the same tensors (decoding's steps: called before each by
    pegasus.DecoderCache.advance): the heap's free pages back to the system (malloc_trim(0)) where the process
    has grown by more than `slack` bytes past its mark. The mark is where give_back_freed_memory left it, raised
    at the second call to where the loop's first iteration took it (its working set, which a trim would only
    release for the next iteration to fault in again), and after a trim to where the trim left it, if higher
    (live memory grew). The iterations' blocks land in different gaps of the heap from one step to the next,
    faulting back in pages that give_back_freed_memory released: beam 8 over 4 documents at pegasus-xsum shape
    (int8, Zen 4, 2 threads) took the process up 12 MB at a time (a step's logits), 25-100 MiB over 64 steps,
    where the first step's own working set was 25-30. A look at the resident size costs ~10 us, a trim ~2-3 ms
    and the faults that follow it a few more. The slack, 4 MiB: with 16, a step could still fault back a 12 MB
    block on top of its mark, and that job's peak was 1,119-1,142 MiB over five fresh processes; with 4,
    1,118-1,121, for 0-2 more trims a job (the same 3-8 in all; int8 greedy, float32 greedy and bfloat16 beam
    8 over 4 documents: 0-1 more)."""
    global _MARK, _CHECKS
    _CHECKS += 1
    resident = resident_bytes()
    if _CHECKS == 2:
        _MARK = max(_MARK, resident)
    elif resident > _MARK + slack:
        _glibc()[1](0)
        _MARK = max(_MARK, resident_bytes())


class ThreadBuffer(threading.local):
    """One buffer per thread, grown to the largest size asked of it and then kept, for a loop that needs a
    block of scratch memory per iteration (weight_files.Rows reads into it, quantize.quantize_weight converts
    in it). A fresh block each time is a fresh chance for glibc to place it above small tensors allocated
    since the last one, leaving the freed block behind as a hole the next one does not fit: int8 loading at
    pegasus-xsum shape grew the heap by 126 MB for 39 MB of live tensors that way (Zen 4, 2026-12-07)."""

    def __init__(self, dtype: torch.dtype):
        self.buffer = self.allocate(0, dtype)

    def get(self, numel: int) -> torch.Tensor:
        """The first numel elements of this thread's buffer, which the next get() overwrites: (numel,)."""
        if self.buffer.numel() < numel:
            self.buffer = self.allocate(numel, self.buffer.dtype)
        return self.buffer[:numel]

    @staticmethod
    def allocate(numel: int, dtype: torch.dtype) -> torch.Tensor:
        # A normal tensor even when grown inside torch.inference_mode() (a model loaded in a `with` block): the
        # buffer outlives that block, and an inference tensor cannot be written in place outside one, so the
        # next int8 load would fail ("Inplace update to inference tensor outside InferenceMode").
        with torch.inference_mode(False):
            return torch.empty(numel, dtype=dtype)
