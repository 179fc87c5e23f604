"""The GPU graph, checked without a GPU: the train step exported for CUDA.

`jax.export.export(jitted, platforms=["cuda"])` lowers for CUDA on a CPU-only
machine. The StableHLO of the train step (`sandbox.train.setup.build(cfg).step_fn`)
is what XLA:GPU receives, so it can be checked for what the GPU must see:

* bf16 / fp16: every dot_general takes 16-bit operands, none at HIGHEST
  precision (HIGHEST on an f32 dot would be a full-fp32 GEMM; a 16-bit operand
  pair is what tensor cores take).
* fp8: every Dense matmul (3 per fp8 layer: forward, and the two backward
  GEMMs) reads both operands as `multiply(convert(f8 tensor), broadcast(scalar))`
  with nothing in between, the pattern XLA's GEMM rewriter turns into one fp8
  cuBLASLt GEMM with the scales folded in (sandbox/precision/fp8.py).
* Attention softmax and loss in fp32: every exponential and log in the step
  (softmax, log-sum-exp, cross-entropy) is on f32 tensors.

The parse below reads only `@main`'s straight-line ops: the dots and the ops
feeding them live there (helper functions hold clip/where/take).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest
from jax import export

from conftest import tiny_config
from sandbox.train.setup import build, place_batch

REPO = Path(__file__).resolve().parents[1]
SIXTEEN_BIT = ("bf16", "f16")


@dataclass(frozen=True)
class Op:
    kind: str  # stablehlo op name: dot_general, convert, multiply, ...
    operands: tuple[str, ...]
    types: str  # the trailing type signature, e.g. "(tensor<4x8xbf16>, tensor<8x2xbf16>) -> tensor<4x2xf32>"
    text: str


_OP = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = \"?stablehlo\.(\w+)\"?(.*)$")


def main_ops(module: str) -> dict[str, Op]:
    """{ssa name: Op} for @main's single-line stablehlo ops."""
    lines = module.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("func.func public @main"))
    ops = {}
    for line in lines[start + 1:]:
        if line.startswith("  }"):
            break
        m = _OP.match(line)
        if not m:
            continue
        name, kind, rest = m.groups()
        rest = rest.split(" loc(")[0]
        args, _, types = rest.partition(" : ")
        ops[name] = Op(kind, tuple(re.findall(r"%[\w#]+", args)), types.strip(), line.strip())
    return ops


def operand_types(op: Op) -> list[str]:
    """Element types of a dot's operands, from '(tensor<AxBxbf16>, tensor<...>) -> ...'."""
    return re.findall(r"tensor<(?:[\dx]*x)?(\w+)>", op.types.split("->")[0])


def reads_scaled_f8(ops: dict[str, Op], name: str) -> bool:
    """`name` = multiply(convert(<f8 tensor>), broadcast_in_dim(<scalar>)), in either order."""
    mul = ops.get(name)
    if mul is None or mul.kind != "multiply" or len(mul.operands) != 2:
        return False
    kinds = {ops[o].kind: ops[o] for o in mul.operands if o in ops}
    conv, bcast = kinds.get("convert"), kinds.get("broadcast_in_dim")
    return (conv is not None and bcast is not None and "xf8E" in conv.types.split("->")[0]
            and re.search(r"\(tensor<(bf16|f16|f32)>\)", bcast.types) is not None)


@functools.lru_cache(maxsize=None)
def cuda_step(policy: str, tmp: str) -> tuple[str, int]:
    """(StableHLO of the train step exported for CUDA, number of fp8 dot layers)."""
    cfg = tiny_config(Path(tmp), f"gpu_{policy}", {"precision": {"policy": policy}})
    run = build(cfg)
    batch = jax.eval_shape(lambda: place_batch(run, run.pipeline.train_batch(0)))
    exported = export.export(run.step_fn, platforms=["cuda"])(run.abstract_state, batch)
    fp8_layers = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(run.abstract_state.fp8_meta)[0]
                     if jax.tree_util.keystr(path).endswith("['input_scale']"))
    return exported.mlir_module(), fp8_layers


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gpu_graph"))
    return lambda policy: cuda_step(policy, tmp)


