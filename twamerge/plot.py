"""``--plot``: the learned alphas per block and the fit curve (needs the optional matplotlib extra)."""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError, TwamergeError
from .report import atomic_output


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TwamergeError("--plot needs matplotlib; pip install 'twamerge[plot]'") from exc
    return plt


def plot_format(path: Path) -> str:
    """The image format ``path``'s suffix names; raises when matplotlib is missing or cannot write it.

    Called before the fit starts, so a bad ``--plot`` name fails before any output is written.
    """
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lower().removeprefix(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise OutputError(f"{path}: a plot needs an image suffix ({', '.join('.' + f for f in sorted(supported))}), "
                          f"not {Path(path).suffix or 'none'!r}")
    return fmt


def plot_report(report: dict, path: Path, force: bool = False, transaction=None) -> None:
    """Draw alphas (one line per candidate across blocks) and the training-loss curve into ``path``."""
    fmt = plot_format(path)
    plt = _pyplot()
    alphas = report["merge"]["block_alphas"]
    names = [Path(c["path"]).name for c in report["candidates"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    blocks = range(len(alphas))
    for k, name in enumerate(names):
        ax1.plot(blocks, [row[k] for row in alphas], marker="o" if len(alphas) < 40 else None, label=name)
    ax1.axhline(1 / len(names), color="grey", linestyle=":", label="uniform")
    ax1.set_xlabel(f"block ({report['settings']['blocks']})")
    ax1.set_ylabel("alpha")
    ax1.set_title("learned coefficients per block")
    if len(names) <= 12:
        ax1.legend(fontsize=7)
    curve = report["fit"]["curve"]
    ax2.plot(curve, alpha=0.35, label="per step")
    window = max(1, len(curve) // 20)
    if window > 1:
        smooth = [sum(curve[max(0, i - window + 1): i + 1]) / len(curve[max(0, i - window + 1): i + 1])
                  for i in range(len(curve))]
        ax2.plot(smooth, label=f"mean of {window} steps")
        ax2.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (fit split)")
    ax2.set_title("fit curve")
    fig.tight_layout()
    try:
        with atomic_output(path, force, "plot", transaction) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
