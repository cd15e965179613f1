"""The run report: one self-contained HTML page (images embedded as base64 PNG, no external files)
and the figures it shows, written as PNG files so Snakemake's ``report()`` can register them too.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medldm.io import atomic_path
from medldm.report.montage import AXES

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #345}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right;font-size:13px}th{background:#eef}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}figure{margin:0 0 1em}
figcaption{font-size:12px;color:#555}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}
.warn{color:#a40;font-size:13px}.note{color:#555;font-size:13px}
"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def data_uri(path: str | os.PathLike) -> str:
    """A PNG file as a ``data:`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def fmt(value, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` significant digits, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """An HTML table of ``rows`` with ``columns`` given as (key, header) pairs."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    """One titled part of the page: HTML fragments and figures (PNG paths) with captions."""

    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, text: str, css: str = "note") -> None:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>')

    def html(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure(self, path: str | os.PathLike, caption: str = "") -> None:
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption or Path(path).stem)}">'
                          f"{cap}</figure>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")


def render(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page as one HTML string."""
    nav = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{html.escape(s.title)}</h2>' + "".join(s.parts) for i, s in enumerate(sections))
    sub = f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{sub}<ul>{nav}</ul>{body}"
            "</body></html>\n")


# ----------------------------------------------------------------------------- figures


def plot_curves(metrics_csv: str | os.PathLike, title: str, path: str | os.PathLike) -> Path | None:
    """Training curves from a ``MetricsLog`` CSV (step + one column per metric), one panel per
    metric; None when the file is missing or empty."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [k for k in (rows[0] if rows else {}) if k != "step"]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(float(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, lw=1)
            if min(y) > 0 and max(y) / min(y) > 50:
                ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_fid(fid_rows: dict[str, list[dict]], path: str | os.PathLike, key: str = "fid",
             label: str = "FID") -> Path:
    """Bars of ``key`` per axis (and their mean) for each sample set and group."""
    plt = _pyplot()
    series = [(f"{name} / {r['group']}", r) for name, rows in fid_rows.items() for r in rows]
    labels = sorted({s for s, _ in series}, key=[s for s, _ in series].index)
    positions = [*fid_axes([r for _, r in series]), "mean"]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, lab in enumerate(labels):
        values = {r["axis"]: np.nan if r.get(key) is None else r[key] for s, r in series if s == lab}
        ax.bar(np.arange(len(positions)) + i * width, [values.get(p, np.nan) for p in positions], width, label=lab)
    ax.set_xticks(np.arange(len(positions)) + width * (len(labels) - 1) / 2, positions)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_msssim(diversity: dict[str, dict], path: str | os.PathLike) -> Path:
    """Mean +- std MS-SSIM among synthetic pairs and among real pairs, per sample set and group."""
    plt = _pyplot()
    bars = []
    for name, d in diversity.items():
        for kind in ("real", "synthetic"):
            for group, s in d.get(kind, {}).items():
                bars.append((f"{name}\n{group} {kind}", s["mean"], s["std"], kind))
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(bars)), 3.2))
    colours = {"real": "#4a7", "synthetic": "#47a"}
    ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars],
           color=[colours[b[3]] for b in bars], capsize=3)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("MS-SSIM among pairs")
    ax.set_ylim(0, 1)
    return save_figure(fig, path)


def plot_classifier(arms: dict[str, dict], path: str | os.PathLike) -> Path:
    """Each arm's metrics with bootstrap 95 % intervals, one panel per metric."""
    plt = _pyplot()
    metrics = ("accuracy", "balanced_accuracy", "roc_auc")
    labels = list(arms)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, arm in enumerate(labels):
            m = arms[arm]["metrics"][metric]
            low, high = m["value"] - m["ci_low"], m["ci_high"] - m["value"]
            ax.errorbar([i], [m["value"]], yerr=[[max(low, 0)], [max(high, 0)]], fmt="o", capsize=4)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="#999", lw=0.6, ls="--")
        ax.set_title(metric.replace("_", " "), fontsize=9)
    return save_figure(fig, path)


