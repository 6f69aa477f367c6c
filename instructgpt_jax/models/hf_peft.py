"""LoRA adapters as a PEFT folder: what `peft.PeftModel.from_pretrained(hf_base_model, folder)` loads, and back.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Each adapted HF module of layer i has

    base_model.model.<its HF name>.lora_A.weight   [r, in]    x ↦ x·Aᵀ
    base_model.model.<its HF name>.lora_B.weight   [out, r]   then ↦ ·Bᵀ, times lora_alpha / r

(PEFT 0.22: `LoraLayer.update_layer` makes lora_A an nn.Linear(in, r) and lora_B an nn.Linear(r, out), also for
GPT-2's Conv1D; `get_peft_model_state_dict` drops the adapter name from the keys). The HF names are those of the
kernels' weight links (hf_llama.py, hf_gpt2.py): `model.layers.{i}.self_attn.q_proj` for the Llama family,
`transformer.h.{i}.attn.c_attn` for GPT-2. Those links only flatten our kernel's input axes and its output axes
(W [*in, *out] <-> [prod(in), prod(out)], transposed for nn.Linear), with no permutation of heads or of RoPE
rows, so the adapters flatten the same way:

    lora_A = A.reshape(prod(in), r)ᵀ      ours A [*in, r]
    lora_B = B.reshape(r, prod(out))ᵀ     ours B [r, *out]

GPT-2's c_attn holds query, key and value along its output axis, one module with one adapter, while ours has
three. The targeted ones among them become one adapter of rank r·k (k of them): lora_A stacks their A's, lora_B
is block diagonal (zero rows for a projection not targeted), and `rank_pattern` / `alpha_pattern` give c_attn
rank r·k and alpha·k, so its scale is alpha / r like the others': exactly our update. Loading reads that form
back, and also a plain rank-r c_attn adapter (what PEFT trains), whose A the three projections then share.

    hf.export(base_dir, lora.without_adapters(params), base_cfg)       # the base model once
    hf_peft.export_adapters(adapter_dir, params, cfg, base_model=base_dir)
    adapters = hf_peft.load_adapters(adapter_dir, cfg)                 # lora.combine(adapters, base params)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import paths
from instructgpt_jax.errors import ConfigError, UserError
from instructgpt_jax.models import hf, lora
from instructgpt_jax.models.sizes import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel's prefix before the HF model's own module names
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8  # LoraConfig's defaults, for a config that leaves r or lora_alpha out
# Families whose HF projections are transformers' Conv1D, weight [in, out]: PEFT sets fan_in_fan_out for them.
FAN_IN_FAN_OUT = {"gpt": True}


@dataclasses.dataclass(frozen=True)
class Site:
  """One HF module of a layer that carries an adapter pair.

  module: its name template, "{p}layers.{i}.self_attn.q_proj" ("{p}" the trunk prefix, "{i}" the layer).
  parts: our projections its weight holds, in the order of its output axis: one, or GPT-2's c_attn's three.
  target: its name in target_modules (the shortest dotted suffix no other projection shares: "attn.c_proj").
  """

  module: str
  parts: tuple[str, ...]
  target: str

  def key(self, cfg: ModelConfig, i: int) -> str:
    """The module's name in the HF model (what PEFT matches target_modules and rank_pattern against)."""
    return self.module.format(p=hf.FAMILIES[cfg.family].prefix, i=i)

  def tensor(self, cfg: ModelConfig, i: int, matrix: str) -> str:
    return f"{KEY_PREFIX}{self.key(cfg, i)}.lora_{matrix}.weight"


def sites(cfg: ModelConfig) -> list[Site]:
  """The HF modules of a layer's projections (`cfg.projections`), from the family's kernel links."""
  modules: dict[str, list[str]] = {}
  for link in hf.FAMILIES[cfg.family].links(cfg):
    path = "/".join(link.ours[1:-1])
    if link.ours[0] == "layers" and link.ours[-1] == "kernel" and path in cfg.projections:
      modules.setdefault(link.hf.removesuffix(".weight"), []).append(path)
  local = {module: module.split("{i}.", 1)[1].split(".") for module in modules}

  def target(module):  # "q_proj"; GPT-2's "attn.c_proj" beside "mlp.c_proj"
    for n in range(1, len(local[module]) + 1):
      suffix = local[module][-n:]
      if all(other == module or other_parts[-n:] != suffix for other, other_parts in local.items()):
        return ".".join(suffix)
    return ".".join(local[module])

  return [Site(module, tuple(parts), target(module)) for module, parts in modules.items()]


