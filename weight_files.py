"""Reading the tensors of a checkpoint's weight files (safetensors, or torch.save'd .bin), three ways:

- memory-mapped (mapped_tensors, the default): nothing is read until a tensor is used, and each
  tensor lets go of its pages when it is freed;
- read into ordinary memory (pread), tensor by tensor;
- a matrix a block of rows at a time (Rows), for the int8 loader, which never holds a float matrix.

load_weights.load_model decides which; this module only reads (memory.returning_freed_memory is the
allocator setting that keeps memory low while a loader converts and frees tensor after tensor).
"""

import json
import mmap
import threading
import weakref
from pathlib import Path

import torch

from hub import files_needed, shard_files


def read_bin(file: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict. weights_only=True refuses pickles that would run arbitrary code.
    Files from torch < 1.6 are not zip archives and cannot be memory-mapped: read those whole."""
    import pickle
    import zipfile
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise ValueError(f"{file} is refused as unsafe: it holds Python objects other than tensors, which "
                             f"loading would have to execute") from None
        raise ValueError(f"{file} is not a valid PyTorch checkpoint (corrupt or truncated?)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a valid PyTorch checkpoint (corrupt or truncated?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return state


def read_tensors(ckpt: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: memory-mapped (pages read on first use, each tensor's let go when
    it is freed: mapped_tensors), or read into ordinary memory."""
    return dict(iter_tensors(ckpt, mmap))


# safetensors' dtype names; the rest (float8, wider unsigned ints) are read as bytes, refused as "not a float".
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def mapped_tensors(file: Path):
    """(name, tensor) for every tensor of a safetensors file, each a view of one copy-on-write memory
    map of the file: nothing is read until a tensor is used, and then straight from the page cache
    (no copy; writing to a tensor never changes the file). Each tensor lets go of its own pages when
    it is freed (madvise DONTNEED), so a converter that replaces the weights one by one
    (onednn.use_onednn packs each into a new layout) never holds the file's pages beside its copies:
    measured at pegasus-xsum shape, this loads and packs in 2.2 s on one core where reading every
    tensor into fresh memory first took 4.1 s (1.5 s of that was page faults on the fresh memory)."""
    header, begin = Rows.header(file)
    header.pop("__metadata__", None)
    with open(file, "rb") as f:
        whole = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))  # the map outlives the file handle
    for name, info in header.items():
        first, last = (begin + offset for offset in info["data_offsets"])
        dtype = SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)
        if last == first:  # frombuffer refuses an empty buffer
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        view = whole[first:last]
        pages = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE, last // mmap.PAGESIZE * mmap.PAGESIZE  # wholly its own
        if pages[1] > pages[0] and hasattr(whole.obj, "madvise"):  # not on Windows
            weakref.finalize(view, whole.obj.madvise, mmap.MADV_DONTNEED, pages[0], pages[1] - pages[0]).atexit = False
        yield name, torch.frombuffer(view, dtype=dtype).view(info["shape"])  # the tensor holds `view`


class _ReadBuffer(threading.local):
    buffer = torch.empty(0, dtype=torch.uint8)  # grown to the largest block read on this thread


_READS = _ReadBuffer()


