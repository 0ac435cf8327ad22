"""Shared test fixtures.

`../shared` (beside the repository) holds reference material: the real PEGASUS vocabulary and the
published configs. It is absent from a user's fresh clone, so tests that need it skip with a
clear reason instead of failing.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the modules live flat at the repository root


def shared_file(*parts: str) -> Path:
    """Path to a file in ../shared, or skip the calling test with the reason it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference material not found: {path} (it lives beside the repo, not in it)")
    return path


@pytest.fixture(scope="session")
def spiece_model() -> Path:
    return shared_file("pegasus", "spiece.model")


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return shared_file("pegasus", "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer(spiece_model):
    """The real PEGASUS tokenizer (96,103 ids), from ../shared's spiece.model."""
    from tokenizer import PegasusTokenizer
    return PegasusTokenizer.from_spiece(spiece_model)


@pytest.fixture(scope="session")
def published_configs() -> dict:
    return json.loads(shared_file("configs", "published.json").read_text())


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny saved checkpoint with the real vocabulary, biased to write "Summary" (the CLI tests'): 16 wide,
    max_length 6, beam 2."""
    import torch

    from load_weights import save_model
    from pegasus import Pegasus, PegasusConfig

    torch.manual_seed(0)
    model = Pegasus(PegasusConfig(vocab_size=96103, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64))
    with torch.no_grad():
        model.final_logits_bias[0, tokenizer.encode("Summary")[0]] = 20.0
    model.generation_config = {"num_beams": 2, "max_length": 6, "length_penalty": 0.6}
    path = tmp_path_factory.mktemp("tiny")
    save_model(model, path, tokenizer)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy machine OpenMP threads waiting for
    each other make them several times slower. Modules that train toy models use it for all their tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quantized_tensors_removed():
    """A PyTorch whose deprecated quantized tensors are gone (deprecated in 2.13, to be removed in a later release):
    creating one raises, for fbgemm's packing and oneDNN's int8 inputs alike. The probes' cached answers are
    dropped before and after (quantize.fbgemm_available and the others)."""
    import torch

    import quantize
    import screen

    probes = (quantize.fbgemm_available, quantize.fbgemm_reduce_range, quantize.onednn_int8_exact, quantize.amx_int8,
              quantize.vnni_int8, quantize.quantized_tensors_warned, screen.fbgemm_screen_available)

    def removed(*args, **kwargs):
        raise RuntimeError("quantized tensors were removed from this PyTorch")

    with pytest.MonkeyPatch.context() as mp:
        for creator in ("_make_per_channel_quantized_tensor", "quantize_per_tensor_dynamic"):
            mp.setattr(torch, creator, removed)
        for probe in probes:
            probe.cache_clear()
        yield
    for probe in probes:
        probe.cache_clear()


@pytest.fixture(scope="session")
def toy_pegasus():
    """PEGASUS at toy.py's TOY shape, trained on the toy task (800 steps, seed 0; ~20 s on one core), once
    for the modules that compare it with a lower-precision twin (test_quantize, test_bfloat16), with the
    reference (test_generate) or with its int8 checkpoint (test_int8_model). Shared: tests must not change it
    (twins and test_generate's copy are deep copies)."""
    import torch
    from toy import TOY, train_toy

    from pegasus import Pegasus, PegasusConfig

    torch.manual_seed(0)
    return train_toy(Pegasus(PegasusConfig(**TOY)), seed=0)
