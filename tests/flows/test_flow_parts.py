"""The flow's parts on their own: progress bar, engine cache, preflight, report formatting."""

import io as stdio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch.flows import engine_cache
from lmbatch.flows.artifacts import artifact_key, metrics_rows
from lmbatch.flows.config import ConfigError, validate_config
from lmbatch.flows.preflight import preflight
from lmbatch.flows.progress import ShardProgress
from lmbatch.flows.report import format_metrics


def test_progress_bar_is_quiet_off_a_tty(capsys):
    with ShardProgress(10, "shard 0") as bar:  # pytest's stderr is not a TTY
        bar.update(4, output_tokens=40)
    assert bar.rows == 4 and capsys.readouterr().err == ""


def test_progress_bar_shows_rows_tokens_per_s_and_eta(monkeypatch):
    buf = stdio.StringIO()
    monkeypatch.setattr("lmbatch.flows.progress.sys.stderr", buf)
    bar = ShardProgress(10, "shard 3", enabled=True)
    bar.update(5, output_tokens=500)
    bar.bar.refresh()
    text = buf.getvalue()
    bar.close()
    assert "shard 3" in text and "5/10" in text and "tok/s" in text and "<" in text  # "<" precedes the ETA


def test_engine_is_loaded_once_per_config(toy_assets):
    model, _ = toy_assets
    kwargs = validate_config({"input": {"path": "x"}, "model": {"id": str(model)},
                              "engine": {"num_kv_blocks": 64}}).engine_kwargs()
    engine_cache.clear()
    before = engine_cache.load_count()
    a = engine_cache.get_engine(kwargs)
    assert engine_cache.get_engine(dict(kwargs)) is a
    assert engine_cache.load_count() == before + 1
    b = engine_cache.get_engine({**kwargs, "max_num_seqs": 8})
    assert b is not a and engine_cache.load_count() == before + 2


def test_preflight_rejects_a_hub_model_missing_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = validate_config({"input": {"path": "x"}, "model": {"id": "acme/not-a-model"}})
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        preflight(cfg, check_input=False)


def test_ray_cluster_needs_a_server_and_local_ray_needs_gpus_or_cpu_tasks(monkeypatch):
    import torch

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cluster = {"kind": "ray", "ray": {"address": "10.0.0.1:6379"}}
    cfg = validate_config({"input": {"path": "x"}, "model": {"id": "."}, "runner": cluster})
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ConfigError, match="needs a real Prefect server"):
        preflight(cfg, check_input=False)
    if torch.cuda.device_count() == 0:
        local = validate_config({"input": {"path": "x"}, "model": {"id": "."}, "runner": {"kind": "ray"}})
        with pytest.raises(ConfigError, match="0 GPU.*num_gpus_per_task: 0"):
            preflight(local, check_input=False)
    cpu_tasks = {"kind": "ray", "ray": {"num_gpus_per_task": 0}}
    preflight(validate_config({"input": {"path": "x"}, "model": {"id": "."}, "runner": cpu_tasks}),
              check_input=False)   # a local Ray on the CPU: no server or database to set


def test_report_formatting_of_partial_metrics():
    text = format_metrics({"rows": 3, "ttft_s": {"p50": 0.5}, "prefix_cache_hit_rate": 0.25})
    assert "0.5 / - / - s" in text and "25.0 %" in text
    assert artifact_key("lmbatch-metrics", "My Run_1") == "lmbatch-metrics-my-run-1"
    assert {"metric": "ttft_s.p50", "value": 0.5} in metrics_rows({"ttft_s": {"p50": 0.5}})


def test_a_plan_after_the_cli_preflight_does_not_check_the_ids_again(job_config, toy_assets, tmp_path):
    # The CLI's preflight streams the id column; the plan must not stream it a second time.
    from lmbatch import io
    from lmbatch.flows.job import plan_only

    table = pq.read_table(toy_assets[1])
    dup = tmp_path / "dup.parquet"
    pq.write_table(table.set_column(0, "id", pa.array(["same"] * table.num_rows)), dup)
    cfg = validate_config(job_config(input={"path": str(dup)}))
    with pytest.raises(io.InputError, match="duplicate"):
        plan_only(cfg)
    assert plan_only(cfg, input_checked=True)["num_rows"] == table.num_rows


def test_an_openai_batch_file_needs_no_columns_in_the_config(job_config, tmp_path):
    # The config's column defaults must leave the format's conventions (custom_id, messages) to io.
    import json

    from lmbatch.flows.job import plan_only

    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"messages": [{"role": "user", "content": f"hi {i}"}]}}) + "\n"
                            for i in range(5)))
    cfg = job_config(input={"path": str(path), "format": "openai_jsonl", "columns": {}})
    plan = plan_only(validate_config(cfg))
    assert plan["num_rows"] == 5