def _size(shape) -> int:
  return math.prod(shape)


def _json_number(x: float):
  return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------------ export


def export_adapters(folder: str, params, cfg: ModelConfig, *, base_model: str) -> None:
  """Writes the adapters of a LoRA language model (`params` with lora_a / lora_b, `cfg.lora.rank` > 0) as a PEFT
  LoRA folder for the HF export of its base model (`base_model`: adapter_config.json's base_model_name_or_path,
  a folder or a Hub name). The tensors keep the adapters' dtype. Every process calls it; process 0 writes."""
  if not cfg.lora_modules:
    raise UserError("peft export: the model has no adapters (model.lora.rank 0); export it whole with hf.export")
  if "transformer" in params:
    raise UserError(
      "peft export: a scalar model's adapters have no PEFT causal-LM form; export lora.merged(params) with hf.export"
    )
  r, alpha = cfg.lora.rank, cfg.lora.alpha
  tensors: list[hf.PendingTensor] = []
  targets, rank_pattern, alpha_pattern = [], {}, {}
  for site in sites(cfg):
    parts = [p for p in site.parts if p in cfg.lora_modules]
    if not parts:
      continue
    targets.append(site.target)
    rank = r * len(parts)
    if len(parts) > 1:
      rank_pattern[site.target], alpha_pattern[site.target] = rank, _json_number(alpha * len(parts))
    dtype = np.dtype(_adapter(params, parts[0])["lora_a"].dtype)
    n_in = _size(cfg.projections[parts[0]][0])
    n_out = sum(_size(cfg.projections[p][1]) for p in site.parts)
    for i in range(cfg.n_layers):
      a = functools.partial(_peft_a, params, parts, i, r)
      b = functools.partial(_peft_b, params, cfg, site, parts, i)
      tensors.append(hf.PendingTensor(site.tensor(cfg, i, "A"), (rank, n_in), dtype, a))
      tensors.append(hf.PendingTensor(site.tensor(cfg, i, "B"), (n_out, rank), dtype, b))
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": r,
    "lora_alpha": _json_number(alpha),
    "lora_dropout": cfg.lora.dropout,
    "target_modules": sorted(targets),
    "rank_pattern": rank_pattern,
    "alpha_pattern": alpha_pattern,
    "fan_in_fan_out": FAN_IN_FAN_OUT.get(cfg.family, False),
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "inference_mode": True,
  }
  writer = jax.process_index() == 0
  if writer:
    paths.make_dir(folder)
    paths.write_json(paths.join(folder, CONFIG_FILE), config)
  hf.write_safetensors(paths.join(folder, WEIGHTS_FILE), tensors, write=writer)


def _adapter(params, path: str) -> dict:
  block, name = path.split("/")
  return params["layers"][block][name]


def _peft_a(params, parts, i: int, r: int) -> np.ndarray:
  """lora_A [r·k, in]: each part's A [*in, r] of layer i flattened and transposed, stacked along the rank."""
  layer = [hf._host_array(_adapter(params, p)["lora_a"][i]) for p in parts]
  return np.concatenate([a.reshape(-1, r).T for a in layer], axis=0)


def _peft_b(params, cfg: ModelConfig, site: Site, parts, i: int) -> np.ndarray:
  """lora_B [out, r·k]: part j's B [r, *out] of layer i, flattened and transposed, in the rows of its output and
  the columns of its rank block; zeros elsewhere (the other parts' blocks, a part not targeted)."""
  r = cfg.lora.rank
  rows = _row_ranges(cfg, site)
  out = None
  for j, path in enumerate(parts):
    b = hf._host_array(_adapter(params, path)["lora_b"][i])
    if out is None:
      out = np.zeros((rows[site.parts[-1]][1], r * len(parts)), b.dtype)
    begin, end = rows[path]
    out[begin:end, j * r : (j + 1) * r] = b.reshape(r, -1).T
  return out


def _row_ranges(cfg: ModelConfig, site: Site) -> dict[str, tuple[int, int]]:
  """Each part's rows [begin, end) of the site's output axis."""
  ranges, begin = {}, 0
  for path in site.parts:
    end = begin + _size(cfg.projections[path][1])
    ranges[path], begin = (begin, end), end
  return ranges


# ------------------------------------------------------------------------------------------ load


