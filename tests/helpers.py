"""Shared pieces of the tests: a small synthetic corpus and the flags of a tiny model."""

from pathlib import Path

# the reference GPT at its smallest, one torch thread: for CLI runs in tests
TINY_FLAGS = [
    "--model-dim",
    "16",
    "--layers",
    "2",
    "--heads",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--eval-batches",
    "2",
    "--threads",
    "1",
]


def write_corpus(folder: Path, lines: int = 3000, files: int = 4) -> str:
    """A directory of Python-like text files (about 30 bytes a line); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(lines))
    size = -(-len(text) // files)
    for i in range(files):
        (folder / f"part{i}.py").write_text(text[i * size : (i + 1) * size])
    return str(folder)