def plot_inpainting(path: str | os.PathLike, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """Per (title, original, mask, inpainted): the voided input, the original with the mask's outline,
    the inpainted volume and the original, on the axial slice holding the most mask voxels."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(9, 2.4 * len(rows)), squeeze=False)
    for ax_row, (title, original, mask, inpainted) in zip(axes, rows, strict=True):
        z = int(np.argmax(np.asarray(mask).sum(axis=(0, 1))))
        hole = np.asarray(mask)[:, :, z].T > 0
        panels = {"input (voided)": np.where(hole, 0, original[:, :, z].T), "mask outline": original[:, :, z].T,
                  "inpainted": np.asarray(inpainted)[:, :, z].T, "original": original[:, :, z].T}
        for ax, (name, image) in zip(ax_row, panels.items(), strict=True):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower")
            if name == "mask outline":
                ax.contour(hole, levels=[0.5], colors="#f33", linewidths=0.8)
            ax.set_title(f"{title}: {name}" if name == "input (voided)" else name, fontsize=8)
            ax.axis("off")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the page


def _load_json(path) -> dict | None:
    import json

    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _montages_per_class(section: Section, figures: Path, stem: str, images, class_index, names: list[str],
                        titles: list[str], per_class: int, what: str) -> None:
    """One montage (rows = volumes, columns = axes) per class, or one when there are no classes."""
    from medldm.report.montage import save_montage

    class_index = np.asarray(class_index)
    groups = [(n, np.flatnonzero(class_index == i)) for i, n in enumerate(names)] or [("all", np.arange(len(titles)))]
    for name, rows in groups:
        rows = rows[:per_class]
        if len(rows):
            path = figures / f"{stem}_{name}.png"
            save_montage(path, [np.asarray(images[i]) for i in rows], [titles[i] for i in rows])
            shown = "images" if np.asarray(images[rows[0]]).ndim == 2 else "mid-slices on three axes"
            section.figure(path, f"{what}, class {name}: {shown}")


FID_COMPARED = {"samples": "sample set", "real_train": "real training subjects (perfect generator)",
                "reconstruction": "autoencoder reconstructions (autoencoder floor)"}


def fid_axes(rows: list[dict]) -> tuple[str, ...]:
    """The slice axes of FID rows, in order (``AXES``; ``image`` alone for 2D images)."""
    return tuple(dict.fromkeys(r["axis"] for r in rows if r["axis"] != "mean")) or AXES


def pooled_fid(rows: list[dict]) -> dict[str, dict]:
    """The pooled (group ``all``) FID rows of one comparison, by axis (and ``mean``)."""
    return {r["axis"]: r for r in rows if r["group"] == "all"}


def fid_cell(row: dict | None) -> str:
    """FID with its bootstrap interval, e.g. ``12.3 (10.1–15.2)``; ``no FID`` when flagged."""
    if not row:
        return "–"
    if row.get("fid") is None:
        return "no FID"
    interval = f" ({fmt(row['ci_low'], 3)}–{fmt(row['ci_high'], 3)})" if row.get("ci_low") is not None else ""
    return f"{fmt(row['fid'])}{interval}"


def empty_flag(metrics: dict) -> str:
    """``k of n volumes empty`` for a sample set with volumes that gave no non-empty slice."""
    empty = metrics["fid"].get("empty_volumes", 0)
    return f"{empty} of {metrics['n_volumes']['synthetic']} volumes empty" if empty else ""


def _fid_floor_rows(metrics: dict[str, dict]) -> list[dict]:
    """Per sample set: its pooled FID next to its floors, per axis and mean, with intervals."""
    rows = []
    for name, m in metrics.items():
        compared = {"samples": {"n_volumes": m["n_volumes"]["synthetic"], "rows": m["fid"]["rows"]},
                    **m["fid"].get("baselines", {})}
        for kind, c in compared.items():
            pooled = pooled_fid(c["rows"])
            flags = [empty_flag(m)] if kind == "samples" else []
            axes = fid_axes(c["rows"])
            flags += [pooled[a]["flag"] for a in axes if pooled[a].get("flag")]  # the mean's repeats them
            rows.append({"set": name, "compared": FID_COMPARED[kind], "volumes": c["n_volumes"],
                         "slices": pooled["mean"]["n_synthetic"], **{a: fid_cell(pooled[a]) for a in (*axes, "mean")},
                         "flag": "; ".join(dict.fromkeys(f for f in flags if f))})
    return rows


def _fid_section(metrics: dict[str, dict], figures: Path) -> Section:
    first = next(iter(metrics.values()))
    fid, spec, weights = first["fid"], first["fid"]["slice_spec"], first["fid"]["weights"]
    axes = fid_axes(fid["rows"])
    planar = axes == ("image",)  # 2D images: FID on the images themselves, one "axis"
    section = Section("FID and KID (per image)" if planar else "FID and KID (per-slice, three axes)")
    every = f"{spec['slices_per_volume']} evenly spaced" if spec["slices_per_volume"] else "all"
    drawn = ("the 2D images themselves (axis `image`)" if planar else
             f"{every} slices of the central {spec['central_fraction']:.0%} of each axis")
    section.text(f"pytorch-fid InceptionV3, {fid['dims']}-d features of 8-bit {'images' if planar else 'slices'} "
                 f"repeated to 3 channels: {drawn}, {'images' if planar else 'slices'} with less than "
                 f"{spec['min_foreground']:.0%} of pixels above {spec['empty_threshold']} dropped. Weights: "
                 f"{weights['source']} (sha256 {weights['sha256'][:12]}). Real reference: the {first['real_split']} "
                 f"split ({first['n_volumes']['real']} {'images' if planar else 'volumes'}).")
    if not weights.get("verified"):
        section.text("The Inception weights are not pytorch-fid's published ones (evaluate.fid.allow_unverified): "
                     "these FID and KID values are not comparable with any published figure.", css="warn")
    for name, m in metrics.items():
        if empty_flag(m):
            section.text(f"Sample set {name}: {empty_flag(m)} (no slice above the foreground threshold); "
                         "they add no slices to FID, and a set without enough slices gets no FID.", "warn")
    section.text("Pooled FID of each sample set next to its floors, measured the same way against the same "
                 "reference: real training subjects (as many per class as the sample set has; what a perfect "
                 "generator would score at these counts) and the autoencoder's reconstructions of the reference "
                 f"subjects (the best its decoder allows). In brackets: percentile bootstrap 95 % intervals "
                 f"({fid.get('bootstrap', 0)} resamples of the volumes of both sets). A resample repeats volumes, "
                 "which raises FID, so the intervals lie mostly above the estimate: read them as spread, and "
                 "compare sets only through overlapping or separated intervals.")
    section.html(table(_fid_floor_rows(metrics), [("set", "sample set"), ("compared", "compared with reference"),
                                                  ("volumes", "images" if planar else "volumes"),
                                                  ("slices", "images" if planar else "slices (3 axes)"),
                                                  *[(a, f"FID {a}") for a in (*axes, "mean")], ("flag", "flag")]))
    rows = [{"set": name, **r} for name, m in metrics.items() for r in m["fid"]["rows"]]
    columns = [("set", "sample set"), ("group", "group"), ("axis", "axis"), ("fid", "FID"),
               ("kid_mean", "KID"), ("kid_std", "KID std"), ("n_real", "real slices"),
               ("n_synthetic", "synthetic slices"), ("rank_deficient", "slices < dims"), ("flag", "flag")]
    section.text("Sample sets per class and axis:")
    section.html(table(rows, columns))
    if any(r["rank_deficient"] for r in rows):
        section.text("Fewer slices than feature dimensions: covariances are rank-deficient, FID is biased "
                     "upwards and comparable only between runs with the same slice counts.", "warn")
    section.figure(plot_fid({n: m["fid"]["rows"] for n, m in metrics.items()}, figures / "fid.png"),
                   "FID per axis and mean, per sample set and class (all = pooled)")
    if any(r.get("kid_mean") is not None for r in rows):
        section.figure(plot_fid({n: m["fid"]["rows"] for n, m in metrics.items()}, figures / "kid.png",
                                key="kid_mean", label="KID"), "KID per axis and mean")
    return section


def _msssim_section(metrics: dict[str, dict], recon: dict[str, dict], figures: Path) -> Section:
    section = Section("Diversity (MS-SSIM) and autoencoder fidelity")
    if metrics:
        rows = [{"set": name, "kind": kind, "group": group, **s}
                for name, m in metrics.items() for kind in ("synthetic", "real")
                for group, s in m["msssim"][kind].items()]
        kernel = next(iter(metrics.values()))["msssim"]
        pairs = "images (2D" if fid_axes(next(iter(metrics.values()))["fid"]["rows"]) == ("image",) else "volumes (3D"
        section.text(f"MS-SSIM among pairs of {pairs}, kernel {kernel['kernel_size']}, "
                     f"{len(kernel['scale_weights'])} scales); lower means more diverse. Synthetic pairs should "
                     "be about as diverse as real pairs: much higher suggests mode collapse.")
        section.html(table(rows, [("set", "sample set"), ("kind", "pairs of"), ("group", "group"),
                                  ("mean", "mean MS-SSIM"), ("std", "std"), ("n", "pairs")]))
        section.figure(plot_msssim({n: m["msssim"] for n, m in metrics.items()}, figures / "msssim.png"),
                       "MS-SSIM among pairs: real (green) and synthetic (blue), mean and std")
    if recon:
        section.text("Autoencoder reconstructions of the real test subjects (data range 1):")
        section.html(table([{"vae": n, "n": r["n"], "ssim": r["ssim"]["mean"], "ssim_std": r["ssim"]["std"],
                             "psnr": r["psnr"]["mean"], "psnr_std": r["psnr"]["std"]} for n, r in recon.items()],
                           [("vae", "autoencoder"), ("n", "subjects"), ("ssim", "SSIM"), ("ssim_std", "std"),
                            ("psnr", "PSNR (dB)"), ("psnr_std", "std")]))
    return section


def _interval_cells(row: dict, metrics: dict) -> dict:
    """``row`` with each metric's value and its 95 % interval as text."""
    for metric, m in metrics.items():
        row[metric] = m["value"]
        row[f"{metric}_ci"] = f"{fmt(m['ci_low'], 3)} – {fmt(m['ci_high'], 3)}"
    return row


def _metric_columns() -> list[tuple[str, str]]:
    return [("accuracy", "accuracy"), ("accuracy_ci", "95 % CI"), ("balanced_accuracy", "balanced acc."),
            ("balanced_accuracy_ci", "95 % CI"), ("roc_auc", "ROC AUC"), ("roc_auc_ci", "95 % CI")]


def _in_order(items: dict, order: list[str]) -> dict:
    """``items`` in ``order`` (JSON files sort their keys), unknown keys last."""
    return dict(sorted(items.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _classifier_section(results: dict[str, dict], figures: Path, saliency: dict[str, list[str]]) -> Section:
    from medldm.evaluation.classifier import ARMS, DIFFERENCES, METRICS

    section = Section("Classifier: train on synthetic, test on real")
    section.text("One classifier per arm (training set, in the images' dimension), same network, seed and number of steps; all tested "
                 "on the real test subjects. Arms: real training subjects (trained once per run), the "
                 "autoencoder's reconstructions of them (its floor: what the autoencoder's blur alone costs), the "
                 "sample set's synthetic volumes, and real plus synthetic. Intervals: percentile bootstrap 95 % "
                 "over test subjects.")
    rows, differences = [], []
    for name, r in results.items():
        r["arms"] = _in_order(r["arms"], ARMS)
        for arm, a in r["arms"].items():
            rows.append(_interval_cells({"set": name, "arm": arm, "n_train": a["n_train"], "n_test": r["n_test"]},
                                        a["metrics"]))
        for label, d in _in_order(r.get("differences", {}), [f"{a} - {b}" for a, b in DIFFERENCES]).items():
            differences.append(_interval_cells({"set": name, "difference": label},
                                               {m: d[m] for m in METRICS}))
        section.figure(plot_classifier(r["arms"], figures / f"classifier_{name}.png"),
                       f"{name}: metrics per arm with 95 % intervals (dashed: chance for two classes)")
    section.html(table(rows, [("set", "sample set"), ("arm", "trained on"), ("n_train", "train volumes"),
                              ("n_test", "test subjects"), *_metric_columns()]))
    if differences:
        section.text("Differences between arms (arm − baseline), with paired bootstrap 95 % intervals: both arms "
                     "scored on the same resampled test subjects. An interval that contains 0 shows no difference "
                     "these test subjects can resolve.")
        section.html(table(differences, [("set", "sample set"), ("difference", "arm − baseline"),
                                         *_metric_columns()]))
    for path in dict.fromkeys(p for paths in saliency.values() for p in paths or []):
        if Path(path).is_file():
            section.figure(path, "Grad-CAM of test subjects; each title names the arm whose classifier it shows")
    return section


def _summary_section(sets: dict, metrics: dict, classifier: dict) -> Section:
    from medldm.evaluation.classifier import ARMS

    section = Section("Summary")
    rows = []
    for name, s in sets.items():
        row = {"set": name, "ldm": s.get("ldm")}
        if name in metrics:
            pooled = pooled_fid(metrics[name]["fid"]["rows"])
            baselines = metrics[name]["fid"].get("baselines", {})
            row |= {f"fid_{a}": pooled[a]["fid"] for a in fid_axes(metrics[name]["fid"]["rows"])}
            row["fid_mean"] = fid_cell(pooled["mean"])
            row |= {f"floor_{k}": fid_cell(pooled_fid(b["rows"])["mean"]) for k, b in baselines.items()}
            row["empty"] = empty_flag(metrics[name])
            row["kid"] = pooled["mean"].get("kid_mean")
            row["msssim_synthetic"] = metrics[name]["msssim"]["synthetic"]["all"]["mean"]
            row["msssim_real"] = metrics[name]["msssim"]["real"]["all"]["mean"]
        for arm, a in _in_order(classifier.get(name, {}).get("arms", {}), ARMS).items():
            row[f"auc_{arm}"] = a["metrics"]["roc_auc"]["value"]
        rows.append(row)
    arms = list(dict.fromkeys(k for r in rows for k in r if k.startswith("auc_")))
    axes = fid_axes([r for m in metrics.values() for r in m["fid"]["rows"]])
    section.html(table(rows, [("set", "sample set"), ("ldm", "diffusion model"),
                              *[(f"fid_{a}", f"FID {a}") for a in (*axes, "mean")],
                              ("floor_real_train", "FID mean, real train"),
                              ("floor_reconstruction", "FID mean, autoencoder"), ("empty", "empty volumes"),
                              ("kid", "KID (mean)"),
                              ("msssim_synthetic", "MS-SSIM synthetic"), ("msssim_real", "MS-SSIM real"),
                              *[(k, f"ROC AUC, trained on {k[4:]}") for k in arms]]))
    section.text("FID and KID pooled over classes (lower is closer to the real test set; mean with bootstrap "
                 "95 % interval, next to the floors: real training subjects and autoencoder reconstructions "
                 "scored the same way); MS-SSIM among pairs "
                 "(lower is more diverse); classifier ROC AUC on the real test subjects.")
    return section


INPAINT_METHODS = {"inpainted": "the sample set", "autoencoder": "baseline: autoencoder of the voided image",
                   "mean_fill": "baseline: mean foreground fill"}


def _inpainting_section(results: dict[str, dict], sets: dict, prepared, figures: Path) -> Section:
    """Inpaint sets: in-mask scores of each set and its baselines, and a few volumes side by side."""
    from medldm.data import h5layout

    section = Section("Inpainting (scored inside the masks)")
    rows = []
    for name, r in results.items():
        for method, m in _in_order(r["methods"], list(INPAINT_METHODS)).items():
            row = {"set": name, "method": INPAINT_METHODS.get(method, method), "outside": m["outside_max_abs"]}
            for metric in ("ssim", "psnr", "mse"):
                row[metric] = m[metric]["mean"]
                row[f"{metric}_ci"] = f"{fmt(m[metric]['ci_low'], 3)} – {fmt(m[metric]['ci_high'], 3)}"
            rows.append(row)
    section.html(table(rows, [("set", "sample set"), ("method", "fill"), ("ssim", "SSIM"), ("ssim_ci", "95 % CI"),
                              ("psnr", "PSNR (dB)"), ("psnr_ci", "95 % CI"), ("mse", "MSE"), ("mse_ci", "95 % CI"),
                              ("outside", "max |diff| outside")]))
    section.text("SSIM (the SSIM map averaged over the mask), PSNR and MSE inside the masks against the original "
                 "prepared volume, mean over volumes with percentile bootstrap 95 % intervals; both baselines are "
                 "pasted back like the set. The largest absolute difference outside the masks must be 0.")
    row_of = {sid: i for i, sid in enumerate(prepared.subject_ids)}
    for name in results:
        with h5layout.open_volumes(sets[name]["volumes"]) as vol:
            shown = [(vol.subject_ids[i], prepared.volume(row_of[src]), vol.mask[i], vol.channel(0)[i])
                     for i, src in enumerate((vol.source_ids or [])[:3]) if src in row_of]
        if shown:
            section.figure(plot_inpainting(figures / f"inpainting_{name}.png", shown),
                           f"Sample set {name}: voided input, mask outline, inpainted, original (axial slice)")
    return section


SEGMENTATION_MEASURES = {
    "adherence": "adherence: segmenter on the synthetic volumes vs their own label maps",
    "control": "control: segmenter on the synthetic volumes vs randomly paired real test maps",
    "synthetic": "trained on synthetic pairs, tested on real test subjects",
    "real+synthetic": "trained on real + synthetic pairs, tested on real test subjects",
}


def _dice_cells(row: dict, dice: dict) -> dict:
    """``row`` with one "mean [low, high]" cell per label (and the mean over labels)."""
    for label, d in dice.items():
        row[label] = f"{fmt(d['mean'], 3)} [{fmt(d['ci_low'], 3)}, {fmt(d['ci_high'], 3)}]"
    return row


def _segmentation_section(segmenter: dict | None, results: dict[str, dict], sets: dict, figures: Path,
                          contour_volumes: int) -> Section:
    from medldm.data import h5layout
    from medldm.report.montage import save_contours

    section = Section("Segmentation: adherence to label maps, and train on synthetic")
    section.text("One small segmenter (MONAI, in the images' dimension) trained on the real training subjects' label maps; its Dice on "
                 "the real test subjects is the ceiling. Adherence: its Dice on each synthetic volume against the "
                 "map the volume carries (its condition or generated map); a set without maps is the control, "
                 "scored against randomly paired real test maps, and should be clearly lower. The same network, "
                 "steps and seed trained on a set's synthetic pairs alone and on real + synthetic show their use "
                 "as training data. Cells: mean Dice over volumes or subjects [percentile bootstrap 95 % interval].")
    rows, labels = [], []
    if segmenter:
        labels = segmenter["labels"]
        rows.append(_dice_cells({"set": "real", "measure": "ceiling: trained on real, tested on real test subjects",
                                 "n": len(segmenter["test"]["per_subject"])}, segmenter["test"]["dice"]))
    for name, r in results.items():
        labels = r["labels"]
        adherence = r["adherence"]
        rows.append(_dice_cells({"set": name, "measure": SEGMENTATION_MEASURES[adherence["kind"]],
                                 "n": len(adherence["per_subject"])}, adherence["dice"]))
        for arm in ("synthetic", "real+synthetic"):
            if arm in r["arms"]:
                rows.append(_dice_cells({"set": name, "measure": SEGMENTATION_MEASURES[arm],
                                         "n": len(r["arms"][arm]["per_subject"])}, r["arms"][arm]["dice"]))
    leaked = [name for name, r in results.items() if r["adherence"].get("conditioned_on_test_subjects")]
    if leaked:
        section.text(f"Sets {', '.join(leaked)} were conditioned on real test subjects' maps, so their train-on-"
                     "synthetic rows have seen the test label maps (not the test images): read them as optimistic.",
                     "warn")
    section.html(table(rows, [("set", "set"), ("measure", "measure"), ("n", "volumes scored"),
                              *[(label, label) for label in labels[1:]], ("mean", "mean over labels")]))
    for name, r in results.items():
        if r["adherence"]["kind"] != "adherence" or not contour_volumes:
            continue
        with h5layout.open_volumes(sets[name]["volumes"]) as volumes:
            n = min(contour_volumes, len(volumes))
            path = figures / f"contours_{name}.png"
            save_contours(path, [volumes.image[i] for i in range(n)], [volumes.label[i] for i in range(n)],
                          volumes.subject_ids[:n], labels)
        section.figure(path, f"{name}: label-map contours over mid-slices of synthetic volumes")
    return section


def _data_section(prepared, sets: dict, classes: list[str], figures: Path, per_class: int) -> Section:
    from medldm.data import h5layout

    section = Section("Data: real and synthetic volumes")
    counts: dict[str, dict] = {}
    for split, c in zip(prepared.splits, prepared.class_index, strict=True):
        row = counts.setdefault(classes[c] if c >= 0 else "–", {"class": classes[c] if c >= 0 else "–"})
        row[split] = row.get(split, 0) + 1
    section.html(table(list(counts.values()), [("class", "class"), ("train", "train"), ("val", "val"),
                                               ("test", "test")]))
    test = prepared.subset("test")
    for k, (stem, what) in enumerate(channel_labels(prepared.channel_names)):
        _montages_per_class(section, figures, f"real_test{stem}", test.volumes(k), test.class_index, classes,
                            test.subject_ids, per_class, f"Real test subjects{what}")
    for name, s in sets.items():
        with h5layout.open_volumes(s["volumes"]) as synth:
            if synth.image is None:  # a label-map generator's set
                _montages_per_class(section, figures, f"synthetic_{name}",
                                    LabelDisplay(synth.label, len(synth.header.label_names)), synth.class_index,
                                    classes, synth.subject_ids, per_class, f"Synthetic, sample set {name} (label maps)")
                continue
            for k, (stem, what) in enumerate(channel_labels(synth.channel_names)):
                _montages_per_class(section, figures, f"synthetic_{name}{stem}", synth.channel(k), synth.class_index,
                                    classes, synth.subject_ids, per_class, f"Synthetic, sample set {name}{what}")
    return section


class LabelDisplay:
    """Label maps (an HDF5 ``label`` dataset) read by index as [0, 1] volumes for a montage:
    label / (L - 1)."""

    def __init__(self, labels, n_labels: int):
        self.labels, self.scale = labels, 1.0 / max(n_labels - 1, 1)

    def __getitem__(self, i) -> np.ndarray:
        return np.asarray(self.labels[i], np.float32) * self.scale


def _label_maps_section(label_maps: dict[str, dict], label_recon: dict[str, dict]) -> Section:
    """Label-map generators' sets (volume fraction per label, synthetic vs real) and label-map
    autoencoders' reconstructions (Dice per label)."""
    section = Section("Label maps")
    if label_maps:
        rows = [{"set": name, "label": label, "synthetic": f"{fmt(r['synthetic'][label]['mean'], 3)} ± "
                 f"{fmt(r['synthetic'][label]['std'], 3)}", "real": f"{fmt(r['real'][label]['mean'], 3)} ± "
                 f"{fmt(r['real'][label]['std'], 3)}"} for name, r in label_maps.items() for label in r["labels"]]
        section.text("Fraction of each label map's voxels per label (mean ± sd over the maps) of each label-map "
                     "generator's sample set and of the real test subjects' maps.")
        section.html(table(rows, [("set", "sample set"), ("label", "label"), ("synthetic", "synthetic"),
                                  ("real", "real test")]))
    if label_recon:
        rows = [{"vae": name, "label": label, "n": r["n"], "dice": s["mean"], "std": s["std"]}
                for name, r in label_recon.items() for label, s in r["dice_per_label"].items()]
        section.text("Label-map autoencoders: Dice of each label between the real test subjects' maps and "
                     "their reconstructions (argmax):")
        section.html(table(rows, [("vae", "autoencoder"), ("label", "label"), ("n", "subjects"),
                                  ("dice", "Dice"), ("std", "std")]))
    return section


def channel_labels(channels: list[str]) -> list[tuple[str, str]]:
    """(file-name suffix, caption suffix) of each image channel; empty for a single channel."""
    return [("", "")] if len(channels) == 1 else [(f"_{c}", f", channel {c}") for c in channels]


def per_channel(results: dict[str, dict]) -> dict[str, dict]:
    """Metrics JSONs keyed ``<name> [<channel>]`` per image channel where they have ``channels``
    (multi-channel subjects), as they are otherwise."""
    out = {}
    for name, result in results.items():
        for channel, part in result.get("channels", {None: {}}).items():
            out[name if channel is None else f"{name} [{channel}]"] = {**result, **part}
    return out


def _reconstruction_montage(section: Section, figures: Path, name: str, path, test) -> None:
    """Real test subjects next to their reconstructions by autoencoder ``name`` (up to three)."""
    from medldm.data import h5layout
    from medldm.report.montage import save_montage

    with h5layout.open_volumes(path) as rec:
        if rec.image is None:  # a label-map autoencoder's: scored in the label-map section
            return
        row_of = {sid: i for i, sid in enumerate(rec.subject_ids)}
        pairs = [(i, row_of[sid]) for i, sid in enumerate(test.subject_ids) if sid in row_of][:3]
        if not pairs:
            return
        channels = list(enumerate(rec.channel_names if len(rec.channel_names) > 1 else [""]))
        volumes = [v for i, j in pairs for k, _ in channels for v in (test.volume(i, k), rec.channel(k)[j])]
    titles = [t for i, _ in pairs for _, c in channels
              for t in (f"{test.subject_ids[i]} {c}".strip(), f"{test.subject_ids[i]} {c} recon".replace("  ", " "))]
    out = figures / f"reconstruction_{name}.png"
    save_montage(out, volumes, titles)
    section.figure(out, f"Autoencoder {name}: real test subjects and their reconstructions")


def _training_section(inputs: dict, test, figures: Path) -> Section:
    section = Section("Training curves")
    for kind, what in (("vae", "Autoencoder"), ("ldm", "Diffusion model"), ("controlnet", "ControlNet")):
        for name, m in inputs.get(kind, {}).items():
            if "run_dir" in m and not m["run_dir"]:  # an imported autoencoder (vae.<name>.pretrained)
                section.text(f"{what} {name}: imported, not trained by this workflow")
                continue
            path = plot_curves(Path(m.get("run_dir", "")) / "metrics.csv", f"{kind} {name}",
                               figures / f"curves_{kind}_{name}.png")
            if path:
                section.figure(path, f"{what} {name}: metrics.csv of its run directory")
            else:
                section.text(f"{what} {name}: no metrics.csv in {m.get('run_dir')}", "warn")
    for name, v in inputs.get("vae", {}).items():
        if v.get("reconstructions") and Path(v["reconstructions"]).is_file():
            _reconstruction_montage(section, figures, name, v["reconstructions"], test)
    return section


def _provenance_section(inputs: dict, config: dict) -> Section:
    import yaml

    from medldm.provenance import code_version, sha256_file

    section = Section("Configuration and provenance")
    hashed = {"manifest": inputs["manifest"]}
    hashed |= {f"vae {n}": v["model"] for n, v in inputs.get("vae", {}).items()}
    hashed |= {f"ldm {n}": v["model"] for n, v in inputs.get("ldm", {}).items()}
    hashed |= {f"sample set {n}": s["volumes"] for n, s in inputs.get("sample_sets", {}).items()}
    rows = [{"what": k, "path": str(p), "sha256": sha256_file(p)} for k, p in hashed.items() if Path(p).is_file()]
    rows += _controlnet_rows(inputs.get("controlnet", {}))
    weights = _load_json(inputs.get("fid_weights"))
    if weights:
        rows.append({"what": f"FID weights ({weights['source']})", "path": weights["weights"],
                     "sha256": weights["sha256"]})
    section.text(f"medldm {code_version()}")
    section.html(table(rows, [("what", "input"), ("path", "path"), ("sha256", "sha256")]))
    section.pre(yaml.safe_dump(config, sort_keys=False))
    return section


def _controlnet_rows(controlnets: dict[str, dict]) -> list[dict]:
    """Each controlnet.pt and, below it, the base ldm.pt it was trained on, by the sha256 it records."""
    from medldm.checkpoint import load_model_file
    from medldm.diffusion.controlnet import FORMAT, VERSION
    from medldm.provenance import sha256_file

    rows = []
    for name, entry in controlnets.items():
        if not Path(entry["model"]).is_file():
            continue
        record = load_model_file(entry["model"], ("format", FORMAT), VERSION, "train_controlnet")
        rows += [{"what": f"controlnet {name}", "path": str(entry["model"]), "sha256": sha256_file(entry["model"])},
                 {"what": f"controlnet {name}: its base, ldm {entry['ldm']}", "path": record["base"],
                  "sha256": record["base_sha256"]}]
    return rows


def build_report(inputs: dict, config: dict, figures: str | os.PathLike, montage_volumes: int = 4) -> str:
    """The whole report page; figures are written to ``figures`` as PNG and embedded.

    ``inputs``: {"manifest", "fid_weights" (record JSON), "vae": {name: {model, run_dir, reconstruction
    (metrics JSON), reconstructions (volumes .h5)}}, "ldm": {name: {model, run_dir}}, "sample_sets":
    {name: {ldm, volumes, metrics, classifier (JSON or None), saliency (PNGs of its arms, maybe empty),
    inpainting (in-mask scores JSON of an inpaint set, or None), segmentation (its Dice JSON, or None),
    label_maps (label fractions JSON of a label-map generator's set; absent otherwise)}},
    segmenter (the real segmenter's test scores JSON; absent without the segmentation evaluation),
    controlnet: {name: {model (controlnet.pt), ldm (its base's name), run_dir}} (absent without controlnets)}.
    """
    from medldm.data.cohort import load_prepared

    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    classes = list(config.get("classes", []))
    sets = inputs.get("sample_sets", {})
    metrics = {n: m for n, s in sets.items() if (m := _load_json(s.get("metrics")))}
    classifier = {n: c for n, s in sets.items() if (c := _load_json(s.get("classifier")))}
    inpainting = {n: r for n, s in sets.items() if (r := _load_json(s.get("inpainting")))}
    segmentation = {n: r for n, s in sets.items() if (r := _load_json(s.get("segmentation")))}
    recon = {n: r for n, v in inputs.get("vae", {}).items() if (r := _load_json(v.get("reconstruction")))}
    label_recon = {n: recon.pop(n) for n in [n for n, r in recon.items() if "dice_per_label" in r]}
    label_maps = {n: r for n, s in sets.items() if (r := _load_json(s.get("label_maps")))}
    prepared = load_prepared(inputs["manifest"], classes, with_labels=False)
    sections = [_summary_section(sets, metrics, classifier),
                _data_section(prepared, sets, classes, figures, montage_volumes),
                _training_section(inputs, prepared.subset("test"), figures)]
    if metrics:
        sections.append(_fid_section(per_channel(metrics), figures))
    if metrics or recon:
        sections.append(_msssim_section(per_channel(metrics), per_channel(recon), figures))
    if classifier:
        sections.append(_classifier_section(classifier, figures, {n: s.get("saliency") for n, s in sets.items()}))
    if inpainting:
        sections.append(_inpainting_section(inpainting, sets, prepared, figures))
    if segmentation or inputs.get("segmenter"):
        sections.append(_segmentation_section(_load_json(inputs.get("segmenter")), segmentation, sets, figures,
                                              config.get("evaluate", {}).get("segmentation", {}).get("contour_volumes", 3)))
    if label_maps or label_recon:
        sections.append(_label_maps_section(label_maps, label_recon))
    sections.append(_provenance_section(inputs, config))
    return render("medldm run report", sections, f"classes: {', '.join(classes) or 'none'}; "
                                                 f"{len(sets)} sample set(s)")
