"""Our lm-eval backend (library/lm_eval_model.JaxLM) against lm-eval's own HuggingFace backend (`--model hf`,
lm_eval.models.huggingface.HFLM in the reference venv: benchmarks/lm_eval_reference.py) on the real
SmolLM2-135M-Instruct, window 128, batch 16: the 200 mixed requests of benchmarks/lm_eval_speed.py
(160 multiple-choice log-likelihoods, 8 rolling documents of 2-5 windows, 32 greedy generations with stop
strings, from ../shared/data), a whole local task through both harness runs, and bfloat16.

Measured when written (2026-12-07, 2-core CPU; the figures do not depend on the load):
- float32: the largest |Δ log-likelihood| 1.9e-4 (a 13-token continuation), of the rolling sums 4.1e-3 (a
  527-token document: 3.9e-6 of it); is_greedy, the multiple-choice argmax and all 32 generations
  identical. The gap is the HF backend's float32 arithmetic: against the HF backend run in float64 on the
  same requests (`benchmarks/lm_eval_speed.py --float64_check`), ours is within 5.8e-5 (log-likelihoods,
  mean Δ -1e-6) and 1.8e-4 (rolling sums), the HF backend's own float32 run within 1.6e-4 and 4.2e-3, and
  biased one way (mean Δ +4.5e-5 and +3.1e-3: up to 2.3e-5 per token on a short continuation, 1e-5 per token
  over the documents). An error of ε per token sums to Nε over N tokens, so the tolerance is 1e-4 + 2e-5·N
  (N = the tokens scored): 1e-4 for a short continuation, as asked, plus the HF backend's own per-token
  float32 error; the worst measured gap is 0.69 of it.
- bfloat16 (the same 160 log-likelihoods, both sides in bfloat16): the largest |Δ| 0.91 (a 7-token
  continuation: ours -49.16, HF -48.25, float32 -48.63), the median 0.10; is_greedy identical; the argmax of
  39 of the 40 questions the same (in the other the HF backend's sums tie at -19.0 where float32 has -18.93
  against -19.12; ours answers as float32 does). The HF backend takes the log-softmax and sums it in the
  model's dtype, so its answers are bfloat16 numbers (-48.25: spacing 0.25 between 32 and 64); ours takes a
  float32 log-softmax of bfloat16 logits. Against float32, ours is off by up to 0.54 (0.13 per token), the HF
  backend by up to 0.91 (0.23 per token). The tolerance, 0.2·N + the bfloat16 spacing at the HF backend's
  answer, is 1.5 times the worst measured (0.49 at N = 3).

`test_chat_templated_requests_equal_the_hf_backend`: text holding a chat template's special tokens (what
lm-eval's --chat hands a backend) equal too, and an empty context whose continuation starts with the prefix
token <|im_start|> (lm-eval then takes that token as the context). Both failed when this test was written
(cbfd89d and 79d3520 fixed them): ours read "<|im_start|>" as seven text tokens (-3.63 against -0.84 for
"The capital of France is Paris." after the ChatML question), then scored log p(<|im_start|> | <|im_start|>)
on top (-54.28 against -32.57 for the ChatML question alone).
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra; tests/run.sh installs it")

from lm_eval_test import _local_tasks  # noqa: E402  (the local task YAMLs and their data)

from benchmarks import lm_eval_speed, side_by_side  # noqa: E402
from instructgpt_jax.data import tokenizer as tokenizer_lib  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WINDOW, BATCH = 128, 16
# lm-eval's --chat renders prompts as SmolLM2's template (ChatML) does; here without a system message.
CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CHAT = {
  "loglikelihood": [
    [CHATML.format("What is the capital of France?"), "The capital of France is Paris."],
    [CHATML.format("What is the capital of France?"), "The capital of France is Rome."],
    [CHATML.format("Is the sea salty?"), "Yes, the sea is salty."],
    [CHATML.format("Is the sea salty?"), "No, the sea is sweet."],
    ["", CHATML.format("What is the capital of France?") + "The capital of France is Paris.<|im_end|>\n"],
  ],
}


def reference_python() -> str:
  path = os.environ.get(side_by_side.REF_PYTHON_VARIABLE) or str(REPO_ROOT / ".cache" / "venv-ref" / "bin" / "python")
  if not os.path.isfile(path):
    pytest.skip(f"lm-eval parity: no reference venv at {path} (.ci/run creates it from requirements-ref.txt)")
  if subprocess.run([path, "-c", "import lm_eval.models.huggingface"], capture_output=True).returncode:
    pytest.skip(f"lm-eval parity: {path} has no lm_eval.models.huggingface (lm-eval[hf], requirements-ref.txt)")
  return path


def tolerance(tokens: int) -> float:
  """|Δ| allowed between two float32 sums over `tokens` log-probs (the module docstring says why)."""
  return 1e-4 + 2e-5 * tokens


class Runs:
  """Each side's answers, computed once per test session by the first test that asks (holding
  exclusive_memory) and kept as JSON in a folder that xdist's workers share."""

  def __init__(self, folder: pathlib.Path, data: pathlib.Path, root: pathlib.Path, ref_python: str):
    self.folder, self.ref_python, self.root = str(folder), ref_python, root
    self.requests = lm_eval_speed.build_requests(tokenizer_lib.load(self.folder), str(data))
    self.both = {t: self.requests[t] + CHAT.get(t, []) for t in lm_eval_speed.REQUEST_TYPES}

  def get(self, name: str) -> dict:
    path = self.root / f"lm_eval_parity_{name}.json"
    if not path.exists():
      result = getattr(self, f"_{name}")()
      path.with_suffix(".tmp").write_text(json.dumps(result))
      path.with_suffix(".tmp").rename(path)
    return json.loads(path.read_text())

  def plain(self, name: str) -> dict:
    """A side's answers to the benchmark's requests (the chat-templated ones left out)."""
    result = self.get(name)
    return {t: result[t][: len(self.requests[t])] for t in lm_eval_speed.REQUEST_TYPES if t in result}

  def chat(self, name: str) -> dict:
    result = self.get(name)
    return {t: result[t][len(self.requests[t]) :] for t in CHAT}

  def _ours(self, requests: dict, dtype: str) -> dict:
    """Ours in a process of its own on one CPU device (benchmarks/lm_eval_speed.py --only ours), as the
    evaluate command and the speed benchmark below run, so that they find its programs in the compilation
    cache."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="lm_eval_parity_ours", dir=self.root))
    (folder / "requests.json").write_text(json.dumps(requests))
    script, out = REPO_ROOT / "benchmarks" / "lm_eval_speed.py", folder / "out.json"
    command = [sys.executable, str(script), "--only", "ours", "--hf", self.folder, "--json_out", str(out)]
    command += ["--requests", str(folder / "requests.json"), "--dtype", dtype, "--passes", "1"]
    command += ["--max_length", str(WINDOW), "--batch_size", str(BATCH)]
    done = subprocess.run(command, capture_output=True, text=True, env=side_by_side.child_env(), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())

  def _reference(self, requests: dict, dtype: str) -> dict:
    return lm_eval_speed.run_reference(
      self.folder, requests, dtype=dtype, max_length=WINDOW, batch_size=BATCH, ref_python=self.ref_python
    )

  def _ours_float32(self):
    return self._ours(self.both, "float32")

  def _hf_float32(self):
    return self._reference(self.both, "float32")

  def _ours_bfloat16(self):
    return self._ours({"loglikelihood": self.requests["loglikelihood"]}, "bfloat16")

  def _hf_bfloat16(self):
    return self._reference({"loglikelihood": self.requests["loglikelihood"]}, "bfloat16")

  def _tasks(self):
    """local_mc and local_ppl (tests/eval_tasks) through our evaluate command and through the HF backend's
    simple_evaluate, both at the window and batch above: {"ours": results, "hf": results}."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lm_eval_parity_tasks", dir=self.root))
    tasks = ",".join(_local_tasks(tmp).split(",")[:2])
    assert tasks.endswith("local_ppl.yaml"), tasks
    ours = [sys.executable, "-m", "instructgpt_jax.evaluate", f"--init_from=hf:{self.folder}", f"--tasks={tasks}"]
    ours += [f"--out={tmp / 'ours'}", f"--batch_size={BATCH}", f"--max_length={WINDOW}", "--no_progress_bar"]
    hf = [self.ref_python, str(REPO_ROOT / "benchmarks" / "lm_eval_reference.py"), "tasks", "--pretrained", self.folder]
    hf += ["--tasks", tasks, "--out", str(tmp / "hf.json"), "--batch_size", str(BATCH), "--max_length", str(WINDOW)]
    for command in (ours, hf):
      done = subprocess.run(command, capture_output=True, text=True, env=side_by_side.child_env(), cwd=REPO_ROOT)
      assert done.returncode == 0, done.stderr[-3000:]
    return {
      "ours": json.loads((tmp / "ours" / "results.json").read_text()),
      "hf": json.loads((tmp / "hf.json").read_text()),
    }


