"""Accelerators by the names people give them, from one table of TPU generations; no jax import, so the TPU
launcher (launch/tpu.py) checks names without jax, and the AOT compiler (aot.py) derives its targets here.

  v4-N, v5p-N       a TPU slice; N counts TensorCores (2 per chip), as gcloud's accelerator types do
  v5e-N, v6e-N      a TPU slice; N counts chips (gcloud calls v5e `v5litepod-N`, also accepted)
  8xH100, Nx8xH100  N hosts of 8 GPUs (H200 alike); 64xH100 (the GPU count) is read as 8x8xH100
  cpu-N             N fake CPU devices; cpu-<any name above>: as many fake CPU devices as it has

    >>> parse_slice("v5p-256").topology, parse_slice("v5e-16").accelerator_type
    ('v5p:4x4x8', 'v5litepod-16')

One JAX device per chip on every generation (v4 and v5p run their two TensorCores as one megacore device).
"""

from __future__ import annotations

import dataclasses
import math
import re

from instructgpt_jax import errors

# The 2-D generations' slices (v5e, v6e), from Google's tables of supported topologies.
SHAPES_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
# The 3-D generations (v4, v5p): these four below a cube of 64 chips, then any box of whole 4x4x4 cubes
# (every side a multiple of 4) up to the generation's largest slice.
SMALL_SHAPES_3D = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4))


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as the libtpu topology names it ("v5e:16x16") and users write it ("v5e-256")
  gcloud: str  # gcloud's accelerator-type prefix ("v5litepod-256")
  counts_cores: bool  # N in "<name>-N" counts TensorCores (2 per chip) rather than chips
  hbm_gib: float  # HBM per chip
  # The TPU VM software version for JAX, per https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX":
  # v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base).
  runtime: str
  largest: tuple[int, ...]  # the largest slice's shape: 2-D generations list theirs in SHAPES_2D
  chip_config: str = "default"  # libtpu's chip_config_name: v4 is compiled for its megacore devices

  @property
  def shapes(self) -> list[tuple[int, ...]]:
    """Every slice shape, smallest first; one per chip count (the most cube-like box for 3-D ones)."""
    if len(self.largest) == 2:
      return list(SHAPES_2D)
    limit = sorted(self.largest)
    boxes = {}
    for a in range(4, limit[0] + 1, 4):
      for b in range(a, limit[1] + 1, 4):
        for c in range(b, limit[2] + 1, 4):
          chips = a * b * c
          if chips not in boxes or max(boxes[chips]) > c:
            boxes[chips] = (a, b, c)
    return list(SMALL_SHAPES_3D) + [boxes[chips] for chips in sorted(boxes)]

  def size_name(self, chips: int) -> int:
    """N of the slice name "<gen>-N" of a slice of `chips` chips."""
    return 2 * chips if self.counts_cores else chips

  @property
  def sizes(self) -> list[int]:
    return [self.size_name(math.prod(shape)) for shape in self.shapes]


GENERATIONS = {
  g.name: g
  for g in (
    Generation("v4", "v4", True, 32.0, "tpu-ubuntu2204-base", (16, 16, 16), chip_config="megacore"),
    Generation("v5e", "v5litepod", False, 16.0, "v2-alpha-tpuv5-lite", (16, 16)),
    Generation("v5p", "v5p", True, 95.0, "v2-alpha-tpuv5", (16, 16, 24)),
    Generation("v6e", "v6e", False, 32.0, "v2-alpha-tpuv6e", (16, 16)),
  )
}
PREFIXES = {g.gcloud: g for g in GENERATIONS.values()} | GENERATIONS  # "v5litepod-16" and "v5e-16" alike
GPUS = {"H100": 80.0, "H200": 139.0}  # GiB a program may use per GPU (H200: 141 GB, about 139 GiB usable)
PROXY = "v5p"  # the generation whose XLA:TPU compile stands in for a GPU cluster (no XLA:GPU runs offline)