def dots(ops: dict[str, Op]) -> list[Op]:
    return [op for op in ops.values() if op.kind == "dot_general"]


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_16_bit_policies_have_no_highest_precision_matmul_on_cuda(cuda, policy):
    module, _ = cuda(policy)
    found = dots(main_ops(module))
    assert len(found) >= 3 * 4  # at least the 4 Dense layers' forward and backward GEMMs
    assert "HIGHEST" not in module


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_16_bit_policies_every_cuda_matmul_takes_16_bit_operands(cuda, policy):
    module, _ = cuda(policy)
    wide = [op.text for op in dots(main_ops(module)) if any(t not in SIXTEEN_BIT for t in operand_types(op))]
    assert not wide, f"{len(wide)} dots with non-16-bit operands:\n" + "\n".join(wide)


def test_fp8_every_dense_gemm_reads_f8_through_convert_and_scalar_scale(cuda):
    module, fp8_layers = cuda("fp8")
    ops = main_ops(module)
    scaled = [[reads_scaled_f8(ops, o) for o in op.operands] for op in dots(ops)]
    assert fp8_layers == 4  # qkv, proj, fc, out of the one block (the head is not fp8 by default)
    assert sum(all(s) for s in scaled) == 3 * fp8_layers  # forward + two backward GEMMs per layer
    half = [op.text for op, s in zip(dots(ops), scaled) if any(s) and not all(s)]
    assert not half, "fp8 GEMMs with one wide operand:\n" + "\n".join(half)


def test_fp8_pattern_check_rejects_an_op_between_the_scale_and_the_dot():
    """The checker itself: a convert to f32 after the scale multiply breaks the pattern."""
    module = """
  func.func public @main(%arg0: tensor<4x8xf8E4M3FN>, %arg1: tensor<bf16>) -> tensor<4x4xf32> {
    %0 = stablehlo.convert %arg0 : (tensor<4x8xf8E4M3FN>) -> tensor<4x8xbf16> loc(#loc1)
    %1 = stablehlo.broadcast_in_dim %arg1, dims = [] : (tensor<bf16>) -> tensor<4x8xbf16> loc(#loc2)
    %2 = stablehlo.multiply %0, %1 : tensor<4x8xbf16> loc(#loc3)
    %3 = stablehlo.convert %2 : (tensor<4x8xbf16>) -> tensor<4x8xf32> loc(#loc4)
    %4 = stablehlo.dot_general %2, %2, contracting_dims = [1] x [1] : (tensor<4x8xbf16>, tensor<4x8xbf16>) -> tensor<4x4xf32>
    %5 = stablehlo.dot_general %3, %3, contracting_dims = [1] x [1] : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x4xf32>
    return %4 : tensor<4x4xf32>
  }
"""
    ops = main_ops(module)
    assert reads_scaled_f8(ops, "%2") and not reads_scaled_f8(ops, "%3")
    assert [operand_types(op) for op in dots(ops)] == [["bf16", "bf16"], ["f32", "f32"]]


@pytest.mark.parametrize("policy", ["bf16", "fp16", "fp8"])
def test_softmax_and_loss_run_in_fp32_on_cuda(cuda, policy):
    module, _ = cuda(policy)
    ops = [op for op in main_ops(module).values() if op.kind in ("exponential", "log")]
    # attention softmax ([B,H,T,T] scores) and the loss's log-sum-exp over [B,T,V] logits
    assert any(op.kind == "exponential" and op.types.count("x") == 4 for op in ops), "no attention softmax found"
    assert any(op.kind == "log" for op in ops), "no log-sum-exp found"
    narrow = [op.text for op in ops if not op.types.endswith("xf32>")]
    assert not narrow, "\n".join(narrow)


