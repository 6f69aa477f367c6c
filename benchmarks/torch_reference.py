"""The PyTorch side of benchmarks/side_by_side.py, run with the reference venv's python (torch, transformers and
trl==1.12.0; requirements-ref.txt), never imported by the package. It prints one JSON line.

  torch_reference.py sft SPEC.json   a transformers GPT-2 training step (AdamW, clipped, masked next-token loss)
  torch_reference.py ppo SPEC.json   iterations of TRL 1.12's experimental PPOTrainer (policy, reference, value
                                     model and reward model, all GPT-2 of one shape)

SPEC holds the model shape (n_layers, d_model, n_heads, vocab_size, max_len) and the run's sizes; the ppo
spec also holds the prompt ids and the token ids of EOS and padding, so both sides see the same prompts.
Random weights, dropout off; float32 on `threads` CPU threads, unless the ppo spec says "device": "cuda"
(and "bf16": true for autocast), as benchmarks/gpu_suite.py does.
"""

import json
import statistics
import sys
import tempfile
import time

import torch
import transformers


def gpt2_config(spec) -> transformers.GPT2Config:
  return transformers.GPT2Config(
    n_layer=spec["n_layers"],
    n_embd=spec["d_model"],
    n_head=spec["n_heads"],
    n_positions=spec["max_len"],
    vocab_size=spec["vocab_size"],
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
    bos_token_id=spec.get("eos_id", 0),
    eos_token_id=spec.get("eos_id", 0),
    pad_token_id=spec.get("pad_id", 0),
  )


def sft(spec) -> dict:
  """Times `steps` training steps after `warmup` ones: forward, masked cross-entropy, backward, clip, AdamW."""
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(gpt2_config(spec)).float().train()
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=spec["weight_decay"]
  )
  batch, length = spec["batch"], spec["seq_len"]
  generator = torch.Generator().manual_seed(1)
  tokens = torch.randint(0, spec["vocab_size"], (batch, length + 1), generator=generator)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = torch.ones_like(targets, dtype=torch.float32)

  def step():
    logits = model(input_ids=inputs).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = (nll * mask.reshape(-1)).sum() / mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()

  start = time.perf_counter()
  for _ in range(spec["warmup"]):
    step()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(spec["steps"]):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"step_s": step_s, "tokens_per_s": batch * length / step_s, "first_step_s": warmup_s / spec["warmup"]}


def byte_tokenizer(vocab_size: int, eos_id: int, pad_id: int) -> transformers.PreTrainedTokenizerFast:
  """A tokenizer of `vocab_size` single-id tokens whose EOS and padding ids are ours (TRL pads and stops by them)."""
  import tokenizers

  vocab = {f"<{i}>": i for i in range(vocab_size)}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=core, eos_token=f"<{eos_id}>", pad_token=f"<{pad_id}>", padding_side="left"
  )


class _Clock:
  """Where TRL's iteration spends its time, read off calls TRL makes anyway (nothing it computes changes):
  `batch_generation` is the rollout; the first `forward` of the policy-and-value wrapper starts training;
  `on_step_end` (a TrainerCallback) ends the iteration, after TRL's own logging."""

  def __init__(self, trainer_module):
    self.marks = []  # per iteration: (rollout start, rollout end, training start, iteration end)
    self._current = {}
    generate, forward = trainer_module.batch_generation, trainer_module.forward

    def timed_generation(*args, **kwargs):
      self._current = {"rollout_start": time.perf_counter()}
      out = generate(*args, **kwargs)
      self._current["rollout_end"] = time.perf_counter()
      return out

    def timed_forward(model, *args, **kwargs):
      if hasattr(model, "value_model") and "train_start" not in self._current:
        self._current["train_start"] = time.perf_counter()
      return forward(model, *args, **kwargs)

    trainer_module.batch_generation, trainer_module.forward = timed_generation, timed_forward

  def callback(self):
    clock = self

    class EndOfIteration(transformers.TrainerCallback):
      def on_step_end(self, args, state, control, **kwargs):
        clock.marks.append(dict(clock._current, end=time.perf_counter()))

    return EndOfIteration()


