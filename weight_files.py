"""Reading the tensors of a checkpoint's weight files (safetensors, or torch.save'd .bin), three ways:

- memory-mapped (mapped_tensors, the default): nothing is read until a tensor is used, and each
  tensor lets go of its pages when it is freed;
- read into ordinary memory (pread), tensor by tensor;
- a matrix a block of rows at a time (Rows), for the int8 loader, which never holds a float matrix.

A torch.save'd .bin (zip or legacy format) is read the same three ways: bin_layout finds where each
of its tensors lies in the file. One it cannot place (not a plain state dict) is left to torch.load.

load_weights.load_model decides which; this module only reads (memory.returning_freed_memory is the
allocator setting that keeps memory low while a loader converts and frees tensor after tensor).
"""

import collections
import io
import json
import math
import mmap
import pickle
import struct
import weakref
import zipfile
from pathlib import Path

import torch

from hub import files_needed, shard_files
from memory import ThreadBuffer


def read_bin(file: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict. weights_only=True refuses pickles that would run arbitrary code.
    Files from torch < 1.6 are not zip archives and cannot be memory-mapped: read those whole."""
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


def safetensors_layout(file: Path) -> list[tuple[str, int, int, list[int], torch.dtype]]:
    """(name, first byte, end byte, shape, dtype) of every tensor of a safetensors file, from its header."""
    header, begin = Rows.header(file)
    header.pop("__metadata__", None)
    return [(name, begin + info["data_offsets"][0], begin + info["data_offsets"][1], info["shape"],
             SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)) for name, info in header.items()]


# The storage classes a torch.save'd pickle names, and the dtype of their elements.
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file


def _tensor_at(storage, offset, size, stride, *_):
    """Stands in for torch._utils._rebuild_tensor_v2 when _PickleIndex reads a checkpoint: where the tensor is."""
    return {"storage": storage, "offset": offset, "shape": list(size), "stride": tuple(stride)}


class _PickleIndex(pickle.Unpickler):
    """Reads the pickle of a torch.save'd state dict without making a tensor or running anything: the only
    globals it resolves are the storage classes (to their dtype), the tensor-rebuilding function (to
    _tensor_at, a record of where the tensor is) and OrderedDict; anything else is refused, and the
    caller leaves the file to torch.load (weights_only), which refuses or reads it. Each storage the
    pickle refers to is noted in `storages`: its key -> (dtype, number of elements)."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_at
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict")

    def persistent_load(self, pid):  # ("storage", dtype, key, location, numel[, view]) as torch.save writes it
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and (len(pid) == 5 or pid[5] is None)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storages[str(pid[2])] = pid[1], int(pid[4])
        return str(pid[2])


def bin_layout(file: Path) -> list[tuple[str, int, int, list[int], torch.dtype]] | None:
    """(name, first byte, end byte, shape, dtype) of every tensor of a torch.save'd checkpoint, so that it is
    read as a safetensors file is: memory-mapped views that let go of their pages, or Rows. None where
    the tensors cannot be placed so (the file is then left to torch.load): not a flat dict of tensors,
    a tensor that is not one contiguous run of bytes, or two that share some bytes but not all.

    Both formats keep the pickle (names, shapes, which storage) apart from the storages' raw bytes. The
    zip format (torch 1.6 and later) stores each storage as an uncompressed record "<archive>/data/<key>";
    the legacy one writes, after the pickle, the list of storage keys, then each storage as an 8-byte
    element count followed by its bytes (torch/serialization.py, _legacy_save). Tied names (an embedding
    saved with its tied copies, as transformers' .bin files have it: one storage) come out as the same bytes."""
    storages, starts = {}, {}  # key -> (dtype, elements); key -> offset of its first byte
    try:
        with open(file, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    infos = {i.filename: i for i in z.infolist()}
                    pkl = next(n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1)
                    order = pkl.removesuffix("data.pkl") + "byteorder"
                    if order in infos and z.read(order) != b"little":
                        return None
                    state = _PickleIndex(io.BytesIO(z.read(pkl)), storages).load()
                for key in storages:
                    info = infos[pkl.removesuffix("data.pkl") + "data/" + key]
                    if info.compress_type != zipfile.ZIP_STORED:
                        return None
                    f.seek(info.header_offset + 26)  # the local header's name and extra field lengths
                    name_len, extra_len = struct.unpack("<HH", f.read(4))
                    starts[key] = info.header_offset + 30 + name_len + extra_len
            else:
                f.seek(0)  # is_zipfile read the end of the file
                if _PickleIndex(f, storages).load() != LEGACY_MAGIC:
                    return None
                _, system = _PickleIndex(f, storages).load(), _PickleIndex(f, storages).load()  # protocol, system info
                if not system.get("little_endian", False):
                    return None
                state = _PickleIndex(f, storages).load()
                for key in _PickleIndex(f, storages).load():  # the storages' bytes follow in this order
                    dtype, numel = storages[str(key)]
                    if int.from_bytes(f.read(8), "little") != numel:
                        return None
                    starts[str(key)] = f.tell()
                    f.seek(numel * dtype.itemsize, 1)
            size = f.seek(0, 2)
    except (pickle.UnpicklingError, EOFError, KeyError, StopIteration, ValueError, TypeError, AttributeError,
            IndexError, OverflowError, zipfile.BadZipFile, struct.error):
        return None
    if not isinstance(state, dict) or set(storages) != set(starts):
        return None
    entries, spans = [], {}
    for name, t in state.items():
        if not (isinstance(name, str) and isinstance(t, dict) and set(t) == {"storage", "offset", "shape", "stride"}):
            return None
        dtype, numel = storages[t["storage"]]
        n = math.prod(t["shape"])
        first = starts[t["storage"]] + t["offset"] * dtype.itemsize
        if n and (t["stride"] != contiguous_strides(t["shape"]) or t["offset"] + n > numel
                  or starts[t["storage"]] + numel * dtype.itemsize > size):
            return None  # strided, or past its storage or the file
        entries.append((name, first if n else 0, first + n * dtype.itemsize if n else 0, t["shape"], dtype))
        if n and spans.setdefault(entries[-1][1:3], entries[-1][3:]) != entries[-1][3:]:
            return None  # the same bytes as two shapes or dtypes
    ordered = sorted(spans)
    if any(b[0] < a[1] for a, b in zip(ordered, ordered[1:])):
        return None  # overlapping views: freeing one would let go of pages the other still reads
    return entries


def contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of `shape`, in elements."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def mapped_tensors(file: Path, entries: list | None = None):
    """(name, tensor) for every tensor of a weight file (`entries` as safetensors_layout gives them, by
    default that file's header), each a view of one copy-on-write memory map of the file: nothing is
    read until a tensor is used, and then straight from the page cache (no copy; writing to a tensor
    never changes the file). Each tensor lets go of its own pages when it is freed (madvise DONTNEED),
    so a converter that replaces the weights one by one (onednn.use_onednn packs each into a new layout)
    never holds the file's pages beside its copies: measured at pegasus-xsum shape, this loads and packs
    in 2.2 s on one core where reading every tensor into fresh memory first took 4.1 s (1.5 s of that
    was page faults on the fresh memory). Names of the same bytes (tied weights in a .bin) get the same
    tensor, whose pages go when the last of them is freed."""
    entries = safetensors_layout(file) if entries is None else entries
    with open(file, "rb") as f:
        whole = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))  # the map outlives the file handle
    made = weakref.WeakValueDictionary()  # (first, last) -> the tensor of those bytes, while it lives
    for name, first, last, shape, dtype in entries:
        if last == first:  # frombuffer refuses an empty buffer
            yield name, torch.empty(shape, dtype=dtype)
            continue
        tensor = made.get((first, last))
        if tensor is None:
            view = whole[first:last]
            lo, hi = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE, last // mmap.PAGESIZE * mmap.PAGESIZE  # wholly its own
            if hi > lo and hasattr(whole.obj, "madvise"):  # not on Windows
                weakref.finalize(view, whole.obj.madvise, mmap.MADV_DONTNEED, lo, hi - lo).atexit = False
            tensor = made[first, last] = torch.frombuffer(view, dtype=dtype).view(shape)  # the tensor holds `view`
        yield name, tensor


