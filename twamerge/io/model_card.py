"""The ``README.md`` model card a merged folder gets: what was merged, how, how well, and how to write it again.

Hugging Face model cards start with YAML front matter (``library_name``, ``base_model``, ``tags``);
the body here is plain Markdown made only from what the merge recorded, so that ``twamerge apply``
writes the same card as the fit it re-emits. Values that come from files (paths, names) are
written as JSON strings in the front matter (valid YAML, whatever they hold) and without Markdown
table breaks in the body.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["apply_command", "average_card", "average_command", "fit_card"]

TAGS = ("merge", "twamerge")


def _front_matter(library_name: str | None, base_model: str | None) -> list[str]:
    lines = ["---"]
    if library_name:
        lines.append(f"library_name: {library_name}")
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines += ["tags:", *(f"- {t}" for t in TAGS), "---", ""]
    return lines


def _cell(value: Any) -> str:
    """Text for one Markdown table cell: no line breaks, no column separators."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _candidates_table(candidates: Sequence[Mapping], extra: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    extra = extra or {}
    head = ["#", "candidate", "SHA-256", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(candidates):
        cells = [str(i + 1), f"`{_cell(c.get('path', '?'))}`", f"`{c['sha256']}`" if c.get("sha256") else "-",
                 *(col[i] for col in extra.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def apply_command(report: str, candidates: Sequence[str], out: str, *, merge_into_base: bool = False,
                  model: str | None = None) -> str:
    """The ``twamerge apply`` command that writes this merge again (shell-quoted)."""
    words = ["twamerge", "apply", report, *candidates, "-o", out]
    if merge_into_base:
        words.append("--merge-into-base")
    if model is not None:
        words += ["--model", model]
    return " ".join(shlex.quote(str(w)) for w in words)


def average_command(paths: Sequence[str], out: str, *, weights: Sequence[float] | None = None,
                    ema: float | None = None, normalize: bool = True, dtype: str | None = None,
                    ema_key: str | None = None, keys: str = "strict", merge_into_base: bool = False,
                    model: str | None = None, hash_inputs: bool = True) -> str:
    """The ``twamerge average`` command that writes this average again (shell-quoted)."""
    words = ["twamerge", "average", *paths, "-o", out]
    if weights is not None:
        words += ["--weights", ",".join(repr(float(w)) for w in weights)]
    if ema is not None:
        words += ["--ema", repr(float(ema))]
    if not normalize:
        words.append("--no-normalize")
    if dtype not in (None, "auto"):
        words += ["--dtype", dtype]
    if ema_key is not None:
        words += ["--key", ema_key]
    if keys != "strict":
        words += ["--keys", keys]
    if merge_into_base:
        words.append("--merge-into-base")
    if model is not None:
        words += ["--model", model]
    if not hash_inputs:
        words.append("--no-hash")  # the metadata then holds no hashes: the same bytes need the same flag
    return " ".join(shlex.quote(str(w)) for w in words)


def _output_lines(adapter: Mapping | None, merge_into_base: bool) -> list[str]:
    if adapter is None:
        return []
    if merge_into_base:
        sha = adapter.get("base_sha256")
        return [f"The candidates are LoRA adapters of `{_cell(adapter.get('base_model'))}`"
                + (f" (weights SHA-256 `{sha}`)" if sha else "")
                + "; this folder is the base model with the merged update added to its weights (`--merge-into-base`).",
                ""]
    return [f"The candidates are LoRA adapters of `{_cell(adapter.get('base_model'))}` (rank {adapter.get('rank')}, "
            f"{adapter.get('modules')} modules). This folder is a PEFT LoRA adapter whose effect is the merge exactly: "
            "the weighted factors of the adapters concatenated (rank = the sum of their ranks, scaling 1), so "
            "`W + B A = W + sum_k alpha_k s_k B_k A_k`. Load it with `PeftModel.from_pretrained(base, this_folder)`.",
            ""]


def fit_card(report: Mapping[str, Any], *, library_name: str | None, base_model: str | None,
             adapter: Mapping | None = None, merge_into_base: bool = False, alpha_blocks: Sequence[int] | None = None,
             reproduce: str | None = None) -> str:
    """The card of a fit's output, from its report (or the part of it known before the write).

    Reads ``candidates``, ``methods``, ``metric_name``, ``higher_is_better``, ``heldout_rows``,
    ``written.name``, ``settings`` (``blocks``, ``bits``) and ``merge.block_alphas``.

    Args:
        adapter: ``AdapterSet.describe()`` when the candidates are LoRA adapters (with ``base_sha256``, the
            base's weights, for a merge into the base).
        alpha_blocks: the blocks the alphas summary covers (an adapter fit: those of adapted tensors);
            default all.
        reproduce: the ``twamerge apply`` command (:func:`apply_command`); None when the fit wrote no
            report, which ``apply`` needs.
    """
    settings = report.get("settings") or {}
    metric = _cell(report.get("metric_name", "metric"))
    direction = "higher" if report.get("higher_is_better", True) else "lower"
    written = (report.get("written") or {}).get("name", "twa")
    candidates = report.get("candidates") or []
    alphas = (report.get("merge") or {}).get("block_alphas") or []
    rows = [alphas[b] for b in (alpha_blocks if alpha_blocks is not None else range(len(alphas)))]
    k = len(candidates)
    cols = {"alpha mean": [], "alpha min": [], "alpha max": []}
    for i in range(k):
        values = [r[i] for r in rows if i < len(r)]
        cols["alpha mean"].append(_num(sum(values) / len(values)) if values else "-")
        cols["alpha min"].append(_num(min(values)) if values else "-")
        cols["alpha max"].append(_num(max(values)) if values else "-")
    lines = _front_matter(library_name, base_model)
    lines += [f"# Merge of {k} {'LoRA adapters' if adapter is not None else 'checkpoints'} with Trainable Weight "
              "Averaging", "",
              f"Written by twamerge {_cell(report.get('version', ''))}: `{_cell(written)}` (the merge `twamerge fit` "
              f"wrote; TWA learns one weight per candidate in each of {len(alphas)} blocks (`--blocks "
              f"{_cell(settings.get('blocks', '?'))}`) on validation data, basis at {settings.get('bits', '?')} bits). "
              "Each block of weights is `sum_k alpha_k c_k` with the alphas summing to 1.", ""]
    lines += _output_lines(adapter, merge_into_base)
    lines += ["## Candidates and their weights", "",
              f"Alphas over the {len(rows)} blocks" + (" of adapted tensors" if alpha_blocks is not None else "")
              + " (what was written):", ""]
    lines += _candidates_table(candidates, cols) + [""]
    held = bool(report.get("heldout_rows"))
    split = "heldout" if held else "fit"
    lines += ["## Results", "",
              (f"On {report.get('heldout_rows')} held-out rows of the validation data that the coefficients were not "
               f"fitted on; {metric}: {direction} is better." if held else
               f"On the rows the coefficients were fitted on (`--holdout 0`: no held-out rows); {metric}: {direction} "
               "is better."), "",
              f"| method | loss | {metric} ({direction} is better) |", "|---|---|---|"]
    for row in report.get("methods") or []:
        scores = row.get(split) or {}
        name = _cell(row.get("name", "?"))
        if row.get("name") == written:
            name = f"**{name}** (written)"
        lines.append(f"| {name} | {_num(scores.get('loss'))} | {_num(scores.get('metric'))} |")
    lines += ["", "## Reproduce", ""]
    if reproduce is not None:
        lines += ["The fit's report holds the coefficients; with the same candidates (checked by SHA-256) this writes "
                  "the same merge:", "", "```sh", reproduce, "```", ""]
    else:
        lines += ["The fit wrote no report (`--report`), which `twamerge apply` needs to write this merge again; run "
                  "the fit with `--report` to keep the coefficients.", ""]
    return "\n".join(lines)


def average_card(summary: Mapping[str, Any], *, library_name: str | None, base_model: str | None,
                 adapter: Mapping | None = None, merge_into_base: bool = False, reproduce: str | None = None) -> str:
    """The card of a data-free average (``twamerge average``), from its summary (``method``, ``weights``,
    ``ema_decay``, ``inputs``, ``version``)."""
    method = summary.get("method", "?")
    weights = summary.get("weights") or []
    inputs = summary.get("inputs") or []
    how = {"uniform": "the uniform average (SWA)", "weighted": "a weighted average with fixed weights",
           "ema": f"an exponential moving average (decay {summary.get('ema_decay')}) over the candidates in order"}
    lines = _front_matter(library_name, base_model)
    lines += [f"# Average of {len(inputs)} {'LoRA adapters' if adapter is not None else 'checkpoints'}", "",
              f"Written by twamerge {_cell(summary.get('version', ''))}: {how.get(method, _cell(method))}, "
              "`sum_k w_k c_k`, computed without data (no held-out evaluation was made).", ""]
    lines += _output_lines(adapter, merge_into_base)
    lines += ["## Candidates and their weights", ""]
    lines += _candidates_table(inputs, {"weight": [_num(w) for w in weights]}) + [""]
    if reproduce is not None:
        lines += ["## Reproduce", "", "```sh", reproduce, "```", ""]
    return "\n".join(lines)
