"""Typed, validated, immutable run configuration.

One schema of frozen dataclasses; every field carries a one-line help and its
valid range. YAML files and `--set key.path=value` overrides are merged as
plain dicts first, then validated in one place, so an unknown key, a wrong
type or an out-of-range value is always reported the same way: one line that
names the key path and what was expected (a `UserError`, exit status 2).
YAML is read with a strict subclass of `yaml.SafeLoader` only: a config file
can never run code, a key written twice is an error (YAML would keep the last
one silently), and aliases may not expand to more than `YAML_MAX_NODES` nodes
(a few hundred bytes of nested aliases otherwise expand to billions, and any
code that walks or prints the value runs out of memory).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sandbox.errors import UserError, shown
from sandbox.rundir import check_name


def F(default, help: str, *, min=None, max=None, choices=None):  # noqa: A002
    """A schema field with its help line and valid range."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = F(256, "vocabulary size; must match the tokenizer", min=2, max=2**24)
    context: int = F(64, "maximum sequence length T", min=2, max=2**20)
    n_layer: int = F(2, "number of transformer blocks", min=1, max=1024)
    n_head: int = F(2, "attention heads per block", min=1, max=4096)
    d_model: int = F(64, "residual stream width; divisible by n_head", min=1, max=2**20)
    mlp_ratio: int = F(4, "MLP hidden width as a multiple of d_model", min=1, max=64)
    positions: str = F("learned", "position encoding", choices=("learned", "rotary"))
    dropout: float = F(0.0, "dropout rate on residual branches", min=0.0, max=0.9)
    init_std: float = F(0.02, "std of the normal weight initialiser", min=0.0)
    qk_norm: str = F("false", "normalise q and k per head (fp32 statistics) before the scores: "
                              "qk-layernorm (Wortsman et al. 2023) stops attention-logit growth",
                     choices=("false", "layernorm", "rmsnorm"))
    attn_softcap: float = F(0.0, "cap attention scores as cap*tanh(s/cap) in fp32 (Gemma 2; 0 = off)", min=0.0)
    logit_softcap: float = F(0.0, "cap output logits as cap*tanh(z/cap) in fp32 (Gemma 2; 0 = off)", min=0.0)


@dataclass(frozen=True)
class SyntheticConfig:
    alphabet: int = F(16, "symbols of the Markov source (token ids 0..alphabet-1)", min=2, max=256)
    order: int = F(1, "Markov order k: each symbol depends on the previous k", min=1, max=4)
    concentration: float = F(0.3, "Dirichlet alpha of each transition row; lower = lower entropy", min=1e-3)
    seed: int = F(1234, "seed of the source itself (another seed is another distribution)", min=0,
                   max=2**64 - 1)


