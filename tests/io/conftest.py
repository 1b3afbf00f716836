"""Fixtures for the io tests: a toy tokenizer/model built once, datasets, and run databases."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
from parquet_files import write_parquet


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    from lmbatch.testing import build_toy_model

    return str(build_toy_model(tmp_path_factory.mktemp("io_toy") / "llama"))


@pytest.fixture(scope="session")
def tokenizer(toy_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model_dir)


@pytest.fixture
def prompts_parquet(tmp_path):
    """20 rows in 4 row groups: ids, text prompts, a passthrough column and a per-row max_tokens."""
    path = tmp_path / "in" / "prompts.parquet"
    n = 20
    write_parquet(path, {
        "id": [f"r{i:03d}" for i in range(n)],
        "prompt": [f"Question {i}: what is {i} plus {i}?" for i in range(n)],
        "source": [f"src{i % 3}" for i in range(n)],
        "max_tokens": pa.array([None if i % 2 else 3 for i in range(n)], pa.int64()),
    }, row_group_size=5)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def unique_key():
    """Job keys unique per test: the PostgreSQL database is shared by all tests."""
    return f"job-{uuid.uuid4().hex}"
