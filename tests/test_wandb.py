"""--track, offline (WANDB_MODE=offline): the run's own wandb files hold its flags and the same metrics as
metrics.jsonl, and --resume continues the same wandb run.

wandb 0.31 has no Python reader of its .wandb files (the Go core writes them): `wandb_records` reads the file's
record log (a ':W&B' header, then LevelDB-log chunks) and parses each record with wandb's own protobuf, `Record`.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--no-vllm", "--prompts-per-step", "4", "--group-size", "4", "--eval-limit", "8", "--eval-every", "2",
        "--save-every", "1"]


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        chunks = chunk if kind in (1, 2) else chunks + chunk  # full / first; middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def read_wandb_run(run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run folder."""
    (path,) = run_dir.glob("*.wandb")
    run_id, config, history = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.append({k: json.loads(v) for k, v in items.items() if not k.startswith("_")})
    return run_id, config, history


def run(*flags, wandb_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(ROOT / "grpo.py"), *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_track_offline_holds_the_config_and_metrics_and_resume_continues_the_run(tmp_path):
    pytest.importorskip("wandb")
    wandb_dir, out = tmp_path / "wandb_dir", tmp_path / "runs"
    wandb_dir.mkdir()
    run("--track", "--total-steps", "2", *TINY, "--output-dir", str(out), wandb_dir=wandb_dir)
    (run_dir,) = out.iterdir()
    args = torch.load(run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=False)["args"]
    p = run("--resume", str(run_dir), "--total-steps", "3", wandb_dir=wandb_dir)
    first, second = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    first_id, config, history = read_wandb_run(first)
    second_id, _, resumed_history = read_wandb_run(second)
    assert first_id and second_id == first_id  # --resume continues the same wandb run
    config.pop("_wandb")
    assert config == args  # every flag of the run as it ran (max_prompt_len lowered to fit), as checkpoints hold them
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert history + resumed_history == rows  # the same metrics, step by step, values equal
    assert str(second) in p.stdout  # the summary says where the wandb files are