def ppo(spec) -> dict:
  """Runs `warmup + iterations` PPO iterations; times the last `iterations` (episodes/s and the split)."""
  import datasets
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as trainer_module

  torch.manual_seed(0)
  config = gpt2_config(spec)
  policy = transformers.GPT2LMHeadModel(config).float()
  reference = transformers.GPT2LMHeadModel(config).float()
  reference.load_state_dict(policy.state_dict())  # PPO starts at the reference (the SFT model)
  score_config = gpt2_config(spec)
  score_config.num_labels = 1
  reward_model = transformers.GPT2ForSequenceClassification(score_config).float()
  value_model = transformers.GPT2ForSequenceClassification(score_config).float()
  tokenizer = byte_tokenizer(spec["vocab_size"], spec["eos_id"], spec["pad_id"])
  prompts = datasets.Dataset.from_dict({"input_ids": spec["prompts"]})

  rollout, minibatch = spec["rollout_batch"], spec["minibatch"]
  total_iterations = spec["warmup"] + spec["iterations"]
  with tempfile.TemporaryDirectory() as output_dir:
    args = PPOConfig(
      output_dir=output_dir,
      # One rollout batch of `rollout` prompts, trained in minibatches of `minibatch` rows: TRL accumulates
      # micro-batches of per_device_train_batch_size and steps its optimizer every gradient_accumulation_steps
      # of them (here once per epoch; ours steps once per minibatch: the same forward and backward work).
      per_device_train_batch_size=minibatch,
      gradient_accumulation_steps=rollout // minibatch,
      num_mini_batches=rollout // minibatch,
      local_rollout_forward_batch_size=rollout,  # one generate call for the whole batch, as ours
      total_episodes=rollout * total_iterations,
      num_ppo_epochs=spec["epochs"],
      response_length=spec["response_len"],
      temperature=spec["temperature"],
      stop_token="eos",
      kl_coef=spec["kl_coef"],
      cliprange=spec["clip"],
      cliprange_value=spec["clip"],
      gamma=1.0,
      lam=spec["lam"],
      learning_rate=spec["lr"],
      num_sample_generations=0,
      gradient_checkpointing=False,  # no recomputation on either side
      bf16=spec.get("bf16", False),  # autocast on a GPU (ours: bf16 compute, float32 parameters)
      fp16=False,
      use_cpu=spec.get("device", "cpu") == "cpu",
      report_to=[],
      logging_steps=1,
      save_strategy="no",
      disable_tqdm=True,
      seed=0,
    )
    clock = _Clock(trainer_module)
    trainer = PPOTrainer(
      args=args,
      processing_class=tokenizer,
      model=policy,
      ref_model=reference,
      reward_model=reward_model,
      value_model=value_model,
      train_dataset=prompts,
      eval_dataset=prompts.select(range(min(8, len(prompts)))),
      callbacks=[clock.callback()],
    )
    start = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - start
  marks = clock.marks
  if len(marks) != total_iterations:
    raise RuntimeError(f"TRL ran {len(marks)} iterations, expected {total_iterations}")
  steady = marks[spec["warmup"] :]
  # An iteration runs from the end of the previous one (TRL fetches the prompts, then generates) to its own end.
  ends = [m["end"] for m in marks]
  iteration = [ends[i] - ends[i - 1] for i in range(spec["warmup"], total_iterations)]
  rollout_s = [m["rollout_end"] - m["rollout_start"] for m in steady]
  scoring_s = [m["train_start"] - m["rollout_end"] for m in steady]
  training_s = [m["end"] - m["train_start"] for m in steady]
  iteration_s = statistics.median(iteration)
  return {
    "iteration_s": iteration_s,
    "episodes_per_s": rollout / iteration_s,
    "rollout_s": statistics.median(rollout_s),
    "scoring_s": statistics.median(scoring_s),
    "training_s": statistics.median(training_s),
    "first_iteration_s": ends[0] - start,
    "total_s": total_s,
  }


if __name__ == "__main__":
  command, spec_path = sys.argv[1:]
  with open(spec_path) as f:
    spec = json.load(f)
  torch.set_num_threads(spec.get("threads", 2))
  result = {"sft": sft, "ppo": ppo}[command](spec)
  print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, **result}))
