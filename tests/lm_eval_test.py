"""Our model as an lm-evaluation-harness backend (library/lm_eval_model.py) and the evaluate command: every request
type against a slow reference (one unbatched forward per request, or per generated token), on a tiny random
model of each family, sharded on 8 devices and on 1; lm-eval's tasks over local files (tests/eval_tasks/)."""

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
from instructgpt_jax.library import lm_eval_model, model_io  # noqa: E402

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


def _slow_logprobs(graphdef, params, tokens):
  """[len - 1, V] float32 log-softmax of one unpadded sequence's next-token logits."""
  logits, _ = models.apply(graphdef, params, np.asarray([tokens[:-1]], np.int32))
  return np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1))


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
    logits, _ = models.apply(graphdef, params, np.asarray([tokens], np.int32))
    tokens.append(int(np.argmax(np.asarray(logits[0, -1], np.float32))))
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
  assert all(length in (32, 48) for _, _, length in lm.compiled), lm.compiled


def test_eight_devices_give_what_one_gives(tiny_model):
  folder = tiny_model[0]
  assert len(jax.devices()) == 8
  eight = lm_eval_model.JaxLM(folder, batch_size=8)
  one = lm_eval_model.JaxLM(folder, batch_size=8, devices=jax.devices()[:1])
  requests = _requests("loglikelihood", CONTEXTS)
  for (a, ga), (b, gb) in zip(eight.loglikelihood(requests), one.loglikelihood(requests)):
    assert abs(a - b) <= 1e-5 and ga == gb


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
  folder = gpt_model
  tasks = _local_tasks(tmp_path)
  evaluate.main([f"--init_from={folder}", f"--tasks={tasks}", f"--out={tmp_path / 'out'}", "--batch_size=4"])
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
    ("local_mcc", "--tasks: 'local_mcc' is not an lm-eval task; did you mean local_mc"),
    ("missing.yaml", "--tasks: missing.yaml: no such task file"),
    ("", "--tasks: empty; give lm-eval task names or task YAML files, comma-separated"),
  ],
)
def test_a_bad_task_is_one_line(gpt_model, tmp_path, capsys, tasks, message):
  local = _local_tasks(tmp_path)
  spec = tasks if tasks != "local_mcc" else f"{local.split(',')[0]},local_mcc"
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