@dataclass(frozen=True)
class DataConfig:
    source: str = F("synthetic", "where tokens come from", choices=("synthetic", "text", "hf"))
    paths: tuple[str, ...] = F((), "source=text: text files; source=hf: JSON/CSV/Parquet/text data files "
                                   "(relative to the config file or cwd; builtin:NAME = a shipped corpus)")
    hf_name: str = F("", "source=hf: a local save_to_disk folder (hub names are refused: nothing is "
                         "downloaded at run time)")
    hf_format: str = F("auto", "source=hf: the format of data.paths (auto = from each file's suffix)",
                       choices=("auto", "json", "csv", "parquet", "text"))
    hf_split: str = F("train", "source=hf: the split of a saved DatasetDict")
    hf_field: str = F("text", "source=hf: the column that holds the text")
    tokenizer: str = F("byte", "byte = UTF-8 bytes; bpe = byte-level BPE trained on the training split",
                       choices=("byte", "bpe"))
    bpe_vocab_size: int = F(512, "vocabulary of the trained BPE (tokenizer=bpe); model.vocab_size must be "
                                 "at least this", min=256, max=65536)
    val_fraction: float = F(0.1, "fraction of the corpus (its tail) held out for validation", min=0.0, max=0.5)
    cache_dir: str = F(".cache/sandbox", "where tokenized corpora are cached as memory-mapped arrays")
    prefetch: int = F(2, "batches prepared ahead on a background thread (0 = none)", min=0, max=64)
    synthetic: SyntheticConfig = F(SyntheticConfig(), "the synthetic Markov source")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = F(1e-3, "peak learning rate", min=0.0)
    min_lr_ratio: float = F(0.1, "final learning rate as a fraction of lr", min=0.0, max=1.0)
    warmup_steps: int = F(100, "linear warmup steps", min=0)
    decay_steps: int = F(0, "cosine decay length in steps (0 = training.steps)", min=0)
    weight_decay: float = F(0.1, "decoupled AdamW weight decay (matrices only)", min=0.0)
    independent_weight_decay: bool = F(False, "decay by weight_decay * lr(t)/lr, not weight_decay * lr(t): "
                                              "the decay no longer grows with the peak lr (Wortsman et al. 2023)")
    b1: float = F(0.9, "Adam beta1", min=0.0, max=1.0)
    b2: float = F(0.99, "Adam beta2", min=0.0, max=1.0)
    eps: float = F(1e-8, "Adam epsilon", min=0.0)
    grad_clip: float = F(1.0, "global-norm gradient clipping (0 = off)", min=0.0)
    accum_steps: int = F(1, "gradient accumulation microbatches per step", min=1)


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = F(200, "optimizer steps", min=1)
    batch_size: int = F(16, "sequences per step (all microbatches together)", min=1, max=2**30)
    eval_every: int = F(100, "evaluate on the validation split every N steps (0 = end only)", min=0)
    eval_batches: int = F(8, "validation batches per evaluation", min=1)
    log_every: int = F(10, "read metrics to the host every N steps", min=1)


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = F(True, "write tensorboardX event files")
    jsonl: bool = F(True, "write metrics.jsonl")
    progress: bool = F(True, "show a live progress bar")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = F(0, "save every N steps (0 = only at the end)", min=0)
    keep: int = F(3, "checkpoints kept", min=1)


@dataclass(frozen=True)
class LossScaleConfig:
    mode: str = F("auto", "auto = the policy's default", choices=("auto", "dynamic", "static", "none"))
    init_scale: float = F(2.0**16, "initial (or static) loss scale", min=1e-30)
    growth_factor: float = F(2.0, "scale multiplier after growth_interval clean steps", min=1.0)
    backoff_factor: float = F(0.5, "scale multiplier on overflow", min=1e-6, max=1.0)
    growth_interval: int = F(2000, "clean steps before the scale grows", min=1)
    min_scale: float = F(1.0, "floor of the scale", min=1e-30)
    max_scale: float = F(2.0**24, "ceiling of the scale", min=1.0)


@dataclass(frozen=True)
class Fp8Config:
    fwd_dtype: str = F("e4m3", "fp8 format of inputs and weights", choices=("e4m3", "e5m2"))
    bwd_dtype: str = F("e5m2", "fp8 format of output gradients", choices=("e4m3", "e5m2"))
    history_len: int = F(16, "amax history length per tensor", min=1)
    margin: int = F(0, "scale headroom: scale = fp8_max / (2^margin * amax)", min=0, max=16)
    amax_algo: str = F("max", "scale from the history's max or its most recent amax", choices=("max", "most_recent"))
    head: bool = F(False, "also quantize the output head matmul")


SWITCH = ("preset", "on", "off")


@dataclass(frozen=True)
class RecipeConfig:
    wgrad_hadamard: str = F("preset", "random Hadamard transform on the weight-gradient GEMM's inputs",
                            choices=SWITCH)
    stochastic_rounding: str = F("preset", "stochastic rounding of the output gradients", choices=SWITCH)
    weight_blocks: str = F("preset", "weights in NxN blocks (on) or 1xN tiles (off); tiled recipes only",
                           choices=SWITCH)
    keep_bf16: tuple[str, ...] = F((), "blocks whose dense layers stay unquantized: first, last, block_<i>")
    head: bool = F(False, "also quantize the output head matmul")


