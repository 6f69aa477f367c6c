"""Data schemes (data/schemes.py): generated data written out as files before the data layer reads it, the
lab's scheme and one registered from a test, as a researcher's script would."""

import json
import math

import pytest

from instructgpt_jax import errors, paths
from instructgpt_jax.data import formats, schemes
from instructgpt_jax.lab import datasets  # registers `lab`


@pytest.fixture
def counting_scheme():
  """`count:N` writes N prompt records; removed again after the test."""

  def files(spec, directory, *, seed):
    n = int(spec.split(":")[1])
    path = f"{directory}/count-{n}-{seed}.jsonl"
    paths.write_text(path, "".join(json.dumps({"prompt": f"count to {i + seed}"}) + "\n" for i in range(n)))
    return path

  schemes.register("count", files=files, gold=lambda spec, *, seed: lambda p, r, stopped: float(r == p[-1]))
  try:
    yield
  finally:
    del schemes.SCHEMES["count"]


def test_a_registered_scheme_is_written_out_and_the_rest_is_left_as_it_is(tmp_path, counting_scheme):
  data = {"train": "count:3", "eval": "gs://bucket/prompts.jsonl", "corpus": "/data/*.txt", "seq_len": 64}
  out = schemes.resolve(data, str(tmp_path), seed=2)
  assert out == {**data, "train": f"{tmp_path}/count-3-2.jsonl"}
  assert data["train"] == "count:3"  # a copy: the section handed in is not changed
  records = [r for _, r in formats.read_records(formats.expand(out["train"], what="data.train"), "prompts")]
  assert [r["prompt"] for r in records] == ["count to 2", "count to 3", "count to 4"]
  gold = schemes.gold_scorer("count:3", seed=0)
  assert (gold("count to 4", "4", True), gold("count to 4", "5", True)) == (1.0, 0.0)
  assert schemes.gold_scorer("gs://bucket/prompts.jsonl", seed=0) is None
  with pytest.raises(ValueError, match="'count' is taken"):
    schemes.register("count", files=lambda *a, **k: "")
  with pytest.raises(ValueError, match="'gs://x' is not a lowercase word"):
    schemes.register("gs://x", files=lambda *a, **k: "")


def test_a_scheme_nobody_registered_is_one_line_and_paths_with_colons_are_paths(tmp_path):
  with pytest.raises(errors.ConfigError) as raised:
    schemes.resolve({"train": "nothing:prompts:4"}, str(tmp_path), seed=0)
  assert str(raised.value) == (
    "data.train: 'nothing:prompts:4' names the data scheme 'nothing', which is not registered (registered: lab); "
    "import the module that registers it, or give a file path"
  )
  data = {"train": "/data/v1:2/train.jsonl", "eval": "gs://b/eval.jsonl", "bias_demonstrations": "Data:x.jsonl"}
  assert schemes.resolve(data, str(tmp_path), seed=0) == data


def test_the_lab_scheme_writes_its_files_and_corpus_and_judges_its_prompts(tmp_path):
  out = schemes.resolve({"train": "lab:prompts:eval:4", "ptx_corpus": "lab", "lab_documents": 5}, str(tmp_path), seed=0)
  assert out["train"] == datasets.materialize("lab:prompts:eval:4", str(tmp_path), seed=0)
  assert out["ptx_corpus"] == datasets.materialize_corpus(5, str(tmp_path), seed=0)
  tasks = datasets.tasks_of("lab:prompts:eval:4", seed=0)
  gold = schemes.gold_scorer("lab:prompts:eval:4", seed=0)
  prompt, task = next(iter(tasks.items()))
  assert gold(prompt, task.answer, True) == 1.0  # the gold answer, stopped, scores 1 (tests/lab_test.py)
  assert math.isnan(gold("not a lab prompt", task.answer, True))