def same_bytes(a, b) -> bool:
    """Whether two tensors as iter_tensors gives them (tensors or Rows) are the same bytes: tied names of a
    .bin checkpoint share one storage, so a tied copy needs no comparing with its original."""
    if isinstance(a, Rows) or isinstance(b, Rows):
        return isinstance(a, Rows) and isinstance(b, Rows) and (a.file, a.start, a.shape, a.dtype) == (
            b.file, b.start, b.shape, b.dtype)
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


_READS = ThreadBuffer(torch.uint8)  # Rows' reads: a block of a matrix's bytes at a time


class Rows:
    """A 2-D tensor of a weight file (safetensors, or a .bin: bin_layout), read a block of rows at a
    time (straight from its offset in the file into the block's memory): quantize.quantize_weight needs
    only its shape and row slices,
    so the int8 path never holds a whole float matrix (394 MB for the embedding table at pegasus-xsum
    shape), and its small blocks reuse memory the allocator already has, where a fresh full tensor
    costs a page fault per 4 KB. (safetensors' own get_slice reads the whole tensor first.) The
    safetensors format: an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte range after the header, then the bytes."""

    device = torch.device("cpu")

    def __init__(self, file: Path, start: int, shape: list[int], dtype: torch.dtype):
        self.file, self.start, self.shape, self.dtype = file, start, torch.Size(shape), dtype

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
        block = _READS.get(size)  # the file's bytes land here directly
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
    """Rows of a weight file's matrix read by index, each with one read from a file kept open: only
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


def iter_tensors(ckpt: Path, mmap: bool = True, rows: bool = False, first: str | None = None):
    """(name, tensor) for every tensor of a checkpoint, one at a time (file_tensors, file by file); the
    tensor named `first` before the others of its file."""
    _, weights = files_needed({p.name for p in ckpt.iterdir()}, str(ckpt))
    files = shard_files(ckpt / weights) if weights.endswith(".index.json") else [weights]
    for f in files:
        if not (ckpt / f).is_file():
            raise FileNotFoundError(f"{ckpt / f} is listed in the shard index {weights} but missing")
    for f in files:
        yield from file_tensors(ckpt / f, mmap, rows, first)


def up_front(items, first: str | None) -> list:
    """Names, or (name, ...) entries, with the one named `first` moved to the front, the rest in order."""
    return sorted(items, key=lambda item: (item if isinstance(item, str) else item[0]) != first)


def file_tensors(file: Path, mmap: bool = True, rows: bool = False, first: str | None = None):
    """(name, tensor) for every tensor of one weight file. Without mmap a tensor is read (pread) only
    when its turn comes, so a caller that converts each one and drops it (load_model's int8 path)
    never holds more than one float tensor; with rows=True every 2-D one comes as Rows, read in blocks
    of rows by whoever uses it. A .bin that bin_layout cannot place is read by torch.load (mapped
    where the zip format allows it, else whole). The tensor named `first` comes first."""
    from safetensors import SafetensorError, safe_open
    if file.suffix != ".safetensors":
        entries = bin_layout(file) if mmap or rows else None
        if entries is None:  # into ordinary memory, as asked, or a .bin whose tensors cannot be placed
            state = read_bin(file, mmap)
            for name in up_front(state, first):
                yield name, state.pop(name)
        elif mmap:  # read as a safetensors file is: each tensor lets go of its pages when freed
            yield from mapped_tensors(file, up_front(entries, first))
        else:  # rows: a matrix as Rows, the small rest read through the map and copied out
            entries = up_front(entries, first)
            small = mapped_tensors(file, [e for e in entries if len(e[3]) != 2])  # in the same order
            for name, start, _, shape, dtype in entries:
                yield name, Rows(file, start, shape, dtype) if len(shape) == 2 else next(small)[1].clone()
        return
    try:
        with safe_open(file, framework="pt", backend="pread") as tensors:  # it checks the header and size
            if mmap:
                yield from mapped_tensors(file, up_front(safetensors_layout(file), first))
                return
            for name, start, _, shape, dtype in up_front(safetensors_layout(file), first):
                if rows and len(shape) == 2:  # a matrix: read by blocks of rows
                    yield name, Rows(file, start, shape, dtype)
                else:
                    yield name, tensors.get_tensor(name)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a valid safetensors file (corrupt or truncated?): {e}") from None
