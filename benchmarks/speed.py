"""Decoding speed: this project's generate() against transformers' generate() (and CTranslate2 if
it is installed), on randomly initialised models of a published shape and one real news article.
"ours" is generate() as the tests check it; "ours+onednn" adds onednn.use_onednn (the matmuls
through oneDNN with pre-converted weights) and the screened greedy argmax (see common.load_ours): the
CLI's float32 path; "ours+int8" is --quantize int8. CTranslate2 runs in float32 and int8
(compute_type="int8"); "vs CT2" compares each of ours with CTranslate2 at the same precision.

    python -m benchmarks.speed                    # google/pegasus-xsum shape, all cases
    python -m benchmarks.speed --cases beam8_b1 --threads 2
    python -m benchmarks.speed --rounds 3         # every implementation 3 times, round-robin; medians
    python -m benchmarks.speed --long 4096 16384  # PEGASUS-X long inputs (benchmarks/long_inputs.py)
    python -m benchmarks.speed --first-summary    # also load + first summary, whole process (first_summary.py)

Every implementation runs each case in a fresh process, so that its peak resident memory
(ru_maxrss) is its own, on the same weights (written once to a temporary checkpoint), the same
input and the same settings. The output length is forced (min = max = 64 new tokens): random
weights decode a repeated token, which is fine for timing. Output ids must equal the reference's.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import IMPLS, build_checkpoint, huge_pages, load_ours, peak_rss, serve, spawn, verdict

CASES = {"beam8_b1": (8, 1), "greedy_b1": (1, 1), "beam8_b4": (8, 4)}  # name -> (num_beams, batch size)
NEW_TOKENS = 64

# About 510 PEGASUS tokens of invented, news-like English (written for this benchmark).
ARTICLE = """The city of Harrowgate will close its oldest bridge to cars next spring after engineers found that \
the steel supports beneath the roadway had corroded far more quickly than expected, council officials said on \
Tuesday. The Marlow Street Bridge, which opened in 1931 and carries about 18,000 vehicles a day across the River \
Esk, will remain open to pedestrians and cyclists while a replacement is designed and built, a process that could \
take up to four years. "We did not take this decision lightly," said Deputy Mayor Alison Crane, who chairs the \
council's transport committee. "The inspection results left us with no responsible alternative. Public safety has \
to come first, even when the consequences for traffic are painful." The inspection, carried out over six weeks in \
the autumn by an independent firm, used ultrasound to measure the thickness of the bridge's main girders. In \
several places the metal had lost more than a third of its original depth, largely because road salt spread during \
winter had seeped through cracks in the deck above. Local businesses on both sides of the river reacted with \
dismay. Priya Raman, who runs a bakery on Marlow Street, said that about half of her morning customers drove across \
the bridge on their way to work. "If they have to go around by the ring road, they will simply stop coming," she \
said. "Nobody is going to add twenty minutes to their commute for a croissant." The council has promised a package \
of measures to limit the disruption, including extra bus services, longer green phases at traffic lights on the \
two alternative crossings and a temporary ferry for commuters during the morning and evening peaks. It will also \
set aside a fund of 1.2 million pounds to support shops that can show a significant drop in trade. Transport \
campaigners welcomed the emphasis on buses and cycling but warned that the detours would push more traffic onto \
residential streets. "The ring road is already at capacity at rush hour," said Tom Ellery of the Harrowgate Streets \
Alliance. "Without firm limits on through traffic in the side streets, we will see rat-running outside schools." \
Engineers have not yet decided whether the new bridge will follow the line of the old one or be built a short \
distance downstream, which would allow the existing structure to stay open to walkers during construction. A \
public consultation on the options will open in March, and residents will be invited to a series of meetings at \
the town hall. Officials said the total cost of the replacement was likely to exceed 40 million pounds, and \
that they would apply to the national government for help with the bill."""


def documents(tokenizer, batch: int) -> list[list[int]]:
    """The article, then shorter cuts of it (so a batch has padding)."""
    fallback = lambda: torch.randint(200, 20000, (505,), generator=torch.Generator().manual_seed(0)).tolist() + [1]
    ids = tokenizer.encode(ARTICLE) if tokenizer is not None else fallback()
    return [ids[: len(ids) - 64 * i - 1] + [1] for i in range(batch)]


def penalty(ckpt: Path) -> float:
    return json.loads((ckpt / "generation_config.json").read_text()).get("length_penalty", 1.0)


def worker(impl: str, ckpt: str, case: str, threads: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Runs in its own process (common.spawn): load, warm up on a short input, then time one generate()."""
    torch.set_num_threads(threads)
    ckpt = Path(ckpt)
    num_beams, batch = CASES[case]
    from tokenizer import PegasusTokenizer
    tok = PegasusTokenizer.from_pretrained(ckpt) if (ckpt / "spiece.model").exists() else None
    rows = documents(tok, batch)
    if impl.startswith("ctranslate2"):  # "ctranslate2" (float32) or "ctranslate2-int8"
        return ctranslate2_worker(ckpt, rows, num_beams, new_tokens, "int8" if impl.endswith("int8") else "float32")
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (B, S) right-padded
    mask = (torch.arange(width)[None, :] < torch.tensor([[len(r)] for r in rows])).long()  # (B, S)
    if impl in IMPLS:
        from decoding import generate
        model, argmax = load_ours(impl, ckpt, step_rows=batch * num_beams)  # as the CLI packs for this job
        run = lambda i, m, **kw: generate(model, i, m, argmax=argmax, **kw)
    else:
        import transformers
        model = transformers.PegasusForConditionalGeneration.from_pretrained(ckpt).eval()
        run = lambda i, m, **kw: model.generate(i, attention_mask=m, **kw)
    with torch.inference_mode():
        run(ids[:, :16], mask[:, :16], num_beams=num_beams, max_new_tokens=2)  # warm-up: lazy initialisation
        start = time.perf_counter()
        out = run(ids, mask, num_beams=num_beams, length_penalty=penalty(ckpt), min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "ids": out.tolist(), "peak_rss": peak_rss()}


