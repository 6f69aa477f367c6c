"""Runs whose every path is in a bucket, against a real local GCS server (fake-gcs-server, tests/gcs_server.py).

A pod keeps its workdir, data and models in gs://; these tests check that nothing lands on the local disk
instead, that kill -9 in a bucket resumes exactly, that the stages hand their models to each other through
the bucket, and that HF folders are read from and written to it.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import ppo, rm, sft
from instructgpt_jax import checkpoint, main, paths, sharding, train_state
from instructgpt_jax.library import model_io
from instructgpt_jax.models import hf

from runs import configured, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
COMPARED = ("loss", "grad_norm", "accuracy", "lr")


def pretrain_command(workdir: str, corpus: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "instructgpt_jax.main",
    f"--config={REPO}/configs/pretrain.py:tiny",
    f"--workdir={workdir}",
    f"--config.total_steps={STEPS}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=4",
    "--config.progress_bar=false",
    f"--config.data.corpus={corpus}",
  ]


def start(command, cwd) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def bucket(gcs):
  return gcs.make_bucket()


@pytest.fixture
def corpus(gcs, bucket, shared_data_or_none):
  """Two documents in the bucket: real text where ../shared/data exists, generated prose otherwise."""
  if shared_data_or_none is not None:
    text = (shared_data_or_none / "tinyshakespeare.txt").read_text()[:150_000]
  else:
    from instructgpt_jax.lab import world

    text = "\n\n".join(world.corpus_documents(n_documents=400, seed=0))
  paths.write_text(f"gs://{bucket}/corpus/part-0.txt", text[: len(text) // 2])
  paths.write_text(f"gs://{bucket}/corpus/part-1.txt", text[len(text) // 2 :])
  return f"gs://{bucket}/corpus/*.txt"


@pytest.mark.slow
def test_pretrain_in_a_bucket_writes_only_there_and_resumes_exactly_after_kill_9(gcs, bucket, corpus, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  straight = start(pretrain_command(f"gs://{bucket}/straight", corpus), cwd)
  killed = start(pretrain_command(f"gs://{bucket}/killed", corpus), cwd)
  # Kill -9 once the checkpoint of step 4 is committed (orbax writes commit_success.txt last on GCS).
  deadline = time.time() + 240
  while "killed/checkpoints/4/commit_success.txt" not in gcs.objects(bucket):
    assert killed.poll() is None, killed.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 4 within 240 s"
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert straight.wait(timeout=240) == 0, straight.stderr.read()[-3000:]
  saved = checkpoint.Checkpointer.steps_in(f"gs://{bucket}/killed")
  assert 4 in saved and STEPS not in saved
  rerun = start(pretrain_command(f"gs://{bucket}/killed", corpus), cwd)
  assert rerun.wait(timeout=240) == 0, rerun.stderr.read()[-3000:]

  objects = gcs.objects(bucket)
  for run in ("straight", "killed"):
    for name in ("metrics.jsonl", "config.json", "model.json", f"checkpoints/{STEPS}/commit_success.txt"):
      assert f"{run}/{name}" in objects, (run, name)
    assert any(o.startswith(f"{run}/tensorboard/events.out.tfevents.") for o in objects), run
  assert list(cwd.iterdir()) == []  # nothing written where the command ran (no local "gs:" folder)

  want = {r["step"]: r for r in read_metrics(f"gs://{bucket}/straight")}
  got = read_metrics(f"gs://{bucket}/killed")
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # every step once: no gaps, no repeats
  for row in got:
    assert {k: row[k] for k in COMPARED} == {k: want[row["step"]][k] for k in COMPARED}, row["step"]
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(f"gs://{bucket}/killed").restore_params(STEPS),
    checkpoint.Checkpointer(f"gs://{bucket}/straight").restore_params(STEPS),
  )


@pytest.mark.slow
def test_stage_chain_and_hf_folders_through_a_bucket(gcs, bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = f"gs://{bucket}"
  quick = {"eval_every_steps": 0, "checkpoint_every_steps": 1000}
  main.run(
    configured(sft, "tiny,variant=ppo_init", total_steps=4, **quick, **{"data.train": "lab:demonstrations:train:64"}),
    f"{root}/sft",
  )
  main.run(
    configured(
      rm,
      "tiny",
      total_steps=3,
      **quick,
      **{
        "model.init_from": f"{root}/sft",
        "data.train": "lab:comparisons:train:64",
        "data.eval": "",
        "data.bias_demonstrations": "lab:demonstrations:train:32",
      },
    ),
    f"{root}/rm",
  )
  final = main.run(
    configured(
      ppo,
      "tiny",
      **{
        "model.init_from": f"{root}/sft",
        "ppo.reward_model": f"{root}/rm/export",
        "ppo.episodes": 2 * 32,
        "eval_every_steps": 0,
        "data.eval": "",
        "progress_bar": False,
      },
    ),
    f"{root}/ppo",
  )
  assert np.isfinite(final["loss"])
  objects = gcs.objects(bucket)
  for name in ("sft/model.json", "rm/export/metadata.json", "ppo/export/metadata.json", "ppo/metrics.jsonl"):
    assert name in objects, name
  # The lab's data files and the TFDS builds' mirrors live in the bucket too.
  assert any(o.startswith("sft/data/lab_demonstrations_train_64") for o in objects)
  assert any(o.startswith("sft/tfds/demonstrations/") and o.endswith("/_COMPLETE") for o in objects)
  assert [r["step"] for r in read_metrics(f"{root}/ppo")] == [1, 2]
  assert list(tmp_path.iterdir()) == []

  # HF export into the bucket and import from it: the same parameters, bit for bit.
  source = model_io.read_source(f"{root}/ppo/export")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  _, target = train_state.param_shardings_for(source.config, mesh, rules)
  params = model_io.load(source, "lm", target, source.config, 0)
  hf.export(f"{root}/hf", params, source.config, max_shard_bytes=200_000)  # several shards and an index
  objects = gcs.objects(bucket)
  assert "hf/config.json" in objects and "hf/model.safetensors.index.json" in objects
  assert sum(o.startswith("hf/model-") and o.endswith(".safetensors") for o in objects) > 1
  imported = model_io.read_source(f"hf:{root}/hf")
  assert imported.config == source.config
  reloaded = model_io.load(imported, "lm", target, imported.config, 0)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_a_tfds_build_in_a_bucket_is_mirrored_and_a_new_host_downloads_it(gcs, bucket, tmp_path, monkeypatch):
  import json
  import shutil
  import tempfile

  from instructgpt_jax.data import formats, tfds_builders
  from instructgpt_jax.data import tokenizer as tokenizer_lib

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local cache goes under tmp_path
  demos = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]
  paths.write_text(f"gs://{bucket}/demos.jsonl", "".join(json.dumps(d) + "\n" for d in demos))
  data_dir, tokenizer = f"gs://{bucket}/tfds", tokenizer_lib.byte_tokenizer()

  def build():
    dataset = tfds_builders.build(
      "demonstrations", {"train": f"gs://{bucket}/demos.*"}, data_dir=data_dir, tokenizer=tokenizer
    )
    source = dataset.source("train")
    return [(bytes(source[i]["prompt"]), list(source[i]["response_ids"])) for i in range(len(source))]

  first = build()
  assert [p.decode() for p, _ in first] == [d["prompt"] for d in demos]
  local = tfds_builders.local_cache_dir(data_dir)
  assert local.startswith(str(tmp_path)) and not os.path.exists(data_dir.replace("gs://", ""))
  assert sum(o.endswith("/_COMPLETE") for o in gcs.objects(bucket)) == 1
  shutil.rmtree(local)  # a new host, or a new VM after a preemption: nothing local
  monkeypatch.setattr(formats, "read_records", lambda *a, **k: pytest.fail("read the JSONL again"))
  assert build() == first
