"""paths.py: reading and writing local and gs:// paths alike, and the one-line errors for bad paths that a run
gives before it compiles anything."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pretrain, rm, sft
from instructgpt_jax import errors, main, paths

from runs import configured

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_and_bucket_paths_read_write_and_glob_alike(gcs, tmp_path):
  bucket = gcs.make_bucket()
  for root in (str(tmp_path), f"gs://{bucket}"):
    paths.write_json(paths.join(root, "a", "x.json"), {"k": [1, 2]})
    paths.write_text(paths.join(root, "a", "y.jsonl"), "line\n")
    paths.write_text(paths.join(root, "b.jsonl"), "other\n")
    assert paths.read_json(paths.join(root, "a", "x.json")) == {"k": [1, 2]}
    assert paths.read_json(paths.join(root, "missing.json"), default="none") == "none"
    assert paths.glob(paths.join(root, "a", "*.jsonl")) == [paths.join(root, "a", "y.jsonl")]
    assert paths.glob(paths.join(root, "*", "*.json*")) == [paths.join(root, "a", x) for x in ("x.json", "y.jsonl")]
    assert paths.glob(paths.join(root, "nothing", "*.jsonl")) == []
    paths.copy_tree(paths.join(root, "a"), paths.join(root, "copy"))
    assert paths.read_text(paths.join(root, "copy", "y.jsonl")) == "line\n"
  assert gcs.objects(bucket) == ["a/x.json", "a/y.jsonl", "b.jsonl", "copy/x.json", "copy/y.jsonl"]
  assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # local writes renamed into place


class _Compiles:
  """Counts XLA compilations while it is active (a bad path must be reported before any)."""

  def __enter__(self):
    self.count = 0
    self._listener = lambda event, duration, **kw: setattr(self, "count", self.count + ("compile" in event))
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)
    return False


def fails_before_compiling(config, workdir) -> str:
  """The one-line message of the ConfigError that running `config` in `workdir` raises, with no compile."""
  jax.clear_caches()
  with _Compiles() as compiles, pytest.raises(errors.UserError) as caught:
    main.run(config, str(workdir))
  assert compiles.count == 0, "the error came after a compile"
  message = str(caught.value)
  assert "\n" not in message
  return message


def tiny_pretrain(**overrides):
  return configured(pretrain, "tiny", total_steps=2, checkpoint_every_steps=1, **overrides)


def test_a_bucket_that_does_not_exist(gcs):
  message = fails_before_compiling(tiny_pretrain(), "gs://no-such-bucket-here/run")
  assert message.startswith("--workdir: gs://no-such-bucket-here/run: bucket gs://no-such-bucket-here does not exist")
  assert "gcloud storage buckets create gs://no-such-bucket-here" in message


def test_missing_credentials_name_the_remedy(monkeypatch, tmp_path):
  for var in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud application-default credentials there
  monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # not on a cloud VM: the metadata server refuses
  monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
  message = fails_before_compiling(tiny_pretrain(), "gs://some-bucket/run")
  assert message.startswith("--workdir: gs://some-bucket/run: no Google Cloud credentials")
  assert "gcloud auth application-default login" in message
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
  message = fails_before_compiling(tiny_pretrain(), "gs://some-bucket/run")
  assert f"{tmp_path / 'key.json'} was not found" in message


def test_a_local_parent_folder_that_does_not_exist(tmp_path):
  workdir = tmp_path / "typo" / "run"
  message = fails_before_compiling(tiny_pretrain(), workdir)
  assert (
    message == f"--workdir: {workdir}: its parent folder {tmp_path / 'typo'} does not exist; create it or fix the path"
  )
  assert not (tmp_path / "typo").exists()


def test_init_from_that_holds_no_model(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "hf_folder").mkdir()
  (tmp_path / "hf_folder" / "config.json").write_text("{}")
  cases = {
    str(tmp_path / "absent"): f"model.init_from: {tmp_path / 'absent'}: no such run workdir or exported model",
    str(tmp_path / "empty"): f"model.init_from: {tmp_path / 'empty'} holds no model: neither a run's workdir",
    str(tmp_path / "hf_folder"): f"write hf:{tmp_path / 'hf_folder'}",
    f"hf:{tmp_path / 'absent'}": f"model.init_from: {tmp_path / 'absent'}: no such HuggingFace model folder",
  }
  for init_from, expected in cases.items():
    config = configured(sft, "tiny", total_steps=2, **{"model.init_from": init_from})
    assert expected in fails_before_compiling(config, tmp_path / "run"), init_from


def test_a_workdir_that_holds_another_run(tmp_path):
  workdir = tmp_path / "run"
  main.run(tiny_pretrain(), str(workdir))
  message = fails_before_compiling(configured(sft, "tiny", total_steps=2), workdir)
  assert message == (
    f"--workdir: {workdir} holds checkpoints of a pretrain run (config.json); give this sft run a new workdir"
  )
  message = fails_before_compiling(tiny_pretrain(**{"model.n_layers": 3, "model.d_model": 32}), workdir)
  assert message.startswith(f"--workdir: {workdir} holds checkpoints of another model: n_layers=2 (now 3), d_model=")
  assert message.endswith("give this run a new workdir, or the model config that wrote them")
  # The same model again resumes (and, complete, changes nothing).
  main.run(tiny_pretrain(), str(workdir))
  rm_config = configured(rm, "tiny", total_steps=2, **{"model.init_from": str(workdir)})
  message = fails_before_compiling(rm_config, workdir)
  assert "holds checkpoints of a pretrain run" in message


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
  workdir = tmp_path / "typo" / "run"
  cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2
  errors_printed = [line for line in out.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
  assert errors_printed == [
    f"error: --workdir: {workdir}: its parent folder {tmp_path / 'typo'} does not exist; create it or fix the path"
  ]


def test_a_relative_workdir_works_like_the_readme_commands(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()
  final = main.run(tiny_pretrain(), "runs/relative")
  assert np.isfinite(final["loss"]) and (tmp_path / "runs" / "relative" / "checkpoints" / "2").is_dir()
  assert main.run(tiny_pretrain(), "runs/relative")["eval_loss"] == final["eval_loss"]  # resumes the finished run
