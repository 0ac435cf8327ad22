"""Pre-train PEGASUS with gap-sentence generation, or fine-tune it on (text, summary) pairs.

PEGASUS (Zhang et al. 2020, https://arxiv.org/abs/1912.08777) is pre-trained on plain documents
with a task shaped like summarisation, Gap Sentences Generation (GSG, section 3.1; gsg.py builds
the examples). One loop does GSG pre-training and fine-tuning alike:

    python train.py --model google/pegasus-large --data train.jsonl --eval-data val.jsonl --out runs/ft
    python train.py --init-config '{"d_model": 64, "encoder_layers": 2, "decoder_layers": 2}' \\
        --tokenizer ../shared/pegasus/spiece.model --objective gsg --data corpus.txt --out runs/tiny
    python train.py --resume runs/ft --data train.jsonl --steps 2000    # continue to step 2000
    torchrun --nproc_per_node 4 train.py --model google/pegasus-large --data train.jsonl --out runs/ft  # 4 GPUs

Checkpoints are in the Hugging Face layout (load_weights.save_model: they load here and in
transformers) plus `trainer_state.pt` (step, optimizer state, RNG, loss history) for --resume.
"""

import argparse
import inspect
import json
import random
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import pegasus
from data import read_documents, read_jsonl
from decoding import generate
from distributed import gather_objects, mean_over_processes, rank_and_world, setup_distributed
from gsg import STRATEGIES, make_gsg_example
from load_weights import load_model, model_class, save_model
from tokenizer import PegasusTokenizer

# ----------------------------------------------------------------------------- models


