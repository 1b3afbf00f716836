"""Job config: strict schema, one-line errors, --set overrides, shipped configs load."""

from pathlib import Path

import pytest

from lmbatch.flows.config import ConfigError, apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"input": {"path": "in.parquet"}, "model": {"id": "m"}}


def _err(data) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(data, source="job.yaml")
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith("job.yaml: ")
    return msg


@pytest.mark.parametrize("name", ["demo.yaml", "gpu-llama.yaml", "ray-cluster.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.trust_remote_code is False
    assert cfg.sampling.n == 1


def test_demo_config_derives_paths_from_demo_section():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["demo.rows=30"])
    assert cfg.input.path == ".demo/prompts-30.parquet"
    assert cfg.model.id == ".demo/model"
    assert cfg.db_url() == "sqlite:///outputs/lmbatch.db"


def test_unknown_keys_are_errors_naming_the_key():
    assert "engine.max_num_seq: unknown key" in _err({**BASE, "engine": {"max_num_seq": 4}})
    assert "colour: unknown key" in _err({**BASE, "colour": "red"})
    assert "input.columns.promt: unknown key" in _err(
        {**BASE, "input": {"path": "x", "columns": {"promt": "p"}}})


def test_bad_values_and_missing_keys():
    assert "sampling.temperature" in _err({**BASE, "sampling": {"temperature": -0.5}})
    assert "sampling.top_p" in _err({**BASE, "sampling": {"top_p": 0}})
    assert "min_tokens (9) exceeds max_tokens (4)" in _err(
        {**BASE, "sampling": {"max_tokens": 4, "min_tokens": 9}})
    assert "ordering" in _err({**BASE, "ordering": "random"})
    assert "model: required key is missing" in _err({"input": {"path": "x"}})
    assert "runner.kind" in _err({**BASE, "runner": {"kind": "dask"}})
    # several problems at once are all reported, still on one line
    msg = _err({**BASE, "engine": {"max_num_seqs": 0}, "sampling": {"max_tokens": 0}})
    assert "engine.max_num_seqs" in msg and "sampling.max_tokens" in msg


def test_overrides_are_typed_and_checked(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: in.parquet}\nmodel: {id: m}\n")
    cfg = load_config(path, ["engine.max_num_seqs=64", "sampling.temperature=0.7",
                             "sampling.stop=['###', 'END']", "engine.enable_prefix_caching=false"])
    assert cfg.engine.max_num_seqs == 64 and cfg.sampling.temperature == 0.7
    assert cfg.sampling.stop == ["###", "END"] and cfg.engine.enable_prefix_caching is False
    with pytest.raises(ConfigError, match="engine.bogus: unknown key"):
        load_config(path, ["engine.bogus=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["engine.max_num_seqs"])
    with pytest.raises(ConfigError, match="model.id is not a section"):
        apply_overrides({"model": {"id": "m"}}, ["model.id.x=1"])


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {path: x\nmodel: [\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(bad)
    assert "\n" not in str(e.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)
