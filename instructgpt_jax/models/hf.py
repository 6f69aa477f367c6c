"""HuggingFace interop: load a HuggingFace model folder into our parameters, and export ours as one.

A folder holds `config.json`, the weights as `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`) and usually `tokenizer.json`. Architectures, by config.json `model_type`:

  gpt2              -> family "gpt"                  (GPT2LMHeadModel, GPT2ForSequenceClassification)
  llama, mistral    -> family "llama"                (SmolLM and SmolLM2 are llama; Llama 3.x's RoPE scaling)
  qwen2             -> family "llama", qkv_bias=True (q/k/v projections with biases)
  qwen3             -> family "llama", qk_norm=True  (per-head RMSNorm of queries and keys)

Each family is one config mapping and one weight-link table, in a module of its own (hf_gpt2.py, hf_llama.py;
the interface is hf_family.py), found through `FAMILIES`; this module is the family-independent I/O.

Anything our Transformer cannot compute exactly (RoPE scaling other than Llama 3's, an output-projection or
MLP bias, another activation) is refused with a one-line ConfigError rather than loaded approximately. A
sliding attention window is the one exception: it changes nothing for sequences that fit in it, so
`max_len` becomes the window. docs/hf.md has the tensor-name tables.

    cfg, kind, info = hf.read_config(path)
    graphdef, target = train_state.param_shardings_for(cfg, mesh, rules, kind=kind)
    params = hf.load_params(path, target)            # shard by shard, onto target's shardings
    hf.export(out_dir, params, cfg, kind=kind, tokenizer=path, token_ids=...)

Loading never holds a whole model on a host: local safetensors files are memory-mapped, and each
device's shard of each parameter is cut from a NumPy view of its HF tensor (`jax.make_array_from_callback`),
so a host reads only the pages of the shards it owns, converting dtypes shard by shard (bfloat16 included).
A folder in a bucket (gs://) cannot be memory-mapped: each host reads whole HF tensors there (one ranged
request each) and keeps the most recent ones up to REMOTE_CACHE_BYTES. Export gathers one layer of one
tensor at a time and streams it into the file (a bucket object is uploaded as it is written), so a host
holds one HF tensor at a time.

Scalar (reward / value) models are exported as `<Arch>ForSequenceClassification` with `num_labels=1`:
`score.weight` [1, D] is our head's kernel. HF's score layer has no bias, so our head bias goes into
config.json under "instructgpt_jax" as `head_bias`, next to the reward model's `reward_bias`:

    our scalar     = HF logit + head_bias
    reward (judge) = HF logit + head_bias - reward_bias

Transformers picks a sequence's score at its last token that is not `pad_token_id`, which is our final
real token when the batch is padded with that id.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tokenizers
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from instructgpt_jax import paths
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import hf_gpt2, hf_llama
from instructgpt_jax.models.hf_family import Family, Link, transposed
from instructgpt_jax.models.sizes import ModelConfig

CONFIG_KEY = "instructgpt_jax"  # our fields in an exported config.json: head_bias, reward_bias, other metadata
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
REMOTE_CACHE_BYTES = 8 * 2**30  # HF tensors read from a bucket and kept (a stacked parameter's layers fit)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # they name the special tokens
GENERATION_CONFIG = "generation_config.json"
# The families, by our family name (ModelConfig.family): each one's config mapping and weight-link table.
FAMILIES: dict[str, Family] = {family.name: family for family in (hf_gpt2.FAMILY, hf_llama.FAMILY)}
# ------------------------------------------------------------------------------------------ safetensors files
# The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
# (plus "__metadata__"), then the tensors' bytes, offsets counted from the end of the header.

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class TensorFiles:
  """The tensors of a folder's safetensors files: read-only NumPy views of memory-mapped local files, or
  tensors read whole from a bucket (an LRU of REMOTE_CACHE_BYTES).

  Indexing a view reads only the pages it touches, so cutting one shard of a tensor costs one shard of
  memory. (safetensors' own NumPy reader has no bfloat16, the dtype most checkpoints are published in.)
  """

  def __init__(self, folder: str):
    index = paths.read_json(paths.join(folder, INDEX_FILE))
    if index is not None:
      files = sorted(set(index["weight_map"].values()))
    else:
      files = sorted(paths.path(p).name for p in paths.glob(paths.join(folder, "*.safetensors")))
    if not files:
      raise ConfigError(f"hf: {folder} holds no *.safetensors weights")
    self._entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, first data byte, header entry)
    self._maps: dict[str, np.memmap] = {}
    self._remote: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name in files:
      path = paths.join(folder, name)
      with paths.path(path).open("rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
      header.pop("__metadata__", None)
      for tensor, entry in header.items():
        self._entries[tensor] = (path, 8 + header_length, entry)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise ConfigError(f"hf: the weights hold no tensor {name!r}")
    path, data_start, entry = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise ConfigError(f"hf: tensor {name} is {entry['dtype']}; only {', '.join(_DTYPES)} are read")
    begin, end = entry["data_offsets"]
    if paths.is_remote(path):
      raw = self._read_remote(name, path, data_start + begin, data_start + end)
    else:
      if path not in self._maps:
        self._maps[path] = np.memmap(path, np.uint8, mode="r")
      raw = self._maps[path][data_start + begin : data_start + end]
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

  def _read_remote(self, name: str, path: str, begin: int, end: int) -> np.ndarray:
    if name not in self._remote:
      with paths.path(path).open("rb") as f:
        f.seek(begin)
        self._remote[name] = np.frombuffer(f.read(end - begin), np.uint8)
      while sum(a.nbytes for a in self._remote.values()) > REMOTE_CACHE_BYTES and len(self._remote) > 1:
        self._remote.popitem(last=False)
    self._remote.move_to_end(name)
    return self._remote[name]


@dataclasses.dataclass(frozen=True)
class PendingTensor:
  """A tensor to write: its header entry now, its value (computed by `value()`) when its turn comes."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  value: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str, tensors: list[PendingTensor], *, write: bool = True) -> None:
  """Streams `tensors` into one safetensors file, computing one value at a time.

  Every process calls it (a value may gather across processes); only where `write` is the file written.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without "format"
  offset = 0
  for tensor in tensors:
    header[tensor.name] = {
      "dtype": _DTYPE_NAMES[tensor.dtype],
      "shape": list(tensor.shape),
      "data_offsets": [offset, offset + tensor.nbytes],
    }
    offset += tensor.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces so the data is 8-aligned
  with paths.path(path).open("wb") if write else _Discard() as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for tensor in tensors:
      value = np.ascontiguousarray(tensor.value(), dtype=tensor.dtype)
      if value.shape != tensor.shape:
        raise ValueError(f"hf export: {tensor.name} has shape {value.shape}, expected {tensor.shape}")
      f.write(value.tobytes())


class _Discard:
  """A file that is not written: processes other than 0 run the export's gathers without writing."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def write(self, data) -> None:
    pass


# ------------------------------------------------------------------------------------------ configs


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
  """(ModelConfig, kind) of a config.json dict. kind is "scalar" for a one-label sequence classifier."""
  model_type = hf.get("model_type")
  family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
  if family is None:
    supported = [t for f in FAMILIES.values() for t in f.model_types]
    raise ConfigError(f"hf: model_type {model_type!r} is not supported; supported: {', '.join(supported)}")
  fields = family.fields_from_hf(hf)
  kind = "lm"
  if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
    labels = hf.get("num_labels", len(hf.get("id2label") or {0: ""}))
    if labels != 1:
      raise ConfigError(f"hf: a sequence classifier with {labels} labels is not a scalar model (num_labels 1)")
    kind = "scalar"
  return ModelConfig(**fields), kind


def hf_config(
  cfg: ModelConfig,
  *,
  kind: str = "lm",
  dtype: str = "float32",
  token_ids: dict[str, Any] | None = None,
  metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The config.json of our model: its family's architecture (GPT2 for "gpt"; for "llama", Qwen3 with qk_norm,
  Qwen2 with qkv_bias, else Llama), then the fields every family shares.

  `token_ids` may hold bos_token_id, eos_token_id (an id or a list), pad_token_id (kept only when it is an
  id of the vocabulary, see `config_token_ids`); an id not given is written as null. `metadata` goes under
  CONFIG_KEY.
  """
  head = "ForSequenceClassification" if kind == "scalar" else None
  out = FAMILIES[cfg.family].config_to_hf(cfg, head)
  out["tie_word_embeddings"] = cfg.tied_embeddings
  if kind == "scalar":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  out.update(torch_dtype=dtype, dtype=dtype)  # transformers 4 reads torch_dtype, 5 reads dtype
  # Every id is written, null when unknown: transformers would otherwise take its config class's defaults
  # (Llama's bos 1 and eos 2, GPT-2's 50256), which need not be tokens of this vocabulary.
  out.update({field: None for field in TOKEN_ID_FIELDS}, **config_token_ids(cfg, token_ids))
  if metadata:
    out[CONFIG_KEY] = metadata
  return out


def config_token_ids(cfg: ModelConfig, token_ids: dict[str, Any] | None) -> dict[str, Any]:
  """The token ids config.json and generation_config.json hold: bos_token_id and eos_token_id (an id or a
  list) as given, pad_token_id only when it is an id of the vocabulary (0 <= id < vocab_size).

  Our tokenizers may append the pad token after a published vocabulary (data/tokenizer.py), which our model
  never looks up; transformers and vLLM would index the embedding with it, so such a pad id is left out.
  """
  out = {k: _json_id(v) for k, v in (token_ids or {}).items() if k in TOKEN_ID_FIELDS and v is not None}
  pad = out.get("pad_token_id")
  if pad is not None and not (isinstance(pad, int) and 0 <= pad < cfg.vocab_size):
    del out["pad_token_id"]
  return out


def _json_id(token_id):
  """A token id (or a list of them) as JSON writes it: NumPy integers become ints."""
  if isinstance(token_id, (list, tuple)):
    return [_json_id(t) for t in token_id]
  return int(token_id) if isinstance(token_id, (int, np.integer)) and not isinstance(token_id, bool) else token_id


def read_config(path: str) -> tuple[ModelConfig, str, dict[str, Any]]:
  """(ModelConfig, kind, info) of a HuggingFace model folder.

  info: the token ids config.json names, and our exported fields (head_bias, reward_bias, ...).
  """
  hf = paths.read_json(paths.join(path, "config.json"))
  if hf is None:
    raise ConfigError(f"hf: {path} is not a HuggingFace model folder (no config.json)")
  cfg, kind = config_from_hf(hf)
  info = {k: hf[k] for k in TOKEN_ID_FIELDS if hf.get(k) is not None}
  info.update(hf.get(CONFIG_KEY) or {})
  return cfg, kind, info


# ------------------------------------------------------------------------------------------ tensor names


# The heads every family's task models share (transformers' <Arch>ForCausalLM, <Arch>ForSequenceClassification).
UNEMBED = Link(("unembed", "kernel"), "lm_head.weight", transposed, transposed)
SCORE = Link(("head", "proj", "kernel"), "score.weight", transposed, transposed)  # [1, D] <-> [D, 1]


def trunk_links(cfg: ModelConfig, *, unembed: bool) -> list[Link]:
  """The links of a Transformer's parameters; with `unembed`, its untied unembedding too."""
  links = FAMILIES[cfg.family].links(cfg)
  return links + [UNEMBED] if unembed else links


def _trunk_prefix(cfg: ModelConfig, files: TensorFiles) -> str:
  """The prefix of the trunk's tensor names: "model." / "transformer." from a task model, "" from a base one."""
  family = FAMILIES[cfg.family]
  embed = family.embedding(cfg)
  for prefix in (family.prefix, ""):
    if embed.format(p=prefix) in files:
      return prefix
  raise ConfigError(f"hf: no token embedding {embed.format(p=family.prefix)!r} in the weights")


# ------------------------------------------------------------------------------------------ loading


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _put(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _leaf_paths(tree, prefix=()) -> set[tuple[str, ...]]:
  if isinstance(tree, dict):
    return set().union(*(_leaf_paths(v, (*prefix, k)) for k, v in tree.items()))
  return {prefix}


def _sharding_of(target) -> jax.sharding.Sharding:
  return getattr(target, "sharding", None) or SingleDeviceSharding(jax.local_devices()[0])


def _read_parameter(link: Link, files: TensorFiles, prefix: str, target, n_layers: int) -> jax.Array:
  """One of our parameters on `target`'s sharding (and dtype), each shard cut from its HF tensor(s)."""
  dtype = np.dtype(target.dtype)
  names = [link.hf.format(p=prefix, i=i) for i in range(n_layers)] if link.layered else [link.hf.format(p=prefix)]
  expected = tuple(target.shape[1:] if link.layered else target.shape)
  got = link.to_ours(files[names[0]]).shape
  if got != expected:
    raise ConfigError(f"hf: {names[0]} gives {link.ours} of shape {got}, expected {expected}")
  shards: dict[tuple, np.ndarray] = {}  # replicated shards are cut once

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in shards:
      if link.layered:
        layers, rest = range(n_layers)[index[0]], index[1:]
        shards[key] = np.stack([link.to_ours(files[names[i]])[rest] for i in layers], dtype=dtype)
      else:
        shards[key] = np.asarray(link.to_ours(files[names[0]])[index], dtype=dtype)
    return shards[key]

  return jax.make_array_from_callback(tuple(target.shape), _sharding_of(target), shard)


def load_params(path: str, target) -> Any:
  """Our params from a HuggingFace folder, each created shard by shard in `target`'s shardings.

  target: abstract params (ShapeDtypeStructs, usually carrying shardings: `train_state.param_shardings_for`)
  of a language model, a Transformer trunk without unembedding (a scalar model's trunk, which `model_io`
  loads from a language model), or a scalar model (from a sequence classifier). Its dtypes are the dtypes
  the parameters are converted to. The HF model's shape must be `read_config(path)`'s.
  """
  cfg, kind, info = read_config(path)
  files = TensorFiles(path)
  scalar = isinstance(target, dict) and "head" in target
  if scalar and kind != "scalar":
    raise ConfigError(f"hf: {path} is a language model; a scalar model starts from its trunk (model_io.load)")
  trunk_target = target["transformer"] if scalar else target
  links = trunk_links(cfg, unembed="unembed" in trunk_target)
  missing = _leaf_paths(trunk_target) - {link.ours for link in links}
  if missing:
    raise ConfigError(f"hf: the target has parameters no HF tensor maps to: {sorted(missing)}")
  prefix = _trunk_prefix(cfg, files)
  trunk: dict = {}
  for link in links:
    _put(trunk, link.ours, _read_parameter(link, files, prefix, _get(trunk_target, link.ours), cfg.n_layers))
  if not scalar:
    return trunk
  kernel = _read_parameter(SCORE, files, "", _get(target, SCORE.ours), cfg.n_layers)
  bias_target = target["head"]["proj"]["bias"]
  bias = np.full(bias_target.shape, info.get("head_bias", 0.0), np.dtype(bias_target.dtype))
  bias = jax.make_array_from_callback(bias.shape, _sharding_of(bias_target), bias.__getitem__)
  return {"transformer": trunk, "head": {"proj": {"kernel": kernel, "bias": bias}}}


# ------------------------------------------------------------------------------------------ export


def _host_array(x) -> np.ndarray:
  """A whole array on this host (every process must call it: a multi-host array is gathered)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _layer_struct(leaf, i: int | None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(leaf.shape if i is None else leaf.shape[1:], leaf.dtype)


def _pending_tensors(params, links: list[Link], cfg: ModelConfig, prefix: str, dtype) -> list[PendingTensor]:
  """The HF tensors of `links` over `params`, one per (name, layer), in the links' order."""
  by_name: dict[str, list[Link]] = {}
  for link in links:
    by_name.setdefault(link.hf, []).append(link)

  def layer_of(link, i):  # our parameter, or its layer i (sliced on the devices: only that layer is gathered)
    leaf = _get(params, link.ours)
    return leaf if i is None else leaf[i]

  def value(group, i):
    parts = [link.to_hf(_host_array(layer_of(link, i))) for link in group]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

  tensors = []
  for template, group in by_name.items():
    for i in range(cfg.n_layers) if group[0].layered else (None,):
      shapes = [jax.eval_shape(link.to_hf, _layer_struct(_get(params, link.ours), i)).shape for link in group]
      shape = (*shapes[0][:-1], sum(s[-1] for s in shapes))
      out_dtype = np.dtype(dtype or _get(params, group[0].ours).dtype)
      name = template.format(p=prefix, i=i)
      tensors.append(PendingTensor(name, shape, out_dtype, functools.partial(value, group, i)))
  return tensors


def export(
  directory: str,
  params,
  cfg: ModelConfig,
  *,
  kind: str = "lm",
  tokenizer: str | None = None,
  token_ids: dict[str, Any] | None = None,
  metadata: dict[str, Any] | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Writes our params as a HuggingFace model folder that transformers and vLLM load.

  Writes config.json, model.safetensors (or model-0000k-of-0000n.safetensors shards of at most
  `max_shard_bytes` with model.safetensors.index.json), generation_config.json (the token ids, see
  `generation_config`) and, with `tokenizer` (a tokenizer.json or a folder holding one), the tokenizer files
  (`copy_tokenizer`). `token_ids`: bos_token_id, eos_token_id (an id or a list), pad_token_id (kept only
  when it is an id of the vocabulary, `config_token_ids`). kind "scalar" writes a sequence classifier (module
  docstring); `metadata` (e.g. reward_bias) goes under CONFIG_KEY in config.json. `dtype` casts the tensors on write
  (e.g. "bfloat16"); by default they keep the params' dtype. Every process calls it; process 0 writes.
  """
  if kind not in ("lm", "scalar"):
    raise ConfigError(f"hf export: kind {kind!r} is not lm or scalar")
  trunk = params["transformer"] if kind == "scalar" else params
  links = trunk_links(cfg, unembed=kind == "lm" and not cfg.tied_embeddings)
  tensors = _pending_tensors(trunk, links, cfg, FAMILIES[cfg.family].prefix, dtype)
  metadata = dict(metadata or {})
  if kind == "scalar":
    tensors += _pending_tensors(params, [SCORE], cfg, "", dtype)
    metadata["head_bias"] = float(_host_array(params["head"]["proj"]["bias"]).reshape(-1)[0])
  written_dtype = str(np.dtype(dtype or jax.tree.leaves(trunk)[0].dtype))
  config = hf_config(cfg, kind=kind, dtype=written_dtype, token_ids=token_ids, metadata=metadata or None)
  ids = config_token_ids(cfg, token_ids)

  writer = jax.process_index() == 0
  if writer:
    paths.make_dir(directory)
    # Weights of an earlier export into this folder (another shard count) would be read with ours.
    for stale in paths.glob(paths.join(directory, "*.safetensors")) + paths.glob(paths.join(directory, INDEX_FILE)):
      paths.path(stale).unlink()
    paths.write_json(paths.join(directory, "config.json"), config)
  files = _split_into_files(tensors, max_shard_bytes)
  for name, group in files.items():
    write_safetensors(paths.join(directory, name), group, write=writer)
  if writer and len(files) > 1:
    index = {
      "metadata": {"total_size": sum(t.nbytes for t in tensors)},
      "weight_map": {t.name: name for name, group in files.items() for t in group},
    }
    paths.write_json(paths.join(directory, INDEX_FILE), index)
  if writer and tokenizer:
    copy_tokenizer(tokenizer, directory, ids)
  if writer:
    generation = generation_config(ids, _tokenizer_folder(tokenizer) if tokenizer else None)
    if generation:
      paths.write_json(paths.join(directory, GENERATION_CONFIG), generation)
    elif paths.path(directory, GENERATION_CONFIG).exists():  # an earlier export's ids are not this model's
      paths.path(directory, GENERATION_CONFIG).unlink()


def _split_into_files(tensors: list[PendingTensor], max_shard_bytes: int) -> dict[str, list[PendingTensor]]:
  """{file name: tensors}: consecutive tensors packed into files of at most max_shard_bytes (a larger
  tensor gets a file of its own), named as transformers names them."""
  groups: list[list[PendingTensor]] = [[]]
  for tensor in tensors:
    if groups[-1] and sum(t.nbytes for t in groups[-1]) + tensor.nbytes > max_shard_bytes:
      groups.append([])
    groups[-1].append(tensor)
  if len(groups) == 1:
    return {"model.safetensors": groups[0]}
  return {f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors": g for k, g in enumerate(groups)}


def _tokenizer_folder(tokenizer: str) -> str | None:
  """The HF folder a tokenizer comes with: the folder given, or the folder of a file named tokenizer.json."""
  if paths.path(tokenizer).is_dir():
    return tokenizer
  if paths.path(tokenizer).name == "tokenizer.json":
    return str(paths.path(tokenizer).parent)
  return None


def _id_list(token_id) -> list[int]:
  if token_id is None:
    return []
  return list(token_id) if isinstance(token_id, (list, tuple)) else [token_id]


def generation_config(token_ids: dict[str, Any], source: str | None = None) -> dict[str, Any]:
  """generation_config.json: the bos, eos and pad ids of config.json (`config_token_ids`).

  When the tokenizer's folder `source` has a generation_config.json, its EOS ids come first and ours are
  added, so a chat model still stops at the end of a turn (Llama 3 Instruct lists [128001, 128008, 128009])
  and at the EOS our stages train with. One id is written as an int, several as a list.
  """
  out = {k: v for k, v in token_ids.items() if k in TOKEN_ID_FIELDS}
  theirs = paths.read_json(paths.join(source, GENERATION_CONFIG)) if source else None
  eos = _id_list((theirs or {}).get("eos_token_id"))
  eos += [t for t in _id_list(out.get("eos_token_id")) if t not in eos]
  if eos:
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  return out


def _agreeing_token(current, ids: list[int], vocab: tokenizers.Tokenizer):
  """What a tokenizer file should name as the special token of `ids` (config.json's id or ids): `current`
  (a token, or an AddedToken dict) when it is one of them, else the first of them the vocabulary holds."""
  text = current.get("content") if isinstance(current, dict) else current
  if not ids or (text is not None and vocab.token_to_id(text) in ids):
    return current
  return next((vocab.id_to_token(i) for i in ids if vocab.id_to_token(i) is not None), current)


def copy_tokenizer(tokenizer: str, directory: str, token_ids: dict[str, Any]) -> None:
  """Copies tokenizer.json and, from its folder (a folder given, or the folder of a file named
  tokenizer.json), tokenizer_config.json, special_tokens_map.json and chat_template.jinja into `directory`,
  so the chat template (in tokenizer_config.json or chat_template.jinja) goes along.

  The special tokens those files name are made to agree with `token_ids` (config.json's): eos_token becomes
  the token of eos_token_id (or stays, when it is one of a list), and bos_token and pad_token likewise when
  those ids are given. Without a tokenizer_config.json, one is written that names them, so that
  transformers' AutoTokenizer knows EOS and padding.
  """
  folder = _tokenizer_folder(tokenizer)
  source = paths.join(tokenizer, "tokenizer.json") if paths.path(tokenizer).is_dir() else tokenizer
  if not paths.path(source).exists():
    raise ConfigError(f"hf export: tokenizer {source} does not exist")
  copies = {source: "tokenizer.json"}
  for name in TOKENIZER_FILES if folder else ():
    if paths.path(folder, name).exists():
      copies[paths.join(folder, name)] = name
  special_files = {name: path for path, name in copies.items() if name in SPECIAL_TOKEN_FILES}
  for path, name in copies.items():
    if name not in special_files and not paths.same_file(path, paths.join(directory, name)):
      paths.path(directory, name).write_bytes(paths.path(path).read_bytes())
  vocab = tokenizers.Tokenizer.from_str(paths.read_text(source))
  for name in SPECIAL_TOKEN_FILES:
    if name in special_files:
      special = paths.read_json(special_files[name])  # chat_template and every other field are kept
    elif name == "tokenizer_config.json":
      special = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
      continue
    for field in TOKEN_ID_FIELDS:
      key = field.removesuffix("_id")
      token = _agreeing_token(special.get(key), _id_list(token_ids.get(field)), vocab)
      if token is not None:
        special[key] = token
    paths.write_json(paths.join(directory, name), special)