def init_model(spec: str) -> torch.nn.Module:
    """A randomly initialised model. `spec` is a published name (google/pegasus-large, ...), a
    config.json path, or a JSON object whose keys override PegasusConfig's defaults (the
    pegasus-large shape); "model_type": "pegasus_x" builds PEGASUS-X. Seed torch first."""
    from pegasus_x import PUBLISHED as PUBLISHED_X
    published = pegasus.PUBLISHED | PUBLISHED_X
    if spec in published:
        return model_class(published[spec].model_type)[0](published[spec])
    inline = spec.lstrip().startswith("{")
    if not inline and not Path(spec).is_file():
        raise FileNotFoundError(f"--init-config {spec!r}: not a published name ({', '.join(published)}), "
                                f"a config.json file or a JSON object")
    try:
        d = json.loads(spec if inline else Path(spec).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--init-config {'' if inline else spec + ' '}is not valid JSON: {e.msg}") from None
    cls, config_cls = model_class(d.get("model_type", "pegasus"))
    unknown = set(d) - {f.name for f in fields(config_cls)}
    if inline and unknown:  # a typo would otherwise be ignored silently (config.json files hold extra keys)
        raise ValueError(f"--init-config: unknown config fields {sorted(unknown)}")
    return cls(config_cls.from_dict(d))


# ----------------------------------------------------------------------------- training config


@dataclass
class TrainConfig:
    """Every training option, with its default, in one place: train() takes one (plus keyword overrides)
    and the command line is generated from these fields, their types and the comment on each line."""
    # what to learn
    objective: Literal["summarize", "gsg"] = "summarize"  # fine-tune on (text, summary) pairs, or GSG pre-training
    eval_data: str | None = None  # .jsonl with text/summary (or a list of pairs), scored with ROUGE by rank 0
    # schedule: one optimizer step sees world_size * batch_size * grad_accum examples (the global batch)
    steps: int = 1000  # total optimizer steps, resumed ones included
    batch_size: int = 8  # examples per forward pass on each process (the micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step on each process; on --resume set to keep the global batch
    lr: float | None = None  # Adafactor relative step; default the recipes': 1e-3 summarize, 1e-2 gsg
    warmup_steps: int = 0  # linear warm-up steps before the 1/sqrt(step) decay
    label_smoothing: float | None = None  # default the recipes': 0.1 summarize, 0.0 gsg
    max_source_len: int = 512  # input tokens kept (capped at the model's max_position_embeddings)
    max_target_len: int = 128  # summary tokens kept (same cap)
    # gap sentences (objective gsg, section 3.1)
    gsg_ratio: float = 0.3  # fraction of each document's sentences masked
    gsg_strategy: Literal[STRATEGIES] = "ind-orig"  # how they are chosen (select_gap_sentences)
    mlm_prob: float = 0.0  # masked-language-model noise on the other sentences (make_gsg_example)
    # checkpoints and logs
    out_dir: str | None = None  # checkpoint directory (HF layout + trainer_state.pt); the latest overwrites
    eval_every: int = 0  # evaluate every this many steps (0: only at the end), if eval_data is given
    save_every: int = 0  # save every this many steps (0: only at the end)
    resume: str | None = None  # a checkpoint directory written here: continue that run where it stopped
    seed: int = 0  # data order, GSG choices and dropout; process r seeds its dropout with seed + r
    progress: bool = True  # show a progress bar (process 0 only)
    # memory and speed (opt-in: the float32 default is exact)
    bf16: bool = False  # forward and backward under bfloat16 autocast; weights and optimizer stay float32
    grad_checkpoint: bool = False  # recompute layer activations in backward: less memory, ~1/3 more compute


# ----------------------------------------------------------------------------- schedule and evaluation


def learning_rate(step: int, base_lr: float, warmup_steps: int = 0) -> float:
    """The original schedule (pegasus/params/estimator_utils.py): base_lr for 10k steps, then decay as
    1/sqrt(step); fine-tuning there also warms up linearly (10k steps by default). For
    torch.optim.Adafactor lr is a *relative* step: an update moves a weight by lr * max(1e-3, RMS(weight))
    times a clipped, normalised gradient. That, beta1 = 0, second-moment decay 1 - t^-0.8 and update
    clipping at 1.0 are the tensor2tensor Adafactor the authors used (Shazeer & Stern 2018)."""
    lr = base_lr * min(1.0, (10000 / max(step, 1)) ** 0.5)
    if warmup_steps:
        lr = min(lr, base_lr * (step + 1) / warmup_steps)
    return lr


@torch.no_grad()
def evaluate(model, tokenizer, pairs, max_source_len: int = 512, max_target_len: int = 128,
             batch_size: int = 8) -> dict[str, float]:
    """ROUGE-1/2/L F1 (x100, Porter stemming, as the paper reports) of greedy summaries of `pairs`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    was_training, device = model.training, model.shared.weight.device
    model.eval()
    totals = Counter()
    for i in range(0, len(pairs), batch_size):
        texts, summaries = zip(*pairs[i : i + batch_size])
        ids, mask = tokenizer.batch_encode(list(texts), max_source_len)
        out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_target_len)  # (B, 1+T)
        for prediction, summary in zip(tokenizer.batch_decode(out[:, 1:].cpu()), summaries):
            totals.update({k: s.fmeasure for k, s in scorer.score(summary, prediction).items()})
    model.train(was_training)
    return {k: 100 * v / len(pairs) for k, v in totals.items()}



# ----------------------------------------------------------------------------- the training loop


@dataclass
class RunState:
    """Where a run stands; saved in trainer_state.pt with the optimizer and RNG states."""
    step: int = 0  # optimizer steps done
    examples_seen: int = 0  # stream position: all processes' examples so far
    loss_history: list[float] = field(default_factory=list)  # mean training loss of every step


class WithLoss(nn.Module):
    """The model's loss as forward(): DistributedDataParallel hooks into forward calls only."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, input_ids, attention_mask, labels):
        return self.model.loss(input_ids, attention_mask, labels, self.label_smoothing)


class ExampleStream:
    """The training data as one endless stream. Position p is example p % N of epoch p // N's seeded
    shuffle, so any position (a resumed run, another process's share) is found without replaying;
    with objective gsg the example is made from the document on the fly, seeded by its position."""

    def __init__(self, data: list, cfg: TrainConfig):
        self.data, self.cfg = data, cfg

    @lru_cache(maxsize=2)  # noqa: B019 (one stream per run, so the cache cannot outlive much)
    def order(self, epoch: int) -> list[int]:
        return random.Random(self.cfg.seed * 1_000_003 + epoch).sample(range(len(self.data)), len(self.data))

    def __getitem__(self, p: int) -> tuple[str, str]:
        item = self.data[self.order(p // len(self.data))[p % len(self.data)]]
        if self.cfg.objective != "gsg":
            return item
        # Only the first max_source_len words can fit in the input (a word is at least one token): pick
        # gap sentences among those, as the original's max_total_words cut does (and Seq stays cheap).
        c = self.cfg
        doc = " ".join(item.split()[: c.max_source_len])
        return make_gsg_example(doc, c.gsg_ratio, c.gsg_strategy, c.mlm_prob, seed=c.seed * 1_000_000_007 + p,
                                max_input_len=c.max_source_len, max_target_len=c.max_target_len)


def global_batch(cfg: TrainConfig, world: int) -> int:
    return world * cfg.batch_size * cfg.grad_accum


def my_micro_batches(stream: ExampleStream, start: int, cfg: TrainConfig, rank: int) -> list[list]:
    """This process's share of the global batch at stream positions start .. start + G - 1: process r
    takes the r-th contiguous slice of G / world examples, cut into grad_accum micro-batches. So the
    micro-batches of all processes, in rank order, are exactly those one process would see with
    world * grad_accum micro-batches: the schedule does not depend on the number of processes."""
    first = start + rank * cfg.batch_size * cfg.grad_accum
    return [[stream[first + m * cfg.batch_size + i] for i in range(cfg.batch_size)] for m in range(cfg.grad_accum)]


def encode_batch(tokenizer, pairs, cfg: TrainConfig, device):
    sources, targets = zip(*pairs)
    input_ids, attention_mask = tokenizer.batch_encode(list(sources), cfg.max_source_len)
    labels, label_mask = tokenizer.batch_encode(list(targets), cfg.max_target_len)
    labels = labels.masked_fill(label_mask == 0, -100)  # padding is not predicted
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def train_step(net: nn.Module, optimizer, micro_batches, tokenizer, cfg: TrainConfig, device) -> float:
    """One optimizer step over this process's micro-batches. Gradients add up over micro-batches (each
    loss is a token mean, divided by their number); DDP then averages them over processes, so the step
    is the one a single process takes on the whole global batch. Returns the loss, averaged likewise."""
    total = 0.0
    for m, batch in enumerate(micro_batches):
        # DDP all-reduces gradients during backward. Between the micro-batches of one step there is
        # nothing to share yet, so all but the last backward run under no_sync and just accumulate.
        last = m == len(micro_batches) - 1
        with nullcontext() if last or not isinstance(net, DDP) else net.no_sync():
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):  # opt-in; the loss is float32
                loss = net(*encode_batch(tokenizer, batch, cfg, device))
            (loss / len(micro_batches)).backward()
        total += loss.item() / len(micro_batches)
    optimizer.step()  # Adafactor clips its own updates (threshold 1.0), so no gradient clipping
    optimizer.zero_grad(set_to_none=True)
    return mean_over_processes(total)


def resolve(cfg: TrainConfig, model, tokenizer, data) -> TrainConfig:
    """Check the options and fill in the recipe defaults (lr, label smoothing) and length caps."""
    if not data or min(cfg.steps, cfg.batch_size, cfg.grad_accum) < 1:
        raise ValueError("need training examples, and steps, batch_size, grad_accum >= 1")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the model only {model.config.vocab_size}")
    gsg, max_len = cfg.objective == "gsg", model.config.max_position_embeddings
    return replace(cfg, lr=cfg.lr if cfg.lr is not None else (1e-2 if gsg else 1e-3),
                   label_smoothing=cfg.label_smoothing if cfg.label_smoothing is not None else (0.0 if gsg else 0.1),
                   max_source_len=min(cfg.max_source_len, max_len), max_target_len=min(cfg.max_target_len, max_len))


def save_checkpoint(model, tokenizer, optimizer, run: RunState, cfg: TrainConfig, rank: int, world: int):
    """Weights in the Hugging Face layout plus trainer_state.pt. Every process must call it (the RNG
    states are gathered); process 0 alone writes. The optimizer state is the same on all processes."""
    rngs = gather_objects(torch.get_rng_state())
    cuda_rngs = gather_objects(torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    if rank == 0:
        save_model(model, cfg.out_dir, tokenizer)
        torch.save({"step": run.step, "examples_seen": run.examples_seen, "loss_history": run.loss_history,
                    "optimizer": optimizer.state_dict(), "global_batch": global_batch(cfg, world),
                    "world_size": world, "rng": rngs, "cuda_rng": cuda_rngs}, Path(cfg.out_dir) / "trainer_state.pt")
    if dist.is_initialized():
        dist.barrier()  # the checkpoint is complete before any process goes on


def restore(model, optimizer, cfg: TrainConfig, rank: int, world: int) -> tuple[RunState, TrainConfig]:
    """Load a checkpoint written by save_checkpoint into `model` and `optimizer`. The global batch is
    the run's: grad_accum is recomputed for this number of processes, so a run continues the same
    schedule on more or fewer of them. Each process gets its RNG state back when the number of
    processes is unchanged; otherwise dropout is reseeded (seed, step, rank), as no old stream fits."""
    state_file = Path(cfg.resume) / "trainer_state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: --resume needs a directory written by train.py")
    model.load_state_dict(load_model(cfg.resume, device=model.shared.weight.device, with_tokenizer=False)[0]
                          .state_dict())
    saved = torch.load(state_file, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    run = RunState(saved["step"], saved["examples_seen"], list(saved["loss_history"]))
    G, per_micro_step = saved.get("global_batch", global_batch(cfg, world)), world * cfg.batch_size
    if G % per_micro_step:
        raise ValueError(f"--resume {cfg.resume}: its global batch of {G} examples is not a multiple of "
                         f"{world} process(es) x --batch-size {cfg.batch_size}")
    cfg = replace(cfg, grad_accum=G // per_micro_step)
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one tensor: an older file
    cuda_rngs = saved.get("cuda_rng") if isinstance(saved["rng"], list) else None
    if len(rngs) == world:
        torch.set_rng_state(rngs[rank])
        if cuda_rngs and cuda_rngs[rank] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rngs[rank])
    else:
        torch.manual_seed(cfg.seed * 1_000_003 + run.step * 1009 + rank)
    return run, cfg


def read_data(data, cfg: TrainConfig):
    if isinstance(data, (str, Path)):
        data = read_documents(data) if cfg.objective == "gsg" else read_jsonl(data, ("text", "summary"))
    eval_data = cfg.eval_data
    return data, read_jsonl(eval_data, ("text", "summary")) if isinstance(eval_data, (str, Path)) else eval_data


def train(model, tokenizer, data, config: TrainConfig | None = None, **overrides) -> list[float]:
    """Train `model` in place; returns the loss of every optimizer step (steps before a resume included).

    data: "summarize": a .jsonl path with "text"/"summary" fields or a list of (text, summary) pairs;
    "gsg": a path (see read_documents) or a list of documents, made into GSG examples on the fly.
    config: a TrainConfig (default: the defaults); keyword overrides replace its fields, so
    train(model, tok, pairs, steps=80, lr=1e-3) works too. Under torchrun (an initialised process
    group) each process trains its share of every global batch and process 0 logs, evaluates and saves.
    """
    cfg = replace(config or TrainConfig(), **overrides)
    if cfg.objective not in ("summarize", "gsg"):
        raise ValueError(f"objective must be 'summarize' or 'gsg', got {cfg.objective!r}")
    rank, world = rank_and_world()
    data, eval_pairs = read_data(data, cfg)
    cfg = resolve(cfg, model, tokenizer, data)
    device = model.shared.weight.device
    optimizer = torch.optim.Adafactor(model.parameters(), lr=cfg.lr)
    torch.manual_seed(cfg.seed + rank)  # dropout differs across processes, as their data does
    run = RunState()
    if cfg.resume is not None:
        run, cfg = restore(model, optimizer, cfg, rank, world)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.train()
    net = WithLoss(model, cfg.label_smoothing)
    if dist.is_initialized():  # starts by copying process 0's weights (and buffers) to all
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    stream = ExampleStream(data, cfg)
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not cfg.progress or rank != 0, desc=cfg.objective,
               dynamic_ncols=True)
    while run.step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run.step, cfg.lr, cfg.warmup_steps)
        batches = my_micro_batches(stream, run.examples_seen, cfg, rank)
        run.loss_history.append(train_step(net, optimizer, batches, tokenizer, cfg, device))
        run.step, run.examples_seen = run.step + 1, run.examples_seen + global_batch(cfg, world)
        recent = run.loss_history[-20:]  # the running loss: mean of the last 20 steps
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
        last = run.step == cfg.steps
        if rank == 0 and eval_pairs and ((cfg.eval_every and run.step % cfg.eval_every == 0) or last):
            scores = evaluate(model, tokenizer, eval_pairs, cfg.max_source_len, cfg.max_target_len, cfg.batch_size)
            tqdm.write(f"step {run.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        if cfg.out_dir is not None and ((cfg.save_every and run.step % cfg.save_every == 0) or last):
            save_checkpoint(model, tokenizer, optimizer, run, cfg, rank, world)
    bar.close()
    return run.loss_history


# ----------------------------------------------------------------------------- command line


def field_comments(cls) -> dict[str, str]:
    """{field: its end-of-line comment} read from the class source: the comments are the --help text."""
    try:
        source = inspect.getsource(cls)
    except OSError:  # no source file (frozen app): flags without help
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE))


