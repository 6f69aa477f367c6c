"""Our model as an lm-evaluation-harness backend (library/lm_eval_model.py) and the evaluate command: every request
type against a slow reference (one unbatched forward per request, or per generated token), on a tiny random
model of each family, sharded on 8 devices and on 1; lm-eval's tasks over local files (tests/eval_tasks/)."""

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra; tests/run.sh installs it")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from instructgpt_jax import evaluate, models  # noqa: E402
from instructgpt_jax.library import lm_eval_model, lm_eval_tasks, model_io  # noqa: E402

import doc_examples as d  # noqa: E402

TASKS = pathlib.Path(__file__).parent / "eval_tasks"
FAMILIES = {
  "gpt": {"size": "tiny", "max_len": 48},
  "llama": {"size": "tiny-llama", "max_len": 48},
  "qwen3": {"size": "tiny-llama", "max_len": 48, "qk_norm": True, "tied_embeddings": True},
}
CONTEXTS = [
  ("The cat", " sat"),
  ("", "hello there"),  # an empty context: the prefix token
  ("Question: 2+2=  ", "4"),  # trailing spaces move to the continuation
  ("a b " * 30, "c d e"),  # longer than the 48-token window: the context is cut
  ("x", "y" * 60),  # a continuation longer than the window
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
  """(export folder, graphdef, params, config) of a random model over the byte tokenizer."""
  cfg = models.resolve(FAMILIES[request.param])
  graphdef, params = models.init(cfg, jax.random.PRNGKey(1))
  folder = tmp_path_factory.mktemp(request.param) / "model"
  model_io.export(str(folder), params, "lm", cfg, tokenizer="bytes")
  return str(folder), graphdef, params, cfg


@pytest.fixture(scope="module")
def gpt_model(tmp_path_factory):
  """A random tiny GPT's export folder: the model the command's tests evaluate."""
  cfg = models.resolve(FAMILIES["gpt"])
  _, params = models.init(cfg, jax.random.PRNGKey(1))
  folder = tmp_path_factory.mktemp("gpt") / "model"
  model_io.export(str(folder), params, "lm", cfg, tokenizer="bytes")
  return str(folder)


_FORWARDS = {}


def _slow_logprobs(graphdef, params, tokens):
  """[len - 1, V] float32 log-softmax of one sequence's next-token logits: the sequence alone, right-padded to
  the window (causal attention: the padding after it changes none of its positions), one compiled shape."""
  cfg_len = 48  # every test model's window (FAMILIES)
  if id(graphdef) not in _FORWARDS:
    _FORWARDS[id(graphdef)] = jax.jit(lambda p, t: models.apply(graphdef, p, t)[0])
  n = len(tokens) - 1
  padded = np.zeros((1, cfg_len), np.int32)
  padded[0, :n] = tokens[:-1]
  logits = _FORWARDS[id(graphdef)](params, padded)
  return np.asarray(jax.nn.log_softmax(np.asarray(logits[0, :n], np.float32), axis=-1))


def _slow_pair(graphdef, params, cfg, context, continuation):
  tokens = (context + continuation)[-(cfg.max_len + 1) :]
  logprobs, n = _slow_logprobs(graphdef, params, tokens), len(tokens) - 1
  k = min(len(continuation), n)  # a continuation longer than the window: its last max_len tokens
  positions = range(n - k, n)
  total = sum(float(logprobs[t, tokens[t + 1]]) for t in positions)
  return total, all(int(np.argmax(logprobs[t])) == tokens[t + 1] for t in positions)


def _slow_greedy(graphdef, params, prompt, steps, eos):
  tokens = list(prompt)
  for _ in range(steps):
    tokens.append(int(np.argmax(_slow_logprobs(graphdef, params, [*tokens, 0])[-1])))
    if tokens[-1] == eos:
      break
  return tokens[len(prompt) :]


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_every_request_type_equals_the_slow_reference(tiny_model):
  folder, graphdef, params, cfg = tiny_model
  lm = lm_eval_model.JaxLM(folder, batch_size=4, max_gen_toks=6)
  got = lm.loglikelihood(_requests("loglikelihood", CONTEXTS))
  assert lm.truncated == 2  # the long context and the long continuation
  for (context, continuation), (logprob, greedy) in zip(CONTEXTS, got):
    ids = (
      ([lm.prefix_token_id], lm.tokenizer.encode(continuation))
      if not context
      else lm._encode_pair(context, continuation)
    )
    want, want_greedy = _slow_pair(graphdef, params, cfg, *ids)
    assert abs(logprob - want) <= 1e-4 and greedy == want_greedy, (context, continuation, logprob, want)
  # A greedy continuation is flagged greedy: the model's own argmax tokens after a context.
  prompt = lm.tokenizer.encode("Hi")
  argmax_tokens = _slow_greedy(graphdef, params, prompt, 3, eos=-1)
  assert lm.score_pairs([(prompt, argmax_tokens)])[0][1] is True

  documents = ["word " * 40, "short"]  # 200 bytes: several windows of 48
  rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in documents]))
  for document, total in zip(documents, rolling):
    windows = get_rolling_token_windows(
      token_list=lm.tokenizer.encode(document), prefix_token=lm.prefix_token_id, max_seq_len=cfg.max_len, context_len=1
    )
    want = sum(_slow_pair(graphdef, params, cfg, *make_disjoint_window(w))[0] for w in windows)
    assert abs(total - want) <= 1e-3 * max(1.0, abs(want) / 100)

  prompts = [("Once", {"until": ["\n"], "max_gen_toks": 6}), ("Q: a\nA:", {"until": ["zz", "q"], "max_gen_toks": 6})]
  generated = lm.generate_until(_requests("generate_until", prompts))
  for (context, kwargs), text in zip(prompts, generated):
    ids = _slow_greedy(graphdef, params, lm.tokenizer.encode(context), 6, lm.tokenizer.eos_id)
    want = lm.tokenizer.decode(ids)
    for stop in kwargs["until"]:
      want = want.split(stop)[0]
    assert text == want
  # Few programs: one per (rows, length bucket) for scoring, one per prompt bucket for generation.
  assert all(entry[2] in (32, 48) for entry in lm.compiled), lm.compiled