SLICE_FORMS = "v4-N or v5p-N (N = TensorCores, 2 per chip), v5e-N (or v5litepod-N) or v6e-N (N = chips)"
FORMS = f"{SLICE_FORMS}, 8xH100 or Nx8xH100 (H200 alike), cpu-N (N fake CPU devices) or cpu-<any of these>"


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: a generation and a shape of chips."""

  generation: Generation
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """gcloud's --accelerator-type ("v4-512", "v5litepod-16")."""
    return f"{self.generation.gcloud}-{self.generation.size_name(self.chips)}"

  @property
  def topology(self) -> str:
    """libtpu's topology name ("v4:4x8x8"), for jax.experimental.topologies.get_topology_desc."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host(self) -> tuple[int, int, int] | None:
    """libtpu's chips_per_host_bounds where its default (2x2x1, 4 chips per host) is wrong: a one-chip slice,
    and the 8-chip v5e and v6e slices, which are one host. None: the default."""
    if self.chips == 1:
      return (1, 1, 1)
    if self.chips == 8 and len(self.shape) == 2:
      return (2, 4, 1)
    return None


def _slice_error(text: str, generation: Generation | None = None, *, forms: str = FORMS) -> errors.UserError:
  if generation is None:
    return errors.UserError(f"{text}: not {'a TPU slice' if forms == SLICE_FORMS else 'an accelerator'}; use {forms}")
  what = "TensorCores, 2 per chip" if generation.counts_cores else "chips"
  sizes = ", ".join(map(str, generation.sizes))
  return errors.UserError(f"{text}: not a {generation.name} slice; {generation.name}-N takes N ({what}) in {sizes}")


def parse_slice(text: str) -> Slice:
  """The TPU slice `text` names ("v5p-256", "v5e-16", "v5litepod-16"); errors.UserError (one line naming
  the valid forms or sizes) for anything else."""
  found = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip())
  if not found or found.group(1) not in PREFIXES:
    raise _slice_error(text, forms=SLICE_FORMS)
  generation, n = PREFIXES[found.group(1)], int(found.group(2))
  for shape in generation.shapes:
    if generation.size_name(math.prod(shape)) == n:
      return Slice(generation, shape)
  raise _slice_error(text, generation)


@dataclasses.dataclass(frozen=True)
class Target:
  """What aot.py compiles for. platform "tpu": libtpu's topology `topology`; "cpu": fake CPU devices."""

  name: str
  platform: str
  devices: int
  hbm_gib: float  # memory per device (chip, GPU) that a program may use
  topology: str = ""
  chip_config: str = "default"
  note: str = ""
  chips_per_host: tuple[int, int, int] | None = None
  accelerator_type: str = ""  # gcloud's name of the slice compiled for


def _gpu_target(name: str, gpu: str, gpus: int) -> Target:
  proxy = GENERATIONS[PROXY]
  shape = next((s for s in proxy.shapes if math.prod(s) == gpus), None)
  if shape is None:
    counts = ", ".join(str(math.prod(s) // 8) for s in proxy.shapes if math.prod(s) % 8 == 0)
    raise errors.UserError(
      f"{name}: no {PROXY} slice has {gpus} chips to compile for in place of {gpus} GPUs (no XLA:GPU compiler runs "
      f"offline); use Nx8x{gpu} with N in {counts}, or cpu-{name} (fake CPU devices: state only)"
    )
  s = Slice(proxy, shape)
  return Target(
    name,
    "tpu",
    gpus,
    GPUS[gpu],
    s.topology,
    proxy.chip_config,
    note=f"XLA:TPU's compile for {gpus} {PROXY} chips ({s.topology}), judged against {GPUS[gpu]:g} GiB per {gpu}: "
    "state and KV-cache bytes exact, temp an estimate of XLA:GPU's",
    chips_per_host=s.chips_per_host,
    accelerator_type=s.accelerator_type,
  )


def parse_target(text: str) -> Target:
  """The AOT target `text` names (the forms in FORMS); errors.UserError, one line, for anything else."""
  name = text.strip()
  if name.startswith("cpu-"):
    rest = name.removeprefix("cpu-")
    if rest.isdigit() and int(rest) >= 1:
      return Target(name, "cpu", int(rest), 16.0, note="fake CPU devices: temp not measured")
    try:
      inner = parse_target(rest)
    except errors.UserError:
      raise _slice_error(name) from None
    return Target(name, "cpu", inner.devices, inner.hbm_gib, note=f"fake CPU devices as {rest}: temp not measured")
  gpu = re.fullmatch(r"(?:(\d+)x)?(\d+)x(H100|H200)", name)
  if gpu:
    hosts, per_host, kind = int(gpu.group(1) or 1), int(gpu.group(2)), gpu.group(3)
    if (gpu.group(1) and per_host != 8) or per_host % 8 or hosts < 1 or per_host < 1:
      raise _slice_error(name)
    return _gpu_target(name, kind, hosts * per_host)
  if name.split("-")[0] not in PREFIXES:
    raise _slice_error(name)
  s = parse_slice(name)
  return Target(
    name,
    "tpu",
    s.chips,
    s.generation.hbm_gib,
    s.topology,
    s.generation.chip_config,
    chips_per_host=s.chips_per_host,
    accelerator_type=s.accelerator_type,
  )


def mesh_error(mesh: dict, devices: int) -> str:
  """Why the config's `mesh` section (data, fsdp, tensor, dcn_*; one ICI axis may be -1) cannot lay out
  `devices` devices, in one line; "" where it can (the arithmetic of sharding.make_mesh)."""
  axes = ("data", "fsdp", "tensor")
  slices = math.prod(int(mesh.get(f"dcn_{a}", 1)) for a in axes)
  ici = [int(mesh.get(a, 1)) for a in axes]
  shown = ", ".join(f"{a}={v}" for a, v in mesh.items())
  if slices < 1 or devices % slices:
    return f"mesh ({shown}): {devices} devices do not split into {slices} slices"
  per_slice = devices // slices
  fixed = math.prod(v for v in ici if v != -1)
  if (-1 in ici and per_slice % fixed) or (-1 not in ici and fixed != per_slice):
    return f"mesh ({shown}): does not lay out {per_slice} devices per slice"
  return ""
