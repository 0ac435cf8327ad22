"""Speed and memory benchmarks against the reference library (and CTranslate2 where installed).

    python -m benchmarks.speed                    # decoding speed at the google/pegasus-xsum shape
    python -m benchmarks.long_inputs              # PEGASUS-X at 4,096 and 16,384 input tokens

common.py holds what both share: the random-weight checkpoint builder, the loader of this project's
two variants ("ours", "ours+onednn"), and the worker protocol (every measurement runs in a fresh
process, so that its peak memory is its own).
"""