def test_packing_fills_rows_best_fit_and_a_packed_request_scores_as_it_does_alone(tiny_model):
  lengths = [30, 5, 17, 48, 9, 9, 40, 1, 22, 3]
  rows = lm_eval_model.pack(lengths, 48)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each request once
  fill = [sum(lengths[i] for i in row) for row in rows]
  assert max(fill) <= 48 and fill == sorted(fill, reverse=True)
  # Best fit, longest first: 48 | 40+5+3 | 30+17+1 | 22+9+9 (four rows; their total 184 needs four).
  assert [sorted(lengths[i] for i in row) for row in rows] == [[48], [3, 5, 40], [1, 17, 30], [9, 9, 22]]
  lm = lm_eval_model.JaxLM(tiny_model[0], batch_size=2)
  pairs = [([5, 6, 7], [8, 9]), ([10] * 20, [11, 12, 13]), ([14], [15]), ([16, 17], [18] * 30)]
  alone = [lm.score_pairs([pair])[0] for pair in pairs]
  together = lm.score_pairs(pairs)  # packed: three of them share rows
  assert len(lm_eval_model.pack([len(a) + len(b) - 1 for a, b in pairs], lm.max_length)) < len(pairs)
  for (x, gx), (y, gy) in zip(alone, together):
    assert abs(x - y) <= 1e-5 and gx == gy