@pytest.fixture(scope="module")
def runs(smollm2_folder, shared_data, tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by its workers
  return Runs(smollm2_folder, shared_data, root, reference_python())


def harness_encoder(folder: str):
  """Text -> ids as the HF backend's tokenizer gives them: special tokens written in the text are their ids."""
  import tokenizers

  raw = tokenizers.Tokenizer.from_file(str(pathlib.Path(folder) / "tokenizer.json"))
  return lambda text: raw.encode(text, add_special_tokens=False).ids


def _continuation_tokens(encode, context: str, continuation: str, prefix_id: int = 1) -> int:
  """N: the tokens lm-eval scores for a (context, continuation) request (at most the window); `prefix_id`:
  SmolLM2's BOS, which an empty context's continuation may start with (then it is the context)."""
  if not context:
    ids = encode(continuation)
    return min(WINDOW, len(ids) - (ids[:1] == [prefix_id]))
  spaces = len(context) - len(context.rstrip())
  context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
  return min(WINDOW, len(encode(context + continuation)) - len(encode(context)))


def test_the_request_set_is_the_issues(runs):
  requests = runs.requests
  assert lm_eval_speed.count(requests) == 200
  assert [len(requests[t]) for t in lm_eval_speed.REQUEST_TYPES] == [160, 8, 32]
  contexts = [c for c, _ in requests["loglikelihood"]]
  assert contexts.count("") == 8 and sum(c.endswith(" ") for c in contexts) >= 30
  tokenizer = tokenizer_lib.load(runs.folder)
  assert sum(len(tokenizer.encode(c)) > WINDOW for c in contexts) >= 8  # cut to the window on both sides
  document_tokens = [len(tokenizer.encode(d)) for (d,) in requests["loglikelihood_rolling"]]
  assert min(document_tokens) >= 200 and max(document_tokens) <= 530, document_tokens
  assert {kwargs["max_gen_toks"] for _, kwargs in requests["generate_until"]} == {24}
  assert {tuple(kwargs["until"]) for _, kwargs in requests["generate_until"]} == {("\n\n",), ("\n\nHuman:",)}


def test_float32_scores_equal_the_hf_backend(runs, exclusive_memory):
  ours, hf = runs.plain("ours_float32"), runs.plain("hf_float32")
  encode = harness_encoder(runs.folder)
  worst = []
  for (context, continuation), (logprob, greedy), (want, want_greedy) in zip(
    runs.requests["loglikelihood"], ours["loglikelihood"], hf["loglikelihood"]
  ):
    n = _continuation_tokens(encode, context, continuation)
    assert abs(logprob - want) <= tolerance(n), (context[-60:], continuation, n, logprob, want)
    assert greedy == want_greedy, (context[-60:], continuation)
    worst.append(abs(logprob - want))
  assert max(worst) > 0  # two implementations, not one answer copied
  assert lm_eval_speed.compare(ours, hf, 4)["mc_argmax_agreement"] == 1.0
  for (document,), total, want in zip(
    runs.requests["loglikelihood_rolling"], ours["loglikelihood_rolling"], hf["loglikelihood_rolling"]
  ):
    n = len(encode(document))
    assert abs(total - want) <= tolerance(n), (n, total, want)
    assert total < -100  # hundreds of tokens at a few nats each


def test_float32_generations_equal_the_hf_backend(runs, exclusive_memory):
  ours, hf = runs.plain("ours_float32"), runs.plain("hf_float32")
  for (context, kwargs), text, want in zip(
    runs.requests["generate_until"], ours["generate_until"], hf["generate_until"]
  ):
    assert text == want, (context[-80:], kwargs, text, want)
    assert not any(stop in text for stop in kwargs["until"])
  assert sum(bool(t.strip()) for t in ours["generate_until"]) >= 28  # the model says something


def test_chat_templated_requests_equal_the_hf_backend(runs, exclusive_memory):
  """lm-eval's --chat hands the backend text holding the template's special tokens; the HF backend's tokenizer
  reads "<|im_start|>" as its one id, so ours must too. The last request has an empty context and a
  continuation that starts with the prefix token (BOS, <|im_start|>): lm-eval then takes that token as the
  context (lm_eval.api.model.TemplateLM.loglikelihood) rather than scoring it after a prefix token."""
  ours, hf = runs.chat("ours_float32"), runs.chat("hf_float32")
  encode = harness_encoder(runs.folder)
  for (context, continuation), (logprob, greedy), (want, want_greedy) in zip(
    CHAT["loglikelihood"], ours["loglikelihood"], hf["loglikelihood"]
  ):
    n = _continuation_tokens(encode, context, continuation)
    assert abs(logprob - want) <= tolerance(n) and greedy == want_greedy, (context, continuation, logprob, want)


def test_a_whole_task_gives_the_hf_backends_accuracy(runs, exclusive_memory):
  results = runs.get("tasks")
  ours, hf = results["ours"]["results"], results["hf"]["results"]
  assert ours["local_mc"]["acc,none"] == hf["local_mc"]["acc,none"]
  assert 0 < ours["local_mc"]["acc,none"] <= 1  # SmolLM2 knows some of "i plus one is"
  for metric in ("acc_norm,none",):
    assert (metric in ours["local_mc"]) == (metric in hf["local_mc"])
    if metric in hf["local_mc"]:
      assert ours["local_mc"][metric] == hf["local_mc"][metric]
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    assert ours["local_ppl"][metric] == pytest.approx(hf["local_ppl"][metric], rel=1e-5), metric


def bfloat16_spacing(x: float) -> float:
  """The distance between neighbouring bfloat16 numbers at |x| (8 significant bits)."""
  return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 0.0


def test_bfloat16_scores_are_near_the_hf_backends(runs, exclusive_memory):
  """Tolerance 0.2·N + the bfloat16 spacing at the HF backend's answer (module docstring)."""
  ours, hf = runs.get("ours_bfloat16"), runs.get("hf_bfloat16")
  encode = harness_encoder(runs.folder)
  for (context, continuation), (logprob, _), (want, _) in zip(
    runs.requests["loglikelihood"], ours["loglikelihood"], hf["loglikelihood"]
  ):
    n = _continuation_tokens(encode, context, continuation)
    assert abs(logprob - want) <= 0.2 * n + bfloat16_spacing(want), (context[-60:], continuation, n, logprob, want)
  figures = lm_eval_speed.compare(ours, hf, 4)
  print(f"bfloat16, ours against the HF backend: {figures}")
  assert len(figures["is_greedy_mismatches"]) <= 4
  assert figures["mc_argmax_agreement"] >= 0.95  # at most 2 of the 40 questions answered differently
  # Ours in bfloat16 answers the multiple choice as float32 does (its sums are float32 log-softmaxes).
  float32 = {"loglikelihood": runs.plain("hf_float32")["loglikelihood"]}
  assert lm_eval_speed.compare(ours, float32, 4)["mc_argmax_agreement"] >= 0.95


def test_the_speed_benchmark_runs_at_a_tiny_size(runs, exclusive_memory):
  command = [sys.executable, str(REPO_ROOT / "benchmarks" / "lm_eval_speed.py"), "--hf", runs.folder]
  command += ["--contexts", "3", "--documents", "1", "--prompts", "1", "--passes", "1", "--rounds", "1"]
  command += ["--ref_python", runs.ref_python]
  done = subprocess.run(
    command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=side_by_side.child_env()
  )
  assert done.returncode == 0, done.stderr[-3000:]
  print(done.stdout)
  for request_type, n in (("loglikelihood", 12), ("loglikelihood_rolling", 1), ("generate_until", 1)):
    assert f"| {request_type} | {n}" in done.stdout, request_type
  assert "| all | 14 |" in done.stdout
  assert "PARITY generate_until: mismatches 0" in done.stdout
