"""`rsclip train --compile-only`: the plan of a real step, its collective accounting and its flags."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rsclip_jax.cli import main
from rsclip_jax.train.compile_plan import EXCEEDS_EXIT_CODE, plan
from rsclip_jax.train.config import load_config
from rsclip_jax.train.hlo_collectives import collectives, group_size
from rsclip_jax.train.setup import build_run

from conftest import REPO


def _plan_cli(tmp_path, name: str, mesh: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Starts one ViT-L/14 plan on 8 simulated devices (a fresh process: JAX must not have started)."""
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "rsclip_jax", "train", "--config", "configs/remoteclip.py:ViT-L-14",
           "--compile-only", "--simulate-devices", "8", "--config.batch_size=16", f"--config.mesh.shape={mesh}",
           "--plan-json", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def test_vit_l14_fsdp_needs_less_memory_than_replicated_and_flops_match(tmp_path):
    """The acceptance: ViT-L/14 on 8 simulated devices, per-device memory by sharding, FLOPs within 10%."""
    # both at once: each compile leaves the other core idle much of the time
    runs = {name: _plan_cli(tmp_path, name, mesh, "--device-memory", limit)
            for name, mesh, limit in (("replicated", "(8,1,1)", "4GiB"), ("fsdp", "(1,8,1)", "64GiB"))}
    done = {name: (proc, *proc.communicate(timeout=900)) for name, (proc, _) in runs.items()}
    (replicated, _, rep_err), (fsdp, fsdp_out, fsdp_err) = done["replicated"], done["fsdp"]
    # 428M parameters and two Adam moments in float32 on every device: more than 4 GiB, so a warning
    assert replicated.returncode == EXCEEDS_EXIT_CODE, rep_err
    assert "WARNING" in rep_err and "--device-memory 4.00 GiB" in rep_err
    assert fsdp.returncode == 0, fsdp_err
    assert "fits in --device-memory" in fsdp_out and "WARNING" not in fsdp_err
    rep, sharded = (json.loads(runs[name][1].read_text()) for name in ("replicated", "fsdp"))
    mem_r, mem_f = rep["memory_per_device_bytes"], sharded["memory_per_device_bytes"]
    assert mem_r["parameters"] > 1.5 * 2**30  # 428M float32
    assert mem_r["optimizer"] == pytest.approx(2 * mem_r["parameters"], rel=1e-3)  # Adam's two moments
    assert mem_f["parameters"] < mem_r["parameters"] / 6 and mem_f["optimizer"] < mem_r["optimizer"] / 6
    assert mem_f["total"] < mem_r["total"]
    for p in (rep, sharded):
        assert p["devices"] == 8 and p["flops_per_step"]["xla_over_analytic"] == pytest.approx(1.0, abs=0.1)
    # data parallelism: only gradients (all-reduce) and the loss's embeddings move, never parameters
    assert rep["collectives_by_payload_bytes"].get("all-gather/parameters", 0) < 0.01 * mem_r["parameters"]
    assert rep["collectives_by_payload_bytes"]["all-reduce/parameters"] >= 0.9 * mem_r["parameters"]


def _sharded_bytes(run, vocab: int) -> int:
    """Full f32 bytes of the FSDP-sharded parameters, the token embedding left out (its lookup is
    cheaper to all-reduce than the table to gather, and XLA does that)."""
    return sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(run.abstract_state.params)
               if "fsdp" in jax.tree.leaves(tuple(a.sharding.spec)) and a.shape[0] != vocab)


