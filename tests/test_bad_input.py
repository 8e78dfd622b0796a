"""Every bad input of launch.py, the tools and the config gives ONE line naming the flag or key and
what is allowed, exit code 2, and writes nothing (issue 19); a sampling chunk that turns NaN stops
at once with an error naming the chunk.

The CLI and the tools run in-process (``main(argv)``, stderr through capsys): a subprocess costs
seconds on this machine. ``CASES`` walks the whole list; each case runs in a fresh folder holding
the inputs the cases point at (an existing output, a folder, a non-UTF-8 file, ...), and the test
checks that the folder is byte-for-byte unchanged afterwards. The checkpoint is one tiny float32
system saved once per module (data.s2d_frames=2, so the codec makes only even frame counts)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers_launch import CONFIG
from helpers_scripts import load_script
from helpers_system import TINY_SYSTEM

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 frames of 8x8 -> 2 latent frames of 4x4 tokens (24 channels); text length 4 tokens
SYSTEM = TINY_SYSTEM + ["data.s2d_frames=2", "model.latent_channels=24"]
LATIN1 = "caméra à l'épaule\n".encode("latin-1")  # é = 0xe9: not UTF-8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, megatron_ready):
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    run_dir = str(tmp_path_factory.mktemp("bad_input_run"))
    cfg = load_config(None, SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir)
    save_system_checkpoint(run_dir, 0, cfg, system, tokenizer_file=tokenizer_path(cfg, run_dir))
    return run_dir


def _inputs(root) -> None:
    """What the cases point at, in the folder the test then watches."""
    (root / "exists.mp4").write_bytes(b"an earlier video")
    (root / "exists.png").write_bytes(b"an earlier grid")
    (root / "exists.json").write_text("{}")
    (root / "folder").mkdir()
    (root / "afile").write_text("a file where a folder would have to be")
    (root / "latin1.txt").write_bytes(LATIN1)
    (root / "latin1.yaml").write_bytes(b"model:\n  deep_layers: 2 # " + LATIN1)
    (root / "empty.txt").write_text("\n \n")
    (root / "readonly").mkdir()
    np.save(root / "clip.npy", np.zeros((2, 8, 8, 3), np.uint8))
    data = root / "dataset"  # an earlier make_synthetic_data / prepare_data / tokenizer run
    data.mkdir()
    for name in ("metadata.jsonl", "shards.json", "spm.model"):
        (data / name).write_text("earlier")
    (root / "export").mkdir()  # an earlier export
    (root / "export" / "config.json").write_text("{}")


def _snapshot(root) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = (None if os.path.isdir(path) else
                                               open(path, "rb").read())
    return out


# ------------------------------------------------------------------------------ the list
# (id, program, argv, substrings of the one error line). Programs: "launch" (launch.py) or a
# tools/ script. {ckpt}: the checkpoint's run folder, {tmp}: the watched folder.
S = ["sample", "--checkpoint", "{ckpt}", "--prompt", "a red circle", "--out", "{tmp}/new.mp4"]
EV = ["eval", "--checkpoint", "{ckpt}"]
TR = ["train", "--config", CONFIG, "--out", "{tmp}/run"]
FINITE_CFG = "argument --cfg: must be a finite number in [0, 100]"
CASES = [
    # --- launch.py sample: numbers
    ("cfg-nan", "launch", S + ["--cfg", "nan"], [FINITE_CFG, "'nan'"]),
    ("cfg-inf", "launch", S + ["--cfg", "inf"], [FINITE_CFG, "'inf'"]),
    ("cfg-negative", "launch", S + ["--cfg", "-1"], [FINITE_CFG]),
    ("cfg-too-large", "launch", S + ["--cfg", "1e3"], [FINITE_CFG]),
    ("cfg-not-a-number", "launch", S + ["--cfg", "strong"], [FINITE_CFG, "'strong'"]),
    ("tau-nan", "launch", S + ["--tau", "nan"], ["argument --tau: must be a finite number in [0, 1]"]),
    ("tau-negative", "launch", S + ["--tau", "-0.001"], ["argument --tau", "[0, 1]"]),
    ("tau-above-one", "launch", S + ["--tau", "2"], ["argument --tau", "[0, 1]"]),
    ("seed-negative", "launch", S + ["--seed", "-1"], ["argument --seed: must be an integer in [0, 9.22337e+18]"]),
    ("seed-too-large", "launch", S + ["--seed", str(2**63)], ["argument --seed", "[0, 9.22337e+18]"]),
    ("seed-float", "launch", S + ["--seed", "1.5"], ["argument --seed", "'1.5'"]),
    ("frames-zero", "launch", S + ["--frames", "0"], ["argument --frames: must be an integer >= 1, got '0'"]),
    ("frames-negative", "launch", S + ["--frames", "-4"], ["argument --frames", ">= 1"]),
    ("frames-codec", "launch", S + ["--frames", "3"],
     ["--frames 3", "multiple of frames_per_token=2"]),
    ("block-size-zero", "launch", S + ["--block-size", "0"], ["argument --block-size: must be an integer >= 1"]),
    ("block-size-three", "launch", S + ["--block-size", "4", "8", "16"], ["--block-size takes 1 or 2 values"]),
    ("cp-zero", "launch", S + ["--cp", "0"], ["argument --cp: must be an integer >= 1"]),
    ("context-frames-negative", "launch", S + ["--context-frames", "-1"], ["argument --context-frames", ">= 0"]),
    ("long-context-negative", "launch", S + ["--long-context", "-2"], ["argument --long-context", ">= 0"]),
    ("long-context-too-long", "launch", S + ["--frames", "8", "--long-context", "2"],
     ["--long-context 2 must be below the training length of 2 latent frames"]),
    # --- launch.py sample: paths
    ("checkpoint-missing", "launch", ["sample", "--checkpoint", "{tmp}/nothing", "--prompt", "x"],
     ["argument --checkpoint", "does not exist"]),
    ("out-exists", "launch", S[:-1] + ["{tmp}/exists.mp4"], ["--out", "exists.mp4 exists; pass --overwrite"]),
    ("out-is-folder", "launch", S[:-1] + ["{tmp}/folder"], ["--out", "folder is a folder"]),
    ("out-under-a-file", "launch", S[:-1] + ["{tmp}/afile/x.mp4"], ["--out", "afile is a file"]),
    ("out-unwritable", "launch", S[:-1] + ["{tmp}/readonly/x.mp4"], ["--out", "cannot write in folder", "readonly"]),
    ("out-batch-exists", "launch", S[:-1] + ["{tmp}/exists.mp4", "--prompt", "a blue square"],
     ["--out", "exists_0.mp4"]),  # two prompts: exists_0.mp4, exists_1.mp4 (made below)
    ("grid-exists", "launch", S + ["--grid", "{tmp}/exists.png"], ["--grid", "exists.png exists; pass --overwrite"]),
    ("grid-is-folder", "launch", S + ["--grid", "{tmp}/folder"], ["--grid", "is a folder"]),
    ("prompts-not-utf8", "launch", S[:3] + ["--prompts", "{tmp}/latin1.txt", "--out", "{tmp}/n.mp4"],
     ["--prompts", "latin1.txt", "is not UTF-8 text (byte 0xe9 on line 1)"]),
    ("prompts-empty", "launch", S[:3] + ["--prompts", "{tmp}/empty.txt"], ["empty.txt", "holds no prompts"]),
    ("prompts-missing", "launch", S[:3] + ["--prompts", "{tmp}/none.txt"], ["argument --prompts", "does not exist"]),
    ("prompts-folder", "launch", S[:3] + ["--prompts", "{tmp}/folder"], ["argument --prompts", "is a folder"]),
    ("prompt-empty", "launch", S[:3] + ["--prompt", " ", "--out", "{tmp}/n.mp4"], ["prompt 0 is empty"]),
    ("no-prompt", "launch", S[:3] + ["--out", "{tmp}/n.mp4"], ["no prompt given"]),
    ("image-with-t2v", "launch", S + ["--image", "{tmp}/clip.npy"], ["--image is the first frame of --task i2v"]),
    ("video-with-i2v", "launch", S + ["--task", "i2v", "--video", "{tmp}/clip.npy"], ["--video", "--task v2v"]),
    ("i2v-without-image", "launch", S + ["--task", "i2v"], ["--task i2v needs --image"]),
    ("image-missing", "launch", S + ["--task", "i2v", "--image", "{tmp}/none.png"], ["argument --image", "does not exist"]),
    ("context-frames-with-t2v", "launch", S + ["--context-frames", "2"], ["--context-frames applies to --task v2v"]),
    ("context-frames-beyond-video", "launch", S + ["--task", "v2v", "--video", "{tmp}/clip.npy", "--context-frames", "3"],
     ["--context-frames 3 but --video", "has 2 frames"]),
    ("video-not-shorter", "launch", S + ["--task", "v2v", "--video", "{tmp}/clip.npy", "--frames", "2"],
     ["--video / --context-frames gives 2 frames; --frames 2 must be more"]),
    # --- launch.py eval
    ("eval-batches-zero", "launch", EV + ["--batches", "0"], ["argument --batches: must be an integer >= 1"]),
    ("eval-samples-zero", "launch", EV + ["--suite", "cpu", "--samples", "0"], ["argument --samples", ">= 1"]),
    ("eval-cfg-nan", "launch", EV + ["--suite", "cpu", "--cfg", "nan"], [FINITE_CFG]),
    ("eval-seed-negative", "launch", EV + ["--suite", "cpu", "--seed", "-5"], ["argument --seed"]),
    ("eval-threads-negative", "launch", EV + ["--threads", "-1"], ["argument --threads", ">= 0"]),
    ("eval-out-exists", "launch", EV + ["--suite", "cpu", "--out", "{tmp}/exists.json"],
     ["--out", "exists.json exists; pass --overwrite"]),
    ("eval-png-folder", "launch", EV + ["--suite", "cpu", "--png", "{tmp}/folder"], ["--png", "is a folder"]),
    ("eval-out-without-suite", "launch", EV + ["--out", "{tmp}/r.json"], ["--out is written by --suite cpu only"]),
    # --- launch.py train: paths and launcher flags
    ("config-missing", "launch", ["train", "--config", "{tmp}/none.yaml"], ["argument --config", "does not exist"]),
    ("config-folder", "launch", ["train", "--config", "{tmp}/folder"], ["argument --config", "is a folder"]),
    ("config-not-utf8", "launch", ["train", "--config", "{tmp}/latin1.yaml"], ["latin1.yaml", "is not UTF-8 text"]),
    ("train-out-is-file", "launch", ["train", "--config", CONFIG, "--out", "{tmp}/afile"], ["--out", "afile is a file"]),
    ("train-out-unwritable", "launch", ["train", "--config", CONFIG, "--out", "{tmp}/readonly/run"],
     ["--out", "cannot write in folder"]),
    ("nodes-zero", "launch", TR + ["--executor", "local", "--nodes", "0"], ["argument --nodes: must be an integer >= 1"]),
    ("gpus-per-node-zero", "launch", TR + ["--executor", "local", "--gpus-per-node", "0"], ["argument --gpus-per-node"]),
    ("time-zero", "launch", TR + ["--executor", "slurm", "--time", "0", "--dry-run"], ["argument --time", "at least a minute"]),
    ("time-garbage", "launch", TR + ["--executor", "slurm", "--time", "soon", "--dry-run"], ["argument --time", "'soon'"]),
    ("signal-delay-negative", "launch", TR + ["--executor", "slurm", "--signal-delay-s", "-5"], ["argument --signal-delay-s"]),
    ("cpus-per-task-zero", "launch", TR + ["--executor", "slurm", "--cpus-per-task", "0"], ["argument --cpus-per-task"]),
    ("job-dir-file", "launch", TR + ["--executor", "local", "--job-dir", "{tmp}/afile"], ["--job-dir", "is a file"]),
    ("slurm-config-missing", "launch", TR + ["--slurm-config", "{tmp}/none.yaml"], ["argument --slurm-config", "does not exist"]),
    # --- config keys (the same checks serve YAML files and saved configs)
    ("key-nan", "launch", TR + ["model.noise_std=nan"], ["model.noise_std must be a finite number, got nan"]),
    ("key-inf", "launch", TR + ["train.lr=inf"], ["train.lr must be a finite number, got inf"]),
    ("key-negative-inf", "launch", TR + ["train.peak_tflops=-.inf"], ["train.peak_tflops must be a finite number"]),
    ("key-zero-count", "launch", TR + ["data.frames=0"], ["data.frames must be > 0, got 0"]),
    ("key-negative-count", "launch", TR + ["train.steps=-3"], ["train.steps must be > 0"]),
    ("key-negative-workers", "launch", TR + ["data.num_workers=-1"], ["data.num_workers must be >= 0"]),
    ("key-seed-negative", "launch", TR + ["train.seed=-1"], ["train.seed must be >= 0"]),
    ("key-seed-too-large", "launch", TR + [f"train.seed={2**63}"], ["train.seed must be in [0, 2^63 - 1]"]),
    ("key-beta", "launch", TR + ["train.beta2=1.0"], ["train.beta2 must be in [0, 1)"]),
    ("key-min-lr", "launch", TR + ["train.min_lr=1"], ["train.min_lr=1.0 exceeds train.lr"]),
    ("key-dp-zero", "launch", TR + ["parallel.dp=0"], ["parallel.dp must be >= 1, or -1"]),
    ("key-template", "launch", TR + ["text.template=hello"], ["text.template='hello' lacks {caption}"]),
    ("key-template-field", "launch", TR + ["text.template={{caption}} {{size}}"], ["text.template", "{caption}, {noise}, {fps}"]),
    ("key-frames-s2d", "launch", TR + ["data.s2d_frames=2", "model.latent_channels=24", "data.frames=7"],
     ["data.frames=7 is not divisible by data.s2d_frames=2"]),
    ("key-frames-wan", "launch", TR + ["data.codec=wan", "data.frames=8"], ["data.frames=8: the Wan VAE makes 4k+1 frames"]),
    ("key-dropout", "launch", TR + ["text.caption_dropout=1"], ["text.caption_dropout must be in [0, 1)"]),
    ("key-unknown", "launch", TR + ["model.flux_capacitor=1"], ["unknown config key model.flux_capacitor"]),
    ("key-type", "launch", TR + ["train.steps=many"], ["train.steps: expected int"]),
    # --- tools
    ("bench-tau-nan", "tools/benchmark.py", ["sampling", "--checkpoint", "{ckpt}", "--tau", "nan"], ["argument --tau"]),
    ("bench-cfg-negative", "tools/benchmark.py", ["sampling", "--checkpoint", "{ckpt}", "--cfg", "-2"], [FINITE_CFG]),
    ("bench-prompts-zero", "tools/benchmark.py", ["sampling", "--checkpoint", "{ckpt}", "--prompts", "0"], ["argument --prompts"]),
    ("bench-repeats-zero", "tools/benchmark.py", ["sampling", "--checkpoint", "{ckpt}", "--repeats", "0"], ["argument --repeats"]),
    ("bench-size-odd", "tools/benchmark.py", ["data", "--size", "15"], ["--size 15", "even"]),
    ("bench-file-frames", "tools/benchmark.py", ["data", "--frames", "8", "--file-frames", "4"], ["--file-frames 4 is fewer than --frames 8"]),
    ("bench-workdir-file", "tools/benchmark.py", ["data", "--workdir", "{tmp}/afile"], ["--workdir", "is a file"]),
    ("synth-num-zero", "tools/make_synthetic_data.py", ["--out", "{tmp}/s", "--num", "0"], ["argument --num: must be an integer >= 1"]),
    ("synth-height", "tools/make_synthetic_data.py", ["--out", "{tmp}/s", "--num", "1", "--height", "0"], ["argument --height", "[8, 4096]"]),
    ("synth-fps", "tools/make_synthetic_data.py", ["--out", "{tmp}/s", "--num", "1", "--fps", "0"], ["argument --fps", "[1, 240]"]),
    ("synth-crf", "tools/make_synthetic_data.py", ["--out", "{tmp}/s", "--num", "1", "--crf", "99"], ["argument --crf", "[0, 51]"]),
    ("synth-odd-mp4", "tools/make_synthetic_data.py", ["--out", "{tmp}/s", "--num", "1", "--height", "9", "--format", "mp4"],
     ["--height 9", "even sizes"]),
    ("synth-out-exists", "tools/make_synthetic_data.py", ["--out", "{tmp}/dataset", "--num", "1"],
     ["--out", "holds metadata.jsonl; pass --overwrite"]),
    ("synth-out-file", "tools/make_synthetic_data.py", ["--out", "{tmp}/afile", "--num", "1"], ["--out", "is a file"]),
    ("prep-shard-size", "tools/prepare_data.py", ["--input", "{tmp}/folder", "--out", "{tmp}/p", "--shard-size", "0"],
     ["argument --shard-size"]),
    ("prep-input-missing", "tools/prepare_data.py", ["--input", "{tmp}/none", "--out", "{tmp}/p"], ["argument --input", "does not exist"]),
    ("prep-input-file", "tools/prepare_data.py", ["--input", "{tmp}/afile", "--out", "{tmp}/p"], ["argument --input", "is a file"]),
    ("prep-out-exists", "tools/prepare_data.py", ["--input", "{tmp}/folder", "--out", "{tmp}/dataset"],
     ["--out", "holds shards.json; pass --overwrite"]),
    ("prep-latents-no-config", "tools/prepare_data.py", ["--input", "{tmp}/folder", "--out", "{tmp}/p", "--latents"],
     ["--latents needs --config"]),
    ("tok-vocab", "tools/train_tokenizer.py", ["--out", "{tmp}/t", "--synthetic", "10", "--vocab-size", "0"],
     ["argument --vocab-size", "[8, 1.04858e+06]"]),
    ("tok-synthetic-zero", "tools/train_tokenizer.py", ["--out", "{tmp}/t", "--synthetic", "0"], ["argument --synthetic"]),
    ("tok-captions-not-utf8", "tools/train_tokenizer.py", ["--out", "{tmp}/t", "--captions", "{tmp}/latin1.txt"],
     ["--captions", "utf-8"]),
    ("tok-out-exists", "tools/train_tokenizer.py", ["--out", "{tmp}/dataset", "--synthetic", "10"],
     ["--out", "holds spm.model; pass --overwrite"]),
    ("mem-gpu-gb", "tools/estimate_memory.py", ["--gpu-gb", "nan"], ["argument --gpu-gb: must be a finite number > 0"]),
    ("mem-reserve", "tools/estimate_memory.py", ["--reserve", "1"], ["argument --reserve", "[0, 1)"]),
    ("mem-tp", "tools/estimate_memory.py", ["--tp", "0"], ["argument --tp"]),
    ("mem-key", "tools/estimate_memory.py", ["model.deep_layers=0"], ["model.deep_layers must be > 0"]),
    ("dry-run-pp", "tools/dry_run_parallel.py", ["--pp", "0"], ["argument --pp"]),
    ("dry-run-layout", "tools/dry_run_parallel.py", ["--preset", "tiny", "--tp", "3"], ["parallel.tp=3"]),
    ("count-preset", "tools/count_params.py", ["--preset", "huge"], ["argument --preset: invalid choice"]),
    ("count-key", "tools/count_params.py", ["model.soft_clip=nan"], ["model.soft_clip must be a finite number"]),
    ("convert-out-exists", "tools/convert_checkpoint.py", ["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/export"],
     ["--out", "export is not empty; pass --overwrite"]),
    ("convert-shard-size", "tools/convert_checkpoint.py", ["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/e",
                                                           "--max-shard-size", "big"], ["argument --max-shard-size"]),
    ("convert-import-tp", "tools/convert_checkpoint.py", ["import", "--inference", "{tmp}/export", "--out", "{tmp}/r",
                                                          "--tp", "0"], ["argument --tp"]),
    ("import-aspect", "tools/import_ml_starflow.py", ["--checkpoint", "{tmp}/exists.json", "--config", "{tmp}/exists.json",
                                                      "--out", "{tmp}/i", "--aspect-ratio", "0:9"], ["argument --aspect-ratio"]),
    ("import-missing", "tools/import_ml_starflow.py", ["--checkpoint", "{tmp}/none.pth", "--config", "{tmp}/exists.json",
                                                       "--out", "{tmp}/i"], ["argument --checkpoint", "does not exist"]),
    ("sweep-steps", "tools/scaling_sweep.py", ["--out", "{tmp}/sw", "--steps", "0"], ["argument --steps", ">= 1"]),
    ("sweep-sizes", "tools/scaling_sweep.py", ["--out", "{tmp}/sw", "--sizes", "0/32/1"], ["argument --sizes"]),
    ("sweep-threads", "tools/scaling_sweep.py", ["--out", "{tmp}/sw", "--threads", "-1"], ["argument --threads"]),
    ("sweep-out-file", "tools/scaling_sweep.py", ["--out", "{tmp}/afile"], ["--out", "is a file"]),
    ("quality-steps", "tools/quality_sweep.py", ["--out", "{tmp}/q", "--recipe", "a:", "--steps", "0"],
     ["argument --steps", ">= 1"]),
    ("quality-recipe", "tools/quality_sweep.py", ["--out", "{tmp}/q", "--recipe", "a"],
     ["argument --recipe", "NAME:key=value"]),
    ("quality-temperature", "tools/quality_sweep.py", ["--out", "{tmp}/q", "--recipe", "a:",
                                                       "--temperature", "nan"], ["argument --temperature"]),
    ("quality-out-file", "tools/quality_sweep.py", ["--out", "{tmp}/afile", "--recipe", "a:"],
     ["--out", "is a file"]),
    ("eval-temperature", "launch", EV + ["--suite", "cpu", "--temperature", "-1"],
     ["argument --temperature", "[0, 4]"]),
    ("sample-temperature", "launch", S + ["--temperature", "inf"], ["argument --temperature", "finite"]),
    ("sample-candidates", "launch", S + ["--candidates", "0"], ["argument --candidates", ">= 1"]),
    ("sample-candidates-cp", "launch", S + ["--candidates", "4", "--cp", "2"],
     ["--candidates 4 with --cp 2", "one process"]),
    ("eval-candidates", "launch", EV + ["--suite", "cpu", "--candidates", "-2"], ["argument --candidates"]),
]


def run_program(program: str, argv: list[str]) -> int:
    """``launch.py`` (``cli.main``) or a tool's ``main``, in-process -> exit code."""
    if program == "launch":
        from megatron_starflow.cli import main
    else:
        main = load_script(program).main
    try:
        code = main(argv)
    except SystemExit as exc:  # tools without their own handler exit through argparse
        code = exc.code
    return 0 if code is None else code


