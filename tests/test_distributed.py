"""train.py under torchrun: data-parallel training with 2 CPU processes (gloo), on loopback.

A tiny model (d_model 64, 2+2 layers, the real vocabulary) without dropout, so a step is a
deterministic function of the weights and the global batch. Each torchrun launch is one
subprocess, time-bound, with one thread per process. The reference for every DDP run is
train() in this process on the same global batch: one process, world_size x grad_accum
micro-batches.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from load_weights import load_model
from tokenizer import PegasusTokenizer
from train import init_model, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tiny_summaries.jsonl"
TINY = json.dumps(dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                       max_position_embeddings=256, dropout=0.0))  # no dropout: steps are deterministic
# One optimizer step sees 4 examples: 2 processes x 1 example x 2 micro-batches, or 1 x 1 x 4.
RUN = dict(batch_size=1, lr=0.1, label_smoothing=0.0, max_source_len=64, max_target_len=16, seed=0, progress=False)
FLAGS = ["--batch-size", "1", "--lr", "0.1", "--label-smoothing", "0", "--max-source-len", "64",
         "--max-target-len", "16", "--seed", "0", "--device", "cpu", "--no-progress", "--data", str(DATA)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "train.py")] + args
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tokenizer(spiece_model):
    return PegasusTokenizer.from_spiece(spiece_model)


def reference(tokenizer, steps: int, grad_accum: int = 4, **kw):
    """Single-process training from the same initial weights: (model, loss history)."""
    torch.manual_seed(0)  # train.py --init-config seeds with --seed before building the model
    model = init_model(TINY)
    return model, train(model, tokenizer, DATA, steps=steps, grad_accum=grad_accum, **(RUN | kw))


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def ddp_run(spiece_model, tmp_path_factory):
    """One optimizer step with 2 processes x 1 example x 2 micro-batches (the first under no_sync)."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(2, ["--init-config", TINY, "--tokenizer", str(spiece_model), "--steps", "1",
                        "--grad-accum", "2", "--out", str(out)] + FLAGS)
    return out, done


def test_ddp_step_equals_single_process_step(ddp_run, tokenizer):
    out, done = ddp_run
    assert done.stdout.count("step 1: loss") == 1  # process 0 alone reports
    ddp_model, _ = load_model(out)
    single, history = reference(tokenizer, steps=1)
    torch.manual_seed(0)
    initial = init_model(TINY)
    diff, moved = max_difference(ddp_model, single), max_difference(single, initial)
    print(f"max |DDP - single-process| after one step: {diff:.3g} (the step moved weights by up to {moved:.3g})")
    assert diff <= 1e-6 and moved > 1e-2
    # Only half the global batch (the micro-batches of process 0) gives a clearly different step.
    half, _ = reference(tokenizer, steps=1, grad_accum=2)
    assert max_difference(ddp_model, half) > 100 * max(diff, 1e-8)
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["loss_history"] == pytest.approx(history, rel=1e-6)  # the loss is averaged over processes
    assert (state["step"], state["examples_seen"], state["global_batch"], state["world_size"]) == (1, 4, 4, 2)
    assert len(state["rng"]) == 2  # each process's RNG state


def test_ddp_checkpoint_loads_here_and_in_transformers(ddp_run):
    transformers = pytest.importorskip("transformers")
    out, _ = ddp_run
    ours, tok = load_model(out)
    ref = transformers.PegasusForConditionalGeneration.from_pretrained(out).eval()
    ids, mask = tok.batch_encode(["The harbour festival brings boats, music and food to the town."], 64)
    decoder_ids = torch.tensor([[0, 139, 2451, 1946]])
    with torch.no_grad():
        a = ours(ids, mask, decoder_ids)
        b = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (a - b).abs().max() / b.abs().max() <= 1e-5


def test_resume_with_fewer_processes_continues_the_schedule(ddp_run, tokenizer, tmp_path):
    out, _ = ddp_run
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    torch.manual_seed(123)  # the fresh weights are replaced by the checkpoint's
    model = init_model(TINY)
    with pytest.raises(ValueError, match="global batch of 4 examples is not a multiple of 1 process"):
        train(model, tokenizer, DATA, out_dir=tmp_path, resume=tmp_path, steps=3, **(RUN | {"batch_size": 3}))
    # Asked for grad_accum 2 with 1 process, it keeps the run's global batch of 4: grad_accum 4.
    history = train(model, tokenizer, DATA, out_dir=tmp_path, resume=tmp_path, steps=3, grad_accum=2, **RUN)
    single, expected = reference(tokenizer, steps=3)
    assert history == pytest.approx(expected, rel=1e-5)
    diff = max_difference(model, single)
    print(f"max |resumed 2->1 processes - single-process| after 3 steps: {diff:.3g}")
    assert diff <= 1e-5
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["examples_seen"], state["global_batch"], state["world_size"]) == (3, 12, 4, 1)


def test_resume_with_more_processes_and_grad_checkpointing(tokenizer, tmp_path):
    """A 1-process checkpoint continued by 2 processes (grad_accum 4 -> 2), with --grad-checkpoint
    (recomputation changes no number) and evaluation, which process 0 alone runs and prints."""
    torch.manual_seed(0)
    first = train(init_model(TINY), tokenizer, DATA, out_dir=tmp_path, steps=1, grad_accum=4, **RUN)
    pairs = [json.loads(line) for line in DATA.read_text().splitlines()[:2]]
    held_out = tmp_path.parent / f"{tmp_path.name}-val.jsonl"
    held_out.write_text("\n".join(json.dumps(p) for p in pairs))
    done = torchrun(2, ["--resume", str(tmp_path), "--steps", "2", "--grad-checkpoint", "--eval-data",
                        str(held_out)] + FLAGS)
    assert done.stdout.count("step 2: rouge1") == 1 and done.stdout.count("step 2: loss") == 1
    single, expected = reference(tokenizer, steps=2)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["loss_history"][:1] == first
    assert state["loss_history"] == pytest.approx(expected, rel=1e-5)
    assert (state["step"], state["examples_seen"], state["global_batch"], state["world_size"]) == (2, 8, 4, 2)
    diff = max_difference(load_model(tmp_path)[0], single)
    print(f"max |resumed 1->2 processes - single-process| after 2 steps: {diff:.3g}")
    assert diff <= 1e-5