def test_fsdp_gathers_parameters_not_activations():
    """Under FSDP each layer's parameters are gathered (forward, and again for the backward) and
    their gradients reduced once; activations stay batch-sharded. Before the activation sharding
    constraint, XLA replicated the batch inside the layer scan and all-reduced whole activations
    (13x the payload here), which this catches."""
    config = load_config(str(REPO / "configs" / "demo.py"), ["--config.batch_size=64", "--config.mesh.shape=(1,8,1)",
                                                             "--config.mesh.fsdp_min_size=4096"])
    p = plan(config, jax.devices()[:8])
    run = build_run(config, jax.devices()[:8])
    text = run.model_config.text
    sharded = _sharded_bytes(run, text.vocab_size)
    by = p["collectives_by_payload_bytes"]
    assert sharded <= by["all-gather/parameters"] <= 2.1 * sharded
    gradients = by.get("all-reduce/parameters", 0) + by.get("reduce-scatter/parameters", 0)
    assert 0.9 * sharded <= gradients <= 1.5 * sharded
    lookup = config.batch_size * text.context_length * text.width * 4  # the token-embedding lookup's output
    moved = sum(v for k, v in by.items() if k.endswith("activations/other"))
    assert moved <= 4 * lookup, by
    assert p["memory_per_device_bytes"]["parameters"] * 8 == pytest.approx(
        sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(run.abstract_state.params)), rel=0.01)


def test_plan_at_the_width_a_run_trims_its_captions_to():
    """--caption-tokens N plans the step a run compiles when its longest caption takes N tokens (the
    demo trims to a multiple of 8: 13 -> 16 of 77): smaller text FLOPs and temporaries, and XLA
    counts the narrower step too (within 25% of the analytic count for this tiny model, whose
    elementwise work weighs more)."""
    from rsclip_jax.models.flops import train_step_flops

    config = load_config(str(REPO / "configs" / "demo.py"), ["--config.batch_size=16"])
    full, trimmed = plan(config, jax.devices()[:1]), plan(config, jax.devices()[:1], caption_tokens=13)
    assert (full["caption_width"], trimmed["caption_width"]) == (77, 16)
    model = build_run(config, jax.devices()[:1]).model_config
    flops = trimmed["flops_per_step"]
    assert flops["analytic"] == train_step_flops(model, 16, 16).total
    assert flops["analytic_text_tower"] < full["flops_per_step"]["analytic_text_tower"] / 3
    assert flops["xla_unrolled"] < full["flops_per_step"]["xla_unrolled"]
    assert flops["xla_over_analytic"] == pytest.approx(1.0, abs=0.25)
    assert trimmed["memory_per_device_bytes"]["xla_temporaries"] < full["memory_per_device_bytes"]["xla_temporaries"]