@dataclass(frozen=True)
class PrecisionConfig:
    policy: str = F("fp32", "preset (fp32 tf32 bf16 fp16 fp8 bf16_pure fp16_noscale bf16_sr bf16_kahan "
                            "fp8_current fp8_rowwise fp8_block mxfp8 mxfp6 mxfp4 nvfp4) or "
                            "'params=..,compute=..,output=..'")
    moments: str = F("auto", "storage of Adam's moments: auto = as the parameters (optax's own adamw; bf16 "
                             "with the bf16_sr/bf16_kahan rounding stage); fp32 | bf16 | fp8 (E4M3 m, E5M2 v, "
                             "per-tensor scale), updated in fp32", choices=("auto", "fp32", "bf16", "fp8"))
    naive_softmax: bool = F(False, "teaching ablation: softmax as exp/sum in the compute dtype, no max subtraction")
    naive_log_softmax: bool = F(False, "teaching ablation: the loss takes log(softmax(logits)) instead of log_softmax")
    telemetry: bool = F(True, "collect underflow/overflow/lost-update/fp8 statistics in the step")
    telemetry_every: int = F(1, "telemetry on every Nth step only; the steps between run a lean "
                                "compiled step without it (one more compile, a faster loop)", min=1)
    loss_scale: LossScaleConfig = F(LossScaleConfig(), "loss scaling")
    fp8: Fp8Config = F(Fp8Config(), "fp8 delayed scaling (policy fp8)")
    recipe: RecipeConfig = F(RecipeConfig(), "parts of a low-precision recipe (policies fp8_current .. nvfp4)")


@dataclass(frozen=True)
class KLConfig:
    reference: str = F("", "run directory or checkpoint of the frozen reference ('' = no KL term)")
    beta: float = F(0.0, "weight of the KL term", min=0.0)
    beta_end: float = F(-1.0, "if >= 0, beta moves linearly to beta_end over training")
    direction: str = F("reverse", "reverse = KL(model || reference), forward = KL(reference || model)",
                       choices=("reverse", "forward"))
    policy: str = F("fp32", "precision policy of the reference forward pass")
    init_from_reference: bool = F(False, "start from the reference's weights (a fine-tune), not a fresh init")


@dataclass(frozen=True)
class ObjectiveConfig:
    label_smoothing: float = F(0.0, "label smoothing of the cross-entropy", min=0.0, max=1.0)
    z_loss: float = F(0.0, "coefficient of the z-loss z_loss * mean(log Z)^2, log Z the fp32 logsumexp of the "
                           "logits (PaLM uses 1e-4; 0 = off): keeps log Z near 0", min=0.0)
    kl: KLConfig = F(KLConfig(), "KL-to-reference term")
    drift_every: int = F(0, "every N steps measure KL(policy forward || fp32 forward) (0 = at eval)", min=0)


@dataclass(frozen=True)
class ForensicsConfig:
    nan_policy: str = F("capture", "on a non-finite loss/grad/param", choices=("halt", "skip", "capture"))
    skip_spikes: bool = F(False, "skip updates whose loss exceeds the rolling mean by spike_sigma stds")
    spike_window: int = F(50, "window of the rolling loss statistics", min=2, max=2**20)
    spike_sigma: float = F(6.0, "spike threshold in standard deviations", min=0.0)
    activations: bool = F(False, "log per-block activation amax and non-finite counts")
    history: int = F(50, "metrics rows kept in a failure bundle", min=1)
    max_skipped_steps: int = F(100, "stop as a failure after more than N steps in a row without an "
                                    "update: overflows, nan_policy=skip, spikes (0 = never)", min=0, max=2**31 - 1)
    min_scale_overflows: int = F(3, "stop as a failure after N overflows in a row at the minimum loss "
                                    "scale (0 = never)", min=0, max=2**31 - 1)


@dataclass(frozen=True)
class MeshConfig:
    data: int = F(-1, "data-parallel devices (-1 = all local devices / fsdp)", min=-1, max=2**16)
    fsdp: int = F(1, "devices that shard parameters and optimizer state", min=1, max=2**16)


@dataclass(frozen=True)
class Config:
    name: str = F("", "run name (default: the config file's stem)")
    seed: int = F(0, "training seed: init, batches and dropout (JAX keys hold 32 bits)", min=0, max=2**32 - 1)
    run_root: str = F("runs", "runs are written to run_root/name")
    deterministic: bool = F(False, "force deterministic XLA ops on GPU")
    model: ModelConfig = F(ModelConfig(), "model")
    data: DataConfig = F(DataConfig(), "data")
    optimizer: OptimizerConfig = F(OptimizerConfig(), "optimizer")
    training: TrainingConfig = F(TrainingConfig(), "training loop")
    logging: LoggingConfig = F(LoggingConfig(), "logging")
    checkpoint: CheckpointConfig = F(CheckpointConfig(), "checkpoints")
    precision: PrecisionConfig = F(PrecisionConfig(), "precision policy")
    objective: ObjectiveConfig = F(ObjectiveConfig(), "training objective")
    forensics: ForensicsConfig = F(ForensicsConfig(), "NaN forensics")
    mesh: MeshConfig = F(MeshConfig(), "device mesh")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


