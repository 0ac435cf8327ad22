"""Pre-train PEGASUS with gap-sentence generation, or fine-tune it on (text, summary) pairs.

PEGASUS (Zhang et al. 2020, https://arxiv.org/abs/1912.08777) is pre-trained on plain documents
with a task shaped like summarisation, Gap Sentences Generation (GSG, section 3.1): remove whole
sentences, put a <mask_1> where each was, and train the model to write the removed sentences.
Small pure functions build such examples; one loop does GSG pre-training and fine-tuning alike:

    python train.py --model google/pegasus-large --data train.jsonl --eval-data val.jsonl --out runs/ft
    python train.py --init-config '{"d_model": 64, "encoder_layers": 2, "decoder_layers": 2}' \\
        --tokenizer ../shared/pegasus/spiece.model --objective gsg --data corpus.txt --out runs/tiny
    python train.py --resume runs/ft --data train.jsonl --steps 2000    # continue to step 2000

Checkpoints are in the Hugging Face layout (load_weights.save_model: they load here and in
transformers) plus `trainer_state.pt` (step, optimizer state, RNG, loss history) for --resume.
"""

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import pegasus
from data import read_documents, read_jsonl
from load_weights import load_model, model_class, save_model
from tokenizer import PegasusTokenizer

MASK_SENTENCE, MASK_WORD = "<mask_1>", "<mask_2>"  # ids 2 and 3 (tokenizer.py)
STRATEGIES = ("ind-orig", "ind-uniq", "seq-orig", "seq-uniq", "lead", "random")

# ----------------------------------------------------------------------------- gap sentences (section 3.1)


def split_sentences(text: str) -> list[str]:
    """Cut after runs of . ! ? followed by whitespace, as the original (SentenceSegment in
    pegasus/ops/parsing_utils.cc): crude, "e.g. x" splits. Whitespace is ASCII only, as std::regex's
    \\s on bytes is (Python's \\s would also cut at a no-break space)."""
    return [s for s in re.split(r"(?<=[.!?])[ \t\n\v\f\r]+", text.strip(" \t\n\v\f\r")) if s]


def rouge_tokens(text: str) -> Counter:
    """ROUGE-1 counts as the original makes them (PrecomputeSentenceData, pegasus/ops/rouge.cc): ASCII
    letters lowercased, runs of a-z and 0-9 are words, everything else (any non-ASCII too) separates."""
    return Counter(w.lower() for w in re.findall(r"[A-Za-z0-9]+", text))


def rouge1_f1(a_tokens, b_tokens, unique: bool = False) -> float:
    """ROUGE-1 F1 of two token lists (or Counters), symmetric, with the original's arithmetic
    (ComputeRougeFromCandidateCounts in pegasus/ops/rouge.cc). The paper's "Orig" counts repeated words
    as often as they occur (clipped overlap, the "standard" option); "Uniq" counts each distinct word
    once (the "deduplicate" option).

    Why float32, step by step: the overlap o is an exact count; precision and recall are o/|a| and
    o/|b| divided in double and rounded to float32; F1 = (2*p*r)/(p+r) is then computed in float32.
    Exact ties are common (within a document, F1 = 2o/(|s| + |rest|) = 2o/|document| for Ind), and
    the same fraction reached from different sentence lengths can round to different floats, in
    float32 as in float64, but not to the same ones: 4/42 from 4 + 38 words and from 5 + 37 is one
    float32 (so the tie rule picks the later sentence) but two float64s (0.09523809523809525 and
    ...523, so float64 would pick the earlier). The original's choices are what its float32 gives,
    the tie rule deciding where the floats are equal; only the same arithmetic reproduces them.
    (Returned as a Python float holding the float32 value.)
    """
    a, b = +Counter(a_tokens), +Counter(b_tokens)  # unary + drops zero counts left by subtraction
    if unique:
        a, b = Counter(a.keys()), Counter(b.keys())
    overlap = sum((a & b).values())
    if overlap == 0:
        return 0.0
    f32 = np.float32
    precision, recall = f32(overlap / sum(a.values())), f32(overlap / sum(b.values()))  # double /, then float
    return float(f32(2) * precision * recall / (precision + recall))  # all float32 from here


