"""What a low-precision recipe is: one frozen description per operand of a dot.

A dense layer runs three GEMMs: forward `input x kernel`, dgrad
`output_grad x kernel^T`, wgrad `input^T x output_grad`. A recipe says, for
each of the three operand roles, how that operand is quantized:

    element      element format (e4m3, e5m2, e2m3, e3m2, e2m1)
    granularity  which elements share one scale:
                   tensor  one scale for the whole tensor
                   row     one scale per slice along the contracting axis
                           (torchao "rowwise": the scale factors out of the GEMM)
                   tile    1 x block_size runs along the contracting axis
                           (DeepSeek-V3 1x128, MX 1x32, NVFP4 1x16)
                   block   block_size x block_size squares of the 2-D matrix;
                           the same blocks whichever axis is contracted, so the
                           forward and the dgrad GEMM see the same quantized
                           weight (DeepSeek-V3 128x128, NVFP4 16x16)
    scale        scale format: fp32 (any real scale), e8m0 (a power of two,
                 OCP MX), e4m3 (NVFP4 block scale, under an fp32 tensor scale)
    amax         "delayed" (scale from an amax history, fp8.py) or "current"
                 (amax of the tensor being quantized, this step)
    rounding     "nearest" (round to nearest even) or "stochastic" (unbiased;
                 needs a key, see `rounding_key`)

and, for the recipe as a whole, whether the two wgrad operands go through a
random Hadamard transform along the token axis first (NVFP4 training recipe).

The contracting axis is not part of the spec: the same tensor is tiled along
its last axis in the forward and along the token axis in wgrad, so the axis is
an argument of `quantize`. The presets below are the names users and scripts
rely on; every field can be switched with `dataclasses.replace` (that is how
an ablation takes NVFP4 apart: `replace(NVFP4, wgrad_hadamard=False)`).
"""

import dataclasses
from dataclasses import dataclass

import jax

from sandbox.errors import UserError
from sandbox.precision.recipes.formats import ELEMENT_FORMATS, SCALE_FORMATS

GRANULARITIES = ("tensor", "row", "tile", "block")
AMAX_TIMINGS = ("delayed", "current")
ROUNDINGS = ("nearest", "stochastic")
E8M0_ROUNDINGS = ("floor", "ceil")
ROLES = ("input", "kernel", "output_grad")