@pytest.fixture
def read_only(monkeypatch):
    """Folders named ``readonly`` refuse writes (as root, os.access cannot show that)."""
    from megatron_starflow.cli import checks

    real = checks.writable
    monkeypatch.setattr(checks, "writable", lambda folder: "readonly" not in os.path.basename(folder)
                        and real(folder))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, ckpt, tmp_path, capsys, read_only):
    name, program, argv, expected = case
    _inputs(tmp_path)
    if name == "out-batch-exists":
        (tmp_path / "exists_0.mp4").write_bytes(b"earlier")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    code = run_program(program, argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: prompt")]
    assert code == 2, (code, err)
    assert len(lines) == 1, err  # one line, no traceback, no usage block
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert "Traceback" not in err and not out.strip()
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_the_list_covers_every_flag_with_a_number_or_a_path():
    """Every numeric or path flag of launch.py's commands appears in at least one case (a flag
    added later without a case fails here)."""
    from megatron_starflow.cli.app import build_parser

    covered = {a for _, program, argv, _ in CASES if program == "launch" for a in argv if a.startswith("--")}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = set()
    for command, p in sub.choices.items():
        for action in p._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            takes_value = action.nargs != 0 and flag not in ("--help",)
            # argparse itself refuses a value outside `choices` in one line; free text is free
            free_text = action.choices is not None or flag in (
                "--partition", "--account", "--qos", "--constraint", "--mem", "--job-name", "--prompt")
            if flag and takes_value and not free_text and flag not in covered:
                missing.add(f"{command} {flag}")
    assert not missing, sorted(missing)


# ------------------------------------------------------------------------------ decisions

def test_long_prompt_is_truncated_with_one_warning(ckpt, tmp_path, capsys):
    """Decision (README, --help): a prompt longer than model.text_length is truncated to it, as
    training truncates captions, with one warning per prompt naming its length."""
    from megatron_starflow.cli import main

    out = tmp_path / "t.mp4"
    code = main(["sample", "--checkpoint", ckpt, "--prompt", "a",
                 "--prompt", "a large red circle moves slowly to the left on a black background",
                 "--out", str(out), "--block-size", "16"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: prompt 1 is ")
    assert "the model reads the first 4 (model.text_length)" in warnings[0]
    assert (tmp_path / "t_0.mp4").is_file() and (tmp_path / "t_1.mp4").is_file()
    # the same outputs again: refused without --overwrite, replaced with it
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "red", "--prompt", "blue",
                 "--out", str(out)]) == 2
    assert "t_0.mp4 exists; pass --overwrite" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "red", "--prompt", "blue",
                 "--out", str(out), "--overwrite", "--block-size", "16"]) == 0


