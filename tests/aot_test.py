"""Ahead-of-time compilation of each stage's step (instructgpt_jax/library/aot.py) on a reduced topology: 8 fake CPU
devices and tiny models, one compile per stage. Argument sizes are exact, so they are checked against
closed-form counts and XLA's own per-device count; the pod table in docs/scaling.md comes from
`python -m launch.aot --report` with jax[tpu] installed. Target names (instructgpt_jax/accelerators.py), the
batch fallback, the changes tried on a plan that does not fit and the headroom warning are checked here on CPU
targets (where only the state decides a fit); the TPU-target tests at the end run where libtpu is installed."""

import dataclasses

import pytest

from instructgpt_jax import accelerators, config_lib, errors, hlo, models
from instructgpt_jax.library import aot
from instructgpt_jax.models import kv_cache
from launch import aot as aot_cli

CPU8 = accelerators.parse_target("cpu-8")


def test_sft_step_compiles_with_exact_per_device_state_and_batch():
  replicated = config_lib.load_config("configs/sft.py:tiny")
  n = models.sizes.param_count_formula(models.resolve(replicated.model.to_dict()))
  _, plan = aot.plan_for(replicated, CPU8)  # data=8: everything whole on every device
  assert plan.models == {"policy": n}
  assert plan.params == 4 * n  # float32
  assert 0 <= plan.opt_state - 8 * n <= 16  # two Adam moments, plus the optimizer's step counters
  r = aot.report(config_lib.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8"]), CPU8)
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
  config = config_lib.load_config("configs/ppo.py:tiny", PPO_SMALL)
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
  lines = aot.summary(r).splitlines()
  assert lines[0] == "ppo on cpu-8 (8 devices, 16 GiB each), mesh {'data': 1, 'fsdp': 8, 'tensor': 1}"
  assert lines[2] == (
    "  global batch: rollout 16 responses (16 prompts of <= 16 tokens, <= 8 new tokens; 2 per data×fsdp "
    "shard of 8), minibatch 8 + 8 pretraining sequences × 32 tokens"
  )
  # The tiny policy's 4 kv heads do not divide over fsdp 8: ppo_steps.rollout_layout's "auto" keeps the training
  # layout, and says why.
  assert lines[3] == (
    "  rollout layout: train (ppo.rollout_layout=auto: fsdp × tensor = 8 does not divide the 4 kv heads the "
    "decode layout splits)"
  )
  assert lines[5].startswith("  per device: params ") and ", KV cache " in lines[5]


def test_a_critic_free_estimator_plans_no_critic_and_saves_its_memory():
  overrides = PPO_SMALL
  gae = aot.report(config_lib.load_config("configs/ppo.py:tiny", overrides), CPU8, rm_size="tiny")
  grpo_overrides = overrides + ["--config.ppo.advantage_estimator=grpo", "--config.ppo.samples_per_prompt=4"]
  grpo = aot.report(config_lib.load_config("configs/ppo.py:tiny", grpo_overrides), CPU8, rm_size="tiny")
  print("\n" + aot.summary(gae) + "\n" + aot.summary(grpo))
  assert set(grpo.plan.models) == {"policy", "reference", "reward model"}
  critic = gae.plan.programs[1].args[0].critic
  assert grpo.plan.params == gae.plan.params - aot.device_bytes(critic.params)
  assert grpo.plan.opt_state == gae.plan.opt_state - aot.device_bytes(critic.opt_state)
  assert grpo.plan.resident == gae.plan.resident - aot.device_bytes(critic)
  assert grpo.programs[1].aliased == aot.device_bytes(grpo.plan.programs[1].args[0])


def test_a_state_larger_than_memory_does_not_fit_and_the_cli_prints_the_row(capsys):
  config = config_lib.load_config("configs/rm.py:tiny", ["--config.mesh.fsdp=8"])
  small = dataclasses.replace(CPU8, name="cpu-8-small", hbm_gib=1e-4)  # 105 kB per device
  mesh, plan = aot.plan_for(config, small)
  r = aot.Report(small, "rm", dict(mesh.shape), plan, [aot.ProgramMemory("train_step", 0, 0, 0, None, None, 0.0)])
  assert plan.params + plan.opt_state > 1e-4 * aot.GiB and r.fits is False
  row = aot.table_records(r)[0]
  assert (row["temp"], row["peak"], row["HBM"], row["fits"]) == ("n/m", "n/m", "0.0001", "**no**")
  # The CLI, with a batch of 12 prompts that 8 data×fsdp shards do not divide: raised to 16, and said so.
  argv = ["--target=cpu-8", "--config=configs/rm.py:tiny", "--config.mesh.fsdp=8", "--config.data.batch_size=12"]
  assert aot_cli.main(argv) == 0
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| cpu-8 | rm |"))
  assert row.startswith("| cpu-8 | rm | 0.1M reward model | 1, 8, 1 | train_step |")
  assert row.endswith("| - | n/m | n/m | 16 | state only: yes |")
  assert (
    "  batch raised: data.batch_size 12 -> 16: 12 is not a multiple of 8 (data×fsdp = 8 shards); to run this plan "
    "on the pod, pass --config.data.batch_size=16\n"
    "  global batch: 16 prompts × 7 responses × 256 tokens (2 per data×fsdp shard of 8)\n"
  ) in out
  assert "  => state fits: 0.21 MiB of 16 GiB per device (100% free); activations not measured\n" in out
  libtpu_message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (31.05G) "
    "exceeds available HBM (30.75G)."
  )
  assert aot._short_error(libtpu_message) == "no compile: temp 31.05 G > 30.75 G usable"


