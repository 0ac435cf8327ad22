"""Finding a checkpoint: a local directory, or a Hugging Face hub repository fetched into the hub cache.

The hub serves a repository as a list of files at a revision (`model_info`) and each file by name
(`hf_hub_download`, which keeps them in the standard cache, ~/.cache/huggingface/hub). A PEGASUS
repository holds far more than one loader needs: weights for TensorFlow, Flax, Rust and ONNX as
well as PyTorch, some in two layouts. `resolve` asks once which files there are and downloads only
the ones `load_weights.load_model` reads; offline, it uses a complete cached copy without a network
call. The tests serve repositories laid out as the hub does from a loopback server (tests/hub_server.py).
"""

import json
import os
from pathlib import Path

# The weight layouts a repository may have, in the order transformers prefers them. Only these are
# ever fetched: never tf_model.h5, flax_model.msgpack, rust_model.ot, ONNX or other frameworks' files.
WEIGHT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json",
                  "pytorch_model.bin", "pytorch_model.bin.index.json")


def files_needed(names: set[str], where: str) -> tuple[list[str], str]:
    """From the file names a checkpoint has: (the files to read besides shards, the weight file or
    shard index among them). The tokenizer is spiece.model, else tokenizer.json (what
    PegasusTokenizer.from_pretrained reads), plus tokenizer_config.json for model_max_length."""
    if "config.json" not in names:
        raise FileNotFoundError(f"{where} has no config.json; is it a Hugging Face checkpoint?")
    weights = next((w for w in WEIGHT_LAYOUTS if w in names), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {where} (expected one of {', '.join(WEIGHT_LAYOUTS)})")
    files = ["config.json", weights]
    files += [f for f in ("generation_config.json", "tokenizer_config.json") if f in names]
    files += [f for f in ("spiece.model", "tokenizer.json") if f in names][:1]
    return files, weights


def shard_files(index: Path) -> list[str]:
    """The shard files a `*.index.json` names (its weight_map values), checked to be plain names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        raise ValueError(f"{index} is not a valid shard index (a JSON object with a weight_map)") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no weight_map (tensor name -> shard file); it is not a valid shard index")
    shards = sorted(set(weight_map.values()))
    bad = [f for f in shards if Path(f).name != f or f in (".", "..")]
    if bad:
        raise ValueError(f"{index} names shard {bad[0]!r}, which is not a file name in the checkpoint directory")
    return shards


def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched into (or read from) the standard hub cache.

    For a hub id we ask the hub once which files the repository has (at `revision`, default main),
    then download exactly the ones load_model reads. Without a connection, or with HF_HUB_OFFLINE=1,
    a complete cached copy is used without any network call. HF_TOKEN is sent when set (private and
    gated repositories), as huggingface_hub does."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that contains config.json")
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to hub ids, not to the local directory {path}")
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")) or not all(name_or_path.split("/")):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    import huggingface_hub as hub
    from huggingface_hub import constants, errors

    at = f" at revision {revision!r}" if revision else ""
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported; a later setting counts too.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return cached(name_or_path, revision, "HF_HUB_OFFLINE is set")
    try:
        info = hub.HfApi().model_info(name_or_path, revision=revision)
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{name_or_path} has no revision {revision!r} on the hub") from None
    except errors.GatedRepoError:
        raise PermissionError(f"{name_or_path} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{name_or_path}: no such model repository on the hub (if it is private, set "
                                f"HF_TOKEN)") from None
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, OSError, hub_transport_errors()) as e:
        return cached(name_or_path, revision, f"the hub could not be reached: {type(e).__name__}")
    names = {s.rfilename for s in info.siblings or []}
    files, weights = files_needed(names, f"{name_or_path}{at}")

    def fetch(f: str) -> Path:
        try:  # revision as the user gave it, so the cache records it (refs/) for offline use later
            return Path(hub.hf_hub_download(name_or_path, f, revision=revision))
        except (errors.HfHubHTTPError, OSError, hub_transport_errors()) as e:
            raise OSError(f"downloading {f} from {name_or_path}{at} failed: {type(e).__name__}") from None

    paths = [fetch(f) for f in files]
    snapshot = paths[0].parent
    if weights.endswith(".index.json"):
        shards = shard_files(snapshot / weights)
        absent = [f for f in shards if f not in names]
        if absent:
            raise FileNotFoundError(f"{name_or_path}{at}: {weights} names {absent[0]}, which the repository "
                                    f"does not have")
        paths += [fetch(f) for f in shards]
    if any(p.parent != snapshot for p in paths):  # the repository changed while we downloaded
        raise OSError(f"{name_or_path} changed on the hub during the download; run the command again")
    return snapshot


def hub_transport_errors() -> type[Exception]:
    """The HTTP library's base error (connection refused, timeout ...), whichever one huggingface_hub uses."""
    try:  # huggingface_hub >= 1.0 (httpx2); older releases use requests, whose errors are OSErrors
        import httpx2
        return httpx2.TransportError
    except ImportError:
        return OSError


def cached(repo_id: str, revision: str | None, why: str) -> Path:
    """The cached snapshot of a hub repository, if it holds every file load_model reads; no network."""
    from huggingface_hub import snapshot_download
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # huggingface_hub raises several kinds here; all mean "not in the cache"
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache and {why}; on a machine with internet run "
                                f"`hf download {repo_id}` (or copy its directory here and pass the path)") from None
    names = {p.name for p in snapshot.iterdir()}
    files, weights = files_needed(names, f"the cached copy of {repo_id} ({snapshot})")
    if weights.endswith(".index.json"):
        files += shard_files(snapshot / weights)
    absent = [f for f in files if not (snapshot / f).is_file()]
    if absent:
        raise FileNotFoundError(f"the cached copy of {repo_id} is incomplete (no {absent[0]}) and {why}")
    return snapshot