def test_prompt_file_with_bom_and_blank_lines(tmp_path):
    from megatron_starflow.sampling.prompts import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red circle\n\n  a blue square  \r\n".encode("utf-8"))
    assert read_prompts(["given"], str(path)) == ["given", "a red circle", "a blue square"]


def test_solver_and_generation_arguments_refused_in_the_api(ckpt):
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    for kwargs, message in [(dict(tau=float("nan")), "tau must be a finite number in"),
                            (dict(tau=-1.0), "tau must be"), (dict(guidance=float("inf")), "guidance"),
                            (dict(guidance=-0.5), "guidance"), (dict(max_iters=-1), "max_iters"),
                            (dict(first_block=0), "block sizes")]:
        with pytest.raises(ValueError, match=message):
            SolverOptions(**kwargs)
    system, _, _ = load_system(ckpt)
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate(system, ["a red circle"], temperature=temperature)


# ------------------------------------------------------------------------------ time-bounded sampling

def _poisoned(block, from_token: int, value: float):
    """Make ``block.predict`` return ``value`` (NaN, or inf: a diverging flow) for tokens at and
    after ``from_token``; -> a list that records every predicted span (start, length)."""
    real, calls = block.predict, []

    def predict(prev, start, layout, cache, commit):
        b, log_sigma = real(prev, start, layout, cache, commit)
        calls.append((start, prev.shape[1]))
        hit = torch.arange(start, start + prev.shape[1]) >= from_token
        if hit.any():
            b = b.clone()
            b[:, hit] = value
        return b, log_sigma

    block.predict = predict
    return calls


