"""Helpers shared by the example scripts: run the twamerge CLI as a user would, write data with `datasets`,
save checkpoints, and render markdown tables.

The examples call the command-line tool through a subprocess on purpose: the commands they run (and record in
``commands.txt`` under each run folder) are exactly what a user types.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Offline everywhere: the examples never touch the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def set_threads(n: int | None = None) -> int:
    """Use at most 2 threads (the examples are meant to share a small CPU)."""
    import torch

    n = n or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def twamerge_argv() -> list[str]:
    """The `twamerge` console script of the running interpreter's environment (or `python -m twamerge`).

    TWAMERGE_CMD overrides it (for instance to run a development build: TWAMERGE_CMD="python -m twamerge")."""
    if os.environ.get("TWAMERGE_CMD"):
        return shlex.split(os.environ["TWAMERGE_CMD"])
    exe = Path(sys.executable).parent / "twamerge"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("twamerge")
    if found:
        return [found]
    return [sys.executable, "-m", "twamerge"]


class Runner:
    """Runs twamerge commands, echoes them, and records command lines and wall times for the results page."""

    def __init__(self, out: Path, threads: int = 2, quiet: bool = False):
        self.out = Path(out)
        self.quiet = quiet
        self.records: list[dict[str, Any]] = []
        self.env = dict(os.environ, **OFFLINE_ENV)
        # The tool runs in its own process: cap its threads the same way as ours.
        self.env.setdefault("OMP_NUM_THREADS", str(threads))
        self.env.setdefault("MKL_NUM_THREADS", str(threads))

    def rel(self, p: Path | str) -> str:
        """Paths in the recorded commands are relative to the current folder when possible."""
        p = Path(p)
        try:
            return str(p.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)

    def __call__(self, *args: Any, parse_json: bool = False, label: str | None = None) -> Any:
        argv = [self.rel(a) if isinstance(a, Path) else str(a) for a in args]
        shown = "twamerge " + " ".join(shorten_paths(argv))
        if not self.quiet:
            print(f"$ {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(twamerge_argv() + argv, env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        # Keep what the tool printed (its own table goes to stderr) next to the run's outputs.
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stem = f"{len(self.records) + 1:02d}-{label or argv[0]}"
        (logs / f"{stem}.stderr.txt").write_text(proc.stderr)
        self.records.append(
            {
                "label": label or argv[0],
                "command": shown,
                "wall_s": round(wall, 2),
                "returncode": proc.returncode,
            }
        )
        self.save()
        if proc.returncode != 0:
            raise RuntimeError(
                f"twamerge exited with {proc.returncode}: {shown}\n--- stderr ---\n{proc.stderr[-4000:]}\n"
                f"--- stdout ---\n{proc.stdout[-2000:]}"
            )
        if parse_json:
            return parse_json_stdout(proc.stdout, shown)
        return proc.stdout

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "commands.json").write_text(json.dumps(self.records, indent=2) + "\n")


def shorten_paths(argv: list[str]) -> list[str]:
    """Shell-quoted arguments, with runs of numbered files written the way a user types them: `dir/*.ext` when
    the run is every such file in the folder, else a brace range `dir/epoch_{01..09}.ext` (bash)."""
    import re

    out: list[str] = []
    i = 0
    pat = re.compile(r"^(.*?)(\d+)(\.[A-Za-z0-9.]+)?$")
    while i < len(argv):
        m = pat.match(argv[i])
        j = i + 1
        if m and Path(argv[i]).exists():
            head, num, ext = m.group(1), m.group(2), m.group(3) or ""
            nums = [int(num)]
            while j < len(argv):
                mj = pat.match(argv[j])
                if not (
                    mj
                    and mj.group(1) == head
                    and (mj.group(3) or "") == ext
                    and len(mj.group(2)) == len(num)
                    and int(mj.group(2)) == nums[-1] + 1
                ):
                    break
                nums.append(int(mj.group(2)))
                j += 1
        if j - i >= 3:
            parent = Path(argv[i]).parent
            siblings = sorted(
                p
                for p in parent.iterdir()
                if pat.match(str(parent / p.name))
                and p.name.endswith(ext)
                and p.name.startswith(Path(head).name)
                and p.suffix == Path(argv[i]).suffix
            )
            if len(siblings) == j - i:
                out.append(shlex.quote(str(parent)) + "/" + Path(head).name + "*" + ext)
            else:
                out.append(f"{shlex.quote(head)}{{{num}..{str(nums[-1]).zfill(len(num))}}}{ext}")
            i = j
        else:
            out.append(shlex.quote(argv[i]))
            i += 1
    return out


def parse_json_stdout(stdout: str, what: str = "command") -> Any:
    """`--json` prints exactly one JSON object on stdout (the CLI's contract; anything else is an error)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{what}: stdout is not one JSON object:\n{stdout[-2000:]}") from None


# ---------------------------------------------------------------------------------------------------------
# Reading what the tool prints: `twamerge eval --json` and `twamerge fit --json`.


def eval_metrics(result: dict) -> dict[str, dict[str, float]]:
    """`twamerge eval --json` -> {checkpoint file or folder name: {"loss": .., "metric": ..}}."""
    out = {Path(r["path"]).name: {"loss": float(r["loss"]), "metric": float(r["metric"])}
           for r in result["checkpoints"]}
    if len(out) != len(result["checkpoints"]):
        raise RuntimeError("two evaluated checkpoints share a name; the examples key results by name")
    return out


def eval_one(result: dict) -> dict[str, float]:
    (metrics,) = eval_metrics(result).values()
    return metrics


def method_metric(fit_json: dict, kind: str) -> float | None:
    """Held-out metric of one method (uniform, greedy, twa) as reported by `twamerge fit --json`."""
    for m in fit_json["methods"]:
        if m["kind"] == kind:
            return None if m["heldout"] is None else float(m["heldout"]["metric"])
    return None


def candidate_metrics(fit_json: dict) -> dict[str, float]:
    """{candidate name: held-out metric} from `twamerge fit --json`."""
    return {m["name"]: float(m["heldout"]["metric"]) for m in fit_json["methods"]
            if m["kind"] == "candidate" and m["heldout"] is not None}


def greedy_ingredients(fit_json: dict) -> list[str] | None:
    return next((m["ingredients"] for m in fit_json["methods"] if m["kind"] == "greedy"), None)


def block_alphas(fit_json: dict) -> list[dict]:
    """[{keys, alphas, rank}] per block, from the fit's `blocks`."""
    return [{"keys": b["keys"], "alphas": b["alphas"], "rank": b["rank"]} for b in fit_json["blocks"]]


# ---------------------------------------------------------------------------------------------------------
# Data and checkpoints.


def save_split(path: Path, columns: dict[str, np.ndarray], label: str = "label") -> Path:
    """Write one split with `datasets.Dataset.save_to_disk`: vector inputs as fixed-length float32 sequences,
    token ids as int64 sequences, and an integer label column."""
    import datasets

    datasets.disable_progress_bars()
    feats = {}
    data = {}
    for name, arr in columns.items():
        arr = np.asarray(arr)
        if name == label:
            feats[name] = datasets.Value("int64")
            data[name] = arr.astype(np.int64)
        elif arr.ndim == 2:
            dtype = "int64" if np.issubdtype(arr.dtype, np.integer) else "float32"
            feats[name] = datasets.Sequence(datasets.Value(dtype), length=arr.shape[1])
            data[name] = arr.astype(dtype)
        else:
            raise ValueError(f"column {name}: expected a 2-d array, got shape {arr.shape}")
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(feats))
    if path.exists():
        shutil.rmtree(path)
    ds.save_to_disk(str(path))
    return path


def write_jsonl(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """One JSON object per line (all of each row's keys, or `columns` only): raw text splits, as a user keeps
    them, for `--val`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r if columns is None else {c: r[c] for c in columns}, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of each part, stratified by label (fractions sum to 1)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        prev = 0
        for i, cut in enumerate(cuts):
            parts[i].extend(idx[prev:cut].tolist())
            prev = cut
    return [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]


def save_checkpoint(model, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def accuracy(model, x, y, batch_size: int = 1024) -> float:
    """Accuracy of a vector-input classifier (used for the training log only; the tables use `twamerge eval`)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    model.train()
    return correct / max(1, len(x))


# ---------------------------------------------------------------------------------------------------------
# Reporting.


def fmt_acc(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_results(out: Path, name: str, payload: dict[str, Any]) -> Path:
    """`results.json`: what docs/results.md is generated from."""
    payload = dict(payload)
    payload.setdefault("example", name)
    payload.setdefault("machine", machine())
    payload.setdefault("nice", os.nice(0))
    payload.setdefault("argv", "python " + " ".join(shlex.quote(a) for a in sys.argv))
    path = Path(out) / "results.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