def test_eval_embedding_under_fsdp_gathers_parameters_not_activations():
    """The evaluator's jitted embedding, fed FSDP-sharded training weights, keeps its activations
    batch-sharded as the train step does. Without the constraint XLA all-reduced whole activations
    in every layer (image 2.3 MB, text 11.6 MB of all-reduce here, against none and one lookup)."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rsclip_jax.evaluate.embeddings import _compiled
    from rsclip_jax.train.setup import initial_state

    config = load_config(str(REPO / "configs" / "demo.py"), ["--config.batch_size=64", "--config.mesh.shape=(1,8,1)",
                                                             "--config.mesh.fsdp_min_size=4096"])
    run = build_run(config, jax.devices()[:8])
    state = initial_state(run)
    graphdef, weights = nnx.split(nnx.merge(run.graphdef, state.params, state.rest))
    images_fn, texts_fn = _compiled(graphdef, run.mesh)
    rows = NamedSharding(run.mesh, P(tuple(run.mesh.axis_names)))
    vision, text = run.model_config.vision, run.model_config.text
    mask = jax.ShapeDtypeStruct((64,), bool, sharding=rows)
    images = jax.ShapeDtypeStruct((64, vision.image_size, vision.image_size, 3), "uint8", sharding=rows)
    tokens = jax.ShapeDtypeStruct((64, text.context_length), "int32", sharding=rows)
    on_images = collectives(images_fn.lower(weights, images, mask).compile().as_text())
    on_texts = collectives(texts_fn.lower(weights, tokens, mask).compile().as_text())
    assert on_images.by_kind.get("all-reduce", 0) == 0, on_images.largest
    lookup = 64 * text.context_length * text.width * 4  # the token-embedding lookup, as in training
    assert on_texts.by_kind.get("all-reduce", 0) <= lookup, on_texts.largest
    assert on_images.by_kind["all-gather"] > 0 and on_texts.by_kind["all-gather"] > 0  # the weights


def test_bf16_fsdp_gathers_parameters_in_bf16_and_reduces_gradients_in_f32():
    """In bfloat16 compute the partitioner gathers each layer's kernels already cast, half the bytes of
    float32, and reduces gradients in float32. XLA CPU widens the gathers back to float32 after
    partitioning; the plan counts what the partitioner chose (what a GPU or TPU moves), from the
    compiled module alone, so a persistent-cache hit counts the same."""
    config = load_config(str(REPO / "configs" / "demo.py"), ["--config.batch_size=64", "--config.mesh.shape=(1,8,1)",
                                                             "--config.mesh.fsdp_min_size=4096",
                                                             "--config.model.dtype=bfloat16"])
    p = plan(config, jax.devices()[:8])
    run = build_run(config, jax.devices()[:8])
    sharded = _sharded_bytes(run, run.model_config.text.vocab_size)
    by = p["collectives_by_payload_bytes"]
    assert p["collectives_counted_in_bf16_as_partitioned"] > 0
    # forward and backward gather each float32 kernel once each, in bfloat16: about 1x its float32 bytes
    assert 0.45 * sharded <= by["all-gather/parameters"] <= 1.1 * sharded, by
    gradients = by.get("all-reduce/parameters", 0) + by.get("reduce-scatter/parameters", 0)
    assert 0.9 * sharded <= gradients <= 1.5 * sharded, by
    assert any(e["kind"] == "all-gather" and e["payload"].startswith("bf16[") for e in p["largest_collectives"])


_WIDENED = """HloModule m