def _deep_case(make_model):
    model = make_model()
    block = model.deep_block
    layout = model.deep_layout(4, 2, 3)  # 4 frames of 6 tokens
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, model.cfg.text_length, model.cfg.text_width, generator=g, dtype=torch.float64)
    z = torch.randn(2, 24, model.cfg.token_channels, generator=g, dtype=torch.float64)
    return block, layout, text, z


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("solver", ["jacobi", "sequential"])
def test_non_finite_chunk_stops_at_once_naming_it(make_model, value, solver):
    """Token 14 (frame 2) turns NaN / inf. Without the check a non-finite chunk never meets the
    stop rule and runs to its cap (chunk size - 1 iterations, every later chunk too) and returns
    NaN silently; with it the solver stops in the first iteration of that chunk."""
    from megatron_starflow.sampling.jacobi import BlockInverter, SamplingDiverged, SolverOptions

    block, layout, text, z = _deep_case(make_model)
    calls = _poisoned(block, 14, value)
    opts = SolverOptions(solver, 6, 12, tau=1e-6)  # chunks: tokens 0-5, 6-17, 18-23
    inv = BlockInverter(block, layout, opts, text, name="deep block")
    with pytest.raises(SamplingDiverged) as info:
        inv.run(z)
    msg = str(info.value)
    if solver == "jacobi":
        assert msg.startswith("deep block: the chunk of tokens 6..17 (frames 1-2) became non-finite")
        assert "at Jacobi iteration 1 of at most 11" in msg
        # passes: the text prefill, chunk 0-5 (<= 6 passes), then exactly one pass of chunk 6-17
        assert calls[-1] == (6, 12) and sum(1 for s, _ in calls if s == 6) == 1
    else:  # checked once per frame: frame 2 (tokens 12-17) is named, tokens 18.. are never computed
        assert msg.startswith("deep block: the chunk of tokens 12..17 (frame 2) became non-finite")
        assert "sequential decoding" in msg and calls[-1] == (17, 1)