def num_gap_sentences(n: int, ratio: float) -> int:
    """How many of n sentences to mask: the gap sentences ratio (GSR) times n, rounded down, at least
    one and at most n, as in the original code (GetNumMaskedSentences in sentence_selection.cc).
    The 1e-9 stops float error from losing a sentence: 0.7 * 90 is 62.99999999999999 in floats."""
    return min(n, max(1, int(n * ratio + 1e-9)))


def select_gap_sentences(sentences: list[str], ratio: float = 0.3, strategy: str = "ind-orig",
                         seed: int | None = None) -> list[int]:
    """Indices (sorted) of the sentences to mask. Strategies of section 3.1:

      lead      the first m sentences;       random   m sentences uniformly at random (`seed`);
      ind-*     "Principal", scored independently: ROUGE-1 F1 of each sentence vs the rest, top m;
      seq-*     "Principal", selected sequentially (Algorithm 1): greedily add the sentence that
                maximises ROUGE-1 F1 between the selected set and the remaining sentences;
      *-orig / *-uniq   n-grams counted with repeats / as a set.

    The ablations (section 6.1, figure 4) found Ind-Orig best and gap sentences ratios below 50% best;
    the paper uses 30%, the default. The released "Mixed & Stochastic" checkpoints draw the ratio from
    15-45% per document and add 20% noise to the scores (the authors' README; pegasus_params.py).

    Scores and ties are the original's (rouge1_f1; tests/test_gsg_ties.py checks them against a
    transcription of the C++). Not reproduced: for seq-*, the original first keeps only the first
    max(max_input_len / 20, max_target_len / ratio / 20) sentences (MaxNumSentences in
    pretrain_parsing_ops.cc; 42 at 512/256 tokens and GSR 0.3), still scoring against the whole text.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"gap sentences ratio must be in (0, 1], got {ratio}")
    n = len(sentences)
    m = num_gap_sentences(n, ratio)
    if strategy == "lead":
        return list(range(m))
    if strategy == "random":
        return sorted(random.Random(seed).sample(range(n), m))
    unique = strategy.endswith("uniq")
    counts = [rouge_tokens(s) for s in sentences]
    total = sum(counts, Counter())  # the whole document's words: the sentences cover them all
    if strategy.startswith("ind"):
        # GetSentenceIndicesByRouge (pegasus/ops/sentence_selection.cc): each sentence scored against
        # the rest of the document, pairs (score, index) sorted with std::greater, so on equal
        # (float32) scores the LATER sentence ranks first; the top m are taken.
        scores = [rouge1_f1(c, total - c, unique) for c in counts]
        ranked = sorted(range(n), key=lambda i: (scores[i], i), reverse=True)
        return sorted(ranked[:m])
    # GetSentenceIndicesByGreedyRouge: each round scans the unselected sentences in order and keeps
    # the one maximising F1(selected + s, remaining - s), replacing the best on `score >= best`, so
    # again the LAST of equal scores wins.
    chosen, selected = [], Counter()
    for _ in range(m):
        best, best_score = -1, -1.0
        for i in range(n):
            if i in chosen:
                continue
            score = rouge1_f1(selected + counts[i], total - selected - counts[i], unique)
            if score >= best_score:
                best, best_score = i, score
        chosen.append(best)
        selected += counts[best]
    return sorted(chosen)


def make_gsg_example(text: str, ratio: float = 0.3, strategy: str = "ind-orig", mlm_prob: float = 0.0,
                     seed: int | None = None) -> tuple[str, str]:
    """One pre-training pair from a document: source = the document with each selected sentence
    replaced by <mask_1>; target = the selected sentences in document order, joined by spaces.

    mlm_prob > 0 adds the paper's masked-language-model noise (section 3.2, as in BERT) to the
    sentences left in the source: that fraction of their words (at least one) is picked, and each
    becomes <mask_2> with probability 0.8, a random word of the document with 0.1 (the original draws
    a vocabulary piece) or stays with 0.1. Whitespace words are masked whole, as the original's
    whole-word masking does. The paper's encoder-side loss on those words is not implemented, so here
    MLM only makes GSG harder; the paper found MLM stops helping with long pre-training (section
    6.1.2) and left it out of PEGASUS-large (section 6.2), hence the default 0.
    """
    if not 0.0 <= mlm_prob < 1.0:
        raise ValueError(f"mlm_prob must be in [0, 1), got {mlm_prob}")
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError("the document has no sentences (empty text)")
    chosen = set(select_gap_sentences(sentences, ratio, strategy, seed))
    pieces = [s.split() for s in sentences]
    if mlm_prob > 0:
        rng = random.Random(seed)
        slots = [(i, j) for i, ws in enumerate(pieces) if i not in chosen for j in range(len(ws))]
        vocabulary = [w for ws in pieces for w in ws]
        for i, j in rng.sample(slots, max(1, int(len(slots) * mlm_prob)) if slots else 0):
            u = rng.random()
            if u < 0.8:
                pieces[i][j] = MASK_WORD
            elif u < 0.9:
                pieces[i][j] = rng.choice(vocabulary)
    source = " ".join(MASK_SENTENCE if i in chosen else " ".join(ws) for i, ws in enumerate(pieces))
    target = " ".join(sentences[i] for i in sorted(chosen))
    return source, target


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


# ----------------------------------------------------------------------------- training


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

    from generate import generate
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


def train(model, tokenizer, data, *, out_dir=None, objective: str = "summarize", eval_data=None,
          steps: int = 1000, batch_size: int = 8, grad_accum: int = 1, lr: float | None = None,
          warmup_steps: int = 0, label_smoothing: float | None = None, max_source_len: int = 512,
          max_target_len: int = 128, eval_every: int = 0, save_every: int = 0, gsg_ratio: float = 0.3,
          gsg_strategy: str = "ind-orig", mlm_prob: float = 0.0, seed: int = 0, resume=None,
          progress: bool = True) -> list[float]:
    """Train `model` in place; returns the loss of every optimizer step (steps before a resume included).

    data: "summarize": a .jsonl path with "text"/"summary" fields or a list of (text, summary) pairs;
    "gsg": a path (see read_documents) or a list of documents, made into GSG examples on the fly.
    steps counts all optimizer steps, resumed ones too; each sees batch_size * grad_accum examples.
    lr / label_smoothing default to the original recipes: 1e-3 and 0.1 fine-tuning (public_params.py),
    0.01 and 0.0 pre-training (pegasus_params.py). resume: a checkpoint directory written here; its
    weights, optimizer state, step, data position and RNG are restored, as if the run never stopped.
    Checkpoints go to out_dir every save_every steps and at the end (the latest overwrites).
    """
    if objective not in ("summarize", "gsg"):
        raise ValueError(f"objective must be 'summarize' or 'gsg', got {objective!r}")
    if isinstance(data, (str, Path)):
        data = read_documents(data) if objective == "gsg" else read_jsonl(data, ("text", "summary"))
    if not data or min(steps, batch_size, grad_accum) < 1:
        raise ValueError("need training examples, and steps, batch_size, grad_accum >= 1")
    eval_pairs = read_jsonl(eval_data, ("text", "summary")) if isinstance(eval_data, (str, Path)) else eval_data
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the model only {model.config.vocab_size}")
    gsg = objective == "gsg"
    lr = lr if lr is not None else (1e-2 if gsg else 1e-3)
    label_smoothing = label_smoothing if label_smoothing is not None else (0.0 if gsg else 0.1)
    max_source_len = min(max_source_len, model.config.max_position_embeddings)
    max_target_len = min(max_target_len, model.config.max_position_embeddings)
    device = model.shared.weight.device

    optimizer = torch.optim.Adafactor(model.parameters(), lr=lr)
    step, seen, history = 0, 0, []
    torch.manual_seed(seed)
    if resume is not None:
        state_file = Path(resume) / "trainer_state.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} not found: --resume needs a directory written by train.py")
        model.load_state_dict(load_model(resume, device=device, with_tokenizer=False)[0].state_dict())
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step, seen, history = state["step"], state["examples_seen"], list(state["loss_history"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # The example at stream position p: epoch p // N of a seeded shuffle, so any position (and thus a
    # resumed run) is reproducible without replaying the stream.
    @lru_cache(maxsize=2)
    def order(epoch: int) -> list[int]:
        return random.Random(seed * 1_000_003 + epoch).sample(range(len(data)), len(data))

    def example(p: int) -> tuple[str, str]:
        item = data[order(p // len(data))[p % len(data)]]
        if not gsg:
            return item
        # Only the first max_source_len words can fit in the input (a word is at least one token): pick
        # gap sentences among those, as the original's max_total_words cut does (and Seq stays cheap).
        doc = " ".join(item.split()[:max_source_len])
        return make_gsg_example(doc, gsg_ratio, gsg_strategy, mlm_prob, seed=seed * 1_000_000_007 + p)

    def save():
        save_model(model, out_dir, tokenizer)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.save({"step": step, "examples_seen": seen, "loss_history": history, "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "cuda_rng": cuda_rng}, Path(out_dir) / "trainer_state.pt")

    model.train()
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=objective, dynamic_ncols=True)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr, warmup_steps)
        step_loss = 0.0
        for _ in range(grad_accum):  # gradients add up over micro-batches; each loss is a token mean
            sources, targets = zip(*[example(seen + i) for i in range(batch_size)])
            seen += batch_size
            input_ids, attention_mask = tokenizer.batch_encode(list(sources), max_source_len)
            labels, label_mask = tokenizer.batch_encode(list(targets), max_target_len)
            labels = labels.masked_fill(label_mask == 0, -100)  # padding is not predicted
            loss = model.loss(input_ids.to(device), attention_mask.to(device), labels.to(device), label_smoothing)
            (loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
        optimizer.step()  # Adafactor clips its own updates (threshold 1.0), so no gradient clipping
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(step_loss)
        recent = history[-20:]  # the running loss: mean of the last 20 steps
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
        if eval_pairs and ((eval_every and step % eval_every == 0) or step == steps):
            scores = evaluate(model, tokenizer, eval_pairs, max_source_len, max_target_len, batch_size)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        if out_dir is not None and ((save_every and step % save_every == 0) or step == steps):
            save()
    bar.close()
    return history


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="checkpoint directory or hub id to fine-tune / continue pre-training")
    start.add_argument("--init-config", help="random init: published name, config.json, or JSON object of fields")
    start.add_argument("--resume", help="checkpoint directory written by train.py: continue that run")
    p.add_argument("--tokenizer", help="spiece.model or checkpoint directory (required with --init-config)")
    p.add_argument("--data", required=True, help="summarize: .jsonl with text/summary; gsg: .txt or .jsonl")
    p.add_argument("--objective", choices=["summarize", "gsg"], default="summarize")
    p.add_argument("--eval-data", help=".jsonl with text/summary, scored with ROUGE")
    p.add_argument("--out", help="checkpoint directory (default: the --resume directory)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps, including resumed ones")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="Adafactor relative step (default 1e-3 summarize, 1e-2 gsg)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, help="default 0.1 summarize, 0.0 gsg")
    p.add_argument("--max-source-len", type=int, default=512)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--gsg-ratio", type=float, default=0.3)
    p.add_argument("--gsg-strategy", choices=STRATEGIES, default="ind-orig")
    p.add_argument("--mlm-prob", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = args.out or args.resume
    if out is None:
        p.error("--out is required (unless --resume gives the directory)")
    if args.init_config and not args.tokenizer:
        p.error("--init-config needs --tokenizer (a spiece.model file or checkpoint directory)")
    try:
        if args.init_config:
            torch.manual_seed(args.seed)
            model = init_model(args.init_config).to(args.device)
            tok = Path(args.tokenizer)
            tokenizer = PegasusTokenizer.from_pretrained(tok) if tok.is_dir() else PegasusTokenizer.from_spiece(tok)
        else:
            model, tokenizer = load_model(args.model or args.resume, device=args.device)
        history = train(model, tokenizer, args.data, out_dir=out, objective=args.objective, eval_data=args.eval_data,
                        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        warmup_steps=args.warmup_steps, label_smoothing=args.label_smoothing,
                        max_source_len=args.max_source_len, max_target_len=args.max_target_len,
                        eval_every=args.eval_every, save_every=args.save_every, gsg_ratio=args.gsg_ratio,
                        gsg_strategy=args.gsg_strategy, mlm_prob=args.mlm_prob, seed=args.seed, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
    print(f"step {len(history)}: loss {history[-1]:.4f}; checkpoint in {out}")


if __name__ == "__main__":
    main()