def _check(value, allowed, key):
    if value not in allowed:
        raise UserError(f"recipe {key} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class OperandSpec:
    """How one operand of a dot is quantized."""

    element: str = "e4m3"  # element format name
    granularity: str = "tensor"  # tensor | row | tile | block
    block_size: int = 0  # N of a 1xN tile or an NxN block; 0 otherwise
    scale: str = "fp32"  # scale format: fp32 | e8m0 | e4m3
    amax: str = "current"  # delayed (history) | current (this tensor)
    rounding: str = "nearest"  # nearest (even) | stochastic
    margin: int = 0  # fp32 scales only: 2**margin headroom, as fp8.py
    e8m0_rounding: str = "floor"  # floor: OCP MX v1.0 rule; ceil: never saturates (NVIDIA, jax.nn)
    tensor_scale: bool = False  # e4m3 scales only: second-level fp32 per-tensor scale (NVFP4)

    def __post_init__(self):
        _check(self.element, tuple(ELEMENT_FORMATS), "element")
        _check(self.granularity, GRANULARITIES, "granularity")
        _check(self.scale, tuple(SCALE_FORMATS), "scale")
        _check(self.amax, AMAX_TIMINGS, "amax")
        _check(self.rounding, ROUNDINGS, "rounding")
        _check(self.e8m0_rounding, E8M0_ROUNDINGS, "e8m0_rounding")
        tiled = self.granularity in ("tile", "block")
        if tiled != (self.block_size > 0):
            raise UserError(
                f"recipe block_size must be > 0 exactly for tile/block granularity, "
                f"got {self.block_size} with {self.granularity!r}"
            )
        if self.amax == "delayed" and (self.granularity != "tensor" or self.scale != "fp32"):
            raise UserError("recipe amax='delayed' needs granularity='tensor' and scale='fp32'")
        if self.scale != "fp32" and not tiled:
            raise UserError(f"recipe scale={self.scale!r} needs tile or block granularity")
        if self.tensor_scale and self.scale != "e4m3":
            raise UserError("recipe tensor_scale=True needs scale='e4m3'")


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe for the three GEMMs of a dot."""

    name: str
    input: OperandSpec
    kernel: OperandSpec
    output_grad: OperandSpec
    wgrad_hadamard: bool = False  # random Hadamard transform on both wgrad operands
    hadamard_size: int = 16  # order of the Hadamard blocks along the token axis
    hadamard_seed: int = 0  # fixed seed of the random sign vector
    history_len: int = 16  # delayed operands: amaxes remembered

    def __post_init__(self):
        size = self.hadamard_size
        if size < 1 or size & (size - 1):
            raise UserError(f"recipe hadamard_size must be a power of two, got {size}")

    def spec(self, role: str) -> OperandSpec:
        return getattr(self, role)

    @property
    def is_delayed(self) -> bool:
        return any(self.spec(role).amax == "delayed" for role in ROLES)

    @property
    def needs_key(self) -> bool:
        return any(self.spec(role).rounding == "stochastic" for role in ROLES)


def rounding_key(seed: int, step, tensor_id: int) -> jax.Array:
    """Stochastic-rounding key: a pure function of (seed, step, tensor id).

    Same seed, step and tensor: same bits, so a run is reproducible and a
    resumed run draws what the uninterrupted one drew. `tensor_id` is any
    stable integer per quantized tensor (e.g. zlib.crc32 of its layer path).
    """
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.fold_in(key, tensor_id)


def _tile(element, size, scale, **kw):
    return OperandSpec(element=element, granularity="tile", block_size=size, scale=scale, **kw)


def _block(element, size, scale, **kw):
    return OperandSpec(element=element, granularity="block", block_size=size, scale=scale, **kw)


_E4M3_TENSOR = OperandSpec("e4m3", "tensor")
_E5M2_TENSOR = OperandSpec("e5m2", "tensor")

FP8_DELAYED = Recipe(
    "fp8_delayed",
    input=dataclasses.replace(_E4M3_TENSOR, amax="delayed"),
    kernel=dataclasses.replace(_E4M3_TENSOR, amax="delayed"),
    output_grad=dataclasses.replace(_E5M2_TENSOR, amax="delayed"),
)
FP8_CURRENT = Recipe("fp8_current", _E4M3_TENSOR, _E4M3_TENSOR, _E5M2_TENSOR)
FP8_ROWWISE = Recipe(
    "fp8_rowwise",
    input=OperandSpec("e4m3", "row"),
    kernel=OperandSpec("e4m3", "row"),
    output_grad=OperandSpec("e5m2", "row"),
)
FP8_BLOCK = Recipe(
    "fp8_block",
    input=_tile("e4m3", 128, "fp32"),
    kernel=_block("e4m3", 128, "fp32"),
    output_grad=_tile("e4m3", 128, "fp32"),
)
MXFP8 = Recipe("mxfp8", *(_tile("e4m3", 32, "e8m0"),) * 3)
MXFP6 = Recipe("mxfp6", *(_tile("e2m3", 32, "e8m0"),) * 2, output_grad=_tile("e3m2", 32, "e8m0"))
MXFP4 = Recipe("mxfp4", *(_tile("e2m1", 32, "e8m0"),) * 3)
NVFP4 = Recipe(
    "nvfp4",
    input=_tile("e2m1", 16, "e4m3", tensor_scale=True),
    kernel=_block("e2m1", 16, "e4m3", tensor_scale=True),
    output_grad=_tile("e2m1", 16, "e4m3", tensor_scale=True, rounding="stochastic"),
    wgrad_hadamard=True,
    hadamard_size=16,
)

PRESETS = {
    r.name: r
    for r in (FP8_DELAYED, FP8_CURRENT, FP8_ROWWISE, FP8_BLOCK, MXFP8, MXFP6, MXFP4, NVFP4)
}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise UserError(f"unknown recipe {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


SWITCHES = ("preset", "on", "off")


def customized(recipe: Recipe, wgrad_hadamard="preset", stochastic_rounding="preset",
               weight_blocks="preset") -> Recipe:
    """The recipe with parts of it switched on or off (config keys precision.recipe.*).

    wgrad_hadamard       the random Hadamard transform on the wgrad GEMM's operands
    stochastic_rounding  of the output gradients (both GEMMs they enter)
    weight_blocks        on: NxN weight blocks (forward and dgrad see one quantized weight);
                         off: 1xN tiles along each GEMM's contracting axis, like the activations
    "preset" keeps the recipe's own choice.
    """
    for key, value in (("wgrad_hadamard", wgrad_hadamard), ("stochastic_rounding", stochastic_rounding),
                       ("weight_blocks", weight_blocks)):
        _check(value, SWITCHES, f"precision.recipe.{key}")
    changes = {}
    if wgrad_hadamard != "preset":
        changes["wgrad_hadamard"] = wgrad_hadamard == "on"
    if stochastic_rounding != "preset":
        rounding = "stochastic" if stochastic_rounding == "on" else "nearest"
        changes["output_grad"] = dataclasses.replace(recipe.output_grad, rounding=rounding)
    if weight_blocks != "preset":
        kernel = recipe.kernel
        if kernel.granularity not in ("tile", "block"):
            raise UserError(f"precision.recipe.weight_blocks: recipe {recipe.name!r} scales its weights per "
                            f"{kernel.granularity}, not in tiles or blocks; leave it at 'preset'")
        changes["kernel"] = dataclasses.replace(kernel, granularity="block" if weight_blocks == "on" else "tile")
    return dataclasses.replace(recipe, **changes)


def _describe_operand(spec: OperandSpec) -> str:
    n = spec.block_size
    where = {"tensor": "tensor", "row": "row", "tile": f"1x{n}", "block": f"{n}x{n}"}[spec.granularity]
    scale = spec.scale + ("+fp32" if spec.tensor_scale else "")
    extra = (" delayed" if spec.amax == "delayed" else "") + (" SR" if spec.rounding == "stochastic" else "")
    return f"{spec.element} {where} {scale}{extra}"


def describe(recipe: Recipe) -> str:
    """One line: 'nvfp4 (input e2m1 1x16 e4m3+fp32, kernel e2m1 16x16 e4m3+fp32, ..., wgrad RHT 16)'."""
    parts = [f"{role} {_describe_operand(recipe.spec(role))}" for role in ROLES]
    if recipe.wgrad_hadamard:
        parts.append(f"wgrad RHT {recipe.hadamard_size}")
    return f"{recipe.name} ({', '.join(parts)})"
