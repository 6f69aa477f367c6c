"""Handing models between stages: which model a stage starts from, and what it leaves for the next.

`model.init_from` names the starting point of a stage:
  ""            a random initialization of `model.size`;
  <workdir>     a checkpoint of an earlier stage's run (its `model.json` says kind and shape): the one the
                run selected (`selected.json`: SFT keeps its best evaluated checkpoint), else the newest;
                `model.init_from_step` = "latest" or a step number chooses another;
  <directory>   an exported model (`metadata.json` + `params/`, see `export`);
  hf:<path>     a HuggingFace model folder (models/hf.py);
  <folder>      a PEFT LoRA folder (adapter_config.json, models/hf_peft.py): its base, the HF folder its
                `base_model_name_or_path` names, with its adapters merged in (as a LoRA run reads, `_merged`).
Any of them may be local or gs://.
The architecture comes from the source; the current config may change only how the model runs (dtype,
dropout, remat, scan), never its shape. A language model can start a scalar model (the RM starts from the
SFT model: the trunk is loaded, the unembedding dropped, the scalar head initialized fresh, docs/paper.md §4.1).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from instructgpt_jax import checkpoint, errors, models, paths, sharding, train_state
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import hf, hf_peft, lora

SHAPE_FIELDS = (
  "family",
  "vocab_size",
  "n_layers",
  "d_model",
  "n_heads",
  "n_kv_heads",
  "d_head",
  "d_ff",
  "max_len",
  "tied_embeddings",
  "qkv_bias",
  "qk_norm",
  "rope_theta",
  "rope_scaling",
  "rope_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_original_max_len",
  "norm_eps",
)
NOT_MODEL_FIELDS = ("size", "init_from", "init_from_step")
HF_FORMAT = "huggingface"  # Source.metadata["format"] of an hf: source
PEFT_FORMAT = "peft"  # ... of a PEFT adapter folder


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str  # "lm" or "scalar"
  config: models.ModelConfig
  path: str
  exported: bool  # an exported model directory, else a training workdir
  metadata: dict
  step: int | None = None  # a workdir's checkpoint to load
  ema: bool = False  # a workdir's EMA weights (a PPO policy's, the paper's model) rather than the raw ones


def _workdir_step(path: str, field: str, which: str | int) -> int:
  """The checkpoint of run `path` that `which` names: "" (the selected one, else the newest), "latest", or a
  step number."""
  steps = checkpoint.Checkpointer.steps_in(path)
  if not steps:
    raise ConfigError(f"{field}: {path}: the run has saved no checkpoint yet; finish or resume that run first")
  which = str(which).strip()
  if which in ("", "selected"):
    selected = checkpoint.Selection.step_of(path)
    if selected is None and which == "selected":
      raise ConfigError(f"{field}: {path} selected no checkpoint (no selected.json); use init_from_step=latest")
    return steps[-1] if selected is None else selected
  if which == "latest":
    return steps[-1]
  if not which.isdigit() or int(which) not in steps:
    raise ConfigError(f"{field}_step: {which!r} is not one of {path}'s checkpoints {steps}, 'latest' or 'selected'")
  return int(which)


def read_source(
  init_from: str, field: str = "model.init_from", step: str | int = "", *, ema: bool = True
) -> Source | None:
  """What `init_from` points at, or None for a random initialization. A path that holds no model is a
  one-line ConfigError naming `field` and what the path should hold. `step`: which checkpoint of a
  workdir (see `_workdir_step`). `ema`: a workdir that keeps an EMA of its weights (PPO's policy) gives
  those (the paper's model, App. C.4); False gives the optimizer's weights."""
  if not init_from:
    return None
  if init_from.startswith("hf:"):
    path = init_from[len("hf:") :]
    paths.check_exists(path, field, "HuggingFace model folder")
    config, kind, info = hf.read_config(path)  # info: token ids, and head_bias / reward_bias of our exports
    return Source(kind, config, path, False, {"format": HF_FORMAT, **info})
  path = init_from
  paths.check_exists(path, field, "run workdir or exported model")
  if paths.path(path, hf_peft.CONFIG_FILE).exists():
    return _peft_source(path, field)
  exported, info = True, paths.read_json(paths.join(path, "metadata.json"))
  if info is None:
    exported, info = False, paths.read_json(paths.join(path, "model.json"))
  if info is None:
    hint = f"; it looks like a HuggingFace folder: write hf:{path}" if paths.path(path, "config.json").exists() else ""
    raise ConfigError(
      f"{field}: {path} holds no model: neither a run's workdir (model.json) nor an exported model "
      f"(metadata.json){hint}"
    )
  workdir_step = None if exported else _workdir_step(path, field, step)
  use_ema = bool(ema and info.get("ema_keys"))
  config = models.ModelConfig(**info["model"])
  # A LoRA run is read as its model: the base with the adapters merged in (`_merged`), a model without adapters.
  config = dataclasses.replace(config, lora=models.LoraConfig())
  return Source(info["kind"], config, path, exported, info, workdir_step, use_ema)


def _peft_source(path: str, field: str) -> Source:
  """A PEFT LoRA folder as a source: the model of its base, hf:<base_model_name_or_path>, which must be a
  HuggingFace folder here (local or gs://, not a Hub name); `_merged` adds the adapters."""
  config = paths.read_json(paths.join(path, hf_peft.CONFIG_FILE))
  base = str(config.get("base_model_name_or_path") or "")
  where = f"{field}: {path}: {hf_peft.CONFIG_FILE} base_model_name_or_path"
  if not base or not paths.path(base, "config.json").exists():
    raise ConfigError(f"{where} {base!r} is no HuggingFace model folder (local or gs://, with config.json); set it")
  base_source = read_source(f"hf:{base}", where)
  if base_source.kind != "lm":
    raise ConfigError(f"{where} {base} is a {base_source.kind} model; PEFT's causal-LM adapters need a language model")
  info = {"format": PEFT_FORMAT, "peft": config, "base": {"init_from": f"hf:{base}", "ema": False}}
  return Source("lm", base_source.config, path, True, info)


def tokenizer_of(source: Source | None, field: str = "data.tokenizer") -> str:
  """The tokenizer a model came with, as a `data.tokenizer` spec: an HF folder's own (its tokenizer.json and
  tokenizer_config.json; a PEFT folder's base's), the one a run or an export recorded, or "bytes" for a random
  initialization."""
  if source is None:
    return "bytes"
  if source.metadata.get("format") == PEFT_FORMAT:
    source = read_source(source.metadata["base"]["init_from"], field)
  if source.metadata.get("format") == HF_FORMAT:
    if not paths.path(source.path, "tokenizer.json").exists():
      raise ConfigError(f"{field}: {source.path} (the HF model) holds no tokenizer.json; set {field} to its tokenizer")
    return source.path
  recorded = source.metadata.get("tokenizer")
  if recorded is None:  # a workdir, or an export inside one: the run's resolved config names it
    for folder in (source.path, os.fspath(paths.path(source.path).parent)):
      recorded = paths.read_json(paths.join(folder, "config.json"), {}).get("data", {}).get("tokenizer")
      if recorded:
        break
  if not recorded:
    raise ConfigError(f"{field}: {source.path} records no tokenizer; set {field}")
  return recorded


def check_same_run(workdir: str, stage: str, kind: str, model_cfg: models.ModelConfig) -> None:
  """A workdir with checkpoints resumes only the run that wrote them: same stage, same model shape."""
  if not checkpoint.Checkpointer.steps_in(workdir):
    return
  config = paths.read_json(paths.join(workdir, "config.json"), {})
  written = config.get("stage")
  if written and written != stage:
    raise ConfigError(
      f"--workdir: {workdir} holds checkpoints of a {written} run (config.json); give this {stage} run a new workdir"
    )
  info = paths.read_json(paths.join(workdir, "model.json"))
  if info is None:
    return
  # A field a run's model.json predates has its default (e.g. qk_norm, added for Qwen3).
  defaults = {f.name: f.default for f in dataclasses.fields(models.ModelConfig)}
  theirs = {k: info["model"].get(k, defaults[k]) for k in SHAPE_FIELDS}
  ours = dataclasses.asdict(model_cfg)
  changed = [f"{k}={theirs[k]} (now {ours[k]})" for k in SHAPE_FIELDS if theirs[k] != ours[k]]
  # The adapters are what its checkpoints hold: their rank, targets and scale must be the same.
  their_lora = dataclasses.asdict(models.LoraConfig.of(info["model"].get("lora")))
  changed += [
    f"lora.{k}={their_lora[k]} (now {ours['lora'][k]})"
    for k in ("rank", "targets", "alpha")
    if their_lora[k] != ours["lora"][k] and (their_lora["rank"] or ours["lora"]["rank"])
  ]
  if info["kind"] != kind:
    changed.insert(0, f"kind={info['kind']} (now {kind})")
  if changed:
    raise ConfigError(
      f"--workdir: {workdir} holds checkpoints of another model: {', '.join(changed)}; "
      "give this run a new workdir, or the model config that wrote them"
    )


def resolve(model_section) -> tuple[models.ModelConfig, Source | None]:
  """The stage's ModelConfig: the source's shape with this config's runtime fields on top."""
  section = {k: v for k, v in dict(model_section).items() if k not in NOT_MODEL_FIELDS}
  source = read_source(model_section.get("init_from", ""), step=model_section.get("init_from_step", ""))
  if source is None:
    return models.resolve({**section, "size": model_section["size"]}), None
  fields = dataclasses.asdict(source.config)
  for key, value in section.items():
    if value is None:
      continue
    if key in SHAPE_FIELDS and value != fields[key]:
      raise ConfigError(f"model.{key}: {value} differs from the model in {source.path} ({fields[key]})")
    fields[key] = value
  return models.ModelConfig(**fields), source


def load(source: Source, kind: str, target, model_cfg: models.ModelConfig, seed: int) -> Any:
  """Params of `kind` restored from `source` into `target` (abstract params with shardings). What the source
  does not hold is initialized as a random `model_cfg` model of `seed` would be: a scalar head on a language
  model's trunk, LoRA adapters on a model without them (B = 0: the model computes what the source does)."""
  adapters = lora.split(target)[0]
  if adapters:
    key = jax.random.PRNGKey(seed)
    fresh = fresh_params(model_cfg, adapters, key, kind=kind, pick=lambda p: lora.split(p)[0])
    return lora.combine(fresh, load(source, kind, lora.without_adapters(target), model_cfg, seed))
  if source.kind == kind:
    return _restore(source, target)
  if source.kind == "lm" and kind == "scalar":
    trunk = _restore(source, target["transformer"])
    head = fresh_params(model_cfg, target["head"], jax.random.PRNGKey(seed), kind="scalar", pick=lambda p: p["head"])
    return {"transformer": trunk, "head": head}
  raise ConfigError(f"model.init_from: a {source.kind} model cannot start a {kind} model")


def fresh_params(model_cfg: models.ModelConfig, target, key: jax.Array, *, kind: str, pick: Callable) -> Any:
  """`pick(params)` of the random `model_cfg` model of `key`, created in `target`'s shardings. Only the picked
  leaves are computed (XLA drops the rest of the initialization), so no whole random model is allocated."""
  shardings = jax.tree.map(lambda t: t.sharding, target)
  init = jax.jit(lambda key: pick(models.init(model_cfg, key, kind=kind)[1]), out_shardings=shardings)
  return init(key)


def load_frozen(source: Source, kind: str, mesh, rules, *, seed: int = 0) -> tuple[Any, Any]:
  """(graphdef, params) of a model that is read and not trained (a reference policy, a reward model, a model
  to sample or export): `source` read as `kind`, its params laid out on `mesh` by `rules`."""
  graphdef, target = train_state.param_shardings_for(source.config, mesh, rules, kind=kind)
  return graphdef, load(source, kind, target, source.config, seed)


def _restore(source: Source, target) -> Any:
  if "base" in source.metadata:
    return _merged(source, target)
  if source.metadata.get("format") == HF_FORMAT:
    return hf.load_params(source.path, target)
  if source.exported:
    return checkpoint.import_params(source.path, target)[0]
  keys = tuple(source.metadata["ema_keys"] if source.ema else source.metadata.get("params_keys", ("params",)))
  return checkpoint.Checkpointer(source.path).restore_params(source.step, target=target, keys=keys)


def _merged(source: Source, target) -> Any:
  """A LoRA run's model in `target` (no adapters): its base read as the run read it (model.json's `base`), its
  checkpoint's adapters (and heads) on top, each adapter merged into its kernel (lora.merged). A PEFT folder's
  likewise: its base folder and its adapters."""
  mesh = jax.tree.leaves(target)[0].sharding.mesh
  if source.metadata.get("format") == PEFT_FORMAT:
    run_cfg, saved = _peft_adapters(source, mesh)
  else:
    run_cfg = models.ModelConfig(**source.metadata["model"])
    saved = _run_adapters(source, run_cfg, mesh)
  base = source.metadata["base"]
  base_source = _base_source(source)
  base_cfg = dataclasses.replace(run_cfg, lora=models.LoraConfig())
  if base_source is None:  # the run's random start (train_state.create_sharded's params key)
    key = train_state.init_keys(base.get("seed", 0))[0]
    base_params = fresh_params(run_cfg, target, key, kind=source.kind, pick=lora.without_adapters)
  else:
    base_params = load(base_source, source.kind, target, base_cfg, base.get("seed", 0))
  shardings = jax.tree.map(lambda t: t.sharding, target)
  merge = jax.jit(lambda s, b: lora.merged(lora.combine(s, b), run_cfg), out_shardings=shardings)
  return merge(saved, base_params)


def _whole(abstract, mesh) -> Any:
  """Abstract params read whole onto every device of `mesh` (the adapters are small)."""
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=whole), abstract)


def _run_adapters(source: Source, run_cfg: models.ModelConfig, mesh) -> Any:
  """What a LoRA run's checkpoint holds (lora.split_trainable: its adapters, and heads), on every device of `mesh`:
  the EMA's (PPO) when `source.ema`."""
  _, abstract = models.abstract(run_cfg, kind=source.kind)
  saved = _whole(lora.split_trainable(nnx.to_pure_dict(abstract))[0], mesh)
  keys = tuple(source.metadata["ema_keys"] if source.ema else source.metadata.get("params_keys", ("params",)))
  return checkpoint.Checkpointer(source.path).restore_params(source.step, target=saved, keys=keys)


def _base_source(source: Source) -> Source | None:
  """The base of a LoRA run or PEFT folder as the run read it (its `base` record), None for a random start."""
  base = source.metadata["base"]
  if "init_from" not in base:
    return None
  return read_source(base["init_from"], f"{source.path}/model.json base", base.get("step", ""), ema=base["ema"])


def _peft_adapters(source: Source, mesh) -> tuple[models.ModelConfig, Any]:
  """(the base's config with the folder's adapters, the adapters read by hf_peft.load_adapters, on every device)."""
  config = source.metadata["peft"]
  rank, alpha = config.get("r", hf_peft.PEFT_DEFAULT_R), config.get("lora_alpha", hf_peft.PEFT_DEFAULT_ALPHA)
  first_error = None
  for targets in _peft_targets(source.path, source.config, rank):
    try:
      cfg = dataclasses.replace(source.config, lora=models.LoraConfig(rank=rank, alpha=float(alpha), targets=targets))
      target = _whole(lora.split(nnx.to_pure_dict(models.abstract(cfg)[1]))[0], mesh)
      return cfg, hf_peft.load_adapters(source.path, cfg, target)
    except ConfigError as e:
      first_error = first_error or e
  raise first_error


def _peft_targets(folder: str, cfg: models.ModelConfig, rank: int) -> list[str]:
  """The `model.lora.targets` that may hold a PEFT folder's adapters: our projections of each adapted HF module.
  A module that holds several of ours (GPT-2's c_attn: query, key, value) with an adapter of rank r·k holds k of
  them (our export's block form; rank r: PEFT's own, one A for all). Which k is tried in turn: load_adapters refuses
  a choice that would drop a nonzero entry of lora_B, so every choice it takes is the folder's update exactly."""
  has_weights = paths.path(folder, hf_peft.WEIGHTS_FILE).exists()
  files = hf.TensorFiles(folder) if has_weights else {}
  options = []
  for site in hf_peft.sites(cfg):
    name = site.tensor(cfg, 0, "A")
    if name in files:
      n = files[name].shape[0]
      k = len(site.parts) if n == rank else min(max(n // rank, 1), len(site.parts))
      options.append(list(itertools.combinations(site.parts, k)))
  choices = ["|".join(p for parts in choice for p in parts) for choice in itertools.product(*options)]
  return choices if options else [models.LoraConfig.targets]  # nothing of ours: load_adapters says what is there


def write_model_json(
  workdir: str,
  kind: str,
  model_cfg: models.ModelConfig,
  *,
  params_keys=("params",),
  ema_keys=None,
  source: Source | None = None,
  seed: int = 0,
) -> None:
  """Records what this run trains (and where its params, and their EMA if any, sit in the checkpoint), so a
  later stage can start from its workdir. A LoRA run's checkpoints hold its adapters (and heads) only: its
  model.json also records its base, `source` (the checkpoint step resolved) or the random initialization of
  `seed`, so a reader can put the model back together (`read_source`)."""
  if jax.process_index() == 0:
    info = {"kind": kind, "model": dataclasses.asdict(model_cfg), "params_keys": list(params_keys)}
    if ema_keys:
      info["ema_keys"] = list(ema_keys)
    if model_cfg.lora.rank:
      info["base"] = {"seed": seed} if source is None else _base_record(source)
    paths.write_json(paths.join(workdir, "model.json"), info)


def _base_record(source: Source) -> dict:
  """How to read `source` again: its init_from form, the checkpoint step, EMA or not."""
  init_from = f"hf:{source.path}" if source.metadata.get("format") == HF_FORMAT else source.path
  record = {"init_from": init_from, "ema": source.ema}
  if source.step is not None:
    record["step"] = source.step
  return record


def export(directory: str, params, kind: str, model_cfg: models.ModelConfig, **extra) -> None:
  """An exported model: params plus metadata (kind, model config, and extras such as the reward bias and the
  `tokenizer` spec). A LoRA model is exported merged (lora.merged): a model without adapters."""
  if model_cfg.lora.rank:
    params = jax.jit(lambda p: lora.merged(p, model_cfg))(params)
    model_cfg = dataclasses.replace(model_cfg, lora=models.LoraConfig())
  checkpoint.export_params(directory, params, {"kind": kind, "model": dataclasses.asdict(model_cfg), **extra})


def create_state(model_cfg: models.ModelConfig, source: Source | None, tx, mesh, rules, *, seed: int, kind: str):
  """A fresh train state, sharded as it is created: params from `source` (model.init_from), else random."""
  load_params = None if source is None else (lambda target: load(source, kind, target, model_cfg, seed))
  _, state, _ = train_state.create_sharded(model_cfg, tx, seed, mesh, rules, kind=kind, load_params=load_params)
  logging.info(
    "%s model: %s parameters, from %s",
    kind,
    f"{models.param_count(state.params):,}",
    source.path if source else "a random initialization",
  )
  return state


def export_hf(
  workdir: str, out: str, *, dtype: str | None = None, raw_policy: bool = False, step: str = "", adapters: bool = False
) -> str:
  """Writes the HF folder of run (or exported model) `workdir` into `out`; returns a one-line summary. `adapters`: a
  LoRA run's adapters as a PEFT folder instead (`_export_peft`)."""
  paths.check_output_dir(out, "--out")
  source = read_source(workdir, "--workdir", step=step, ema=not raw_policy)
  if adapters:
    return _export_peft(source, workdir, out, dtype)
  if source.kind == "scalar" and not source.exported:
    exported = paths.join(workdir, "export")
    if not paths.path(exported, "metadata.json").exists():
      raise errors.UserError(f"--workdir: {workdir}: an RM run exports its model (and bias) when it ends; not yet")
    source = read_source(exported, "--workdir")
  spec = tokenizer_of(source)
  tokenizer = tokenizer_lib.load(spec)
  mesh = sharding.make_mesh({"fsdp": -1})
  _, params = load_frozen(source, source.kind, mesh, sharding.rules_dict(sharding.DEFAULT_RULES))
  token_ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id}
  metadata = {k: source.metadata[k] for k in ("reward_bias",) if k in source.metadata}
  with tempfile.TemporaryDirectory() as scratch:
    files = spec if spec != "bytes" else tokenizer_lib.save_to(tokenizer, f"{scratch}/tokenizer.json")
    hf.export(
      out, params, source.config, kind=source.kind, tokenizer=files, token_ids=token_ids, metadata=metadata, dtype=dtype
    )
  what = "EMA policy" if source.ema else f"{source.kind} model"
  step_text = f" step {source.step}" if source.step is not None else ""
  return f"exported the {what} of {workdir}{step_text} to {out} (tokenizer {spec})"


def _export_peft(source: Source, workdir: str, out: str, dtype: str | None) -> str:
  """A LoRA language model run's adapters (its EMA's for PPO, as export_hf) as a PEFT folder in `out` for its base:
  the base's own HF folder when the run started from hf:PATH, else the base exported beside them into `out`/base."""
  if source.kind == "scalar":
    raise errors.UserError(
      f"--adapters: {workdir} is a reward model: PEFT has no form for its scalar head; export it without --adapters"
    )
  if source.exported or "base" not in source.metadata:
    raise errors.UserError(f"--adapters: {workdir} is not a LoRA run (model.lora.rank 0): it has no adapters to export")
  base = source.metadata["base"]
  if "init_from" not in base:
    raise errors.UserError(
      f"--adapters: {workdir} started from a random initialization (seed {base.get('seed', 0)}), which no HF folder "
      "holds; export it without --adapters"
    )
  run_cfg = models.ModelConfig(**source.metadata["model"])
  saved = _run_adapters(source, run_cfg, sharding.make_mesh({"fsdp": -1}))
  if dtype:
    saved = jax.tree.map(lambda x: x.astype(dtype), saved)
  if base["init_from"].startswith("hf:"):
    base_model, wrote = os.fspath(paths.absolute(base["init_from"][len("hf:") :])), ""
  else:
    paths.make_dir(out)
    base_model = os.fspath(paths.absolute(paths.join(out, "base")))
    step, raw = str(base.get("step", "")), not base["ema"]
    wrote = "; " + export_hf(base["init_from"], base_model, dtype=dtype, raw_policy=raw, step=step)
  hf_peft.export_adapters(out, saved, run_cfg, base_model=base_model)
  what = "EMA policy's" if source.ema else "model's"
  return f"exported the {what} adapters of {workdir} step {source.step} to {out}, a PEFT folder on {base_model}{wrote}"