def test_non_finite_shallow_block_and_commit_pass(make_model):
    """A shallow block (one-frame sequences, all frames at once), and a chunk of one token: no
    Jacobi iteration, only the commit pass, which is checked as well."""
    from megatron_starflow.sampling.jacobi import BlockInverter, SamplingDiverged, SolverOptions

    model = make_model()
    block = model.blocks[0]
    _poisoned(block, 3, float("nan"))
    z = torch.randn(4, 6, model.cfg.token_channels, dtype=torch.float64)
    inv = BlockInverter(block, model.shallow_layout(2, 3), SolverOptions("jacobi", 1, 1), name="shallow block 0")
    with pytest.raises(SamplingDiverged, match=r"shallow block 0: the chunk of tokens 3\.\.3 \(in-frame "
                                               r"positions, all frames at once\).* commit pass after 0"):
        inv.run(z)


def test_non_finite_chunk_in_context_parallel_final_mode(make_model):
    """The pipelined (context-parallel) solver applies the same check in its final mode (a
    one-rank group here; tests/test_context_parallel.py runs the multi-rank paths)."""
    from megatron_starflow.sampling.cp_jacobi import cp_invert_block
    from megatron_starflow.sampling.jacobi import SamplingDiverged, SolverOptions

    block, layout, text, z = _deep_case(make_model)
    _poisoned(block, 20, float("nan"))
    with pytest.raises(SamplingDiverged, match=r"deep block: the chunk of tokens 18\.\.23 \(frame 3\).*"
                                               r"iteration 1 .*context-parallel rank 0"):
        cp_invert_block(block, z, layout, SolverOptions("jacobi", 6, 6, tau=1e-6), text)


