"""PPO's device memory with and without LoRA: the bytes of the arrays a run holds after its setup, by what they are.

    python benchmarks/lora_memory.py --size smollm2-135m --rank 16

For the full policy and for rank-R adapters on every attention and MLP projection (`model.lora.targets`' default),
it builds PPO's models and state the way stages/ppo.py does: `ppo_steps.Models.build` (a LoRA policy with no
`ppo.reference` gets no reference model: `reference_cfg=None`, its KL reference is its own base), the frozen
reference and reward model in their targets' shardings (`model_io.load_frozen`), the critic with the policy's
adapters and the RM without (`stages.ppo.critic_config`), and `ppo_steps.initial_state` (the policy's Adam
moments and EMA, the critic's Adam moments). The parameters are a random initialization of the size (what a run
without `model.init_from` starts from); bytes do not depend on the values. Then every live device array
(`jax.live_arrays()`) is assigned to the part of the state that holds it, by identity, and summed: the bytes on
the first device (all of them on one CPU device). "other" is any live array no part holds (a leak would show
there; arrays live before the setup are left out), "step, keys, KL" the scalars. A line per variant sums the
parts as `launch.aot`'s plan sums its params and opt state columns (library/aot.py ppo_plan) and sets that
against what the plan counts from the abstract state.

The RM and the critic are the policy's shape unless `--rm_size` names another size (the critic starts from the
RM, App. C.4). `--devices N` lays the state out over N fake CPU devices (mesh fsdp = N) and counts the first's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/


def _devices_flag(argv) -> None:
  """--devices N needs the fake devices before jax starts."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--devices", type=int, default=1)
  n = parser.parse_known_args(argv)[0].devices
  if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()


if __name__ == "__main__":
  _devices_flag(sys.argv[1:])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks import _common  # noqa: E402
from configs import ppo as ppo_config  # noqa: E402
from instructgpt_jax import models, optim, sharding, train_state  # noqa: E402
from instructgpt_jax.library import aot, model_io, ppo_steps  # noqa: E402
from instructgpt_jax.models import lora  # noqa: E402

MiB = 2**20

# The parts of PPO's state, in the table's order.
KINDS = (
  "policy params (base)",
  "policy adapters",
  "policy optimizer state",
  "policy EMA",
  "reference params",
  "critic params",
  "critic optimizer state",
  "reward model params",
  "step, keys, KL",
  "other",
)


def ppo_config_for(size: str, rank: int, *, devices: int = 1):
  """configs/ppo.py at `size` with rank-`rank` adapters (0: full fine-tuning), mesh fsdp over `devices`."""
  c = ppo_config.get_config(f"size={size}")
  c.model.lora.rank = rank
  c.mesh.fsdp = devices
  return c


def build(config, *, rm_size: str = "", devices: int = 1, seed: int = 0):
  """(Models, PPOState, reference params or None, RM params): PPO's setup as stages/ppo.py does it, from a
  random initialization of the config's size; the RM and critic of `rm_size` ("" = the policy's size)."""
  policy_cfg = models.resolve(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices=jax.devices()[:devices])
  rules = sharding.rules_dict(config.sharding_rules)
  reward_cfg = dataclasses.replace(policy_cfg, lora=models.LoraConfig())  # frozen: no adapters
  if rm_size:  # another shape, the policy's runtime fields (dtypes, remat), as aot._ppo_models makes it
    runtime = {k: v for k, v in config.model.to_dict().items() if k not in model_io.SHAPE_FIELDS}
    reward_cfg = dataclasses.replace(models.resolve(dict(runtime, size=rm_size)), lora=models.LoraConfig())
  critic_cfg = dataclasses.replace(reward_cfg, lora=policy_cfg.lora)  # stages/ppo.critic_config
  lora_reference = bool(policy_cfg.lora.rank) and not config.ppo.reference  # stages/ppo.lora_reference
  reference_cfg = None if lora_reference else dataclasses.replace(policy_cfg, lora=models.LoraConfig())
  p = config.ppo
  per_iteration = p.rollout_batch // p.minibatch * p.epochs
  m = ppo_steps.Models.build(
    p,
    policy_cfg=policy_cfg,
    reference_cfg=reference_cfg,
    reward_cfg=reward_cfg,
    critic_cfg=critic_cfg,
    reward_bias=0.0,
    eos_id=0,
    pad_id=1,
    policy_tx=optim.make_optimizer(config.optim, 10 * per_iteration),
    policy_lr=optim.schedule(config.optim, 10 * per_iteration),
    critic_tx=optim.make_optimizer(config.value_optim, 10 * per_iteration),
    mesh=mesh,
    rules=rules,
  )
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  # The frozen models, each its own arrays (model_io.load_frozen reads them apart from the policy).
  ref_params = None
  if reference_cfg is not None:
    ref_params = train_state.random_params(reference_cfg, m.targets["reference"], keys[0])
  rm_params = train_state.random_params(reward_cfg, m.targets["reward"], keys[1], kind="scalar")
  policy_params = train_state.random_params(policy_cfg, m.targets["policy"], keys[2])
  critic_params = None
  if m.has_critic:
    critic_params = train_state.random_params(critic_cfg, m.targets["critic"], keys[3], kind="scalar")
  _, shardings = ppo_steps.abstract_state(m)
  state = ppo_steps.initial_state(m, shardings, policy_params, critic_params, keys[4], keys[5])
  del policy_params, critic_params  # the run keeps the state's (jit may hand back the same buffers)
  return m, state, ref_params, rm_params


