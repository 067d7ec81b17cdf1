"""``nvfp4-convert preflight``: ask the vLLM installed here whether it computes our format correctly.

- ``tiny_model``  a tiny random DeepSeek-V4 in ModelOpt's NVFP4 export format (``cpu`` and ``gpu`` sizes), and
                  a random MTP block for it in DeepSeek's release format (``--mtp``)
- ``reference``   transformers' float32 model on the dequantized source, the agreement score, and the exact
                  comparison of greedy tokens with and without MTP speculative decoding
- ``faults``      planted faults, so that a FAIL can be seen
- ``worker``      runs stock vLLM in its own process (any interpreter; imports nothing of ours), with or without
                  speculative decoding
- ``cpu_shims``   the three shims vLLM's CPU build needs on CI's CPUs (never used on CUDA)
- ``check``       the whole check in order: probe, build, convert, run vLLM, score, verdict
"""