def test_eight_devices_data_and_fsdp_sharded_give_what_one_gives(tiny_model):
  folder = tiny_model[0]
  assert len(jax.devices()) == 8
  one = lm_eval_model.JaxLM(folder, batch_size=8, max_gen_toks=5, devices=jax.devices()[:1])
  requests = _requests("loglikelihood", CONTEXTS)
  prompts = _requests("generate_until", [("Once", {"until": ["\n"]}), ("Q: a", {"until": ["zz"]})])
  want, want_text = one.loglikelihood(requests), one.generate_until(prompts)
  family = pathlib.Path(folder).parent.name.rstrip("0123456789")
  for fsdp in (1, 2) if family == "llama" else (2,):  # data-only sharding on one family: each is a compile
    eight = lm_eval_model.JaxLM(folder, batch_size=8, max_gen_toks=5, fsdp=fsdp)
    assert dict(eight.mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1}
    embedding = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(eight.params) if "embed" in str(path)][0]
    assert ("fsdp" in str(embedding.sharding.spec)) == (fsdp > 1), embedding.sharding  # split, as in training
    for (a, ga), (b, gb) in zip(eight.loglikelihood(requests), want):
      assert abs(a - b) <= 1e-5 and ga == gb, fsdp
    assert eight.generate_until(prompts) == want_text


def test_bfloat16_scores_what_the_model_computes_in_bfloat16():
  """dtype="bfloat16" runs the model in bfloat16 (float32 master weights, float32 log-softmax): each request's
  log-likelihood equals an unbatched bfloat16 forward within bfloat16 rounding of the logits, and is near,
  not equal to, float32's."""
  cfg = models.resolve({**FAMILIES["llama"], "dtype": "bfloat16"})
  graphdef, params = models.init(cfg, jax.random.PRNGKey(1))
  import tempfile

  with tempfile.TemporaryDirectory() as folder:
    model_io.export(folder, params, "lm", dataclasses.replace(cfg, dtype="float32"), tokenizer="bytes")
    bf16 = lm_eval_model.JaxLM(folder, batch_size=4, dtype="bfloat16")
    f32 = lm_eval_model.JaxLM(folder, batch_size=4)
    assert (bf16.cfg.dtype, f32.cfg.dtype) == ("bfloat16", "float32")
    requests = _requests("loglikelihood", CONTEXTS[:3])
    got, got32 = bf16.loglikelihood(requests), f32.loglikelihood(requests)
  for (context, continuation), (logprob, _), (logprob32, _) in zip(CONTEXTS[:3], got, got32):
    ids = (
      ([bf16.prefix_token_id], bf16.tokenizer.encode(continuation))
      if not context
      else bf16._encode_pair(context, continuation)
    )
    want = _slow_pair(graphdef, params, cfg, *ids)[0]
    assert abs(logprob - want) <= 0.02 * len(ids[1]), (context, logprob, want)
    assert logprob != logprob32 and abs(logprob - logprob32) <= 0.05 * len(ids[1]), (logprob, logprob32)


def _local_tasks(tmp_path) -> str:
  """The three task YAMLs of tests/eval_tasks with their data written under tmp_path; their paths, joined."""
  data = tmp_path / "data"
  data.mkdir()
  mc = [{"question": f"{i} plus one is", "choices": [f"{i + 1}", f"{i + 2}", "cat"], "answer": i % 3} for i in range(6)]
  rows = {
    "mc.jsonl": mc,
    "ppl.jsonl": [{"text": "the world is round and the sea is deep. " * 3}, {"text": "a short one."}],
    "gen.jsonl": [{"question": "Say a:", "answer": "a"}, {"question": "Say b:", "answer": "b"}],
  }
  for name, records in rows.items():
    (data / name).write_text("".join(json.dumps(r) + "\n" for r in records))
  out = []
  for task in ("local_mc", "local_ppl", "local_gen"):
    path = tmp_path / f"{task}.yaml"
    path.write_text((TASKS / f"{task}.yaml").read_text().replace("DATA_DIR", str(data)))
    out.append(str(path))
  return ",".join(out)