FLAG_ALIASES = {"out_dir": ["--out"]}


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig):
    """One flag per field of `cls` (--batch-size for batch_size): its type, choices (Literal) and
    default from the field, its help from the field's comment. Booleans get --flag / --no-flag."""
    comments = field_comments(cls)
    group = parser.add_argument_group("training options (TrainConfig)")
    for f in fields(cls):
        kind, choices = f.type, None
        if get_origin(kind) is Literal:
            choices = get_args(kind)
            kind = type(choices[0])
        elif get_origin(kind) is UnionType:  # X | None
            kind = next(a for a in get_args(kind) if a is not type(None))
        flags = [f"--{f.name.replace('_', '-')}"] + FLAG_ALIASES.get(f.name, [])
        help = f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            group.add_argument(*flags, type=kind, choices=choices, default=f.default, help=help)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory or hub id to fine-tune / continue pre-training")
    p.add_argument("--init-config", help="random init: published name, config.json, or JSON object of fields")
    p.add_argument("--tokenizer", help="spiece.model or checkpoint directory (required with --init-config)")
    p.add_argument("--data", required=True, help="summarize: .jsonl with text/summary; gsg: .txt or .jsonl")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun, cuda means the GPU of the process's local rank")
    add_config_flags(p)
    args = p.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if sum(x is not None for x in (args.model, args.init_config, config.resume)) != 1:
        p.error("give one of --model, --init-config or --resume")
    config = replace(config, out_dir=config.out_dir or config.resume)
    if config.out_dir is None:
        p.error("--out is required (unless --resume gives the directory)")
    if args.init_config and not args.tokenizer:
        p.error("--init-config needs --tokenizer (a spiece.model file or checkpoint directory)")
    rank, _, _, device = setup_distributed(args.device)
    try:
        if args.init_config:
            torch.manual_seed(config.seed)  # the same initial weights on every process (DDP copies rank 0's too)
            model = init_model(args.init_config).to(device)
            tok = Path(args.tokenizer)
            tokenizer = PegasusTokenizer.from_pretrained(tok) if tok.is_dir() else PegasusTokenizer.from_spiece(tok)
        else:
            model, tokenizer = load_model(args.model or config.resume, device=device)
        history = train(model, tokenizer, args.data, config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"step {len(history)}: loss {history[-1]:.4f}; checkpoint in {config.out_dir}")


if __name__ == "__main__":
    main()
