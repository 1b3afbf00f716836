"""The job key: which settings start a new job and which resume the old one (README, "Resume")."""

import typing

import pytest
from pydantic import BaseModel

from lmbatch.flows.config import JobConfig, validate_config
from lmbatch.flows.job import job_identity, run_job
from lmbatch.flows.sections import job_key_decision

BASE = {"input": {"path": "in.parquet"}, "model": {"id": "m"}}
FINGERPRINT = "f" * 16


def _sections(model: type[BaseModel], prefix: str = ""):
    """(dotted name, pydantic field) of every field of the config, sections included."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for t in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _sections(t, f"{prefix}{name}.")


def test_every_config_field_decides_whether_it_counts_in_the_job_key():
    # A field added without key_field(job_key=...) / setting(affects_outputs=...) fails here: a
    # setting that changes outputs but is left out of the key would resume a different job's
    # shards; one that does not but is put in would defeat resume.
    undecided = [name for name, field in _sections(JobConfig) if job_key_decision(field) is None]
    assert undecided == []


def _key(**sections) -> tuple[str, str]:
    data = {**BASE, **sections}
    key, run_name, _ = job_identity(validate_config(data), FINGERPRINT, None)
    return key, run_name


@pytest.mark.parametrize("tuning", [
    {"engine": {"max_num_seqs": 8, "max_num_batched_tokens": 128, "num_kv_blocks": 64}},
    {"engine": {"enable_prefix_caching": False, "block_size": 32}},
    {"ordering": "input"},
    {"runner": {"retries": 5, "checkpoint_rows": 10}},
    {"db": {"url": "sqlite:///elsewhere.db"}},
    {"cost": {"price_per_device_hour": 2.5}},
])
def test_tuning_that_cannot_change_outputs_keeps_the_job(tuning):
    assert _key(**tuning) == _key()


@pytest.mark.parametrize("change", [
    {"engine": {"seed": 1}},
    {"engine": {"max_model_len": 256}},
    {"model": {"id": "other-model"}},
    {"model": {"id": "m", "dtype": "bfloat16"}},
    {"sampling": {"temperature": 0.5}},
    {"sampling": {"seed": 7}},
    {"sampling": {"max_tokens": 32}},
    {"input": {"path": "in.parquet", "columns": {"prompt": "text"}}},
    {"shards": {"target_rows": 5}},
])
def test_a_change_that_can_change_outputs_starts_a_new_job(change):
    key, run_name = _key(**change)
    base_key, base_name = _key()
    assert key != base_key and run_name != base_name


def test_a_release_that_changes_the_output_columns_starts_a_new_job(monkeypatch):
    from lmbatch.io import writer

    before = _key()
    monkeypatch.setattr(writer, "RESULT_COLUMNS", [*writer.RESULT_COLUMNS, "new_column"])
    assert _key() != before


def test_a_new_dataset_is_a_new_job():
    cfg = validate_config(BASE)
    assert job_identity(cfg, "a" * 16, None)[0] != job_identity(cfg, "b" * 16, None)[0]


def test_a_real_rerun_with_other_batch_sizes_and_ordering_resumes(job_config):
    first = run_job(validate_config(job_config()))
    assert len(first["shards"]) == 3 and first["message"] is None
    tuned = validate_config(job_config(engine={"max_num_seqs": 4, "max_num_batched_tokens": 64},
                                       ordering="length_desc", runner={"retries": 0}))
    again = run_job(tuned)
    assert again["run_name"] == first["run_name"] and again["output_dir"] == first["output_dir"]
    assert again["shards"] == [] and sorted(again["skipped"]) == [0, 1, 2]
    reseeded = run_job(validate_config(job_config(engine={"seed": 3})))
    assert reseeded["run_name"] != first["run_name"] and len(reseeded["shards"]) == 3
