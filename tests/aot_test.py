"""Ahead-of-time compilation of each stage's step (instructgpt_jax/aot.py) on a reduced topology: 8 fake CPU
devices and tiny models, one compile per stage. Argument sizes are exact, so they are checked against
closed-form counts and XLA's own per-device count; the pod table in docs/scaling.md comes from
`python -m launch.aot --report` with jax[tpu] installed."""

import dataclasses

import pytest

from instructgpt_jax import aot, errors, models, sweep
from instructgpt_jax.models import kv_cache
from launch import aot as aot_cli

CPU8 = aot.TARGETS["cpu-8"]


def test_sft_step_compiles_with_exact_per_device_state_and_batch():
  replicated = sweep.load_config("configs/sft.py:tiny")
  n = models.sizes.param_count_formula(models.resolve(replicated.model.to_dict()))
  _, plan = aot.plan_for(replicated, CPU8)  # data=8: everything whole on every device
  assert plan.models == {"policy": n}
  assert plan.params == 4 * n  # float32
  assert 0 <= plan.opt_state - 8 * n <= 16  # two Adam moments, plus the optimizer's step counters
  r = aot.report(sweep.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8"]), CPU8)
  assert r.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r.plan.params < plan.params / 4  # the embed axis of every matrix is split 8 ways
  (m,) = r.programs
  assert (m.name, m.temp, m.peak, m.error) == ("train_step", None, None, "")  # fake CPU: temp not measured
  # XLA's count of the compiled step's arguments on one device: the state (params, Adam, step, rng) and
  # this device's 2 of the 16 rows of 256 tokens in 5 arrays of 4 bytes.
  assert m.arguments == r.plan.params + r.plan.opt_state + 4 + 8 + 2 * 256 * 5 * 4
  assert m.aliased == r.plan.resident == r.plan.params + r.plan.opt_state + 4 + 8  # the state is donated
  assert r.fits is None  # the state fits in 16 GiB; activations are not measured on CPU
  print(f"\nSFT tiny per device: params {plan.params} B replicated, {r.plan.params} B with fsdp=8")


PPO_SMALL = [  # the tiny PPO config on 8 devices, small enough to compile in seconds
  "--config.mesh.fsdp=8",
  "--config.ppo.rollout_batch=16",
  "--config.ppo.minibatch=8",
  "--config.ppo.max_new_tokens=8",
  "--config.data.max_prompt_len=16",
  "--config.data.ptx_seq_len=32",
]


def test_ppo_holds_four_models_and_a_sharded_kv_cache():
  config = sweep.load_config("configs/ppo.py:tiny", PPO_SMALL)
  r = aot.report(config, CPU8, rm_size="tiny")
  print("\n" + aot.summary(r))
  cfg = models.resolve(config.model.to_dict())
  n = models.sizes.param_count_formula(cfg)
  assert r.plan.models == {"policy": n, "reference": n, "reward model": n + 65, "critic": n + 65}  # + scalar head
  assert r.plan.kv_cache == kv_cache.cache_bytes(cfg, 16, 16 + 8 - 1) // 8  # rows split over 8 devices
  rollout, train = r.programs
  assert [rollout.name, train.name] == ["rollout", "train_step"]
  plan_rollout, plan_train = r.plan.programs
  assert rollout.arguments == plan_rollout.argument_bytes  # policy params, 2 prompt arrays, key, length limit
  assert train.arguments == plan_train.argument_bytes
  # Parameters per device: policy and critic, and the frozen reference and RM with the same shapes.
  state = plan_train.args[0]
  assert r.plan.params == 2 * aot.device_bytes(state.policy.params) + 2 * aot.device_bytes(state.critic.params)
  assert r.plan.opt_state == aot.device_bytes((state.policy.opt_state, state.policy.ema, state.critic.opt_state))
  assert train.aliased == aot.device_bytes(state)  # the whole PPO state is donated
  assert r.plan.resident == train.aliased + aot.device_bytes(state.policy.params) + aot.device_bytes(
    state.critic.params
  )
  assert r.fits is None


def test_a_critic_free_estimator_plans_no_critic_and_saves_its_memory():
  overrides = PPO_SMALL
  gae = aot.report(sweep.load_config("configs/ppo.py:tiny", overrides), CPU8, rm_size="tiny")
  grpo_overrides = overrides + ["--config.ppo.advantage_estimator=grpo", "--config.ppo.samples_per_prompt=4"]
  grpo = aot.report(sweep.load_config("configs/ppo.py:tiny", grpo_overrides), CPU8, rm_size="tiny")
  print("\n" + aot.summary(gae) + "\n" + aot.summary(grpo))
  assert set(grpo.plan.models) == {"policy", "reference", "reward model"}
  critic = gae.plan.programs[1].args[0].critic
  assert grpo.plan.params == gae.plan.params - aot.device_bytes(critic.params)
  assert grpo.plan.opt_state == gae.plan.opt_state - aot.device_bytes(critic.opt_state)
  assert grpo.plan.resident == gae.plan.resident - aot.device_bytes(critic)
  assert grpo.programs[1].aliased == aot.device_bytes(grpo.plan.programs[1].args[0])


def test_a_state_larger_than_memory_does_not_fit_and_the_cli_prints_the_row(capsys):
  config = sweep.load_config("configs/rm.py:tiny", ["--config.mesh.fsdp=8"])
  small = dataclasses.replace(CPU8, name="cpu-8-small", hbm_gib=1e-4)  # 105 kB per device
  mesh, plan = aot.plan_for(config, small)
  r = aot.Report(small, "rm", dict(mesh.shape), plan, [aot.ProgramMemory("train_step", 0, 0, 0, None, None, 0.0)])
  assert plan.params + plan.opt_state > 1e-4 * aot.GiB and r.fits is False
  row = aot.table_records(r)[0]
  assert (row["temp"], row["peak"], row["HBM"], row["fits"]) == ("n/m", "n/m", "0.0001", "**no**")
  assert aot_cli.main(["--target=cpu-8", "--config=configs/rm.py:tiny", "--config.mesh.fsdp=8"]) == 0
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| cpu-8 | rm |"))
  assert row.startswith("| cpu-8 | rm | 0.1M reward model | 1, 8, 1 | train_step |")
  assert row.endswith("| - | n/m | n/m | 16 | state only: yes |")
  assert "=> state fits; activations not measured" in out
  libtpu_message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (31.05G) "
    "exceeds available HBM (30.75G)."
  )
  assert aot._short_error(libtpu_message) == "no compile: temp 31.05 G > 30.75 G usable"