class Rows:
    """A 2-D tensor of a safetensors file, read a block of rows at a time (straight from its offset in
    the file into the block's memory): quantize.quantize_weight needs only its shape and row slices,
    so the int8 path never holds a whole float matrix (394 MB for the embedding table at pegasus-xsum
    shape), and its small blocks reuse memory the allocator already has, where a fresh full tensor
    costs a page fault per 4 KB. (safetensors' own get_slice reads the whole tensor first.) The
    format: an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and
    byte range after the header, then the bytes."""

    device = torch.device("cpu")

    def __init__(self, file: Path, start: int, shape: list[int], dtype: str):
        self.file, self.start, self.shape = file, start, torch.Size(shape)
        self.dtype = SAFETENSORS_DTYPES.get(dtype, torch.uint8)  # not a float: refused by the caller

    @staticmethod
    def header(file: Path) -> tuple[dict, int]:
        """(the JSON header, where the tensor bytes begin)."""
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)), 8 + n

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, rows: slice) -> torch.Tensor:  # (r, D); clipped at the end, as tensor slicing is
        """The rows, in one buffer per thread that the next read overwrites: use a block (convert it,
        quantize it) before reading the next, as Rows.to and quantize.quantize_weight do. A fresh block per
        read fragmented the heap: a bfloat16 load kept ~0.5 MB per matrix resident beyond its tensors
        (0.33 GB at pegasus-xsum shape, 1.70 GB in all where the tensors and runtime make 1.37)."""
        first, last = rows.start, min(rows.stop, self.shape[0])
        row_bytes = self.shape[1] * self.dtype.itemsize
        size = (last - first) * row_bytes
        if _READS.buffer.numel() < size:
            _READS.buffer = torch.empty(size, dtype=torch.uint8)
        block = _READS.buffer[:size]  # the file's bytes land here directly
        view, done = memoryview(block.numpy()), 0
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.start + first * row_bytes)
            while done < len(view) and (n := f.readinto(view[done:])):
                done += n
        if done < len(view):
            raise ValueError(f"{self.file} ends inside a tensor: it is truncated")
        return block.view(self.dtype).view(last - first, self.shape[1])

    def reader(self) -> "RowReader":
        """The matrix as a RowReader: rows read from the file when indexed (the int8 embedding's
        lookups read the checkpoint's table so: quantize.Int8TiedEmbedding.lookup_from)."""
        return RowReader(self)

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole matrix in `dtype`, converted a block of rows (512 KB) at a time: a float32 matrix
        loaded as bfloat16 is never in memory whole as float32 (memory-mapped, the 394 MB table at
        pegasus-xsum shape would be resident beside its converted copy while converting: bfloat16
        load peaked at 1.69 GB instead of 1.33). Each block is read into the same buffer (__getitem__);
        4 MB blocks, each a fresh mapping, took 2.4 s, not 1.2 s."""
        out = torch.empty(self.shape, dtype=dtype)
        step = max(1, (512 << 10) // (self.shape[1] * self.dtype.itemsize))  # rows per block
        for i in range(0, self.shape[0], step):
            out[i: i + step] = self[i: i + step]
        return out


class RowReader:
    """Rows of a safetensors matrix read by index, each with one read from a file kept open: only
    the rows asked for are copied, and a file later saved over the checkpoint (a new inode,
    load_weights.save_model) leaves these reads on the old one. Not a memory map: a page fault maps
    the pages around the one it needs too (fault-around, readahead), and the ~300 rows of one
    505-token article left 118 MiB of the map resident (pegasus-xsum shape), where reads keep none."""

    def __init__(self, rows: Rows):
        self.shape, self.dtype, self._start = rows.shape, rows.dtype, rows.start
        self._file = open(rows.file, "rb", buffering=0)  # closed when the reader is freed

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:  # (N,) int64 -> (N, D)
        ids = torch.as_tensor(ids).reshape(-1)
        wanted, where = torch.unique(ids, return_inverse=True)  # (U,), (N,): read each row once
        if len(wanted) and not 0 <= wanted[0] <= wanted[-1] < self.shape[0]:
            raise IndexError(f"row ids {wanted[0].item()}..{wanted[-1].item()} outside 0..{self.shape[0] - 1}")
        out = torch.empty(len(wanted), self.shape[1], dtype=self.dtype)  # (U, D)
        rows = out.view(torch.uint8).numpy()  # (U, D * itemsize): the bytes land here directly
        size = rows.shape[1]
        for row, i in zip(rows, wanted.tolist()):
            self._file.seek(self._start + i * size)  # unbuffered: one read of just this row
            if self._file.readinto(row) != size:
                raise ValueError(f"{self._file.name} ends inside a tensor: it is truncated")
        return out[where]  # (N, D)

    def __deepcopy__(self, memo) -> "RowReader":  # a read-only view of the file: copies share it
        return self


def iter_tensors(ckpt: Path, mmap: bool = True, rows: bool = False):
    """(name, tensor) for every tensor of a checkpoint, one at a time. Without mmap a safetensors
    tensor is read (pread) only when its turn comes, so a caller that converts each one and drops it
    (load_model's int8 path) never holds more than one float tensor; with rows=True every 2-D one
    comes as Rows, read in blocks of rows by whoever uses it."""
    from safetensors import SafetensorError, safe_open
    _, weights = files_needed({p.name for p in ckpt.iterdir()}, str(ckpt))
    files = shard_files(ckpt / weights) if weights.endswith(".index.json") else [weights]
    for f in files:
        if not (ckpt / f).is_file():
            raise FileNotFoundError(f"{ckpt / f} is listed in the shard index {weights} but missing")
    for f in files:
        if not f.endswith(".safetensors"):
            state = read_bin(ckpt / f, mmap)
            for name in list(state):
                yield name, state.pop(name)
            continue
        try:
            with safe_open(ckpt / f, framework="pt", backend="pread") as tensors:  # it checks the header and size
                if mmap:
                    yield from mapped_tensors(ckpt / f)
                    continue
                header, begin = Rows.header(ckpt / f) if rows else ({}, 0)
                for name in list(tensors.keys()):
                    info = header.get(name, {})
                    if len(info.get("shape", ())) == 2:  # a matrix: read by blocks of rows
                        yield name, Rows(ckpt / f, begin + info["data_offsets"][0], info["shape"], info["dtype"])
                    else:
                        yield name, tensors.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{ckpt / f} is not a valid safetensors file (corrupt or truncated?): {e}") from None
