"""What this project asks of the C allocator: glibc's malloc on Linux (elsewhere nothing happens).

PyTorch's CPU tensors come from malloc. glibc serves a large block (from 128 KB, a threshold it raises to
the largest block freed so far, up to 32 MB) from a memory mapping of its own, given back when freed;
smaller ones from its heap, where a freed block between live ones stays resident for the next
allocation. Two moments in this project free a lot at once and then allocate differently:
- loading converts and frees tensor after tensor (returning_freed_memory, around load_model);
- encoding frees its activations, and the decoder cache that comes next is two large blocks of their own
  mappings (pegasus.DecoderCache calls give_back_freed_memory before the first, and again between the two,
  once the key/value projections written into the first are freed).
"""

import ctypes
from contextlib import contextmanager


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


def give_back_freed_memory():
    """Give the system the heap's free pages (malloc_trim(0): whole free pages anywhere in the heap,
    not only at its top; ~5 ms). After encoding, glibc keeps the encoder's freed activations (each under
    its 32 MB threshold) resident for reuse, and building the decoder cache frees each layer's key/value
    projections there too, but the cache's two blocks are mappings of their own and the decoding steps
    need far less: without this, that memory stays resident beside the cache through the whole search,
    at the process's peak."""
    _glibc()[1](0)
