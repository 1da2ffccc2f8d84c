"""Long Range Arena's published numbers (Tay et al. 2020, arXiv:2011.04006, ICLR 2021).

Table 2 (training steps/s and peak memory at 1K-4K tokens), Table 1's
ListOps column, and which LRA model each of our methods implements.
"""

from __future__ import annotations

SOURCE = (
    "Tay et al. 2020, Long Range Arena: A Benchmark for Efficient Transformers "
    "(arXiv:2011.04006, ICLR 2021)"
)
#: our method -> the LRA model it implements (methods without one get "–").
LRA_NAMES: dict[str, str] = {
    "dense": "Transformer",
    "local": "Local Attention",
    "strided": "Sparse Trans.",
    "bigbird": "BigBird",
    "linear_elu": "Linear Trans.",
    "performer": "Performer",
}
#: LRA Table 2: steps per second at 1K, 2K, 3K, 4K tokens (byte-level text classification,
#: batch 32, TPU v3; the paper prints the speed-up over the Transformer beside each value).
PAPER_STEPS: dict[str, tuple[float, float, float, float]] = {
    "Transformer": (8.1, 4.9, 2.3, 1.4),
    "Local Attention": (9.2, 8.4, 7.4, 7.4),
    "Linformer": (9.3, 9.1, 8.5, 7.7),
    "Reformer": (4.4, 2.2, 1.5, 1.1),
    "Sinkhorn Trans.": (9.1, 7.9, 6.6, 5.3),
    "Synthesizer": (8.7, 5.7, 6.6, 1.9),
    "BigBird": (7.4, 3.9, 2.7, 1.5),
    "Linear Trans.": (9.1, 9.3, 8.6, 7.8),
    "Performer": (9.5, 9.4, 8.7, 8.0),
}
#: LRA Table 2: peak memory usage (GB) at 1K, 2K, 3K, 4K tokens.
PAPER_MEMORY: dict[str, tuple[float, float, float, float]] = {
    "Transformer": (0.85, 2.65, 5.51, 9.48),
    "Local Attention": (0.42, 0.76, 1.06, 1.37),
    "Linformer": (0.37, 0.55, 0.99, 0.99),
    "Reformer": (0.48, 0.99, 1.53, 2.28),
    "Sinkhorn Trans.": (0.47, 0.83, 1.13, 1.48),
    "Synthesizer": (0.65, 1.98, 4.09, 6.99),
    "BigBird": (0.77, 1.49, 2.18, 2.88),
    "Linear Trans.": (0.37, 0.57, 0.80, 1.03),
    "Performer": (0.37, 0.59, 0.82, 1.06),
}
PAPER_LENGTHS: tuple[int, ...] = (1024, 2048, 3072, 4096)
TRANSCRIPTION = (
    "Every cell of Table 2 (steps/s and memory) and of Table 1's ListOps column here has been "
    "checked against the paper (arXiv:2011.04006, Tables 1 and 2)."
)
#: LRA Table 1, ListOps accuracy (%).
PAPER_LISTOPS: dict[str, float] = {
    "Transformer": 36.37,
    "Local Attention": 15.82,
    "Sparse Trans.": 17.07,
    "Longformer": 35.63,
    "Linformer": 35.70,
    "Reformer": 37.27,
    "Sinkhorn Trans.": 33.67,
    "Synthesizer": 36.99,
    "BigBird": 36.05,
    "Linear Trans.": 16.13,
    "Performer": 18.01,
}