def load_adapters(folder: str, cfg: ModelConfig, target=None) -> dict:
  """The adapters of a PEFT LoRA folder as our pytree, nested like `lora.split(params)[0]` of a language model
  with `cfg` ({"layers": {"attn": {"query": {"lora_a": [L, D, r], "lora_b": [L, r, N, H]}, ...}}}).

  target: abstract adapters (ShapeDtypeStructs, or abstract params, whose adapters are taken), whose shardings
  and dtypes the arrays get; None: on the default device in `cfg.param_dtype`. The folder must fit the model:
  rank, scale (lora_alpha / r), the targeted projections, the layer count and every shape; else one ConfigError.
  """
  config = paths.read_json(paths.join(folder, CONFIG_FILE))
  if config is None:
    raise ConfigError(f"peft: {folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
  if not cfg.lora_modules:
    raise ConfigError(f"peft: the model has no adapters (model.lora.rank 0) to load {folder} into")
  _check_config(folder, config)
  weights = paths.join(folder, WEIGHTS_FILE)
  if not paths.path(weights).exists():
    raise ConfigError(f"peft: {folder} has no {WEIGHTS_FILE} (adapter_model.bin, a PyTorch pickle, is not read)")
  found = _found_layers(folder, cfg, _tensor_names(weights))
  files = hf.TensorFiles(folder)
  layers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {path: [] for path in cfg.lora_modules}
  for site in sites(cfg):
    wanted = [p for p in site.parts if p in cfg.lora_modules]
    if site in found and not wanted:
      raise ConfigError(
        f"peft: {folder} adapts {site.target} ({', '.join(site.parts)}), which model.lora.targets "
        f"{cfg.lora.targets!r} leaves out"
      )
    if wanted and site not in found:
      raise ConfigError(
        f"peft: {folder} has no adapter for {site.target} ({', '.join(wanted)}), which model.lora.targets "
        f"{cfg.lora.targets!r} targets"
      )
    for i in range(cfg.n_layers if wanted else 0):
      for path, pair in _read_site(folder, config, cfg, files, site, wanted, i).items():
        layers[path].append(pair)
  adapters: dict = {}
  for path, pairs in layers.items():
    block, name = path.split("/")
    a, b = (np.stack(matrices) for matrices in zip(*pairs))
    adapters.setdefault("layers", {}).setdefault(block, {})[name] = {"lora_a": a, "lora_b": b}
  return _placed(folder, adapters, cfg, target)


def _check_config(folder: str, config: dict) -> None:
  """The adapter_config.json fields that would make PEFT compute something other than our y + (alpha/r)·x·A·B."""
  if config.get("peft_type") != "LORA":
    raise ConfigError(f"peft: {folder}: {CONFIG_FILE} peft_type {config.get('peft_type')!r} is not LORA")
  refused = {
    "use_dora": "DoRA's magnitude vector",
    "use_rslora": "rank-stabilized scaling alpha / sqrt(r)",
    "lora_bias": "a bias in lora_B",
  }
  for field, what in refused.items():
    if config.get(field):
      raise ConfigError(f"peft: {folder}: {CONFIG_FILE} {field} is set: ours has no {what}")
  if config.get("bias", "none") != "none":
    raise ConfigError(f"peft: {folder}: {CONFIG_FILE} bias {config['bias']!r}: trained biases are not adapters")


def _tensor_names(path: str) -> list[str]:
  """The tensor names of a safetensors file (its JSON header)."""
  with paths.path(path).open("rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  return [name for name in header if name != "__metadata__"]


def _found_layers(folder: str, cfg: ModelConfig, names: list[str]) -> dict[Site, set[int]]:
  """{site: the layers the file has its adapter for}; a tensor of no site, or layers other than the model's, is
  a ConfigError."""
  patterns = []
  for site in sites(cfg):
    before, after = site.module.format(p=hf.FAMILIES[cfg.family].prefix, i="{i}").split("{i}")
    module = rf"{re.escape(before)}(\d+){re.escape(after)}"
    patterns.append((site, re.compile(rf"{re.escape(KEY_PREFIX)}{module}\.lora_[AB]\.weight")))
  found: dict[Site, set[int]] = {}
  strangers = []
  for name in names:
    match = next(((site, m) for site, pattern in patterns if (m := pattern.fullmatch(name))), None)
    if match is None:
      strangers.append(name)
    else:
      found.setdefault(match[0], set()).add(int(match[1].group(1)))
  if strangers:
    more = f" and {len(strangers) - 3} more" if len(strangers) > 3 else ""
    raise ConfigError(
      f"peft: {folder} holds tensors no projection of this {cfg.family} model has: {', '.join(strangers[:3])}{more}"
    )
  for site, layers in found.items():
    if layers != set(range(cfg.n_layers)):
      raise ConfigError(
        f"peft: {folder} has {site.target} adapters in {len(layers)} layers ({min(layers)}..{max(layers)}); the "
        f"model has n_layers {cfg.n_layers}, adapters in each"
      )
  return found


def _pattern_value(patterns: dict | None, key: str, default):
  """adapter_config's rank_pattern / alpha_pattern at a module: the first pattern that matches the end of its
  name at a dot (PEFT's documented rule), else the default r / lora_alpha."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", key):
      return value
  return default


def _read_site(folder, config, cfg: ModelConfig, files, site: Site, wanted, i: int) -> dict[str, tuple]:
  """{our projection: (A [*in, r], B [r, *out])} of layer i, from the site's lora_A and lora_B."""
  r = cfg.lora.rank
  name_a, name_b = site.tensor(cfg, i, "A"), site.tensor(cfg, i, "B")
  for name in (name_a, name_b):
    if name not in files:
      raise ConfigError(f"peft: {folder} has no {name}")
  a, b = files[name_a], files[name_b]
  rows = _row_ranges(cfg, site)
  n_in, n_out = _size(cfg.projections[site.parts[0]][0]), rows[site.parts[-1]][1]
  rank = a.shape[0] if a.ndim == 2 else -1
  for name, got, want in ((name_a, a.shape, (rank, n_in)), (name_b, b.shape, (n_out, rank))):
    if tuple(got) != want:
      raise ConfigError(
        f"peft: {folder}: {name} is {list(got)}, this model's is {list(want)} (d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.kv_heads} kv) of {cfg.head_dim}, d_ff {cfg.d_ff}): its base is another model"
      )
  key = site.key(cfg, i)
  configured = _pattern_value(config.get("rank_pattern"), key, config.get("r", PEFT_DEFAULT_R))
  if configured != rank:
    raise ConfigError(f"peft: {folder}: {name_a} has rank {rank}, {CONFIG_FILE} says r {configured} for {key}")
  shared = rank == r  # one A for every part (PEFT's own c_attn adapter); else one rank block per wanted part
  if not shared and rank != r * len(wanted):
    raise ConfigError(f"peft: {folder}: {key} has rank {rank}, model.lora.rank is {r} ({', '.join(wanted)})")
  alpha = _pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
  if not math.isclose(alpha / rank, cfg.lora.scale, rel_tol=1e-9):
    raise ConfigError(
      f"peft: {folder}: {key} has lora_alpha / r = {alpha} / {rank}, model.lora.alpha / rank = {cfg.lora.alpha} / {r}"
    )
  blocks = {p: (0, r) if shared else (j * r, (j + 1) * r) for j, p in enumerate(wanted)}
  kept = np.zeros(b.shape, bool)
  out = {}
  for path, (first, last) in blocks.items():
    begin, end = rows[path]
    kept[begin:end, first:last] = True
    in_shape, out_shape = cfg.projections[path]
    out[path] = (a[first:last].T.reshape(*in_shape, r), b[begin:end, first:last].T.reshape(r, *out_shape))
  if np.any(b[~kept] != 0):
    raise ConfigError(
      f"peft: {folder}: {name_b} updates outputs of {site.target} that model.lora.targets {cfg.lora.targets!r} "
      f"({', '.join(wanted)}) leaves out"
    )
  return out


def _placed(folder: str, adapters: dict, cfg: ModelConfig, target) -> dict:
  """The NumPy adapters as jax arrays: on `target`'s shardings and dtypes, or the default device."""
  if target is None:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=cfg.param_dtype), adapters)
  target = lora.split(target)[0]
  if jax.tree.structure(target) != jax.tree.structure(adapters):
    raise ConfigError(f"peft: {folder}: the target's adapters are not this model's (model.lora.targets)")

  def place(value: np.ndarray, leaf) -> jax.Array:
    if tuple(leaf.shape) != value.shape:
      raise ConfigError(f"peft: {folder}: an adapter of shape {value.shape} for a target of shape {leaf.shape}")
    value = np.asarray(value, dtype=leaf.dtype)
    return jax.make_array_from_callback(value.shape, hf._sharding_of(leaf), value.__getitem__)

  return jax.tree.map(place, adapters, target)