def test_cli_sample_of_a_nan_model_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    """End to end: a checkpoint whose deep head gives NaN -> exit 1, one line naming the block and
    the chunk, no mp4 written (instead of a NaN video after every chunk ran to its cap)."""
    import megatron_starflow.convert.loading as loading
    from megatron_starflow.cli import main

    load = loading.load_system

    def poisoned_load(*args, **kwargs):
        system, step, folder = load(*args, **kwargs)
        with torch.no_grad():
            system.model.deep_block.proj_out.bias.fill_(float("nan"))
        return system, step, folder

    monkeypatch.setattr(loading, "load_system", poisoned_load)
    out = tmp_path / "nan.mp4"
    code = main(["sample", "--checkpoint", ckpt, "--prompt", "a", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: deep block: the chunk of tokens 0..15 (frame 0) became "
                             "non-finite (NaN/inf) at Jacobi iteration 1 of at most 15")
    assert not out.exists()


@pytest.mark.slow
def test_context_parallel_rank_error_is_one_line(ckpt, tmp_path, capfd):
    """--cp 2 spawns two ranks; an input only the loaded model can judge (a frame count the codec
    cannot make) fails in both: the user still sees one line (file-descriptor level: the ranks'
    own output included), exit 2, nothing written."""
    from megatron_starflow.cli import main

    code = main(["sample", "--checkpoint", ckpt, "--prompt", "a", "--cp", "2", "--frames", "3",
                 "--out", str(tmp_path / "cp.mp4")])
    err = [line for line in capfd.readouterr().err.splitlines()
           if line.strip() and "warn" not in line.lower()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --frames 3:") and "frames_per_token=2" in err[0]
    assert os.listdir(tmp_path) == []