_SUM = re.compile(r"stablehlo\.reduce\(.*applies stablehlo\.add .*-> tensor<(?:[\dx]*x)?(bf16|f16)>")
_SCATTER = re.compile(r"\"stablehlo\.scatter\".*?-> tensor<[\dx]*x(\w+)>", re.S)


@pytest.mark.parametrize("policy", ["bf16", "fp16", "fp8"])
def test_no_gradient_sum_accumulates_in_16_bits(cuda, policy):
    # Bias, position and embedding gradients are sums over tokens: each must accumulate in fp32
    # (one rounding to 16 bits at the end), never add by add in bf16/fp16 (a reduce or a
    # scatter-add whose element type is 16-bit). Checked in the whole module, helpers included.
    module, _ = cuda(policy)
    sums = [line.strip()[:160] for line in module.splitlines() if _SUM.search(line)]
    assert not sums, "\n".join(sums)
    scatters = [m.group(0)[-120:] for m in _SCATTER.finditer(module) if m.group(1) in SIXTEEN_BIT]
    assert not scatters, "\n".join(scatters)
    # the check sees reductions at all: the step's fp32 gradient sums are there
    assert re.search(r"applies stablehlo\.add .*-> tensor<(?:[\dx]*x)?f32>", module)


# ---------------------------------------------------------------- scripts/gpu_report.py

def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", REPO / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_report_says_there_is_no_gpu_and_exits_0_on_cpu(capsys):
    assert _gpu_report().main([]) == 0
    assert "no GPU here" in capsys.readouterr().out


def test_gpu_report_counts_gemms_by_operand_type():
    # Lines in the form XLA:GPU prints optimised HLO: cuBLAS and cuBLASLt calls, a Triton GEMM fusion,
    # and two things that are not GEMMs (a loop fusion, the Triton computation's own header).
    hlo = """
  %cublas-gemm.1.0 = (bf16[128,256]{1,0}, s8[4194304]{0}) custom-call(bf16[128,64]{1,0} %p.1, bf16[64,256]{1,0} %p.2), custom_call_target="__cublas$gemm", backend_config={}
  %cublas-lt-matmul.2.0 = (bf16[16,192]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16,64]{1,0} %x, f8e4m3fn[192,64]{1,0} %w, f32[] %s1, f32[] %s2), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
  %cublas-lt-matmul.3.0 = (bf16[16,64]{1,0}, s8[33554432]{0}) custom-call(f8e5m2[16,192]{1,0} %g, f8e4m3fn[64,192]{1,0} %w2, f32[] %s3, f32[] %s4), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
  %gemm_fusion_dot.3 = f32[8,8]{1,0} fusion(f32[8,16]{1,0} %a, f32[16,8]{1,0} %b), kind=kCustom, calls=%gemm_fusion_dot.3_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_fusion.7 = bf16[8,8]{1,0} fusion(bf16[8,8]{1,0} %c), kind=kLoop, calls=%fused_computation.7
%gemm_fusion_dot.3_computation (parameter_0: f32[8,16], parameter_1: f32[16,8]) -> f32[8,8] { // __triton_gemm
"""
    assert _gpu_report().gemm_counts(hlo) == {"bf16": 1, "fp8": 2, "fp32": 1}


def test_gpu_report_counts_gemms_in_the_hlo_an_h100_printed():
    """Lines of the sandbox train step's optimised HLO as jax 0.11.2 printed it on an H100 (session 12):
    operands are bare names (types at their definitions), GEMMs are cuBLASLt calls and
    "__triton_nested_gemm_fusion"s, and a plain "__triton" fusion is a reduction. The fp32 head matmul and
    the fp8 policy's qkv GEMM, which XLA ran in bf16 on dequantized operands. gpu_report counted 0 GEMMs."""
    hlo = (REPO / "tests" / "data" / "h100_jax0.11.2_train_step_excerpt.hlo").read_text()
    assert _gpu_report().gemm_counts(hlo) == {"fp32": 1, "bf16": 1}
