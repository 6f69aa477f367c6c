"""grain batches: SFT layout and packing (same per-example loss with the model), exact resume, per-host
coverage, bucketed prompts and padded evaluation."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses, models
from instructgpt_jax.data import batching, formats, pipeline, stage_data
from instructgpt_jax.data import tokenizer as tokenizer_lib

TOKENIZER = tokenizer_lib.byte_tokenizer()
EOS, PAD = TOKENIZER.eos_id, TOKENIZER.pad_id


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  rng = random.Random(1)
  demos = [
    {"prompt": f"p{i} " + "x" * rng.randint(1, 8), "response": f" r{i}" + "y" * rng.randint(1, 12)} for i in range(16)
  ]
  comparisons = [
    {"prompt": f"c{i}", "responses": [f" a{i}", f" b{i}", f" c{i}"][: 2 + i % 2], "ranks": [0, 1, 1][: 2 + i % 2]}
    for i in range(12)
  ]
  prompts = [{"prompt": f"{i}:" + "q" * (3 * i)} for i in range(16)]  # 2 .. 48 bytes
  documents = [{"text": f"document {i} " + "w" * rng.randint(5, 40)} for i in range(30)]
  return dict(
    demos=write_jsonl(root / "demos.jsonl", demos),
    comparisons=write_jsonl(root / "comparisons.jsonl", comparisons),
    prompts=write_jsonl(root / "prompts.jsonl", prompts),
    documents=write_jsonl(root / "documents.jsonl", documents),
    data_dir=str(root / "tfds"),
  )


def sft_data(files, **overrides):
  cfg = dict(dict(train=files["demos"], data_dir=files["data_dir"], batch_size=4, seq_len=64), **overrides)
  return stage_data.build_sft_data(cfg, TOKENIZER, seed=7)


def comparison_data(files, process_index=0, process_count=1, **overrides):
  cfg = dict(
    dict(train=files["comparisons"], data_dir=files["data_dir"], batch_size=4, seq_len=24, max_responses=4), **overrides
  )
  return stage_data.build_comparison_data(
    cfg, TOKENIZER, seed=7, process_index=process_index, process_count=process_count
  )


def prompt_data(files, process_index=0, process_count=1, **overrides):
  cfg = dict(dict(train=files["prompts"], data_dir=files["data_dir"], batch_size=4, max_prompt_len=64), **overrides)
  return stage_data.build_prompt_data(cfg, TOKENIZER, seed=7, process_index=process_index, process_count=process_count)


def text_data(files):
  cfg = dict(train=files["documents"], data_dir=files["data_dir"], batch_size=4, seq_len=32)
  return stage_data.build_pretraining_data(cfg, TOKENIZER, seed=7)


def assert_same_batch(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------------------------------
# SFT layout and packing
# ----------------------------------------------------------------------------------------------------


def test_sft_example_masks_the_prompt_and_ends_with_eos():
  a, b, c = TOKENIZER.encode("abc")
  example = batching.sft_example([a, b], [c, EOS])
  assert example["inputs"].tolist() == [a, b, c] and example["targets"].tolist() == [b, c, EOS]
  assert example["mask"].tolist() == [0.0, 1.0, 1.0]  # targets "b" (prompt) out; "c" and EOS in
  assert batching.sft_example([a, b], [c, EOS], loss_on_prompt=True)["mask"].tolist() == [1.0, 1.0, 1.0]
  row = batching.pad_sft_example(example, 6, PAD)
  assert row["inputs"].tolist() == [a, b, c, PAD, PAD, PAD] and row["targets"].tolist() == [b, c, EOS, PAD, PAD, PAD]
  assert row["segment_ids"].tolist() == [1, 1, 1, 0, 0, 0] and row["positions"].tolist() == [0, 1, 2, 0, 0, 0]
  assert row["mask"].tolist() == [0, 1, 1, 0, 0, 0]


def test_loss_on_prompt_option_unmasks_every_real_target(files):
  masked, unmasked = next(sft_data(files, shuffle=False)), next(sft_data(files, shuffle=False, loss_on_prompt=True))
  np.testing.assert_array_equal(unmasked["mask"], unmasked["segment_ids"].astype(np.float32))
  assert 0 < masked["mask"].sum() < unmasked["mask"].sum()


@pytest.mark.parametrize("size", ["tiny", "tiny-llama"])
def test_packed_and_unpacked_batches_give_the_same_per_example_loss(files, size):
  cfg = models.resolve({"size": size})
  graphdef, params = models.init(cfg, jax.random.key(0))
  max_segments = 8

  @jax.jit
  def per_segment_loss(params, batch):
    """[B, max_segments]: the summed NLL of each segment of each row (lm_loss_sum with that segment's mask)."""
    logits, _ = models.apply(
      graphdef, params, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )

    def row(logits, targets, mask, segments):
      sums = [
        losses.lm_loss_sum(logits[None], targets[None], (mask * (segments == s))[None])[0]
        for s in range(1, max_segments + 1)
      ]
      return jnp.stack(sums)

    return jax.vmap(row)(logits, batch["targets"], batch["mask"], batch["segment_ids"])

  def losses_by_example(batches):
    found = {}
    for batch in batches:
      sums = np.asarray(per_segment_loss(params, {k: jnp.asarray(v) for k, v in batch.items()}))
      for b in range(len(batch["inputs"])):
        assert batch["segment_ids"][b].max() <= max_segments
        for s in range(1, batch["segment_ids"][b].max() + 1):
          in_segment = batch["segment_ids"][b] == s
          assert batch["positions"][b][in_segment].tolist() == list(range(in_segment.sum()))  # restart at 0
          found[tuple(batch["inputs"][b][in_segment])] = sums[b, s - 1]
    return found

  unpacked = sft_data(files, shuffle=False)
  packed = sft_data(files, shuffle=False, pack=True)
  unpacked_batches = [next(unpacked) for _ in range(4)]  # the 16 examples
  packed_batches = [next(packed) for _ in range(2)]
  assert max(b["segment_ids"].max() for b in packed_batches) >= 3  # rows really hold several examples
  expected, got = losses_by_example(unpacked_batches), losses_by_example(packed_batches)
  assert len(expected) == 16 and len(got) >= 14  # 2 packed batches hold nearly all 16 examples
  for tokens, loss in got.items():
    np.testing.assert_allclose(loss, expected[tokens], rtol=2e-5)
  assert all(loss > 1.0 for loss in got.values())


# ----------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------

MAKERS = {
  "sft": lambda files: sft_data(files),
  "sft_packed": lambda files: sft_data(files, pack=True),
  "comparisons": comparison_data,
  "prompts": prompt_data,
  "pretraining_text": text_data,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_restoring_a_saved_state_gives_the_exact_next_batches(files, kind):
  make = MAKERS[kind]
  data = make(files)
  first = next(data)
  for _ in range(4):  # past the first epoch for most kinds
    next(data)
  state = json.loads(json.dumps(data.get_state()))  # as a checkpoint stores it
  expected = [next(data) for _ in range(3)]
  resumed = make(files)  # a new process: rebuilt from the config, then restored
  resumed.set_state(state)
  for batch in expected:
    assert_same_batch(next(resumed), batch)
  assert any(not np.array_equal(first[k], expected[0][k]) for k in first if first[k].shape == expected[0][k].shape)


# ----------------------------------------------------------------------------------------------------
# Hosts
# ----------------------------------------------------------------------------------------------------


def test_host_streams_split_every_epoch_exactly():
  hosts = [
    np.array([pipeline.host_stream(7, seed=3, process_index=h, process_count=2)[i] for i in range(7)]) for h in (0, 1)
  ]
  # Stream positions 0..6 are epoch 0: host 0 holds positions 0, 2, 4, 6 and host 1 holds 1, 3, 5.
  epoch0 = np.concatenate([hosts[0][:4], hosts[1][:3]])
  epoch1 = np.concatenate([hosts[0][4:7], hosts[1][3:7]])
  assert sorted(epoch0) == sorted(epoch1) == list(range(7)) and not np.array_equal(epoch0, epoch1)


def test_two_hosts_cover_each_comparison_exactly_once_per_epoch(files):
  hosts = [comparison_data(files, process_index=h, process_count=2) for h in (0, 1)]  # 2 per host, 12 examples
  orders = []
  for _ in range(2):
    seen = [int(i) for data in hosts for _ in range(3) for i in next(data)["index"]]
    assert sorted(seen) == list(range(12))
    orders.append(seen)
  assert orders[0] != orders[1]  # reshuffled each epoch


def test_prompt_batches_take_one_bucket_and_the_same_shape_on_every_host(files):
  hosts = [prompt_data(files, process_index=h, process_count=2, prompt_buckets=(8, 16, 32, 64)) for h in (0, 1)]
  lengths = [len(f"{i}:" + "q" * (3 * i)) for i in range(16)]
  for epoch in range(2):
    seen = []
    for _ in range(4):  # 16 prompts, global batch 4
      pair = [next(data) for data in hosts]
      assert pair[0]["tokens"].shape == pair[1]["tokens"].shape and pair[0]["tokens"].shape[1] in (8, 16, 32, 64)
      width = pair[0]["tokens"].shape[1]
      for batch in pair:
        assert all(lengths[i] == n for i, n in zip(batch["index"], batch["lengths"]))
        seen += batch["index"].tolist()
      longest = max(lengths[i] for batch in pair for i in batch["index"])
      assert width == min(b for b in (8, 16, 32, 64) if b >= longest)
    assert sorted(seen) == list(range(16)), epoch


def test_bucket_plan_drops_fewer_than_one_batch_per_epoch():
  lengths = np.array([3, 40, 5, 9, 33, 2, 60, 17, 8, 12, 50, 1, 30, 7, 45])
  plans = [batching.plan_bucketed_batches(lengths, (8, 16, 64), 4, np.random.default_rng([0, e])) for e in range(3)]
  for plan in plans:
    ids = np.concatenate(plan)
    assert len(plan) == 3 and len(set(ids.tolist())) == 12  # 15 // 4 batches; 3 dropped, no repeats
  assert len({frozenset(range(15)) - frozenset(np.concatenate(p).tolist()) for p in plans}) > 1


def test_eval_batches_are_equal_in_number_on_every_host_with_blank_rows(files):
  cfg = dict(eval_examples=5)
  hosts = [comparison_data(files, process_index=h, process_count=2, **cfg) for h in (0, 1)]
  batches = [list(data.eval_batches()) for data in hosts]
  assert [len(b) for b in batches] == [2, 2]  # ceil(ceil(5 / 2) / 2)
  indices = [i for host in batches for batch in host for i in batch["index"].tolist()]
  assert sorted(i for i in indices if i >= 0) == list(range(5)) and indices.count(-1) == 3
  blank = batches[1][1]  # host 1 holds 2 of the 5: its second batch is all blank
  assert np.all(blank["ranks"] == -1) and np.all(blank["segment_ids"] == 0) and np.all(blank["tokens"] == PAD)
  assert len(hosts[0].eval_source) == 5 and len(list(hosts[0].eval_batches(1))) == 1
  assert sum(1 for _ in sft_data(files).eval_batches()) == 0  # no eval split configured
  # Prompts: every host pads its part of a global batch to the bucket of the global batch's longest prompt.
  # In the first, host 0 holds prompts of 2 and 8 tokens, host 1 of 5 and 11: both are padded to 16.
  prompt_hosts = [
    prompt_data(files, process_index=h, process_count=2, eval=files["prompts"], prompt_buckets="8,16,64")
    for h in (0, 1)
  ]
  widths = [[b["tokens"].shape[1] for b in data.eval_batches()] for data in prompt_hosts]
  assert widths == [[16, 64, 64, 64]] * 2 and next(prompt_hosts[1].eval_batches())["lengths"].tolist() == [5, 11]


def test_batch_size_and_limit_errors_are_one_line(files):
  with pytest.raises(formats.DataError, match=r"^data.batch_size: 5 is not divisible by the 2 processes$"):
    comparison_data(files, process_count=2, batch_size=5)
  with pytest.raises(formats.DataError, match=r"^data.batch_size: a global batch of 16 is more than the 12 examples$"):
    comparison_data(files, batch_size=16)
  with pytest.raises(formats.DataError, match=r"cannot hold a prompt of max_prompt_len 64$"):
    prompt_data(files, prompt_buckets="8,16")
  assert stage_data.prompt_buckets({"max_prompt_len": 1024}) == (64, 128, 256, 512, 1024)
  assert stage_data.prompt_buckets({"max_prompt_len": 100}) == (64, 100)