def test_a_batch_the_mesh_does_not_divide_fails_before_compiling():
  """plan_for (the library's plan, as the trainers check it) refuses it; report raises it (next test)."""
  config = config_lib.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8", "--config.data.batch_size=12"])
  with pytest.raises(errors.ConfigError, match="data.batch_size: 12 does not divide over data×fsdp = 8"):
    aot.plan_for(config, CPU8)


def test_a_batch_the_mesh_does_not_divide_is_raised_to_the_next_size_that_it_does():
  mesh = aot.target_mesh(config_lib.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8"]), CPU8)
  fallback = lambda arg, *flags: [
    (c.field, c.old, c.new, c.flag) for c in aot.batch_fallback(config_lib.load_config(arg, list(flags)), mesh)
  ]
  assert fallback("configs/sft.py:tiny", "--config.data.batch_size=12") == [
    ("data.batch_size", 12, 16, "--config.data.batch_size=16")
  ]
  assert fallback("configs/sft.py:tiny", "--config.data.batch_size=3") == [
    ("data.batch_size", 3, 8, "--config.data.batch_size=8")
  ]
  assert fallback("configs/sft.py:tiny", "--config.data.batch_size=32") == []
  # Whole microbatches of whole rows per shard: a multiple of lcm(8, 3).
  assert fallback("configs/sft.py:tiny", "--config.data.batch_size=12", "--config.optim.microbatches=3")[0][2] == 24
  assert fallback("configs/rm.py:tiny", "--config.data.batch_size=4")[0][1:3] == (4, 8)  # prompts with K responses
  # PPO: the minibatch over the shards, then the rollout in whole minibatches and whole prompt groups.
  ppo = ["--config.ppo.minibatch=4", "--config.ppo.rollout_batch=12"]
  assert [c[:3] for c in fallback("configs/ppo.py:tiny", *ppo)] == [
    ("ppo.minibatch", 4, 8),
    ("ppo.rollout_batch", 12, 16),
  ]
  grouped = fallback("configs/ppo.py:tiny", *ppo, "--config.ppo.samples_per_prompt=3")
  assert grouped[1][:3] == ("ppo.rollout_batch", 12, 24)


def _rm_state_bytes(fsdp: int) -> int:
  config = config_lib.load_config("configs/rm.py:tiny", [f"--config.mesh.fsdp={fsdp}"])
  return aot.plan_for(config, CPU8)[1].resident


def test_a_plan_that_does_not_fit_names_the_first_single_change_that_does(capsys):
  """On fake CPU devices the state alone decides: fsdp 4 (data 2) does not fit a budget between its state and
  fsdp 8's; the first change tried, fsdp doubled (data, -1, takes the rest), does."""
  state4, state8 = _rm_state_bytes(4), _rm_state_bytes(8)
  assert state8 < state4
  argv = ["--target=cpu-8", "--config=configs/rm.py:tiny", "--config.mesh.fsdp=4"]
  assert aot_cli.main([*argv, f"--hbm_gib={(state4 + state8) / 2 / aot.GiB!r}"]) == 0
  out = capsys.readouterr().out
  assert "  => does NOT fit: the state alone is " in out
  assert "  tried --config.mesh.fsdp=8: state fits: " in out
  assert "  => the smallest change tried that fits: add --config.mesh.fsdp=8\n" in out
  # Half of fsdp 8's state: nothing tried fits, and nothing is compiled for it (the state alone decides).
  assert aot_cli.main([*argv, f"--hbm_gib={state8 / 2 / aot.GiB!r}"]) == 0
  out = capsys.readouterr().out
  tried = [line for line in out.splitlines() if line.startswith("  tried ")]
  assert [line.split(":")[0] for line in tried] == [
    "  tried --config.mesh.fsdp=8",
    "  tried --config.mesh.tensor=2",  # from data (2 divides the 4 heads)
    "  tried --config.optim.microbatches=2",
    "  tried --config.model.remat=full",
  ]
  assert all(line.endswith("per device; not compiled") for line in tried)
  assert "  => none of the 4 single changes tried fits: combine them, or take a larger slice\n" in out


def test_single_changes_in_the_order_tried_and_as_flags():
  config = config_lib.load_config("configs/sft.py:tiny", ["--config.mesh.data=2", "--config.mesh.fsdp=-1"])
  changes = aot.single_changes(config, {"data": 2, "fsdp": 4, "tensor": 1})
  assert [aot.change_flags(config, c) for c in changes] == [
    ["--config.mesh.data=1"],  # fsdp, the -1, takes the rest: 8
    ["--config.mesh.data=1", "--config.mesh.tensor=2"],
    ["--config.optim.microbatches=2"],  # 16 rows in 2 microbatches of 8, one row per shard each
    ["--config.model.remat=full"],
  ]
  assert changes[0] == {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}
  ppo = config_lib.load_config("configs/ppo.py:tiny", ["--config.mesh.fsdp=2", *PPO_SMALL[1:]])
  assert [aot.change_flags(ppo, c) for c in aot.single_changes(ppo, {"data": 4, "fsdp": 2, "tensor": 1})] == [
    ["--config.mesh.fsdp=4"],
    ["--config.mesh.tensor=2"],
    ["--config.ppo.rollout_batch=8"],  # a minibatch of 8 over 8 shards cannot halve
    ["--config.model.remat=full"],
  ]


def test_under_ten_percent_headroom_is_a_warning():
  config = config_lib.load_config("configs/rm.py:tiny", ["--config.mesh.fsdp=8"])
  mesh, plan = aot.plan_for(config, CPU8)
  unmeasured = [aot.ProgramMemory("train_step", 0, 0, 0, None, None, 0.0)]
  for fraction, tight in ((0.95, True), (0.5, False)):
    target = dataclasses.replace(CPU8, hbm_gib=plan.resident / fraction / aot.GiB)
    r = aot.Report(target, "rm", dict(mesh.shape), plan, unmeasured)
    assert (r.fits, r.tight) == (None, tight)
    assert ("  warning: under 10% headroom (state alone " in aot.summary(r)) is tight
  # A measured peak (TPU targets) at 97% of the memory: it fits, with a warning.
  hbm = 2 * plan.resident
  measured = [aot.ProgramMemory("train_step", 0, 0, 0, 1, int(0.97 * hbm), 0.0)]
  r = aot.Report(dataclasses.replace(CPU8, hbm_gib=hbm / aot.GiB), "rm", dict(mesh.shape), plan, measured)
  assert (r.fits, r.tight) == (True, True)
  assert "(3% free, under 10% headroom)" in aot.verdict(r) and "  warning: under 10% headroom (peak " in aot.summary(r)


@pytest.mark.parametrize(
  "name, platform, devices, hbm_gib, topology",
  [
    ("v4-8", "tpu", 4, 32, "v4:2x2x1"),
    ("v4-64", "tpu", 32, 32, "v4:2x4x4"),
    ("v4-512", "tpu", 256, 32, "v4:4x8x8"),
    ("v4-1536", "tpu", 768, 32, "v4:8x8x12"),
    ("v4-8192", "tpu", 4096, 32, "v4:16x16x16"),
    ("v5p-8", "tpu", 4, 95, "v5p:2x2x1"),
    ("v5p-256", "tpu", 128, 95, "v5p:4x4x8"),
    ("v5p-1024", "tpu", 512, 95, "v5p:8x8x8"),
    ("v5p-4096", "tpu", 2048, 95, "v5p:8x16x16"),
    ("v5p-12288", "tpu", 6144, 95, "v5p:16x16x24"),
    ("v5e-1", "tpu", 1, 16, "v5e:1x1"),
    ("v5e-8", "tpu", 8, 16, "v5e:2x4"),
    ("v5litepod-256", "tpu", 256, 16, "v5e:16x16"),
    ("v6e-4", "tpu", 4, 32, "v6e:2x2"),
    ("v6e-256", "tpu", 256, 32, "v6e:16x16"),
    ("8xH100", "tpu", 8, 80, "v5p:2x2x2"),
    ("8x8xH100", "tpu", 64, 80, "v5p:4x4x4"),
    ("64xH100", "tpu", 64, 80, "v5p:4x4x4"),
    ("2x8xH200", "tpu", 16, 139, "v5p:2x2x4"),
    ("cpu-8", "cpu", 8, 16, ""),
    ("cpu-64xH100", "cpu", 64, 80, ""),
    ("cpu-v4-512", "cpu", 256, 32, ""),
  ],
)
def test_any_slice_of_any_generation_is_a_target(name, platform, devices, hbm_gib, topology):
  t = accelerators.parse_target(name)
  assert (t.platform, t.devices, t.hbm_gib, t.topology) == (platform, devices, hbm_gib, topology)
  assert t.chip_config == ("megacore" if topology.startswith("v4:") else "default")
  kind = "fake CPU devices" if platform == "cpu" else "XLA:TPU's compile for" if "xH" in name else ""
  assert kind in t.note and (kind or not t.note)
  if name.startswith("v5e-") or name.startswith("v5litepod"):
    assert t.accelerator_type.startswith("v5litepod-")  # gcloud's name
  assert t.chips_per_host == {"v5e-1": (1, 1, 1), "v5e-8": (2, 4, 1)}.get(name)


@pytest.mark.parametrize(
  "name, message",
  [
    ("v5p-1023", "v5p-1023: not a v5p slice; v5p-N takes N (TensorCores, 2 per chip) in 8, 16, 32, 64, 128,"),
    ("v4-6", "v4-6: not a v4 slice; v4-N takes N (TensorCores, 2 per chip) in 8, 16, 32, 64, 128,"),
    ("v5e-3", "v5e-3: not a v5e slice; v5e-N takes N (chips) in 1, 4, 8, 16, 32, 64, 128, 256"),
    ("v6e-512", "v6e-512: not a v6e slice; v6e-N takes N (chips) in 1, 4, 8, 16, 32, 64, 128, 256"),
    ("v7-8", "v7-8: not an accelerator; use v4-N or v5p-N (N = TensorCores, 2 per chip), v5e-N (or v5litepod-N)"),
    ("foo", "foo: not an accelerator; use v4-N or v5p-N (N = TensorCores, 2 per chip), v5e-N (or v5litepod-N)"),
    ("12xH100", "12xH100: not an accelerator; use "),
    ("2x4xH100", "2x4xH100: not an accelerator; use "),
    ("3x8xH100", "3x8xH100: no v5p slice has 24 chips to compile for in place of 24 GPUs"),
    ("cpu-0", "cpu-0: not an accelerator; use "),
  ],
)
def test_an_impossible_target_is_one_line_naming_the_valid_forms(name, message):
  with pytest.raises(errors.UserError) as e:
    accelerators.parse_target(name)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_target_or_config_in_one_line_before_compiling(capsys, monkeypatch):
  monkeypatch.setattr(aot, "report", lambda *a, **k: pytest.fail("compiled"))
  assert aot_cli.main(["--target=v5p-1023", "--config=configs/sft.py:tiny"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("error: --target=v5p-1023: not a v5p slice;") and err.count("\n") == 1
  assert aot_cli.main(["--target=cpu-8", "--config=configs/sft.py:tiny", "--config.data.batch_sise=3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --config.data.batch_sise: no such config field") and err.count("\n") == 1
  assert aot_cli.main(["--target=cpu-8", "--config=configs/sft.py:tiny", "--config.mesh.fsdp=3"]) == 2
  assert (
    capsys.readouterr().err == "error: mesh: ici sizes {'data': -1, 'fsdp': 3, 'tensor': 1} do not divide 8 devices\n"
  )


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
  got = hlo.collective_bytes(HLO)
  # The TPU-style scan (no trip count annotated; its condition is `counter < 5`) counts 5 times.
  assert got["once"] == {**dict.fromkeys(hlo.COLLECTIVES, 0), "all-reduce": 2 * 3 * 4 + 10 + 5 * 10 * 4}
  # 3 layers' all-gathers and the async start's result; 3 layers' bf16 all-reduces and the condition's pred, which
  # both loops read (3 times inside, once per decode step).
  per_step = {"all-gather": 3 * 64 * 4 + 128 * 4, "all-reduce": 3 * 4 * 4 * 2 + 3 + 1}
  assert got["per_iteration"] == {**dict.fromkeys(hlo.COLLECTIVES, 0), **per_step}


# ------------------------------------------------------------------------------------------ TPU targets (libtpu)


@pytest.mark.parametrize("name", ["v4-512", "v5p-256", "v6e-256"])
def test_a_tpu_slice_compiles_offline_with_a_raised_batch_and_no_libtpu_noise(capfd, name, tpu_compiler):
  target = accelerators.parse_target(name)
  r = aot.report(config_lib.load_config("configs/sft.py:tiny", ["--config.mesh.fsdp=8"]), target)
  shards = target.devices
  assert r.mesh == {"data": shards // 8, "fsdp": 8, "tensor": 1}
  assert [(c.field, c.old, c.new) for c in r.batch_changes] == [("data.batch_size", 16, shards)]
  (m,) = r.programs
  assert m.temp > 0 and m.peak > r.plan.resident and r.fits is True  # XLA:TPU measures temp
  assert "unexpected worker hostname" not in capfd.readouterr().err  # aot.tpu_environment
