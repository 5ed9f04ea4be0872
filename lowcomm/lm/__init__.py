"""The small reference GPT and the byte-level corpora used by demos, sweeps and benchmarks."""

from .data import BatchSampler, Corpus, cache_dir, eval_batches, load_corpus
from .model import GPT, GPTConfig

__all__ = ["GPT", "BatchSampler", "Corpus", "GPTConfig", "cache_dir", "eval_batches", "load_corpus"]