def test_a_batch_the_mesh_does_not_divide_fails_before_compiling():
  config = sweep.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8", "--config.data.batch_size=12"])
  with pytest.raises(errors.ConfigError, match="data.batch_size: 12 does not divide over data×fsdp = 8"):
    aot.plan_for(config, CPU8)


HLO = """HloModule m

%layer (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %ag = f32[64]{0} all-gather(%p), dimensions={0}
  ROOT %ar = bf16[4,4]{1,0} all-reduce(%p), to_apply=%add
}

%step (q: s32[]) -> s32[] {
  %q = s32[] parameter(0)
  %w = f32[8]{0} while(%q), condition=%cond, body=%layer, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %s = (f32[16]{0}, f32[128]{0}, u32[]) all-gather-start(%q), dimensions={0}
}

%cond (c: s32[]) -> pred[] {
  ROOT %any = pred[] all-reduce(%c), to_apply=%or
}

%counted (c: s32[]) -> pred[] {
  %five = s32[]{:T(128)} constant(5)
  %c = s32[] parameter(0)
  ROOT %lt = pred[]{:T(512)} compare(%c, %five), direction=LT
}

%scanned (r: f32[10]) -> f32[10] {
  ROOT %r = f32[10]{0:T(128)} all-reduce(%r), to_apply=%add
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %once = (f32[2,3]{1,0}, s8[10]{0}) all-reduce(%x, %x), to_apply=%add
  %tpu_scan = f32[10]{0} while(%x), condition=%counted, body=%scanned
  %decode = s32[] while(%x), condition=%cond, body=%step
  ROOT %d = f32[8]{0} all-gather-done(%x)
}
"""


def test_collective_bytes_by_hand():
  """Per-device result bytes: a tuple sums its elements, an async start counts its largest (the result), a loop
  of known trip count multiplies (annotated, or `counter < N` as its whole condition), and a loop of unknown
  count (the decode loop) counts one iteration apart."""
  got = aot.collective_bytes(HLO)
  # The TPU-style scan (no trip count annotated; its condition is `counter < 5`) counts 5 times.
  assert got["once"] == {**dict.fromkeys(aot.COLLECTIVES, 0), "all-reduce": 2 * 3 * 4 + 10 + 5 * 10 * 4}
  # 3 layers' all-gathers and the async start's result; 3 layers' bf16 all-reduces and the condition's pred, which
  # both loops read (3 times inside, once per decode step).
  per_step = {"all-gather": 3 * 64 * 4 + 128 * 4, "all-reduce": 3 * 4 * 4 * 2 + 3 + 1}
  assert got["per_iteration"] == {**dict.fromkeys(aot.COLLECTIVES, 0), **per_step}