def _parts(state, ref_params, rm_params) -> dict[str, object]:
  """The state's arrays by KINDS (but "other")."""
  policy = state.policy
  adapters, base = lora.split(policy.params)
  critic = state.critic
  return {
    "policy params (base)": base,
    "policy adapters": adapters,
    "policy optimizer state": policy.opt_state,
    "policy EMA": policy.ema,
    "reference params": ref_params,
    "critic params": critic.params if critic is not None else None,
    "critic optimizer state": critic.opt_state if critic is not None else None,
    "reward model params": rm_params,
    "step, keys, KL": (state.step, state.kl, policy.step, policy.rng, *((critic.step, critic.rng) if critic else ())),
  }


def device_bytes(array, device) -> int:
  """Bytes of `array`'s shards on `device`."""
  return sum(shard.data.nbytes for shard in array.addressable_shards if shard.device == device)


def live_bytes_by_kind(parts: dict[str, object], device, before=()) -> dict[str, int]:
  """Every live device array's bytes on `device`, summed by the part of `parts` that holds it ("other": none);
  arrays of `before` (live before the setup, e.g. another test's in the same process) left out."""
  owner = {}
  for kind, tree in parts.items():
    for leaf in jax.tree.leaves(tree):
      owner.setdefault(id(leaf), kind)
  earlier = {id(x) for x in before}
  out = dict.fromkeys(KINDS, 0)
  for array in jax.live_arrays():
    kind = owner.get(id(array), "other")
    if kind != "other" or id(array) not in earlier:
      out[kind] += device_bytes(array, device)
  return out


def measure(size: str, rank: int, *, rm_size: str = "", devices: int = 1) -> dict:
  """{"kinds": bytes by KINDS on the first device, and parameter counts} of PPO set up at `size` with
  rank-`rank` adapters (0: full fine-tuning)."""
  gc.collect()
  before = jax.live_arrays()  # held until the count, so that no new array takes one's id
  config = ppo_config_for(size, rank, devices=devices)
  m, state, ref_params, rm_params = build(config, rm_size=rm_size, devices=devices)
  jax.block_until_ready((state, ref_params, rm_params))
  gc.collect()
  kinds = live_bytes_by_kind(_parts(state, ref_params, rm_params), jax.devices()[0], before)
  del before
  train = train_state.trainable(state.policy.params)
  out = {
    "kinds": kinds,
    "policy params": models.param_count(state.policy.params),
    "policy trainable": models.param_count(train),
    "reference": models.param_count(ref_params) if ref_params is not None else 0,
    "critic trainable": models.param_count(train_state.trainable(state.critic.params)) if m.has_critic else 0,
  }
  # What launch.aot's plan counts for the same state (library/aot.py ppo_plan: its params and opt state columns).
  abstract, _ = ppo_steps.abstract_state(m)
  critic = [abstract.critic] if m.has_critic else []
  out["aot params"] = aot.device_bytes(
    (abstract.policy.params, [c.params for c in critic], m.targets["reference"], m.targets["reward"])
  )
  out["aot opt state"] = aot.device_bytes(
    (abstract.policy.opt_state, abstract.policy.ema, [c.opt_state for c in critic])
  )
  del m, state, ref_params, rm_params
  gc.collect()
  return out


PARAMS = ("policy params (base)", "policy adapters", "reference params", "critic params", "reward model params")
OPT_STATE = ("policy optimizer state", "policy EMA", "critic optimizer state")


def totals(result: dict) -> tuple[int, int]:
  """(params, opt state): the measured bytes summed as the AOT plan's columns sum them."""
  return tuple(sum(result["kinds"][k] for k in kinds) for kinds in (PARAMS, OPT_STATE))


def aot_check(result: dict) -> str:
  """The measured bytes against the AOT plan's params and opt state columns, in words."""
  params, opt = totals(result)
  same = params == result["aot params"] and opt == result["aot opt state"]
  return (
    f"params {_mib(params)} MiB, opt state {_mib(opt)} MiB measured; the AOT plan counts {_mib(result['aot params'])}"
    f" and {_mib(result['aot opt state'])} MiB: {'the same' if same else 'DIFFERENT'}"
  )


def _mib(n: int) -> str:
  return f"{n / MiB:,.2f}"


def table_rows(full: dict, adapted: dict) -> list[dict]:
  rows = []
  for kind in (*KINDS, "total"):
    a = sum(full["kinds"].values()) if kind == "total" else full["kinds"][kind]
    b = sum(adapted["kinds"].values()) if kind == "total" else adapted["kinds"][kind]
    change = "-" if a == b else (f"{b / a:.4f}×" if a else "new")
    rows.append({"part of PPO's state": kind, "full MiB": _mib(a), "LoRA MiB": _mib(b), "LoRA / full": change})
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="smollm2-135m", help="a size of models/sizes.py (the policy's)")
  parser.add_argument("--rank", type=int, default=16, help="the LoRA rank, on every attention and MLP projection")
  parser.add_argument("--rm_size", default="", help="the RM's and critic's size ('': the policy's)")
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (mesh fsdp); bytes of the first")
  args = parser.parse_args(argv)
  print(_common.header(f"PPO state, {args.size}, LoRA rank {args.rank}"))
  full = measure(args.size, 0, rm_size=args.rm_size, devices=args.devices)
  adapted = measure(args.size, args.rank, rm_size=args.rm_size, devices=args.devices)
  print(
    f"# policy {full['policy params']:,} params (LoRA: {adapted['policy params']:,}, of which "
    f"{adapted['policy trainable']:,} train); reference {full['reference']:,} (LoRA: {adapted['reference']:,}); "
    f"critic trains {full['critic trainable']:,} (LoRA: {adapted['critic trainable']:,})"
  )
  print(f"# full: {aot_check(full)}\n# LoRA: {aot_check(adapted)}")
  print(_common.table(table_rows(full, adapted)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
