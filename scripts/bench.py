"""Benchmark ``nvfp4-convert run`` against a plain file copy of the same source, on the same disk.

What it measures
----------------
1. It writes a synthetic ModelOpt NVFP4 DeepSeek-V4 source under ``--workdir`` in exactly the
   format of ``tests/fixtures/tiny-dsv4`` (transformers names; every linear NVFP4 = uint8 ``weight``
   [out, in/2], float8_e4m3fn ``weight_scale`` [out, in/16], float32 scalar ``weight_scale_2`` and
   ``input_scale``; norms/hc/sinks/position_bias/gate bias float32, router weight BF16) with
   DeepSeek-V4-Pro's real tensor shapes (hidden 7168, 384 routed experts of intermediate 3072, one
   shared expert, q_lora_rank 1536, 128 heads of head_dim 512, o_groups 16, o_lora_rank 1024, index
   heads 64 x 128, CSA compressor + indexer as transformers' ``modeling_deepseek_v4`` builds them).
   Every layer is a ``compressed_sparse_attention`` layer with a learned-router ``moe`` block (no
   hash layer, so no ``tid2eid``); embeddings, head, final norm and ``hc_head`` are there at a 256-token
   vocabulary (a few MB) unless ``--with-embed`` (then at the real vocab 129280). One default layer is 14.5 GB (98.4 % of
   it routed experts). Bytes are random (uint8 codes from a random pool; block scales random
   e4m3 in [0.5, 2]; global scales random, equal for gate and up of one expert as ModelOpt writes
   them), shards ~5 GB, written streaming (one tensor at a time, from the pools).
   The converter under test is a snapshot: ``nvfp4_convert/`` is copied into ``--workdir`` at the
   start and every convert run imports that copy, so edits to the working tree during the
   benchmark cannot mix versions; its git commit, whether it differs from that commit, and a
   hash of its files are recorded.
2. Timing: the source is written in each layout of ``--source-shards`` (3 = ~5 GB shards, 15 = ~1 GB) in
   turn. Per layout, ``--pairs`` rounds; in each round, for each cache state of ``--cache`` (``cold``,
   ``warm``, or both, alternating), a triple of subprocesses:
   (a) ``python -m nvfp4_convert.cli run SRC DST --quiet --workers N --io auto``,
   (b) ``cp -r SRC DST && sync`` (buffered: from the page cache when the source is there),
   (c) ``dd bs=64M iflag=direct oflag=direct conv=fsync`` per file, then ``sync`` (the disk's own speed).
   The figure is convert / min(cp, dd) of the same triple (the faster plain copy is the bar), median
   over rounds. Wall time is measured around the subprocess only (DST removal, ``sync`` and cache
   preparation are outside it). Before every timed run, DST is removed, ``sync`` runs, and the page
   cache is set: ``cold`` = ``echo 3 > /proc/sys/vm/drop_caches`` (needs root) followed by one untimed
   import of what ``run`` and ``verify`` import (torch, and vLLM's DeepSeek-V4 model), so the source data is
   cold and the Python libraries warm; ``warm`` =
   one full read of the source files, as when ModelOpt has just written them. The convert wall
   includes the interpreter start and the imports (torch): ``startup_s`` is the median wall of an interpreter
   importing ``nvfp4_convert.cli`` and ``nvfp4_convert.convert``; the converter's own ``timing`` (seconds, phases, files
   read through the page cache) is recorded from its report. Memory: ``max_process_rss`` = ru_maxrss
   from ``wait4`` (the largest single process of the converter's tree, exact) and ``tree_rss`` (the
   sum over the process tree, sampled every 0.5 s). Also recorded: CPU seconds of each run and the
   1-minute load average just before it (the benchmark cannot keep other processes off the machine).
   ``--verify``: one more convert, then ``--pairs`` alternating rounds of ``verify DST --source SRC`` and a
   ``dd iflag=direct`` read of every file of SRC and DST, both cold: the figure is verify / read, median.
3. ``--rss-scaling``: converts a 1x source and a 4x source (``--scaling-layers`` 1 vs 4 layers,
   with ``--scaling-experts`` routed experts per layer, 96 by default so the 4x source plus its
   output fit in ~32 GB) once per worker count, and reports the peak memory of each and the 4x/1x ratio.

Results are printed and, with ``--json FILE``, written as JSON. Generated data is deleted at the
end unless ``--keep`` (after a failure, ``logs/`` and the snapshot ``code/`` stay in ``--workdir``).

Usage (from the repository root, with the dev venv):

    .venv/bin/python scripts/bench.py --source-shards 3,15 --verify --json tmp/bench.json   # 1 layer, cold+warm
    .venv/bin/python scripts/bench.py --rss-scaling --json tmp/rss.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from nvfp4_convert.safetensors_io import OutEntry, encode_header

REPO = Path(__file__).resolve().parents[1]
# safetensors dtype -> bytes per element (only those the synthetic source uses)
ITEMSIZE = {"U8": 1, "F8_E4M3": 1, "BF16": 2, "F32": 4, "I64": 8}
CODE = REPO  # where the converter is imported from (set to the snapshot in ``main``)

FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "tiny-dsv4" / "config.json"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SHARD_BYTES = 5 * 1000**3
POOL_BYTES = 64 * 1024 * 1024

# DeepSeek-V4-Pro dimensions (transformers DeepseekV4Config names).
PRO = {
    "hidden_size": 7168,
    "moe_intermediate_size": 3072,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "q_lora_rank": 1536,
    "num_attention_heads": 128,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "o_groups": 16,
    "o_lora_rank": 1024,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 1024,
    "hc_mult": 4,
    "vocab_size": 129280,
    "sliding_window": 128,
    "max_position_embeddings": 1048576,
}
CSA_RATE = 4  # compress_rates["compressed_sparse_attention"]


# --- the synthetic source ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One source tensor: name, safetensors dtype, shape, and how to fill it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fill: str  # codes | scales | global | act | normal

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def nvfp4_linear(prefix: str, out_f: int, in_f: int, fill_global: str = "global") -> list[Spec]:
    """The four tensors ModelOpt writes for an NVFP4 ``nn.Linear(in_f, out_f)``."""
    return [
        Spec(f"{prefix}.weight", "U8", (out_f, in_f // 2), "codes"),
        Spec(f"{prefix}.weight_scale", "F8_E4M3", (out_f, in_f // 16), "scales"),
        Spec(f"{prefix}.weight_scale_2", "F32", (), fill_global),
        Spec(f"{prefix}.input_scale", "F32", (), "act"),
    ]


def f32(name: str, *shape: int) -> Spec:
    return Spec(name, "F32", tuple(shape), "normal")


def layer_specs(i: int, n_experts: int) -> list[Spec]:
    """Every tensor of one CSA + MoE decoder layer, in module order (shapes per modeling_deepseek_v4)."""
    d, hc = PRO["hidden_size"], PRO["hc_mult"]
    inter, heads, hd = PRO["moe_intermediate_size"], PRO["num_attention_heads"], PRO["head_dim"]
    q_rank, groups, o_rank = PRO["q_lora_rank"], PRO["o_groups"], PRO["o_lora_rank"]
    ih, ihd = PRO["index_n_heads"], PRO["index_head_dim"]
    p = f"model.layers.{i}"
    a = f"{p}.self_attn"
    c = f"{a}.compressor"
    x = f"{c}.indexer"
    mix = (2 + hc) * hc
    specs = [
        f32(f"{p}.input_layernorm.weight", d),
        *nvfp4_linear(f"{a}.q_a_proj", q_rank, d),
        f32(f"{a}.q_a_norm.weight", q_rank),
        *nvfp4_linear(f"{a}.q_b_proj", heads * hd, q_rank),
        *nvfp4_linear(f"{a}.kv_proj", hd, d),
        f32(f"{a}.kv_norm.weight", hd),
        *nvfp4_linear(f"{a}.o_a_proj", groups * o_rank, heads * hd // groups),
        *nvfp4_linear(f"{a}.o_b_proj", d, groups * o_rank),
        f32(f"{a}.sinks", heads),
        *nvfp4_linear(f"{c}.kv_proj", 2 * hd, d),
        *nvfp4_linear(f"{c}.gate_proj", 2 * hd, d),
        f32(f"{c}.position_bias", CSA_RATE, 2 * hd),
        f32(f"{c}.kv_norm.weight", hd),
        *nvfp4_linear(f"{x}.kv_proj", 2 * ihd, d),
        *nvfp4_linear(f"{x}.gate_proj", 2 * ihd, d),
        f32(f"{x}.position_bias", CSA_RATE, 2 * ihd),
        f32(f"{x}.kv_norm.weight", ihd),
        *nvfp4_linear(f"{x}.q_b_proj", ih * ihd, q_rank),
        *nvfp4_linear(f"{x}.scorer.weights_proj", ih, d),
        f32(f"{p}.post_attention_layernorm.weight", d),
        Spec(f"{p}.mlp.gate.weight", "BF16", (n_experts, d), "normal"),
        f32(f"{p}.mlp.gate.e_score_correction_bias", n_experts),
    ]
    for e in range(n_experts):
        m = f"{p}.mlp.experts.{e}"
        # gate and up share one global scale (ModelOpt's normal output): "global_pair" is drawn once per expert
        specs += nvfp4_linear(f"{m}.gate_proj", inter, d, "global_pair")
        specs += nvfp4_linear(f"{m}.up_proj", inter, d, "global_pair_again")
        specs += nvfp4_linear(f"{m}.down_proj", d, inter)
    s = f"{p}.mlp.shared_experts"
    specs += nvfp4_linear(f"{s}.gate_proj", inter, d, "global_pair")
    specs += nvfp4_linear(f"{s}.up_proj", inter, d, "global_pair_again")
    specs += nvfp4_linear(f"{s}.down_proj", d, inter)
    for block in ("attn_hc", "ffn_hc"):
        specs += [f32(f"{p}.{block}.fn", mix, hc * d), f32(f"{p}.{block}.base", mix), f32(f"{p}.{block}.scale", 3)]
    return specs


# Without --with-embed the source still holds embed/head/norm/hc_head (the converter checks every tensor its
# config.json implies), at a vocabulary this small: a few MB, so a layer's bytes are what is measured.
SMALL_VOCAB = 256


def vocab_size(with_embed: bool) -> int:
    return PRO["vocab_size"] if with_embed else SMALL_VOCAB


def embed_specs(vocab: int) -> list[Spec]:
    d, hc = PRO["hidden_size"], PRO["hc_mult"]
    return [
        Spec("model.embed_tokens.weight", "BF16", (vocab, d), "normal"),
        f32("model.norm.weight", d),
        f32("model.hc_head.hc_fn", hc, hc * d),
        f32("model.hc_head.hc_base", hc),
        f32("model.hc_head.hc_scale", 1),
        Spec("lm_head.weight", "BF16", (vocab, d), "normal"),
    ]


def source_specs(layers: int, n_experts: int, with_embed: bool) -> list[Spec]:
    specs: list[Spec] = []
    for i in range(layers):
        specs += layer_specs(i, n_experts)
    return specs + embed_specs(vocab_size(with_embed))


def source_config(layers: int, n_experts: int, with_embed: bool) -> dict:
    """The fixture's config.json with Pro's dimensions, ``layers`` CSA layers and learned-router MoE."""
    cfg = json.loads(FIXTURE_CONFIG.read_text())
    cfg.update(PRO)
    cfg["n_routed_experts"] = n_experts
    cfg["num_hidden_layers"] = layers
    cfg["vocab_size"] = vocab_size(with_embed)
    cfg["layer_types"] = ["compressed_sparse_attention"] * layers
    cfg["mlp_layer_types"] = ["moe"] * layers
    cfg["partial_rotary_factor"] = PRO["qk_rope_head_dim"] / PRO["head_dim"]
    cfg["quantization_config"]["ignore"] = ["lm_head", "model.embed_tokens"] + [
        f"model.layers.{i}.mlp.gate" for i in range(layers)
    ]
    return cfg


class Filler:
    """Random bytes fast: slices of pre-made random pools at random aligned offsets."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        self.codes = torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8, generator=g).numpy()
        scales = torch.rand(POOL_BYTES // 4, generator=g) * 1.5 + 0.5  # e4m3 in [0.5, 2]: finite, positive
        self.scales = scales.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        self.bf16 = (torch.randn(POOL_BYTES // 8, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
        self.f32 = torch.randn(POOL_BYTES // 16, generator=g).view(torch.uint8).numpy()
        self.pair_scale = 1e-4

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def chunks(self, spec: Spec) -> Iterator[memoryview | bytes]:
        """The bytes of ``spec``, in pieces of at most one pool."""
        if spec.fill in ("global", "global_pair", "global_pair_again", "act"):
            if spec.fill == "global_pair":
                self.pair_scale = self._uniform(1e-4, 1e-3)
            value = {
                "global": self._uniform(1e-4, 1e-3),
                "global_pair": self.pair_scale,
                "global_pair_again": self.pair_scale,
                "act": self._uniform(1e-3, 1e-1),
            }[spec.fill]
            yield struct.pack("<f", value)
            return
        if spec.fill == "codes":
            pool = self.codes
        elif spec.fill == "scales":
            pool = self.scales
        elif spec.dtype == "BF16":
            pool = self.bf16
        else:
            pool = self.f32
        item = ITEMSIZE[spec.dtype]
        left = spec.nbytes
        while left:
            n = min(left, len(pool))
            start = int(torch.randint(0, (len(pool) - n) // item + 1, (), generator=self.gen)) * item
            yield memoryview(pool[start : start + n])
            left -= n


def write_source(
    src: Path, layers: int, n_experts: int, with_embed: bool, seed: int = 0, shards: int | None = None
) -> int:
    """Write the synthetic checkpoint (shards of ~5 GB, or ``shards`` shards of equal size; index, config);
    returns the tensor bytes."""
    specs = source_specs(layers, n_experts, with_embed)
    # ``shards`` files: greedy packing up to the mean size plus the largest tensor never opens one more
    limit = sum(s.nbytes for s in specs) // shards + max(s.nbytes for s in specs) if shards else SHARD_BYTES
    groups: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    src.mkdir(parents=True)
    filler = Filler(seed)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(src / fname, "wb") as f:
            f.write(encode_header([OutEntry(x.name, x.dtype, x.shape) for x in group]))
            for s in group:
                for chunk in filler.chunks(s):
                    f.write(chunk)
                weight_map[s.name] = fname
            f.flush()
            os.fsync(f.fileno())
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (src / "config.json").write_text(json.dumps(source_config(layers, n_experts, with_embed), indent=4))
    hf_quant = json.loads((FIXTURE_CONFIG.parent / "hf_quant_config.json").read_text())
    hf_quant["quantization"]["exclude_modules"] = source_config(layers, n_experts, with_embed)["quantization_config"][
        "ignore"
    ]
    (src / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    shutil.copyfile(FIXTURE_CONFIG.parent / "generation_config.json", src / "generation_config.json")
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- running and measuring -----------------------------------------------------------------------


@dataclass
class Measured:
    wall_s: float
    max_process_rss: int  # bytes, ru_maxrss of the child and its reaped descendants
    tree_rss: int  # bytes, peak of the sampled sum over the process tree
    tree_pss: int
    rc: int
    cpu_s: float = 0.0  # user + system CPU seconds of the child and its reaped descendants (wait4)
    load_before: float = 0.0  # 1-minute load average just before the run (other processes on the machine)
    internal_s: float = 0.0  # the converter's own timing.seconds (its report), convert runs only


def measure(cmd: list[str], log: Path, sample_s: float = 0.5) -> Measured:
    """Run ``cmd``; wall time, ru_maxrss (wait4) and the sampled peak RSS/PSS of its whole tree."""
    load = os.getloadavg()[0]
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=CODE)
        root = psutil.Process(proc.pid)
        try:
            wall, status, usage, peak_rss, peak_pss = _wait_sampling(proc, root, t0, sample_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(wall, usage.ru_maxrss * 1024, peak_rss, peak_pss, proc.returncode, cpu, load)


def _wait_sampling(
    proc: subprocess.Popen, root: psutil.Process, t0: float, sample_s: float
) -> tuple[float, int, os.struct_rusage, int, int]:
    """Reap ``proc`` with ``wait4`` while sampling the RSS/PSS sum of its process tree."""
    peak_rss = peak_pss = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return time.monotonic() - t0, status, usage, peak_rss, peak_pss
        rss = pss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += info.pss
            except psutil.Error:
                pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(sample_s)


# The second baseline: the same files copied with O_DIRECT reads and writes (GNU dd, 64 MiB blocks,
# fsync per file): the disk's own speed, with no page cache in the way.
DIRECT_COPY_SNIPPET = """
mkdir "$2" && for f in "$1"/*; do
  dd if="$f" of="$2/$(basename "$f")" bs=64M iflag=direct oflag=direct conv=fsync status=none || exit 1
done && sync "$2"
"""


def copy_cmd(src: Path, dst: Path, mode: str) -> list[str]:
    if mode == "dd-direct":
        return ["sh", "-c", DIRECT_COPY_SNIPPET, "sh", str(src), str(dst)]
    return ["sh", "-c", 'cp -r "$1" "$2" && sync', "sh", str(src), str(dst)]


SHARD_SIZE: str | None = None  # the converter's --shard-size (None: its default, 5GB)
IO = "auto"  # the converter's --io


def convert_cmd(src: Path, dst: Path, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "nvfp4_convert.cli", "run", str(src), str(dst), "--quiet", "--workers", str(workers)]
    return cmd + (["--shard-size", SHARD_SIZE] if SHARD_SIZE else []) + ["--io", IO]


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def startup_seconds(repeat: int = 3) -> float:
    """Median wall of an interpreter importing what ``run`` imports (warm libraries: torch): the fixed cost in each
    convert (the CLI itself imports torch only when a command needs it; ``run`` reads the source meanwhile)."""
    walls = []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", STARTUP_IMPORTS], cwd=CODE, check=True, capture_output=True)
        walls.append(time.monotonic() - t0)
    return statistics.median(walls)


# Untimed after dropping the page cache: the libraries a run imports are warm, only the data is cold (verify imports
# vLLM, where it is installed, for its weight-mapper check).
STARTUP_IMPORTS = "import nvfp4_convert.cli, nvfp4_convert.convert"
WARM_IMPORTS = f"""
{STARTUP_IMPORTS}
import nvfp4_convert.verify
try:
    import vllm.models.deepseek_v4.nvidia.model
except Exception:
    pass
"""


def prepare_cache(src: Path, mode: str) -> None:
    """Same page-cache state before every timed run: all dropped (cold) or the source read once (warm).

    ``cold`` drops every cached page and then reloads the Python libraries (one untimed import of what ``run`` and
    ``verify`` import), so what is cold is the source data, for convert and copy alike.
    """
    os.sync()
    if mode == "cold":
        DROP_CACHES.write_text("3\n")
        # Only the data is cold: reload the interpreter and the converter's libraries (torch, typer, rich).
        subprocess.run([sys.executable, "-c", WARM_IMPORTS], cwd=CODE, check=True)
        return
    for f in sorted(src.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 * 1024 * 1024):
                pass


def clear(dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.sync()


def file_sizes(src: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(src.iterdir())}


def timed(label: str, cmd: list[str], dst: Path, src: Path, cache: str, logs: Path) -> Measured:
    before = file_sizes(src)
    clear(dst)
    prepare_cache(src, cache)
    m = measure(cmd, logs / f"{label}.log")
    if file_sizes(src) != before:  # the machine is shared: make sure nothing touched the source meanwhile
        raise SystemExit(f"{label}: the source changed during the run ({src}); results void")
    if m.rc != 0:
        raise SystemExit(f"{label} failed (rc {m.rc}); see {logs / (label + '.log')}")
    return m


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_disk(workdir: Path, needed: int, limit: int) -> None:
    free = shutil.disk_usage(workdir).free
    if needed > limit:
        raise SystemExit(f"needs ~{needed / 1e9:.1f} GB on disk at once, over --max-disk-gb {limit / 1e9:.0f}")
    if needed + 5e9 > free:
        raise SystemExit(f"needs ~{needed / 1e9:.1f} GB + 5 GB margin, only {free / 1e9:.1f} GB free")


def snapshot_converter(work: Path) -> dict:
    """Copy ``nvfp4_convert/`` into ``work/code`` (what every run imports); its provenance."""
    global CODE
    CODE = work / "code"
    shutil.copytree(REPO / "nvfp4_convert", CODE / "nvfp4_convert", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for f in sorted((CODE / "nvfp4_convert").rglob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    where = subprocess.run(
        [sys.executable, "-c", "import nvfp4_convert; print(nvfp4_convert.__file__)"],
        cwd=CODE,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(CODE.resolve()):
        raise SystemExit(f"the snapshot is not what gets imported ({where})")

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "git_head": git("rev-parse", "HEAD"),
        "git_status_nvfp4_convert": git("status", "--porcelain", "--", "nvfp4_convert") or "clean",
        "sha256_py": digest.hexdigest()[:16],
    }


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


READ_SNIPPET = """
for f in "$@"; do dd if="$f" of=/dev/null bs=64M iflag=direct status=none || exit 1; done
"""


def read_cmd(*dirs: Path) -> list[str]:
    """Read every file of ``dirs`` once with ``O_DIRECT`` (GNU dd): the disk's read speed for those bytes."""
    files = [str(f) for d in dirs for f in sorted(d.iterdir()) if f.is_file()]
    return ["sh", "-c", READ_SNIPPET, "sh", *files]


def verify_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "nvfp4_convert.cli", "verify", str(dst), "--source", str(src)]


def bench_ratio(args: argparse.Namespace, caches: list[str]) -> dict:
    """Per source layout (``--source-shards``), ``--pairs`` rounds; per round and cache state, a triple
    (convert, cp -r + sync, dd O_DIRECT), alternating; ratio = convert / min(cp, dd) of the same triple."""
    work = args.workdir
    src, dst, logs = work / "src", work / "dst", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    est = sum(s.nbytes for s in source_specs(args.layers, args.experts, args.with_embed))
    check_disk(work, int(est * 2.05), int(args.max_disk_gb * 1e9))
    startup = startup_seconds()
    print(f"startup (an interpreter importing what run imports, warm): {startup:.2f} s", flush=True)
    layouts = []
    for n_shards in args.source_shards:
        t0 = time.monotonic()
        total = write_source(src, args.layers, args.experts, args.with_embed, args.seed, n_shards)
        src_bytes = dir_bytes(src)
        files = sorted(src.glob("*.safetensors"))
        print(
            f"\nsource: {args.layers} layer(s) x {args.experts} experts: {total / 1e9:.2f} GB of tensors in "
            f"{len(files)} shards of ~{max(f.stat().st_size for f in files) / 1e9:.2f} GB; "
            f"generated in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        runs: dict[str, list[dict]] = {c: [] for c in caches}
        w = args.workers[0]
        for k in range(args.pairs):
            for cache in caches:
                tag = f"s{len(files)}-{cache}-{k}"
                c = timed(f"convert-{tag}", convert_cmd(src, dst, w), dst, src, cache, logs)
                timing = json.loads((dst / "nvfp4-convert-report.json").read_text())["timing"]
                out_bytes = dir_bytes(dst)
                p = timed(f"cp-{tag}", copy_cmd(src, dst, "cp-sync"), dst, src, cache, logs)
                d = timed(f"dd-{tag}", copy_cmd(src, dst, "dd-direct"), dst, src, cache, logs)
                base = min(p.wall_s, d.wall_s)
                row = {
                    "convert_s": round(c.wall_s, 3),
                    "cp_s": round(p.wall_s, 3),
                    "dd_s": round(d.wall_s, 3),
                    "ratio": round(c.wall_s / base, 4),
                    "converter_own_s": timing["seconds"],
                    "phases": timing.get("phases", {}),
                    "reads_through_page_cache": len(timing.get("reads_through_page_cache", [])),
                    "bytes_read_from_page_cache": timing.get("bytes_read_from_page_cache"),
                    "prefetch": timing.get("prefetch"),
                    "max_process_rss_bytes": c.max_process_rss,
                    "tree_rss_bytes": c.tree_rss,
                    "cpu_s": {"convert": round(c.cpu_s, 1), "cp": round(p.cpu_s, 1), "dd": round(d.cpu_s, 1)},
                    "load_before": round(c.load_before, 2),
                }
                runs[cache].append(row)
                print(
                    f"  {len(files)} shards, {cache:>4}, round {k + 1}: convert {c.wall_s:6.2f} s  cp {p.wall_s:6.2f} s  "
                    f"dd {d.wall_s:6.2f} s  ratio {row['ratio']:.3f}  (own {timing['seconds']:.1f} s, phases "
                    f"{timing.get('phases')}, {row['reads_through_page_cache']} files read from the page cache, "
                    f"{(row['bytes_read_from_page_cache'] or 0) / 1e9:.2f} GB copied from it, prefetch "
                    f"{(row['prefetch'] or {}).get('bytes_read', 0) / 1e9:.2f} GB)  "
                    f"RSS {gib(c.max_process_rss)}  load {c.load_before:.1f}",
                    flush=True,
                )
        layout: dict = {
            "source_shards": len(files),
            "source_bytes": src_bytes,
            "output_bytes": out_bytes,
            "by_cache": {
                cache: {
                    "ratio_median": statistics.median(r["ratio"] for r in rows),
                    "peak_max_process_rss_bytes": max(r["max_process_rss_bytes"] for r in rows),
                    "rounds": rows,
                }
                for cache, rows in runs.items()
            },
        }
        if args.verify:  # ``--pairs`` alternating (verify, read) rounds, both cold, on one converted DST
            timed(f"convert-s{len(files)}-for-verify", convert_cmd(src, dst, w), dst, src, "cold", logs)
            rounds = []
            for k in range(args.pairs):
                v = timed(f"verify-s{len(files)}-{k}", verify_cmd(src, dst), Path("/nonexistent"), src, "cold", logs)
                r = timed(f"read-s{len(files)}-{k}", read_cmd(src, dst), Path("/nonexistent"), src, "cold", logs)
                rounds.append(
                    {
                        "verify_s": round(v.wall_s, 3),
                        "read_src_and_dst_s": round(r.wall_s, 3),
                        "ratio": round(v.wall_s / r.wall_s, 4),
                        "max_process_rss_bytes": v.max_process_rss,
                        "tree_rss_bytes": v.tree_rss,  # verify and vLLM's name-mapper child together
                        "tree_pss_bytes": v.tree_pss,
                        "cpu_s": round(v.cpu_s, 1),
                    }
                )
                print(
                    f"  verify --source, round {k + 1}: {v.wall_s:.2f} s, dd O_DIRECT read of SRC and DST "
                    f"{r.wall_s:.2f} s, ratio {v.wall_s / r.wall_s:.3f}, RSS {gib(v.max_process_rss)} (largest process; "
                    f"tree {gib(v.tree_rss)} RSS, {gib(v.tree_pss)} PSS)",
                    flush=True,
                )
            layout["verify"] = {
                "ratio": statistics.median(x["ratio"] for x in rounds),
                "peak_max_process_rss_bytes": max(x["max_process_rss_bytes"] for x in rounds),
                "rounds": rounds,
            }
        clear(dst)
        shutil.rmtree(src)
        layouts.append(layout)
    print(f"\nconvert / min(cp -r + sync, dd O_DIRECT), median of {args.pairs} rounds; peak RSS of the converter")
    for lay in layouts:
        for cache, res in lay["by_cache"].items():
            print(
                f"  {lay['source_shards']:>3} source shards, {cache:>4} cache: {res['ratio_median']:.3f} "
                f"({' '.join(str(r['ratio']) for r in res['rounds'])}), RSS {gib(res['peak_max_process_rss_bytes'])}"
            )
        if "verify" in lay:
            v = lay["verify"]
            print(
                f"      verify --source / read SRC+DST: {v['ratio']:.3f} "
                f"({' '.join(str(r['ratio']) for r in v['rounds'])}), RSS {gib(v['peak_max_process_rss_bytes'])}"
            )
    return {
        "mode": "ratio",
        "layers": args.layers,
        "experts": args.experts,
        "with_embed": args.with_embed,
        "startup_s": startup,
        "convert_io": IO,
        "workers": args.workers[0],
        "convert_shard_size": SHARD_SIZE or "default (5GB)",
        "pairs": args.pairs,
        "caches": caches,
        "layouts": layouts,
    }


def bench_rss_scaling(args: argparse.Namespace, cache: str) -> dict:
    work = args.workdir
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sizes = {"1x": args.scaling_layers, "4x": 4 * args.scaling_layers}
    out: dict[str, dict] = {}
    for label, layers in sizes.items():
        src, dst = work / f"src-{label}", work / f"dst-{label}"
        est = sum(s.nbytes for s in source_specs(layers, args.scaling_experts, False))
        check_disk(work, int(est * 2.05), int(args.max_disk_gb * 1e9))
        write_source(src, layers, args.scaling_experts, False, args.seed)
        src_bytes = dir_bytes(src)
        n_tensors = len(source_specs(layers, args.scaling_experts, False))
        out[label] = {
            "layers": layers,
            "experts": args.scaling_experts,
            "source_bytes": src_bytes,
            "tensors": n_tensors,
        }
        for w in args.workers:
            m = timed(f"rss-{label}-w{w}", convert_cmd(src, dst, w), dst, src, cache, logs)
            out[label][f"workers_{w}"] = {
                "wall_s": m.wall_s,
                "cpu_s": m.cpu_s,
                "max_process_rss_bytes": m.max_process_rss,
                "tree_rss_bytes": m.tree_rss,
                "tree_pss_bytes": m.tree_pss,
            }
            print(
                f"  {label}: {layers} layer(s) x {args.scaling_experts} experts, {n_tensors} tensors, "
                f"{src_bytes / 1e9:.2f} GB, workers {w}: {m.wall_s:.1f} s, max-process RSS {gib(m.max_process_rss)}, "
                f"tree RSS {gib(m.tree_rss)}, tree PSS {gib(m.tree_pss)}",
                flush=True,
            )
            clear(dst)
        shutil.rmtree(src)
    print(f"\nRSS scaling (4x source vs 1x source), cache {cache}:")
    print(f"{'workers':>7} {'metric':>16} {'1x':>10} {'4x':>10} {'4x/1x':>7}")
    ratios = {}
    for w in args.workers:
        for key in ("max_process_rss_bytes", "tree_rss_bytes", "tree_pss_bytes"):
            a, b = out["1x"][f"workers_{w}"][key], out["4x"][f"workers_{w}"][key]
            ratios[f"workers_{w}_{key}"] = b / a
            print(f"{w:>7} {key.removesuffix('_bytes'):>16} {gib(a):>10} {gib(b):>10} {b / a:>7.3f}")
    return {
        "mode": "rss-scaling",
        "convert_shard_size": SHARD_SIZE or "default (5GB)",
        "cache": cache,
        "sizes": out,
        "ratios_4x_over_1x": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir", type=Path, default=REPO / "tmp" / "nvfp4-bench", help="where data goes (deleted at the end)"
    )
    ap.add_argument("--layers", type=int, default=1, help="decoder layers in the source (ratio mode)")
    ap.add_argument("--experts", type=int, default=PRO["n_routed_experts"], help="routed experts per layer")
    ap.add_argument("--with-embed", action="store_true", help="add embed_tokens, lm_head, norm, hc_head once")
    ap.add_argument("--pairs", type=int, default=2, help="rounds of (convert, cp, dd) per layout and cache state")
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1], help="converter workers")
    ap.add_argument(
        "--cache", default="auto", help="cold, warm or cold,warm (both, alternating); auto = cold,warm if root"
    )
    ap.add_argument(
        "--source-shards", type=lambda s: [int(x) for x in s.split(",")], default=[3], help="source layouts, e.g. 3,15"
    )
    ap.add_argument("--verify", action="store_true", help="also time verify --source against reading SRC and DST")
    ap.add_argument("--rss-scaling", action="store_true", help="peak memory for a 1x and a 4x source instead")
    ap.add_argument("--scaling-layers", type=int, default=1, help="layers of the 1x source (4x has 4 times as many)")
    ap.add_argument("--scaling-experts", type=int, default=96, help="routed experts per layer in --rss-scaling")
    ap.add_argument("--max-disk-gb", type=float, default=40.0, help="refuse to use more disk than this at once")
    ap.add_argument("--convert-shard-size", help="pass --shard-size to the converter (default: its own, 5GB)")
    ap.add_argument("--io", choices=("auto", "direct", "buffered"), default="auto", help="pass --io to the converter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup below runs
    global SHARD_SIZE, IO
    SHARD_SIZE, IO = args.convert_shard_size, args.io

    args.workdir = args.workdir.resolve()  # the runs' working directory is the snapshot, not here
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir} exists and is not empty")
    args.workdir.mkdir(parents=True, exist_ok=True)
    caches = ["cold", "warm"] if args.cache == "auto" else args.cache.split(",")
    if args.cache == "auto" and not can_drop_caches():
        caches = ["warm"]
    if set(caches) - {"cold", "warm"}:
        raise SystemExit(f"--cache: cold, warm or cold,warm, not {args.cache}")
    if "cold" in caches and not can_drop_caches():
        raise SystemExit(f"cannot write {DROP_CACHES} (needs root): use --cache warm")
    print(f"machine: {machine()}; cache states: {', '.join(caches)}", flush=True)
    ok = False
    try:
        code = snapshot_converter(args.workdir)
        print(f"converter snapshot: {code}", flush=True)
        result = bench_rss_scaling(args, caches[0]) if args.rss_scaling else bench_ratio(args, caches)
        ok = True
    finally:
        if not args.keep:  # the data always goes; on failure the logs and the snapshot stay for a look
            for p in args.workdir.iterdir():
                if p.is_dir() and (ok or p.name not in ("logs", "code")):
                    shutil.rmtree(p)
            if ok:
                args.workdir.rmdir()
    result["converter"] = code
    result["machine"] = machine()
    result["command"] = " ".join(sys.argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