# ----------------------------------------------------------------- validation


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, path: str):
    """Checks `value` against the annotation `tp`, returning the typed value."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping of {tp.__name__} fields, got {shown(value)}")
        return _build(tp, value, path)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected {_type_name(tp)}, got {shown(value)}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            if "\0" in value:  # names and paths reach the OS, which refuses NUL with a traceback
                raise UserError(f"{path}: contains a NUL byte: {shown(value)}")
            return value
    raise UserError(f"{path}: expected {_type_name(tp)}, got {shown(value)}")


# Integers end up in int32 device arrays and loop counters: no field goes past this without its own max.
INT_MAX = 2**31 - 1


def _check_range(value, meta, path):
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if hi is None and isinstance(value, int) and not isinstance(value, bool):
        hi = INT_MAX
    if choices is not None and value not in choices:
        raise UserError(f"{path}: expected one of {', '.join(map(str, choices))}, got {shown(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"{path}: expected a finite number, got {shown(value)}")
        if lo is not None and value < lo:
            raise UserError(f"{path}: expected >= {lo}, got {shown(value)}")
        if hi is not None and value > hi:
            raise UserError(f"{path}: expected <= {hi}, got {shown(value)}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            if not where.isprintable():  # a key with a newline would break the one-line error
                where = repr(where)[1:-1]
            valid = ", ".join(sorted(fields))
            raise UserError(f"unknown config key '{where}' (valid keys here: {valid})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = raw[name]
            choices = f.metadata.get("choices") or ()
            if hints[name] is str and isinstance(value, bool):
                if SWITCH == choices:  # YAML 1.1 reads on/off (and yes/no, true/false) as booleans
                    value = "on" if value else "off"
                elif str(value).lower() in choices:  # `model.qk_norm: false` is YAML's boolean, meant as the choice
                    value = str(value).lower()
            value = _coerce(value, hints[name], path)
            _check_range(value, f.metadata, path)
            kwargs[name] = value
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    m = cfg.model
    if m.d_model % m.n_head:
        raise UserError(f"model.d_model: {m.d_model} is not divisible by model.n_head={m.n_head}")
    if m.positions == "rotary" and (m.d_model // m.n_head) % 2:
        raise UserError("model.positions: rotary needs an even head width (d_model / n_head)")
    if cfg.training.batch_size % cfg.optimizer.accum_steps:
        raise UserError(f"optimizer.accum_steps: {cfg.optimizer.accum_steps} does not divide "
                        f"training.batch_size={cfg.training.batch_size}")
    if cfg.data.source == "text" and not cfg.data.paths:
        raise UserError("data.paths: source=text needs at least one text file")
    for name in cfg.precision.recipe.keep_bf16:
        index = name[len("block_"):] if name.startswith("block_") else None
        if name not in ("first", "last") and not (index and index.isdigit() and int(index) < m.n_layer):
            raise UserError(f"precision.recipe.keep_bf16: {shown(name)} is not first, last or block_<i> "
                            f"with i < model.n_layer={m.n_layer}")
    if cfg.data.source == "hf" and bool(cfg.data.hf_name) == bool(cfg.data.paths):
        raise UserError("data.hf_name: source=hf reads one of data.hf_name (a save_to_disk folder) or "
                        "data.paths (data files)" + (", not both" if cfg.data.paths else ""))
    if cfg.data.source == "synthetic" and cfg.data.synthetic.alphabet > m.vocab_size:
        raise UserError("data.synthetic.alphabet: larger than model.vocab_size")
    check_name(cfg.name, "name")  # run_root/name must stay inside run_root


# ----------------------------------------------------------------- loading


def to_dict(cfg) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


YAML_MAX_NODES = 100_000  # expanded nodes in one document; real configs have a few hundred


class _Refused(yaml.YAMLError):
    """A well-formed YAML document this project refuses: one line, with the line it is on."""

    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.message, self.mark = message, mark


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias bombs (see the module doc)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, YAML_MAX_NODES)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _Refused(f"duplicate key {shown(key)}", key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict, budget: int) -> int:
    """Nodes in `node` with every alias expanded, memoised per node, so a bomb is never expanded."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise _Refused("recursive alias", node.start_mark)
        return sizes[key]
    sizes[key] = None
    children = node.value if isinstance(node.value, list) else []
    flat = [c for pair in children for c in pair] if isinstance(node, yaml.MappingNode) else children
    total = 1 + sum(_expanded_size(c, sizes, budget) for c in flat)
    if total > budget:
        raise _Refused(f"aliases expand to more than {budget:,} nodes", node.start_mark)
    sizes[key] = total
    return total


