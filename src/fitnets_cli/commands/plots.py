"""PNG plots for `fitnets compare plots=DIR`: accuracy against cost, and training curves per stage."""

from pathlib import Path

import matplotlib

from fitnets_cli.runtime.files import atomic_write

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_tradeoffs(rows: list[dict], out: Path) -> list[Path]:
    """Test accuracy against multiplications and against params (log x), teacher starred."""
    rows = [r for r in rows if r.get("test_acc") is not None]
    written = []
    if not rows:
        return written
    out.mkdir(parents=True, exist_ok=True)
    for key, label in (("mults", "multiplications"), ("params", "parameters")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            teacher = r["role"] == "teacher"
            ax.errorbar(r[key], r["test_acc"], yerr=r.get("test_acc_std") or 0, fmt="*" if teacher else "o",
                        markersize=14 if teacher else 7, capsize=3, color="tab:red" if teacher else "tab:blue")
            name = r["model"] + (f" ({r['schedule']})" if r["schedule"] else "")
            ax.annotate(name + (" [teacher]" if teacher else ""), (r[key], r["test_acc"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy (%)", title=f"accuracy vs {label}")
        ax.grid(alpha=0.3)
        path = out / f"acc_vs_{key}.png"
        fig.tight_layout()
        save(fig, path)
        written.append(path)
    return written


def plot_curves(runs: list[dict], out: Path) -> Path:
    """Per run: train loss terms, validation accuracy (or hint loss) and lam over epochs, stages marked."""
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"hint": "-", "ce": "--", "kd": ":"}
    for i, run in enumerate(runs):
        m = run["metrics"]
        color = f"C{i % 10}"
        name = f"{m['model']} {m['schedule']} seed {m['seed']} ({run['dir'].name})"
        epoch = 0
        for stage in m["stages"] + m.get("retrain", []):
            xs = [epoch + h["epoch"] for h in stage["history"]]
            for key in [k for k in stage["history"][0] if k.startswith("train_") and k != "train_acc"]:
                axes[0].plot(xs, [h[key] for h in stage["history"]], styles.get(key[6:], "-"), color=color,
                             label=f"{name}: {key[6:]}")
            if "valid_acc" in stage["history"][0]:
                axes[1].plot(xs, [100 * h["valid_acc"] for h in stage["history"]], color=color, label=name)
            if "lam" in stage["history"][0]:
                axes[2].plot(xs, [h["lam"] for h in stage["history"]], color=color, label=name)
            for ax in axes:
                ax.axvline(epoch, color="grey", linestyle=":", linewidth=0.8)
            epoch += len(stage["history"])
    titles = ("train loss terms", "validation accuracy (%)", "lam")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="epoch (all stages)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0].set_yscale("log")
    fig.tight_layout()
    path = out / "curves.png"
    save(fig, path)
    return path


def save(fig, path: Path) -> None:
    """Write the figure as a PNG through atomic_write, like every other output, and free it."""
    # The temporary file's .tmp suffix would make matplotlib guess the format: name it.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
