"""The demo job's assets, built locally on first use: a toy model and a prompt dataset.

Nothing is downloaded, so `make run` works on a fresh machine with no network. Each asset is
built in a temporary directory and renamed into place, so an interrupted build is rebuilt next
time instead of being half used.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmbatch.testing import synthetic_text, synthetic_words

# A few long instructions shared by many rows: the shape of real batch jobs (one template,
# many documents) and what makes prefix caching and prefix ordering matter.
TEMPLATES = [
    "You are a careful annotator. Read the passage and label its topic with one word. Passage: ",
    "Summarise the following text in one short sentence, keeping names and numbers exact. Text: ",
    "Translate the sentence below into plain English and explain any unusual word briefly: ",
    "Answer the question using only the context. If the context is silent, say so. Context: ",
]
CATEGORIES = ["label", "summary", "translate", "qa"]


def demo_prompts(rows: int, seed: int = 0) -> pa.Table:
    """Deterministic prompts: a template (shared prefix) + generated text of varied length."""
    rng = random.Random(seed)
    words = synthetic_words(400, seed)
    ids, prompts, cats, max_tokens = [], [], [], []
    for i in range(rows):
        t = rng.randrange(len(TEMPLATES))
        ids.append(f"demo-{i:06d}")
        prompts.append(TEMPLATES[t] + synthetic_text(rng, words, rng.randint(4, 48)))
        cats.append(CATEGORIES[t])
        # A per-row override in some rows shows that input columns beat the config's defaults.
        max_tokens.append(rng.choice([4, 6]) if rng.random() < 0.25 else None)
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "prompt": pa.array(prompts, pa.string()),
        "category": pa.array(cats, pa.string()),
        "max_tokens": pa.array(max_tokens, pa.int32()),
    })


def _build_atomically(target: Path, build) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process won the race; keep theirs
            return
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_model(directory: str | Path) -> Path:
    from lmbatch.testing import build_toy_model

    target = Path(directory) / "model"
    if not (target / "config.json").exists():
        _build_atomically(target, lambda tmp: build_toy_model(tmp, hidden=64, layers=2, seed=0))
    return target


def ensure_demo_data(directory: str | Path, rows: int) -> Path:
    """The prompts as a small multi-row-group Parquet file (row groups are what shards cut)."""
    target = Path(directory) / f"prompts-{rows}.parquet"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        pq.write_table(demo_prompts(rows), tmp, row_group_size=max(1, rows // 8), compression="zstd")
        tmp.rename(target)
    return target


def ensure_demo(directory: str | Path, rows: int) -> tuple[Path, Path]:
    """(model dir, prompts file), built if absent."""
    return ensure_demo_model(directory), ensure_demo_data(directory, rows)