def ctranslate2_worker(ckpt: Path, rows: list[list[int]], num_beams: int, new_tokens: int, compute_type: str) -> dict:
    """CTranslate2 has no forced EOS: it decodes new_tokens - 1 tokens, and the EOS that the others
    are forced to write last is added for the comparison. compute_type "int8" quantizes the float32
    model's weights when loading it (int8 weights, per output channel; its own int8 GEMM kernels)."""
    import ctranslate2
    out = ckpt.with_name(ckpt.name + "-ctranslate2")
    if not out.exists():  # its converter reads config keys that transformers 5 no longer writes
        src = ckpt.with_name(ckpt.name + "-ct2-source")
        src.mkdir()
        for f in ckpt.iterdir():
            (src / f.name).symlink_to(f)
        config = json.loads((ckpt / "config.json").read_text()) | {
            "normalize_before": True, "add_final_layer_norm": True, "normalize_embedding": False,
            "static_position_embeddings": True}
        (src / "config.json").unlink()
        (src / "config.json").write_text(json.dumps(config))
        ctranslate2.converters.TransformersConverter(str(src)).convert(str(out))
    vocab = json.loads((out / "shared_vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(vocab)}
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type=compute_type,
                                        intra_threads=torch.get_num_threads())
    tokens = [[vocab[i] for i in row] for row in rows]
    translator.translate_batch([t[:16] for t in tokens], beam_size=num_beams, max_decoding_length=2)  # warm-up
    start = time.perf_counter()
    results = translator.translate_batch(tokens, beam_size=num_beams, length_penalty=penalty(ckpt),
                                         max_decoding_length=new_tokens - 1, min_decoding_length=new_tokens - 1)
    seconds = time.perf_counter() - start
    ids = [[0] + [index[t] for t in r.hypotheses[0]] + [1] for r in results]
    return {"seconds": seconds, "ids": ids, "peak_rss": peak_rss()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="google/pegasus-xsum", help="published shape to build (random weights)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    p.add_argument("--checkpoint", help="reuse a checkpoint directory instead of building one (random weights)")
    p.add_argument("--rounds", type=int, default=1, help="run every implementation this many times; report medians")
    p.add_argument("--long", type=int, nargs="+", metavar="TOKENS",
                   help="long-input mode: google/pegasus-x-base shape at these input lengths (long_inputs.py)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens decoded per text (%(default)s)")
    p.add_argument("--impls", nargs="+", choices=["transformers", *IMPLS, *CT2_IMPLS],
                   help="implementations to run (default: all; the ratios need transformers and CTranslate2)")
    p.add_argument("--first-summary", action="store_true",
                   help="also time the first summary (whole process: the CLI vs transformers; first_summary.py)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; {args.threads} threads; {huge_pages()}; load average before: {load_average()}")
    if args.long:
        from benchmarks.long_inputs import bench_long
        torch.set_num_threads(args.threads)
        bench_long(args.long, checkpoint=args.checkpoint)
        return
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    impls = ["transformers", *IMPLS]
    try:
        import ctranslate2  # noqa: F401
        impls += CT2_IMPLS
    except ImportError:
        print("note: CTranslate2 is not installed (pip install ctranslate2); skipping it")
    impls = [i for i in impls if i in (args.impls or impls)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.model, Path(tmp) / "model") if not args.checkpoint else Path(args.checkpoint)
        print(f"{args.model} shape, random weights, {args.threads} threads, {args.new_tokens} new tokens forced"
              + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""))
        print(f"{'case':<10} {'implementation':<17} {'seconds':>8} {'tokens/s':>9} {'peak RSS':>9} {'vs ref':>7} "
              f"{'vs CT2':>7}  ids")
        for case in cases:
            runs = {impl: [] for impl in impls}
            for _ in range(args.rounds):  # round-robin, so that a slow spell of the machine hits every implementation
                for impl in impls:
                    try:
                        runs[impl].append(spawn("speed", impl=impl, ckpt=str(ckpt), case=case, threads=args.threads,
                                                new_tokens=args.new_tokens))
                    except RuntimeError as e:
                        print(f"{case:<10} {impl:<17} failed: {e}")
            ref = median(runs.get("transformers", []))
            for impl in [i for i in impls if runs[i]]:
                res = median(runs[impl])
                n_tokens = sum(len(row) - 1 for row in res["ids"])  # generated, over the batch
                ratio = f"{res['seconds'] / ref['seconds']:6.2f}x" if ref else "   n/a"
                ct2 = median(runs.get(CT2_PEER.get(impl), []))  # CTranslate2 at the same precision
                vs_ct2 = f"{res['seconds'] / ct2['seconds']:6.2f}x" if ct2 else "      "
                # int8 changes the numbers, so its ids may differ from float32's (quality: README, tests)
                same = "n/a" if ref is None else "same" if all(x["ids"] == ref["ids"] for x in runs[impl]) \
                    else "DIFFERENT"
                print(f"{case:<10} {impl:<17} {res['seconds']:8.2f} {n_tokens / res['seconds']:9.1f} "
                      f"{res['peak_rss'] / 2**20:7.2f} G {ratio} {vs_ct2}  {same}")
            for line in target_lines({impl: median(runs[impl]) for impl in impls if runs[impl]}):
                print(f"{case:<10} {line}")
        if args.first_summary:
            from benchmarks.first_summary import bench_first_summary
            bench_first_summary(ckpt, args.threads, args.rounds)
    print(f"load average after: {load_average()}")


# ours vs CTranslate2 at the same precision: the "vs CT2" column. CTranslate2 has no bfloat16 on
# CPU (get_supported_compute_types("cpu"): int8, int8_float32, float32), so bfloat16 is set against its float32.
CT2_IMPLS = ["ctranslate2", "ctranslate2-int8"]
CT2_PEER = {"ours": "ctranslate2", "ours+onednn": "ctranslate2", "ours+int8": "ctranslate2-int8",
            "ours+bf16": "ctranslate2"}


# The targets for each case: (ours, against, what is compared, at most).
TARGETS = [("ours+int8", "ctranslate2-int8", "seconds", 0.8), ("ours+onednn", "ctranslate2", "seconds", 1.0),
           ("ours+int8", "ours+onednn", "peak_rss", 1 / 3), ("ours+bf16", "ours+onednn", "peak_rss", 0.6)]


def target_lines(results: dict[str, dict]) -> list[str]:
    """One line for each target whose two implementations ran (results: implementation -> its median
    run): the ratio, the bound and whether the ratio is within it."""
    lines = []
    for ours, other, measure, bound in TARGETS:
        if results.get(ours) and results.get(other):
            ratio = results[ours][measure] / results[other][measure]
            what = "time" if measure == "seconds" else "peak RSS"
            lines.append(f"target: {ours} / {other} {what} {ratio:.2f}, {verdict(ratio, bound)}")
    return lines


def cpu_model() -> str:
    """The CPU's name and the instruction sets that decide which kernels run (Linux's /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f" {f}" in info]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def load_average() -> str:
    import os
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(runs: list[dict]) -> dict | None:
    """The run with the median time (the upper one of an even count), with the highest peak RSS of all."""
    if not runs:
        return None
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] | {"peak_rss": max(r["peak_rss"] for r in runs)}


if __name__ == "__main__":
    serve(worker)
    main()
