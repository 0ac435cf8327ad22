"""Loading checkpoints as the hub serves them: the real huggingface_hub client against a loopback
server (tests/hub_server.py) holding repositories laid out like the published ones. Each test checks
which files were requested, not only that loading worked: weights of other frameworks (tf_model.h5,
flax_model.msgpack, rust_model.ot) and unused layouts must never be fetched.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once, at import; in this process the
`hub` fixture patches its constants module, and CLI runs get them as environment variables.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, Repo
from huggingface_hub import constants
from tiny_checkpoints import repository, tiny_model, tiny_spiece

from load_weights import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "generate.py"
NEVER = {"tf_model.h5", "flax_model.msgpack", "rust_model.ot", "tokenizer.json"}  # tokenizer.json: spiece.model wins
BIN_FILES = {"config.json", "generation_config.json", "tokenizer_config.json", "spiece.model", "pytorch_model.bin"}
OLD_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def spiece():
    return tiny_spiece()


@pytest.fixture(scope="module")
def models():
    return {"pegasus": tiny_model("pegasus", seed=0), "old": tiny_model("pegasus", seed=1),
            "pegasus_x": tiny_model("pegasus_x", seed=2)}


@pytest.fixture(scope="module")
def repos(models, spiece):
    m = models["pegasus"]
    return {
        "google/pegasus-xsum": Repo(repository(m, spiece, "bin"), revisions={"v1": OLD_SHA},
                                    history={OLD_SHA: repository(models["old"], spiece, "bin")}),
        "old/legacy-bin": Repo(repository(m, spiece, "legacy-bin")),
        "big/sharded-bin": Repo(repository(m, spiece, "sharded-bin")),
        "big/sharded-safetensors": Repo(repository(m, spiece, "sharded-safetensors")),
        "new/both": Repo(repository(m, spiece, "safetensors+bin")),
        "google/pegasus-x-tiny": Repo(repository(models["pegasus_x"], spiece, "safetensors")),
        "me/private": Repo(repository(m, spiece, "safetensors"), token="hf_secret"),
        "bad/shard-index": Repo(repository(m, spiece, "sharded-bin") | {
            "pytorch_model.bin.index.json": b'{"weight_map": {"lm_head.weight": "pytorch_model-00009-of-00009.bin"}}'}),
        "bad/no-weights": Repo({k: v for k, v in repository(m, spiece, "bin").items() if k != "pytorch_model.bin"}),
    }


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """A running server, and this process's huggingface_hub pointed at it with an empty cache."""
    server = HubServer(repos)
    home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(k, raising=False)
    c = constants
    monkeypatch.setattr(c, "ENDPOINT", server.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    server.env = env
    yield server
    server.stop()


def cli(server, *args, stdin="", **env):
    """generate.py in a subprocess with the hub environment; returns (status, stdout, stderr)."""
    full = {**os.environ, **server.env, "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True, env=full,
                       timeout=120)
    return r.returncode, r.stdout, r.stderr


def api_calls(server) -> list[str]:
    return [p for m, p in server.requests if p.startswith("/api/models/")]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pegasus_xsum_layout_fetches_only_what_is_read(hub, models):
    """The 2020 layout: pytorch_model.bin only, with TensorFlow and Flax weights beside it."""
    model, tok = load_model("google/pegasus-xsum")
    assert same_weights(model, models["pegasus"]) and tok.vocab_size == model.config.vocab_size
    assert model.generation_config["num_beams"] == 2
    assert hub.fetched("google/pegasus-xsum") == BIN_FILES
    assert not hub.asked("google/pegasus-xsum") & NEVER
    assert api_calls(hub) == ["/api/models/google/pegasus-xsum"]  # asked once which files there are


@pytest.mark.parametrize("repo, weights", [
    ("old/legacy-bin", {"pytorch_model.bin"}),
    ("big/sharded-bin", {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                         "pytorch_model-00002-of-00002.bin"}),
    ("big/sharded-safetensors", {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors"}),
    ("new/both", {"model.safetensors"}),  # safetensors preferred: the .bin is never fetched
])
def test_weight_layouts(hub, models, repo, weights):
    model, _ = load_model(repo)
    assert same_weights(model, models["pegasus"])
    assert hub.fetched(repo) == BIN_FILES - {"pytorch_model.bin"} | weights
    assert not hub.asked(repo) & (NEVER | ({"pytorch_model.bin"} - weights))


def test_pegasus_x_repository(hub, models):
    model, _ = load_model("google/pegasus-x-tiny")
    assert type(model).__name__ == "PegasusX" and same_weights(model, models["pegasus_x"])
    assert hub.fetched("google/pegasus-x-tiny") == BIN_FILES - {"pytorch_model.bin"} | {"model.safetensors"}


def test_revision(hub, models):
    model, _ = load_model("google/pegasus-xsum", revision="v1")
    assert same_weights(model, models["old"])
    assert api_calls(hub) == ["/api/models/google/pegasus-xsum/revision/v1"]
    model, _ = load_model("google/pegasus-xsum", revision=OLD_SHA)  # by commit: already cached
    assert same_weights(model, models["old"])
    with pytest.raises(FileNotFoundError, match="has no revision 'nope'"):
        load_model("google/pegasus-xsum", revision="nope")


def test_token_from_environment(hub, models, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such model repository.*HF_TOKEN"):
        load_model("me/private")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model, _ = load_model("me/private")
    assert same_weights(model, models["pegasus"])
    sent = [h.get("authorization") for (_, path), h in zip(hub.requests, hub.headers)
            if path.startswith(("/me/private/", "/api/models/me/private"))]
    assert sent[0] is None and sent[-1] == "Bearer hf_secret"  # the hub itself saw the token


@pytest.mark.parametrize("repo, message", [
    ("nobody/no-such-pegasus", "nobody/no-such-pegasus: no such model repository on the hub"),
    ("bad/shard-index", "names pytorch_model-00009-of-00009.bin, which the repository does not have"),
    ("bad/no-weights", "no weights in bad/no-weights"),
])
def test_repository_problems_are_one_line(hub, repo, message):
    with pytest.raises(OSError) as e:
        load_model(repo)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not hub.asked(repo) & NEVER


def test_cache_is_used_when_the_server_is_gone(hub, models, monkeypatch):
    load_model("google/pegasus-xsum")
    hub.stop()  # connections are now refused, as on a machine without internet
    model, _ = load_model("google/pegasus-xsum")
    assert same_weights(model, models["pegasus"])
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and the hub could not be reached"):
        load_model("new/both")


def test_offline_mode_makes_no_request(hub, models, monkeypatch):
    load_model("google/pegasus-xsum")
    n = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = load_model("google/pegasus-xsum")
    assert same_weights(model, models["pegasus"]) and len(hub.requests) == n
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("new/both")


def test_incomplete_cache_is_not_used(hub, monkeypatch):
    load_model("big/sharded-bin")
    snapshot = next((Path(hub.env["HF_HUB_CACHE"]) / "models--big--sharded-bin" / "snapshots").iterdir())
    (snapshot / "pytorch_model-00002-of-00002.bin").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="incomplete \\(no pytorch_model-00002-of-00002.bin\\)"):
        load_model("big/sharded-bin")


def test_cli_downloads_then_works_offline(hub):
    """The README's first command, against the pegasus-xsum layout; then again with the server gone."""
    code, out, err = cli(hub, "--model", "google/pegasus-xsum", "The council voted to close the old bridge.")
    assert code == 0 and "error" not in err, err
    assert len(out.splitlines()) == 1
    assert hub.fetched("google/pegasus-xsum") == BIN_FILES and not hub.asked("google/pegasus-xsum") & NEVER
    hub.stop()
    code, out2, err = cli(hub, "--model", "google/pegasus-xsum", "The council voted to close the old bridge.")
    assert (code, out2) == (0, out), err
    code, out3, err = cli(hub, "--model", "google/pegasus-xsum", "--revision", "v1", "Some text.")
    assert code == 1 and err.count("\n") == 1 and "not in the Hugging Face cache" in err


def test_cli_revision_and_missing_repository(hub):
    code, out, err = cli(hub, "--model", "google/pegasus-xsum", "--revision", "v1", "Some text.")
    assert code == 0, err
    assert "/api/models/google/pegasus-xsum/revision/v1" in api_calls(hub)
    code, out, err = cli(hub, "--model", "nobody/no-such-pegasus", "Some text.")
    assert (code, out) == (1, "")
    assert err == ("error: nobody/no-such-pegasus: no such model repository on the hub (if it is private, "
                   "set HF_TOKEN)\n")


@pytest.mark.parametrize("repo, weights", [
    ("old/legacy-bin", {"pytorch_model.bin"}),
    ("big/sharded-bin", {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                         "pytorch_model-00002-of-00002.bin"}),
    ("new/both", {"model.safetensors"}),
    ("google/pegasus-x-tiny", {"model.safetensors"}),
])
def test_cli_weight_layouts(hub, repo, weights):
    code, out, err = cli(hub, "--model", repo, "--num-beams", "1", "The council voted to close the old bridge.")
    assert code == 0 and len(out.splitlines()) == 1, err
    assert hub.fetched(repo) == BIN_FILES - {"pytorch_model.bin"} | weights
    assert not hub.asked(repo) & (NEVER | ({"pytorch_model.bin"} - weights))
