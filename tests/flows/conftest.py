"""Fixtures of the flow tests: a toy model and a small prompt dataset, built once per session."""

import pyarrow.parquet as pq
import pytest
import yaml

from lmbatch.flows.demo import demo_prompts, ensure_demo_model

ROWS = 36  # 3 shards of 12 rows


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    """(model dir, prompts file): the demo's toy Llama (hidden 64, 2 layers) and 36 prompts."""
    root = tmp_path_factory.mktemp("flow-assets")
    model = ensure_demo_model(root)
    data = root / "prompts.parquet"
    pq.write_table(demo_prompts(ROWS, seed=1), data, row_group_size=6)
    return model, data


@pytest.fixture
def job_config(toy_assets, tmp_path):
    """A job config dict for the toy assets, writing under this test's tmp_path."""
    model, data = toy_assets

    def make(**sections) -> dict:
        cfg = {
            "name": "t",
            "input": {"path": str(data), "format": "parquet",
                      "columns": {"id": "id", "prompt": "prompt", "sampling": {"max_tokens": "max_tokens"},
                                  "passthrough": ["category"]}},
            "output": {"path": str(tmp_path / "out")},
            # float32: a resumed job's rows must equal an uninterrupted run's (bf16 rounding depends on
            # how prefill is chunked, which a resume changes; README, "Precision")
            "model": {"id": str(model), "dtype": "float32"},
            "engine": {"num_kv_blocks": 256, "max_num_seqs": 32, "max_num_batched_tokens": 512},
            "sampling": {"max_tokens": 8, "temperature": 0.0},
            "shards": {"target_rows": 12},
            "runner": {"retries": 1},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


@pytest.fixture
def write_config(tmp_path):
    def write(cfg: dict, name: str = "job.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write