def load_yaml_text(text: str, where: str | Path) -> Any:
    """YAML data from text through `StrictLoader`, or a one-line UserError naming `where`."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as e:
        line = f" line {e.mark.line + 1}:" if e.mark else ""
        raise UserError(f"{where}:{line} {e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}:{line} invalid YAML") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or a one-line UserError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__})") from None
    raw = load_yaml_text(text, path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 0.0003), values parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {text!r}: empty key path")
    try:
        parsed = yaml.load(value, Loader=StrictLoader) if value.strip() else ""  # noqa: S506
    except (yaml.YAMLError, RecursionError):
        parsed = value
    if isinstance(parsed, str) and parsed.lower() in ("inf", "+inf", "-inf", "nan"):
        parsed = float(parsed)
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(raw: dict, default_name: str = "run") -> Config:
    raw = _deepcopy(raw)
    if not raw.get("name"):
        raw["name"] = default_name
    cfg = _build(Config, raw)
    _check_consistency(cfg)
    return cfg


def deep_merge(base: dict, over: dict) -> dict:
    out = _deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_with_bases(path: Path, _seen: tuple = ()) -> dict:
    """A config file merged over its `base:` file (relative to it), recursively.

    Lets the per-policy configs say only what differs (`base: shakespeare_char.yaml`
    plus `precision: {policy: bf16}`).
    """
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"{path}: base: expected a file name, got {shown(base)}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise UserError(f"{path}: base: circular reference to {base_path}")
    parent = read_with_bases(base_path, _seen + (base_path,))
    parent.pop("name", None)  # a derived config is its own run
    return deep_merge(parent, raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config, applies `--set` overrides, validates everything.

    Relative `data.paths` are resolved against the config file's directory
    when they exist there, else against the working directory.
    """
    raw = read_with_bases(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    name = Path(path).stem if path is not None else "run"
    cfg = from_dict(raw, default_name=name)
    if path is not None and cfg.data.paths:
        base = Path(path).resolve().parent
        paths = tuple(str(base / p) if not Path(p).is_absolute() and (base / p).exists() else p
                      for p in cfg.data.paths)
        cfg = replace(cfg, data={"paths": paths})
    return cfg


def load_run_config(run_dir: str | Path) -> Config:
    """The validated config.yaml of a run directory (a run directory is trusted only as data)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory")
    path = run_dir / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir}: no config.yaml (not a sandbox run directory?)")
    return from_dict(read_yaml(path), default_name=run_dir.name)


def _replaced(obj, changes: dict):
    kwargs = {}
    for name, value in changes.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _replaced(current, value)
        kwargs[name] = value
    return dataclasses.replace(obj, **kwargs)


def replace(cfg, **changes):
    """Nested `dataclasses.replace`, validated: replace(cfg, model={'n_layer': 2}).

    The result goes through the same checks as a YAML file (types, ranges, choices, consistency), so a
    programmatic change cannot build a config the loader would refuse (a UserError naming the key).
    """
    out = _replaced(cfg, changes)
    if isinstance(out, Config):
        return from_dict(to_dict(out), default_name=out.name)
    return _build(type(out), to_dict(out))


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _range_text(meta: dict) -> str:
    if meta.get("choices"):
        return " | ".join(map(str, meta["choices"]))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return ""
    return f"{'' if lo is None else f'>= {lo}'}{' and ' if lo is not None and hi is not None else ''}" \
           f"{'' if hi is None else f'<= {hi}'}"


def describe(cls=Config, prefix: str = "") -> list[dict]:
    """Every leaf key of the schema: path, type, default, valid range and help (`sandbox config keys`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), path + ".")
        else:
            rows.append({"key": path, "type": _type_name(hints[f.name]).removeprefix("an ").removeprefix("a "),
                         "default": default, "range": _range_text(f.metadata),
                         "help": f.metadata.get("help", "")})
    return rows

