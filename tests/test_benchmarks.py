"""benchmarks/speed.py's verdict lines: the issue's targets, judged from one run's medians."""

from benchmarks.speed import target_lines


def test_each_target_is_judged_from_its_two_implementations():
    """Time against CTranslate2 at the same precision, memory against float32 + oneDNN (the CLI's float32
    path); a target whose implementations did not both run (here bfloat16) gets no line."""
    medians = {"ours+int8": {"seconds": 2.0, "peak_rss": 900}, "ctranslate2-int8": {"seconds": 3.0, "peak_rss": 2400},
               "ours+onednn": {"seconds": 5.5, "peak_rss": 2600}, "ctranslate2": {"seconds": 5.0, "peak_rss": 2500}}
    assert target_lines(medians) == [
        "target: ours+int8 / ctranslate2-int8 time 0.67, at most 0.80: met",
        "target: ours+onednn / ctranslate2 time 1.10, at most 1.00: NOT met",
        "target: ours+int8 / ours+onednn peak RSS 0.35, at most 0.33: NOT met",
    ]
    assert target_lines({"ours+bf16": {"seconds": 1.0, "peak_rss": 1500}}) == []
