"""Notebook 5's low-resource experiment (the paper's §6.3 in miniature), one seed per call.

The notebook runs its seeds side by side in worker processes, one per seed. A worker process can only run a
function it can import (Python's spawn and forkserver start methods begin with a fresh interpreter), not one
defined in the notebook, so the experiment's code lives here. For one seed, `run_seed`:

1. makes the random initial weights (the same for both arms);
2. GSG-pretrains one copy of them on the unlabelled stories (`train(..., objective="gsg")`);
3. fine-tunes the pretrained copy and the untouched copy on the labelled pairs, with early stopping;
4. scores both on the test pairs.

Everything a seed needs comes in the `Experiment` it is given, and every random draw is seeded, so a seed's results
are the same whether it runs in a worker or in the notebook itself, alone or beside others.
"""

import copy
import time
from dataclasses import dataclass

import torch
from _common import ROOT  # noqa: F401 (puts the repository on sys.path: the modules below live there)

from decoding import generate
from gsg import make_gsg_example
from train import evaluate, init_model, train


@dataclass(frozen=True)
class Experiment:
    tokenizer: object  # PegasusTokenizer (it pickles: the worker gets its own copy)
    config: str  # the model, a JSON object for init_model
    unlabelled: list[str]  # documents for GSG
    train_pairs: list[tuple[str, str]]  # (story, summary) for fine-tuning
    val_pairs: list[tuple[str, str]]  # for early stopping
    test_pairs: list[tuple[str, str]]  # for the scores
    pretrain: dict  # train()'s options for GSG pretraining
    fine_tune_lr: float  # Adafactor relative step, the same for both arms
    src_len: int = 128  # tokens kept of a story
    tgt_len: int = 40  # tokens kept of a summary (or of the gap sentences)
    batch_size: int = 16  # fine-tuning
    piece: int = 15  # fine-tuning steps between two validation losses
    max_steps: int = 150  # fine-tuning steps at most
    patience: int = 2  # pieces without a better validation loss before stopping


@torch.no_grad()
def test_loss(model, exp: Experiment, pairs) -> float:
    """Cross-entropy of the reference summaries given their stories, nats per token (teacher-forced, no dropout)."""
    was_training = model.training
    model.eval()
    ids, mask = exp.tokenizer.batch_encode([t for t, _ in pairs], exp.src_len)
    labels, label_mask = exp.tokenizer.batch_encode([s for _, s in pairs], exp.tgt_len)
    loss = model.loss(ids, mask, labels.masked_fill(label_mask == 0, -100)).item()
    model.train(was_training)
    return loss


def summarize(model, exp: Experiment, texts) -> list[str]:
    """Greedy summaries, as evaluate() makes them for its ROUGE."""
    ids, mask = exp.tokenizer.batch_encode(list(texts), exp.src_len)
    model.eval()
    return exp.tokenizer.batch_decode(generate(model, ids, mask, max_new_tokens=exp.tgt_len)[:, 1:])


def fine_tune(model, exp: Experiment, lr: float, seed: int):
    """Fine-tune on exp.train_pairs in pieces of exp.piece steps, keep the weights with the lowest validation loss,
    stop after exp.patience pieces without improvement. Returns (best step, validation curve)."""
    curve = [(0, test_loss(model, exp, exp.val_pairs))]
    best_step, best_loss, best_state = 0, curve[0][1], copy.deepcopy(model.state_dict())
    for end in range(exp.piece, exp.max_steps + 1, exp.piece):
        # Each piece is a fresh train() call: Adafactor has no momentum and rebuilds its factored second-moment
        # estimate within a few steps, so the pieces behave as one run would.
        train(model, exp.tokenizer, exp.train_pairs, objective="summarize", steps=exp.piece, batch_size=exp.batch_size,
              lr=lr, label_smoothing=0.0, max_source_len=exp.src_len, max_target_len=exp.tgt_len,
              seed=seed * 1000 + end, progress=False)
        curve.append((end, test_loss(model, exp, exp.val_pairs)))
        if curve[-1][1] < best_loss:
            best_step, best_loss, best_state = end, curve[-1][1], copy.deepcopy(model.state_dict())
        elif end - best_step >= exp.patience * exp.piece:
            break
    model.load_state_dict(best_state)
    return best_step, curve


def run_seed(seed: int, exp: Experiment) -> dict:
    """One seed of the experiment, both arms. Returns the GSG loss curve, the pretrained model's gap fillings of
    the test stories (before fine-tuning), and per arm: the kept step, the validation curve, the test loss, the
    ROUGE scores and the test summaries; plus the CPU seconds each stage took."""
    torch.set_num_threads(1)  # one core per seed: tiny matrices gain little from a second thread
    torch.manual_seed(seed)
    pretrained = init_model(exp.config)
    scratch = copy.deepcopy(pretrained)  # the same random weights, never pretrained
    cpu = time.process_time()
    result = {"seed": seed, "gsg_history": train(pretrained, exp.tokenizer, exp.unlabelled, seed=seed, progress=False,
                                                 max_source_len=exp.src_len, max_target_len=exp.tgt_len,
                                                 **exp.pretrain)}
    result["pretrain_cpu"] = time.process_time() - cpu
    # What GSG alone taught: fill the gaps of the (unseen) test stories, the gap sentences chosen by Ind-Orig.
    result["gsg_test"] = [make_gsg_example(text) for text, _ in exp.test_pairs]
    result["gsg_guesses"] = summarize(pretrained, exp, [source for source, _ in result["gsg_test"]])
    for arm, model in (("pretrained", pretrained), ("scratch", scratch)):
        cpu = time.process_time()
        best_step, curve = fine_tune(model, exp, exp.fine_tune_lr, seed)
        result[arm] = dict(best_step=best_step, curve=curve, fine_tune_cpu=time.process_time() - cpu,
                           loss=test_loss(model, exp, exp.test_pairs),
                           summaries=summarize(model, exp, [t for t, _ in exp.test_pairs]),
                           **evaluate(model, exp.tokenizer, exp.test_pairs, exp.src_len, exp.tgt_len, batch_size=16))
    return result