def test_the_command_runs_local_tasks_and_its_accuracy_is_the_backends(gpt_model, tmp_path, capsys):
  """docs/evaluation.md's command (doc_examples.EVALUATE_RUN) on a tiny model and the three local tasks."""
  folder = gpt_model
  tasks = _local_tasks(tmp_path)
  subs = {"runs/ppo": folder, "hellaswag,truthfulqa_mc2": tasks, "runs/eval_ppo": str(tmp_path / "out")}
  evaluate.main(d.argv(d.shrink(d.EVALUATE_RUN, subs, extra=("--batch_size=4",)))[3:])
  printed = capsys.readouterr().out
  assert "local_mc" in printed and "compiled programs:" in printed
  results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
  assert (
    math.isfinite(results["local_ppl"]["word_perplexity,none"]) and results["local_ppl"]["word_perplexity,none"] > 1
  )
  assert results["local_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
  # The harness's accuracy is the argmax of our log-likelihoods over the choices, as computed by hand.
  lm = lm_eval_model.JaxLM(folder, batch_size=4)
  correct = []
  for i in range(6):
    choices = [f" {i + 1}", f" {i + 2}", " cat"]  # lm-eval's target delimiter " " before each choice
    scores = [lm.loglikelihood(_requests("loglikelihood", [(f"{i} plus one is", c)]))[0][0] for c in choices]
    correct.append(int(np.argmax(scores)) == i % 3)
  assert results["local_mc"]["acc,none"] == pytest.approx(np.mean(correct))
  assert (tmp_path / "out" / "results.md").read_text().count("local_") >= 3


@pytest.mark.parametrize(
  "tasks, message",
  [
    ("hellaswagg", "--tasks: 'hellaswagg' is not an lm-eval task; did you mean hellaswag"),
    ("missing.yaml", "--tasks: missing.yaml: no such task file"),
    ("", "--tasks: empty; give lm-eval task names or task YAML files, comma-separated"),
  ],
)
def test_a_bad_task_is_one_line(gpt_model, tmp_path, capsys, tasks, message):
  local = _local_tasks(tmp_path)
  spec = tasks if tasks != "hellaswagg" else f"{local.split(',')[0]},hellaswagg"
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([f"--init_from={gpt_model}", f"--tasks={spec}", f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_reward_model_is_one_line(tmp_path, capsys):
  cfg = models.resolve(FAMILIES["gpt"])
  _, params = models.init(cfg, jax.random.PRNGKey(0), kind="scalar")
  model_io.export(str(tmp_path / "rm"), params, "scalar", cfg, tokenizer="bytes")
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([f"--init_from={tmp_path / 'rm'}", f"--tasks={_local_tasks(tmp_path)}", f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err == (
    f"error: --init_from: {tmp_path / 'rm'} is not a language model (a reward model scores, not generates)\n"
  )


def test_chat_puts_the_harness_prompts_in_the_tokenizers_template(tmp_path, capsys, monkeypatch):
  """--chat: lm-eval hands the context to JaxLM.apply_chat_template (a user turn, the assistant's opened);
  the multiple-choice requests then start from the rendered turn, and the accuracy is the argmax of their
  scores. The rendering, by hand, for both of the harness's forms (with and without a generation prompt)."""
  from hf_test import tiny_hf_folder

  template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
  template += "{% if add_generation_prompt %}<assistant>{% endif %}"
  folder = tiny_hf_folder(tmp_path, chat_template=template)[0]
  lm = lm_eval_model.JaxLM(f"hf:{folder}", batch_size=4)
  eos = "<|endoftext|>"  # the folder's eos_token
  history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello "}]
  assert lm.apply_chat_template(history[:1]) == f"<user>Hi{eos}<assistant>"
  # The last message left open for the model to continue: cut where its content ends (its trailing space too,
  # as transformers does when the template keeps it).
  assert lm.apply_chat_template(history, add_generation_prompt=False) == f"<user>Hi{eos}<assistant>Hello "
  assert lm.chat_template(True) == template and lm.chat_template(False) is None
  # A special token the template writes is its id, as transformers tokenizes it (training data's never is).
  assert lm.encode(f"Hi{eos}") == [*lm.tokenizer.encode("Hi"), lm.tokenizer.eos_id] != lm.tokenizer.encode(f"Hi{eos}")

  seen = []
  score = lm_eval_model.JaxLM.loglikelihood
  monkeypatch.setattr(lm_eval_model.JaxLM, "loglikelihood", lambda self, rs: seen.append(rs) or score(self, rs))
  tasks = _local_tasks(tmp_path).split(",")[0]  # local_mc
  args = [f"--init_from=hf:{folder}", f"--tasks={tasks}", f"--out={tmp_path / 'out'}", "--batch_size=4"]
  evaluate.main([*args, "--chat", "--no_progress_bar"])
  capsys.readouterr()
  requests = [r for batch in seen for r in batch]
  assert len(requests) == 18 and all(r.args[0].startswith("<user>") for r in requests)
  assert all(r.args[0].endswith("<assistant>") for r in requests), requests[0].args
  results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["local_mc"]
  by_doc = {}
  for r, (logprob, _) in zip(requests, lm.loglikelihood(requests)):
    by_doc.setdefault(r.doc_id, []).append((r.idx, logprob))
  correct = [max(scores, key=lambda s: s[1])[0] == doc % 3 for doc, scores in sorted(by_doc.items())]
  assert results["acc,none"] == pytest.approx(np.mean(correct))


def test_a_model_without_a_template_or_a_tokenizer_is_one_line(tmp_path, capsys):
  from hf_test import tiny_hf_folder

  folder = tiny_hf_folder(tmp_path)[0]
  tasks = _local_tasks(tmp_path).split(",")[0]

  def error(*flags):
    with pytest.raises(SystemExit) as exit_info:
      evaluate.main([f"--tasks={tasks}", f"--out={tmp_path / 'out'}", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err

  assert error(f"--init_from=hf:{folder}", "--chat") == (
    f"error: --chat: the model's tokenizer ({folder}) has no chat template "
    "(tokenizer_config.json or chat_template.jinja)\n"
  )
  (folder / "tokenizer.json").unlink()
  assert error(f"--init_from=hf:{folder}") == (
    f"error: --tokenizer: {folder} (the HF model) holds no tokenizer.json; set --tokenizer to its tokenizer\n"
  )
  assert error(f"--init_from=hf:{folder}", f"--tokenizer={tmp_path / 'none.json'}").startswith(
    f"error: --tokenizer: {tmp_path / 'none.json'} does not exist"
  )
  small = dataclasses.replace(models.resolve(FAMILIES["gpt"]), vocab_size=128)  # fewer ids than the byte tokenizer's
  model_io.export(str(tmp_path / "small"), models.init(small, jax.random.PRNGKey(0))[1], "lm", small, tokenizer="bytes")
  assert "more than the model's vocabulary of 128: it is not the model's tokenizer" in error(
    f"--init_from={tmp_path / 'small'}"
  )


def test_a_task_whose_data_file_is_missing_is_one_line_before_the_model_loads(gpt_model, tmp_path, capsys):
  tasks = _local_tasks(tmp_path).split(",")[0]
  (tmp_path / "data" / "mc.jsonl").unlink()
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([f"--init_from={gpt_model}", f"--tasks={tasks}", f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("error: --tasks: the data of local_mc could not be read: ") and "mc.jsonl" in err, err


def _results(task_metrics: dict) -> dict:
  """lm-eval's results layout: {task: {"name,filter": value, "name_stderr,filter": error}}."""
  out, better = {}, {}
  for task, metrics in task_metrics.items():
    out[task] = {"alias": task}
    for name, (value, error, up) in metrics.items():
      out[task][f"{name},none"], out[task][f"{name}_stderr,none"] = value, error
      better.setdefault(task, {})[name] = up
  for task in out:
    out[task]["sample_len,none"] = 6  # a count lm-eval reports beside the metrics: not a row
  return {"results": out, "higher_is_better": better}


def test_the_alignment_tax_table_by_hand():
  start = _results({"mc": {"acc": (0.5, 0.03, True)}, "ppl": {"word_perplexity": (20.0, "N/A", False)}})
  sft = _results({"mc": {"acc": (0.56, 0.04, True)}, "ppl": {"word_perplexity": (22.5, "N/A", False)}})
  ppo = _results({"mc": {"acc": (0.47, 0.03, True)}})  # a task the last model was not run on: a dash
  table = lm_eval_tasks.tax_table({"start": start, "SFT": sft, "PPO": ppo})
  assert table.splitlines() == [
    "| task | metric | start | SFT | PPO | SFT − start | PPO − start |",
    "|---|---|---|---|---|---|---|",
    # 0.06 ± √(0.03² + 0.04²) = 0.05; −0.03 ± √(2·0.03²) = 0.0424
    "| mc | acc ↑ | 0.5000 ± 0.0300 | 0.5600 ± 0.0400 | 0.4700 ± 0.0300 | +0.0600 ± 0.0500 | -0.0300 ± 0.0424 |",
    "| ppl | word_perplexity ↓ | 20.0000 | 22.5000 | — | +2.5000 | — |",
  ]


def test_several_models_share_one_backend_and_a_rerun_reads_their_results(gpt_model, tmp_path, monkeypatch):
  """evaluate_models: a second model of the same shape is swapped into the first's backend (no new compile)
  and scores what a backend of its own scores; a rerun reads each model's results.json back."""
  cfg = models.resolve(FAMILIES["gpt"])
  other = str(tmp_path / "other")
  model_io.export(other, models.init(cfg, jax.random.PRNGKey(7))[1], "lm", cfg, tokenizer="bytes")
  tasks = _local_tasks(tmp_path).split(",")[0]
  built = []
  backend = lm_eval_model.JaxLM
  monkeypatch.setattr(lm_eval_model, "JaxLM", lambda *a, **k: built.append(a) or backend(*a, **k))
  both = lm_eval_tasks.evaluate_models({"a": gpt_model, "b": other}, tasks, str(tmp_path / "eval"), batch_size=4)
  assert built == [(gpt_model,)]  # one backend: b was swapped in
  alone = lm_eval_tasks.evaluate_models({"b": other}, tasks, str(tmp_path / "alone"), batch_size=4)
  assert both["b"]["results"] == alone["b"]["results"] and both["a"]["results"] != both["b"]["results"]
  assert (tmp_path / "eval" / "1_b" / "results.json").exists()
  again = lm_eval_tasks.evaluate_models({"a": gpt_model, "b": other}, tasks, str(tmp_path / "eval"), batch_size=4)
  assert len(built) == 2 and again["b"]["results"] == both["b"]["results"]  # read back, no third backend


def test_the_documented_commands_run(tmp_path, capsys):
  """docs/evaluation.md's second command (doc_examples.EVALUATE_HF): an HF folder in bfloat16, its parameters
  split over fsdp=2 of the 8 devices, on the local multiple-choice task. (The first: the test above.)"""
  from hf_test import tiny_hf_folder

  folder = tiny_hf_folder(tmp_path)[0]
  mc = _local_tasks(tmp_path).split(",")[0]
  subs = {"/path/to/SmolLM2-360M": str(folder), "my_tasks/local_mc.yaml": mc, "runs/eval_start": str(tmp_path / "b")}
  evaluate.main(d.argv(d.shrink(d.EVALUATE_HF, subs))[3:])
  assert "local_mc" in capsys.readouterr().out
  results = json.loads((tmp_path / "b" / "results.json").read_text())
  assert results["instructgpt_jax"]["dtype"] == "bfloat16"
  assert results["instructgpt_jax"]["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  assert 0.0 <= results["results"]["local_mc"]["acc,none"] <= 1.0