%fused_widen (p0: f32[2,8,16], p1: s32[]) -> f32[8,16] {
  %p0 = f32[2,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %slice = f32[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,8,16}
  %cast = bf16[1,8,16]{2,1,0} convert(%slice), metadata={op_name="jit(step)/convert_element_type"}
  %widen = f32[1,8,16]{2,1,0} convert(%cast)
  %layout = f32[1,8,16]{1,2,0} copy(%widen)
  ROOT %flat = f32[8,16]{0,1} bitcast(%layout)
}

%fused_plain (p0: f32[2,8,16], p1: s32[]) -> f32[8,16] {
  %p0 = f32[2,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %slice = f32[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,8,16}
  ROOT %flat = f32[8,16]{1,0} bitcast(%slice)
}

ENTRY %main (a: f32[2,8,16], i: s32[], b: bf16[4]) -> f32[8,16] {
  %a = f32[2,8,16]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %b = bf16[4]{0} parameter(2)
  %k = f32[8,16]{1,0} fusion(%a, %i), kind=kLoop, calls=%fused_widen
  %g = f32[64,16]{1,0} all-gather(%k), replica_groups=[1,8]<=[8], dimensions={0}
  %w = f32[4]{0} convert(%b)
  %h = f32[32]{0} all-gather(%w), replica_groups=[1,8]<=[8], dimensions={0}
  %f = f32[8,16]{1,0} fusion(%a, %i), kind=kLoop, calls=%fused_plain
  %r = (f32[8,16]{1,0}, f32[4]{0}) all-reduce(%f, %w), replica_groups=[1,8]<=[8], to_apply=%add
}
"""


def test_a_bf16_value_widened_to_f32_for_a_collective_is_counted_in_bf16():
    """XLA CPU's float normalization: `convert` to float32 of a bfloat16 value (in a fusion, through
    bitcasts, or alone) right before the collective. Genuine float32 payloads stay float32."""
    as_compiled = collectives(_WIDENED)
    c = collectives(_WIDENED, widened_bf16=True)
    assert as_compiled.by_kind["all-gather"] == (64 * 16 + 32) * 4 and as_compiled.narrowed == 0
    assert c.by_kind["all-gather"] == (64 * 16 + 32) * 2
    assert c.by_kind["all-reduce"] == 8 * 16 * 4 + 4 * 2  # the plain slice stays float32, the widened one not
    assert c.narrowed == 3
    assert c.largest[0]["payload"] == "bf16[64,16]"


_HLO = """HloModule m

%body.1 (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %ag-start = (f32[1,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%x), replica_groups=[1,8]<=[8], dimensions={0}
  %ag-done = f32[8,16]{1,0} all-gather-done(%ag-start)
  %inner = (s32[], f32[8,16]) while(%t), condition=%cond.2, body=%body.2, backend_config={"known_trip_count":{"n":"3"}}
}

%body.2 (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %rs = f32[1,16]{1,0} reduce-scatter(%g), replica_groups=mesh['axis_0'=2,'axis_1'=8] {'axis_1'}, dimensions={0}
}

%yes (p: f32[4]) -> f32[4] {
  %ar = f32[4]{0} all-reduce(%p), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}

%no (p: f32[4]) -> f32[4] {
  %cp = f32[2]{0} collective-permute(%p), source_target_pairs={{0,1}}
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %loop = (s32[], f32[8,16]) while(%t0), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"12"}}
  %c = f32[4]{0} conditional(%pred, %a, %a), branch_computations={%yes, %no}
  %combined = (f32[], bf16[10]{0}) all-reduce(%s, %v), replica_groups=[1,8]<=[8], to_apply=%add
}
"""


def test_collective_accounting_rules():
    """Nested trip counts, one count per async pair, the costliest branch, combined all-reduces."""
    c = collectives(_HLO, parameter_sizes={8 * 16})
    assert c.by_kind["all-gather"] == 12 * 8 * 16 * 4  # the -done only, 12 trips
    assert c.by_kind["reduce-scatter"] == 12 * 3 * 8 * 16 * 4  # operand = result x group of 8, 36 trips
    assert c.by_kind["all-reduce"] == 4 * 4 + 4 + 10 * 2  # the taken branch's, plus the combined one
    assert "collective-permute" not in c.by_kind  # the cheaper branch
    assert c.count == {"all-gather": 12, "reduce-scatter": 36, "all-reduce": 2}
    assert c.by_class[("all-gather", "parameters")] == c.by_kind["all-gather"]
    assert c.unknown_trip_counts == 0
    assert c.largest[0] == {"kind": "reduce-scatter", "payload": "f32[8,16]", "executions": 36,
                            "bytes": 36 * 8 * 16 * 4, "source": ""}
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}, x") == 8
    assert group_size("replica_groups=[4,2]<=[8]") == 2


@pytest.mark.parametrize("argv, message", [
    (["--simulate-devices", "8"], "--simulate-devices only plans a run: add --compile-only"),
    (["--device-memory", "16GiB", "--plan-json", "p.json"], "--device-memory, --plan-json only plan a run"),
    ([], "--workdir DIR is required to train"),
    (["--compile-only", "--topology", "v5e:2x2"], "--topology v5e:2x2: JAX cannot describe this TPU topology"),
    (["--compile-only", "--simulate-devices", "8", "--topology", "v5e:2x2"], "give one of them"),
    (["--compile-only", "--distributed"], "--compile-only plans in one process"),
    (["--caption-tokens", "20"], "--caption-tokens only plans a run: add --compile-only"),
    (["--compile-only", "--caption-tokens", "20", "--config.data.trim_text_multiple=0"],
     "--caption-tokens 20: this config keeps all 77 caption tokens"),
])
def test_bad_planning_flags_fail_in_one_line(capsys, argv, message):
    assert main(["train", "--config", str(REPO / "configs" / "demo.py"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsclip train: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("flag, value", [("--device-memory", "16XB"), ("--device-memory", "0"),
                                         ("--simulate-devices", "0")])
def test_bad_planning_values_are_argparse_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(REPO / "configs" / "demo.py"), "--compile-only", flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
